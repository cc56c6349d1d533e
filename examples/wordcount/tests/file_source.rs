//! The file source in a real process: `wordcount standalone` over a file
//! (`[source] kind = "file"` in Topology.toml) killed with SIGKILL
//! mid-stream, then run again over the same file and checkpoint to the end.
//! The `output` task appends every total it receives to a file
//! ([`wordcount::OUTPUT_ENV`]), flushed before the batch is acked, so the
//! two runs' totals together must account for every word of the input.

#![cfg(unix)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{command, sentence, words, write_config, write_file, Proc};
use wordcount::OUTPUT_ENV;

/// The longest any wait may take (a debug build on a busy machine).
const LIMIT: Duration = Duration::from_secs(120);

/// Sentences in the input file.
const LINES: usize = 100_000;
const MAX_PENDING: usize = 2_000;

/// `wordcount standalone --config <config>`, appending its totals to `totals`.
fn start(label: &str, config: &Path, totals: &Path) -> Proc {
    let mut cmd = command(&["standalone", "--config", config.to_str().unwrap()]);
    cmd.env(OUTPUT_ENV, totals);
    Proc::spawn(label, cmd)
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
    let mut text = String::new();
    let mut truth: HashMap<String, u64> = HashMap::new();
    for i in 0..LINES as u64 {
        let s = sentence(i);
        text.push_str(s);
        text.push('\n');
        for w in words(s) {
            *truth.entry(w).or_insert(0) += 1;
        }
    }
    let input = write_file(dir.path(), "sentences.txt", &text);
    let total_words: u64 = truth.values().sum();
    let config = write_config(
        dir.path(),
        &format!(
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
    );
    let checkpoint = dir.path().join("sentences.txt.checkpoint");

    // Run 1: killed once a fifth of the words were counted.
    let totals_1 = dir.path().join("totals-1.txt");
    let mut first = start("run 1", &config, &totals_1);
    let started = Instant::now();
    loop {
        let written = std::fs::read(&totals_1)
            .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64);
        if written >= total_words / 5 {
            break;
        }
        assert!(first.running(), "run 1 ended before it was killed");
        assert!(started.elapsed() < LIMIT, "run 1 made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.child.kill().unwrap(); // SIGKILL
    let status = first.wait_bounded(LIMIT);
    assert!(!status.success(), "{status:?}");
    let mid = std::fs::read_to_string(&checkpoint).expect("run 1 wrote a checkpoint");

    // Run 2: the same file and checkpoint, to the end.
    let totals_2 = dir.path().join("totals-2.txt");
    let mut second = start("run 2", &config, &totals_2);
    let status = second.wait_bounded(LIMIT);
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
