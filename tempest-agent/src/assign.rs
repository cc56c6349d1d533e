//! Assignments: from the director's (or the API's) [`Assignment`] to the
//! [`Launch`]es the supervisor converges to, and the heartbeat that fetches
//! them.
//!
//! One reconciler task owns the turning of specs into launches, so port
//! allocation and convergence never race. For each spec it needs the
//! package ([`crate::packages`]), ports from the range ([`Ports`]) and a
//! config file; a spec that cannot have one of them is reported `Failed`
//! with the reason (or `Starting` while its package is fetched) and the
//! others are launched regardless. The assignment last received is kept in
//! the data directory, so an agent restarted while the director is away
//! goes on converging to it. The supervisor, not this module, decides what
//! a change in a launch means for the running process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tempest_control::tls::{
    IssuedCert, TlsFiles, DATA_TLS_CA_ENV, DATA_TLS_CERT_ENV, DATA_TLS_KEY_ENV,
};
use tempest_control::{Assignment, Heartbeat, ProcessSpec, ProcessState, ProcessStatus, Role};
use tempest_core::source::SOURCE_CONSUMER_ENV;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::{split_host_port, PortRange};
use crate::packages::{chain, truncate, Lookup, Package, Packages};
use crate::supervisor::{Converged, Launch, Supervisor};
use crate::Agent;

/// The file the last assignment is kept in, in the data directory.
pub const ASSIGNMENT_FILE: &str = "assignment.json";
/// How often specs waiting on a package or a port are looked at again.
const RETRY_TICK: Duration = Duration::from_secs(1);

/// The ports one process holds.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The port it listens on, on the server IP: a topology server's for
    /// its workers, a worker's for the peer links of its upstream workers.
    pub listen: u16,
    /// Its Prometheus endpoint's port (on 127.0.0.1).
    pub metrics: u16,
}

/// The ports of one process as far as they are known: a launch adopted
/// from an older agent may not name a listening port.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Taken {
    listen: Option<u16>,
    metrics: u16,
}

/// Ports of the range, allocated to processes by id. Every process gets
/// two: one to listen on and one for its metrics. A process keeps its ports
/// for as long as it is assigned, across agent restarts (they are read back
/// from the launches the supervisor adopted) and across new generations of
/// its spec.
#[derive(Debug)]
pub struct Ports {
    range: PortRange,
    server_ip: IpAddr,
    held: BTreeMap<String, Taken>,
}

impl Ports {
    /// An empty allocation over `range`; processes listen on `server_ip`.
    pub fn new(range: PortRange, server_ip: IpAddr) -> Self {
        Ports {
            range,
            server_ip,
            held: BTreeMap::new(),
        }
    }

    /// Takes the ports that running launches use back into the allocation:
    /// the port of the launch's `address` (a server's, or a worker's peer
    /// address) and of its metrics address, when they are in the range.
    pub fn seed(&mut self, launches: &[Launch]) {
        let port = |addr: &Option<String>| {
            let addr = addr.as_deref()?;
            let p: u16 = split_host_port(addr).1?.parse().ok()?;
            (self.range.first..=self.range.last)
                .contains(&p)
                .then_some(p)
        };
        let mut seeded = BTreeMap::new();
        for l in launches {
            let Some(metrics) = port(&l.metrics_address) else {
                continue;
            };
            let listen = port(&l.address).filter(|p| *p != metrics);
            seeded.insert(l.spec.id.clone(), Taken { listen, metrics });
        }
        self.held.extend(seeded);
    }

    /// Releases the ports of every process `keep` says no to.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.held.retain(|id, _| keep(id));
    }

    /// Releases the ports of `id`.
    pub fn release(&mut self, id: &str) {
        self.held.remove(id);
    }

    /// The ports `id` holds.
    pub fn get(&self, id: &str) -> Option<Held> {
        let t = self.held.get(id)?;
        Some(Held {
            listen: t.listen?,
            metrics: t.metrics,
        })
    }

    /// The ports `spec` needs: the ones it holds, or free ones from the
    /// range (free of other processes of the agent, and bindable now: the
    /// metrics port on 127.0.0.1, the listening port on the server IP).
    /// When the range cannot give both, `spec` holds nothing.
    pub fn allocate(&mut self, spec: &ProcessSpec) -> Result<Held, String> {
        if let Some(h) = self.get(&spec.id) {
            return Ok(h);
        }
        let current = self.held.get(&spec.id).copied();
        let mut taken: BTreeSet<u16> = self
            .held
            .iter()
            .filter(|(id, _)| **id != spec.id)
            .flat_map(|(_, t)| t.listen.into_iter().chain([t.metrics]))
            .collect();
        let mut busy = 0usize;
        let mut pick = |ip: IpAddr, taken: &mut BTreeSet<u16>| {
            for p in self.range.iter() {
                if taken.contains(&p) {
                    continue;
                }
                if TcpListener::bind((ip, p)).is_err() {
                    busy += 1;
                    continue;
                }
                taken.insert(p);
                return Some(p);
            }
            None
        };
        let metrics = match current {
            Some(t) => {
                taken.insert(t.metrics);
                Some(t.metrics)
            }
            None => pick(IpAddr::V4(Ipv4Addr::LOCALHOST), &mut taken),
        };
        let listen = metrics.and_then(|_| pick(self.server_ip, &mut taken));
        match (metrics, listen) {
            (Some(metrics), Some(listen)) => {
                self.held.insert(
                    spec.id.clone(),
                    Taken {
                        listen: Some(listen),
                        metrics,
                    },
                );
                Ok(Held { listen, metrics })
            }
            _ => {
                self.held.remove(&spec.id);
                Err(format!(
                    "no free port for `{}` in the port range {} ({} held by this agent's other \
                     processes, {busy} in use by other programs); widen port_range",
                    spec.id,
                    self.range,
                    taken.len()
                ))
            }
        }
    }
}

/// What every launch shares.
#[derive(Clone, Debug)]
pub struct LaunchContext {
    /// The IP topology servers and workers listen on (the API's).
    pub server_ip: IpAddr,
    /// The host in the addresses other processes are told: a server's (for
    /// its workers) and a worker's peer address (for its upstream workers).
    pub advertise_host: String,
    /// Where configs given in specs are written.
    pub configs_dir: PathBuf,
    /// The agent runs with `--insecure`: a deployment without a data-plane
    /// certificate gets `--insecure` too (its links beyond loopback are
    /// then plain TCP, with a warning); without it such processes refuse
    /// to listen beyond loopback.
    pub insecure: bool,
}

/// The command line and environment of `spec`'s process.
///
/// A topology server listens on `server_ip:listen`; a worker accepts peer
/// links there (`--peer-listen`) and tells its upstreams
/// `advertise_host:listen` (`--peer-advertise`), and runs with its task's
/// instance count and the spec's generation as that count's layout version
/// when the spec gives a count. Either way the advertised address is the
/// launch's `address`. The spec's data-plane secret, if any, is the only
/// secret it gets: as `TEMPEST_DATA_SECRET` in its environment (never on
/// its command line, which every user can read).
///
/// A topology server also gets [`SOURCE_CONSUMER_ENV`]: its stable identity
/// towards its brokers ([`source_consumer`]), the same for every
/// incarnation of the slot, so that a replacement of a killed server (here
/// or on another agent) takes over what its predecessor held at once. A
/// value the spec's own environment gives wins. Workers read no source and
/// do not get it.
pub fn build_launch(
    spec: &ProcessSpec,
    package: &Package,
    ports: Held,
    config: Option<&Path>,
    ctx: &LaunchContext,
) -> Launch {
    let mut args: Vec<String> = Vec::new();
    let address = join_host_port(&ctx.advertise_host, ports.listen);
    match spec.role {
        Role::Topology => {
            args.extend([
                "topology".into(),
                "--host".into(),
                ctx.server_ip.to_string(),
                "--port".into(),
                ports.listen.to_string(),
            ]);
        }
        Role::Task => {
            args.extend([
                "task".into(),
                "--name".into(),
                spec.task.clone().unwrap_or_default(),
                "--topology-addr".into(),
                spec.topology_addr.clone().unwrap_or_default(),
            ]);
            if let Some(i) = spec.instance {
                args.extend(["--instance".into(), i.to_string()]);
            }
            if let Some(n) = spec.instances {
                args.extend([
                    "--instances".into(),
                    n.to_string(),
                    "--layout".into(),
                    spec.generation.to_string(),
                ]);
            }
            args.extend([
                "--peer-listen".into(),
                std::net::SocketAddr::new(ctx.server_ip, ports.listen).to_string(),
                "--peer-advertise".into(),
                address.clone(),
            ]);
        }
    }
    if let Some(c) = config {
        args.extend(["--config".into(), c.display().to_string()]);
    }
    if ctx.insecure && spec.data_tls.is_none() && !ctx.server_ip.is_loopback() {
        args.push("--insecure".into());
    }
    let metrics_address = format!("127.0.0.1:{}", ports.metrics);
    args.extend([
        "--metrics-target".into(),
        format!("prometheus={metrics_address}"),
    ]);
    let mut env = spec.env.clone();
    if spec.role == Role::Topology {
        env.entry(SOURCE_CONSUMER_ENV.into())
            .or_insert_with(|| source_consumer(spec));
    }
    if let Some(secret) = &spec.data_secret {
        env.insert(
            tempest_control::credentials::DATA_SECRET_ENV.into(),
            secret.expose().to_owned(),
        );
    }
    Launch {
        spec: spec.clone(),
        program: package.binary.clone(),
        args,
        env,
        address: Some(address),
        metrics_address: Some(metrics_address),
    }
}

/// The stable consumer identity of a topology server slot: its spec id
/// (`<topology>/server`), which the director keeps across re-placements and
/// generations, with every byte other than ASCII letters, digits and
/// `-_.:/` replaced by `_` so it is a plain name at any broker (spec ids
/// have no white space or control characters to begin with). Not the host
/// or the pid: a replacement started elsewhere has the same one.
pub fn source_consumer(spec: &ProcessSpec) -> String {
    spec.id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `host:port`, with an IPv6 host in brackets.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A spec's own problems (those no package or port can fix).
pub fn check_spec(spec: &ProcessSpec) -> Result<(), String> {
    if spec.id.is_empty() || spec.id.len() > 256 {
        return Err("a process id must be 1 to 256 bytes long".into());
    }
    if spec.id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "process id {:?} contains white space or control characters",
            spec.id
        ));
    }
    if spec.role == Role::Task {
        match spec.task.as_deref() {
            None | Some("") => return Err(format!("task process `{}` names no task", spec.id)),
            Some(_) => {}
        }
        match spec.topology_addr.as_deref() {
            None | Some("") => {
                return Err(format!(
                    "task process `{}` has no topology_addr to connect to",
                    spec.id
                ))
            }
            Some(_) => {}
        }
        match (spec.instance, spec.instances) {
            (_, Some(0)) => {
                return Err(format!(
                    "task process `{}` has an instance count of 0",
                    spec.id
                ))
            }
            (Some(i), Some(n)) if i >= n => {
                return Err(format!(
                    "task process `{}` claims instance {i} of a task with {n} instance(s)",
                    spec.id
                ))
            }
            _ => {}
        }
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(format!("environment variable name {key:?} is not valid"));
        }
    }
    Ok(())
}

/// Checks an assignment as a whole: ids are unique.
pub fn check_assignment(a: &Assignment) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for s in &a.processes {
        if !seen.insert(s.id.as_str()) {
            return Err(format!(
                "process id `{}` appears more than once in the assignment",
                s.id
            ));
        }
    }
    Ok(())
}

/// The status of a spec that has no process.
fn status_of(spec: &ProcessSpec, state: ProcessState, error: Option<String>) -> ProcessStatus {
    ProcessStatus {
        id: spec.id.clone(),
        topology: spec.topology.clone(),
        role: spec.role,
        task: spec.task.clone(),
        instance: spec.instance,
        pid: None,
        state,
        restarts: 0,
        uptime_secs: 0,
        address: None,
        metrics_address: None,
        generation: spec.generation,
        error,
    }
}

enum Cmd {
    Apply {
        assignment: Assignment,
        reply: Option<oneshot::Sender<Converged>>,
    },
}

#[derive(Default)]
struct State {
    desired: Option<Assignment>,
    /// Specs without a process: fetching their package, or failed.
    pending: BTreeMap<String, ProcessStatus>,
}

/// The assignment the agent converges to, and the specs it could not launch.
pub struct Assigner {
    state: Mutex<State>,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Assigner {
    /// The assignment being converged to, if any was received.
    pub fn desired(&self) -> Option<Assignment> {
        self.state.lock().desired.clone()
    }

    /// The specs that have no process (fetching or failed), by id.
    pub fn pending(&self) -> BTreeMap<String, ProcessStatus> {
        self.state.lock().pending.clone()
    }

    /// Converges to `a` and waits for the supervisor's answer.
    pub async fn apply(&self, a: Assignment) -> Result<Converged, String> {
        check_assignment(&a)?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Cmd::Apply {
                assignment: a,
                reply: Some(reply),
            })
            .map_err(|_| "the agent is shutting down".to_owned())?;
        answer
            .await
            .map_err(|_| "the agent is shutting down".to_owned())
    }

    /// Converges to `a` without waiting.
    pub fn offer(&self, a: Assignment) -> Result<(), String> {
        check_assignment(&a)?;
        self.tx
            .send(Cmd::Apply {
                assignment: a,
                reply: None,
            })
            .map_err(|_| "the agent is shutting down".to_owned())
    }
}

/// The task that turns assignments into launches.
pub struct Reconciler {
    assigner: Arc<Assigner>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    supervisor: Supervisor,
    packages: Arc<Packages>,
    packages_changed: Arc<Notify>,
    ports: Ports,
    ctx: LaunchContext,
    data_dir: PathBuf,
    reported: HashMap<String, String>,
}

impl Reconciler {
    /// The assigner (for the API and the heartbeat) and its reconciler,
    /// which [`Reconciler::run`] runs. The ports processes adopted by the
    /// supervisor hold are kept; the assignment kept in `data_dir`, if any,
    /// is the first one converged to.
    pub fn new(
        supervisor: Supervisor,
        packages: Arc<Packages>,
        packages_changed: Arc<Notify>,
        range: PortRange,
        ctx: LaunchContext,
        data_dir: PathBuf,
    ) -> (Arc<Assigner>, Reconciler) {
        let (tx, rx) = mpsc::unbounded_channel();
        let assigner = Arc::new(Assigner {
            state: Mutex::new(State::default()),
            tx,
        });
        let mut ports = Ports::new(range, ctx.server_ip);
        ports.seed(&supervisor.launches());
        match read_kept(&data_dir) {
            Ok(Some(a)) => {
                tracing::info!(
                    "converging to the assignment kept from the last run ({} processes)",
                    a.processes.len()
                );
                assigner.state.lock().desired = Some(a);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring the kept assignment: {e}"),
        }
        let r = Reconciler {
            assigner: assigner.clone(),
            rx,
            supervisor,
            packages,
            packages_changed,
            ports,
            ctx,
            data_dir,
            reported: HashMap::new(),
        };
        (assigner, r)
    }

    /// Converges whenever an assignment arrives, a package fetch ends, or a
    /// second passes with specs waiting; until every [`Assigner`] is gone.
    pub async fn run(mut self) {
        if self.assigner.desired().is_some() {
            self.reconcile().await;
        }
        let mut tick = tokio::time::interval(RETRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut replies = Vec::new();
            let waiting = !self.assigner.state.lock().pending.is_empty();
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.take(cmd, &mut replies),
                    None => return,
                },
                _ = self.packages_changed.notified() => {}
                _ = tick.tick(), if waiting => {}
            }
            // A burst of assignments converges once, to the last.
            while let Ok(cmd) = self.rx.try_recv() {
                self.take(cmd, &mut replies);
            }
            let converged = self.reconcile().await;
            for reply in replies {
                let _ = reply.send(converged.clone());
            }
        }
    }

    fn take(&mut self, cmd: Cmd, replies: &mut Vec<oneshot::Sender<Converged>>) {
        let Cmd::Apply { assignment, reply } = cmd;
        replies.extend(reply);
        let mut state = self.assigner.state.lock();
        if state.desired.as_ref() == Some(&assignment) {
            return;
        }
        tracing::info!("new assignment: {} process(es)", assignment.processes.len());
        if let Err(e) = keep(&self.data_dir, &assignment) {
            tracing::warn!("cannot keep the assignment in the data directory: {e}");
        }
        state.desired = Some(assignment);
    }

    /// Converges to the desired assignment once.
    async fn reconcile(&mut self) -> Converged {
        let Some(desired) = self.assigner.desired() else {
            return Converged::default();
        };
        let current: HashMap<String, Launch> = self
            .supervisor
            .launches()
            .into_iter()
            .map(|l| (l.spec.id.clone(), l))
            .collect();
        let ids: BTreeSet<&str> = desired.processes.iter().map(|s| s.id.as_str()).collect();
        self.ports.retain(|id| ids.contains(id));
        let mut launches = Vec::with_capacity(desired.processes.len());
        let mut pending = BTreeMap::new();
        for spec in &desired.processes {
            match self.launch_for(spec) {
                Ok(l) => {
                    self.reported.remove(&spec.id);
                    launches.push(l);
                }
                Err(Problem::Wait) => match current.get(&spec.id) {
                    // Keep what runs until its replacement can start.
                    Some(old) => launches.push(old.clone()),
                    None => {
                        pending.insert(
                            spec.id.clone(),
                            status_of(spec, ProcessState::Starting, None),
                        );
                    }
                },
                Err(Problem::Fail(why)) => {
                    self.ports.release(&spec.id);
                    if self.reported.get(&spec.id) != Some(&why) {
                        tracing::warn!("process `{}` cannot run: {why}", spec.id);
                        self.reported.insert(spec.id.clone(), why.clone());
                    }
                    pending.insert(
                        spec.id.clone(),
                        status_of(spec, ProcessState::Failed, Some(why)),
                    );
                }
            }
        }
        self.reported.retain(|id, _| ids.contains(id.as_str()));
        self.assigner.state.lock().pending = pending;
        let supervisor = self.supervisor.clone();
        let converged =
            match tokio::task::spawn_blocking(move || supervisor.converge(launches)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("converging ended abnormally: {e}");
                    Converged::default()
                }
            };
        if converged != Converged::default() {
            tracing::debug!(
                "converged: started {:?}, stopped {:?}, replaced {:?}",
                converged.started,
                converged.stopped,
                converged.replaced
            );
        }
        converged
    }

    fn launch_for(&mut self, spec: &ProcessSpec) -> Result<Launch, Problem> {
        check_spec(spec).map_err(Problem::Fail)?;
        let package = match self.packages.lookup(&spec.package) {
            Lookup::Ready(p) => p,
            Lookup::Fetching => return Err(Problem::Wait),
            Lookup::Failed(e) => return Err(Problem::Fail(e)),
        };
        let ports = self.ports.allocate(spec).map_err(Problem::Fail)?;
        let config = match &spec.config {
            Some(text) => Some(write_config(&self.ctx.configs_dir, text).map_err(Problem::Fail)?),
            None => package.topology_toml.clone(),
        };
        let mut launch = build_launch(spec, &package, ports, config.as_deref(), &self.ctx);
        if let Some(cert) = &spec.data_tls {
            let files = write_data_tls(&self.ctx.configs_dir, cert).map_err(Problem::Fail)?;
            launch.env.extend([
                (DATA_TLS_CERT_ENV.into(), files.cert.display().to_string()),
                (DATA_TLS_KEY_ENV.into(), files.key.display().to_string()),
                (DATA_TLS_CA_ENV.into(), files.ca.display().to_string()),
            ]);
        }
        Ok(launch)
    }
}

/// Writes a deployment's data-plane certificate, key and CA under the
/// certificate's content hash, readable by the agent's user only (the
/// agent's umask), and names the three files.
fn write_data_tls(dir: &Path, cert: &IssuedCert) -> Result<TlsFiles, String> {
    let stem = tempest_control::package::sha256_hex(cert.cert_pem.as_bytes());
    let files = TlsFiles {
        cert: dir.join(format!("{stem}.crt")),
        key: dir.join(format!("{stem}.key")),
        ca: dir.join(format!("{stem}-ca.crt")),
    };
    for (path, text) in [
        (&files.cert, cert.cert_pem.as_str()),
        (&files.key, cert.key_pem.expose()),
        (&files.ca, cert.ca_pem.as_str()),
    ] {
        if !path.is_file() {
            write_atomic(path, text.as_bytes())
                .map_err(|e| format!("writing the data-plane TLS file {}: {e}", path.display()))?;
        }
    }
    Ok(files)
}

enum Problem {
    /// Its package is being fetched.
    Wait,
    Fail(String),
}

/// Writes a spec's `Topology.toml` under its content hash (so the same text
/// is the same path, and the launch built from it the same launch).
fn write_config(dir: &Path, text: &str) -> Result<PathBuf, String> {
    let path = dir.join(format!(
        "{}.toml",
        tempest_control::package::sha256_hex(text.as_bytes())
    ));
    if !path.is_file() {
        write_atomic(&path, text.as_bytes())
            .map_err(|e| format!("writing the config {}: {e}", path.display()))?;
    }
    Ok(path)
}

/// Writes `bytes` to `path` through a temporary file (mode 0600, whatever
/// the umask) and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    tempest_control::credentials::write_private_file(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn keep(data_dir: &Path, a: &Assignment) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(a).map_err(std::io::Error::other)?;
    write_atomic(&data_dir.join(ASSIGNMENT_FILE), &json)
}

fn read_kept(data_dir: &Path) -> Result<Option<Assignment>, String> {
    let path = data_dir.join(ASSIGNMENT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let a: Assignment =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    check_assignment(&a).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(a))
}

/// How the director link stands, for logging once per change.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Link {
    Unknown,
    Up,
    Down(String),
}

/// Heartbeats to the director until the task is dropped: sends the node and
/// its processes, converges to the assignment answered. When the director
/// is away or answers nonsense the agent keeps running what it has; that is
/// logged once per change of state, not every beat.
pub async fn heartbeat(agent: Arc<Agent>, director: String) {
    let url = format!("{director}/api/v1/agents/heartbeat");
    let period = agent.config.heartbeat;
    let timeout = (period * 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link = Link::Unknown;
    loop {
        tick.tick().await;
        let beat = Heartbeat {
            agent_id: agent.id.clone(),
            address: agent.address.clone(),
            node: crate::node::info(&agent.config.data_dir),
            processes: agent.processes(),
        };
        let answer = beat_once(&agent, &url, &beat, timeout).await;
        let now = match answer {
            Ok(a) => match agent.assigner.offer(a) {
                Ok(()) => Link::Up,
                Err(e) => Link::Down(format!("the director sent an unusable assignment: {e}")),
            },
            Err(e) => Link::Down(e),
        };
        let stats = &agent.stats;
        match &now {
            Link::Up => {
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                stats.director_up.store(true, Ordering::Relaxed);
            }
            Link::Down(_) | Link::Unknown => {
                stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                stats.director_up.store(false, Ordering::Relaxed);
            }
        }
        if kind(&now) != kind(&link) {
            match &now {
                Link::Up => tracing::info!("heartbeating to the director at {director}"),
                Link::Down(e) => tracing::warn!(
                    "heartbeat to {url} failed: {e}; keeping the processes running (logged again when this changes)"
                ),
                Link::Unknown => {}
            }
        }
        link = now;
    }
}

/// The class of a link state, so that errors differing only in detail (a
/// port, a byte offset) are not logged again.
fn kind(l: &Link) -> String {
    match l {
        Link::Unknown => "unknown".into(),
        Link::Up => "up".into(),
        Link::Down(e) => e.split(':').next().unwrap_or_default().to_owned(),
    }
}

async fn beat_once(
    agent: &Agent,
    url: &str,
    beat: &Heartbeat,
    timeout: Duration,
) -> Result<Assignment, String> {
    let mut request = agent.client.post(url).json(beat).timeout(timeout);
    if let Some(t) = &agent.config.token {
        request = request.bearer_auth(t.expose());
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach the director: {}", chain(&e)))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("reading the director's answer: {}", chain(&e)))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Err(format!(
            "the director answered {status}: {}",
            truncate(text.trim(), 300)
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| format!("the director's answer is not an assignment: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, role: Role) -> ProcessSpec {
        ProcessSpec {
            id: id.into(),
            topology: "wc".into(),
            package: "a".repeat(64),
            role,
            task: (role == Role::Task).then(|| "count".into()),
            instance: Some(1),
            instances: None,
            topology_addr: Some("10.0.0.1:7311".into()),
            config: None,
            env: BTreeMap::new(),
            data_secret: None,
            data_tls: None,
            generation: 1,
        }
    }

    fn free_range(n: u16) -> PortRange {
        // Free now, and different for every test of this binary (two tests
        // running at once must not both take the same ports).
        tempest_testkit::cluster::port_range(n)
            .parse()
            .expect("a port range")
    }

    fn package() -> Package {
        Package {
            hash: "a".repeat(64),
            dir: "/p".into(),
            manifest: tempest_control::Manifest {
                name: "wc".into(),
                version: "1".into(),
                binary: "wc".into(),
                sha256: String::new(),
                target: String::new(),
                tempest_version: String::new(),
            },
            binary: "/p/wc".into(),
            topology_toml: None,
        }
    }

    fn ctx() -> LaunchContext {
        LaunchContext {
            server_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_host: "node1".into(),
            configs_dir: "/c".into(),
            insecure: false,
        }
    }

    #[test]
    fn ports_are_stable_and_run_out_cleanly() {
        let range = free_range(4);
        let mut ports = Ports::new(range, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let server = ports.allocate(&spec("wc/server", Role::Topology)).unwrap();
        assert_ne!(server.listen, server.metrics);
        let worker = ports.allocate(&spec("wc/count/1", Role::Task)).unwrap();
        let all: BTreeSet<u16> = [server.listen, server.metrics, worker.listen, worker.metrics]
            .into_iter()
            .collect();
        assert_eq!(all.len(), 4, "every process has two ports of its own");
        assert!(all.iter().all(|p| (range.first..=range.last).contains(p)));
        // The same ids get the same ports, whatever their generation.
        assert_eq!(
            ports.allocate(&spec("wc/server", Role::Topology)).unwrap(),
            server
        );
        let mut next = spec("wc/count/1", Role::Task);
        next.generation = 7;
        next.instances = Some(3);
        assert_eq!(ports.allocate(&next).unwrap(), worker);
        assert_eq!(ports.get("wc/count/1"), Some(worker));
        // The range is used up: the next process gets nothing, not half.
        let err = ports.allocate(&spec("wc/count/2", Role::Task)).unwrap_err();
        assert!(
            err.contains("no free port") && err.contains(&range.to_string()),
            "{err}"
        );
        assert_eq!(ports.get("wc/count/2"), None);
        // Released ports are reused.
        ports.retain(|id| id != "wc/count/1");
        let again = ports.allocate(&spec("wc/count/2", Role::Task)).unwrap();
        assert_eq!(
            [again.listen, again.metrics]
                .into_iter()
                .collect::<BTreeSet<_>>(),
            [worker.listen, worker.metrics].into_iter().collect()
        );
    }

    #[test]
    fn a_process_adopted_without_a_listening_port_gets_one_and_keeps_its_metrics_port() {
        let range = free_range(3);
        let metrics = range.first + 1;
        // A worker started by an agent that gave workers no peer port.
        let old = Launch {
            spec: spec("wc/count/1", Role::Task),
            program: "/p/wc".into(),
            args: vec![],
            env: BTreeMap::new(),
            address: None,
            metrics_address: Some(format!("127.0.0.1:{metrics}")),
        };
        let mut ports = Ports::new(range, IpAddr::V4(Ipv4Addr::LOCALHOST));
        ports.seed(std::slice::from_ref(&old));
        assert_eq!(ports.get("wc/count/1"), None, "half a pair is not held");
        let h = ports.allocate(&old.spec).unwrap();
        assert_eq!(h.metrics, metrics);
        assert_ne!(h.listen, metrics);
    }

    #[test]
    fn ports_are_seeded_from_launches() {
        let range = free_range(4);
        let package = package();
        let ctx = ctx();
        let held = Held {
            listen: range.first + 3,
            metrics: range.first + 2,
        };
        let mut s = spec("wc/server", Role::Topology);
        s.data_secret = Some(tempest_control::Secret::new("the-data-secret", "t").unwrap());
        let launch = build_launch(&s, &package, held, None, &ctx);
        assert_eq!(
            launch.address.as_deref(),
            Some(format!("node1:{}", range.first + 3).as_str())
        );
        // The deployment's secret, in the environment only.
        assert_eq!(
            launch.env.get("TEMPEST_DATA_SECRET").map(String::as_str),
            Some("the-data-secret")
        );
        assert!(!launch.env.contains_key("TEMPEST_TOKEN"));
        assert!(!launch.args.iter().any(|a| a.contains("the-data-secret")));
        assert_eq!(
            launch.args[..5],
            [
                "topology",
                "--host",
                "127.0.0.1",
                "--port",
                &(range.first + 3).to_string()
            ]
        );
        let mut ports = Ports::new(range, IpAddr::V4(Ipv4Addr::LOCALHOST));
        ports.seed(std::slice::from_ref(&launch));
        assert_eq!(ports.allocate(&s).unwrap(), held);
        // And the launch built again is the same launch.
        assert_eq!(build_launch(&s, &package, held, None, &ctx), launch);

        // A worker's peer port is seeded from its advertised address.
        let worker_held = Held {
            listen: range.first,
            metrics: range.first + 1,
        };
        let w = spec("wc/count/1", Role::Task);
        let wl = build_launch(&w, &package, worker_held, None, &ctx);
        assert_eq!(
            wl.address.as_deref(),
            Some(format!("node1:{}", range.first).as_str())
        );
        let mut ports = Ports::new(range, IpAddr::V4(Ipv4Addr::LOCALHOST));
        ports.seed(&[launch, wl]);
        assert_eq!(ports.get("wc/count/1"), Some(worker_held));
        assert_eq!(ports.allocate(&w).unwrap(), worker_held);
        assert_eq!(ports.allocate(&s).unwrap(), held);
    }

    #[test]
    fn the_server_gets_a_stable_source_consumer_and_workers_none() {
        let package = package();
        let ctx = ctx();
        let held = Held {
            listen: 7512,
            metrics: 7513,
        };
        let consumer = |l: &Launch| l.env.get(SOURCE_CONSUMER_ENV).cloned();
        let s = spec("wc/server", Role::Topology);
        let l = build_launch(&s, &package, held, None, &ctx);
        assert_eq!(consumer(&l).as_deref(), Some("wc/server"));
        // The same on another agent, on other ports, in a later generation:
        // from the deployment, not from the host or the process.
        let mut elsewhere = ctx.clone();
        elsewhere.advertise_host = "node2".into();
        elsewhere.server_ip = "10.9.9.9".parse().unwrap();
        let mut again = s.clone();
        again.generation = 9;
        let other = Held {
            listen: 8000,
            metrics: 8001,
        };
        let l2 = build_launch(&again, &package, other, None, &elsewhere);
        assert_eq!(consumer(&l2), consumer(&l));
        // Workers read no source.
        for w in ["wc/count/0", "wc/split/0", "wc/output/0"] {
            let l = build_launch(&spec(w, Role::Task), &package, held, None, &ctx);
            assert_eq!(consumer(&l), None, "{w}");
        }
        // The spec's own environment wins.
        let mut own = s.clone();
        own.env.insert(SOURCE_CONSUMER_ENV.into(), "mine".into());
        let l = build_launch(&own, &package, held, None, &ctx);
        assert_eq!(consumer(&l).as_deref(), Some("mine"));
        // Anything but a plain name is cleaned up.
        assert_eq!(
            source_consumer(&spec("wörd\"count/server", Role::Topology)),
            "w_rd_count/server"
        );
        assert_eq!(
            source_consumer(&spec("a-b_c.d:e/server", Role::Topology)),
            "a-b_c.d:e/server"
        );
    }

    #[test]
    fn an_insecure_agent_passes_insecure_only_to_a_deployment_without_a_certificate() {
        let package = package();
        let held = Held {
            listen: 7512,
            metrics: 7513,
        };
        let mut ctx = ctx();
        ctx.server_ip = "10.1.2.3".parse().unwrap();
        let mut w = spec("wc/count/1", Role::Task);
        let insecure = |ctx: &LaunchContext, w: &ProcessSpec| {
            build_launch(w, &package, held, None, ctx)
                .args
                .contains(&"--insecure".to_owned())
        };
        assert!(!insecure(&ctx, &w), "a secure agent never does");
        ctx.insecure = true;
        assert!(insecure(&ctx, &w));
        let ca = tempest_control::tls::ClusterCa::generate().unwrap();
        w.data_tls = Some(ca.issue_data("wc").unwrap());
        assert!(
            !insecure(&ctx, &w),
            "a deployment with a certificate has TLS"
        );
        w.data_tls = None;
        ctx.server_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert!(!insecure(&ctx, &w), "loopback needs nothing");
    }

    #[test]
    fn workers_get_their_peer_address_and_their_layout() {
        let package = package();
        let mut ctx = ctx();
        ctx.server_ip = "10.1.2.3".parse().unwrap();
        ctx.advertise_host = "node1.internal".into();
        let held = Held {
            listen: 7512,
            metrics: 7513,
        };
        let mut w = spec("wc/count/1", Role::Task);
        w.generation = 42;
        w.instances = Some(3);
        let l = build_launch(&w, &package, held, Some(Path::new("/c/x.toml")), &ctx);
        assert_eq!(
            l.args,
            [
                "task",
                "--name",
                "count",
                "--topology-addr",
                "10.0.0.1:7311",
                "--instance",
                "1",
                "--instances",
                "3",
                "--layout",
                "42",
                "--peer-listen",
                "10.1.2.3:7512",
                "--peer-advertise",
                "node1.internal:7512",
                "--config",
                "/c/x.toml",
                "--metrics-target",
                "prometheus=127.0.0.1:7513"
            ]
        );
        assert_eq!(l.address.as_deref(), Some("node1.internal:7512"));
        assert_eq!(l.metrics_address.as_deref(), Some("127.0.0.1:7513"));

        // Without a count the worker takes its configuration's, and no
        // layout is claimed.
        w.instances = None;
        let l = build_launch(&w, &package, held, None, &ctx);
        assert!(
            !l.args.iter().any(|a| a == "--instances" || a == "--layout"),
            "{:?}",
            l.args
        );

        // IPv6: the listen address and the advertised one in brackets.
        ctx.server_ip = "::1".parse().unwrap();
        ctx.advertise_host = "fd00::7".into();
        let l = build_launch(&w, &package, held, None, &ctx);
        let at = |flag: &str| {
            let i = l.args.iter().position(|a| a == flag).unwrap();
            l.args[i + 1].clone()
        };
        assert_eq!(at("--peer-listen"), "[::1]:7512");
        assert_eq!(at("--peer-advertise"), "[fd00::7]:7512");
    }

    #[test]
    fn bad_specs_and_assignments() {
        let mut s = spec("wc/count/1", Role::Task);
        s.topology_addr = None;
        assert!(check_spec(&s).unwrap_err().contains("topology_addr"));
        let mut s = spec("wc/count/1", Role::Task);
        s.instances = Some(0);
        assert!(check_spec(&s).unwrap_err().contains("count of 0"));
        s.instances = Some(1);
        assert!(check_spec(&s).unwrap_err().contains("instance 1 of"));
        s.instances = Some(2);
        assert_eq!(check_spec(&s), Ok(()));
        let a = Assignment {
            processes: vec![spec("x", Role::Topology), spec("x", Role::Topology)],
        };
        assert!(check_assignment(&a).unwrap_err().contains("`x`"));
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
    }
}
