//! Authentication of data-plane connections: a challenge and a response,
//! so the secret itself never crosses the network.
//!
//! A deployment's processes share one **data-plane secret** (the director
//! makes one per deployment; a process reads it from `TEMPEST_DATA_SECRET`).
//! When the accepting side has one, the handshake is:
//!
//! ```text
//! connector                                   acceptor
//!   │── Hello{…, nonce: Nc} ──────────────────────▶│
//!   │◀───────────────────────── Challenge{Na} ─────│
//!   │── Proof{HMAC(secret, "connector" Nc Na H)} ─▶│  checked in constant time
//!   │◀──── Proof{HMAC(secret, "acceptor" Nc Na H)} │  the acceptor proves it too
//!   │◀──────────────────── Welcome / PeerWelcome ──│
//! ```
//!
//! `H` is the postcard encoding of the `Hello`, so a proof is bound to the
//! topology, the role and both nonces: a recorded handshake is worth nothing
//! on another connection (the acceptor's nonce differs), and neither side
//! learns anything it could replay. A connector that has a secret refuses an
//! acceptor that does not challenge it (it is not one of ours); one without a
//! secret cannot answer a challenge. Nonces come from the operating system's
//! random source.

use std::fmt;
use std::io::Read;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A random per-connection number.
pub type Nonce = [u8; 16];

/// A proof: HMAC-SHA256.
pub type Mac32 = [u8; 32];

/// The environment variable a topology process reads its data-plane secret
/// from.
pub const SECRET_ENV: &str = "TEMPEST_DATA_SECRET";

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;

/// A data-plane secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Shorter than [`MIN_SECRET`].
    #[error("a data-plane secret must be at least {MIN_SECRET} bytes, not {0}")]
    TooShort(usize),
    /// A file could not be read.
    #[error("reading the data-plane secret from {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
}

impl Secret {
    /// A secret of these bytes (surrounding whitespace trimmed, as a file
    /// or an environment variable may carry a newline).
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Secret, SecretError> {
        let b = bytes.as_ref().trim_ascii();
        if b.len() < MIN_SECRET {
            return Err(SecretError::TooShort(b.len()));
        }
        Ok(Secret(b.to_vec()))
    }

    /// The secret in [`SECRET_ENV`], if set (and not empty).
    pub fn from_env() -> Result<Option<Secret>, SecretError> {
        match std::env::var_os(SECRET_ENV) {
            Some(v) if !v.is_empty() => Secret::new(v.as_encoded_bytes()).map(Some),
            _ => Ok(None),
        }
    }

    /// The secret in the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Secret, SecretError> {
        let text = std::fs::read(path).map_err(|error| SecretError::File {
            path: path.display().to_string(),
            error,
        })?;
        Secret::new(text)
    }

    /// The bytes, for whoever must hand the secret on (an agent to its
    /// processes).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// A fresh nonce from the operating system's random source.
pub fn nonce() -> Nonce {
    let mut n = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut n));
    if filled.is_err() {
        // No /dev/urandom: fall back on the standard library's random keys
        // (not a CSPRNG, but unpredictable enough to make a replay fail).
        n[..8].copy_from_slice(&tempest_core::ledger::random_u64().to_le_bytes());
        n[8..].copy_from_slice(&tempest_core::ledger::random_u64().to_le_bytes());
    }
    n
}

/// Which side a proof is from: each side's proof differs, so one cannot be
/// reflected back as the other.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// The side that connected and said `Hello`.
    Connector,
    /// The side that accepted and challenged.
    Acceptor,
}

/// The proof `side` gives for a handshake: HMAC-SHA256 under `secret` of the
/// side's label, both nonces and the `Hello`'s encoding.
pub fn proof(
    secret: &Secret,
    side: Side,
    connector: &Nonce,
    acceptor: &Nonce,
    hello: &[u8],
) -> Mac32 {
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(match side {
        Side::Connector => b"tempest data plane v2: connector",
        Side::Acceptor => b"tempest data plane v2: acceptor ",
    });
    mac.update(connector);
    mac.update(acceptor);
    mac.update(hello);
    mac.finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify(
    secret: &Secret,
    side: Side,
    connector: &Nonce,
    acceptor: &Nonce,
    hello: &[u8],
    given: &Mac32,
) -> bool {
    crate::link::constant_time_eq(&proof(secret, side, connector, acceptor, hello), given)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_secret_the_side_the_nonces_and_the_hello() {
        let s = Secret::new("0123456789abcdef0123").unwrap();
        let other = Secret::new("0123456789abcdef0124").unwrap();
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        let p = proof(&s, Side::Connector, &a, &b, b"hello");
        assert!(verify(&s, Side::Connector, &a, &b, b"hello", &p));
        assert!(!verify(&other, Side::Connector, &a, &b, b"hello", &p));
        assert!(!verify(&s, Side::Acceptor, &a, &b, b"hello", &p));
        assert!(!verify(&s, Side::Connector, &b, &a, b"hello", &p));
        assert!(!verify(&s, Side::Connector, &a, &b, b"hellO", &p));
        assert!(!p.windows(s.expose().len()).any(|w| w == s.expose()));
    }

    #[test]
    fn secrets_are_long_enough_and_never_printed() {
        assert!(matches!(
            Secret::new("short"),
            Err(SecretError::TooShort(5))
        ));
        let s = Secret::new(" 0123456789abcdefXYZ\n").unwrap();
        assert_eq!(s.expose(), b"0123456789abcdefXYZ");
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
