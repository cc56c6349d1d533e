//! [`Task`]: the user's code that handles messages (Storm's bolt).

use crate::Msg;

/// What a task returns for one message.
///
/// - `Ok(None)`: the message is done; nothing goes downstream.
/// - `Ok(Some(msgs))`: send these messages along the task's outgoing edges.
/// - `Err(e)`: this message failed; its root goes to the failure policy.
pub type TaskResult = Result<Option<Vec<Msg>>, TaskError>;

/// Why a task could not handle a message.
///
/// The `retryable` flag tells the failure policy whether replaying the root can
/// help (a timeout talking to a database) or not (a payload that cannot parse).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    message: String,
    retryable: bool,
}

impl TaskError {
    /// A failure that a replay may fix.
    pub fn new(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that no replay will fix: the root is dead-lettered at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            retryable: false,
        }
    }

    /// The reason given by the task.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether replaying the root may help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl From<String> for TaskError {
    fn from(s: String) -> Self {
        TaskError::new(s)
    }
}

impl From<&str> for TaskError {
    fn from(s: &str) -> Self {
        TaskError::new(s)
    }
}

/// Where a task instance runs: handed to [`Task::started`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskContext {
    /// The topology's name.
    pub topology: String,
    /// The task's name in the pipeline.
    pub task: String,
    /// This instance's index, `0..instances`.
    pub instance: u32,
    /// How many instances of this task run.
    pub instances: u32,
}

/// A step of the pipeline. Each instance of a task handles one message at a
/// time, so a task may keep state in `self` (key grouping sends every message
/// with the same key to the same instance).
///
/// ```
/// use tempest_core::{Msg, Task, TaskResult};
///
/// /// Splits a sentence into words, keyed by the word for a counting task.
/// struct Split;
///
/// impl Task for Split {
///     fn handle(&mut self, msg: Msg) -> TaskResult {
///         let words = msg
///             .payload_str()
///             .ok_or("sentence is not UTF-8")?
///             .split_whitespace()
///             .map(|w| Msg::keyed_by_payload(w.to_owned()))
///             .collect();
///         Ok(Some(words))
///     }
/// }
///
/// let out = Split.handle(Msg::from("the cow")).unwrap().unwrap();
/// assert_eq!(out.len(), 2);
/// ```
pub trait Task: Send + 'static {
    /// Handles one message. A panic here fails the message (and is counted);
    /// the instance keeps running.
    fn handle(&mut self, msg: Msg) -> TaskResult;

    /// Called after each batch of messages, before their results go back
    /// to the topology server. A task that writes to an output buffers in
    /// `handle` and makes the writes durable here, so nothing is acked before
    /// it is written. An error fails every message of the batch.
    fn flush(&mut self) -> Result<(), TaskError> {
        Ok(())
    }

    /// Called once before the first message.
    fn started(&mut self, _ctx: &TaskContext) {}

    /// Called once when the instance stops, after its last message.
    fn shutdown(&mut self) {}
}

impl<F> Task for F
where
    F: FnMut(Msg) -> TaskResult + Send + 'static,
{
    fn handle(&mut self, msg: Msg) -> TaskResult {
        self(msg)
    }
}

/// Makes a task instance; a pipeline calls it once per instance.
pub type TaskFactory = std::sync::Arc<dyn Fn() -> Box<dyn Task> + Send + Sync>;
