//! [`MemorySource`]: a fixed list of messages, for tests and examples.

use std::sync::Arc;

use parking_lot::Mutex;
use serde::Deserialize;

use crate::source::{FailReason, FromConfig, Polled, Source, SourceError, SourceErrorKind};
use crate::source::{SourceId, SourceMsg};
use crate::sources::SourceStats;
use crate::{ConfigError, Msg};

/// A fixed list of messages, handed out in order, then [`Polled::Exhausted`].
///
/// The id of a message is its index in the list. What happens to each one
/// is recorded in a [`MemoryLog`], which a test keeps while the runtime owns
/// the source.
///
/// ```
/// use tempest_core::{Polled, Source, SourceId};
/// use tempest_core::sources::MemorySource;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut source = MemorySource::new(["a", "b", "c"]);
/// let log = source.log();
/// let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else { panic!() };
/// assert_eq!(msgs.len(), 3);
/// assert_eq!(source.poll(10).await.unwrap(), Polled::Exhausted);
/// source.ack(&[SourceId::from(2), SourceId::from(0)]).await.unwrap();
/// assert_eq!(log.acked(), [0, 2]);
/// # });
/// ```
///
/// In `Topology.toml`:
///
/// ```toml
/// [source]
/// kind = "memory"
/// [source.config]
/// messages = ["the cow jumped over the moon", "an apple a day"]
/// ```
pub struct MemorySource {
    msgs: Vec<Msg>,
    next: usize,
    log: MemoryLog,
    stats: SourceStats,
}

impl MemorySource {
    /// A source of these messages.
    pub fn new<M: Into<Msg>>(msgs: impl IntoIterator<Item = M>) -> Self {
        let msgs: Vec<Msg> = msgs.into_iter().map(Into::into).collect();
        MemorySource {
            log: MemoryLog::new(msgs.len()),
            msgs,
            next: 0,
            stats: SourceStats::new(),
        }
    }

    /// The record of acks and failures (a shared handle).
    pub fn log(&self) -> MemoryLog {
        self.log.clone()
    }

    /// The message counters (a shared handle).
    pub fn stats(&self) -> SourceStats {
        self.stats.clone()
    }

    /// The number of messages in the list.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// True when the list is empty.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }
}

/// What happened to each message of a [`MemorySource`].
///
/// A cheap handle: clones share one log.
#[derive(Clone, Debug)]
pub struct MemoryLog {
    inner: Arc<Mutex<LogInner>>,
}

#[derive(Debug)]
struct LogInner {
    /// Acks per message index.
    acks: Vec<u32>,
    /// Failures in the order they came.
    failed: Vec<(u64, FailReason)>,
}

impl MemoryLog {
    fn new(len: usize) -> Self {
        MemoryLog {
            inner: Arc::new(Mutex::new(LogInner {
                acks: vec![0; len],
                failed: Vec::new(),
            })),
        }
    }

    /// The indices acked at least once, ascending.
    pub fn acked(&self) -> Vec<u64> {
        let inner = self.inner.lock();
        (0..inner.acks.len() as u64)
            .filter(|&i| inner.acks[i as usize] > 0)
            .collect()
    }

    /// The failed indices with their reasons, in the order they failed.
    pub fn failed(&self) -> Vec<(u64, FailReason)> {
        self.inner.lock().failed.clone()
    }

    /// All acks received, repeated acks of one index included: it equals
    /// `acked().len()` exactly when no message was acked twice.
    pub fn ack_count(&self) -> usize {
        self.inner.lock().acks.iter().map(|&n| n as usize).sum()
    }

    /// How many times message `index` was acked (more than 1 is a double ack).
    pub fn times_acked(&self, index: u64) -> usize {
        let inner = self.inner.lock();
        usize::try_from(index)
            .ok()
            .and_then(|i| inner.acks.get(i))
            .map_or(0, |&n| n as usize)
    }
}

/// The `[source.config]` of kind `"memory"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryConfig {
    messages: Vec<String>,
}

impl FromConfig for MemorySource {
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let config: MemoryConfig = crate::config::from_table(config)?;
        Ok(MemorySource::new(config.messages))
    }
}

#[crate::async_trait]
impl Source for MemorySource {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        let end = self.msgs.len().min(self.next.saturating_add(max));
        if self.next >= end {
            return Ok(if self.next >= self.msgs.len() {
                Polled::Exhausted
            } else {
                Polled::Idle
            });
        }
        let msgs: Vec<SourceMsg> = (self.next..end)
            .map(|i| SourceMsg::new(i as u64, self.msgs[i].clone()))
            .collect();
        self.next = end;
        self.stats.record_emitted(msgs.len());
        Ok(Polled::Msgs(msgs))
    }

    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.stats.record_acked(ids);
        let mut log = self.log.inner.lock();
        let mut unknown = Vec::new();
        for &id in ids {
            match self.index(id) {
                Some(i) => log.acks[i] += 1,
                None => unknown.push(id),
            }
        }
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(SourceError::fatal(
                SourceErrorKind::Ack,
                format!("acked ids never handed out: {unknown:?}"),
            ))
        }
    }

    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        let Some(i) = self.index(id) else {
            return Err(SourceError::fatal(
                SourceErrorKind::Fail,
                format!("failed id {id} was never handed out"),
            ));
        };
        self.stats.record_failed();
        self.log
            .inner
            .lock()
            .failed
            .push((i as u64, reason.clone()));
        Ok(())
    }
}

impl MemorySource {
    /// The index of a handed-out message's id.
    fn index(&self, id: SourceId) -> Option<usize> {
        usize::try_from(id.0).ok().filter(|&i| i < self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<SourceId> {
        v.iter().map(|&i| SourceId::from(i)).collect()
    }

    #[tokio::test]
    async fn hands_out_all_in_batches_then_exhausted() {
        let mut source = MemorySource::new(["a", "b", "c", "d", "e"]);
        let mut seen = Vec::new();
        loop {
            match source.poll(2).await.unwrap() {
                Polled::Msgs(msgs) => {
                    assert!(!msgs.is_empty() && msgs.len() <= 2);
                    seen.extend(msgs);
                }
                Polled::Exhausted => break,
                Polled::Idle => panic!("a memory source is never idle"),
            }
        }
        assert_eq!(seen.len(), 5);
        for (i, m) in seen.iter().enumerate() {
            assert_eq!(m.id, SourceId::from(i as u64));
            assert_eq!(m.msg.payload_str(), Some(["a", "b", "c", "d", "e"][i]));
        }
        assert_eq!(source.poll(2).await.unwrap(), Polled::Exhausted);
        assert_eq!(source.stats().emitted(), 5);
    }

    #[tokio::test]
    async fn empty_source_is_exhausted() {
        let mut source = MemorySource::new(Vec::<Msg>::new());
        assert!(source.is_empty());
        assert_eq!(source.poll(8).await.unwrap(), Polled::Exhausted);
    }

    #[tokio::test]
    async fn keeps_keys() {
        let mut source = MemorySource::new([Msg::new("x").with_key("k")]);
        let Polled::Msgs(msgs) = source.poll(1).await.unwrap() else {
            panic!("expected a message");
        };
        assert_eq!(msgs[0].msg.key().map(|k| &k[..]), Some(&b"k"[..]));
    }

    #[tokio::test]
    async fn records_acks_and_failures() {
        let mut source = MemorySource::new(["a", "b", "c", "d"]);
        let log = source.log();
        source.poll(4).await.unwrap();
        source.ack(&ids(&[3, 0])).await.unwrap();
        source.ack(&ids(&[3])).await.unwrap();
        let reason = FailReason {
            message: "boom".into(),
            attempts: 3,
        };
        source.fail(SourceId::from(1), &reason).await.unwrap();

        assert_eq!(log.acked(), [0, 3]);
        assert_eq!(log.ack_count(), 3);
        assert_eq!(log.times_acked(3), 2);
        assert_eq!(log.times_acked(0), 1);
        assert_eq!(log.times_acked(2), 0);
        assert_eq!(log.times_acked(99), 0);
        assert_eq!(log.failed(), [(1, reason)]);
        let stats = source.stats();
        assert_eq!((stats.acked(), stats.failed()), (3, 1));
    }

    #[tokio::test]
    async fn acking_unknown_ids_is_an_error() {
        let mut source = MemorySource::new(["a", "b"]);
        source.poll(1).await.unwrap();
        // Id 1 exists but was not handed out yet.
        let err = source.ack(&ids(&[0, 1])).await.unwrap_err();
        assert_eq!(err.kind, SourceErrorKind::Ack);
        assert_eq!(source.log().acked(), [0]);
        let reason = FailReason {
            message: "x".into(),
            attempts: 1,
        };
        let err = source.fail(SourceId::from(7), &reason).await.unwrap_err();
        assert_eq!(err.kind, SourceErrorKind::Fail);
    }

    #[tokio::test]
    async fn from_config() {
        let table: toml::Table = toml::from_str(r#"messages = ["a", "b"]"#).unwrap();
        let mut source = MemorySource::from_config(&table).unwrap();
        let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else {
            panic!("expected messages");
        };
        let payloads: Vec<_> = msgs.iter().map(|m| m.msg.payload_str().unwrap()).collect();
        assert_eq!(payloads, ["a", "b"]);
    }

    #[test]
    fn config_errors_name_the_key() {
        let table: toml::Table = toml::from_str(
            r#"messages = ["a"]
mesages = ["b"]"#,
        )
        .unwrap();
        let err = MemorySource::from_config(&table).err().unwrap();
        assert!(err.to_string().contains("mesages"), "{err}");

        let err = MemorySource::from_config(&toml::Table::new())
            .err()
            .unwrap();
        assert!(err.to_string().contains("messages"), "{err}");
    }

    #[test]
    fn registered_as_memory() {
        let mut kinds = crate::SourceKinds::default();
        crate::sources::register_builtin(&mut kinds);
        let table: toml::Table = toml::from_str(r#"messages = ["a"]"#).unwrap();
        assert!(kinds.build("memory", &table).unwrap().is_ok());
    }
}
