//! The real `mapsync run` as a child process: started on a [`Workspace`]'s config with the
//! admin port on 127.0.0.1:0, its address read from its log, its stderr kept for assertions,
//! and stopped (SIGTERM, then SIGKILL) when dropped. For what a real process is needed for:
//! signals, exit codes, the environment, stderr, resource limits and measurements of the
//! process; everything else runs the daemon in-process ([`super::app::TestApp`]).

use std::net::SocketAddr;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::admin::Admin;
use super::sys::{collect_lines, poll_until, signal_and_wait};
use super::workspace::{Workspace, command};

pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    pub token: Option<String>,
}

impl Daemon {
    /// Starts `mapsync run` on `ws`'s config (rewritten with `target_url` and `extra` TOML,
    /// plus `[http] listen = "127.0.0.1:0"` unless `extra` has an `[http]` section) and waits
    /// until it listens.
    pub fn start(ws: &Workspace, target_url: Option<&str>, extra: &str) -> Daemon {
        let token = ws.write_daemon_config(target_url, extra);
        Self::spawn(ws, token, |_| {})
    }

    /// Starts the binary with a hook to adjust the command (environment, limits).
    pub fn spawn(
        ws: &Workspace,
        token: Option<String>,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> Daemon {
        let mut cmd = command();
        cmd.arg("--config")
            .arg(&ws.config)
            .arg("run")
            .env("MAPSYNC_LOG__FORMAT", "text")
            .env("NO_COLOR", "1")
            .current_dir(ws.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("mapsync run starts");
        let log = collect_lines(child.stderr.take().expect("piped stderr"));
        let mut addr = None;
        let found = poll_until(Duration::from_secs(30), || {
            addr = log
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains("admin port listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            addr.is_some()
        });
        let mut daemon = Daemon {
            child,
            addr: addr.unwrap_or_else(|| "127.0.0.1:9".parse().unwrap()),
            log,
            token,
        };
        if !found {
            let status = daemon.child.try_wait().ok().flatten();
            panic!(
                "mapsync run did not start listening (exit: {status:?}); its log:\n{}",
                daemon.log()
            );
        }
        daemon
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit; returns the status and how long it
    /// took, or panics.
    pub fn stop(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        signal_and_wait(&mut self.child, libc::SIGTERM, timeout).unwrap_or_else(|_| {
            panic!(
                "mapsync did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log()
            )
        })
    }
}

impl Admin for Daemon {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn exit(&self) -> Option<String> {
        // try_wait needs &mut; /proc tells whether the child is still there without reaping it.
        let state = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok();
        match state
            .as_deref()
            .and_then(|s| s.rsplit(')').next()?.split_whitespace().next())
        {
            Some("Z") | None => Some("the process has exited".into()),
            Some(_) => None,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = signal_and_wait(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
    }
}
