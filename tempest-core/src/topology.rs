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
use crate::pipeline::{valid_source_name, Dag, Pipeline, PipelineErrors};
use crate::source::{FromConfig, Source, DEFAULT_SOURCE};

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
    /// The most roots in flight of each source; polling that source stops at
    /// this count.
    pub max_pending: usize,
    /// `max_pending` of single sources, by source name, over the one above.
    pub source_max_pending: BTreeMap<String, usize>,
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
    /// The `max_pending` of the source called `source`.
    pub fn max_pending_of(&self, source: &str) -> usize {
        self.source_max_pending
            .get(source)
            .copied()
            .unwrap_or(self.max_pending)
    }

    /// Defaults for a topology called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Settings {
            name: name.into(),
            message_timeout: Duration::from_secs(30),
            max_pending: 10_000,
            source_max_pending: BTreeMap::new(),
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

/// A source of a topology and its name (the `source` label of its metrics,
/// the name its pipeline edges use).
pub struct NamedSource {
    /// The name ([`DEFAULT_SOURCE`] when the topology does not name it).
    pub name: String,
    /// The source.
    pub source: Box<dyn Source>,
}

/// Sources, a pipeline and their settings, as written in code. Run it with a
/// runtime; `Topology.toml` may override its settings first.
pub struct Topology {
    /// The settings.
    pub settings: Settings,
    /// The sources given so far (in code, then by `Topology.toml`), by name.
    pub sources: Vec<NamedSource>,
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
                sources: Vec::new(),
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

    /// Sets the source called `name`, replacing one of that name.
    pub fn set_source(&mut self, name: impl Into<String>, source: Box<dyn Source>) {
        let name = name.into();
        match self.sources.iter_mut().find(|s| s.name == name) {
            Some(s) => s.source = source,
            None => self.sources.push(NamedSource { name, source }),
        }
    }

    /// True when a source called `name` is given.
    pub fn has_source(&self, name: &str) -> bool {
        self.sources.iter().any(|s| s.name == name)
    }

    /// Takes the sources out for the runtime that polls them, in the order
    /// of `dag`'s sources (so index `i` feeds `dag.sources()[i].feeds`).
    /// Every source the pipeline names must be given, and every source given
    /// must feed a task.
    pub fn take_sources(&mut self, dag: &Dag) -> Result<Vec<NamedSource>, SourcesError> {
        if self.sources.is_empty() {
            return Err(SourcesError::None);
        }
        let mut problems = Vec::new();
        for given in &self.sources {
            if !dag.sources().iter().any(|s| s.name == given.name) {
                problems.push(if dag.sources().len() == 1 && given.name == DEFAULT_SOURCE {
                    format!(
                        "the topology's unnamed source feeds no task: the pipeline names its sources ({}); name this one with named_source or [sources.NAME]",
                        dag.sources()[0].name
                    )
                } else {
                    format!(
                        "source `{}` feeds no task: add edge_from_source(\"{}\", <task>) to the pipeline",
                        given.name, given.name
                    )
                });
            }
        }
        for wanted in dag.sources() {
            if !self.has_source(&wanted.name) {
                let feeds: Vec<&str> = wanted
                    .feeds
                    .iter()
                    .map(|t| dag.task(*t).name.as_str())
                    .collect();
                problems.push(format!(
                    "source `{}` (which feeds {}) is not given: give it in code or as [sources.{}] kind in Topology.toml",
                    wanted.name,
                    feeds.join(", "),
                    wanted.name
                ));
            }
        }
        if !problems.is_empty() {
            return Err(SourcesError::Mismatch(BuildError(problems)));
        }
        let mut given = std::mem::take(&mut self.sources);
        let mut out = Vec::with_capacity(given.len());
        for wanted in dag.sources() {
            if let Some(i) = given.iter().position(|s| s.name == wanted.name) {
                out.push(given.swap_remove(i));
            }
        }
        Ok(out)
    }
}

/// The sources given do not match the ones the pipeline names.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// No source at all.
    #[error("the topology has no source: give one in code or as [source] kind in Topology.toml")]
    None,
    /// Sources missing, or given and feeding nothing.
    #[error("{0}")]
    Mismatch(BuildError),
}

/// Builds a [`Topology`]. See [`Topology::builder`].
pub struct TopologyBuilder {
    topology: Topology,
}

impl TopologyBuilder {
    /// The source in code, for a topology with one source (a
    /// `Topology.toml` `[source] kind` replaces it). Its name is
    /// [`DEFAULT_SOURCE`] and it feeds the pipeline's root.
    pub fn source(mut self, source: impl Source) -> Self {
        self.topology.set_source(DEFAULT_SOURCE, Box::new(source));
        self
    }

    /// A source called `name`, one of several (Storm's spouts): it feeds the
    /// tasks the pipeline's [`Pipeline::edge_from_source`] edges name, has
    /// its own `max_pending`, and its roots are acked, failed and replayed at
    /// it alone. A `Topology.toml` `[sources.NAME] kind` replaces it.
    ///
    /// ```
    /// use tempest_core::{Msg, Pipeline, Topology, TaskResult};
    /// use tempest_core::sources::MemorySource;
    ///
    /// let noop = || |_m: Msg| -> TaskResult { Ok(None) };
    /// let mut topology = Topology::builder("shop")
    ///     .named_source("orders", MemorySource::new(["o1", "o2"]))
    ///     .named_source("refunds", MemorySource::new(["r1"]))
    ///     .source_max_pending("refunds", 100)
    ///     .pipeline(
    ///         Pipeline::new()
    ///             .task("orders", noop)
    ///             .task("refunds", noop)
    ///             .edge_from_source("orders", "orders")
    ///             .edge_from_source("refunds", "refunds"),
    ///     )
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(topology.settings.max_pending_of("refunds"), 100);
    /// let dag = topology.dag().unwrap();
    /// let sources = topology.take_sources(&dag).unwrap();
    /// assert_eq!(sources[1].name, "refunds");
    /// ```
    pub fn named_source(mut self, name: impl Into<String>, source: impl Source) -> Self {
        self.topology.set_source(name, Box::new(source));
        self
    }

    /// The most roots in flight of the source called `name` (default: the
    /// topology's `max_pending`).
    pub fn source_max_pending(mut self, name: impl Into<String>, n: usize) -> Self {
        self.topology
            .settings
            .source_max_pending
            .insert(name.into(), n);
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
        for (source, &n) in &self.source_max_pending {
            if n == 0 {
                p.push(format!(
                    "max_pending of source `{source}` must be at least 1"
                ));
            }
            if !valid_source_name(source) {
                p.push(format!(
                    "source name `{source}` is not valid: use 1 to 64 letters, digits, `_` or `-`"
                ));
            }
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
