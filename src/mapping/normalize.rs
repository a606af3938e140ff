//! Turning the application's stored values into a mapping's fields (SPEC §1): trimming, the
//! `tenant` alias, candidate lists, metadata in its two forms, `is_active`, timestamps, and
//! the values Postgres cannot hold (U+0000, numbers beyond `numeric`, years outside 1–9999).
//! Also the reverse reading of the exported form ([`Mapping::from_export`]).
//!
//! Every function is pure and lenient: a bad value gives a default and a [`Warning`], never an
//! error, so that no single row can stop a read.

use std::borrow::Cow;
use std::cmp::Ordering;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;

use super::{Fields, MAX_MIRRORED_ID, Mapping, Origin, Redactor, canonical_json};

/// A non-fatal problem with one stored value; the reader logs it once per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    InvalidCandidates(String),
    InvalidMetadata(String),
    InvalidTimestamp(String),
    /// A timestamp outside years 1–9999.
    TimestampOutOfRange(String),
    /// U+0000 characters were removed from these fields (Postgres text cannot hold them).
    NulRemoved(Vec<&'static str>),
    /// A metadata number Postgres's `numeric` cannot hold (its text, cut short).
    NumberOutOfRange(String),
    /// The id is longer than the mirror's index takes: the mapping is not mirrored.
    IdTooLong(usize),
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::InvalidCandidates(why) => write!(f, "candidates_json {why}; using []"),
            Warning::InvalidMetadata(why) => write!(f, "metadata_json {why}; using {{}}"),
            Warning::InvalidTimestamp(v) => {
                write!(f, "updated_at `{v}` is not a timestamp; using null")
            }
            Warning::TimestampOutOfRange(v) => {
                write!(f, "updated_at `{v}` is outside years 1-9999; using null")
            }
            Warning::NulRemoved(fields) => write!(
                f,
                "{} held U+0000 characters, which Postgres cannot store; they were removed",
                fields.join(", ")
            ),
            Warning::NumberOutOfRange(n) => write!(
                f,
                "metadata_json holds the number {n}, which Postgres cannot store as a number; the mirror holds its text as a string"
            ),
            Warning::IdTooLong(len) => write!(
                f,
                "the id is {len} bytes, longer than the mirror's index takes ({MAX_MIRRORED_ID}); the mapping is kept in snapshots but not mirrored: shorten its scope_key in the application"
            ),
        }
    }
}

/// PostgreSQL text cannot hold NUL; SQLite can. Drop it so one odd row cannot fail a whole run.
pub fn clean(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', ""))
    } else {
        Cow::Borrowed(s)
    }
}

/// Trimmed scope type, with the legacy `tenant` read as `mapping`.
pub fn normalize_scope_type(raw: &str) -> Cow<'_, str> {
    match raw.trim() {
        "tenant" => Cow::Borrowed("mapping"),
        other => clean(other),
    }
}

/// Trimmed text; empty becomes `None` (used for `default_model`).
pub fn non_empty(raw: Option<&str>) -> Option<Cow<'_, str>> {
    raw.map(str::trim).filter(|s| !s.is_empty()).map(clean)
}

/// Candidates from stored JSON text: an array whose strings are trimmed, numbers taken as their
/// JSON text, other elements dropped, empties dropped, duplicates removed keeping the first.
/// NULL, empty or invalid input gives `[]` with a warning. Strings borrow from `raw` when
/// they hold no escapes (this runs once per row: 100,000 times a read).
pub fn parse_candidates(raw: Option<&str>) -> (Vec<Cow<'_, str>>, Option<Warning>) {
    let text = raw.map(str::trim).unwrap_or("");
    if text.is_empty() {
        let why = if raw.is_none() { "is NULL" } else { "is empty" };
        return (Vec::new(), Some(Warning::InvalidCandidates(why.into())));
    }
    match serde_json::from_str::<Vec<Item<'_>>>(text) {
        Ok(items) => (
            unique_names(items.into_iter().filter_map(|i| match i {
                Item::Name(s) => Some(s),
                Item::Other => None,
            })),
            None,
        ),
        Err(e) if e.is_data() => (
            Vec::new(),
            Some(Warning::InvalidCandidates("is not a JSON array".into())),
        ),
        Err(e) => (
            Vec::new(),
            Some(Warning::InvalidCandidates(format!(
                "is not valid JSON ({e})"
            ))),
        ),
    }
}

/// The candidate rules applied to an already-parsed value (prompt mappings hold the array
/// itself). Anything but an array gives `[]`.
pub fn candidates_from_value(v: &Value) -> Vec<Cow<'_, str>> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    unique_names(items.iter().filter_map(|item| match item {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        _ => None,
    }))
}

/// Trims, drops empties and NULs, and removes duplicates keeping the first. Lists are short
/// (a handful of models), so a linear scan beats hashing.
fn unique_names<'a>(names: impl Iterator<Item = Cow<'a, str>>) -> Vec<Cow<'a, str>> {
    let mut out: Vec<Cow<'a, str>> = Vec::new();
    for name in names {
        let name = match name {
            Cow::Borrowed(s) => clean(s.trim()),
            Cow::Owned(s) => Cow::Owned(clean(s.trim()).into_owned()),
        };
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// One element of a stored candidates array, read without building a `Value`.
enum Item<'a> {
    Name(Cow<'a, str>),
    Other,
}

/// The key under which serde_json (with `arbitrary_precision`) hands over a number that is
/// not a plain 64-bit integer: as a one-entry map holding its exact text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

impl<'de> serde::Deserialize<'de> for Item<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a model name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Item<'de>, E> {
                Ok(Item::Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Item<'de>, E> {
                Ok(Item::Name(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Item<'de>, E> {
                Ok(Item::Name(Cow::Owned(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Item<'de>, E> {
                Ok(Item::Name(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Item<'de>, E> {
                Ok(Item::Name(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Item<'de>, E> {
                Ok(Item::Name(Cow::Owned(
                    serde_json::Number::from_f64(v).map_or_else(String::new, |n| n.to_string()),
                )))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Item<'de>, E> {
                Ok(Item::Other)
            }
            fn visit_unit<E>(self) -> Result<Item<'de>, E> {
                Ok(Item::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Item<'de>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Item::Other)
            }
            /// An object, or a number given as its exact text (see [`NUMBER_TOKEN`]).
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Item<'de>, A::Error> {
                let mut item = Item::Other;
                if let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == NUMBER_TOKEN {
                        item = Item::Name(Cow::Owned(map.next_value::<String>()?));
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(item)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A mapping's metadata in the two forms it is kept in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Canonical JSON of the whole object (snapshots and exports keep every key).
    pub whole: String,
    /// Canonical JSON of what the mirror holds, when it differs from `whole`: sensitive keys
    /// removed, numbers Postgres cannot hold written as strings.
    pub mirror: Option<String>,
}

impl Metadata {
    /// `{}`.
    pub fn empty() -> Metadata {
        Metadata {
            whole: "{}".into(),
            mirror: None,
        }
    }

    /// Both forms of `v`, an object already free of U+0000.
    pub fn of(v: Value, redactor: &Redactor) -> Metadata {
        Self::of_noting(v, redactor, &mut Vec::new())
    }

    fn of_noting(v: Value, redactor: &Redactor, warnings: &mut Vec<Warning>) -> Metadata {
        let whole = canonical_json(&v);
        let mut out_of_range = Vec::new();
        find_out_of_range(&v, &mut out_of_range);
        let mirror = if redactor.holds_sensitive(&v) || !out_of_range.is_empty() {
            let mut m = v;
            redactor.redact(&mut m);
            numbers_to_strings(&mut m);
            Some(canonical_json(&m))
        } else {
            None
        };
        warnings.extend(out_of_range.into_iter().map(Warning::NumberOutOfRange));
        Metadata { whole, mirror }
    }
}

/// Metadata from stored JSON text: an object in both its forms (see [`Metadata`]); anything
/// else `{}` (with a warning, except for NULL or empty, which simply mean "no metadata").
/// U+0000 inside strings or keys is removed, with a warning.
pub fn parse_metadata(raw: Option<&str>, redactor: &Redactor) -> (Metadata, Vec<Warning>) {
    let text = raw.map(str::trim).unwrap_or("");
    if text.is_empty() || text == "{}" {
        return (Metadata::empty(), Vec::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(mut v @ Value::Object(_)) => {
            let mut warnings = Vec::new();
            if strip_nul(&mut v) {
                warnings.push(Warning::NulRemoved(vec!["metadata_json"]));
            }
            let meta = Metadata::of_noting(v, redactor, &mut warnings);
            (meta, warnings)
        }
        Ok(_) => (
            Metadata::empty(),
            vec![Warning::InvalidMetadata("is not a JSON object".into())],
        ),
        Err(e) => (
            Metadata::empty(),
            vec![Warning::InvalidMetadata(format!("is not valid JSON ({e})"))],
        ),
    }
}

/// Removes U+0000 from every string and key inside `v`; true when there was one.
pub fn strip_nul(v: &mut Value) -> bool {
    match v {
        Value::String(s) if s.contains('\0') => {
            s.retain(|c| c != '\0');
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |hit, i| strip_nul(i) | hit),
        Value::Object(map) => {
            let mut hit = map.values_mut().fold(false, |hit, i| strip_nul(i) | hit);
            if map.keys().any(|k| k.contains('\0')) {
                hit = true;
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (k.replace('\0', ""), v))
                    .collect();
            }
            hit
        }
        _ => false,
    }
}

/// Collects the text of every number in `v` that Postgres's `numeric` cannot hold.
fn find_out_of_range(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Number(n) if numeric_text(&n.to_string()).is_none() => {
            out.push(n.to_string().chars().take(40).collect())
        }
        Value::Array(items) => items.iter().for_each(|i| find_out_of_range(i, out)),
        Value::Object(map) => map.values().for_each(|i| find_out_of_range(i, out)),
        _ => {}
    }
}

/// Replaces every number Postgres cannot hold by a string of its text.
fn numbers_to_strings(v: &mut Value) {
    match v {
        Value::Number(n) if numeric_text(&n.to_string()).is_none() => {
            *v = Value::String(n.to_string())
        }
        Value::Array(items) => items.iter_mut().for_each(numbers_to_strings),
        Value::Object(map) => map.values_mut().for_each(numbers_to_strings),
        _ => {}
    }
}

/// The most digits before the decimal point, and after it, that Postgres's `numeric` holds.
const NUMERIC_MAX_INTEGER_DIGITS: i64 = 131_072;
const NUMERIC_MAX_SCALE: i64 = 16_383;

/// The text PostgreSQL's `numeric` (and so `jsonb`) prints for the JSON number `text`: no
/// exponent, the scale the literal implies (`1.50` stays `1.50`, `1e3` is `1000`, `100e-2`
/// is `1.00`), no negative zero. `None` when `numeric` cannot hold it (more than 131,072
/// digits before the point or 16,383 after it) or `text` is not a JSON number.
pub fn numeric_text(text: &str) -> Option<String> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    // value = digits × 10^-scale
    let scale = (frac.len() as i64).checked_sub(exponent)?;
    let dscale = scale.max(0);
    if dscale > NUMERIC_MAX_SCALE {
        return None;
    }
    let all: String = [int, frac].concat();
    let digits = all.trim_start_matches('0');
    let mut out = String::new();
    if digits.is_empty() {
        out.push('0');
    } else {
        let len = digits.len() as i64;
        if len - scale > NUMERIC_MAX_INTEGER_DIGITS {
            return None;
        }
        if negative {
            out.push('-');
        }
        if scale <= 0 {
            out.push_str(digits);
            out.extend(std::iter::repeat_n('0', (-scale) as usize));
            return Some(out);
        }
        let split = len - scale;
        if split > 0 {
            out.push_str(&digits[..split as usize]);
        } else {
            out.push('0');
        }
        out.push('.');
        out.extend(std::iter::repeat_n('0', (-split).max(0) as usize));
        out.push_str(&digits[split.max(0) as usize..]);
        return Some(out);
    }
    if dscale > 0 {
        out.push('.');
        out.extend(std::iter::repeat_n('0', dscale as usize));
    }
    Some(out)
}

/// `is_active` as stored: anything but zero is true; NULL is false (the application reads a
/// NULL as inactive: `bool(row["is_active"])`).
pub fn parse_active_int(v: Option<i64>) -> bool {
    v.is_some_and(|v| v != 0)
}

/// `is_active` given as JSON (prompt mappings): booleans, numbers and "true"/"1" strings;
/// a missing key is true and null is false, as the application reads them
/// (`bool(m.get("is_active", True))`).
pub fn parse_active_json(v: Option<&Value>) -> bool {
    match v {
        None => true,
        Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_none_or(|f| f != 0.0),
        Some(Value::String(s)) => !matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        ),
        Some(_) => true,
    }
}

/// A timestamp in RFC 3339 / ISO 8601 form (`+00:00`, `Z`, any offset, or naive read as UTC),
/// rounded to microseconds as Postgres rounds (or truncated, when rounding would leave year
/// 9999). NULL or empty gives `None` silently; anything unparseable, or outside years
/// 1–9999, gives `None` with a warning.
pub fn parse_timestamp(raw: Option<&str>) -> (Option<DateTime<Utc>>, Option<Warning>) {
    use chrono::{Datelike, SubsecRound};
    let text = raw.map(str::trim).unwrap_or("");
    if text.is_empty() {
        return (None, None);
    }
    let parsed = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
                .map(|naive| naive.and_utc())
        });
    let Some(t) = parsed.map(without_leap_second) else {
        return (None, Some(Warning::InvalidTimestamp(cut(text))));
    };
    let in_range = |t: &DateTime<Utc>| (1..=9999).contains(&t.year());
    match [round_to_micros(t), t.trunc_subsecs(6)]
        .into_iter()
        .find(in_range)
    {
        Some(t) => (Some(t), None),
        None => (None, Some(Warning::TimestampOutOfRange(cut(text)))),
    }
}

/// A leap second (`:60`, which chrono keeps as a second's nanoseconds over 10⁹) as the next
/// second, which is what Postgres stores: a mapping's timestamp is then a plain count of
/// microseconds, and its snapshot, its mirror row and the application's value compare equal.
fn without_leap_second(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos();
    if nanos < 1_000_000_000 {
        return t;
    }
    DateTime::from_timestamp(t.timestamp() + 1, nanos - 1_000_000_000).unwrap_or(t)
}

/// At most 40 characters of `s`, for a log line.
fn cut(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Postgres keeps microseconds and rounds half to even; do the same so values compare equal.
fn round_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos();
    let rem = nanos % 1_000;
    if rem == 0 {
        return t;
    }
    let down = t - chrono::Duration::nanoseconds(i64::from(rem));
    let up = down + chrono::Duration::microseconds(1);
    match rem.cmp(&500) {
        Ordering::Less => down,
        Ordering::Greater => up,
        Ordering::Equal if (nanos / 1_000) % 2 == 0 => down,
        Ordering::Equal => up,
    }
}

/// Why an entry of an exported file cannot be a mapping: which field is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry is not a JSON object")]
    NotAnObject,
    #[error("scope_type or scope_key is empty")]
    EmptyScope,
    #[error("metadata is not an object")]
    Metadata,
    #[error("candidates is not a list")]
    Candidates,
    #[error("{0}")]
    Timestamp(Warning),
    /// The entry is not JSON at all (a row of the mirror that did not parse).
    #[error("not JSON ({0})")]
    NotJson(String),
}

impl Mapping {
    /// A mapping from its exported (snapshot) form, with the same rules as a SQLite row:
    /// scopes trimmed and `tenant` aliased, the id rebuilt, candidates and metadata cleaned,
    /// secrets redacted. The error says which field is unusable.
    pub fn from_export(v: &Value, redactor: &Redactor) -> Result<Mapping, EntryError> {
        let obj = v.as_object().ok_or(EntryError::NotAnObject)?;
        let text = |k: &str| obj.get(k).and_then(Value::as_str);
        let scope_type = normalize_scope_type(text("scope_type").unwrap_or(""));
        let scope_key = clean(text("scope_key").unwrap_or("").trim());
        if scope_type.is_empty() || scope_key.is_empty() {
            return Err(EntryError::EmptyScope);
        }
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => Metadata::empty(),
            Some(m @ Value::Object(_)) => {
                let mut m = m.clone();
                strip_nul(&mut m);
                Metadata::of(m, redactor)
            }
            Some(_) => return Err(EntryError::Metadata),
        };
        let (updated_at, warning) = parse_timestamp(text("updated_at"));
        if let Some(w) = warning {
            return Err(EntryError::Timestamp(w));
        }
        let candidates = match obj.get("candidates") {
            None | Some(Value::Null) => Vec::new(),
            Some(c @ Value::Array(_)) => candidates_from_value(c),
            Some(_) => return Err(EntryError::Candidates),
        };
        let name = text("name").map(clean);
        let default_model = non_empty(text("default_model"));
        Ok(Mapping::new(Fields {
            scope_type: &scope_type,
            scope_key: &scope_key,
            name: name.as_deref(),
            default_model: default_model.as_deref(),
            candidates: &candidates,
            is_active: parse_active_json(obj.get("is_active")),
            updated_at,
            source: match text("source") {
                Some("prompt") => Origin::Prompt,
                _ => Origin::Sqlite,
            },
            metadata: &metadata.whole,
            mirror_metadata: metadata.mirror.as_deref(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::format_timestamp;
    use serde_json::json;

    #[test]
    fn tenant_is_read_as_mapping_and_scopes_are_trimmed() {
        assert_eq!(normalize_scope_type(" tenant "), "mapping");
        assert_eq!(normalize_scope_type("  user\t"), "user");
        assert_eq!(normalize_scope_type("tenants"), "tenants");
    }

    #[test]
    fn default_model_is_trimmed_and_empty_becomes_null() {
        assert_eq!(non_empty(Some("  gpt-4o  ")), Some("gpt-4o".into()));
        assert_eq!(non_empty(Some("   ")), None);
        assert_eq!(non_empty(None), None);
    }

    #[test]
    fn candidates_are_trimmed_deduplicated_and_filtered() {
        let (c, w) = parse_candidates(Some(
            r#"[" gpt-4o ", "gpt-4o", "", "  ", null, {"a":1}, [1], 42, 1.5, "claude", "gpt-4o "]"#,
        ));
        assert_eq!(c, vec!["gpt-4o", "42", "1.5", "claude"]);
        assert_eq!(w, None);
    }

    #[test]
    fn invalid_candidates_give_an_empty_list_and_a_warning() {
        for raw in [
            None,
            Some(""),
            Some("  "),
            Some("not json"),
            Some(r#"{"a": 1}"#),
            Some(r#""gpt""#),
        ] {
            let (c, w) = parse_candidates(raw);
            assert!(c.is_empty(), "{raw:?}");
            assert!(matches!(w, Some(Warning::InvalidCandidates(_))), "{raw:?}");
        }
    }

    #[test]
    fn unicode_candidates_and_metadata_are_kept() {
        let (c, _) = parse_candidates(Some(r#"["通义千问", "模型-β"]"#));
        assert_eq!(c, vec!["通义千问", "模型-β"]);
        let (m, w) = parse_metadata(Some(r#"{"note": "映射名 11"}"#), &Redactor::default());
        assert_eq!(m.whole, r#"{"note": "映射名 11"}"#);
        assert_eq!(m.mirror, None);
        assert_eq!(w, []);
    }

    #[test]
    fn metadata_must_be_an_object() {
        let r = Redactor::default();
        assert_eq!(parse_metadata(None, &r), (Metadata::empty(), vec![]));
        assert_eq!(parse_metadata(Some(""), &r), (Metadata::empty(), vec![]));
        for bad in ["[1,2]", "{oops"] {
            let (m, w) = parse_metadata(Some(bad), &r);
            assert_eq!(m, Metadata::empty());
            assert!(
                matches!(w[..], [Warning::InvalidMetadata(_)]),
                "{bad}: {w:?}"
            );
        }
    }

    #[test]
    fn metadata_without_secrets_is_kept_once() {
        let (meta, w) = parse_metadata(Some(r#"{"b": 1, "a": [true]}"#), &Redactor::default());
        assert_eq!(meta.whole, r#"{"a": [true], "b": 1}"#);
        assert_eq!(meta.mirror, None, "the mirror's form is the whole one");
        assert_eq!(w, []);
    }

    #[test]
    fn numbers_keep_their_exact_value_in_postgres_numeric_form() {
        // Each pair checked against `SELECT '<n>'::jsonb::text` on PostgreSQL 15.
        for (given, jsonb) in [
            ("1e3", "1000"),
            ("1.5e-3", "0.0015"),
            ("1.50", "1.50"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            ("100e-2", "1.00"),
            ("1E+2", "100"),
            ("12345678901234567890123", "12345678901234567890123"),
            ("0.000", "0.000"),
            ("-1.0e0", "-1.0"),
            ("0e200000", "0"),
            ("-12.5", "-12.5"),
            ("0.37", "0.37"),
        ] {
            assert_eq!(numeric_text(given).as_deref(), Some(jsonb), "{given}");
        }
        assert_eq!(numeric_text("1e131071").map(|t| t.len()), Some(131_072));
        for out_of_range in ["1e131072", "1.5e-16383", "0e-20000", "1e2147483648"] {
            assert_eq!(numeric_text(out_of_range), None, "{out_of_range}");
        }
        let (meta, w) = parse_metadata(
            Some(r#"{"big": 12345678901234567890123, "e": 1e3, "huge": 1e200000}"#),
            &Redactor::default(),
        );
        assert_eq!(
            meta.whole,
            r#"{"e": 1000, "big": 12345678901234567890123, "huge": 1e+200000}"#
        );
        assert_eq!(
            meta.mirror.as_deref(),
            Some(r#"{"e": 1000, "big": 12345678901234567890123, "huge": "1e+200000"}"#)
        );
        assert!(matches!(&w[..], [Warning::NumberOutOfRange(n)] if n == "1e+200000"));
        let (c, _) = parse_candidates(Some("[12345678901234567890123, 1.50]"));
        assert_eq!(c, vec!["12345678901234567890123", "1.50"]);
    }

    #[test]
    fn nul_characters_are_removed_from_metadata_strings_and_keys() {
        let (meta, w) = parse_metadata(
            Some(r#"{"k": "x\u0000y", "a\u0000b": ["\u0000"]}"#),
            &Redactor::default(),
        );
        assert_eq!(meta.whole, r#"{"k": "xy", "ab": [""]}"#);
        assert_eq!(w, [Warning::NulRemoved(vec!["metadata_json"])]);
    }

    #[test]
    fn timestamps_outside_years_1_to_9999_are_null() {
        let (t, w) = parse_timestamp(Some("9999-12-31T23:59:59.9999999+00:00"));
        assert_eq!(
            t.as_ref().map(format_timestamp).as_deref(),
            Some("9999-12-31T23:59:59.999999+00:00"),
            "rounding would leave year 9999: truncated instead"
        );
        assert_eq!(w, None);
        for out in [
            "10000-01-01T00:00:00Z",
            "0000-06-01T00:00:00Z",
            "+12345-01-01T00:00:00Z",
        ] {
            let (t, w) = parse_timestamp(Some(out));
            assert_eq!(t, None, "{out}");
            assert!(w.is_some(), "{out}");
        }
    }

    #[test]
    fn timestamps_accept_offsets_z_and_naive_forms() {
        let want = "2026-01-16T10:17:10+00:00";
        for raw in [
            "2026-01-16T10:17:10+00:00",
            "2026-01-16T10:17:10Z",
            "2026-01-16T12:17:10+02:00",
            "2026-01-16 10:17:10",
            "2026-01-16T10:17:10",
            " 2026-01-16 10:17:10 ",
        ] {
            let (t, w) = parse_timestamp(Some(raw));
            assert_eq!(
                t.as_ref().map(format_timestamp).as_deref(),
                Some(want),
                "{raw}"
            );
            assert_eq!(w, None);
        }
        let (t, _) = parse_timestamp(Some("2026-01-16 10:17:10.123456789"));
        assert_eq!(
            format_timestamp(&t.unwrap()),
            "2026-01-16T10:17:10.123457+00:00"
        );
    }

    #[test]
    fn bad_timestamps_are_null() {
        assert_eq!(parse_timestamp(None), (None, None));
        assert_eq!(parse_timestamp(Some("")), (None, None));
        let (t, w) = parse_timestamp(Some("yesterday"));
        assert_eq!(t, None);
        assert!(matches!(w, Some(Warning::InvalidTimestamp(_))));
    }

    #[test]
    fn is_active_rules() {
        assert!(
            !parse_active_int(None),
            "NULL is inactive, as the application reads it"
        );
        assert!(parse_active_int(Some(1)));
        assert!(parse_active_int(Some(-3)));
        assert!(!parse_active_int(Some(0)));
        assert!(parse_active_json(None), "a missing key is active");
        assert!(!parse_active_json(Some(&Value::Null)), "null is inactive");
        assert!(!parse_active_json(Some(&json!(false))));
        assert!(!parse_active_json(Some(&json!(0))));
        assert!(!parse_active_json(Some(&json!("false"))));
        assert!(parse_active_json(Some(&json!(true))));
    }

    #[test]
    fn nul_characters_are_dropped() {
        assert_eq!(non_empty(Some("gpt\u{0}-4o")), Some("gpt-4o".into()));
        let (c, _) = parse_candidates(Some(r#"["a\u0000b"]"#));
        assert_eq!(c, vec!["ab"]);
    }

    #[test]
    fn sensitive_keys_are_removed_at_any_depth_whatever_their_spelling() {
        let r = Redactor::default();
        let (meta, _) = parse_metadata(
            Some(
                r#"{"apiKey": "x", "API-KEY": "y", "api_key": "z", "max_tokens": 512, "Token": "t",
                   "nested": {"client_secret": "s", "keep": 1, "deeper": [{"refresh-token": "r", "ok": true}]},
                   "private_key_id": "kept: not an exact match"}"#,
            ),
            &r,
        );
        let mirror: Value = serde_json::from_str(meta.mirror.as_deref().unwrap()).unwrap();
        assert_eq!(
            mirror,
            json!({"max_tokens": 512, "nested": {"keep": 1, "deeper": [{"ok": true}]},
                   "private_key_id": "kept: not an exact match"})
        );
        // The whole metadata keeps every key (snapshots and exports are backups).
        let whole: Value = serde_json::from_str(&meta.whole).unwrap();
        assert_eq!(whole["apiKey"], "x");
        assert_eq!(whole["nested"]["deeper"][0]["refresh-token"], "r");
    }
}
