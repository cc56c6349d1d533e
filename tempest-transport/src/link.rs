//! What every connection of the data plane shares: the framed TCP stream,
//! liveness (heartbeats, silence), the handshake deadline, and closing with
//! a reason.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::auth::{self, Secret, Side};
use crate::codec::{FrameCodec, WireError};
use crate::wire::{ErrorCode, Frame, Hello};

/// A framed connection.
pub type Conn = Framed<TcpStream, FrameCodec>;

/// How long a new connection has to say `Hello` (by default), and a
/// connector to hear an answer to its own.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Frames `stream` with `max_frame`, Nagle off (frames are written whole,
/// and waiting for more would only add latency).
pub fn framed(stream: TcpStream, max_frame: usize) -> Conn {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {e}");
    }
    Framed::new(stream, FrameCodec::new(max_frame))
}

/// Gives an accepted connection its full frame limit, once its handshake
/// was accepted; until then it reads under
/// [`crate::codec::PRE_AUTH_MAX_FRAME`].
pub fn accepted(conn: &mut Conn, max_frame: usize) {
    conn.codec_mut().set_max_frame(max_frame);
}

/// Liveness of one connection: when it last heard and sent anything, and
/// the heartbeats it owes.
#[derive(Debug)]
pub struct Liveness {
    interval: Duration,
    heard: Instant,
    sent: Instant,
    seq: u64,
}

impl Liveness {
    /// Heartbeats every `interval` of silence; silence for three times as
    /// long from the other side is death.
    pub fn new(interval: Duration) -> Self {
        let now = Instant::now();
        Liveness {
            interval: interval.max(Duration::from_millis(10)),
            heard: now,
            sent: now,
            seq: 0,
        }
    }

    /// Something arrived.
    pub fn heard(&mut self) {
        self.heard = Instant::now();
    }

    /// Something was sent.
    pub fn sent(&mut self) {
        self.sent = Instant::now();
    }

    /// When to look again: the next heartbeat or the silence deadline.
    pub fn next_check(&self) -> tokio::time::Instant {
        (self.sent + self.interval)
            .min(self.heard + self.interval * 3)
            .into()
    }

    /// At a check: `Err` when the other side has been silent too long,
    /// `Ok(Some(frame))` for a heartbeat to send.
    pub fn check(&mut self) -> Result<Option<Frame>, Duration> {
        let silence = self.interval * 3;
        if self.heard.elapsed() >= silence {
            return Err(silence);
        }
        if self.sent.elapsed() >= self.interval {
            self.seq += 1;
            self.sent = Instant::now();
            return Ok(Some(Frame::Heartbeat { seq: self.seq }));
        }
        Ok(None)
    }
}

/// Sends an `Error` frame (best effort, within a second) before the caller
/// closes the connection.
pub async fn refuse(conn: &mut Conn, code: ErrorCode, message: impl Into<String>) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        conn.send(Frame::error(code, message)),
    )
    .await;
}

/// Why a handshake did not produce a `Hello`.
#[derive(Debug)]
pub enum NoHello {
    /// The connection closed before a frame (a port probe): nothing to say.
    Closed,
    /// A refusal to send before closing.
    Refuse(ErrorCode, String),
}

/// Reads the first frame of an accepted connection: it must be a `Hello`,
/// within `deadline`. The codec has already checked its magic and version
/// when it could not parse the rest.
pub async fn read_hello(conn: &mut Conn, deadline: Duration) -> Result<Hello, NoHello> {
    let first = tokio::time::timeout(deadline, conn.next())
        .await
        .map_err(|_| {
            NoHello::Refuse(
                ErrorCode::HandshakeTimeout,
                format!("no Hello within {deadline:?}"),
            )
        })?;
    let hello = match first {
        Some(Ok(Frame::Hello(h))) => h,
        Some(Ok(other)) => {
            return Err(NoHello::Refuse(
                ErrorCode::UnexpectedFrame,
                format!("expected Hello, got {}", other.name()),
            ))
        }
        Some(Err(WireError::Io(_))) | None => return Err(NoHello::Closed),
        Some(Err(e)) => return Err(NoHello::Refuse(e.code(), e.to_string())),
    };
    if let Err(e) = crate::codec::check_magic_version(hello.magic, hello.version) {
        return Err(NoHello::Refuse(e.code(), e.to_string()));
    }
    Ok(hello)
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The acceptor's half of the challenge and response, right after
/// [`read_hello`]: with a secret, challenges the connector, checks its
/// proof within `deadline`, and proves the secret in turn; without one,
/// does nothing. `Err` is a refusal to send before closing.
pub async fn authenticate(
    conn: &mut Conn,
    hello: &Hello,
    secret: Option<&Secret>,
    deadline: Duration,
) -> Result<(), NoHello> {
    let Some(secret) = secret else {
        return Ok(());
    };
    let acceptor = auth::nonce();
    let transcript = hello.transcript();
    conn.send(Frame::Challenge { nonce: acceptor })
        .await
        .map_err(|_| NoHello::Closed)?;
    let answer = tokio::time::timeout(deadline, conn.next())
        .await
        .map_err(|_| {
            NoHello::Refuse(
                ErrorCode::HandshakeTimeout,
                format!("no Proof within {deadline:?}"),
            )
        })?;
    match answer {
        Some(Ok(Frame::Proof { mac }))
            if auth::verify(
                secret,
                Side::Connector,
                &hello.nonce,
                &acceptor,
                &transcript,
                &mac,
            ) => {}
        Some(Ok(Frame::Proof { .. })) => {
            return Err(NoHello::Refuse(
                ErrorCode::BadToken,
                "wrong data-plane secret".into(),
            ))
        }
        Some(Ok(other)) => {
            return Err(NoHello::Refuse(
                ErrorCode::BadToken,
                format!(
                    "this side needs the data-plane secret: expected Proof, got {}",
                    other.name()
                ),
            ))
        }
        Some(Err(WireError::Io(_))) | None => return Err(NoHello::Closed),
        Some(Err(e)) => return Err(NoHello::Refuse(e.code(), e.to_string())),
    }
    let mac = auth::proof(secret, Side::Acceptor, &hello.nonce, &acceptor, &transcript);
    conn.send(Frame::Proof { mac })
        .await
        .map_err(|_| NoHello::Closed)
}

async fn next_frame(conn: &mut Conn, addr: &str) -> Result<Frame, String> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.next()).await {
        Err(_) => Err(format!("no answer from {addr} during the handshake")),
        Ok(None) => Err(format!("{addr} closed during the handshake")),
        Ok(Some(Err(e))) => Err(format!("handshake with {addr}: {e}")),
        Ok(Some(Ok(frame))) => Ok(frame),
    }
}

/// Connects to `addr`, sends `hello`, answers the acceptor's challenge with
/// `secret` (and checks the acceptor's own proof), and returns the first
/// frame after that: a `Welcome`, a `PeerWelcome` or an `Error`. Errors are
/// strings for logs: the caller retries.
pub async fn connect(
    addr: &str,
    max_frame: usize,
    hello: Hello,
    secret: Option<&Secret>,
) -> Result<(Conn, Frame), String> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let mut conn = framed(stream, max_frame);
    let transcript = hello.transcript();
    let connector = hello.nonce;
    conn.send(Frame::Hello(hello))
        .await
        .map_err(|e| format!("sending Hello to {addr}: {e}"))?;
    match (next_frame(&mut conn, addr).await?, secret) {
        (Frame::Challenge { nonce: acceptor }, Some(secret)) => {
            let mac = auth::proof(secret, Side::Connector, &connector, &acceptor, &transcript);
            conn.send(Frame::Proof { mac })
                .await
                .map_err(|e| format!("sending Proof to {addr}: {e}"))?;
            match next_frame(&mut conn, addr).await? {
                Frame::Proof { mac }
                    if auth::verify(
                        secret,
                        Side::Acceptor,
                        &connector,
                        &acceptor,
                        &transcript,
                        &mac,
                    ) =>
                {
                    let answer = next_frame(&mut conn, addr).await?;
                    Ok((conn, answer))
                }
                Frame::Proof { .. } => Err(format!(
                    "{addr} could not prove the data-plane secret: not one of ours"
                )),
                refusal @ Frame::Error { .. } => Ok((conn, refusal)),
                other => Err(format!("{addr} answered a Proof with {}", other.name())),
            }
        }
        (Frame::Challenge { .. }, None) => Err(format!(
            "{addr} asks for the data-plane secret: set {}",
            auth::SECRET_ENV
        )),
        (refusal @ Frame::Error { .. }, _) => Ok((conn, refusal)),
        (_, Some(_)) => Err(format!(
            "{addr} did not ask for the data-plane secret: not one of ours"
        )),
        (answer, None) => Ok((conn, answer)),
    }
}
