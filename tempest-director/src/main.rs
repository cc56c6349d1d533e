//! The `tempest-director` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tempest_director::config::{self, DirectorConfig};

/// The Tempest director: the cluster's control plane.
#[derive(Parser, Debug)]
#[command(name = "tempest-director", version)]
struct Args {
    /// A Cluster.toml whose [director] section to read (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The API's address, IP:PORT (port 0 picks one) [default: 127.0.0.1:7300].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The data directory: director.db and packages/ [default: tempest-director-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The cluster token that mutating calls must carry [default: none].
    #[arg(long, env = "TEMPEST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// An agent silent for this long is down, e.g. "10s" [default: 10s].
    #[arg(long, value_parser = config::parse_timeout)]
    agent_timeout: Option<std::time::Duration>,
    /// The largest package upload, bytes [default: 536870912].
    #[arg(long)]
    max_upload: Option<u64>,
    /// How often to scrape the agents' metrics, e.g. "2s" [default: 2s].
    #[arg(long, value_parser = config::parse_timeout)]
    metrics_interval: Option<std::time::Duration>,
    /// The log level or filter; RUST_LOG overrides it [default: info].
    #[arg(long)]
    log_level: Option<String>,
}

fn settings(args: Args) -> Result<DirectorConfig, String> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("{}: cannot read the file: {e}", path.display()))?;
            config::parse_cluster_toml(&text, path).map_err(|e| e.to_string())?
        }
        None => DirectorConfig::default(),
    };
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = args.data_dir {
        c.data_dir = v;
    }
    if let Some(v) = args.token {
        if v.is_empty() {
            return Err("command line: key `--token`: must not be empty".into());
        }
        c.token = Some(v);
    }
    if let Some(v) = args.agent_timeout {
        c.agent_timeout = v;
    }
    if let Some(v) = args.max_upload {
        if v < 1024 {
            return Err("command line: key `--max-upload`: at least 1024 bytes".into());
        }
        c.max_upload = v;
    }
    if let Some(v) = args.metrics_interval {
        c.metrics_interval = v;
    }
    if let Some(v) = args.log_level {
        c.log_level = v;
    }
    Ok(c)
}

fn main() -> ExitCode {
    let config = match settings(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log_level));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: bad log level `{}`: {e}", config.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = actix_web::rt::System::new().block_on(tempest_director::run(config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
