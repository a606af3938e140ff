//! Who may call the token routes (SPEC §4): the admin token, or the application's own login
//! token — a JWT — when its claims grant admin rights.
//!
//! Invariants:
//! - The key is chosen by the configuration, never by the token: an HS256 token is checked
//!   only with `http.jwt_secret_file`'s secret, an ES256 token only with a P-256 key of
//!   `http.jwt_jwks_file`, an RS256 token only with an RSA key of it. `alg: none`, and every
//!   other algorithm, is refused; so is an HS256 token signed with a public key.
//! - `exp`, `iat`, `sub`, `iss` and `aud` are required; `aud` must be `http.jwt_audience`,
//!   `iss` must be `http.jwt_issuer` when one is set; clocks may differ by [`LEEWAY_S`].
//! - The admin token is compared in constant time.
//! - No credential is ever logged, echoed or kept past the request: a refusal names only
//!   what was wrong with the token, and a [`Caller`] holds at most the token's `sub`.

use std::fmt;
use std::sync::Arc;

use hyper::header::{AUTHORIZATION, HeaderMap};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::config::{HttpSettings, Secret};

/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY_S: u64 = 30;

/// The public keys of a JWKS document that mapsync can check tokens with.
#[derive(Clone)]
pub struct Jwks(Arc<[JwksKey]>);

struct JwksKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.0
                    .iter()
                    .map(|k| format!("{:?} {}", k.alg, k.kid.as_deref().unwrap_or("(no kid)"))),
            )
            .finish()
    }
}

/// Why a JWKS document cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS document ({0})")]
    NotJwks(serde_json::Error),
    #[error("key {kid}: {source}")]
    BadKey {
        kid: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error(
        "no ES256 (EC P-256) or RS256 (RSA) signing key in it: use the project's JWKS (…/auth/v1/.well-known/jwks.json)"
    )]
    NoUsableKey,
}

impl Jwks {
    /// Reads a JWKS document (`{"keys": [...]}`, or one JWK). Keys of other types (HMAC,
    /// Ed25519, P-384, encryption keys) are left out; a document without a P-256 or RSA
    /// signing key is an error.
    pub fn parse(text: &str) -> Result<Jwks, JwksError> {
        let value: Value = serde_json::from_str(text).map_err(JwksError::NotJwks)?;
        let set: JwkSet = if value.get("keys").is_some() {
            serde_json::from_value(value)
        } else {
            serde_json::from_value(serde_json::json!({ "keys": [value] }))
        }
        .map_err(JwksError::NotJwks)?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => continue,
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            if let Some(declared) = jwk.common.key_algorithm {
                if format!("{declared:?}") != format!("{alg:?}") {
                    continue;
                }
            }
            let kid = jwk.common.key_id.clone();
            let key = DecodingKey::from_jwk(jwk).map_err(|source| JwksError::BadKey {
                kid: kid.clone().unwrap_or_else(|| "without a kid".into()),
                source,
            })?;
            keys.push(JwksKey { kid, alg, key });
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Jwks(keys.into()))
    }

    /// The key for a token signed with `alg` and naming `kid`: the key with that kid, or
    /// the only key when the token names none. The key's own type must match `alg`.
    fn key_for(&self, alg: Algorithm, kid: Option<&str>) -> Option<&DecodingKey> {
        let key = match kid {
            Some(kid) => self.0.iter().find(|k| k.kid.as_deref() == Some(kid))?,
            None if self.0.len() == 1 => &self.0[0],
            None => return None,
        };
        (key.alg == alg).then_some(&key.key)
    }
}

/// Who made a request that was let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    AdminToken,
    /// A login token with admin rights; its `sub`.
    User(String),
    /// No credential is configured: the route is open (to same-origin requests).
    Open,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::AdminToken => f.write_str("admin token"),
            Caller::User(sub) => write!(f, "jwt sub={}", super::reply::quote(sub)),
            Caller::Open => f.write_str("open (no credential configured)"),
        }
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no credential, or one that is not valid; says what was wrong.
    Unauthorized(&'static str),
    /// 403: a valid login token without admin rights; its `sub`.
    Forbidden(String),
}

/// The credentials the token routes accept.
pub struct Auth {
    token: Option<Secret>,
    hs256: Option<DecodingKey>,
    jwks: Option<Jwks>,
    audience: String,
    issuer: Option<String>,
}

impl Auth {
    pub fn new(settings: &HttpSettings) -> Auth {
        Auth {
            token: settings.admin_token.clone(),
            hs256: settings
                .jwt
                .secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            jwks: settings.jwt.jwks.clone(),
            audience: settings.jwt.audience.clone(),
            issuer: settings.jwt.issuer.clone(),
        }
    }

    /// True when no credential is configured.
    pub fn is_open(&self) -> bool {
        self.token.is_none() && self.hs256.is_none() && self.jwks.is_none()
    }

    /// Checks the request's `Authorization: Bearer …`.
    pub fn check(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        if self.is_open() {
            return Ok(Caller::Open);
        }
        // The scheme is case-insensitive (RFC 7235).
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Unauthorized("send Authorization: Bearer <token>"))?;
        if let Some(token) = &self.token {
            if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
                return Ok(Caller::AdminToken);
            }
        }
        if self.hs256.is_none() && self.jwks.is_none() {
            return Err(Refusal::Unauthorized("wrong token"));
        }
        self.check_jwt(given)
    }

    fn check_jwt(&self, token: &str) -> Result<Caller, Refusal> {
        use Refusal::Unauthorized as No;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| No("wrong token (neither the admin token nor a valid login token)"))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref().ok_or(No(
                "HS256 login tokens are not accepted (http.jwt_secret_file is not set)",
            ))?,
            Algorithm::ES256 | Algorithm::RS256 => self
                .jwks
                .as_ref()
                .and_then(|j| j.key_for(header.alg, header.kid.as_deref()))
                .ok_or(No("no key in http.jwt_jwks_file for this login token"))?,
            _ => return Err(No("the login token's algorithm is not accepted")),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_audience(&[&self.audience]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let claims = jsonwebtoken::decode::<Value>(token, key, &validation)
            .map_err(|e| {
                No(match e.kind() {
                    ErrorKind::ExpiredSignature => "the login token has expired",
                    ErrorKind::ImmatureSignature => "the login token is not valid yet",
                    ErrorKind::InvalidAudience => "the login token is for another audience",
                    ErrorKind::InvalidIssuer => "the login token is from another issuer",
                    ErrorKind::MissingRequiredClaim(_) => {
                        "the login token lacks a required claim (exp, iat, sub, iss, aud)"
                    }
                    ErrorKind::InvalidSignature => "the login token's signature is not valid",
                    _ => "the login token is not valid",
                })
            })?
            .claims;
        let iat_ok = claims.get("iat").is_some_and(Value::is_number);
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let (true, Some(sub)) = (iat_ok, sub) else {
            return Err(No(
                "the login token lacks a required claim (exp, iat, sub, iss, aud)",
            ));
        };
        if is_admin(&claims) {
            Ok(Caller::User(sub.to_string()))
        } else {
            Err(Refusal::Forbidden(sub.to_string()))
        }
    }
}

/// The application's admin rules: any of these claims grants the LLM settings.
fn is_admin(claims: &Value) -> bool {
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .map(|s| s.trim().to_ascii_lowercase())
            .unwrap_or_default()
    };
    let app = claims.get("app_metadata");
    let user = claims.get("user_metadata");
    let flag = |m: Option<&Value>| m.and_then(|m| m.get("is_admin")) == Some(&Value::Bool(true));
    matches!(
        text(app.and_then(|a| a.get("dashboard_role"))).as_str(),
        "admin" | "manager"
    ) || flag(user)
        || flag(app)
        || text(app.and_then(|a| a.get("role"))) == "admin"
        || text(claims.get("role")) == "admin"
}

/// Compares two secrets in time that depends only on their lengths, not on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn the_applications_admin_rules() {
        for admin in [
            json!({"app_metadata": {"dashboard_role": "admin"}}),
            json!({"app_metadata": {"dashboard_role": "manager"}}),
            json!({"user_metadata": {"is_admin": true}}),
            json!({"app_metadata": {"is_admin": true}}),
            json!({"app_metadata": {"role": "admin"}}),
            json!({"role": "admin"}),
        ] {
            assert!(is_admin(&admin), "{admin}");
        }
        for user in [
            json!({"role": "authenticated", "app_metadata": {"dashboard_role": "user"}}),
            json!({"user_metadata": {"is_admin": "true"}}),
            json!({"user_metadata": {"is_admin": false}, "app_metadata": {"role": "user"}}),
            json!({}),
        ] {
            assert!(!is_admin(&user), "{user}");
        }
    }

    #[test]
    fn a_jwks_without_a_usable_key_is_refused() {
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
        assert!(Jwks::parse(oct).unwrap_err().to_string().contains("ES256"));
        assert!(Jwks::parse("[").is_err());
    }
}
