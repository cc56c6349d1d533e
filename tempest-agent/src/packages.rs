//! The node's package store: `<data_dir>/packages/<content hash>/`.
//!
//! A package is fetched from the director once, by content hash, verified
//! (the archive against its hash, the binary against the manifest), checked
//! to be an executable for this machine, unpacked into a temporary directory
//! and renamed into place, so a directory named by a hash is always a whole,
//! verified package. Every process of the package runs from it. Asking for
//! a package that is being fetched joins that fetch; a failed fetch is
//! retried with back-off, and meanwhile its processes are reported failed
//! with the reason. A hash is validated before it is used in a path.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tempest_control::package::{self, is_content_hash, MANIFEST_FILE, TOPOLOGY_FILE};
use tempest_control::Manifest;
use tokio::sync::Notify;

/// The largest package archive accepted.
pub const MAX_PACKAGE_BYTES: u64 = 2 << 30;
/// How long one download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// The first wait before a failed fetch is tried again; it doubles.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait before a failed fetch is tried again.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// An unpacked, verified package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    /// Its content hash.
    pub hash: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The topology binary.
    pub binary: PathBuf,
    /// The package's own `Topology.toml`, if it has one.
    pub topology_toml: Option<PathBuf>,
}

/// Where a package stands.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// Unpacked and ready to run.
    Ready(Arc<Package>),
    /// Being fetched.
    Fetching,
    /// Cannot be had now, and why (it is tried again later).
    Failed(String),
}

enum Entry {
    Fetching,
    Ready(Arc<Package>),
    Failed {
        error: String,
        retry_at: Instant,
        attempts: u32,
    },
}

/// Where packages come from.
#[derive(Clone)]
pub struct Origin {
    /// The director's base URL.
    pub director: String,
    /// The HTTP client.
    pub client: reqwest::Client,
    /// The agent token.
    pub token: Option<tempest_control::Secret>,
}

/// The package store.
pub struct Packages {
    dir: PathBuf,
    origin: Option<Origin>,
    entries: Mutex<HashMap<String, Entry>>,
    changed: Arc<Notify>,
    downloads: AtomicU64,
}

impl Packages {
    /// Opens the store in `dir` (created if missing; temporary directories
    /// of unpacks a previous run left half-done are removed). `changed` is
    /// notified whenever a fetch ends.
    pub fn open(
        dir: PathBuf,
        origin: Option<Origin>,
        changed: Arc<Notify>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Packages {
            dir,
            origin,
            entries: Mutex::new(HashMap::new()),
            changed,
            downloads: AtomicU64::new(0),
        })
    }

    /// Archives downloaded so far.
    pub fn downloads(&self) -> u64 {
        self.downloads.load(Ordering::Relaxed)
    }

    /// Where the package `hash` stands; starts fetching it if it is neither
    /// here nor being fetched (and a failed fetch's back-off is over). Must
    /// be called inside a tokio runtime.
    pub fn lookup(self: &Arc<Self>, hash: &str) -> Lookup {
        if !is_content_hash(hash) {
            return Lookup::Failed(format!(
                "`{hash}` is not a package content hash (64 lowercase hex digits)"
            ));
        }
        let mut entries = self.entries.lock();
        let attempts = match entries.get(hash) {
            Some(Entry::Ready(p)) => return Lookup::Ready(p.clone()),
            Some(Entry::Fetching) => return Lookup::Fetching,
            Some(Entry::Failed {
                error, retry_at, ..
            }) if Instant::now() < *retry_at => return Lookup::Failed(error.clone()),
            Some(Entry::Failed { attempts, .. }) => *attempts,
            None => 0,
        };
        match load(&self.dir, hash) {
            Ok(Some(p)) => {
                let p = Arc::new(p);
                entries.insert(hash.to_owned(), Entry::Ready(p.clone()));
                return Lookup::Ready(p);
            }
            Ok(None) => {}
            Err(e) => {
                // Not whole or not runnable: fetch it again.
                tracing::warn!("package {hash} on disk is unusable ({e}); fetching it again");
                let _ = std::fs::remove_dir_all(self.dir.join(hash));
            }
        }
        let Some(origin) = self.origin.clone() else {
            let error = format!(
                "package {hash} is not on this node and no director is configured to fetch it \
                 from (upload it with PUT /api/v1/packages/{hash})"
            );
            entries.insert(
                hash.to_owned(),
                Entry::Failed {
                    error: error.clone(),
                    retry_at: Instant::now() + RETRY_MIN,
                    attempts: 0,
                },
            );
            return Lookup::Failed(error);
        };
        entries.insert(hash.to_owned(), Entry::Fetching);
        drop(entries);
        let store = self.clone();
        let hash = hash.to_owned();
        tokio::spawn(async move {
            let result = match store.download(&origin, &hash).await {
                Ok(bytes) => store.install(&hash, bytes).await,
                Err(e) => Err(e),
            };
            let entry = match result {
                Ok(p) => {
                    tracing::info!(
                        "package {hash} ({} {}) is ready in {}",
                        p.manifest.name,
                        p.manifest.version,
                        p.dir.display()
                    );
                    Entry::Ready(p)
                }
                Err(error) => {
                    let wait = RETRY_MIN
                        .saturating_mul(1 << attempts.min(10))
                        .min(RETRY_MAX);
                    tracing::warn!(
                        "{error} (trying again in {})",
                        humantime::format_duration(wait)
                    );
                    Entry::Failed {
                        error,
                        retry_at: Instant::now() + wait,
                        attempts: attempts + 1,
                    }
                }
            };
            store.entries.lock().insert(hash, entry);
            store.changed.notify_one();
        });
        Lookup::Fetching
    }

    async fn download(&self, origin: &Origin, hash: &str) -> Result<Vec<u8>, String> {
        let url = format!("{}/api/v1/packages/{hash}/archive", origin.director);
        tracing::info!("fetching package {hash} from {url}");
        let fail = |what: String| format!("fetching package {hash} from {url}: {what}");
        let mut request = origin.client.get(&url).timeout(DOWNLOAD_TIMEOUT);
        if let Some(token) = &origin.token {
            request = request.bearer_auth(token.expose());
        }
        let mut response = request.send().await.map_err(|e| fail(chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(fail(format!(
                "the director answered {status}: {}",
                truncate(body.trim(), 300)
            )));
        }
        if response.content_length().unwrap_or(0) > MAX_PACKAGE_BYTES {
            return Err(fail(format!(
                "the archive is larger than {MAX_PACKAGE_BYTES} bytes"
            )));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fail(chain(&e)))? {
            if bytes.len() as u64 + chunk.len() as u64 > MAX_PACKAGE_BYTES {
                return Err(fail(format!(
                    "the archive is larger than {MAX_PACKAGE_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        self.downloads.fetch_add(1, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Verifies `archive` against `hash` and unpacks it into the store
    /// (the API's upload and the downloads both come here).
    pub async fn install(
        &self,
        hash: &str,
        archive: impl AsRef<[u8]> + Send + 'static,
    ) -> Result<Arc<Package>, String> {
        if !is_content_hash(hash) {
            return Err(format!(
                "`{hash}` is not a package content hash (64 lowercase hex digits)"
            ));
        }
        let dir = self.dir.clone();
        let owned = hash.to_owned();
        let p =
            tokio::task::spawn_blocking(move || install_blocking(&dir, &owned, archive.as_ref()))
                .await
                .map_err(|e| format!("package {hash}: unpacking ended abnormally: {e}"))??;
        let p = Arc::new(p);
        self.entries
            .lock()
            .insert(hash.to_owned(), Entry::Ready(p.clone()));
        self.changed.notify_one();
        Ok(p)
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn install_blocking(dir: &Path, hash: &str, archive: &[u8]) -> Result<Package, String> {
    let tmp = dir.join(format!(
        ".tmp-{hash}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        let (manifest, binary) = package::unpack(archive, hash, &tmp)
            .map_err(|e| format!("package {hash} refused: {e}"))?;
        // The unpacked files are the agent's alone, as the rest of its data.
        crate::make_private(&tmp)
            .map_err(|e| format!("package {hash}: securing {}: {e}", tmp.display()))?;
        check_executable(&binary)
            .map_err(|e| format!("package {hash} refused: `{}` {e}", manifest.binary))?;
        let target = dir.join(hash);
        if let Err(e) = std::fs::rename(&tmp, &target) {
            // Another install of the same hash got there first: same bytes.
            if !target.join(MANIFEST_FILE).is_file() {
                return Err(format!(
                    "package {hash}: moving it into {}: {e}",
                    target.display()
                ));
            }
        }
        load(dir, hash)?.ok_or_else(|| format!("package {hash} vanished after unpacking"))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Reads an unpacked package, if its directory exists.
fn load(dir: &Path, hash: &str) -> Result<Option<Package>, String> {
    let pdir = dir.join(hash);
    if !pdir.is_dir() {
        return Ok(None);
    }
    let bytes = std::fs::read(pdir.join(MANIFEST_FILE))
        .map_err(|e| format!("reading its {MANIFEST_FILE}: {e}"))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| format!("reading its {MANIFEST_FILE}: {e}"))?;
    if manifest.binary.is_empty() || manifest.binary.contains('/') || manifest.binary == ".." {
        return Err(format!("bad binary name `{}`", manifest.binary));
    }
    let binary = pdir.join(&manifest.binary);
    check_executable(&binary).map_err(|e| format!("`{}` {e}", manifest.binary))?;
    let toml = pdir.join(TOPOLOGY_FILE);
    Ok(Some(Package {
        hash: hash.to_owned(),
        topology_toml: toml.is_file().then_some(toml),
        binary,
        manifest,
        dir: pdir,
    }))
}

/// The ELF machine of this build's target, where known.
const fn elf_machine() -> Option<u16> {
    if cfg!(target_arch = "x86_64") {
        Some(62)
    } else if cfg!(target_arch = "aarch64") {
        Some(183)
    } else if cfg!(target_arch = "x86") {
        Some(3)
    } else if cfg!(target_arch = "arm") {
        Some(40)
    } else if cfg!(target_arch = "riscv64") {
        Some(243)
    } else {
        None
    }
}

/// Checks that `path` is a file this machine can execute: an ELF binary for
/// its architecture, a Mach-O binary, or a `#!` script, with an execute bit.
pub fn check_executable(path: &Path) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot be opened: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 == 0 {
            return Err("is not executable (no execute permission)".into());
        }
    }
    let mut head = [0u8; 20];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("cannot be read: {e}")),
        }
    }
    let head = &head[..n];
    if head.starts_with(b"#!") {
        return Ok(());
    }
    if head.starts_with(b"\x7fELF") {
        if head.len() < 20 {
            return Err("is not an executable: a truncated ELF header".into());
        }
        let machine = match head[5] {
            2 => u16::from_be_bytes([head[18], head[19]]),
            _ => u16::from_le_bytes([head[18], head[19]]),
        };
        return match elf_machine() {
            Some(m) if m != machine => Err(format!(
                "is an ELF binary for another machine (e_machine {machine}, this one is {m})"
            )),
            _ => Ok(()),
        };
    }
    const MACHO: [[u8; 4]; 4] = [
        [0xfe, 0xed, 0xfa, 0xcf],
        [0xcf, 0xfa, 0xed, 0xfe],
        [0xfe, 0xed, 0xfa, 0xce],
        [0xce, 0xfa, 0xed, 0xfe],
    ];
    if MACHO.iter().any(|m| head.starts_with(m)) {
        return Ok(());
    }
    Err("is not an executable: neither an ELF binary nor a #! script".into())
}

/// An error with its sources, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// `s` cut to at most `max` bytes (on a character boundary).
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, content: &[u8]) -> (Vec<u8>, String) {
        let bin = dir.join("topo");
        std::fs::write(&bin, content).unwrap();
        let manifest = Manifest {
            name: "topo".into(),
            version: "1".into(),
            binary: String::new(),
            sha256: String::new(),
            target: "x".into(),
            tempest_version: "0".into(),
        };
        let mut out = Vec::new();
        package::pack(&bin, Some("name = \"topo\"\n"), manifest, &mut out).unwrap();
        let hash = package::sha256_hex(&out);
        (out, hash)
    }

    #[tokio::test]
    async fn installs_a_package_once_and_refuses_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Packages::open(dir.path().join("packages"), None, Arc::new(Notify::new())).unwrap(),
        );
        let (bytes, hash) = archive(dir.path(), b"#!/bin/sh\nexit 0\n");
        let p = store.install(&hash, bytes.clone()).await.unwrap();
        assert_eq!(
            p.binary,
            dir.path().join("packages").join(&hash).join("topo")
        );
        assert!(p.topology_toml.is_some());
        // Installing again is harmless; a lookup finds it.
        store.install(&hash, bytes.clone()).await.unwrap();
        assert!(matches!(store.lookup(&hash), Lookup::Ready(_)));
        // A fresh store finds it on disk.
        let again = Arc::new(
            Packages::open(dir.path().join("packages"), None, Arc::new(Notify::new())).unwrap(),
        );
        assert!(matches!(again.lookup(&hash), Lookup::Ready(q) if *q == *p));

        let wrong = "0".repeat(64);
        let err = store.install(&wrong, bytes).await.unwrap_err();
        assert!(
            err.contains(&wrong) && err.contains("hash mismatch"),
            "{err}"
        );

        let (text, hash) = archive(dir.path(), b"just some text\n");
        let err = store.install(&hash, text).await.unwrap_err();
        assert!(err.contains("is not an executable"), "{err}");
        assert!(!dir.path().join("packages").join(&hash).exists());

        let err = match store.lookup("../../etc") {
            Lookup::Failed(e) => e,
            other => panic!("{other:?}"),
        };
        assert!(err.contains("not a package content hash"), "{err}");
        // Nothing left behind in the store but the one good package.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("packages"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn executables() {
        let me = std::env::current_exe().unwrap();
        check_executable(&me).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        assert!(check_executable(&f).unwrap_err().contains("permission"));
    }
}
