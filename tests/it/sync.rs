//! `mapsync sync`, `migrate` and `check` end to end: the real binary, a SQLite file in WAL mode
//! held open by the application's connection, and a real PostgreSQL.

use crate::harness::workspace::{
    DEPLOYED_SCHEMA, SUPABASE_ROLES_SHIM, Workspace, mirrored, remote_count, remote_rows,
    supabase_db, xmins,
};
use crate::harness::*;
use serde_json::{Value, json};

#[test]
fn first_sync_mirrors_exactly_what_export_shows() {
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    // The generator writes through its own connection while the application's stays open.
    generate(&ws.db_path(), 500, 3, true);
    ws.mapsync(&["migrate"]).expect_code(0);

    let report = ws.sync(&[]);
    assert_eq!(report["status"], "synced");
    assert_eq!(report["trigger"], "manual");
    assert_eq!(report["synced_count"], 503, "500 rows + 3 prompt mappings");
    assert_eq!(report["changed_count"], 503);
    assert_eq!(report["remote_before"], 0);
    assert_eq!(report["remote_after"], 503);
    assert_eq!(report["deleted_count"], 0);
    for key in crate::harness::workspace::SYNC_FIELDS {
        assert!(report.get(key).is_some(), "result lacks {key}: {report}");
    }

    // Every mirrored row equals the exported mapping, field by field.
    crate::harness::workspace::assert_mirror_equals_source(&ws, &db, &[]);
    let remote = remote_rows(&db);
    assert_eq!(remote.len(), 503);
    assert!(
        remote.keys().all(|id| !id.starts_with("tenant:")),
        "tenant ids are rebuilt as mapping:"
    );
    assert_eq!(
        remote.values().filter(|r| r["source"] == "prompt").count(),
        3
    );
}

#[test]
fn stored_values_are_normalised_and_a_resync_changes_nothing() {
    let mut tenant = Row::mapping("legacy", "qwen-max");
    tenant.id = "tenant:legacy".into();
    tenant.scope_type = " tenant ".into();
    let mut messy = Row::mapping("messy", "x");
    messy.scope_key = "  messy  ".into();
    messy.default_model = Some("   ".into());
    messy.candidates_json = Some("not json".into());
    messy.updated_at = Some("2026-01-16 10:17:10".into());
    messy.metadata_json = Some(
        r#"{"apiKey": "sk-live-123", "nested": {"client_secret": "s", "max_tokens": 512,
            "list": [{"Password": "p", "keep": "é\n\"q\""}]}, "temperature": 0.37, "note": "映射名"}"#
            .into(),
    );
    messy.is_active = None;
    let mut empty_scope = Row::mapping("skip", "x");
    empty_scope.id = "mapping:".into();
    empty_scope.scope_key = "   ".into();
    let (ws, db) = mirrored(&[tenant, messy, empty_scope]);

    let first = ws.sync(&[]);
    assert_eq!(
        first["synced_count"], 2,
        "the empty-scope row is skipped: {first}"
    );

    let remote = remote_rows(&db);
    let legacy = &remote["mapping:legacy"];
    assert_eq!(legacy["scope_type"], "mapping");
    let m = &remote["mapping:messy"];
    assert_eq!(m["scope_key"], "messy");
    assert_eq!(m["default_model"], Value::Null);
    assert_eq!(m["candidates"], json!([]));
    assert_eq!(
        m["is_active"], false,
        "NULL is inactive, as the application reads it"
    );
    assert_eq!(m["updated_at"], "2026-01-16T10:17:10.000000");
    assert_eq!(
        m["metadata"],
        json!({"nested": {"max_tokens": 512, "list": [{"keep": "é\n\"q\""}]}, "temperature": 0.37, "note": "映射名"})
    );
    let everything = db.psql("SELECT string_agg(metadata::text, ' ') FROM public.model_mappings");
    assert!(
        !everything.contains("sk-live-123"),
        "secrets never reach Postgres"
    );

    let before = xmins(&db);
    let again = ws.sync(&[]);
    assert_eq!(again["changed_count"], 0, "{again}");
    assert_eq!(xmins(&db), before, "a no-op resync rewrites no row");
}

#[test]
fn one_change_is_one_changed_row_and_keeps_the_pushed_updated_at() {
    let (ws, db) = mirrored(&Row::numbered("m", 50));
    ws.sync(&[]);
    let before = xmins(&db);

    let mut changed = Row::mapping("m007", "claude-sonnet-4-5");
    changed.updated_at = Some("2026-02-01T09:00:00+00:00".into());
    ws.app.upsert(&changed);
    let report = ws.sync(&[]);
    assert_eq!(report["changed_count"], 1, "{report}");
    assert_eq!(report["remote_before"], 50);
    assert_eq!(report["remote_after"], 50);

    let remote = remote_rows(&db);
    assert_eq!(remote["mapping:m007"]["default_model"], "claude-sonnet-4-5");
    assert_eq!(
        remote["mapping:m007"]["updated_at"],
        "2026-02-01T09:00:00.000000"
    );
    let synced_at = db
        .psql("SELECT synced_at IS NOT NULL FROM public.model_mappings WHERE id = 'mapping:m007'");
    assert_eq!(synced_at.trim(), "t");
    let after = xmins(&db);
    let rewritten: Vec<&String> = after
        .keys()
        .filter(|id| before[*id] != after[*id])
        .collect();
    assert_eq!(rewritten, ["mapping:m007"]);
}

#[test]
fn rows_edited_or_deleted_by_hand_in_postgres_are_repaired() {
    let (ws, db) = mirrored(&Row::numbered("m", 20));
    ws.sync(&[]);
    db.psql(
        "UPDATE public.model_mappings SET default_model = 'hand-edited', candidates = '[\"x\"]' WHERE id = 'mapping:m003';
         DELETE FROM public.model_mappings WHERE id = 'mapping:m004';
         INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('mapping:only-remote', 'mapping', 'only-remote');",
    );
    let report = ws.sync(&[]);
    assert_eq!(report["changed_count"], 2, "{report}");
    assert_eq!(report["deleted_count"], 0, "deletes are off by default");
    assert!(
        report["detail"]
            .as_str()
            .unwrap()
            .contains("1 remote rows are not in the source")
    );
    let remote = remote_rows(&db);
    assert_eq!(remote["mapping:m003"]["default_model"], "gpt-4o");
    assert_eq!(remote["mapping:m003"]["candidates"], json!(["gpt-4o"]));
    assert!(remote.contains_key("mapping:m004"));
    assert!(remote.contains_key("mapping:only-remote"));

    let report = ws.sync(&["--delete-missing"]);
    assert_eq!(report["deleted_count"], 1, "{report}");
    assert_eq!(report["remote_after"], 20);
    assert!(!remote_rows(&db).contains_key("mapping:only-remote"));
}

#[test]
fn a_mass_delete_is_refused_unless_forced() {
    let (ws, db) = mirrored(&Row::numbered("m", 30));
    ws.sync(&[]);
    for i in 0..20 {
        ws.app.delete(&format!("mapping:m{i:03}"));
    }

    // Off by default: nothing deleted.
    assert_eq!(ws.sync(&[])["deleted_count"], 0);
    assert_eq!(remote_count(&db), 30);

    // 20 of 30 is over half and over 10 rows: refused, exit 1, nothing changed.
    let before = xmins(&db);
    let run = ws.mapsync(&["sync", "--delete-missing"]);
    run.expect_code(1);
    let refused = run.json();
    assert_eq!(refused["status"], "refused:mass_delete");
    assert_eq!(refused["deleted_count"], 0);
    assert!(
        run.stderr.contains("--force") || run.stderr.contains("force=true"),
        "{run:?}"
    );
    assert_eq!(xmins(&db), before);

    // A dry run reports what would go, and changes nothing.
    let dry = ws.sync(&["--delete-missing", "--force", "--dry-run"]);
    assert_eq!(dry["deleted_count"], 20);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(remote_count(&db), 30);

    let forced = ws.sync(&["--delete-missing", "--force"]);
    assert_eq!(forced["status"], "synced");
    assert_eq!(forced["deleted_count"], 20);
    assert_eq!(remote_count(&db), 10);
}

#[test]
fn an_emptied_source_never_wipes_the_mirror_through_the_config_default() {
    let (ws, db) = mirrored(&Row::numbered("m", 15));
    ws.sync(&[]);
    ws.app.exec("DELETE FROM llm_model_mappings");
    ws.write_config(
        None,
        &format!("[target]\nurl = {:?}\ndelete_missing = true\n", db.url),
    );
    let run = ws.mapsync(&["sync"]);
    run.expect_code(1);
    assert_eq!(run.json()["status"], "refused:mass_delete");
    assert_eq!(remote_count(&db), 15);
}

#[test]
fn the_deployed_table_is_upgraded_in_place_and_then_mirrored() {
    let db = supabase_db();
    db.psql(DEPLOYED_SCHEMA);
    db.psql(
        "INSERT INTO public.model_mappings (id, scope_type, scope_key, name, default_model, candidates, updated_at, source)
         VALUES ('mapping:m000', 'mapping', 'm000', 'old', 'old-model', '[\"old-model\"]', '2025-06-01T00:00:00Z', 'sqlite'),
                ('global:global', 'global', 'global', 'Global', 'gpt-4o-mini', '[]', '2025-06-01T00:00:00Z', 'sqlite')",
    );
    let ws = Workspace::new(Some(&db.url), "");
    for r in Row::numbered("m", 5) {
        ws.app.upsert(&r);
    }

    // Before the upgrade: check and sync both say what to run.
    let check = ws.mapsync(&["check"]);
    check.expect_code(1);
    assert!(
        check.stdout.contains("FAIL table") && check.stdout.contains("synced_at is missing"),
        "{check:?}"
    );
    assert!(check.stdout.contains("mapsync migrate"), "{check:?}");
    let sync = ws.mapsync(&["sync"]);
    sync.expect_code(1);
    assert!(sync.stderr.contains("mapsync migrate"), "{sync:?}");

    // The upgrade keeps the rows and can run twice.
    for _ in 0..2 {
        let m = ws.mapsync(&["migrate"]);
        m.expect_code(0);
        assert!(
            m.stdout.contains("applied sql/001_model_mappings.sql"),
            "{m:?}"
        );
    }
    assert_eq!(remote_count(&db), 2);
    ws.mapsync(&["check"]).expect_code(0);

    let report = ws.sync(&[]);
    assert_eq!(report["remote_before"], 2);
    assert_eq!(
        report["changed_count"], 5,
        "4 inserted + 1 updated: {report}"
    );
    let remote = remote_rows(&db);
    // The fixed trigger keeps the pushed updated_at (the deployed one overwrote it with now()).
    assert_eq!(
        remote["mapping:m000"]["updated_at"],
        "2026-01-16T08:21:05.000000"
    );
    assert_eq!(remote["mapping:m000"]["default_model"], "gpt-4o");
    assert_eq!(
        remote["global:global"]["name"], "Global",
        "rows not in the source are kept"
    );
    assert_eq!(ws.sync(&[])["changed_count"], 0, "stable after the upgrade");
}

#[test]
fn row_level_security_gives_supabase_roles_what_they_should_have() {
    let (ws, db) = mirrored(&Row::numbered("m", 3));
    ws.sync(&[]);
    let as_role = |role: &str, sql: &str| run_psql(&db.url, &format!("SET ROLE {role}; {sql}"));
    assert_eq!(
        as_role(
            "authenticated",
            "SELECT count(*) FROM public.model_mappings"
        )
        .unwrap()
        .trim(),
        "3"
    );
    let e = as_role(
        "authenticated",
        "INSERT INTO public.model_mappings (id, scope_type, scope_key) VALUES ('a:b','a','b')",
    )
    .unwrap_err();
    assert!(
        e.contains("permission denied") || e.contains("row-level security"),
        "{e}"
    );
    let e = as_role("authenticated", "DELETE FROM public.model_mappings").unwrap_err();
    assert!(e.contains("permission denied"), "{e}");
    let e = as_role("anon", "SELECT count(*) FROM public.model_mappings").unwrap_err();
    assert!(e.contains("permission denied"), "{e}");
    assert_eq!(
        as_role(
            "service_role",
            "UPDATE public.model_mappings SET name = 'x' WHERE id = 'mapping:m000' RETURNING id"
        )
        .unwrap()
        .trim(),
        "mapping:m000"
    );
    // The mirror repairs what the service role changed.
    assert_eq!(ws.sync(&[])["changed_count"], 1);
}

#[test]
fn sync_works_through_pgbouncer_in_transaction_mode() {
    let cluster = PgCluster::start();
    let dbname = cluster.create_db();
    cluster.psql(&dbname, SUPABASE_ROLES_SHIM);
    let bouncer = PgBouncer::start(
        cluster.host(),
        cluster.port(),
        "postgres",
        cluster.password(),
    );
    let url = bouncer.url(&dbname);
    let ws = Workspace::new(None, "");
    ws.write_config(None, &format!("[target]\nurl = {url:?}\npool_size = 4\n"));
    for r in Row::numbered("m", 40) {
        ws.app.upsert(&r);
    }
    for _ in 0..2 {
        ws.mapsync(&["migrate"]).expect_code(0);
    }
    ws.mapsync(&["check"]).expect_code(0);
    assert_eq!(ws.sync(&[])["changed_count"], 40);
    for i in 0..5 {
        ws.app
            .upsert(&Row::mapping(&format!("m{i:03}"), &format!("model-{i}")));
        let r = ws.sync(&[]);
        assert_eq!(r["changed_count"], 1, "run {i}: {r}");
    }
    assert_eq!(ws.sync(&[])["changed_count"], 0);
    ws.app.delete("mapping:m039");
    assert_eq!(ws.sync(&["--delete-missing"])["deleted_count"], 1);
    assert_eq!(
        cluster
            .psql(&dbname, "SELECT count(*) FROM public.model_mappings")
            .trim(),
        "39"
    );
}

#[test]
fn tls_modes_connect_or_fail_clearly() {
    let ca = TestCa::new();
    let ca_cert = ca.ca_cert.clone();
    let other_ca = ca.other_ca_cert.clone();
    let cluster = PgCluster::start_with(PgOptions {
        ssl: Some(ca),
        ..Default::default()
    });
    let dbname = cluster.create_db();
    let url = |mode: &str| {
        format!(
            "postgres://postgres:{}@localhost:{}/{dbname}?sslmode={mode}",
            cluster.password(),
            cluster.port()
        )
    };
    let ws = Workspace::new(None, "");
    ws.app.upsert(&Row::mapping("tls", "gpt-4o"));
    let check_with = |mode: &str, root: Option<&std::path::Path>| {
        let extra = root.map_or(String::new(), |p| format!("ssl_root_cert = {p:?}\n"));
        ws.write_config(None, &format!("[target]\nurl = {:?}\n{extra}", url(mode)));
        ws.mapsync(&["check"])
    };

    let require = check_with("require", None);
    require.expect_code(1); // the table is not there yet; the connection is what counts here
    assert!(
        require.stdout.contains("ok   postgres") && require.stdout.contains("TLS on"),
        "{require:?}"
    );

    let full = check_with("verify-full", Some(&ca_cert));
    assert!(
        full.stdout.contains("ok   postgres") && full.stdout.contains("TLS on"),
        "{full:?}"
    );

    let ca_only = check_with("verify-ca", Some(&ca_cert));
    assert!(ca_only.stdout.contains("TLS on"), "{ca_only:?}");

    let untrusted = check_with("verify-full", None);
    untrusted.expect_code(1);
    assert!(
        untrusted.stdout.contains("FAIL postgres")
            && untrusted.stdout.contains("target.ssl_root_cert"),
        "{untrusted:?}"
    );

    let wrong_ca = check_with("verify-full", Some(&other_ca));
    assert!(wrong_ca.stdout.contains("FAIL postgres"), "{wrong_ca:?}");

    // And a real sync over verify-full.
    ws.write_config(
        None,
        &format!(
            "[target]\nurl = {:?}\nssl_root_cert = {ca_cert:?}\n",
            url("verify-full")
        ),
    );
    ws.mapsync(&["migrate"]).expect_code(0);
    assert_eq!(ws.sync(&[])["changed_count"], 1);
    for out in [&require, &full, &untrusted] {
        assert!(
            !out.all_output().contains(cluster.password()),
            "the password leaked: {out:?}"
        );
    }
}

#[test]
fn failures_exit_1_with_one_line_naming_what_and_the_fix() {
    let db = test_db();
    let ws = Workspace::new(None, "");
    ws.app.upsert(&Row::mapping("a", "gpt-4o"));
    let password = "pw-that-must-not-leak";
    // Unreachable: nothing listens on this port.
    let url = format!(
        "postgres://postgres:{password}@127.0.0.1:{}/postgres?sslmode=disable",
        free_port()
    );
    ws.write_config(Some(&url), "");
    let run = ws.mapsync(&["sync"]);
    run.expect_code(1);
    for want in [
        "cannot connect to Postgres at postgres@127.0.0.1:",
        "check that the server is up",
    ] {
        assert!(run.stderr.contains(want), "want {want:?}: {run:?}");
    }
    assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {run:?}");
    assert!(!run.all_output().contains(password));

    // Wrong password.
    let wrong = with_password(&db.url, password);
    ws.write_config(Some(&wrong), "");
    let run = ws.mapsync(&["sync"]);
    run.expect_code(1);
    assert!(
        run.stderr.contains("check the password in target.url"),
        "{run:?}"
    );
    assert!(!run.all_output().contains(password), "{run:?}");

    // Missing table.
    ws.write_config(Some(&db.url), "");
    let run = ws.mapsync(&["sync"]);
    run.expect_code(1);
    assert!(
        run.stderr
            .contains("table public.model_mappings is missing")
            && run.stderr.contains("mapsync migrate"),
        "{run:?}"
    );

    // Missing SQLite file.
    let gone = ws.path().join("nope.sqlite3");
    std::fs::write(&ws.config, format!("[source]\nsqlite_path = {gone:?}\n")).unwrap();
    let run = ws.mapsync(&["sync"]);
    run.expect_code(1);
    assert!(
        run.stderr.contains("does not exist") && run.stderr.contains("source.sqlite_path"),
        "{run:?}"
    );

    // Corrupt SQLite file.
    let corrupt = ws.path().join("corrupt.sqlite3");
    std::fs::write(&corrupt, vec![0x42u8; 8192]).unwrap();
    std::fs::write(&ws.config, format!("[source]\nsqlite_path = {corrupt:?}\n")).unwrap();
    let run = ws.mapsync(&["sync"]);
    run.expect_code(1);
    assert!(run.stderr.contains("not a readable database"), "{run:?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {run:?}");

    // A bad config is exit 78.
    std::fs::write(&ws.config, "[target]\nurl = 5\nbogus = 1\n").unwrap();
    ws.mapsync(&["sync"]).expect_code(78);
}

/// `url` with its password replaced by `password`.
fn with_password(url: &str, password: &str) -> String {
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let (scheme, user_pw) = scheme_user.split_once("://").unwrap();
    let user = user_pw.split(':').next().unwrap();
    format!("{scheme}://{user}:{password}@{rest}")
}

#[test]
fn no_target_means_skipped_and_exit_0() {
    let ws = Workspace::new(None, "");
    ws.app.upsert(&Row::mapping("a", "gpt-4o"));
    let r = ws.sync(&[]);
    assert_eq!(r["status"], "skipped:supabase_not_configured");
    assert_eq!(r["synced_count"], 0);
}

#[test]
fn reading_works_while_the_application_holds_a_write_transaction() {
    let (ws, db) = mirrored(&Row::numbered("m", 3));
    ws.app.exec("BEGIN IMMEDIATE; INSERT INTO llm_model_mappings (id, scope_type, scope_key) VALUES ('mapping:uncommitted', 'mapping', 'uncommitted');");
    let r = ws.sync(&[]);
    assert_eq!(r["synced_count"], 3, "uncommitted rows are not read: {r}");
    ws.app.exec("COMMIT");
    assert_eq!(ws.sync(&[])["synced_count"], 4);
    assert!(remote_rows(&db).contains_key("mapping:uncommitted"));
}

#[test]
fn concurrent_runs_against_one_table_take_turns() {
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    generate(&ws.db_path(), 5_000, 3, true);
    ws.mapsync(&["migrate"]).expect_code(0);
    // Two instances start a cold sync at once: without the advisory lock both would COPY the
    // same new ids and one would fail on the primary key.
    let spawn = || {
        let mut cmd = crate::harness::workspace::command();
        cmd.arg("--config").arg(&ws.config).arg("sync");
        std::thread::spawn(move || crate::harness::workspace::run(cmd))
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    a.expect_code(0);
    b.expect_code(0);
    let changed = [
        a.json()["changed_count"].as_u64(),
        b.json()["changed_count"].as_u64(),
    ];
    let mut changed: Vec<u64> = changed.into_iter().flatten().collect();
    changed.sort();
    assert_eq!(
        changed,
        [0, 5_003],
        "one run wrote everything, the other found it done"
    );
    assert_eq!(remote_count(&db), 5_003);
}

/// `sql/verify.sh` (every script in sql/: fresh install, upgrade in place, idempotency, RLS
/// and grants, the instance registry, the optional role, the rollbacks, atomicity) against a
/// cluster of its own: it creates cluster-wide roles.
#[test]
fn the_sql_scripts_pass_their_checks_on_a_real_server() {
    let cluster = PgCluster::start();
    let url = cluster.superuser_url("postgres");
    let psql_dir = crate::harness::pg::psql_path()
        .parent()
        .expect("psql's directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        psql_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/verify.sh"))
        .arg(&url)
        .env("PATH", path)
        .output()
        .expect("bash runs sql/verify.sh");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sql/verify.sh failed:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
    assert!(text.contains("ok: 004: RLS on"), "{text}");
}
