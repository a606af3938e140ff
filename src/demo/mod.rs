//! `mapsync demo`: the first command a newcomer runs. Creates `./demo/db.sqlite3` with the
//! application's schema and a score of realistic mappings (when it does not exist yet), then
//! runs the daemon on it: snapshots under `./demo/snapshots`, the admin page on
//! `http.listen` (127.0.0.1:9187 unless configured), and the Postgres mirror: the database
//! in `MAPSYNC_TARGET__URL` when set, or else, when PostgreSQL's server is installed, a
//! throwaway cluster of the demo's own under `./demo/postgres` (`postgres`), stopped when
//! the demo stops. Without either it runs snapshots-only and says how to get the rest.

mod postgres;

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::Error;
use crate::config::Settings;

pub use postgres::DemoPostgres;

use crate::appdb::schema::APP_SCHEMA;

/// One demo row of `llm_model_mappings`, as the application stores it (its id is
/// `scope_type:scope_key`).
struct Row {
    scope_type: &'static str,
    scope_key: &'static str,
    name: &'static str,
    model: &'static str,
    candidates: &'static str,
    active: i64,
    metadata: &'static str,
}

const fn row(
    scope_type: &'static str,
    scope_key: &'static str,
    name: &'static str,
    model: &'static str,
    candidates: &'static str,
    active: i64,
    metadata: &'static str,
) -> Row {
    Row {
        scope_type,
        scope_key,
        name,
        model,
        candidates,
        active,
        metadata,
    }
}

#[rustfmt::skip]
const MAPPINGS: &[Row] = &[
    row("global", "global", "Global default", "gpt-4o-mini", r#"["gpt-4o-mini", "deepseek-chat", "gemini-2.5-flash"]"#, 1, r#"{"preferred_endpoint_id": 1, "temperature": 0.7}"#),
    row("mapping", "xai", "xAI chat", "grok-4", r#"["grok-4", "gpt-4o"]"#, 1, r#"{"preferred_endpoint_id": 3, "type": "chat"}"#),
    row("mapping", "coach", "Workout coach", "claude-sonnet-4-5", r#"["claude-sonnet-4-5", "gpt-4o", "qwen-max"]"#, 1, r#"{"preferred_endpoint_id": 2, "required_tier": "pro", "temperature": 0.4}"#),
    row("mapping", "nutrition", "Nutrition planner", "gpt-4o", r#"["gpt-4o", "claude-opus-4-5-20251101"]"#, 1, r#"{"preferred_endpoint_id": 2, "max_tokens": 2048}"#),
    row("mapping", "summary", "Session summary", "gemini-2.5-flash", r#"["gemini-2.5-flash", "gpt-4o-mini"]"#, 1, r#"{"preferred_endpoint_id": 4}"#),
    row("mapping", "vision", "Form check (vision)", "gpt-4o", r#"["gpt-4o", "gemini-2.5-flash"]"#, 1, r#"{"preferred_endpoint_id": 2, "type": "vision"}"#),
    row("mapping", "embeddings", "Embeddings", "text-embedding-3-small", r#"["text-embedding-3-small"]"#, 1, r#"{"type": "embedding"}"#),
    row("mapping", "translate", "翻译 (translation)", "qwen-max", r#"["qwen-max", "glm-4.6", "deepseek-chat"]"#, 1, r#"{"preferred_endpoint_id": 5, "note": "映射名 translate"}"#),
    row("mapping", "kimi", "Long context", "kimi-k2", r#"["kimi-k2", "claude-sonnet-4-5"]"#, 1, r#"{"preferred_endpoint_id": 6, "max_tokens": 8192}"#),
    row("mapping", "reasoning", "Reasoning", "o4-mini", r#"["o4-mini", "deepseek-reasoner"]"#, 1, r#"{"required_tier": "pro", "api_key": "sk-demo-kept-in-snapshots-not-in-postgres"}"#),
    row("mapping", "legacy-beta", "Beta (disabled)", "gpt-4o-mini", r#"["gpt-4o-mini"]"#, 0, r#"{"env": "beta"}"#),
    row("tenant", "acme", "Acme (legacy tenant row)", "gpt-4o", r#"["gpt-4o", "gpt-4o-mini"]"#, 1, r#"{"preferred_endpoint_id": 1, "source": "import"}"#),
    row("user", "1001", "Alice's override", "claude-sonnet-4-5", r#"["claude-sonnet-4-5"]"#, 1, r#"{}"#),
    row("user", "1002", "Bob's override", "deepseek-chat", r#"["deepseek-chat", "gpt-4o-mini"]"#, 1, r#"{"temperature": 0.2}"#),
    row("user", "1003", "Carol's override", "gpt-4o", r#"["gpt-4o"]"#, 1, r#"{"preferred_endpoint_id": 2}"#),
    row("premium_user", "gold", "Gold members", "claude-opus-4-5-20251101", r#"["claude-opus-4-5-20251101", "gpt-4o"]"#, 1, r#"{"required_tier": "gold"}"#),
    row("premium_user", "silver", "Silver members", "claude-sonnet-4-5", r#"["claude-sonnet-4-5", "gpt-4o-mini"]"#, 1, r#"{"required_tier": "silver"}"#),
    row("module", "planner", "Planner module", "gpt-4o", r#"["gpt-4o", "qwen-max"]"#, 1, r#"{"preferred_endpoint_id": 3}"#),
    row("module", "chat", "Chat module", "gpt-4o-mini", r#"["gpt-4o-mini", "gemini-2.5-flash", "glm-4.6"]"#, 1, r#"{"preferred_endpoint_id": 1}"#),
];

/// Where the demo lives, relative to the working directory.
pub fn dir() -> PathBuf {
    PathBuf::from("demo")
}

/// Creates the demo database under `dir` unless it exists; returns its path.
pub fn create(dir: &Path) -> Result<PathBuf, Error> {
    let db = dir.join("db.sqlite3");
    if db.exists() {
        return Ok(db);
    }
    let fail = |e: &dyn std::fmt::Display| {
        Error::Other(format!(
            "cannot create the demo database {}: {e}",
            db.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    let mut conn = Connection::open(&db).map_err(|e| fail(&e))?;
    conn.execute_batch("PRAGMA journal_mode = WAL;")
        .map_err(|e| fail(&e))?;
    conn.execute_batch(APP_SCHEMA).map_err(|e| fail(&e))?;
    let tx = conn.transaction().map_err(|e| fail(&e))?;
    let base = chrono::Utc::now() - chrono::Duration::days(3);
    for (i, r) in MAPPINGS.iter().enumerate() {
        let updated_at = (base + chrono::Duration::minutes(37 * i as i64))
            .format("%Y-%m-%dT%H:%M:%S+00:00")
            .to_string();
        tx.execute(
            "INSERT INTO llm_model_mappings (id, scope_type, scope_key, name, default_model, candidates_json, is_active, updated_at, metadata_json) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![format!("{}:{}", r.scope_type, r.scope_key), r.scope_type, r.scope_key, r.name, r.model, r.candidates, r.active, updated_at, r.metadata],
        )
        .map_err(|e| fail(&e))?;
    }
    let tools = serde_json::json!({
        "tools": [{"type": "function", "function": {"name": "log_workout"}}],
        "__model_mapping": {
            "default_model": "gpt-4o-mini",
            "candidates": ["gpt-4o-mini", "claude-sonnet-4-5"],
            "is_active": true,
            "updated_at": base.format("%Y-%m-%dT%H:%M:%S+00:00").to_string(),
        },
    });
    tx.execute(
        "INSERT INTO ai_prompts (name, content, version, category, tools_json, prompt_type, is_active) \
         VALUES ('Workout logger', 'You are GymBro. Log the workout the user describes.', 'v3', 'coaching', ?1, 'tools', 1)",
        [tools.to_string()],
    )
    .map_err(|e| fail(&e))?;
    tx.commit().map_err(|e| fail(&e))?;
    Ok(db)
}

/// Where the demo mirrors to.
pub enum DemoTarget {
    /// `MAPSYNC_TARGET__URL`.
    Given(String),
    /// The demo's own cluster (stopped when this is dropped).
    Own(DemoPostgres),
    /// Snapshots only: `no_postgres` asked for it, or PostgreSQL's server is not installed.
    None { installed: bool },
}

impl DemoTarget {
    /// `MAPSYNC_TARGET__URL` when set; else the demo's own cluster, unless `no_postgres` or
    /// PostgreSQL's server is missing.
    pub fn choose(given: Option<String>, no_postgres: bool) -> Result<DemoTarget, Error> {
        if let Some(url) = given.filter(|u| !u.trim().is_empty()) {
            return Ok(DemoTarget::Given(url));
        }
        match DemoPostgres::binaries() {
            Some(_) if no_postgres => Ok(DemoTarget::None { installed: true }),
            Some(bin) => Ok(DemoTarget::Own(DemoPostgres::start(&dir(), bin)?)),
            None => Ok(DemoTarget::None { installed: false }),
        }
    }

    fn url(&self) -> Option<String> {
        match self {
            DemoTarget::Given(url) => Some(url.clone()),
            DemoTarget::Own(pg) => Some(pg.url()),
            DemoTarget::None { .. } => None,
        }
    }
}

/// `mapsync demo`: the demo file (created once), its mirror, the banner, then the daemon
/// until a signal. The demo's own cluster is migrated first and stopped last.
pub async fn run(base: Settings, no_postgres: bool) -> Result<(), Error> {
    let db = create(&dir())?;
    let target = DemoTarget::choose(std::env::var("MAPSYNC_TARGET__URL").ok(), no_postgres)?;
    let settings = settings(base, db, target.url())?;
    if let DemoTarget::Own(_) = target {
        crate::commands::migrate(&settings).await?;
    }
    println!("{}", banner(&settings, &target));
    let result = crate::daemon::run_until_signalled(settings).await;
    drop(target);
    result
}

/// The demo's settings: the demo file and snapshot directory, the admin port as configured
/// (127.0.0.1:9187 by default), and `target_url` as the target (a config file's target is
/// ignored, so the demo never writes to a real mirror by accident).
pub fn settings(
    base: Settings,
    db: PathBuf,
    target_url: Option<String>,
) -> Result<Settings, crate::config::ConfigError> {
    let mut s = base;
    s.source.sqlite_path = db;
    s.snapshot.dir = dir().join("snapshots");
    s.target.set_url(
        target_url
            .filter(|u| !u.trim().is_empty())
            .map(crate::config::Secret::new),
    )?;
    Ok(s)
}

/// What the demo prints before it starts (never a password).
pub fn banner(settings: &Settings, target: &DemoTarget) -> String {
    let addr = settings.http.listen;
    let token = if settings.http.admin_token.is_some() {
        " -H \"Authorization: Bearer $TOKEN\""
    } else {
        ""
    };
    let target = match target {
        DemoTarget::Given(_) => "MAPSYNC_TARGET__URL".to_string(),
        DemoTarget::Own(pg) => format!(
            "the demo's own PostgreSQL (data in {}), stopped with the demo\n\
             look at it:  {}",
            pg.data_dir().display(),
            pg.psql_line()
        ),
        DemoTarget::None { installed: true } => "none (--no-postgres)".to_string(),
        DemoTarget::None { installed: false } => {
            format!("none, snapshots only: {}", postgres::INSTALL_HINT)
        }
    };
    format!(
        "mapsync demo: {} mappings in {}, snapshots in {}, target: {target}\n\
         admin page:  http://{addr}/\n\
         try:         curl -s{token} -X POST http://{addr}/api/v1/llm/model-groups/sync-to-supabase\n\
         \x20            curl -s{token} -OJ http://{addr}/export\n\
         stop with Ctrl-C",
        MAPPINGS.len() + 1,
        settings.source.sqlite_path.display(),
        settings.snapshot.dir.display(),
    )
}
