//! The real `mapsync run` as a child process: started on a [`Workspace`]'s config with the
//! admin port on 127.0.0.1:0, its address read from its log, its stderr kept for assertions,
//! and stopped (SIGTERM, then SIGKILL) when dropped.

use std::net::SocketAddr;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::http::{self, Reply};
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
        let mut extra = extra.to_string();
        if !extra.contains("[http]") {
            extra.push_str("\n[http]\nlisten = \"127.0.0.1:0\"\n");
        }
        ws.write_config(target_url, &extra);
        let token = extra
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin_token = "))
            .map(|t| t.trim_matches('"').to_string());
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

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn get(&self, path: &str) -> Reply {
        http::get(self.addr, path, self.token.as_deref())
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Reply {
        http::post(self.addr, path, self.token.as_deref(), body)
    }

    /// `/status`'s data.
    pub fn status(&self) -> Value {
        let r = self.get("/status");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["data"].clone()
    }

    /// Waits until `/status` satisfies `f`, or panics with the last status and the log.
    #[track_caller]
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        if poll_until(timeout, || {
            last = self.status();
            f(&last)
        }) {
            return last;
        }
        panic!(
            "timed out waiting for {what}; last status: {last:#}\nlog:\n{}",
            self.log()
        );
    }

    /// Waits until `f` holds, or panics naming `what` with the daemon's log.
    #[track_caller]
    pub fn wait(&self, timeout: Duration, what: &str, f: impl FnMut() -> bool) {
        if !poll_until(timeout, f) {
            panic!(
                "timed out after {timeout:?} waiting for {what}; log:\n{}",
                self.log()
            );
        }
    }

    /// Waits until the first run has finished.
    pub fn wait_first_run(&self) -> Value {
        self.wait_status(Duration::from_secs(60), "the start-up run", |s| {
            !s["last_run"].is_null()
        })
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

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = signal_and_wait(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
    }
}
