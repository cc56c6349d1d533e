//! Word count reading Kafka through its Topology.toml: the example's
//! `kafka.toml` (with the test broker's address put in), run as a real
//! `wordcount standalone` process against a real Kafka-compatible broker
//! (tansu, started by tempest-testkit). The `output` task appends every
//! total to a file ([`wordcount::OUTPUT_ENV`]), flushed before its batch is
//! acked, so once the group's committed offsets reach the end of every
//! partition the file holds every count. Each word's count must then be
//! exactly its number of occurrences: none lost, none counted twice.
//!
//! Then the faults, with real processes (as `brokers.rs` does for Redis and
//! NATS): a topology server killed with SIGKILL mid-stream and restarted as
//! the same static group member; two servers in one group, one of them
//! killed; the broker down at the start of a standalone run and restarted
//! under it mid-stream. After each, every word must be counted at least as
//! often as it occurs (zero lost), and the duplicates are bounded.
//!
//! The tests take turns ([`serial`]): each runs a broker and up to ten
//! processes, and the machine may have few cores.

#![cfg(unix)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::{
    command_info, cycled_counts, listening_addr, port_of, sentence, task_args, Id, Proc, Run,
    Summary, LISTENING, SENTENCES,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tempest_connectors::kafka::SOURCE_CONSUMER_ENV;
use tempest_testkit::kafka::KafkaServer;
use wordcount::OUTPUT_ENV;

/// The example's Topology.toml for Kafka.
const KAFKA_TOML: &str = include_str!("../kafka.toml");
/// Its broker address, replaced by the test broker's.
const EXAMPLE_BROKERS: &str = "brokers = \"127.0.0.1:9092\"";

/// The topic and group `kafka.toml` names.
const TOPIC: &str = "sentences";
const GROUP: &str = "wordcount";
const PARTITIONS: i32 = 3;

/// Sentences produced.
const N: u64 = 500;

/// The bound on any one wait (a debug build on a small, busy machine).
const LIMIT: Duration = Duration::from_secs(120);
/// How often a bounded wait looks at its condition again.
const POLL: Duration = Duration::from_millis(50);

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Creates `TOPIC` with `PARTITIONS` partitions and waits until the broker
/// reports them.
fn create_topic(bootstrap: &str) {
    let admin: AdminClient<DefaultClientContext> = client(bootstrap).create().unwrap();
    let results = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(admin.create_topics(
            &[NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .expect("creating the topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
    let c: BaseConsumer = client(bootstrap).create().unwrap();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let partitions = c
            .fetch_metadata(Some(TOPIC), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == TOPIC && t.error().is_none())
                    .map(|t| t.partitions().len())
            });
        if partitions == Some(PARTITIONS as usize) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the topic has no {PARTITIONS} partitions: {partitions:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Produces sentences `0..n` ([`sentence`]), keyed `s<i>` (spread over the
/// partitions by key), and waits until the broker has them all.
fn produce(bootstrap: &str, n: u64) {
    let p: BaseProducer = client(bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    for i in 0..n {
        let key = format!("s{i}");
        let mut r = Some(BaseRecord::to(TOPIC).key(&key).payload(sentence(i)));
        while let Some(rec) = r.take() {
            if let Err((e, rec)) = p.send(rec) {
                assert!(e.to_string().contains("Queue full"), "producing: {e}");
                p.poll(Duration::from_millis(50));
                r = Some(rec);
            }
        }
    }
    p.flush(Duration::from_secs(30))
        .expect("sentences delivered");
}

/// The end offset (high watermark) of each partition.
fn end_offsets(bootstrap: &str) -> Vec<i64> {
    let c: BaseConsumer = client(bootstrap).create().unwrap();
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(TOPIC, p, Duration::from_secs(10))
                .expect("the partition's watermarks")
                .1
        })
        .collect()
}

/// The offsets [`GROUP`] committed for each partition (-1: none), or an
/// error while the broker does not answer.
fn committed(bootstrap: &str) -> Result<Vec<i64>, String> {
    let c: BaseConsumer = client(bootstrap)
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok((0..PARTITIONS)
        .map(|p| match got.find_partition(TOPIC, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect())
}

/// The highest total of each word in the totals file (`word total` lines,
/// totals only growing): its count.
fn counted(totals: &str) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for line in totals.lines() {
        let (word, total) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a `word total` line: {line:?}"));
        let total: u64 = total
            .parse()
            .unwrap_or_else(|_| panic!("not a `word total` line: {line:?}"));
        let n = counts.entry(word.to_owned()).or_insert(0);
        *n = (*n).max(total);
    }
    counts
}

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time (a failed test does not stop the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn standalone_counts_every_sentence_of_a_kafka_topic_exactly_once() {
    let _serial = serial();
    let server = KafkaServer::start().expect("tansu (scripts/test installs it)");
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap);
    produce(&bootstrap, N);
    let ends = end_offsets(&bootstrap);
    assert_eq!(ends.iter().sum::<i64>(), N as i64, "{ends:?}");
    assert!(
        ends.iter().all(|&e| e > 0),
        "every partition has sentences: {ends:?}"
    );

    assert!(
        KAFKA_TOML.contains(EXAMPLE_BROKERS),
        "kafka.toml names its brokers"
    );
    let text = KAFKA_TOML.replace(EXAMPLE_BROKERS, &format!("brokers = \"{bootstrap}\""));
    let mut run = Run::new(LIMIT, POLL);
    let config = run.file("Topology.toml", &text);
    let totals = run.dir.path().join("totals");
    let args = ["standalone", "--config", config.to_str().unwrap()];
    let id = run.spawn("standalone", &args, Some((OUTPUT_ENV, totals.as_os_str())));

    // Committed means counted: the totals file is flushed before a batch
    // is acked, and the source commits only offsets below every unacked one.
    run.wait_until(
        "the committed offsets reach the end of every partition",
        LIMIT,
        |_| Ok(committed(&bootstrap).is_ok_and(|c| c == ends)),
    );
    let counts = counted(&std::fs::read_to_string(&totals).expect("the totals file"));

    run.proc(id).signal(libc::SIGTERM);
    let line = run.summary(id);
    let summary = Summary::parse(&line).unwrap_or_else(|| run.fail("a summary line"));
    assert_eq!(summary.acked, N, "{line}");
    assert_eq!(summary.dead_lettered, 0, "{line}");
    assert_eq!(committed(&bootstrap), Ok(ends.clone()), "after the stop");

    // Exactly: no word short (nothing lost), none over (nothing counted
    // twice), no word that is not in the sentences.
    let expected = cycled_counts(&SENTENCES, N);
    let mut problems: Vec<String> = expected
        .iter()
        .filter_map(|(w, &e)| {
            let got = counts.get(w).copied().unwrap_or(0);
            (got != e).then(|| format!("`{w}`: {got} counted, {e} expected"))
        })
        .chain(
            counts
                .keys()
                .filter(|w| !expected.contains_key(*w))
                .map(|w| format!("`{w}`: not a word of the sentences")),
        )
        .collect();
    problems.sort();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // And the counts do add up to every word of every sentence.
    let words: u64 = (0..N)
        .map(|i| common::words(sentence(i)).count() as u64)
        .sum();
    assert_eq!(counts.values().sum::<u64>(), words);
}

// ------------------------------------------------------------------ faults

/// `max_pending` of the fault runs: the most roots in flight in a server.
const MAX_PENDING: u64 = 2_000;
/// `batch_size` of the fault runs (worker pulls and source reads).
const BATCH_SIZE: u64 = 512;

/// A Topology.toml reading [`TOPIC`] as group [`GROUP`] from `bootstrap`,
/// with librdkafka `properties` (`"name" = value` lines). As in
/// `brokers.rs`: the retry policy, so that no root is acked unhandled; a
/// `message_timeout` far above a root's time in flight, so that no root
/// times out (a replay would count its words again); no metrics on stdout.
fn fault_config(bootstrap: &str, properties: &[&str]) -> String {
    format!(
        "name = \"wordcount\"\n\
         max_pending = {MAX_PENDING}\n\
         batch_size = {BATCH_SIZE}\n\
         message_timeout = \"10s\"\n\
         grace_period = \"10s\"\n\
         [failure]\n\
         policy = \"retry\"\n\
         max_attempts = 20\n\
         backoff = \"100ms\"\n\
         max_backoff = \"1s\"\n\
         [metric]\n\
         targets = []\n\
         [source]\n\
         kind = \"kafka\"\n\
         [source.config]\n\
         brokers = \"{bootstrap}\"\n\
         group = \"{GROUP}\"\n\
         topics = [\"{TOPIC}\"]\n\
         batch_size = {BATCH_SIZE}\n\
         poll_ms = 100\n\
         [source.config.properties]\n\
         {}\n",
        properties.join("\n")
    )
}

/// Starts a topology server over `config` on `port` (0: any), with
/// `identity` as its stable consumer identity if given
/// ([`SOURCE_CONSUMER_ENV`], as the agent sets it: the consumer's
/// `group.instance.id`, a static member) or none (a dynamic member), and
/// waits until it listens; returns it and its port.
#[track_caller]
fn start_server(
    run: &mut Run,
    label: &str,
    config: &Path,
    port: u16,
    identity: Option<&str>,
) -> (Id, u16) {
    let port = port.to_string();
    let args = [
        "topology",
        "--config",
        config.to_str().unwrap(),
        "--port",
        &port,
    ];
    let mut cmd = command_info(&args);
    match identity {
        Some(id) => cmd.env(SOURCE_CONSUMER_ENV, id),
        None => cmd.env_remove(SOURCE_CONSUMER_ENV),
    };
    run.procs.push(Proc::spawn(label, cmd));
    let id = Id(run.procs.len() - 1);
    let limit = run.limit;
    run.wait_until(&format!("{label} listens"), limit, |r| {
        Ok(r.proc(id).stdout.contains(LISTENING))
    });
    let addr = listening_addr(&run.proc(id).stdout.text()).expect("the listening line");
    (id, port_of(&addr))
}

/// One worker per task instance (split ×1, count ×2, output ×1) for the
/// server on `port`; `output` appends its totals to `totals`.
fn workers(run: &mut Run, config: &Path, port: u16, totals: &Path, label: &str) -> Vec<Id> {
    let addr = format!("127.0.0.1:{port}");
    [("split", 0), ("count", 0), ("count", 1), ("output", 0)]
        .into_iter()
        .map(|(task, instance)| {
            let config = config.to_str().unwrap();
            let args = task_args(task, &instance.to_string(), &addr, config, &[]);
            let label = format!("{label}{task}/{instance}");
            let env = (task == "output").then_some((OUTPUT_ENV, totals.as_os_str()));
            run.spawn(&label, &args, env)
        })
        .collect()
}

/// SIGTERMs the topology server or standalone run `id`; it must exit 0
/// with its summary.
#[track_caller]
fn stop_topology(run: &mut Run, id: Id) -> Summary {
    run.proc(id).signal(libc::SIGTERM);
    let line = run.summary(id);
    Summary::parse(&line).unwrap_or_else(|| run.fail("a summary line"))
}

/// SIGTERMs a worker; it must exit 0. Returns the connections it had to
/// its server.
#[track_caller]
fn stop_worker(run: &mut Run, id: Id) -> u64 {
    stop_worker_counted(run, id).1
}

/// SIGTERMs a worker; it must exit 0. Returns the messages it handled and
/// the connections it had to its server (its `handled N messages over M
/// session(s)` line).
#[track_caller]
fn stop_worker_counted(run: &mut Run, id: Id) -> (u64, u64) {
    let stdout = run.stop(id);
    let counts = stdout.lines().find_map(|l| {
        let (head, rest) = l.split_once(" messages over ")?;
        let handled = head.rsplit(' ').next()?.parse().ok()?;
        let connections = rest.split(' ').next()?.parse().ok()?;
        Some((handled, connections))
    });
    counts.unwrap_or_else(|| {
        let label = run.proc(id).label.clone();
        run.fail(&format!(
            "{label}: no `handled N messages over M session(s)` line"
        ))
    })
}

/// The partitions of the last `partitions assigned` line the Kafka source
/// of a process logged (its assignment now, with the eager protocol).
fn assigned(stderr: &str) -> Option<Vec<i32>> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("partitions assigned"))?;
    let prefix = format!("{TOPIC}/");
    let mut parts: Vec<i32> = line
        .match_indices(&prefix)
        .filter_map(|(i, _)| {
            let digits: String = line[i + prefix.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect();
    parts.sort_unstable();
    Some(parts)
}

/// The records committed so far, over every partition (none committed
/// counts 0), or an error while the broker does not answer.
fn committed_sum(bootstrap: &str) -> Result<i64, String> {
    Ok(committed(bootstrap)?.iter().map(|&c| c.max(0)).sum())
}

/// The records after the committed offsets: what the group reads again.
fn uncommitted(ends: &[i64], committed: &[i64]) -> u64 {
    ends.iter()
        .zip(committed)
        .map(|(&e, &c)| (e - c.max(0)) as u64)
        .sum()
}

/// The counts of the totals files: each word's highest total in each file
/// (its count in that file's pipeline), summed over the files.
fn counted_in(files: &[&Path]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (w, n) in counted(&text) {
            *counts.entry(w).or_insert(0) += n;
        }
    }
    counts
}

/// 100,000 sentences from a 3-partition topic, distributed (a server,
/// split, count ×2, output); the topology server is killed with SIGKILL
/// mid-stream and restarted on its port with the same stable identity, so
/// it rejoins the group as the same static member and gets its partitions
/// back at once. It reads again from the committed offsets: no word
/// occurrence is lost, and what is counted twice is bounded by what the
/// dead server had read past its commits.
///
/// That bound is Kafka's counterpart of the entries un-acked at the broker
/// in `brokers.rs`: the records of the dead server's roots in flight, those
/// done after one still in flight (the low watermark), and those done and
/// not yet committed (commits are asynchronous; tansu answers them late
/// when busy). It is measured as the roots the `split` worker (which lives
/// on) handled, less those of the restarted server, less the records
/// under the commits. Only the part in flight is bounded by `max_pending`.
#[test]
fn kafka_topology_server_kill_9_loses_nothing() {
    let _serial = serial();
    let started = Instant::now();
    const COUNT: u64 = 100_000;
    const IDENTITY: &str = "wordcount/server";
    let expected = cycled_counts(&SENTENCES, COUNT);

    let broker = KafkaServer::start().expect("tansu (scripts/test installs it)");
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap);
    produce(&bootstrap, COUNT);
    let ends = end_offsets(&bootstrap);
    assert_eq!(ends.iter().sum::<i64>(), COUNT as i64, "{ends:?}");
    let produced = started.elapsed();

    let mut run = Run::new(LIMIT, POLL);
    let config = run.file("Topology.toml", &fault_config(&bootstrap, &[]));
    let totals = run.dir.path().join("totals");
    let (server, port) = start_server(&mut run, "server", &config, 0, Some(IDENTITY));
    let workers = workers(&mut run, &config, port, &totals, "");

    // Half way: past the first seconds of reading, when tansu, busy
    // serving the first large fetches, answers commits seconds late.
    run.wait_until("half of the sentences are committed", LIMIT, |_| {
        Ok(committed_sum(&bootstrap).is_ok_and(|c| c > COUNT as i64 / 2))
    });
    run.kill_9(server);
    let killed = Instant::now();

    // The dead server's commits are all it leaves: the restarted one reads
    // every record after them, once.
    let at_kill = committed(&bootstrap).unwrap_or_else(|e| run.fail(&e));
    let left = uncommitted(&ends, &at_kill);
    if left == 0 || left == COUNT {
        run.fail(&format!(
            "not mid-stream when killed: committed {at_kill:?} of {ends:?}"
        ));
    }

    let (server, _) = start_server(
        &mut run,
        "server (restarted)",
        &config,
        port,
        Some(IDENTITY),
    );
    run.wait_until("the restarted server has its partitions", LIMIT, |r| {
        Ok(assigned(&r.proc(server).stderr.text()).is_some_and(|p| p == [0, 1, 2]))
    });
    let rejoined = killed.elapsed();
    run.wait_until("every record is committed", LIMIT, |_| {
        Ok(committed(&bootstrap).is_ok_and(|c| c == ends))
    });
    let resumed = killed.elapsed();

    let summary = stop_topology(&mut run, server);
    let (handled, connections): (Vec<u64>, Vec<u64>) = workers
        .iter()
        .map(|&w| stop_worker_counted(&mut run, w))
        .unzip();
    let counts = counted_in(&[&totals]);
    let dup = common::check_counts(&counts, &expected)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    // The dead server's roots past its commits: `split` handled every root
    // of both servers (each record under the commits at least once).
    let under_commits = COUNT - left;
    let held = handled[0] as i64 - left as i64 - under_commits as i64;
    eprintln!(
        "kafka_topology_server_kill_9_loses_nothing: {COUNT} produced in {produced:.1?}; at the \
         kill {left} records after the commits {at_kill:?}, {held} of them read by the dead \
         server; the restarted server had its partitions {rejoined:.1?} after the kill and was \
         done {resumed:.1?} after it: {}; split handled {}; worker connections {connections:?}; \
         {} duplicate words (~{:.0} sentences), at least {} sentences handled twice; took {:.1?}",
        summary.line,
        handled[0],
        dup.words,
        dup.words as f64 / 6.4,
        dup.sentences_at_least,
        started.elapsed()
    );
    // The restarted server handled exactly what was left after the commits.
    assert_eq!(summary.acked, left, "{}", summary.line);
    assert_eq!(summary.dead_lettered, 0, "{}", summary.line);
    // Every worker reconnected to the restarted server by itself.
    assert!(connections.iter().all(|&c| c >= 2), "{connections:?}");
    assert!(
        held >= 0,
        "split handled {} roots, fewer than the {left} left and the {under_commits} committed",
        handled[0]
    );
    assert!(
        dup.sentences_at_least <= held as u64,
        "{dup:?}: more sentences handled twice than the {held} records the dead server had read \
         past its commits"
    );
}

/// Two topology servers, each with its workers, in one group (dynamic
/// members, as servers started by hand): the group splits the partitions
/// between them. One of them is stopped mid-stream (SIGTERM): it drains
/// its roots in flight, commits, and leaves the group, which moves its
/// partitions to the other; the other's own roots in flight at that
/// rebalance complete within its revocation grace before it lets its
/// partitions go. Nothing is lost, and nothing is counted twice.
///
/// The same with SIGKILL cannot pass against tansu 0.6.0: its group
/// coordinator drops a member whose session timed out but gives its
/// partitions to nobody (a group that has formed keeps its assignments
/// through a rejoin: `SyncGroup` answers each member its old assignment),
/// so the other server never gets them. A server killed with SIGKILL is
/// covered by `kafka_topology_server_kill_9_loses_nothing`, where it comes
/// back under its static identity.
#[test]
fn two_topology_servers_share_one_kafka_group_and_a_stopped_ones_partitions_move() {
    let _serial = serial();
    let started = Instant::now();
    const COUNT: u64 = 50_000;
    let expected = cycled_counts(&SENTENCES, COUNT);

    let broker = KafkaServer::start().expect("tansu (scripts/test installs it)");
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap);

    let mut run = Run::new(LIMIT, POLL);
    let config = run.file("Topology.toml", &fault_config(&bootstrap, &[]));
    let (totals_a, totals_b) = (run.dir.path().join("a"), run.dir.path().join("b"));
    let (a, port_a) = start_server(&mut run, "a", &config, 0, None);
    let workers_a = workers(&mut run, &config, port_a, &totals_a, "a ");
    let (b, port_b) = start_server(&mut run, "b", &config, 0, None);
    let workers_b = workers(&mut run, &config, port_b, &totals_b, "b ");

    // Both are in the group, with the partitions split between them, before
    // the sentences arrive.
    run.wait_until("the partitions are split between a and b", LIMIT, |r| {
        let pa = assigned(&r.proc(a).stderr.text()).unwrap_or_default();
        let pb = assigned(&r.proc(b).stderr.text()).unwrap_or_default();
        let mut all: Vec<i32> = pa.iter().chain(&pb).copied().collect();
        all.sort_unstable();
        Ok(!pa.is_empty() && !pb.is_empty() && all == [0, 1, 2])
    });
    let split = started.elapsed();
    let of_a = assigned(&run.proc(a).stderr.text()).unwrap_or_default();
    // The sentences arrive while both read, and still when a stops, so
    // that b has roots in flight when the group takes its partition back.
    let producer = {
        let bootstrap = bootstrap.clone();
        std::thread::spawn(move || produce(&bootstrap, COUNT))
    };
    run.wait_until("both have committed records", LIMIT, |_| {
        Ok(committed(&bootstrap).is_ok_and(|c| {
            let of_b = (0..PARTITIONS).filter(|p| !of_a.contains(p));
            of_a.iter().any(|&p| c[p as usize] > 0) && of_b.into_iter().any(|p| c[p as usize] > 0)
        }))
    });
    let summary_a = stop_topology(&mut run, a);
    let stopped = Instant::now();
    producer.join().expect("producing the sentences");
    let ends = end_offsets(&bootstrap);
    assert_eq!(ends.iter().sum::<i64>(), COUNT as i64, "{ends:?}");
    // a committed what it acked before it left: b reads the rest.
    let at_stop = committed(&bootstrap).unwrap_or_else(|e| run.fail(&e));
    let left_by_a: u64 = of_a
        .iter()
        .map(|&p| (ends[p as usize] - at_stop[p as usize].max(0)) as u64)
        .sum();
    if left_by_a == 0 {
        run.fail(&format!(
            "a was done when stopped: committed {at_stop:?} of {ends:?}, a had {of_a:?}"
        ));
    }

    run.wait_until("b has every partition", LIMIT, |r| {
        Ok(assigned(&r.proc(b).stderr.text()).is_some_and(|p| p == [0, 1, 2]))
    });
    let moved = stopped.elapsed();
    run.wait_until("every record is committed", LIMIT, |_| {
        Ok(committed(&bootstrap).is_ok_and(|c| c == ends))
    });
    let done = stopped.elapsed();

    // b's revocations, and what those that waited saw complete within
    // their grace (`completed=N` of their log line).
    let b_log = run.proc(b).stderr.text();
    let revocations = b_log.matches("partitions revoked").count();
    let in_grace: Vec<u64> = b_log
        .lines()
        .filter(|l| l.contains("revocation: committing what completed"))
        .filter_map(|l| {
            l.split(" completed=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let summary_b = stop_topology(&mut run, b);
    let connections_b: Vec<u64> = workers_b
        .iter()
        .map(|&w| stop_worker(&mut run, w))
        .collect();
    // a's workers lost their server for good; they still stop cleanly.
    for &w in &workers_a {
        stop_worker(&mut run, w);
    }
    let counts = counted_in(&[&totals_a, &totals_b]);
    let dup = common::check_counts(&counts, &expected)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    eprintln!(
        "two_topology_servers_share_one_kafka_group_and_a_stopped_ones_partitions_move: split \
         {split:.1?} after the start, a had {of_a:?}; a stopped with {left_by_a} of its records \
         after its commits {at_stop:?}: {}; b had every partition {moved:.1?} after ({revocations} \
         revocation(s); roots in flight that completed within the grace: {in_grace:?}) and was done \
         {done:.1?} after: {}; b's worker connections {connections_b:?}; {} duplicate words; \
         took {:.1?}",
        summary_a.line,
        summary_b.line,
        dup.words,
        started.elapsed()
    );
    assert_eq!(summary_a.dead_lettered + summary_b.dead_lettered, 0);
    // Every record was handled once, by one of them.
    assert_eq!(
        summary_a.acked + summary_b.acked,
        COUNT,
        "{} / {}",
        summary_a.line,
        summary_b.line
    );
    assert!(summary_b.acked >= left_by_a, "{}", summary_b.line);
    assert_eq!(dup.words, 0, "{dup:?}: counted twice");
    assert_eq!(connections_b, [1, 1, 1, 1], "b's workers kept their server");
}

/// A standalone run reading 20,000 sentences starts while the broker is
/// down (the source's connect fails and is retried), the broker comes up,
/// and it is killed and restarted (its SQLite storage kept) mid-stream:
/// the run resumes, no word occurrence is lost, and every sentence counted
/// twice was read twice (after a rebalance, from the committed offsets).
#[test]
fn standalone_kafka_broker_down_at_start_and_restarted_mid_stream_resumes() {
    let _serial = serial();
    let started = Instant::now();
    const COUNT: u64 = 20_000;
    let expected = cycled_counts(&SENTENCES, COUNT);

    let mut broker = KafkaServer::start().expect("tansu (scripts/test installs it)");
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap);
    produce(&bootstrap, COUNT);
    let ends = end_offsets(&bootstrap);
    assert_eq!(ends.iter().sum::<i64>(), COUNT as i64, "{ends:?}");
    broker.kill();

    let mut run = Run::new(LIMIT, POLL);
    let config = run.file("Topology.toml", &fault_config(&bootstrap, &[]));
    let totals = run.dir.path().join("totals");
    let args = ["standalone", "--config", config.to_str().unwrap()];
    let standalone = run.spawn("standalone", &args, Some((OUTPUT_ENV, totals.as_os_str())));
    // The driver logs each failed connect before it retries.
    run.wait_until("the source fails to connect", LIMIT, |r| {
        Ok(r.proc(standalone)
            .stderr
            .contains("source unhealthy, retrying"))
    });
    let up = Instant::now();
    broker
        .restart()
        .unwrap_or_else(|e| run.fail(&format!("starting tansu: {e}")));
    run.wait_until("a fifth of the sentences are committed", LIMIT, |_| {
        Ok(committed_sum(&bootstrap).is_ok_and(|c| c > COUNT as i64 / 5))
    });
    let flowing = up.elapsed();
    broker
        .restart()
        .unwrap_or_else(|e| run.fail(&format!("restarting tansu: {e}")));
    let restarted = Instant::now();
    // Nothing is committed while the broker is down: what it has now shows
    // that the restart was mid-stream.
    let mut at_restart = Err(String::new());
    run.wait_until("the restarted broker answers", LIMIT, |_| {
        at_restart = committed(&bootstrap);
        Ok(at_restart.is_ok())
    });
    let at_restart = at_restart.unwrap_or_else(|e| run.fail(&e));
    if at_restart == ends {
        run.fail(&format!("not mid-stream when restarted: {at_restart:?}"));
    }
    run.wait_until("every record is committed", LIMIT, |_| {
        Ok(committed(&bootstrap).is_ok_and(|c| c == ends))
    });
    let resumed = restarted.elapsed();

    let stderr = run.proc(standalone).stderr.text();
    let failed_connects = stderr.matches("source unhealthy, retrying").count();
    let connects = stderr.matches("connected to kafka").count();
    let summary = stop_topology(&mut run, standalone);
    let counts = counted_in(&[&totals]);
    let dup = common::check_counts(&counts, &expected)
        .unwrap_or_else(|e| run.fail(&format!("lost or wrong counts:\n{e}")));
    eprintln!(
        "standalone_kafka_broker_down_at_start_and_restarted_mid_stream_resumes: {failed_connects} \
         source error(s), {connects} connect(s); a fifth committed {flowing:.1?} after the broker \
         came up; restarted at {at_restart:?} of {ends:?}, done {resumed:.1?} after; {}; {} \
         duplicate words, at least {} sentences handled twice; took {:.1?}",
        summary.line,
        dup.words,
        dup.sentences_at_least,
        started.elapsed()
    );
    assert!(summary.acked >= COUNT, "{}", summary.line);
    assert_eq!(summary.dead_lettered, 0, "{}", summary.line);
    // A sentence counted twice was read twice, and each reading was acked.
    assert!(
        dup.sentences_at_least <= summary.acked - COUNT,
        "{dup:?}: more sentences handled twice than were read twice ({})",
        summary.line
    );
}
