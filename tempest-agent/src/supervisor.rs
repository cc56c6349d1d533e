//! Process supervision: start, stop, restart with back-off, adopt after an
//! agent restart, keep logs. (Being written.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempest_control::{ProcessSpec, ProcessStatus};

/// How the supervisor runs processes.
#[derive(Clone, Debug)]
pub struct SupervisorOptions {
    /// SIGTERM, then SIGKILL after this long.
    pub stop_grace: Duration,
    /// The first restart wait; it doubles up to `restart_max`.
    pub restart_min: Duration,
    /// The longest restart wait.
    pub restart_max: Duration,
    /// A log file is rotated when it grows past this many bytes.
    pub log_max_bytes: u64,
    /// Rotated log files kept per stream.
    pub log_keep: usize,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        SupervisorOptions {
            stop_grace: Duration::from_secs(10),
            restart_min: Duration::from_millis(500),
            restart_max: Duration::from_secs(30),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
        }
    }
}

/// Everything needed to start one process of a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The assignment it comes from.
    pub spec: ProcessSpec,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// For a topology server: the address workers connect to.
    pub address: Option<String>,
    /// Where it serves metrics, if it does.
    pub metrics_address: Option<String>,
}

/// Which output stream of a process.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stream {
    /// stdout
    Stdout,
    /// stderr
    Stderr,
}

/// What one `converge` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Converged {
    /// Ids started.
    pub started: Vec<String>,
    /// Ids stopped (no longer assigned).
    pub stopped: Vec<String>,
    /// Ids replaced (their spec changed).
    pub replaced: Vec<String>,
}

/// Supervises the node's processes. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Supervisor {
    _dir: PathBuf,
}

impl Supervisor {
    /// Opens the supervisor over `data_dir`: reads what a previous run
    /// recorded there and adopts its processes that still run (or stops them).
    pub fn open(data_dir: &Path, _options: SupervisorOptions) -> std::io::Result<Self> {
        Ok(Supervisor {
            _dir: data_dir.to_path_buf(),
        })
    }

    /// Makes the running set equal `desired` (by spec id).
    pub fn converge(&self, _desired: Vec<Launch>) -> Converged {
        Converged::default()
    }

    /// The status of every supervised process.
    pub fn statuses(&self) -> Vec<ProcessStatus> {
        Vec::new()
    }

    /// The last `lines` lines a process wrote to `stream`.
    pub fn log_tail(&self, _id: &str, _stream: Stream, _lines: usize) -> Option<String> {
        None
    }

    /// Ids of the processes supervised, with the launch each runs.
    pub fn launches(&self) -> Vec<Launch> {
        Vec::new()
    }

    /// Stops every process (SIGTERM, SIGKILL after the grace period).
    pub async fn stop_all(&self) {}
}
