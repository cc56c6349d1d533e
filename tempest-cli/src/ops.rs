//! The commands that operate a cluster through its director: deploy, list,
//! status, stop/start/kill, rebalance, logs, agents, packages.
//!
//! Each prints a human table by default and the director's own JSON with
//! `--json` (on standard output; progress goes to standard error).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use tempest_core::config::TopologyFile;

use crate::client::{encode, is_status, Client};
use crate::package;
use crate::progress::{bytes_bar, Counting, Step};
use crate::table::{age, ago, bytes, count, ms, rate, Table};
use crate::Problems;

// ---------------------------------------------------------------------------
// What the director answers, as far as the tables need it. Fields the
// director adds later are ignored; missing ones default.

#[derive(Deserialize, Default)]
#[serde(default)]
struct Summary {
    name: String,
    package: String,
    package_name: String,
    state: String,
    phase: String,
    generation: u64,
    workers: BTreeMap<String, u32>,
    processes: usize,
    running: usize,
    msgs_per_sec: f64,
    acked: u64,
    failed: u64,
    in_flight: u64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Detail {
    #[serde(flatten)]
    summary: Summary,
    placement: Vec<ProcessView>,
    tasks: BTreeMap<String, TaskFigures>,
    source: SourceFigures,
    sources: BTreeMap<String, PerSource>,
    source_edges: Vec<SourceEdge>,
    recent_errors: Vec<RecentError>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct ProcessView {
    id: String,
    role: String,
    task: Option<String>,
    instance: Option<u32>,
    agent: String,
    agent_up: bool,
    state: String,
    pid: Option<u32>,
    address: Option<String>,
    restarts: u32,
    uptime_secs: u64,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TaskFigures {
    workers: u32,
    messages_in: u64,
    msgs_per_sec: f64,
    errors: u64,
    handle_p99_ms: Option<f64>,
    capacity: f64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SourceFigures {
    polled: u64,
    acked: u64,
    failed: u64,
    timed_out: u64,
    dead_lettered: u64,
    retried: u64,
    errors: u64,
    healthy: Option<bool>,
    worker_connections: u64,
}

/// One of a topology's sources (`default` names a topology's one unnamed
/// source, or that of a server older than named sources).
#[derive(Deserialize, Default)]
#[serde(default)]
struct PerSource {
    healthy: Option<bool>,
    polled: u64,
    acked: u64,
    failed: u64,
    errors: u64,
    in_flight: u64,
    msgs_per_sec: f64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SourceEdge {
    source: String,
    to: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RecentError {
    process: String,
    agent: String,
    state: String,
    restarts: u32,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AgentView {
    id: String,
    address: String,
    up: bool,
    last_heartbeat_ms: u64,
    node: Node,
    placed: usize,
    processes: Vec<AgentProcess>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Node {
    hostname: String,
    cores: u32,
    memory_total: u64,
    memory_available: u64,
    load: [f64; 3],
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AgentProcess {
    state: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PackageView {
    hash: String,
    manifest: ManifestView,
    size: u64,
    uploaded_at_ms: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ManifestView {
    name: String,
    version: String,
    target: String,
    tempest_version: String,
}

fn parse<T: for<'de> Deserialize<'de>>(v: &Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone())
        .map_err(|e| anyhow!("the director's answer for {what} is not what this CLI reads: {e}"))
}

fn print_json(v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).context("formatting JSON")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").context("writing to standard output")
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Fetches a topology, with a 404 named as an unknown topology.
fn topology(client: &Client, name: &str) -> Result<Value> {
    client
        .get(&format!("/api/v1/topologies/{}", encode(name)))
        .map_err(|e| unknown_topology(e, client, name))
}

fn unknown_topology(e: anyhow::Error, client: &Client, name: &str) -> anyhow::Error {
    if is_status(&e, StatusCode::NOT_FOUND) {
        anyhow!(
            "no topology `{name}` on the director at {} (`tempest list` shows the deployed ones)",
            client.target().url
        )
    } else {
        e
    }
}

// ---------------------------------------------------------------------------
// list, status

/// `tempest list`.
pub fn list(client: &Client, json: bool) -> Result<()> {
    let v = client.get("/api/v1/topologies")?;
    if json {
        return print_json(&v);
    }
    let all: Vec<Summary> = parse(&v, "the topologies")?;
    if all.is_empty() {
        outln!("no topologies deployed on {}", client.target().url);
        return Ok(());
    }
    let mut t = Table::new(&[
        "NAME",
        "STATE",
        "PHASE",
        "PACKAGE",
        ">PROCESSES",
        ">MSG/S",
        ">ACKED",
        ">FAILED",
        ">IN FLIGHT",
        ">P50",
        ">P99",
    ]);
    for s in all {
        t.row(vec![
            s.name,
            s.state,
            s.phase,
            format!("{} ({})", s.package_name, short(&s.package)),
            format!("{}/{}", s.running, s.processes),
            rate(s.msgs_per_sec),
            count(s.acked),
            count(s.failed),
            count(s.in_flight),
            ms(s.p50_ms),
            ms(s.p99_ms),
        ]);
    }
    out!("{}", t.render());
    Ok(())
}

/// `tempest status NAME`.
pub fn status(client: &Client, name: &str, json: bool) -> Result<()> {
    let v = topology(client, name)?;
    if json {
        return print_json(&v);
    }
    let d: Detail = parse(&v, "the topology")?;
    out!("{}", render_status(&d));
    Ok(())
}

/// The `sources:` section of `tempest status`: a line saying which are
/// unhealthy, then one row per source with its health, rate and figures,
/// and the tasks it feeds.
fn render_sources(d: &Detail) -> String {
    let unhealthy: Vec<&str> = d
        .sources
        .iter()
        .filter(|(_, f)| f.healthy == Some(false))
        .map(|(n, _)| n.as_str())
        .collect();
    let mut out = format!("sources: {}", d.sources.len());
    if !unhealthy.is_empty() {
        let _ = write!(
            out,
            ", {} UNHEALTHY ({})",
            unhealthy.len(),
            unhealthy.join(", ")
        );
    }
    out.push('\n');
    let mut t = Table::new(&[
        "SOURCE",
        "HEALTH",
        ">ACKED/S",
        ">POLLED",
        ">ACKED",
        ">FAILED",
        ">ERRORS",
        ">IN FLIGHT",
        "FEEDS",
    ]);
    for (name, f) in &d.sources {
        let feeds: Vec<&str> = d
            .source_edges
            .iter()
            .filter(|e| &e.source == name)
            .map(|e| e.to.as_str())
            .collect();
        t.row(vec![
            name.clone(),
            match f.healthy {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "-",
            }
            .into(),
            rate(f.msgs_per_sec),
            count(f.polled),
            count(f.acked),
            count(f.failed),
            count(f.errors),
            count(f.in_flight),
            if feeds.is_empty() {
                // A server that does not say feeds the roots.
                "-".into()
            } else {
                feeds.join(", ")
            },
        ]);
    }
    out.push_str(&t.render());
    out
}

fn render_status(d: &Detail) -> String {
    let s = &d.summary;
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!(
        "{}: {} ({}), generation {}, package {} ({})",
        s.name,
        s.state,
        s.phase,
        s.generation,
        s.package_name,
        short(&s.package)
    ));
    line(format!(
        "processes {}/{} running; acked {}, failed {}, in flight {}; {} roots/s; latency p50 {} p99 {}",
        s.running,
        s.processes,
        count(s.acked),
        count(s.failed),
        count(s.in_flight),
        rate(s.msgs_per_sec),
        ms(s.p50_ms),
        ms(s.p99_ms)
    ));
    let src = &d.source;
    // Several sources (or one named): their totals here, each below.
    let per_source = d.sources.len() > 1 || d.sources.keys().any(|k| k != "default");
    line(format!(
        "{}: polled {}, acked {}, failed {}, timed out {}, dead-lettered {}, retried {}, errors {}, {}; {} worker connection{}",
        if d.sources.len() > 1 {
            "sources (in all)"
        } else {
            "source"
        },
        count(src.polled),
        count(src.acked),
        count(src.failed),
        count(src.timed_out),
        count(src.dead_lettered),
        count(src.retried),
        count(src.errors),
        match src.healthy {
            Some(true) => "healthy",
            Some(false) => "UNHEALTHY",
            None => "health not reported yet",
        },
        src.worker_connections,
        if src.worker_connections == 1 { "" } else { "s" }
    ));
    if per_source {
        out.push('\n');
        out.push_str(&render_sources(d));
    }
    out.push('\n');
    let mut tasks = Table::new(&[
        "TASK",
        ">WORKERS",
        ">MESSAGES IN",
        ">MSG/S",
        ">ERRORS",
        ">HANDLE P99",
        ">CAPACITY",
    ]);
    // Every task the topology runs, figures or not (before the first scrape).
    let mut names: Vec<&String> = s.workers.keys().collect();
    for n in d.tasks.keys() {
        if !s.workers.contains_key(n) {
            names.push(n);
        }
    }
    let none = TaskFigures::default();
    for n in names {
        let f = d.tasks.get(n).unwrap_or(&none);
        let workers = s.workers.get(n).copied().unwrap_or(f.workers);
        tasks.row(vec![
            n.clone(),
            workers.to_string(),
            count(f.messages_in),
            rate(f.msgs_per_sec),
            count(f.errors),
            ms(f.handle_p99_ms),
            format!("{:.0}%", (f.capacity * 100.0).clamp(0.0, 100.0)),
        ]);
    }
    out.push_str(&tasks.render());
    out.push('\n');
    let mut procs = Table::new(&[
        "PROCESS",
        "AGENT",
        "STATE",
        ">PID",
        ">RESTARTS",
        ">UPTIME",
        "ADDRESS",
    ]);
    let prefix = format!("{}/", s.name);
    for p in &d.placement {
        procs.row(vec![
            p.id.strip_prefix(&prefix).unwrap_or(&p.id).to_owned(),
            if p.agent_up {
                p.agent.clone()
            } else {
                format!("{} (down)", p.agent)
            },
            p.state.clone(),
            p.pid.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
            p.restarts.to_string(),
            if p.pid.is_some() {
                age(p.uptime_secs)
            } else {
                "-".into()
            },
            p.address.clone().unwrap_or_default(),
        ]);
    }
    if procs.is_empty() {
        out.push_str("no processes placed (is an agent up? `tempest agents`)\n");
    } else {
        out.push_str(&procs.render());
    }
    if !d.recent_errors.is_empty() {
        out.push_str("\nrecent errors:\n");
        for e in &d.recent_errors {
            out.push_str(&format!(
                "  {} on {}: {} after {} restart{}: {}\n",
                e.process.strip_prefix(&prefix).unwrap_or(&e.process),
                e.agent,
                e.state,
                e.restarts,
                if e.restarts == 1 { "" } else { "s" },
                e.error.as_deref().unwrap_or("no reason given")
            ));
        }
    }
    let failed: Vec<&ProcessView> = d
        .placement
        .iter()
        .filter(|p| p.error.is_some() && !d.recent_errors.iter().any(|e| e.process == p.id))
        .collect();
    for p in failed {
        out.push_str(&format!(
            "  {}: {}\n",
            p.id.strip_prefix(&prefix).unwrap_or(&p.id),
            p.error.as_deref().unwrap_or_default()
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// stop, start, kill, rebalance

/// A lifecycle command.
#[derive(Clone, Copy, Debug)]
pub enum Lifecycle {
    /// Stop the processes; keep the topology.
    Stop,
    /// Start a stopped topology.
    Start,
    /// Stop and forget.
    Kill,
}

/// `tempest stop|start|kill NAME`.
pub fn lifecycle(client: &Client, name: &str, cmd: Lifecycle, json: bool) -> Result<()> {
    let (path, done) = match cmd {
        Lifecycle::Stop => ("stop", "stopping"),
        Lifecycle::Start => ("start", "starting"),
        Lifecycle::Kill => ("kill", "killed"),
    };
    let v = client
        .post(&format!("/api/v1/topologies/{}/{path}", encode(name)), None)
        .map_err(|e| unknown_topology(e, client, name))?;
    if json {
        return print_json(&v);
    }
    match cmd {
        Lifecycle::Kill => outln!("{name}: {done}; its processes are being stopped"),
        _ => {
            let s: Summary = parse(&v, "the topology")?;
            outln!(
                "{name}: {done} (state {}, generation {}); `tempest status {name}` shows its processes",
                s.state, s.generation
            );
        }
    }
    Ok(())
}

/// `NAME=VALUE`, for --env.
pub fn parse_env_var(s: &str) -> std::result::Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| {
        format!("`{s}`: expected NAME=VALUE, such as WORDCOUNT_REDIS=redis://host:6379")
    })?;
    tempest_control::check_env_var(name, value).map_err(|e| format!("`{s}`: {e}"))?;
    Ok((name.to_owned(), value.to_owned()))
}

/// `TASK=N`, for --workers.
pub fn parse_task_count(s: &str) -> std::result::Result<(String, u32), String> {
    let (task, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected TASK=N, such as count=4"))?;
    let task = task.trim();
    tempest_control::check_name("task name", task).map_err(|e| format!("`{s}`: {e}"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: `{n}` is not a worker count"))?;
    if n == 0 {
        return Err(format!("`{s}`: a task needs at least 1 worker"));
    }
    Ok((task.to_owned(), n))
}

/// `tempest rebalance NAME --workers TASK=N ...`.
pub fn rebalance(client: &Client, name: &str, workers: &[(String, u32)], json: bool) -> Result<()> {
    let map: BTreeMap<&str, u32> = workers.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    let v = client
        .post(
            &format!("/api/v1/topologies/{}/rebalance", encode(name)),
            Some(&json!({ "workers": map })),
        )
        .map_err(|e| unknown_topology(e, client, name))?;
    if json {
        return print_json(&v);
    }
    let s: Summary = parse(&v, "the topology")?;
    let counts: Vec<String> = s.workers.iter().map(|(t, n)| format!("{t}×{n}")).collect();
    outln!(
        "{name}: rebalanced to {} (generation {})",
        counts.join(" "),
        s.generation
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// deploy

/// What `tempest deploy` was asked.
pub struct DeployArgs {
    /// A package archive to upload.
    pub archive: Option<PathBuf>,
    /// Or the crate to package first.
    pub package: package::Options,
    /// The topology's name (default: the package's).
    pub name: Option<String>,
    /// A Topology.toml laid over the package's.
    pub config: Option<PathBuf>,
    /// `KEY=VALUE` overrides, over `config`.
    pub set: Vec<String>,
    /// Worker counts.
    pub workers: Vec<(String, u32)>,
    /// Environment variables for the topology's processes.
    pub env: Vec<(String, String)>,
    /// Wait until every process runs.
    pub wait: bool,
}

/// `tempest deploy`.
pub fn deploy(client: &Client, args: &DeployArgs, json: bool) -> Result<()> {
    // Everything that can be checked here is checked before any build or
    // upload.
    let archive = match &args.archive {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("{}: cannot read the archive", path.display()))?;
            let pkg = tempest_control::package::read(&bytes, u64::MAX)
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            Some((bytes, pkg))
        }
        None => None,
    };
    let package_toml = match &archive {
        Some((_, pkg)) => pkg.topology_toml.clone(),
        None => std::fs::read_to_string(args.package.path.join("Topology.toml")).ok(),
    };
    let overrides = overrides(
        args.config.as_deref(),
        &args.set,
        package_toml.as_deref().and_then(source_kind),
    )?;
    // The name is known before any build: --name, else the package's own
    // (the archive's manifest, or the crate's name that packaging gives it).
    let name = match (&args.name, &archive) {
        (Some(name), _) => name.clone(),
        (None, Some((_, pkg))) => pkg.manifest.name.clone(),
        (None, None) => package::crate_name(&args.package.path)?,
    };
    check_topology_name(&name).map_err(|e| match args.name {
        Some(_) => e,
        None => e.context("the package's name; deploy it under another --name"),
    })?;
    preflight(client)?;
    name_is_free(client, &name)?;
    let bytes = match archive {
        Some((bytes, _)) => bytes,
        None => {
            let packaged = package::package(&args.package)?;
            std::fs::read(&packaged.archive)
                .with_context(|| format!("reading {}", packaged.archive.display()))?
        }
    };

    let hash = upload(client, bytes)?;
    let v = create(
        client,
        &Deployment {
            name: &name,
            package: &hash,
            config: overrides.as_deref(),
            workers: &args.workers,
            env: &args.env,
        },
    )?;
    let mut detail = v;
    if args.wait {
        if let Some(d) = wait_running(client, &name, DEPLOY_WAIT, || false)? {
            detail = d;
        }
    }
    if json {
        return print_json(&detail);
    }
    let s: Summary = parse(&detail, "the topology")?;
    let counts: Vec<String> = s.workers.iter().map(|(t, n)| format!("{t}×{n}")).collect();
    outln!(
        "deployed {name}: package {} ({}), tasks {}; {} of {} processes running",
        s.package_name,
        short(&hash),
        counts.join(" "),
        s.running,
        s.processes
    );
    outln!("`tempest status {name}` shows its figures, `tempest logs {name}` its logs");
    Ok(())
}

/// Checks that the director answers and takes the token before a build
/// that may take minutes. A deploy request without a body is refused with
/// 401 when the token is wrong (the token is checked first) and with 400
/// otherwise, and changes nothing.
fn preflight(client: &Client) -> Result<()> {
    client.get("/api/v1/health")?;
    match client.post("/api/v1/topologies", Some(&json!({}))) {
        Err(e) if is_status(&e, StatusCode::BAD_REQUEST) => Ok(()),
        Err(e) => Err(e),
        Ok(v) => bail!("the director accepted an empty deploy request: {v}"),
    }
}

fn already_deployed(name: &str) -> anyhow::Error {
    anyhow!(
        "a topology named `{name}` is already deployed: `tempest kill {name}` first, or deploy under another --name"
    )
}

/// Fails when `name` is taken, before anything is built or uploaded (the
/// deploy itself still refuses a name taken in the meantime).
fn name_is_free(client: &Client, name: &str) -> Result<()> {
    match client.get(&format!("/api/v1/topologies/{}", encode(name))) {
        Ok(_) => Err(already_deployed(name)),
        Err(e) if is_status(&e, StatusCode::NOT_FOUND) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Uploads a package archive, with its progress on standard error;
/// returns the package's hash.
pub(crate) fn upload(client: &Client, bytes: Vec<u8>) -> Result<String> {
    let len = bytes.len() as u64;
    let bar = bytes_bar(len, "uploading");
    if !crate::progress::tty() {
        eprintln!(
            "uploading the package ({}) to {} ...",
            crate::table::bytes(len),
            client.target().url
        );
    }
    let reader = Counting::new(std::io::Cursor::new(bytes), bar.clone());
    let result = client.upload(reader, len);
    bar.finish_and_clear();
    let v = result?;
    let hash = v["hash"]
        .as_str()
        .ok_or_else(|| anyhow!("the director's upload answer has no hash: {v}"))?
        .to_owned();
    eprintln!(
        "uploaded {} {} ({}, {})",
        v["manifest"]["name"].as_str().unwrap_or("the package"),
        v["manifest"]["version"].as_str().unwrap_or(""),
        short(&hash),
        crate::table::bytes(len)
    );
    Ok(hash)
}

/// What a deploy request asks the director.
pub(crate) struct Deployment<'a> {
    /// The topology's name.
    pub name: &'a str,
    /// The uploaded package's hash.
    pub package: &'a str,
    /// A `Topology.toml` laid over the package's.
    pub config: Option<&'a str>,
    /// Worker counts.
    pub workers: &'a [(String, u32)],
    /// Environment variables for the topology's processes.
    pub env: &'a [(String, String)],
}

/// Deploys an uploaded package; the director's answer.
pub(crate) fn create(client: &Client, d: &Deployment<'_>) -> Result<Value> {
    let mut body = json!({ "name": d.name, "package": d.package });
    if let Some(text) = d.config {
        body["config"] = json!(text);
    }
    if !d.workers.is_empty() {
        let map: BTreeMap<&str, u32> = d.workers.iter().map(|(t, n)| (t.as_str(), *n)).collect();
        body["workers"] = json!(map);
    }
    if !d.env.is_empty() {
        let map: BTreeMap<&str, &str> = d
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        body["env"] = json!(map);
    }
    client.post("/api/v1/topologies", Some(&body)).map_err(|e| {
        if is_status(&e, StatusCode::CONFLICT) {
            already_deployed(d.name)
        } else {
            e
        }
    })
}

/// How long `deploy --wait` waits for every process to run.
const DEPLOY_WAIT: Duration = Duration::from_secs(120);

/// Polls until every process of `name` runs, `within` at most; fails at
/// once, naming the process and its error, when one has failed or exited
/// (`failed`, `backoff`). None when `interrupted` says so first.
pub(crate) fn wait_running(
    client: &Client,
    name: &str,
    within: Duration,
    interrupted: impl Fn() -> bool,
) -> Result<Option<Value>> {
    let step = Step::start(format!("waiting for {name}'s processes to run"));
    let deadline = Instant::now() + within;
    loop {
        if interrupted() {
            step.abandon();
            return Ok(None);
        }
        let v = match topology(client, name) {
            Ok(v) => v,
            Err(e) => {
                step.abandon();
                return Err(e);
            }
        };
        let d: Detail = parse(&v, "the topology")?;
        let s = &d.summary;
        step.detail(format!(
            "waiting for {name}'s processes to run: {}/{}",
            s.running, s.processes
        ));
        if s.processes > 0 && s.running == s.processes {
            step.done(format!("{name}: all {} processes running", s.processes));
            return Ok(Some(v));
        }
        if let Some(e) = d.recent_errors.first() {
            step.abandon();
            let process = e
                .process
                .strip_prefix(&format!("{name}/"))
                .unwrap_or(&e.process);
            bail!(
                "{name}: process `{process}` ({}): {}; `tempest logs {name} --process {process}` shows its output",
                e.state,
                e.error.as_deref().unwrap_or("no reason given")
            );
        }
        if Instant::now() >= deadline {
            step.abandon();
            bail!(
                "{name}: {} of {} processes running after {}s; `tempest status {name}` shows why",
                s.running,
                s.processes,
                within.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Topology names as the director takes them.
fn check_topology_name(name: &str) -> Result<()> {
    tempest_control::check_name("topology name", name).map_err(|e| anyhow!(e))
}

/// The `[source] kind` of a `Topology.toml`.
fn source_kind(text: &str) -> Option<String> {
    let t: toml::Table = text.parse().ok()?;
    t.get("source")?.get("kind")?.as_str().map(str::to_owned)
}

/// The `Topology.toml` text laid over the package's: the `--config` file,
/// then every `--set KEY=VALUE` over it; checked as the director checks it,
/// with each problem traced to its flag. Overrides of `[source.config]`
/// keys alone apply to the package's source: its `kind` (`package_kind`)
/// is added, as the director wants the kind beside its config.
pub fn overrides(
    config: Option<&Path>,
    sets: &[String],
    package_kind: Option<String>,
) -> Result<Option<String>> {
    if config.is_none() && sets.is_empty() {
        return Ok(None);
    }
    let mut table = toml::Table::new();
    let mut problems = Vec::new();
    if let Some(path) = config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the file (--config)", path.display()))?;
        match TopologyFile::parse(&text, Some(path)) {
            Ok(_) => {
                table = text
                    .parse()
                    .with_context(|| format!("{}: not TOML", path.display()))?;
            }
            Err(errors) => problems.extend(errors.0.iter().map(ToString::to_string)),
        }
    }
    let mut keys: Vec<(String, &str)> = Vec::new();
    for set in sets {
        let Some((key, value)) = set.split_once('=') else {
            problems.push(format!(
                "--set {set}: expected KEY=VALUE, such as max_pending=1000"
            ));
            continue;
        };
        let key = key.trim();
        if let Err(e) = insert_path(&mut table, key, toml_value(value)) {
            problems.push(format!("--set {set}: {e}"));
        }
        keys.push((key.to_owned(), set));
    }
    if let (Some(toml::Value::Table(source)), Some(kind)) = (table.get_mut("source"), package_kind)
    {
        if source.contains_key("config") && !source.contains_key("kind") {
            source.insert("kind".into(), toml::Value::String(kind));
        }
    }
    let text = toml::to_string(&table).context("writing the overrides as TOML")?;
    if let Err(errors) = TopologyFile::parse(&text, Some(Path::new("overrides"))) {
        for e in &errors.0 {
            // The --set the problem comes from, when one set that key.
            let from = e.key.as_deref().and_then(|k| {
                keys.iter().rev().find(|(key, _)| {
                    k == key
                        || k.starts_with(&format!("{key}."))
                        || key.starts_with(&format!("{k}."))
                })
            });
            problems.push(match (from, &e.key) {
                (Some((_, set)), Some(k)) => format!("--set {set}: key `{k}`: {}", e.message),
                (Some((_, set)), None) => format!("--set {set}: {}", e.message),
                _ => e.to_string(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(Problems::new(
            "the configuration overrides are invalid; nothing was deployed",
            problems,
        )
        .into());
    }
    Ok(Some(text))
}

/// A `--set` value: TOML when it reads as a TOML value (`100`, `true`,
/// `"text"`, `[1, 2]`), else the text itself.
fn toml_value(v: &str) -> toml::Value {
    format!("v = {v}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_owned()))
}

fn insert_path(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("`{key}` is not a dotted key such as source.config.path");
    }
    let (last, path) = parts.split_last().context("an empty key")?;
    let mut cur = table;
    for (i, p) in path.iter().enumerate() {
        let entry = cur
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("`{}` is a value, not a table", parts[..=i].join(".")),
        };
    }
    cur.insert((*last).to_owned(), value);
    Ok(())
}

// ---------------------------------------------------------------------------
// logs

/// What `tempest logs` was asked.
pub struct LogsArgs {
    /// The topology.
    pub name: String,
    /// One task's workers.
    pub task: Option<String>,
    /// One instance of that task.
    pub instance: Option<u32>,
    /// One process by id (`server`, `count/0`).
    pub process: Option<String>,
    /// Every process.
    pub all: bool,
    /// `stdout`, `stderr` or `both`.
    pub stream: String,
    /// Lines of each tail.
    pub lines: u32,
    /// Keep printing new lines.
    pub follow: bool,
}

/// How many lines a follow poll asks for; more new lines than this
/// between two polls are reported as a gap.
const FOLLOW_WINDOW: u32 = 2000;
/// How often a follow polls.
const FOLLOW_EVERY: Duration = Duration::from_millis(1000);

/// `tempest logs`.
pub fn logs(client: &Client, args: &LogsArgs, json: bool) -> Result<()> {
    let v = topology(client, &args.name)?;
    let d: Detail = parse(&v, "the topology")?;
    let ids = select_processes(&d, args)?;
    let streams: Vec<&str> = match args.stream.as_str() {
        "both" => vec!["stdout", "stderr"],
        "stdout" => vec!["stdout"],
        "stderr" => vec!["stderr"],
        other => bail!("--stream must be stdout, stderr or both, not `{other}`"),
    };
    let sources: Vec<(String, &str)> = ids
        .iter()
        .flat_map(|id| streams.iter().map(move |s| (id.clone(), *s)))
        .collect();
    let headers = sources.len() > 1;
    // A follow fetches its first tails with the window its polls use and
    // keeps them whole, so that its first poll finds them and prints only
    // what is new; only the last `lines` of each are printed.
    let window = FOLLOW_WINDOW.max(args.lines);
    let first = if args.follow { window } else { args.lines };
    let mut out = std::io::stdout().lock();
    let mut tails: Vec<Vec<String>> = Vec::with_capacity(sources.len());
    let mut answers = Vec::new();
    for (i, (id, stream)) in sources.iter().enumerate() {
        let tail = fetch_log(client, &args.name, id, stream, first)?;
        let lines = tail_lines(&tail);
        let shown = &lines[lines.len().saturating_sub(args.lines as usize)..];
        if json && args.follow {
            // The JSON lines the polls print, one for each first tail.
            let v = json!({"id": id, "stream": stream, "lines": shown});
            writeln!(out, "{v}")?;
        } else if json {
            answers.push(tail);
        } else {
            if headers {
                if i > 0 {
                    writeln!(out)?;
                }
                writeln!(out, "==> {id} ({stream}) <==")?;
            }
            for l in shown {
                writeln!(out, "{l}")?;
            }
        }
        tails.push(lines);
    }
    if json && !args.follow {
        drop(out);
        return print_json(&Value::Array(answers));
    }
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    // Follow: poll each tail and print what is new past the last tail seen.
    let mut last_shown: Option<usize> = sources.len().checked_sub(1);
    let mut unreachable = vec![false; sources.len()];
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        for (i, (id, stream)) in sources.iter().enumerate() {
            let tail = match fetch_log(client, &args.name, id, stream, window) {
                Ok(t) => t,
                Err(e) if is_status(&e, StatusCode::NOT_FOUND) => {
                    if topology(client, &args.name).is_err() {
                        eprintln!("{}: the topology is gone", args.name);
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => {
                    // The agent may be restarting: say so once, keep going.
                    if !unreachable[i] {
                        eprintln!("{id} ({stream}): {e:#}");
                        unreachable[i] = true;
                    }
                    continue;
                }
            };
            unreachable[i] = false;
            let lines = tail_lines(&tail);
            let (fresh, gap) = new_lines(&tails[i], &lines, window as usize);
            if !fresh.is_empty() {
                let mut out = std::io::stdout().lock();
                if json {
                    let v = json!({"id": id, "stream": stream, "lines": fresh});
                    writeln!(out, "{v}")?;
                } else {
                    if headers && last_shown != Some(i) {
                        writeln!(out, "\n==> {id} ({stream}) <==")?;
                    }
                    if gap {
                        writeln!(out, "[... more lines than {window} since the last poll; some were skipped ...]")?;
                    }
                    for l in fresh {
                        writeln!(out, "{l}")?;
                    }
                }
                out.flush()?;
                last_shown = Some(i);
            }
            tails[i] = lines;
        }
    }
}

fn select_processes(d: &Detail, args: &LogsArgs) -> Result<Vec<String>> {
    let name = &d.summary.name;
    let prefix = format!("{name}/");
    let all: Vec<&ProcessView> = d.placement.iter().collect();
    let ids: Vec<String> = if let Some(p) = &args.process {
        let full = if p.starts_with(&prefix) {
            p.clone()
        } else {
            format!("{prefix}{p}")
        };
        if !all.iter().any(|x| x.id == full) {
            bail!(
                "{name} has no process `{p}`; its processes: {}",
                short_ids(&all, &prefix)
            );
        }
        vec![full]
    } else if let Some(task) = &args.task {
        let picked: Vec<String> = all
            .iter()
            .filter(|x| x.task.as_deref() == Some(task))
            .filter(|x| args.instance.is_none() || x.instance == args.instance)
            .map(|x| x.id.clone())
            .collect();
        if picked.is_empty() {
            let tasks: Vec<&String> = d.summary.workers.keys().collect();
            match args.instance {
                Some(i) if tasks.contains(&task) => {
                    bail!("{name}'s task `{task}` has no instance {i}")
                }
                _ => bail!(
                    "{name} has no task `{task}`; its tasks: {}",
                    tasks
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        picked
    } else if args.all {
        all.iter().map(|x| x.id.clone()).collect()
    } else {
        all.iter()
            .filter(|x| x.role == "topology")
            .map(|x| x.id.clone())
            .collect()
    };
    if ids.is_empty() {
        bail!("{name} has no processes placed yet (is an agent up? `tempest agents`)");
    }
    Ok(ids)
}

fn short_ids(all: &[&ProcessView], prefix: &str) -> String {
    all.iter()
        .map(|x| x.id.strip_prefix(prefix).unwrap_or(&x.id))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fetch_log(client: &Client, name: &str, id: &str, stream: &str, lines: u32) -> Result<Value> {
    let id_path: Vec<String> = id.split('/').map(encode).collect();
    client.get(&format!(
        "/api/v1/topologies/{}/processes/{}/logs?stream={stream}&lines={lines}",
        encode(name),
        id_path.join("/")
    ))
}

fn tail_lines(tail: &Value) -> Vec<String> {
    tail["text"]
        .as_str()
        .unwrap_or("")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The lines of `cur` (a tail of at most `window` lines) that come after
/// `prev` (the previous tail): the longest suffix of `prev` that is a
/// prefix of `cur` is what both saw. Without any overlap, all of `cur` is
/// new, and when `cur` is a full window lines may have been skipped (the
/// bool). A log that repeats the same lines can fool the overlap; an
/// offset in the logs API would not (see the report).
fn new_lines<'a>(prev: &[String], cur: &'a [String], window: usize) -> (&'a [String], bool) {
    if prev.is_empty() {
        return (cur, false);
    }
    let max = prev.len().min(cur.len());
    for o in (1..=max).rev() {
        if prev[prev.len() - o..] == cur[..o] {
            return (&cur[o..], false);
        }
    }
    (cur, cur.len() >= window)
}

// ---------------------------------------------------------------------------
// agents, packages

/// `tempest agents`.
pub fn agents(client: &Client, json: bool) -> Result<()> {
    let v = client.get("/api/v1/agents")?;
    if json {
        return print_json(&v);
    }
    let all: Vec<AgentView> = parse(&v, "the agents")?;
    if all.is_empty() {
        outln!(
            "no agents have joined the director at {} (start one with `tempest agent`)",
            client.target().url
        );
        return Ok(());
    }
    let mut t = Table::new(&[
        "ID",
        "ADDRESS",
        "HOST",
        "STATE",
        "HEARTBEAT",
        ">CORES",
        ">MEMORY FREE",
        ">LOAD",
        ">PLACED",
        ">RUNNING",
    ]);
    for a in all {
        let running = a.processes.iter().filter(|p| p.state == "running").count();
        t.row(vec![
            a.id,
            a.address,
            a.node.hostname,
            if a.up { "up" } else { "DOWN" }.into(),
            ago(a.last_heartbeat_ms),
            a.node.cores.to_string(),
            format!(
                "{} / {}",
                bytes(a.node.memory_available),
                bytes(a.node.memory_total)
            ),
            format!("{:.2}", a.node.load[0]),
            a.placed.to_string(),
            format!("{running}/{}", a.processes.len()),
        ]);
    }
    out!("{}", t.render());
    Ok(())
}

/// `tempest packages`.
pub fn packages(client: &Client, json: bool) -> Result<()> {
    let v = client.get("/api/v1/packages")?;
    if json {
        return print_json(&v);
    }
    let all: Vec<PackageView> = parse(&v, "the packages")?;
    if all.is_empty() {
        outln!("no packages on the director at {}", client.target().url);
        return Ok(());
    }
    let mut t = Table::new(&[
        "HASH", "NAME", "VERSION", ">SIZE", "UPLOADED", "TARGET", "TEMPEST",
    ]);
    for p in all {
        t.row(vec![
            short(&p.hash).to_owned(),
            p.manifest.name,
            p.manifest.version,
            bytes(p.size),
            ago(p.uploaded_at_ms),
            p.manifest.target,
            p.manifest.tempest_version,
        ]);
    }
    out!("{}", t.render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn follow_prints_only_what_is_new() {
        let prev = lines("a b c d");
        assert_eq!(new_lines(&prev, &lines("c d e f"), 4).0, lines("e f"));
        assert_eq!(
            new_lines(&prev, &lines("a b c d"), 4).0,
            Vec::<String>::new()
        );
        assert_eq!(new_lines(&prev, &lines("a b c d e"), 10).0, lines("e"));
        assert_eq!(new_lines(&[], &lines("x"), 4).0, lines("x"));
        // No overlap: everything is new, and a full window may hide a gap.
        assert_eq!(
            new_lines(&prev, &lines("w x y z"), 4),
            (&lines("w x y z")[..], true)
        );
        assert_eq!(
            new_lines(&prev, &lines("w x"), 4),
            (&lines("w x")[..], false)
        );
    }

    #[test]
    fn sets_become_nested_toml_and_bad_ones_name_their_flag() {
        let text = overrides(
            None,
            &[
                "max_pending=100".into(),
                "source.kind=file".into(),
                "source.config.path=/data/in".into(),
                "source.config.follow=true".into(),
            ],
            None,
        )
        .unwrap()
        .unwrap();
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["max_pending"].as_integer(), Some(100));
        assert_eq!(t["source"]["config"]["path"].as_str(), Some("/data/in"));
        assert_eq!(t["source"]["config"]["follow"].as_bool(), Some(true));

        let e = overrides(None, &["max_pendin=3".into(), "batch_size".into()], None).unwrap_err();
        let p = e.downcast_ref::<Problems>().unwrap();
        assert_eq!(p.lines.len(), 2, "{p:?}");
        assert!(
            p.lines[0].starts_with("--set batch_size: expected KEY=VALUE"),
            "{p:?}"
        );
        let e = overrides(None, &["max_pendin=3".into()], None).unwrap_err();
        let p = e.downcast_ref::<Problems>().unwrap();
        assert!(
            p.lines[0].starts_with("--set max_pendin=3: key `max_pendin`"),
            "{p:?}"
        );
        let e = overrides(
            None,
            &["max_pending=3".into(), "max_pending.x=1".into()],
            None,
        )
        .unwrap_err();
        assert!(e.downcast_ref::<Problems>().unwrap().lines[0].contains("is a value"));
        assert_eq!(overrides(None, &[], None).unwrap(), None);
        // A source's config alone applies to the package's source kind.
        let text = overrides(
            None,
            &["source.config.path=/in".into()],
            Some("file".into()),
        )
        .unwrap()
        .unwrap();
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["source"]["kind"].as_str(), Some("file"));
        let e = overrides(None, &["source.config.path=/in".into()], None).unwrap_err();
        assert!(e.downcast_ref::<Problems>().unwrap().lines[0].contains("source.kind"));
    }

    #[test]
    fn task_counts_parse() {
        assert_eq!(parse_task_count("count=4").unwrap(), ("count".into(), 4));
        assert!(parse_task_count("count").is_err());
        assert!(parse_task_count("count=0").is_err());
        assert!(parse_task_count("=1").is_err());
        // The director's name rule.
        assert!(parse_task_count(".count=1")
            .unwrap_err()
            .contains("bad task name"));
        assert!(parse_task_count(&format!("{}=1", "c".repeat(65))).is_err());
        assert!(parse_task_count("count=x").is_err());
    }

    #[test]
    fn status_shows_tasks_and_processes() {
        let v = json!({
            "name": "wc", "package": "0123456789abcdef", "package_name": "wordcount 0.1.0",
            "state": "running", "phase": "running", "generation": 2,
            "workers": {"split": 1, "count": 2}, "processes": 4, "running": 4,
            "msgs_per_sec": 1234.5, "acked": 10000, "failed": 1, "in_flight": 3,
            "p50_ms": 1.5, "p99_ms": 12.25,
            "tasks": {"split": {"workers": 1, "messages_in": 500, "msgs_per_sec": 50.0,
                                "errors": 0, "handle_p99_ms": 0.05, "capacity": 0.25}},
            "source": {"polled": 10003, "acked": 10000, "healthy": true, "worker_connections": 3},
            "placement": [{"id": "wc/server", "role": "topology", "agent": "a1", "agent_up": true,
                           "state": "running", "pid": 42, "uptime_secs": 65, "address": "127.0.0.1:7500"}],
            "recent_errors": [{"process": "wc/count/1", "agent": "a1", "state": "backoff",
                               "restarts": 2, "error": "exited with status 1"}],
            "something_new": 1
        });
        let d: Detail = parse(&v, "t").unwrap();
        let text = render_status(&d);
        assert!(
            text.contains("wc: running (running), generation 2"),
            "{text}"
        );
        assert!(text.contains("acked 10,000"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("split") && l.contains("25%")),
            "{text}"
        );
        assert!(text.lines().any(|l| l.starts_with("count")), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("server") && l.contains("1m 5s")),
            "{text}"
        );
        assert!(
            text.contains("count/1 on a1: backoff after 2 restarts: exited with status 1"),
            "{text}"
        );
        // One unnamed source: no sources section.
        assert!(text.contains("\nsource: polled 10,003"), "{text}");
        assert!(!text.contains("sources"), "{text}");
    }

    #[test]
    fn status_shows_every_source_and_the_unhealthy_ones() {
        let v = json!({
            "name": "shop", "state": "running", "phase": "running",
            "workers": {"parse": 1, "audit": 1},
            "msgs_per_sec": 130.0, "acked": 1100, "failed": 4, "in_flight": 7,
            "source": {"polled": 1212, "acked": 1100, "healthy": false, "worker_connections": 2},
            "sources": {
                "orders": {"healthy": true, "polled": 1200, "acked": 1000, "failed": 3,
                           "errors": 0, "in_flight": 5, "msgs_per_sec": 123.4},
                "refunds": {"healthy": false, "polled": 12, "acked": 100, "failed": 1,
                            "errors": 4, "in_flight": 2, "msgs_per_sec": 6.5}
            },
            "source_edges": [{"source": "orders", "to": "parse"},
                             {"source": "refunds", "to": "audit"},
                             {"source": "refunds", "to": "parse"}]
        });
        let d: Detail = parse(&v, "t").unwrap();
        let text = render_status(&d);
        assert!(text.contains("sources (in all): polled 1,212"), "{text}");
        assert!(
            text.contains("\nsources: 2, 1 UNHEALTHY (refunds)\n"),
            "{text}"
        );
        let row = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("orders"),
            ["orders", "healthy", "123", "1,200", "1,000", "3", "0", "5", "parse"]
        );
        assert_eq!(
            row("refunds"),
            [
                "refunds",
                "unhealthy",
                "6.5",
                "12",
                "100",
                "1",
                "4",
                "2",
                "audit,",
                "parse"
            ]
        );
        // A source of an older server, named by the director, with no edges.
        let v = json!({"name": "old", "sources": {"default": {"healthy": null}},
                       "source": {}});
        let text = render_status(&parse(&v, "t").unwrap());
        assert!(!text.contains("sources"), "{text}");
        let v = json!({"name": "one", "sources": {"orders": {"healthy": true, "acked": 5}}});
        let text = render_status(&parse(&v, "t").unwrap());
        assert!(text.contains("\nsources: 1\n"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("orders") && l.contains("healthy") && l.ends_with('-')),
            "{text}"
        );
    }
}
