//! The command line of a topology package: one binary, several modes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use tempest_core::metrics::catalog;
use tempest_core::metrics::targets::{push_targets, spawn_flusher};
use tempest_core::metrics::{Labels, Registry, TargetSpec};
use tempest_core::{Topology, TopologyFile};
use tempest_task::worker::{run_worker, WorkerConfig};
use tempest_topology::standalone::{start_scrape, target_problems};
use tempest_topology::{DriveEnd, RunReport, ServerConfig, Standalone, TopologyServer};
use tempest_transport::auth::Secret;
use tempest_transport::tls::DataTls;

/// A Tempest topology package.
#[derive(Debug, Parser)]
#[command(
    about = "A Tempest topology package: one binary, run as standalone, topology server or task worker"
)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "info", env = "TEMPEST_LOG_LEVEL")]
    pub log_level: String,
    /// The runtime mode.
    #[command(subcommand)]
    pub mode: Mode,
}

/// The runtime modes of a package.
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Runs the whole topology in this process (development): the source, the
    /// routing and every task instance. Ctrl-C drains roots in flight up to
    /// the grace period and exits 0.
    Standalone {
        /// A Topology.toml whose settings override the ones in code.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Metric targets and interval.
        #[command(flatten)]
        metrics: MetricArgs,
    },
    /// Runs the topology server: polls the source, sends each root to a
    /// worker of the root task, keeps the membership of the workers that join
    /// it (they send messages to each other directly), and acks every root
    /// whose tree completed. SIGTERM drains roots in flight up to the grace
    /// period, tells the workers, and exits 0.
    Topology {
        /// A Topology.toml whose settings override the ones in code.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// The port to listen on (0 picks a free one; the address is printed).
        #[arg(long, default_value_t = 7311)]
        port: u16,
        /// Token and frame limits.
        #[command(flatten)]
        wire: WireArgs,
        /// How often an idle connection must show life, in milliseconds; a
        /// worker silent for three times this is dropped and its messages re-queued.
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
        /// Metric targets and interval.
        #[command(flatten)]
        metrics: MetricArgs,
    },
    /// Runs one worker of a task: joins the topology server, accepts its
    /// upstreams' messages on its peer port, handles them, sends what the
    /// task emits straight to the downstream workers, and reports acks to the
    /// server. Joins again with back-off when the server goes away. SIGTERM
    /// finishes the current batch, says goodbye and exits 0.
    Task {
        /// The task to run.
        #[arg(long)]
        name: String,
        /// The topology server's address, HOST:PORT.
        #[arg(long)]
        topology_addr: String,
        /// The instance to claim (default: the server assigns a free one).
        #[arg(long)]
        instance: Option<u32>,
        /// The task's instance count (default: the code's or Topology.toml's).
        #[arg(long)]
        instances: Option<u32>,
        /// The layout version of that count: a server adopts the count of the
        /// highest layout its workers bring (a rebalance). 0 means "from
        /// configuration".
        #[arg(long, default_value_t = 0)]
        layout: u64,
        /// Where to accept peer links from upstream workers, IP:PORT (port 0
        /// picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        peer_listen: std::net::SocketAddr,
        /// The address upstream workers are told, HOST[:PORT] (default: the
        /// listen address; the host name when listening on all addresses).
        #[arg(long)]
        peer_advertise: Option<String>,
        /// Batches each upstream may have in flight to this worker.
        #[arg(long, default_value_t = 4)]
        credit: u32,
        /// A Topology.toml whose settings override the ones in code.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Token and frame limits.
        #[command(flatten)]
        wire: WireArgs,
        /// Metric targets and interval.
        #[command(flatten)]
        metrics: MetricArgs,
    },
    /// Checks the topology without running it: builds it, applies
    /// Topology.toml (source kind and config, settings, worker counts),
    /// validates the pipeline and the metric targets, and prints the tasks
    /// with their workers and edges. Exits 1 naming every problem.
    Check {
        /// A Topology.toml whose settings override the ones in code.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON (`{"name", "tasks": [{"name", "workers", "edges":
        /// [{"to", "grouping"}]}]}`) for tools such as `tempest package`.
        #[arg(long)]
        json: bool,
    },
}

/// Command-line overrides of `[metric]`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricArgs {
    /// A metric target, replacing the ones of the code and of Topology.toml
    /// (repeat for several): console, log[=LEVEL], statsd[=HOST:PORT[,PREFIX]],
    /// prometheus[=IP:PORT] (port 0 picks a free port; the address is
    /// printed as `metrics on http://ADDR/metrics`), file=PATH, or none.
    #[arg(long = "metrics-target", value_name = "KIND[=ARG]", value_parser = parse_target)]
    pub metrics_targets: Vec<TargetArg>,
    /// How often the push targets get a snapshot, such as "1s" or "500ms"
    /// (at least 10ms), replacing `[metric] flush_interval`.
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub metrics_interval: Option<std::time::Duration>,
}

/// One `--metrics-target`: a target, or `none`.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetArg(pub Option<TargetSpec>);

fn parse_target(s: &str) -> Result<TargetArg, String> {
    if s.trim() == "none" {
        return Ok(TargetArg(None));
    }
    s.parse().map(|t| TargetArg(Some(t)))
}

fn parse_max_frame(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !(64 * 1024..=1 << 30).contains(&n) {
        return Err(format!("must be 65536 to 1073741824 bytes, not {n}"));
    }
    Ok(n)
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); such as \"1s\" or \"500ms\""))?;
    if d < tempest_core::config::MIN_FLUSH_INTERVAL {
        return Err(format!("must be at least 10ms, not {s:?}"));
    }
    Ok(d)
}

impl WireArgs {
    /// The data-plane secret: from `--secret-file`, else from
    /// `TEMPEST_DATA_SECRET`, else none.
    pub fn secret(&self) -> anyhow::Result<Option<Secret>> {
        Ok(match &self.secret_file {
            Some(path) => Some(Secret::from_file(path)?),
            None => Secret::from_env()?,
        })
    }

    /// The data plane's TLS: from `--tls-cert`, `--tls-key` and `--tls-ca`
    /// (each defaulting to its environment variable), none when none is
    /// given, an error naming the missing one when only some are.
    pub fn tls(&self) -> anyhow::Result<Option<DataTls>> {
        let given = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        Ok(DataTls::from_paths(
            ("--tls-cert (TEMPEST_DATA_TLS_CERT)", given(&self.tls_cert)),
            ("--tls-key (TEMPEST_DATA_TLS_KEY)", given(&self.tls_key)),
            ("--tls-ca (TEMPEST_DATA_TLS_CA)", given(&self.tls_ca)),
        )?)
    }
}

impl MetricArgs {
    /// Applies the overrides to `topology`'s settings.
    pub fn apply(&self, topology: &mut Topology) {
        if !self.metrics_targets.is_empty() {
            topology.settings.metrics.targets = self
                .metrics_targets
                .iter()
                .filter_map(|t| t.0.clone())
                .collect();
        }
        if let Some(d) = self.metrics_interval {
            topology.settings.metrics.flush_interval = d;
        }
    }
}

/// Settings both ends of a worker connection share.
#[derive(Debug, clap::Args)]
pub struct WireArgs {
    /// A file holding the deployment's data-plane secret (by default it
    /// comes from the environment variable TEMPEST_DATA_SECRET, which the
    /// agent sets; a secret is never taken on the command line). Every
    /// process of a topology must have the same one: each proves it to the
    /// other side of a connection without sending it.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// The largest frame accepted or sent, in bytes (64 KiB to 1 GiB).
    #[arg(long, default_value_t = tempest_transport::DEFAULT_MAX_FRAME,
          value_parser = parse_max_frame)]
    pub max_frame: usize,
    /// A PEM file with the deployment's data-plane certificate chain (the
    /// agent sets TEMPEST_DATA_TLS_CERT). With --tls-key and --tls-ca, every
    /// connection of the data plane is TLS, mutual, against the CA; without
    /// any of the three, plain text.
    #[arg(long, value_name = "PATH", env = tempest_transport::tls::CERT_ENV)]
    pub tls_cert: Option<PathBuf>,
    /// A PEM file with the certificate's private key (a path: a key is
    /// never taken on the command line).
    #[arg(long, value_name = "PATH", env = tempest_transport::tls::KEY_ENV)]
    pub tls_key: Option<PathBuf>,
    /// A PEM file with the cluster's CA certificate, which every peer's
    /// certificate must chain to.
    #[arg(long, value_name = "PATH", env = tempest_transport::tls::CA_ENV)]
    pub tls_ca: Option<PathBuf>,
    /// Accept links beyond loopback without TLS (still only with the
    /// secret), with a warning: the messages cross the network in clear.
    /// An agent started with --insecure passes it on to a deployment that
    /// has no data-plane certificate.
    #[arg(long)]
    pub insecure: bool,
}

/// Starts `tracing` output on stderr at `level`, unless `RUST_LOG` is set.
/// The metrics endpoint's HTTP server (actix) only logs warnings and errors
/// unless `RUST_LOG` says otherwise.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(format!("{level},actix_server=warn")))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// The `main` of a topology package: parses the command line and runs the
/// topology that `build` makes in the mode asked for. Errors are printed on
/// one line and give exit code 1.
pub fn main(build: impl FnOnce() -> Topology) -> ExitCode {
    // The package is the user's binary: name it after itself, not this crate.
    let bin = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "topology".into());
    let matches = <Cli as clap::CommandFactory>::command()
        .name(bin)
        .version(concat!("(tempest ", env!("CARGO_PKG_VERSION"), ")"))
        .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(&cli.log_level);
    if let Err(e) = tempest_core::limits::raise_open_files() {
        tracing::warn!("cannot raise the open files limit: {e}");
    }
    match run(cli, build) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn configured(
    build: impl FnOnce() -> Topology,
    config: Option<&PathBuf>,
    metrics: &MetricArgs,
) -> anyhow::Result<Topology> {
    let mut topology = build();
    if let Some(path) = config {
        let file = TopologyFile::load(path)?;
        topology.apply(&file)?;
    }
    metrics.apply(&mut topology);
    Ok(topology)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// A channel that turns true on Ctrl-C or SIGTERM. The signal handlers are
/// installed before this returns, so a signal right after start is not lost.
/// Must be called inside the runtime.
fn shutdown_on_signal() -> watch::Receiver<bool> {
    let (stop, shutdown) = watch::channel(false);
    let signals = tempest_core::shutdown::Signals::install();
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("signal received: shutting down");
        let _ = stop.send(true);
    });
    shutdown
}

/// `check`: everything a process of the topology checks before it runs.
fn check(mut topology: Topology, json: bool) -> anyhow::Result<()> {
    let mut problems = target_problems(&topology.settings.metrics.targets);
    let dag = match topology.dag() {
        Ok(dag) => Some(dag),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let mut sources = Vec::new();
    if let Some(dag) = &dag {
        match topology.take_sources(dag) {
            Ok(given) => {
                sources = dag
                    .sources()
                    .iter()
                    .zip(&given)
                    .map(|(s, g)| {
                        let feeds: Vec<&str> =
                            s.feeds.iter().map(|t| dag.task(*t).name.as_str()).collect();
                        serde_json::json!({"name": g.name, "feeds": feeds})
                    })
                    .collect();
            }
            Err(tempest_core::SourcesError::None) => problems.push(format!(
                "topology `{}` has no source: give one in code or a [source] in Topology.toml",
                topology.settings.name
            )),
            Err(tempest_core::SourcesError::Mismatch(e)) => {
                problems.extend(e.0);
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    let Some(dag) = dag else {
        anyhow::bail!("the pipeline did not validate");
    };
    let tasks: Vec<serde_json::Value> = dag
        .tasks()
        .map(|(_, t)| {
            let edges: Vec<serde_json::Value> = t
                .edges
                .iter()
                .map(|e| serde_json::json!({"to": dag.task(e.to).name, "grouping": e.grouping.to_string()}))
                .collect();
            serde_json::json!({"name": t.name, "workers": t.workers, "edges": edges})
        })
        .collect();
    if json {
        let v =
            serde_json::json!({"name": topology.settings.name, "sources": sources, "tasks": tasks});
        println!("{v}");
    } else {
        println!("topology {}: ok", topology.settings.name);
        if sources.len() > 1 {
            for s in &sources {
                let feeds: Vec<&str> = s["feeds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str())
                    .collect();
                println!(
                    "  source {} -> {}",
                    s["name"].as_str().unwrap_or(""),
                    feeds.join(", ")
                );
            }
        }
        for t in &tasks {
            let edges: Vec<String> = t["edges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "{} ({})",
                        e["to"].as_str().unwrap_or(""),
                        e["grouping"].as_str().unwrap_or("")
                    )
                })
                .collect();
            println!(
                "  {} x{}{}",
                t["name"].as_str().unwrap_or(""),
                t["workers"],
                if edges.is_empty() {
                    String::new()
                } else {
                    format!(" -> {}", edges.join(", "))
                }
            );
        }
    }
    Ok(())
}

fn run(cli: Cli, build: impl FnOnce() -> Topology) -> anyhow::Result<()> {
    match cli.mode {
        Mode::Check { config, json } => check(
            configured(build, config.as_ref(), &MetricArgs::default())?,
            json,
        ),
        Mode::Standalone { config, metrics } => {
            standalone(configured(build, config.as_ref(), &metrics)?)
        }
        Mode::Topology {
            config,
            host,
            port,
            wire,
            heartbeat_ms,
            metrics,
        } => {
            let topology = configured(build, config.as_ref(), &metrics)?;
            let server = ServerConfig {
                listen: std::net::SocketAddr::new(host, port),
                secret: wire.secret()?,
                tls: wire.tls()?,
                max_frame: wire.max_frame,
                heartbeat: std::time::Duration::from_millis(heartbeat_ms.max(10)),
                ..ServerConfig::default()
            };
            refuse_open_bind(
                server.listen,
                &wire,
                server.secret.is_some(),
                server.tls.is_some(),
                "worker connections",
            )?;
            topology_server(topology, server)
        }
        Mode::Task {
            name,
            topology_addr,
            instance,
            instances,
            layout,
            peer_listen,
            peer_advertise,
            credit,
            config,
            wire,
            metrics,
        } => {
            let mut topology = configured(build, config.as_ref(), &metrics)?;
            let problems = target_problems(&topology.settings.metrics.targets);
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("; "));
            }
            let dag = std::sync::Arc::new(topology.dag()?);
            let idx = dag.find(&name).with_context(|| {
                format!("topology `{}` has no task `{name}`", topology.settings.name)
            })?;
            let mut worker =
                WorkerConfig::new(topology_addr, topology.settings.name.clone(), name.clone());
            worker.instance = instance;
            worker.instances = instances.unwrap_or(dag.task(idx).workers);
            worker.layout = layout;
            worker.secret = wire.secret()?;
            worker.tls = wire.tls()?;
            worker.max_frame = wire.max_frame;
            worker.credit = credit.max(1);
            worker.peer_listen = peer_listen;
            worker.peer_advertise = peer_advertise;
            refuse_open_bind(
                peer_listen,
                &wire,
                worker.secret.is_some(),
                worker.tls.is_some(),
                "peer links",
            )?;
            let mut labels = vec![
                ("topology", topology.settings.name.clone()),
                ("host", tempest_core::metrics::hostname()),
            ];
            if let Some(i) = instance {
                labels.push(("instance", i.to_string()));
            }
            let registry = Registry::new(Labels::new(labels));
            // The task runs on its own thread; the links, the inbox and the
            // control link need one thread between them, and fewer threads
            // to wake per batch cost less.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            let settings = topology.settings.clone();
            let report = rt.block_on(async move {
                let shutdown = shutdown_on_signal();
                let scrape = start_scrape(&registry, &settings.metrics.targets)?;
                let flusher = spawn_flusher(
                    registry.clone(),
                    push_targets(&settings.metrics.targets),
                    settings.metrics.flush_interval,
                );
                let report = run_worker(dag, worker, registry, shutdown).await;
                let _ = tokio::task::spawn_blocking(move || flusher.stop()).await;
                for endpoint in scrape {
                    endpoint.stop().await;
                }
                anyhow::Ok(report?)
            })?;
            println!(
                "worker {name}: handled {} messages over {} session(s)",
                report.handled, report.connections
            );
            Ok(())
        }
    }
}

/// A data-plane port beyond loopback must want a secret (otherwise anyone
/// on the network could join the topology or feed it messages), and TLS
/// unless `--insecure` (otherwise its messages cross the network in clear).
fn refuse_open_bind(
    addr: std::net::SocketAddr,
    wire: &WireArgs,
    secret: bool,
    tls: bool,
    what: &str,
) -> anyhow::Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !secret {
        anyhow::bail!(
            "refusing to accept {what} on {addr} without a data-plane secret: set {} (or --secret-file), or listen on a loopback address",
            tempest_transport::auth::SECRET_ENV
        );
    }
    if !tls {
        if !wire.insecure {
            anyhow::bail!(
                "refusing to accept {what} on {addr} without TLS: the topology's messages would cross the network in clear; set {} (or --tls-cert, --tls-key and --tls-ca; the director gives each deployment a certificate when it has the cluster CA's key, tls_ca_key_file), listen on a loopback address, or pass --insecure",
                tempest_transport::tls::CERT_ENV
            );
        }
        tracing::warn!(
            "--insecure: accepting {what} on {addr} without TLS: the topology's messages cross the network in clear (authenticated by the data-plane secret, not encrypted)"
        );
    }
    Ok(())
}

fn topology_server(topology: Topology, config: ServerConfig) -> anyhow::Result<()> {
    let name = topology.settings.name.clone();
    let rt = runtime()?;
    let report = rt.block_on(async move {
        let server = TopologyServer::bind(topology, config).await?;
        let addr = server.local_addr()?;
        println!("tempest topology server for `{name}` listening on {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let shutdown = shutdown_on_signal();
        server.run(shutdown).await
    });
    let report = report.context("topology server")?;
    summary(&report);
    Ok(())
}

fn standalone(topology: Topology) -> anyhow::Result<()> {
    let name = topology.settings.name.clone();
    let report = runtime()?.block_on(async move {
        let shutdown = shutdown_on_signal();
        Standalone::new(topology).run(shutdown).await
    });
    let (report, _) = report.with_context(|| format!("topology `{name}`"))?;
    summary(&report);
    Ok(())
}

/// Prints the one-line summary of a run.
fn summary(report: &RunReport) {
    let name = report
        .metrics
        .samples
        .first()
        .and_then(|s| s.labels.get("topology"))
        .unwrap_or("topology")
        .to_owned();
    let secs = report.elapsed.as_secs_f64();
    let latency = report
        .metrics
        .histogram(catalog::ROOT_COMPLETE_LATENCY.name, &[])
        .cloned()
        .unwrap_or_default();
    println!(
        "{name}: {} roots acked, {} failed, {} dead-lettered in {:.2}s ({:.0} roots/s); complete latency p50 {:.2}ms p99 {:.2}ms{}",
        report.acked(),
        report.failed(),
        report.dead_lettered(),
        secs,
        report.acked() as f64 / secs.max(1e-9),
        latency.quantile(0.5) as f64 / 1000.0,
        latency.quantile(0.99) as f64 / 1000.0,
        match report.end {
            DriveEnd::Shutdown { left } if left > 0 => format!("; {left} left un-acked at the source"),
            _ => String::new(),
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(args: &[&str]) -> WireArgs {
        #[derive(Debug, Parser)]
        struct Wire {
            #[command(flatten)]
            wire: WireArgs,
        }
        Wire::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("the flags parse")
            .wire
    }

    /// Only run where the environment does not set the TLS variables (the
    /// flags default to them).
    fn no_tls_env() -> bool {
        use tempest_transport::tls::{CA_ENV, CERT_ENV, KEY_ENV};
        [CERT_ENV, KEY_ENV, CA_ENV]
            .iter()
            .all(|v| std::env::var_os(v).is_none())
    }

    #[test]
    fn tls_flags_all_or_none() {
        if !no_tls_env() {
            return;
        }
        assert!(wire(&[]).tls().expect("no TLS").is_none());
        let e = wire(&["--tls-cert", "/c.pem", "--tls-ca", "/ca.pem"])
            .tls()
            .expect_err("no key");
        assert!(e.to_string().contains("--tls-key"), "{e}");
        assert!(e.to_string().contains("TEMPEST_DATA_TLS_KEY"), "{e}");
        let e = wire(&[
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            "/k.pem",
            "--tls-ca",
            "/ca.pem",
        ])
        .tls()
        .expect_err("no such file");
        assert!(e.to_string().contains("/nonexistent/c.pem"), "{e}");
    }
}
