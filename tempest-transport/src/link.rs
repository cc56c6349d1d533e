//! What every connection of the data plane shares: the framed stream (plain
//! TCP, or TLS over it), accepting and connecting, liveness (heartbeats,
//! silence), the handshake deadline, and closing with a reason.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::auth::{self, Secret, Side};
use tempest_core::metrics::Counter;

use crate::codec::{FrameCodec, WireError};
use crate::gate::Gate;
use crate::tls::{DataTls, HANDSHAKE_RECORD};
use crate::wire::{ErrorCode, Frame, Hello};

/// The byte stream under a connection: plain TCP, or TLS over TCP.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP (a deployment without TLS).
    Plain(TcpStream),
    /// TLS over TCP, either side.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// True when the stream is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Plain(s)
    }
}

impl From<tokio_rustls::TlsStream<TcpStream>> for Stream {
    fn from(s: tokio_rustls::TlsStream<TcpStream>) -> Self {
        Stream::Tls(Box::new(s))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A framed connection.
pub type Conn = Framed<Stream, FrameCodec>;

/// How long a new connection has to say `Hello` (by default), and a
/// connector to hear an answer to its own.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn nodelay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {e}");
    }
}

/// Frames `stream` with `max_frame`, Nagle off (frames are written whole,
/// and waiting for more would only add latency).
pub fn framed(stream: impl Into<Stream>, max_frame: usize) -> Conn {
    let stream = stream.into();
    nodelay(stream.tcp());
    Framed::new(stream, FrameCodec::new(max_frame))
}

/// Why an accepted connection did not get as far as its `Hello`: the
/// connection is closed (what was to be said was said, and logged).
#[derive(Debug)]
pub enum AcceptError {
    /// It closed, or said nothing, before its first byte (a port probe).
    Closed,
    /// Plain text on a port that requires TLS: told so, logged, closed.
    PlainText,
    /// Its TLS handshake did not end within the deadline.
    TlsTimeout,
    /// Its TLS handshake failed (a certificate of another CA, none, not
    /// TLS at all): logged, closed. Counts as a failed authentication.
    Tls(String),
}

impl std::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcceptError::Closed => f.write_str("closed before its first byte"),
            AcceptError::PlainText => f.write_str("plain text on a port that requires TLS"),
            AcceptError::TlsTimeout => f.write_str("no TLS handshake in time"),
            AcceptError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

/// Counts a connection that failed in [`accept`] (which logged it) in the
/// port's `rejected` metric; a failed TLS handshake also counts as a failed
/// authentication of its address at the gate.
pub fn count_refusal(gate: &Gate, rejected: &Counter, peer: SocketAddr, e: &AcceptError) {
    match e {
        AcceptError::Closed => {
            tracing::debug!(%peer, "connection closed before its handshake");
        }
        AcceptError::PlainText | AcceptError::TlsTimeout => rejected.inc(),
        AcceptError::Tls(_) => {
            // The gate first: whoever sees the count sees the failure counted.
            gate.failed_auth(peer.ip());
            rejected.inc();
        }
    }
}

/// The message a plain-text connector gets from a port that requires TLS.
pub const TLS_REQUIRED: &str = "this data-plane port requires TLS";

/// Accepts a new connection from `peer`, framed under `max_frame` (the
/// pre-authentication limit). Without `tls`, it is framed as it is. With
/// `tls`, its first byte must open a TLS handshake, which must end (with a
/// client certificate of the cluster's CA) within `deadline`: plain text is
/// refused with an `Error` (in plain text) saying TLS is required, and a
/// failed handshake is closed; both are logged at warn.
pub async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<&DataTls>,
    deadline: Duration,
    max_frame: usize,
) -> Result<Conn, AcceptError> {
    let Some(tls) = tls else {
        return Ok(framed(stream, max_frame));
    };
    nodelay(&stream);
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
        Err(_) => return Err(AcceptError::TlsTimeout),
        Ok(Err(_)) | Ok(Ok(0)) => return Err(AcceptError::Closed),
        Ok(Ok(_)) => {}
    }
    if first[0] != HANDSHAKE_RECORD {
        tracing::warn!(
            "refused a plain-text connection from {peer}: {TLS_REQUIRED} (is the peer missing its TEMPEST_DATA_TLS_* certificate?)"
        );
        let mut conn = framed(stream, max_frame);
        refuse(
            &mut conn,
            ErrorCode::BadToken,
            format!(
                "{TLS_REQUIRED}: set {}, {} and {}",
                crate::tls::CERT_ENV,
                crate::tls::KEY_ENV,
                crate::tls::CA_ENV
            ),
        )
        .await;
        return Err(AcceptError::PlainText);
    }
    match tokio::time::timeout(deadline, tls.acceptor().accept(stream)).await {
        Err(_) => {
            tracing::warn!("TLS handshake with {peer} failed: no handshake within {deadline:?}");
            Err(AcceptError::TlsTimeout)
        }
        Ok(Err(e)) => {
            tracing::warn!("TLS handshake with {peer} failed: {e}");
            Err(AcceptError::Tls(e.to_string()))
        }
        Ok(Ok(s)) => Ok(framed(tokio_rustls::TlsStream::Server(s), max_frame)),
    }
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

/// Connects to `addr` (with `tls`, runs the TLS handshake first, checking
/// the acceptor's certificate against the CA for [`crate::tls::SERVER_NAME`]
/// and presenting the deployment's), sends `hello`, answers the acceptor's
/// challenge with `secret` (and checks the acceptor's own proof), and
/// returns the first frame after that: a `Welcome`, a `PeerWelcome` or an
/// `Error`. Errors are strings for logs: the caller retries.
pub async fn connect(
    addr: &str,
    max_frame: usize,
    hello: Hello,
    secret: Option<&Secret>,
    tls: Option<&DataTls>,
) -> Result<(Conn, Frame), String> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let stream: Stream = match tls {
        None => stream.into(),
        Some(tls) => {
            nodelay(&stream);
            let handshake = tls.connector().connect(DataTls::server_name(), stream);
            let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| format!("TLS handshake with {addr} timed out"))?
                .map_err(|e| {
                    let hint = if e.kind() == io::ErrorKind::UnexpectedEof {
                        "it closed the connection: does it take another CA, or has it shut this address out after failed handshakes?"
                    } else {
                        "does it run without TLS, or with another CA?"
                    };
                    format!("TLS handshake with {addr} failed: {e} ({hint})")
                })?;
            tokio_rustls::TlsStream::Client(s).into()
        }
    };
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
