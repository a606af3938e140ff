//! The APPLICATION's side of the SQLite file: its own connection, WAL mode, foreign keys on,
//! autocommit (every statement commits on its own, like the application's backend), and a
//! 5 s busy timeout (Python's `sqlite3.connect` default). Use it to create the file the
//! daemon watches and to change it while the daemon runs.

use std::path::Path;

use rusqlite::{Connection, params};

/// The application's schema (tests/fixtures/app_sqlite_schema.sql).
pub const APP_SCHEMA: &str = include_str!("../../fixtures/app_sqlite_schema.sql");

/// Fixed `updated_at` of [`Row::mapping`] (and the fixture generator's base time).
pub const FIXED_UPDATED_AT: &str = "2026-01-16T08:21:05+00:00";

pub struct AppDb {
    conn: Connection,
}

/// One `llm_model_mappings` row as the application stores it (`created_at` left to its default).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub id: String,
    pub scope_type: String,
    pub scope_key: String,
    pub name: Option<String>,
    pub default_model: Option<String>,
    pub candidates_json: Option<String>,
    pub is_active: Option<i64>,
    pub updated_at: Option<String>,
    pub metadata_json: Option<String>,
}

impl Row {
    /// `mapping:<key>` → default `model`, candidates `[model]` (Python `json.dumps` format),
    /// active, `updated_at` [`FIXED_UPDATED_AT`], metadata `{}`.
    pub fn mapping(key: &str, model: &str) -> Row {
        Row {
            id: format!("mapping:{key}"),
            scope_type: "mapping".into(),
            scope_key: key.into(),
            name: Some(key.into()),
            default_model: Some(model.into()),
            candidates_json: Some(format!("[{}]", serde_json::Value::from(model))),
            is_active: Some(1),
            updated_at: Some(FIXED_UPDATED_AT.into()),
            metadata_json: Some("{}".into()),
        }
    }

    /// `n` such rows with the model `gpt-4o`: keys `<prefix>000`, `<prefix>001`, …
    pub fn numbered(prefix: &str, n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row::mapping(&format!("{prefix}{i:03}"), "gpt-4o"))
            .collect()
    }
}

impl AppDb {
    /// Create (or open) the file and apply the application's schema, in WAL mode.
    pub fn create(path: &Path) -> AppDb {
        let db = Self::open(path);
        db.exec(APP_SCHEMA);
        db
    }

    /// Open an existing file the way the application does.
    pub fn open(path: &Path) -> AppDb {
        let conn =
            Connection::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .expect("busy_timeout");
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .expect("PRAGMA journal_mode = WAL");
        assert_eq!(
            mode.to_lowercase(),
            "wal",
            "journal_mode of {}",
            path.display()
        );
        conn.execute_batch("PRAGMA foreign_keys = ON")
            .expect("PRAGMA foreign_keys");
        AppDb { conn }
    }

    /// `INSERT OR REPLACE INTO llm_model_mappings …` (one autocommitted statement).
    pub fn upsert(&self, m: &Row) {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO llm_model_mappings (id, scope_type, scope_key, name, \
                 default_model, candidates_json, is_active, updated_at, metadata_json) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    m.id,
                    m.scope_type,
                    m.scope_key,
                    m.name,
                    m.default_model,
                    m.candidates_json,
                    m.is_active,
                    m.updated_at,
                    m.metadata_json
                ],
            )
            .unwrap_or_else(|e| panic!("upsert {}: {e}", m.id));
    }

    pub fn delete(&self, id: &str) {
        self.conn
            .execute("DELETE FROM llm_model_mappings WHERE id = ?1", [id])
            .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    }

    /// `execute_batch` (each statement commits on its own unless the SQL says BEGIN … COMMIT).
    pub fn exec(&self, sql: &str) {
        self.conn
            .execute_batch(sql)
            .unwrap_or_else(|e| panic!("exec failed: {e}\nSQL: {sql}"));
    }

    /// A row in `ai_prompts` (content "You are GymBro.", prompt_type 'tools', active); returns its id.
    pub fn insert_prompt(
        &self,
        name: &str,
        version: &str,
        category: &str,
        tools_json: &str,
    ) -> i64 {
        self.conn
            .execute(
                "INSERT INTO ai_prompts (name, content, version, category, tools_json, \
                 prompt_type, is_active, updated_at) VALUES (?1, 'You are GymBro.', ?2, ?3, ?4, \
                 'tools', 1, ?5)",
                params![name, version, category, tools_json, FIXED_UPDATED_AT],
            )
            .unwrap_or_else(|e| panic!("insert prompt {name}: {e}"));
        self.conn.last_insert_rowid()
    }

    /// `PRAGMA wal_checkpoint(TRUNCATE)` → (busy, log frames, checkpointed frames). `busy` is 0
    /// unless a reader pins the WAL for longer than the 5 s busy timeout.
    pub fn checkpoint_truncate(&self) -> (i64, i64, i64) {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("PRAGMA wal_checkpoint(TRUNCATE)")
    }

    /// Number of rows in `llm_model_mappings`.
    pub fn count(&self) -> i64 {
        self.value("SELECT count(*) FROM llm_model_mappings")
    }

    /// The one value `sql` selects.
    pub fn value<T: rusqlite::types::FromSql>(&self, sql: &str) -> T {
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}
