//! The [`Mapping`] type (SPEC §1): one model mapping, normalised, in the ten-field exported
//! form, kept compactly in memory.
//!
//! The rules that build one live beside it, one concern per file: `normalize` turns the
//! application's stored values into a mapping's fields (trimming, the `tenant` alias,
//! candidates, metadata, timestamps, values Postgres cannot hold); `redact` removes
//! sensitive metadata keys; `json` writes JSON text in PostgreSQL's `jsonb` form or the
//! application's Python form; `set` works on a whole read (de-duplication by id, the export
//! order, a digest of the set).
//!
//! Everything here is pure: no I/O, no clock. The SQLite reader feeds raw column values in, and
//! the snapshot writer and the Postgres mirror consume the result. Invariants of a [`Mapping`]:
//! `id == scope_type + ":" + scope_key`, both parts non-empty and trimmed; `candidates` holds
//! unique, trimmed, non-empty names; `metadata` is the canonical text of a JSON object, free of
//! U+0000, with every key kept, and the mirror's form (sensitive keys removed) beside it when
//! it differs; `updated_at` has microsecond precision (what Postgres stores), so a value read
//! back from the mirror compares equal.

mod json;
mod normalize;
mod redact;
mod set;

pub use json::{KeyOrder, canonical_json, write_json, write_json_string};
pub use normalize::{
    EntryError, Metadata, Warning, candidates_from_value, clean, non_empty, normalize_scope_type,
    numeric_text, parse_active_int, parse_active_json, parse_candidates, parse_metadata,
    parse_timestamp, strip_nul,
};
pub use redact::{DEFAULT_REDACT_KEYS, Redactor};
pub use set::{Candidate, digest, finalize, sort_for_export};

use std::borrow::Cow;
use std::hash::{Hash, Hasher};

use chrono::{DateTime, SecondsFormat, Utc};
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn mapping(id: &str, updated_at: Option<&str>, source: Origin) -> Mapping {
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

    pub(super) fn named(m: Mapping, name: &str) -> Mapping {
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
}
