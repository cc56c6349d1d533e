//! (Being written.)

use tempest_core::{async_trait, ConfigError, FromConfig, Polled, Source, SourceError, SourceId};

/// (Being written.)
pub struct JetStreamSource;

impl FromConfig for JetStreamSource {
    fn from_config(_config: &toml::Table) -> Result<Self, ConfigError> {
        Err(ConfigError::new("not yet available"))
    }
}

#[async_trait]
impl Source for JetStreamSource {
    async fn poll(&mut self, _max: usize) -> Result<Polled, SourceError> {
        Ok(Polled::Exhausted)
    }
    async fn ack(&mut self, _ids: &[SourceId]) -> Result<(), SourceError> {
        Ok(())
    }
}
