//! The node's `/metrics`: the agent's own figures and the aggregate of its
//! processes' Prometheus expositions.
//!
//! Every process is launched with a Prometheus endpoint on a port of the
//! range; a scrape of the agent scrapes them all at once and merges them:
//! samples with the same name and labels are summed across processes, each
//! family's `# HELP` and `# TYPE` are kept once, in the order first seen. A
//! process that does not answer (or answers something that is not an
//! exposition) is left out and counted in `tempest_agent_scrape_errors_total`.
//! Nothing here keeps samples between scrapes.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tempest_control::{NodeInfo, ProcessState, ProcessStatus};

use crate::Stats;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long one process's scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest exposition read from one process.
const MAX_EXPOSITION: usize = 16 << 20;

/// A number as written: integers are summed exactly.
#[derive(Copy, Clone, Debug, PartialEq)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn parse(s: &str) -> Option<Num> {
        if let Ok(i) = s.parse::<i128>() {
            return Some(Num::Int(i));
        }
        match s {
            "+Inf" | "Inf" => Some(Num::Float(f64::INFINITY)),
            "-Inf" => Some(Num::Float(f64::NEG_INFINITY)),
            "NaN" => Some(Num::Float(f64::NAN)),
            _ => s.parse::<f64>().ok().map(Num::Float),
        }
    }

    fn add(self, other: Num) -> Num {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => match a.checked_add(b) {
                Some(s) => Num::Int(s),
                None => Num::Float(a as f64 + b as f64),
            },
            (a, b) => Num::Float(a.float() + b.float()),
        }
    }

    fn float(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn render(self) -> String {
        match self {
            Num::Int(i) => i.to_string(),
            Num::Float(f) if f.is_nan() => "NaN".into(),
            Num::Float(f) if f.is_infinite() => if f > 0.0 { "+Inf" } else { "-Inf" }.into(),
            Num::Float(f) => format!("{f}"),
        }
    }
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: Num,
}

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

/// A parsed exposition, before merging (so that a malformed one is left out
/// whole, not half merged).
struct Parsed {
    families: Vec<RawFamily>,
}

/// One family of a parsed exposition.
struct RawFamily {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<Sample>,
}

impl Merged {
    /// An empty aggregate.
    pub fn new() -> Self {
        Merged::default()
    }

    /// Adds one exposition's samples; an exposition that does not parse is
    /// refused whole, with the line at fault.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let parsed = parse(text)?;
        for RawFamily {
            name,
            help,
            kind,
            samples,
        } in parsed.families
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
                        old.value = old.value.add(s.value);
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
                    total = Some(total.unwrap_or(0.0) + s.value.float());
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

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The family a sample named `sample` belongs to, given the declared ones.
fn family_of<'a>(sample: &'a str, declared: &HashSet<String>) -> &'a str {
    if declared.contains(sample) {
        return sample;
    }
    for suffix in ["_bucket", "_sum", "_count", "_total", "_created", "_info"] {
        if let Some(stem) = sample.strip_suffix(suffix) {
            if declared.contains(stem) {
                return stem;
            }
        }
    }
    sample
}

fn parse(text: &str) -> Result<Parsed, String> {
    let mut families: Vec<RawFamily> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    // Families declared by a TYPE or HELP line.
    let mut declared: HashSet<String> = HashSet::new();
    let mut family = |name: &str, families: &mut Vec<_>| -> usize {
        *index.entry(name.to_owned()).or_insert_with(|| {
            families.push(RawFamily {
                name: name.to_owned(),
                help: None,
                kind: None,
                samples: Vec::new(),
            });
            families.len() - 1
        })
    };
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {}", n + 1, line.trim());
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, value) = rest
                .trim_start()
                .split_once(' ')
                .unwrap_or((rest.trim(), ""));
            match word {
                "HELP" | "TYPE" if is_name(name) => {
                    let i = family(name, &mut families);
                    let slot = if word == "HELP" {
                        &mut families[i].help
                    } else {
                        &mut families[i].kind
                    };
                    if slot.is_none() {
                        *slot = Some(value.trim().to_owned());
                    }
                    declared.insert(name.to_owned());
                }
                "HELP" | "TYPE" => return Err(bad("bad metric name")),
                _ => {} // a comment
            }
            continue;
        }
        let (name, labels, rest) = match line.find(['{', ' ', '\t']) {
            Some(i) if line.as_bytes()[i] == b'{' => {
                let (labels, used) = parse_labels(&line[i + 1..]).map_err(|e| bad(&e))?;
                (&line[..i], labels, &line[i + 1 + used..])
            }
            Some(i) => (&line[..i], Vec::new(), &line[i..]),
            None => return Err(bad("a sample without a value")),
        };
        if !is_name(name) {
            return Err(bad("bad metric name"));
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(Num::parse)
            .ok_or_else(|| bad("bad value"))?;
        let i = family(family_of(name, &declared), &mut families);
        families[i].samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(Parsed { families })
}

/// Parses `k="v",...}`; returns the pairs and the bytes used (the `}` included).
fn parse_labels(s: &str) -> Result<(Vec<(String, String)>, usize), String> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() {
            return Err("unterminated labels".into());
        }
        if bytes[i] == b'}' {
            return Ok((out, i + 1));
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' {
            i += 1;
        }
        let key = s[start..i].trim();
        if !is_name(key) {
            return Err(format!("bad label name `{key}`"));
        }
        i += 1;
        if bytes.get(i) != Some(&b'"') {
            return Err(format!("label `{key}` has no quoted value"));
        }
        i += 1;
        let mut value = String::new();
        loop {
            match s[i..].chars().next() {
                None => return Err("unterminated label value".into()),
                Some('"') => {
                    i += 1;
                    break;
                }
                Some('\\') => {
                    let next = s[i + 1..].chars().next().ok_or("unterminated escape")?;
                    value.push(match next {
                        'n' => '\n',
                        c => c,
                    });
                    i += 1 + next.len_utf8();
                }
                Some(c) => {
                    value.push(c);
                    i += c.len_utf8();
                }
            }
        }
        out.push((key.to_owned(), value));
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
