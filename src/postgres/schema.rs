//! The target table's shape: the column check every run makes, and `mapsync migrate`.
//!
//! The SQL in `sql/` is compiled into the binary, so `mapsync migrate` applies exactly the
//! files a Supabase admin would paste into the SQL editor. Each file is idempotent and wraps
//! itself in a transaction.

use tokio_postgres::Transaction;
use tokio_postgres::types::Type;

use super::{Target, TargetError};

/// The scripts `mapsync migrate` applies, in order. `sql/003_mapsync_role.sql` (the optional
/// least-privilege role) is deliberately not among them; `sql/004` grants that role its rights
/// on the registry when the role already exists.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "sql/001_model_mappings.sql",
        include_str!("../../sql/001_model_mappings.sql"),
    ),
    (
        "sql/002_security.sql",
        include_str!("../../sql/002_security.sql"),
    ),
    (
        "sql/004_mapsync_instances.sql",
        include_str!("../../sql/004_mapsync_instances.sql"),
    ),
];

/// The columns mapsync reads and writes, with their types as `format_type` prints them.
/// `synced_at` is not written by mapsync; its presence shows that `sql/001` ran (and so that
/// the trigger no longer overwrites the pushed `updated_at`).
const EXPECTED: &[(&str, &str)] = &[
    ("id", "text"),
    ("scope_type", "text"),
    ("scope_key", "text"),
    ("name", "text"),
    ("default_model", "text"),
    ("candidates", "jsonb"),
    ("is_active", "boolean"),
    ("updated_at", "timestamp with time zone"),
    ("source", "text"),
    ("metadata", "jsonb"),
    ("synced_at", "timestamp with time zone"),
];

/// Fails with [`TargetError::MissingTable`] or [`TargetError::WrongColumns`] unless the table
/// has every expected column with the expected type.
pub(super) async fn check_columns(
    tx: &Transaction<'_>,
    target: &Target,
) -> Result<(), TargetError> {
    let rows = tx
        .query_typed(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[(&target.table.quoted(), Type::TEXT)],
        )
        .await
        .map_err(|e| target.error_of(&e))?;
    if rows.is_empty() {
        return Err(TargetError::MissingTable {
            table: target.table.to_string(),
            at: target.display().to_string(),
        });
    }
    let found: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let problems: Vec<String> = EXPECTED
        .iter()
        .filter_map(|(name, ty)| match found.iter().find(|(n, _)| n == name) {
            None => Some(format!("{name} is missing")),
            Some((_, t)) if t != ty => Some(format!("{name} is {t}, expected {ty}")),
            Some(_) => None,
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TargetError::WrongColumns {
            table: target.table.to_string(),
            at: target.display().to_string(),
            problems: problems.join(", "),
        })
    }
}

impl Target {
    /// Checks the table's columns in a transaction of its own (`mapsync check`, `/readyz`).
    pub async fn check_schema(&self) -> Result<(), TargetError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error_of(&e))?;
        check_columns(&tx, self).await?;
        tx.commit().await.map_err(|e| self.error_of(&e))
    }

    /// Applies [`MIGRATIONS`] in order; returns the names applied. Each script is idempotent,
    /// so running this twice is harmless.
    pub async fn migrate(&self) -> Result<Vec<&'static str>, TargetError> {
        if self.table.schema != "public" || self.table.table != "model_mappings" {
            return Err(TargetError::Other {
                at: self.display().to_string(),
                reason: format!(
                    "`mapsync migrate` manages public.model_mappings only, and target.table is {}: apply the files in sql/ by hand with your table name",
                    self.table
                ),
            });
        }
        let client = self.client().await?;
        let mut applied = Vec::new();
        for (name, sql) in MIGRATIONS {
            client
                .batch_execute(sql)
                .await
                .map_err(|e| TargetError::Migration {
                    script: name,
                    source: Box::new(self.error_of(&e)),
                })?;
            applied.push(*name);
        }
        Ok(applied)
    }
}
