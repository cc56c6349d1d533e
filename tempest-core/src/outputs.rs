//! Outputs for tasks: where a task writes its results so that they are
//! durable before their roots are acked.
//!
//! A task buffers what it writes in [`Task::handle`](crate::Task::handle) and
//! makes it durable in [`Task::flush`](crate::Task::flush), which runs after
//! each batch and before the batch's results go back (and so before any of
//! its roots can be acked). If the process dies before the flush, the roots
//! are not acked, and the source delivers them again: outputs are
//! at-least-once, like everything else.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::TaskError;

/// A file that a task appends lines to, durably: [`FileOutput::line`]
/// buffers a line in memory, [`FileOutput::flush`] writes the buffered lines
/// and syncs them to disk. Call `flush` from [`Task::flush`](crate::Task::flush).
///
/// The file is opened for appending (created if missing), so a restarted
/// topology adds to what an earlier run wrote; as roots can be replayed,
/// a line may be written more than once.
///
/// Each flush writes its lines with one `write` call where the system
/// allows, so instances appending to one file keep their lines whole in
/// practice on a local file system; one file per instance is safer. Lines
/// still buffered when the output is dropped are not written: their roots
/// were never acked, so they are delivered again.
///
/// ```
/// use tempest_core::outputs::FileOutput;
/// use tempest_core::{Msg, Task, TaskError, TaskResult};
///
/// /// Appends every payload to a file, durable before the batch is acked.
/// struct Sink {
///     out: FileOutput,
/// }
///
/// impl Task for Sink {
///     fn handle(&mut self, msg: Msg) -> TaskResult {
///         self.out.line(msg.payload());
///         Ok(None)
///     }
///
///     fn flush(&mut self) -> Result<(), TaskError> {
///         self.out.flush()
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("out.txt");
/// let mut sink = Sink { out: FileOutput::open(&path)? };
/// sink.handle(Msg::from("the cow"))?;
/// sink.handle(Msg::from("jumped"))?;
/// assert_eq!(std::fs::read_to_string(&path)?, "", "buffered until the flush");
/// sink.flush()?;
/// assert_eq!(std::fs::read_to_string(&path)?, "the cow\njumped\n");
/// # Ok(())
/// # }
/// ```
///
/// In a pipeline, each instance opens its own output:
///
/// ```no_run
/// use tempest_core::outputs::FileOutput;
/// use tempest_core::{Msg, Pipeline, Task, TaskContext, TaskError, TaskResult};
///
/// #[derive(Default)]
/// struct Sink {
///     out: Option<FileOutput>,
/// }
///
/// impl Task for Sink {
///     fn started(&mut self, ctx: &TaskContext) {
///         let path = format!("out-{}.txt", ctx.instance);
///         self.out = Some(FileOutput::open(path).expect("cannot open the output"));
///     }
///
///     fn handle(&mut self, msg: Msg) -> TaskResult {
///         self.out.as_mut().ok_or("no output")?.line(msg.payload());
///         Ok(None)
///     }
///
///     fn flush(&mut self) -> Result<(), TaskError> {
///         self.out.as_mut().map_or(Ok(()), FileOutput::flush)
///     }
/// }
///
/// let pipeline = Pipeline::new().task_with_workers("sink", 2, Sink::default);
/// ```
pub struct FileOutput {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    lines: usize,
    /// A failed write may have left part of a line in the file: the next
    /// flush ends it first, so later lines stay whole.
    torn: bool,
}

impl FileOutput {
    /// Opens `path` for appending, creating it if missing.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new().append(true).create(true).open(&path)?;
        Ok(FileOutput {
            path,
            file,
            buf: Vec::new(),
            lines: 0,
            torn: false,
        })
    }

    /// Buffers one line; a `\n` is added after it. The line should not
    /// contain `\n` itself (it is not checked).
    pub fn line(&mut self, line: impl AsRef<[u8]>) {
        self.buf.extend_from_slice(line.as_ref());
        self.buf.push(b'\n');
        self.lines += 1;
    }

    /// Writes the buffered lines and syncs the file to disk; nothing to do
    /// (no system call) when nothing is buffered.
    ///
    /// An error (naming the file) is retryable: the batch fails and the
    /// failure policy replays its roots, which buffer their lines again. The
    /// buffered lines are dropped either way.
    pub fn flush(&mut self) -> Result<(), TaskError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self.write_and_sync();
        self.buf.clear();
        self.lines = 0;
        result.map_err(|e| TaskError::new(format!("writing {}: {e}", self.path.display())))
    }

    fn write_and_sync(&mut self) -> io::Result<()> {
        if self.torn {
            self.buf.insert(0, b'\n');
        }
        let mut written = 0;
        while written < self.buf.len() {
            match self.file.write(&self.buf[written..]) {
                Ok(0) => {
                    self.torn |= written > 0;
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.torn |= written > 0;
                    return Err(e);
                }
            }
        }
        self.torn = false;
        // Appends change the file's size, which `sync_data` syncs too.
        self.file.sync_data()
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines buffered and not yet flushed.
    pub fn buffered_lines(&self) -> usize {
        self.lines
    }
}

impl fmt::Debug for FileOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileOutput")
            .field("path", &self.path)
            .field("buffered_lines", &self.lines)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_only_by_flush_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        std::fs::write(&path, "earlier\n").unwrap();
        let mut out = FileOutput::open(&path).unwrap();
        assert_eq!(out.path(), path);
        out.line("a");
        out.line(b"b\xff".as_slice());
        out.line(String::from("c"));
        assert_eq!(out.buffered_lines(), 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier\n");
        out.flush().unwrap();
        assert_eq!(out.buffered_lines(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"earlier\na\nb\xff\nc\n");
        out.flush().unwrap();
        out.line(bytes::Bytes::from_static(b"d"));
        drop(out); // Unflushed lines are not written.
        assert_eq!(std::fs::read(&path).unwrap(), b"earlier\na\nb\xff\nc\n");

        // A reopened output appends.
        let mut out = FileOutput::open(&path).unwrap();
        out.line("e");
        out.flush().unwrap();
        assert!(std::fs::read(&path).unwrap().ends_with(b"c\ne\n"));
        assert!(format!("{out:?}").contains("out.txt"));

        // After a write that stopped mid-line, the next flush ends that line.
        out.torn = true;
        out.line("f");
        out.flush().unwrap();
        assert!(std::fs::read(&path).unwrap().ends_with(b"e\n\nf\n"));
        assert!(!out.torn);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileOutput::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::IsADirectory);

        #[cfg(target_os = "linux")]
        {
            // Writes to /dev/full fail with "no space left on device".
            let mut out = FileOutput::open("/dev/full").unwrap();
            out.line("x");
            let err = out.flush().unwrap_err();
            assert!(err.is_retryable());
            assert!(err.message().contains("/dev/full"), "{err}");
            assert_eq!(out.buffered_lines(), 0);
        }
    }
}
