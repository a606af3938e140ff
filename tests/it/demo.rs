//! `mapsync demo`, the newcomer's first command, run as a newcomer would: the real binary in
//! a fresh directory (no config file, no `MAPSYNC_TARGET__URL`), its banner read from stdout,
//! the printed URL and curl lines followed, and Ctrl-C (SIGTERM) ending it cleanly. The admin
//! port is moved off 9187 with `MAPSYNC_HTTP__LISTEN` so tests never collide.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::http;
use crate::harness::sys::{collect_lines, poll_until, signal_and_wait, which};
use crate::harness::workspace::{command, remote_count, remote_rows, supabase_db};
use crate::harness::*;
use serde_json::Value;

/// 19 rows in `llm_model_mappings` and one prompt mapping.
const DEMO_MAPPINGS: u64 = 20;
const WAIT: Duration = Duration::from_secs(60);

/// A running `mapsync demo`; SIGTERM (then SIGKILL) on Drop.
struct Demo {
    child: Child,
    addr: SocketAddr,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Demo {
    /// `mapsync demo` in `dir`, listening on a free loopback port, with `env` added (e.g.
    /// `MAPSYNC_TARGET__URL`); returns once `/livez` answers.
    fn start(dir: &Path, env: &[(&str, &str)]) -> Demo {
        Self::start_with(dir, &[], env)
    }

    /// `mapsync demo <args>`, as [`Demo::start`].
    fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Demo {
        let mut last = String::new();
        for _ in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut cmd = command();
            cmd.arg("demo")
                .args(args)
                .current_dir(dir)
                .env("MAPSYNC_HTTP__LISTEN", addr.to_string())
                .env("MAPSYNC_LOG__FORMAT", "text")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.envs(env.iter().copied());
            let mut child = cmd.spawn().expect("mapsync demo starts");
            let stdout = collect_lines(child.stdout.take().unwrap());
            let stderr = collect_lines(child.stderr.take().unwrap());
            let mut exited = None;
            let up = poll_until(WAIT, || {
                if let Ok(Some(s)) = child.try_wait() {
                    exited = Some(s);
                    return true;
                }
                http::try_request(addr, "GET", "/livez", &[], b"").is_ok_and(|r| r.status == 200)
            });
            let demo = Demo {
                child,
                addr,
                stdout,
                stderr,
            };
            if up && exited.is_none() {
                return demo;
            }
            last = format!(
                "exit: {exited:?}\nstdout:\n{}\nstderr:\n{}",
                demo.stdout(),
                demo.stderr()
            );
            if !last.contains("in use") {
                break;
            }
        }
        panic!("mapsync demo did not come up: {last}");
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> http::Reply {
        http::get(self.addr, path, None)
    }

    /// Waits until `/status`'s data satisfies `f`.
    #[track_caller]
    fn wait_status(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        if poll_until(WAIT, || {
            let r = self.get("/status");
            last = if r.status == 200 {
                r.json()["data"].clone()
            } else {
                Value::from(r.text())
            };
            f(&last)
        }) {
            return last;
        }
        panic!(
            "timed out waiting for {what}; last status: {last:#}\nstderr:\n{}",
            self.stderr()
        );
    }

    /// Sends `signal`; the exit status and how long it took (panics after 10 s).
    fn terminate(&mut self, signal: i32) -> (ExitStatus, Duration) {
        signal_and_wait(&mut self.child, signal, Duration::from_secs(10)).unwrap_or_else(|_| {
            panic!(
                "mapsync demo did not exit within 10 s of signal {signal}; stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// SIGTERM (or SIGINT: Ctrl-C), and asserts a clean exit (code 0) within 10 s.
    #[track_caller]
    fn stop_cleanly(&mut self, signal: i32) {
        let (status, took) = self.terminate(signal);
        assert_eq!(
            status.code(),
            Some(0),
            "exit status {status:?} after signal {signal}; stderr:\n{}",
            self.stderr()
        );
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = signal_and_wait(&mut self.child, libc::SIGTERM, Duration::from_secs(10));
    }
}

/// Every mapping the admin port lists, by id.
fn mappings(demo: &Demo) -> Vec<Value> {
    let r = demo.get("/mappings?limit=500");
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.json()["data"].clone();
    assert_eq!(data["total"], data["items"].as_array().unwrap().len());
    data["items"].as_array().unwrap().clone()
}

/// The snapshot files (not `model-mappings-latest.json`) in `dir`.
fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy();
                    n.starts_with("model-mappings-")
                        && n.ends_with(".json")
                        && !n.contains("latest")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(rows in llm_model_mappings, rows in ai_prompts)` of the demo database.
fn sqlite_counts(db: &Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let count = |t: &str| -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
            .unwrap()
    };
    (count("llm_model_mappings"), count("ai_prompts"))
}

/// One of the printed curl lines as (method, URL, the whole command).
fn curl_lines(stdout: &str) -> Vec<(String, String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let cmd = l[l.find("curl ")?..].trim().to_string();
            let url = cmd
                .split_whitespace()
                .find(|w| w.starts_with("http://"))?
                .to_string();
            let method = if cmd.contains("-X POST") {
                "POST"
            } else {
                "GET"
            };
            Some((method.to_string(), url, cmd))
        })
        .collect()
}

/// Checks the banner's two curl lines (sync, then export, against this demo) and follows them:
/// the same requests through the test's HTTP client, and, where curl is installed, the lines
/// themselves pasted into `sh` with `$TOKEN` set to `token`.
#[track_caller]
fn follow_curl_lines(demo: &Demo, stdout: &str, token: Option<&str>, sync_status: &str) {
    let base = format!("http://{}", demo.addr);
    let curls = curl_lines(stdout);
    assert_eq!(curls.len(), 2, "two curl lines: {stdout}");
    assert_eq!(curls[0].0, "POST");
    assert_eq!(
        curls[0].1,
        format!("{base}/api/v1/llm/model-groups/sync-to-supabase")
    );
    assert_eq!(curls[1].0, "GET");
    assert_eq!(curls[1].1, format!("{base}/export"));
    assert!(curls[1].2.contains("-OJ"), "{}", curls[1].2);
    for (_, _, cmd) in &curls {
        assert_eq!(
            cmd.contains("-H \"Authorization: Bearer $TOKEN\""),
            token.is_some(),
            "the token header is there exactly when a token is set: {cmd}"
        );
    }
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    for (method, url, _) in &curls {
        let path = &url[base.len()..];
        let r = http::request(demo.addr, method, path, &headers, b"");
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        if method == "POST" {
            assert_eq!(r.json()["data"]["status"], sync_status);
        } else {
            assert!(
                r.header("content-disposition")
                    .is_some_and(|d| d.contains("filename=\"model-mappings-")),
                "{:?}",
                r.headers
            );
            assert_eq!(r.json()["count"], DEMO_MAPPINGS);
        }
    }
    assert!(
        which("curl").is_some(),
        "curl is missing: apt-get install -y curl (the banner's commands are run as printed)"
    );
    // As a newcomer would paste them.
    let downloads = tempfile::tempdir().unwrap();
    for (method, _, cmd) in &curls {
        let mut sh = std::process::Command::new("sh");
        sh.arg("-c")
            .arg(format!("{cmd} --fail"))
            .current_dir(downloads.path());
        if let Some(t) = token {
            sh.env("TOKEN", t);
        }
        let out = sh.output().unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        if method == "POST" {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["code"], 200, "{v}");
        }
    }
    let saved: Vec<String> = std::fs::read_dir(downloads.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        saved.len() == 1 && saved[0].starts_with("model-mappings-"),
        "curl -OJ saved {saved:?}"
    );
}

/// The processes whose command line names `needle` (a cluster's data directory).
fn processes_naming(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn demo_in_a_fresh_directory_mirrors_twenty_mappings_into_its_own_postgres() {
    assert!(
        crate::harness::pg::pg_bin_dir().is_dir(),
        "the demo's whole path needs PostgreSQL's server: apt-get install -y postgresql"
    );
    let dir = tempfile::tempdir().unwrap();
    // As a project directory usually is: others may walk through it (PostgreSQL runs as
    // `postgres` when the tests run as root).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut demo = Demo::start(dir.path(), &[]);
    let base = format!("http://{}", demo.addr);

    // The database and the banner.
    let db = dir.path().join("demo/db.sqlite3");
    assert!(db.is_file(), "./demo/db.sqlite3 was created");
    let stdout = demo.stdout();
    assert!(
        stdout.contains(&format!("{DEMO_MAPPINGS} mappings")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("admin page:") && l.trim_end().ends_with(&format!("{base}/"))),
        "the page URL is printed: {stdout}"
    );
    let page = demo.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>mapsync admin</title>"));
    assert_eq!(demo.get("/livez").json()["status"], "ok");

    // Its own PostgreSQL, under ./demo, with a psql line to look at the table.
    let data_dir = dir.path().join("demo/postgres/data");
    assert!(
        stdout.contains(&data_dir.display().to_string()),
        "the cluster lives under ./demo: {stdout}"
    );
    let psql_line = stdout
        .lines()
        .find_map(|l| {
            l.split_once("look at it:")
                .map(|(_, c)| c.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no psql line: {stdout}"));
    let url = psql_line
        .split('\'')
        .nth(1)
        .unwrap_or_else(|| panic!("no URL in {psql_line}"))
        .to_string();
    let status = demo.wait_status("the start-up sync", |s| s["last_run"]["status"] == "synced");
    assert_eq!(status["target"]["configured"], true, "{status:#}");
    let mirrored = run_psql(&url, "SELECT count(*) FROM public.model_mappings")
        .unwrap_or_else(|e| panic!("{psql_line}: {e}"));
    assert_eq!(mirrored.trim(), DEMO_MAPPINGS.to_string());
    // Trust authentication, so nobody else may reach the cluster: no TCP address, and its
    // socket in a directory only its owner can enter (postmaster.pid: line 5 is the socket
    // directory, line 6 the listen addresses).
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    let lines: Vec<&str> = pid_file.lines().collect();
    assert_eq!(lines.get(5).map(|l| l.trim()), Some(""), "{pid_file}");
    let socket_dir = std::fs::metadata(lines[4]).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&socket_dir.permissions()) & 0o777,
        0o700,
        "{pid_file}"
    );
    // The line itself, pasted into a shell.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&psql_line)
        .env(
            "PATH",
            format!(
                "{}:{}",
                crate::harness::pg::psql_path().parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{psql_line}: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("mapping:acme"));

    // The two curl lines, followed to the letter.
    follow_curl_lines(&demo, &stdout, None, "synced");

    // Twenty mappings, including the prompt's and the legacy tenant row rebuilt.
    demo.wait_status("the first run", |s| {
        !s["last_run"].is_null() && s["source"]["rows"] == DEMO_MAPPINGS
    });
    let ready = demo.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let items = mappings(&demo);
    assert_eq!(items.len() as u64, DEMO_MAPPINGS);
    let ids: Vec<&str> = items.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let prompt = items
        .iter()
        .find(|m| m["id"].as_str().unwrap().starts_with("prompt:"))
        .unwrap_or_else(|| panic!("no prompt: mapping in {ids:?}"));
    assert_eq!(prompt["source"], "prompt", "{prompt}");
    let acme = items
        .iter()
        .find(|m| m["id"] == "mapping:acme")
        .unwrap_or_else(|| panic!("no mapping:acme in {ids:?}"));
    assert_eq!(acme["scope_type"], "mapping", "{acme}");
    assert_eq!(acme["scope_key"], "acme", "{acme}");
    assert!(!ids.iter().any(|id| id.starts_with("tenant:")), "{ids:?}");

    // A snapshot under ./demo/snapshots, with the same twenty; a backup of the source of
    // truth, it keeps the demo's api_key (only the Postgres mirror drops it), readable by
    // the owner alone.
    let snaps = dir.path().join("demo/snapshots");
    let mut files = Vec::new();
    assert!(
        poll_until(WAIT, || {
            files = snapshot_files(&snaps);
            !files.is_empty()
        }),
        "no snapshot in {}; stderr:\n{}",
        snaps.display(),
        demo.stderr()
    );
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["count"], DEMO_MAPPINGS);
    assert!(
        text.contains("sk-demo-kept-in-snapshots"),
        "a snapshot keeps every metadata key"
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&files[0]), 0o600, "a snapshot is private to its owner");
    assert_eq!(mode(&snaps), 0o700, "and so is its directory");

    demo.stop_cleanly(libc::SIGTERM);
    let top: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(top, ["demo"], "the demo writes nothing outside ./demo");
    let data = data_dir.display().to_string();
    assert!(
        poll_until(Duration::from_secs(10), || processes_naming(&data)
            .is_empty()),
        "the demo's PostgreSQL is still running: {:?}",
        processes_naming(&data)
    );
}

#[test]
fn demo_without_postgres_says_how_to_get_the_whole_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Demo::start_with(dir.path(), &["--no-postgres"], &[]);
    let stdout = demo.stdout();
    assert!(stdout.contains("target: none (--no-postgres)"), "{stdout}");
    let status = demo.wait_status("the first run", |s| !s["last_run"].is_null());
    assert_eq!(
        status["last_run"]["status"], "skipped:supabase_not_configured",
        "{status:#}"
    );
    follow_curl_lines(&demo, &stdout, None, "skipped:supabase_not_configured");
    demo.stop_cleanly(libc::SIGINT);
    assert!(!dir.path().join("demo/postgres").exists());
}

#[test]
fn a_second_demo_in_the_same_directory_reuses_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo/db.sqlite3");
    {
        let mut first = Demo::start_with(dir.path(), &["--no-postgres"], &[]);
        first.wait_status("the first run", |s| s["source"]["rows"] == DEMO_MAPPINGS);
        first.stop_cleanly(libc::SIGTERM);
    }
    assert_eq!(sqlite_counts(&db), (19, 1));
    // The user's own change between the two runs must survive the second.
    AppDb::open(&db).upsert(&Row::mapping("mine", "gpt-4o"));

    let mut second = Demo::start_with(dir.path(), &["--no-postgres"], &[]);
    let status = second.wait_status("the first run of the second demo", |s| {
        !s["last_run"].is_null() && s["source"]["rows"] == DEMO_MAPPINGS + 1
    });
    assert_eq!(status["source"]["rows"], DEMO_MAPPINGS + 1, "{status:#}");
    let ids: Vec<String> = mappings(&second)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"mapping:mine".to_string()), "{ids:?}");
    assert!(ids.contains(&"mapping:acme".to_string()), "{ids:?}");
    // Ctrl-C, as the banner says.
    second.stop_cleanly(libc::SIGINT);
    assert_eq!(
        sqlite_counts(&db),
        (20, 1),
        "no demo row was inserted twice"
    );
}

#[test]
fn demo_with_a_target_mirrors_the_twenty_mappings_into_postgres() {
    let pg = supabase_db();
    let dir = tempfile::tempdir().unwrap();
    // `mapsync migrate` the way the README's newcomer would: the same variable, no config.
    let mut migrate = command();
    migrate
        .arg("migrate")
        .current_dir(dir.path())
        .env("MAPSYNC_TARGET__URL", &pg.url);
    crate::harness::workspace::run(migrate).expect_code(0);

    let mut demo = Demo::start(dir.path(), &[("MAPSYNC_TARGET__URL", &pg.url)]);
    assert!(
        demo.stdout().contains("target: MAPSYNC_TARGET__URL"),
        "{}",
        demo.stdout()
    );
    assert!(
        !demo.stdout().contains(pg.url.as_str()),
        "the URL (with its password) is not printed"
    );
    let status = demo.wait_status("the start-up sync", |s| s["last_run"]["status"] == "synced");
    assert_eq!(
        status["last_run"]["synced_count"], DEMO_MAPPINGS,
        "{status:#}"
    );
    assert_eq!(status["target"]["up"], true);
    let ready = demo.get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(remote_count(&pg), DEMO_MAPPINGS);
    let remote = remote_rows(&pg);
    assert_eq!(remote["mapping:acme"]["scope_type"], "mapping");
    assert_eq!(
        remote.values().filter(|r| r["source"] == "prompt").count(),
        1
    );
    assert!(!remote.keys().any(|id| id.starts_with("tenant:")));
    let everything = pg.psql("SELECT string_agg(metadata::text, ' ') FROM public.model_mappings");
    assert!(
        !everything.contains("sk-demo-never-exported"),
        "secrets never reach Postgres"
    );
    demo.stop_cleanly(libc::SIGTERM);
}

#[test]
fn demo_with_a_token_prints_curl_lines_that_send_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = "demo-token-3b7e";
    let mut demo = Demo::start_with(
        dir.path(),
        &["--no-postgres"],
        &[("MAPSYNC_HTTP__ADMIN_TOKEN", token)],
    );
    let stdout = demo.stdout();
    assert!(!stdout.contains(token), "the token itself is not printed");
    assert_eq!(demo.get("/status").status, 401, "the token is enforced");
    follow_curl_lines(
        &demo,
        &stdout,
        Some(token),
        "skipped:supabase_not_configured",
    );
    demo.stop_cleanly(libc::SIGTERM);
}
