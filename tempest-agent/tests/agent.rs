//! End-to-end tests of the agent: a real `tempest-agent` process, a small
//! director test double (a raw HTTP server on 127.0.0.1:0 that records
//! heartbeats, answers with a chosen assignment and serves package archives),
//! and packages built here around tiny shell scripts, or around the real
//! word count example for the metrics test.
//!
//! Nothing waits by sleeping for a fixed time: every wait polls the agent's
//! API (or the double's records) until what is expected holds, within a
//! bound.

#![cfg(target_os = "linux")]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempest_control::package::sha256_hex;
use tempest_control::{Assignment, Heartbeat, ProcessSpec, ProcessState, ProcessStatus, Role};
use tempest_testkit::cluster::{
    self, alive, cargo_bin, marked_processes, port_range, signal, AgentProcess, Orphans, WAIT,
};
use tempest_testkit::http::{request, Response};

const TOKEN: &str = "test-token";

// ---------------------------------------------------------------------------
// The director test double.

#[derive(Default)]
struct DirectorState {
    assignment: Assignment,
    garbage: bool,
    heartbeats: Vec<Heartbeat>,
    packages: HashMap<String, Vec<u8>>,
    downloads: HashMap<String, usize>,
    unauthorized: usize,
}

struct Director {
    addr: String,
    state: Arc<Mutex<DirectorState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Director {
    fn start() -> Director {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(DirectorState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        Director {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn assign(&self, processes: Vec<ProcessSpec>) {
        self.state.lock().unwrap().assignment = Assignment { processes };
    }

    fn serve_package(&self, hash: &str, bytes: Vec<u8>) {
        self.state
            .lock()
            .unwrap()
            .packages
            .insert(hash.to_owned(), bytes);
    }

    fn heartbeats(&self) -> usize {
        self.state.lock().unwrap().heartbeats.len()
    }

    fn downloads(&self, hash: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .downloads
            .get(hash)
            .copied()
            .unwrap_or(0)
    }

    /// Stops listening: from now on the agent's connections are refused.
    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Director {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(mut conn: TcpStream, state: &Mutex<DirectorState>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            auth = Some(h["authorization:".len()..].trim().to_owned());
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let authorized = auth.as_deref() == Some(&format!("Bearer {TOKEN}"));
    let (status, ctype, out): (&str, &str, Vec<u8>) = {
        let mut st = state.lock().unwrap();
        if !authorized {
            st.unauthorized += 1;
            (
                "401 Unauthorized",
                "application/json",
                b"{\"error\":\"token\"}".to_vec(),
            )
        } else if method == "POST" && path == "/api/v1/agents/heartbeat" {
            match serde_json::from_slice::<Heartbeat>(&body) {
                Ok(hb) => {
                    st.heartbeats.push(hb);
                    if st.garbage {
                        (
                            "200 OK",
                            "text/html",
                            b"<html>not an assignment</html>".to_vec(),
                        )
                    } else {
                        (
                            "200 OK",
                            "application/json",
                            serde_json::to_vec(&st.assignment).unwrap(),
                        )
                    }
                }
                Err(e) => (
                    "400 Bad Request",
                    "application/json",
                    serde_json::to_vec(&serde_json::json!({"error": e.to_string()})).unwrap(),
                ),
            }
        } else if let Some(hash) = path
            .strip_prefix("/api/v1/packages/")
            .and_then(|r| r.strip_suffix("/archive"))
            .filter(|_| method == "GET")
        {
            match st.packages.get(hash).cloned() {
                Some(bytes) => {
                    *st.downloads.entry(hash.to_owned()).or_default() += 1;
                    ("200 OK", "application/octet-stream", bytes)
                }
                None => (
                    "404 Not Found",
                    "application/json",
                    b"{\"error\":\"no such package\"}".to_vec(),
                ),
            }
        } else {
            (
                "404 Not Found",
                "application/json",
                b"{\"error\":\"no such call\"}".to_vec(),
            )
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        out.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&out);
}

// ---------------------------------------------------------------------------
// Packages.

/// A "topology binary" that says how it was started, then sleeps.
fn sleeper(dir: &Path, tag: &str) -> (Vec<u8>, String) {
    script_package(
        dir,
        "sleeper",
        &format!(
            "#!/bin/sh\n# {tag}\necho \"started $TEMPEST_PROCESS_ID with $*\"\necho \"to stderr\" >&2\nexec sleep 600\n"
        ),
    )
}

fn spec(id: &str, package: &str, role: Role) -> ProcessSpec {
    ProcessSpec {
        id: id.into(),
        topology: id.split('/').next().unwrap_or(id).into(),
        package: package.into(),
        role,
        task: (role == Role::Task).then(|| id.split('/').nth(1).unwrap_or("t").into()),
        instance: (role == Role::Task).then_some(0),
        instances: None,
        topology_addr: (role == Role::Task).then(|| "127.0.0.1:1".into()),
        config: None,
        env: BTreeMap::new(),
        data_secret: None,
        data_tls: None,
        generation: 1,
    }
}

// ---------------------------------------------------------------------------
// The agent process.

struct Agent {
    proc: AgentProcess,
    addr: String,
    data_dir: PathBuf,
}

impl Agent {
    /// An agent without a token.
    fn start(data_dir: &Path, args: &[&str]) -> Agent {
        Agent::with_token(data_dir, args, None)
    }

    /// An agent with [`TOKEN`] as its agent token (in its environment).
    fn secured(data_dir: &Path, args: &[&str]) -> Agent {
        Agent::with_token(data_dir, args, Some(TOKEN))
    }

    fn with_token(data_dir: &Path, args: &[&str], token: Option<&str>) -> Agent {
        let proc = AgentProcess::start_with_token(data_dir, args, token);
        Agent {
            addr: proc.addr.clone(),
            data_dir: proc.data_dir.clone(),
            proc,
        }
    }

    /// `GET path`, with the agent's token if it has one.
    fn get(&self, path: &str) -> Response {
        self.proc.get(path)
    }

    fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        request(&self.addr, "POST", path, &headers, body).unwrap()
    }

    fn put(&self, path: &str, token: Option<&str>, body: &[u8]) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/octet-stream")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        request(&self.addr, "PUT", path, &headers, body).unwrap()
    }

    fn assign(&self, token: Option<&str>, processes: Vec<ProcessSpec>) -> Response {
        let body = serde_json::to_vec(&Assignment { processes }).unwrap();
        self.post("/api/v1/assignment", token, &body)
    }

    fn processes(&self) -> Vec<ProcessStatus> {
        let r = self.get("/api/v1/processes");
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    fn process(&self, id: &str) -> Option<ProcessStatus> {
        self.processes().into_iter().find(|p| p.id == id)
    }

    fn metrics(&self) -> String {
        let r = self.get("/api/v1/metrics");
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    /// Polls until every id in `ids` runs; returns their pids.
    fn wait_running(&self, ids: &[&str]) -> BTreeMap<String, u32> {
        wait_for(&format!("{ids:?} running"), || {
            let ps = self.processes();
            let mut pids = BTreeMap::new();
            for id in ids {
                let p = ps.iter().find(|p| p.id == *id)?;
                if p.state != ProcessState::Running {
                    return None;
                }
                pids.insert(id.to_string(), p.pid?);
            }
            Some(pids)
        })
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.proc.daemon.log).unwrap_or_default()
    }

    /// SIGKILLs the agent alone; its processes live on until the returned
    /// guard is dropped (or a new agent adopts and stops them).
    fn kill9(self) -> Orphans {
        self.proc.kill9()
    }
}

/// Polls `f` until it gives a value, at most [`WAIT`].
fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    cluster::wait_for(what, WAIT, f)
}

fn tempdir() -> tempfile::TempDir {
    cluster::tempdir("tempest-agent-test")
}

fn script_package(dir: &Path, name: &str, script: &str) -> (Vec<u8>, String) {
    cluster::script_package(dir, name, script, None)
}

// ---------------------------------------------------------------------------
// The tests.

#[test]
fn converges_to_assignments_start_stop_change() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "converge");
    let director = Director::start();
    director.serve_package(&hash, archive);
    // A worker with its task's count, as the director assigns them.
    let split = |generation: u64, instances: u32| {
        let mut s = spec("t/split/0", &hash, Role::Task);
        s.generation = generation;
        s.instances = Some(instances);
        s
    };
    director.assign(vec![spec("t/server", &hash, Role::Topology), split(1, 1)]);
    let range = port_range(10);
    let agent = Agent::secured(
        &tmp.path().join("data"),
        &[
            "--director",
            &director.url(),
            "--heartbeat-ms",
            "100",
            "--port-range",
            &range,
        ],
    );
    let pids = agent.wait_running(&["t/server", "t/split/0"]);

    // The server and the worker each got a port of the range to listen on,
    // and are told so in their arguments; each reports it as its address.
    let (first, last) = range.split_once('-').unwrap();
    let in_range = |address: &str| -> u16 {
        let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            (first.parse().unwrap()..=last.parse().unwrap()).contains(&port),
            "{address} not in {range}"
        );
        port
    };
    let server = agent.process("t/server").unwrap();
    let address = server.address.clone().expect("a server address");
    let port = in_range(&address);
    let first_line = |id: &str| {
        wait_for(&format!("{id}'s first log line"), || {
            let r = agent.get(&format!(
                "/api/v1/processes/{}/logs?stream=stdout&lines=10",
                id.replace('/', "%2F")
            ));
            assert_eq!(r.status, 200, "{}", r.body);
            let text = r.json()["text"].as_str().unwrap_or_default().to_owned();
            text.contains("started").then_some(text)
        })
    };
    let logs = first_line("t/server");
    assert!(
        logs.contains(&format!(
            "started t/server with topology --host 127.0.0.1 --port {port}"
        )),
        "{logs}"
    );
    assert!(
        logs.contains("--metrics-target prometheus=127.0.0.1:"),
        "{logs}"
    );
    let peer = agent
        .process("t/split/0")
        .unwrap()
        .address
        .expect("a peer address");
    let peer_port = in_range(&peer);
    assert_ne!(peer_port, port);
    let logs = first_line("t/split/0");
    assert!(
        logs.contains(&format!(
            "started t/split/0 with task --name split --topology-addr 127.0.0.1:1 --instance 0 \
             --instances 1 --layout 1 --peer-listen 127.0.0.1:{peer_port} \
             --peer-advertise 127.0.0.1:{peer_port} --metrics-target prometheus=127.0.0.1:"
        )),
        "{logs}"
    );
    let stderr = agent.get("/api/v1/processes/t/server/logs?stream=stderr");
    assert_eq!(stderr.json()["text"], "to stderr\n", "{}", stderr.body);

    // The heartbeats carry the agent's id, address, node and processes.
    wait_for("a heartbeat reporting both processes running", || {
        let st = director.state.lock().unwrap();
        let hb = st.heartbeats.last()?;
        (hb.processes.len() == 2
            && hb
                .processes
                .iter()
                .all(|p| p.state == ProcessState::Running))
        .then(|| {
            assert_eq!(hb.address, agent.addr);
            assert!(!hb.agent_id.is_empty());
            assert!(hb.node.cores >= 1 && !hb.node.hostname.is_empty());
        })
    });
    // One download served both processes of the package.
    assert_eq!(director.downloads(&hash), 1);

    // The same assignment, beat after beat, changes nothing.
    let seen = director.heartbeats();
    wait_for("five more heartbeats", || {
        (director.heartbeats() >= seen + 5).then_some(())
    });
    assert_eq!(agent.wait_running(&["t/server", "t/split/0"]), pids);
    assert_eq!(director.downloads(&hash), 1);

    // A new layout of the worker's task (a rebalance): the worker is
    // replaced, with the new count and layout, on the same peer port; the
    // server stays as it is.
    director.assign(vec![spec("t/server", &hash, Role::Topology), split(5, 2)]);
    let relaid = wait_for("the worker replaced", || {
        let p = agent.process("t/split/0")?;
        (p.state == ProcessState::Running && p.generation == 5 && p.pid? != pids["t/split/0"])
            .then_some(p)
    });
    assert_eq!(relaid.address.as_deref(), Some(peer.as_str()));
    let logs = first_line("t/split/0");
    assert!(
        logs.contains(&format!(
            "--instances 2 --layout 5 --peer-listen 127.0.0.1:{peer_port} "
        )),
        "{logs}"
    );
    assert_eq!(
        agent.process("t/server").unwrap().pid,
        Some(pids["t/server"])
    );
    let pids = agent.wait_running(&["t/server", "t/split/0"]);

    // A change: a worker goes, another comes, the server stays as it is.
    director.assign(vec![
        spec("t/server", &hash, Role::Topology),
        spec("t/count/0", &hash, Role::Task),
    ]);
    let after = agent.wait_running(&["t/server", "t/count/0"]);
    assert_eq!(after["t/server"], pids["t/server"]);
    wait_for("t/split/0 gone", || {
        (agent.process("t/split/0").is_none() && !alive(pids["t/split/0"])).then_some(())
    });
    assert_eq!(agent.process("t/server").unwrap().address, Some(address));

    // A new generation of the server replaces it.
    let mut server = spec("t/server", &hash, Role::Topology);
    server.generation = 2;
    director.assign(vec![server, spec("t/count/0", &hash, Role::Task)]);
    let replaced = wait_for("the server replaced", || {
        let p = agent.process("t/server")?;
        (p.state == ProcessState::Running && p.generation == 2 && p.pid? != pids["t/server"])
            .then_some(p.pid?)
    });
    assert!(!alive(pids["t/server"]));
    assert_eq!(marked_processes(&agent.data_dir).len(), 2);
    assert!(marked_processes(&agent.data_dir).contains(&replaced));

    // Nothing assigned: everything stops.
    director.assign(vec![]);
    wait_for("every process stopped", || {
        (agent.processes().is_empty() && marked_processes(&agent.data_dir).is_empty()).then_some(())
    });
    assert_eq!(director.state.lock().unwrap().unauthorized, 0);
}

#[test]
fn restarts_a_process_killed_with_sigkill() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "restart");
    let agent = Agent::start(&tmp.path().join("data"), &["--port-range", &port_range(4)]);
    // No director: the package is uploaded, the assignment posted.
    let r = agent.put(&format!("/api/v1/packages/{hash}"), None, &archive);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["name"], "sleeper");
    let r = agent.assign(None, vec![spec("r/server", &hash, Role::Topology)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["started"], serde_json::json!(["r/server"]));
    let pid = agent.wait_running(&["r/server"])["r/server"];

    signal(pid, libc::SIGKILL);
    let p = wait_for("a restart", || {
        let p = agent.process("r/server")?;
        (p.state == ProcessState::Running && p.restarts >= 1 && p.pid? != pid).then_some(p)
    });
    assert!(!alive(pid));
    assert_eq!(marked_processes(&agent.data_dir), vec![p.pid.unwrap()]);
    let metrics = agent.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tempest_agent_restarts_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The sleeper serves no metrics: its scrape fails, is counted, and the
    // rest of the page is served.
    let scrape_errors: u64 = metrics
        .lines()
        .find(|l| l.starts_with("tempest_agent_scrape_errors_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(scrape_errors >= 1, "{metrics}");

    // Applying the same assignment again changes nothing.
    let r = agent.assign(None, vec![spec("r/server", &hash, Role::Topology)]);
    let j = r.json();
    assert_eq!(j["started"], serde_json::json!([]), "{j}");
    assert_eq!(j["replaced"], serde_json::json!([]), "{j}");
    assert_eq!(agent.process("r/server").unwrap().pid, p.pid);
}

#[test]
fn refuses_a_bad_package_while_the_others_run() {
    let tmp = tempdir();
    let (good, good_hash) = sleeper(tmp.path(), "good");
    let (other, _) = sleeper(tmp.path(), "other");
    let (text, text_hash) = script_package(tmp.path(), "notes", "just some notes, no program\n");
    // The director serves other bytes than the hash names.
    let bad_hash = sha256_hex(b"what the assignment says the package is");
    let director = Director::start();
    director.serve_package(&good_hash, good);
    director.serve_package(&bad_hash, other);
    director.serve_package(&text_hash, text);
    director.assign(vec![
        spec("g/server", &good_hash, Role::Topology),
        spec("b/server", &bad_hash, Role::Topology),
        spec("n/server", &text_hash, Role::Topology),
        spec("x/server", "../../etc", Role::Topology),
    ]);
    let agent = Agent::secured(
        &tmp.path().join("data"),
        &[
            "--director",
            &director.url(),
            "--heartbeat-ms",
            "100",
            "--port-range",
            &port_range(10),
        ],
    );
    let pids = agent.wait_running(&["g/server"]);
    let failed = |id: &str| {
        wait_for(&format!("{id} failed"), || {
            let p = agent.process(id)?;
            (p.state == ProcessState::Failed).then(|| p.error.unwrap_or_default())
        })
    };
    let err = failed("b/server");
    assert!(
        err.contains(&bad_hash) && err.contains("hash mismatch"),
        "{err}"
    );
    let err = failed("n/server");
    assert!(err.contains("not an executable"), "{err}");
    let err = failed("x/server");
    assert!(err.contains("not a package content hash"), "{err}");
    // Nothing of the refused packages was kept; the good one runs on.
    let store = agent.data_dir.join("packages");
    assert!(!store.join(&bad_hash).exists());
    assert!(!store.join(&text_hash).exists());
    assert!(store.join(&good_hash).join("sleeper").is_file());
    assert_eq!(agent.wait_running(&["g/server"]), pids);
    assert_eq!(marked_processes(&agent.data_dir), vec![pids["g/server"]]);
    // The director hears about the failures.
    wait_for("a heartbeat reporting the failure", || {
        let st = director.state.lock().unwrap();
        let hb = st.heartbeats.last()?;
        hb.processes
            .iter()
            .any(|p| p.id == "b/server" && p.state == ProcessState::Failed)
            .then_some(())
    });
    assert_eq!(agent.get("/api/v1/health").status, 200);
}

#[test]
fn an_exhausted_port_range_fails_only_the_process_without_a_port() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "ports");
    let agent = Agent::start(&tmp.path().join("data"), &["--port-range", &port_range(5)]);
    assert_eq!(
        agent
            .put(&format!("/api/v1/packages/{hash}"), None, &archive)
            .status,
        200
    );
    // Every process takes two ports (one to listen on, one for metrics):
    // the second worker finds one left, and gets none.
    let r = agent.assign(
        None,
        vec![
            spec("p/server", &hash, Role::Topology),
            spec("p/a/0", &hash, Role::Task),
            spec("p/b/0", &hash, Role::Task),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let pids = agent.wait_running(&["p/server", "p/a/0"]);
    let p = agent.process("p/b/0").unwrap();
    assert_eq!(p.state, ProcessState::Failed);
    let err = p.error.unwrap();
    assert!(
        err.contains("no free port") && err.contains("p/b/0"),
        "{err}"
    );
    assert_eq!(p.address, None);
    let a = agent.process("p/a/0").unwrap();
    let a_peer = a.address.expect("a's peer address");
    // Freeing a port lets it run; the others are left alone.
    let r = agent.assign(
        None,
        vec![
            spec("p/server", &hash, Role::Topology),
            spec("p/b/0", &hash, Role::Task),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let now = agent.wait_running(&["p/server", "p/b/0"]);
    assert_eq!(now["p/server"], pids["p/server"]);
    // With ports a/0 let go of: none of the server's.
    let server = agent.process("p/server").unwrap().address.unwrap();
    let b_peer = agent.process("p/b/0").unwrap().address.unwrap();
    assert_ne!(b_peer, server);
    assert!(
        b_peer.starts_with("127.0.0.1:"),
        "{b_peer} (a/0 had {a_peer})"
    );
}

/// The variables of a process's environment.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[test]
fn every_call_but_health_needs_the_token_and_typed_bodies() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "token");
    let agent = Agent::secured(&tmp.path().join("data"), &["--port-range", &port_range(4)]);
    let body = serde_json::to_vec(&Assignment::default()).unwrap();
    // Every read but the health check.
    assert_eq!(agent.proc.get_as("/api/v1/health", None).status, 200);
    for path in [
        "/api/v1/node",
        "/api/v1/processes",
        "/api/v1/processes/k%2Fserver",
        "/api/v1/processes/k%2Fserver/logs",
        "/api/v1/metrics",
        "/metrics",
        "/api/v1/assignment",
        "/api/v1/nothing/here",
    ] {
        // (A wrong token on half of them: ten wrong tokens from one
        // address shut it out for a while, as the next test shows.)
        let wrong = path.contains("process").then_some("wrong");
        for token in [None, wrong] {
            let r = agent.proc.get_as(path, token);
            assert_eq!(r.status, 401, "{path} {token:?}: {}", r.body);
            assert!(r.json()["error"].is_string());
        }
        let r = agent.get(path);
        assert!(
            r.status != 401 && r.status != 429,
            "{path} with the token: {}",
            r.status
        );
    }
    // Every change.
    for (token, why) in [(None, "needs the agent token"), (Some("wrong"), "wrong")] {
        let r = agent.post("/api/v1/assignment", token, &body);
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains(why),
            "{}",
            r.body
        );
        let r = agent.put(&format!("/api/v1/packages/{hash}"), token, &archive);
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // Even a malformed body is refused for the token first.
    assert_eq!(agent.post("/api/v1/assignment", None, b"{").status, 401);
    // A body of another type is refused, even with the token: the types a
    // page may send another site without asking (text/plain, forms), and
    // none at all.
    let auth = format!("Bearer {TOKEN}");
    for kind in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(k) = kind {
            headers.push(("Content-Type", k));
        }
        let r = request(&agent.addr, "POST", "/api/v1/assignment", &headers, &body).unwrap();
        assert_eq!(r.status, 415, "{kind:?}: {}", r.body);
        let path = format!("/api/v1/packages/{hash}");
        let r = request(&agent.addr, "PUT", &path, &headers, &archive).unwrap();
        assert_eq!(r.status, 415, "{kind:?}: {}", r.body);
    }
    // With it, the calls go through.
    let r = agent.put(&format!("/api/v1/packages/{hash}"), Some(TOKEN), &archive);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = agent.assign(Some(TOKEN), vec![spec("k/server", &hash, Role::Topology)]);
    assert_eq!(r.status, 200, "{}", r.body);
    agent.wait_running(&["k/server"]);
}

#[test]
fn wrong_tokens_from_one_address_are_rate_limited() {
    let tmp = tempdir();
    let agent = Agent::secured(&tmp.path().join("data"), &["--port-range", &port_range(4)]);
    // No token at all is not counted: only wrong ones.
    for _ in 0..20 {
        assert_eq!(agent.proc.get_as("/api/v1/node", None).status, 401);
    }
    for i in 0..10 {
        let r = agent.proc.get_as("/api/v1/node", Some("wrong"));
        assert_eq!(r.status, 401, "attempt {i}: {}", r.body);
    }
    // The eleventh is refused before its token is looked at, the right
    // one included, with when to come back.
    for token in [Some("wrong"), Some(TOKEN)] {
        let r = agent.proc.get_as("/api/v1/node", token);
        assert_eq!(r.status, 429, "{token:?}: {}", r.body);
        let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&after), "{after}");
        assert!(
            r.json()["error"].as_str().unwrap().contains("too many"),
            "{}",
            r.body
        );
    }
    // The health check stays open.
    assert_eq!(agent.proc.get_as("/api/v1/health", None).status, 200);
}

#[test]
fn a_page_of_another_site_cannot_change_an_agent_without_a_token() {
    let tmp = tempdir();
    let agent = Agent::start(&tmp.path().join("data"), &["--port-range", &port_range(4)]);
    let (_, hash) = sleeper(tmp.path(), "cross-site");
    // What a cross-site form or a no-preflight fetch can send: refused,
    // and the assignment is as it was.
    let body = serde_json::to_vec(&Assignment {
        processes: vec![spec("x/server", &hash, Role::Topology)],
    })
    .unwrap();
    for kind in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = request(
            &agent.addr,
            "POST",
            "/api/v1/assignment",
            &[
                ("Content-Type", kind),
                ("Origin", "http://attacker.example"),
            ],
            &body,
        )
        .unwrap();
        assert_eq!(r.status, 415, "{kind}: {}", r.body);
    }
    assert_eq!(
        agent.get("/api/v1/assignment").json(),
        serde_json::json!({"processes": []})
    );
}

#[test]
fn its_processes_hold_no_credential_but_their_data_secret_and_its_files_are_its_own() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "environ");
    // A data directory someone else made, open to all.
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("logs")).unwrap();
    for d in [&data, &data.join("logs")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Credentials in the agent's own environment, as a careless start
    // script might leave them: none may reach its processes.
    let leaked = [
        ("TEMPEST_ADMIN_TOKEN", "leaked-admin-token"),
        ("TEMPEST_VIEWER_TOKEN", "leaked-viewer-token"),
        ("TEMPEST_TOKEN", "leaked-old-token"),
        ("TEMPEST_DATA_SECRET", "leaked-other-deployment-secret"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let proc = AgentProcess::start_with_env(
        &data,
        &["--port-range", &port_range(4)],
        Some(TOKEN),
        &leaked,
    );
    let agent = Agent {
        addr: proc.addr.clone(),
        data_dir: proc.data_dir.clone(),
        proc,
    };
    let r = agent.put(&format!("/api/v1/packages/{hash}"), Some(TOKEN), &archive);
    assert_eq!(r.status, 200, "{}", r.body);
    let secret = "d".repeat(64);
    let mut server = spec("k/server", &hash, Role::Topology);
    server.data_secret = Some(tempest_control::Secret::new(&secret, "test").unwrap());
    server.env.insert("DB_URL".into(), "postgres://db".into());
    let mut worker = spec("k/t/0", &hash, Role::Task);
    worker.data_secret = server.data_secret.clone();
    let r = agent.assign(Some(TOKEN), vec![server, worker]);
    assert_eq!(r.status, 200, "{}", r.body);
    let pids = agent.wait_running(&["k/server", "k/t/0"]);
    for (id, pid) in &pids {
        let env = environ(*pid);
        assert!(
            env.contains(&format!("TEMPEST_DATA_SECRET={secret}")),
            "{id}: its deployment's secret: {env:?}"
        );
        if id == "k/server" {
            assert!(env.contains(&"DB_URL=postgres://db".to_owned()), "{id}");
        }
        for var in [
            "TEMPEST_TOKEN",
            "TEMPEST_AGENT_TOKEN",
            "TEMPEST_ADMIN_TOKEN",
            "TEMPEST_VIEWER_TOKEN",
        ] {
            assert!(
                !env.iter().any(|v| v.starts_with(&format!("{var}="))),
                "{id} holds {var}: {env:?}"
            );
        }
        for value in [
            TOKEN,
            "leaked-admin-token",
            "leaked-viewer-token",
            "leaked-old-token",
        ] {
            assert!(
                !env.iter().any(|v| v.contains(value)),
                "{id} holds a credential: {env:?}"
            );
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&secret),
            "{id}: no secret on a command line"
        );
    }
    // Read back, a spec shows that it has a secret, not the secret.
    let r = agent.get("/api/v1/assignment");
    assert!(!r.body.contains(&secret), "{}", r.body);
    assert_eq!(r.json()["processes"][0]["data_secret"], "***");

    // Everything under its data directory is its own: directories and
    // executables 0700 at most, other files 0600 at most.
    let mut files = 0;
    let mut stack = vec![agent.data_dir.clone()];
    while let Some(dir) = stack.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o700, 0, "{} is {mode:o}", dir.display());
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                let limit = if mode & 0o100 != 0 { 0o700 } else { 0o600 };
                assert_eq!(mode & !limit, 0, "{} is {mode:o}", e.path().display());
                files += 1;
            }
        }
    }
    let mode = std::fs::metadata(&agent.data_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert!(files >= 6, "records, logs, the package: {files} files");
    for name in ["processes.json", "assignment.json", "agent-id"] {
        assert!(agent.data_dir.join(name).is_file(), "{name}");
    }
}

#[test]
fn bad_requests_get_json_errors_and_the_agent_goes_on() {
    let tmp = tempdir();
    let agent = Agent::start(&tmp.path().join("data"), &["--port-range", &port_range(4)]);
    let r = agent.get("/api/v1/processes/no%2Fsuch/logs");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("no/such"),
        "{}",
        r.body
    );
    assert_eq!(agent.get("/api/v1/processes/no/such").status, 404);
    assert_eq!(agent.get("/api/v1/nothing/here").status, 404);
    assert!(agent.get("/api/v1/nothing/here").json()["error"].is_string());

    let r = agent.post("/api/v1/assignment", None, b"{\"processes\": [");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("malformed assignment"),
        "{}",
        r.body
    );
    let r = agent.post(
        "/api/v1/assignment",
        None,
        b"{\"processes\": [], \"extra\": 1}",
    );
    assert_eq!(
        r.status, 200,
        "unknown top-level fields are tolerated: {}",
        r.body
    );
    let dup = serde_json::to_vec(&Assignment {
        processes: vec![
            spec("d/server", &"a".repeat(64), Role::Topology),
            spec("d/server", &"a".repeat(64), Role::Topology),
        ],
    })
    .unwrap();
    let r = agent.post("/api/v1/assignment", None, &dup);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("more than once"));
    let r = agent.put("/api/v1/packages/xyz", None, b"abc");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = agent.put(
        &format!("/api/v1/packages/{}", "0".repeat(64)),
        None,
        b"abc",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("hash mismatch"));
    assert_eq!(agent.get("/api/v1/assignment").status, 200);
    let r = request(&agent.addr, "DELETE", "/api/v1/assignment", &[], b"").unwrap();
    assert_eq!(r.status, 405, "{}", r.body);
    assert!(r.json()["error"].is_string());

    // Log parameters are checked (on a process that exists).
    let (archive, hash) = sleeper(tmp.path(), "bad requests");
    assert_eq!(
        agent
            .put(&format!("/api/v1/packages/{hash}"), None, &archive)
            .status,
        200
    );
    assert_eq!(
        agent
            .assign(None, vec![spec("l/server", &hash, Role::Topology)])
            .status,
        200
    );
    agent.wait_running(&["l/server"]);
    for q in ["stream=both", "lines=many", "lines=-1", "line=5"] {
        let r = agent.get(&format!("/api/v1/processes/l%2Fserver/logs?{q}"));
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert!(r.json()["error"].is_string());
    }
    let r = agent.get("/api/v1/processes/l%2Fserver/logs?lines=999999999");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["lines"], 10_000, "capped");

    let r = agent.get("/api/v1/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let node = agent.get("/api/v1/node").json();
    assert!(node["memory_total"].as_u64().unwrap() > 0, "{node}");
    assert!(node["disk_free"].as_u64().unwrap() > 0, "{node}");
    assert_eq!(node["load"].as_array().unwrap().len(), 3, "{node}");
}

#[test]
fn keeps_its_processes_when_the_director_is_away_or_talks_nonsense() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "away");
    let mut director = Director::start();
    director.serve_package(&hash, archive);
    director.assign(vec![
        spec("a/server", &hash, Role::Topology),
        spec("a/split/0", &hash, Role::Task),
    ]);
    let agent = Agent::secured(
        &tmp.path().join("data"),
        &[
            "--director",
            &director.url(),
            "--heartbeat-ms",
            "50",
            "--port-range",
            &port_range(6),
        ],
    );
    let pids = agent.wait_running(&["a/server", "a/split/0"]);
    let errors = |agent: &Agent| -> u64 {
        agent
            .metrics()
            .lines()
            .find(|l| l.starts_with("tempest_agent_heartbeat_errors_total{"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap()
    };

    // Nonsense answers.
    director.state.lock().unwrap().garbage = true;
    let seen = director.heartbeats();
    wait_for("five nonsense answers", || {
        (director.heartbeats() >= seen + 5 && errors(&agent) >= 5).then_some(())
    });
    assert_eq!(agent.wait_running(&["a/server", "a/split/0"]), pids);

    // No director at all.
    director.shutdown();
    let before = errors(&agent);
    wait_for("five failed heartbeats", || {
        (errors(&agent) >= before + 5).then_some(())
    });
    assert_eq!(agent.wait_running(&["a/server", "a/split/0"]), pids);
    assert!(agent.metrics().contains("tempest_agent_director_up{"));

    // Logged once per change of state, not every beat.
    let log = agent.stderr_text();
    assert_eq!(log.matches("not an assignment").count(), 1, "{log}");
    assert_eq!(log.matches("cannot reach the director").count(), 1, "{log}");
}

#[test]
fn survives_its_own_sigkill_without_orphans_or_duplicates() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "sigkill");
    let director = Director::start();
    director.serve_package(&hash, archive);
    let ids = ["s/server", "s/split/0", "s/count/0"];
    director.assign(vec![
        spec(ids[0], &hash, Role::Topology),
        spec(ids[1], &hash, Role::Task),
        spec(ids[2], &hash, Role::Task),
    ]);
    let data = tmp.path().join("data");
    let range = port_range(10);
    let args = [
        "--director",
        &director.url(),
        "--heartbeat-ms",
        "100",
        "--port-range",
        &range,
    ];
    let first = Agent::secured(&data, &args);
    let pids = first.wait_running(&ids);
    let addresses: Vec<Option<String>> = ids
        .iter()
        .map(|id| first.process(id).unwrap().address)
        .collect();
    assert!(addresses.iter().all(Option::is_some), "{addresses:?}");
    let id = first.get("/api/v1/health").json()["agent_id"].clone();
    let data_dir = first.data_dir.clone();
    let _orphans = first.kill9();
    // The processes outlive their agent.
    assert!(pids.values().all(|p| alive(*p)));

    let second = Agent::secured(&data, &args);
    assert_eq!(second.get("/api/v1/health").json()["agent_id"], id);
    let beats = director.heartbeats();
    wait_for("the new agent heartbeating", || {
        (director.heartbeats() >= beats + 5).then_some(())
    });
    // Each spec has exactly one live process: the one adopted.
    assert_eq!(second.wait_running(&ids), pids);
    let mut live = marked_processes(&data_dir);
    let mut expected: Vec<u32> = pids.values().copied().collect();
    live.sort();
    expected.sort();
    assert_eq!(live, expected);
    // With the same ports: the server's, and the workers' peer ports.
    let now: Vec<Option<String>> = ids
        .iter()
        .map(|id| second.process(id).unwrap().address)
        .collect();
    assert_eq!(now, addresses);
    assert_eq!(
        director.downloads(&hash),
        1,
        "the package is not fetched again"
    );

    // The adopted processes are supervised: killed, one is restarted.
    signal(pids[ids[1]], libc::SIGKILL);
    wait_for("the adopted worker restarted", || {
        let p = second.process(ids[1])?;
        (p.state == ProcessState::Running && p.pid? != pids[ids[1]]).then_some(())
    });
    assert_eq!(marked_processes(&data_dir).len(), 3);
}

#[test]
fn starts_from_its_kept_assignment_without_a_director() {
    let tmp = tempdir();
    let (archive, hash) = sleeper(tmp.path(), "kept");
    let data = tmp.path().join("data");
    let range = port_range(4);
    let pid = {
        let agent = Agent::start(&data, &["--port-range", &range]);
        agent.put(&format!("/api/v1/packages/{hash}"), None, &archive);
        agent.assign(None, vec![spec("k/server", &hash, Role::Topology)]);
        let pid = agent.wait_running(&["k/server"])["k/server"];
        drop(agent.kill9());
        pid
    };
    signal(pid, libc::SIGKILL);
    // Restarted, the agent converges to what it was last told.
    let agent = Agent::start(&data, &["--port-range", &range]);
    let now = agent.wait_running(&["k/server"]);
    assert_ne!(now["k/server"], pid);
    let kept = agent.get("/api/v1/assignment").json();
    assert_eq!(kept["processes"][0]["id"], "k/server");
}

// ---------------------------------------------------------------------------
// Metrics of a real topology.

#[test]
fn serves_the_aggregated_metrics_of_a_running_topology() {
    let tmp = tempdir();
    // The package's binary is a script that runs the real word count binary
    // (packing its 100+ MB would only slow the test down).
    let wordcount = cargo_bin("wordcount", "wordcount");
    let (archive, hash) = script_package(
        tmp.path(),
        "wordcount",
        &format!("#!/bin/sh\nexec '{}' \"$@\"\n", wordcount.display()),
    );
    let director = Director::start();
    director.serve_package(&hash, archive);
    // Few roots in flight, so the embedded input lasts the whole test.
    let config = "max_pending = 4\nbatch_size = 4\n".to_owned();
    let mut server = spec("wordcount/server", &hash, Role::Topology);
    server.topology = "wordcount".into();
    server.config = Some(config.clone());
    director.assign(vec![server.clone()]);
    let agent = Agent::secured(
        &tmp.path().join("data"),
        &[
            "--director",
            &director.url(),
            "--heartbeat-ms",
            "100",
            "--port-range",
            &port_range(12),
        ],
    );
    agent.wait_running(&["wordcount/server"]);
    // As the director would: place the workers once the server's address
    // is known.
    let addr = agent.process("wordcount/server").unwrap().address.unwrap();
    let worker = |task: &str, instance: u32| {
        let mut s = spec(&format!("wordcount/{task}/{instance}"), &hash, Role::Task);
        s.topology = "wordcount".into();
        s.task = Some(task.into());
        s.instance = Some(instance);
        s.instances = Some(if task == "count" { 2 } else { 1 });
        s.topology_addr = Some(addr.clone());
        s.config = Some(config.clone());
        s
    };
    director.assign(vec![
        server,
        worker("split", 0),
        worker("count", 0),
        worker("count", 1),
        worker("output", 0),
    ]);
    agent.wait_running(&[
        "wordcount/server",
        "wordcount/split/0",
        "wordcount/count/0",
        "wordcount/count/1",
        "wordcount/output/0",
    ]);
    let acked = |text: &str| -> Option<u64> {
        text.lines()
            .filter(|l| l.starts_with("tempest_source_acked_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .reduce(|a, b| a + b)
    };
    let first = wait_for("acked roots in the agent's metrics", || {
        acked(&agent.metrics()).filter(|n| *n > 0)
    });
    let text = wait_for("the acked count growing", || {
        let text = agent.metrics();
        (acked(&text)? > first).then_some(text)
    });
    // Each family once, the agent's own figures beside the processes'.
    assert_eq!(
        text.matches("# TYPE tempest_source_acked_total counter")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE tempest_task_messages_in_total counter")
            .count(),
        1,
        "{text}"
    );
    for name in [
        "tempest_agent_processes{",
        "tempest_agent_scrape_errors_total{",
        "tempest_node_memory_available_bytes{",
        "tempest_node_load1{",
        "tempest_task_messages_in_total{",
    ] {
        assert!(text.contains(name), "no {name} in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("tempest_agent_processes{")
                && l.contains("state=\"running\"")
                && l.ends_with(" 5")),
        "{text}"
    );
    // Both count workers report, each under its instance.
    for i in ["0", "1"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("tempest_task_messages_in_total{")
                    && l.contains("task=\"count\"")
                    && l.contains(&format!("instance=\"{i}\""))),
            "no count instance {i} in\n{text}"
        );
    }
}

#[test]
fn refuses_an_open_api_beyond_loopback() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let mut cmd = std::process::Command::new(cargo_bin("tempest-agent", "tempest-agent"));
    for var in [
        "TEMPEST_TOKEN",
        "TEMPEST_AGENT_TOKEN",
        "TEMPEST_ADMIN_TOKEN",
        "TEMPEST_VIEWER_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without a token") && err.contains("--insecure"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!data.exists(), "nothing was made");
    // A token is not enough: beyond loopback the API (its token, its
    // processes' secrets) needs TLS too.
    let out = std::process::Command::new(cargo_bin("tempest-agent", "tempest-agent"))
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(&data)
        .env("TEMPEST_AGENT_TOKEN", TOKEN)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("tls_cert_file") && err.contains("--insecure"),
        "{err}"
    );
    assert!(!data.exists(), "nothing was made");
    // Nor does it heartbeat in clear to a director beyond loopback.
    let out = std::process::Command::new(cargo_bin("tempest-agent", "tempest-agent"))
        .args(["--director", "http://10.1.2.3:7300", "--data-dir"])
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plain http") && err.contains("https://"),
        "{err}"
    );
    // --insecure serves without either, warning.
    let agent = AgentProcess::start(
        &tmp.path().join("open"),
        &[
            "--listen",
            "0.0.0.0:0",
            "--insecure",
            "--port-range",
            &port_range(4),
        ],
    );
    let log = std::fs::read_to_string(&agent.daemon.log).unwrap_or_default();
    assert!(log.contains("WARN") && log.contains("--insecure"), "{log}");
    assert!(log.contains("without TLS"), "{log}");
}
