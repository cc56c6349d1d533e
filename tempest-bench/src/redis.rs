//! The `redis` and `redis-raw` workloads: Tempest draining a Redis stream,
//! against the broker's own ceiling on this machine.
//!
//! Both pre-fill a stream with `--messages` entries of 100 bytes, then drain
//! it through a consumer group until every entry is acked: `redis-raw` with
//! the bare `XREADGROUP` + `XACK` loop and nothing else, `redis` with the
//! passthrough pipeline behind a `RedisStreamSource`. `redis` runs the raw
//! loop too, on a stream of its own, so one run gives both figures and
//! their ratio.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use redis::streams::{StreamReadOptions, StreamReadReply};
use serde_json::json;
use tokio::sync::watch;

use tempest::Topology;

use crate::{passthrough_pipeline, Counted};
use tempest_connectors::redis::{RedisSourceConfig, RedisStreamSource};
use tempest_testkit::RedisServer;
use tempest_topology::Standalone;

/// What the redis workloads need from the command line.
pub struct RedisArgs {
    pub messages: u64,
    pub batch_size: usize,
    pub max_pending: usize,
    pub url: Option<String>,
}

/// The server to use: `--redis-url`, or one of our own on a free port.
fn server(args: &RedisArgs) -> anyhow::Result<(String, Option<RedisServer>)> {
    match &args.url {
        Some(url) => Ok((url.clone(), None)),
        None => {
            let server =
                RedisServer::start().context("starting redis-server (scripts/test installs it)")?;
            Ok((server.url(), Some(server)))
        }
    }
}

/// Fills `stream` with `n` entries of a 100-byte payload, pipelined.
fn fill(url: &str, stream: &str, n: u64) -> anyhow::Result<()> {
    let client = redis::Client::open(url).context("redis url")?;
    let mut con = client.get_connection().context("connecting to redis")?;
    let payload = vec![b'x'; 100];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(2_000);
        let mut pipe = redis::pipe();
        for _ in 0..chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .ignore();
        }
        pipe.query::<()>(&mut con).context("XADD")?;
        left -= chunk;
    }
    Ok(())
}

/// The bare loop: read a batch for the group, ack it, until `n` are acked.
async fn drain_raw(url: &str, stream: &str, n: u64, batch: usize) -> anyhow::Result<Duration> {
    let client = redis::Client::open(url).context("redis url")?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting")?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("raw")
        .arg("0")
        .query_async::<()>(&mut con)
        .await
        .context("XGROUP CREATE")?;
    let opts = StreamReadOptions::default()
        .group("raw", "c")
        .count(batch)
        .block(100);
    let started = Instant::now();
    let mut acked = 0u64;
    while acked < n {
        let reply: StreamReadReply =
            redis::AsyncCommands::xread_options(&mut con, &[stream], &[">"], &opts)
                .await
                .context("XREADGROUP")?;
        let ids: Vec<String> = reply
            .keys
            .into_iter()
            .flat_map(|k| k.ids)
            .map(|e| e.id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        let n_acked: u64 = redis::AsyncCommands::xack(&mut con, stream, "raw", &ids)
            .await
            .context("XACK")?;
        acked += n_acked;
    }
    Ok(started.elapsed())
}

fn tempest_drain(
    url: &str,
    stream: &str,
    args: &RedisArgs,
) -> anyhow::Result<(Duration, serde_json::Value)> {
    let mut config = RedisSourceConfig::new(url, stream);
    config.group = "tempest".into();
    config.batch_size = args.batch_size;
    config.claim_idle_ms = 60_000;
    let acked = Arc::new(AtomicU64::new(0));
    let (stop, shutdown) = watch::channel(false);
    let topology = Topology::builder("bench-redis")
        .source(Counted {
            inner: RedisStreamSource::new(config),
            acked: acked.clone(),
            stop_at: Some((args.messages, stop)),
        })
        .pipeline(passthrough_pipeline())
        .batch_size(args.batch_size)
        .max_pending(args.max_pending)
        .message_timeout(Duration::from_secs(60))
        .build()
        .context("the benchmark topology")?;
    let (report, _) = Standalone::new(topology).run_blocking(shutdown)?;
    let done = acked.load(Relaxed);
    if done < args.messages {
        bail!("only {done} of {} entries were acked", args.messages);
    }
    let latency = report
        .metrics
        .histogram(
            tempest_core::metrics::catalog::ROOT_COMPLETE_LATENCY.name,
            &[],
        )
        .cloned()
        .unwrap_or_default();
    Ok((
        report.elapsed,
        json!({
            "p50_ms": latency.quantile(0.5) as f64 / 1000.0,
            "p99_ms": latency.quantile(0.99) as f64 / 1000.0,
        }),
    ))
}

fn raw_seconds(url: &str, stream: &str, args: &RedisArgs) -> anyhow::Result<f64> {
    fill(url, stream, args.messages)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(rt
        .block_on(drain_raw(url, stream, args.messages, args.batch_size))?
        .as_secs_f64())
}

/// `redis-raw`: the broker's ceiling.
pub fn redis_raw(args: &RedisArgs) -> anyhow::Result<serde_json::Value> {
    let (url, _server) = server(args)?;
    let stream = format!("bench-raw-{}", std::process::id());
    let secs = raw_seconds(&url, &stream, args)?;
    Ok(json!({
        "workload": "redis-raw",
        "mode": "standalone",
        "messages": args.messages,
        "seconds": secs,
        "msgs_per_sec": args.messages as f64 / secs,
        "p50_ms": 0.0,
        "p99_ms": 0.0,
        "batch_size": args.batch_size,
        "external_redis": args.url.is_some(),
    }))
}

/// `redis`: Tempest draining the same kind of stream, with the raw figure of
/// the same run beside it.
pub fn redis(args: &RedisArgs) -> anyhow::Result<serde_json::Value> {
    let (url, _server) = server(args)?;
    let raw_secs = raw_seconds(&url, &format!("bench-raw-{}", std::process::id()), args)?;
    let stream = format!("bench-tempest-{}", std::process::id());
    fill(&url, &stream, args.messages)?;
    let (elapsed, latency) = tempest_drain(&url, &stream, args)?;
    let secs = elapsed.as_secs_f64();
    let rate = args.messages as f64 / secs;
    let raw_rate = args.messages as f64 / raw_secs;
    Ok(json!({
        "workload": "redis",
        "mode": "standalone",
        "messages": args.messages,
        "seconds": secs,
        "msgs_per_sec": rate,
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "raw_msgs_per_sec": raw_rate,
        "ratio_to_raw": rate / raw_rate,
        "batch_size": args.batch_size,
        "max_pending": args.max_pending,
        "external_redis": args.url.is_some(),
    }))
}
