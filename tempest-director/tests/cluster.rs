//! End-to-end tests of the director: a real `tempest-director` process and
//! real `tempest-agent` processes on loopback, running the word count
//! example (its binary wrapped in a one-line script, so the package stays
//! small).
//!
//! Nothing waits by sleeping for a fixed time: every wait polls an API until
//! what is expected holds, within a bound.

#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempest_control::package::{pack, sha256_hex};
use tempest_control::Manifest;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "director-test-token";

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client (one request per connection).

struct Response {
    status: u16,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Response {
    try_http(addr, method, path, token, body)
        .unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"))
}

fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() && body[0] == b'{' {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = end + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
}

// ---------------------------------------------------------------------------
// Binaries, ports, waiting.

/// `target/debug` (or wherever this test binary's profile directory is).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tempest-director"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The agent and word count binaries, built if they are not there yet
/// (`cargo test --workspace` builds them; `cargo test -p tempest-director`
/// alone may not).
fn binaries() -> (PathBuf, PathBuf) {
    static BUILT: OnceLock<()> = OnceLock::new();
    let (agent, wordcount) = (bin_dir().join("tempest-agent"), bin_dir().join("wordcount"));
    BUILT.get_or_init(|| {
        if agent.is_file() && wordcount.is_file() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "tempest-agent",
                "--bin",
                "tempest-agent",
                "-p",
                "wordcount",
                "--bin",
                "wordcount",
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .unwrap();
        assert!(status.success(), "building the agent and word count failed");
    });
    assert!(agent.is_file(), "no {}", agent.display());
    assert!(wordcount.is_file(), "no {}", wordcount.display());
    (agent, wordcount)
}

fn port_range(n: u16) -> String {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        let slot = NEXT.fetch_add(1, Ordering::SeqCst);
        let first = 41_000 + slot * 40;
        assert!(first < 60_000, "no free port range");
        if (first..first + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return format!("{first}-{}", first + n - 1);
        }
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn wait_for<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of a child or read from /proc.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Live processes started by the agent of `data_dir`, zombies excluded.
fn marked_processes(data_dir: &Path) -> Vec<u32> {
    let mark = format!("TEMPEST_AGENT_DIR={}", data_dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|v| v == mark.as_bytes()) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if !matches!(state, Some("Z") | Some("X") | None) {
            out.push(pid);
        }
    }
    out
}

/// Starts a daemon and reads the address from its first line,
/// `... listening on http://ADDR`.
fn spawn_daemon(program: &Path, args: &[String], log: &Path) -> (Child, String) {
    let mut child = Command::new(program)
        .args(args)
        .env_remove("TEMPEST_TOKEN")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
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
    (child, addr)
}

fn stop_child(child: &mut Child) {
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// The daemons.

struct Director {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Director {
    fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Director {
        let log = data_dir.with_extension(format!("log.{}", listen.replace(':', "_")));
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, addr) = spawn_daemon(
            Path::new(env!("CARGO_BIN_EXE_tempest-director")),
            &args,
            &log,
        );
        Director { child, addr, log }
    }

    fn get(&self, path: &str) -> Response {
        http(&self.addr, "GET", path, None, b"")
    }

    fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Response {
        http(&self.addr, "POST", path, token, body)
    }

    fn topology(&self, name: &str) -> Value {
        let r = self.get(&format!("/api/v1/topologies/{name}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    fn agents_up(&self) -> BTreeSet<String> {
        let r = self.get("/api/v1/agents");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["up"] == json!(true))
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Director {
    fn drop(&mut self) {
        stop_child(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "--- director log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

struct Agent {
    child: Child,
    addr: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(data_dir: &Path, director: &str, range: &str) -> Agent {
        std::fs::create_dir_all(data_dir).unwrap();
        let data_dir = data_dir.canonicalize().unwrap();
        let log = data_dir.with_extension(format!("log.{}", std::process::id()));
        let args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir.display().to_string(),
            "--director",
            &format!("http://{director}"),
            "--token",
            TOKEN,
            "--heartbeat-ms",
            "100",
            "--port-range",
            range,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, addr) = spawn_daemon(&binaries().0, &args, &log);
        Agent {
            child,
            addr,
            data_dir,
            log,
        }
    }

    fn id(&self) -> String {
        let r = http(&self.addr, "GET", "/api/v1/health", None, b"");
        r.json()["agent_id"].as_str().unwrap().to_owned()
    }

    fn acked(&self) -> u64 {
        let r = http(&self.addr, "GET", "/metrics", None, b"");
        r.body
            .lines()
            .filter(|l| l.starts_with("tempest_source_acked_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn running(&self) -> usize {
        let r = http(&self.addr, "GET", "/api/v1/processes", None, b"");
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == json!("running"))
            .count()
    }

    /// SIGKILLs the agent alone: its processes live on, as on a node whose
    /// agent crashed.
    fn kill9(&mut self) {
        signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop_child(&mut self.child);
        for pid in marked_processes(&self.data_dir) {
            signal(pid, libc::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent {} log ---\n{}",
                self.addr,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Packages.

const WORDCOUNT_TOML: &str =
    "[tasks.split]\nworkers = 1\n\n[tasks.count]\nworkers = 2\n\n[tasks.output]\nworkers = 1\n";

/// A package around a script that runs `target`; returns archive and hash.
fn script_package(dir: &Path, name: &str, script: &str, toml: Option<&str>) -> (Vec<u8>, String) {
    let bin = dir.join(name);
    std::fs::write(&bin, script).unwrap();
    let manifest = Manifest {
        name: name.into(),
        version: "0.1.0".into(),
        binary: String::new(),
        sha256: String::new(),
        target: "x86_64-unknown-linux-gnu".into(),
        tempest_version: "0.1.0".into(),
    };
    let mut out = Vec::new();
    pack(&bin, toml, manifest, &mut out).unwrap();
    let hash = sha256_hex(&out);
    (out, hash)
}

fn wordcount_package(dir: &Path) -> (Vec<u8>, String) {
    let (_, wordcount) = binaries();
    script_package(
        dir,
        "wordcount",
        &format!("#!/bin/sh\nexec '{}' \"$@\"\n", wordcount.display()),
        Some(WORDCOUNT_TOML),
    )
}

/// Far more sentences than the test needs, at a fixed rate so it does not
/// take every core from the other tests.
const OVERRIDES: &str = r#"
max_pending = 256
batch_size = 32
grace_period = "1s"

[source]
kind = "generator"

[source.config]
count = 100000000
rate = 2000.0
payloads = ["the cow jumped over the moon", "an apple a day keeps the doctor away"]
"#;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tempest-director-test")
        .tempdir()
        .unwrap()
}

/// Processes of `detail` by agent, when all `n` run; else None.
fn all_running(detail: &Value, n: usize) -> Option<BTreeSet<String>> {
    let placement = detail["placement"].as_array()?;
    if placement.len() != n || placement.iter().any(|p| p["state"] != json!("running")) {
        return None;
    }
    Some(
        placement
            .iter()
            .map(|p| p["agent"].as_str().unwrap().to_owned())
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// The tests.

/// The running word count's figures through the director: acked growing,
/// a rate, per-task figures, samples accumulating, the logs proxy.
fn check_figures(director: &Director) {
    let first = wait_for("acked in the director's figures", WAIT, || {
        let t = director.topology("wordcount");
        let acked = t["acked"].as_u64()?;
        (acked > 0 && t["msgs_per_sec"].as_f64()? > 0.0).then_some(acked)
    });
    let t = wait_for("acked growing in the director's figures", WAIT, || {
        let t = director.topology("wordcount");
        (t["acked"].as_u64()? > first).then_some(t)
    });
    assert!(t["p99_ms"].as_f64().is_some(), "{t}");
    assert!(t["p50_ms"].as_f64() <= t["p99_ms"].as_f64(), "{t}");
    assert!(t["source"]["polled"].as_u64() >= t["acked"].as_u64(), "{t}");
    assert_eq!(t["tasks"]["count"]["workers"], json!(2), "{t}");
    assert!(t["recent_errors"].as_array().is_some(), "{t}");
    wait_for("messages into every task", WAIT, || {
        let t = director.topology("wordcount");
        ["split", "count", "output"]
            .iter()
            .all(|task| t["tasks"][task]["messages_in"].as_u64() > Some(0))
            .then_some(())
    });
    let r = director.get("/api/v1/topologies");
    let summary = &r.json()[0];
    assert!(summary["acked"].as_u64() > Some(0), "{summary}");
    assert!(summary["in_flight"].is_u64(), "{summary}");
    let r = director.get("/api/v1/cluster");
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(
        (c["agents_up"].clone(), c["topologies_running"].clone()),
        (json!(2), json!(1)),
        "{c}"
    );
    assert!(c["msgs_per_sec"].is_number(), "{c}");

    // The series accumulates.
    let n = director
        .get("/api/v1/topologies/wordcount/samples")
        .json()
        .as_array()
        .unwrap()
        .len();
    let points = wait_for("samples accumulating", WAIT, || {
        let r = director.get("/api/v1/topologies/wordcount/samples");
        let v = r.json();
        (v.as_array()?.len() >= n + 2).then_some(v)
    });
    let points = points.as_array().unwrap();
    assert!(points
        .windows(2)
        .all(|w| w[0]["ts"].as_u64() <= w[1]["ts"].as_u64()));
    assert!(points.iter().any(|p| p["acked"].as_u64() > Some(0)));
    assert_eq!(director.get("/api/v1/topologies/nope/samples").status, 404);

    // The logs proxy.
    let logs = wait_for("the server's stdout through the director", WAIT, || {
        let r = director
            .get("/api/v1/topologies/wordcount/processes/server/logs?stream=stdout&lines=50");
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        v["text"].as_str()?.contains("listening on").then_some(v)
    });
    assert_eq!(logs["id"], json!("wordcount/server"));
    let r = director.get("/api/v1/topologies/wordcount/processes/wordcount/server/logs");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = director.get("/api/v1/topologies/wordcount/processes/count/0/logs?stream=stderr");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = director.get("/api/v1/topologies/wordcount/processes/nope/logs");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["error"].as_str().is_some());
    let r = director.get("/api/v1/topologies/nope/processes/server/logs");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = director.get("/api/v1/topologies/wordcount/processes/server/logs?stream=both");
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn deploys_wordcount_moves_the_processes_of_a_dead_agent_and_survives_a_restart() {
    let tmp = tempdir();
    let listen = free_addr();
    let ddir = tmp.path().join("director");
    let director_args = [
        "--token",
        TOKEN,
        "--agent-timeout",
        "2s",
        "--max-upload",
        "65536",
        "--metrics-interval",
        "300ms",
    ];
    let mut director = Director::start(&ddir, &listen, &director_args);
    let a = Agent::start(&tmp.path().join("a"), &director.addr, &port_range(20));
    let mut b = Agent::start(&tmp.path().join("b"), &director.addr, &port_range(20));
    let (a_id, b_id) = (a.id(), b.id());
    wait_for("both agents up", WAIT, || {
        (director.agents_up() == [a_id.clone(), b_id.clone()].into()).then_some(())
    });

    // The package store.
    let (archive, hash) = wordcount_package(tmp.path());
    assert_eq!(
        director.post("/api/v1/packages", None, &archive).status,
        401
    );
    let r = director.post("/api/v1/packages", Some(TOKEN), &archive);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["hash"], json!(hash));
    let r = director.post("/api/v1/packages", Some(TOKEN), &archive);
    assert_eq!(r.status, 200, "uploading again changes nothing: {}", r.body);
    let r = director.post("/api/v1/packages", Some(TOKEN), b"not a package at all");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("refused"));
    let r = director.post("/api/v1/packages", Some(TOKEN), &vec![7u8; 100_000]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("65536"),
        "{}",
        r.body
    );
    let r = director.get("/api/v1/packages");
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{}", r.body);
    let r = director.get(&format!("/api/v1/packages/{hash}/archive"));
    assert_eq!(r.status, 200);
    let r = director.get(&format!("/api/v1/packages/{}/archive", "0".repeat(64)));
    assert_eq!(r.status, 404, "{}", r.body);

    // Deploy errors leave nothing behind.
    let deploy = |name: &str, package: &str, config: &str| {
        serde_json::to_vec(&json!({"name": name, "package": package, "config": config})).unwrap()
    };
    let good = deploy("wordcount", &hash, OVERRIDES);
    assert_eq!(director.post("/api/v1/topologies", None, &good).status, 401);
    let r = director.post(
        "/api/v1/topologies",
        Some(TOKEN),
        &deploy("wordcount", &"0".repeat(64), OVERRIDES),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = director.post(
        "/api/v1/topologies",
        Some(TOKEN),
        &deploy("wordcount", &hash, "max_pendin = 3\n"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("max_pendin"),
        "{}",
        r.body
    );
    let r = director.post("/api/v1/topologies", Some(TOKEN), b"{\"name\": 1}");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(director.get("/api/v1/topologies").json(), json!([]));

    // Deploy.
    let r = director.post("/api/v1/topologies", Some(TOKEN), &good);
    assert_eq!(r.status, 201, "{}", r.body);
    let r = director.post("/api/v1/topologies", Some(TOKEN), &good);
    assert_eq!(r.status, 409, "{}", r.body);
    let r = director.get("/api/v1/topologies/nope");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["error"].as_str().is_some());
    assert_eq!(
        director
            .post("/api/v1/topologies/nope/stop", Some(TOKEN), b"")
            .status,
        404
    );

    // Server, split, two counts, output: spread over both agents.
    let agents = wait_for("the topology running", WAIT, || {
        all_running(&director.topology("wordcount"), 5)
    });
    assert_eq!(agents, [a_id.clone(), b_id.clone()].into());
    let acked = || a.acked() + b.acked();
    let first = wait_for("acked roots", WAIT, || Some(acked()).filter(|n| *n > 0));
    wait_for("acked growing", WAIT, || (acked() > first).then_some(()));
    check_figures(&director);

    // B dies (its processes live on, orphaned): everything moves to A
    // within 15 s.
    let before: Vec<Value> = director.topology("wordcount")["placement"]
        .as_array()
        .unwrap()
        .clone();
    b.kill9();
    let killed = Instant::now();
    let agents = wait_for(
        "the processes re-placed on A",
        Duration::from_secs(15),
        || {
            all_running(&director.topology("wordcount"), 5)
                .filter(|agents| agents == &[a_id.clone()].into())
        },
    );
    assert_eq!(agents, [a_id.clone()].into());
    eprintln!("re-placed and running in {:?}", killed.elapsed());
    let after = director.topology("wordcount");
    for p in &before {
        let now = after["placement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["id"] == p["id"])
            .unwrap();
        if p["agent"] == json!(b_id) {
            assert!(
                now["generation"].as_u64() > p["generation"].as_u64(),
                "a moved process gets a new generation: {p} -> {now}"
            );
        }
    }
    let first = a.acked();
    wait_for("acked growing on A", WAIT, || {
        (a.acked() > first).then_some(())
    });

    // B comes back: its assignment is empty, so it stops what moved.
    let b_dir = b.data_dir.clone();
    drop(b);
    let b = Agent::start(&b_dir, &director.addr, &port_range(20));
    assert_eq!(b.id(), b_id);
    wait_for("B up again", WAIT, || {
        director.agents_up().contains(&b_id).then_some(())
    });
    wait_for("B's old processes stopped", WAIT, || {
        (b.running() == 0 && marked_processes(&b.data_dir).is_empty()).then_some(())
    });

    // The director restarts and still knows everything; nothing moves.
    // Take the picture once everything runs, so no process is mid-restart.
    let before = wait_for("the topology running before the restart", WAIT, || {
        let d = director.topology("wordcount");
        all_running(&d, 5).map(|_| d)
    });
    let pids: Vec<Value> = before["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["id"], p["pid"], p["generation"]]))
        .collect();
    let ddir2 = ddir.clone();
    drop(director);
    director = Director::start(&ddir2, &listen, &director_args);
    let r = director.get("/api/v1/packages");
    assert_eq!(r.json()[0]["hash"], json!(hash), "{}", r.body);
    let r = director.get("/api/v1/agents");
    assert_eq!(r.json().as_array().unwrap().len(), 2, "{}", r.body);
    let r = director.get("/api/v1/topologies");
    assert_eq!(r.json()[0]["name"], json!("wordcount"), "{}", r.body);
    wait_for("both agents heartbeating to the new director", WAIT, || {
        (director.agents_up() == [a_id.clone(), b_id.clone()].into()).then_some(())
    });
    let detail = wait_for("the topology running after the restart", WAIT, || {
        let d = director.topology("wordcount");
        all_running(&d, 5).map(|_| d)
    });
    let now: Vec<Value> = detail["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["id"], p["pid"], p["generation"]]))
        .collect();
    assert_eq!(now, pids, "the restart changed nothing");
    let first = a.acked();
    wait_for("acked growing after the restart", WAIT, || {
        (a.acked() > first).then_some(())
    });

    // Rebalance, stop, start, kill.
    let r = director.post(
        "/api/v1/topologies/wordcount/rebalance",
        Some(TOKEN),
        b"{\"workers\": {\"nope\": 2}}",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = director.post(
        "/api/v1/topologies/wordcount/rebalance",
        Some(TOKEN),
        b"{\"workers\": {\"count\": 3}}",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let agents = wait_for("the rebalanced topology running", WAIT, || {
        all_running(&director.topology("wordcount"), 6)
    });
    assert!(
        agents.contains(&b_id),
        "the new worker goes to the idle agent"
    );
    let r = director.post("/api/v1/topologies/wordcount/stop", Some(TOKEN), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = director.post("/api/v1/topologies/wordcount/stop", Some(TOKEN), b"");
    assert_eq!(r.status, 409, "{}", r.body);
    wait_for("the topology stopped", WAIT, || {
        (director.topology("wordcount")["phase"] == json!("stopped")
            && a.running() == 0
            && b.running() == 0)
            .then_some(())
    });
    let r = director.post("/api/v1/topologies/wordcount/start", Some(TOKEN), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the topology running again", WAIT, || {
        all_running(&director.topology("wordcount"), 6)
    });
    let r = director.post("/api/v1/topologies/wordcount/kill", Some(TOKEN), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(director.get("/api/v1/topologies/wordcount").status, 404);
    wait_for("the killed topology's processes gone", WAIT, || {
        (a.running() == 0 && b.running() == 0).then_some(())
    });
}

#[test]
fn serves_its_openapi_document_and_json_errors() {
    let tmp = tempdir();
    let director = Director::start(&tmp.path().join("d"), "127.0.0.1:0", &["--token", TOKEN]);
    let r = director.get("/api/v1/openapi.json");
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    for path in [
        "/api/v1/packages",
        "/api/v1/packages/{hash}/archive",
        "/api/v1/agents",
        "/api/v1/agents/heartbeat",
        "/api/v1/topologies",
        "/api/v1/topologies/{name}",
        "/api/v1/topologies/{name}/stop",
        "/api/v1/topologies/{name}/start",
        "/api/v1/topologies/{name}/kill",
        "/api/v1/topologies/{name}/rebalance",
        "/api/v1/cluster",
        "/api/v1/topologies/{name}/samples",
        "/api/v1/topologies/{name}/processes/{id}/logs",
    ] {
        assert!(doc["paths"][path].is_object(), "no {path} in {doc}");
    }
    for schema in [
        "DeployRequest",
        "ClusterSummary",
        "SamplePoint",
        "TaskFigures",
        "LogTail",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "no {schema}"
        );
    }
    let r = director.get("/api/v1/cluster");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["agents_up"], json!(0));

    let r = director.get("/api/v1/nothing-here");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().is_some());
    let r = director.post("/api/v1/agents/heartbeat", None, b"{}");
    assert_eq!(r.status, 401, "{}", r.body);
    let r = director.post("/api/v1/agents/heartbeat", Some("wrong"), b"{}");
    assert_eq!(r.status, 401, "{}", r.body);
    let r = director.post("/api/v1/agents/heartbeat", Some(TOKEN), b"{}");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"].as_str().is_some());

    // A package without worker counts needs them in the request.
    let (archive, hash) = script_package(tmp.path(), "bare", "#!/bin/sh\nexec sleep 600\n", None);
    let r = director.post("/api/v1/packages", Some(TOKEN), &archive);
    assert_eq!(r.status, 201, "{}", r.body);
    let body = serde_json::to_vec(&json!({"name": "bare", "package": hash})).unwrap();
    let r = director.post("/api/v1/topologies", Some(TOKEN), &body);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("workers"),
        "{}",
        r.body
    );
    let body =
        serde_json::to_vec(&json!({"name": "bare", "package": hash, "workers": {"t": 0}})).unwrap();
    assert_eq!(
        director
            .post("/api/v1/topologies", Some(TOKEN), &body)
            .status,
        400
    );
    let body =
        serde_json::to_vec(&json!({"name": "bare", "package": hash, "workers": {"t": 2}})).unwrap();
    let r = director.post("/api/v1/topologies", Some(TOKEN), &body);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["workers"], json!({"t": 2}));
    let bad =
        serde_json::to_vec(&json!({"name": "a/b", "package": hash, "workers": {"t": 1}})).unwrap();
    assert_eq!(
        director
            .post("/api/v1/topologies", Some(TOKEN), &bad)
            .status,
        400
    );
}
