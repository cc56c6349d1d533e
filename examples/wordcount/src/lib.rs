//! Word count, Tempest's first example.
//!
//! ```text
//! source (sentences) -> split -(key: word)-> count -> output
//! ```
//!
//! `split` breaks a sentence into lowercase words, each keyed by itself, so
//! key grouping sends every occurrence of a word to the same `count`
//! instance. `count` keeps a running total per word and emits the new total;
//! `output` keeps the latest total of every word in a shared [`Counts`]
//! table and prints the top words when it shuts down.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tempest::sources::GeneratorSource;
use tempest::{Bytes, Grouping, Msg, Pipeline, Source, Task, TaskContext, TaskResult, Topology};

/// The sentences the example runs on when no source is configured.
pub const DEFAULT_SENTENCES: &str = include_str!("../data/sentences.txt");

/// How many sentences the embedded default input has.
pub const DEFAULT_COUNT: u64 = 200_000;

/// Splits a sentence into lowercase words keyed by themselves.
///
/// Words that are already lowercase are zero-copy slices of the sentence.
pub struct Split;

impl Task for Split {
    fn handle(&mut self, msg: Msg) -> TaskResult {
        Ok(Some(split_words(msg.payload())))
    }
}

/// The words of `text`: split on whitespace, trimmed of anything that is not
/// a letter or digit at either end, lowercased. Text that is not UTF-8 is
/// read lossily.
pub fn split_words(text: &Bytes) -> Vec<Msg> {
    let Ok(s) = std::str::from_utf8(text) else {
        let owned = Bytes::from(String::from_utf8_lossy(text).into_owned());
        return split_words(&owned);
    };
    let mut words = Vec::with_capacity(8);
    for word in s.split_whitespace() {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric());
        if word.is_empty() {
            continue;
        }
        // Words that are already lowercase are zero-copy slices of the text.
        let bytes = if word.chars().any(char::is_uppercase) {
            Bytes::from(word.to_lowercase())
        } else {
            text.slice_ref(word.as_bytes())
        };
        words.push(Msg::keyed_by_payload(bytes));
    }
    words
}

/// Counts words; emits `word` keyed messages whose payload is the new total
/// (8 bytes, big-endian).
#[derive(Default)]
pub struct Count {
    counts: HashMap<Bytes, u64>,
    emit: bool,
}

impl Count {
    /// A counter that emits each new total downstream.
    pub fn emitting() -> Self {
        Count {
            counts: HashMap::new(),
            emit: true,
        }
    }

    /// A counter that only counts (a sink, as in the benchmark).
    pub fn silent() -> Self {
        Count::default()
    }
}

impl Task for Count {
    fn handle(&mut self, msg: Msg) -> TaskResult {
        let (key, payload) = msg.into_parts();
        let word = key.unwrap_or(payload);
        let n = self.counts.entry(word.clone()).or_insert(0);
        *n += 1;
        if self.emit {
            Ok(Some(vec![Msg::new(Bytes::copy_from_slice(
                &n.to_be_bytes(),
            ))
            .with_key(word)]))
        } else {
            Ok(None)
        }
    }
}

/// The latest total of every word, shared between the output task and
/// whoever wants to read it (a test, the summary).
#[derive(Clone, Default)]
pub struct Counts(Arc<Mutex<HashMap<String, u64>>>);

impl Counts {
    /// The total for `word`.
    pub fn get(&self, word: &str) -> u64 {
        self.0.lock().get(word).copied().unwrap_or(0)
    }

    /// Every word's total.
    pub fn snapshot(&self) -> HashMap<String, u64> {
        self.0.lock().clone()
    }

    /// The `n` most frequent words, most frequent first (ties by word).
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut all: Vec<_> = self.snapshot().into_iter().collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// The environment variable naming a file that `output` appends every total
/// it receives to, one `word total` line each (a durable record of what was
/// counted, for checking at-least-once across crashes).
pub const OUTPUT_ENV: &str = "WORDCOUNT_OUTPUT";

/// The environment variable naming a Redis server (`redis://HOST:PORT`)
/// whose hash [`REDIS_HASH_ENV`] (default `wordcount`) `output` increments
/// once per word occurrence, in one atomic pipeline per batch, before the
/// batch is acked. The hash then holds every word's count, durably: a killed
/// `count` worker loses its running totals, not the hash's.
pub const REDIS_ENV: &str = "WORDCOUNT_REDIS";

/// The environment variable naming the Redis hash of counts.
pub const REDIS_HASH_ENV: &str = "WORDCOUNT_REDIS_HASH";

/// Keeps the latest total per word in [`Counts`]; prints the top words at
/// shutdown when `print_top` is set; appends every total to the file named
/// by [`OUTPUT_ENV`], and counts every word in the Redis hash named by
/// [`REDIS_ENV`], if set, both made durable before the batch is acked.
pub struct Output {
    counts: Counts,
    print_top: bool,
    instance: u32,
    log: Option<std::io::BufWriter<std::fs::File>>,
    redis: Option<(tempest_connectors::redis::RedisOutput, String)>,
}

impl Task for Output {
    fn started(&mut self, ctx: &TaskContext) {
        self.instance = ctx.instance;
        if let Ok(url) = std::env::var(REDIS_ENV) {
            let hash = std::env::var(REDIS_HASH_ENV).unwrap_or_else(|_| "wordcount".into());
            match tempest_connectors::redis::RedisOutput::new(&url) {
                Ok(out) => self.redis = Some((out, hash)),
                Err(e) => eprintln!("cannot use Redis at {url}: {e}"),
            }
        }
        if let Some(path) = std::env::var_os(OUTPUT_ENV) {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(f) => self.log = Some(std::io::BufWriter::new(f)),
                // Every message will fail (and be retried or reported) rather
                // than be acked unrecorded.
                Err(e) => eprintln!("cannot open {}: {e}", path.to_string_lossy()),
            }
        }
    }

    fn flush(&mut self) -> Result<(), tempest::TaskError> {
        use std::io::Write;
        if let Some((redis, _)) = &mut self.redis {
            redis.flush()?;
        } else if std::env::var_os(REDIS_ENV).is_some() {
            return Err(tempest::TaskError::new("the Redis output is not available"));
        }
        match &mut self.log {
            Some(log) => log
                .flush()
                .map_err(|e| tempest::TaskError::new(format!("writing totals: {e}"))),
            None if std::env::var_os(OUTPUT_ENV).is_some() => {
                Err(tempest::TaskError::new("the totals file is not open"))
            }
            None => Ok(()),
        }
    }

    fn handle(&mut self, msg: Msg) -> TaskResult {
        let total = <[u8; 8]>::try_from(&msg.payload()[..])
            .map(u64::from_be_bytes)
            .map_err(|_| "count payload is not 8 bytes")?;
        let word = msg.key().ok_or("count message has no key")?;
        let word = std::str::from_utf8(word).map_err(|_| "word is not UTF-8")?;
        if let Some(log) = &mut self.log {
            use std::io::Write;
            writeln!(log, "{word} {total}").map_err(|e| format!("writing totals: {e}"))?;
        }
        if let Some((redis, hash)) = &mut self.redis {
            redis.hincr(hash.as_bytes(), word.as_bytes(), 1);
        }
        let mut counts = self.counts.0.lock();
        // Totals only grow; a redelivered older total must not win.
        let n = counts.entry(word.to_owned()).or_insert(0);
        *n = (*n).max(total);
        Ok(None)
    }

    fn shutdown(&mut self) {
        if self.print_top && self.instance == 0 {
            let top = self.counts.top(10);
            let line: Vec<String> = top.iter().map(|(w, n)| format!("{w}={n}")).collect();
            println!("top words: {}", line.join(" "));
        }
    }
}

/// The pipeline: split (shuffle) -> count (key) -> output (key).
pub fn pipeline(counts: Counts, print_top: bool) -> Pipeline {
    Pipeline::new()
        .task("split", || Split)
        .task_with_workers("count", 2, Count::emitting)
        .task("output", move || Output {
            counts: counts.clone(),
            print_top,
            instance: 0,
            log: None,
            redis: None,
        })
        .edge_grouped("split", "count", Grouping::Key)
        .edge_grouped("count", "output", Grouping::Key)
}

/// The embedded default source: the example's sentences, cycled until
/// [`DEFAULT_COUNT`] have been sent.
pub fn default_source() -> GeneratorSource {
    let sentences = DEFAULT_SENTENCES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Bytes::from(l.to_owned()))
        .collect();
    GeneratorSource::new().cycle(sentences).count(DEFAULT_COUNT)
}

/// The word count topology over `source`, with totals kept in `counts`.
pub fn topology_with(source: impl Source, counts: Counts, print_top: bool) -> Topology {
    Topology::builder("wordcount")
        .source(source)
        // Topology.toml may select `kind = "redis"` or `"nats"` instead.
        .source_kinds(tempest_connectors::register)
        .pipeline(pipeline(counts, print_top))
        .metric_flush_interval(std::time::Duration::from_secs(1))
        .metric_target(tempest::metrics::TargetSpec::Console)
        .build()
        .expect("the word count topology is valid")
}

/// The topology the package runs: the embedded sentences, totals printed at the end.
pub fn topology() -> Topology {
    topology_with(default_source(), Counts::default(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        split_words(&Bytes::from(s.to_owned()))
            .iter()
            .map(|m| m.payload_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn unicode_words_keep_their_letters() {
        assert_eq!(
            words("Café «École» ZÜRICH 日本語!"),
            ["café", "école", "zürich", "日本語"]
        );
        assert_eq!(words(" -- ... "), Vec::<String>::new());
    }
}
