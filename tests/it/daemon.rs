//! `mapsync run` end to end: the daemon (in-process, or the real binary where a process is
//! needed), the application's SQLite file in WAL mode written by its own connection, and a
//! real PostgreSQL — through commits, bursts, outages, file replacement, kills and signals.

use std::time::{Duration, Instant};

use crate::harness::daemon::Daemon;
use crate::harness::workspace::{
    FAST, Workspace, mirrored, mirrored_on_own_cluster, remote_count, remote_rows, snapshot_files,
};
use crate::harness::*;
use serde_json::Value;

fn count_like(db: &TestDb, pattern: &str) -> u64 {
    db.psql(&format!(
        "SELECT count(*) FROM public.model_mappings WHERE id LIKE '{pattern}'"
    ))
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn commits_reach_postgres_one_by_one_and_in_a_burst_of_200() {
    let (ws, db) = mirrored(&Row::numbered("seed", 20));
    let d = TestApp::spawn(&ws, Some(&db.url), FAST);
    let first = d.wait_first_run();
    assert_eq!(first["last_run"]["trigger"], "startup");
    assert_eq!(first["last_run"]["status"], "synced", "{first:#}");
    assert_eq!(remote_count(&db), 20);

    let mut changed = Row::mapping("seed005", "claude-sonnet-4-5");
    changed.updated_at = Some("2026-03-01T00:00:00+00:00".into());
    ws.app.upsert(&changed);
    d.wait(
        Duration::from_secs(10),
        "the changed row in Postgres",
        || remote_rows(&db)["mapping:seed005"]["default_model"] == "claude-sonnet-4-5",
    );
    let status = d.status();
    assert_eq!(status["last_run"]["trigger"], "watch", "{status:#}");

    for r in Row::numbered("burst", 200) {
        ws.app.upsert(&r);
    }
    d.wait(
        Duration::from_secs(30),
        "all 200 burst rows in Postgres",
        || count_like(&db, "mapping:burst%") == 200,
    );
    let s = d.wait_status(Duration::from_secs(10), "no pending change", |s| {
        s["pending_changes"] == 0 && s["lag_seconds"].as_f64() == Some(0.0)
    });
    assert_eq!(s["source"]["rows"], 220);

    // A deleted row stays in the mirror unless delete propagation is on. Runs go one at a
    // time, so once a row committed after the delete is in Postgres, the delete's run is over.
    ws.app.delete("mapping:burst000");
    d.wait_status(Duration::from_secs(10), "the delete read", |s| {
        s["source"]["rows"] == 219
    });
    ws.app.upsert(&Row::mapping("marker", "gpt-4o"));
    d.wait(
        Duration::from_secs(10),
        "the row committed after the delete in Postgres",
        || count_like(&db, "mapping:marker") == 1,
    );
    assert_eq!(count_like(&db, "mapping:burst000"), 1);
}

#[test]
fn the_application_can_checkpoint_its_wal_while_the_daemon_runs() {
    let (ws, db) = mirrored(&Row::numbered("a", 10));
    let d = Daemon::start(&ws, Some(&db.url), FAST);
    d.wait_first_run();
    for r in Row::numbered("b", 50) {
        ws.app.upsert(&r);
    }
    d.wait(Duration::from_secs(20), "the 50 rows mirrored", || {
        count_like(&db, "mapping:b%") == 50
    });
    let (busy, _log, _checkpointed) = ws.app.checkpoint_truncate();
    assert_eq!(busy, 0, "the daemon must not hold a read transaction open");
    let wal = std::fs::metadata(ws.db_path().with_extension("sqlite3-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(wal, 0, "TRUNCATE empties the WAL");
    // And the daemon still follows commits afterwards.
    ws.app.upsert(&Row::mapping("after-checkpoint", "gpt-4o"));
    d.wait(
        Duration::from_secs(10),
        "a commit after the checkpoint",
        || count_like(&db, "mapping:after-checkpoint") == 1,
    );
}

#[test]
fn a_postgres_outage_keeps_the_daemon_live_and_loses_nothing() {
    let (cluster, dbname, url, ws) = mirrored_on_own_cluster(&Row::numbered("m", 10));
    let d = TestApp::spawn(
        &ws,
        Some(&url),
        &format!("{FAST}\n[target]\nretry_max = 2\nconnect_timeout_ms = 1000\n"),
    );
    d.wait_first_run();
    assert_eq!(d.get("/readyz").status, 200, "{}", d.get("/readyz").text());

    cluster.stop();
    ws.app.upsert(&Row::mapping("during-outage", "qwen-max"));
    // Live, not ready (naming the target), still snapshotting.
    d.wait(
        Duration::from_secs(20),
        "/readyz to fail on the target",
        || {
            let r = d.get("/readyz");
            r.status == 503 && r.json()["checks"]["target"]["ok"] == false
        },
    );
    assert_eq!(d.get("/livez").status, 200);
    let latest = ws.snapshot_dir().join("model-mappings-latest.json");
    d.wait(
        Duration::from_secs(20),
        "a snapshot holding the change",
        || std::fs::read_to_string(&latest).is_ok_and(|t| t.contains("mapping:during-outage")),
    );
    let s = d.wait_status(Duration::from_secs(20), "the failed run", |s| {
        s["last_run"]["status"] == "error" && s["pending_changes"].as_u64() >= Some(1)
    });
    assert!(
        s["last_run"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{s:#}"
    );
    assert!(!s.to_string().contains(cluster.password()));
    ws.app
        .upsert(&Row::mapping("also-during-outage", "qwen-max"));

    cluster.start_again();
    let back = Instant::now();
    d.wait(
        Duration::from_secs(30),
        "both changes mirrored after the outage",
        || {
            let r = remote_rows_at(&cluster, &dbname);
            r.contains_key("mapping:during-outage") && r.contains_key("mapping:also-during-outage")
        },
    );
    eprintln!(
        "Postgres back → both changes mirrored: {:?}",
        back.elapsed()
    );
    d.wait(Duration::from_secs(20), "/readyz back to 200", || {
        d.get("/readyz").status == 200
    });
    let s = d.status();
    assert_eq!(s["pending_changes"], 0, "{s:#}");
    assert!(d.metric("mapsync_sync_runs_total{trigger=\"watch\",result=\"error\"}") >= 1.0);
}

fn remote_rows_at(cluster: &PgCluster, db: &str) -> std::collections::BTreeMap<String, Value> {
    cluster
        .psql(db, "SELECT id FROM public.model_mappings")
        .lines()
        .map(|l| (l.to_string(), Value::Null))
        .collect()
}

#[test]
fn a_replaced_or_recreated_sqlite_file_is_followed() {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("old", 5) {
        ws.app.upsert(&r);
    }
    let d = Daemon::start(&ws, None, FAST);
    d.wait_first_run();
    let ids = |d: &Daemon| -> Vec<String> {
        d.get("/mappings?limit=500").json()["data"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&d).len(), 5);

    // Atomic replacement: a new file renamed over the database.
    let staged = ws.path().join("staged.sqlite3");
    {
        let new = AppDb::create(&staged);
        for r in Row::numbered("renamed", 3) {
            new.upsert(&r);
        }
        new.checkpoint_truncate();
    }
    // As a careful replacement does: the old WAL is checkpointed and removed with the old
    // file (a stale -wal would otherwise be replayed onto the new file by any reader).
    ws.app.checkpoint_truncate();
    for path in [&staged, &ws.db_path()] {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    std::fs::rename(&staged, ws.db_path()).unwrap();
    d.wait(
        Duration::from_secs(15),
        "the renamed-in file's mappings",
        || {
            let ids = ids(&d);
            ids.len() == 3 && ids.iter().all(|i| i.starts_with("mapping:renamed"))
        },
    );

    // Deleted, then created again.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ws.db_path().display()));
    }
    d.wait_status(Duration::from_secs(15), "the missing file reported", |s| {
        s["source"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist"))
    });
    assert_eq!(d.get("/readyz").status, 503);
    let recreated = AppDb::create(&ws.db_path());
    for r in Row::numbered("recreated", 4) {
        recreated.upsert(&r);
    }
    d.wait(
        Duration::from_secs(15),
        "the re-created file's mappings",
        || {
            let ids = ids(&d);
            ids.len() == 4 && ids.iter().all(|i| i.starts_with("mapping:recreated"))
        },
    );
    assert_eq!(d.get("/readyz").status, 200);
}

/// Waits until a mapsync session runs a `COPY … FROM STDIN` into `db` (a large run is writing).
fn wait_for_copy(db: &TestDb) {
    wait_until(
        Duration::from_secs(60),
        "mapsync's COPY to be running",
        || {
            run_psql(
                &db.admin_url(),
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mapsync' \
                     AND state = 'active' AND query LIKE 'COPY%FROM STDIN%' AND datname = '{}'",
                    db.name
                ),
            )
            .is_ok_and(|n| n.trim() != "0")
        },
    );
}

#[test]
fn kill_9_in_the_middle_of_a_large_run_leaves_no_partial_mirror() {
    let (ws, db) = mirrored(&[]);
    generate(&ws.db_path(), 60_000, 3, true);
    let mut d = Daemon::start(&ws, Some(&db.url), FAST);
    wait_for_copy(&db);
    d.signal(libc::SIGKILL);
    let _ = d.child.wait();
    assert_eq!(
        remote_count(&db),
        0,
        "the killed run must not have committed anything"
    );

    let restarted = Instant::now();
    let d = Daemon::start(&ws, Some(&db.url), FAST);
    d.wait_status(
        Duration::from_secs(120),
        "the restarted daemon's run",
        |s| s["last_run"]["status"] == "synced",
    );
    assert_eq!(remote_count(&db), 60_003);
    eprintln!(
        "kill -9 mid-run: 0 rows committed; restarted → 60,003 rows in {:?}",
        restarted.elapsed()
    );
}

#[test]
fn sigterm_exits_0_in_time_idle_and_mid_run() {
    let (ws, db) = mirrored(&Row::numbered("m", 5));
    let mut d = Daemon::start(&ws, Some(&db.url), FAST);
    d.wait_first_run();
    let (status, took) = d.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}\n{}", d.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // Mid-run: the run commits or rolls back, never half; exit is still 0 and in time.
    generate(&ws.db_path(), 60_000, 3, true);
    db.psql("TRUNCATE public.model_mappings");
    let mut d = Daemon::start(&ws, Some(&db.url), FAST);
    wait_for_copy(&db);
    let (status, took) = d.stop(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}\n{}", d.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let n = remote_count(&db);
    assert!(n == 0 || n == 60_008, "all or nothing, got {n} rows");
    eprintln!("SIGTERM mid-run: exit 0 after {took:?}, {n} of 60,008 rows (all or nothing)");
}

#[test]
fn snapshots_rotate_and_skip_unchanged_content() {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("m", 3) {
        ws.app.upsert(&r);
    }
    let d = TestApp::spawn(
        &ws,
        None,
        &FAST.replace("[snapshot]\n", "[snapshot]\nkeep = 3\n"),
    );
    d.wait_first_run();
    d.wait(Duration::from_secs(10), "the first snapshot", || {
        snapshot_files(&ws.snapshot_dir()).len() == 1
    });
    let ok = |d: &TestApp| d.metric("mapsync_snapshot_writes_total{result=\"ok\"}");
    for i in 0..5 {
        let before = ok(&d);
        // Added in reverse: the file's order (rowid) is not the export order.
        ws.app
            .upsert(&Row::mapping(&format!("new{}", 4 - i), "gpt-4o"));
        d.wait(Duration::from_secs(10), "a new snapshot", || {
            ok(&d) > before
        });
    }
    let files = snapshot_files(&ws.snapshot_dir());
    assert_eq!(files.len(), 3, "keep = 3: {files:?}");
    let latest = std::fs::read(ws.snapshot_dir().join("model-mappings-latest.json")).unwrap();
    let newest = std::fs::read(ws.snapshot_dir().join(files.last().unwrap())).unwrap();
    assert_eq!(latest, newest, "-latest is the newest snapshot");
    let doc: Value = serde_json::from_slice(&latest).unwrap();
    assert_eq!(doc["count"], 8);
    assert_eq!(doc["mappings"].as_array().unwrap().len(), 8);
    // The same mappings, in the same (export) order, as `mapsync export` writes.
    let export = ws.mapsync(&["export"]).expect_code(0).json();
    assert_eq!(doc["mappings"], export["mappings"]);

    // Unchanged content writes nothing new.
    let r = d.post("/snapshots", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["written"], false);
    let unchanged = |d: &TestApp| d.metric("mapsync_snapshot_writes_total{result=\"unchanged\"}");
    let before = unchanged(&d);
    ws.app
        .exec("INSERT INTO ai_prompts (name, content) VALUES ('no mapping here', 'x')");
    d.wait(Duration::from_secs(10), "the prompt commit read", || {
        unchanged(&d) > before
    });
    assert_eq!(snapshot_files(&ws.snapshot_dir()), files);
}

#[test]
fn a_restart_beside_an_unchanged_snapshot_writes_no_new_one() {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("m", 3) {
        ws.app.upsert(&r);
    }
    let first = TestApp::spawn(&ws, None, FAST);
    first.wait_first_run();
    first.wait(Duration::from_secs(10), "the first snapshot", || {
        snapshot_files(&ws.snapshot_dir()).len() == 1
    });
    drop(first);
    let files = snapshot_files(&ws.snapshot_dir());

    // The restarted daemon reads -latest back (entry by entry) and finds the same content.
    let again = TestApp::spawn(&ws, None, FAST);
    again.wait_first_run();
    again.wait(
        Duration::from_secs(10),
        "the start-up snapshot decision",
        || again.metric("mapsync_snapshot_writes_total{result=\"unchanged\"}") >= 1.0,
    );
    assert_eq!(snapshot_files(&ws.snapshot_dir()), files);
    assert_eq!(
        again.metric("mapsync_snapshot_writes_total{result=\"ok\"}"),
        0.0
    );
}

#[test]
fn a_failing_snapshot_write_is_counted_and_damages_nothing() {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("m", 3) {
        ws.app.upsert(&r);
    }
    ws.write_config(None, &format!("{FAST}\n[http]\nlisten = \"127.0.0.1:0\"\n"));
    // Files the daemon writes may not grow past 64 KiB; SIGXFSZ is ignored (and stays ignored
    // across exec), so the write fails with EFBIG like a full disk would.
    let d = Daemon::spawn(&ws, None, |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 64 * 1024,
                    rlim_max: 64 * 1024,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    d.wait_first_run();
    d.wait(Duration::from_secs(10), "the first snapshot", || {
        snapshot_files(&ws.snapshot_dir()).len() == 1
    });
    let before = snapshot_files(&ws.snapshot_dir());
    let first = std::fs::read(ws.snapshot_dir().join(&before[0])).unwrap();

    // Make the next snapshot far larger than 64 KiB.
    let mut big = Row::numbered("big", 400);
    for r in &mut big {
        r.metadata_json = Some(format!("{{\"note\": \"{}\"}}", "x".repeat(300)));
    }
    ws.app.exec("BEGIN");
    for r in &big {
        ws.app.upsert(r);
    }
    ws.app.exec("COMMIT");
    d.wait_status(Duration::from_secs(15), "the failed snapshot", |s| {
        !s["snapshot"]["last_error"].is_null() && s["source"]["rows"] == 403
    });
    assert!(d.metric("mapsync_snapshot_writes_total{result=\"error\"}") >= 1.0);
    assert_eq!(d.get("/livez").status, 200);
    assert_eq!(
        snapshot_files(&ws.snapshot_dir()),
        before,
        "no new file, nothing deleted"
    );
    assert_eq!(
        std::fs::read(ws.snapshot_dir().join(&before[0])).unwrap(),
        first
    );
    let leftovers: Vec<String> = std::fs::read_dir(ws.snapshot_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("model-mappings-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
    let latest = std::fs::read(ws.snapshot_dir().join("model-mappings-latest.json")).unwrap();
    assert_eq!(latest, first, "-latest still holds the last good snapshot");
}

#[test]
fn an_idle_daemon_sends_postgres_nothing() {
    let (ws, db) = mirrored(&Row::numbered("m", 10));
    let d = TestApp::spawn(&ws, Some(&db.url), FAST);
    d.wait_first_run();
    let activity = || {
        run_psql(
            &db.admin_url(),
            &format!(
                "SELECT coalesce(max(state_change)::text, 'none') || ' ' || count(*) FROM pg_stat_activity \
                 WHERE application_name = 'mapsync' AND datname = '{}'",
                db.name
            ),
        )
        .unwrap()
    };
    let before = activity();
    // The pool holds a session: a statement sent on it would move its state_change.
    assert!(!before.starts_with("none"), "no mapsync session: {before}");
    // A commit that changes no mapping: the daemon reads SQLite and finds nothing to push.
    let read_at = d.status()["source"]["read_at"].clone();
    ws.app
        .exec("INSERT INTO ai_prompts (name, content) VALUES ('unrelated', 'x')");
    d.wait_status(Duration::from_secs(10), "the commit read", |s| {
        s["source"]["read_at"] != read_at
    });
    // Give the daemon time in which it would have talked to Postgres if it were going to:
    // twice the longest debounce (max_delay_ms = 500).
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(activity(), before, "no statement reached Postgres");
}

#[test]
fn snapshots_after_runs_are_spaced_by_min_interval_and_flushed_at_shutdown() {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("m", 3) {
        ws.app.upsert(&r);
    }
    let mut d = Daemon::start(
        &ws,
        None,
        &FAST.replace("min_interval_s = 0", "min_interval_s = 3"),
    );
    d.wait_first_run();
    d.wait(Duration::from_secs(10), "the start-up snapshot", || {
        snapshot_files(&ws.snapshot_dir()).len() == 1
    });
    ws.app.upsert(&Row::mapping("a", "gpt-4o"));
    d.wait_status(Duration::from_secs(10), "change a read", |s| {
        s["source"]["rows"] == 4
    });
    ws.app.upsert(&Row::mapping("b", "gpt-4o"));
    d.wait_status(Duration::from_secs(10), "change b read", |s| {
        s["source"]["rows"] == 5
    });
    let latest = || -> Value {
        serde_json::from_slice(
            &std::fs::read(ws.snapshot_dir().join("model-mappings-latest.json")).unwrap(),
        )
        .unwrap()
    };
    d.wait(
        Duration::from_secs(15),
        "a snapshot holding both changes",
        || latest()["count"] == 5,
    );
    // Never two writes after runs within min_interval_s of each other.
    let stamps: Vec<chrono::NaiveDateTime> = snapshot_files(&ws.snapshot_dir())
        .iter()
        .map(|n| {
            chrono::NaiveDateTime::parse_from_str(&n[15..n.len() - 5], "%Y%m%dT%H%M%S%6fZ").unwrap()
        })
        .collect();
    assert!((2..=3).contains(&stamps.len()), "{stamps:?}");
    for pair in stamps.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::milliseconds(2900),
            "snapshots {pair:?} are closer than min_interval_s"
        );
    }

    // A change still waiting for its turn is written at shutdown.
    ws.app.upsert(&Row::mapping("c", "gpt-4o"));
    d.wait_status(Duration::from_secs(10), "change c read", |s| {
        s["source"]["rows"] == 6
    });
    let (status, _) = d.stop(Duration::from_secs(10));
    assert!(status.success());
    assert_eq!(snapshot_files(&ws.snapshot_dir()).len(), 3);
    assert_eq!(latest()["count"], 6);
}

#[test]
fn watched_changes_with_delete_propagation_follow_inserts_updates_deletes_and_aliases() {
    let (ws, db) = mirrored(&Row::numbered("m", 30));
    let d = TestApp::spawn(
        &ws,
        Some(&db.url),
        &format!("{FAST}\n[target]\ndelete_missing = true\n"),
    );
    d.wait_first_run();
    let ids = || -> Vec<String> {
        let mut ids: Vec<String> = remote_rows(&db).into_keys().collect();
        ids.sort();
        ids
    };

    ws.app.delete("mapping:m003");
    ws.app.upsert(&Row::mapping("m004", "claude-sonnet-4-5"));
    ws.app.upsert(&Row::mapping("new", "gpt-4o"));
    d.wait(
        Duration::from_secs(10),
        "delete, update and insert mirrored",
        || {
            let r = remote_rows(&db);
            !r.contains_key("mapping:m003")
                && r.contains_key("mapping:new")
                && r["mapping:m004"]["default_model"] == "claude-sonnet-4-5"
        },
    );

    // A legacy row that normalises onto an existing id: the later updated_at wins, whichever
    // row it is stored under.
    let mut alias = Row::mapping("m005", "from-tenant-row");
    alias.id = "tenant:m005".into();
    alias.scope_type = "tenant".into();
    alias.updated_at = Some("2027-01-01T00:00:00+00:00".into());
    ws.app.upsert(&alias);
    d.wait(Duration::from_secs(10), "the newer legacy row wins", || {
        remote_rows(&db)["mapping:m005"]["default_model"] == "from-tenant-row"
    });
    ws.app.delete("tenant:m005");
    d.wait(
        Duration::from_secs(10),
        "the remaining row is mirrored again",
        || remote_rows(&db)["mapping:m005"]["default_model"] == "gpt-4o",
    );
    assert_eq!(ids().len(), 30, "29 seed rows left + new");
    assert!(!ids().iter().any(|id| id.starts_with("tenant:")));
    let s = d.wait_status(Duration::from_secs(10), "nothing pending", |s| {
        s["pending_changes"] == 0
    });
    assert_eq!(s["last_run"]["trigger"], "watch", "{s:#}");
}
