//! One sync run against the mirror, in one transaction (SPEC §2). A full run
//! ([`Target::mirror`]) goes as below; an incremental one ([`Target::push_changes`], for
//! watch runs that know what changed) skips the remote scan (step 3) and writes only the
//! changed and removed mappings.
//!
//! 1. `BEGIN`, `SET LOCAL statement_timeout`, and a transaction-scoped advisory lock on the
//!    table, so runs from several mapsync instances never interleave.
//! 2. Check the table's columns (a missing migration is reported as such, not as a SQL error).
//! 3. Stream the remote rows with `COPY … TO STDOUT (FORMAT binary)` — while the source is
//!    still being read, when the caller hands over a read in progress — keeping only a digest of each row's ten fields per id; `jsonb`
//!    columns arrive as text, which is the canonical form the source already holds (see
//!    [`crate::mapping::canonical_json`]), so a source mapping and its remote row digest alike
//!    exactly when every field is equal.
//! 4. Refuse a mass delete (unless forced) before anything is written.
//! 5. Rows missing remotely go in with `COPY … FROM STDIN (FORMAT binary)` straight into the
//!    table; rows that differ go through a temporary staging table and one
//!    `INSERT … ON CONFLICT DO UPDATE … WHERE … IS DISTINCT FROM …`, which leaves a row that
//!    already matches untouched (no new row version, no trigger) even if the comparison above
//!    was too cautious. Deletes are one `DELETE … WHERE id = ANY($1)`.
//! 6. `COMMIT` (or, for a dry run or a refusal, roll back by dropping the transaction).
//!
//! Either all of it commits or none of it does.

use std::future::Future;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use futures_util::{TryStreamExt, pin_mut};
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutRow, BinaryCopyOutStream};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::{Target, TargetError};
use crate::mapping::Mapping;
use foldhash::HashMap as FxHashMap;

/// The ten mirrored columns, in the order of the exported form.
const COLUMNS: &str = "id, scope_type, scope_key, name, default_model, candidates, is_active, updated_at, source, metadata";

const COLUMN_TYPES: [Type; 10] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::BOOL,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::JSONB,
];

/// What the caller wants from this run.
#[derive(Debug, Clone, Copy, Default)]
pub struct MirrorOptions {
    pub delete_missing: bool,
    pub force: bool,
    pub dry_run: bool,
    pub max_delete_fraction: f64,
    pub max_delete_floor: u64,
}

/// What the run found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MirrorOutcome {
    /// Rows in the mirror before the run, when the run counted them.
    pub remote_before: Option<u64>,
    /// Rows that were missing remotely (inserted, or to insert in a dry run).
    pub inserted: u64,
    /// Rows that differed remotely and were rewritten.
    pub updated: u64,
    pub deleted: u64,
    /// Remote rows absent from the source (deleted only with delete propagation).
    pub extra: u64,
    /// Set when a guard refused the run; nothing was written.
    pub refused: Option<Refusal>,
    /// Rows the run would change or delete (what a refused or dry run leaves pending).
    pub pending: u64,
    /// Mappings Postgres refused to store (id, its reason): everything else was written.
    pub rejected: Vec<Rejected>,
}

/// The status a run that wrote records in the registry.
const SYNCED: &str = "synced";

/// Why a guard refused a run (SPEC §2), with a message that says how to force it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The run would delete more than the limits allow.
    MassDelete(String),
    /// Another instance has written the table recently.
    OtherInstance(String),
}

impl Refusal {
    /// `refused:mass_delete` or `refused:other_instance`.
    pub fn status(&self) -> &'static str {
        match self {
            Refusal::MassDelete(_) => "refused:mass_delete",
            Refusal::OtherInstance(_) => "refused:other_instance",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::MassDelete(m) | Refusal::OtherInstance(m) => m,
        }
    }
}

/// A mapping Postgres would not take (a value a constraint, trigger or index refuses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub id: String,
    pub reason: String,
}

impl MirrorOutcome {
    fn record(&mut self, w: Written) {
        self.inserted += w.inserted;
        self.updated += w.updated;
        self.rejected = w.rejected;
    }
}

/// What [`write_rows`] did.
#[derive(Debug, Default)]
struct Written {
    inserted: u64,
    updated: u64,
    rejected: Vec<Rejected>,
}

/// Why a full run failed: producing the source's mappings, or Postgres.
#[derive(Debug)]
pub enum MirrorError<E> {
    Source(E),
    Target(TargetError),
}

impl<E> From<TargetError> for MirrorError<E> {
    fn from(e: TargetError) -> Self {
        MirrorError::Target(e)
    }
}

/// The mirror's rows as a digest per id: enough to tell which source mappings differ, at a
/// fraction of the rows' memory.
type RemoteDigests = FxHashMap<String, u64>;

impl Target {
    /// A full run: aligns the mirror with the mappings `local` produces (unique ids, as the
    /// source produces them), comparing every remote row, which repairs any drift.
    ///
    /// The mirror is read while `local` is still being produced (the SQLite read and the
    /// remote scan take about as long as each other), inside the run's transaction, so the
    /// comparison is with what the transaction will write over. Returns what `local`
    /// produced along with the outcome.
    pub async fn mirror<L, E>(
        &self,
        local: impl Future<Output = Result<L, E>>,
        opts: &MirrorOptions,
    ) -> Result<(MirrorOutcome, L), MirrorError<E>>
    where
        L: AsRef<[Arc<Mapping>]>,
    {
        let mut client = self.client().await?;
        let _running = self.register_run(&client);
        let err = |e: tokio_postgres::Error| self.classify(&e);
        let remote_side = async {
            let tx = self.begin_run(&mut client).await?;
            let remote = self.remote_digests(&tx).await?;
            Ok::<_, TargetError>((tx, remote))
        };
        let (local, remote_side) = tokio::join!(local, remote_side);
        // A failure on either side drops the transaction: nothing is written.
        let local = local.map_err(MirrorError::Source)?;
        let (tx, mut remote) = remote_side?;
        let mappings = local.as_ref();

        // Compare (CPU work over every mapping: off the runtime thread the admin port shares).
        let remote_before = remote.len() as u64;
        let (missing, differing, extra) = tokio::task::block_in_place(|| {
            let mut missing = Vec::new();
            let mut differing = Vec::new();
            for m in mappings.iter().filter(|m| m.mirrorable()) {
                match remote.remove(m.id()) {
                    None => missing.push(m.as_ref()),
                    Some(d) if d != row_digest(&Row::of(m)) => differing.push(m.as_ref()),
                    Some(_) => {}
                }
            }
            let extra: Vec<String> = remote.into_keys().collect();
            (missing, differing, extra)
        });
        let mut outcome = MirrorOutcome {
            remote_before: Some(remote_before),
            extra: extra.len() as u64,
            pending: (missing.len() + differing.len()) as u64
                + if opts.delete_missing {
                    extra.len() as u64
                } else {
                    0
                },
            ..Default::default()
        };

        // Guard.
        if let Some(refusal) = self
            .guard(&tx, extra.len() as u64, Some(remote_before), opts)
            .await?
        {
            outcome.refused = Some(refusal);
            self.refuse(tx, &outcome, opts.dry_run).await?;
            return Ok((outcome, local));
        }
        if opts.dry_run {
            outcome.inserted = missing.len() as u64;
            outcome.updated = differing.len() as u64;
            outcome.deleted = if opts.delete_missing {
                outcome.extra
            } else {
                0
            };
            return Ok((outcome, local));
        }

        // Write.
        let written = write_rows(&tx, &self.table.quoted(), &missing, &differing)
            .await
            .map_err(err)?;
        outcome.record(written);
        if opts.delete_missing {
            outcome.deleted = self.delete(&tx, &extra).await?;
        }
        self.record_run(&tx, SYNCED, true).await?;
        tx.commit().await.map_err(err)?;
        Ok((outcome, local))
    }

    /// The guards of a run with delete propagation, before anything is written: another
    /// instance writing this table, then the mass-delete limits. `remote` is the mirror's row
    /// count, when known; it is counted here only when the limits need it.
    async fn guard(
        &self,
        tx: &Transaction<'_>,
        deletes: u64,
        remote: Option<u64>,
        opts: &MirrorOptions,
    ) -> Result<Option<Refusal>, TargetError> {
        if !opts.delete_missing || opts.force {
            return Ok(None);
        }
        let others = self.recent_others(tx).await?;
        if let Some(other) = others.first() {
            return Ok(Some(Refusal::OtherInstance(format!(
                "another mapsync instance, {other}, writes {} too (this one is `{}`), and deleting the rows missing from this SQLite file would delete that instance's rows: point one of them at another table, give both the same instance.name if they mirror the same file, or pass force=true (--force) once the other is gone for good",
                self.table(),
                self.instance_name(),
            ))));
        }
        // Only a large delete needs the remote count for the guard.
        if deletes <= opts.max_delete_floor {
            return Ok(None);
        }
        let remote = match remote {
            Some(n) => n,
            None => {
                let row = tx
                    .query_one(
                        &format!("SELECT count(*) FROM {}", self.table.quoted()),
                        &[],
                    )
                    .await
                    .map_err(|e| self.classify(&e))?;
                row.get::<_, i64>(0) as u64
            }
        };
        Ok(mass_delete(deletes, remote, opts).map(Refusal::MassDelete))
    }

    /// Ends a refused run: nothing is written but this instance's status in the registry.
    /// (A dry run records nothing: dropping its transaction rolls it back.)
    async fn refuse(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        outcome: &MirrorOutcome,
        dry_run: bool,
    ) -> Result<(), TargetError> {
        if dry_run {
            return Ok(());
        }
        if let Some(refusal) = &outcome.refused {
            self.record_run(&tx, refusal.status(), false).await?;
        }
        tx.commit().await.map_err(|e| self.classify(&e))
    }

    /// Every mirrored row in the exported form, each parsed on its own by the export rules
    /// (for `mapsync restore --from-target`): one read transaction, no lock taken.
    pub async fn read_mirror(
        &self,
        redactor: &crate::mapping::Redactor,
    ) -> Result<Vec<Result<Mapping, String>>, TargetError> {
        let err = |e: tokio_postgres::Error| self.classify(&e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(err)?;
        super::schema::check_columns(&tx, self).await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT to_json(t)::text FROM (SELECT {COLUMNS} FROM {}) t",
                    self.table.quoted()
                ),
                &[],
            )
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        Ok(rows
            .iter()
            .map(|r| {
                let text: &str = r.get(0);
                serde_json::from_str(text)
                    .map_err(|e| format!("not a row of the mirror ({e})"))
                    .and_then(|v| Mapping::from_export(&v, redactor))
            })
            .collect())
    }

    /// Streams the mirror's rows (binary COPY) into a digest per id.
    async fn remote_digests(&self, tx: &Transaction<'_>) -> Result<RemoteDigests, TargetError> {
        let err = |e: tokio_postgres::Error| self.classify(&e);
        let stream = tx
            .copy_out(&format!(
                "COPY (SELECT {COLUMNS} FROM {}) TO STDOUT (FORMAT binary)",
                self.table.quoted()
            ))
            .await
            .map_err(err)?;
        let rows = BinaryCopyOutStream::new(stream, &COLUMN_TYPES);
        pin_mut!(rows);
        let mut digests = RemoteDigests::default();
        while let Some(row) = rows.try_next().await.map_err(err)? {
            let remote = Row::read(&row).map_err(err)?;
            digests.insert(remote.id.to_string(), row_digest(&remote));
            yield_every(digests.len()).await;
        }
        Ok(digests)
    }

    /// An incremental run: writes only `changed` (guarded, so a row that already matches is
    /// left alone) and deletes `removed` (when delete propagation is on), without reading the
    /// whole mirror. For runs triggered by the file watcher, where the caller knows what it
    /// changed since its last successful run. `remote_before` is not known here.
    pub async fn push_changes(
        &self,
        changed: &[&Mapping],
        removed: &[&str],
        opts: &MirrorOptions,
    ) -> Result<MirrorOutcome, TargetError> {
        let mut client = self.client().await?;
        let _running = self.register_run(&client);
        let err = |e: tokio_postgres::Error| self.classify(&e);
        let tx = self.begin_run(&mut client).await?;
        let mut outcome = MirrorOutcome {
            extra: removed.len() as u64,
            ..Default::default()
        };
        let deletes = if opts.delete_missing { removed } else { &[] };
        outcome.pending = (changed.len() + deletes.len()) as u64;
        if let Some(refusal) = self.guard(&tx, deletes.len() as u64, None, opts).await? {
            outcome.refused = Some(refusal);
            self.refuse(tx, &outcome, opts.dry_run).await?;
            return Ok(outcome);
        }
        if opts.dry_run {
            outcome.updated = changed.len() as u64;
            outcome.deleted = deletes.len() as u64;
            return Ok(outcome);
        }
        let changed: Vec<&Mapping> = changed.iter().copied().filter(|m| m.mirrorable()).collect();
        let written = write_rows(&tx, &self.table.quoted(), &[], &changed)
            .await
            .map_err(err)?;
        outcome.record(written);
        outcome.deleted = self.delete(&tx, deletes).await?;
        self.record_run(&tx, SYNCED, true).await?;
        tx.commit().await.map_err(err)?;
        Ok(outcome)
    }

    /// Starts a run's transaction: statement timeout, the advisory lock that keeps runs of
    /// several mapsync instances apart, and the column check.
    async fn begin_run<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, TargetError> {
        let err = |e: tokio_postgres::Error| self.classify(&e);
        let tx = client.transaction().await.map_err(err)?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; \
             SELECT pg_advisory_xact_lock(hashtextextended('mapsync:{}', 0))",
            self.statement_timeout.as_millis(),
            super::LOCK_TIMEOUT.min(self.statement_timeout).as_millis(),
            self.table,
        ))
        .await
        .map_err(err)?;
        super::schema::check_columns(&tx, self).await?;
        Ok(tx)
    }

    async fn delete<S: AsRef<str> + Sync + ToSql>(
        &self,
        tx: &Transaction<'_>,
        ids: &[S],
    ) -> Result<u64, TargetError> {
        if ids.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &format!("DELETE FROM {} WHERE id = ANY($1)", self.table.quoted()),
            &[&ids],
        )
        .await
        .map_err(|e| self.classify(&e))
    }
}

/// `Some(reason)` when deleting `extra` of `remote` rows crosses both limits.
fn mass_delete(extra: u64, remote: u64, opts: &MirrorOptions) -> Option<String> {
    let over_floor = extra > opts.max_delete_floor;
    let over_fraction = (extra as f64) > opts.max_delete_fraction * remote as f64;
    (over_floor && over_fraction).then(|| {
        format!(
            "would delete {extra} of {remote} remote rows, more than target.max_delete_fraction ({}) and target.max_delete_floor ({}): pass force=true (--force) if the source really lost them",
            opts.max_delete_fraction, opts.max_delete_floor
        )
    })
}

/// The ten mirrored fields of a row, as the mirror stores them: read from a remote row, or
/// taken from a source mapping, and compared through [`row_digest`].
#[derive(Hash)]
struct Row<'a> {
    id: &'a str,
    scope_type: &'a str,
    scope_key: &'a str,
    name: Option<&'a str>,
    default_model: Option<&'a str>,
    candidates: Option<&'a str>,
    is_active: Option<bool>,
    /// Microseconds since the Unix epoch.
    updated_at: Option<i64>,
    source: Option<&'a str>,
    metadata: Option<&'a str>,
}

impl<'a> Row<'a> {
    fn of(m: &'a Mapping) -> Row<'a> {
        Row {
            id: m.id(),
            scope_type: m.scope_type(),
            scope_key: m.scope_key(),
            name: m.name(),
            default_model: m.default_model(),
            candidates: Some(m.candidates_json()),
            is_active: Some(m.is_active),
            updated_at: m.updated_at.map(|t| t.timestamp_micros()),
            source: Some(m.source.as_str()),
            metadata: Some(m.mirror_metadata_json()),
        }
    }

    /// `jsonb` columns arrive as their text, which is the canonical text the source holds.
    fn read(r: &'a BinaryCopyOutRow) -> Result<Row<'a>, tokio_postgres::Error> {
        Ok(Row {
            id: r.try_get(0)?,
            scope_type: r.try_get(1)?,
            scope_key: r.try_get(2)?,
            name: r.try_get(3)?,
            default_model: r.try_get(4)?,
            candidates: r.try_get::<Option<Jsonb>>(5)?.map(|j| j.0),
            is_active: r.try_get(6)?,
            updated_at: r
                .try_get::<Option<DateTime<Utc>>>(7)?
                .map(|t| t.timestamp_micros()),
            source: r.try_get(8)?,
            metadata: r.try_get::<Option<Jsonb>>(9)?.map(|j| j.0),
        })
    }
}

/// A 64-bit hash of a row's fields: equal rows have equal digests, and a differing row
/// collides with probability 2⁻⁶⁴. (Should that ever happen, the row is rewritten by the
/// next change to it.)
fn row_digest(row: &Row<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    row.hash(&mut h);
    h.finish()
}

/// Streams `rows` into `table` with binary COPY. Returns the number of rows written.
async fn copy_in(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&Mapping],
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx
        .copy_in(&format!(
            "COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
    pin_mut!(writer);
    for (i, m) in rows.iter().enumerate() {
        yield_every(i).await;
        writer
            .as_mut()
            .write(&[
                &m.id(),
                &m.scope_type(),
                &m.scope_key(),
                &m.name(),
                &m.default_model(),
                &Jsonb(m.candidates_json()),
                &m.is_active,
                &m.updated_at,
                &m.source.as_str(),
                &Jsonb(m.mirror_metadata_json()),
            ])
            .await?;
    }
    writer.finish().await
}

/// Writes rows that may differ: COPY into a temporary table, then one guarded upsert. Returns
/// how many rows Postgres inserted and how many it actually rewrote (a row that already
/// matches is neither).
async fn upsert_via_stage(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&Mapping],
) -> Result<(u64, u64), tokio_postgres::Error> {
    // Created once per transaction (a retry of a chunk reuses it, emptied).
    tx.batch_execute(
        "CREATE TEMP TABLE IF NOT EXISTS mapsync_stage (id text, scope_type text, scope_key text, \
         name text, default_model text, candidates jsonb, is_active boolean, \
         updated_at timestamptz, source text, metadata jsonb) ON COMMIT DROP; \
         TRUNCATE mapsync_stage",
    )
    .await?;
    copy_in(tx, "mapsync_stage", rows).await?;
    let set: Vec<String> = COLUMNS
        .split(", ")
        .skip(1)
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let current: Vec<String> = COLUMNS
        .split(", ")
        .skip(1)
        .map(|c| format!("t.{c}"))
        .collect();
    let incoming: Vec<String> = COLUMNS
        .split(", ")
        .skip(1)
        .map(|c| format!("EXCLUDED.{c}"))
        .collect();
    let row = tx
        .query_one(
            &format!(
                "WITH written AS (INSERT INTO {table} AS t ({COLUMNS}) SELECT {COLUMNS} FROM mapsync_stage \
                 ON CONFLICT (id) DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({}) \
                 RETURNING (xmax = 0) AS inserted) \
                 SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written",
                set.join(", "),
                current.join(", "),
                incoming.join(", "),
            ),
            &[],
        )
        .await?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}

/// Writes `missing` (rows the mirror lacks: straight COPY into the table) and `differing`
/// (through [`upsert_via_stage`]) under a savepoint. When Postgres refuses a value (a data
/// exception, a constraint, an index entry too large: SQLSTATE classes 22, 23, 54), the
/// savepoint is rolled back and the rows are written again in halves, down to single rows,
/// so that one row Postgres will not take is left out and every other row is written.
async fn write_rows(
    tx: &Transaction<'_>,
    table: &str,
    missing: &[&Mapping],
    differing: &[&Mapping],
) -> Result<Written, tokio_postgres::Error> {
    if missing.is_empty() && differing.is_empty() {
        return Ok(Written::default());
    }
    tx.batch_execute("SAVEPOINT mapsync_write").await?;
    let fast = async {
        let mut w = Written::default();
        if !missing.is_empty() {
            w.inserted = copy_in(tx, table, missing).await?;
        }
        if !differing.is_empty() {
            let (inserted, updated) = upsert_via_stage(tx, table, differing).await?;
            w.inserted += inserted;
            w.updated = updated;
        }
        Ok::<_, tokio_postgres::Error>(w)
    };
    match fast.await {
        Ok(w) => {
            tx.batch_execute("RELEASE SAVEPOINT mapsync_write").await?;
            Ok(w)
        }
        Err(e) if refuses_a_row(&e) => {
            tx.batch_execute(
                "ROLLBACK TO SAVEPOINT mapsync_write; RELEASE SAVEPOINT mapsync_write",
            )
            .await?;
            let all: Vec<&Mapping> = missing.iter().chain(differing).copied().collect();
            write_isolating(tx, table, &all).await
        }
        Err(e) => Err(e),
    }
}

/// Writes `rows` in halves under savepoints, leaving out each single row Postgres refuses.
async fn write_isolating(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&Mapping],
) -> Result<Written, tokio_postgres::Error> {
    let mut w = Written::default();
    let mut todo = vec![rows];
    while let Some(chunk) = todo.pop() {
        tx.batch_execute("SAVEPOINT mapsync_chunk").await?;
        match upsert_via_stage(tx, table, chunk).await {
            Ok((inserted, updated)) => {
                tx.batch_execute("RELEASE SAVEPOINT mapsync_chunk").await?;
                w.inserted += inserted;
                w.updated += updated;
            }
            Err(e) if refuses_a_row(&e) => {
                tx.batch_execute(
                    "ROLLBACK TO SAVEPOINT mapsync_chunk; RELEASE SAVEPOINT mapsync_chunk",
                )
                .await?;
                match chunk {
                    [one] => {
                        let reason = super::one_line(&e);
                        tracing::warn!(id = %one.id(), reason = %reason,
                            "Postgres refused this mapping; every other mapping is mirrored (fix the value in the application, or the constraint in Postgres)");
                        w.rejected.push(Rejected {
                            id: one.id().to_string(),
                            reason,
                        });
                    }
                    _ => {
                        let (a, b) = chunk.split_at(chunk.len() / 2);
                        todo.push(b);
                        todo.push(a);
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(w)
}

/// Whether Postgres refused a value of some row, rather than the run as a whole: a data
/// exception (22…), an integrity constraint (23…) or a program limit such as an index entry
/// too large (54…).
fn refuses_a_row(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        ["22", "23", "54"]
            .iter()
            .any(|class| c.code().starts_with(class))
    })
}

/// Lets other tasks run (the admin port, above all) every 1,024 rows: encoding or hashing
/// 100,000 rows would otherwise hold a runtime thread for a few hundred milliseconds, since
/// a COPY stream with data buffered never makes the task wait.
async fn yield_every(i: usize) {
    if i % 1024 == 1023 {
        tokio::task::yield_now().await;
    }
}

/// A `jsonb` value as its text, borrowed: sent and received without parsing.
#[derive(Debug)]
struct Jsonb<'a>(&'a str);

/// jsonb's binary format is a version byte (1) followed by the JSON text.
const JSONB_VERSION: u8 = 1;

impl<'a> FromSql<'a> for Jsonb<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        match raw.split_first() {
            Some((&JSONB_VERSION, text)) => Ok(Jsonb(std::str::from_utf8(text)?)),
            _ => Err("unsupported jsonb binary version".into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u8(JSONB_VERSION);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(fraction: f64, floor: u64) -> MirrorOptions {
        MirrorOptions {
            delete_missing: true,
            max_delete_fraction: fraction,
            max_delete_floor: floor,
            ..Default::default()
        }
    }

    #[test]
    fn mass_delete_needs_both_limits_crossed() {
        // 11 of 12 rows: over the floor (10) and over half.
        assert!(mass_delete(11, 12, &opts(0.5, 10)).is_some());
        // 10 of 12: not over the floor.
        assert!(mass_delete(10, 12, &opts(0.5, 10)).is_none());
        // 40 of 100: over the floor, not over half.
        assert!(mass_delete(40, 100, &opts(0.5, 10)).is_none());
        // An emptied source against 1000 remote rows.
        let why = mass_delete(1000, 1000, &opts(0.5, 10)).unwrap();
        assert!(why.contains("would delete 1000 of 1000"), "{why}");
        assert!(why.contains("force"), "{why}");
    }
}
