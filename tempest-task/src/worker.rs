//! The task worker: one instance of one task, in its own process, pulling
//! work from its topology server over TCP.
//!
//! Two parts: the I/O task speaks the wire protocol and keeps several Pulls in
//! flight; the handler thread runs `Task::handle` on each batch, so a slow
//! handler never stalls the connection (heartbeats keep flowing). The
//! instance, and so its state, lives across reconnections; results of a
//! batch from a connection that dropped are discarded, because the server has
//! already re-queued those messages.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

use tempest_core::metrics::{Labels, Registry};
use tempest_core::wire::{ErrorCode, Frame, FrameCodec, Hello, WireError, WireOutcome, WireResult};
use tempest_core::{Delivery, Handled, TaskContext, TaskFactory};

use crate::{Instance, TaskMetrics};

/// How a worker finds and talks to its server.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The topology server, `host:port`.
    pub topology_addr: String,
    /// The topology's name (checked by the server).
    pub topology: String,
    /// The task this worker runs.
    pub task: String,
    /// The instance to claim; the server assigns a free one if `None`.
    pub instance: Option<u32>,
    /// The shared token, if the server wants one.
    pub token: Option<String>,
    /// The largest frame accepted or sent.
    pub max_frame: usize,
    /// Pulls kept in flight (at least 1).
    pub pulls_in_flight: usize,
    /// Messages asked for per Pull (the server may cap it).
    pub batch_size: u32,
    /// The first reconnect wait; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// The longest reconnect wait.
    pub reconnect_max: Duration,
}

impl WorkerConfig {
    /// Defaults for a worker of `task` in `topology` at `addr`.
    pub fn new(
        topology_addr: impl Into<String>,
        topology: impl Into<String>,
        task: impl Into<String>,
    ) -> Self {
        WorkerConfig {
            topology_addr: topology_addr.into(),
            topology: topology.into(),
            task: task.into(),
            instance: None,
            token: None,
            max_frame: tempest_core::wire::DEFAULT_MAX_FRAME,
            pulls_in_flight: 2,
            batch_size: 256,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
        }
    }
}

/// Why a worker stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The server refused the worker for a reason that retrying cannot fix
    /// (version, token, topology, task or instance).
    #[error("refused by the topology server ({code:?}): {message}")]
    Refused {
        /// The server's error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The handler thread could not be started.
    #[error("cannot start the handler thread: {0}")]
    Thread(std::io::Error),
}

/// What a worker did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Messages whose results reached the server.
    pub handled: u64,
    /// Connections made (reconnects are this minus one).
    pub connections: u64,
}

/// A batch for the handler thread, tagged with its connection.
struct Job {
    conn: u64,
    batch: Vec<Delivery>,
}

/// How one connection ended.
enum ConnEnd {
    /// Shutdown was requested and the goodbye sent.
    Stopped,
    /// The connection was lost or the server left; reconnect.
    Lost(String),
}

/// Runs a worker of `config.task` until `shutdown` turns true.
pub async fn run_worker(
    factory: TaskFactory,
    instances: u32,
    config: WorkerConfig,
    registry: Registry,
    shutdown: watch::Receiver<bool>,
) -> Result<WorkerReport, WorkerError> {
    let mut config = config;
    let mut report = WorkerReport::default();
    let (results_tx, mut results_rx) = mpsc::unbounded_channel::<(u64, Vec<Handled>)>();
    let mut jobs: Option<std_mpsc::Sender<Job>> = None;
    let mut handler: Option<std::thread::JoinHandle<()>> = None;
    let mut wait = config.reconnect_min;
    let mut conn_id = 0u64;
    let reconnects = registry.counter(
        &tempest_core::metrics::catalog::WORKER_RECONNECTS,
        &Labels::new([("task", config.task.as_str())]),
    );

    let outcome = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        conn_id += 1;
        let attempt = connect(&config).await;
        let (mut framed, welcome) = match attempt {
            Ok(ok) => ok,
            Err(ConnectError::Fatal { code, message }) => {
                break Err(WorkerError::Refused { code, message })
            }
            Err(ConnectError::Retry(why)) => {
                tracing::info!(addr = %config.topology_addr, "cannot reach the topology server ({why}); retrying in {wait:?}");
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tempest_core::shutdown::changed(&mut sd) => {}
                }
                wait = (wait * 2).min(config.reconnect_max);
                continue;
            }
        };
        wait = config.reconnect_min;
        report.connections += 1;
        if report.connections > 1 {
            reconnects.inc();
        }
        // The first instance assigned stays ours across reconnects, and with
        // it the handler's state.
        config.instance = Some(welcome.instance);
        if jobs.is_none() {
            let ctx = TaskContext {
                topology: config.topology.clone(),
                task: config.task.clone(),
                instance: welcome.instance,
                instances: welcome.instances.max(instances),
            };
            let metrics = TaskMetrics::new(&registry, &config.task);
            let (tx, rx) = std_mpsc::channel::<Job>();
            let results = results_tx.clone();
            let factory = factory.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{}-{}", config.task, welcome.instance))
                .spawn(move || handle_jobs(factory, ctx, metrics, rx, results))
                .map_err(WorkerError::Thread)?;
            jobs = Some(tx);
            handler = Some(thread);
        }
        let Some(jobs_tx) = jobs.as_ref() else {
            break Ok(());
        };
        tracing::info!(
            instance = welcome.instance,
            "connected to the topology server"
        );
        let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(10)));
        let batch = config.batch_size.min(welcome.batch_size.max(1));
        match connection(
            &mut framed,
            conn_id,
            &config,
            batch,
            heartbeat,
            jobs_tx,
            &mut results_rx,
            shutdown.clone(),
            &mut report,
        )
        .await
        {
            ConnEnd::Stopped => break Ok(()),
            ConnEnd::Lost(why) => {
                tracing::warn!("lost the topology server: {why}; reconnecting");
            }
        }
    };
    drop(jobs);
    if let Some(h) = handler {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    outcome.map(|()| report)
}

/// The handler thread: runs batches until the job channel closes.
fn handle_jobs(
    factory: TaskFactory,
    ctx: TaskContext,
    metrics: TaskMetrics,
    jobs: std_mpsc::Receiver<Job>,
    results: mpsc::UnboundedSender<(u64, Vec<Handled>)>,
) {
    let mut instance = Instance::new(factory(), ctx, metrics);
    instance.start();
    while let Ok(Job { conn, batch }) = jobs.recv() {
        let mut out = Vec::with_capacity(batch.len());
        instance.run_batch(batch.into_iter(), &mut out);
        if results.send((conn, out)).is_err() {
            break;
        }
    }
    instance.shutdown();
}

enum ConnectError {
    Fatal { code: ErrorCode, message: String },
    Retry(String),
}

type Conn = Framed<TcpStream, FrameCodec>;

async fn connect(
    config: &WorkerConfig,
) -> Result<(Conn, tempest_core::wire::Welcome), ConnectError> {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(&config.topology_addr),
    )
    .await
    .map_err(|_| ConnectError::Retry("connect timed out".into()))?
    .map_err(|e| ConnectError::Retry(e.to_string()))?;
    stream
        .set_nodelay(true)
        .map_err(|e| ConnectError::Retry(e.to_string()))?;
    let mut framed = Framed::new(stream, FrameCodec::new(config.max_frame));
    let hello = Hello::new(
        config.topology.clone(),
        config.task.clone(),
        config.instance,
        config.token.clone(),
    );
    framed
        .send(Frame::Hello(hello))
        .await
        .map_err(|e| ConnectError::Retry(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(10), framed.next()).await {
        Err(_) => Err(ConnectError::Retry("no answer to Hello".into())),
        Ok(None) => Err(ConnectError::Retry("closed during the handshake".into())),
        Ok(Some(Err(e))) => Err(ConnectError::Retry(e.to_string())),
        Ok(Some(Ok(Frame::Welcome(w)))) => Ok((framed, w)),
        Ok(Some(Ok(Frame::Error { code, message }))) => match code {
            ErrorCode::InstanceTaken | ErrorCode::ShuttingDown | ErrorCode::HandshakeTimeout => {
                Err(ConnectError::Retry(format!("{code:?}: {message}")))
            }
            _ => Err(ConnectError::Fatal { code, message }),
        },
        Ok(Some(Ok(_))) => Err(ConnectError::Retry("unexpected answer to Hello".into())),
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    framed: &mut Conn,
    conn: u64,
    config: &WorkerConfig,
    batch: u32,
    heartbeat: Duration,
    jobs: &std_mpsc::Sender<Job>,
    results: &mut mpsc::UnboundedReceiver<(u64, Vec<Handled>)>,
    mut shutdown: watch::Receiver<bool>,
    report: &mut WorkerReport,
) -> ConnEnd {
    let lost = |e: WireError| ConnEnd::Lost(e.to_string());
    let silence = heartbeat * 3;
    let mut heard = Instant::now();
    let mut sent = Instant::now();
    let mut busy = 0usize; // batches at the handler
    let mut server_leaving = false;
    let mut stopping = *shutdown.borrow();
    let mut hb_seq = 0u64;

    if !stopping {
        for _ in 0..config.pulls_in_flight.max(1) {
            if let Err(e) = framed
                .send(Frame::Pull {
                    max: batch,
                    results: Vec::new(),
                })
                .await
            {
                return lost(e);
            }
        }
    }
    loop {
        let winding_down = stopping || server_leaving;
        if winding_down && busy == 0 {
            if let Err(e) = framed
                .send(Frame::Goodbye {
                    results: Vec::new(),
                })
                .await
            {
                return lost(e);
            }
            return if stopping {
                ConnEnd::Stopped
            } else {
                ConnEnd::Lost("the server is shutting down".into())
            };
        }
        let next_beat = sent + heartbeat;
        tokio::select! {
            frame = framed.next() => {
                heard = Instant::now();
                match frame {
                    None => return ConnEnd::Lost("connection closed by the server".into()),
                    Some(Err(e)) => return lost(e),
                    Some(Ok(Frame::Batch { deliveries })) => {
                        if deliveries.is_empty() {
                            if !winding_down {
                                if let Err(e) = framed.send(Frame::Pull { max: batch, results: Vec::new() }).await {
                                    return lost(e);
                                }
                                sent = Instant::now();
                            }
                        } else if !winding_down || server_leaving {
                            busy += 1;
                            let batch = deliveries.into_iter().map(Into::into).collect();
                            if jobs.send(Job { conn, batch }).is_err() {
                                return ConnEnd::Lost("the handler thread stopped".into());
                            }
                        }
                        // Batches that arrive after a local shutdown are not
                        // started: the server re-queues them when we leave.
                    }
                    Some(Ok(Frame::Heartbeat { seq })) => {
                        if let Err(e) = framed.send(Frame::HeartbeatAck { seq }).await {
                            return lost(e);
                        }
                        sent = Instant::now();
                    }
                    Some(Ok(Frame::HeartbeatAck { .. })) => {}
                    Some(Ok(Frame::Shutdown { reason })) => {
                        tracing::info!("server shutting down: {reason}");
                        server_leaving = true;
                    }
                    Some(Ok(Frame::Error { code, message })) => {
                        return ConnEnd::Lost(format!("server error {code:?}: {message}"));
                    }
                    Some(Ok(other)) => {
                        let _ = framed.send(Frame::Error {
                            code: ErrorCode::UnexpectedFrame,
                            message: format!("unexpected frame from the server: {other:?}"),
                        }).await;
                        return ConnEnd::Lost("unexpected frame".into());
                    }
                }
            }
            Some((from, handled)) = results.recv() => {
                if from != conn {
                    continue; // a batch of a dropped connection: already re-queued
                }
                busy -= 1;
                let n = handled.len() as u64;
                let results: Vec<WireResult> = handled.into_iter().map(Into::into).collect();
                let mut chunks = chunk_results(results, config.max_frame / 2);
                let last = chunks.pop().unwrap_or_default();
                for chunk in chunks {
                    if let Err(e) = framed.send(Frame::Pull { max: 0, results: chunk }).await {
                        return lost(e);
                    }
                }
                let results = last;
                let frame = if stopping || server_leaving {
                    if busy == 0 { Frame::Goodbye { results } } else { Frame::Pull { max: 0, results } }
                } else {
                    Frame::Pull { max: batch, results }
                };
                let goodbye = matches!(frame, Frame::Goodbye { .. });
                if let Err(e) = framed.send(frame).await {
                    return lost(e);
                }
                report.handled += n;
                sent = Instant::now();
                if goodbye {
                    return if stopping { ConnEnd::Stopped } else { ConnEnd::Lost("the server is shutting down".into()) };
                }
            }
            _ = tokio::time::sleep_until(next_beat.into()) => {
                if heard.elapsed() >= silence {
                    return ConnEnd::Lost(format!("server silent for {silence:?}"));
                }
                hb_seq += 1;
                if let Err(e) = framed.send(Frame::Heartbeat { seq: hb_seq }).await {
                    return lost(e);
                }
                sent = Instant::now();
            }
            _ = tempest_core::shutdown::changed(&mut shutdown), if !stopping => {
                stopping = *shutdown.borrow();
            }
        }
    }
}

/// What a result costs on the wire beyond its payloads, rounded up.
const RESULT_OVERHEAD: usize = 24;

fn result_size(r: &WireResult) -> usize {
    RESULT_OVERHEAD
        + match &r.outcome {
            WireOutcome::Done => 0,
            WireOutcome::Emit(msgs) => msgs
                .iter()
                .map(|m| m.payload.len() + m.key.as_ref().map_or(0, |k| k.len()) + RESULT_OVERHEAD)
                .sum(),
            WireOutcome::Failed { message, .. } => message.len(),
        }
}

/// Splits results into frames of at most about `limit` bytes, in order. A
/// single result that cannot fit in a frame becomes a permanent failure of
/// its message, so the root is dead-lettered rather than retried forever.
fn chunk_results(results: Vec<WireResult>, limit: usize) -> Vec<Vec<WireResult>> {
    let mut chunks = vec![Vec::new()];
    let mut bytes = 0;
    for mut r in results {
        let mut size = result_size(&r);
        if size > limit {
            r.outcome = WireOutcome::Failed {
                message: format!(
                    "the task's output of {size} bytes exceeds the frame limit of {limit} bytes"
                ),
                retryable: false,
            };
            size = result_size(&r);
        }
        if bytes + size > limit && chunks.last().is_some_and(|c| !c.is_empty()) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(c) = chunks.last_mut() {
            c.push(r);
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_core::wire::WireMsg;

    fn emit(root: u64, bytes: usize) -> WireResult {
        WireResult {
            root,
            outcome: WireOutcome::Emit(vec![WireMsg {
                key: None,
                payload: vec![b'x'; bytes].into(),
            }]),
        }
    }

    #[test]
    fn results_split_into_frames_in_order() {
        let results: Vec<_> = (0..10).map(|i| emit(i, 300)).collect();
        let chunks = chunk_results(results, 1000);
        assert!(chunks.len() >= 4, "{}", chunks.len());
        let roots: Vec<u64> = chunks.iter().flatten().map(|r| r.root).collect();
        assert_eq!(roots, (0..10).collect::<Vec<_>>());
        for c in &chunks {
            assert!(c.iter().map(result_size).sum::<usize>() <= 1000);
        }
    }

    #[test]
    fn an_oversized_result_fails_its_message() {
        let chunks = chunk_results(vec![emit(1, 10), emit(2, 5000), emit(3, 10)], 1000);
        let all: Vec<_> = chunks.into_iter().flatten().collect();
        assert_eq!(all.len(), 3);
        match &all[1].outcome {
            WireOutcome::Failed { message, retryable } => {
                assert!(!retryable);
                assert!(message.contains("exceeds the frame limit"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            chunk_results(Vec::new(), 1000),
            vec![Vec::<WireResult>::new()]
        );
    }
}
