//! The file source in a real process: `wordcount standalone` over a file
//! (`[source] kind = "file"` in Topology.toml) killed with SIGKILL
//! mid-stream, then run again over the same file and checkpoint to the end.
//! The `output` task appends every total it receives to a file
//! ([`wordcount::OUTPUT_ENV`]), flushed before the batch is acked, so the
//! two runs' totals together must account for every word of the input.

#![cfg(unix)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use wordcount::OUTPUT_ENV;

const BIN: &str = env!("CARGO_BIN_EXE_wordcount");

/// The longest any wait may take (a debug build on a busy machine).
const LIMIT: Duration = Duration::from_secs(120);

const SENTENCES: [&str; 5] = [
    "the cow jumped over the moon",
    "an apple a day keeps the doctor away",
    "four score and seven years ago",
    "snow white and the seven dwarfs",
    "i am at two with nature",
];

/// Sentences in the input file.
const LINES: usize = 100_000;
const MAX_PENDING: usize = 2_000;

fn words(sentence: &str) -> impl Iterator<Item = &str> {
    sentence.split_whitespace()
}

/// A process killed when dropped, so a failing test leaves none behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(config: &Path, totals: &Path) -> Proc {
    let child = Command::new(BIN)
        .args(["standalone", "--config"])
        .arg(config)
        .env(OUTPUT_ENV, totals)
        .env_remove("RUST_LOG")
        .env_remove("TEMPEST_LOG_LEVEL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting wordcount");
    Proc(child)
}

fn wait(proc: &mut Proc) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = proc.0.try_wait().expect("waiting for wordcount") {
            return status;
        }
        assert!(start.elapsed() < LIMIT, "wordcount did not exit in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The highest total written for each word.
fn max_totals(path: &Path) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut max: HashMap<String, u64> = HashMap::new();
    // A line cut short by the kill is ignored (a lower total of the same
    // word was written before it, or its root was not acked).
    for line in text.lines() {
        let Some((word, total)) = line.split_once(' ') else {
            continue;
        };
        let Ok(total) = total.parse::<u64>() else {
            continue;
        };
        let m = max.entry(word.to_owned()).or_insert(0);
        *m = (*m).max(total);
    }
    max
}

#[test]
fn sigkill_mid_stream_then_resume_loses_no_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("sentences.txt");
    let mut text = String::new();
    let mut truth: HashMap<String, u64> = HashMap::new();
    for i in 0..LINES {
        let s = SENTENCES[i % SENTENCES.len()];
        text.push_str(s);
        text.push('\n');
        for w in words(s) {
            *truth.entry(w.to_owned()).or_insert(0) += 1;
        }
    }
    std::fs::write(&input, &text).unwrap();
    let total_words: u64 = truth.values().sum();
    let config = dir.path().join("Topology.toml");
    std::fs::write(
        &config,
        format!(
            "max_pending = {MAX_PENDING}\n\
             batch_size = 256\n\
             [source]\n\
             kind = \"file\"\n\
             [source.config]\n\
             path = {:?}\n\
             [metric]\n\
             targets = []\n",
            input.to_str().unwrap()
        ),
    )
    .unwrap();
    let checkpoint = dir.path().join("sentences.txt.checkpoint");

    // Run 1: killed once a fifth of the words were counted.
    let totals_1 = dir.path().join("totals-1.txt");
    let mut first = start(&config, &totals_1);
    let started = Instant::now();
    loop {
        let written = std::fs::read(&totals_1)
            .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64);
        if written >= total_words / 5 {
            break;
        }
        assert!(
            first.0.try_wait().unwrap().is_none(),
            "run 1 ended before it was killed"
        );
        assert!(started.elapsed() < LIMIT, "run 1 made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.0.kill().unwrap(); // SIGKILL
    let status = wait(&mut first);
    assert!(!status.success(), "{status:?}");
    let mid = std::fs::read_to_string(&checkpoint).expect("run 1 wrote a checkpoint");

    // Run 2: the same file and checkpoint, to the end.
    let totals_2 = dir.path().join("totals-2.txt");
    let mut second = start(&config, &totals_2);
    let status = wait(&mut second);
    assert!(status.success(), "run 2: {status:?}");

    // The counts died with run 1, so run 2 counts from zero what run 1 did
    // not finish: per word, run 1's highest total (which covers every
    // sentence run 1 acked, as totals are flushed before acks) plus run 2's
    // must reach the true count.
    let (max_1, max_2) = (max_totals(&totals_1), max_totals(&totals_2));
    let mut over = 0;
    for (word, &want) in &truth {
        let got = max_1.get(word).copied().unwrap_or(0) + max_2.get(word).copied().unwrap_or(0);
        assert!(got >= want, "`{word}`: {got} counted, {want} in the input");
        over += got - want;
    }
    let resumed: u64 = max_2.values().sum();
    println!(
        "checkpoint at the kill: {}; run 2 counted {resumed} of {total_words} words; \
         {over} counted twice",
        mid.trim()
    );
    assert!(resumed < total_words, "run 2 started over");
    // Run 2 repeats only what was in flight around the kill, a bounded
    // number of sentences (7 words at most each).
    assert!(
        over <= 7 * 2 * MAX_PENDING as u64,
        "{over} words counted twice"
    );
    let end = std::fs::read_to_string(&checkpoint).unwrap();
    assert_eq!(
        end,
        format!(
            "{{\"version\":1,\"file\":\"sentences.txt\",\"offset\":{}}}\n",
            text.len()
        )
    );
}
