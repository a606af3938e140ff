//! Login tokens like the application's, minted by the test: an HS256 secret, and an ES256
//! key pair generated with `openssl` whose public half is written as a JWKS document.
//! Claims follow the application's (NOTES: `iss`, `sub`, `aud` = "authenticated", `exp`,
//! `iat`, `role`, `user_metadata`, `app_metadata`).

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::sys::which;

pub const ISSUER: &str = "https://project-ref.supabase.co/auth/v1";
pub const AUDIENCE: &str = "authenticated";
pub const KID: &str = "test-es256-key";
pub const RSA_KID: &str = "test-rs256-key";
const NO_OPENSSL: &str = "openssl not found: install it with `apt-get install -y openssl`";

/// Test keys, written under `dir`: `jwt-secret` (HS256) and `jwks.json` (the ES256 public
/// key).
pub struct Keys {
    pub secret: String,
    pub secret_file: PathBuf,
    pub jwks_file: PathBuf,
    /// PKCS#8 DER of the ES256 private key.
    es_private: Vec<u8>,
    /// The public key as PEM text and as DER (what a confused verifier would take as an
    /// HMAC secret).
    pub public_pem: String,
    pub public_der: Vec<u8>,
    pub jwk: Value,
    /// A JWKS document with the ES256 key and an RS256 key, and the RS256 private key
    /// (PKCS#1 DER).
    pub both_jwks_file: PathBuf,
    rs_private: Vec<u8>,
}

fn openssl(args: &[&str], dir: &Path) -> Vec<u8> {
    let bin = which("openssl").unwrap_or_else(|| panic!("{NO_OPENSSL}"));
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e}. {NO_OPENSSL}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl Keys {
    /// A fresh secret and P-256 key pair in `dir`.
    pub fn generate(dir: &Path) -> Keys {
        let secret = format!("jwt-secret-{}", super::sys::random_hex(16));
        let secret_file = dir.join("jwt-secret");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "es256.pem",
            ],
            dir,
        );
        let es_private = openssl(
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "es256.pem",
                "-outform",
                "DER",
            ],
            dir,
        );
        let public_der = openssl(
            &["pkey", "-in", "es256.pem", "-pubout", "-outform", "DER"],
            dir,
        );
        let public_pem = String::from_utf8(openssl(&["pkey", "-in", "es256.pem", "-pubout"], dir))
            .expect("PEM is text");
        // SubjectPublicKeyInfo for P-256 ends with the uncompressed point 04 || x || y.
        let point = &public_der[public_der.len() - 65..];
        assert_eq!(point[0], 4, "an uncompressed P-256 point");
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KID,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..]),
        });
        let jwks_file = dir.join("jwks.json");
        std::fs::write(&jwks_file, json!({ "keys": [jwk] }).to_string()).unwrap();
        openssl(&["genrsa", "-out", "rs256.pem", "2048"], dir);
        let rs_private = openssl(
            &["rsa", "-in", "rs256.pem", "-traditional", "-outform", "DER"],
            dir,
        );
        let modulus = String::from_utf8(openssl(
            &["rsa", "-in", "rs256.pem", "-noout", "-modulus"],
            dir,
        ))
        .expect("text");
        let hex = modulus
            .trim()
            .strip_prefix("Modulus=")
            .expect("Modulus=<hex>");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        // openssl genrsa uses the exponent 65537.
        let rsa_jwk = json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": RSA_KID,
                             "n": B64.encode(&n), "e": "AQAB"});
        let both_jwks_file = dir.join("jwks-both.json");
        std::fs::write(
            &both_jwks_file,
            json!({ "keys": [jwk, rsa_jwk] }).to_string(),
        )
        .unwrap();
        Keys {
            secret,
            secret_file,
            jwks_file,
            es_private,
            public_pem,
            public_der,
            jwk,
            both_jwks_file,
            rs_private,
        }
    }

    /// HS256 with the test secret.
    pub fn hs256(&self, claims: &Value) -> String {
        hs256_with(self.secret.as_bytes(), claims)
    }

    /// ES256 with the test key, naming its kid (or none).
    pub fn es256(&self, claims: &Value, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.es_private))
            .expect("an ES256 token")
    }
}

impl Keys {
    /// RS256 with the test RSA key, naming `kid`.
    pub fn rs256(&self, claims: &Value, kid: &str) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_rsa_der(&self.rs_private),
        )
        .expect("an RS256 token")
    }
}

/// HS256 with any secret (a wrong one, or a public key taken as one).
pub fn hs256_with(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("an HS256 token")
}

/// An unsigned token: `{"alg":"none"}`.
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(claims.to_string())
    )
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A user's claims, valid for an hour, with `extra` merged in at the top level (`null`
/// removes a claim).
pub fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({
        "iss": ISSUER, "sub": sub, "aud": AUDIENCE, "exp": now() + 3600, "iat": now(),
        "role": "authenticated", "email": format!("{sub}@example.com"),
        "user_metadata": {"username": sub, "is_admin": false},
        "app_metadata": {"dashboard_local": true, "dashboard_role": "user"},
    });
    let obj = c.as_object_mut().unwrap();
    for (k, v) in extra.as_object().expect("an object").iter() {
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    c
}

/// The application's admin (dashboard_role admin).
pub fn admin(sub: &str) -> Value {
    claims(
        sub,
        json!({"user_metadata": {"username": sub, "is_admin": true},
               "app_metadata": {"dashboard_local": true, "dashboard_role": "admin"}}),
    )
}

/// Seconds from now, for `exp`/`iat`.
pub fn at(offset: i64) -> Value {
    Value::from(now() + offset)
}
