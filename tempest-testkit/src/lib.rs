//! # tempest-testkit
//!
//! Real servers for tests, in one place: [`RedisServer`] and [`NatsServer`]
//! start the Debian `redis-server` / `nats-server` binaries on a free
//! loopback port with a temporary data directory, wait until they answer,
//! and stop them by PID when dropped. A missing binary is an error that says
//! how to install it (`scripts/test` does), never a silent skip.
//!
//! [`cluster`] runs the Tempest daemons themselves (director, agents) for
//! end-to-end tests, and [`http`] is the small client those tests speak to
//! them with.

#![warn(missing_docs)]

pub mod cluster;
pub mod http;
pub mod kafka;
pub mod statsd;

pub use statsd::StatsdListener;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a server could not be started.
#[derive(Debug)]
pub struct FixtureError(pub String);

impl std::fmt::Display for FixtureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FixtureError {}

pub(crate) type Result<T> = std::result::Result<T, FixtureError>;

/// Finds a server binary on `PATH` or in the directories Debian installs to.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            FixtureError(format!(
                "`{name}` is not installed: run scripts/test (it installs the Debian package) or `apt-get install {name}`"
            ))
        })
}

/// A free TCP port on 127.0.0.1 (free when asked; servers retry on a race).
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| FixtureError(format!("finding a free port: {e}")))
}

/// A child process stopped (SIGKILL) and reaped when dropped.
struct Process {
    child: Option<Child>,
}

impl Process {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn stop(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL);
    }
}

/// Starts a server on a free port with a new data directory, trying a few
/// ports in case another process takes the one found free first.
fn start_on_free_port(
    name: &str,
    spawn: impl Fn(&Path, u16) -> Result<Process>,
) -> Result<(Process, u16, tempfile::TempDir)> {
    let dir = tempfile::tempdir().map_err(|e| FixtureError(format!("temp dir: {e}")))?;
    let mut last = None;
    for _ in 0..5 {
        let port = free_port()?;
        match spawn(dir.path(), port) {
            Ok(proc) => return Ok((proc, port, dir)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| FixtureError(format!("{name} did not start"))))
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
    proc: &mut Process,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = proc.exited() {
            return Err(FixtureError(format!(
                "{what} exited during start-up: {status}"
            )));
        }
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(FixtureError(format!(
        "{what} did not answer within {timeout:?}"
    )))
}

/// A server process on a fixed loopback port with its data in a temporary
/// directory: what [`RedisServer`] and [`NatsServer`] share (both deref to
/// it). It can be killed and restarted on the same port and data.
pub struct Server {
    proc: Process,
    port: u16,
    dir: tempfile::TempDir,
    spawn: fn(&Path, u16) -> Result<Process>,
}

impl Server {
    fn start(name: &str, spawn: fn(&Path, u16) -> Result<Process>) -> Result<Server> {
        let (proc, port, dir) = start_on_free_port(name, spawn)?;
        Ok(Server {
            proc,
            port,
            dir,
            spawn,
        })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Kills the server with SIGKILL (what it persisted is kept), leaving
    /// it down until [`Server::restart`].
    pub fn kill(&mut self) {
        self.proc.stop(libc::SIGKILL);
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.stop(libc::SIGKILL);
        self.proc = (self.spawn)(self.dir.path(), self.port)?;
        Ok(())
    }
}

/// A `redis-server` on a free loopback port, with its data (and an
/// append-only file, so a restart keeps the data) in a temporary directory.
pub struct RedisServer(Server);

impl std::ops::Deref for RedisServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl std::ops::DerefMut for RedisServer {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> Result<Self> {
        Server::start("redis-server", Self::spawn).map(RedisServer)
    }

    fn spawn(dir: &Path, port: u16) -> Result<Process> {
        let bin = find_binary("redis-server")?;
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir)
            .args([
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| FixtureError(format!("starting redis-server: {e}")))?;
        let mut proc = Process { child: Some(child) };
        wait_until(
            "redis-server",
            Duration::from_secs(10),
            || redis_ping(port),
            &mut proc,
        )?;
        Ok(proc)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command (as its words) and returns the raw RESP reply:
    /// enough for fixtures and assertions without a client library.
    pub fn command(&self, words: &[&str]) -> Result<String> {
        resp_command(self.port, words)
    }

    /// Sends many commands in one pipeline: see [`redis_pipeline`].
    pub fn pipeline(&self, commands: &[Vec<String>]) -> Result<Vec<String>> {
        redis_pipeline(self.port, commands)
    }
}

/// Sends many commands to the Redis server on `127.0.0.1:port` on one
/// connection without waiting for each
/// reply (a pipeline), then reads every reply: how tests feed a stream
/// fast. Returns the replies, rendered as [`RedisServer::command`] does.
pub fn redis_pipeline(port: u16, commands: &[Vec<String>]) -> Result<Vec<String>> {
    let err = |e: std::io::Error| FixtureError(format!("redis pipeline: {e}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(err)?;
    let mut req = String::new();
    for words in commands {
        req.push_str(&format!("*{}\r\n", words.len()));
        for w in words {
            req.push_str(&format!("${}\r\n{w}\r\n", w.len()));
        }
    }
    s.write_all(req.as_bytes()).map_err(err)?;
    let mut reader = BufReader::new(s);
    commands
        .iter()
        .map(|_| read_resp(&mut reader).map_err(err))
        .collect()
}

fn redis_ping(port: u16) -> bool {
    resp_command(port, &["PING"]).is_ok_and(|r| r.starts_with("+PONG"))
}

fn resp_command(port: u16, words: &[&str]) -> Result<String> {
    let err = |e: std::io::Error| FixtureError(format!("redis command {words:?}: {e}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    let mut req = format!("*{}\r\n", words.len());
    for w in words {
        req.push_str(&format!("${}\r\n{w}\r\n", w.len()));
    }
    s.write_all(req.as_bytes()).map_err(err)?;
    let mut reader = BufReader::new(s);
    read_resp(&mut reader).map_err(err)
}

/// Reads one RESP reply, rendered as text (arrays as nested lines).
fn read_resp(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let head = line.trim_end().to_owned();
    match head.chars().next() {
        Some('$') => {
            let n: i64 = head[1..].parse().unwrap_or(-1);
            if n < 0 {
                return Ok("(nil)".into());
            }
            let mut buf = vec![0; n as usize + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(n as usize);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        Some('*') => {
            let n: i64 = head[1..].parse().unwrap_or(-1);
            let mut parts = Vec::new();
            for _ in 0..n.max(0) {
                parts.push(read_resp(r)?);
            }
            Ok(parts.join("\n"))
        }
        _ => Ok(head),
    }
}

/// A `nats-server` with JetStream on a free loopback port, storing in a
/// temporary directory.
pub struct NatsServer(Server);

impl std::ops::Deref for NatsServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl std::ops::DerefMut for NatsServer {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

impl NatsServer {
    /// Starts a server and waits until it greets a client with INFO.
    pub fn start() -> Result<Self> {
        Server::start("nats-server", Self::spawn).map(NatsServer)
    }

    fn spawn(dir: &Path, port: u16) -> Result<Process> {
        let bin = find_binary("nats-server")?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| FixtureError(format!("starting nats-server: {e}")))?;
        let mut proc = Process { child: Some(child) };
        wait_until(
            "nats-server",
            Duration::from_secs(10),
            || nats_info(port),
            &mut proc,
        )?;
        Ok(proc)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

fn nats_info(port: u16) -> bool {
    let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_starts_answers_and_restarts_with_its_data() {
        let mut r = RedisServer::start().unwrap();
        assert_eq!(r.command(&["SET", "k", "v"]).unwrap(), "+OK");
        let pid = r.pid().unwrap();
        r.restart().unwrap();
        assert_ne!(r.pid().unwrap(), pid);
        assert_eq!(
            r.command(&["GET", "k"]).unwrap(),
            "v",
            "append-only data survives a restart"
        );
        r.kill();
        assert!(r.command(&["PING"]).is_err());
    }

    #[test]
    fn nats_starts_and_greets() {
        let n = NatsServer::start().unwrap();
        assert!(nats_info(n.port()));
        let pid = n.pid().unwrap();
        drop(n);
        // Stopped by PID on drop: the process is gone.
        // SAFETY: signal 0 only checks that the PID exists.
        assert_ne!(unsafe { libc::kill(pid as libc::pid_t, 0) }, 0);
    }
}
