//! The Prometheus text exposition format (version 0.0.4) of a [`Snapshot`].
//!
//! [`render`] is a pure function; the topology and worker processes serve
//! its output on `/metrics` (see `tempest_topology::scrape`). Names follow
//! Prometheus conventions, so they differ from the catalog's in suffixes:
//!
//! - a counter gets `_total` (`tempest_source_acked_total`);
//! - a histogram, recorded in microseconds, is exposed in seconds with
//!   `_seconds` (`tempest_root_complete_latency_seconds_bucket`, `_sum`,
//!   `_count`);
//! - a counter of microseconds (`..._micros`) is exposed in seconds as
//!   `..._seconds_total`;
//! - a gauge keeps its name.
//!
//! Histogram buckets are real: each `le` bound is the exact upper bound of
//! one of the histogram's own buckets ([`bounds_micros`]), so every
//! cumulative count is exact, not interpolated.

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::OnceLock;

use super::histogram::{bucket_index, bucket_upper};
use super::{Kind, MetricDef, Snapshot, Value};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `le` bounds in microseconds: for 1, 2 and 5 × 10^k µs from 1 µs to
/// 100 s, the upper bound of the histogram bucket holding that value (at
/// most 12.5% above it). `+Inf` comes after these.
pub fn bounds_micros() -> &'static [u64] {
    static BOUNDS: OnceLock<Vec<u64>> = OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut out = Vec::new();
        let mut decade = 1u64;
        while decade <= 100_000_000 {
            for m in [1, 2, 5] {
                let v = decade * m;
                if v > 100_000_000 {
                    break;
                }
                let upper = bucket_upper(bucket_index(v));
                if out.last() != Some(&upper) {
                    out.push(upper);
                }
            }
            decade *= 10;
        }
        out
    })
}

/// The name metric `def` has in the exposition (without `_bucket`, `_sum`
/// or `_count`).
pub fn exposed_name(def: &MetricDef) -> Cow<'static, str> {
    match def.kind {
        Kind::Gauge => Cow::Borrowed(def.name),
        Kind::Counter => match def.name.strip_suffix("_micros") {
            Some(stem) => Cow::Owned(format!("{stem}_seconds_total")),
            None => Cow::Owned(format!("{}_total", def.name)),
        },
        Kind::Histogram => Cow::Owned(format!("{}_seconds", def.name)),
    }
}

/// Renders every sample of `snapshot`, one `# HELP` and `# TYPE` per metric.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(snapshot.samples.len() * 128);
    let bounds = bounds_micros();
    let mut last: Option<&'static str> = None;
    for s in &snapshot.samples {
        let name = exposed_name(s.def);
        if last != Some(s.def.name) {
            last = Some(s.def.name);
            let kind = match s.def.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&help(s.def)));
            let _ = writeln!(out, "# TYPE {name} {kind}");
        }
        let labels = label_text(s.labels.pairs());
        match &s.value {
            Value::Counter(v) => {
                if s.def.name.ends_with("_micros") {
                    let _ = writeln!(out, "{name}{{{labels}}} {}", float(*v as f64 / 1e6));
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
            Value::Gauge(v) => {
                let _ = writeln!(out, "{name}{{{labels}}} {}", float(*v));
            }
            Value::Histogram(h) => {
                let sep = if labels.is_empty() { "" } else { "," };
                for (b, c) in bounds.iter().zip(h.cumulative(bounds)) {
                    let le = float(*b as f64 / 1e6);
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {c}");
                }
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", float(h.sum as f64 / 1e6));
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
            }
        }
    }
    out
}

/// The help text, in the exposed unit.
fn help(def: &MetricDef) -> Cow<'static, str> {
    let exposed_in_seconds =
        def.kind == Kind::Histogram || (def.kind == Kind::Counter && def.name.ends_with("_micros"));
    if exposed_in_seconds {
        Cow::Owned(
            def.help
                .replace("microseconds", "seconds")
                .replace("Microseconds", "Seconds"),
        )
    } else {
        Cow::Borrowed(def.help)
    }
}

fn label_text(pairs: &[(&'static str, String)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape_label(v));
    }
    s
}

fn escape_label(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    Cow::Owned(
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

fn escape_help(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '\n']) {
        return Cow::Borrowed(v);
    }
    Cow::Owned(v.replace('\\', "\\\\").replace('\n', "\\n"))
}

/// A float as Prometheus writes it (`+Inf`, `-Inf`, `NaN`, else the
/// shortest decimal that reads back to the same value).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::{catalog as c, Labels, Registry};
    use super::*;

    #[test]
    fn bounds_are_exact_bucket_uppers_in_order() {
        let b = bounds_micros();
        assert_eq!(b.first(), Some(&1));
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        for &u in b {
            assert_eq!(
                bucket_upper(bucket_index(u)),
                u,
                "{u} is not a bucket bound"
            );
        }
        // Within 12.5% above each 1-2-5 step, up to 100 s.
        assert!(*b.last().unwrap() >= 100_000_000);
        assert!(*b.last().unwrap() as f64 <= 100_000_000.0 * 1.125);
    }

    #[test]
    fn renders_every_kind() {
        let r = Registry::new(Labels::new([("topology", "t\"1")]));
        r.counter(&c::SOURCE_ACKED, &Labels::default()).add(5);
        r.counter(&c::TASK_BUSY, &Labels::new([("task", "a")]))
            .add(1_500_000);
        r.gauge(&c::ROOTS_IN_FLIGHT, &Labels::default()).set(2.5);
        let h = r.histogram(&c::ROOT_COMPLETE_LATENCY, &Labels::default());
        h.record(1);
        h.record(150);
        h.record(2_000_000);
        let text = render(&r.snapshot());
        assert!(
            text.contains("# TYPE tempest_source_acked_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_source_acked_total{topology=\"t\\\"1\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_task_busy_seconds_total{task=\"a\",topology=\"t\\\"1\"} 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("tempest_roots_in_flight{topology=\"t\\\"1\"} 2.5\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tempest_root_complete_latency_seconds histogram\n"),
            "{text}"
        );
        assert!(text.contains("# HELP tempest_root_complete_latency_seconds Time from admitting a root to acking it (seconds).\n"), "{text}");
        assert!(
            text.contains("tempest_root_complete_latency_seconds_bucket{topology=\"t\\\"1\",le=\"0.000001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "tempest_root_complete_latency_seconds_bucket{topology=\"t\\\"1\",le=\"+Inf\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tempest_root_complete_latency_seconds_sum{topology=\"t\\\"1\"} 2.000151\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("tempest_root_complete_latency_seconds_count{topology=\"t\\\"1\"} 3\n"),
            "{text}"
        );
        // One HELP and TYPE per metric, even with several label sets.
        r.counter(&c::TASK_BUSY, &Labels::new([("task", "b")]))
            .add(1);
        let text = render(&r.snapshot());
        assert_eq!(
            text.matches("# TYPE tempest_task_busy_seconds_total")
                .count(),
            1
        );
    }

    #[test]
    fn floats() {
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float(f64::NAN), "NaN");
        assert_eq!(float(1023.0 / 1e6), "0.001023");
        assert_eq!(float(3.0), "3");
    }
}
