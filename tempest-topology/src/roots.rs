//! Roots: admission, the ack ledger, the failure policy and replays.
//!
//! Both runtimes of a topology keep their roots here: the standalone hub
//! (which routes messages in process) and the topology server (whose workers
//! route them among themselves and send ack reports). `Roots` admits polled
//! messages as roots and leaves their first deliveries in
//! [`Roots::take_admitted`] for the caller to send to the tasks their source
//! feeds; applies ack reports; hands failed and timed-out roots to the
//! failure policy; replays roots whose worker was lost; and gathers what
//! each source must hear (acks, fails, releases) for its driver. It does no
//! I/O and never waits.
//!
//! A topology may have several sources. Each root remembers its source (by
//! index into the DAG's sources), and everything per source is kept apart:
//! the count in flight that its `max_pending` caps, the work for its driver,
//! the notifier that driver waits on, and its metrics (labelled `source`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tempest_core::ledger::{EdgeIds, Ledger, RootId, Settled, SlotMask, Tick};
use tempest_core::metrics::{catalog, Counter, Gauge, Histogram, Labels, Registry};
use tempest_core::pipeline::{DagSource, TaskIdx};
use tempest_core::{
    Delivery, FailReason, FailurePolicy, Msg, Settings, SourceId, SourceMsg, TaskError,
};

/// A source's position among the DAG's sources ([`tempest_core::Dag::sources`]).
pub type SourceIdx = usize;

/// A root lost with a crashed worker this many times is no longer replayed
/// for free: the next crash goes to the failure policy like an error (a
/// message that crashes every worker it reaches must not loop forever).
/// Workers that leave on purpose (a rebalance, a stop) do not count.
pub const MAX_FREE_LOSSES: u8 = 3;

/// How a worker was lost, for [`Roots::lose`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Loss {
    /// It left on purpose (said goodbye, or its instance left the layout):
    /// its roots are replayed, and this does not count against them.
    Departure,
    /// It crashed, fell silent, or a link to it broke: counts towards
    /// [`MAX_FREE_LOSSES`].
    Crash,
}

/// What is kept beside each root's ledger entry.
#[derive(Default)]
struct RootTag {
    /// Which source it came from.
    src: u16,
    /// That source's id of it.
    source: SourceId,
    /// The root message, kept when it may be replayed.
    payload: Option<Msg>,
    /// Attempts so far, this one included.
    attempts: u32,
    /// Times it was replayed because a worker was lost.
    losses: u8,
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
    /// The tree failed (an error, a timeout, a lost worker) and the policy
    /// handled it.
    Failed {
        /// The source's id of the root.
        id: SourceId,
        /// Why.
        reason: FailReason,
        /// What the policy did.
        action: FailAction,
    },
}

/// What was done with a failed root.
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
    /// A worker holding its messages was lost: replayed at once, whatever
    /// the policy, without counting an attempt.
    Lost,
}

/// Source-side work gathered: roots to ack and to fail.
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

struct RootMetrics {
    polled: Counter,
    acked: Counter,
    failed: Counter,
    timed_out: Counter,
    dead_lettered: Counter,
    retried: Counter,
    lost: Counter,
    in_flight: Gauge,
    complete_latency: Histogram,
}

/// What is kept per source.
struct PerSource {
    /// The tasks its roots are delivered to.
    feeds: Vec<TaskIdx>,
    /// Its roots in flight, replays waiting included.
    in_flight: usize,
    /// What its driver must do at the source.
    work: SourceWork,
    /// Wakes its driver when there is source work or room to poll.
    driver: Arc<Notify>,
    metrics: RootMetrics,
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

/// The roots of a topology. See the module docs.
pub struct Roots {
    ledger: Ledger<RootTag>,
    ids: EdgeIds,
    policy: FailurePolicy,
    keep_payloads: bool,
    timeout: Duration,
    replays: BinaryHeap<Reverse<Replay>>,
    replay_seq: u64,
    admitted: Vec<(TaskIdx, Delivery)>,
    sources: Vec<PerSource>,
    events: Option<Vec<RootEvent>>,
}

impl Roots {
    /// Roots of `sources` (a DAG's) under `settings`, recording metrics in
    /// `registry`. With `replayable`, every root's message is kept until it
    /// completes, so a root lost with a worker can be replayed whatever the
    /// policy (the topology server); otherwise only the retry policy keeps
    /// them.
    pub fn new(
        settings: &Settings,
        registry: &Registry,
        replayable: bool,
        sources: &[DagSource],
    ) -> Self {
        let capacity: usize = sources
            .iter()
            .map(|s| settings.max_pending_of(&s.name))
            .fold(0, usize::saturating_add);
        let sources = sources
            .iter()
            .map(|s| {
                let labels = Labels::new([("source", s.name.as_str())]);
                PerSource {
                    feeds: s.feeds.clone(),
                    in_flight: 0,
                    work: SourceWork::default(),
                    driver: Arc::new(Notify::new()),
                    metrics: RootMetrics {
                        polled: registry.counter(&catalog::SOURCE_POLLED, &labels),
                        acked: registry.counter(&catalog::SOURCE_ACKED, &labels),
                        failed: registry.counter(&catalog::SOURCE_FAILED, &labels),
                        timed_out: registry.counter(&catalog::SOURCE_TIMED_OUT, &labels),
                        dead_lettered: registry.counter(&catalog::SOURCE_DEAD_LETTERED, &labels),
                        retried: registry.counter(&catalog::SOURCE_RETRIED, &labels),
                        lost: registry.counter(&catalog::ROOTS_LOST, &labels),
                        in_flight: registry.gauge(&catalog::ROOTS_IN_FLIGHT, &labels),
                        complete_latency: registry
                            .histogram(&catalog::ROOT_COMPLETE_LATENCY, &labels),
                    },
                }
            })
            .collect();
        Roots {
            ledger: Ledger::with_capacity(settings.message_timeout, capacity.min(1 << 20)),
            ids: EdgeIds::new(),
            keep_payloads: replayable || matches!(settings.failure, FailurePolicy::Retry { .. }),
            policy: settings.failure.clone(),
            timeout: settings.message_timeout,
            replays: BinaryHeap::new(),
            replay_seq: 0,
            admitted: Vec::new(),
            sources,
            events: None,
        }
    }

    /// Records every root's end in [`Roots::take_events`] (for tests).
    pub fn record_events(&mut self) {
        self.events = Some(Vec::new());
    }

    /// The notifier the driver of source `src` waits on.
    pub fn driver_waker(&self, src: SourceIdx) -> Arc<Notify> {
        self.sources[src].driver.clone()
    }

    /// The number of sources.
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// The tasks the roots of source `src` are delivered to.
    pub fn feeds(&self, src: SourceIdx) -> &[TaskIdx] {
        &self.sources[src].feeds
    }

    /// Roots in flight of every source, replays waiting included.
    pub fn in_flight(&self) -> usize {
        self.ledger.len() + self.replays.len()
    }

    /// Roots in flight of source `src`, replays waiting included: what its
    /// `max_pending` caps.
    pub fn in_flight_of(&self, src: SourceIdx) -> usize {
        self.sources[src].in_flight
    }

    /// The current ledger time.
    pub fn now(&self) -> Tick {
        self.ledger.now()
    }

    /// The edge id generator of this process's routing.
    pub fn ids(&mut self) -> &mut EdgeIds {
        &mut self.ids
    }

    /// True while `root` is in flight.
    pub fn is_live(&self, root: RootId) -> bool {
        self.ledger.is_live(root)
    }

    /// Records that a message of `root` is being sent to the worker slots
    /// `slots` (the server, sending a root to the root task).
    pub fn mark(&mut self, root: RootId, slots: SlotMask) -> bool {
        self.ledger.mark(root, slots)
    }

    /// Admits messages polled from source `src` as roots; their deliveries
    /// (one per task the source feeds) wait in [`Roots::take_admitted`].
    pub fn admit(&mut self, src: SourceIdx, msgs: Vec<SourceMsg>) {
        let now = self.ledger.now();
        let per = &mut self.sources[src];
        per.metrics.polled.add(msgs.len() as u64);
        per.in_flight += msgs.len();
        self.admitted.reserve(msgs.len() * per.feeds.len());
        for SourceMsg { id, msg } in msgs {
            let tag = RootTag {
                src: src as u16,
                source: id,
                payload: self.keep_payloads.then(|| msg.clone()),
                attempts: 1,
                losses: 0,
            };
            self.admit_root(tag, msg, now);
        }
    }

    /// Enters a root in the ledger with one delivery per task its source
    /// feeds; the root's tree starts as the XOR of those deliveries' edges.
    fn admit_root(&mut self, tag: RootTag, msg: Msg, now: Tick) {
        let src = usize::from(tag.src);
        let start = self.admitted.len();
        let mut xor = 0;
        let feeds = &self.sources[src].feeds;
        let mut msg = Some(msg);
        for (i, &task) in feeds.iter().enumerate() {
            let edge = self.ids.next_id();
            xor ^= edge;
            // The last delivery takes the message, the others a copy.
            let msg = if i + 1 == feeds.len() {
                msg.take()
            } else {
                msg.clone()
            }
            .unwrap_or_default();
            self.admitted.push((
                task,
                Delivery {
                    root: RootId(0),
                    edge,
                    msg,
                },
            ));
        }
        let root = self.ledger.admit(tag, xor, now);
        for (_, d) in &mut self.admitted[start..] {
            d.root = root;
        }
    }

    /// Moves the deliveries of the roots admitted or replayed since the last
    /// call into `into`, in admission order, each with the task it goes to.
    pub fn take_admitted(&mut self, into: &mut Vec<(TaskIdx, Delivery)>) {
        into.append(&mut self.admitted);
    }

    /// Drains the deliveries of the roots admitted or replayed since the
    /// last call, in admission order, each with the task it goes to.
    pub fn drain_admitted(&mut self) -> std::vec::Drain<'_, (TaskIdx, Delivery)> {
        self.admitted.drain(..)
    }

    /// True when admitted roots wait to be sent.
    pub fn has_admitted(&self) -> bool {
        !self.admitted.is_empty()
    }

    /// Applies one ack report (see [`Ledger::ack`]). Returns true when it
    /// completed the root.
    pub fn ack(&mut self, root: RootId, xor: u64, slots: SlotMask, now: Tick) -> bool {
        match self.ledger.ack(root, xor, slots, now) {
            Settled::Complete(tag, age) => {
                self.complete(tag, age);
                true
            }
            Settled::Pending | Settled::Stale => false,
        }
    }

    /// Wakes every source's driver (after a round of acks completed roots,
    /// or when the runtime has room again).
    pub fn wake_driver(&self) {
        for s in &self.sources {
            s.driver.notify_one();
        }
    }

    /// Fails a live root at once, as if a task had returned `error` for it.
    /// Returns false for a root no longer in flight.
    pub fn fail_root(&mut self, root: RootId, error: &TaskError) -> bool {
        let now = self.ledger.now();
        match self.ledger.remove(root, now) {
            Some((tag, _)) => {
                let src = usize::from(tag.src);
                self.sources[src].metrics.failed.inc();
                self.fail(tag, error);
                self.sources[src].driver.notify_one();
                true
            }
            None => false,
        }
    }

    /// A worker (or a peer link) that held or had been sent messages of the
    /// roots touching `slots` is lost: those roots are replayed at once,
    /// without counting an attempt and whatever the policy, up to
    /// [`MAX_FREE_LOSSES`] crashes each. Returns how many roots were lost.
    pub fn lose(&mut self, slots: SlotMask, why: &str, loss: Loss) -> usize {
        let mut lost = Vec::new();
        let n = self.ledger.remove_touching(slots, |_, tag| lost.push(tag));
        for tag in lost {
            self.replay_lost(tag, why, loss);
        }
        if n > 0 {
            self.wake_driver();
        }
        n
    }

    /// [`Roots::lose`] for one root whose message went to a worker that had
    /// already gone. Returns false for a root no longer in flight.
    pub fn lose_root(&mut self, root: RootId, why: &str) -> bool {
        let now = self.ledger.now();
        match self.ledger.remove(root, now) {
            Some((tag, _)) => {
                let src = usize::from(tag.src);
                self.replay_lost(tag, why, Loss::Crash);
                self.sources[src].driver.notify_one();
                true
            }
            None => false,
        }
    }

    fn replay_lost(&mut self, mut tag: RootTag, why: &str, loss: Loss) {
        let per = &self.sources[usize::from(tag.src)];
        per.metrics.lost.inc();
        let crash = loss == Loss::Crash;
        if (crash && tag.losses >= MAX_FREE_LOSSES) || tag.payload.is_none() {
            per.metrics.failed.inc();
            let err = TaskError::new(format!(
                "{why} (lost with a worker {} times)",
                u32::from(tag.losses) + 1
            ));
            self.fail(tag, &err);
            return;
        }
        let reason = FailReason {
            message: why.to_owned(),
            attempts: tag.attempts,
        };
        if crash {
            tag.losses += 1;
        }
        let id = tag.source;
        let msg = tag.payload.clone().unwrap_or_default();
        self.admit_root(tag, msg, self.ledger.now());
        self.record_failure(id, reason, FailAction::Lost);
    }

    fn complete(&mut self, tag: RootTag, age: Duration) {
        let per = &mut self.sources[usize::from(tag.src)];
        per.metrics.acked.inc();
        per.metrics.complete_latency.record(age.as_micros() as u64);
        per.work.acks.push(tag.source);
        per.in_flight = per.in_flight.saturating_sub(1);
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
        let per = &mut self.sources[usize::from(tag.src)];
        let action = match &self.policy {
            FailurePolicy::BestEffort => {
                per.work.acks.push(tag.source);
                FailAction::AckedAnyway
            }
            FailurePolicy::None => {
                per.work.releases.push((tag.source, reason.clone()));
                FailAction::LeftUnacked
            }
            FailurePolicy::Retry { .. } => match self.policy.replay_delay(tag.attempts) {
                Some(delay) if error.is_retryable() && tag.payload.is_some() => {
                    per.metrics.retried.inc();
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
                    per.metrics.dead_lettered.inc();
                    per.work.fails.push((tag.source, reason.clone()));
                    FailAction::DeadLettered
                }
            },
        };
        // It leaves for good: the source hears of it.
        per.in_flight = per.in_flight.saturating_sub(1);
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
                self.sources[usize::from(tag.src)].metrics.timed_out.inc();
                self.fail(tag, &err);
            }
        }
        let wall = Instant::now();
        while self.replays.peek().is_some_and(|r| r.0.due <= wall) {
            let Some(Reverse(Replay { tag, .. })) = self.replays.pop() else {
                break;
            };
            let msg = tag.payload.clone().unwrap_or_default();
            self.admit_root(tag, msg, now);
        }
        for per in &self.sources {
            per.metrics.in_flight.set(per.in_flight as f64);
        }
        let next_timeout = self.ledger.next_deadline(now).unwrap_or(self.timeout);
        let next_replay = self
            .replays
            .peek()
            .map_or(Duration::MAX, |r| r.0.due.saturating_duration_since(wall));
        next_timeout.min(next_replay)
    }

    /// Takes the acks and fails gathered for source `src`.
    pub fn take_source_work(&mut self, src: SourceIdx) -> SourceWork {
        std::mem::take(&mut self.sources[src].work)
    }

    /// True when there is work waiting for source `src`.
    pub fn has_source_work(&self, src: SourceIdx) -> bool {
        !self.sources[src].work.is_empty()
    }

    /// Takes the root events recorded so far.
    pub fn take_events(&mut self) -> Vec<RootEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

/// What the source drivers need of a runtime: its [`Roots`], and a place
/// for the roots they admit. The standalone hub queues them for in-process
/// instances; the topology server sends them to the workers of the tasks
/// their source feeds.
pub trait Admission: Send + 'static {
    /// The roots.
    fn roots(&mut self) -> &mut Roots;

    /// Sends what [`Roots::take_admitted`] holds towards the tasks it names.
    fn dispatch(&mut self);

    /// How many more roots of source `src` could be admitted now without
    /// queueing beyond the runtime's bounds (before `max_pending`, which the
    /// driver applies).
    fn room(&self, _src: SourceIdx) -> usize {
        usize::MAX
    }

    /// Admits messages polled from source `src` and dispatches them.
    fn admit(&mut self, src: SourceIdx, msgs: Vec<SourceMsg>) {
        self.roots().admit(src, msgs);
        self.dispatch();
    }

    /// Sweeps timeouts and due replays (dispatching the replays). Returns
    /// when it next needs to run.
    fn sweep(&mut self) -> Duration {
        let next = self.roots().sweep();
        if self.roots().has_admitted() {
            self.dispatch();
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_core::ledger::slot_bit;

    fn one_source() -> Vec<DagSource> {
        vec![DagSource {
            name: "default".into(),
            feeds: vec![TaskIdx(0)],
        }]
    }

    fn roots(policy: FailurePolicy, replayable: bool) -> Roots {
        let mut settings = Settings::new("r");
        settings.failure = policy;
        let mut r = Roots::new(&settings, &Registry::default(), replayable, &one_source());
        r.record_events();
        r
    }

    fn take(r: &mut Roots) -> Vec<Delivery> {
        let mut out = Vec::new();
        r.take_admitted(&mut out);
        out.into_iter().map(|(_, d)| d).collect()
    }

    fn admit(r: &mut Roots, n: u64) -> Vec<Delivery> {
        r.admit(0, (0..n).map(|i| SourceMsg::new(i, vec![b'x'])).collect());
        take(r)
    }

    #[test]
    fn a_lost_worker_replays_its_roots_at_once_whatever_the_policy() {
        for policy in [FailurePolicy::BestEffort, FailurePolicy::None] {
            let mut r = roots(policy, true);
            let d = admit(&mut r, 3);
            let bit = slot_bit(1, 0);
            r.mark(d[0].root, slot_bit(0, 0));
            r.ack(d[1].root, d[1].edge ^ 99, bit, r.now());
            r.mark(d[2].root, bit);
            assert_eq!(r.lose(bit, "worker x lost", Loss::Crash), 2);
            let again = take(&mut r);
            assert_eq!(again.len(), 2, "replayed at once, no back-off");
            assert!(!r.is_live(d[1].root) && r.is_live(again[0].root));
            assert_eq!(r.in_flight(), 3);
            assert!(
                r.take_source_work(0).is_empty(),
                "nothing acked or released"
            );
            let ev = r.take_events();
            assert!(ev.iter().all(|e| matches!(
                e,
                RootEvent::Failed {
                    action: FailAction::Lost,
                    ..
                }
            )));
            // The replay completes like any root and keeps its attempt count.
            assert!(r.ack(again[0].root, again[0].edge, 0, r.now()));
            assert_eq!(
                r.take_events(),
                [RootEvent::Acked {
                    id: SourceId::from(1u64),
                    attempts: 1
                }]
            );
        }
    }

    #[test]
    fn each_root_goes_back_to_its_own_source() {
        let sources = [
            DagSource {
                name: "orders".into(),
                feeds: vec![TaskIdx(0), TaskIdx(1)],
            },
            DagSource {
                name: "refunds".into(),
                feeds: vec![TaskIdx(1)],
            },
        ];
        let mut settings = Settings::new("r");
        settings.failure = FailurePolicy::None;
        let registry = Registry::default();
        let mut r = Roots::new(&settings, &registry, false, &sources);
        r.admit(0, vec![SourceMsg::new(7u64, "o")]);
        r.admit(
            1,
            vec![SourceMsg::new(7u64, "r"), SourceMsg::new(8u64, "r2")],
        );
        let mut d = Vec::new();
        r.take_admitted(&mut d);
        // One delivery per task the source feeds; one tree per root.
        let tasks: Vec<(TaskIdx, &str)> = d
            .iter()
            .map(|(t, d)| (*t, d.msg.payload_str().unwrap_or_default()))
            .collect();
        assert_eq!(
            tasks,
            [
                (TaskIdx(0), "o"),
                (TaskIdx(1), "o"),
                (TaskIdx(1), "r"),
                (TaskIdx(1), "r2")
            ]
        );
        assert_eq!(d[0].1.root, d[1].1.root);
        assert_eq!(
            (r.in_flight_of(0), r.in_flight_of(1), r.in_flight()),
            (1, 2, 3)
        );

        // The order's root completes only when both its deliveries are acked.
        assert!(!r.ack(d[0].1.root, d[0].1.edge, 0, r.now()));
        assert!(r.ack(d[1].1.root, d[1].1.edge, 0, r.now()));
        assert_eq!(r.take_source_work(0).acks, [SourceId::from(7u64)]);
        assert!(r.take_source_work(1).is_empty(), "refunds heard nothing");
        // A refund fails: released at its own source only.
        assert!(r.fail_root(d[3].1.root, &TaskError::new("bad")));
        let work = r.take_source_work(1);
        assert_eq!(work.releases.len(), 1);
        assert_eq!(work.releases[0].0, SourceId::from(8u64));
        assert!(r.take_source_work(0).is_empty());
        assert_eq!((r.in_flight_of(0), r.in_flight_of(1)), (0, 1));

        r.sweep();
        let snap = registry.snapshot();
        assert_eq!(
            snap.counter("tempest_source_acked", &[("source", "orders")]),
            1
        );
        assert_eq!(
            snap.counter("tempest_source_polled", &[("source", "refunds")]),
            2
        );
        assert_eq!(
            snap.counter("tempest_source_failed", &[("source", "refunds")]),
            1
        );
        assert_eq!(
            snap.gauge("tempest_roots_in_flight", &[("source", "refunds")]),
            Some(1.0)
        );
    }

    #[test]
    fn a_root_lost_too_often_goes_to_the_policy() {
        let mut r = roots(FailurePolicy::retry(1), true);
        let bit = slot_bit(0, 0);
        let mut d = admit(&mut r, 1);
        for _ in 0..MAX_FREE_LOSSES {
            r.mark(d[0].root, bit);
            assert_eq!(r.lose(bit, "lost", Loss::Crash), 1);
            d = take(&mut r);
            assert_eq!(d.len(), 1);
        }
        // Departures are free however many.
        for _ in 0..10 {
            r.mark(d[0].root, bit);
            assert_eq!(r.lose(bit, "left", Loss::Departure), 1);
            d = take(&mut r);
        }
        r.mark(d[0].root, bit);
        r.lose(bit, "lost", Loss::Crash);
        let work = r.take_source_work(0);
        assert_eq!(work.fails.len(), 1, "dead-lettered: {work:?}");
        assert!(work.fails[0]
            .1
            .message
            .contains("lost with a worker 4 times"));
    }
}
