//! # tempest-topology
//!
//! The topology service: the [`roots`] of a topology (admission, the ack
//! ledger, the failure policy and replays) and the source [`driver`] that
//! feeds them; the topology [`server`], which keeps the roots and the
//! membership while its task workers send messages to each other; the
//! in-process [`hub`] and the two runtimes built on it, [`standalone`] (one
//! process, for development) and [`testing`] (for `#[test]`s); and the
//! Prometheus [`scrape`] endpoint every process serves when asked to.

#![warn(missing_docs)]

pub mod driver;
pub mod hub;
pub mod roots;
pub mod scrape;
pub mod server;
pub mod standalone;
pub mod testing;

pub use driver::DriveEnd;
pub use server::{ServerConfig, TopologyServer};
pub use standalone::{RunError, RunReport, Standalone};
pub use testing::{RootOutcome, RootStatus, TestReport, TestRuntime};
