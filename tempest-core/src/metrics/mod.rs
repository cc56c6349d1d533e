//! The metrics registry: counters, gauges and histograms with labels.
//!
//! Handles ([`Counter`], [`Gauge`], [`Histogram`]) are cheap `Arc`s over
//! atomics, taken once when a component starts and updated on the data path
//! without locks. The registry's lock is only taken to create a handle or to
//! take a [`Snapshot`], which flushing hands to the targets on its own task.

pub mod catalog;
pub mod file;
pub mod histogram;
pub mod prometheus;
pub mod statsd;
pub mod targets;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

pub use catalog::{Kind, MetricDef};
pub use histogram::{AtomicHistogram, HistogramSnapshot};
pub use targets::{spawn_flusher, Flusher, MetricTarget, TargetError, TargetSpec};

/// Label pairs, kept sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Vec<(&'static str, String)>);

impl Labels {
    /// Labels from pairs.
    pub fn new<V: Into<String>>(pairs: impl IntoIterator<Item = (&'static str, V)>) -> Self {
        let mut v: Vec<_> = pairs.into_iter().map(|(k, v)| (k, v.into())).collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        Labels(v)
    }

    /// The pairs, sorted by name.
    pub fn pairs(&self) -> &[(&'static str, String)] {
        &self.0
    }

    /// The value of one label.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn merged(&self, more: &Labels) -> Labels {
        Labels::new(
            self.0
                .iter()
                .chain(more.0.iter())
                .map(|(k, v)| (*k, v.clone())),
        )
    }

    /// True when every pair of `want` is in these labels.
    pub fn matches(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.get(k) == Some(*v))
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// A monotonically increasing count. A handle from a
/// [disabled](Registry::disabled) registry does nothing.
#[derive(Clone, Debug)]
pub struct Counter(Option<Arc<AtomicU64>>);

impl Default for Counter {
    /// A live counter that belongs to no registry.
    fn default() -> Self {
        Counter(Some(Arc::default()))
    }
}

impl Counter {
    /// A counter that records nothing.
    pub fn noop() -> Self {
        Counter(None)
    }
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        if let Some(c) = &self.0 {
            if n > 0 {
                c.fetch_add(n, Relaxed);
            }
        }
    }
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        if let Some(c) = &self.0 {
            c.fetch_add(1, Relaxed);
        }
    }
    /// The current value (0 for a no-op counter).
    pub fn get(&self) -> u64 {
        self.0.as_ref().map_or(0, |c| c.load(Relaxed))
    }
}

/// A value that goes up and down (an `f64`).
#[derive(Clone, Debug)]
pub struct Gauge(Option<Arc<AtomicU64>>);

impl Default for Gauge {
    /// A live gauge that belongs to no registry.
    fn default() -> Self {
        Gauge(Some(Arc::default()))
    }
}

impl Gauge {
    /// A gauge that records nothing.
    pub fn noop() -> Self {
        Gauge(None)
    }
    /// Sets the value.
    #[inline]
    pub fn set(&self, v: f64) {
        if let Some(g) = &self.0 {
            g.store(v.to_bits(), Relaxed);
        }
    }
    /// The current value (0 for a no-op gauge).
    pub fn get(&self) -> f64 {
        self.0
            .as_ref()
            .map_or(0.0, |g| f64::from_bits(g.load(Relaxed)))
    }
    /// Adds `d` (negative to subtract), atomically: for gauges that count
    /// things several tasks open and close.
    pub fn add(&self, d: f64) {
        if let Some(g) = &self.0 {
            let _ = g.fetch_update(Relaxed, Relaxed, |v| {
                Some((f64::from_bits(v) + d).to_bits())
            });
        }
    }
}

/// A latency histogram (microseconds).
#[derive(Clone)]
pub struct Histogram(Option<Arc<AtomicHistogram>>);

impl Default for Histogram {
    /// A live histogram that belongs to no registry.
    fn default() -> Self {
        Histogram(Some(Arc::default()))
    }
}

impl Histogram {
    /// A histogram that records nothing.
    pub fn noop() -> Self {
        Histogram(None)
    }
    /// Records one value.
    #[inline]
    pub fn record(&self, micros: u64) {
        if let Some(h) = &self.0 {
            h.record(micros);
        }
    }
    /// Records `n` observations of one value.
    #[inline]
    pub fn record_n(&self, micros: u64, n: u64) {
        if let Some(h) = &self.0 {
            h.record_n(micros, n);
        }
    }
    /// The current distribution (empty for a no-op histogram).
    pub fn snapshot(&self) -> HistogramSnapshot {
        self.0.as_ref().map(|h| h.snapshot()).unwrap_or_default()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.snapshot().count)
            .finish()
    }
}

#[derive(Clone)]
enum Handle {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

/// The registered metrics, by name and full label set.
type MetricMap = BTreeMap<(&'static str, Labels), (&'static MetricDef, Handle)>;

/// Creates and lists a process's metrics. Clones share one registry.
#[derive(Clone)]
pub struct Registry {
    common: Labels,
    metrics: Arc<Mutex<MetricMap>>,
    enabled: bool,
}

impl Default for Registry {
    /// An enabled registry without common labels.
    fn default() -> Self {
        Registry::new(Labels::default())
    }
}

impl Registry {
    /// A registry whose every metric carries `common` labels (topology, host).
    pub fn new(common: Labels) -> Self {
        Registry {
            common,
            metrics: Arc::default(),
            enabled: true,
        }
    }

    /// The registry of a process running (part of) topology `name`: every
    /// metric carries `topology` and `host` (this machine's host name).
    pub fn for_topology(name: &str) -> Self {
        Registry::new(Labels::new([
            ("topology", name.to_owned()),
            ("host", hostname()),
        ]))
    }

    /// A registry whose handles do nothing (one branch per update) and whose
    /// snapshots are empty: metrics off, as `tempest-bench --no-metrics`
    /// measures.
    pub fn disabled() -> Self {
        Registry {
            common: Labels::default(),
            metrics: Arc::default(),
            enabled: false,
        }
    }

    /// False for a [disabled](Registry::disabled) registry.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The labels every metric carries.
    pub fn common_labels(&self) -> &Labels {
        &self.common
    }

    fn handle(
        &self,
        def: &'static MetricDef,
        labels: &Labels,
        make: impl FnOnce() -> Handle,
    ) -> Handle {
        let labels = self.common.merged(labels);
        let mut m = self.metrics.lock();
        m.entry((def.name, labels))
            .or_insert_with(|| (def, make()))
            .1
            .clone()
    }

    /// The counter `def` with `labels` (created on first use).
    pub fn counter(&self, def: &'static MetricDef, labels: &Labels) -> Counter {
        debug_assert_eq!(def.kind, Kind::Counter, "{}", def.name);
        if !self.enabled {
            return Counter::noop();
        }
        match self.handle(def, labels, || Handle::Counter(Counter::default())) {
            Handle::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    /// The gauge `def` with `labels`.
    pub fn gauge(&self, def: &'static MetricDef, labels: &Labels) -> Gauge {
        debug_assert_eq!(def.kind, Kind::Gauge, "{}", def.name);
        if !self.enabled {
            return Gauge::noop();
        }
        match self.handle(def, labels, || Handle::Gauge(Gauge::default())) {
            Handle::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    /// The histogram `def` with `labels`.
    pub fn histogram(&self, def: &'static MetricDef, labels: &Labels) -> Histogram {
        debug_assert_eq!(def.kind, Kind::Histogram, "{}", def.name);
        if !self.enabled {
            return Histogram::noop();
        }
        match self.handle(def, labels, || Handle::Histogram(Histogram::default())) {
            Handle::Histogram(h) => h,
            _ => Histogram::default(),
        }
    }

    /// Every metric's current value.
    pub fn snapshot(&self) -> Snapshot {
        let m = self.metrics.lock();
        let samples = m
            .iter()
            .map(|((_, labels), (def, handle))| Sample {
                def,
                labels: labels.clone(),
                value: match handle {
                    Handle::Counter(c) => Value::Counter(c.get()),
                    Handle::Gauge(g) => Value::Gauge(g.get()),
                    Handle::Histogram(h) => Value::Histogram(h.snapshot()),
                },
            })
            .collect();
        Snapshot {
            at: std::time::SystemTime::now(),
            samples,
        }
    }
}

/// This machine's host name (the `host` label), `"unknown"` if it cannot be read.
pub fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its whole length, and gethostname
        // writes at most that many bytes.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let name = String::from_utf8_lossy(&buf[..end]).trim().to_owned();
            if !name.is_empty() {
                return name;
            }
        }
    }
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A metric's value in a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A counter's total.
    Counter(u64),
    /// A gauge's value.
    Gauge(f64),
    /// A histogram's distribution.
    Histogram(HistogramSnapshot),
}

/// One metric in a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Its definition.
    pub def: &'static MetricDef,
    /// Its labels (common labels included).
    pub labels: Labels,
    /// Its value.
    pub value: Value,
}

/// Every metric's value at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// When it was taken.
    pub at: std::time::SystemTime,
    /// The metrics, sorted by name and labels.
    pub samples: Vec<Sample>,
}

impl Snapshot {
    /// Samples of metric `name` whose labels include `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.def.name == name && s.labels.matches(labels))
    }

    /// The sum of counter `name` over the samples matching `labels` (0 if none).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.find(name, labels)
            .map(|s| match s.value {
                Value::Counter(v) => v,
                _ => 0,
            })
            .sum()
    }

    /// The value of gauge `name` with `labels`, if present.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.find(name, labels).find_map(|s| match s.value {
            Value::Gauge(v) => Some(v),
            _ => None,
        })
    }

    /// Histogram `name` with `labels`, if present.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<&HistogramSnapshot> {
        self.samples
            .iter()
            .filter(|s| s.def.name == name && s.labels.matches(labels))
            .find_map(|s| match &s.value {
                Value::Histogram(h) => Some(h),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_share_state_and_carry_labels() {
        let r = Registry::new(Labels::new([("topology", "t")]));
        let a = r.counter(
            &catalog::TASK_MESSAGES_IN,
            &Labels::new([("task", "split")]),
        );
        let b = r.counter(
            &catalog::TASK_MESSAGES_IN,
            &Labels::new([("task", "split")]),
        );
        let c = r.counter(
            &catalog::TASK_MESSAGES_IN,
            &Labels::new([("task", "count")]),
        );
        a.add(2);
        b.inc();
        c.add(10);
        let s = r.snapshot();
        assert_eq!(
            s.counter("tempest_task_messages_in", &[("task", "split")]),
            3
        );
        assert_eq!(
            s.counter("tempest_task_messages_in", &[("topology", "t")]),
            13
        );
        assert_eq!(
            s.counter("tempest_task_messages_in", &[("topology", "other")]),
            0
        );
        r.gauge(&catalog::ROOTS_IN_FLIGHT, &Labels::default())
            .set(4.0);
        assert_eq!(
            r.snapshot().gauge("tempest_roots_in_flight", &[]),
            Some(4.0)
        );
    }

    #[test]
    fn a_disabled_registry_records_nothing() {
        let r = Registry::disabled();
        assert!(!r.is_enabled());
        let c = r.counter(&catalog::SOURCE_ACKED, &Labels::default());
        c.add(3);
        c.inc();
        assert_eq!(c.get(), 0);
        let g = r.gauge(&catalog::ROOTS_IN_FLIGHT, &Labels::default());
        g.set(2.0);
        assert_eq!(g.get(), 0.0);
        let h = r.histogram(&catalog::ROOT_COMPLETE_LATENCY, &Labels::default());
        h.record(5);
        assert_eq!(h.snapshot().count, 0);
        assert!(r.snapshot().samples.is_empty());
        // Handles made outside a registry are live.
        let live = Counter::default();
        live.inc();
        assert_eq!(live.get(), 1);
    }

    #[test]
    fn topology_registries_carry_the_host() {
        let r = Registry::for_topology("t");
        assert_eq!(r.common_labels().get("topology"), Some("t"));
        let host = r.common_labels().get("host").unwrap();
        assert!(!host.is_empty());
        assert_eq!(host, hostname());
    }
}
