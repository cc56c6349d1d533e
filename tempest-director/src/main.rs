//! The `tempest-director` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tempest_control::credentials::{
    ADMIN_TOKEN_ENV, AGENT_TOKEN_ENV, LEGACY_TOKEN_ENV, VIEWER_TOKEN_ENV,
};
use tempest_control::Secret;
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
    /// A file holding the admin token (everything) [env: TEMPEST_ADMIN_TOKEN].
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// A file holding the viewer token (reads only) [env: TEMPEST_VIEWER_TOKEN].
    #[arg(long, value_name = "FILE")]
    viewer_token_file: Option<PathBuf>,
    /// A file holding the agent token (heartbeats, package downloads; sent
    /// to the agents' APIs) [env: TEMPEST_AGENT_TOKEN].
    #[arg(long, value_name = "FILE")]
    agent_token_file: Option<PathBuf>,
    /// Deprecated: the old single token, as the admin token. A command line
    /// is readable by every user of the machine: use --admin-token-file or
    /// TEMPEST_ADMIN_TOKEN.
    #[arg(long, hide = true)]
    token: Option<String>,
    /// A host name the API answers to, besides localhost and IP addresses
    /// (repeat for several); a request for another is refused.
    #[arg(long = "host", value_name = "NAME")]
    hosts: Vec<String>,
    /// The director's TLS certificate (PEM): with --tls-key and --tls-ca
    /// the API and the UI are HTTPS, and agents must show a certificate of
    /// the cluster CA.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, mode 0600).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The cluster CA's certificate (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// The cluster CA's key (PEM, mode 0600): with it each deployment gets
    /// a data-plane certificate, so its links are TLS too.
    #[arg(long, value_name = "FILE")]
    tls_ca_key: Option<PathBuf>,
    /// Listen beyond loopback without credentials or without TLS: anyone
    /// who reaches or overhears the port can then run code on every agent.
    #[arg(long)]
    insecure: bool,
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
    let mut warnings = Vec::new();
    let mut file = |flag: &str, path: &PathBuf| {
        config::read_token_file(path, &mut warnings)
            .map_err(|e| format!("command line: key `--{flag}`: {e}"))
    };
    let env = |var: &str| Secret::from_env(var).map_err(|e| e.to_string());
    // Flags, then the environment, then the file.
    let admin = match &args.admin_token_file {
        Some(p) => Some(file("admin-token-file", p)?),
        None => env(ADMIN_TOKEN_ENV)?,
    };
    match admin {
        Some(t) => c.admin_token = Some(t),
        None if c.admin_token.is_none() => {
            // The old single token, from the command line or the environment.
            if let Some(v) = &args.token {
                c.admin_token =
                    Some(Secret::new(v, "--token").map_err(|e| format!("command line: {e}"))?);
                c.warnings.push(
                    "--token is deprecated: a command line can be read by every user of this \
                     machine; use --admin-token-file, admin_token_file or TEMPEST_ADMIN_TOKEN"
                        .into(),
                );
            } else {
                c.admin_token = env(LEGACY_TOKEN_ENV)?;
            }
        }
        None => {}
    }
    let viewer = match &args.viewer_token_file {
        Some(p) => Some(file("viewer-token-file", p)?),
        None => env(VIEWER_TOKEN_ENV)?,
    };
    if viewer.is_some() {
        c.viewer_token = viewer;
    }
    let agent = match &args.agent_token_file {
        Some(p) => Some(file("agent-token-file", p)?),
        None => env(AGENT_TOKEN_ENV)?,
    };
    if agent.is_some() {
        c.agent_token = agent;
    }
    for h in &args.hosts {
        c.hosts
            .push(config::parse_host(h).map_err(|e| format!("command line: key `--host`: {e}"))?);
    }
    if let (Some(cert), Some(key), Some(ca)) = (args.tls_cert, args.tls_key, args.tls_ca) {
        c.tls = Some(tempest_control::tls::TlsFiles { cert, key, ca });
    }
    if let Some(k) = args.tls_ca_key {
        c.tls_ca_key = Some(k);
    }
    c.insecure |= args.insecure;
    c.warnings.extend(warnings);
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
    c.check()?;
    Ok(c)
}

fn main() -> ExitCode {
    // Everything the director writes (its database, packages) is its own.
    // SAFETY: umask has no preconditions.
    unsafe {
        libc::umask(0o077);
    }
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
