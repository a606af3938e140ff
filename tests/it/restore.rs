//! `mapsync restore` end to end through the library function: a SQLite file in WAL mode, held
//! open by the application's connection, snapshots written by the real binary's `export`, and
//! what a user then sees in the file (through the application's own connection).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::appdb::FIXED_UPDATED_AT;
use crate::harness::workspace::Workspace;
use crate::harness::*;
use mapsync::appdb::restore::{
    Entries, EntryResult, RestoreError, RestoreOptions, RestoreReport, restore,
};
use mapsync::config::Settings;
use mapsync::mapping::Redactor;
use serde_json::{Value, json};

fn settings(ws: &Workspace) -> Settings {
    Settings::load_with_env(Some(&ws.config), std::iter::empty()).expect("valid config")
}

/// `mapsync export -o <name>` with the real binary; returns the file.
fn export(ws: &Workspace, name: &str) -> PathBuf {
    let path = ws.path().join(name);
    ws.mapsync(&["export", "-o", path.to_str().unwrap()])
        .expect_code(0);
    path
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(ws: &Workspace, name: &str, v: &Value) -> PathBuf {
    let path = ws.path().join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    path
}

#[track_caller]
fn run(ws: &Workspace, file: &Path, dry_run: bool) -> RestoreReport {
    try_run(ws, file, dry_run).unwrap_or_else(|e| panic!("restore failed: {e}"))
}

fn try_run(ws: &Workspace, file: &Path, dry_run: bool) -> Result<RestoreReport, RestoreError> {
    restore_file(&settings(ws), file, dry_run)
}

/// The library's restore of `file` with settings `s`.
fn restore_file(s: &Settings, file: &Path, dry_run: bool) -> Result<RestoreReport, RestoreError> {
    let entries = Entries::from_file(file, &Redactor::new(&s.snapshot.redact_keys))?;
    let opts = RestoreOptions {
        dry_run,
        ..Default::default()
    };
    restore(s, entries, &opts)
}

/// (result, reason) of the entry with normalised id `id`.
#[track_caller]
fn outcome(report: &RestoreReport, id: &str) -> (EntryResult, Option<String>) {
    let e = report
        .entries
        .iter()
        .find(|e| e.id.as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no entry {id} in {report:#?}"));
    (e.result, e.reason.clone())
}

/// One stored row of `llm_model_mappings`, read through the application's connection.
fn stored(app: &AppDb, id: &str) -> Option<Row> {
    app.conn()
        .query_row(
            "SELECT id, scope_type, scope_key, name, default_model, candidates_json, is_active, \
             updated_at, metadata_json FROM llm_model_mappings WHERE id = ?1",
            [id],
            |r| {
                Ok(Row {
                    id: r.get(0)?,
                    scope_type: r.get(1)?,
                    scope_key: r.get(2)?,
                    name: r.get(3)?,
                    default_model: r.get(4)?,
                    candidates_json: r.get(5)?,
                    is_active: r.get(6)?,
                    updated_at: r.get(7)?,
                    metadata_json: r.get(8)?,
                })
            },
        )
        .ok()
}

fn created_at(app: &AppDb, id: &str) -> String {
    app.conn()
        .query_row(
            "SELECT created_at FROM llm_model_mappings WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
}

fn tools_json(app: &AppDb, prompt: i64) -> String {
    app.conn()
        .query_row(
            "SELECT tools_json FROM ai_prompts WHERE id = ?1",
            [prompt],
            |r| r.get(0),
        )
        .unwrap()
}

/// Every stored value of both tables, for "nothing changed" checks.
fn dump(app: &AppDb) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT * FROM llm_model_mappings ORDER BY rowid",
        "SELECT * FROM ai_prompts ORDER BY id",
    ] {
        let mut stmt = app.conn().prepare(sql).unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| r.get::<_, rusqlite::types::Value>(i))
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap();
        out.extend(rows.map(|r| format!("{:?}", r.unwrap())));
    }
    out
}

fn data_version(app: &AppDb) -> i64 {
    app.conn()
        .query_row("PRAGMA data_version", [], |r| r.get(0))
        .unwrap()
}

/// The mappings of an export, keyed by id.
fn mappings_of(doc: &Value) -> std::collections::BTreeMap<String, Value> {
    doc["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m.clone()))
        .collect()
}

fn unicode_row() -> Row {
    Row {
        name: Some("映射名 β".into()),
        default_model: Some("通义千问".into()),
        candidates_json: Some(r#"["通义千问", "模型-β"]"#.into()),
        metadata_json: Some(r#"{"note": "映射名 11", "temperature": 0.37}"#.into()),
        ..Row::mapping("中文", "通义千问")
    }
}

/// A workspace with `global:global`, five plain mappings and a unicode one.
fn populated() -> Workspace {
    let ws = Workspace::new(None, "");
    let mut global = Row::mapping("global", "gpt-4o");
    global.id = "global:global".into();
    global.scope_type = "global".into();
    ws.app.upsert(&global);
    for key in ["a", "b", "c", "d", "e"] {
        ws.app.upsert(&Row::mapping(key, "gpt-4o-mini"));
    }
    ws.app.upsert(&unicode_row());
    ws
}

#[test]
fn restore_brings_back_changed_and_deleted_rows_and_never_deletes() {
    let ws = populated();
    let snapshot = export(&ws, "before.json");

    // The application changes one row, deletes two and adds one.
    ws.app.upsert(&Row {
        default_model: Some("deepseek-chat".into()),
        candidates_json: Some(r#"["deepseek-chat"]"#.into()),
        is_active: Some(0),
        ..Row::mapping("a", "gpt-4o-mini")
    });
    ws.app.delete("mapping:b");
    ws.app.delete("mapping:中文");
    ws.app.upsert(&Row::mapping("extra", "kimi-k2"));
    // (The test's upsert is INSERT OR REPLACE, which re-stamps created_at: read it after.)
    let created_a = created_at(&ws.app, "mapping:a");

    let t = Instant::now();
    let report = run(&ws, &snapshot, false);
    eprintln!("restore of 7 entries: {:?}", t.elapsed());
    assert_eq!(
        (
            report.imported,
            report.unchanged,
            report.skipped,
            report.errors
        ),
        (3, 4, 0, 0),
        "{report:#?}"
    );
    assert!(!report.dry_run);
    assert_eq!(report.file, snapshot.display().to_string());
    assert_eq!(outcome(&report, "mapping:a").0, EntryResult::Imported);
    assert_eq!(
        outcome(&report, "mapping:b"),
        (EntryResult::Imported, Some("inserted".into()))
    );
    assert_eq!(
        outcome(&report, "mapping:c"),
        (EntryResult::Unchanged, None)
    );

    // What the application's own (still open) connection now sees.
    assert_eq!(
        ws.app.count(),
        8,
        "7 restored + the extra row, nothing deleted"
    );
    assert_eq!(
        stored(&ws.app, "mapping:extra"),
        Some(Row::mapping("extra", "kimi-k2"))
    );
    assert_eq!(
        stored(&ws.app, "mapping:a"),
        Some(Row::mapping("a", "gpt-4o-mini"))
    );
    assert_eq!(
        created_at(&ws.app, "mapping:a"),
        created_a,
        "created_at untouched"
    );
    assert_eq!(
        stored(&ws.app, "mapping:b"),
        Some(Row::mapping("b", "gpt-4o-mini"))
    );
    assert!(!created_at(&ws.app, "mapping:b").is_empty());
    // Unicode comes back as the application writes it: not ASCII-escaped, json.dumps spacing.
    let u = stored(&ws.app, "mapping:中文").unwrap();
    assert_eq!(u.name.as_deref(), Some("映射名 β"));
    assert_eq!(
        u.candidates_json.as_deref(),
        Some(r#"["通义千问", "模型-β"]"#)
    );
    assert_eq!(
        u.metadata_json.as_deref(),
        Some(r#"{"note": "映射名 11", "temperature": 0.37}"#)
    );
    assert_eq!(u.updated_at.as_deref(), Some(FIXED_UPDATED_AT));

    // mapsync now reads back exactly the snapshot, plus the extra row.
    let mut before = mappings_of(&read_json(&snapshot));
    let after = mappings_of(&read_json(&export(&ws, "after.json")));
    before.insert("mapping:extra".into(), after["mapping:extra"].clone());
    assert_eq!(after, before);

    // A second restore finds nothing to do, and commits nothing.
    let version = data_version(&ws.app);
    let again = run(&ws, &snapshot, false);
    assert_eq!(
        (again.imported, again.unchanged, again.skipped, again.errors),
        (0, 7, 0, 0)
    );
    assert!(
        again
            .entries
            .iter()
            .all(|e| e.result == EntryResult::Unchanged)
    );
    assert_eq!(
        data_version(&ws.app),
        version,
        "an all-unchanged restore writes nothing"
    );
}

#[test]
fn dry_run_reports_the_same_counts_and_writes_nothing() {
    let ws = populated();
    let snapshot = export(&ws, "before.json");
    ws.app.delete("mapping:c");
    ws.app.upsert(&Row::mapping("d", "o4-mini"));

    let before = dump(&ws.app);
    let version = data_version(&ws.app);
    let dry = run(&ws, &snapshot, true);
    assert!(dry.dry_run);
    assert_eq!((dry.imported, dry.unchanged), (2, 5), "{dry:#?}");
    assert_eq!(dump(&ws.app), before, "a dry run changes nothing");
    assert_eq!(data_version(&ws.app), version, "a dry run commits nothing");

    let real = run(&ws, &snapshot, false);
    assert!(!real.dry_run);
    assert_eq!(real.entries, dry.entries, "same decisions, entry by entry");
    assert_eq!(
        (real.imported, real.unchanged, real.skipped, real.errors),
        (dry.imported, dry.unchanged, dry.skipped, dry.errors)
    );
    assert_ne!(dump(&ws.app), before);
}

#[test]
fn prompt_mappings_round_trip_into_tools_json_in_object_and_list_form() {
    let ws = Workspace::new(None, "");
    ws.app.upsert(&Row::mapping("a", "gpt-4o"));
    let mm = |model: &str| {
        format!(
            r#"{{"default_model": "{model}", "candidates": ["{model}", "qwen-max"], "is_active": true, "updated_at": "{FIXED_UPDATED_AT}", "metadata": {{}}}}"#
        )
    };
    let tools = r#"{"type": "function", "function": {"name": "log_workout"}}"#;
    let object = ws.app.insert_prompt(
        "object",
        "v1",
        "system",
        &format!(
            r#"{{"tools": [{tools}], "__model_mapping": {}}}"#,
            mm("glm-4.6")
        ),
    );
    let list = ws.app.insert_prompt(
        "list",
        "v2",
        "coach",
        &format!(r#"[{tools}, {{"__model_mapping": {}}}]"#, mm("kimi-k2")),
    );
    let bare_object = ws.app.insert_prompt(
        "no mapping (object)",
        "v1",
        "system",
        &format!(r#"{{"tools": [{tools}]}}"#),
    );
    let bare_list =
        ws.app
            .insert_prompt("no mapping (list)", "v1", "system", &format!("[{tools}]"));
    let snapshot = export(&ws, "before.json");

    // The application edits both mappings; the snapshot also gets entries for the two prompts
    // without a mapping and for a prompt that does not exist.
    ws.app.exec(&format!(
        "UPDATE ai_prompts SET tools_json = replace(tools_json, 'glm-4.6', 'o4-mini') WHERE id = {object};
         UPDATE ai_prompts SET tools_json = replace(tools_json, '\"is_active\": true', '\"is_active\": false') WHERE id = {list};"
    ));
    let mut doc = read_json(&snapshot);
    let entry = |id: i64, model: &str| {
        json!({"id": format!("prompt:{id}"), "scope_type": "prompt", "scope_key": id.to_string(),
               "name": "x", "default_model": model, "candidates": [model], "is_active": false,
               "updated_at": "2026-02-01T00:00:00+00:00", "source": "prompt", "metadata": {}})
    };
    doc["mappings"].as_array_mut().unwrap().extend([
        entry(bare_object, "gemini-2.5-flash"),
        entry(bare_list, "模型-β"),
        entry(999, "gpt-4o"),
    ]);
    doc["count"] = json!(6);
    let file = write_json(&ws, "with-prompts.json", &doc);

    let report = run(&ws, &file, false);
    let id = |p: i64| format!("prompt:{p}");
    assert_eq!(outcome(&report, &id(object)).0, EntryResult::Imported);
    assert_eq!(outcome(&report, &id(list)).0, EntryResult::Imported);
    assert_eq!(outcome(&report, &id(bare_object)).0, EntryResult::Imported);
    assert_eq!(outcome(&report, &id(bare_list)).0, EntryResult::Imported);
    assert_eq!(
        outcome(&report, "prompt:999"),
        (
            EntryResult::Skipped,
            Some("prompt 999 does not exist".into())
        )
    );
    assert_eq!(outcome(&report, "mapping:a").0, EntryResult::Unchanged);
    assert_eq!(
        (
            report.imported,
            report.unchanged,
            report.skipped,
            report.errors
        ),
        (4, 1, 1, 0)
    );

    // Everything else in tools_json is kept as it was, in its order.
    let restored_mm = |model: &str| {
        format!(
            r#"{{"default_model": "{model}", "candidates": ["{model}", "qwen-max"], "is_active": true, "updated_at": "{FIXED_UPDATED_AT}", "metadata": {{}}}}"#
        )
    };
    assert_eq!(
        tools_json(&ws.app, object),
        format!(
            r#"{{"tools": [{tools}], "__model_mapping": {}}}"#,
            restored_mm("glm-4.6")
        )
    );
    assert_eq!(
        tools_json(&ws.app, list),
        format!(
            r#"[{tools}, {{"__model_mapping": {}}}]"#,
            restored_mm("kimi-k2")
        )
    );
    let added = |model: &str| {
        format!(
            r#"{{"default_model": "{model}", "candidates": ["{model}"], "is_active": false, "updated_at": "2026-02-01T00:00:00+00:00"}}"#
        )
    };
    assert_eq!(
        tools_json(&ws.app, bare_object),
        format!(
            r#"{{"tools": [{tools}], "__model_mapping": {}}}"#,
            added("gemini-2.5-flash")
        )
    );
    assert_eq!(
        tools_json(&ws.app, bare_list),
        format!(r#"[{tools}, {{"__model_mapping": {}}}]"#, added("模型-β"))
    );
    let prompts: i64 = ws
        .app
        .conn()
        .query_row("SELECT count(*) FROM ai_prompts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(prompts, 4, "restore never creates a prompt");

    // mapsync reads the restored prompt mappings back; the prompt keeps its own name.
    let after = mappings_of(&read_json(&export(&ws, "after.json")));
    let before = mappings_of(&read_json(&snapshot));
    assert_eq!(after[&id(object)], before[&id(object)]);
    assert_eq!(after[&id(list)], before[&id(list)]);
    assert_eq!(after[&id(bare_list)]["default_model"], "模型-β");
    assert_eq!(after[&id(bare_list)]["name"], "no mapping (list)");

    let again = run(&ws, &file, false);
    assert_eq!(
        (again.imported, again.unchanged, again.skipped),
        (0, 5, 1),
        "{again:#?}"
    );

    // With prompt mappings turned off, prompts are none of restore's business.
    let mut off = settings(&ws);
    off.source.include_prompt_mappings = false;
    let report = restore_file(&off, &file, true).unwrap();
    assert_eq!((report.unchanged, report.skipped), (1, 5), "{report:#?}");
    assert!(
        outcome(&report, &id(object))
            .1
            .unwrap()
            .contains("include_prompt_mappings")
    );
}

#[test]
fn bad_entries_are_errors_while_the_others_import_from_a_bare_list() {
    let ws = Workspace::new(None, "");
    let good = |key: &str, model: &str| {
        json!({"scope_type": "mapping", "scope_key": key, "name": key, "default_model": model,
               "candidates": [model], "is_active": true, "updated_at": FIXED_UPDATED_AT,
               "source": "sqlite", "metadata": {}})
    };
    let file = write_json(
        &ws,
        "list.json",
        &json!([
            good("g", "gpt-4o"),
            {"scope_type": " ", "scope_key": "x"},
            "not an object",
            {"scope_type": "mapping", "scope_key": "c", "candidates": "gpt-4o"},
            {"scope_type": "mapping", "scope_key": "d", "updated_at": "yesterday"},
            good("h", "kimi-k2"),
            good("g", "qwen-max"),
        ]),
    );
    let report = run(&ws, &file, false);
    assert_eq!(
        (
            report.imported,
            report.unchanged,
            report.skipped,
            report.errors
        ),
        (2, 0, 1, 4),
        "{report:#?}"
    );
    let results: Vec<(usize, Option<&str>, EntryResult)> = report
        .entries
        .iter()
        .map(|e| (e.index, e.id.as_deref(), e.result))
        .collect();
    assert_eq!(
        results,
        [
            (0, Some("mapping:g"), EntryResult::Skipped),
            (1, None, EntryResult::Error),
            (2, None, EntryResult::Error),
            (3, None, EntryResult::Error),
            (4, None, EntryResult::Error),
            (5, Some("mapping:h"), EntryResult::Imported),
            (6, Some("mapping:g"), EntryResult::Imported),
        ]
    );
    let reason = |i: usize| report.entries[i].reason.clone().unwrap();
    assert!(reason(0).contains("entry 6"), "{}", reason(0));
    assert!(reason(1).contains("empty"), "{}", reason(1));
    assert!(reason(3).contains("candidates"), "{}", reason(3));
    assert!(reason(4).contains("yesterday"), "{}", reason(4));
    // The last entry with an id wins, as with the application's import.
    assert_eq!(
        stored(&ws.app, "mapping:g")
            .unwrap()
            .default_model
            .as_deref(),
        Some("qwen-max")
    );
    assert_eq!(ws.app.count(), 2);
    // The report is the JSON the command prints.
    let printed = serde_json::to_value(&report).unwrap();
    assert_eq!(
        printed["entries"][1],
        json!({"index": 1, "id": null, "result": "error", "reason": "scope_type or scope_key is empty"})
    );
    assert_eq!(printed["entries"][5]["result"], "imported");
}

#[test]
fn secrets_kept_in_sqlite_survive_the_restore_of_a_redacted_snapshot() {
    let ws = Workspace::new(None, "");
    let with_meta = |key: &str, meta: &str| Row {
        metadata_json: Some(meta.into()),
        ..Row::mapping(key, "gpt-4o")
    };
    ws.app.upsert(&with_meta(
        "s",
        r#"{"api_key": "sk-live-1", "temperature": 0.2, "auth": {"client_secret": "cs-1", "region": "eu"}}"#,
    ));
    ws.app.upsert(&with_meta(
        "t",
        r#"{"apiKey": "sk-t-1", "required_tier": "pro"}"#,
    ));
    ws.app
        .upsert(&with_meta("u", r#"{"password": "pw", "note": "gone"}"#));
    // An export keeps every key...
    let whole = export(&ws, "whole.json");
    let text = std::fs::read_to_string(&whole).unwrap();
    for secret in ["sk-live-1", "cs-1", "sk-t-1", "pw"] {
        assert!(text.contains(secret), "an export keeps {secret}");
    }
    // ... unless snapshot.redact says otherwise (or the file came from the mirror).
    ws.write_config(None, "[snapshot]\nredact = true\n");
    let snapshot = export(&ws, "before.json");
    ws.write_config(None, "");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    for secret in ["sk-live-1", "cs-1", "sk-t-1", "pw"] {
        assert!(!text.contains(secret), "the snapshot is redacted");
    }

    // The application edits s, rotates t's key only, and u is deleted.
    ws.app.upsert(&with_meta(
        "s",
        r#"{"api_key": "sk-live-2", "temperature": 0.9, "auth": {"client_secret": "cs-2", "region": "us"}}"#,
    ));
    ws.app.upsert(&with_meta(
        "t",
        r#"{"apiKey": "sk-t-2", "required_tier": "pro"}"#,
    ));
    ws.app.delete("mapping:u");

    let report = run(&ws, &snapshot, false);
    assert_eq!(outcome(&report, "mapping:s").0, EntryResult::Imported);
    assert_eq!(
        outcome(&report, "mapping:t").0,
        EntryResult::Unchanged,
        "only a redacted secret differs"
    );
    assert_eq!(outcome(&report, "mapping:u").0, EntryResult::Imported);
    let meta = |key: &str| -> Value {
        let row = stored(&ws.app, &format!("mapping:{key}")).unwrap();
        serde_json::from_str(row.metadata_json.as_deref().unwrap()).unwrap()
    };
    assert_eq!(
        meta("s"),
        json!({"api_key": "sk-live-2", "temperature": 0.2,
               "auth": {"client_secret": "cs-2", "region": "eu"}}),
        "the snapshot's values, the row's current secrets"
    );
    assert_eq!(
        meta("t"),
        json!({"apiKey": "sk-t-2", "required_tier": "pro"})
    );
    assert_eq!(
        meta("u"),
        json!({"note": "gone"}),
        "a deleted row had no secret left to keep"
    );

    // Restoring the whole export brings back the file's own secrets.
    let report = run(&ws, &whole, false);
    assert_eq!(outcome(&report, "mapping:t").0, EntryResult::Imported);
    assert_eq!(
        meta("t"),
        json!({"apiKey": "sk-t-1", "required_tier": "pro"}),
        "a secret the file holds is restored"
    );
    assert_eq!(meta("u")["password"], "pw");
}

#[test]
fn a_legacy_row_is_updated_in_place_and_a_foreign_row_is_never_overwritten() {
    let ws = Workspace::new(None, "");
    let legacy = Row {
        id: "tenant:x".into(),
        scope_type: "tenant".into(),
        ..Row::mapping("x", "gpt-4o")
    };
    ws.app.upsert(&legacy);
    // A row stored under `mapping:y` whose scope reads as `user:q`.
    ws.app.upsert(&Row {
        scope_type: "user".into(),
        scope_key: "q".into(),
        ..Row::mapping("y", "gpt-4o")
    });
    let snapshot = export(&ws, "before.json");
    assert!(mappings_of(&read_json(&snapshot)).contains_key("mapping:x"));

    ws.app.upsert(&Row {
        default_model: Some("o4-mini".into()),
        ..legacy.clone()
    });
    let mut doc = read_json(&snapshot);
    let mut y = doc["mappings"][0].clone();
    y["scope_type"] = json!("mapping");
    y["scope_key"] = json!("y");
    y["id"] = json!("mapping:y");
    y["default_model"] = json!("claude-sonnet-4-5");
    doc["mappings"].as_array_mut().unwrap().push(y);
    let file = write_json(&ws, "plus-y.json", &doc);
    let foreign_before = stored(&ws.app, "mapping:y");

    let report = run(&ws, &file, false);
    let (result, reason) = outcome(&report, "mapping:x");
    assert_eq!(result, EntryResult::Imported);
    assert!(reason.unwrap().contains("tenant:x"));
    assert_eq!(stored(&ws.app, "mapping:x"), None, "no duplicate created");
    assert_eq!(
        stored(&ws.app, "tenant:x"),
        Some(legacy),
        "updated in place, still a tenant row"
    );
    let (result, reason) = outcome(&report, "mapping:y");
    assert_eq!(result, EntryResult::Error);
    assert!(reason.unwrap().contains("user:q"));
    assert_eq!(stored(&ws.app, "mapping:y"), foreign_before);
    assert_eq!(ws.app.count(), 2);
}

#[test]
fn unusable_files_and_databases_fail_with_one_line_and_change_nothing() {
    let ws = populated();
    let snapshot = export(&ws, "before.json");
    ws.app.delete("mapping:a");
    let before = dump(&ws.app);

    let bytes = std::fs::read(&snapshot).unwrap();
    let truncated = ws.path().join("truncated.json");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let not_export = write_json(&ws, "other.json", &json!({"exported_at": "x", "count": 1}));
    let missing = ws.path().join("missing.json");

    let fails = |file: &Path, s: &Settings| -> String {
        let e = restore_file(s, file, false).expect_err("restore must fail");
        let line = e.to_string();
        assert!(!line.contains('\n'), "one line: {line}");
        mapsync::Error::from(e).to_string()
    };
    let s = settings(&ws);
    let line = fails(&truncated, &s);
    assert!(
        line.contains("truncated.json") && line.contains("not a JSON document"),
        "{line}"
    );
    assert!(line.contains("nothing was restored"), "{line}");
    let line = fails(&not_export, &s);
    assert!(
        line.contains("other.json") && line.contains("mappings"),
        "{line}"
    );
    let line = fails(&missing, &s);
    assert!(
        line.contains("missing.json") && line.contains("does not exist"),
        "{line}"
    );
    assert!(matches!(
        restore_file(&s, &missing, true),
        Err(RestoreError::FileMissing(_))
    ));
    assert_eq!(dump(&ws.app), before);

    // The SQLite side: missing (and not created), not the application's, not a database.
    let mut other = s.clone();
    other.source.sqlite_path = ws.path().join("nope.sqlite3");
    let line = fails(&snapshot, &other);
    assert!(
        line.contains("nope.sqlite3") && line.contains("source.sqlite_path"),
        "{line}"
    );
    assert!(
        !other.source.sqlite_path.exists(),
        "restore never creates the file"
    );
    other.source.sqlite_path = ws.path().join("unrelated.sqlite3");
    rusqlite::Connection::open(&other.source.sqlite_path)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    let line = fails(&snapshot, &other);
    assert!(
        line.contains("unrelated.sqlite3") && line.contains("llm_model_mappings"),
        "{line}"
    );
    other.source.sqlite_path = ws.path().join("text.sqlite3");
    std::fs::write(
        &other.source.sqlite_path,
        "this is not a database, just text. ".repeat(200),
    )
    .unwrap();
    let line = fails(&snapshot, &other);
    assert!(
        line.contains("text.sqlite3") && line.contains("not a readable database"),
        "{line}"
    );
}

#[test]
fn a_database_locked_beyond_busy_timeout_fails_and_writes_nothing() {
    let ws = populated();
    let snapshot = export(&ws, "before.json");
    ws.app.delete("mapping:a");
    let mut s = settings(&ws);
    s.source.busy_timeout = Duration::from_millis(300);

    // The application holds a write transaction for longer than the busy timeout.
    ws.app.exec(
        "BEGIN IMMEDIATE; UPDATE llm_model_mappings SET name = 'app' WHERE id = 'mapping:b';",
    );
    let t = Instant::now();
    let e = restore_file(&s, &snapshot, false).expect_err("locked");
    let waited = t.elapsed();
    assert!(matches!(e, RestoreError::Busy { .. }), "{e}");
    // It waited for the configured 300 ms, not the 5 s default.
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "waited {waited:?}"
    );
    let line = e.to_string();
    assert!(
        line.contains("db.sqlite3") && line.contains("busy_timeout_ms"),
        "{line}"
    );
    // A dry run only reads: it does not wait for the application's write lock.
    let dry = restore_file(&s, &snapshot, true).expect("a dry run reads through WAL");
    assert_eq!(dry.imported, 1);
    ws.app.exec("COMMIT");

    assert_eq!(stored(&ws.app, "mapping:a"), None, "nothing was restored");
    assert_eq!(
        stored(&ws.app, "mapping:b").unwrap().name.as_deref(),
        Some("app")
    );
    // Once the application is idle, the same restore goes through.
    let report = run(&ws, &snapshot, false);
    assert_eq!(outcome(&report, "mapping:a").0, EntryResult::Imported);
    assert_eq!(outcome(&report, "mapping:b").0, EntryResult::Imported);
}

#[test]
fn the_restore_command_prints_its_report_and_exits_by_its_result() {
    let ws = populated();
    let snapshot = export(&ws, "snap.json");
    ws.app.delete("mapping:a");

    let dry = ws.mapsync(&["restore", snapshot.to_str().unwrap(), "--dry-run"]);
    dry.expect_code(0);
    assert_eq!(dry.json()["dry_run"], true);
    assert_eq!(dry.json()["imported"], 1);
    assert!(
        stored(&ws.app, "mapping:a").is_none(),
        "a dry run writes nothing"
    );

    let real = ws.mapsync(&["restore", snapshot.to_str().unwrap()]);
    real.expect_code(0);
    assert_eq!(real.json()["imported"], 1);
    assert!(stored(&ws.app, "mapping:a").is_some());

    // An entry that cannot be restored makes the exit code 1; the report still says why.
    let bad = write_json(
        &ws,
        "bad.json",
        &json!({"mappings": [{"scope_type": "", "scope_key": ""}]}),
    );
    let run = ws.mapsync(&["restore", bad.to_str().unwrap()]);
    run.expect_code(1);
    assert_eq!(run.json()["errors"], 1);

    // A file that is not an export: one line on stderr, exit 1.
    let junk = ws.path().join("junk.json");
    std::fs::write(&junk, "{ not json").unwrap();
    let run = ws.mapsync(&["restore", junk.to_str().unwrap()]);
    run.expect_code(1);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:?}");
    assert!(run.stdout.is_empty());
}

/// The schema of the application's tables as SQLite stores it.
fn schema_of(path: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A lost host rebuilt: from a snapshot and from the mirror, `restore -o NEW.db` writes a
/// database with the application's schema that, synced back, leaves Postgres unchanged.
#[test]
fn a_lost_host_is_rebuilt_from_a_snapshot_or_the_mirror_and_postgres_stays_unchanged() {
    use crate::harness::workspace::{remote_count, supabase_db, xmins};
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    for r in Row::numbered("m", 25) {
        ws.app.upsert(&r);
    }
    ws.app.upsert(&Row {
        metadata_json: Some(r#"{"api_key": "sk-lost-host", "temperature": 0.2}"#.into()),
        ..Row::mapping("secret", "gpt-4o")
    });
    ws.mapsync(&["migrate"]).expect_code(0);
    ws.sync(&[]);
    let snapshot = export(&ws, "snapshot.json");
    let before = xmins(&db);

    for (args, name) in [
        (
            vec!["restore", snapshot.to_str().unwrap()],
            "from-snapshot.db",
        ),
        (vec!["restore", "--from-target"], "from-mirror.db"),
    ] {
        let out = ws.path().join(name);
        let mut all = args.clone();
        all.extend(["-o", out.to_str().unwrap()]);
        let run = ws.mapsync(&all);
        run.expect_code(0);
        let report = run.json();
        assert_eq!(report["imported"], 26, "{report}");
        assert_eq!(report["database"], out.display().to_string());
        assert_eq!(
            schema_of(&out),
            schema_of(&ws.db_path()),
            "{name} has the application's schema"
        );
        // The rebuilt file takes the lost one's place; a sync of it changes nothing.
        std::fs::copy(&out, ws.path().join("rebuilt.sqlite3")).unwrap();
        let rebuilt = AppDb::open(&ws.path().join("rebuilt.sqlite3"));
        assert_eq!(rebuilt.count(), 26);
        let secret: String = rebuilt
            .conn()
            .query_row(
                "SELECT metadata_json FROM llm_model_mappings WHERE id = 'mapping:secret'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if name == "from-mirror.db" {
            assert!(!secret.contains("sk-lost-host"), "the mirror has no secret");
            assert!(
                run.stderr.contains("no secrets"),
                "the output says so: {}",
                run.stderr
            );
        } else {
            assert!(secret.contains("sk-lost-host"), "a snapshot keeps it");
        }
        let config = ws.path().join("rebuilt.toml");
        std::fs::write(
            &config,
            format!(
                "[source]\nsqlite_path = {:?}\n[target]\nurl = {:?}\n[snapshot]\ndir = {:?}\n",
                ws.path().join("rebuilt.sqlite3"),
                db.url,
                ws.path().join("rebuilt-snapshots")
            ),
        )
        .unwrap();
        let mut cmd = crate::harness::workspace::command();
        cmd.arg("--config").arg(&config).arg("sync");
        let synced = crate::harness::workspace::run(cmd);
        synced.expect_code(0);
        let synced = synced.json();
        assert_eq!(synced["changed_count"], 0, "{name}: {synced}");
        assert_eq!(xmins(&db), before, "{name}: Postgres unchanged");
        assert_eq!(remote_count(&db), 26);
        drop(rebuilt);
        std::fs::remove_file(ws.path().join("rebuilt.sqlite3")).unwrap();
        // -o never overwrites.
        let again = ws.mapsync(&all);
        again.expect_code(1);
        assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    }
}

#[test]
fn exact_deletes_the_rows_the_file_lacks_under_the_mass_delete_guard() {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("keep", 5) {
        ws.app.upsert(&r);
    }
    let snapshot = export(&ws, "five.json");
    for r in Row::numbered("new", 3) {
        ws.app.upsert(&r);
    }
    let run = ws.mapsync(&["restore", snapshot.to_str().unwrap(), "--exact"]);
    run.expect_code(0);
    let report = run.json();
    assert_eq!(report["deleted"], 3, "{report}");
    assert_eq!(ws.app.count(), 5);

    for r in Row::numbered("more", 20) {
        ws.app.upsert(&r);
    }
    let before = dump(&ws.app);
    let refused = ws.mapsync(&["restore", snapshot.to_str().unwrap(), "--exact"]);
    refused.expect_code(1);
    assert!(
        refused.stderr.contains("would delete 20 of the 25 rows")
            && refused.stderr.contains("--force"),
        "{}",
        refused.stderr
    );
    assert_eq!(dump(&ws.app), before, "nothing was restored");
    let forced = ws.mapsync(&["restore", snapshot.to_str().unwrap(), "--exact", "--force"]);
    forced.expect_code(0);
    assert_eq!(forced.json()["deleted"], 20);
    assert_eq!(ws.app.count(), 5);
    // Without --exact nothing is ever deleted.
    ws.app.upsert(&Row::mapping("stays", "gpt-4o"));
    ws.mapsync(&["restore", snapshot.to_str().unwrap()])
        .expect_code(0);
    assert_eq!(ws.app.count(), 6);
}
