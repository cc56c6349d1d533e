//! The outbox: messages on their way to downstream task instances.
//!
//! A process that sends messages (a task worker to the tasks its edges lead
//! to, the topology server to the root task) keeps one queue per
//! destination instance and one peer link to each destination that a worker
//! serves. The routing step [`Outbox::lock`]s the outbox and
//! [`Placer::place`]s each message; a link task per destination takes
//! batches off its queue as its credit allows and writes them.
//!
//! Backpressure, end to end: a receiver grants a few batches of credit per
//! link and gives more only as its handler finishes batches; a queue that
//! cannot drain stays over its limit; [`Outbox::wait_for_room`] then holds
//! the routing step (a worker's handler, which stops taking input, so its own
//! upstreams run out of credit) and [`Outbox::room`] tells the server's
//! source driver to stop polling. No queue grows past its limit by more than
//! one batch's output.
//!
//! When a link breaks, what its queue still held is dropped, and the
//! `on_lost` callback (called with the outbox locked, so it is ordered after
//! every report of what was routed before) tells the topology server, which
//! replays the roots those messages belonged to.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::Notify;

use tempest_core::ledger::{slot_bit, SlotMask};
use tempest_core::metrics::{catalog, Gauge, Labels, Registry};
use tempest_core::pipeline::TaskIdx;
use tempest_core::route::Target;
use tempest_core::Delivery;

use crate::auth::Secret;
use crate::codec::delivery_size;
use crate::link::{self, Liveness};
use crate::tls::DataTls;
use crate::wire::{Deliveries, Frame, Hello, Members, PeerHello, Role, SlotRef};

/// How an outbox sends.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// The topology (checked by receivers).
    pub topology: String,
    /// The data-plane secret, if the deployment has one.
    pub secret: Option<Secret>,
    /// The data plane's TLS, if the deployment has it.
    pub tls: Option<DataTls>,
    /// The topology server's session.
    pub session: u64,
    /// The sending instance, or `None` for the topology server.
    pub from: Option<SlotRef>,
    /// The most messages in one batch.
    pub batch_size: usize,
    /// The most bytes of messages in one batch (a single larger message goes
    /// alone).
    pub batch_bytes: usize,
    /// Messages a destination's queue may hold before routing waits.
    pub queue_limit: usize,
    /// The largest frame.
    pub max_frame: usize,
    /// Heartbeat interval of the links.
    pub heartbeat: Duration,
}

/// Calls back when a link to a slot incarnation broke with messages maybe
/// lost; called with the outbox locked.
pub type OnLost = Box<dyn Fn(SlotRef) + Send + Sync>;

struct Dest {
    queue: VecDeque<Delivery>,
    incarnation: u32,
    peer: Option<String>,
    wake: Arc<Notify>,
    link: Option<tokio::task::JoinHandle<()>>,
    /// Bumped whenever the link is replaced, so an old link task stops.
    link_gen: u64,
}

impl Dest {
    fn new(incarnation: u32) -> Self {
        Dest {
            queue: VecDeque::new(),
            incarnation,
            peer: None,
            wake: Arc::new(Notify::new()),
            link: None,
            link_gen: 0,
        }
    }

    fn clear(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        n
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        if let Some(l) = self.link.take() {
            l.abort();
        }
    }
}

struct TaskDests {
    dests: Vec<Dest>,
    depth: Gauge,
    /// Where the next shuffle pick starts, so ties rotate.
    rotate: usize,
}

struct State {
    /// By task index; empty for tasks this process does not send to.
    tasks: Vec<Option<TaskDests>>,
    closed: bool,
}

/// The outbox of one process, for one session of its topology server. See
/// the module docs.
pub struct Outbox {
    state: Mutex<State>,
    room: Condvar,
    config: OutboxConfig,
    runtime: tokio::runtime::Handle,
    on_lost: OnLost,
    on_room: Option<Arc<Notify>>,
    links_out: Gauge,
    this: std::sync::Weak<Outbox>,
}

/// The outbox, locked for one routing step.
pub struct Placer<'a> {
    state: MutexGuard<'a, State>,
    touched: Vec<(TaskIdx, u32)>,
}

impl Outbox {
    /// An outbox sending to the tasks `targets` (indexes into `members`),
    /// whose link tasks run on `runtime`. `on_room` is notified whenever a
    /// queue drains (the server's source driver waits on it).
    pub fn new(
        config: OutboxConfig,
        targets: &[TaskIdx],
        task_names: &[String],
        registry: &Registry,
        runtime: tokio::runtime::Handle,
        on_lost: OnLost,
        on_room: Option<Arc<Notify>>,
    ) -> Arc<Outbox> {
        let mut tasks: Vec<Option<TaskDests>> = (0..task_names.len()).map(|_| None).collect();
        for t in targets {
            if let Some(slot) = tasks.get_mut(t.get()) {
                let name = task_names[t.get()].as_str();
                *slot = Some(TaskDests {
                    dests: Vec::new(),
                    depth: registry
                        .gauge(&catalog::TASK_QUEUE_DEPTH, &Labels::new([("task", name)])),
                    rotate: 0,
                });
            }
        }
        Arc::new_cyclic(|this| Outbox {
            state: Mutex::new(State {
                tasks,
                closed: false,
            }),
            room: Condvar::new(),
            config,
            runtime,
            on_lost,
            on_room,
            links_out: registry.gauge(&catalog::PEER_LINKS, &Labels::new([("direction", "out")])),
            this: this.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Follows a membership change: destinations appear and go as instance
    /// counts change, a destination whose incarnation changed loses what was
    /// queued for the old one (the server replays those roots), and links
    /// follow the peers' addresses.
    pub fn apply_members(&self, members: &Members) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        for (t, td) in state.tasks.iter_mut().enumerate() {
            let Some(td) = td else { continue };
            let Some(tm) = members.tasks.get(t) else {
                continue;
            };
            let n = tm.slots.len();
            // Instances beyond the new count go, with their queues.
            td.dests.truncate(n);
            while td.dests.len() < n {
                let inc = tm.slots[td.dests.len()].incarnation;
                td.dests.push(Dest::new(inc));
            }
            for (i, (d, slot)) in td.dests.iter_mut().zip(&tm.slots).enumerate() {
                let moved = d.incarnation != slot.incarnation;
                if moved {
                    let n = d.clear();
                    if n > 0 {
                        tracing::debug!(
                            task = t,
                            instance = i,
                            dropped = n,
                            "destination left: queue dropped"
                        );
                    }
                    d.incarnation = slot.incarnation;
                }
                if moved || d.peer != slot.peer {
                    d.peer = slot.peer.clone();
                    self.relink(TaskIdx(t as u16), i as u32, d);
                }
            }
        }
        self.room.notify_all();
    }

    fn relink(&self, task: TaskIdx, instance: u32, d: &mut Dest) {
        if let Some(old) = d.link.take() {
            old.abort();
        }
        d.link_gen += 1;
        let (Some(peer), Some(this)) = (d.peer.clone(), self.this.upgrade()) else {
            return;
        };
        let to = SlotRef {
            task: task.get() as u32,
            instance,
            incarnation: d.incarnation,
        };
        let link = Link {
            outbox: this,
            to,
            peer,
            gen: d.link_gen,
            wake: d.wake.clone(),
        };
        d.link = Some(self.runtime.spawn(link.run()));
    }

    /// Locks the outbox for one routing step.
    pub fn lock(&self) -> Placer<'_> {
        Placer {
            state: self.state.lock(),
            touched: Vec::new(),
        }
    }

    /// Waits until every queue is within its limit, the outbox closes, or
    /// `give_up` says so (checked every 50 ms). Returns false when it
    /// stopped waiting because of a close or `give_up`.
    pub fn wait_for_room(&self, give_up: impl Fn() -> bool) -> bool {
        let mut state = self.state.lock();
        loop {
            if state.closed || give_up() {
                return false;
            }
            if !self.over_limit(&state) {
                return true;
            }
            self.room.wait_for(&mut state, Duration::from_millis(50));
        }
    }

    fn over_limit(&self, state: &State) -> bool {
        state.tasks.iter().flatten().any(|td| {
            td.dests
                .iter()
                .any(|d| d.queue.len() >= self.config.queue_limit)
        })
    }

    /// How many more messages task `task`'s served instances could take
    /// before their limit (0 while no worker serves any): what a shuffle to
    /// it may place without waiting.
    pub fn room(&self, task: TaskIdx) -> usize {
        let state = self.state.lock();
        match state.tasks.get(task.get()).and_then(Option::as_ref) {
            Some(td) => td
                .dests
                .iter()
                .filter(|d| d.peer.is_some())
                .map(|d| self.config.queue_limit.saturating_sub(d.queue.len()))
                .sum(),
            None => 0,
        }
    }

    /// Stops every link and drops every queue: the session is over.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        for td in state.tasks.iter_mut().flatten() {
            td.dests.clear();
            td.depth.set(0.0);
        }
        self.room.notify_all();
    }

    /// Takes the next batch for a link: up to `batch_size` messages and
    /// `batch_bytes` bytes (at least one message). `None` when the link is
    /// stale (replaced, or the outbox closed).
    fn take(&self, to: SlotRef, gen: u64, out: &mut Vec<Delivery>) -> Option<()> {
        let mut state = self.state.lock();
        if state.closed {
            return None;
        }
        let td = state.tasks.get_mut(to.task as usize)?.as_mut()?;
        let d = td.dests.get_mut(to.instance as usize)?;
        if d.link_gen != gen {
            return None;
        }
        let was_full = d.queue.len() >= self.config.queue_limit;
        let mut bytes = 0;
        while out.len() < self.config.batch_size {
            let Some(next) = d.queue.front() else { break };
            let size = delivery_size(next);
            if !out.is_empty() && bytes + size > self.config.batch_bytes {
                break;
            }
            bytes += size;
            if let Some(m) = d.queue.pop_front() {
                out.push(m);
            }
        }
        if was_full && d.queue.len() < self.config.queue_limit {
            self.room.notify_all();
            if let Some(n) = &self.on_room {
                n.notify_one();
            }
        }
        Some(())
    }

    /// A link broke: drop its queue and report the loss (while locked, so
    /// the report follows everything routed before).
    fn lost(&self, to: SlotRef, gen: u64) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        let Some(d) = state
            .tasks
            .get_mut(to.task as usize)
            .and_then(Option::as_mut)
            .and_then(|td| td.dests.get_mut(to.instance as usize))
        else {
            return;
        };
        if d.link_gen != gen {
            return;
        }
        let n = d.clear();
        (self.on_lost)(to);
        drop(state);
        if n > 0 {
            tracing::debug!(?to, dropped = n, "link lost: queue dropped");
        }
        self.room.notify_all();
        if let Some(n) = &self.on_room {
            n.notify_one();
        }
    }
}

impl Placer<'_> {
    /// Queues `d` for an instance of `task` (for [`Target::Any`], the live
    /// instance with the shortest queue) and returns the slot incarnation it
    /// goes to and its mask bit. `None` when the outbox does not send to
    /// `task` or the task has no instances yet.
    pub fn place(
        &mut self,
        task: TaskIdx,
        target: Target,
        d: Delivery,
    ) -> Option<(SlotRef, SlotMask)> {
        let td = self.state.tasks.get_mut(task.get())?.as_mut()?;
        let n = td.dests.len();
        if n == 0 {
            return None;
        }
        let i = match target {
            Target::Instance(i) => (i as usize).min(n - 1),
            Target::Any => {
                let start = td.rotate % n;
                td.rotate = td.rotate.wrapping_add(1);
                let mut best = start;
                let mut best_key = (true, usize::MAX);
                for k in 0..n {
                    let j = (start + k) % n;
                    let dj = &td.dests[j];
                    // Prefer instances someone serves, then the shortest queue.
                    let key = (dj.peer.is_none(), dj.queue.len());
                    if key < best_key {
                        best_key = key;
                        best = j;
                        if key == (false, 0) {
                            break;
                        }
                    }
                }
                best
            }
        };
        let dest = &mut td.dests[i];
        dest.queue.push_back(d);
        let key = (task, i as u32);
        if self.touched.last() != Some(&key) && !self.touched.contains(&key) {
            self.touched.push(key);
        }
        Some((
            SlotRef {
                task: task.get() as u32,
                instance: i as u32,
                incarnation: dest.incarnation,
            },
            slot_bit(task.get(), i as u32),
        ))
    }

    /// The instance count of `task` as the outbox knows it (0 when unknown).
    pub fn instances(&self, task: TaskIdx) -> u32 {
        self.state
            .tasks
            .get(task.get())
            .and_then(Option::as_ref)
            .map_or(0, |td| td.dests.len() as u32)
    }
}

impl Drop for Placer<'_> {
    fn drop(&mut self) {
        for &(t, i) in &self.touched {
            if let Some(td) = self.state.tasks.get(t.get()).and_then(Option::as_ref) {
                td.depth
                    .set(td.dests.iter().map(|d| d.queue.len()).sum::<usize>() as f64);
                if let Some(d) = td.dests.get(i as usize) {
                    d.wake.notify_one();
                }
            }
        }
    }
}

/// One peer link: connects to a destination, then sends its queue as its
/// credit allows, until the outbox replaces it.
struct Link {
    outbox: Arc<Outbox>,
    to: SlotRef,
    peer: String,
    gen: u64,
    wake: Arc<Notify>,
}

impl Link {
    async fn run(self) {
        const MAX_BACKOFF: Duration = Duration::from_secs(1);
        let mut backoff = Duration::from_millis(20);
        let mut warned = false;
        loop {
            match self.connect().await {
                Ok((conn, credit, heartbeat)) => {
                    backoff = Duration::from_millis(20);
                    warned = false;
                    self.outbox.links_out.add(1.0);
                    let why = self.send(conn, credit, heartbeat).await;
                    self.outbox.links_out.add(-1.0);
                    match why {
                        Ok(()) => return, // replaced or closed
                        Err(why) => {
                            tracing::info!(to = ?self.to, peer = %self.peer, "peer link lost: {why}");
                            self.outbox.lost(self.to, self.gen);
                        }
                    }
                }
                Err(why) => {
                    // A receiver that has not heard of its own join yet is
                    // routine; one still unreachable at the longest back-off
                    // is an operator's problem (a wrong advertised address,
                    // a firewall): say so, once per stretch of failures.
                    if backoff == MAX_BACKOFF {
                        if !warned {
                            tracing::warn!(to = ?self.to, peer = %self.peer, "cannot open a peer link: {why}; messages for it wait");
                            warned = true;
                        }
                    } else {
                        tracing::debug!(to = ?self.to, peer = %self.peer, "peer link not up: {why}");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn connect(&self) -> Result<(link::Conn, u32, Duration), String> {
        let c = &self.outbox.config;
        let hello = Hello::new(
            c.topology.clone(),
            Role::Peer(PeerHello {
                session: c.session,
                from: c.from,
                to: self.to,
            }),
        );
        match link::connect(
            &self.peer,
            c.max_frame,
            hello,
            c.secret.as_ref(),
            c.tls.as_ref(),
        )
        .await?
        {
            (conn, Frame::PeerWelcome(w)) => Ok((
                conn,
                w.credit.max(1),
                Duration::from_millis(u64::from(w.heartbeat_ms.max(10))),
            )),
            (_, Frame::Error { code, message }) => Err(format!("refused ({code}): {message}")),
            (_, other) => Err(format!("answered Hello with {}", other.name())),
        }
    }

    /// Sends batches until the link breaks (`Err`) or is replaced (`Ok`).
    async fn send(
        &self,
        mut conn: link::Conn,
        mut credit: u32,
        heartbeat: Duration,
    ) -> Result<(), String> {
        let mut live = Liveness::new(heartbeat);
        let mut batch = Vec::with_capacity(self.outbox.config.batch_size);
        loop {
            // Send while there is credit and something to send.
            let mut wrote = false;
            while credit > 0 {
                if self.outbox.take(self.to, self.gen, &mut batch).is_none() {
                    return Ok(());
                }
                if batch.is_empty() {
                    break;
                }
                credit -= 1;
                let frame = Frame::Batch(Deliveries(std::mem::take(&mut batch)));
                conn.feed(frame).await.map_err(|e| e.to_string())?;
                wrote = true;
            }
            if wrote {
                conn.flush().await.map_err(|e| e.to_string())?;
                live.sent();
            }
            tokio::select! {
                frame = conn.next() => {
                    live.heard();
                    match frame {
                        None => return Err("closed by the receiver".into()),
                        Some(Err(e)) => return Err(e.to_string()),
                        Some(Ok(Frame::Credit { batches })) => credit = credit.saturating_add(batches),
                        Some(Ok(Frame::Heartbeat { seq })) => {
                            conn.send(Frame::HeartbeatAck { seq }).await.map_err(|e| e.to_string())?;
                            live.sent();
                        }
                        Some(Ok(Frame::HeartbeatAck { .. })) => {}
                        Some(Ok(Frame::Error { code, message })) => {
                            return Err(format!("receiver sent {code}: {message}"));
                        }
                        Some(Ok(other)) => {
                            link::refuse(&mut conn, crate::wire::ErrorCode::UnexpectedFrame, format!("unexpected {} on a peer link", other.name())).await;
                            return Err(format!("unexpected {} from the receiver", other.name()));
                        }
                    }
                }
                _ = self.wake.notified(), if credit > 0 => {}
                _ = tokio::time::sleep_until(live.next_check()) => {
                    match live.check() {
                        Err(silence) => return Err(format!("receiver silent for {silence:?}")),
                        Ok(Some(beat)) => conn.send(beat).await.map_err(|e| e.to_string())?,
                        Ok(None) => {}
                    }
                }
            }
        }
    }
}
