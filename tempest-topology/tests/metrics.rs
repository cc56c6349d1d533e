//! Metric targets end to end, in process: statsd datagrams received on a
//! loopback socket, the file target's JSON lines, the Prometheus endpoint
//! scraped over HTTP and parsed with the workspace's parser
//! (`tempest_control::exposition`), broken targets that do not stop the
//! flow, and numbers that agree with what the runtime saw.

use std::collections::BTreeMap;
use std::time::Duration;

use tempest_control::exposition::{self, Number, Sample};
use tempest_core::metrics::{catalog, hostname, Labels, Registry, TargetSpec};
use tempest_core::{Msg, Pipeline, TaskError, TaskResult, Topology};
use tempest_testkit::StatsdListener;
use tempest_topology::scrape::ScrapeEndpoint;
use tempest_topology::testing::{RootStatus, TestRuntime};

/// One statsd line: name, value, type and tags.
#[derive(Debug)]
struct Line {
    name: String,
    value: f64,
    kind: String,
    tags: BTreeMap<String, String>,
}

fn parse_line(l: &str) -> Line {
    let (metric, tags) = l.split_once("|#").unwrap_or((l, ""));
    let mut parts = metric.split('|');
    let (name, value) = parts.next().unwrap().rsplit_once(':').unwrap();
    let kind = parts.next().unwrap().to_owned();
    let tags = tags
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (k, v) = t.split_once(':').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    Line {
        name: name.to_owned(),
        value: value.parse().unwrap(),
        kind,
        tags,
    }
}

/// split (one message per word) → count; payloads containing "bad" fail.
fn words(name: &str) -> tempest_core::TopologyBuilder {
    Topology::builder(name).pipeline(
        Pipeline::new()
            .task("split", || {
                |m: Msg| -> TaskResult {
                    let text = m.payload_str().ok_or("not UTF-8")?.to_owned();
                    if text.contains("bad") {
                        return Err(TaskError::new("a bad sentence"));
                    }
                    Ok(Some(
                        text.split(' ').map(|w| Msg::from(w.to_owned())).collect(),
                    ))
                }
            })
            .task_with_workers("count", 2, || |_m: Msg| -> TaskResult { Ok(None) })
            .edge("split", "count"),
    )
}

fn sentences(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 10 == 3 {
                format!("a bad sentence {i}")
            } else {
                format!("the cow {i}")
            }
        })
        .collect()
}

/// The JSON lines of a file target.
fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The last value the file target wrote for `name` with `labels`.
fn last_value(lines: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    lines
        .iter()
        .rev()
        .find(|l| l["name"] == name && labels.iter().all(|(k, v)| l["labels"][*k] == *v))
        .and_then(|l| l["value"].as_f64().or_else(|| l["count"].as_f64()))
        .unwrap_or_else(|| panic!("no {name} {labels:?} in the file"))
}

#[test]
fn statsd_and_file_agree_with_the_roots_the_runtime_saw() {
    const N: usize = 500;
    let statsd = StatsdListener::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.jsonl");
    let topology = words("metered")
        .metric_flush_interval(Duration::from_millis(20))
        .metric_target(TargetSpec::Statsd {
            address: statsd.addr().to_owned(),
            prefix: Some("tp".into()),
        })
        .metric_target(TargetSpec::File {
            path: file.to_str().unwrap().into(),
        })
        .build()
        .unwrap();
    let report = TestRuntime::new(topology)
        .input(sentences(N))
        .run()
        .unwrap();

    // The runtime's own view: every root settled.
    let acked = report.count(|s| *s == RootStatus::Acked) as u64;
    let failed = report.count(|s| matches!(s, RootStatus::Failed(_))) as u64;
    assert_eq!(acked + failed, N as u64);
    assert_eq!(failed, (N / 10) as u64);
    let words_in = acked * 3;

    // The registry agrees.
    let m = &report.metrics;
    assert_eq!(m.counter(catalog::SOURCE_ACKED.name, &[]), acked);
    assert_eq!(m.counter(catalog::SOURCE_FAILED.name, &[]), failed);
    assert_eq!(
        m.counter(catalog::TASK_MESSAGES_IN.name, &[("task", "count")]),
        words_in
    );
    assert_eq!(
        m.histogram(catalog::ROOT_COMPLETE_LATENCY.name, &[])
            .unwrap()
            .count,
        acked
    );

    // statsd: the deltas add up to the totals, every line carries the labels.
    // The last flush was sent before the run returned; wait (bounded) until
    // the loopback delivered it, that is until the totals add up.
    let sum_of = |lines: &[Line], name: &str, tags: &[(&str, &str)]| -> f64 {
        lines
            .iter()
            .filter(|l| {
                l.name == name
                    && l.kind == "c"
                    && tags
                        .iter()
                        .all(|(k, v)| l.tags.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|l| l.value)
            .sum()
    };
    statsd.wait_until(Duration::from_secs(10), |raw| {
        let lines: Vec<Line> = raw.iter().map(|l| parse_line(l)).collect();
        sum_of(&lines, "tp.tempest_source_acked", &[]) == acked as f64
            && sum_of(&lines, "tp.tempest_source_polled", &[]) == N as f64
            && sum_of(&lines, "tp.tempest_root_complete_latency.count", &[]) == acked as f64
            && sum_of(&lines, "tp.tempest_task_messages_in", &[("task", "count")])
                == words_in as f64
    });
    let lines: Vec<Line> = statsd.finish().iter().map(|l| parse_line(l)).collect();
    assert!(!lines.is_empty(), "no datagram arrived");
    let host = hostname();
    for l in &lines {
        assert!(l.name.starts_with("tp.tempest_"), "{l:?}");
        assert_eq!(
            l.tags.get("topology").map(String::as_str),
            Some("metered"),
            "{l:?}"
        );
        assert_eq!(l.tags.get("host"), Some(&host), "{l:?}");
    }
    let sum = |name: &str, tags: &[(&str, &str)]| sum_of(&lines, name, tags);
    assert_eq!(sum("tp.tempest_source_acked", &[]), acked as f64);
    assert_eq!(sum("tp.tempest_source_failed", &[]), failed as f64);
    assert_eq!(sum("tp.tempest_source_polled", &[]), N as f64);
    assert_eq!(
        sum("tp.tempest_task_messages_in", &[("task", "count")]),
        words_in as f64
    );
    assert_eq!(
        sum("tp.tempest_task_messages_in", &[("task", "split")]),
        N as f64
    );
    assert_eq!(
        sum("tp.tempest_root_complete_latency.count", &[]),
        acked as f64
    );
    let p99 = lines
        .iter()
        .find(|l| l.name == "tp.tempest_root_complete_latency.p99")
        .expect("a p99 gauge");
    assert_eq!(p99.kind, "g");
    let gauge = lines
        .iter()
        .rfind(|l| l.name == "tp.tempest_roots_in_flight")
        .expect("the in-flight gauge");
    assert_eq!((gauge.kind.as_str(), gauge.value), ("g", 0.0));

    // The file: the last flush has the totals.
    let json = json_lines(&file);
    assert!(!json.is_empty());
    assert_eq!(last_value(&json, "tempest_source_acked", &[]), acked as f64);
    assert_eq!(
        last_value(&json, "tempest_source_failed", &[]),
        failed as f64
    );
    assert_eq!(
        last_value(&json, "tempest_task_messages_in", &[("task", "count")]),
        words_in as f64
    );
    assert_eq!(
        last_value(&json, "tempest_root_complete_latency", &[]),
        acked as f64
    );
    for l in &json {
        assert_eq!(l["labels"]["topology"], "metered");
        assert_eq!(l["labels"]["host"], host.as_str());
        assert!(l["ts"].as_str().unwrap().ends_with('Z'), "{l}");
        assert!(l["ts_ms"].as_u64().unwrap() > 1_600_000_000_000, "{l}");
    }
}

#[test]
fn broken_targets_do_not_stop_the_flow() {
    const N: usize = 3000;
    // A statsd port nobody listens on, a file in a directory that does not
    // exist, and one working file to show the others still flush.
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    let topology = words("broken")
        .metric_flush_interval(Duration::from_millis(10))
        .metric_target(TargetSpec::Statsd {
            address: closed,
            prefix: None,
        })
        .metric_target(TargetSpec::File {
            path: dir
                .path()
                .join("no/such/dir/m.jsonl")
                .to_str()
                .unwrap()
                .into(),
        })
        .metric_target(TargetSpec::File {
            path: good.to_str().unwrap().into(),
        })
        .build()
        .unwrap();
    let report = TestRuntime::new(topology)
        .input(sentences(N).into_iter().map(|s| s.replace("bad", "good")))
        .deadline(Duration::from_secs(60))
        .run()
        .unwrap();
    assert!(
        report.all_acked(),
        "{:?}",
        report
            .outcomes
            .iter()
            .find(|o| o.status != RootStatus::Acked)
    );
    assert_eq!(
        report.metrics.counter(catalog::SOURCE_ACKED.name, &[]),
        N as u64
    );
    let json = json_lines(&good);
    assert_eq!(last_value(&json, "tempest_source_acked", &[]), N as f64);
    assert!(!dir.path().join("no").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_endpoint_serves_real_histograms() {
    let registry = Registry::for_topology("scraped");
    let recorded: [(u64, u64); 6] = [
        (1, 2),
        (150, 3),
        (2_000, 1),
        (40_000, 4),
        (2_000_000, 1),
        (500_000_000, 1), // above the last finite bound
    ];
    let h = registry.histogram(
        &catalog::TASK_HANDLE_LATENCY,
        &Labels::new([("task", "split")]),
    );
    for (micros, n) in recorded {
        h.record_n(micros, n);
    }
    registry
        .counter(&catalog::SOURCE_ACKED, &Labels::default())
        .add(42);
    registry
        .gauge(&catalog::TASK_CAPACITY, &Labels::new([("task", "split")]))
        .set(0.25);
    registry
        .counter(&catalog::TASK_BUSY, &Labels::new([("task", "split")]))
        .add(2_500_000);

    let endpoint = ScrapeEndpoint::start(registry.clone(), "127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", endpoint.local_addr());
    let response = http_client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let body = response.text().await.unwrap();
    let families = exposition::parse(&body).unwrap_or_else(|e| panic!("{e} in\n{body}"));
    let samples: Vec<&Sample> = families.iter().flat_map(|f| &f.samples).collect();

    let find = |name: &str| {
        *samples
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
    };
    let family = |name: &str| {
        families
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no family {name} in\n{body}"))
    };
    let host = hostname();
    let hist = family("tempest_task_handle_latency_seconds");
    assert_eq!(hist.kind.as_deref(), Some("histogram"), "{hist:?}");
    // The buckets: the family's `_bucket` samples of this series, in the
    // order written, as (upper bound, cumulative count).
    let series = |s: &Sample| {
        s.label("task") == Some("split")
            && s.label("topology") == Some("scraped")
            && s.label("host") == Some(host.as_str())
    };
    let buckets: Vec<(f64, f64)> = hist
        .samples
        .iter()
        .filter(|s| s.name == "tempest_task_handle_latency_seconds_bucket" && series(s))
        .map(|s| {
            let le = s.label("le").unwrap_or_else(|| panic!("no le: {s:?}"));
            let le = Number::parse(le).unwrap_or_else(|| panic!("bad le: {s:?}"));
            (le.as_f64(), s.value.as_f64())
        })
        .collect();
    let total: u64 = recorded.iter().map(|(_, n)| n).sum();
    assert!(buckets.len() > 20, "{buckets:?}");
    let mut last_le = 0.0;
    for &(le, count) in &buckets {
        assert!(le > last_le, "bounds in order: {buckets:?}");
        last_le = le;
        // Exact: every bound is a bucket's upper bound, so the count at it is
        // the number of recorded values at or below it.
        let want: u64 = if le.is_infinite() {
            total
        } else {
            let le_micros = (le * 1e6).round() as u64;
            recorded
                .iter()
                .filter(|(v, _)| *v <= le_micros)
                .map(|(_, n)| n)
                .sum()
        };
        assert_eq!(count, want as f64, "le={le}");
    }
    assert!(buckets.last().unwrap().0.is_infinite());
    // The bounds are the buckets holding 1, 2 and 5 × 10^k µs: 100 µs is in
    // the bucket that ends at 103 µs.
    assert!(buckets.iter().any(|&(le, _)| le == 0.000103), "{buckets:?}");

    let value = |name: &str| find(name).value.as_f64();
    let sum = find("tempest_task_handle_latency_seconds_sum");
    assert!(series(sum), "{sum:?}");
    let sum_micros: u64 = recorded.iter().map(|(v, n)| v * n).sum();
    assert!((sum.value.as_f64() - sum_micros as f64 / 1e6).abs() < 1e-9);
    assert_eq!(
        value("tempest_task_handle_latency_seconds_count"),
        total as f64
    );
    assert_eq!(value("tempest_source_acked_total"), 42.0);
    assert_eq!(value("tempest_task_capacity"), 0.25);
    assert_eq!(value("tempest_task_busy_seconds_total"), 2.5);
    // Each sample's family declares its type.
    let kind_of = |sample: &str| {
        families
            .iter()
            .find(|f| f.samples.iter().any(|s| s.name == sample))
            .and_then(|f| f.kind.as_deref())
    };
    assert_eq!(kind_of("tempest_source_acked_total"), Some("counter"));
    assert_eq!(kind_of("tempest_task_busy_seconds_total"), Some("counter"));
    assert_eq!(kind_of("tempest_task_capacity"), Some("gauge"));
    assert_eq!(
        kind_of("tempest_task_handle_latency_seconds_count"),
        Some("histogram")
    );
    assert!(hist.help.as_deref().is_some_and(|h| h.contains("seconds")));

    // Live: a second scrape sees new values.
    h.record(3);
    let body = http_client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains(&format!(
            "tempest_task_handle_latency_seconds_count{{host=\"{host}\",task=\"split\",topology=\"scraped\"}} {}\n",
            total + 1
        )),
        "{body}"
    );

    let addr = endpoint.local_addr();
    endpoint.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening after stop"
    );
}

#[test]
fn a_run_with_a_prometheus_target_serves_and_stops() {
    // Port 0: the runtime binds a free port (and prints it); the run ends
    // and the endpoint with it.
    let topology = words("prom")
        .metric_target(TargetSpec::Prometheus {
            listen: "127.0.0.1:0".into(),
        })
        .build()
        .unwrap();
    let report = TestRuntime::new(topology)
        .input(sentences(50))
        .run()
        .unwrap();
    assert_eq!(report.metrics.counter(catalog::SOURCE_POLLED.name, &[]), 50);
    assert!(report.all_acked() || report.count(|s| matches!(s, RootStatus::Failed(_))) == 5);
}

#[test]
fn a_target_that_does_not_parse_stops_the_run_before_it_starts() {
    let topology = words("invalid")
        .metric_target(TargetSpec::Statsd {
            address: "no port".into(),
            prefix: None,
        })
        .build()
        .unwrap();
    let Err(e) = TestRuntime::new(topology).input(["x"]).run() else {
        panic!("an invalid target is an error");
    };
    assert!(e.to_string().contains("address"), "{e}");
}

/// A plain-HTTP client: the workspace builds reqwest on rustls with no
/// process-wide crypto provider, so every client is given its TLS
/// configuration (here one that trusts nothing: the endpoints are http).
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tempest_control::tls::client_trusting_nothing().unwrap())
        .build()
        .unwrap()
}
