//! The test runtime: run a topology over given input inside a `#[test]` and
//! assert on what happened to every root.
//!
//! ```
//! use tempest_core::{Msg, Pipeline, Topology, TaskResult};
//! use tempest_topology::testing::{RootStatus, TestRuntime};
//!
//! let topology = Topology::builder("upper")
//!     .pipeline(Pipeline::new().task("upper", || |m: Msg| -> TaskResult {
//!         let up = m.payload_str().ok_or("not UTF-8")?.to_uppercase();
//!         Ok(Some(vec![Msg::new(up)]))
//!     }))
//!     .build()
//!     .unwrap();
//! let report = TestRuntime::new(topology).input(["a", "b"]).run().unwrap();
//! assert!(report.all_acked());
//! let mut out: Vec<_> = report.output("upper").iter().map(|m| m.payload_str().unwrap().to_owned()).collect();
//! out.sort();
//! assert_eq!(out, ["A", "B"]);
//! assert_eq!(report.outcomes[0].status, RootStatus::Acked);
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;

use tempest_core::metrics::Snapshot;
use tempest_core::sources::MemorySource;
use tempest_core::{Msg, SourceId, Topology};

use crate::hub::{FailAction, RootEvent};
use crate::standalone::{RunError, RunReport, Standalone};

/// The final status of one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootStatus {
    /// Its tree completed and it was acked.
    Acked,
    /// It failed and the best-effort policy acked it anyway; the reason.
    Failed(String),
    /// The retry policy gave up and handed it to the source's `fail`.
    DeadLettered(String),
    /// It failed and the `none` policy left it un-acked.
    Unacked(String),
    /// Still in flight when the run's deadline passed.
    InFlight,
}

/// What happened to one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootOutcome {
    /// The source's id (the input index for [`TestRuntime::input`]).
    pub id: SourceId,
    /// Its final status.
    pub status: RootStatus,
    /// Attempts made (more than one after replays).
    pub attempts: u32,
    /// Failed attempts along the way, with their reasons.
    pub failures: Vec<String>,
}

/// The result of a test run.
#[derive(Debug, Clone)]
pub struct TestReport {
    /// One outcome per root, in source id order.
    pub outcomes: Vec<RootOutcome>,
    /// Every metric at the end of the run.
    pub metrics: Snapshot,
    /// What each task without outgoing edges emitted, by task name.
    pub outputs: BTreeMap<String, Vec<Msg>>,
    /// The run's own report.
    pub run: RunReport,
}

impl TestReport {
    /// True when every root was acked after a complete tree.
    pub fn all_acked(&self) -> bool {
        self.outcomes.iter().all(|o| o.status == RootStatus::Acked)
    }

    /// Roots with `status`.
    pub fn count(&self, status: impl Fn(&RootStatus) -> bool) -> usize {
        self.outcomes.iter().filter(|o| status(&o.status)).count()
    }

    /// The outcome of the root with source id `id`.
    pub fn outcome(&self, id: impl Into<SourceId>) -> Option<&RootOutcome> {
        let id = id.into();
        self.outcomes.iter().find(|o| o.id == id)
    }

    /// What sink task `task` emitted (empty if none or unknown).
    pub fn output(&self, task: &str) -> &[Msg] {
        self.outputs.get(task).map_or(&[], Vec::as_slice)
    }
}

/// Runs a topology standalone over given input until every root is settled
/// or a deadline passes.
pub struct TestRuntime {
    topology: Topology,
    input: Option<Vec<Msg>>,
    deadline: Duration,
}

impl TestRuntime {
    /// A test run of `topology` (with its own source unless `input` is given).
    pub fn new(topology: Topology) -> Self {
        TestRuntime {
            topology,
            input: None,
            deadline: Duration::from_secs(30),
        }
    }

    /// Feeds these messages from a memory source; root `i` has source id `i`.
    pub fn input<M: Into<Msg>>(mut self, msgs: impl IntoIterator<Item = M>) -> Self {
        self.input = Some(msgs.into_iter().map(Into::into).collect());
        self
    }

    /// Stops the run after this long even if roots are in flight (default 30 s).
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// Runs on a fresh multi-threaded tokio runtime.
    pub fn run(self) -> Result<TestReport, RunError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| {
                RunError::Source(tempest_core::SourceError::fatal(
                    tempest_core::SourceErrorKind::Connect,
                    format!("cannot start the tokio runtime: {e}"),
                ))
            })?;
        rt.block_on(self.run_async())
    }

    /// Runs on the current tokio runtime (which must be multi-threaded or
    /// `#[tokio::test(flavor = "multi_thread")]`).
    pub async fn run_async(mut self) -> Result<TestReport, RunError> {
        let input_len = self.input.as_ref().map(|i| i.len() as u64);
        if let Some(input) = self.input.take() {
            self.topology.set_source(
                tempest_core::DEFAULT_SOURCE,
                Box::new(MemorySource::new(input)),
            );
        }
        let (stop, shutdown) = watch::channel(false);
        let deadline = self.deadline;
        let timer = tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let _ = stop.send(true);
        });
        // Past the deadline, nothing more is awaited: the grace period is zero.
        self.topology.settings.grace_period = Duration::ZERO;
        let (run, hub) = Standalone::new(self.topology)
            .with_hub(|hub| {
                hub.record_events();
                hub.capture_sink_outputs();
            })
            .run(shutdown)
            .await?;
        timer.abort();

        let (events, outputs) = {
            let mut hub = hub.lock();
            (hub.take_events(), hub.take_sink_outputs())
        };
        let mut by_id: BTreeMap<SourceId, RootOutcome> = BTreeMap::new();
        for event in events {
            let (id, status, attempts, failure) = match event {
                RootEvent::Acked { id, attempts } => (id, RootStatus::Acked, attempts, None),
                RootEvent::Failed { id, reason, action } => {
                    let msg = reason.message.clone();
                    let status = match action {
                        FailAction::AckedAnyway => RootStatus::Failed(msg.clone()),
                        FailAction::Replaying | FailAction::Lost => RootStatus::InFlight,
                        FailAction::DeadLettered => RootStatus::DeadLettered(msg.clone()),
                        FailAction::LeftUnacked => RootStatus::Unacked(msg.clone()),
                    };
                    (id, status, reason.attempts, Some(msg))
                }
            };
            let o = by_id.entry(id).or_insert_with(|| RootOutcome {
                id,
                status: RootStatus::InFlight,
                attempts: 0,
                failures: Vec::new(),
            });
            o.status = status;
            o.attempts = o.attempts.max(attempts);
            o.failures.extend(failure);
        }
        // Input never settled (the deadline passed) is in flight.
        if let Some(n) = input_len {
            for i in 0..n {
                by_id
                    .entry(SourceId::from(i))
                    .or_insert_with(|| RootOutcome {
                        id: SourceId::from(i),
                        status: RootStatus::InFlight,
                        attempts: 1,
                        failures: Vec::new(),
                    });
            }
        }
        Ok(TestReport {
            outcomes: by_id.into_values().collect(),
            metrics: run.metrics.clone(),
            outputs: outputs.into_iter().collect(),
            run,
        })
    }
}
