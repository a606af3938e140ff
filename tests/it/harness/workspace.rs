//! Running the real `mapsync` binary: a workspace (temp dir, the application's SQLite file, a
//! config file) and one-shot commands whose exit code, stdout and stderr the tests read.
//! The child gets no `MAPSYNC_*` variable from the test's environment, so a developer's
//! shell cannot change what a test sees.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::Value;

use super::{AppDb, PgCluster, Row, TestDb, run_psql, test_db};

/// The binary under test, built by cargo for integration tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mapsync"))
}

/// The eight fields of a sync result (SPEC §4).
pub const SYNC_FIELDS: [&str; 8] = [
    "status",
    "synced_count",
    "changed_count",
    "deleted_count",
    "remote_before",
    "remote_after",
    "duration_ms",
    "trigger",
];

/// A `Command` for the binary with every inherited `MAPSYNC_*` variable removed.
pub fn command() -> Command {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("MAPSYNC_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_BACKTRACE", "0");
    cmd
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout as one JSON document; panics with everything printed when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts the exit code, showing the output when it differs.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }

    /// Everything printed, for "never contains the password" checks.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion.
pub fn run(mut cmd: Command) -> Run {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("the mapsync binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A temp directory holding the application's SQLite file (`db.sqlite3`, WAL mode, the
/// application's connection kept open in `app`), a snapshot directory and a config file.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub app: AppDb,
    pub config: PathBuf,
}

impl Workspace {
    /// A workspace whose config points at `target_url` (none: snapshots-only) plus `extra`
    /// TOML (whole sections, e.g. "[watch]\ndebounce_ms = 50\n").
    pub fn new(target_url: Option<&str>, extra: &str) -> Workspace {
        let dir = tempfile::tempdir().expect("temp dir");
        let app = AppDb::create(&dir.path().join("db.sqlite3"));
        let config = dir.path().join("mapsync.toml");
        let ws = Workspace { dir, app, config };
        ws.write_config(target_url, extra);
        ws
    }

    /// Rewrites the config file: `[source] sqlite_path`, `[snapshot] dir` and `[target] url`
    /// (when given) are added to `extra`'s sections of the same name, or as sections of their
    /// own.
    pub fn write_config(&self, target_url: Option<&str>, extra: &str) {
        let mut toml = extra.to_string();
        let mut put = |section: &str, line: String| {
            let header = format!("[{section}]\n");
            match toml.find(&header) {
                Some(i) => toml.insert_str(i + header.len(), &format!("{line}\n")),
                None => toml.push_str(&format!("\n{header}{line}\n")),
            }
        };
        put("source", format!("sqlite_path = {:?}", self.db_path()));
        put("snapshot", format!("dir = {:?}", self.snapshot_dir()));
        if let Some(url) = target_url {
            put("target", format!("url = {url:?}"));
        }
        std::fs::write(&self.config, toml).expect("write config");
    }

    /// Rewrites the config for a daemon (as [`Workspace::write_config`], plus `[http] listen =
    /// "127.0.0.1:0"` unless `extra` has an `[http]` section, and schedules far away unless
    /// it has a `[schedule]` one: a test's runs are the ones it causes, where the default
    /// reconcile, every five minutes on the clock, started one in any test that crossed the
    /// mark); returns the `admin_token` that `extra` sets, if any.
    pub fn write_daemon_config(&self, target_url: Option<&str>, extra: &str) -> Option<String> {
        let mut extra = extra.to_string();
        if !extra.contains("[http]") {
            extra.push_str("\n[http]\nlisten = \"127.0.0.1:0\"\n");
        }
        if !extra.contains("[schedule]") {
            extra.push_str(FAR_SCHEDULES);
        }
        self.write_config(target_url, &extra);
        extra
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin_token = "))
            .map(|t| t.trim_matches('"').to_string())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("db.sqlite3")
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.path().join("snapshots")
    }

    /// `mapsync --config <this config> <args…>`, run to completion.
    pub fn mapsync(&self, args: &[&str]) -> Run {
        let mut cmd = command();
        cmd.arg("--config").arg(&self.config).args(args);
        run(cmd)
    }

    /// `mapsync sync <args…>`, expected to succeed; returns its result JSON.
    #[track_caller]
    pub fn sync(&self, args: &[&str]) -> Value {
        let mut all = vec!["sync"];
        all.extend_from_slice(args);
        self.mapsync(&all).expect_code(0).json()
    }
}

/// Schedules that do not fire while a test runs (midnight on January 1st).
const FAR_SCHEDULES: &str =
    "\n[schedule]\nreconcile = \"0 0 0 1 1 *\"\nsnapshot = \"0 0 0 1 1 *\"\n";

/// Short debounce so tests run fast; schedules far away so only the watcher, the start-up run
/// and requests act.
pub const FAST: &str = "[log]\nlevel = \"info,mapsync=debug\"\n\n[snapshot]\nmin_interval_s = 0\n\n[watch]\ndebounce_ms = 50\nmax_delay_ms = 500\n\n[schedule]\nreconcile = \"0 0 0 1 1 *\"\nsnapshot = \"0 0 0 1 1 *\"\n";

/// A migrated Supabase-like database and a workspace whose SQLite file holds `seed`.
pub fn mirrored(seed: &[Row]) -> (Workspace, TestDb) {
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    for r in seed {
        ws.app.upsert(r);
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    (ws, db)
}

/// A migrated database with the Supabase roles on a PostgreSQL cluster of the test's own (which
/// it may stop and start), and a workspace whose SQLite file holds `seed`: the cluster, the
/// database's name, its URL and the workspace.
pub fn mirrored_on_own_cluster(seed: &[Row]) -> (PgCluster, String, String, Workspace) {
    let cluster = PgCluster::start();
    let dbname = cluster.create_db();
    cluster.psql(&dbname, SUPABASE_ROLES_SHIM);
    let url = cluster.superuser_url(&dbname);
    let ws = Workspace::new(Some(&url), "");
    for r in seed {
        ws.app.upsert(r);
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    (cluster, dbname, url, ws)
}

/// Timestamped snapshot files (`model-mappings-2…`) in `dir`, sorted by name, so by time.
pub fn snapshot_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("model-mappings-2"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Supabase's API roles and `auth` helpers for a plain PostgreSQL (idempotent; the roles are
/// cluster-wide).
pub const SUPABASE_ROLES_SHIM: &str = include_str!("../../fixtures/supabase_roles_shim.sql");

/// A fresh database on a server that looks like Supabase: the `anon`, `authenticated` and
/// `service_role` roles and the `auth` helpers (tests/fixtures/supabase_roles_shim.sql).
pub fn supabase_db() -> TestDb {
    // Roles are cluster-wide: two tests creating them at once would race.
    static SHIM: Mutex<()> = Mutex::new(());
    let db = test_db();
    let _guard = SHIM.lock().unwrap_or_else(|e| e.into_inner());
    run_psql(&db.url, SUPABASE_ROLES_SHIM)
        .unwrap_or_else(|e| panic!("supabase roles shim failed: {e}"));
    db
}

/// The deployed table as it is on Supabase today (tests/fixtures/deployed_supabase_schema.sql).
pub const DEPLOYED_SCHEMA: &str = include_str!("../../fixtures/deployed_supabase_schema.sql");

/// Every mirrored row as JSON objects keyed by id, read with psql (what a user would see).
pub fn remote_rows(db: &TestDb) -> std::collections::BTreeMap<String, Value> {
    let out = db.psql(
        "SELECT coalesce(json_agg(json_build_object(\
           'id', id, 'scope_type', scope_type, 'scope_key', scope_key, 'name', name, \
           'default_model', default_model, 'candidates', candidates, 'is_active', is_active, \
           'updated_at', to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), \
           'source', source, 'metadata', metadata)), '[]') FROM public.model_mappings",
    );
    let rows: Vec<Value> = serde_json::from_str(out.trim()).expect("json_agg output");
    rows.into_iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect()
}

/// `id → xmin` of every mirrored row: a row rewritten by an UPDATE gets a new xmin.
pub fn xmins(db: &TestDb) -> std::collections::BTreeMap<String, String> {
    db.psql("SELECT id || ' ' || xmin::text FROM public.model_mappings")
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, x)| (id.to_string(), x.to_string()))
        .collect()
}

/// `SELECT count(*)` of the mirror.
pub fn remote_count(db: &TestDb) -> u64 {
    db.psql("SELECT count(*) FROM public.model_mappings")
        .trim()
        .parse()
        .expect("a count")
}

/// `mapsync export` with the mirror's (redacted) metadata: what Postgres must hold.
pub fn mirror_form(ws: &Workspace) -> std::collections::BTreeMap<String, Value> {
    let mut cmd = command();
    cmd.arg("--config")
        .arg(&ws.config)
        .arg("export")
        .env("MAPSYNC_SNAPSHOT__REDACT", "true");
    let out = run(cmd);
    out.expect_code(0);
    out.json()["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m.clone()))
        .collect()
}

/// A timestamp as microseconds, from the export's RFC 3339 or psql's `to_char` form.
fn micros(v: &Value) -> Option<i64> {
    let t = v.as_str()?;
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|t| t.timestamp_micros())
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|t| t.and_utc().timestamp_micros())
        })
        .ok()
}

/// The ten fields of an exported mapping, in order (SPEC §1).
pub const MAPPING_FIELDS: [&str; 10] = [
    "id",
    "scope_type",
    "scope_key",
    "name",
    "default_model",
    "candidates",
    "is_active",
    "updated_at",
    "source",
    "metadata",
];

/// Asserts that Postgres holds exactly the source's mappings, all ten fields of every row,
/// but for `not_mirrored` ids (which it must not hold).
#[track_caller]
pub fn assert_mirror_equals_source(ws: &Workspace, db: &TestDb, not_mirrored: &[&str]) {
    let source = mirror_form(ws);
    let remote = remote_rows(db);
    for id in not_mirrored {
        assert!(source.contains_key(*id), "{id} is in the source");
        assert!(!remote.contains_key(*id), "{id} must not be mirrored");
    }
    let expected: Vec<&String> = source
        .keys()
        .filter(|id| !not_mirrored.contains(&id.as_str()))
        .collect();
    let got: Vec<&String> = remote.keys().collect();
    assert_eq!(got, expected, "the mirror's ids are the source's");
    for (id, m) in &source {
        let Some(r) = remote.get(id) else { continue };
        // The id is the key; updated_at is compared as an instant below.
        for field in MAPPING_FIELDS
            .iter()
            .filter(|f| !["id", "updated_at"].contains(*f))
        {
            assert_eq!(r[*field], m[*field], "{id}: {field}");
        }
        assert_eq!(
            micros(&r["updated_at"]),
            micros(&m["updated_at"]),
            "{id}: updated_at"
        );
    }
}
