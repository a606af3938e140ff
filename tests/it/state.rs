//! `mapsync sync` and the state it leaves beside the snapshots (issue 13): a run whose
//! mirror and SQLite file are as the last run left them reads and scans nothing, and a state
//! never makes a run skip a change. Each test changes something behind the state's back and
//! checks that the next run mirrors exactly what `mapsync export` shows.

use crate::harness::workspace::{Workspace, mirrored, remote_rows};
use crate::harness::*;
use serde_json::Value;
use std::time::Duration;

const STATE: &str = ".mapsync-sync-state";

/// The mirror equals the export, id by id and field by field (what every run must leave).
fn assert_mirrored(ws: &Workspace, db: &TestDb, extra_remote: &[&str]) {
    let export = ws.mapsync(&["export"]).expect_code(0).json();
    let remote = remote_rows(db);
    let mappings = export["mappings"].as_array().unwrap();
    for m in mappings {
        let id = m["id"].as_str().unwrap();
        let r = remote
            .get(id)
            .unwrap_or_else(|| panic!("{id} missing from the mirror"));
        for field in [
            "name",
            "default_model",
            "candidates",
            "is_active",
            "metadata",
        ] {
            assert_eq!(r[field], m[field], "{id}.{field}");
        }
    }
    assert_eq!(remote.len(), mappings.len() + extra_remote.len());
    for id in extra_remote {
        assert!(remote.contains_key(*id), "{id} stays");
    }
}

fn state_file(ws: &Workspace) -> std::path::PathBuf {
    ws.snapshot_dir().join(STATE)
}

fn renamed(key: &str, name: &str) -> Row {
    let mut r = Row::mapping(key, "gpt-4o");
    r.name = Some(name.into());
    r
}

#[test]
fn a_second_run_with_nothing_changed_writes_nothing_and_keeps_a_private_state() {
    let (ws, db) = mirrored(&Row::numbered("s", 30));
    let first = ws.sync(&[]);
    assert_eq!(first["changed_count"], 30, "{first}");
    let meta = std::fs::metadata(state_file(&ws)).expect("a state beside the snapshots");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let xmins =
        db.psql("SELECT string_agg(xmin::text, ',' ORDER BY id) FROM public.model_mappings");
    let second = ws.sync(&[]);
    assert_eq!(
        (
            &second["changed_count"],
            &second["remote_before"],
            &second["synced_count"]
        ),
        (&Value::from(0), &Value::from(30), &Value::from(30)),
        "{second}"
    );
    assert_eq!(
        db.psql("SELECT string_agg(xmin::text, ',' ORDER BY id) FROM public.model_mappings"),
        xmins,
        "no row rewritten"
    );
    assert_mirrored(&ws, &db, &[]);
}

/// `mapsync sync` with its debug log; returns the result JSON and the log.
fn sync_logged(ws: &Workspace) -> (Value, String) {
    let mut cmd = crate::harness::workspace::command();
    cmd.env("MAPSYNC_LOG__LEVEL", "info,mapsync=debug")
        .arg("--config")
        .arg(&ws.config)
        .arg("sync");
    let run = crate::harness::workspace::run(cmd);
    run.expect_code(0);
    (run.json(), run.stderr.clone())
}

#[test]
fn the_state_a_cold_load_leaves_spares_the_next_runs_their_scan() {
    // A cold load (an empty mirror), then runs that find the mirror as the last one left it:
    // with nothing changed, after a change in SQLite, and after a write of their own.
    let (ws, db) = mirrored(&Row::numbered("c", 40));
    let (first, log) = sync_logged(&ws);
    assert_eq!(first["changed_count"], 40, "{first}");
    assert!(!log.contains("no scan"), "{log}");
    // Each row went in once: by the streamed COPY, not again by a fallback write after a
    // refused one (rows of an aborted COPY count as inserted too). The run's backend flushes
    // its statistics when the process has gone.
    let inserted = || {
        db.psql("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'public.model_mappings'::regclass")
            .trim()
            .to_string()
    };
    wait_until(
        Duration::from_secs(30),
        "the cold load's statistics",
        || inserted() != "0",
    );
    assert_eq!(inserted(), "40", "rows inserted by the cold load");
    for step in 0..3 {
        if step == 1 {
            ws.app.upsert(&renamed("c007", "after the cold load"));
        }
        let (report, log) = sync_logged(&ws);
        assert!(
            log.contains("the mirror is as the last run left it: no scan")
                && !log.contains("a full run"),
            "run {step} after the cold load did not use its state: {log}"
        );
        assert_eq!(report["changed_count"], u64::from(step == 1), "{report}");
        assert_mirrored(&ws, &db, &[]);
    }
}

#[test]
fn hand_edits_deletes_and_inserts_in_postgres_are_repaired_despite_the_state() {
    let (ws, db) = mirrored(&Row::numbered("h", 20));
    ws.sync(&[]);
    db.psql(
        "UPDATE public.model_mappings SET default_model = 'hand-edited' WHERE id = 'mapping:h003'",
    );
    let report = ws.sync(&[]);
    assert_eq!(report["changed_count"], 1, "{report}");
    assert_mirrored(&ws, &db, &[]);
    db.psql("DELETE FROM public.model_mappings WHERE id = 'mapping:h004'");
    assert_eq!(ws.sync(&[])["changed_count"], 1);
    assert_mirrored(&ws, &db, &[]);
    // Another writer, with triggers off (no synced_at stamp): still seen.
    db.psql(
        "SET session_replication_role = replica; \
         UPDATE public.model_mappings SET name = 'quiet' WHERE id = 'mapping:h005'; \
         INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('mapping:only-remote', 'mapping', 'only-remote');",
    );
    let report = ws.sync(&[]);
    assert_eq!(report["changed_count"], 1, "{report}");
    assert_mirrored(&ws, &db, &["mapping:only-remote"]);
    // The extra row is deleted by the next run with delete propagation, state or not.
    let report = ws.sync(&["--delete-missing"]);
    assert_eq!(report["deleted_count"], 1, "{report}");
    assert_mirrored(&ws, &db, &[]);
}

#[test]
fn changes_in_sqlite_between_runs_are_mirrored_from_the_state() {
    let (ws, db) = mirrored(&Row::numbered("q", 20));
    ws.sync(&[]);
    ws.app.upsert(&renamed("q001", "changed"));
    ws.app.upsert(&Row::mapping("added", "o4-mini"));
    ws.app.delete("mapping:q002");
    // A change with the old updated_at: the state compares stored bytes, not stamps.
    ws.app
        .exec("UPDATE llm_model_mappings SET default_model = 'kimi-k2' WHERE id = 'mapping:q003'");
    let report = ws.sync(&[]);
    assert_eq!(report["changed_count"], 3, "{report}");
    assert_mirrored(&ws, &db, &["mapping:q002"]);
    let report = ws.sync(&["--delete-missing"]);
    assert_eq!(report["deleted_count"], 1, "{report}");
    assert_mirrored(&ws, &db, &[]);
    // An alias row (stored under `tenant:`) makes the next run read everything: still right.
    let mut alias = Row::mapping("q005", "qwen-max");
    alias.id = "tenant:q005".into();
    alias.scope_type = "tenant".into();
    alias.updated_at = Some("2027-01-01T00:00:00+00:00".into());
    ws.app.upsert(&alias);
    ws.sync(&[]);
    assert_mirrored(&ws, &db, &[]);
}

#[test]
fn a_restored_older_file_is_read_again() {
    let (ws, db) = mirrored(&Row::numbered("r", 10));
    ws.sync(&[]);
    // Copy the file aside (with its -wal folded in), change it, sync, then put the copy
    // back with its old mtime: the ctime still moves.
    ws.app.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    let saved = ws.path().join("saved.sqlite3");
    std::fs::copy(ws.db_path(), &saved).unwrap();
    let mtime = std::fs::metadata(ws.db_path()).unwrap().modified().unwrap();
    ws.app.upsert(&renamed("r001", "newer"));
    ws.app.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    ws.sync(&[]);
    assert_eq!(remote_rows(&db)["mapping:r001"]["name"], "newer");
    std::fs::copy(&saved, ws.db_path()).unwrap();
    std::fs::File::options()
        .write(true)
        .open(ws.db_path())
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let report = ws.sync(&[]);
    assert_eq!(report["changed_count"], 1, "{report}");
    assert_eq!(remote_rows(&db)["mapping:r001"]["name"], "r001");
}

#[test]
fn a_damaged_foreign_or_ignored_state_means_a_full_run() {
    let (ws, db) = mirrored(&Row::numbered("d", 10));
    ws.sync(&[]);
    db.psql("UPDATE public.model_mappings SET name = 'hand' WHERE id = 'mapping:d001'");
    // A flipped byte: the checksum fails, the run reads and scans everything.
    let path = state_file(&ws);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(ws.sync(&[])["changed_count"], 1);
    assert_mirrored(&ws, &db, &[]);
    // Garbage, and an empty file.
    for junk in [&b"not a state"[..], b""] {
        db.psql("UPDATE public.model_mappings SET name = 'hand' WHERE id = 'mapping:d002'");
        std::fs::write(&path, junk).unwrap();
        assert_eq!(ws.sync(&[])["changed_count"], 1);
    }
    // --full ignores a good state: a row changed by hand is repaired, the state rewritten.
    db.psql("UPDATE public.model_mappings SET name = 'hand' WHERE id = 'mapping:d003'");
    let report = ws.sync(&["--full"]);
    assert_eq!(report["changed_count"], 1, "{report}");
    assert_mirrored(&ws, &db, &[]);
    assert!(path.exists());
}

#[test]
fn a_state_for_another_instance_is_not_used() {
    let (ws, db) = mirrored(&Row::numbered("t", 10));
    ws.sync(&[]);
    // The same file and mirror, under another instance name: the state is not this run's.
    let config = std::fs::read_to_string(&ws.config).unwrap();
    std::fs::write(
        &ws.config,
        format!("{config}\n[instance]\nname = \"someone-else\"\n"),
    )
    .unwrap();
    db.psql("UPDATE public.model_mappings SET name = 'hand' WHERE id = 'mapping:t001'");
    assert_eq!(ws.sync(&[])["changed_count"], 1);
    assert_mirrored(&ws, &db, &[]);
    // And back: the state the other instance left is not this one's either.
    db.psql("UPDATE public.model_mappings SET name = 'hand' WHERE id = 'mapping:t002'");
    std::fs::write(&ws.config, &config).unwrap();
    assert_eq!(
        ws.sync(&[])["changed_count"],
        1,
        "back to the first instance"
    );
    assert_mirrored(&ws, &db, &[]);
}

#[test]
fn a_cold_load_with_two_rows_for_one_id_mirrors_the_one_the_export_shows() {
    // `mapping:dup` as stored, and a legacy `tenant:dup` row saved later: both become
    // `mapping:dup`, and the later one wins. A cold load sends the first before it reads the
    // second; the mirror must still end up with the winner only.
    let plain = Row {
        updated_at: Some("2026-01-01T00:00:00+00:00".into()),
        ..Row::mapping("dup", "older-model")
    };
    let mut legacy = Row {
        updated_at: Some("2026-02-01T00:00:00+00:00".into()),
        ..Row::mapping("dup", "newer-model")
    };
    legacy.id = "tenant:dup".into();
    legacy.scope_type = "tenant".into();
    let mut seed = Row::numbered("c", 5);
    seed.push(plain);
    seed.push(legacy);
    let (ws, db) = mirrored(&seed);
    let report = ws.sync(&[]);
    assert_eq!(report["changed_count"], 6, "{report}");
    assert_eq!(
        remote_rows(&db)["mapping:dup"]["default_model"],
        "newer-model"
    );
    assert_mirrored(&ws, &db, &[]);
    // The next run finds nothing to do.
    assert_eq!(ws.sync(&[])["changed_count"], 0);
    assert_mirrored(&ws, &db, &[]);
}

#[test]
fn a_run_whose_commit_fails_leaves_no_state_that_a_later_hand_delete_could_match() {
    let (ws, db) = mirrored(&Row::numbered("c", 6));
    // A cold load: every row carries the COPY's transaction id, so the mirror's fingerprint
    // falls alike whichever one row is deleted.
    assert_eq!(ws.sync(&["--delete-missing"])["changed_count"], 6);
    // The next run deletes a row, and its COMMIT fails (a deferred constraint trigger).
    db.psql(
        "CREATE FUNCTION public.refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$; \
         CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER DELETE ON public.model_mappings \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.refuse_at_commit()",
    );
    ws.app.delete("mapping:c001");
    let failed = ws.mapsync(&["sync", "--delete-missing"]);
    failed.expect_code(1);
    assert!(failed.stderr.contains("refused at commit"), "{failed:?}");
    db.psql(
        "DROP TRIGGER refuse_at_commit ON public.model_mappings; \
         DROP FUNCTION public.refuse_at_commit()",
    );
    // By hand, another row of that COPY goes: the mirror now has the row count and the sum
    // of hashes that the failed run's state would have claimed, with other rows.
    db.psql("DELETE FROM public.model_mappings WHERE id = 'mapping:c002'");
    ws.sync(&["--delete-missing"]);
    assert_mirrored(&ws, &db, &[]);
}
