//! Metric targets: where snapshots go on every flush.
//!
//! The flusher ([`spawn_flusher`]) runs on its own thread and hands each
//! snapshot to every push target in turn (console, log, statsd, file). A
//! target that fails is reported in the log, once per interval, and tried
//! again at the next flush; the others still get the snapshot, and the data
//! path never waits for a target. The Prometheus target is pulled instead:
//! the runtime serves `/metrics` on its address (see [`super::prometheus`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Registry, Snapshot, Value};

/// The address a Prometheus target listens on unless told otherwise.
pub const DEFAULT_PROMETHEUS_LISTEN: &str = "127.0.0.1:9464";

/// The statsd address `--metrics-target statsd` uses without an address.
pub const DEFAULT_STATSD_ADDRESS: &str = "127.0.0.1:8125";

/// A target as configured in `Topology.toml` (`[[metric.targets]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetSpec {
    /// A compact table on stdout, for people running standalone.
    Console,
    /// One line per metric through `tracing`.
    Log {
        /// The level: error, warn, info, debug or trace (default info).
        #[serde(default = "default_level")]
        level: LogLevel,
    },
    /// statsd over UDP with DogStatsD tags, through `cadence`.
    Statsd {
        /// Where to send, `HOST:PORT`.
        address: String,
        /// Prepended to every name with a dot (`prefix.tempest_...`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// A Prometheus scrape endpoint, `/metrics` on `listen`.
    Prometheus {
        /// The address to serve on, `IP:PORT` (port 0 picks a free one).
        #[serde(default = "default_listen")]
        listen: String,
    },
    /// JSON lines appended to a file, one object per metric per flush.
    File {
        /// The file (created if missing, appended to).
        path: String,
    },
}

fn default_level() -> LogLevel {
    LogLevel::Info
}

fn default_listen() -> String {
    DEFAULT_PROMETHEUS_LISTEN.to_owned()
}

/// A `tracing` level for the log target.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    /// error
    Error,
    /// warn
    Warn,
    /// info
    Info,
    /// debug
    Debug,
    /// trace
    Trace,
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            other => {
                return Err(format!(
                    "unknown level {other:?}; expected error, warn, info, debug or trace"
                ))
            }
        })
    }
}

/// A failure to deliver a snapshot.
#[derive(Debug, thiserror::Error)]
#[error("metric target {target}: {message}")]
pub struct TargetError {
    /// The target's name.
    pub target: &'static str,
    /// What went wrong.
    pub message: String,
}

/// A bad value in a [`TargetSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TargetProblem {
    /// The key of the target's table that is wrong (`address`, `listen`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// Receives snapshots.
pub trait MetricTarget: Send {
    /// The target's name for logs.
    fn name(&self) -> &'static str;
    /// Delivers one snapshot.
    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError>;
}

impl TargetSpec {
    /// The target's kind, as written in `kind = "..."`.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetSpec::Console => "console",
            TargetSpec::Log { .. } => "log",
            TargetSpec::Statsd { .. } => "statsd",
            TargetSpec::Prometheus { .. } => "prometheus",
            TargetSpec::File { .. } => "file",
        }
    }

    /// Builds a push target; `None` for Prometheus, which is scraped from
    /// the endpoint the runtime serves.
    pub fn build(&self) -> Option<Box<dyn MetricTarget>> {
        Some(match self {
            TargetSpec::Console => Box::new(ConsoleTarget::new(std::io::stdout())),
            TargetSpec::Log { level } => Box::new(LogTarget { level: *level }),
            TargetSpec::Statsd { address, prefix } => Box::new(super::statsd::StatsdTarget::new(
                address.clone(),
                prefix.clone().unwrap_or_default(),
            )),
            TargetSpec::File { path } => Box::new(super::file::FileTarget::new(path.into())),
            TargetSpec::Prometheus { .. } => return None,
        })
    }

    /// Checks the values serde cannot: addresses that do not parse, an
    /// empty path, a prefix statsd cannot carry.
    pub fn validate(&self) -> Result<(), TargetProblem> {
        let problem = |field, message: String| Err(TargetProblem { field, message });
        match self {
            TargetSpec::Console | TargetSpec::Log { .. } => Ok(()),
            TargetSpec::Statsd { address, prefix } => {
                if let Err(e) = check_host_port(address, false) {
                    return problem(
                        "address",
                        format!("{address:?} is not a statsd address HOST:PORT ({e})"),
                    );
                }
                if let Some(p) = prefix {
                    if p.trim().is_empty() {
                        return problem(
                            "prefix",
                            "the prefix is empty; leave it out for none".into(),
                        );
                    }
                    if let Some(c) = p
                        .chars()
                        .find(|c| c.is_whitespace() || matches!(c, ':' | '|' | '@' | '#' | ','))
                    {
                        return problem(
                            "prefix",
                            format!("{p:?} contains {c:?}, which statsd cannot carry in a name"),
                        );
                    }
                }
                Ok(())
            }
            TargetSpec::Prometheus { listen } => match listen.parse::<SocketAddr>() {
                Ok(_) => Ok(()),
                Err(_) => match check_host_port(listen, true) {
                    Ok(()) => Ok(()),
                    Err(e) => problem(
                        "listen",
                        format!("{listen:?} is not an address to listen on, IP:PORT ({e})"),
                    ),
                },
            },
            TargetSpec::File { path } => {
                if path.trim().is_empty() {
                    problem("path", "the path is empty".into())
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// `HOST:PORT` with a host name or IP (IPv6 in brackets) and a port.
fn check_host_port(s: &str, port_zero_ok: bool) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok() {
        if !port_zero_ok && s.parse::<SocketAddr>().is_ok_and(|a| a.port() == 0) {
            return Err("port 0".into());
        }
        return Ok(());
    }
    let (host, port) = s.rsplit_once(':').ok_or("no port")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    if port == 0 && !port_zero_ok {
        return Err("port 0".into());
    }
    if host.is_empty() {
        return Err("no host".into());
    }
    let bad = |c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if host.contains(':') {
        return Err("an IPv6 address must be in brackets, [::1]:PORT".into());
    }
    if let Some(c) = host.chars().find(|&c| bad(c)) {
        return Err(format!("{c:?} cannot be in a host name"));
    }
    Ok(())
}

impl FromStr for TargetSpec {
    type Err = String;

    /// The command-line form, `KIND[=ARG]`: `console`, `log[=LEVEL]`,
    /// `statsd[=HOST:PORT[,PREFIX]]`, `prometheus[=IP:PORT]`, `file=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = match s.split_once('=') {
            Some((k, a)) => (k.trim(), Some(a)),
            None => (s.trim(), None),
        };
        let spec = match (kind, arg) {
            ("console", None) => TargetSpec::Console,
            ("log", None) => TargetSpec::Log {
                level: LogLevel::Info,
            },
            ("log", Some(level)) => TargetSpec::Log {
                level: level.parse()?,
            },
            ("statsd", None) => TargetSpec::Statsd {
                address: DEFAULT_STATSD_ADDRESS.to_owned(),
                prefix: None,
            },
            ("statsd", Some(a)) => match a.split_once(',') {
                Some((address, prefix)) => TargetSpec::Statsd {
                    address: address.trim().to_owned(),
                    prefix: Some(prefix.trim().to_owned()),
                },
                None => TargetSpec::Statsd {
                    address: a.trim().to_owned(),
                    prefix: None,
                },
            },
            ("prometheus", None) => TargetSpec::Prometheus {
                listen: default_listen(),
            },
            ("prometheus", Some(a)) => TargetSpec::Prometheus {
                listen: a.trim().to_owned(),
            },
            ("file", Some(path)) => TargetSpec::File {
                path: path.to_owned(),
            },
            ("file", None) => return Err("file needs a path: file=PATH".into()),
            ("console", Some(_)) => return Err("console takes no argument".into()),
            (other, _) => {
                return Err(format!(
                    "unknown metrics target {other:?}; expected console, log[=LEVEL], \
                     statsd[=HOST:PORT[,PREFIX]], prometheus[=IP:PORT] or file=PATH"
                ))
            }
        };
        spec.validate().map_err(|p| format!("{kind}: {p}"))?;
        Ok(spec)
    }
}

/// The push targets of `specs`, built (Prometheus is left out).
pub fn push_targets(specs: &[TargetSpec]) -> Vec<Box<dyn MetricTarget>> {
    specs.iter().filter_map(TargetSpec::build).collect()
}

/// A flusher thread; [`Flusher::stop`] flushes a last time and joins it.
/// Dropping it stops the thread without waiting.
pub struct Flusher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Flushes a last time and waits for the thread to end. This blocks on
    /// the targets' I/O; from async code call it through `spawn_blocking`.
    pub fn stop(mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(target: "tempest::metrics", "the metrics flusher panicked");
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

/// Starts a thread that, every `interval`, snapshots `registry` and flushes
/// the snapshot to `targets`, and once more when stopped. Without targets
/// no thread is started.
pub fn spawn_flusher(
    registry: Registry,
    mut targets: Vec<Box<dyn MetricTarget>>,
    interval: Duration,
) -> Flusher {
    if targets.is_empty() {
        return Flusher {
            stop: None,
            thread: None,
        };
    }
    let (stop, stopped) = mpsc::channel::<()>();
    let interval = interval.max(Duration::from_millis(1));
    let thread = std::thread::Builder::new()
        .name("tempest-metrics".into())
        .spawn(move || {
            let mut next = Instant::now() + interval;
            loop {
                let wait = next.saturating_duration_since(Instant::now());
                let last = match stopped.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => false,
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
                };
                flush_all(&registry, &mut targets);
                if last {
                    return;
                }
                next += interval;
                let now = Instant::now();
                if next < now {
                    // A slow target: skip the missed ticks instead of bursting.
                    next = now + interval;
                }
            }
        });
    match thread {
        Ok(thread) => Flusher {
            stop: Some(stop),
            thread: Some(thread),
        },
        Err(e) => {
            tracing::error!(target: "tempest::metrics", "cannot start the metrics flusher: {e}");
            Flusher {
                stop: None,
                thread: None,
            }
        }
    }
}

/// One snapshot to every target; each failure is logged once.
fn flush_all(registry: &Registry, targets: &mut [Box<dyn MetricTarget>]) {
    let snapshot = registry.snapshot();
    for t in targets.iter_mut() {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.flush(&snapshot)));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(target: "tempest::metrics", "{e}"),
            Err(_) => {
                tracing::error!(target: "tempest::metrics", "metric target {} panicked", t.name())
            }
        }
    }
}

/// Logs every metric through `tracing`.
pub struct LogTarget {
    level: LogLevel,
}

impl MetricTarget for LogTarget {
    fn name(&self) -> &'static str {
        "log"
    }

    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError> {
        for s in &snapshot.samples {
            let value = match &s.value {
                Value::Counter(v) => v.to_string(),
                Value::Gauge(v) => format!("{v}"),
                Value::Histogram(h) => format!(
                    "count={} p50={}us p99={}us max={}us",
                    h.count,
                    h.quantile(0.5),
                    h.quantile(0.99),
                    h.max
                ),
            };
            let (name, labels) = (s.def.name, &s.labels);
            match self.level {
                LogLevel::Error => {
                    tracing::error!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Warn => {
                    tracing::warn!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Info => {
                    tracing::info!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Debug => {
                    tracing::debug!(target: "tempest::metrics", %labels, "{name} {value}")
                }
                LogLevel::Trace => {
                    tracing::trace!(target: "tempest::metrics", %labels, "{name} {value}")
                }
            }
        }
        Ok(())
    }
}

/// Prints a compact table: the source's figures, then one row per task.
pub struct ConsoleTarget<W> {
    out: W,
    last: Option<Snapshot>,
}

impl<W: Write + Send> ConsoleTarget<W> {
    /// A console target writing to `out`.
    pub fn new(out: W) -> Self {
        ConsoleTarget { out, last: None }
    }

    /// The table for `snapshot`, with rates against the previous one.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        use super::catalog as c;
        let secs = self
            .last
            .as_ref()
            .and_then(|l| snapshot.at.duration_since(l.at).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let rate = |name: &str, labels: &[(&str, &str)]| -> f64 {
            match &self.last {
                Some(l) if secs > 0.0 => {
                    snapshot
                        .counter(name, labels)
                        .saturating_sub(l.counter(name, labels)) as f64
                        / secs
                }
                _ => 0.0,
            }
        };
        let latency = snapshot
            .histogram(c::ROOT_COMPLETE_LATENCY.name, &[])
            .cloned()
            .unwrap_or_default();
        let mut s = format!(
            "acked {} ({:.0}/s)  failed {}  timed out {}  dead {}  in flight {}  complete p50 {:.2}ms p99 {:.2}ms\n",
            snapshot.counter(c::SOURCE_ACKED.name, &[]),
            rate(c::SOURCE_ACKED.name, &[]),
            snapshot.counter(c::SOURCE_FAILED.name, &[]),
            snapshot.counter(c::SOURCE_TIMED_OUT.name, &[]),
            snapshot.counter(c::SOURCE_DEAD_LETTERED.name, &[]),
            snapshot.gauge(c::ROOTS_IN_FLIGHT.name, &[]).unwrap_or(0.0),
            latency.quantile(0.5) as f64 / 1000.0,
            latency.quantile(0.99) as f64 / 1000.0,
        );
        let mut tasks: BTreeMap<&str, ()> = BTreeMap::new();
        for sample in snapshot.find(c::TASK_MESSAGES_IN.name, &[]) {
            if let Some(t) = sample.labels.get("task") {
                tasks.insert(t, ());
            }
        }
        if !tasks.is_empty() {
            s.push_str(&format!(
                "  {:<16} {:>12} {:>10} {:>12} {:>8} {:>8} {:>12} {:>8}\n",
                "task", "in", "in/s", "out", "errors", "queued", "handle p99", "capacity"
            ));
        }
        for task in tasks.keys() {
            let l = [("task", *task)];
            let handle = snapshot
                .histogram(c::TASK_HANDLE_LATENCY.name, &l)
                .cloned()
                .unwrap_or_default();
            s.push_str(&format!(
                "  {:<16} {:>12} {:>10.0} {:>12} {:>8} {:>8.0} {:>10}us {:>8.2}\n",
                task,
                snapshot.counter(c::TASK_MESSAGES_IN.name, &l),
                rate(c::TASK_MESSAGES_IN.name, &l),
                snapshot.counter(c::TASK_MESSAGES_OUT.name, &l),
                snapshot.counter(c::TASK_ERRORS.name, &l),
                snapshot.gauge(c::TASK_QUEUE_DEPTH.name, &l).unwrap_or(0.0),
                handle.quantile(0.99),
                snapshot.gauge(c::TASK_CAPACITY.name, &l).unwrap_or(0.0),
            ));
        }
        s
    }
}

impl<W: Write + Send> MetricTarget for ConsoleTarget<W> {
    fn name(&self) -> &'static str {
        "console"
    }

    fn flush(&mut self, snapshot: &Snapshot) -> Result<(), TargetError> {
        let table = self.render(snapshot);
        self.last = Some(snapshot.clone());
        self.out
            .write_all(table.as_bytes())
            .and_then(|_| self.out.flush())
            .map_err(|e| TargetError {
                target: "console",
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{catalog as c, Labels};
    use super::*;

    #[test]
    fn console_prints_source_and_task_rows() {
        let r = Registry::new(Labels::new([("topology", "t")]));
        r.counter(&c::SOURCE_ACKED, &Labels::default()).add(42);
        r.counter(&c::TASK_MESSAGES_IN, &Labels::new([("task", "split")]))
            .add(7);
        let mut t = ConsoleTarget::new(Vec::new());
        t.flush(&r.snapshot()).unwrap();
        let out = String::from_utf8(t.out.clone()).unwrap();
        assert!(out.starts_with("acked 42 "), "{out}");
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with("split") && l.contains(" 7 ")),
            "{out}"
        );
    }

    #[test]
    fn command_line_form() {
        let ok = |s: &str| {
            s.parse::<TargetSpec>()
                .unwrap_or_else(|e| panic!("{s}: {e}"))
        };
        assert_eq!(ok("console"), TargetSpec::Console);
        assert_eq!(
            ok("log=debug"),
            TargetSpec::Log {
                level: LogLevel::Debug
            }
        );
        assert_eq!(
            ok("statsd=127.0.0.1:8125,app"),
            TargetSpec::Statsd {
                address: "127.0.0.1:8125".into(),
                prefix: Some("app".into())
            }
        );
        assert_eq!(
            ok("statsd"),
            TargetSpec::Statsd {
                address: DEFAULT_STATSD_ADDRESS.into(),
                prefix: None
            }
        );
        assert_eq!(
            ok("prometheus=127.0.0.1:0"),
            TargetSpec::Prometheus {
                listen: "127.0.0.1:0".into()
            }
        );
        assert_eq!(
            ok("prometheus"),
            TargetSpec::Prometheus {
                listen: DEFAULT_PROMETHEUS_LISTEN.into()
            }
        );
        assert_eq!(
            ok("file=/tmp/a=b.jsonl"),
            TargetSpec::File {
                path: "/tmp/a=b.jsonl".into()
            }
        );
        for (bad, says) in [
            ("graphite", "unknown metrics target"),
            ("file", "needs a path"),
            ("statsd=nohost", "not a statsd address"),
            ("statsd=h:0", "port 0"),
            ("prometheus=1.2.3.4:x", "not an address"),
            ("log=loud", "unknown level"),
        ] {
            let e = bad.parse::<TargetSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// A target that always fails.
    struct Broken;
    impl MetricTarget for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn flush(&mut self, _: &Snapshot) -> Result<(), TargetError> {
            Err(TargetError {
                target: "broken",
                message: "down".into(),
            })
        }
    }

    /// Counts its flushes.
    struct Counting(std::sync::Arc<std::sync::atomic::AtomicU64>);
    impl MetricTarget for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn flush(&mut self, s: &Snapshot) -> Result<(), TargetError> {
            assert_eq!(s.counter("tempest_source_acked", &[]), 3);
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_failing_target_does_not_stop_the_others() {
        let r = Registry::default();
        r.counter(&c::SOURCE_ACKED, &Labels::default()).add(3);
        let flushes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let targets: Vec<Box<dyn MetricTarget>> =
            vec![Box::new(Broken), Box::new(Counting(flushes.clone()))];
        let f = spawn_flusher(r, targets, Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(100));
        f.stop();
        let n = flushes.load(std::sync::atomic::Ordering::SeqCst);
        // Several ticks and the last flush at stop.
        assert!(n >= 3, "{n} flushes");
        // Nothing to flush to: no thread.
        let f = spawn_flusher(Registry::default(), Vec::new(), Duration::from_millis(10));
        assert!(f.thread.is_none());
        f.stop();
    }

    #[test]
    fn each_failing_target_is_reported_once_per_flush() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let r = Registry::default();
        r.counter(&c::SOURCE_ACKED, &Labels::default()).add(3);
        let flushes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut targets: Vec<Box<dyn MetricTarget>> = vec![
            Box::new(Broken),
            Box::new(Counting(flushes.clone())),
            Box::new(Broken),
        ];
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                flush_all(&r, &mut targets);
            }
        });
        let log = String::from_utf8(buf.0.lock().clone()).unwrap();
        assert_eq!(
            log.matches("metric target broken: down").count(),
            6,
            "{log}"
        );
        assert!(log.contains("WARN"), "{log}");
        assert_eq!(flushes.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn target_spec_parses_and_rejects_unknown_keys() {
        #[derive(Deserialize)]
        struct W {
            t: Vec<TargetSpec>,
        }
        let w: W =
            toml::from_str("t = [{ kind = \"console\" }, { kind = \"log\", level = \"debug\" }]")
                .unwrap();
        assert_eq!(
            w.t,
            vec![
                TargetSpec::Console,
                TargetSpec::Log {
                    level: LogLevel::Debug
                }
            ]
        );
        let e = toml::from_str::<W>("t = [{ kind = \"log\", levl = \"debug\" }]")
            .err()
            .unwrap();
        assert!(e.to_string().contains("levl"), "{e}");
    }
}
