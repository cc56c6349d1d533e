//! Roots: admission, the ack ledger, the failure policy and replays.
//!
//! Both runtimes of a topology keep their roots here: the standalone hub
//! (which routes messages in process) and the topology server (whose workers
//! route them among themselves and send ack reports). `Roots` admits polled
//! messages as roots and leaves their first delivery in
//! [`Roots::take_admitted`] for the caller to send to the root task; applies
//! ack reports; hands failed and timed-out roots to the failure policy;
//! replays roots whose worker was lost; and gathers what the source must
//! hear (acks, fails, releases) for the driver. It does no I/O and never
//! waits.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tempest_core::ledger::{EdgeIds, Ledger, RootId, Settled, SlotMask, Tick};
use tempest_core::metrics::{catalog, Counter, Gauge, Histogram, Labels, Registry};
use tempest_core::{
    Delivery, FailReason, FailurePolicy, Msg, Settings, SourceId, SourceMsg, TaskError,
};

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
    admitted: Vec<Delivery>,
    work: SourceWork,
    /// Wakes the source driver when there is source work or room to poll.
    driver: Arc<Notify>,
    events: Option<Vec<RootEvent>>,
    metrics: RootMetrics,
}

impl Roots {
    /// Roots under `settings`, recording metrics in `registry`. With
    /// `replayable`, every root's message is kept until it completes, so a
    /// root lost with a worker can be replayed whatever the policy (the
    /// topology server); otherwise only the retry policy keeps them.
    pub fn new(settings: &Settings, registry: &Registry, replayable: bool) -> Self {
        let none = Labels::default();
        Roots {
            ledger: Ledger::with_capacity(
                settings.message_timeout,
                settings.max_pending.min(1 << 20),
            ),
            ids: EdgeIds::new(),
            keep_payloads: replayable || matches!(settings.failure, FailurePolicy::Retry { .. }),
            policy: settings.failure.clone(),
            timeout: settings.message_timeout,
            replays: BinaryHeap::new(),
            replay_seq: 0,
            admitted: Vec::new(),
            work: SourceWork::default(),
            driver: Arc::new(Notify::new()),
            events: None,
            metrics: RootMetrics {
                polled: registry.counter(&catalog::SOURCE_POLLED, &none),
                acked: registry.counter(&catalog::SOURCE_ACKED, &none),
                failed: registry.counter(&catalog::SOURCE_FAILED, &none),
                timed_out: registry.counter(&catalog::SOURCE_TIMED_OUT, &none),
                dead_lettered: registry.counter(&catalog::SOURCE_DEAD_LETTERED, &none),
                retried: registry.counter(&catalog::SOURCE_RETRIED, &none),
                lost: registry.counter(&catalog::ROOTS_LOST, &none),
                in_flight: registry.gauge(&catalog::ROOTS_IN_FLIGHT, &none),
                complete_latency: registry.histogram(&catalog::ROOT_COMPLETE_LATENCY, &none),
            },
        }
    }

    /// Records every root's end in [`Roots::take_events`] (for tests).
    pub fn record_events(&mut self) {
        self.events = Some(Vec::new());
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

    /// Admits polled messages as roots; their deliveries wait in
    /// [`Roots::take_admitted`].
    pub fn admit(&mut self, msgs: Vec<SourceMsg>) {
        let now = self.ledger.now();
        self.metrics.polled.add(msgs.len() as u64);
        self.admitted.reserve(msgs.len());
        for SourceMsg { id, msg } in msgs {
            let tag = RootTag {
                source: id,
                payload: self.keep_payloads.then(|| msg.clone()),
                attempts: 1,
                losses: 0,
            };
            self.admit_root(tag, msg, now);
        }
    }

    fn admit_root(&mut self, tag: RootTag, msg: Msg, now: Tick) {
        let edge = self.ids.next_id();
        let root = self.ledger.admit(tag, edge, now);
        self.admitted.push(Delivery { root, edge, msg });
    }

    /// Moves the deliveries of the roots admitted or replayed since the last
    /// call into `into`, in admission order.
    pub fn take_admitted(&mut self, into: &mut Vec<Delivery>) {
        into.append(&mut self.admitted);
    }

    /// Drains the deliveries of the roots admitted or replayed since the
    /// last call, in admission order.
    pub fn drain_admitted(&mut self) -> std::vec::Drain<'_, Delivery> {
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

    /// Wakes the driver after a round of acks completed roots.
    pub fn wake_driver(&self) {
        self.driver.notify_one();
    }

    /// Fails a live root at once, as if a task had returned `error` for it.
    /// Returns false for a root no longer in flight.
    pub fn fail_root(&mut self, root: RootId, error: &TaskError) -> bool {
        let now = self.ledger.now();
        match self.ledger.remove(root, now) {
            Some((tag, _)) => {
                self.metrics.failed.inc();
                self.fail(tag, error);
                self.driver.notify_one();
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
            self.driver.notify_one();
        }
        n
    }

    /// [`Roots::lose`] for one root whose message went to a worker that had
    /// already gone. Returns false for a root no longer in flight.
    pub fn lose_root(&mut self, root: RootId, why: &str) -> bool {
        let now = self.ledger.now();
        match self.ledger.remove(root, now) {
            Some((tag, _)) => {
                self.replay_lost(tag, why, Loss::Crash);
                self.driver.notify_one();
                true
            }
            None => false,
        }
    }

    fn replay_lost(&mut self, mut tag: RootTag, why: &str, loss: Loss) {
        self.metrics.lost.inc();
        let crash = loss == Loss::Crash;
        if (crash && tag.losses >= MAX_FREE_LOSSES) || tag.payload.is_none() {
            self.metrics.failed.inc();
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
        while self.replays.peek().is_some_and(|r| r.0.due <= wall) {
            let Some(Reverse(Replay { tag, .. })) = self.replays.pop() else {
                break;
            };
            let msg = tag.payload.clone().unwrap_or_default();
            self.admit_root(tag, msg, now);
        }
        self.metrics.in_flight.set(self.in_flight() as f64);
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
}

/// What the source driver needs of a runtime: its [`Roots`], and a place for
/// the roots it admits. The standalone hub queues them for in-process
/// instances; the topology server sends them to the root task's workers.
pub trait Admission: Send + 'static {
    /// The roots.
    fn roots(&mut self) -> &mut Roots;

    /// Sends what [`Roots::take_admitted`] holds towards the root task.
    fn dispatch(&mut self);

    /// How many more roots could be admitted now without queueing beyond the
    /// runtime's bounds (before `max_pending`, which the driver applies).
    fn room(&self) -> usize {
        usize::MAX
    }

    /// Admits polled messages and dispatches them.
    fn admit(&mut self, msgs: Vec<SourceMsg>) {
        self.roots().admit(msgs);
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

    fn roots(policy: FailurePolicy, replayable: bool) -> Roots {
        let mut settings = Settings::new("r");
        settings.failure = policy;
        let mut r = Roots::new(&settings, &Registry::default(), replayable);
        r.record_events();
        r
    }

    fn admit(r: &mut Roots, n: u64) -> Vec<Delivery> {
        r.admit((0..n).map(|i| SourceMsg::new(i, vec![b'x'])).collect());
        let mut out = Vec::new();
        r.take_admitted(&mut out);
        out
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
            let mut again = Vec::new();
            r.take_admitted(&mut again);
            assert_eq!(again.len(), 2, "replayed at once, no back-off");
            assert!(!r.is_live(d[1].root) && r.is_live(again[0].root));
            assert_eq!(r.in_flight(), 3);
            assert!(r.take_source_work().is_empty(), "nothing acked or released");
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
    fn a_root_lost_too_often_goes_to_the_policy() {
        let mut r = roots(FailurePolicy::retry(1), true);
        let bit = slot_bit(0, 0);
        let mut d = admit(&mut r, 1);
        for _ in 0..MAX_FREE_LOSSES {
            r.mark(d[0].root, bit);
            assert_eq!(r.lose(bit, "lost", Loss::Crash), 1);
            d.clear();
            r.take_admitted(&mut d);
            assert_eq!(d.len(), 1);
        }
        // Departures are free however many.
        for _ in 0..10 {
            r.mark(d[0].root, bit);
            assert_eq!(r.lose(bit, "left", Loss::Departure), 1);
            d.clear();
            r.take_admitted(&mut d);
        }
        r.mark(d[0].root, bit);
        r.lose(bit, "lost", Loss::Crash);
        let work = r.take_source_work();
        assert_eq!(work.fails.len(), 1, "dead-lettered: {work:?}");
        assert!(work.fails[0]
            .1
            .message
            .contains("lost with a worker 4 times"));
    }
}
