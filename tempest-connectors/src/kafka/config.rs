//! [`KafkaSourceConfig`]: the `[source.config]` of kind `"kafka"`.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::Deserialize;
use tempest_core::ConfigError;

/// The largest `batch_size` accepted.
pub const MAX_BATCH_SIZE: usize = 1_000_000;

/// The longest `poll_ms` accepted: a poll must come back soon so the
/// runtime can ack and sweep.
pub const MAX_POLL_MS: u64 = 60_000;

/// The longest `revoke_grace_ms` accepted: librdkafka's default
/// `max.poll.interval.ms`, the rebalance timeout a Kafka broker gives a
/// member to rejoin (a member still waiting past it is dropped from the
/// group, and its commits refused).
pub const MAX_REVOKE_GRACE_MS: u64 = 300_000;

/// librdkafka properties the source sets itself: a `properties` entry for
/// one of them is an error (the key of the source's own table is named).
const OWN_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "brokers"),
    ("metadata.broker.list", "brokers"),
    ("group.id", "group"),
    ("auto.offset.reset", "auto_offset_reset"),
    ("enable.auto.commit", "(commits follow acks: always false)"),
    (
        "enable.auto.offset.store",
        "(commits follow acks: always false)",
    ),
    ("enable.partition.eof", "(always false)"),
];

/// The `[source.config]` of kind `"kafka"`: which brokers, group and topics,
/// and how.
///
/// ```toml
/// [source]
/// kind = "kafka"
/// [source.config]
/// brokers = "kafka-1:9092,kafka-2:9092"  # required: bootstrap servers
/// group = "wordcount"                    # the consumer group (default "tempest")
/// topics = ["sentences"]                 # the topics read, or instead:
/// # topic_regex = "^sentences-.*"        # every topic matching (librdkafka regex)
/// auto_offset_reset = "earliest"         # where a group without a commit starts: earliest | latest
/// # dead_letter_topic = "sentences.dead" # default: "<topic of the record>.dead"
/// batch_size = 512                       # the most records one poll returns
/// poll_ms = 100                          # how long a poll waits for the first record
/// revoke_grace_ms = 5000                 # how long a revoked partition's records in flight
///                                        # may take to complete before its commit (at most
///                                        # the topology's grace_period)
/// format = "value"                       # "value": the payload is the record's value;
///                                        # "record": a KafkaRecord with headers and timestamp
/// [source.config.properties]             # passed to librdkafka as they are: security and tuning
/// "security.protocol" = "sasl_plaintext"
/// "sasl.mechanism" = "PLAIN"
/// "sasl.username" = "tempest"
/// "sasl.password" = "secret"
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// The bootstrap servers, `host:port` separated by commas.
    pub brokers: String,
    /// The consumer group (default `"tempest"`).
    #[serde(default = "default_group")]
    pub group: String,
    /// The topics read (this or `topic_regex`).
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regular expression (librdkafka's syntax, anchored with `^`, added
    /// when missing): every topic matching it is read, including topics
    /// created later.
    #[serde(default)]
    pub topic_regex: Option<String>,
    /// Where a group with no committed offset for a partition starts.
    #[serde(default)]
    pub auto_offset_reset: OffsetReset,
    /// The topic that records failed by the failure policy are written to
    /// (default `"<topic of the record>.dead"`). It must exist unless the
    /// broker creates topics on first use.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// The most records one poll returns (default 512); a poll returns the
    /// smaller of this and what the runtime asks for.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a poll waits for the first record, in milliseconds (default
    /// 100); the rest of a batch is what has already arrived.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How long, in milliseconds, the records in flight from a partition
    /// revoked by a rebalance may take to complete before the partition's
    /// low watermark is committed and the partition let go (default 5000;
    /// 0: at once). What completes within it is committed and not read
    /// again by the partition's next owner; what does not is read again.
    /// Never longer than the topology's `grace_period` (see
    /// [`super::KafkaSource`]), and at most [`MAX_REVOKE_GRACE_MS`] (and
    /// less than `max.poll.interval.ms` when that is set in `properties`).
    #[serde(default = "default_revoke_grace_ms")]
    pub revoke_grace_ms: u64,
    /// What a root's payload is: the record's value (default), or the whole
    /// record with its topic, partition, offset, timestamp and headers
    /// ([`super::KafkaRecord::decode`] reads it back in a task).
    #[serde(default)]
    pub format: RecordFormat,
    /// librdkafka properties passed through as they are (strings, numbers
    /// or booleans): security (`security.protocol`, `sasl.*`, `ssl.*`) and
    /// tuning (`fetch.*`, `session.timeout.ms`, `group.instance.id`, ...).
    /// The properties this source sets itself are refused.
    /// `group.instance.id` defaults to [`Self::group_instance_id`].
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
}

/// Where a group with no committed offset starts (`auto.offset.reset`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// At the oldest record kept (the default).
    #[default]
    Earliest,
    /// At the records produced from now on.
    Latest,
}

impl OffsetReset {
    fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// What a root's payload is made of.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// The record's value, as it is (no copy beyond the one out of
    /// librdkafka's buffer). The key is the root's key either way.
    #[default]
    Value,
    /// A [`super::KafkaRecord`]: topic, partition, offset, timestamp,
    /// headers and value, which a task reads with
    /// [`super::KafkaRecord::decode`].
    Record,
}

fn default_group() -> String {
    "tempest".into()
}
fn default_batch_size() -> usize {
    512
}
fn default_poll_ms() -> u64 {
    100
}
fn default_revoke_grace_ms() -> u64 {
    5_000
}

impl KafkaSourceConfig {
    /// The defaults for `topics` on the brokers `brokers`.
    ///
    /// ```
    /// use tempest_connectors::kafka::KafkaSourceConfig;
    ///
    /// let config = KafkaSourceConfig {
    ///     group: "counters".into(),
    ///     ..KafkaSourceConfig::new("127.0.0.1:9092", ["events"])
    /// };
    /// assert_eq!(config.batch_size, 512);
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn new<T: Into<String>>(
        brokers: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        KafkaSourceConfig {
            brokers: brokers.into(),
            group: default_group(),
            topics: topics.into_iter().map(Into::into).collect(),
            topic_regex: None,
            auto_offset_reset: OffsetReset::default(),
            dead_letter_topic: None,
            batch_size: default_batch_size(),
            poll_ms: default_poll_ms(),
            revoke_grace_ms: default_revoke_grace_ms(),
            format: RecordFormat::default(),
            properties: BTreeMap::new(),
        }
    }

    /// Checks every value; an error names the key at fault. librdkafka
    /// itself checks the `properties` (each one on its own, so the error
    /// names the property).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(ConfigError::at_key(
                "brokers",
                "no broker: give `host:port`, several separated by commas",
            ));
        }
        if let Some(b) = self
            .brokers
            .split(',')
            .map(str::trim)
            .find(|b| !b.is_empty() && !b.contains(':'))
        {
            return Err(ConfigError::at_key(
                "brokers",
                format!("`{b}` has no port: give `host:port`"),
            ));
        }
        if self.group.trim().is_empty() {
            return Err(ConfigError::at_key("group", "the group name is empty"));
        }
        match (&self.topics[..], &self.topic_regex) {
            ([], None) => {
                return Err(ConfigError::at_key(
                    "topics",
                    "no topic: give `topics = [\"name\", ...]` or `topic_regex`",
                ))
            }
            ([_, ..], Some(_)) => {
                return Err(ConfigError::at_key(
                    "topic_regex",
                    "give either `topics` or `topic_regex`, not both",
                ))
            }
            (_, Some(re)) if re.trim_start_matches('^').is_empty() => {
                return Err(ConfigError::at_key(
                    "topic_regex",
                    "the expression is empty",
                ))
            }
            _ => {}
        }
        for t in &self.topics {
            check_topic_name(t).map_err(|why| ConfigError::at_key("topics", why))?;
        }
        if let Some(d) = &self.dead_letter_topic {
            check_topic_name(d).map_err(|why| ConfigError::at_key("dead_letter_topic", why))?;
            if self.topics.contains(d) {
                return Err(ConfigError::at_key(
                    "dead_letter_topic",
                    "the dead-letter topic must not be a topic read",
                ));
            }
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
        if self.poll_ms > MAX_POLL_MS {
            return Err(ConfigError::at_key(
                "poll_ms",
                format!(
                    "must be at most {MAX_POLL_MS}, not {} (a poll must come back soon so the runtime can ack)",
                    self.poll_ms
                ),
            ));
        }
        if self.revoke_grace_ms > MAX_REVOKE_GRACE_MS {
            return Err(ConfigError::at_key(
                "revoke_grace_ms",
                format!(
                    "must be at most {MAX_REVOKE_GRACE_MS}, not {} (past librdkafka's default \
                     max.poll.interval.ms, the broker drops a member that has not rejoined)",
                    self.revoke_grace_ms
                ),
            ));
        }
        if let Some(interval) = self
            .properties
            .get("max.poll.interval.ms")
            .and_then(|v| property_value(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if self.revoke_grace_ms >= interval {
                return Err(ConfigError::at_key(
                    "revoke_grace_ms",
                    format!(
                        "must be less than properties.\"max.poll.interval.ms\" ({interval}), not {} \
                         (the broker drops a member that has not rejoined within it)",
                        self.revoke_grace_ms
                    ),
                ));
            }
        }
        for (name, value) in &self.properties {
            let key = format!("properties.\"{name}\"");
            if let Some((_, own)) = OWN_PROPERTIES.iter().find(|(p, _)| p == name) {
                let why = if own.starts_with('(') {
                    format!("`{name}` is set by the source {own}")
                } else {
                    format!("`{name}` is set by the source: use `{own}`")
                };
                return Err(ConfigError::at_key(key, why));
            }
            let value = property_value(value).map_err(|why| ConfigError::at_key(&key, why))?;
            let mut one = ClientConfig::new();
            one.set(name, value);
            if let Err(e) = one.create_native_config() {
                return Err(ConfigError::at_key(key, format!("librdkafka: {e}")));
            }
        }
        Ok(())
    }

    /// The librdkafka configuration shared by the consumer and the
    /// dead-letter producer: brokers and the passed-through properties.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.trim());
        for (name, value) in &self.properties {
            if let Ok(v) = property_value(value) {
                c.set(name, v);
            }
        }
        c
    }

    /// The consumer's configuration: [`Self::client_config`] plus the group,
    /// the settings commits by watermark need, and the static membership
    /// of [`Self::group_instance_id`] (`stable` is the value of
    /// [`tempest_core::source::SOURCE_CONSUMER_ENV`], read by the caller).
    pub(crate) fn consumer_config(&self, stable: Option<String>) -> ClientConfig {
        let mut c = self.client_config();
        if let Some(id) = self.group_instance_id(stable) {
            c.set("group.instance.id", id);
        }
        c.set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", self.auto_offset_reset.as_str());
        c
    }

    /// The consumer's `group.instance.id` (static membership), given
    /// `stable`, the value of [`tempest_core::source::SOURCE_CONSUMER_ENV`]
    /// (`TEMPEST_SOURCE_CONSUMER`, which the agent sets on a topology server
    /// to its slot's stable identity, such as `wordcount/server`):
    ///
    /// - `group.instance.id` in `properties`, when set: used as it is (the
    ///   consumer config is built from `properties` already), so `None`;
    /// - else `stable`, trimmed, when set and not blank, with every
    ///   character Kafka refuses in an instance id (all but ASCII letters,
    ///   digits, `.`, `_` and `-`) made a `.` (`wordcount/server` becomes
    ///   `wordcount.server`) and cut to 249 bytes: a replaced server
    ///   rejoins as the same static member and gets its partitions back
    ///   without waiting for a rebalance;
    /// - else `None`: a dynamic member (standalone runs, servers started by
    ///   hand).
    pub fn group_instance_id(&self, stable: Option<String>) -> Option<String> {
        if self.properties.contains_key("group.instance.id") {
            return None;
        }
        stable
            .map(|s| {
                s.trim()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "._-".contains(c) {
                            c
                        } else {
                            '.'
                        }
                    })
                    .take(249)
                    .collect::<String>()
            })
            .filter(|s| !s.is_empty())
    }

    /// What the consumer subscribes to: the topics, or the regex (which
    /// librdkafka recognises by its leading `^`).
    pub(crate) fn subscription(&self) -> Vec<String> {
        match &self.topic_regex {
            Some(re) if re.starts_with('^') => vec![re.clone()],
            Some(re) => vec![format!("^{re}")],
            None => self.topics.clone(),
        }
    }

    /// The dead-letter topic of a record read from `topic`.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dead"))
    }
}

/// A property's value as librdkafka takes it (a string).
fn property_value(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "a property is a string, a number or a boolean, not a {}",
            other.type_str()
        )),
    }
}

/// Kafka's rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`.
fn check_topic_name(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("a topic name is empty".into());
    }
    if t.len() > 249 {
        return Err(format!("topic `{t}` is longer than 249 characters"));
    }
    if t == "." || t == ".." {
        return Err(format!("`{t}` is not a topic name"));
    }
    if let Some(c) = t
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic `{t}` has `{c}`: a topic name has only letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_properties(props: &[(&str, &str)]) -> KafkaSourceConfig {
        let mut c = KafkaSourceConfig::new("127.0.0.1:9092", ["t"]);
        for (k, v) in props {
            c.properties
                .insert((*k).to_owned(), toml::Value::String((*v).to_owned()));
        }
        c
    }

    fn instance_id(c: &ClientConfig) -> Option<&str> {
        c.get("group.instance.id")
    }

    #[test]
    fn the_stable_consumer_identity_is_the_default_group_instance_id() {
        let c = with_properties(&[]);
        assert_eq!(
            c.group_instance_id(Some("wordcount/server".into())),
            Some("wordcount.server".into()),
            "only characters Kafka takes in an instance id"
        );
        assert_eq!(
            c.group_instance_id(Some("  wordcount/server-2 \n".into())),
            Some("wordcount.server-2".into()),
            "trimmed"
        );
        assert_eq!(
            c.group_instance_id(Some("x".repeat(300))).map(|s| s.len()),
            Some(249)
        );
        let consumer = c.consumer_config(Some("wordcount/server".into()));
        assert_eq!(instance_id(&consumer), Some("wordcount.server"));
        assert_eq!(consumer.get("group.id"), Some("tempest"));
    }

    #[test]
    fn without_a_stable_identity_the_member_is_dynamic() {
        let c = with_properties(&[]);
        assert_eq!(c.group_instance_id(None), None);
        assert_eq!(c.group_instance_id(Some(String::new())), None);
        assert_eq!(c.group_instance_id(Some(" \t".into())), None);
        assert_eq!(instance_id(&c.consumer_config(None)), None);
        assert_eq!(instance_id(&c.consumer_config(Some("  ".into()))), None);
    }

    #[test]
    fn a_group_instance_id_in_properties_wins_over_the_environment() {
        let c = with_properties(&[("group.instance.id", "mine")]);
        assert!(c.validate().is_ok());
        assert_eq!(c.group_instance_id(Some("wordcount/server".into())), None);
        let consumer = c.consumer_config(Some("wordcount/server".into()));
        assert_eq!(instance_id(&consumer), Some("mine"));
        assert_eq!(instance_id(&c.consumer_config(None)), Some("mine"));
    }
}
