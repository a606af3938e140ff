//! JSON text, written by hand on purpose: serde_json's writer cannot order object keys the way
//! PostgreSQL's `jsonb` prints them (by length, then bytes) or print numbers as `numeric` does,
//! and the mirror is compared with this text byte for byte (a row whose canonical text equals
//! the mirror's `jsonb::text` is not rewritten). The application's Python form (`json.dumps`,
//! `ensure_ascii=False`), which `mapsync restore` writes back, shares everything but the key
//! order ([`KeyOrder`]).

use std::fmt::Write as _;

use serde_json::Value;

use super::numeric_text;

/// The order [`write_json`] gives an object's keys. Both orders share everything else: `", "`
/// and `": "` separators, non-ASCII kept as it is, and only `"`, `\` and control characters
/// escaped (see [`write_json_string`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrder {
    /// By length, then bytes: what PostgreSQL's `jsonb` prints (`'{"b": 1, "aa": 2}'::jsonb`
    /// is `{"b": 1, "aa": 2}`). The mirror is compared byte for byte against this form, and
    /// content hashes are taken over it.
    Canonical,
    /// The map's own order (serde_json's `preserve_order`: the order the text was parsed or the
    /// keys inserted in): what the application's Python writes with
    /// `json.dumps(v, ensure_ascii=False)`.
    AsGiven,
}

/// [`write_json`] with [`KeyOrder::Canonical`]: the text PostgreSQL's `jsonb` prints for `v`.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v, KeyOrder::Canonical);
    out
}

/// Appends the JSON text of `v` to `out`, object keys in `keys` order, at every depth.
pub fn write_json(out: &mut String, v: &Value, keys: KeyOrder) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // serde_json keeps a number's exact text (`arbitrary_precision`); jsonb prints it as
        // `numeric` does.
        Value::Number(n) => {
            let text = n.to_string();
            match keys {
                KeyOrder::Canonical => {
                    out.push_str(numeric_text(&text).as_deref().unwrap_or(&text))
                }
                KeyOrder::AsGiven => out.push_str(&text),
            }
        }
        Value::String(s) => write_json_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(out, item, keys);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut fields: Vec<(&String, &Value)> = map.iter().collect();
            if keys == KeyOrder::Canonical {
                fields.sort_by(|(a, _), (b, _)| {
                    a.len()
                        .cmp(&b.len())
                        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
                });
            }
            out.push('{');
            for (i, (k, item)) in fields.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json_string(out, k);
                out.push_str(": ");
                write_json(out, item, keys);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal with PostgreSQL's escaping (which matches serde_json's).
pub fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_matches_postgres_jsonb_output() {
        // Outputs checked against `SELECT '<input>'::jsonb::text` on PostgreSQL 15.
        let v: Value = serde_json::from_str(
            r#"{"temperature": 0.37, "b": [1, "x\"y", null], "aa": {"z": true, "y": "\u0001\n"}, "a": "é"}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a": "é", "b": [1, "x\"y", null], "aa": {"y": "\u0001\n", "z": true}, "temperature": 0.37}"#
        );
        assert_eq!(canonical_json(&json!({})), "{}");
        assert_eq!(canonical_json(&json!([])), "[]");
    }

    #[test]
    fn as_given_keeps_each_objects_own_key_order_like_python_json_dumps() {
        // Python 3's `json.dumps(json.loads(text), ensure_ascii=False)` gives back `text`.
        let text = r#"{"zeta": 1, "b": [1, 2.5, null, true, {"y": {}, "x": []}], "a": "映射 \"x\"\n\u0001", "aa": {}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let mut out = String::new();
        write_json(&mut out, &v, KeyOrder::AsGiven);
        assert_eq!(out, text);
        assert_eq!(
            canonical_json(&v),
            r#"{"a": "映射 \"x\"\n\u0001", "b": [1, 2.5, null, true, {"x": [], "y": {}}], "aa": {}, "zeta": 1}"#
        );
    }
}
