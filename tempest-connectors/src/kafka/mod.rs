//! Kafka: [`KafkaSource`], a member of a consumer group that commits only
//! what is done, and [`KafkaOutput`], idempotent batched produce from a task.
//!
//! The client is [rdkafka] with its vendored librdkafka (built from source
//! by cargo: a C compiler and `make` are all it needs; no cmake, no
//! OpenSSL). librdkafka is the reference client outside the JVM: consumer
//! groups with every assignment strategy, static membership, the idempotent
//! producer, SASL, and years of production use; a pure-Rust client would
//! have had to match all of that.
//!
//! In `Topology.toml` (after [`crate::register`]):
//!
//! ```toml
//! [source]
//! kind = "kafka"
//! [source.config]
//! brokers = "127.0.0.1:9092"
//! group = "wordcount"
//! topics = ["sentences"]
//! ```
//!
//! See [`KafkaSourceConfig`] for every key.
//!
//! # Commits and the low watermark
//!
//! Acks come back in any order. Per partition the source keeps a
//! [`tempest_core::watermark::Watermark`] and commits its low watermark:
//! every offset before a commit is done (acked, or written to the
//! dead-letter topic), so a crash or a rebalance never skips a record
//! still in flight. What completed past the watermark is read again after
//! a crash: duplicates are bounded by what was read past the last commit.
//! Commits are asynchronous, and librdkafka reports nothing of them to
//! this client, so every partition's watermark is also committed again
//! every 5 s: a commit lost to a broker outage is made good once it is back.
//!
//! # Revocation and its grace
//!
//! When a rebalance takes partitions away from a member, the source stops
//! admitting records from them and gives the records of theirs still in
//! flight a grace, `revoke_grace_ms` (default 5 s; never longer than the
//! topology's `grace_period`, which [`tempest_core::Source::configure`]
//! gives), to complete. Then it commits each partition's low watermark and
//! lets the partitions go. What completed within the grace is committed
//! here and not read again by the next owner; what did not stays
//! uncommitted and is read again there (its late acks here are ignored).
//!
//! The grace cannot be waited for inside librdkafka's rebalance callback:
//! the callback runs inside the consumer's poll, which the runtime calls
//! from the one task that also delivers [`tempest_core::Source::ack`], so
//! no ack could arrive while it waited. Instead the revocation is a small
//! state machine driven by the source's own calls:
//!
//! 1. The rebalance callback (the source overrides rdkafka's default
//!    `ConsumerContext::rebalance`) marks the revoked partitions as
//!    revoking, with a deadline, and returns **without** calling
//!    `unassign`. librdkafka then waits for that call: it keeps the member
//!    in the group (heartbeating, in its `WAIT_UNASSIGN_CALL` state), keeps
//!    its partitions paused (with the cooperative protocol the others too,
//!    for the length of the grace), and does not rejoin, so no other member
//!    is given them yet. A record of theirs that was already fetched is
//!    not admitted.
//! 2. Every later `poll`, `ack`, `fail` and `release` checks the
//!    revocation: once nothing of its partitions is in flight (released
//!    records are not waited for), or its deadline passed, it commits the
//!    low watermarks and calls `unassign` (`incremental_unassign` with
//!    the cooperative protocol, for just the revoked partitions). The
//!    commit is asynchronous: librdkafka completes an unassign, and only
//!    then rejoins, once the commits sent before it are answered, so the
//!    next owner reads from the new offsets and this task never blocks.
//!    A revocation whose deadline passes while the runtime sends nothing
//!    (at `max_pending`, no root settling) ends at the next call.
//! 3. A lost assignment (the session timed out: the group already gave
//!    the partitions away), a source closing, and a grace of 0 let go at
//!    once, as before; a lost assignment commits nothing.
//!
//! [`KafkaStats`] counts what completed within a grace, the graces that
//! ran out, and what was left to the next owner.
//!
//! # Headers and timestamps
//!
//! A [`tempest_core::Msg`] is a key and a payload. The record's key is the
//! message key. With `format = "record"` the payload is a [`KafkaRecord`]
//! (topic, partition, offset, timestamp, headers, value) that a task reads
//! with [`KafkaRecord::decode`]; with the default `format = "value"` it is
//! the value alone.
//!
//! # TLS
//!
//! SASL mechanisms that need no TLS (`PLAIN`, over `sasl_plaintext`) work
//! with the passed-through `properties`; `ssl`/`sasl_ssl` need librdkafka
//! built with OpenSSL (rdkafka's `ssl` feature), which this crate does not
//! enable.
//!
//! [rdkafka]: https://docs.rs/rdkafka

mod config;
mod output;
mod record;
mod source;

pub use config::{
    KafkaSourceConfig, OffsetReset, RecordFormat, MAX_BATCH_SIZE, MAX_POLL_MS, MAX_REVOKE_GRACE_MS,
};
pub use output::KafkaOutput;
pub use record::{BadRecord, KafkaRecord};
pub use source::{KafkaSource, KafkaStats, ATTEMPTS_HEADER, REASON_HEADER, SOURCE_HEADER};
/// The environment variable whose value is the consumer's default
/// `group.instance.id` (static membership; see [`KafkaSource`]).
pub use tempest_core::source::SOURCE_CONSUMER_ENV;
