//! The Redis Streams source and the Redis output against a real
//! `redis-server` (tempest-testkit): reading and acking, group creation,
//! recovery of a crashed consumer's entries, dead letters, two consumers in
//! one group, an unreachable or restarted broker, configuration errors, and
//! buffered writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::watch;

use tempest_connectors::redis::{RedisOutput, RedisSourceConfig, RedisStreamSource};
use tempest_core::config::TopologyFile;
use tempest_core::metrics::{Labels, Registry};
use tempest_core::{
    FailReason, FailurePolicy, FromConfig, Grouping, Health, Msg, Pipeline, Polled, Source,
    SourceErrorKind, SourceId, Task, TaskError, TaskResult, Topology,
};
use tempest_testkit::RedisServer;
use tempest_topology::testing::TestRuntime;
use tempest_topology::{RunError, RunReport, Standalone};

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers

fn server() -> RedisServer {
    RedisServer::start().expect("redis-server (scripts/test installs it)")
}

fn conn(url: &str) -> redis::RedisResult<redis::Connection> {
    let c = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(c)
}

fn query(url: &str, args: &[&str]) -> redis::RedisResult<Value> {
    let mut c = conn(url)?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut c)
}

/// Adds `n` entries `payload <prefix><i>`, returning their ids in order.
fn add_entries(url: &str, stream: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut c = conn(url).unwrap();
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("payload")
            .arg(format!("{prefix}{i}"));
    }
    pipe.query(&mut c).unwrap()
}

/// Entries pending in `group` (the count of `XPENDING stream group`), or
/// `None` while the server does not answer.
fn pending(url: &str, stream: &str, group: &str) -> Option<i64> {
    match query(url, &["XPENDING", stream, group]).ok()? {
        Value::Array(v) => match v.first() {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        },
        _ => None,
    }
}

fn xlen(url: &str, stream: &str) -> Option<i64> {
    match query(url, &["XLEN", stream]).ok()? {
        Value::Int(n) => Some(n),
        _ => None,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// The entries of a stream as (id, fields in order).
fn range(url: &str, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
    let Value::Array(entries) = query(url, &["XRANGE", stream, "-", "+"]).unwrap() else {
        panic!("XRANGE reply");
    };
    entries
        .iter()
        .map(|e| {
            let Value::Array(pair) = e else {
                panic!("entry")
            };
            let Value::Array(flat) = &pair[1] else {
                panic!("fields")
            };
            let fields = flat
                .chunks(2)
                .map(|kv| (text(&kv[0]), text(&kv[1])))
                .collect();
            (text(&pair[0]), fields)
        })
        .collect()
}

/// The names of the consumers of `group` that exist now.
fn consumers(url: &str, stream: &str, group: &str) -> Vec<String> {
    let Ok(Value::Array(list)) = query(url, &["XINFO", "CONSUMERS", stream, group]) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|c| match c {
            Value::Array(flat) => flat
                .chunks(2)
                .find(|kv| text(&kv[0]) == "name")
                .map(|kv| text(&kv[1])),
            _ => None,
        })
        .collect()
}

fn groups(url: &str, stream: &str) -> Vec<String> {
    let Ok(Value::Array(list)) = query(url, &["XINFO", "GROUPS", stream]) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|g| match g {
            Value::Array(flat) => flat
                .chunks(2)
                .find(|kv| text(&kv[0]) == "name")
                .map(|kv| text(&kv[1])),
            _ => None,
        })
        .collect()
}

/// Waits (polling every 10 ms) until `done` holds; panics naming `what`
/// after `timeout`.
#[track_caller]
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How many times each payload was handled.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, usize>>>);

impl Seen {
    fn record(&self, m: &Msg) {
        let p = m.payload_str().unwrap_or_default().to_owned();
        *self.0.lock().unwrap().entry(p).or_insert(0) += 1;
    }
    fn get(&self, p: &str) -> usize {
        self.0.lock().unwrap().get(p).copied().unwrap_or(0)
    }
    fn distinct(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
    fn snapshot(&self) -> HashMap<String, usize> {
        self.0.lock().unwrap().clone()
    }
}

/// `parse` (2 workers) → `record` (2 workers, key grouped): `record` notes
/// every payload, after `work` of simulated processing.
fn recording_pipeline(seen: &Seen, work: Duration) -> Pipeline {
    let seen = seen.clone();
    Pipeline::new()
        .task_with_workers("parse", 2, || {
            |m: Msg| -> TaskResult {
                let p = m.payload().clone();
                Ok(Some(vec![Msg::keyed_by_payload(p)]))
            }
        })
        .task_with_workers("record", 2, move || {
            let seen = seen.clone();
            move |m: Msg| -> TaskResult {
                if !work.is_zero() {
                    std::thread::sleep(work);
                }
                seen.record(&m);
                Ok(None)
            }
        })
        .edge_grouped("parse", "record", Grouping::Key)
}

fn config(server: &RedisServer, stream: &str) -> RedisSourceConfig {
    RedisSourceConfig {
        consumer: Some("c1".into()),
        block_ms: 50,
        ..RedisSourceConfig::new(server.url(), stream)
    }
}

/// A standalone run on its own thread, stopped on demand.
struct Running {
    stop: watch::Sender<bool>,
    thread: JoinHandle<Result<RunReport, RunError>>,
    registry: Registry,
}

impl Running {
    fn start(topology: Topology) -> Running {
        let registry = Registry::new(Labels::new([("topology", topology.settings.name.as_str())]));
        let (stop, shutdown) = watch::channel(false);
        let reg = registry.clone();
        let thread = std::thread::spawn(move || {
            Standalone::new(topology)
                .registry(reg)
                .worker_threads(2)
                .run_blocking(shutdown)
                .map(|(report, _)| report)
        });
        Running {
            stop,
            thread,
            registry,
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.registry.snapshot().counter(name, &[])
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        self.registry.snapshot().gauge(name, &[])
    }

    fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    fn stop(self) -> RunReport {
        let _ = self.stop.send(true);
        self.thread
            .join()
            .expect("the run panicked")
            .expect("the run failed")
    }

    fn join(self) -> Result<RunReport, RunError> {
        self.thread.join().expect("the run panicked")
    }
}

fn topology(name: &str, source: RedisStreamSource, pipeline: Pipeline) -> Topology {
    Topology::builder(name)
        .source(source)
        .pipeline(pipeline)
        .grace_period(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

// ---------------------------------------------------------------------------
// Reading and acking

#[test]
fn every_entry_is_handled_once_and_acked() {
    let server = server();
    let url = server.url();
    let n = 2_000;
    add_entries(&url, "events", "m", n);

    let seen = Seen::default();
    let source = RedisStreamSource::new(config(&server, "events"));
    let stats = source.stats();
    let run = Running::start(topology(
        "read",
        source,
        recording_pipeline(&seen, Duration::ZERO),
    ));

    wait_until("every entry is handled", WAIT, || seen.distinct() == n);
    wait_until("every entry is acked", WAIT, || {
        pending(&url, "events", "tempest") == Some(0)
    });
    let report = run.stop();

    assert_eq!(seen.total(), n, "an entry was handled twice");
    for i in 0..n {
        assert_eq!(seen.get(&format!("m{i}")), 1, "m{i}");
    }
    assert_eq!(report.acked(), n as u64);
    assert_eq!(stats.emitted(), n as u64);
    assert_eq!(stats.acked(), n as u64);
    assert_eq!(pending(&url, "events", "tempest"), Some(0));
    assert_eq!(groups(&url, "events"), ["tempest"], "the group was created");
    // The stream itself is left alone.
    assert_eq!(xlen(&url, "events"), Some(n as i64));
}

#[test]
fn ids_fields_acks_and_health_through_the_source_api() {
    let mut server = server();
    let url = server.url();
    let add = |id: &str, fields: &[&str]| {
        let mut args = vec!["XADD", "s", id];
        args.extend_from_slice(fields);
        query(&url, &args).unwrap();
    };
    add("5-1", &["payload", "p", "key", "k", "other", "x"]);
    add("5-2", &["data", "d"]);
    add("6-0", &["key", "k2", "word", "cow", "more", "y"]);

    block_on(async {
        let mut source = RedisStreamSource::new(RedisSourceConfig {
            block_ms: 0,
            ..config(&server, "s")
        });
        assert_eq!(
            source.health().await,
            Health::Unhealthy(format!("not connected to {url}"))
        );
        source.connect().await.unwrap();
        // Connecting twice is fine (the group exists: BUSYGROUP).
        source.connect().await.unwrap();
        assert!(source.health().await.is_healthy());

        let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else {
            panic!("nothing polled")
        };
        let ids: Vec<SourceId> = msgs.iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            [
                SourceId::from_parts(5, 1),
                SourceId::from_parts(5, 2),
                SourceId::from_parts(6, 0)
            ]
        );
        let got: Vec<(Option<String>, Option<String>)> = msgs
            .iter()
            .map(|m| {
                (
                    m.msg.payload_str().map(str::to_owned),
                    m.msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some("p".into()), Some("k".into())),
                (Some("d".into()), None),
                (Some("cow".into()), Some("k2".into())),
            ]
        );
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        assert_eq!(pending(&url, "s", "tempest"), Some(3));

        source.ack(&ids[..2]).await.unwrap();
        assert_eq!(pending(&url, "s", "tempest"), Some(1));
        source.ack(&ids[2..]).await.unwrap();
        assert_eq!(pending(&url, "s", "tempest"), Some(0));

        server.kill();
        assert!(!source.health().await.is_healthy());
        let e = source.poll(10).await.unwrap_err();
        assert!(e.retryable, "{e}");
        let e = source.connect().await.unwrap_err();
        assert!(e.retryable, "{e}");
        assert_eq!(e.kind, SourceErrorKind::Connect);
        server.restart().unwrap();
        source.connect().await.unwrap();
        assert!(source.health().await.is_healthy());
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
    });
}

#[test]
fn acks_made_while_the_broker_is_down_are_sent_after_the_reconnect() {
    let mut server = server();
    let url = server.url();
    add_entries(&url, "s", "m", 10);
    block_on(async {
        let mut source = RedisStreamSource::new(config(&server, "s"));
        source.connect().await.unwrap();
        let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else {
            panic!("nothing polled")
        };
        let ids: Vec<SourceId> = msgs.iter().map(|m| m.id).collect();
        server.kill();
        assert!(source.ack(&ids).await.unwrap_err().retryable);
        server.restart().unwrap();
        assert_eq!(pending(&url, "s", "tempest"), Some(10));
        source.connect().await.unwrap();
        assert_eq!(pending(&url, "s", "tempest"), Some(0));
        // Nothing is handed out again: the acked entries are done.
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
    });
}

// ---------------------------------------------------------------------------
// Groups

#[test]
fn a_missing_stream_and_group_are_created() {
    let server = server();
    let url = server.url();
    assert!(groups(&url, "new").is_empty());
    block_on(async {
        let mut source = RedisStreamSource::new(RedisSourceConfig {
            group: "g".into(),
            ..config(&server, "new")
        });
        source.connect().await.unwrap();
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
    });
    assert_eq!(groups(&url, "new"), ["g"]);
    assert_eq!(xlen(&url, "new"), Some(0));
}

#[test]
fn start_id_dollar_skips_the_entries_already_in_the_stream() {
    let server = server();
    let url = server.url();
    add_entries(&url, "s", "old", 100);

    let seen = Seen::default();
    let source = RedisStreamSource::new(RedisSourceConfig {
        group: "fresh".into(),
        start_id: "$".into(),
        ..config(&server, "s")
    });
    let run = Running::start(topology(
        "dollar",
        source,
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until("the group exists", WAIT, || groups(&url, "s") == ["fresh"]);
    add_entries(&url, "s", "new", 50);
    wait_until("the new entries are handled", WAIT, || {
        seen.distinct() >= 50
    });
    wait_until("they are acked", WAIT, || {
        pending(&url, "s", "fresh") == Some(0)
    });
    run.stop();

    let seen = seen.snapshot();
    assert_eq!(seen.len(), 50, "{seen:?}");
    assert!(seen.keys().all(|p| p.starts_with("new")), "{seen:?}");
}

#[test]
fn a_missing_group_without_create_group_stops_the_topology() {
    let server = server();
    let url = server.url();
    add_entries(&url, "s", "m", 3);
    let source = RedisStreamSource::new(RedisSourceConfig {
        group: "nope".into(),
        create_group: false,
        ..config(&server, "s")
    });
    let run = Running::start(topology(
        "nogroup",
        source,
        recording_pipeline(&Seen::default(), Duration::ZERO),
    ));
    wait_until("the run ends", WAIT, || run.finished());
    match run.join() {
        Err(RunError::Source(e)) => {
            assert!(!e.retryable);
            assert!(e.message.contains("nope"), "{e}");
            assert!(e.message.contains("create_group"), "{e}");
        }
        other => panic!("expected a source error, got {other:?}"),
    }
    assert!(groups(&url, "s").is_empty(), "no group was created");

    // With the group made by hand, the same source reads.
    query(&url, &["XGROUP", "CREATE", "s", "nope", "0"]).unwrap();
    block_on(async {
        let mut source = RedisStreamSource::new(RedisSourceConfig {
            group: "nope".into(),
            create_group: false,
            ..config(&server, "s")
        });
        source.connect().await.unwrap();
        assert!(matches!(source.poll(10).await.unwrap(), Polled::Msgs(m) if m.len() == 3));
    });
}

// ---------------------------------------------------------------------------
// Recovery, dead letters, several consumers

#[test]
fn entries_left_pending_by_a_crashed_consumer_are_taken_over() {
    let server = server();
    let url = server.url();
    query(&url, &["XGROUP", "CREATE", "s", "tempest", "0", "MKSTREAM"]).unwrap();
    let n = 200;
    add_entries(&url, "s", "m", n);
    // A consumer reads 80 entries and dies without acking them.
    let Value::Array(read) = query(
        &url,
        &[
            "XREADGROUP",
            "GROUP",
            "tempest",
            "crashed",
            "COUNT",
            "80",
            "STREAMS",
            "s",
            ">",
        ],
    )
    .unwrap() else {
        panic!("XREADGROUP reply")
    };
    assert_eq!(read.len(), 1);
    assert_eq!(pending(&url, "s", "tempest"), Some(80));

    let seen = Seen::default();
    let source = RedisStreamSource::new(RedisSourceConfig {
        consumer: Some("survivor".into()),
        claim_idle_ms: 200,
        ..config(&server, "s")
    });
    let redis_stats = source.redis_stats();
    let run = Running::start(topology(
        "recover",
        source,
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until("every entry is handled", WAIT, || seen.distinct() == n);
    wait_until("every entry is acked", WAIT, || {
        pending(&url, "s", "tempest") == Some(0)
    });
    run.stop();

    assert_eq!(seen.total(), n, "{:?}", seen.snapshot());
    assert_eq!(redis_stats.reclaimed(), 80);
    for i in 0..80 {
        assert_eq!(seen.get(&format!("m{i}")), 1, "m{i}");
    }
}

#[test]
fn a_poison_entry_goes_to_the_dead_letter_stream_and_is_acked() {
    let server = server();
    let url = server.url();
    add_entries(&url, "s", "m", 10);
    let poison_id = match query(
        &url,
        &["XADD", "s", "*", "payload", "poison", "origin", "test"],
    )
    .unwrap()
    {
        v @ Value::BulkString(_) => text(&v),
        other => panic!("{other:?}"),
    };
    add_entries(&url, "s", "n", 10);

    let seen = Seen::default();
    let seen_task = seen.clone();
    let pipeline = Pipeline::new().task("eat", move || {
        let seen = seen_task.clone();
        move |m: Msg| -> TaskResult {
            seen.record(&m);
            if m.payload_str() == Some("poison") {
                return Err(TaskError::new("cannot digest poison"));
            }
            Ok(None)
        }
    });
    let source = RedisStreamSource::new(config(&server, "s"));
    let redis_stats = source.redis_stats();
    let topology = Topology::builder("poison")
        .source(source)
        .pipeline(pipeline)
        .failure_policy(FailurePolicy::Retry {
            max_attempts: 3,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
        })
        .build()
        .unwrap();
    let run = Running::start(topology);
    wait_until("the poison entry is dead-lettered", WAIT, || {
        xlen(&url, "s:dead") == Some(1)
    });
    wait_until("every entry is handled", WAIT, || seen.distinct() == 21);
    wait_until("every entry is acked", WAIT, || {
        pending(&url, "s", "tempest") == Some(0)
    });
    let report = run.stop();

    assert_eq!(
        seen.get("poison"),
        3,
        "tried max_attempts times, then no more"
    );
    assert_eq!(seen.total(), 20 + 3);
    assert_eq!(report.dead_lettered(), 1);
    assert_eq!(redis_stats.dead_lettered(), 1);
    let dead = range(&url, "s:dead");
    assert_eq!(dead.len(), 1);
    let fields: BTreeMap<_, _> = dead[0].1.iter().cloned().collect();
    let expect: BTreeMap<String, String> = [
        ("payload", "poison"),
        ("origin", "test"),
        ("tempest_reason", "cannot digest poison"),
        ("tempest_attempts", "3"),
        ("tempest_source_id", poison_id.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(fields, expect);
    // The original fields come first, in order.
    assert_eq!(dead[0].1[0], ("payload".into(), "poison".into()));
    assert_eq!(dead[0].1[1], ("origin".into(), "test".into()));
}

#[test]
fn fail_dead_letters_through_the_source_api() {
    let server = server();
    let url = server.url();
    add_entries(&url, "s", "m", 2);
    block_on(async {
        let mut source = RedisStreamSource::new(RedisSourceConfig {
            dead_letter: Some("graveyard".into()),
            ..config(&server, "s")
        });
        source.connect().await.unwrap();
        let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else {
            panic!("nothing polled")
        };
        let reason = FailReason {
            message: "bad input".into(),
            attempts: 1,
        };
        source.fail(msgs[1].id, &reason).await.unwrap();
        assert_eq!(pending(&url, "s", "tempest"), Some(1));
        let dead = range(&url, "graveyard");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].1[0], ("payload".into(), "m1".into()));
        assert!(dead[0]
            .1
            .contains(&("tempest_reason".into(), "bad input".into())));
        assert!(dead[0].1.contains(&("tempest_attempts".into(), "1".into())));
        assert_eq!(source.stats().failed(), 1);
    });
}

#[test]
fn a_restarted_consumer_reads_its_own_pending_entries_first() {
    let server = server();
    let url = server.url();
    add_entries(&url, "s", "m", 5);
    block_on(async {
        // A topology server with a fixed consumer name reads 5 entries and dies.
        let mut first = RedisStreamSource::new(config(&server, "s"));
        first.connect().await.unwrap();
        assert!(matches!(first.poll(10).await.unwrap(), Polled::Msgs(m) if m.len() == 5));
        drop(first);
        add_entries(&url, "s", "n", 2);

        // Its successor gets them back at once, not after claim_idle_ms (30 s).
        let mut second = RedisStreamSource::new(config(&server, "s"));
        let stats = second.redis_stats();
        second.connect().await.unwrap();
        let Polled::Msgs(again) = second.poll(10).await.unwrap() else {
            panic!("nothing polled")
        };
        let payloads: Vec<_> = again.iter().map(|m| m.msg.payload_str().unwrap()).collect();
        assert_eq!(payloads, ["m0", "m1", "m2", "m3", "m4"]);
        assert_eq!(stats.redelivered(), 5);
        let Polled::Msgs(new) = second.poll(10).await.unwrap() else {
            panic!("nothing polled")
        };
        assert_eq!(new.len(), 2);
        let ids: Vec<SourceId> = again.iter().chain(&new).map(|m| m.id).collect();
        second.ack(&ids).await.unwrap();
        assert_eq!(pending(&url, "s", "tempest"), Some(0));
    });
}

#[test]
fn a_default_consumer_leaves_the_group_only_when_nothing_is_pending() {
    let server = server();
    let url = server.url();
    add_entries(&url, "s", "m", 10);
    add_entries(&url, "s2", "m", 10);
    let default = |stream: &str| {
        RedisStreamSource::new(RedisSourceConfig {
            consumer: None,
            ..config(&server, stream)
        })
    };

    // Shut down with an entry still pending: the consumer stays, so that
    // the entry can be taken over.
    block_on(async {
        let mut source = default("s");
        source.connect().await.unwrap();
        let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else {
            panic!("nothing polled")
        };
        let ids: Vec<SourceId> = msgs.iter().map(|m| m.id).collect();
        source.ack(&ids[1..]).await.unwrap();
        source.shutdown().await.unwrap();
        assert_eq!(consumers(&url, "s", "tempest"), [source.consumer()]);
        assert_eq!(pending(&url, "s", "tempest"), Some(1));
    });

    // A run that completes everything leaves no consumer behind.
    let seen = Seen::default();
    let run = Running::start(topology(
        "bye",
        default("s2"),
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until("every entry is handled", WAIT, || seen.distinct() == 10);
    wait_until("the consumer joined", WAIT, || {
        consumers(&url, "s2", "tempest").len() == 1
    });
    wait_until("every entry is acked", WAIT, || {
        pending(&url, "s2", "tempest") == Some(0)
    });
    run.stop();
    assert!(consumers(&url, "s2", "tempest").is_empty());
}

#[test]
fn entries_in_flight_are_kept_from_other_consumers() {
    let server = server();
    let url = server.url();
    add_entries(&url, "s", "slow", 1);
    block_on(async {
        let fast = |name: &str| RedisSourceConfig {
            consumer: Some(name.into()),
            claim_idle_ms: 1_000,
            block_ms: 20,
            ..config(&server, "s")
        };
        let mut a = RedisStreamSource::new(fast("a"));
        let mut b = RedisStreamSource::new(fast("b"));
        a.connect().await.unwrap();
        b.connect().await.unwrap();
        let Polled::Msgs(msgs) = a.poll(10).await.unwrap() else {
            panic!("nothing polled")
        };
        // `a` handles the entry for over three times claim_idle_ms, polling
        // as the runtime does; `b` looks for idle entries all the while.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            assert_eq!(
                b.poll(10).await.unwrap(),
                Polled::Idle,
                "b took over a live entry"
            );
            assert_eq!(a.poll(10).await.unwrap(), Polled::Idle);
        }
        a.ack(&[msgs[0].id]).await.unwrap();
        assert_eq!(pending(&url, "s", "tempest"), Some(0));
        assert_eq!(b.redis_stats().reclaimed(), 0);
    });
}

#[test]
fn two_consumers_in_one_group_split_the_entries() {
    let server = server();
    let url = server.url();
    query(&url, &["XGROUP", "CREATE", "s", "tempest", "0", "MKSTREAM"]).unwrap();

    let (seen_a, seen_b) = (Seen::default(), Seen::default());
    let start = |name: &str, seen: &Seen| {
        let source = RedisStreamSource::new(RedisSourceConfig {
            consumer: Some(name.into()),
            batch_size: 10,
            ..config(&server, "s")
        });
        let topology = Topology::builder(name)
            .source(source)
            .pipeline(recording_pipeline(seen, Duration::from_micros(500)))
            .max_pending(20)
            .batch_size(10)
            .build()
            .unwrap();
        Running::start(topology)
    };
    let a = start("a", &seen_a);
    let b = start("b", &seen_b);
    wait_until("both consumers joined the group", WAIT, || {
        consumers(&url, "s", "tempest").len() == 2
    });
    let n = 1_000;
    add_entries(&url, "s", "m", n);
    wait_until("every entry is handled", WAIT, || {
        seen_a.distinct() + seen_b.distinct() >= n
    });
    wait_until("every entry is acked", WAIT, || {
        pending(&url, "s", "tempest") == Some(0)
    });
    a.stop();
    b.stop();

    let (a, b) = (seen_a.snapshot(), seen_b.snapshot());
    assert!(
        !a.is_empty() && !b.is_empty(),
        "a {} b {}",
        a.len(),
        b.len()
    );
    assert_eq!(a.len() + b.len(), n, "a {} b {}", a.len(), b.len());
    assert!(
        a.keys().all(|k| !b.contains_key(k)),
        "an entry went to both"
    );
    assert!(a.values().chain(b.values()).all(|&c| c == 1));
}

// ---------------------------------------------------------------------------
// An unreachable or restarted broker

#[test]
fn connecting_to_nothing_is_a_retryable_connect_error_naming_the_url() {
    let port = tempest_testkit::free_port().unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    block_on(async {
        let mut source = RedisStreamSource::new(RedisSourceConfig::new(&url, "s"));
        let e = source.connect().await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Connect);
        assert!(e.retryable, "{e}");
        assert!(e.message.contains(&url), "{e}");
        assert!(!source.health().await.is_healthy());
        assert!(source.poll(1).await.unwrap_err().retryable);
    });
}

#[test]
fn a_broker_down_at_start_is_waited_for() {
    let mut server = server();
    let url = server.url();
    let n = 300;
    add_entries(&url, "s", "m", n);
    server.kill();

    let seen = Seen::default();
    let source = RedisStreamSource::new(config(&server, "s"));
    let run = Running::start(topology(
        "late",
        source,
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until("connect errors are counted", WAIT, || {
        run.counter("tempest_source_errors") >= 2
    });
    assert_eq!(run.gauge("tempest_source_healthy"), Some(0.0));
    assert_eq!(seen.distinct(), 0);
    assert!(!run.finished(), "a retryable error must not end the run");

    server.restart().unwrap();
    wait_until("every entry is handled", WAIT, || seen.distinct() == n);
    wait_until("every entry is acked", WAIT, || {
        pending(&url, "s", "tempest") == Some(0)
    });
    assert_eq!(run.gauge("tempest_source_healthy"), Some(1.0));
    let report = run.stop();
    assert_eq!(report.acked(), n as u64);
    assert_eq!(seen.total(), n);
}

#[test]
fn a_broker_restarted_mid_stream_loses_nothing() {
    let mut server = server();
    let url = server.url();
    let n = 2_000;
    add_entries(&url, "s", "m", n);

    let seen = Seen::default();
    let source = RedisStreamSource::new(RedisSourceConfig {
        batch_size: 50,
        ..config(&server, "s")
    });
    let redis_stats = source.redis_stats();
    let topology = Topology::builder("restart")
        .source(source)
        .pipeline(recording_pipeline(&seen, Duration::from_micros(500)))
        .max_pending(100)
        .batch_size(50)
        .build()
        .unwrap();
    let run = Running::start(topology);
    wait_until("some entries are handled", WAIT, || seen.distinct() >= 200);
    let before = seen.distinct();
    server.restart().unwrap();
    assert!(
        before < n,
        "the restart must come mid-stream ({before} of {n} handled)"
    );
    add_entries(&url, "s", "after", 100);

    wait_until("every entry is handled", WAIT, || {
        seen.distinct() == n + 100
    });
    wait_until("every entry is acked", WAIT, || {
        pending(&url, "s", "tempest") == Some(0)
    });
    run.stop();
    assert!(redis_stats.connects() >= 2, "the source reconnected");
    for i in 0..n {
        assert!(seen.get(&format!("m{i}")) >= 1, "m{i} lost");
    }
    for i in 0..100 {
        assert!(seen.get(&format!("after{i}")) >= 1, "after{i} lost");
    }
    assert_eq!(pending(&url, "s", "tempest"), Some(0));
}

/// Two sources in one topology, each on its own broker; one broker is
/// killed: the other source's roots keep flowing, the stopped one is
/// unhealthy in the metrics (and healthy again once its broker is back).
#[test]
fn two_sources_one_broker_stopped_the_other_flows_on() {
    let mut orders_broker = server();
    let refunds_broker = server();
    let (ou, ru) = (orders_broker.url(), refunds_broker.url());
    add_entries(&ou, "orders", "o", 200);
    add_entries(&ru, "refunds", "r", 200);
    let seen = Seen::default();
    let topology = Topology::builder("two-brokers")
        .named_source(
            "orders",
            RedisStreamSource::new(config(&orders_broker, "orders")),
        )
        .named_source(
            "refunds",
            RedisStreamSource::new(config(&refunds_broker, "refunds")),
        )
        .pipeline(
            recording_pipeline(&seen, Duration::ZERO)
                .edge_from_source("orders", "parse")
                .edge_from_source("refunds", "parse"),
        )
        .grace_period(Duration::from_secs(5))
        .build()
        .unwrap();
    let run = Running::start(topology);
    let healthy = |source: &str| {
        run.registry
            .snapshot()
            .gauge("tempest_source_healthy", &[("source", source)])
    };
    wait_until("both streams are handled", WAIT, || seen.distinct() == 400);

    orders_broker.kill();
    add_entries(&ru, "refunds", "after", 300);
    wait_until("refunds flow on while orders' broker is down", WAIT, || {
        seen.distinct() == 700
    });
    wait_until("every refund is acked", WAIT, || {
        pending(&ru, "refunds", "tempest") == Some(0)
    });
    wait_until("orders is unhealthy in the metrics", WAIT, || {
        healthy("orders") == Some(0.0)
    });
    assert_eq!(healthy("refunds"), Some(1.0));
    let errors = run
        .registry
        .snapshot()
        .counter("tempest_source_errors", &[("source", "orders")]);
    assert!(errors >= 1, "orders' errors are counted");

    orders_broker.restart().unwrap();
    add_entries(&ou, "orders", "late", 50);
    wait_until("orders flows again once its broker is back", WAIT, || {
        seen.distinct() == 750
    });
    wait_until("orders is healthy again", WAIT, || {
        healthy("orders") == Some(1.0)
    });
    let report = run.stop();
    assert_eq!(
        report
            .metrics
            .counter("tempest_source_acked", &[("source", "refunds")]),
        500
    );
    for i in 0..50 {
        assert!(seen.get(&format!("late{i}")) >= 1, "late{i} lost");
    }
}

// ---------------------------------------------------------------------------
// Configuration

fn table(text: &str) -> toml::Table {
    toml::from_str(text).unwrap()
}

#[test]
fn every_key_is_read_and_defaults_apply() {
    let source = RedisStreamSource::from_config(&table(
        r#"
        url = "redis://127.0.0.1:6379/2"
        stream = "events"
        group = "g"
        consumer = "node-1"
        batch_size = 1000
        block_ms = 0
        claim_idle_ms = 5000
        start_id = "$"
        dead_letter = "events:failed"
        create_group = false
        "#,
    ))
    .unwrap();
    assert_eq!(
        *source.config(),
        RedisSourceConfig {
            url: "redis://127.0.0.1:6379/2".into(),
            stream: "events".into(),
            group: "g".into(),
            consumer: Some("node-1".into()),
            batch_size: 1000,
            block_ms: 0,
            claim_idle_ms: 5000,
            start_id: "$".into(),
            dead_letter: Some("events:failed".into()),
            create_group: false,
        }
    );
    assert_eq!(source.consumer(), "node-1");
    assert_eq!(source.dead_letter(), "events:failed");

    let source =
        RedisStreamSource::from_config(&table("url = \"redis://h\"\nstream = \"s\"\n")).unwrap();
    let c = source.config();
    assert_eq!(c, &RedisSourceConfig::new("redis://h", "s"));
    assert_eq!(
        (c.group.as_str(), c.batch_size, c.block_ms),
        ("tempest", 512, 100)
    );
    assert_eq!(
        (c.claim_idle_ms, c.start_id.as_str(), c.create_group),
        (30_000, "0", true)
    );
    assert_eq!(source.dead_letter(), "s:dead");
    // The default consumer is <hostname>-<pid>, distinct per source.
    let pid = format!("-{}", std::process::id());
    assert!(source.consumer().contains(&pid), "{}", source.consumer());
    let other =
        RedisStreamSource::from_config(&table("url = \"redis://h\"\nstream = \"s\"\n")).unwrap();
    assert_ne!(source.consumer(), other.consumer());
}

#[test]
fn config_errors_name_the_key() {
    let base = "url = \"redis://h\"\nstream = \"s\"\n";
    let err = |text: &str| RedisStreamSource::from_config(&table(text)).err().unwrap();

    let e = err("url = \"redis://h\"\n");
    assert!(e.message.contains("stream"), "{e}");
    let e = err("stream = \"s\"\n");
    assert!(e.message.contains("url"), "{e}");

    for (extra, key) in [
        ("block_ms = \"fast\"", "block_ms"),
        ("blok_ms = 5", "blok_ms"),
        ("batch_size = 0", "batch_size"),
        ("batch_size = -1", "batch_size"),
        ("claim_idle_ms = 0", "claim_idle_ms"),
        ("block_ms = 3600000", "block_ms"),
        ("start_id = \"yesterday\"", "start_id"),
        ("group = \"\"", "group"),
        ("consumer = \"\"", "consumer"),
        ("dead_letter = \"s\"", "dead_letter"),
        ("create_group = \"yes\"", "create_group"),
    ] {
        let e = err(&format!("{base}{extra}\n"));
        assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}");
    }
    let e = err("url = \"http://h\"\nstream = \"s\"\n");
    assert_eq!(e.key.as_deref(), Some("url"), "{e}");
    let e = err("url = \"redis://h\"\nstream = \"\"\n");
    assert_eq!(e.key.as_deref(), Some("stream"), "{e}");
}

#[test]
fn topology_toml_errors_name_the_file_line_and_key() {
    let file = TopologyFile::parse(
        "[source]\nkind = \"redis\"\n[source.config]\nurl = \"redis://h\"\nstream = \"s\"\nblock_ms = \"fast\"\n",
        None,
    )
    .unwrap();
    let mut t = Topology::builder("t")
        .pipeline(Pipeline::new().task("a", || |_m: Msg| -> TaskResult { Ok(None) }))
        .build()
        .unwrap();
    tempest_connectors::register(&mut t.source_kinds);
    let errs = file.apply(&mut t).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key.as_deref(), Some("source.config.block_ms"));
    assert_eq!(errs[0].line, Some(6));

    let file = TopologyFile::parse(
        "[source]\nkind = \"redis\"\n[source.config]\nurl = \"redis://h\"\nstream = \"s\"\n",
        None,
    )
    .unwrap();
    file.apply(&mut t).unwrap();
    assert!(t.has_source(tempest_core::DEFAULT_SOURCE));
}

#[test]
fn configure_refuses_a_bad_config_given_in_code() {
    let mut source = RedisStreamSource::new(RedisSourceConfig {
        batch_size: 0,
        ..RedisSourceConfig::new("redis://h", "s")
    });
    let e = block_on(source.configure(&tempest_core::Settings::new("t"))).unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(!e.retryable);
    assert!(e.message.contains("batch_size"), "{e}");
}

// ---------------------------------------------------------------------------
// RedisOutput

fn hget(url: &str, hash: &str, field: &str) -> Option<String> {
    match query(url, &["HGET", hash, field]).unwrap() {
        Value::Nil => None,
        v => Some(text(&v)),
    }
}

#[test]
fn output_writes_only_at_flush() {
    let mut server = server();
    let url = server.url();
    let mut out = RedisOutput::connect(&url).unwrap();
    out.xadd("out", &[("payload", "a"), ("n", "1")])
        .hincr("counts", "x", 2)
        .hincr("counts", "x", 3)
        .hset("h", "f", "v");
    assert_eq!(out.buffered(), 4);
    assert_eq!(xlen(&url, "out"), Some(0));
    assert_eq!(hget(&url, "counts", "x"), None);
    assert_eq!(hget(&url, "h", "f"), None);

    out.flush().unwrap();
    assert_eq!(out.buffered(), 0);
    let entries = range(&url, "out");
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].1,
        [("payload".into(), "a".into()), ("n".into(), "1".into())]
    );
    assert_eq!(hget(&url, "counts", "x").as_deref(), Some("5"));
    assert_eq!(hget(&url, "h", "f").as_deref(), Some("v"));

    // An empty flush needs no server; a failed one is retryable, drops the
    // buffer, and the next one reconnects.
    server.kill();
    out.flush().unwrap();
    out.hincr("counts", "x", 100);
    let e = out.flush().unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(out.buffered(), 0);
    server.restart().unwrap();
    out.hincr("counts", "x", 1).xadd("out", &[("payload", "b")]);
    out.flush().unwrap();
    assert_eq!(hget(&url, "counts", "x").as_deref(), Some("6"));
    assert_eq!(xlen(&url, "out"), Some(2));

    // A command error is permanent (a replay would not fix it).
    out.hincr("out", "x", 1);
    assert!(!out.flush().unwrap_err().is_retryable());
}

#[test]
fn output_connect_to_nothing_fails_and_new_is_lazy() {
    let port = tempest_testkit::free_port().unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    assert!(RedisOutput::connect(&url).unwrap_err().is_retryable());
    let mut out = RedisOutput::new(&url).unwrap();
    out.flush().unwrap();
    out.hset("h", "f", "v");
    assert!(out.flush().unwrap_err().is_retryable());
    assert!(!RedisOutput::new("http://h").unwrap_err().is_retryable());
}

/// Counts words into a hash, written at each flush.
struct CountInto {
    out: RedisOutput,
}

impl Task for CountInto {
    fn handle(&mut self, msg: Msg) -> TaskResult {
        let word = msg.payload_str().ok_or("not UTF-8")?;
        self.out.hincr("counts", word, 1);
        Ok(None)
    }
    fn flush(&mut self) -> Result<(), TaskError> {
        self.out.flush()
    }
}

#[test]
fn output_in_a_task_writes_every_message() {
    let server = server();
    let url = server.url();
    let words: Vec<String> = (0..3_000).map(|i| format!("w{}", i % 7)).collect();
    let task_url = url.clone();
    let topology = Topology::builder("count")
        .pipeline(
            Pipeline::new().task_with_workers("count", 3, move || CountInto {
                out: RedisOutput::new(&task_url).unwrap(),
            }),
        )
        .build()
        .unwrap();
    let report = TestRuntime::new(topology).input(words).run().unwrap();
    assert!(report.all_acked());
    let total: i64 = (0..7)
        .map(|i| {
            hget(&url, "counts", &format!("w{i}"))
                .unwrap()
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 3_000);
    assert_eq!(hget(&url, "counts", "w0").as_deref(), Some("429"));
}
