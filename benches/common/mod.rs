//! What the three benchmarks (`benches/sync.rs`, `benches/daemon.rs`, `benches/http.rs`)
//! share: `main`'s frame ([`run`]: the fixture child, the `#` title, the machine table, the
//! verdict), the [`Bench`] setup, [`Check`] and the verdict, the machine table, the
//! environment, and [`measure`] (timing a child, peak RSS, CPU time, statistics).
//!
//! Each bench includes it as `#[path = "common/mod.rs"] mod shared;`, beside the integration
//! test harness (`tests/it/harness`), which it includes as `mod common`; this module reaches
//! the harness as `crate::common`.
//!
//! Peak RSS comes from `wait4`. Linux starts a child's `ru_maxrss` at its parent's resident
//! high-water mark (exec records the peak of the address space it replaces), so each bench
//! keeps its own small: the fixture is generated in a child (the bench again, with
//! [`GENERATE_ENV`]), and a measured peak that does not exceed the bench's `VmHWM` is shown
//! as an upper bound (`≤`).

// Each bench uses a part of this module.
#![allow(dead_code)]

pub mod measure;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::PgCluster;
use crate::common::admin::Admin;
use crate::common::daemon::Daemon;
use crate::common::workspace::Workspace;
use sha2::{Digest, Sha256};

/// Prompt-scoped mappings in the generated source (each becomes one mirrored row).
pub const PROMPTS: usize = 3;
/// Set (to the SQLite path) in the environment of the child that generates the fixture.
pub const GENERATE_ENV: &str = "MAPSYNC_BENCH_GENERATE";
/// The measured daemons' config: a 50 ms debounce, and schedules that never fire while the
/// benchmark runs, so that only the file watcher and `POST /sync` start runs.
pub const DAEMON_TOML: &str = "[watch]\ndebounce_ms = 50\nmax_delay_ms = 2000\n\n\
                               [schedule]\nreconcile = \"0 0 0 1 1 *\"\nsnapshot = \"0 0 0 1 1 *\"\n";

/// A bench's `main`: `MAPSYNC_BENCH_ROWS` (default 100000) and `MAPSYNC_BENCH_REPS` (default 5)
/// from the environment; in the fixture child (see [`GENERATE_ENV`]) only the fixture. Else
/// `preflight` (which may stop the program), the `# title`, the [`Bench`] setup, the machine
/// table, `sections` (each prints its figures and returns its [`Check`]s), the verdict, and
/// the bench's own resident high-water mark.
pub fn run(title: &str, preflight: impl FnOnce(), sections: impl FnOnce(&Bench) -> Vec<Check>) {
    let rows = env_usize("MAPSYNC_BENCH_ROWS", 100_000);
    let reps = env_usize("MAPSYNC_BENCH_REPS", 5);
    if let Some(path) = std::env::var_os(GENERATE_ENV) {
        crate::common::generate(Path::new(&path), rows, PROMPTS, true);
        return;
    }
    assert!(
        rows > 0 && reps > 0,
        "rows and repetitions must be positive"
    );
    preflight();

    println!("# {title}\n");
    let bench = Bench::setup(rows, reps);
    print_machine(&bench.cluster);

    let checks = sections(&bench);

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
pub struct Bench {
    pub rows: usize,
    pub reps: usize,
    pub ws: Workspace,
    pub mirror_url: String,
    pub baseline_url: String,
    pub cluster: PgCluster,
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
    pub fn expected_rows(&self) -> u64 {
        (self.rows + PROMPTS) as u64
    }

    /// Empties the table in `db` (not timed).
    pub fn truncate(&self, db: &str) {
        self.cluster.psql(db, "TRUNCATE public.model_mappings");
    }

    /// `mapsync run` on the workspace's source, mirroring into `db` (migrated first with
    /// `mapsync migrate`), once its start-up run has synced every row and a snapshot exists.
    /// Rewrites the workspace's config.
    pub fn start_daemon(&self, db: &str) -> Daemon {
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

    /// Brings the server to rest before a timed run (not timed): `VACUUM ANALYZE` of both
    /// tables, so that no autovacuum of the previous load runs during the measurement (and a
    /// resync meets a table in the settled state a long-running mirror is in), then a
    /// `CHECKPOINT`, so that none falls inside it.
    pub fn quiesce(&self) {
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
        crate::common::run_psql(url, &text).unwrap_or_else(|e| panic!("{script} failed: {e}"));
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

/// Stops a daemon with SIGTERM; it must exit 0.
pub fn stop_daemon(mut d: Daemon) {
    let (status, _) = d.stop(Duration::from_secs(10));
    assert!(
        status.success(),
        "mapsync run exited with {status}:\n{}",
        d.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Min, p50, p90, p99 and max of some measurements in ms; displayed as table cells.
pub struct Percentiles {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(values: &[f64]) -> Percentiles {
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

// ---------------------------------------------------------------------------------------------
// Verdict
// ---------------------------------------------------------------------------------------------

/// One target and what was measured against it.
pub struct Check {
    pub target: String,
    pub measured: String,
    pub met: bool,
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
