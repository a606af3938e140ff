//! A throwaway certificate authority and a server certificate, made with `rcgen` and written
//! as PEM files into a temporary directory: for PostgreSQL with `ssl = on` (see
//! [`super::pg::PgOptions`]) and for the daemon's `verify-ca` / `verify-full` handling.
//!
//! Keys are ECDSA P-256 (fast to generate; accepted by PostgreSQL, libpq and rustls). The CA
//! certificate is a CA (basicConstraints CA:TRUE, keyCertSign and cRLSign). The server
//! certificate has CN=localhost and SAN `DNS:localhost, IP:127.0.0.1`, so `verify-full` works
//! for both host names; it is no CA, is for serverAuth, and names its issuer's key.
//! `other_ca_cert` is an unrelated CA that signed nothing here: a client trusting only it must
//! reject the server.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub struct TestCa {
    /// Holds the files below; removed on drop.
    _dir: tempfile::TempDir,
    /// PEM of the CA that signed `server_cert`.
    pub ca_cert: PathBuf,
    /// PEM server certificate (CN=localhost; SAN DNS:localhost, IP:127.0.0.1).
    pub server_cert: PathBuf,
    /// PEM (PKCS#8) private key of `server_cert`.
    pub server_key: PathBuf,
    /// PEM of a second, unrelated CA (negative tests).
    pub other_ca_cert: PathBuf,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A CA's certificate parameters, with the common name `cn`.
fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The server certificate's parameters (see the module doc).
fn server_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().expect("a DNS name")),
        SanType::IpAddress([127, 0, 0, 1].into()),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params
}

fn key_pair() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key pair")
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("mapsync-test-ca-")
            .tempdir()
            .expect("temp dir for the test CA");
        let d = dir.path();
        let (ca_key, other_key, server_key) = (key_pair(), key_pair(), key_pair());
        let ca = ca_params("mapsync test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
        let other_ca_cert = ca_params("mapsync unrelated test CA")
            .self_signed(&other_key)
            .expect("the unrelated CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let server_cert = server_params()
            .signed_by(&server_key, &issuer)
            .expect("the server certificate");
        TestCa {
            ca_cert: write(d, "ca.crt", &ca_cert.pem()),
            server_cert: write(d, "server.crt", &server_cert.pem()),
            server_key: write(d, "server.key", &server_key.serialize_pem()),
            other_ca_cert: write(d, "other_ca.crt", &other_ca_cert.pem()),
            _dir: dir,
        }
    }
}
