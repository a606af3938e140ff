//! The steps of a run's transaction against the mirror (SPEC §2): the [`sync`](crate::sync)
//! module decides what a run does; this module knows how each step is said to Postgres.
//!
//! 1. [`Target::session`] takes a pooled connection and registers it for cancellation;
//!    [`Session::begin`] opens the run's transaction: `SET LOCAL statement_timeout` and
//!    `lock_timeout`, a transaction-scoped advisory lock on the table (runs of several
//!    mapsync instances never interleave), the column check (a missing migration is
//!    reported as such, not as a SQL error), and whether the instance registry exists.
//! 2. [`Txn::scan`] streams the remote rows with `COPY … TO STDOUT (FORMAT binary)`, keeping
//!    only a digest of each row's ten fields per id; `jsonb` columns arrive as text, which is
//!    the canonical form the source already holds (see [`crate::mapping::canonical_json`]),
//!    so a source mapping and its remote row digest alike exactly when every field is equal.
//! 3. [`Txn::write`]: rows missing remotely go in with `COPY … FROM STDIN (FORMAT binary)`
//!    straight into the table; rows that differ go through a temporary staging table and one
//!    `INSERT … ON CONFLICT DO UPDATE … WHERE … IS DISTINCT FROM …`, which leaves a row that
//!    already matches untouched (no new row version, no trigger). Under a savepoint: a row
//!    Postgres refuses is isolated by halving and left out, every other row is written.
//! 4. [`Txn::delete`]: one `DELETE … WHERE id = ANY($1)`.
//! 5. [`Txn::commit`]; dropping a [`Txn`] instead rolls everything back.
//!
//! No prepared statement outlives its transaction, so all of this works through PgBouncer or
//! Supavisor in transaction-pooling mode.

use bytes::{BufMut, BytesMut};
use futures_util::{TryStreamExt, pin_mut};
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutRow, BinaryCopyOutStream};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use std::sync::Arc;

use super::registry::OtherInstance;
use super::{RunningGuard, Target, TargetError};
use crate::mapping::{EntryError, Mapping};

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

/// A connection taken from the pool for one run, registered so that shutdown can cancel its
/// query ([`Target::cancel_running`]).
pub struct Session<'t> {
    target: &'t Target,
    client: deadpool_postgres::Object,
    _running: RunningGuard,
}

/// A run's open transaction. Dropped without [`Txn::commit`], it rolls back.
pub struct Txn<'s> {
    target: &'s Target,
    tx: deadpool_postgres::Transaction<'s>,
    /// Whether the instance registry exists (asked with the opening statements).
    registry: bool,
}

/// What every write to the mirror's table changes: its row count and the sum of a hash of
/// each row version's `xmin` (the transaction that wrote it). Any insert, update or delete
/// committed by anyone changes it: an insert or update adds row versions whose `xmin` is the
/// writer's new transaction id, a delete lowers the count (a collision of the 64-bit hash
/// sums aside). Triggers, `synced_at` and session settings play no part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteFingerprint {
    pub rows: i64,
    /// The exact (numeric) sum, as Postgres prints it.
    pub xmins: String,
}

/// What [`Txn::write`] did.
#[derive(Debug, Default)]
pub struct Written {
    pub inserted: u64,
    pub updated: u64,
    /// Mappings Postgres refused to store; every other one was written.
    pub rejected: Vec<Rejected>,
}

/// A mapping Postgres would not take (a value a constraint, trigger or index refuses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub id: String,
    pub reason: String,
}

impl Target {
    /// A pooled connection for one run.
    pub async fn session(&self) -> Result<Session<'_>, TargetError> {
        let client = self.client().await?;
        let running = self.register_run(&client);
        Ok(Session {
            target: self,
            client,
            _running: running,
        })
    }
}

/// `SET LOCAL` of the run's statement and lock timeouts.
fn timeouts(target: &Target) -> String {
    format!(
        "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}",
        target.statement_timeout.as_millis(),
        super::LOCK_TIMEOUT
            .min(target.statement_timeout)
            .as_millis(),
    )
}

/// The advisory lock's key text for the mirrored table (hashed by Postgres).
fn lock_key(target: &Target) -> String {
    format!("mapsync:{}", target.table)
}

/// Takes the advisory lock on [`lock_key`] (`$1`), waiting up to the lock timeout.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

/// The digest of `m` as the mirror would hold it (what [`Txn::scan`] gives for its row).
pub fn digest(m: &Mapping) -> u64 {
    row_digest(&Row::of(m))
}

impl Session<'_> {
    /// Opens the run's transaction in `REPEATABLE READ` and tries the advisory lock in it:
    /// every statement of the run sees one snapshot, so the mirror's [`RemoteFingerprint`]
    /// taken at its end is that of the rows the run read plus its own writes, and a row that
    /// another writer changes meanwhile fails the run instead of being overwritten unseen.
    /// The lock is tried, not waited for (a wait inside the transaction would leave its
    /// snapshot from before the holder's commit): `None` when another run holds it; then
    /// [`Session::wait_for_lock`] and try again. Gives the transaction and the mirror's
    /// fingerprint as its snapshot sees it, asked in the same round trip.
    pub async fn try_begin_checked(
        &mut self,
    ) -> Result<Option<(Txn<'_>, RemoteFingerprint)>, TargetError> {
        let target = self.target;
        let err = |e: tokio_postgres::Error| target.error_of(&e);
        let tx = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(err)?;
        // Sent together, answered in one round trip: the timeouts, the lock, the column check,
        // the registry's existence and the fingerprint (when the lock is not taken, rarely,
        // they are read for nothing: the fingerprint is a scan of the mirror).
        let (key, limits) = (lock_key(target), timeouts(target));
        let lock_params: [(&(dyn ToSql + Sync), Type); 1] = [(&key, Type::TEXT)];
        let (timeouts_set, locked, registry, fingerprint) = tokio::join!(
            tx.batch_execute(&limits),
            tx.query_typed(
                "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                &lock_params,
            ),
            checks(&tx, target),
            fingerprint(&tx, target),
        );
        // An error aborts the transaction and the statements after it fail with "current
        // transaction is aborted": the first error, in the order sent, is the one that says why.
        timeouts_set.map_err(err)?;
        let locked: bool = locked.map_err(err)?.first().is_some_and(|r| r.get(0));
        if !locked {
            tx.rollback().await.map_err(err)?;
            return Ok(None);
        }
        let registry = registry?;
        let fingerprint = fingerprint?;
        Ok(Some((
            Txn {
                target,
                tx,
                registry,
            },
            fingerprint,
        )))
    }

    /// Waits (up to the lock timeout) until the run holding the advisory lock ends, in a
    /// transaction of its own that ends at once.
    pub async fn wait_for_lock(&mut self) -> Result<(), TargetError> {
        let target = self.target;
        let err = |e: tokio_postgres::Error| target.error_of(&e);
        let wait = self.client.transaction().await.map_err(err)?;
        wait.batch_execute(&timeouts(target)).await.map_err(err)?;
        wait.execute_typed(LOCK, &[(&lock_key(target), Type::TEXT)])
            .await
            .map_err(err)?;
        wait.rollback().await.map_err(err)
    }

    /// Opens the run's transaction: timeouts, the advisory lock, the column check and the
    /// registry's existence.
    pub async fn begin(&mut self) -> Result<Txn<'_>, TargetError> {
        let target = self.target;
        let err = |e: tokio_postgres::Error| target.error_of(&e);
        let tx = self.client.transaction().await.map_err(err)?;
        // Sent together, answered once the lock is taken; the first error sent says why.
        let (key, limits) = (lock_key(target), timeouts(target));
        let lock_params: [(&(dyn ToSql + Sync), Type); 1] = [(&key, Type::TEXT)];
        let (timeouts_set, locked, registry) = tokio::join!(
            tx.batch_execute(&limits),
            tx.execute_typed(LOCK, &lock_params),
            checks(&tx, target),
        );
        timeouts_set.map_err(err)?;
        locked.map_err(err)?;
        let registry = registry?;
        Ok(Txn {
            target,
            tx,
            registry,
        })
    }
}

impl Txn<'_> {
    fn err(&self, e: tokio_postgres::Error) -> TargetError {
        self.target.error_of(&e)
    }

    /// Streams the mirror's rows (binary COPY) to `visit`, as (id, digest) pairs in no
    /// particular order; none is kept here, so a caller holds only what it needs of them.
    pub async fn scan(&self, mut visit: impl FnMut(&str, u64)) -> Result<u64, TargetError> {
        let stream = self
            .tx
            .copy_out(&format!(
                "COPY (SELECT {COLUMNS} FROM {}) TO STDOUT (FORMAT binary)",
                self.target.table.quoted()
            ))
            .await
            .map_err(|e| self.err(e))?;
        let rows = BinaryCopyOutStream::new(stream, &COLUMN_TYPES);
        pin_mut!(rows);
        let mut seen = 0;
        while let Some(row) = rows.try_next().await.map_err(|e| self.err(e))? {
            let remote = Row::read(&row).map_err(|e| self.err(e))?;
            visit(remote.id, row_digest(&remote));
            seen += 1;
            yield_every(seen).await;
        }
        Ok(seen as u64)
    }

    /// The mirror's [`RemoteFingerprint`], as this transaction sees it.
    pub async fn fingerprint(&self) -> Result<RemoteFingerprint, TargetError> {
        fingerprint(&self.tx, self.target).await
    }

    /// The mirror's [`RemoteFingerprint`] after one COPY of `rows` rows into a table this
    /// transaction saw empty: every row then carries that COPY's transaction id, so the sum is
    /// `rows` times the hash of one row's `xmin`, read from one row instead of all of them
    /// (~20 ms at 100,000 rows). Were that not so (a trigger that skipped rows), the value
    /// differs from what [`Txn::fingerprint`] says and the next run is a full one: a state is
    /// never trusted wrongly.
    pub async fn fingerprint_of_one_copy(
        &self,
        rows: u64,
    ) -> Result<RemoteFingerprint, TargetError> {
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        let row = self
            .tx
            .query_typed(
                &format!(
                    "SELECT ($1::numeric * hashint8extended(xmin::text::bigint, 0))::text FROM {} LIMIT 1",
                    self.target.table.quoted()
                ),
                &[(&rows, Type::INT8)],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(RemoteFingerprint {
            rows,
            xmins: row.first().map_or_else(|| "0".into(), |r| r.get(0)),
        })
    }

    /// The mirror's row count.
    pub async fn count(&self) -> Result<u64, TargetError> {
        let row = self
            .tx
            .query_typed(
                &format!("SELECT count(*) FROM {}", self.target.table.quoted()),
                &[],
            )
            .await
            .map_err(|e| self.err(e))
            .and_then(|rows| one_row(self.target, rows))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Writes `missing` (rows the mirror lacks: straight COPY into the table) and `differing`
    /// (through a staging table and one guarded upsert) under a savepoint. When Postgres refuses a value (a data
    /// exception, a constraint, an index entry too large: SQLSTATE classes 22, 23, 54), the
    /// savepoint is rolled back and the rows are written again in halves, down to single rows,
    /// so that one row Postgres will not take is left out and every other row is written.
    pub async fn write(
        &self,
        missing: &[&Mapping],
        differing: &[&Mapping],
    ) -> Result<Written, TargetError> {
        write_rows(&self.tx, &self.target.table.quoted(), missing, differing)
            .await
            .map_err(|e| self.err(e))
    }

    /// Opens a savepoint and copies the mappings arriving on `chunks` straight into the table
    /// (a cold load, while the SQLite file is still being read; the rows must be missing
    /// remotely). `None` when Postgres refused a row: the savepoint is rolled back, nothing
    /// was written, and the rows go through [`Txn::write`] instead. Otherwise the savepoint
    /// stays open until [`Txn::settle_streamed`], or until the transaction ends (a commit
    /// keeps what it holds).
    pub async fn copy_streamed(
        &self,
        chunks: tokio::sync::mpsc::Receiver<Vec<Arc<Mapping>>>,
    ) -> Result<Option<u64>, TargetError> {
        let err = |e| self.err(e);
        // The savepoint goes out with the COPY's statement, in one round trip; the first
        // error sent says why (a COPY after a failed savepoint only says "aborted").
        let table = self.target.table.quoted();
        let (savepoint, copied) = tokio::join!(
            self.tx.batch_execute("SAVEPOINT mapsync_stream"),
            copy_in_chunks(&self.tx, &table, chunks),
        );
        savepoint.map_err(err)?;
        match copied {
            Ok(n) => Ok(Some(n)),
            Err(e) if refuses_a_row(&e) => {
                self.settle_streamed(false).await?;
                Ok(None)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Keeps (`keep`) or undoes what [`Txn::copy_streamed`] wrote, and ends its savepoint.
    pub async fn settle_streamed(&self, keep: bool) -> Result<(), TargetError> {
        let sql = if keep {
            "RELEASE SAVEPOINT mapsync_stream"
        } else {
            "ROLLBACK TO SAVEPOINT mapsync_stream; RELEASE SAVEPOINT mapsync_stream"
        };
        self.tx.batch_execute(sql).await.map_err(|e| self.err(e))
    }

    /// Deletes the rows with these ids; returns how many went.
    pub async fn delete<S: AsRef<str> + Sync + ToSql>(
        &self,
        ids: &[S],
    ) -> Result<u64, TargetError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.tx
            .execute_typed(
                &format!(
                    "DELETE FROM {} WHERE id = ANY($1)",
                    self.target.table.quoted()
                ),
                &[(&ids, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(|e| self.err(e))
    }

    /// The other instances that wrote this table within `target.instance_grace_s` (none
    /// without a registry).
    pub async fn recent_others(&self) -> Result<Vec<OtherInstance>, TargetError> {
        if !self.registry {
            return Ok(Vec::new());
        }
        self.target.others(&self.tx, true).await
    }

    /// Records this run in the instance registry, if there is one: `wrote` moves
    /// `last_run_at`.
    pub async fn record_run(&self, status: &str, wrote: bool) -> Result<(), TargetError> {
        if !self.registry {
            return Ok(());
        }
        self.target.record_run(&self.tx, status, wrote).await
    }

    /// The mirrored table (for messages).
    pub fn table(&self) -> &crate::config::TableName {
        &self.target.table
    }

    /// This instance's name in the registry.
    pub fn instance_name(&self) -> &str {
        self.target.instance_name()
    }

    pub async fn commit(self) -> Result<(), TargetError> {
        let target = self.target;
        self.tx.commit().await.map_err(|e| target.error_of(&e))
    }
}

impl Target {
    /// Every mirrored row in the exported form, each parsed on its own by the export rules
    /// (for `mapsync restore --from-target`): one read transaction, no lock taken.
    pub async fn read_mirror(
        &self,
        redactor: &crate::mapping::Redactor,
    ) -> Result<Vec<Result<Mapping, EntryError>>, TargetError> {
        let err = |e: tokio_postgres::Error| self.error_of(&e);
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
                    .map_err(|e| EntryError::NotJson(e.to_string()))
                    .and_then(|v| Mapping::from_export(&v, redactor))
            })
            .collect())
    }
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
            is_active: Some(m.is_active()),
            updated_at: m.updated_at_micros(),
            source: Some(m.source().as_str()),
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
            updated_at: r.try_get::<Option<Timestamptz>>(7)?.map(|t| t.0),
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

/// The column check, then whether the instance registry exists: sent together, the column
/// check's error first.
async fn checks(tx: &Transaction<'_>, target: &Target) -> Result<bool, TargetError> {
    let (columns, registry) = tokio::join!(
        super::schema::check_columns(tx, target),
        target.registry_exists(tx),
    );
    columns?;
    registry
}

/// The one row of an aggregate's answer.
fn one_row(
    target: &Target,
    rows: Vec<tokio_postgres::Row>,
) -> Result<tokio_postgres::Row, TargetError> {
    rows.into_iter().next().ok_or_else(|| TargetError::Other {
        at: target.display().to_string(),
        reason: "an aggregate query returned no row".into(),
    })
}

/// The mirror's [`RemoteFingerprint`], as `tx` sees it.
async fn fingerprint(
    tx: &Transaction<'_>,
    target: &Target,
) -> Result<RemoteFingerprint, TargetError> {
    let row = tx
        .query_typed(
            &format!(
                "SELECT count(*), coalesce(sum(hashint8extended(xmin::text::bigint, 0)), 0)::text FROM {}",
                target.table.quoted()
            ),
            &[],
        )
        .await
        .map_err(|e| target.error_of(&e))
        .and_then(|rows| one_row(target, rows))?;
    Ok(RemoteFingerprint {
        rows: row.get(0),
        xmins: row.get(1),
    })
}

/// Streams `rows` into `table` with binary COPY. Returns the number of rows written.
async fn copy_in(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&Mapping],
) -> Result<u64, tokio_postgres::Error> {
    let writer = copy_writer(tx, table).await?;
    pin_mut!(writer);
    put_all(writer.as_mut(), rows.iter().copied()).await?;
    writer.finish().await
}

/// [`copy_in`] of the mappings arriving on `chunks`, until the sender is gone.
async fn copy_in_chunks(
    tx: &Transaction<'_>,
    table: &str,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<Arc<Mapping>>>,
) -> Result<u64, tokio_postgres::Error> {
    let writer = copy_writer(tx, table).await?;
    pin_mut!(writer);
    while let Some(chunk) = chunks.recv().await {
        put_all(writer.as_mut(), chunk.iter().map(AsRef::as_ref)).await?;
    }
    writer.finish().await
}

/// [`put`] of every mapping in `rows`, yielding to the runtime now and then.
async fn put_all<'m>(
    mut writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    rows: impl Iterator<Item = &'m Mapping>,
) -> Result<(), tokio_postgres::Error> {
    for (i, m) in rows.enumerate() {
        yield_every(i).await;
        put(writer.as_mut(), m).await?;
    }
    Ok(())
}

/// A binary `COPY table FROM STDIN` of the ten columns.
async fn copy_writer(
    tx: &Transaction<'_>,
    table: &str,
) -> Result<BinaryCopyInWriter, tokio_postgres::Error> {
    let sink = tx
        .copy_in(&format!(
            "COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    Ok(BinaryCopyInWriter::new(sink, &COLUMN_TYPES))
}

/// One mapping's row into a COPY.
async fn put(
    writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    m: &Mapping,
) -> Result<(), tokio_postgres::Error> {
    writer
        .write(&[
            &m.id(),
            &m.scope_type(),
            &m.scope_key(),
            &m.name(),
            &m.default_model(),
            &Jsonb(m.candidates_json()),
            &m.is_active(),
            &m.updated_at_micros().map(Timestamptz),
            &m.source().as_str(),
            &Jsonb(m.mirror_metadata_json()),
        ])
        .await
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
    let rows = tx
        .query_typed(
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
    // An aggregate without GROUP BY answers one row.
    Ok(rows.first().map_or((0, 0), |row| {
        (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
    }))
}

/// [`Txn::write`]'s work, on a bare transaction.
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
                        let reason = super::error_chain(&e);
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

/// A `timestamptz` as the microseconds since the Unix epoch a [`Mapping`] keeps: sent and
/// received as they are, without a `DateTime` in between (Postgres counts from 2000; a
/// value outside `i64` after the shift, such as `infinity`, saturates and so differs from
/// every mapping's).
#[derive(Debug)]
struct Timestamptz(i64);

/// 2000-01-01T00:00:00Z in microseconds since the Unix epoch.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl<'a> FromSql<'a> for Timestamptz {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw: [u8; 8] = raw.try_into().map_err(|_| "a timestamptz is 8 bytes")?;
        Ok(Timestamptz(
            i64::from_be_bytes(raw).saturating_add(POSTGRES_EPOCH_MICROS),
        ))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

impl ToSql for Timestamptz {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_i64(self.0.saturating_sub(POSTGRES_EPOCH_MICROS));
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
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
