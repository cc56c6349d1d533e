//! The Kafka source and output against a real Kafka-compatible broker
//! (tansu, started by tempest-testkit): reading a 3-partition topic and
//! committing what was acked, out-of-order acks, dead letters, a broker
//! restarted mid-stream, health, configuration errors, and produce from a
//! task.

#![cfg(feature = "kafka")]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

use tempest_connectors::kafka::{
    KafkaOutput, KafkaRecord, KafkaSource, KafkaSourceConfig, OffsetReset, RecordFormat,
};
use tempest_core::config::TopologyFile;
use tempest_core::metrics::{Labels, Registry};
use tempest_core::{
    FailReason, FailurePolicy, FromConfig, Grouping, Health, Msg, Pipeline, Polled, Source,
    SourceErrorKind, SourceId, SourceMsg, Task, TaskError, TaskResult, Topology,
};
use tempest_testkit::kafka::KafkaServer;
use tempest_topology::testing::TestRuntime;
use tempest_topology::{RunError, RunReport, Standalone};

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers

fn server() -> KafkaServer {
    KafkaServer::start().expect("tansu (scripts/test installs it)")
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Creates a topic (on a thread of its own, so that an async test can call
/// it too).
fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = std::thread::scope(|s| {
        s.spawn(|| {
            block_on(admin.create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ))
        })
        .join()
        .unwrap()
    })
    .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
    wait_until("the topic has its partitions", WAIT, || {
        partitions_of(bootstrap, topic) == partitions as usize
    });
}

fn partitions_of(bootstrap: &str, topic: &str) -> usize {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    c.fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()
        .and_then(|m| {
            m.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
        })
        .unwrap_or(0)
}

fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap()
}

/// Produces `n` records `<prefix><i>` keyed `k<i>` (spread over the
/// partitions by key), or to `partition` when given.
fn produce(bootstrap: &str, topic: &str, prefix: &str, n: usize, partition: Option<i32>) {
    let p = producer(bootstrap);
    for i in 0..n {
        let key = format!("k{i}");
        let value = format!("{prefix}{i}");
        let mut r = BaseRecord::to(topic).key(&key).payload(&value);
        if let Some(part) = partition {
            r = r.partition(part);
        }
        let mut r = Some(r);
        while let Some(rec) = r.take() {
            if let Err((e, rec)) = p.send(rec) {
                assert!(
                    e.to_string().contains("Queue full"),
                    "producing to {topic}: {e}"
                );
                p.poll(Duration::from_millis(50));
                r = Some(rec);
            }
        }
    }
    p.flush(Duration::from_secs(30)).expect("records delivered");
}

/// The end offset (high watermark) of each partition.
fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect()
}

/// The offsets `group` committed for each partition (-1: none), or None
/// while the broker does not answer.
fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Option<Vec<i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    Some(
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect(),
    )
}

/// Every record of `topic` from the beginning: (key, value, headers), until
/// `n` are read.
type Record = (Option<String>, String, BTreeMap<String, String>);
fn read_topic(bootstrap: &str, topic: &str, partitions: i32, n: usize) -> Vec<Record> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "read {} of {n} records of {topic}",
            out.len()
        );
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    headers,
                ));
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
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

fn config(server: &KafkaServer, topic: &str, group: &str) -> KafkaSourceConfig {
    KafkaSourceConfig {
        group: group.into(),
        poll_ms: 50,
        ..KafkaSourceConfig::new(server.bootstrap(), [topic])
    }
}

/// A standalone run on its own thread, stopped on demand.
struct Running {
    stop: watch::Sender<bool>,
    thread: JoinHandle<Result<RunReport, RunError>>,
}

impl Running {
    fn start(topology: Topology) -> Running {
        let registry = Registry::new(Labels::new([("topology", topology.settings.name.as_str())]));
        let (stop, shutdown) = watch::channel(false);
        let thread = std::thread::spawn(move || {
            Standalone::new(topology)
                .registry(registry)
                .worker_threads(2)
                .run_blocking(shutdown)
                .map(|(report, _)| report)
        });
        Running { stop, thread }
    }

    fn stop(self) -> RunReport {
        let _ = self.stop.send(true);
        self.thread
            .join()
            .expect("the run panicked")
            .expect("the run failed")
    }
}

fn topology(name: &str, source: KafkaSource, pipeline: Pipeline) -> Topology {
    Topology::builder(name)
        .source(source)
        .pipeline(pipeline)
        .grace_period(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `source` until it has handed out `n` records (the group's first
/// assignment takes a moment), returning them.
async fn poll_n(source: &mut KafkaSource, n: usize) -> Vec<SourceMsg> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "polled {} of {n} records",
            got.len()
        );
        if let Polled::Msgs(msgs) = source.poll(n - got.len()).await.unwrap() {
            got.extend(msgs);
        }
    }
    got
}

// ---------------------------------------------------------------------------
// Reading and committing

#[test]
fn every_record_is_handled_and_committed_and_a_second_run_reads_nothing_new() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "events", 3);
    let n = 3_000;
    produce(&bootstrap, "events", "m", n, None);
    let ends = end_offsets(&bootstrap, "events", 3);
    assert_eq!(ends.iter().sum::<i64>(), n as i64);
    assert!(
        ends.iter().all(|&e| e > 0),
        "every partition has records: {ends:?}"
    );

    let seen = Seen::default();
    let source = KafkaSource::new(config(&server, "events", "g1"));
    let stats = source.stats();
    let kafka_stats = source.kafka_stats();
    let run = Running::start(topology(
        "read",
        source,
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until("every record is handled", WAIT, || seen.distinct() == n);
    wait_until("the committed offsets reach the end offsets", WAIT, || {
        committed(&bootstrap, "g1", "events", 3).as_ref() == Some(&ends)
    });
    let report = run.stop();
    assert_eq!(seen.total(), n, "a record was handled twice");
    for i in 0..n {
        assert_eq!(seen.get(&format!("m{i}")), 1, "m{i}");
    }
    assert_eq!(report.acked(), n as u64);
    assert_eq!(stats.emitted(), n as u64);
    assert_eq!(stats.acked(), n as u64);
    assert!(kafka_stats.commits() >= 1);
    assert_eq!(kafka_stats.commit_errors(), 0);
    assert_eq!(committed(&bootstrap, "g1", "events", 3), Some(ends.clone()));

    // The same group again: it resumes at the committed offsets. A marker
    // per partition shows where each partition's reading got to (records
    // of a partition come in order), so nothing older can come later.
    let seen = Seen::default();
    let source = KafkaSource::new(config(&server, "events", "g1"));
    let kafka_stats = source.kafka_stats();
    let run = Running::start(topology(
        "again",
        source,
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until("the partitions are assigned", WAIT, || {
        kafka_stats.assigned() >= 3
    });
    for p in 0..3 {
        produce(&bootstrap, "events", &format!("marker{p}-"), 1, Some(p));
    }
    wait_until("the markers are handled", WAIT, || seen.distinct() == 3);
    run.stop();
    let seen = seen.snapshot();
    assert_eq!(
        seen,
        (0..3)
            .map(|p| (format!("marker{p}-0"), 1))
            .collect::<HashMap<_, _>>(),
        "only the new records"
    );
    let mut ends = ends;
    for e in &mut ends {
        *e += 1;
    }
    wait_until("the markers are committed", WAIT, || {
        committed(&bootstrap, "g1", "events", 3).as_ref() == Some(&ends)
    });
}

/// Static membership (`group.instance.id`, which the source defaults to
/// `TEMPEST_SOURCE_CONSUMER` on a topology server; set in `properties`
/// here, as tests run in parallel and share the environment): a member
/// that stops and comes back under the same id gets its partitions back
/// at once, well within the session timeout that the group would wait
/// for a member that left without coming back, and resumes at its commits.
#[test]
fn a_static_member_that_comes_back_gets_its_partitions_at_once() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "static", 3);
    let n = 300;
    produce(&bootstrap, "static", "m", n, None);
    let ends = end_offsets(&bootstrap, "static", 3);
    let static_config = || {
        let mut c = config(&server, "static", "gs");
        c.properties
            .insert("group.instance.id".into(), "wordcount/server".into());
        c.properties
            .insert("session.timeout.ms".into(), toml::Value::Integer(45_000));
        c
    };

    let seen = Seen::default();
    let run = Running::start(topology(
        "static-1",
        KafkaSource::new(static_config()),
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until("every record is handled", WAIT, || seen.distinct() == n);
    wait_until("the committed offsets reach the end offsets", WAIT, || {
        committed(&bootstrap, "gs", "static", 3).as_ref() == Some(&ends)
    });
    let report = run.stop();
    assert_eq!(report.acked(), n as u64);
    assert_eq!(seen.total(), n, "a record was handled twice");

    // Back under the same id: assigned every partition long before the
    // 45 s session timeout, and reading only what is new.
    let started = Instant::now();
    let seen = Seen::default();
    let source = KafkaSource::new(static_config());
    let kafka_stats = source.kafka_stats();
    let run = Running::start(topology(
        "static-2",
        source,
        recording_pipeline(&seen, Duration::ZERO),
    ));
    wait_until(
        "the static member gets its partitions back",
        Duration::from_secs(20),
        || kafka_stats.assigned() >= 3,
    );
    let rejoined = started.elapsed();
    for p in 0..3 {
        produce(&bootstrap, "static", &format!("marker{p}-"), 1, Some(p));
    }
    wait_until("the markers are handled", WAIT, || seen.distinct() == 3);
    run.stop();
    assert_eq!(
        seen.snapshot(),
        (0..3)
            .map(|p| (format!("marker{p}-0"), 1))
            .collect::<HashMap<_, _>>(),
        "only the new records (rejoined in {rejoined:?})"
    );
    assert!(
        rejoined < Duration::from_secs(20),
        "rejoined in {rejoined:?}"
    );
}

#[test]
fn out_of_order_acks_never_commit_past_an_unacked_record() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "ooo", 3);
    for p in 0..3 {
        produce(&bootstrap, "ooo", &format!("p{p}-"), 6, Some(p));
    }
    let committed_now = || committed(&bootstrap, "ooo-group", "ooo", 3).unwrap();
    // Waits until the broker has `want`, checking on the way that no
    // commit ever passes it.
    let wait_committed = |want: [i64; 3]| {
        wait_until(&format!("committed {want:?}"), WAIT, || {
            let got = committed_now();
            for p in 0..3 {
                assert!(
                    got[p] <= want[p],
                    "partition {p} committed {} past an unacked record ({want:?})",
                    got[p]
                );
            }
            got == want
        });
    };

    block_on(async {
        let mut source = KafkaSource::new(KafkaSourceConfig {
            batch_size: 100,
            ..config(&server, "ooo", "ooo-group")
        });
        source.connect().await.unwrap();
        assert!(source.health().await.is_healthy());
        let msgs = poll_n(&mut source, 18).await;
        // id of (partition, offset)
        let mut ids: HashMap<(i32, i64), SourceId> = HashMap::new();
        for m in &msgs {
            let (topic, p, o) = source.position(m.id).unwrap();
            assert_eq!(topic, "ooo");
            assert_eq!(
                m.msg.payload_str().unwrap(),
                format!("p{p}-{o}"),
                "the payload is the value"
            );
            assert_eq!(
                m.msg.key().map(|k| &k[..]),
                Some(format!("k{o}").as_bytes()),
                "the key is the record's key"
            );
            ids.insert((p, o), m.id);
        }
        assert_eq!(ids.len(), 18);
        let ack = |list: &[(i32, i64)]| -> Vec<SourceId> { list.iter().map(|k| ids[k]).collect() };

        // Later offsets first: nothing may be committed.
        source
            .ack(&ack(&[(0, 5), (0, 3), (1, 1), (2, 4), (2, 5)]))
            .await
            .unwrap();
        assert_eq!(
            source.watermarks(),
            [
                (("ooo".to_owned(), 0), 0),
                (("ooo".to_owned(), 1), 0),
                (("ooo".to_owned(), 2), 0)
            ]
        );
        assert_eq!(committed_now(), [-1, -1, -1]);

        // The first offsets: each partition commits up to its first gap.
        source
            .ack(&ack(&[(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)]))
            .await
            .unwrap();
        wait_committed([1, 2, 3]);

        // Fill the gaps one by one.
        source.ack(&ack(&[(0, 1), (0, 2)])).await.unwrap();
        wait_committed([4, 2, 3]);
        source.ack(&ack(&[(2, 3)])).await.unwrap();
        wait_committed([4, 2, 6]);
        source
            .ack(&ack(&[(1, 5), (1, 4), (1, 3), (1, 2)]))
            .await
            .unwrap();
        wait_committed([4, 6, 6]);
        source.ack(&ack(&[(0, 4)])).await.unwrap();
        wait_committed([6, 6, 6]);
        // A duplicate ack changes nothing.
        source.ack(&ack(&[(0, 4)])).await.unwrap();
        source.shutdown().await.unwrap();
    });
    assert_eq!(committed_now(), [6, 6, 6]);
}

#[test]
fn record_format_carries_headers_and_timestamp_to_tasks() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "meta", 1);
    let p = producer(&bootstrap);
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header {
            key: "trace",
            value: Some("t-1"),
        })
        .insert(rdkafka::message::Header {
            key: "empty",
            value: None::<&[u8]>,
        });
    p.send(
        BaseRecord::to("meta")
            .key("the-key")
            .payload("the-value")
            .timestamp(1_700_000_000_123)
            .headers(headers),
    )
    .unwrap();
    p.flush(Duration::from_secs(30)).unwrap();

    block_on(async {
        let mut source = KafkaSource::new(KafkaSourceConfig {
            format: RecordFormat::Record,
            ..config(&server, "meta", "meta-group")
        });
        source.connect().await.unwrap();
        let msgs = poll_n(&mut source, 1).await;
        let m = &msgs[0].msg;
        assert_eq!(m.key().map(|k| &k[..]), Some(&b"the-key"[..]));
        let r = KafkaRecord::decode(m.payload()).unwrap();
        assert_eq!(r.topic, "meta");
        assert_eq!((r.partition, r.offset), (0, 0));
        assert_eq!(r.timestamp, Some(1_700_000_000_123));
        assert_eq!(&r.value[..], b"the-value");
        assert_eq!(r.header("trace"), Some(&b"t-1"[..]));
        assert_eq!(
            r.headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.is_some()))
                .collect::<Vec<_>>(),
            [("trace", true), ("empty", false)]
        );
        source.ack(&[msgs[0].id]).await.unwrap();
        source.shutdown().await.unwrap();
    });
    assert_eq!(
        committed(&bootstrap, "meta-group", "meta", 1),
        Some(vec![1])
    );
}

#[test]
fn a_rebalance_commits_what_completed_and_hands_what_was_in_flight_to_the_new_owner() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "rb", 4);
    for p in 0..4 {
        produce(&bootstrap, "rb", &format!("p{p}-"), 10, Some(p));
    }
    let group = "rb-group";
    let offsets_of = |source: &KafkaSource, msgs: &[SourceMsg]| -> BTreeMap<i32, Vec<i64>> {
        let mut by: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        for m in msgs {
            let (_, p, o) = source.position(m.id).unwrap();
            by.entry(p).or_default().push(o);
        }
        by
    };
    // The records in flight are never acked within this grace.
    let grace = Duration::from_millis(1_500);
    block_on(async {
        let mut a = KafkaSource::new(KafkaSourceConfig {
            poll_ms: 20,
            revoke_grace_ms: grace.as_millis() as u64,
            ..config(&server, "rb", group)
        });
        let a_stats = a.kafka_stats();
        a.connect().await.unwrap();
        let first = poll_n(&mut a, 40).await;
        assert_eq!(a.assignment().len(), 4);
        // Per partition, offsets 0, 1, 2 and 4 are done; 3 and 5..9 are in
        // flight: the watermark is 3.
        let mut in_flight = HashMap::new();
        let mut done = Vec::new();
        for m in &first {
            let (_, p, o) = a.position(m.id).unwrap();
            if [0, 1, 2, 4].contains(&o) {
                done.push(m.id);
            } else {
                in_flight.insert((p, o), m.id);
            }
        }
        a.ack(&done).await.unwrap();
        wait_until("the watermarks are committed", WAIT, || {
            committed(&bootstrap, group, "rb", 4) == Some(vec![3; 4])
        });

        // A second member joins: the partitions are split between them.
        let mut b = KafkaSource::new(KafkaSourceConfig {
            poll_ms: 20,
            ..config(&server, "rb", group)
        });
        b.connect().await.unwrap();
        let (mut a_again, mut b_got) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + WAIT;
        // When the group revokes a's partitions, a waits out its grace
        // (nothing it holds is acked) before it lets them go.
        let (mut grace_began, mut grace_ended) = (None, None);
        while !(a.assignment().len() == 2
            && b.assignment().len() == 2
            && a_again.len() == 14
            && b_got.len() == 14)
        {
            assert!(
                Instant::now() < deadline,
                "no split: a has {:?} ({} read again), b has {:?} ({} read)",
                a.assignment(),
                a_again.len(),
                b.assignment(),
                b_got.len()
            );
            if let Polled::Msgs(m) = a.poll(100).await.unwrap() {
                a_again.extend(m);
            }
            match (a.revoking().is_empty(), grace_began) {
                (false, None) => grace_began = Some(Instant::now()),
                (true, Some(_)) if grace_ended.is_none() => grace_ended = Some(Instant::now()),
                _ => {}
            }
            if let Polled::Msgs(m) = b.poll(100).await.unwrap() {
                assert!(
                    grace_ended.is_some(),
                    "b read a partition while a was in its grace"
                );
                b_got.extend(m);
            }
        }
        let waited = grace_ended.unwrap() - grace_began.expect("a waited in a grace");
        assert!(
            waited >= grace - Duration::from_millis(200),
            "the grace ended after {waited:?}, before {grace:?}"
        );
        assert_eq!(a_stats.graces_expired(), 1);
        assert_eq!(a_stats.completed_in_grace(), 0);
        assert!(a_stats.revoked() >= 4);
        assert_eq!(a_stats.dropped_in_flight(), 4 * 6, "3 and 5..9 of each");
        assert_eq!(a_stats.left_uncommitted(), 4 * 7, "3..9 of each");
        // Each member reads its partitions from the committed offset: the
        // records in flight at the revocation are read again.
        let expect: Vec<i64> = (3..10).collect();
        for (p, offsets) in offsets_of(&a, &a_again)
            .into_iter()
            .chain(offsets_of(&b, &b_got))
        {
            assert_eq!(offsets, expect, "partition {p}");
        }
        // Acks of the first reading are stale now: nothing is committed.
        let stale: Vec<SourceId> = in_flight.values().copied().collect();
        a.ack(&stale).await.unwrap();
        assert_eq!(a_stats.stale_acks(), stale.len() as u64);
        assert_eq!(committed(&bootstrap, group, "rb", 4), Some(vec![3; 4]));
        // The new readings complete: everything is committed.
        let ids = |msgs: &[SourceMsg]| msgs.iter().map(|m| m.id).collect::<Vec<_>>();
        a.ack(&ids(&a_again)).await.unwrap();
        b.ack(&ids(&b_got)).await.unwrap();
        wait_until("everything is committed", WAIT, || {
            committed(&bootstrap, group, "rb", 4) == Some(vec![10; 4])
        });
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    });
}

/// A second member joins while the first holds records in flight; the
/// first acks them within its revocation grace. The group does not hand
/// the partitions over before the first lets them go, its commits include
/// those records, and neither member reads them again.
#[test]
fn records_acked_within_the_revocation_grace_are_committed_and_not_read_again() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "grace", 4);
    for p in 0..4 {
        produce(&bootstrap, "grace", &format!("p{p}-"), 10, Some(p));
    }
    let group = "grace-group";
    let member = |grace_ms: u64| {
        KafkaSource::new(KafkaSourceConfig {
            poll_ms: 20,
            revoke_grace_ms: grace_ms,
            ..config(&server, "grace", group)
        })
    };
    block_on(async {
        // A grace far longer than the test needs: it must end at the acks.
        let mut a = member(60_000);
        let a_stats = a.kafka_stats();
        a.connect().await.unwrap();
        let first = poll_n(&mut a, 40).await;
        // Per partition, 0..5 are done and 5..10 in flight.
        let (mut done, mut in_flight) = (Vec::new(), Vec::new());
        for m in &first {
            let (_, _, o) = a.position(m.id).unwrap();
            if o < 5 {
                done.push(m.id);
            } else {
                in_flight.push(m.id);
            }
        }
        assert_eq!(in_flight.len(), 20);
        a.ack(&done).await.unwrap();
        wait_until("the watermarks are committed", WAIT, || {
            committed(&bootstrap, group, "grace", 4) == Some(vec![5; 4])
        });

        // b joins: the group revokes a's partitions, and a waits for its
        // records in flight, admitting nothing.
        let mut b = member(60_000);
        b.connect().await.unwrap();
        let deadline = Instant::now() + WAIT;
        while a.revoking().is_empty() {
            assert!(
                Instant::now() < deadline,
                "a's partitions were never revoked"
            );
            assert!(matches!(a.poll(100).await.unwrap(), Polled::Idle));
            assert!(matches!(b.poll(100).await.unwrap(), Polled::Idle));
        }
        assert_eq!(a.revoking().len(), 4);
        let began = Instant::now();
        // While a waits, the group gives b nothing.
        while began.elapsed() < Duration::from_secs(1) {
            assert!(matches!(a.poll(100).await.unwrap(), Polled::Idle));
            assert!(matches!(b.poll(100).await.unwrap(), Polled::Idle));
            assert!(b.assignment().is_empty(), "{:?}", b.assignment());
        }
        assert_eq!(
            a.revoking().len(),
            4,
            "the grace ended with records in flight"
        );
        assert_eq!(committed(&bootstrap, group, "grace", 4), Some(vec![5; 4]));

        // a's records complete within the grace: the revocation ends at
        // that ack, commits them and lets the partitions go.
        a.ack(&in_flight).await.unwrap();
        assert!(
            a.revoking().is_empty(),
            "the revocation did not end at the acks"
        );
        assert_eq!(a_stats.completed_in_grace(), 20);
        assert_eq!(a_stats.graces_expired(), 0);
        assert_eq!(a_stats.dropped_in_flight(), 0);
        assert_eq!(a_stats.left_uncommitted(), 0);
        assert_eq!(a_stats.stale_acks(), 0);

        // The split: each member resumes at the new commits. One marker per
        // partition, produced after the split, is the first record either
        // reads (a partition's records come in order): nothing is read again.
        let mut got: Vec<(i32, String)> = Vec::new();
        let deadline = Instant::now() + WAIT;
        while !(a.assignment().len() == 2 && b.assignment().len() == 2) {
            assert!(
                Instant::now() < deadline,
                "no split: a has {:?}, b has {:?}",
                a.assignment(),
                b.assignment()
            );
            for s in [&mut a, &mut b] {
                if let Polled::Msgs(m) = s.poll(100).await.unwrap() {
                    got.extend(
                        m.iter()
                            .map(|m| (0, m.msg.payload_str().unwrap().to_owned())),
                    );
                }
            }
        }
        assert!(got.is_empty(), "read again after the split: {got:?}");
        // librdkafka rejoined only once the commit at the revocation was
        // answered: it is there.
        assert_eq!(committed(&bootstrap, group, "grace", 4), Some(vec![10; 4]));
        for p in 0..4 {
            produce(&bootstrap, "grace", &format!("marker{p}-"), 1, Some(p));
        }
        let mut acks: Vec<(usize, SourceId)> = Vec::new();
        let deadline = Instant::now() + WAIT;
        while got.len() < 4 {
            assert!(Instant::now() < deadline, "markers read: {got:?}");
            for (i, s) in [&mut a, &mut b].into_iter().enumerate() {
                if let Polled::Msgs(m) = s.poll(100).await.unwrap() {
                    for m in m {
                        let (_, p, _) = s.position(m.id).unwrap();
                        got.push((p, m.msg.payload_str().unwrap().to_owned()));
                        acks.push((i, m.id));
                    }
                }
            }
        }
        got.sort();
        assert_eq!(
            got,
            (0..4)
                .map(|p| (p, format!("marker{p}-0")))
                .collect::<Vec<_>>(),
            "only the markers"
        );
        for (i, s) in [&mut a, &mut b].into_iter().enumerate() {
            let ids: Vec<SourceId> = acks.iter().filter(|a| a.0 == i).map(|a| a.1).collect();
            s.ack(&ids).await.unwrap();
        }
        wait_until("the markers are committed", WAIT, || {
            committed(&bootstrap, group, "grace", 4) == Some(vec![11; 4])
        });
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    });
}

/// Two standalone runs share a group: the second starts mid-stream, and the
/// first's roots in flight at the revocation complete within its grace, so
/// no record is handled twice and none is lost. (Records take 5 ms each on
/// two workers, so that the first is still busy when the second joins.)
#[test]
fn a_member_joining_mid_stream_takes_over_without_duplicates() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "join", 4);
    let n = 4_000;
    produce(&bootstrap, "join", "m", n, None);
    let ends = end_offsets(&bootstrap, "join", 4);
    assert!(ends.iter().all(|&e| e > 0), "{ends:?}");

    let seen = Seen::default();
    let run = |name: &str| {
        let source = KafkaSource::new(KafkaSourceConfig {
            batch_size: 100,
            ..config(&server, "join", "join-group")
        });
        let stats = (source.stats(), source.kafka_stats());
        let topology = Topology::builder(name)
            .source(source)
            .pipeline(recording_pipeline(&seen, Duration::from_millis(5)))
            .max_pending(200)
            .batch_size(100)
            .grace_period(Duration::from_secs(10))
            .build()
            .unwrap();
        (Running::start(topology), stats)
    };
    let (a, (a_stats, a_kafka)) = run("join-a");
    wait_until("a has handled some records", WAIT, || {
        seen.distinct() >= 400
    });
    let (b, (b_stats, b_kafka)) = run("join-b");
    wait_until("every record is handled", WAIT, || seen.distinct() == n);
    wait_until("everything is committed", WAIT, || {
        committed(&bootstrap, "join-group", "join", 4).as_ref() == Some(&ends)
    });
    let (ra, rb) = (a.stop(), b.stop());
    eprintln!(
        "join mid-stream: a emitted {} (completed in grace {}, graces expired {}, skipped {}), \
         b emitted {}; {} handled",
        a_stats.emitted(),
        a_kafka.completed_in_grace(),
        a_kafka.graces_expired(),
        a_kafka.skipped_revoking(),
        b_stats.emitted(),
        seen.total()
    );
    assert!(a_kafka.revoked() >= 4, "a's partitions were never revoked");
    assert!(
        a_kafka.completed_in_grace() > 0,
        "nothing was in flight at the revocation"
    );
    assert!(
        b_kafka.assigned() >= 1 && b_stats.emitted() > 0,
        "b took nothing"
    );
    assert_eq!(a_kafka.graces_expired(), 0);
    assert_eq!(a_kafka.dropped_in_flight(), 0);
    assert_eq!(seen.total(), n, "a record was handled twice");
    assert_eq!(ra.acked() + rb.acked(), n as u64);
}

#[test]
fn the_revocation_grace_is_at_most_the_topologys_grace_period() {
    let source = |ms: u64| {
        KafkaSource::new(KafkaSourceConfig {
            revoke_grace_ms: ms,
            ..KafkaSourceConfig::new("h:9092", ["t"])
        })
    };
    assert_eq!(source(5_000).revoke_grace(), Duration::from_secs(5));
    let mut settings = tempest_core::Settings::new("t");
    settings.grace_period = Duration::from_secs(2);
    let mut s = source(5_000);
    block_on(s.configure(&settings)).unwrap();
    assert_eq!(s.revoke_grace(), Duration::from_secs(2), "capped");
    let mut s = source(1_500);
    block_on(s.configure(&settings)).unwrap();
    assert_eq!(s.revoke_grace(), Duration::from_millis(1_500));
    let mut s = source(0);
    block_on(s.configure(&settings)).unwrap();
    assert_eq!(s.revoke_grace(), Duration::ZERO);
}

// ---------------------------------------------------------------------------
// Failures

#[test]
fn a_poison_record_is_dead_lettered_with_its_reason_and_then_committed() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "orders", 1);
    create_topic(&bootstrap, "orders-dead", 1);
    produce(&bootstrap, "orders", "m", 10, Some(0));
    {
        let p = producer(&bootstrap);
        let h = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "origin",
            value: Some("test"),
        });
        p.send(
            BaseRecord::to("orders")
                .key("pk")
                .payload("poison")
                .headers(h),
        )
        .unwrap();
        p.flush(Duration::from_secs(30)).unwrap();
    }
    produce(&bootstrap, "orders", "n", 10, Some(0));

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
    let source = KafkaSource::new(KafkaSourceConfig {
        dead_letter_topic: Some("orders-dead".into()),
        ..config(&server, "orders", "poison-group")
    });
    let kafka_stats = source.kafka_stats();
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
    let dead = read_topic(&bootstrap, "orders-dead", 1, 1);
    wait_until("every record is handled", WAIT, || seen.distinct() == 21);
    wait_until(
        "everything is committed, the poison record too",
        WAIT,
        || committed(&bootstrap, "poison-group", "orders", 1) == Some(vec![21]),
    );
    let report = run.stop();

    assert_eq!(seen.get("poison"), 3, "tried max_attempts times");
    assert_eq!(seen.total(), 20 + 3);
    assert_eq!(report.dead_lettered(), 1);
    assert_eq!(kafka_stats.dead_lettered(), 1);
    assert_eq!(dead.len(), 1);
    let (key, value, headers) = &dead[0];
    assert_eq!(key.as_deref(), Some("pk"));
    assert_eq!(value, "poison");
    let expect: BTreeMap<String, String> = [
        ("origin", "test"),
        ("tempest.reason", "cannot digest poison"),
        ("tempest.attempts", "3"),
        ("tempest.source", "orders/0/10"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(headers, &expect);
}

#[test]
fn fail_writes_the_dead_letter_before_committing_and_release_commits_nothing() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "f", 1);
    produce(&bootstrap, "f", "m", 4, Some(0));
    let reason = FailReason {
        message: "bad record".into(),
        attempts: 2,
    };
    block_on(async {
        let mut c = config(&server, "f", "fg");
        // A dead letter to a missing topic fails after this, not 30 s.
        c.properties
            .insert("message.timeout.ms".into(), toml::Value::Integer(3000));
        let mut source = KafkaSource::new(c);
        source.connect().await.unwrap();
        let msgs = poll_n(&mut source, 4).await;
        let ids: Vec<SourceId> = msgs.iter().map(|m| m.id).collect();
        // The default dead-letter topic, "<topic>.dead", does not exist
        // (tansu does not create topics on produce): the fail is an error
        // and nothing is committed past it.
        source.ack(&ids[1..]).await.unwrap();
        let failed = source.fail(ids[0], &reason).await;
        if let Err(e) = failed {
            assert_eq!(e.kind, SourceErrorKind::Fail);
            assert!(e.message.contains("f.dead"), "{e}");
            assert_eq!(source.watermarks(), [(("f".to_owned(), 0), 0)]);
            assert_eq!(committed(&bootstrap, "fg", "f", 1), Some(vec![-1]));
            // Once the topic exists, a later fail goes through and commits.
            create_topic(&bootstrap, "f.dead", 1);
            source.fail(ids[0], &reason).await.unwrap();
            wait_until("committed after the dead letter", WAIT, || {
                committed(&bootstrap, "fg", "f", 1) == Some(vec![4])
            });
            let dead = read_topic(&bootstrap, "f.dead", 1, 1);
            assert_eq!(dead[0].1, "m0");
            assert_eq!(dead[0].2["tempest.reason"], "bad record");
            assert_eq!(dead[0].2["tempest.attempts"], "2");
        } else {
            // A broker that creates topics on first use took it.
            assert_eq!(read_topic(&bootstrap, "f.dead", 1, 1).len(), 1);
            wait_until("committed after the dead letter", WAIT, || {
                committed(&bootstrap, "fg", "f", 1) == Some(vec![4])
            });
        }
        source.shutdown().await.unwrap();
    });

    // Released (policy none): the offset stays uncommitted and is read
    // again by the next member of the group.
    produce(&bootstrap, "f", "r", 2, Some(0));
    block_on(async {
        let mut source = KafkaSource::new(config(&server, "f", "fg"));
        source.connect().await.unwrap();
        let msgs = poll_n(&mut source, 2).await;
        assert_eq!(msgs[0].msg.payload_str(), Some("r0"));
        source.release(msgs[0].id, &reason).await.unwrap();
        source.ack(&[msgs[1].id]).await.unwrap();
        assert_eq!(source.watermarks(), [(("f".to_owned(), 0), 4)]);
        source.shutdown().await.unwrap();
    });
    assert_eq!(committed(&bootstrap, "fg", "f", 1), Some(vec![4]));
    block_on(async {
        let mut source = KafkaSource::new(config(&server, "f", "fg"));
        source.connect().await.unwrap();
        let msgs = poll_n(&mut source, 2).await;
        let payloads: Vec<_> = msgs.iter().map(|m| m.msg.payload_str().unwrap()).collect();
        assert_eq!(payloads, ["r0", "r1"], "read again from the released one");
        source.shutdown().await.unwrap();
    });
}

// ---------------------------------------------------------------------------
// The broker down or restarted

#[test]
fn connecting_to_nothing_is_a_retryable_connect_error_and_health_follows_the_broker() {
    let mut server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "h", 1);
    block_on(async {
        let mut nowhere = KafkaSource::new(KafkaSourceConfig::new("127.0.0.1:1", ["h"]));
        assert!(!nowhere.health().await.is_healthy());
        let e = nowhere.connect().await.unwrap_err();
        assert!(e.retryable, "{e}");
        assert_eq!(e.kind, SourceErrorKind::Connect);
        assert!(e.message.contains("127.0.0.1:1"), "{e}");
        nowhere.shutdown().await.unwrap();

        let mut source = KafkaSource::new(config(&server, "h", "hg"));
        match source.health().await {
            Health::Unhealthy(why) => assert!(why.contains("not connected"), "{why}"),
            Health::Healthy => panic!("healthy before connecting"),
        }
        source.connect().await.unwrap();
        assert!(source.health().await.is_healthy());
        server.kill();
        assert!(!source.health().await.is_healthy());
        assert!(source.connect().await.unwrap_err().retryable);
        server.restart().unwrap();
        // librdkafka reconnects with its own back-off: the runtime calls
        // connect again until it succeeds.
        let deadline = Instant::now() + WAIT;
        while let Err(e) = source.connect().await {
            assert!(e.retryable, "{e}");
            assert!(Instant::now() < deadline, "no reconnect: {e}");
        }
        assert!(source.health().await.is_healthy());
        source.shutdown().await.unwrap();
    });
}

#[test]
fn a_broker_restarted_mid_stream_loses_nothing() {
    let mut server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "s", 3);
    let n = 2_000;
    produce(&bootstrap, "s", "m", n, None);

    let seen = Seen::default();
    let source = KafkaSource::new(KafkaSourceConfig {
        batch_size: 50,
        ..config(&server, "s", "restart-group")
    });
    let kafka_stats = source.kafka_stats();
    let max_pending = 100;
    let topology = Topology::builder("restart")
        .source(source)
        .pipeline(recording_pipeline(&seen, Duration::from_micros(500)))
        .max_pending(max_pending)
        .batch_size(50)
        .build()
        .unwrap();
    let run = Running::start(topology);
    wait_until("some records are handled", WAIT, || seen.distinct() >= 200);
    let before = seen.distinct();
    server.restart().unwrap();
    assert!(
        before < n,
        "the restart must come mid-stream ({before} of {n} handled)"
    );
    produce(&bootstrap, "s", "after", 100, None);
    let ends = end_offsets(&bootstrap, "s", 3);
    assert_eq!(
        ends.iter().sum::<i64>(),
        n as i64 + 100,
        "the broker kept every record"
    );

    wait_until("every record is handled", WAIT, || {
        seen.distinct() == n + 100
    });
    wait_until("everything is committed", WAIT, || {
        committed(&bootstrap, "restart-group", "s", 3).as_ref() == Some(&ends)
    });
    run.stop();
    for i in 0..n {
        assert!(seen.get(&format!("m{i}")) >= 1, "m{i} lost");
    }
    for i in 0..100 {
        assert!(seen.get(&format!("after{i}")) >= 1, "after{i} lost");
    }
    let duplicates = seen.total() - seen.distinct();
    eprintln!(
        "broker restart: {duplicates} duplicate(s); {} revoked, {} in flight at revocation, {} commit error(s)",
        kafka_stats.revoked(),
        kafka_stats.dropped_in_flight(),
        kafka_stats.commit_errors()
    );
    assert!(
        duplicates <= kafka_stats.left_uncommitted() as usize,
        "{duplicates} duplicates, but only {} records were left uncommitted at revocations",
        kafka_stats.left_uncommitted()
    );
}

// ---------------------------------------------------------------------------
// Configuration

fn table(text: &str) -> toml::Table {
    toml::from_str(text).unwrap()
}

#[test]
fn every_key_is_read_and_defaults_apply() {
    let source = KafkaSource::from_config(&table(
        r#"
        brokers = "k1:9092,k2:9092"
        group = "g"
        topics = ["a", "b"]
        auto_offset_reset = "latest"
        dead_letter_topic = "dead"
        batch_size = 1000
        poll_ms = 0
        revoke_grace_ms = 2500
        format = "record"
        [properties]
        "security.protocol" = "sasl_plaintext"
        "sasl.mechanism" = "PLAIN"
        "sasl.username" = "u"
        "sasl.password" = "p"
        "fetch.wait.max.ms" = 50
        "check.crcs" = true
        "#,
    ))
    .unwrap();
    let c = source.config();
    assert_eq!(c.brokers, "k1:9092,k2:9092");
    assert_eq!(c.group, "g");
    assert_eq!(c.topics, ["a", "b"]);
    assert_eq!(c.topic_regex, None);
    assert_eq!(c.auto_offset_reset, OffsetReset::Latest);
    assert_eq!(c.dead_letter_topic_for("a"), "dead");
    assert_eq!((c.batch_size, c.poll_ms), (1000, 0));
    assert_eq!(c.revoke_grace_ms, 2500);
    assert_eq!(c.format, RecordFormat::Record);
    assert_eq!(c.properties.len(), 6);

    let source = KafkaSource::from_config(&table(
        "brokers = \"h:9092\"\ntopic_regex = \"^events-.*\"\n",
    ))
    .unwrap();
    let c = source.config();
    assert_eq!(c.group, "tempest");
    assert_eq!(c.auto_offset_reset, OffsetReset::Earliest);
    assert_eq!((c.batch_size, c.poll_ms), (512, 100));
    assert_eq!(c.revoke_grace_ms, 5000);
    assert_eq!(c.format, RecordFormat::Value);
    assert_eq!(c.dead_letter_topic_for("events-1"), "events-1.dead");
    assert_eq!(
        *c,
        KafkaSourceConfig {
            topic_regex: Some("^events-.*".into()),
            ..KafkaSourceConfig::new("h:9092", Vec::<String>::new())
        }
    );
}

#[test]
fn config_errors_name_the_key() {
    let base = "brokers = \"h:9092\"\ntopics = [\"t\"]\n";
    let err = |text: &str| KafkaSource::from_config(&table(text)).err().unwrap();

    let e = err("topics = [\"t\"]\n");
    assert!(e.message.contains("brokers"), "{e}");
    let e = err("brokers = \"h:9092\"\n");
    assert_eq!(e.key.as_deref(), Some("topics"), "{e}");

    for (extra, key) in [
        ("poll_ms = \"fast\"", "poll_ms"),
        ("pol_ms = 5", "pol_ms"),
        ("batch_size = 0", "batch_size"),
        ("batch_size = -1", "batch_size"),
        ("poll_ms = 3600000", "poll_ms"),
        ("group = \"\"", "group"),
        ("auto_offset_reset = \"smallest\"", "auto_offset_reset"),
        ("format = \"json\"", "format"),
        ("topic_regex = \"^t.*\"", "topic_regex"),
        ("dead_letter_topic = \"t\"", "dead_letter_topic"),
        ("dead_letter_topic = \"a b\"", "dead_letter_topic"),
        ("topics = \"t\"", "topics"),
        ("revoke_grace_ms = \"soon\"", "revoke_grace_ms"),
        ("revoke_grace_ms = -1", "revoke_grace_ms"),
        ("revoke_grace_ms = 300001", "revoke_grace_ms"),
        ("revoke_grac_ms = 5", "revoke_grac_ms"),
    ] {
        let text = if key == "topics" {
            format!("brokers = \"h:9092\"\n{extra}\n")
        } else {
            format!("{base}{extra}\n")
        };
        let e = err(&text);
        assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}");
    }
    for (text, key) in [
        ("brokers = \"\"\ntopics = [\"t\"]\n", "brokers"),
        ("brokers = \"h\"\ntopics = [\"t\"]\n", "brokers"),
        ("brokers = \"h:9092\"\ntopics = [\"\"]\n", "topics"),
        ("brokers = \"h:9092\"\ntopics = [\"a/b\"]\n", "topics"),
        ("brokers = \"h:9092\"\ntopic_regex = \"^\"\n", "topic_regex"),
    ] {
        let e = err(text);
        assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
    }
    for (property, key) in [
        (
            "\"no.such.property\" = 1",
            "properties.\"no.such.property\"",
        ),
        (
            "\"session.timeout.ms\" = \"soon\"",
            "properties.\"session.timeout.ms\"",
        ),
        (
            "\"enable.auto.commit\" = true",
            "properties.\"enable.auto.commit\"",
        ),
        ("\"group.id\" = \"x\"", "properties.\"group.id\""),
        (
            "\"fetch.wait.max.ms\" = [1]",
            "properties.\"fetch.wait.max.ms\"",
        ),
    ] {
        let e = err(&format!("{base}[properties]\n{property}\n"));
        assert_eq!(e.key.as_deref(), Some(key), "{property}: {e}");
    }
    let e = err(&format!("{base}[properties]\n\"group.id\" = \"x\"\n"));
    assert!(e.message.contains("use `group`"), "{e}");
    // The grace must end before the broker gives up on the member.
    let e = err(&format!(
        "{base}revoke_grace_ms = 5000\n[properties]\n\"max.poll.interval.ms\" = 5000\n"
    ));
    assert_eq!(e.key.as_deref(), Some("revoke_grace_ms"), "{e}");
    assert!(e.message.contains("max.poll.interval.ms"), "{e}");
    assert!(KafkaSource::from_config(&table(&format!(
        "{base}revoke_grace_ms = 4999\n[properties]\n\"max.poll.interval.ms\" = 5000\n"
    )))
    .is_ok());
}

#[test]
fn topology_toml_selects_kind_kafka_and_its_errors_name_the_file_line_and_key() {
    let mut t = Topology::builder("t")
        .pipeline(Pipeline::new().task("a", || |_m: Msg| -> TaskResult { Ok(None) }))
        .build()
        .unwrap();
    tempest_connectors::register(&mut t.source_kinds);
    let file = TopologyFile::parse(
        "[source]\nkind = \"kafka\"\n[source.config]\nbrokers = \"h:9092\"\ntopics = [\"t\"]\npoll_ms = \"fast\"\n",
        None,
    )
    .unwrap();
    let errs = file.apply(&mut t).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key.as_deref(), Some("source.config.poll_ms"));
    assert_eq!(errs[0].line, Some(6));

    let file = TopologyFile::parse(
        "[source]\nkind = \"kafka\"\n[source.config]\nbrokers = \"h:9092\"\ntopics = [\"t\"]\nrevoke_grace_ms = 1000000\n",
        None,
    )
    .unwrap();
    let errs = file.apply(&mut t).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].key.as_deref(),
        Some("source.config.revoke_grace_ms")
    );
    assert_eq!(errs[0].line, Some(6));

    let file = TopologyFile::parse(
        "[source]\nkind = \"kafka\"\n[source.config]\nbrokers = \"h:9092\"\ntopics = [\"t\"]\n[source.config.properties]\n\"client.id\" = \"me\"\n",
        None,
    )
    .unwrap();
    file.apply(&mut t).unwrap();
    assert!(t.has_source(tempest_core::DEFAULT_SOURCE));
}

#[test]
fn configure_refuses_a_bad_config_given_in_code() {
    let mut source = KafkaSource::new(KafkaSourceConfig {
        batch_size: 0,
        ..KafkaSourceConfig::new("h:9092", ["t"])
    });
    let e = block_on(source.configure(&tempest_core::Settings::new("t"))).unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(!e.retryable);
    assert!(e.message.contains("batch_size"), "{e}");
}

// ---------------------------------------------------------------------------
// KafkaOutput

/// Sends every message upper-cased to a topic, delivered at each flush.
struct Upper {
    out: KafkaOutput,
}

impl Task for Upper {
    fn handle(&mut self, msg: Msg) -> TaskResult {
        let text = msg.payload_str().ok_or("not UTF-8")?.to_uppercase();
        self.out.send_record(
            "upper",
            Some(text.as_bytes()),
            text.as_bytes(),
            &[("by", b"upper")],
            None,
        )?;
        Ok(None)
    }
    fn flush(&mut self) -> Result<(), TaskError> {
        self.out.flush()
    }
}

#[test]
fn output_in_a_task_delivers_every_message_before_it_is_acked() {
    let server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "upper", 3);
    let words: Vec<String> = (0..2_000).map(|i| format!("w{i}")).collect();
    let task_bootstrap = bootstrap.clone();
    let topology = Topology::builder("upper")
        .pipeline(
            Pipeline::new().task_with_workers("upper", 3, move || Upper {
                out: KafkaOutput::new(&task_bootstrap).unwrap(),
            }),
        )
        .build()
        .unwrap();
    let report = TestRuntime::new(topology).input(words).run().unwrap();
    assert!(report.all_acked());
    // Acked means delivered: the records are there now.
    let ends = end_offsets(&bootstrap, "upper", 3);
    assert_eq!(ends.iter().sum::<i64>(), 2_000);
    let records = read_topic(&bootstrap, "upper", 3, 2_000);
    let mut values: Vec<&str> = records.iter().map(|r| r.1.as_str()).collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), 2_000, "every message once");
    assert!(records
        .iter()
        .all(|r| r.0.as_deref() == Some(r.1.as_str()) && r.2["by"] == "upper"));
}

#[test]
fn output_flush_to_a_stopped_broker_is_a_retryable_error() {
    let mut server = server();
    let bootstrap = server.bootstrap();
    create_topic(&bootstrap, "o", 1);
    let mut out = KafkaOutput::new(&bootstrap)
        .unwrap()
        .with_timeout(Duration::from_secs(2));
    out.flush().unwrap();
    out.send("o", None, b"one").unwrap();
    assert_eq!(out.buffered(), 1);
    out.flush().unwrap();
    assert_eq!(end_offsets(&bootstrap, "o", 1), [1]);
    server.kill();
    out.send("o", None, b"two").unwrap();
    let e = out.flush().unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert_eq!(out.buffered(), 0, "what was not delivered is dropped");
    assert!(KafkaOutput::with_properties(&bootstrap, [("no.such.property", "1")]).is_err());
}
