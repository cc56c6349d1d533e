//! Several named sources in one topology, end to end: each feeds the tasks
//! its edges name, keeps its own `max_pending`, hears acks of its own roots
//! only, and a broken one neither stalls the others (standalone and through
//! a real topology server and workers) nor hides in the metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::timeout;

use tempest_core::metrics::Registry;
use tempest_core::sources::{GeneratorSource, MemorySource};
use tempest_core::{
    async_trait, Msg, Pipeline, Polled, Source, SourceError, SourceErrorKind, SourceId, TaskResult,
    Topology,
};
use tempest_task::worker::{run_worker, WorkerConfig};
use tempest_topology::{DriveEnd, RunError, ServerConfig, Standalone, TopologyServer};

/// The bound on any single wait: far longer than a healthy run needs.
const WAIT: Duration = Duration::from_secs(30);

/// A generator that records, at every poll, how many roots it has handed
/// out and not yet heard back about, and which ids it heard back about.
struct Outstanding {
    inner: GeneratorSource,
    out: usize,
    max_seen: Arc<AtomicUsize>,
    acked: Arc<Mutex<Vec<SourceId>>>,
}

impl Outstanding {
    fn new(n: u64) -> (Self, Arc<AtomicUsize>, Arc<Mutex<Vec<SourceId>>>) {
        let max_seen = Arc::new(AtomicUsize::new(0));
        let acked = Arc::new(Mutex::new(Vec::new()));
        (
            Outstanding {
                inner: GeneratorSource::new().count(n),
                out: 0,
                max_seen: max_seen.clone(),
                acked: acked.clone(),
            },
            max_seen,
            acked,
        )
    }
}

#[async_trait]
impl Source for Outstanding {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        let p = self.inner.poll(max).await?;
        if let Polled::Msgs(m) = &p {
            self.out += m.len();
            self.max_seen.fetch_max(self.out, Ordering::SeqCst);
        }
        Ok(p)
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.out -= ids.len();
        self.acked.lock().extend_from_slice(ids);
        self.inner.ack(ids).await
    }
}

/// A source whose broker never answers: every connect fails, retryably.
struct Down;

#[async_trait]
impl Source for Down {
    async fn connect(&mut self) -> Result<(), SourceError> {
        Err(SourceError::transient(
            SourceErrorKind::Connect,
            "connection refused",
        ))
    }
    async fn poll(&mut self, _max: usize) -> Result<Polled, SourceError> {
        Ok(Polled::Idle)
    }
    async fn ack(&mut self, _ids: &[SourceId]) -> Result<(), SourceError> {
        Ok(())
    }
}

/// A source that cannot work at all (a config error at connect).
struct Broken;

#[async_trait]
impl Source for Broken {
    async fn connect(&mut self) -> Result<(), SourceError> {
        Err(SourceError::config("stream `x` does not exist"))
    }
    async fn poll(&mut self, _max: usize) -> Result<Polled, SourceError> {
        Ok(Polled::Idle)
    }
    async fn ack(&mut self, _ids: &[SourceId]) -> Result<(), SourceError> {
        Ok(())
    }
}

/// A task that counts what it handles and passes it on.
fn counting(count: &Arc<AtomicUsize>) -> impl Fn() -> Box<dyn Fn(Msg) -> TaskResult + Send> {
    let count = count.clone();
    move || {
        let count = count.clone();
        Box::new(move |m: Msg| {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(Some(vec![m]))
        })
    }
}

/// orders → parse_order (×2) and audit; refunds → parse_refund; both
/// parsers → ledger.
fn shop(counts: &[Arc<AtomicUsize>; 4]) -> Pipeline {
    let [order, audit, refund, ledger] = counts;
    Pipeline::new()
        .task_with_workers("parse_order", 2, counting(order))
        .task("audit", counting(audit))
        .task("parse_refund", counting(refund))
        .task("ledger", counting(ledger))
        .edge("parse_order", "ledger")
        .edge("parse_refund", "ledger")
        .edge_from_source("orders", "parse_order")
        .edge_from_source("orders", "audit")
        .edge_from_source("refunds", "parse_refund")
}

fn counts() -> [Arc<AtomicUsize>; 4] {
    std::array::from_fn(|_| Arc::new(AtomicUsize::new(0)))
}

fn n(c: &Arc<AtomicUsize>) -> usize {
    c.load(Ordering::SeqCst)
}

#[test]
fn two_sources_feed_their_tasks_with_their_own_caps_and_acks() {
    let (orders, orders_peak, orders_acked) = Outstanding::new(3_000);
    let (refunds, refunds_peak, refunds_acked) = Outstanding::new(2_000);
    let c = counts();
    let topology = Topology::builder("shop")
        .named_source("orders", orders)
        .named_source("refunds", refunds)
        .source_max_pending("orders", 8)
        .max_pending(64)
        .batch_size(32)
        .pipeline(shop(&c))
        .build()
        .unwrap();
    let registry = Registry::default();
    let (_stop, shutdown) = watch::channel(false);
    let (report, _) = Standalone::new(topology)
        .registry(registry.clone())
        .worker_threads(2)
        .run_blocking(shutdown)
        .unwrap();
    assert_eq!(report.end, DriveEnd::Exhausted);
    assert_eq!(report.acked(), 5_000, "the report sums the sources");
    let m = &report.metrics;
    assert_eq!(
        m.counter("tempest_source_acked", &[("source", "orders")]),
        3_000
    );
    assert_eq!(
        m.counter("tempest_source_acked", &[("source", "refunds")]),
        2_000
    );
    // Every order reached both tasks its source feeds, and was acked once
    // both trees' branches were handled; refunds reached only theirs.
    assert_eq!(
        (n(&c[0]), n(&c[1]), n(&c[2]), n(&c[3])),
        (3_000, 3_000, 2_000, 5_000)
    );
    // Each source heard back about its own roots, each once.
    for (acked, total) in [(&orders_acked, 3_000u64), (&refunds_acked, 2_000)] {
        let mut ids: Vec<u64> = acked.lock().iter().map(|id| id.parts().1).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len() as u64, total);
    }
    let (op, rp) = (
        orders_peak.load(Ordering::SeqCst),
        refunds_peak.load(Ordering::SeqCst),
    );
    assert!((1..=8).contains(&op), "orders' own max_pending: peak {op}");
    assert!(
        (9..=64).contains(&rp),
        "refunds' max_pending is the topology's: peak {rp}"
    );
    // How dashboards draw the sources.
    for (source, to) in [
        ("orders", "parse_order"),
        ("orders", "audit"),
        ("refunds", "parse_refund"),
    ] {
        assert_eq!(
            m.gauge(
                "tempest_pipeline_source_edge",
                &[("source", source), ("to", to)]
            ),
            Some(1.0),
            "{source} -> {to}"
        );
    }
}

/// Polls `cond` on the registry's snapshot until it holds (bounded).
async fn wait_for(registry: &Registry, what: &str, cond: impl Fn(&Registry) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond(registry) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn healthy(registry: &Registry, source: &str) -> Option<f64> {
    registry
        .snapshot()
        .gauge("tempest_source_healthy", &[("source", source)])
}

fn acked(registry: &Registry, source: &str) -> u64 {
    registry
        .snapshot()
        .counter("tempest_source_acked", &[("source", source)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_broker_is_down_does_not_stall_the_others() {
    let c = counts();
    let (orders, _, _) = Outstanding::new(1_000);
    let topology = Topology::builder("shop")
        .named_source("orders", orders)
        .named_source("refunds", Down)
        .pipeline(shop(&c))
        .build()
        .unwrap();
    let registry = Registry::default();
    let (stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(
        Standalone::new(topology)
            .registry(registry.clone())
            .run(shutdown),
    );
    wait_for(&registry, "every order acked", |r| {
        acked(r, "orders") == 1_000
    })
    .await;
    assert_eq!(healthy(&registry, "orders"), Some(1.0));
    assert_eq!(healthy(&registry, "refunds"), Some(0.0));
    let errors = registry
        .snapshot()
        .counter("tempest_source_errors", &[("source", "refunds")]);
    assert!(errors >= 1, "the down broker's errors are counted");
    assert_eq!(
        registry
            .snapshot()
            .counter("tempest_source_errors", &[("source", "orders")]),
        0
    );
    // The down source keeps the standalone run going until it is stopped.
    assert!(!run.is_finished());
    stop.send(true).unwrap();
    let (report, _) = timeout(WAIT, run).await.unwrap().unwrap().unwrap();
    assert_eq!(report.end, DriveEnd::Shutdown { left: 0 });
    assert_eq!((n(&c[0]), n(&c[2])), (1_000, 0));
}

#[test]
fn a_source_that_cannot_work_stops_the_run_with_its_name() {
    let c = counts();
    let topology = Topology::builder("shop")
        .named_source("orders", GeneratorSource::new())
        .named_source("refunds", Broken)
        .pipeline(shop(&c))
        .build()
        .unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let err = Standalone::new(topology)
        .run_blocking(shutdown)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&err, RunError::NamedSource { name, .. } if name == "refunds"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("source `refunds`") && err.to_string().contains("does not exist"),
        "{err}"
    );
}

#[test]
fn sources_that_do_not_match_the_pipeline_are_named() {
    let c = counts();
    let topology = Topology::builder("shop")
        .named_source("orders", MemorySource::new(["o"]))
        .named_source("returns", MemorySource::new(["r"]))
        .pipeline(shop(&c))
        .build()
        .unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let err = Standalone::new(topology)
        .run_blocking(shutdown)
        .map(|_| ())
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RunError::Sources(_)), "{err:?}");
    assert!(
        text.contains("source `returns` feeds no task")
            && text.contains("edge_from_source(\"returns\""),
        "{text}"
    );
    assert!(
        text.contains("source `refunds` (which feeds parse_refund) is not given")
            && text.contains("[sources.refunds]"),
        "{text}"
    );

    // An unnamed source where the pipeline names its sources.
    let topology = Topology::builder("shop")
        .source(MemorySource::new(["o"]))
        .pipeline(
            Pipeline::new()
                .task("t", || |_m: Msg| -> TaskResult { Ok(None) })
                .edge_from_source("orders", "t"),
        )
        .build()
        .unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let text = Standalone::new(topology)
        .run_blocking(shutdown)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(text.contains("unnamed source feeds no task"), "{text}");
}

/// Through a real topology server and real workers over loopback: both
/// sources' roots reach their tasks' workers, and a source whose broker is
/// down holds up nothing but itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_server_drives_every_source() {
    const NAME: &str = "shop-mesh";
    let c = counts();
    let (orders, _, _) = Outstanding::new(2_000);
    let (refunds, _, _) = Outstanding::new(1_000);
    let topology = Topology::builder(NAME)
        .named_source("orders", orders)
        .named_source("refunds", refunds)
        .named_source("returns", Down)
        .source_max_pending("refunds", 16)
        .pipeline(shop(&c).edge_from_source("returns", "parse_refund"))
        .build()
        .unwrap();
    let server = TopologyServer::bind(topology, ServerConfig::default())
        .await
        .unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let registry = server.registry();
    let (stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(server.run(shutdown));

    let dag = Arc::new(
        Topology::builder(NAME)
            .pipeline(shop(&c).edge_from_source("returns", "parse_refund"))
            .build()
            .unwrap()
            .dag()
            .unwrap(),
    );
    let mut workers = Vec::new();
    for (task, count) in [
        ("parse_order", 2),
        ("audit", 1),
        ("parse_refund", 1),
        ("ledger", 1),
    ] {
        for i in 0..count {
            let mut config = WorkerConfig::new(addr.to_string(), NAME, task);
            config.instance = Some(i);
            config.instances = count;
            let (wstop, wshutdown) = watch::channel(false);
            let handle = tokio::spawn(run_worker(
                dag.clone(),
                config,
                Registry::default(),
                wshutdown,
            ));
            workers.push((wstop, handle));
        }
    }
    wait_for(&registry, "every order and refund acked", |r| {
        acked(r, "orders") == 2_000 && acked(r, "refunds") == 1_000
    })
    .await;
    assert_eq!(healthy(&registry, "returns"), Some(0.0));
    assert_eq!(healthy(&registry, "orders"), Some(1.0));
    stop.send(true).unwrap();
    let report = timeout(WAIT, run).await.unwrap().unwrap().unwrap();
    for (wstop, handle) in workers {
        let _ = wstop.send(true);
        timeout(WAIT, handle).await.unwrap().unwrap().unwrap();
    }
    assert_eq!(report.acked(), 3_000);
    // Each order went to parse_order and to audit, each refund to
    // parse_refund; both parsers fed the ledger (at least once each:
    // at-least-once, no replays expected here).
    assert_eq!((n(&c[0]), n(&c[1]), n(&c[2])), (2_000, 2_000, 1_000));
    assert_eq!(n(&c[3]), 3_000);
}
