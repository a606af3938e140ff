//! The demo's own PostgreSQL: a throwaway cluster under `./demo/postgres` (initdb once, then
//! started for each demo and stopped when it ends), so that `mapsync demo` shows the whole
//! path, SQLite to Postgres, with one command.
//!
//! Invariants: the cluster has no TCP address; it listens only on a Unix socket in a
//! directory of mode 0700 owned by the user it runs as, so its trust authentication lets in
//! that user (and root), nobody else on the host. It is stopped (`pg_ctl stop -m fast`) when
//! [`DemoPostgres`] is dropped. PostgreSQL refuses to run as root: as root, its commands run
//! as the `postgres` user through `runuser`, the way the tests run theirs, and the cluster
//! lives where that user can reach it (`./demo/postgres`, or a directory under the system's
//! temporary directory when `./demo` is not reachable by it).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::Error;

/// Who runs PostgreSQL's binaries when mapsync runs as root.
const SERVER_USER: &str = "postgres";

/// What to install for the whole demo.
pub const INSTALL_HINT: &str = "install PostgreSQL's server (Debian: apt-get install -y postgresql) and run the demo again to see the Postgres mirror too, or set MAPSYNC_TARGET__URL to a database of your own";

/// A running demo cluster.
pub struct DemoPostgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// The directory of its Unix socket.
    socket_dir: PathBuf,
    /// Run the binaries through `runuser -u postgres` (mapsync runs as root).
    as_server_user: bool,
}

impl DemoPostgres {
    /// The directory holding `initdb`, `pg_ctl` and `postgres`: on PATH, or the newest
    /// `/usr/lib/postgresql/*/bin`. `None` when PostgreSQL's server is not installed.
    pub fn binaries() -> Option<PathBuf> {
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
            .unwrap_or_default();
        versioned.sort_by_key(|p| {
            std::cmp::Reverse(
                p.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0),
            )
        });
        on_path.into_iter().chain(versioned).find(|d| {
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|b| d.join(b).is_file())
        })
    }

    /// Starts the cluster kept under `demo_dir` (creating it the first time) with the
    /// binaries in `bin`.
    pub fn start(demo_dir: &Path, bin: PathBuf) -> Result<DemoPostgres, Error> {
        let as_server_user = is_root();
        let home = cluster_home(demo_dir, as_server_user)?;
        let data = home.join("data");
        let log = home.join("postgres.log");
        let socket_dir = socket_dir(&home, as_server_user)?;
        let pg = DemoPostgres {
            bin,
            data,
            log,
            socket_dir,
            as_server_user,
        };
        if !pg.data.join("PG_VERSION").exists() {
            pg.initdb()?;
        }
        // A cluster left running by a demo that was killed.
        let _ = pg.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "10", "-D"]);
        pg.run_checked(
            pg.pg_ctl_command(&["start", "-w", "-t", "60", "-D"])
                .arg("-l")
                .arg(&pg.log)
                .arg("-o")
                .arg(format!(
                    "-p {PORT} -c listen_addresses='' -c unix_socket_directories='{}' -c unix_socket_permissions=0700 -c fsync=off",
                    pg.socket_dir.display()
                )),
            "pg_ctl start",
        )?;
        Ok(pg)
    }

    /// The URL the demo mirrors into (the socket directory as the host, percent-encoded).
    pub fn url(&self) -> String {
        let host: String = self
            .socket_dir
            .display()
            .to_string()
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    char::from(b).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect();
        format!("postgres://{SERVER_USER}@{host}:{PORT}/postgres")
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// A command that shows the mirrored rows.
    pub fn psql_line(&self) -> String {
        format!(
            "psql '{}' -c 'SELECT id, default_model, is_active, synced_at FROM public.model_mappings ORDER BY id'",
            self.url()
        )
    }

    fn initdb(&self) -> Result<(), Error> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data).args([
            "-U",
            SERVER_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        self.run_checked(&mut cmd, "initdb")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = if self.as_server_user {
            let mut c = Command::new("runuser");
            c.args(["-u", SERVER_USER, "--"])
                .arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        };
        // The caller's PG* variables must not redirect the demo's cluster.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PG") {
                cmd.env_remove(k);
            }
        }
        cmd.env("LC_ALL", "C").current_dir("/");
        cmd
    }

    fn pg_ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.args(args).arg(&self.data);
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        self.pg_ctl_command(args).output()
    }

    fn run_checked(&self, cmd: &mut Command, what: &str) -> Result<(), Error> {
        let out = cmd.output().map_err(|e| {
            Error::Other(format!(
                "cannot run {what} for the demo's PostgreSQL: {e}: {INSTALL_HINT}"
            ))
        })?;
        if out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(Error::Other(format!(
            "{what} failed for the demo's PostgreSQL in {}: {}: see {} or remove that directory to start afresh",
            self.data.display(),
            last.trim(),
            self.log.display()
        )))
    }
}

impl Drop for DemoPostgres {
    fn drop(&mut self) {
        match self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30", "-D"]) {
            Ok(out) if out.status.success() => {
                tracing::info!(data = %self.data.display(), "the demo's PostgreSQL stopped")
            }
            _ => tracing::warn!(data = %self.data.display(),
                "could not stop the demo's PostgreSQL: stop it with pg_ctl stop -D <that directory>"),
        }
    }
}

/// Where the cluster lives: `./demo/postgres`, owned by the server user when root; when that
/// user cannot reach it (a home directory closed to others), a directory of its own under
/// the temporary directory, named after the demo directory so each demo keeps its cluster.
fn cluster_home(demo_dir: &Path, as_server_user: bool) -> Result<PathBuf, Error> {
    let fail = |p: &Path, e: std::io::Error| {
        Error::Other(format!(
            "cannot create {} for the demo's PostgreSQL: {e}",
            p.display()
        ))
    };
    let local = std::path::absolute(demo_dir.join("postgres")).map_err(|e| fail(demo_dir, e))?;
    if !as_server_user {
        std::fs::create_dir_all(&local).map_err(|e| fail(&local, e))?;
        return Ok(local);
    }
    let (uid, gid) = server_user_ids().ok_or_else(|| {
        Error::Other(format!(
            "mapsync runs as root and there is no `{SERVER_USER}` user to run the demo's PostgreSQL as: install PostgreSQL's server package (it creates the user)"
        ))
    })?;
    let home = if reachable_by(&local, uid, gid) {
        local
    } else {
        std::env::temp_dir().join(format!("mapsync-demo-postgres-{:016x}", tag(&local)))
    };
    std::fs::create_dir_all(&home).map_err(|e| fail(&home, e))?;
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).map_err(|e| fail(&home, e))?;
    Ok(home)
}

/// Whether a process of `uid`/`gid` can walk down to `path`'s parent (every ancestor
/// searchable).
fn reachable_by(path: &Path, uid: u32, gid: u32) -> bool {
    path.ancestors()
        .skip(1)
        .all(|dir| match std::fs::metadata(dir) {
            Ok(m) => {
                let mode = m.mode();
                (m.uid() == uid && mode & 0o100 != 0)
                    || (m.gid() == gid && mode & 0o010 != 0)
                    || mode & 0o001 != 0
            }
            // Not created yet: created by root with the default mode, searchable by others.
            Err(_) => true,
        })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// uid and gid of [`SERVER_USER`].
fn server_user_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && f[0] == SERVER_USER)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// The port number in the socket's name (`.s.PGSQL.5432`); no TCP port is opened.
const PORT: u16 = 5432;

/// The directory of the cluster's socket, mode 0700, owned by the user the cluster runs as:
/// `run` beside the data, or, when that path is too long for a socket's name (108 bytes), a
/// directory of its own under the temporary directory.
fn socket_dir(home: &Path, as_server_user: bool) -> Result<PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let beside = home.join("run");
    let dir = if beside.as_os_str().len() + ".s.PGSQL.5432".len() + 1 < 100 {
        beside
    } else {
        std::env::temp_dir().join(format!("mapsync-demo-{:016x}", tag(home)))
    };
    let fail = |e: std::io::Error| {
        Error::Other(format!(
            "cannot create {} for the demo's PostgreSQL socket: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(&dir).map_err(fail)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    if as_server_user {
        let (uid, gid) =
            server_user_ids().ok_or_else(|| fail(std::io::ErrorKind::NotFound.into()))?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(fail)?;
    }
    Ok(dir)
}

/// A short name for `path`, the same on every run.
fn tag(path: &Path) -> u64 {
    path.display().to_string().bytes().fold(0u64, |h, b| {
        h.wrapping_mul(0x100_0000_01b3).wrapping_add(u64::from(b))
    })
}
