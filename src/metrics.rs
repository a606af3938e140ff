//! The Prometheus registry (SPEC §5). The metric names are a contract with dashboards and the
//! alert rules in `deploy/prometheus/alerts.yml`: change them only together.
//!
//! Every labelled counter starts at zero for every label value it can take, so `rate()` and
//! `increase()` see the first error. `mapsync_target_up` and `mapsync_target_rows` exist only
//! when a target is configured, so a snapshots-only install raises no "target down" alert.
//! Values that depend on the clock (the lag, the snapshot's age) are computed by
//! [`Metrics::encode`], just before a scrape; `mapsync_snapshot_age_seconds` is absent until
//! a snapshot is known. The standard `process_*` metrics (no `mapsync_` prefix) are read from
//! `/proc/self` at each scrape; where `/proc` cannot be read they are left out, never faked.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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
pub struct ReasonLabel {
    pub reason: &'static str,
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

/// Why a sync run failed: the `reason` of `mapsync_sync_failures_total`, one per fix an
/// operator would reach for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The SQLite file could not be read.
    Source,
    /// Postgres refused the credentials.
    TargetAuth,
    /// The TLS handshake or the certificate check failed.
    TargetTls,
    /// Postgres could not be reached (DNS, refused, reset).
    TargetNetwork,
    /// Connecting or a statement took longer than its timeout.
    TargetTimeout,
    /// The target table is missing or lacks the expected columns.
    TargetSchema,
    /// The mass-delete guard refused the run.
    MassDelete,
    /// Another instance writes the same table (delete propagation refused).
    OtherInstance,
}

impl FailureReason {
    /// Every reason, in the order of SPEC §5.
    pub const ALL: [FailureReason; 8] = [
        FailureReason::Source,
        FailureReason::TargetAuth,
        FailureReason::TargetTls,
        FailureReason::TargetNetwork,
        FailureReason::TargetTimeout,
        FailureReason::TargetSchema,
        FailureReason::MassDelete,
        FailureReason::OtherInstance,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Source => "source",
            FailureReason::TargetAuth => "target_auth",
            FailureReason::TargetTls => "target_tls",
            FailureReason::TargetNetwork => "target_network",
            FailureReason::TargetTimeout => "target_timeout",
            FailureReason::TargetSchema => "target_schema",
            FailureReason::MassDelete => "mass_delete",
            FailureReason::OtherInstance => "other_instance",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    sync_failures: Family<ReasonLabel, Counter>,
    /// `None` when no target is configured.
    target_rows: Option<Gauge>,
    snapshot_age: Arc<SnapshotAge>,
    /// The `process_*` metrics: a registry without the `mapsync_` prefix.
    process: Registry,
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
            sync_failures: Family::default(),
            target_rows: target_configured.then(Gauge::default),
            snapshot_age: Arc::new(SnapshotAge::default()),
            registry: Registry::default(),
            process: Registry::default(),
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
        for reason in FailureReason::ALL {
            let _ = m.sync_failures.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
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
            "sync_failures",
            "Failed or refused sync runs by reason",
            m.sync_failures.clone(),
        );
        if let Some(rows) = &m.target_rows {
            r.register(
                "target_rows",
                "Rows in the mirror table after the last run that reached it",
                rows.clone(),
            );
        }
        r.register_collector(Box::new(m.snapshot_age.clone()));
        r.register(
            "build",
            "mapsync build information",
            Info::new(vec![
                ("version", crate::VERSION),
                ("revision", crate::REVISION),
            ]),
        );
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector::new()));
        Metrics {
            registry,
            process,
            ..m
        }
    }

    /// Counts a failed or refused run under `reason`.
    pub fn sync_failed(&self, reason: FailureReason) {
        self.sync_failures
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The mirror's row count, as last seen by a run (ignored without a target).
    pub fn set_target_rows(&self, rows: u64) {
        if let Some(g) = &self.target_rows {
            g.set(i64::try_from(rows).unwrap_or(i64::MAX));
        }
    }

    /// When the newest snapshot was written: a write that succeeded, or the newest file found
    /// at start-up. `mapsync_snapshot_age_seconds` counts from it.
    pub fn snapshot_written_at(&self, at: DateTime<Utc>) {
        self.snapshot_age.set(at);
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
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        self.sync_lag.set(lag_seconds);
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail; the collectors report no error of their own.
        let _ = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.process))
            .and_then(|()| encode_eof(&mut out));
        out
    }
}

/// `mapsync_snapshot_age_seconds`, computed at scrape time from when the newest snapshot was
/// written (microseconds since the epoch; [`SnapshotAge::UNKNOWN`] before one is known).
#[derive(Debug)]
struct SnapshotAge(AtomicI64);

impl SnapshotAge {
    const UNKNOWN: i64 = i64::MIN;

    fn set(&self, at: DateTime<Utc>) {
        self.0.store(at.timestamp_micros(), Ordering::Relaxed);
    }

    fn age_seconds(&self, now: DateTime<Utc>) -> Option<f64> {
        let at = self.0.load(Ordering::Relaxed);
        (at != Self::UNKNOWN).then(|| ((now.timestamp_micros() - at) as f64 / 1e6).max(0.0))
    }
}

impl Default for SnapshotAge {
    fn default() -> Self {
        SnapshotAge(AtomicI64::new(Self::UNKNOWN))
    }
}

impl Collector for SnapshotAge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(age) = self.age_seconds(Utc::now()) else {
            return Ok(());
        };
        let gauge = ConstGauge::new(age);
        gauge.encode(encoder.encode_descriptor(
            "snapshot_age_seconds",
            "Seconds since the newest snapshot file was written.",
            None,
            gauge.metric_type(),
        )?)
    }
}

/// The standard `process_*` metrics of the client libraries, read from `/proc/self`.
#[derive(Debug)]
struct ProcessCollector {
    /// Clock ticks per second and the page size (sysconf); 0 when unknown.
    ticks: f64,
    page: u64,
    /// Unix time the process started, fixed at start-up.
    start_time: Option<f64>,
}

impl ProcessCollector {
    fn new() -> ProcessCollector {
        let (ticks, page) = sysconf();
        let start_time = read_stat().and_then(|stat| {
            // starttime is in ticks after boot; boot = now - CLOCK_BOOTTIME (/proc/stat, which
            // has btime, is hidden by the unit's ProcSubset=pid).
            let since_boot = boot_time_elapsed()?;
            let now = Utc::now().timestamp_micros() as f64 / 1e6;
            (ticks > 0.0).then(|| now - since_boot + stat.start_ticks as f64 / ticks)
        });
        ProcessCollector {
            ticks,
            page,
            start_time,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            value: N,
        ) -> Result<(), std::fmt::Error> {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        }
        if let Some(stat) = read_stat() {
            if self.ticks > 0.0 {
                let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / self.ticks);
                cpu.encode(encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds.",
                    None,
                    MetricType::Counter,
                )?)?;
            }
            let e = &mut encoder;
            gauge(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                i64::try_from(stat.vsize).unwrap_or(i64::MAX),
            )?;
            if self.page > 0 {
                gauge(
                    e,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    i64::try_from(stat.rss_pages.saturating_mul(self.page)).unwrap_or(i64::MAX),
                )?;
            }
        }
        if let Some(n) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors.",
                i64::try_from(n).unwrap_or(i64::MAX),
            )?;
        }
        if let Some(n) = max_fds() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                n,
            )?;
        }
        if let Some(t) = self.start_time {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                t,
            )?;
        }
        Ok(())
    }
}

/// The fields of `/proc/self/stat` the process metrics use.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcStat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

fn read_stat() -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// Parses `/proc/<pid>/stat` (proc(5)); the command name in parentheses may hold spaces and
/// parentheses itself, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is index 0 here.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        utime: num(14)?,
        stime: num(15)?,
        start_ticks: num(22)?,
        vsize: num(23)?,
        rss_pages: num(24)?,
    })
}

fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// The soft limit on open files, from `/proc/self/limits` (`i64::MAX` when unlimited).
fn max_fds() -> Option<i64> {
    parse_max_fds(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

fn parse_max_fds(text: &str) -> Option<i64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    match line["Max open files".len()..].split_whitespace().next()? {
        "unlimited" => Some(i64::MAX),
        n => n.parse().ok(),
    }
}

/// Clock ticks per second (as `f64`) and the page size (0 when unknown).
fn sysconf() -> (f64, u64) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf only reads a system constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        (ticks.max(0) as f64, page.max(0) as u64)
    }
    #[cfg(not(target_os = "linux"))]
    (0.0, 0)
}

/// Seconds since boot (CLOCK_BOOTTIME, the clock of `/proc/self/stat`'s starttime).
fn boot_time_elapsed() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec that we own.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
    }
    #[cfg(not(target_os = "linux"))]
    None
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
            "mapsync_sync_failures_total{reason=\"source\"} 0",
            "mapsync_target_rows 0",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }

    /// The value of the one sample named exactly `name` (labels included).
    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_failure_reason_starts_at_zero_and_counts_on_its_own() {
        let m = Metrics::new(true);
        let text = m.encode(0.0);
        for reason in FailureReason::ALL {
            let name = format!("mapsync_sync_failures_total{{reason=\"{reason}\"}}");
            assert_eq!(value(&text, &name), 0.0);
        }
        m.sync_failed(FailureReason::TargetTls);
        m.sync_failed(FailureReason::TargetTls);
        m.sync_failed(FailureReason::MassDelete);
        let text = m.encode(0.0);
        let count = |r: &str| {
            value(
                &text,
                &format!("mapsync_sync_failures_total{{reason=\"{r}\"}}"),
            )
        };
        assert_eq!(count("target_tls"), 2.0);
        assert_eq!(count("mass_delete"), 1.0);
        assert_eq!(count("target_auth"), 0.0);
        let reasons: Vec<&str> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "source",
                "target_auth",
                "target_tls",
                "target_network",
                "target_timeout",
                "target_schema",
                "mass_delete",
                "other_instance"
            ]
        );
    }

    #[test]
    fn target_rows_follow_the_setter_and_need_a_target() {
        let m = Metrics::new(true);
        m.set_target_rows(1234);
        assert_eq!(value(&m.encode(0.0), "mapsync_target_rows"), 1234.0);
        let none = Metrics::new(false);
        none.set_target_rows(5);
        assert!(!none.encode(0.0).contains("mapsync_target_rows"));
    }

    #[test]
    fn snapshot_age_counts_from_the_newest_snapshot_and_is_absent_before_one() {
        let m = Metrics::new(false);
        assert!(
            !m.encode(0.0).contains("mapsync_snapshot_age_seconds"),
            "no snapshot yet, no age"
        );
        m.snapshot_written_at(Utc::now() - chrono::Duration::seconds(90));
        let text = m.encode(0.0);
        let age = value(&text, "mapsync_snapshot_age_seconds");
        assert!((90.0..100.0).contains(&age), "{age}\n{text}");
        assert!(
            text.contains("# TYPE mapsync_snapshot_age_seconds gauge"),
            "{text}"
        );
        // A newer snapshot resets it.
        m.snapshot_written_at(Utc::now());
        assert!(value(&m.encode(0.0), "mapsync_snapshot_age_seconds") < 10.0);
    }

    #[test]
    fn process_metrics_describe_this_process() {
        let text = Metrics::new(false).encode(0.0);
        let rss = value(&text, "process_resident_memory_bytes");
        let vsz = value(&text, "process_virtual_memory_bytes");
        assert!(rss > 1e6 && vsz >= rss, "rss {rss}, vsz {vsz}");
        let fds = value(&text, "process_open_fds");
        assert!(fds >= 3.0, "stdin, stdout, stderr at least: {fds}");
        assert!(value(&text, "process_max_fds") >= fds);
        // CPU time is counted in clock ticks: work until one shows (with a deadline).
        let m = Metrics::new(false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut spin = 0u64;
        while value(&m.encode(0.0), "process_cpu_seconds_total") == 0.0 {
            assert!(std::time::Instant::now() < deadline, "no CPU time counted");
            for i in 0..1_000_000u64 {
                spin = spin.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
            }
        }
        std::hint::black_box(spin);
        let start = value(&text, "process_start_time_seconds");
        let now = Utc::now().timestamp() as f64;
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "a test process started within the hour: {start} vs {now}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "{text}"
        );
        assert!(!text.contains("mapsync_process_"), "no prefix: {text}");
    }

    #[test]
    fn proc_files_are_parsed_field_by_field() {
        // A command name with spaces and a parenthesis, as proc(5) allows.
        let stat = "4242 (map sync) (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 25 0 0 20 0 6 0 987654 123456789 2048 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(ProcStat {
                utime: 150,
                stime: 25,
                start_ticks: 987654,
                vsize: 123456789,
                rss_pages: 2048,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            8192                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(8192));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files"
            ),
            Some(i64::MAX)
        );
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
