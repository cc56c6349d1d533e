//! [`KafkaServer`]: a Kafka-compatible broker for tests, [tansu] 0.6.0 (a
//! broker written in Rust; no Kafka broker is packaged in Debian and no
//! container images can be pulled here).
//!
//! The binary is found at, in order: `$TEMPEST_TANSU`;
//! `${XDG_CACHE_HOME:-$HOME/.cache}/tempest-tools/tansu-0.6.0/bin/tansu`,
//! where `scripts/test` installs it (`cargo install tansu@0.6.0 --locked
//! --features libsql,dynostore`); `tansu` on `PATH`. A missing binary is an
//! error saying to run `scripts/test`, never a skip.
//!
//! The broker listens on a free loopback port, stores in SQLite in a fresh
//! temporary directory (records, topics and committed offsets survive
//! [`Server::restart`]),
//! is ready when it answers a Kafka `ApiVersions` request, and is killed by
//! PID when dropped. Its output goes to `tansu.log` in its directory.
//!
//! [tansu]: https://crates.io/crates/tansu

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{wait_until, FixtureError, Process, Result, Server};

/// The tansu version `scripts/test` installs and the fixture looks for.
pub const TANSU_VERSION: &str = "0.6.0";

/// How long the broker may take to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The tansu binary: `$TEMPEST_TANSU`, the `scripts/test` cache, or `PATH`.
pub fn tansu_binary() -> Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    locate(
        std::env::var_os("TEMPEST_TANSU").filter(|p| !p.is_empty()),
        cache,
        std::env::var_os("PATH").unwrap_or_default(),
    )
}

fn locate(
    explicit: Option<std::ffi::OsString>,
    cache: Option<PathBuf>,
    path: std::ffi::OsString,
) -> Result<PathBuf> {
    if let Some(p) = explicit {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(FixtureError(format!(
                "TEMPEST_TANSU={} is not a file: unset it or point it at a tansu {TANSU_VERSION} binary",
                p.display()
            )))
        };
    }
    if let Some(cache) = cache {
        let p = cache
            .join("tempest-tools")
            .join(format!("tansu-{TANSU_VERSION}"))
            .join("bin/tansu");
        if p.is_file() {
            return Ok(p);
        }
    }
    std::env::split_paths(&path)
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            FixtureError(format!(
                "the Kafka-compatible broker `tansu` {TANSU_VERSION} is not installed: run scripts/test \
                 (it builds it once into ${{XDG_CACHE_HOME:-$HOME/.cache}}/tempest-tools/tansu-{TANSU_VERSION}), \
                 or `cargo install tansu@{TANSU_VERSION} --locked --features libsql,dynostore --root <dir>` \
                 and set TEMPEST_TANSU=<dir>/bin/tansu"
            ))
        })
}

/// A tansu broker on a free loopback port (see the module documentation).
/// Derefs to [`Server`] for its port, PID, `kill` and `restart`.
pub struct KafkaServer(Server);

impl std::ops::Deref for KafkaServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl std::ops::DerefMut for KafkaServer {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

impl KafkaServer {
    /// Starts a broker storing in SQLite in its directory: records, topics
    /// and committed offsets survive [`Server::restart`] and [`Server::kill`].
    ///
    /// (tansu's in-memory engine, `memory://`, is not offered: in 0.6.0 it
    /// reports an end offset of 1 for every partition and serves records
    /// twice to a reader from the beginning.)
    pub fn start() -> Result<Self> {
        Server::start("tansu", spawn_sqlite).map(KafkaServer)
    }

    /// `127.0.0.1:PORT`: the `bootstrap.servers` of a client.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The broker's output so far (its `tansu.log`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

fn spawn_sqlite(dir: &Path, port: u16) -> Result<Process> {
    // tansu reads an SQLite URL relative to its working directory (`dir`).
    spawn(dir, port, "sqlite://tansu.db".to_owned())
}

fn spawn(dir: &Path, port: u16, storage: String) -> Result<Process> {
    let bin = tansu_binary()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let log_path = dir.join("tansu.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| FixtureError(format!("opening {}: {e}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| FixtureError(format!("opening {}: {e}", log_path.display())))?;
    let child = Command::new(&bin)
        .arg("broker")
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        .args(["--storage-engine", &storage])
        .current_dir(dir)
        .env(
            "RUST_LOG",
            std::env::var("TEMPEST_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| FixtureError(format!("starting {}: {e}", bin.display())))?;
    let mut proc = Process { child: Some(child) };
    wait_until(
        "tansu",
        START_TIMEOUT,
        || api_versions(port).is_ok(),
        &mut proc,
    )
    .map_err(|e| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        FixtureError(format!("{e}; its log ends:\n{}", tail.join("\n")))
    })?;
    Ok(proc)
}

/// Sends a Kafka `ApiVersions` (v0) request to `127.0.0.1:port` and checks
/// that a response with the same correlation id comes back: the broker is
/// up and speaking Kafka.
pub fn api_versions(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    const CORRELATION: i32 = 0x7e57;
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes()); // api key: ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // version 0
    body.extend_from_slice(&CORRELATION.to_be_bytes());
    body.extend_from_slice(&(-1i16).to_be_bytes()); // no client id
    let mut req = (body.len() as i32).to_be_bytes().to_vec();
    req.extend_from_slice(&body);
    s.write_all(&req)?;
    let mut head = [0u8; 8];
    s.read_exact(&mut head)?;
    let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let correlation = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if len < 4 || correlation != CORRELATION {
        return Err(std::io::Error::other(format!(
            "not a Kafka ApiVersions response (length {len}, correlation {correlation})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tansu_starts_answers_restarts_and_stops() {
        let mut k = KafkaServer::start().unwrap();
        api_versions(k.port()).unwrap();
        let pid = k.pid().unwrap();
        k.restart().unwrap();
        assert_ne!(k.pid().unwrap(), pid);
        api_versions(k.port()).unwrap();
        let pid = k.pid().unwrap();
        k.kill();
        assert!(api_versions(k.port()).is_err());
        k.restart().unwrap();
        drop(k);
        // SAFETY: signal 0 only checks that the PID exists.
        assert_ne!(unsafe { libc::kill(pid as libc::pid_t, 0) }, 0);
    }

    #[test]
    fn a_missing_binary_says_to_run_scripts_test() {
        let empty = tempfile::tempdir().unwrap();
        let e = locate(None, Some(empty.path().into()), empty.path().into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("run scripts/test"), "{e}");
        let e = locate(Some("/nonexistent/tansu".into()), None, "".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("TEMPEST_TANSU=/nonexistent/tansu"), "{e}");
        // The cache of scripts/test is found.
        let bin = empty.path().join("tempest-tools/tansu-0.6.0/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("tansu"), "").unwrap();
        assert_eq!(
            locate(None, Some(empty.path().into()), "".into()).unwrap(),
            bin.join("tansu")
        );
    }
}
