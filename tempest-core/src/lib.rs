//! # tempest-core
//!
//! The model every part of Tempest shares: [`Msg`], [`Task`], [`Source`],
//! [`Pipeline`], [`Topology`] and its [`Settings`], the `Topology.toml`
//! schema ([`config`]), the ack [`ledger`], the [`route`] every grouping
//! follows, the [`metrics`] registry, and the built-in [`sources`]. It has no runtime of its own: the topology server,
//! the task workers and the standalone runtime build on it.

#![warn(missing_docs)]

pub mod config;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod msg;
pub mod outputs;
pub mod pipeline;
pub mod route;
pub mod shutdown;
pub mod source;
pub mod sources;
pub mod task;
pub mod topology;
pub mod watermark;
pub mod work;

pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use config::{ConfigError, ConfigErrors, TopologyFile};
pub use ledger::{EdgeId, EdgeIds, Ledger, RootId};
pub use msg::Msg;
pub use pipeline::{Dag, DagSource, Grouping, Pipeline, PipelineError, PipelineErrors, TaskIdx};
pub use source::{
    FailReason, FromConfig, Health, Polled, Source, SourceError, SourceErrorKind, SourceId,
    SourceMsg, DEFAULT_SOURCE,
};
pub use task::{Task, TaskContext, TaskError, TaskFactory, TaskResult};
pub use topology::{
    BuildError, FailurePolicy, MetricSettings, NamedSource, Settings, SourceKinds, SourcesError,
    Topology, TopologyBuilder,
};
pub use work::{Delivery, Handled};
