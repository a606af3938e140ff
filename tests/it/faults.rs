//! The fault suite (issue 8): an operator's worst day, against the daemon (in-process, or the
//! real binary where a process is needed), the application's SQLite file written the way the
//! application writes it, and a real PostgreSQL. Each test asserts what a user would check:
//! Postgres ends equal to the source (row by row, all ten fields), nothing half-written, no
//! remote row lost, recovery within its bound, the error visible in `/readyz`, `/status` and
//! the metrics, and no mapsync session left in `pg_stat_activity`.
//!
//! Scenarios covered elsewhere and not repeated here: `kill -9` in the middle of a large run
//! and SIGTERM mid-run (tests/daemon.rs), a Postgres outage during commits
//! (tests/daemon.rs), a file replaced or deleted and re-created (tests/daemon.rs), wrong
//! passwords and TLS (tests/sync.rs).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::daemon::Daemon;
use crate::harness::workspace::{
    FAST, Workspace, assert_mirror_equals_source, mirrored, mirrored_on_own_cluster, remote_count,
    remote_rows, snapshot_files, supabase_db,
};
use crate::harness::*;
use serde_json::Value;

/// Failed runs so far, over every trigger.
fn errors(d: &impl Admin) -> f64 {
    ["manual", "watch", "schedule", "startup"]
        .iter()
        .map(|t| {
            d.metric(&format!(
                "mapsync_sync_runs_total{{trigger=\"{t}\",result=\"error\"}}"
            ))
        })
        .sum()
}

/// Closes the workspace's application connection (a test that replaces the file must not
/// leave the application writing to it by name).
fn close_app(ws: &mut Workspace) {
    let elsewhere = ws.path().join("closed-app.sqlite3");
    drop(std::mem::replace(&mut ws.app, AppDb::create(&elsewhere)));
}

/// Sessions of mapsync's (application_name) on `db` (other tests' daemons use the same server).
fn mapsync_sessions(db: &TestDb) -> u64 {
    run_psql(
        &db.admin_url(),
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mapsync' \
             AND datname = '{}'",
            db.name
        ),
    )
    .ok()
    .and_then(|n| n.trim().parse().ok())
    .unwrap_or(u64::MAX)
}

/// Whether a mapsync session of the test database is waiting on a lock.
fn mapsync_waiting_on_a_lock(db: &TestDb) -> bool {
    db.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mapsync' \
         AND wait_event_type = 'Lock' AND datname = current_database()",
    )
    .trim()
        != "0"
}

/// A psql session kept open (stdin piped), for locks held by hand.
struct HeldSession(Child);

impl HeldSession {
    fn open(url: &str, sql: &str) -> HeldSession {
        let mut child = Command::new(pg::psql_path())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql starts");
        let stdin = child.stdin.as_mut().expect("piped");
        writeln!(stdin, "{sql}").expect("send SQL");
        stdin.flush().expect("flush");
        HeldSession(child)
    }

    fn finish(mut self, sql: &str) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = writeln!(stdin, "{sql}");
        }
        let _ = self.0.wait();
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// File descriptors of process `pid` that point at `path`, its `-wal` or its `-shm`.
fn handles_on(pid: u32, path: &Path) -> Vec<PathBuf> {
    let names: Vec<PathBuf> = ["", "-wal", "-shm"]
        .iter()
        .map(|s| PathBuf::from(format!("{}{s}", path.display())))
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|target| names.contains(target))
                .collect()
        })
        .unwrap_or_default()
}

// --- 1. values Postgres cannot hold --------------------------------------------------------

#[test]
fn no_single_row_can_block_a_run() {
    let (mut ws, db) = mirrored(&[]);
    close_app(&mut ws);
    generate(&ws.db_path(), 1_000, 3, true);
    let app = AppDb::open(&ws.db_path());
    // A NUL inside a metadata string, as Python's json.dumps("a\0b") writes it.
    app.exec(
        "UPDATE llm_model_mappings SET metadata_json = json_object('k', 'x' || char(0) || 'y') \
         WHERE rowid = 3",
    );
    app.exec(
        "UPDATE llm_model_mappings SET name = 'na' || char(0) || 'me', \
         candidates_json = '[\"a\\u0000b\", 12345678901234567890123]' WHERE rowid = 4",
    );
    app.exec(
        "UPDATE ai_prompts SET version = 'v' || char(0) || '1', category = char(0) || 'cat' \
         WHERE id = (SELECT min(id) FROM ai_prompts)",
    );
    app.exec(
        "UPDATE llm_model_mappings SET updated_at = '9999-12-31T23:59:59.9999999+00:00' WHERE rowid = 5",
    );
    app.exec(
        "UPDATE llm_model_mappings SET updated_at = '10000-01-01T00:00:00+00:00' WHERE rowid = 6",
    );
    app.exec(
        "UPDATE llm_model_mappings SET metadata_json = \
         '{\"big\": 12345678901234567890123, \"e\": 1e3, \"scale\": 1.50, \"huge\": 1e200000}' \
         WHERE rowid = 7",
    );
    // An id longer than a Postgres index entry takes.
    let long_key: String = (0..3000u32)
        .map(|i| char::from(b'a' + ((i.wrapping_mul(2654435761) >> 7) % 26) as u8))
        .collect();
    let long = Row::mapping(&long_key, "gpt-4o");
    app.upsert(&long);
    // A constraint added by hand in Postgres that one row breaks.
    db.psql(
        "ALTER TABLE public.model_mappings ADD CONSTRAINT no_evil CHECK (name IS DISTINCT FROM 'evil')",
    );
    app.upsert(&Row {
        name: Some("evil".into()),
        ..Row::mapping("evil", "gpt-4o")
    });

    let run = ws.mapsync(&["sync"]);
    run.expect_code(0);
    let report = run.json();
    assert_eq!(report["status"], "synced", "{report}");
    assert!(
        report["detail"]
            .as_str()
            .is_some_and(|d| d.contains("mapping:evil")),
        "the refused row is named: {report}"
    );
    assert!(
        run.stderr.contains("U+0000"),
        "the cleaned rows are logged: {}",
        run.stderr
    );
    let long_id = long.id.as_str();
    assert_mirror_equals_source(&ws, &db, &[long_id, "mapping:evil"]);
    assert_eq!(remote_count(&db), 1_000 + 3);

    let remote = remote_rows(&db);
    let nul_row = remote
        .values()
        .find(|r| r["metadata"]["k"].is_string())
        .expect("the NUL row is mirrored");
    assert_eq!(nul_row["metadata"]["k"], "xy");
    let big = remote
        .values()
        .find(|r| r["metadata"]["big"].is_number())
        .expect("the row with big numbers");
    assert_eq!(
        big["metadata"]["big"].to_string(),
        "12345678901234567890123"
    );
    assert_eq!(big["metadata"]["e"].to_string(), "1000");
    assert_eq!(big["metadata"]["scale"].to_string(), "1.50");
    assert_eq!(big["metadata"]["huge"], "1e+200000", "kept as text");
    let export = ws.mapsync(&["export"]).expect_code(0).json();
    let text = export.to_string();
    assert!(
        text.contains("12345678901234567890123"),
        "exact in the export"
    );
    assert!(
        text.contains("9999-12-31T23:59:59.999999+00:00"),
        "{}",
        &text[..200]
    );
    assert!(!text.contains("+10000"), "no timestamp past year 9999");

    // The daemon mirrors every later change too, and is ready.
    let d = TestApp::spawn(&ws, Some(&db.url), FAST);
    let first = d.wait_first_run();
    assert_eq!(first["last_run"]["status"], "synced", "{first:#}");
    app.upsert(&Row::mapping("after", "o4-mini"));
    d.wait(Duration::from_secs(15), "a later change mirrored", || {
        remote_rows(&db).contains_key("mapping:after")
    });
    d.wait(Duration::from_secs(10), "/readyz 200", || {
        d.get("/readyz").status == 200
    });
}

// --- 2 and 4. invisible while idle, and damage it cannot miss ------------------------------

#[test]
fn an_idle_daemon_holds_nothing_on_the_application_database() {
    let (mut ws, db) = mirrored(&Row::numbered("m", 20));
    let d = Daemon::start(&ws, Some(&db.url), FAST);
    d.wait_first_run();
    let pid = d.child.id();
    // Idle: nothing pending, and no file event for a while (a checkpoint after a burst is
    // one more event, and one more read).
    let idle = |d: &Daemon| {
        let events = d.metric("mapsync_fs_events_total");
        let s = d.status();
        std::thread::sleep(Duration::from_millis(300));
        s["state"] == "idle"
            && s["pending_changes"] == 0
            && d.metric("mapsync_fs_events_total") == events
            && d.status()["state"] == "idle"
    };

    // A burst of writes, mirrored; then nothing is held between reads.
    for r in Row::numbered("burst", 100) {
        ws.app.upsert(&r);
    }
    d.wait(Duration::from_secs(20), "the burst mirrored", || {
        remote_count(&db) == 120 && idle(&d)
    });
    d.wait(Duration::from_secs(5), "no handle on the database", || {
        handles_on(pid, &ws.db_path()).is_empty()
    });

    // The application can take the database for itself and change its journal mode.
    let exclusive = ws.app.conn();
    exclusive
        .execute_batch("PRAGMA locking_mode = EXCLUSIVE")
        .unwrap();
    exclusive
        .execute_batch("UPDATE llm_model_mappings SET name = 'excl' WHERE id = 'mapping:m001'")
        .unwrap_or_else(|e| panic!("an exclusive write while mapsync idles: {e}"));
    exclusive
        .execute_batch("PRAGMA locking_mode = NORMAL")
        .unwrap();
    let mode: String = exclusive
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("a journal_mode change while mapsync idles: {e}"));
    assert_eq!(mode, "delete");
    d.wait(
        Duration::from_secs(15),
        "the exclusive write mirrored",
        || remote_rows(&db)["mapping:m001"]["name"] == "excl",
    );
    let mode: String = ws
        .app
        .conn()
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    ws.app.exec("VACUUM");

    // The application's unsafe swap: burst-write, close, rename a new file over the old.
    for r in Row::numbered("pre-swap", 200) {
        ws.app.upsert(&r);
    }
    d.wait(
        Duration::from_secs(20),
        "the pre-swap burst mirrored",
        || remote_count(&db) == 320 && idle(&d),
    );
    let staged = ws.path().join("staged.sqlite3");
    {
        let new = AppDb::create(&staged);
        for r in Row::numbered("swapped", 7) {
            new.upsert(&r);
        }
        new.checkpoint_truncate();
    }
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", staged.display()));
    }
    close_app(&mut ws);
    let wal = PathBuf::from(format!("{}-wal", ws.db_path().display()));
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        wal_len, 0,
        "closing the application's last connection empties its -wal (nothing else holds it)"
    );
    std::fs::rename(&staged, ws.db_path()).unwrap();
    let swapped = AppDb::open(&ws.db_path());
    let check: String = swapped
        .conn()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok", "no stale WAL was replayed onto the new file");
    assert_eq!(swapped.count(), 7);
    d.wait(Duration::from_secs(15), "the swapped-in file read", || {
        d.status()["source"]["rows"] == 7
    });

    // 4. A header overwritten with garbage: every new process sees "not a database", and so
    // must the daemon.
    drop(swapped);
    let mut header = vec![0u8; 100];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(ws.db_path())
            .unwrap();
        f.read_exact(&mut header).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&[0xA5; 100]).unwrap();
        f.sync_all().unwrap();
    }
    let before = errors(&d);
    d.wait(
        Duration::from_secs(15),
        "/readyz 503 on the damaged file",
        || {
            let r = d.get("/readyz");
            r.status == 503 && r.json()["checks"]["sqlite"]["ok"] == false
        },
    );
    let s = d.status();
    assert!(
        s["source"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a readable database")),
        "{s:#}"
    );
    assert!(errors(&d) > before, "the failed read is counted");
    assert_eq!(remote_count(&db), 320, "no remote row is lost");
    // Repaired: ready again.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(ws.db_path())
            .unwrap();
        f.write_all(&header).unwrap();
        f.sync_all().unwrap();
    }
    d.wait(Duration::from_secs(15), "/readyz 200 once repaired", || {
        d.get("/readyz").status == 200
    });
}

// --- 3. recovery follows the fault, not a backoff timer ------------------------------------

/// An outage this long grows the backoff (1, 2, 4, 8 s …) to about 16 s: recovery in a few
/// seconds proves it did not wait for the timer.
const OUTAGE: Duration = Duration::from_secs(20);
/// Generous for debounce + 1 s on a loaded 2-core machine, well below the backoff's 16 s.
const RECOVERY_BOUND: Duration = Duration::from_secs(6);

#[test]
fn a_sync_waiting_for_postgres_holds_no_read_on_the_application_database() {
    // No state yet, so `mapsync sync` starts reading at once, beside its connection; more
    // rows than the COPY's channel holds (8 chunks of 1,024). Another run holds the mirror's
    // lock, so this one waits for Postgres with its read done or under way.
    let (mut ws, db) = mirrored(&[]);
    close_app(&mut ws);
    generate(&ws.db_path(), 12_000, 3, true);
    let app = AppDb::open(&ws.db_path());
    let lock = HeldSession::open(
        &db.url,
        "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('mapsync:public.model_mappings', 0));",
    );
    wait_until(
        Duration::from_secs(30),
        "the advisory lock held by hand",
        || {
            db.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
                .trim()
                != "0"
        },
    );
    let mut sync = crate::harness::workspace::command()
        .arg("--config")
        .arg(&ws.config)
        .arg("sync")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mapsync sync starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mapsync_waiting_on_a_lock(&db) {
        if Instant::now() > deadline || sync.try_wait().ok().flatten().is_some() {
            let _ = sync.kill();
            panic!(
                "mapsync sync did not wait for the lock: {:?}",
                sync.wait_with_output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // While it waits, nothing of it stays open on the application's file: no read
    // transaction that would pin the WAL (SPEC §2).
    wait_until(
        Duration::from_secs(30),
        "no handle of the waiting mapsync sync on the application's database",
        || handles_on(sync.id(), &ws.db_path()).is_empty() && mapsync_waiting_on_a_lock(&db),
    );
    let (busy, _, _) = app.checkpoint_truncate();
    assert_eq!(
        busy, 0,
        "a checkpoint was blocked by the waiting mapsync sync"
    );
    assert!(mapsync_waiting_on_a_lock(&db), "still waiting for the lock");
    lock.finish("ROLLBACK;");
    let out = sync.wait_with_output().expect("mapsync sync ends");
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(report["changed_count"], report["synced_count"], "{report}");
    assert_mirror_equals_source(&ws, &db, &[]);
}

#[test]
fn recovery_follows_the_returning_file_not_the_backoff_timer() {
    let (mut ws, db) = mirrored(&Row::numbered("m", 10));
    let d = TestApp::spawn(&ws, Some(&db.url), FAST);
    d.wait_first_run();
    close_app(&mut ws);
    let aside = ws.path().join("aside.sqlite3");
    std::fs::rename(ws.db_path(), &aside).unwrap();
    d.wait_status(Duration::from_secs(10), "the missing file reported", |s| {
        s["source"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist"))
    });
    std::thread::sleep(OUTAGE);
    {
        let app = AppDb::open(&aside);
        app.upsert(&Row::mapping("while-missing", "qwen-max"));
    }
    let back = Instant::now();
    std::fs::rename(&aside, ws.db_path()).unwrap();
    d.wait(
        RECOVERY_BOUND,
        "the returning file's rows in Postgres",
        || remote_rows(&db).contains_key("mapping:while-missing"),
    );
    eprintln!("file back → row in Postgres: {:?}", back.elapsed());
    assert_mirror_equals_source(&ws, &db, &[]);
}

#[test]
fn recovery_follows_the_first_answer_of_postgres_not_the_backoff_timer() {
    let (cluster, dbname, url, ws) = mirrored_on_own_cluster(&Row::numbered("m", 10));
    let d = TestApp::spawn(
        &ws,
        Some(&url),
        &format!("{FAST}\n[target]\nretry_max = 60\nconnect_timeout_ms = 1000\n"),
    );
    d.wait_first_run();
    cluster.stop();
    // Commits during the outage: each watch run fails and the backoff grows.
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < OUTAGE {
        ws.app
            .upsert(&Row::mapping(&format!("outage{i}"), "qwen-max"));
        i += 1;
        std::thread::sleep(Duration::from_millis(1500));
    }
    let s = d.wait_status(Duration::from_secs(10), "the failures reported", |s| {
        s["last_run"]["status"] == "error" && s["state"] == "retrying"
    });
    assert_eq!(s["last_run"]["reason"], "target_network", "{s:#}");
    assert!(d.metric("mapsync_sync_failures_total{reason=\"target_network\"}") >= 1.0);
    cluster.start_again();
    let back = Instant::now();
    d.wait(
        RECOVERY_BOUND,
        "every change made during the outage",
        || {
            let n = cluster.psql(
                &dbname,
                "SELECT count(*) FROM public.model_mappings WHERE id LIKE 'mapping:outage%'",
            );
            n.trim() == i.to_string()
        },
    );
    eprintln!("Postgres back → {i} rows in Postgres: {:?}", back.elapsed());
    d.wait(Duration::from_secs(10), "/readyz 200", || {
        d.get("/readyz").status == 200
    });
}

// --- 5. shutdown while a run waits on a row lock -------------------------------------------

#[test]
fn sigterm_on_a_run_blocked_by_a_row_lock_leaves_no_session_behind() {
    let (ws, db) = mirrored(&Row::numbered("m", 10));
    let mut d = Daemon::start(&ws, Some(&db.url), FAST);
    d.wait_first_run();
    let lock = HeldSession::open(
        &db.url,
        "BEGIN; UPDATE public.model_mappings SET name = 'held' WHERE id = 'mapping:m003';",
    );
    wait_until(Duration::from_secs(10), "the row lock taken", || {
        db.psql("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.mode = 'RowExclusiveLock' AND a.application_name = 'psql' AND a.datname = current_database()")
            .trim()
            != "0"
    });
    ws.app.upsert(&Row::mapping("m003", "claude-sonnet-4-5"));
    wait_until(
        Duration::from_secs(15),
        "mapsync waiting on the lock",
        || mapsync_waiting_on_a_lock(&db),
    );

    // A caller of POST /sync is answered, with the reason, long before statement_timeout.
    let asked = Instant::now();
    let r = d.post("/sync", b"");
    let waited = asked.elapsed();
    eprintln!(
        "POST /sync behind a row lock answered {} after {waited:?}",
        r.status
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        waited < Duration::from_secs(45),
        "answered after {waited:?}"
    );
    let msg = r.json()["msg"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("lock"), "{msg}");

    wait_until(
        Duration::from_secs(15),
        "mapsync waiting on the lock again",
        || mapsync_waiting_on_a_lock(&db) || d.status()["state"] == "retrying",
    );
    let (status, took) = d.stop(Duration::from_secs(10));
    assert!(status.success(), "exit {status:?}\n{}", d.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    wait_until(
        Duration::from_secs(5),
        "no mapsync session left on the server",
        || mapsync_sessions(&db) == 0,
    );
    lock.finish("ROLLBACK;");
    assert_eq!(remote_rows(&db)["mapping:m003"]["default_model"], "gpt-4o");
}

// --- 6. a full or read-only snapshot disk --------------------------------------------------

/// A tmpfs of `kib` KiB mounted on `dir`, unmounted on drop. Needs root (CI runs as root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: u64) -> Tmpfs {
        assert!(
            sys::is_root(),
            "the full-disk test mounts a small tmpfs and needs root: run the tests as root (CI does)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount runs (util-linux)");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount_read_only(&self) {
        let out = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_snapshot_disk_clears_itself_and_a_read_only_one_blocks_no_sync() {
    let (ws, db) = mirrored(&Row::numbered("m", 150));
    // One snapshot of 150 mappings is about 60 KiB: the disk holds four, not five.
    let size = {
        let probe = ws.path().join("probe.json");
        ws.mapsync(&["export", "-o", probe.to_str().unwrap()])
            .expect_code(0);
        std::fs::metadata(&probe).unwrap().len()
    };
    let kib = (size * 9 / 2).div_ceil(4096) * 4;
    let disk = Tmpfs::mount(&ws.snapshot_dir(), kib);
    let d = TestApp::spawn(
        &ws,
        Some(&db.url),
        &FAST.replace("[snapshot]\n", "[snapshot]\nkeep = 4\n"),
    );
    d.wait_first_run();
    let ok = |d: &TestApp| d.metric("mapsync_snapshot_writes_total{result=\"ok\"}");
    for i in 0..8 {
        let before = ok(&d);
        ws.app
            .upsert(&Row::mapping(&format!("m{:03}", i), "claude-sonnet-4-5"));
        d.wait(
            Duration::from_secs(15),
            "a snapshot written on a full disk",
            || ok(&d) > before,
        );
    }
    let files = snapshot_files(&ws.snapshot_dir());
    assert!(files.len() <= 4, "{files:?}");
    let latest = std::fs::read(ws.snapshot_dir().join("model-mappings-latest.json")).unwrap();
    let doc: Value = serde_json::from_slice(&latest).unwrap();
    assert_eq!(doc["count"], 150, "the newest snapshot is whole");
    assert_eq!(
        d.metric("mapsync_snapshot_writes_total{result=\"error\"}"),
        0.0,
        "every write succeeded, after retention made room"
    );

    // Read-only: snapshots fail with the fix named, and syncing goes on.
    disk.remount_read_only();
    ws.app.upsert(&Row::mapping("read-only", "gpt-4o"));
    d.wait(Duration::from_secs(15), "the change mirrored", || {
        remote_rows(&db).contains_key("mapping:read-only")
    });
    let s = d.wait_status(Duration::from_secs(15), "the snapshot error", |s| {
        s["snapshot"]["last_error"].is_string()
    });
    let e = s["snapshot"]["last_error"].as_str().unwrap();
    assert!(e.contains("writable") || e.contains("Read-only"), "{e}");
    assert!(d.metric("mapsync_snapshot_writes_total{result=\"error\"}") >= 1.0);
    assert_eq!(
        std::fs::read(ws.snapshot_dir().join("model-mappings-latest.json")).unwrap(),
        latest,
        "the previous snapshot is untouched"
    );
}

// --- 7. what a refused run leaves pending --------------------------------------------------

#[test]
fn after_a_restart_into_a_refused_state_pending_changes_counts_the_deletes() {
    let (mut ws, db) = mirrored(&[]);
    close_app(&mut ws);
    generate(&ws.db_path(), 1_000, 3, true);
    ws.sync(&[]);
    assert_eq!(remote_count(&db), 1_003);
    let app = AppDb::open(&ws.db_path());
    app.exec("DELETE FROM llm_model_mappings WHERE rowid > 3");
    let d = TestApp::spawn(
        &ws,
        Some(&db.url),
        &format!("{FAST}\n[target]\ndelete_missing = true\n"),
    );
    let s = d.wait_first_run();
    assert_eq!(s["last_run"]["status"], "refused:mass_delete", "{s:#}");
    assert_eq!(
        s["pending_changes"], 997,
        "what the next run would delete: {s:#}"
    );
    assert_eq!(d.metric("mapsync_pending_changes"), 997.0);
    assert_eq!(remote_count(&db), 1_003, "nothing was deleted");
}

// --- 8. two instances, one table -----------------------------------------------------------

#[test]
fn a_second_instance_on_the_same_table_never_deletes_the_firsts_rows() {
    let db = supabase_db();
    let first = Workspace::new(Some(&db.url), "[instance]\nname = \"first\"\n");
    for r in Row::numbered("a", 8) {
        first.app.upsert(&r);
    }
    first.mapsync(&["migrate"]).expect_code(0);
    let synced = first.sync(&["--delete-missing"]);
    assert_eq!(synced["status"], "synced");
    let registry = db
        .psql("SELECT name, target_table, last_status FROM public.mapsync_instances ORDER BY name");
    assert_eq!(registry.trim(), "first|public.model_mappings|synced");

    let second = Workspace::new(Some(&db.url), "[instance]\nname = \"second\"\n");
    for r in Row::numbered("b", 8) {
        second.app.upsert(&r);
    }
    let run = second.mapsync(&["sync", "--delete-missing"]);
    run.expect_code(1);
    let report = run.json();
    assert_eq!(report["status"], "refused:other_instance", "{report}");
    let detail = report["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("`first`"),
        "names the other instance: {detail}"
    );
    assert_eq!(
        db.psql("SELECT count(*) FROM public.model_mappings WHERE id LIKE 'mapping:a%'")
            .trim(),
        "8",
        "the first instance's rows are all there"
    );

    let check = second.mapsync(&["check"]);
    assert!(
        check.stdout.contains("first"),
        "mapsync check names the other instance:\n{}",
        check.stdout
    );

    // The daemon reports the same, in /status.
    let d = TestApp::spawn(
        &second,
        Some(&db.url),
        &format!("{FAST}\n[target]\ndelete_missing = true\n"),
    );
    let s = d.wait_first_run();
    assert_eq!(s["last_run"]["status"], "refused:other_instance", "{s:#}");
    assert!(
        s.to_string().contains("first"),
        "/status names the other instance: {s:#}"
    );
    drop(d);

    // Forced, it does what it is told (the operator's call).
    let forced = second.sync(&["--delete-missing", "--force"]);
    assert_eq!(forced["status"], "synced");
    assert_eq!(forced["deleted_count"], 8);
}

#[test]
fn a_database_without_the_instance_registry_is_still_mirrored_and_the_log_says_how_to_add_it() {
    let (ws, db) = mirrored(&Row::numbered("r", 12));
    db.psql("DROP TABLE public.mapsync_instances");
    // A cold load, a no-op and a change, each with delete propagation (whose guard asks the
    // registry): every one syncs.
    let cold = ws.mapsync(&["sync", "--delete-missing"]);
    cold.expect_code(0);
    assert_eq!(cold.json()["changed_count"], 12, "{cold:?}");
    assert!(
        cold.stderr.contains("public.mapsync_instances is missing")
            && cold.stderr.contains("mapsync migrate"),
        "says what is missing and how to add it: {cold:?}"
    );
    assert_eq!(ws.sync(&["--delete-missing"])["changed_count"], 0);
    ws.app.delete("mapping:r003");
    let changed = ws.sync(&["--delete-missing"]);
    assert_eq!(changed["deleted_count"], 1, "{changed}");
    assert_eq!(remote_count(&db), 11);
}

// --- the rest of an operator's worst day on the SQLite side --------------------------------

#[test]
fn a_damaged_emptied_or_locked_sqlite_file_never_costs_a_remote_row() {
    let (mut ws, db) = mirrored(&Row::numbered("m", 40));
    let d = Daemon::start(
        &ws,
        Some(&db.url),
        &format!("{FAST}\n[target]\ndelete_missing = true\n[source]\nbusy_timeout_ms = 500\n"),
    );
    d.wait_first_run();
    assert_eq!(remote_count(&db), 40);
    close_app(&mut ws);
    let good = ws.path().join("good.sqlite3");
    std::fs::copy(ws.db_path(), &good).unwrap();
    let put_back = |ws: &Workspace| {
        let tmp = ws.path().join("put-back.sqlite3");
        std::fs::copy(&good, &tmp).unwrap();
        std::fs::rename(&tmp, ws.db_path()).unwrap();
    };
    let replace_with = |ws: &Workspace, bytes: &[u8]| {
        let tmp = ws.path().join("bad.sqlite3");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, ws.db_path()).unwrap();
    };
    // Each fault is made just before these are called: the time they wait is the time the
    // daemon took to notice it, or to recover (printed for the record, not asserted).
    let not_ready = |d: &Daemon, what: &str, needle: &str| {
        let t = Instant::now();
        d.wait(Duration::from_secs(15), what, || {
            let r = d.get("/readyz");
            r.status == 503
                && r.json()["checks"]["sqlite"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(needle))
        });
        assert!(
            d.status()["source"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(needle)),
            "{what}: /status shows it"
        );
        assert_eq!(remote_count(&db), 40, "{what}: no remote row lost");
        eprintln!(
            "{what}: not ready after {:?}, 40 of 40 remote rows kept",
            t.elapsed()
        );
    };
    let ready_again = |d: &Daemon, what: &str| {
        let t = Instant::now();
        d.wait(Duration::from_secs(15), what, || {
            d.get("/readyz").status == 200
        });
        assert_eq!(remote_count(&db), 40);
        eprintln!("{what}: ready after {:?}", t.elapsed());
    };

    let before = errors(&d);
    replace_with(&ws, b"");
    not_ready(&d, "a truncated file", "llm_model_mappings");
    assert!(errors(&d) > before, "counted in mapsync_sync_runs_total");
    assert_eq!(d.status()["last_run"]["reason"], "source");
    assert!(d.metric("mapsync_sync_failures_total{reason=\"source\"}") >= 1.0);
    put_back(&ws);
    ready_again(&d, "the file restored after truncation");

    replace_with(&ws, &[0x5a; 8192]);
    not_ready(&d, "a file of garbage", "not a readable database");
    put_back(&ws);
    ready_again(&d, "the file restored after garbage");

    {
        let app = AppDb::open(&ws.db_path());
        app.exec("DROP TABLE llm_model_mappings");
    }
    not_ready(&d, "the table dropped", "llm_model_mappings");
    put_back(&ws);
    ready_again(&d, "the file restored after the drop");

    {
        let app = AppDb::open(&ws.db_path());
        app.exec("DELETE FROM llm_model_mappings");
    }
    let s = d.wait_status(Duration::from_secs(15), "the emptied file refused", |s| {
        s["last_run"]["status"] == "refused:mass_delete"
    });
    assert_eq!(s["pending_changes"], 40, "{s:#}");
    assert_eq!(s["last_run"]["reason"], "mass_delete", "{s:#}");
    assert!(d.metric("mapsync_sync_failures_total{reason=\"mass_delete\"}") >= 1.0);
    assert_eq!(remote_count(&db), 40, "an emptied file wipes nothing");
    put_back(&ws);
    d.wait_status(Duration::from_secs(15), "synced again", |s| {
        s["last_run"]["status"] == "synced"
    });

    std::fs::remove_file(ws.db_path()).unwrap();
    not_ready(&d, "the file deleted", "does not exist");
    put_back(&ws);
    ready_again(&d, "the file back after deletion");

    // Locked by the application for longer than busy_timeout_ms: reported, then followed.
    {
        let app = AppDb::open(&ws.db_path());
        app.exec("PRAGMA locking_mode = EXCLUSIVE");
        app.exec("UPDATE llm_model_mappings SET name = 'locked' WHERE id = 'mapping:m001'");
        not_ready(&d, "the file locked", "locked");
        app.exec("PRAGMA locking_mode = NORMAL");
        app.exec("UPDATE llm_model_mappings SET is_active = 1 WHERE id = 'mapping:m001'");
    }
    d.wait(
        Duration::from_secs(15),
        "the write made under the lock",
        || remote_rows(&db)["mapping:m001"]["name"] == "locked",
    );
    ready_again(&d, "the lock released");
}

// --- hand edits in Postgres ----------------------------------------------------------------

#[test]
fn hand_edits_in_postgres_are_repaired_by_the_next_full_run() {
    let (ws, db) = mirrored(&Row::numbered("m", 30));
    let d = TestApp::spawn(&ws, Some(&db.url), FAST);
    d.wait_first_run();
    db.psql(
        "UPDATE public.model_mappings SET default_model = 'hand-edit' WHERE id = 'mapping:m002'",
    );
    db.psql("DELETE FROM public.model_mappings WHERE id = 'mapping:m005'");
    db.psql(
        "INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('mapping:stray', 'mapping', 'stray')",
    );
    let r = d.post("/sync", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let data = &r.json()["data"];
    assert_eq!(data["changed_count"], 2, "{data}");
    assert_mirror_equals_source_but(&ws, &db, "mapping:stray");
}

/// As [`assert_mirror_equals_source`], with one extra remote row left alone (delete
/// propagation is off).
#[track_caller]
fn assert_mirror_equals_source_but(ws: &Workspace, db: &TestDb, extra: &str) {
    db.psql(&format!(
        "DELETE FROM public.model_mappings WHERE id = '{extra}'"
    ));
    assert_mirror_equals_source(ws, db, &[]);
}
