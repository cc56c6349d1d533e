//! # tempest-task
//!
//! Runs a task's code. An [`Instance`] is one instance of one task: it takes a
//! batch of [`Delivery`]s, calls [`Task::handle`] on each, and returns one
//! [`Handled`] per delivery, in order. A panic in `handle` fails that message
//! and is counted; the instance carries on (its state is whatever the
//! panicking call left).
//!
//! The standalone runtime drives instances on threads of its own; the task
//! [`worker`] process drives one from the batches its peers send it.

#![warn(missing_docs)]

pub mod worker;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use tempest_core::metrics::{catalog, Counter, Histogram, Labels, Registry};
use tempest_core::{Delivery, Handled, Task, TaskContext, TaskError};

/// The metric handles of one task (shared by its instances in a process).
#[derive(Clone)]
pub struct TaskMetrics {
    messages_in: Counter,
    messages_out: Counter,
    errors: Counter,
    panics: Counter,
    busy_micros: Counter,
    handle_latency: Histogram,
}

impl TaskMetrics {
    /// The handles for `task` in `registry`.
    pub fn new(registry: &Registry, task: &str) -> Self {
        let l = Labels::new([("task", task)]);
        TaskMetrics {
            messages_in: registry.counter(&catalog::TASK_MESSAGES_IN, &l),
            messages_out: registry.counter(&catalog::TASK_MESSAGES_OUT, &l),
            errors: registry.counter(&catalog::TASK_ERRORS, &l),
            panics: registry.counter(&catalog::TASK_PANICS, &l),
            busy_micros: registry.counter(&catalog::TASK_BUSY, &l),
            handle_latency: registry.histogram(&catalog::TASK_HANDLE_LATENCY, &l),
        }
    }
}

/// One running instance of a task.
pub struct Instance {
    task: Box<dyn Task>,
    ctx: TaskContext,
    metrics: TaskMetrics,
    started: bool,
}

impl Instance {
    /// Wraps a task instance made by the task's factory.
    pub fn new(task: Box<dyn Task>, ctx: TaskContext, metrics: TaskMetrics) -> Self {
        Instance {
            task,
            ctx,
            metrics,
            started: false,
        }
    }

    /// Where this instance runs.
    pub fn context(&self) -> &TaskContext {
        &self.ctx
    }

    /// Calls the task's `started` hook (once).
    pub fn start(&mut self) {
        if !self.started {
            self.started = true;
            let task = &mut self.task;
            let ctx = &self.ctx;
            if catch_unwind(AssertUnwindSafe(|| task.started(ctx))).is_err() {
                tracing::error!(task = %self.ctx.task, instance = self.ctx.instance, "started hook panicked");
            }
        }
    }

    /// Handles every delivery of `batch`, appending one [`Handled`] per
    /// delivery to `out`, in order.
    ///
    /// Handle latency is measured per batch and recorded as the batch's mean
    /// for each of its messages: reading the clock twice per message would
    /// cost more than many handlers do.
    pub fn run_batch(
        &mut self,
        batch: impl ExactSizeIterator<Item = Delivery>,
        out: &mut Vec<Handled>,
    ) {
        self.start();
        let n = batch.len() as u64;
        if n == 0 {
            return;
        }
        out.reserve(batch.len());
        let t0 = Instant::now();
        let (mut emitted, mut errors, mut panics) = (0u64, 0u64, 0u64);
        for d in batch {
            let task = &mut self.task;
            let result = match catch_unwind(AssertUnwindSafe(|| task.handle(d.msg))) {
                Ok(r) => r,
                Err(payload) => {
                    panics += 1;
                    Err(TaskError::new(format!(
                        "task panicked: {}",
                        panic_message(&*payload)
                    )))
                }
            };
            match &result {
                Ok(Some(v)) => emitted += v.len() as u64,
                Ok(None) => {}
                Err(_) => errors += 1,
            }
            out.push(Handled {
                root: d.root,
                edge: d.edge,
                result,
            });
        }
        let task = &mut self.task;
        let flushed = match catch_unwind(AssertUnwindSafe(|| task.flush())) {
            Ok(r) => r,
            Err(payload) => {
                panics += 1;
                Err(TaskError::new(format!(
                    "task panicked in flush: {}",
                    panic_message(&*payload)
                )))
            }
        };
        if let Err(e) = flushed {
            // Nothing of this batch may be acked: its writes are not durable.
            let start = out.len() - n as usize;
            for h in &mut out[start..] {
                if h.result.is_ok() {
                    errors += 1;
                    h.result = Err(TaskError::new(format!("flush failed: {}", e.message())));
                }
            }
        }
        let micros = t0.elapsed().as_micros() as u64;
        let m = &self.metrics;
        m.messages_in.add(n);
        m.messages_out.add(emitted);
        m.errors.add(errors);
        m.panics.add(panics);
        m.busy_micros.add(micros);
        m.handle_latency.record_n(micros / n, n);
    }

    /// Calls the task's `shutdown` hook.
    pub fn shutdown(&mut self) {
        let task = &mut self.task;
        if catch_unwind(AssertUnwindSafe(|| task.shutdown())).is_err() {
            tracing::error!(task = %self.ctx.task, instance = self.ctx.instance, "shutdown hook panicked");
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest_core::ledger::Ledger;
    use tempest_core::{Msg, TaskResult};

    #[test]
    fn panics_fail_the_message_and_the_instance_goes_on() {
        let registry = Registry::default();
        let task = |m: Msg| -> TaskResult {
            if m.payload_str() == Some("boom") {
                panic!("boom!");
            }
            Ok(Some(vec![m]))
        };
        let ctx = TaskContext {
            topology: "t".into(),
            task: "echo".into(),
            instance: 0,
            instances: 1,
        };
        let mut inst = Instance::new(Box::new(task), ctx, TaskMetrics::new(&registry, "echo"));
        let mut ledger = Ledger::new(std::time::Duration::from_secs(1));
        let batch: Vec<Delivery> = ["a", "boom", "b"]
            .into_iter()
            .map(|p| Delivery {
                root: ledger.admit((), 1, 0),
                edge: 1,
                msg: Msg::from(p),
            })
            .collect();
        let mut out = Vec::new();
        inst.run_batch(batch.into_iter(), &mut out);
        assert_eq!(out.len(), 3);
        assert!(out[0].result.is_ok() && out[2].result.is_ok());
        let err = out[1].result.clone().unwrap_err();
        assert!(err.message().contains("boom!"), "{err}");
        let s = registry.snapshot();
        assert_eq!(s.counter("tempest_task_messages_in", &[]), 3);
        assert_eq!(s.counter("tempest_task_errors", &[]), 1);
        assert_eq!(s.counter("tempest_task_panics", &[]), 1);
        assert_eq!(s.counter("tempest_task_messages_out", &[]), 2);
    }

    #[test]
    fn a_failed_flush_fails_the_whole_batch() {
        struct Unflushable(u32);
        impl Task for Unflushable {
            fn handle(&mut self, _m: Msg) -> TaskResult {
                Ok(None)
            }
            fn flush(&mut self) -> Result<(), TaskError> {
                self.0 += 1;
                if self.0 == 1 {
                    Err(TaskError::new("disk full"))
                } else {
                    Ok(())
                }
            }
        }
        let registry = Registry::default();
        let ctx = TaskContext {
            topology: "t".into(),
            task: "sink".into(),
            instance: 0,
            instances: 1,
        };
        let mut inst = Instance::new(
            Box::new(Unflushable(0)),
            ctx,
            TaskMetrics::new(&registry, "sink"),
        );
        let mut ledger = Ledger::new(std::time::Duration::from_secs(1));
        let batch = |ledger: &mut Ledger<()>| -> Vec<Delivery> {
            (0..3)
                .map(|_| Delivery {
                    root: ledger.admit((), 1, 0),
                    edge: 1,
                    msg: Msg::from("x"),
                })
                .collect()
        };
        let mut out = Vec::new();
        inst.run_batch(batch(&mut ledger).into_iter(), &mut out);
        assert_eq!(out.len(), 3);
        for h in &out {
            let e = h.result.clone().unwrap_err();
            assert!(e.message().contains("flush failed: disk full"), "{e}");
        }
        out.clear();
        inst.run_batch(batch(&mut ledger).into_iter(), &mut out);
        assert!(out.iter().all(|h| h.result.is_ok()));
        assert_eq!(registry.snapshot().counter("tempest_task_errors", &[]), 3);
    }
}
