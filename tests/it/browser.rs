//! The admin page (`GET /`, src/http/admin.html) in a real headless Chromium, served by the
//! real daemon: the token form, the status panel, the mappings table with paging and search,
//! the sync button's three outcomes (ok, warning, error) and the export download. Clicks are
//! real mouse events on the element's box; no test may see a JavaScript exception.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Timelike;

use crate::harness::browser::{Browser, Page, chromium_path};
use crate::harness::daemon::Daemon;
use crate::harness::workspace::{Workspace, supabase_db};
use crate::harness::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "page-token-7f3a9c";

/// Rows `p000…`: the first `sonnet` use claude-sonnet-4-5, the others gpt-4o-mini.
fn rows(n: usize, sonnet: usize) -> Vec<Row> {
    (0..n)
        .map(|i| {
            let model = if i < sonnet {
                "claude-sonnet-4-5"
            } else {
                "gpt-4o-mini"
            };
            Row::mapping(&format!("p{i:03}"), model)
        })
        .collect()
}

/// The ids shown in `#mappings`, in order.
fn table_ids(page: &Page) -> Vec<String> {
    let v = page.eval(
        "Array.from(document.querySelectorAll('#mappings tr')).map(function(tr){return tr.cells[0].textContent})",
    );
    serde_json::from_value(v).expect("a list of ids")
}

fn row_count(page: &Page) -> u64 {
    page.eval("document.querySelectorAll('#mappings tr').length")
        .as_u64()
        .unwrap()
}

/// Waits until `#mappings` has exactly `n` rows (and, with `contains`, every row mentions it).
#[track_caller]
fn wait_rows(page: &Page, n: usize, contains: &str) {
    page.wait_for(
        &format!(
            "(function(){{var r=document.querySelectorAll('#mappings tr');\
             return r.length==={n} && Array.from(r).every(function(tr){{return tr.textContent.indexOf({c})>=0}})}})()",
            c = Value::from(contains)
        ),
        WAIT,
        &format!("{n} rows in #mappings containing {contains:?}"),
    );
}

/// Clicks `#sync-btn` and waits for the answer in `#sync-result`; returns (data-kind, text).
#[track_caller]
fn click_sync(page: &Page) -> (String, String) {
    page.eval("var r=document.getElementById('sync-result');r.hidden=true;r.removeAttribute('data-kind');");
    page.click("#sync-btn");
    page.wait_for(
        "!document.getElementById('sync-result').hidden && !document.getElementById('sync-btn').disabled",
        WAIT,
        "the sync result",
    );
    let kind = page
        .eval("document.getElementById('sync-result').dataset.kind")
        .as_str()
        .unwrap_or("")
        .to_string();
    (kind, page.text("#sync-result"))
}

#[track_caller]
fn assert_no_exceptions(page: &Page) {
    let ex = page.exceptions();
    assert!(ex.is_empty(), "JavaScript exceptions on the page: {ex:#?}");
}

/// `model-mappings-YYYYMMDD-HHMMSS.json` → the UTC time in the name.
fn parse_export_name(name: &str) -> Option<chrono::NaiveDateTime> {
    let stamp = name
        .strip_prefix("model-mappings-")?
        .strip_suffix(".json")?;
    let b = stamp.as_bytes();
    let shape_ok = b.len() == 15
        && b[8] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 8 || c.is_ascii_digit());
    if !shape_ok {
        return None;
    }
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%d-%H%M%S").ok()
}

#[test]
fn token_status_mappings_search_sync_and_export_work_in_a_real_browser() {
    chromium_path(); // fails with the install command before anything is started
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    for r in rows(130, 7) {
        ws.app.upsert(&r);
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    let daemon = TestApp::spawn(
        &ws,
        Some(&db.url),
        // The watcher stays quiet during the test: the sync button does the pushing.
        &format!(
            "[watch]\ndebounce_ms = 600000\nmax_delay_ms = 600000\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n"
        ),
    );
    let status = daemon.wait_first_run();
    assert_eq!(status["last_run"]["status"], "synced", "{status:#}");
    let target_name = status["target"]["name"].as_str().unwrap().to_string();

    let browser = Browser::launch();
    let page = browser.open(&format!("http://{}/", daemon.addr));

    // Without the token the page says so and never claims to be ready.
    page.wait_for(
        "document.getElementById('error').textContent.indexOf('Token required')>=0",
        WAIT,
        "the token-required message",
    );
    assert_ne!(page.eval("document.body.dataset.ready || ''"), "1");
    assert_eq!(row_count(&page), 0, "no mappings shown without the token");

    // A wrong token is refused and said so.
    page.type_into("#token", "not-the-token");
    page.click("#save-token");
    page.wait_for(
        "document.getElementById('error').textContent.indexOf('Wrong token')>=0",
        WAIT,
        "the wrong-token message",
    );
    assert_ne!(page.eval("document.body.dataset.ready || ''"), "1");

    page.type_into("#token", TOKEN);
    page.click("#save-token");
    page.wait_for(
        "document.body.dataset.ready === '1'",
        WAIT,
        "the page to load with the token",
    );
    assert_eq!(page.text("#error"), "", "no error once the token is saved");
    assert_eq!(
        page.eval("sessionStorage.getItem('mapsync_token')"),
        TOKEN,
        "the token is kept for the session"
    );

    // The status panel.
    let target_state = page.text("#target-state");
    assert!(
        target_state.contains("configured") && target_state.contains(&target_name),
        "#target-state = {target_state:?}, expected the target {target_name}"
    );
    assert!(
        !target_state.contains(
            db.url
                .split('@')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
        ),
        "the password is never shown: {target_state:?}"
    );
    page.wait_for(
        "document.getElementById('target-up').textContent === 'up'",
        WAIT,
        "the target shown as up",
    );
    assert_eq!(page.text("#lag"), "0 s");
    assert_eq!(page.text("#pending"), "0");
    assert_eq!(
        page.text("#version"),
        format!("v{}", env!("CARGO_PKG_VERSION"))
    );
    let last_run = page.text("#last-run");
    assert!(
        last_run.contains("synced")
            && last_run.contains("startup")
            && last_run.contains("130 synced"),
        "#last-run = {last_run:?}"
    );
    assert!(
        page.text("#source").contains("130 rows"),
        "{}",
        page.text("#source")
    );

    // The mappings table: the first page is the first 100 in export order.
    wait_rows(&page, 100, "");
    let api: Vec<String> = daemon.get("/mappings?limit=100").json()["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(table_ids(&page), api);
    assert_eq!(page.text("#page-info"), "1\u{2013}100 of 130");
    page.click("#next-page");
    wait_rows(&page, 30, "");
    assert_eq!(page.text("#page-info"), "101\u{2013}130 of 130");
    page.click("#prev-page");
    wait_rows(&page, 100, "");

    // A search narrows the table (by model here), and a miss says so.
    page.type_into("#search", "sonnet");
    wait_rows(&page, 7, "claude-sonnet-4-5");
    assert_eq!(page.text("#page-info"), "1\u{2013}7 of 7");
    let ids: BTreeSet<String> = table_ids(&page).into_iter().collect();
    let expected: BTreeSet<String> = (0..7).map(|i| format!("mapping:p{i:03}")).collect();
    assert_eq!(ids, expected);
    page.type_into("#search", "p12");
    wait_rows(&page, 10, "mapping:p12");
    page.type_into("#search", "no-such-mapping");
    wait_rows(&page, 1, "No mapping matches");

    // The sync button pushes an application change the watcher has not acted on.
    ws.app.upsert(&Row::mapping("p005", "o4-mini"));
    let (kind, text) = click_sync(&page);
    assert_eq!(kind, "ok", "{text}");
    assert_eq!(
        text, "Synced 130 mappings (1 changed, 0 deleted)",
        "#sync-result"
    );
    let status = daemon.status();
    assert_eq!(status["last_run"]["trigger"], "manual", "{status:#}");
    assert_eq!(status["last_run"]["synced_count"], 130);
    let mirrored =
        db.psql("SELECT default_model FROM public.model_mappings WHERE id = 'mapping:p005'");
    assert_eq!(mirrored.trim(), "o4-mini");
    page.wait_for(
        "document.getElementById('last-run').textContent.indexOf('manual') >= 0",
        WAIT,
        "the status panel to show the manual run",
    );

    // The export button downloads the current mappings under the server's file name.
    let downloads = browser.scratch_dir("downloads");
    browser.allow_downloads(&downloads);
    let before = chrono::Utc::now().naive_utc();
    page.click("#export-btn");
    let begun = browser.wait_event("Browser.downloadWillBegin", WAIT, |_| true);
    let guid = begun["guid"].as_str().unwrap().to_string();
    let done = browser.wait_event("Browser.downloadProgress", WAIT, |p| {
        p["guid"] == guid.as_str() && p["state"] != "inProgress"
    });
    assert_eq!(done["state"], "completed", "{done}");
    let after = chrono::Utc::now().naive_utc();
    let files: Vec<String> = std::fs::read_dir(&downloads)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = &files[0];
    assert_eq!(begun["suggestedFilename"], name.as_str());
    let stamp = parse_export_name(name)
        .unwrap_or_else(|| panic!("{name} is not model-mappings-YYYYMMDD-HHMMSS.json"));
    let slack = chrono::Duration::seconds(2);
    assert!(
        stamp >= (before - slack).with_nanosecond(0).unwrap() && stamp <= after + slack,
        "the name's time {stamp} is the UTC time of the export ({before} … {after})"
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(downloads.join(name)).unwrap())
        .expect("the download is JSON");
    assert_eq!(doc["count"], 130);
    let mappings = doc["mappings"].as_array().expect("mappings list");
    assert_eq!(mappings.len(), 130);
    assert!(mappings.iter().any(|m| m["id"] == "mapping:p129"));
    let p005 = mappings.iter().find(|m| m["id"] == "mapping:p005").unwrap();
    assert_eq!(p005["default_model"], "o4-mini", "the export is current");
    page.wait_for(
        "document.getElementById('export-result').dataset.kind === 'ok'",
        WAIT,
        "the export result",
    );
    assert!(
        page.text("#export-result")
            .starts_with(&format!("Downloaded {name}")),
        "{}",
        page.text("#export-result")
    );

    // "Forget token" drops it: the page asks for it again.
    page.click("#forget-token");
    page.wait_for(
        "document.getElementById('error').textContent.indexOf('Token required')>=0",
        WAIT,
        "the token-required message after forgetting the token",
    );
    assert_eq!(
        page.eval("sessionStorage.getItem('mapsync_token')"),
        Value::Null
    );
    assert_eq!(page.eval("document.getElementById('token').value"), "");

    assert_no_exceptions(&page);
}

#[test]
fn without_a_target_the_sync_button_warns_that_nothing_was_pushed() {
    chromium_path();
    let ws = Workspace::new(None, "");
    for r in rows(12, 0) {
        ws.app.upsert(&r);
    }
    let daemon = TestApp::spawn(&ws, None, "");
    daemon.wait_first_run();

    let browser = Browser::launch();
    let page = browser.open(&format!("http://{}/", daemon.addr));
    // No token configured: the page works without one.
    page.wait_for(
        "document.body.dataset.ready === '1'",
        WAIT,
        "the page to load",
    );
    assert!(
        page.text("#target-state").contains("not configured"),
        "{}",
        page.text("#target-state")
    );
    assert_eq!(page.text("#target-up"), "n/a");
    wait_rows(&page, 12, "gpt-4o-mini");

    let (kind, text) = click_sync(&page);
    assert_eq!(kind, "warning", "{text}");
    assert_eq!(text, "Supabase is not configured: nothing was pushed");
    assert_eq!(page.text("#error"), "");
    assert_no_exceptions(&page);
}

#[test]
fn a_run_refused_because_another_instance_writes_the_table_names_it_on_the_page() {
    chromium_path();
    let db = supabase_db();
    let first = Workspace::new(Some(&db.url), "[instance]\nname = \"the-other-host\"\n");
    for r in rows(3, 0) {
        first.app.upsert(&r);
    }
    first.mapsync(&["migrate"]).expect_code(0);
    first.sync(&[]);
    let ws = Workspace::new(Some(&db.url), "");
    for r in rows(5, 0) {
        ws.app.upsert(&r);
    }
    let daemon = TestApp::spawn(&ws, Some(&db.url), "[target]\ndelete_missing = true\n");
    let status = daemon.wait_first_run();
    assert_eq!(
        status["last_run"]["status"], "refused:other_instance",
        "{status:#}"
    );

    let browser = Browser::launch();
    let page = browser.open(&format!("http://{}/", daemon.addr));
    page.wait_for(
        "document.body.dataset.ready === '1'",
        WAIT,
        "the page to load",
    );
    let last_run = page.text("#last-run");
    assert!(
        last_run.contains("refused:other_instance") && last_run.contains("the-other-host"),
        "#last-run names the other instance: {last_run:?}"
    );
    assert_no_exceptions(&page);
}

#[test]
fn a_postgres_failure_shows_the_error_box_with_the_message() {
    chromium_path();
    let ws = Workspace::new(None, "");
    for r in rows(5, 0) {
        ws.app.upsert(&r);
    }
    // Nothing listens there: every attempt is refused.
    let password = "pw-never-shown-41c2";
    let url = format!(
        "postgres://mapsync:{password}@127.0.0.1:{}/app",
        free_port()
    );
    let daemon = TestApp::spawn(&ws, Some(&url), "");
    let status = daemon.wait_first_run();
    assert_eq!(status["last_run"]["status"], "error", "{status:#}");
    // What the API answers, for comparison with what the page shows.
    let api = daemon.post("/api/v1/llm/model-groups/sync-to-supabase", b"");
    assert_eq!(api.status, 503, "{}", api.text());
    let msg = api.json()["msg"].as_str().unwrap().to_string();
    assert!(!msg.is_empty() && !msg.contains(password), "{msg}");

    let browser = Browser::launch();
    let page = browser.open(&format!("http://{}/", daemon.addr));
    page.wait_for(
        "document.body.dataset.ready === '1'",
        WAIT,
        "the page to load",
    );
    page.wait_for(
        "document.getElementById('target-up').textContent === 'down'",
        WAIT,
        "the target shown as down",
    );
    assert!(
        page.text("#last-run").contains("error"),
        "{}",
        page.text("#last-run")
    );

    let (kind, text) = click_sync(&page);
    assert_eq!(kind, "error", "{text}");
    assert_eq!(text, format!("Sync failed: {msg}"));
    assert!(!page.text("body").contains(password));
    assert_no_exceptions(&page);
}

#[test]
fn chromium_leaves_nothing_running_after_drop() {
    let browser = Browser::launch();
    let answer = browser.call(None, "Browser.getVersion", json!({}));
    assert!(
        answer["product"].as_str().unwrap_or("").contains("Chrome"),
        "{answer}"
    );
    // A message over 64 KiB each way through the DevTools socket.
    let page = browser.open("about:blank");
    let big = "x".repeat(100_000);
    let v = page.eval(&format!("{}.length", Value::from(big.as_str())));
    assert_eq!(v, 100_000);
    let v = page.eval("'y'.repeat(200000)");
    assert_eq!(v.as_str().map(str::len), Some(200_000));
    let pgid = browser.pgid();
    let profile = browser.profile_dir().to_string_lossy().into_owned();
    drop(browser);
    // Live (not zombie) processes in Chromium's process group, or naming its profile.
    let in_group = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        // pid (comm) state ppid pgrp …
                        let after: Vec<String> = s[s.rfind(')')? + 2..]
                            .split_whitespace()
                            .take(3)
                            .map(str::to_string)
                            .collect();
                        let cmdline =
                            std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                        let names_profile =
                            String::from_utf8_lossy(&cmdline).contains(profile.as_str());
                        Some(
                            after[0] != "Z"
                                && (after[2].parse::<u32>().ok()? == pgid || names_profile),
                        )
                    })
                    .unwrap_or(false)
            })
            .collect()
    };
    let mut left = Vec::new();
    let gone = crate::harness::sys::poll_until(Duration::from_secs(10), || {
        left = in_group();
        left.is_empty()
    });
    assert!(gone, "Chromium processes left running: {left:?}");
}

/// A page on another origin calls the compat route the way the mapping page's HTTP client
/// does (`fetch` with `Authorization` and `X-Request-Id`, so the browser sends a preflight
/// first): from an origin in `http.cors_origins` the preflight passes and the answer is read;
/// from any other the browser blocks the call and no run starts.
#[test]
fn a_listed_origin_may_call_the_sync_route_cross_origin_and_others_are_blocked() {
    chromium_path();
    let page = "<!doctype html><html><head><meta charset=utf-8><title>app</title></head><body>app</body></html>";
    let listed = crate::harness::http::StubServer::start("text/html; charset=utf-8", page);
    let unlisted = crate::harness::http::StubServer::start("text/html; charset=utf-8", page);
    let ws = Workspace::new(None, "");
    for r in rows(3, 1) {
        ws.app.upsert(&r);
    }
    let daemon = Daemon::start(
        &ws,
        None,
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\ncors_origins = [\"http://{}\"]\n",
            listed.addr
        ),
    );
    daemon.wait_first_run();
    let call = format!(
        "fetch('http://{}/api/v1/llm/model-groups/sync-to-supabase', {{method: 'POST', \
         headers: {{'Authorization': 'Bearer {TOKEN}', 'X-Request-Id': 'browser-req-1'}}}})\
         .then(function (r) {{ return r.json().then(function (b) {{ \
           return {{ok: true, status: r.status, id: r.headers.get('X-Request-Id'), body: b}}; }}); }},\
           function (e) {{ return {{ok: false, error: String(e)}}; }})",
        daemon.addr
    );
    let browser = Browser::launch();
    let before = daemon.manual_runs();

    let tab = browser.open(&format!("http://{}/", listed.addr));
    let got = tab.eval(&call);
    assert_eq!(
        got["ok"], true,
        "the call from a listed origin failed: {got}"
    );
    assert_eq!(got["status"], 200, "{got}");
    assert_eq!(
        got["id"], "browser-req-1",
        "X-Request-Id is echoed and readable: {got}"
    );
    assert_eq!(got["body"]["code"], 200, "{got}");
    assert_eq!(
        got["body"]["data"]["status"],
        "skipped:supabase_not_configured"
    );
    assert_eq!(daemon.manual_runs(), before + 1.0);
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("OPTIONS") && l.contains("sync-to-supabase") && l.contains("204")),
        "the browser sent a preflight: {log}"
    );
    assert_no_exceptions(&tab);

    let tab = browser.open(&format!("http://{}/", unlisted.addr));
    let got = tab.eval(&call);
    assert_eq!(
        got["ok"], false,
        "an unlisted origin read the answer: {got}"
    );
    assert_eq!(
        daemon.manual_runs(),
        before + 1.0,
        "a blocked cross-origin call started a run"
    );
}
