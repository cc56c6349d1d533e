//! TLS for the cluster's links: its certificate authority, the certificates
//! the authority issues, and the rustls configurations the daemons serve
//! and call with (always on the `ring` provider, never OpenSSL).
//!
//! `tempest cluster init` makes the **cluster CA** and, signed by it, a
//! certificate for the director and one for the agents. Every link checks
//! the other side against the cluster CA:
//!
//! - the director's API and web UI present the director's certificate; the
//!   CLI verifies it with the CA file, and the agents also present their own
//!   (mutual TLS), which the director requires on heartbeats and package
//!   downloads;
//! - an agent's API presents the agents' certificate and accepts only
//!   clients with a certificate of the cluster (the director);
//! - the data plane uses one certificate per deployment, issued by the
//!   director with the CA's key at deploy ([`ClusterCa::issue_data`]) and
//!   handed to that topology's processes only: its name is
//!   [`DATA_SERVER_NAME`], and each process both serves and connects with
//!   it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// The DNS name in every deployment's data-plane certificate: connectors
/// verify acceptors against it (`tempest_transport::tls::SERVER_NAME`).
pub const DATA_SERVER_NAME: &str = "data.tempest.invalid";

/// The environment variable naming a topology process's data-plane
/// certificate file (PEM); the agent sets it.
pub const DATA_TLS_CERT_ENV: &str = "TEMPEST_DATA_TLS_CERT";
/// The environment variable naming its private key file (PEM, mode 0600).
pub const DATA_TLS_KEY_ENV: &str = "TEMPEST_DATA_TLS_KEY";
/// The environment variable naming the cluster CA's certificate file.
pub const DATA_TLS_CA_ENV: &str = "TEMPEST_DATA_TLS_CA";

/// How long the cluster CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a daemon's or a deployment's certificate is valid.
pub const CERT_VALIDITY: Duration = Duration::from_secs(2 * 365 * 86_400);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: {source}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A file's content is not what it should be.
    #[error("{what}: {problem}")]
    Pem {
        /// The file (or value) read.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate could not be made.
    #[error("making a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// The cryptography every Tempest TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(what: &str, problem: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        what: what.to_string(),
        problem: problem.to_string(),
    }
}

/// The certificates in PEM text `pem` (`what` names it in errors).
pub fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(pem_error(what, "holds no certificate (BEGIN CERTIFICATE)"));
    }
    Ok(certs)
}

/// The private key in PEM text `pem`.
pub fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| pem_error(what, format!("holds no private key in PEM ({e})")))
}

/// The trust anchors in PEM text `pem`: the cluster CA.
pub fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem, what)? {
        store
            .add(cert)
            .map_err(|e| pem_error(what, format!("not a usable CA certificate ({e})")))?;
    }
    Ok(store)
}

/// A client configuration that trusts the CA in `ca` and presents no
/// certificate: the CLI calling the director.
pub fn client_verifying(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let roots = roots(&read(ca)?, &ca.display().to_string())?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client configuration that trusts no one: for HTTP clients that only
/// speak plain HTTP (on loopback), so that an `https://` URL fails
/// verification rather than trusting the system's authorities.
pub fn client_trusting_nothing() -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

/// The PEM files of one side of a link: its certificate (chain) and key,
/// and the cluster CA it checks the other side with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM (mode 0600).
    pub key: PathBuf,
    /// The cluster CA's certificate, PEM.
    pub ca: PathBuf,
}

/// Whether a server needs its clients to present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate of the cluster (an agent's
    /// API: only the director calls it).
    Required,
    /// A client may present one, which is then checked (the director: web
    /// browsers and the CLI present none, agents do).
    Optional,
}

/// One side's loaded certificate, key and trust anchors.
#[derive(Clone, Debug)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl TlsFiles {
    /// Reads and checks the three files.
    pub fn load(&self) -> Result<Identity, TlsError> {
        let name = |p: &Path| p.display().to_string();
        Ok(Identity {
            chain: certificates(&read(&self.cert)?, &name(&self.cert))?,
            key: Arc::new(private_key(&read(&self.key)?, &name(&self.key))?),
            roots: Arc::new(roots(&read(&self.ca)?, &name(&self.ca))?),
        })
    }
}

impl Identity {
    /// A server configuration presenting this identity.
    pub fn server_config(&self, auth: ClientAuth) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        let verifier = match auth {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| {
            pem_error(
                "the cluster CA",
                format!("cannot verify clients with it ({e})"),
            )
        })?;
        Ok(rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?)
    }

    /// A client configuration trusting the cluster CA and presenting this
    /// identity (mutual TLS).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        Ok(rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?)
    }
}

/// A private key in PEM. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyPem(String);

impl KeyPem {
    /// The PEM text, for whoever must write it to a private file.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `***`: what an API shows in place of a key.
    pub fn masked() -> KeyPem {
        KeyPem("***".into())
    }
}

impl std::fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyPem(***)")
    }
}

/// A certificate issued by the cluster CA, with its new key, and the CA's
/// certificate to check peers with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: KeyPem,
    /// The cluster CA's certificate, PEM.
    pub ca_pem: String,
}

/// The cluster's certificate authority.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, valid: Duration) {
    let now = SystemTime::now();
    // An hour of slack for clocks that disagree a little.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + valid).into();
}

impl ClusterCa {
    /// A new CA with a new key.
    pub fn generate() -> Result<ClusterCa, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Tempest cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str, what: &str) -> Result<ClusterCa, TlsError> {
        certificates(cert_pem.as_bytes(), what)?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| pem_error(what, format!("the CA key is not a PEM key ({e})")))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| pem_error(what, format!("not a CA certificate for that key ({e})")))?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// The CA from its certificate file and key file.
    pub fn load(cert: &Path, key: &Path) -> Result<ClusterCa, TlsError> {
        let text = |p: &Path| {
            String::from_utf8(read(p)?).map_err(|_| pem_error(&p.display().to_string(), "not text"))
        };
        Self::from_pem(
            &text(cert)?,
            &text(key)?,
            &format!("{} and {}", cert.display(), key.display()),
        )
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's key, PEM: for `tempest cluster init` to write, mode 0600.
    pub fn key_pem(&self) -> KeyPem {
        KeyPem(self.issuer.key().serialize_pem())
    }

    /// A new key and a certificate for it naming `common_name`, valid for
    /// the DNS names and IP addresses in `names`, as a server and as a
    /// client.
    pub fn issue(&self, common_name: &str, names: &[String]) -> Result<IssuedCert, TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, CERT_VALIDITY);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: KeyPem(key.serialize_pem()),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// The data-plane certificate of deployment `topology`: named
    /// [`DATA_SERVER_NAME`].
    pub fn issue_data(&self, topology: &str) -> Result<IssuedCert, TlsError> {
        self.issue(
            &format!("{topology} (data plane)"),
            &[DATA_SERVER_NAME.to_string()],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            rustls_pki_types::ServerName::try_from(name.to_string()).unwrap(),
        )?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    fn identity(cert: &IssuedCert) -> Identity {
        Identity {
            chain: certificates(cert.cert_pem.as_bytes(), "cert").unwrap(),
            key: Arc::new(private_key(cert.key_pem.expose().as_bytes(), "key").unwrap()),
            roots: Arc::new(roots(cert.ca_pem.as_bytes(), "ca").unwrap()),
        }
    }

    #[test]
    fn the_cluster_ca_issues_certificates_that_verify_each_other_and_not_strangers() {
        let ca = ClusterCa::generate().unwrap();
        // A CA written and read back issues certificates the first trusts.
        let again = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem().expose(), "ca").unwrap();
        let director = identity(&ca.issue("director", &["localhost".into()]).unwrap());
        let agent = identity(&again.issue("agent", &["node1".into()]).unwrap());
        handshake(
            agent.server_config(ClientAuth::Required).unwrap(),
            director.client_config().unwrap(),
            "node1",
        )
        .unwrap();
        // Another cluster's certificate is refused either way round.
        let stranger = identity(
            &ClusterCa::generate()
                .unwrap()
                .issue("x", &["node1".into()])
                .unwrap(),
        );
        assert!(handshake(
            agent.server_config(ClientAuth::Required).unwrap(),
            stranger.client_config().unwrap(),
            "node1",
        )
        .is_err());
        assert!(handshake(
            stranger.server_config(ClientAuth::Required).unwrap(),
            director.client_config().unwrap(),
            "node1",
        )
        .is_err());
        // A name the certificate does not hold is refused.
        assert!(handshake(
            agent.server_config(ClientAuth::Required).unwrap(),
            director.client_config().unwrap(),
            "node2",
        )
        .is_err());
        // Optional client auth lets a client without a certificate in.
        let anonymous = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(director.roots.clone())
            .with_no_client_auth();
        handshake(
            director.server_config(ClientAuth::Optional).unwrap(),
            anonymous.clone(),
            "localhost",
        )
        .unwrap();
        assert!(handshake(
            director.server_config(ClientAuth::Required).unwrap(),
            anonymous,
            "localhost",
        )
        .is_err());
        // The data-plane certificate is named for the data plane.
        let data = identity(&ca.issue_data("wordcount").unwrap());
        handshake(
            data.server_config(ClientAuth::Required).unwrap(),
            data.client_config().unwrap(),
            DATA_SERVER_NAME,
        )
        .unwrap();
    }

    #[test]
    fn keys_are_never_shown_and_bad_pem_is_named() {
        let ca = ClusterCa::generate().unwrap();
        let cert = ca.issue("d", &["localhost".into()]).unwrap();
        assert!(!format!("{cert:?}").contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
        let e = certificates(b"hello", "ca.crt").unwrap_err().to_string();
        assert!(e.starts_with("ca.crt:"), "{e}");
        let e = private_key(cert.cert_pem.as_bytes(), "d.key")
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.key") && e.contains("private key"), "{e}");
        let e = ClusterCa::from_pem(&cert.cert_pem, "nope", "ca")
            .unwrap_err()
            .to_string();
        assert!(e.contains("CA key"), "{e}");
    }
}
