//! Credentials: the secrets a cluster's daemons, its CLI and its topology
//! processes hold, and how they are made, read and compared.
//!
//! A cluster has four kinds of secret, each a random 32-byte value written
//! as 64 hex digits:
//!
//! - the **admin** token: people and the CLI; everything on the director;
//! - the **viewer** token: reads only (the API's GETs, the web UI's pages);
//! - the **agent** token: agents heartbeat and download packages with it,
//!   and the director calls the agents' APIs with it;
//! - a **data-plane secret** per deployment, made by the director at deploy
//!   and given to that topology's processes only, as [`DATA_SECRET_ENV`].
//!
//! Secrets come from files or the environment, never from a command line
//! (which every user of a machine can read in `/proc/*/cmdline`). A
//! [`Secret`]'s `Debug` never shows it, and comparisons take a time that
//! does not depend on where the values differ.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The bytes of a generated secret (written as twice as many hex digits).
pub const SECRET_BYTES: usize = 32;
/// The environment variable of the director's admin token.
pub const ADMIN_TOKEN_ENV: &str = "TEMPEST_ADMIN_TOKEN";
/// The environment variable of the director's viewer token.
pub const VIEWER_TOKEN_ENV: &str = "TEMPEST_VIEWER_TOKEN";
/// The environment variable of the agent token (the director's and the
/// agents').
pub const AGENT_TOKEN_ENV: &str = "TEMPEST_AGENT_TOKEN";
/// The environment variable of the old single cluster token: the
/// director's admin token and an agent's agent token.
pub const LEGACY_TOKEN_ENV: &str = "TEMPEST_TOKEN";
/// The environment variable a topology process finds its deployment's
/// data-plane secret in.
pub const DATA_SECRET_ENV: &str = "TEMPEST_DATA_SECRET";
/// Every environment variable that may hold a daemon's credential: an
/// agent removes them all from its processes' environment.
pub const CREDENTIAL_ENVS: [&str; 4] = [
    ADMIN_TOKEN_ENV,
    VIEWER_TOKEN_ENV,
    AGENT_TOKEN_ENV,
    LEGACY_TOKEN_ENV,
];

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The value is empty.
    #[error("{0}: the secret is empty")]
    Empty(String),
    /// The value holds white space or control characters.
    #[error("{0}: the secret must not contain white space or control characters")]
    Malformed(String),
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The operating system's random source could not be read.
    #[error("reading /dev/urandom for a new secret: {0}")]
    Random(std::io::Error),
}

/// A secret value. Its `Debug` shows `Secret(***)`; [`Secret::expose`]
/// gives the value to whoever must send it on.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// A secret of this text (surrounding white space, such as a file's
    /// last newline, trimmed). `what` names where it comes from, for the
    /// error.
    pub fn new(value: &str, what: &str) -> Result<Secret, CredentialError> {
        let v = value.trim();
        if v.is_empty() {
            return Err(CredentialError::Empty(what.to_owned()));
        }
        if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CredentialError::Malformed(what.to_owned()));
        }
        Ok(Secret(v.to_owned()))
    }

    /// A new random secret: [`SECRET_BYTES`] from the kernel's random
    /// source, in hex.
    pub fn generate() -> Result<Secret, CredentialError> {
        let mut bytes = [0u8; SECRET_BYTES];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(CredentialError::Random)?;
        Ok(Secret(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The secret in the file at `path` (its first line; a file may end
    /// with a newline).
    pub fn from_file(path: &Path) -> Result<Secret, CredentialError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::File {
            path: path.to_path_buf(),
            source,
        })?;
        Secret::new(
            text.lines().next().unwrap_or_default(),
            &path.display().to_string(),
        )
    }

    /// The secret in the environment variable `var`, if it is set and not
    /// empty.
    pub fn from_env(var: &str) -> Result<Option<Secret>, CredentialError> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Secret::new(&v, var).map(Some),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(CredentialError::Malformed(var.into())),
        }
    }

    /// The value, for whoever must send it (a header, a child's
    /// environment, a file of its own).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, compared in a time that depends
    /// neither on where they differ nor on their lengths.
    pub fn matches(&self, given: &str) -> bool {
        constant_time_eq(given.as_bytes(), self.0.as_bytes())
    }
}

/// Whether `a` and `b` are equal, in a time that depends neither on where
/// they differ nor on their lengths (their digests are compared).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// Whether only its owner can read the file at `path` (no group or other
/// permission bits). Daemons warn about a token file that others can read.
pub fn is_private(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        true
    }
}

/// Writes `secret` and a newline to a new file at `path`, readable and
/// writable by its owner only (mode 0600). An existing file is not
/// overwritten.
pub fn write_secret_file(path: &Path, secret: &Secret) -> Result<(), CredentialError> {
    write_private_file(path, format!("{}\n", secret.expose()).as_bytes()).map_err(|source| {
        CredentialError::File {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes `bytes` to a new file at `path`, readable and writable by its
/// owner only (mode 0600, whatever the umask), synced. An existing file is
/// not overwritten: secrets (tokens, private keys) are made once.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path)?;
    file.write_all(bytes).and_then(|()| file.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_hex_and_never_shown() {
        let (a, b) = (Secret::generate().unwrap(), Secret::generate().unwrap());
        assert_eq!(a.expose().len(), 2 * SECRET_BYTES);
        assert!(a.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "Secret(***)");
        assert!(!format!("{:?}", Some(&a)).contains(a.expose()));
        assert!(a.matches(a.expose()));
        assert!(!a.matches(b.expose()));
        assert!(!a.matches(""));
        assert!(!a.matches(&a.expose()[1..]));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{}\"", a.expose()));
        assert_eq!(serde_json::from_str::<Secret>(&json).unwrap(), a);
    }

    #[test]
    fn secrets_are_checked_and_read_from_private_files() {
        assert!(matches!(
            Secret::new("  \n", "x"),
            Err(CredentialError::Empty(_))
        ));
        assert!(matches!(
            Secret::new("a b", "x"),
            Err(CredentialError::Malformed(_))
        ));
        assert_eq!(Secret::new(" ab\n", "x").unwrap().expose(), "ab");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let s = Secret::generate().unwrap();
        write_secret_file(&path, &s).unwrap();
        assert!(is_private(&path));
        assert_eq!(Secret::from_file(&path).unwrap(), s);
        // Never overwritten.
        assert!(write_secret_file(&path, &s).is_err());
        let e = Secret::from_file(&dir.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(!is_private(&path));
        }
    }
}
