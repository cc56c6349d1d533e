//! # tempest-topology
//!
//! The topology service: the [`hub`] that admits source messages as roots,
//! routes every task's output along the DAG and settles roots in the ack
//! ledger; the source [`driver`]; the two in-process runtimes built on
//! them, [`standalone`] (one process, for development) and [`testing`] (for
//! `#[test]`s); and the Prometheus [`scrape`] endpoint every process serves
//! when asked to.

#![warn(missing_docs)]

pub mod driver;
pub mod hub;
pub mod scrape;
pub mod server;
pub mod standalone;
pub mod testing;

pub use driver::DriveEnd;
pub use server::{ServerConfig, TopologyServer};
pub use standalone::{RunError, RunReport, Standalone};
pub use testing::{RootOutcome, RootStatus, TestReport, TestRuntime};
