//! A real nginx in front of mapsync, configured by the shipped `deploy/nginx/mapsync.conf`:
//! the test writes a minimal `nginx.conf` that includes a copy of it with the addresses
//! replaced (mapsync's admin port, the application's, and a free port to listen on), starts
//! the master in the foreground (as the `postgres` user through `runuser` when root: nginx
//! must not run its workers as root here), and stops it and removes its directory on Drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::sys::{
    chown_to_server_user, free_port, is_executable, make_run_dir, poll_until, port_accepts,
    server_command, signal_and_wait, which,
};

const NOT_FOUND: &str = "nginx not found: install it with `apt-get install -y nginx`";
/// The shipped configuration.
pub const SHIPPED: &str = include_str!("../../../deploy/nginx/mapsync.conf");
/// The addresses the shipped file names, replaced by the test's.
pub const SHIPPED_MAPSYNC: &str = "127.0.0.1:9187";
pub const SHIPPED_APP: &str = "127.0.0.1:9999";
pub const SHIPPED_LISTEN: &str = "listen 80;";

pub fn nginx_path() -> PathBuf {
    which("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| is_executable(p)))
        .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Nginx {
    /// nginx on a free loopback port, proxying as `deploy/nginx/mapsync.conf` says to
    /// `mapsync` and `app`.
    pub fn start(mapsync: SocketAddr, app: SocketAddr) -> Nginx {
        let bin = nginx_path();
        assert!(
            SHIPPED.contains(SHIPPED_MAPSYNC)
                && SHIPPED.contains(SHIPPED_APP)
                && SHIPPED.contains(SHIPPED_LISTEN),
            "deploy/nginx/mapsync.conf no longer names {SHIPPED_MAPSYNC}, {SHIPPED_APP} and `{SHIPPED_LISTEN}`"
        );
        let dir = make_run_dir("mapsync-test-nginx");
        let port = free_port();
        let site = SHIPPED
            .replace(SHIPPED_MAPSYNC, &mapsync.to_string())
            .replace(SHIPPED_APP, &app.to_string())
            .replace(SHIPPED_LISTEN, &format!("listen 127.0.0.1:{port};"));
        std::fs::write(dir.join("mapsync.conf"), site).expect("write the site");
        let d = dir.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
             scgi_temp_path {d}/scgi;\n  include {d}/mapsync.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
        chown_to_server_user(&dir);
        let conf_path = dir.join("nginx.conf");
        let check = server_command(&bin, &dir)
            .arg("-t")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}. {NOT_FOUND}", bin.display()));
        assert!(
            check.status.success(),
            "nginx -t refused the configuration from deploy/nginx/mapsync.conf:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = server_command(&bin, &dir)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx: {e}"));
        let nginx = Nginx {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        if !poll_until(Duration::from_secs(10), || port_accepts(port)) {
            panic!("nginx did not listen on {port}; its log:\n{}", nginx.log());
        }
        nginx
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The child is runuser (when root) or nginx itself; nginx's master quits on SIGQUIT
        // gracefully and on SIGTERM at once. Signal the master by its pid file.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("nginx.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) on the nginx master this test started.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let _ = signal_and_wait(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
