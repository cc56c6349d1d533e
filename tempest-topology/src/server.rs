//! The topology server: the control of a distributed topology.
//!
//! It keeps the source, admission and `max_pending`, the ack ledger, the
//! failure policy and replays ([`Roots`]), and the **membership**: which
//! worker serves which instance of which task, in which incarnation, and
//! where it accepts peer links. It does not carry task messages: it sends
//! each root to an instance of the root task over a peer link (the same
//! [`Outbox`] workers use), and from there messages go worker to worker.
//!
//! One tokio task per worker connection (a control link). A connection
//! starts with a handshake (Hello → Welcome with the DAG and the membership,
//! or an Error naming what is wrong, then close), then carries the worker's
//! ack reports in and membership changes out. When a connection ends for any
//! reason (goodbye, error, kill -9, missed heartbeats), its slot's
//! incarnation ends and every root whose messages it held or had been sent
//! is replayed at once ([`Roots::lose`]).
//!
//! Instance counts can change while running: a worker whose `Hello` carries
//! a higher layout version than the server's brings its task's new count
//! (a rebalance). Workers of an older layout with another count are refused;
//! instances beyond a shrunk count drain and leave.
//!
//! A connection never holds the control lock across an await, and a bad peer
//! only ever costs its own connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use tempest_core::ledger::{random_u64, slot_bit, RootId, SlotMask};
use tempest_core::metrics::{catalog, Counter, Gauge, Labels};
use tempest_core::pipeline::{Dag, TaskIdx};
use tempest_core::route::Target;
use tempest_core::{Delivery, TaskError, Topology};
use tempest_transport::auth::Secret;
use tempest_transport::codec::delivery_size;
use tempest_transport::gate::{Gate, GateConfig, Handshake};
use tempest_transport::link::{self, Liveness, NoHello};
use tempest_transport::outbox::{Outbox, OutboxConfig};
use tempest_transport::tls::DataTls;
use tempest_transport::wire::{
    ErrorCode, Frame, Members, Report, Role, SlotInfo, SlotRef, TaskMembers, Welcome, WorkerHello,
};
use tempest_transport::DEFAULT_MAX_FRAME;

use crate::hub::register_edges;
use crate::roots::{Admission, Loss, Roots, SourceIdx};
use crate::standalone::{Parts, RunError, RunReport};

/// How the server listens and talks to workers.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The deployment's data-plane secret, which workers must prove they
    /// have (challenge and response; never sent), if set.
    pub secret: Option<Secret>,
    /// The data plane's TLS, if the deployment has it: worker connections
    /// must then open with a TLS handshake and a certificate of the
    /// cluster's CA (plain text is refused), and the server's peer links to
    /// the root task's workers use it too.
    pub tls: Option<DataTls>,
    /// The largest frame accepted or sent.
    pub max_frame: usize,
    /// How often an idle peer must be heard from; silence for three times
    /// this drops the connection.
    pub heartbeat: Duration,
    /// How long a new connection has to say `Hello` (and prove the secret).
    pub handshake_timeout: Duration,
    /// Limits on worker connections.
    pub gate: GateConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: None,
            tls: None,
            max_frame: DEFAULT_MAX_FRAME,
            heartbeat: Duration::from_secs(1),
            handshake_timeout: link::HANDSHAKE_TIMEOUT,
            gate: GateConfig::default(),
        }
    }
}

/// One instance of a task, as the server knows it.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// The current incarnation, or the next while nobody serves it.
    incarnation: u32,
    /// The connection serving it, and its peer address.
    conn: Option<u64>,
    peer: Option<String>,
}

/// One task's layout: its instance count, the layout version of that count,
/// and its slots (beyond `instances`: workers of a shrunk layout, draining).
#[derive(Clone, Debug)]
struct TaskLayout {
    instances: u32,
    layout: u64,
    /// Above every incarnation a slot that went had used: a slot made again
    /// (a shrink, then a grow) starts here, so a late report naming an old
    /// incarnation is never taken for the new one's.
    floor: u32,
    slots: Vec<Slot>,
}

impl TaskLayout {
    /// Drops the slots beyond the count that nobody serves any more
    /// (workers of a shrunk layout that have left), keeping their
    /// incarnations below `floor`.
    fn retire_idle(&mut self) {
        while self.slots.len() > self.instances as usize
            && self.slots.last().is_some_and(|s| s.conn.is_none())
        {
            if let Some(s) = self.slots.pop() {
                self.floor = self.floor.max(s.incarnation.wrapping_add(1));
            }
        }
    }
}

/// Everything behind the server's one lock.
pub struct Control {
    roots: Roots,
    dag: Arc<Dag>,
    tasks: Vec<TaskLayout>,
    epoch: u64,
    session: u64,
    outbox: Arc<Outbox>,
    members: watch::Sender<Arc<Members>>,
    max_message: usize,
    scratch: Vec<(TaskIdx, Delivery)>,
}

/// Why a worker may not join.
type Refusal = (ErrorCode, String);

impl Control {
    fn current(&self, s: &SlotRef) -> bool {
        self.tasks
            .get(s.task as usize)
            .filter(|t| s.instance < t.instances)
            .and_then(|t| t.slots.get(s.instance as usize))
            .is_some_and(|slot| slot.incarnation == s.incarnation)
    }

    fn publish(&mut self) {
        self.epoch += 1;
        let members = Members {
            epoch: self.epoch,
            tasks: self
                .tasks
                .iter()
                .map(|t| TaskMembers {
                    instances: t.instances,
                    layout: t.layout,
                    slots: t.slots[..t.instances as usize]
                        .iter()
                        .map(|s| SlotInfo {
                            incarnation: s.incarnation,
                            peer: s.peer.clone(),
                        })
                        .collect(),
                })
                .collect(),
        };
        self.outbox.apply_members(&members);
        self.members.send_replace(Arc::new(members));
    }

    fn task_bits(task: usize, from: u32, to: u32) -> SlotMask {
        (from..to).fold(0, |m, i| m | slot_bit(task, i))
    }

    /// Adopts a new instance count for `task` (a rebalance).
    fn resize(&mut self, task: TaskIdx, instances: u32, layout: u64) {
        let name = self.dag.task(task).name.clone();
        let t = &mut self.tasks[task.get()];
        let old = t.instances;
        tracing::info!(task = %name, from = old, to = instances, layout, "task layout changes");
        t.instances = instances;
        t.layout = layout;
        if t.slots.len() < instances as usize {
            let fresh = Slot {
                incarnation: t.floor,
                ..Slot::default()
            };
            t.slots.resize(instances as usize, fresh);
        }
        // Slots beyond the new count that nobody serves go; served ones drain.
        t.retire_idle();
        if instances < old {
            // Upstreams drop what they had queued for the instances that go.
            let gone = Self::task_bits(task.get(), instances, old);
            let why = format!("task `{name}` shrank to {instances} instances");
            self.roots.lose(gone, &why, Loss::Departure);
        }
    }

    fn join(&mut self, hello: &WorkerHello, conn: u64) -> Result<(TaskIdx, u32, u32), Refusal> {
        let task = self.dag.find(&hello.task).ok_or_else(|| {
            (
                ErrorCode::UnknownTask,
                format!("this topology has no task `{}`", hello.task),
            )
        })?;
        if hello.instances == 0 || hello.instances > tempest_core::pipeline::MAX_WORKERS {
            return Err((
                ErrorCode::BadInstance,
                format!(
                    "task `{}`: {} instances is out of range 1..={}",
                    hello.task,
                    hello.instances,
                    tempest_core::pipeline::MAX_WORKERS
                ),
            ));
        }
        let t = &self.tasks[task.get()];
        let (have, layout) = (t.instances, t.layout);
        let mut resized = false;
        if hello.instances != have {
            if hello.layout > layout {
                resized = true;
            } else if hello.layout == layout {
                return Err((
                    ErrorCode::LayoutConflict,
                    format!(
                        "task `{}` has {have} instances in layout {layout}; this worker says {} in the same layout",
                        hello.task, hello.instances
                    ),
                ));
            } else {
                return Err((
                    ErrorCode::StaleLayout,
                    format!(
                        "task `{}` has {have} instances in layout {layout}; this worker's layout {} ({} instances) is older",
                        hello.task, hello.layout, hello.instances
                    ),
                ));
            }
        }
        let instances = hello.instances;
        let slots = &self.tasks[task.get()].slots;
        let free = |i: u32| slots.get(i as usize).is_none_or(|s| s.conn.is_none());
        let instance = match hello.instance {
            Some(i) if i >= instances => {
                return Err((
                    ErrorCode::BadInstance,
                    format!(
                    "task `{}`: instance {i} does not exist: the task has {instances} instance(s)",
                    hello.task
                ),
                ))
            }
            Some(i) if !free(i) => {
                return Err((
                    ErrorCode::InstanceTaken,
                    format!("task `{}`: instance {i} is already connected", hello.task),
                ))
            }
            Some(i) => i,
            None => (0..instances).find(|&i| free(i)).ok_or_else(|| {
                (
                    ErrorCode::InstanceTaken,
                    format!(
                        "task `{}`: all {instances} instance(s) are connected",
                        hello.task
                    ),
                )
            })?,
        };
        if resized {
            self.resize(task, instances, hello.layout);
        } else if hello.layout > layout {
            self.tasks[task.get()].layout = hello.layout;
        }
        let slot = &mut self.tasks[task.get()].slots[instance as usize];
        slot.conn = Some(conn);
        slot.peer = Some(hello.peer.clone());
        let incarnation = slot.incarnation;
        self.publish();
        Ok((task, instance, incarnation))
    }

    fn leave(&mut self, task: TaskIdx, instance: u32, conn: u64, loss: Loss) {
        let name = self.dag.task(task).name.clone();
        let t = &mut self.tasks[task.get()];
        let Some(slot) = t.slots.get_mut(instance as usize) else {
            return;
        };
        if slot.conn != Some(conn) {
            return;
        }
        slot.conn = None;
        slot.peer = None;
        slot.incarnation = slot.incarnation.wrapping_add(1);
        t.retire_idle();
        let why = match loss {
            Loss::Departure => format!("worker {name}/{instance} left"),
            Loss::Crash => format!("worker {name}/{instance} was lost"),
        };
        let lost = self.roots.lose(slot_bit(task.get(), instance), &why, loss);
        if lost > 0 {
            tracing::info!(task = %name, instance, lost, "roots replayed: {why}");
        }
        self.publish();
    }

    /// Applies a worker's report.
    fn report(&mut self, r: Report) {
        let now = self.roots.now();
        let dead: SlotMask = r
            .dests
            .iter()
            .filter(|d| !self.current(d))
            .fold(0, |m, d| m | slot_bit(d.task as usize, d.instance));
        let mut completed = false;
        for f in &r.fails {
            let err = if f.retryable {
                TaskError::new(f.message.clone())
            } else {
                TaskError::permanent(f.message.clone())
            };
            self.roots.fail_root(RootId(f.root.0), &err);
        }
        for a in &r.acks {
            let root = RootId(a.root.0);
            if a.slots & dead != 0 {
                // A child went to a worker that had already left.
                self.roots
                    .lose_root(root, "a message was sent to a worker that had left");
                continue;
            }
            completed |= self.roots.ack(root, a.xor.0, a.slots, now);
        }
        if completed {
            self.roots.wake_driver();
        }
    }

    fn link_lost(&mut self, to: SlotRef) {
        if self.current(&to) {
            let name = &self.dag.task(TaskIdx(to.task as u16)).name;
            let why = format!("the peer link to {name}/{} broke", to.instance);
            let n = self
                .roots
                .lose(slot_bit(to.task as usize, to.instance), &why, Loss::Crash);
            if n > 0 {
                tracing::info!(task = %name, instance = to.instance, lost = n, "roots replayed: {why}");
            }
        }
    }

    fn welcome(&self, instance: u32, incarnation: u32, heartbeat: Duration, batch: u32) -> Welcome {
        Welcome {
            instance,
            incarnation,
            session: self.session,
            heartbeat_ms: u32::try_from(heartbeat.as_millis()).unwrap_or(u32::MAX),
            batch_size: batch,
            dag: self.dag.as_ref().into(),
            members: (**self.members.borrow()).clone(),
        }
    }
}

impl Admission for Control {
    fn roots(&mut self) -> &mut Roots {
        &mut self.roots
    }

    fn dispatch(&mut self) {
        let mut batch = std::mem::take(&mut self.scratch);
        self.roots.take_admitted(&mut batch);
        {
            let mut placer = self.outbox.lock();
            for (task, d) in batch.drain(..) {
                let size = delivery_size(&d);
                if size > self.max_message {
                    let limit = self.max_message;
                    self.roots.fail_root(
                        d.root,
                        &TaskError::permanent(format!(
                            "a message of {size} bytes exceeds the limit of {limit} bytes"
                        )),
                    );
                    continue;
                }
                let root = d.root;
                if let Some((_, bit)) = placer.place(task, Target::Any, d) {
                    self.roots.mark(root, bit);
                }
            }
        }
        self.scratch = batch;
    }

    fn room(&self, src: SourceIdx) -> usize {
        self.roots
            .feeds(src)
            .iter()
            .map(|&task| self.outbox.room(task))
            .min()
            .unwrap_or(0)
    }
}

/// What every connection needs.
struct Shared {
    control: Arc<Mutex<Control>>,
    gate: Arc<Gate>,
    topology: String,
    config: ServerConfig,
    batch_size: u32,
    stopping: watch::Receiver<bool>,
    connections: Gauge,
    rejected: Counter,
    next_conn: std::sync::atomic::AtomicU64,
}

/// Accepts worker connections until `stop` turns true, then tells every
/// worker to go and waits (up to `grace`) for their goodbyes.
async fn accept(listener: TcpListener, shared: Arc<Shared>, grace: Duration) {
    let mut stopping = shared.stopping.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(pending) = shared.gate.arrive(peer.ip()) else {
                        shared.rejected.inc();
                        tracing::debug!(%peer, "shut out for failed authentications");
                        continue;
                    };
                    let shared = shared.clone();
                    conns.spawn(async move { connection(stream, peer, shared, pending).await });
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

fn check_peer_address(peer: &str) -> Result<(), String> {
    let ok = peer
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if ok && peer.len() <= 255 {
        Ok(())
    } else {
        Err(format!("peer address `{peer}` is not HOST:PORT"))
    }
}

async fn handshake(
    conn: &mut link::Conn,
    shared: &Shared,
    peer: SocketAddr,
) -> Result<WorkerHello, NoHello> {
    let deadline = shared.config.handshake_timeout;
    let hello = link::read_hello(conn, deadline).await?;
    if let Err(e) = link::authenticate(conn, &hello, shared.config.secret.as_ref(), deadline).await
    {
        if matches!(e, NoHello::Refuse(ErrorCode::BadToken, _)) {
            shared.gate.failed_auth(peer.ip());
        }
        return Err(e);
    }
    let refuse = |code, message: String| Err(NoHello::Refuse(code, message));
    if hello.topology != shared.topology {
        return refuse(
            ErrorCode::UnknownTopology,
            format!(
                "this server runs topology `{}`, not `{}`",
                shared.topology, hello.topology
            ),
        );
    }
    let w = match hello.role {
        Role::Worker(w) => w,
        Role::Peer(_) => {
            return refuse(
                ErrorCode::UnexpectedFrame,
                "this is the topology server; peer links go to a worker's peer port".into(),
            )
        }
    };
    if let Err(e) = check_peer_address(&w.peer) {
        return refuse(ErrorCode::BadAddress, e);
    }
    if *shared.stopping.borrow() {
        return refuse(
            ErrorCode::ShuttingDown,
            "the server is shutting down".into(),
        );
    }
    Ok(w)
}

async fn connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, pending: Handshake) {
    let evicted = pending.evicted.clone();
    let accepted = tokio::select! {
        r = link::accept(
            stream,
            peer,
            shared.config.tls.as_ref(),
            shared.config.handshake_timeout,
            tempest_transport::codec::PRE_AUTH_MAX_FRAME.min(shared.config.max_frame),
        ) => r,
        _ = evicted.cancelled() => Err(link::AcceptError::Closed),
    };
    let mut conn = match accepted {
        Ok(conn) => conn,
        Err(e) => {
            link::count_refusal(&shared.gate, &shared.rejected, peer, &e);
            return;
        }
    };
    let id = shared
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outcome = tokio::select! {
        r = handshake(&mut conn, &shared, peer) => r,
        _ = evicted.cancelled() => Err(NoHello::Refuse(
            ErrorCode::Busy,
            "too many connections in their handshake: the oldest goes".into(),
        )),
    };
    let joined = match outcome.map(|w| (w, pending.admit())) {
        Ok((w, Some(admitted))) => {
            let result = shared.control.lock().join(&w, id);
            result
                .map(|j| (w, j, admitted))
                .map_err(|(c, m)| NoHello::Refuse(c, m))
        }
        Ok((_, None)) => Err(NoHello::Refuse(
            ErrorCode::Busy,
            "the server holds as many worker connections as it takes".into(),
        )),
        Err(e) => Err(e),
    };
    let (hello, (task, instance, incarnation), _admitted) = match joined {
        Ok(ok) => {
            link::accepted(&mut conn, shared.config.max_frame);
            ok
        }
        Err(NoHello::Closed) => {
            // A port probe or a health check: not a worker, nothing to refuse.
            tracing::debug!(%peer, "connection closed before Hello");
            return;
        }
        Err(NoHello::Refuse(code, message)) => {
            shared.rejected.inc();
            tracing::warn!(%peer, %code, "refused worker: {message}");
            link::refuse(&mut conn, code, message).await;
            return;
        }
    };
    // One lock: the Welcome's membership is the one the subscription has
    // seen, so no change between them is missed.
    let (welcome, members) = {
        let control = shared.control.lock();
        let members = control.members.subscribe();
        let welcome = control.welcome(
            instance,
            incarnation,
            shared.config.heartbeat,
            shared.batch_size,
        );
        (welcome, members)
    };
    shared.connections.add(1.0);
    let span = tracing::info_span!("worker", %peer, task = %hello.task, instance, incarnation);
    span.in_scope(|| tracing::info!(peer_addr = %hello.peer, "worker joined"));
    let why = async {
        conn.send(Frame::Welcome(welcome))
            .await
            .map_err(|e| e.to_string())?;
        serve(&mut conn, &shared, members).await
    }
    .instrument(span.clone())
    .await;
    let loss = if why.is_ok() {
        Loss::Departure
    } else {
        Loss::Crash
    };
    shared.control.lock().leave(task, instance, id, loss);
    shared.connections.add(-1.0);
    let _enter = span.enter();
    match why {
        Ok(()) => tracing::info!("worker left"),
        Err(e) => tracing::warn!("worker connection closed: {e}"),
    }
}

async fn serve(
    conn: &mut link::Conn,
    shared: &Shared,
    mut members: watch::Receiver<Arc<Members>>,
) -> Result<(), String> {
    let mut stopping = shared.stopping.clone();
    let mut live = Liveness::new(shared.config.heartbeat);
    let mut told_to_go = false;
    loop {
        if *stopping.borrow() && !told_to_go {
            told_to_go = true;
            conn.send(Frame::Shutdown {
                reason: "the topology server is shutting down".into(),
            })
            .await
            .map_err(|e| e.to_string())?;
            live.sent();
        }
        tokio::select! {
            frame = conn.next() => {
                live.heard();
                let frame = match frame {
                    None if told_to_go => return Ok(()),
                    None => return Err("connection closed".into()),
                    Some(Err(e)) => {
                        link::refuse(conn, e.code(), e.to_string()).await;
                        return Err(e.to_string());
                    }
                    Some(Ok(f)) => f,
                };
                match frame {
                    Frame::Report(r) => shared.control.lock().report(r),
                    Frame::LinkLost(to) => shared.control.lock().link_lost(to),
                    Frame::Heartbeat { seq } => {
                        conn.send(Frame::HeartbeatAck { seq }).await.map_err(|e| e.to_string())?;
                        live.sent();
                    }
                    Frame::HeartbeatAck { .. } => {}
                    Frame::Goodbye => return Ok(()),
                    Frame::Error { code, message } => {
                        return Err(format!("worker sent error {code}: {message}"));
                    }
                    other => {
                        let name = other.name();
                        link::refuse(conn, ErrorCode::UnexpectedFrame, format!("unexpected {name} frame from a worker")).await;
                        return Err(format!("unexpected {name} frame"));
                    }
                }
            }
            changed = members.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let m = (**members.borrow_and_update()).clone();
                conn.send(Frame::Members(m)).await.map_err(|e| e.to_string())?;
                live.sent();
            }
            _ = tokio::time::sleep_until(live.next_check()) => {
                match live.check() {
                    Err(silence) => return Err(format!("silent for {silence:?}")),
                    Ok(Some(beat)) => conn.send(beat).await.map_err(|e| e.to_string())?,
                    Ok(None) => {}
                }
            }
            _ = tempest_core::shutdown::changed(&mut stopping), if !told_to_go => {}
        }
    }
}

/// A topology running as a server: the source, the roots and the
/// membership in this process, the task instances in worker processes that
/// join it and send messages to each other.
pub struct TopologyServer {
    parts: Parts,
    listener: TcpListener,
    config: ServerConfig,
}

impl TopologyServer {
    /// Validates the topology and binds the listener.
    pub async fn bind(topology: Topology, config: ServerConfig) -> Result<Self, RunError> {
        let parts = Parts::prepare(topology, None)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| RunError::Io {
                context: format!("binding {}", config.listen),
                source,
            })?;
        Ok(TopologyServer {
            parts,
            listener,
            config,
        })
    }

    /// The server's metrics (a clone shares them): what a run counts, to
    /// read while it runs.
    pub fn registry(&self) -> tempest_core::metrics::Registry {
        self.parts.registry.clone()
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
        let parts = &self.parts;
        let (settings, dag, registry) = (&parts.settings, parts.dag.clone(), &parts.registry);
        register_edges(&dag, registry);
        let session = random_u64();
        let roots = Roots::new(settings, registry, true, dag.sources());
        // The outbox wakes the drivers when it has room again: one driver
        // directly, several through a task that wakes each.
        let drivers: Vec<_> = (0..roots.source_count())
            .map(|src| roots.driver_waker(src))
            .collect();
        let (driver_waker, forwarder) = match &drivers[..] {
            [one] => (one.clone(), None),
            _ => {
                let room = Arc::new(tokio::sync::Notify::new());
                let wait = room.clone();
                let forwarder = tokio::spawn(async move {
                    loop {
                        wait.notified().await;
                        for d in &drivers {
                            d.notify_one();
                        }
                    }
                });
                (room, Some(forwarder))
            }
        };
        let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<SlotRef>();
        let names: Vec<String> = dag.tasks().map(|(_, t)| t.name.clone()).collect();
        let max_frame = self.config.max_frame;
        let batch_size = settings.batch_size.max(1);
        let outbox = Outbox::new(
            OutboxConfig {
                topology: settings.name.clone(),
                secret: self.config.secret.clone(),
                tls: self.config.tls.clone(),
                session,
                from: None,
                batch_size,
                batch_bytes: max_frame / 2,
                queue_limit: batch_size * 2,
                max_frame,
                heartbeat: self.config.heartbeat,
            },
            dag.entries(),
            &names,
            registry,
            tokio::runtime::Handle::current(),
            Box::new(move |to| {
                let _ = lost_tx.send(to);
            }),
            Some(driver_waker),
        );
        let tasks = dag
            .tasks()
            .map(|(_, t)| TaskLayout {
                instances: t.workers,
                layout: 0,
                floor: 0,
                slots: vec![Slot::default(); t.workers as usize],
            })
            .collect();
        let (members, _) = watch::channel(Arc::new(Members::default()));
        let mut control = Control {
            roots,
            dag: dag.clone(),
            tasks,
            epoch: 0,
            session,
            outbox: outbox.clone(),
            members,
            max_message: max_frame.saturating_sub(1024).max(1),
            scratch: Vec::new(),
        };
        control.publish();
        let control = Arc::new(Mutex::new(control));
        let lost_control = control.clone();
        let lost_task = tokio::spawn(async move {
            while let Some(to) = lost_rx.recv().await {
                lost_control.lock().link_lost(to);
            }
        });
        let none = Labels::default();
        let (stop_tx, stopping) = watch::channel(false);
        let shared = Arc::new(Shared {
            control: control.clone(),
            gate: Gate::new(self.config.gate),
            topology: settings.name.clone(),
            config: self.config.clone(),
            batch_size: u32::try_from(batch_size).unwrap_or(u32::MAX),
            stopping,
            connections: registry.gauge(&catalog::WORKER_CONNECTIONS, &none),
            rejected: registry.counter(&catalog::WORKER_REJECTED, &none),
            next_conn: std::sync::atomic::AtomicU64::new(1),
        });
        let goodbye_wait = settings.grace_period.min(Duration::from_secs(5));
        if self.config.tls.is_some() {
            tracing::info!("data plane: TLS, mutual, against the cluster's CA (worker connections and peer links)");
        } else {
            tracing::info!("data plane: plain text (no TLS configured)");
        }
        let acceptor = tokio::spawn(accept(self.listener, shared, goodbye_wait));
        let end = self.parts.drive(control.clone(), shutdown).await;
        let _ = stop_tx.send(true);
        if let Err(e) = acceptor.await {
            tracing::error!("acceptor ended abnormally: {e}");
        }
        outbox.close();
        lost_task.abort();
        if let Some(forwarder) = forwarder {
            forwarder.abort();
        }
        Admission::sweep(&mut *control.lock()); // final gauges
        Ok(self.parts.finish(end?, started).await)
    }
}
