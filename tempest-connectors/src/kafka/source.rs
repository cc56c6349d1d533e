//! [`KafkaSource`]: a member of a Kafka consumer group that commits, per
//! partition, the low watermark of acked offsets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
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
    /// Commits the broker refused or that could not be sent (the offsets
    /// are committed again with the next ack or poll).
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
    /// Records in flight when their partition was revoked: left uncommitted
    /// for the partition's next owner to read again.
    pub fn dropped_in_flight(&self) -> u64 {
        self.inner.dropped_in_flight.load(Ordering::Relaxed)
    }
    /// Records handed out and not under the committed watermark when their
    /// partition was revoked (in flight, or done after one in flight):
    /// what the partition's next owner reads again.
    pub fn left_uncommitted(&self) -> u64 {
        self.inner.left_uncommitted.load(Ordering::Relaxed)
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
            });
        }
        KafkaStats::add(&stats.inner.assigned, tpl.count());
    }

    /// Forgets the revoked partitions, returning the commits of what
    /// completed in them.
    fn revoke(&mut self, tpl: &TopicPartitionList, stats: &KafkaStats) -> TopicPartitionList {
        let mut commits = TopicPartitionList::new();
        for e in tpl.elements() {
            let Some(slot) = self.find(e.topic(), e.partition()) else {
                continue;
            };
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
                    let _ = commits.add_partition_offset(
                        e.topic(),
                        e.partition(),
                        Offset::Offset(w.low()),
                    );
                }
            }
        }
        KafkaStats::add(&stats.inner.revoked, tpl.count());
        commits
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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let commits = lock(&self.book).revoke(tpl, &self.stats);
        tracing::info!(
            group = %self.group,
            partitions = tpl.count(),
            "partitions revoked: committing what completed, leaving the rest for the next owner"
        );
        if commits.count() == 0 {
            return;
        }
        if consumer.assignment_lost() {
            tracing::warn!(
                group = %self.group,
                "the assignment was lost (session timed out): its offsets cannot be committed"
            );
            return;
        }
        KafkaStats::add(&self.stats.inner.commits, 1);
        // Synchronous, so the next owner reads from here.
        if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
            KafkaStats::add(&self.stats.inner.commit_errors, 1);
            tracing::warn!(group = %self.group, "commit at revocation failed: {e}");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                lock(&self.book).assign(tpl, &self.stats);
                let names: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                tracing::info!(group = %self.group, partitions = ?names, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(group = %self.group, "rebalance: {e}"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            KafkaStats::add(&self.stats.inner.commit_errors, 1);
            lock(&self.book).commit_failed(offsets);
            tracing::warn!(group = %self.group, "commit failed (sent again with the next ack): {e}");
        }
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
/// and sent after each ack and poll whose watermark moved; a failed commit
/// is sent again.
///
/// **Rebalances.** When partitions are revoked the source stops admitting
/// from them, commits (synchronously) what completed, and forgets them:
/// records still in flight stay uncommitted and are read again by the next
/// owner (their acks here are ignored). When partitions are assigned,
/// reading resumes from the committed offset (or `auto_offset_reset`).
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

impl KafkaSource {
    /// A source with this configuration (checked at `configure`; nothing
    /// connects until `connect`).
    pub fn new(config: KafkaSourceConfig) -> Self {
        KafkaSource {
            config,
            consumer: None,
            dead_letters: None,
            book: Arc::default(),
            stats: SourceStats::new(),
            kafka_stats: KafkaStats::default(),
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

    /// Sends the commits due, asynchronously.
    fn commit_due(&self) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        let Some(tpl) = lock(&self.book).due() else {
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
        tracing::debug!(
            group = %self.config.group,
            message_timeout = ?settings.message_timeout,
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
            let stable = std::env::var(SOURCE_CONSUMER_ENV).ok();
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
        while let Some(received) = next {
            match received {
                Ok(m) => {
                    if let Some(msg) = self.admit(&m) {
                        msgs.push(msg);
                    }
                }
                Err(e) if is_connectivity(&e) => {
                    if msgs.is_empty() {
                        return Err(SourceError::transient(
                            SourceErrorKind::Poll,
                            format!("{}: {e}", self.config.brokers),
                        ));
                    }
                    break;
                }
                Err(e) => tracing::warn!(group = %self.config.group, "kafka consumer: {e}"),
            }
            if msgs.len() >= count {
                break;
            }
            next = stream.next().now_or_never().flatten();
        }
        drop(stream);
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
        self.commit_due();
        Ok(())
    }

    async fn release(&mut self, id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        // The offset stays in flight: never committed past, read again by
        // the partition's next assignment.
        let (slot, epoch, offset) = decode_id(id);
        if let Some(part) = lock(&self.book).part_mut(slot, epoch) {
            part.held.remove(&offset);
        }
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
        let due = lock(&self.book).due();
        let group = self.config.group.clone();
        let stats = self.kafka_stats.clone();
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
