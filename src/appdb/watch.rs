//! Turns file-system events on the SQLite file's directory into debounced [`Change`]s (SPEC §2).
//!
//! The directory is watched, not the file: an inotify watch follows an inode, and the database
//! gets replaced (the application's corruption recovery deletes and re-creates it; tools rename
//! a new file over it), after which a watch on the file would go silent. Events are filtered by
//! name: the database, its `-wal` and its `-journal`. `-shm` is ignored (it is written through
//! `mmap`, which inotify does not report), and so are opens, closes and metadata changes, and the
//! creation of an empty `-wal` or `-journal`: the daemon's own reads cause all of these (SQLite
//! running as root fchowns the `-wal` on every open; a reader creates `-wal` when the application
//! is not running) and would otherwise trigger syncs that read again, forever.
//!
//! notify calls back on its own thread. The callback classifies the event and hands it to a
//! bounded channel without ever blocking: when the channel is full it raises an overflow flag,
//! which turns the burst into a [`Change::Rescan`]. A tokio task drains the channel through a
//! [`Debouncer`] and emits one [`Change`] per burst.
//!
//! Invariants: no timer runs while no burst is pending (the only other timer is the
//! once-a-second re-watch while the directory is missing); a burst fires at most `max_delay`
//! after its first event; `Rescan` wins over `Commit` within a burst; changes the caller has not
//! taken yet are merged into one, never queued without bound.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use notify::event::ModifyKind;
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::config::WatchSettings;

/// Raw events buffered between notify's thread and the debounce task before it counts as an
/// overflow.
const INBOX_CAPACITY: usize = 256;
/// How often to try watching the directory again while it is missing.
const REWATCH_EVERY: Duration = Duration::from_secs(1);
/// `EMFILE`: the per-user inotify instance limit (or the open-file limit) is reached.
const EMFILE: i32 = 24;

/// What a burst of file-system events asks the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The database, its `-wal` or `-journal` was written, created, removed or renamed onto:
    /// check the files' fingerprint (`SqliteSource::changed`) and sync if something committed.
    Commit,
    /// Events may have been missed (queue overflow, watcher error, the directory itself removed
    /// or replaced, an unknown event): run a full reconcile.
    Rescan,
}

impl Change {
    /// What a burst holding both `self` and `other` stands for: `Rescan` wins.
    pub fn merge(self, other: Change) -> Change {
        if self == Change::Rescan || other == Change::Rescan {
            Change::Rescan
        } else {
            Change::Commit
        }
    }
}

/// Folds `change` into what `slot` already holds (a rescan wins).
pub(crate) fn merge_into(slot: &mut Option<Change>, change: Change) {
    *slot = Some(slot.map_or(change, |held| held.merge(change)));
}

/// Why the directory could not be watched. Each message names the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot watch {0}: no such directory; create it or fix source.sqlite_path (the application's SQLITE_DB_PATH)"
    )]
    DirMissing(PathBuf),
    #[error(
        "cannot watch {0}: the inotify watch limit is reached; raise fs.inotify.max_user_watches (sysctl)"
    )]
    WatchLimit(PathBuf),
    #[error(
        "cannot watch {0}: too many inotify instances; raise fs.inotify.max_user_instances (sysctl) or the open-file limit"
    )]
    InstanceLimit(PathBuf),
    #[error("cannot watch {path}: {reason}")]
    Other { path: PathBuf, reason: String },
}

/// A pure timing state machine: a burst of events fires once, when no event arrived for
/// `debounce`, but never later than `max_delay` after the burst's first event.
#[derive(Debug, Clone)]
pub struct Debouncer {
    debounce: Duration,
    max_delay: Duration,
    /// First and latest event of the pending burst.
    burst: Option<(Instant, Instant)>,
}

impl Debouncer {
    pub fn new(debounce: Duration, max_delay: Duration) -> Self {
        Debouncer {
            debounce,
            max_delay,
            burst: None,
        }
    }

    /// Records an event, starting a burst when none is pending. Call [`Self::fire_if_due`]
    /// first, so that an event arriving after the deadline starts the next burst.
    pub fn event(&mut self, now: Instant) {
        let first = self.burst.map_or(now, |(first, _)| first);
        self.burst = Some((first, now));
    }

    /// When the pending burst fires; `None` when nothing is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.burst
            .map(|(first, last)| (last + self.debounce).min(first + self.max_delay))
    }

    /// True, once per burst, when the burst is due at `now`; the debouncer is then idle.
    pub fn fire_if_due(&mut self, now: Instant) -> bool {
        let due = self.deadline().is_some_and(|deadline| deadline <= now);
        if due {
            self.burst = None;
        }
        due
    }
}

/// A running watch, as returned by [`spawn`].
#[derive(Debug)]
pub struct FileWatch {
    /// One [`Change`] per burst. Ends (`None`) once the task has stopped.
    pub changes: mpsc::Receiver<Change>,
    /// Raw events about the database files seen so far, before debouncing
    /// (for `mapsync_fs_events_total`).
    pub events: Arc<AtomicU64>,
    /// Notified at the first event of a burst of commits, before the debounce: the engine
    /// may read the file while it waits for the burst to end.
    pub burst: Arc<Notify>,
    /// The debounce task; it ends when shutdown flips to `true` (or its sender is dropped), or
    /// when `changes` is dropped.
    pub task: JoinHandle<()>,
}

/// Starts watching the directory holding `db_path`. Must be called inside a tokio runtime.
pub fn spawn(
    db_path: &Path,
    settings: &WatchSettings,
    shutdown: watch::Receiver<bool>,
) -> Result<FileWatch, WatchError> {
    let files = DbFiles::new(db_path)?;
    let (inbox, raw) = inbox(INBOX_CAPACITY);
    let events = Arc::new(AtomicU64::new(0));
    let handler = {
        let (files, inbox, events) = (files.clone(), inbox.clone(), events.clone());
        move |event: notify::Result<Event>| {
            if let Some(change) = files.change_of(&event) {
                events.fetch_add(1, Ordering::Relaxed);
                inbox.push(change);
            }
        }
    };
    let watcher = RecommendedWatcher::new(handler, notify::Config::default())
        .map_err(|e| watch_error(&files.dir, e))?;
    let mut dir = DirWatch {
        watcher,
        dir: files.dir,
        id: None,
        retry_at: None,
    };
    dir.arm()?;
    let relay = Relay::new(settings, raw, inbox.overflow, Some(dir));
    let burst = relay.burst.clone();
    let (out, changes) = mpsc::channel(1);
    let task = tokio::spawn(relay.run(out, shutdown));
    Ok(FileWatch {
        changes,
        events,
        burst,
        task,
    })
}

/// The sending half of the raw-event channel, as notify's callback (and the tests) use it.
#[derive(Clone)]
struct Inbox {
    tx: mpsc::Sender<Change>,
    overflow: Arc<AtomicBool>,
}

fn inbox(capacity: usize) -> (Inbox, mpsc::Receiver<Change>) {
    let (tx, rx) = mpsc::channel(capacity);
    let overflow = Arc::new(AtomicBool::new(false));
    (Inbox { tx, overflow }, rx)
}

impl Inbox {
    /// Never blocks. When the channel is full, raise the overflow flag, then try once more with
    /// a `Rescan`: if that fails too, the channel is still full, so the task has a message left
    /// to take and sees the flag when it takes it.
    fn push(&self, change: Change) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(change) {
            self.overflow.store(true, Ordering::SeqCst);
            let _ = self.tx.try_send(Change::Rescan);
        }
    }
}

/// Which paths of the watched directory belong to the database.
#[derive(Debug, Clone)]
struct DbFiles {
    /// Absolute, as notify reports paths under it.
    dir: PathBuf,
    /// The database, `-wal`, `-journal`.
    names: [OsString; 3],
}

impl DbFiles {
    fn new(db_path: &Path) -> Result<DbFiles, WatchError> {
        let other = |reason: String| WatchError::Other {
            path: db_path.to_path_buf(),
            reason,
        };
        let name = db_path
            .file_name()
            .ok_or_else(|| other("not a file path; check source.sqlite_path".into()))?;
        let dir =
            std::path::absolute(crate::parent_dir(db_path)).map_err(|e| other(e.to_string()))?;
        let with = |suffix: &str| {
            let mut n = name.to_os_string();
            n.push(suffix);
            n
        };
        let names = [name.to_os_string(), with("-wal"), with("-journal")];
        Ok(DbFiles { dir, names })
    }

    /// What one notify event means for the database, if anything.
    fn change_of(&self, event: &notify::Result<Event>) -> Option<Change> {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "file watcher error; rescanning");
                return Some(Change::Rescan);
            }
        };
        if event.need_rescan() {
            tracing::warn!(dir = %self.dir.display(), "file event queue overflowed; rescanning");
            return Some(Change::Rescan);
        }
        let ours = event.paths.iter().any(|p| self.is_one_of(p, &self.names));
        let the_db = event
            .paths
            .iter()
            .any(|p| self.is_one_of(p, &self.names[..1]));
        let the_dir = event.paths.contains(&self.dir);
        match event.kind {
            // Opens and closes, including the daemon's own reads (and SQLite's directory fsync);
            // metadata, as SQLite running as root fchowns the -wal on every open, reads included.
            // Every write is also a data, create, remove or rename event.
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => None,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) if the_dir => {
                Some(Change::Rescan)
            }
            // An empty -wal or -journal is no commit (a reader creates them when the application
            // is not running); their content always comes with a data event.
            EventKind::Create(_) => the_db.then_some(Change::Commit),
            EventKind::Modify(_) | EventKind::Remove(_) => ours.then_some(Change::Commit),
            EventKind::Any | EventKind::Other => {
                (ours || event.paths.is_empty()).then_some(Change::Rescan)
            }
        }
    }

    fn is_one_of(&self, path: &Path, names: &[OsString]) -> bool {
        path.parent() == Some(self.dir.as_path())
            && path
                .file_name()
                .is_some_and(|name| names.iter().any(|n| n == name))
    }
}

/// The notify watcher and which directory inode it watches, so a replaced directory is noticed.
struct DirWatch {
    watcher: RecommendedWatcher,
    dir: PathBuf,
    /// (device, inode) of the directory when it was last watched; `None` while it is missing.
    id: Option<(u64, u64)>,
    /// When to try again while the directory is missing.
    retry_at: Option<Instant>,
}

impl DirWatch {
    /// (Re)watches the directory. Its identity is taken before the watch, so a directory replaced
    /// in between shows up as "moved" at the next rescan, never as a silent watch.
    fn arm(&mut self) -> Result<(), WatchError> {
        let _ = self.watcher.unwatch(&self.dir);
        let id = std::fs::metadata(&self.dir)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| (m.dev(), m.ino()));
        if id.is_none() {
            return Err(WatchError::DirMissing(self.dir.clone()));
        }
        // Blocks for a round trip to notify's thread: microseconds, and only at start or rescan.
        self.watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|e| watch_error(&self.dir, e))?;
        self.id = id;
        Ok(())
    }

    /// Whether the watched directory is still the one at the path.
    fn is_current(&self) -> bool {
        let now = std::fs::metadata(&self.dir).map(|m| (m.dev(), m.ino()));
        self.id.is_some() && now.ok() == self.id
    }

    /// Re-arms; on failure schedules a retry (and warns once per outage). True when watching.
    fn rearm(&mut self, now: Instant) -> bool {
        match self.arm() {
            Ok(()) => {
                if self.retry_at.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "watching the directory again");
                }
                true
            }
            Err(e) => {
                self.id = None;
                if self.retry_at.is_none() {
                    tracing::warn!(error = %e, "lost the file watch; retrying every second");
                }
                self.retry_at = Some(now + REWATCH_EVERY);
                false
            }
        }
    }
}

fn watch_error(dir: &Path, e: notify::Error) -> WatchError {
    let path = dir.to_path_buf();
    match &e.kind {
        notify::ErrorKind::PathNotFound => WatchError::DirMissing(path),
        notify::ErrorKind::MaxFilesWatch => WatchError::WatchLimit(path),
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(EMFILE) => {
            WatchError::InstanceLimit(path)
        }
        _ => WatchError::Other {
            path,
            reason: e.to_string(),
        },
    }
}

/// The debounce task: raw changes in, one change per burst out.
struct Relay {
    debouncer: Debouncer,
    /// What the pending burst will fire as.
    pending: Option<Change>,
    /// Fired, not yet taken by the caller.
    ready: Option<Change>,
    raw: mpsc::Receiver<Change>,
    overflow: Arc<AtomicBool>,
    /// `None` when driven without inotify (tests).
    dir: Option<DirWatch>,
    /// Notified when a burst of commits begins.
    burst: Arc<Notify>,
}

impl Relay {
    fn new(
        settings: &WatchSettings,
        raw: mpsc::Receiver<Change>,
        overflow: Arc<AtomicBool>,
        dir: Option<DirWatch>,
    ) -> Relay {
        Relay {
            debouncer: Debouncer::new(settings.debounce, settings.max_delay),
            pending: None,
            ready: None,
            raw,
            overflow,
            dir,
            burst: Arc::new(Notify::new()),
        }
    }

    /// `out` has room for one change: the ones the caller has not taken yet wait, merged, in
    /// `ready`.
    async fn run(mut self, out: mpsc::Sender<Change>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let deadline = self.debouncer.deadline();
            let retry_at = self.dir.as_ref().and_then(|d| d.retry_at);
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|&stop| stop) => break,
                permit = out.reserve(), if self.ready.is_some() => match permit {
                    Ok(permit) => permit.send(self.ready.take().expect("branch runs only when ready")),
                    Err(_) => break,
                },
                raw = self.raw.recv() => match raw {
                    Some(change) => self.record(change, Instant::now()),
                    None => break,
                },
                () = sleep_until_some(deadline) => self.fire_if_due(Instant::now()),
                () = sleep_until_some(retry_at) => self.retry_watch(Instant::now()),
            }
        }
    }

    fn record(&mut self, change: Change, now: Instant) {
        let change = if self.overflow.swap(false, Ordering::SeqCst) {
            Change::Rescan
        } else {
            change
        };
        self.fire_if_due(now);
        if self.pending.is_none() && change == Change::Commit {
            self.burst.notify_one();
        }
        self.debouncer.event(now);
        merge_into(&mut self.pending, change);
        if change == Change::Rescan {
            // The directory itself may be gone or replaced: then the watch is dead.
            if let Some(dir) = self.dir.as_mut().filter(|dir| !dir.is_current()) {
                dir.rearm(now);
            }
        }
    }

    fn fire_if_due(&mut self, now: Instant) {
        if self.debouncer.fire_if_due(now) {
            let change = self
                .pending
                .take()
                .expect("a due burst has a pending change");
            merge_into(&mut self.ready, change);
        }
    }

    fn retry_watch(&mut self, now: Instant) {
        let rearmed = self.dir.as_mut().is_some_and(|dir| dir.rearm(now));
        if rearmed {
            // Whatever the directory holds now was never seen.
            self.record(Change::Rescan, now);
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rusqlite::{Connection, OpenFlags};
    use tokio::time::timeout;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn settings(debounce: u64, max_delay: u64) -> WatchSettings {
        WatchSettings {
            debounce: ms(debounce),
            max_delay: ms(max_delay),
        }
    }

    /// Steps a debouncer through `until` ms, one ms at a time, with events at `events` (ms);
    /// returns when it fired (ms).
    fn simulate(events: &[u64], until: u64) -> Vec<u64> {
        let start = Instant::now();
        let mut d = Debouncer::new(ms(200), ms(2000));
        let mut fired = Vec::new();
        for t in 0..=until {
            let now = start + ms(t);
            if d.fire_if_due(now) {
                fired.push(t);
            }
            if events.contains(&t) {
                d.event(now);
            }
        }
        fired
    }

    #[test]
    fn nothing_pending_means_no_deadline() {
        let mut d = Debouncer::new(ms(200), ms(2000));
        assert_eq!(d.deadline(), None);
        assert!(!d.fire_if_due(Instant::now() + ms(10_000)));
    }

    #[test]
    fn single_event_fires_once_after_debounce() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(ms(200), ms(2000));
        d.event(t0);
        assert_eq!(d.deadline(), Some(t0 + ms(200)));
        assert!(!d.fire_if_due(t0 + ms(199)));
        assert!(d.fire_if_due(t0 + ms(200)));
        assert_eq!(d.deadline(), None);
        assert!(!d.fire_if_due(t0 + ms(400)));
    }

    #[test]
    fn steady_stream_fires_at_max_delay_after_first_event() {
        let every_100: Vec<u64> = (0..=30).map(|i| i * 100).collect();
        // First burst capped at 0 + 2000; the event at 2000 opens the second, which ends 200 ms
        // after the last event (3000).
        assert_eq!(simulate(&every_100, 10_000), [2000, 3200]);
    }

    #[test]
    fn bursts_separated_by_quiet_fire_twice() {
        assert_eq!(simulate(&[0, 100, 1000, 1150], 5000), [300, 1350]);
    }

    #[test]
    fn merge_prefers_rescan() {
        use Change::*;
        assert_eq!(Commit.merge(Commit), Commit);
        assert_eq!(Commit.merge(Rescan), Rescan);
        assert_eq!(Rescan.merge(Commit), Rescan);
    }

    #[test]
    fn change_of_keeps_writes_to_the_db_files_only() {
        use notify::event::{AccessKind, CreateKind, DataChange, MetadataKind, RemoveKind};
        use notify::event::{Flag, RenameMode};
        let files = DbFiles::new(Path::new("/srv/app/data/db.sqlite3")).expect("path");
        let change_of = |kind: EventKind, paths: &[&str]| {
            let paths = paths.iter().map(PathBuf::from).collect();
            files.change_of(&Ok(Event {
                kind,
                paths,
                attrs: Default::default(),
            }))
        };
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let (db, wal, journal) = (
            "/srv/app/data/db.sqlite3",
            "/srv/app/data/db.sqlite3-wal",
            "/srv/app/data/db.sqlite3-journal",
        );
        let (commit, rescan) = (Some(Change::Commit), Some(Change::Rescan));
        assert_eq!(change_of(data, &[db]), commit);
        assert_eq!(change_of(data, &[wal]), commit);
        assert_eq!(change_of(data, &[journal]), commit);
        assert_eq!(change_of(data, &["/srv/app/data/db.sqlite3-shm"]), None);
        assert_eq!(change_of(data, &["/srv/app/data/other.sqlite3"]), None);
        assert_eq!(change_of(data, &["/srv/app/db.sqlite3"]), None);
        let open = EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any));
        assert_eq!(change_of(open, &[db]), None);
        let chown = EventKind::Modify(ModifyKind::Metadata(MetadataKind::Ownership));
        assert_eq!(change_of(chown, &[wal]), None);
        assert_eq!(change_of(EventKind::Create(CreateKind::File), &[wal]), None);
        assert_eq!(
            change_of(EventKind::Create(CreateKind::File), &[db]),
            commit
        );
        assert_eq!(
            change_of(EventKind::Remove(RemoveKind::File), &[wal]),
            commit
        );
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(change_of(renamed, &["/srv/app/data/new", db]), commit);
        assert_eq!(
            change_of(renamed, &["/srv/app/data", "/srv/app/old"]),
            rescan
        );
        let dir_gone = EventKind::Remove(RemoveKind::Folder);
        assert_eq!(change_of(dir_gone, &["/srv/app/data"]), rescan);
        assert_eq!(change_of(EventKind::Other, &[db]), rescan);
        assert_eq!(change_of(EventKind::Other, &["/srv/app/data/x"]), None);
        let overflow = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert_eq!(files.change_of(&Ok(overflow)), rescan);
        assert_eq!(
            files.change_of(&Err(notify::Error::generic("boom"))),
            rescan
        );
    }

    // --- the debounce task, driven without inotify, in paused time --------------------------

    struct Driven {
        inbox: Inbox,
        changes: mpsc::Receiver<Change>,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
        start: Instant,
    }

    fn drive(capacity: usize) -> Driven {
        let (inbox, raw) = inbox(capacity);
        let relay = Relay::new(&settings(200, 2000), raw, inbox.overflow.clone(), None);
        let (out, changes) = mpsc::channel(1);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(relay.run(out, shutdown));
        let start = Instant::now();
        Driven {
            inbox,
            changes,
            stop,
            task,
            start,
        }
    }

    impl Driven {
        /// Pushes `change` at each offset (ms from start) from a separate task.
        fn feed(&self, at: &[(u64, Change)]) {
            let (inbox, start, at) = (self.inbox.clone(), self.start, at.to_vec());
            tokio::spawn(async move {
                for (t, change) in at {
                    sleep_until(start + ms(t)).await;
                    inbox.push(change);
                }
            });
        }

        /// The next change and when it came out (ms from start), or `None` after a long quiet.
        async fn next(&mut self) -> Option<(u64, Change)> {
            let change = timeout(ms(60_000), self.changes.recv()).await.ok()??;
            Some((self.start.elapsed().as_millis() as u64, change))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stream_every_100ms_fires_at_2000_then_200ms_after_it_stops() {
        let mut d = drive(INBOX_CAPACITY);
        let at: Vec<_> = (0..=30).map(|i| (i * 100, Change::Commit)).collect();
        d.feed(&at);
        assert_eq!(d.next().await, Some((2000, Change::Commit)));
        assert_eq!(d.next().await, Some((3200, Change::Commit)));
        assert_eq!(d.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn rescan_wins_within_a_burst_and_does_not_leak_into_the_next() {
        use Change::*;
        let mut d = drive(INBOX_CAPACITY);
        d.feed(&[(0, Commit), (50, Rescan), (100, Commit), (1000, Commit)]);
        assert_eq!(d.next().await, Some((300, Rescan)));
        assert_eq!(d.next().await, Some((1200, Commit)));
        assert_eq!(d.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn full_inbox_turns_the_burst_into_a_rescan() {
        let mut d = drive(4);
        for _ in 0..20 {
            d.inbox.push(Change::Commit); // no await: the task cannot drain meanwhile
        }
        assert_eq!(d.next().await, Some((200, Change::Rescan)));
        assert_eq!(d.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn unread_changes_merge_into_one() {
        use Change::*;
        let mut d = drive(INBOX_CAPACITY);
        d.feed(&[(0, Commit), (1000, Rescan), (2000, Commit)]);
        sleep_until(d.start + ms(5000)).await;
        // One slot in the channel (the first burst), the later two merged behind it.
        assert_eq!(d.changes.try_recv(), Ok(Commit));
        assert_eq!(d.next().await, Some((5000, Rescan)));
        assert_eq!(d.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_task_without_firing() {
        let mut d = drive(INBOX_CAPACITY);
        d.inbox.push(Change::Commit);
        tokio::task::yield_now().await;
        d.stop.send_replace(true);
        timeout(ms(1), d.task)
            .await
            .expect("task ends")
            .expect("no panic");
        assert_eq!(d.changes.recv().await, None);
    }

    // --- real inotify on a real directory, real time ------------------------------------------

    /// How long "nothing happens" is watched for: debounce (50 ms) + 300 ms.
    const QUIET: Duration = Duration::from_millis(350);
    /// Generous upper bound for a change to come out on a loaded machine.
    const DEADLINE: Duration = Duration::from_secs(5);

    struct Live {
        _root: tempfile::TempDir,
        dir: PathBuf,
        db: PathBuf,
        watch: FileWatch,
        stop: watch::Sender<bool>,
    }

    /// A WAL database like the application's, written through its own connection.
    fn create_db(path: &Path) -> Connection {
        let conn = Connection::open(path).expect("create test db");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("WAL");
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT);")
            .expect("create table");
        conn
    }

    fn commit(conn: &Connection) {
        conn.execute("INSERT INTO t (v) VALUES ('x')", [])
            .expect("insert");
    }

    fn live() -> (Live, Connection) {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        std::fs::create_dir(&dir).expect("mkdir");
        let db = dir.join("app.sqlite3");
        let writer = create_db(&db);
        commit(&writer);
        let (stop, shutdown) = watch::channel(false);
        let watch = spawn(&db, &settings(50, 1000), shutdown).expect("spawn watcher");
        let live = Live {
            _root: root,
            dir,
            db,
            watch,
            stop,
        };
        (live, writer)
    }

    impl Live {
        async fn expect_change(&mut self) -> Change {
            timeout(DEADLINE, self.watch.changes.recv())
                .await
                .expect("a change within the deadline")
                .expect("watcher still running")
        }

        async fn expect_quiet(&mut self) {
            if let Ok(change) = timeout(QUIET, self.watch.changes.recv()).await {
                panic!("expected no change, got {change:?}");
            }
        }
    }

    #[tokio::test]
    async fn commit_produces_a_commit_and_own_reads_produce_nothing() {
        let (mut live, writer) = live();
        commit(&writer);
        assert_eq!(live.expect_change().await, Change::Commit);
        assert!(live.watch.events.load(Ordering::Relaxed) > 0);

        // The daemon's own read-only reads open and close the files: no change.
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let reader = Connection::open_with_flags(&live.db, flags).expect("reader");
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("read");
        assert_eq!(n, 2);
        drop(reader);
        live.expect_quiet().await;

        // Nor when the application is not running (its last close removed -wal and -shm).
        drop(writer);
        assert_eq!(live.expect_change().await, Change::Commit);
        let reader = Connection::open_with_flags(&live.db, flags).expect("reader");
        reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .expect("read");
        drop(reader);
        live.expect_quiet().await;
    }

    #[tokio::test]
    async fn unrelated_files_produce_nothing() {
        let (mut live, writer) = live();
        // Closing the last connection checkpoints and removes -wal and -shm (so that writing a
        // -shm below truncates no one's mapping).
        drop(writer);
        assert_eq!(live.expect_change().await, Change::Commit);
        let seen = live.watch.events.load(Ordering::Relaxed);
        std::fs::write(live.dir.join("notes.txt"), "hello").expect("write");
        std::fs::write(live.dir.join("app.sqlite3.bak"), "copy").expect("write");
        std::fs::write(live.dir.join("app.sqlite3-shm"), "shm").expect("write");
        std::fs::remove_file(live.dir.join("app.sqlite3-shm")).expect("rm");
        live.expect_quiet().await;
        assert_eq!(live.watch.events.load(Ordering::Relaxed), seen);
    }

    #[tokio::test]
    async fn rename_onto_the_db_produces_a_change() {
        let (mut live, _writer) = live();
        let staging = live.dir.join("staging.sqlite3");
        commit(&create_db(&staging));
        live.expect_quiet().await;
        std::fs::rename(&staging, &live.db).expect("rename");
        assert_eq!(live.expect_change().await, Change::Commit);
    }

    #[tokio::test]
    async fn delete_and_recreate_is_followed() {
        let (mut live, writer) = live();
        drop(writer);
        std::fs::remove_file(&live.db).expect("rm db");
        let _ = std::fs::remove_file(live.dir.join("app.sqlite3-wal"));
        let _ = std::fs::remove_file(live.dir.join("app.sqlite3-shm"));
        let writer = create_db(&live.db);
        commit(&writer);
        assert_eq!(live.expect_change().await, Change::Commit);
        // The new file is watched as well as the old one was.
        commit(&writer);
        assert_eq!(live.expect_change().await, Change::Commit);
    }

    #[tokio::test]
    async fn removed_then_restored_directory_rescans_and_is_watched_again() {
        let (mut live, writer) = live();
        drop(writer);
        std::fs::remove_dir_all(&live.dir).expect("rm dir");
        assert_eq!(live.expect_change().await, Change::Rescan);

        let staging = live.dir.with_file_name("staging");
        std::fs::create_dir(&staging).expect("mkdir");
        let writer = create_db(&staging.join("app.sqlite3"));
        commit(&writer);
        drop(writer);
        std::fs::rename(&staging, &live.dir).expect("restore dir");
        assert_eq!(live.expect_change().await, Change::Rescan);
        commit(&create_db(&live.db));
        assert_eq!(live.expect_change().await, Change::Commit);
    }

    #[tokio::test]
    async fn shutdown_ends_the_task() {
        let (live, _writer) = live();
        live.stop.send_replace(true);
        timeout(DEADLINE, live.watch.task)
            .await
            .expect("task ends promptly")
            .expect("task did not panic");
    }

    #[tokio::test]
    async fn missing_directory_is_a_one_line_error() {
        let root = tempfile::tempdir().expect("tempdir");
        let db = root.path().join("nope").join("app.sqlite3");
        let (_stop, shutdown) = watch::channel(false);
        let err = spawn(&db, &settings(50, 1000), shutdown).expect_err("no directory");
        assert!(matches!(err, WatchError::DirMissing(_)), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
