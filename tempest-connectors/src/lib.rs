//! # tempest-connectors
//!
//! Sources and outputs for the brokers people run in production, one cargo
//! feature per broker:
//!
//! - `redis`: [`redis::RedisStreamSource`] (a consumer group on a Redis
//!   stream, with recovery of entries a crashed consumer left pending and a
//!   dead-letter stream) and [`redis::RedisOutput`] (stream `XADD` and hash
//!   increments from a task, written in the task's `flush`);
//! - `nats`: [`nats::JetStreamSource`] (a durable JetStream pull consumer);
//! - `kafka`: [`kafka::KafkaSource`] (a consumer-group member that commits
//!   the low watermark of acked offsets, with a dead-letter topic) and
//!   [`kafka::KafkaOutput`] (idempotent batched produce, delivered in the
//!   task's `flush`).
//!
//! [`register`] adds their kinds (`redis`, `nats`, `kafka`) to a topology so that
//! `Topology.toml` can select them with `[source] kind`.

#![warn(missing_docs)]

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

use tempest_core::SourceKinds;

/// Registers every enabled connector's source kind.
pub fn register(kinds: &mut SourceKinds) {
    #[cfg(feature = "redis")]
    kinds.register::<redis::RedisStreamSource>("redis");
    #[cfg(feature = "nats")]
    kinds.register::<nats::JetStreamSource>("nats");
    #[cfg(feature = "kafka")]
    kinds.register::<kafka::KafkaSource>("kafka");
}
