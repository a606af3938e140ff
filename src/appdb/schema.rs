//! The application's SQLite schema, as mapsync reads and writes it: the tables, how to open
//! the file, and the conversions between its rows and [`Mapping`]s, both ways. The reader
//! ([`super::read`]) turns rows into mappings with these rules, and `mapsync restore`
//! ([`super::restore`]) writes what the reader would read back, by the same rules; neither
//! knows the other.
//!
//! SQLite is dynamically typed: every column is read leniently ([`text`], [`integer`]), so a
//! value of an unexpected type degrades to a default and a warning, never an error.

use std::borrow::Cow;
use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use crate::mapping::{self, Fields, Mapping, Origin, Redactor, Warning};

/// The application's SQLite schema (the tables mapsync reads), as its backend creates it:
/// `mapsync restore -o` builds new databases with it, and `mapsync demo` its demo file.
pub(crate) const APP_SCHEMA: &str = include_str!("../../tests/fixtures/app_sqlite_schema.sql");

/// The key of a prompt's mapping inside its `tools_json`.
pub(crate) const MODEL_MAPPING: &str = "__model_mapping";

/// Where a prompt's `tools_json` holds its `__model_mapping` object: at the top level of an
/// object, or in the first object element of a list that holds one.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    Top,
    Element(usize),
}

pub(crate) fn slot(tools: &Value) -> Option<Slot> {
    let holds = |item: &Value| item.get(MODEL_MAPPING).is_some_and(Value::is_object);
    match tools {
        Value::Object(_) => holds(tools).then_some(Slot::Top),
        Value::Array(items) => items.iter().position(holds).map(Slot::Element),
        _ => None,
    }
}

/// The `__model_mapping` object of a prompt's tools (see [`slot`]).
pub(crate) fn model_mapping(tools: &Value) -> Option<&serde_json::Map<String, Value>> {
    let holder = match slot(tools)? {
        Slot::Top => tools,
        Slot::Element(i) => &tools[i],
    };
    holder.get(MODEL_MAPPING).and_then(Value::as_object)
}

/// The fields a prompt's `__model_mapping` object carries, by the reader's rules.
pub(crate) struct PromptMapping<'a> {
    pub default_model: Option<Cow<'a, str>>,
    pub candidates: Vec<Cow<'a, str>>,
    pub is_active: bool,
    pub updated_at: Option<DateTime<Utc>>,
    /// What was repaired or dropped on the way (candidates or a timestamp that do not parse).
    pub warnings: Vec<mapping::Warning>,
}

impl<'a> PromptMapping<'a> {
    pub(crate) fn of(mm: &'a serde_json::Map<String, Value>) -> PromptMapping<'a> {
        let mut warnings = Vec::new();
        let candidates = match mm.get("candidates") {
            // Some writers store the list as JSON text inside the object.
            Some(Value::String(text)) => {
                let (c, w) = mapping::parse_candidates(Some(text));
                warnings.extend(w);
                c
            }
            Some(v) => mapping::candidates_from_value(v),
            None => Vec::new(),
        };
        let (updated_at, w) =
            mapping::parse_timestamp(mm.get("updated_at").and_then(Value::as_str));
        warnings.extend(w);
        PromptMapping {
            default_model: mapping::non_empty(mm.get("default_model").and_then(Value::as_str)),
            candidates,
            is_active: mapping::parse_active_json(mm.get("is_active")),
            updated_at,
            warnings,
        }
    }
}

/// One row of `llm_model_mappings`, borrowed from SQLite's row buffer. SQLite is dynamically
/// typed, so every column is read leniently (see [`text`] and [`integer`]).
pub(crate) struct MappingRow<'a> {
    pub id: Option<Cow<'a, str>>,
    pub scope_type: Option<Cow<'a, str>>,
    pub scope_key: Option<Cow<'a, str>>,
    pub name: Option<Cow<'a, str>>,
    pub default_model: Option<Cow<'a, str>>,
    pub candidates_json: Option<Cow<'a, str>>,
    pub is_active: Option<i64>,
    pub updated_at: Option<Cow<'a, str>>,
    pub metadata_json: Option<Cow<'a, str>>,
}

/// The columns [`MappingRow::read`] expects, in order.
pub(crate) const MAPPING_COLUMNS: &str = "id, scope_type, scope_key, name, default_model, candidates_json, is_active, updated_at, metadata_json";

impl<'a> MappingRow<'a> {
    /// Reads [`MAPPING_COLUMNS`] from `r`, starting at column `first`.
    pub(crate) fn read(r: &'a rusqlite::Row<'_>, first: usize) -> rusqlite::Result<MappingRow<'a>> {
        Ok(MappingRow {
            id: text(r.get_ref(first)?),
            scope_type: text(r.get_ref(first + 1)?),
            scope_key: text(r.get_ref(first + 2)?),
            name: text(r.get_ref(first + 3)?),
            default_model: text(r.get_ref(first + 4)?),
            candidates_json: text(r.get_ref(first + 5)?),
            is_active: integer(r.get_ref(first + 6)?),
            updated_at: text(r.get_ref(first + 7)?),
            metadata_json: text(r.get_ref(first + 8)?),
        })
    }
}

/// A row as a mapping, with every SPEC §1 rule, and the warnings its values raised; `None`
/// when its scope is empty after trimming. (`mapsync restore` reads rows the same way.)
pub(crate) fn mapping_of_row(
    row: &MappingRow<'_>,
    redactor: &Redactor,
) -> Option<(Mapping, Vec<Warning>)> {
    let scope_type = mapping::normalize_scope_type(row.scope_type.as_deref().unwrap_or(""));
    let scope_key = mapping::clean(row.scope_key.as_deref().unwrap_or("").trim());
    if scope_type.is_empty() || scope_key.is_empty() {
        return None;
    }
    let (candidates, w1) = mapping::parse_candidates(row.candidates_json.as_deref());
    let (metadata, w2) = mapping::parse_metadata(row.metadata_json.as_deref(), redactor);
    let (updated_at, w3) = mapping::parse_timestamp(row.updated_at.as_deref());
    let name = row.name.as_deref().map(mapping::clean);
    let default_model = mapping::non_empty(row.default_model.as_deref());
    let m = Mapping::new(Fields {
        scope_type: &scope_type,
        scope_key: &scope_key,
        name: name.as_deref(),
        default_model: default_model.as_deref(),
        candidates: &candidates,
        is_active: mapping::parse_active_int(row.is_active),
        updated_at,
        source: Origin::Sqlite,
        metadata: &metadata.whole,
        mirror_metadata: metadata.mirror.as_deref(),
    });
    let mut warnings: Vec<Warning> = [w1, w3].into_iter().flatten().collect();
    let nul_in: Vec<&'static str> = [
        ("scope_type", &row.scope_type),
        ("scope_key", &row.scope_key),
        ("name", &row.name),
        ("default_model", &row.default_model),
        ("candidates_json", &row.candidates_json),
    ]
    .into_iter()
    .filter(|(field, v)| {
        v.as_deref().is_some_and(|s| {
            s.contains('\0') || (*field == "candidates_json" && s.contains("\\u0000"))
        })
    })
    .map(|(field, _)| field)
    .collect();
    let mut w2 = w2;
    if let Some(i) = w2.iter().position(|w| matches!(w, Warning::NulRemoved(_))) {
        w2.remove(i);
        warnings.push(Warning::NulRemoved(
            [nul_in, vec!["metadata_json"]].concat(),
        ));
    } else if !nul_in.is_empty() {
        warnings.push(Warning::NulRemoved(nul_in));
    }
    warnings.extend(w2);
    if !m.mirrorable() {
        warnings.push(Warning::IdTooLong(m.id().len()));
    }
    Some((m, warnings))
}

/// Opens the application's file (never creating it) with `flags`, waiting up to
/// `busy_timeout` for the application's locks. Shared with `mapsync restore`. Callers check
/// that the file exists first, so that a missing file is reported as such, not as SQLite's
/// "unable to open".
pub(crate) fn open(
    path: &Path,
    flags: OpenFlags,
    busy_timeout: std::time::Duration,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

pub(crate) fn table_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
}

/// A column as text, whatever SQLite stored: text borrowed as is, numbers as their decimal
/// text, blobs read as UTF-8 (lossily), NULL as `None`.
pub(crate) fn text(v: ValueRef<'_>) -> Option<Cow<'_, str>> {
    match v {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(Cow::Owned(i.to_string())),
        ValueRef::Real(f) => Some(Cow::Owned(f.to_string())),
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(match std::str::from_utf8(t) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(t),
        }),
    }
}

/// A column as an integer: numbers as they are, text parsed (`"1"`, `"true"`), NULL `None`.
pub(crate) fn integer(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i),
        ValueRef::Real(f) => Some(if f == 0.0 { 0 } else { 1 }),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            let s = String::from_utf8_lossy(t);
            let s = s.trim();
            s.parse::<i64>()
                .ok()
                .or(match s.to_ascii_lowercase().as_str() {
                    "false" | "no" | "off" | "" => Some(0),
                    _ => Some(1),
                })
        }
    }
}
