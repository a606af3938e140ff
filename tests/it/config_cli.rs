//! `mapsync config check` and `mapsync config show`, run as the real binary on real files:
//! each key's value and origin, secrets masked wherever they come from, the offline check
//! connecting to nothing, and exit 78 naming the key for a configuration that cannot work.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::workspace::{Run, command};
use serde_json::{Value, json};

/// Recognisable secrets: no output may contain them.
const PASSWORD: &str = "pw-Zq81-recognisable";
const TOKEN: &str = "tok-Hx52-recognisable";

/// A temp directory to run in (so that relative defaults stay inside it) and a config file.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name` under the directory; `$DIR` in `text` stands for the directory.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let text = text.replace("$DIR", &self.dir.path().display().to_string());
        std::fs::write(&path, text).expect("write file");
        path
    }

    /// `mapsync --config mapsync.toml <args>` in the directory, with `env` set.
    fn mapsync(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = command();
        cmd.current_dir(self.dir.path())
            .arg("--config")
            .arg(self.path("mapsync.toml"))
            .args(args);
        for (k, v) in env {
            cmd.env(k, v.replace("$DIR", &self.dir.path().display().to_string()));
        }
        let out = crate::harness::workspace::run(cmd);
        for secret in [PASSWORD, TOKEN] {
            assert!(
                !out.all_output().contains(secret),
                "a secret leaked from {args:?}: {out:#?}"
            );
        }
        out
    }
}

/// The keys `config/mapsync.toml` documents, in its order (commented-out ones included).
fn documented_keys() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mapsync.toml");
    let text = std::fs::read_to_string(path).expect("the shipped config file");
    let mut section = "";
    let mut keys = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name;
        } else if let Some((key, _)) = line.strip_prefix("# ").unwrap_or(line).split_once(" = ") {
            if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(keys.len() > 30, "{keys:?}");
    keys
}

/// `config show` as text: key → (origin, value as printed).
fn rows(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut parts = l.splitn(2, ' ');
            let key = parts.next().unwrap_or_default().to_string();
            let rest = parts.next().unwrap_or_default().trim_start();
            let (origin, value) = rest.split_once(' ').unwrap_or((rest, ""));
            (key, origin.to_string(), value.trim_start().to_string())
        })
        .collect()
}

/// Runs `config show` in both formats and checks every key's origin and value against
/// `expected` (key → (origin, JSON value, read_from)); the other keys must be defaults.
fn assert_show(
    setup: &Setup,
    env: &[(&str, &str)],
    expected: &[(&str, &str, Value, Option<&str>)],
) {
    let dir = setup.dir.path().display().to_string();
    let text = setup.mapsync(&["config", "show"], env);
    text.expect_code(0);
    let json = setup.mapsync(&["config", "show", "--format", "json"], env);
    json.expect_code(0);
    let doc = json.json();
    let settings = doc["settings"].as_object().expect("settings object");
    let keys = documented_keys();
    assert_eq!(
        settings.keys().cloned().collect::<Vec<_>>(),
        keys,
        "every key, in the documented order"
    );
    let rows = rows(&text.stdout);
    assert_eq!(
        rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        keys,
        "{}",
        text.stdout
    );
    assert_eq!(
        doc["file"],
        json!(setup.path("mapsync.toml").display().to_string())
    );
    for (key, origin, value, read_from) in expected {
        let value = match value {
            Value::String(s) => Value::String(s.replace("$DIR", &dir)),
            v => v.clone(),
        };
        let got = &settings[*key];
        assert_eq!(got["origin"], json!(origin), "{key}: {got}");
        assert_eq!(got["value"], value, "{key}: {got}");
        assert_eq!(
            got.get("read_from"),
            read_from.map(|f| json!(f)).as_ref(),
            "{key}: {got}"
        );
        let row = rows.iter().find(|r| r.0 == *key).expect("a row per key");
        assert_eq!(row.1, *origin, "{key}: {row:?}");
        let printed = match (&value, got.get("masked")) {
            (Value::String(s), Some(Value::Bool(true))) => s.clone(),
            (Value::Null, _) => String::new(),
            (v, _) => v.to_string(),
        };
        let printed = match read_from {
            Some(f) => format!("{printed}  (read from {f})"),
            None => printed,
        };
        assert_eq!(row.2, printed, "{key}: {row:?}");
    }
    for (key, shown) in settings {
        if !expected.iter().any(|e| e.0 == key) {
            assert_eq!(shown["origin"], "default", "{key}: {shown}");
        }
    }
}

#[test]
fn show_gives_every_key_its_value_and_origin_and_masks_the_secrets() {
    let s = Setup::new();
    let url =
        format!("postgres://mapsync:{PASSWORD}@db.example.com:6543/postgres?sslmode=verify-full");
    let masked = "postgres://mapsync:***@db.example.com:6543/postgres?sslmode=verify-full";
    s.write("target-url", &format!("{url}\n"));
    s.write("admin-token", &format!("{TOKEN}\n"));

    // The secrets through files: target.url_file named in the file, http.admin_token_file in
    // the environment; and a key of the file overridden by the environment.
    s.write(
        "mapsync.toml",
        "[source]\nsqlite_path = \"$DIR/app/db.sqlite3\"\n[watch]\ndebounce_ms = 300\nmax_delay_ms = 4000\n[target]\nurl_file = \"$DIR/target-url\"\n[snapshot]\nkeep = 7\n",
    );
    assert_show(
        &s,
        &[
            ("MAPSYNC_WATCH__DEBOUNCE_MS", "50"),
            ("MAPSYNC_HTTP__ADMIN_TOKEN_FILE", "$DIR/admin-token"),
            ("MAPSYNC_LOG__FORMAT", "json"),
        ],
        &[
            (
                "source.sqlite_path",
                "file",
                json!("$DIR/app/db.sqlite3"),
                None,
            ),
            ("watch.debounce_ms", "environment", json!(50), None),
            ("watch.max_delay_ms", "file", json!(4000), None),
            ("target.url", "file", json!(masked), Some("target.url_file")),
            ("target.url_file", "file", json!("$DIR/target-url"), None),
            ("snapshot.keep", "file", json!(7), None),
            (
                "http.admin_token",
                "environment",
                json!("***"),
                Some("http.admin_token_file"),
            ),
            (
                "http.admin_token_file",
                "environment",
                json!("$DIR/admin-token"),
                None,
            ),
            ("log.format", "environment", json!("json"), None),
        ],
    );

    // The secrets inline in the file.
    s.write(
        "mapsync.toml",
        &format!("[target]\nurl = \"{url}\"\n[http]\nadmin_token = \"{TOKEN}\"\n"),
    );
    assert_show(
        &s,
        &[],
        &[
            ("target.url", "file", json!(masked), None),
            ("http.admin_token", "file", json!("***"), None),
        ],
    );

    // The secrets in the environment, over the file's.
    let other = url.replace("db.example.com:6543", "10.1.2.3:5432");
    assert_show(
        &s,
        &[
            ("MAPSYNC_TARGET__URL", &other),
            ("MAPSYNC_HTTP__ADMIN_TOKEN", TOKEN),
        ],
        &[
            (
                "target.url",
                "environment",
                json!("postgres://mapsync:***@10.1.2.3:5432/postgres?sslmode=verify-full"),
                None,
            ),
            ("http.admin_token", "environment", json!("***"), None),
        ],
    );
    // No secret in the check's output either, whichever way it came.
    s.mapsync(&["config", "check"], &[("MAPSYNC_TARGET__URL", &other)])
        .expect_code(0);

    // Unset secrets show nothing.
    s.write("mapsync.toml", "");
    assert_show(&s, &[], &[]);
    let text = s.mapsync(&["config", "show"], &[]).stdout;
    let token = rows(&text).into_iter().find(|r| r.0 == "http.admin_token");
    assert_eq!(
        token,
        Some(("http.admin_token".into(), "default".into(), String::new()))
    );
}

#[test]
fn check_passes_offline_and_connects_to_nothing() {
    let s = Setup::new();
    // Postgres "is" on this port: a listener that would see any connection attempt.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("local address").port();
    let connections = || {
        let mut n = 0;
        while listener.accept().is_ok() {
            n += 1;
        }
        n
    };
    let keys = crate::harness::jwt::Keys::generate(s.dir.path());
    let ca = crate::harness::TestCa::new();
    std::fs::create_dir(s.path("app")).expect("the application's directory");
    s.write(
        "mapsync.toml",
        &format!(
            "[source]\nsqlite_path = \"$DIR/app/db.sqlite3\"\n[target]\nurl = \"postgres://mapsync:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=verify-full\"\nssl_root_cert = {:?}\nconnect_timeout_ms = 1000\n[snapshot]\ndir = \"$DIR/data/snapshots\"\n[http]\nlisten = \"0.0.0.0:9187\"\njwt_secret_file = {:?}\njwt_jwks_file = {:?}\n",
            ca.ca_cert, keys.secret_file, keys.jwks_file
        ),
    );
    let env = [("MAPSYNC_HTTP__ADMIN_TOKEN", TOKEN)];
    let check = s.mapsync(&["config", "check"], &env);
    check.expect_code(0);
    assert!(!check.all_output().contains(&keys.secret), "{check:#?}");
    let sections: Vec<&str> = check
        .stdout
        .lines()
        .map(|l| {
            assert!(l.starts_with("ok   ") || l.starts_with("warn "), "{l}");
            &l[5..l.find(':').unwrap_or(5)]
        })
        .collect();
    assert_eq!(
        sections,
        [
            "config", "file", "source", "target", "schedule", "snapshot", "http"
        ],
        "{check:#?}"
    );
    let line = |what: &str| {
        check
            .stdout
            .lines()
            .find(|l| l[5..].starts_with(&format!("{what}: ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("target").contains(&format!("postgres://mapsync:***@127.0.0.1:{port}/postgres")),
        "{check:#?}"
    );
    assert!(line("schedule").contains("next at 20"), "{check:#?}");
    assert!(
        line("snapshot").contains("does not exist yet"),
        "{check:#?}"
    );
    assert!(line("http").contains("ES256"), "{check:#?}");
    // No SQLite file was created, and nothing connected.
    assert!(!s.path("app/db.sqlite3").exists());
    assert!(!s.path("data").exists());
    s.mapsync(&["config", "show"], &env).expect_code(0);
    assert_eq!(
        connections(),
        0,
        "config check or show connected to the target"
    );

    // The listener does see a command that connects: `mapsync check`.
    let online = s.mapsync(&["check"], &env);
    assert!(online.stdout.contains("FAIL postgres"), "{online:#?}");
    assert!(
        connections() > 0,
        "the listener saw no connection from `mapsync check`"
    );
}

/// `mapsync run` (the daemon) with `env`, which must stop by itself: what it printed.
fn daemon_start_up(s: &Setup, env: &[(&str, &str)]) -> Run {
    let mut cmd = command();
    cmd.current_dir(s.dir.path())
        .arg("--config")
        .arg(s.path("mapsync.toml"))
        .arg("run")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the mapsync binary runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait for the daemon").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started on a configuration it should refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("the daemon's output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn an_invalid_configuration_exits_78_naming_the_key_as_the_daemon_does() {
    let s = Setup::new();
    s.write("not-json", "this is not a JWKS document\n");
    std::fs::create_dir(s.path("a-directory")).expect("mkdir");
    for (toml, env, key) in [
        (
            "[schedule]\nreconcile = \"*/5 * * * *\"\n",
            None,
            "schedule.reconcile",
        ),
        (
            "[watch]\ndebounce_ms = \"soon\"\n",
            None,
            "watch.debounce_ms",
        ),
        (
            "",
            Some(("MAPSYNC_TARGET__POOL_SIZE", "four")),
            "MAPSYNC_TARGET__POOL_SIZE",
        ),
        ("[watch]\ndebounce = 5\n", None, "watch.debounce"),
        ("", Some(("MAPSYNC_WATCH__DEBOUNCE", "5")), "watch.debounce"),
        (
            "[target]\nurl_file = \"$DIR/no-such-file\"\n",
            None,
            "target.url_file",
        ),
        (
            "[target]\nurl_file = \"$DIR/a-directory\"\n",
            None,
            "target.url_file",
        ),
        (
            "[http]\njwt_jwks_file = \"$DIR/not-json\"\n",
            None,
            "http.jwt_jwks_file",
        ),
        // What the daemon can only find out by reading a file or the calendar: refused at
        // start-up too, not after it has begun serving.
        (
            "[target]\nurl = \"postgres://u:pw@127.0.0.1:9/db?sslmode=verify-full\"\nssl_root_cert = \"$DIR/not-json\"\n",
            None,
            "target.ssl_root_cert",
        ),
        (
            "[target]\nurl = \"postgres://u:pw@127.0.0.1:9/db?sslmode=verify-full&sslrootcert=$DIR/not-json\"\n",
            None,
            "target.url",
        ),
        (
            "[schedule]\nreconcile = \"0 0 0 30 2 *\"\n",
            None,
            "schedule.reconcile",
        ),
    ] {
        s.write("mapsync.toml", toml);
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let daemon = daemon_start_up(&s, &env);
        for args in [&["config", "check"][..], &["config", "show"]] {
            let run = s.mapsync(args, &env);
            run.expect_code(78);
            assert_eq!(run.stdout, "", "{toml}: {run:#?}");
            assert!(
                run.stderr.starts_with("error: bad configuration: ")
                    && run.stderr.contains(key)
                    && run.stderr.trim_end().lines().count() == 1,
                "{toml} {env:?}: {run:#?}"
            );
            assert_eq!(run.stderr, daemon.stderr, "the daemon's own error");
        }
        assert_eq!(daemon.code, 78, "{daemon:#?}");
    }
}

#[test]
fn check_fails_with_78_on_what_loading_accepts_but_cannot_work() {
    let s = Setup::new();
    s.write("a-file", "");
    std::fs::create_dir(s.path("app")).expect("mkdir");
    for (toml, key) in [
        (
            "[snapshot]\ndir = \"$DIR/a-file/snapshots\"\n",
            "snapshot.dir",
        ),
        (
            "[source]\nsqlite_path = \"$DIR/app\"\n",
            "source.sqlite_path",
        ),
    ] {
        s.write(
            "mapsync.toml",
            &format!("{toml}\n[http]\nadmin_token = \"{TOKEN}\"\n"),
        );
        let run = s.mapsync(&["config", "check"], &[]);
        run.expect_code(78);
        let fails: Vec<&str> = run
            .stdout
            .lines()
            .filter(|l| l.starts_with("FAIL "))
            .collect();
        assert_eq!(fails.len(), 1, "{toml}: {run:#?}");
        assert!(fails[0].contains(&format!(": {key}: ")), "{toml}: {run:#?}");
        // The rest of the report is still there.
        assert!(
            run.stdout.lines().any(|l| l.starts_with("ok   http: ")),
            "{run:#?}"
        );
    }
}

#[test]
fn check_warns_about_what_depends_on_the_host_or_the_user() {
    let s = Setup::new();
    s.write(
        "mapsync.toml",
        "[source]\nsqlite_path = \"$DIR/missing/db.sqlite3\"\n[snapshot]\ndir = \"$DIR/snapshots\"\n",
    );
    let run = s.mapsync(&["config", "check"], &[]);
    run.expect_code(0);
    let warn: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("warn "))
        .collect();
    let missing = s.path("missing").display().to_string();
    assert_eq!(warn.len(), 1, "{run:#?}");
    assert!(
        warn[0].starts_with("warn source: source.sqlite_path: ") && warn[0].contains(&missing),
        "{run:#?}"
    );

    // The directory exists, the file not yet: a warning too.
    std::fs::create_dir(s.path("missing")).expect("mkdir");
    let run = s.mapsync(&["config", "check"], &[]);
    run.expect_code(0);
    assert!(
        run.stdout.contains("warn source: source.sqlite_path: ")
            && run.stdout.contains("does not exist yet"),
        "{run:#?}"
    );

    // And without any config file, the defaults apply: said, not failed.
    let mut cmd = command();
    cmd.current_dir(s.dir.path()).args(["config", "check"]);
    let defaults = crate::harness::workspace::run(cmd);
    defaults.expect_code(0);
    assert!(
        defaults.stdout.contains("warn file: no --config given"),
        "{defaults:#?}"
    );
}

#[test]
fn an_environment_variable_that_is_not_utf8_stops_nothing_and_one_of_ours_is_named() {
    use std::os::unix::ffi::OsStrExt as _;
    let s = Setup::new();
    s.write("mapsync.toml", "");
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let config_check = |name: &str| {
        let mut cmd = command();
        cmd.current_dir(s.dir.path())
            .arg("--config")
            .arg(s.path("mapsync.toml"))
            .args(["config", "check"])
            .env(name, bad);
        crate::harness::workspace::run(cmd)
    };
    // Someone else's variable: not ours to read, so not ours to fail on.
    let run = config_check("LANG_OF_SOMEONE_ELSE");
    run.expect_code(0);
    // One of ours: a one-line error naming it, exit 78 (no panic, no backtrace).
    let run = config_check("MAPSYNC_HTTP__ADMIN_TOKEN");
    run.expect_code(78);
    assert!(
        run.stderr
            .starts_with("error: bad configuration: MAPSYNC_HTTP__ADMIN_TOKEN")
            && run.stderr.trim_end().lines().count() == 1,
        "{run:#?}"
    );
}
