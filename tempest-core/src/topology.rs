//! [`Topology`]: a source, a pipeline and the settings that run them.
//!
//! Every setting here has a default, can be set in code with
//! [`TopologyBuilder`], and can be overridden at run time from
//! `Topology.toml` (see [`crate::config`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, TopologyFile};
use crate::metrics::TargetSpec;
use crate::pipeline::{Dag, Pipeline, PipelineErrors};
use crate::source::{FromConfig, Source};

/// What happens to a root whose tree errored or timed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Count it as failed, ack it at the source and move on (at-most-once
    /// for failed work; the flow never stalls).
    BestEffort,
    /// Replay the root up to `max_attempts` times in all, waiting `backoff`,
    /// doubling up to `max_backoff`, between attempts; then hand it to the
    /// source's `fail` (a dead letter).
    Retry {
        /// Attempts in all, the first included (at least 1).
        max_attempts: u32,
        /// Wait before the first replay.
        backoff: Duration,
        /// Upper bound of the doubling wait.
        max_backoff: Duration,
    },
    /// Leave it un-acked at the broker, which redelivers it by its own rules
    /// (a Redis pending entry, a JetStream ack wait). The source's `fail` is
    /// not called.
    None,
}

impl FailurePolicy {
    /// A retry policy with the default back-off (100 ms doubling to 10 s).
    pub fn retry(max_attempts: u32) -> Self {
        FailurePolicy::Retry {
            max_attempts,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }

    /// The wait before replay number `attempt` (1 = first replay), if the
    /// policy replays at all and attempts are left.
    pub fn replay_delay(&self, attempts_done: u32) -> Option<Duration> {
        match self {
            FailurePolicy::Retry {
                max_attempts,
                backoff,
                max_backoff,
            } if attempts_done < *max_attempts => {
                let doublings = attempts_done.saturating_sub(1).min(30);
                Some(backoff.saturating_mul(1 << doublings).min(*max_backoff))
            }
            _ => None,
        }
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailurePolicy::BestEffort => f.write_str("best_effort"),
            FailurePolicy::Retry { max_attempts, .. } => {
                write!(f, "retry (max {max_attempts} attempts)")
            }
            FailurePolicy::None => f.write_str("none"),
        }
    }
}

/// Where and how often metrics are flushed.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSettings {
    /// How often targets receive a snapshot.
    pub flush_interval: Duration,
    /// The targets (console, log, ...).
    pub targets: Vec<TargetSpec>,
}

impl Default for MetricSettings {
    fn default() -> Self {
        MetricSettings {
            flush_interval: Duration::from_secs(10),
            targets: Vec::new(),
        }
    }
}

/// The run-time settings of a topology.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The topology's name (a label on every metric).
    pub name: String,
    /// A root not complete within this time fails with a timeout.
    pub message_timeout: Duration,
    /// The most roots in flight; polling stops at this count.
    pub max_pending: usize,
    /// What happens to failed roots.
    pub failure: FailurePolicy,
    /// How long a shutdown waits for roots in flight.
    pub grace_period: Duration,
    /// The most messages a worker takes (or a source poll asks for) at once.
    pub batch_size: usize,
    /// Worker counts by task name, applied over the pipeline's own.
    pub workers: BTreeMap<String, u32>,
    /// Metric flushing.
    pub metrics: MetricSettings,
}

impl Settings {
    /// Defaults for a topology called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Settings {
            name: name.into(),
            message_timeout: Duration::from_secs(30),
            max_pending: 10_000,
            failure: FailurePolicy::BestEffort,
            grace_period: Duration::from_secs(10),
            batch_size: 256,
            workers: BTreeMap::new(),
            metrics: MetricSettings::default(),
        }
    }
}

type SourceCtor = Arc<dyn Fn(&toml::Table) -> Result<Box<dyn Source>, ConfigError> + Send + Sync>;

/// The kinds of source a `Topology.toml` may name in `[source] kind`.
#[derive(Clone, Default)]
pub struct SourceKinds {
    kinds: BTreeMap<String, SourceCtor>,
}

impl SourceKinds {
    /// Registers a kind built from its `[source.config]` table.
    pub fn register<S: Source + FromConfig>(&mut self, kind: impl Into<String>) {
        self.kinds.insert(
            kind.into(),
            Arc::new(|table: &toml::Table| Ok(Box::new(S::from_config(table)?) as Box<dyn Source>)),
        );
    }

    /// Builds a source of `kind` from its table.
    pub fn build(
        &self,
        kind: &str,
        table: &toml::Table,
    ) -> Option<Result<Box<dyn Source>, ConfigError>> {
        self.kinds.get(kind).map(|ctor| ctor(table))
    }

    /// The registered kind names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }
}

/// A source, a pipeline and their settings, as written in code. Run it with a
/// runtime; `Topology.toml` may override its settings first.
pub struct Topology {
    /// The settings.
    pub settings: Settings,
    /// The source given in code, if any.
    pub source: Option<Box<dyn Source>>,
    /// Source kinds that `Topology.toml` may select.
    pub source_kinds: SourceKinds,
    /// The pipeline.
    pub pipeline: Pipeline,
}

impl Topology {
    /// Starts a builder for a topology called `name`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tempest_core::{FailurePolicy, Msg, Pipeline, Topology, TaskResult};
    /// use tempest_core::sources::MemorySource;
    ///
    /// let topology = Topology::builder("echo")
    ///     .source(MemorySource::new(["a", "b"]))
    ///     .pipeline(Pipeline::new().task("echo", || |m: Msg| -> TaskResult { Ok(Some(vec![m])) }))
    ///     .failure_policy(FailurePolicy::retry(3))
    ///     .message_timeout(Duration::from_secs(5))
    ///     .max_pending(1000)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(topology.settings.max_pending, 1000);
    /// ```
    pub fn builder(name: impl Into<String>) -> TopologyBuilder {
        let mut source_kinds = SourceKinds::default();
        crate::sources::register_builtin(&mut source_kinds);
        TopologyBuilder {
            topology: Topology {
                settings: Settings::new(name),
                source: None,
                source_kinds,
                pipeline: Pipeline::new(),
            },
        }
    }

    /// Applies a parsed `Topology.toml` over the settings (and source) given in code.
    pub fn apply(&mut self, file: &TopologyFile) -> Result<(), crate::config::ConfigErrors> {
        file.apply(self)
    }

    /// Validates the pipeline with the worker overrides applied.
    pub fn dag(&mut self) -> Result<Dag, PipelineErrors> {
        let mut unknown = Vec::new();
        for (task, &n) in &self.settings.workers {
            if !self.pipeline.set_workers(task, n) {
                unknown.push(crate::pipeline::PipelineError::UnknownTask {
                    edge: "[tasks] in Topology.toml".into(),
                    task: task.clone(),
                });
            }
        }
        match self.pipeline.validate() {
            Ok(dag) if unknown.is_empty() => Ok(dag),
            Ok(_) => Err(PipelineErrors(unknown)),
            Err(PipelineErrors(mut errs)) => {
                errs.extend(unknown);
                Err(PipelineErrors(errs))
            }
        }
    }

    /// Takes the source out, for the runtime that polls it.
    pub fn take_source(&mut self) -> Option<Box<dyn Source>> {
        self.source.take()
    }
}

/// Builds a [`Topology`]. See [`Topology::builder`].
pub struct TopologyBuilder {
    topology: Topology,
}

impl TopologyBuilder {
    /// The source in code (a `Topology.toml` `[source] kind` replaces it).
    pub fn source(mut self, source: impl Source) -> Self {
        self.topology.source = Some(Box::new(source));
        self
    }

    /// Lets `Topology.toml` select `S` as `[source] kind = "<kind>"`, built
    /// from `[source.config]`.
    pub fn source_kind<S: Source + FromConfig>(mut self, kind: impl Into<String>) -> Self {
        self.topology.source_kinds.register::<S>(kind);
        self
    }

    /// Registers several source kinds at once (a connector crate's
    /// `register`, for instance).
    pub fn source_kinds(mut self, register: impl FnOnce(&mut SourceKinds)) -> Self {
        register(&mut self.topology.source_kinds);
        self
    }

    /// The pipeline.
    pub fn pipeline(mut self, pipeline: Pipeline) -> Self {
        self.topology.pipeline = pipeline;
        self
    }

    /// The failure policy (default: best effort).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.topology.settings.failure = policy;
        self
    }

    /// The time a root has to complete (default 30 s).
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.topology.settings.message_timeout = timeout;
        self
    }

    /// The most roots in flight (default 10,000).
    pub fn max_pending(mut self, n: usize) -> Self {
        self.topology.settings.max_pending = n;
        self
    }

    /// How long shutdown waits for roots in flight (default 10 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.topology.settings.grace_period = grace;
        self
    }

    /// The most messages handed to a worker at once (default 256).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.topology.settings.batch_size = n;
        self
    }

    /// Adds a metrics target.
    pub fn metric_target(mut self, target: TargetSpec) -> Self {
        self.topology.settings.metrics.targets.push(target);
        self
    }

    /// How often metrics are flushed (default 10 s).
    pub fn metric_flush_interval(mut self, every: Duration) -> Self {
        self.topology.settings.metrics.flush_interval = every;
        self
    }

    /// Checks the settings and the pipeline and returns the topology.
    pub fn build(mut self) -> Result<Topology, BuildError> {
        let mut problems = self.topology.settings.problems();
        if let Err(PipelineErrors(errs)) = self.topology.dag() {
            problems.extend(errs.into_iter().map(|e| e.to_string()));
        }
        if problems.is_empty() {
            Ok(self.topology)
        } else {
            Err(BuildError(problems))
        }
    }
}

impl Settings {
    /// Every problem with these settings' values.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push("the topology name is empty".to_string());
        }
        if self.message_timeout.is_zero() || self.message_timeout > crate::ledger::MAX_TIMEOUT {
            p.push(format!(
                "message_timeout {:?} is out of range (1ms to {:?})",
                self.message_timeout,
                crate::ledger::MAX_TIMEOUT
            ));
        }
        if self.max_pending == 0 {
            p.push("max_pending must be at least 1".to_string());
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            p.push(format!(
                "batch_size {} is out of range (1 to 65536)",
                self.batch_size
            ));
        }
        if let FailurePolicy::Retry {
            max_attempts,
            backoff,
            max_backoff,
        } = &self.failure
        {
            if *max_attempts == 0 {
                p.push("failure.max_attempts must be at least 1".to_string());
            }
            if backoff > max_backoff {
                p.push("failure.backoff is longer than failure.max_backoff".to_string());
            }
        }
        if self.metrics.flush_interval < Duration::from_millis(10) {
            p.push("metric.flush_interval must be at least 10ms".to_string());
        }
        p
    }
}

/// Everything wrong with a topology built in code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError(pub Vec<String>);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid topology ({} problem(s))", self.0.len())?;
        for p in &self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BuildError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_doubles_and_caps() {
        let p = FailurePolicy::Retry {
            max_attempts: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
        };
        assert_eq!(p.replay_delay(1), Some(Duration::from_millis(100)));
        assert_eq!(p.replay_delay(2), Some(Duration::from_millis(200)));
        assert_eq!(p.replay_delay(3), Some(Duration::from_millis(300)));
        assert_eq!(p.replay_delay(4), Some(Duration::from_millis(300)));
        assert_eq!(p.replay_delay(5), None);
        assert_eq!(FailurePolicy::BestEffort.replay_delay(1), None);
    }
}
