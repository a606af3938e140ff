//! What a test does with a running daemon's admin port, whichever way the daemon runs: in this
//! process ([`super::app::TestApp`]) or as the real binary ([`super::daemon::Daemon`]). Both
//! implement [`Admin`] (its address, its token, its log so far), and the requests and the
//! waits on `/status` are written once here.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::http::{self, Reply};
use super::sys::poll_until;

pub trait Admin {
    /// The admin port's address.
    fn addr(&self) -> SocketAddr;

    /// The admin token that [`Admin::get`] and [`Admin::post`] send, if any.
    fn token(&self) -> Option<&str>;

    /// Everything the daemon logged so far (for failure messages).
    fn log(&self) -> String;

    /// Why the admin port does not answer: the daemon's exit, if it has ended.
    fn exit(&self) -> Option<String>;

    /// `method path` with the token, `headers` and `body`; panics, naming the daemon's exit and
    /// log, when the connection fails.
    #[track_caller]
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let auth = self.token().map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        all.extend_from_slice(headers);
        http::try_request(self.addr(), method, path, &all, body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} on {} failed: {e} (daemon ended: {:?}); its log:\n{}",
                self.addr(),
                self.exit(),
                self.log()
            )
        })
    }

    #[track_caller]
    fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], b"")
    }

    /// `POST path` with the token; a non-empty body goes as `application/json`.
    #[track_caller]
    fn post(&self, path: &str, body: &[u8]) -> Reply {
        let json = [("Content-Type", "application/json")];
        let headers: &[(&str, &str)] = if body.is_empty() { &[] } else { &json };
        self.request("POST", path, headers, body)
    }

    /// `/status`'s data.
    #[track_caller]
    fn status(&self) -> Value {
        let r = self.get("/status");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["data"].clone()
    }

    /// Waits until `/status` satisfies `f`, or panics with the last status and the log.
    #[track_caller]
    fn wait_status(
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
    fn wait(&self, timeout: Duration, what: &str, f: impl FnMut() -> bool) {
        if !poll_until(timeout, f) {
            panic!(
                "timed out after {timeout:?} waiting for {what}; log:\n{}",
                self.log()
            );
        }
    }

    /// `/metrics` as a scraper reads it (no token).
    #[track_caller]
    fn metrics(&self) -> String {
        http::get(self.addr(), "/metrics", None).text()
    }

    /// The value of one sample of `/metrics`, e.g. `mapsync_pending_changes` or
    /// `mapsync_snapshot_writes_total{result="ok"}` (0 when absent).
    #[track_caller]
    fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Runs asked for over HTTP so far, whatever their result: the sum of
    /// `mapsync_sync_runs_total{trigger="manual",…}`.
    #[track_caller]
    fn manual_runs(&self) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("mapsync_sync_runs_total{trigger=\"manual\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until the first run has finished; returns `/status`'s data.
    #[track_caller]
    fn wait_first_run(&self) -> Value {
        self.wait_status(Duration::from_secs(60), "the start-up run", |s| {
            !s["last_run"].is_null()
        })
    }
}
