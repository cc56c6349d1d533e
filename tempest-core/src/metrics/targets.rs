//! Metric targets: where snapshots go on every flush.
//!
//! The flusher ([`spawn_flusher`]) runs on its own task and hands each
//! snapshot to every target in turn. A target that fails is reported in the
//! log, once per interval, and tried again at the next flush; the data path
//! never waits for a target.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Registry, Snapshot, Value};

/// A target as configured in `Topology.toml` (`[[metric.targets]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetSpec {
    /// A compact table on stdout, for people running standalone.
    Console,
    /// One line per metric through `tracing`.
    Log {
        /// The level: error, warn, info, debug or trace (default info).
        #[serde(default = "default_level")]
        level: LogLevel,
    },
}

fn default_level() -> LogLevel {
    LogLevel::Info
}

/// A `tracing` level for the log target.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// error
    Error,
    /// warn
    Warn,
    /// info
    Info,
    /// debug
    Debug,
    /// trace
    Trace,
}

/// A failure to deliver a snapshot.
#[derive(Debug, thiserror::Error)]
#[error("metric target {target}: {message}")]
pub struct TargetError {
    /// The target's name.
    pub target: &'static str,
    /// What went wrong.
    pub message: String,
}

/// Receives snapshots.
pub trait MetricTarget: Send {
    /// The target's name for logs.
    fn name(&self) -> &'static str;
    /// Delivers one snapshot.
    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError>;
}

impl TargetSpec {
    /// Builds the target.
    pub fn build(&self) -> Box<dyn MetricTarget> {
        match self {
            TargetSpec::Console => Box::new(ConsoleTarget::new(std::io::stdout())),
            TargetSpec::Log { level } => Box::new(LogTarget { level: *level }),
        }
    }
}

/// Runs every `interval`: snapshots `registry` and flushes it to `targets`.
/// Stops (after a last flush) when `stop` is notified.
pub fn spawn_flusher(
    registry: Registry,
    mut targets: Vec<Box<dyn MetricTarget>>,
    interval: Duration,
    stop: std::sync::Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if targets.is_empty() {
            stop.notified().await;
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.notified() => true,
            };
            let snapshot = registry.snapshot();
            for t in &mut targets {
                if let Err(e) = t.flush(&snapshot) {
                    tracing::warn!(target: "tempest::metrics", "{e}");
                }
            }
            if last {
                return;
            }
        }
    })
}

/// Logs every metric through `tracing`.
pub struct LogTarget {
    level: LogLevel,
}

impl MetricTarget for LogTarget {
    fn name(&self) -> &'static str {
        "log"
    }

    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError> {
        for s in &snapshot.samples {
            let value = match &s.value {
                Value::Counter(v) => v.to_string(),
                Value::Gauge(v) => format!("{v}"),
                Value::Histogram(h) => format!(
                    "count={} p50={}us p99={}us max={}us",
                    h.count,
                    h.quantile(0.5),
                    h.quantile(0.99),
                    h.max
                ),
            };
            let (name, labels) = (s.def.name, &s.labels);
            match self.level {
                LogLevel::Error => {
                    tracing::error!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Warn => {
                    tracing::warn!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Info => {
                    tracing::info!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Debug => {
                    tracing::debug!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Trace => {
                    tracing::trace!(target: "tempest::metrics", %labels, "{name} {value}")
                }
            }
        }
        Ok(())
    }
}

/// Prints a compact table: the source's figures, then one row per task.
pub struct ConsoleTarget<W> {
    out: W,
    last: Option<Snapshot>,
}

impl<W: Write + Send> ConsoleTarget<W> {
    /// A console target writing to `out`.
    pub fn new(out: W) -> Self {
        ConsoleTarget { out, last: None }
    }

    /// The table for `snapshot`, with rates against the previous one.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        use super::catalog as c;
        let secs = self
            .last
            .as_ref()
            .and_then(|l| snapshot.at.duration_since(l.at).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let rate = |name: &str, labels: &[(&str, &str)]| -> f64 {
            match &self.last {
                Some(l) if secs > 0.0 => {
                    snapshot
                        .counter(name, labels)
                        .saturating_sub(l.counter(name, labels)) as f64
                        / secs
                }
                _ => 0.0,
            }
        };
        let latency = snapshot
            .histogram(c::ROOT_COMPLETE_LATENCY.name, &[])
            .cloned()
            .unwrap_or_default();
        let mut s = format!(
            "acked {} ({:.0}/s)  failed {}  timed out {}  dead {}  in flight {}  complete p50 {:.2}ms p99 {:.2}ms\n",
            snapshot.counter(c::SOURCE_ACKED.name, &[]),
            rate(c::SOURCE_ACKED.name, &[]),
            snapshot.counter(c::SOURCE_FAILED.name, &[]),
            snapshot.counter(c::SOURCE_TIMED_OUT.name, &[]),
            snapshot.counter(c::SOURCE_DEAD_LETTERED.name, &[]),
            snapshot.gauge(c::ROOTS_IN_FLIGHT.name, &[]).unwrap_or(0.0),
            latency.quantile(0.5) as f64 / 1000.0,
            latency.quantile(0.99) as f64 / 1000.0,
        );
        let mut tasks: BTreeMap<&str, ()> = BTreeMap::new();
        for sample in snapshot.find(c::TASK_MESSAGES_IN.name, &[]) {
            if let Some(t) = sample.labels.get("task") {
                tasks.insert(t, ());
            }
        }
        if !tasks.is_empty() {
            s.push_str(&format!(
                "  {:<16} {:>12} {:>10} {:>12} {:>8} {:>8} {:>12} {:>8}\n",
                "task", "in", "in/s", "out", "errors", "queued", "handle p99", "capacity"
            ));
        }
        for task in tasks.keys() {
            let l = [("task", *task)];
            let handle = snapshot
                .histogram(c::TASK_HANDLE_LATENCY.name, &l)
                .cloned()
                .unwrap_or_default();
            s.push_str(&format!(
                "  {:<16} {:>12} {:>10.0} {:>12} {:>8} {:>8.0} {:>10}us {:>8.2}\n",
                task,
                snapshot.counter(c::TASK_MESSAGES_IN.name, &l),
                rate(c::TASK_MESSAGES_IN.name, &l),
                snapshot.counter(c::TASK_MESSAGES_OUT.name, &l),
                snapshot.counter(c::TASK_ERRORS.name, &l),
                snapshot.gauge(c::TASK_QUEUE_DEPTH.name, &l).unwrap_or(0.0),
                handle.quantile(0.99),
                snapshot.gauge(c::TASK_CAPACITY.name, &l).unwrap_or(0.0),
            ));
        }
        s
    }
}

impl<W: Write + Send> MetricTarget for ConsoleTarget<W> {
    fn name(&self) -> &'static str {
        "console"
    }

    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError> {
        let table = self.render(snapshot);
        self.last = Some(snapshot.clone());
        self.out
            .write_all(table.as_bytes())
            .and_then(|_| self.out.flush())
            .map_err(|e| TargetError {
                target: "console",
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{catalog as c, Labels};
    use super::*;

    #[test]
    fn console_prints_source_and_task_rows() {
        let r = Registry::new(Labels::new([("topology", "t")]));
        r.counter(&c::SOURCE_ACKED, &Labels::default()).add(42);
        r.counter(&c::TASK_MESSAGES_IN, &Labels::new([("task", "split")]))
            .add(7);
        let mut t = ConsoleTarget::new(Vec::new());
        t.flush(&r.snapshot()).unwrap();
        let out = String::from_utf8(t.out.clone()).unwrap();
        assert!(out.starts_with("acked 42 "), "{out}");
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with("split") && l.contains(" 7 ")),
            "{out}"
        );
    }

    #[test]
    fn target_spec_parses_and_rejects_unknown_keys() {
        #[derive(Deserialize)]
        struct W {
            t: Vec<TargetSpec>,
        }
        let w: W =
            toml::from_str("t = [{ kind = \"console\" }, { kind = \"log\", level = \"debug\" }]")
                .unwrap();
        assert_eq!(
            w.t,
            vec![
                TargetSpec::Console,
                TargetSpec::Log {
                    level: LogLevel::Debug
                }
            ]
        );
        let e = toml::from_str::<W>("t = [{ kind = \"log\", levl = \"debug\" }]")
            .err()
            .unwrap();
        assert!(e.to_string().contains("levl"), "{e}");
    }
}
