//! The hub: the standalone runtime's in-process routing.
//!
//! The hub owns the [`Roots`] and one queue set per task. In-process task
//! instances call [`Hub::exchange`] to hand back what they handled and take
//! their next batch; what they emitted is routed by [`route`] (the rule every
//! runtime shares) into the queues of the downstream tasks, and each handled
//! message's ack report goes straight into the ledger. It does no I/O and
//! never waits: callers hold it behind a lock for the length of one batch
//! and do their waiting outside. (A topology server has no hub: its workers
//! route among themselves.)
//!
//! Queues: each task has a shared queue (shuffle-grouped input, which any
//! instance may take) and one queue per instance (key- and all-grouped input,
//! addressed to that instance). An instance drains its own queue first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use tempest_core::metrics::{catalog, Gauge, Labels, Registry};
use tempest_core::pipeline::{Dag, TaskIdx};
use tempest_core::route::{route, Target};
use tempest_core::{Delivery, Handled, Msg, Settings};

use crate::roots::{Admission, Roots, SourceIdx};
pub use crate::roots::{FailAction, RootEvent, SourceWork};

struct TaskQueue {
    shared: VecDeque<Delivery>,
    routed: Vec<VecDeque<Delivery>>,
    wake: Vec<Arc<Notify>>,
    idle: Vec<bool>,
    depth: Gauge,
}

impl TaskQueue {
    fn len(&self) -> usize {
        self.shared.len() + self.routed.iter().map(VecDeque::len).sum::<usize>()
    }

    fn wake(&mut self, instance: usize) {
        if std::mem::take(&mut self.idle[instance]) {
            self.wake[instance].notify_one();
        }
    }

    fn wake_all(&mut self) {
        for i in 0..self.idle.len() {
            self.wake(i);
        }
    }

    fn place(&mut self, target: Target, d: Delivery) {
        match target {
            Target::Any => {
                self.shared.push_back(d);
                if let Some(i) = self.idle.iter().position(|&idle| idle) {
                    self.wake(i);
                }
            }
            Target::Instance(i) => {
                self.routed[i as usize].push_back(d);
                self.wake(i as usize);
            }
        }
    }
}

/// Sets `tempest_pipeline_edge` to 1 for every edge of `dag`, and
/// `tempest_pipeline_source_edge` for every edge from a source: how
/// dashboards draw the DAG.
pub fn register_edges(dag: &Dag, registry: &Registry) {
    for s in dag.sources() {
        for &t in &s.feeds {
            registry
                .gauge(
                    &catalog::PIPELINE_SOURCE_EDGE,
                    &Labels::new([
                        ("source", s.name.as_str()),
                        ("to", dag.task(t).name.as_str()),
                    ]),
                )
                .set(1.0);
        }
    }
    for (_, t) in dag.tasks() {
        for e in &t.edges {
            let grouping = e.grouping.to_string();
            registry
                .gauge(
                    &catalog::PIPELINE_EDGE,
                    &Labels::new([
                        ("from", t.name.as_str()),
                        ("to", dag.task(e.to).name.as_str()),
                        ("grouping", grouping.as_str()),
                    ]),
                )
                .set(1.0);
        }
    }
}

/// The hub. See the module docs.
pub struct Hub {
    dag: Arc<Dag>,
    roots: Roots,
    queues: Vec<TaskQueue>,
    sink_outputs: Option<Vec<Vec<Msg>>>,
}

impl Hub {
    /// A hub for `dag` with `settings`, recording metrics in `registry`.
    pub fn new(dag: Arc<Dag>, settings: &Settings, registry: &Registry) -> Self {
        register_edges(&dag, registry);
        let queues = dag
            .tasks()
            .map(|(_, t)| {
                let n = t.workers as usize;
                TaskQueue {
                    shared: VecDeque::new(),
                    routed: (0..n).map(|_| VecDeque::new()).collect(),
                    wake: (0..n).map(|_| Arc::new(Notify::new())).collect(),
                    idle: vec![false; n],
                    depth: registry.gauge(
                        &catalog::TASK_QUEUE_DEPTH,
                        &Labels::new([("task", t.name.as_str())]),
                    ),
                }
            })
            .collect();
        Hub {
            roots: Roots::new(settings, registry, false, dag.sources()),
            queues,
            sink_outputs: None,
            dag,
        }
    }

    /// Records every root's end in [`Hub::take_events`] (for tests).
    pub fn record_events(&mut self) {
        self.roots.record_events();
    }

    /// Keeps what tasks without outgoing edges emit, by task (for tests).
    pub fn capture_sink_outputs(&mut self) {
        self.sink_outputs = Some(vec![Vec::new(); self.dag.task_count()]);
    }

    /// The DAG.
    pub fn dag(&self) -> &Arc<Dag> {
        &self.dag
    }

    /// The notifier an instance waits on when [`Hub::exchange`] had nothing.
    pub fn waker(&self, task: TaskIdx, instance: u32) -> Arc<Notify> {
        self.queues[task.get()].wake[instance as usize].clone()
    }

    /// Wakes every waiting instance (at shutdown).
    pub fn wake_all(&mut self) {
        for q in &mut self.queues {
            for w in &q.wake {
                w.notify_one();
            }
            q.idle.iter_mut().for_each(|i| *i = false);
        }
    }

    /// The notifier the driver of source `src` waits on.
    pub fn driver_waker(&self, src: SourceIdx) -> Arc<Notify> {
        self.roots.driver_waker(src)
    }

    /// Roots in flight, replays waiting included: what `max_pending` caps.
    pub fn in_flight(&self) -> usize {
        self.roots.in_flight()
    }

    /// Settles what an instance of `task` handled, then moves up to `max`
    /// deliveries for that instance into `batch`. When nothing is queued for
    /// it, the instance is marked idle and its [`Hub::waker`] fires when work
    /// arrives.
    pub fn exchange(
        &mut self,
        task: TaskIdx,
        instance: u32,
        handled: &mut Vec<Handled>,
        max: usize,
        batch: &mut Vec<Delivery>,
    ) {
        if !handled.is_empty() {
            self.settle(task, handled);
        }
        let roots = &self.roots;
        let q = &mut self.queues[task.get()];
        let i = instance as usize;
        while batch.len() < max {
            let Some(d) = q.routed[i].pop_front().or_else(|| q.shared.pop_front()) else {
                break;
            };
            // Work of a root that already failed or timed out is dropped here.
            if roots.is_live(d.root) {
                batch.push(d);
            }
        }
        if batch.is_empty() {
            q.idle[i] = true;
        } else if !q.shared.is_empty() {
            // More shuffle work than this instance took: let an idle sibling help.
            if let Some(j) = q.idle.iter().position(|&idle| idle) {
                q.wake(j);
            }
        }
    }

    /// Settles handled messages of `task`: routes outputs, applies each
    /// message's ack report, and hands failures to the policy.
    pub fn settle(&mut self, task: TaskIdx, handled: &mut Vec<Handled>) {
        let now = self.roots.now();
        let Hub {
            dag,
            roots,
            queues,
            sink_outputs,
        } = self;
        let sink = dag.task(task).edges.is_empty();
        let mut completed = false;
        for Handled { root, edge, result } in handled.drain(..) {
            if !roots.is_live(root) {
                continue;
            }
            match result {
                Ok(out) => {
                    let out = out.unwrap_or_default();
                    let children = if sink {
                        if let Some(sinks) = sink_outputs {
                            sinks[task.get()].extend(out);
                        }
                        0
                    } else {
                        let (ids, queues) = (roots.ids(), &mut *queues);
                        route(
                            dag,
                            task,
                            root,
                            out,
                            ids,
                            |t| dag.task(t).workers,
                            |t, target, d| queues[t.get()].place(target, d),
                        )
                    };
                    completed |= roots.ack(root, edge ^ children, 0, now);
                }
                Err(e) => {
                    roots.fail_root(root, &e);
                }
            }
        }
        if completed {
            roots.wake_driver();
        }
    }

    /// Takes the acks and fails gathered for source `src`.
    pub fn take_source_work(&mut self, src: SourceIdx) -> SourceWork {
        self.roots.take_source_work(src)
    }

    /// Takes the root events recorded so far.
    pub fn take_events(&mut self) -> Vec<RootEvent> {
        self.roots.take_events()
    }

    /// Takes the captured outputs of sink tasks, by task name.
    pub fn take_sink_outputs(&mut self) -> Vec<(String, Vec<Msg>)> {
        let Some(sinks) = &mut self.sink_outputs else {
            return Vec::new();
        };
        self.dag
            .tasks()
            .zip(sinks.iter_mut())
            .map(|((_, t), out)| (t.name.clone(), std::mem::take(out)))
            .collect()
    }
}

impl Admission for Hub {
    fn roots(&mut self) -> &mut Roots {
        &mut self.roots
    }

    fn dispatch(&mut self) {
        let queues = &mut self.queues;
        for (task, d) in self.roots.drain_admitted() {
            queues[task.get()].shared.push_back(d);
        }
        for &task in self.dag.entries() {
            let q = &mut queues[task.get()];
            if !q.shared.is_empty() {
                q.wake_all();
            }
        }
    }

    fn sweep(&mut self) -> Duration {
        let next = self.roots.sweep();
        if self.roots.has_admitted() {
            self.dispatch();
        }
        for q in &self.queues {
            q.depth.set(q.len() as f64);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_core::{Pipeline, SourceId, SourceMsg, TaskError, TaskResult};

    fn hub() -> Hub {
        let dag = Pipeline::new()
            .task("a", || {
                |m: Msg| -> TaskResult { Ok(Some(vec![m.clone(), m])) }
            })
            .task_with_workers("b", 2, || |_m: Msg| -> TaskResult { Ok(None) })
            .edge("a", "b")
            .validate()
            .unwrap();
        let mut hub = Hub::new(Arc::new(dag), &Settings::new("h"), &Registry::default());
        hub.record_events();
        hub
    }

    fn handled(batch: &[Delivery], result: impl Fn(&Delivery) -> TaskResult) -> Vec<Handled> {
        batch
            .iter()
            .map(|d| Handled {
                root: d.root,
                edge: d.edge,
                result: result(d),
            })
            .collect()
    }

    #[test]
    fn a_root_is_acked_once_its_whole_tree_is_handled() {
        let mut h = hub();
        let (a, b) = (TaskIdx(0), TaskIdx(1));
        h.admit(0, vec![SourceMsg::new(1u64, "x")]);
        let mut batch = Vec::new();
        h.exchange(a, 0, &mut Vec::new(), 10, &mut batch);
        assert_eq!(batch.len(), 1);
        let mut done = handled(&batch, |d| Ok(Some(vec![d.msg.clone(), d.msg.clone()])));
        batch.clear();
        h.exchange(a, 0, &mut done, 10, &mut batch);
        assert!(batch.is_empty());
        // Two children, shuffled: instance 1 takes both.
        h.exchange(b, 1, &mut Vec::new(), 10, &mut batch);
        assert_eq!(batch.len(), 2);
        let mut first = handled(&batch[..1], |_| Ok(None));
        h.exchange(b, 1, &mut first, 0, &mut Vec::new());
        assert!(
            h.take_source_work(0).acks.is_empty(),
            "one child still open"
        );
        let mut second = handled(&batch[1..], |_| Ok(None));
        h.exchange(b, 1, &mut second, 0, &mut Vec::new());
        assert_eq!(h.take_source_work(0).acks, [SourceId::from(1u64)]);
        assert_eq!(h.in_flight(), 0);
    }

    #[test]
    fn work_of_a_failed_root_is_dropped() {
        let mut h = hub();
        let (a, b) = (TaskIdx(0), TaskIdx(1));
        h.admit(
            0,
            vec![SourceMsg::new(1u64, "x"), SourceMsg::new(2u64, "y")],
        );
        let mut batch = Vec::new();
        h.exchange(a, 0, &mut Vec::new(), 10, &mut batch);
        let mut done = handled(&batch, |d| Ok(Some(vec![d.msg.clone()])));
        h.exchange(a, 0, &mut done, 0, &mut Vec::new());
        let mut kids = Vec::new();
        h.exchange(b, 0, &mut Vec::new(), 1, &mut kids);
        let mut failed = handled(&kids, |_| Err(TaskError::permanent("no")));
        h.exchange(b, 0, &mut failed, 0, &mut Vec::new());
        // The other root's child is still there; nothing of the failed one is.
        let mut rest = Vec::new();
        h.exchange(b, 1, &mut Vec::new(), 10, &mut rest);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].root, batch[1].root);
        // Best effort (the default policy) acks the failed root anyway.
        assert_eq!(h.take_source_work(0).acks, [SourceId::from(1u64)]);
        let ev = h.take_events();
        assert!(
            matches!(
                &ev[..],
                [RootEvent::Failed {
                    action: FailAction::AckedAnyway,
                    ..
                }]
            ),
            "{ev:?}"
        );
    }
}
