//! The `{{source}}` source kind: select it in Topology.toml with
//!
//! ```toml
//! [source]
//! kind = "{{source}}"
//!
//! [source.config]
//! count = 100
//! ```

use tempest::{
    async_trait, ConfigError, FromConfig, Polled, Source, SourceError, SourceId, SourceMsg,
};

/// Emits `count` numbered messages, then is exhausted. A skeleton for a
/// broker's source: `connect` opens the connection, `poll` asks the broker
/// for up to `max` messages, `ack` tells it which roots are done (their
/// whole tree of work completed), `fail` which ones the failure policy gave
/// up on.
pub struct {{type}} {
    next: u64,
    count: u64,
}

impl {{type}} {
    /// A source of `count` messages.
    pub fn new(count: u64) -> Self {
        {{type}} { next: 0, count }
    }
}

impl FromConfig for {{type}} {
    /// Reads `[source.config]`; an unknown key or a bad value is an error
    /// naming the key (Topology.toml reports it with its line).
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let mut count = 100;
        for (key, value) in config {
            match key.as_str() {
                "count" => {
                    count = value
                        .as_integer()
                        .and_then(|n| u64::try_from(n).ok())
                        .ok_or_else(|| {
                            ConfigError::at_key("count", "must be a whole number, at least 0")
                        })?;
                }
                _ => {
                    return Err(ConfigError::at_key(
                        key.as_str(),
                        "unknown key; the keys are: count",
                    ))
                }
            }
        }
        Ok({{type}}::new(count))
    }
}

#[async_trait]
impl Source for {{type}} {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        if self.next >= self.count {
            return Ok(Polled::Exhausted);
        }
        let end = self.count.min(self.next.saturating_add(max as u64));
        let msgs = (self.next..end)
            .map(|i| SourceMsg::new(i, format!("{{source}} message {i}")))
            .collect();
        self.next = end;
        Ok(Polled::Msgs(msgs))
    }

    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        // A broker's source acknowledges these ids at the broker here.
        let _ = ids;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest::testing::TestRuntime;
    use tempest::{Msg, Pipeline, TaskResult, Topology};

    #[test]
    fn every_message_is_polled_and_acked() {
        let topology = Topology::builder("{{source}}-test")
            .source({{type}}::new(10))
            .pipeline(Pipeline::new().task("sink", || |_m: Msg| -> TaskResult { Ok(None) }))
            .build()
            .unwrap();
        let report = TestRuntime::new(topology).run().unwrap();
        assert_eq!(report.outcomes.len(), 10);
        assert!(report.all_acked(), "{:?}", report.outcomes);
    }

    #[test]
    fn reads_its_config_and_refuses_unknown_keys() {
        let good: toml::Table = "count = 3".parse().unwrap();
        assert!({{type}}::from_config(&good).is_ok());
        let bad: toml::Table = "cont = 3".parse().unwrap();
        let err = {{type}}::from_config(&bad).err().unwrap();
        assert_eq!(err.key.as_deref(), Some("cont"));
    }
}
