//! `mapsync sync` without a scan when nothing needs one (issue 13): the state file that one
//! run leaves for the next, beside the snapshots, and [`run_checked`], the run that uses it.
//!
//! The state holds what the last run left: the SQLite files' fingerprint and every row's
//! rowid, hash of its stored bytes and mapping id (the source side), and the mirror's rows as
//! id → digest with the mirror's [`RemoteFingerprint`] taken at the end of that run's
//! transaction (the remote side). A run:
//! 1. starts on the file at once, beside the connection: against the state (its rows
//!    decoded, the files' fingerprint compared, a walk), or, without a state, reading every
//!    row ([`Reading`]); then opens its transaction in `REPEATABLE READ` with the advisory
//!    lock ([`crate::postgres::Session::try_begin_checked`]) and takes the mirror's
//!    fingerprint, in one round trip;
//! 2. when it equals the state's, the mirror holds exactly the state's rows: no scan. Then,
//!    when the files' fingerprint equals the state's too, nothing is read either; when it
//!    moved, a walk beside the state's rows normalises only the rows that changed;
//! 3. otherwise (no state, `--full`, another writer, a hand edit, a fingerprint that moved)
//!    it reads every row and scans the mirror, as a full run always did; when the mirror is
//!    empty (a cold load) there is nothing to scan, and each mapping goes into a COPY as soon
//!    as the read builds it ([`cold`]);
//! 4. writes, deletes, takes the fingerprint again when it wrote (its own writes included:
//!    one snapshot for the whole run; after a cold load, worked out from one row, see
//!    [`Txn::fingerprint_of_one_copy`]) and commits; and replaces the state file (mode
//!    0600; sha-256, the key, the rows, the mirror's fingerprint), written from where the
//!    run holds its rows ([`Leaving`]) as soon as it knows them: a cold load's during its
//!    COPY, the others' during their last round trips; the fingerprint, known last, ends
//!    the file once COMMIT has answered ([`Writing`]).
//!
//! Invariants — a state never makes a run skip a change:
//! - the remote side is only trusted when the fingerprint matches; any insert, update or
//!   delete by anyone (triggers off included) changes it, and a row that someone changes
//!   while the run holds its snapshot fails the run (`REPEATABLE READ`), so a state never
//!   describes a mirror that moved unseen; a state is put in place only once its run has
//!   committed (a run that only deleted rows adds no transaction id to the fingerprint: a
//!   state of one whose COMMIT failed could match a mirror someone else deleted as many
//!   rows from);
//! - the source side is only trusted row by row: a row is reused only with the same rowid
//!   and the same hash of its stored bytes; the files' fingerprint (with the database's ctime:
//!   a restored copy gets a new one) only skips the read as a whole;
//! - a missing, unreadable, corrupt (checksum) or foreign state (another format, mapsync
//!   version, table, target, instance, SQLite file or settings that shape a mapping) is no
//!   state: the run is a full one. Ids shared by two rows, rows stored under another id, and
//!   mappings Postgres refused also send the next run down the full path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use foldhash::HashSet as FxHashSet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    Counts, Limits, Ran, SYNCED, SyncError, SyncOptions, SyncReport, Trigger, guard, refuse,
};
use crate::appdb::{Fingerprint, MarkedRead, ReadMode, RowMark, SourceError, SqliteSource};
use crate::config::Settings;
use crate::mapping::Mapping;
use crate::postgres::{RemoteFingerprint, Target, Txn, digest};

/// The state file's name in `snapshot.dir` (no snapshot name: never listed, served or
/// deleted by retention).
pub const STATE_FILE: &str = ".mapsync-sync-state";

/// Bumped when the layout or meaning of the state changes.
const FORMAT: u32 = 3;

/// What a state must have been written for to be used: anything that changes which rows a
/// mapping is read from, what it is, or where it is mirrored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateKey {
    format: u32,
    version: String,
    table: String,
    target: String,
    instance: String,
    sqlite_path: PathBuf,
    include_prompts: bool,
    redact_keys: Vec<String>,
    /// Digests of a fixed mapping and row: a build whose hashes differ finds no match.
    canary: u64,
}

impl StateKey {
    pub fn of(settings: &Settings, target: &Target) -> StateKey {
        let canary = crate::mapping::Mapping::new(crate::mapping::Fields {
            scope_type: "mapping",
            scope_key: "canary",
            metadata: "{}",
            ..Default::default()
        });
        StateKey {
            format: FORMAT,
            version: env!("CARGO_PKG_VERSION").into(),
            table: target.table().to_string(),
            target: target.display().into(),
            instance: target.instance_name().into(),
            sqlite_path: settings.source.sqlite_path.clone(),
            include_prompts: settings.source.include_prompt_mappings,
            redact_keys: settings.snapshot.redact_keys.clone(),
            canary: digest(&canary),
        }
    }
}

/// What the last run left (see the module doc), as read back ([`Leaving`] writes it).
#[derive(Debug, Clone, Deserialize)]
pub struct SyncState {
    source_fp: Fingerprint,
    /// Every row of `llm_model_mappings`, in rowid order.
    rows: Vec<RowMark>,
    /// The prompt mappings' ids.
    prompt_ids: Vec<Box<str>>,
    /// The mirror's rows: id → digest, sorted by id.
    remote: Vec<(Box<str>, u64)>,
    /// Remote ids the source does not have.
    extras: Vec<Box<str>>,
    /// Whether the source had ids shared by two rows, or Postgres refused a mapping: then
    /// only a full run can say what to write.
    full_next: bool,
}

/// The length of the checksum that opens a state file.
const SUM_LEN: usize = 32;

/// The length of the number that ends a state file: how long the fingerprint before it is.
const TAIL_LEN: usize = 4;

/// A state file whose key matched (a file is: sha-256 over the rest, the [`StateKey`], the
/// [`SyncState`], the mirror's [`RemoteFingerprint`], that fingerprint's length in four
/// bytes, little-endian; the fingerprint comes last because a run knows it last). The rows
/// (100,000 rows' worth) are only checked and decoded when the mirror's fingerprint matches
/// too, so a run that cannot use them (a cold load, another writer) does not pay for it.
pub struct StoredState {
    remote_fp: RemoteFingerprint,
    bytes: Vec<u8>,
    body: std::ops::Range<usize>,
}

impl StoredState {
    /// The state, when the file is whole.
    pub fn open(self) -> Result<SyncState, StateError> {
        let (sum, rest) = self.bytes.split_at(SUM_LEN);
        if Sha256::digest(rest).as_slice() != sum {
            return Err(StateError::Corrupt);
        }
        postcard::from_bytes(&self.bytes[self.body]).map_err(|_| StateError::Corrupt)
    }
}

/// The mirror's fingerprint at the end of a state file whose rows start at `body_at`, and
/// where it starts.
fn read_tail(bytes: &[u8], body_at: usize) -> Option<(usize, RemoteFingerprint)> {
    let len_at = bytes.len().checked_sub(TAIL_LEN)?;
    let len = u32::from_le_bytes(bytes[len_at..].try_into().ok()?);
    let at = len_at
        .checked_sub(usize::try_from(len).ok()?)
        .filter(|&at| at >= body_at)?;
    Some((at, postcard::from_bytes(&bytes[at..len_at]).ok()?))
}

/// A postcard output that hashes what it writes (sha-256) and writes it in 64 KiB blocks.
struct HashingWriter<'a, W> {
    out: W,
    sum: Sha256,
    block: Vec<u8>,
    /// Where a failed write leaves its error (postcard's own error cannot carry it).
    failed: &'a mut Option<std::io::Error>,
}

/// The size of a [`HashingWriter`]'s blocks.
const BLOCK: usize = 64 * 1024;

impl<'a, W: std::io::Write> HashingWriter<'a, W> {
    fn new(out: W, failed: &'a mut Option<std::io::Error>) -> Self {
        HashingWriter {
            out,
            sum: Sha256::new(),
            block: Vec::with_capacity(BLOCK),
            failed,
        }
    }

    fn drain(&mut self) -> std::io::Result<()> {
        self.sum.update(&self.block);
        self.out.write_all(&self.block)?;
        self.block.clear();
        Ok(())
    }

    /// Writes what is left and gives the hash of everything written, to go on with.
    fn finish(mut self) -> std::io::Result<Sha256> {
        self.drain()?;
        Ok(self.sum)
    }
}

impl<W: std::io::Write> postcard::ser_flavors::Flavor for HashingWriter<'_, W> {
    type Output = Self;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.block.extend_from_slice(data);
        if self.block.len() >= BLOCK {
            if let Err(e) = self.drain() {
                *self.failed = Some(e);
                return Err(postcard::Error::SerializeBufferFull);
            }
        }
        Ok(())
    }

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.try_extend(&[byte])
    }

    fn finalize(self) -> postcard::Result<Self> {
        Ok(self)
    }
}

/// Why the state was not used (for the log).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no state file")]
    Missing,
    #[error("state file unreadable ({0})")]
    Io(String),
    #[error("state file damaged (checksum or format)")]
    Corrupt,
    #[error(
        "state file written for another table, target, instance, SQLite file, settings or mapsync version"
    )]
    Foreign,
}

impl SyncState {
    pub fn path(settings: &Settings) -> PathBuf {
        settings.snapshot.dir.join(STATE_FILE)
    }

    /// The state at `path`, if it was written for `key`: only its key and the mirror's
    /// fingerprint are read now (see [`StoredState`]).
    pub fn load(path: &Path, key: &StateKey) -> Result<StoredState, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::Missing),
            Err(e) => return Err(StateError::Io(e.to_string())),
        };
        let after_sum = bytes.get(SUM_LEN..).ok_or(StateError::Corrupt)?;
        let (written_for, rest): (StateKey, &[u8]) =
            postcard::take_from_bytes(after_sum).map_err(|_| StateError::Corrupt)?;
        if &written_for != key {
            return Err(StateError::Foreign);
        }
        let body_at = bytes.len() - rest.len();
        let (tail_at, remote_fp) = read_tail(&bytes, body_at).ok_or(StateError::Corrupt)?;
        Ok(StoredState {
            remote_fp,
            bytes,
            body: body_at..tail_at,
        })
    }

    fn remote_digest(&self, id: &str) -> Option<u64> {
        digest_in(&self.remote, id)
    }
}

/// What a run leaves for the next: written by [`Leaving::write_rows`] and read back as a
/// [`SyncState`] (the same fields in the same order, encoded alike), with the rows and the
/// mirror's rows taken from where the run has them instead of copied: at 1,000,000 rows the
/// copies of their ids were ~100 MiB.
#[derive(Serialize)]
struct Leaving {
    /// Written before the rows, not again among them.
    #[serde(skip)]
    key: StateKey,
    source_fp: Fingerprint,
    rows: LeftRows,
    prompt_ids: Vec<Box<str>>,
    remote: LeftRemote,
    extras: Vec<Box<str>>,
    full_next: bool,
}

/// The rows a run leaves: a list (the state's, a walk's) or the reader's memo after a read
/// of every row.
enum LeftRows {
    Listed(Vec<RowMark>),
    Memo(Box<SqliteSource>),
}

/// The mirror's rows a run leaves, sorted by id: a list, or what a cold load sent.
enum LeftRemote {
    Listed(Vec<(Box<str>, u64)>),
    Sent(Sent),
}

impl Serialize for LeftRows {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LeftRows::Listed(rows) => rows.serialize(s),
            LeftRows::Memo(source) => s.collect_seq(source.marks()),
        }
    }
}

impl Serialize for LeftRemote {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LeftRemote::Listed(rows) => rows.serialize(s),
            LeftRemote::Sent(sent) => s.collect_seq(sent.iter().map(|(m, d)| (m.id(), *d))),
        }
    }
}

impl Leaving {
    /// Starts the state file: a temporary file (0600) in the snapshot directory (created
    /// 0700 when needed) with the key and the rows; [`Unfinished::finish`] ends it with the
    /// mirror's fingerprint and puts it in place ([`crate::snapshot::Replacement`], not
    /// durable): after a crash there is no state, the old one, the new one, or one that fails
    /// its checksum, and each is safe (see the module doc). Encoded straight into the file
    /// and hashed on the way: the state is never copied whole in memory (at 1,000,000 rows
    /// the copy was 120 MiB).
    fn write_rows(&self, path: &Path) -> Result<Unfinished, crate::snapshot::SnapshotError> {
        use std::io::Write;
        crate::snapshot::private_dir(crate::parent_dir(path))?;
        let mut out = crate::snapshot::Replacement::start(path, false)?;
        let written = (|| {
            let f = out.file();
            f.write_all(&[0; SUM_LEN])?;
            let mut failed = None;
            let hashing = HashingWriter::new(&mut *f, &mut failed);
            match postcard::serialize_with_flavor(&self.key, hashing)
                .and_then(|hashing| postcard::serialize_with_flavor(self, hashing))
            {
                Ok(hashing) => hashing.finish(),
                Err(e) => Err(failed.unwrap_or_else(|| std::io::Error::other(e))),
            }
        })();
        let sum = written.map_err(|e| out.error(e))?;
        Ok(Unfinished { out, sum })
    }
}

/// A state file with its key and rows written, not in place yet (dropped, it is removed).
struct Unfinished {
    out: crate::snapshot::Replacement,
    /// The hash of everything after the checksum, so far.
    sum: Sha256,
}

impl Unfinished {
    /// Writes the mirror's fingerprint and the checksum, and puts the file in place.
    fn finish(
        mut self,
        remote_fp: &RemoteFingerprint,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        use std::io::{Seek, SeekFrom, Write};
        let mut tail = postcard::to_allocvec(remote_fp)
            .map_err(|e| self.out.error(std::io::Error::other(e)))?;
        let len = u32::try_from(tail.len()).unwrap_or(u32::MAX);
        tail.extend_from_slice(&len.to_le_bytes());
        self.sum.update(&tail);
        let sum: [u8; SUM_LEN] = self.sum.finalize().into();
        let f = self.out.file();
        let written = f
            .write_all(&tail)
            .and_then(|()| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(&sum));
        written.map_err(|e| self.out.error(e))?;
        self.out.finish()
    }
}

/// The state file on its way, on the blocking pool: its rows are written as soon as the run
/// knows them, beside the rest of the run (a cold load's COPY, the others' last round trips),
/// and the mirror's fingerprint, known last, ends it once the run has committed
/// ([`Writing::finish`]). The old state file goes when its rows start (see
/// [`crate::snapshot::Replacement`]): dropped instead (a run that failed, or a cold load
/// refused by a guard), it leaves none, and the next run is a full one; its temporary file
/// is removed before anything else, or by the next run should this process exit first.
/// Then what the state was written from (the
/// reader's memo holds the last references to every mapping read) is freed there, off the
/// run's path.
struct Writing {
    fingerprint: tokio::sync::oneshot::Sender<RemoteFingerprint>,
    placed: tokio::sync::oneshot::Receiver<()>,
}

impl Writing {
    /// Writes to `file` the [`Leaving`] that `leaving` makes for its key (on the blocking
    /// pool too).
    fn start(
        file: &StateFile,
        leaving: impl FnOnce(StateKey) -> Leaving + Send + 'static,
    ) -> Writing {
        let (fingerprint, known) = tokio::sync::oneshot::channel::<RemoteFingerprint>();
        let (placed_tx, placed) = tokio::sync::oneshot::channel();
        let StateFile { path, key } = file.clone();
        tokio::task::spawn_blocking(move || {
            use tokio::sync::oneshot::error::TryRecvError;
            let mut known = known;
            let leaving = leaving(key);
            let early = known.try_recv();
            // Not written at all when the run already let it go.
            if !matches!(early, Err(TryRecvError::Closed)) {
                let rows = leaving.write_rows(&path);
                let remote_fp = match early {
                    Ok(remote_fp) => Ok(remote_fp),
                    Err(_) => known.blocking_recv(),
                };
                match remote_fp {
                    Ok(remote_fp) => {
                        if let Err(e) = rows.and_then(|rows| rows.finish(&remote_fp)) {
                            tracing::warn!("the next run will be a full one: {e}");
                        }
                    }
                    // The temporary file goes first, in case the process exits meanwhile.
                    Err(_) => drop(rows),
                }
            }
            let _ = placed_tx.send(());
            drop(leaving);
        });
        Writing {
            fingerprint,
            placed,
        }
    }

    /// Ends the file with the mirror's fingerprint and waits until it is in place (a failure
    /// is logged: the next run is then a full one).
    async fn finish(self, remote_fp: RemoteFingerprint) {
        if self.fingerprint.send(remote_fp).is_ok() {
            let _ = self.placed.await;
        }
    }
}

/// Where a run's state goes, and whom it is for.
#[derive(Clone)]
struct StateFile {
    path: PathBuf,
    key: StateKey,
}

/// What a [`Mode::OneShot`](super::Mode::OneShot) run needs: the reader, the state file and
/// the state it holds (when there is one and the run is not `--full`).
pub struct OneShot {
    source: SqliteSource,
    file: StateFile,
    state: Option<StoredState>,
}

impl OneShot {
    /// For `mapsync sync` into `target`; `full` ignores the state on disk.
    pub fn new(settings: &Settings, target: &Target, full: bool) -> OneShot {
        let path = SyncState::path(settings);
        let key = StateKey::of(settings, target);
        let state = if full {
            None
        } else {
            SyncState::load(&path, &key)
                .inspect_err(|why| tracing::debug!(file = %path.display(), "a full run: {why}"))
                .ok()
        };
        let source = SqliteSource::new(
            &settings.source,
            crate::mapping::Redactor::new(&settings.snapshot.redact_keys),
        );
        OneShot {
            source,
            file: StateFile { path, key },
            state,
        }
    }
}

/// What the source side of a run found, with the state it was read against.
enum Source {
    /// The files did not change since the state.
    Same(SyncState),
    /// A walk beside the state's rows.
    Walked(MarkedRead, SyncState),
    /// Every row read (image, the fingerprint before the read, contested; the rows' marks
    /// stay in the reader's memo), and the state when its mirror still holds. `mappings` is
    /// empty after a cold load that wrote every one (the state needs only their count and
    /// prompt ids).
    Whole {
        mappings: Vec<Arc<Mapping>>,
        synced: u64,
        prompt_ids: Vec<Box<str>>,
        fingerprint: Fingerprint,
        contested: bool,
        known: Option<SyncState>,
    },
}

/// One `mapsync sync` with the state (see the module doc), and the new state written (a run
/// refused before it loaded anything, or one that found nothing to read or write, leaves the
/// old one: it changed nothing the old one describes wrongly). Never a dry run (those are
/// full runs).
pub(super) async fn run_checked(
    target: &Target,
    limits: Limits,
    opts: SyncOptions,
    one: OneShot,
) -> Result<Ran, SyncError> {
    let started = Instant::now();
    let OneShot {
        source,
        file,
        state,
    } = one;
    // The state keeps the rows a read leaves in the memo.
    let source = source.memoizing();
    // The file is worked out while Postgres is connected to and asked about the mirror:
    // the state's side of it, or, without a state, every row (a run without one reads them
    // all, into a cold load's COPY or for a full comparison).
    let ahead = match state {
        Some(stored) => {
            Ahead::Speculation(Speculation::start(stored, source.fresh()), Box::new(source))
        }
        None => Ahead::Reading(Reading::start(source)),
    };
    let mut session = target.session().await?;
    loop {
        let Some((txn, fingerprint)) = session.try_begin_checked().await? else {
            session.wait_for_lock().await?;
            continue;
        };
        return in_transaction(txn, fingerprint, limits, opts, &file, ahead, started).await;
    }
}

/// The source side, started before the run's transaction.
enum Ahead {
    /// Against a state, with the reader for a run that cannot use it.
    Speculation(Speculation, Box<SqliteSource>),
    /// Every row (no state).
    Reading(Reading),
}

/// The source side of a run against a state, read before the run knows whether the mirror
/// is still as the state says ([`Speculation::start`]); stopped when it is not.
struct Speculation {
    remote_fp: RemoteFingerprint,
    /// Stops the walk when the speculation is dropped unused (a mirror that moved, or a run
    /// that failed before it could ask), so that it does not hold the process's exit.
    _stop: StopOnDrop,
    task: tokio::task::JoinHandle<Result<Option<(SqliteSource, Source)>, SourceError>>,
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Speculation {
    fn start(stored: StoredState, source: SqliteSource) -> Speculation {
        let remote_fp = stored.remote_fp.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::task::spawn_blocking(move || read_against(stored, source, &stopped));
        Speculation {
            remote_fp,
            _stop: StopOnDrop(stop),
            task,
        }
    }

    /// The source side, when the mirror's fingerprint is the state's and the state is whole
    /// (dropping `self` otherwise stops the walk).
    async fn take(
        self,
        fingerprint: &RemoteFingerprint,
    ) -> Result<Option<(SqliteSource, Source)>, SyncError> {
        if self.remote_fp != *fingerprint {
            tracing::debug!("a full run: the mirror changed since the last run");
            return Ok(None);
        }
        joined(self.task).await
    }
}

/// The source side against a stored state: the files unchanged since it (no read), a walk
/// beside its rows, or every row (ids that may collide). `None` when the state is damaged or
/// `stop` was set.
fn read_against(
    stored: StoredState,
    mut source: SqliteSource,
    stop: &AtomicBool,
) -> Result<Option<(SqliteSource, Source)>, SourceError> {
    let mut k = match stored.open() {
        Ok(k) => k,
        Err(why) => {
            tracing::debug!("a full run: {why}");
            return Ok(None);
        }
    };
    if stop.load(Ordering::Relaxed) {
        // Not needed (the mirror moved, e.g. emptied for a cold load, which is reading on
        // another thread and so from the allocator's other arena): what the decoding took
        // (217 MiB at 1,000,000 rows) goes back to the system at once instead of sitting
        // beside the new read's memory.
        drop(k);
        crate::release_free_memory();
        return Ok(None);
    }
    if !k.full_next {
        if source.fingerprint()? == k.source_fp {
            return Ok(Some((source, Source::Same(k))));
        }
        let rows = std::mem::take(&mut k.rows);
        let Some(read) = source.read_marked(rows, stop)? else {
            return Ok(None);
        };
        if !read.aliased {
            return Ok(Some((source, Source::Walked(read, k))));
        }
    }
    if stop.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let read = read_whole(&mut source, Some(k))?;
    Ok(Some((source, read)))
}

/// The run, once its transaction is open and the mirror's `fingerprint` known.
async fn in_transaction(
    txn: Txn<'_>,
    fingerprint: RemoteFingerprint,
    limits: Limits,
    opts: SyncOptions,
    file: &StateFile,
    ahead: Ahead,
    started: Instant,
) -> Result<Ran, SyncError> {
    // An empty mirror (this transaction's snapshot says so): nothing to scan, and every
    // mapping can go into a COPY while the file is still being read.
    let empty = fingerprint.rows == 0;
    let found = match ahead {
        Ahead::Speculation(speculation, source) => match speculation.take(&fingerprint).await? {
            Some((source, read)) => {
                tracing::debug!("the mirror is as the last run left it: no scan");
                Found::Read(source, read)
            }
            None if empty => cold(&txn, Reading::start(*source), file).await?,
            None => {
                let (source, read) = whole(*source, None).await?;
                Found::Read(source, read)
            }
        },
        Ahead::Reading(reading) if empty => cold(&txn, reading, file).await?,
        Ahead::Reading(reading) => {
            let (source, read) = reading.whole().await?;
            Found::Read(source, read)
        }
    };
    let (source, read) = match found {
        Found::Loaded(loaded) => {
            return end_cold_load(txn, limits, opts, loaded, started).await;
        }
        Found::Read(source, read) => (source, read),
    };
    let (source, read) = match read {
        Source::Walked(w, k) if collides(&w) => whole(source, Some(k)).await?,
        r => (source, r),
    };
    let remote_before = fingerprint.rows as u64;

    let mut plan = match &read {
        Source::Same(k) => Plan {
            missing: Vec::new(),
            differing: Vec::new(),
            extras: k.extras.clone(),
            remote: None,
        },
        Source::Walked(w, k) => plan_walked(w, k),
        Source::Whole {
            mappings,
            known: Some(k),
            ..
        } => plan_whole(mappings, &k.remote),
        // An empty mirror that a COPY did not load (nothing to load, or one it could not).
        Source::Whole {
            mappings,
            known: None,
            ..
        } if empty => Plan {
            remote: Some(Vec::new()),
            ..plan_whole(mappings, &[])
        },
        Source::Whole {
            mappings,
            known: None,
            ..
        } => {
            let mut remote: Vec<(Box<str>, u64)> = Vec::new();
            txn.scan(|id, digest| remote.push((id.into(), digest)))
                .await?;
            remote.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let plan = plan_whole(mappings, &remote);
            Plan {
                remote: Some(remote),
                ..plan
            }
        }
    };
    let synced_count = match &read {
        Source::Same(k) => {
            (k.rows.iter().filter(|r| r.id.is_some()).count() + k.prompt_ids.len()) as u64
        }
        Source::Walked(w, _) => {
            (w.marks.iter().filter(|r| r.id.is_some()).count() + w.prompts.len()) as u64
        }
        Source::Whole { synced, .. } => *synced,
    };
    let deletes: Vec<&str> = if opts.delete_missing {
        plan.extras.iter().map(AsRef::as_ref).collect()
    } else {
        Vec::new()
    };
    let mut counts = Counts {
        remote_before: Some(remote_before),
        extra: plan.extras.len() as u64,
        pending: (plan.missing.len() + plan.differing.len() + deletes.len()) as u64,
        ..Default::default()
    };
    if let Some(refusal) = guard(
        &txn,
        limits,
        deletes.len() as u64,
        Some(remote_before),
        opts,
    )
    .await?
    {
        counts.refused = Some(refusal);
        refuse(txn, &counts, false).await?;
        return Ok(ran(&counts, synced_count, opts, started));
    }
    let missing: Vec<&Mapping> = plan.missing.iter().map(AsRef::as_ref).collect();
    let differing: Vec<&Mapping> = plan.differing.iter().map(AsRef::as_ref).collect();
    counts.record(txn.write(&missing, &differing).await?);
    counts.deleted = txn.delete(&deletes).await?;
    let deleted: Vec<Box<str>> = deletes.iter().map(|&d| d.into()).collect();
    let unread = matches!(read, Source::Same(_));
    let wrote = counts.inserted + counts.updated + counts.deleted > 0;
    // The rows as this run leaves them: the state's or the walk's list, or the reader's memo
    // (which then goes with the state; otherwise it is freed off the run's path).
    let (rows, prompt_ids, source_fp, contested, known_remote, spare) = match read {
        Source::Same(k) => (
            LeftRows::Listed(k.rows),
            k.prompt_ids,
            k.source_fp,
            false,
            Some(k.remote),
            Some(source),
        ),
        Source::Walked(w, k) => (
            LeftRows::Listed(w.marks),
            w.prompts.iter().map(|p| p.id().into()).collect(),
            w.fingerprint,
            false,
            Some(k.remote),
            Some(source),
        ),
        Source::Whole {
            prompt_ids,
            fingerprint,
            contested,
            known,
            ..
        } => (
            LeftRows::Memo(Box::new(source)),
            prompt_ids,
            fingerprint,
            contested,
            known.map(|k| k.remote),
            None,
        ),
    };
    if let Some(spare) = spare {
        free_off_path(spare);
    }
    let writing = if unread && !wrote {
        // Nothing read, nothing written: the state on disk still says it all.
        free_off_path((rows, known_remote));
        None
    } else {
        // The mirror now (what it held, with what was written and deleted), worked out on the
        // blocking pool with the state while Postgres takes the fingerprint and commits.
        let base = plan.remote.take().or(known_remote).unwrap_or_default();
        let mut written = std::mem::take(&mut plan.missing);
        written.extend(std::mem::take(&mut plan.differing));
        let rejected: Vec<String> = counts.rejected.iter().map(|r| r.id.clone()).collect();
        let extras: Vec<Box<str>> = if opts.delete_missing {
            Vec::new()
        } else {
            plan.extras
        };
        let full_next = contested || !counts.rejected.is_empty();
        Some(Writing::start(file, move |key| {
            let rejected: FxHashSet<&str> = rejected.iter().map(String::as_str).collect();
            let written = written
                .iter()
                .filter(|m| !rejected.contains(m.id()))
                .map(|m| (Box::<str>::from(m.id()), digest(m)));
            let deleted: Vec<&str> = deleted.iter().map(AsRef::as_ref).collect();
            Leaving {
                key,
                source_fp,
                rows,
                prompt_ids,
                remote: LeftRemote::Listed(merge_remote(base, written, &deleted)),
                extras,
                full_next,
            }
        }))
    };
    // A run that wrote nothing to the table sees it as it was (one snapshot).
    let after = if wrote {
        MirrorAfter::Changed
    } else {
        MirrorAfter::Unchanged(fingerprint)
    };
    commit_leaving(txn, after, writing).await?;
    Ok(ran(&counts, synced_count, opts, started))
}

/// The end of a cold load whose COPY took every mapping: the guards (nothing to delete;
/// refused, the COPY is undone), then the record, the commit and the state.
async fn end_cold_load(
    txn: Txn<'_>,
    limits: Limits,
    opts: SyncOptions,
    loaded: Loaded,
    started: Instant,
) -> Result<Ran, SyncError> {
    let mut counts = Counts {
        remote_before: Some(0),
        pending: loaded.sent,
        ..Default::default()
    };
    if let Some(refusal) = guard(&txn, limits, 0, Some(0), opts).await? {
        txn.settle_streamed(false).await?;
        counts.refused = Some(refusal);
        refuse(txn, &counts, false).await?;
        return Ok(ran(&counts, loaded.synced, opts, started));
    }
    // Kept: the COPY's savepoint ends with the transaction (COMMIT keeps what it holds),
    // without a round trip of its own.
    counts.inserted = loaded.sent;
    let after = MirrorAfter::OneCopy(loaded.sent);
    commit_leaving(txn, after, Some(loaded.writing)).await?;
    Ok(ran(&counts, loaded.synced, opts, started))
}

/// How a run that synced learns what the mirror is once its writes are in.
enum MirrorAfter {
    /// It wrote nothing: as its snapshot saw it.
    Unchanged(RemoteFingerprint),
    /// One COPY of this many rows into a mirror it saw empty.
    OneCopy(u64),
    /// Anything else: asked again.
    Changed,
}

/// Ends a run that synced: its record in the registry goes out with the question for the
/// mirror's fingerprint (the mirror's rows are not the registry's); then COMMIT, and only
/// then is the state file, if the run leaves one, ended with that fingerprint and put in
/// place (its rows are written by then: what is left takes ~0.1 ms).
async fn commit_leaving(
    txn: Txn<'_>,
    after: MirrorAfter,
    writing: Option<Writing>,
) -> Result<(), SyncError> {
    let (recorded, remote_fp) = tokio::join!(txn.record_run(SYNCED, true), async {
        match after {
            MirrorAfter::Unchanged(fingerprint) => Ok(fingerprint),
            MirrorAfter::OneCopy(rows) => txn.fingerprint_of_one_copy(rows).await,
            MirrorAfter::Changed => txn.fingerprint().await,
        }
    });
    recorded?;
    let remote_fp = remote_fp?;
    txn.commit().await?;
    if let Some(writing) = writing {
        writing.finish(remote_fp).await;
    }
    Ok(())
}

fn ran(counts: &Counts, synced_count: u64, opts: SyncOptions, started: Instant) -> Ran {
    Ran {
        report: SyncReport::of_counts(
            counts,
            synced_count,
            0,
            opts,
            Trigger::Manual,
            started.elapsed(),
        ),
        counts: counts.clone(),
    }
}

/// What a run writes.
struct Plan {
    missing: Vec<Arc<Mapping>>,
    differing: Vec<Arc<Mapping>>,
    /// Remote ids the source lacks.
    extras: Vec<Box<str>>,
    /// The mirror's rows before the writes, when scanned by this run (else the state's).
    remote: Option<Vec<(Box<str>, u64)>>,
}

/// The digest of `id` in rows sorted by id.
fn digest_in(rows: &[(Box<str>, u64)], id: &str) -> Option<u64> {
    rows.binary_search_by(|(r, _)| r.as_ref().cmp(id))
        .ok()
        .map(|i| rows[i].1)
}

/// Rows a cold load hands to the COPY at a time.
const COLD_CHUNK: usize = 1024;

/// Rows in a cold load's first chunk: few, so that rows are on their way as soon as the COPY
/// is open (a read that starts with the transaction takes ~2.5 ms for 1,024 rows); Postgres,
/// slower per row than the read, has work from then on.
const FIRST_COLD_CHUNK: usize = 128;

/// What the source side of a run came to (one value per run: the size of its variants does
/// not matter).
#[allow(clippy::large_enum_variant)]
enum Found {
    /// A cold load's COPY took every mapping; the state is on its way.
    Loaded(Loaded),
    /// The rows, for the run to plan its writes from.
    Read(SqliteSource, Source),
}

/// A cold load whose COPY took every mapping.
struct Loaded {
    /// Mappings read (the report's `synced_count`).
    synced: u64,
    /// Rows the COPY wrote.
    sent: u64,
    /// The state, its rows written while Postgres took the COPY in.
    writing: Writing,
}

/// A cold load: the mirror is empty, so every mapping the read (started with the run, see
/// [`Reading`]) builds from a row goes into a COPY at once, while the file is still being
/// read (the two overlap on two cores), and the rest of the image (prompts, rows stored
/// under another id) follows in the same COPY. As soon as the read has sent everything, the
/// state's rows are written, while Postgres still takes the COPY in.
///
/// [`Found::Loaded`] when every mirrorable mapping went in, under a savepoint left open for
/// the guard. What was sent must be exactly the image: when a row that was sent lost its id
/// to another row (only the image can tell), or Postgres refused a row, the savepoint is
/// rolled back, the state being written is dropped, and every mapping takes the ordinary
/// write ([`Found::Read`]).
///
/// Memory: once everything is sent, the image is let go; the state is written from the
/// reader's memo and the sent mappings themselves (ids and digests are not copied: at
/// 1,000,003 mappings the copies peaked at 363 MiB beside the image). In the rare run whose
/// COPY fails after that, the file is read again for the ordinary write.
async fn cold(txn: &Txn<'_>, reading: Reading, file: &StateFile) -> Result<Found, SyncError> {
    /// What the read came to while the COPY went on (one value per run).
    #[allow(clippy::large_enum_variant)]
    enum Sending {
        /// Every mirrorable mapping went out (`rows` of them); `again` reads the file anew
        /// should the COPY not be kept.
        All {
            synced: u64,
            rows: u64,
            writing: Writing,
            again: SqliteSource,
        },
        /// Not every one (or none): the read, whole.
        Part(Found),
    }
    reading.copying.store(true, Ordering::Release);
    let Reading { task, received, .. } = reading;
    let (copied, sending) = tokio::join!(txn.copy_streamed(received), async {
        let (source, read, sent, complete) = joined(task).await?;
        Ok::<_, SyncError>(match read {
            Source::Whole {
                synced,
                prompt_ids,
                fingerprint,
                contested,
                ..
            } if complete && !sent.is_empty() => {
                let rows = sent.len() as u64;
                let again = source.fresh();
                let writing = Writing::start(file, move |key| Leaving {
                    key,
                    source_fp: fingerprint,
                    rows: LeftRows::Memo(Box::new(source)),
                    prompt_ids,
                    remote: LeftRemote::Sent(sent),
                    extras: Vec::new(),
                    full_next: contested,
                });
                Sending::All {
                    synced,
                    rows,
                    writing,
                    again,
                }
            }
            read => Sending::Part(Found::Read(source, read)),
        })
    });
    let copied = copied?;
    // What the COPY wrote when it is not kept.
    let undo = || async {
        match copied {
            Some(_) => txn.settle_streamed(false).await,
            None => Ok(()),
        }
    };
    match sending? {
        Sending::All {
            synced,
            rows,
            writing,
            ..
        } if copied == Some(rows) => Ok(Found::Loaded(Loaded {
            synced,
            sent: rows,
            writing,
        })),
        Sending::All { writing, again, .. } => {
            // The state's writing holds the reader's memo: both go before the file is read
            // again (the image was let go for the COPY).
            drop(writing);
            undo().await?;
            let (source, read) = whole(again, None).await?;
            Ok(Found::Read(source, read))
        }
        Sending::Part(found) => {
            undo().await?;
            Ok(found)
        }
    }
}

/// A read of every row started before the run knows whether the mirror is empty: each
/// mapping is handed to a channel for a cold load's COPY ([`cold`]) as the read builds it,
/// or the channel is dropped and the read is used whole ([`Reading::whole`]).
struct Reading {
    task: tokio::task::JoinHandle<Result<(SqliteSource, Source, Sent, bool), SourceError>>,
    received: tokio::sync::mpsc::Receiver<Vec<Arc<Mapping>>>,
    /// Set once the mappings go into a COPY: only then may the read wait on a full channel,
    /// and let its image go.
    copying: Arc<AtomicBool>,
}

impl Reading {
    fn start(source: SqliteSource) -> Reading {
        let (chunks, received) = tokio::sync::mpsc::channel::<Vec<Arc<Mapping>>>(8);
        let copying = Arc::new(AtomicBool::new(false));
        let flag = copying.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut source = source;
            let mut out = Outbox::new(chunks, flag.clone());
            let fingerprint = source.fingerprint()?;
            let image = source.read_tapped(ReadMode::Full, &mut |m, aliased| {
                if !aliased && m.mirrorable() {
                    out.push(m);
                }
            })?;
            // The rest of the image follows, when every row sent is in it.
            let complete = out.complete(&image.mappings);
            // The COPY ends when the last chunk is in.
            let sent = out.finish();
            let mut read = Source::whole(image.mappings, &source, fingerprint, None);
            if complete && !sent.is_empty() && flag.load(Ordering::Acquire) {
                if let Source::Whole { mappings, .. } = &mut read {
                    // Let go; its count and prompt ids stay.
                    *mappings = Vec::new();
                }
            }
            Ok((source, read, sent, complete))
        });
        Reading {
            task,
            received,
            copying,
        }
    }

    /// The read, whole, for a run that does not load an empty mirror.
    async fn whole(self) -> Result<(SqliteSource, Source), SyncError> {
        // Without a receiver the read stops handing mappings over and goes on.
        drop(self.received);
        let (source, read, _, _) = joined(self.task).await?;
        Ok((source, read))
    }
}

/// What a cold load's read hands to the COPY, in chunks, and what it sent with its digest
/// (worked out here while Postgres takes the rows in), in the order sent.
///
/// The read hands mappings over from inside its SQLite read transaction, so it waits on a
/// full channel only once the COPY takes them in ([`Reading`]'s flag): before that (Postgres
/// still connecting, or waiting for another run's lock) it pauses instead, and what it did
/// not hand over follows after the read, outside the transaction. A closed channel (a mirror
/// that is not empty, or a COPY that Postgres refused) ends the handing over for good.
struct Outbox {
    chunks: tokio::sync::mpsc::Sender<Vec<Arc<Mapping>>>,
    chunk: Vec<Arc<Mapping>>,
    sent: Sent,
    copying: Arc<AtomicBool>,
    paused: bool,
    closed: bool,
}

/// Mappings a cold load sent, with their digests.
type Sent = Vec<(Arc<Mapping>, u64)>;

impl Outbox {
    fn new(chunks: tokio::sync::mpsc::Sender<Vec<Arc<Mapping>>>, copying: Arc<AtomicBool>) -> Self {
        Outbox {
            chunks,
            chunk: Vec::with_capacity(COLD_CHUNK),
            sent: Vec::new(),
            copying,
            paused: false,
            closed: false,
        }
    }

    /// During the read.
    fn push(&mut self, m: &Arc<Mapping>) {
        if self.paused || self.closed {
            return;
        }
        self.chunk.push(m.clone());
        let full = if self.sent.is_empty() {
            FIRST_COLD_CHUNK
        } else {
            COLD_CHUNK
        };
        if self.chunk.len() == full {
            self.flush(false);
        }
    }

    /// Hands the chunk over; `may_wait` once the read's transaction is over.
    fn flush(&mut self, may_wait: bool) {
        use tokio::sync::mpsc::error::TrySendError;
        if self.chunk.is_empty() || self.closed {
            self.chunk.clear();
            return;
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(COLD_CHUNK));
        let before = self.sent.len();
        self.sent
            .extend(chunk.iter().map(|m| (m.clone(), digest(m))));
        let handed = if may_wait || self.copying.load(Ordering::Acquire) {
            self.chunks
                .blocking_send(chunk)
                .map_err(|e| TrySendError::Closed(e.0))
        } else {
            self.chunks.try_send(chunk)
        };
        match handed {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.sent.truncate(before);
                self.paused = true;
            }
            // No COPY, or the COPY is gone: the read goes on for a whole comparison or the
            // ordinary write.
            Err(TrySendError::Closed(_)) => {
                self.sent = Vec::new();
                self.closed = true;
            }
        }
    }

    /// After the read: hands over the image's mirrorable mappings not handed over yet
    /// (prompts, rows stored under another id, what a pause held back), when every mapping
    /// sent is in `image`. `false` when one is not (it lost its id to another row) or the
    /// channel is closed: then the COPY must not be kept. The rows were sent in the order
    /// the image lists them, so one pass in step tells; when ids are contested the image
    /// lists some rows out of that order, and the run takes the ordinary write instead.
    fn complete(&mut self, image: &[Arc<Mapping>]) -> bool {
        // The read's last chunk first.
        self.flush(true);
        if self.closed {
            return false;
        }
        let mut sent = self.sent.iter().map(|(m, _)| m).peekable();
        let mut rest = Vec::new();
        for m in image {
            if sent.next_if(|s| Arc::ptr_eq(s, m)).is_none() && m.mirrorable() {
                rest.push(m.clone());
            }
        }
        if sent.peek().is_some() {
            return false;
        }
        for m in rest {
            self.chunk.push(m);
            if self.chunk.len() == COLD_CHUNK {
                self.flush(true);
            }
        }
        self.flush(true);
        !self.closed
    }

    /// Closes the COPY's stream; returns what was sent (the mirror's rows), sorted by id.
    fn finish(self) -> Sent {
        drop(self.chunks);
        let mut sent = self.sent;
        sent.sort_unstable_by(|a, b| a.0.id().cmp(b.0.id()));
        sent
    }
}

/// Every row, read afresh.
async fn whole(
    source: SqliteSource,
    known: Option<SyncState>,
) -> Result<(SqliteSource, Source), SyncError> {
    blocking(move || {
        let mut source = source;
        let read = read_whole(&mut source, known)?;
        Ok((source, read))
    })
    .await
}

fn read_whole(source: &mut SqliteSource, known: Option<SyncState>) -> Result<Source, SourceError> {
    // Taken before the read: a commit during it moves the next run's fingerprint.
    let fingerprint = source.fingerprint()?;
    let image = source.read(ReadMode::Full)?;
    Ok(Source::whole(image.mappings, source, fingerprint, known))
}

impl Source {
    /// Every row, as `source` just read them into `mappings` (`fingerprint` taken before).
    fn whole(
        mappings: Vec<Arc<Mapping>>,
        source: &SqliteSource,
        fingerprint: Fingerprint,
        known: Option<SyncState>,
    ) -> Source {
        let prompt_ids = mappings
            .iter()
            .filter(|m| m.source() == crate::mapping::Origin::Prompt)
            .map(|m| m.id().into())
            .collect();
        Source::Whole {
            synced: mappings.len() as u64,
            prompt_ids,
            mappings,
            fingerprint,
            contested: source.contested(),
            known,
        }
    }
}

/// Starts `work` on the blocking pool at once, not when the result is awaited, and yields
/// its result.
fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, SyncError>> {
    joined(tokio::task::spawn_blocking(work))
}

/// Drops `value` (100,000 mappings' worth) on the blocking pool, off the run's path; a
/// process that exits does not wait for it.
fn free_off_path<T: Send + 'static>(value: T) {
    tokio::task::spawn_blocking(move || drop(value));
}

/// The result of a task on the blocking pool.
async fn joined<T>(task: tokio::task::JoinHandle<Result<T, SourceError>>) -> Result<T, SyncError> {
    task.await
        .map_err(|e| SyncError::Stopped(e.to_string()))?
        .map_err(SyncError::from)
}

/// Whether a walk's new mappings would share an id with another row or prompt (then only a
/// whole read can tell which one wins).
fn collides(w: &MarkedRead) -> bool {
    if w.fresh.is_empty() && w.prompts.is_empty() {
        return false;
    }
    let mut ids: FxHashSet<&str> = FxHashSet::default();
    ids.reserve(w.marks.len() + w.prompts.len());
    let rows = w.marks.iter().filter_map(|m| m.id.as_deref());
    let prompts = w.prompts.iter().map(|p| p.id());
    !rows.chain(prompts).all(|id| ids.insert(id))
}

/// A walk's changes against the state's mirror.
fn plan_walked(w: &MarkedRead, k: &SyncState) -> Plan {
    let (mut missing, mut differing) = (Vec::new(), Vec::new());
    let fresh: Vec<&Arc<Mapping>> = w.fresh.iter().chain(&w.prompts).collect();
    let fresh_ids: FxHashSet<&str> = fresh.iter().map(|m| m.id()).collect();
    for m in fresh.into_iter().filter(|m| m.mirrorable()) {
        match k.remote_digest(m.id()) {
            None => missing.push(m.clone()),
            Some(d) if d != digest(m) => differing.push(m.clone()),
            Some(_) => {}
        }
    }
    // Ids that went from the source: the prompts' and the rows' that are not back.
    let gone = w
        .gone
        .iter()
        .chain(&k.prompt_ids)
        .filter(|id| !fresh_ids.contains(id.as_ref()));
    let mut extras: BTreeSet<Box<str>> = k
        .extras
        .iter()
        .filter(|id| !fresh_ids.contains(id.as_ref()))
        .cloned()
        .collect();
    extras.extend(gone.filter(|id| k.remote_digest(id).is_some()).cloned());
    Plan {
        missing,
        differing,
        extras: extras.into_iter().collect(),
        remote: None,
    }
}

/// Every mapping against the mirror's rows (sorted by id).
fn plan_whole(mappings: &[Arc<Mapping>], remote: &[(Box<str>, u64)]) -> Plan {
    let (mut missing, mut differing) = (Vec::new(), Vec::new());
    for m in mappings.iter().filter(|m| m.mirrorable()) {
        match digest_in(remote, m.id()) {
            None => missing.push(m.clone()),
            Some(d) if d != digest(m) => differing.push(m.clone()),
            Some(_) => {}
        }
    }
    // An empty mirror (a cold load) has no extras: no index of 100,000 ids for nothing.
    let extras = if remote.is_empty() {
        Vec::new()
    } else {
        let ids: FxHashSet<&str> = mappings.iter().map(|m| m.id()).collect();
        remote
            .iter()
            .filter(|(id, _)| !ids.contains(id.as_ref()))
            .map(|(id, _)| id.clone())
            .collect()
    };
    Plan {
        missing,
        differing,
        extras,
        remote: None,
    }
}

/// `base` (sorted by id) with `written` put in and `deleted` taken out, sorted by id.
fn merge_remote(
    base: Vec<(Box<str>, u64)>,
    written: impl Iterator<Item = (Box<str>, u64)>,
    deleted: &[&str],
) -> Vec<(Box<str>, u64)> {
    let mut written: Vec<(Box<str>, u64)> = written.collect();
    written.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let deleted: FxHashSet<&str> = deleted.iter().copied().collect();
    let mut out = Vec::with_capacity(base.len() + written.len());
    let mut w = written.into_iter().peekable();
    for (id, d) in base {
        while let Some(x) = w.next_if(|(x, _)| *x < id) {
            out.push(x);
        }
        match w.next_if(|(x, _)| *x == id) {
            Some(x) => out.push(x),
            None if deleted.contains(id.as_ref()) => {}
            None => out.push((id, d)),
        }
    }
    out.extend(w);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_run_leaves_reads_back_as_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let key = StateKey {
            format: FORMAT,
            version: "v".into(),
            table: "public.model_mappings".into(),
            target: "t".into(),
            instance: "i".into(),
            sqlite_path: "/db".into(),
            include_prompts: true,
            redact_keys: vec!["token".into()],
            canary: 7,
        };
        let m = Arc::new(Mapping::new(crate::mapping::Fields {
            scope_type: "mapping",
            scope_key: "b",
            metadata: "{}",
            ..Default::default()
        }));
        let db = dir.path().join("db.sqlite3");
        std::fs::write(&db, b"SQLite format 3\0").unwrap();
        let source_fp = Fingerprint::take(&db).unwrap();
        let leaving = Leaving {
            key: key.clone(),
            source_fp: source_fp.clone(),
            rows: LeftRows::Listed(vec![RowMark {
                rowid: 3,
                hash: 9,
                id: Some("mapping:b".into()),
            }]),
            prompt_ids: vec!["prompt:p".into()],
            remote: LeftRemote::Sent(vec![(m.clone(), digest(&m))]),
            extras: vec!["mapping:x".into()],
            full_next: false,
        };
        let remote_fp = RemoteFingerprint {
            rows: 2,
            xmins: "42".into(),
        };
        let unfinished = leaving.write_rows(&path).unwrap();
        assert!(!path.exists(), "not in place before its fingerprint");
        unfinished.finish(&remote_fp).unwrap();
        let stored = SyncState::load(&path, &key).ok().unwrap();
        assert_eq!(stored.remote_fp, remote_fp);
        let state = stored.open().unwrap();
        assert_eq!(state.source_fp, source_fp);
        assert_eq!(state.rows[0].id.as_deref(), Some("mapping:b"));
        assert_eq!(state.remote_digest("mapping:b"), Some(digest(&m)));
        assert_eq!(
            (state.prompt_ids, state.extras),
            (vec!["prompt:p".into()], vec!["mapping:x".into()])
        );
    }

    #[test]
    fn a_state_file_cut_short_or_damaged_at_its_end_is_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let db = dir.path().join("db.sqlite3");
        std::fs::write(&db, b"SQLite format 3\0").unwrap();
        let key = StateKey {
            format: FORMAT,
            version: "v".into(),
            table: "t".into(),
            target: "t".into(),
            instance: "i".into(),
            sqlite_path: db.clone(),
            include_prompts: false,
            redact_keys: Vec::new(),
            canary: 1,
        };
        let leaving = Leaving {
            key: key.clone(),
            source_fp: Fingerprint::take(&db).unwrap(),
            rows: LeftRows::Listed(Vec::new()),
            prompt_ids: Vec::new(),
            remote: LeftRemote::Listed(vec![("mapping:a".into(), 1)]),
            extras: Vec::new(),
            full_next: false,
        };
        let remote_fp = RemoteFingerprint {
            rows: 1,
            xmins: "7".into(),
        };
        leaving
            .write_rows(&path)
            .unwrap()
            .finish(&remote_fp)
            .unwrap();
        let whole = std::fs::read(&path).unwrap();
        assert!(SyncState::load(&path, &key).unwrap().open().is_ok());
        // Cut anywhere after the key: the fingerprint or the rows are not whole.
        for cut in [1, TAIL_LEN, whole.len() / 2] {
            std::fs::write(&path, &whole[..whole.len() - cut]).unwrap();
            let loaded = SyncState::load(&path, &key).and_then(StoredState::open);
            assert!(matches!(loaded, Err(StateError::Corrupt)), "cut {cut}");
        }
        // A byte of the fingerprint changed: its checksum says so.
        let mut damaged = whole.clone();
        let at = damaged.len() - TAIL_LEN - 1;
        damaged[at] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let loaded = SyncState::load(&path, &key).and_then(StoredState::open);
        assert!(matches!(loaded, Err(StateError::Corrupt)));
    }

    #[test]
    fn the_mirror_after_a_run_is_merged_in_id_order() {
        let base: Vec<(Box<str>, u64)> = vec![("a".into(), 1), ("c".into(), 3), ("e".into(), 5)];
        let written = vec![("b".into(), 20), ("c".into(), 30), ("f".into(), 60)];
        let out = merge_remote(base, written.into_iter(), &["e"]);
        let ids: Vec<(&str, u64)> = out.iter().map(|(i, d)| (i.as_ref(), *d)).collect();
        assert_eq!(ids, [("a", 1), ("b", 20), ("c", 30), ("f", 60)]);
    }
}
