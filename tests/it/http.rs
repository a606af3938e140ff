//! The admin HTTP port (SPEC §4), black-box: the daemon in-process (the real `mapsync run`
//! where start-up, the log or the environment are checked), real sockets, and a real
//! PostgreSQL where a target is needed. What is asserted is what the
//! mapping page, a probe, a scraper or an operator would notice.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::harness::daemon::Daemon;
use crate::harness::http::{self, Reply};
use crate::harness::sys::poll_until;
use crate::harness::workspace::{
    MAPPING_FIELDS, SYNC_FIELDS, Workspace, command, remote_count, supabase_db,
};
use crate::harness::*;
use serde_json::{Value, json};

const TOKEN: &str = "tok-7f3a9c-admin-SECRET";
const ORIGIN: &str = "https://admin.example.com";
const JSON_TYPE: &str = "application/json; charset=utf-8";
const METRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const SYNC_PATH: &str = "/api/v1/llm/model-groups/sync-to-supabase";
const PUSH_PATH: &str = "/api/v1/llm/model-groups/sync";
/// Every metric name of SPEC §5, as its samples start (counters end in `_total`).
const METRIC_NAMES: [&str; 24] = [
    "mapsync_sync_runs_total{",
    "mapsync_sync_duration_seconds_bucket{",
    "mapsync_rows_upserted_total ",
    "mapsync_rows_deleted_total ",
    "mapsync_source_rows ",
    "mapsync_source_rows_skipped_total ",
    "mapsync_pending_changes ",
    "mapsync_last_success_timestamp_seconds ",
    "mapsync_sync_lag_seconds ",
    "mapsync_target_up ",
    "mapsync_fs_events_total ",
    "mapsync_snapshot_writes_total{",
    "mapsync_snapshot_bytes ",
    "mapsync_http_requests_total{",
    "mapsync_build_info{version=",
    "mapsync_sync_failures_total{reason=",
    "mapsync_target_rows ",
    "mapsync_snapshot_age_seconds ",
    "process_cpu_seconds_total ",
    "process_resident_memory_bytes ",
    "process_virtual_memory_bytes ",
    "process_open_fds ",
    "process_max_fds ",
    "process_start_time_seconds ",
];

/// Metrics that exist only when a target is configured.
const TARGET_ONLY: [&str; 2] = ["mapsync_target_up ", "mapsync_target_rows "];

fn workspace(rows: &[Row]) -> Workspace {
    let ws = Workspace::new(None, "");
    for r in rows {
        ws.app.upsert(r);
    }
    ws
}

/// `[http]` with the admin token (and `extra` lines) on 127.0.0.1:0.
fn http_section(extra: &str) -> String {
    format!("[http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n{extra}\n")
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// `method path` with the admin token and extra headers.
fn authed(
    d: &impl Admin,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let auth = bearer();
    let mut all = vec![("Authorization", auth.as_str())];
    all.extend_from_slice(headers);
    if !body.is_empty() {
        all.push(("Content-Type", "application/json"));
    }
    http::request(d.addr(), method, path, &all, body)
}

/// Asserts `r` is a JSON envelope `{"code","msg","data"}` (keys in wire order) with HTTP
/// `status` and the same `code`; returns it.
#[track_caller]
fn envelope(r: &Reply, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some(JSON_TYPE), "{}", r.text());
    let v = r.json();
    let keys: Vec<&String> = v.as_object().expect("an object").keys().collect();
    assert_eq!(
        keys,
        ["code", "msg", "data"],
        "the envelope, in wire order: {v}"
    );
    assert_eq!(v["code"], status, "{v}");
    v
}

/// Asserts `r` is exactly `{"code":200,"msg":"ok","data":…}` with HTTP 200; returns `data`.
#[track_caller]
fn ok_data(r: &Reply) -> Value {
    let v = envelope(r, 200);
    assert_eq!(v["msg"], "ok", "{v}");
    v["data"].clone()
}

/// Asserts `r` is the error envelope `{"code":<status>,"msg":"<one line>","data":null}` with
/// HTTP `status`; returns `msg`.
#[track_caller]
fn error_msg(r: &Reply, status: u16) -> String {
    let v = envelope(r, status);
    assert_eq!(v["data"], Value::Null, "{v}");
    let msg = v["msg"].as_str().expect("msg is a string").to_string();
    assert!(!msg.trim().is_empty(), "an empty msg: {v}");
    assert!(
        !msg.contains('\n') && !msg.contains('\r'),
        "msg is one line: {msg:?}"
    );
    msg
}

/// Asserts `r` is a refused run: HTTP 409, `{"code":409,"msg":"<what; how to force it>",
/// "data":<the result>}`; returns `data`.
#[track_caller]
fn refused_data(r: &Reply) -> Value {
    let v = envelope(r, 409);
    let msg = v["msg"].as_str().expect("a msg");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(
        msg.contains("would delete 20 of 30") && msg.contains("force"),
        "says what and how to force it: {msg}"
    );
    v["data"].clone()
}

/// Asserts a sync result has the eight SPEC fields (and nothing but the optional `detail`).
#[track_caller]
fn assert_sync_result(data: &Value) {
    let obj = data
        .as_object()
        .unwrap_or_else(|| panic!("not a result: {data}"));
    for key in SYNC_FIELDS {
        assert!(obj.contains_key(key), "the result lacks {key}: {data}");
    }
    for key in obj.keys() {
        assert!(
            SYNC_FIELDS.contains(&key.as_str()) || key == "detail",
            "unexpected field {key} in {data}"
        );
    }
    assert!(data["status"].is_string(), "{data}");
    for key in &SYNC_FIELDS[1..7] {
        assert!(data[key].is_u64(), "{key} is a count: {data}");
    }
}

/// The sum of every sample of `/metrics` whose line starts with `prefix`.
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `/readyz` answers `status`; returns its body.
#[track_caller]
fn wait_readyz(d: &impl Admin, status: u16) -> Value {
    let mut last = None;
    if poll_until(Duration::from_secs(20), || {
        let r = http::get(d.addr(), "/readyz", None);
        let hit = r.status == status;
        last = Some(r);
        hit
    }) {
        return last.unwrap().json();
    }
    let r = last.unwrap();
    panic!(
        "/readyz never answered {status}; last: {} {}\nlog:\n{}",
        r.status,
        r.text(),
        d.log()
    );
}

/// Waits until a timestamped snapshot is on disk (the start-up run's).
fn wait_snapshot(d: &impl Admin) -> Value {
    d.wait_status(Duration::from_secs(30), "a snapshot", |s| {
        !s["snapshot"]["newest"].is_null()
    })
}

/// A timestamped snapshot name: `model-mappings-YYYYMMDDTHHMMSSffffffZ.json`.
fn is_snapshot_name(name: &str) -> bool {
    let Some(stamp) = name
        .strip_prefix("model-mappings-")
        .and_then(|s| s.strip_suffix("Z.json"))
    else {
        return false;
    };
    stamp.len() == 21
        && stamp.as_bytes()[8] == b'T'
        && stamp
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 8 || b.is_ascii_digit())
}

#[test]
fn probes_metrics_status_and_the_page_answer_without_a_target() {
    let ws = workspace(&Row::numbered("m", 3));
    let d = TestApp::spawn(&ws, None, "");
    let status = d.wait_first_run();

    for path in ["/livez", "/healthz"] {
        let r = http::get(d.addr, path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some(JSON_TYPE));
        assert_eq!(r.json(), json!({"status": "ok"}), "{path}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }

    let ready = wait_readyz(&d, 200);
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["checks"]["sqlite"]["ok"], true, "{ready}");
    assert_eq!(ready["checks"]["lag"]["ok"], true, "{ready}");
    assert!(
        ready["checks"].get("target").is_none(),
        "no target, no target check: {ready}"
    );

    // mapsync_snapshot_age_seconds exists once a snapshot does.
    wait_snapshot(&d);
    let m = http::get(d.addr, "/metrics", None);
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type"), Some(METRICS_TYPE));
    let text = m.text();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    for name in METRIC_NAMES {
        if TARGET_ONLY.contains(&name) {
            assert!(!text.contains(name), "{name} without a target:\n{text}");
            continue;
        }
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "/metrics lacks {name}:\n{text}"
        );
    }
    assert_eq!(metric_sum(&text, "mapsync_source_rows "), 3.0, "{text}");
    assert_eq!(
        metric_sum(
            &text,
            "mapsync_sync_runs_total{trigger=\"startup\",result=\"skipped\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "mapsync_http_requests_total{route=\"/livez\",code=\"200\"}"
        ),
        1.0,
        "{text}"
    );

    // /status: the envelope and the fields of SPEC §4.
    let r = d.get("/status");
    let s = ok_data(&r);
    assert_eq!(s["last_run"], status["last_run"], "{s}");
    for key in [
        "version",
        "started_at",
        "state",
        "source",
        "target",
        "last_run",
        "pending_changes",
        "snapshot",
    ] {
        assert!(s.get(key).is_some(), "/status lacks {key}: {s}");
    }
    assert_eq!(s["source"]["rows"], 3, "{s}");
    assert!(
        s["source"]["path"]
            .as_str()
            .unwrap()
            .ends_with("db.sqlite3"),
        "{s}"
    );
    assert_eq!(s["target"]["configured"], false, "{s}");
    assert_eq!(s["target"]["name"], Value::Null, "{s}");
    let run = &s["last_run"];
    assert_eq!(run["trigger"], "startup", "{s}");
    assert_eq!(run["status"], "skipped:supabase_not_configured", "{s}");
    for key in [
        "started_at",
        "duration_ms",
        "synced_count",
        "changed_count",
        "deleted_count",
        "error",
    ] {
        assert!(run.get(key).is_some(), "last_run lacks {key}: {s}");
    }
    assert!(s["pending_changes"].is_u64(), "{s}");

    // The admin page.
    let page = http::get(d.addr, "/", None);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page
        .header("content-security-policy")
        .expect("the page has a CSP");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        page.text().to_lowercase().starts_with("<!doctype html>"),
        "{}",
        page.text()
    );
}

#[test]
fn without_a_target_every_sync_route_answers_skipped_never_5xx() {
    let ws = workspace(&Row::numbered("m", 5));
    let d = TestApp::spawn(&ws, None, "");
    d.wait_first_run();

    for path in [
        SYNC_PATH,
        "/sync",
        "/sync?delete_missing=true&force=true",
        "/sync?delete_missing=false",
    ] {
        let r = d.post(path, b"");
        let data = ok_data(&r);
        assert_sync_result(&data);
        assert_eq!(data["status"], "skipped:supabase_not_configured", "{path}");
        assert_eq!(data["trigger"], "manual", "{path}");
        for key in ["synced_count", "changed_count", "deleted_count"] {
            assert_eq!(data[key], 0, "{path}: {data}");
        }
    }
    // The exact answer the mapping page reads.
    let r = d.post(SYNC_PATH, b"");
    let v = r.json();
    assert_eq!(
        v,
        json!({"code": 200, "msg": "ok", "data": {
            "status": "skipped:supabase_not_configured", "synced_count": 0, "changed_count": 0,
            "deleted_count": 0, "remote_before": 0, "remote_after": 0,
            "duration_ms": v["data"]["duration_ms"], "trigger": "manual"}})
    );

    let r = d.post(PUSH_PATH, br#"{"direction":"push","delete_missing":false}"#);
    let data = ok_data(&r);
    assert_sync_result(&data["push"]);
    assert_eq!(data["push"]["status"], "skipped:supabase_not_configured");
    // An empty body means push.
    let data = ok_data(&d.post(PUSH_PATH, b""));
    assert_eq!(data["push"]["status"], "skipped:supabase_not_configured");

    for direction in ["pull", "both"] {
        let body = format!(r#"{{"direction":"{direction}","overwrite":true}}"#);
        let msg = error_msg(&d.post(PUSH_PATH, body.as_bytes()), 400);
        assert!(
            msg.contains("one way") && msg.contains("application"),
            "says mapsync only pushes and pulling is the application's: {msg}"
        );
    }
}

#[test]
fn readyz_names_a_missing_sqlite_file() {
    let ws = workspace(&Row::numbered("m", 2));
    let d = TestApp::spawn(&ws, None, "");
    d.wait_first_run();
    wait_readyz(&d, 200);

    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", ws.db_path().display());
        let _ = std::fs::remove_file(p);
    }
    let body = wait_readyz(&d, 503);
    assert_eq!(body["status"], "not_ready", "{body}");
    let sqlite = &body["checks"]["sqlite"];
    assert_eq!(sqlite["ok"], false, "{body}");
    let error = sqlite["error"]
        .as_str()
        .expect("the failing check says why");
    assert!(error.contains("db.sqlite3"), "names the file: {error}");
    let s = d.status();
    assert!(!s["source"]["error"].is_null(), "/status says why: {s}");
    // Liveness checks no dependency.
    assert_eq!(http::get(d.addr, "/livez", None).status, 200);
}

#[test]
fn export_and_the_mappings_list_answer_503_until_the_file_has_been_read() {
    let ws = workspace(&Row::numbered("m", 2));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ws.db_path().display()));
    }
    let d = TestApp::spawn(&ws, None, "");
    d.wait_first_run();
    // Nothing read yet: an empty document would pass for a backup of nothing.
    for path in ["/export", "/mappings"] {
        let r = http::get(d.addr, path, None);
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        let msg = r.json()["msg"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains("read yet"), "{path}: {msg}");
    }
    let app = AppDb::create(&ws.db_path());
    for r in Row::numbered("back", 3) {
        app.upsert(&r);
    }
    d.wait(
        Duration::from_secs(15),
        "the export once the file is read",
        || {
            let r = http::get(d.addr, "/export", None);
            r.status == 200 && r.json()["count"] == 3
        },
    );
    assert_eq!(
        http::get(d.addr, "/mappings", None).json()["data"]["total"],
        3
    );
}

#[test]
fn an_unreachable_target_is_not_ready_and_a_sync_answers_503_with_the_fix() {
    let password = "pw-unreachable-SECRET";
    let port = free_port();
    let url = format!("postgres://mapsync:{password}@127.0.0.1:{port}/postgres");
    let ws = workspace(&Row::numbered("m", 3));
    let d = Daemon::start(&ws, Some(&url), &http_section(""));
    let mut bodies = String::new();

    let status = d.wait_first_run();
    assert_eq!(status["last_run"]["status"], "error", "{status}");
    let body = wait_readyz(&d, 503);
    bodies.push_str(&body.to_string());
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(body["checks"]["target"]["ok"], false, "{body}");
    assert_eq!(body["checks"]["sqlite"]["ok"], true, "{body}");
    let error = body["checks"]["target"]["error"].as_str().unwrap();
    assert!(error.contains("target.url"), "{error}");

    for path in [SYNC_PATH, "/sync"] {
        let r = d.post(path, b"");
        bodies.push_str(&r.text());
        let msg = error_msg(&r, 503);
        assert!(msg.contains("127.0.0.1"), "names what failed: {msg}");
        assert!(msg.contains("target.url"), "names the fix: {msg}");
    }
    let r = d.post(PUSH_PATH, br#"{"direction":"push","delete_missing":false}"#);
    bodies.push_str(&r.text());
    error_msg(&r, 503);

    let s = d.get("/status");
    bodies.push_str(&s.text());
    let s = ok_data(&s);
    assert_eq!(s["target"]["configured"], true);
    assert_eq!(
        s["target"]["name"],
        format!("mapsync@127.0.0.1:{port}/postgres")
    );
    assert_eq!(s["target"]["up"], false, "{s}");
    let m = http::get(d.addr, "/metrics", None);
    bodies.push_str(&m.text());
    assert!(m.text().contains("mapsync_target_up 0"), "{}", m.text());

    assert!(!bodies.contains(password), "the password leaked: {bodies}");
    assert!(!d.log().contains(password), "the password is in the log");
}

#[test]
fn a_wrong_password_or_a_missing_table_answers_503_with_the_fix() {
    let db = test_db();
    // A wrong password: the message says where to fix it, and never echoes it.
    let wrong = "wrong-pw-SECRET";
    let (head, tail) = db.url.split_once('@').unwrap();
    let user = head.rsplit_once(':').unwrap().0;
    let bad_url = format!("{user}:{wrong}@{tail}");
    let ws = workspace(&Row::numbered("m", 2));
    let d = TestApp::spawn(&ws, Some(&bad_url), "");
    d.wait_first_run();
    let r = d.post(SYNC_PATH, b"");
    let msg = error_msg(&r, 503);
    assert!(msg.contains("check the password in target.url"), "{msg}");
    assert!(!r.text().contains(wrong));
    drop(d);

    // The right password, but `mapsync migrate` never ran.
    let ws = workspace(&Row::numbered("m", 2));
    let d = TestApp::spawn(&ws, Some(&db.url), "");
    d.wait_first_run();
    let msg = error_msg(&d.post(SYNC_PATH, b""), 503);
    assert!(msg.contains("mapsync migrate"), "names the fix: {msg}");
    let body = wait_readyz(&d, 503);
    assert_eq!(body["checks"]["target"]["ok"], false, "{body}");
    assert!(
        body["checks"]["target"]["error"]
            .as_str()
            .unwrap()
            .contains("migrate"),
        "{body}"
    );
}

#[test]
fn sync_routes_mirror_into_postgres_and_guard_mass_deletes() {
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    for r in Row::numbered("m", 30) {
        ws.app.upsert(&r);
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    // No scheduled reconcile during the test: the counts below are the manual runs' own.
    let d = TestApp::spawn(
        &ws,
        Some(&db.url),
        "[schedule]\nreconcile = \"0 0 0 1 1 *\"\n",
    );
    let first = d.wait_first_run();
    assert_eq!(first["last_run"]["status"], "synced", "{first}");
    assert_eq!(remote_count(&db), 30);

    let ready = wait_readyz(&d, 200);
    for check in ["sqlite", "target", "lag"] {
        assert_eq!(ready["checks"][check]["ok"], true, "{ready}");
    }

    // The mapping page's button: exactly the envelope with the eight fields.
    let r = d.post(SYNC_PATH, b"");
    let data = ok_data(&r);
    assert_sync_result(&data);
    assert_eq!(data["status"], "synced");
    assert_eq!(data["trigger"], "manual");
    assert_eq!(data["synced_count"], 30);
    assert_eq!(data["changed_count"], 0, "nothing changed since start-up");
    assert_eq!(data["remote_before"], 30);
    assert_eq!(data["remote_after"], 30);

    // A row repaired by a manual sync.
    db.psql("UPDATE public.model_mappings SET default_model = 'hand' WHERE id = 'mapping:m004'");
    let data = ok_data(&d.post("/sync", b""));
    assert_sync_result(&data);
    assert_eq!(data["changed_count"], 1, "{data}");

    let data = ok_data(&d.post(PUSH_PATH, br#"{"direction":"push","delete_missing":false}"#));
    let push = &data["push"];
    assert_sync_result(push);
    assert_eq!(push["status"], "synced");
    assert_eq!(push["synced_count"], 30);
    let msg = error_msg(&d.post(PUSH_PATH, br#"{"direction":"pull"}"#), 400);
    assert!(msg.contains("one way"), "{msg}");

    let s = d.status();
    let name = s["target"]["name"].as_str().unwrap();
    assert!(name.contains("@127.0.0.1:"), "user@host:port/db: {name}");
    assert_eq!(s["target"]["configured"], true);
    assert_eq!(s["last_run"]["trigger"], "manual", "{s}");
    let password = db
        .url
        .split_once('@')
        .unwrap()
        .0
        .rsplit(':')
        .next()
        .unwrap();
    assert!(!s.to_string().contains(password));

    // Two thirds of the source gone: a delete is refused, then forced.
    for i in 0..20 {
        ws.app.delete(&format!("mapping:m{i:03}"));
    }
    // A refusal is not a success: 409, a msg saying what and how to force it, the result.
    let r = d.post("/sync?delete_missing=true", b"");
    let data = refused_data(&r);
    assert_sync_result(&data);
    assert_eq!(data["status"], "refused:mass_delete", "{data}");
    assert_eq!(data["deleted_count"], 0, "{data}");
    let r = d.post(SYNC_PATH, b"");
    assert_eq!(
        r.status,
        200,
        "delete propagation is off by default: {}",
        r.text()
    );
    let r = d.post(
        PUSH_PATH,
        br#"{"direction":"push","overwrite":false,"delete_missing":true}"#,
    );
    let data = refused_data(&r);
    assert_sync_result(&data["push"]);
    assert_eq!(data["push"]["status"], "refused:mass_delete", "{data}");
    let r = d.post(&format!("{SYNC_PATH}?delete_missing=true"), b"");
    assert_eq!(refused_data(&r)["status"], "refused:mass_delete");
    assert_eq!(remote_count(&db), 30, "a refused run changes nothing");

    let data = ok_data(&d.post("/sync?delete_missing=true&force=true", b""));
    assert_eq!(data["status"], "synced", "{data}");
    assert_eq!(data["deleted_count"], 20, "{data}");
    assert_eq!(data["remote_after"], 10, "{data}");
    assert_eq!(remote_count(&db), 10);

    let m = http::get(d.addr, "/metrics", None).text();
    assert!(m.contains("mapsync_target_up 1"), "{m}");
    assert_eq!(
        metric_sum(
            &m,
            "mapsync_sync_runs_total{trigger=\"manual\",result=\"refused\"}"
        ),
        3.0,
        "{m}"
    );
    assert_eq!(metric_sum(&m, "mapsync_rows_deleted_total "), 20.0, "{m}");
}

#[test]
fn export_snapshots_and_the_mappings_list() {
    let mut all = Row::numbered("m", 30);
    all[3].metadata_json = Some(r#"{"apiKey": "sk-live-EXPORT-SECRET", "note": "kept"}"#.into());
    all[7].default_model = Some("claude-sonnet-4-5".into());
    all[9].name = Some("Coach Prompt Mapping".into());
    let ws = workspace(&all);
    ws.app.insert_prompt(
        "coach",
        "v3",
        "system",
        r#"{"__model_mapping": {"default_model": "gpt-4o", "candidates": ["gpt-4o"]}}"#,
    );
    let d = TestApp::spawn(&ws, None, "");
    d.wait_first_run();
    wait_snapshot(&d);

    // GET /export: a download in the snapshot format.
    let r = d.get("/export");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some(JSON_TYPE));
    let cd = r.header("content-disposition").expect("a download");
    let name = cd
        .strip_prefix("attachment; filename=\"model-mappings-")
        .and_then(|s| s.strip_suffix(".json\""))
        .unwrap_or_else(|| panic!("Content-Disposition: {cd}"));
    let stamp = chrono::NaiveDateTime::parse_from_str(name, "%Y%m%d-%H%M%S")
        .unwrap_or_else(|e| panic!("{cd}: {e}"))
        .and_utc();
    let age = chrono::Utc::now() - stamp;
    assert!(
        age >= chrono::Duration::seconds(-2) && age < chrono::Duration::seconds(120),
        "the file name holds the UTC time of the export: {cd}"
    );
    let text = r.text();
    assert!(
        text.starts_with("{\n  \"exported_at\": \""),
        "pretty-printed: {}",
        &text[..text.len().min(80)]
    );
    assert!(
        text.contains("sk-live-EXPORT-SECRET"),
        "an export is a backup of the source of truth: it keeps every metadata key"
    );
    let doc = r.json();
    assert_eq!(doc["count"], 31, "30 rows + 1 prompt mapping");
    let maps = doc["mappings"].as_array().unwrap();
    assert_eq!(maps.len(), 31);
    assert_eq!(maps[0]["source"], "prompt", "prompt mappings first");
    for m in maps {
        assert_eq!(m.as_object().unwrap().len(), 10, "{m}");
    }
    let m003 = maps.iter().find(|m| m["id"] == "mapping:m003").unwrap();
    assert_eq!(
        m003["metadata"],
        json!({"apiKey": "sk-live-EXPORT-SECRET", "note": "kept"})
    );
    // The ten fields in order, in the first mapping's text.
    let first = text.find("\"id\":").unwrap();
    let second = first + 1 + text[first + 1..].find("\"id\":").unwrap();
    let one = &text[first..second];
    let positions: Vec<usize> = MAPPING_FIELDS
        .iter()
        .map(|f| {
            one.find(&format!("\"{f}\":"))
                .unwrap_or_else(|| panic!("{f} missing in {one}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "fields out of order: {one}"
    );

    // GET /snapshots: latest first, then the timestamped ones.
    let list = ok_data(&d.get("/snapshots"));
    let list = list.as_array().expect("a list");
    assert_eq!(list[0]["name"], "model-mappings-latest.json", "{list:?}");
    let stamped: Vec<&str> = list
        .iter()
        .filter_map(|e| e["name"].as_str())
        .filter(|n| is_snapshot_name(n))
        .collect();
    assert!(!stamped.is_empty(), "{list:?}");
    for e in list {
        assert!(e["bytes"].as_u64().unwrap() > 0, "{e}");
        assert!(e["written_at"].as_str().unwrap().ends_with("+00:00"), "{e}");
        assert_eq!(e["count"], 31, "{e}");
    }

    // GET /snapshots/{name}: one file, as written.
    for name in [stamped[0], "model-mappings-latest.json"] {
        let r = d.get(&format!("/snapshots/{name}"));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.json()["count"], 31);
        assert!(
            r.text().contains("sk-live-EXPORT-SECRET"),
            "snapshots keep every key"
        );
        let on_disk = std::fs::read(ws.snapshot_dir().join(name)).unwrap();
        assert_eq!(r.body, on_disk, "{name} is served as it is on disk");
    }

    // Nothing but snapshot files is served.
    std::fs::write(ws.snapshot_dir().join("notes.txt"), "not a snapshot").unwrap();
    std::fs::write(ws.snapshot_dir().join("model-mappings-2026.json"), "{}").unwrap();
    std::fs::create_dir(
        ws.snapshot_dir()
            .join("model-mappings-20260116T101710123456Z.json"),
    )
    .unwrap();
    for path in [
        "/snapshots/..%2F..%2Fetc%2Fpasswd",
        "/snapshots/../db.sqlite3",
        "/snapshots/../mapsync.toml",
        "/snapshots/%2e%2e%2fmapsync.toml",
        "/snapshots/..%2fmapsync.toml",
        "/snapshots/%2Fetc%2Fpasswd",
        "/snapshots//etc/passwd",
        "/snapshots/model-mappings-latest.json/../../mapsync.toml",
        "/snapshots/notes.txt",
        "/snapshots/model-mappings-2026.json",
        "/snapshots/model-mappings-20260116T101710123456Z.json",
        "/snapshots/",
    ] {
        let r = d.get(path);
        error_msg(&r, 404);
        let t = r.text();
        assert!(
            !t.contains("root:") && !t.contains("sqlite_path") && !t.contains("not a snapshot"),
            "{path} served a file: {t}"
        );
    }
    let list = ok_data(&d.get("/snapshots")).to_string();
    assert!(!list.contains("notes.txt") && !list.contains("model-mappings-2026.json"));

    // POST /snapshots answers a name that can be fetched.
    let data = ok_data(&d.post("/snapshots", b""));
    let name = data["name"].as_str().expect("a name");
    assert!(is_snapshot_name(name), "{name}");
    assert_eq!(d.get(&format!("/snapshots/{name}")).status, 200);

    // GET /mappings: pages in export order, search over id, name and default model.
    let page = ok_data(&d.get("/mappings"));
    assert_eq!(page["total"], 31);
    assert_eq!(page["items"].as_array().unwrap().len(), 31);
    assert!(
        !page.to_string().contains("sk-live-EXPORT-SECRET"),
        "the admin page's list shows the mirror's (redacted) metadata"
    );
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&page)[0], maps[0]["id"].as_str().unwrap());
    let page = ok_data(&d.get("/mappings?offset=1&limit=10"));
    assert_eq!(page["total"], 31);
    assert_eq!(page["offset"], 1);
    assert_eq!(page["limit"], 10);
    let expected: Vec<String> = (0..10).map(|i| format!("mapping:m{i:03}")).collect();
    assert_eq!(ids(&page), expected);
    let page = ok_data(&d.get("/mappings?offset=30&limit=10"));
    assert_eq!(ids(&page), ["mapping:m029"]);
    let page = ok_data(&d.get("/mappings?offset=100"));
    assert_eq!(page["total"], 31);
    assert!(ids(&page).is_empty());
    let page = ok_data(&d.get("/mappings?q=M01"));
    assert_eq!(page["total"], 10, "{page}");
    let page = ok_data(&d.get("/mappings?q=CLAUDE"));
    assert_eq!(ids(&page), ["mapping:m007"], "default_model is searched");
    let page = ok_data(&d.get("/mappings?q=coach+prompt"));
    assert_eq!(
        ids(&page),
        ["mapping:m009"],
        "name is searched, + is a space"
    );
    let page = ok_data(&d.get("/mappings?q=coach%20prompt&limit=1"));
    assert_eq!(page["total"], 1);
    let page = ok_data(&d.get("/mappings?q=&offset=&limit="));
    assert_eq!(page["total"], 31);
    let page = ok_data(&d.get("/mappings?limit=100000"));
    assert!(page["limit"].as_u64().unwrap() <= 500, "{}", page["limit"]);
    for bad in [
        "/mappings?limit=abc",
        "/mappings?offset=-1",
        "/mappings?q=%zz",
        "/mappings?q=%ff",
    ] {
        error_msg(&d.get(bad), 400);
    }
}

/// Every route that needs the token, with a body it accepts.
const TOKEN_ROUTES: [(&str, &str, &[u8]); 9] = [
    ("GET", "/status", b""),
    ("GET", "/mappings", b""),
    ("POST", "/sync", b""),
    ("POST", SYNC_PATH, b""),
    (
        "POST",
        PUSH_PATH,
        br#"{"direction":"push","delete_missing":false}"#,
    ),
    ("GET", "/export", b""),
    ("GET", "/snapshots", b""),
    ("POST", "/snapshots", b""),
    ("GET", "/snapshots/model-mappings-latest.json", b""),
];

#[test]
fn the_admin_token_guards_every_token_route_and_only_those() {
    let ws = workspace(&Row::numbered("m", 3));
    let d = TestApp::spawn(&ws, None, &http_section(""));
    d.wait_first_run();
    wait_snapshot(&d);
    let latest = ws.snapshot_dir().join("model-mappings-latest.json");
    assert!(poll_until(Duration::from_secs(10), || latest.exists()));

    let wrong = format!("Bearer {TOKEN}x");
    let short = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let basic = format!("Basic {TOKEN}");
    let bare = TOKEN.to_string();
    for (method, path, body) in TOKEN_ROUTES {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some(wrong.as_str()),
            Some(short.as_str()),
            Some(basic.as_str()),
            Some(bare.as_str()),
            Some("Bearer "),
        ] {
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(a) = auth {
                headers.push(("Authorization", a));
            }
            let r = http::request(d.addr, method, path, &headers, body);
            let msg = error_msg(&r, 401);
            assert!(msg.starts_with("unauthorized"), "{method} {path}: {msg}");
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer"),
                "{method} {path} with {auth:?}"
            );
        }
        let r = authed(&d, method, path, &[], body);
        assert_eq!(
            r.status,
            200,
            "{method} {path} with the token: {}",
            r.text()
        );
    }
    // Open routes stay open.
    for path in ["/", "/livez", "/healthz", "/readyz", "/metrics"] {
        let r = http::get(d.addr, path, None);
        assert_eq!(r.status, 200, "{path} without a token: {}", r.text());
    }
    let m = http::get(d.addr, "/metrics", None).text();
    assert_eq!(
        metric_sum(
            &m,
            "mapsync_http_requests_total{route=\"/status\",code=\"401\"}"
        ),
        7.0,
        "{m}"
    );
}

/// Runs `mapsync run` on `config` and waits (at most 20 s) for it to exit.
fn run_to_exit(config: &std::path::Path) -> crate::harness::workspace::Run {
    let mut cmd = command();
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("mapsync runs");
    let exited = poll_until(Duration::from_secs(20), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    assert!(
        exited,
        "mapsync run started on a public address without a token"
    );
    crate::harness::workspace::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn a_public_listen_address_needs_a_token() {
    let ws = workspace(&Row::numbered("m", 1));
    ws.write_config(None, "[http]\nlisten = \"0.0.0.0:0\"\n");
    let run = run_to_exit(&ws.config);
    run.expect_code(78);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one line: {run:#?}");
    assert!(lines[0].contains("http.admin_token"), "{run:#?}");

    // The same through the environment.
    let mut cmd = command();
    cmd.arg("--config")
        .arg(&ws.config)
        .arg("check")
        .env("MAPSYNC_HTTP__LISTEN", "0.0.0.0:9187");
    let check = crate::harness::workspace::run(cmd);
    check.expect_code(78);
    assert!(check.stderr.contains("http.admin_token"), "{check:#?}");

    // With a token it starts, and the token is needed.
    let d = Daemon::start(
        &ws,
        None,
        &format!("[http]\nlisten = \"0.0.0.0:0\"\nadmin_token = \"{TOKEN}\"\n"),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], d.addr.port()));
    assert_eq!(http::get(addr, "/livez", None).status, 200);
    assert_eq!(http::get(addr, "/status", None).status, 401);
    assert_eq!(http::get(addr, "/status", Some(TOKEN)).status, 200);
}

/// The `access-control-*` headers of `r`.
fn cors_headers(r: &Reply) -> Vec<&(String, String)> {
    r.headers
        .iter()
        .filter(|(k, _)| k.starts_with("access-control-"))
        .collect()
}

#[test]
fn cors_headers_go_to_listed_origins_only() {
    let ws = workspace(&Row::numbered("m", 2));
    let d = TestApp::spawn(
        &ws,
        None,
        &http_section(&format!(
            "cors_origins = [\"{ORIGIN}\", \"http://localhost:5173\"]"
        )),
    );
    d.wait_first_run();

    for path in ["/livez", "/export", "/status"] {
        let r = authed(&d, "GET", path, &[("Origin", ORIGIN)], b"");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{path}"
        );
        let vary: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "vary")
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(
            vary.iter()
                .any(|v| v.split(',').any(|x| x.trim() == "Origin")),
            "{path}: Vary: {vary:?}"
        );
        let expose = r.header("access-control-expose-headers").unwrap_or("");
        assert!(
            expose.to_lowercase().contains("content-disposition"),
            "{path}: {expose}"
        );
    }
    let r = authed(
        &d,
        "POST",
        SYNC_PATH,
        &[("Origin", "http://localhost:5173")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://localhost:5173")
    );
    // A 401 to a listed origin is readable by the page.
    let r = http::request(d.addr, "POST", SYNC_PATH, &[("Origin", ORIGIN)], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));

    // Preflight: no token needed, the methods and the Authorization header allowed.
    let preflight = [
        ("Origin", ORIGIN),
        ("Access-Control-Request-Method", "POST"),
        (
            "Access-Control-Request-Headers",
            "authorization, content-type",
        ),
    ];
    let r = http::request(d.addr, "OPTIONS", SYNC_PATH, &preflight, b"");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    let methods = r.header("access-control-allow-methods").unwrap_or("");
    assert!(methods.contains("POST"), "{methods}");
    let allowed = r.header("access-control-allow-headers").unwrap_or("");
    assert!(
        allowed.to_lowercase().contains("authorization"),
        "{allowed}"
    );
    let r = http::request(d.addr, "OPTIONS", "/export", &preflight, b"");
    assert_eq!(r.status, 204);
    assert!(
        r.header("access-control-allow-methods")
            .unwrap_or("")
            .contains("GET")
    );

    // Other origins get no CORS header.
    for origin in UNLISTED {
        let r = authed(&d, "GET", "/status", &[("Origin", origin)], b"");
        assert_eq!(r.status, 200);
        assert!(cors_headers(&r).is_empty(), "{origin}: {:?}", r.headers);
        // A POST from a foreign origin is refused (CSRF), token or not.
        let r = authed(&d, "POST", SYNC_PATH, &[("Origin", origin)], b"");
        error_msg(&r, 403);
        assert!(cors_headers(&r).is_empty(), "{origin}: {:?}", r.headers);
        let r = http::request(d.addr, "POST", SYNC_PATH, &[("Origin", origin)], b"");
        error_msg(&r, 403);
        assert!(cors_headers(&r).is_empty(), "{origin}: {:?}", r.headers);
    }
}

/// Origins that are not in `http.cors_origins` (one is a prefix trick, one is `null`).
const UNLISTED: [&str; 3] = [
    "https://evil.example.com",
    "https://admin.example.com.evil.com",
    "null",
];

#[test]
fn a_preflight_from_an_unlisted_origin_gets_no_cors_headers() {
    // SPEC §4: "origins listed in http.cors_origins get CORS headers and preflight answers;
    // others get none".
    let ws = workspace(&Row::numbered("m", 1));
    let d = TestApp::spawn(
        &ws,
        None,
        &http_section(&format!("cors_origins = [\"{ORIGIN}\"]")),
    );
    let mut leaks = Vec::new();
    for origin in UNLISTED {
        for path in [SYNC_PATH, "/status", "/export"] {
            let r = http::request(
                d.addr,
                "OPTIONS",
                path,
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", "POST"),
                    ("Access-Control-Request-Headers", "authorization"),
                ],
                b"",
            );
            if !cors_headers(&r).is_empty() {
                leaks.push(format!(
                    "OPTIONS {path} from {origin}: {} {:?}",
                    r.status,
                    cors_headers(&r)
                ));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "preflights from unlisted origins got CORS headers:\n{}",
        leaks.join("\n")
    );
}

/// A request head with the token, for [`http::send_raw`].
fn raw_head(method: &str, path: &str, addr: SocketAddr, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n{extra}\r\n"
    )
}

#[test]
fn bad_requests_get_the_envelope_with_one_line() {
    let ws = workspace(&Row::numbered("m", 2));
    let d = TestApp::spawn(&ws, None, &http_section(""));
    d.wait_first_run();

    // Unknown paths.
    for path in ["/nope", "/api/v1/llm/model-groups", "/statusx", "/livez/"] {
        error_msg(&authed(&d, "GET", path, &[], b""), 404);
    }
    // Wrong methods: 405 with Allow.
    for (method, path, allow) in [
        ("GET", "/sync", "POST"),
        ("GET", SYNC_PATH, "POST"),
        ("PUT", PUSH_PATH, "POST"),
        ("POST", "/status", "GET"),
        ("DELETE", "/snapshots", "GET, POST"),
        ("POST", "/livez", "GET"),
        ("POST", "/export", "GET"),
        ("DELETE", "/snapshots/model-mappings-latest.json", "GET"),
    ] {
        let r = authed(&d, method, path, &[], b"");
        error_msg(&r, 405);
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }

    // Bodies over 64 KiB: declared, sent whole, and chunked past the limit.
    let limit = 64 * 1024;
    let head = raw_head(
        "POST",
        PUSH_PATH,
        d.addr,
        &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            limit + 1
        ),
    );
    let r = http::send_raw(d.addr, head.as_bytes()).expect("an answer");
    let msg = error_msg(&r, 413);
    assert!(msg.contains("64 KiB"), "{msg}");

    let mut whole = raw_head(
        "POST",
        PUSH_PATH,
        d.addr,
        &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            100_000
        ),
    )
    .into_bytes();
    whole.extend(std::iter::repeat_n(b' ', 100_000));
    let r = http::send_raw(d.addr, &whole).expect("an answer");
    error_msg(&r, 413);

    let (r, sent) = chunked_until_answered(
        d.addr,
        &raw_head(
            "POST",
            PUSH_PATH,
            d.addr,
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
        ),
        256 * 1024,
    );
    error_msg(&r, 413);
    assert!(
        sent > limit,
        "answered after {sent} bytes, before the limit"
    );
    // A body just under the limit is read (and judged on its content).
    let mut body = br#"{"direction":"push","delete_missing":false}"#.to_vec();
    body.resize(limit - 1, b' ');
    let data = ok_data(&authed(&d, "POST", PUSH_PATH, &[], &body));
    assert_eq!(data["push"]["status"], "skipped:supabase_not_configured");

    // Malformed JSON and malformed values.
    for body in [
        &br#"{"direction":"#[..],
        b"not json",
        b"[1,2]",
        br#"{"direction":"push","delete_missing":"yes"}"#,
        b"\xff\xfe",
    ] {
        let r = authed(&d, "POST", PUSH_PATH, &[], body);
        error_msg(&r, 400);
    }
    // Malformed queries.
    for path in [
        "/sync?delete_missing=maybe",
        "/sync?force=yes",
        "/sync?delete_missing=%zz",
        "/sync?%zz",
        "/sync?force=%",
        &format!("{SYNC_PATH}?delete_missing=maybe"),
    ] {
        let msg = error_msg(&authed(&d, "POST", path, &[], b""), 400);
        assert!(
            msg.contains("delete_missing") || msg.contains("force") || msg.contains("query"),
            "{path}: {msg}"
        );
    }
    // The daemon is still fine.
    assert_eq!(http::get(d.addr, "/livez", None).status, 200);
}

#[test]
fn an_oversized_body_is_refused_on_every_post_route() {
    // SPEC §4: "body over 64 KiB 413", whatever the route; a refused request does nothing.
    let ws = workspace(&Row::numbered("m", 2));
    let d = TestApp::spawn(&ws, None, &http_section(""));
    d.wait_first_run();
    let manual_runs = || {
        let m = http::get(d.addr, "/metrics", None).text();
        metric_sum(&m, "mapsync_sync_runs_total{trigger=\"manual\"")
    };
    let before = manual_runs();
    let mut wrong = Vec::new();
    for path in ["/sync", SYNC_PATH, "/snapshots", PUSH_PATH] {
        let head = raw_head("POST", path, d.addr, "Content-Length: 100000\r\n");
        let r = http::send_raw(d.addr, head.as_bytes()).expect("an answer");
        if r.status != 413 {
            wrong.push(format!(
                "POST {path} declaring 100000 bytes: {} {}",
                r.status,
                r.text()
            ));
        } else {
            error_msg(&r, 413);
        }
        let (r, sent) = chunked_until_answered(
            d.addr,
            &raw_head("POST", path, d.addr, "Transfer-Encoding: chunked\r\n"),
            256 * 1024,
        );
        if r.status != 413 {
            wrong.push(format!(
                "POST {path} with a chunked body (answered after {sent} bytes): {} {}",
                r.status,
                r.text()
            ));
        }
    }
    let ran = manual_runs() - before;
    assert!(
        wrong.is_empty() && ran == 0.0,
        "oversized bodies were not refused ({ran} sync runs happened):\n{}",
        wrong.join("\n")
    );
}

/// Sends `head` and then a chunked body in 4 KiB chunks, waiting for the server to take each,
/// until it answers or `max` bytes went out; returns its answer and how many bytes went out.
fn chunked_until_answered(addr: SocketAddr, head: &str, max: usize) -> (Reply, usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b' '; 4096];
    let mut sent = 0;
    let mut answered = false;
    while sent < max {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if s.write_all(&frame).is_err() {
            break;
        }
        sent += chunk.len();
        s.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let mut probe = [0u8; 1];
        match s.peek(&mut probe) {
            Ok(_) => {
                answered = true;
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    assert!(
        answered || sent < max,
        "{sent} bytes of a chunked body went out and no answer came"
    );
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (http::read_reply(&mut s).expect("an answer"), sent)
}

/// Reads from `s` until the server closes it; returns how long that took after `since`, or
/// panics when it is still open at `deadline`.
fn wait_closed(s: &mut TcpStream, since: Instant, deadline: Duration, what: &str) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_sub(since.elapsed());
        assert!(!left.is_zero(), "{what} still open after {deadline:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => continue, // a 408 or similar before the close is fine
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what} still open after {deadline:?}")
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return since.elapsed(), // reset: closed too
        }
    }
}

#[test]
fn slow_and_idle_clients_are_cut_off_while_others_are_served() {
    let ws = workspace(&Row::numbered("m", 2));
    let d = TestApp::spawn(&ws, None, "");
    d.wait_first_run();

    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(d.addr).unwrap();
            s.write_all(b"GET /status HTTP/1.1\r\nHost: mapsync\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let mut idle = TcpStream::connect(d.addr).unwrap();

    // Others are served meanwhile, promptly.
    for _ in 0..5 {
        let t = Instant::now();
        let r = http::get(d.addr, "/livez", None);
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "/livez took {:?} while slow clients were connected",
            t.elapsed()
        );
    }
    assert_eq!(d.post("/sync", b"").status, 200);

    // The slow ones are cut off by the 5 s header timeout.
    let deadline = Duration::from_secs(8);
    let took = wait_closed(&mut slow[0], started, deadline, "a half-sent request head");
    assert!(
        took >= Duration::from_secs(3),
        "cut off after {took:?}: sooner than the header timeout"
    );
    for s in &mut slow[1..] {
        wait_closed(s, started, deadline, "a half-sent request head");
    }
    wait_closed(&mut idle, started, deadline, "an idle connection");
    assert_eq!(http::get(d.addr, "/livez", None).status, 200);
}

#[test]
fn simultaneous_sync_requests_share_at_most_two_runs() {
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    generate(&ws.db_path(), 3000, 2, true);
    ws.mapsync(&["migrate"]).expect_code(0);
    let d = TestApp::spawn(&ws, Some(&db.url), &http_section(""));
    let first = d.wait_first_run();
    assert_eq!(first["last_run"]["status"], "synced", "{first}");

    let manual_runs = || {
        let m = http::get(d.addr, "/metrics", None).text();
        metric_sum(&m, "mapsync_sync_runs_total{trigger=\"manual\"")
    };
    let before = manual_runs();
    let n = 20;
    let barrier = Arc::new(Barrier::new(n));
    let addr = d.addr;
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                http::post(addr, SYNC_PATH, Some(TOKEN), b"")
            })
        })
        .collect();
    for t in threads {
        let r = t.join().expect("a client thread");
        let data = ok_data(&r);
        assert_sync_result(&data);
        assert_eq!(data["status"], "synced", "{data}");
        assert_eq!(data["trigger"], "manual");
        assert_eq!(data["synced_count"], 3002, "{data}");
        assert_eq!(data["remote_after"], 3002, "{data}");
        assert_eq!(data["changed_count"], 0, "{data}");
    }
    let runs = manual_runs() - before;
    assert!(
        (1.0..=2.0).contains(&runs),
        "{n} simultaneous requests took {runs} runs"
    );
    assert_eq!(remote_count(&db), 3002);
}

#[test]
fn no_response_carries_the_password_or_the_token() {
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    let mut all = Row::numbered("m", 12);
    all[1].metadata_json = Some(r#"{"api_key": "sk-metadata-SECRET"}"#.into());
    for r in &all {
        ws.app.upsert(r);
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    let password = db
        .url
        .split_once('@')
        .unwrap()
        .0
        .rsplit_once(':')
        .unwrap()
        .1
        .to_string();
    assert!(password.len() >= 8, "the test cluster has a real password");
    let d = Daemon::start(
        &ws,
        Some(&db.url),
        &http_section(&format!("cors_origins = [\"{ORIGIN}\"]")),
    );
    d.wait_first_run();
    wait_snapshot(&d);

    let mut seen: Vec<Reply> = Vec::new();
    let o = [("Origin", ORIGIN)];
    for path in ["/", "/livez", "/healthz", "/readyz", "/metrics", "/nope"] {
        seen.push(http::request(d.addr, "GET", path, &o, b""));
    }
    for (method, path, body) in TOKEN_ROUTES {
        seen.push(http::request(d.addr, method, path, &o, body));
        seen.push(authed(&d, method, path, &o, body));
        seen.push(http::request(
            d.addr,
            method,
            path,
            &[("Authorization", "Bearer nope")],
            body,
        ));
        seen.push(http::request(d.addr, "OPTIONS", path, &o, b""));
    }
    // Exports and snapshot files are backups of the SQLite file: they keep the metadata's
    // secrets (SPEC §1), and nothing else may show them.
    let mut backups: Vec<Reply> = Vec::new();
    let list = ok_data(&d.get("/snapshots"));
    for e in list.as_array().unwrap() {
        backups.push(d.get(&format!("/snapshots/{}", e["name"].as_str().unwrap())));
    }
    let (exports, rest): (Vec<Reply>, Vec<Reply>) = seen
        .into_iter()
        .partition(|r| r.status == 200 && r.text().starts_with("{\n  \"exported_at\": "));
    seen = rest;
    backups.extend(exports);
    assert!(
        backups
            .iter()
            .all(|r| r.status == 200 && r.text().contains("sk-metadata-SECRET")),
        "every export and snapshot keeps the secret"
    );
    for (method, path, body) in [
        ("POST", "/sync?delete_missing=maybe", &b""[..]),
        ("POST", "/sync?delete_missing=true&force=true", b""),
        ("POST", PUSH_PATH, br#"{"direction":"pull"}"#),
        ("POST", PUSH_PATH, b"{"),
        ("GET", "/sync", b""),
        ("GET", "/mappings?q=m00&limit=3", b""),
        ("GET", "/mappings?q=%zz", b""),
    ] {
        seen.push(authed(&d, method, path, &[], body));
    }
    // Postgres goes away for a moment: failures must not echo the URL either.
    db.psql("ALTER TABLE public.model_mappings RENAME TO model_mappings_away");
    seen.push(d.post(SYNC_PATH, b""));
    seen.push(d.post("/sync", b""));
    // /readyz may reuse Postgres's answer for 2 s: wait for it to see the missing table.
    let mut ready = None;
    let not_ready = poll_until(Duration::from_secs(10), || {
        let r = http::get(d.addr, "/readyz", None);
        let hit = r.status == 503;
        ready = Some(r);
        hit
    });
    seen.extend(ready);
    seen.push(d.get("/status"));
    db.psql("ALTER TABLE public.model_mappings_away RENAME TO model_mappings");
    assert!(not_ready, "/readyz never saw the missing table");
    for r in &seen[seen.len() - 4..seen.len() - 2] {
        error_msg(r, 503);
    }

    let mut everything = String::new();
    for r in &seen {
        for (k, v) in &r.headers {
            everything.push_str(&format!("{k}: {v}\n"));
        }
        everything.push_str(&r.text());
        everything.push('\n');
    }
    assert!(everything.len() > 10_000, "the responses were collected");
    assert!(
        !everything.contains(&password),
        "the Postgres password leaked"
    );
    assert!(!everything.contains(TOKEN), "the admin token leaked");
    let leaks: Vec<String> = seen
        .iter()
        .filter(|r| r.text().contains("sk-metadata-SECRET"))
        .map(|r| format!("{} {:?}", r.status, r.headers))
        .collect();
    assert!(leaks.is_empty(), "a metadata secret leaked: {leaks:?}");
    let log = d.log();
    assert!(!log.contains(&password), "the password is in the log");
    assert!(!log.contains(TOKEN), "the token is in the log");
}
