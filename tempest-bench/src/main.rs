//! `tempest-bench`: Tempest's performance figures, measured.
//!
//! Every workload prints a human line on stderr and, with `--json`, exactly
//! one JSON object on the last line of stdout, so scripts and CI can record
//! it. Targets live here, never in timed tests.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::json;
use tokio::sync::watch;

use tempest::sources::GeneratorSource;
use tempest::{Bytes, Grouping, Msg, Pipeline, TaskResult, Topology};
use tempest_core::ledger::Ledger;
use tempest_core::metrics::catalog;
use tempest_topology::Standalone;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One process, in-process channels.
    Standalone,
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
    /// Messages per batch (worker pulls and source polls).
    #[arg(long, default_value_t = 512)]
    batch_size: usize,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let result = match args.workload {
        Workload::Ledger => ledger(args.messages.unwrap_or(1_000_000)),
        Workload::Passthrough | Workload::Wordcount => throughput(&args)?,
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
    let mut ledger: Ledger<()> = Ledger::new(Duration::from_secs(30));
    let t0 = Instant::now();
    let now = ledger.now();
    let ids: Vec<_> = (0..roots).map(|_| ledger.admit((), 1, now)).collect();
    let admit_secs = t0.elapsed().as_secs_f64();
    // The ids are the caller's, not the ledger's: measure before allocating them.
    let bytes = ALLOCATED.load(Relaxed) - before - ids.capacity() * std::mem::size_of_val(&ids[0]);
    let t1 = Instant::now();
    for id in &ids {
        ledger.settle(*id, 0, now);
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
        "seconds": admit_secs + settle_secs,
        "msgs_per_sec": roots as f64 / (admit_secs + settle_secs),
        "p50_ms": 0.0,
        "p99_ms": 0.0,
    })
}

fn passthrough(m: Msg) -> TaskResult {
    Ok(Some(vec![m]))
}

fn topology(args: &Args, messages: u64) -> Topology {
    let builder = Topology::builder(match args.workload {
        Workload::Wordcount => "bench-wordcount",
        _ => "bench-passthrough",
    })
    .max_pending(args.max_pending)
    .batch_size(args.batch_size)
    .message_timeout(Duration::from_secs(60));
    match args.workload {
        Workload::Wordcount => {
            let sentences = STORM_SENTENCES
                .iter()
                .map(|s| Bytes::from_static(s.as_bytes()))
                .collect();
            builder
                .source(GeneratorSource::new().cycle(sentences).count(messages))
                .pipeline(
                    Pipeline::new()
                        .task_with_workers("split", args.workers.unwrap_or(1), || wordcount::Split)
                        .task_with_workers(
                            "count",
                            args.workers.unwrap_or(2),
                            wordcount::Count::silent,
                        )
                        .edge_grouped("split", "count", Grouping::Key),
                )
        }
        _ => {
            let w = args.workers.unwrap_or(1);
            builder
                .source(GeneratorSource::new().payload_size(100).count(messages))
                .pipeline(
                    Pipeline::new()
                        .task_with_workers("t1", w, || passthrough)
                        .task_with_workers("t2", w, || passthrough)
                        .task_with_workers("t3", w, || passthrough)
                        .edge("t1", "t2")
                        .edge("t2", "t3"),
                )
        }
    }
    .build()
    .expect("benchmark topologies are valid")
}

fn throughput(args: &Args) -> anyhow::Result<serde_json::Value> {
    let messages = args.messages.unwrap_or(1_000_000);
    let topology = topology(args, messages);
    let (_stop, shutdown) = watch::channel(false);
    let (report, _) = Standalone::new(topology)
        .run_blocking(shutdown)
        .context("running the benchmark topology")?;
    let acked = report.acked();
    if acked != messages {
        bail!(
            "only {acked} of {messages} roots were acked ({} failed)",
            report.failed()
        );
    }
    let secs = report.elapsed.as_secs_f64();
    let latency = report
        .metrics
        .histogram(catalog::ROOT_COMPLETE_LATENCY.name, &[])
        .cloned()
        .unwrap_or_default();
    let handled: u64 = report.metrics.counter(catalog::TASK_MESSAGES_IN.name, &[]);
    Ok(json!({
        "workload": match args.workload { Workload::Wordcount => "wordcount", _ => "passthrough" },
        "mode": "standalone",
        "messages": messages,
        "acked": acked,
        "seconds": secs,
        "msgs_per_sec": acked as f64 / secs,
        "task_msgs_per_sec": handled as f64 / secs,
        "p50_ms": latency.quantile(0.5) as f64 / 1000.0,
        "p99_ms": latency.quantile(0.99) as f64 / 1000.0,
        "max_pending": args.max_pending,
        "batch_size": args.batch_size,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    }))
}
