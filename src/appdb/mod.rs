//! The application's SQLite file, the source of truth: read without disturbing it, watched
//! for commits, and written back only by `mapsync restore`.
//!
//! - `schema`: the application's tables, opening the file, and the rules that turn its rows
//!   into mappings and back (shared by the reader and restore).
//! - [`read`]: [`SqliteSource`] answers "did anything commit since I last read?"
//!   ([`SqliteSource::changed`], from the files alone) and "what are the mappings now?"
//!   ([`SqliteSource::read`], one short read transaction on a connection opened for it).
//!   Both are blocking calls; async callers run them on the blocking pool.
//! - [`watch`]: file-system events on the database's directory, debounced into triggers.
//! - [`restore`]: `mapsync restore`, the only code that writes to the file.

pub mod read;
pub mod restore;
pub(crate) mod schema;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;

pub use read::{Fingerprint, MarkedRead, ReadMode, RowMark, SqliteSource};

use crate::mapping::Mapping;

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
