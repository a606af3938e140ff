//! Self-test of the integration-test harness in tests/it/harness: every helper the other
//! integration tests rely on is exercised here against real PostgreSQL, PgBouncer, libpq's
//! TLS checks and SQLite, and each test asserts something that breaks if the harness does.

use std::time::{Duration, Instant};

use crate::harness::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Values of the first column of a simple query's rows.
fn first_column(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .collect()
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    eprintln!(
        "[harness timing] {what}: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    v
}

#[test]
fn free_port_is_bindable() {
    let p = free_port();
    assert_ne!(p, 0);
    std::net::TcpListener::bind(("127.0.0.1", p)).expect("free_port() returned a bound port");
}

#[test]
#[should_panic(expected = "the impossible condition")]
fn wait_until_panics_naming_what() {
    wait_until(
        Duration::from_millis(50),
        "the impossible condition",
        || false,
    );
}

#[test]
fn wait_until_returns_when_condition_holds() {
    let mut n = 0;
    wait_until(Duration::from_secs(5), "three polls", || {
        n += 1;
        n >= 3
    });
    assert_eq!(n, 3);
}

#[test]
fn dedicated_cluster_lifecycle() {
    let cluster = timed("PgCluster::start", PgCluster::start);
    let dir = cluster.dir().to_path_buf();
    assert!(dir.starts_with(std::env::temp_dir()));
    assert!(
        dir.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("mapsync-test-pg-{}-", std::process::id()))
    );
    assert_eq!(cluster.host(), "127.0.0.1");

    // psql: several statements, one result per line.
    assert_eq!(
        cluster.psql("postgres", "CREATE TABLE t(x int); INSERT INTO t VALUES (1),(2); SELECT sum(x) FROM t; SELECT 'a', 'b'"),
        "3\na|b"
    );
    // psql errors surface as Err with the server's message.
    let err = run_psql(&cluster.superuser_url("postgres"), "SELECT nope").unwrap_err();
    assert!(err.contains("nope"), "{err}");
    let db = cluster.create_db();
    assert_eq!(
        cluster.psql(&db, "SELECT current_database()"),
        db,
        "create_db"
    );
    // Password auth on TCP is scram-sha-256.
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postgres'"
        ),
        "t"
    );

    let url = cluster.superuser_url("postgres");
    let wrong = url.replace(cluster.password(), "not-the-password");
    block_on(async {
        let c = connect(&url).await.expect("connect with superuser_url");
        let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(v, 1);
        let Err(e) = connect(&wrong).await else {
            panic!("wrong password must be rejected");
        };
        assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
    });

    let port = cluster.port();
    timed("PgCluster::stop", || cluster.stop());
    cluster.stop(); // idempotent
    assert!(!cluster.is_running());
    block_on(async {
        assert!(
            connect(&url).await.is_err(),
            "connected to a stopped server"
        );
    });
    timed("PgCluster::start_again", || cluster.start_again());
    assert_eq!(cluster.port(), port);
    block_on(async {
        let c = connect(&url).await.expect("connect after start_again");
        let v: i64 = c
            .query_one("SELECT sum(x) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 3, "data survives stop/start_again");
    });

    timed("PgCluster drop", || drop(cluster));
    assert!(!dir.exists(), "cluster dir {} not removed", dir.display());
    assert!(
        !sys::port_accepts(port),
        "server still listening after drop"
    );
}

#[test]
fn test_dbs_share_one_cluster_and_are_dropped() {
    let a = timed("test_db (first, starts the shared cluster)", test_db);
    let b = timed("test_db (second)", test_db);
    assert_ne!(a.name, b.name);
    assert_ne!(a.url, b.url);
    assert_eq!(a.psql("SELECT current_database()"), a.name);
    assert_eq!(b.psql("SELECT current_database()"), b.name);
    a.psql("CREATE TABLE only_in_a(x int)");
    assert_eq!(
        b.psql("SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'"),
        "0"
    );
    let admin = a.admin_url();
    let names = format!("'{}','{}'", a.name, b.name);
    let count = |admin: &str| {
        run_psql(
            admin,
            &format!("SELECT count(*) FROM pg_database WHERE datname IN ({names})"),
        )
        .unwrap()
    };
    assert_eq!(count(&admin), "2");

    match (a.cluster().cloned(), b.cluster()) {
        (Some(ca), Some(cb)) => {
            assert!(
                std::sync::Arc::ptr_eq(&ca, cb),
                "two test_db() got different clusters"
            );
            drop(a);
            drop(b);
            assert_eq!(count(&admin), "0", "dropping TestDb must drop its database");
            // Other tests of this binary share the cluster: whether this was the last
            // reference is theirs to say. A cluster of its own shows what the last drop does.
            drop(ca);
            let own = PgCluster::start();
            let dir = own.dir().to_path_buf();
            assert!(dir.exists());
            drop(own);
            assert!(!dir.exists(), "a dropped cluster's directory is removed");
        }
        _ => {
            // MAPSYNC_TEST_DATABASE_URL: an existing server.
            drop(a);
            drop(b);
            assert_eq!(count(&admin), "0", "dropping TestDb must drop its database");
        }
    }
}

#[test]
fn tls_cluster_verify_full() {
    let ca = timed("TestCa::new", TestCa::new);
    let ca_cert = ca.ca_cert.clone();
    let other = ca.other_ca_cert.clone();
    let cluster = timed("PgCluster::start_with(ssl)", || {
        PgCluster::start_with(PgOptions {
            ssl: Some(ca),
            ssl_only: true,
            ..Default::default()
        })
    });
    assert!(cluster.ca().is_some());
    let conninfo = |host: &str, mode: &str, root: &std::path::Path| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} dbname=postgres user=postgres password={} sslmode={mode} sslrootcert={}",
            cluster.port(),
            cluster.password(),
            root.display()
        )
    };
    let q = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    for host in ["localhost", "127.0.0.1"] {
        assert_eq!(
            run_psql(&conninfo(host, "verify-full", &ca_cert), q).unwrap(),
            "t",
            "verify-full to {host}"
        );
    }
    let err = run_psql(&conninfo("localhost", "verify-full", &other), q).unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
    // A name the certificate does not carry: verify-full refuses it, verify-ca checks no name.
    let err = run_psql(&conninfo("elsewhere.example", "verify-full", &ca_cert), q).unwrap_err();
    assert!(err.contains("does not match host name"), "{err}");
    assert_eq!(
        run_psql(&conninfo("elsewhere.example", "verify-ca", &ca_cert), q).unwrap(),
        "t",
        "verify-ca to a name the certificate does not carry"
    );
    let err = run_psql(&conninfo("localhost", "disable", &ca_cert), q).unwrap_err();
    assert!(
        err.contains("no encryption") || err.contains("rejects connection"),
        "ssl_only must reject plaintext: {err}"
    );
}

#[test]
fn pgbouncer_transaction_mode_moves_statements_between_servers() {
    let cluster = PgCluster::start();
    let pgb = timed("PgBouncer::start", || {
        PgBouncer::start(
            cluster.host(),
            cluster.port(),
            "postgres",
            cluster.password(),
        )
    });
    let dir = pgb.dir().to_path_buf();
    let url = pgb.url("postgres");
    block_on(async {
        let admin = connect(&pgb.admin_url()).await.expect("admin console");
        let rows = admin.simple_query("SHOW CONFIG").await.unwrap();
        let pool_mode = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get(0) == Some("pool_mode") => {
                r.get(1).map(str::to_string)
            }
            _ => None,
        });
        assert_eq!(pool_mode.as_deref(), Some("transaction"));

        let mut c1 = connect(&url).await.expect("client 1 through pgbouncer");
        let c2 = connect(&url).await.expect("client 2 through pgbouncer");
        let pid_a = first_column(&c1.simple_query("SELECT pg_backend_pid()").await.unwrap());
        assert_eq!(pid_a.len(), 1);
        // Parse runs on the only (idle) server connection A, which is then released.
        let stmt = c1.prepare("SELECT 41 + 1").await.unwrap();
        // Client 2 takes A for a whole transaction...
        let pid_c2 = first_column(
            &c2.simple_query("BEGIN; SELECT pg_backend_pid()")
                .await
                .unwrap(),
        );
        assert_eq!(
            pid_c2,
            pid_a,
            "pgbouncer should hand its idle server to client 2\n{}",
            pgb.log()
        );
        // ...so client 1's Bind goes to a second server, which never saw the Parse.
        let e = c1.query(&stmt, &[]).await.expect_err(
            "a prepared statement reused across transactions must fail in transaction mode",
        );
        assert_eq!(e.code(), Some(&SqlState::INVALID_SQL_STATEMENT_NAME), "{e}");
        c2.simple_query("COMMIT").await.unwrap();

        // Inside one transaction, prepare-and-use is fine.
        let tx = c1.transaction().await.unwrap();
        let s = tx.prepare("SELECT 41 + 1").await.unwrap();
        let v: i32 = tx.query_one(&s, &[]).await.unwrap().get(0);
        assert_eq!(v, 42);
        tx.commit().await.unwrap();
        assert_eq!(
            first_column(&c1.simple_query("SELECT 'ok'").await.unwrap()),
            ["ok"]
        );
    });
    let port = pgb.port();
    drop(pgb);
    assert!(!dir.exists(), "pgbouncer dir not removed");
    assert!(
        !sys::port_accepts(port),
        "pgbouncer still listening after drop"
    );
}

#[test]
fn appdb_wal_roundtrip() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("db.sqlite3");
    let app = AppDb::create(&path);
    let mut row = Row::mapping("xai", "grok-4");
    app.upsert(&row);
    app.upsert(&Row::mapping("gone", "gpt-4o"));
    row.default_model = Some("grok-4-fast".into());
    row.metadata_json = Some(r#"{"note": "映射名"}"#.into());
    app.upsert(&row); // replace
    app.delete("mapping:gone");
    let pid = app.insert_prompt("p", "v1", "system", r#"{"tools": []}"#);
    assert_eq!(pid, 1);

    // The application's connection commits every statement: a second connection sees it all.
    let reader =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let (model, cands, active, meta): (String, String, i64, String) = reader
        .query_row(
            "SELECT default_model, candidates_json, is_active, metadata_json FROM llm_model_mappings WHERE id = 'mapping:xai'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(model, "grok-4-fast");
    assert_eq!(cands, r#"["grok-4"]"#);
    assert_eq!(active, 1);
    assert_eq!(meta, r#"{"note": "映射名"}"#);
    let n: i64 = reader
        .query_row("SELECT count(*) FROM llm_model_mappings", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    let mode: String = reader
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = app
        .conn()
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fk, 1);
    drop(reader);

    let wal = tmp.path().join("db.sqlite3-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    let (busy, _log, _ckpt) = app.checkpoint_truncate();
    assert_eq!(busy, 0);
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        0,
        "TRUNCATE empties -wal"
    );

    // Re-open like the application after a restart.
    drop(app);
    let again = AppDb::open(&path);
    assert_eq!(again.count(), 1);
}

#[test]
fn fixture_generates_the_application_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fixture.sqlite3");
    timed("generate 1000 rows", || generate(&path, 1000, 3, true));
    let c = rusqlite::Connection::open(&path).unwrap();
    let one = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(one("SELECT count(*) FROM llm_model_mappings"), 1000);
    assert_eq!(one("SELECT count(*) FROM ai_prompts"), 3);
    assert_eq!(
        one("SELECT count(*) FROM llm_model_mappings WHERE scope_type = 'tenant'"),
        10
    );
    assert_eq!(
        one("SELECT count(*) FROM llm_model_mappings WHERE id = 'global:global'"),
        1
    );
    assert!(one("SELECT count(*) FROM llm_model_mappings WHERE scope_type = 'user'") > 100);
    assert_eq!(
        one("SELECT count(*) FROM llm_model_mappings WHERE is_active = 0"),
        77
    );
    assert_eq!(
        one("SELECT count(*) FROM llm_model_mappings WHERE id <> scope_type || ':' || scope_key"),
        0
    );
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let updated: String = c
        .query_row(
            "SELECT updated_at FROM llm_model_mappings WHERE id = 'global:global'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(updated, "2026-01-16T08:21:05+00:00");

    // Every JSON column parses; the shapes match the application's.
    let mut st = c
        .prepare("SELECT id, default_model, candidates_json, metadata_json FROM llm_model_mappings")
        .unwrap();
    let mut rows = st.query([]).unwrap();
    let mut notes = 0;
    while let Some(r) = rows.next().unwrap() {
        let id: String = r.get(0).unwrap();
        let default: String = r.get(1).unwrap();
        let cands: serde_json::Value =
            serde_json::from_str(&r.get::<_, String>(2).unwrap()).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&r.get::<_, String>(3).unwrap()).unwrap();
        let cands = cands.as_array().unwrap();
        assert!((1..=4).contains(&cands.len()), "{id}");
        assert_eq!(cands[0], default.as_str(), "{id}");
        assert!(meta["preferred_endpoint_id"].is_u64(), "{id}");
        if meta.get("note").is_some() {
            assert!(meta["note"].as_str().unwrap().starts_with("映射名 "));
            notes += 1;
        }
    }
    assert_eq!(notes, 91);
    // Python json.dumps formatting, key order as the application writes it.
    let meta0: String = c
        .query_row(
            "SELECT metadata_json FROM llm_model_mappings WHERE id = 'global:global'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        meta0.starts_with(r#"{"preferred_endpoint_id": "#),
        "{meta0}"
    );
    assert!(
        meta0.contains(r#", "required_tier": "pro", "temperature": "#),
        "{meta0}"
    );
    assert!(meta0.ends_with(r#", "note": "映射名 0"}"#), "{meta0}");
    let tools0: String = c
        .query_row(
            "SELECT tools_json FROM ai_prompts WHERE name = 'prompt-0'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        tools0,
        r#"{"tools": [{"type": "function", "function": {"name": "log_workout"}}], "__model_mapping": {"default_model": "gpt-4o-mini", "candidates": ["gpt-4o-mini", "gpt-4o", "claude-opus-4-5-20251101"], "is_active": true, "updated_at": "2026-01-16T08:21:05+00:00", "metadata": {}}}"#,
        "same bytes as gen_fixture.py"
    );
    let tools: String = c
        .query_row(
            "SELECT tools_json FROM ai_prompts WHERE name = 'prompt-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let tools: serde_json::Value = serde_json::from_str(&tools).unwrap();
    assert_eq!(tools["__model_mapping"]["default_model"], "gpt-4o");
    assert_eq!(tools["__model_mapping"]["is_active"], true);
    assert_eq!(tools["tools"][0]["function"]["name"], "log_workout");
}

#[test]
fn fixture_100k_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("big.sqlite3");
    let t = Instant::now();
    generate(&path, 100_000, 3, true);
    let took = t.elapsed();
    eprintln!(
        "[harness timing] generate 100000 rows: {:.3} s",
        took.as_secs_f64()
    );
    let c = rusqlite::Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM llm_model_mappings", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 100_000);
    // The budget is for release builds; debug builds get slack.
    let budget = if cfg!(debug_assertions) { 10.0 } else { 2.0 };
    assert!(took.as_secs_f64() < budget, "generate(100k) took {took:?}");
}

#[test]
fn url_with_db_replaces_only_the_database() {
    use crate::harness::pg::url_with_db;
    assert_eq!(
        url_with_db("postgres://u:p%2Fw@h:5432/postgres?sslmode=require", "x"),
        "postgres://u:p%2Fw@h:5432/x?sslmode=require"
    );
    assert_eq!(url_with_db("postgresql://u@h", "x"), "postgresql://u@h/x");
    assert_eq!(url_with_db("postgres://h:1/a", "b"), "postgres://h:1/b");
}
