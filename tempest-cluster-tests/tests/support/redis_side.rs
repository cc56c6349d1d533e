//! The Redis side, from the host: the stream the sentences go into (with
//! explicit entry ids, so a feeder that reconnects after Redis restarted
//! neither skips nor repeats one), the consumer group's progress, and the
//! hash of counts.
//!
//! Sentence `n` (from 0) is entry `n+1-0` with the payload `s<n> <text>`:
//! its first word is its own, so the hash tells exactly which sentences were
//! counted, how often.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult, Value};

/// The stream word count reads.
pub const STREAM: &str = "sentences";
/// Its consumer group.
pub const GROUP: &str = "wordcount";
/// The hash word count writes (WORDCOUNT_REDIS_HASH's default).
pub const HASH: &str = "wordcount";
/// The dead-letter stream.
pub const DEAD: &str = "sentences:dead";

/// A connection with timeouts, so a restarting Redis fails a call instead of
/// hanging it.
pub fn connect(url: &str) -> RedisResult<Connection> {
    let con = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_secs(10)))?;
    con.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(con)
}

/// The text of sentence `n`.
pub fn sentence(base: &[String], n: u64) -> String {
    format!("s{n} {}", base[(n % base.len() as u64) as usize])
}

/// The word that marks sentence `n`.
pub fn marker(n: u64) -> String {
    format!("s{n}")
}

/// `"123-0"` -> 123: how many sentences up to and including this entry.
fn ordinal(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// Key/value pairs of a RESP2 flat array or a RESP3 map.
fn pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, v.clone())))
            .collect(),
        Value::Array(a) => a
            .chunks(2)
            .filter_map(|c| Some((text(c.first()?)?, c.get(1)?.clone())))
            .collect(),
        _ => Vec::new(),
    }
}

/// Creates the stream and the group (from the start) if they are missing.
pub fn create_group(con: &mut Connection) -> RedisResult<()> {
    let r: RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(con);
    match r {
        Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// The consumer group's progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupState {
    /// Sentences delivered to a consumer at least once (the ordinal of the
    /// group's last delivered id).
    pub delivered: u64,
    /// Entries delivered and not acked.
    pub pending: u64,
    /// The ordinal of the oldest pending entry.
    pub oldest_pending: Option<u64>,
    /// Entries read by the group (XREADGROUP `>`).
    pub entries_read: u64,
}

impl GroupState {
    /// Entries acked so far.
    pub fn acked(&self) -> u64 {
        self.entries_read.saturating_sub(self.pending)
    }

    /// Whether every one of the first `n` sentences has been delivered and
    /// acked (later ones may still be in flight).
    pub fn done_up_to(&self, n: u64) -> bool {
        self.delivered >= n && self.oldest_pending.is_none_or(|p| p > n)
    }
}

/// Reads the group's state; None if there is no group yet.
pub fn group_state(con: &mut Connection) -> RedisResult<Option<GroupState>> {
    let groups: Value = redis::cmd("XINFO").arg("GROUPS").arg(STREAM).query(con)?;
    let groups = match groups {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    };
    let Some(group) = groups.iter().map(pairs).find(|g| {
        g.iter()
            .any(|(k, v)| k == "name" && text(v).as_deref() == Some(GROUP))
    }) else {
        return Ok(None);
    };
    let field = |name: &str| group.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let mut state = GroupState {
        delivered: field("last-delivered-id")
            .and_then(text)
            .and_then(|s| ordinal(&s))
            .unwrap_or(0),
        entries_read: field("entries-read").and_then(int).unwrap_or(0),
        ..GroupState::default()
    };
    let summary: Value = redis::cmd("XPENDING").arg(STREAM).arg(GROUP).query(con)?;
    if let Value::Array(s) = summary {
        state.pending = s.first().and_then(int).unwrap_or(0);
        state.oldest_pending = s.get(1).and_then(text).and_then(|id| ordinal(&id));
    }
    Ok(Some(state))
}

/// Every field of the hash of counts.
pub fn counts(con: &mut Connection) -> RedisResult<HashMap<String, u64>> {
    redis::cmd("HGETALL").arg(HASH).query(con)
}

/// The length of a stream.
pub fn xlen(con: &mut Connection, stream: &str) -> RedisResult<u64> {
    redis::cmd("XLEN").arg(stream).query(con)
}

/// How many sentences the stream holds (the ordinal of its last entry).
fn last_fed(con: &mut Connection) -> RedisResult<u64> {
    let last: Value = redis::cmd("XREVRANGE")
        .arg(STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(con)?;
    let id = match &last {
        Value::Array(entries) => entries.first().and_then(|e| match e {
            Value::Array(parts) => parts.first().and_then(text),
            _ => None,
        }),
        _ => None,
    };
    Ok(id.and_then(|id| ordinal(&id)).unwrap_or(0))
}

/// What a feeder did.
#[derive(Debug)]
pub struct FeedReport {
    /// Sentences whose XADD Redis confirmed and then no longer had after a
    /// restart: lost by the broker, not by Tempest (must be 0 with the
    /// append-only file on).
    pub broker_lost: u64,
    /// Failed calls (Redis away); each was retried.
    pub errors: u64,
}

/// Feeds sentences `start..end` into the stream at `rate` per second from a
/// thread of its own, reconnecting (and resuming from the stream's last
/// entry) whenever Redis goes away.
pub struct Feeder {
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<FeedReport, String>>>,
}

impl Feeder {
    /// Starts feeding.
    pub fn start(url: &str, base: Arc<Vec<String>>, start: u64, end: u64, rate: f64) -> Feeder {
        let progress = Arc::new(AtomicU64::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let url = url.to_owned();
        let (p, s) = (progress.clone(), stop.clone());
        let handle = std::thread::spawn(move || feed(&url, &base, start, end, rate, &p, &s));
        Feeder {
            progress,
            stop,
            handle: Some(handle),
        }
    }

    /// Sentences in the stream so far (confirmed by Redis).
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::SeqCst)
    }

    /// Waits until every sentence is fed.
    pub fn finish(mut self) -> FeedReport {
        let handle = self.handle.take().expect("a feeder thread");
        match handle.join() {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => panic!("feeding sentences: {e}"),
            Err(_) => panic!("the feeder thread panicked"),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

const FEED_BATCH: u64 = 100;

fn feed(
    url: &str,
    base: &[String],
    start: u64,
    end: u64,
    rate: f64,
    progress: &AtomicU64,
    stop: &AtomicBool,
) -> Result<FeedReport, String> {
    let began = Instant::now();
    // Generous: the feed pauses while Redis restarts, then catches up.
    let deadline =
        began + Duration::from_secs_f64((end - start) as f64 / rate) * 4 + Duration::from_secs(120);
    let mut report = FeedReport {
        broker_lost: 0,
        errors: 0,
    };
    let mut next = start;
    let mut con: Option<Connection> = None;
    let mut last_error = String::new();
    while next < end {
        if stop.load(Ordering::SeqCst) {
            return Err("stopped".into());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of sentences {start}..{end} fed by the deadline; last error: {last_error}",
                next - start
            ));
        }
        if con.is_none() {
            // (Re)connect, then carry on after what the stream holds.
            match connect(url).and_then(|mut c| last_fed(&mut c).map(|n| (c, n))) {
                Ok((c, held)) => {
                    if held < next {
                        report.broker_lost += next - held;
                    }
                    next = held.max(start).min(end);
                    progress.store(next, Ordering::SeqCst);
                    con = Some(c);
                }
                Err(e) => {
                    report.errors += 1;
                    last_error = e.to_string();
                    // Back-off between attempts while Redis is away.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            continue;
        }
        // Open loop: sentence k is due at start + (k - start) / rate.
        let due = began + Duration::from_secs_f64((next - start) as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let n = FEED_BATCH.min(end - next);
        let mut pipe = redis::pipe();
        for k in next..next + n {
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg(format!("{}-0", k + 1))
                .arg("payload")
                .arg(sentence(base, k))
                .ignore();
        }
        let c = con.as_mut().expect("connected above");
        match pipe.query::<()>(c) {
            Ok(()) => {
                next += n;
                progress.store(next, Ordering::SeqCst);
            }
            Err(e) => {
                report.errors += 1;
                last_error = e.to_string();
                con = None;
            }
        }
    }
    Ok(report)
}
