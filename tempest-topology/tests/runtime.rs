//! The standalone runtime's guarantees, end to end: routing, acking, failure
//! policies, timeouts, max_pending, key grouping, panics and drain.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use tempest_core::sources::{GeneratorSource, MemorySource};
use tempest_core::{
    async_trait, FailReason, FailurePolicy, Grouping, Msg, Pipeline, Polled, Source, SourceError,
    SourceId, TaskError, TaskResult, Topology,
};
use tempest_topology::testing::{RootStatus, TestRuntime};
use tempest_topology::{DriveEnd, Standalone};

fn echo(m: Msg) -> TaskResult {
    Ok(Some(vec![m]))
}

fn payload(m: &Msg) -> String {
    m.payload_str().unwrap_or_default().to_owned()
}

/// Handles per root payload, by task, shared between tasks and a test source.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, usize>>>);

impl Seen {
    fn record(&self, m: &Msg) {
        *self.0.lock().entry(payload(m)).or_insert(0) += 1;
    }
    fn get(&self, p: &str) -> usize {
        self.0.lock().get(p).copied().unwrap_or(0)
    }
}

/// A memory source that checks, at the moment each root is acked, that its
/// whole tree was handled.
struct CheckingSource {
    inner: MemorySource,
    payloads: Vec<String>,
    seen: Seen,
    want: usize,
    early_acks: Arc<AtomicUsize>,
}

#[async_trait]
impl Source for CheckingSource {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        self.inner.poll(max).await
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        for id in ids {
            let p = &self.payloads[id.parts().1 as usize];
            if self.seen.get(p) != self.want {
                self.early_acks.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.inner.ack(ids).await
    }
    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        self.inner.fail(id, reason).await
    }
}

fn diamond(seen: Seen, fail_in_c: bool) -> Pipeline {
    let (sa, sb, sc, sd) = (seen.clone(), seen.clone(), seen.clone(), seen);
    Pipeline::new()
        .task("a", move || {
            let s = sa.clone();
            move |m: Msg| -> TaskResult {
                s.record(&m);
                Ok(Some(vec![m]))
            }
        })
        .task_with_workers("b", 2, move || {
            let s = sb.clone();
            move |m: Msg| -> TaskResult {
                s.record(&m);
                Ok(Some(vec![m]))
            }
        })
        .task_with_workers("c", 2, move || {
            let s = sc.clone();
            move |m: Msg| -> TaskResult {
                // The slower branch: a little real work, so the branches finish apart.
                let spin: u64 = (0..2_000u64).map(|i| i.wrapping_mul(31)).sum();
                std::hint::black_box(spin);
                s.record(&m);
                if fail_in_c && m.payload_str() == Some("bad") {
                    return Err(TaskError::new("c refuses bad"));
                }
                Ok(Some(vec![m]))
            }
        })
        .task("d", move || {
            let s = sd.clone();
            move |m: Msg| -> TaskResult {
                s.record(&m);
                Ok(None)
            }
        })
        .edge("a", "b")
        .edge("a", "c")
        .edge("b", "d")
        .edge("c", "d")
}

#[test]
fn diamond_acks_each_root_once_after_both_branches() {
    let seen = Seen::default();
    let payloads: Vec<String> = (0..2_000).map(|i| format!("m{i}")).collect();
    let inner = MemorySource::new(payloads.clone());
    let log = inner.log();
    let early = Arc::new(AtomicUsize::new(0));
    let topology = Topology::builder("diamond")
        .source(CheckingSource {
            inner,
            payloads: payloads.clone(),
            seen: seen.clone(),
            // a, b, c once each; d once per branch.
            want: 5,
            early_acks: early.clone(),
        })
        .pipeline(diamond(seen.clone(), false))
        .build()
        .unwrap();
    let report = TestRuntime::new(topology).run().unwrap();
    assert!(
        report.all_acked(),
        "{:?}",
        report
            .outcomes
            .iter()
            .find(|o| o.status != RootStatus::Acked)
    );
    assert_eq!(report.outcomes.len(), 2_000);
    assert_eq!(
        early.load(Ordering::SeqCst),
        0,
        "roots acked before their tree finished"
    );
    for i in 0..2_000u64 {
        assert_eq!(log.times_acked(i), 1, "root {i}");
    }
    for p in &payloads {
        assert_eq!(seen.get(p), 5, "{p}");
    }
    assert_eq!(
        report
            .metrics
            .counter("tempest_task_messages_in", &[("task", "d")]),
        4_000
    );
}

#[test]
fn an_error_in_one_branch_fails_the_root() {
    let seen = Seen::default();
    let topology = Topology::builder("diamond")
        .pipeline(diamond(seen, true))
        .failure_policy(FailurePolicy::BestEffort)
        .build()
        .unwrap();
    let report = TestRuntime::new(topology)
        .input(["ok1", "bad", "ok2"])
        .run()
        .unwrap();
    assert_eq!(report.outcomes[0].status, RootStatus::Acked);
    assert_eq!(
        report.outcomes[1].status,
        RootStatus::Failed("c refuses bad".into())
    );
    assert_eq!(report.outcomes[2].status, RootStatus::Acked);
    assert_eq!(report.metrics.counter("tempest_source_failed", &[]), 1);
    assert_eq!(report.metrics.counter("tempest_source_acked", &[]), 2);
}

/// Blocks in `handle` until released, so a root can outlive its timeout.
#[derive(Clone, Default)]
struct Gate(Arc<(std::sync::Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self, at_most: Duration) -> bool {
        let (lock, cv) = &*self.0;
        let guard = lock.lock().unwrap();
        let (open, _) = cv
            .wait_timeout_while(guard, at_most, |open| !*open)
            .unwrap();
        *open
    }
    fn open(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// A memory source that opens a gate when a root is handed to `fail`.
struct GateOnFail {
    inner: MemorySource,
    gate: Gate,
}

#[async_trait]
impl Source for GateOnFail {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        self.inner.poll(max).await
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.inner.ack(ids).await
    }
    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        self.gate.open();
        self.inner.fail(id, reason).await
    }
}

#[test]
fn a_timeout_fires_for_a_task_that_never_answers() {
    let gate = Gate::default();
    let task_gate = gate.clone();
    let released = Arc::new(AtomicUsize::new(0));
    let released_in_task = released.clone();
    let inner = MemorySource::new(["fast", "hang"]);
    let log = inner.log();
    let topology = Topology::builder("timeout")
        .source(GateOnFail { inner, gate })
        .pipeline(Pipeline::new().task("t", move || {
            let gate = task_gate.clone();
            let released = released_in_task.clone();
            move |m: Msg| -> TaskResult {
                if m.payload_str() == Some("hang") {
                    // Answers only after the timeout reached the source (or 20 s).
                    if gate.wait(Duration::from_secs(20)) {
                        released.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(None)
            }
        }))
        .message_timeout(Duration::from_millis(200))
        .failure_policy(FailurePolicy::retry(1))
        .batch_size(1)
        .build()
        .unwrap();
    let report = TestRuntime::new(topology).run().unwrap();
    assert_eq!(
        released.load(Ordering::SeqCst),
        1,
        "the hung handle was released by the timeout"
    );
    assert_eq!(report.outcome(0u64).unwrap().status, RootStatus::Acked);
    match &report.outcome(1u64).unwrap().status {
        RootStatus::DeadLettered(why) => assert!(why.contains("timed out"), "{why}"),
        other => panic!("hang: {other:?}"),
    }
    // The late answer did not ack the timed-out root.
    assert_eq!(log.acked(), vec![0]);
    assert_eq!(log.failed().len(), 1);
    assert_eq!(report.metrics.counter("tempest_source_timed_out", &[]), 1);
}

#[test]
fn retry_replays_then_dead_letters() {
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let a = attempts.clone();
    let topology = Topology::builder("retry")
        .pipeline(Pipeline::new().task("t", move || {
            let a = a.clone();
            move |m: Msg| -> TaskResult {
                let p = payload(&m);
                let n = {
                    let mut a = a.lock();
                    let n = a.entry(p.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                match p.as_str() {
                    "poison" => Err(TaskError::new("poison")),
                    "flaky" if n < 3 => Err(TaskError::new("flaky")),
                    "fatal" => Err(TaskError::permanent("cannot parse")),
                    _ => Ok(None),
                }
            }
        }))
        .failure_policy(FailurePolicy::Retry {
            max_attempts: 4,
            backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        })
        .build()
        .unwrap();
    let report = TestRuntime::new(topology)
        .input(["fine", "poison", "flaky", "fatal"])
        .run()
        .unwrap();
    let o = |i: u64| report.outcome(i).unwrap().clone();
    assert_eq!(o(0).status, RootStatus::Acked);
    assert_eq!(o(0).attempts, 1);
    assert_eq!(o(1).status, RootStatus::DeadLettered("poison".into()));
    assert_eq!(o(1).attempts, 4);
    assert_eq!(o(1).failures.len(), 4);
    assert_eq!(o(2).status, RootStatus::Acked);
    assert_eq!(o(2).attempts, 3);
    // A permanent error is not replayed.
    assert_eq!(o(3).status, RootStatus::DeadLettered("cannot parse".into()));
    assert_eq!(o(3).attempts, 1);
    assert_eq!(attempts.lock()["poison"], 4);
    assert_eq!(report.metrics.counter("tempest_source_retried", &[]), 3 + 2);
    assert_eq!(
        report.metrics.counter("tempest_source_dead_lettered", &[]),
        2
    );
}

/// A generator that records, at every poll, how many roots it has handed
/// out and not yet heard back about.
struct Outstanding {
    inner: GeneratorSource,
    out: usize,
    max_seen: Arc<AtomicUsize>,
    first_ask: Arc<AtomicUsize>,
}

#[async_trait]
impl Source for Outstanding {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        let _ = self
            .first_ask
            .compare_exchange(0, max, Ordering::SeqCst, Ordering::SeqCst);
        let p = self.inner.poll(max).await?;
        if let Polled::Msgs(m) = &p {
            self.out += m.len();
            self.max_seen.fetch_max(self.out, Ordering::SeqCst);
        }
        Ok(p)
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.out -= ids.len();
        self.inner.ack(ids).await
    }
}

#[test]
fn max_pending_caps_roots_in_flight() {
    let max_seen = Arc::new(AtomicUsize::new(0));
    let first_ask = Arc::new(AtomicUsize::new(0));
    let topology = Topology::builder("cap")
        .source(Outstanding {
            inner: GeneratorSource::new().count(5_000),
            out: 0,
            max_seen: max_seen.clone(),
            first_ask: first_ask.clone(),
        })
        .pipeline(
            Pipeline::new()
                .task_with_workers("a", 2, || echo)
                .task("b", || echo)
                .edge("a", "b"),
        )
        .max_pending(16)
        .batch_size(64)
        .build()
        .unwrap();
    let report = TestRuntime::new(topology).run().unwrap();
    assert_eq!(report.run.acked(), 5_000);
    assert_eq!(
        first_ask.load(Ordering::SeqCst),
        16,
        "the first poll asks for at most max_pending"
    );
    let peak = max_seen.load(Ordering::SeqCst);
    assert!((1..=16).contains(&peak), "peak outstanding {peak}");
}

#[test]
fn key_grouping_sends_equal_keys_to_one_instance() {
    let owners: Arc<Mutex<HashMap<String, HashSet<u32>>>> = Arc::default();
    let o = owners.clone();
    struct Record {
        owners: Arc<Mutex<HashMap<String, HashSet<u32>>>>,
        instance: u32,
    }
    impl tempest_core::Task for Record {
        fn started(&mut self, ctx: &tempest_core::TaskContext) {
            self.instance = ctx.instance;
        }
        fn handle(&mut self, m: Msg) -> TaskResult {
            let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
            self.owners
                .lock()
                .entry(key)
                .or_default()
                .insert(self.instance);
            Ok(None)
        }
    }
    let topology = Topology::builder("keys")
        .pipeline(
            Pipeline::new()
                .task_with_workers("split", 2, || {
                    |m: Msg| -> TaskResult {
                        let words = payload(&m)
                            .split(' ')
                            .map(|w| Msg::keyed_by_payload(w.to_owned()))
                            .collect();
                        Ok(Some(words))
                    }
                })
                .task_with_workers("count", 4, move || Record {
                    owners: o.clone(),
                    instance: 0,
                })
                .edge_grouped("split", "count", Grouping::Key),
        )
        .build()
        .unwrap();
    let input: Vec<String> = (0..500)
        .map(|i| format!("w{} w{} w{}", i % 37, i % 11, i % 5))
        .collect();
    let report = TestRuntime::new(topology).input(input).run().unwrap();
    assert!(report.all_acked());
    let owners = owners.lock();
    assert_eq!(owners.len(), 37); // w0..w36 (w0..w10 and w0..w4 overlap)
    let mut used = HashSet::new();
    for (key, instances) in owners.iter() {
        assert_eq!(instances.len(), 1, "{key} reached {instances:?}");
        used.extend(instances.iter().copied());
    }
    assert!(used.len() > 1, "keys spread over instances: {used:?}");
}

#[test]
fn all_grouping_broadcasts_to_every_instance() {
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let s = seen.clone();
    struct Rec(Arc<Mutex<Vec<u32>>>, u32);
    impl tempest_core::Task for Rec {
        fn started(&mut self, ctx: &tempest_core::TaskContext) {
            self.1 = ctx.instance;
        }
        fn handle(&mut self, _m: Msg) -> TaskResult {
            self.0.lock().push(self.1);
            Ok(None)
        }
    }
    let topology = Topology::builder("all")
        .pipeline(
            Pipeline::new()
                .task("a", || echo)
                .task_with_workers("b", 3, move || Rec(s.clone(), 0))
                .edge_grouped("a", "b", Grouping::All),
        )
        .build()
        .unwrap();
    let report = TestRuntime::new(topology).input(["x", "y"]).run().unwrap();
    assert!(report.all_acked());
    let mut v = seen.lock().clone();
    v.sort();
    assert_eq!(v, vec![0, 0, 1, 1, 2, 2]);
}

#[test]
fn a_panicking_task_fails_its_message_and_the_runtime_goes_on() {
    let topology = Topology::builder("panics")
        .pipeline(
            Pipeline::new()
                .task("a", || echo)
                .task("b", || {
                    |m: Msg| -> TaskResult {
                        if m.payload_str() == Some("boom") {
                            panic!("b blew up on {}", payload(&m));
                        }
                        Ok(None)
                    }
                })
                .edge("a", "b"),
        )
        .build()
        .unwrap();
    let mut input = vec!["boom".to_owned()];
    input.extend((0..200).map(|i| format!("m{i}")));
    let report = TestRuntime::new(topology).input(input).run().unwrap();
    match &report.outcome(0u64).unwrap().status {
        RootStatus::Failed(why) => assert!(why.contains("b blew up on boom"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(report.count(|s| *s == RootStatus::Acked), 200);
    assert_eq!(
        report
            .metrics
            .counter("tempest_task_panics", &[("task", "b")]),
        1
    );
    assert_eq!(
        report
            .metrics
            .counter("tempest_task_errors", &[("task", "b")]),
        1
    );
}

#[test]
fn policy_none_leaves_failed_roots_unacked() {
    let inner = MemorySource::new(["good", "bad"]);
    let log = inner.log();
    let topology = Topology::builder("none")
        .source(inner)
        .pipeline(Pipeline::new().task("t", || {
            |m: Msg| -> TaskResult {
                if m.payload_str() == Some("bad") {
                    Err("no".into())
                } else {
                    Ok(None)
                }
            }
        }))
        .failure_policy(FailurePolicy::None)
        .build()
        .unwrap();
    let report = TestRuntime::new(topology).run().unwrap();
    assert_eq!(
        report.outcome(1u64).unwrap().status,
        RootStatus::Unacked("no".into())
    );
    assert_eq!(log.acked(), vec![0]);
    assert!(log.failed().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_roots_in_flight_and_acks_them() {
    // An endless source: only shutdown ends the run.
    let source = GeneratorSource::new();
    let stats = source.stats();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let topology = Topology::builder("drain")
        .source(source)
        .pipeline(Pipeline::new().task_with_workers("t", 2, move || {
            let h = h.clone();
            move |m: Msg| -> TaskResult {
                h.fetch_add(1, Ordering::SeqCst);
                Ok(Some(vec![m]))
            }
        }))
        .max_pending(500)
        .grace_period(Duration::from_secs(10))
        .build()
        .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(Standalone::new(topology).run(shutdown));
    // Shut down once real work has flowed.
    while stats.acked() < 10_000 {
        tokio::task::yield_now().await;
    }
    stop.send(true).unwrap();
    let (report, _) = run.await.unwrap().unwrap();
    assert_eq!(report.end, DriveEnd::Shutdown { left: 0 });
    // Everything polled was finished and acked; nothing more was polled.
    assert_eq!(report.polled(), report.acked());
    assert_eq!(stats.acked(), report.acked());
    assert_eq!(stats.emitted(), report.polled());
    assert!(report.acked() >= 10_000);
}

/// A memory source that opens a gate when the runtime shuts it down.
struct GateOnShutdown {
    inner: MemorySource,
    gate: Gate,
}

#[async_trait]
impl Source for GateOnShutdown {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        self.inner.poll(max).await
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.inner.ack(ids).await
    }
    async fn shutdown(&mut self) -> Result<(), SourceError> {
        self.gate.open();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_grace_period_leaves_roots_unacked() {
    let gate = Gate::default();
    let g = gate.clone();
    let entered = Arc::new(tokio::sync::Notify::new());
    let e = entered.clone();
    let inner = MemorySource::new(["stuck"]);
    let log = inner.log();
    let topology = Topology::builder("grace")
        .source(GateOnShutdown { inner, gate })
        .pipeline(Pipeline::new().task("t", move || {
            let (g, e) = (g.clone(), e.clone());
            move |_m: Msg| -> TaskResult {
                e.notify_one();
                // Held until the runtime gives up on the drain and shuts the source.
                assert!(g.wait(Duration::from_secs(20)), "gate never opened");
                Ok(None)
            }
        }))
        .grace_period(Duration::from_millis(100))
        .build()
        .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(Standalone::new(topology).run(shutdown));
    entered.notified().await;
    stop.send(true).unwrap();
    let (report, _) = run.await.unwrap().unwrap();
    assert_eq!(report.end, DriveEnd::Shutdown { left: 1 });
    assert!(log.acked().is_empty(), "the stuck root must stay un-acked");
    assert!(log.failed().is_empty());
}

/// A source whose broker is down for its first `down` connects.
struct DownAtFirst {
    inner: MemorySource,
    down: usize,
    attempts: Arc<Mutex<Vec<std::time::Instant>>>,
}

#[async_trait]
impl Source for DownAtFirst {
    async fn connect(&mut self) -> Result<(), SourceError> {
        let mut a = self.attempts.lock();
        a.push(std::time::Instant::now());
        if a.len() <= self.down {
            return Err(SourceError::transient(
                tempest_core::SourceErrorKind::Connect,
                "broker down",
            ));
        }
        Ok(())
    }
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        self.inner.poll(max).await
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.inner.ack(ids).await
    }
}

/// Regression: wakes from the hub cut the reconnect back-off short, so a
/// down broker was retried every few milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_back_off_holds_while_the_hub_wakes_the_driver() {
    let attempts: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
    let topology = Topology::builder("backoff")
        .source(DownAtFirst {
            inner: MemorySource::new(["a", "b"]),
            down: 3,
            attempts: attempts.clone(),
        })
        .pipeline(Pipeline::new().task("t", || echo))
        .build()
        .unwrap();
    let waker: Arc<Mutex<Option<Arc<tokio::sync::Notify>>>> = Arc::default();
    let w = waker.clone();
    let (_stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(
        Standalone::new(topology)
            .with_hub(move |hub| *w.lock() = Some(hub.driver_waker(0)))
            .run(shutdown),
    );
    // Wake the driver constantly, as settling work would, until the run ends.
    let spam = tokio::spawn(async move {
        loop {
            if let Some(w) = waker.lock().as_ref() {
                w.notify_one();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let (report, _) = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    spam.abort();
    assert_eq!(report.acked(), 2);
    let a = attempts.lock().clone();
    assert_eq!(a.len(), 4, "three failed connects, then one that worked");
    for (i, want) in [100u64, 200, 400].into_iter().enumerate() {
        let gap = a[i + 1] - a[i];
        assert!(
            gap >= Duration::from_millis(want),
            "attempt {} came {gap:?} after the one before",
            i + 2
        );
    }
}
