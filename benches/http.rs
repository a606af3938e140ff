//! `cargo bench --bench http`: the daemon's admin port with every mapping held: `/livez`
//! under a paced wrk load, alone and during a full sync; the sync with and without that load;
//! `/metrics` scrapes; then `/livez` and the daemon's memory under hostile clients from
//! loopback (issue 9).
//!
//! This is a plain program (`harness = false`). It drives the release binary (`mapsync run`,
//! [`common::daemon::Daemon`]) as a child process, exactly as a user would, against a
//! throwaway PostgreSQL cluster started by the test harness (`tests/it/harness`), and prints
//! Markdown that can be pasted into `docs/PERFORMANCE.md`. It needs `wrk` (`apt-get install
//! -y wrk`) and stops at once without it. Its siblings: `cargo bench --bench sync` and
//! `cargo bench --bench daemon`.
//!
//! Environment: `MAPSYNC_BENCH_ROWS` (default 100000) source rows, `MAPSYNC_BENCH_REPS`
//! (default 5) syncs with and without the `/livez` load.
//!
//! The sections, [`http_port`] then [`http_flood`], each print their figures and return the
//! [`Check`]s that go into the verdict; [`shared::run`] prints the title, the machine table
//! and the verdict.

// The whole integration-test harness, of which this program uses a part.
#[path = "../tests/it/harness/mod.rs"]
#[allow(dead_code, unused_imports)]
mod common;
// What the three benchmarks share (`benches/common/`); it reaches the harness as `crate::common`.
#[path = "common/mod.rs"]
mod shared;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::Admin;
use common::daemon::Daemon;
use shared::measure::{self, Stats};
use shared::{Bench, Check, Percentiles, fmt_ms, ms, stop_daemon};

fn main() {
    shared::run("mapsync benchmark: the HTTP admin port", require_wrk, |b| {
        let mut checks = http_port(b);
        checks.extend(http_flood(b));
        checks
    });
}

/// Stops the program with one line unless `wrk` is on PATH.
fn require_wrk() {
    if common::sys::which("wrk").is_none() {
        eprintln!("{NO_WRK}");
        std::process::exit(1);
    }
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
