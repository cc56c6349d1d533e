//! `JetStreamSource` against a real `nats-server -js` (the Debian 2.9
//! package): acks, naks, terms, configuration errors, a broker that is down
//! at start and a broker restarted mid-stream.

#![cfg(feature = "nats")]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tempest_connectors::nats::{DeliverPolicy, JetStreamConfig, JetStreamSource, KEY_HEADER};
use tempest_core::config::TopologyFile;
use tempest_core::metrics::{catalog, Labels, Registry};
use tempest_core::sources::SourceStats;
use tempest_core::{
    FailurePolicy, Msg, Pipeline, Polled, Settings, Source, SourceErrorKind, SourceId, TaskError,
    TaskResult, Topology,
};
use tempest_testkit::NatsServer;
use tempest_topology::hub::{FailAction, RootEvent};
use tempest_topology::{RunError, RunReport, Standalone};

const STREAM: &str = "ORDERS";
const CONSUMER: &str = "tempest";
/// The longest any single wait in these tests may take.
const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// Handles per payload, with when each happened, and the key each carried.
#[derive(Clone, Default)]
struct Handled(Arc<Mutex<HashMap<String, Handles>>>);

/// When one payload was handled, and the key it carried.
type Handles = (Vec<Instant>, Option<String>);

impl Handled {
    /// Records a handle and returns how many times it was handled before.
    fn record(&self, m: &Msg) -> usize {
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let mut map = self.0.lock().unwrap();
        let e = map
            .entry(m.payload_str().unwrap_or_default().to_owned())
            .or_default();
        e.0.push(Instant::now());
        e.1 = key;
        e.0.len() - 1
    }
    fn count(&self, p: &str) -> usize {
        self.0.lock().unwrap().get(p).map_or(0, |e| e.0.len())
    }
    fn times(&self, p: &str) -> Vec<Instant> {
        self.0
            .lock()
            .unwrap()
            .get(p)
            .map_or(Vec::new(), |e| e.0.clone())
    }
    fn key(&self, p: &str) -> Option<String> {
        self.0.lock().unwrap().get(p).and_then(|e| e.1.clone())
    }
    /// True when every payload was handled at least once.
    fn all(&self, payloads: &[String]) -> bool {
        payloads.iter().all(|p| self.count(p) > 0)
    }
    fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(|e| e.0.len()).sum()
    }
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A JetStream context on its own connection (the test's publisher).
async fn publisher(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.expect("publisher connects");
    jetstream::new(client)
}

async fn create_stream(js: &jetstream::Context) {
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{STREAM}.>")],
        ..Default::default()
    })
    .await
    .expect("stream created");
}

/// Publishes every payload (with `key(i)` as its `Tempest-Key` header, if
/// any) and waits for the stream to store them all.
async fn publish(
    js: &jetstream::Context,
    payloads: &[String],
    key: impl Fn(usize) -> Option<String>,
) {
    let mut acks = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        let subject = format!("{STREAM}.in");
        let ack = match key(i) {
            Some(k) => {
                let mut headers = HeaderMap::new();
                headers.insert(KEY_HEADER, k.as_str());
                js.publish_with_headers(subject, headers, p.clone().into())
                    .await
            }
            None => js.publish(subject, p.clone().into()).await,
        };
        acks.push(ack.expect("publish sent"));
    }
    for ack in acks {
        ack.await.expect("publish stored");
    }
}

async fn consumer_info(js: &jetstream::Context) -> Option<consumer::Info> {
    let stream = js.get_stream(STREAM).await.ok()?;
    stream.consumer_info(CONSUMER).await.ok()
}

/// True when the consumer has nothing pending and nothing un-acked.
async fn drained(js: &jetstream::Context) -> bool {
    consumer_info(js)
        .await
        .is_some_and(|i| i.num_ack_pending == 0 && i.num_pending == 0)
}

/// Polls `cond` (an observable condition) until it holds, for at most `LIMIT`.
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + LIMIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(url: &str) -> JetStreamConfig {
    JetStreamConfig::new(url, STREAM)
}

fn source(config: JetStreamConfig) -> (JetStreamSource, SourceStats) {
    let source = JetStreamSource::new(config).expect("valid config");
    let stats = source.stats();
    stats.track_acks(true);
    (source, stats)
}

/// A pipeline of one task `t` (two workers) that records every handle and
/// then runs `verdict` with the payload and how often it was handled before.
fn recording(
    handled: &Handled,
    verdict: impl Fn(&str, usize) -> TaskResult + Send + Sync + Clone + 'static,
) -> Pipeline {
    let h = handled.clone();
    Pipeline::new().task_with_workers("t", 2, move || {
        let (h, verdict) = (h.clone(), verdict.clone());
        move |m: Msg| -> TaskResult {
            let before = h.record(&m);
            verdict(m.payload_str().unwrap_or_default(), before)
        }
    })
}

fn ok(_: &str, _: usize) -> TaskResult {
    Ok(None)
}

/// A topology running standalone until told to stop.
struct Running {
    stop: watch::Sender<bool>,
    run: JoinHandle<Result<(RunReport, Vec<RootEvent>), RunError>>,
}

impl Running {
    fn start(topology: Topology, registry: Option<Registry>) -> Running {
        let (stop, shutdown) = watch::channel(false);
        let mut standalone = Standalone::new(topology).with_hub(|hub| hub.record_events());
        if let Some(r) = registry {
            standalone = standalone.registry(r);
        }
        let run = tokio::spawn(async move {
            let (report, hub) = standalone.run(shutdown).await?;
            let events = hub.lock().take_events();
            Ok((report, events))
        });
        Running { stop, run }
    }

    async fn finish(self) -> (RunReport, Vec<RootEvent>) {
        let _ = self.stop.send(true);
        self.run
            .await
            .expect("the run did not panic")
            .expect("the run ended without error")
    }
}

fn acked_events(events: &[RootEvent], id: u64) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, RootEvent::Acked { id: i, .. } if *i == SourceId::from(id)))
        .count()
}

fn failed_events(events: &[RootEvent], id: u64, action: FailAction) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(e, RootEvent::Failed { id: i, action: a, .. }
                if *i == SourceId::from(id) && *a == action)
        })
        .count()
}

// ------------------------------------------------------------------ tests

/// N messages: each handled once, acked (confirmed: nothing pending or
/// un-acked at the consumer), keys taken from the `Tempest-Key` header, and
/// the stream and durable consumer created as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_is_handled_once_and_acked() {
    const N: usize = 1_000;
    let server = NatsServer::start().unwrap();
    let handled = Handled::default();
    let (source, stats) = source(config(&server.url()));
    let topology = Topology::builder("nats-ack")
        .source(source)
        .pipeline(recording(&handled, ok))
        .message_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let running = Running::start(topology, None);

    // The source creates the stream (it does not exist yet).
    let js = publisher(&server.url()).await;
    wait_until("the source to create the stream", || {
        let js = js.clone();
        async move { js.get_stream(STREAM).await.is_ok() }
    })
    .await;
    let msgs = payloads("m", N);
    publish(&js, &msgs, |i| (i % 2 == 0).then(|| format!("k{}", i % 5))).await;

    wait_until("every message handled and acked", || {
        let (js, h, msgs) = (js.clone(), handled.clone(), msgs.clone());
        async move { h.all(&msgs) && drained(&js).await }
    })
    .await;
    let (report, events) = running.finish().await;

    for (i, p) in msgs.iter().enumerate() {
        assert_eq!(handled.count(p), 1, "{p} handled once");
        let want = (i % 2 == 0).then(|| format!("k{}", i % 5));
        assert_eq!(handled.key(p), want, "key of {p}");
    }
    assert_eq!(handled.total(), N);
    assert_eq!(report.acked(), N as u64);
    // Ids are stream sequences 1..=N, each acked once and confirmed.
    assert_eq!(stats.emitted(), N as u64);
    assert_eq!(stats.acked(), N as u64);
    assert_eq!(stats.missing(N as u64 + 1), [0]);
    assert_eq!(stats.duplicate_acks(), 0);
    assert!((1..=N as u64).all(|seq| acked_events(&events, seq) == 1));

    let info = consumer_info(&js).await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.ack_floor.stream_sequence, N as u64);
    assert_eq!(info.config.durable_name.as_deref(), Some(CONSUMER));
    assert_eq!(info.config.ack_policy, consumer::AckPolicy::Explicit);
    // 2 × message_timeout + 1 s.
    assert_eq!(info.config.ack_wait, Duration::from_secs(11));
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let stream_info = stream.info().await.unwrap();
    assert_eq!(stream_info.config.subjects, [format!("{STREAM}.>")]);
    assert_eq!(stream_info.config.storage, stream::StorageType::File);
}

/// Policy `none`: a message that fails once is released (nak with
/// `nak_delay_ms`), redelivered after the delay (well before `ack_wait`)
/// and then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn released_message_is_redelivered_after_the_nak_delay() {
    const NAK_DELAY: Duration = Duration::from_millis(300);
    const ACK_WAIT: Duration = Duration::from_secs(10);
    let server = NatsServer::start().unwrap();
    let js = publisher(&server.url()).await;
    create_stream(&js).await;
    let msgs = payloads("m", 20);
    publish(&js, &msgs, |_| None).await;

    let handled = Handled::default();
    let (source, stats) = source(JetStreamConfig {
        nak_delay_ms: NAK_DELAY.as_millis() as u64,
        ack_wait_ms: Some(ACK_WAIT.as_millis() as u64),
        ..config(&server.url())
    });
    let verdict = |p: &str, before: usize| -> TaskResult {
        if p == "m7" && before == 0 {
            return Err(TaskError::new("m7 fails the first time"));
        }
        Ok(None)
    };
    let topology = Topology::builder("nats-nak")
        .source(source)
        .pipeline(recording(&handled, verdict))
        .failure_policy(FailurePolicy::None)
        .message_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let running = Running::start(topology, None);
    wait_until("m7 redelivered and everything acked", || {
        let (js, h, msgs) = (js.clone(), handled.clone(), msgs.clone());
        async move { h.count("m7") == 2 && h.all(&msgs) && drained(&js).await }
    })
    .await;
    let (_report, events) = running.finish().await;

    assert_eq!(handled.count("m7"), 2);
    for p in msgs.iter().filter(|p| *p != "m7") {
        assert_eq!(handled.count(p), 1, "{p}");
    }
    let t = handled.times("m7");
    let gap = t[1] - t[0];
    assert!(
        gap >= NAK_DELAY,
        "redelivered after {gap:?}, before the nak delay"
    );
    assert!(
        gap < ACK_WAIT / 2,
        "redelivered after {gap:?}: by ack_wait, not the nak"
    );
    // m7 is stream sequence 8: left to the broker once, then acked once.
    assert_eq!(failed_events(&events, 8, FailAction::LeftUnacked), 1);
    assert_eq!(acked_events(&events, 8), 1);
    assert_eq!(stats.failed(), 0, "release is not a dead letter");
    assert_eq!(stats.acked(), 20);
    let info = consumer_info(&js).await.unwrap();
    assert_eq!(info.num_redelivered, 0, "nothing waits for redelivery");
    assert_eq!(info.ack_floor.stream_sequence, 20);
}

/// Policy retry: a message that always fails is tried `max_attempts` times,
/// then terminated at JetStream: never redelivered, even past `ack_wait`,
/// while the others complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_is_terminated_and_never_redelivered() {
    const MAX_ATTEMPTS: usize = 2;
    const ACK_WAIT: Duration = Duration::from_millis(1_500);
    let server = NatsServer::start().unwrap();
    let js = publisher(&server.url()).await;
    create_stream(&js).await;
    let msgs = payloads("m", 20);
    publish(&js, &msgs, |_| None).await;

    let handled = Handled::default();
    let (source, stats) = source(JetStreamConfig {
        ack_wait_ms: Some(ACK_WAIT.as_millis() as u64),
        ..config(&server.url())
    });
    let verdict = |p: &str, _: usize| -> TaskResult {
        if p == "m3" {
            return Err(TaskError::new("poison"));
        }
        Ok(None)
    };
    let topology = Topology::builder("nats-term")
        .source(source)
        .pipeline(recording(&handled, verdict))
        .failure_policy(FailurePolicy::Retry {
            max_attempts: MAX_ATTEMPTS as u32,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(50),
        })
        .message_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let running = Running::start(topology, None);
    wait_until("the others acked and m3 dead-lettered", || {
        let (js, h, msgs, stats) = (js.clone(), handled.clone(), msgs.clone(), stats.clone());
        async move { h.all(&msgs) && stats.failed() == 1 && drained(&js).await }
    })
    .await;
    let terminated_at = Instant::now();
    // Watch past ack_wait (the topology keeps polling): a redelivery would
    // be handled a third time.
    while terminated_at.elapsed() < ACK_WAIT * 2 {
        assert_eq!(handled.count("m3"), MAX_ATTEMPTS, "m3 was redelivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(drained(&js).await);
    let (report, events) = running.finish().await;

    assert_eq!(handled.count("m3"), MAX_ATTEMPTS);
    for p in msgs.iter().filter(|p| *p != "m3") {
        assert_eq!(handled.count(p), 1, "{p}");
    }
    // m3 is stream sequence 4.
    assert_eq!(failed_events(&events, 4, FailAction::DeadLettered), 1);
    assert_eq!(acked_events(&events, 4), 0);
    assert_eq!(report.dead_lettered(), 1);
    assert_eq!(report.acked(), 19);
    assert_eq!(stats.acked(), 19);
    assert_eq!(stats.missing(21), [0, 4]);
    let info = consumer_info(&js).await.unwrap();
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.stream_sequence, 20);
}

/// Retry replays keep a root in flight longer than `ack_wait`: the source
/// tells JetStream it is still working on it, so JetStream does not
/// redeliver it meanwhile; it is tried exactly `max_attempts` times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_past_ack_wait_are_not_redelivered() {
    const MAX_ATTEMPTS: usize = 4;
    const ACK_WAIT: Duration = Duration::from_millis(1_200);
    let server = NatsServer::start().unwrap();
    let js = publisher(&server.url()).await;
    create_stream(&js).await;
    let msgs = payloads("m", 5);
    publish(&js, &msgs, |_| None).await;

    let handled = Handled::default();
    let (source, stats) = source(JetStreamConfig {
        ack_wait_ms: Some(ACK_WAIT.as_millis() as u64),
        ..config(&server.url())
    });
    let verdict = |p: &str, _: usize| -> TaskResult {
        if p == "m0" {
            return Err(TaskError::new("poison"));
        }
        Ok(None)
    };
    let topology = Topology::builder("nats-keep-alive")
        .source(source)
        .pipeline(recording(&handled, verdict))
        .failure_policy(FailurePolicy::Retry {
            max_attempts: MAX_ATTEMPTS as u32,
            backoff: Duration::from_millis(800),
            max_backoff: Duration::from_millis(800),
        })
        .message_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let running = Running::start(topology, None);
    wait_until("m0 dead-lettered and the others acked", || {
        let (js, h, msgs, stats) = (js.clone(), handled.clone(), msgs.clone(), stats.clone());
        async move { h.all(&msgs) && stats.failed() == 1 && drained(&js).await }
    })
    .await;
    let (_report, events) = running.finish().await;
    let t = handled.times("m0");
    assert!(
        t[MAX_ATTEMPTS - 1] - t[0] > ACK_WAIT,
        "the replays outlast ack_wait"
    );
    assert_eq!(
        handled.count("m0"),
        MAX_ATTEMPTS,
        "a redelivery was handled too"
    );
    assert_eq!(failed_events(&events, 1, FailAction::DeadLettered), 1);
    let info = consumer_info(&js).await.unwrap();
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.stream_sequence, 5);
}

/// `ack_wait_ms` not above `message_timeout` stops the topology before it
/// connects, with an error naming the key; one millisecond more runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ack_wait_not_above_message_timeout_is_a_config_error() {
    let server = NatsServer::start().unwrap();
    let js = publisher(&server.url()).await;
    let topology_with = |ack_wait_ms: u64| {
        let text = format!(
            "message_timeout = \"2s\"\n[source]\nkind = \"nats\"\n[source.config]\n\
             url = \"{}\"\nstream = \"{STREAM}\"\nack_wait_ms = {ack_wait_ms}\n",
            server.url()
        );
        let mut topology = Topology::builder("nats-config")
            .pipeline(Pipeline::new().task("t", || |_m: Msg| -> TaskResult { Ok(None) }))
            .build()
            .unwrap();
        tempest_connectors::register(&mut topology.source_kinds);
        TopologyFile::parse(&text, None)
            .unwrap()
            .apply(&mut topology)
            .unwrap();
        topology
    };

    let (_stop, shutdown) = watch::channel(false);
    let err = Standalone::new(topology_with(2_000))
        .run(shutdown)
        .await
        .err()
        .expect("the run must fail");
    let RunError::Source(e) = err else {
        panic!("not a source error: {err}");
    };
    assert_eq!(e.kind, SourceErrorKind::Config);
    assert!(!e.retryable);
    assert!(e.message.contains("ack_wait_ms"), "{e}");
    assert!(
        js.get_stream(STREAM).await.is_err(),
        "configure failed before connecting: no stream was created"
    );

    // 2001 ms > 2 s: the source connects with that ack wait.
    let running = Running::start(topology_with(2_001), None);
    wait_until("the consumer to be created", || {
        let js = js.clone();
        async move { consumer_info(&js).await.is_some() }
    })
    .await;
    running.finish().await;
    let info = consumer_info(&js).await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_millis(2_001));
}

/// The broker is down when the topology starts: connecting fails with a
/// retryable error, and once the broker is up the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_down_at_start_then_up() {
    const N: usize = 200;
    let mut server = NatsServer::start().unwrap();
    server.kill();
    let handled = Handled::default();
    let (source, stats) = source(config(&server.url()));
    let topology = Topology::builder("nats-late")
        .source(source)
        .pipeline(recording(&handled, ok))
        .message_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let registry = Registry::new(Labels::new([("topology", "nats-late")]));
    let running = Running::start(topology, Some(registry.clone()));
    let errors = || {
        registry
            .snapshot()
            .counter(catalog::SOURCE_ERRORS.name, &[])
    };
    wait_until("a failed connect attempt", || {
        let n = errors();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(
        registry.snapshot().gauge(catalog::SOURCE_HEALTHY.name, &[]),
        Some(0.0)
    );

    server.restart().unwrap();
    let js = publisher(&server.url()).await;
    wait_until("the source to connect and create the stream", || {
        let js = js.clone();
        async move { consumer_info(&js).await.is_some() }
    })
    .await;
    let msgs = payloads("m", N);
    publish(&js, &msgs, |_| None).await;
    wait_until("every message handled and acked", || {
        let (js, h, msgs) = (js.clone(), handled.clone(), msgs.clone());
        async move { h.all(&msgs) && drained(&js).await }
    })
    .await;
    let (report, _) = running.finish().await;
    for p in &msgs {
        assert_eq!(handled.count(p), 1, "{p}");
    }
    assert_eq!(report.acked(), N as u64);
    assert_eq!(stats.acked(), N as u64);
    assert_eq!(
        registry.snapshot().gauge(catalog::SOURCE_HEALTHY.name, &[]),
        Some(1.0)
    );
}

/// A gate that blocks a task until opened.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
    /// Waits until open (true) or `limit` passes (false).
    fn wait(&self, limit: Duration) -> bool {
        let guard = self.0 .0.lock().unwrap();
        let (open, _) = self
            .0
             .1
            .wait_timeout_while(guard, limit, |open| !*open)
            .unwrap();
        *open
    }
}

/// The broker is killed and restarted (same store) while messages are in
/// flight and more wait in the stream, and more are published after: every
/// message is handled at least once and the consumer ends with nothing
/// pending or un-acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restart_mid_stream_loses_nothing() {
    const N: usize = 300;
    const IN_FLIGHT: usize = 50;
    let mut server = NatsServer::start().unwrap();
    let js = publisher(&server.url()).await;
    create_stream(&js).await;
    let before = payloads("a", N);
    publish(&js, &before, |_| None).await;

    let handled = Handled::default();
    let gate = Gate::default();
    let entered = Arc::new(AtomicBool::new(false));
    let (source, stats) = source(JetStreamConfig {
        ack_wait_ms: Some(3_000),
        ..config(&server.url())
    });
    let h = handled.clone();
    let (g, e) = (gate.clone(), entered.clone());
    let pipeline = Pipeline::new().task("t", move || {
        let (h, g, e) = (h.clone(), g.clone(), e.clone());
        move |m: Msg| -> TaskResult {
            // The first message waits until the broker has been restarted,
            // so that max_pending messages are in flight then.
            if !e.swap(true, Ordering::SeqCst) {
                assert!(g.wait(LIMIT), "the gate never opened");
            }
            h.record(&m);
            Ok(None)
        }
    });
    let topology = Topology::builder("nats-restart")
        .source(source)
        .pipeline(pipeline)
        .failure_policy(FailurePolicy::None)
        .message_timeout(Duration::from_secs(2))
        .max_pending(IN_FLIGHT)
        .build()
        .unwrap();
    let running = Running::start(topology, None);
    wait_until("max_pending messages polled and in flight", || {
        let (e, stats) = (entered.clone(), stats.clone());
        async move { e.load(Ordering::SeqCst) && stats.emitted() >= IN_FLIGHT as u64 }
    })
    .await;
    assert_eq!(handled.total(), 0, "nothing finished before the restart");
    assert_eq!(
        stats.emitted(),
        IN_FLIGHT as u64,
        "the rest waits in the stream"
    );

    server.restart().unwrap();
    gate.open();
    wait_until("the publisher to reconnect", || {
        let state = js.client().connection_state();
        async move { state == async_nats::connection::State::Connected }
    })
    .await;
    let after = payloads("b", N);
    publish(&js, &after, |_| None).await;

    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    wait_until("every message handled and the consumer drained", || {
        let (js, h, all) = (js.clone(), handled.clone(), all.clone());
        async move { h.all(&all) && drained(&js).await }
    })
    .await;
    let (_report, _) = running.finish().await;
    let lost: Vec<_> = all.iter().filter(|p| handled.count(p) == 0).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    let info = consumer_info(&js).await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    assert_eq!(info.ack_floor.stream_sequence, 2 * N as u64);
}

/// Driven directly: every connect brings the durable consumer in line with
/// the configuration, a change JetStream refuses is a fatal error, and a
/// broker that goes away makes polls fail with retryable errors (and the
/// health unhealthy) until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_follows_the_config_and_outages_are_retryable() {
    let mut server = NatsServer::start().unwrap();
    let mut settings = Settings::new("direct");
    settings.message_timeout = Duration::from_secs(1);
    let connect = |config: JetStreamConfig| {
        let settings = settings.clone();
        async move {
            let mut s = JetStreamSource::new(config).unwrap();
            s.configure(&settings).await.unwrap();
            let r = s.connect().await;
            (s, r)
        }
    };
    let (mut first, r) = connect(JetStreamConfig {
        ack_wait_ms: Some(5_000),
        ..config(&server.url())
    })
    .await;
    r.unwrap();
    let js = publisher(&server.url()).await;
    assert_eq!(
        consumer_info(&js).await.unwrap().config.ack_wait,
        Duration::from_secs(5)
    );

    // New settings for the same durable consumer are applied.
    let (_, r) = connect(JetStreamConfig {
        ack_wait_ms: Some(7_000),
        max_deliver: Some(3),
        ..config(&server.url())
    })
    .await;
    r.unwrap();
    let info = consumer_info(&js).await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
    assert_eq!(info.config.max_deliver, 3);

    // JetStream cannot change where an existing consumer starts.
    let (_, r) = connect(JetStreamConfig {
        deliver_policy: DeliverPolicy::New,
        ..config(&server.url())
    })
    .await;
    let e = r.expect_err("a refused consumer update");
    assert!(!e.retryable, "{e}");
    assert!(e.message.contains(CONSUMER), "{e}");

    // An outage: retryable errors and unhealthy until the broker is back.
    assert!(first.health().await.is_healthy());
    assert_eq!(first.poll(10).await.unwrap(), Polled::Idle);
    server.kill();
    // A pull already under way when the broker died may still end Idle.
    let deadline = Instant::now() + LIMIT;
    let err = loop {
        match first.poll(10).await {
            Ok(Polled::Idle) => assert!(Instant::now() < deadline, "polls never failed"),
            Ok(other) => panic!("{other:?} with no broker"),
            Err(e) => break e,
        }
    };
    assert!(err.retryable, "{err}");
    assert!(!first.health().await.is_healthy());
    server.restart().unwrap();
    let deadline = Instant::now() + LIMIT;
    while let Err(e) = first.connect().await {
        assert!(e.retryable, "{e}");
        assert!(Instant::now() < deadline, "no reconnect: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(first.health().await.is_healthy());
    let js = publisher(&server.url()).await;
    publish(&js, &payloads("m", 3), |_| None).await;
    let Polled::Msgs(msgs) = first.poll(10).await.unwrap() else {
        panic!("the messages published after the restart");
    };
    let ids: Vec<SourceId> = msgs.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1u64.into(), 2u64.into(), 3u64.into()]);
    assert_eq!(first.held(), 3);
    first.ack(&ids).await.unwrap();
    assert_eq!(first.held(), 0);
    assert!(drained(&js).await);
    first.shutdown().await.unwrap();
}
