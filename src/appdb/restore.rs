//! `mapsync restore FILE|--from-target [--dry-run] [--exact [--force]] [-o NEW.db]` (SPEC §7):
//! upserts a snapshot, an application export (`{"exported_at", "count", "mappings": [...]}`),
//! a bare list of mappings, or the Postgres mirror's rows back into the application's SQLite
//! file, the way the application's own "import local JSON" does; or, with `-o`, writes them
//! into a new database with the application's schema (a host whose disk was lost). This is
//! the only code in mapsync that writes to the SQLite file.
//!
//! Invariants:
//! - Nothing is deleted unless `--exact`: then the rows of `llm_model_mappings` whose mapping
//!   is not among the entries are deleted too, under the sync's mass-delete guard
//!   (`target.max_delete_fraction` and `target.max_delete_floor`; `--force` overrides it).
//!   No prompt is ever created or deleted.
//! - `-o NEW.db` never touches the live file: the new database is built under a temporary
//!   name beside NEW.db and renamed into place once complete; an existing NEW.db is refused.
//! - All or nothing: one read-write connection (`busy_timeout` = `source.busy_timeout_ms`) and
//!   ONE `BEGIN IMMEDIATE` transaction that reads the current rows, decides every entry, writes
//!   and commits. Any failure rolls the whole restore back. `--dry-run` opens the file
//!   read-only and decides in one read transaction: the same report, and it cannot write.
//!   `journal_mode` (WAL) is the application's business and is never touched.
//! - Entries are parsed one by one with [`Mapping::from_export`] (the SPEC §1 rules): a bad
//!   entry is reported as `error` and the others go on. When two entries have the same
//!   (normalised) id, the last one wins, as with the application's import, which upserts in
//!   order; the earlier ones are `skipped`.
//! - `unchanged`: what the row holds, read back through the reader's rules, already equals
//!   the entry; nothing is written (no new row version, no file event for the daemon).
//!
//! Rows of `llm_model_mappings` (entries whose `source` is not `prompt`):
//! - Existing rows are grouped by normalised id, exactly as the reader builds it (so the
//!   legacy `tenant:x` row, or a row whose scope has stray spaces, is the row of `mapping:x`).
//! - No row in the group: `INSERT` under the normalised id (`created_at` takes its default).
//! - A row stored under the normalised id: `INSERT … ON CONFLICT(id) DO UPDATE` (scope columns
//!   rewritten trimmed; `created_at` untouched).
//! - A row stored under another id (legacy `tenant:x` for `mapping:x`): updated in place by
//!   rowid; its `id`, `scope_type` and `scope_key` are kept and no duplicate is created.
//! - Several rows normalising to the same id: every one that differs is updated, so whichever
//!   the reader (or the application) picks shows the restored values.
//! - A row stored under the normalised id whose scope reads as another id (or is empty) is
//!   never overwritten: the entry is an `error` naming that row.
//! - Text is written the way the application's Python writes it (`json.dumps`,
//!   `ensure_ascii=False`): `candidates_json` as `["a", "b"]`, `metadata_json` as an object with
//!   `", "` / `": "` separators and its keys sorted at every depth; `is_active` 1/0;
//!   `updated_at` RFC 3339 with `+00:00`, or NULL.
//!
//! Secrets: snapshots and exports keep every metadata key, but a file may lack some (written
//! with `snapshot.redact = true`, or copied from the redacted Postgres mirror), and restoring
//! it must not erase the secrets the row still holds (SPEC §1). The metadata written is the
//! entry's, plus every key of the row's current metadata that `snapshot.redact_keys` calls
//! sensitive and the entry lacks, at any depth, wherever its parent object still exists in
//! the entry (objects are matched by key, lists by position). A sensitive key the file holds
//! is restored as the file has it. So a file that differs from the row only by a missing
//! secret is `unchanged`.
//!
//! Prompt mappings (`source = "prompt"`, id `prompt:<id>`): the `ai_prompts` row `<id>` gets
//! `default_model`, `candidates`, `is_active` and `updated_at` set in its `tools_json`'s
//! `__model_mapping` object, found by the reader's rule (top level of an object, or the first
//! object element of a list holding one); other keys of that object and everything else in
//! `tools_json` are kept, objects in their stored key order (serde_json's `preserve_order`; a
//! key stored twice in one object is written once, with its last value, where it first stood,
//! as Python's `json.loads` then `json.dumps` would do). A prompt without one gets it
//! added at the top level of an object, or as a new element `{"__model_mapping": …}` at the
//! end of a list. The prompt's name, version and category are not restored (they belong to
//! the prompt). A missing prompt is `skipped`; so are all prompt entries when
//! `source.include_prompt_mappings` is false.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior, params};
use serde::Serialize;
use serde_json::{Map, Value};

use super::schema::{
    self, MAPPING_COLUMNS, MODEL_MAPPING, MappingRow, PromptMapping, Slot, mapping_of_row,
    model_mapping, slot, table_exists,
};
use crate::config::{Settings, SourceSettings};
use crate::mapping::{self, EntryError, KeyOrder, Mapping, Origin, Redactor, format_timestamp};
use crate::one_line;
use crate::snapshot;

/// Why a restore did not happen. Each message is one line naming the file and the fix; in
/// every case nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "restore file {0} does not exist: pass a snapshot from snapshot.dir (e.g. model-mappings-latest.json) or an application export"
    )]
    FileMissing(PathBuf),
    #[error("cannot read restore file {path}: {reason}: check the path and its permissions")]
    FileUnreadable { path: PathBuf, reason: String },
    #[error(
        "restore file {path} is not a mapsync snapshot or application export ({reason}): nothing was restored; pick another file from snapshot.dir"
    )]
    NotAnExport { path: PathBuf, reason: String },
    #[error(
        "SQLite file {0} does not exist: check source.sqlite_path (restore never creates the application's database; start the application once)"
    )]
    SqliteMissing(PathBuf),
    #[error(
        "SQLite file {0} has no llm_model_mappings table: is source.sqlite_path the application's database? nothing was restored"
    )]
    NotAppDatabase(PathBuf),
    #[error(
        "SQLite file {path} is not a readable database ({reason}): check source.sqlite_path; nothing was restored"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "SQLite file {path} stayed locked for longer than source.busy_timeout_ms ({reason}): nothing was restored; retry when the application is idle or raise source.busy_timeout_ms"
    )]
    Busy { path: PathBuf, reason: String },
    #[error(
        "cannot write SQLite file {path} ({reason}): run restore as the application's user (it needs write access to the file and its directory); nothing was restored"
    )]
    ReadOnly { path: PathBuf, reason: String },
    #[error("cannot restore into SQLite file {path}: {reason}; nothing was restored")]
    Other { path: PathBuf, reason: String },
    #[error(
        "{0} already exists: -o writes a new database; choose a path that does not exist (or remove it)"
    )]
    OutputExists(PathBuf),
    #[error(
        "--exact would delete {deletes} of the {rows} rows of {path}, more than target.max_delete_fraction ({fraction}) and target.max_delete_floor ({floor}): nothing was restored; pass --force if the file really is the whole truth"
    )]
    MassDelete {
        path: PathBuf,
        deletes: usize,
        rows: usize,
        fraction: f64,
        floor: u64,
    },
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Report what would change, write nothing.
    pub dry_run: bool,
    /// Also delete the rows whose mapping the entries lack.
    pub exact: bool,
    /// Let `exact` delete more than the mass-delete guard allows.
    pub force: bool,
    /// Write a new database there instead of touching `source.sqlite_path`.
    pub output: Option<PathBuf>,
}

/// The mappings to restore: a file's entries, or the mirror's rows, each parsed on its own.
pub struct Entries {
    /// What they came from, for the report (a path, or `postgres:<table>`).
    pub origin: String,
    pub entries: Vec<Result<Mapping, EntryError>>,
    /// Said to the operator in the report (e.g. that the mirror holds no secrets).
    pub notes: Vec<String>,
}

impl Entries {
    /// The entries of a snapshot or an application export.
    pub fn from_file(file: &Path, redactor: &Redactor) -> Result<Entries, RestoreError> {
        Ok(Entries {
            origin: file.display().to_string(),
            entries: read_entries(file, redactor)?,
            notes: Vec::new(),
        })
    }
}

/// What a restore did (or, with `dry_run`, would do), entry by entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// Where the mappings came from (a file, or `postgres:<table>`).
    pub file: String,
    /// The database written (`source.sqlite_path`, or the new one of `-o`).
    pub database: String,
    pub dry_run: bool,
    pub imported: usize,
    pub unchanged: usize,
    pub skipped: usize,
    pub errors: usize,
    /// Rows deleted by `--exact`.
    pub deleted: usize,
    pub notes: Vec<String>,
    pub entries: Vec<EntryReport>,
}

/// One entry of the file. `index` is its 0-based position in the `mappings` list; `id` is the
/// normalised id (null when the entry could not be parsed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryReport {
    pub index: usize,
    pub id: Option<String>,
    pub result: EntryResult,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryResult {
    Imported,
    Unchanged,
    Skipped,
    Error,
    /// A row the entries lack, deleted by `--exact` (its `index` is the row's rowid).
    Deleted,
}

/// Restores `entries` into `settings.source.sqlite_path`, or into a new database at
/// `opts.output` (blocking; async callers use `spawn_blocking`). With `opts.dry_run`, computes
/// the same report and writes nothing.
pub fn restore(
    settings: &Settings,
    entries: Entries,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let redactor = Redactor::new(&settings.snapshot.redact_keys);
    let rules = RestoreRules {
        redactor: &redactor,
        include_prompts: settings.source.include_prompt_mappings,
        exact: opts.exact.then_some(Guard {
            force: opts.force,
            fraction: settings.target.max_delete_fraction,
            floor: settings.target.max_delete_floor,
        }),
    };
    let report = match &opts.output {
        None => into_live(&settings.source, entries, &rules, opts.dry_run)?,
        Some(out) => into_new(out, entries, &rules, opts.dry_run)?,
    };
    tracing::info!(from = %report.file, db = %report.database, dry_run = opts.dry_run,
        imported = report.imported, unchanged = report.unchanged, skipped = report.skipped,
        errors = report.errors, deleted = report.deleted, "restore finished");
    Ok(report)
}

/// Into the application's own file: one `BEGIN IMMEDIATE` transaction.
fn into_live(
    source: &SourceSettings,
    entries: Entries,
    rules: &RestoreRules<'_>,
    dry_run: bool,
) -> Result<RestoreReport, RestoreError> {
    let db = source.sqlite_path.as_path();
    let fail = |e| restore_error(db, e);
    let mut conn = open(source, dry_run)?;
    let behavior = if dry_run {
        TransactionBehavior::Deferred
    } else {
        TransactionBehavior::Immediate
    };
    let tx = conn.transaction_with_behavior(behavior).map_err(fail)?;
    if !table_exists(&tx, "llm_model_mappings").map_err(fail)? {
        return Err(RestoreError::NotAppDatabase(db.to_path_buf()));
    }
    let planned = plan(&tx, entries.entries, rules, db)?;
    if !dry_run {
        apply(&tx, &planned).map_err(fail)?;
        tx.commit().map_err(fail)?;
    }
    // A dry run's transaction is dropped here: rolled back, and it never wrote anyway.
    Ok(summarize(
        entries.origin,
        db,
        dry_run,
        entries.notes,
        planned,
    ))
}

/// Into a new database with the application's schema, built under a temporary name beside
/// `out` and renamed into place once complete (a dry run builds it in memory).
fn into_new(
    out: &Path,
    entries: Entries,
    rules: &RestoreRules<'_>,
    dry_run: bool,
) -> Result<RestoreReport, RestoreError> {
    if out.exists() {
        return Err(RestoreError::OutputExists(out.to_path_buf()));
    }
    let temp = {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".mapsync-tmp-{}", std::process::id()));
        out.with_file_name(name)
    };
    let fail = |e| restore_error(out, e);
    let built = (|| {
        let mut conn = if dry_run {
            Connection::open_in_memory().map_err(fail)?
        } else {
            let _ = std::fs::remove_file(&temp);
            let conn = Connection::open(&temp).map_err(fail)?;
            // As the application keeps its file.
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(fail)?;
            conn
        };
        conn.execute_batch(schema::APP_SCHEMA).map_err(fail)?;
        let tx = conn.transaction().map_err(fail)?;
        let planned = plan(&tx, entries.entries, rules, out)?;
        apply(&tx, &planned).map_err(fail)?;
        tx.commit().map_err(fail)?;
        // Closing the only connection checkpoints the WAL into the file and removes it.
        conn.close().map_err(|(_, e)| fail(e))?;
        Ok(planned)
    })();
    let planned = match built {
        Ok(p) => p,
        Err(e) => {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = temp.as_os_str().to_owned();
                p.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
            return Err(e);
        }
    };
    if !dry_run {
        std::fs::rename(&temp, out).map_err(|e| RestoreError::Other {
            path: out.to_path_buf(),
            reason: one_line(&e.to_string()),
        })?;
    }
    let mut notes = entries.notes;
    notes.push(format!(
        "{} is a new database with the application's schema: point the application's SQLITE_DB_PATH (and source.sqlite_path) at it; prompt mappings need their ai_prompts rows, which are not in a mapsync file",
        out.display()
    ));
    Ok(summarize(entries.origin, out, dry_run, notes, planned))
}

/// The file's entries, each parsed on its own.
fn read_entries(
    file: &Path,
    redactor: &Redactor,
) -> Result<Vec<Result<Mapping, EntryError>>, RestoreError> {
    let bytes = std::fs::read(file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RestoreError::FileMissing(file.to_path_buf()),
        _ => RestoreError::FileUnreadable {
            path: file.to_path_buf(),
            reason: one_line(&e.to_string()),
        },
    })?;
    snapshot::parse_document(&bytes, redactor).map_err(|reason| RestoreError::NotAnExport {
        path: file.to_path_buf(),
        reason: one_line(&reason.to_string()),
    })
}

/// The application's file, read-write (read-only for a dry run), never created.
fn open(source: &SourceSettings, dry_run: bool) -> Result<Connection, RestoreError> {
    let path = source.sqlite_path.as_path();
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RestoreError::SqliteMissing(path.to_path_buf()));
        }
        Err(e) => {
            return Err(RestoreError::Other {
                path: path.to_path_buf(),
                reason: one_line(&e.to_string()),
            });
        }
    }
    let mode = if dry_run {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    };
    schema::open(path, mode, source.busy_timeout).map_err(|e| restore_error(path, e))
}

fn restore_error(path: &Path, e: rusqlite::Error) -> RestoreError {
    let path = path.to_path_buf();
    let reason = one_line(&e.to_string());
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            RestoreError::Corrupt { path, reason }
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            RestoreError::Busy { path, reason }
        }
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            RestoreError::ReadOnly { path, reason }
        }
        _ => RestoreError::Other { path, reason },
    }
}

// ---------------------------------------------------------------------------------------------
// Deciding what to do with each entry.

struct RestoreRules<'a> {
    redactor: &'a Redactor,
    include_prompts: bool,
    /// `--exact`: delete the rows the entries lack, under this guard.
    exact: Option<Guard>,
}

/// The mass-delete guard of `--exact` (the sync's limits).
struct Guard {
    force: bool,
    fraction: f64,
    floor: u64,
}

/// One entry's outcome and the writes it needs.
struct Planned {
    report: EntryReport,
    writes: Vec<Write>,
}

impl Planned {
    fn new(index: usize, id: Option<&str>, result: EntryResult, reason: Option<String>) -> Planned {
        Planned {
            report: EntryReport {
                index,
                id: id.map(str::to_string),
                result,
                reason,
            },
            writes: Vec::new(),
        }
    }

    fn imported(index: usize, id: &str, reason: String, writes: Vec<Write>) -> Planned {
        Planned {
            writes,
            ..Planned::new(index, Some(id), EntryResult::Imported, Some(reason))
        }
    }
}

/// One statement of the restore.
enum Write {
    /// `INSERT … ON CONFLICT(id) DO UPDATE` under the normalised id.
    Upsert { mapping: Mapping, columns: Columns },
    /// `UPDATE … WHERE rowid = ?` of a row stored under a legacy id; scope columns kept.
    Update { rowid: i64, columns: Columns },
    /// `UPDATE ai_prompts SET tools_json = ? WHERE id = ?`.
    Prompt { id: i64, tools_json: String },
    /// `DELETE … WHERE rowid = ?` (`--exact`).
    Delete { rowid: i64 },
}

/// The values written to a `llm_model_mappings` row, as the application stores them.
struct Columns {
    name: Option<String>,
    default_model: Option<String>,
    candidates_json: String,
    is_active: i64,
    updated_at: Option<String>,
    metadata_json: String,
}

impl Columns {
    /// `metadata` is written with its keys sorted at every depth, as restore always has (the
    /// file's own key order is not kept: [`Mapping`] holds metadata in canonical order).
    fn new(m: &Mapping, mut metadata: Value) -> Columns {
        metadata.sort_all_objects();
        Columns {
            name: m.name().map(str::to_string),
            default_model: m.default_model().map(str::to_string),
            candidates_json: m.candidates_json().to_string(),
            is_active: i64::from(m.is_active()),
            updated_at: m.updated_at().as_ref().map(format_timestamp),
            metadata_json: python_json(&metadata),
        }
    }
}

fn plan(
    tx: &Transaction<'_>,
    entries: Vec<Result<Mapping, EntryError>>,
    rules: &RestoreRules<'_>,
    db: &Path,
) -> Result<Vec<Planned>, RestoreError> {
    let fail = |e| restore_error(db, e);
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if let Ok(m) = e {
            last.insert(m.id().to_string(), i);
        }
    }
    let index = Index::load(tx, rules.redactor).map_err(fail)?;
    let prompts_table = table_exists(tx, "ai_prompts").map_err(fail)?;
    let mut planned = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let m = match entry {
            Ok(m) => m,
            Err(reason) => {
                planned.push(Planned::new(
                    i,
                    None,
                    EntryResult::Error,
                    Some(reason.to_string()),
                ));
                continue;
            }
        };
        let winner = last[m.id()];
        planned.push(if winner != i {
            let why = format!("superseded by entry {winner}, which has the same id");
            Planned::new(i, Some(m.id()), EntryResult::Skipped, Some(why))
        } else if m.source() == Origin::Prompt {
            plan_prompt(tx, i, &m, rules, prompts_table).map_err(fail)?
        } else {
            index.plan_row(i, &m, rules.redactor)
        });
    }
    if let Some(guard) = &rules.exact {
        let deletes = index.missing_from(&last);
        let rows = index.rows.len();
        let over_floor = deletes.len() as u64 > guard.floor;
        let over_fraction = deletes.len() as f64 > guard.fraction * rows as f64;
        if over_floor && over_fraction && !guard.force {
            return Err(RestoreError::MassDelete {
                path: db.to_path_buf(),
                deletes: deletes.len(),
                rows,
                fraction: guard.fraction,
                floor: guard.floor,
            });
        }
        planned.extend(deletes.into_iter().map(|row| Planned {
            report: EntryReport {
                index: row.rowid as usize,
                id: row.mapping.as_ref().map(|m| m.id().to_string()),
                result: EntryResult::Deleted,
                reason: Some("not in the file (--exact)".into()),
            },
            writes: vec![Write::Delete { rowid: row.rowid }],
        }));
    }
    Ok(planned)
}

/// One stored `llm_model_mappings` row.
struct Existing {
    rowid: i64,
    stored_id: Option<String>,
    /// As the reader builds it; `None` when its scope is empty (the reader skips the row).
    mapping: Option<Mapping>,
    metadata_json: Option<String>,
}

/// Every stored row, grouped by normalised id and by stored id.
struct Index {
    rows: Vec<Existing>,
    by_id: HashMap<String, Vec<usize>>,
    by_stored_id: HashMap<String, usize>,
}

impl Index {
    fn load(conn: &Connection, redactor: &Redactor) -> rusqlite::Result<Index> {
        let mut stmt = conn.prepare(&format!(
            "SELECT rowid, {MAPPING_COLUMNS} FROM llm_model_mappings"
        ))?;
        let mut rows = stmt.query([])?;
        let mut index = Index {
            rows: Vec::new(),
            by_id: HashMap::new(),
            by_stored_id: HashMap::new(),
        };
        while let Some(r) = rows.next()? {
            let row = MappingRow::read(r, 1)?;
            let existing = Existing {
                rowid: r.get(0)?,
                stored_id: row.id.as_deref().map(str::to_string),
                mapping: mapping_of_row(&row, redactor).map(|(m, _)| m),
                metadata_json: row.metadata_json.as_deref().map(str::to_string),
            };
            index.push(existing);
        }
        Ok(index)
    }

    /// The rows that read as a mapping none of `ids` names (what `--exact` deletes). Rows the
    /// reader skips (empty scope) are not mappings and are left alone.
    fn missing_from(&self, ids: &HashMap<String, usize>) -> Vec<&Existing> {
        self.rows
            .iter()
            .filter(|r| {
                r.mapping
                    .as_ref()
                    .is_some_and(|m| !ids.contains_key(m.id()))
            })
            .collect()
    }

    fn push(&mut self, row: Existing) {
        let i = self.rows.len();
        if let Some(m) = &row.mapping {
            self.by_id.entry(m.id().to_string()).or_default().push(i);
        }
        if let Some(id) = &row.stored_id {
            self.by_stored_id.insert(id.clone(), i);
        }
        self.rows.push(row);
    }

    /// The rule for an `llm_model_mappings` entry (see the module doc).
    fn plan_row(&self, index: usize, m: &Mapping, redactor: &Redactor) -> Planned {
        let group = self.by_id.get(m.id()).map_or(&[][..], Vec::as_slice);
        if group.is_empty() {
            if let Some(&taken) = self.by_stored_id.get(m.id()) {
                let reads_as = self.rows[taken]
                    .mapping
                    .as_ref()
                    .map_or("an empty scope".to_string(), |o| format!("`{}`", o.id()));
                let why = format!(
                    "row `{}` exists but its scope reads as {reads_as}; fix that row in the application first",
                    m.id()
                );
                return Planned::new(index, Some(m.id()), EntryResult::Error, Some(why));
            }
            let columns = Columns::new(m, m.metadata());
            let write = Write::Upsert {
                mapping: m.clone(),
                columns,
            };
            return Planned::imported(index, m.id(), "inserted".into(), vec![write]);
        }
        let mut writes = Vec::new();
        let mut legacy = Vec::new();
        for row in group.iter().map(|&i| &self.rows[i]) {
            let metadata = merged_metadata(m, row, redactor);
            // A file without the row's secrets (a redacted export) restores to the same row.
            if row.mapping.as_ref() == Some(&m.with_metadata(&metadata, redactor)) {
                continue;
            }
            let columns = Columns::new(m, metadata);
            match row.stored_id.as_deref() {
                Some(id) if id == m.id() => writes.push(Write::Upsert {
                    mapping: m.clone(),
                    columns,
                }),
                other => {
                    legacy.push(format!("`{}`", other.unwrap_or("NULL")));
                    writes.push(Write::Update {
                        rowid: row.rowid,
                        columns,
                    });
                }
            }
        }
        if writes.is_empty() {
            return Planned::new(index, Some(m.id()), EntryResult::Unchanged, None);
        }
        let why = if legacy.is_empty() {
            "updated".to_string()
        } else {
            format!("updated in place: row {}", legacy.join(", "))
        };
        Planned::imported(index, m.id(), why, writes)
    }
}

/// The entry's metadata, plus every secret the row holds that the entry lacks.
fn merged_metadata(m: &Mapping, row: &Existing, redactor: &Redactor) -> Value {
    let mut metadata = m.metadata();
    let current = row
        .metadata_json
        .as_deref()
        .and_then(|t| serde_json::from_str::<Value>(t).ok());
    if let Some(current) = current {
        keep_secrets(&mut metadata, &current, redactor);
    }
    metadata
}

/// Copies into `target` every key of `current` that `redactor` calls sensitive and `target`
/// lacks, at any depth, where the parent object exists in both (objects matched by key,
/// lists by position). A secret the file itself holds wins.
fn keep_secrets(target: &mut Value, current: &Value, redactor: &Redactor) {
    match (target, current) {
        (Value::Object(t), Value::Object(c)) => {
            for (k, cv) in c {
                if redactor.is_sensitive(k) {
                    t.entry(k.clone()).or_insert_with(|| cv.clone());
                } else if let Some(tv) = t.get_mut(k) {
                    keep_secrets(tv, cv, redactor);
                }
            }
        }
        (Value::Array(t), Value::Array(c)) => {
            for (tv, cv) in t.iter_mut().zip(c) {
                keep_secrets(tv, cv, redactor);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Prompt mappings.

/// The four fields a prompt's `__model_mapping` carries, as the reader reads them.
#[derive(Debug, PartialEq)]
struct PromptFields {
    default_model: Option<String>,
    candidates: Vec<String>,
    is_active: bool,
    updated_at: Option<DateTime<Utc>>,
}

impl PromptFields {
    fn of_entry(m: &Mapping) -> PromptFields {
        PromptFields {
            default_model: m.default_model().map(str::to_string),
            candidates: m.candidates(),
            is_active: m.is_active(),
            updated_at: m.updated_at(),
        }
    }

    /// A stored `__model_mapping` object, read by the reader's rules.
    fn of_stored(mm: &Map<String, Value>) -> PromptFields {
        let read = PromptMapping::of(mm);
        PromptFields {
            default_model: read.default_model.map(Cow::into_owned),
            candidates: read.candidates.into_iter().map(Cow::into_owned).collect(),
            is_active: read.is_active,
            updated_at: read.updated_at,
        }
    }

    /// The keys written into `__model_mapping`, in this order.
    fn to_json(&self) -> Map<String, Value> {
        Map::from_iter([
            (
                "default_model".into(),
                Value::from(self.default_model.as_deref()),
            ),
            ("candidates".into(), Value::from(self.candidates.clone())),
            ("is_active".into(), Value::Bool(self.is_active)),
            (
                "updated_at".into(),
                Value::from(self.updated_at.as_ref().map(format_timestamp)),
            ),
        ])
    }
}

/// The rule for a prompt entry (see the module doc).
fn plan_prompt(
    tx: &Transaction<'_>,
    index: usize,
    m: &Mapping,
    rules: &RestoreRules<'_>,
    prompts_table: bool,
) -> rusqlite::Result<Planned> {
    let id = m.id();
    let skipped = |why: String| Planned::new(index, Some(id), EntryResult::Skipped, Some(why));
    let error = |why: String| Planned::new(index, Some(id), EntryResult::Error, Some(why));
    if !rules.include_prompts {
        return Ok(skipped(
            "prompt mappings are off (source.include_prompt_mappings = false)".into(),
        ));
    }
    if m.scope_type() != "prompt" {
        return Ok(error(
            "source is `prompt` but scope_type is not `prompt`".into(),
        ));
    }
    let key = m.scope_key();
    let stored = match key.parse::<i64>() {
        Ok(prompt_id) if prompts_table => tx
            .query_row(
                "SELECT tools_json FROM ai_prompts WHERE id = ?1",
                [prompt_id],
                |r| r.get::<_, Option<String>>(0),
            )
            .map(|tools| Some((prompt_id, tools)))
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?,
        _ => None,
    };
    let Some((prompt_id, tools)) = stored else {
        return Ok(skipped(format!("prompt {key} does not exist")));
    };
    let mut tools = match parse_tools(tools.as_deref()) {
        Ok(t) => t,
        Err(why) => return Ok(error(format!("prompt {key}: {why}; restore left it alone"))),
    };
    let wanted = PromptFields::of_entry(m);
    let stored = model_mapping(&tools).map(PromptFields::of_stored);
    if stored.as_ref() == Some(&wanted) {
        return Ok(Planned::new(index, Some(id), EntryResult::Unchanged, None));
    }
    if let Err(why) = put_model_mapping(&mut tools, wanted.to_json()) {
        return Ok(error(format!("prompt {key}: {why}; restore left it alone")));
    }
    let write = Write::Prompt {
        id: prompt_id,
        tools_json: python_json(&tools),
    };
    Ok(Planned::imported(
        index,
        id,
        format!("updated tools_json of prompt {key}"),
        vec![write],
    ))
}

/// A prompt's stored `tools_json`; NULL or empty is an empty object.
/// A prompt's `tools_json` that is not JSON.
#[derive(Debug, thiserror::Error)]
#[error("tools_json is not valid JSON ({0})")]
struct ToolsError(String);

fn parse_tools(stored: Option<&str>) -> Result<Value, ToolsError> {
    let text = stored.map(str::trim).unwrap_or("");
    if text.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_str(text).map_err(|e| ToolsError(e.to_string()))
}

/// Sets `fields` in the `__model_mapping` object (keeping its other keys), adding the object
/// when there is none. A key that is already there keeps its place; new keys go at the end.
fn put_model_mapping(tools: &mut Value, fields: Map<String, Value>) -> Result<(), &'static str> {
    let holder = match slot(tools) {
        Some(Slot::Top) => Some(&mut *tools),
        Some(Slot::Element(i)) => Some(&mut tools[i]),
        None => None,
    };
    if let Some(Value::Object(mm)) = holder.and_then(|h| h.get_mut(MODEL_MAPPING)) {
        mm.extend(fields);
        return Ok(());
    }
    let mm = Value::Object(fields);
    match tools {
        Value::Object(top) => {
            top.insert(MODEL_MAPPING.into(), mm);
        }
        Value::Array(items) => {
            items.push(Value::Object(Map::from_iter([(MODEL_MAPPING.into(), mm)])))
        }
        _ => return Err("tools_json is neither a JSON object nor a list"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writing.

fn apply(tx: &Transaction<'_>, planned: &[Planned]) -> rusqlite::Result<()> {
    for write in planned.iter().flat_map(|p| &p.writes) {
        let changed = match write {
            Write::Upsert {
                mapping: m,
                columns: c,
            } => tx
                .prepare_cached(
                    "INSERT INTO llm_model_mappings (id, scope_type, scope_key, name, \
                     default_model, candidates_json, is_active, updated_at, metadata_json) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                     ON CONFLICT(id) DO UPDATE SET scope_type = excluded.scope_type, \
                     scope_key = excluded.scope_key, name = excluded.name, \
                     default_model = excluded.default_model, \
                     candidates_json = excluded.candidates_json, is_active = excluded.is_active, \
                     updated_at = excluded.updated_at, metadata_json = excluded.metadata_json",
                )?
                .execute(params![
                    m.id(),
                    m.scope_type(),
                    m.scope_key(),
                    c.name,
                    c.default_model,
                    c.candidates_json,
                    c.is_active,
                    c.updated_at,
                    c.metadata_json
                ])?,
            Write::Update { rowid, columns: c } => tx
                .prepare_cached(
                    "UPDATE llm_model_mappings SET name = ?2, default_model = ?3, \
                     candidates_json = ?4, is_active = ?5, updated_at = ?6, metadata_json = ?7 \
                     WHERE rowid = ?1",
                )?
                .execute(params![
                    rowid,
                    c.name,
                    c.default_model,
                    c.candidates_json,
                    c.is_active,
                    c.updated_at,
                    c.metadata_json
                ])?,
            Write::Prompt { id, tools_json } => tx
                .prepare_cached("UPDATE ai_prompts SET tools_json = ?2 WHERE id = ?1")?
                .execute(params![id, tools_json])?,
            Write::Delete { rowid } => tx
                .prepare_cached("DELETE FROM llm_model_mappings WHERE rowid = ?1")?
                .execute(params![rowid])?,
        };
        if changed != 1 {
            // The rows were read in this same transaction; anything else is a bug. Roll back.
            return Err(rusqlite::Error::StatementChangedRows(changed));
        }
    }
    Ok(())
}

fn summarize(
    origin: String,
    db: &Path,
    dry_run: bool,
    notes: Vec<String>,
    planned: Vec<Planned>,
) -> RestoreReport {
    let entries: Vec<EntryReport> = planned.into_iter().map(|p| p.report).collect();
    let count = |o: EntryResult| entries.iter().filter(|e| e.result == o).count();
    RestoreReport {
        file: origin,
        database: db.display().to_string(),
        dry_run,
        imported: count(EntryResult::Imported),
        unchanged: count(EntryResult::Unchanged),
        skipped: count(EntryResult::Skipped),
        errors: count(EntryResult::Error),
        deleted: count(EntryResult::Deleted),
        notes,
        entries,
    }
}

/// `json.dumps(v, ensure_ascii=False)`: the text the application's Python writes, keys in the
/// order `v` holds them.
fn python_json(v: &Value) -> String {
    let mut out = String::new();
    mapping::write_json(&mut out, v, KeyOrder::AsGiven);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(v: Value) -> Mapping {
        Mapping::from_export(&v, &Redactor::default()).unwrap()
    }

    #[test]
    fn secrets_of_the_row_are_kept_at_any_depth_where_their_parent_survives() {
        let r = Redactor::default();
        let mut snapshot = json!({
            "temperature": 0.2,
            "auth": {"region": "eu"},
            "hosts": [{"name": "a"}, {"name": "b"}],
        });
        let current = json!({
            "apiKey": "sk-1",
            "temperature": 0.9,
            "auth": {"client-secret": "cs", "region": "us"},
            "hosts": [{"name": "x", "token": "t0"}, {"name": "y"}, {"name": "z", "token": "t2"}],
            "gone": {"password": "p"},
        });
        keep_secrets(&mut snapshot, &current, &r);
        assert_eq!(
            snapshot,
            json!({
                "apiKey": "sk-1",
                "temperature": 0.2,
                "auth": {"client-secret": "cs", "region": "eu"},
                "hosts": [{"name": "a", "token": "t0"}, {"name": "b"}],
            })
        );
    }

    #[test]
    fn text_is_written_like_python_json_dumps_without_ascii_escapes() {
        let m = entry(json!({"scope_type": "mapping", "scope_key": "x", "candidates": ["模型-β"]}));
        let v =
            json!({"b": [1, 2.5, null, true], "a": "映射 \"x\"\n", "d": [], "c": {"z": 1, "y": 2}});
        let columns = Columns::new(&m, v);
        assert_eq!(
            columns.metadata_json,
            r#"{"a": "映射 \"x\"\n", "b": [1, 2.5, null, true], "c": {"y": 2, "z": 1}, "d": []}"#,
            "keys sorted at every depth"
        );
        assert_eq!(columns.candidates_json, r#"["模型-β"]"#);
    }

    #[test]
    fn tools_json_keeps_its_key_order_and_everything_else() {
        let text = r#"{"zeta": 1, "tools": [{"type": "function", "b": 2, "a": 1}], "__model_mapping": {"metadata": {}, "default_model": "old", "extra": "kept"}, "alpha": "模型"}"#;
        let mut tools: Value = serde_json::from_str(text).unwrap();
        let m = entry(
            json!({"scope_type": "prompt", "scope_key": "3", "default_model": "new",
            "candidates": ["new", "b"], "is_active": false, "source": "prompt",
            "updated_at": "2026-01-16T10:17:10Z"}),
        );
        put_model_mapping(&mut tools, PromptFields::of_entry(&m).to_json()).unwrap();
        assert_eq!(
            python_json(&tools),
            r#"{"zeta": 1, "tools": [{"type": "function", "b": 2, "a": 1}], "__model_mapping": {"metadata": {}, "default_model": "new", "extra": "kept", "candidates": ["new", "b"], "is_active": false, "updated_at": "2026-01-16T10:17:10+00:00"}, "alpha": "模型"}"#
        );
        let back = PromptFields::of_stored(model_mapping(&tools).unwrap());
        assert_eq!(back, PromptFields::of_entry(&m));
    }

    #[test]
    fn a_model_mapping_is_found_or_added_by_the_readers_rule() {
        let m = entry(
            json!({"scope_type": "prompt", "scope_key": "3", "default_model": "x",
            "source": "prompt"}),
        );
        let fields = || PromptFields::of_entry(&m).to_json();
        let put = |text: &str| {
            let mut t = parse_tools(Some(text)).unwrap();
            put_model_mapping(&mut t, fields()).map(|()| python_json(&t))
        };
        let mm =
            r#"{"default_model": "x", "candidates": [], "is_active": true, "updated_at": null}"#;
        // A list: the first object element that holds one is updated in place.
        assert_eq!(
            put(r#"[1, {"__model_mapping": null}, {"k": 1, "__model_mapping": {"default_model": "y"}}, {"__model_mapping": {}}]"#).unwrap(),
            format!(r#"[1, {{"__model_mapping": null}}, {{"k": 1, "__model_mapping": {mm}}}, {{"__model_mapping": {{}}}}]"#)
        );
        // A list without one: a new element at the end.
        assert_eq!(
            put(r#"[{"type": "function"}]"#).unwrap(),
            format!(r#"[{{"type": "function"}}, {{"__model_mapping": {mm}}}]"#)
        );
        // An object without one (or with a non-object one): set at the top level.
        assert_eq!(
            put(r#"{"tools": [], "__model_mapping": "junk"}"#).unwrap(),
            format!(r#"{{"tools": [], "__model_mapping": {mm}}}"#)
        );
        assert_eq!(
            put("  ").unwrap(),
            format!(r#"{{"__model_mapping": {mm}}}"#)
        );
        assert!(put(r#""text""#).is_err());
        assert!(parse_tools(Some("{oops")).is_err());
    }
}
