//! The Prometheus registry (SPEC §5). The metric names are a contract with dashboards and the
//! alert rules in `deploy/prometheus/alerts.yml`: change them only together.
//!
//! Every labelled counter starts at zero for every label value it can take, so `rate()` and
//! `increase()` see the first error. `mapsync_target_up` exists only when a target is
//! configured, so a snapshots-only install raises no "target down" alert. Values that depend
//! on the clock (the lag) are brought up to date by [`Metrics::encode`], just before a scrape.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::sync::Trigger;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub trigger: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub code: u16,
}

/// Results of `mapsync_sync_runs_total`.
pub const RUN_RESULTS: [&str; 4] = ["ok", "error", "skipped", "refused"];
/// Results of `mapsync_snapshot_writes_total`.
pub const SNAPSHOT_RESULTS: [&str; 3] = ["ok", "error", "unchanged"];

/// A gauge holding an `f64`.
type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub sync_runs: Family<RunLabels, Counter>,
    pub sync_duration: Histogram,
    pub rows_upserted: Counter,
    pub rows_deleted: Counter,
    pub source_rows: Gauge,
    pub source_rows_skipped: Counter,
    pub pending_changes: Gauge,
    pub last_success: FloatGauge,
    pub sync_lag: FloatGauge,
    /// `None` when no target is configured.
    pub target_up: Option<Gauge>,
    fs_events: Counter,
    pub snapshot_writes: Family<ResultLabel, Counter>,
    pub snapshot_bytes: Gauge,
    pub http_requests: Family<HttpLabels, Counter>,
}

impl Metrics {
    pub fn new(target_configured: bool) -> Metrics {
        let mut registry = Registry::with_prefix("mapsync");
        let m = Metrics {
            sync_runs: Family::default(),
            sync_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            rows_upserted: Counter::default(),
            rows_deleted: Counter::default(),
            source_rows: Gauge::default(),
            source_rows_skipped: Counter::default(),
            pending_changes: Gauge::default(),
            last_success: FloatGauge::default(),
            sync_lag: FloatGauge::default(),
            target_up: target_configured.then(Gauge::default),
            fs_events: Counter::default(),
            snapshot_writes: Family::default(),
            snapshot_bytes: Gauge::default(),
            http_requests: Family::default(),
            registry: Registry::default(),
        };
        for trigger in [
            Trigger::Manual,
            Trigger::Watch,
            Trigger::Schedule,
            Trigger::Startup,
        ] {
            for result in RUN_RESULTS {
                let _ = m.sync_runs.get_or_create(&RunLabels {
                    trigger: trigger.as_str(),
                    result,
                });
            }
        }
        for result in SNAPSHOT_RESULTS {
            let _ = m.snapshot_writes.get_or_create(&ResultLabel { result });
        }
        let r = &mut registry;
        r.register(
            "sync_runs",
            "Sync runs by trigger and result",
            m.sync_runs.clone(),
        );
        r.register(
            "sync_duration_seconds",
            "Duration of sync runs that reached the target",
            m.sync_duration.clone(),
        );
        r.register(
            "rows_upserted",
            "Rows inserted or rewritten in the mirror",
            m.rows_upserted.clone(),
        );
        r.register(
            "rows_deleted",
            "Rows deleted from the mirror",
            m.rows_deleted.clone(),
        );
        r.register(
            "source_rows",
            "Mappings in the SQLite file at the last read",
            m.source_rows.clone(),
        );
        r.register(
            "source_rows_skipped",
            "Distinct SQLite rows skipped (empty scope), each counted once",
            m.source_rows_skipped.clone(),
        );
        r.register(
            "pending_changes",
            "Mappings differing from the mirror as of the last read",
            m.pending_changes.clone(),
        );
        r.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful sync run",
            m.last_success.clone(),
        );
        r.register(
            "sync_lag_seconds",
            "Seconds since the oldest change not yet mirrored (0 when in sync)",
            m.sync_lag.clone(),
        );
        if let Some(up) = &m.target_up {
            r.register(
                "target_up",
                "Whether Postgres answered the last attempt (1) or not (0)",
                up.clone(),
            );
        }
        r.register(
            "fs_events",
            "File-system events on the SQLite file",
            m.fs_events.clone(),
        );
        r.register(
            "snapshot_writes",
            "Snapshot writes by result",
            m.snapshot_writes.clone(),
        );
        r.register(
            "snapshot_bytes",
            "Size of the newest snapshot",
            m.snapshot_bytes.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by route and status code",
            m.http_requests.clone(),
        );
        r.register(
            "build",
            "mapsync build information",
            Info::new(vec![
                ("version", crate::VERSION),
                ("revision", crate::REVISION),
            ]),
        );
        Metrics { registry, ..m }
    }

    /// Counts a finished run.
    pub fn run_finished(&self, trigger: Trigger, result: &'static str) {
        self.sync_runs
            .get_or_create(&RunLabels {
                trigger: trigger.as_str(),
                result,
            })
            .inc();
    }

    /// Brings the file-event counter up to the watcher's running total.
    pub fn set_fs_events(&self, total: u64) {
        let counted = self.fs_events.get();
        if total > counted {
            self.fs_events.inc_by(total - counted);
        }
    }

    /// The OpenMetrics text of every metric, with the lag set to `lag_seconds` first.
    pub fn encode(&self, lag_seconds: f64) -> String {
        self.sync_lag.set(lag_seconds);
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_name_is_exported() {
        let text = Metrics::new(true).encode(0.0);
        for name in [
            "mapsync_sync_runs_total{trigger=\"watch\",result=\"error\"} 0",
            "mapsync_sync_duration_seconds_bucket",
            "mapsync_rows_upserted_total",
            "mapsync_rows_deleted_total",
            "mapsync_source_rows ",
            "mapsync_source_rows_skipped_total",
            "mapsync_pending_changes",
            "mapsync_last_success_timestamp_seconds",
            "mapsync_sync_lag_seconds",
            "mapsync_target_up",
            "mapsync_fs_events_total",
            "mapsync_snapshot_writes_total{result=\"error\"} 0",
            "mapsync_snapshot_bytes",
            "mapsync_build_info{version=",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn target_up_only_exists_with_a_target() {
        assert!(
            !Metrics::new(false)
                .encode(0.0)
                .contains("mapsync_target_up")
        );
    }

    #[test]
    fn fs_events_follow_the_running_total() {
        let m = Metrics::new(false);
        m.set_fs_events(5);
        m.set_fs_events(5);
        m.set_fs_events(7);
        assert!(m.encode(0.0).contains("mapsync_fs_events_total 7"));
    }
}
