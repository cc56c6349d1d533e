//! `tempest`: the command a Tempest user touches first and every day.
//!
//! It scaffolds topology crates ([`scaffold`]), packages them
//! ([`package`]), operates a cluster through its director's REST API
//! ([`ops`], [`client`]), writes a `Cluster.toml` and starts the daemons
//! ([`cluster`]), and runs a whole local cluster with the word count example
//! ([`dev`]).
//!
//! Errors are one line on standard error, `error: ...`, with exit code 1
//! (several lines, each `error: ...`, when a file has several problems);
//! wrong arguments are clap's usage error, exit code 2. Nothing here
//! panics on outside input, so no user sees a backtrace.

/// `println!` to standard output, returning an error (rather than
/// panicking) when it is closed; a closed pipe (`tempest list | head -1`)
/// ends the command quietly.
macro_rules! outln {
    () => {
        $crate::write_out(format_args!(""), true)?
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*), true)?
    };
}

/// `print!` to standard output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*), false)?
    };
}

mod client;
mod cluster;
mod dev;
mod ops;
mod package;
mod progress;
mod scaffold;
mod table;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};

/// Several problems found at once (every bad key of a file), printed one
/// per line, then the summary.
#[derive(Debug)]
pub struct Problems {
    /// What they add up to.
    pub summary: String,
    /// Each problem, one line each.
    pub lines: Vec<String>,
}

impl Problems {
    /// Problems under a summary.
    pub fn new(summary: impl Into<String>, lines: Vec<String>) -> Problems {
        Problems {
            summary: summary.into(),
            lines,
        }
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.summary)?;
        for l in &self.lines {
            write!(f, "; {l}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Scaffold, package, deploy and operate Tempest topologies.
///
/// The director and the admin token come from --director / --token-file,
/// else the TEMPEST_DIRECTOR / TEMPEST_ADMIN_TOKEN environment variables,
/// else ./Cluster.toml (or the file --cluster names; its admin_token_file),
/// else the .tempest/Cluster.toml of a running `tempest dev`; the director
/// defaults to http://127.0.0.1:7300.
#[derive(Parser, Debug)]
#[command(
    name = "tempest",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// The director's URL, https://HOST:PORT or (loopback) http://HOST:PORT [env: TEMPEST_DIRECTOR].
    #[arg(long, global = true, value_name = "URL")]
    director: Option<String>,
    /// A file holding the admin token [env: TEMPEST_ADMIN_TOKEN].
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Deprecated: the token itself, which every user of the machine can
    /// read on the command line. Use --token-file or TEMPEST_ADMIN_TOKEN.
    #[arg(long, global = true, value_name = "TOKEN", hide = true)]
    token: Option<String>,
    /// The Cluster.toml to read the director and token from [default: ./Cluster.toml].
    #[arg(long, global = true, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// The cluster CA's certificate, to check an https:// director with
    /// [env: TEMPEST_CA; default: the Cluster.toml's tls_ca_file].
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print JSON for scripts (on stdout) instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a topology crate that builds and passes its tests.
    ///
    /// Cargo.toml, src/main.rs with a working pipeline and its tests on the
    /// test runtime, Topology.toml and a README.
    New(NewArgs),
    /// Add a task or a source to the topology crate here.
    #[command(subcommand)]
    Generate(GenerateCommand),
    /// Build the crate here into the package archive the director accepts.
    ///
    /// Checks Topology.toml first (every problem with its line and key),
    /// builds in release mode, checks the pipeline by running the binary, and
    /// writes <target dir>/tempest/NAME-VERSION.tar.gz.
    Package(PackageArgs),
    /// Upload a package and start it as a topology.
    ///
    /// The package is ARCHIVE, or the crate at --path (default: here),
    /// packaged first.
    Deploy(DeployArgs),
    /// List the deployed topologies.
    List,
    /// Show a topology's state, figures per task, and processes.
    Status {
        /// The topology.
        name: String,
    },
    /// Stop a topology's processes; it stays deployed.
    Stop {
        /// The topology.
        name: String,
    },
    /// Start a stopped topology.
    Start {
        /// The topology.
        name: String,
    },
    /// Stop a topology's processes and forget it.
    Kill {
        /// The topology.
        name: String,
    },
    /// Change the worker counts of some of a topology's tasks.
    Rebalance {
        /// The topology.
        name: String,
        /// A task's new worker count (repeat for several tasks).
        #[arg(long = "workers", value_name = "TASK=N", required = true, value_parser = ops::parse_task_count)]
        workers: Vec<(String, u32)>,
    },
    /// Print a topology's process logs (the topology server's by default).
    Logs(LogsArgs),
    /// List the agents and their nodes.
    Agents,
    /// List the packages stored on the director.
    Packages,
    /// Set up a cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Start the director with ./Cluster.toml.
    ///
    /// Runs tempest-director (next to tempest, else on the PATH) with
    /// --config Cluster.toml when the file is there; every argument is
    /// passed to it (--help shows its own).
    #[command(disable_help_flag = true)]
    Director(DaemonArgs),
    /// Start an agent with ./Cluster.toml.
    ///
    /// Runs tempest-agent (next to tempest, else on the PATH) with --config
    /// Cluster.toml when the file is there; every argument is passed to it
    /// (--help shows its own).
    #[command(disable_help_flag = true)]
    Agent(DaemonArgs),
    /// Run a local cluster with word count on it; Ctrl-C stops it.
    ///
    /// A director and an agent on loopback, their state in ./.tempest, word
    /// count deployed reading a directory that keeps growing, the dashboard's
    /// URL printed. Ctrl-C kills the topology, stops the agent, then the
    /// director.
    Dev(dev::DevArgs),
    /// Print a shell completion script.
    ///
    /// For bash: `source <(tempest completions bash)`; zsh and fish (and
    /// elvish, powershell) likewise.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
struct NewArgs {
    /// The crate's (and the topology's) name; the directory it is created in
    /// unless --path says otherwise.
    name: String,
    /// The source the topology reads.
    #[arg(long, value_enum, default_value_t = scaffold::SourceKind::Memory)]
    source: scaffold::SourceKind,
    /// The directory to create (default: ./NAME). It must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    path: Option<PathBuf>,
    /// The Tempest checkout to depend on by path [default: the one this CLI
    /// was built from, when it is still there; else the crates.io version].
    #[arg(long, value_name = "DIR")]
    tempest_path: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum GenerateCommand {
    /// Add a task: src/NAME.rs with a skeleton and its test, added to the
    /// pipeline after the last task (or --after) and to Topology.toml.
    Task {
        /// The task's name (letters, digits, `_`).
        name: String,
        /// The task whose output it handles [default: the last task of the pipeline].
        #[arg(long, value_name = "TASK")]
        after: Option<String>,
        /// The crate's directory.
        #[arg(long, value_name = "DIR", default_value = ".")]
        path: PathBuf,
    },
    /// Add a source: src/NAME.rs with a skeleton and its test, registered
    /// as a source kind that Topology.toml selects with [source] kind = "NAME".
    Source {
        /// The source's name (letters, digits, `_`).
        name: String,
        /// The crate's directory.
        #[arg(long, value_name = "DIR", default_value = ".")]
        path: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct BuildArgs {
    /// The crate's directory.
    #[arg(long, value_name = "DIR", default_value = ".")]
    path: PathBuf,
    /// Build with the dev profile instead of release (quicker, slower code).
    #[arg(long, conflicts_with = "profile")]
    debug: bool,
    /// Build with this cargo profile instead of release.
    #[arg(long, value_name = "PROFILE")]
    profile: Option<String>,
    /// The binary to package, when the crate has several.
    #[arg(long, value_name = "NAME")]
    bin: Option<String>,
}

impl BuildArgs {
    fn options(&self, out: Option<PathBuf>) -> package::Options {
        package::Options {
            path: self.path.clone(),
            profile: match (&self.profile, self.debug) {
                (Some(p), _) => package::Profile::Named(p.clone()),
                (None, true) => package::Profile::Dev,
                (None, false) => package::Profile::Release,
            },
            bin: self.bin.clone(),
            out,
        }
    }
}

#[derive(Args, Debug)]
struct PackageArgs {
    #[command(flatten)]
    build: BuildArgs,
    /// Where to write the archive [default: <target dir>/tempest/NAME-VERSION.tar.gz].
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DeployArgs {
    /// A package archive (from `tempest package`); without it the crate at
    /// --path is packaged first.
    archive: Option<PathBuf>,
    #[command(flatten)]
    build: BuildArgs,
    /// The topology's name in the cluster [default: the package's name].
    #[arg(long)]
    name: Option<String>,
    /// A Topology.toml laid over the package's own.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one Topology.toml key, e.g. max_pending=1000 or
    /// source.config.path=/data (repeatable; over --config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A task's worker count (repeatable), over the package's Topology.toml.
    #[arg(long = "workers", value_name = "TASK=N", value_parser = ops::parse_task_count)]
    workers: Vec<(String, u32)>,
    /// An environment variable for every process of the topology, e.g.
    /// WORDCOUNT_REDIS=redis://redis:6379 (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = ops::parse_env_var)]
    env: Vec<(String, String)>,
    /// Wait until every process runs (2 minutes at most).
    #[arg(long)]
    wait: bool,
}

#[derive(Args, Debug)]
struct LogsArgs {
    /// The topology.
    name: String,
    /// The workers of this task instead of the topology server.
    #[arg(long, value_name = "TASK", conflicts_with_all = ["process", "all"])]
    task: Option<String>,
    /// Only this instance of --task.
    #[arg(long, requires = "task")]
    instance: Option<u32>,
    /// One process by id: server, count/0, ...
    #[arg(long, value_name = "ID", conflicts_with = "all")]
    process: Option<String>,
    /// Every process of the topology.
    #[arg(long)]
    all: bool,
    /// Which output: stdout, stderr or both.
    #[arg(long, default_value = "both", value_parser = ["stdout", "stderr", "both"])]
    stream: String,
    /// The last lines of each log to print.
    #[arg(long, short = 'n', default_value_t = 100)]
    lines: u32,
    /// Keep printing new lines (polls every second) until Ctrl-C.
    #[arg(long, short)]
    follow: bool,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Write a commented Cluster.toml (refuses to overwrite one) and new
    /// random admin, viewer and agent token files beside it (mode 0600).
    Init(cluster::InitArgs),
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Arguments for the daemon (--help shows its own).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error: each problem on its own line, then the summary; any
/// other error on one line.
fn report(e: &anyhow::Error) {
    if let Some(p) = e.downcast_ref::<Problems>() {
        for l in &p.lines {
            eprintln!("error: {l}");
        }
        eprintln!("error: {}", p.summary);
        return;
    }
    let text = format!("{e:#}");
    let one: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!("error: {}", one.join("; "));
}

/// Writes to standard output (see [`outln!`]).
pub fn write_out(args: std::fmt::Arguments<'_>, newline: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    if newline {
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Whether the error is a write to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn conn(g: &Global) -> client::ConnArgs {
    client::ConnArgs {
        director: g.director.clone(),
        token_file: g.token_file.clone(),
        token: g.token.clone(),
        cluster: g.cluster.clone(),
        ca: g.ca.clone(),
    }
}

fn director_client(g: &Global) -> Result<client::Client> {
    client::Client::new(client::Target::resolve(&conn(g))?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    let json = g.json;
    match cli.command {
        Command::New(a) => scaffold::new_crate(&scaffold::NewOptions {
            name: a.name,
            source: a.source,
            path: a.path,
            tempest_path: a.tempest_path,
        })?,
        Command::Generate(GenerateCommand::Task { name, after, path }) => {
            scaffold::generate_task(&path, &name, after.as_deref())?
        }
        Command::Generate(GenerateCommand::Source { name, path }) => {
            scaffold::generate_source(&path, &name)?
        }
        Command::Package(a) => {
            let packaged = package::package(&a.build.options(a.out))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&packaged.to_json())?);
            }
        }
        Command::Deploy(a) => {
            let client = director_client(g)?;
            ops::deploy(
                &client,
                &ops::DeployArgs {
                    archive: a.archive,
                    package: a.build.options(None),
                    name: a.name,
                    config: a.config,
                    set: a.set,
                    workers: a.workers,
                    env: a.env,
                    wait: a.wait,
                },
                json,
            )?
        }
        Command::List => ops::list(&director_client(g)?, json)?,
        Command::Status { name } => ops::status(&director_client(g)?, &name, json)?,
        Command::Stop { name } => {
            ops::lifecycle(&director_client(g)?, &name, ops::Lifecycle::Stop, json)?
        }
        Command::Start { name } => {
            ops::lifecycle(&director_client(g)?, &name, ops::Lifecycle::Start, json)?
        }
        Command::Kill { name } => {
            ops::lifecycle(&director_client(g)?, &name, ops::Lifecycle::Kill, json)?
        }
        Command::Rebalance { name, workers } => {
            ops::rebalance(&director_client(g)?, &name, &workers, json)?
        }
        Command::Logs(a) => ops::logs(
            &director_client(g)?,
            &ops::LogsArgs {
                name: a.name,
                task: a.task,
                instance: a.instance,
                process: a.process,
                all: a.all,
                stream: a.stream,
                lines: a.lines,
                follow: a.follow,
            },
            json,
        )?,
        Command::Agents => ops::agents(&director_client(g)?, json)?,
        Command::Packages => ops::packages(&director_client(g)?, json)?,
        Command::Cluster(ClusterCommand::Init(a)) => {
            let admin = client::Target::flag_token(&conn(g))?;
            cluster::init(&a, admin)?
        }
        Command::Director(a) => {
            return cluster::exec_daemon(cluster::Daemon::Director, &conn(g), a.args)
        }
        Command::Agent(a) => return cluster::exec_daemon(cluster::Daemon::Agent, &conn(g), a.args),
        Command::Dev(a) => return dev::run(&a),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tempest", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn daemon_arguments_pass_through() {
        let cli = Cli::try_parse_from(["tempest", "director", "--listen", "0.0.0.0:1", "--help"])
            .unwrap();
        let Command::Director(a) = cli.command else {
            panic!("not director");
        };
        assert_eq!(a.args, ["--listen", "0.0.0.0:1", "--help"]);
    }
}
