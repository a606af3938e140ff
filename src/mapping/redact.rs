//! Redaction of sensitive metadata keys (SPEC §1): what never reaches the Postgres mirror.

use serde_json::Value;

/// The keys removed when `snapshot.redact_keys` is not set.
pub const DEFAULT_REDACT_KEYS: &[&str] = &[
    "api_key",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "password",
    "authorization",
    "private_key",
    "access_key",
];

/// Removes sensitive metadata keys at any depth. A key matches a listed name when both are equal
/// once lower-cased and stripped of `_` and `-`: `api_key` catches `apiKey` and `API-KEY`.
#[derive(Debug, Clone)]
pub struct Redactor {
    folded: Vec<String>,
}

/// A key as the redactor compares it: lower-case, without `_` and `-`.
fn folded(k: &str) -> impl Iterator<Item = char> + '_ {
    k.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
}

impl Redactor {
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Self {
        Redactor {
            folded: keys.iter().map(|k| folded(k.as_ref()).collect()).collect(),
        }
    }

    /// Compares without building the folded key: this runs for every metadata key of every
    /// row.
    pub fn is_sensitive(&self, key: &str) -> bool {
        self.folded.iter().any(|f| folded(key).eq(f.chars()))
    }

    /// Whether any object inside `v` (arrays included) has a sensitive key.
    pub fn holds_sensitive(&self, v: &Value) -> bool {
        match v {
            Value::Object(map) => map
                .iter()
                .any(|(k, child)| self.is_sensitive(k) || self.holds_sensitive(child)),
            Value::Array(items) => items.iter().any(|child| self.holds_sensitive(child)),
            _ => false,
        }
    }

    /// Removes every sensitive key from objects anywhere inside `v` (arrays included).
    pub fn redact(&self, v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.retain(|k, _| !self.is_sensitive(k));
                map.values_mut().for_each(|child| self.redact(child));
            }
            Value::Array(items) => items.iter_mut().for_each(|child| self.redact(child)),
            _ => {}
        }
    }
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new(DEFAULT_REDACT_KEYS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn custom_redact_keys_apply() {
        let r = Redactor::new(&["env"]);
        let mut v = json!({"ENV": "prod", "api_key": "kept when not listed"});
        r.redact(&mut v);
        assert_eq!(v, json!({"api_key": "kept when not listed"}));
    }
}
