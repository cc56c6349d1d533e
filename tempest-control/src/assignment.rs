//! Assignments and heartbeats: what the director wants an agent to run, and
//! what the agent reports it is running.
//!
//! The agent sends a [`Heartbeat`] every interval; the director answers with
//! the agent's whole [`Assignment`], and the agent converges to it: starts
//! what is missing, stops what is no longer assigned, leaves the rest alone.
//! Assignments are declarative, so applying one twice changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::credentials::Secret;

/// The part a process plays in a topology.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The topology server (`PKG topology`).
    Topology,
    /// A task worker (`PKG task`).
    Task,
}

/// One process the director wants running on an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Stable id, unique in the cluster, e.g. `wordcount/server` or
    /// `wordcount/count/1`.
    pub id: String,
    /// The topology's deployed name.
    pub topology: String,
    /// The package's content hash (sha256 of the archive, hex).
    pub package: String,
    /// Server or worker.
    pub role: Role,
    /// The task a worker runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The instance a worker claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    /// For a worker, its task's instance count in the current layout. The
    /// agent passes it as `--instances`, with [`ProcessSpec::generation`]
    /// as the layout version (`--layout`): the topology server adopts a
    /// task's count from the worker with the highest layout, so a worker
    /// of an older layout with another count is refused. Without it the
    /// worker takes the count from its configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    /// Where a worker finds its topology server, `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_addr: Option<String>,
    /// A `Topology.toml` to run with instead of the package's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The deployment's data-plane secret: the director makes one per
    /// deployment, and the agent gives it to the process only as the
    /// environment variable [`DATA_SECRET_ENV`](crate::credentials::DATA_SECRET_ENV).
    /// The topology's server and workers prove it to each other; it opens
    /// nothing else. Never shown (its `Debug` hides it, and the APIs show
    /// only whether there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_secret: Option<Secret>,
    /// The deployment's data-plane certificate and key, issued by the
    /// cluster CA (when the director has the CA's key): the agent writes
    /// them to files only it and the process can read and passes their
    /// paths as [`DATA_TLS_CERT_ENV`](crate::tls::DATA_TLS_CERT_ENV) and its
    /// siblings, so the topology's links are TLS with both sides checked.
    /// Never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_tls: Option<crate::tls::IssuedCert>,
    /// Bumped each time the director re-places or changes this process; a
    /// process of an older generation is stopped and replaced (fencing).
    #[serde(default)]
    pub generation: u64,
}

/// The state of a supervised process.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    /// Fetching its package or being started.
    Starting,
    /// Running.
    Running,
    /// Exited; waiting to be restarted.
    Backoff,
    /// Being stopped (SIGTERM sent, SIGKILL after the grace period).
    Stopping,
    /// Stopped on purpose.
    Stopped,
    /// Cannot be started (bad package, no free port), with the reason in
    /// [`ProcessStatus::error`].
    Failed,
}

/// What an agent reports of one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    /// The spec's id.
    pub id: String,
    /// The topology.
    pub topology: String,
    /// Server or worker.
    pub role: Role,
    /// The task of a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The instance of a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
    /// The OS process id while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its state.
    pub state: ProcessState,
    /// Times it was restarted after exiting.
    pub restarts: u32,
    /// Seconds since it was last started.
    pub uptime_secs: u64,
    /// For a topology server: the address workers connect to. For a
    /// worker: the address its upstream workers open peer links to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// For a process that serves metrics: its scrape address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
    /// The spec generation it runs.
    #[serde(default)]
    pub generation: u64,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A node's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The host name.
    pub hostname: String,
    /// The agent's version.
    pub agent_version: String,
    /// CPU cores.
    pub cores: u32,
    /// Memory in all, bytes.
    pub memory_total: u64,
    /// Memory available, bytes.
    pub memory_available: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Free bytes on the data directory's file system.
    pub disk_free: u64,
}

/// What an agent sends the director every heartbeat interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The agent's stable id (kept in its data directory).
    pub agent_id: String,
    /// The address of the agent's HTTP API, as others should reach it.
    pub address: String,
    /// The node's figures.
    pub node: NodeInfo,
    /// Every process the agent supervises.
    pub processes: Vec<ProcessStatus>,
}

/// The director's answer to a heartbeat: every process this agent should run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The processes, by id.
    pub processes: Vec<ProcessSpec>,
}

/// An error body of every Tempest HTTP API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What is wrong.
    pub error: String,
}

impl ApiError {
    /// An error with this message.
    pub fn new(error: impl Into<String>) -> Self {
        ApiError {
            error: error.into(),
        }
    }
}

/// Checks a topology's or a task's name (`what` says which, for the
/// error): 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`
/// (names become process ids, paths and metric labels).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad {what} `{name}`: use 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`"
        ))
    }
}

/// Checks one environment variable a deploy gives a topology's processes:
/// a name of letters, digits and `_` not starting with a digit, not one of
/// the agent's own `TEMPEST_*` names, and a value without NUL. The error
/// names the variable and what is wrong.
pub fn check_env_var(name: &str, value: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(format!(
            "bad environment variable name `{name}`: use letters, digits and `_`, not starting with a digit"
        ));
    }
    if name.starts_with("TEMPEST_") {
        return Err(format!(
            "environment variable `{name}`: names starting with TEMPEST_ are set by the agent"
        ));
    }
    if value.contains('\0') {
        return Err(format!(
            "environment variable `{name}`: the value contains a NUL byte"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_refuse_unknown_fields() {
        let spec = ProcessSpec {
            id: "wc/count/1".into(),
            topology: "wc".into(),
            package: "ab".repeat(32),
            role: Role::Task,
            task: Some("count".into()),
            instance: Some(1),
            instances: Some(3),
            topology_addr: Some("10.0.0.2:7311".into()),
            config: None,
            env: BTreeMap::new(),
            data_secret: Some(Secret::new("s3cret-of-the-deployment", "test").unwrap()),
            data_tls: None,
            generation: 3,
        };
        let json = serde_json::to_string(&Assignment {
            processes: vec![spec.clone()],
        })
        .unwrap();
        let back: Assignment = serde_json::from_str(&json).unwrap();
        assert_eq!(back.processes, vec![spec.clone()]);
        assert!(json.contains("\"instances\":3"), "{json}");
        assert!(
            !format!("{spec:?}").contains("s3cret"),
            "a spec's Debug hides its secret"
        );
        let bad = json.replace("\"generation\"", "\"generatoin\"");
        assert!(serde_json::from_str::<Assignment>(&bad).is_err());

        // A spec without a count (a server, or from an older director)
        // leaves the key out, and reads back without one.
        let server = ProcessSpec {
            id: "wc/server".into(),
            role: Role::Topology,
            task: None,
            instance: None,
            instances: None,
            topology_addr: None,
            data_secret: None,
            data_tls: None,
            ..spec
        };
        let json = serde_json::to_string(&server).unwrap();
        assert!(!json.contains("instances"), "{json}");
        assert!(!json.contains("data_secret"), "{json}");
        let back: ProcessSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, server);
    }
}
