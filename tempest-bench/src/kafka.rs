//! The `kafka` and `kafka-raw` workloads: Tempest reading a Kafka topic
//! through a consumer group, against a bare consume-and-commit loop on the
//! same broker.
//!
//! Both produce records of 100 bytes, spread evenly over topics of 3
//! partitions, before anything is timed, then read them through a consumer
//! group of their own until every record is committed: `kafka-raw` with a
//! bare librdkafka loop (a `BaseConsumer` polls a batch and commits each
//! partition's next offset asynchronously, nothing else), `kafka` with the
//! passthrough pipeline behind a `KafkaSource` committing its low
//! watermarks as acks come back. `kafka` runs the raw loop too, taking
//! turns with it on topics of their own (see [`kafka`]), so one run gives
//! both figures and their ratio.
//!
//! The time of each read is from the first record received to the commit
//! that covers the last one (sent; the group's committed offsets are then
//! checked against the topic's end offsets, untimed): joining the group
//! (`join_seconds`, a few seconds on a fresh group) is not throughput.
//! `cpu_us_per_msg` is this process's CPU time over the read per record,
//! `broker_cpu_us_per_msg` the broker's (when the bench started it).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use tokio::sync::watch;

use tempest::{FailReason, Health, Polled, Settings, Source, SourceError, SourceId, Topology};
use tempest_connectors::kafka::{KafkaSource, KafkaSourceConfig};
use tempest_testkit::kafka::KafkaServer;
use tempest_topology::Standalone;

use crate::{passthrough_pipeline, proc_cpu_micros, process_cpu_micros};

/// The topic's partitions.
const PARTITIONS: i32 = 3;
/// Bytes of each record's value.
const PAYLOAD: usize = 100;
/// How long a run may go without progress before it is given up.
const STALL: Duration = Duration::from_secs(60);
/// Metadata, admin and offset requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the kafka workloads need from the command line.
pub struct KafkaArgs {
    pub messages: u64,
    pub batch_size: usize,
    pub max_pending: usize,
    pub brokers: Option<String>,
}

/// The broker to use: `--kafka-brokers`, or a tansu of our own.
struct Broker {
    bootstrap: String,
    server: Option<KafkaServer>,
}

impl Broker {
    fn start(args: &KafkaArgs) -> anyhow::Result<Self> {
        match &args.brokers {
            Some(b) => {
                let probe: BaseConsumer = client(b).create().context("kafka client")?;
                probe
                    .fetch_metadata(None, Duration::from_secs(10))
                    .with_context(|| format!("the Kafka brokers {b} do not answer"))?;
                Ok(Broker {
                    bootstrap: b.clone(),
                    server: None,
                })
            }
            None => {
                let server = KafkaServer::start().context(
                    "starting the Kafka-compatible broker (scripts/test installs tansu)",
                )?;
                Ok(Broker {
                    bootstrap: server.bootstrap(),
                    server: Some(server),
                })
            }
        }
    }

    /// The CPU time our own broker has used so far, in microseconds.
    fn cpu_micros(&self) -> Option<u64> {
        let pid = self.server.as_ref()?.pid()?;
        Some(proc_cpu_micros(&format!("/proc/{pid}/stat")))
    }
}

/// A name unique to this run (topics and groups outlive a run on an
/// external broker).
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let n = NEXT.fetch_add(1, Relaxed);
    format!("bench-{what}-{secs}-{}-{n}", std::process::id())
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Creates `topic` with [`PARTITIONS`] partitions and waits until its
/// metadata shows them.
fn create_topic(bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client(bootstrap).create().context("kafka admin client")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
        ))
        .with_context(|| format!("creating topic {topic}"))?;
    for r in results {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    let probe: BaseConsumer = client(bootstrap).create().context("kafka client")?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let partitions = probe
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
            });
        if partitions == Some(PARTITIONS as usize) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {topic} has {partitions:?} partitions, not {PARTITIONS}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Produces `n` records of [`PAYLOAD`] bytes, round-robin over the
/// partitions, and returns each partition's end offset.
fn produce(bootstrap: &str, topic: &str, n: u64) -> anyhow::Result<Vec<i64>> {
    let producer: BaseProducer = client(bootstrap)
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .context("kafka producer")?;
    let payload = [b'x'; PAYLOAD];
    for i in 0..n {
        let mut record = Some(
            BaseRecord::<(), [u8]>::to(topic)
                .payload(&payload[..])
                .partition((i % PARTITIONS as u64) as i32),
        );
        while let Some(r) = record.take() {
            if let Err((e, r)) = producer.send(r) {
                if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                    return Err(e).with_context(|| format!("producing to {topic}"));
                }
                producer.poll(Duration::from_millis(10));
                record = Some(r);
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .with_context(|| format!("flushing the records of {topic}"))?;
    let ends = end_offsets(&producer, topic)?;
    let total: i64 = ends.iter().sum();
    ensure!(
        total == n as i64,
        "{topic} holds {total} records, not {n} (were some not delivered?)"
    );
    Ok(ends)
}

/// Each partition's end offset (high watermark).
fn end_offsets(producer: &BaseProducer, topic: &str) -> anyhow::Result<Vec<i64>> {
    (0..PARTITIONS)
        .map(|p| {
            producer
                .client()
                .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
                .map(|(_, high)| high)
                .with_context(|| format!("the end offset of {topic}/{p}"))
        })
        .collect()
}

/// Waits until `group` has committed `ends` on every partition of `topic`.
fn check_committed(bootstrap: &str, group: &str, topic: &str, ends: &[i64]) -> anyhow::Result<()> {
    let c: BaseConsumer = client(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("kafka client")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let got: Vec<i64> = match c.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            Ok(got) => (0..PARTITIONS)
                .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        // An empty partition has nothing to commit.
        let done = got.len() == ends.len()
            && got
                .iter()
                .zip(ends)
                .all(|(g, e)| g == e || (*e == 0 && *g < 0));
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("group {group} committed {got:?} on {topic}, not the end offsets {ends:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One read of a topic through a consumer group.
struct Drained {
    /// From start to the first record (joining the group).
    join: Duration,
    /// From the first record to the commit that covers the last one.
    elapsed: Duration,
    /// Commits sent.
    commits: u64,
    /// CPU time of this process over `elapsed`, in microseconds.
    cpu_us: u64,
    /// CPU time of our own broker over `elapsed`, in microseconds.
    broker_cpu_us: Option<u64>,
    /// Records read.
    records: u64,
    /// Root complete latency, p50 and p99 in milliseconds (Tempest only).
    latency_ms: Option<(f64, f64)>,
    /// Commits that failed (Tempest only: the raw loop's would fail the run).
    commit_errors: u64,
}

impl Drained {
    /// Two drains as one: times, counts and CPU added up, the worse
    /// latency, the longer join.
    fn and(self, other: Drained) -> Drained {
        Drained {
            join: self.join.max(other.join),
            elapsed: self.elapsed + other.elapsed,
            commits: self.commits + other.commits,
            cpu_us: self.cpu_us + other.cpu_us,
            broker_cpu_us: self
                .broker_cpu_us
                .zip(other.broker_cpu_us)
                .map(|(a, b)| a + b),
            records: self.records + other.records,
            latency_ms: match (self.latency_ms, other.latency_ms) {
                (Some(a), Some(b)) => Some((a.0.max(b.0), a.1.max(b.1))),
                (a, b) => a.or(b),
            },
            commit_errors: self.commit_errors + other.commit_errors,
        }
    }

    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }

    /// The figures of a workload's JSON.
    fn figures(&self) -> serde_json::Value {
        let n = self.records.max(1) as f64;
        let (p50, p99) = self.latency_ms.unwrap_or_default();
        json!({
            "seconds": self.elapsed.as_secs_f64(),
            "msgs_per_sec": self.rate(),
            "p50_ms": p50,
            "p99_ms": p99,
            "join_seconds": self.join.as_secs_f64(),
            "commits": self.commits,
            "commit_errors": self.commit_errors,
            "cpu_us_per_msg": self.cpu_us as f64 / n,
            "broker_cpu_us_per_msg": self.broker_cpu_us.map(|c| c as f64 / n),
        })
    }
}

/// The bare loop: a `BaseConsumer` in group `group` polls up to `batch`
/// records (waiting for the first only), then commits each partition's
/// next offset asynchronously, until every partition is read to `ends`.
fn drain_raw(
    broker: &Broker,
    topic: &str,
    group: &str,
    ends: &[i64],
    batch: usize,
) -> anyhow::Result<Drained> {
    let consumer: BaseConsumer = client(&broker.bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("kafka consumer")?;
    let started = Instant::now();
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    // Per partition, the next offset to commit (the topic is fresh: its
    // records start at 0).
    let mut next = vec![0i64; PARTITIONS as usize];
    let mut committed = next.clone();
    let mut first: Option<(Instant, u64, Option<u64>)> = None;
    let mut commits = 0u64;
    let mut last_progress = Instant::now();
    while next.iter().zip(ends).any(|(n, e)| n < e) {
        let mut wait = Duration::from_millis(100);
        for _ in 0..batch {
            let Some(got) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let m = match got {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("kafka-raw: consumer: {e}");
                    continue;
                }
            };
            first
                .get_or_insert_with(|| (Instant::now(), process_cpu_micros(), broker.cpu_micros()));
            // Touched, as a consumer would.
            std::hint::black_box(m.payload());
            if let Some(n) = usize::try_from(m.partition())
                .ok()
                .and_then(|p| next.get_mut(p))
            {
                *n = (*n).max(m.offset() + 1);
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, (n, c)) in next.iter().zip(committed.iter_mut()).enumerate() {
            if *n > *c {
                tpl.add_partition_offset(topic, p as i32, Offset::Offset(*n))
                    .context("a commit's offsets")?;
                *c = *n;
            }
        }
        if tpl.count() > 0 {
            consumer
                .commit(&tpl, CommitMode::Async)
                .context("committing")?;
            commits += 1;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > STALL {
            bail!("kafka-raw: no record for {STALL:?}; read up to {next:?} of {ends:?}");
        }
    }
    let done = Instant::now();
    let cpu_after = process_cpu_micros();
    let broker_after = broker.cpu_micros();
    let (first_at, cpu_before, broker_before) = first.context("no record was read")?;
    // Untimed: the last commits land (sent by librdkafka's threads while
    // the consumer lives), then they are checked.
    check_committed(&broker.bootstrap, group, topic, ends)?;
    consumer.unsubscribe();
    Ok(Drained {
        join: first_at - started,
        elapsed: done - first_at,
        commits,
        cpu_us: cpu_after.saturating_sub(cpu_before),
        broker_cpu_us: broker_after
            .zip(broker_before)
            .map(|(a, b)| a.saturating_sub(b)),
        records: ends.iter().sum::<i64>().max(0) as u64,
        latency_ms: None,
        commit_errors: 0,
    })
}

/// When a Tempest run got its first records and acked its last.
struct Clock {
    started: Instant,
    first: Option<(Instant, u64, Option<u64>)>,
    done: Option<(Instant, u64, Option<u64>)>,
    last_progress: Instant,
    stop: watch::Sender<bool>,
}

/// The Kafka source, timed: counts the acks and stops the run at `target`
/// (or after [`STALL`] without progress, checked by a watchdog thread).
struct Clocked {
    inner: KafkaSource,
    acked: Arc<AtomicU64>,
    target: u64,
    clock: Arc<Mutex<Clock>>,
    broker_pid: Option<u32>,
}

impl Clocked {
    fn now(&self) -> (Instant, u64, Option<u64>) {
        (
            Instant::now(),
            process_cpu_micros(),
            self.broker_pid
                .map(|pid| proc_cpu_micros(&format!("/proc/{pid}/stat"))),
        )
    }
}

#[tempest::async_trait]
impl Source for Clocked {
    async fn configure(&mut self, settings: &Settings) -> Result<(), SourceError> {
        self.inner.configure(settings).await
    }
    async fn connect(&mut self) -> Result<(), SourceError> {
        self.inner.connect().await
    }
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        let polled = self.inner.poll(max).await?;
        if matches!(polled, Polled::Msgs(_)) && self.clock.lock().first.is_none() {
            let now = self.now();
            let mut clock = self.clock.lock();
            clock.first = Some(now);
            clock.last_progress = now.0;
        }
        Ok(polled)
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        // Commits are sent inside: the clock stops after the last one.
        self.inner.ack(ids).await?;
        let acked = self.acked.fetch_add(ids.len() as u64, Relaxed) + ids.len() as u64;
        let done = (acked >= self.target).then(|| self.now());
        let mut clock = self.clock.lock();
        clock.last_progress = Instant::now();
        if let Some(now) = done {
            clock.done.get_or_insert(now);
            let _ = clock.stop.send(true);
        }
        Ok(())
    }
    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        self.inner.fail(id, reason).await
    }
    async fn release(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        self.inner.release(id, reason).await
    }
    async fn health(&mut self) -> Health {
        self.inner.health().await
    }
    async fn shutdown(&mut self) -> Result<(), SourceError> {
        self.inner.shutdown().await
    }
}

/// The passthrough pipeline behind a `KafkaSource` in group `group`.
fn drain_tempest(
    broker: &Broker,
    topic: &str,
    group: &str,
    ends: &[i64],
    args: &KafkaArgs,
) -> anyhow::Result<Drained> {
    let mut config = KafkaSourceConfig::new(&broker.bootstrap, [topic]);
    config.group = group.into();
    config.batch_size = args.batch_size;
    let source = KafkaSource::new(config);
    let kafka_stats = source.kafka_stats();
    let acked = Arc::new(AtomicU64::new(0));
    let (stop, shutdown) = watch::channel(false);
    let clock = Arc::new(Mutex::new(Clock {
        started: Instant::now(),
        first: None,
        done: None,
        last_progress: Instant::now(),
        stop,
    }));
    let target = ends.iter().sum::<i64>().max(0) as u64;
    let topology = Topology::builder("bench-kafka")
        .source(Clocked {
            inner: source,
            acked: acked.clone(),
            target,
            clock: clock.clone(),
            broker_pid: broker.server.as_ref().and_then(|s| s.pid()),
        })
        .pipeline(passthrough_pipeline())
        .batch_size(args.batch_size)
        .max_pending(args.max_pending)
        .message_timeout(Duration::from_secs(60))
        .build()
        .context("the benchmark topology")?;
    let watchdog = {
        let clock = clock.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let clock = clock.lock();
            if clock.done.is_some() || *clock.stop.borrow() {
                return;
            }
            if clock.last_progress.elapsed() > STALL {
                eprintln!("kafka: no progress for {STALL:?}: stopping");
                let _ = clock.stop.send(true);
                return;
            }
        })
    };
    {
        let mut clock = clock.lock();
        clock.started = Instant::now();
        clock.last_progress = clock.started;
    }
    let run = Standalone::new(topology).run_blocking(shutdown);
    // The run is over either way: let the watchdog go.
    let _ = clock.lock().stop.send(true);
    let _ = watchdog.join();
    let (report, _) = run.context("running the kafka topology")?;
    let done = acked.load(Relaxed);
    if done < target {
        bail!("only {done} of {target} records were acked");
    }
    check_committed(&broker.bootstrap, group, topic, ends)?;
    let clock = clock.lock();
    let (first_at, cpu_before, broker_before) = clock.first.context("no record was read")?;
    let (done_at, cpu_after, broker_after) = clock.done.context("the run did not finish")?;
    let latency = report
        .metrics
        .histogram(
            tempest_core::metrics::catalog::ROOT_COMPLETE_LATENCY.name,
            &[],
        )
        .cloned()
        .unwrap_or_default();
    Ok(Drained {
        join: first_at - clock.started,
        elapsed: done_at - first_at,
        commits: kafka_stats.commits(),
        cpu_us: cpu_after.saturating_sub(cpu_before),
        broker_cpu_us: broker_after
            .zip(broker_before)
            .map(|(a, b)| a.saturating_sub(b)),
        records: target,
        latency_ms: Some((
            latency.quantile(0.5) as f64 / 1000.0,
            latency.quantile(0.99) as f64 / 1000.0,
        )),
        commit_errors: kafka_stats.commit_errors(),
    })
}

/// A fresh topic with `n` records in it, and its end offsets.
fn prepare(broker: &Broker, what: &str, n: u64) -> anyhow::Result<(String, Vec<i64>)> {
    ensure!(n > 0, "--messages must be at least 1");
    let topic = unique(what);
    create_topic(&broker.bootstrap, &topic)?;
    let ends = produce(&broker.bootstrap, &topic, n)?;
    Ok((topic, ends))
}

/// `kafka-raw`: the broker's and librdkafka's ceiling.
pub fn kafka_raw(args: &KafkaArgs) -> anyhow::Result<serde_json::Value> {
    let broker = Broker::start(args)?;
    let (topic, ends) = prepare(&broker, "raw", args.messages)?;
    let raw = drain_raw(&broker, &topic, &unique("raw"), &ends, args.batch_size)?;
    let mut v = json!({
        "workload": "kafka-raw",
        "mode": "standalone",
        "messages": args.messages,
    });
    merge(&mut v, raw.figures());
    merge(
        &mut v,
        json!({
            "partitions": PARTITIONS,
            "batch_size": args.batch_size,
            "external_kafka": args.brokers.is_some(),
        }),
    );
    Ok(v)
}

/// `kafka`: Tempest reading the same kind of topic, with the raw loop's
/// figure of the same run beside it.
///
/// The broker's pace drifts (on a shared 2-core machine, with whatever else
/// runs), so the two take turns: each reads half of `--messages` twice, on
/// four topics written before any is read, in the order raw, Tempest,
/// Tempest, raw; each figure is over both of its halves.
pub fn kafka(args: &KafkaArgs) -> anyhow::Result<serde_json::Value> {
    let halves = [args.messages / 2, args.messages - args.messages / 2];
    ensure!(
        halves[0] > 0,
        "--messages must be at least 2 (each side reads two halves)"
    );
    let broker = Broker::start(args)?;
    let raw_1 = prepare(&broker, "raw", halves[0])?;
    let tempest_1 = prepare(&broker, "tempest", halves[0])?;
    let tempest_2 = prepare(&broker, "tempest", halves[1])?;
    let raw_2 = prepare(&broker, "raw", halves[1])?;
    let raw = |(topic, ends): &(String, Vec<i64>)| {
        drain_raw(&broker, topic, &unique("raw"), ends, args.batch_size)
    };
    let tempest = |(topic, ends): &(String, Vec<i64>)| {
        drain_tempest(&broker, topic, &unique("tempest"), ends, args)
    };
    let r1 = raw(&raw_1)?;
    let t1 = tempest(&tempest_1)?;
    let t2 = tempest(&tempest_2)?;
    let r2 = raw(&raw_2)?;
    let rates = |a: &Drained, b: &Drained| json!([a.rate(), b.rate()]);
    let (raw_halves, tempest_halves) = (rates(&r1, &r2), rates(&t1, &t2));
    let (raw, tempest) = (r1.and(r2), t1.and(t2));
    let mut v = json!({
        "workload": "kafka",
        "mode": "standalone",
        "messages": args.messages,
    });
    merge(&mut v, tempest.figures());
    let raw_figures = raw.figures();
    merge(
        &mut v,
        json!({
            "raw_msgs_per_sec": raw.rate(),
            "ratio_to_raw": tempest.rate() / raw.rate(),
            "halves_msgs_per_sec": tempest_halves,
            "raw_halves_msgs_per_sec": raw_halves,
            "raw_commits": raw_figures["commits"],
            "raw_cpu_us_per_msg": raw_figures["cpu_us_per_msg"],
            "raw_broker_cpu_us_per_msg": raw_figures["broker_cpu_us_per_msg"],
            "partitions": PARTITIONS,
            "batch_size": args.batch_size,
            "max_pending": args.max_pending,
            "external_kafka": args.brokers.is_some(),
        }),
    );
    Ok(v)
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}
