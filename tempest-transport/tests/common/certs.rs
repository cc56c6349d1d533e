//! Certificates for tests, made with rcgen: a cluster CA and deployment
//! certificates as the director issues them (SAN `data.tempest.invalid`,
//! server and client extended key usages).

#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempest_transport::tls::{DataTls, SERVER_NAME};

/// A certificate authority.
pub struct Ca {
    /// Its certificate, PEM.
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    /// The certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `name` with both extended key usages.
    pub fn leaf_for(&self, name: &str) -> Leaf {
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("a valid name");
        params
            .distinguished_name
            .push(DnType::CommonName, "a tempest deployment");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A deployment certificate of this CA, as the director issues it.
    pub fn leaf(&self) -> Leaf {
        self.leaf_for(SERVER_NAME)
    }

    /// A deployment's TLS: a certificate of this CA, trusting this CA.
    pub fn data_tls(&self) -> DataTls {
        self.data_tls_trusting(self)
    }

    /// A certificate of this CA, trusting `trust`.
    pub fn data_tls_trusting(&self, trust: &Ca) -> DataTls {
        let leaf = self.leaf();
        DataTls::from_pem(
            leaf.cert.as_bytes(),
            leaf.key.as_bytes(),
            trust.pem.as_bytes(),
        )
        .expect("a valid TLS configuration")
    }
}
