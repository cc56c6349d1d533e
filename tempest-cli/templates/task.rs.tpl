//! The `{{task}}` task.

use tempest::{Msg, Task, TaskResult};

/// Handles each message {{from}} and passes it on unchanged: replace
/// `handle` with what the task does. Fields added here are the state of one
/// instance (each worker has its own; key grouping on the edge into this
/// task keeps equal keys on one instance).
#[derive(Default)]
pub struct {{type}};

impl Task for {{type}} {
    fn handle(&mut self, msg: Msg) -> TaskResult {
        // Ok(Some(msgs)): send these downstream; Ok(None): done;
        // Err(..): this message failed (Topology.toml's [failure] decides).
        Ok(Some(vec![msg]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_each_message_on() {
        let mut task = {{type}}::default();
        let out = task.handle(Msg::new("hello")).unwrap().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload_str(), Some("hello"));
    }
}
