//! What the CLI's tests share: running the real `tempest` binary, as a user
//! would, in a directory of the test's choosing and with none of the
//! caller's Tempest environment.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `tempest` binary under test.
pub fn tempest_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tempest"))
}

/// A `tempest` command run in `dir`, without TEMPEST_* variables from the
/// environment of whoever runs the tests.
pub fn tempest(dir: &Path) -> Command {
    let mut cmd = Command::new(tempest_bin());
    cmd.current_dir(dir)
        .env_remove("TEMPEST_DIRECTOR")
        .env_remove("TEMPEST_TOKEN")
        .env_remove("TEMPEST_ADMIN_TOKEN")
        .env_remove("TEMPEST_VIEWER_TOKEN")
        .env_remove("TEMPEST_AGENT_TOKEN")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    cmd
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Run {
    /// Its exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Run {
    /// Panics unless it exited 0.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        self
    }

    /// Panics unless it failed with exit code 1 and exactly one line on
    /// stderr, `error: ...`, with no trace of a panic; returns that line.
    pub fn one_line_error(&self) -> String {
        assert_eq!(self.code, Some(1), "expected exit code 1: {self:#?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("error: "), "{self:#?}");
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("backtrace"),
            "{self:#?}"
        );
        lines[0].to_owned()
    }

    /// The standard output as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `tempest ARGS` in `dir` to the end.
pub fn run(dir: &Path, args: &[&str]) -> Run {
    tempest(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running tempest {args:?}: {e}"))
        .into()
}
