//! Process supervision: start, stop, restart with back-off, adopt after an
//! agent restart, keep logs.
//!
//! # How it behaves
//!
//! * **Converging.** [`Supervisor::converge`] takes the full set of
//!   [`Launch`]es this node should run, keyed by `spec.id`. A new id is
//!   started at once; an id no longer wanted is stopped; an id whose
//!   `Launch` differs in any field (spec, including its generation, program,
//!   args, env, addresses) is replaced: the old process is stopped and the
//!   new one starts as soon as the old one (its whole process group) is
//!   gone, so a replacement never races its predecessor for a port. An
//!   identical `Launch` is left alone, so converging twice to the same set
//!   changes nothing. Duplicate ids in one call: the first wins. `converge`
//!   never waits for a process to stop; stopping runs in the background.
//! * **Stopping.** SIGTERM to the process group, SIGKILL to the group after
//!   [`SupervisorOptions::stop_grace`] if any member is still alive. A
//!   process is stopped when its leader has exited *and* no live member of
//!   its group remains. While stopping its state is
//!   [`ProcessState::Stopping`]; afterwards an unwanted process is removed
//!   from [`Supervisor::statuses`].
//! * **Process groups.** Each process calls `setsid()` before `exec`, so it
//!   leads its own session and process group (pgid = pid) and no terminal
//!   signal of the agent reaches it. Its stdin is `/dev/null`. Its
//!   environment is the agent's without any credential
//!   ([`tempest_control::credentials::CREDENTIAL_ENVS`], and
//!   `TEMPEST_DATA_SECRET`), plus `spec.env`, plus `Launch::env`, plus
//!   [`ENV_AGENT_DIR`], [`ENV_PROCESS_ID`] and [`ENV_GENERATION`]. Its
//!   working directory is the agent's; its umask the one the agent started
//!   with (see [`private_umask`]).
//! * **Logs.** stdout and stderr are the files
//!   `<data_dir>/logs/<safe id>/stdout.log` and `stderr.log`, handed to the
//!   child directly and opened with `O_APPEND`: no pipe runs through the
//!   agent, so a process survives the agent's death (no SIGPIPE) and keeps
//!   logging. Rotation is copy-truncate, checked about every half second
//!   by the supervision loop: a file larger than `log_max_bytes` is copied
//!   to `.1` (older copies shift up to `.log_keep`, the oldest is dropped)
//!   and truncated; the child's next `O_APPEND` write lands at offset 0.
//!   The price: a file may overshoot the limit by what is written between
//!   two checks, and lines written between the copy and the truncation are
//!   lost. `log_max_bytes = 0` disables rotation; `log_keep = 0` truncates
//!   without keeping a copy. The safe id keeps `[A-Za-z0-9-]` (and `.` after
//!   the first byte) and writes every other byte as `_XX`:
//!   `wc/count/1` → `wc_2Fcount_2F1` (see [`Supervisor::log_path`]).
//! * **Supervision loop.** [`Supervisor::open`] starts one OS thread
//!   (`tempest-supervisor`) that ticks every 100 ms (and at once after a
//!   `converge`). It is a thread rather than a tokio task because it makes
//!   blocking system calls (fork/exec, waitpid, file copies for rotation,
//!   fsync of the state file) and so works under any runtime or none; the
//!   caller spawns nothing. It holds only a weak reference: when the last
//!   clone of the [`Supervisor`] is dropped the thread ends and the
//!   processes keep running (that is what an agent's death looks like; the
//!   next [`Supervisor::open`] adopts them). A tick notices exits (`try_wait`
//!   on our own children; for adopted ones, which are not our children,
//!   `/proc/<pid>/stat` must still exist, not be a zombie, and carry the
//!   start time recorded at launch), escalates stops, restarts what is due,
//!   rotates logs and writes the state file when something changed.
//! * **Restarts.** A process that exits on its own (any status) has the
//!   rest of its group SIGKILLed and is restarted after a back-off:
//!   `restart_min`, doubling up to `restart_max`, back to `restart_min`
//!   when the run lasted at least [`RESTART_RESET_AFTER`]. Its state is
//!   [`ProcessState::Backoff`] in between, with `error` saying how it
//!   exited; `restarts` counts successful restarts after an exit. A process
//!   that cannot be started (missing program, not executable, bad env,
//!   unwritable log directory) is [`ProcessState::Failed`] with `error`
//!   set and is retried with the same back-off. A changed `Launch` resets
//!   the back-off, the error and the restart count.
//! * **State file and adoption.** `<data_dir>/processes.json` (temporary
//!   file + fsync + rename) records per id the wanted launch, the running
//!   process (launch, pid, start time from `/proc/<pid>/stat` field 22),
//!   the restart count, and whether the last run exited and why; it is
//!   rewritten after every change, before `converge` returns. `open` reads
//!   it: a recorded process whose pid is
//!   alive with the same start time is adopted (same pid, state Running,
//!   supervised by polling); one whose pid is gone counts as exited and is
//!   restarted with back-off; one that was being stopped is stopped. Then
//!   `open` SIGKILLs the process group of every other live process whose
//!   environment carries this data directory's [`ENV_AGENT_DIR`] and that
//!   is not in an adopted group: processes started but never recorded (the
//!   agent died in between), or left after an unreadable state file. An
//!   unreadable state file is renamed `processes.json.bad`. The next
//!   `converge` then stops what is no longer wanted and replaces what
//!   changed: no orphans, no duplicates. A `flock` on
//!   `<data_dir>/supervisor.lock` keeps two supervisors off one data
//!   directory (`open` waits up to 5 s for it).
//! * **Safety.** No pid ≤ 1, the agent's own pid or its own process group
//!   is ever signalled. A group is signalled only while it is provably
//!   ours: its leader is our unreaped child or still has its recorded start
//!   time, or a live member carries our [`ENV_AGENT_DIR`]. Nothing panics on
//!   bad input; a panic inside a tick would be caught and logged.
//!
//! Linux only in practice: adoption and group membership read `/proc`.

mod logs;
mod record;
mod sys;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tempest_control::{ProcessSpec, ProcessState, ProcessStatus};

/// Environment variable every process gets: the agent's data directory
/// (canonical). It marks the processes of this agent; see the module docs.
pub const ENV_AGENT_DIR: &str = "TEMPEST_AGENT_DIR";
/// Environment variable every process gets: its spec id.
pub const ENV_PROCESS_ID: &str = "TEMPEST_PROCESS_ID";
/// Environment variable every process gets: its spec generation.
pub const ENV_GENERATION: &str = "TEMPEST_PROCESS_GENERATION";
/// The state file's name inside the data directory.
pub const STATE_FILE: &str = "processes.json";
/// The directory of the logs inside the data directory.
pub const LOGS_DIR: &str = "logs";
/// A process that ran at least this long before exiting restarts after
/// `restart_min` again.
pub const RESTART_RESET_AFTER: Duration = Duration::from_secs(10);
/// At most about this many bytes are returned by [`Supervisor::log_tail`].
pub const LOG_TAIL_MAX_BYTES: usize = 4 * 1024 * 1024;

const LOCK_FILE: &str = "supervisor.lock";

/// The umask the agent was started with, given back to its processes
/// (`u32::MAX`: [`private_umask`] was not called, nothing to give back).
static START_UMASK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// Makes every file the agent creates from now on its own alone (umask
/// 077), and keeps the umask it had for its processes, which get it back
/// before they run. Call it first thing in `main`, before any thread.
pub fn private_umask() {
    // SAFETY: umask has no preconditions.
    let old = unsafe { libc::umask(0o077) };
    // mode_t is u32 on Linux and u16 elsewhere.
    #[allow(clippy::unnecessary_cast)]
    START_UMASK.store(old as u32, std::sync::atomic::Ordering::Relaxed);
}
const TICK: Duration = Duration::from_millis(100);
const ROTATE_EVERY_TICKS: u64 = 5;
/// After SIGKILL, how long to wait for the group to vanish before giving
/// up on members that will not die (uninterruptible sleep).
const KILL_GIVE_UP: Duration = Duration::from_secs(5);
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// How the supervisor runs processes.
#[derive(Clone, Debug)]
pub struct SupervisorOptions {
    /// SIGTERM, then SIGKILL after this long.
    pub stop_grace: Duration,
    /// The first restart wait; it doubles up to `restart_max`.
    pub restart_min: Duration,
    /// The longest restart wait.
    pub restart_max: Duration,
    /// A log file is rotated when it grows past this many bytes.
    pub log_max_bytes: u64,
    /// Rotated log files kept per stream.
    pub log_keep: usize,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        SupervisorOptions {
            stop_grace: Duration::from_secs(10),
            restart_min: Duration::from_millis(500),
            restart_max: Duration::from_secs(30),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
        }
    }
}

/// Everything needed to start one process of a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// The assignment it comes from.
    pub spec: ProcessSpec,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// The address others connect to: a topology server's (its workers)
    /// or a worker's peer address (its upstream workers).
    pub address: Option<String>,
    /// Where it serves metrics, if it does.
    pub metrics_address: Option<String>,
}

/// Which output stream of a process.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stream {
    /// stdout
    Stdout,
    /// stderr
    Stderr,
}

impl Stream {
    /// `"stdout"` or `"stderr"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// The log file's name: `stdout.log` or `stderr.log`.
    pub fn file_name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout.log",
            Stream::Stderr => "stderr.log",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stream {
    type Err = String;

    /// `stdout`/`out` or `stderr`/`err`, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "stdout" | "out" => Ok(Stream::Stdout),
            "stderr" | "err" => Ok(Stream::Stderr),
            _ => Err(format!("unknown stream {s:?} (expected stdout or stderr)")),
        }
    }
}

/// What one `converge` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Converged {
    /// Ids started (newly wanted; a start that failed is retried, with the
    /// process Failed meanwhile).
    pub started: Vec<String>,
    /// Ids stopped (no longer assigned).
    pub stopped: Vec<String>,
    /// Ids replaced (their spec changed).
    pub replaced: Vec<String>,
}

impl Converged {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.started.is_empty() && self.stopped.is_empty() && self.replaced.is_empty()
    }
}

/// Supervises the node's processes. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    options: SupervisorOptions,
    /// `TEMPEST_AGENT_DIR=<dir>` as bytes, to recognise our processes.
    marker: Vec<u8>,
    slots: Mutex<Slots>,
    /// Notified after every tick (for `stop_all`).
    changed: tokio::sync::Notify,
    wake: Arc<Wake>,
    _lock: File,
}

#[derive(Default)]
struct Wake {
    state: Mutex<WakeState>,
    cv: Condvar,
}

#[derive(Default)]
struct WakeState {
    poked: bool,
    closed: bool,
}

#[derive(Default)]
struct Slots {
    map: BTreeMap<String, Slot>,
}

/// One id: what should run and what runs.
struct Slot {
    /// The wanted launch; `None` once no longer assigned (being stopped).
    want: Option<Launch>,
    /// The process that runs (or is being stopped).
    proc: Option<Proc>,
    stop: Option<StopProgress>,
    restarts: u32,
    /// The next back-off delay.
    backoff: Duration,
    /// When to (re)start, while there is no process.
    next_start: Option<Instant>,
    /// The last run exited on its own; the next start counts as a restart.
    exited: bool,
    /// The last start attempt failed.
    failed: bool,
    error: Option<String>,
}

struct Proc {
    launch: Launch,
    pid: u32,
    /// `/proc/<pid>/stat` field 22; 0 if unknown.
    start_time: u64,
    started: Instant,
    /// Our child; `None` when adopted from a previous run.
    child: Option<Child>,
    /// The leader has exited (reaped or seen gone).
    gone: bool,
}

struct StopProgress {
    deadline: Instant,
    killed: Option<Instant>,
}

impl Slot {
    fn new(want: Option<Launch>, options: &SupervisorOptions) -> Self {
        Slot {
            want,
            proc: None,
            stop: None,
            restarts: 0,
            backoff: options.restart_min,
            next_start: None,
            exited: false,
            failed: false,
            error: None,
        }
    }

    fn state(&self) -> ProcessState {
        if self.stop.is_some() {
            ProcessState::Stopping
        } else if self.proc.is_some() {
            ProcessState::Running
        } else if self.failed {
            ProcessState::Failed
        } else if self.exited {
            ProcessState::Backoff
        } else {
            ProcessState::Starting
        }
    }

    /// The launch the status describes: the running one, else the wanted.
    fn shown_launch(&self) -> Option<&Launch> {
        self.proc.as_ref().map(|p| &p.launch).or(self.want.as_ref())
    }

    fn status(&self, id: &str, now: Instant) -> Option<ProcessStatus> {
        let launch = self.shown_launch()?;
        let spec = &launch.spec;
        Some(ProcessStatus {
            id: id.to_string(),
            topology: spec.topology.clone(),
            role: spec.role,
            task: spec.task.clone(),
            instance: spec.instance,
            pid: self.proc.as_ref().map(|p| p.pid),
            state: self.state(),
            restarts: self.restarts,
            uptime_secs: self
                .proc
                .as_ref()
                .map_or(0, |p| now.saturating_duration_since(p.started).as_secs()),
            address: launch.address.clone(),
            metrics_address: launch.metrics_address.clone(),
            generation: spec.generation,
            error: self.error.clone(),
        })
    }

    /// Forgets the history of a previous launch.
    fn reset_for_new_launch(&mut self, options: &SupervisorOptions) {
        self.restarts = 0;
        self.backoff = options.restart_min;
        self.exited = false;
        self.failed = false;
        self.error = None;
        self.next_start = None;
    }

    /// Schedules the next start after the current back-off and doubles it.
    fn schedule_retry(&mut self, now: Instant, options: &SupervisorOptions) {
        let delay = self.backoff;
        self.backoff = double(delay, options.restart_max);
        self.next_start = Some(now + delay);
    }
}

fn double(delay: Duration, max: Duration) -> Duration {
    delay.checked_mul(2).unwrap_or(max).min(max)
}

fn describe(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        let name = match signal {
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGINT => " (SIGINT)",
            libc::SIGBUS => " (SIGBUS)",
            _ => "",
        };
        format!("killed by signal {signal}{name}")
    } else {
        match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => format!("exited ({status})"),
        }
    }
}

impl Proc {
    /// Checks whether the leader exited; returns how, the first time only.
    fn poll_exit(&mut self) -> Option<String> {
        if self.gone {
            return None;
        }
        let exit = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(describe(status)),
                Ok(None) => None,
                Err(e) => (!sys::same_process_alive(self.pid, self.start_time))
                    .then(|| format!("lost track of it: {e}")),
            },
            None => {
                if sys::same_process_alive(self.pid, self.start_time) {
                    None
                } else {
                    sys::reap_if_zombie(self.pid, self.start_time);
                    Some("exited (adopted process: exit status unknown)".to_string())
                }
            }
        };
        if exit.is_some() {
            self.gone = true;
        }
        exit
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut wake = self.wake.state.lock();
        wake.closed = true;
        self.wake.cv.notify_all();
    }
}

impl Supervisor {
    /// Opens the supervisor over `data_dir`: reads what a previous run
    /// recorded there and adopts its processes that still run (or stops them).
    ///
    /// Creates the directory, takes its lock (waiting up to 5 s for a
    /// previous supervisor in the same process to let go) and starts the
    /// supervision thread. Processes recorded as wanted but gone are
    /// restarted by that thread with back-off; processes started by a
    /// previous run but not recorded are killed. Fails if the directory
    /// cannot be created or locked or the thread cannot start.
    pub fn open(data_dir: &Path, options: SupervisorOptions) -> std::io::Result<Self> {
        fs::create_dir_all(data_dir.join(LOGS_DIR))?;
        let dir = fs::canonicalize(data_dir)?;
        let lock = sys::lock_file(&dir.join(LOCK_FILE), LOCK_WAIT)?;
        let mut options = options;
        if options.restart_max < options.restart_min {
            options.restart_max = options.restart_min;
        }
        let marker = sys::env_entry(ENV_AGENT_DIR, dir.as_os_str());
        let (slots, adopted) = recover(&dir, &options);
        sweep_strays(&marker, &adopted);

        let wake = Arc::new(Wake::default());
        let inner = Arc::new(Inner {
            dir,
            options,
            marker,
            slots: Mutex::new(slots),
            changed: tokio::sync::Notify::new(),
            wake: wake.clone(),
            _lock: lock,
        });
        {
            let slots = inner.slots.lock();
            inner.persist(&slots);
        }
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("tempest-supervisor".into())
            .spawn(move || run_loop(weak, wake))?;
        Ok(Supervisor { inner })
    }

    /// Makes the running set equal `desired` (by spec id).
    ///
    /// Starts new ids now, begins stopping unwanted ones and replaced ones
    /// (SIGTERM; the rest happens in the background), records the result in
    /// the state file, and returns what it did. Never blocks on a process.
    pub fn converge(&self, desired: Vec<Launch>) -> Converged {
        let inner = &self.inner;
        let options = &inner.options;
        let mut done = Converged::default();
        let now = Instant::now();
        let mut slots = inner.slots.lock();
        let mut seen = BTreeSet::new();
        for launch in desired {
            let id = launch.spec.id.clone();
            if !seen.insert(id.clone()) {
                tracing::warn!(id = %id, "converge: duplicate process id ignored");
                continue;
            }
            match slots.map.get_mut(&id) {
                None => {
                    let mut slot = Slot::new(Some(launch), options);
                    inner.start(&id, &mut slot, now);
                    slots.map.insert(id.clone(), slot);
                    done.started.push(id);
                }
                Some(slot) => match &slot.want {
                    Some(want) if *want == launch => {}
                    Some(_) => {
                        slot.want = Some(launch);
                        slot.reset_for_new_launch(options);
                        if slot.proc.is_none() {
                            inner.start(&id, slot, now);
                        } else if slot.stop.is_none() {
                            inner.begin_stop(&id, slot, now);
                        }
                        done.replaced.push(id);
                    }
                    None => {
                        // Being stopped for good: wanted again. It starts
                        // once the old process is gone.
                        slot.want = Some(launch);
                        slot.reset_for_new_launch(options);
                        if slot.proc.is_none() {
                            inner.start(&id, slot, now);
                        }
                        done.started.push(id);
                    }
                },
            }
        }
        let mut remove = Vec::new();
        for (id, slot) in slots.map.iter_mut() {
            if seen.contains(id) || slot.want.is_none() {
                continue;
            }
            slot.want = None;
            if slot.proc.is_none() {
                remove.push(id.clone());
            } else if slot.stop.is_none() {
                inner.begin_stop(id, slot, now);
            }
            done.stopped.push(id.clone());
        }
        for id in remove {
            slots.map.remove(&id);
        }
        if !done.is_empty() {
            tracing::info!(
                started = ?done.started,
                stopped = ?done.stopped,
                replaced = ?done.replaced,
                "converged"
            );
            inner.persist(&slots);
            drop(slots);
            inner.poke();
        }
        done
    }

    /// The status of every supervised process.
    ///
    /// Sorted by id. A process no longer assigned shows Stopping until it is
    /// gone, then disappears.
    pub fn statuses(&self) -> Vec<ProcessStatus> {
        let now = Instant::now();
        let slots = self.inner.slots.lock();
        slots
            .map
            .iter()
            .filter_map(|(id, slot)| slot.status(id, now))
            .collect()
    }

    /// The status of one process, if it is supervised.
    pub fn status(&self, id: &str) -> Option<ProcessStatus> {
        let slots = self.inner.slots.lock();
        slots.map.get(id)?.status(id, Instant::now())
    }

    /// The last `lines` lines a process wrote to `stream`.
    ///
    /// Read from the end of the log (continuing into the rotated files when
    /// the current one holds fewer lines), with its final newline if it has
    /// one, at most about [`LOG_TAIL_MAX_BYTES`]; invalid UTF-8 is replaced.
    /// `None` for an id that is neither supervised nor has logs on disk (a
    /// process stopped earlier keeps its logs).
    pub fn log_tail(&self, id: &str, stream: Stream, lines: usize) -> Option<String> {
        let known = self.inner.slots.lock().map.contains_key(id);
        let dir = self.inner.log_dir(id);
        if !known && !dir.is_dir() {
            return None;
        }
        let base = dir.join(stream.file_name());
        let mut files = vec![base.clone()];
        files.extend((1..=self.inner.options.log_keep).map(|n| logs::rotated(&base, n)));
        match logs::tail(&files, lines, LOG_TAIL_MAX_BYTES) {
            Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Err(e) => {
                tracing::warn!(id, %stream, error = %e, "cannot read log");
                Some(String::new())
            }
        }
    }

    /// The current log file of a process's `stream`:
    /// `<data_dir>/logs/<safe id>/stdout.log` or `stderr.log`. Rotated
    /// copies are the same path with `.1`, `.2`, ... appended.
    pub fn log_path(&self, id: &str, stream: Stream) -> PathBuf {
        self.inner.log_dir(id).join(stream.file_name())
    }

    /// The data directory (canonical).
    pub fn data_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Ids of the processes supervised, with the launch each runs.
    ///
    /// Sorted by id: the wanted launch of each assigned id (after `open`,
    /// the launches recovered from the state file, so a caller can hand the
    /// same ones back to `converge`), and the running launch of a process
    /// that is being stopped for good.
    pub fn launches(&self) -> Vec<Launch> {
        let slots = self.inner.slots.lock();
        slots
            .map
            .values()
            .filter_map(|slot| slot.want.as_ref().or(slot.proc.as_ref().map(|p| &p.launch)))
            .cloned()
            .collect()
    }

    /// Stops every process (SIGTERM, SIGKILL after the grace period).
    ///
    /// Same as `converge(vec![])`, then waits (asynchronously, any executor)
    /// until every process and its group is gone: at most about
    /// `stop_grace` plus a moment for SIGKILL to land. The supervisor stays
    /// usable; a later `converge` starts processes again.
    pub async fn stop_all(&self) {
        self.converge(Vec::new());
        loop {
            let notified = self.inner.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if !self
                .inner
                .slots
                .lock()
                .map
                .values()
                .any(|slot| slot.want.is_none())
            {
                return;
            }
            notified.await;
        }
    }
}

impl Inner {
    fn log_dir(&self, id: &str) -> PathBuf {
        self.dir.join(LOGS_DIR).join(logs::safe_id(id))
    }

    fn poke(&self) {
        let mut wake = self.wake.state.lock();
        wake.poked = true;
        self.wake.cv.notify_all();
    }

    /// Starts the wanted launch of `slot` now, or marks it Failed and
    /// schedules a retry.
    fn start(&self, id: &str, slot: &mut Slot, now: Instant) {
        let Some(launch) = slot.want.clone() else {
            return;
        };
        match self.spawn(id, &launch) {
            Ok(proc) => {
                tracing::info!(
                    id,
                    pid = proc.pid,
                    generation = launch.spec.generation,
                    "started"
                );
                if slot.exited {
                    slot.restarts = slot.restarts.saturating_add(1);
                }
                slot.exited = false;
                slot.failed = false;
                slot.error = None;
                slot.next_start = None;
                slot.proc = Some(proc);
            }
            Err(error) => {
                tracing::warn!(id, %error, "cannot start");
                slot.failed = true;
                slot.error = Some(error);
                slot.schedule_retry(now, &self.options);
            }
        }
    }

    fn spawn(&self, id: &str, launch: &Launch) -> Result<Proc, String> {
        for (key, value) in launch.spec.env.iter().chain(&launch.env) {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(format!("invalid environment variable {key:?}"));
            }
        }
        if launch.args.iter().any(|a| a.contains('\0')) {
            return Err("an argument contains a NUL byte".to_string());
        }
        let dir = self.log_dir(id);
        fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
        let open = |stream: Stream| {
            let path = dir.join(stream.file_name());
            logs::open_append(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))
        };
        let stdout = open(Stream::Stdout)?;
        let stderr = open(Stream::Stderr)?;
        let mut command = Command::new(&launch.program);
        // None of the agent's own credentials reach a process (a process
        // gets its deployment's data-plane secret in `launch.env`).
        for var in tempest_control::credentials::CREDENTIAL_ENVS
            .iter()
            .chain(&[
                tempest_control::credentials::DATA_SECRET_ENV,
                tempest_control::tls::DATA_TLS_CERT_ENV,
                tempest_control::tls::DATA_TLS_KEY_ENV,
                tempest_control::tls::DATA_TLS_CA_ENV,
            ])
        {
            command.env_remove(var);
        }
        command
            .args(&launch.args)
            .envs(&launch.spec.env)
            .envs(&launch.env)
            .env(ENV_AGENT_DIR, &self.dir)
            .env(ENV_PROCESS_ID, id)
            .env(ENV_GENERATION, launch.spec.generation.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let umask = START_UMASK.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: setsid and umask are async-signal-safe and touch no memory.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if umask != u32::MAX {
                    #[allow(clippy::unnecessary_cast)]
                    libc::umask(umask as libc::mode_t);
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", launch.program.display()))?;
        let pid = child.id();
        let start_time = sys::stat(pid).map_or(0, |s| s.start_time);
        Ok(Proc {
            launch: launch.clone(),
            pid,
            start_time,
            started: Instant::now(),
            child: Some(child),
            gone: false,
        })
    }

    /// Whether the leader of `proc` is provably still ours (so signalling
    /// its pid cannot hit a stranger that reused it).
    fn owns_leader(&self, proc: &Proc) -> bool {
        !proc.gone
            && match proc.child {
                // Not reaped yet: the pid cannot have been reused.
                Some(_) => true,
                None => sys::same_process_alive(proc.pid, proc.start_time),
            }
    }

    /// Signals the process group of `proc` if it is provably ours: its
    /// leader is, or a live member carries our marker. A leader that left
    /// its group (setpgid) is signalled directly.
    fn signal(&self, id: &str, proc: &Proc, signal: libc::c_int) {
        let leader = self.owns_leader(proc);
        if leader || sys::group_carries(proc.pid, &self.marker) {
            let delivered = sys::signal_group(proc.pid, signal)
                || (leader && sys::signal_process(proc.pid, signal));
            if !delivered {
                tracing::debug!(id, pid = proc.pid, signal, "signal not delivered");
            }
        } else {
            tracing::debug!(
                id,
                pid = proc.pid,
                signal,
                "group gone or not ours; not signalled"
            );
        }
    }

    /// SIGTERM to the group; the loop finishes the job.
    fn begin_stop(&self, id: &str, slot: &mut Slot, now: Instant) {
        let Some(proc) = slot.proc.as_mut() else {
            return;
        };
        proc.poll_exit();
        tracing::info!(id, pid = proc.pid, "stopping");
        self.signal(id, proc, libc::SIGTERM);
        slot.stop = Some(StopProgress {
            deadline: now + self.options.stop_grace,
            killed: None,
        });
    }

    /// One pass of the supervision loop.
    fn tick(&self, rotate: bool) {
        let now = Instant::now();
        let mut slots = self.slots.lock();
        let mut changed = false;
        let mut remove = Vec::new();
        for (id, slot) in slots.map.iter_mut() {
            changed |= self.tick_slot(id, slot, now, &mut remove);
        }
        for id in &remove {
            slots.map.remove(id);
        }
        if changed {
            self.persist(&slots);
        }
        let ids: Vec<String> = if rotate {
            slots.map.keys().cloned().collect()
        } else {
            Vec::new()
        };
        drop(slots);
        for id in ids {
            for stream in [Stream::Stdout, Stream::Stderr] {
                let path = self.log_dir(&id).join(stream.file_name());
                match logs::rotate_if_needed(
                    &path,
                    self.options.log_max_bytes,
                    self.options.log_keep,
                ) {
                    Ok(true) => tracing::debug!(id, %stream, "log rotated"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(id, %stream, error = %e, "cannot rotate log"),
                }
            }
        }
    }

    /// Advances one slot; returns whether the recorded state changed.
    fn tick_slot(&self, id: &str, slot: &mut Slot, now: Instant, remove: &mut Vec<String>) -> bool {
        let Some(proc) = slot.proc.as_mut() else {
            if slot.want.is_none() {
                remove.push(id.to_string());
                return true;
            }
            if slot.next_start.is_none_or(|at| now >= at) {
                self.start(id, slot, now);
                return true;
            }
            return false;
        };
        let exit = proc.poll_exit();
        if let Some(stop) = slot.stop.as_mut() {
            let members = sys::group_alive(proc.pid);
            let finished = if proc.gone && !members {
                true
            } else if let Some(killed) = stop.killed {
                if now.saturating_duration_since(killed) >= KILL_GIVE_UP {
                    if proc.gone {
                        tracing::warn!(
                            id,
                            pgid = proc.pid,
                            "group members survive SIGKILL; giving up on them"
                        );
                        true
                    } else {
                        self.signal(id, proc, libc::SIGKILL);
                        stop.killed = Some(now);
                        false
                    }
                } else {
                    false
                }
            } else if now >= stop.deadline {
                tracing::info!(id, pid = proc.pid, "grace period over: SIGKILL");
                self.signal(id, proc, libc::SIGKILL);
                stop.killed = Some(now);
                false
            } else {
                false
            };
            if !finished {
                return false;
            }
            tracing::info!(id, pid = proc.pid, "stopped");
            slot.proc = None;
            slot.stop = None;
            if slot.want.is_some() {
                self.start(id, slot, now);
            } else {
                remove.push(id.to_string());
            }
            return true;
        }
        let Some(how) = exit else {
            return false;
        };
        // Exited on its own: no member of its group may outlive it.
        if sys::group_alive(proc.pid) {
            self.signal(id, proc, libc::SIGKILL);
        }
        let ran = now.saturating_duration_since(proc.started);
        tracing::warn!(id, pid = proc.pid, ran = ?ran, "{how}");
        slot.proc = None;
        if slot.want.is_none() {
            remove.push(id.to_string());
            return true;
        }
        if ran >= RESTART_RESET_AFTER {
            slot.backoff = self.options.restart_min;
        }
        slot.exited = true;
        slot.failed = false;
        slot.error = Some(how);
        slot.schedule_retry(now, &self.options);
        true
    }

    fn persist(&self, slots: &Slots) {
        let state = record::StateFile {
            version: record::VERSION,
            processes: slots
                .map
                .iter()
                .map(|(id, slot)| record::Record {
                    id: id.clone(),
                    launch: slot.want.as_ref().map(Into::into),
                    running: slot.proc.as_ref().map(|p| record::RunningRecord {
                        pid: p.pid,
                        start_time: p.start_time,
                        launch: (&p.launch).into(),
                    }),
                    restarts: slot.restarts,
                    exited: slot.exited,
                    error: slot.error.clone(),
                })
                .collect(),
        };
        let path = self.dir.join(STATE_FILE);
        if let Err(e) = record::write(&path, &state) {
            tracing::error!(path = %path.display(), error = %e, "cannot write the state file");
        }
    }
}

/// Rebuilds the slots from the state file, adopting live processes.
/// Returns the slots and the adopted process groups.
fn recover(dir: &Path, options: &SupervisorOptions) -> (Slots, HashSet<u32>) {
    let mut slots = Slots::default();
    let mut adopted = HashSet::new();
    let path = dir.join(STATE_FILE);
    let records = match record::read(&path) {
        Ok(Some(state)) => state.processes,
        Ok(None) => Vec::new(),
        Err(error) => {
            let mut bad = OsString::from(path.as_os_str());
            bad.push(".bad");
            tracing::error!(%error, "unreadable state file moved aside; unrecorded processes will be killed");
            let _ = fs::rename(&path, PathBuf::from(bad));
            Vec::new()
        }
    };
    let now = Instant::now();
    for rec in records {
        if slots.map.contains_key(&rec.id) {
            tracing::warn!(id = %rec.id, "state file: duplicate id ignored");
            continue;
        }
        let mut slot = Slot::new(rec.launch.map(Launch::from), options);
        slot.restarts = rec.restarts;
        slot.exited = rec.exited;
        match rec.running {
            Some(run) if sys::same_process_alive(run.pid, run.start_time) => {
                let age = sys::age(run.start_time).unwrap_or_default();
                let launch = Launch::from(run.launch);
                tracing::info!(id = %rec.id, pid = run.pid, "adopted a process of the previous run");
                let stale = slot.want.as_ref() != Some(&launch);
                slot.proc = Some(Proc {
                    launch,
                    pid: run.pid,
                    start_time: run.start_time,
                    started: now.checked_sub(age).unwrap_or(now),
                    child: None,
                    gone: false,
                });
                adopted.insert(run.pid);
                if stale {
                    // It was being stopped or replaced when the agent died.
                    if sys::signal_group(run.pid, libc::SIGTERM) {
                        tracing::info!(id = %rec.id, pid = run.pid, "stopping");
                    }
                    slot.stop = Some(StopProgress {
                        deadline: now + options.stop_grace,
                        killed: None,
                    });
                }
            }
            Some(run) => {
                sys::reap_if_zombie(run.pid, run.start_time);
                if slot.want.is_none() {
                    continue;
                }
                tracing::info!(id = %rec.id, pid = run.pid, "process of the previous run is gone; restarting");
                slot.exited = true;
                slot.error = Some("exited while the agent was down".to_string());
                slot.schedule_retry(now, options);
            }
            None => {
                if slot.want.is_none() {
                    continue;
                }
                // In back-off or failed when the agent died: start it now.
                slot.failed = rec.error.is_some() && !rec.exited;
                slot.error = rec.error;
            }
        }
        slots.map.insert(rec.id, slot);
    }
    (slots, adopted)
}

/// Kills the group of every live process that carries our marker and is
/// not in an adopted group: started by a previous run but never recorded.
fn sweep_strays(marker: &[u8], adopted: &HashSet<u32>) {
    let own = std::process::id();
    for pid in sys::list_pids() {
        if pid == own {
            continue;
        }
        let Some(stat) = sys::stat(pid) else {
            continue;
        };
        if stat.is_dead() || stat.pgrp <= 0 || adopted.contains(&(stat.pgrp as u32)) {
            continue;
        }
        if !sys::environ_has(pid, marker) {
            continue;
        }
        tracing::warn!(
            pid,
            pgid = stat.pgrp,
            "killing an unrecorded process of a previous run"
        );
        if !sys::signal_group(stat.pgrp as u32, libc::SIGKILL) {
            sys::signal_process(pid, libc::SIGKILL);
        }
    }
}

fn run_loop(weak: Weak<Inner>, wake: Arc<Wake>) {
    let mut ticks: u64 = 0;
    loop {
        {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let rotate = ticks.is_multiple_of(ROTATE_EVERY_TICKS);
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.tick(rotate)));
            if result.is_err() {
                tracing::error!("supervisor tick panicked; continuing");
            }
            inner.changed.notify_waiters();
        }
        ticks = ticks.wrapping_add(1);
        let mut state = wake.state.lock();
        if state.closed {
            return;
        }
        if !state.poked {
            wake.cv.wait_for(&mut state, TICK);
        }
        state.poked = false;
        if state.closed {
            return;
        }
    }
}
