//! {{name}}: a Tempest topology.
//!
//! ```text
//! {{source_short}} -> split -(key: word)-> count
//! ```
//!
//! - `cargo test` runs the tests below (the test runtime, no broker needed);
//! - `cargo run -- standalone` runs the whole topology in one process;
//! - `tempest package` builds the archive a cluster runs, `tempest deploy`
//!   uploads and starts it.

// `tempest generate` declares the modules it adds above this line. @tempest:modules

use std::collections::HashMap;
use std::process::ExitCode;

{{source_use}}

/// Splits a line into lowercase words, each keyed by itself, so that key
/// grouping sends every occurrence of a word to the same `count` instance.
pub struct Split;

impl Task for Split {
    fn handle(&mut self, msg: Msg) -> TaskResult {
        let text = msg.payload_str().ok_or("the line is not UTF-8")?;
        let words = text
            .split_whitespace()
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
            .filter(|w| !w.is_empty())
            .map(|w| Msg::keyed_by_payload(w.to_lowercase()))
            .collect();
        // Ok(Some(msgs)): send these downstream; Ok(None): done;
        // Err(..): this message failed (Topology.toml's [failure] decides).
        Ok(Some(words))
    }
}

/// Keeps a running total per word (state of this instance) and emits
/// `word total`, keyed by the word.
#[derive(Default)]
pub struct Count {
    totals: HashMap<String, u64>,
}

impl Task for Count {
    fn handle(&mut self, msg: Msg) -> TaskResult {
        let word = msg.payload_str().ok_or("the word is not UTF-8")?.to_owned();
        let total = self.totals.entry(word.clone()).or_insert(0);
        *total += 1;
        let line = format!("{word} {total}");
        Ok(Some(vec![Msg::new(line).with_key(word)]))
    }
}

/// The pipeline: split -> count, key-grouped on the word.
pub fn pipeline() -> Pipeline {
    Pipeline::new()
        .task("split", || Split)
        .task_with_workers("count", 2, Count::default)
        .edge_grouped("split", "count", Grouping::Key)
    // `tempest generate task` adds tasks above this line. @tempest:tasks
}

{{source_fn}}

/// The topology. Topology.toml overrides its settings (and its source) when
/// it runs; the tests run it as written here.
pub fn topology() -> Topology {
    Topology::builder("{{name}}")
        .source(source()){{source_kinds}}
        // `tempest generate source` registers source kinds above this line. @tempest:sources
        .pipeline(pipeline())
        .build()
        .expect("the topology is valid")
}

fn main() -> ExitCode {
    tempest::main(topology)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempest::testing::TestRuntime;

    #[test]
    fn split_lowercases_and_keys_every_word() {
        let out = Split
            .handle(Msg::new("The cow, the MOON!"))
            .unwrap()
            .unwrap();
        let words: Vec<&str> = out.iter().map(|m| m.payload_str().unwrap()).collect();
        assert_eq!(words, ["the", "cow", "the", "moon"]);
        assert_eq!(out[0].key().map(|k| &k[..]), Some(&b"the"[..]));
    }

    #[test]
    fn count_emits_running_totals() {
        let mut count = Count::default();
        count.handle(Msg::keyed_by_payload("the")).unwrap();
        let out = count.handle(Msg::keyed_by_payload("the")).unwrap().unwrap();
        assert_eq!(out[0].payload_str(), Some("the 2"));
    }

    #[test]
    fn every_line_is_acked_and_every_word_counted() {
        let report = TestRuntime::new(topology())
            .input(["the cow jumped over the moon", "the end"])
            .run()
            .unwrap();
        assert!(report.all_acked(), "{:?}", report.outcomes);
        let words = report
            .metrics
            .counter("tempest_task_messages_in", &[("task", "count")]);
        assert_eq!(words, 8);
    }
}
