//! Real Tempest daemons for tests: a `tempest-director` and `tempest-agent`
//! processes on loopback, their binaries found (or built) in the test's own
//! target directory, stopped by PID when dropped, with their logs printed
//! when a test fails. Also the waits, ports and packages those tests share.
//!
//! Nothing here waits by sleeping for a fixed time: [`wait_for`] polls until
//! what is expected holds, within a bound, and fails naming what it waited
//! for.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempest_control::package::{pack, sha256_hex};
use tempest_control::Manifest;

use crate::http::{self, Response};

/// The default bound of a wait: generous, because CI machines are slow and
/// shared; a wait that passes returns as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `f` every 50 ms until it gives a value; panics naming `what` after
/// `bound`.
pub fn wait_for<T>(what: &str, bound: Duration, f: impl FnMut() -> Option<T>) -> T {
    try_wait_for(bound, f).unwrap_or_else(|| panic!("timed out after {bound:?} waiting for {what}"))
}

/// Polls `f` every 50 ms until it gives a value, or None after `bound`.
pub fn try_wait_for<T>(bound: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of a child or one read from /proc.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Whether `pid` is a live process (zombies count as dead).
pub fn alive(pid: u32) -> bool {
    proc_state(Path::new(&format!("/proc/{pid}"))).is_some_and(|s| s != "Z" && s != "X")
}

fn proc_state(dir: &Path) -> Option<String> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    Some(
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .next()?
            .to_owned(),
    )
}

/// Live processes started by the agent of `data_dir` (their environment
/// carries `TEMPEST_AGENT_DIR=<data_dir>`), zombies excluded, sorted.
pub fn marked_processes(data_dir: &Path) -> Vec<u32> {
    let mark = format!("TEMPEST_AGENT_DIR={}", data_dir.display());
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|v| v == mark.as_bytes()) {
            continue;
        }
        if proc_state(&e.path()).is_some_and(|s| s != "Z" && s != "X") {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// `n` consecutive free loopback ports as `FIRST-LAST`, different for every
/// call in this process (tests run in parallel, each agent gets its own).
pub fn port_range(n: u16) -> String {
    // Below the kernel's ephemeral range (32768-60999 by default), where
    // the many connections tests open and close leave ports in TIME-WAIT.
    const LOW: u32 = 12_000;
    const HIGH: u32 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let step = u32::from(n.max(20));
    let slots = (HIGH - LOW) / step;
    // Test binaries running at the same time start at different slots.
    let start = std::process::id() % slots;
    let mut last = String::from("no range tried");
    for _ in 0..slots {
        let slot = (start + NEXT.fetch_add(1, Ordering::SeqCst)) % slots;
        let first = LOW + slot * step;
        let taken = (first..first + u32::from(n)).find_map(|p| {
            TcpListener::bind(("127.0.0.1", p as u16))
                .err()
                .map(|e| (p, e))
        });
        match taken {
            None => return format!("{first}-{}", first + u32::from(n) - 1),
            Some((p, e)) => last = format!("port {p}: {e}"),
        }
    }
    panic!("no {n} consecutive free loopback ports in {LOW}-{HIGH} ({last})")
}

/// A free `127.0.0.1:PORT`.
pub fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().expect("a bound address").to_string()
}

/// A temporary directory whose name starts with `prefix`.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a temporary directory")
}

/// The directory of the running test's profile (`target/debug` or
/// `target/release`): test binaries live in its `deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the test binary's directory");
    match deps.file_name().and_then(|n| n.to_str()) {
        Some("deps") => deps.parent().unwrap_or(deps).to_path_buf(),
        _ => deps.to_path_buf(),
    }
}

/// The workspace's root directory.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tempest-testkit lives in the workspace")
        .to_path_buf()
}

/// The binary `bin` of workspace package `package` in the test's profile
/// directory, built first if it is not there (`cargo test --workspace`
/// builds every binary; `cargo test -p one-crate` may not).
pub fn cargo_bin(package: &str, bin: &str) -> PathBuf {
    static BUILDING: Mutex<()> = Mutex::new(());
    let dir = profile_dir();
    let path = dir.join(bin);
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if !path.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", bin])
            .current_dir(workspace_dir());
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building {bin} of {package} failed");
    }
    assert!(path.is_file(), "no {}", path.display());
    path
}

/// Stops a child process as a daemon is stopped: SIGTERM, then SIGKILL
/// once `grace` has passed; reaps it. Nothing to do if it has exited.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The credentials of a test cluster: the director's admin, viewer and
/// agent tokens (the agents hold the agent token). Daemons get them in
/// their environment, never on their command line.
#[derive(Clone, Debug)]
pub struct Tokens {
    /// The admin token.
    pub admin: String,
    /// The viewer token.
    pub viewer: String,
    /// The agent token.
    pub agent: String,
}

impl Tokens {
    /// Tokens of their own for a test, each naming `tag` and its role.
    pub fn new(tag: &str) -> Tokens {
        Tokens {
            admin: format!("{tag}-admin-token"),
            viewer: format!("{tag}-viewer-token"),
            agent: format!("{tag}-agent-token"),
        }
    }

    /// The director's environment.
    pub fn director_env(&self) -> Vec<(String, String)> {
        vec![
            ("TEMPEST_ADMIN_TOKEN".into(), self.admin.clone()),
            ("TEMPEST_VIEWER_TOKEN".into(), self.viewer.clone()),
            ("TEMPEST_AGENT_TOKEN".into(), self.agent.clone()),
        ]
    }
}

/// Every environment variable a daemon may take a credential from: none
/// is inherited from the test's own environment.
const CREDENTIAL_ENVS: [&str; 8] = [
    "TEMPEST_TOKEN",
    "TEMPEST_ADMIN_TOKEN",
    "TEMPEST_VIEWER_TOKEN",
    "TEMPEST_AGENT_TOKEN",
    "TEMPEST_DATA_SECRET",
    "TEMPEST_DATA_TLS_CERT",
    "TEMPEST_DATA_TLS_KEY",
    "TEMPEST_DATA_TLS_CA",
];

/// A daemon process that prints `... listening on http://ADDR` as its first
/// line of standard output. Its standard error goes to a log file, printed
/// when a test panics. Dropping it stops it (SIGTERM, then SIGKILL).
pub struct Daemon {
    child: Child,
    /// The address it listens on, `IP:PORT`.
    pub addr: String,
    /// Its standard error.
    pub log: PathBuf,
    name: String,
}

impl Daemon {
    /// Starts `program` with `args`, `env`, `RUST_LOG=info` and no
    /// inherited credential, and waits (at most [`WAIT`]) for its address.
    pub fn start(program: &Path, args: &[String], env: &[(String, String)], log: &Path) -> Daemon {
        let mut cmd = Command::new(program);
        for var in CREDENTIAL_ENVS {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("creating a daemon's log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("a piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let Ok(line) = rx.recv_timeout(WAIT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not start: {}",
                program.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        let addr = line
            .split("listening on http://")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .trim()
            .to_owned();
        Daemon {
            child,
            addr,
            log: log.to_path_buf(),
            name: program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs it and reaps it.
    pub fn kill9(&mut self) {
        signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after 20 s; reaps it.
    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(20));
    }

    /// `GET path` on it, with `Authorization: Bearer TOKEN` when a token
    /// is given.
    pub fn get_as(&self, path: &str, token: Option<&str>) -> Response {
        http::send(&self.addr, "GET", path, token, b"")
    }

    /// `POST path` on it, with the token when given.
    pub fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Response {
        http::send(&self.addr, "POST", path, token, body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- {} {} log ---\n{}",
                self.name,
                self.addr,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// A `tempest-director` process.
pub struct DirectorProcess {
    /// The process.
    pub daemon: Daemon,
    /// Its API address, `IP:PORT`.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its credentials, if it has any.
    pub tokens: Option<Tokens>,
}

impl DirectorProcess {
    /// Starts a director without credentials on `listen` (`127.0.0.1:0`
    /// picks a port) with its state in `data_dir` and the `extra` flags.
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> DirectorProcess {
        DirectorProcess::start_with(data_dir, listen, extra, None)
    }

    /// Starts a director with `tokens` (in its environment).
    pub fn start_secured(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        tokens: &Tokens,
    ) -> DirectorProcess {
        DirectorProcess::start_with(data_dir, listen, extra, Some(tokens))
    }

    fn start_with(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        tokens: Option<&Tokens>,
    ) -> DirectorProcess {
        let log = data_dir.with_extension(format!("log.{}", listen.replace(':', "_")));
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = tokens.map(Tokens::director_env).unwrap_or_default();
        let daemon = Daemon::start(
            &cargo_bin("tempest-director", "tempest-director"),
            &args,
            &env,
            &log,
        );
        DirectorProcess {
            addr: daemon.addr.clone(),
            daemon,
            data_dir: data_dir.to_path_buf(),
            tokens: tokens.cloned(),
        }
    }

    /// The admin token, if it has one.
    pub fn admin(&self) -> Option<&str> {
        self.tokens.as_ref().map(|t| t.admin.as_str())
    }

    /// `GET path`, as the admin (when it has credentials).
    pub fn get(&self, path: &str) -> Response {
        self.daemon.get_as(path, self.admin())
    }

    /// `GET path` with this token, or none.
    pub fn get_as(&self, path: &str, token: Option<&str>) -> Response {
        self.daemon.get_as(path, token)
    }

    /// `POST path`, with the token when given.
    pub fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Response {
        self.daemon.post(path, token, body)
    }

    /// `GET /api/v1/topologies/NAME`, which must answer 200.
    pub fn topology(&self, name: &str) -> Value {
        let r = self.get(&format!("/api/v1/topologies/{name}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    /// The ids of the agents the director counts as up.
    pub fn agents_up(&self) -> BTreeSet<String> {
        let r = self.get("/api/v1/agents");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .map(|agents| {
                agents
                    .iter()
                    .filter(|a| a["up"] == json!(true))
                    .filter_map(|a| a["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Uploads an archive with the token; panics unless 200 or 201.
    pub fn upload(&self, token: Option<&str>, archive: &[u8]) -> Value {
        let r = self.post("/api/v1/packages", token, archive);
        assert!(matches!(r.status, 200 | 201), "upload: {}", r.body);
        r.json()
    }
}

/// A `tempest-agent` process. Dropping it stops it, and kills whatever it
/// started that is still alive.
pub struct AgentProcess {
    /// The process.
    pub daemon: Daemon,
    /// Its API address, `IP:PORT`.
    pub addr: String,
    /// Its (canonical) data directory.
    pub data_dir: PathBuf,
    /// Its agent token, if it has one.
    pub token: Option<String>,
    leave_processes: bool,
}

/// Processes an agent left behind when it was SIGKILLed: killed when this is
/// dropped, unless a new agent on the same data directory adopted them first
/// and stopped them itself.
pub struct Orphans {
    /// The data directory whose mark they carry.
    pub data_dir: PathBuf,
}

impl Drop for Orphans {
    fn drop(&mut self) {
        for pid in marked_processes(&self.data_dir) {
            signal(pid, libc::SIGKILL);
        }
    }
}

impl AgentProcess {
    /// Starts an agent without a token on `127.0.0.1:0` (unless `args`
    /// give `--listen`) with its state in `data_dir` and the given flags
    /// (e.g. `--director`, `--port-range`).
    pub fn start(data_dir: &Path, args: &[&str]) -> AgentProcess {
        AgentProcess::start_with_token(data_dir, args, None)
    }

    /// [`AgentProcess::start`] with the agent token `token` (in its
    /// environment).
    pub fn start_with_token(data_dir: &Path, args: &[&str], token: Option<&str>) -> AgentProcess {
        AgentProcess::start_with_env(data_dir, args, token, &[])
    }

    /// [`AgentProcess::start_with_token`] with more environment variables.
    pub fn start_with_env(
        data_dir: &Path,
        args: &[&str],
        token: Option<&str>,
        extra_env: &[(String, String)],
    ) -> AgentProcess {
        std::fs::create_dir_all(data_dir).expect("creating the agent's data dir");
        let data_dir = data_dir
            .canonicalize()
            .expect("the agent's data dir's path");
        static N: AtomicU16 = AtomicU16::new(0);
        let log = data_dir.with_extension(format!(
            "log.{}.{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut all: Vec<String> = vec!["--data-dir".into(), data_dir.display().to_string()];
        if !args.contains(&"--listen") {
            all.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let mut env: Vec<(String, String)> = extra_env.to_vec();
        if let Some(t) = token {
            env.push(("TEMPEST_AGENT_TOKEN".to_owned(), t.to_owned()));
        }
        let daemon = Daemon::start(
            &cargo_bin("tempest-agent", "tempest-agent"),
            &all,
            &env,
            &log,
        );
        AgentProcess {
            addr: daemon.addr.clone(),
            daemon,
            data_dir,
            token: token.map(str::to_owned),
            leave_processes: false,
        }
    }

    /// Starts an agent that joins `director` (its `IP:PORT`) with the agent
    /// token `token`, heartbeating every 100 ms, with a port range of its
    /// own.
    pub fn join(data_dir: &Path, director: &str, token: &str) -> AgentProcess {
        let url = format!("http://{director}");
        let range = port_range(20);
        AgentProcess::start_with_token(
            data_dir,
            &[
                "--director",
                &url,
                "--heartbeat-ms",
                "100",
                "--port-range",
                &range,
            ],
            Some(token),
        )
    }

    /// `GET path`, with its token.
    pub fn get(&self, path: &str) -> Response {
        self.daemon.get_as(path, self.token.as_deref())
    }

    /// `GET path` with this token, or none.
    pub fn get_as(&self, path: &str, token: Option<&str>) -> Response {
        self.daemon.get_as(path, token)
    }

    /// Its agent id.
    pub fn id(&self) -> String {
        let r = self.get("/api/v1/health");
        r.json()["agent_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no agent_id in {}", r.body))
            .to_owned()
    }

    /// The sum of its processes' `tempest_source_acked_total`.
    pub fn acked(&self) -> u64 {
        self.metric("tempest_source_acked_total") as u64
    }

    /// The sum of the samples named `name` in its `/metrics` (read with
    /// the workspace's one exposition parser).
    pub fn metric(&self, name: &str) -> f64 {
        let body = self.get("/metrics").body;
        tempest_control::exposition::samples(&body)
            .unwrap_or_else(|e| panic!("the agent's /metrics does not parse: {e}"))
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value.as_f64())
            .sum()
    }

    /// How many of its processes are running.
    pub fn running(&self) -> usize {
        let r = self.get("/api/v1/processes");
        r.json()
            .as_array()
            .map(|ps| ps.iter().filter(|p| p["state"] == json!("running")).count())
            .unwrap_or(0)
    }

    /// SIGKILLs the agent alone: its processes live on, as on a node whose
    /// agent crashed. They are returned as [`Orphans`], killed when dropped.
    pub fn kill9(mut self) -> Orphans {
        self.daemon.kill9();
        self.leave_processes = true;
        Orphans {
            data_dir: self.data_dir.clone(),
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.daemon.stop();
        if !self.leave_processes {
            drop(Orphans {
                data_dir: self.data_dir.clone(),
            });
        }
    }
}

/// A package around a script (its binary), with an optional
/// `Topology.toml`; returns the archive and its content hash.
pub fn script_package(
    dir: &Path,
    name: &str,
    script: &str,
    toml: Option<&str>,
) -> (Vec<u8>, String) {
    let bin = dir.join(name);
    std::fs::write(&bin, script).expect("writing the package's script");
    let manifest = Manifest {
        name: name.into(),
        version: "0.1.0".into(),
        binary: String::new(),
        sha256: String::new(),
        target: "x86_64-unknown-linux-gnu".into(),
        tempest_version: "0.1.0".into(),
    };
    let mut out = Vec::new();
    pack(&bin, toml, manifest, &mut out).expect("packing");
    let hash = sha256_hex(&out);
    (out, hash)
}

/// The word count example's `Topology.toml` worker counts: split 1,
/// count 2, output 1.
pub const WORDCOUNT_TOML: &str =
    "[tasks.split]\nworkers = 1\n\n[tasks.count]\nworkers = 2\n\n[tasks.output]\nworkers = 1\n";

/// The word count example as a package: a one-line script running the
/// binary built in this profile (so the archive stays small), with `toml`
/// as its `Topology.toml` (e.g. [`WORDCOUNT_TOML`]).
pub fn wordcount_package(dir: &Path, toml: &str) -> (Vec<u8>, String) {
    let wordcount = cargo_bin("wordcount", "wordcount");
    script_package(
        dir,
        "wordcount",
        &format!("#!/bin/sh\nexec '{}' \"$@\"\n", wordcount.display()),
        Some(toml),
    )
}

/// The agents a topology's placement uses when all `n` of its processes
/// run; else None.
pub fn all_running(detail: &Value, n: usize) -> Option<BTreeSet<String>> {
    let placement = detail["placement"].as_array()?;
    if placement.len() != n || placement.iter().any(|p| p["state"] != json!("running")) {
        return None;
    }
    placement
        .iter()
        .map(|p| p["agent"].as_str().map(str::to_owned))
        .collect()
}
