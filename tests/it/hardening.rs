//! The admin port under attack from loopback, as an attacker on the same host or a web page
//! in the operator's browser would try it (issue 9, SPEC §3, §4, §6): bodies trickled to pin
//! memory, slow clients flooding the connection slots, cross-site POSTs and DNS rebinding,
//! literal settings, symbolic links in the snapshot directory, loose JSON, error bodies, the
//! access log. The daemon in-process, or the real `mapsync run` where memory, the environment
//! or the log are measured; real sockets, a real PostgreSQL where rows matter.
//! Every flood is bounded in count and time; nothing is asserted about timing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::daemon::Daemon;
use crate::harness::flood::{self, probe, rss_kib};
use crate::harness::http::{self, Reply};
use crate::harness::workspace::{Workspace, remote_count, supabase_db};
use crate::harness::*;
use serde_json::Value;

const PUSH_PATH: &str = "/api/v1/llm/model-groups/sync";
const COMPAT_PATH: &str = "/api/v1/llm/model-groups/sync-to-supabase";
const TOKEN: &str = "tok-hardening-SECRET-1";

fn workspace(n: usize) -> Workspace {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("m", n) {
        ws.app.upsert(&r);
    }
    ws
}

/// How a test runs the daemon: [`TestApp::spawn`] or [`Daemon::start`].
type Start<D> = fn(&Workspace, Option<&str>, &str) -> D;

/// The daemon on `n` mappings, with no credential and no target, after its first run.
fn open_daemon<D: Admin>(n: usize, start: Start<D>) -> (Workspace, D) {
    let ws = workspace(n);
    let d = start(&ws, None, "");
    d.wait_first_run();
    (ws, d)
}

/// The daemon on `n` mappings with the admin token [`TOKEN`], no target.
fn token_daemon<D: Admin>(n: usize, start: Start<D>) -> (Workspace, D) {
    let ws = workspace(n);
    let d = start(
        &ws,
        None,
        &format!("[http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n"),
    );
    (ws, d)
}

/// Asserts `r` is the envelope `{"code":status,"msg":<one line>,"data":null}`; returns msg.
#[track_caller]
fn error_msg(r: &Reply, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8"),
        "{}",
        r.text()
    );
    let v = r.json();
    assert_eq!(v["code"], status, "{v}");
    assert_eq!(v["data"], Value::Null, "{v}");
    let msg = v["msg"].as_str().expect("a msg").to_string();
    assert!(!msg.is_empty() && !msg.contains(['\n', '\r']), "{msg:?}");
    msg
}

/// A raw request head with `host` and extra header lines (each ending in \r\n).
fn raw(method: &str, path: &str, host: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn send(addr: SocketAddr, request: &[u8]) -> Reply {
    http::send_raw(addr, request).expect("an answer")
}

#[test]
fn trickled_bodies_hold_memory_in_proportion_and_livez_answers_throughout() {
    // No credential: the sync route reads bodies from anyone on loopback (same-origin).
    let (_ws, d) = open_daemon(3, Daemon::start);
    let pid = d.child.id();
    // Idle: after a few requests, so the port's own first allocations are in.
    for _ in 0..20 {
        assert_eq!(http::get(d.addr, "/livez", None).status, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(pid);

    // 200 connections declaring 60000 bytes and sending one byte per packet: half on the
    // route that reads a body, half on routes that take none.
    let limit = Duration::from_secs(14);
    let every = Duration::from_millis(10);
    let floods = [
        flood::trickle(d.addr, 100, "POST", PUSH_PATH, every, limit),
        flood::trickle(d.addr, 50, "GET", "/livez", every, limit),
        flood::trickle(d.addr, 50, "POST", "/sync", every, limit),
    ];
    let started = Instant::now();
    let mut peak = idle;
    let mut probes = 0;
    while started.elapsed() < Duration::from_secs(13) {
        let answer = probe(d.addr, Duration::from_secs(5));
        assert!(
            matches!(answer, Some((200, _))),
            "/livez did not answer while bodies trickled in ({:?} in): {answer:?}",
            started.elapsed()
        );
        probes += 1;
        if probes % 10 == 0 {
            // A real request on the body route still gets through.
            let r = http::post(d.addr, PUSH_PATH, None, br#"{"direction":"push"}"#);
            assert_eq!(r.status, 200, "{}", r.text());
        }
        peak = peak.max(rss_kib(pid));
        assert!(
            peak <= idle + 32 * 1024,
            "RSS grew from {idle} KiB to {peak} KiB after {:?} of trickled bodies",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let flood::Totals {
        connects,
        bytes: sent,
    } = flood::stop_all(floods);
    assert!(sent > 50_000, "the clients trickled only {sent} bytes");
    // The body deadline (10 s) cut the slow bodies off, and they reconnected.
    assert!(
        connects > 200,
        "{connects} connections: nothing was cut off"
    );
    assert!(probes >= 20);
    eprintln!("idle {idle} KiB, peak {peak} KiB, {sent} bytes trickled, {connects} connections");
    // The daemon is fine, and never ran a sync for a half-sent body: only the real ones ran.
    assert_eq!(d.manual_runs(), (probes / 10) as f64);
    assert_eq!(http::get(d.addr, "/livez", None).status, 200);
}

#[test]
fn five_hundred_slow_reconnecting_clients_never_keep_livez_or_a_sync_from_answering() {
    let (_ws, d) = open_daemon(3, Daemon::start);
    let limit = Duration::from_secs(25);
    let floods: Vec<_> = (0..4)
        .map(|_| flood::slow_heads(d.addr, 125, Duration::from_millis(50), limit))
        .collect();
    // Let them take every slot there is.
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let mut answered = 0;
    let mut missed = Vec::new();
    while started.elapsed() < Duration::from_secs(12) {
        match probe(d.addr, Duration::from_secs(5)) {
            Some((200, _)) => answered += 1,
            other => missed.push(format!("{:?}: {other:?}", started.elapsed())),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Syncing is not starved either.
    let r = http::post(d.addr, "/sync", None, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let connects = flood::stop_all(floods).connects;
    assert!(
        missed.is_empty(),
        "/livez went unanswered under 500 slow clients ({answered} answered):\n{}",
        missed.join("\n")
    );
    assert!(
        connects > 500,
        "the slow clients were never cut off ({connects} connections)"
    );
    assert!(answered >= 20, "{answered}");
}

/// A workspace with 40 mirrored rows, 30 of them since deleted from the source: a forced
/// delete would show in Postgres at once.
fn forty_rows_thirty_deleted() -> (TestDb, Workspace, TestApp) {
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    for r in Row::numbered("m", 40) {
        ws.app.upsert(&r);
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    let d = TestApp::spawn(
        &ws,
        Some(&db.url),
        "[schedule]\nreconcile = \"0 0 0 1 1 *\"\n\n[watch]\ndebounce_ms = 600000\nmax_delay_ms = 600000\n\n\
         [http]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"app.example.com\"]\n",
    );
    let first = d.wait_first_run();
    assert_eq!(first["last_run"]["status"], "synced", "{first}");
    assert_eq!(remote_count(&db), 40);
    for i in 0..30 {
        ws.app.delete(&format!("mapping:m{i:03}"));
    }
    (db, ws, d)
}

#[test]
fn a_cross_site_post_is_refused_and_starts_nothing() {
    let (db, _ws, d) = forty_rows_thirty_deleted();
    let host = d.addr.to_string();
    let before = d.manual_runs();
    let attacks = [
        // The issue's curl: a "simple" cross-site request, no preflight in a browser.
        raw(
            "POST",
            "/sync?delete_missing=true&force=true",
            &host,
            "Origin: https://evil.example\r\nContent-Type: text/plain\r\n",
            "x",
        ),
        raw(
            "POST",
            &format!("{COMPAT_PATH}?delete_missing=true&force=true"),
            &host,
            "Origin: null\r\n",
            "",
        ),
        raw(
            "POST",
            PUSH_PATH,
            &host,
            "Origin: null\r\nContent-Type: text/plain\r\n",
            r#"{"direction":"push","delete_missing":true,"force":true}"#,
        ),
        raw(
            "POST",
            PUSH_PATH,
            &host,
            "Origin: http://127.0.0.1.evil.example\r\nContent-Type: application/json\r\n",
            r#"{"direction":"push","delete_missing":true,"force":true}"#,
        ),
        raw(
            "POST",
            "/snapshots",
            &host,
            "Origin: https://evil.example\r\n",
            "",
        ),
    ];
    for attack in &attacks {
        let r = send(d.addr, attack);
        let msg = error_msg(&r, 403);
        assert!(msg.contains("origin"), "{msg}");
    }
    assert_eq!(d.manual_runs(), before, "a refused request started a run");
    assert_eq!(remote_count(&db), 40, "a refused request changed Postgres");

    // The admin page's own origin may (it is the request's Host).
    let own = format!("http://{host}");
    let r = send(
        d.addr,
        &raw("POST", "/sync", &host, &format!("Origin: {own}\r\n"), ""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.manual_runs(), before + 1.0);
    assert_eq!(remote_count(&db), 40, "delete propagation is off");
}

#[test]
fn an_unknown_host_is_refused_so_rebinding_reads_nothing() {
    let (db, _ws, d) = forty_rows_thirty_deleted();
    let before = d.manual_runs();
    let port = d.addr.port();
    for host in [
        format!("evil.example:{port}"),
        "evil.example".into(),
        format!("127.0.0.2:{port}"),
        "app.example.com.evil.example".into(),
        String::new(),
    ] {
        for (method, path) in [
            ("GET", "/export"),
            ("GET", "/status"),
            ("GET", "/snapshots"),
            ("POST", "/sync?delete_missing=true&force=true"),
            ("POST", COMPAT_PATH),
        ] {
            let r = send(d.addr, &raw(method, path, &host, "", ""));
            error_msg(&r, 421);
            assert!(!r.text().contains("mapping:m0"), "{host} read {path}");
        }
    }
    assert_eq!(d.manual_runs(), before, "a refused request started a run");
    assert_eq!(remote_count(&db), 40, "a refused request changed Postgres");
    // The listen address, localhost on any port, and http.allowed_hosts are served.
    for host in [
        d.addr.to_string(),
        "localhost".into(),
        format!("localhost:{port}"),
        "LOCALHOST:8080".into(),
        "app.example.com".into(),
        "app.example.com:8443".into(),
    ] {
        let r = send(d.addr, &raw("GET", "/status", &host, "", ""));
        assert_eq!(r.status, 200, "Host: {host}: {}", r.text());
    }
}

#[test]
fn settings_from_the_environment_are_literal() {
    let ws = workspace(2);
    ws.write_config(None, "[http]\nlisten = \"127.0.0.1:0\"\n");
    for (token, wrong) in [
        ("000123", "123"),
        ("1e3", "1000"),
        ("TRUE", "true"),
        ("12345678901234567890123", "12345678901234567000000"),
    ] {
        let d = Daemon::spawn(&ws, Some(token.into()), |cmd| {
            cmd.env("MAPSYNC_HTTP__ADMIN_TOKEN", token);
        });
        assert_eq!(
            http::get(d.addr, "/status", Some(token)).status,
            200,
            "{token}"
        );
        let r = http::get(d.addr, "/status", Some(wrong));
        assert_eq!(r.status, 401, "{token} was read as {wrong}");
    }
    // A boolean is true or false, never a number: in the environment and in the file.
    let mut cmd = crate::harness::workspace::command();
    cmd.arg("--config")
        .arg(&ws.config)
        .arg("check")
        .env("MAPSYNC_TARGET__DELETE_MISSING", "1");
    let run = crate::harness::workspace::run(cmd);
    run.expect_code(78);
    assert!(
        run.stderr.contains("MAPSYNC_TARGET__DELETE_MISSING"),
        "{run:#?}"
    );
    ws.write_config(None, "[target]\ndelete_missing = 3\n");
    let run = ws.mapsync(&["check"]);
    run.expect_code(78);
    assert!(run.stderr.contains("target.delete_missing"), "{run:#?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:#?}");
}

#[test]
fn symbolic_links_in_the_snapshot_directory_are_never_followed() {
    let (ws, d) = token_daemon(3, TestApp::spawn);
    d.wait_status(Duration::from_secs(30), "a snapshot", |s| {
        !s["snapshot"]["newest"].is_null()
    });
    let dir = ws.snapshot_dir();
    let secret = ws.path().join("secret.txt");
    std::fs::write(&secret, "SECRET-OUTSIDE-THE-DIRECTORY").unwrap();
    let environ = "model-mappings-20990101T000000000000Z.json";
    let passwd = "model-mappings-20990101T000000000001Z.json";
    let outside = "model-mappings-20990101T000000000002Z.json";
    std::os::unix::fs::symlink("/proc/self/environ", dir.join(environ)).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join(passwd)).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join(outside)).unwrap();
    let latest = dir.join("model-mappings-latest.json");
    std::fs::remove_file(&latest).unwrap();
    std::os::unix::fs::symlink(&secret, &latest).unwrap();

    for name in [environ, passwd, outside, "model-mappings-latest.json"] {
        let r = d.get(&format!("/snapshots/{name}"));
        error_msg(&r, 404);
        assert!(
            !r.text().contains("SECRET") && !r.text().contains("root:"),
            "{name}"
        );
    }
    let list = d.get("/snapshots");
    assert_eq!(list.status, 200);
    let text = list.text();
    for name in [environ, passwd, outside, "model-mappings-latest.json"] {
        assert!(!text.contains(name), "{name} is listed: {text}");
    }
    assert!(
        text.contains("model-mappings-20"),
        "the real snapshot is listed: {text}"
    );
    // /status's newest snapshot is a real one, not a link named later.
    let newest = d.status()["snapshot"]["newest"]["name"].clone();
    assert!(!newest.to_string().contains("2099"), "{newest}");
    // Retention never deletes through a link, nor the link.
    ws.app.upsert(&Row::mapping("new-one", "gpt-4o"));
    let r = d.post("/snapshots", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    for name in [environ, passwd, outside] {
        assert!(
            dir.join(name).symlink_metadata().is_ok(),
            "{name} was removed"
        );
    }
    assert!(secret.exists() && std::path::Path::new("/etc/passwd").exists());
}

#[test]
fn json_fields_of_the_wrong_type_are_named_and_start_nothing() {
    let (_ws, d) = open_daemon(2, TestApp::spawn);
    let before = d.manual_runs();
    for (body, field) in [
        (r#"{"direction":1}"#, "direction"),
        (r#"{"direction":["push"]}"#, "direction"),
        (r#"{"direction":null}"#, "direction"),
        (r#"{"direction":"sideways"}"#, "direction"),
        (r#"{"direction":"push","force":"yes"}"#, "force"),
        (
            r#"{"direction":"push","delete_missing":1}"#,
            "delete_missing",
        ),
        (r#"{"direction":"push","overwrite":"no"}"#, "overwrite"),
    ] {
        let r = http::post(d.addr, PUSH_PATH, None, body.as_bytes());
        let msg = error_msg(&r, 400);
        assert!(msg.contains(field), "{body}: {msg}");
    }
    assert_eq!(d.manual_runs(), before);
    let r = http::post(
        d.addr,
        PUSH_PATH,
        None,
        br#"{"direction":"push","overwrite":false,"delete_missing":false,"force":false}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn error_bodies_are_one_short_line_and_heads_hyper_refuses_get_the_envelope() {
    let (_ws, d) = open_daemon(2, TestApp::spawn);
    let host = d.addr.to_string();

    let r = http::post(d.addr, "/sync?delete_missing=%0Ainjected%0Aline", None, b"");
    let msg = error_msg(&r, 400);
    assert!(msg.contains("delete_missing"), "{msg}");

    let long = format!("/{}", "a".repeat(7000));
    let r = http::get(d.addr, &long, None);
    let msg = error_msg(&r, 404);
    assert!(msg.len() < 300, "a 404 echoed {} bytes", msg.len());

    // What hyper would answer with an empty body.
    let huge = format!("/{}", "b".repeat(60_000));
    let r = send(d.addr, &raw("GET", &huge, &host, "", ""));
    let msg = error_msg(&r, 414);
    assert!(msg.len() < 300, "{}", msg.len());
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    error_msg(&send(d.addr, &raw("GET", "/livez", &host, &many, "")), 431);
    let big = format!("X-Big: {}\r\n", "c".repeat(20_000));
    error_msg(&send(d.addr, &raw("GET", "/livez", &host, &big, "")), 431);
    error_msg(
        &send(d.addr, b"GET /livez HTTP/1.1\r\nBad Header\r\n\r\n"),
        400,
    );
    error_msg(
        &send(
            d.addr,
            &raw("POST", PUSH_PATH, &host, "Content-Length: 5x\r\n", ""),
        ),
        400,
    );
    error_msg(
        &send(
            d.addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ),
        400,
    );

    // X-Request-Id: echoed when sane, replaced when not.
    let r = http::request(
        d.addr,
        "GET",
        "/livez",
        &[("X-Request-Id", "req-42.a_b")],
        b"",
    );
    assert_eq!(r.header("x-request-id"), Some("req-42.a_b"));
    let long_id = "i".repeat(200);
    let r = http::request(d.addr, "GET", "/livez", &[("X-Request-Id", &long_id)], b"");
    let id = r.header("x-request-id").expect("an id").to_string();
    assert!(!id.is_empty() && id.len() <= 128 && id != long_id, "{id}");
    let r = http::get(d.addr, "/nope", None);
    assert!(r.header("x-request-id").is_some_and(|i| !i.is_empty()));
    let many = format!("X-Request-Id: refused-1\r\n{many}");
    let r = send(d.addr, &raw("GET", "/livez", &host, &many, ""));
    assert_eq!(r.header("x-request-id"), Some("refused-1"));
    assert_eq!(http::get(d.addr, "/livez", None).status, 200);
}

#[test]
fn every_request_is_logged_once_with_who_asked_and_never_a_credential() {
    let (_ws, d) = token_daemon(2, Daemon::start);
    d.wait_first_run();
    let authz = format!("Bearer {TOKEN}");
    let r = http::request(
        d.addr,
        "POST",
        "/sync",
        &[("Authorization", &authz), ("X-Request-Id", "audit-ok-1")],
        b"",
    );
    assert_eq!(r.status, 200);
    let r = http::request(
        d.addr,
        "POST",
        "/sync",
        &[
            ("Authorization", "Bearer not-the-token"),
            ("X-Request-Id", "audit-no-2"),
        ],
        b"",
    );
    assert_eq!(r.status, 401);
    let r = http::request(
        d.addr,
        "GET",
        "/livez",
        &[("X-Request-Id", "audit-get-3")],
        b"",
    );
    assert_eq!(r.status, 200);
    let line = |id: &str| -> String {
        let mut found = String::new();
        d.wait(
            Duration::from_secs(10),
            &format!("the log line of {id}"),
            || {
                let log = d.log();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
                found = lines.join("\n");
                lines.len() == 1
            },
        );
        found
    };
    let ok = line("audit-ok-1");
    for part in [
        "POST",
        "/sync",
        "200",
        "admin token",
        "127.0.0.1:",
        "duration_ms",
    ] {
        assert!(ok.contains(part), "{part} missing: {ok}");
    }
    let no = line("audit-no-2");
    assert!(no.contains("401") && no.contains("refused"), "{no}");
    let get = line("audit-get-3");
    assert!(get.contains("/livez") && get.contains("200"), "{get}");
    let log = d.log();
    assert!(
        !log.contains(TOKEN) && !log.contains("not-the-token"),
        "a credential was logged"
    );
}
