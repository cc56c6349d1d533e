//! Topology package archives.
//!
//! A package is a gzip-compressed tar archive holding:
//!
//! - `manifest.json`: a [`Manifest`] (name, version, the binary's file name
//!   and sha256, target triple, Tempest version);
//! - the topology binary, under the name the manifest gives;
//! - `Topology.toml`, the package's default configuration (optional).
//!
//! A package is known by its *content hash*: the sha256 of the archive's
//! bytes, in hex. The director stores packages by it and agents verify it on
//! download. [`unpack`] also checks the binary against the manifest's hash,
//! so a package whose parts were swapped is refused.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's name inside an archive.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The default configuration's name inside an archive.
pub const TOPOLOGY_FILE: &str = "Topology.toml";
/// The largest manifest accepted.
const MAX_MANIFEST: u64 = 64 * 1024;

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
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackageError {
    let context = context.into();
    move |source| PackageError::Io { context, source }
}

/// The sha256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// True for a 64-character lowercase hex string (a content hash).
pub fn is_content_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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

/// Reads and verifies an archive: it must hold a manifest and the binary it
/// names, whose hash matches; at most `max_binary` bytes of binary are read.
pub fn read(archive: &[u8], max_binary: u64) -> Result<Package, PackageError> {
    let gz = flate2::read::GzDecoder::new(archive);
    let mut tar = tar::Archive::new(gz);
    let mut manifest: Option<Manifest> = None;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| PackageError::Invalid(format!("not a gzip-compressed tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| PackageError::Invalid(format!("corrupt archive: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| PackageError::Invalid(format!("bad entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let limit = if name == MANIFEST_FILE {
            MAX_MANIFEST
        } else {
            max_binary
        };
        if entry.size() > limit {
            return Err(PackageError::Invalid(format!(
                "{name} is {} bytes, more than the limit of {limit}",
                entry.size()
            )));
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry
            .take(limit.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| PackageError::Invalid(format!("corrupt archive at {name}: {e}")))?;
        if name == MANIFEST_FILE {
            manifest = Some(
                serde_json::from_slice(&data)
                    .map_err(|e| PackageError::Invalid(format!("bad {MANIFEST_FILE}: {e}")))?,
            );
        } else {
            files.push((name, data));
        }
    }
    let manifest = manifest.ok_or_else(|| PackageError::Invalid(format!("no {MANIFEST_FILE}")))?;
    if manifest.binary.contains('/')
        || manifest.binary.is_empty()
        || manifest.binary == MANIFEST_FILE
    {
        return Err(PackageError::Invalid(format!(
            "bad binary name `{}`",
            manifest.binary
        )));
    }
    let take = |files: &mut Vec<(String, Vec<u8>)>, name: &str| {
        files
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| files.swap_remove(i).1)
    };
    let binary = take(&mut files, &manifest.binary).ok_or_else(|| {
        PackageError::Invalid(format!("the binary `{}` is missing", manifest.binary))
    })?;
    let actual = sha256_hex(&binary);
    if actual != manifest.sha256 {
        return Err(PackageError::HashMismatch {
            what: format!("binary `{}`", manifest.binary),
            expected: manifest.sha256.clone(),
            actual,
        });
    }
    let topology_toml = take(&mut files, TOPOLOGY_FILE)
        .map(|b| {
            String::from_utf8(b)
                .map_err(|_| PackageError::Invalid(format!("{TOPOLOGY_FILE} is not UTF-8")))
        })
        .transpose()?;
    Ok(Package {
        manifest,
        binary,
        topology_toml,
    })
}

/// Verifies `archive` against its content hash and unpacks it into `dir`
/// (the binary made executable). Returns the manifest and the binary's path.
pub fn unpack(
    archive: &[u8],
    content_hash: &str,
    dir: &Path,
) -> Result<(Manifest, PathBuf), PackageError> {
    let actual = sha256_hex(archive);
    if actual != content_hash {
        return Err(PackageError::HashMismatch {
            what: "package archive".into(),
            expected: content_hash.into(),
            actual,
        });
    }
    let package = read(archive, u64::MAX)?;
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let binary = dir.join(&package.manifest.binary);
    write_file(&binary, &package.binary, 0o755)?;
    if let Some(toml) = &package.topology_toml {
        write_file(&dir.join(TOPOLOGY_FILE), toml.as_bytes(), 0o644)?;
    }
    let json = serde_json::to_vec_pretty(&package.manifest)
        .map_err(|e| PackageError::Invalid(e.to_string()))?;
    write_file(&dir.join(MANIFEST_FILE), &json, 0o644)?;
    Ok((package.manifest, binary))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PackageError> {
    std::fs::write(path, data).map_err(io(format!("writing {}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("setting the mode of {}", path.display())))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
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
        let other = dir.path().join("wordcount");
        std::fs::write(&other, b"something else").unwrap();
        let mut out = Vec::new();
        let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        append(
            &mut tar,
            MANIFEST_FILE,
            &serde_json::to_vec(&m).unwrap(),
            0o644,
        )
        .unwrap();
        append(&mut tar, "wordcount", b"something else", 0o755).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        let err = read(&out, 1 << 20).unwrap_err();
        assert!(matches!(err, PackageError::HashMismatch { .. }), "{err}");
        assert!(
            matches!(read(&out, 4), Err(PackageError::Invalid(_))),
            "size limit"
        );
    }
}
