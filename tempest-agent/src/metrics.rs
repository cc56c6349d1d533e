//! The node's `/metrics`: the agent's own figures and the aggregate of its
//! processes' Prometheus expositions.
//!
//! Every process is launched with a Prometheus endpoint on a port of the
//! range; a scrape of the agent scrapes them all at once and merges them
//! (each read with [`tempest_control::exposition`], the workspace's one
//! parser): samples with the same name and labels are summed across processes, each
//! family's `# HELP` and `# TYPE` are kept once, in the order first seen. A
//! process that does not answer (or answers something that is not an
//! exposition) is left out and counted in `tempest_agent_scrape_errors_total`.
//! Nothing here keeps samples between scrapes.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tempest_control::exposition::{self, escape_label, Number as Num, Sample};
use tempest_control::{NodeInfo, ProcessState, ProcessStatus};

use crate::Stats;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long one process's scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest exposition read from one process.
const MAX_EXPOSITION: usize = 16 << 20;

#[derive(Debug, Default)]
struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<Sample>,
    /// (sample name, labels sorted) → index in `samples`.
    index: HashMap<(String, Vec<(String, String)>), usize>,
}

/// Expositions merged: samples of the same name and labels summed.
#[derive(Debug, Default)]
pub struct Merged {
    families: Vec<Family>,
    by_name: HashMap<String, usize>,
}

impl Merged {
    /// An empty aggregate.
    pub fn new() -> Self {
        Merged::default()
    }

    /// Adds one exposition's samples; an exposition that does not parse is
    /// refused whole, with the line at fault.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let parsed = exposition::parse(text).map_err(|e| e.to_string())?;
        for exposition::Family {
            name,
            help,
            kind,
            samples,
        } in parsed
        {
            let i = match self.by_name.get(&name) {
                Some(&i) => i,
                None => {
                    self.families.push(Family {
                        name: name.clone(),
                        ..Family::default()
                    });
                    self.by_name.insert(name, self.families.len() - 1);
                    self.families.len() - 1
                }
            };
            let family = &mut self.families[i];
            if family.help.is_none() {
                family.help = help;
            }
            if family.kind.is_none() {
                family.kind = kind;
            }
            for s in samples {
                let mut sorted = s.labels.clone();
                sorted.sort();
                let key = (s.name.clone(), sorted);
                match family.index.get(&key) {
                    Some(&j) => {
                        let old = &mut family.samples[j];
                        old.value = old.value + s.value;
                    }
                    None => {
                        family.index.insert(key, family.samples.len());
                        family.samples.push(s);
                    }
                }
            }
        }
        Ok(())
    }

    /// The value of the sample `name` whose labels include `labels`, summed
    /// over the label sets that match (for tests and diagnostics).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut total = None;
        for f in &self.families {
            for s in f.samples.iter().filter(|s| s.name == name) {
                if labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
                {
                    total = Some(total.unwrap_or(0.0) + s.value.as_f64());
                }
            }
        }
        total
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            if let Some(h) = &f.help {
                let _ = writeln!(out, "# HELP {} {h}", f.name);
            }
            if let Some(k) = &f.kind {
                let _ = writeln!(out, "# TYPE {} {k}", f.name);
            }
            for s in &f.samples {
                out.push_str(&s.name);
                if !s.labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in s.labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", s.value.render());
            }
        }
        out
    }
}

/// The agent's and the node's own figures, as an exposition.
pub fn node_exposition(
    node: &NodeInfo,
    processes: &[ProcessStatus],
    stats: &Stats,
    downloads: u64,
) -> String {
    let host = escape_label(&node.hostname);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{name}{{host=\"{host}\"{sep}{labels}}} {value}");
        }
    };
    let one = |v: String| [(String::new(), v)];
    let states = [
        (ProcessState::Starting, "starting"),
        (ProcessState::Running, "running"),
        (ProcessState::Backoff, "backoff"),
        (ProcessState::Stopping, "stopping"),
        (ProcessState::Stopped, "stopped"),
        (ProcessState::Failed, "failed"),
    ];
    let by_state: Vec<(String, String)> = states
        .iter()
        .map(|(s, name)| {
            let n = processes.iter().filter(|p| p.state == *s).count();
            (format!("state=\"{name}\""), n.to_string())
        })
        .collect();
    metric(
        "tempest_agent_processes",
        "gauge",
        "Processes the agent supervises or was assigned, by state.",
        &by_state,
    );
    let restarts: u64 = processes.iter().map(|p| u64::from(p.restarts)).sum();
    metric(
        "tempest_agent_restarts_total",
        "counter",
        "Restarts of the agent's processes after they exited, summed over the processes it supervises.",
        &one(restarts.to_string()),
    );
    metric(
        "tempest_agent_scrape_errors_total",
        "counter",
        "Process metrics endpoints that did not answer a scrape of the agent.",
        &one(stats.scrape_errors.load(Ordering::Relaxed).to_string()),
    );
    metric(
        "tempest_agent_heartbeats_total",
        "counter",
        "Heartbeats the director answered with an assignment.",
        &one(stats.heartbeats.load(Ordering::Relaxed).to_string()),
    );
    metric(
        "tempest_agent_heartbeat_errors_total",
        "counter",
        "Heartbeats that failed: the director was unreachable or answered with an error or garbage.",
        &one(stats.heartbeat_errors.load(Ordering::Relaxed).to_string()),
    );
    metric(
        "tempest_agent_director_up",
        "gauge",
        "1 when the last heartbeat was answered, 0 otherwise.",
        &one(u8::from(stats.director_up.load(Ordering::Relaxed)).to_string()),
    );
    metric(
        "tempest_agent_package_downloads_total",
        "counter",
        "Package archives downloaded from the director.",
        &one(downloads.to_string()),
    );
    metric(
        "tempest_node_cores",
        "gauge",
        "CPU cores available.",
        &one(node.cores.to_string()),
    );
    metric(
        "tempest_node_memory_total_bytes",
        "gauge",
        "Memory in all.",
        &one(node.memory_total.to_string()),
    );
    metric(
        "tempest_node_memory_available_bytes",
        "gauge",
        "Memory available for new work (MemAvailable).",
        &one(node.memory_available.to_string()),
    );
    for (i, m) in ["1", "5", "15"].iter().enumerate() {
        metric(
            &format!("tempest_node_load{m}"),
            "gauge",
            &format!("Load average over {m} minute(s)."),
            &one(Num::Float(node.load[i]).render()),
        );
    }
    metric(
        "tempest_node_disk_free_bytes",
        "gauge",
        "Bytes free for the agent on the data directory's file system.",
        &one(node.disk_free.to_string()),
    );
    out
}

/// Scrapes every running process's endpoint at once. Returns their
/// expositions and how many failed.
pub async fn scrape(client: &reqwest::Client, processes: &[ProcessStatus]) -> (Vec<String>, u64) {
    let mut set = tokio::task::JoinSet::new();
    for p in processes {
        let (ProcessState::Running, Some(addr)) = (p.state, &p.metrics_address) else {
            continue;
        };
        let url = format!("http://{addr}/metrics");
        let client = client.clone();
        let id = p.id.clone();
        set.spawn(async move {
            let result = fetch(&client, &url).await;
            if let Err(e) = &result {
                tracing::debug!("scraping `{id}` at {url}: {e}");
            }
            result
        });
    }
    let mut texts = Vec::new();
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(text)) => texts.push(text),
            _ => errors += 1,
        }
    }
    (texts, errors)
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let mut response = client
        .get(url)
        .timeout(SCRAPE_TIMEOUT)
        .send()
        .await
        .map_err(|e| crate::packages::chain(&e))?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| crate::packages::chain(&e))?
    {
        if body.len() + chunk.len() > MAX_EXPOSITION {
            return Err("the exposition is too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| "the exposition is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "\
# HELP tempest_source_acked_total Roots acked.
# TYPE tempest_source_acked_total counter
tempest_source_acked_total{host=\"h\",topology=\"wc\"} 5
# HELP tempest_root_complete_latency_seconds Latency.
# TYPE tempest_root_complete_latency_seconds histogram
tempest_root_complete_latency_seconds_bucket{topology=\"wc\",le=\"0.001\"} 1
tempest_root_complete_latency_seconds_bucket{topology=\"wc\",le=\"+Inf\"} 2
tempest_root_complete_latency_seconds_sum{topology=\"wc\"} 0.5
tempest_root_complete_latency_seconds_count{topology=\"wc\"} 2
tempest_task_capacity{task=\"a \\\"q\\\"\",topology=\"wc\"} 0.25
";

    const B: &str = "\
# HELP tempest_source_acked_total Roots acked.
# TYPE tempest_source_acked_total counter
tempest_source_acked_total{topology=\"wc\",host=\"h\"} 7
tempest_source_acked_total{host=\"h\",topology=\"other\"} 1
# HELP tempest_root_complete_latency_seconds Latency.
# TYPE tempest_root_complete_latency_seconds histogram
tempest_root_complete_latency_seconds_bucket{topology=\"wc\",le=\"0.001\"} 3
tempest_root_complete_latency_seconds_bucket{topology=\"wc\",le=\"+Inf\"} 4
tempest_root_complete_latency_seconds_sum{topology=\"wc\"} 0.25
tempest_root_complete_latency_seconds_count{topology=\"wc\"} 4
tempest_task_capacity{task=\"a \\\"q\\\"\",topology=\"wc\"} 0.5
";

    #[test]
    fn sums_same_samples_and_keeps_help_once() {
        let mut m = Merged::new();
        m.add(A).unwrap();
        m.add(B).unwrap();
        let text = m.render();
        assert_eq!(
            text.matches("# TYPE tempest_source_acked_total counter")
                .count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("tempest_source_acked_total{host=\"h\",topology=\"wc\"} 12\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_source_acked_total{host=\"h\",topology=\"other\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "tempest_root_complete_latency_seconds_bucket{topology=\"wc\",le=\"+Inf\"} 6\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("tempest_root_complete_latency_seconds_sum{topology=\"wc\"} 0.75\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_task_capacity{task=\"a \\\"q\\\"\",topology=\"wc\"} 0.75\n"),
            "{text}"
        );
        assert_eq!(
            m.value("tempest_source_acked_total", &[("topology", "wc")]),
            Some(12.0)
        );
        // The merge reads back as the same figures.
        let mut again = Merged::new();
        again.add(&text).unwrap();
        assert_eq!(again.render(), text);
        // Histogram samples stay under their family.
        let fam = text
            .find("# TYPE tempest_root_complete_latency_seconds")
            .unwrap();
        let count = text
            .find("tempest_root_complete_latency_seconds_count")
            .unwrap();
        let capacity = text.find("tempest_task_capacity").unwrap();
        assert!(fam < count && count < capacity, "{text}");
    }

    #[test]
    fn garbage_is_refused_whole() {
        let mut m = Merged::new();
        let err = m
            .add("ok_metric 1\nthis is not { an exposition\n")
            .unwrap_err();
        assert!(err.starts_with("line 2"), "{err}");
        assert_eq!(m.render(), "");
        assert!(m.add("x{a=\"1\" 2\n").is_err());
        assert!(m.add("x{a=1} 2\n").is_err());
        assert!(m.add("x{a=\"1\"} two\n").is_err());
    }

    #[test]
    fn renders_the_real_renderer_output() {
        use tempest_core::metrics::{catalog as c, prometheus, Labels, Registry};
        let r = Registry::new(Labels::new([("topology", "wc")]));
        r.counter(&c::SOURCE_ACKED, &Labels::default()).add(3);
        let h = r.histogram(&c::ROOT_COMPLETE_LATENCY, &Labels::default());
        h.record(100);
        let text = prometheus::render(&r.snapshot());
        let mut m = Merged::new();
        m.add(&text).unwrap();
        m.add(&text).unwrap();
        assert_eq!(
            m.value("tempest_source_acked_total", &[]),
            Some(6.0),
            "{}",
            m.render()
        );
        assert_eq!(
            m.value("tempest_root_complete_latency_seconds_count", &[]),
            Some(2.0)
        );
    }
}
