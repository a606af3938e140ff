//! `mapsync config check` and `mapsync config show`: the configuration on its own, offline.
//!
//! Both load the settings exactly as the daemon does, so a configuration the daemon would
//! refuse is refused with the daemon's own one-line error (exit 78). `config check` then checks
//! what loading leaves to run time, without opening the SQLite file, connecting to Postgres or
//! using the network, and prints one line per section or per problem, marked as `mapsync check`
//! marks its lines:
//!
//! | line | `FAIL` (exit 78) | `warn` (exit 0) |
//! |---|---|---|
//! | `file` | | no `--config`, and no `config/mapsync.toml` here: the defaults apply |
//! | `source` | `source.sqlite_path` is a directory, or a file stands where its directory should | the file or its directory does not exist, or this user cannot read it |
//! | `tls` | | a remote host whose certificate is not verified (the line `mapsync check` prints) |
//! | `snapshot` | a file stands where `snapshot.dir` or one of its parents should be | this user cannot write to it, or cannot create it |
//!
//! A CA file that holds no PEM certificate, or a cron expression no date matches
//! (`0 0 0 30 2 *`), is refused by loading itself, so the daemon refuses it too (exit 78).
//!
//! What depends on the user is a warning, not a failure: the service usually runs as a user of
//! its own, whose rights are not this user's. The checks use access(2), so they write nothing.

use std::fs::Metadata;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

use super::{CheckLine, Verdict, config_line, tls_line};
use crate::config::{DEFAULT_CONFIG_PATH, Effective, Origin, Settings, Shown};

/// `mapsync config check`: the lines to print; any `FAIL` line makes it exit 78.
pub fn check(effective: &Effective) -> Vec<CheckLine> {
    let s = &effective.settings;
    let mut lines = vec![config_line(s), file_line(effective), source_line(s)];
    lines.extend(target_lines(effective));
    lines.push(schedule_line(s));
    lines.push(snapshot_line(s));
    lines.push(http_line(s));
    lines
}

fn line(verdict: Verdict, what: &'static str, detail: String) -> CheckLine {
    CheckLine {
        verdict,
        what,
        detail,
    }
}

/// `path` made absolute for messages (as it is when it cannot be).
fn shown_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn file_line(e: &Effective) -> CheckLine {
    let count = |origin| {
        e.settings
            .origins
            .iter()
            .filter(|(_, o)| *o == origin)
            .count()
    };
    let (from_file, from_env) = (count(Origin::File), count(Origin::Environment));
    match &e.file {
        Some(file) => line(
            Verdict::Ok,
            "file",
            format!(
                "{}: {from_file} keys set there, {from_env} in the environment, the others default (`mapsync config show` lists them)",
                shown_path(file).display()
            ),
        ),
        None => line(
            Verdict::Warn,
            "file",
            format!(
                "no --config given and no {} here: the built-in defaults apply, with {from_env} keys from the environment; give --config FILE (/etc/mapsync/mapsync.toml when installed)",
                shown_path(Path::new(DEFAULT_CONFIG_PATH)).display()
            ),
        ),
    }
}

/// Whether this user may access `path` for `mode` (`libc::R_OK`, `libc::W_OK | libc::X_OK`), as
/// the kernel decides: permissions, ACLs, a read-only file system.
fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call, which only reads it.
    if unsafe { libc::access(c.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `path` itself or its nearest ancestor that exists, with its metadata. An error other than
/// "not found" (permission denied, a file where a directory should be) ends the search.
fn nearest_existing(path: &Path) -> io::Result<(&Path, Metadata)> {
    for at in path.ancestors() {
        let at = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        match std::fs::metadata(at) {
            Ok(meta) => return Ok((at, meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::ErrorKind::NotFound.into())
}

/// The SQLite file's path, looked at but never opened.
fn source_line(s: &Settings) -> CheckLine {
    let path = &s.source.sqlite_path;
    let dir = crate::parent_dir(path);
    let shown = shown_path(path);
    let (p, d) = (shown.display(), shown_path(dir));
    let d = d.display();
    let cannot_look = |e: io::Error| {
        line(
            Verdict::Warn,
            "source",
            format!(
                "source.sqlite_path: this user cannot look at {p} ({e}): fine if the service's user can"
            ),
        )
    };
    match nearest_existing(path) {
        Ok((at, meta)) if at == path.as_path() && meta.is_dir() => line(
            Verdict::Fail,
            "source",
            format!(
                "source.sqlite_path: {p} is a directory: point it at the application's SQLite file (its SQLITE_DB_PATH)"
            ),
        ),
        Ok((at, _)) if at == path.as_path() => match access(path, libc::R_OK) {
            Ok(()) => line(
                Verdict::Ok,
                "source",
                format!("{p} exists (not opened here: `mapsync check` reads it)"),
            ),
            Err(e) => line(
                Verdict::Warn,
                "source",
                format!(
                    "source.sqlite_path: this user cannot read {p} ({e}): fine if the service's user can"
                ),
            ),
        },
        Ok((at, meta)) if !meta.is_dir() => line(
            Verdict::Fail,
            "source",
            format!(
                "source.sqlite_path: {} is a file, so {p} cannot exist: fix the path (the application's SQLITE_DB_PATH)",
                shown_path(at).display()
            ),
        ),
        Ok((at, _)) if at == dir => line(
            Verdict::Warn,
            "source",
            format!(
                "source.sqlite_path: {p} does not exist yet (its directory does): runs fail until the application creates it"
            ),
        ),
        Ok(_) => line(
            Verdict::Warn,
            "source",
            format!(
                "source.sqlite_path: the directory {d} does not exist, and the daemon does not start without it: create it or fix the path (the application's SQLITE_DB_PATH)"
            ),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => line(
            Verdict::Fail,
            "source",
            format!(
                "source.sqlite_path: a file stands in the path {p}: fix the path (the application's SQLITE_DB_PATH)"
            ),
        ),
        Err(e) => cannot_look(e),
    }
}

/// The target as it would be set up, without connecting (loading already read and parsed the
/// CA file, as the connection pool uses it).
fn target_lines(e: &Effective) -> Vec<CheckLine> {
    let t = &e.settings.target;
    let ca = t
        .connect
        .as_ref()
        .and_then(|spec| spec.ssl_root_cert.as_deref());
    let url = e
        .keys
        .iter()
        .find(|k| k.key == "target.url")
        .and_then(|k| k.value.as_ref())
        .and_then(toml::Value::as_str);
    let detail = match url {
        Some(url) => format!(
            "{url}, table {}{} (not contacted here: `mapsync check` connects)",
            t.table,
            ca.map(|ca| format!(", CA certificates from {}", ca.display()))
                .unwrap_or_default()
        ),
        None => {
            "none: snapshots-only mode (set target.url or target.url_file to mirror into Postgres)"
                .into()
        }
    };
    let mut lines = vec![line(Verdict::Ok, "target", detail)];
    lines.extend(tls_line(&e.settings));
    lines
}

/// Each cron expression's next run, as the engine computes it (loading refused any that
/// never fires).
fn schedule_line(s: &Settings) -> CheckLine {
    let now = chrono::Utc::now();
    let next: Vec<String> = [
        ("schedule.reconcile", &s.schedule.reconcile),
        ("schedule.snapshot", &s.schedule.snapshot),
    ]
    .into_iter()
    .map(|(key, schedule)| {
        let at = schedule.next_after(now).map_or_else(
            || "never".to_string(),
            |at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        );
        format!("{key} \"{}\" next at {at}", schedule.as_str())
    })
    .collect();
    line(Verdict::Ok, "schedule", next.join("; "))
}

/// Whether the snapshot directory exists and this user can write to it, or create it.
fn snapshot_line(s: &Settings) -> CheckLine {
    let dir = &s.snapshot.dir;
    let shown = shown_path(dir);
    let d = shown.display();
    let keep = s.snapshot.keep;
    match nearest_existing(dir) {
        Ok((at, meta)) if !meta.is_dir() => line(
            Verdict::Fail,
            "snapshot",
            format!(
                "snapshot.dir: {} is a file, so {d} cannot be a directory: move it or fix the path",
                shown_path(at).display()
            ),
        ),
        Ok((at, _)) => match (at == dir.as_path(), access(at, libc::W_OK | libc::X_OK)) {
            (true, Ok(())) => line(
                Verdict::Ok,
                "snapshot",
                format!("{d} exists and this user can write to it (keeps {keep} snapshots)"),
            ),
            (false, Ok(())) => line(
                Verdict::Ok,
                "snapshot",
                format!(
                    "{d} does not exist yet: mapsync creates it (mode 0700) in {}, which this user can write to (keeps {keep} snapshots)",
                    shown_path(at).display()
                ),
            ),
            (true, Err(e)) => line(
                Verdict::Warn,
                "snapshot",
                format!(
                    "snapshot.dir: this user cannot write to {d} ({e}): fine if the service's user can"
                ),
            ),
            (false, Err(e)) => line(
                Verdict::Warn,
                "snapshot",
                format!(
                    "snapshot.dir: {d} does not exist, and this user cannot create it in {} ({e}): create it for the service's user, or fix the path",
                    shown_path(at).display()
                ),
            ),
        },
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => line(
            Verdict::Fail,
            "snapshot",
            format!("snapshot.dir: a file stands in the path {d}: move it or fix the path"),
        ),
        Err(e) => line(
            Verdict::Warn,
            "snapshot",
            format!(
                "snapshot.dir: this user cannot look at {d} ({e}): fine if the service's user can"
            ),
        ),
    }
}

/// The admin port's address and the credentials that loading read and parsed.
fn http_line(s: &Settings) -> CheckLine {
    let h = &s.http;
    let mut credentials = Vec::new();
    if h.admin_token.is_some() {
        credentials.push("the admin token".to_string());
    }
    if h.jwt.secret.is_some() {
        credentials.push("login tokens signed with http.jwt_secret_file (HS256)".into());
    }
    if let Some(jwks) = &h.jwt.jwks {
        credentials.push(format!(
            "login tokens signed with the keys of http.jwt_jwks_file {jwks:?}"
        ));
    }
    let credentials = if credentials.is_empty() {
        "no credential: the token routes answer same-origin requests only".to_string()
    } else {
        format!("accepts {}", credentials.join(", "))
    };
    line(
        Verdict::Ok,
        "http",
        format!("listens on {} (not bound here); {credentials}", h.listen),
    )
}

/// `mapsync config show`: one line per key, aligned: `key  origin  value`, after a line naming
/// the file. A masked secret is shown bare (`***`), every other value as TOML writes it; a
/// value read from a `*_file` key says so.
pub fn show_text(e: &Effective) -> String {
    let mut out = match &e.file {
        Some(file) => format!("# file: {}\n", shown_path(file).display()),
        None => format!(
            "# file: none ({} does not exist): built-in defaults and environment\n",
            shown_path(Path::new(DEFAULT_CONFIG_PATH)).display()
        ),
    };
    let width = e.keys.iter().map(|k| k.key.len()).max().unwrap_or(0);
    for k in &e.keys {
        let value = match &k.value {
            None => String::new(),
            Some(toml::Value::String(s)) if k.masked => s.clone(),
            Some(v) => toml_text(v),
        };
        let note = k
            .read_from
            .map(|f| format!("  (read from {f})"))
            .unwrap_or_default();
        let row = format!("{:width$}  {:11}  {value}{note}", k.key, k.origin.as_str());
        out.push_str(row.trim_end());
        out.push('\n');
    }
    out
}

/// A value as it would be written in the TOML file.
fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_text).collect::<Vec<_>>().join(", ")
        ),
        toml::Value::Table(_) => "{…}".into(),
    }
}

/// `mapsync config show --format json`: `{"file": …, "settings": {"section.key": {"value": …,
/// "origin": …}}}`, keys in the documented order; a masked secret has `"masked": true`, a value
/// read from a `*_file` key `"read_from"`, an unset key `"value": null`.
#[derive(Serialize)]
pub struct ShowJson<'a> {
    file: Option<PathBuf>,
    settings: Keys<'a>,
}

struct Keys<'a>(&'a [Shown]);

impl Serialize for Keys<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|k| (k.key, k)))
    }
}

pub fn show_json(e: &Effective) -> ShowJson<'_> {
    ShowJson {
        file: e.file.as_deref().map(shown_path),
        settings: Keys(&e.keys),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effective(toml: &str) -> (tempfile::TempDir, Effective) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mapsync.toml");
        let toml = toml.replace("$DIR", &dir.path().display().to_string());
        std::fs::write(&file, toml).unwrap();
        let e = Effective::load_with_env(Some(&file), []).unwrap();
        (dir, e)
    }

    fn verdicts(lines: &[CheckLine]) -> Vec<String> {
        lines
            .iter()
            .map(|l| format!("{:?} {}", l.verdict, l.what))
            .collect()
    }

    #[test]
    fn a_good_configuration_passes_with_a_line_per_section() {
        let (dir, e) = effective(
            "[source]\nsqlite_path = \"$DIR/db.sqlite3\"\n[snapshot]\ndir = \"$DIR/snapshots\"\n",
        );
        std::fs::write(dir.path().join("db.sqlite3"), "").unwrap();
        let lines = check(&e);
        assert_eq!(
            verdicts(&lines),
            [
                "Ok config",
                "Ok file",
                "Ok source",
                "Ok target",
                "Ok schedule",
                "Ok snapshot",
                "Ok http"
            ],
            "{lines:#?}"
        );
        assert!(
            lines[4]
                .detail
                .contains("schedule.reconcile \"0 */5 * * * *\" next at 20")
        );
        assert!(
            lines[5]
                .detail
                .contains("does not exist yet: mapsync creates it")
        );
    }

    #[test]
    fn what_no_user_could_use_fails() {
        let (dir, e) = effective(
            "[source]\nsqlite_path = \"$DIR\"\n[snapshot]\ndir = \"$DIR/file/snapshots\"\n",
        );
        std::fs::write(dir.path().join("file"), "").unwrap();
        let lines = check(&e);
        let failed: Vec<&CheckLine> = lines.iter().filter(|l| l.failed()).collect();
        assert_eq!(failed.len(), 2, "{lines:#?}");
        assert!(
            failed[0].detail.starts_with("source.sqlite_path: "),
            "{failed:?}"
        );
        assert!(failed[1].detail.starts_with("snapshot.dir: "), "{failed:?}");
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_refused_by_loading_when_a_target_uses_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let file = dir.path().join("mapsync.toml");
        let url = "url = \"postgres://u:pw@db.example.com/db?sslmode=verify-full\"\n";
        std::fs::write(
            &file,
            format!("[target]\n{url}ssl_root_cert = {:?}\n", ca.display()),
        )
        .unwrap();
        let e = Effective::load_with_env(Some(&file), []).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("bad configuration: target.ssl_root_cert: ")
                && e.to_string().contains("holds no certificate"),
            "{e}"
        );
    }

    #[test]
    fn show_aligns_the_columns() {
        let (_dir, e) = effective("[watch]\ndebounce_ms = 300\n");
        let text = show_text(&e);
        let rows: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(rows.len(), e.keys.len());
        let origin_at = rows[0].find("default").unwrap();
        for row in &rows {
            let origin = row.get(origin_at..).and_then(|r| r.split(' ').next());
            assert!(
                matches!(origin, Some("default" | "file" | "environment")),
                "{row}"
            );
        }
        assert!(
            rows.iter()
                .any(|r| r.starts_with("watch.debounce_ms ") && r.ends_with("  file         300")),
            "{text}"
        );
        assert!(text.contains("\"api_key\", \"secret\""), "{text}");
    }
}
