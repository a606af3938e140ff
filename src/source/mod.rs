//! The source side: the application's SQLite file, read without ever disturbing it.
//!
//! [`SqliteSource`] keeps one read-only connection. It answers two questions: "did anything
//! commit since I last read?" ([`SqliteSource::changed`], a `PRAGMA data_version` plus a file
//! identity check, no transaction) and "what are the mappings now?" ([`SqliteSource::read`],
//! one short read transaction). Both are blocking calls; async callers run them on the blocking
//! pool and never hold a transaction across an await.
//!
//! [`watcher`] turns file-system events on the database's directory into a debounced trigger.

mod sqlite;
pub mod watcher;

use std::path::PathBuf;
use std::sync::Arc;

// Shared with `mapsync restore`, which writes what the reader reads by the same rules.
pub(crate) use sqlite::{
    MAPPING_COLUMNS, MODEL_MAPPING, MappingRow, PromptMapping, Slot, mapping_of_row, model_mapping,
    open, slot, table_exists,
};
pub use sqlite::{ReadMode, SqliteSource};

use crate::mapping::Mapping;

/// The application's SQLite schema (the tables mapsync reads), as its backend creates it:
/// `mapsync restore -o` builds new databases with it, and `mapsync demo` its demo file.
pub(crate) const APP_SCHEMA: &str = include_str!("../../tests/fixtures/app_sqlite_schema.sql");

/// What one read of the SQLite file produced.
#[derive(Debug, Clone, Default)]
pub struct SourceImage {
    /// Normalised and de-duplicated, in no particular order ([`crate::mapping::sort_for_export`]
    /// orders them). Shared: an incremental read reuses the mappings of unchanged rows.
    pub mappings: Vec<Arc<Mapping>>,
    /// Rows of `llm_model_mappings` that could not be mappings (empty scope).
    pub skipped: usize,
    /// For an incremental read: what changed since the previous read. `None` after a full
    /// read, or when two rows share a normalised id (then only the whole image tells).
    pub delta: Option<Delta>,
}

/// What an incremental read changed relative to the previous read.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// Mappings built in this read: rows new or changed since the previous read (and every
    /// prompt mapping, which are few and always rebuilt).
    pub fresh: Vec<Arc<Mapping>>,
    /// Mappings of the previous read that this one no longer has (removed or changed rows;
    /// a changed row's id is among `fresh` again).
    pub gone: Vec<Arc<Mapping>>,
}

/// Why the SQLite file could not be read. Each message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "SQLite file {0} does not exist: check source.sqlite_path (the application's SQLITE_DB_PATH)"
    )]
    Missing(PathBuf),
    #[error(
        "SQLite file {path} is not a readable database ({reason}): check source.sqlite_path points at the application's database, or restore it from a snapshot with `mapsync restore`"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "SQLite file {0} has no llm_model_mappings table: is source.sqlite_path the application's database?"
    )]
    NotAppDatabase(PathBuf),
    #[error(
        "SQLite file {path} stayed locked for longer than source.busy_timeout_ms ({reason}): the application holds a long write; raise source.busy_timeout_ms"
    )]
    Busy { path: PathBuf, reason: String },
    #[error("cannot read SQLite file {path}: {reason}")]
    Other { path: PathBuf, reason: String },
}
