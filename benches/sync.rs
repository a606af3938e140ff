//! `cargo bench --bench sync`: how long `mapsync sync` takes, and how much memory it needs,
//! compared with loading the same rows with `psql \copy`.
//!
//! This is a plain program (`harness = false`). It drives the release binary as a child
//! process, exactly as a user would, against a throwaway PostgreSQL cluster started by the
//! test harness (`tests/it/harness`), and prints Markdown that can be pasted into
//! `docs/PERFORMANCE.md`.
//!
//! Environment: `MAPSYNC_BENCH_ROWS` (default 100000) source rows, `MAPSYNC_BENCH_REPS`
//! (default 5) repetitions of each measurement (the daemon section makes 40 single-row changes
//! and idles 12 s per repetition), `MAPSYNC_BENCH_SECTIONS` (default `sync,daemon,http,flood`)
//! the sections to run.
//!
//! Peak RSS comes from `wait4`. Linux starts a child's `ru_maxrss` at its parent's resident
//! high-water mark (exec records the peak of the address space it replaces), so this process
//! keeps its own small: the fixture is generated in a child (this program again, with
//! [`GENERATE_ENV`]), and a measured peak that does not exceed this process's `VmHWM` is
//! shown as an upper bound (`≤`).
//!
//! Each section is one function called from `main` with its own heading; it prints its
//! figures and returns the [`Check`]s that go into the final verdict. The helpers for timing
//! a child, medians, percentiles, peak RSS and reading `/proc` live in [`measure`].
//!
//! The daemon sections run `mapsync run` ([`common::daemon::Daemon`]) on the same source; they
//! rewrite the workspace's config, so they come after the one-shot section.

// The whole integration-test harness, of which this program uses a part.
#[path = "../tests/it/harness/mod.rs"]
#[allow(dead_code, unused_imports)]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::PgCluster;
use common::admin::Admin;
use common::daemon::Daemon;
use common::sys::scrub_pg_env;
use common::workspace::Workspace;
use measure::{Sample, Stats};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Cold sync may take at most this many times the `\copy` median.
const COLD_VS_COPY: f64 = 1.0;
/// A no-op resync may take at most this many times the `\copy` median.
const NOOP_VS_COPY: f64 = 0.1;
/// A one-shot run after one changed row may take at most this long (median), in ms.
const ONE_ROW_MS: f64 = 150.0;
/// Peak resident set size of one `mapsync sync` process, in MiB.
const MAX_RSS_MIB: f64 = 64.0;
/// The daemon's resident set at rest with every mapping held, in MiB.
const DAEMON_RSS_MIB: f64 = 32.0;
/// The daemon's resident high-water mark, in MiB.
const DAEMON_PEAK_MIB: f64 = 40.0;
/// Prompt-scoped mappings in the generated source (each becomes one mirrored row).
const PROMPTS: usize = 3;
/// Set (to the SQLite path) in the environment of the child that generates the fixture.
const GENERATE_ENV: &str = "MAPSYNC_BENCH_GENERATE";
/// The mirrored columns, in the order both the export and the `\copy` use.
const COLUMNS: &str = "id, scope_type, scope_key, name, default_model, candidates, is_active, updated_at, source, metadata";

fn main() {
    let rows = env_usize("MAPSYNC_BENCH_ROWS", 100_000);
    let reps = env_usize("MAPSYNC_BENCH_REPS", 5);
    if let Some(path) = std::env::var_os(GENERATE_ENV) {
        common::generate(Path::new(&path), rows, PROMPTS, true);
        return;
    }
    assert!(
        rows > 0 && reps > 0,
        "rows and repetitions must be positive"
    );

    let sections = sections_from_env();
    if sections.contains(&"http") && common::sys::which("wrk").is_none() {
        eprintln!("{NO_WRK}");
        std::process::exit(1);
    }

    println!("# mapsync benchmark\n");
    let bench = Bench::setup(rows, reps);
    print_machine(&bench.cluster);

    let mut checks = Vec::new();
    if sections.contains(&"sync") {
        checks.extend(one_shot_sync(&bench));
    }
    if sections.contains(&"daemon") {
        // The idle measurement continues with the daemon the latency section leaves running.
        let (daemon, latency) = daemon_latency(&bench);
        checks.extend(latency);
        checks.extend(daemon_idle(&bench, daemon));
        checks.extend(daemon_restart(&bench));
    }
    if sections.contains(&"http") {
        checks.extend(http_port(&bench));
    }
    if sections.contains(&"flood") {
        checks.extend(http_flood(&bench));
    }

    print_verdict(&checks);
    println!("\nLoad average at the end: {}.", load_average());
    println!(
        "The benchmark's own resident high-water mark, below which no child's peak RSS can \
         read: {:.1} MiB.",
        measure::own_peak_rss_kib() as f64 / 1024.0
    );
}

/// What the sections share: a cluster with the `mirror` and `baseline` databases (same
/// table), and a workspace whose generated SQLite file and config point at `mirror`.
/// Dropping it stops the cluster and removes both directories.
struct Bench {
    rows: usize,
    reps: usize,
    ws: Workspace,
    mirror_url: String,
    baseline_url: String,
    cluster: PgCluster,
}

impl Bench {
    fn setup(rows: usize, reps: usize) -> Bench {
        eprintln!("setting up: PostgreSQL cluster, {rows}-row SQLite source…");
        let cluster = PgCluster::start();
        for db in ["mirror", "baseline"] {
            cluster.psql("postgres", &format!("CREATE DATABASE {db}"));
        }
        let mirror_url = cluster.superuser_url("mirror");
        let baseline_url = cluster.superuser_url("baseline");

        let ws = Workspace::new(Some(&mirror_url), "");
        generate_in_child(&ws.db_path(), rows);
        ws.mapsync(&["migrate"]).expect_code(0);
        apply_schema_scripts(&baseline_url);
        assert_eq!(
            table_shape(&cluster, "mirror"),
            table_shape(&cluster, "baseline"),
            "mirror and baseline must have the same table, indexes, triggers and RLS"
        );
        Bench {
            rows,
            reps,
            ws,
            mirror_url,
            baseline_url,
            cluster,
        }
    }

    /// Mirrored rows after a full sync: every source row plus the prompt mappings.
    fn expected_rows(&self) -> u64 {
        (self.rows + PROMPTS) as u64
    }

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

    /// Empties the table in `db` (not timed).
    fn truncate(&self, db: &str) {
        self.cluster.psql(db, "TRUNCATE public.model_mappings");
    }

    /// `mapsync run` on the workspace's source, mirroring into `db` (migrated first with
    /// `mapsync migrate`), once its start-up run has synced every row and a snapshot exists.
    /// Rewrites the workspace's config.
    fn start_daemon(&self, db: &str) -> Daemon {
        let url = self.cluster.superuser_url(db);
        self.ws.write_config(Some(&url), DAEMON_TOML);
        self.ws.mapsync(&["migrate"]).expect_code(0);
        let d = Daemon::start(&self.ws, Some(&url), DAEMON_TOML);
        let status = d.wait_status(Duration::from_secs(120), "the start-up run", |s| {
            !s["last_run"].is_null() && !s["snapshot"]["newest"].is_null()
        });
        let run = &status["last_run"];
        assert_eq!(run["status"], "synced", "{status:#}");
        assert_eq!(run["synced_count"], self.expected_rows(), "{status:#}");
        assert_eq!(run["remote_after"], self.expected_rows(), "{status:#}");
        d
    }

    /// `VACUUM ANALYZE` of the table in `db`, then a `CHECKPOINT` (see [`Bench::quiesce`]).
    fn settle(&self, db: &str) {
        self.cluster
            .psql(db, "VACUUM ANALYZE public.model_mappings");
        self.cluster.psql("postgres", "CHECKPOINT");
    }

    /// Brings the server to rest before a timed run (not timed): `VACUUM ANALYZE` of both
    /// tables, so that no autovacuum of the previous load runs during the measurement (and a
    /// resync meets a table in the settled state a long-running mirror is in), then a
    /// `CHECKPOINT`, so that none falls inside it.
    fn quiesce(&self) {
        for db in ["mirror", "baseline"] {
            self.cluster
                .psql(db, "VACUUM ANALYZE public.model_mappings");
        }
        self.cluster.psql("postgres", "CHECKPOINT");
    }
}

/// Writes the `rows`-row fixture into `path` from a child process (this program, re-run with
/// [`GENERATE_ENV`]): building it takes tens of MiB, which would otherwise become this
/// process's peak RSS and so the floor of every child's.
fn generate_in_child(path: &Path, rows: usize) {
    let status = Command::new(std::env::current_exe().expect("the benchmark's own path"))
        .env(GENERATE_ENV, path)
        .env("MAPSYNC_BENCH_ROWS", rows.to_string())
        .status()
        .expect("spawn the fixture generator");
    assert!(status.success(), "generating the fixture failed: {status}");
}

/// Applies `sql/001` and `sql/002` from this repository with `psql -f`, as an admin would.
fn apply_schema_scripts(url: &str) {
    let sql = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    for script in ["001_model_mappings.sql", "002_security.sql"] {
        let text = std::fs::read_to_string(sql.join(script)).expect("read a sql/ script");
        common::run_psql(url, &text).unwrap_or_else(|e| panic!("{script} failed: {e}"));
    }
}

/// Indexes, triggers and the RLS flag of `public.model_mappings` in `db`, for comparison.
fn table_shape(cluster: &PgCluster, db: &str) -> String {
    cluster.psql(
        db,
        "SELECT string_agg(d, E'\\n' ORDER BY d) FROM ( \
           SELECT indexdef AS d FROM pg_indexes WHERE tablename = 'model_mappings' \
           UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger \
             WHERE tgrelid = 'public.model_mappings'::regclass AND NOT tgisinternal \
           UNION ALL SELECT 'rls ' || relrowsecurity FROM pg_class \
             WHERE oid = 'public.model_mappings'::regclass) s",
    )
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
        .conn()
        .query_row(
            "SELECT id FROM llm_model_mappings WHERE scope_type = 'mapping' ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("the source has a mapping row")
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

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

// ---------------------------------------------------------------------------------------------
// Sections: the daemon (`mapsync run`)
// ---------------------------------------------------------------------------------------------

/// `watch.debounce_ms` of the measured daemons (also in [`DAEMON_TOML`]).
const DEBOUNCE_MS: f64 = 50.0;
/// The p99 of commit-to-visible may exceed the debounce by this much.
const LATENCY_OVER_DEBOUNCE_MS: f64 = 50.0;
/// Single-row changes per repetition (5 repetitions: 200 changes).
const CHANGES_PER_REP: usize = 40;
/// Idle time per repetition (5 repetitions: 60 s).
const IDLE_PER_REP: Duration = Duration::from_secs(12);
/// CPU time the idle daemon may use per minute.
const IDLE_CPU_MS_PER_MIN: f64 = 50.0;
/// PostgreSQL 15 backends flush their statistics at most 10 s after going idle: the wait
/// before each reading of `pg_stat_database`.
const STATS_FLUSH: Duration = Duration::from_secs(12);
/// The database the latency and idle sections mirror into.
const DAEMON_DB: &str = "daemon";
/// The measured daemons' config: a 50 ms debounce, and schedules that never fire while the
/// benchmark runs, so that only the file watcher and `POST /sync` start runs.
const DAEMON_TOML: &str = "[watch]\ndebounce_ms = 50\nmax_delay_ms = 2000\n\n\
                           [schedule]\nreconcile = \"0 0 0 1 1 *\"\nsnapshot = \"0 0 0 1 1 *\"\n";

/// The daemon on the whole source, mirroring into a fresh database: single-row changes, each
/// its own burst, from the application's commit to the row being visible in Postgres. Returns
/// the daemon, still running, for [`daemon_idle`].
fn daemon_latency(b: &Bench) -> (Daemon, Vec<Check>) {
    let changes = CHANGES_PER_REP * b.reps;
    println!(
        "## Daemon: commit-to-Postgres latency ({} rows, {changes} single-row changes)\n",
        b.rows
    );
    b.cluster
        .psql("postgres", &format!("CREATE DATABASE {DAEMON_DB}"));
    let d = b.start_daemon(DAEMON_DB);
    b.settle(DAEMON_DB);
    let pg = PgPoller::connect(&b.cluster.superuser_url(DAEMON_DB));
    let pid = d.child.id();
    let rss_after_startup = measure::status_kib(&pid.to_string(), "VmRSS");
    let (before, cpu_before, log_before) = (Scrape::of(&d), measure::cpu_ms(pid), d.log().len());

    eprintln!("latency: {changes} changes…");
    let mut rng = Rng::from_clock();
    let candidates = mirrored_id_count(&b.ws);
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        let id = nth_mirrored_id(&b.ws, rng.below(candidates));
        let name = format!("Latency probe {i}");
        rename(&b.ws, &id, &name);
        let committed = Instant::now();
        let seen = pg
            .wait_for_name(&id, &name, Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!(
                    "change {i} of {id} not in Postgres after 10 s:\n{}",
                    d.log()
                )
            });
        latencies.push(ms(seen - committed));
        std::thread::sleep(Duration::from_millis(100 + rng.below(201)));
    }
    let cpu = measure::cpu_ms(pid) - cpu_before;
    let after = Scrape::of(&d);
    let runs = watch_run_durations(&d.log()[log_before..]);

    // Every change was one watch run that wrote one row, and nothing else ran.
    let delta = |key: &str| after.get(key) - before.get(key);
    let ok_runs = r#"mapsync_sync_runs_total{trigger="watch",result="ok"}"#;
    assert_eq!(delta(ok_runs), changes as f64, "watch runs:\n{}", d.log());
    assert_eq!(delta("mapsync_rows_upserted_total"), changes as f64);
    assert_eq!(delta("mapsync_sync_duration_seconds_count"), changes as f64);
    assert_eq!(
        runs.len(),
        changes,
        "`sync run` lines in the log:\n{}",
        d.log()
    );
    assert_eq!(pg.count(), b.expected_rows(), "rows in the mirror");
    drop(pg);

    // The log has one run per change, in order.
    let rest: Vec<f64> = latencies
        .iter()
        .zip(&runs)
        .map(|(latency, run)| latency - DEBOUNCE_MS - run)
        .collect();
    let lat = Percentiles::of(&latencies);
    println!("| per change | min | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| commit → row visible in Postgres | {lat} |");
    println!(
        "| the daemon's run (`duration_ms` in its log) | {} |",
        Percentiles::of(&runs)
    );
    println!(
        "| the rest: latency − {DEBOUNCE_MS} ms debounce − run | {} |",
        Percentiles::of(&rest)
    );
    println!(
        "\nEach change: the application renames one random row (`UPDATE … SET name, updated_at`, \
         autocommit, WAL); t0 is taken when the statement returns; a persistent connection \
         polls `SELECT name … WHERE id = $1` every 1 ms until the new name shows; then a \
         pause of 100–300 ms, so that every change is a burst of its own. The rest is the file \
         event, waking up, the commit's way to the poll, and the poll's 1 ms; it is negative \
         when the file event (SQLite's write to the WAL) came before the statement returned \
         (after the WAL's fsync), which starts the debounce early. The mirror was \
         `VACUUM ANALYZE`d after the start-up run.\n"
    );
    print_histogram(&before, &after);
    println!(
        "\nOver the section the daemon wrote {} snapshot files of {:.1} MiB (all {} mappings \
         each) and used {} of CPU time ({} per change). Its VmRSS after the start-up run \
         (cold sync and first snapshot), before the changes: {:.1} MiB.\n",
        delta(r#"mapsync_snapshot_writes_total{result="ok"}"#),
        after.get("mapsync_snapshot_bytes") / 1024.0 / 1024.0,
        b.expected_rows(),
        fmt_ms(cpu),
        fmt_ms(cpu / changes as f64),
        rss_after_startup as f64 / 1024.0,
    );

    let limit = DEBOUNCE_MS + LATENCY_OVER_DEBOUNCE_MS;
    let check = Check {
        target: format!(
            "daemon: commit-to-visible p99 ≤ {limit} ms (debounce {DEBOUNCE_MS} ms + {LATENCY_OVER_DEBOUNCE_MS} ms)"
        ),
        measured: format!(
            "{} over {changes} changes (p50 {}, max {})",
            fmt_ms(lat.p99),
            fmt_ms(lat.p50),
            fmt_ms(lat.max)
        ),
        met: lat.p99 <= limit,
    };
    (d, vec![check])
}

/// The daemon left running by [`daemon_latency`], with nothing to do: its CPU time, whether
/// it touches Postgres, and its memory with every mapping held.
fn daemon_idle(b: &Bench, mut d: Daemon) -> Vec<Check> {
    let window = IDLE_PER_REP * b.reps as u32;
    println!(
        "## Daemon at rest ({} mappings held, {} s without a commit)\n",
        b.expected_rows(),
        window.as_secs()
    );
    let pid = d.child.id();
    eprintln!("idle: {} s…", (STATS_FLUSH * 2 + window).as_secs());
    // Autovacuum's workers visit every database once per naptime, and their transactions
    // count in pg_stat_database: paused until the last reading.
    set_autovacuum(b, false);
    // The last snapshot write ends, and every backend flushes its statistics.
    std::thread::sleep(STATS_FLUSH);
    let (xacts_before, sessions_before) = (daemon_db_xacts(b), mapsync_sessions(b));
    let cpu_before = measure::cpu_ms(pid);
    let started = Instant::now();
    std::thread::sleep(window);
    let cpu = measure::cpu_ms(pid) - cpu_before;
    let elapsed = started.elapsed();
    let (rss, hwm) = (
        measure::status_kib(&pid.to_string(), "VmRSS"),
        measure::status_kib(&pid.to_string(), "VmHWM"),
    );
    // Anything the daemon did in the window is flushed to the statistics by now.
    std::thread::sleep(STATS_FLUSH);
    let (xacts_after, sessions_after) = (daemon_db_xacts(b), mapsync_sessions(b));
    set_autovacuum(b, true);
    let (status, _) = d.stop(Duration::from_secs(10));
    assert!(
        status.success(),
        "mapsync run exited with {status}:\n{}",
        d.log()
    );
    assert!(
        !sessions_before.is_empty(),
        "the daemon holds no Postgres session"
    );

    let (rss, hwm) = (rss as f64 / 1024.0, hwm as f64 / 1024.0);
    let per_min = cpu * 60.0 / elapsed.as_secs_f64();
    let cpu_limit = IDLE_CPU_MS_PER_MIN * elapsed.as_secs_f64() / 60.0;
    let xacts = xacts_after - xacts_before;
    println!("| measured over the idle window | value |");
    println!("|---|---:|");
    println!("| window | {:.1} s |", elapsed.as_secs_f64());
    println!(
        "| daemon CPU time (user + system, `/proc/<pid>/stat`) | {} ({} per minute) |",
        fmt_ms(cpu),
        fmt_ms(per_min)
    );
    println!(
        "| transactions in the `{DAEMON_DB}` database (`xact_commit + xact_rollback`) | {xacts} |"
    );
    println!(
        "| `mapsync` sessions whose `state_change` moved | {} of {} |",
        changed_sessions(&sessions_before, &sessions_after),
        sessions_before.len()
    );
    println!("| VmRSS at the end of the window | {rss:.1} MiB |");
    println!(
        "| VmHWM (peak since start: start-up run, {} changes, snapshots) | {hwm:.1} MiB |",
        CHANGES_PER_REP * b.reps
    );
    println!(
        "\n`pg_stat_database` and `pg_stat_activity` are read from the `postgres` database, \
         {} s after the last change and again {} s after the window, so that every backend \
         has flushed its statistics; nothing connects to `{DAEMON_DB}` in between, and \
         autovacuum is off from the first reading's wait to the second reading (its workers \
         visit every database once a minute). Sessions before: {}.\n",
        STATS_FLUSH.as_secs(),
        STATS_FLUSH.as_secs(),
        sessions_before.join("; ")
    );

    vec![
        Check {
            target: format!("daemon idle: CPU ≤ {IDLE_CPU_MS_PER_MIN} ms per minute"),
            measured: format!(
                "{} in {:.0} s (limit {})",
                fmt_ms(cpu),
                elapsed.as_secs_f64(),
                fmt_ms(cpu_limit)
            ),
            met: cpu <= cpu_limit,
        },
        Check {
            target: "daemon idle: no Postgres transaction".into(),
            measured: format!(
                "{xacts} transactions; {} of {} sessions active",
                changed_sessions(&sessions_before, &sessions_after),
                sessions_before.len()
            ),
            met: xacts == 0 && sessions_before == sessions_after,
        },
        Check {
            target: format!(
                "daemon RSS with {} mappings held ≤ {DAEMON_RSS_MIB} MiB",
                b.expected_rows()
            ),
            measured: format!("{rss:.1} MiB (VmRSS)"),
            met: rss <= DAEMON_RSS_MIB,
        },
        Check {
            target: format!("daemon peak RSS ≤ {DAEMON_PEAK_MIB} MiB"),
            measured: format!("{hwm:.1} MiB (VmHWM)"),
            met: hwm <= DAEMON_PEAK_MIB,
        },
    ]
}

/// `mapsync run` started again on the mirror and the snapshots the measured daemon left (what
/// every restart of the service meets): its memory once the start-up run is done.
fn daemon_restart(b: &Bench) -> Vec<Check> {
    println!(
        "## Daemon restart beside its snapshots ({} mappings)\n",
        b.expected_rows()
    );
    eprintln!("restart…");
    let d = b.start_daemon(DAEMON_DB);
    // The start-up run is over; what follows it (the snapshot decision) gets a moment.
    std::thread::sleep(Duration::from_secs(2));
    let pid = d.child.id().to_string();
    let (rss, hwm) = (
        measure::status_kib(&pid, "VmRSS") as f64 / 1024.0,
        measure::status_kib(&pid, "VmHWM") as f64 / 1024.0,
    );
    stop_daemon(d);
    println!("| after the start-up run | value |");
    println!("|---|---:|");
    println!("| VmRSS | {rss:.1} MiB |");
    println!("| VmHWM | {hwm:.1} MiB |\n");
    vec![Check {
        target: format!(
            "daemon peak RSS on a restart beside its snapshots ≤ {DAEMON_PEAK_MIB} MiB"
        ),
        measured: format!("{hwm:.1} MiB (VmHWM)"),
        met: hwm <= DAEMON_PEAK_MIB,
    }]
}

/// Turns autovacuum on or off on the whole cluster.
fn set_autovacuum(b: &Bench, on: bool) {
    let setting = if on {
        "RESET autovacuum"
    } else {
        "SET autovacuum = off"
    };
    b.cluster.psql(
        "postgres",
        &format!("ALTER SYSTEM {setting}; SELECT pg_reload_conf()"),
    );
}

/// Commit + rollback count of [`DAEMON_DB`], read from the `postgres` database so that the
/// reading itself is not counted.
fn daemon_db_xacts(b: &Bench) -> i64 {
    b.cluster
        .psql(
            "postgres",
            &format!(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database \
                 WHERE datname = '{DAEMON_DB}'"
            ),
        )
        .trim()
        .parse()
        .expect("a transaction count")
}

/// `pid state state_change` of each session the daemon holds on [`DAEMON_DB`].
fn mapsync_sessions(b: &Bench) -> Vec<String> {
    b.cluster
        .psql(
            "postgres",
            &format!(
                "SELECT pid || ' ' || state || ' ' || state_change FROM pg_stat_activity \
                 WHERE datname = '{DAEMON_DB}' AND application_name = 'mapsync' ORDER BY pid"
            ),
        )
        .lines()
        .map(str::to_string)
        .collect()
}

fn changed_sessions(before: &[String], after: &[String]) -> usize {
    before.iter().filter(|s| !after.contains(s)).count()
}

/// `duration_ms` of every watch run the daemon logged (it logs runs that wrote something).
fn watch_run_durations(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("sync run") && l.contains("trigger=\"watch\""))
        .map(|l| {
            l.split("duration_ms=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no duration_ms in {l:?}"))
        })
        .collect()
}

/// How many of the source's rows the daemon mirrors under their own id: `mapping` and `user`
/// rows (a legacy `tenant` row gets a new id), the rows [`nth_mirrored_id`] picks from.
fn mirrored_id_count(ws: &Workspace) -> u64 {
    ws.app
        .conn()
        .query_row(
            "SELECT count(*) FROM llm_model_mappings WHERE scope_type IN ('mapping', 'user')",
            [],
            |r| r.get(0),
        )
        .expect("count the source's rows")
}

fn nth_mirrored_id(ws: &Workspace, n: u64) -> String {
    ws.app
        .conn()
        .query_row(
            "SELECT id FROM llm_model_mappings WHERE scope_type IN ('mapping', 'user') \
             LIMIT 1 OFFSET ?1",
            [n],
            |r| r.get(0),
        )
        .expect("a source row")
}

/// The application renames row `id` and stamps `updated_at`, in one autocommitted statement.
fn rename(ws: &Workspace, id: &str, name: &str) {
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string();
    let changed = ws
        .app
        .conn()
        .execute(
            "UPDATE llm_model_mappings SET name = ?1, updated_at = ?2 WHERE id = ?3",
            rusqlite::params![name, now, id],
        )
        .expect("the application's update");
    assert_eq!(changed, 1, "one row renamed");
}

/// Prints how the runs between two scrapes fall into `mapsync_sync_duration_seconds`'s
/// buckets, and their mean.
fn print_histogram(before: &Scrape, after: &Scrape) {
    let buckets = |s: &Scrape| -> Vec<(f64, f64)> {
        s.0.iter()
            .filter_map(|(k, v)| {
                let le = k
                    .strip_prefix("mapsync_sync_duration_seconds_bucket{le=\"")?
                    .strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect()
    };
    let (old, new) = (buckets(before), buckets(after));
    assert_eq!(old.len(), new.len(), "the same buckets in both scrapes");
    println!("`mapsync_sync_duration_seconds` (from `/metrics`) over these runs:\n");
    println!("| run duration | runs |");
    println!("|---|---:|");
    let (mut lower, mut below) = (0.0, 0.0);
    for ((le, b), (_, a)) in old.iter().zip(&new) {
        let cumulative = a - b;
        if cumulative > below {
            let upper = if le.is_finite() {
                format!("{:.0} ms", le * 1000.0)
            } else {
                "∞".into()
            };
            println!("| {:.0}–{upper} | {} |", lower * 1000.0, cumulative - below);
        }
        (lower, below) = (*le, cumulative);
    }
    let delta = |key: &str| after.get(key) - before.get(key);
    let count = delta("mapsync_sync_duration_seconds_count");
    let sum = delta("mapsync_sync_duration_seconds_sum");
    println!(
        "\n{count} runs, mean {} (`_sum` ÷ `_count`).",
        fmt_ms(sum * 1000.0 / count)
    );
}

// ---------------------------------------------------------------------------------------------
// Section: the HTTP admin port
// ---------------------------------------------------------------------------------------------

/// `/livez` p99 and `/metrics` scrape time limit.
const HTTP_P99_MS: f64 = 5.0;
/// A sync under `/livez` load may take this much longer than without.
const MAX_SLOWDOWN: f64 = 0.10;
/// The `/livez` load, in requests per second.
const LIVEZ_RATE: f64 = 1000.0;
/// wrk's connections, each waiting [`PACE_MS`] after every answer: about [`LIVEZ_RATE`].
/// (10 connections give about 930/s: each cycle takes the answer's 0.3 ms and about 0.4 ms
/// of timer lateness on top of the pause.)
const WRK_CONNECTIONS: u32 = 11;
const PACE_MS: u32 = 10;
/// How long wrk drives `/livez` alone.
const LIVEZ_ALONE: Duration = Duration::from_secs(10);
/// How long wrk runs before a loaded sync starts.
const LEAD_IN: Duration = Duration::from_millis(300);
/// Sequential `/metrics` scrapes.
const SCRAPES: usize = 200;
const NO_WRK: &str = "wrk not found: install it with `apt-get install -y wrk`";

/// The daemon's admin port with every mapping held: `/livez` under a paced wrk load, alone
/// and while a full sync runs; the sync with and without that load; `/metrics` scrapes.
fn http_port(b: &Bench) -> Vec<Check> {
    println!(
        "## HTTP admin port ({} rows, wrk at {WRK_CONNECTIONS} connections × 1 request per {PACE_MS} ms)\n",
        b.rows
    );
    let d = b.start_daemon("mirror");
    let script = b.ws.path().join("pace.lua");
    std::fs::write(
        &script,
        format!("-- Each connection waits {PACE_MS} ms after every answer.\nfunction delay()\n  return {PACE_MS}\nend\n"),
    )
    .expect("write the wrk script");
    let livez = format!("http://{}/livez", d.addr);
    let wrk = |duration| Wrk::start(&script, &livez, duration);

    eprintln!(
        "http: /livez alone, then {} syncs with and without load…",
        b.reps
    );
    let (daemon_cpu, wrk_cpu) = (measure::cpu_ms(d.child.id()), measure::children_cpu_ms());
    let alone = wrk(LIVEZ_ALONE).finish();
    // wrk is the only child reaped meanwhile.
    let daemon_cpu = measure::cpu_ms(d.child.id()) - daemon_cpu;
    let wrk_cpu = measure::children_cpu_ms() - wrk_cpu;
    assert!(
        alone.rate >= 0.95 * LIVEZ_RATE,
        "wrk did not reach its pace:\n{}",
        alone.output
    );
    let (mut quiet, mut loaded, mut during) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..b.reps {
        // In turns, and each first every other time, so that drift affects both alike.
        for with_load in [rep % 2 == 1, rep % 2 == 0] {
            b.truncate("mirror");
            b.quiesce();
            if !with_load {
                quiet.push(cold_manual_sync(b, &d));
                continue;
            }
            // wrk runs from just before the request until the sync's answer, then stops.
            let load = wrk(Duration::from_secs(600));
            std::thread::sleep(LEAD_IN);
            loaded.push(cold_manual_sync(b, &d));
            during.push(load.stop());
        }
    }
    let scrapes: Vec<f64> = (0..SCRAPES)
        .map(|_| {
            let started = Instant::now();
            let reply = common::http::get(d.addr, "/metrics", None);
            let took = ms(started.elapsed());
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert!(
                reply.text().contains("mapsync_build_info"),
                "{}",
                reply.text()
            );
            took
        })
        .collect();
    stop_daemon(d);

    println!(
        "`/livez` under wrk (`-t1 -c{WRK_CONNECTIONS} --latency`, a Lua `delay()` of {PACE_MS} ms per connection):\n"
    );
    println!("| when | requests | achieved req/s | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| alone, {} s | {alone} |", LIVEZ_ALONE.as_secs());
    for (i, w) in during.iter().enumerate() {
        println!("| during sync {} | {w} |", i + 1);
    }
    let (quiet_ms, loaded_ms) = (
        Stats::of(quiet.iter().copied()),
        Stats::of(loaded.iter().copied()),
    );
    let slowdown = loaded_ms.median / quiet_ms.median - 1.0;
    let core_share = |cpu: f64| cpu / ms(LIVEZ_ALONE) * 100.0;
    println!(
        "\nDuring a sync, wrk ran from {} ms before `POST /sync` until its answer. wrk's latency \
         is from sending a request to its answer; the pause is not in it. The load alone cost \
         the daemon {:.1} % of one core and wrk {:.1} % (CPU time over the {} s run).\n",
        LEAD_IN.as_millis(),
        core_share(daemon_cpu),
        core_share(wrk_cpu),
        LIVEZ_ALONE.as_secs()
    );
    println!("Cold full sync by `POST /sync` after a `TRUNCATE` (its `duration_ms`):\n");
    println!("| sync | min | median | max | every run |");
    println!("|---|---:|---:|---:|---|");
    for (label, stats, all) in [
        ("no load", &quiet_ms, &quiet),
        ("wrk on `/livez`", &loaded_ms, &loaded),
    ] {
        let all: Vec<String> = all.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "| {label} | {} | {} | {} | {} |",
            fmt_ms(stats.min),
            fmt_ms(stats.median),
            fmt_ms(stats.max),
            all.join(", ")
        );
    }
    println!("\nSlowdown of the median: {:+.1} %.\n", slowdown * 100.0);
    let scrape = Percentiles::of(&scrapes);
    println!(
        "`/metrics`: {SCRAPES} sequential GETs, each on a fresh connection (connect, request, `Connection: close`):\n"
    );
    println!("| | min | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| `GET /metrics` | {scrape} |\n");

    let worst = during.iter().map(|w| w.p99).fold(0.0, f64::max);
    vec![
        Check {
            target: format!("HTTP: `/livez` p99 < {HTTP_P99_MS} ms at {LIVEZ_RATE} req/s"),
            measured: format!("{} at {:.0} req/s", fmt_ms(alone.p99), alone.rate),
            met: alone.p99 < HTTP_P99_MS,
        },
        Check {
            target: format!(
                "HTTP: `/livez` p99 < {HTTP_P99_MS} ms during a {}-row sync",
                b.rows
            ),
            measured: format!("worst of {} syncs: {}", during.len(), fmt_ms(worst)),
            met: worst < HTTP_P99_MS,
        },
        Check {
            target: format!(
                "HTTP: sync under `/livez` load ≤ {:.0} % slower",
                MAX_SLOWDOWN * 100.0
            ),
            measured: format!(
                "{} vs {} = {:+.1} %",
                fmt_ms(loaded_ms.median),
                fmt_ms(quiet_ms.median),
                slowdown * 100.0
            ),
            met: slowdown <= MAX_SLOWDOWN,
        },
        Check {
            target: format!("HTTP: `/metrics` scrape < {HTTP_P99_MS} ms"),
            measured: format!(
                "p99 {}, median {} over {SCRAPES}",
                fmt_ms(scrape.p99),
                fmt_ms(scrape.p50)
            ),
            met: scrape.p99 < HTTP_P99_MS,
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Section: the HTTP admin port under hostile clients (issue 9)
// ---------------------------------------------------------------------------------------------

/// `/livez` p99 under [`SLOW_CLIENTS`] slow clients.
const FLOOD_P99_MS: f64 = 100.0;
/// Slow clients sending a never-ending head, one byte each every [`SLOW_EVERY`],
/// reconnecting when cut off.
const SLOW_CLIENTS: usize = 500;
const SLOW_EVERY: Duration = Duration::from_millis(50);
/// `/livez` probes while they run, one every [`PROBE_EVERY`], each on a new connection.
const PROBES: usize = 400;
const PROBE_EVERY: Duration = Duration::from_millis(25);
/// Connections trickling declared 60000-byte bodies, one byte each every [`TRICKLE_EVERY`],
/// for [`TRICKLE_FOR`] (longer than the 10 s body deadline).
const TRICKLERS: usize = 200;
const TRICKLE_EVERY: Duration = Duration::from_millis(10);
const TRICKLE_FOR: Duration = Duration::from_secs(15);
/// Resident memory the trickle may add, in MiB.
const TRICKLE_MAX_MIB: f64 = 32.0;

/// The admin port with every mapping held, under clients from loopback: 500 slow clients
/// reconnecting and sending heads byte by byte (`/livez` latency meanwhile), then 200
/// connections trickling bodies (the daemon's RSS meanwhile).
fn http_flood(b: &Bench) -> Vec<Check> {
    println!(
        "## HTTP admin port under hostile clients ({} rows held)\n",
        b.rows
    );
    let d = b.start_daemon("mirror");
    let pid = d.child.id();
    let quiet: Vec<f64> = (0..PROBES / 4).map(|_| probe_ms(&d)).collect();

    eprintln!("flood: {SLOW_CLIENTS} slow clients, {PROBES} /livez probes…");
    let limit = Duration::from_secs(60);
    let floods: Vec<_> = (0..4)
        .map(|_| common::flood::slow_heads(d.addr, SLOW_CLIENTS / 4, SLOW_EVERY, limit))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let slow: Vec<f64> = (0..PROBES)
        .map(|_| {
            std::thread::sleep(PROBE_EVERY);
            probe_ms(&d)
        })
        .collect();
    let connects = common::flood::stop_all(floods).connects;

    eprintln!("flood: {TRICKLERS} trickled bodies for {TRICKLE_FOR:?}…");
    std::thread::sleep(Duration::from_secs(2));
    let idle = common::flood::rss_kib(pid);
    let half = TRICKLERS / 2;
    let trickles = [
        common::flood::trickle(
            d.addr,
            half,
            "POST",
            "/api/v1/llm/model-groups/sync",
            TRICKLE_EVERY,
            TRICKLE_FOR,
        ),
        common::flood::trickle(d.addr, half, "GET", "/livez", TRICKLE_EVERY, TRICKLE_FOR),
    ];
    let started = Instant::now();
    let mut peak = idle;
    let mut during = Vec::new();
    while started.elapsed() < TRICKLE_FOR {
        peak = peak.max(common::flood::rss_kib(pid));
        during.push(probe_ms(&d));
        std::thread::sleep(Duration::from_millis(100));
    }
    let trickled = common::flood::stop_all(trickles).bytes;
    stop_daemon(d);

    let (quiet, slow, during) = (
        Percentiles::of(&quiet),
        Percentiles::of(&slow),
        Percentiles::of(&during),
    );
    println!("`/livez`, each probe on a new connection (connect, `GET`, read to the close):\n");
    println!("| when | probes | min | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| no other client | {} | {quiet} |", PROBES / 4);
    println!(
        "| {SLOW_CLIENTS} slow clients (one head byte each per {} ms, reconnecting; {connects} connections in all) | {PROBES} | {slow} |",
        SLOW_EVERY.as_millis()
    );
    println!(
        "| {TRICKLERS} trickled bodies | {} | {during} |\n",
        (TRICKLE_FOR.as_millis() / 100)
    );
    let grew = (peak as f64 - idle as f64) / 1024.0;
    println!(
        "RSS under {TRICKLERS} connections declaring 60000-byte bodies and sending one byte each \
         per {} ms for {} s ({trickled} bytes in all; half to the sync route, which reads \
         bodies, half to `/livez`): {:.1} MiB before, {:.1} MiB at the peak (+{grew:.1} MiB).\n",
        TRICKLE_EVERY.as_millis(),
        TRICKLE_FOR.as_secs(),
        idle as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    vec![
        Check {
            target: format!(
                "HTTP: `/livez` p99 < {FLOOD_P99_MS:.0} ms under {SLOW_CLIENTS} slow clients"
            ),
            measured: format!("{} (max {})", fmt_ms(slow.p99), fmt_ms(slow.max)),
            met: slow.p99 < FLOOD_P99_MS,
        },
        Check {
            target: format!(
                "HTTP: RSS + ≤ {TRICKLE_MAX_MIB:.0} MiB under {TRICKLERS} trickled bodies"
            ),
            measured: format!("+{grew:.1} MiB"),
            met: grew <= TRICKLE_MAX_MIB,
        },
    ]
}

/// Stops a daemon with SIGTERM; it must exit 0.
fn stop_daemon(mut d: Daemon) {
    let (status, _) = d.stop(Duration::from_secs(10));
    assert!(
        status.success(),
        "mapsync run exited with {status}:\n{}",
        d.log()
    );
}

/// One `/livez` probe's time in ms; a probe that gets no 200 within 10 s stops the
/// benchmark.
fn probe_ms(d: &Daemon) -> f64 {
    match common::flood::probe(d.addr, Duration::from_secs(10)) {
        Some((200, took)) => ms(took),
        other => panic!("/livez did not answer: {other:?}\n{}", d.log()),
    }
}

/// `POST /sync` into an emptied mirror; checks that it wrote every row and returns its
/// `duration_ms`.
fn cold_manual_sync(b: &Bench, d: &Daemon) -> f64 {
    let reply = d.post("/sync", b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json()["data"].clone();
    assert_eq!(report["status"], "synced", "{report}");
    assert_eq!(report["trigger"], "manual", "{report}");
    assert_eq!(report["remote_before"], 0, "{report}");
    assert_eq!(report["changed_count"], b.expected_rows(), "{report}");
    assert_eq!(report["remote_after"], b.expected_rows(), "{report}");
    report["duration_ms"].as_f64().expect("duration_ms")
}

/// A running `wrk` with the pacing script; killed if dropped unfinished.
struct Wrk {
    child: std::process::Child,
}

/// What wrk printed, and the figures taken from it (latencies in ms).
struct WrkReport {
    output: String,
    requests: u64,
    rate: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Wrk {
    fn start(script: &Path, url: &str, duration: Duration) -> Wrk {
        let child = Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{WRK_CONNECTIONS}"),
                &format!("-d{}s", duration.as_secs()),
            ])
            .args(["--latency", "-s"])
            .arg(script)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn wrk");
        Wrk { child }
    }

    /// Waits for the end of its run.
    fn finish(mut self) -> WrkReport {
        let status = self.child.wait().expect("wait for wrk");
        self.report(status)
    }

    /// Stops it now (on SIGINT wrk ends its run and reports).
    fn stop(mut self) -> WrkReport {
        let (status, _) =
            common::sys::signal_and_wait(&mut self.child, libc::SIGINT, Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("wrk did not stop on SIGINT"));
        self.report(status)
    }

    fn report(&mut self, status: std::process::ExitStatus) -> WrkReport {
        let mut output = String::new();
        std::io::Read::read_to_string(
            &mut self.child.stdout.take().expect("piped stdout"),
            &mut output,
        )
        .expect("read wrk's output");
        assert!(status.success(), "wrk failed ({status}):\n{output}");
        WrkReport::parse(output)
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl WrkReport {
    /// Reads wrk's `--latency` report; panics on any error or non-2xx answer it counted.
    fn parse(output: String) -> WrkReport {
        assert!(
            !output.contains("Socket errors") && !output.contains("Non-2xx"),
            "wrk saw errors:\n{output}"
        );
        let line = |prefix: &str| -> Vec<&str> {
            output
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} line in wrk's output:\n{output}"))
                .split_whitespace()
                .collect()
        };
        let percentile = |p: &str| wrk_ms(line(p)[1]);
        let requests = output
            .lines()
            .find_map(|l| l.trim().split_once(" requests in ")?.0.parse().ok())
            .unwrap_or_else(|| panic!("no request count in wrk's output:\n{output}"));
        WrkReport {
            requests,
            rate: line("Requests/sec:")[1].parse().expect("requests/s"),
            p50: percentile("50%"),
            p90: percentile("90%"),
            p99: percentile("99%"),
            max: wrk_ms(line("Latency ")[3]),
            output,
        }
    }
}

impl std::fmt::Display for WrkReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} | {:.0} | {} | {} | {} | {}",
            self.requests,
            self.rate,
            fmt_ms(self.p50),
            fmt_ms(self.p90),
            fmt_ms(self.p99),
            fmt_ms(self.max)
        )
    }
}

/// A wrk duration (`163.00us`, `1.38ms`, `2.01s`) in ms.
fn wrk_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or_else(|| panic!("no unit in {text:?}"));
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().unwrap_or_else(|e| panic!("{text:?}: {e}"));
    match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => panic!("unknown unit in {text:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers of the daemon sections
// ---------------------------------------------------------------------------------------------

/// A persistent connection to a mirror database (tokio-postgres on a current-thread runtime,
/// which drives the connection while a query waits).
struct PgPoller {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    select_name: tokio_postgres::Statement,
}

impl PgPoller {
    fn connect(url: &str) -> PgPoller {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (client, connection) = rt
            .block_on(tokio_postgres::connect(url, tokio_postgres::NoTls))
            .expect("connect to the mirror");
        rt.spawn(connection);
        let select_name = rt
            .block_on(client.prepare("SELECT name FROM public.model_mappings WHERE id = $1"))
            .expect("prepare the poll");
        PgPoller {
            rt,
            client,
            select_name,
        }
    }

    /// Polls row `id` every millisecond until its name is `name`; returns when the answer
    /// that showed it arrived, or `None` after `timeout`.
    fn wait_for_name(&self, id: &str, name: &str, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        self.rt.block_on(async {
            loop {
                let row = self
                    .client
                    .query_opt(&self.select_name, &[&id])
                    .await
                    .expect("poll the mirror");
                let now = Instant::now();
                if row.and_then(|r| r.get::<_, Option<String>>(0)).as_deref() == Some(name) {
                    return Some(now);
                }
                if now >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    fn count(&self) -> u64 {
        let row = self
            .rt
            .block_on(
                self.client
                    .query_one("SELECT count(*) FROM public.model_mappings", &[]),
            )
            .expect("count the mirror");
        row.get::<_, i64>(0) as u64
    }
}

/// One scrape of a daemon's `/metrics`: each sample's name with its labels, and its value.
struct Scrape(Vec<(String, f64)>);

impl Scrape {
    fn of(d: &Daemon) -> Scrape {
        let reply = d.get("/metrics");
        assert_eq!(reply.status, 200, "{}", reply.text());
        let samples = reply
            .text()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_string(), value.parse().ok()?))
            })
            .collect();
        Scrape(samples)
    }

    /// The value of sample `key` (e.g. `mapsync_rows_upserted_total`); 0 when absent.
    fn get(&self, key: &str) -> f64 {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map_or(0.0, |(_, v)| *v)
    }
}

/// Min, p50, p90, p99 and max of some measurements in ms; displayed as table cells.
struct Percentiles {
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(values: &[f64]) -> Percentiles {
        let p = |q| measure::percentile(values, q);
        Percentiles {
            min: p(0.0),
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            max: p(100.0),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cells: Vec<String> = [self.min, self.p50, self.p90, self.p99, self.max]
            .into_iter()
            .map(fmt_ms)
            .collect();
        f.write_str(&cells.join(" | "))
    }
}

/// xorshift64*, seeded from the clock: which rows change, and the pauses between changes.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970");
        Rng(now.as_nanos() as u64 | 1)
    }

    /// Uniform enough in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Verdict
// ---------------------------------------------------------------------------------------------

/// One target and what was measured against it.
struct Check {
    target: String,
    measured: String,
    met: bool,
}

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

fn print_verdict(checks: &[Check]) {
    println!("## Verdict\n");
    println!("| target | measured | met |");
    println!("|---|---|---|");
    for c in checks {
        let met = if c.met { "yes" } else { "**NO**" };
        println!("| {} | {} | {met} |", c.target, c.measured);
    }
    let missed = checks.iter().filter(|c| !c.met).count();
    println!(
        "\n{} of {} targets met.",
        checks.len() - missed,
        checks.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Machine and build
// ---------------------------------------------------------------------------------------------

fn print_machine(cluster: &PgCluster) {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown".to_string(), |(_, v)| v.trim().to_string());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let pg = cluster.psql("postgres", "SHOW server_version");

    println!("## Machine\n");
    println!("| | |\n|---|---|");
    println!("| CPU | {cpu} |");
    println!("| cores | {cores} |");
    println!("| RAM | {:.1} GiB |", mem_kib / 1024.0 / 1024.0);
    println!(
        "| kernel | Linux {} |",
        read("/proc/sys/kernel/osrelease").trim()
    );
    println!(
        "| PostgreSQL | {pg} (throwaway cluster on 127.0.0.1, `fsync = off`, `synchronous_commit = off`, `full_page_writes = off`, `shared_buffers = 32MB`) |"
    );
    println!("| mapsync commit | {} |", mapsync_commit());
    println!("| load average at start | {} |", load_average());
    println!();
}

/// `git rev-parse --short HEAD` of this checkout ("unknown" outside one), plus the files under
/// src/ and sql/ and the manifest that differ from it, tracked or not, and a hash of that
/// state (which tells two dirty trees apart).
fn mapsync_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let paths = ["--", "src", "sql", "Cargo.toml", "Cargo.lock"];
    let status = git(&[
        &["status", "--porcelain", "--untracked-files=all"][..],
        &paths,
    ]
    .concat())
    .unwrap_or_default();
    if status.trim().is_empty() {
        return head.trim().to_string();
    }
    let diff = git(&[&["diff", "HEAD"][..], &paths].concat()).unwrap_or_default();
    let hash: String = Sha256::digest(format!("{status}{diff}").as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let files: Vec<&str> = status.lines().filter_map(|l| l.get(3..)).collect();
    format!(
        "{} + uncommitted changes to {} (state sha256 {hash}…)",
        head.trim(),
        files.join(", ")
    )
}

/// The 1, 5 and 15 minute load averages (the machine may be shared with builds).
fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The sections named in `MAPSYNC_BENCH_SECTIONS` (a comma list), in run order; all of them
/// when unset.
fn sections_from_env() -> Vec<&'static str> {
    const ALL: [&str; 4] = ["sync", "daemon", "http", "flood"];
    let Ok(list) = std::env::var("MAPSYNC_BENCH_SECTIONS") else {
        return ALL.to_vec();
    };
    let named: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for name in &named {
        assert!(
            ALL.contains(name),
            "MAPSYNC_BENCH_SECTIONS: unknown section {name:?} (sections: {})",
            ALL.join(", ")
        );
    }
    ALL.into_iter().filter(|s| named.contains(s)).collect()
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a count: {e}")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring a child process
// ---------------------------------------------------------------------------------------------

/// Timing one child process (wall clock, peak RSS and CPU time from `wait4`), and statistics.
mod measure {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    /// One finished child process.
    pub struct Sample {
        /// From just before spawn to the moment it was reaped.
        pub wall_ms: f64,
        /// `ru_maxrss` of this child, in KiB: its own peak, or [`Sample::floor_kib`] if that
        /// is larger (see [`peak_rss`]).
        pub max_rss_kib: u64,
        /// This process's `VmHWM` when it spawned the child, in KiB (see [`peak_rss`]).
        pub floor_kib: u64,
        /// User plus system CPU time of this child alone.
        pub cpu_ms: f64,
        /// Exit code, or `None` when killed by a signal.
        pub code: Option<i32>,
        pub stdout: String,
        pub stderr: String,
    }

    impl Sample {
        /// Panics, showing what the child printed, unless it exited 0.
        pub fn expect_success(&self, what: &str) {
            assert_eq!(
                self.code,
                Some(0),
                "{what} failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout,
                self.stderr
            );
        }
    }

    /// Runs `cmd` to completion (stdin closed, output captured) and reaps it with `wait4`, so
    /// the resource usage is that one child's.
    #[allow(
        clippy::zombie_processes,
        reason = "the child is reaped by wait4, which Child::wait cannot replace"
    )]
    pub fn run(cmd: &mut Command) -> Sample {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let floor_kib = own_peak_rss_kib();
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn the measured command");
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || read_all(stderr));
        let stdout = read_all(child.stdout.take().expect("piped stdout"));
        let (status, usage) = wait4(pid);
        let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        Sample {
            wall_ms,
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            floor_kib,
            cpu_ms: timeval_ms(usage.ru_utime) + timeval_ms(usage.ru_stime),
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            stdout,
            stderr: stderr.join().expect("the stderr reader"),
        }
    }

    fn read_all(mut r: impl Read) -> String {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Blocks until child `pid` exits; returns its wait status and resource usage.
    fn wait4(pid: libc::pid_t) -> (libc::c_int, libc::rusage) {
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain old data, for which all-zero bytes are a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: both pointers are to live locals of the right types; `pid` is our own
            // child, spawned above and not reaped by anyone else (Child::wait is never called).
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if r == pid {
                return (status, usage);
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                panic!("wait4({pid}) failed: {err}");
            }
        }
    }

    fn timeval_ms(t: libc::timeval) -> f64 {
        t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0
    }

    /// The high-water mark of this process's resident memory (`VmHWM` in /proc/self/status),
    /// in KiB. A child spawned now starts its `ru_maxrss` at this value: exec records the
    /// peak of the address space it replaces, which is this one (vfork) or a copy (fork).
    /// `getrusage(RUSAGE_SELF)` would not do: it includes what cargo passed on to us.
    pub fn own_peak_rss_kib() -> u64 {
        status_kib("self", "VmHWM")
    }

    /// User plus system CPU time of this process's reaped children so far
    /// (`getrusage(RUSAGE_CHILDREN)`), in ms.
    pub fn children_cpu_ms() -> f64 {
        // SAFETY: rusage is plain old data, for which all-zero bytes are a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid `who` and a pointer to a live rusage.
        let r = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
        assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
        timeval_ms(usage.ru_utime) + timeval_ms(usage.ru_stime)
    }

    /// A field of `/proc/<process>/status` given in kB (`VmRSS`, `VmHWM`), in KiB.
    pub fn status_kib(process: &str, field: &str) -> u64 {
        let path = format!("/proc/{process}/status");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {path}"))
    }

    /// User plus system CPU time that process `pid` has used so far (`utime + stime` from
    /// `/proc/<pid>/stat`), in ms.
    pub fn cpu_ms(pid: u32) -> f64 {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        // The command name, in parentheses, may hold spaces: count fields after it. utime and
        // stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 = fields[11..13]
            .iter()
            .map(|f| f.parse::<u64>().expect("a tick count"))
            .sum();
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ticks as f64 * 1000.0 / per_second as f64
    }

    /// A peak resident set size: exact, or an upper bound.
    pub struct PeakRss {
        kib: u64,
        /// False when the child's `ru_maxrss` was no more than what it inherited from this
        /// process (Linux starts a child's count at its parent's `VmHWM`): then `kib` only
        /// bounds the child's own peak from above.
        exact: bool,
    }

    impl PeakRss {
        pub fn mib(&self) -> f64 {
            self.kib as f64 / 1024.0
        }
    }

    impl std::fmt::Display for PeakRss {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let bound = if self.exact { "" } else { "≤ " };
            write!(f, "{bound}{:.1} MiB", self.mib())
        }
    }

    /// The largest peak RSS among `samples` (which must not be empty).
    pub fn peak_rss(samples: &[Sample]) -> PeakRss {
        let top = samples
            .iter()
            .max_by_key(|s| s.max_rss_kib)
            .expect("at least one sample");
        PeakRss {
            kib: top.max_rss_kib,
            exact: top.max_rss_kib > top.floor_kib,
        }
    }

    /// The `p`th percentile (nearest rank; 0 is the minimum) of `values`, which must not be
    /// empty.
    pub fn percentile(values: &[f64], p: f64) -> f64 {
        assert!(!values.is_empty(), "a percentile of no measurement");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    /// Minimum, median and maximum of some measurements.
    pub struct Stats {
        pub min: f64,
        pub median: f64,
        pub max: f64,
    }

    impl Stats {
        /// Panics on an empty input (a section always measures at least once).
        pub fn of(values: impl IntoIterator<Item = f64>) -> Stats {
            let mut v: Vec<f64> = values.into_iter().collect();
            assert!(!v.is_empty(), "statistics of no measurement");
            v.sort_by(f64::total_cmp);
            let mid = v.len() / 2;
            let median = if v.len() % 2 == 1 {
                v[mid]
            } else {
                (v[mid - 1] + v[mid]) / 2.0
            };
            Stats {
                min: v[0],
                median,
                max: v[v.len() - 1],
            }
        }
    }
}
