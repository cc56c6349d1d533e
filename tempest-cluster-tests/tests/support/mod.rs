//! Helpers of the Docker cluster suite: the cluster's lifetime, its TLS
//! files and the docker commands ([`cluster`]), the director's API over TLS
//! ([`https`]), and the Redis side: the feeder, the consumer group's
//! progress and the counts ([`redis_side`]).
//!
//! Nothing waits by sleeping for a fixed time: [`wait_for`] polls until what
//! is expected holds, within a bound.

pub mod cluster;
pub mod https;
pub mod redis_side;

use std::io::Write;

pub use tempest_testkit::cluster::{try_wait_for, wait_for};

/// Writes text straight to stderr, past the test harness's capture, so the
/// figures show in CI's log whether the test passes or fails.
pub fn report_raw(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// One machine-readable line: `cluster-suite: {json}`.
pub fn report_line(v: &serde_json::Value) {
    report_raw(&format!("cluster-suite: {v}\n"));
}
