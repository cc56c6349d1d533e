//! The metrics collector: scrapes every live agent's `/api/v1/metrics`
//! (the node's figures and the sum of its processes' Prometheus metrics),
//! and turns the samples into per-topology figures.
//!
//! The pure parts ([`parse`], [`quantile`], [`Figures::compute`]) are here;
//! [`crate::director::Director::record_metrics`] keeps the previous scrape
//! for rates and stores the series.

use std::collections::BTreeMap;

use serde::Serialize;
use tempest_control::exposition::{self, ParseError};
use utoipa::ToSchema;

/// One sample of an exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric's exposed name (with `_total`, `_bucket`, ...).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
}

/// Parses an exposition (an agent's `/metrics`) with the workspace's one
/// parser, [`tempest_control::exposition`]; a malformed one is refused
/// whole.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    Ok(exposition::samples(text)?
        .into_iter()
        .map(|s| Sample {
            name: s.name,
            labels: s.labels.into_iter().collect(),
            value: s.value.as_f64(),
        })
        .collect())
}

/// The `q` quantile (0..=1) of a histogram given as cumulative buckets
/// `(upper bound, count at or below it)`, sorted by bound, the last one
/// `+Inf`: the bucket holding the rank, interpolated linearly within it
/// (as Prometheus's `histogram_quantile`). A rank in the `+Inf` bucket
/// answers the highest finite bound. `None` when there are no counts.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 || !q.is_finite() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank && count > prev.1 {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = (rank - prev.1) / (count - prev.1);
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

/// The cumulative buckets of histogram `name` (its `_bucket` samples) for
/// the samples `keep` selects, summed per bound and sorted.
fn buckets<'a>(
    samples: impl Iterator<Item = &'a Sample>,
    name: &str,
    keep: impl Fn(&Sample) -> bool,
) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut out: Vec<(f64, f64)> = Vec::new();
    for s in samples.filter(|s| s.name == bucket && keep(s)) {
        let Some(le) = s.label("le").and_then(|v| match v {
            "+Inf" | "Inf" => Some(f64::INFINITY),
            v => v.parse::<f64>().ok(),
        }) else {
            continue;
        };
        match out.iter_mut().find(|(b, _)| *b == le) {
            Some(slot) => slot.1 += s.value,
            None => out.push((le, s.value)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Bucket counts of `now` minus those of `before` (same bounds), when the
/// difference holds counts; else `now`.
fn window(now: &[(f64, f64)], before: Option<&Vec<(f64, f64)>>) -> Vec<(f64, f64)> {
    let Some(before) = before else {
        return now.to_vec();
    };
    let diff: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, c)| {
            let old = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - old)
        })
        .collect();
    let ok = diff.iter().all(|(_, c)| *c >= 0.0) && diff.last().is_some_and(|(_, c)| *c > 0.0);
    if ok {
        diff
    } else {
        now.to_vec()
    }
}

/// The figures of a topology's sources (its topology server), summed over
/// every source it reads.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct SourceFigures {
    /// Messages polled from the source.
    pub polled: u64,
    /// Roots acked.
    pub acked: u64,
    /// Roots failed.
    pub failed: u64,
    /// Roots timed out.
    pub timed_out: u64,
    /// Roots handed to the source's fail after the policy gave up.
    pub dead_lettered: u64,
    /// Replays scheduled.
    pub retried: u64,
    /// Errors from the source.
    pub errors: u64,
    /// Whether every source reports healthy (`None` before the first
    /// scrape).
    pub healthy: Option<bool>,
    /// Worker connections open at the topology server.
    pub worker_connections: u64,
}

/// The name under which a source without a `source` label (a topology
/// with one unnamed source, or a process older than named sources) is
/// shown.
pub const DEFAULT_SOURCE: &str = "default";

/// One source's figures, when a topology reads several named sources
/// (Storm's spouts); a topology with one unnamed source has one, named
/// `default`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct PerSourceFigures {
    /// Whether it reports healthy: `false` when any host reports it
    /// unhealthy, `None` while no host reports its health.
    pub healthy: Option<bool>,
    /// Messages polled from it, in total.
    pub polled: u64,
    /// Its roots acked, in total.
    pub acked: u64,
    /// Its roots failed or timed out, in total.
    pub failed: u64,
    /// Errors from it, in total.
    pub errors: u64,
    /// Its roots in flight now.
    pub in_flight: u64,
    /// Its roots acked per second over the last scrape interval.
    pub msgs_per_sec: f64,
}

/// An edge from a source to a task it feeds, as the topology server
/// reports it (`tempest_pipeline_source_edge{source, to} 1`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
pub struct SourceEdge {
    /// The source's name.
    pub source: String,
    /// The task it feeds.
    pub to: String,
}

/// One task's figures.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct TaskFigures {
    /// Worker instances.
    pub workers: u32,
    /// Messages handed to its handle, in total.
    pub messages_in: u64,
    /// Messages in per second over the last scrape interval.
    pub msgs_per_sec: f64,
    /// Messages whose handle failed.
    pub errors: u64,
    /// The 99th percentile of the time in handle over the last interval,
    /// milliseconds.
    pub handle_p99_ms: Option<f64>,
    /// The busiest instance's capacity: the fraction of the last interval
    /// it spent in handle.
    pub capacity: f64,
}

/// One edge of a topology's pipeline, as its topology server reports it
/// (`tempest_pipeline_edge{from, to, grouping} 1`). The sources feed the
/// tasks their [`SourceEdge`]s name; a server that reports none (one
/// unnamed source, or an older process) feeds the roots, the tasks no edge
/// leads to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
pub struct PipelineEdge {
    /// The upstream task.
    pub from: String,
    /// The downstream task.
    pub to: String,
    /// `shuffle`, `key` or `all`.
    pub grouping: String,
}

/// A topology's figures from one scrape.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct Figures {
    /// Roots acked, in total.
    pub acked: u64,
    /// Roots failed or timed out, in total.
    pub failed: u64,
    /// Roots in flight now.
    pub in_flight: u64,
    /// Roots acked per second over the last scrape interval.
    pub msgs_per_sec: f64,
    /// The median root complete latency over the last interval, ms.
    pub p50_ms: Option<f64>,
    /// The 99th percentile root complete latency over the last interval, ms.
    pub p99_ms: Option<f64>,
    /// The sources' figures, summed over every source.
    pub source: SourceFigures,
    /// Per source, by name (`default` for an unnamed one).
    pub sources: BTreeMap<String, PerSourceFigures>,
    /// Per task.
    pub tasks: BTreeMap<String, TaskFigures>,
    /// The pipeline's edges, sorted; empty until its server reports them.
    pub edges: Vec<PipelineEdge>,
    /// The edges from sources to tasks, sorted; empty until its server
    /// reports them (and always from a server older than named sources).
    pub source_edges: Vec<SourceEdge>,
    /// When these were scraped, Unix milliseconds.
    #[serde(skip)]
    pub ts_ms: u64,
    /// The complete-latency buckets (for the next interval's window).
    #[serde(skip)]
    pub latency: Vec<(f64, f64)>,
    /// The handle-latency buckets per task.
    #[serde(skip)]
    pub handle: BTreeMap<String, Vec<(f64, f64)>>,
    /// Each counter's raw sum at this scrape and the total shown for it.
    #[serde(skip)]
    pub counters: BTreeMap<String, (u64, u64)>,
}

/// The metrics a topology server reports per source (with a `source`
/// label; without one, an older server's, they are the `default` source's).
const PER_SOURCE: [&str; 11] = [
    "tempest_source_polled_total",
    "tempest_source_acked_total",
    "tempest_source_failed_total",
    "tempest_source_timed_out_total",
    "tempest_source_dead_lettered_total",
    "tempest_source_retried_total",
    "tempest_source_errors_total",
    "tempest_source_healthy",
    "tempest_roots_in_flight",
    "tempest_roots_lost_total",
    "tempest_root_complete_latency_seconds_count",
];

/// The source a sample is of: its `source` label, `default` without one.
fn source_of(s: &Sample) -> &str {
    s.label("source").unwrap_or(DEFAULT_SOURCE)
}

/// Turns the raw sums of counters, which drop when a process restarts or
/// moves (its counters start again from 0), into totals that never go
/// down: an interval in which a sum went down adds nothing, and the total
/// carries on from there (as Prometheus's `increase` treats a reset).
struct Monotonic<'a> {
    prev: Option<&'a BTreeMap<String, (u64, u64)>>,
    next: BTreeMap<String, (u64, u64)>,
}

impl Monotonic<'_> {
    fn total(&mut self, key: &str, raw: u64) -> u64 {
        let total = match self.prev.and_then(|p| p.get(key)) {
            Some(&(before, total)) => total + raw.saturating_sub(before),
            None => raw,
        };
        self.next.insert(key.to_owned(), (raw, total));
        total
    }
}

impl Figures {
    /// The figures of `topology` from `samples` (every agent's, summed),
    /// with rates and windows against `prev`, the last scrape's.
    pub fn compute(
        topology: &str,
        samples: &[Sample],
        workers: &BTreeMap<String, u32>,
        prev: Option<&Figures>,
        ts_ms: u64,
    ) -> Figures {
        let mine: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.label("topology") == Some(topology))
            .collect();
        let sum = |name: &str| -> f64 {
            mine.iter()
                .filter(|s| s.name == name)
                .map(|s| s.value)
                .sum()
        };
        let count = |name: &str| sum(name).max(0.0) as u64;
        let mut totals = Monotonic {
            prev: prev.map(|p| &p.counters),
            next: BTreeMap::new(),
        };
        let mut total = |name: &str| totals.total(name, count(name));
        let mut source = SourceFigures {
            polled: total("tempest_source_polled_total"),
            acked: total("tempest_source_acked_total"),
            failed: total("tempest_source_failed_total"),
            timed_out: total("tempest_source_timed_out_total"),
            dead_lettered: total("tempest_source_dead_lettered_total"),
            retried: total("tempest_source_retried_total"),
            errors: total("tempest_source_errors_total"),
            // Set from the sources' below.
            healthy: None,
            worker_connections: count("tempest_worker_connections"),
        };
        let dt = prev
            .map(|p| ts_ms.saturating_sub(p.ts_ms) as f64 / 1000.0)
            .filter(|d| *d > 0.0);
        let rate = |now: u64, before: Option<u64>| match (dt, before) {
            (Some(dt), Some(b)) if now >= b => (now - b) as f64 / dt,
            _ => 0.0,
        };
        let latency = buckets(
            mine.iter().copied(),
            "tempest_root_complete_latency_seconds",
            |_| true,
        );
        let win = window(&latency, prev.map(|p| &p.latency));
        let ms = |v: Option<f64>| v.map(|s| s * 1000.0);
        let mut tasks = BTreeMap::new();
        let mut handle = BTreeMap::new();
        for (task, n) in workers {
            let of_task = |s: &Sample| s.label("task") == Some(task.as_str());
            let tsum = |name: &str| -> f64 {
                mine.iter()
                    .filter(|s| s.name == name && of_task(s))
                    .map(|s| s.value)
                    .sum()
            };
            let messages_in = totals.total(
                &format!("{task}/messages_in"),
                tsum("tempest_task_messages_in_total").max(0.0) as u64,
            );
            let errors = totals.total(
                &format!("{task}/errors"),
                tsum("tempest_task_errors_total").max(0.0) as u64,
            );
            let h = buckets(
                mine.iter().copied(),
                "tempest_task_handle_latency_seconds",
                of_task,
            );
            let hwin = window(&h, prev.and_then(|p| p.handle.get(task)));
            let capacity = mine
                .iter()
                .filter(|s| s.name == "tempest_task_capacity" && of_task(s))
                .map(|s| s.value)
                .fold(0.0, f64::max);
            tasks.insert(
                task.clone(),
                TaskFigures {
                    workers: *n,
                    messages_in,
                    msgs_per_sec: rate(
                        messages_in,
                        prev.and_then(|p| p.tasks.get(task)).map(|t| t.messages_in),
                    ),
                    errors,
                    handle_p99_ms: ms(quantile(&hwin, 0.99)),
                    capacity,
                },
            );
            handle.insert(task.clone(), h);
        }
        let mut edges: Vec<PipelineEdge> = mine
            .iter()
            .filter(|s| s.name == "tempest_pipeline_edge" && s.value > 0.0)
            .filter_map(|s| {
                Some(PipelineEdge {
                    from: s.label("from")?.to_owned(),
                    to: s.label("to")?.to_owned(),
                    grouping: s.label("grouping").unwrap_or("shuffle").to_owned(),
                })
            })
            .collect();
        edges.sort();
        edges.dedup();
        if edges.is_empty() {
            // A scrape that missed the server keeps the pipeline it had.
            edges = prev.map(|p| p.edges.clone()).unwrap_or_default();
        }
        let mut source_edges: Vec<SourceEdge> = mine
            .iter()
            .filter(|s| s.name == "tempest_pipeline_source_edge" && s.value > 0.0)
            .filter_map(|s| {
                Some(SourceEdge {
                    source: source_of(s).to_owned(),
                    to: s.label("to")?.to_owned(),
                })
            })
            .collect();
        source_edges.sort();
        source_edges.dedup();
        if source_edges.is_empty() {
            source_edges = prev.map(|p| p.source_edges.clone()).unwrap_or_default();
        }
        // Every source any sample or edge names, and those of the last
        // scrape (a scrape that missed the server keeps them, their totals
        // held).
        let mut names: Vec<&str> = mine
            .iter()
            .filter(|s| PER_SOURCE.contains(&s.name.as_str()))
            .map(|s| source_of(s))
            .chain(source_edges.iter().map(|e| e.source.as_str()))
            .chain(
                prev.into_iter()
                    .flat_map(|p| p.sources.keys().map(String::as_str)),
            )
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut sources = BTreeMap::new();
        for name in names {
            let of_source = |s: &&&Sample| source_of(s) == name;
            let ssum = |metric: &str| -> u64 {
                mine.iter()
                    .filter(|s| s.name == metric)
                    .filter(of_source)
                    .map(|s| s.value)
                    .sum::<f64>()
                    .max(0.0) as u64
            };
            let mut stotal =
                |metric: &str| totals.total(&format!("source {name}/{metric}"), ssum(metric));
            let acked = stotal("tempest_source_acked_total");
            let failed =
                stotal("tempest_source_failed_total") + stotal("tempest_source_timed_out_total");
            let health: Vec<f64> = mine
                .iter()
                .filter(|s| s.name == "tempest_source_healthy")
                .filter(of_source)
                .map(|s| s.value)
                .collect();
            let figures = PerSourceFigures {
                // Unhealthy when any host reports it so.
                healthy: (!health.is_empty()).then(|| health.iter().all(|v| *v > 0.0)),
                polled: stotal("tempest_source_polled_total"),
                acked,
                failed,
                errors: stotal("tempest_source_errors_total"),
                in_flight: ssum("tempest_roots_in_flight"),
                msgs_per_sec: rate(
                    acked,
                    prev.and_then(|p| p.sources.get(name)).map(|s| s.acked),
                ),
            };
            sources.insert(name.to_owned(), figures);
        }
        let health: Vec<bool> = sources.values().filter_map(|s| s.healthy).collect();
        source.healthy = (!health.is_empty()).then(|| health.iter().all(|h| *h));
        Figures {
            acked: source.acked,
            failed: source.failed + source.timed_out,
            in_flight: count("tempest_roots_in_flight"),
            msgs_per_sec: rate(source.acked, prev.map(|p| p.acked)),
            p50_ms: ms(quantile(&win, 0.5)),
            p99_ms: ms(quantile(&win, 0.99)),
            source,
            sources,
            tasks,
            edges,
            source_edges,
            ts_ms,
            latency,
            handle,
            counters: totals.next,
        }
    }
}

/// One stored point of a topology's series.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SamplePoint {
    /// When, Unix milliseconds.
    pub ts: u64,
    /// Roots acked, in total.
    pub acked: u64,
    /// Roots failed or timed out, in total.
    pub failed: u64,
    /// Roots in flight.
    pub in_flight: u64,
    /// Roots acked per second.
    pub rate: f64,
    /// Median complete latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile complete latency, ms.
    pub p99_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_over_known_buckets() {
        // 10 at or below 1, 90 in (1, 2], 100 in total.
        let b = [(1.0, 10.0), (2.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&b, 0.1), Some(1.0));
        assert!((quantile(&b, 0.5).unwrap() - (1.0 + 40.0 / 90.0)).abs() < 1e-9);
        assert!((quantile(&b, 0.99).unwrap() - (1.0 + 89.0 / 90.0)).abs() < 1e-9);
        assert!((quantile(&b, 0.05).unwrap() - 0.5).abs() < 1e-9);
        // Ranks in +Inf answer the highest finite bound.
        let b = [(1.0, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(&b, 0.99), Some(1.0));
        // No counts: no quantile.
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(quantile(&[], 0.5), None);
        // Empty leading buckets are skipped.
        let b = [
            (0.001, 0.0),
            (0.002, 0.0),
            (0.005, 4.0),
            (f64::INFINITY, 4.0),
        ];
        assert!((quantile(&b, 0.5).unwrap() - 0.0035).abs() < 1e-12);
    }

    #[test]
    fn figures_from_an_exposition() {
        let text = r#"# HELP tempest_source_acked_total Roots acked.
# TYPE tempest_source_acked_total counter
tempest_source_acked_total{topology="wc",host="h"} 100
tempest_source_acked_total{topology="other",host="h"} 7
tempest_source_failed_total{topology="wc",host="h"} 2
tempest_source_timed_out_total{topology="wc",host="h"} 1
tempest_roots_in_flight{topology="wc",host="h"} 5
tempest_root_complete_latency_seconds_bucket{topology="wc",host="h",le="0.001"} 50
tempest_root_complete_latency_seconds_bucket{topology="wc",host="h",le="0.002"} 100
tempest_root_complete_latency_seconds_bucket{topology="wc",host="h",le="+Inf"} 100
tempest_task_messages_in_total{topology="wc",task="split",host="h",instance="0"} 30
tempest_task_messages_in_total{topology="wc",task="split",host="h",instance="1"} 20
tempest_task_capacity{topology="wc",task="split",host="h",instance="0"} 0.25
tempest_task_capacity{topology="wc",task="split",host="h",instance="1"} 0.5
tempest_task_errors_total{topology="wc",task="split",host="h",instance="1"} 3
tempest_pipeline_edge{topology="wc",host="h",from="split",to="count",grouping="key"} 1
tempest_pipeline_edge{topology="wc",host="h2",from="split",to="count",grouping="key"} 1
"#;
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 15);
        let workers = [("split".to_owned(), 2)].into_iter().collect();
        let f = Figures::compute("wc", &samples, &workers, None, 1000);
        assert_eq!((f.acked, f.failed, f.in_flight), (100, 3, 5));
        assert_eq!(f.msgs_per_sec, 0.0);
        assert!((f.p50_ms.unwrap() - 1.0).abs() < 1e-9);
        let split = &f.tasks["split"];
        assert_eq!((split.messages_in, split.errors, split.workers), (50, 3, 2));
        assert_eq!(split.capacity, 0.5);
        let edge = PipelineEdge {
            from: "split".into(),
            to: "count".into(),
            grouping: "key".into(),
        };
        assert_eq!(f.edges, [edge]);
        let more = text.replace("} 100\n", "} 300\n");
        let g = Figures::compute("wc", &parse(&more).unwrap(), &workers, Some(&f), 3000);
        assert_eq!(g.acked, 300);
        assert!((g.msgs_per_sec - 100.0).abs() < 1e-9);

        // The server restarts (its counters start again) and a split
        // instance with it: the totals hold, then grow from there.
        let reset = text
            .replace("} 100\n", "} 10\n")
            .replace("instance=\"0\"} 30", "instance=\"0\"} 0");
        let h = Figures::compute("wc", &parse(&reset).unwrap(), &workers, Some(&g), 4000);
        assert_eq!((h.acked, h.msgs_per_sec), (300, 0.0));
        assert_eq!(h.tasks["split"].messages_in, 50);
        let grown = reset.replace("} 10\n", "} 60\n");
        let i = Figures::compute("wc", &parse(&grown).unwrap(), &workers, Some(&h), 5000);
        assert_eq!(i.acked, 350);
        assert!((i.msgs_per_sec - 50.0).abs() < 1e-9);
        assert_eq!(i.source.acked, 350);
    }

    #[test]
    fn figures_per_source_with_one_unhealthy() {
        let text = r#"# TYPE tempest_source_acked_total counter
tempest_source_polled_total{topology="t",host="h",source="orders"} 120
tempest_source_polled_total{topology="t",host="h",source="refunds"} 12
tempest_source_acked_total{topology="t",host="h",source="orders"} 100
tempest_source_acked_total{topology="t",host="h",source="refunds"} 10
tempest_source_failed_total{topology="t",host="h",source="orders"} 2
tempest_source_timed_out_total{topology="t",host="h",source="orders"} 1
tempest_source_timed_out_total{topology="t",host="h",source="refunds"} 1
tempest_source_errors_total{topology="t",host="h",source="refunds"} 4
tempest_source_healthy{topology="t",host="h",source="orders"} 1
tempest_source_healthy{topology="t",host="h",source="refunds"} 1
tempest_source_healthy{topology="t",host="h2",source="refunds"} 0
tempest_source_healthy{topology="other",host="h",source="orders"} 0
tempest_roots_in_flight{topology="t",host="h",source="orders"} 5
tempest_roots_in_flight{topology="t",host="h",source="refunds"} 2
tempest_pipeline_source_edge{topology="t",host="h",source="orders",to="parse"} 1
tempest_pipeline_source_edge{topology="t",host="h",source="refunds",to="parse"} 1
tempest_pipeline_source_edge{topology="t",host="h",source="refunds",to="audit"} 1
tempest_pipeline_edge{topology="t",host="h",from="parse",to="store",grouping="key"} 1
"#;
        let samples = parse(text).unwrap();
        let workers = BTreeMap::new();
        let f = Figures::compute("t", &samples, &workers, None, 1000);
        // The totals are sums over the sources.
        assert_eq!((f.acked, f.failed, f.in_flight), (110, 4, 7));
        assert_eq!((f.source.polled, f.source.errors), (132, 4));
        // One unhealthy source makes the whole unhealthy.
        assert_eq!(f.source.healthy, Some(false));
        assert_eq!(f.sources.keys().collect::<Vec<_>>(), ["orders", "refunds"]);
        let orders = &f.sources["orders"];
        assert_eq!(orders.healthy, Some(true));
        assert_eq!(
            (orders.polled, orders.acked, orders.failed, orders.errors),
            (120, 100, 3, 0)
        );
        assert_eq!(orders.in_flight, 5);
        // A host reporting it unhealthy makes it unhealthy.
        let refunds = &f.sources["refunds"];
        assert_eq!(refunds.healthy, Some(false));
        assert_eq!(
            (
                refunds.polled,
                refunds.acked,
                refunds.failed,
                refunds.errors
            ),
            (12, 10, 1, 4)
        );
        let edge = |source: &str, to: &str| SourceEdge {
            source: source.into(),
            to: to.into(),
        };
        assert_eq!(
            f.source_edges,
            [
                edge("orders", "parse"),
                edge("refunds", "audit"),
                edge("refunds", "parse")
            ]
        );
        assert_eq!(f.edges.len(), 1);

        // Rates per source; a scrape that misses the server keeps the
        // sources and their edges, their totals held and health unknown.
        let more = text.replace("source=\"orders\"} 100", "source=\"orders\"} 300");
        let g = Figures::compute("t", &parse(&more).unwrap(), &workers, Some(&f), 3000);
        assert!((g.sources["orders"].msgs_per_sec - 100.0).abs() < 1e-9);
        assert_eq!(g.sources["refunds"].msgs_per_sec, 0.0);
        assert!((g.msgs_per_sec - 100.0).abs() < 1e-9);
        let h = Figures::compute("t", &[], &workers, Some(&g), 4000);
        assert_eq!(h.sources["orders"].acked, 300);
        assert_eq!(h.sources["orders"].healthy, None);
        assert_eq!((h.source.healthy, h.acked), (None, 310));
        assert_eq!(h.source_edges, g.source_edges);

        // All healthy: healthy.
        let fine = text.replace("source=\"refunds\"} 0", "source=\"refunds\"} 1");
        let i = Figures::compute("t", &parse(&fine).unwrap(), &workers, None, 1000);
        assert_eq!(i.source.healthy, Some(true));
        assert_eq!(i.sources["refunds"].healthy, Some(true));
    }

    #[test]
    fn an_older_server_shows_one_default_source() {
        let text = r#"tempest_source_acked_total{topology="wc",host="h"} 100
tempest_source_healthy{topology="wc",host="h"} 0
tempest_roots_in_flight{topology="wc",host="h"} 5
tempest_pipeline_edge{topology="wc",host="h",from="split",to="count",grouping="key"} 1
"#;
        let f = Figures::compute("wc", &parse(text).unwrap(), &BTreeMap::new(), None, 1000);
        assert_eq!(f.sources.keys().collect::<Vec<_>>(), [DEFAULT_SOURCE]);
        let d = &f.sources[DEFAULT_SOURCE];
        assert_eq!((d.acked, d.in_flight, d.healthy), (100, 5, Some(false)));
        assert_eq!(f.source.healthy, Some(false));
        assert!(f.source_edges.is_empty());
        // Nothing reported yet: no source, health unknown.
        let none = Figures::compute("wc", &[], &BTreeMap::new(), None, 1000);
        assert!(none.sources.is_empty());
        assert_eq!(none.source.healthy, None);
    }

    #[test]
    fn parses_escaped_labels_and_refuses_garbage() {
        let s = parse("m{a=\"x\\\"y\",b=\"z\"} 1.5\n")
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(s.labels["a"], "x\"y");
        assert_eq!(s.value, 1.5);
        assert_eq!(parse("m 1\n{oops\n").unwrap_err().line, 2);
    }
}
