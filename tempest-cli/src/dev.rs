//! `tempest dev`: a whole cluster on this machine, for trying Tempest and
//! for developing against it.
//!
//! It builds the director, the agent and the word count example from the
//! source checkout (in this CLI's own profile), keeps every state under
//! `./.tempest/` (the director's and agent's data, their logs, the input
//! directory of word count's durable file source, and the `Cluster.toml`
//! both daemons run with), starts both daemons on loopback, deploys word
//! count reading `.tempest/input/` while a feeder appends sentences to it,
//! and prints the dashboard's URL. Ctrl-C (or SIGTERM) kills the topology,
//! then stops the agent, then the director, and exits 0. A second Ctrl-C
//! kills everything at once.
//!
//! The daemons run in their own process group (a terminal's Ctrl-C reaches
//! only this process, which stops them in order) and get SIGTERM if this
//! process dies. Word count is packaged as a launcher of the binary just
//! built (the agent runs on this machine): a debug build of it is some
//! 170 MB, which would otherwise be compressed, uploaded and unpacked on
//! every start. `tempest package` packages binaries themselves.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tempest_control::{Manifest, Secret};

use crate::client::{Client, Origin, Target};
use crate::ops;
use crate::package::{self, Profile};
use crate::progress::Step;

/// A line on standard output; a closed stdout does not stop the cluster
/// from being stopped cleanly.
macro_rules! say {
    ($($arg:tt)*) => {
        let _ = $crate::write_out(format_args!($($arg)*), true);
    };
}

/// Where `tempest dev` keeps its state, under the current directory.
pub const STATE_DIR: &str = ".tempest";

/// The checkout this CLI was built from.
const CHECKOUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The sentences the feeder appends, cycled.
const SENTENCES: &str = include_str!("../../examples/wordcount/data/sentences.txt");

/// Word count's worker counts.
const WORDCOUNT_TOML: &str = "# Word count, as `tempest dev` deploys it.\n\n\
    [tasks.split]\nworkers = 1\n\n[tasks.count]\nworkers = 2\n\n[tasks.output]\nworkers = 1\n";

/// Lines per input file before the feeder starts the next one.
const LINES_PER_FILE: u64 = 100_000;

/// How long a daemon has to print its address, and the topology to start.
const START_WAIT: Duration = Duration::from_secs(60);

/// What `tempest dev` was asked.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// The director's port on 127.0.0.1 (another free one when it is taken).
    #[arg(long, default_value_t = 7300)]
    port: u16,
    /// Sentences the feeder appends to the input per second (0: none).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Build nothing: use the tempest-director, tempest-agent and wordcount
    /// binaries next to this executable (or on the PATH).
    #[arg(long)]
    no_build: bool,
}

/// A daemon started by `tempest dev`: stopped (SIGTERM, then SIGKILL) when
/// dropped, so an error half-way leaves nothing running.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
    addr: String,
}

impl Daemon {
    /// Starts `bin --config cluster_toml` and waits for its
    /// `listening on http://ADDR` line. Its stdout and stderr go to `log`.
    fn start(name: &'static str, bin: &Path, cluster_toml: &Path, log: PathBuf) -> Result<Daemon> {
        let err_log =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut out_log = err_log
            .try_clone()
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(bin);
        // The daemons take their tokens from the files the Cluster.toml
        // names; a token in this environment (another cluster's) would win.
        for var in tempest_control::credentials::CREDENTIAL_ENVS {
            cmd.env_remove(var);
        }
        cmd.arg("--config")
            .arg(cluster_toml)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err_log);
        detach(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("the daemon's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = writeln!(out_log, "{line}");
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut daemon = Daemon {
            name,
            child,
            log,
            addr: String::new(),
        };
        let deadline = Instant::now() + START_WAIT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => {
                    daemon.addr = addr;
                    return Ok(daemon);
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = daemon.child.try_wait() {
                        bail!(
                            "the {name} exited ({status}) before listening: {}",
                            daemon.log_tail()
                        );
                    }
                }
                Err(_) => bail!(
                    "the {name} did not start within {}s: {}",
                    START_WAIT.as_secs(),
                    daemon.log_tail()
                ),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, on one line.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        format!("{} (see {})", tail, self.log.display())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace` (at once on a second Ctrl-C).
    fn stop(&mut self, grace: Duration, signals: Option<&Receiver<()>>) {
        if self.exited().is_some() {
            return;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            if signals.is_some_and(|rx| rx.try_recv().is_ok()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10), None);
    }
}

/// Its own process group (so a terminal's Ctrl-C reaches only `tempest
/// dev`), and SIGTERM when `tempest dev` dies.
fn detach(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of
        // the parent; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
}

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on the pid of a child of this process (or one
        // found by its agent's mark in /proc).
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Ctrl-C and SIGTERM as messages on a channel, from the moment this
/// returns.
fn signals() -> Result<Receiver<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal handler")?;
    let mut signals = rt.block_on(async { tempest_core::shutdown::Signals::install() });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                signals.recv().await;
                if tx.send(()).is_err() {
                    break;
                }
            }
        })
    });
    Ok(rx)
}

/// A free port on 127.0.0.1: `preferred` when it is free.
fn free_port(preferred: u16) -> Result<u16> {
    if preferred != 0 && TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("a bound address")?.port())
}

/// A block of 50 free ports for the agent's processes.
fn free_port_range() -> Result<String> {
    for first in (7500..=9950u16).step_by(50) {
        if (first..first + 50).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(format!("{first}-{}", first + 49));
        }
    }
    bail!("no 50 free ports between 7500 and 9999 on 127.0.0.1 for the agent's processes")
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
        .and_then(|mut f| {
            // Whoever made it before: its owner's alone.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(text.as_bytes())
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// Fails when a `tempest dev` already runs in this directory: its
/// Cluster.toml is there and its director answers.
fn refuse_a_second_dev() -> Result<()> {
    let file = Path::new(STATE_DIR).join("Cluster.toml");
    let Ok(from) = crate::client::read_cluster_toml(&file) else {
        return Ok(());
    };
    let Some(url) = from.url else {
        return Ok(());
    };
    let addr = url.trim_start_matches("http://");
    let answers = addr.parse::<std::net::SocketAddr>().ok().is_some_and(|a| {
        std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok()
    });
    if answers {
        bail!("a tempest dev already runs in this directory (its director answers at {url}); stop it first");
    }
    Ok(())
}

/// The cluster's binaries: built from the checkout, or found beside this
/// executable.
fn binaries(no_build: bool) -> Result<[PathBuf; 3]> {
    let names = ["tempest-director", "tempest-agent", "wordcount"];
    if no_build {
        return Ok([
            crate::cluster::find_binary(names[0])?,
            crate::cluster::find_binary(names[1])?,
            crate::cluster::find_binary(names[2])?,
        ]);
    }
    let checkout = Path::new(CHECKOUT);
    if !checkout
        .join("tempest-director")
        .join("Cargo.toml")
        .is_file()
    {
        bail!(
            "tempest dev builds the director, the agent and word count from the Tempest checkout \
             it was built from ({}), which is not there; run it from a checkout \
             (`cargo run -p tempest-cli -- dev`), or pass --no-build to use the binaries next to tempest",
            checkout.display()
        );
    }
    let profile = if cfg!(debug_assertions) {
        Profile::Dev
    } else {
        Profile::Release
    };
    let paths = package::cargo_build(
        checkout,
        &names,
        &names,
        &profile,
        "the director, the agent and word count",
    )?;
    match <[PathBuf; 3]>::try_from(paths) {
        Ok(p) => Ok(p),
        Err(_) => bail!("cargo build did not report the three binaries"),
    }
}

/// Appends sentences to the newest input file at `rate` per second until
/// `stop`; starts a new file every [`LINES_PER_FILE`] lines.
fn feed(dir: PathBuf, rate: f64, stop: Arc<AtomicBool>) {
    let sentences: Vec<&str> = SENTENCES.lines().filter(|l| !l.trim().is_empty()).collect();
    if rate <= 0.0 || sentences.is_empty() {
        return;
    }
    let mut file_no = newest_input(&dir).map(|(n, _)| n).unwrap_or(1);
    let mut in_file = newest_input(&dir).map(|(_, lines)| lines).unwrap_or(0);
    let started = Instant::now();
    let mut written: u64 = 0;
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if due <= written {
            continue;
        }
        if in_file >= LINES_PER_FILE {
            file_no += 1;
            in_file = 0;
        }
        let path = dir.join(input_name(file_no));
        let mut text = String::new();
        let n = (due - written).min(LINES_PER_FILE - in_file);
        for _ in 0..n {
            text.push_str(sentences[next % sentences.len()]);
            text.push('\n');
            next += 1;
        }
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = appended {
            eprintln!(
                "tempest dev: appending to {}: {e}; the feeder stops",
                path.display()
            );
            return;
        }
        written += n;
        in_file += n;
    }
}

fn input_name(n: u64) -> String {
    format!("sentences-{n:06}.txt")
}

/// The newest input file's number and line count.
fn newest_input(dir: &Path) -> Option<(u64, u64)> {
    let n = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            name.strip_prefix("sentences-")?
                .strip_suffix(".txt")?
                .parse::<u64>()
                .ok()
        })
        .max()?;
    let lines = std::fs::read(dir.join(input_name(n)))
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0);
    Some((n, lines))
}

/// Live processes started by the agent whose data directory is `dir`
/// (they carry `TEMPEST_AGENT_DIR=<dir>` in their environment).
fn agent_processes(dir: &Path) -> Vec<u32> {
    let mark = format!("TEMPEST_AGENT_DIR={}", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            if !env.split(|b| *b == 0).any(|v| v == mark.as_bytes()) {
                return None;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .to_owned();
            (state != "Z" && state != "X").then_some(pid)
        })
        .collect()
}

/// `tempest dev`.
pub fn run(args: &DevArgs) -> Result<ExitCode> {
    let signals = signals()?;
    let bins = binaries(args.no_build)?;
    let [director_bin, agent_bin, wordcount_bin] = &bins;

    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    refuse_a_second_dev()?;
    // git (in a checkout, say) ignores the whole state directory.
    let ignore = Path::new(STATE_DIR).join(".gitignore");
    if !ignore.exists() {
        std::fs::write(&ignore, "*\n").with_context(|| format!("writing {}", ignore.display()))?;
    }
    let state = Path::new(STATE_DIR)
        .canonicalize()
        .with_context(|| STATE_DIR.to_string())?;
    let input = state.join("input");
    std::fs::create_dir_all(&input).with_context(|| format!("creating {}", input.display()))?;
    if newest_input(&input).is_none() {
        std::fs::write(input.join(input_name(1)), SENTENCES)
            .with_context(|| format!("writing {}", input.display()))?;
    }

    let port = free_port(args.port)?;
    if port != args.port {
        eprintln!(
            "port {} is taken: the director listens on {port}",
            args.port
        );
    }
    let url = format!("http://127.0.0.1:{port}");
    // New tokens every run, in files only this user can read (never on a
    // command line), removed at the end with the Cluster.toml naming them.
    let token = Secret::generate()?;
    let agent_token = Secret::generate()?;
    let admin_file = state.join("admin.token");
    let agent_file = state.join("agent.token");
    write_private(&admin_file, &format!("{}\n", token.expose()))?;
    let _admin_file = RemoveOnDrop(admin_file.clone());
    write_private(&agent_file, &format!("{}\n", agent_token.expose()))?;
    let _agent_file = RemoveOnDrop(agent_file);
    let cluster_toml = state.join("Cluster.toml");
    write_private(
        &cluster_toml,
        &format!(
            "# Written by `tempest dev` for its local cluster, removed when it stops.\n\
             # The tempest commands run in the directory above find the cluster here.\n\n\
             [director]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"director\"\n\
             admin_token_file = \"admin.token\"\nagent_token_file = \"agent.token\"\n\
             agent_timeout = \"5s\"\nmetrics_interval = \"1s\"\n\n\
             [agent]\nlisten = \"127.0.0.1:0\"\ndirector = \"{url}\"\ndata_dir = \"agent\"\n\
             port_range = \"{}\"\ntoken_file = \"agent.token\"\nheartbeat_interval = \"500ms\"\n\
             stop_grace = \"5s\"\n",
            free_port_range()?
        ),
    )?;
    // Removed at the end, whatever happens.
    let _cluster_file = RemoveOnDrop(cluster_toml.clone());

    let step = Step::start("starting the director");
    let started = Daemon::start(
        "director",
        director_bin,
        &cluster_toml,
        state.join("director.log"),
    );
    let mut director = match started {
        Ok(d) => d,
        Err(e) => {
            step.abandon();
            return Err(e);
        }
    };
    step.done(format!("director {url} (pid {})", director.pid()));
    let step = Step::start("starting the agent");
    let started = Daemon::start("agent", agent_bin, &cluster_toml, state.join("agent.log"));
    let mut agent = match started {
        Ok(a) => a,
        Err(e) => {
            step.abandon();
            return Err(e);
        }
    };
    let agent_dir = state.join("agent");
    step.done(format!("agent {} (pid {})", agent.addr, agent.pid()));

    let client = Client::new(Target {
        url: url.clone(),
        url_origin: Origin::File(cluster_toml.clone()),
        token: Some(token.clone()),
        token_origin: Some(Origin::File(cluster_toml.clone())),
        ca: None,
    })?;
    let started = deploy(
        &client,
        &agent.addr,
        wordcount_bin,
        &state,
        &input,
        &signals,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = match started {
        Ok(true) => {
            let (dir, rate, stop) = (input.clone(), args.rate, stop.clone());
            Some(std::thread::spawn(move || feed(dir, rate, stop)))
        }
        // Interrupted while starting.
        Ok(false) => None,
        Err(e) => {
            shutdown(&client, &mut agent, &mut director, &agent_dir, &signals);
            return Err(e);
        }
    };

    let mut failure = None;
    if feeder.is_some() {
        let rel = |p: &Path| {
            p.strip_prefix(std::env::current_dir().unwrap_or_default())
                .map(Path::to_path_buf)
                .unwrap_or_else(|_| p.to_path_buf())
        };
        say!("");
        say!(
            "tempest dev: a local cluster, its state in {}",
            rel(&state).display()
        );
        say!(
            "  director   {url}  (pid {}, log {})",
            director.pid(),
            rel(&director.log).display()
        );
        say!(
            "  agent      {}  (pid {}, log {})",
            agent.addr,
            agent.pid(),
            rel(&agent.log).display()
        );
        say!(
            "  wordcount  reading {}/ (+{} sentences/s)",
            rel(&input).display(),
            args.rate
        );
        say!("");
        // A single-use login link, so the dashboard opens without pasting a
        // token; later sessions log in with the admin token's file.
        let link = client
            .post("/api/v1/sessions/tickets", None)
            .ok()
            .and_then(|v| v["path"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "/".into());
        say!(
            "dashboard: {url}{link}  (opens once, for 10 minutes; after that log in with the admin token in {})",
            rel(&admin_file).display()
        );
        say!("");
        say!(
            "In this directory the tempest commands use this cluster: `tempest status wordcount`, \
             `tempest logs wordcount --follow`. Ctrl-C stops everything."
        );
        let _ = std::io::stdout().flush();
        failure = watch(&client, &mut director, &mut agent, &signals);
    }

    stop.store(true, Ordering::Relaxed);
    if let Some(f) = feeder {
        let _ = f.join();
    }
    shutdown(&client, &mut agent, &mut director, &agent_dir, &signals);
    match failure {
        Some(e) => Err(e),
        None => {
            eprintln!("tempest dev: stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits for the agent to join, packages word count and deploys it on the
/// file source. False when a signal came first.
fn deploy(
    client: &Client,
    agent_addr: &str,
    wordcount_bin: &Path,
    state: &Path,
    input: &Path,
    signals: &Receiver<()>,
) -> Result<bool> {
    let step = Step::start("waiting for the agent to join the director");
    let deadline = Instant::now() + START_WAIT;
    loop {
        if signals.try_recv().is_ok() {
            step.abandon();
            return Ok(false);
        }
        let joined = client.get("/api/v1/agents").ok().is_some_and(|v| {
            v.as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["up"] == json!(true) && x["address"].as_str() == Some(agent_addr))
            })
        });
        if joined {
            step.done("the agent joined the director");
            break;
        }
        if Instant::now() >= deadline {
            step.abandon();
            bail!(
                "the agent did not join the director within {}s",
                START_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let step = Step::start("packaging word count");
    let launcher = state.join("wordcount");
    let script = format!(
        "#!/bin/sh\n# The word count binary `tempest dev` built, run in place.\nexec '{}' \"$@\"\n",
        wordcount_bin.display().to_string().replace('\'', "'\\''")
    );
    std::fs::write(&launcher, script).with_context(|| format!("writing {}", launcher.display()))?;
    let manifest = Manifest {
        name: "wordcount".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        binary: String::new(),
        sha256: String::new(),
        target: package::host_triple(Path::new(".")).unwrap_or_else(|_| {
            format!(
                "{}-unknown-{}",
                std::env::consts::ARCH,
                std::env::consts::OS
            )
        }),
        tempest_version: env!("CARGO_PKG_VERSION").into(),
    };
    let archive = state.join("packages").join("wordcount.tar.gz");
    let (_, bytes) = package::write_archive(&launcher, Some(WORDCOUNT_TOML), manifest, &archive)?;
    step.done(format!("packaged word count: {}", archive.display()));

    let hash = ops::upload(client, bytes)?;
    // A topology left by a run that did not stop cleanly.
    if client.get("/api/v1/topologies/wordcount").is_ok() {
        client.post("/api/v1/topologies/wordcount/kill", None)?;
    }
    let config = format!(
        "max_pending = 1000\ngrace_period = \"2s\"\n\n[source]\nkind = \"file\"\n\n[source.config]\n\
         path = {}\nfollow = true\n",
        toml::Value::String(input.display().to_string())
    );
    ops::create(
        client,
        &ops::Deployment {
            name: "wordcount",
            package: &hash,
            config: Some(&config),
            workers: &[],
            env: &[],
        },
    )?;
    let started = ops::wait_running(client, "wordcount", START_WAIT, || {
        signals.try_recv().is_ok()
    })?;
    Ok(started.is_some())
}

/// Runs until Ctrl-C (None) or a daemon dies (Some(error)). On a terminal
/// a status line shows word count's figures.
fn watch(
    client: &Client,
    director: &mut Daemon,
    agent: &mut Daemon,
    signals: &Receiver<()>,
) -> Option<anyhow::Error> {
    let bar = crate::progress::tty().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
            bar.set_style(style);
        }
        bar
    });
    let mut last_poll = Instant::now() - Duration::from_secs(10);
    let result = loop {
        match signals.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => break None,
            Err(RecvTimeoutError::Disconnected) => break None,
            Err(RecvTimeoutError::Timeout) => {}
        }
        for d in [&mut *director, &mut *agent] {
            if let Some(status) = d.exited() {
                let name = d.name;
                break_with(&bar);
                return Some(anyhow!("the {name} exited ({status}): {}", d.log_tail()));
            }
        }
        if let Some(bar) = &bar {
            bar.tick();
            if last_poll.elapsed() >= Duration::from_secs(1) {
                last_poll = Instant::now();
                if let Ok(v) = client.get("/api/v1/topologies/wordcount") {
                    bar.set_message(status_line(&v));
                }
            }
        }
    };
    break_with(&bar);
    result
}

fn break_with(bar: &Option<indicatif::ProgressBar>) {
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

fn status_line(v: &Value) -> String {
    format!(
        "wordcount {}: {}/{} processes running, {} sentences acked, {}/s, p99 {}  (Ctrl-C stops)",
        v["phase"].as_str().unwrap_or("?"),
        v["running"].as_u64().unwrap_or(0),
        v["processes"].as_u64().unwrap_or(0),
        crate::table::count(v["acked"].as_u64().unwrap_or(0)),
        crate::table::rate(v["msgs_per_sec"].as_f64().unwrap_or(0.0)),
        crate::table::ms(v["p99_ms"].as_f64()),
    )
}

/// Kills the topology, then stops the agent, then the director; kills
/// whatever the agent started that is still alive. A second Ctrl-C
/// shortens every wait.
fn shutdown(
    client: &Client,
    agent: &mut Daemon,
    director: &mut Daemon,
    agent_dir: &Path,
    signals: &Receiver<()>,
) {
    eprintln!("tempest dev: stopping (Ctrl-C again to kill everything at once)");
    let forced = |s: &Receiver<()>| s.try_recv().is_ok();
    if director.exited().is_none() && agent.exited().is_none() {
        let killed = client
            .post("/api/v1/topologies/wordcount/kill", None)
            .is_ok();
        if killed {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && !agent_processes(agent_dir).is_empty() {
                if forced(signals) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    agent.stop(Duration::from_secs(15), Some(signals));
    for pid in agent_processes(agent_dir) {
        signal(pid, libc::SIGKILL);
    }
    director.stop(Duration::from_secs(10), Some(signals));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feeder_appends_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_input(dir.path()), None);
        std::fs::write(dir.path().join(input_name(3)), "a\nb\n").unwrap();
        std::fs::write(dir.path().join("other.txt"), "x\n").unwrap();
        assert_eq!(newest_input(dir.path()), Some((3, 2)));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dir.path().to_path_buf(), stop.clone());
        let feeder = std::thread::spawn(move || feed(d, 200.0, s));
        let deadline = Instant::now() + Duration::from_secs(30);
        while newest_input(dir.path()).map(|(_, n)| n) < Some(10) {
            assert!(Instant::now() < deadline, "nothing appended");
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        feeder.join().unwrap();
        let text = std::fs::read_to_string(dir.path().join(input_name(3))).unwrap();
        assert!(
            text.starts_with("a\nb\nthe cow jumped over the moon\n"),
            "{text}"
        );
    }
}
