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
pub use set::{Candidate, SetDigest, digest, finalize, sort_for_export};

use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use foldhash::HashSet as FxHashSet;

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
/// The daemon holds every mapping in memory (100,000 of them in the benchmark, a million in
/// the scaling runs), so a mapping is kept compact: 40 bytes behind its `Arc` (one 64-byte
/// heap chunk with the reference counts) and one allocation of text.
/// - `text` holds the flags (active, from a prompt, named), then the id and the name back to
///   back, after two lengths written as ASCII varints (`Head`); no offsets are stored beside
///   it.
/// - The default model with the candidates' canonical JSON (`Models`), and the metadata's
///   canonical JSON (`SharedMetadata`), are shared: mappings built by one reader through an
///   [`Interner`] share one copy of each distinct value (model choices and metadata objects
///   repeat across mappings), and a mapping built alone owns its own.
/// - `updated_at` is kept as microseconds since the epoch, the precision Postgres stores.
///
/// Build one with [`Mapping::new`]; read it through the accessors.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// Flags and lengths, then id and name.
    text: Box<str>,
    models: Arc<Models>,
    metadata: Arc<SharedMetadata>,
    updated_at: Micros,
}

/// A mapping's default model and its candidates as canonical JSON (`["a", "b"]`): the model
/// choice that mappings may share (see [`Interner`]).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Models {
    default_model: Option<Box<str>>,
    candidates: Box<str>,
}

/// A timestamp as microseconds since the Unix epoch; `i64::MIN` for none. Every
/// `DateTime<Utc>` fits (chrono's range is about ±262,000 years; `i64` microseconds reach
/// ±292,000), and a mapping's timestamps have no finer part (SPEC §1) and no leap second
/// ([`parse_timestamp`] makes `:60` the next second, as Postgres does). Ordered as
/// `Option<DateTime<Utc>>` is: none first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Micros(i64);

impl Micros {
    fn of(t: Option<DateTime<Utc>>) -> Micros {
        Micros(t.map_or(i64::MIN, |t| t.timestamp_micros()))
    }

    fn value(self) -> Option<i64> {
        (self.0 != i64::MIN).then_some(self.0)
    }

    fn get(self) -> Option<DateTime<Utc>> {
        self.value().and_then(DateTime::from_timestamp_micros)
    }
}

/// A metadata object's canonical JSON, whole, and as the mirror holds it when that differs.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SharedMetadata {
    whole: Box<str>,
    mirror: Option<Box<str>>,
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
        let mut candidates =
            String::with_capacity(2 + f.candidates.iter().map(|c| c.len() + 4).sum::<usize>());
        write_candidates(&mut candidates, f.candidates.iter().map(|c| c.as_ref()));
        let name = f.name.unwrap_or("");
        let head = Head {
            flags: Flags {
                active: f.is_active,
                prompt: f.source == Origin::Prompt,
                named: f.name.is_some(),
            },
            scope_type: f.scope_type.len(),
            id: f.scope_type.len() + 1 + f.scope_key.len(),
        };
        let mut text = String::with_capacity(Head::MAX_LEN + head.id + name.len());
        head.write(&mut text);
        text.push_str(f.scope_type);
        text.push(':');
        text.push_str(f.scope_key);
        text.push_str(name);
        Mapping {
            text: text.into_boxed_str(),
            models: Arc::new(Models {
                default_model: f.default_model.map(Into::into),
                candidates: candidates.into_boxed_str(),
            }),
            metadata: Arc::new(SharedMetadata {
                whole: f.metadata.into(),
                mirror: f.mirror_metadata.map(Into::into),
            }),
            updated_at: Micros::of(f.updated_at),
        }
    }

    /// A 64-bit hash of every field: equal mappings have equal digests. Computed on demand
    /// (only snapshot decisions need it), so reading 100,000 rows does not pay for it.
    pub fn digest(&self) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }

    /// The flags and lengths at the head of `text`, and where the id starts.
    fn layout(&self) -> (Head, usize) {
        Head::read(&self.text)
    }

    /// `"<scope_type>:<scope_key>"`.
    pub fn id(&self) -> &str {
        let (l, at) = self.layout();
        &self.text[at..at + l.id]
    }

    pub fn scope_type(&self) -> &str {
        let (l, at) = self.layout();
        &self.text[at..at + l.scope_type]
    }

    pub fn scope_key(&self) -> &str {
        let (l, at) = self.layout();
        &self.text[at + l.scope_type + 1..at + l.id]
    }

    pub fn name(&self) -> Option<&str> {
        let (l, at) = self.layout();
        l.flags.named.then(|| &self.text[at + l.id..])
    }

    pub fn default_model(&self) -> Option<&str> {
        self.models.default_model.as_deref()
    }

    /// The candidates as canonical JSON text (`["a", "b"]`), the way the mirror's `jsonb`
    /// column prints them.
    pub fn candidates_json(&self) -> &str {
        &self.models.candidates
    }

    pub fn is_active(&self) -> bool {
        Flags::of(&self.text).active
    }

    /// Microsecond precision, as Postgres stores it.
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        self.updated_at.get()
    }

    /// [`Mapping::updated_at`] as microseconds since the Unix epoch, as it is kept.
    pub fn updated_at_micros(&self) -> Option<i64> {
        self.updated_at.value()
    }

    pub fn source(&self) -> Origin {
        if Flags::of(&self.text).prompt {
            Origin::Prompt
        } else {
            Origin::Sqlite
        }
    }

    /// The candidate model names.
    pub fn candidates(&self) -> Vec<String> {
        serde_json::from_str(self.candidates_json()).unwrap_or_default()
    }

    /// Canonical JSON text of the whole metadata object (what snapshots and exports keep).
    pub fn metadata_json(&self) -> &str {
        &self.metadata.whole
    }

    /// Canonical JSON text of the metadata as the Postgres mirror holds it: sensitive keys
    /// removed, numbers Postgres cannot hold written as strings (SPEC §1).
    pub fn mirror_metadata_json(&self) -> &str {
        self.metadata
            .mirror
            .as_deref()
            .unwrap_or(&self.metadata.whole)
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
        Mapping {
            metadata: Arc::new(SharedMetadata {
                whole: meta.whole.into(),
                mirror: meta.mirror.map(Into::into),
            }),
            ..self.clone()
        }
    }
}

/// The head of a mapping's `text`: one byte of [`Flags`], then two lengths (scope type and
/// id; the name is the rest), each an ASCII varint: six bits per byte, low bits first, `0x40`
/// set on every byte but the last. Typical lengths take one byte each, and the text stays
/// valid UTF-8, so no `unsafe` is needed to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    flags: Flags,
    scope_type: usize,
    id: usize,
}

/// A mapping's flags, the first byte of its `text` (ASCII: three low bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flags {
    active: bool,
    prompt: bool,
    /// Whether the name is set (an empty name is not a missing one).
    named: bool,
}

impl Flags {
    fn byte(self) -> u8 {
        u8::from(self.active) | (u8::from(self.prompt) << 1) | (u8::from(self.named) << 2)
    }

    /// The flags at the head of `text`.
    fn of(text: &str) -> Flags {
        let b = text.as_bytes().first().copied().unwrap_or(0);
        Flags {
            active: b & 1 != 0,
            prompt: b & 2 != 0,
            named: b & 4 != 0,
        }
    }
}

impl Head {
    /// One byte of flags, and at most 6 bytes per length (36 bits: a mapping's text is far
    /// below 4 GiB).
    const MAX_LEN: usize = 13;

    fn write(&self, out: &mut String) {
        out.push(char::from(self.flags.byte()));
        for mut n in [self.scope_type, self.id] {
            loop {
                let low = (n & 0x3f) as u8;
                n >>= 6;
                if n == 0 {
                    out.push(char::from(low));
                    break;
                }
                out.push(char::from(low | 0x40));
            }
        }
    }

    /// The head and the offset of the first byte after it.
    fn read(text: &str) -> (Head, usize) {
        let bytes = text.as_bytes();
        let mut at = 1;
        let mut next = || {
            let (mut n, mut shift) = (0usize, 0);
            while let Some(&b) = bytes.get(at) {
                at += 1;
                n |= usize::from(b & 0x3f) << shift;
                if b & 0x40 == 0 {
                    break;
                }
                shift += 6;
            }
            n
        };
        let (scope_type, id) = (next(), next());
        let head = Head {
            flags: Flags::of(text),
            scope_type,
            id,
        };
        (head, at)
    }
}

/// Makes the mappings one reader builds share their model choices and metadata: a mapping
/// passed through [`Interner::intern`] points at the copy the interner already holds for an
/// equal value, so 100,000 mappings drawing on a few thousand model lists hold a few thousand
/// lists. [`Interner::sweep`] forgets the values no mapping uses any more.
#[derive(Debug, Default)]
pub struct Interner {
    models: FxHashSet<Arc<Models>>,
    metadata: FxHashSet<Arc<SharedMetadata>>,
    /// Entries after the last sweep: a sweep is due when they have doubled.
    swept_at: usize,
}

impl Interner {
    /// `m` with its values shared with the mappings interned before it.
    pub fn intern(&mut self, mut m: Mapping) -> Mapping {
        Self::share(&mut self.models, &mut m.models);
        Self::share(&mut self.metadata, &mut m.metadata);
        m
    }

    /// Forgets the values only the interner still holds, when the table has doubled since the
    /// last sweep (or `always`). Costs one pass over the distinct values.
    pub fn sweep(&mut self, always: bool) {
        let len = self.len();
        if !always && len < 2 * self.swept_at.max(1024) {
            return;
        }
        self.models.retain(|t| Arc::strong_count(t) > 1);
        self.metadata.retain(|t| Arc::strong_count(t) > 1);
        self.models.shrink_to_fit();
        self.metadata.shrink_to_fit();
        self.swept_at = self.len();
    }

    /// Distinct values held.
    pub fn len(&self) -> usize {
        self.models.len() + self.metadata.len()
    }

    /// Points `value` at the interned copy of its value, interning it when new.
    fn share<T: Eq + Hash>(set: &mut FxHashSet<Arc<T>>, value: &mut Arc<T>) {
        match set.get(value) {
            Some(held) => *value = held.clone(),
            None => {
                set.insert(value.clone());
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("id", &self.id())
            .field("name", &self.name())
            .field("default_model", &self.default_model())
            .field("candidates", &self.candidates_json())
            .field("is_active", &self.is_active())
            .field("updated_at", &self.updated_at())
            .field("source", &self.source())
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
        s.serialize_field("is_active", &m.is_active())?;
        s.serialize_field("updated_at", &m.updated_at().as_ref().map(format_timestamp))?;
        s.serialize_field("source", m.source().as_str())?;
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
            is_active: m.is_active(),
            updated_at: m.updated_at(),
            source: m.source(),
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
    fn long_parts_are_read_back_whole() {
        for n in [0, 1, 63, 64, 4095, 4096, 300_000] {
            let key = "k".repeat(n.max(1));
            let name = "é".repeat(n);
            let m = Mapping::new(Fields {
                scope_type: "mapping",
                scope_key: &key,
                name: Some(&name),
                default_model: Some("gpt-4o"),
                metadata: "{}",
                ..Default::default()
            });
            assert_eq!(m.id(), format!("mapping:{key}"), "{n}");
            assert_eq!((m.scope_type(), m.scope_key()), ("mapping", key.as_str()));
            assert_eq!(m.name(), Some(name.as_str()), "{n}");
            assert_eq!(m.default_model(), Some("gpt-4o"), "{n}");
        }
    }

    /// What the daemon holds per mapping (issue 13): 40 bytes behind the `Arc` (56 with the
    /// counts: a 64-byte heap chunk), text aside.
    #[test]
    fn a_mapping_is_small() {
        assert!(std::mem::size_of::<Mapping>() <= 40);
    }

    /// chrono reads `:60` as a leap second; Postgres stores the next minute. A mapping keeps
    /// what Postgres stores, so its snapshot, its mirror row and the application's stored
    /// value compare equal.
    #[test]
    fn a_leap_second_is_the_next_second_as_postgres_stores_it() {
        let (t, w) = parse_timestamp(Some("2026-01-16T10:17:60Z"));
        assert_eq!(w, None);
        assert_eq!(
            t.as_ref().map(format_timestamp).as_deref(),
            Some("2026-01-16T10:18:00+00:00")
        );
        let t = parse_timestamp(Some("2026-01-16 10:17:60.5")).0;
        let m = Mapping::new(Fields {
            scope_type: "mapping",
            scope_key: "x",
            updated_at: t,
            metadata: "{}",
            ..Default::default()
        });
        assert_eq!(m.updated_at(), t, "a mapping gives back its timestamp");
        assert_eq!(m.updated_at_micros(), t.map(|t| t.timestamp_micros()));
        assert_eq!(
            m.updated_at().as_ref().map(format_timestamp).as_deref(),
            Some("2026-01-16T10:18:00.500+00:00")
        );
    }

    #[test]
    fn interned_mappings_share_their_texts_and_stay_equal() {
        let build = |key: &str, model: &str| {
            let candidates = [Cow::Borrowed(model), Cow::Borrowed("o4-mini")];
            Mapping::new(Fields {
                scope_type: "mapping",
                scope_key: key,
                candidates: &candidates,
                metadata: r#"{"tier": "pro"}"#,
                ..Default::default()
            })
        };
        let mut interner = Interner::default();
        let a = interner.intern(build("a", "gpt-4o"));
        let b = interner.intern(build("b", "gpt-4o"));
        let c = interner.intern(build("c", "kimi-k2"));
        assert!(Arc::ptr_eq(&a.models, &b.models));
        assert!(Arc::ptr_eq(&a.metadata, &c.metadata));
        assert!(!Arc::ptr_eq(&a.models, &c.models));
        assert_eq!(a, build("a", "gpt-4o"), "interning changes no value");
        assert_eq!(a.digest(), build("a", "gpt-4o").digest());
        assert_eq!(interner.len(), 3);
        drop((a, b));
        interner.sweep(true);
        assert_eq!(interner.len(), 2, "gpt-4o's list is no longer used");
        let with_model = |model| {
            Mapping::new(Fields {
                scope_type: "mapping",
                scope_key: "m",
                default_model: Some(model),
                metadata: "{}",
                ..Default::default()
            })
        };
        let (x, y) = (
            interner.intern(with_model("qwen-max")),
            interner.intern(with_model("qwen-max")),
        );
        assert!(Arc::ptr_eq(&x.models, &y.models));
        assert_eq!(x.default_model(), Some("qwen-max"));
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
        assert_eq!(
            (
                m.is_active(),
                m.source(),
                m.updated_at(),
                m.updated_at_micros()
            ),
            (false, Origin::Prompt, None, None)
        );
        let bare = mapping("global:global", None, Origin::Sqlite);
        assert_eq!((bare.name(), bare.default_model()), (None, None));
        assert_eq!(bare.candidates_json(), "[]");
        assert_eq!((bare.is_active(), bare.source()), (true, Origin::Sqlite));
    }
}
