//! [`FileSource`]: one message per line of a file, or of a directory of
//! files, that resumes after a restart from a durable checkpoint of what was
//! acked.

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tokio::time::Instant;

use crate::source::{FailReason, FromConfig, Polled, Source, SourceError, SourceErrorKind};
use crate::source::{SourceId, SourceMsg};
use crate::sources::SourceStats;
use crate::ConfigError;

/// The read buffer of one open file.
const READ_BUFFER: usize = 64 * 1024;

/// The checkpoint format version this build writes and reads.
pub const CHECKPOINT_VERSION: u64 = 1;

/// The name of a directory's default checkpoint, inside the directory.
pub const DIR_CHECKPOINT_NAME: &str = ".tempest-checkpoint";

/// The suffix of a file's default checkpoint (`<path>.checkpoint`).
pub const FILE_CHECKPOINT_SUFFIX: &str = ".checkpoint";

/// How often a directory is listed again, at most, in follow mode.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(200);

/// The most done ranges a checkpoint records; past them, lines are re-read
/// after a restart (more repeats, never a loss).
pub const MAX_DONE_RANGES: usize = 1024;

/// One message per line of a file or of a directory of files, with a durable
/// checkpoint of what was acked, so a restarted topology resumes where it
/// stopped: no line is lost, and only lines that were in flight are repeated.
///
/// # Lines
///
/// - A line ends at `\n`; a trailing `\r` is stripped, so CRLF files work.
/// - Empty lines are skipped; a last line without `\n` still counts (in
///   follow mode, once the file is finished: see below).
/// - The payload is the line's bytes, not checked for UTF-8. A batch of lines
///   shares one buffer.
///
/// # Files
///
/// `path` is a file, or a directory whose files are read one after the
/// other in name order (byte order of their UTF-8 names). In a directory,
/// hidden files (names starting with `.`), subdirectories, files whose name
/// is not UTF-8 and the checkpoint itself are skipped.
///
/// The id of a line is [`SourceId::from_parts`]`(file_index, byte_offset)`:
/// `byte_offset` is where the line starts in its file, and `file_index` is
/// the file's position in the sorted list of the directory's files (0 for a
/// single file). The list is only ever appended to while a source runs, so
/// ids are unique within a run; they are stable across runs as long as files
/// are only added with names that sort after the existing ones and none is
/// removed. The checkpoint names files by name, so resuming does not depend
/// on indices.
///
/// Files must only grow: a file that is truncated, rewritten or removed
/// while it is read (or between runs) is not supported.
///
/// # Without and with `follow`
///
/// Without follow, the files are listed once, at the first connect, and the
/// source is [`Polled::Exhausted`] at the end of the last one.
///
/// With follow (a long-running server), the source never ends: at the end
/// of the last file it returns [`Polled::Idle`] and polls again for appended
/// lines; a directory is listed again (at most every [`SCAN_INTERVAL`]) for
/// new files that sort after the last known one. A last line without `\n` is
/// held back until its `\n` is written, or until a newer file appears: a
/// file is finished when the writer has moved on to a later one, and lines
/// appended to it after that are not read. A new file whose name sorts
/// before the last known file is ignored, with a warning.
///
/// # Checkpoint
///
/// The checkpoint is a small JSON file ([`FileCheckpoint`]), by default
/// `<path>.checkpoint` for a file and `<dir>/.tempest-checkpoint` for a
/// directory:
///
/// ```json
/// {"version":1,"file":"b.txt","offset":1234,"done":[["b.txt",1300,1420]]}
/// ```
///
/// `file` and `offset` are the low watermark: every line of the files before
/// `file` and every line of `file` before `offset` is done. `done` (optional)
/// lists byte ranges `[start, end)` past the watermark whose lines are done
/// too (acks arrive out of order), so a restart repeats only the lines that
/// were in flight, not everything after the oldest of them. A line is done
/// when it is acked, or handed to `fail` (the failure policy gave up on it: a
/// dead letter); a line handed to `release` (policy `none`) stays not done,
/// so it is read again after a restart, which is how this source redelivers.
///
/// The checkpoint is written after every batch of acks and every `fail` (or
/// at most once per `checkpoint_every`, see
/// [`FileSource::checkpoint_every`]), and at shutdown, atomically: to a
/// hidden temporary file beside it, synced, then renamed over it (and the
/// directory synced). Writes run on a background thread, one at a time,
/// always of the latest checkpoint, so acking and polling never wait for the
/// disk: acks that come while a write runs go into the next write, which
/// begins as soon as it ends. A failed write is logged (as an ack error) and
/// tried again. `shutdown` waits for the last write. After a crash, the
/// lines in flight when the last completed write began are read again, and
/// so are those done since then (the acks of one write's duration; with
/// `checkpoint_every`, up to that long).
///
/// At the first connect the checkpoint is read and reading starts at its
/// watermark, skipping its done ranges; a missing checkpoint starts from the
/// beginning. A checkpoint that cannot be parsed, has another version,
/// names another file (single-file mode) or an offset past the end of its
/// file is a fatal [`SourceErrorKind::Config`] error naming the checkpoint:
/// the source never silently starts over. Delete the checkpoint to read
/// everything again.
///
/// # Errors
///
/// A path that cannot be opened fails [`Source::connect`] with a fatal
/// [`SourceErrorKind::Connect`] error naming the path. A read error drops the
/// open file and is retryable: the next poll reopens it at the first line
/// not yet handed out, so no line is lost or repeated.
///
/// ```
/// use std::io::Write;
/// use tempest_core::{Polled, Source, SourceId};
/// use tempest_core::sources::{FileCheckpoint, FileSource};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("input.txt");
/// std::fs::write(&path, "the cow\njumped").unwrap();
/// let mut source = FileSource::new(&path);
/// source.connect().await.unwrap();
/// let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else { panic!() };
/// assert_eq!(msgs[1].id, SourceId::from_parts(0, 8));
/// assert_eq!(msgs[1].msg.payload_str(), Some("jumped"));
/// assert_eq!(source.poll(10).await.unwrap(), Polled::Exhausted);
///
/// // Only the second line is acked: the first one is still to do.
/// source.ack(&[msgs[1].id]).await.unwrap();
/// source.shutdown().await.unwrap();
/// let checkpoint = FileCheckpoint::load(&source.checkpoint_path()).unwrap().unwrap();
/// assert_eq!((checkpoint.file.as_str(), checkpoint.offset), ("input.txt", 0));
///
/// // A new source over the same file resumes there and repeats only it.
/// let mut again = FileSource::new(&path);
/// let Polled::Msgs(msgs) = again.poll(10).await.unwrap() else { panic!() };
/// assert_eq!(msgs.len(), 1);
/// assert_eq!(msgs[0].msg.payload_str(), Some("the cow"));
/// # });
/// ```
///
/// In `Topology.toml`:
///
/// ```toml
/// [source]
/// kind = "file"
/// [source.config]
/// path = "data/sentences"                  # a file or a directory
/// checkpoint = "state/sentences.checkpoint" # optional
/// follow = true                             # optional, default false
/// checkpoint_every_ms = 1000                # optional, default: every ack batch
/// ```
pub struct FileSource {
    path: PathBuf,
    checkpoint: Option<PathBuf>,
    follow: bool,
    checkpoint_every: Option<Duration>,
    stats: SourceStats,
    /// Everything known after the first connect.
    state: Option<State>,
}

impl FileSource {
    /// A source of the lines of the file, or the files of the directory, at
    /// `path` (read by the first `connect`), checkpointed at the default
    /// place, without follow.
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileSource {
            path: path.as_ref().to_path_buf(),
            checkpoint: None,
            follow: false,
            checkpoint_every: None,
            stats: SourceStats::new(),
            state: None,
        }
    }

    /// Keeps the checkpoint at `path` instead of the default place.
    pub fn checkpoint(mut self, path: impl AsRef<Path>) -> Self {
        self.checkpoint = Some(path.as_ref().to_path_buf());
        self
    }

    /// With `true`, never ends: waits for appended lines and new files.
    pub fn follow(mut self, follow: bool) -> Self {
        self.follow = follow;
        self
    }

    /// Writes the checkpoint after an ack at most once per `every` (and at
    /// shutdown) instead of after every batch of acks. A crash then repeats
    /// the lines acked since the last write too.
    pub fn checkpoint_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = Some(every).filter(|d| !d.is_zero());
        self
    }

    /// The file or directory read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the checkpoint is kept: the path given to
    /// [`FileSource::checkpoint`], or `<path>.checkpoint` for a file and
    /// `<path>/.tempest-checkpoint` for a directory.
    pub fn checkpoint_path(&self) -> PathBuf {
        match (&self.state, &self.checkpoint) {
            (Some(state), _) => state.checkpoint.path.clone(),
            (None, Some(path)) => path.clone(),
            (None, None) => default_checkpoint(&self.path, self.path.is_dir()),
        }
    }

    /// The message counters (a shared handle).
    pub fn stats(&self) -> SourceStats {
        self.stats.clone()
    }

    /// Waits until the checkpoints submitted so far are written (tests
    /// observe the file after an ack with it).
    #[cfg(test)]
    async fn wait_for_write(&mut self) {
        if let Some(state) = self.state.as_mut() {
            state.checkpoint.writer.wait().await;
            assert!(state.checkpoint.writer.take_error().is_none());
        }
    }

    /// The checkpoint as it stands now (what the next write would contain):
    /// `None` before the first connect or while there is no file to read.
    pub fn current_checkpoint(&self) -> Option<FileCheckpoint> {
        self.state.as_ref().and_then(State::checkpoint)
    }
}

fn default_checkpoint(path: &Path, is_dir: bool) -> PathBuf {
    if is_dir {
        path.join(DIR_CHECKPOINT_NAME)
    } else {
        let mut name = path.as_os_str().to_owned();
        name.push(FILE_CHECKPOINT_SUFFIX);
        PathBuf::from(name)
    }
}

/// A source error from an I/O error: fatal when retrying cannot help.
fn io_error(kind: SourceErrorKind, doing: &str, path: &Path, e: &io::Error) -> SourceError {
    let message = format!("{doing} {}: {e}", path.display());
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
            SourceError::fatal(kind, message)
        }
        _ => SourceError::transient(kind, message),
    }
}

/// Runs blocking file-system work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    kind: SourceErrorKind,
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SourceError::transient(kind, format!("file system task failed: {e}")))?
}

// ---------------------------------------------------------------------------
// The checkpoint file.

/// A [`FileSource`]'s checkpoint: the low watermark of what was done, and the
/// done ranges past it. See [`FileSource`] for the meaning; on disk it is one
/// line of JSON with a `version`:
///
/// ```json
/// {"version":1,"file":"b.txt","offset":1234,"done":[["b.txt",1300,1420],["c.txt",0,96]]}
/// ```
///
/// ```
/// use tempest_core::sources::{DoneRange, FileCheckpoint};
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("input.checkpoint");
/// assert_eq!(FileCheckpoint::load(&path).unwrap(), None);
/// let checkpoint = FileCheckpoint {
///     file: "b.txt".into(),
///     offset: 1234,
///     done: vec![DoneRange { file: "b.txt".into(), start: 1300, end: 1420 }],
/// };
/// checkpoint.store(&path).unwrap();
/// assert_eq!(FileCheckpoint::load(&path).unwrap(), Some(checkpoint));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCheckpoint {
    /// The file of the low watermark (a name, in the directory for a
    /// directory source). Every file before it is done.
    pub file: String,
    /// Every line of `file` that starts before this byte offset is done.
    pub offset: u64,
    /// Byte ranges past the watermark whose lines are all done, in order.
    pub done: Vec<DoneRange>,
}

/// A byte range `[start, end)` of one file whose lines are all done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoneRange {
    /// The file's name.
    pub file: String,
    /// The offset of the first done line.
    pub start: u64,
    /// The offset after the last done line (the start of a line not done, or
    /// the end of the file).
    pub end: u64,
}

/// The JSON form of a [`FileCheckpoint`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointJson {
    version: u64,
    file: String,
    offset: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    done: Vec<(String, u64, u64)>,
}

impl FileCheckpoint {
    /// The checkpoint as one line of JSON (with its version).
    pub fn to_json(&self) -> String {
        let json = CheckpointJson {
            version: CHECKPOINT_VERSION,
            file: self.file.clone(),
            offset: self.offset,
            done: self
                .done
                .iter()
                .map(|r| (r.file.clone(), r.start, r.end))
                .collect(),
        };
        let mut text = serde_json::to_string(&json).expect("a checkpoint serializes");
        text.push('\n');
        text
    }

    /// Parses a checkpoint; the error says what is wrong with it.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match value.get("version") {
            Some(v) if v.as_u64() == Some(CHECKPOINT_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "unsupported version {v} (this build reads version {CHECKPOINT_VERSION})"
                ))
            }
            None if value.is_object() => return Err("no `version`".into()),
            None => return Err("not a JSON object".into()),
        }
        let json: CheckpointJson = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let done = json
            .done
            .into_iter()
            .map(|(file, start, end)| DoneRange { file, start, end })
            .collect::<Vec<_>>();
        if let Some(r) = done.iter().find(|r| r.start > r.end) {
            return Err(format!(
                "done range [{}, {}) of `{}` ends before it starts",
                r.start, r.end, r.file
            ));
        }
        Ok(FileCheckpoint {
            file: json.file,
            offset: json.offset,
            done,
        })
    }

    /// Reads the checkpoint at `path`: `None` when there is none. A
    /// checkpoint that cannot be read or parsed is a fatal
    /// [`SourceErrorKind::Config`] error naming `path`. Blocking.
    pub fn load(path: &Path) -> Result<Option<Self>, SourceError> {
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SourceError::config(format!(
                    "cannot read checkpoint {}: {e}",
                    path.display()
                )))
            }
        };
        let parsed = std::str::from_utf8(&text)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(Self::from_json);
        parsed.map(Some).map_err(|why| {
            SourceError::config(format!(
                "corrupt checkpoint {}: {why} (fix it, or delete it to read the input from the start)",
                path.display()
            ))
        })
    }

    /// Writes the checkpoint to `path` atomically: to a hidden temporary
    /// file beside it (`.<name>.tmp`), synced, renamed over `path`, and the
    /// directory synced, so `path` always holds a whole checkpoint, the old
    /// or the new one. Blocking.
    pub fn store(&self, path: &Path) -> io::Result<()> {
        write_atomically(path, self.to_json().as_bytes())
    }
}

/// The temporary file a checkpoint is written to before its rename: hidden,
/// so a directory source never reads it.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = if name.starts_with('.') {
        format!("{name}.tmp")
    } else {
        format!(".{name}.tmp")
    };
    path.with_file_name(temp)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = temp_path(path);
    {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    // The rename is durable once the directory is synced (POSIX); other
    // systems do not open directories.
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The reading state.

/// Everything a source knows after its first connect.
struct State {
    /// The directory read, in directory mode.
    dir: Option<PathBuf>,
    /// The files in name order; only appended to.
    files: Vec<FileEntry>,
    cursor: Cursor,
    /// Lines handed out (and skipped ranges), in id order, with whether each
    /// is done; the front is never done (it is popped), so it is the low
    /// watermark.
    handed: VecDeque<Handed>,
    /// Done ranges from the checkpoint not reached yet, in order.
    skips: VecDeque<Skip>,
    checkpoint: CheckpointState,
    scan: Scan,
    /// Without follow: the last file was read to its end.
    exhausted: bool,
}

struct FileEntry {
    name: String,
    path: PathBuf,
    /// The file's length once reading moved past it.
    len: Option<u64>,
}

/// Where reading stands. The offset moves only past lines handed out (and
/// empty lines), so a reopen resumes at the first line not handed out.
struct Cursor {
    /// The index of the file read (`files.len()` while there is none).
    file: usize,
    /// The byte offset of the first line not yet handed out.
    offset: u64,
    /// The open file, positioned at `offset` between polls.
    reader: Option<BufReader<File>>,
}

/// A line handed out (or the start of a range skipped as done).
#[derive(Copy, Clone, Debug)]
struct Handed {
    file: u32,
    offset: u64,
    done: bool,
}

impl Handed {
    fn pos(&self) -> (usize, u64) {
        (self.file as usize, self.offset)
    }
}

#[derive(Copy, Clone, Debug)]
struct Skip {
    file: usize,
    start: u64,
    end: u64,
}

struct CheckpointState {
    path: PathBuf,
    /// The checkpoint read at the first connect, the watermark while no
    /// file is read.
    resumed: Option<FileCheckpoint>,
    /// What was last handed to the writer (or read), to skip writing it again.
    submitted: Option<String>,
    /// When it was handed to the writer.
    submitted_at: Option<Instant>,
    writer: Writer,
    /// Lines were done since the last checkpoint was handed to the writer.
    dirty: bool,
    /// The checkpoint's canonical path, to leave it out of a directory listing.
    canonical: Option<PathBuf>,
}

#[derive(Default)]
struct Scan {
    /// When the directory may be listed again.
    next: Option<Instant>,
    /// New files must sort after this name.
    floor: Option<String>,
    /// Names warned about, so each is warned about once.
    ignored: BTreeSet<String>,
}

/// What the first connect finds.
fn prepare(path: &Path, checkpoint: Option<&Path>) -> Result<State, SourceError> {
    let connect = |doing, p: &Path, e: &io::Error| io_error(SourceErrorKind::Connect, doing, p, e);
    let meta = std::fs::metadata(path).map_err(|e| connect("cannot open", path, &e))?;
    let is_dir = meta.is_dir();
    let checkpoint_path = checkpoint
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_checkpoint(path, is_dir));
    if checkpoint_path.is_dir() {
        return Err(SourceError::config(format!(
            "checkpoint {} is a directory",
            checkpoint_path.display()
        )));
    }
    let resumed = FileCheckpoint::load(&checkpoint_path)?;
    let canonical = canonical_file(&checkpoint_path);

    let mut ignored = BTreeSet::new();
    let files: Vec<FileEntry> = if is_dir {
        list_dir(path, canonical.as_deref(), &mut ignored)
            .map_err(|e| connect("cannot list", path, &e))?
    } else {
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            SourceError::config(format!("{} has no UTF-8 file name", path.display()))
        })?;
        vec![FileEntry {
            name: name.to_owned(),
            path: path.to_path_buf(),
            len: None,
        }]
    };

    let mut cursor = Cursor {
        file: 0,
        offset: 0,
        reader: None,
    };
    let mut skips = Vec::new();
    let mut floor = files.last().map(|f| f.name.clone());
    if let Some(ck) = &resumed {
        let bad = |why: String| {
            SourceError::config(format!(
                "checkpoint {}: {why} (delete it to read the input from the start)",
                checkpoint_path.display()
            ))
        };
        let idx = files.partition_point(|f| f.name < ck.file);
        if files.get(idx).is_some_and(|f| f.name == ck.file) {
            let len = std::fs::metadata(&files[idx].path)
                .map_err(|e| connect("cannot open", &files[idx].path, &e))?
                .len();
            if ck.offset > len {
                return Err(bad(format!(
                    "offset {} is past the end of {} ({len} bytes): was it truncated or replaced?",
                    ck.offset,
                    files[idx].path.display()
                )));
            }
            cursor.offset = ck.offset;
        } else if is_dir {
            tracing::warn!(
                checkpoint = %checkpoint_path.display(),
                "the checkpoint's file {} is not in {}: resuming at the next file",
                ck.file,
                path.display()
            );
            if floor.as_ref().is_none_or(|f| *f < ck.file) {
                floor = Some(ck.file.clone());
            }
        } else {
            return Err(bad(format!(
                "it is for file `{}`, not `{}`",
                ck.file, files[0].name
            )));
        }
        cursor.file = idx;
        for r in &ck.done {
            let Ok(i) = files.binary_search_by(|f| f.name.as_str().cmp(&r.file)) else {
                continue;
            };
            if r.end > r.start && (i > idx || (i == idx && r.end > cursor.offset)) {
                skips.push(Skip {
                    file: i,
                    start: r.start,
                    end: r.end,
                });
            }
        }
        skips.sort_by_key(|s| (s.file, s.start));
    }
    Ok(State {
        dir: is_dir.then(|| path.to_path_buf()),
        files,
        cursor,
        handed: VecDeque::new(),
        skips: skips.into(),
        checkpoint: CheckpointState {
            path: checkpoint_path,
            submitted: resumed.as_ref().map(FileCheckpoint::to_json),
            resumed,
            submitted_at: None,
            writer: Writer::default(),
            dirty: false,
            canonical,
        },
        scan: Scan {
            next: None,
            floor,
            ignored,
        },
        exhausted: false,
    })
}

/// The canonical form of a file's path, which may not exist yet.
fn canonical_file(path: &Path) -> Option<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

/// The files of `dir` a source reads, in name order.
fn list_dir(
    dir: &Path,
    checkpoint: Option<&Path>,
    ignored: &mut BTreeSet<String>,
) -> io::Result<Vec<FileEntry>> {
    let canonical_dir = dir.canonicalize()?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            let lossy = name.to_string_lossy().into_owned();
            if ignored.insert(lossy.clone()) {
                tracing::warn!(
                    "skipping {lossy:?} in {}: its name is not UTF-8",
                    dir.display()
                );
            }
            continue;
        };
        if name.starts_with('.') || checkpoint == Some(canonical_dir.join(name).as_path()) {
            continue;
        }
        // Follows symbolic links; an entry that vanished is skipped.
        match std::fs::metadata(entry.path()) {
            Ok(meta) if meta.is_file() => {}
            _ => continue,
        }
        files.push(FileEntry {
            name: name.to_owned(),
            path: entry.path(),
            len: None,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// What reading found next.
enum Next {
    /// A line, at these bytes of the batch buffer.
    Line(Line),
    /// Nothing more for now (follow).
    Wait,
    /// The end of the last file (no follow).
    End,
}

/// One line in a batch buffer: its file and offset, and its byte range.
struct Line {
    file: usize,
    offset: u64,
    start: usize,
    end: usize,
}

impl State {
    fn has_next_file(&self) -> bool {
        self.cursor.file + 1 < self.files.len()
    }

    fn scan_due(&self) -> bool {
        self.dir.is_some() && self.scan.next.is_none_or(|t| Instant::now() >= t)
    }

    /// Lists the directory again and appends the new files that sort after
    /// the last known one; returns how many.
    async fn scan(&mut self) -> Result<usize, SourceError> {
        self.scan.next = Some(Instant::now() + SCAN_INTERVAL);
        let Some(dir) = self.dir.clone() else {
            return Ok(0);
        };
        let canonical = self.checkpoint.canonical.clone();
        let mut ignored = std::mem::take(&mut self.scan.ignored);
        let (listed, ignored) = blocking(SourceErrorKind::Poll, move || {
            let listed = list_dir(&dir, canonical.as_deref(), &mut ignored)
                .map_err(|e| io_error(SourceErrorKind::Poll, "cannot list", &dir, &e));
            Ok((listed, ignored))
        })
        .await?;
        self.scan.ignored = ignored;
        let mut added = 0;
        for file in listed? {
            if self.scan.floor.as_ref().is_some_and(|f| file.name <= *f) {
                let known = self
                    .files
                    .binary_search_by(|f| f.name.cmp(&file.name))
                    .is_ok();
                if !known && self.scan.ignored.insert(file.name.clone()) {
                    tracing::warn!(
                        "ignoring new file {}: it sorts before {}, which is already read",
                        file.path.display(),
                        self.scan.floor.as_deref().unwrap_or_default()
                    );
                }
                continue;
            }
            self.scan.floor = Some(file.name.clone());
            self.files.push(file);
            added += 1;
        }
        Ok(added)
    }

    async fn open(&mut self) -> Result<(), SourceError> {
        let path = &self.files[self.cursor.file].path;
        let connect = |doing, e: &io::Error| io_error(SourceErrorKind::Connect, doing, path, e);
        let mut file = File::open(path)
            .await
            .map_err(|e| connect("cannot open", &e))?;
        if self.cursor.offset > 0 {
            file.seek(SeekFrom::Start(self.cursor.offset))
                .await
                .map_err(|e| connect("cannot seek in", &e))?;
        }
        self.cursor.reader = Some(BufReader::with_capacity(READ_BUFFER, file));
        Ok(())
    }

    /// Skips the checkpoint's done ranges at the cursor; true if it moved.
    fn skip_done(&mut self) -> bool {
        while let Some(s) = self.skips.front().copied() {
            let here = (self.cursor.file, self.cursor.offset);
            if (s.file, s.end) <= here {
                self.skips.pop_front();
            } else if (s.file, s.start) <= here {
                self.skips.pop_front();
                // The range stays done in later checkpoints.
                self.handed.push_back(Handed {
                    file: self.cursor.file as u32,
                    offset: self.cursor.offset,
                    done: true,
                });
                self.cursor.offset = s.end;
                self.cursor.reader = None;
                return true;
            } else {
                break;
            }
        }
        false
    }

    /// Moves on to the next file (which exists).
    fn next_file(&mut self) {
        self.files[self.cursor.file].len = Some(self.cursor.offset);
        self.cursor.file += 1;
        self.cursor.offset = 0;
        self.cursor.reader = None;
    }

    /// Reads the next line to hand out into `buf`.
    async fn next_line(&mut self, buf: &mut Vec<u8>, follow: bool) -> Result<Next, SourceError> {
        loop {
            if self.cursor.file >= self.files.len() {
                if follow && self.scan_due() && self.scan().await? > 0 {
                    continue;
                }
                return Ok(if follow { Next::Wait } else { Next::End });
            }
            if self.skip_done() {
                continue;
            }
            if self.cursor.reader.is_none() {
                self.open().await?;
            }
            let Some(reader) = self.cursor.reader.as_mut() else {
                unreachable!("opened above");
            };
            let start = buf.len();
            let n = match reader.read_until(b'\n', buf).await {
                Ok(n) => n,
                Err(e) => {
                    buf.truncate(start);
                    self.cursor.reader = None;
                    let path = &self.files[self.cursor.file].path;
                    return Err(io_error(SourceErrorKind::Poll, "reading", path, &e));
                }
            };
            if n == 0 || buf[buf.len() - 1] != b'\n' {
                // The end of the file, maybe after a last line without `\n`.
                let finished =
                    !follow || self.has_next_file() || (self.scan_due() && self.scan().await? > 0);
                if !finished {
                    if n > 0 {
                        // Hold the partial line back until its `\n` comes.
                        buf.truncate(start);
                        let offset = self.cursor.offset;
                        if let Some(reader) = self.cursor.reader.as_mut() {
                            if reader.seek(SeekFrom::Start(offset)).await.is_err() {
                                self.cursor.reader = None;
                            }
                        }
                    }
                    return Ok(Next::Wait);
                }
                if n == 0 {
                    if self.has_next_file() {
                        self.next_file();
                        continue;
                    }
                    return Ok(Next::End);
                }
            }
            let offset = self.cursor.offset;
            self.cursor.offset += n as u64;
            let mut end = buf.len();
            if buf[end - 1] == b'\n' {
                end -= 1;
            }
            if end > start && buf[end - 1] == b'\r' {
                end -= 1;
            }
            if end == start {
                buf.truncate(start);
                continue;
            }
            let file = self.cursor.file;
            self.handed.push_back(Handed {
                file: file as u32,
                offset,
                done: false,
            });
            return Ok(Next::Line(Line {
                file,
                offset,
                start,
                end,
            }));
        }
    }

    /// Marks a handed-out line done; false if it is not outstanding.
    fn complete(&mut self, id: SourceId) -> bool {
        let (file, offset) = id.parts();
        let Ok(file) = u32::try_from(file) else {
            return false;
        };
        match self
            .handed
            .binary_search_by_key(&(file, offset), |h| (h.file, h.offset))
        {
            Ok(i) if !self.handed[i].done => {
                self.handed[i].done = true;
                self.checkpoint.dirty = true;
                true
            }
            Ok(_) => false,
            Err(_) => false,
        }
    }

    /// Pops the done lines at the front: the watermark advances.
    fn advance(&mut self) {
        while self.handed.front().is_some_and(|h| h.done) {
            self.handed.pop_front();
        }
    }

    /// The checkpoint as it stands.
    fn checkpoint(&self) -> Option<FileCheckpoint> {
        let here = (self.cursor.file, self.cursor.offset);
        let (file, offset) = match self.handed.front() {
            Some(h) => h.pos(),
            None if self.cursor.file < self.files.len() => here,
            None => return self.checkpoint.resumed.clone(),
        };
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.handed.len() && done.len() < MAX_DONE_RANGES {
            if !self.handed[i].done {
                i += 1;
                continue;
            }
            let from = self.handed[i].pos();
            while i < self.handed.len() && self.handed[i].done {
                i += 1;
            }
            let to = self.handed.get(i).map_or(here, Handed::pos);
            self.push_ranges(&mut done, from, to);
        }
        for s in &self.skips {
            done.push(DoneRange {
                file: self.files[s.file].name.clone(),
                start: s.start,
                end: s.end,
            });
        }
        done.truncate(MAX_DONE_RANGES);
        Some(FileCheckpoint {
            file: self.files[file].name.clone(),
            offset,
            done,
        })
    }

    /// Records `[from, to)`, which may span files, as ranges of single files.
    fn push_ranges(&self, out: &mut Vec<DoneRange>, from: (usize, u64), to: (usize, u64)) {
        let mut push = |file: usize, start: u64, end: u64| {
            if end > start {
                out.push(DoneRange {
                    file: self.files[file].name.clone(),
                    start,
                    end,
                });
            }
        };
        if from.0 == to.0 {
            push(from.0, from.1, to.1);
            return;
        }
        for file in from.0..to.0 {
            // Reading moved past these files, so their lengths are known.
            let Some(len) = self.files[file].len else {
                return;
            };
            push(file, if file == from.0 { from.1 } else { 0 }, len);
        }
        push(to.0, 0, to.1);
    }

    /// Hands the checkpoint to the writer if lines were done since the
    /// last time (and, unless `force`, `every` has passed since then), and
    /// reports a write that failed since the last call. With `force`, waits
    /// until it is written.
    async fn save(&mut self, every: Option<Duration>, force: bool) -> Result<(), SourceError> {
        let cp = &mut self.checkpoint;
        let failed = cp.writer.take_error();
        if failed.is_some() {
            // Write it again.
            cp.submitted = None;
            cp.dirty = true;
        }
        let throttled = match (every, cp.submitted_at) {
            (Some(every), Some(at)) => at.elapsed() < every,
            _ => false,
        };
        if force || (cp.dirty && !throttled) {
            if let Some(checkpoint) = self.checkpoint() {
                let cp = &mut self.checkpoint;
                cp.dirty = false;
                let text = checkpoint.to_json();
                if cp.submitted.as_deref() != Some(text.as_str()) {
                    cp.writer.submit(&cp.path, text.clone());
                    cp.submitted = Some(text);
                    cp.submitted_at = Some(Instant::now());
                }
            }
        }
        let cp = &mut self.checkpoint;
        if force {
            cp.writer.wait().await;
            if let Some(e) = cp.writer.take_error() {
                cp.submitted = None;
                cp.dirty = true;
                return Err(e);
            }
            return Ok(());
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Writes checkpoints in the background, one at a time, always the latest
/// one handed to it: acking and polling never wait for the disk, and a
/// checkpoint handed over while another is being written is written next
/// (the ones in between are skipped).
#[derive(Default)]
struct Writer {
    shared: Arc<Mutex<WriterShared>>,
    /// The writing thread's task, while one may be running.
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct WriterShared {
    /// The checkpoint to write next.
    next: Option<(PathBuf, String)>,
    /// A writing task is running (it takes `next` until there is none).
    running: bool,
    /// The last write's error, until reported.
    error: Option<SourceError>,
}

impl Writer {
    fn submit(&mut self, path: &Path, text: String) {
        let mut shared = self.shared.lock();
        shared.next = Some((path.to_path_buf(), text));
        if shared.running {
            return;
        }
        shared.running = true;
        drop(shared);
        let shared = self.shared.clone();
        self.task = Some(tokio::task::spawn_blocking(move || loop {
            let (path, text) = {
                let mut s = shared.lock();
                match s.next.take() {
                    Some(next) => next,
                    None => {
                        // Under the lock: a submit after this starts a new task.
                        s.running = false;
                        return;
                    }
                }
            };
            let result = write_atomically(&path, text.as_bytes());
            let mut s = shared.lock();
            s.error = result.err().map(|e| {
                SourceError::transient(
                    SourceErrorKind::Ack,
                    format!("cannot write checkpoint {}: {e}", path.display()),
                )
            });
        }));
    }

    /// Waits until everything submitted is written (or failed).
    async fn wait(&mut self) {
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                self.shared.lock().error = Some(SourceError::transient(
                    SourceErrorKind::Ack,
                    format!("the checkpoint writer failed: {e}"),
                ));
            }
        }
    }

    fn has_error(&self) -> bool {
        self.shared.lock().error.is_some()
    }

    fn take_error(&mut self) -> Option<SourceError> {
        self.shared.lock().error.take()
    }
}

/// The `[source.config]` of kind `"file"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    path: PathBuf,
    checkpoint: Option<PathBuf>,
    #[serde(default)]
    follow: bool,
    checkpoint_every_ms: Option<u64>,
}

impl FromConfig for FileSource {
    fn from_config(config: &toml::Table) -> Result<Self, ConfigError> {
        let config: FileConfig = crate::config::from_table(config)?;
        let mut source = FileSource::new(config.path).follow(config.follow);
        if let Some(path) = config.checkpoint {
            source = source.checkpoint(path);
        }
        if let Some(ms) = config.checkpoint_every_ms {
            source = source.checkpoint_every(Duration::from_millis(ms));
        }
        Ok(source)
    }
}

#[crate::async_trait]
impl Source for FileSource {
    /// At the first call: finds the files, reads the checkpoint and seeks
    /// to it. Later calls (after an error) reopen the file read.
    async fn connect(&mut self) -> Result<(), SourceError> {
        if self.state.is_none() {
            let path = self.path.clone();
            let checkpoint = self.checkpoint.clone();
            let state = blocking(SourceErrorKind::Connect, move || {
                prepare(&path, checkpoint.as_deref())
            })
            .await?;
            self.state = Some(state);
        }
        let Some(state) = self.state.as_mut() else {
            unreachable!("prepared above");
        };
        if state.cursor.reader.is_none()
            && !state.exhausted
            && state.cursor.file < state.files.len()
        {
            state.open().await?;
        }
        Ok(())
    }

    async fn poll(&mut self, max: usize) -> Result<Polled, SourceError> {
        if self.state.as_ref().is_some_and(|s| s.exhausted) {
            return Ok(Polled::Exhausted);
        }
        if max == 0 {
            return Ok(Polled::Idle);
        }
        self.connect().await?;
        let follow = self.follow;
        let Some(state) = self.state.as_mut() else {
            unreachable!("connect prepares the state");
        };
        // Catch up on acks held back by `checkpoint_every`, or a failed write.
        if state.checkpoint.dirty || state.checkpoint.writer.has_error() {
            if let Err(e) = state.save(self.checkpoint_every, false).await {
                tracing::warn!("{e}");
            }
        }

        let mut buf = Vec::with_capacity(READ_BUFFER);
        let mut lines = Vec::with_capacity(max.min(4096));
        let mut end = Polled::Idle;
        while lines.len() < max {
            match state.next_line(&mut buf, follow).await {
                Ok(Next::Line(line)) => lines.push(line),
                Ok(Next::Wait) => break,
                Ok(Next::End) => {
                    state.exhausted = true;
                    end = Polled::Exhausted;
                    break;
                }
                // Hand out what was read; the error comes back on the next poll.
                Err(_) if !lines.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        // Skipped ranges may have completed the front.
        state.advance();
        if lines.is_empty() {
            return Ok(end);
        }
        let buf = Bytes::from(buf);
        let msgs: Vec<SourceMsg> = lines
            .iter()
            .map(|l| {
                SourceMsg::new(
                    SourceId::from_parts(l.file as u64, l.offset),
                    buf.slice(l.start..l.end),
                )
            })
            .collect();
        self.stats.record_emitted(msgs.len());
        Ok(Polled::Msgs(msgs))
    }

    /// Marks the lines done and writes the checkpoint.
    async fn ack(&mut self, ids: &[SourceId]) -> Result<(), SourceError> {
        self.stats.record_acked(ids);
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        let mut any = false;
        for &id in ids {
            any |= state.complete(id);
        }
        if any {
            state.advance();
            state.save(self.checkpoint_every, false).await?;
        }
        Ok(())
    }

    /// A dead letter: the line is done, as if acked.
    async fn fail(&mut self, id: SourceId, _reason: &FailReason) -> Result<(), SourceError> {
        self.stats.record_failed();
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        if state.complete(id) {
            state.advance();
            state.save(self.checkpoint_every, false).await?;
        }
        Ok(())
    }

    /// Writes the checkpoint and closes the file.
    async fn shutdown(&mut self) -> Result<(), SourceError> {
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        state.cursor.reader = None;
        state.advance();
        state.save(self.checkpoint_every, true).await
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A file in its own temporary directory, so its checkpoint lands there.
    struct TestFile {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl TestFile {
        fn path(&self) -> &Path {
            &self.path
        }
    }

    fn file_with(content: &[u8]) -> TestFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.txt");
        std::fs::write(&path, content).unwrap();
        TestFile { _dir: dir, path }
    }

    fn append(path: &Path, content: &str) {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap();
        file.write_all(content.as_bytes()).unwrap();
    }

    async fn drain(source: &mut FileSource, max: usize) -> Vec<(u64, String)> {
        drain_ids(source, max)
            .await
            .into_iter()
            .map(|(id, text)| (id.parts().1, text))
            .collect()
    }

    async fn drain_ids(source: &mut FileSource, max: usize) -> Vec<(SourceId, String)> {
        source.connect().await.unwrap();
        let mut all = Vec::new();
        loop {
            match source.poll(max).await.unwrap() {
                Polled::Msgs(msgs) => {
                    assert!(!msgs.is_empty() && msgs.len() <= max);
                    all.extend(msgs.into_iter().map(|m| {
                        let text = m.msg.payload_str().unwrap().to_string();
                        (m.id, text)
                    }));
                }
                Polled::Idle => panic!("a file source without follow is never idle"),
                Polled::Exhausted => return all,
            }
        }
    }

    /// The payloads of one poll that must return messages.
    async fn poll_texts(source: &mut FileSource, max: usize) -> Vec<String> {
        match source.poll(max).await.unwrap() {
            Polled::Msgs(msgs) => msgs
                .iter()
                .map(|m| m.msg.payload_str().unwrap().to_string())
                .collect(),
            other => panic!("expected lines, got {other:?}"),
        }
    }

    fn expected(lines: &[(u64, &str)]) -> Vec<(u64, String)> {
        lines.iter().map(|&(o, s)| (o, s.to_string())).collect()
    }

    fn reason() -> FailReason {
        FailReason {
            message: "boom".into(),
            attempts: 1,
        }
    }

    /// The checkpoint on disk once the write in flight (if any) is done.
    async fn stored(source: &mut FileSource) -> FileCheckpoint {
        source.wait_for_write().await;
        FileCheckpoint::load(&source.checkpoint_path())
            .unwrap()
            .expect("a checkpoint was written")
    }

    fn range(file: &str, start: u64, end: u64) -> DoneRange {
        DoneRange {
            file: file.into(),
            start,
            end,
        }
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
        source.state.as_mut().unwrap().cursor.reader = None;
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

        // A directory is read as a directory of files: empty, it is exhausted.
        let mut source = FileSource::new(dir.path());
        assert_eq!(source.poll(1).await.unwrap(), Polled::Exhausted);

        // A checkpoint that is a directory is a fatal error naming it.
        let file = file_with(b"a\n");
        let mut source = FileSource::new(file.path()).checkpoint(dir.path());
        let err = source.connect().await.unwrap_err();
        assert_eq!(err.kind, SourceErrorKind::Config);
        assert!(!err.retryable);
        assert!(err.message.contains("is a directory"), "{err}");
    }

    #[tokio::test]
    async fn counts_acks_and_failures() {
        let file = file_with(b"a\nb\n");
        let mut source = FileSource::new(file.path());
        let stats = source.stats();
        drain(&mut source, 10).await;
        source.ack(&[SourceId::from(0)]).await.unwrap();
        source.fail(SourceId::from(2), &reason()).await.unwrap();
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
        assert_eq!(
            source.checkpoint_path(),
            file.path().with_file_name("input.txt.checkpoint")
        );
        assert!(!source.follow);
        assert_eq!(source.checkpoint_every, None);
        assert_eq!(drain(&mut source, 10).await, expected(&[(0, "hello")]));

        let checkpoint = file.path().with_file_name("state.json");
        table.insert(
            "checkpoint".into(),
            toml::Value::String(checkpoint.to_str().unwrap().into()),
        );
        table.insert("follow".into(), toml::Value::Boolean(true));
        table.insert("checkpoint_every_ms".into(), toml::Value::Integer(250));
        let source = FileSource::from_config(&table).unwrap();
        assert_eq!(source.checkpoint_path(), checkpoint);
        assert!(source.follow);
        assert_eq!(source.checkpoint_every, Some(Duration::from_millis(250)));
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = FileSource::from_config(&toml::Table::new()).err().unwrap();
        assert!(err.to_string().contains("path"), "{err}");

        let table: toml::Table = toml::from_str("path = \"a.txt\"\ntail = true").unwrap();
        let err = FileSource::from_config(&table).err().unwrap();
        assert!(err.to_string().contains("tail"), "{err}");

        let table: toml::Table = toml::from_str("path = \"a.txt\"\nfollow = \"yes\"").unwrap();
        let err = FileSource::from_config(&table).err().unwrap();
        assert!(err.to_string().contains("follow"), "{err}");
    }

    #[test]
    fn default_checkpoint_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            FileSource::new(dir.path()).checkpoint_path(),
            dir.path().join(".tempest-checkpoint")
        );
        assert_eq!(
            FileSource::new("data/in.txt").checkpoint_path(),
            Path::new("data/in.txt.checkpoint")
        );
        assert_eq!(
            FileSource::new("in.txt")
                .checkpoint("x.json")
                .checkpoint_path(),
            Path::new("x.json")
        );
    }

    #[tokio::test]
    async fn the_watermark_follows_out_of_order_acks() {
        // Offsets 0, 2, 4, 6, 8; the file is 10 bytes.
        let file = file_with(b"a\nb\nc\nd\ne\n");
        let mut source = FileSource::new(file.path());
        let ids: Vec<SourceId> = drain_ids(&mut source, 10)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids[2], SourceId::from_parts(0, 4));
        // Nothing acked: nothing written.
        assert!(!source.checkpoint_path().exists());
        let id = |offset: u64| SourceId::from_parts(0, offset);

        source.ack(&[id(4)]).await.unwrap();
        let ck = stored(&mut source).await;
        assert_eq!((ck.file.as_str(), ck.offset), ("input.txt", 0));
        assert_eq!(ck.done, [range("input.txt", 4, 6)]);

        source.ack(&[id(8), id(0)]).await.unwrap();
        let ck = stored(&mut source).await;
        assert_eq!(ck.offset, 2);
        assert_eq!(
            ck.done,
            [range("input.txt", 4, 6), range("input.txt", 8, 10)]
        );

        // A dead letter is done; a released line is not.
        source.fail(id(2), &reason()).await.unwrap();
        source.release(id(6), &reason()).await.unwrap();
        let ck = stored(&mut source).await;
        assert_eq!(ck.offset, 6);
        assert_eq!(ck.done, [range("input.txt", 8, 10)]);
        assert_eq!(source.current_checkpoint(), Some(ck));

        // Repeated and unknown ids are ignored.
        source
            .ack(&[id(6), id(6), id(3), SourceId::from_parts(7, 0)])
            .await
            .unwrap();
        let ck = stored(&mut source).await;
        assert_eq!((ck.offset, ck.done), (10, vec![]));
        assert_eq!(
            std::fs::read_to_string(source.checkpoint_path()).unwrap(),
            "{\"version\":1,\"file\":\"input.txt\",\"offset\":10}\n"
        );
        source.shutdown().await.unwrap();

        // Everything was done: a restart reads nothing.
        let mut again = FileSource::new(file.path());
        assert_eq!(drain(&mut again, 10).await, []);
    }

    /// A tiny deterministic generator for shuffles.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    #[tokio::test]
    async fn crashes_repeat_only_the_lines_in_flight() {
        // A directory of three files (one empty), 3000 lines in all.
        let dir = tempfile::tempdir().unwrap();
        let mut total = 0;
        for (name, n) in [("a.txt", 1000), ("b.txt", 0), ("c.txt", 2000)] {
            let text: String = (total..total + n).map(|i| format!("{i}\n")).collect();
            std::fs::write(dir.path().join(name), text).unwrap();
            total += n;
        }
        let mut rng = Lcg(7);
        let mut acked = vec![false; total];
        let mut handed = vec![false; total];
        let (mut runs, mut repeated) = (0, 0);
        while acked.iter().any(|a| !a) {
            runs += 1;
            assert!(runs < 100, "no progress");
            let mut source = FileSource::new(dir.path());
            source.connect().await.unwrap();
            let mut in_flight: Vec<(SourceId, usize)> = Vec::new();
            // Each run handles a few hundred lines, then "crashes": the
            // source is dropped with lines in flight and no shutdown.
            let steps = 50 + rng.below(150);
            for _ in 0..steps {
                if in_flight.len() < 100 {
                    if let Polled::Msgs(msgs) = source.poll(1 + rng.below(16)).await.unwrap() {
                        for m in msgs {
                            let line: usize = m.msg.payload_str().unwrap().parse().unwrap();
                            assert!(!acked[line], "line {line} was acked before a crash");
                            repeated += usize::from(handed[line]);
                            handed[line] = true;
                            in_flight.push((m.id, line));
                        }
                    }
                }
                let n = rng.below(in_flight.len().min(20) + 1);
                let mut batch = Vec::new();
                for _ in 0..n {
                    let (id, line) = in_flight.swap_remove(rng.below(in_flight.len()));
                    acked[line] = true;
                    batch.push(id);
                }
                if rng.below(10) == 0 {
                    if let Some((id, line)) = in_flight.pop() {
                        acked[line] = true;
                        source.fail(id, &reason()).await.unwrap();
                        source.wait_for_write().await;
                    }
                }
                // Each batch's checkpoint is written before the next batch.
                source.ack(&batch).await.unwrap();
                source.wait_for_write().await;
            }
            let ck = source.current_checkpoint().unwrap();
            assert!(ck.done.len() <= 210, "{} done ranges", ck.done.len());
        }
        // Lines in flight at a crash were handed out again.
        assert!(
            runs >= 3 && repeated > 0,
            "{runs} runs, {repeated} repeated"
        );
    }

    #[test]
    fn checkpoints_are_written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let one = FileCheckpoint {
            file: "a b\"c.txt".into(),
            offset: 12,
            done: vec![range("a b\"c.txt", 20, 30), range("d.txt", 0, 5)],
        };
        one.store(&path).unwrap();
        assert_eq!(FileCheckpoint::load(&path).unwrap(), Some(one.clone()));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"version\":1,\"file\":\"a b\\\"c.txt\",\"offset\":12,\
             \"done\":[[\"a b\\\"c.txt\",20,30],[\"d.txt\",0,5]]}\n"
        );
        // Only the checkpoint is left: the temporary file was renamed.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cp"]);

        // The new content goes through the temporary file: when that cannot
        // be written, the old checkpoint is left whole.
        std::fs::create_dir(dir.path().join(".cp.tmp")).unwrap();
        let two = FileCheckpoint {
            file: "z.txt".into(),
            offset: 1,
            done: vec![],
        };
        assert!(two.store(&path).is_err());
        assert_eq!(FileCheckpoint::load(&path).unwrap(), Some(one));
        std::fs::remove_dir(dir.path().join(".cp.tmp")).unwrap();
        two.store(&path).unwrap();
        assert_eq!(FileCheckpoint::load(&path).unwrap(), Some(two));
        assert_eq!(temp_path(Path::new("d/.x")), Path::new("d/.x.tmp"));
    }

    #[tokio::test]
    async fn a_corrupt_checkpoint_is_a_fatal_error_naming_it() {
        let file = file_with(b"one\ntwo\n");
        let checkpoint = file.path().with_file_name("input.txt.checkpoint");
        for (content, why) in [
            ("", "EOF"),
            ("garbage", "expected"),
            ("[1,2]", "not a JSON object"),
            ("{\"file\":\"input.txt\",\"offset\":0}", "no `version`"),
            (
                "{\"version\":2,\"file\":\"input.txt\",\"offset\":0}",
                "unsupported version 2",
            ),
            ("{\"version\":1,\"file\":\"input.txt\"}", "offset"),
            (
                "{\"version\":1,\"file\":\"input.txt\",\"offset\":0,\"extra\":1}",
                "extra",
            ),
            (
                "{\"version\":1,\"file\":\"input.txt\",\"offset\":0,\"done\":[[\"input.txt\",5,4]]}",
                "ends before it starts",
            ),
            (
                "{\"version\":1,\"file\":\"input.txt\",\"offset\":9}",
                "past the end",
            ),
            (
                "{\"version\":1,\"file\":\"other.txt\",\"offset\":0}",
                "not `input.txt`",
            ),
        ] {
            std::fs::write(&checkpoint, content).unwrap();
            let mut source = FileSource::new(file.path());
            let err = source.connect().await.unwrap_err();
            assert_eq!(err.kind, SourceErrorKind::Config, "{content}: {err}");
            assert!(!err.retryable, "{content}");
            assert!(
                err.message.contains(checkpoint.to_str().unwrap()),
                "{content}: {err}"
            );
            assert!(err.message.contains(why), "{content}: {err}");
            // Polling does not start over from zero either.
            assert!(source.poll(10).await.is_err());
            assert_eq!(std::fs::read_to_string(&checkpoint).unwrap(), content);
        }
        // At the end of the file is fine (everything was done).
        std::fs::write(
            &checkpoint,
            "{\"version\":1,\"file\":\"input.txt\",\"offset\":8}",
        )
        .unwrap();
        assert_eq!(drain(&mut FileSource::new(file.path()), 10).await, []);
    }

    #[tokio::test]
    async fn a_directory_is_read_file_by_file_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.txt"), "b1\nb2\n").unwrap();
        std::fs::write(d.join("a.txt"), "a1\n\na2").unwrap(); // no final newline
        std::fs::write(d.join("c-empty.txt"), "").unwrap();
        std::fs::write(d.join("d.log"), "d1\r\n").unwrap();
        std::fs::write(d.join(".hidden"), "nope\n").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub").join("x.txt"), "nope\n").unwrap();
        // A checkpoint inside the directory is not read as input.
        let checkpoint = d.join("state.json");

        let mut source = FileSource::new(d).checkpoint(&checkpoint);
        let got = drain_ids(&mut source, 2).await;
        let want = [
            ((0, 0), "a1"),
            ((0, 4), "a2"),
            ((1, 0), "b1"),
            ((1, 3), "b2"),
            ((3, 0), "d1"),
        ];
        let want: Vec<(SourceId, String)> = want
            .iter()
            .map(|&((f, o), s)| (SourceId::from_parts(f, o), s.to_string()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(source.poll(2).await.unwrap(), Polled::Exhausted);

        // Acks across files: b1 and d1 are done, so are a1 and a2.
        source
            .ack(&[want[2].0, want[4].0, want[0].0, want[1].0])
            .await
            .unwrap();
        source.shutdown().await.unwrap();
        let ck = stored(&mut source).await;
        assert_eq!((ck.file.as_str(), ck.offset), ("b.txt", 3));
        // b2's line ends b.txt; c-empty.txt is empty; d1 is done up to the
        // end of d.log.
        assert_eq!(ck.done, [range("d.log", 0, 4)]);

        // The checkpoint file is written beside the others and skipped; a
        // restart repeats only b2, with the same id.
        let mut again = FileSource::new(d).checkpoint(&checkpoint);
        assert_eq!(drain_ids(&mut again, 10).await, [want[3].clone()]);
    }

    #[tokio::test]
    async fn a_resumed_directory_checkpoint_with_a_missing_file_resumes_at_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.txt"), "a\n").unwrap();
        std::fs::write(d.join("c.txt"), "c\n").unwrap();
        FileCheckpoint {
            file: "b.txt".into(),
            offset: 7,
            done: vec![],
        }
        .store(&d.join(DIR_CHECKPOINT_NAME))
        .unwrap();
        let mut source = FileSource::new(d);
        let got = drain_ids(&mut source, 10).await;
        assert_eq!(got, [(SourceId::from_parts(1, 0), "c".to_string())]);
    }

    #[tokio::test(start_paused = true)]
    async fn follow_picks_up_appended_lines_and_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = d.join("a.txt");
        std::fs::write(&a, "1\n2\n").unwrap();
        let mut source = FileSource::new(d).follow(true);
        assert_eq!(poll_texts(&mut source, 10).await, ["1", "2"]);
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);

        // Appended lines are read; a last line without `\n` waits for it.
        append(&a, "3\n4");
        assert_eq!(poll_texts(&mut source, 10).await, ["3"]);
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        append(&a, "\n");
        assert_eq!(poll_texts(&mut source, 10).await, ["4"]);

        // A new file is seen at the next listing; the writer moved on, so
        // the old file's unfinished last line is handed out first.
        append(&a, "5");
        std::fs::write(d.join("b.txt"), "6\n").unwrap();
        std::fs::write(d.join(".b.swp"), "hidden\n").unwrap();
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        tokio::time::advance(SCAN_INTERVAL).await;
        let Polled::Msgs(msgs) = source.poll(10).await.unwrap() else {
            panic!("expected lines");
        };
        let got: Vec<_> = msgs
            .iter()
            .map(|m| (m.id, m.msg.payload_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                (SourceId::from_parts(0, 8), "5"),
                (SourceId::from_parts(1, 0), "6")
            ]
        );

        // The old file is finished; a file sorting before b.txt is ignored.
        append(&a, "late\n");
        std::fs::write(d.join("a2.txt"), "early\n").unwrap();
        append(&d.join("b.txt"), "7\n");
        assert_eq!(poll_texts(&mut source, 10).await, ["7"]);
        for _ in 0..3 {
            tokio::time::advance(SCAN_INTERVAL).await;
            assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        }

        // Shutdown checkpoints; a restart (without follow) resumes after 7.
        let ids: Vec<SourceId> = [(0, 0), (0, 2), (0, 4), (0, 6), (0, 8), (1, 0), (1, 2)]
            .iter()
            .map(|&(f, o)| SourceId::from_parts(f, o))
            .collect();
        source.ack(&ids).await.unwrap();
        source.shutdown().await.unwrap();
        let ck = stored(&mut source).await;
        assert_eq!((ck.file.as_str(), ck.offset, ck.done), ("b.txt", 4, vec![]));
        append(&d.join("b.txt"), "8\n");
        let mut again = FileSource::new(d);
        assert_eq!(drain(&mut again, 10).await, expected(&[(4, "8")]));
    }

    #[tokio::test(start_paused = true)]
    async fn follow_tails_a_single_file_and_an_empty_directory() {
        let file = file_with(b"x\n");
        let mut source = FileSource::new(file.path()).follow(true);
        assert_eq!(poll_texts(&mut source, 10).await, ["x"]);
        for _ in 0..3 {
            tokio::time::advance(SCAN_INTERVAL).await;
            assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        }
        append(file.path(), "y\nz");
        assert_eq!(poll_texts(&mut source, 10).await, ["y"]);
        tokio::time::advance(SCAN_INTERVAL).await;
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);

        let dir = tempfile::tempdir().unwrap();
        let mut source = FileSource::new(dir.path()).follow(true);
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        std::fs::write(dir.path().join("first.txt"), "f\n").unwrap();
        assert_eq!(source.poll(10).await.unwrap(), Polled::Idle);
        tokio::time::advance(SCAN_INTERVAL).await;
        assert_eq!(poll_texts(&mut source, 10).await, ["f"]);
    }

    #[tokio::test]
    async fn a_failed_checkpoint_write_is_reported_and_tried_again() {
        let file = file_with(b"a\nb\n");
        let missing = file.path().with_file_name("missing");
        let mut source = FileSource::new(file.path()).checkpoint(missing.join("cp"));
        drain(&mut source, 10).await;
        let id = |offset: u64| SourceId::from_parts(0, offset);
        // The write runs in the background: the ack that began it succeeds,
        // the next call reports its failure.
        source.ack(&[id(0)]).await.unwrap();
        source
            .state
            .as_mut()
            .unwrap()
            .checkpoint
            .writer
            .wait()
            .await;
        let err = source.ack(&[id(2)]).await.unwrap_err();
        assert_eq!(err.kind, SourceErrorKind::Ack);
        assert!(err.retryable);
        assert!(err.message.contains("missing/cp"), "{err}");
        source
            .state
            .as_mut()
            .unwrap()
            .checkpoint
            .writer
            .wait()
            .await;
        let err = source.shutdown().await.unwrap_err();
        assert!(err.message.contains("cannot write checkpoint"), "{err}");

        // Once it can be written, the next save writes the latest state.
        std::fs::create_dir(&missing).unwrap();
        source.shutdown().await.unwrap();
        assert_eq!(stored(&mut source).await.offset, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoint_every_limits_writes_and_shutdown_writes_the_last() {
        let file = file_with(b"a\nb\nc\n");
        let mut source = FileSource::new(file.path()).checkpoint_every(Duration::from_secs(1));
        drain(&mut source, 10).await;
        let id = |offset: u64| SourceId::from_parts(0, offset);
        source.ack(&[id(0)]).await.unwrap();
        assert_eq!(stored(&mut source).await.offset, 2);
        source.ack(&[id(2)]).await.unwrap();
        assert_eq!(
            stored(&mut source).await.offset,
            2,
            "written within the second"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        source.fail(id(4), &reason()).await.unwrap();
        assert_eq!(stored(&mut source).await.offset, 6);

        let file = file_with(b"a\nb\n");
        let mut source = FileSource::new(file.path()).checkpoint_every(Duration::from_secs(60));
        drain(&mut source, 10).await;
        source.ack(&[id(0)]).await.unwrap();
        source.ack(&[id(2)]).await.unwrap();
        assert_eq!(stored(&mut source).await.offset, 2);
        source.shutdown().await.unwrap();
        assert_eq!(stored(&mut source).await.offset, 4);
    }
}
