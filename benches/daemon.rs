//! `cargo bench --bench daemon`: `mapsync run` on the whole source: how long a committed
//! change takes to be visible in Postgres, what the daemon costs at rest (CPU time, Postgres
//! transactions, memory with every mapping held), and its memory on a restart beside its
//! snapshots.
//!
//! This is a plain program (`harness = false`). It drives the release binary as a child
//! process ([`common::daemon::Daemon`]), exactly as a user would, against a throwaway
//! PostgreSQL cluster started by the test harness (`tests/it/harness`), and prints Markdown
//! that can be pasted into `docs/PERFORMANCE.md`. Its siblings: `cargo bench --bench sync`
//! (one-shot runs against `psql \copy`) and `cargo bench --bench http` (the admin port).
//!
//! Environment: `MAPSYNC_BENCH_ROWS` (default 100000) source rows, `MAPSYNC_BENCH_REPS`
//! (default 5) repetitions: 40 single-row changes and 12 s at rest per repetition.
//!
//! The sections run in this order: [`daemon_latency`] hands its running daemon to
//! [`daemon_idle`], then [`daemon_restart`] starts a second one beside the snapshots the
//! first left. Each prints its figures and returns the [`Check`]s that go into the verdict;
//! [`shared::run`] prints the title, the machine table and the verdict.

// The whole integration-test harness, of which this program uses a part.
#[path = "../tests/it/harness/mod.rs"]
#[allow(dead_code, unused_imports)]
mod common;
// What the three benchmarks share (`benches/common/`); it reaches the harness as `crate::common`.
#[path = "common/mod.rs"]
mod shared;

use std::time::{Duration, Instant};

use common::admin::Admin;
use common::daemon::Daemon;
use common::workspace::Workspace;
use shared::measure;
use shared::{Bench, Check, Percentiles, fmt_ms, ms, stop_daemon};

/// The daemon's resident set at rest with every mapping held, in MiB.
const DAEMON_RSS_MIB: f64 = 32.0;
/// The daemon's resident high-water mark, in MiB.
const DAEMON_PEAK_MIB: f64 = 40.0;

fn main() {
    shared::run(
        "mapsync benchmark: the daemon",
        || {},
        |b| {
            // The idle measurement continues with the daemon the latency section leaves running.
            let (daemon, mut checks) = daemon_latency(b);
            checks.extend(daemon_idle(b, daemon));
            checks.extend(daemon_restart(b));
            checks
        },
    );
}

impl Bench {
    /// `VACUUM ANALYZE` of the table in `db`, then a `CHECKPOINT` (see [`Bench::quiesce`]).
    fn settle(&self, db: &str) {
        self.cluster
            .psql(db, "VACUUM ANALYZE public.model_mappings");
        self.cluster.psql("postgres", "CHECKPOINT");
    }
}

// ---------------------------------------------------------------------------------------------
// Sections: the daemon (`mapsync run`)
// ---------------------------------------------------------------------------------------------

/// `watch.debounce_ms` of the measured daemons (also in [`shared::DAEMON_TOML`]).
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

/// Waits until the daemon has written no snapshot for longer than `snapshot.min_interval_s`
/// (10 s, the default) plus a margin: a snapshot deferred after the last change would have
/// been written by then. Gives up after a minute (the window then says what happened).
fn wait_for_snapshots_to_settle(d: &Daemon) {
    const QUIET: Duration = Duration::from_secs(15);
    let writes = || Scrape::of(d).get(r#"mapsync_snapshot_writes_total{result="ok"}"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut since) = (writes(), Instant::now());
    while since.elapsed() < QUIET {
        if Instant::now() > deadline {
            eprintln!("warning: the daemon still writes snapshots a minute after the last change");
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
        let now = writes();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
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
    eprintln!(
        "idle: {} s and the snapshots' settling (15 s or more)…",
        (STATS_FLUSH * 2 + window).as_secs()
    );
    // Autovacuum's workers visit every database once per naptime, and their transactions
    // count in pg_stat_database: paused until the last reading.
    set_autovacuum(b, false);
    // The snapshot of the last changes, deferred by `snapshot.min_interval_s` (10 s) after the
    // previous one, is written (at 1,000,000 mappings it took 1.5 s and could fall into the
    // window), then every backend flushes its statistics.
    wait_for_snapshots_to_settle(&d);
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
         {} s after no snapshot was written for 15 s and again {} s after the window, so that \
         every backend has flushed its statistics; nothing connects to `{DAEMON_DB}` in between, and \
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
        .value("SELECT count(*) FROM llm_model_mappings WHERE scope_type IN ('mapping', 'user')")
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
