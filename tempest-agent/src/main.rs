//! `tempest-agent`: the per-node daemon. See the crate's documentation and
//! the README's "Agent" section.

use std::process::ExitCode;

use clap::Parser;
use tempest_agent::config::Cli;

fn main() -> ExitCode {
    // What the agent writes (its records, logs, configs, packages) is its
    // own; its processes get the umask it was started with back.
    tempest_agent::supervisor::private_umask();
    let cli = Cli::parse();
    let config = match cli.resolve() {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    if let Err(e) = config.check() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    init_logging(&config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tempest_agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `level`, unless `RUST_LOG` is set; actix's own server
/// logs only warnings unless `RUST_LOG` says otherwise.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(format!(
                "{level},actix_server=warn,actix_web=warn"
            ))
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
