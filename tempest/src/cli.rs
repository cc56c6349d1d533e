//! The command line of a topology package: one binary, several modes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use tempest_core::metrics::catalog;
use tempest_core::{Topology, TopologyFile};
use tempest_topology::{DriveEnd, Standalone};

/// A Tempest topology package.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
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
    },
}

/// Starts `tracing` output on stderr at `level`, unless `RUST_LOG` is set.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The `main` of a topology package: parses the command line and runs the
/// topology that `build` makes in the mode asked for. Errors are printed on
/// one line and give exit code 1.
pub fn main(build: impl FnOnce() -> Topology) -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match run(cli, build) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, build: impl FnOnce() -> Topology) -> anyhow::Result<()> {
    match cli.mode {
        Mode::Standalone { config } => {
            let mut topology = build();
            if let Some(path) = &config {
                let file = TopologyFile::load(path)?;
                topology.apply(&file)?;
            }
            standalone(topology)
        }
    }
}

fn standalone(topology: Topology) -> anyhow::Result<()> {
    let name = topology.settings.name.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let (stop, shutdown) = watch::channel(false);
    let report = runtime.block_on(async move {
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: draining");
            let _ = stop.send(true);
        });
        Standalone::new(topology).run(shutdown).await
    });
    let (report, _) = report.with_context(|| format!("topology `{name}`"))?;
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
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
