//! Log files of supervised processes: safe directory names, copy-truncate
//! rotation, and reading the last lines from the end with bounded memory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Bytes read per step when reading a log backwards.
const CHUNK: usize = 16 * 1024;

/// A file-system-safe, injective name for a process id: `[A-Za-z0-9-]` and
/// non-leading `.` are kept, every other byte becomes `_XX` (hex), the empty
/// id is `_`. Over-long names keep a prefix plus a hash (`_~…`).
pub(crate) fn safe_id(id: &str) -> String {
    if id.is_empty() {
        return "_".to_string();
    }
    let mut out = String::with_capacity(id.len());
    for (i, b) in id.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    if out.len() > 200 {
        // FNV-1a over the whole id; '~' never appears in an encoded id.
        let hash = id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        let mut cut = 150;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&format!("_~{hash:016x}"));
    }
    out
}

/// `path` with `.n` appended: `stdout.log.1`.
pub(crate) fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Opens a log file for appending (`O_APPEND`), creating it.
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Rotates `path` when it is larger than `max_bytes` (0: never). Returns
/// whether it rotated.
pub(crate) fn rotate_if_needed(path: &Path, max_bytes: u64, keep: usize) -> io::Result<bool> {
    if max_bytes == 0 {
        return Ok(false);
    }
    let len = match fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    rotate(path, keep)?;
    Ok(true)
}

/// Copy-truncate: `.keep` is dropped, `.n` becomes `.n+1`, the file is copied
/// to `.1` and truncated in place. The writer keeps its descriptor; opened
/// with `O_APPEND`, its next write lands at the new end (offset 0). Lines
/// written between the copy and the truncation are lost (a small window).
pub(crate) fn rotate(path: &Path, keep: usize) -> io::Result<()> {
    if keep > 0 {
        ignore_missing(fs::remove_file(rotated(path, keep)))?;
        for n in (1..keep).rev() {
            ignore_missing(fs::rename(rotated(path, n), rotated(path, n + 1)))?;
        }
        fs::copy(path, rotated(path, 1))?;
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)
}

/// The last `lines` lines of the stream formed by `files`, given newest
/// first (`stdout.log`, `stdout.log.1`, ...; missing files are skipped): the
/// exact byte suffix, with its final newline if it has one. Reads backwards
/// in chunks and keeps at most about `max_bytes`; a tail cut by that limit
/// starts at a line boundary.
pub(crate) fn tail(files: &[PathBuf], lines: usize, max_bytes: usize) -> io::Result<Vec<u8>> {
    if lines == 0 {
        return Ok(Vec::new());
    }
    // Chunks newest first, each in file order.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut total = 0usize;
    let mut newlines = 0usize;
    let mut seen_any = false;
    let mut capped = false;
    'files: for path in files {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut pos = file.metadata()?.len();
        while pos > 0 {
            let n = pos.min(CHUNK as u64) as usize;
            pos -= n as u64;
            file.seek(SeekFrom::Start(pos))?;
            let mut buf = vec![0u8; n];
            match file.read_exact(&mut buf) {
                Ok(()) => {}
                // Truncated while we read (rotation): take what we have.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue 'files,
                Err(e) => return Err(e),
            }
            let mut cut = None;
            for i in (0..n).rev() {
                let last_byte_of_stream = !seen_any;
                seen_any = true;
                if buf[i] == b'\n' && !last_byte_of_stream {
                    newlines += 1;
                    if newlines == lines {
                        cut = Some(i + 1);
                        break;
                    }
                }
            }
            if let Some(cut) = cut {
                buf.drain(..cut);
                chunks.push(buf);
                break 'files;
            }
            total += buf.len();
            chunks.push(buf);
            if total >= max_bytes {
                capped = true;
                break 'files;
            }
        }
    }
    let mut out = Vec::with_capacity(chunks.iter().map(Vec::len).sum());
    for chunk in chunks.iter().rev() {
        out.extend_from_slice(chunk);
    }
    if capped {
        if let Some(nl) = out.iter().position(|&b| b == b'\n') {
            if nl + 1 < out.len() {
                out.drain(..=nl);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ids_are_plain_and_injective() {
        assert_eq!(safe_id("wordcount/count/1"), "wordcount_2Fcount_2F1");
        assert_eq!(safe_id("a_b"), "a_5Fb");
        assert_ne!(safe_id("a/b"), safe_id("a_b"));
        assert_eq!(safe_id(""), "_");
        assert_eq!(safe_id("."), "_2E");
        assert_eq!(safe_id(".."), "_2E.");
        assert_eq!(safe_id("v1.2"), "v1.2");
        assert!(!safe_id("../../etc").contains('/'));
        assert_eq!(safe_id("é"), "_C3_A9");
        let long = "x/".repeat(300);
        let name = safe_id(&long);
        assert!(name.len() < 200, "{}", name.len());
        assert_ne!(name, safe_id(&"x/".repeat(301)));
    }

    fn write(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
    }

    fn tail_str(files: &[PathBuf], lines: usize) -> String {
        String::from_utf8(tail(files, lines, 1 << 20).unwrap()).unwrap()
    }

    #[test]
    fn tail_counts_lines_from_the_end_across_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("stdout.log");
        let files = [base.clone(), rotated(&base, 1), rotated(&base, 2)];
        assert_eq!(tail_str(&files, 3), "");
        write(&base, "a\nb\nc\n");
        assert_eq!(tail_str(&files, 0), "");
        assert_eq!(tail_str(&files, 1), "c\n");
        assert_eq!(tail_str(&files, 2), "b\nc\n");
        assert_eq!(tail_str(&files, 3), "a\nb\nc\n");
        assert_eq!(tail_str(&files, 10), "a\nb\nc\n");
        write(&base, "a\nb\nunfinished");
        assert_eq!(tail_str(&files, 1), "unfinished");
        assert_eq!(tail_str(&files, 2), "b\nunfinished");
        // A line split by copy-truncate continues across files.
        write(&rotated(&base, 2), "one\ntwo\n");
        write(&rotated(&base, 1), "three\nfo");
        write(&base, "ur\nfive\n");
        assert_eq!(tail_str(&files, 2), "four\nfive\n");
        assert_eq!(tail_str(&files, 4), "two\nthree\nfour\nfive\n");
        assert_eq!(tail_str(&files, 99), "one\ntwo\nthree\nfour\nfive\n");
        // An empty newest file: the tail comes from the rotated ones.
        write(&base, "");
        assert_eq!(tail_str(&files, 1), "fo");
        assert_eq!(tail_str(&files, 2), "three\nfo");
    }

    #[test]
    fn tail_reads_big_files_in_chunks_with_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("stdout.log");
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        write(&base, &text);
        let files = [base];
        assert_eq!(tail_str(&files, 2), "line 19998\nline 19999\n");
        let many = tail_str(&files, 5000);
        assert_eq!(many.lines().count(), 5000);
        assert!(many.starts_with("line 15000\n"));
        // Capped at about 1 KiB, starting at a line boundary.
        let capped = String::from_utf8(tail(&files, 100_000, 1024).unwrap()).unwrap();
        assert!(capped.len() <= CHUNK && capped.len() >= 1024 - 20);
        assert!(capped.starts_with("line "));
        assert!(capped.ends_with("line 19999\n"));
    }

    #[test]
    fn copy_truncate_rotation_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("stderr.log");
        assert!(!rotate_if_needed(&base, 10, 2).unwrap());
        let mut writer = open_append(&base).unwrap();
        for round in 1..=4 {
            use std::io::Write;
            writeln!(writer, "round {round} is longer than ten bytes").unwrap();
            assert!(rotate_if_needed(&base, 10, 2).unwrap());
            assert!(!rotate_if_needed(&base, 10, 2).unwrap());
        }
        use std::io::Write;
        writeln!(writer, "after").unwrap();
        // O_APPEND: the write after truncation starts at offset 0.
        assert_eq!(fs::read_to_string(&base).unwrap(), "after\n");
        assert!(fs::read_to_string(rotated(&base, 1))
            .unwrap()
            .starts_with("round 4"));
        assert!(fs::read_to_string(rotated(&base, 2))
            .unwrap()
            .starts_with("round 3"));
        assert!(!rotated(&base, 3).exists());
        // keep = 0 truncates only; max = 0 never rotates.
        writeln!(writer, "more than ten bytes here").unwrap();
        assert!(!rotate_if_needed(&base, 0, 0).unwrap());
        assert!(rotate_if_needed(&base, 10, 0).unwrap());
        assert_eq!(fs::metadata(&base).unwrap().len(), 0);
    }
}
