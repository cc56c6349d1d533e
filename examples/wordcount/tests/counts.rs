//! The word count topology in the test runtime: exact totals, every root
//! acked, and metrics that agree with the input.

use std::collections::HashMap;

use tempest::sources::MemorySource;
use tempest::testing::{RootStatus, TestReport, TestRuntime};
use tempest::{Bytes, SourceId};
use wordcount::{split_words, Counts, DEFAULT_SENTENCES};

/// The expected words of `sentence`, written independently of
/// [`wordcount::split_words`]: split on whitespace, trim every character
/// that is not a letter or digit from both ends, lowercase, skip what is
/// left empty.
fn words(sentence: &str) -> Vec<String> {
    sentence
        .split(char::is_whitespace)
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The expected totals of `sentences`, and the number of words in all.
fn expected_counts(sentences: &[String]) -> (HashMap<String, u64>, u64) {
    let mut counts = HashMap::new();
    let mut total = 0;
    for s in sentences {
        for w in words(s) {
            *counts.entry(w).or_insert(0) += 1;
            total += 1;
        }
    }
    (counts, total)
}

/// Runs the word count topology over `sentences` from a memory source.
fn run(sentences: &[String]) -> (TestReport, Counts) {
    let counts = Counts::default();
    let mut topology =
        wordcount::topology_with(MemorySource::new(sentences.to_vec()), counts.clone(), false);
    // The console table would only clutter the test output; the metrics
    // themselves are still recorded and land in the report.
    topology.settings.metrics.targets.clear();
    let report = TestRuntime::new(topology).run().expect("the run starts");
    (report, counts)
}

/// Runs `sentences` and checks totals, acks and metrics against the
/// independent implementation.
fn check(sentences: &[String]) {
    let (expected, total_words) = expected_counts(sentences);
    assert!(
        total_words > 0,
        "the input has no words: nothing is checked"
    );
    let (report, counts) = run(sentences);

    // Every root, the sentences without words included, was acked.
    assert_eq!(
        report.outcomes.len(),
        sentences.len(),
        "{:?}",
        report.outcomes
    );
    for (i, o) in report.outcomes.iter().enumerate() {
        assert_eq!(o.id, SourceId::from(i as u64));
        assert_eq!(o.status, RootStatus::Acked, "root {i}: {o:?}");
        assert_eq!(o.attempts, 1, "root {i}: {o:?}");
    }
    assert!(report.all_acked());
    assert_eq!(report.run.acked(), sentences.len() as u64);
    assert_eq!(report.run.failed(), 0);
    assert_eq!(report.run.dead_lettered(), 0);

    assert_eq!(counts.snapshot(), expected);

    let m = &report.metrics;
    let task_in = |task: &str| m.counter("tempest_task_messages_in", &[("task", task)]);
    let task_out = |task: &str| m.counter("tempest_task_messages_out", &[("task", task)]);
    let task_errors = |task: &str| m.counter("tempest_task_errors", &[("task", task)]);
    assert_eq!(task_in("split"), sentences.len() as u64);
    assert_eq!(task_out("split"), total_words);
    assert_eq!(task_in("count"), total_words);
    assert_eq!(task_out("count"), total_words);
    assert_eq!(task_in("output"), total_words);
    assert_eq!(task_out("output"), 0);
    for task in ["split", "count", "output"] {
        assert_eq!(task_errors(task), 0, "task {task}");
    }
    assert_eq!(
        m.counter("tempest_source_polled", &[]),
        sentences.len() as u64
    );
    assert_eq!(
        m.counter("tempest_source_acked", &[]),
        sentences.len() as u64
    );
}

#[test]
fn default_sentences_repeated() {
    let lines: Vec<&str> = DEFAULT_SENTENCES.lines().collect();
    assert!(lines.len() > 5, "the embedded sentences are missing");
    let sentences: Vec<String> = (0..50)
        .flat_map(|_| lines.iter().map(|l| (*l).to_owned()))
        .collect();
    check(&sentences);

    // Spot checks of the expectation itself: "the" is in many sentences and
    // each line is repeated 50 times.
    let (expected, _) = expected_counts(&sentences);
    assert_eq!(expected["the"] % 50, 0);
    assert!(expected["the"] >= 50 * 10, "{}", expected["the"]);
    assert_eq!(expected["ishmael"], 50);
}

#[test]
fn tricky_sentences() {
    let sentences: Vec<String> = [
        "The cow, the COW; the cOw!",
        "  multiple   spaces\tand\ttabs \r\n and newlines  ",
        "",
        "   ",
        "... --- !!! ???",
        "\"Quoted,\" she said. (Parenthesised) [bracketed] {braced}",
        "don't stop-the-music: it's 4:30 a.m.",
        "naïve Zürich ZÜRICH smörgåsbord",
        "« — » “ ” ‘ ’ … ¿ ¡",
        "crème brûlée's middle: aöb AÖB",
        "x",
        "X x. x! (x)",
        "123 0x1F 42nd",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();

    // The expectation of a few of these, spelled out.
    assert_eq!(
        words("The cow, the COW; the cOw!"),
        ["the", "cow", "the", "cow", "the", "cow"]
    );
    assert!(words("").is_empty() && words("   ").is_empty());
    assert!(words("... --- !!! ???").is_empty());
    assert_eq!(words("don't stop-the-music:"), ["don't", "stop-the-music"]);
    assert_eq!(words("naïve ZÜRICH café"), ["naïve", "zürich", "café"]);

    check(&sentences);
}

#[test]
fn one_sentence_of_one_word() {
    check(&["hello".to_owned()]);
}

/// The words of `text` as strings, checking each message's key is its payload.
fn split(text: &str) -> Vec<String> {
    let text = Bytes::copy_from_slice(text.as_bytes());
    split_words(&text)
        .into_iter()
        .map(|m| {
            assert_eq!(m.key(), Some(m.payload()), "not keyed by itself: {m:?}");
            m.payload_str().expect("a word is UTF-8").to_owned()
        })
        .collect()
}

#[test]
fn split_words_basics() {
    assert_eq!(
        split("the cow jumped over the moon"),
        ["the", "cow", "jumped", "over", "the", "moon"]
    );
    assert_eq!(split("Call me Ishmael."), ["call", "me", "ishmael"]);
    assert_eq!(split("HELLO, World!"), ["hello", "world"]);
    assert_eq!(split("  a  b\t\tc\r\nd\n"), ["a", "b", "c", "d"]);
    assert_eq!(split("don't (stop) \"now\""), ["don't", "stop", "now"]);
    assert_eq!(split("4:30 a.m. 42nd"), ["4:30", "a.m", "42nd"]);
}

#[test]
fn split_words_of_nothing() {
    assert!(split("").is_empty());
    assert!(split(" \t\r\n ").is_empty());
    assert!(split("... ; -- ! ?").is_empty());
}

#[test]
fn split_words_lowercases_every_script() {
    assert_eq!(split("ABC aBc abc"), ["abc", "abc", "abc"]);
    // Non-ASCII letters are letters: kept, and lowercased.
    assert_eq!(split("naïve ZÜRICH"), ["naïve", "zürich"]);
    // Non-ASCII punctuation around a word is trimmed.
    assert_eq!(split("“quoted” «guillemets»"), ["quoted", "guillemets"]);
    assert!(split("— … ¿ ¡").is_empty());
}

#[test]
fn split_words_slices_lowercase_words_without_copying() {
    let text = Bytes::from_static(b"the Cow jumped");
    let range = text.as_ptr() as usize..text.as_ptr() as usize + text.len();
    let words = split_words(&text);
    assert_eq!(words.len(), 3);
    let inside = |b: &Bytes| range.contains(&(b.as_ptr() as usize));
    assert!(inside(words[0].payload()), "`the` was copied");
    assert!(
        !inside(words[1].payload()),
        "`Cow` must be a lowercased copy"
    );
    assert_eq!(&words[1].payload()[..], b"cow");
    assert!(inside(words[2].payload()), "`jumped` was copied");
}

#[test]
fn split_words_agrees_with_the_independent_implementation() {
    for line in DEFAULT_SENTENCES.lines() {
        assert_eq!(split(line), words(line), "{line:?}");
    }
}
