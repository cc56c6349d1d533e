//! The compiled `wordcount` binary, run as a real process: a whole run, a
//! Ctrl-C drain, configuration errors and the help text.

mod common;

use std::process::ExitStatus;
use std::time::Duration;

use common::{acked_in, command, cycled_counts, summary, write_config, Proc};
use wordcount::{DEFAULT_COUNT, DEFAULT_SENTENCES};

/// The longest a whole default run may take (a debug build on a busy machine).
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// The longest a run that fails at start-up, or a drain, may take.
const SHORT_LIMIT: Duration = Duration::from_secs(30);

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `wordcount <args>` to the end, at most `limit`.
fn run(args: &[&str], limit: Duration) -> Output {
    let mut p = Proc::spawn(&format!("wordcount {args:?}"), command(args));
    let status = p.wait_bounded(limit);
    let (stdout, stderr) = p.output();
    Output {
        status,
        stdout,
        stderr,
    }
}

/// The `w=n` pairs of the `top words:` line of `stdout`.
fn top_words(stdout: &str) -> Vec<(String, u64)> {
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("top words:"))
        .collect();
    assert_eq!(lines.len(), 1, "one `top words:` line expected:\n{stdout}");
    lines[0]["top words:".len()..]
        .split_whitespace()
        .map(|pair| {
            let (w, n) = pair.split_once('=').unwrap_or_else(|| panic!("{pair:?}"));
            (
                w.to_owned(),
                n.parse().unwrap_or_else(|_| panic!("{pair:?}")),
            )
        })
        .collect()
}

#[test]
fn standalone_counts_the_embedded_sentences() {
    let out = run(&["standalone"], RUN_LIMIT);
    assert!(
        out.status.success(),
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let summary = summary(&out.stdout);
    assert!(
        summary.starts_with(&format!(
            "wordcount: {DEFAULT_COUNT} roots acked, 0 failed, 0 dead-lettered in "
        )),
        "{summary}"
    );
    assert!(!summary.contains("left un-acked"), "{summary}");

    // The generator cycles the non-empty lines in order.
    let lines: Vec<&str> = DEFAULT_SENTENCES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let expected = cycled_counts(&lines, DEFAULT_COUNT);
    let top = top_words(&out.stdout);
    let the = top.iter().find(|(w, _)| w == "the").map(|&(_, n)| n);
    assert_eq!(the, Some(expected["the"]), "{top:?}");
    assert!(expected["the"] > 0);

    // The whole line: the ten most frequent words, ties by word.
    let mut want: Vec<(String, u64)> = expected.into_iter().collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    want.truncate(10);
    assert_eq!(top, want);
}

#[cfg(unix)]
#[test]
fn ctrl_c_drains_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    // Far more sentences than can be sent before the signal; at a fixed rate
    // so that the run does not take every core from the other tests.
    let config = write_config(
        dir.path(),
        r#"
[source]
kind = "generator"
[source.config]
count = 100000000
rate = 20000.0
payloads = ["the cow jumped over the moon", "an apple a day keeps the doctor away"]
"#,
    );
    let config = config.to_str().unwrap();
    let mut p = Proc::spawn(
        "wordcount standalone",
        command(&["standalone", "--config", config]),
    );

    // The first console progress line: the run is under way.
    p.wait_line("acked ", SHORT_LIMIT);

    p.signal(libc::SIGINT);
    let status = p.wait_bounded(SHORT_LIMIT);
    let (stdout, stderr) = p.output();
    assert!(
        status.success(),
        "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("signal received"),
        "the run did not end on the signal:\n{stderr}"
    );

    let summary = summary(&stdout);
    let acked = acked_in(summary);
    assert!(acked > 0, "{summary}");
    assert!(
        summary.contains(" roots acked, 0 failed, 0 dead-lettered"),
        "{summary}"
    );
    assert!(!summary.contains("left un-acked"), "{summary}");

    // Drained completely: every sentence sent, 0..acked, was counted.
    let expected = cycled_counts(
        &[
            "the cow jumped over the moon",
            "an apple a day keeps the doctor away",
        ],
        acked,
    );
    let top = top_words(&stdout);
    let the = top.iter().find(|(w, _)| w == "the").map(|&(_, n)| n);
    assert_eq!(the, Some(expected["the"]), "{top:?}\n{summary}");
}

/// Runs `wordcount standalone --config <file with text>`, which must fail.
fn config_error(text: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text);
    let out = run(
        &["standalone", "--config", path.to_str().unwrap()],
        SHORT_LIMIT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(
        !out.stdout.contains("roots acked"),
        "it ran anyway:\n{}",
        out.stdout
    );
    (path.display().to_string(), out.stderr)
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let (path, stderr) = config_error("message_timeout = \"30s\"\nmax_pendin = 5\n");
    assert!(
        stderr.contains(&format!("{path}:2:")),
        "no {path}:2: in:\n{stderr}"
    );
    assert!(stderr.contains("`max_pendin`"), "{stderr}");
}

#[test]
fn bad_value_names_the_key() {
    let (path, stderr) = config_error("max_pending = 100\nmessage_timeout = \"10 parsecs\"\n");
    assert!(
        stderr.contains(&format!("{path}:2:")),
        "no {path}:2: in:\n{stderr}"
    );
    assert!(stderr.contains("`message_timeout`"), "{stderr}");
    assert!(stderr.contains("parsecs"), "{stderr}");
}

#[test]
fn unknown_generator_key_names_the_key() {
    let (path, stderr) =
        config_error("[source]\nkind = \"generator\"\n[source.config]\ncount = 10\ncuont = 10\n");
    assert!(
        stderr.contains(&format!("{path}:5:")),
        "no {path}:5: in:\n{stderr}"
    );
    assert!(stderr.contains("`source.config.cuont`"), "{stderr}");
}

#[test]
fn missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("Nowhere.toml");
    let out = run(
        &["standalone", "--config", path.to_str().unwrap()],
        SHORT_LIMIT,
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&path.display().to_string()),
        "{}",
        out.stderr
    );
}

#[test]
fn help() {
    let out = run(&["--help"], SHORT_LIMIT);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("standalone"), "{}", out.stdout);

    let out = run(&["standalone", "--help"], SHORT_LIMIT);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("--config"), "{}", out.stdout);
}

#[test]
fn no_mode_is_a_usage_error() {
    let out = run(&[], SHORT_LIMIT);
    assert!(!out.status.success());
    assert!(out.stderr.contains("standalone"), "{}", out.stderr);
}
