//! The one-shot subcommands (`sync`, `export`, `check`, `migrate`, `restore`). `main.rs` parses
//! the command line and prints; everything with behaviour lives here, testable as a library.
//!
//! `check` prints one line per check; a `warn` line (a connection to a remote host whose
//! certificate is not verified) points at a fix but never fails the check. [`config`] holds its
//! offline sibling `mapsync config check`, which shares its `config` and `tls` lines, and
//! `mapsync config show`.

use std::io::Write;
use std::path::Path;

use chrono::Utc;

use crate::Error;
use crate::appdb::{ReadMode, SourceImage, SqliteSource};
use crate::config::Settings;
use crate::mapping::{self, Redactor};
use crate::postgres::{ConnectSpec, SslMode, Target};
use crate::snapshot;
use crate::sync::{self, SyncOptions, SyncReport, Trigger};

/// Reads the source once, on the blocking pool.
async fn read_source(settings: &Settings) -> Result<SourceImage, Error> {
    let mut source = SqliteSource::new(
        &settings.source,
        Redactor::new(&settings.snapshot.redact_keys),
    );
    tokio::task::spawn_blocking(move || source.read(ReadMode::Full))
        .await
        .map_err(|e| Error::Other(format!("reading the SQLite file stopped: {e}")))?
        .map_err(Error::from)
}

/// `mapsync sync`: one run, trigger `manual`. With a target, a [`sync::Mode::OneShot`] run:
/// it uses the state the last run left beside the snapshots ([`sync::state`]) unless `full`,
/// and leaves a new one, so a run whose mirror and SQLite file are as the state says scans
/// and reads nothing. A dry run is a full run of a read image and leaves no state.
pub async fn sync(settings: &Settings, opts: SyncOptions, full: bool) -> Result<SyncReport, Error> {
    let target = Target::from_settings(&settings.target)?;
    let limits = sync::Limits::of(&settings.target);
    let run = |mappings, mode| sync::Run {
        mappings,
        mode,
        opts,
        trigger: Trigger::Manual,
        remote_known: 0,
    };
    let ran = match (target.as_ref(), opts.dry_run) {
        (Some(target), false) => {
            let one = sync::state::OneShot::new(settings, target, full);
            sync::run(
                Some(target),
                limits,
                run(&[], sync::Mode::OneShot(Box::new(one))),
            )
            .await?
        }
        (target, _) => {
            let image = read_source(settings).await?;
            sync::run(target, limits, run(&image.mappings, sync::Mode::Full)).await?
        }
    };
    Ok(ran.report)
}

/// `mapsync export`: the snapshot document, to `output` (atomically) or to `stdout`.
/// Returns the number of mappings written.
pub async fn export(
    settings: &Settings,
    output: Option<&Path>,
    stdout: impl Write,
) -> Result<usize, Error> {
    let mut image = read_source(settings).await?;
    mapping::sort_for_export(&mut image.mappings);
    let now = Utc::now();
    let redact = settings.snapshot.redact;
    match output {
        Some(path) => snapshot::write_atomic(path, |f| {
            snapshot::write_document(f, &image.mappings, now, redact)
        })?,
        None => snapshot::write_document(stdout, &image.mappings, now, redact)
            .map_err(|e| Error::Other(format!("cannot write the export to stdout: {e}")))?,
    }
    Ok(image.mappings.len())
}

pub mod config;

/// How a line of `mapsync check` came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but should be fixed; does not fail the check.
    Warn,
    Fail,
}

/// One line of `mapsync check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub verdict: Verdict,
    pub what: &'static str,
    pub detail: String,
}

impl CheckLine {
    pub fn failed(&self) -> bool {
        self.verdict == Verdict::Fail
    }
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{mark} {}: {}", self.what, self.detail)
    }
}

/// Whether `mapsync check` passed: no line failed (warnings pass).
pub fn check_passed(lines: &[CheckLine]) -> bool {
    !lines.iter().any(CheckLine::failed)
}

/// Why the connection to `spec`'s host is not certificate-verified, when that host is not
/// this machine: TLS is off or optional (`disable`, `prefer`), or `require` has no root
/// certificate to check the chain against. `None` when it is verified, or local.
pub fn unverified_tls(spec: &ConnectSpec) -> Option<String> {
    use tokio_postgres::config::Host;
    let remote: Vec<&str> = spec
        .pg
        .get_hosts()
        .iter()
        .filter_map(|h| match h {
            Host::Tcp(name) if !is_local_host(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    let how = match spec.ssl_mode {
        SslMode::VerifyFull | SslMode::VerifyCa => return None,
        SslMode::Require if spec.ssl_root_cert.is_some() => return None,
        SslMode::Require => {
            "sslmode=require without target.ssl_root_cert: encrypted, but any certificate is accepted"
        }
        SslMode::Prefer => {
            "sslmode=prefer: TLS only if the server offers it, any certificate accepted"
        }
        SslMode::Disable => "sslmode=disable: not encrypted",
    };
    let host = remote.first()?;
    Some(format!(
        "the connection to {host} is not certificate-verified ({how}), so a machine on the path \
         could read the password and the rows; fix: set sslmode=verify-full in target.url \
         (…/postgres?sslmode=verify-full) and target.ssl_root_cert to the server's CA certificate (Supabase: Dashboard → \
         Database settings → SSL Configuration → Download certificate)"
    ))
}

/// A host name that stays on this machine: `localhost` (and `*.localhost`) or a loopback
/// address. Unix sockets are not TCP hosts at all.
fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The first line of `mapsync check` and of `mapsync config check`: the settings loaded.
pub fn config_line(settings: &Settings) -> CheckLine {
    CheckLine {
        verdict: Verdict::Ok,
        what: "config",
        detail: format!(
            "valid (target: {}, snapshots in {}, admin port {})",
            settings
                .target
                .url
                .as_ref()
                .map_or("none, snapshots only".to_string(), |_| settings
                    .target
                    .table
                    .to_string()),
            settings.snapshot.dir.display(),
            settings.http.listen
        ),
    }
}

/// The `warn tls` line of `mapsync check` and `mapsync config check`, when the target is a
/// remote host whose certificate is not verified.
pub fn tls_line(settings: &Settings) -> Option<CheckLine> {
    let spec = settings.target.connect.as_ref()?;
    unverified_tls(spec).map(|why| CheckLine {
        verdict: Verdict::Warn,
        what: "tls",
        detail: why,
    })
}

/// `mapsync check`: the config (already loaded), the SQLite file, TLS, Postgres, the table.
pub async fn check(settings: &Settings) -> Vec<CheckLine> {
    let line = |ok: bool, what, detail: String| CheckLine {
        verdict: if ok { Verdict::Ok } else { Verdict::Fail },
        what,
        detail,
    };
    let mut lines = vec![config_line(settings)];
    lines.push(match read_source(settings).await {
        Ok(image) => line(
            true,
            "sqlite",
            format!(
                "{}: {} mappings ({} rows skipped)",
                settings.source.sqlite_path.display(),
                image.mappings.len(),
                image.skipped
            ),
        ),
        Err(e) => line(false, "sqlite", e.to_string()),
    });
    let target = match Target::from_settings(&settings.target) {
        Ok(Some(t)) => t,
        Ok(None) => {
            lines.push(line(
                true,
                "postgres",
                "no target configured (target.url): snapshots-only mode".into(),
            ));
            return lines;
        }
        Err(e) => {
            lines.push(line(false, "postgres", e.to_string()));
            return lines;
        }
    };
    lines.extend(tls_line(settings));
    match target.describe_server().await {
        Ok((version, tls)) => lines.push(line(
            true,
            "postgres",
            format!(
                "{}: PostgreSQL {version}, TLS {}",
                target.display(),
                if tls { "on" } else { "off" }
            ),
        )),
        Err(e) => {
            lines.push(line(false, "postgres", e.to_string()));
            return lines;
        }
    }
    lines.push(match target.check_schema().await {
        Ok(()) => line(
            true,
            "table",
            format!("{} has the expected columns", target.table()),
        ),
        Err(e) => line(false, "table", e.to_string()),
    });
    lines.push(instances_line(&target).await);
    lines
}

/// Which other mapsync instances write the same table (SPEC §2).
async fn instances_line(target: &Target) -> CheckLine {
    let me = target.instance_name();
    let line = |verdict, detail| CheckLine {
        verdict,
        what: "instances",
        detail,
    };
    match target.instances().await {
        Ok(None) => line(
            Verdict::Warn,
            format!(
                "{} is missing: run `mapsync migrate` (sql/004_mapsync_instances.sql); until then a run cannot tell whether another instance writes {}",
                crate::postgres::registry::REGISTRY,
                target.table()
            ),
        ),
        Ok(Some(others)) if others.is_empty() => line(
            Verdict::Ok,
            format!(
                "this instance is `{me}`; no other instance writes {}",
                target.table()
            ),
        ),
        Ok(Some(others)) => {
            let grace = chrono::Duration::from_std(target.instance_grace()).unwrap_or_default();
            let recent: Vec<String> = others
                .iter()
                .filter(|o| o.last_run_at.is_some_and(|t| Utc::now() - t < grace))
                .map(ToString::to_string)
                .collect();
            let all: Vec<String> = others.iter().map(ToString::to_string).collect();
            if recent.is_empty() {
                line(
                    Verdict::Ok,
                    format!(
                        "this instance is `{me}`; other instances recorded for {}, none within target.instance_grace_s: {}",
                        target.table(),
                        all.join("; ")
                    ),
                )
            } else {
                line(
                    Verdict::Fail,
                    format!(
                        "this instance is `{me}`, and another writes {} too: {}; with delete propagation its runs are refused (refused:other_instance) until the other stops for target.instance_grace_s, or give both the same instance.name if they mirror the same file",
                        target.table(),
                        recent.join("; ")
                    ),
                )
            }
        }
        Err(e) => line(Verdict::Fail, e.to_string()),
    }
}

/// Where `mapsync restore` takes its mappings from.
pub enum RestoreFrom {
    File(std::path::PathBuf),
    /// The Postgres mirror (`--from-target`).
    Target,
}

/// `mapsync restore`: the mappings of a file or of the mirror, back into the SQLite file or
/// into a new database (`-o`).
pub async fn restore(
    settings: &Settings,
    from: RestoreFrom,
    opts: crate::appdb::restore::RestoreOptions,
) -> Result<crate::appdb::restore::RestoreReport, Error> {
    use crate::appdb::restore::Entries;
    let redactor = Redactor::new(&settings.snapshot.redact_keys);
    let entries = match from {
        RestoreFrom::File(path) => Entries::from_file(&path, &redactor)?,
        RestoreFrom::Target => {
            let Some(target) = Target::from_settings(&settings.target)? else {
                return Err(Error::Other(
                    "--from-target needs a target: set target.url (or MAPSYNC_TARGET__URL) to the mirror to restore from".into(),
                ));
            };
            let entries = target.read_mirror(&redactor).await?;
            let lost = if opts.output.is_some() {
                "the new database has none of them"
            } else {
                "the rows keep the ones they hold"
            };
            Entries {
                origin: format!("postgres:{}", target.table()),
                entries,
                notes: vec![format!(
                    "the mirror holds no secrets (metadata keys in snapshot.redact_keys are never pushed): {lost}; restore them from a snapshot, which keeps every key"
                )],
            }
        }
    };
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || crate::appdb::restore::restore(&settings, entries, &opts))
        .await
        .map_err(|e| Error::Other(format!("the restore stopped: {e}")))?
        .map_err(Error::from)
}

/// `mapsync migrate`: applies the embedded `sql/` scripts; returns their names.
pub async fn migrate(settings: &Settings) -> Result<Vec<&'static str>, Error> {
    let Some(target) = Target::from_settings(&settings.target)? else {
        return Err(Error::Other(
            "no target configured: set target.url (or MAPSYNC_TARGET__URL) to the database to migrate".into(),
        ));
    };
    Ok(target.migrate().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warning(url: &str, root: Option<&str>) -> Option<String> {
        let spec = ConnectSpec::parse(url, root.map(Path::new)).expect("a valid URL");
        unverified_tls(&spec)
    }

    #[test]
    fn a_remote_host_without_certificate_checks_is_warned_about() {
        let host =
            "postgresql://postgres.ref:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres";
        for (query, root, why) in [
            ("", None, "sslmode=prefer"),
            ("?sslmode=prefer", None, "sslmode=prefer"),
            ("?sslmode=disable", None, "not encrypted"),
            ("?sslmode=require", None, "without target.ssl_root_cert"),
        ] {
            let w = warning(&format!("{host}{query}"), root)
                .unwrap_or_else(|| panic!("no warning for {query:?}"));
            assert!(w.contains(why), "{query}: {w}");
            assert!(w.contains("aws-0-eu-central-1.pooler.supabase.com"), "{w}");
            assert!(
                w.contains("?sslmode=verify-full") && w.contains("target.ssl_root_cert"),
                "{w}"
            );
            assert!(w.contains("Database settings"), "{w}");
            assert!(!w.contains("pw"), "never the password: {w}");
            assert!(!w.contains('\n'), "one line: {w}");
        }
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::postgres::tls::test_ca_file(dir.path());
        let ca = ca.to_str().unwrap();
        for (query, root) in [
            ("?sslmode=verify-full".to_string(), None),
            ("?sslmode=verify-ca".to_string(), None),
            ("?sslmode=require".to_string(), Some(ca)),
            (format!("?sslmode=verify-full&sslrootcert={ca}"), None),
        ] {
            assert_eq!(warning(&format!("{host}{query}"), root), None, "{query}");
        }
    }

    #[test]
    fn local_connections_are_not_warned_about() {
        for url in [
            "postgres://u:p@localhost:5432/db",
            "postgres://u:p@127.0.0.1:5432/db?sslmode=disable",
            "postgres://u:p@127.0.0.53/db",
            "postgres://u:p@[::1]:5432/db",
            "postgres://u:p@db.localhost/db",
            "host=/var/run/postgresql user=u dbname=db",
        ] {
            assert_eq!(warning(url, None), None, "{url}");
        }
        assert!(warning("postgres://u:p@10.0.0.5/db", None).is_some());
        assert!(warning("host=db.internal user=u dbname=db sslmode=require", None).is_some());
    }

    #[test]
    fn a_warning_does_not_fail_the_check() {
        let l = |verdict| CheckLine {
            verdict,
            what: "x",
            detail: "d".into(),
        };
        assert!(check_passed(&[l(Verdict::Ok), l(Verdict::Warn)]));
        assert!(!check_passed(&[l(Verdict::Warn), l(Verdict::Fail)]));
        assert_eq!(l(Verdict::Warn).to_string(), "warn x: d");
        assert_eq!(l(Verdict::Ok).to_string(), "ok   x: d");
    }
}
