//! A Rust port of the application team's `gen_fixture.py`: a SQLite file shaped like the
//! application's, with `rows` realistic model mappings and `prompts` prompt-scoped mappings.
//!
//! Deterministic (splitmix64, fixed seed), same shape as the Python generator, not the same
//! random draws. Row 0 is `global:global`; the others are `mapping` (4 in 5) or `user`, and
//! every 97th row (97, 194, …) is a legacy `tenant` row (the Python script only *may* pick
//! `tenant` there; here it always does, so small fixtures reliably contain one). JSON text is
//! written the way the application's Python writes it (`json.dumps`: `", "` / `": "`
//! separators, non-ASCII kept for mappings).

use std::path::Path;

use rusqlite::{Connection, params};

use super::appdb::{APP_SCHEMA, FIXED_UPDATED_AT};

pub const MODELS: [&str; 10] = [
    "gpt-4o-mini",
    "gpt-4o",
    "claude-opus-4-5-20251101",
    "claude-sonnet-4-5",
    "deepseek-chat",
    "gemini-2.5-flash",
    "qwen-max",
    "glm-4.6",
    "kimi-k2",
    "o4-mini",
];

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A JSON string literal (serde_json escaping; non-ASCII kept, like `ensure_ascii=False`).
fn js(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `json.dumps(list_of_str)`.
fn js_list(items: &[&str]) -> String {
    format!(
        "[{}]",
        items.iter().map(|s| js(s)).collect::<Vec<_>>().join(", ")
    )
}

/// `base + i seconds` in Python's `isoformat()` shape.
fn timestamp(base: chrono::DateTime<chrono::FixedOffset>, i: usize) -> String {
    (base + chrono::Duration::seconds(i as i64))
        .format("%Y-%m-%dT%H:%M:%S+00:00")
        .to_string()
}

/// Fill `db` (created if missing; `CREATE TABLE IF NOT EXISTS`, `INSERT OR REPLACE`) in one
/// transaction. `wal`: switch the file to WAL first, as the application does.
pub fn generate(db: &Path, rows: usize, prompts: usize, wal: bool) {
    let mut conn = Connection::open(db).unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    if wal {
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .expect("PRAGMA journal_mode = WAL");
        assert_eq!(mode.to_lowercase(), "wal");
    }
    // Enough page cache to build the whole file in memory before the single commit.
    conn.execute_batch("PRAGMA cache_size = -65536")
        .expect("cache_size");
    conn.execute_batch(APP_SCHEMA).expect("app schema");
    let mut rng = Rng(7);
    let base = chrono::DateTime::parse_from_rfc3339(FIXED_UPDATED_AT).expect("base time");
    let tx = conn.transaction().expect("begin");
    {
        let mut ins = tx
            .prepare(
                "INSERT OR REPLACE INTO llm_model_mappings (id, scope_type, scope_key, name, \
                 default_model, candidates_json, is_active, updated_at, metadata_json) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .expect("prepare insert");
        for i in 0..rows {
            let scope = if i == 0 {
                "global"
            } else if i % 97 == 0 {
                "tenant"
            } else {
                // Python: choice(["mapping", "user", "mapping", "mapping", "mapping"])
                ["mapping", "user", "mapping", "mapping", "mapping"][rng.range(0, 4) as usize]
            };
            let key = if scope == "global" {
                "global".to_string()
            } else {
                format!("{scope}-key-{i}")
            };
            // random.sample(MODELS, randint(1, 4)): partial Fisher–Yates.
            let k = rng.range(1, 4) as usize;
            let mut pool = MODELS;
            for j in 0..k {
                let r = rng.range(j as u64, (MODELS.len() - 1) as u64) as usize;
                pool.swap(j, r);
            }
            let cands = &pool[..k];
            let mut meta = vec![format!("\"preferred_endpoint_id\": {}", rng.range(1, 9))];
            if i % 5 == 0 {
                meta.push("\"required_tier\": \"pro\"".into());
            }
            if i % 7 == 0 {
                // round(random(), 2) printed like Python's repr (0.0, 0.5, 0.37, 1.0)
                let t = rng.range(0, 100) as f64 / 100.0;
                meta.push(format!("\"temperature\": {t:?}"));
            }
            if i % 11 == 0 {
                meta.push(format!("\"note\": {}", js(&format!("映射名 {i}"))));
            }
            ins.execute(params![
                format!("{scope}:{key}"),
                scope,
                key,
                format!("Mapping {i}"),
                cands[0],
                js_list(cands),
                if i % 13 == 0 { 0 } else { 1 },
                timestamp(base, i),
                format!("{{{}}}", meta.join(", ")),
            ])
            .expect("insert mapping");
        }
        let mut ins = tx
            .prepare(
                "INSERT INTO ai_prompts (name, content, version, category, tools_json, \
                 prompt_type, is_active, updated_at) \
                 VALUES (?1, 'You are GymBro.', 'v1', 'system', ?2, 'tools', 1, ?3)",
            )
            .expect("prepare prompt insert");
        for p in 0..prompts {
            let tools = format!(
                "{{\"tools\": [{{\"type\": \"function\", \"function\": {{\"name\": \"log_workout\"}}}}], \
                 \"__model_mapping\": {{\"default_model\": {}, \"candidates\": {}, \
                 \"is_active\": true, \"updated_at\": {}, \"metadata\": {{}}}}}}",
                js(MODELS[p % MODELS.len()]),
                js_list(&MODELS[..3]),
                js(FIXED_UPDATED_AT)
            );
            ins.execute(params![format!("prompt-{p}"), tools, FIXED_UPDATED_AT])
                .expect("insert prompt");
        }
    }
    tx.commit().expect("commit fixture");
}
