//! Small process and OS helpers shared by the harness: free loopback ports, deadline waits,
//! "am I root?", running a server binary as the `postgres` user through `runuser`, random
//! tokens, and pruning of directories leaked by a previous, crashed test process.

use std::ffi::OsStr;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A loopback TCP port that was free a moment ago (bound to `127.0.0.1:0`, then released).
/// Another process may take it before you bind it: servers started by the harness retry on
/// "address already in use".
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Poll `f` (every 20 ms) until it returns true; panic naming `what` if `timeout` passes first.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_until`] but returns whether the condition came true instead of panicking.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// Effective uid of this process (owner of `/proc/self`).
pub fn euid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .expect("stat /proc/self")
}

/// PostgreSQL and PgBouncer refuse to run as root: when we are root, server binaries run as
/// this user (through `runuser -u postgres --`) and own the directories they write.
pub const SERVER_USER: &str = "postgres";

pub fn is_root() -> bool {
    euid() == 0
}

/// uid and gid of [`SERVER_USER`] from /etc/passwd.
pub fn server_user_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == SERVER_USER {
            return (
                f[2].parse().expect("uid in /etc/passwd"),
                f[3].parse().expect("gid in /etc/passwd"),
            );
        }
    }
    panic!(
        "running as root but there is no `{SERVER_USER}` user to run PostgreSQL/PgBouncer as: install `postgresql` (creates it) or `useradd --system {SERVER_USER}`"
    );
}

/// A [`Command`] for a server binary: run directly, or through `runuser -u postgres --` when root.
/// Drops inherited `PG*` variables so the caller's environment cannot redirect it, and runs in
/// `cwd` (the server user may not be allowed into the test's working directory).
pub fn server_command(program: impl AsRef<OsStr>, cwd: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new(runuser());
        c.args(["-u", SERVER_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    scrub_pg_env(&mut cmd);
    cmd.current_dir(cwd);
    cmd.env("LC_ALL", "C");
    cmd
}

/// `runuser` (util-linux), needed when root.
fn runuser() -> PathBuf {
    which("runuser")
        .or_else(|| {
            ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
                .iter()
                .map(PathBuf::from)
                .find(|p| is_executable(p))
        })
        .unwrap_or_else(|| {
            panic!("running as root but `runuser` not found (needed to run PostgreSQL/PgBouncer as `{SERVER_USER}`): install it with `apt-get install -y util-linux`")
        })
}

/// Remove `PG*` variables (PGHOST, PGPORT, PGDATA, PGSSLMODE, ...) from a command's environment.
pub fn scrub_pg_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
}

/// Give `path` (recursively) to the server user when root; no-op otherwise.
pub fn chown_to_server_user(path: &Path) {
    if !is_root() {
        return;
    }
    let (uid, gid) = server_user_ids();
    fn walk(p: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())) {
                walk(&e.expect("dir entry").path(), uid, gid);
            }
        }
    }
    walk(path, uid, gid);
}

/// `n` random bytes from /dev/urandom, hex-encoded.
pub fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory `temp_dir()/<prefix>-<pid>-<n>` (created; owned by the server user when
/// root). The pid in the name lets [`prune_stale`] recognise leftovers of dead processes.
pub fn make_run_dir(prefix: &str) -> PathBuf {
    loop {
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                chown_to_server_user(&dir);
                return dir;
            }
            // A leftover of an earlier process that had our pid: try the next n.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
    }
}

/// True when a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Directories `temp_dir()/<prefix>-<pid>-<n>` whose `<pid>` is not alive any more.
pub fn stale_run_dirs(prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return out;
    };
    let lead = format!("{prefix}-");
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&lead) else {
            continue;
        };
        let mut parts = rest.splitn(2, '-');
        let (Some(pid), Some(n)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            out.push(e.path());
        }
    }
    out
}

/// Send a signal (e.g. "TERM", "KILL") to one process by pid, through kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// The `comm` name of a live process, if any.
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Find an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Percent-encode a URL userinfo component (user or password).
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sends `signal` to `child` and waits up to `grace` for it to exit: its status and how long
/// it took. If it is still running after `grace`, it is killed (SIGKILL), reaped, and the
/// time waited is the error.
pub fn signal_and_wait(
    child: &mut std::process::Child,
    signal: i32,
    grace: Duration,
) -> Result<(std::process::ExitStatus, Duration), Duration> {
    let started = Instant::now();
    if let Ok(Some(status)) = child.try_wait() {
        return Ok((status, Duration::ZERO));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let mut status = None;
    poll_until(grace, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    match status {
        Some(status) => Ok((status, started.elapsed())),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(started.elapsed())
        }
    }
}

/// Collects a child's pipe, line by line, into a shared string (from a thread of its own, so
/// the child never blocks on a full pipe).
pub fn collect_lines(
    pipe: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::BufRead;
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
            s.push_str(&line);
            s.push('\n');
        }
    });
    out
}
