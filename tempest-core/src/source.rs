//! [`Source`]: where roots come from (Storm's spout).
//!
//! A source polls a broker for batches of messages, and later hears which of
//! them completed (`ack`) and which finally failed (`fail`). The runtime owns
//! the source on one async task, so its methods take `&mut self` and may keep
//! connections and buffers without locks. No method may block the thread:
//! waiting for a broker is `await`ed.

use std::fmt;

use async_trait::async_trait;

use crate::Msg;

/// The environment variable that gives a topology server a stable identity
/// towards its brokers: the same for every incarnation of one server slot
/// of a deployment, wherever and however often it is (re)started.
///
/// The agent sets it for each topology server it launches (to the
/// process's spec id, e.g. `wc/server`, cleaned up for use as a broker-side
/// name); nothing sets it for workers, which read no source. A source with
/// a notion of consumer identity uses it as its default name, so that a
/// replacement of a killed server is the *same* consumer and takes over its
/// predecessor's in-flight entries at once: the Redis Streams source uses it
/// as its default `consumer`. Unset (standalone runs, servers started by
/// hand), sources fall back to a per-process name.
///
/// It lives here because both sides depend on `tempest-core`: the agent
/// (which sets it) and `tempest-connectors` (which reads it) do not depend
/// on each other.
pub const SOURCE_CONSUMER_ENV: &str = "TEMPEST_SOURCE_CONSUMER";

/// The name of a topology's source when it has one and does not name it
/// (`TopologyBuilder::source`, `[source]` in `Topology.toml`): the value of
/// the `source` label on its metrics.
pub const DEFAULT_SOURCE: &str = "default";

/// A source's own handle for one message, returned to it in `ack` and `fail`.
///
/// It is 128 bits so that a broker's position fits without allocating: a
/// Redis stream id (milliseconds, sequence), a JetStream sequence, a file and
/// byte offset. A source whose ids do not fit keeps a table from this token to
/// its own handle.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u128);

impl SourceId {
    /// An id from two 64-bit halves.
    pub fn from_parts(hi: u64, lo: u64) -> Self {
        SourceId((u128::from(hi) << 64) | u128::from(lo))
    }

    /// The two 64-bit halves.
    pub fn parts(self) -> (u64, u64) {
        ((self.0 >> 64) as u64, self.0 as u64)
    }
}

impl From<u64> for SourceId {
    fn from(v: u64) -> Self {
        SourceId(u128::from(v))
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (hi, lo) = self.parts();
        if hi == 0 {
            write!(f, "{lo}")
        } else {
            write!(f, "{hi}-{lo}")
        }
    }
}

/// One message polled from a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceMsg {
    /// The source's handle for acking or failing it.
    pub id: SourceId,
    /// The message that enters the pipeline as a root.
    pub msg: Msg,
}

impl SourceMsg {
    /// A polled message.
    pub fn new(id: impl Into<SourceId>, msg: impl Into<Msg>) -> Self {
        SourceMsg {
            id: id.into(),
            msg: msg.into(),
        }
    }
}

/// The answer to one [`Source::poll`].
#[derive(Debug, PartialEq, Eq)]
pub enum Polled {
    /// New messages (never empty).
    Msgs(Vec<SourceMsg>),
    /// Nothing right now; the runtime polls again after a short back-off.
    /// A source that long-polls its broker returns this when its wait ends.
    Idle,
    /// A finite source has handed out everything it has. The runtime finishes
    /// the roots in flight and stops (standalone) or keeps idling (server).
    Exhausted,
}

/// How a source sees its broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Connected and polling.
    Healthy,
    /// Not usable now (broker unreachable, reconnecting), with why.
    Unhealthy(String),
}

impl Health {
    /// True for [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// Why a root is handed back to [`Source::fail`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailReason {
    /// What went wrong (a task's error, a timeout).
    pub message: String,
    /// How many times the root was tried.
    pub attempts: u32,
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (after {} attempt(s))", self.message, self.attempts)
    }
}

/// An error from a source: what failed and whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct SourceError {
    /// Which operation failed.
    pub kind: SourceErrorKind,
    /// The broker's or the source's own description.
    pub message: String,
    /// True when the runtime should retry with back-off (a broker that is
    /// down); false when it cannot work (a stream that does not exist and
    /// may not be created).
    pub retryable: bool,
}

/// The operation that a [`SourceError`] comes from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SourceErrorKind {
    /// Connecting or reconnecting to the broker.
    Connect,
    /// Polling messages.
    Poll,
    /// Acking messages.
    Ack,
    /// Failing (nacking, dead-lettering) a message.
    Fail,
    /// The source's configuration.
    Config,
}

impl fmt::Display for SourceErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceErrorKind::Connect => "connect",
            SourceErrorKind::Poll => "poll",
            SourceErrorKind::Ack => "ack",
            SourceErrorKind::Fail => "fail",
            SourceErrorKind::Config => "source config",
        })
    }
}

impl SourceError {
    /// A transient error: the runtime retries with back-off.
    pub fn transient(kind: SourceErrorKind, message: impl fmt::Display) -> Self {
        SourceError {
            kind,
            message: message.to_string(),
            retryable: true,
        }
    }

    /// An error that retrying will not fix.
    pub fn fatal(kind: SourceErrorKind, message: impl fmt::Display) -> Self {
        SourceError {
            kind,
            message: message.to_string(),
            retryable: false,
        }
    }

    /// A configuration error.
    pub fn config(message: impl fmt::Display) -> Self {
        Self::fatal(SourceErrorKind::Config, message)
    }
}

/// A source of roots.
///
/// The runtime calls `connect` once (and again after a retryable error),
/// then loops: `poll` while fewer than `max_pending` roots are in flight,
/// `ack` with batches of completed roots, `fail` for roots the failure policy
/// gives up on, and finally `shutdown`.
///
/// ```
/// use tempest_core::{async_trait, Polled, Source, SourceError, SourceMsg};
///
/// /// Counts from 0 to `end`, then is exhausted.
/// struct Count { next: u64, end: u64, acked: u64 }
///
/// #[async_trait]
/// impl Source for Count {
///     async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
///         if self.next == self.end {
///             return Ok(Polled::Exhausted);
///         }
///         let stop = self.end.min(self.next + max as u64);
///         let msgs = (self.next..stop)
///             .map(|i| SourceMsg::new(i, i.to_string()))
///             .collect();
///         self.next = stop;
///         Ok(Polled::Msgs(msgs))
///     }
///
///     async fn ack(&mut self, ids: &[tempest_core::SourceId]) -> Result<(), SourceError> {
///         self.acked += ids.len() as u64;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Source: Send + 'static {
    /// Called once before the first `connect`, with the topology's settings,
    /// so a source can keep its broker consistent with them (a JetStream
    /// `ack_wait` longer than `message_timeout`, a batch size). An error here
    /// stops the topology before it starts.
    async fn configure(&mut self, _settings: &crate::Settings) -> Result<(), SourceError> {
        Ok(())
    }

    /// Connects to the broker. Called before the first poll and after a
    /// retryable error; must be safe to call again.
    async fn connect(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Returns up to `max` new messages, or [`Polled::Idle`] when there is
    /// nothing now. It may wait for the broker (long poll), but should come
    /// back within about a second so the runtime can ack and sweep.
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError>;

    /// Acknowledges completed roots. Ids come in batches, in no particular order.
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError>;

    /// A root that the failure policy gave up on: nack it, dead-letter it, or
    /// record it. The default does nothing, which leaves it un-acked at the
    /// broker.
    async fn fail(&mut self, _id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        Ok(())
    }

    /// A root that failed under the `none` policy: Tempest leaves it to the
    /// broker. A source may hand it back for a prompt redelivery (a JetStream
    /// nak with a delay); the default does nothing, so the broker redelivers
    /// it by its own rules (a Redis pending entry is claimed after its idle
    /// time).
    async fn release(&mut self, _id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        Ok(())
    }

    /// How the source sees its broker now.
    async fn health(&mut self) -> Health {
        Health::Healthy
    }

    /// Flushes and closes. Called once, after the last ack.
    async fn shutdown(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}

/// A source that builds itself from the `[source.config]` table of
/// `Topology.toml`.
///
/// Implementations usually deserialize a config struct marked
/// `#[serde(deny_unknown_fields)]` with [`crate::config::from_table`], so a
/// misspelt key is an error naming that key.
pub trait FromConfig: Sized {
    /// Builds the source from its table.
    fn from_config(config: &toml::Table) -> Result<Self, crate::ConfigError>;
}

#[async_trait]
impl Source for Box<dyn Source> {
    async fn configure(&mut self, settings: &crate::Settings) -> Result<(), SourceError> {
        (**self).configure(settings).await
    }
    async fn release(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        (**self).release(id, reason).await
    }
    async fn connect(&mut self) -> Result<(), SourceError> {
        (**self).connect().await
    }
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        (**self).poll(max).await
    }
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        (**self).ack(ids).await
    }
    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        (**self).fail(id, reason).await
    }
    async fn health(&mut self) -> Health {
        (**self).health().await
    }
    async fn shutdown(&mut self) -> Result<(), SourceError> {
        (**self).shutdown().await
    }
}
