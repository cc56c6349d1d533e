//! TLS on the data plane: `link::accept` and `link::connect` with
//! `DataTls`, against certificates made here with rcgen.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

use tempest_transport::auth::Secret;
use tempest_transport::codec::PRE_AUTH_MAX_FRAME;
use tempest_transport::link::{self, AcceptError};
use tempest_transport::tls::{DataTls, TlsError};
use tempest_transport::wire::{ErrorCode, Frame, Hello, PeerHello, PeerWelcome, Role, SlotRef};
use tempest_transport::DEFAULT_MAX_FRAME;

#[path = "common/certs.rs"]
mod certs;
use certs::Ca;

const SECRET: &str = "a data-plane secret for the TLS tests";
const DEADLINE: Duration = Duration::from_secs(5);

fn secret() -> Secret {
    Secret::new(SECRET).expect("long enough")
}

fn hello() -> Hello {
    Hello::new(
        "wc",
        Role::Peer(PeerHello {
            session: 7,
            from: None,
            to: SlotRef {
                task: 0,
                instance: 0,
                incarnation: 1,
            },
        }),
    )
}

/// Accepts one connection as a peer port does (TLS step, Hello, the
/// secret's challenge) and welcomes it; returns the connection, or why not.
async fn acceptor(
    listener: &TcpListener,
    tls: Option<&DataTls>,
) -> Result<link::Conn, Result<AcceptError, String>> {
    let (stream, peer) = listener.accept().await.expect("accept");
    let mut conn = link::accept(stream, peer, tls, DEADLINE, PRE_AUTH_MAX_FRAME)
        .await
        .map_err(Ok)?;
    let hello = link::read_hello(&mut conn, DEADLINE)
        .await
        .map_err(|e| Err(format!("{e:?}")))?;
    link::authenticate(&mut conn, &hello, Some(&secret()), DEADLINE)
        .await
        .map_err(|e| Err(format!("{e:?}")))?;
    link::accepted(&mut conn, DEFAULT_MAX_FRAME);
    conn.send(Frame::PeerWelcome(PeerWelcome {
        credit: 4,
        heartbeat_ms: 1000,
    }))
    .await
    .map_err(|e| Err(e.to_string()))?;
    Ok(conn)
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    (l, addr)
}

type Connected = Result<(link::Conn, Frame), String>;
type Accepted = Result<link::Conn, Result<AcceptError, String>>;

/// One connection from a connector with `client` to an acceptor with
/// `server`, both with the secret; and the acceptor's address.
async fn pair(server: Option<DataTls>, client: Option<DataTls>) -> (Connected, Accepted, String) {
    let (l, addr) = listener().await;
    let secret = secret();
    let (connected, accepted) = tokio::join!(
        link::connect(
            &addr,
            DEFAULT_MAX_FRAME,
            hello(),
            Some(&secret),
            client.as_ref()
        ),
        acceptor(&l, server.as_ref()),
    );
    (connected, accepted, addr)
}

#[tokio::test]
async fn a_tls_link_runs_the_handshake_and_carries_frames() {
    let ca = Ca::new("cluster");
    let (connected, accepted, _) = pair(Some(ca.data_tls()), Some(ca.data_tls())).await;
    let (mut client, answer) = connected.expect("connected over TLS");
    assert!(matches!(answer, Frame::PeerWelcome(_)), "{answer:?}");
    let mut server = accepted.expect("accepted over TLS");
    assert!(client.get_ref().is_tls() && server.get_ref().is_tls());

    client
        .send(Frame::Heartbeat { seq: 41 })
        .await
        .expect("send");
    match tokio::time::timeout(DEADLINE, server.next()).await {
        Ok(Some(Ok(Frame::Heartbeat { seq: 41 }))) => {}
        other => panic!("expected the heartbeat, got {other:?}"),
    }
    server
        .send(Frame::HeartbeatAck { seq: 41 })
        .await
        .expect("send");
    match tokio::time::timeout(DEADLINE, client.next()).await {
        Ok(Some(Ok(Frame::HeartbeatAck { seq: 41 }))) => {}
        other => panic!("expected the ack, got {other:?}"),
    }
}

#[tokio::test]
async fn plain_text_on_a_tls_port_is_refused_and_told_why() {
    let ca = Ca::new("cluster");
    let (connected, accepted, _) = pair(Some(ca.data_tls()), None).await;
    match connected {
        Ok((_, Frame::Error { code, message })) => {
            assert_eq!(code, ErrorCode::BadToken, "{message}");
            assert!(message.contains(link::TLS_REQUIRED), "{message}");
            assert!(message.contains("TEMPEST_DATA_TLS_CERT"), "{message}");
        }
        Ok((_, other)) => panic!("expected a refusal, got {other:?}"),
        Err(e) => panic!("expected a refusal frame, got the error {e}"),
    }
    assert!(
        matches!(accepted, Err(Ok(AcceptError::PlainText))),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_by_the_acceptor() {
    let ca = Ca::new("cluster");
    let intruder = Ca::new("another cluster");
    // It trusts our CA (it got hold of its certificate), but its own
    // certificate is not ours.
    let (connected, accepted, addr) =
        pair(Some(ca.data_tls()), Some(intruder.data_tls_trusting(&ca))).await;
    let e = match connected {
        Err(e) => e,
        Ok((_, answer)) => panic!("the intruder got an answer: {answer:?}"),
    };
    assert!(e.contains(&addr), "{e}");
    assert!(e.contains("alert"), "the acceptor's TLS alert: {e}");
    match accepted {
        Err(Ok(AcceptError::Tls(why))) => {
            assert!(why.contains("certificate"), "{why}");
        }
        other => panic!("expected a failed TLS handshake, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connector_refuses_an_acceptor_of_another_ca() {
    let ca = Ca::new("cluster");
    let impostor = Ca::new("an impostor");
    let (connected, accepted, _) =
        pair(Some(impostor.data_tls_trusting(&ca)), Some(ca.data_tls())).await;
    let e = connected.expect_err("an acceptor of another CA");
    assert!(e.contains("TLS handshake with"), "{e}");
    assert!(e.contains("certificate"), "{e}");
    assert!(
        matches!(accepted, Err(Ok(AcceptError::Tls(_)))),
        "{accepted:?}"
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let ca = Ca::new("cluster");
    let leaf = ca.leaf_for("somewhere.else.invalid");
    let wrong_name =
        DataTls::from_pem(leaf.cert.as_bytes(), leaf.key.as_bytes(), ca.pem.as_bytes())
            .expect("a valid configuration");
    let (connected, _, _) = pair(Some(wrong_name), Some(ca.data_tls())).await;
    let e = connected.expect_err("a certificate for another name");
    assert!(e.contains("certificate"), "{e}");
}

#[tokio::test]
async fn tls_to_a_plain_port_fails_with_a_clear_error() {
    let ca = Ca::new("cluster");
    let (connected, _, _) = pair(None, Some(ca.data_tls())).await;
    let e = connected.expect_err("a plain-text acceptor");
    assert!(e.contains("TLS handshake with"), "{e}");
}

#[tokio::test]
async fn a_silent_connection_on_a_tls_port_times_out() {
    let ca = Ca::new("cluster");
    let tls = ca.data_tls();
    let (l, addr) = listener().await;
    let (_silent, accepted) = tokio::join!(tokio::net::TcpStream::connect(&addr), async {
        let (stream, peer) = l.accept().await.expect("accept");
        link::accept(
            stream,
            peer,
            Some(&tls),
            Duration::from_millis(100),
            PRE_AUTH_MAX_FRAME,
        )
        .await
    });
    assert!(
        matches!(accepted, Err(AcceptError::TlsTimeout)),
        "{accepted:?}"
    );
}

#[test]
fn the_files_are_read_and_checked() {
    let ca = Ca::new("cluster");
    let leaf = ca.leaf();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (cert, key, ca_file) = (
        write("cert.pem", &leaf.cert),
        write("key.pem", &leaf.key),
        write("ca.pem", &ca.pem),
    );
    DataTls::from_files(&cert, &key, &ca_file).expect("the files make a configuration");

    // A key that is not the certificate's.
    let other = write("other-key.pem", &ca.leaf().key);
    match DataTls::from_files(&cert, &other, &ca_file) {
        Err(e @ TlsError::Config { .. }) => {
            let text = e.to_string();
            assert!(text.contains("other-key.pem"), "{text}");
            assert!(
                !text.contains("PRIVATE KEY"),
                "a key is never shown: {text}"
            );
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // Files swapped: no key in the key file, no certificate in the CA file.
    match DataTls::from_files(&cert, &ca_file, &ca_file) {
        Err(TlsError::Missing {
            what: "key",
            origin,
            ..
        }) => {
            assert!(origin.contains("ca.pem"), "{origin}")
        }
        other => panic!("expected a missing key, got {other:?}"),
    }
    match DataTls::from_files(&cert, &key, &key) {
        Err(TlsError::Missing { what: "CA", .. }) => {}
        other => panic!("expected a missing CA, got {other:?}"),
    }
    let e = DataTls::from_files(dir.path().join("nope.pem"), &key, &ca_file).unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
}
