//! What the process tests of the word count share: the `wordcount` binary
//! started with a clean environment and its output captured, bounded waits,
//! a run of several processes killed when dropped, the server's and the
//! summary's lines parsed, and Storm's sentences with their counts.
//!
//! Each test binary compiles this module on its own and uses a part of it.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wordcount::{OUTPUT_ENV, REDIS_ENV, REDIS_HASH_ENV};

pub const BIN: &str = env!("CARGO_BIN_EXE_wordcount");

// ------------------------------------------------------------ expectations

/// Storm's word count sentences (6, 8, 6, 6 and 6 words).
pub const SENTENCES: [&str; 5] = [
    "the cow jumped over the moon",
    "an apple a day keeps the doctor away",
    "four score and seven years ago",
    "snow white and the seven dwarfs",
    "i am at two with nature",
];

/// The words of a sentence, independently of the example: split on ASCII
/// whitespace, trim what is not ASCII alphanumeric, lowercase ASCII.
pub fn words(sentence: &str) -> impl Iterator<Item = String> + '_ {
    sentence
        .split(|c: char| c.is_ascii_whitespace())
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
}

/// The sentence sent `i`-th: [`SENTENCES`] cycled.
pub fn sentence(i: u64) -> &'static str {
    SENTENCES[(i % SENTENCES.len() as u64) as usize]
}

/// The totals of `sentences[i % len]` for `i` in `0..n`: what a source
/// cycling `sentences` has sent when it has sent `n` messages.
pub fn cycled_counts(sentences: &[&str], n: u64) -> HashMap<String, u64> {
    let len = sentences.len() as u64;
    let mut counts = HashMap::new();
    for (i, s) in sentences.iter().enumerate() {
        // Sentence i is sent at i, i + len, i + 2 len, ... below n.
        let times = n / len + u64::from((i as u64) < n % len);
        for w in words(s) {
            *counts.entry(w).or_insert(0) += times;
        }
    }
    counts
}

// ------------------------------------------------------------------ lines

/// The prefix of the line a topology server prints once it listens.
pub const LISTENING: &str = "tempest topology server for `wordcount` listening on ";

/// The address of the `listening on ADDR` line of `stdout`, if printed.
pub fn listening_addr(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(LISTENING))
        .map(|a| a.trim().to_owned())
}

/// The port of an address `HOST:PORT`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// The summary lines (`wordcount: ... roots acked, ...`) of `stdout`.
pub fn summary_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("wordcount: "))
        .collect()
}

/// The one summary line of `stdout`.
#[track_caller]
pub fn summary(stdout: &str) -> &str {
    let lines = summary_lines(stdout);
    assert_eq!(lines.len(), 1, "one summary line expected:\n{stdout}");
    lines[0]
}

/// A `wordcount: N roots acked, F failed, D dead-lettered in ...` line.
#[derive(Debug)]
pub struct Summary {
    pub line: String,
    pub acked: u64,
    pub dead_lettered: u64,
}

impl Summary {
    pub fn parse(line: &str) -> Option<Summary> {
        let rest = line.strip_prefix("wordcount: ")?;
        let (acked, rest) = rest.split_once(" roots acked, ")?;
        let (_failed, rest) = rest.split_once(" failed, ")?;
        let (dead, _) = rest.split_once(" dead-lettered")?;
        Some(Summary {
            line: line.to_owned(),
            acked: acked.parse().ok()?,
            dead_lettered: dead.parse().ok()?,
        })
    }
}

/// The number of roots acked that a summary line reports.
#[track_caller]
pub fn acked_in(summary: &str) -> u64 {
    summary
        .strip_prefix("wordcount: ")
        .and_then(|s| s.split_once(" roots acked"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no acked count in {summary:?}"))
}

// -------------------------------------------------------------- processes

/// Writes `text` as the file `name` in `dir`.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    path
}

/// Writes `text` as `Topology.toml` in `dir`.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    write_file(dir, "Topology.toml", text)
}

/// `wordcount <args>` with stdout and stderr piped, and none of the
/// variables it reads from its environment set (the log level, the token,
/// where the output task writes).
pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("TEMPEST_LOG_LEVEL")
        .env_remove("TEMPEST_TOKEN")
        .env_remove("TEMPEST_DATA_SECRET")
        .env_remove("TEMPEST_DATA_TLS_CERT")
        .env_remove("TEMPEST_DATA_TLS_KEY")
        .env_remove("TEMPEST_DATA_TLS_CA")
        .env_remove(OUTPUT_ENV)
        .env_remove(REDIS_ENV)
        .env_remove(REDIS_HASH_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `wordcount --log-level info <args>`, as [`command`].
pub fn command_info<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = command(&["--log-level", "info"]);
    cmd.args(args);
    cmd
}

/// The arguments of `wordcount task`: a worker of `task`, claiming
/// `instance`, of the server at `addr`, over `config`; then `extra`.
pub fn task_args(
    task: &str,
    instance: &str,
    addr: &str,
    config: &str,
    extra: &[&str],
) -> Vec<String> {
    let args = [
        "task",
        "--name",
        task,
        "--topology-addr",
        addr,
        "--instance",
        instance,
        "--config",
        config,
    ];
    args.iter().chain(extra).map(|&a| a.to_owned()).collect()
}

/// Waits for `child` at most `limit`; past it, kills it and fails the test.
#[track_caller]
pub fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for wordcount") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: wordcount did not exit within {limit:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child's stream, read to its end by a thread.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn read_from(r: impl Read + Send + 'static) -> (Self, JoinHandle<()>) {
        let captured = Captured::default();
        let text = captured.0.clone();
        let reader = std::thread::spawn(move || {
            let mut r = r;
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => text.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        (captured, reader)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }
}

/// One `wordcount` process, its stdout and stderr read by threads. Dropping
/// it kills (SIGKILL) and reaps it if it still runs, so a failing test
/// leaves none behind.
pub struct Proc {
    /// What the test calls it (`server`, `split/0`, `output/0 (#2)`, ...).
    pub label: String,
    pub child: Child,
    /// Its exit status, once reaped.
    pub status: Option<ExitStatus>,
    /// Set when the test signals it or waits for it to exit: its exit is
    /// then no failure (see [`Run::wait_until`]).
    pub stopping: bool,
    pub stdout: Captured,
    pub stderr: Captured,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proc {
    /// Starts `cmd` (see [`command`]), capturing what it pipes.
    pub fn spawn(label: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label}: {e}"));
        let mut readers = Vec::new();
        let mut capture = |r: Option<Box<dyn Read + Send>>| match r {
            Some(r) => {
                let (captured, reader) = Captured::read_from(r);
                readers.push(reader);
                captured
            }
            None => Captured::default(),
        };
        let stdout = capture(child.stdout.take().map(|r| Box::new(r) as _));
        let stderr = capture(child.stderr.take().map(|r| Box::new(r) as _));
        Proc {
            label: label.to_owned(),
            child,
            status: None,
            stopping: false,
            stdout,
            stderr,
            readers,
        }
    }

    /// Its exit status if it has exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waiting for wordcount");
        }
        self.status
    }

    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Sends `sig`; it must not have been reaped yet (its pid is still its).
    #[cfg(unix)]
    #[track_caller]
    pub fn signal(&mut self, sig: libc::c_int) {
        assert!(
            self.exited().is_none(),
            "{} exited before it could be signalled",
            self.label
        );
        self.stopping = true;
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits in pid_t");
        // SAFETY: kill(2) with a valid signal number has no memory effects;
        // the child is ours and not yet reaped, so the pid is still its.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for it to exit at most `limit`; past it, kills it and fails
    /// the test.
    #[track_caller]
    pub fn wait_bounded(&mut self, limit: Duration) -> ExitStatus {
        self.stopping = true;
        let status = wait_bounded(&mut self.child, limit, &self.label);
        self.status = Some(status);
        status
    }

    /// Its whole stdout and stderr; it must have exited.
    #[track_caller]
    pub fn output(&mut self) -> (String, String) {
        assert!(self.status.is_some(), "{} is still running", self.label);
        // The pipes close when the process exits (they are not inherited by
        // any other child), so the readers end.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (self.stdout.text(), self.stderr.text())
    }

    /// Waits at most `limit` until it prints a line starting with `prefix`;
    /// returns the rest of the line, trimmed. Fails the test if it exits
    /// first.
    #[track_caller]
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let stdout = self.stdout.text();
            if let Some(rest) = stdout.lines().find_map(|l| l.strip_prefix(prefix)) {
                return rest.trim().to_owned();
            }
            if self.exited().is_some() {
                let _ = self.output();
                panic!(
                    "{} exited before printing {prefix:?}:\n{}\n{}",
                    self.label,
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{}: no {prefix:?} line within {limit:?}:\n{stdout}\n{}",
                    self.label,
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `limit` for it to exit 0; returns its stdout.
    #[track_caller]
    pub fn wait_success(&mut self, limit: Duration) -> String {
        let status = self.wait_bounded(limit);
        let (stdout, stderr) = self.output();
        assert!(
            status.success(),
            "{} failed ({status}):\n{stdout}\n{stderr}",
            self.label
        );
        stdout
    }
}

/// A process of a [`Run`].
#[derive(Clone, Copy, Debug)]
pub struct Id(pub usize);

/// The processes of a test, and a directory for their files. Dropping it
/// kills (SIGKILL) and reaps whatever still runs.
pub struct Run {
    /// Dropped (killed) before the directory is removed.
    pub procs: Vec<Proc>,
    pub dir: tempfile::TempDir,
    /// The bound on waiting for a server to listen or a process to exit.
    pub limit: Duration,
    /// How often a bounded wait looks at its condition again.
    pub poll: Duration,
}

impl Run {
    pub fn new(limit: Duration, poll: Duration) -> Run {
        Run {
            procs: Vec::new(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            limit,
            poll,
        }
    }

    /// Writes `text` to the file `name` of the run's directory.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        write_file(self.dir.path(), name, text)
    }

    pub fn proc(&mut self, id: Id) -> &mut Proc {
        &mut self.procs[id.0]
    }

    /// Starts `wordcount --log-level info <args>`, with `env` set if given.
    pub fn spawn<S: AsRef<OsStr>>(
        &mut self,
        label: &str,
        args: &[S],
        env: Option<(&str, &OsStr)>,
    ) -> Id {
        let mut cmd = command_info(args);
        if let Some((key, value)) = env {
            cmd.env(key, value);
        }
        self.procs.push(Proc::spawn(label, cmd));
        Id(self.procs.len() - 1)
    }

    /// Starts a topology server over `config` on `port` (0: any) and waits
    /// until it listens; returns it and its address.
    #[track_caller]
    pub fn server(&mut self, label: &str, config: &Path, port: u16) -> (Id, String) {
        let args = [
            "topology",
            "--config",
            config.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ];
        let id = self.spawn(label, &args, None);
        self.wait_until(&format!("{label} listens"), self.limit, |r| {
            Ok(r.proc(id).stdout.contains(LISTENING))
        });
        let addr = listening_addr(&self.proc(id).stdout.text()).expect("the listening line");
        (id, addr)
    }

    /// Everything every process printed so far, for a failure message.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            let status = p
                .status
                .map_or_else(|| "running".to_owned(), |s| s.to_string());
            s += &format!(
                "\n===== {} ({status}) stdout:\n{}\n===== {} stderr:\n{}",
                p.label,
                p.stdout.text(),
                p.label,
                p.stderr.text()
            );
        }
        s
    }

    /// Kills every process and fails the test with `why` and their output.
    #[track_caller]
    pub fn fail(&mut self, why: &str) -> ! {
        for p in &mut self.procs {
            if p.exited().is_none() {
                let _ = p.child.kill();
                p.status = p.child.wait().ok();
            }
        }
        panic!("{why}{}", self.dump())
    }

    /// Waits until `cond` holds, at most `limit`; fails the test when `cond`
    /// errs, time is up, or a process exits that the test did not stop or
    /// wait for.
    #[track_caller]
    pub fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&mut Self) -> Result<bool, String>,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            for i in 0..self.procs.len() {
                let p = &mut self.procs[i];
                if let (Some(status), false) = (p.exited(), p.stopping) {
                    let label = p.label.clone();
                    self.fail(&format!("waiting until {what}: {label} exited ({status})"));
                }
            }
            match cond(self) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => self.fail(&format!("waiting until {what}: {e}")),
            }
            if Instant::now() > deadline {
                self.fail(&format!("{what}: not within {limit:?}"));
            }
            std::thread::sleep(self.poll);
        }
    }

    /// Waits until `id` exits; returns its status, stdout and stderr.
    #[track_caller]
    pub fn wait_exit(&mut self, id: Id) -> (ExitStatus, String, String) {
        self.proc(id).stopping = true;
        let what = format!("{} exits", self.proc(id).label);
        self.wait_until(&what, self.limit, |r| Ok(r.proc(id).exited().is_some()));
        let p = self.proc(id);
        let (stdout, stderr) = p.output();
        (p.status.unwrap(), stdout, stderr)
    }

    /// Waits until `id` exits with status 0; returns its stdout and stderr.
    #[track_caller]
    pub fn wait_success(&mut self, id: Id) -> (String, String) {
        let (status, stdout, stderr) = self.wait_exit(id);
        if !status.success() {
            let label = self.proc(id).label.clone();
            self.fail(&format!("{label} failed: {status}"));
        }
        (stdout, stderr)
    }

    /// SIGKILLs `id` and reaps it.
    #[cfg(unix)]
    #[track_caller]
    pub fn kill_9(&mut self, id: Id) {
        use std::os::unix::process::ExitStatusExt;
        self.proc(id).signal(libc::SIGKILL);
        let (status, _, _) = self.wait_exit(id);
        if status.signal() != Some(libc::SIGKILL) {
            self.fail(&format!("killed with SIGKILL: {status}"));
        }
    }

    /// SIGTERMs `id`; it must exit 0. Returns its stdout.
    #[cfg(unix)]
    #[track_caller]
    pub fn stop(&mut self, id: Id) -> String {
        self.proc(id).signal(libc::SIGTERM);
        self.wait_success(id).0
    }

    /// The one summary line of `id`, once it exited 0.
    #[track_caller]
    pub fn summary(&mut self, id: Id) -> String {
        let (stdout, _) = self.wait_success(id);
        match summary_lines(&stdout)[..] {
            [line] => line.to_owned(),
            _ => self.fail("no single summary line"),
        }
    }
}

/// What the counts (a Redis hash, an output file) hold beyond the
/// expected ones.
#[derive(Debug)]
pub struct Duplicates {
    /// Σ (count − expected) over the words.
    pub words: u64,
    /// The fewest sentences handled twice that explain the hash: a sentence
    /// handled once more adds at most 1 to each of its words, so each
    /// sentence was handled again at least as often as the most duplicated
    /// of the words that only it has (every sentence has some).
    pub sentences_at_least: u64,
}

/// Checks the hash against the expected counts: every word counted at
/// least as often as it occurs (zero lost) and no other word. Returns the
/// duplicates, or every problem found.
pub fn check_counts(
    counts: &HashMap<String, u64>,
    expected: &HashMap<String, u64>,
) -> Result<Duplicates, String> {
    let mut problems = Vec::new();
    let mut dup = HashMap::new();
    for (w, &e) in expected {
        let got = counts.get(w).copied().unwrap_or(0);
        if got < e {
            problems.push(format!("`{w}`: {got} of {e} counted, {} lost", e - got));
        } else {
            dup.insert(w.as_str(), got - e);
        }
    }
    for w in counts.keys() {
        if !expected.contains_key(w) {
            problems.push(format!("`{w}`: not a word of the input"));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(problems.join("\n"));
    }
    let mut sentences_at_least = 0;
    for (i, s) in SENTENCES.iter().enumerate() {
        let others: HashSet<String> = SENTENCES
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .flat_map(|(_, o)| words(o))
            .collect();
        let own: Vec<String> = words(s).filter(|w| !others.contains(w)).collect();
        assert!(!own.is_empty(), "{s:?} has no word of its own");
        sentences_at_least += own.iter().map(|w| dup[w.as_str()]).max().unwrap_or(0);
    }
    Ok(Duplicates {
        words: dup.values().sum(),
        sentences_at_least,
    })
}
