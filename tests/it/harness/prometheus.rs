//! A real Prometheus server (Debian's `prometheus` package) scraping the daemon: started on a
//! free loopback port with its TSDB in a temp dir and a generated config (`scrape_interval:
//! 1s`, one job `mapsync` with the given targets), queried over its HTTP API, stopped
//! (SIGTERM, then SIGKILL) and its directory removed on Drop.
//!
//! Prometheus runs fine as root (checked with 2.42: it neither refuses nor warns), so unlike
//! PostgreSQL it is started directly, without `runuser`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http;
use super::sys::{
    collect_lines, free_port, is_executable, poll_until, signal_and_wait, url_encode, which,
};

const NOT_FOUND: &str = "prometheus not found (/usr/bin/prometheus or on PATH): install it with `apt-get install -y prometheus`";

/// The Prometheus binary; panics with the install command when missing.
pub fn prometheus_path() -> PathBuf {
    let default = Path::new("/usr/bin/prometheus");
    if is_executable(default) {
        return default.to_path_buf();
    }
    which("prometheus").unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    /// Its config and data, removed on drop.
    _dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

/// One series of an instant-query answer.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus scraping `/metrics` on each of `targets` every second; returns once
    /// it reports ready.
    pub fn start(targets: &[SocketAddr]) -> Prometheus {
        let bin = prometheus_path();
        let dir = tempfile::tempdir().expect("temp dir for Prometheus");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: mapsync\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .expect("write prometheus.yml");
        let mut last_log = String::new();
        // free_port() can race with another process: retry on "address already in use".
        for _ in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut child = Command::new(&bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--web.enable-lifecycle")
                .arg("--log.level=info")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}. {NOT_FOUND}", bin.display()));
            let log = collect_lines(child.stderr.take().expect("piped stderr"));
            let mut exited = false;
            let ready = poll_until(Duration::from_secs(60), || {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    exited = true;
                    return true;
                }
                http::try_request(addr, "GET", "/-/ready", &[], b"").is_ok_and(|r| r.status == 200)
            });
            if ready && !exited {
                return Prometheus {
                    child,
                    addr,
                    _dir: dir,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if !(exited && last_log.contains("address already in use")) {
                panic!("Prometheus did not become ready (exited: {exited}); its log:\n{last_log}");
            }
        }
        panic!("Prometheus could not bind a free port; its log:\n{last_log}");
    }

    /// Everything Prometheus logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// GET on the HTTP API; the JSON answer's `data` when `status` is `success`, else panics.
    #[track_caller]
    pub fn api(&self, path_and_query: &str) -> Value {
        let r = http::get(self.addr, path_and_query, None);
        let body = r.json();
        assert!(
            r.status == 200 && body["status"] == "success",
            "Prometheus {path_and_query}: {} {}",
            r.status,
            r.text()
        );
        body["data"].clone()
    }

    /// `/api/v1/query` (instant vector): every series with its labels and value.
    #[track_caller]
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .expect("result list")
            .iter()
            .map(|s| Sample {
                labels: s["metric"].as_object().cloned().unwrap_or_default(),
                value: s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: bad sample {s}")),
            })
            .collect()
    }

    /// The value of `promql` when it yields exactly one series.
    pub fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).as_slice() {
            [one] => Some(one.value),
            _ => None,
        }
    }

    /// Waits until `promql` yields one series whose value satisfies `f`; returns the value.
    /// On timeout panics with the last answer, the targets' state and Prometheus's log.
    #[track_caller]
    pub fn wait_value(&self, promql: &str, timeout: Duration, f: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(promql);
            if let [one] = got.as_slice() {
                if f(one.value) {
                    return one.value;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting on `{promql}`; last answer: {got:?}\n\
                     targets: {:#}\nPrometheus log:\n{}",
                    self.api("/api/v1/targets"),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The active targets (`/api/v1/targets` → `activeTargets`).
    pub fn active_targets(&self) -> Vec<Value> {
        self.api("/api/v1/targets")["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = signal_and_wait(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
    }
}
