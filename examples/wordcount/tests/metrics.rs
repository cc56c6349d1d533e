//! Metrics from real processes: a `wordcount topology` server and its
//! `wordcount task` workers, with the targets chosen on the command line
//! (`--metrics-target`, `--metrics-interval`) replacing the ones in
//! Topology.toml. Both the server and a worker serve `/metrics` on a port
//! they pick (printed as `metrics on http://ADDR/metrics`); the test scrapes
//! them over HTTP while the run goes on, parses the exposition with the
//! workspace's parser (`tempest_control::exposition`), receives a worker's
//! statsd datagrams on a loopback socket, and checks the server's file
//! target against the run's own summary.

#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{command_info, summary, task_args, write_config, Proc, LISTENING};
use tempest_control::exposition::{self, Family};
use tempest_testkit::StatsdListener;

/// The bound on any single wait.
const LIMIT: Duration = Duration::from_secs(60);

/// Roots the generator sends, at [`RATE`] per second: long enough to scrape
/// the processes while every worker is connected.
const COUNT: u64 = 3000;
const RATE: f64 = 500.0;

/// Starts `wordcount --log-level info <args>`.
fn spawn<S: AsRef<std::ffi::OsStr>>(label: &str, args: &[S]) -> Proc {
    Proc::spawn(label, command_info(args))
}

/// The address of the `/metrics` endpoint `p` prints.
fn metrics_addr(p: &mut Proc) -> String {
    let url = p.wait_line("metrics on http://", LIMIT);
    url.strip_suffix("/metrics")
        .unwrap_or_else(|| panic!("{url}"))
        .to_owned()
}

/// `GET /metrics` over a plain TCP connection, parsed.
fn scrape(addr: &str) -> Vec<Family> {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    exposition::parse(body).unwrap_or_else(|e| panic!("{e} in\n{body}"))
}

/// The value of `name` whose labels include `labels`, if present.
fn value(s: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.iter()
        .flat_map(|f| &f.samples)
        .find(|x| x.name == name && labels.iter().all(|(k, v)| x.label(k) == Some(*v)))
        .map(|x| x.value.as_f64())
}

/// Sum of the counter lines `name:N|c|#tags` whose tags include `want`.
fn statsd_sum(lines: &[String], name: &str, want: &[(&str, &str)]) -> u64 {
    lines
        .iter()
        .filter_map(|l| {
            let (metric, tags) = l.split_once("|#")?;
            let (nv, kind) = metric.split_once('|')?;
            let (n, v) = nv.rsplit_once(':')?;
            let tags: BTreeMap<&str, &str> =
                tags.split(',').filter_map(|t| t.split_once(':')).collect();
            (n == name && kind == "c" && want.iter().all(|(k, w)| tags.get(k) == Some(w)))
                .then(|| v.parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

#[test]
fn processes_serve_metrics_and_the_numbers_agree() {
    let dir = tempfile::tempdir().unwrap();
    // The console target in the file is replaced by the command line's.
    let config = write_config(
        dir.path(),
        &format!(
            "batch_size = 64\n\
             [source]\nkind = \"generator\"\n\
             [source.config]\ncount = {COUNT}\nrate = {RATE:?}\n\
             payloads = [\"the cow jumped over the moon\", \"an apple a day\"]\n\
             [metric]\nflush_interval = \"1h\"\ntargets = [{{ kind = \"console\" }}]\n"
        ),
    );
    let config = config.to_str().unwrap().to_owned();
    let file = dir.path().join("server.jsonl");
    let file_target = format!("file={}", file.display());

    let mut server = spawn(
        "server",
        &[
            "topology",
            "--config",
            &config,
            "--port",
            "0",
            "--metrics-target",
            "prometheus=127.0.0.1:0",
            "--metrics-target",
            &file_target,
            "--metrics-interval",
            "50ms",
        ],
    );
    let addr = server.wait_line(LISTENING, LIMIT);
    let server_metrics = metrics_addr(&mut server);

    // Before any worker: the endpoint serves, nothing connected.
    let s = scrape(&server_metrics);
    assert_eq!(value(&s, "tempest_worker_connections", &[]), Some(0.0));
    // The pipeline, as dashboards draw it.
    for (from, to, grouping) in [("split", "count", "key"), ("count", "output", "key")] {
        assert_eq!(
            value(
                &s,
                "tempest_pipeline_edge",
                &[("from", from), ("to", to), ("grouping", grouping)]
            ),
            Some(1.0),
            "edge {from} -> {to}"
        );
    }
    assert_eq!(
        value(
            &s,
            "tempest_source_acked_total",
            &[("topology", "wordcount")]
        ),
        Some(0.0)
    );

    let statsd = StatsdListener::start().unwrap();
    let split_targets = format!("statsd={},wc", statsd.addr());
    let mut split = spawn(
        "split/0",
        &task_args(
            "split",
            "0",
            &addr,
            &config,
            &[
                "--metrics-target",
                "prometheus=127.0.0.1:0",
                "--metrics-target",
                &split_targets,
                "--metrics-interval",
                "50ms",
            ],
        ),
    );
    let mut others: Vec<Proc> = [("count", "0"), ("count", "1"), ("output", "0")]
        .into_iter()
        .map(|(task, i)| {
            spawn(
                &format!("{task}/{i}"),
                &task_args(task, i, &addr, &config, &["--metrics-target", "none"]),
            )
        })
        .collect();
    let split_metrics = metrics_addr(&mut split);

    // While the run goes on: four connections, and the worker's own task
    // and peer-link metrics.
    let deadline = Instant::now() + LIMIT;
    loop {
        assert!(
            server.running(),
            "the run ended before all workers were seen"
        );
        let s = scrape(&server_metrics);
        let connected = value(&s, "tempest_worker_connections", &[]) == Some(4.0);
        // The server sends roots to split over one peer link.
        let linked = value(&s, "tempest_peer_links", &[("direction", "out")]) == Some(1.0);
        if connected && linked {
            let host = s
                .iter()
                .flat_map(|f| &f.samples)
                .find(|x| x.name == "tempest_worker_connections")
                .and_then(|x| x.label("host").map(str::to_owned));
            assert!(host.is_some_and(|h| !h.is_empty()), "no host label");
            break;
        }
        assert!(Instant::now() < deadline, "the workers never all connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Linked is not yet handled: wait (bounded) for the split worker's
    // first batch.
    let (w, handled) = loop {
        let w = scrape(&split_metrics);
        let handled = value(
            &w,
            "tempest_task_messages_in_total",
            &[
                ("task", "split"),
                ("instance", "0"),
                ("topology", "wordcount"),
            ],
        )
        .expect("the worker's messages_in");
        if handled > 0.0 {
            break (w, handled);
        }
        assert!(
            server.running(),
            "the run ended before split handled anything"
        );
        assert!(
            Instant::now() < deadline,
            "the split worker handled nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let latency_count = value(
        &w,
        "tempest_task_handle_latency_seconds_count",
        &[("task", "split")],
    )
    .expect("the worker's handle latency");
    // One latency per message; a scrape is not atomic across metrics, so a
    // batch may be counted in one and not yet in the other.
    assert!(
        (handled - latency_count).abs() <= 64.0,
        "{handled} messages in, {latency_count} latencies"
    );
    // The latency is a histogram with buckets: its family is typed so and
    // holds `_bucket` samples (with `le`) of the split task.
    assert!(w
        .iter()
        .any(|f| f.name == "tempest_task_handle_latency_seconds"
            && f.kind.as_deref() == Some("histogram")
            && f.samples
                .iter()
                .any(|x| x.name == "tempest_task_handle_latency_seconds_bucket"
                    && x.label("task") == Some("split")
                    && x.label("le").is_some())));

    // The run ends by itself; its summary and its file agree.
    let out = server.wait_success(LIMIT);
    let summary = summary(&out);
    assert!(
        summary.starts_with(&format!("wordcount: {COUNT} roots acked, 0 failed")),
        "{summary}"
    );
    assert!(
        !out.lines().any(|l| l.starts_with("acked ")),
        "the console target of Topology.toml was not replaced:\n{out}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let acked = lines
        .iter()
        .rev()
        .find(|l| l["name"] == "tempest_source_acked")
        .expect("acked in the file");
    assert_eq!(acked["value"], COUNT);
    assert_eq!(acked["labels"]["topology"], "wordcount");
    assert!(
        lines
            .iter()
            .filter(|l| l["name"] == "tempest_source_acked")
            .count()
            > 2,
        "flushed every 50ms, not once an hour"
    );

    // The workers are told to go; the split worker's last flush is sent as
    // it stops.
    split.signal(libc::SIGTERM);
    for p in &mut others {
        p.signal(libc::SIGTERM);
    }
    split.wait_success(LIMIT);
    for p in &mut others {
        p.wait_success(LIMIT);
    }
    // The worker's last flush was sent before it exited; wait (bounded)
    // until the loopback delivered it.
    let split_in = |lines: &[String]| {
        statsd_sum(
            lines,
            "wc.tempest_task_messages_in",
            &[
                ("task", "split"),
                ("instance", "0"),
                ("topology", "wordcount"),
            ],
        )
    };
    statsd.wait_until(LIMIT, |lines| split_in(lines) == COUNT);
    let datagrams = statsd.finish();
    assert_eq!(
        statsd_sum(
            &datagrams,
            "wc.tempest_task_messages_in",
            &[
                ("task", "split"),
                ("instance", "0"),
                ("topology", "wordcount")
            ]
        ),
        COUNT,
        "{datagrams:#?}"
    );
}
