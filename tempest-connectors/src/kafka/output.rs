//! [`KafkaOutput`]: records produced from a task, delivered in the task's
//! `flush`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::{ClientConfig, ClientContext};
use tempest_core::TaskError;

/// The default time a flush may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts delivery failures (librdkafka reports deliveries on the thread
/// that polls the producer: the task's, in `send` and `flush`).
#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", "{fac}: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac}: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "kafka output: {error}: {reason}");
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Records produced to Kafka from a task: buffered by librdkafka (which
/// batches them per partition) and delivered by [`KafkaOutput::flush`].
///
/// The producer is idempotent (`enable.idempotence=true`: `acks=all`, and
/// retries inside librdkafka never duplicate or reorder a partition's
/// records). Call the sending methods from
/// [`Task::handle`](tempest_core::Task::handle) and `flush` from
/// [`Task::flush`](tempest_core::Task::flush): the runtime calls it after
/// each batch and before the batch's results go back, so a root is never
/// acked before its records are in Kafka. A flush that fails (not delivered
/// within the timeout, or refused) fails the whole batch with a retryable
/// [`TaskError`] and drops what was not delivered; the replayed messages
/// send their records again.
///
/// Delivery is at-least-once like the rest of Tempest: records delivered
/// before a failed flush are sent again by the replay.
///
/// ```no_run
/// use tempest_connectors::kafka::KafkaOutput;
/// use tempest_core::{Msg, Task, TaskError, TaskResult};
///
/// struct Upper {
///     out: KafkaOutput,
/// }
///
/// impl Task for Upper {
///     fn handle(&mut self, msg: Msg) -> TaskResult {
///         let text = msg.payload_str().ok_or("not UTF-8")?.to_uppercase();
///         self.out.send("upper", msg.key().map(|k| &k[..]), text.as_bytes())?;
///         Ok(None)
///     }
///
///     fn flush(&mut self) -> Result<(), TaskError> {
///         self.out.flush()
///     }
/// }
///
/// let task = Upper { out: KafkaOutput::new("127.0.0.1:9092").unwrap() };
/// ```
pub struct KafkaOutput {
    producer: BaseProducer<Deliveries>,
    brokers: String,
    sent: u64,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOutput")
            .field("brokers", &self.brokers)
            .field("buffered", &self.sent)
            .finish()
    }
}

impl KafkaOutput {
    /// An output to the brokers `brokers` (`host:port`, comma separated).
    /// It connects in the background; an error only for a configuration
    /// librdkafka refuses.
    pub fn new(brokers: &str) -> Result<Self, TaskError> {
        Self::with_properties(brokers, std::iter::empty::<(String, String)>())
    }

    /// An output with librdkafka properties (security, `linger.ms`,
    /// `compression.type`, ...). `enable.idempotence` is always true.
    pub fn with_properties<K: Into<String>, V: Into<String>>(
        brokers: &str,
        properties: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, TaskError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                DEFAULT_TIMEOUT.as_millis().to_string(),
            );
        for (k, v) in properties {
            c.set(k, v);
        }
        c.set("enable.idempotence", "true");
        let producer = BaseProducer::from_config_and_context(&c, Deliveries::default())
            .map_err(|e| TaskError::permanent(format!("kafka output {brokers}: {e}")))?;
        Ok(KafkaOutput {
            producer,
            brokers: brokers.to_owned(),
            sent: 0,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// How long a flush may wait for the broker (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Queues a record for `topic` (its partition chosen by its key).
    pub fn send(&mut self, topic: &str, key: Option<&[u8]>, value: &[u8]) -> Result<(), TaskError> {
        self.send_record(topic, key, value, &[], None)
    }

    /// Queues a record with headers and a timestamp (milliseconds since the
    /// Unix epoch; default: now).
    pub fn send_record(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
        timestamp: Option<i64>,
    ) -> Result<(), TaskError> {
        let mut record = BaseRecord::to(topic).payload(value);
        if let Some(k) = key {
            record = record.key(k);
        }
        if !headers.is_empty() {
            let mut h = OwnedHeaders::new_with_capacity(headers.len());
            for (name, value) in headers {
                h = h.insert(Header {
                    key: name,
                    value: Some(*value),
                });
            }
            record = record.headers(h);
        }
        if let Some(ts) = timestamp {
            record = record.timestamp(ts);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    // librdkafka's queue is full: serve deliveries and retry.
                    record = r;
                    self.producer.poll(Duration::from_millis(100));
                }
                Err((e, _)) => {
                    return Err(TaskError::new(format!(
                        "kafka output {}: queueing a record for {topic}: {e}",
                        self.brokers
                    )))
                }
            }
        }
    }

    /// Records queued since the last flush.
    pub fn buffered(&self) -> u64 {
        self.sent
    }

    /// Waits until every record queued since the last flush is delivered
    /// (acknowledged by all in-sync replicas). Does nothing when nothing is
    /// queued. On error what was not delivered is dropped and the error is
    /// retryable.
    pub fn flush(&mut self) -> Result<(), TaskError> {
        if self.sent == 0 {
            return Ok(());
        }
        let flushed = self.producer.flush(self.timeout);
        let ctx = self.producer.context();
        let result = match flushed {
            Err(e) => {
                // Drop what is still queued, and hear about it now.
                self.producer
                    .purge(PurgeConfig::default().queue().inflight());
                self.producer.poll(Duration::ZERO);
                Err(TaskError::new(format!(
                    "kafka output {}: not delivered within {:?}: {e}",
                    self.brokers, self.timeout
                )))
            }
            Ok(()) if ctx.failed.load(Ordering::Relaxed) > 0 => {
                let first = ctx
                    .first_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_default();
                Err(TaskError::new(format!(
                    "kafka output {}: {} record(s) not delivered: {first}",
                    self.brokers,
                    ctx.failed.load(Ordering::Relaxed)
                )))
            }
            Ok(()) => Ok(()),
        };
        ctx.failed.store(0, Ordering::Relaxed);
        ctx.delivered.store(0, Ordering::Relaxed);
        *ctx.first_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.sent = 0;
        result
    }
}
