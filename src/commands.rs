//! What each one-shot subcommand does (`sync`, `export`, `check`, `migrate`). `main.rs` parses
//! the command line and prints; everything with behaviour lives here, testable as a library.

use std::future::Future;
use std::io::Write;
use std::path::Path;

use chrono::Utc;

use crate::Error;
use crate::config::Settings;
use crate::mapping::{self, Redactor};
use crate::snapshot;
use crate::source::{ReadMode, SourceImage, SqliteSource};
use crate::sync::{self, SyncOptions, SyncReport, Trigger};
use crate::target::{MirrorError, Target};

/// Reads the source once on the blocking pool. The read starts at once, before the
/// returned future is first polled, so the caller can do other work meanwhile.
pub fn read_source(
    settings: &Settings,
) -> impl Future<Output = Result<SourceImage, Error>> + use<> {
    let mut source = SqliteSource::new(
        &settings.source,
        Redactor::new(&settings.snapshot.redact_keys),
    );
    let reading = tokio::task::spawn_blocking(move || source.read(ReadMode::Full));
    async move {
        reading
            .await
            .map_err(|e| Error::Other(format!("reading the SQLite file stopped: {e}")))?
            .map_err(Error::from)
    }
}

/// `mapsync sync`: one run, trigger `manual`. Postgres is scanned while SQLite is read.
pub async fn sync(settings: &Settings, opts: SyncOptions) -> Result<SyncReport, Error> {
    let reading = read_source(settings);
    let target = Target::from_settings(&settings.target)?;
    let local = async { reading.await.map(|image| image.mappings) };
    sync::push(
        target.as_ref(),
        &settings.target,
        local,
        opts,
        Trigger::Manual,
    )
    .await
    .map_err(|e| match e {
        MirrorError::Source(e) => e,
        MirrorError::Target(e) => Error::Target(e),
    })
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

/// One line of `mapsync check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub ok: bool,
    pub what: &'static str,
    pub detail: String,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "ok  " } else { "FAIL" };
        write!(f, "{mark} {}: {}", self.what, self.detail)
    }
}

/// `mapsync check`: the config (already loaded), the SQLite file, Postgres, the table.
pub async fn check(settings: &Settings) -> Vec<CheckLine> {
    let line = |ok, what, detail: String| CheckLine { ok, what, detail };
    let mut lines = vec![line(
        true,
        "config",
        format!(
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
    )];
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
    let line = |ok, detail| CheckLine {
        ok,
        what: "instances",
        detail,
    };
    match target.instances().await {
        Ok(None) => line(
            false,
            format!(
                "{} is missing: run `mapsync migrate` (sql/004_mapsync_instances.sql); until then a run cannot tell whether another instance writes {}",
                crate::target::registry::REGISTRY,
                target.table()
            ),
        ),
        Ok(Some(others)) if others.is_empty() => line(
            true,
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
                    true,
                    format!(
                        "this instance is `{me}`; other instances recorded for {}, none within target.instance_grace_s: {}",
                        target.table(),
                        all.join("; ")
                    ),
                )
            } else {
                line(
                    false,
                    format!(
                        "this instance is `{me}`, and another writes {} too: {}; with delete propagation its runs are refused (refused:other_instance) until the other stops for target.instance_grace_s, or give both the same instance.name if they mirror the same file",
                        target.table(),
                        recent.join("; ")
                    ),
                )
            }
        }
        Err(e) => line(false, e.to_string()),
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
    opts: crate::restore::RestoreOptions,
) -> Result<crate::restore::RestoreReport, Error> {
    use crate::restore::Entries;
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
    tokio::task::spawn_blocking(move || crate::restore::restore(&settings, entries, &opts))
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
