//! SPEC §5 through a real Prometheus: the daemon (`mapsync run`, the real binary) is scraped
//! every second by Debian's `prometheus`, and every assertion reads the values back through
//! Prometheus's HTTP API — so a wrong `Content-Type`, a malformed exposition or a renamed
//! metric fails here even if `/metrics` looks fine to a human.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::daemon::Daemon;
use crate::harness::prometheus::{Prometheus, prometheus_path};
use crate::harness::workspace::{SUPABASE_ROLES_SHIM, Workspace, remote_count, supabase_db};
use crate::harness::*;
use serde_json::Value;

const ROWS: usize = 37;
/// Scrapes every second; a couple of them plus the daemon's work fit well inside this.
const WAIT: Duration = Duration::from_secs(60);

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits until Prometheus reports the daemon's target healthy; returns the target.
fn wait_target_up(prom: &Prometheus, daemon: SocketAddr) -> Value {
    let mut last = Vec::new();
    if crate::harness::sys::poll_until(WAIT, || {
        last = prom.active_targets();
        last.len() == 1 && last[0]["health"] == "up"
    }) {
        return last.remove(0);
    }
    panic!(
        "Prometheus never scraped {daemon} successfully; targets: {last:#?}\nPrometheus log:\n{}",
        prom.log()
    );
}

#[test]
fn prometheus_scrapes_every_spec_metric_with_the_right_values() {
    prometheus_path(); // fails with the install command before anything is started
    let started = now_secs();
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    for i in 0..ROWS {
        ws.app
            .upsert(&Row::mapping(&format!("p{i:03}"), "gpt-4o-mini"));
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    let daemon = Daemon::start(
        &ws,
        Some(&db.url),
        "[watch]\ndebounce_ms = 50\nmax_delay_ms = 500\n",
    );
    let status = daemon.wait_first_run();
    assert_eq!(status["last_run"]["status"], "synced", "{status:#}");
    assert_eq!(remote_count(&db), ROWS as u64);

    let prom = Prometheus::start(&[daemon.addr]);
    let target = wait_target_up(&prom, daemon.addr);
    assert_eq!(target["lastError"], "", "{target:#}");
    assert_eq!(
        target["scrapeUrl"],
        format!("http://{}/metrics", daemon.addr),
        "{target:#}"
    );
    assert_eq!(target["labels"]["job"], "mapsync");
    prom.wait_value(r#"up{job="mapsync"}"#, WAIT, |v| v == 1.0);
    prom.wait_value(r#"scrape_samples_scraped{job="mapsync"}"#, WAIT, |v| {
        v > 30.0
    });

    // The start-up run, as Prometheus stored it.
    prom.wait_value(
        r#"mapsync_sync_runs_total{trigger="startup",result="ok"}"#,
        WAIT,
        |v| v >= 1.0,
    );
    // Every trigger × result pair exists from the start (so rate() sees the first error).
    let runs = prom.query("mapsync_sync_runs_total");
    assert_eq!(runs.len(), 4 * 4, "{runs:#?}");
    for trigger in ["manual", "watch", "schedule", "startup"] {
        for result in ["ok", "error", "skipped", "refused"] {
            assert!(
                runs.iter()
                    .any(|s| s.labels["trigger"] == trigger && s.labels["result"] == result),
                "no mapsync_sync_runs_total{{trigger={trigger},result={result}}}: {runs:#?}"
            );
        }
    }
    assert_eq!(
        prom.value(r#"mapsync_sync_runs_total{trigger="startup",result="error"}"#),
        Some(0.0)
    );
    let rows = ROWS as f64;
    prom.wait_value("mapsync_source_rows", WAIT, |v| v == rows);
    prom.wait_value("mapsync_rows_upserted_total", WAIT, |v| v == rows);
    assert_eq!(prom.value("mapsync_rows_deleted_total"), Some(0.0));
    assert_eq!(prom.value("mapsync_source_rows_skipped_total"), Some(0.0));
    prom.wait_value("mapsync_target_up", WAIT, |v| v == 1.0);
    let last_success = prom.wait_value("mapsync_last_success_timestamp_seconds", WAIT, |v| v > 0.0);
    assert!(
        last_success >= started - 1.0 && last_success <= now_secs() + 1.0,
        "mapsync_last_success_timestamp_seconds = {last_success}, test started at {started}"
    );
    prom.wait_value("mapsync_sync_lag_seconds", WAIT, |v| v == 0.0);
    prom.wait_value("mapsync_pending_changes", WAIT, |v| v == 0.0);
    let version = env!("CARGO_PKG_VERSION");
    prom.wait_value(
        &format!(r#"mapsync_build_info{{version="{version}"}}"#),
        WAIT,
        |v| v == 1.0,
    );
    prom.wait_value(r#"mapsync_snapshot_writes_total{result="ok"}"#, WAIT, |v| {
        v >= 1.0
    });
    assert_eq!(
        prom.value(r#"mapsync_snapshot_writes_total{result="error"}"#),
        Some(0.0)
    );
    prom.wait_value("mapsync_snapshot_bytes", WAIT, |v| v > 0.0);
    // The start-up snapshot is minutes old at most.
    prom.wait_value("mapsync_snapshot_age_seconds", WAIT, |v| {
        (0.0..600.0).contains(&v)
    });

    // Why runs failed: every reason exists from the start (so increase() sees the first one),
    // and none has happened.
    let failures = prom.query("mapsync_sync_failures_total");
    let mut reasons: Vec<&str> = failures
        .iter()
        .map(|s| s.labels["reason"].as_str().unwrap_or_default())
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            "mass_delete",
            "other_instance",
            "source",
            "target_auth",
            "target_network",
            "target_schema",
            "target_timeout",
            "target_tls"
        ],
        "{failures:#?}"
    );
    assert!(failures.iter().all(|s| s.value == 0.0), "{failures:#?}");
    assert_eq!(
        prom.query("mapsync_target_rows").len(),
        1,
        "a target, a row count"
    );

    // The daemon's own process: started during this test, holding memory and descriptors.
    let process_start = prom.wait_value("process_start_time_seconds", WAIT, |v| v > 0.0);
    assert!(
        process_start >= started - 1.0 && process_start <= now_secs() + 1.0,
        "process_start_time_seconds = {process_start}, test started at {started}"
    );
    prom.wait_value("process_resident_memory_bytes", WAIT, |v| v > 1e6);
    prom.wait_value("process_virtual_memory_bytes", WAIT, |v| v > 1e6);
    let fds = prom.wait_value("process_open_fds", WAIT, |v| v >= 3.0);
    prom.wait_value("process_max_fds", WAIT, |v| v >= fds);
    prom.wait_value("process_cpu_seconds_total", WAIT, |v| v > 0.0);
    // Scrape n counts scrapes 1..n-1: after a few scrapes /metrics has a 200 series.
    prom.wait_value(
        r#"mapsync_http_requests_total{route="/metrics",code="200"}"#,
        WAIT,
        |v| v >= 1.0,
    );
    let count = prom.wait_value("mapsync_sync_duration_seconds_count", WAIT, |v| v >= 1.0);
    assert_eq!(
        prom.value(r#"mapsync_sync_duration_seconds_bucket{le="+Inf"}"#),
        Some(count),
        "the +Inf bucket holds every observation"
    );
    assert!(
        prom.value("mapsync_sync_duration_seconds_sum")
            .is_some_and(|s| s > 0.0),
        "a sync takes some time"
    );

    // The types Prometheus learnt from the exposition.
    let meta = prom.api(&format!(
        "/api/v1/targets/metadata?match_target={}",
        crate::harness::sys::url_encode(r#"{job="mapsync"}"#)
    ));
    let type_of = |metric: &str| -> Option<String> {
        meta.as_array()?
            .iter()
            .find(|m| m["metric"] == metric)
            .and_then(|m| m["type"].as_str())
            .map(str::to_string)
    };
    for (metric, kind) in [
        ("mapsync_sync_runs", "counter"),
        ("mapsync_sync_duration_seconds", "histogram"),
        ("mapsync_source_rows", "gauge"),
        ("mapsync_sync_lag_seconds", "gauge"),
        ("mapsync_fs_events", "counter"),
        ("mapsync_http_requests", "counter"),
        ("mapsync_build", "info"),
        ("mapsync_sync_failures", "counter"),
        ("mapsync_target_rows", "gauge"),
        ("mapsync_snapshot_age_seconds", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(
            type_of(metric).as_deref(),
            Some(kind),
            "type of {metric}; metadata: {meta:#}"
        );
    }

    // An application commit: the watcher counts file events, and the change is mirrored.
    let events_before = prom.wait_value("mapsync_fs_events_total", WAIT, |v| v >= 0.0);
    ws.app.upsert(&Row::mapping("added-by-the-app", "o4-mini"));
    prom.wait_value("mapsync_fs_events_total", WAIT, |v| v > events_before);
    prom.wait_value("mapsync_source_rows", WAIT, |v| v == rows + 1.0);
    prom.wait_value("mapsync_rows_upserted_total", WAIT, |v| v == rows + 1.0);
    prom.wait_value(
        r#"mapsync_sync_runs_total{trigger="watch",result="ok"}"#,
        WAIT,
        |v| v >= 1.0,
    );
    prom.wait_value("mapsync_pending_changes", WAIT, |v| v == 0.0);
    prom.wait_value("mapsync_sync_lag_seconds", WAIT, |v| v == 0.0);
    assert_eq!(remote_count(&db), ROWS as u64 + 1);

    // Still healthy after all of that.
    let target = wait_target_up(&prom, daemon.addr);
    assert_eq!(target["lastError"], "", "{target:#}");
}

#[test]
fn a_snapshots_only_daemon_has_no_target_up_and_counts_skipped_runs() {
    prometheus_path();
    let ws = Workspace::new(None, "");
    for i in 0..5 {
        ws.app.upsert(&Row::mapping(&format!("s{i}"), "gpt-4o"));
    }
    let daemon = TestApp::spawn(&ws, None, "");
    daemon.wait_first_run();
    let prom = Prometheus::start(&[daemon.addr]);
    let target = wait_target_up(&prom, daemon.addr);
    assert_eq!(target["lastError"], "", "{target:#}");
    prom.wait_value(
        r#"mapsync_sync_runs_total{trigger="startup",result="skipped"}"#,
        WAIT,
        |v| v >= 1.0,
    );
    prom.wait_value("mapsync_source_rows", WAIT, |v| v == 5.0);
    // No target, no "target down" alert: the series does not exist at all.
    assert!(
        prom.query("mapsync_target_up").is_empty(),
        "mapsync_target_up exists without a target"
    );
    assert!(
        prom.query(r#"{__name__=~"mapsync_.*"}"#).len() > 20,
        "the rest of the metrics are there"
    );
    prom.wait_value("mapsync_rows_upserted_total", WAIT, |v| v == 0.0);
    prom.wait_value(r#"mapsync_snapshot_writes_total{result="ok"}"#, WAIT, |v| {
        v >= 1.0
    });
}

#[test]
fn an_outage_shows_as_target_down_pending_changes_and_growing_lag() {
    prometheus_path();
    // A dedicated cluster: stopping the shared one would break other tests.
    let cluster = PgCluster::start();
    let name = cluster.create_db();
    let url = cluster.superuser_url(&name);
    run_psql(&url, SUPABASE_ROLES_SHIM).expect("roles shim");
    let ws = Workspace::new(Some(&url), "");
    for i in 0..10 {
        ws.app.upsert(&Row::mapping(&format!("o{i}"), "gpt-4o"));
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    // The whole [target] section here, to shorten the retry back-off.
    let daemon = TestApp::spawn(
        &ws,
        None,
        &format!(
            "[target]\nurl = {url:?}\nretry_max = 2\nconnect_timeout_ms = 1000\n\n\
             [watch]\ndebounce_ms = 50\nmax_delay_ms = 500\n"
        ),
    );
    assert_eq!(daemon.wait_first_run()["last_run"]["status"], "synced");
    let prom = Prometheus::start(&[daemon.addr]);
    wait_target_up(&prom, daemon.addr);
    prom.wait_value("mapsync_target_up", WAIT, |v| v == 1.0);
    let first_success =
        prom.wait_value("mapsync_last_success_timestamp_seconds", WAIT, |v| v > 0.0);

    cluster.stop();
    ws.app.upsert(&Row::mapping("during-the-outage", "o4-mini"));
    prom.wait_value("mapsync_target_up", WAIT, |v| v == 0.0);
    prom.wait_value(
        r#"mapsync_sync_runs_total{trigger="watch",result="error"}"#,
        WAIT,
        |v| v >= 1.0,
    );
    prom.wait_value("mapsync_pending_changes", WAIT, |v| v == 1.0);
    prom.wait_value("mapsync_source_rows", WAIT, |v| v == 11.0);
    // The lag grows while the change waits (scraped values, not a single reading).
    let lag = prom.wait_value("mapsync_sync_lag_seconds", WAIT, |v| v >= 2.0);
    prom.wait_value("mapsync_sync_lag_seconds", WAIT, |v| v > lag);
    assert_eq!(
        prom.value("mapsync_last_success_timestamp_seconds"),
        Some(first_success),
        "no success during the outage"
    );
    // The scrape itself never failed: the admin port does not depend on Postgres. (The daemon
    // was serving before Prometheus started, so every sample of `up` counts.)
    assert_eq!(
        prom.value(r#"min_over_time(up{job="mapsync"}[10m])"#),
        Some(1.0),
        "a scrape failed during the outage"
    );

    cluster.start_again();
    prom.wait_value("mapsync_target_up", WAIT, |v| v == 1.0);
    prom.wait_value("mapsync_pending_changes", WAIT, |v| v == 0.0);
    prom.wait_value("mapsync_sync_lag_seconds", WAIT, |v| v == 0.0);
    prom.wait_value("mapsync_rows_upserted_total", WAIT, |v| v == 11.0);
    prom.wait_value("mapsync_last_success_timestamp_seconds", WAIT, |v| {
        v > first_success
    });
    let remote = cluster.psql(&name, "SELECT count(*) FROM public.model_mappings");
    assert_eq!(remote.trim(), "11");
}
