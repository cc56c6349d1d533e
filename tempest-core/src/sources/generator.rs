//! [`GeneratorSource`]: sequence-numbered messages for benchmarks and loss checks.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use tokio::time::Instant;

use crate::source::{FailReason, FromConfig, Polled, Source, SourceError, SourceId, SourceMsg};
use crate::sources::SourceStats;
use crate::ConfigError;

/// The counters of a [`GeneratorSource`]: the [`SourceStats`] every built-in
/// source keeps.
pub type GeneratorStats = SourceStats;

/// The longest a rate-limited poll waits for the next message before it
/// returns [`Polled::Idle`], so that the runtime can ack and sweep.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// Messages numbered 0, 1, 2, ...: the id of each is its sequence number.
///
/// By default it is infinite, produces as fast as it is polled, and the
/// payload is the sequence number in decimal. Builder methods change that:
///
/// - [`count`](Self::count): exhausted after `n` messages;
/// - [`rate`](Self::rate): a fixed rate, open loop (message `i` is due at
///   `start + i / rate` however slowly the pipeline drains);
/// - [`payload_size`](Self::payload_size): the decimal number padded with
///   `x` to a fixed size;
/// - [`cycle`](Self::cycle): message `i` carries `payloads[i % len]`,
///   shared, not copied;
/// - [`track_acks`](Self::track_acks): keep a bitmap of acked sequence
///   numbers to find lost and doubly acked messages.
///
/// [`stats`](Self::stats) counts what was emitted, acked and failed.
///
/// ```
/// use tempest_core::{Bytes, Polled, Source};
/// use tempest_core::sources::GeneratorSource;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut source = GeneratorSource::new()
///     .count(3)
///     .cycle(vec![Bytes::from_static(b"the cow"), Bytes::from_static(b"the moon")]);
/// let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else { panic!() };
/// let payloads: Vec<_> = msgs.iter().map(|m| m.msg.payload_str().unwrap()).collect();
/// assert_eq!(payloads, ["the cow", "the moon", "the cow"]);
/// assert_eq!(source.poll(10).await.unwrap(), Polled::Exhausted);
/// # });
/// ```
///
/// In `Topology.toml` (every key is optional):
///
/// ```toml
/// [source]
/// kind = "generator"
/// [source.config]
/// count = 1_000_000       # default: infinite
/// rate = 50_000.0         # messages per second; default: as fast as polled
/// payload_size = 100      # bytes; default: just the number
/// payloads = ["the cow jumped over the moon", "an apple a day keeps the doctor away"]
/// ```
#[derive(Debug)]
pub struct GeneratorSource {
    /// The next sequence number.
    next: u64,
    /// Exhausted at this sequence number (`u64::MAX`: never).
    end: u64,
    rate: Option<Rate>,
    payload: Payload,
    stats: SourceStats,
}

#[derive(Debug)]
enum Payload {
    /// The decimal sequence number, padded with `x` to at least this size.
    Number { size: usize },
    /// `payloads[i % len]`.
    Cycle(Vec<Bytes>),
}

#[derive(Debug)]
struct Rate {
    per_sec: f64,
    /// When message 0 was due: set by the first poll.
    start: Option<Instant>,
}

impl Rate {
    /// The offset from `start` at which message `i` is due (rounded up to
    /// the nanosecond, so message `i` is never early).
    fn due(&self, i: u64) -> Duration {
        let nanos = (i as f64 * 1e9 / self.per_sec).ceil();
        // The cast saturates: beyond ~584 years nothing is due anyway.
        Duration::from_nanos(nanos as u64)
    }

    /// How many messages are due `elapsed` after the start: the first `i`
    /// whose due time is after `elapsed`. Exact with respect to [`Rate::due`].
    fn due_count(&self, elapsed: Duration) -> u64 {
        let estimate = (elapsed.as_secs_f64() * self.per_sec).floor() as u64;
        let mut n = estimate.saturating_add(1);
        while n > 0 && self.due(n - 1) > elapsed {
            n -= 1;
        }
        while n < u64::MAX && self.due(n) <= elapsed {
            n += 1;
        }
        n
    }
}

impl Default for GeneratorSource {
    fn default() -> Self {
        Self::new()
    }
}

impl GeneratorSource {
    /// An infinite generator, as fast as it is polled, whose payloads are the
    /// sequence numbers in decimal.
    pub fn new() -> Self {
        GeneratorSource {
            next: 0,
            end: u64::MAX,
            rate: None,
            payload: Payload::Number { size: 0 },
            stats: SourceStats::new(),
        }
    }

    /// Stops after `n` messages (numbers `0..n`), then is exhausted.
    pub fn count(mut self, n: u64) -> Self {
        self.end = n;
        self
    }

    /// Produces `per_sec` messages a second, open loop: message `i` is due at
    /// `start + i / per_sec` (the start being the first poll), and a poll
    /// returns every message due (up to its `max`), so a backlog is caught up
    /// rather than skipped. With none due, a poll waits for the next one, but
    /// at most 100 ms.
    ///
    /// # Panics
    ///
    /// If `per_sec` is not a positive finite number.
    pub fn rate(mut self, per_sec: f64) -> Self {
        assert!(
            per_sec.is_finite() && per_sec > 0.0,
            "GeneratorSource::rate must be positive and finite, not {per_sec}"
        );
        self.rate = Some(Rate {
            per_sec,
            start: None,
        });
        self
    }

    /// Pads each payload, the decimal sequence number, with `x` bytes to
    /// `bytes` (a longer number is not cut). Replaced by [`cycle`](Self::cycle).
    pub fn payload_size(mut self, bytes: usize) -> Self {
        self.payload = Payload::Number { size: bytes };
        self
    }

    /// Message `i` carries `payloads[i % payloads.len()]`: a clone of the
    /// [`Bytes`], which shares the buffer. Replaces
    /// [`payload_size`](Self::payload_size).
    ///
    /// # Panics
    ///
    /// If `payloads` is empty.
    pub fn cycle(mut self, payloads: Vec<Bytes>) -> Self {
        assert!(
            !payloads.is_empty(),
            "GeneratorSource::cycle needs at least one payload"
        );
        self.payload = Payload::Cycle(payloads);
        self
    }

    /// Keeps a bitmap of acked sequence numbers, for
    /// [`SourceStats::missing`] and [`SourceStats::duplicate_acks`].
    /// It costs a lock per ack batch and one bit per message.
    pub fn track_acks(self, on: bool) -> Self {
        self.stats.track_acks(on);
        self
    }

    /// The counters (a shared handle; take it before handing the source to
    /// the runtime).
    pub fn stats(&self) -> GeneratorStats {
        self.stats.clone()
    }

    /// Messages `self.next..self.next + n`.
    fn generate(&mut self, n: usize) -> Vec<SourceMsg> {
        let first = self.next;
        let mut msgs = Vec::with_capacity(n);
        match &self.payload {
            Payload::Cycle(payloads) => {
                let len = payloads.len() as u64;
                let mut p = (first % len) as usize;
                for seq in first..first + n as u64 {
                    msgs.push(SourceMsg::new(seq, payloads[p].clone()));
                    p += 1;
                    if p == payloads.len() {
                        p = 0;
                    }
                }
            }
            &Payload::Number { size } => {
                // One buffer for the whole batch, sliced per message.
                let mut buf = BytesMut::with_capacity(n * size.max(20));
                let mut ends = Vec::with_capacity(n);
                for seq in first..first + n as u64 {
                    let start = buf.len();
                    write_decimal(&mut buf, seq);
                    let written = buf.len() - start;
                    if written < size {
                        buf.put_bytes(b'x', size - written);
                    }
                    ends.push(buf.len());
                }
                let buf = buf.freeze();
                let mut start = 0;
                for (seq, end) in (first..).zip(ends) {
                    msgs.push(SourceMsg::new(seq, buf.slice(start..end)));
                    start = end;
                }
            }
        }
        self.next += n as u64;
        msgs
    }
}

/// Appends `v` in decimal.
fn write_decimal(buf: &mut BytesMut, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.put_slice(&digits[i..]);
}

/// The `[source.config]` of kind `"generator"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GeneratorConfig {
    count: Option<u64>,
    #[serde(default, deserialize_with = "positive_rate")]
    rate: Option<f64>,
    payload_size: Option<usize>,
    #[serde(default, deserialize_with = "non_empty_payloads")]
    payloads: Option<Vec<String>>,
}

fn positive_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let rate = f64::deserialize(d)?;
    if rate.is_finite() && rate > 0.0 {
        Ok(Some(rate))
    } else {
        Err(D::Error::custom(format_args!(
            "must be a positive number of messages per second, not {rate}"
        )))
    }
}

fn non_empty_payloads<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let payloads = Vec::<String>::deserialize(d)?;
    if payloads.is_empty() {
        Err(D::Error::custom("must list at least one payload"))
    } else {
        Ok(Some(payloads))
    }
}

impl FromConfig for GeneratorSource {
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let config: GeneratorConfig = crate::config::from_table(config)?;
        let mut source = GeneratorSource::new();
        if let Some(n) = config.count {
            source = source.count(n);
        }
        if let Some(rate) = config.rate {
            source = source.rate(rate);
        }
        match (config.payloads, config.payload_size) {
            (Some(_), Some(_)) => {
                return Err(ConfigError {
                    file: None,
                    line: None,
                    column: None,
                    key: Some("payload_size".into()),
                    message: "`payload_size` and `payloads` exclude each other".into(),
                })
            }
            (Some(payloads), None) => {
                source = source.cycle(payloads.into_iter().map(Bytes::from).collect());
            }
            (None, Some(size)) => source = source.payload_size(size),
            (None, None) => {}
        }
        Ok(source)
    }
}

#[crate::async_trait]
impl Source for GeneratorSource {
    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        if self.next >= self.end {
            return Ok(Polled::Exhausted);
        }
        let mut n = max as u64;
        if let Some(rate) = &mut self.rate {
            let now = Instant::now();
            let start = *rate.start.get_or_insert(now);
            let mut due = rate.due_count(now - start).saturating_sub(self.next);
            if due == 0 {
                let next_due = start + rate.due(self.next);
                tokio::time::sleep_until(next_due.min(now + MAX_WAIT)).await;
                due = rate
                    .due_count(Instant::now() - start)
                    .saturating_sub(self.next);
                if due == 0 {
                    return Ok(Polled::Idle);
                }
            }
            n = n.min(due);
        }
        let n = n.min(self.end - self.next) as usize;
        if n == 0 {
            return Ok(Polled::Idle);
        }
        let msgs = self.generate(n);
        self.stats.record_emitted(n);
        Ok(Polled::Msgs(msgs))
    }

    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.stats.record_acked(ids);
        Ok(())
    }

    async fn fail(&mut self, _id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        self.stats.record_failed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls until exhausted, with at most `max` per poll.
    async fn drain(source: &mut GeneratorSource, max: usize) -> Vec<SourceMsg> {
        let mut all = Vec::new();
        loop {
            match source.poll(max).await.unwrap() {
                Polled::Msgs(msgs) => {
                    assert!(!msgs.is_empty() && msgs.len() <= max);
                    all.extend(msgs);
                }
                Polled::Idle => {}
                Polled::Exhausted => return all,
            }
        }
    }

    fn payloads(msgs: &[SourceMsg]) -> Vec<&str> {
        msgs.iter().map(|m| m.msg.payload_str().unwrap()).collect()
    }

    #[tokio::test]
    async fn counts_then_exhausted() {
        let mut source = GeneratorSource::new().count(25);
        let stats = source.stats();
        let msgs = drain(&mut source, 10).await;
        assert_eq!(msgs.len(), 25);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.id, SourceId::from(i as u64));
            assert_eq!(m.msg.payload_str(), Some(i.to_string().as_str()));
            assert_eq!(m.msg.key(), None);
        }
        assert_eq!(source.poll(10).await.unwrap(), Polled::Exhausted);
        assert_eq!(stats.emitted(), 25);
    }

    #[tokio::test]
    async fn zero_count_is_exhausted_at_once() {
        let mut source = GeneratorSource::new().count(0);
        assert_eq!(source.poll(10).await.unwrap(), Polled::Exhausted);
    }

    #[tokio::test]
    async fn infinite_by_default() {
        let mut source = GeneratorSource::new();
        for round in 0..3u64 {
            let Polled::Msgs(msgs) = source.poll(1000).await.unwrap() else {
                panic!("expected messages");
            };
            assert_eq!(msgs.len(), 1000);
            assert_eq!(msgs[0].id, SourceId::from(round * 1000));
        }
    }

    #[tokio::test]
    async fn cycles_payloads_without_copying() {
        let sentences = vec![
            Bytes::from("the cow jumped over the moon"),
            Bytes::from("an apple a day"),
            Bytes::from("four score and seven"),
        ];
        let mut source = GeneratorSource::new().count(8).cycle(sentences.clone());
        // Odd batch sizes so the cycle position carries across polls.
        let msgs = drain(&mut source, 3).await;
        assert_eq!(msgs.len(), 8);
        for (i, m) in msgs.iter().enumerate() {
            let expected = &sentences[i % 3];
            assert_eq!(m.msg.payload(), expected);
            assert_eq!(m.msg.payload().as_ptr(), expected.as_ptr(), "copied");
        }
    }

    #[tokio::test]
    async fn pads_payloads_to_size() {
        let mut source = GeneratorSource::new().count(12).payload_size(4);
        let msgs = drain(&mut source, 5).await;
        let p = payloads(&msgs);
        assert_eq!(p[0], "0xxx");
        assert_eq!(p[9], "9xxx");
        assert_eq!(p[11], "11xx");

        // A number longer than the size is kept whole.
        let mut source = GeneratorSource::new().payload_size(1);
        source.next = 12345;
        let Polled::Msgs(msgs) = source.poll(1).await.unwrap() else {
            panic!("expected a message");
        };
        assert_eq!(payloads(&msgs), ["12345"]);
        assert_eq!(msgs[0].id, SourceId::from(12345));
    }

    #[test]
    fn writes_decimal() {
        for v in [0, 7, 10, 99, 100, 12_345_678, u64::MAX] {
            let mut buf = BytesMut::new();
            write_decimal(&mut buf, v);
            assert_eq!(&buf[..], v.to_string().as_bytes());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_paces_messages_in_virtual_time() {
        let mut source = GeneratorSource::new().count(200).rate(1000.0);
        let start = Instant::now();
        let msgs = drain(&mut source, 64).await;
        let took = start.elapsed();
        assert_eq!(msgs.len(), 200);
        // Message 199 is due at 199 ms.
        assert!(took >= Duration::from_millis(199), "{took:?}");
        assert!(took < Duration::from_millis(250), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_catches_up_a_backlog_open_loop() {
        let mut source = GeneratorSource::new().rate(100.0);
        // The first poll starts the clock: message 0 is due at once.
        let Polled::Msgs(msgs) = source.poll(100).await.unwrap() else {
            panic!("expected message 0");
        };
        assert_eq!(msgs.len(), 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        // Messages 1..=50 are due by 500 ms; max caps the batch.
        let Polled::Msgs(msgs) = source.poll(30).await.unwrap() else {
            panic!("expected a backlog");
        };
        assert_eq!(msgs.len(), 30);
        let Polled::Msgs(msgs) = source.poll(100).await.unwrap() else {
            panic!("expected the rest of the backlog");
        };
        assert_eq!(msgs.len(), 20);
        assert_eq!(msgs.last().unwrap().id, SourceId::from(50));
        // Nothing due now: it waits for message 51 (10 ms later).
        let before = Instant::now();
        let Polled::Msgs(msgs) = source.poll(100).await.unwrap() else {
            panic!("expected message 51");
        };
        assert_eq!(msgs.len(), 1);
        assert_eq!(before.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_rate_returns_idle_after_100ms() {
        let mut source = GeneratorSource::new().rate(1.0);
        assert!(matches!(source.poll(10).await.unwrap(), Polled::Msgs(_)));
        let before = Instant::now();
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        assert_eq!(before.elapsed(), MAX_WAIT);
    }

    #[test]
    fn due_count_matches_due_times() {
        for per_sec in [1.0, 3.0, 7.5, 1000.0, 1e6, 3.3e7] {
            let rate = Rate {
                per_sec,
                start: None,
            };
            for i in [0u64, 1, 2, 3, 10, 999, 1_000_003] {
                let at = rate.due(i);
                assert_eq!(rate.due_count(at), i + 1, "rate {per_sec}, i {i}");
                if !at.is_zero() {
                    assert_eq!(rate.due_count(at - Duration::from_nanos(1)), i);
                }
            }
        }
    }

    #[tokio::test]
    async fn tracks_missing_and_duplicate_acks() {
        let mut source = GeneratorSource::new().count(10).track_acks(true);
        let stats = source.stats();
        drain(&mut source, 4).await;
        let ids: Vec<SourceId> = [0u64, 1, 2, 4, 5, 7, 8, 9, 4]
            .into_iter()
            .map(SourceId::from)
            .collect();
        source.ack(&ids[..5]).await.unwrap();
        source.ack(&ids[5..]).await.unwrap();
        let reason = FailReason {
            message: "timeout".into(),
            attempts: 1,
        };
        source.fail(SourceId::from(6), &reason).await.unwrap();
        assert_eq!(stats.missing(10), [3, 6]);
        assert_eq!(stats.duplicate_acks(), 1);
        assert_eq!((stats.emitted(), stats.acked(), stats.failed()), (10, 9, 1));
    }

    #[tokio::test]
    async fn from_config() {
        let table: toml::Table = toml::from_str(
            r#"
            count = 4
            rate = 1e6
            payloads = ["a", "b"]
            "#,
        )
        .unwrap();
        let mut source = GeneratorSource::from_config(&table).unwrap();
        let msgs = drain(&mut source, 10).await;
        assert_eq!(payloads(&msgs), ["a", "b", "a", "b"]);

        let table: toml::Table = toml::from_str("count = 2\npayload_size = 3").unwrap();
        let mut source = GeneratorSource::from_config(&table).unwrap();
        assert_eq!(payloads(&drain(&mut source, 10).await), ["0xx", "1xx"]);

        let mut source = GeneratorSource::from_config(&toml::Table::new()).unwrap();
        assert!(matches!(source.poll(2).await.unwrap(), Polled::Msgs(m) if m.len() == 2));
    }

    #[test]
    fn config_errors_name_the_key() {
        let cases = [
            ("count = 1\ncuont = 2", "cuont"),
            ("rate = 0.0", "rate"),
            ("rate = -5", "rate"),
            ("payloads = []", "payloads"),
            ("payloads = [\"a\"]\npayload_size = 3", "payload_size"),
            ("count = -1", "count"),
        ];
        for (text, key) in cases {
            let table: toml::Table = toml::from_str(text).unwrap();
            let err = GeneratorSource::from_config(&table).err().unwrap();
            assert!(err.to_string().contains(key), "{text:?}: {err}");
        }
    }
}
