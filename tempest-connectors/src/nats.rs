//! [`JetStreamSource`]: a durable NATS JetStream pull consumer as a Tempest
//! source.
//!
//! The source connects to NATS, gets (or creates) a stream and a durable pull
//! consumer with explicit acks, and pulls batches from it. Every message is a
//! root whose [`SourceId`] is its **stream sequence**; the source keeps the
//! message's ack handle until Tempest settles the root:
//!
//! | Tempest                                   | JetStream                                   |
//! |-------------------------------------------|---------------------------------------------|
//! | tree complete (`ack`)                     | `+ACK`, confirmed by the server (double ack) |
//! | retry policy gave up (`fail`, dead letter) | `+TERM`: never redelivered; logged with the reason |
//! | `none` policy (`release`)                 | `-NAK` with `nak_delay_ms`: redelivered after the delay |
//! | root still in flight                      | `+WPI` progress before `ack_wait` runs out   |
//! | topology server gone                      | redelivered after `ack_wait` (at-least-once) |
//!
//! A message's payload is the NATS payload; its key (for key grouping) is the
//! value of the `Tempest-Key` header when there is one (header names are
//! case-sensitive), else none. The subject is not used as the key: streams
//! usually carry many keys on one subject, and a header lets the producer
//! choose.
//!
//! # `ack_wait` and `message_timeout`
//!
//! Tempest must time a root out (and apply its failure policy) before
//! JetStream redelivers it, so the consumer's `ack_wait` must be longer than
//! the topology's `message_timeout`. By default it is
//! `2 × message_timeout + 1 s`; an explicit `ack_wait_ms` not above
//! `message_timeout` is refused by [`Source::configure`] with an error naming
//! `ack_wait_ms`. While a root is in flight (replays of the retry policy
//! included) the source tells JetStream it is still working on it, so only a
//! topology server that is gone or cut off lets `ack_wait` run out.
//!
//! # Reconnects
//!
//! The NATS client reconnects on its own. While it is disconnected, `poll`
//! returns a retryable error (the runtime backs off and calls `connect`,
//! which waits for the client). After a reconnect the consumer handle is
//! re-created (and the stream and consumer too if a broker lost them), and
//! the ack handles of messages pulled before it are dropped: the broker
//! redelivers those messages after `ack_wait`, and Tempest's later acks of
//! them are ignored. Nothing is lost; some messages may be handled twice.
//!
//! # `Topology.toml`
//!
//! ```toml
//! [source]
//! kind = "nats"                 # registered by tempest_connectors::register
//! [source.config]
//! url = "nats://127.0.0.1:4222" # required; several servers: "nats://a:4222,nats://b:4222"
//! stream = "ORDERS"             # required; created if missing (file storage)
//! subjects = ["orders.>"]       # the subjects of a created stream (default ["ORDERS.>"])
//! consumer = "tempest"          # the durable consumer's name
//! batch_size = 512              # the most messages one pull asks for
//! expires_ms = 100              # how long a pull waits for messages (1..=1000)
//! ack_wait_ms = 61000           # default 2 × message_timeout + 1 s
//! max_deliver = 10              # deliveries per message at most (default unlimited)
//! max_ack_pending = 10000       # un-acked messages at most (default: max_pending)
//! nak_delay_ms = 1000           # redelivery delay of a message released by the none policy
//! deliver_policy = "all"        # "all": from the start of the stream; "new": only new messages
//! ```
//!
//! In code:
//!
//! ```no_run
//! use tempest_connectors::nats::{JetStreamConfig, JetStreamSource};
//!
//! let source = JetStreamSource::new(JetStreamConfig {
//!     subjects: Some(vec!["orders.>".into()]),
//!     ack_wait_ms: Some(90_000),
//!     ..JetStreamConfig::new("nats://127.0.0.1:4222", "ORDERS")
//! })
//! .unwrap();
//! ```
//!
//! Several topology servers may share one durable consumer: JetStream hands
//! each message to one of them. The consumer's settings are updated to this
//! configuration on every connect (a change JetStream refuses, such as
//! another `deliver_policy` for an existing consumer, is a fatal error).
//! An existing stream is used as it is.
//!
//! Works with nats-server 2.9 and later.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, stream, AckKind};
use async_nats::{Client, ConnectErrorKind, ServerAddr, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use tempest_core::sources::SourceStats;
use tempest_core::{
    async_trait, ConfigError, FailReason, FromConfig, Health, Msg, Polled, Settings, Source,
    SourceError, SourceErrorKind, SourceId, SourceMsg,
};

/// The header whose value becomes a message's key.
pub const KEY_HEADER: &str = "Tempest-Key";

/// How long a connect attempt waits for the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a JetStream API request (stream and consumer info) may take.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// How long acks (and terms, naks) wait for the server's confirmation.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than `expires` a pull may take before it is abandoned.
const FETCH_GRACE: Duration = Duration::from_millis(500);
/// The longest `expires_ms`: a poll must come back within about a second.
const MAX_EXPIRES_MS: u64 = 1_000;
/// The longest wait between reconnect attempts of the NATS client.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Where a new durable consumer starts.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliverPolicy {
    /// From the first message in the stream.
    #[default]
    All,
    /// Only messages published after the consumer was created.
    New,
}

/// The `[source.config]` of kind `"nats"`. See the [module](self) docs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    /// The server URL, or several separated by commas.
    pub url: String,
    /// The stream (created if missing).
    pub stream: String,
    /// The subjects of the stream if it is created (default `[stream + ".>"]`).
    #[serde(default)]
    pub subjects: Option<Vec<String>>,
    /// The durable consumer's name.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// The most messages one pull asks for (the runtime may ask for fewer).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a pull waits for messages, in milliseconds (1..=1000).
    #[serde(default = "default_expires_ms")]
    pub expires_ms: u64,
    /// The consumer's ack wait in milliseconds; it must be longer than the
    /// topology's `message_timeout` (default `2 × message_timeout + 1 s`).
    #[serde(default)]
    pub ack_wait_ms: Option<u64>,
    /// Deliveries of one message at most (`-1` or unset: unlimited). Each
    /// release by the `none` policy is a delivery.
    #[serde(default)]
    pub max_deliver: Option<i64>,
    /// Un-acked messages of the consumer at most (`-1`: unlimited; default:
    /// the topology's `max_pending`). Raise it when several topology servers
    /// share the consumer.
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
    /// How long JetStream waits before redelivering a message released under
    /// the `none` policy, in milliseconds (0: at once).
    #[serde(default = "default_nak_delay_ms")]
    pub nak_delay_ms: u64,
    /// Where a new consumer starts.
    #[serde(default)]
    pub deliver_policy: DeliverPolicy,
}

fn default_consumer() -> String {
    "tempest".into()
}
fn default_batch_size() -> usize {
    512
}
fn default_expires_ms() -> u64 {
    100
}
fn default_nak_delay_ms() -> u64 {
    1_000
}

impl JetStreamConfig {
    /// The defaults for `stream` on the server(s) at `url`.
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> Self {
        JetStreamConfig {
            url: url.into(),
            stream: stream.into(),
            subjects: None,
            consumer: default_consumer(),
            batch_size: default_batch_size(),
            expires_ms: default_expires_ms(),
            ack_wait_ms: None,
            max_deliver: None,
            max_ack_pending: None,
            nak_delay_ms: default_nak_delay_ms(),
            deliver_policy: DeliverPolicy::All,
        }
    }

    /// The subjects of a created stream.
    pub fn stream_subjects(&self) -> Vec<String> {
        self.subjects
            .clone()
            .unwrap_or_else(|| vec![format!("{}.>", self.stream)])
    }

    /// The consumer's ack wait for a topology whose roots time out after
    /// `message_timeout`, or an error naming `ack_wait_ms`.
    pub fn ack_wait(&self, message_timeout: Duration) -> Result<Duration, ConfigError> {
        match self.ack_wait_ms {
            None => Ok(message_timeout
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(1))),
            Some(ms) if Duration::from_millis(ms) <= message_timeout => Err(ConfigError::at_key(
                "ack_wait_ms",
                format!(
                    "{ms} ms must be longer than message_timeout ({message_timeout:?}): Tempest \
                     must time a root out before JetStream redelivers it"
                ),
            )),
            Some(ms) => Ok(Duration::from_millis(ms)),
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.servers()?;
        check_name("stream", &self.stream)?;
        check_name("consumer", &self.consumer)?;
        if let Some(subjects) = &self.subjects {
            if subjects.is_empty() {
                return Err(ConfigError::at_key(
                    "subjects",
                    "needs at least one subject (leave it out for [stream + \".>\"])",
                ));
            }
            for (i, s) in subjects.iter().enumerate() {
                if s.is_empty() || s.contains(char::is_whitespace) {
                    return Err(ConfigError::at_key(
                        format!("subjects[{i}]"),
                        format!("{s:?} is not a NATS subject"),
                    ));
                }
            }
        }
        if self.batch_size == 0 {
            return Err(ConfigError::at_key("batch_size", "must be at least 1"));
        }
        if !(1..=MAX_EXPIRES_MS).contains(&self.expires_ms) {
            return Err(ConfigError::at_key(
                "expires_ms",
                format!(
                    "must be between 1 and {MAX_EXPIRES_MS}, not {}: a poll must come back \
                     within about a second",
                    self.expires_ms
                ),
            ));
        }
        if self.ack_wait_ms == Some(0) {
            return Err(ConfigError::at_key("ack_wait_ms", "must be at least 1"));
        }
        for (key, v) in [
            ("max_deliver", self.max_deliver),
            ("max_ack_pending", self.max_ack_pending),
        ] {
            if let Some(v) = v {
                if v == 0 || v < -1 {
                    return Err(ConfigError::at_key(
                        key,
                        format!("must be -1 (unlimited) or at least 1, not {v}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The parsed server addresses.
    fn servers(&self) -> Result<Vec<ServerAddr>, ConfigError> {
        let servers: Vec<ServerAddr> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ServerAddr>()
                    .map_err(|e| ConfigError::at_key("url", format!("{s:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if servers.is_empty() {
            return Err(ConfigError::at_key("url", "is empty"));
        }
        Ok(servers)
    }
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let bad = |c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\');
    if name.is_empty() || name.contains(bad) {
        return Err(ConfigError::at_key(
            key,
            format!("{name:?} is not a JetStream name (non-empty, no spaces, '.', '*', '>', '/')"),
        ));
    }
    Ok(())
}

/// A durable JetStream pull consumer as a source. See the [module](self) docs.
pub struct JetStreamSource {
    config: JetStreamConfig,
    servers: Vec<ServerAddr>,
    /// The topology's `message_timeout` (from `configure`).
    message_timeout: Duration,
    /// The topology's `max_pending` (from `configure`).
    max_pending: usize,
    /// The consumer's ack wait.
    ack_wait: Duration,
    conn: Option<Conn>,
    /// The ack handles of messages handed out and not yet settled, by stream
    /// sequence.
    held: HashMap<u64, Held>,
    /// The client's connect count that the held handles belong to.
    epoch: u64,
    /// When held messages are next checked for a progress signal.
    next_keep_alive: Instant,
    stats: SourceStats,
}

struct Conn {
    client: Client,
    js: jetstream::Context,
    /// The consumer handle; `None` until (re-)created after a (re)connect.
    consumer: Option<PullConsumer>,
}

/// The ack handle of one message handed out.
struct Held {
    /// The `$JS.ACK...` reply subject.
    reply: Subject,
    /// When JetStream last heard of it (delivery or progress).
    touched: Instant,
}

impl fmt::Debug for JetStreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamSource")
            .field("config", &self.config)
            .field("ack_wait", &self.ack_wait)
            .field("connected", &self.conn.is_some())
            .field("held", &self.held.len())
            .finish()
    }
}

impl JetStreamSource {
    /// A source with `config` (checked here; connected by `connect`).
    pub fn new(config: JetStreamConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let servers = config.servers()?;
        let defaults = Settings::new("");
        // Checked against the topology's message_timeout by `configure`.
        let ack_wait = match config.ack_wait_ms {
            Some(ms) => Duration::from_millis(ms),
            None => config.ack_wait(defaults.message_timeout)?,
        };
        Ok(JetStreamSource {
            config,
            servers,
            message_timeout: defaults.message_timeout,
            max_pending: defaults.max_pending,
            ack_wait,
            conn: None,
            held: HashMap::new(),
            epoch: 0,
            next_keep_alive: Instant::now(),
            stats: SourceStats::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &JetStreamConfig {
        &self.config
    }

    /// The consumer's ack wait (final after `configure`).
    pub fn ack_wait(&self) -> Duration {
        self.ack_wait
    }

    /// The message counters (a shared handle): emitted by `poll`, acked
    /// (confirmed by the server), failed (dead-lettered).
    pub fn stats(&self) -> SourceStats {
        self.stats.clone()
    }

    /// Messages handed out whose ack handle is held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn is_connected(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.client.connection_state() == State::Connected)
    }

    /// Drops the handles that a reconnect made stale, and the consumer
    /// handle with them.
    fn sync_epoch(&mut self) {
        let Some(conn) = &mut self.conn else {
            return;
        };
        let connects = conn.client.statistics().connects.load(Ordering::Relaxed);
        if connects == self.epoch {
            return;
        }
        if !self.held.is_empty() {
            tracing::warn!(
                stream = %self.config.stream,
                dropped = self.held.len(),
                "reconnected to NATS: dropping the ack handles of messages in flight; \
                 JetStream redelivers them after ack_wait"
            );
            self.held.clear();
        }
        conn.consumer = None;
        self.epoch = connects;
    }

    /// The connected client and consumer, creating what is missing.
    async fn ready(&mut self) -> Result<PullConsumer, SourceError> {
        if self.conn.is_none() {
            let client = self.open().await?;
            let mut js = jetstream::new(client.clone());
            js.set_timeout(API_TIMEOUT);
            self.epoch = client.statistics().connects.load(Ordering::Relaxed);
            self.conn = Some(Conn {
                client,
                js,
                consumer: None,
            });
        }
        self.sync_epoch();
        let Some(conn) = &mut self.conn else {
            unreachable!("connected above");
        };
        if conn.client.connection_state() != State::Connected {
            return Err(SourceError::transient(
                SourceErrorKind::Connect,
                format!("connection to {} lost; reconnecting", self.config.url),
            ));
        }
        if let Some(consumer) = &conn.consumer {
            return Ok(consumer.clone());
        }
        let consumer = Self::create_consumer(
            &self.config,
            &conn.js,
            self.ack_wait,
            self.config
                .max_ack_pending
                .unwrap_or_else(|| i64::try_from(self.max_pending).unwrap_or(i64::MAX)),
        )
        .await?;
        conn.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    /// Connects a client; the client then reconnects on its own.
    async fn open(&self) -> Result<Client, SourceError> {
        let options = async_nats::ConnectOptions::new()
            .name(format!(
                "tempest {}/{}",
                self.config.stream, self.config.consumer
            ))
            .connection_timeout(CONNECT_TIMEOUT)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50)
                    .saturating_mul(attempts.min(100) as u32)
                    .min(MAX_RECONNECT_DELAY)
            });
        options.connect(self.servers.clone()).await.map_err(|e| {
            let message = format!("connecting to {}: {e}", self.config.url);
            match e.kind() {
                ConnectErrorKind::ServerParse
                | ConnectErrorKind::Authentication
                | ConnectErrorKind::AuthorizationViolation
                | ConnectErrorKind::Tls => SourceError::fatal(SourceErrorKind::Connect, message),
                _ => SourceError::transient(SourceErrorKind::Connect, message),
            }
        })
    }

    /// Gets or creates the stream, then creates (or updates) the consumer.
    async fn create_consumer(
        config: &JetStreamConfig,
        js: &jetstream::Context,
        ack_wait: Duration,
        max_ack_pending: i64,
    ) -> Result<PullConsumer, SourceError> {
        use async_nats::jetstream::context::CreateStreamErrorKind as K;
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: config.stream_subjects(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                let message = format!("stream {:?}: {e}", config.stream);
                match e.kind() {
                    K::JetStream(err) if !is_transient_api_error(&err) => {
                        SourceError::fatal(SourceErrorKind::Connect, message)
                    }
                    K::EmptyStreamName | K::InvalidStreamName | K::DomainAndExternalSet => {
                        SourceError::fatal(SourceErrorKind::Connect, message)
                    }
                    _ => SourceError::transient(SourceErrorKind::Connect, message),
                }
            })?;
        let deliver_policy = match config.deliver_policy {
            DeliverPolicy::All => jetstream::consumer::DeliverPolicy::All,
            DeliverPolicy::New => jetstream::consumer::DeliverPolicy::New,
        };
        use async_nats::jetstream::stream::ConsumerErrorKind as C;
        stream
            .create_consumer(pull::Config {
                durable_name: Some(config.consumer.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_deliver: config.max_deliver.unwrap_or(-1),
                max_ack_pending,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                let message = format!(
                    "consumer {:?} on stream {:?}: {e}",
                    config.consumer, config.stream
                );
                match e.kind() {
                    C::JetStream(err) if !is_transient_api_error(&err) => {
                        SourceError::fatal(SourceErrorKind::Connect, message)
                    }
                    C::InvalidName | C::InvalidConsumerType => {
                        SourceError::fatal(SourceErrorKind::Connect, message)
                    }
                    _ => SourceError::transient(SourceErrorKind::Connect, message),
                }
            })
    }

    /// Turns a pulled message into a root and keeps its ack handle.
    fn admit(&mut self, m: jetstream::Message, now: Instant) -> Option<SourceMsg> {
        let (seq, delivered) = match m.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                tracing::warn!(subject = %m.subject, "skipping a message without JetStream metadata: {e}");
                return None;
            }
        };
        let msg = m.message;
        let reply = msg.reply?;
        let key = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(KEY_HEADER))
            .map(|v| Bytes::copy_from_slice(v.as_str().as_bytes()));
        if delivered > 1 {
            tracing::debug!(seq, delivered, "redelivered by JetStream");
        }
        if self
            .held
            .insert(
                seq,
                Held {
                    reply,
                    touched: now,
                },
            )
            .is_some()
        {
            tracing::warn!(
                seq,
                delivered,
                "JetStream redelivered a message still in flight (ack_wait ran out)"
            );
        }
        Some(SourceMsg::new(seq, Msg::from_parts(key, msg.payload)))
    }

    /// Sends `payload` (an ack kind) for each message and waits for the
    /// server to confirm; returns the sequences confirmed and, if some were
    /// not, why.
    async fn confirm(
        &self,
        items: &[(u64, Subject)],
        payload: Bytes,
    ) -> (Vec<u64>, Option<String>) {
        let mut confirmed = Vec::with_capacity(items.len());
        let Some(conn) = &self.conn else {
            return (confirmed, Some("not connected".into()));
        };
        if conn.client.connection_state() != State::Connected {
            return (confirmed, Some("disconnected from NATS".into()));
        }
        let client = &conn.client;
        let work = async {
            // One inbox for the batch: every confirmation comes back on its own
            // subject under it, so the acks go out together and are confirmed
            // in one round trip.
            let inbox = client.new_inbox();
            let mut sub = client
                .subscribe(format!("{inbox}.*"))
                .await
                .map_err(|e| e.to_string())?;
            for (seq, reply) in items {
                client
                    .publish_with_reply(reply.clone(), format!("{inbox}.{seq}"), payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            while confirmed.len() < items.len() {
                let Some(m) = sub.next().await else {
                    return Err("confirmation subscription closed".to_string());
                };
                if let Some(seq) = m.subject.rsplit('.').next().and_then(|s| s.parse().ok()) {
                    confirmed.push(seq);
                }
            }
            let _ = sub.unsubscribe().await;
            Ok(())
        };
        let why = match tokio::time::timeout(CONFIRM_TIMEOUT, work).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no confirmation within {CONFIRM_TIMEOUT:?}")),
        };
        (confirmed, why)
    }

    /// Settles one held message with `kind` (confirmed by the server); false
    /// when its handle is no longer held.
    async fn settle_one(
        &mut self,
        id: SourceId,
        kind: AckKind,
        err_kind: SourceErrorKind,
    ) -> Result<bool, SourceError> {
        self.sync_epoch();
        let seq = id.parts().1;
        let Some(held) = self.held.remove(&seq) else {
            return Ok(false);
        };
        let (confirmed, why) = self.confirm(&[(seq, held.reply)], kind.into()).await;
        if confirmed.is_empty() {
            return Err(SourceError::transient(
                err_kind,
                format!(
                    "message {seq} of stream {}: {}; JetStream redelivers it after ack_wait",
                    self.config.stream,
                    why.unwrap_or_default()
                ),
            ));
        }
        Ok(true)
    }

    /// Tells JetStream that messages held for half of `ack_wait` are still
    /// being worked on, so that it does not redeliver them (retry replays
    /// can keep a root in flight longer than `ack_wait`).
    async fn keep_alive(&mut self) {
        let now = Instant::now();
        if now < self.next_keep_alive || self.held.is_empty() {
            return;
        }
        self.next_keep_alive = now + self.ack_wait / 4;
        let Some(conn) = &self.conn else {
            return;
        };
        if conn.client.connection_state() != State::Connected {
            return;
        }
        let client = &conn.client;
        let half = self.ack_wait / 2;
        let held = &mut self.held;
        let work = async {
            let mut sent = 0usize;
            for h in held.values_mut() {
                if now.duration_since(h.touched) >= half {
                    if client
                        .publish(h.reply.clone(), AckKind::Progress.into())
                        .await
                        .is_err()
                    {
                        break;
                    }
                    h.touched = now;
                    sent += 1;
                }
            }
            sent
        };
        if let Ok(sent) = tokio::time::timeout(CONFIRM_TIMEOUT, work).await {
            if sent > 0 {
                tracing::debug!(sent, "progress sent for messages still in flight");
            }
        }
    }
}

/// True for JetStream API errors that may pass: the service unavailable
/// or timing out, a cluster without a leader, a stream deleted under us (the
/// next connect creates it again). Everything else, such as a consumer
/// update that JetStream refuses (nats-server 2.9 answers those with code
/// 500), is a configuration problem that retrying will not fix.
fn is_transient_api_error(err: &async_nats::jetstream::Error) -> bool {
    use async_nats::jetstream::ErrorCode;
    matches!(err.code(), 404 | 408 | 503 | 504)
        || [
            ErrorCode::CLUSTER_NOT_ACTIVE,
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::CLUSTER_NOT_LEADER,
            ErrorCode::INSUFFICIENT_RESOURCES,
        ]
        .contains(&err.error_code())
}

impl FromConfig for JetStreamSource {
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let config: JetStreamConfig = tempest_core::config::from_table(config)?;
        JetStreamSource::new(config)
    }
}

#[async_trait]
impl Source for JetStreamSource {
    async fn configure(&mut self, settings: &Settings) -> Result<(), SourceError> {
        self.message_timeout = settings.message_timeout;
        self.max_pending = settings.max_pending;
        self.ack_wait = self
            .config
            .ack_wait(settings.message_timeout)
            .map_err(|e| SourceError::config(e.to_string()))?;
        Ok(())
    }

    async fn connect(&mut self) -> Result<(), SourceError> {
        if let Some(conn) = &mut self.conn {
            // After a poll error: look the consumer up again (it may have
            // been deleted, or the broker restarted without it).
            conn.consumer = None;
        }
        self.ready().await?;
        tracing::info!(
            stream = %self.config.stream,
            consumer = %self.config.consumer,
            ack_wait = ?self.ack_wait,
            "JetStream consumer ready"
        );
        Ok(())
    }

    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        if max == 0 {
            return Ok(Polled::Idle);
        }
        let consumer = self.ready().await?;
        self.keep_alive().await;
        let epoch = self.epoch;
        let want = max.min(self.config.batch_size);
        let expires = Duration::from_millis(self.config.expires_ms);
        let deadline = tokio::time::Instant::now() + expires + FETCH_GRACE;
        let pull = consumer
            .fetch()
            .max_messages(want)
            .expires(expires)
            .messages();
        let mut batch = match tokio::time::timeout_at(deadline, pull).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                return Err(SourceError::transient(
                    SourceErrorKind::Poll,
                    format!("pull from {}: {e}", self.config.stream),
                ))
            }
            Err(_) => {
                return Err(SourceError::transient(
                    SourceErrorKind::Poll,
                    format!("pull from {}: timed out", self.config.stream),
                ))
            }
        };
        let now = Instant::now();
        let mut msgs = Vec::with_capacity(want);
        let mut failure = None;
        loop {
            match tokio::time::timeout_at(deadline, batch.next()).await {
                Ok(Some(Ok(m))) => msgs.extend(self.admit(m, now)),
                Ok(Some(Err(e))) => {
                    failure = Some(e.to_string());
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!("pull did not end within {:?}", expires + FETCH_GRACE);
                    break;
                }
            }
        }
        drop(batch);
        self.sync_epoch();
        if self.epoch != epoch {
            return Err(SourceError::transient(
                SourceErrorKind::Poll,
                "reconnected to NATS during a pull",
            ));
        }
        if msgs.is_empty() && !self.is_connected() {
            return Err(SourceError::transient(
                SourceErrorKind::Poll,
                format!("connection to {} lost; reconnecting", self.config.url),
            ));
        }
        if let Some(why) = failure {
            if why.contains("MaxAckPending") {
                // The consumer's cap on un-acked messages: wait for acks.
                tracing::debug!("pull: {why}");
            } else if msgs.is_empty() {
                if let Some(conn) = &mut self.conn {
                    conn.consumer = None;
                }
                return Err(SourceError::transient(
                    SourceErrorKind::Poll,
                    format!("pull from {}: {why}", self.config.stream),
                ));
            } else {
                tracing::debug!("pull ended early: {why}");
            }
        }
        if msgs.is_empty() {
            return Ok(Polled::Idle);
        }
        self.stats.record_emitted(msgs.len());
        Ok(Polled::Msgs(msgs))
    }

    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.sync_epoch();
        let mut items = Vec::with_capacity(ids.len());
        for id in ids {
            let seq = id.parts().1;
            if let Some(h) = self.held.remove(&seq) {
                items.push((seq, h.reply));
            }
        }
        let stale = ids.len() - items.len();
        if stale > 0 {
            tracing::debug!(
                stale,
                "acks of messages whose handles a reconnect dropped: JetStream redelivers them"
            );
        }
        if items.is_empty() {
            return Ok(());
        }
        let (confirmed, why) = self.confirm(&items, AckKind::Ack.into()).await;
        let acked: Vec<SourceId> = confirmed.iter().map(|&s| SourceId::from(s)).collect();
        self.stats.record_acked(&acked);
        self.keep_alive().await;
        if confirmed.len() < items.len() {
            return Err(SourceError::transient(
                SourceErrorKind::Ack,
                format!(
                    "{} of {} acks not confirmed by JetStream ({}); it redelivers them after \
                     ack_wait",
                    items.len() - confirmed.len(),
                    items.len(),
                    why.unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }

    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        self.stats.record_failed();
        let seq = id.parts().1;
        tracing::warn!(
            stream = %self.config.stream,
            seq,
            attempts = reason.attempts,
            reason = %reason.message,
            "dead letter: terminating the message at JetStream (never redelivered)"
        );
        if !self
            .settle_one(id, AckKind::Term, SourceErrorKind::Fail)
            .await?
        {
            tracing::warn!(
                seq,
                "dead letter not terminated: its handle was dropped by a reconnect, so \
                 JetStream will redeliver it"
            );
        }
        Ok(())
    }

    async fn release(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        let delay = Duration::from_millis(self.config.nak_delay_ms);
        let kind = AckKind::Nak((!delay.is_zero()).then_some(delay));
        tracing::debug!(seq = id.parts().1, reason = %reason, ?delay, "released: nak");
        self.settle_one(id, kind, SourceErrorKind::Fail).await?;
        Ok(())
    }

    async fn health(&mut self) -> Health {
        match &self.conn {
            None => Health::Unhealthy(format!("not connected to {}", self.config.url)),
            Some(conn) => match conn.client.connection_state() {
                State::Connected => Health::Healthy,
                State::Pending | State::Disconnected => Health::Unhealthy(format!(
                    "connection to {} lost; reconnecting",
                    self.config.url
                )),
            },
        }
    }

    async fn shutdown(&mut self) -> Result<(), SourceError> {
        if !self.held.is_empty() {
            tracing::info!(
                in_flight = self.held.len(),
                "left un-acked at JetStream: redelivered after ack_wait"
            );
            self.held.clear();
        }
        if let Some(conn) = self.conn.take() {
            let _ = tokio::time::timeout(CONFIRM_TIMEOUT, conn.client.flush()).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<JetStreamSource, ConfigError> {
        let table: toml::Table = toml::from_str(text).unwrap();
        JetStreamSource::from_config(&table)
    }

    fn err_key(text: &str) -> String {
        let e = parse(text).expect_err("an error");
        e.key.clone().unwrap_or_else(|| panic!("no key in {e}"))
    }

    #[test]
    fn defaults() {
        let s = parse("url = \"nats://127.0.0.1:4222\"\nstream = \"ORDERS\"\n").unwrap();
        let c = s.config();
        assert_eq!(c, &JetStreamConfig::new("nats://127.0.0.1:4222", "ORDERS"));
        assert_eq!(c.stream_subjects(), ["ORDERS.>"]);
        assert_eq!(c.consumer, "tempest");
        assert_eq!(
            (c.batch_size, c.expires_ms, c.nak_delay_ms),
            (512, 100, 1000)
        );
        assert_eq!(c.deliver_policy, DeliverPolicy::All);
        // 2 × the default message_timeout (30 s) + 1 s until configured.
        assert_eq!(s.ack_wait(), Duration::from_secs(61));
    }

    #[test]
    fn every_key() {
        let s = parse(
            "url = \"nats://a:4222, nats://b:4222\"\nstream = \"S\"\nsubjects = [\"a.>\", \"b\"]\n\
             consumer = \"c\"\nbatch_size = 10\nexpires_ms = 1000\nack_wait_ms = 5000\n\
             max_deliver = 3\nmax_ack_pending = -1\nnak_delay_ms = 0\ndeliver_policy = \"new\"\n",
        )
        .unwrap();
        assert_eq!(s.servers.len(), 2);
        let c = s.config();
        assert_eq!(c.stream_subjects(), ["a.>", "b"]);
        assert_eq!(c.deliver_policy, DeliverPolicy::New);
        assert_eq!((c.max_deliver, c.max_ack_pending), (Some(3), Some(-1)));
    }

    #[test]
    fn errors_name_the_key() {
        let base = "url = \"nats://127.0.0.1:4222\"\nstream = \"S\"\n";
        assert_eq!(err_key(&format!("{base}consumr = \"x\"\n")), "consumr");
        let missing = parse("stream = \"S\"\n").err().unwrap();
        assert!(missing.message.contains("url"), "{missing}");
        assert_eq!(err_key(&format!("{base}batch_size = 0\n")), "batch_size");
        assert_eq!(err_key(&format!("{base}expires_ms = 5000\n")), "expires_ms");
        assert_eq!(err_key(&format!("{base}expires_ms = 0\n")), "expires_ms");
        assert_eq!(err_key(&format!("{base}ack_wait_ms = 0\n")), "ack_wait_ms");
        assert_eq!(err_key(&format!("{base}max_deliver = 0\n")), "max_deliver");
        assert_eq!(
            err_key(&format!("{base}max_ack_pending = -2\n")),
            "max_ack_pending"
        );
        assert_eq!(err_key(&format!("{base}subjects = []\n")), "subjects");
        assert_eq!(
            err_key(&format!("{base}subjects = [\"a b\"]\n")),
            "subjects[0]"
        );
        assert_eq!(
            err_key(&format!("{base}deliver_policy = \"last\"\n")),
            "deliver_policy"
        );
        assert_eq!(err_key(&format!("{base}consumer = \"a.b\"\n")), "consumer");
        assert_eq!(
            err_key("url = \"nats://x:1\"\nstream = \"a b\"\n"),
            "stream"
        );
        assert_eq!(err_key("url = \"\"\nstream = \"S\"\n"), "url");
        assert_eq!(
            err_key("url = \"nats://x:notaport\"\nstream = \"S\"\n"),
            "url"
        );
    }

    #[test]
    fn ack_wait_must_outlast_message_timeout() {
        let mut c = JetStreamConfig::new("nats://x:4222", "S");
        let t = Duration::from_secs(2);
        assert_eq!(c.ack_wait(t).unwrap(), Duration::from_secs(5));
        c.ack_wait_ms = Some(2_000);
        let e = c.ack_wait(t).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("ack_wait_ms"));
        c.ack_wait_ms = Some(2_001);
        assert_eq!(c.ack_wait(t).unwrap(), Duration::from_millis(2_001));
    }

    #[tokio::test]
    async fn configure_refuses_a_short_ack_wait() {
        let mut s = JetStreamSource::new(JetStreamConfig {
            ack_wait_ms: Some(1_000),
            ..JetStreamConfig::new("nats://127.0.0.1:4222", "S")
        })
        .unwrap();
        let mut settings = Settings::new("t");
        settings.message_timeout = Duration::from_secs(1);
        let e = s.configure(&settings).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Config);
        assert!(!e.retryable);
        assert!(e.message.contains("ack_wait_ms"), "{e}");
        settings.message_timeout = Duration::from_millis(999);
        s.configure(&settings).await.unwrap();
        assert_eq!(s.ack_wait(), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn unreachable_broker_is_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = JetStreamSource::new(JetStreamConfig::new(
            format!("nats://127.0.0.1:{port}"),
            "S",
        ))
        .unwrap();
        let e = s.connect().await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Connect);
        assert!(e.retryable, "{e}");
        assert!(!s.health().await.is_healthy());
    }
}
