//! # Tempest
//!
//! A Storm-style stream processor. A topology is a [`Source`] that polls a
//! broker and a [`Pipeline`], a DAG of [`Task`]s that handle its messages.
//! It compiles into one binary, the topology package, whose `main` is one
//! line:
//!
//! ```no_run
//! use tempest::{Msg, Pipeline, Topology, TaskResult};
//! use tempest::sources::MemorySource;
//!
//! fn topology() -> Topology {
//!     Topology::builder("hello")
//!         .source(MemorySource::new(["hello", "world"]))
//!         .pipeline(Pipeline::new().task("print", || |m: Msg| -> TaskResult {
//!             println!("{}", m.payload_str().unwrap_or("?"));
//!             Ok(None)
//!         }))
//!         .build()
//!         .expect("valid topology")
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     tempest::main(topology)
//! }
//! ```
//!
//! The binary then runs in the mode its command line names (see [`main`]).

#![warn(missing_docs)]

mod cli;

pub use cli::{init_logging, main, Cli, Mode};
pub use tempest_core::{
    async_trait, config, ledger, metrics, outputs, sources, BuildError, Bytes, ConfigError,
    ConfigErrors, Dag, FailReason, FailurePolicy, FromConfig, Grouping, Health, Msg, Pipeline,
    PipelineError, PipelineErrors, Polled, Settings, Source, SourceError, SourceErrorKind,
    SourceId, SourceMsg, Task, TaskContext, TaskError, TaskResult, Topology, TopologyBuilder,
    TopologyFile,
};
pub use tempest_topology::{testing, RunReport, Standalone};

/// The README's examples, compiled and run as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
