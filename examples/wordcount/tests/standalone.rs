//! The compiled `wordcount` binary, run as a real process: a whole run, a
//! Ctrl-C drain, configuration errors and the help text.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wordcount::{DEFAULT_COUNT, DEFAULT_SENTENCES};

const BIN: &str = env!("CARGO_BIN_EXE_wordcount");

/// The longest a whole default run may take (a debug build on a busy machine).
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// The longest a run that fails at start-up, or a drain, may take.
const SHORT_LIMIT: Duration = Duration::from_secs(30);

/// `wordcount <args>` with stdout and stderr piped and the log level fixed.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("TEMPEST_LOG_LEVEL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Reads all of `r` on a thread.
fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` at most `limit`; past it, kills it and fails the test.
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for wordcount") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: wordcount did not exit within {limit:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `wordcount <args>` to the end, at most `limit`.
fn run(args: &[&str], limit: Duration) -> Output {
    let mut child = command(args).spawn().expect("starting wordcount");
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, limit, &format!("wordcount {args:?}"));
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The words of a sentence, independently of the example: split on ASCII
/// whitespace, trim what is not ASCII alphanumeric, lowercase ASCII.
fn words(sentence: &str) -> impl Iterator<Item = String> + '_ {
    sentence
        .split(|c: char| c.is_ascii_whitespace())
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
}

/// The totals of `sentences[i % len]` for `i` in `0..n`.
fn cycled_counts(sentences: &[&str], n: u64) -> HashMap<String, u64> {
    let len = sentences.len() as u64;
    let mut counts = HashMap::new();
    for (i, s) in sentences.iter().enumerate() {
        // Sentence i is sent at i, i + len, i + 2 len, ... below n.
        let times = n / len + u64::from((i as u64) < n % len);
        for w in words(s) {
            *counts.entry(w).or_insert(0) += times;
        }
    }
    counts
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

/// The summary line (`wordcount: ... roots acked, ...`) of `stdout`.
fn summary(stdout: &str) -> &str {
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("wordcount: "))
        .collect();
    assert_eq!(lines.len(), 1, "one summary line expected:\n{stdout}");
    lines[0]
}

/// The number of roots acked that a summary line reports.
fn acked_in(summary: &str) -> u64 {
    summary
        .strip_prefix("wordcount: ")
        .and_then(|s| s.split_once(" roots acked"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no acked count in {summary:?}"))
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

/// Writes `text` as `Topology.toml` in `dir`.
fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("Topology.toml");
    std::fs::write(&path, text).expect("writing Topology.toml");
    path
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
    let mut child = command(&["standalone", "--config", config])
        .spawn()
        .expect("starting wordcount");
    let stderr = read_all(child.stderr.take().unwrap());

    // Stdout line by line on a thread, so that waiting for a line is bounded.
    let (tx, lines) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // The first console progress line: the run is under way.
    let mut seen = Vec::new();
    let deadline = Instant::now() + SHORT_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let progress = line.starts_with("acked ");
                seen.push(line);
                if progress {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no progress line within {SHORT_LIMIT:?} ({e}); stdout so far:\n{}\nstderr:\n{}",
                    seen.join("\n"),
                    stderr.join().unwrap()
                );
            }
        }
    }

    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits in pid_t");
    // SAFETY: kill(2) with a valid signal number has no memory effects; the
    // child is ours and not yet waited for, so the pid is still its.
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());

    let status = wait_bounded(&mut child, SHORT_LIMIT, "after SIGINT");
    reader.join().unwrap();
    seen.extend(lines.try_iter());
    let stdout = seen.join("\n");
    let stderr = stderr.join().unwrap();
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
