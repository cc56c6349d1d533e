//! The inbox: a task worker's peer port, where its upstreams (and, for the
//! root task, the topology server) push batches of messages to it.
//!
//! Each accepted connection must open with a peer `Hello` for this topology,
//! with the token, for this worker's current session, instance and
//! incarnation; anything else is refused with an `Error` naming what is
//! wrong, counted, logged, and closed, without disturbing other links. An
//! accepted link gets a few batches of credit; every batch it sends goes to
//! the handler as an [`InBatch`], whose [`CreditBack`] returns one credit to
//! that link once handled. A batch beyond the credit granted is a protocol
//! error: what a worker buffers is bounded by links × credit × batch size.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use tempest_core::metrics::{catalog, Counter, Gauge, Labels, Registry};
use tempest_core::Delivery;

use crate::auth::Secret;
use crate::gate::{Gate, GateConfig, Handshake};
use crate::link::{self, AcceptError, Liveness, NoHello};
use crate::tls::DataTls;
use crate::wire::{ErrorCode, Frame, PeerHello, PeerWelcome, Role, SlotRef};

/// Who this worker is in its server's current session; `None` between
/// sessions (links are refused then).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The server's session.
    pub session: u64,
    /// This worker's slot incarnation.
    pub me: SlotRef,
}

/// How the inbox checks and serves links.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    /// The topology links must name.
    pub topology: String,
    /// The data-plane secret links must prove, if any.
    pub secret: Option<Secret>,
    /// The data plane's TLS, if the deployment has it: links must then
    /// open with a TLS handshake and a certificate of the cluster's CA.
    pub tls: Option<DataTls>,
    /// The largest frame.
    pub max_frame: usize,
    /// Batches each link may have outstanding.
    pub credit: u32,
    /// Heartbeat interval of the links.
    pub heartbeat: Duration,
    /// How long a new connection has to say `Hello` (and prove the secret).
    pub handshake_timeout: Duration,
    /// Limits on connections.
    pub gate: GateConfig,
}

/// A batch that arrived on a peer link.
pub struct InBatch {
    /// The session it arrived in.
    pub session: u64,
    /// Who sent it (`None`: the topology server).
    pub from: Option<SlotRef>,
    /// The messages.
    pub deliveries: Vec<Delivery>,
    /// Returns the batch's credit to its link.
    pub credit: CreditBack,
}

#[derive(Default)]
struct LinkCredit {
    owed: AtomicU32,
    notify: Notify,
}

/// One batch's credit, owed to the link it came on.
pub struct CreditBack(Arc<LinkCredit>);

impl CreditBack {
    /// Returns the credit: the link may send one more batch.
    pub fn give(self) {
        self.0.owed.fetch_add(1, Ordering::Relaxed);
        self.0.notify.notify_one();
    }
}

struct Shared {
    config: InboxConfig,
    gate: Arc<Gate>,
    identity: watch::Receiver<Option<Identity>>,
    deliver: std::sync::mpsc::Sender<InBatch>,
    links_in: Gauge,
    rejected: Counter,
}

/// Serves peer links on `listener` until `stop` turns true, handing their
/// batches to `deliver`.
pub async fn serve(
    listener: TcpListener,
    config: InboxConfig,
    identity: watch::Receiver<Option<Identity>>,
    deliver: std::sync::mpsc::Sender<InBatch>,
    registry: &Registry,
    mut stop: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        gate: Gate::new(config.gate),
        config,
        identity,
        deliver,
        links_in: registry.gauge(&catalog::PEER_LINKS, &Labels::new([("direction", "in")])),
        rejected: registry.counter(&catalog::PEER_REJECTED, &Labels::default()),
    });
    let mut links = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(handshake) = shared.gate.arrive(peer.ip()) else {
                        shared.rejected.inc();
                        tracing::debug!(%peer, "peer port: shut out for failed authentications");
                        continue;
                    };
                    let shared = shared.clone();
                    let stop = stop.clone();
                    links.spawn(async move {
                        serve_link(stream, peer, shared, stop, handshake).await
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("peer port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = links.join_next(), if !links.is_empty() => {}
            _ = tempest_core::shutdown::changed(&mut stop) => {
                if *stop.borrow() { break; }
            }
        }
    }
    links.abort_all();
}

fn refusal(
    shared: &Shared,
    hello: &crate::wire::Hello,
) -> Result<(PeerHello, Identity), (ErrorCode, String)> {
    let c = &shared.config;
    if hello.topology != c.topology {
        return Err((
            ErrorCode::UnknownTopology,
            format!(
                "this worker runs topology `{}`, not `{}`",
                c.topology, hello.topology
            ),
        ));
    }
    let p = match &hello.role {
        Role::Peer(p) => p.clone(),
        Role::Worker(_) => {
            return Err((
                ErrorCode::UnexpectedFrame,
                "this is a task worker's peer port, not a topology server".into(),
            ))
        }
    };
    let Some(id) = *shared.identity.borrow() else {
        return Err((
            ErrorCode::WrongPeer,
            "this worker has not joined its topology server yet".into(),
        ));
    };
    if p.session != id.session || p.to != id.me {
        return Err((
            ErrorCode::WrongPeer,
            format!(
                "a link for {:?} in session {:x}; this worker is {:?} in session {:x}",
                p.to, p.session, id.me, id.session
            ),
        ));
    }
    Ok((p, id))
}

/// The handshake of a peer link: `Hello`, the secret's proof, then who it
/// is for.
async fn handshake(
    conn: &mut link::Conn,
    shared: &Shared,
    peer: std::net::SocketAddr,
) -> Result<(PeerHello, Identity), NoHello> {
    let deadline = shared.config.handshake_timeout;
    let hello = link::read_hello(conn, deadline).await?;
    if let Err(e) = link::authenticate(conn, &hello, shared.config.secret.as_ref(), deadline).await
    {
        if matches!(e, NoHello::Refuse(ErrorCode::BadToken, _)) {
            shared.gate.failed_auth(peer.ip());
        }
        return Err(e);
    }
    refusal(shared, &hello).map_err(|(code, message)| NoHello::Refuse(code, message))
}

async fn serve_link(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    pending: Handshake,
) {
    let evicted = pending.evicted.clone();
    let accepted = tokio::select! {
        r = link::accept(
            stream,
            peer,
            shared.config.tls.as_ref(),
            shared.config.handshake_timeout,
            crate::codec::PRE_AUTH_MAX_FRAME.min(shared.config.max_frame),
        ) => r,
        _ = evicted.cancelled() => Err(AcceptError::Closed),
    };
    let mut conn = match accepted {
        Ok(conn) => conn,
        Err(e) => {
            link::count_refusal(&shared.gate, &shared.rejected, peer, &e);
            return;
        }
    };
    let outcome = tokio::select! {
        r = handshake(&mut conn, &shared, peer) => r,
        _ = evicted.cancelled() => Err(NoHello::Refuse(
            ErrorCode::Busy,
            "too many connections in their handshake: the oldest goes".into(),
        )),
    };
    let admitted = match outcome.map(|ok| (ok, pending.admit())) {
        Ok((ok, Some(admitted))) => Ok((ok, admitted)),
        Ok((_, None)) => Err(NoHello::Refuse(
            ErrorCode::Busy,
            "this worker holds as many peer links as it takes".into(),
        )),
        Err(e) => Err(e),
    };
    let ((p, id), _admitted) = match admitted {
        Ok(ok) => ok,
        Err(NoHello::Closed) => {
            tracing::debug!(%peer, "peer connection closed before its handshake ended");
            return;
        }
        Err(NoHello::Refuse(code, message)) => {
            shared.rejected.inc();
            // A sender that has not heard of a move yet is routine; the rest is not.
            if code == ErrorCode::WrongPeer {
                tracing::debug!(%peer, %code, "refused peer: {message}");
            } else {
                tracing::warn!(%peer, %code, "refused peer: {message}");
            }
            link::refuse(&mut conn, code, message).await;
            return;
        }
    };
    link::accepted(&mut conn, shared.config.max_frame);
    let credit = shared.config.credit.max(1);
    let heartbeat = shared.config.heartbeat;
    let welcome = Frame::PeerWelcome(PeerWelcome {
        credit,
        heartbeat_ms: u32::try_from(heartbeat.as_millis()).unwrap_or(u32::MAX),
    });
    if conn.send(welcome).await.is_err() {
        return;
    }
    shared.links_in.add(1.0);
    let why = run_link(&mut conn, &shared, p.from, id, credit, &mut stop).await;
    shared.links_in.add(-1.0);
    match why {
        Ok(()) => tracing::debug!(%peer, from = ?p.from, "peer link closed"),
        Err(why) => {
            if matches!(why, LinkEnd::Bad(_)) {
                shared.rejected.inc();
            }
            tracing::info!(%peer, from = ?p.from, "peer link ended: {why}");
        }
    }
}

#[derive(Debug)]
enum LinkEnd {
    /// The sender went away or the network failed.
    Gone(String),
    /// The sender broke the protocol.
    Bad(String),
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkEnd::Gone(s) | LinkEnd::Bad(s) => f.write_str(s),
        }
    }
}

async fn run_link(
    conn: &mut link::Conn,
    shared: &Shared,
    from: Option<SlotRef>,
    id: Identity,
    credit: u32,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), LinkEnd> {
    let state = Arc::new(LinkCredit::default());
    let mut identity = shared.identity.clone();
    let mut live = Liveness::new(shared.config.heartbeat);
    // Batches the sender may still send.
    let mut allowed = credit;
    let gone = |e: crate::codec::WireError| LinkEnd::Gone(e.to_string());
    loop {
        tokio::select! {
            frame = conn.next() => {
                live.heard();
                match frame {
                    None => return Err(LinkEnd::Gone("closed by the sender".into())),
                    Some(Err(crate::codec::WireError::Io(e))) => return Err(LinkEnd::Gone(e.to_string())),
                    Some(Err(e)) => {
                        link::refuse(conn, e.code(), e.to_string()).await;
                        return Err(LinkEnd::Bad(e.to_string()));
                    }
                    Some(Ok(Frame::Batch(batch))) => {
                        if allowed == 0 {
                            let why = "a batch beyond the credit granted";
                            link::refuse(conn, ErrorCode::UnexpectedFrame, why).await;
                            return Err(LinkEnd::Bad(why.into()));
                        }
                        allowed -= 1;
                        let batch = InBatch {
                            session: id.session,
                            from,
                            deliveries: batch.0,
                            credit: CreditBack(state.clone()),
                        };
                        if shared.deliver.send(batch).is_err() {
                            return Ok(()); // the worker is stopping
                        }
                    }
                    Some(Ok(Frame::Heartbeat { seq })) => {
                        conn.send(Frame::HeartbeatAck { seq }).await.map_err(gone)?;
                        live.sent();
                    }
                    Some(Ok(Frame::HeartbeatAck { .. })) => {}
                    Some(Ok(Frame::Error { code, message })) => {
                        return Err(LinkEnd::Gone(format!("sender sent {code}: {message}")));
                    }
                    Some(Ok(other)) => {
                        let why = format!("unexpected {} on a peer link", other.name());
                        link::refuse(conn, ErrorCode::UnexpectedFrame, why.clone()).await;
                        return Err(LinkEnd::Bad(why));
                    }
                }
            }
            _ = state.notify.notified() => {
                let owed = state.owed.swap(0, Ordering::Relaxed);
                if owed > 0 {
                    allowed += owed;
                    conn.send(Frame::Credit { batches: owed }).await.map_err(gone)?;
                    live.sent();
                }
            }
            _ = tokio::time::sleep_until(live.next_check()) => {
                match live.check() {
                    Err(silence) => return Err(LinkEnd::Gone(format!("sender silent for {silence:?}"))),
                    Ok(Some(beat)) => conn.send(beat).await.map_err(gone)?,
                    Ok(None) => {}
                }
            }
            changed = identity.changed() => {
                if changed.is_err() || *identity.borrow() != Some(id) {
                    return Ok(()); // this worker's session or incarnation ended
                }
            }
            _ = tempest_core::shutdown::changed(stop) => {
                if *stop.borrow() { return Ok(()); }
            }
        }
    }
}
