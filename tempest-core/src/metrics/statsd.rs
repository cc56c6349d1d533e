//! The statsd target: UDP datagrams with DogStatsD tags, through `cadence`.
//!
//! Every flush sends, for each metric (names get the configured prefix and a
//! dot; every label becomes a tag `name:value`):
//!
//! | Tempest kind | statsd |
//! |---|---|
//! | counter | `NAME:DELTA\|c`, the increase since the last flush (left out when 0) |
//! | gauge | `NAME:VALUE\|g` |
//! | histogram | `NAME.count:N\|c` and `NAME.sum:µs\|c` (deltas), and when N > 0 the interval's `NAME.p50`, `NAME.p99`, `NAME.max` as `\|g` in µs |
//!
//! The socket is non-blocking and the lines are packed into datagrams of at
//! most 512 bytes, so a flush never waits on the network. The address is
//! resolved at the first flush and again after a failure, so a statsd host
//! that is down or unresolvable only costs a warning per interval.

use std::collections::HashMap;
use std::net::{ToSocketAddrs, UdpSocket};

use cadence::prelude::*;
use cadence::{BufferedUdpMetricSink, StatsdClient};

use super::histogram::HistogramSnapshot;
use super::targets::{MetricTarget, TargetError};
use super::{Labels, Snapshot, Value};

/// Sends snapshots to a statsd server.
pub struct StatsdTarget {
    address: String,
    prefix: String,
    client: Option<StatsdClient>,
    counters: HashMap<(&'static str, Labels), u64>,
    histograms: HashMap<(&'static str, Labels), HistogramSnapshot>,
}

impl StatsdTarget {
    /// A target sending to `address` (`HOST:PORT`), names prefixed with
    /// `prefix` and a dot (no prefix when empty).
    pub fn new(address: String, prefix: String) -> Self {
        StatsdTarget {
            address,
            prefix,
            client: None,
            counters: HashMap::new(),
            histograms: HashMap::new(),
        }
    }

    fn connect(&self) -> Result<StatsdClient, String> {
        let addr = self
            .address
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.address))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.address))?;
        let local = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket =
            UdpSocket::bind(local).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make the UDP socket non-blocking: {e}"))?;
        let sink = BufferedUdpMetricSink::from(addr, socket)
            .map_err(|e| format!("cannot send to {}: {e}", self.address))?;
        Ok(StatsdClient::from_sink(&self.prefix, sink))
    }
}

/// A tag value statsd can carry: `,`, `|` and line breaks become `_`.
fn tag_value(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains([',', '|', '\n', '\r', '#']) {
        v.replace([',', '|', '\n', '\r', '#'], "_").into()
    } else {
        v.into()
    }
}

impl MetricTarget for StatsdTarget {
    fn name(&self) -> &'static str {
        "statsd"
    }

    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError> {
        let error = |message: String| TargetError {
            target: "statsd",
            message,
        };
        if self.client.is_none() {
            self.client = Some(self.connect().map_err(error)?);
        }
        let Some(client) = &self.client else {
            return Ok(());
        };
        let mut failures = 0usize;
        let mut first: Option<String> = None;
        let mut note = |r: Result<(), cadence::MetricError>| {
            if let Err(e) = r {
                failures += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        };
        for s in &snapshot.samples {
            let tags: Vec<(&str, std::borrow::Cow<'_, str>)> = s
                .labels
                .pairs()
                .iter()
                .map(|(k, v)| (*k, tag_value(v)))
                .collect();
            macro_rules! send {
                ($builder:expr) => {{
                    let mut b = $builder;
                    for (k, v) in &tags {
                        b = b.with_tag(k, v.as_ref());
                    }
                    note(b.try_send().map(|_| ()));
                }};
            }
            let key = (s.def.name, s.labels.clone());
            match &s.value {
                Value::Counter(v) => {
                    let last = self.counters.insert(key, *v).unwrap_or(0);
                    let delta = v.saturating_sub(last);
                    if delta > 0 {
                        send!(client.count_with_tags(s.def.name, delta));
                    }
                }
                Value::Gauge(v) => send!(client.gauge_with_tags(s.def.name, *v)),
                Value::Histogram(h) => {
                    let d = match self.histograms.get(&key) {
                        Some(last) => h.since(last),
                        None => h.clone(),
                    };
                    self.histograms.insert(key, h.clone());
                    if d.count == 0 {
                        continue;
                    }
                    let [count, sum, p50, p99, max] = ["count", "sum", "p50", "p99", "max"]
                        .map(|x| format!("{}.{x}", s.def.name));
                    send!(client.count_with_tags(&count, d.count));
                    send!(client.count_with_tags(&sum, d.sum));
                    send!(client.gauge_with_tags(&p50, d.quantile(0.5)));
                    send!(client.gauge_with_tags(&p99, d.quantile(0.99)));
                    send!(client.gauge_with_tags(&max, d.max));
                }
            }
        }
        if let Err(e) = client.flush() {
            failures += 1;
            first.get_or_insert_with(|| e.to_string());
        }
        match first {
            None => Ok(()),
            Some(e) => {
                // Resolve and reopen at the next flush.
                self.client = None;
                Err(error(format!(
                    "{failures} send(s) to {} failed, first: {e}",
                    self.address
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{catalog as c, Registry};
    use super::*;

    fn recv_lines(socket: &UdpSocket) -> Vec<String> {
        let mut lines = Vec::new();
        let mut buf = [0u8; 65536];
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        while let Ok(n) = socket.recv(&mut buf) {
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            lines.extend(text.lines().map(str::to_owned));
        }
        lines
    }

    #[test]
    fn sends_deltas_gauges_and_histograms_with_tags() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let r = Registry::new(Labels::new([("topology", "wc"), ("host", "h1")]));
        let acked = r.counter(&c::SOURCE_ACKED, &Labels::default());
        let depth = r.gauge(&c::TASK_QUEUE_DEPTH, &Labels::new([("task", "split")]));
        let lat = r.histogram(&c::ROOT_COMPLETE_LATENCY, &Labels::default());
        let mut t = StatsdTarget::new(addr, "app".into());

        acked.add(7);
        depth.set(3.0);
        lat.record_n(100, 3);
        t.flush(&r.snapshot()).unwrap();
        let lines = recv_lines(&server);
        assert!(
            lines.contains(&"app.tempest_source_acked:7|c|#host:h1,topology:wc".to_owned()),
            "{lines:#?}"
        );
        assert!(
            lines.contains(
                &"app.tempest_task_queue_depth:3|g|#host:h1,task:split,topology:wc".to_owned()
            ),
            "{lines:#?}"
        );
        for want in [
            "app.tempest_root_complete_latency.count:3|c|#host:h1,topology:wc",
            "app.tempest_root_complete_latency.sum:300|c|#host:h1,topology:wc",
            "app.tempest_root_complete_latency.p50:100|g|#host:h1,topology:wc",
            "app.tempest_root_complete_latency.max:100|g|#host:h1,topology:wc",
        ] {
            assert!(lines.contains(&want.to_owned()), "{want} not in {lines:#?}");
        }

        // The next flush sends the increase only, and nothing for a
        // histogram that did not change.
        acked.add(5);
        t.flush(&r.snapshot()).unwrap();
        let lines = recv_lines(&server);
        assert!(
            lines.contains(&"app.tempest_source_acked:5|c|#host:h1,topology:wc".to_owned()),
            "{lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("complete_latency")),
            "{lines:#?}"
        );
    }

    #[test]
    fn an_unresolvable_host_is_an_error_not_a_panic() {
        let mut t = StatsdTarget::new("no-such-host.invalid:8125".into(), String::new());
        let r = Registry::default();
        r.counter(&c::SOURCE_ACKED, &Labels::default()).inc();
        let e = t.flush(&r.snapshot()).unwrap_err();
        assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
    }
}
