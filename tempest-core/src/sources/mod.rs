//! Built-in sources. (Stub.)

use crate::topology::SourceKinds;

/// Registers the built-in source kinds.
pub fn register_builtin(_kinds: &mut SourceKinds) {}

/// A fixed list of messages.
pub struct MemorySource;

impl MemorySource {
    /// A source of these messages.
    pub fn new<M: Into<crate::Msg>>(_msgs: impl IntoIterator<Item = M>) -> Self {
        MemorySource
    }
}

#[crate::async_trait]
impl crate::Source for MemorySource {
    async fn poll(&mut self, _max: usize) -> Result<crate::Polled, crate::SourceError> {
        Ok(crate::Polled::Exhausted)
    }
    async fn ack(&mut self, _ids: &[crate::SourceId]) -> Result<(), crate::SourceError> {
        Ok(())
    }
}
