//! [`RedisOutput`]: buffered writes to Redis from a task, made durable in
//! the task's `flush`.

use std::time::Duration;

use redis::{Client, Cmd, Connection, Pipeline, RedisError, Value};
use tempest_core::TaskError;

use super::{is_retryable, shown_url};

/// The default connect, read and write timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes from a task to Redis: stream entries (`XADD`) and hash fields
/// (`HINCRBY`, `HSET`), buffered and sent together by [`RedisOutput::flush`]
/// as one `MULTI`/`EXEC` transaction (one round trip).
///
/// Call the buffering methods from [`Task::handle`](tempest_core::Task::handle)
/// and `flush` from [`Task::flush`](tempest_core::Task::flush): the runtime
/// calls it after each batch and before the batch's results go back, so a
/// root is never acked before its writes are in Redis. A flush that fails
/// fails the whole batch with a retryable [`TaskError`]; the buffer is
/// discarded (the replayed messages buffer their writes again) and the next
/// flush reconnects.
///
/// Delivery is at-least-once like the rest of Tempest: when a connection
/// drops after `EXEC` was sent, the transaction may have been applied though
/// the batch is replayed, so increments can count twice. Entries written
/// with `XADD` get new ids on a replay; consumers that must not see
/// duplicates dedupe on a field of their own.
///
/// The connection is synchronous (tasks are synchronous): a flush blocks
/// its worker for one round trip, bounded by the timeout (default 5 s).
///
/// ```no_run
/// use tempest_connectors::redis::RedisOutput;
/// use tempest_core::{Msg, Task, TaskError, TaskResult};
///
/// struct CountWords {
///     out: RedisOutput,
/// }
///
/// impl Task for CountWords {
///     fn handle(&mut self, msg: Msg) -> TaskResult {
///         let word = msg.payload_str().ok_or("not UTF-8")?;
///         self.out.hincr("word-counts", word, 1);
///         Ok(None)
///     }
///
///     fn flush(&mut self) -> Result<(), TaskError> {
///         self.out.flush()
///     }
/// }
///
/// let task = CountWords { out: RedisOutput::new("redis://127.0.0.1:6379").unwrap() };
/// ```
pub struct RedisOutput {
    client: Client,
    url: String,
    conn: Option<Connection>,
    pipe: Pipeline,
    timeout: Duration,
}

impl std::fmt::Debug for RedisOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOutput")
            .field("url", &self.url)
            .field("connected", &self.conn.is_some())
            .field("buffered", &self.pipe.len())
            .finish()
    }
}

impl RedisOutput {
    /// An output to the server at `url` that connects at its first flush
    /// (so a task factory can make one without a server up). An error only
    /// for a URL that does not parse.
    pub fn new(url: &str) -> Result<Self, TaskError> {
        let client = Client::open(url).map_err(|e| {
            TaskError::permanent(format!("`{}` is not a Redis URL: {e}", shown_url(url)))
        })?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        Ok(RedisOutput {
            client,
            url: shown_url(url),
            conn: None,
            pipe,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// An output connected to the server at `url` now: an unreachable
    /// server is a (retryable) error here rather than at the first flush.
    pub fn connect(url: &str) -> Result<Self, TaskError> {
        let mut out = Self::new(url)?;
        out.ensure_connected()?;
        Ok(out)
    }

    /// The connect, read and write timeout (default 5 s), for connections
    /// opened from now on.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Buffers `XADD <stream> * <field> <value> ...`.
    pub fn xadd<F: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        stream: impl AsRef<[u8]>,
        fields: &[(F, V)],
    ) -> &mut Self {
        let cmd = self.pipe.cmd("XADD").arg(stream.as_ref()).arg("*");
        for (f, v) in fields {
            cmd.arg(f.as_ref()).arg(v.as_ref());
        }
        self.pipe.ignore();
        self
    }

    /// Buffers `XADD <stream> MAXLEN ~ <maxlen> * <field> <value> ...`: the
    /// stream is trimmed to about `maxlen` entries.
    pub fn xadd_maxlen<F: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        stream: impl AsRef<[u8]>,
        maxlen: usize,
        fields: &[(F, V)],
    ) -> &mut Self {
        let cmd = self
            .pipe
            .cmd("XADD")
            .arg(stream.as_ref())
            .arg("MAXLEN")
            .arg("~")
            .arg(maxlen)
            .arg("*");
        for (f, v) in fields {
            cmd.arg(f.as_ref()).arg(v.as_ref());
        }
        self.pipe.ignore();
        self
    }

    /// Buffers `HINCRBY <hash> <field> <by>`.
    pub fn hincr(&mut self, hash: impl AsRef<[u8]>, field: impl AsRef<[u8]>, by: i64) -> &mut Self {
        self.pipe
            .cmd("HINCRBY")
            .arg(hash.as_ref())
            .arg(field.as_ref())
            .arg(by)
            .ignore();
        self
    }

    /// Buffers `HSET <hash> <field> <value>`.
    pub fn hset(
        &mut self,
        hash: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> &mut Self {
        self.pipe
            .cmd("HSET")
            .arg(hash.as_ref())
            .arg(field.as_ref())
            .arg(value.as_ref())
            .ignore();
        self
    }

    /// Buffers any other command, such as `redis::cmd("SET").arg("k").arg(1)`.
    pub fn command(&mut self, cmd: Cmd) -> &mut Self {
        self.pipe.add_command(cmd).ignore();
        self
    }

    /// Commands buffered since the last flush.
    pub fn buffered(&self) -> usize {
        self.pipe.len()
    }

    /// Drops the buffered commands.
    pub fn discard(&mut self) {
        self.pipe.clear();
    }

    /// Sends the buffered commands as one `MULTI`/`EXEC` transaction. Does
    /// nothing (and needs no server) when nothing is buffered.
    ///
    /// On error the buffer is discarded and the error fails the batch: a
    /// connection error is retryable (the next flush reconnects), an error
    /// from a command (a key of the wrong type) is permanent.
    pub fn flush(&mut self) -> Result<(), TaskError> {
        if self.pipe.is_empty() {
            return Ok(());
        }
        let result = self.send();
        self.pipe.clear();
        result
    }

    fn send(&mut self) -> Result<(), TaskError> {
        self.ensure_connected()?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(TaskError::new(format!("not connected to {}", self.url)));
        };
        match self.pipe.query::<Value>(conn) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.error("writing", &e)),
        }
    }

    fn ensure_connected(&mut self) -> Result<(), TaskError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let conn = self
            .client
            .get_connection_with_timeout(self.timeout)
            .and_then(|c| {
                c.set_read_timeout(Some(self.timeout))?;
                c.set_write_timeout(Some(self.timeout))?;
                Ok(c)
            })
            .map_err(|e| self.error("cannot connect", &e))?;
        self.conn = Some(conn);
        Ok(())
    }

    fn error(&mut self, doing: &str, e: &RedisError) -> TaskError {
        let message = format!("redis output {}: {doing}: {e}", self.url);
        if is_retryable(e, false) {
            self.conn = None;
            TaskError::new(message)
        } else {
            TaskError::permanent(message)
        }
    }
}
