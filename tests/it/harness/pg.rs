//! Throwaway PostgreSQL clusters for integration tests.
//!
//! [`PgCluster`] runs `initdb` + `pg_ctl` from the system's server binaries (PATH first, then
//! `/usr/lib/postgresql/*/bin`, highest version first; `MAPSYNC_TEST_PG_BIN` overrides) in
//! `temp_dir()/mapsync-test-pg-<pid>-<n>`, listening on 127.0.0.1 only, on a free port, with
//! scram-sha-256 password authentication on TCP (trust on its private Unix socket directory).
//! When the tests run as root the binaries run through `runuser -u postgres --` and that user
//! owns the directory. Durability is off (`fsync = off`): these clusters are disposable.
//!
//! [`test_db`] hands out a fresh database on a cluster shared by the whole test process
//! (started on first use, stopped when the last [`TestDb`] is dropped), or on the server named
//! by `MAPSYNC_TEST_DATABASE_URL` (a `postgres://` URL whose role has CREATEDB).
//!
//! Outage tests (`stop()` / `start_again()`) should use a dedicated [`PgCluster`]: stopping
//! the shared one would break every other test running in the process at that moment.
//!
//! Everything here is synchronous and blocking (it shells out to `psql`/`pg_ctl`); from a
//! `#[tokio::test]` prefer `flavor = "multi_thread"` or `spawn_blocking` around `stop()` /
//! `start_again()` if the code under test must keep running meanwhile.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, Weak};
use std::time::Duration;

use super::sys::{
    SERVER_USER, chown_to_server_user, free_port, is_executable, make_run_dir, port_accepts,
    process_name, random_hex, scrub_pg_env, server_command, stale_run_dirs, wait_until, which,
};
use super::tls::TestCa;

/// Directory-name prefix of clusters (under `std::env::temp_dir()`).
pub const RUN_DIR_PREFIX: &str = "mapsync-test-pg";

const NOT_FOUND: &str = "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin: install them with `apt-get install -y postgresql`";

/// Options for [`PgCluster::start_with`].
#[derive(Default)]
pub struct PgOptions {
    /// `ssl = on` with `ca`'s server certificate and key (copied into the data directory).
    pub ssl: Option<TestCa>,
    /// With `ssl`: reject non-TLS TCP connections (`hostnossl … reject` in pg_hba.conf).
    pub ssl_only: bool,
    /// Extra `postgresql.conf` lines, e.g. `"max_connections = 20"`.
    pub extra_conf: Vec<String>,
}

pub struct PgCluster {
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    running: AtomicBool,
    db_counter: AtomicUsize,
    ssl: Option<TestCa>,
}

/// Candidate server bin directories, best first (no panics).
fn bin_dir_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(d) = std::env::var_os("MAPSYNC_TEST_PG_BIN") {
        out.push(PathBuf::from(d));
    }
    if let Some(initdb) = which("initdb") {
        // /usr/local/bin/initdb may be a symlink into the real bin dir, next to `postgres`.
        let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(d) = real.parent() {
            out.push(d.to_path_buf());
        }
    }
    let mut versioned: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: Option<Vec<u64>> = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect();
            Some((v?, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
    out.extend(versioned.into_iter().map(|(_, p)| p));
    out
}

/// The bin directory holding `initdb`, `pg_ctl` and `postgres`; panics with [`NOT_FOUND`].
pub fn pg_bin_dir() -> PathBuf {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        bin_dir_candidates().into_iter().find(|d| {
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|b| is_executable(&d.join(b)))
        })
    })
    .clone()
    .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

/// `psql`: next to the server binaries if there, else on PATH.
pub fn psql_path() -> PathBuf {
    static PSQL: OnceLock<Option<PathBuf>> = OnceLock::new();
    PSQL.get_or_init(|| {
        bin_dir_candidates()
            .into_iter()
            .map(|d| d.join("psql"))
            .find(|p| is_executable(p))
            .or_else(|| which("psql"))
    })
    .clone()
    .unwrap_or_else(|| {
        panic!("psql not found on PATH or under /usr/lib/postgresql/*/bin: install it with `apt-get install -y postgresql-client`")
    })
}

/// Run `sql` (a script: several statements allowed, fed on stdin) with
/// `psql -X -v ON_ERROR_STOP=1 -At -q` against `conninfo` (a URL or `key=value` string).
/// Ok(stdout without its trailing newline) or Err(stderr). Connect timeout 10 s.
pub fn run_psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(psql_path());
    scrub_pg_env(&mut cmd);
    let mut child = cmd
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-q", "-f", "-", "-d"])
        .arg(conninfo)
        .env("PGCONNECT_TIMEOUT", "10")
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn psql: {e}"));
    let mut stdin = child.stdin.take().expect("psql stdin");
    let sql = sql.to_owned();
    // Write from a thread so a large script cannot deadlock against a full stdout pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(sql.as_bytes());
    });
    let out = child.wait_with_output().expect("wait for psql");
    let _ = writer.join();
    if out.status.success() {
        let s = String::from_utf8_lossy(&out.stdout);
        Ok(s.strip_suffix('\n').unwrap_or(&s).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Replace the database of a `postgres://` URL, keeping user, password, host and query.
pub fn url_with_db(url: &str, db: &str) -> String {
    let start = url
        .find("://")
        .map(|i| i + 3)
        .unwrap_or_else(|| panic!("not a postgres:// URL: {url}"));
    let rest = &url[start..];
    let at = rest.rfind('@').map(|i| i + 1).unwrap_or(0);
    let auth_end = rest[at..]
        .find(['/', '?'])
        .map(|i| at + i)
        .unwrap_or(rest.len());
    let tail = &rest[auth_end..];
    let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
    format!("{}{}/{db}{query}", &url[..start], &rest[..auth_end])
}

fn unique_db_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "mapsync_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        random_hex(3)
    )
}

/// Stop and remove clusters left behind by test processes that no longer exist. Once per process.
pub fn prune_stale_clusters() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for dir in stale_run_dirs(RUN_DIR_PREFIX) {
            let data = dir.join("data");
            let pid = std::fs::read_to_string(data.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
            if let Some(pid) = pid {
                // Only if that pid is still a postmaster (not a recycled pid).
                if process_name(pid).as_deref() == Some("postgres") {
                    if let Some(bin) = bin_dir_candidates()
                        .into_iter()
                        .find(|d| is_executable(&d.join("pg_ctl")))
                    {
                        let _ = server_command(bin.join("pg_ctl"), &dir)
                            .args(["stop", "-m", "immediate", "-w", "-t", "20", "-D"])
                            .arg(&data)
                            .output();
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}

impl PgCluster {
    /// A dedicated cluster with default options.
    pub fn start() -> PgCluster {
        Self::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> PgCluster {
        let bin = pg_bin_dir();
        prune_stale_clusters();
        super::pgbouncer::prune_stale_pgbouncers();
        let dir = make_run_dir(RUN_DIR_PREFIX);
        let data = dir.join("data");
        // Built before anything can fail, so Drop cleans up after a panic below.
        let mut c = PgCluster {
            dir,
            data,
            bin,
            port: 0,
            password: random_hex(16),
            running: AtomicBool::new(false),
            db_counter: AtomicUsize::new(0),
            ssl: None,
        };
        c.initdb();
        c.configure(&opts);
        c.ssl = opts.ssl;
        c.first_start();
        c
    }

    fn pg_ctl(&self) -> Command {
        server_command(self.bin.join("pg_ctl"), &self.dir)
    }

    fn initdb(&self) {
        let pwfile = self.dir.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.password)).expect("write pwfile");
        chown_to_server_user(&pwfile);
        let out = server_command(self.bin.join("initdb"), &self.dir)
            .arg("-D")
            .arg(&self.data)
            .args([
                "-U",
                SERVER_USER,
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("spawn initdb");
        let _ = std::fs::remove_file(&pwfile);
        assert!(
            out.status.success(),
            "initdb failed:\n{}",
            output_text(&out)
        );
    }

    fn configure(&self, opts: &PgOptions) {
        let mut conf = String::new();
        conf.push_str(&format!(
            "\n# written by the mapsync test harness\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 32MB\n\
             max_connections = 100\n\
             password_encryption = 'scram-sha-256'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             include_if_exists = 'mapsync_port.conf'\n",
            self.dir.display()
        ));
        if opts.ssl.is_some() {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for l in &opts.extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        let pgconf = self.data.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&pgconf)
            .expect("open postgresql.conf");
        f.write_all(conf.as_bytes())
            .expect("append postgresql.conf");

        let mut hba = String::from("local all all trust\n");
        if opts.ssl_only {
            hba.push_str("hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject\n");
        }
        hba.push_str(
            "host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n\
             host replication all 127.0.0.1/32 scram-sha-256\n",
        );
        std::fs::write(self.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");

        if let Some(ca) = &opts.ssl {
            use std::os::unix::fs::PermissionsExt;
            let crt = self.data.join("server.crt");
            let key = self.data.join("server.key");
            std::fs::copy(&ca.server_cert, &crt).expect("copy server.crt");
            std::fs::copy(&ca.server_key, &key).expect("copy server.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server.key");
            chown_to_server_user(&crt);
            chown_to_server_user(&key);
        }
        chown_to_server_user(&self.data);
    }

    fn write_port(&self) {
        let p = self.data.join("mapsync_port.conf");
        std::fs::write(&p, format!("port = {}\n", self.port)).expect("write mapsync_port.conf");
        chown_to_server_user(&p);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The server log (for assertions and failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `pg_ctl start -w`; Err(new log output) on failure.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let before = self.log().len();
        let out = self
            .pg_ctl()
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .output()
            .expect("spawn pg_ctl start");
        if out.status.success() {
            Ok(())
        } else {
            let log = self.log();
            Err(format!(
                "{}\n--- server log ---\n{}",
                output_text(&out),
                log.get(before..).unwrap_or(&log)
            ))
        }
    }

    fn first_start(&mut self) {
        let mut last_err = String::new();
        for _ in 0..5 {
            self.port = free_port();
            self.write_port();
            match self.pg_ctl_start() {
                Ok(()) => {
                    self.running.store(true, Ordering::SeqCst);
                    self.wait_accepting();
                    return;
                }
                // Someone took the port between free_port() and the bind: try another.
                Err(e) if e.contains("could not bind") || e.contains("already in use") => {
                    last_err = e
                }
                Err(e) => panic!("PostgreSQL did not start: {e}"),
            }
        }
        panic!("PostgreSQL did not start after 5 ports: {last_err}");
    }

    fn wait_accepting(&self) {
        wait_until(
            Duration::from_secs(30),
            "PostgreSQL to accept TCP connections",
            || port_accepts(self.port),
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The cluster's directory (data dir, socket dir and log live below it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA passed in [`PgOptions::ssl`], if any.
    pub fn ca(&self) -> Option<&TestCa> {
        self.ssl.as_ref()
    }

    /// `postgres://postgres:<pw>@127.0.0.1:<port>/<db>`
    pub fn superuser_url(&self, db: &str) -> String {
        self.url(SERVER_USER, &self.password, db)
    }

    /// A URL for any role on this cluster.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{db}",
            super::sys::url_encode(user),
            super::sys::url_encode(password),
            self.host(),
            self.port
        )
    }

    /// Whether the harness believes the server is up (false between `stop` and `start_again`).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// `pg_ctl stop -m fast` (for outage tests). Idempotent.
    pub fn stop(&self) {
        if !self.running.swap(false, Ordering::SeqCst) {
            return;
        }
        let out = self
            .pg_ctl()
            .args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(&self.data)
            .output()
            .expect("spawn pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed:\n{}",
            output_text(&out)
        );
    }

    /// Start again on the same port and data; returns once it accepts connections. Idempotent.
    pub fn start_again(&self) {
        if self.running.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.pg_ctl_start() {
            panic!("PostgreSQL did not start again on port {}: {e}", self.port);
        }
        self.running.store(true, Ordering::SeqCst);
        self.wait_accepting();
    }

    /// `CREATE DATABASE` with a fresh unique name; returns the name.
    pub fn create_db(&self) -> String {
        let name = format!(
            "mapsync_test_{}",
            self.db_counter.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Run SQL as the superuser in `db`; panics with psql's stderr on failure; returns stdout
    /// (rows as `a|b`, one per line, trailing newline removed).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        run_psql(&self.superuser_url(db), sql)
            .unwrap_or_else(|e| panic!("psql on {db} failed: {e}\nSQL: {sql}"))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self
                .pg_ctl()
                .args(["stop", "-m", "immediate", "-w", "-t", "30", "-D"])
                .arg(&self.data)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh database, dropped (`WITH (FORCE)`) when this value is dropped.
pub struct TestDb {
    /// URL of this database (superuser of the shared cluster, or the env URL's role).
    pub url: String,
    pub name: String,
    admin: String,
    cluster: Option<Arc<PgCluster>>,
}

/// The process-wide shared cluster: alive while some [`TestDb`] (or a clone of its Arc) is.
static SHARED: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());

fn shared_cluster() -> Arc<PgCluster> {
    let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = guard.upgrade() {
        return c;
    }
    let c = Arc::new(PgCluster::start());
    *guard = Arc::downgrade(&c);
    c
}

/// A fresh database: on `MAPSYNC_TEST_DATABASE_URL`'s server if set, else on the shared cluster.
pub fn test_db() -> TestDb {
    let name = unique_db_name();
    match std::env::var("MAPSYNC_TEST_DATABASE_URL") {
        Ok(base) if !base.trim().is_empty() => {
            let admin = base.trim().to_string();
            run_psql(&admin, &format!("CREATE DATABASE {name}")).unwrap_or_else(|e| {
                panic!("CREATE DATABASE on MAPSYNC_TEST_DATABASE_URL failed (the role needs CREATEDB): {e}")
            });
            TestDb {
                url: url_with_db(&admin, &name),
                name,
                admin,
                cluster: None,
            }
        }
        _ => {
            let cluster = shared_cluster();
            cluster.psql("postgres", &format!("CREATE DATABASE {name}"));
            TestDb {
                url: cluster.superuser_url(&name),
                name,
                admin: cluster.superuser_url("postgres"),
                cluster: Some(cluster),
            }
        }
    }
}

impl TestDb {
    /// Run SQL in this database (see [`PgCluster::psql`]).
    pub fn psql(&self, sql: &str) -> String {
        run_psql(&self.url, sql)
            .unwrap_or_else(|e| panic!("psql on {} failed: {e}\nSQL: {sql}", self.name))
    }

    /// Same server and role, database `postgres` (with `MAPSYNC_TEST_DATABASE_URL`: that URL
    /// as given, since the role may not be allowed into `postgres`).
    pub fn admin_url(&self) -> String {
        self.admin.clone()
    }

    /// The shared cluster behind this database (None with `MAPSYNC_TEST_DATABASE_URL`).
    /// Cloning the Arc keeps the cluster alive after the TestDb is gone.
    pub fn cluster(&self) -> Option<&Arc<PgCluster>> {
        self.cluster.as_ref()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.cluster.as_ref().is_some_and(|c| !c.is_running()) {
            return; // stopped by an outage test and not restarted: the cluster goes anyway
        }
        if let Err(e) = run_psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ) {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
    }
}
