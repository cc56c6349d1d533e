//! The topology server: the hub behind a TCP listener.
//!
//! One tokio task per worker connection. A connection starts with a
//! handshake (Hello → Welcome, or an Error frame naming what is wrong, then
//! close), opens a lease on the hub, and then answers Pulls: the results in a
//! Pull are settled, and the Pull is answered with one Batch as soon as there
//! is work for the worker's instance, or with an empty Batch after the
//! long-poll wait. When the connection ends for any reason (goodbye, error,
//! kill -9 of the worker, missed heartbeats) its lease is closed and every
//! message it held is re-queued at once.
//!
//! A connection never holds the hub lock across an await, and a bad peer
//! only ever costs its own connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tracing::Instrument;

use tempest_core::metrics::{catalog, Counter, Gauge, Labels, Registry};
use tempest_core::pipeline::TaskIdx;
use tempest_core::wire::{
    ErrorCode, Frame, FrameCodec, Hello, Welcome, WireError, MAGIC, PROTOCOL_VERSION,
};
use tempest_core::{Delivery, Handled};

use tempest_core::Topology;

use crate::hub::{Hub, LeaseError, LeaseId};
use crate::standalone::{Parts, RunError, RunReport};

/// How the server listens and talks to workers.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// A shared token workers must present, if set.
    pub token: Option<String>,
    /// The largest frame accepted or sent.
    pub max_frame: usize,
    /// How often an idle peer must be heard from; silence for three times
    /// this drops the connection.
    pub heartbeat: Duration,
    /// How long an empty Pull is held before an empty Batch answers it.
    pub long_poll: Duration,
    /// How long a new connection has to say Hello.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: None,
            max_frame: tempest_core::wire::DEFAULT_MAX_FRAME,
            heartbeat: Duration::from_secs(1),
            long_poll: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// What every connection needs.
#[derive(Clone)]
pub(crate) struct Shared {
    pub hub: Arc<Mutex<Hub>>,
    pub topology: String,
    pub config: ServerConfig,
    pub batch_size: u32,
    pub stopping: watch::Receiver<bool>,
    pub connections: Gauge,
    pub rejected: Counter,
}

/// Accepts worker connections until `stop` turns true, then tells every
/// worker to go and waits (up to `grace`) for their goodbyes.
pub(crate) async fn accept(listener: TcpListener, shared: Shared, grace: Duration) {
    let mut stopping = shared.stopping.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    conns.spawn(async move { connection(stream, peer, shared).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = tempest_core::shutdown::changed(&mut stopping) => {
                if *stopping.borrow() { break; }
            }
        }
    }
    drop(listener);
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    while !conns.is_empty() {
        tokio::select! {
            _ = conns.join_next() => {}
            _ = &mut deadline => {
                tracing::warn!(left = conns.len(), "workers did not say goodbye in time");
                conns.abort_all();
                break;
            }
        }
    }
}

/// Binds the listener.
pub async fn bind(config: &ServerConfig) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.listen).await
}

pub(crate) fn metrics(registry: &Registry) -> (Gauge, Counter) {
    let none = Labels::default();
    (
        registry.gauge(&catalog::WORKER_CONNECTIONS, &none),
        registry.counter(&catalog::WORKER_REJECTED, &none),
    )
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: Shared) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(%peer, "cannot set TCP_NODELAY: {e}");
    }
    let mut framed = Framed::new(stream, FrameCodec::new(shared.config.max_frame));
    let (lease, task, instance) = match handshake(&mut framed, &shared).await {
        Ok(ok) => ok,
        Err((_, message)) if message == CLOSED_BEFORE_HELLO => {
            // A port probe or a health check: not a worker, nothing to refuse.
            tracing::debug!(%peer, "connection closed before Hello");
            return;
        }
        Err((code, message)) => {
            shared.rejected.inc();
            tracing::warn!(%peer, ?code, "refused worker: {message}");
            // Best effort: the peer may already be gone.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                framed.send(Frame::Error { code, message }),
            )
            .await;
            return;
        }
    };
    shared.connections.set(shared.connections.get() + 1.0);
    let task_name = shared.hub.lock().dag().task(task).name.clone();
    let span = tracing::info_span!("worker", %peer, task = %task_name, instance);
    span.in_scope(|| tracing::info!("worker connected"));
    let why = serve(&mut framed, &shared, lease, task, instance)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    let requeued = shared.hub.lock().close_lease(lease);
    shared.connections.set(shared.connections.get() - 1.0);
    match why {
        Ok(()) => tracing::info!(requeued, "worker left"),
        Err(e) => tracing::warn!(requeued, "worker connection closed: {e}"),
    }
}

type Conn = Framed<TcpStream, FrameCodec>;

const CLOSED_BEFORE_HELLO: &str = "closed before Hello";

async fn handshake(
    framed: &mut Conn,
    shared: &Shared,
) -> Result<(LeaseId, TaskIdx, u32), (ErrorCode, String)> {
    let first = tokio::time::timeout(shared.config.handshake_timeout, framed.next())
        .await
        .map_err(|_| {
            (
                ErrorCode::HandshakeTimeout,
                format!("no Hello within {:?}", shared.config.handshake_timeout),
            )
        })?;
    let hello: Hello = match first {
        Some(Ok(Frame::Hello(h))) => h,
        Some(Ok(other)) => {
            return Err((
                ErrorCode::UnexpectedFrame,
                format!("expected Hello, got {}", other.name()),
            ))
        }
        Some(Err(e)) => return Err((e.code(), e.to_string())),
        None => return Err((ErrorCode::HandshakeTimeout, CLOSED_BEFORE_HELLO.into())),
    };
    if hello.magic != MAGIC {
        return Err((ErrorCode::BadMagic, format!("bad magic {:#x}", hello.magic)));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err((
            ErrorCode::VersionMismatch,
            format!("protocol version {} is not supported: this server speaks version {PROTOCOL_VERSION}", hello.version),
        ));
    }
    if let Some(want) = &shared.config.token {
        let ok = hello
            .token
            .as_deref()
            .is_some_and(|t| constant_time_eq(t.as_bytes(), want.as_bytes()));
        if !ok {
            return Err((ErrorCode::BadToken, "missing or wrong token".into()));
        }
    }
    if hello.topology != shared.topology {
        return Err((
            ErrorCode::UnknownTopology,
            format!(
                "this server runs topology `{}`, not `{}`",
                shared.topology, hello.topology
            ),
        ));
    }
    if *shared.stopping.borrow() {
        return Err((
            ErrorCode::ShuttingDown,
            "the server is shutting down".into(),
        ));
    }
    let (task, instances, lease, instance) = {
        let mut hub = shared.hub.lock();
        let task = hub.dag().find(&hello.task).ok_or_else(|| {
            (
                ErrorCode::UnknownTask,
                format!(
                    "topology `{}` has no task `{}`",
                    shared.topology, hello.task
                ),
            )
        })?;
        let instances = hub.dag().task(task).workers;
        let (lease, instance) = hub.open_lease(task, hello.instance).map_err(|e| {
            let code = match e {
                LeaseError::BadInstance { .. } => ErrorCode::BadInstance,
                _ => ErrorCode::InstanceTaken,
            };
            (code, format!("task `{}`: {e}", hello.task))
        })?;
        (task, instances, lease, instance)
    };
    let welcome = Frame::Welcome(Welcome {
        instance,
        instances,
        batch_size: shared.batch_size,
        heartbeat_ms: u32::try_from(shared.config.heartbeat.as_millis()).unwrap_or(u32::MAX),
    });
    if let Err(e) = framed.send(welcome).await {
        shared.hub.lock().close_lease(lease);
        return Err((ErrorCode::Malformed, format!("sending Welcome: {e}")));
    }
    Ok((lease, task, instance))
}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("silent for {0:?}")]
    Silent(Duration),
}

async fn serve(
    framed: &mut Conn,
    shared: &Shared,
    lease: LeaseId,
    task: TaskIdx,
    instance: u32,
) -> Result<(), ConnError> {
    let wake = shared.hub.lock().waker(task, instance);
    let mut stopping = shared.stopping.clone();
    let silence = shared.config.heartbeat * 3;
    let mut heard = Instant::now();
    let mut sent = Instant::now();
    let mut beats = 0u64;
    let mut told_to_go = false;
    // Pulls not yet answered, oldest first: (max, long-poll deadline).
    let mut pulls: std::collections::VecDeque<(usize, Instant)> = Default::default();
    let mut handled: Vec<Handled> = Vec::new();
    let mut batch: Vec<Delivery> = Vec::new();

    loop {
        // Answer what can be answered now.
        while let Some(&(max, deadline)) = pulls.front() {
            batch.clear();
            if !told_to_go {
                shared
                    .hub
                    .lock()
                    .lease_exchange(lease, &mut handled, max, &mut batch)
                    .map_err(|e| ConnError::Protocol(e.to_string()))?;
            }
            if batch.is_empty() && Instant::now() < deadline && !told_to_go {
                break;
            }
            pulls.pop_front();
            let deliveries = batch.drain(..).map(Into::into).collect();
            if let Err(e) = framed.send(Frame::Batch { deliveries }).await {
                // After Shutdown a worker may say goodbye and close before
                // our empty answers reach it: that is a normal end.
                return if told_to_go { Ok(()) } else { Err(e.into()) };
            }
            sent = Instant::now();
        }
        if *stopping.borrow() && !told_to_go {
            told_to_go = true;
            framed
                .send(Frame::Shutdown {
                    reason: "the topology server is shutting down".into(),
                })
                .await?;
            continue;
        }

        let next_deadline = pulls.front().map(|p| p.1);
        let silent_at = heard + silence;
        tokio::select! {
            frame = framed.next() => {
                let Some(frame) = frame else {
                    return if told_to_go { Ok(()) } else { Err(ConnError::Protocol("connection closed".into())) };
                };
                heard = Instant::now();
                match frame? {
                    Frame::Pull { max, results } => {
                        let mut h: Vec<Handled> = results.into_iter().map(Into::into).collect();
                        if !h.is_empty() {
                            shared.hub.lock().lease_exchange(lease, &mut h, 0, &mut batch)
                                .map_err(|e| ConnError::Protocol(e.to_string()))?;
                        }
                        if max > 0 {
                            let max = (max as usize).min(shared.batch_size as usize).max(1);
                            pulls.push_back((max, Instant::now() + shared.config.long_poll));
                        }
                    }
                    Frame::Heartbeat { seq } => {
                        framed.send(Frame::HeartbeatAck { seq }).await?;
                        sent = Instant::now();
                    }
                    Frame::HeartbeatAck { .. } => {}
                    Frame::Goodbye { results } => {
                        let mut h: Vec<Handled> = results.into_iter().map(Into::into).collect();
                        shared.hub.lock().lease_exchange(lease, &mut h, 0, &mut batch)
                            .map_err(|e| ConnError::Protocol(e.to_string()))?;
                        return Ok(());
                    }
                    Frame::Error { code, message } => {
                        return Err(ConnError::Protocol(format!("worker sent error {code:?}: {message}")));
                    }
                    other => {
                        let name = other.name();
                        let _ = framed.send(Frame::Error {
                            code: ErrorCode::UnexpectedFrame,
                            message: format!("unexpected {name} frame from a worker"),
                        }).await;
                        return Err(ConnError::Protocol(format!("unexpected {name} frame")));
                    }
                }
            }
            _ = wake.notified(), if !pulls.is_empty() => {}
            _ = sleep_until(next_deadline) => {}
            _ = tokio::time::sleep_until(silent_at.into()) => {
                if heard.elapsed() >= silence {
                    return Err(ConnError::Silent(silence));
                }
            }
            _ = tokio::time::sleep_until((sent + shared.config.heartbeat).into()) => {
                // Quiet for a heartbeat: show the worker we are alive.
                beats += 1;
                framed.send(Frame::Heartbeat { seq: beats }).await?;
                sent = Instant::now();
            }
            _ = tempest_core::shutdown::changed(&mut stopping), if !told_to_go => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A topology running as a server: the source, the hub and the ledger in
/// this process, the task instances in worker processes that connect to it.
pub struct TopologyServer {
    parts: Parts,
    listener: TcpListener,
    config: ServerConfig,
}

impl TopologyServer {
    /// Validates the topology and binds the listener.
    pub async fn bind(topology: Topology, config: ServerConfig) -> Result<Self, RunError> {
        let parts = Parts::prepare(topology, None, Vec::new())?;
        let listener = bind(&config).await.map_err(|source| RunError::Io {
            context: format!("binding {}", config.listen),
            source,
        })?;
        Ok(TopologyServer {
            parts,
            listener,
            config,
        })
    }

    /// The address workers connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, RunError> {
        self.listener.local_addr().map_err(|source| RunError::Io {
            context: "reading the listener's address".into(),
            source,
        })
    }

    /// Serves workers until a finite source is exhausted and every root is
    /// settled, or until `shutdown` turns true and the drain ends; then tells
    /// the workers to go.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> Result<RunReport, RunError> {
        let started = Instant::now();
        let (stop_tx, stopping) = watch::channel(false);
        let (connections, rejected) = metrics(&self.parts.registry);
        let shared = Shared {
            hub: self.parts.hub.clone(),
            topology: self.parts.settings.name.clone(),
            batch_size: u32::try_from(self.parts.settings.batch_size).unwrap_or(u32::MAX),
            config: self.config.clone(),
            stopping,
            connections,
            rejected,
        };
        // Batches stay well inside the frame limit; a single message that
        // cannot fit in a frame fails its root instead of wedging the queue.
        let max_frame = self.config.max_frame;
        self.parts
            .hub
            .lock()
            .set_limits(max_frame / 2, max_frame.saturating_sub(1024).max(1));
        let goodbye_wait = self.parts.settings.grace_period.min(Duration::from_secs(5));
        let acceptor = tokio::spawn(accept(self.listener, shared, goodbye_wait));
        let end = self.parts.drive(shutdown).await;
        let _ = stop_tx.send(true);
        if let Err(e) = acceptor.await {
            tracing::error!("acceptor ended abnormally: {e}");
        }
        self.parts
            .finish(end?, started)
            .await
            .map(|(report, _)| report)
    }
}
