//! TLS on the data plane (rustls on ring), under the challenge and response
//! of [`crate::auth`].
//!
//! A deployment has one certificate and key, issued by the cluster's CA for
//! the name [`SERVER_NAME`] with both the server and the client extended key
//! usages. Every process of the deployment presents it on both sides of a
//! connection:
//!
//! - an acceptor (the topology server, a worker's peer port) asks for a
//!   client certificate and takes only one that chains to the CA;
//! - a connector checks the acceptor's certificate against the CA for
//!   [`SERVER_NAME`] (not for the address it dialled: deployments move
//!   between hosts) and presents the same certificate.
//!
//! A process reads the three PEM files from the paths in [`CERT_ENV`],
//! [`KEY_ENV`] and [`CA_ENV`] (the agent writes them). TLS 1.2 and 1.3 with
//! rustls' safe defaults; the crypto provider is always given explicitly,
//! never taken from the process.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The environment variable naming the PEM file of the deployment's
/// certificate chain (its certificate first).
pub const CERT_ENV: &str = "TEMPEST_DATA_TLS_CERT";

/// The environment variable naming the PEM file of the certificate's
/// private key.
pub const KEY_ENV: &str = "TEMPEST_DATA_TLS_KEY";

/// The environment variable naming the PEM file of the cluster's CA
/// certificate(s), which every peer's certificate must chain to.
pub const CA_ENV: &str = "TEMPEST_DATA_TLS_CA";

/// The DNS name every deployment certificate carries, and the name a
/// connector checks the acceptor's certificate for.
pub const SERVER_NAME: &str = "data.tempest.invalid";

/// The first byte of a TLS handshake record: what an acceptor with TLS
/// expects first. (A plain frame starting with it would announce a frame of
/// over 350 MiB, beyond any handshake's limit.)
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Why the data plane's TLS could not be set up. Each names the file (or
/// the variable) and what is wrong; none shows a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Some of the three settings were given and not the others.
    #[error(
        "data-plane TLS needs a certificate, its key and the CA: {missing} is not set (but {given} is)"
    )]
    Incomplete {
        /// The first setting missing.
        missing: &'static str,
        /// A setting that was given.
        given: &'static str,
    },
    /// A file could not be read.
    #[error("reading the data-plane TLS {what} from {}: {error}", path.display())]
    File {
        /// Which file: certificate, key or CA.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A file holds no PEM item of the kind it should.
    #[error("the data-plane TLS {what} ({origin}) holds no PEM {kind}")]
    Missing {
        /// Which file.
        what: &'static str,
        /// Its path, or where the bytes came from.
        origin: String,
        /// What was looked for.
        kind: &'static str,
    },
    /// A file's PEM could not be parsed.
    #[error("the data-plane TLS {what} ({origin}) is not valid PEM: {error}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path, or where the bytes came from.
        origin: String,
        /// The parser's complaint.
        error: rustls_pki_types::pem::Error,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error(
        "the data-plane TLS CA ({origin}) holds a certificate that is not a usable CA: {error}"
    )]
    BadCa {
        /// Its path, or where the bytes came from.
        origin: String,
        /// Why.
        error: rustls::Error,
    },
    /// rustls refused the configuration (a key that does not match the
    /// certificate, a key of an unsupported type, no CA).
    #[error("the data-plane TLS certificate ({cert}) and key ({key}) cannot be used: {error}")]
    Config {
        /// The certificate's origin.
        cert: String,
        /// The key's origin.
        key: String,
        /// rustls' reason.
        error: String,
    },
}

/// The data plane's TLS: an acceptor that requires a client certificate of
/// the cluster's CA, and a connector that checks the acceptor against the
/// CA and presents the same certificate. Cheap to clone.
#[derive(Clone)]
pub struct DataTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl fmt::Debug for DataTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataTls(..)")
    }
}

/// One PEM input and where it came from (for errors).
struct Input<'a> {
    bytes: &'a [u8],
    origin: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl DataTls {
    /// From PEM bytes: the certificate chain (the deployment's certificate
    /// first), its private key, and the CA certificate(s).
    pub fn from_pem(
        cert_chain_pem: &[u8],
        key_pem: &[u8],
        ca_pem: &[u8],
    ) -> Result<Self, TlsError> {
        Self::build(
            Input {
                bytes: cert_chain_pem,
                origin: "given in memory".into(),
            },
            Input {
                bytes: key_pem,
                origin: "given in memory".into(),
            },
            Input {
                bytes: ca_pem,
                origin: "given in memory".into(),
            },
        )
    }

    /// From three PEM files.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::File {
                what,
                path: path.to_owned(),
                error,
            })
        };
        let (cert, key, ca) = (cert.as_ref(), key.as_ref(), ca.as_ref());
        let (cert_pem, key_pem, ca_pem) = (
            read("certificate", cert)?,
            read("key", key)?,
            read("CA", ca)?,
        );
        Self::build(
            Input {
                bytes: &cert_pem,
                origin: cert.display().to_string(),
            },
            Input {
                bytes: &key_pem,
                origin: key.display().to_string(),
            },
            Input {
                bytes: &ca_pem,
                origin: ca.display().to_string(),
            },
        )
    }

    /// From the files named by [`CERT_ENV`], [`KEY_ENV`] and [`CA_ENV`]:
    /// `None` when none is set, an error naming the missing one when only
    /// some are. An empty value counts as not set.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// [`DataTls::from_env`] with the variables read through `lookup`.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Option<Self>, TlsError> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        match paths(
            (CERT_ENV, get(CERT_ENV)),
            (KEY_ENV, get(KEY_ENV)),
            (CA_ENV, get(CA_ENV)),
        )? {
            None => Ok(None),
            Some((cert, key, ca)) => Self::from_files(cert, key, ca).map(Some),
        }
    }

    /// From three optional paths named `(name, path)` (for errors): `None`
    /// when none is given, an error naming the first missing one when only
    /// some are.
    pub fn from_paths(
        cert: (&'static str, Option<PathBuf>),
        key: (&'static str, Option<PathBuf>),
        ca: (&'static str, Option<PathBuf>),
    ) -> Result<Option<Self>, TlsError> {
        match paths(cert, key, ca)? {
            None => Ok(None),
            Some((cert, key, ca)) => Self::from_files(cert, key, ca).map(Some),
        }
    }

    fn build(cert: Input<'_>, key: Input<'_>, ca: Input<'_>) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Pem {
                what: "certificate",
                origin: cert.origin.clone(),
                error,
            })?;
        if chain.is_empty() {
            return Err(TlsError::Missing {
                what: "certificate",
                origin: cert.origin,
                kind: "CERTIFICATE",
            });
        }
        let private = PrivateKeyDer::from_pem_slice(key.bytes).map_err(|error| match error {
            rustls_pki_types::pem::Error::NoItemsFound => TlsError::Missing {
                what: "key",
                origin: key.origin.clone(),
                kind: "PRIVATE KEY",
            },
            error => TlsError::Pem {
                what: "key",
                origin: key.origin.clone(),
                error,
            },
        })?;
        let anchors = CertificateDer::pem_slice_iter(ca.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::Pem {
                what: "CA",
                origin: ca.origin.clone(),
                error,
            })?;
        if anchors.is_empty() {
            return Err(TlsError::Missing {
                what: "CA",
                origin: ca.origin,
                kind: "CERTIFICATE",
            });
        }
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor).map_err(|error| TlsError::BadCa {
                origin: ca.origin.clone(),
                error,
            })?;
        }
        let roots = Arc::new(roots);
        let config_error = |error: String| TlsError::Config {
            cert: cert.origin.clone(),
            key: key.origin.clone(),
            error,
        };

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| config_error(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(|e| config_error(e.to_string()))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|e| config_error(e.to_string()))?;
        Ok(DataTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// The acceptor's side: requires a client certificate of the CA.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The connector's side: checks the acceptor for [`SERVER_NAME`] and
    /// presents the deployment's certificate.
    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    /// [`SERVER_NAME`] as rustls takes it.
    pub fn server_name() -> ServerName<'static> {
        ServerName::DnsName(
            rustls_pki_types::DnsName::try_from_str(SERVER_NAME)
                .expect("SERVER_NAME is a valid DNS name")
                .to_owned(),
        )
    }
}

type Named = (&'static str, Option<PathBuf>);

/// All three paths, none, or an error naming the first one missing.
fn paths(
    cert: Named,
    key: Named,
    ca: Named,
) -> Result<Option<(PathBuf, PathBuf, PathBuf)>, TlsError> {
    let given = [&cert, &key, &ca]
        .iter()
        .find(|(_, p)| p.is_some())
        .map(|(n, _)| *n);
    let Some(given) = given else {
        return Ok(None);
    };
    match (cert, key, ca) {
        ((_, Some(c)), (_, Some(k)), (_, Some(a))) => Ok(Some((c, k, a))),
        ((missing, None), _, _) | (_, (missing, None), _) | (_, _, (missing, None)) => {
            Err(TlsError::Incomplete { missing, given })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn nothing_set_is_plain_text() {
        assert!(DataTls::from_lookup(lookup(&[])).unwrap().is_none());
        // Empty values count as not set.
        let empty = [(CERT_ENV, ""), (KEY_ENV, ""), (CA_ENV, "")];
        assert!(DataTls::from_lookup(lookup(&empty)).unwrap().is_none());
    }

    #[test]
    fn a_partial_configuration_names_what_is_missing() {
        let cases: [(&[(&str, &str)], &str); 4] = [
            (&[(CERT_ENV, "/c.pem")], KEY_ENV),
            (&[(CERT_ENV, "/c.pem"), (KEY_ENV, "/k.pem")], CA_ENV),
            (&[(KEY_ENV, "/k.pem"), (CA_ENV, "/ca.pem")], CERT_ENV),
            (&[(CA_ENV, "/ca.pem"), (KEY_ENV, "")], CERT_ENV),
        ];
        for (vars, want) in cases {
            match DataTls::from_lookup(lookup(vars)) {
                Err(e @ TlsError::Incomplete { missing, .. }) => {
                    assert_eq!(missing, want, "{vars:?}");
                    assert!(e.to_string().contains(want), "{e}");
                }
                other => panic!("{vars:?}: expected Incomplete, got {other:?}"),
            }
        }
    }

    #[test]
    fn files_that_cannot_be_read_are_named() {
        let vars = [
            (CERT_ENV, "/nonexistent/tempest/cert.pem"),
            (KEY_ENV, "/nonexistent/tempest/key.pem"),
            (CA_ENV, "/nonexistent/tempest/ca.pem"),
        ];
        let e = DataTls::from_lookup(lookup(&vars)).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::File {
                    what: "certificate",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("/nonexistent/tempest/cert.pem"),
            "{e}"
        );
    }

    #[test]
    fn pem_without_certificates_or_keys_is_refused() {
        let e = DataTls::from_pem(b"", b"", b"").unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Missing {
                    what: "certificate",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = DataTls::from_pem(b"-----BEGIN CERTIFICATE-----\n!!\n", b"", b"").unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Pem {
                    what: "certificate",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn the_server_name_is_a_dns_name() {
        assert!(matches!(DataTls::server_name(), ServerName::DnsName(_)));
    }
}
