//! A throwaway certificate authority and a server certificate, made with the `openssl` CLI in a
//! temporary directory: for PostgreSQL with `ssl = on` (see [`super::pg::PgOptions`]) and for
//! the daemon's `verify-ca` / `verify-full` handling.
//!
//! Keys are ECDSA P-256 (fast to generate; accepted by PostgreSQL, libpq and rustls). The server
//! certificate has CN=localhost and SAN `DNS:localhost, IP:127.0.0.1`, so `verify-full` works
//! for both host names. `other_ca_cert` is an unrelated CA that signed nothing here: a client
//! trusting only it must reject the server.

use std::path::{Path, PathBuf};
use std::process::Command;

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

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("openssl not runnable ({e}): install it with `apt-get install -y openssl`")
        });
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req -x509` for a self-signed CA certificate.
fn make_ca(dir: &Path, stem: &str, cn: &str) {
    let key = format!("{stem}.key");
    let crt = format!("{stem}.crt");
    let subj = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "3650",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("mapsync-test-ca-")
            .tempdir()
            .expect("temp dir for the test CA");
        let d = dir.path();
        make_ca(d, "ca", "mapsync test CA");
        make_ca(d, "other_ca", "mapsync unrelated test CA");
        openssl(
            d,
            &[
                "req",
                "-new",
                "-nodes",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            d.join("server.ext"),
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid\n",
        )
        .expect("write server.ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "825",
                "-extfile",
                "server.ext",
            ],
        );
        TestCa {
            ca_cert: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            other_ca_cert: d.join("other_ca.crt"),
            _dir: dir,
        }
    }
}
