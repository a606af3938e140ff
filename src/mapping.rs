//! The [`Mapping`] type and every rule that turns the application's stored values into one
//! (SPEC §1): trimming, the `tenant` alias, candidate lists, timestamps, redaction of secrets,
//! de-duplication by id, the export order, and JSON text in PostgreSQL's `jsonb` form (or, for
//! `mapsync restore`, the application's Python form; see [`KeyOrder`]).
//!
//! Everything here is pure: no I/O, no clock. The SQLite reader feeds raw column values in, and
//! the snapshot writer and the Postgres mirror consume the result. Invariants of a [`Mapping`]:
//! `id == scope_type + ":" + scope_key`, both parts non-empty and trimmed; `candidates` holds
//! unique, trimmed, non-empty names; `metadata` is the canonical text of a JSON object with
//! every sensitive key already removed; `updated_at` has microsecond precision (what Postgres
//! stores), so a value read back from the mirror compares equal.

use crate::fxhash::{FxHashMap, FxHashSet};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};
use serde_json::Value;

/// Where a mapping came from: a row of `llm_model_mappings`, or a prompt's `tools_json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Origin {
    #[default]
    Sqlite,
    Prompt,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Sqlite => "sqlite",
            Origin::Prompt => "prompt",
        }
    }
}

/// One model mapping, normalised. Serialises to the ten-field exported form, in SPEC order,
/// with its whole metadata (see [`Mapping::view`] for the redacted form).
///
/// The daemon holds every mapping in memory (100,000 of them in the benchmark), so a mapping
/// keeps all its text in one allocation: `id`, `name`, `default_model`, the candidates as
/// canonical JSON, the metadata as canonical JSON and, only when it differs, the metadata as
/// the mirror holds it, back to back, with their end offsets. That is about 200 bytes a
/// mapping instead of 600 for one `String` per field. Build one with [`Mapping::new`]; read it
/// through the accessors.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    text: Box<str>,
    /// End offsets in `text` of: id, name, default_model, candidates, metadata, mirror
    /// metadata (empty when the same as the metadata).
    ends: [u32; 6],
    /// Offset of the `:` between scope type and scope key in the id.
    colon: u32,
    has_name: bool,
    has_default_model: bool,
    has_mirror_metadata: bool,
    pub is_active: bool,
    pub source: Origin,
    /// Microsecond precision, as Postgres stores it.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The parts of a [`Mapping`], already normalised by the caller (see the functions below).
#[derive(Debug, Clone, Default)]
pub struct Fields<'a> {
    pub scope_type: &'a str,
    pub scope_key: &'a str,
    pub name: Option<&'a str>,
    pub default_model: Option<&'a str>,
    pub candidates: &'a [Cow<'a, str>],
    pub is_active: bool,
    pub updated_at: Option<DateTime<Utc>>,
    pub source: Origin,
    /// Canonical JSON text of the metadata object, every key kept; see [`canonical_json`].
    pub metadata: &'a str,
    /// The metadata as the mirror holds it (sensitive keys removed, numbers Postgres cannot
    /// hold written as strings), when that differs from `metadata`; see [`Metadata`].
    pub mirror_metadata: Option<&'a str>,
}

impl Mapping {
    pub fn new(f: Fields<'_>) -> Mapping {
        let mut text = String::with_capacity(
            f.scope_type.len()
                + f.scope_key.len()
                + 1
                + f.name.map_or(0, str::len)
                + f.default_model.map_or(0, str::len)
                + f.candidates.iter().map(|c| c.len() + 4).sum::<usize>()
                + 2
                + f.metadata.len()
                + f.mirror_metadata.map_or(0, str::len),
        );
        let mut ends = [0u32; 6];
        let mut mark = |text: &String, i: usize| ends[i] = offset(text.len());
        text.push_str(f.scope_type);
        let colon = offset(text.len());
        text.push(':');
        text.push_str(f.scope_key);
        mark(&text, 0);
        text.push_str(f.name.unwrap_or(""));
        mark(&text, 1);
        text.push_str(f.default_model.unwrap_or(""));
        mark(&text, 2);
        write_candidates(&mut text, f.candidates.iter().map(|c| c.as_ref()));
        mark(&text, 3);
        text.push_str(f.metadata);
        mark(&text, 4);
        text.push_str(f.mirror_metadata.unwrap_or(""));
        mark(&text, 5);
        Mapping {
            text: text.into_boxed_str(),
            ends,
            colon,
            has_name: f.name.is_some(),
            has_default_model: f.default_model.is_some(),
            has_mirror_metadata: f.mirror_metadata.is_some(),
            is_active: f.is_active,
            source: f.source,
            updated_at: f.updated_at,
        }
    }

    /// A 64-bit hash of every field: equal mappings have equal digests. Computed on demand
    /// (only snapshot decisions need it), so reading 100,000 rows does not pay for it.
    pub fn digest(&self) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    /// `"<scope_type>:<scope_key>"`.
    pub fn id(&self) -> &str {
        self.part(0)
    }

    pub fn scope_type(&self) -> &str {
        &self.text[..self.colon as usize]
    }

    pub fn scope_key(&self) -> &str {
        &self.text[self.colon as usize + 1..self.ends[0] as usize]
    }

    pub fn name(&self) -> Option<&str> {
        self.has_name.then(|| self.part(1))
    }

    pub fn default_model(&self) -> Option<&str> {
        self.has_default_model.then(|| self.part(2))
    }

    /// The candidates as canonical JSON text (`["a", "b"]`), the way the mirror's `jsonb`
    /// column prints them.
    pub fn candidates_json(&self) -> &str {
        self.part(3)
    }

    /// The candidate model names.
    pub fn candidates(&self) -> Vec<String> {
        serde_json::from_str(self.candidates_json()).unwrap_or_default()
    }

    /// Canonical JSON text of the whole metadata object (what snapshots and exports keep).
    pub fn metadata_json(&self) -> &str {
        self.part(4)
    }

    /// Canonical JSON text of the metadata as the Postgres mirror holds it: sensitive keys
    /// removed, numbers Postgres cannot hold written as strings (SPEC §1).
    pub fn mirror_metadata_json(&self) -> &str {
        if self.has_mirror_metadata {
            self.part(5)
        } else {
            self.part(4)
        }
    }

    /// The whole metadata as a JSON value.
    pub fn metadata(&self) -> Value {
        json_object(self.metadata_json())
    }

    /// Whether the mirror can hold this mapping: its id must fit in a Postgres index entry
    /// (the primary key and the scope index refuse entries over about 2,700 bytes).
    pub fn mirrorable(&self) -> bool {
        self.id().len() <= MAX_MIRRORED_ID
    }

    /// The exported form, with the whole metadata or (`redacted`) the mirror's.
    pub fn view(&self, redacted: bool) -> View<'_> {
        View {
            mapping: self,
            redacted,
        }
    }

    /// This mapping with `metadata` (an object) in place of its own.
    pub fn with_metadata(&self, metadata: &Value, redactor: &Redactor) -> Mapping {
        let meta = Metadata::of(metadata.clone(), redactor);
        let candidates: Vec<Cow<'_, str>> = self.candidates().into_iter().map(Cow::Owned).collect();
        Mapping::new(Fields {
            scope_type: self.scope_type(),
            scope_key: self.scope_key(),
            name: self.name(),
            default_model: self.default_model(),
            candidates: &candidates,
            is_active: self.is_active,
            updated_at: self.updated_at,
            source: self.source,
            metadata: &meta.whole,
            mirror_metadata: meta.mirror.as_deref(),
        })
    }
}

/// The longest id the mirror takes, in bytes (a Postgres btree entry holds at most 2,704).
pub const MAX_MIRRORED_ID: usize = 2_000;

/// Text this module built as a JSON object.
fn json_object(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::Object(Default::default()))
}

/// A [`Mapping`] serialised in the exported form; see [`Mapping::view`].
pub struct View<'a> {
    mapping: &'a Mapping,
    redacted: bool,
}

/// Offsets fit in u32: one mapping's text is far below 4 GiB (SQLite's own limit is 1 GB).
fn offset(len: usize) -> u32 {
    u32::try_from(len).expect("a mapping's text is under 4 GiB")
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("id", &self.id())
            .field("name", &self.name())
            .field("default_model", &self.default_model())
            .field("candidates", &self.candidates_json())
            .field("is_active", &self.is_active)
            .field("updated_at", &self.updated_at)
            .field("source", &self.source)
            .field("metadata", &self.metadata_json())
            .field("mirror_metadata", &self.mirror_metadata_json())
            .finish()
    }
}

/// Canonical JSON array of strings: `["a", "b"]`.
fn write_candidates<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    out.push('[');
    for (i, c) in items.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_json_string(out, c);
    }
    out.push(']');
}

/// `2026-01-16T10:17:10+00:00`: RFC 3339, UTC written as `+00:00`, fractions (at most
/// microseconds) only when present.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    use chrono::SubsecRound;
    t.trunc_subsecs(6)
        .to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

impl Serialize for Mapping {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.view(false).serialize(serializer)
    }
}

impl Serialize for View<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let m = self.mapping;
        let metadata = if self.redacted {
            m.mirror_metadata_json()
        } else {
            m.metadata_json()
        };
        let mut s = serializer.serialize_struct("Mapping", 10)?;
        s.serialize_field("id", m.id())?;
        s.serialize_field("scope_type", m.scope_type())?;
        s.serialize_field("scope_key", m.scope_key())?;
        s.serialize_field("name", &m.name())?;
        s.serialize_field("default_model", &m.default_model())?;
        s.serialize_field("candidates", &m.candidates())?;
        s.serialize_field("is_active", &m.is_active)?;
        s.serialize_field("updated_at", &m.updated_at.as_ref().map(format_timestamp))?;
        s.serialize_field("source", m.source.as_str())?;
        s.serialize_field("metadata", &json_object(metadata))?;
        s.end()
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation of single values.

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
    let Some(t) = parsed else {
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

/// At most 40 characters of `s`, for a log line.
fn cut(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Postgres keeps microseconds and rounds half to even; do the same so values compare equal.
fn round_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.timestamp_subsec_nanos() % 1_000_000_000;
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

// ---------------------------------------------------------------------------------------------
// Redaction.

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
        Redactor::new(crate::config::DEFAULT_REDACT_KEYS)
    }
}

// ---------------------------------------------------------------------------------------------
// JSON text.

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

// ---------------------------------------------------------------------------------------------
// A whole set of mappings.

/// A mapping together with the id it was stored under, before de-duplication.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// `None` when the row was stored under its normalised id (the common case).
    pub stored_id: Option<Box<str>>,
    pub mapping: Arc<Mapping>,
}

impl Candidate {
    pub fn new(stored_id: &str, mapping: Mapping) -> Candidate {
        Candidate {
            stored_id: (stored_id != mapping.id()).then(|| stored_id.into()),
            mapping: Arc::new(mapping),
        }
    }

    fn stored_id(&self) -> &str {
        self.stored_id.as_deref().unwrap_or(self.mapping.id())
    }
}

/// De-duplicates by normalised id: the later `updated_at` wins; on a tie the row stored under
/// the normalised id, then the smaller stored id, so the outcome never depends on read order.
/// The order of the result is unspecified; see [`sort_for_export`]. Also says whether any id
/// was shared (contested).
///
/// Only a candidate stored under another id (a legacy `tenant:x`, a scope with stray spaces)
/// or a prompt's can share its id with another: the others' ids are their rows' distinct
/// primary keys. So only ids of those few are indexed, which keeps this cheap on every read.
pub fn finalize(candidates: Vec<Candidate>) -> (Vec<Arc<Mapping>>, bool) {
    let special: FxHashSet<&str> = candidates
        .iter()
        .filter(|c| c.stored_id.is_some() || c.mapping.source == Origin::Prompt)
        .map(|c| c.mapping.id())
        .collect();
    let mut winner: FxHashMap<&str, usize> = FxHashMap::default();
    let mut contested = false;
    for (i, c) in candidates.iter().enumerate() {
        let id = c.mapping.id();
        if !special.contains(id) {
            continue;
        }
        winner
            .entry(id)
            .and_modify(|w| {
                contested = true;
                if preference(c, &candidates[*w]) == Ordering::Greater {
                    *w = i;
                }
            })
            .or_insert(i);
    }
    if !contested {
        return (candidates.into_iter().map(|c| c.mapping).collect(), false);
    }
    let winners: FxHashSet<usize> = winner.into_values().collect();
    let losers: Vec<bool> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| special.contains(c.mapping.id()) && !winners.contains(&i))
        .collect();
    drop(special);
    let kept = candidates
        .into_iter()
        .zip(losers)
        .filter(|(_, lost)| !lost)
        .map(|(c, _)| c.mapping)
        .collect();
    (kept, true)
}

/// `Greater` when `a` should win over `b` for the same normalised id.
fn preference(a: &Candidate, b: &Candidate) -> Ordering {
    // `None < Some(_)` for Option, so a missing timestamp loses to any timestamp.
    a.mapping
        .updated_at
        .cmp(&b.mapping.updated_at)
        .then_with(|| a.stored_id.is_none().cmp(&b.stored_id.is_none()))
        .then_with(|| b.stored_id().cmp(a.stored_id()))
}

/// Export order: prompt mappings first, then by `updated_at` descending (missing last), then id.
pub fn sort_for_export(mappings: &mut [Arc<Mapping>]) {
    mappings.sort_by(|a, b| {
        let prompt_first = (a.source != Origin::Prompt).cmp(&(b.source != Origin::Prompt));
        prompt_first
            .then_with(|| match (&a.updated_at, &b.updated_at) {
                (Some(x), Some(y)) => y.cmp(x),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            })
            .then_with(|| a.id().cmp(b.id()))
    });
}

/// A digest of a whole set of mappings, independent of their order: tells whether anything
/// changed since the newest snapshot without comparing 100,000 mappings.
pub fn digest<'a>(mappings: impl IntoIterator<Item = &'a Mapping>) -> u64 {
    mappings
        .into_iter()
        .fold(0u64, |acc, m| acc.wrapping_add(mix(m.digest())))
}

/// SplitMix64's finaliser: spreads each digest over all 64 bits before they are summed.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Mapping {
    /// A mapping from its exported (snapshot) form, with the same rules as a SQLite row:
    /// scopes trimmed and `tenant` aliased, the id rebuilt, candidates and metadata cleaned,
    /// secrets redacted. The error says which field is unusable.
    pub fn from_export(v: &Value, redactor: &Redactor) -> Result<Mapping, String> {
        let obj = v.as_object().ok_or("entry is not a JSON object")?;
        let text = |k: &str| obj.get(k).and_then(Value::as_str);
        let scope_type = normalize_scope_type(text("scope_type").unwrap_or(""));
        let scope_key = clean(text("scope_key").unwrap_or("").trim());
        if scope_type.is_empty() || scope_key.is_empty() {
            return Err("scope_type or scope_key is empty".into());
        }
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => Metadata::empty(),
            Some(m @ Value::Object(_)) => {
                let mut m = m.clone();
                strip_nul(&mut m);
                Metadata::of(m, redactor)
            }
            Some(_) => return Err("metadata is not an object".into()),
        };
        let (updated_at, warning) = parse_timestamp(text("updated_at"));
        if let Some(w) = warning {
            return Err(w.to_string());
        }
        let candidates = match obj.get("candidates") {
            None | Some(Value::Null) => Vec::new(),
            Some(c @ Value::Array(_)) => candidates_from_value(c),
            Some(_) => return Err("candidates is not a list".into()),
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
    use serde_json::json;

    fn mapping(id: &str, updated_at: Option<&str>, source: Origin) -> Mapping {
        let (scope_type, scope_key) = id.split_once(':').unwrap();
        Mapping::new(Fields {
            scope_type,
            scope_key,
            is_active: true,
            updated_at: updated_at.map(|t| parse_timestamp(Some(t)).0.unwrap()),
            source,
            metadata: "{}",
            ..Default::default()
        })
    }

    fn named(m: Mapping, name: &str) -> Mapping {
        Mapping::new(Fields {
            scope_type: m.scope_type(),
            scope_key: m.scope_key(),
            name: Some(name),
            is_active: m.is_active,
            updated_at: m.updated_at,
            source: m.source,
            metadata: m.metadata_json(),
            ..Default::default()
        })
    }

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
    fn custom_redact_keys_apply() {
        let r = Redactor::new(&["env"]);
        let mut v = json!({"ENV": "prod", "api_key": "kept when not listed"});
        r.redact(&mut v);
        assert_eq!(v, json!({"api_key": "kept when not listed"}));
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

    #[test]
    fn nul_characters_are_dropped() {
        assert_eq!(non_empty(Some("gpt\u{0}-4o")), Some("gpt-4o".into()));
        let (c, _) = parse_candidates(Some(r#"["a\u0000b"]"#));
        assert_eq!(c, vec!["ab"]);
    }

    #[test]
    fn later_updated_at_wins_among_duplicate_ids() {
        let older = Candidate::new(
            "mapping:x",
            mapping("mapping:x", Some("2026-01-01T00:00:00Z"), Origin::Sqlite),
        );
        let newer = Candidate::new(
            "tenant:x",
            named(
                mapping("mapping:x", Some("2026-02-01T00:00:00Z"), Origin::Sqlite),
                "from tenant",
            ),
        );
        for order in [
            vec![older.clone(), newer.clone()],
            vec![newer.clone(), older.clone()],
        ] {
            let (out, contested) = finalize(order);
            assert!(contested);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].name(), Some("from tenant"));
        }
    }

    #[test]
    fn on_a_tie_the_row_stored_under_the_normalised_id_wins() {
        let exact = Candidate::new(
            "mapping:x",
            named(
                mapping("mapping:x", Some("2026-01-01T00:00:00Z"), Origin::Sqlite),
                "exact",
            ),
        );
        let alias = Candidate::new(
            "tenant:x",
            mapping("mapping:x", Some("2026-01-01T00:00:00Z"), Origin::Sqlite),
        );
        for order in [
            vec![exact.clone(), alias.clone()],
            vec![alias.clone(), exact.clone()],
        ] {
            assert_eq!(finalize(order).0[0].name(), Some("exact"));
        }
    }

    #[test]
    fn export_order_is_prompts_then_newest_then_id() {
        let (mut out, contested) = finalize(
            [
                mapping("mapping:b", Some("2026-01-02T00:00:00Z"), Origin::Sqlite),
                mapping("mapping:a", Some("2026-01-02T00:00:00Z"), Origin::Sqlite),
                mapping("user:old", Some("2025-01-01T00:00:00Z"), Origin::Sqlite),
                mapping("user:none", None, Origin::Sqlite),
                mapping("prompt:7", Some("2020-01-01T00:00:00Z"), Origin::Prompt),
                mapping(
                    "global:global",
                    Some("2026-03-01T00:00:00Z"),
                    Origin::Sqlite,
                ),
            ]
            .into_iter()
            .map(|m| Candidate {
                stored_id: None,
                mapping: Arc::new(m),
            })
            .collect(),
        );
        assert!(!contested);
        sort_for_export(&mut out);
        let ids: Vec<&str> = out.iter().map(|m| m.id()).collect();
        assert_eq!(
            ids,
            [
                "prompt:7",
                "global:global",
                "mapping:a",
                "mapping:b",
                "user:old",
                "user:none"
            ]
        );
    }

    #[test]
    fn exported_form_has_ten_fields_in_order() {
        let m = Mapping::new(Fields {
            scope_type: "mapping",
            scope_key: "x",
            name: Some("X"),
            candidates: &[Cow::Borrowed("a")],
            is_active: true,
            updated_at: parse_timestamp(Some("2026-01-16T10:17:10Z")).0,
            metadata: r#"{"max_tokens": 5}"#,
            ..Default::default()
        });
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"id":"mapping:x","scope_type":"mapping","scope_key":"x","name":"X","default_model":null,"candidates":["a"],"is_active":true,"updated_at":"2026-01-16T10:17:10+00:00","source":"sqlite","metadata":{"max_tokens":5}}"#
        );
    }

    #[test]
    fn accessors_give_back_every_field() {
        let candidates = [Cow::Borrowed("gpt-4o"), Cow::Borrowed("模型 \"β\"")];
        let m = Mapping::new(Fields {
            scope_type: "premium_user",
            scope_key: "a:b",
            name: Some(""),
            default_model: Some("gpt-4o"),
            candidates: &candidates,
            is_active: false,
            updated_at: None,
            source: Origin::Prompt,
            metadata: r#"{"k": 1}"#,
            mirror_metadata: None,
        });
        assert_eq!(m.id(), "premium_user:a:b");
        assert_eq!(m.scope_type(), "premium_user");
        assert_eq!(m.scope_key(), "a:b");
        assert_eq!(m.name(), Some(""), "an empty name is not a missing one");
        assert_eq!(m.default_model(), Some("gpt-4o"));
        assert_eq!(m.candidates(), ["gpt-4o", "模型 \"β\""]);
        assert_eq!(m.candidates_json(), r#"["gpt-4o", "模型 \"β\""]"#);
        assert_eq!(m.metadata(), json!({"k": 1}));
        let bare = mapping("global:global", None, Origin::Sqlite);
        assert_eq!((bare.name(), bare.default_model()), (None, None));
        assert_eq!(bare.candidates_json(), "[]");
    }

    #[test]
    fn digests_change_with_content_only() {
        let x = mapping("mapping:x", None, Origin::Sqlite);
        let y = mapping("mapping:y", None, Origin::Sqlite);
        assert_eq!(digest([&x, &y]), digest([&y, &x]), "order does not matter");
        assert_eq!(x.digest(), x.clone().digest());
        let renamed = named(x.clone(), "x");
        assert_ne!(digest([&x, &y]), digest([&renamed, &y]));
        assert_ne!(digest([&x, &y]), digest([&x]));
        assert_ne!(digest([&x, &y]), digest([&x, &y, &y]), "a duplicate counts");
    }
}
