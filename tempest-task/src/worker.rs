//! The task worker: one instance of one task, in its own process.
//!
//! It joins its topology server over a control link (the server answers
//! with the DAG, the membership, and the worker's instance and
//! incarnation), accepts peer links from its upstreams on its peer port (the
//! [`inbox`](tempest_transport::inbox)), runs `Task::handle` on each batch
//! that arrives, sends what the task emits straight to the downstream
//! instances the groupings name (the [`Outbox`]), and reports to the server,
//! per batch, one small ack per root (per run of its messages): the XOR of the edge ids handled and
//! emitted, and the slots the children went to.
//!
//! Three parts: the control loop (async) speaks to the server; the inbox
//! tasks read peer links; the handler thread runs the task, so a slow
//! handler never stalls a connection (heartbeats keep flowing). The task
//! instance, and so its state, lives across sessions. When the control link
//! drops, everything of the session goes (queued messages, links,
//! reports): the server has replayed, or will replay, the roots involved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use tempest_core::ledger::{EdgeIds, RootId};
use tempest_core::metrics::{Labels, Registry};
use tempest_core::pipeline::{Dag, TaskIdx};
use tempest_core::route::route;
use tempest_core::{Handled, TaskContext};
use tempest_transport::auth::Secret;
use tempest_transport::codec::{delivery_size, report_size_bound};
use tempest_transport::gate::GateConfig;
use tempest_transport::inbox::{self, Identity, InBatch, InboxConfig};
use tempest_transport::link::{self, Liveness};
use tempest_transport::outbox::{Outbox, OutboxConfig};
use tempest_transport::tls::DataTls;
use tempest_transport::wire::{
    Ack, ErrorCode, Fail, Fixed, Frame, Hello, Report, Role, SlotRef, Welcome, WireDag, WorkerHello,
};

use crate::{Instance, TaskMetrics};

/// How a worker finds and talks to its server and its peers.
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
    /// The task's instance count this worker was configured with.
    pub instances: u32,
    /// The layout version of that count (0: from configuration).
    pub layout: u64,
    /// The deployment's data-plane secret, if it has one: proven to the
    /// server and to peers, and asked of peers (never sent).
    pub secret: Option<Secret>,
    /// The data plane's TLS, if the deployment has it: the control link,
    /// the peer port and the peer links to downstream workers all use it.
    pub tls: Option<DataTls>,
    /// The largest frame accepted or sent.
    pub max_frame: usize,
    /// Batches each upstream may have outstanding at this worker.
    pub credit: u32,
    /// Where to accept peer links (port 0 picks a free port).
    pub peer_listen: std::net::SocketAddr,
    /// The address peers are told, `host:port` (default: the listener's,
    /// with the host name for an unspecified IP).
    pub peer_advertise: Option<String>,
    /// How long a new peer connection has to say `Hello`.
    pub handshake_timeout: Duration,
    /// Limits on the peer port's connections.
    pub gate: GateConfig,
    /// The first reconnect wait; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// The longest reconnect wait.
    pub reconnect_max: Duration,
}

impl WorkerConfig {
    /// Defaults for a worker of `task` in `topology` whose server is at `addr`.
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
            instances: 1,
            layout: 0,
            secret: None,
            tls: None,
            max_frame: tempest_transport::DEFAULT_MAX_FRAME,
            credit: 4,
            peer_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            peer_advertise: None,
            handshake_timeout: link::HANDSHAKE_TIMEOUT,
            gate: GateConfig::default(),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
        }
    }
}

/// Why a worker stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The server refused the worker for a reason that retrying cannot fix
    /// (version, token, topology, task, instance, layout, pipeline).
    #[error("refused by the topology server ({code}): {message}")]
    Refused {
        /// The server's error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The task is not in this build's pipeline.
    #[error("the pipeline has no task `{0}`")]
    UnknownTask(String),
    /// The peer port could not be bound, or the handler thread started.
    #[error("{0}")]
    Io(String),
}

/// What a worker did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Messages handled (in sessions that were still current).
    pub handled: u64,
    /// Sessions joined (reconnects are this minus one).
    pub connections: u64,
}

/// What the control loop is sent, in order.
enum ToServer {
    Report(Report),
    LinkLost(SlotRef),
}

/// What the handler needs of the current session.
struct Session {
    id: u64,
    outbox: Arc<Outbox>,
    to_server: mpsc::UnboundedSender<ToServer>,
}

type Current = Arc<Mutex<Option<Arc<Session>>>>;

/// Runs a worker of `config.task` until `shutdown` turns true. `dag` is this
/// build's pipeline; the server's must match it.
pub async fn run_worker(
    dag: Arc<Dag>,
    mut config: WorkerConfig,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
) -> Result<WorkerReport, WorkerError> {
    let task = dag
        .find(&config.task)
        .ok_or_else(|| WorkerError::UnknownTask(config.task.clone()))?;
    let listener = TcpListener::bind(config.peer_listen).await.map_err(|e| {
        WorkerError::Io(format!("binding the peer port {}: {e}", config.peer_listen))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Io(format!("reading the peer port's address: {e}")))?;
    let advertise = match &config.peer_advertise {
        Some(a)
            if a.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()) =>
        {
            a.clone()
        }
        Some(host) => join_host_port(host, local.port()),
        None if local.ip().is_unspecified() => {
            join_host_port(&tempest_core::metrics::hostname(), local.port())
        }
        None => local.to_string(),
    };
    tracing::info!(peer = %advertise, "accepting peer links on {local}");
    if config.tls.is_some() {
        tracing::info!(
            "data plane: TLS, mutual, against the cluster's CA (control link and peer links)"
        );
    } else {
        tracing::info!("data plane: plain text (no TLS configured)");
    }

    let (identity_tx, identity_rx) = watch::channel(None::<Identity>);
    let (in_tx, in_rx) = std_mpsc::channel::<InBatch>();
    let (stop_inbox, inbox_stop) = watch::channel(false);
    let inbox = tokio::spawn({
        let config = InboxConfig {
            topology: config.topology.clone(),
            secret: config.secret.clone(),
            tls: config.tls.clone(),
            max_frame: config.max_frame,
            credit: config.credit,
            heartbeat: Duration::from_secs(1),
            handshake_timeout: config.handshake_timeout,
            gate: config.gate,
        };
        let registry = registry.clone();
        async move { inbox::serve(listener, config, identity_rx, in_tx, &registry, inbox_stop).await }
    });

    let current: Current = Arc::default();
    let stopping = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut handler: Option<std::thread::JoinHandle<()>> = None;
    let mut in_rx = Some(in_rx);
    let mut report = WorkerReport::default();
    let mut wait = config.reconnect_min;
    let reconnects = registry.counter(
        &tempest_core::metrics::catalog::WORKER_RECONNECTS,
        &Labels::new([("task", config.task.as_str())]),
    );
    let names: Vec<String> = dag.tasks().map(|(_, t)| t.name.clone()).collect();
    let targets: Vec<TaskIdx> = dag.task(task).edges.iter().map(|e| e.to).collect();

    let outcome = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        let hello = Hello::new(
            config.topology.clone(),
            Role::Worker(WorkerHello {
                task: config.task.clone(),
                instance: config.instance,
                instances: config.instances,
                layout: config.layout,
                peer: advertise.clone(),
            }),
        );
        let joined = match link::connect(
            &config.topology_addr,
            config.max_frame,
            hello,
            config.secret.as_ref(),
            config.tls.as_ref(),
        )
        .await
        {
            Ok((conn, Frame::Welcome(w))) => Ok((conn, w)),
            Ok((_, Frame::Error { code, message })) if code.is_fatal() => {
                break Err(WorkerError::Refused { code, message })
            }
            Ok((_, Frame::Error { code, message })) => Err(format!("refused ({code}): {message}")),
            Ok((_, other)) => Err(format!("the server answered Hello with {}", other.name())),
            Err(e) => Err(e),
        };
        let (mut conn, welcome) = match joined {
            Ok(ok) => ok,
            Err(why) => {
                tracing::info!(addr = %config.topology_addr, "cannot join the topology server ({why}); retrying in {wait:?}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tempest_core::shutdown::changed(&mut shutdown) => {}
                }
                wait = (wait * 2).min(config.reconnect_max);
                continue;
            }
        };
        if let Err(message) = same_pipeline(&dag, &welcome.dag) {
            link::refuse(&mut conn, ErrorCode::PipelineMismatch, message.clone()).await;
            break Err(WorkerError::Refused {
                code: ErrorCode::PipelineMismatch,
                message,
            });
        }
        wait = config.reconnect_min;
        report.connections += 1;
        if report.connections > 1 {
            reconnects.inc();
        }
        // The first instance assigned stays ours across sessions, and with it
        // the handler's state.
        config.instance = Some(welcome.instance);
        let me = SlotRef {
            task: task.get() as u32,
            instance: welcome.instance,
            incarnation: welcome.incarnation,
        };
        if handler.is_none() {
            let Some(rx) = in_rx.take() else { break Ok(()) };
            let instances = welcome
                .members
                .tasks
                .get(task.get())
                .map_or(config.instances, |t| t.instances);
            let ctx = TaskContext {
                topology: config.topology.clone(),
                task: config.task.clone(),
                instance: welcome.instance,
                instances,
            };
            let instance = Instance::new(
                (dag.task(task).factory)(),
                ctx,
                TaskMetrics::new(&registry, &config.task),
            );
            let h = Handler {
                dag: dag.clone(),
                task,
                current: current.clone(),
                stopping: stopping.clone(),
                handled: handled.clone(),
                max_message: config.max_frame.saturating_sub(1024).max(1),
            };
            let thread = std::thread::Builder::new()
                .name(format!("{}-{}", config.task, welcome.instance))
                .spawn(move || h.run(instance, rx))
                .map_err(|e| WorkerError::Io(format!("starting the handler thread: {e}")))?;
            handler = Some(thread);
        }
        tracing::info!(
            instance = welcome.instance,
            incarnation = welcome.incarnation,
            "joined the topology server"
        );

        let (to_server, from_handler) = mpsc::unbounded_channel();
        let lost_tx = to_server.clone();
        let batch_size = welcome.batch_size.max(1) as usize;
        let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_ms.max(10)));
        let outbox = Outbox::new(
            OutboxConfig {
                topology: config.topology.clone(),
                secret: config.secret.clone(),
                tls: config.tls.clone(),
                session: welcome.session,
                from: Some(me),
                batch_size,
                batch_bytes: config.max_frame / 2,
                queue_limit: batch_size * 2,
                max_frame: config.max_frame,
                heartbeat,
            },
            &targets,
            &names,
            &registry,
            tokio::runtime::Handle::current(),
            Box::new(move |to| {
                let _ = lost_tx.send(ToServer::LinkLost(to));
            }),
            None,
        );
        outbox.apply_members(&welcome.members);
        *current.lock() = Some(Arc::new(Session {
            id: welcome.session,
            outbox: outbox.clone(),
            to_server,
        }));
        identity_tx.send_replace(Some(Identity {
            session: welcome.session,
            me,
        }));

        let end = session(
            &mut conn,
            &welcome,
            heartbeat,
            &outbox,
            from_handler,
            &mut shutdown,
            config.max_frame,
        )
        .await;

        identity_tx.send_replace(None);
        *current.lock() = None;
        outbox.close();
        match end {
            SessionEnd::Stopped => break Ok(()),
            SessionEnd::Refused(code, message) => {
                break Err(WorkerError::Refused { code, message })
            }
            SessionEnd::Lost(why) => {
                tracing::warn!("left the topology server's session: {why}; joining again")
            }
        }
    };
    stopping.store(true, Ordering::Relaxed);
    let _ = stop_inbox.send(true);
    let _ = inbox.await;
    if let Some(h) = handler {
        let _ = tokio::task::spawn_blocking(move || h.join()).await;
    }
    report.handled = handled.load(Ordering::Relaxed);
    outcome.map(|()| report)
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The server's pipeline must be this build's: same tasks, same edges.
fn same_pipeline(dag: &Dag, theirs: &WireDag) -> Result<(), String> {
    let ours = WireDag::from(dag);
    if ours == *theirs {
        return Ok(());
    }
    let names = |d: &WireDag| {
        d.tasks
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(format!(
        "this worker's pipeline ({}) is not the server's ({}): another build of the topology?",
        names(&ours),
        names(theirs)
    ))
}

enum SessionEnd {
    Stopped,
    Lost(String),
    Refused(ErrorCode, String),
}

/// Serves one session of the control link: sends reports, follows the
/// membership, keeps the link alive.
async fn session(
    conn: &mut link::Conn,
    welcome: &Welcome,
    heartbeat: Duration,
    outbox: &Outbox,
    mut from_handler: mpsc::UnboundedReceiver<ToServer>,
    shutdown: &mut watch::Receiver<bool>,
    max_frame: usize,
) -> SessionEnd {
    let lost = |e: tempest_transport::WireError| SessionEnd::Lost(e.to_string());
    let mut live = Liveness::new(heartbeat);
    let mut epoch = welcome.members.epoch;
    // Reports merge up to a quarter of a frame; a larger one is split.
    let budget = (max_frame / 4).max(1024);
    loop {
        if *shutdown.borrow() {
            let _ = conn.send(Frame::Goodbye).await;
            return SessionEnd::Stopped;
        }
        tokio::select! {
            msg = from_handler.recv() => {
                let Some(first) = msg else { return SessionEnd::Lost("the handler stopped".into()) };
                let mut pending = Some(first);
                while let Some(m) = pending.take() {
                    let frames = match m {
                        ToServer::LinkLost(to) => vec![Frame::LinkLost(to)],
                        ToServer::Report(mut r) => {
                            // Merge the reports waiting behind this one.
                            let mut size = report_size_bound(&r);
                            while size < budget {
                                match from_handler.try_recv() {
                                    Ok(ToServer::Report(more)) => {
                                        let more_size = report_size_bound(&more);
                                        if size + more_size > budget {
                                            pending = Some(ToServer::Report(more));
                                            break;
                                        }
                                        size += more_size;
                                        merge(&mut r, more);
                                    }
                                    Ok(other) => { pending = Some(other); break; }
                                    Err(_) => break,
                                }
                            }
                            split_report(r, budget).into_iter().map(Frame::Report).collect()
                        }
                    };
                    for frame in frames {
                        if let Err(e) = conn.feed(frame).await {
                            return lost(e);
                        }
                    }
                    if pending.is_none() {
                        pending = from_handler.try_recv().ok();
                    }
                }
                if let Err(e) = conn.flush().await {
                    return lost(e);
                }
                live.sent();
            }
            frame = conn.next() => {
                live.heard();
                match frame {
                    None => return SessionEnd::Lost("connection closed by the server".into()),
                    Some(Err(e)) => return lost(e),
                    Some(Ok(Frame::Members(m))) => {
                        if m.epoch > epoch {
                            epoch = m.epoch;
                            outbox.apply_members(&m);
                        }
                    }
                    Some(Ok(Frame::Heartbeat { seq })) => {
                        if let Err(e) = conn.send(Frame::HeartbeatAck { seq }).await {
                            return lost(e);
                        }
                        live.sent();
                    }
                    Some(Ok(Frame::HeartbeatAck { .. })) => {}
                    Some(Ok(Frame::Shutdown { reason })) => {
                        tracing::info!("the server is shutting down: {reason}");
                        let _ = conn.send(Frame::Goodbye).await;
                        return SessionEnd::Lost("the server shut down".into());
                    }
                    Some(Ok(Frame::Error { code, message })) if code.is_fatal() => {
                        return SessionEnd::Refused(code, message);
                    }
                    Some(Ok(Frame::Error { code, message })) => {
                        return SessionEnd::Lost(format!("server error {code}: {message}"));
                    }
                    Some(Ok(other)) => {
                        let name = other.name();
                        link::refuse(conn, ErrorCode::UnexpectedFrame, format!("unexpected {name} from the server")).await;
                        return SessionEnd::Lost(format!("unexpected {name} frame"));
                    }
                }
            }
            _ = tokio::time::sleep_until(live.next_check()) => {
                match live.check() {
                    Err(silence) => return SessionEnd::Lost(format!("server silent for {silence:?}")),
                    Ok(Some(beat)) => if let Err(e) = conn.send(beat).await { return lost(e) },
                    Ok(None) => {}
                }
            }
            _ = tempest_core::shutdown::changed(shutdown) => {}
        }
    }
}

/// Splits a report too large for `budget` bytes into parts that fit (each
/// with every destination, which the server needs beside each ack). A
/// single entry always fits: failure messages are cut to
/// [`MAX_FAIL_MESSAGE`] bytes.
fn split_report(r: Report, budget: usize) -> Vec<Report> {
    if report_size_bound(&r) <= budget || r.acks.len() + r.fails.len() <= 1 {
        return vec![r];
    }
    let Report { dests, acks, fails } = r;
    let (mut acks_b, mut fails_b) = (acks, fails);
    let (acks_a, fails_a): (Vec<Ack>, Vec<Fail>) = if acks_b.len() > 1 {
        let rest = acks_b.split_off(acks_b.len() / 2);
        (std::mem::replace(&mut acks_b, rest), Vec::new())
    } else {
        let rest = fails_b.split_off(fails_b.len() / 2);
        (Vec::new(), std::mem::replace(&mut fails_b, rest))
    };
    let a = Report {
        dests: dests.clone(),
        acks: acks_a,
        fails: fails_a,
    };
    let b = Report {
        dests,
        acks: acks_b,
        fails: fails_b,
    };
    let mut out = split_report(a, budget);
    out.extend(split_report(b, budget));
    out
}

/// The longest failure message a report carries; longer ones are cut (on a
/// character boundary) and marked.
const MAX_FAIL_MESSAGE: usize = 1024;

fn fail_message(message: &str) -> String {
    if message.len() <= MAX_FAIL_MESSAGE {
        return message.to_owned();
    }
    let mut end = MAX_FAIL_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &message[..end], message.len())
}

fn merge(into: &mut Report, more: Report) {
    for d in more.dests {
        if !into.dests.contains(&d) {
            into.dests.push(d);
        }
    }
    into.acks.extend(more.acks);
    into.fails.extend(more.fails);
}

/// The handler thread: runs batches, routes what they emit, reports.
struct Handler {
    dag: Arc<Dag>,
    task: TaskIdx,
    current: Current,
    stopping: Arc<AtomicBool>,
    handled: Arc<std::sync::atomic::AtomicU64>,
    max_message: usize,
}

impl Handler {
    fn run(self, mut instance: Instance, input: std_mpsc::Receiver<InBatch>) {
        instance.start();
        let mut ids = EdgeIds::new();
        let mut out: Vec<Handled> = Vec::new();
        let mut counts: Vec<u32> = Vec::new();
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            let batch = match input.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => b,
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let Some(session) = self.current.lock().clone() else {
                continue; // between sessions: its roots are replayed
            };
            if batch.session != session.id {
                continue;
            }
            let n = batch.deliveries.len() as u64;
            out.clear();
            instance.run_batch(batch.deliveries.into_iter(), &mut out);
            self.route_and_report(&session, &mut out, &mut ids, &mut counts);
            batch.credit.give();
            self.handled.fetch_add(n, Ordering::Relaxed);
            let current = &self.current;
            let stopping = &self.stopping;
            session.outbox.wait_for_room(|| {
                stopping.load(Ordering::Relaxed)
                    || current.lock().as_ref().is_none_or(|s| s.id != session.id)
            });
        }
        instance.shutdown();
    }

    /// Routes what the batch emitted and sends its report, with the outbox
    /// locked throughout: a link loss reported after this report is about
    /// messages this report already counted.
    fn route_and_report(
        &self,
        session: &Session,
        handled: &mut Vec<Handled>,
        ids: &mut EdgeIds,
        counts: &mut Vec<u32>,
    ) {
        let mut report = Report::default();
        let mut placer = session.outbox.lock();
        counts.clear();
        counts.extend(self.dag.tasks().map(|(t, _)| placer.instances(t)));
        for Handled { root, edge, result } in handled.drain(..) {
            match result {
                Ok(out) => {
                    let mut slots = 0;
                    let mut too_big = None;
                    let max = self.max_message;
                    let xor = route(
                        &self.dag,
                        self.task,
                        root,
                        out.unwrap_or_default(),
                        ids,
                        |t| counts[t.get()],
                        |t, target, d| {
                            let size = delivery_size(&d);
                            if size > max {
                                too_big = Some(size);
                                return;
                            }
                            if let Some((dest, bit)) = placer.place(t, target, d) {
                                slots |= bit;
                                // Runs of one destination are the common case.
                                if report.dests.last() != Some(&dest)
                                    && !report.dests.contains(&dest)
                                {
                                    report.dests.push(dest);
                                }
                            }
                        },
                    );
                    if let Some(size) = too_big {
                        report.fails.push(Fail {
                            root: Fixed(root.0),
                            message: format!(
                                "the task emitted a message of {size} bytes, over the limit of {max} bytes"
                            ),
                            retryable: false,
                        });
                        continue;
                    }
                    push_ack(&mut report.acks, root, edge ^ xor, slots);
                }
                Err(e) => report.fails.push(Fail {
                    root: Fixed(root.0),
                    message: fail_message(e.message()),
                    retryable: e.is_retryable(),
                }),
            }
        }
        if !report.is_empty() {
            let _ = session.to_server.send(ToServer::Report(report));
        }
        drop(placer);
    }
}

/// Adds an ack, folding it into the previous one when it is for the same
/// root (a task's messages of one root tend to arrive together).
fn push_ack(acks: &mut Vec<Ack>, root: RootId, xor: u64, slots: u64) {
    if let Some(last) = acks.last_mut() {
        if last.root.0 == root.0 {
            last.xor.0 ^= xor;
            last.slots |= slots;
            return;
        }
    }
    acks.push(Ack {
        root: Fixed(root.0),
        xor: Fixed(xor),
        slots,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_transport::codec::report_size;

    #[test]
    fn acks_of_one_root_fold_together() {
        let mut acks = Vec::new();
        push_ack(&mut acks, RootId(1), 0b0011, 1);
        push_ack(&mut acks, RootId(1), 0b0101, 4);
        push_ack(&mut acks, RootId(2), 7, 0);
        push_ack(&mut acks, RootId(1), 1, 0);
        assert_eq!(acks.len(), 3);
        assert_eq!((acks[0].xor.0, acks[0].slots), (0b0110, 5));
        assert_eq!(acks[2].root.0, 1);
    }

    #[test]
    fn large_reports_split_into_parts_that_fit() {
        let dest = SlotRef {
            task: 1,
            instance: 0,
            incarnation: 3,
        };
        let r = Report {
            dests: vec![dest],
            acks: (0..1000)
                .map(|i| Ack {
                    root: Fixed(i),
                    xor: Fixed(i),
                    slots: 1,
                })
                .collect(),
            fails: (0..10)
                .map(|i| Fail {
                    root: Fixed(5000 + i),
                    message: fail_message(&"x".repeat(9 << 20)),
                    retryable: true,
                })
                .collect(),
        };
        assert!(r
            .fails
            .iter()
            .all(|f| f.message.len() < MAX_FAIL_MESSAGE + 32));
        let budget = 4096;
        let parts = split_report(r.clone(), budget);
        assert!(parts.len() > 1);
        assert!(parts
            .iter()
            .all(|p| report_size(p) <= budget && p.dests == [dest]));
        let acks: Vec<_> = parts.iter().flat_map(|p| p.acks.clone()).collect();
        let fails: Vec<_> = parts.iter().flat_map(|p| p.fails.clone()).collect();
        assert_eq!(
            (acks, fails),
            (r.acks, r.fails),
            "nothing lost or reordered"
        );
        assert_eq!(fail_message("héllo"), "héllo");
        let cut = fail_message(&"é".repeat(1000));
        assert!(cut.ends_with("… (2000 bytes)"), "{cut}");
    }

    #[test]
    fn reports_merge_their_destinations() {
        let d = |i| SlotRef {
            task: 1,
            instance: i,
            incarnation: 0,
        };
        let mut a = Report {
            dests: vec![d(0)],
            ..Report::default()
        };
        merge(
            &mut a,
            Report {
                dests: vec![d(0), d(1)],
                ..Report::default()
            },
        );
        assert_eq!(a.dests, [d(0), d(1)]);
    }
}
