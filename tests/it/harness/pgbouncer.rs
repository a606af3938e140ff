//! A PgBouncer in **transaction** pooling mode in front of a test cluster, like Supabase's
//! transaction pooler: consecutive transactions of one client may run on different server
//! connections, so named prepared statements must not outlive a transaction.
//!
//! Listens on 127.0.0.1:<free port>; clients authenticate with scram-sha-256 against an
//! `auth_file` holding the plaintext password (which PgBouncer also uses for SCRAM towards the
//! server). `default_pool_size = 2` so that statements really move between server connections.
//! The admin console is database `pgbouncer`, same user. Runs in the foreground as a child
//! process (through `runuser -u postgres --` when root, as PgBouncer refuses root) in
//! `temp_dir()/mapsync-test-pgbouncer-<pid>-<n>`; Drop terminates it and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Once;
use std::time::Duration;

use super::sys::{
    chown_to_server_user, free_port, is_executable, make_run_dir, poll_until, port_accepts,
    process_name, server_command, signal, stale_run_dirs, url_encode, which,
};

pub const RUN_DIR_PREFIX: &str = "mapsync-test-pgbouncer";

const NOT_FOUND: &str = "pgbouncer not found: install it with `apt-get install -y pgbouncer`";

pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
    user: String,
    password: String,
}

fn pgbouncer_bin() -> PathBuf {
    which("pgbouncer")
        .or_else(|| {
            [
                "/usr/sbin/pgbouncer",
                "/usr/bin/pgbouncer",
                "/usr/local/bin/pgbouncer",
            ]
            .iter()
            .map(PathBuf::from)
            .find(|p| is_executable(p))
        })
        .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

/// PgBouncer's pid from its pidfile, if it is (still) a pgbouncer process.
fn pgbouncer_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("pgbouncer.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (process_name(pid).as_deref() == Some("pgbouncer")).then_some(pid)
}

/// Terminate PgBouncers left behind by dead test processes and remove their directories.
pub fn prune_stale_pgbouncers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for dir in stale_run_dirs(RUN_DIR_PREFIX) {
            if let Some(pid) = pgbouncer_pid(&dir) {
                signal(pid, "TERM");
                if !poll_until(Duration::from_secs(5), || pgbouncer_pid(&dir).is_none()) {
                    signal(pid, "KILL");
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl PgBouncer {
    /// Start PgBouncer for `cluster_host:cluster_port`, every database (`* =`), one user.
    /// Returns once it accepts TCP connections.
    pub fn start(cluster_host: &str, cluster_port: u16, user: &str, password: &str) -> PgBouncer {
        let bin = pgbouncer_bin();
        prune_stale_pgbouncers();
        let mut last_err = String::new();
        for _ in 0..5 {
            let dir = make_run_dir(RUN_DIR_PREFIX);
            std::fs::write(
                dir.join("userlist.txt"),
                format!("{} {}\n", quote(user), quote(password)),
            )
            .expect("write userlist.txt");
            let port = free_port();
            let ini = format!(
                "[databases]\n\
                 * = host={cluster_host} port={cluster_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = scram-sha-256\n\
                 auth_file = {dir}/userlist.txt\n\
                 admin_users = {user}\n\
                 stats_users = {user}\n\
                 pool_mode = transaction\n\
                 default_pool_size = 2\n\
                 min_pool_size = 0\n\
                 reserve_pool_size = 0\n\
                 max_client_conn = 200\n\
                 server_reset_query =\n\
                 server_login_retry = 1\n\
                 server_connect_timeout = 5\n\
                 query_wait_timeout = 30\n\
                 ignore_startup_parameters = extra_float_digits,options,application_name\n\
                 logfile = {dir}/pgbouncer.log\n\
                 pidfile = {dir}/pgbouncer.pid\n",
                dir = dir.display()
            );
            let ini_path = dir.join("pgbouncer.ini");
            std::fs::write(&ini_path, ini).expect("write pgbouncer.ini");
            chown_to_server_user(&dir);
            let stderr_path = dir.join("stderr.log");
            let stderr = std::fs::File::create(&stderr_path).expect("create stderr.log");
            let child = server_command(&bin, &dir)
                .arg(&ini_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn pgbouncer: {e}"));
            let mut pb = PgBouncer {
                child,
                dir: dir.clone(),
                port,
                user: user.to_string(),
                password: password.to_string(),
            };
            let mut exited = false;
            let up = poll_until(Duration::from_secs(20), || {
                if matches!(pb.child.try_wait(), Ok(Some(_))) {
                    exited = true;
                    return true;
                }
                port_accepts(port) && pgbouncer_pid(&pb.dir).is_some()
            });
            if up && !exited {
                return pb;
            }
            let log = format!(
                "{}{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
            );
            drop(pb); // terminates it and removes its directory
            if log.contains("in use") {
                // Someone took the port between free_port() and the bind: try another.
                last_err = log;
                continue;
            }
            panic!("pgbouncer did not start (exited: {exited}):\n{log}");
        }
        panic!("pgbouncer did not start after 5 ports:\n{last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://user:pw@127.0.0.1:<port>/<db>` through the pooler.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{db}",
            url_encode(&self.user),
            url_encode(&self.password),
            self.port
        )
    }

    /// The admin console (`SHOW POOLS`, `SHOW CONFIG`, …; simple query protocol only).
    pub fn admin_url(&self) -> String {
        self.url("pgbouncer")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PgBouncer's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// Stop the process: SIGTERM to PgBouncer itself (runuser forwards nothing on SIGKILL),
    /// then SIGKILL if it lingers, and reap the child.
    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = pgbouncer_pid(&self.dir);
        match pid {
            Some(pid) => signal(pid, "TERM"),
            None => signal(self.child.id(), "TERM"),
        }
        let gone = poll_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !gone {
            if let Some(pid) = pid {
                signal(pid, "KILL");
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(pid) = pid {
            // runuser reaps PgBouncer before it exits itself; this is belt and braces.
            poll_until(Duration::from_secs(5), || {
                process_name(pid).as_deref() != Some("pgbouncer")
            });
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
