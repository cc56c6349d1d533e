//! How fast the Redis source drains a stream, by batch size: a measurement,
//! not a check, so it is ignored by default. Run it in release mode:
//!
//! ```sh
//! cargo test --release -p tempest-connectors --test redis_drain -- --ignored --nocapture
//! ```
//!
//! `raw` polls and acks with the source alone; `topology` runs a standalone
//! topology with one no-op task. The server fsyncs once a second
//! (`appendfsync everysec`, the usual production setting) rather than on
//! every write as the test fixture does, which would measure the disk.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use tempest_connectors::redis::{RedisSourceConfig, RedisStreamSource};
use tempest_core::{Msg, Pipeline, Polled, Source, TaskResult, Topology};
use tempest_testkit::RedisServer;
use tempest_topology::Standalone;

const ENTRIES: usize = 100_000;

fn fill(url: &str, stream: &str, n: usize) {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let payload = "x".repeat(100);
    for start in (0..n).step_by(10_000) {
        let mut pipe = redis::pipe();
        for _ in start..(start + 10_000).min(n) {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .ignore();
        }
        pipe.query::<()>(&mut c).unwrap();
    }
}

fn pending(url: &str, stream: &str) -> i64 {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("tempest")
        .query(&mut c)
        .unwrap();
    match v {
        redis::Value::Array(v) => match v.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

fn config(url: &str, stream: &str, batch: usize) -> RedisSourceConfig {
    RedisSourceConfig {
        consumer: Some("bench".into()),
        batch_size: batch,
        block_ms: 10,
        ..RedisSourceConfig::new(url, stream)
    }
}

/// Polls and acks every batch with the source alone.
async fn raw(url: &str, stream: &str, batch: usize) -> Duration {
    let mut source = RedisStreamSource::new(config(url, stream, batch));
    source.connect().await.unwrap();
    let started = Instant::now();
    let mut got = 0;
    while got < ENTRIES {
        match source.poll(batch).await.unwrap() {
            Polled::Msgs(msgs) => {
                got += msgs.len();
                let ids: Vec<_> = msgs.iter().map(|m| m.id).collect();
                source.ack(&ids).await.unwrap();
            }
            other => panic!("{other:?} after {got}"),
        }
    }
    started.elapsed()
}

/// A standalone topology with one no-op task.
fn topology(url: &str, stream: &str, batch: usize, max_pending: usize) -> Duration {
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let t = Topology::builder("drain")
        .source(RedisStreamSource::new(config(url, stream, batch)))
        .pipeline(Pipeline::new().task("noop", move || {
            let h = h.clone();
            move |_m: Msg| -> TaskResult {
                h.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }))
        .batch_size(batch)
        .max_pending(max_pending)
        .build()
        .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let started = Instant::now();
    let run = std::thread::spawn(move || Standalone::new(t).run_blocking(shutdown));
    while handled.load(Ordering::Relaxed) < ENTRIES || pending(url, stream) != 0 {
        assert!(started.elapsed() < Duration::from_secs(300), "too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    let _ = stop.send(true);
    run.join().unwrap().unwrap();
    took
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn drain_rates() {
    let server = RedisServer::start().unwrap();
    let url = server.url();
    server
        .command(&["CONFIG", "SET", "appendfsync", "everysec"])
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for batch in [64, 256, 512, 1024, 2048, 4096] {
        let stream = format!("raw{batch}");
        fill(&url, &stream, ENTRIES);
        let took = rt.block_on(raw(&url, &stream, batch));
        println!(
            "raw      batch {batch:>5}: {:>8.0} entries/s",
            ENTRIES as f64 / took.as_secs_f64()
        );
    }
    for (batch, max_pending) in [
        (256, 10_000),
        (512, 10_000),
        (1024, 10_000),
        (2048, 10_000),
        (2048, 20_000),
        (4096, 20_000),
    ] {
        let stream = format!("topo{batch}-{max_pending}");
        fill(&url, &stream, ENTRIES);
        let took = topology(&url, &stream, batch, max_pending);
        println!(
            "topology batch {batch:>5} max_pending {max_pending:>6}: {:>8.0} entries/s",
            ENTRIES as f64 / took.as_secs_f64()
        );
    }
}
