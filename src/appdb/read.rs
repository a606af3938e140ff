//! Reading mappings out of the application's SQLite file (SPEC §1, §2).
//!
//! Invariants:
//! - Between reads mapsync holds nothing on the application's files: no connection, no lock,
//!   no open handle on the database, its `-wal` or its `-shm`. A read opens a read-only
//!   connection, runs one `BEGIN … COMMIT`, and closes it before the function returns (a kept
//!   connection would keep the application's `-wal` alive after it closes, so that a database
//!   swapped in by rename is paired with a stale WAL, and would make `locking_mode=EXCLUSIVE`
//!   or a `journal_mode` change by the application fail; a read transaction left open would
//!   stop its WAL checkpoints).
//! - "Did anything commit since the last read?" is answered from the files alone
//!   (`Fingerprint`): identity, size and header of the database and of its `-wal`, and the
//!   wal-index header in `-shm`. Every commit changes one of them (a WAL commit appends
//!   frames or, after a checkpoint, rewrites the WAL header with new salts, and then
//!   publishes its last frame in the wal-index; a rollback-journal commit bumps the
//!   database header's change counter), so a change is never missed, even one read between
//!   its WAL write and its publication; a checkpoint also changes them, which costs one
//!   needless read.
//! - A fresh open on every read means a file that was replaced, truncated or overwritten is
//!   seen as it is now, never through pages cached from before.

use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::Hasher;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use serde_json::Value;

use std::hash::BuildHasher;

use foldhash::fast::FixedState;

use super::schema::{
    MAPPING_COLUMNS, MappingRow, PromptMapping, integer, mapping_of_row, model_mapping, open,
    table_exists, text,
};
use super::{Delta, SourceError, SourceImage};
use crate::config::SourceSettings;
use crate::mapping::{self, Candidate, Fields, Mapping, Origin, Redactor, Warning};

pub struct SqliteSource {
    path: PathBuf,
    busy_timeout: Duration,
    include_prompts: bool,
    /// The files as they were just before the last successful read.
    read_fingerprint: Option<Fingerprint>,
    rules: Normalizer,
    /// What the last read built, so an incremental read only normalises rows that changed
    /// (kept only by memoizing readers: one-shot readers never read twice).
    memo: Memo,
    memoizing: bool,
    /// The prompt mappings of the previous read (prompts are always rebuilt; this tells which
    /// went away).
    prompts: Vec<Arc<Mapping>>,
    /// Whether the previous read had rows sharing a normalised id: then a row it read may not
    /// be the one its image kept, and the next read's delta would not tell the truth.
    contested: bool,
}

/// Whether a read may reuse what the previous read built for unchanged rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Normalise every row afresh (start-up, scheduled reconcile, one-shot commands).
    Full,
    /// Reuse mappings of rows whose stored bytes are unchanged (file-watch runs).
    Incremental,
}

/// Turns stored rows into mappings, and remembers which rows it already warned about, so a
/// bad row is logged once, not on every reconcile.
struct Normalizer {
    path: PathBuf,
    redactor: Redactor,
    reported: HashSet<String>,
    /// Distinct rows skipped so far (for `mapsync_source_rows_skipped_total`).
    skipped_seen: u64,
}

impl SqliteSource {
    pub fn new(settings: &SourceSettings, redactor: Redactor) -> Self {
        SqliteSource {
            path: settings.sqlite_path.clone(),
            busy_timeout: settings.busy_timeout,
            include_prompts: settings.include_prompt_mappings,
            read_fingerprint: None,
            memo: Memo::default(),
            memoizing: false,
            prompts: Vec::new(),
            contested: true,
            rules: Normalizer {
                path: settings.sqlite_path.clone(),
                redactor,
                reported: HashSet::new(),
                skipped_seen: 0,
            },
        }
    }

    /// Keeps what each read built, so that [`ReadMode::Incremental`] reads can reuse it
    /// (the daemon's readers; a one-shot command has no use for it).
    pub fn memoizing(mut self) -> Self {
        self.memoizing = true;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many distinct rows have been skipped since start (each counted once).
    pub fn skipped_total(&self) -> u64 {
        self.rules.skipped_seen
    }

    /// Whether a commit may have happened since the last [`read`](Self::read): true when there
    /// was no read yet or the files' fingerprint moved. Opens no connection: a stat and a
    /// few header bytes of the database and its `-wal`.
    pub fn changed(&self) -> Result<bool, SourceError> {
        let now = Fingerprint::take(&self.path)?;
        Ok(self.read_fingerprint.as_ref() != Some(&now))
    }

    /// Reads every mapping: opens the file read-only, runs one short read transaction, and
    /// closes it again.
    pub fn read(&mut self, mode: ReadMode) -> Result<SourceImage, SourceError> {
        // Taken before the read: a commit that lands in between is read now and seen again
        // as a change next time (one extra read), never missed.
        let fingerprint = Fingerprint::take(&self.path)?;
        let fail = |e| source_error(&self.path, e);
        let conn = open(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY,
            self.busy_timeout,
        )
        .map_err(fail)?;
        let tx = conn.unchecked_transaction().map_err(fail)?;
        if !table_exists(&tx, "llm_model_mappings").map_err(fail)? {
            return Err(SourceError::NotAppDatabase(self.path.clone()));
        }
        let mut candidates = Vec::new();
        // The memo is taken out for the read: a read that fails leaves it empty, and the
        // next one normalises every row again.
        let memo = std::mem::take(&mut self.memo);
        let previous = match (self.memoizing, mode) {
            (true, ReadMode::Incremental) => Some(memo),
            (true, ReadMode::Full) => Some(Memo::default()),
            (false, _) => None,
        };
        let incremental = self.memoizing && mode == ReadMode::Incremental;
        let mut delta = Delta::default();
        let (skipped, memo) = read_mapping_rows(
            &tx,
            &mut self.rules,
            previous,
            &mut candidates,
            incremental.then_some(&mut delta),
        )
        .map_err(fail)?;
        self.memo = memo.unwrap_or_default();
        let first_prompt = candidates.len();
        if self.include_prompts {
            read_prompt_rows(&tx, &mut self.rules, &mut candidates).map_err(fail)?;
        }
        tx.commit().map_err(fail)?;
        conn.close().map_err(|(_, e)| fail(e))?;
        self.read_fingerprint = Some(fingerprint);
        let prompts: Vec<Arc<Mapping>> = candidates[first_prompt..]
            .iter()
            .map(|c| c.mapping.clone())
            .collect();
        let previous_prompts = std::mem::replace(&mut self.prompts, prompts.clone());
        delta.fresh.extend(prompts);
        delta.gone.extend(previous_prompts);
        let (mappings, contested) = mapping::finalize(candidates);
        let was_contested = std::mem::replace(&mut self.contested, contested);
        Ok(SourceImage {
            mappings,
            skipped,
            delta: (incremental && !contested && !was_contested).then_some(delta),
        })
    }

    /// Forgets the last read's fingerprint, so that the next gate reads (the daemon does this
    /// when a read failed).
    pub fn forget(&mut self) {
        self.read_fingerprint = None;
    }
}

/// What the database file and its `-wal` look like from outside: enough to tell that nothing
/// can have committed since, without opening a connection (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    db: FileState,
    wal: Option<FileState>,
    /// The wal-index header in `-shm` (both copies, 96 bytes): a commit's frames reach the
    /// `-wal` before SQLite publishes them there, so a read in between misses the commit
    /// while the `-wal` looks final. Readers' marks, which follow, are left out: reads change
    /// them.
    shm_header: Option<Vec<u8>>,
}

/// (device, inode, size, mtime in ns) and the first bytes of a file: the database header's
/// first 100 bytes (change counter, page count) or the WAL header's 32 (salts, checkpoint
/// sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileState {
    id: (u64, u64),
    size: u64,
    mtime: (i64, i64),
    head: Vec<u8>,
}

impl Fingerprint {
    fn take(db: &Path) -> Result<Fingerprint, SourceError> {
        let db_state = match FileState::take(db, 100) {
            Ok(Some(s)) => s,
            Ok(None) => return Err(SourceError::Missing(db.to_path_buf())),
            Err(e) => {
                return Err(SourceError::Other {
                    path: db.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        let beside = |suffix: &str| {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        // A -wal or -shm that vanishes between the stat and the read is simply absent.
        let wal = FileState::take(&beside("-wal"), 32).ok().flatten();
        let shm_header = FileState::take(&beside("-shm"), 96)
            .ok()
            .flatten()
            .map(|s| s.head);
        Ok(Fingerprint {
            db: db_state,
            wal,
            shm_header,
        })
    }
}

impl FileState {
    /// `Ok(None)` when the file does not exist.
    fn take(path: &Path, head_len: u64) -> std::io::Result<Option<FileState>> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let mut head = Vec::with_capacity(head_len as usize);
        file.take(head_len).read_to_end(&mut head)?;
        Ok(Some(FileState {
            id: (meta.dev(), meta.ino()),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            head,
        }))
    }
}

impl Normalizer {
    fn warn_once(&mut self, row: &str, what: &str) {
        if self.reported.insert(format!("{row}\u{0}{what}")) {
            tracing::warn!(row = %row, file = %self.path.display(), "{what}");
        }
    }

    /// A mapping from one `llm_model_mappings` row; `None` (counted, logged once) when its
    /// scope is empty.
    fn mapping_row(&mut self, row: &MappingRow<'_>) -> Option<Candidate> {
        let stored_id = row.id.as_deref().unwrap_or_default();
        let Some((m, warnings)) = mapping_of_row(row, &self.redactor) else {
            if self.reported.insert(format!("{stored_id}\u{0}skip")) {
                self.skipped_seen += 1;
                tracing::warn!(row = %stored_id, file = %self.path.display(),
                    "skipping row: scope_type or scope_key is empty after trimming");
            }
            return None;
        };
        for w in warnings {
            self.warn_once(stored_id, &w.to_string());
        }
        Some(Candidate::new(stored_id, m))
    }

    /// A mapping from one prompt, when its `tools_json` holds a `__model_mapping` object.
    fn prompt_row(&mut self, p: &PromptRow<'_>) -> Option<Candidate> {
        let row = format!("ai_prompts:{}", p.id);
        let tools: Value = match serde_json::from_str(p.tools_json.as_deref().unwrap_or("")) {
            Ok(v) => v,
            Err(e) => {
                self.warn_once(
                    &row,
                    &format!("skipping prompt: tools_json is not valid JSON ({e})"),
                );
                return None;
            }
        };
        let mm = model_mapping(&tools)?;
        let fields = PromptMapping::of(mm);
        for w in &fields.warnings {
            self.warn_once(&row, &w.to_string());
        }
        let mut meta = serde_json::json!({"version": p.version, "category": p.category});
        let mut nul_in = Vec::new();
        if p.name.as_deref().is_some_and(|n| n.contains('\0')) {
            nul_in.push("name");
        }
        if mapping::strip_nul(&mut meta) {
            nul_in.push("version or category");
        }
        if !nul_in.is_empty() {
            self.warn_once(&row, &Warning::NulRemoved(nul_in).to_string());
        }
        let metadata = mapping::Metadata::of(meta, &self.redactor);
        let scope_key = p.id.to_string();
        let name = p.name.as_deref().map(mapping::clean);
        let m = Mapping::new(Fields {
            scope_type: "prompt",
            scope_key: &scope_key,
            name: name.as_deref(),
            default_model: fields.default_model.as_deref(),
            candidates: &fields.candidates,
            is_active: fields.is_active,
            updated_at: fields.updated_at,
            source: Origin::Prompt,
            metadata: &metadata.whole,
            mirror_metadata: metadata.mirror.as_deref(),
        });
        Some(Candidate::new(&format!("prompt:{}", p.id), m))
    }
}

struct PromptRow<'a> {
    id: i64,
    name: Option<Cow<'a, str>>,
    version: Option<Cow<'a, str>>,
    category: Option<Cow<'a, str>>,
    tools_json: Option<Cow<'a, str>>,
}

/// What a read built, row by row in rowid order: the next read walks it alongside its own
/// scan (also in rowid order) and reuses the mapping of every row whose rowid and stored
/// bytes are unchanged. A merge, not a lookup: no hashing per row beyond the row's own hash.
#[derive(Default)]
struct Memo(Vec<MemoRow>);

struct MemoRow {
    rowid: i64,
    hash: u64,
    /// `None` for a skipped row.
    candidate: Option<Candidate>,
}

/// Streams `llm_model_mappings` into `out`. With a memo, reuses the previous read's mapping of
/// every unchanged row (moving it, so an unchanged row costs one reference count), records in
/// `delta` what was built anew and what went away, and returns this read's memo. Returns how
/// many rows were skipped.
fn read_mapping_rows(
    conn: &Connection,
    rules: &mut Normalizer,
    previous: Option<Memo>,
    out: &mut Vec<Candidate>,
    mut delta: Option<&mut Delta>,
) -> rusqlite::Result<(usize, Option<Memo>)> {
    let mut stmt = conn.prepare(&format!(
        "SELECT rowid, {MAPPING_COLUMNS} FROM llm_model_mappings ORDER BY rowid"
    ))?;
    let mut rows = stmt.query([])?;
    let mut skipped = 0;
    let memoize = previous.is_some();
    let previous = previous.map(|m| m.0).unwrap_or_default();
    let mut next = Vec::with_capacity(if memoize { previous.len() } else { 0 });
    let mut cursor = previous.into_iter().peekable();
    while let Some(r) = rows.next()? {
        let (rowid, hash): (i64, u64) = if memoize {
            (r.get(0)?, row_hash(r)?)
        } else {
            (0, 0)
        };
        while let Some(p) = cursor.next_if(|p| p.rowid < rowid) {
            gone(delta.as_deref_mut(), p);
        }
        let candidate = match cursor.next_if(|p| p.rowid == rowid) {
            Some(p) if p.hash == hash && memoize => p.candidate,
            earlier => {
                if let Some(p) = earlier {
                    gone(delta.as_deref_mut(), p);
                }
                let c = rules.mapping_row(&MappingRow::read(r, 1)?);
                if let (Some(d), Some(c)) = (delta.as_deref_mut(), &c) {
                    d.fresh.push(c.mapping.clone());
                }
                c
            }
        };
        match &candidate {
            Some(c) => out.push(c.clone()),
            None => skipped += 1,
        }
        if memoize {
            next.push(MemoRow {
                rowid,
                hash,
                candidate,
            });
        }
    }
    for p in cursor {
        gone(delta.as_deref_mut(), p);
    }
    Ok((skipped, memoize.then_some(Memo(next))))
}

/// Records a previous read's row that this read does not carry over.
fn gone(delta: Option<&mut Delta>, p: MemoRow) {
    if let (Some(d), Some(c)) = (delta, p.candidate) {
        d.gone.push(c.mapping);
    }
}

/// Streams the prompts that hold a mapping into `out`. A missing `ai_prompts` table is fine.
fn read_prompt_rows(
    conn: &Connection,
    rules: &mut Normalizer,
    out: &mut Vec<Candidate>,
) -> rusqlite::Result<()> {
    if !table_exists(conn, "ai_prompts")? {
        return Ok(());
    }
    let mut stmt = conn.prepare(
        "SELECT id, name, version, category, tools_json FROM ai_prompts \
         WHERE tools_json LIKE '%__model_mapping%'",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row = PromptRow {
            id: integer(r.get_ref(0)?).unwrap_or_default(),
            name: text(r.get_ref(1)?),
            version: text(r.get_ref(2)?),
            category: text(r.get_ref(3)?),
            tools_json: text(r.get_ref(4)?),
        };
        out.extend(rules.prompt_row(&row));
    }
    Ok(())
}

/// A hash of a row's stored bytes (the mapping columns after the rowid), column by column:
/// type, length and content.
fn row_hash(r: &rusqlite::Row<'_>) -> rusqlite::Result<u64> {
    // Fixed seed: hashes are compared across reads.
    let mut h = FixedState::default().build_hasher();
    for i in 1..=9 {
        match r.get_ref(i)? {
            ValueRef::Null => h.write_u8(0),
            ValueRef::Integer(v) => {
                h.write_u8(1);
                h.write_i64(v);
            }
            ValueRef::Real(v) => {
                h.write_u8(2);
                h.write_u64(v.to_bits());
            }
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                h.write_u8(3);
                h.write_usize(t.len());
                h.write(t);
            }
        }
    }
    Ok(h.finish())
}

fn source_error(path: &Path, e: rusqlite::Error) -> SourceError {
    let path = path.to_path_buf();
    let reason = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            SourceError::Corrupt { path, reason }
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            SourceError::Busy { path, reason }
        }
        Some(ErrorCode::CannotOpen) if !path.exists() => SourceError::Missing(path),
        _ => SourceError::Other { path, reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use std::io::{Read, Seek, SeekFrom, Write};

    /// The first bytes of the `-shm` file: the wal-index header SQLite publishes a commit in.
    fn shm_header(db: &Path) -> Vec<u8> {
        let mut h = vec![0u8; 136];
        std::fs::File::open(format!("{}-shm", db.display()))
            .unwrap()
            .read_exact(&mut h)
            .unwrap();
        h
    }

    fn put_shm_header(db: &Path, h: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{}-shm", db.display()))
            .unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(h).unwrap();
    }

    /// A commit's frames reach the `-wal` before SQLite publishes them in the `-shm` index
    /// (an fsync apart). A read in between does not see the commit; the gate must still say
    /// "changed" once the commit is published, though the `-wal` and the database do not
    /// change again.
    #[test]
    fn a_commit_read_before_its_index_was_published_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.sqlite3");
        let app = Connection::open(&db).unwrap();
        app.pragma_update(None, "journal_mode", "WAL").unwrap();
        app.execute_batch(super::super::schema::APP_SCHEMA).unwrap();
        let insert = |key: &str| {
            app.execute(
                "INSERT INTO llm_model_mappings (id, scope_type, scope_key) VALUES (?1, 'mapping', ?2)",
                [format!("mapping:{key}"), key.to_string()],
            )
            .unwrap();
        };
        insert("a");
        let mut settings = Settings::default();
        settings.source.sqlite_path = db.clone();
        let mut source = SqliteSource::new(&settings.source, Redactor::default()).memoizing();
        assert_eq!(source.read(ReadMode::Full).unwrap().mappings.len(), 1);

        let before = shm_header(&db);
        insert("b");
        let published = shm_header(&db);
        assert_ne!(before, published);
        // The commit is in the -wal, not yet in the index: a read now misses it.
        put_shm_header(&db, &before);
        assert!(source.changed().unwrap(), "the -wal grew");
        assert_eq!(
            source.read(ReadMode::Incremental).unwrap().mappings.len(),
            1
        );
        // Published: nothing else changes on disk, and the gate must see it.
        put_shm_header(&db, &published);
        assert!(
            source.changed().unwrap(),
            "the commit was published since the read"
        );
        assert_eq!(
            source.read(ReadMode::Incremental).unwrap().mappings.len(),
            2
        );
        assert!(!source.changed().unwrap(), "and then nothing changed");
    }
}
