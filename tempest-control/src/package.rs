//! Topology package archives.
//!
//! A package is a gzip-compressed tar archive holding:
//!
//! - `manifest.json`: a [`Manifest`] (name, version, the binary's file name
//!   and sha256, target triple, Tempest version), the archive's first entry;
//! - the topology binary, under the name the manifest gives;
//! - `Topology.toml`, the package's default configuration (optional).
//!
//! A package is known by its *content hash*: the sha256 of the archive's
//! bytes, in hex. The director stores packages by it and agents verify it on
//! download. [`unpack`] also checks the binary against the manifest's hash,
//! so a package whose parts were swapped is refused.
//!
//! Archives come from the network (uploads to the director, downloads and
//! uploads to agents), so they are read within bounds, whatever their
//! headers say:
//!
//! - only regular files: links, devices, directories, fifos, GNU sparse
//!   files, GNU long-name and PAX headers are refused (the tar reader is
//!   run raw, so none of them is ever interpreted, or read into memory);
//! - only the known names, each at most once, the manifest first (so the
//!   binary's name is known when it comes), and at most [`MAX_ENTRIES`];
//! - each entry within its limit ([`MAX_MANIFEST`], [`MAX_TOPOLOGY`], the
//!   caller's binary limit) and all of them within their sum, counted as
//!   the bytes are inflated: nothing is allocated from a declared size, and
//!   buffers grow only as bytes arrive;
//! - [`verify`] and [`unpack`] never hold the binary in memory: it is
//!   hashed as it streams (to nowhere, or to its file).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's name inside an archive.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The default configuration's name inside an archive.
pub const TOPOLOGY_FILE: &str = "Topology.toml";
/// The largest manifest accepted.
pub const MAX_MANIFEST: u64 = 64 * 1024;
/// The largest `Topology.toml` accepted.
pub const MAX_TOPOLOGY: u64 = 1024 * 1024;
/// The most entries an archive may have: the manifest, the binary and
/// `Topology.toml`.
pub const MAX_ENTRIES: usize = 3;
/// The largest binary [`unpack`] writes: four times the largest archive an
/// agent accepts (2 GiB), the ratio the director allows by default.
pub const MAX_UNPACKED_BINARY: u64 = 8 << 30;
/// The longest binary name: what fits a tar header's name field, so no GNU
/// long-name entry is ever needed.
pub const MAX_BINARY_NAME: usize = 100;
/// How much of the binary is inflated at a time.
const CHUNK: usize = 64 * 1024;
/// The longest entry name an error quotes.
const MAX_QUOTED_NAME: usize = 256;

/// A package's description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The topology package's name (its crate name).
    pub name: String,
    /// Its version.
    pub version: String,
    /// The binary's file name in the archive.
    pub binary: String,
    /// The binary's sha256, hex.
    pub sha256: String,
    /// The target triple it was built for.
    pub target: String,
    /// The Tempest version it was built with.
    pub tempest_version: String,
}

/// Why a package was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The archive is not a package.
    #[error("not a valid package: {0}")]
    Invalid(String),
    /// A hash does not match.
    #[error("hash mismatch for {what}: expected {expected}, got {actual}")]
    HashMismatch {
        /// What was hashed.
        what: String,
        /// The hash it should have.
        expected: String,
        /// The hash it has.
        actual: String,
    },
    /// An entry that is not a regular file (a link, a device, a directory,
    /// a GNU sparse file, a GNU long-name or PAX header...).
    #[error("archive entry `{name}` is a {kind}: a package holds regular files only")]
    NotRegularFile {
        /// The entry's name, as its header gives it.
        name: String,
        /// What it is.
        kind: String,
    },
    /// An entry whose name is not one a package has.
    #[error(
        "archive entry `{name}` is not part of a package \
         ({MANIFEST_FILE}, the binary it names, {TOPOLOGY_FILE})"
    )]
    UnknownEntry {
        /// The entry's name.
        name: String,
    },
    /// An entry before the manifest that is not `Topology.toml`.
    #[error("archive entry `{name}` comes before {MANIFEST_FILE}, which must come first")]
    ManifestNotFirst {
        /// The entry's name.
        name: String,
    },
    /// A name seen twice.
    #[error("archive entry `{name}` appears more than once")]
    DuplicateEntry {
        /// The entry's name.
        name: String,
    },
    /// More entries than [`MAX_ENTRIES`].
    #[error("the archive has more than {limit} entries (the one past the limit is `{name}`)")]
    TooManyEntries {
        /// The first entry past the limit.
        name: String,
        /// The limit.
        limit: usize,
    },
    /// An entry larger than its limit.
    #[error("archive entry `{name}` is larger than its limit of {limit} bytes")]
    EntryTooLarge {
        /// The entry's name.
        name: String,
        /// Its limit.
        limit: u64,
    },
    /// More bytes unpacked, all entries together, than allowed.
    #[error("the archive unpacks to more than {limit} bytes (reading `{name}`)")]
    TooLarge {
        /// The entry being read when the limit was passed.
        name: String,
        /// The limit.
        limit: u64,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackageError {
    let context = context.into();
    move |source| PackageError::Io { context, source }
}

/// The sha256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// True for a 64-character lowercase hex string (a content hash).
pub fn is_content_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `name` may be a package's binary: a plain file name that fits a
/// tar header and is none of the package's other files.
fn check_binary_name(name: &str) -> Result<(), PackageError> {
    let bad = name.is_empty()
        || name.len() > MAX_BINARY_NAME
        || name == "."
        || name == ".."
        || name == MANIFEST_FILE
        || name == TOPOLOGY_FILE
        || name.contains(['/', '\\', '\0']);
    if bad {
        return Err(PackageError::Invalid(format!(
            "bad binary name `{}` (a file name of at most {MAX_BINARY_NAME} bytes, \
             neither {MANIFEST_FILE} nor {TOPOLOGY_FILE})",
            quote(name.as_bytes())
        )));
    }
    Ok(())
}

/// Writes a package archive of `binary` (and `topology_toml`, if given) with
/// a manifest filled in from `manifest` (its `binary` and `sha256` are set
/// here). Returns the manifest written.
pub fn pack(
    binary: &Path,
    topology_toml: Option<&str>,
    mut manifest: Manifest,
    out: impl Write,
) -> Result<Manifest, PackageError> {
    let bytes = std::fs::read(binary).map_err(io(format!("reading {}", binary.display())))?;
    manifest.sha256 = sha256_hex(&bytes);
    manifest.binary = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| PackageError::Invalid(format!("{} has no file name", binary.display())))?;
    check_binary_name(&manifest.binary)?;
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| PackageError::Invalid(e.to_string()))?;
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    append(&mut tar, MANIFEST_FILE, &json, 0o644)?;
    append(&mut tar, &manifest.binary, &bytes, 0o755)?;
    if let Some(toml) = topology_toml {
        append(&mut tar, TOPOLOGY_FILE, toml.as_bytes(), 0o644)?;
    }
    let gz = tar.into_inner().map_err(io("writing the archive"))?;
    gz.finish().map_err(io("compressing the archive"))?;
    Ok(manifest)
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
    mode: u32,
) -> Result<(), PackageError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, data)
        .map_err(io(format!("adding {name}")))
}

/// A package read from an archive, without touching the disk.
#[derive(Clone, Debug)]
pub struct Package {
    /// The manifest.
    pub manifest: Manifest,
    /// The binary's bytes.
    pub binary: Vec<u8>,
    /// The default `Topology.toml`, if packaged.
    pub topology_toml: Option<String>,
}

/// A package verified without keeping its binary (see [`verify`]).
#[derive(Clone, Debug)]
pub struct Verified {
    /// The manifest.
    pub manifest: Manifest,
    /// The binary's size in bytes.
    pub binary_size: u64,
    /// The default `Topology.toml`, if packaged.
    pub topology_toml: Option<String>,
}

/// Reads and verifies an archive: it must hold a manifest and the binary it
/// names, whose hash matches; at most `max_binary` bytes of binary are read
/// (and kept: [`verify`] checks the same without keeping them).
pub fn read(archive: &[u8], max_binary: u64) -> Result<Package, PackageError> {
    let mut binary = Vec::new();
    let contents = walk(archive, max_binary, &mut KeepBinary(&mut binary))?;
    Ok(Package {
        manifest: contents.manifest,
        binary,
        topology_toml: contents.topology_toml,
    })
}

/// Verifies an archive as [`read`] does, within the same limits, but keeps
/// nothing of the binary: it is hashed as it is inflated, so memory stays
/// a few buffers whatever its size.
pub fn verify(archive: &[u8], max_binary: u64) -> Result<Verified, PackageError> {
    let contents = walk(archive, max_binary, &mut DropBinary)?;
    Ok(Verified {
        manifest: contents.manifest,
        binary_size: contents.binary_size,
        topology_toml: contents.topology_toml,
    })
}

/// Verifies `archive` against its content hash and unpacks it into `dir`
/// (the binary made executable), with a binary of at most
/// [`MAX_UNPACKED_BINARY`] bytes. Returns the manifest and the binary's
/// path.
pub fn unpack(
    archive: &[u8],
    content_hash: &str,
    dir: &Path,
) -> Result<(Manifest, PathBuf), PackageError> {
    unpack_within(archive, content_hash, dir, MAX_UNPACKED_BINARY)
}

/// [`unpack`] with a binary of at most `max_binary` bytes. The binary
/// streams to its file as it is inflated and hashed; if anything is wrong
/// the files written are removed.
pub fn unpack_within(
    archive: &[u8],
    content_hash: &str,
    dir: &Path,
    max_binary: u64,
) -> Result<(Manifest, PathBuf), PackageError> {
    let actual = sha256_hex(archive);
    if actual != content_hash {
        return Err(PackageError::HashMismatch {
            what: "package archive".into(),
            expected: content_hash.into(),
            actual,
        });
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut sink = BinaryFile {
        dir,
        file: None,
        path: None,
    };
    let result = walk(archive, max_binary, &mut sink).and_then(|contents| {
        let binary = sink.finish()?;
        if let Some(toml) = &contents.topology_toml {
            write_file(&dir.join(TOPOLOGY_FILE), toml.as_bytes(), 0o644)?;
        }
        let json = serde_json::to_vec_pretty(&contents.manifest)
            .map_err(|e| PackageError::Invalid(e.to_string()))?;
        write_file(&dir.join(MANIFEST_FILE), &json, 0o644)?;
        Ok((contents.manifest, binary))
    });
    if result.is_err() {
        if let Some(path) = sink.path.take() {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(dir.join(TOPOLOGY_FILE));
    }
    result
}

/// Where the binary's bytes go as they are inflated.
trait BinarySink {
    /// The binary `name` (checked) is about to come.
    fn open(&mut self, name: &str) -> Result<(), PackageError>;
    /// More of its bytes.
    fn write(&mut self, bytes: &[u8]) -> Result<(), PackageError>;
}

/// Keeps the binary in memory ([`read`]), growing as bytes arrive.
struct KeepBinary<'a>(&'a mut Vec<u8>);

impl BinarySink for KeepBinary<'_> {
    fn open(&mut self, _: &str) -> Result<(), PackageError> {
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PackageError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Only hashes the binary ([`verify`]).
struct DropBinary;

impl BinarySink for DropBinary {
    fn open(&mut self, _: &str) -> Result<(), PackageError> {
        Ok(())
    }

    fn write(&mut self, _: &[u8]) -> Result<(), PackageError> {
        Ok(())
    }
}

/// Streams the binary to its file in `dir` ([`unpack`]).
struct BinaryFile<'a> {
    dir: &'a Path,
    file: Option<File>,
    /// The file, once created (removed if the package is refused).
    path: Option<PathBuf>,
}

impl BinarySink for BinaryFile<'_> {
    fn open(&mut self, name: &str) -> Result<(), PackageError> {
        let path = self.dir.join(name);
        let file = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        self.file = Some(file);
        self.path = Some(path);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PackageError> {
        match (&mut self.file, &self.path) {
            (Some(file), Some(path)) => file
                .write_all(bytes)
                .map_err(io(format!("writing {}", path.display()))),
            _ => Err(PackageError::Invalid(
                "binary bytes before its entry".into(),
            )),
        }
    }
}

impl BinaryFile<'_> {
    /// Closes the binary's file, made executable; its path.
    fn finish(&mut self) -> Result<PathBuf, PackageError> {
        let path = self
            .path
            .clone()
            .ok_or_else(|| PackageError::Invalid("the binary was never written".into()))?;
        if let Some(file) = self.file.take() {
            file.sync_all()
                .map_err(io(format!("writing {}", path.display())))?;
        }
        set_mode(&path, 0o755)?;
        Ok(path)
    }
}

/// What [`walk`] found, besides the binary (given to its sink).
struct Contents {
    manifest: Manifest,
    binary_size: u64,
    topology_toml: Option<String>,
}

/// The three kinds of entry a package has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Manifest,
    Binary,
    Topology,
}

/// Reads an archive entry by entry, within the bounds in the module's
/// documentation, giving the binary's bytes to `sink` as they are
/// inflated, and checks the binary against the manifest's hash.
fn walk(
    archive: &[u8],
    max_binary: u64,
    sink: &mut dyn BinarySink,
) -> Result<Contents, PackageError> {
    let max_total = MAX_MANIFEST
        .saturating_add(MAX_TOPOLOGY)
        .saturating_add(max_binary);
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    // Raw: the tar crate itself reads GNU long names and PAX headers into
    // memory whatever their size, and expands GNU sparse maps into zeros;
    // raw, each is just an entry, refused below for not being a file.
    let entries = tar
        .entries()
        .map_err(|e| PackageError::Invalid(format!("not a gzip-compressed tar archive: {e}")))?
        .raw(true);
    let mut count = 0usize;
    let mut total = 0u64;
    let mut manifest: Option<Manifest> = None;
    let mut binary: Option<(u64, String)> = None;
    let mut topology_toml: Option<String> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| match count {
            0 => PackageError::Invalid(format!("not a gzip-compressed tar archive: {e}")),
            _ => PackageError::Invalid(format!("corrupt archive after entry {count}: {e}")),
        })?;
        count += 1;
        let name = quote(&entry.path_bytes());
        if count > MAX_ENTRIES {
            return Err(PackageError::TooManyEntries {
                name,
                limit: MAX_ENTRIES,
            });
        }
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            return Err(PackageError::NotRegularFile {
                name,
                kind: describe(kind),
            });
        }
        let part = {
            let raw = entry.path_bytes();
            if *raw == *MANIFEST_FILE.as_bytes() {
                Part::Manifest
            } else if *raw == *TOPOLOGY_FILE.as_bytes() {
                Part::Topology
            } else if manifest.is_none() {
                return Err(PackageError::ManifestNotFirst { name });
            } else if manifest
                .as_ref()
                .is_some_and(|m| *raw == *m.binary.as_bytes())
            {
                Part::Binary
            } else {
                return Err(PackageError::UnknownEntry { name });
            }
        };
        let seen = match part {
            Part::Manifest => manifest.is_some(),
            Part::Binary => binary.is_some(),
            Part::Topology => topology_toml.is_some(),
        };
        if seen {
            return Err(PackageError::DuplicateEntry { name });
        }
        // This entry's budget: its own limit, or what is left of the total.
        let own = match part {
            Part::Manifest => MAX_MANIFEST,
            Part::Binary => max_binary,
            Part::Topology => MAX_TOPOLOGY,
        };
        let left = max_total - total;
        let budget = own.min(left);
        let too_large = |name: String| {
            if own <= left {
                PackageError::EntryTooLarge { name, limit: own }
            } else {
                PackageError::TooLarge {
                    name,
                    limit: max_total,
                }
            }
        };
        // A declared size past the budget is refused at once; but the
        // header only gives an early answer: what counts is what is read.
        let declared = entry
            .header()
            .entry_size()
            .map_err(|e| PackageError::Invalid(format!("corrupt header of `{name}`: {e}")))?;
        if declared > budget {
            return Err(too_large(name));
        }
        let corrupt = |name: &str, e: std::io::Error| {
            PackageError::Invalid(format!("corrupt archive at `{name}`: {e}"))
        };
        let mut limited = (&mut entry).take(budget.saturating_add(1));
        let size = if part == Part::Binary {
            // The manifest's own name: `name` is quoted for messages.
            if let Some(m) = &manifest {
                sink.open(&m.binary)?;
            }
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut size = 0u64;
            loop {
                let n = match limited.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(corrupt(&name, e)),
                };
                size += n as u64;
                if size > budget {
                    return Err(too_large(name));
                }
                hasher.update(&buf[..n]);
                sink.write(&buf[..n])?;
            }
            binary = Some((size, hex(&hasher.finalize())));
            size
        } else {
            let mut data = Vec::new();
            limited
                .read_to_end(&mut data)
                .map_err(|e| corrupt(&name, e))?;
            let size = data.len() as u64;
            if size > budget {
                return Err(too_large(name));
            }
            if part == Part::Manifest {
                let m: Manifest = serde_json::from_slice(&data)
                    .map_err(|e| PackageError::Invalid(format!("bad {MANIFEST_FILE}: {e}")))?;
                check_binary_name(&m.binary)?;
                manifest = Some(m);
            } else {
                topology_toml =
                    Some(String::from_utf8(data).map_err(|_| {
                        PackageError::Invalid(format!("{TOPOLOGY_FILE} is not UTF-8"))
                    })?);
            }
            size
        };
        if size != declared {
            return Err(PackageError::Invalid(format!(
                "corrupt archive: `{name}` ends after {size} of the {declared} bytes its header gives"
            )));
        }
        total += size;
    }
    let manifest = manifest.ok_or_else(|| PackageError::Invalid(format!("no {MANIFEST_FILE}")))?;
    let (binary_size, actual) = binary.ok_or_else(|| {
        PackageError::Invalid(format!("the binary `{}` is missing", manifest.binary))
    })?;
    if actual != manifest.sha256 {
        return Err(PackageError::HashMismatch {
            what: format!("binary `{}`", manifest.binary),
            expected: manifest.sha256.clone(),
            actual,
        });
    }
    Ok(Contents {
        manifest,
        binary_size,
        topology_toml,
    })
}

/// An entry name fit for an error message: lossy UTF-8, control characters
/// escaped, at most [`MAX_QUOTED_NAME`] characters.
fn quote(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let mut out: String = text
        .chars()
        .take(MAX_QUOTED_NAME)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().count() > MAX_QUOTED_NAME {
        out.push('…');
    }
    out
}

/// What a non-file entry is, in words.
fn describe(kind: tar::EntryType) -> String {
    use tar::EntryType as T;
    match kind {
        T::Link => "hard link".into(),
        T::Symlink => "symbolic link".into(),
        T::Char => "character device".into(),
        T::Block => "block device".into(),
        T::Directory => "directory".into(),
        T::Fifo => "fifo".into(),
        T::Continuous => "contiguous file".into(),
        T::GNULongName => "GNU long-name header".into(),
        T::GNULongLink => "GNU long-link header".into(),
        T::GNUSparse => "GNU sparse file".into(),
        T::XGlobalHeader => "PAX global header".into(),
        T::XHeader => "PAX extended header".into(),
        other => format!(
            "entry of type `{}`",
            char::from(other.as_byte()).escape_default()
        ),
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PackageError> {
    std::fs::write(path, data).map_err(io(format!("writing {}", path.display())))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), PackageError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("setting the mode of {}", path.display())))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            name: "wordcount".into(),
            version: "0.1.0".into(),
            binary: String::new(),
            sha256: String::new(),
            target: "x86_64-unknown-linux-gnu".into(),
            tempest_version: "0.1.0".into(),
        }
    }

    fn archive(dir: &Path) -> (Vec<u8>, Manifest) {
        let bin = dir.join("wordcount");
        std::fs::write(&bin, b"#!/bin/sh\necho hi\n").unwrap();
        let mut out = Vec::new();
        let m = pack(&bin, Some("name = \"wordcount\"\n"), manifest(), &mut out).unwrap();
        (out, m)
    }

    #[test]
    fn pack_then_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, m) = archive(dir.path());
        assert_eq!(m.binary, "wordcount");
        assert!(is_content_hash(&m.sha256));
        let hash = sha256_hex(&bytes);
        let to = dir.path().join("unpacked");
        let (back, bin) = unpack(&bytes, &hash, &to).unwrap();
        assert_eq!(back, m);
        assert_eq!(std::fs::read(&bin).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(
            std::fs::read_to_string(to.join(TOPOLOGY_FILE)).unwrap(),
            "name = \"wordcount\"\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&bin).unwrap().permissions().mode() & 0o111,
                0o111
            );
        }
        let read = read(&bytes, 1 << 20).unwrap();
        assert_eq!(read.binary, b"#!/bin/sh\necho hi\n");
        let verified = verify(&bytes, 1 << 20).unwrap();
        assert_eq!(verified.manifest, m);
        assert_eq!(verified.binary_size, 18);
        assert_eq!(
            verified.topology_toml.as_deref(),
            Some("name = \"wordcount\"\n")
        );
    }

    #[test]
    fn a_binary_name_that_messages_escape_is_unpacked_as_named() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("it's \"wörd\"count");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        let mut out = Vec::new();
        pack(&bin, None, manifest(), &mut out).unwrap();
        let to = dir.path().join("unpacked");
        let (m, path) = unpack(&out, &sha256_hex(&out), &to).unwrap();
        assert_eq!(path, to.join("it's \"wörd\"count"));
        assert_eq!(m.binary, "it's \"wörd\"count");
        assert_eq!(std::fs::read(path).unwrap(), b"#!/bin/sh\n");
    }

    #[test]
    fn a_wrong_content_hash_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, _) = archive(dir.path());
        let err = unpack(&bytes, &"0".repeat(64), &dir.path().join("x")).unwrap_err();
        assert!(matches!(err, PackageError::HashMismatch { .. }), "{err}");
    }

    #[test]
    fn garbage_and_swapped_binaries_are_refused() {
        assert!(matches!(
            read(b"not a package", 1 << 20),
            Err(PackageError::Invalid(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let (_, m) = archive(dir.path());
        // A manifest whose hash does not match the binary beside it.
        let out = gzip(&tar_of(&[
            file(MANIFEST_FILE, &serde_json::to_vec(&m).unwrap()),
            file("wordcount", b"something else"),
        ]));
        let err = read(&out, 1 << 20).unwrap_err();
        assert!(matches!(err, PackageError::HashMismatch { .. }), "{err}");
        let err = read(&out, 4).unwrap_err();
        assert!(
            matches!(&err, PackageError::EntryTooLarge { name, limit: 4 } if name == "wordcount"),
            "{err}"
        );
        // Unpacking a refused package leaves no binary behind.
        let to = dir.path().join("refused");
        let err = unpack(&out, &sha256_hex(&out), &to).unwrap_err();
        assert!(matches!(err, PackageError::HashMismatch { .. }), "{err}");
        assert!(!to.join("wordcount").exists());
    }

    // -----------------------------------------------------------------------
    // Hostile archives, built header by header.

    /// A tar header: `name` written as raw bytes (no checks), `kind`,
    /// and a size field claiming `size` (whatever data follows).
    fn header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o755);
        h.set_mtime(0);
        h
    }

    /// A header and its data, padded to whole blocks.
    fn entry(mut h: tar::Header, data: &[u8]) -> Vec<u8> {
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    fn file(name: &str, data: &[u8]) -> Vec<u8> {
        entry(
            header(name.as_bytes(), tar::EntryType::Regular, data.len() as u64),
            data,
        )
    }

    /// Entries and the end-of-archive blocks.
    fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out = entries.concat();
        out.extend_from_slice(&[0; 1024]);
        out
    }

    fn gzip(tar: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(tar).unwrap();
        gz.finish().unwrap()
    }

    /// A manifest entry naming `binary`, whose hash is that of `data`.
    fn manifest_for(binary: &str, data: &[u8]) -> Vec<u8> {
        let m = Manifest {
            binary: binary.into(),
            sha256: sha256_hex(data),
            ..manifest()
        };
        file(MANIFEST_FILE, &serde_json::to_vec(&m).unwrap())
    }

    #[test]
    fn gnu_sparse_entries_are_refused_without_expanding_them() {
        // A sparse file claiming 1 GiB of holes, with no data at all: the
        // tar crate, not run raw, would hand 1 GiB of zeros to the reader.
        let mut h = header(MANIFEST_FILE.as_bytes(), tar::EntryType::GNUSparse, 0);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(1 << 30);
        gnu.sparse[0].set_offset(1 << 30);
        gnu.sparse[0].set_length(0);
        let sparse = entry(h, b"");
        for binary_first in [false, true] {
            let entries = if binary_first {
                vec![manifest_for("wordcount", b""), sparse.clone()]
            } else {
                vec![sparse.clone()]
            };
            let archive = gzip(&tar_of(&entries));
            assert!(archive.len() < 300, "{} bytes", archive.len());
            for err in [
                read(&archive, u64::MAX).unwrap_err(),
                verify(&archive, u64::MAX).unwrap_err(),
            ] {
                assert!(
                    matches!(&err, PackageError::NotRegularFile { kind, .. } if kind.contains("sparse")),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn pax_and_long_name_headers_are_refused_unread() {
        // PAX sparse headers, a PAX size override, a global header, and a
        // long name whose data is a gzip bomb of 64 MiB.
        let pax = b"30 GNU.sparse.major=1\n30 GNU.sparse.minor=0\n25 size=1099511627776\n";
        for (kind, data, what) in [
            (tar::EntryType::XHeader, pax.to_vec(), "PAX extended header"),
            (
                tar::EntryType::XGlobalHeader,
                pax.to_vec(),
                "PAX global header",
            ),
            (
                tar::EntryType::GNULongName,
                vec![b'a'; 64 << 20],
                "GNU long-name header",
            ),
            (
                tar::EntryType::GNULongLink,
                vec![b'a'; 64 << 20],
                "GNU long-link header",
            ),
        ] {
            let h = header(b"././@LongLink", kind, data.len() as u64);
            let archive = gzip(&tar_of(&[entry(h, &data), file(MANIFEST_FILE, b"{}")]));
            let err = read(&archive, u64::MAX).unwrap_err();
            assert!(
                matches!(&err, PackageError::NotRegularFile { kind, .. } if kind == what),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn links_devices_directories_and_fifos_are_refused() {
        let body = b"#!/bin/sh\n";
        for (kind, what) in [
            (tar::EntryType::Symlink, "symbolic link"),
            (tar::EntryType::Link, "hard link"),
            (tar::EntryType::Char, "character device"),
            (tar::EntryType::Block, "block device"),
            (tar::EntryType::Directory, "directory"),
            (tar::EntryType::Fifo, "fifo"),
            (tar::EntryType::Continuous, "contiguous file"),
            (tar::EntryType::new(b'Z'), "entry of type `Z`"),
        ] {
            let mut h = header(b"wordcount", kind, 0);
            h.set_link_name_literal("/etc/passwd").unwrap();
            let archive = gzip(&tar_of(&[manifest_for("wordcount", body), entry(h, b"")]));
            let err = read(&archive, 1 << 20).unwrap_err();
            assert!(
                matches!(&err, PackageError::NotRegularFile { name, kind } if name == "wordcount" && kind == what),
                "{what}: {err}"
            );
            let dir = tempfile::tempdir().unwrap();
            let to = dir.path().join("p");
            let err = unpack(&archive, &sha256_hex(&archive), &to).unwrap_err();
            assert!(matches!(err, PackageError::NotRegularFile { .. }), "{err}");
            assert!(!to.join("wordcount").exists(), "{what}");
        }
    }

    #[test]
    fn many_tiny_entries_are_refused_at_the_first_one_past_the_limit() {
        let body = b"#!/bin/sh\n";
        let mut entries = vec![
            manifest_for("wordcount", body),
            file("wordcount", body),
            file(TOPOLOGY_FILE, b""),
        ];
        entries.extend((0..10_000).map(|i| file(&format!("f{i}"), b"x")));
        let archive = gzip(&tar_of(&entries));
        let err = read(&archive, 1 << 20).unwrap_err();
        assert!(
            matches!(&err, PackageError::TooManyEntries { name, limit: MAX_ENTRIES } if name == "f0"),
            "{err}"
        );
        // The three alone are a package.
        let archive = gzip(&tar_of(&entries[..3]));
        assert_eq!(read(&archive, 1 << 20).unwrap().binary, body);
    }

    #[test]
    fn unknown_misplaced_and_duplicate_names_are_refused() {
        let body = b"#!/bin/sh\n";
        let cases: [(Vec<Vec<u8>>, &str); 5] = [
            (
                vec![manifest_for("wordcount", body), file("../wordcount", body)],
                "unknown",
            ),
            (
                vec![manifest_for("wordcount", body), file("README", b"hi")],
                "unknown",
            ),
            (
                vec![file("wordcount", body), manifest_for("wordcount", body)],
                "first",
            ),
            (
                vec![
                    manifest_for("wordcount", body),
                    file("wordcount", body),
                    file("wordcount", b"#!/bin/sh\nrm -rf ~\n"),
                ],
                "twice",
            ),
            (
                vec![manifest_for("wordcount", body), manifest_for("other", body)],
                "twice",
            ),
        ];
        for (entries, what) in cases {
            let err = read(&gzip(&tar_of(&entries)), 1 << 20).unwrap_err();
            let ok = match what {
                "unknown" => matches!(err, PackageError::UnknownEntry { .. }),
                "first" => matches!(err, PackageError::ManifestNotFirst { .. }),
                _ => matches!(err, PackageError::DuplicateEntry { .. }),
            };
            assert!(ok, "{what}: {err}");
        }
        // Topology.toml may come before the manifest.
        let archive = gzip(&tar_of(&[
            file(TOPOLOGY_FILE, b"x = 1\n"),
            manifest_for("wordcount", body),
            file("wordcount", body),
        ]));
        assert_eq!(
            read(&archive, 1 << 20).unwrap().topology_toml.as_deref(),
            Some("x = 1\n")
        );
    }

    #[test]
    fn bad_binary_names_in_the_manifest_are_refused() {
        for name in ["", ".", "..", "a/b", MANIFEST_FILE, TOPOLOGY_FILE, "a\0b"] {
            let archive = gzip(&tar_of(&[manifest_for(name, b"")]));
            let err = read(&archive, 1 << 20).unwrap_err();
            assert!(
                matches!(&err, PackageError::Invalid(m) if m.contains("bad binary name")),
                "{name:?}: {err}"
            );
        }
        let long = "b".repeat(MAX_BINARY_NAME + 1);
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(&long);
        std::fs::write(&bin, b"x").unwrap();
        let err = pack(&bin, None, manifest(), Vec::new()).unwrap_err();
        assert!(matches!(err, PackageError::Invalid(_)), "{err}");
    }

    /// The 91-byte archive that aborted an agent: a binary whose header
    /// claims 1 TiB, followed by almost nothing. Nothing is allocated from
    /// the claim (else this test aborts), with no limit at all or the
    /// default one.
    #[test]
    fn a_header_claiming_a_tebibyte_allocates_nothing() {
        let body = b"#!/bin/sh\n";
        let mut tar = manifest_for("wordcount", body);
        tar.extend_from_slice(header(b"wordcount", tar::EntryType::Regular, 1 << 40).as_bytes());
        let last = tar.len() - 512;
        let mut h = tar::Header::from_byte_slice(&tar[last..]).clone();
        h.set_cksum();
        tar[last..].copy_from_slice(h.as_bytes());
        tar.extend_from_slice(body);
        let archive = gzip(&tar);
        let err = read(&archive, u64::MAX).unwrap_err();
        assert!(
            matches!(&err, PackageError::Invalid(m) if m.contains("`wordcount` ends after 10 of the 1099511627776 bytes")),
            "{err}"
        );
        let err = verify(&archive, u64::MAX).unwrap_err();
        assert!(matches!(err, PackageError::Invalid(_)), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("p");
        let err = unpack(&archive, &sha256_hex(&archive), &to).unwrap_err();
        assert!(
            matches!(&err, PackageError::EntryTooLarge { name, limit: MAX_UNPACKED_BINARY } if name == "wordcount"),
            "{err}"
        );
        let err = unpack_within(&archive, &sha256_hex(&archive), &to, u64::MAX).unwrap_err();
        assert!(matches!(err, PackageError::Invalid(_)), "{err}");
        assert!(!to.join("wordcount").exists());
    }

    /// 64 MiB of zeros, which gzip makes 64 KiB of: refused past the limit,
    /// and verified or unpacked without being held in memory within it.
    #[test]
    fn a_gzip_bomb_is_bounded_by_what_is_inflated() {
        let zeros = vec![0u8; 64 << 20];
        let archive = gzip(&tar_of(&[
            manifest_for("wordcount", &zeros),
            file("wordcount", &zeros),
        ]));
        assert!(archive.len() < 200 << 10, "{} bytes", archive.len());
        for err in [
            read(&archive, 1 << 20).unwrap_err(),
            verify(&archive, 1 << 20).unwrap_err(),
        ] {
            assert!(
                matches!(&err, PackageError::EntryTooLarge { name, limit } if name == "wordcount" && *limit == 1 << 20),
                "{err}"
            );
        }
        assert_eq!(verify(&archive, 64 << 20).unwrap().binary_size, 64 << 20);
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("p");
        let hash = sha256_hex(&archive);
        let err = unpack_within(&archive, &hash, &to, (64 << 20) - 1).unwrap_err();
        assert!(matches!(err, PackageError::EntryTooLarge { .. }), "{err}");
        assert!(!to.join("wordcount").exists());
        let (_, bin) = unpack_within(&archive, &hash, &to, 64 << 20).unwrap();
        assert_eq!(std::fs::metadata(bin).unwrap().len(), 64 << 20);
        // The manifest and Topology.toml have their own, small limits.
        let big = vec![b' '; MAX_TOPOLOGY as usize + 1];
        let archive = gzip(&tar_of(&[file(TOPOLOGY_FILE, &big)]));
        let err = read(&archive, u64::MAX).unwrap_err();
        assert!(
            matches!(
                &err,
                PackageError::EntryTooLarge {
                    limit: MAX_TOPOLOGY,
                    ..
                }
            ),
            "{err}"
        );
        let big = vec![b' '; MAX_MANIFEST as usize + 1];
        let archive = gzip(&tar_of(&[file(MANIFEST_FILE, &big)]));
        let err = read(&archive, u64::MAX).unwrap_err();
        assert!(
            matches!(
                &err,
                PackageError::EntryTooLarge {
                    limit: MAX_MANIFEST,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn names_in_errors_are_escaped_and_bounded() {
        assert_eq!(quote(b"a\nb\xff"), "a\\nb\u{fffd}");
        assert_eq!(quote(&[b'x'; 300]).chars().count(), MAX_QUOTED_NAME + 1);
    }
}
