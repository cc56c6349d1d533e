//! The hub: admission, routing along the DAG, and settling roots.
//!
//! The hub is the single owner of the ledger and of every task's queue. The
//! standalone runtime and the TCP topology server both drive this one type:
//! the source side calls [`Hub::admit`], [`Hub::sweep`] and
//! [`Hub::take_source_work`]; a task instance (an in-process worker or a TCP
//! connection) calls [`Hub::exchange`] to hand back what it handled and take
//! its next batch. It does no I/O and never waits: callers hold it behind a
//! lock for the length of one batch and do their waiting outside.
//!
//! Queues: each task has a shared queue (shuffle-grouped input, which any
//! instance may take) and one queue per instance (key- and all-grouped input,
//! addressed to that instance). An instance drains its own queue first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tempest_core::ledger::{Ledger, RootId, Settled, Tick};
use tempest_core::metrics::{catalog, Counter, Gauge, Histogram, Labels, Registry};
use tempest_core::msg::key_instance;
use tempest_core::pipeline::{Dag, Grouping, TaskIdx};
use tempest_core::{
    Delivery, FailReason, FailurePolicy, Handled, Msg, Settings, SourceId, SourceMsg, TaskError,
};

/// What the hub keeps beside each root's ledger entry.
#[derive(Default)]
struct RootTag {
    source: SourceId,
    /// The root message, kept only when the policy may replay it.
    payload: Option<Msg>,
    /// Attempts so far, this one included.
    attempts: u32,
}

/// How a root ended, as reported to an observer (the test runtime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootEvent {
    /// The tree completed; the root was acked at the source.
    Acked {
        /// The source's id of the root.
        id: SourceId,
        /// Attempts it took.
        attempts: u32,
    },
    /// The tree failed (an error or a timeout) and the policy handled it.
    Failed {
        /// The source's id of the root.
        id: SourceId,
        /// Why.
        reason: FailReason,
        /// What the policy did.
        action: FailAction,
    },
}

/// What the failure policy did with a failed root.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FailAction {
    /// Best effort: acked at the source anyway.
    AckedAnyway,
    /// Retry: a replay is scheduled.
    Replaying,
    /// Retry ran out (or the error was permanent): handed to the source's `fail`.
    DeadLettered,
    /// Policy none: left un-acked at the source.
    LeftUnacked,
}

struct TaskQueue {
    shared: VecDeque<Delivery>,
    routed: Vec<VecDeque<Delivery>>,
    wake: Vec<Arc<Notify>>,
    idle: Vec<bool>,
    depth: Gauge,
}

impl TaskQueue {
    fn len(&self) -> usize {
        self.shared.len() + self.routed.iter().map(VecDeque::len).sum::<usize>()
    }

    fn wake(&mut self, instance: usize) {
        if std::mem::take(&mut self.idle[instance]) {
            self.wake[instance].notify_one();
        }
    }

    fn wake_all(&mut self) {
        for i in 0..self.idle.len() {
            self.wake(i);
        }
    }
}

struct HubMetrics {
    polled: Counter,
    acked: Counter,
    failed: Counter,
    timed_out: Counter,
    dead_lettered: Counter,
    retried: Counter,
    in_flight: Gauge,
    complete_latency: Histogram,
    requeued: Counter,
    /// Where the per-connection gauges are made.
    registry: Registry,
}

/// A replay waiting for its back-off to pass.
struct Replay {
    due: Instant,
    seq: u64,
    tag: RootTag,
}

impl PartialEq for Replay {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Replay {}
impl PartialOrd for Replay {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Replay {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// Source-side work the hub has gathered: roots to ack and to fail.
#[derive(Default, Debug)]
pub struct SourceWork {
    /// Roots to ack at the source.
    pub acks: Vec<SourceId>,
    /// Roots to hand to the source's `fail`.
    pub fails: Vec<(SourceId, FailReason)>,
    /// Roots the `none` policy leaves to the broker (the source's `release`).
    pub releases: Vec<(SourceId, FailReason)>,
}

impl SourceWork {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.fails.is_empty() && self.releases.is_empty()
    }
}

/// The hub. See the module docs.
pub struct Hub {
    dag: Arc<Dag>,
    ledger: Ledger<RootTag>,
    queues: Vec<TaskQueue>,
    policy: FailurePolicy,
    keep_payloads: bool,
    timeout: Duration,
    replays: BinaryHeap<Reverse<Replay>>,
    replay_seq: u64,
    work: SourceWork,
    /// Wakes the source driver when there is source work or room to poll.
    driver: Arc<Notify>,
    events: Option<Vec<RootEvent>>,
    sink_outputs: Option<Vec<Vec<Msg>>>,
    metrics: HubMetrics,
    leases: HashMap<LeaseId, LeaseBook>,
    next_lease: u64,
    limits: Limits,
    claimed: Vec<Vec<bool>>,
}

/// What a delivery costs on the wire beyond its key and payload (root id,
/// lengths, option tags), rounded up.
const DELIVERY_OVERHEAD: usize = 24;

/// Byte bounds on batches; see [`Hub::set_limits`].
#[derive(Copy, Clone, Debug)]
struct Limits {
    batch_bytes: usize,
    message_bytes: usize,
}

/// A remote worker's claim on what it pulled (one per connection).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(u64);

struct LeaseBook {
    task: TaskIdx,
    instance: u32,
    /// Deliveries sent and not yet answered, oldest first, with whether each
    /// came from the instance's own queue.
    out: VecDeque<(Delivery, bool)>,
    /// `out.len()`, as `tempest_worker_leases`.
    held: Gauge,
}

/// Why a lease operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The instance number is out of range.
    #[error("instance {instance} does not exist: the task has {workers} instance(s)")]
    BadInstance {
        /// Asked for.
        instance: u32,
        /// Instances of the task.
        workers: u32,
    },
    /// Another connection holds the instance.
    #[error("instance {0} is already connected")]
    InstanceTaken(u32),
    /// Every instance is connected.
    #[error("all {workers} instance(s) of the task are connected")]
    NoFreeInstance {
        /// Instances of the task.
        workers: u32,
    },
    /// More results than deliveries leased.
    #[error("{results} result(s) for {leased} leased deliveries")]
    Unexpected {
        /// Results sent.
        results: usize,
        /// Deliveries leased.
        leased: usize,
    },
    /// Results that do not answer the oldest leased deliveries in order.
    #[error("results out of delivery order")]
    OutOfOrder,
    /// The lease was closed.
    #[error("the lease is closed")]
    Closed,
}

impl Hub {
    /// A hub for `dag` with `settings`, recording metrics in `registry`.
    pub fn new(dag: Arc<Dag>, settings: &Settings, registry: &Registry) -> Self {
        let none = Labels::default();
        for (_, t) in dag.tasks() {
            for e in &t.edges {
                let grouping = e.grouping.to_string();
                registry
                    .gauge(
                        &catalog::PIPELINE_EDGE,
                        &Labels::new([
                            ("from", t.name.as_str()),
                            ("to", dag.task(e.to).name.as_str()),
                            ("grouping", grouping.as_str()),
                        ]),
                    )
                    .set(1.0);
            }
        }
        let queues = dag
            .tasks()
            .map(|(_, t)| {
                let n = t.workers as usize;
                TaskQueue {
                    shared: VecDeque::new(),
                    routed: (0..n).map(|_| VecDeque::new()).collect(),
                    wake: (0..n).map(|_| Arc::new(Notify::new())).collect(),
                    idle: vec![false; n],
                    depth: registry.gauge(
                        &catalog::TASK_QUEUE_DEPTH,
                        &Labels::new([("task", t.name.as_str())]),
                    ),
                }
            })
            .collect();
        Hub {
            ledger: Ledger::with_capacity(
                settings.message_timeout,
                settings.max_pending.min(1 << 20),
            ),
            queues,
            keep_payloads: matches!(settings.failure, FailurePolicy::Retry { .. }),
            policy: settings.failure.clone(),
            timeout: settings.message_timeout,
            replays: BinaryHeap::new(),
            replay_seq: 0,
            work: SourceWork::default(),
            driver: Arc::new(Notify::new()),
            events: None,
            sink_outputs: None,
            leases: HashMap::new(),
            next_lease: 0,
            limits: Limits {
                batch_bytes: usize::MAX,
                message_bytes: usize::MAX,
            },
            claimed: dag
                .tasks()
                .map(|(_, t)| vec![false; t.workers as usize])
                .collect(),
            metrics: HubMetrics {
                polled: registry.counter(&catalog::SOURCE_POLLED, &none),
                acked: registry.counter(&catalog::SOURCE_ACKED, &none),
                failed: registry.counter(&catalog::SOURCE_FAILED, &none),
                timed_out: registry.counter(&catalog::SOURCE_TIMED_OUT, &none),
                dead_lettered: registry.counter(&catalog::SOURCE_DEAD_LETTERED, &none),
                retried: registry.counter(&catalog::SOURCE_RETRIED, &none),
                in_flight: registry.gauge(&catalog::ROOTS_IN_FLIGHT, &none),
                complete_latency: registry.histogram(&catalog::ROOT_COMPLETE_LATENCY, &none),
                requeued: registry.counter(&catalog::LEASES_REQUEUED, &none),
                registry: registry.clone(),
            },
            dag,
        }
    }

    /// Records every root's end in [`Hub::take_events`] (for tests).
    pub fn record_events(&mut self) {
        self.events = Some(Vec::new());
    }

    /// Keeps what tasks without outgoing edges emit, by task (for tests).
    pub fn capture_sink_outputs(&mut self) {
        self.sink_outputs = Some(vec![Vec::new(); self.dag.task_count()]);
    }

    /// The DAG.
    pub fn dag(&self) -> &Arc<Dag> {
        &self.dag
    }

    /// The notifier an instance waits on when [`Hub::exchange`] had nothing.
    pub fn waker(&self, task: TaskIdx, instance: u32) -> Arc<Notify> {
        self.queues[task.get()].wake[instance as usize].clone()
    }

    /// Wakes every waiting instance (at shutdown).
    pub fn wake_all(&mut self) {
        for q in &mut self.queues {
            for w in &q.wake {
                w.notify_one();
            }
            q.idle.iter_mut().for_each(|i| *i = false);
        }
    }

    /// The notifier the source driver waits on.
    pub fn driver_waker(&self) -> Arc<Notify> {
        self.driver.clone()
    }

    /// Roots in flight, replays waiting included: what `max_pending` caps.
    pub fn in_flight(&self) -> usize {
        self.ledger.len() + self.replays.len()
    }

    /// The current ledger time.
    pub fn now(&self) -> Tick {
        self.ledger.now()
    }

    /// Admits polled messages as roots and queues them for the root task.
    pub fn admit(&mut self, msgs: Vec<SourceMsg>) {
        let now = self.ledger.now();
        self.metrics.polled.add(msgs.len() as u64);
        for SourceMsg { id, msg } in msgs {
            let tag = RootTag {
                source: id,
                payload: self.keep_payloads.then(|| msg.clone()),
                attempts: 1,
            };
            self.admit_root(tag, msg, now);
        }
        self.queues[self.dag.root().get()].wake_all();
    }

    fn admit_root(&mut self, tag: RootTag, msg: Msg, now: Tick) {
        let root = self.ledger.admit(tag, 1, now);
        self.queues[self.dag.root().get()]
            .shared
            .push_back(Delivery { root, msg });
    }

    /// Settles what an instance of `task` handled, then moves up to `max`
    /// deliveries for that instance into `batch`. When nothing is queued for
    /// it, the instance is marked idle and its [`Hub::waker`] fires when work
    /// arrives.
    pub fn exchange(
        &mut self,
        task: TaskIdx,
        instance: u32,
        handled: &mut Vec<Handled>,
        max: usize,
        batch: &mut Vec<Delivery>,
    ) {
        if !handled.is_empty() {
            self.settle(task, handled);
        }
        self.take(task, instance, max, |d, _| batch.push(d));
    }

    /// Moves up to `max` live deliveries for `instance` of `task` to `sink`
    /// (with whether each came from the instance's own queue), within the
    /// batch byte budget, marking the instance idle when there are none.
    fn take(
        &mut self,
        task: TaskIdx,
        instance: u32,
        max: usize,
        mut sink: impl FnMut(Delivery, bool),
    ) -> usize {
        let limits = self.limits;
        let ledger = &self.ledger;
        let q = &mut self.queues[task.get()];
        let i = instance as usize;
        let (mut taken, mut bytes) = (0, 0);
        let mut oversized = Vec::new();
        while taken < max {
            let (d, routed) = match q.routed[i].pop_front() {
                Some(d) => (d, true),
                None => match q.shared.pop_front() {
                    Some(d) => (d, false),
                    None => break,
                },
            };
            // Work of a root that already failed or timed out is dropped here.
            if !ledger.is_live(d.root) {
                continue;
            }
            let size = d.msg.len() + DELIVERY_OVERHEAD;
            if size > limits.message_bytes {
                oversized.push((d.root, size));
                continue;
            }
            if taken > 0 && bytes + size > limits.batch_bytes {
                if routed {
                    q.routed[i].push_front(d);
                } else {
                    q.shared.push_front(d);
                }
                break;
            }
            bytes += size;
            sink(d, routed);
            taken += 1;
        }
        if taken == 0 {
            q.idle[i] = true;
        } else if !q.shared.is_empty() {
            // More shuffle work than this instance took: let an idle sibling help.
            if let Some(j) = q.idle.iter().position(|&idle| idle) {
                q.wake(j);
            }
        }
        for (root, size) in oversized {
            let limit = limits.message_bytes;
            self.fail_root(
                root,
                &TaskError::permanent(format!(
                    "a message of {size} bytes exceeds the limit of {limit} bytes"
                )),
            );
        }
        taken
    }

    /// Fails a live root at once, as if a task had returned `error` for it.
    pub fn fail_root(&mut self, root: RootId, error: &TaskError) {
        let now = self.ledger.now();
        if let Some((tag, _)) = self.ledger.remove(root, now) {
            self.metrics.failed.inc();
            self.fail(tag, error);
            self.driver.notify_one();
        }
    }

    /// Bounds what one batch may carry, for a transport with a frame limit:
    /// a batch stops short of `batch_bytes` (but always carries one message),
    /// and a message above `message_bytes` fails its root permanently rather
    /// than being sent.
    pub fn set_limits(&mut self, batch_bytes: usize, message_bytes: usize) {
        self.limits = Limits {
            batch_bytes,
            message_bytes,
        };
    }

    /// Opens a lease for a remote worker of `task`: `instance` if given (it
    /// must be free), else the lowest free one. Everything the lease takes
    /// stays claimed by it until its results come back or it is closed.
    pub fn open_lease(
        &mut self,
        task: TaskIdx,
        instance: Option<u32>,
    ) -> Result<(LeaseId, u32), LeaseError> {
        let workers = self.dag.task(task).workers;
        let claimed = &mut self.claimed[task.get()];
        let instance = match instance {
            Some(i) if i >= workers => {
                return Err(LeaseError::BadInstance {
                    instance: i,
                    workers,
                })
            }
            Some(i) if claimed[i as usize] => return Err(LeaseError::InstanceTaken(i)),
            Some(i) => i,
            None => claimed
                .iter()
                .position(|c| !c)
                .map(|i| i as u32)
                .ok_or(LeaseError::NoFreeInstance { workers })?,
        };
        claimed[instance as usize] = true;
        self.next_lease += 1;
        let id = LeaseId(self.next_lease);
        let instance_label = instance.to_string();
        let held = self.metrics.registry.gauge(
            &catalog::WORKER_LEASES,
            &Labels::new([
                ("task", self.dag.task(task).name.as_str()),
                ("instance", instance_label.as_str()),
            ]),
        );
        held.set(0.0);
        self.leases.insert(
            id,
            LeaseBook {
                task,
                instance,
                out: VecDeque::new(),
                held,
            },
        );
        Ok((id, instance))
    }

    /// The remote counterpart of [`Hub::exchange`]: `handled` must answer the
    /// lease's oldest deliveries, in order; the new batch is leased to it.
    pub fn lease_exchange(
        &mut self,
        lease: LeaseId,
        handled: &mut Vec<Handled>,
        max: usize,
        batch: &mut Vec<Delivery>,
    ) -> Result<(), LeaseError> {
        let book = self.leases.get_mut(&lease).ok_or(LeaseError::Closed)?;
        let (task, instance) = (book.task, book.instance);
        if handled.len() > book.out.len() {
            return Err(LeaseError::Unexpected {
                results: handled.len(),
                leased: book.out.len(),
            });
        }
        // Check before taking anything off the lease: a refused exchange
        // closes the connection, and its lease must still hold everything.
        if handled
            .iter()
            .zip(&book.out)
            .any(|(h, (d, _))| h.root != d.root)
        {
            return Err(LeaseError::OutOfOrder);
        }
        book.out.drain(..handled.len());
        book.held.set(book.out.len() as f64);
        if !handled.is_empty() {
            self.settle(task, handled);
        }
        if max > 0 {
            let mut leased = Vec::new();
            self.take(task, instance, max, |d, routed| leased.push((d, routed)));
            if let Some(book) = self.leases.get_mut(&lease) {
                for (d, routed) in leased {
                    batch.push(d.clone());
                    book.out.push_back((d, routed));
                }
                book.held.set(book.out.len() as f64);
            }
        }
        Ok(())
    }

    /// Deliveries leased and not yet answered.
    pub fn leased(&self, lease: LeaseId) -> usize {
        self.leases.get(&lease).map_or(0, |b| b.out.len())
    }

    /// Closes a lease (its connection dropped or said goodbye): everything it
    /// still holds goes back to the front of its queues at once, and its
    /// instance is free again. Returns how many deliveries were re-queued.
    pub fn close_lease(&mut self, lease: LeaseId) -> usize {
        let Some(book) = self.leases.remove(&lease) else {
            return 0;
        };
        book.held.set(0.0);
        self.claimed[book.task.get()][book.instance as usize] = false;
        let q = &mut self.queues[book.task.get()];
        let i = book.instance as usize;
        let mut n = 0;
        for (d, routed) in book.out.into_iter().rev() {
            if !self.ledger.is_live(d.root) {
                continue;
            }
            n += 1;
            if routed {
                q.routed[i].push_front(d);
            } else {
                q.shared.push_front(d);
            }
        }
        if n > 0 {
            self.metrics.requeued.add(n as u64);
            q.wake_all();
        }
        n
    }

    /// Settles handled messages of `task`: routes outputs, completes roots,
    /// and hands failures to the policy.
    pub fn settle(&mut self, task: TaskIdx, handled: &mut Vec<Handled>) {
        let now = self.ledger.now();
        let fan_out = self.dag.task(task).fan_out(&self.dag);
        let mut completed = false;
        for Handled { root, result } in handled.drain(..) {
            match result {
                Ok(out) => {
                    let out = out.unwrap_or_default();
                    let children = if fan_out == 0 {
                        0
                    } else {
                        out.len() as u32 * fan_out
                    };
                    match self.ledger.settle(root, children, now) {
                        Settled::Pending => self.route(task, root, out),
                        Settled::Complete(tag, age) => {
                            self.capture(task, fan_out, out);
                            self.complete(tag, age);
                            completed = true;
                        }
                        Settled::Stale => {}
                    }
                }
                Err(e) => {
                    if let Some((tag, _)) = self.ledger.remove(root, now) {
                        self.metrics.failed.inc();
                        self.fail(tag, &e);
                        completed = true;
                    }
                }
            }
        }
        if completed {
            self.driver.notify_one();
        }
    }

    fn capture(&mut self, task: TaskIdx, fan_out: u32, out: Vec<Msg>) {
        if fan_out == 0 && !out.is_empty() {
            if let Some(sinks) = &mut self.sink_outputs {
                sinks[task.get()].extend(out);
            }
        }
    }

    fn route(&mut self, from: TaskIdx, root: RootId, out: Vec<Msg>) {
        let dag = &*self.dag;
        let edges = &dag.task(from).edges;
        if edges.is_empty() {
            if let Some(sinks) = &mut self.sink_outputs {
                sinks[from.get()].extend(out);
            }
            return;
        }
        let last = edges.len() - 1;
        let mut out = Some(out);
        for (n, e) in edges.iter().enumerate() {
            // The last edge takes the messages; earlier ones clone (cheap: Bytes).
            let msgs = if n == last {
                out.take().unwrap_or_default()
            } else {
                out.clone().unwrap_or_default()
            };
            let workers = dag.task(e.to).workers;
            let q = &mut self.queues[e.to.get()];
            match e.grouping {
                Grouping::Shuffle => {
                    q.shared
                        .extend(msgs.into_iter().map(|msg| Delivery { root, msg }));
                    q.wake_all();
                }
                Grouping::Key => {
                    for msg in msgs {
                        let key = msg.key().map_or(&[][..], |k| &k[..]);
                        let i = key_instance(key, workers) as usize;
                        q.routed[i].push_back(Delivery { root, msg });
                        q.wake(i);
                    }
                }
                Grouping::All => {
                    for msg in msgs {
                        for i in 0..workers as usize {
                            q.routed[i].push_back(Delivery {
                                root,
                                msg: msg.clone(),
                            });
                            q.wake(i);
                        }
                    }
                }
            }
        }
    }

    fn complete(&mut self, tag: RootTag, age: Duration) {
        self.metrics.acked.inc();
        self.metrics.complete_latency.record(age.as_micros() as u64);
        self.work.acks.push(tag.source);
        if let Some(ev) = &mut self.events {
            ev.push(RootEvent::Acked {
                id: tag.source,
                attempts: tag.attempts,
            });
        }
    }

    /// Applies the failure policy to a root that errored or timed out.
    fn fail(&mut self, mut tag: RootTag, error: &TaskError) {
        let reason = FailReason {
            message: error.message().to_string(),
            attempts: tag.attempts,
        };
        let action = match &self.policy {
            FailurePolicy::BestEffort => {
                self.work.acks.push(tag.source);
                FailAction::AckedAnyway
            }
            FailurePolicy::None => {
                self.work.releases.push((tag.source, reason.clone()));
                FailAction::LeftUnacked
            }
            FailurePolicy::Retry { .. } => match self.policy.replay_delay(tag.attempts) {
                Some(delay) if error.is_retryable() && tag.payload.is_some() => {
                    self.metrics.retried.inc();
                    tag.attempts += 1;
                    self.replay_seq += 1;
                    let id = tag.source;
                    self.replays.push(Reverse(Replay {
                        due: Instant::now() + delay,
                        seq: self.replay_seq,
                        tag,
                    }));
                    self.record_failure(id, reason, FailAction::Replaying);
                    return;
                }
                _ => {
                    self.metrics.dead_lettered.inc();
                    self.work.fails.push((tag.source, reason.clone()));
                    FailAction::DeadLettered
                }
            },
        };
        self.record_failure(tag.source, reason, action);
    }

    fn record_failure(&mut self, id: SourceId, reason: FailReason, action: FailAction) {
        if let Some(ev) = &mut self.events {
            ev.push(RootEvent::Failed { id, reason, action });
        }
    }

    /// Times out roots past `message_timeout` and re-admits replays whose
    /// back-off has passed. Returns when it next needs to run.
    pub fn sweep(&mut self) -> Duration {
        let now = self.ledger.now();
        let mut expired = Vec::new();
        self.ledger.expire(now, |_, tag| expired.push(tag));
        if !expired.is_empty() {
            let err = TaskError::new(format!("timed out after {:?}", self.timeout));
            for tag in expired {
                self.metrics.timed_out.inc();
                self.fail(tag, &err);
            }
        }
        let wall = Instant::now();
        let mut replayed = false;
        while self.replays.peek().is_some_and(|r| r.0.due <= wall) {
            let Some(Reverse(Replay { tag, .. })) = self.replays.pop() else {
                break;
            };
            let msg = tag.payload.clone().unwrap_or_default();
            self.admit_root(tag, msg, now);
            replayed = true;
        }
        if replayed {
            self.queues[self.dag.root().get()].wake_all();
        }
        self.metrics.in_flight.set(self.in_flight() as f64);
        for q in &self.queues {
            q.depth.set(q.len() as f64);
        }
        let next_timeout = self.ledger.next_deadline(now).unwrap_or(self.timeout);
        let next_replay = self
            .replays
            .peek()
            .map_or(Duration::MAX, |r| r.0.due.saturating_duration_since(wall));
        next_timeout.min(next_replay)
    }

    /// Takes the acks and fails gathered for the source.
    pub fn take_source_work(&mut self) -> SourceWork {
        std::mem::take(&mut self.work)
    }

    /// True when there is source work waiting.
    pub fn has_source_work(&self) -> bool {
        !self.work.is_empty()
    }

    /// Takes the root events recorded so far.
    pub fn take_events(&mut self) -> Vec<RootEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Takes the captured outputs of sink tasks, by task name.
    pub fn take_sink_outputs(&mut self) -> Vec<(String, Vec<Msg>)> {
        let Some(sinks) = &mut self.sink_outputs else {
            return Vec::new();
        };
        self.dag
            .tasks()
            .zip(sinks.iter_mut())
            .map(|((_, t), out)| (t.name.clone(), std::mem::take(out)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_core::{Pipeline, TaskResult};

    fn hub(workers: u32) -> Hub {
        let dag = Pipeline::new()
            .task_with_workers("t", workers, || |_m: Msg| -> TaskResult { Ok(None) })
            .validate()
            .unwrap();
        let mut hub = Hub::new(Arc::new(dag), &Settings::new("h"), &Registry::default());
        hub.record_events();
        hub
    }

    fn msgs(sizes: &[usize]) -> Vec<SourceMsg> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| SourceMsg::new(i as u64, vec![b'x'; n]))
            .collect()
    }

    #[test]
    fn batches_stop_at_the_byte_budget_and_oversized_messages_fail() {
        let mut h = hub(1);
        h.set_limits(200, 150);
        h.admit(msgs(&[50, 50, 500, 50, 50, 50]));
        let (t, mut handled, mut batch) = (TaskIdx(0), Vec::new(), Vec::new());
        h.exchange(t, 0, &mut handled, 100, &mut batch);
        // 50 + 24 bytes each: two fit in 200, the third would not.
        assert_eq!(batch.len(), 2);
        batch.clear();
        h.exchange(t, 0, &mut handled, 100, &mut batch);
        assert_eq!(batch.len(), 2, "the oversized message is skipped, not sent");
        let events = h.take_events();
        assert_eq!(events.len(), 1);
        match &events[0] {
            RootEvent::Failed { id, reason, .. } => {
                assert_eq!(*id, SourceId::from(2u64));
                assert!(
                    reason.message.contains("exceeds the limit"),
                    "{}",
                    reason.message
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_closed_lease_requeues_at_the_front_in_order() {
        let mut h = hub(2);
        h.admit(msgs(&[1, 1, 1, 1]));
        let t = TaskIdx(0);
        let (lease, instance) = h.open_lease(t, None).unwrap();
        assert_eq!(instance, 0);
        assert_eq!(h.open_lease(t, Some(0)), Err(LeaseError::InstanceTaken(0)));
        assert_eq!(
            h.open_lease(t, Some(5)),
            Err(LeaseError::BadInstance {
                instance: 5,
                workers: 2
            })
        );
        let mut batch = Vec::new();
        h.lease_exchange(lease, &mut Vec::new(), 3, &mut batch)
            .unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(h.leased(lease), 3);
        // Results out of order are refused.
        let mut wrong = vec![Handled {
            root: batch[1].root,
            result: Ok(None),
        }];
        assert_eq!(
            h.lease_exchange(lease, &mut wrong, 0, &mut Vec::new()),
            Err(LeaseError::OutOfOrder)
        );
        assert_eq!(
            h.close_lease(lease),
            3,
            "a refused exchange leaves the lease whole"
        );
        // The instance is free again and the re-queued deliveries come first, in order.
        let (lease, _) = h.open_lease(t, Some(0)).unwrap();
        let mut again = Vec::new();
        h.lease_exchange(lease, &mut Vec::new(), 10, &mut again)
            .unwrap();
        let roots: Vec<_> = again.iter().map(|d| d.root).collect();
        assert_eq!(roots[..3], [batch[0].root, batch[1].root, batch[2].root]);
        assert_eq!(again.len(), 4);
    }

    #[test]
    fn the_leases_gauge_follows_each_connection() {
        let dag = Pipeline::new()
            .task_with_workers("t", 2, || |_m: Msg| -> TaskResult { Ok(None) })
            .validate()
            .unwrap();
        let registry = Registry::default();
        let mut h = Hub::new(Arc::new(dag), &Settings::new("h"), &registry);
        h.admit(msgs(&[1, 1, 1, 1, 1]));
        let t = TaskIdx(0);
        let leases = |i: &str| {
            registry
                .snapshot()
                .gauge("tempest_worker_leases", &[("task", "t"), ("instance", i)])
        };
        let (a, _) = h.open_lease(t, Some(1)).unwrap();
        assert_eq!(leases("1"), Some(0.0));
        let mut batch = Vec::new();
        h.lease_exchange(a, &mut Vec::new(), 3, &mut batch).unwrap();
        assert_eq!(leases("1"), Some(3.0));
        let mut answered: Vec<Handled> = batch[..2]
            .iter()
            .map(|d| Handled {
                root: d.root,
                result: Ok(None),
            })
            .collect();
        h.lease_exchange(a, &mut answered, 0, &mut Vec::new())
            .unwrap();
        assert_eq!(leases("1"), Some(1.0));
        h.close_lease(a);
        assert_eq!(leases("1"), Some(0.0));
        assert_eq!(leases("0"), None, "no connection, no series");
    }
}
