//! Timing one child process (wall clock, peak RSS and CPU time from `wait4`), and statistics.

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
