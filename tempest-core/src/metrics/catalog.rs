//! Every metric Tempest emits, defined once: name, kind, labels and meaning.
//!
//! Targets (console, log, statsd, Prometheus, file) render these
//! definitions; the README's metric table is generated from the same list
//! ([`ALL`]), and a test checks that a running topology emits each of them.

/// The kind of a metric.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A monotonically increasing count.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of latencies, recorded in microseconds.
    Histogram,
}

/// One metric's definition.
#[derive(Debug, PartialEq, Eq)]
pub struct MetricDef {
    /// The metric name, `tempest_`-prefixed, snake case.
    pub name: &'static str,
    /// Its kind.
    pub kind: Kind,
    /// The labels it carries besides `topology` (and `host` where set).
    pub labels: &'static [&'static str],
    /// What it means.
    pub help: &'static str,
}

macro_rules! metrics {
    ($($id:ident: $kind:ident, $name:literal, [$($label:literal),*], $help:literal;)*) => {
        $(
            #[doc = $help]
            pub static $id: MetricDef = MetricDef {
                name: $name,
                kind: Kind::$kind,
                labels: &[$($label),*],
                help: $help,
            };
        )*
        /// Every metric definition.
        pub static ALL: &[&MetricDef] = &[$(&$id),*];
    };
}

metrics! {
    SOURCE_POLLED: Counter, "tempest_source_polled", ["source"], "Messages polled from the source (roots admitted).";
    SOURCE_ACKED: Counter, "tempest_source_acked", ["source"], "Roots whose tree completed and that were acked at the source.";
    SOURCE_FAILED: Counter, "tempest_source_failed", ["source"], "Roots whose tree had an error (each attempt counts).";
    SOURCE_TIMED_OUT: Counter, "tempest_source_timed_out", ["source"], "Roots that did not complete within message_timeout (each attempt counts).";
    SOURCE_DEAD_LETTERED: Counter, "tempest_source_dead_lettered", ["source"], "Roots handed to the source's fail after the failure policy gave up.";
    SOURCE_RETRIED: Counter, "tempest_source_retried", ["source"], "Root replays scheduled by the retry policy.";
    SOURCE_ERRORS: Counter, "tempest_source_errors", ["source"], "Errors from the source (connect, poll, ack, fail).";
    SOURCE_HEALTHY: Gauge, "tempest_source_healthy", ["source"], "1 while the source reports healthy, 0 otherwise.";
    ROOTS_IN_FLIGHT: Gauge, "tempest_roots_in_flight", ["source"], "Roots admitted and not yet completed, failed or timed out.";
    ROOT_COMPLETE_LATENCY: Histogram, "tempest_root_complete_latency", ["source"], "Time from admitting a root to acking it (microseconds).";
    ROOTS_LOST: Counter, "tempest_roots_lost", ["source"], "Roots replayed at once because a worker that held or had been sent their messages was lost (or a peer link to it broke).";
    WORKER_CONNECTIONS: Gauge, "tempest_worker_connections", [], "Task worker connections open at the topology server.";
    WORKER_REJECTED: Counter, "tempest_worker_rejected", [], "Worker connections refused at the handshake (bad version, token, task, instance or layout) or by malformed frames.";
    PEER_LINKS: Gauge, "tempest_peer_links", ["direction"], "Peer links open at a process: `out` to the task instances it sends to, `in` from those that send to it.";
    PEER_REJECTED: Counter, "tempest_peer_rejected", [], "Peer connections refused at the handshake (version, token, topology, instance, incarnation) or closed for bad frames or silence.";
    WORKER_RECONNECTS: Counter, "tempest_worker_reconnects", ["task"], "Times a task worker reconnected to its topology server.";
    TASK_MESSAGES_IN: Counter, "tempest_task_messages_in", ["task"], "Messages handed to the task's handle.";
    TASK_MESSAGES_OUT: Counter, "tempest_task_messages_out", ["task"], "Messages the task returned for downstream.";
    TASK_ERRORS: Counter, "tempest_task_errors", ["task"], "Messages whose handle returned an error or panicked.";
    TASK_PANICS: Counter, "tempest_task_panics", ["task"], "Messages whose handle panicked (also counted in errors).";
    TASK_HANDLE_LATENCY: Histogram, "tempest_task_handle_latency", ["task"], "Time in handle per message (microseconds; a batch's time spread over its messages).";
    TASK_QUEUE_DEPTH: Gauge, "tempest_task_queue_depth", ["task"], "Messages queued for the task and not yet sent to an instance (at the topology server: roots; at a worker: its output for that task).";
    TASK_BUSY: Counter, "tempest_task_busy_micros", ["task"], "Microseconds the task's instances spent in handle.";
    PIPELINE_EDGE: Gauge, "tempest_pipeline_edge", ["from", "to", "grouping"], "1 for each edge of the pipeline, set at start (how dashboards draw the DAG; `tempest_pipeline_source_edge` gives the sources' edges).";
    PIPELINE_SOURCE_EDGE: Gauge, "tempest_pipeline_source_edge", ["source", "to"], "1 for each edge from a source to a task it feeds, set at start (how dashboards draw the sources).";
    TASK_CAPACITY: Gauge, "tempest_task_capacity", ["task"], "Fraction of the last interval the task's instances were busy (Storm's capacity).";
}

#[cfg(test)]
mod tests {
    /// The README's metric table lists every metric, with its kind.
    #[test]
    fn readme_documents_every_metric() {
        let readme = include_str!("../../../README.md");
        for def in super::ALL {
            let kind = match def.kind {
                super::Kind::Counter => "counter",
                super::Kind::Gauge => "gauge",
                super::Kind::Histogram => "histogram",
            };
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", def.name)))
                .unwrap_or_else(|| panic!("README has no row for {}", def.name));
            assert!(
                row.contains(kind),
                "README row of {} does not say {kind}: {row}",
                def.name
            );
            let labels = row.split('|').nth(3).unwrap_or_default();
            for label in def.labels {
                assert!(
                    labels.contains(label),
                    "README row of {} does not list label {label}: {row}",
                    def.name
                );
            }
        }
    }
}
