//! `cargo bench --bench sync`: how long `mapsync sync` takes, and how much memory it needs,
//! compared with loading the same rows with `psql \copy`.
//!
//! This is a plain program (`harness = false`). It drives the release binary as a child
//! process, exactly as a user would, against a throwaway PostgreSQL cluster started by the
//! test harness (`tests/common`), and prints Markdown that can be pasted into
//! `docs/PERFORMANCE.md`.
//!
//! Environment: `MAPSYNC_BENCH_ROWS` (default 100000) source rows, `MAPSYNC_BENCH_REPS`
//! (default 5) repetitions of each measurement.
//!
//! Peak RSS comes from `wait4`. Linux starts a child's `ru_maxrss` at its parent's resident
//! high-water mark (exec records the peak of the address space it replaces), so this process
//! keeps its own small: the fixture is generated in a child (this program again, with
//! [`GENERATE_ENV`]), and a measured peak that does not exceed this process's `VmHWM` is
//! shown as an upper bound (`≤`).
//!
//! Each section is one function called from `main` with its own heading; it prints its
//! figures and returns the [`Check`]s that go into the final verdict. The helpers for timing
//! a child, medians and peak RSS live in [`measure`].

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use common::PgCluster;
use common::mapsync::Workspace;
use common::sys::scrub_pg_env;
use measure::{Sample, Stats};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Cold sync may take at most this many times the `\copy` median.
const COLD_VS_COPY: f64 = 1.5;
/// A no-op resync may take at most this many times the `\copy` median.
const NOOP_VS_COPY: f64 = 0.5;
/// Peak resident set size of one `mapsync sync` process, in MiB.
const MAX_RSS_MIB: f64 = 64.0;
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

    println!("# mapsync benchmark\n");
    let bench = Bench::setup(rows, reps);
    print_machine(&bench.cluster);

    let mut checks = Vec::new();
    checks.extend(one_shot_sync(&bench));
    // Later sections (daemon latency, idle CPU, HTTP) go here, each returning its checks.

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
        let mut cmd = common::mapsync::command();
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
        let mut cmd = common::mapsync::command();
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
    } else {
        format!("{ms:.1} ms")
    }
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
        std::fs::read_to_string("/proc/self/status")
            .expect("read /proc/self/status")
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/self/status")
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
