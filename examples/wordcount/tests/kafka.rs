//! Word count reading Kafka through its Topology.toml: the example's
//! `kafka.toml` (with the test broker's address put in), run as a real
//! `wordcount standalone` process against a real Kafka-compatible broker
//! (tansu, started by tempest-testkit). The `output` task appends every
//! total to a file ([`wordcount::OUTPUT_ENV`]), flushed before its batch is
//! acked, so once the group's committed offsets reach the end of every
//! partition the file holds every count. Each word's count must then be
//! exactly its number of occurrences: none lost, none counted twice.

#![cfg(unix)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{cycled_counts, sentence, Run, Summary, SENTENCES};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
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

#[test]
fn standalone_counts_every_sentence_of_a_kafka_topic_exactly_once() {
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
