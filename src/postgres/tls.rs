//! TLS to Postgres with rustls, honouring libpq's `sslmode` values.
//!
//! tokio-postgres itself only knows `disable`, `prefer` and `require`, and rustls always
//! verifies certificates. libpq's meaning of each mode is restored here with three verifiers:
//!
//! | sslmode | encrypted | certificate chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes | only when a root certificate is given (as libpq does) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! Trusted roots: `target.ssl_root_cert` (or `sslrootcert` in the URL) when set, which is how
//! Supabase's own CA is trusted; otherwise the Mozilla roots compiled into the binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// An `sslmode` libpq does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sslmode `{0}` is not one of disable, prefer, require, verify-ca, verify-full")]
pub struct SslModeError(pub String);

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("CA file {path} is not PEM: {reason}")]
    NotPem { path: PathBuf, reason: String },
    #[error("CA file {path} holds a bad certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("CA file {0} holds no certificate")]
    Empty(PathBuf),
    #[error("cannot set up TLS: {0}")]
    Rustls(String),
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode, SslModeError> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "allow" | "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(SslModeError(other.to_string())),
        }
    }

    /// The name libpq gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: it only decides whether TLS is attempted and required;
    /// the verifier below decides what is checked.
    pub fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self {
            SslMode::Disable => T::Disable,
            SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }
}

/// The TLS connector handed to tokio-postgres: rustls's, except that the empty host name
/// tokio-postgres gives for a Unix socket (it asks for a connector even when it will not use
/// one) gets a placeholder instead of an "invalid dns name" error. TLS is never used over a
/// socket: `ConnectSpec::parse` sets `sslmode` to `disable` for one, as libpq does.
#[derive(Clone)]
pub struct Connector(MakeRustlsConnect);

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if hostname.is_empty() {
            "localhost"
        } else {
            hostname
        };
        MakeTlsConnect::<S>::make_tls_connect(&mut self.0, name)
    }
}

/// Builds the connector for `mode`, trusting `root_cert` (a PEM file) when given.
pub fn connector(mode: SslMode, root_cert: Option<&Path>) -> Result<Connector, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match root_cert {
        Some(path) => {
            let path_buf = || path.to_path_buf();
            let mut store = RootCertStore::empty();
            let certs =
                CertificateDer::pem_file_iter(path).map_err(|e| TlsSetupError::Unreadable {
                    path: path_buf(),
                    reason: e.to_string(),
                })?;
            for cert in certs {
                let cert = cert.map_err(|e| TlsSetupError::NotPem {
                    path: path_buf(),
                    reason: e.to_string(),
                })?;
                store.add(cert).map_err(|e| TlsSetupError::BadCertificate {
                    path: path_buf(),
                    reason: e.to_string(),
                })?;
            }
            if store.is_empty() {
                return Err(TlsSetupError::Empty(path_buf()));
            }
            store
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyFull => webpki,
        SslMode::VerifyCa => Arc::new(ChainOnly(webpki)),
        SslMode::Require if root_cert.is_some() => Arc::new(ChainOnly(webpki)),
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            Arc::new(EncryptOnly(provider.clone()))
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Connector(MakeRustlsConnect::new(config)))
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the certificate is not
/// compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` (without a root certificate): encrypt, trust any certificate, as
/// libpq does. The handshake signatures are still checked.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A PEM file holding one self-signed certificate, written into `dir`: a CA file that loads.
#[cfg(test)]
pub(crate) fn test_ca_file(dir: &Path) -> PathBuf {
    let cert = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()])
        .expect("a self-signed certificate");
    let path = dir.join("ca.pem");
    std::fs::write(&path, cert.cert.pem()).expect("write the CA file");
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_values() {
        assert_eq!(SslMode::parse("verify-full"), Ok(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("allow"), Ok(SslMode::Prefer));
        assert!(
            SslMode::parse("verify_full")
                .unwrap_err()
                .to_string()
                .contains("verify-full")
        );
    }

    #[test]
    fn a_missing_ca_file_is_a_clear_error() {
        let e = connector(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn a_pem_certificate_is_trusted_and_anything_else_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(connector(SslMode::VerifyFull, Some(&test_ca_file(dir.path()))).is_ok());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = connector(SslMode::VerifyFull, Some(&junk)).err().unwrap();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
    }
}
