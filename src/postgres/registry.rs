//! `public.mapsync_instances` (SPEC §2): which mapsync instances write a table, so that two
//! instances mirroring different SQLite files into one table never delete each other's rows.
//!
//! Every statement runs inside the run's own transaction, after its advisory lock: the check
//! and the record are consistent with the rows the run writes. The registry is optional: on a
//! database where `sql/004_mapsync_instances.sql` has not run, runs go on without the guard
//! (and say so once in the log; `mapsync check` reports it). Whether it exists is asked once,
//! with the transaction's opening statements ([`Target::registry_exists`]); the check and the
//! record are only sent when it does (a query on a missing table would abort the run).

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use tokio_postgres::Transaction;
use tokio_postgres::types::Type;

use super::{Target, TargetError};

/// The registry table.
pub const REGISTRY: &str = "public.mapsync_instances";

/// Another instance seen in the registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OtherInstance {
    pub name: String,
    pub host: Option<String>,
    pub sqlite_path: Option<String>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_status: Option<String>,
}

impl std::fmt::Display for OtherInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` (host {}, SQLite file {}",
            self.name,
            self.host.as_deref().unwrap_or("?"),
            self.sqlite_path.as_deref().unwrap_or("?"),
        )?;
        if let Some(at) = self.last_run_at {
            write!(f, ", last wrote {}", crate::mapping::format_timestamp(&at))?;
        }
        f.write_str(")")
    }
}

/// Logged once per process when the registry is missing.
static MISSING_REPORTED: AtomicBool = AtomicBool::new(false);

impl Target {
    /// Whether the registry table exists on this database.
    pub(super) async fn registry_exists(&self, tx: &Transaction<'_>) -> Result<bool, TargetError> {
        let row = tx
            .query_typed(
                "SELECT to_regclass($1) IS NOT NULL",
                &[(&REGISTRY, Type::TEXT)],
            )
            .await
            .map_err(|e| self.error_of(&e))?;
        let exists = row.first().is_some_and(|r| r.get::<_, bool>(0));
        if !exists && !MISSING_REPORTED.swap(true, Ordering::Relaxed) {
            tracing::warn!(target = %self.display(),
                "{REGISTRY} is missing, so runs cannot tell whether another mapsync instance writes {}: run `mapsync migrate` (sql/004_mapsync_instances.sql)",
                self.table());
        }
        Ok(exists)
    }

    /// The other instances recorded for this table (those that wrote it within
    /// `target.instance_grace_s` when `recent_only`), from a registry that exists.
    pub(super) async fn others(
        &self,
        tx: &Transaction<'_>,
        recent_only: bool,
    ) -> Result<Vec<OtherInstance>, TargetError> {
        let grace = self.identity.grace.as_secs_f64();
        let rows = tx
            .query_typed(
                &format!(
                    "SELECT name, host, sqlite_path, last_run_at, last_status FROM {REGISTRY} \
                     WHERE target_table = $1 AND name <> $2 \
                     AND (NOT $3 OR last_run_at > now() - make_interval(secs => $4)) \
                     ORDER BY last_run_at DESC NULLS LAST"
                ),
                &[
                    (&self.table().to_string(), Type::TEXT),
                    (&self.identity.instance.name, Type::TEXT),
                    (&recent_only, Type::BOOL),
                    (&grace, Type::FLOAT8),
                ],
            )
            .await
            .map_err(|e| self.error_of(&e))?;
        Ok(rows
            .iter()
            .map(|r| OtherInstance {
                name: r.get(0),
                host: r.get(1),
                sqlite_path: r.get(2),
                last_run_at: r.get(3),
                last_status: r.get(4),
            })
            .collect())
    }

    /// Records this instance's run in a registry that exists: `wrote` moves `last_run_at` to
    /// now (a run that synced), otherwise only `last_status` changes (a refused run wrote
    /// nothing).
    pub(super) async fn record_run(
        &self,
        tx: &Transaction<'_>,
        status: &str,
        wrote: bool,
    ) -> Result<(), TargetError> {
        let me = &self.identity.instance;
        tx.execute_typed(
            &format!(
                "INSERT INTO {REGISTRY} AS r (name, target_table, host, sqlite_path, version, last_run_at, last_status) \
                 VALUES ($1, $2, $3, $4, $5, CASE WHEN $6 THEN now() END, $7) \
                 ON CONFLICT (name, target_table) DO UPDATE SET host = EXCLUDED.host, \
                 sqlite_path = EXCLUDED.sqlite_path, version = EXCLUDED.version, \
                 last_run_at = CASE WHEN $6 THEN now() ELSE r.last_run_at END, \
                 last_status = EXCLUDED.last_status"
            ),
            &[
                (&me.name, Type::TEXT),
                (&self.table().to_string(), Type::TEXT),
                (&me.host, Type::TEXT),
                (&me.sqlite_path, Type::TEXT),
                (&env!("CARGO_PKG_VERSION"), Type::TEXT),
                (&wrote, Type::BOOL),
                (&status, Type::TEXT),
            ],
        )
        .await
        .map_err(|e| self.error_of(&e))?;
        Ok(())
    }

    /// Every other instance recorded for this table (for `mapsync check`), or `None` when
    /// the registry is missing.
    pub async fn instances(&self) -> Result<Option<Vec<OtherInstance>>, TargetError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error_of(&e))?;
        if !self.registry_exists(&tx).await? {
            return Ok(None);
        }
        let others = self.others(&tx, false).await?;
        tx.commit().await.map_err(|e| self.error_of(&e))?;
        Ok(Some(others))
    }

    /// This instance's name in the registry.
    pub fn instance_name(&self) -> &str {
        &self.identity.instance.name
    }

    /// `target.instance_grace_s`.
    pub fn instance_grace(&self) -> std::time::Duration {
        self.identity.grace
    }
}
