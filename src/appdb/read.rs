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
//!   (`Fingerprint`): identity, size, mtime and header of the database (and its ctime) and of
//!   its `-wal`, and the wal-index header in `-shm`. Every commit changes one of them (a WAL
//!   commit appends frames or, after a checkpoint, rewrites the WAL header with new salts, and
//!   then publishes its last frame in the wal-index; a rollback-journal commit bumps the
//!   database header's change counter), so a change is never missed, even one read between
//!   its WAL write and its publication; a checkpoint also changes them, which costs one
//!   needless read. A file put back in place (a restored copy) has a new ctime even when its
//!   mtime was kept.
//! - A fresh open on every read means a file that was replaced, truncated or overwritten is
//!   seen as it is now, never through pages cached from before.
//!
//! What a memoizing reader (the daemon's) keeps between reads is the memo: one mark per row
//! of `llm_model_mappings`, in rowid order, with a hash of the row's stored bytes and the
//! mapping it made. Two kinds of read bring it up to date, each in one read transaction:
//! - a **walk** ([`ReadMode::Full`]) steps through every row beside the memo: an unchanged
//!   row (same rowid, same hash) keeps its mapping, a changed one is normalised again, a
//!   vanished one goes. It is complete: after it, the memo is the table.
//! - a **watermark read** ([`ReadMode::Incremental`], once a read has set the watermark)
//!   reads only the rows whose `updated_at` is at or after the newest one the previous read
//!   saw (cut to the second: saves within one second share a stamp; the application has an
//!   index on `updated_at` and stamps it on every save), and counts the rows; a count that
//!   differs from the memo's (a delete, an insert without a new stamp) makes it compare the
//!   rowids (`SELECT rowid`, from the smallest index) and fetch the rows it lacks. A row
//!   changed without a newer `updated_at` (a hand edit, `mapsync restore`, a late commit)
//!   escapes it: after a watermark read the reader says so ([`SqliteSource::needs_walk`]),
//!   and the engine walks once the file has been quiet for a moment. Every full run walks.
//!
//! The mappings of one reader share their candidates' and metadata's text
//! ([`crate::mapping::Interner`]).

use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::Hasher;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use serde_json::Value;

use std::hash::BuildHasher;

use foldhash::fast::FixedState;
use foldhash::{HashMap as FxHashMap, HashSet as FxHashSet};

use super::schema::{
    MAPPING_COLUMNS, MappingRow, PromptMapping, integer, mapping_of_row, model_mapping, open,
    table_exists, text,
};
use super::{Delta, SourceError, SourceImage};
use crate::config::SourceSettings;
use crate::mapping::{self, Candidate, Fields, Interner, Mapping, Origin, Redactor, Warning};

pub struct SqliteSource {
    path: PathBuf,
    busy_timeout: Duration,
    include_prompts: bool,
    /// The files as they were just before the last successful read.
    read_fingerprint: Option<Fingerprint>,
    rules: Normalizer,
    /// The rows as the last read left them (see the module doc).
    memo: Memo,
    /// Whether the memo is kept between reads (the daemon's readers; a one-shot command reads
    /// once).
    memoizing: bool,
    /// Whether `memo` holds what the previous read read: only then can a read tell what
    /// changed (false before the first read and after a failed one).
    memo_valid: bool,
    /// The prompt mappings of the previous read (prompts are always rebuilt; this tells which
    /// went away).
    prompts: Vec<Arc<Mapping>>,
    /// Whether the previous read had rows sharing a normalised id: then a row it read may not
    /// be the one its image kept, and the next read's delta would not tell the truth.
    contested: bool,
    /// The newest `updated_at` the previous read saw, cut to the second; `None` until a read
    /// found one.
    watermark: Option<String>,
    /// Set by a watermark read, cleared by a walk: a row changed without a new `updated_at`
    /// may not be in the memo yet.
    unverified: bool,
}

/// How much of the table a read looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Walk every row (start-up, scheduled reconcile, one-shot commands, the check after
    /// watermark reads). Rows whose stored bytes are unchanged keep their mapping.
    Full,
    /// Read the rows stamped since the previous read (file-watch runs); a walk when there is
    /// no previous read or no watermark.
    Incremental,
}

/// What a read found, before the image is made ([`SqliteSource::image_of`]).
pub struct Rows {
    /// What changed since the previous read, when the previous read's memo was carried over.
    delta: Option<Delta>,
    /// Whether this was a watermark read (a walk otherwise).
    pub watermark: bool,
}

impl Rows {
    /// Whether the read found the mappings exactly as the previous read left them (every
    /// mapping built anew equals the one it replaces; no row came or went).
    pub fn unchanged(&self) -> bool {
        self.delta.as_ref().is_some_and(is_noop)
    }
}

/// Turns stored rows into mappings, and remembers which rows it already warned about, so a
/// bad row is logged once, not on every reconcile.
struct Normalizer {
    path: PathBuf,
    redactor: Redactor,
    reported: HashSet<String>,
    /// Distinct rows skipped so far (for `mapsync_source_rows_skipped_total`).
    skipped_seen: u64,
    /// Shares the candidates' and metadata's text among the mappings this reader builds.
    interner: Interner,
}

/// One mark per row of `llm_model_mappings`, in rowid order, and the stored ids that differ
/// from the normalised ones (a legacy `tenant:x`, stray spaces: the only rows whose id can
/// collide with another's).
#[derive(Default)]
struct Memo {
    marks: Vec<Mark>,
    stored_ids: FxHashMap<i64, Box<str>>,
}

/// A row as a read left it: 24 bytes.
struct Mark {
    rowid: i64,
    /// [`row_hash`] of its stored bytes.
    hash: u64,
    /// `None` for a skipped row.
    mapping: Option<Arc<Mapping>>,
}

impl SqliteSource {
    pub fn new(settings: &SourceSettings, redactor: Redactor) -> Self {
        Self::at(
            settings.sqlite_path.clone(),
            settings.busy_timeout,
            settings.include_prompt_mappings,
            redactor,
        )
    }

    fn at(
        path: PathBuf,
        busy_timeout: Duration,
        include_prompts: bool,
        redactor: Redactor,
    ) -> Self {
        SqliteSource {
            path: path.clone(),
            busy_timeout,
            include_prompts,
            read_fingerprint: None,
            memo: Memo::default(),
            memoizing: false,
            memo_valid: false,
            prompts: Vec::new(),
            contested: true,
            watermark: None,
            unverified: false,
            rules: Normalizer {
                path,
                redactor,
                reported: HashSet::new(),
                skipped_seen: 0,
                interner: Interner::default(),
            },
        }
    }

    /// Keeps what each read built, so that later reads only normalise rows that changed
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

    /// Whether the last read was a watermark read and no walk has come since: a row changed
    /// without a new `updated_at` may have been missed (see the module doc).
    pub fn needs_walk(&self) -> bool {
        self.memoizing && self.unverified
    }

    /// Reads every mapping: opens the file read-only, runs one short read transaction, and
    /// closes it again.
    pub fn read(&mut self, mode: ReadMode) -> Result<SourceImage, SourceError> {
        let rows = self.read_rows(mode)?;
        Ok(self.image_of(rows))
    }

    /// [`read`](Self::read) that also hands each mapping it builds from a row to `tap` as
    /// soon as it is built, with whether the row is stored under another id than its
    /// mapping's (then it may share its id with another row, and only the image says which
    /// one wins). Prompts are not handed over. Lets a cold load send rows to Postgres while
    /// the file is still being read.
    pub fn read_tapped(
        &mut self,
        mode: ReadMode,
        tap: &mut Tap<'_>,
    ) -> Result<SourceImage, SourceError> {
        let rows = self.read_rows_tapped(mode, Some(tap))?;
        Ok(self.image_of(rows))
    }

    /// The reading part of [`read`](Self::read): brings the memo up to date and says what
    /// changed, without making the image (which a read that changed nothing does not need).
    pub fn read_rows(&mut self, mode: ReadMode) -> Result<Rows, SourceError> {
        self.read_rows_tapped(mode, None)
    }

    fn read_rows_tapped(
        &mut self,
        mode: ReadMode,
        tap: Option<&mut Tap<'_>>,
    ) -> Result<Rows, SourceError> {
        // Taken before the read: a commit that lands in between is read now and seen again
        // as a change next time (one extra read), never missed.
        let fingerprint = Fingerprint::take(&self.path)?;
        let carried = self.memoizing && self.memo_valid;
        if !carried {
            self.memo = Memo::default();
        }
        // A read that fails leaves the memo half updated: it is dropped, and the next read
        // normalises every row again.
        self.memo_valid = false;
        let watermark = match (mode, carried, &self.watermark) {
            (ReadMode::Incremental, true, Some(w)) => Some(w.clone()),
            _ => None,
        };
        let result = self.read_in_transaction(watermark.as_deref(), tap);
        let (delta, newest) = match result {
            Ok(read) => read,
            Err(e) => {
                self.memo = Memo::default();
                return Err(self.failed(e));
            }
        };
        self.read_fingerprint = Some(fingerprint);
        self.memo_valid = self.memoizing;
        self.watermark = newest;
        self.unverified = watermark.is_some();
        Ok(Rows {
            delta: carried.then_some(delta),
            watermark: watermark.is_some(),
        })
    }

    /// One read transaction: a watermark read from `watermark`, or a walk. Returns what
    /// changed and the next watermark.
    fn read_in_transaction(
        &mut self,
        watermark: Option<&str>,
        tap: Option<&mut Tap<'_>>,
    ) -> Result<(Delta, Option<String>), Failed> {
        let mut delta = Delta::default();
        let (newest, prompts) = in_read_transaction(&self.path, self.busy_timeout, |tx| {
            let mut changes = Changes {
                rules: &mut self.rules,
                stored_ids: &mut self.memo.stored_ids,
                delta: &mut delta,
                tap,
            };
            match watermark {
                Some(w) => read_since(tx, w, &mut self.memo.marks, &mut changes)?,
                None => walk(tx, &mut self.memo.marks, &mut changes)?,
            }
            let newest = newest_stamp(tx)?;
            let prompts = if self.include_prompts {
                read_prompt_rows(tx, &mut self.rules)?
            } else {
                Vec::new()
            };
            Ok((newest, prompts))
        })?;
        let previous = std::mem::replace(&mut self.prompts, prompts.clone());
        delta.fresh.extend(prompts);
        delta.gone.extend(previous);
        self.rules.interner.sweep(watermark.is_none());
        Ok((delta, newest))
    }

    /// The image of the memo as `rows` left it: the mappings de-duplicated by id
    /// ([`mapping::finalize`], over the only rows whose ids can collide), with the delta when
    /// it tells the truth (no id shared now or in the previous read).
    pub fn image_of(&mut self, rows: Rows) -> SourceImage {
        let (mappings, contested) = self.image();
        let skipped = self
            .memo
            .marks
            .iter()
            .filter(|m| m.mapping.is_none())
            .count();
        let was_contested = std::mem::replace(&mut self.contested, contested);
        if !self.memoizing {
            self.memo = Memo::default();
        }
        SourceImage {
            mappings,
            skipped,
            delta: rows.delta.filter(|_| !contested && !was_contested),
        }
    }

    fn image(&self) -> (Vec<Arc<Mapping>>, bool) {
        let marks = &self.memo.marks;
        // Only a row stored under another id, or a prompt, can share its id with another row.
        let special: FxHashSet<&str> = self
            .memo
            .stored_ids
            .keys()
            .filter_map(|rowid| {
                let i = marks.binary_search_by_key(rowid, |m| m.rowid).ok()?;
                marks[i].mapping.as_deref().map(Mapping::id)
            })
            .chain(self.prompts.iter().map(|p| p.id()))
            .collect();
        let mut mappings = Vec::with_capacity(marks.len() + self.prompts.len());
        let mut involved = Vec::new();
        for mark in marks {
            let Some(m) = &mark.mapping else { continue };
            if !special.is_empty() && special.contains(m.id()) {
                involved.push(Candidate {
                    stored_id: self.memo.stored_ids.get(&mark.rowid).cloned(),
                    mapping: m.clone(),
                });
            } else {
                mappings.push(m.clone());
            }
        }
        involved.extend(self.prompts.iter().map(|p| Candidate {
            stored_id: None,
            mapping: p.clone(),
        }));
        let (winners, contested) = mapping::finalize(involved);
        mappings.extend(winners);
        (mappings, contested)
    }

    /// The files' fingerprint now (what a read records before it reads).
    pub fn fingerprint(&self) -> Result<Fingerprint, SourceError> {
        Fingerprint::take(&self.path)
    }

    /// Whether the last image had ids shared by two rows.
    pub fn contested(&self) -> bool {
        self.contested
    }

    /// The rows as the last read left them, for `mapsync sync`'s state: each one's
    /// [`RowMark`], borrowed, in rowid order.
    pub fn marks(&self) -> impl ExactSizeIterator<Item = RowMarkRef<'_>> {
        self.memo.marks.iter().map(|m| RowMarkRef {
            rowid: m.rowid,
            hash: m.hash,
            id: m.mapping.as_deref().map(Mapping::id),
        })
    }

    /// A walk of every row beside `previous` (the rows a former `mapsync sync` left, in rowid
    /// order): only new and changed rows are normalised. Prompts are read whole. One read
    /// transaction, as [`read`](Self::read).
    /// `None` when `stop` was set during the walk (the caller no longer needs it).
    pub fn read_marked(
        &mut self,
        previous: Vec<RowMark>,
        stop: &AtomicBool,
    ) -> Result<Option<MarkedRead>, SourceError> {
        let fingerprint = Fingerprint::take(&self.path)?;
        let mut read = MarkedRead {
            fingerprint,
            marks: Vec::with_capacity(previous.len()),
            fresh: Vec::new(),
            gone: Vec::new(),
            prompts: Vec::new(),
            aliased: false,
        };
        let whole = in_read_transaction(&self.path, self.busy_timeout, |tx| {
            if !walk_marked(tx, previous, &mut self.rules, &mut read, stop)? {
                return Ok(false);
            }
            if self.include_prompts {
                read.prompts = read_prompt_rows(tx, &mut self.rules)?;
            }
            Ok(true)
        })
        .map_err(|e| self.failed(e))?;
        Ok(whole.then_some(read))
    }

    fn failed(&self, e: Failed) -> SourceError {
        match e {
            Failed::Sqlite(e) => source_error(&self.path, e),
            Failed::NotAppDatabase => SourceError::NotAppDatabase(self.path.clone()),
        }
    }

    /// A reader of the same file with the same settings, which has read nothing yet.
    pub fn fresh(&self) -> SqliteSource {
        let mut fresh = Self::at(
            self.path.clone(),
            self.busy_timeout,
            self.include_prompts,
            self.rules.redactor.clone(),
        );
        fresh.memoizing = self.memoizing;
        fresh
    }

    /// Forgets the last read's fingerprint, so that the next gate reads (the daemon does this
    /// when a read failed).
    pub fn forget(&mut self) {
        self.read_fingerprint = None;
    }
}

/// The page cache of a read, in KiB (SQLite's `cache_size` takes it negative).
const PAGE_CACHE_KIB: i64 = -256;

/// Why a read transaction failed, before the path is attached ([`SourceError`]).
enum Failed {
    Sqlite(rusqlite::Error),
    /// No `llm_model_mappings` table.
    NotAppDatabase,
}

impl From<rusqlite::Error> for Failed {
    fn from(e: rusqlite::Error) -> Self {
        Failed::Sqlite(e)
    }
}

/// One short read transaction on the application's file: opened read-only, checked to be the
/// application's, `read`, committed and closed, so nothing is held afterwards.
fn in_read_transaction<T>(
    path: &Path,
    busy_timeout: Duration,
    read: impl FnOnce(&Connection) -> Result<T, Failed>,
) -> Result<T, Failed> {
    let conn = open(path, OpenFlags::SQLITE_OPEN_READ_ONLY, busy_timeout)?;
    // Every page is read once, in order: a small page cache does as well as SQLite's 2 MB
    // default, and leaves fewer holes among the mappings when it is freed.
    conn.pragma_update(None, "cache_size", PAGE_CACHE_KIB)?;
    let tx = conn.unchecked_transaction()?;
    if !table_exists(&tx, "llm_model_mappings")? {
        return Err(Failed::NotAppDatabase);
    }
    let out = read(&tx)?;
    tx.commit()?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(out)
}

/// A row as a `mapsync sync` left it: its rowid, the hash of its stored bytes, and the id
/// of its mapping (`None` for a skipped row).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RowMark {
    pub rowid: i64,
    pub hash: u64,
    pub id: Option<Box<str>>,
}

/// A [`RowMark`] borrowed from the reader's memo: serialised exactly as a [`RowMark`] is.
#[derive(Debug, serde::Serialize)]
pub struct RowMarkRef<'a> {
    pub rowid: i64,
    pub hash: u64,
    pub id: Option<&'a str>,
}

/// What [`SqliteSource::read_marked`] found.
pub struct MarkedRead {
    /// The files' fingerprint, taken before the read.
    pub fingerprint: Fingerprint,
    /// Every row now, in rowid order.
    pub marks: Vec<RowMark>,
    /// The mappings of new and changed rows.
    pub fresh: Vec<Arc<Mapping>>,
    /// The ids of rows that changed or went (a changed row's id may be among `fresh` again).
    pub gone: Vec<Box<str>>,
    /// Every prompt mapping.
    pub prompts: Vec<Arc<Mapping>>,
    /// Whether a new or changed row is stored under another id than its mapping's (it may
    /// share its id with another row: only a whole read can tell which one wins).
    pub aliased: bool,
}

/// [`SqliteSource::read_marked`]'s walk: a merge of the rows with `previous`.
/// `false` when `stop` was set.
fn walk_marked(
    conn: &Connection,
    previous: Vec<RowMark>,
    rules: &mut Normalizer,
    out: &mut MarkedRead,
    stop: &AtomicBool,
) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare(&select_rows("ORDER BY rowid"))?;
    let mut rows = stmt.query([])?;
    let mut before = previous.into_iter().peekable();
    while let Some(r) = rows.next()? {
        if out.marks.len() % 4096 == 0 && stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let (rowid, hash): (i64, u64) = (r.get(0)?, row_hash(r)?);
        while let Some(old) = before.next_if(|m| m.rowid < rowid) {
            out.gone.extend(old.id);
        }
        let old = before.next_if(|m| m.rowid == rowid);
        if let Some(old) = old.as_ref().filter(|m| m.hash == hash) {
            out.marks.push(old.clone());
            continue;
        }
        out.gone.extend(old.and_then(|m| m.id));
        let candidate = rules.mapping_row(&MappingRow::read(r, 1)?);
        let id = candidate.as_ref().map(|c| c.mapping.id().into());
        if let Some(c) = candidate {
            out.aliased |= c.stored_id.is_some();
            out.fresh.push(c.mapping);
        }
        out.marks.push(RowMark { rowid, hash, id });
    }
    for old in before {
        out.gone.extend(old.id);
    }
    Ok(true)
}

/// Where a read reports what it builds and what it drops.
struct Changes<'a, 't> {
    rules: &'a mut Normalizer,
    stored_ids: &'a mut FxHashMap<i64, Box<str>>,
    delta: &'a mut Delta,
    /// Sees each fresh mapping as it is built ([`SqliteSource::read_tapped`]).
    tap: Option<&'a mut Tap<'t>>,
}

/// What [`SqliteSource::read_tapped`] hands each mapping to: the mapping, and whether its row
/// is stored under another id.
pub type Tap<'t> = dyn FnMut(&Arc<Mapping>, bool) + 't;

impl Changes<'_, '_> {
    /// The mapping of a row that is new or changed (`None`: skipped).
    fn fresh(
        &mut self,
        rowid: i64,
        row: &rusqlite::Row<'_>,
    ) -> rusqlite::Result<Option<Arc<Mapping>>> {
        let Some(c) = self.rules.mapping_row(&MappingRow::read(row, 1)?) else {
            return Ok(None);
        };
        if let Some(tap) = self.tap.as_mut() {
            tap(&c.mapping, c.stored_id.is_some());
        }
        if let Some(stored) = c.stored_id {
            self.stored_ids.insert(rowid, stored);
        }
        self.delta.fresh.push(c.mapping.clone());
        Ok(Some(c.mapping))
    }

    /// A row's previous mapping, replaced or removed.
    fn gone(&mut self, rowid: i64, mapping: Option<Arc<Mapping>>) {
        self.stored_ids.remove(&rowid);
        if let Some(m) = mapping {
            self.delta.gone.push(m);
        }
    }
}

/// The statement both reads step through: the rowid, then [`MAPPING_COLUMNS`].
fn select_rows(filter: &str) -> String {
    format!("SELECT rowid, {MAPPING_COLUMNS} FROM llm_model_mappings {filter}")
}

/// Walks every row in rowid order beside `marks` (also in rowid order), updating them in
/// place: a merge, not a lookup, and no second memo while the first is alive.
fn walk(
    conn: &Connection,
    marks: &mut Vec<Mark>,
    changes: &mut Changes<'_, '_>,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&select_rows("ORDER BY rowid"))?;
    let mut rows = stmt.query([])?;
    let known = marks.len();
    let mut i = 0;
    let mut removed = Vec::new();
    let mut between = Vec::new();
    while let Some(r) = rows.next()? {
        let (rowid, hash): (i64, u64) = (r.get(0)?, row_hash(r)?);
        while i < known && marks[i].rowid < rowid {
            removed.push(i);
            i += 1;
        }
        if i < known && marks[i].rowid == rowid {
            let mark = &mut marks[i];
            if mark.hash != hash {
                changes.gone(rowid, mark.mapping.take());
                mark.mapping = changes.fresh(rowid, r)?;
                mark.hash = hash;
            }
            i += 1;
        } else {
            let mark = Mark {
                rowid,
                hash,
                mapping: changes.fresh(rowid, r)?,
            };
            if i < known {
                between.push(mark);
            } else {
                marks.push(mark);
            }
        }
    }
    removed.extend(i..known);
    settle(marks, removed, between, changes);
    // A first walk grows the marks by doubling: give back what a table of this size does not
    // need (a realloc of a mapped block, no copy).
    if marks.capacity() > marks.len() + marks.len() / 8 + 64 {
        marks.shrink_to_fit();
    }
    Ok(())
}

/// Removes the marks at `removed` (ascending indexes) and puts `between` (marks of rows that
/// appeared between known ones) in their place in rowid order.
fn settle(
    marks: &mut Vec<Mark>,
    removed: Vec<usize>,
    between: Vec<Mark>,
    changes: &mut Changes<'_, '_>,
) {
    if !removed.is_empty() {
        for &i in &removed {
            let rowid = marks[i].rowid;
            changes.gone(rowid, marks[i].mapping.take());
        }
        let mut index = 0;
        let mut next = removed.iter().peekable();
        marks.retain(|_| {
            let gone = next.next_if_eq(&&index).is_some();
            index += 1;
            !gone
        });
    }
    if !between.is_empty() {
        marks.extend(between);
        marks.sort_unstable_by_key(|m| m.rowid);
    }
}

/// A watermark read (see the module doc): the rows stamped at or after `watermark`, then the
/// count check, and the rowids compared when the counts differ.
fn read_since(
    conn: &Connection,
    watermark: &str,
    marks: &mut Vec<Mark>,
    changes: &mut Changes<'_, '_>,
) -> rusqlite::Result<()> {
    let count: i64 = conn.query_row("SELECT count(*) FROM llm_model_mappings", [], |r| r.get(0))?;
    let mut stmt = conn.prepare(&select_rows("WHERE updated_at >= ?1 ORDER BY rowid"))?;
    let mut rows = stmt.query([watermark])?;
    let mut between = Vec::new();
    while let Some(r) = rows.next()? {
        let (rowid, hash): (i64, u64) = (r.get(0)?, row_hash(r)?);
        match marks.binary_search_by_key(&rowid, |m| m.rowid) {
            Ok(i) => {
                let mark = &mut marks[i];
                if mark.hash != hash {
                    changes.gone(rowid, mark.mapping.take());
                    mark.mapping = changes.fresh(rowid, r)?;
                    mark.hash = hash;
                }
            }
            Err(i) => {
                let mark = Mark {
                    rowid,
                    hash,
                    mapping: changes.fresh(rowid, r)?,
                };
                if i == marks.len() {
                    marks.push(mark);
                } else {
                    between.push(mark);
                }
            }
        }
    }
    settle(marks, Vec::new(), between, changes);
    if u64::try_from(count).ok() != Some(marks.len() as u64) {
        reconcile_rowids(conn, marks, changes)?;
    }
    Ok(())
}

/// After a count that differs from the memo's: drops the marks of rows that are gone, and
/// reads the rows the memo lacks (inserted without a newer `updated_at`), by rowid.
fn reconcile_rowids(
    conn: &Connection,
    marks: &mut Vec<Mark>,
    changes: &mut Changes<'_, '_>,
) -> rusqlite::Result<()> {
    // Any order (SQLite answers from its smallest index), sorted here.
    let mut present: Vec<i64> = conn
        .prepare("SELECT rowid FROM llm_model_mappings")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    present.sort_unstable();
    let (mut removed, mut missing) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < marks.len() || j < present.len() {
        match (marks.get(i).map(|m| m.rowid), present.get(j)) {
            (Some(a), Some(&b)) if a == b => (i, j) = (i + 1, j + 1),
            (Some(a), Some(&b)) if a < b => {
                removed.push(i);
                i += 1;
            }
            (Some(_), Some(&b)) | (None, Some(&b)) => {
                missing.push(b);
                j += 1;
            }
            (Some(_), None) => {
                removed.push(i);
                i += 1;
            }
            (None, None) => break,
        }
    }
    drop(present);
    let mut between = Vec::with_capacity(missing.len());
    let mut stmt = conn.prepare(&select_rows("WHERE rowid = ?1"))?;
    for rowid in missing {
        let mut rows = stmt.query([rowid])?;
        if let Some(r) = rows.next()? {
            between.push(Mark {
                rowid,
                hash: row_hash(r)?,
                mapping: changes.fresh(rowid, r)?,
            });
        }
    }
    settle(marks, removed, between, changes);
    Ok(())
}

/// The newest `updated_at` stored as text, ignoring values more than an hour ahead of this
/// machine's clock (a stamp far in the future would otherwise hide every later save), cut to
/// the second when it starts like a timestamp (`…T10:17:10+00:00`, `…T10:17:10Z` and
/// `…T10:17:10.5+00:00` all sort at or after `…T10:17:10`). `None` when there is none.
fn newest_stamp(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let cap = (chrono::Utc::now() + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    let newest = conn.query_row(
        "SELECT max(updated_at) FROM llm_model_mappings WHERE updated_at <= ?1",
        [&cap],
        |r| {
            Ok(match r.get_ref(0)? {
                ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_string),
                _ => None,
            })
        },
    )?;
    Ok(newest.map(|w| match w.get(..19) {
        Some(head) if is_second_stamp(head) => head.to_string(),
        _ => w,
    }))
}

/// `YYYY-MM-DDTHH:MM:SS` (or with a space for the `T`).
fn is_second_stamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 19
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T' || c == b' ',
            13 | 16 => c == b':',
            _ => c.is_ascii_digit(),
        })
}

/// Whether a delta changes nothing: every mapping built anew equals one it replaces, by id,
/// and nothing else went.
fn is_noop(delta: &Delta) -> bool {
    if delta.fresh.len() != delta.gone.len() {
        return false;
    }
    let gone: FxHashMap<&str, &Mapping> = delta.gone.iter().map(|m| (m.id(), m.as_ref())).collect();
    gone.len() == delta.gone.len()
        && delta
            .fresh
            .iter()
            .all(|m| gone.get(m.id()).is_some_and(|g| *g == m.as_ref()))
}

/// What the database file and its `-wal` look like from outside: enough to tell that nothing
/// can have committed since, without opening a connection (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    db: FileState,
    wal: Option<FileState>,
    /// The wal-index header in `-shm` (both copies, 96 bytes): a commit's frames reach the
    /// `-wal` before SQLite publishes them there, so a read in between misses the commit
    /// while the `-wal` looks final. Readers' marks, which follow, are left out: reads change
    /// them.
    shm_header: Option<Vec<u8>>,
}

/// (device, inode, size, mtime and, for the database, ctime in ns) and the first bytes of a file: the database header's
/// first 100 bytes (change counter, page count) or the WAL header's 32 (salts, checkpoint
/// sequence).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileState {
    id: (u64, u64),
    size: u64,
    mtime: (i64, i64),
    /// The database's ctime, which moves with every change to the file, its name or its
    /// metadata and cannot be set back (a copy restored with its old mtime still gets a new
    /// one). Not the `-wal`'s: SQLite running as root `fchown`s the `-wal` on every open,
    /// ours included.
    ctime: Option<(i64, i64)>,
    head: Vec<u8>,
}

impl Fingerprint {
    /// The fingerprint of the database at `db` and its `-wal` and `-shm`, now.
    pub fn take(db: &Path) -> Result<Fingerprint, SourceError> {
        let db_state = match FileState::take(db, 100, true) {
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
        let wal = FileState::take(&beside("-wal"), 32, false).ok().flatten();
        let shm_header = FileState::take(&beside("-shm"), 96, false)
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
    fn take(path: &Path, head_len: u64, with_ctime: bool) -> std::io::Result<Option<FileState>> {
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
            ctime: with_ctime.then(|| (meta.ctime(), meta.ctime_nsec())),
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
        Some(Candidate::new(stored_id, self.interner.intern(m)))
    }

    /// A mapping from one prompt, when its `tools_json` holds a `__model_mapping` object.
    fn prompt_row(&mut self, p: &PromptRow<'_>) -> Option<Arc<Mapping>> {
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
        Some(Arc::new(self.interner.intern(m)))
    }
}

struct PromptRow<'a> {
    id: i64,
    name: Option<Cow<'a, str>>,
    version: Option<Cow<'a, str>>,
    category: Option<Cow<'a, str>>,
    tools_json: Option<Cow<'a, str>>,
}

/// The prompts that hold a mapping, as mappings. A missing `ai_prompts` table is fine.
fn read_prompt_rows(
    conn: &Connection,
    rules: &mut Normalizer,
) -> rusqlite::Result<Vec<Arc<Mapping>>> {
    if !table_exists(conn, "ai_prompts")? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT id, name, version, category, tools_json FROM ai_prompts \
         WHERE tools_json LIKE '%__model_mapping%'",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
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
    Ok(out)
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

    /// The application's table with rows `k0…` stamped one second apart from `base`.
    struct App {
        _dir: tempfile::TempDir,
        db: PathBuf,
        conn: Connection,
    }

    impl App {
        fn new(rows: usize) -> App {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("app.sqlite3");
            let conn = Connection::open(&db).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.execute_batch(super::super::schema::APP_SCHEMA)
                .unwrap();
            let app = App {
                _dir: dir,
                db,
                conn,
            };
            for i in 0..rows {
                app.upsert(&format!("k{i}"), "gpt-4o", &stamp(i as i64));
            }
            app
        }

        fn upsert(&self, key: &str, model: &str, updated_at: &str) {
            self.conn
                .execute(
                    "INSERT INTO llm_model_mappings (id, scope_type, scope_key, default_model, updated_at) \
                     VALUES (?1, 'mapping', ?2, ?3, ?4) ON CONFLICT (id) DO UPDATE SET \
                     default_model = excluded.default_model, updated_at = excluded.updated_at",
                    rusqlite::params![format!("mapping:{key}"), key, model, updated_at],
                )
                .unwrap();
        }

        fn delete(&self, key: &str) {
            self.conn
                .execute(
                    "DELETE FROM llm_model_mappings WHERE id = ?1",
                    [format!("mapping:{key}")],
                )
                .unwrap();
        }

        fn source(&self) -> SqliteSource {
            let mut settings = Settings::default();
            settings.source.sqlite_path = self.db.clone();
            SqliteSource::new(&settings.source, Redactor::default())
        }

        /// The mappings as a fresh reader sees them: `id → default_model`.
        fn truth(&self) -> Vec<(String, Option<String>)> {
            models(&self.source().read(ReadMode::Full).unwrap())
        }
    }

    /// `2026-01-16T08:00:00+00:00` plus `secs`.
    fn stamp(secs: i64) -> String {
        (chrono::DateTime::parse_from_rfc3339("2026-01-16T08:00:00+00:00").unwrap()
            + chrono::Duration::seconds(secs))
        .format("%Y-%m-%dT%H:%M:%S+00:00")
        .to_string()
    }

    fn models(image: &SourceImage) -> Vec<(String, Option<String>)> {
        let mut v: Vec<_> = image
            .mappings
            .iter()
            .map(|m| (m.id().to_string(), m.default_model().map(str::to_string)))
            .collect();
        v.sort();
        v
    }

    fn ids(v: &[Arc<Mapping>]) -> Vec<&str> {
        let mut ids: Vec<&str> = v.iter().map(|m| m.id()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_watermark_read_catches_stamped_updates_inserts_and_deletes() {
        let app = App::new(50);
        let mut source = app.source().memoizing();
        source.read(ReadMode::Full).unwrap();
        assert!(!source.needs_walk());
        // Saves stamped after everything read so far, one in the same second as the newest.
        app.upsert("k3", "o4-mini", &stamp(100));
        app.upsert("new", "qwen-max", &stamp(100));
        app.upsert("k49", "kimi-k2", &stamp(49));
        app.delete("k7");
        let rows = source.read_rows(ReadMode::Incremental).unwrap();
        assert!(rows.watermark, "a watermark read");
        let image = source.image_of(rows);
        let delta = image.delta.as_ref().unwrap();
        assert_eq!(
            ids(&delta.fresh),
            ["mapping:k3", "mapping:k49", "mapping:new"]
        );
        assert_eq!(
            ids(&delta.gone),
            ["mapping:k3", "mapping:k49", "mapping:k7"]
        );
        assert_eq!(models(&image), app.truth());
        assert!(source.needs_walk(), "a watermark read is checked by a walk");
        // Nothing new: a read that changes nothing.
        assert!(source.read_rows(ReadMode::Incremental).unwrap().unchanged());
    }

    #[test]
    fn a_row_changed_without_a_new_stamp_is_caught_by_the_next_walk() {
        let app = App::new(20);
        let mut source = app.source().memoizing();
        source.read(ReadMode::Full).unwrap();
        // A hand edit, `mapsync restore`, a late commit: the stamp stays behind the newest.
        app.upsert("k2", "o4-mini", &stamp(2));
        let rows = source.read_rows(ReadMode::Incremental).unwrap();
        assert!(
            rows.watermark && rows.unchanged(),
            "invisible to a watermark read"
        );
        assert!(source.needs_walk());
        let image = source.read(ReadMode::Full).unwrap();
        assert_eq!(ids(&image.delta.unwrap().fresh), ["mapping:k2"]);
        assert!(!source.needs_walk(), "a walk checks everything");
        assert_eq!(models(&source.read(ReadMode::Full).unwrap()), app.truth());
    }

    #[test]
    fn the_count_check_catches_unstamped_inserts_and_deletes() {
        let app = App::new(20);
        let mut source = app.source().memoizing();
        source.read(ReadMode::Full).unwrap();
        // An insert with an old stamp: the count grows.
        app.upsert("restored", "glm-4.6", &stamp(-100));
        let image = source.read(ReadMode::Incremental).unwrap();
        assert_eq!(ids(&image.delta.unwrap().fresh), ["mapping:restored"]);
        assert_eq!(
            models(&source.read(ReadMode::Incremental).unwrap()),
            app.truth()
        );
        // Two deletes, nothing stamped.
        app.delete("k1");
        app.delete("k19");
        let image = source.read(ReadMode::Incremental).unwrap();
        assert_eq!(
            ids(&image.delta.as_ref().unwrap().gone),
            ["mapping:k1", "mapping:k19"]
        );
        assert_eq!(models(&image), app.truth());
        // A delete and an unstamped insert keep the count: only the walk sees them.
        app.delete("k5");
        app.upsert("late", "o4-mini", &stamp(-50));
        let image = source.read(ReadMode::Incremental).unwrap();
        assert_ne!(models(&image), app.truth());
        assert!(source.needs_walk());
        assert_eq!(models(&source.read(ReadMode::Full).unwrap()), app.truth());
    }

    #[test]
    fn a_stamp_far_ahead_of_the_clock_does_not_hide_later_saves() {
        let app = App::new(5);
        app.upsert("future", "gpt-4o", "9999-12-31T23:59:59+00:00");
        app.upsert("junk", "gpt-4o", "zzz");
        let mut source = app.source().memoizing();
        source.read(ReadMode::Full).unwrap();
        app.upsert("k1", "o4-mini", &stamp(1000));
        let image = source.read(ReadMode::Incremental).unwrap();
        assert_eq!(ids(&image.delta.unwrap().fresh), ["mapping:k1"]);
        assert_eq!(
            models(&source.read(ReadMode::Incremental).unwrap()),
            app.truth()
        );
    }

    #[test]
    fn stamps_are_cut_to_the_second() {
        assert!(is_second_stamp("2026-01-16T10:17:10"));
        assert!(is_second_stamp("2026-01-16 10:17:10"));
        assert!(!is_second_stamp("2026-01-16T10:17:1x"));
        assert!(!is_second_stamp("zzz"));
    }

    /// One edit the application (or someone else) makes between two reads.
    #[derive(Debug, Clone)]
    enum Edit {
        /// Saved with a stamp newer than anything before (what the application does).
        Save(u8, u8),
        /// Written with an old stamp (a hand edit, `mapsync restore`).
        Quiet(u8, u8),
        Delete(u8),
    }

    fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<u8>(), any::<u8>()).prop_map(|(k, m)| Edit::Save(k % 30, m % 4)),
            (any::<u8>(), any::<u8>()).prop_map(|(k, m)| Edit::Quiet(k % 30, m % 4)),
            any::<u8>().prop_map(|k| Edit::Delete(k % 30)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 48, ..Default::default() })]

        /// Whatever the edits, watermark reads followed by a walk leave the reader exactly
        /// where a fresh reader is; and when every edit was stamped anew, the watermark reads
        /// alone do.
        #[test]
        fn watermark_reads_and_the_walk_see_what_a_fresh_read_sees(
            rounds in proptest::collection::vec(proptest::collection::vec(edit(), 0..10), 1..5),
        ) {
            let app = App::new(20);
            let mut source = app.source().memoizing();
            source.read(ReadMode::Full).unwrap();
            let mut clock = 1000;
            let model = |m: u8| ["gpt-4o", "o4-mini", "qwen-max", "kimi-k2"][m as usize];
            let mut all_stamped = true;
            for round in &rounds {
                for e in round {
                    match *e {
                        Edit::Save(k, m) => {
                            clock += 1;
                            app.upsert(&format!("k{k}"), model(m), &stamp(clock / 3));
                        }
                        Edit::Quiet(k, m) => {
                            all_stamped = false;
                            app.upsert(&format!("k{k}"), model(m), &stamp(-1));
                        }
                        Edit::Delete(k) => app.delete(&format!("k{k}")),
                    }
                }
                let image = source.read(ReadMode::Incremental).unwrap();
                if all_stamped {
                    proptest::prop_assert_eq!(models(&image), app.truth());
                }
            }
            let image = source.read(ReadMode::Full).unwrap();
            proptest::prop_assert_eq!(models(&image), app.truth());
        }
    }
}
