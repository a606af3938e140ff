//! `cargo bench --bench sync`: how long `mapsync sync` takes, and how much memory it needs,
//! compared with loading the same rows with `psql \copy`.
//!
//! This is a plain program (`harness = false`). It drives the release binary as a child
//! process, exactly as a user would, against a throwaway PostgreSQL cluster started by the
//! test harness (`tests/it/harness`), and prints Markdown that can be pasted into
//! `docs/PERFORMANCE.md`. Its siblings: `cargo bench --bench daemon` (`mapsync run`) and
//! `cargo bench --bench http` (the admin port).
//!
//! Environment: `MAPSYNC_BENCH_ROWS` (default 100000) source rows, `MAPSYNC_BENCH_REPS`
//! (default 5) repetitions of each measurement.
//!
//! Peak RSS comes from `wait4`; the fixture is generated in a child so that this process's own
//! high-water mark stays small (see `benches/common/mod.rs`), and a measured peak that does not
//! exceed it is shown as an upper bound (`≤`).
//!
//! The one section, [`one_shot_sync`], prints its figures and returns the [`Check`]s that go
//! into the verdict; [`shared::run`] prints the title, the machine table and the verdict. The
//! helpers for timing a child, medians, percentiles and peak RSS live in [`shared::measure`].

// The whole integration-test harness, of which this program uses a part.
#[path = "../tests/it/harness/mod.rs"]
#[allow(dead_code, unused_imports)]
mod common;
// What the three benchmarks share (`benches/common/`); it reaches the harness as `crate::common`.
#[path = "common/mod.rs"]
mod shared;

use std::process::Command;

use common::sys::scrub_pg_env;
use common::workspace::Workspace;
use serde_json::Value;
use shared::measure::{self, Sample, Stats};
use shared::{Bench, Check, fmt_ms};

/// Cold sync may take at most this many times the `\copy` median.
const COLD_VS_COPY: f64 = 1.0;
/// A no-op resync may take at most this many times the `\copy` median.
const NOOP_VS_COPY: f64 = 0.1;
/// A one-shot run after one changed row may take at most this long (median), in ms.
const ONE_ROW_MS: f64 = 150.0;
/// Peak resident set size of one `mapsync sync` process, in MiB.
const MAX_RSS_MIB: f64 = 64.0;
/// The mirrored columns, in the order both the export and the `\copy` use.
const COLUMNS: &str = "id, scope_type, scope_key, name, default_model, candidates, is_active, updated_at, source, metadata";

fn main() {
    shared::run("mapsync benchmark: one-shot sync", || {}, one_shot_sync);
}

impl Bench {
    /// `mapsync --config <workspace config> sync`, ready to spawn.
    fn sync_command(&self) -> Command {
        let mut cmd = common::workspace::command();
        cmd.arg("--config").arg(&self.ws.config).arg("sync");
        cmd
    }

    /// Times one `mapsync sync` and checks its result: exit 0, status `synced`, every row
    /// mirrored and `changed` rows written. Returns the sample and the result JSON.
    fn timed_sync(&self, changed: u64) -> (Sample, Value) {
        let sample = measure::run(&mut self.sync_command());
        sample.expect_success("mapsync sync");
        let report: Value = serde_json::from_str(&sample.stdout)
            .unwrap_or_else(|e| panic!("sync result is not JSON ({e}): {}", sample.stdout));
        assert_eq!(report["status"], "synced", "{report}");
        assert_eq!(report["synced_count"], self.expected_rows(), "{report}");
        assert_eq!(report["changed_count"], changed, "{report}");
        assert_eq!(report["remote_after"], self.expected_rows(), "{report}");
        (sample, report)
    }
}

/// `psql -X -v ON_ERROR_STOP=1 -d <url> -c <command>`, ready to spawn.
fn psql_command(url: &str, command: &str) -> Command {
    let mut cmd = Command::new(common::pg::psql_path());
    scrub_pg_env(&mut cmd);
    cmd.args(["-X", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", command])
        .env("PGCONNECT_TIMEOUT", "10");
    cmd
}

/// Runs a `\copy` and checks that it copied `rows` rows (psql prints `COPY <n>`).
fn run_copy(url: &str, command: &str, rows: u64) -> Sample {
    let sample = measure::run(&mut psql_command(url, command));
    sample.expect_success("psql \\copy");
    assert_eq!(sample.stdout.trim(), format!("COPY {rows}"), "{command}");
    sample
}

// ---------------------------------------------------------------------------------------------
// Section: one-shot sync
// ---------------------------------------------------------------------------------------------

/// `\copy` against cold sync, then no-op resyncs, one-row changes, and the source read on its
/// own. Prints the figures; returns the checks against the targets.
fn one_shot_sync(b: &Bench) -> Vec<Check> {
    println!(
        "## One-shot sync ({} rows, {} repetitions)\n",
        b.rows, b.reps
    );

    // The first cold sync warms the page cache and fills the table the CSV is taken from.
    b.timed_sync(b.expected_rows());
    let import = export_csv(b);
    let (copy, cold) = copy_and_cold_sync(b, &import);
    let noop = repeated_sync(b, "no-op resync", 0, |_| {});
    let id = first_mapping_id(&b.ws);
    let one = repeated_sync(b, "one-row change", 1, |rep| {
        commit_one_change(&b.ws, &id, rep)
    });
    let read = source_read_only(b);

    println!("Result JSON of one run of each kind (the counts are checked on every run):\n");
    for series in [&cold, &noop, &one] {
        println!("- {}: `{}`", series.label, series.reports[0]);
    }
    println!();
    print_figures(&copy, &[&copy, &cold, &noop, &one, &read]);

    vec![
        Check::ratio(&cold, &copy, COLD_VS_COPY),
        Check::ratio(&noop, &copy, NOOP_VS_COPY),
        Check::at_most(&one, ONE_ROW_MS),
        Check::rss(&cold),
        Check::rss(&noop),
        Check::rss(&one),
    ]
}

/// Repetitions of one kind of run.
struct Series {
    label: &'static str,
    samples: Vec<Sample>,
    /// The result JSON of each run (none for `psql`).
    reports: Vec<Value>,
}

impl Series {
    fn new(label: &'static str) -> Series {
        Series {
            label,
            samples: Vec::new(),
            reports: Vec::new(),
        }
    }

    fn add_sync(&mut self, (sample, report): (Sample, Value)) {
        self.samples.push(sample);
        self.reports.push(report);
    }

    fn wall(&self) -> Stats {
        Stats::of(self.samples.iter().map(|s| s.wall_ms))
    }

    /// Median of the `duration_ms` that `mapsync sync` reports (the push to Postgres only).
    fn push_median(&self) -> Option<f64> {
        let pushes: Vec<f64> = self
            .reports
            .iter()
            .filter_map(|r| r["duration_ms"].as_f64())
            .collect();
        (!pushes.is_empty()).then(|| Stats::of(pushes).median)
    }
}

/// Exports the mirrored rows to `rows.csv` in the workspace; returns the `\copy … FROM`
/// command that loads that file.
fn export_csv(b: &Bench) -> String {
    let csv = b.ws.path().join("rows.csv");
    let csv = csv.to_str().expect("a UTF-8 temp path");
    assert!(!csv.contains('\''), "the CSV path must not need quoting");
    let export = format!("\\copy (SELECT {COLUMNS} FROM public.model_mappings) TO '{csv}' CSV");
    run_copy(&b.mirror_url, &export, b.expected_rows());
    format!("\\copy public.model_mappings ({COLUMNS}) FROM '{csv}' CSV")
}

/// `\copy` into `baseline` and cold sync into `mirror`, each after an untimed TRUNCATE and
/// [`Bench::quiesce`], in turns, so that drift on a shared machine affects both alike.
fn copy_and_cold_sync(b: &Bench, import: &str) -> (Series, Series) {
    let mut copy = Series::new("`psql \\copy` into `baseline`");
    let mut cold = Series::new("cold sync");
    for _ in 0..b.reps {
        b.truncate("baseline");
        b.quiesce();
        copy.samples
            .push(run_copy(&b.baseline_url, import, b.expected_rows()));
        b.truncate("mirror");
        b.quiesce();
        cold.add_sync(b.timed_sync(b.expected_rows()));
    }
    (copy, cold)
}

/// `before(rep)` and [`Bench::quiesce`] (not timed), then a timed sync expected to write
/// `changed` rows; repeated.
fn repeated_sync(
    b: &Bench,
    label: &'static str,
    changed: u64,
    mut before: impl FnMut(usize),
) -> Series {
    let mut series = Series::new(label);
    for rep in 0..b.reps {
        before(rep);
        b.quiesce();
        series.add_sync(b.timed_sync(changed));
    }
    series
}

/// `mapsync check` with a config that names no target: start-up plus reading and converting
/// the whole SQLite source, and nothing else. Not a target; it tells a sync's wall time
/// apart into the source side and the Postgres side.
fn source_read_only(b: &Bench) -> Series {
    let config = b.ws.path().join("source-only.toml");
    let toml = format!("[source]\nsqlite_path = {:?}\n", b.ws.db_path());
    std::fs::write(&config, toml).expect("write the source-only config");
    let expected = format!("{} mappings", b.expected_rows());
    let mut series = Series::new("source read only (`mapsync check`, no target)");
    for _ in 0..b.reps {
        let mut cmd = common::workspace::command();
        cmd.arg("--config").arg(&config).arg("check");
        let sample = measure::run(&mut cmd);
        sample.expect_success("mapsync check");
        assert!(sample.stdout.contains(&expected), "{}", sample.stdout);
        series.samples.push(sample);
    }
    series
}

/// The id of one ordinary mapping row of the generated source.
fn first_mapping_id(ws: &Workspace) -> String {
    ws.app
        .value("SELECT id FROM llm_model_mappings WHERE scope_type = 'mapping' ORDER BY id LIMIT 1")
}

/// The application edits row `id` (new name, newer `updated_at`) and commits.
fn commit_one_change(ws: &Workspace, id: &str, rep: usize) {
    let base = chrono::DateTime::parse_from_rfc3339(common::appdb::FIXED_UPDATED_AT)
        .expect("a fixed RFC 3339 time");
    let updated_at = (base + chrono::Duration::minutes(rep as i64 + 1))
        .format("%Y-%m-%dT%H:%M:%S+00:00")
        .to_string();
    let changed = ws
        .app
        .conn()
        .execute(
            "UPDATE llm_model_mappings SET name = ?1, updated_at = ?2 WHERE id = ?3",
            rusqlite::params![format!("Benchmark edit {rep}"), updated_at, id],
        )
        .expect("the application's update");
    assert_eq!(changed, 1, "one row updated");
}

/// The figures table (wall clock, ratio to `reference`'s median, the push alone, peak RSS,
/// CPU time), then every wall time.
fn print_figures(reference: &Series, runs: &[&Series]) {
    println!(
        "| run | wall min | wall median | wall max | median ÷ `\\copy` | push (`duration_ms`, median) | peak RSS (max) | CPU user+sys (median) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let reference = reference.wall().median;
    for series in runs {
        let wall = series.wall();
        let cpu = Stats::of(series.samples.iter().map(|s| s.cpu_ms));
        println!(
            "| {} | {} | {} | {} | {:.2}× | {} | {} | {} |",
            series.label,
            fmt_ms(wall.min),
            fmt_ms(wall.median),
            fmt_ms(wall.max),
            wall.median / reference,
            series.push_median().map_or("—".into(), fmt_ms),
            measure::peak_rss(&series.samples),
            fmt_ms(cpu.median),
        );
    }
    println!(
        "\nWall clock: the whole child process (start-up, SQLite read, connection, push, exit); \
         not timed: the TRUNCATE before `\\copy` and cold sync, and the `VACUUM ANALYZE` + \
         `CHECKPOINT` before every timed run. Push: what `mapsync sync` reports \
         as `duration_ms` (the Postgres side only). Peak RSS and CPU: the client process only \
         (`mapsync` or `psql`), from `wait4`; the server's work is in neither. A peak shown as \
         `≤ x` did not exceed the benchmark process's own resident high-water mark, which \
         Linux carries into each child at exec: the child's real peak is at most that.\n\nEvery wall time, in run \
         order (ms):\n"
    );
    for series in runs {
        let all: Vec<String> = series
            .samples
            .iter()
            .map(|s| format!("{:.0}", s.wall_ms))
            .collect();
        println!("- {}: {}", series.label, all.join(", "));
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// Checks against a `\copy`
// ---------------------------------------------------------------------------------------------

impl Check {
    /// `run`'s median wall time ≤ `limit` × `reference`'s.
    fn ratio(run: &Series, reference: &Series, limit: f64) -> Check {
        let (value, base) = (run.wall().median, reference.wall().median);
        let ratio = value / base;
        Check {
            target: format!("{} ≤ {limit}× `\\copy`", run.label),
            measured: format!(
                "{} vs {} = {ratio:.2}× (limit {})",
                fmt_ms(value),
                fmt_ms(base),
                fmt_ms(limit * base)
            ),
            met: ratio <= limit,
        }
    }

    /// `run`'s median wall time ≤ `limit_ms`.
    fn at_most(run: &Series, limit_ms: f64) -> Check {
        let value = run.wall().median;
        Check {
            target: format!("{} ≤ {}", run.label, fmt_ms(limit_ms)),
            measured: format!("{} (median of {})", fmt_ms(value), run.samples.len()),
            met: value <= limit_ms,
        }
    }

    /// The largest peak RSS of `run` ≤ [`MAX_RSS_MIB`].
    fn rss(run: &Series) -> Check {
        let peak = measure::peak_rss(&run.samples);
        Check {
            target: format!("peak RSS, {} ≤ {MAX_RSS_MIB} MiB", run.label),
            measured: format!("{peak} (largest of {} runs)", run.samples.len()),
            met: peak.mib() <= MAX_RSS_MIB,
        }
    }
}
