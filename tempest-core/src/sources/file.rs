//! [`FileSource`]: one message per line of a file.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

use crate::source::{FailReason, FromConfig, Polled, Source, SourceError, SourceErrorKind};
use crate::source::{SourceId, SourceMsg};
use crate::sources::SourceStats;
use crate::ConfigError;

/// The read buffer of one open file.
const READ_BUFFER: usize = 64 * 1024;

/// One message per line of a file, read asynchronously, then
/// [`Polled::Exhausted`] at the end of the file.
///
/// - The id of a message is the byte offset where its line starts (the high
///   half of the [`SourceId`] is 0, left for a file index).
/// - A line ends at `\n`; a trailing `\r` is stripped, so CRLF files work.
/// - Empty lines are skipped; a last line without `\n` still counts.
/// - The payload is the line's bytes, not checked for UTF-8. A batch of lines
///   shares one buffer.
///
/// A file that cannot be opened fails [`Source::connect`] with a fatal
/// [`SourceErrorKind::Connect`] error naming the path. A read error drops the
/// open file and is retryable: the next connect reopens it at the first line
/// not yet handed out, so no line is lost or repeated.
///
/// ```
/// use std::io::Write;
/// use tempest_core::{Polled, Source, SourceId};
/// use tempest_core::sources::FileSource;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut file = tempfile::NamedTempFile::new().unwrap();
/// write!(file, "the cow\njumped").unwrap();
/// let mut source = FileSource::new(file.path());
/// source.connect().await.unwrap();
/// let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else { panic!() };
/// assert_eq!(msgs[1].id, SourceId::from(8));
/// assert_eq!(msgs[1].msg.payload_str(), Some("jumped"));
/// assert_eq!(source.poll(10).await.unwrap(), Polled::Exhausted);
/// # });
/// ```
///
/// In `Topology.toml`:
///
/// ```toml
/// [source]
/// kind = "file"
/// [source.config]
/// path = "data/sentences.txt"
/// ```
pub struct FileSource {
    path: PathBuf,
    cursor: Cursor,
    stats: SourceStats,
}

/// Where reading stands. Everything that a reopen, a checkpoint or a tail
/// needs is here: the offset is committed only when a batch is handed out.
struct Cursor {
    /// The open file, positioned at `offset` between polls.
    reader: Option<BufReader<File>>,
    /// The byte offset of the first line not yet handed out.
    offset: u64,
    /// The end of the file was reached.
    at_eof: bool,
}

impl FileSource {
    /// A source of the lines of the file at `path` (opened by `connect`).
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileSource {
            path: path.as_ref().to_path_buf(),
            cursor: Cursor {
                reader: None,
                offset: 0,
                at_eof: false,
            },
            stats: SourceStats::new(),
        }
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The message counters (a shared handle).
    pub fn stats(&self) -> SourceStats {
        self.stats.clone()
    }

    fn io_error(&self, kind: SourceErrorKind, doing: &str, e: &io::Error) -> SourceError {
        let message = format!("{doing} {}: {e}", self.path.display());
        match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                SourceError::fatal(kind, message)
            }
            _ => SourceError::transient(kind, message),
        }
    }

    /// Opens the file at the cursor's offset.
    async fn open(&self) -> Result<BufReader<File>, SourceError> {
        let connect = |doing, e: &io::Error| self.io_error(SourceErrorKind::Connect, doing, e);
        let mut file = File::open(&self.path)
            .await
            .map_err(|e| connect("cannot open", &e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| connect("cannot stat", &e))?;
        if meta.is_dir() {
            return Err(SourceError::fatal(
                SourceErrorKind::Connect,
                format!("{} is a directory, not a file", self.path.display()),
            ));
        }
        if self.cursor.offset > 0 {
            file.seek(SeekFrom::Start(self.cursor.offset))
                .await
                .map_err(|e| connect("cannot seek in", &e))?;
        }
        Ok(BufReader::with_capacity(READ_BUFFER, file))
    }
}

/// The `[source.config]` of kind `"file"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    path: PathBuf,
}

impl FromConfig for FileSource {
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let config: FileConfig = crate::config::from_table(config)?;
        Ok(FileSource::new(config.path))
    }
}

/// One line in a batch buffer: its file offset and its byte range.
struct Line {
    offset: u64,
    start: usize,
    end: usize,
}

#[crate::async_trait]
impl Source for FileSource {
    async fn connect(&mut self) -> Result<(), SourceError> {
        if self.cursor.reader.is_none() && !self.cursor.at_eof {
            self.cursor.reader = Some(self.open().await?);
        }
        Ok(())
    }

    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        if self.cursor.at_eof {
            return Ok(Polled::Exhausted);
        }
        if max == 0 {
            return Ok(Polled::Idle);
        }
        self.connect().await?;
        let Some(reader) = self.cursor.reader.as_mut() else {
            unreachable!("connect opens the file unless at EOF");
        };

        let mut buf = Vec::with_capacity(READ_BUFFER);
        let mut lines = Vec::with_capacity(max.min(4096));
        let mut offset = self.cursor.offset;
        let mut at_eof = false;
        while lines.len() < max {
            let start = buf.len();
            let n = match reader.read_until(b'\n', &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    // Drop the batch and the file; a reconnect resumes at
                    // the committed offset.
                    self.cursor.reader = None;
                    return Err(self.io_error(SourceErrorKind::Poll, "reading", &e));
                }
            };
            if n == 0 {
                at_eof = true;
                break;
            }
            let line_offset = offset;
            offset += n as u64;
            let mut end = buf.len();
            if buf[end - 1] == b'\n' {
                end -= 1;
            }
            if end > start && buf[end - 1] == b'\r' {
                end -= 1;
            }
            if end > start {
                lines.push(Line {
                    offset: line_offset,
                    start,
                    end,
                });
            } else {
                buf.truncate(start);
            }
        }
        self.cursor.offset = offset;
        self.cursor.at_eof = at_eof;

        if lines.is_empty() {
            return Ok(Polled::Exhausted);
        }
        let buf = Bytes::from(buf);
        let msgs: Vec<SourceMsg> = lines
            .iter()
            .map(|l| SourceMsg::new(l.offset, buf.slice(l.start..l.end)))
            .collect();
        self.stats.record_emitted(msgs.len());
        Ok(Polled::Msgs(msgs))
    }

    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.stats.record_acked(ids);
        Ok(())
    }

    async fn fail(&mut self, _id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        self.stats.record_failed();
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<(), SourceError> {
        self.cursor.reader = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_with(content: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(content).unwrap();
        file.flush().unwrap();
        file
    }

    async fn drain(source: &mut FileSource, max: usize) -> Vec<(u64, String)> {
        source.connect().await.unwrap();
        let mut all = Vec::new();
        loop {
            match source.poll(max).await.unwrap() {
                Polled::Msgs(msgs) => {
                    assert!(!msgs.is_empty() && msgs.len() <= max);
                    all.extend(msgs.into_iter().map(|m| {
                        let text = m.msg.payload_str().unwrap().to_string();
                        (m.id.parts().1, text)
                    }));
                }
                Polled::Idle => panic!("a file source is never idle"),
                Polled::Exhausted => return all,
            }
        }
    }

    fn expected(lines: &[(u64, &str)]) -> Vec<(u64, String)> {
        lines.iter().map(|&(o, s)| (o, s.to_string())).collect()
    }

    #[tokio::test]
    async fn lines_with_empty_lines_crlf_and_no_final_newline() {
        // Offsets: "a\n" 0, "\n" 2, "b\r\n" 3, "\r\n" 6, "\r\r\n" 8, "c\rd" 11.
        let file = file_with(b"a\n\nb\r\n\r\n\r\r\nc\rd");
        let want = expected(&[(0, "a"), (3, "b"), (8, "\r"), (11, "c\rd")]);
        for max in [1, 2, 100] {
            let mut source = FileSource::new(file.path());
            assert_eq!(drain(&mut source, max).await, want, "max {max}");
            assert_eq!(source.poll(max).await.unwrap(), Polled::Exhausted);
            assert_eq!(source.stats().emitted(), 4);
        }
    }

    #[tokio::test]
    async fn final_newline_and_empty_files() {
        let file = file_with(b"x\ny\n");
        let mut source = FileSource::new(file.path());
        assert_eq!(
            drain(&mut source, 10).await,
            expected(&[(0, "x"), (2, "y")])
        );

        for content in [&b""[..], b"\n\n\r\n"] {
            let file = file_with(content);
            let mut source = FileSource::new(file.path());
            assert_eq!(drain(&mut source, 10).await, []);
        }
    }

    #[tokio::test]
    async fn batches_span_the_read_buffer() {
        let mut content = String::new();
        let mut want = Vec::new();
        for i in 0..20_000 {
            want.push((content.len() as u64, format!("line {i}")));
            content.push_str(&format!("line {i}\n"));
        }
        let file = file_with(content.as_bytes());
        let mut source = FileSource::new(file.path());
        assert_eq!(drain(&mut source, 777).await, want);
    }

    #[tokio::test]
    async fn reopen_resumes_after_the_last_line_handed_out() {
        let file = file_with(b"one\ntwo\nthree\n");
        let mut source = FileSource::new(file.path());
        source.connect().await.unwrap();
        let Polled::Msgs(msgs) = source.poll(1).await.unwrap() else {
            panic!("expected a line");
        };
        assert_eq!(msgs[0].msg.payload_str(), Some("one"));
        // As after a read error: the file is dropped, and reopened at the cursor.
        source.cursor.reader = None;
        source.connect().await.unwrap();
        assert_eq!(
            drain(&mut source, 10).await,
            expected(&[(4, "two"), (8, "three")])
        );
    }

    #[tokio::test]
    async fn poll_opens_the_file_without_connect() {
        let file = file_with(b"a");
        let mut source = FileSource::new(file.path());
        assert!(matches!(source.poll(5).await.unwrap(), Polled::Msgs(m) if m.len() == 1));
    }

    #[tokio::test]
    async fn missing_file_is_a_fatal_connect_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-file.txt");
        let mut source = FileSource::new(&path);
        let err = source.connect().await.unwrap_err();
        assert_eq!(err.kind, SourceErrorKind::Connect);
        assert!(!err.retryable);
        assert!(err.message.contains("no-such-file.txt"), "{err}");
        let err = source.poll(1).await.unwrap_err();
        assert_eq!(err.kind, SourceErrorKind::Connect);

        let err = FileSource::new(dir.path()).connect().await.unwrap_err();
        assert!(err.message.contains("directory"), "{err}");
        assert!(!err.retryable);
    }

    #[tokio::test]
    async fn counts_acks_and_failures() {
        let file = file_with(b"a\nb\n");
        let mut source = FileSource::new(file.path());
        let stats = source.stats();
        drain(&mut source, 10).await;
        source.ack(&[SourceId::from(0)]).await.unwrap();
        let reason = FailReason {
            message: "boom".into(),
            attempts: 1,
        };
        source.fail(SourceId::from(2), &reason).await.unwrap();
        assert_eq!((stats.emitted(), stats.acked(), stats.failed()), (2, 1, 1));
    }

    #[tokio::test]
    async fn from_config() {
        let file = file_with(b"hello\n");
        let mut table = toml::Table::new();
        table.insert(
            "path".into(),
            toml::Value::String(file.path().to_str().unwrap().into()),
        );
        let mut source = FileSource::from_config(&table).unwrap();
        assert_eq!(source.path(), file.path());
        assert_eq!(drain(&mut source, 10).await, expected(&[(0, "hello")]));
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = FileSource::from_config(&toml::Table::new()).err().unwrap();
        assert!(err.to_string().contains("path"), "{err}");

        let table: toml::Table = toml::from_str("path = \"a.txt\"\ntail = true").unwrap();
        let err = FileSource::from_config(&table).err().unwrap();
        assert!(err.to_string().contains("tail"), "{err}");
    }
}
