//! Progress on standard error: spinners and byte bars on a terminal, plain
//! lines otherwise (a CI log or a pipe gets one line per step, never
//! escape codes).

use std::io::{IsTerminal, Read};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether standard error is a terminal.
pub fn tty() -> bool {
    std::io::stderr().is_terminal()
}

/// One step of work: a spinner on a terminal, a line otherwise.
pub struct Step {
    bar: Option<ProgressBar>,
}

impl Step {
    /// Starts a step described by `msg`.
    pub fn start(msg: impl Into<String>) -> Step {
        let msg = msg.into();
        if !tty() {
            eprintln!("{msg} ...");
            return Step { bar: None };
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}") {
            bar.set_style(style);
        }
        bar.set_message(msg);
        bar.enable_steady_tick(Duration::from_millis(100));
        Step { bar: Some(bar) }
    }

    /// Shows what the step is doing now (terminal only: a log gets no
    /// line per compiled crate).
    pub fn detail(&self, msg: impl Into<String>) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.into());
        }
    }

    /// Ends the step with a line saying what it did.
    pub fn done(self, msg: impl AsRef<str>) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("{}", msg.as_ref());
    }

    /// Ends the step without a line (it failed; the error says why).
    pub fn abandon(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A byte progress bar of `len` bytes (hidden off a terminal).
pub fn bytes_bar(len: u64, msg: impl Into<String>) -> ProgressBar {
    if !tty() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg.into());
    bar
}

/// A reader that advances a progress bar as it is read.
pub struct Counting<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R> Counting<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, bar: ProgressBar) -> Self {
        Counting { inner, bar }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}
