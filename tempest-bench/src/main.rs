//! `tempest-bench`: Tempest's performance figures, measured.
//!
//! Every workload prints a human line on stderr and, with `--json`, exactly
//! one JSON object on the last line of stdout, so scripts and CI can record
//! it. Targets live here, never in timed tests.

mod kafka;
mod redis;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::json;
use tokio::sync::watch;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use parking_lot::Mutex;
use tempest::sources::GeneratorSource;
use tempest::{
    Bytes, Grouping, Msg, Pipeline, Polled, Source, SourceError, SourceId, TaskResult, Topology,
};
use tempest_core::ledger::Ledger;
use tempest_core::metrics::catalog;
use tempest_core::metrics::Registry;
use tempest_task::worker::{run_worker, WorkerConfig};
use tempest_topology::Standalone;
use tempest_topology::{ServerConfig, TopologyServer};

/// Counts bytes held by the process, for the ledger's memory per root.
struct CountingAlloc;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// The five sentences of Storm's own word-count benchmark.
const STORM_SENTENCES: [&str; 5] = [
    "the cow jumped over the moon",
    "an apple a day keeps the doctor away",
    "four score and seven years ago",
    "snow white and the seven dwarfs",
    "i am at two with nature",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// A linear 3-task pipeline of 100-byte messages; each task returns its input.
    Passthrough,
    /// Storm's word count: 5 sentences repeated, split -> count (key grouping), acking on.
    Wordcount,
    /// Bytes of ledger per in-flight root, with `--messages` roots in flight.
    Ledger,
    /// Word count fed at a fixed `--rate` (open loop): root complete latency
    /// measured from each sentence's intended send time.
    Latency,
    /// The passthrough pipeline draining a Redis stream pre-filled with
    /// `--messages` entries (with the raw loop's figure of the same run).
    Redis,
    /// The bare XREADGROUP + XACK loop over the same stream: the broker's ceiling.
    RedisRaw,
    /// The passthrough pipeline reading 3-partition Kafka topics pre-filled
    /// with `--messages` records through a consumer group, taking turns
    /// with the raw loop (whose figure of the same run it reports beside).
    Kafka,
    /// A bare librdkafka consume-and-commit loop over the same kind of topic.
    KafkaRaw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One process, in-process channels.
    Standalone,
    /// A topology server process and one worker process per task instance, over loopback TCP.
    Distributed,
}

/// The part a process of a distributed run plays (set by the parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// The topology server.
    Serve,
    /// A task worker.
    Work,
}

/// Tempest's benchmark.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// What to measure.
    workload: Workload,
    /// How the topology runs.
    #[arg(long, value_enum, default_value = "standalone")]
    mode: Mode,
    /// Source messages (roots); for `ledger`, roots in flight.
    #[arg(long)]
    messages: Option<u64>,
    /// Instances per task (default: 1 for split/passthrough tasks, 2 for count).
    #[arg(long)]
    workers: Option<u32>,
    /// Roots in flight at most.
    #[arg(long, default_value_t = 20_000)]
    max_pending: usize,
    /// Messages per batch (peer-link batches and source polls).
    /// (1,024 by default: per-batch costs, a few syscalls and thread
    /// wake-ups per hop, weigh less; a topology's own default is 256.)
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// Batches each upstream may have in flight to a worker (distributed).
    #[arg(long, default_value_t = 4)]
    credit: u32,
    /// Sentences per second for the `latency` workload.
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// The Redis server for `redis` and `redis-raw` (default: start one on a
    /// free loopback port).
    #[arg(long)]
    redis_url: Option<String>,
    /// The Kafka bootstrap servers for `kafka` and `kafka-raw`, `host:port`
    /// separated by commas (default: start a tansu broker on a free loopback
    /// port).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Record no metrics (a disabled registry whose handles do nothing), to
    /// measure what the metrics cost. Standalone mode only; the acked count
    /// then comes from the source's acks.
    #[arg(long)]
    no_metrics: bool,
    /// (internal) The part this process plays in a distributed run.
    #[arg(long, hide = true)]
    role: Option<Role>,
    /// (internal) The task a worker runs.
    #[arg(long, hide = true)]
    task: Option<String>,
    /// (internal) A worker's instance.
    #[arg(long, hide = true)]
    instance: Option<u32>,
    /// (internal) The topology server's address.
    #[arg(long, hide = true)]
    addr: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.no_metrics && args.mode != Mode::Standalone {
        bail!("--no-metrics applies to --mode standalone only");
    }
    match args.role {
        Some(Role::Serve) => return serve(&args),
        Some(Role::Work) => return work(&args),
        None => {}
    }
    let redis_args = || redis::RedisArgs {
        messages: args.messages.unwrap_or(200_000),
        batch_size: args.batch_size,
        max_pending: args.max_pending,
        url: args.redis_url.clone(),
    };
    let kafka_args = || kafka::KafkaArgs {
        messages: args.messages.unwrap_or(200_000),
        batch_size: args.batch_size,
        max_pending: args.max_pending,
        brokers: args.kafka_brokers.clone(),
    };
    let result = match (args.workload, args.mode) {
        (Workload::Ledger, _) => ledger(args.messages.unwrap_or(1_000_000)),
        (Workload::Redis, Mode::Standalone) => redis::redis(&redis_args())?,
        (Workload::RedisRaw, _) => redis::redis_raw(&redis_args())?,
        (Workload::Redis, Mode::Distributed) => bail!("the redis workload runs standalone"),
        (Workload::Kafka, Mode::Standalone) => kafka::kafka(&kafka_args())?,
        (Workload::KafkaRaw, _) => kafka::kafka_raw(&kafka_args())?,
        (Workload::Kafka, Mode::Distributed) => bail!("the kafka workload runs standalone"),
        (_, Mode::Standalone) => throughput(&args)?,
        (_, Mode::Distributed) => distributed(&args)?,
    };
    eprintln!("{}", human(&result));
    if args.json {
        println!("{result}");
    }
    Ok(())
}

fn human(v: &serde_json::Value) -> String {
    let mut s = String::new();
    if let Some(obj) = v.as_object() {
        for (k, v) in obj {
            s.push_str(&format!("{k}={v} "));
        }
    }
    s
}

fn ledger(roots: u64) -> serde_json::Value {
    let before = ALLOCATED.load(Relaxed);
    // As a topology sizes it: room for max_pending roots up front.
    let mut ledger: Ledger<()> = Ledger::with_capacity(Duration::from_secs(30), roots as usize);
    let t0 = Instant::now();
    let now = ledger.now();
    let ids: Vec<_> = (0..roots).map(|_| ledger.admit((), 1, now)).collect();
    let admit_secs = t0.elapsed().as_secs_f64();
    // The ids are the caller's, not the ledger's: measure before allocating them.
    let bytes = ALLOCATED.load(Relaxed) - before - ids.capacity() * std::mem::size_of_val(&ids[0]);
    let t1 = Instant::now();
    for id in &ids {
        ledger.ack(*id, 1, 0, now);
    }
    let settle_secs = t1.elapsed().as_secs_f64();
    assert!(ledger.is_empty());
    json!({
        "workload": "ledger",
        "mode": "standalone",
        "messages": roots,
        "roots_in_flight": roots,
        "ledger_bytes": bytes,
        "bytes_per_root": bytes as f64 / roots as f64,
        "entry_bytes": Ledger::<()>::ENTRY_BYTES,
        "seconds": admit_secs + settle_secs,
        "msgs_per_sec": roots as f64 / (admit_secs + settle_secs),
        "p50_ms": 0.0,
        "p99_ms": 0.0,
    })
}

/// t1 → t2 → t3, each passing every message on: the pipeline behind the
/// broker workloads (`redis`, `kafka`).
pub(crate) fn passthrough_pipeline() -> Pipeline {
    Pipeline::new()
        .task("t1", || passthrough)
        .task("t2", || passthrough)
        .task("t3", || passthrough)
        .edge("t1", "t2")
        .edge("t2", "t3")
}

pub(crate) fn passthrough(m: Msg) -> TaskResult {
    Ok(Some(vec![m]))
}

fn messages(args: &Args) -> u64 {
    args.messages.unwrap_or(match args.workload {
        // Ten seconds at the rate.
        Workload::Latency => (args.rate * 10.0) as u64,
        _ => 1_000_000,
    })
}

fn workload_name(w: Workload) -> &'static str {
    match w {
        Workload::Passthrough => "passthrough",
        Workload::Wordcount => "wordcount",
        Workload::Ledger => "ledger",
        Workload::Latency => "latency",
        Workload::Redis => "redis",
        Workload::RedisRaw => "redis-raw",
        Workload::Kafka => "kafka",
        Workload::KafkaRaw => "kafka-raw",
    }
}

/// The tasks of a workload's pipeline with their instance counts.
fn tasks(args: &Args) -> Vec<(&'static str, u32)> {
    match args.workload {
        Workload::Wordcount | Workload::Latency => {
            vec![
                ("split", args.workers.unwrap_or(1)),
                ("count", args.workers.unwrap_or(2)),
            ]
        }
        _ => {
            let w = args.workers.unwrap_or(1);
            vec![("t1", w), ("t2", w), ("t3", w)]
        }
    }
}

/// Root latency measured from each message's intended send time.
type Probe = Arc<Mutex<hdrhistogram::Histogram<u64>>>;

/// A generator at a fixed rate whose acks record latency from the time each
/// message was due, so a stall delays the measurement instead of the sends
/// (no coordinated omission).
struct RateProbe {
    inner: GeneratorSource,
    start: Option<Instant>,
    rate: f64,
    probe: Probe,
}

#[tempest::async_trait]
impl Source for RateProbe {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        self.start.get_or_insert_with(Instant::now);
        self.inner.poll(max).await
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        let now = Instant::now();
        if let Some(start) = self.start {
            let mut h = self.probe.lock();
            for id in ids {
                // The generator schedules message i at start + i / rate.
                let due = start + Duration::from_secs_f64(id.parts().1 as f64 / self.rate);
                let micros = now.saturating_duration_since(due).as_micros() as u64;
                let _ = h.record(micros.max(1));
            }
        }
        self.inner.ack(ids).await
    }
}

/// Counts the roots acked at the source, so a run without metrics still
/// knows how many completed; with `stop_at`, ends the run once that many
/// were acked (for sources that never run dry).
pub(crate) struct Counted<S> {
    pub inner: S,
    pub acked: Arc<AtomicU64>,
    pub stop_at: Option<(u64, watch::Sender<bool>)>,
}

#[tempest::async_trait]
impl<S: Source> Source for Counted<S> {
    async fn configure(&mut self, settings: &tempest::Settings) -> Result<(), SourceError> {
        self.inner.configure(settings).await
    }
    async fn connect(&mut self) -> Result<(), SourceError> {
        self.inner.connect().await
    }
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        self.inner.poll(max).await
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.inner.ack(ids).await?;
        let acked = self.acked.fetch_add(ids.len() as u64, Relaxed) + ids.len() as u64;
        if let Some((target, stop)) = &self.stop_at {
            if acked >= *target {
                let _ = stop.send(true);
            }
        }
        Ok(())
    }
    async fn fail(
        &mut self,
        id: SourceId,
        reason: &tempest::FailReason,
    ) -> Result<(), SourceError> {
        self.inner.fail(id, reason).await
    }
    async fn release(
        &mut self,
        id: SourceId,
        reason: &tempest::FailReason,
    ) -> Result<(), SourceError> {
        self.inner.release(id, reason).await
    }
    async fn health(&mut self) -> tempest::Health {
        self.inner.health().await
    }
    async fn shutdown(&mut self) -> Result<(), SourceError> {
        self.inner.shutdown().await
    }
}

fn topology(args: &Args, messages: u64, probe: Option<Probe>) -> Topology {
    topology_counted(args, messages, probe, Arc::default())
}

fn topology_counted(
    args: &Args,
    messages: u64,
    probe: Option<Probe>,
    acked: Arc<AtomicU64>,
) -> Topology {
    let builder = Topology::builder(match args.workload {
        Workload::Wordcount | Workload::Latency => "bench-wordcount",
        _ => "bench-passthrough",
    })
    .max_pending(args.max_pending)
    .batch_size(args.batch_size)
    .message_timeout(Duration::from_secs(60));
    let sentences = || {
        STORM_SENTENCES
            .iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect()
    };
    let builder = match (args.workload, probe) {
        (Workload::Latency, Some(probe)) => builder.source(Counted {
            inner: RateProbe {
                inner: GeneratorSource::new()
                    .cycle(sentences())
                    .count(messages)
                    .rate(args.rate),
                start: None,
                rate: args.rate,
                probe,
            },
            acked,
            stop_at: None,
        }),
        (Workload::Wordcount | Workload::Latency, _) => builder.source(Counted {
            inner: GeneratorSource::new().cycle(sentences()).count(messages),
            acked,
            stop_at: None,
        }),
        _ => builder.source(Counted {
            inner: GeneratorSource::new().payload_size(100).count(messages),
            acked,
            stop_at: None,
        }),
    };
    let workers = tasks(args);
    let pipeline = match args.workload {
        Workload::Wordcount | Workload::Latency => Pipeline::new()
            .task_with_workers("split", workers[0].1, || wordcount::Split)
            .task_with_workers("count", workers[1].1, wordcount::Count::silent)
            .edge_grouped("split", "count", Grouping::Key),
        _ => Pipeline::new()
            .task_with_workers("t1", workers[0].1, || passthrough)
            .task_with_workers("t2", workers[1].1, || passthrough)
            .task_with_workers("t3", workers[2].1, || passthrough)
            .edge("t1", "t2")
            .edge("t2", "t3"),
    };
    builder
        .pipeline(pipeline)
        .build()
        .expect("benchmark topologies are valid")
}

fn new_probe() -> Probe {
    Arc::new(Mutex::new(
        hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("valid histogram bounds"),
    ))
}

fn throughput(args: &Args) -> anyhow::Result<serde_json::Value> {
    let messages = messages(args);
    let probe = new_probe();
    let acked = Arc::new(AtomicU64::new(0));
    let topology = topology_counted(args, messages, Some(probe.clone()), acked.clone());
    let (_stop, shutdown) = watch::channel(false);
    let mut run = Standalone::new(topology);
    if args.no_metrics {
        run = run.registry(Registry::disabled());
    }
    let (report, _) = run
        .run_blocking(shutdown)
        .context("running the benchmark topology")?;
    let mut v = result(args, "standalone", messages, &report, &probe, &acked)?;
    v["metrics"] = json!(!args.no_metrics);
    Ok(v)
}

/// The JSON result of a run.
fn result(
    args: &Args,
    mode: &str,
    messages: u64,
    report: &tempest::RunReport,
    probe: &Probe,
    source_acked: &AtomicU64,
) -> anyhow::Result<serde_json::Value> {
    let acked = if args.no_metrics {
        source_acked.load(Relaxed)
    } else {
        report.acked()
    };
    if acked != messages {
        bail!(
            "only {acked} of {messages} roots were acked ({} failed)",
            report.failed()
        );
    }
    let secs = report.elapsed.as_secs_f64();
    let handled: u64 = report.metrics.counter(catalog::TASK_MESSAGES_IN.name, &[]);
    let (p50, p99, p999) = if args.workload == Workload::Latency {
        let h = probe.lock();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        (ms(0.5), ms(0.99), ms(0.999))
    } else {
        let h = report
            .metrics
            .histogram(catalog::ROOT_COMPLETE_LATENCY.name, &[])
            .cloned()
            .unwrap_or_default();
        let ms = |q: f64| h.quantile(q) as f64 / 1000.0;
        (ms(0.5), ms(0.99), ms(0.999))
    };
    let mut v = json!({
        "workload": workload_name(args.workload),
        "mode": mode,
        "messages": messages,
        "acked": acked,
        "seconds": secs,
        "msgs_per_sec": acked as f64 / secs,
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p999,
        "max_pending": args.max_pending,
        "batch_size": args.batch_size,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    if mode == "standalone" && !args.no_metrics {
        v["task_msgs_per_sec"] = json!(handled as f64 / secs);
    }
    if args.workload == Workload::Latency {
        v["rate"] = json!(args.rate);
    }
    Ok(v)
}

/// The parent of a distributed run: a server process and one worker process
/// per task instance, over loopback.
fn distributed(args: &Args) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let common = |cmd: &mut Command| {
        cmd.arg(workload_name(args.workload))
            .args(["--messages", &messages(args).to_string()])
            .args(["--max-pending", &args.max_pending.to_string()])
            .args(["--batch-size", &args.batch_size.to_string()])
            .args(["--credit", &args.credit.to_string()])
            .args(["--rate", &args.rate.to_string()]);
        if let Some(w) = args.workers {
            cmd.args(["--workers", &w.to_string()]);
        }
    };
    let mut server = Command::new(&exe);
    common(&mut server);
    let mut server = server
        .args(["--role", "serve"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the topology server")?;
    let mut lines = BufReader::new(server.stdout.take().context("server stdout")?).lines();
    let addr = loop {
        let line = lines
            .next()
            .context("the server exited before listening")?
            .context("reading the server's output")?;
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_owned();
        }
    };
    let mut workers = Vec::new();
    for (task, n) in tasks(args) {
        for i in 0..n {
            let mut w = Command::new(&exe);
            common(&mut w);
            workers.push(
                w.args([
                    "--role",
                    "work",
                    "--task",
                    task,
                    "--instance",
                    &i.to_string(),
                    "--addr",
                    &addr,
                ])
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting worker {task}/{i}"))?,
            );
        }
    }
    let mut result = None;
    for line in lines {
        let line = line.context("reading the server's output")?;
        if line.starts_with('{') {
            result = Some(
                serde_json::from_str::<serde_json::Value>(&line)
                    .context("parsing the server's result")?,
            );
        }
    }
    let status = server.wait().context("waiting for the server")?;
    for w in &mut workers {
        // SAFETY: kill(2) on a child we started and have not reaped.
        unsafe { libc::kill(w.id() as libc::pid_t, libc::SIGTERM) };
    }
    for mut w in workers {
        let _ = w.wait();
    }
    if !status.success() {
        bail!("the topology server failed: {status}");
    }
    let mut result = result.context("the server printed no result")?;
    result["workers"] = json!(tasks(args).iter().map(|(_, n)| n).sum::<u32>());
    Ok(result)
}

/// A distributed run's server process.
fn serve(args: &Args) -> anyhow::Result<()> {
    let messages = messages(args);
    let probe = new_probe();
    let topology = topology(args, messages, Some(probe.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, cpu) = rt.block_on(async move {
        let server = TopologyServer::bind(topology, ServerConfig::default()).await?;
        println!("listening on {}", server.local_addr()?);
        let (_stop, shutdown) = watch::channel(false);
        let before = process_cpu_micros();
        let report = server.run(shutdown).await?;
        anyhow::Ok((report, process_cpu_micros().saturating_sub(before)))
    })?;
    let mut v = result(
        args,
        "distributed",
        messages,
        &report,
        &probe,
        &AtomicU64::new(0),
    )?;
    // The server's own CPU time (user + system, all its threads) per root:
    // what bounds one topology when its workers run on other machines.
    v["server_cpu_us_per_root"] = json!(cpu as f64 / report.acked().max(1) as f64);
    println!("{v}");
    Ok(())
}

/// This process's user + system CPU time so far, in microseconds, from
/// `/proc/self/stat` (fields 14 and 15, in clock ticks).
pub(crate) fn process_cpu_micros() -> u64 {
    proc_cpu_micros("/proc/self/stat")
}

/// The user + system CPU time so far of the process whose `stat` file is
/// `path` (`/proc/<pid>/stat`), in microseconds; 0 when it cannot be read.
pub(crate) fn proc_cpu_micros(path: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // The command name (field 2) may hold spaces: count from its closing ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    ticks * 1_000_000 / hz
}

/// A distributed run's worker process: runs until SIGTERM.
fn work(args: &Args) -> anyhow::Result<()> {
    let mut topology = topology(args, messages(args), None);
    let name = args.task.clone().context("--task")?;
    let dag = Arc::new(topology.dag()?);
    let task = dag.task(dag.find(&name).context("unknown task")?);
    let mut config = WorkerConfig::new(
        args.addr.clone().context("--addr")?,
        topology.settings.name.clone(),
        name,
    );
    config.instance = args.instance;
    config.instances = task.workers;
    config.credit = args.credit;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (stop, shutdown) = watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            term.recv().await;
            let _ = stop.send(true);
        });
        run_worker(dag, config, Registry::default(), shutdown).await?;
        anyhow::Ok(())
    })
}
