//! # tempest-control
//!
//! The model the control plane shares: the CLI writes [`package`]s, the
//! director stores them and assigns processes ([`assignment`]), the agents
//! run those processes and report back in heartbeats. Only data and pure
//! functions live here; no daemon depends on another's code.

#![warn(missing_docs)]

pub mod assignment;
pub mod credentials;
pub mod exposition;
pub mod failures;
pub mod package;
pub mod tls;

pub use assignment::{
    check_env_var, check_name, ApiError, Assignment, Heartbeat, NodeInfo, ProcessSpec,
    ProcessState, ProcessStatus, Role,
};
pub use credentials::{CredentialError, Secret};
pub use package::{Manifest, PackageError};
