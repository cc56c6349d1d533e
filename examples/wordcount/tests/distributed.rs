//! The distributed runtime with real processes: a `wordcount topology`
//! server and one `wordcount task` worker process per task instance
//! (split ×1 → count ×2 → output ×1), killed, restarted and stopped while
//! they run. The `output` workers append every total they receive to a
//! shared file ([`wordcount::OUTPUT_ENV`]), flushed before the batch is
//! acked: the durable record these tests check for lost and duplicated work.

#![cfg(unix)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{acked_in, task_args, words, Id, Run, SENTENCES};
use wordcount::OUTPUT_ENV;

/// The longest any single wait may take (a debug build, several tests and
/// their processes sharing the machine). Past it every process is killed and
/// the test fails.
const LIMIT: Duration = Duration::from_secs(60);

/// How often a bounded wait looks at its condition again.
const POLL: Duration = Duration::from_millis(10);

/// The batch size written into every Topology.toml below: the most
/// messages one batch brings to a worker.
const BATCH_SIZE: u64 = 256;

/// The roots in flight at most, written into every Topology.toml below:
/// what bounds the roots a lost worker's replay repeats.
const MAX_PENDING: u64 = 2_000;

/// The batches each upstream may have in flight to a worker (`--credit`,
/// passed explicitly).
const CREDIT: u64 = 4;

/// The totals of `SENTENCES[i % len]` for `i` in `0..n`: what the
/// generator source sends when it has sent `n` messages.
fn cycled_counts(n: u64) -> HashMap<String, u64> {
    common::cycled_counts(&SENTENCES, n)
}

/// A Topology.toml selecting the generator source over [`SENTENCES`]:
/// `count` messages, at `rate` per second if given. The console metrics are
/// turned off, so stdout carries only the lines the tests look for.
fn config_text(count: u64, rate: Option<f64>) -> String {
    let payloads: Vec<String> = SENTENCES.iter().map(|s| format!("{s:?}")).collect();
    let rate = rate.map(|r| format!("rate = {r:?}\n")).unwrap_or_default();
    format!(
        "batch_size = {BATCH_SIZE}\n\
         max_pending = {MAX_PENDING}\n\
         [source]\n\
         kind = \"generator\"\n\
         [source.config]\n\
         count = {count}\n\
         {rate}\
         payloads = [{}]\n\
         [metric]\n\
         targets = []\n",
        payloads.join(", ")
    )
}

/// The `word total` lines of the totals file, counted as they are appended.
struct Totals {
    path: PathBuf,
    read: u64,
    lines: u64,
}

impl Totals {
    /// Lines appended so far (complete lines only).
    fn lines(&mut self) -> u64 {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return 0; // not created yet
        };
        f.seek(SeekFrom::Start(self.read))
            .expect("seeking the totals");
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).expect("reading the totals");
        // Count only up to the last newline: a line being written is counted
        // (and its bytes consumed) once it is complete.
        if let Some(end) = buf.iter().rposition(|&b| b == b'\n') {
            self.lines += buf[..=end].iter().filter(|&&b| b == b'\n').count() as u64;
            self.read += end as u64 + 1;
        }
        self.lines
    }
}

/// What the totals file holds: for every word, how many times each total
/// was written.
struct Seen {
    /// `word total` records read (whole lines and recovered torn ones).
    lines: u64,
    /// Lines torn by a killed writer (see [`Seen::read`]).
    torn: u64,
    totals: HashMap<String, HashMap<u64, u64>>,
}

impl Seen {
    /// Reads the totals file.
    ///
    /// A writer killed inside a `write` may leave part of a line without its
    /// newline; the next writer's first line is then appended to it, as in
    /// `ago 12the 5`. Such a torn line counts in `torn`: its fragment is
    /// dropped and the line after it recovered as the longest suffix of its
    /// word part that is a word of the input (unambiguous: no word of the
    /// input ends with another one). A last line without its newline is a
    /// fragment too.
    fn read(path: &Path) -> Seen {
        let vocabulary: HashSet<String> = SENTENCES.iter().flat_map(|s| words(s)).collect();
        for w in &vocabulary {
            for v in &vocabulary {
                assert!(w == v || !w.ends_with(v.as_str()), "`{w}` ends with `{v}`");
            }
        }
        let text = std::fs::read_to_string(path).expect("reading the totals");
        let mut seen = Seen {
            lines: 0,
            torn: 0,
            totals: HashMap::new(),
        };
        let (whole, tail) = match text.rfind('\n') {
            Some(end) => text.split_at(end + 1),
            None => ("", text.as_str()),
        };
        if !tail.is_empty() {
            eprintln!("the totals end inside a line: {tail:?}");
            seen.torn += 1;
        }
        for line in whole.lines() {
            let record = line
                .rsplit_once(' ')
                .and_then(|(head, n)| Some((head, n.parse::<u64>().ok()?)));
            let Some((head, n)) = record else {
                panic!("not a `word total` line: {line:?}");
            };
            let word = if vocabulary.contains(head) {
                head
            } else {
                let suffix = head
                    .char_indices()
                    .skip(1)
                    .map(|(i, _)| &head[i..])
                    .find(|w| vocabulary.contains(*w));
                let Some(word) = suffix else {
                    panic!("not a `word total` line: {line:?}");
                };
                eprintln!("a torn line: {line:?}, read as `{word} {n}`");
                seen.torn += 1;
                word
            };
            *seen
                .totals
                .entry(word.to_owned())
                .or_default()
                .entry(n)
                .or_insert(0) += 1;
            seen.lines += 1;
        }
        seen
    }

    /// Every problem with "each word `w` has every total `1..=want[w]` and
    /// none above it": one line per word, naming the first missing totals.
    fn problems(&self, want: &HashMap<String, u64>) -> Vec<String> {
        let mut problems = self.lost(want);
        for (w, &e) in want {
            let above = self
                .totals
                .get(w)
                .map_or(0, |g| g.keys().filter(|&&n| n > e).count());
            if above > 0 {
                problems.push(format!("`{w}`: {above} totals above {e}"));
            }
        }
        problems.sort();
        problems
    }

    /// How many `word total` lines each word has: one per occurrence
    /// counted and written.
    fn written(&self, word: &str) -> u64 {
        self.totals.get(word).map_or(0, |g| g.values().sum())
    }

    /// After kills, replayed sentences are counted again with new running
    /// totals (the totals sent to a killed output worker are never
    /// written), so what proves nothing lost is that every word has at
    /// least as many lines as it has occurrences: every problem with that.
    fn short(&self, want: &HashMap<String, u64>) -> Vec<String> {
        let mut problems: Vec<String> = want
            .iter()
            .filter(|(w, &e)| self.written(w) < e)
            .map(|(w, &e)| format!("`{w}`: {} lines for {e} occurrences", self.written(w)))
            .chain(
                self.totals
                    .keys()
                    .filter(|w| !want.contains_key(*w))
                    .map(|w| format!("`{w}`: not a word of the input")),
            )
            .collect();
        problems.sort();
        problems
    }

    /// Every word occurrence lost: for each word, the totals `1..=want[w]`
    /// not written (count emits each running total once, so a missing total
    /// is an occurrence never counted), and words not in the input.
    fn lost(&self, want: &HashMap<String, u64>) -> Vec<String> {
        let mut problems = Vec::new();
        for (w, &e) in want {
            let got = self.totals.get(w);
            let missing: Vec<u64> = (1..=e)
                .filter(|n| !got.is_some_and(|g| g.contains_key(n)))
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "`{w}`: {} of the totals 1..={e} missing, first {:?}",
                    missing.len(),
                    &missing[..missing.len().min(10)]
                ));
            }
        }
        for w in self.totals.keys() {
            if !want.contains_key(w) {
                problems.push(format!("`{w}`: not a word of the input"));
            }
        }
        problems.sort();
        problems
    }
}

/// A distributed run: a directory with the Topology.toml and the totals
/// file, and every process started. Dropping it kills whatever still runs.
struct Cluster {
    run: Run,
    config: PathBuf,
    totals: PathBuf,
}

impl Deref for Cluster {
    type Target = Run;
    fn deref(&self) -> &Run {
        &self.run
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Run {
        &mut self.run
    }
}

impl Cluster {
    fn new(config: &str) -> Cluster {
        let run = Run::new(LIMIT, POLL);
        let config = run.file("Topology.toml", config);
        let totals = run.dir.path().join("totals.txt");
        Cluster {
            run,
            config,
            totals,
        }
    }

    /// Starts the topology server on `port` (0: any) and waits until it
    /// listens; returns it and its address.
    #[track_caller]
    fn server(&mut self, port: u16) -> (Id, String) {
        let config = self.config.clone();
        self.run.server("server", &config, port)
    }

    /// Starts a worker of `task`, claiming `instance`, connecting to `addr`.
    /// Only `output` workers get the totals file.
    fn worker(&mut self, task: &str, instance: u32, addr: &str) -> Id {
        let nth = self
            .procs
            .iter()
            .filter(|p| p.label.starts_with(&format!("{task}/{instance}")))
            .count();
        let label = match nth {
            0 => format!("{task}/{instance}"),
            n => format!("{task}/{instance} (#{})", n + 1),
        };
        let config = self.config.to_str().unwrap().to_owned();
        let instance = instance.to_string();
        let credit = CREDIT.to_string();
        let args = task_args(task, &instance, addr, &config, &["--credit", &credit]);
        let totals = self.totals.clone();
        let env = (task == "output").then_some((OUTPUT_ENV, totals.as_os_str()));
        self.run.spawn(&label, &args, env)
    }

    /// One worker per instance of the word count: split ×1, count ×2, output ×1.
    fn workers(&mut self, addr: &str) -> Workers {
        Workers {
            split: self.worker("split", 0, addr),
            count: [self.worker("count", 0, addr), self.worker("count", 1, addr)],
            output: self.worker("output", 0, addr),
        }
    }

    /// Waits until the totals file has more than `n` lines, while `server`
    /// runs (the run ending first fails the test: what was to happen
    /// mid-stream would not).
    #[track_caller]
    fn wait_lines(&mut self, server: Id, n: u64) {
        let mut totals = Totals {
            path: self.totals.clone(),
            read: 0,
            lines: 0,
        };
        self.wait_until(&format!("the totals file has {n} lines"), LIMIT, |c| {
            if totals.lines() > n {
                return Ok(true);
            }
            match c.proc(server).exited() {
                Some(status) => Err(format!(
                    "the server exited ({status}) with only {} lines written",
                    totals.lines()
                )),
                None => Ok(false),
            }
        });
    }

    /// Fails the test unless `server` still runs: what is about to happen was
    /// meant to happen mid-stream.
    #[track_caller]
    fn still_running(&mut self, server: Id, what: &str) {
        if let Some(status) = self.proc(server).exited() {
            self.fail(&format!(
                "the run ended ({status}) before {what}: nothing was left to test"
            ));
        }
    }

    /// SIGKILLs the worker `id` of `task` and waits until `server` logs that
    /// it replayed the roots the worker held (when its control link closed,
    /// or when the peer link to it broke, whichever it noticed first);
    /// returns how long after the kill that was.
    #[track_caller]
    fn kill_and_time_the_replay(&mut self, id: Id, server: Id, task: &str) -> Duration {
        let marker = "roots replayed:";
        let task_field = format!("task={task}");
        let replays = |c: &mut Run| {
            c.proc(server)
                .stderr
                .text()
                .lines()
                .filter(|l| l.contains(marker) && l.contains(&task_field))
                .count()
        };
        let before = replays(self);
        let killed = std::time::Instant::now();
        self.kill_9(id);
        self.wait_until(&format!("the server replays {task}'s roots"), LIMIT, |c| {
            Ok(replays(c) > before)
        });
        killed.elapsed()
    }

    /// SIGTERMs the worker `id` and checks that it exits 0 and prints how many
    /// messages it handled; returns that number.
    #[track_caller]
    fn stop_worker(&mut self, id: Id) -> u64 {
        let stdout = self.stop(id);
        let label = self.proc(id).label.clone();
        let task = label.split('/').next().unwrap();
        let prefix = format!("worker {task}: handled ");
        match stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
        {
            Some(n) => n,
            None => self.fail(&format!("{label}: no `{prefix}N messages` line")),
        }
    }
}

/// The worker processes of a run.
struct Workers {
    split: Id,
    count: [Id; 2],
    output: Id,
}

impl Workers {
    fn all(&self) -> [Id; 4] {
        [self.split, self.count[0], self.count[1], self.output]
    }
}

/// Kills a middle worker (split) and the last worker (output) with SIGKILL
/// mid-stream, 200,000 sentences, and starts replacements: every root the
/// killed worker held or had been sent is replayed within 2 s of the kill,
/// no word occurrence is lost, and what was counted twice is bounded by the
/// roots in flight.
#[test]
fn kill_9_loses_nothing() {
    const COUNT: u64 = 200_000;
    let expected = cycled_counts(COUNT);
    let expected_lines: u64 = expected.values().sum();

    let mut c = Cluster::new(&config_text(COUNT, None));
    let (server, addr) = c.server(0);
    let w = c.workers(&addr);

    // Under way: kill the split worker and start another in its place.
    c.wait_lines(server, expected_lines / 5);
    c.still_running(server, "the split worker was killed");
    let split_replay = c.kill_and_time_the_replay(w.split, server, "split");
    let split = c.worker("split", 0, &addr);

    // Later: the same for the output worker.
    c.wait_lines(server, expected_lines * 6 / 10);
    c.still_running(server, "the output worker was killed");
    let output_replay = c.kill_and_time_the_replay(w.output, server, "output");
    let output = c.worker("output", 0, &addr);

    let summary = c.summary(server);
    if !summary.starts_with(&format!("wordcount: {COUNT} roots acked, 0 failed, ")) {
        c.fail(&format!("not every root acked: {summary}"));
    }
    // Both replacements did work: the run could not have ended otherwise.
    for id in [split, output] {
        if !c.proc(id).stderr.contains("joined the topology server") {
            let label = c.proc(id).label.clone();
            c.fail(&format!("{label} never joined"));
        }
    }

    // Every word occurrence was counted and written at least once.
    let seen = Seen::read(&c.totals);
    let short = seen.short(&expected);
    if !short.is_empty() {
        c.fail(&format!("lost word occurrences:\n{}", short.join("\n")));
    }
    // A killed worker's roots are replayed: at most MAX_PENDING sentences at
    // each of the two kills. A sentence has 6 to 8 words, and a torn line
    // was written but is not counted here.
    let over = seen.lines - expected_lines;
    let duplicates_at_most = over / 6;
    eprintln!(
        "kill_9_loses_nothing: replayed {split_replay:?} after the split kill, \
         {output_replay:?} after the output kill; {} lines for {expected_lines} word \
         occurrences: {over} written twice, at most {duplicates_at_most} sentences \
         (bound {}); {} torn",
        seen.lines,
        2 * MAX_PENDING,
        seen.torn
    );
    // Only the killed output worker can have left a torn line.
    assert!(seen.torn <= 1, "{} torn lines", seen.torn);
    assert!(
        duplicates_at_most <= 2 * MAX_PENDING,
        "{over} word occurrences written twice: more sentences than the {} in flight at the two kills",
        2 * MAX_PENDING
    );
    for (what, t) in [("split", split_replay), ("output", output_replay)] {
        assert!(
            t < Duration::from_secs(2),
            "the {what} worker's roots were replayed {t:?} after its kill"
        );
    }
}

/// Workers started before their server retry until it listens; the run
/// then completes.
#[test]
fn worker_started_before_its_server_connects() {
    const COUNT: u64 = 5_000;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut c = Cluster::new(&config_text(COUNT, None));
    let w = c.workers(&addr);
    for id in w.all() {
        let what = format!("{} retries", c.proc(id).label);
        c.wait_until(&what, LIMIT, |c| {
            let p = c.proc(id);
            if p.stderr.contains("cannot join the topology server") {
                return Ok(true);
            }
            match p.exited() {
                Some(status) => Err(format!("it exited ({status})")),
                None => Ok(false),
            }
        });
    }

    let (server, _) = c.server(port);
    let summary = c.summary(server);
    if !summary.starts_with(&format!("wordcount: {COUNT} roots acked, 0 failed, ")) {
        c.fail(&format!("not every root acked: {summary}"));
    }
    let expected = cycled_counts(COUNT);
    let seen = Seen::read(&c.totals);
    let problems = seen.problems(&expected);
    if !problems.is_empty() {
        c.fail(&format!("wrong totals:\n{}", problems.join("\n")));
    }
    assert_eq!(seen.torn, 0, "torn lines without a kill");
    for id in w.all() {
        c.stop_worker(id);
    }
}

/// SIGTERM on the server drains the roots in flight, tells the workers, and
/// exits 0; the workers then stop cleanly on SIGTERM.
#[test]
fn sigterm_on_the_server_drains_cleanly() {
    let mut c = Cluster::new(&config_text(10_000_000, Some(20_000.0)));
    let (server, addr) = c.server(0);
    let w = c.workers(&addr);

    c.wait_lines(server, 20_000);
    c.proc(server).signal(libc::SIGTERM);
    let summary = c.summary(server);
    let acked = acked_in(&summary);
    if acked == 0
        || !summary.contains(" roots acked, 0 failed, 0 dead-lettered")
        || summary.contains("left un-acked")
    {
        c.fail(&format!("not a clean drain: {summary}"));
    }

    for id in w.all() {
        let what = format!("{} hears that the server left", c.proc(id).label);
        c.wait_until(&what, LIMIT, |c| {
            let p = c.proc(id);
            if p.stderr.contains("the server is shutting down")
                || p.stderr.contains("cannot join the topology server")
            {
                return Ok(true);
            }
            match p.exited() {
                Some(status) => Err(format!("it exited ({status})")),
                None => Ok(false),
            }
        });
    }

    // Drained completely: the sentences sent, 0..acked, were all counted,
    // so for every word the totals written are 1..=max without a gap. Read
    // while the workers still run: what was acked was written already.
    let expected = cycled_counts(acked);
    let seen = Seen::read(&c.totals);
    let problems = seen.problems(&expected);
    if !problems.is_empty() {
        c.fail(&format!("lost or wrong totals:\n{}", problems.join("\n")));
    }
    assert_eq!(seen.torn, 0, "torn lines without a kill");
    let duplicates = seen.lines - expected.values().sum::<u64>();
    let written = std::fs::metadata(&c.totals).unwrap().len();

    let mut handled = Vec::new();
    for id in w.all() {
        let n = c.stop_worker(id);
        handled.push((c.proc(id).label.clone(), n));
    }
    eprintln!(
        "sigterm_on_the_server_drains_cleanly: {summary}; workers handled {handled:?}; \
         {duplicates} duplicates"
    );
    // The output worker had nothing left to write when it stopped.
    assert_eq!(std::fs::metadata(&c.totals).unwrap().len(), written);
}

/// SIGTERM on a count worker: it finishes its batch, returns the results and
/// exits 0; a replacement takes over and every root is acked.
#[test]
fn sigterm_on_a_worker_finishes_its_batch() {
    const COUNT: u64 = 60_000;
    let mut c = Cluster::new(&config_text(COUNT, Some(20_000.0)));
    let (server, addr) = c.server(0);
    let w = c.workers(&addr);

    c.wait_lines(server, 20_000);
    c.still_running(server, "count/0 was stopped");
    let handled = c.stop_worker(w.count[0]);
    if handled == 0 {
        c.fail("count/0 handled nothing before its SIGTERM");
    }
    let count = c.worker("count", 0, &addr);

    let summary = c.summary(server);
    if !summary.starts_with(&format!("wordcount: {COUNT} roots acked, 0 failed, ")) {
        c.fail(&format!("not every root acked: {summary}"));
    }
    let replaced = c.stop_worker(count);
    eprintln!(
        "sigterm_on_a_worker_finishes_its_batch: count/0 handled {handled} messages, \
         its replacement {replaced}; {summary}"
    );
    if replaced == 0 {
        c.fail("the replacement count/0 handled nothing");
    }
}

/// A data-plane port beyond loopback needs the deployment's secret, and TLS
/// unless `--insecure` (which warns): a topology's messages never cross a
/// network in clear by accident.
#[test]
fn a_port_beyond_loopback_needs_the_secret_and_tls_unless_insecure() {
    let secret = "a-data-plane-secret-of-this-test";
    let refused = |args: &[&str], secret: Option<&str>| -> String {
        let mut cmd = common::command(args);
        if let Some(s) = secret {
            cmd.env("TEMPEST_DATA_SECRET", s);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let server = ["topology", "--host", "0.0.0.0", "--port", "0"];
    let err = refused(&server, None);
    assert!(err.contains("without a data-plane secret"), "{err}");
    let err = refused(&server, Some(secret));
    assert!(
        err.contains("without TLS")
            && err.contains("TEMPEST_DATA_TLS_CERT")
            && err.contains("--insecure"),
        "{err}"
    );
    let worker = task_args("split", "0", "127.0.0.1:9", "/nonexistent", &[]);
    let mut worker: Vec<&str> = worker.iter().map(String::as_str).collect();
    worker.truncate(worker.len() - 2); // no --config
    worker.extend(["--peer-listen", "0.0.0.0:0"]);
    let err = refused(&worker, Some(secret));
    assert!(
        err.contains("peer links") && err.contains("without TLS"),
        "{err}"
    );
    // --insecure: it listens, and says what it gives up.
    let mut cmd = common::command(&[&server[..], &["--insecure"]].concat());
    cmd.env("TEMPEST_DATA_SECRET", secret);
    let mut p = common::Proc::spawn("server", cmd);
    tempest_testkit::cluster::wait_for(
        "the insecure server listening, warning",
        Duration::from_secs(30),
        || {
            let log = p.stderr.text();
            (common::listening_addr(&p.stdout.text()).is_some()
                && log.contains("WARN")
                && log.contains("without TLS"))
            .then_some(())
        },
    );
    assert!(p.running(), "{}", p.stderr.text());
}
