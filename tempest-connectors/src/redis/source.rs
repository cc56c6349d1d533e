//! [`RedisStreamSource`]: a consumer in a consumer group of a Redis stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, Value};
use serde::Deserialize;
use tempest_core::source::SOURCE_CONSUMER_ENV;
use tempest_core::sources::SourceStats;
use tempest_core::{
    async_trait, ConfigError, FailReason, FromConfig, Health, Polled, Settings, Source,
    SourceError, SourceErrorKind, SourceId, SourceMsg,
};

use super::wire::{self, Entry, MAX_ID_LEN};
use super::{is_retryable, shown_url};

/// Ids per `XACK` (and per keep-alive `XCLAIM`); larger batches are split
/// into several commands sent as one pipeline.
const ACK_CHUNK: usize = 1000;

/// Acks kept for the next connection when the broker is unreachable. Past
/// this the oldest are dropped: those entries stay pending and are
/// reclaimed and handled again (at-least-once).
const MAX_OWED_ACKS: usize = 1_000_000;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a reply may take beyond the `BLOCK` time of a read.
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);

/// The longest `block_ms` accepted: a poll must come back soon so the
/// runtime can ack and sweep.
pub const MAX_BLOCK_MS: u64 = 60_000;

/// The largest `batch_size` accepted.
pub const MAX_BATCH_SIZE: usize = 1_000_000;

/// The `[source.config]` of kind `"redis"`: which stream and group to consume,
/// and how.
///
/// ```toml
/// [source]
/// kind = "redis"
/// [source.config]
/// url = "redis://127.0.0.1:6379"   # required; redis://[user:password@]host:port[/db]
/// stream = "events"                # required
/// group = "tempest"                # the consumer group (created unless create_group = false)
/// # consumer = "node-1"            # default: $TEMPEST_SOURCE_CONSUMER (set by the agent), else <hostname>-<pid>
/// batch_size = 512                 # the most entries one read returns
/// block_ms = 100                   # how long a read waits for new entries (0: does not wait)
/// claim_idle_ms = 30000            # entries pending this long at another consumer are taken over
/// start_id = "0"                   # where a new group starts: "0" = the beginning, "$" = new entries only
/// # dead_letter = "events:dead"    # default: "<stream>:dead"
/// create_group = true              # XGROUP CREATE ... MKSTREAM when the group is missing
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSourceConfig {
    /// The server: `redis://[user:password@]host:port[/db]` (`rediss://` is
    /// not built in).
    pub url: String,
    /// The stream key.
    pub stream: String,
    /// The consumer group (default `"tempest"`).
    #[serde(default = "default_group")]
    pub group: String,
    /// This consumer's name in the group. Default: the value of the
    /// environment variable [`SOURCE_CONSUMER_ENV`]
    /// (`TEMPEST_SOURCE_CONSUMER`), which the agent sets to a topology
    /// server's stable identity in its deployment (`<topology>/server`),
    /// else `<hostname>-<pid>`; either with `-2`, `-3`, ... for further
    /// sources of one process. See [`RedisStreamSource`], "Consumer name".
    #[serde(default)]
    pub consumer: Option<String>,
    /// The most entries one read asks for (default 512); a poll asks for the
    /// smaller of this and what the runtime wants.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a read waits for new entries, in milliseconds (default 100).
    /// 0 reads without waiting (not `BLOCK 0`, which would wait forever).
    #[serde(default = "default_block_ms")]
    pub block_ms: u64,
    /// Entries pending this long (ms) at a consumer that stopped touching
    /// them are taken over with `XAUTOCLAIM` (default 30000).
    #[serde(default = "default_claim_idle_ms")]
    pub claim_idle_ms: u64,
    /// Where a group created by this source starts: `"0"` (default) the
    /// beginning of the stream, `"$"` only entries added from now on, or an
    /// entry id.
    #[serde(default = "default_start_id")]
    pub start_id: String,
    /// The stream that failed entries go to (default `"<stream>:dead"`).
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Creates the group (and the stream) when missing (default true); when
    /// false a missing group is an error at connect.
    #[serde(default = "default_true")]
    pub create_group: bool,
}

fn default_group() -> String {
    "tempest".into()
}
fn default_batch_size() -> usize {
    512
}
fn default_block_ms() -> u64 {
    100
}
fn default_claim_idle_ms() -> u64 {
    30_000
}
fn default_start_id() -> String {
    "0".into()
}
fn default_true() -> bool {
    true
}

impl RedisSourceConfig {
    /// The defaults for `stream` on the server at `url`.
    ///
    /// ```
    /// use tempest_connectors::redis::RedisSourceConfig;
    ///
    /// let config = RedisSourceConfig {
    ///     group: "counters".into(),
    ///     ..RedisSourceConfig::new("redis://127.0.0.1:6379", "events")
    /// };
    /// assert_eq!(config.batch_size, 512);
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> Self {
        RedisSourceConfig {
            url: url.into(),
            stream: stream.into(),
            group: default_group(),
            consumer: None,
            batch_size: default_batch_size(),
            block_ms: default_block_ms(),
            claim_idle_ms: default_claim_idle_ms(),
            start_id: default_start_id(),
            dead_letter: None,
            create_group: true,
        }
    }

    /// Checks every value; an error names the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.trim().is_empty() {
            return Err(ConfigError::at_key("url", "the URL is empty"));
        }
        if let Err(e) = redis::Client::open(self.url.as_str()) {
            return Err(ConfigError::at_key(
                "url",
                format!("`{}` is not a Redis URL: {e}", shown_url(&self.url)),
            ));
        }
        if self.stream.is_empty() {
            return Err(ConfigError::at_key("stream", "the stream name is empty"));
        }
        if self.group.is_empty() {
            return Err(ConfigError::at_key("group", "the group name is empty"));
        }
        if self.consumer.as_deref() == Some("") {
            return Err(ConfigError::at_key(
                "consumer",
                "the consumer name is empty",
            ));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(ConfigError::at_key(
                "batch_size",
                format!(
                    "must be between 1 and {MAX_BATCH_SIZE}, not {}",
                    self.batch_size
                ),
            ));
        }
        if self.block_ms > MAX_BLOCK_MS {
            return Err(ConfigError::at_key(
                "block_ms",
                format!(
                    "must be at most {MAX_BLOCK_MS}, not {} (a poll must come back soon so the runtime can ack)",
                    self.block_ms
                ),
            ));
        }
        if self.claim_idle_ms == 0 {
            return Err(ConfigError::at_key("claim_idle_ms", "must be at least 1"));
        }
        let start = self.start_id.as_bytes();
        let id_like = start == b"$"
            || wire::parse_id(start).is_some()
            || (!start.is_empty() && start.len() <= 20 && start.iter().all(u8::is_ascii_digit));
        if !id_like {
            return Err(ConfigError::at_key(
                "start_id",
                format!(
                    "`{}` is not a stream id: use \"0\" (the beginning), \"$\" (new entries only) or an id such as \"1700000000000-0\"",
                    self.start_id
                ),
            ));
        }
        match self.dead_letter.as_deref() {
            Some("") => {
                return Err(ConfigError::at_key(
                    "dead_letter",
                    "the stream name is empty",
                ))
            }
            Some(d) if d == self.stream => {
                return Err(ConfigError::at_key(
                    "dead_letter",
                    "the dead-letter stream must not be the stream read",
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// The dead-letter stream: `dead_letter`, or `"<stream>:dead"`.
    pub fn dead_letter_stream(&self) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}:dead", self.stream))
    }
}

/// Counters specific to a Redis stream source (a cheap shared handle, like
/// [`SourceStats`]).
#[derive(Clone, Debug, Default)]
pub struct RedisStats {
    inner: Arc<RedisCounters>,
}

#[derive(Debug, Default)]
struct RedisCounters {
    connects: AtomicU64,
    reclaimed: AtomicU64,
    redelivered: AtomicU64,
    dead_lettered: AtomicU64,
}

impl RedisStats {
    /// Successful connects (the first and every reconnect).
    pub fn connects(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }
    /// Entries taken over from other consumers (or from this one's earlier
    /// life) with `XAUTOCLAIM`.
    pub fn reclaimed(&self) -> u64 {
        self.inner.reclaimed.load(Ordering::Relaxed)
    }
    /// Entries found pending for this consumer after a (re)connect and
    /// handed out again: read from the group before a crash or a lost reply.
    pub fn redelivered(&self) -> u64 {
        self.inner.redelivered.load(Ordering::Relaxed)
    }
    /// Entries written to the dead-letter stream.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.dead_lettered.load(Ordering::Relaxed)
    }
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A consumer in a consumer group of a Redis stream: at-least-once delivery
/// of every entry, with recovery of what crashed consumers left pending and
/// a dead-letter stream for entries the failure policy gives up on.
///
/// **Reading.** [`Source::connect`] opens a multiplexed connection and
/// creates the group with `XGROUP CREATE <stream> <group> <start_id>
/// MKSTREAM` unless it exists. Each [`Source::poll`] returns, in this order
/// of preference:
///
/// 1. after a (re)connect, the entries already pending for this consumer
///    (read before a crash, or whose reply was lost with the connection);
/// 2. every `claim_idle_ms / 2`, entries idle for `claim_idle_ms` at any
///    consumer of the group, taken over with `XAUTOCLAIM` (the cursor is
///    cycled until the pending list has been scanned);
/// 3. new entries: `XREADGROUP GROUP <group> <consumer> COUNT <n> BLOCK
///    <block_ms> STREAMS <stream> >`, or [`Polled::Idle`] when none came
///    within `block_ms`.
///
/// **Messages.** An entry `ms-seq` has the id `SourceId::from_parts(ms,
/// seq)`. Its payload is the field `payload`, else the field `data`, else
/// the value of the first field that is not `key`; its key is the field
/// `key` if present. Values are handed over without copying.
///
/// **Acks** are one `XACK` per 1000 ids, sent as one pipeline. Acks that
/// cannot be sent (the broker is down) are kept and sent after the
/// reconnect, so completed entries are not handled again.
///
/// **Entries in flight** (handed out, not yet acked, failed or released) are
/// kept alive: every `claim_idle_ms / 3` they are re-claimed by this
/// consumer (`XCLAIM ... JUSTID`, which does not count a delivery), so a
/// slow root is not taken over by another consumer while this one is alive.
/// This needs the runtime to poll or ack now and then; when it cannot (at
/// `max_pending` with nothing completing for `claim_idle_ms`) other
/// consumers may take entries over and handle them a second time, which is
/// why [`Source::configure`] warns when `claim_idle_ms` is below the
/// topology's `message_timeout`.
///
/// **Failures.** [`Source::fail`] moves the entry to the dead-letter stream:
/// it reads it (`XRANGE id id`) and, in one `MULTI`/`EXEC`, adds its fields
/// to the dead-letter stream with `tempest_reason`, `tempest_attempts` and
/// `tempest_source_id` (`ms-seq`) appended, and `XACK`s it. A poison entry
/// is neither lost nor retried forever. [`Source::release`] (the `none`
/// policy) leaves the entry pending; it is taken over after `claim_idle_ms`
/// (or at this consumer's next reconnect).
///
/// **Errors.** An unreachable broker, a dropped connection, a timeout or a
/// server that is loading its data are retryable: the runtime reconnects
/// with back-off, and the new connection re-creates the group if it is
/// gone. A bad URL, a missing group with `create_group = false`, a key that
/// is not a stream or refused credentials stop the topology.
///
/// **Consumer name.** The `consumer` key if given. Otherwise the value of
/// [`SOURCE_CONSUMER_ENV`] (`TEMPEST_SOURCE_CONSUMER`) if set and not
/// blank: the agent sets it for each topology server it launches to the
/// server's slot in its deployment (`<topology>/server`), the same for
/// every incarnation wherever it runs. Otherwise `<hostname>-<pid>`. A
/// second, third, ... Redis source of one process gets `-2`, `-3`, ...
/// appended to the default, in the order the sources are made.
///
/// A stable name is what makes a replaced server resume at once: a server
/// killed with entries in flight leaves them pending for its name, and its
/// replacement, being the same consumer, reads them again at its first poll
/// (step 1 above), without waiting `claim_idle_ms` for another consumer's
/// `XAUTOCLAIM`. With a per-process name (no agent, no `consumer` key) they
/// are taken over only once idle for `claim_idle_ms`.
///
/// If the old server still runs when its replacement starts (a network
/// partition between its agent and the director, say), both are the same
/// consumer: both read that consumer's pending entries after a (re)connect,
/// both keep them claimed, and an entry may be handled by both. Nothing is
/// lost (an entry leaves the pending list only when acked, by either), but
/// duplicates are possible until the old server is stopped, which the
/// director's fencing does (its agent stops an incarnation of an older
/// generation). New entries (`>`) are still delivered to one of the two
/// only. Two deployments that share a group and a topology name would also
/// share a consumer name; give them distinct `consumer` keys.
///
/// **Shutdown.** A consumer with a per-process default name
/// (`<hostname>-<pid>`) that has nothing pending is deleted from the group
/// (`XGROUP DELCONSUMER`), so restarts do not pile up consumers; one with
/// pending entries stays until they are taken over. A stable name (from
/// the environment or the `consumer` key) is never deleted: the next
/// incarnation uses it again, so nothing piles up, and a delete could race
/// with that incarnation (`XGROUP DELCONSUMER` drops the consumer's pending
/// entries, which would then never be delivered again).
///
/// ```no_run
/// use tempest_connectors::redis::{RedisSourceConfig, RedisStreamSource};
/// use tempest_core::{Msg, Pipeline, TaskResult, Topology};
///
/// let source = RedisStreamSource::new(RedisSourceConfig {
///     group: "wordcount".into(),
///     ..RedisSourceConfig::new("redis://127.0.0.1:6379", "sentences")
/// });
/// let topology = Topology::builder("wordcount")
///     .source(source)
///     .pipeline(Pipeline::new().task("print", || |m: Msg| -> TaskResult {
///         println!("{:?}", m.payload_str());
///         Ok(None)
///     }))
///     .build()
///     .unwrap();
/// ```
pub struct RedisStreamSource {
    config: RedisSourceConfig,
    consumer: String,
    /// The name is `<hostname>-<pid>`: never used again after this process,
    /// so the consumer is deleted at shutdown when nothing is pending.
    consumer_per_process: bool,
    dead_letter: String,
    url: String,
    conn: Option<MultiplexedConnection>,
    stats: SourceStats,
    redis_stats: RedisStats,
    /// Entries handed out and not yet settled, with when they were last
    /// delivered or kept alive.
    in_flight: HashMap<SourceId, Instant>,
    /// The `XAUTOCLAIM` cursor while a scan of the pending list is under way.
    claim_cursor: Option<Bytes>,
    next_claim: Instant,
    next_touch: Instant,
    /// Where the read of this consumer's own pending entries stands after a
    /// (re)connect; `None` once it is done.
    history: Option<Bytes>,
    /// Acks that could not be sent, for the next connection.
    owed_acks: Vec<SourceId>,
}

impl RedisStreamSource {
    /// A source with this configuration (checked by [`Source::configure`];
    /// [`RedisSourceConfig::validate`] checks it sooner).
    pub fn new(config: RedisSourceConfig) -> Self {
        let (consumer, consumer_per_process) = match &config.consumer {
            Some(c) => (c.clone(), false),
            None => default_consumer(),
        };
        let now = Instant::now();
        RedisStreamSource {
            consumer,
            consumer_per_process,
            dead_letter: config.dead_letter_stream(),
            url: shown_url(&config.url),
            config,
            conn: None,
            stats: SourceStats::new(),
            redis_stats: RedisStats::default(),
            in_flight: HashMap::new(),
            claim_cursor: None,
            next_claim: now,
            next_touch: now,
            history: None,
            owed_acks: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RedisSourceConfig {
        &self.config
    }

    /// This consumer's name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The dead-letter stream.
    pub fn dead_letter(&self) -> &str {
        &self.dead_letter
    }

    /// The message counters (a shared handle).
    pub fn stats(&self) -> SourceStats {
        self.stats.clone()
    }

    /// The Redis-specific counters (a shared handle).
    pub fn redis_stats(&self) -> RedisStats {
        self.redis_stats.clone()
    }

    fn claim_every(&self) -> Duration {
        Duration::from_millis((self.config.claim_idle_ms / 2).max(1))
    }

    fn touch_every(&self) -> Duration {
        Duration::from_millis((self.config.claim_idle_ms / 3).max(1))
    }

    /// A source error from a Redis error; a retryable one drops the
    /// connection so that the runtime's reconnect opens a new one.
    fn error(&mut self, kind: SourceErrorKind, doing: &str, e: &RedisError) -> SourceError {
        let message = format!("{doing} ({} stream {}): {e}", self.url, self.config.stream);
        if is_retryable(e, self.config.create_group) {
            self.conn = None;
            SourceError::transient(kind, message)
        } else {
            SourceError::fatal(kind, message)
        }
    }

    fn disconnected(&self, kind: SourceErrorKind) -> SourceError {
        SourceError::transient(kind, format!("not connected to {}", self.url))
    }

    fn bad_reply(&mut self, kind: SourceErrorKind, e: &wire::BadReply) -> SourceError {
        // The connection may be out of step with its replies: open a new one.
        self.conn = None;
        SourceError::transient(
            kind,
            format!("{} stream {}: {e}", self.url, self.config.stream),
        )
    }

    /// Sends one command.
    async fn query(
        &mut self,
        kind: SourceErrorKind,
        doing: &str,
        cmd: &Cmd,
    ) -> Result<Value, SourceError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.disconnected(kind));
        };
        match cmd.query_async::<Value>(conn).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.error(kind, doing, &e)),
        }
    }

    /// Sends a pipeline (atomic or not).
    async fn query_pipe(
        &mut self,
        kind: SourceErrorKind,
        doing: &str,
        pipe: &Pipeline,
    ) -> Result<Value, SourceError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.disconnected(kind));
        };
        match pipe.query_async::<Value>(conn).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.error(kind, doing, &e)),
        }
    }

    /// `XACK`s `ids` in chunks, as one pipeline.
    async fn send_acks(
        &mut self,
        kind: SourceErrorKind,
        ids: &[SourceId],
    ) -> Result<(), SourceError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut buf = [0u8; MAX_ID_LEN];
        for chunk in ids.chunks(ACK_CHUNK) {
            let cmd = pipe
                .cmd("XACK")
                .arg(&self.config.stream)
                .arg(&self.config.group);
            for &id in chunk {
                let n = wire::write_id(id, &mut buf);
                cmd.arg(&buf[..n]);
            }
            pipe.ignore();
        }
        self.query_pipe(kind, "XACK", &pipe).await.map(drop)
    }

    /// Keeps the entries in flight claimed by this consumer, so that other
    /// consumers do not take them over while they are being handled.
    async fn keep_alive(&mut self, kind: SourceErrorKind) -> Result<(), SourceError> {
        let now = Instant::now();
        if now < self.next_touch {
            return Ok(());
        }
        let every = self.touch_every();
        self.next_touch = now + every;
        let stale: Vec<SourceId> = self
            .in_flight
            .iter()
            .filter(|(_, &at)| now.duration_since(at) >= every)
            .map(|(&id, _)| id)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut buf = [0u8; MAX_ID_LEN];
        for chunk in stale.chunks(ACK_CHUNK) {
            let cmd = pipe
                .cmd("XCLAIM")
                .arg(&self.config.stream)
                .arg(&self.config.group)
                .arg(&self.consumer)
                .arg(0);
            for &id in chunk {
                let n = wire::write_id(id, &mut buf);
                cmd.arg(&buf[..n]);
            }
            cmd.arg("JUSTID");
            pipe.ignore();
        }
        self.query_pipe(kind, "XCLAIM (keep-alive)", &pipe).await?;
        for id in stale {
            if let Some(at) = self.in_flight.get_mut(&id) {
                *at = now;
            }
        }
        tracing::trace!(consumer = %self.consumer, "kept entries in flight claimed");
        Ok(())
    }

    /// Turns entries into messages, skipping those already in flight here
    /// (their idle time was just reset by the read). Deleted entries are
    /// returned apart: there is nothing to handle, only to ack.
    fn admit(&mut self, entries: Vec<Entry>) -> (Vec<SourceMsg>, Vec<SourceId>) {
        let now = Instant::now();
        let mut msgs = Vec::with_capacity(entries.len());
        let mut gone = Vec::new();
        for e in entries {
            match e.fields {
                None => gone.push(e.id),
                Some(fields) => {
                    if self.in_flight.insert(e.id, now).is_none() {
                        msgs.push(SourceMsg {
                            id: e.id,
                            msg: wire::entry_msg(fields),
                        });
                    }
                }
            }
        }
        self.stats.record_emitted(msgs.len());
        (msgs, gone)
    }

    /// Reads this consumer's own pending entries after a (re)connect.
    async fn poll_history(&mut self, count: usize) -> Result<Vec<SourceMsg>, SourceError> {
        let Some(cursor) = self.history.clone() else {
            return Ok(Vec::new());
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&self.config.stream)
            .arg(&cursor[..]);
        let reply = self
            .query(SourceErrorKind::Poll, "XREADGROUP (pending)", &cmd)
            .await?;
        let entries =
            wire::read_reply(reply).map_err(|e| self.bad_reply(SourceErrorKind::Poll, &e))?;
        let Some(last) = entries.last() else {
            self.history = None;
            return Ok(Vec::new());
        };
        let mut buf = [0u8; MAX_ID_LEN];
        let n = wire::write_id(last.id, &mut buf);
        self.history = Some(Bytes::copy_from_slice(&buf[..n]));
        let (msgs, gone) = self.admit(entries);
        if !gone.is_empty() {
            // Deleted from the stream while pending: nothing left to handle.
            self.send_acks(SourceErrorKind::Poll, &gone).await?;
        }
        RedisStats::add(&self.redis_stats.inner.redelivered, msgs.len());
        Ok(msgs)
    }

    /// Takes over entries idle for `claim_idle_ms`, when a scan is due.
    async fn poll_claims(&mut self, count: usize) -> Result<Vec<SourceMsg>, SourceError> {
        let now = Instant::now();
        if self.claim_cursor.is_none() {
            if now < self.next_claim {
                return Ok(Vec::new());
            }
            self.claim_cursor = Some(Bytes::from_static(b"0-0"));
        }
        let cursor = self.claim_cursor.clone().unwrap_or_default();
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(self.config.claim_idle_ms)
            .arg(&cursor[..])
            .arg("COUNT")
            .arg(count);
        let reply = self
            .query(SourceErrorKind::Poll, "XAUTOCLAIM", &cmd)
            .await?;
        let (next, entries) =
            wire::autoclaim_reply(reply).map_err(|e| self.bad_reply(SourceErrorKind::Poll, &e))?;
        if &next[..] == b"0-0" {
            self.claim_cursor = None;
            self.next_claim = Instant::now() + self.claim_every();
        } else {
            self.claim_cursor = Some(next);
        }
        let (msgs, _) = self.admit(entries);
        if !msgs.is_empty() {
            tracing::info!(
                consumer = %self.consumer,
                count = msgs.len(),
                "took over entries idle for {} ms",
                self.config.claim_idle_ms
            );
        }
        RedisStats::add(&self.redis_stats.inner.reclaimed, msgs.len());
        Ok(msgs)
    }

    /// Reads new entries.
    async fn poll_new(&mut self, count: usize) -> Result<Vec<SourceMsg>, SourceError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if self.config.block_ms > 0 {
            cmd.arg("BLOCK").arg(self.config.block_ms);
        }
        cmd.arg("STREAMS").arg(&self.config.stream).arg(">");
        let reply = self
            .query(SourceErrorKind::Poll, "XREADGROUP", &cmd)
            .await?;
        let entries =
            wire::read_reply(reply).map_err(|e| self.bad_reply(SourceErrorKind::Poll, &e))?;
        Ok(self.admit(entries).0)
    }

    /// Checks that the group exists (`create_group = false`).
    async fn check_group(&mut self) -> Result<(), SourceError> {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(&self.config.stream);
        let why = format!(
            "{}: stream {} has no consumer group {} and create_group is false",
            self.url, self.config.stream, self.config.group
        );
        let missing = || SourceError::fatal(SourceErrorKind::Connect, why.clone());
        let reply = match self.conn.as_mut() {
            None => return Err(self.disconnected(SourceErrorKind::Connect)),
            Some(conn) => cmd.query_async::<Value>(conn).await,
        };
        match reply {
            Ok(groups) if group_listed(&groups, self.config.group.as_bytes()) => Ok(()),
            Ok(_) => Err(missing()),
            // "ERR no such key": the stream does not exist.
            Err(e) if e.code() == Some("ERR") => Err(missing()),
            Err(e) => Err(self.error(SourceErrorKind::Connect, "XINFO GROUPS", &e)),
        }
    }
}

/// True when an `XINFO GROUPS` reply lists `group`.
fn group_listed(reply: &Value, group: &[u8]) -> bool {
    let Value::Array(groups) = reply else {
        return false;
    };
    groups.iter().any(|g| match g {
        Value::Array(flat) => flat
            .chunks_exact(2)
            .any(|kv| is_bulk(&kv[0], b"name") && is_bulk(&kv[1], group)),
        Value::Map(pairs) => pairs
            .iter()
            .any(|(k, v)| is_bulk(k, b"name") && is_bulk(v, group)),
        _ => false,
    })
}

fn is_bulk(v: &Value, want: &[u8]) -> bool {
    match v {
        Value::BulkString(b) => b == want,
        Value::SimpleString(s) => s.as_bytes() == want,
        _ => false,
    }
}

/// This process's default consumer name (see [`default_consumer_name`]),
/// and whether it is per-process.
fn default_consumer() -> (String, bool) {
    static SOURCES: AtomicU32 = AtomicU32::new(0);
    let stable = std::env::var(SOURCE_CONSUMER_ENV).ok();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok());
    let nth = SOURCES.fetch_add(1, Ordering::Relaxed);
    default_consumer_name(stable.as_deref(), host.as_deref(), std::process::id(), nth)
}

/// The default consumer name of the `nth` (from 0) Redis source of a
/// process: `stable` (the value of [`SOURCE_CONSUMER_ENV`]) when set and not
/// blank, else `<host>-<pid>` (`tempest` when the host name is unknown);
/// with `-2`, `-3`, ... appended for the second, third, ... source. The
/// flag is true for a per-process name.
fn default_consumer_name(
    stable: Option<&str>,
    host: Option<&str>,
    pid: u32,
    nth: u32,
) -> (String, bool) {
    let (base, per_process) = match stable.map(str::trim).filter(|s| !s.is_empty()) {
        Some(stable) => (stable.to_owned(), false),
        None => {
            let host = host.map(str::trim).filter(|h| !h.is_empty());
            (format!("{}-{pid}", host.unwrap_or("tempest")), true)
        }
    };
    let name = if nth == 0 {
        base
    } else {
        format!("{base}-{}", nth + 1)
    };
    (name, per_process)
}

impl FromConfig for RedisStreamSource {
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let config: RedisSourceConfig = tempest_core::config::from_table(config)?;
        config.validate()?;
        Ok(RedisStreamSource::new(config))
    }
}

#[async_trait]
impl Source for RedisStreamSource {
    async fn configure(&mut self, settings: &Settings) -> Result<(), SourceError> {
        self.config
            .validate()
            .map_err(|e| SourceError::config(format!("redis source: {e}")))?;
        let claim_idle = Duration::from_millis(self.config.claim_idle_ms);
        if claim_idle < settings.message_timeout {
            tracing::warn!(
                stream = %self.config.stream,
                "claim_idle_ms ({claim_idle:?}) is shorter than message_timeout ({:?}): \
                 when the runtime cannot poll or ack for that long, other consumers may take \
                 over entries still in flight and handle them twice",
                settings.message_timeout
            );
        }
        Ok(())
    }

    async fn connect(&mut self) -> Result<(), SourceError> {
        self.conn = None;
        let client = redis::Client::open(self.config.url.as_str())
            .map_err(|e| SourceError::config(format!("redis url {}: {e}", self.url)))?;
        let response = Duration::from_millis(self.config.block_ms) + RESPONSE_MARGIN;
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response));
        let conn = match client
            .get_multiplexed_async_connection_with_config(&settings)
            .await
        {
            Ok(conn) => conn,
            Err(e) => return Err(self.error(SourceErrorKind::Connect, "cannot connect", &e)),
        };
        self.conn = Some(conn);

        if self.config.create_group {
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(&self.config.stream)
                .arg(&self.config.group)
                .arg(&self.config.start_id)
                .arg("MKSTREAM");
            let created = match self.conn.as_mut() {
                Some(conn) => cmd.query_async::<Value>(conn).await,
                None => return Err(self.disconnected(SourceErrorKind::Connect)),
            };
            match created {
                Ok(_) => tracing::info!(
                    stream = %self.config.stream,
                    group = %self.config.group,
                    start = %self.config.start_id,
                    "created the consumer group"
                ),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => {
                    return Err(self.error(SourceErrorKind::Connect, "XGROUP CREATE", &e));
                }
            }
        } else {
            self.check_group().await?;
        }

        if !self.owed_acks.is_empty() {
            let owed = std::mem::take(&mut self.owed_acks);
            if let Err(e) = self.send_acks(SourceErrorKind::Connect, &owed).await {
                self.owed_acks = owed;
                return Err(e);
            }
            self.stats.record_acked(&owed);
            tracing::info!(
                count = owed.len(),
                "sent the acks owed since the connection was lost"
            );
        }

        // Entries pending for this consumer that it is not handling (read
        // before a crash, or whose reply was lost) are read again first, and
        // crashed consumers' entries are looked for at once.
        self.history = Some(Bytes::from_static(b"0-0"));
        self.claim_cursor = None;
        self.next_claim = Instant::now();
        RedisStats::add(&self.redis_stats.inner.connects, 1);
        tracing::info!(
            url = %self.url,
            stream = %self.config.stream,
            group = %self.config.group,
            consumer = %self.consumer,
            "connected to redis"
        );
        Ok(())
    }

    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        if self.conn.is_none() {
            return Err(self.disconnected(SourceErrorKind::Poll));
        }
        let count = max.min(self.config.batch_size);
        if count == 0 {
            return Ok(Polled::Idle);
        }
        self.keep_alive(SourceErrorKind::Poll).await?;
        if self.history.is_some() {
            let msgs = self.poll_history(count).await?;
            if !msgs.is_empty() {
                return Ok(Polled::Msgs(msgs));
            }
        }
        let msgs = self.poll_claims(count).await?;
        if !msgs.is_empty() {
            return Ok(Polled::Msgs(msgs));
        }
        let msgs = self.poll_new(count).await?;
        Ok(if msgs.is_empty() {
            Polled::Idle
        } else {
            Polled::Msgs(msgs)
        })
    }

    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        for id in ids {
            self.in_flight.remove(id);
        }
        if let Err(e) = self.send_acks(SourceErrorKind::Ack, ids).await {
            if e.retryable {
                let room = MAX_OWED_ACKS.saturating_sub(self.owed_acks.len());
                if room < ids.len() {
                    let excess = (ids.len() - room).min(self.owed_acks.len());
                    self.owed_acks.drain(..excess);
                }
                self.owed_acks.extend_from_slice(ids);
                return Err(SourceError::transient(
                    SourceErrorKind::Ack,
                    format!("{} (the acks are kept for the reconnect)", e.message),
                ));
            }
            return Err(e);
        }
        self.stats.record_acked(ids);
        if let Err(e) = self.keep_alive(SourceErrorKind::Ack).await {
            tracing::debug!("keep-alive after ack: {e}");
        }
        Ok(())
    }

    async fn fail(&mut self, id: SourceId, reason: &FailReason) -> Result<(), SourceError> {
        self.in_flight.remove(&id);
        self.stats.record_failed();
        let id_text = wire::id_string(id);
        let mut range = redis::cmd("XRANGE");
        range.arg(&self.config.stream).arg(&id_text).arg(&id_text);
        let reply = self.query(SourceErrorKind::Fail, "XRANGE", &range).await?;
        let entries =
            wire::range_reply(reply).map_err(|e| self.bad_reply(SourceErrorKind::Fail, &e))?;
        let fields = entries
            .into_iter()
            .find(|e| e.id == id)
            .and_then(|e| e.fields)
            .unwrap_or_default();

        let mut pipe = redis::pipe();
        pipe.atomic();
        let add = pipe.cmd("XADD").arg(&self.dead_letter).arg("*");
        for (name, value) in &fields {
            add.arg(&name[..]).arg(&value[..]);
        }
        add.arg("tempest_reason")
            .arg(&reason.message)
            .arg("tempest_attempts")
            .arg(reason.attempts)
            .arg("tempest_source_id")
            .arg(&id_text);
        pipe.ignore();
        pipe.cmd("XACK")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&id_text)
            .ignore();
        self.query_pipe(SourceErrorKind::Fail, "dead-lettering (XADD + XACK)", &pipe)
            .await?;
        RedisStats::add(&self.redis_stats.inner.dead_lettered, 1);
        tracing::warn!(
            id = %id_text,
            dead_letter = %self.dead_letter,
            attempts = reason.attempts,
            "dead-lettered: {}",
            reason.message
        );
        Ok(())
    }

    async fn release(&mut self, id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        // Left pending: taken over after claim_idle_ms like a crashed
        // consumer's entry, so it is no longer kept alive here.
        self.in_flight.remove(&id);
        Ok(())
    }

    async fn health(&mut self) -> Health {
        let Some(conn) = self.conn.as_mut() else {
            return Health::Unhealthy(format!("not connected to {}", self.url));
        };
        match redis::cmd("PING").query_async::<Value>(conn).await {
            Ok(_) => Health::Healthy,
            Err(e) => Health::Unhealthy(format!("{}: {e}", self.url)),
        }
    }

    async fn shutdown(&mut self) -> Result<(), SourceError> {
        if self.conn.is_none() {
            return Ok(());
        }
        if !self.owed_acks.is_empty() {
            let owed = std::mem::take(&mut self.owed_acks);
            match self.send_acks(SourceErrorKind::Ack, &owed).await {
                Ok(()) => self.stats.record_acked(&owed),
                Err(e) => tracing::warn!(count = owed.len(), "acks lost at shutdown: {e}"),
            }
        }
        if self.consumer_per_process && self.in_flight.is_empty() {
            // A per-process name is never used again: delete the consumer
            // unless it still has pending entries for others to take over.
            // (A stable name is kept: its next incarnation uses it, and may
            // already be reading as it.)
            let mut pending = redis::cmd("XPENDING");
            pending
                .arg(&self.config.stream)
                .arg(&self.config.group)
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(&self.consumer);
            let idle = matches!(
                self.query(SourceErrorKind::Ack, "XPENDING", &pending).await,
                Ok(Value::Array(ref a)) if a.is_empty()
            );
            if idle {
                let mut del = redis::cmd("XGROUP");
                del.arg("DELCONSUMER")
                    .arg(&self.config.stream)
                    .arg(&self.config.group)
                    .arg(&self.consumer);
                if let Err(e) = self
                    .query(SourceErrorKind::Ack, "XGROUP DELCONSUMER", &del)
                    .await
                {
                    tracing::debug!("deleting consumer {}: {e}", self.consumer);
                }
            }
        }
        self.conn = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_consumer_is_the_stable_identity_else_host_and_pid() {
        let name = |stable, host, nth| default_consumer_name(stable, host, 4242, nth);
        // Set by the agent: the deployment's slot, whatever the host or pid.
        assert_eq!(
            name(Some("wc/server"), Some("node1"), 0),
            ("wc/server".to_owned(), false)
        );
        assert_eq!(
            default_consumer_name(Some("wc/server"), Some("node2"), 7, 0),
            ("wc/server".to_owned(), false)
        );
        assert_eq!(
            name(Some(" wc/server\n"), None, 0),
            ("wc/server".to_owned(), false)
        );
        // Further sources of one process.
        assert_eq!(
            name(Some("wc/server"), Some("node1"), 1),
            ("wc/server-2".to_owned(), false)
        );
        assert_eq!(name(Some("wc/server"), Some("node1"), 2).0, "wc/server-3");
        // Unset or blank: per process.
        assert_eq!(
            name(None, Some("node1\n"), 0),
            ("node1-4242".to_owned(), true)
        );
        assert_eq!(
            name(Some("  "), Some("node1"), 1),
            ("node1-4242-2".to_owned(), true)
        );
        assert_eq!(name(None, None, 0), ("tempest-4242".to_owned(), true));
        assert_eq!(name(None, Some(""), 0), ("tempest-4242".to_owned(), true));
    }

    #[test]
    fn an_explicit_consumer_wins_and_is_kept_at_shutdown() {
        let config = RedisSourceConfig {
            consumer: Some("node-1".into()),
            ..RedisSourceConfig::new("redis://127.0.0.1:6379", "s")
        };
        let source = RedisStreamSource::new(config);
        assert_eq!(source.consumer(), "node-1");
        assert!(!source.consumer_per_process);
    }
}
