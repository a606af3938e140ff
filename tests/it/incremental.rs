//! The daemon's reads between full runs (issue 13): a watch run reads the rows stamped since
//! the last read (a watermark read on `updated_at`, with a count check for inserts and
//! deletes), and a walk of every row follows once the file is quiet, catching a row changed
//! without a new `updated_at`.

use std::time::Duration;

use crate::harness::workspace::{FAST, mirrored, remote_count, remote_rows};
use crate::harness::*;

/// `2026-01-16T08:00:00+00:00` plus `secs`.
fn stamp(secs: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2026-01-16T08:00:00+00:00").unwrap()
        + chrono::Duration::seconds(secs))
    .format("%Y-%m-%dT%H:%M:%S+00:00")
    .to_string()
}

fn row(key: &str, model: &str, secs: i64) -> Row {
    let mut r = Row::mapping(key, model);
    r.updated_at = Some(stamp(secs));
    r
}

fn model_of(db: &TestDb, id: &str) -> serde_json::Value {
    remote_rows(db)
        .get(id)
        .map_or(serde_json::Value::Null, |r| r["default_model"].clone())
}

#[test]
fn watch_runs_read_the_stamped_rows_and_a_walk_catches_the_rest() {
    let seed: Vec<Row> = (0..30)
        .map(|i| row(&format!("w{i:02}"), "gpt-4o", i))
        .collect();
    let (ws, db) = mirrored(&seed);
    let d = TestApp::spawn(
        &ws,
        Some(&db.url),
        &format!("{FAST}\n[target]\ndelete_missing = true\n"),
    );
    d.wait_first_run();
    assert_eq!(remote_count(&db), 30);

    // What the application does: every save stamped anew.
    ws.app.upsert(&row("w05", "o4-mini", 100));
    ws.app.upsert(&row("fresh", "qwen-max", 100));
    ws.app.delete("mapping:w09");
    d.wait(
        Duration::from_secs(10),
        "the update, insert and delete mirrored",
        || {
            model_of(&db, "mapping:w05") == "o4-mini"
                && model_of(&db, "mapping:fresh") == "qwen-max"
                && remote_count(&db) == 30
        },
    );
    assert!(
        d.log().contains("read=\"watermark\""),
        "a watch run read the stamped rows only:\n{}",
        d.log()
    );

    // A row changed without a new stamp (a hand edit, `mapsync restore`): invisible to the
    // watermark read, caught by the walk once the file is quiet.
    let walks = d.log().matches("read=\"walk\"").count();
    ws.app.upsert(&row("w12", "kimi-k2", 12));
    d.wait(
        Duration::from_secs(15),
        "the unstamped change mirrored",
        || model_of(&db, "mapping:w12") == "kimi-k2",
    );
    assert!(
        d.log().matches("read=\"walk\"").count() > walks,
        "the walk found it:\n{}",
        d.log()
    );
    // And an insert without a stamp plus a delete (the count stays the same).
    ws.app.delete("mapping:w20");
    ws.app.upsert(&row("restored", "glm-4.6", -5));
    d.wait(Duration::from_secs(15), "both mirrored", || {
        model_of(&db, "mapping:restored") == "glm-4.6" && model_of(&db, "mapping:w20").is_null()
    });
    assert_eq!(remote_count(&db), 30);
}
