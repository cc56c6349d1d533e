//! Word count against real brokers, with real processes: sentences read
//! from a Redis stream or a NATS JetStream stream (`[source] kind = "redis"`
//! / `"nats"` in Topology.toml), counts written by the `output` task to a
//! Redis hash ([`wordcount::REDIS_ENV`]: one `HINCRBY` per word occurrence,
//! flushed atomically before its batch is acked).
//!
//! The topology server is killed with SIGKILL mid-stream and restarted on
//! the same port (its workers reconnect by themselves); two servers share
//! one consumer group; the Redis server itself is restarted under a
//! standalone run. A broker never runs dry, so a run ends when the broker
//! says that every entry was delivered and acked; then the hash must count
//! every word occurrence at least once (zero lost), and its duplicates are
//! bounded by the roots un-acked at the broker when the server died.
//!
//! The tests take turns ([`serial`]): each runs five processes and a
//! broker or two, and the machine may have few cores.

#![cfg(unix)]

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::Value;
use tempest_testkit::{NatsServer, RedisServer};
use wordcount::{OUTPUT_ENV, REDIS_ENV, REDIS_HASH_ENV};

const BIN: &str = env!("CARGO_BIN_EXE_wordcount");

/// The longest a whole run (or any other single wait) may take: 100,000
/// sentences through a debug build on a small machine. Past it every process
/// is killed and the test fails.
const LIMIT: Duration = Duration::from_secs(180);

/// How often a bounded wait looks at its condition again (a broker query).
const POLL: Duration = Duration::from_millis(20);

/// Storm's word count sentences (6, 8, 6, 6 and 6 words).
const SENTENCES: [&str; 5] = [
    "the cow jumped over the moon",
    "an apple a day keeps the doctor away",
    "four score and seven years ago",
    "snow white and the seven dwarfs",
    "i am at two with nature",
];

/// The stream the sentences are in (Redis stream, JetStream stream).
const STREAM: &str = "sentences";
/// The Redis consumer group / the JetStream durable consumer.
const GROUP: &str = "wordcount";
/// The Redis hash of counts.
const HASH: &str = "wordcount";

/// `max_pending` of every run: the most roots in flight, and so the most
/// entries a topology server holds un-acked at the broker.
const MAX_PENDING: u64 = 2_000;
/// `batch_size` of every run (worker pulls and source reads).
const BATCH_SIZE: u64 = 512;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time (a failed test does not stop the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ------------------------------------------------------------ expectations

/// The words of a sentence, independently of the example: split on ASCII
/// whitespace, trim what is not ASCII alphanumeric, lowercase ASCII.
fn words(sentence: &str) -> impl Iterator<Item = String> + '_ {
    sentence
        .split(|c: char| c.is_ascii_whitespace())
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
}

/// The sentence sent `i`-th: the sentences cycled.
fn sentence(i: u64) -> &'static str {
    SENTENCES[(i % SENTENCES.len() as u64) as usize]
}

/// The count of every word over the sentences `0..n`.
fn cycled_counts(n: u64) -> HashMap<String, u64> {
    let len = SENTENCES.len() as u64;
    let mut counts = HashMap::new();
    for (i, s) in SENTENCES.iter().enumerate() {
        let times = n / len + u64::from((i as u64) < n % len);
        for w in words(s) {
            *counts.entry(w).or_insert(0) += times;
        }
    }
    counts
}

/// What the hash holds beyond the expected counts.
#[derive(Debug)]
struct Duplicates {
    /// Σ (count − expected) over the words.
    words: u64,
    /// The fewest sentences handled twice that explain the hash: a sentence
    /// handled once more adds at most 1 to each of its words, so each
    /// sentence was handled again at least as often as the most duplicated
    /// of the words that only it has (every sentence has some).
    sentences_at_least: u64,
}

/// Checks the hash against the expected counts: every word counted at
/// least as often as it occurs (zero lost) and no other word. Returns the
/// duplicates, or every problem found.
fn check_counts(
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

// ---------------------------------------------------------------- configs

/// The settings every run shares. The retry policy, so that no root is
/// acked unhandled; a `message_timeout` far above a root's time in flight,
/// so that no root times out (a replay would count its words again) even
/// while the workers reconnect to a restarted server (their back-off goes
/// up to 2 s). The console metrics are off: stdout has only the lines the
/// tests look for.
fn settings(message_timeout: &str) -> String {
    format!(
        "name = \"wordcount\"\n\
         max_pending = {MAX_PENDING}\n\
         batch_size = {BATCH_SIZE}\n\
         message_timeout = \"{message_timeout}\"\n\
         grace_period = \"10s\"\n\
         [failure]\n\
         policy = \"retry\"\n\
         max_attempts = 20\n\
         backoff = \"100ms\"\n\
         max_backoff = \"1s\"\n\
         [metric]\n\
         targets = []\n"
    )
}

/// A Topology.toml reading [`STREAM`] in group [`GROUP`] of the Redis
/// server at `url` as `consumer`.
///
/// A fixed consumer name makes a restarted server read its own pending
/// entries again at once, without waiting for `claim_idle_ms`; that is kept
/// equal to `message_timeout` (the source warns when it is shorter) and
/// plays no part here: no consumer dies for good.
fn redis_config(url: &str, consumer: &str) -> String {
    format!(
        "{}[source]\n\
         kind = \"redis\"\n\
         [source.config]\n\
         url = \"{url}\"\n\
         stream = \"{STREAM}\"\n\
         group = \"{GROUP}\"\n\
         consumer = \"{consumer}\"\n\
         batch_size = {BATCH_SIZE}\n\
         block_ms = 100\n\
         claim_idle_ms = 10000\n",
        settings("10s")
    )
}

/// The JetStream consumer's `ack_wait` with [`nats_config`]: its default,
/// 2 × `message_timeout` (5 s) + 1 s. How long the broker waits before it
/// redelivers what a killed server held; as those count against
/// `max_ack_pending` (= `max_pending`) until then, a restarted server gets
/// little or nothing new meanwhile.
const NATS_ACK_WAIT: Duration = Duration::from_secs(11);

/// A Topology.toml reading [`STREAM`] through the durable consumer
/// [`GROUP`] of the NATS server at `url`. `max_ack_pending` is left at its
/// default, `max_pending`.
fn nats_config(url: &str) -> String {
    format!(
        "{}[source]\n\
         kind = \"nats\"\n\
         [source.config]\n\
         url = \"{url}\"\n\
         stream = \"{STREAM}\"\n\
         subjects = [\"{STREAM}.>\"]\n\
         consumer = \"{GROUP}\"\n\
         batch_size = {BATCH_SIZE}\n\
         expires_ms = 100\n",
        settings("5s")
    )
}

// ------------------------------------------------------------------ Redis

/// A Redis connection for the test: fills the stream, reads the group and
/// the hash. A command that fails on a broken connection (the server was
/// restarted) is sent once more on a new one.
struct Redis {
    client: redis::Client,
    conn: Option<redis::Connection>,
}

/// What `XINFO GROUPS` says of [`GROUP`].
#[derive(Clone, Copy, Debug)]
struct Group {
    /// Entries delivered and not acked.
    pending: u64,
    /// Entries delivered to the group (Redis 7).
    entries_read: Option<u64>,
    /// Entries not yet delivered (Redis 7).
    lag: Option<u64>,
}

impl Group {
    /// Every one of `n` entries delivered and acked.
    fn done(&self, n: u64) -> bool {
        self.pending == 0 && self.lag == Some(0) && self.entries_read == Some(n)
    }
}

impl Redis {
    fn new(url: &str) -> Redis {
        Redis {
            client: redis::Client::open(url).expect("a Redis URL"),
            conn: None,
        }
    }

    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, String> {
        let mut last = String::new();
        for _ in 0..2 {
            let conn = match &mut self.conn {
                Some(c) => c,
                None => match self
                    .client
                    .get_connection_with_timeout(Duration::from_secs(5))
                {
                    Ok(c) => self.conn.insert(c),
                    Err(e) => return Err(format!("connecting to Redis: {e}")),
                },
            };
            match cmd.query::<T>(conn) {
                Ok(v) => return Ok(v),
                Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                    self.conn = None;
                    last = e.to_string();
                }
                Err(e) => return Err(format!("{e}")),
            }
        }
        Err(format!("Redis: {last}"))
    }

    /// `XADD`s the sentences `0..n` to [`STREAM`] (field `payload`), in
    /// pipelines of 10,000.
    fn add_sentences(&mut self, n: u64) {
        let conn = self.conn_or_panic();
        let mut i = 0;
        while i < n {
            let mut pipe = redis::pipe();
            for j in i..n.min(i + 10_000) {
                pipe.cmd("XADD")
                    .arg(STREAM)
                    .arg("*")
                    .arg("payload")
                    .arg(sentence(j))
                    .ignore();
            }
            pipe.query::<()>(conn).expect("XADD");
            i += 10_000;
        }
        let len: u64 = self.query(redis::cmd("XLEN").arg(STREAM)).expect("XLEN");
        assert_eq!(len, n, "the stream holds every sentence");
    }

    fn conn_or_panic(&mut self) -> &mut redis::Connection {
        if self.conn.is_none() {
            self.conn = Some(self.client.get_connection().expect("connecting to Redis"));
        }
        self.conn.as_mut().unwrap()
    }

    /// The hash's count of `word`.
    fn count(&mut self, word: &str) -> Result<u64, String> {
        self.query::<Option<u64>>(redis::cmd("HGET").arg(HASH).arg(word))
            .map(Option::unwrap_or_default)
    }

    /// The whole hash.
    fn counts(&mut self) -> Result<HashMap<String, u64>, String> {
        self.query(redis::cmd("HGETALL").arg(HASH))
    }

    /// [`GROUP`] of [`STREAM`], if it exists yet.
    fn group(&mut self) -> Result<Option<Group>, String> {
        let groups: Value = match self.query(redis::cmd("XINFO").arg("GROUPS").arg(STREAM)) {
            Ok(v) => v,
            Err(e) if e.contains("no such key") => return Ok(None),
            Err(e) => return Err(e),
        };
        for g in items(&groups) {
            let f = fields(g);
            if f.get("name").and_then(|v| text(v)).as_deref() != Some(GROUP) {
                continue;
            }
            let int = |k: &str| f.get(k).and_then(|v| int(v));
            return Ok(Some(Group {
                pending: int("pending").ok_or("XINFO GROUPS: no pending")?,
                entries_read: int("entries-read"),
                lag: int("lag"),
            }));
        }
        Ok(None)
    }

    /// The consumers of [`GROUP`] by name, with their pending entries.
    fn consumers(&mut self) -> Result<HashMap<String, u64>, String> {
        let reply: Value =
            self.query(redis::cmd("XINFO").arg("CONSUMERS").arg(STREAM).arg(GROUP))?;
        Ok(items(&reply)
            .iter()
            .filter_map(|c| {
                let f = fields(c);
                Some((text(f.get("name")?)?, int(f.get("pending")?)?))
            })
            .collect())
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// The fields of a reply that is a map (RESP3) or a flat array of pairs.
fn fields(v: &Value) -> HashMap<String, &Value> {
    match v {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v)))
            .collect(),
        Value::Array(flat) => flat
            .chunks_exact(2)
            .filter_map(|kv| Some((text(&kv[0])?, &kv[1])))
            .collect(),
        _ => HashMap::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

// ------------------------------------------------------------------- NATS

/// A JetStream client for the test: creates and fills the stream, reads
/// the consumer's state.
struct Nats {
    rt: tokio::runtime::Runtime,
    js: async_nats::jetstream::Context,
}

/// What the broker says of the durable consumer.
#[derive(Clone, Copy, Debug)]
struct Consumer {
    /// Delivered, not acked (the redeliveries waiting for `ack_wait` included).
    ack_pending: u64,
    /// Not yet delivered.
    pending: u64,
    /// Every message up to this stream sequence is acked.
    ack_floor: u64,
}

impl Nats {
    fn new(url: &str) -> Nats {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        // The context spawns its acker task: inside the runtime.
        let js = rt.block_on(async {
            let client = async_nats::connect(url).await.expect("connecting to NATS");
            async_nats::jetstream::new(client)
        });
        Nats { rt, js }
    }

    /// Creates [`STREAM`] (subjects `sentences.>`) and publishes the
    /// sentences `0..n` on `sentences.in`, 1,000 at a time, each batch
    /// stored before the next is sent.
    fn add_sentences(&self, n: u64) {
        use async_nats::jetstream::stream;
        self.rt.block_on(async {
            let mut s = self
                .js
                .get_or_create_stream(stream::Config {
                    name: STREAM.into(),
                    subjects: vec![format!("{STREAM}.>")],
                    ..Default::default()
                })
                .await
                .expect("creating the stream");
            let subject = format!("{STREAM}.in");
            let mut i = 0;
            while i < n {
                let mut acks = Vec::with_capacity(1_000);
                for j in i..n.min(i + 1_000) {
                    let ack = self
                        .js
                        .publish(subject.clone(), sentence(j).into())
                        .await
                        .expect("publishing");
                    acks.push(ack);
                }
                for ack in acks {
                    ack.await.expect("the stream stores the sentence");
                }
                i += 1_000;
            }
            let info = s.info().await.expect("stream info");
            assert_eq!(info.state.messages, n, "the stream holds every sentence");
        });
    }

    /// The durable consumer, if it exists yet.
    fn consumer(&self) -> Result<Option<Consumer>, String> {
        self.rt.block_on(async {
            let stream = self
                .js
                .get_stream(STREAM)
                .await
                .map_err(|e| format!("stream info: {e}"))?;
            match stream.consumer_info(GROUP).await {
                Ok(info) => Ok(Some(Consumer {
                    ack_pending: info.num_ack_pending as u64,
                    pending: info.num_pending,
                    ack_floor: info.ack_floor.stream_sequence,
                })),
                Err(e) if e.to_string().contains("not found") => Ok(None),
                Err(e) => Err(format!("consumer info: {e}")),
            }
        })
    }
}

// -------------------------------------------------------------- processes

/// A child's stream, read to its end by a thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn read_from(r: impl Read + Send + 'static) -> (Self, JoinHandle<()>) {
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

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }
}

/// One `wordcount` process.
struct Proc {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    /// Set when the test signals it: its exit is then no failure.
    stopping: bool,
    stdout: Captured,
    stderr: Captured,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waiting for wordcount");
        }
        self.status
    }

    /// Sends `sig`; it must not have been reaped yet (its pid is still its).
    fn signal(&mut self, sig: libc::c_int) {
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
}

/// A process of a [`Run`].
#[derive(Clone, Copy, Debug)]
struct Id(usize);

/// The processes of a test, and a directory for their files. Dropping it
/// kills (SIGKILL) and reaps whatever still runs.
struct Run {
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if p.exited().is_none() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

/// The prefix of the line a server prints once it listens.
const LISTENING: &str = "tempest topology server for `wordcount` listening on ";

impl Run {
    fn new() -> Run {
        Run {
            dir: tempfile::tempdir().expect("a temporary directory"),
            procs: Vec::new(),
        }
    }

    /// Writes `text` to the file `name` of the run's directory.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("writing a file");
        path
    }

    fn proc(&mut self, id: Id) -> &mut Proc {
        &mut self.procs[id.0]
    }

    /// Starts `wordcount --log-level info <args>`, with the counts going to
    /// the Redis hash at `redis` if given.
    fn spawn(&mut self, label: &str, args: &[&str], redis: Option<&str>) -> Id {
        let mut cmd = Command::new(BIN);
        cmd.args(["--log-level", "info"])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("TEMPEST_LOG_LEVEL")
            .env_remove("TEMPEST_TOKEN")
            .env_remove(OUTPUT_ENV)
            .env_remove(REDIS_ENV)
            .env_remove(REDIS_HASH_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(url) = redis {
            cmd.env(REDIS_ENV, url);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label}: {e}"));
        let (stdout, r1) = Captured::read_from(child.stdout.take().unwrap());
        let (stderr, r2) = Captured::read_from(child.stderr.take().unwrap());
        self.procs.push(Proc {
            label: label.to_owned(),
            child,
            status: None,
            stopping: false,
            stdout,
            stderr,
            readers: vec![r1, r2],
        });
        Id(self.procs.len() - 1)
    }

    /// Starts a topology server on `port` (0: any) and waits until it
    /// listens; returns it and its port.
    #[track_caller]
    fn server(&mut self, label: &str, config: &Path, port: u16) -> (Id, u16) {
        let args = [
            "topology",
            "--config",
            config.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ];
        let id = self.spawn(label, &args, None);
        self.wait_until(&format!("{label} listens"), LIMIT, |r| {
            Ok(r.proc(id).stdout.contains(LISTENING))
        });
        let stdout = self.proc(id).stdout.text();
        let addr = stdout
            .lines()
            .find_map(|l| l.strip_prefix(LISTENING))
            .expect("the listening line")
            .trim();
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"));
        (id, port)
    }

    /// One worker per task instance (split ×1, count ×2, output ×1) for the
    /// server on `port`; `output` counts into the Redis hash at `redis`.
    fn workers(&mut self, config: &Path, port: u16, redis: &str) -> Vec<Id> {
        let addr = format!("127.0.0.1:{port}");
        [("split", 0), ("count", 0), ("count", 1), ("output", 0)]
            .into_iter()
            .map(|(task, instance)| {
                let args = [
                    "task",
                    "--name",
                    task,
                    "--topology-addr",
                    &addr,
                    "--instance",
                    &instance.to_string(),
                    "--config",
                    config.to_str().unwrap(),
                ];
                let label = format!("{task}/{instance}");
                self.spawn(&label, &args, (task == "output").then_some(redis))
            })
            .collect()
    }

    /// Starts `wordcount standalone`, counting into the hash at `redis`.
    fn standalone(&mut self, label: &str, config: &Path, redis: &str) -> Id {
        let args = ["standalone", "--config", config.to_str().unwrap()];
        self.spawn(label, &args, Some(redis))
    }

    /// Everything every process printed so far, for a failure message.
    fn dump(&self) -> String {
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
    fn fail(&mut self, why: &str) -> ! {
        for p in &mut self.procs {
            if p.exited().is_none() {
                let _ = p.child.kill();
                p.status = p.child.wait().ok();
            }
        }
        panic!("{why}{}", self.dump())
    }

    /// Waits until `cond` holds, at most `limit`; fails the test when `cond`
    /// errs, time is up, or a process exits that the test did not stop.
    #[track_caller]
    fn wait_until(
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
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `id` (signalled) exits; returns its status and stdout.
    #[track_caller]
    fn wait_exit(&mut self, id: Id) -> (ExitStatus, String) {
        let what = format!("{} exits", self.proc(id).label);
        self.wait_until(&what, LIMIT, |r| Ok(r.proc(id).exited().is_some()));
        let p = self.proc(id);
        // The pipes close when the process exits (no other child inherits
        // them), so the readers end.
        for r in p.readers.drain(..) {
            let _ = r.join();
        }
        (p.status.unwrap(), p.stdout.text())
    }

    /// SIGKILLs `id` and reaps it.
    #[track_caller]
    fn kill_9(&mut self, id: Id) {
        self.proc(id).signal(libc::SIGKILL);
        let (status, _) = self.wait_exit(id);
        if status.signal() != Some(libc::SIGKILL) {
            self.fail(&format!("killed with SIGKILL: {status}"));
        }
    }

    /// SIGTERMs `id`; it must exit 0. Returns its stdout.
    #[track_caller]
    fn stop(&mut self, id: Id) -> String {
        self.proc(id).signal(libc::SIGTERM);
        let (status, stdout) = self.wait_exit(id);
        if !status.success() {
            let label = self.proc(id).label.clone();
            self.fail(&format!("{label} exited with {status} on SIGTERM"));
        }
        stdout
    }

    /// SIGTERMs the topology server or standalone run `id`; it must exit 0
    /// with its summary, whose acked and dead-lettered counts are returned.
    #[track_caller]
    fn stop_topology(&mut self, id: Id) -> Summary {
        let stdout = self.stop(id);
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("wordcount: "))
            .collect();
        match lines[..] {
            [line] => Summary::parse(line).unwrap_or_else(|| self.fail("a summary line")),
            _ => self.fail("no single summary line"),
        }
    }

    /// SIGTERMs a worker; it must exit 0. Returns the connections it had
    /// to its server.
    #[track_caller]
    fn stop_worker(&mut self, id: Id) -> u64 {
        let stdout = self.stop(id);
        let connections = stdout
            .lines()
            .find_map(|l| l.split_once(" messages over "))
            .and_then(|(_, rest)| rest.split(' ').next())
            .and_then(|n| n.parse().ok());
        connections.unwrap_or_else(|| {
            let label = self.proc(id).label.clone();
            self.fail(&format!(
                "{label}: no `handled N messages over M connection(s)` line"
            ))
        })
    }
}

/// A `wordcount: N roots acked, F failed, D dead-lettered in ...` line.
#[derive(Debug)]
struct Summary {
    line: String,
    acked: u64,
    dead_lettered: u64,
}

impl Summary {
    fn parse(line: &str) -> Option<Summary> {
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

// ------------------------------------------------------------------ tests

/// 100,000 sentences from a Redis stream, distributed (a server, split,
/// count ×2, output); the topology server is killed with SIGKILL mid-stream
/// and restarted on its port. No word occurrence is lost, and the
/// duplicates are bounded by the entries the dead server held un-acked.
#[test]
fn redis_topology_server_kill_9_loses_nothing() {
    let _serial = serial();
    let started = Instant::now();
    const COUNT: u64 = 100_000;
    let expected = cycled_counts(COUNT);

    let broker = RedisServer::start().expect("redis-server");
    let url = broker.url();
    let mut redis = Redis::new(&url);
    redis.add_sentences(COUNT);

    let mut run = Run::new();
    let config = run.file("Topology.toml", &redis_config(&url, "server-1"));
    let (server, port) = run.server("server", &config, 0);
    let workers = run.workers(&config, port, &url);

    let the = expected["the"];
    run.wait_until("a fifth of the sentences are counted", LIMIT, |_| {
        Ok(redis.count("the")? > the / 5)
    });
    run.kill_9(server);

    // The dead server's entries: delivered to `server-1` and not acked. The
    // driver acks what completed before it polls again and never asks for
    // more than `max_pending` minus the roots in flight, so these are at
    // most `max_pending`; they are all that can be handled twice.
    let at_kill = match redis.group() {
        Ok(Some(g)) => g,
        Ok(None) => run.fail("no consumer group"),
        Err(e) => run.fail(&e),
    };
    let held = at_kill.pending;
    let unread = at_kill
        .lag
        .unwrap_or_else(|| run.fail("XINFO GROUPS: no lag"));
    if held == 0 || unread == 0 {
        run.fail(&format!("not mid-stream when killed: {at_kill:?}"));
    }
    assert!(held <= MAX_PENDING, "{held} entries un-acked at the kill");

    let (server, _) = run.server("server (restarted)", &config, port);
    run.wait_until("every entry is acked", LIMIT, |_| {
        Ok(redis.group()?.is_some_and(|g| g.done(COUNT)))
    });

    let summary = run.stop_topology(server);
    let connections: Vec<u64> = workers.iter().map(|&w| run.stop_worker(w)).collect();
    let counts = redis.counts().unwrap_or_else(|e| run.fail(&e));
    let dup = check_counts(&counts, &expected)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    eprintln!(
        "redis_topology_server_kill_9_loses_nothing: at the kill {held} entries un-acked, \
         {unread} unread; restarted server: {}; worker connections {connections:?}; \
         {} duplicate words (~{:.0} sentences), at least {} sentences handled twice; took {:.1?}",
        summary.line,
        dup.words,
        dup.words as f64 / 6.4,
        dup.sentences_at_least,
        started.elapsed()
    );
    // The restarted server handled exactly what was left: the entries the
    // dead one held and the ones not yet read, each once.
    assert_eq!(summary.acked, held + unread, "{}", summary.line);
    assert_eq!(summary.dead_lettered, 0, "{}", summary.line);
    // Every worker reconnected to the restarted server by itself.
    assert!(connections.iter().all(|&c| c >= 2), "{connections:?}");
    assert!(
        dup.sentences_at_least <= held,
        "{dup:?}: more sentences handled twice than the {held} the dead server held"
    );
}

/// Two standalone topologies with consumers `a` and `b` of one Redis group:
/// both take entries, and together they count every word exactly once.
#[test]
fn two_topology_servers_share_one_redis_group() {
    let _serial = serial();
    let started = Instant::now();
    const COUNT: u64 = 20_000;
    let expected = cycled_counts(COUNT);

    let broker = RedisServer::start().expect("redis-server");
    let url = broker.url();
    let mut redis = Redis::new(&url);

    let mut run = Run::new();
    let a = run.file("a.toml", &redis_config(&url, "a"));
    let b = run.file("b.toml", &redis_config(&url, "b"));
    let a = run.standalone("a", &a, &url);
    let b = run.standalone("b", &b, &url);
    // Both read the (empty) stream before the sentences arrive, so neither
    // has them all by starting first.
    run.wait_until("both consumers are in the group", LIMIT, |_| {
        let consumers = redis.consumers().or_else(|e| {
            if e.contains("no such key") || e.contains("NOGROUP") {
                Ok(HashMap::new())
            } else {
                Err(e)
            }
        })?;
        Ok(consumers.contains_key("a") && consumers.contains_key("b"))
    });
    redis.add_sentences(COUNT);
    run.wait_until("every entry is acked", LIMIT, |_| {
        Ok(redis.group()?.is_some_and(|g| g.done(COUNT)))
    });

    let sa = run.stop_topology(a);
    let sb = run.stop_topology(b);
    let counts = redis.counts().unwrap_or_else(|e| run.fail(&e));
    let dup = check_counts(&counts, &expected)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    eprintln!(
        "two_topology_servers_share_one_redis_group: a: {}; b: {}; took {:.1?}",
        sa.line,
        sb.line,
        started.elapsed()
    );
    assert!(sa.acked > 0 && sb.acked > 0, "{sa:?} {sb:?}");
    assert_eq!(sa.acked + sb.acked, COUNT, "{sa:?} {sb:?}");
    assert_eq!(dup.words, 0, "duplicates without a failure: {dup:?}");
    let consumers = redis.consumers().unwrap_or_else(|e| run.fail(&e));
    assert_eq!(
        consumers,
        HashMap::from([("a".to_owned(), 0), ("b".to_owned(), 0)]),
        "the consumers and their pending entries"
    );
}

/// 100,000 sentences from a JetStream stream, distributed, counted into a
/// Redis hash; the topology server is killed with SIGKILL mid-stream and
/// restarted on its port. JetStream redelivers what the dead server held
/// after `ack_wait`: no word occurrence is lost, and the duplicates are
/// bounded by what it held (at most `max_ack_pending` = `max_pending`).
#[test]
fn nats_topology_server_kill_9_loses_nothing() {
    let _serial = serial();
    let started = Instant::now();
    const COUNT: u64 = 100_000;
    let expected = cycled_counts(COUNT);

    let nats_server = NatsServer::start().expect("nats-server");
    let nats = Nats::new(&nats_server.url());
    nats.add_sentences(COUNT);
    let broker = RedisServer::start().expect("redis-server");
    let url = broker.url();
    let mut redis = Redis::new(&url);

    let mut run = Run::new();
    let config = run.file("Topology.toml", &nats_config(&nats_server.url()));
    let (server, port) = run.server("server", &config, 0);
    let workers = run.workers(&config, port, &url);

    let the = expected["the"];
    run.wait_until("a fifth of the sentences are counted", LIMIT, |_| {
        Ok(redis.count("the")? > the / 5)
    });
    run.kill_9(server);

    // Delivered to the dead server and not acked: JetStream caps them at
    // max_ack_pending (max_pending by default), and they are all that can
    // be handled twice.
    let at_kill = match nats.consumer() {
        Ok(Some(c)) => c,
        Ok(None) => run.fail("no durable consumer"),
        Err(e) => run.fail(&e),
    };
    let (held, unread) = (at_kill.ack_pending, at_kill.pending);
    if held == 0 || unread == 0 {
        run.fail(&format!("not mid-stream when killed: {at_kill:?}"));
    }
    assert!(held <= MAX_PENDING, "{held} messages un-acked at the kill");

    let restarted = Instant::now();
    let (server, _) = run.server("server (restarted)", &config, port);
    run.wait_until("every message is acked", LIMIT + NATS_ACK_WAIT, |_| {
        Ok(nats
            .consumer()?
            .is_some_and(|c| c.ack_pending == 0 && c.pending == 0 && c.ack_floor == COUNT))
    });
    let after_restart = restarted.elapsed();

    let summary = run.stop_topology(server);
    let connections: Vec<u64> = workers.iter().map(|&w| run.stop_worker(w)).collect();
    let counts = redis.counts().unwrap_or_else(|e| run.fail(&e));
    let dup = check_counts(&counts, &expected)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    eprintln!(
        "nats_topology_server_kill_9_loses_nothing: at the kill {held} messages un-acked, \
         {unread} undelivered; restarted server: {} (done {after_restart:.1?} after the restart); \
         worker connections {connections:?}; {} duplicate words (~{:.0} sentences), at least {} \
         sentences handled twice; took {:.1?}",
        summary.line,
        dup.words,
        dup.words as f64 / 6.4,
        dup.sentences_at_least,
        started.elapsed()
    );
    assert_eq!(summary.acked, held + unread, "{}", summary.line);
    assert_eq!(summary.dead_lettered, 0, "{}", summary.line);
    assert!(connections.iter().all(|&c| c >= 2), "{connections:?}");
    assert!(
        dup.sentences_at_least <= held,
        "{dup:?}: more sentences handled twice than the {held} the dead server held"
    );
}

/// A standalone run reading 20,000 sentences from Redis (and counting into
/// the same server) while the Redis server is killed and restarted with its
/// append-only file: the source and the output reconnect, the run resumes,
/// and no word occurrence is lost.
#[test]
fn standalone_redis_broker_restart_resumes() {
    let _serial = serial();
    let started = Instant::now();
    const COUNT: u64 = 20_000;
    let expected = cycled_counts(COUNT);

    let mut broker = RedisServer::start().expect("redis-server");
    let url = broker.url();
    let mut redis = Redis::new(&url);
    redis.add_sentences(COUNT);

    let mut run = Run::new();
    let config = run.file("Topology.toml", &redis_config(&url, "standalone"));
    let standalone = run.standalone("standalone", &config, &url);

    let the = expected["the"];
    run.wait_until("a fifth of the sentences are counted", LIMIT, |_| {
        Ok(redis.count("the")? > the / 5)
    });
    let before = redis.count("the").unwrap_or_else(|e| run.fail(&e));
    broker
        .restart()
        .unwrap_or_else(|e| run.fail(&format!("restarting redis-server: {e}")));
    // Nothing moved while the broker was down: what the group still has
    // to deliver or see acked shows that the restart was mid-stream.
    let at_restart = match redis.group() {
        Ok(Some(g)) => g,
        Ok(None) => run.fail("the group did not survive the restart"),
        Err(e) => run.fail(&e),
    };
    if at_restart.done(COUNT) {
        run.fail(&format!(
            "not mid-stream when restarted: {at_restart:?} ({before} `the`)"
        ));
    }

    run.wait_until("every entry is acked", LIMIT, |_| {
        Ok(redis.group()?.is_some_and(|g| g.done(COUNT)))
    });
    // The source logs `connected to redis url=...` at each successful
    // connect: the first one and the reconnects.
    let connects = run
        .proc(standalone)
        .stderr
        .text()
        .matches(" connected to redis url=")
        .count();
    let summary = run.stop_topology(standalone);
    let counts = redis.counts().unwrap_or_else(|e| run.fail(&e));
    let dup = check_counts(&counts, &expected)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    eprintln!(
        "standalone_redis_broker_restart_resumes: {before} of {the} `the` counted at the restart \
         ({at_restart:?}); the source connected {connects} times; {}; {} duplicate words, \
         at least {} sentences handled twice; took {:.1?}",
        summary.line,
        dup.words,
        dup.sentences_at_least,
        started.elapsed()
    );
    assert!(connects >= 2, "the source never reconnected");
    // Every entry was acked once: those in flight through the outage were
    // replayed, not read again.
    assert_eq!(summary.acked, COUNT, "{}", summary.line);
    assert_eq!(summary.dead_lettered, 0, "{}", summary.line);
}
