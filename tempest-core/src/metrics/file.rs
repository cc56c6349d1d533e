//! The file target: JSON lines, one object per metric per flush.
//!
//! ```json
//! {"ts":"2025-01-31T12:00:00.250Z","ts_ms":1738324800250,"name":"tempest_source_acked","kind":"counter","labels":{"host":"h","topology":"wc"},"value":42}
//! {"ts":"...","ts_ms":...,"name":"tempest_root_complete_latency","kind":"histogram","labels":{...},"count":3,"sum":300,"p50":100,"p99":100,"max":100,"buckets":[{"le":103,"count":3}]}
//! ```
//!
//! Counters are totals since the process started, gauges their value at the
//! flush, histograms (µs) their whole distribution so far: `buckets` lists
//! the non-empty buckets with their inclusive upper bound `le` (not
//! cumulative). The file is opened for appending at the first flush (and
//! again after a failure), and written and flushed once per flush.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map};

use super::histogram::bucket_upper;
use super::targets::{MetricTarget, TargetError};
use super::{Kind, Snapshot, Value};

/// Appends JSON lines to a file.
pub struct FileTarget {
    path: PathBuf,
    file: Option<BufWriter<File>>,
}

impl FileTarget {
    /// A target appending to `path`.
    pub fn new(path: PathBuf) -> Self {
        FileTarget { path, file: None }
    }
}

/// The lines of `snapshot`, each ending in `\n`.
pub fn render(snapshot: &Snapshot) -> String {
    let ms = snapshot
        .at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let ts = rfc3339(snapshot.at);
    let mut out = String::new();
    for s in &snapshot.samples {
        let labels: Map<String, serde_json::Value> = s
            .labels
            .pairs()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let kind = match s.def.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let mut line = json!({
            "ts": ts,
            "ts_ms": ms,
            "name": s.def.name,
            "kind": kind,
            "labels": labels,
        });
        match &s.value {
            Value::Counter(v) => line["value"] = json!(v),
            Value::Gauge(v) => line["value"] = json!(v),
            Value::Histogram(h) => {
                line["count"] = json!(h.count);
                line["sum"] = json!(h.sum);
                line["p50"] = json!(h.quantile(0.5));
                line["p99"] = json!(h.quantile(0.99));
                line["max"] = json!(h.max);
                line["buckets"] = h
                    .buckets
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(i, &c)| json!({"le": bucket_upper(i), "count": c}))
                    .collect();
            }
        }
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// `t` as RFC 3339 in UTC with milliseconds: `2025-01-31T12:00:00.250Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl MetricTarget for FileTarget {
    fn name(&self) -> &'static str {
        "file"
    }

    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError> {
        let error = |what: &str, e: std::io::Error| TargetError {
            target: "file",
            message: format!("{what} {}: {e}", self.path.display()),
        };
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| error("cannot open", e))?;
            self.file = Some(BufWriter::new(f));
        }
        let text = render(snapshot);
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let written = f.write_all(text.as_bytes()).and_then(|_| f.flush());
        if let Err(e) = written {
            // Reopen at the next flush.
            self.file = None;
            return Err(error("cannot write", e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{catalog as c, Labels, Registry};
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_738_324_800_250);
        assert_eq!(rfc3339(t), "2025-01-31T12:00:00.250Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn writes_one_object_per_metric_per_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let r = Registry::new(Labels::new([("topology", "t")]));
        r.counter(&c::SOURCE_ACKED, &Labels::default()).add(4);
        r.gauge(&c::TASK_QUEUE_DEPTH, &Labels::new([("task", "a")]))
            .set(1.5);
        let h = r.histogram(&c::ROOT_COMPLETE_LATENCY, &Labels::default());
        h.record_n(100, 3);
        let mut t = FileTarget::new(path.clone());
        t.flush(&r.snapshot()).unwrap();
        t.flush(&r.snapshot()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6, "{text}");
        let acked = &lines[..3]
            .iter()
            .find(|l| l["name"] == "tempest_source_acked")
            .unwrap();
        assert_eq!(acked["kind"], "counter");
        assert_eq!(acked["value"], 4);
        assert_eq!(acked["labels"]["topology"], "t");
        assert!(acked["ts"].as_str().unwrap().ends_with('Z'));
        let lat = lines
            .iter()
            .find(|l| l["name"] == "tempest_root_complete_latency")
            .unwrap();
        assert_eq!(
            (&lat["count"], &lat["sum"], &lat["p50"], &lat["max"]),
            (&json!(3), &json!(300), &json!(100), &json!(100))
        );
        assert_eq!(lat["buckets"], json!([{"le": 103, "count": 3}]));
        let depth = lines
            .iter()
            .find(|l| l["name"] == "tempest_task_queue_depth")
            .unwrap();
        assert_eq!(depth["value"], 1.5);
        assert_eq!(depth["labels"]["task"], "a");
    }

    #[test]
    fn a_missing_directory_is_an_error_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = FileTarget::new(dir.path().join("no/such/dir/m.jsonl"));
        let r = Registry::default();
        for _ in 0..2 {
            let e = t.flush(&r.snapshot()).unwrap_err();
            assert!(e.to_string().contains("cannot open"), "{e}");
        }
    }
}
