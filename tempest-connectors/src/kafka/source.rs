//! [`KafkaSource`]: a member of a Kafka consumer group that commits, per
//! partition, the low watermark of acked offsets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tempest_core::source::SOURCE_CONSUMER_ENV;
use tempest_core::sources::SourceStats;
use tempest_core::watermark::Watermark;
use tempest_core::{
    async_trait, ConfigError, FailReason, FromConfig, Health, Msg, Polled, Settings, Source,
    SourceError, SourceErrorKind, SourceId, SourceMsg,
};

use super::config::{KafkaSourceConfig, RecordFormat};
use super::record::KafkaRecord;

/// How long a metadata request (the connectivity check of `connect` and
/// `health`) may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(3);

/// How long writing a record to the dead-letter topic may take.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// How often every assigned partition's low watermark is committed again,
/// changed or not. librdkafka reports nothing of an asynchronous commit
/// made with `rd_kafka_commit` (rdkafka sets no `offset_commit_cb`), so a
/// commit lost to a broker outage would otherwise stay lost until the
/// partition's watermark moves again: at the end of a stream, never. (The
/// Java client's auto-commit does the same, every 5 s.)
const RECOMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// Headers added to a dead-lettered record (after its own).
pub const REASON_HEADER: &str = "tempest.reason";
/// How many times the record was tried.
pub const ATTEMPTS_HEADER: &str = "tempest.attempts";
/// Where the record was read: `<topic>/<partition>/<offset>`.
pub const SOURCE_HEADER: &str = "tempest.source";

/// Counters specific to a Kafka source (a cheap shared handle, like
/// [`SourceStats`]).
#[derive(Clone, Debug, Default)]
pub struct KafkaStats {
    inner: Arc<KafkaCounters>,
}

#[derive(Debug, Default)]
struct KafkaCounters {
    connects: AtomicU64,
    commits: AtomicU64,
    commit_errors: AtomicU64,
    assigned: AtomicU64,
    revoked: AtomicU64,
    dropped_in_flight: AtomicU64,
    left_uncommitted: AtomicU64,
    completed_in_grace: AtomicU64,
    graces_expired: AtomicU64,
    skipped_revoking: AtomicU64,
    stale_acks: AtomicU64,
    dead_lettered: AtomicU64,
}

impl KafkaStats {
    /// Successful connectivity checks at `connect` (the first and every
    /// reconnect).
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }
    /// Commits sent (one per batch of partitions whose watermark moved).
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }
    /// Commits that could not be sent (the offsets are committed again
    /// with the next ack or poll). A commit sent and then refused or lost
    /// is not seen here (librdkafka reports nothing of an asynchronous
    /// commit to this client): every partition's watermark is committed
    /// again every 5 s instead.
    pub fn commit_errors(&self) -> u64 {
        self.inner.commit_errors.load(Ordering::Relaxed)
    }
    /// Partitions assigned to this member (counted at every rebalance).
    pub fn assigned(&self) -> u64 {
        self.inner.assigned.load(Ordering::Relaxed)
    }
    /// Partitions revoked from this member.
    pub fn revoked(&self) -> u64 {
        self.inner.revoked.load(Ordering::Relaxed)
    }
    /// Records still in flight when their partition was let go (after the
    /// revocation's grace): left uncommitted for the partition's next owner
    /// to read again.
    pub fn dropped_in_flight(&self) -> u64 {
        self.inner.dropped_in_flight.load(Ordering::Relaxed)
    }
    /// Records handed out and not under the committed watermark when their
    /// partition was let go (in flight, or done after one in flight):
    /// what the partition's next owner reads again.
    pub fn left_uncommitted(&self) -> u64 {
        self.inner.left_uncommitted.load(Ordering::Relaxed)
    }
    /// Records in flight when their partition was revoked that completed
    /// within the revocation's grace: committed here, not read again by
    /// the partition's next owner.
    pub fn completed_in_grace(&self) -> u64 {
        self.inner.completed_in_grace.load(Ordering::Relaxed)
    }
    /// Revocations whose grace ran out with records still in flight.
    pub fn graces_expired(&self) -> u64 {
        self.inner.graces_expired.load(Ordering::Relaxed)
    }
    /// Records received from a partition while it was being revoked (in
    /// its grace): not admitted, its next owner reads them.
    pub fn skipped_revoking(&self) -> u64 {
        self.inner.skipped_revoking.load(Ordering::Relaxed)
    }
    /// Acks of records whose partition was revoked since they were read
    /// (ignored: the next owner reads them again).
    pub fn stale_acks(&self) -> u64 {
        self.inner.stale_acks.load(Ordering::Relaxed)
    }
    /// Records written to the dead-letter topic.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.dead_lettered.load(Ordering::Relaxed)
    }
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A record handed out and not yet settled: what `fail` writes to the
/// dead-letter topic.
struct Held {
    key: Option<Bytes>,
    value: Bytes,
    headers: Option<OwnedHeaders>,
    timestamp: Option<i64>,
}

/// One assigned partition.
struct Part {
    /// Which assignment this is: ids of an earlier one are stale.
    epoch: u32,
    /// Set at the first record of this assignment (where reading resumed).
    watermark: Option<Watermark<i64>>,
    /// The offset last committed (or where reading resumed); -1 when
    /// unknown (a commit failed), so the next commit is sent anyway.
    committed: i64,
    held: HashMap<i64, Held>,
    /// Records released (policy `none`): in flight for good, nobody acks
    /// them, so a revocation does not wait for them.
    released: usize,
    /// Revoked by the group, waiting for its records in flight (the
    /// grace): nothing more is admitted from it.
    revoking: bool,
}

impl Part {
    /// Records in flight that an ack or a fail may still complete.
    fn awaited(&self) -> usize {
        self.watermark
            .as_ref()
            .map_or(0, |w| w.in_flight().saturating_sub(self.released))
    }
}

/// A revocation in its grace: the group took these partitions away, and
/// librdkafka waits (the partitions paused, the member heartbeating) until
/// the source lets them go with `unassign` / `incremental_unassign`.
struct Revocation {
    /// The revoked partitions, by slot.
    slots: Vec<u32>,
    started: Instant,
    deadline: Instant,
    /// What was awaited when the revocation began.
    awaited: usize,
}

/// The source's book of partitions, shared with the consumer's callbacks
/// (rebalances and commit results), which librdkafka runs on the thread
/// that polls the consumer, inside [`Source::poll`].
#[derive(Default)]
struct Book {
    /// Every partition seen, by slot (the high half of an id names it).
    slots: Vec<(Arc<str>, i32)>,
    slot_of: HashMap<Arc<str>, HashMap<i32, u32>>,
    /// The partitions assigned now, by slot.
    parts: Vec<Option<Part>>,
    next_epoch: u32,
    /// The grace of a revocation (`revoke_grace_ms`, at most the
    /// topology's grace period once configured).
    grace: Duration,
    /// The revocation in its grace, if any.
    revocation: Option<Revocation>,
    /// Set when the consumer is being closed: a revocation then lets go at
    /// once (closing waits for it, and nothing will ack any more).
    closing: bool,
    /// When every partition's watermark is committed again
    /// ([`RECOMMIT_INTERVAL`]).
    recommit_at: Option<Instant>,
}

impl Book {
    fn find(&self, topic: &str, partition: i32) -> Option<u32> {
        self.slot_of.get(topic)?.get(&partition).copied()
    }

    fn slot(&mut self, topic: &str, partition: i32) -> u32 {
        if let Some(s) = self.find(topic, partition) {
            return s;
        }
        let s = self.slots.len() as u32;
        let topic: Arc<str> = Arc::from(topic);
        self.slots.push((topic.clone(), partition));
        self.parts.push(None);
        self.slot_of.entry(topic).or_default().insert(partition, s);
        s
    }

    fn part_mut(&mut self, slot: u32, epoch: u32) -> Option<&mut Part> {
        self.parts
            .get_mut(slot as usize)?
            .as_mut()
            .filter(|p| p.epoch == epoch)
    }

    fn assign(&mut self, tpl: &TopicPartitionList, stats: &KafkaStats) {
        for e in tpl.elements() {
            let slot = self.slot(e.topic(), e.partition());
            self.next_epoch = self.next_epoch.wrapping_add(1);
            self.parts[slot as usize] = Some(Part {
                epoch: self.next_epoch,
                watermark: None,
                committed: -1,
                held: HashMap::new(),
                released: 0,
                revoking: false,
            });
        }
        KafkaStats::add(&stats.inner.assigned, tpl.count());
    }

    /// Starts the grace of a revocation of `tpl`: its partitions admit
    /// nothing more, and the source waits for their records in flight.
    fn begin_revocation(&mut self, tpl: &TopicPartitionList, now: Instant) {
        let slots = self.slots_of(tpl);
        for &slot in &slots {
            if let Some(part) = self.parts[slot as usize].as_mut() {
                part.revoking = true;
            }
        }
        let mut r = Revocation {
            slots,
            started: now,
            deadline: now + self.grace,
            awaited: 0,
        };
        r.awaited = self.awaited(&r);
        self.revocation = Some(r);
    }

    /// The slots of the partitions of `tpl`.
    fn slots_of(&mut self, tpl: &TopicPartitionList) -> Vec<u32> {
        tpl.elements()
            .iter()
            .map(|e| self.slot(e.topic(), e.partition()))
            .collect()
    }

    /// What the revocation in its grace still waits for.
    fn awaited(&self, revocation: &Revocation) -> usize {
        revocation
            .slots
            .iter()
            .filter_map(|&slot| self.parts.get(slot as usize)?.as_ref())
            .map(Part::awaited)
            .sum()
    }

    /// The revocation in its grace, taken when it is over: nothing awaited
    /// any more, or its deadline passed (`force`: whatever the state).
    /// Returns it with what it still waits for.
    fn revocation_over(&mut self, now: Instant, force: bool) -> Option<(Revocation, usize)> {
        let r = self.revocation.as_ref()?;
        let awaited = self.awaited(r);
        if force || awaited == 0 || now >= r.deadline {
            self.revocation.take().map(|r| (r, awaited))
        } else {
            None
        }
    }

    /// The slots of every partition assigned now.
    fn assigned_slots(&self) -> Vec<u32> {
        (0..self.parts.len() as u32)
            .filter(|&s| self.parts[s as usize].is_some())
            .collect()
    }

    /// Forgets the revoked partitions (`slots`), returning them and the
    /// commits of what completed in them.
    fn revoke(
        &mut self,
        slots: &[u32],
        stats: &KafkaStats,
    ) -> (TopicPartitionList, TopicPartitionList) {
        let mut revoked = TopicPartitionList::new();
        let mut commits = TopicPartitionList::new();
        for &slot in slots {
            let (topic, partition) = match self.slots.get(slot as usize) {
                Some((t, p)) => (t.clone(), *p),
                None => continue,
            };
            revoked.add_partition(&topic, partition);
            let Some(part) = self.parts[slot as usize].take() else {
                continue;
            };
            if let Some(w) = &part.watermark {
                KafkaStats::add(&stats.inner.dropped_in_flight, w.in_flight());
                KafkaStats::add(
                    &stats.inner.left_uncommitted,
                    w.in_flight() + w.done_past_low(),
                );
                if w.low() != part.committed {
                    let _ =
                        commits.add_partition_offset(&topic, partition, Offset::Offset(w.low()));
                }
            }
        }
        KafkaStats::add(&stats.inner.revoked, slots.len());
        (revoked, commits)
    }

    /// The commits due: partitions whose watermark passed what was
    /// committed. They count as committed from now on.
    fn due(&mut self) -> Option<TopicPartitionList> {
        let mut tpl: Option<TopicPartitionList> = None;
        for (slot, part) in self.parts.iter_mut().enumerate() {
            let Some(part) = part else { continue };
            let Some(w) = &part.watermark else { continue };
            let low = w.low();
            if low != part.committed {
                let (topic, partition) = &self.slots[slot];
                let _ = tpl
                    .get_or_insert_with(TopicPartitionList::new)
                    .add_partition_offset(topic, *partition, Offset::Offset(low));
                part.committed = low;
            }
        }
        tpl
    }

    /// Every partition's low watermark (the partitions read from), due or
    /// not: what [`RECOMMIT_INTERVAL`] sends again. They count as
    /// committed from now on.
    fn lows(&mut self) -> Option<TopicPartitionList> {
        for part in self.parts.iter_mut().flatten() {
            part.committed = -1;
        }
        self.due()
    }

    /// The commits to send now: those due, or, every
    /// [`RECOMMIT_INTERVAL`], every partition's low watermark.
    fn commits_now(&mut self, now: Instant) -> Option<TopicPartitionList> {
        match self.recommit_at {
            Some(at) if now >= at => {
                self.recommit_at = Some(now + RECOMMIT_INTERVAL);
                self.lows()
            }
            Some(_) => self.due(),
            None => {
                self.recommit_at = Some(now + RECOMMIT_INTERVAL);
                self.due()
            }
        }
    }

    /// A commit failed: these partitions are committed again next time.
    fn commit_failed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Some(slot) = self.find(e.topic(), e.partition()) {
                if let Some(part) = self.parts[slot as usize].as_mut() {
                    part.committed = -1;
                }
            }
        }
    }
}

fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    book.lock().unwrap_or_else(|e| e.into_inner())
}

/// A record's id: the partition's slot and the assignment's epoch in the
/// high half, the offset in the low half.
fn encode_id(slot: u32, epoch: u32, offset: i64) -> SourceId {
    SourceId::from_parts((u64::from(slot) << 32) | u64::from(epoch), offset as u64)
}

fn decode_id(id: SourceId) -> (u32, u32, i64) {
    let (hi, lo) = id.parts();
    ((hi >> 32) as u32, hi as u32, lo as i64)
}

/// The consumer's context: rebalances, commit results and librdkafka's log.
struct Context {
    book: Arc<Mutex<Book>>,
    stats: KafkaStats,
    group: String,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", "{fac}: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac}: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", group = %self.group, "{error}: {reason}");
    }
}

impl ConsumerContext for Context {
    /// Replaces rdkafka's default (assign or unassign at once): an
    /// assignment is taken at once, but a revocation may wait for its
    /// grace, ended by [`settle_revocation`] from a later poll or ack.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        // librdkafka starts no rebalance before the last revocation was let
        // go; should one come anyway, the last one ends now.
        settle_revocation(consumer, &self.book, &self.stats, &self.group, true);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let taken = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
                    _ => consumer.assign(tpl),
                };
                if let Err(e) = taken {
                    tracing::warn!(group = %self.group, "taking the assignment: {e}");
                }
                lock(&self.book).assign(tpl, &self.stats);
                let names: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                tracing::info!(group = %self.group, partitions = ?names, "partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                let (waiting, grace, slots) = {
                    let mut book = lock(&self.book);
                    if lost || book.closing || book.grace.is_zero() {
                        (0, book.grace, book.slots_of(tpl))
                    } else {
                        book.begin_revocation(tpl, Instant::now());
                        match book.revocation_over(Instant::now(), false) {
                            Some((r, _)) => (0, book.grace, r.slots),
                            None => (
                                book.revocation.as_ref().map_or(0, |r| r.awaited),
                                book.grace,
                                Vec::new(),
                            ),
                        }
                    }
                };
                if waiting > 0 {
                    tracing::info!(
                        group = %self.group,
                        partitions = tpl.count(),
                        in_flight = waiting,
                        ?grace,
                        "partitions revoked: admitting nothing more from them, waiting for \
                         their records in flight before committing"
                    );
                } else {
                    if lost {
                        tracing::warn!(
                            group = %self.group,
                            "the assignment was lost (session timed out): its offsets cannot \
                             be committed, the next owner reads what was not"
                        );
                    } else {
                        tracing::info!(
                            group = %self.group,
                            partitions = tpl.count(),
                            "partitions revoked with nothing in flight: committing and letting \
                             them go"
                        );
                    }
                    let_go(consumer, &self.book, &self.stats, &self.group, &slots, lost);
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::warn!(group = %self.group, "rebalance: {code}");
                // As rdkafka's default: let go of what the error names
                // (everything, with the eager protocol).
                let slots = {
                    let mut book = lock(&self.book);
                    match consumer.rebalance_protocol() {
                        RebalanceProtocol::Cooperative => book.slots_of(tpl),
                        _ => book.assigned_slots(),
                    }
                };
                let lost = consumer.assignment_lost();
                let_go(consumer, &self.book, &self.stats, &self.group, &slots, lost);
            }
        }
    }

    /// (Only called for commits that librdkafka reports on the consumer's
    /// queue, which `commit(.., Async)` is not: see `RECOMMIT_INTERVAL`.)
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            KafkaStats::add(&self.stats.inner.commit_errors, 1);
            lock(&self.book).commit_failed(offsets);
            tracing::warn!(group = %self.group, "commit failed (sent again with the next ack): {e}");
        }
    }
}

/// Ends the revocation in its grace if it is over: nothing in flight any
/// more in its partitions, or its deadline passed, or `force`. Then lets
/// its partitions go ([`let_go`]). Returns whether it ended.
///
/// Called from the rebalance callback (which runs inside a poll of the
/// consumer) and from the source's own poll, ack, fail and release, all on
/// the source's task: librdkafka is only ever told from there.
fn settle_revocation<C: Consumer<Context>>(
    consumer: &C,
    book: &Mutex<Book>,
    stats: &KafkaStats,
    group: &str,
    force: bool,
) -> bool {
    let now = Instant::now();
    let Some((r, left)) = lock(book).revocation_over(now, force) else {
        return false;
    };
    let completed = r.awaited.saturating_sub(left);
    KafkaStats::add(&stats.inner.completed_in_grace, completed);
    if left > 0 {
        KafkaStats::add(&stats.inner.graces_expired, 1);
    }
    tracing::info!(
        %group,
        partitions = r.slots.len(),
        waited = ?now.saturating_duration_since(r.started),
        completed,
        left,
        "revocation: committing what completed, leaving what is still in flight to the next owner"
    );
    let lost = consumer.assignment_lost();
    let_go(consumer, book, stats, group, &r.slots, lost);
    true
}

/// Lets the revoked partitions `slots` go: forgets them (later acks of
/// their records are stale), commits what completed in them unless the
/// assignment was `lost` (the group has given them away already), and
/// tells librdkafka (`unassign`, or `incremental_unassign` with the
/// cooperative protocol), which then rejoins the group.
///
/// The commit is asynchronous: librdkafka finishes an unassign, and only
/// then rejoins, once the commits sent before it are answered, so the next
/// owner reads from these offsets without this thread waiting.
fn let_go<C: Consumer<Context>>(
    consumer: &C,
    book: &Mutex<Book>,
    stats: &KafkaStats,
    group: &str,
    slots: &[u32],
    lost: bool,
) {
    let (revoked, commits) = lock(book).revoke(slots, stats);
    if commits.count() > 0 && !lost {
        KafkaStats::add(&stats.inner.commits, 1);
        if let Err(e) = consumer.commit(&commits, CommitMode::Async) {
            KafkaStats::add(&stats.inner.commit_errors, 1);
            tracing::warn!(%group, "commit at revocation failed: {e}");
        }
    }
    let released = match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(&revoked),
        _ => consumer.unassign(),
    };
    if let Err(e) = released {
        tracing::warn!(%group, "letting the revoked partitions go: {e}");
    }
}

/// A member of a Kafka consumer group: at-least-once delivery of every
/// record of its topics, committing only what is done.
///
/// **Membership.** [`Source::connect`] creates a librdkafka consumer in the
/// group `group` subscribed to `topics` (or `topic_regex`), with automatic
/// commits off, and checks that the brokers answer (a retryable connect
/// error otherwise: the runtime retries with back-off, librdkafka keeps
/// reconnecting). The group's coordinator assigns partitions to its members;
/// several topology servers in one group split the partitions.
///
/// **Messages.** A record becomes a root whose key is the record's key and
/// whose payload is its value (`format = "value"`) or a [`KafkaRecord`] with
/// its topic, partition, offset, timestamp and headers (`format =
/// "record"`). Its [`SourceId`] names the partition, the assignment and the
/// offset ([`KafkaSource::position`] reads it).
///
/// **Commits** follow acks: per partition a [`Watermark`] admits offsets as
/// they are handed out and completes them as they are acked, in any order,
/// and the source commits its low watermark (the first offset not done),
/// never an offset past a record still in flight. Commits are asynchronous
/// and sent after each ack and poll whose watermark moved; every 5 s every
/// partition's watermark is committed again, changed or not, so a commit
/// lost to a broker outage is made good once the broker is back.
///
/// **Rebalances.** When partitions are revoked the source stops admitting
/// from them and gives their records in flight a grace (`revoke_grace_ms`,
/// at most the topology's `grace_period`) to complete; then it commits what
/// completed and lets the partitions go. What did not complete stays
/// uncommitted and is read again by the next owner (its acks here are
/// ignored). See the module documentation for how the grace waits without
/// blocking acks. When partitions are assigned, reading resumes from the
/// committed offset (or `auto_offset_reset`).
///
/// **Static membership.** When `properties` has no `group.instance.id`,
/// it defaults to the environment variable [`SOURCE_CONSUMER_ENV`]
/// (`TEMPEST_SOURCE_CONSUMER`), which the agent sets on a topology server
/// to its slot's stable identity (such as `wordcount/server`): a server
/// replaced after a crash rejoins the group as the same static member and
/// gets its partitions back at once, without a rebalance, and reads again
/// from their committed offsets. A static member does not leave the group
/// when it stops: its partitions wait for it for `session.timeout.ms`
/// (librdkafka's default 45 s; set it in `properties`) before the group
/// rebalances them to the others. Unset or blank (standalone runs, servers
/// started by hand), the member is dynamic. Two Kafka sources of one
/// process reading the same group need distinct `group.instance.id`s in
/// their `properties`.
///
/// **Failures.** [`Source::fail`] (the failure policy gave up) writes the
/// record, with its key and headers, to the dead-letter topic with the
/// headers `tempest.reason`, `tempest.attempts` and `tempest.source`, and
/// only once the broker has it counts the offset done. [`Source::release`]
/// (policy `none`) leaves the offset in flight, so the partition's commit
/// stays before it until the partition is reassigned or the source
/// restarts, and the record is read again then.
pub struct KafkaSource {
    /// Which Kafka source of the process this is (from 0).
    nth: u32,
    config: KafkaSourceConfig,
    consumer: Option<Arc<StreamConsumer<Context>>>,
    dead_letters: Option<FutureProducer>,
    book: Arc<Mutex<Book>>,
    stats: SourceStats,
    kafka_stats: KafkaStats,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("brokers", &self.config.brokers)
            .field("group", &self.config.group)
            .field("subscription", &self.config.subscription())
            .field("connected", &self.consumer.is_some())
            .finish()
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // Dropping the consumer closes it, which waits for the revocation
        // in its grace: that ends now, and any later one at once.
        lock(&self.book).closing = true;
        self.settle_revocation(true);
    }
}

impl KafkaSource {
    /// A source with this configuration (checked at `configure`; nothing
    /// connects until `connect`).
    pub fn new(config: KafkaSourceConfig) -> Self {
        let book = Book {
            grace: Duration::from_millis(config.revoke_grace_ms),
            ..Book::default()
        };
        // The how-manieth Kafka source of this process: the second and later
        // ones get their own static identity (`.2`, `.3`, ...), so two
        // sources of one server in one group never fence each other.
        static SOURCES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = SOURCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        KafkaSource {
            nth,
            config,
            consumer: None,
            dead_letters: None,
            book: Arc::new(Mutex::new(book)),
            stats: SourceStats::new(),
            kafka_stats: KafkaStats::default(),
        }
    }

    /// How long a revocation waits for the revoked partitions' records in
    /// flight: `revoke_grace_ms`, and at most the topology's grace period
    /// once [`Source::configure`]d.
    pub fn revoke_grace(&self) -> Duration {
        lock(&self.book).grace
    }

    /// The partitions revoked by the group and still in their grace
    /// (waiting for their records in flight), as `(topic, partition)`.
    pub fn revoking(&self) -> Vec<(String, i32)> {
        let book = lock(&self.book);
        let mut v: Vec<(String, i32)> = book
            .revocation
            .iter()
            .flat_map(|r| r.slots.iter())
            .filter_map(|&s| book.slots.get(s as usize))
            .map(|(t, p)| (t.to_string(), *p))
            .collect();
        v.sort();
        v
    }

    /// Ends the revocation in its grace if it is over (see
    /// [`settle_revocation`]).
    fn settle_revocation(&self, force: bool) {
        if let Some(consumer) = &self.consumer {
            settle_revocation(
                consumer.as_ref(),
                &self.book,
                &self.kafka_stats,
                &self.config.group,
                force,
            );
        }
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaSourceConfig {
        &self.config
    }

    /// The message counters (a shared handle).
    pub fn stats(&self) -> SourceStats {
        self.stats.clone()
    }

    /// The Kafka-specific counters (a shared handle).
    pub fn kafka_stats(&self) -> KafkaStats {
        self.kafka_stats.clone()
    }

    /// The topic, partition and offset of a record this source handed out.
    pub fn position(&self, id: SourceId) -> Option<(String, i32, i64)> {
        let (slot, _, offset) = decode_id(id);
        let book = lock(&self.book);
        let (topic, partition) = book.slots.get(slot as usize)?;
        Some((topic.to_string(), *partition, offset))
    }

    /// The partitions assigned to this member now, as `(topic, partition)`.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        let book = lock(&self.book);
        let mut v: Vec<(String, i32)> = book
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(s, _)| (book.slots[s].0.to_string(), book.slots[s].1))
            .collect();
        v.sort();
        v
    }

    /// Per assigned partition, the offset this source would commit now (its
    /// low watermark), for partitions it has read from.
    pub fn watermarks(&self) -> Vec<((String, i32), i64)> {
        let book = lock(&self.book);
        let mut v: Vec<((String, i32), i64)> = book
            .parts
            .iter()
            .enumerate()
            .filter_map(|(s, p)| {
                let w = p.as_ref()?.watermark.as_ref()?;
                Some(((book.slots[s].0.to_string(), book.slots[s].1), w.low()))
            })
            .collect();
        v.sort();
        v
    }

    fn disconnected(&self, kind: SourceErrorKind) -> SourceError {
        SourceError::transient(kind, format!("not connected to {}", self.config.brokers))
    }

    /// Sends the commits due, asynchronously (and every
    /// [`RECOMMIT_INTERVAL`] every partition's low watermark again).
    fn commit_due(&self) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        let Some(tpl) = lock(&self.book).commits_now(Instant::now()) else {
            return;
        };
        KafkaStats::add(&self.kafka_stats.inner.commits, 1);
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            KafkaStats::add(&self.kafka_stats.inner.commit_errors, 1);
            lock(&self.book).commit_failed(&tpl);
            tracing::debug!(group = %self.config.group, "commit not sent (sent again later): {e}");
        }
    }

    /// Admits one record: a root, or nothing when its partition is not
    /// assigned here (any more) or the offset was already handed out.
    fn admit(&self, m: &BorrowedMessage<'_>) -> Option<SourceMsg> {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let mut book = lock(&self.book);
        let slot = book.find(topic, partition)?;
        let part = book.parts[slot as usize].as_mut()?;
        if part.revoking {
            // In its grace: the next owner reads it.
            KafkaStats::add(&self.kafka_stats.inner.skipped_revoking, 1);
            return None;
        }
        let watermark = match &mut part.watermark {
            Some(w) => w,
            None => {
                // Reading resumed here: what is before was committed.
                part.committed = offset;
                part.watermark.insert(Watermark::new(offset))
            }
        };
        if watermark.admit(offset).is_err() {
            tracing::debug!(
                topic,
                partition,
                offset,
                "a record read twice in one assignment: skipped"
            );
            return None;
        }
        let key = m.key().map(Bytes::copy_from_slice);
        let value = Bytes::copy_from_slice(m.payload().unwrap_or_default());
        let headers = m.headers().map(|h| h.detach());
        let timestamp = m.timestamp().to_millis();
        let payload = match self.config.format {
            RecordFormat::Value => value.clone(),
            RecordFormat::Record => KafkaRecord {
                topic: topic.to_owned(),
                partition,
                offset,
                timestamp,
                headers: headers
                    .as_ref()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                            .collect()
                    })
                    .unwrap_or_default(),
                value: value.clone(),
            }
            .encode(),
        };
        let id = encode_id(slot, part.epoch, offset);
        part.held.insert(
            offset,
            Held {
                key: key.clone(),
                value,
                headers,
                timestamp,
            },
        );
        Some(SourceMsg {
            id,
            msg: Msg::from_parts(key, payload),
        })
    }

    fn dead_letter_producer(&mut self) -> Result<FutureProducer, SourceError> {
        if let Some(p) = &self.dead_letters {
            return Ok(p.clone());
        }
        let mut c = self.config.client_config();
        c.set("enable.idempotence", "true");
        if !self.config.properties.contains_key("message.timeout.ms") {
            c.set(
                "message.timeout.ms",
                DEAD_LETTER_TIMEOUT.as_millis().to_string(),
            );
        }
        let p: FutureProducer = c.create().map_err(|e| {
            SourceError::fatal(
                SourceErrorKind::Fail,
                format!("creating the dead-letter producer: {e}"),
            )
        })?;
        self.dead_letters = Some(p.clone());
        Ok(p)
    }

    /// A metadata request: do the brokers answer?
    async fn check_brokers(&self) -> Result<(), String> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(format!("not connected to {}", self.config.brokers));
        };
        let brokers = self.config.brokers.clone();
        match tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, METADATA_TIMEOUT))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{brokers}: {e}")),
            Err(e) => Err(format!("{brokers}: metadata request: {e}")),
        }
    }
}

/// Errors of the consumer that mean the brokers cannot be reached.
fn is_connectivity(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure)
    )
}

impl FromConfig for KafkaSource {
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let config: KafkaSourceConfig = tempest_core::config::from_table(config)?;
        config.validate()?;
        Ok(KafkaSource::new(config))
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn configure(&mut self, settings: &Settings) -> Result<(), SourceError> {
        self.config
            .validate()
            .map_err(|e| SourceError::config(format!("kafka source: {e}")))?;
        let asked = Duration::from_millis(self.config.revoke_grace_ms);
        let grace = asked.min(settings.grace_period);
        if grace < asked {
            tracing::info!(
                group = %self.config.group,
                revoke_grace_ms = self.config.revoke_grace_ms,
                grace_period = ?settings.grace_period,
                "kafka source: the revocation grace is capped at the topology's grace period"
            );
        }
        lock(&self.book).grace = grace;
        tracing::debug!(
            group = %self.config.group,
            message_timeout = ?settings.message_timeout,
            revoke_grace = ?grace,
            "kafka source configured"
        );
        Ok(())
    }

    async fn connect(&mut self) -> Result<(), SourceError> {
        if self.consumer.is_none() {
            let context = Context {
                book: self.book.clone(),
                stats: self.kafka_stats.clone(),
                group: self.config.group.clone(),
            };
            // Static membership by default on a topology server (see
            // `KafkaSourceConfig::group_instance_id`).
            let stable = std::env::var(SOURCE_CONSUMER_ENV)
                .ok()
                .map(|s| match self.nth {
                    0 => s,
                    n => format!("{}.{}", s.trim(), n + 1),
                });
            let consumer_config = self.config.consumer_config(stable);
            if let Some(id) = consumer_config.get("group.instance.id") {
                tracing::info!(
                    group = %self.config.group,
                    group_instance_id = %id,
                    "kafka source: static group member"
                );
            }
            let consumer = StreamConsumer::from_config_and_context(&consumer_config, context)
                .map_err(|e| SourceError::config(format!("kafka consumer: {e}")))?;
            let subscription = self.config.subscription();
            let topics: Vec<&str> = subscription.iter().map(String::as_str).collect();
            consumer.subscribe(&topics).map_err(|e| {
                SourceError::config(format!("kafka: subscribing to {topics:?}: {e}"))
            })?;
            self.consumer = Some(Arc::new(consumer));
        }
        // The consumer stays (and keeps its group membership): librdkafka
        // reconnects by itself. This only checks that the brokers answer.
        self.check_brokers()
            .await
            .map_err(|why| SourceError::transient(SourceErrorKind::Connect, why))?;
        KafkaStats::add(&self.kafka_stats.inner.connects, 1);
        tracing::info!(
            brokers = %self.config.brokers,
            group = %self.config.group,
            subscription = ?self.config.subscription(),
            "connected to kafka"
        );
        Ok(())
    }

    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(self.disconnected(SourceErrorKind::Poll));
        };
        self.settle_revocation(false);
        self.commit_due();
        let count = max.min(self.config.batch_size);
        if count == 0 {
            return Ok(Polled::Idle);
        }
        let mut msgs = Vec::with_capacity(count.min(4096));
        let mut stream = consumer.stream();
        let wait = Duration::from_millis(self.config.poll_ms);
        // Rebalance callbacks run inside `next`, so each record is admitted
        // right after it is received, against the assignment of its time.
        let mut next = tokio::time::timeout(wait, stream.next())
            .await
            .ok()
            .flatten();
        // librdkafka queues a connectivity error at each failed reconnect
        // while the brokers are down; the ones already queued are one
        // error (the runtime reconnects once for them, not once each).
        let mut down = None;
        while let Some(received) = next {
            match received {
                Ok(m) => {
                    if let Some(msg) = self.admit(&m) {
                        msgs.push(msg);
                    }
                }
                Err(e) if is_connectivity(&e) => {
                    if !msgs.is_empty() {
                        break;
                    }
                    down = Some(e);
                }
                Err(e) => tracing::warn!(group = %self.config.group, "kafka consumer: {e}"),
            }
            if msgs.len() >= count {
                break;
            }
            next = stream.next().now_or_never().flatten();
        }
        drop(stream);
        if let (true, Some(e)) = (msgs.is_empty(), down) {
            return Err(SourceError::transient(
                SourceErrorKind::Poll,
                format!("{}: {e}", self.config.brokers),
            ));
        }
        self.stats.record_emitted(msgs.len());
        Ok(if msgs.is_empty() {
            Polled::Idle
        } else {
            Polled::Msgs(msgs)
        })
    }

    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        let mut stale = 0;
        {
            let mut book = lock(&self.book);
            for &id in ids {
                let (slot, epoch, offset) = decode_id(id);
                match book.part_mut(slot, epoch) {
                    Some(part) => {
                        part.held.remove(&offset);
                        if let Some(w) = part.watermark.as_mut() {
                            w.complete(offset);
                        }
                    }
                    None => stale += 1,
                }
            }
        }
        KafkaStats::add(&self.kafka_stats.inner.stale_acks, stale);
        self.stats.record_acked(ids);
        self.settle_revocation(false);
        self.commit_due();
        Ok(())
    }

    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        self.stats.record_failed();
        let (slot, epoch, offset) = decode_id(id);
        let (topic, partition, held) = {
            let mut book = lock(&self.book);
            let (topic, partition) = match book.slots.get(slot as usize) {
                Some((t, p)) => (t.clone(), *p),
                None => return Ok(()),
            };
            let Some(held) = book
                .part_mut(slot, epoch)
                .and_then(|p| p.held.remove(&offset))
            else {
                tracing::info!(
                    %topic, partition, offset,
                    "a failed record's partition was revoked: its next owner reads it again"
                );
                return Ok(());
            };
            (topic, partition, held)
        };
        let dead_letter = self.config.dead_letter_topic_for(&topic);
        let producer = self.dead_letter_producer()?;
        let attempts = reason.attempts.to_string();
        let origin = format!("{topic}/{partition}/{offset}");
        let headers = held
            .headers
            .clone()
            .unwrap_or_default()
            .insert(Header {
                key: REASON_HEADER,
                value: Some(reason.message.as_bytes()),
            })
            .insert(Header {
                key: ATTEMPTS_HEADER,
                value: Some(attempts.as_bytes()),
            })
            .insert(Header {
                key: SOURCE_HEADER,
                value: Some(origin.as_bytes()),
            });
        let mut record = FutureRecord::to(&dead_letter)
            .payload(&held.value[..])
            .headers(headers);
        if let Some(k) = &held.key {
            record = record.key(&k[..]);
        }
        if let Some(ts) = held.timestamp {
            record = record.timestamp(ts);
        }
        let sent = producer.send(record, DEAD_LETTER_TIMEOUT).await;
        if let Err((e, _)) = sent {
            // Kept in flight: the partition's commit stays before it, and a
            // later fail may try again.
            if let Some(part) = lock(&self.book).part_mut(slot, epoch) {
                part.held.insert(offset, held);
            }
            return Err(SourceError::transient(
                SourceErrorKind::Fail,
                format!("writing {origin} to dead-letter topic {dead_letter}: {e}"),
            ));
        }
        if let Some(part) = lock(&self.book).part_mut(slot, epoch) {
            if let Some(w) = part.watermark.as_mut() {
                w.complete(offset);
            }
        }
        KafkaStats::add(&self.kafka_stats.inner.dead_lettered, 1);
        tracing::warn!(
            record = %origin,
            %dead_letter,
            attempts = reason.attempts,
            "dead-lettered: {}",
            reason.message
        );
        self.settle_revocation(false);
        self.commit_due();
        Ok(())
    }

    async fn release(&mut self, id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        // The offset stays in flight: never committed past, read again by
        // the partition's next assignment.
        let (slot, epoch, offset) = decode_id(id);
        if let Some(part) = lock(&self.book).part_mut(slot, epoch) {
            if part.held.remove(&offset).is_some() {
                part.released += 1;
            }
        }
        self.settle_revocation(false);
        Ok(())
    }

    async fn health(&mut self) -> Health {
        match self.check_brokers().await {
            Ok(()) => Health::Healthy,
            Err(why) => Health::Unhealthy(why),
        }
    }

    async fn shutdown(&mut self) -> Result<(), SourceError> {
        let Some(consumer) = self.consumer.take() else {
            return Ok(());
        };
        // From now on a revocation lets go at once: closing waits for it.
        lock(&self.book).closing = true;
        // Every partition's watermark, due or not: an earlier commit may
        // have been lost (see `RECOMMIT_INTERVAL`).
        let due = lock(&self.book).lows();
        let group = self.config.group.clone();
        let stats = self.kafka_stats.clone();
        let book = self.book.clone();
        // Committing synchronously and leaving the group block: off the
        // runtime's threads.
        let closed = tokio::task::spawn_blocking(move || {
            if let Some(tpl) = due {
                KafkaStats::add(&stats.inner.commits, 1);
                if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                    KafkaStats::add(&stats.inner.commit_errors, 1);
                    tracing::warn!(%group, "commit at shutdown failed: {e}");
                }
            }
            // A revocation in its grace ends now (what completed was just
            // committed).
            settle_revocation(consumer.as_ref(), &book, &stats, &group, true);
            consumer.unsubscribe();
            drop(consumer);
        })
        .await;
        if let Err(e) = closed {
            tracing::warn!("closing the kafka consumer: {e}");
        }
        self.dead_letters = None;
        Ok(())
    }
}
