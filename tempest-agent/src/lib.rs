//! # tempest-agent
//!
//! The per-node daemon. It registers with the director and heartbeats; each
//! answer is the full set of processes this node should run, and the agent
//! converges to it. It fetches packages by content hash, runs topology
//! servers and task workers in their own process groups, restarts them with
//! back-off, keeps their logs, aggregates their metrics, and serves all of it
//! on an HTTP API. Killed and restarted, it adopts the processes its previous
//! run left (recorded in its data directory) instead of orphaning or
//! duplicating them.
//!
//! - [`config`]: `Cluster.toml`'s `[agent]` section and the flags.
//! - [`api`]: the HTTP API.
//! - [`assign`]: assignments to launches (packages, ports, configs), the
//!   reconciler and the heartbeat.
//! - [`packages`]: the package store.
//! - [`supervisor`]: the processes themselves.
//! - [`metrics`]: the node's `/metrics`.
//! - [`node`]: the node's figures.

#![warn(missing_docs)]

pub mod api;
pub mod assign;
pub mod config;
pub mod metrics;
pub mod node;
pub mod packages;
pub mod supervisor;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tempest_control::ProcessStatus;
use tokio::sync::Notify;

use crate::assign::{Assigner, LaunchContext, Reconciler};
use crate::config::{split_host_port, AgentConfig};
use crate::packages::{Origin, Packages};
use crate::supervisor::Supervisor;

/// The file holding the agent's id, in the data directory.
pub const AGENT_ID_FILE: &str = "agent-id";
/// The lock that keeps two agents off one data directory.
pub const LOCK_FILE: &str = "agent.lock";

/// The agent's counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Heartbeats answered with an assignment.
    pub heartbeats: AtomicU64,
    /// Heartbeats that failed.
    pub heartbeat_errors: AtomicU64,
    /// Whether the last heartbeat was answered.
    pub director_up: AtomicBool,
    /// Process endpoints that did not answer a scrape.
    pub scrape_errors: AtomicU64,
}

/// A running agent's shared state.
pub struct Agent {
    /// Its settings.
    pub config: AgentConfig,
    /// Its stable id.
    pub id: String,
    /// Its API's address as others reach it, `HOST:PORT`.
    pub address: String,
    /// Its processes.
    pub supervisor: Supervisor,
    /// Its packages.
    pub packages: Arc<Packages>,
    /// Its assignment.
    pub assigner: Arc<Assigner>,
    /// Its counters.
    pub stats: Stats,
    /// The HTTP client for the director and the scrapes.
    pub client: reqwest::Client,
    /// Failed authentications per client address (rate-limited).
    pub failures: tempest_control::failures::FailureLimiter,
    /// The runtime the agent's own tasks run on (the API's handlers run on
    /// actix's threads and hand work that needs the client over to it).
    pub runtime: tokio::runtime::Handle,
}

impl Agent {
    /// Every process: the supervisor's, and the assigned ones that have no
    /// process yet (fetching their package) or cannot have one (failed),
    /// sorted by id.
    pub fn processes(&self) -> Vec<ProcessStatus> {
        let mut by_id: BTreeMap<String, ProcessStatus> = self
            .supervisor
            .statuses()
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        by_id.extend(self.assigner.pending());
        by_id.into_values().collect()
    }

    /// The node's `/metrics`: its own figures, then its processes' metrics
    /// summed.
    pub async fn metrics_text(&self) -> String {
        let processes = self.processes();
        let (texts, mut errors) = metrics::scrape(&self.client, &processes).await;
        let mut merged = metrics::Merged::new();
        for t in &texts {
            if let Err(e) = merged.add(t) {
                tracing::debug!("a process's metrics do not parse: {e}");
                errors += 1;
            }
        }
        self.stats
            .scrape_errors
            .fetch_add(errors, Ordering::Relaxed);
        let node = node::info(&self.config.data_dir);
        let mut out =
            metrics::node_exposition(&node, &processes, &self.stats, self.packages.downloads());
        out.push_str(&merged.render());
        out
    }
}

/// Reads the agent's id from `data_dir`, or makes one and keeps it there.
pub fn agent_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(AGENT_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if random.is_err() {
        // No /dev/urandom: the time and the pid are unique enough for an id.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (now ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assign::write_atomic(&path, format!("{id}\n").as_bytes())?;
    Ok(id)
}

/// Makes `data_dir` (created if missing) and everything in it its owner's
/// alone: directories 0700, executables 0700, other files 0600, whoever
/// created them (an older agent, an image that made the directory 0755).
/// Links are left alone. Other users' files (which the agent cannot
/// change) are an error.
pub fn make_private(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)?;
    fn walk(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
        let mode = meta.permissions().mode() & 0o7777;
        let want = if meta.is_dir() || mode & 0o100 != 0 {
            0o700
        } else {
            0o600
        };
        if mode & !want != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & want))?;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(path)? {
                let e = e?;
                let m = std::fs::symlink_metadata(e.path())?;
                if m.is_dir() || m.is_file() {
                    walk(&e.path(), &m)?;
                }
            }
        }
        Ok(())
    }
    let meta = std::fs::symlink_metadata(data_dir)?;
    walk(data_dir, &meta)?;
    // The directory itself: exactly 0700.
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
}

/// Holds the data directory's lock for as long as it lives.
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes the data directory's lock, so that a second agent on the same
/// directory stops at once instead of fighting the first over processes.
/// (The lock is the kernel's: it goes with the process, even on SIGKILL,
/// and no child inherits it.)
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            anyhow::bail!(
                "another agent is running on the data directory {} (it holds {})",
                data_dir.display(),
                path.display()
            );
        }
        let _ = file.set_len(0);
        let _ =
            std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes());
    }
    Ok(DataDirLock { _file: file })
}

/// Runs the agent until SIGTERM or Ctrl-C, which stop its processes (SIGTERM,
/// then SIGKILL after the grace period) before it exits. Prints
/// `tempest-agent <id> listening on http://ADDR` on stdout once the API
/// listens. Must run inside a multi-threaded tokio runtime.
pub async fn run(mut config: AgentConfig) -> anyhow::Result<()> {
    config.check().map_err(|e| anyhow::anyhow!(e))?;
    let signals = tempest_core::shutdown::Signals::install();
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // It holds the deployments' data-plane secrets and env (in the process
    // records and the kept assignment): ours alone, whoever created it.
    make_private(&config.data_dir)
        .with_context(|| format!("securing the data directory {}", config.data_dir.display()))?;
    config.data_dir = config
        .data_dir
        .canonicalize()
        .with_context(|| format!("reading the data directory {}", config.data_dir.display()))?;
    let data_dir = config.data_dir.clone();
    let _lock = lock_data_dir(&data_dir)?;
    let id = agent_id(&data_dir).with_context(|| {
        format!(
            "reading or writing {}",
            data_dir.join(AGENT_ID_FILE).display()
        )
    })?;

    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding the API to {}", config.listen))?;
    let local = listener.local_addr().context("reading the API's address")?;
    let default_host = if local.ip().is_unspecified() {
        tempest_core::metrics::hostname()
    } else {
        local.ip().to_string()
    };
    let (host, port) = match &config.advertise {
        Some(a) => {
            let (h, p) = split_host_port(a);
            (
                h.to_owned(),
                p.and_then(|p| p.parse().ok()).unwrap_or(local.port()),
            )
        }
        None => (default_host, local.port()),
    };
    let address = assign::join_host_port(&host, port);

    let supervisor = Supervisor::open(&data_dir, config.supervisor.clone())
        .with_context(|| format!("opening the supervisor over {}", data_dir.display()))?;
    let identity = match &config.tls {
        Some(files) => Some(files.load().context("loading the agent's TLS files")?),
        None => None,
    };
    // The director is checked against the cluster CA, and shown the
    // agent's certificate; without TLS the client trusts no https server.
    let client_tls = match &identity {
        Some(id) => id.client_config(),
        None => tempest_control::tls::client_trusting_nothing(),
    }
    .context("the agent's TLS client configuration")?;
    // No proxy from the environment: the scrapes go to 127.0.0.1, and the
    // director is reached as configured.
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(client_tls)
        .no_proxy()
        .connect_timeout(Duration::from_secs(3))
        .build()
        .context("building the HTTP client")?;
    let changed = Arc::new(Notify::new());
    let origin = config.director.clone().map(|director| Origin {
        director,
        client: client.clone(),
        token: config.token.clone(),
    });
    let packages = Arc::new(
        Packages::open(data_dir.join("packages"), origin, changed.clone())
            .with_context(|| format!("opening the package store in {}", data_dir.display()))?,
    );
    let ctx = LaunchContext {
        server_ip: config.listen.ip(),
        advertise_host: host,
        configs_dir: data_dir.join("configs"),
        insecure: config.insecure,
    };
    let (assigner, reconciler) = Reconciler::new(
        supervisor.clone(),
        packages.clone(),
        changed,
        config.port_range,
        ctx,
        data_dir.clone(),
    );
    let agent = Arc::new(Agent {
        config: config.clone(),
        id: id.clone(),
        address,
        supervisor,
        packages,
        assigner,
        stats: Stats::default(),
        client,
        failures: Default::default(),
        runtime: tokio::runtime::Handle::current(),
    });
    let reconciling = tokio::spawn(reconciler.run());
    let heartbeating = config
        .director
        .clone()
        .map(|d| tokio::spawn(assign::heartbeat(agent.clone(), d)));

    let data = actix_web::web::Data::from(agent.clone());
    let server = actix_web::HttpServer::new(move || {
        let gatekeeper = data.clone();
        actix_web::App::new()
            .app_data(data.clone())
            .wrap_fn(move |req, srv| {
                use actix_web::dev::Service;
                use futures_util::future::{ready, Either, FutureExt};
                match api::gate(&gatekeeper, &req) {
                    Err(refusal) => {
                        Either::Left(ready(Ok(req.into_response(refusal).map_into_right_body())))
                    }
                    Ok(()) => Either::Right(
                        srv.call(req)
                            .map(|r| r.map(actix_web::dev::ServiceResponse::map_into_left_body)),
                    ),
                }
            })
            .configure(api::configure)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(2);
    // With TLS, only clients with a certificate of the cluster (the
    // director) get past the handshake.
    let (server, scheme) = match &identity {
        Some(id) => (
            server
                .listen_rustls_0_23(
                    listener,
                    id.server_config(tempest_control::tls::ClientAuth::Required)
                        .context("the API's TLS configuration")?,
                )
                .context("serving the API")?,
            "https",
        ),
        None => (server.listen(listener).context("serving the API")?, "http"),
    };
    let server = server.run();
    let handle = server.handle();
    let mut serving = tokio::spawn(server);
    tracing::info!(
        "agent {id} on {} (data in {}), director {}",
        agent.address,
        data_dir.display(),
        config.director.as_deref().unwrap_or("none")
    );
    if !config.listen.ip().is_loopback() && config.token.is_none() {
        tracing::warn!(
            "--insecure: serving the API on {} without a token: anyone who reaches it can run \
             code on this node",
            config.listen
        );
    }
    if !config.listen.ip().is_loopback() && identity.is_none() {
        tracing::warn!(
            "--insecure: serving the API on {} without TLS: its token and its processes' \
             secrets cross the network in clear",
            config.listen
        );
    }
    if let Some(d) = config.director.as_deref() {
        if d.starts_with("http://") && !config::is_loopback_url(d) {
            tracing::warn!(
                "--insecure: heartbeating to {d} over plain http: the agent token crosses the \
                 network in clear"
            );
        }
    }
    println!("tempest-agent {id} listening on {scheme}://{local}");
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }

    let result = tokio::select! {
        _ = signals.wait() => {
            tracing::info!("signal received: stopping the processes and exiting");
            Ok(())
        }
        r = &mut serving => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the API server failed")),
            Err(e) => Err(anyhow::anyhow!("the API server ended abnormally: {e}")),
        },
    };
    if let Some(h) = heartbeating {
        h.abort();
    }
    reconciling.abort();
    handle.stop(true).await;
    agent.supervisor.stop_all().await;
    result
}
