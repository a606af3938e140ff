//! Rolling JSON snapshots on disk (SPEC §3), and the export format they share with
//! `mapsync export` and `GET /export`.
//!
//! Invariants:
//! - A file is written to a temporary name in the same directory, fsynced, renamed into place,
//!   and the directory fsynced: readers see the old file or the new one, never a torn one, and
//!   a failure removes the temporary file and leaves older snapshots alone.
//! - `model-mappings-latest.json` is a hard link to (or, where links fail, a copy of) the newest
//!   timestamped file, replaced by rename; retention never deletes it.
//! - A snapshot is only written when the content differs from the newest one (a digest over
//!   the mappings, not the `exported_at` stamp).
//! - Documents are serialised straight into the file: 100,000 mappings never sit in memory
//!   as text.
//! - Only regular files are listed, served or deleted: a file is opened without following a
//!   symbolic link (`O_NOFOLLOW`) and checked to be a regular file on the descriptor it was
//!   opened as ([`SnapshotStore::open`]), so a link planted in the directory is never
//!   followed, not even to a name that looks like a snapshot.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::ser::PrettyFormatter;

use crate::config::SnapshotSettings;
use crate::mapping::{self, EntryError, Mapping, Redactor, format_timestamp};

pub const LATEST: &str = "model-mappings-latest.json";
const PREFIX: &str = "model-mappings-";
const SUFFIX: &str = ".json";
/// `20260116T101710123456Z`
const STAMP_FORMAT: &str = "%Y%m%dT%H%M%S%6fZ";
const STAMP_LEN: usize = 22;
const TEMP_PREFIX: &str = ".mapsync-tmp-";

/// A snapshot write or read that failed, with the fix.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}{hint}", hint = hint(source, *retained))]
pub struct SnapshotError {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
    /// Set when the write failed again after retention made room: how many it kept.
    retained: Option<usize>,
}

fn hint(e: &io::Error, retained: Option<usize>) -> String {
    match (e.kind(), retained) {
        (io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem, _) => {
            ": make snapshot.dir writable by the mapsync user (systemd: ReadWritePaths)".into()
        }
        (io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded, Some(kept)) => format!(
            " (even after deleting all but the newest {kept} snapshots): free disk space on the snapshot.dir filesystem or lower snapshot.keep"
        ),
        (io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded, None) => {
            ": free disk space on the snapshot.dir filesystem or lower snapshot.keep".into()
        }
        _ => String::new(),
    }
}

impl SnapshotError {
    fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        SnapshotError {
            action,
            path: path.to_path_buf(),
            source,
            retained: None,
        }
    }

    /// Whether the disk (or a quota) was full.
    fn is_disk_full(&self) -> bool {
        matches!(
            self.source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
    }

    fn after_retention(mut self, keep: usize) -> Self {
        self.retained = Some(keep.saturating_sub(1));
        self
    }
}

/// The document the application's "import local JSON" button reads.
#[derive(Serialize)]
struct Document<'a> {
    exported_at: String,
    count: usize,
    #[serde(serialize_with = "views")]
    mappings: (&'a [Arc<Mapping>], bool),
}

fn views<S: serde::Serializer>(
    (mappings, redacted): &(&[Arc<Mapping>], bool),
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(mappings.iter().map(|m| m.view(*redacted)))
}

/// Writes the export document for `mappings`, in the order given (callers sort with
/// [`mapping::sort_for_export`]; two-space indent, UTF-8, not ASCII-escaped, a
/// trailing newline) to `out`. Every metadata key is kept (the file is a backup of the
/// source of truth) unless `redacted` (`snapshot.redact`) asks for the mirror's form.
pub fn write_document(
    out: impl Write,
    mappings: &[Arc<Mapping>],
    exported_at: DateTime<Utc>,
    redacted: bool,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let doc = Document {
        exported_at: exported_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
        count: mappings.len(),
        mappings: (mappings, redacted),
    };
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, PrettyFormatter::with_indent(b"  "));
    doc.serialize(&mut ser).map_err(io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Why a file is not an export document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("not a JSON document ({0})")]
    NotJson(String),
    #[error("no `mappings` list: not a mapsync or application export")]
    NoMappings,
}

/// The entries of an export document, each parsed on its own so one bad entry does not spoil
/// the rest (for `mapsync restore`).
pub fn parse_document(
    bytes: &[u8],
    redactor: &Redactor,
) -> Result<Vec<Result<Mapping, EntryError>>, DocumentError> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DocumentError::NotJson(e.to_string()))?;
    let entries = match &doc {
        serde_json::Value::Object(o) => o.get("mappings").and_then(|m| m.as_array()),
        serde_json::Value::Array(a) => Some(a),
        _ => None,
    }
    .ok_or(DocumentError::NoMappings)?;
    Ok(entries
        .iter()
        .map(|e| mapping::Mapping::from_export(e, redactor))
        .collect())
}

/// Writes `path` atomically: temporary file (mode 0600: it may hold secrets), fsync, rename,
/// fsync of the directory.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), SnapshotError> {
    let mut file = Replacement::start(path, true)?;
    fill(file.file()).map_err(|e| file.error(e))?;
    file.finish()
}

/// A file written beside the one it replaces: a temporary file in the same directory (mode
/// 0600: it may hold secrets) that [`Replacement::finish`] puts in place, in as many steps
/// as the writer likes ([`write_atomic`] in one). Dropped unfinished, it is removed.
///
/// `durable`: the file and the directory are fsynced, the file replaces the old one by
/// rename (readers see one or the other), and the old one stays if the replacement is
/// dropped. Otherwise (a cache checked on reading, such as the sync state) nothing is fsynced
/// and the old file is removed when the replacement starts, so that the rename replaces
/// nothing: ext4 writes a file's data out when it replaces another by rename
/// (`auto_da_alloc`; 0.9 ms for a 700 KB state here, on the run's path), which a cache does
/// not need. A reader in between finds no file, and a failure or crash may leave none, the
/// new one, or one that fails its check. The temporary files of such a file that an exited
/// process left are removed when the next replacement starts.
pub struct Replacement {
    file: File,
    temp: PathBuf,
    path: PathBuf,
    durable: bool,
    done: bool,
}

impl Replacement {
    pub fn start(path: &Path, durable: bool) -> Result<Replacement, SnapshotError> {
        // One name per replacement: two of the same file may be under way (one abandoned).
        static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let temp = crate::parent_dir(path).join(format!(
            "{TEMP_PREFIX}{}-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
        ));
        if !durable {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SnapshotError::new("replace", path, e));
                }
                _ => {}
            }
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                // Best effort: the new file does not depend on it.
                let _ = remove_abandoned(crate::parent_dir(path), Some(name));
            }
        }
        let file = private_file(&temp).map_err(|e| SnapshotError::new("write", path, e))?;
        Ok(Replacement {
            file,
            temp,
            path: path.to_path_buf(),
            durable,
            done: false,
        })
    }

    /// The temporary file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// A failed write to this file, as the error to report.
    pub fn error(&self, e: io::Error) -> SnapshotError {
        SnapshotError::new("write", &self.path, e)
    }

    /// Puts the file in place of the old one.
    pub fn finish(mut self) -> Result<(), SnapshotError> {
        let dir = crate::parent_dir(&self.path);
        let result = (|| {
            if self.durable {
                self.file.sync_all()?;
            }
            fs::rename(&self.temp, &self.path)?;
            if self.durable {
                sync_dir(dir)?;
            }
            Ok(())
        })();
        self.done = result.is_ok();
        result.map_err(|e| self.error(e))
    }
}

/// Removes the temporary files in `dir` (of the file `name` only, when given) that no running
/// process is writing: what a crash left, or a one-shot `mapsync sync` that exited as soon as
/// it had answered while a replacement it abandoned was still being written. A temporary
/// name starts with the writer's process id.
fn remove_abandoned(dir: &Path, name: Option<&str>) -> io::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let file = entry.file_name();
        let Some(rest) = file
            .to_str()
            .and_then(|f| f.strip_prefix(TEMP_PREFIX))
            .filter(|f| name.is_none_or(|name| f.ends_with(name)))
        else {
            continue;
        };
        let writer = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<i32>().ok());
        if !writer.is_some_and(process_runs) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Whether a process with this id exists (signal 0 checks without sending anything).
fn process_runs(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only reports whether `pid` exists.
    let sent = unsafe { libc::kill(pid, 0) };
    sent == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Drop for Replacement {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Creates `dir` (mode 0700: what goes in it may hold secrets), or tightens an existing one
/// that others may read.
pub fn private_dir(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| SnapshotError::new("create", dir, e))?;
    if let Ok(meta) = fs::metadata(dir) {
        if meta.permissions().mode() & 0o077 != 0 {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
    }
    Ok(())
}

/// A new file only its owner can read and write.
fn private_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One file in the snapshot directory, as `GET /snapshots` lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SnapshotInfo {
    pub name: String,
    pub bytes: u64,
    pub written_at: String,
    pub count: Option<u64>,
}

/// What [`SnapshotStore::write`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    New(SnapshotInfo),
    Unchanged,
}

/// The snapshot directory: writes, retention, listing.
pub struct SnapshotStore {
    dir: PathBuf,
    keep: usize,
    /// `snapshot.redact`: write the mirror's (redacted) metadata instead of the whole.
    redact: bool,
    redactor: Redactor,
    /// Digest of the newest snapshot's mappings; `None` until known.
    newest_digest: Option<u64>,
}

impl SnapshotStore {
    pub fn new(settings: &SnapshotSettings, redactor: Redactor) -> Self {
        SnapshotStore {
            dir: settings.dir.clone(),
            keep: settings.keep,
            redact: settings.redact,
            redactor,
            newest_digest: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (mode 0700: snapshots hold the metadata's secrets), tightens an
    /// existing one that others may read, and removes temporary files a crash may have left
    /// (not those a running process is writing, such as a one-shot `mapsync sync`'s).
    pub fn prepare(&mut self) -> Result<(), SnapshotError> {
        private_dir(&self.dir)?;
        remove_abandoned(&self.dir, None).map_err(|e| SnapshotError::new("read", &self.dir, e))?;
        if self.newest_digest.is_none() {
            self.newest_digest = self.digest_of_latest();
        }
        Ok(())
    }

    /// Digest of `model-mappings-latest.json`'s mappings, when it exists and every entry
    /// parses. The file is read entry by entry: a restart beside a snapshot of 100,000
    /// mappings (44 MB) holds one entry at a time, not the document (~10× the file as a
    /// `serde_json::Value`).
    fn digest_of_latest(&self) -> Option<u64> {
        let file = File::open(self.dir.join(LATEST)).ok()?;
        let reader = io::BufReader::with_capacity(256 * 1024, file);
        let mut de = serde_json::Deserializer::from_reader(reader);
        let digest =
            serde::de::DeserializeSeed::deserialize(streamed::Document(&self.redactor), &mut de)
                .ok()?;
        de.end().ok()?;
        digest
    }

    /// Writes a new snapshot of `mappings` (in any order: the file has them in export order)
    /// unless the newest one holds the same content, points `-latest` at it, and applies
    /// retention. An unchanged set costs one pass to digest it, no sort.
    pub fn write(
        &mut self,
        mappings: &[Arc<Mapping>],
        now: DateTime<Utc>,
    ) -> Result<Written, SnapshotError> {
        self.prepare()?;
        let digest = mapping::digest(mappings.iter().map(AsRef::as_ref));
        if self.newest_digest == Some(digest) {
            return Ok(Written::Unchanged);
        }
        let mut sorted = mappings.to_vec();
        mapping::sort_for_export(&mut sorted);
        let name = format!("{PREFIX}{}{SUFFIX}", now.format(STAMP_FORMAT));
        let path = self.dir.join(&name);
        let write = || write_atomic(&path, |f| write_document(f, &sorted, now, self.redact));
        match write() {
            Err(e) if e.is_disk_full() => {
                // Make room for this one within `keep`, then try once more.
                self.apply_retention(self.keep.saturating_sub(1));
                write().map_err(|e| e.after_retention(self.keep))?;
            }
            other => other?,
        }
        self.point_latest_at(&path)?;
        self.newest_digest = Some(digest);
        self.apply_retention(self.keep);
        let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok(Written::New(SnapshotInfo {
            name,
            bytes,
            written_at: format_timestamp(&now),
            count: Some(mappings.len() as u64),
        }))
    }

    /// Replaces `-latest` by a hard link to `path` (a copy where links are not supported).
    fn point_latest_at(&self, path: &Path) -> Result<(), SnapshotError> {
        let latest = self.dir.join(LATEST);
        let temp = self
            .dir
            .join(format!("{TEMP_PREFIX}{}-latest", std::process::id()));
        let _ = fs::remove_file(&temp);
        let linked = fs::hard_link(path, &temp)
            .and_then(|()| fs::rename(&temp, &latest))
            .and_then(|()| sync_dir(&self.dir));
        match linked {
            Ok(()) => Ok(()),
            Err(_) => {
                let _ = fs::remove_file(&temp);
                write_atomic(&latest, |f| io::copy(&mut File::open(path)?, f).map(|_| ()))
            }
        }
    }

    /// Deletes the oldest timestamped snapshots beyond the newest `keep`. Failures are logged,
    /// not fatal: an extra old file is harmless.
    fn apply_retention(&self, keep: usize) {
        let mut names = self.timestamped_names();
        if names.len() <= keep {
            return;
        }
        names.sort_unstable_by(|a, b| b.cmp(a));
        for old in &names[keep..] {
            let path = self.dir.join(old);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete an old snapshot");
            }
        }
    }

    /// The timestamped snapshots in the directory: regular files only (a directory entry's
    /// type is that of the entry itself, never of a link's target).
    fn timestamped_names(&self) -> Vec<String> {
        fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| stamp_of(n).is_some())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Snapshot files, newest first, `-latest` first of all.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let mut names = match fs::read_dir(&self.dir) {
            Ok(_) => self.timestamped_names(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SnapshotError::new("read", &self.dir, e)),
        };
        names.sort_unstable_by(|a, b| b.cmp(a));
        names.insert(0, LATEST.to_string());
        Ok(names.iter().filter_map(|n| self.info(n)).collect())
    }

    /// The newest timestamped snapshot.
    pub fn newest(&self) -> Option<SnapshotInfo> {
        let names = self.timestamped_names();
        let newest = names.iter().max()?;
        self.info(newest)
    }

    /// What `GET /snapshots` says of `name`; `None` unless it is a regular snapshot file.
    fn info(&self, name: &str) -> Option<SnapshotInfo> {
        let mut file = self.open(name)?;
        let meta = file.metadata().ok()?;
        let written_at = match stamp_of(name) {
            Some(t) => t,
            None => meta.modified().ok().map(DateTime::<Utc>::from)?,
        };
        Some(SnapshotInfo {
            name: name.to_string(),
            bytes: meta.len(),
            written_at: format_timestamp(&written_at),
            count: read_count(&mut file),
        })
    }

    /// Snapshot `name`, opened for reading: only a snapshot file name (no directories, no
    /// other files), never through a symbolic link, and only a regular file.
    pub fn open(&self, name: &str) -> Option<File> {
        let valid = name == LATEST || stamp_of(name).is_some();
        if !valid {
            return None;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.dir.join(name))
            .ok()?;
        // Checked on the descriptor: what was opened, not what the name points at now.
        file.metadata().ok()?.is_file().then_some(file)
    }
}

/// The time in a `model-mappings-<stamp>.json` name; `None` for any other name.
fn stamp_of(name: &str) -> Option<DateTime<Utc>> {
    let stamp = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if stamp.len() != STAMP_LEN {
        return None;
    }
    NaiveDateTime::parse_from_str(stamp, STAMP_FORMAT)
        .ok()
        .map(|t| t.and_utc())
}

/// `count` from a document's head, without reading the whole file.
fn read_count(file: &mut File) -> Option<u64> {
    let mut head = [0u8; 256];
    let n = file.read(&mut head).ok()?;
    let text = std::str::from_utf8(&head[..n]).ok()?;
    let after = &text[text.find("\"count\"")? + 7..];
    let digits: String = after
        .trim_start_matches([':', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A snapshot document's digest, read one entry at a time ([`SnapshotStore`]'s check of
/// `-latest` at start-up).
mod streamed {
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use crate::mapping::{Mapping, Redactor, SetDigest};

    /// The document: an object whose `mappings` is the list, or the list itself. `None` when
    /// an entry is not a mapping or there is no list.
    pub struct Document<'r>(pub &'r Redactor);

    /// The list: the [`SetDigest`] of its entries, `None` when one is not a mapping.
    struct Entries<'r>(&'r Redactor);

    impl<'de> DeserializeSeed<'de> for Document<'_> {
        type Value = Option<u64>;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Document<'_> {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapsync or application export")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
            let mut digest = None;
            while let Some(key) = map.next_key::<String>()? {
                if key == "mappings" {
                    digest = map.next_value_seed(Entries(self.0))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(digest)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<u64>, A::Error> {
            Entries(self.0).visit_seq(seq)
        }
    }

    impl<'de> DeserializeSeed<'de> for Entries<'_> {
        type Value = Option<u64>;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for Entries<'_> {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of mappings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<u64>, A::Error> {
            let mut set = SetDigest::default();
            let mut whole = true;
            while let Some(entry) = seq.next_element::<serde_json::Value>()? {
                match Mapping::from_export(&entry, self.0) {
                    Ok(m) => set.add(&m),
                    Err(_) => whole = false,
                }
            }
            Ok(whole.then(|| set.finish()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_replacement_removes_what_exited_processes_left_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".cache");
        std::fs::write(&path, b"old").unwrap();
        // A process that has exited, one that runs (this one), another file's leftovers.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let left = dir.path().join(format!("{TEMP_PREFIX}{gone}-0-.cache"));
        let running = dir
            .path()
            .join(format!("{TEMP_PREFIX}{}-99-.cache", std::process::id()));
        let other = dir.path().join(format!("{TEMP_PREFIX}{gone}-0-other"));
        for f in [&left, &running, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        let mut new = Replacement::start(&path, false).unwrap();
        assert!(
            !path.exists(),
            "a cache's old file goes when its replacement starts"
        );
        assert!(!left.exists(), "what an exited process left is removed");
        assert!(running.exists() && other.exists());
        new.file().write_all(b"new").unwrap();
        new.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        // The daemon's start-up sweep takes every name, and spares a running writer too.
        store(dir.path()).prepare().unwrap();
        assert!(!other.exists(), "what an exited process left is removed");
        assert!(running.exists(), "a running process's file is left alone");
    }

    #[test]
    fn snapshot_names_are_strict() {
        assert!(stamp_of("model-mappings-20260116T101710123456Z.json").is_some());
        assert!(stamp_of("model-mappings-latest.json").is_none());
        assert!(stamp_of("model-mappings-20260116T101710Z.json").is_none());
        assert!(stamp_of("../model-mappings-20260116T101710123456Z.json").is_none());
        assert!(stamp_of("model-mappings-2026011xT101710123456Z.json").is_none());
    }

    fn store(dir: &Path) -> SnapshotStore {
        let settings = SnapshotSettings {
            dir: dir.to_path_buf(),
            keep: 3,
            redact_keys: Vec::new(),
            min_interval: std::time::Duration::ZERO,
            redact: false,
        };
        SnapshotStore::new(&settings, Redactor::new::<&str>(&[]))
    }

    fn mappings() -> Vec<Arc<Mapping>> {
        ["a", "b", "c"]
            .iter()
            .map(|k| {
                Arc::new(Mapping::new(mapping::Fields {
                    scope_type: "mapping",
                    scope_key: k,
                    name: Some("A name"),
                    // Canonical (the application's `json.dumps` form), as a reader makes it.
                    metadata: r#"{"n": 12345678901234567890123, "s": "x"}"#,
                    ..Default::default()
                }))
            })
            .collect()
    }

    #[test]
    fn the_latest_snapshot_is_digested_entry_by_entry_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let set = mappings();
        store(dir.path()).write(&set, Utc::now()).unwrap();
        let expected = mapping::digest(set.iter().map(AsRef::as_ref));
        // A store that starts beside the file (a restart) reads the same digest back.
        assert_eq!(store(dir.path()).digest_of_latest(), Some(expected));

        // The application's own export form: a bare list.
        let doc: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(LATEST)).unwrap()).unwrap();
        fs::write(dir.path().join(LATEST), doc["mappings"].to_string()).unwrap();
        assert_eq!(store(dir.path()).digest_of_latest(), Some(expected));

        // One entry that is not a mapping, or a damaged file: no digest (the next write
        // happens).
        let mut entries = doc["mappings"].as_array().unwrap().clone();
        entries.push(serde_json::json!(7));
        fs::write(
            dir.path().join(LATEST),
            serde_json::json!({ "mappings": entries }).to_string(),
        )
        .unwrap();
        assert_eq!(store(dir.path()).digest_of_latest(), None);
        fs::write(dir.path().join(LATEST), &doc.to_string()[..40]).unwrap();
        assert_eq!(store(dir.path()).digest_of_latest(), None);
    }
}
