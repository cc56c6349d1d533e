//! The supervisor's state file, `<data_dir>/processes.json`: for each
//! process, the launch it should run, the process that runs (its launch,
//! pid and start time) and its restart count. Written atomically
//! (temporary file, fsync, rename).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tempest_control::ProcessSpec;

use super::Launch;

/// The format version written.
pub(crate) const VERSION: u32 = 1;

/// The whole file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub version: u32,
    #[serde(default)]
    pub processes: Vec<Record>,
}

/// One supervised process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub id: String,
    /// What should run; `None` while it is being stopped for good.
    #[serde(default)]
    pub launch: Option<LaunchRecord>,
    /// What runs.
    #[serde(default)]
    pub running: Option<RunningRecord>,
    #[serde(default)]
    pub restarts: u32,
    /// The last run exited on its own (so its next start is a restart).
    #[serde(default)]
    pub exited: bool,
    /// Why the last run exited or the last start failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A running process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RunningRecord {
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22 (clock ticks after boot); 0 if unknown.
    pub start_time: u64,
    pub launch: LaunchRecord,
}

/// A [`Launch`], with the program path kept exact even when it is not UTF-8.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LaunchRecord {
    pub spec: ProcessSpec,
    pub program: PathRepr,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub metrics_address: Option<String>,
}

/// A path as a string, or as bytes when it is not UTF-8.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum PathRepr {
    Text(String),
    Bytes(Vec<u8>),
}

impl From<&Path> for PathRepr {
    fn from(path: &Path) -> Self {
        match path.to_str() {
            Some(text) => PathRepr::Text(text.to_string()),
            None => PathRepr::Bytes(path.as_os_str().as_bytes().to_vec()),
        }
    }
}

impl From<PathRepr> for PathBuf {
    fn from(repr: PathRepr) -> Self {
        match repr {
            PathRepr::Text(text) => PathBuf::from(text),
            PathRepr::Bytes(bytes) => PathBuf::from(OsString::from_vec(bytes)),
        }
    }
}

impl From<&Launch> for LaunchRecord {
    fn from(launch: &Launch) -> Self {
        LaunchRecord {
            spec: launch.spec.clone(),
            program: PathRepr::from(launch.program.as_path()),
            args: launch.args.clone(),
            env: launch.env.clone(),
            address: launch.address.clone(),
            metrics_address: launch.metrics_address.clone(),
        }
    }
}

impl From<LaunchRecord> for Launch {
    fn from(record: LaunchRecord) -> Self {
        Launch {
            spec: record.spec,
            program: record.program.into(),
            args: record.args,
            env: record.env,
            address: record.address,
            metrics_address: record.metrics_address,
        }
    }
}

/// Reads the state file: `Ok(None)` when there is none, `Err` with a reason
/// when it cannot be read or parsed.
pub(crate) fn read(path: &Path) -> Result<Option<StateFile>, String> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let state: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    if state.version != VERSION {
        return Err(format!(
            "{}: unknown version {} (expected {VERSION})",
            path.display(),
            state.version
        ));
    }
    Ok(Some(state))
}

/// Writes `state` to `path` atomically.
pub(crate) fn write(path: &Path, state: &StateFile) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_control::Role;

    fn launch(program: PathBuf) -> Launch {
        Launch {
            spec: ProcessSpec {
                id: "t/server".into(),
                topology: "t".into(),
                package: "00".repeat(32),
                role: Role::Topology,
                task: None,
                instance: None,
                instances: None,
                topology_addr: None,
                config: Some("name = \"t\"".into()),
                env: BTreeMap::from([("A".into(), "1".into())]),
                data_secret: None,
                data_tls: None,
                generation: 7,
            },
            program,
            args: vec!["topology".into(), "--port".into(), "7311".into()],
            env: BTreeMap::from([("B".into(), "2".into())]),
            address: Some("127.0.0.1:7311".into()),
            metrics_address: None,
        }
    }

    #[test]
    fn launches_round_trip_exactly_even_with_non_utf8_programs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("processes.json");
        assert!(read(&path).unwrap().is_none());
        let plain = launch(PathBuf::from("/opt/pkg/bin/t"));
        let odd = launch(PathBuf::from(OsString::from_vec(b"/opt/\xff/t".to_vec())));
        let state = StateFile {
            version: VERSION,
            processes: vec![
                Record {
                    id: "a".into(),
                    launch: Some((&plain).into()),
                    running: Some(RunningRecord {
                        pid: 42,
                        start_time: 99,
                        launch: (&odd).into(),
                    }),
                    restarts: 3,
                    exited: false,
                    error: None,
                },
                Record {
                    id: "b".into(),
                    launch: None,
                    running: None,
                    restarts: 0,
                    exited: true,
                    error: Some("exited with status 1".into()),
                },
            ],
        };
        write(&path, &state).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back.processes.len(), 2);
        let a = &back.processes[0];
        assert_eq!(Launch::from(a.launch.clone().unwrap()), plain);
        let running = a.running.clone().unwrap();
        assert_eq!((running.pid, running.start_time), (42, 99));
        assert_eq!(Launch::from(running.launch), odd);
        assert_eq!(a.restarts, 3);
        assert!(back.processes[1].exited);
        assert_eq!(
            back.processes[1].error.as_deref(),
            Some("exited with status 1")
        );
        assert!(!dir.path().join("processes.json.tmp").exists());
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("processes.json");
        fs::write(&path, b"{not json").unwrap();
        assert!(read(&path).is_err());
        fs::write(&path, br#"{"version": 99, "processes": []}"#).unwrap();
        assert!(read(&path).unwrap_err().contains("version"));
        fs::write(&path, br#"{"version": 1, "processes": [{"id": 5}]}"#).unwrap();
        assert!(read(&path).is_err());
    }
}
