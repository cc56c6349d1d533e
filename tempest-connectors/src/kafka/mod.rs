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
//! a crash: duplicates are bounded by what was in flight.
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

pub use config::{KafkaSourceConfig, OffsetReset, RecordFormat, MAX_BATCH_SIZE, MAX_POLL_MS};
pub use output::KafkaOutput;
pub use record::{BadRecord, KafkaRecord};
pub use source::{KafkaSource, KafkaStats, ATTEMPTS_HEADER, REASON_HEADER, SOURCE_HEADER};
