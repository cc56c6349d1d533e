//! Built-in sources: [`MemorySource`], [`GeneratorSource`] and [`FileSource`].
//!
//! They need no broker, so they serve tests, examples, benchmarks and
//! one-off batch runs. Each can be built in code or selected in
//! `Topology.toml` by its kind ([`register_builtin`] registers them):
//!
//! ```toml
//! [source]
//! kind = "generator"          # or "memory", "file"
//! [source.config]
//! count = 1_000_000
//! rate = 50_000.0
//! ```
//!
//! All three count what they hand out and what comes back in one shared
//! [`SourceStats`] handle, which a test or benchmark keeps while the runtime
//! owns the source.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::source::SourceId;
use crate::topology::SourceKinds;

pub mod file;
pub mod generator;
pub mod memory;

pub use file::{DoneRange, FileCheckpoint, FileSource};
pub use generator::{GeneratorSource, GeneratorStats};
pub use memory::{MemoryLog, MemorySource};

/// Registers the built-in source kinds: `"memory"` ([`MemorySource`]),
/// `"generator"` ([`GeneratorSource`]) and `"file"` ([`FileSource`]).
///
/// ```
/// use tempest_core::{sources, SourceKinds};
///
/// let mut kinds = SourceKinds::default();
/// sources::register_builtin(&mut kinds);
/// assert_eq!(kinds.names().collect::<Vec<_>>(), ["file", "generator", "memory"]);
/// ```
pub fn register_builtin(kinds: &mut SourceKinds) {
    kinds.register::<MemorySource>("memory");
    kinds.register::<GeneratorSource>("generator");
    kinds.register::<FileSource>("file");
}

/// Counters of a source's messages: how many it handed out, and how many came
/// back acked or failed.
///
/// A cheap handle ([`Clone`] shares the counters), so a test or benchmark
/// keeps one while the runtime owns the source. Counting costs a few atomic
/// additions per batch.
///
/// With ack tracking on ([`SourceStats::track_acks`]), it also keeps one bit
/// per acked id (the low 64 bits of the [`SourceId`]) to report the ids never
/// acked ([`SourceStats::missing`]) and the acks of ids already acked
/// ([`SourceStats::duplicate_acks`]). The bitmap grows to the largest id
/// acked: 125 MB for a billion sequence numbers.
///
/// ```
/// use tempest_core::sources::SourceStats;
///
/// let stats = SourceStats::new();
/// stats.track_acks(true);
/// stats.record_emitted(4);
/// stats.record_acked(&[0u64.into(), 2u64.into(), 2u64.into()]);
/// assert_eq!(stats.acked(), 3);
/// assert_eq!(stats.missing(4), [1, 3]);
/// assert_eq!(stats.duplicate_acks(), 1);
/// ```
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    emitted: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    duplicate_acks: AtomicU64,
    tracking: AtomicBool,
    /// Bit `i` is set once id `i` has been acked.
    acked_bits: Mutex<Vec<u64>>,
}

impl SourceStats {
    /// Zeroed counters, ack tracking off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns the bitmap of acked ids on or off, for every handle of these
    /// stats. Acks before tracking was turned on are not in the bitmap.
    pub fn track_acks(&self, on: bool) {
        self.inner.tracking.store(on, Ordering::Relaxed);
    }

    /// True while acks are tracked (see [`SourceStats::track_acks`]).
    pub fn tracks_acks(&self) -> bool {
        self.inner.tracking.load(Ordering::Relaxed)
    }

    /// Messages handed out by `poll`.
    pub fn emitted(&self) -> u64 {
        self.inner.emitted.load(Ordering::Relaxed)
    }

    /// Acks received, repeated acks of one id included.
    pub fn acked(&self) -> u64 {
        self.inner.acked.load(Ordering::Relaxed)
    }

    /// Messages handed to `fail`.
    pub fn failed(&self) -> u64 {
        self.inner.failed.load(Ordering::Relaxed)
    }

    /// Acks of an id that was already acked (0 unless acks are tracked).
    pub fn duplicate_acks(&self) -> u64 {
        self.inner.duplicate_acks.load(Ordering::Relaxed)
    }

    /// The ids in `0..up_to` that were never acked, ascending: lost messages
    /// once a run has drained (failed messages are among them).
    ///
    /// # Panics
    ///
    /// If ack tracking is off: without the bitmap every id would look lost.
    pub fn missing(&self, up_to: u64) -> Vec<u64> {
        assert!(
            self.tracks_acks(),
            "SourceStats::missing needs ack tracking (track_acks(true) before the run)"
        );
        let bits = self.inner.acked_bits.lock();
        let mut missing = Vec::new();
        for (w, &word) in bits.iter().enumerate() {
            let base = w as u64 * 64;
            if base >= up_to {
                return missing;
            }
            let mut unset = !word;
            while unset != 0 {
                let id = base + u64::from(unset.trailing_zeros());
                if id >= up_to {
                    return missing;
                }
                missing.push(id);
                unset &= unset - 1;
            }
        }
        missing.extend(bits.len() as u64 * 64..up_to);
        missing
    }

    /// Counts `n` messages handed out.
    pub fn record_emitted(&self, n: usize) {
        self.inner.emitted.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a batch of acks (and marks them in the bitmap when tracking).
    pub fn record_acked(&self, ids: &[SourceId]) {
        self.inner
            .acked
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        if !self.tracks_acks() {
            return;
        }
        let mut bits = self.inner.acked_bits.lock();
        let mut duplicates = 0;
        for id in ids {
            let i = id.parts().1;
            let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
            if word >= bits.len() {
                // Grow geometrically: ids of a run mostly ascend.
                let len = (word + 1).max(bits.len() * 2);
                bits.resize(len, 0);
            }
            if bits[word] & bit != 0 {
                duplicates += 1;
            }
            bits[word] |= bit;
        }
        drop(bits);
        if duplicates > 0 {
            self.inner
                .duplicate_acks
                .fetch_add(duplicates, Ordering::Relaxed);
        }
    }

    /// Counts one failed message.
    pub fn record_failed(&self) {
        self.inner.failed.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<SourceId> {
        v.iter().map(|&i| SourceId::from(i)).collect()
    }

    #[test]
    fn counts_without_tracking() {
        let stats = SourceStats::new();
        let other = stats.clone();
        stats.record_emitted(3);
        stats.record_acked(&ids(&[0, 1, 1]));
        stats.record_failed();
        assert_eq!((other.emitted(), other.acked(), other.failed()), (3, 3, 1));
        assert_eq!(other.duplicate_acks(), 0);
        assert!(!other.tracks_acks());
    }

    #[test]
    fn tracking_finds_missing_and_duplicates() {
        let stats = SourceStats::new();
        let handle = stats.clone();
        stats.track_acks(true);
        let mut acked: Vec<u64> = (0..200).filter(|i| i % 7 != 3).collect();
        acked.push(64);
        acked.push(130);
        stats.record_acked(&ids(&acked));
        let expected: Vec<u64> = (0..250).filter(|i| i % 7 == 3 || *i >= 200).collect();
        assert_eq!(handle.missing(250), expected);
        assert_eq!(handle.missing(4), [3]);
        assert_eq!(handle.missing(0), Vec::<u64>::new());
        assert_eq!(handle.duplicate_acks(), 2);
        assert_eq!(handle.acked(), acked.len() as u64);
    }

    #[test]
    #[should_panic(expected = "ack tracking")]
    fn missing_without_tracking_panics() {
        SourceStats::new().missing(1);
    }
}
