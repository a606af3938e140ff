//! The sync engine behind `mapsync run`: decides when to run, runs one thing at a time, and
//! keeps the status record (SPEC §2).
//!
//! Triggers arrive on channels: debounced file changes from the [watcher], cron ticks from
//! tokio-cron-scheduler, and requests from the HTTP port. The event loop never runs a sync
//! itself: it spawns one run at a time and keeps listening, so triggers that arrive during a
//! run are coalesced into the next one, and the loop stays free to send the systemd watchdog.
//!
//! When a burst of commits begins, the engine reads the file ahead (a run that does not push)
//! while the debounce waits for the burst to end; the run at its end then only pushes, unless
//! something committed after the read. On 100,000 rows this takes the read (~80 ms) out of
//! the time from a commit to the mirror.
//!
//! Invariants:
//! - runs never overlap (the loop holds at most one [`JoinHandle`]);
//! - a `POST /sync` caller gets the result of a run that started after its request arrived
//!   (requests wait in `pending` until the run in progress ends);
//! - after a failed run, runs that would reach Postgres wait for a capped exponential backoff
//!   with jitter; reading and snapshotting go on meanwhile;
//! - on shutdown no new run starts; the run in progress gets a grace period to commit or roll
//!   back, and is dropped after it (dropping a transaction never commits it).
//!
//! [watcher]: crate::appdb::watch

mod run;
mod snapshots;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::appdb::watch::{self as fswatch, Change};
use crate::appdb::{SourceError, SourceImage, SqliteSource};
use crate::config::{Settings, TargetSettings};
use crate::mapping::Redactor;
use crate::metrics::Metrics;
use crate::postgres::{Target, TargetError};
use crate::snapshot::{SnapshotStore, Written};
use crate::sync::{SyncOptions, SyncReport, Trigger};

use run::{Outcome, Plan, RunState};
use snapshots::SnapshotWriter;
use status::StatusBoard;

/// How long the run in progress may take to commit once shutdown begins; after that its
/// Postgres query is cancelled and the run rolls back.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long a cancelled run gets to roll back before its task is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(3);
/// How often an unreachable Postgres is probed (a pooled `SELECT 1`): the first answer
/// starts a run at once, so recovery never waits for the backoff timer (SPEC §2).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The longest a `POST /sync` caller waits for its run's result before it is told, with a
/// 503, that the run goes on in the background.
pub const SYNC_ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// First retry delay after a failure; doubles up to `target.retry_max`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How long `/readyz` may reuse Postgres's last answer.
const READY_CACHE: Duration = Duration::from_secs(2);
/// How long `/readyz` waits for Postgres.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a run failed, as one line (already free of secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunError {
    pub kind: RunErrorKind,
    /// For target failures: what kind (decides between probing and backing off).
    pub fault: Option<TargetFault>,
    pub message: String,
}

/// What went wrong with Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFault {
    /// The server did not answer (down, network): probed every second until it does.
    Network,
    /// A statement or lock timed out.
    Timeout,
    /// Login refused, or no such database.
    Auth,
    Tls,
    /// Table, columns or privileges.
    Schema,
    Other,
}

impl TargetFault {
    fn of(e: &TargetError) -> TargetFault {
        match e {
            TargetError::Unreachable { .. } => TargetFault::Network,
            TargetError::Timeout { .. } | TargetError::Locked { .. } => TargetFault::Timeout,
            TargetError::Auth { .. } | TargetError::NoDatabase { .. } => TargetFault::Auth,
            TargetError::Tls { .. } => TargetFault::Tls,
            TargetError::MissingTable { .. }
            | TargetError::WrongColumns { .. }
            | TargetError::Permission { .. } => TargetFault::Schema,
            TargetError::Other { .. } => TargetFault::Other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunErrorKind {
    Source,
    Target,
    ShuttingDown,
    Other,
}

impl RunError {
    fn source(e: SourceError) -> Self {
        RunError {
            kind: RunErrorKind::Source,
            fault: None,
            message: e.to_string(),
        }
    }
    fn target(e: TargetError) -> Self {
        RunError {
            kind: RunErrorKind::Target,
            fault: Some(TargetFault::of(&e)),
            message: e.to_string(),
        }
    }
    fn other(message: String) -> Self {
        RunError {
            kind: RunErrorKind::Other,
            fault: None,
            message,
        }
    }
    fn shutting_down(message: &str) -> Self {
        RunError {
            kind: RunErrorKind::ShuttingDown,
            fault: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The engine's startup failure (the watcher could not be set up, or the scheduler).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Watch(#[from] fswatch::WatchError),
    #[error("cannot start the scheduler: {0}")]
    Scheduler(String),
}

/// State shared by the engine and the HTTP port.
pub struct Shared {
    pub board: StatusBoard,
    pub metrics: Metrics,
    pub target: Option<Target>,
    target_settings: TargetSettings,
    source_settings: crate::config::SourceSettings,
    snapshot_settings: crate::config::SnapshotSettings,
    redactor: Redactor,
    /// The mappings as last read (`None` before the first read). The snapshot writer
    /// subscribes to it: publishing an image is offering it for a snapshot.
    image: watch::Sender<Option<Arc<SourceImage>>>,
    /// Postgres's last readiness answer, and when it was asked.
    ready_cache: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Shared {
    /// What a run does unless asked otherwise: deletes as `target.delete_missing` says.
    fn default_opts(&self) -> SyncOptions {
        SyncOptions {
            delete_missing: self.target_settings.delete_missing,
            ..Default::default()
        }
    }

    fn new_source(&self) -> SqliteSource {
        SqliteSource::new(&self.source_settings, self.redactor.clone()).memoizing()
    }

    /// Makes `image` the current one (for `/mappings`, `/export`, metrics).
    /// The image goes out before the status says it was read, so whoever sees the status
    /// also sees the image.
    fn publish(&self, image: Arc<SourceImage>, skipped_total: u64) {
        let rows = image.mappings.len() as u64;
        let skipped = image.skipped as u64;
        let old = self.image.send_replace(Some(image));
        self.metrics.source_rows.set(rows as i64);
        let counted = self.metrics.source_rows_skipped.get();
        if skipped_total > counted {
            self.metrics
                .source_rows_skipped
                .inc_by(skipped_total - counted);
        }
        self.board.source_read(rows, skipped);
        // The old image may hold the last references to 100,000 mappings: let the blocking
        // pool free them rather than the run.
        if let Some(old) = old {
            tokio::task::spawn_blocking(move || {
                drop(old);
                release_free_memory();
            });
        }
    }

    fn record_pending(&self, pending: u64) {
        self.board.pending(pending);
        self.metrics.pending_changes.set(pending as i64);
    }

    fn target_up(&self, up: bool) {
        self.board.target_up(up);
        if let Some(g) = &self.metrics.target_up {
            g.set(up as i64);
        }
    }
}

/// Requests from the HTTP port.
enum Request {
    Sync {
        opts: SyncOptions,
        reply: oneshot::Sender<Result<SyncReport, RunError>>,
    },
    Snapshot(oneshot::Sender<Result<Written, String>>),
}

/// Cron ticks.
#[derive(Debug, Clone, Copy)]
enum Tick {
    Reconcile,
    Snapshot,
}

/// The engine as the HTTP port sees it. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    first_run: watch::Receiver<bool>,
}

impl EngineHandle {
    /// Runs a sync (coalesced with other requests with the same options) and returns the
    /// result of a run that started after this call, or, after [`SYNC_ANSWER_WITHIN`], an
    /// error saying that the run goes on in the background.
    pub async fn sync(&self, opts: SyncOptions) -> Result<SyncReport, RunError> {
        let (reply, answer) = oneshot::channel();
        let shutting_down =
            || RunError::shutting_down("mapsync is shutting down: try again once it is back");
        self.requests
            .send(Request::Sync { opts, reply })
            .await
            .map_err(|_| shutting_down())?;
        match tokio::time::timeout(SYNC_ANSWER_WITHIN, answer).await {
            Ok(answer) => answer.unwrap_or_else(|_| Err(shutting_down())),
            Err(_) => Err(RunError {
                kind: RunErrorKind::Target,
                fault: Some(TargetFault::Timeout),
                message: format!(
                    "the sync run has not finished after {} s (Postgres is slow, or a lock holds it); it goes on in the background: see GET /status for its result",
                    SYNC_ANSWER_WITHIN.as_secs()
                ),
            }),
        }
    }

    /// Writes a snapshot of the current mappings now (skipped when unchanged).
    pub async fn snapshot(&self) -> Result<Written, String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Snapshot(reply))
            .await
            .map_err(|_| "mapsync is shutting down".to_string())?;
        answer
            .await
            .unwrap_or_else(|_| Err("mapsync is shutting down".into()))
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Whether runs delete remote rows missing from the source unless told otherwise
    /// (`target.delete_missing`).
    pub fn deletes_by_default(&self) -> bool {
        self.shared.target_settings.delete_missing
    }

    /// Whether exports leave out sensitive metadata keys (`snapshot.redact`).
    pub fn redacts_exports(&self) -> bool {
        self.shared.snapshot_settings.redact
    }

    /// A handle on the snapshot directory for listing and reading (writes go through
    /// [`EngineHandle::snapshot`]).
    pub fn snapshot_store(&self) -> SnapshotStore {
        SnapshotStore::new(&self.shared.snapshot_settings, self.shared.redactor.clone())
    }

    /// The mappings as last read (empty before the first read).
    pub fn image(&self) -> Arc<SourceImage> {
        self.shared.image.borrow().clone().unwrap_or_default()
    }

    /// Waits until the first run has been attempted (for systemd's READY=1).
    pub async fn first_run_attempted(&self) {
        let mut rx = self.first_run.clone();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Postgres's readiness (pooled `SELECT 1` and the column check), cached for 2 s.
    /// `Ok` when no target is configured.
    pub async fn target_ready(&self) -> Result<(), String> {
        let Some(target) = &self.shared.target else {
            return Ok(());
        };
        let mut cache = self.shared.ready_cache.lock().await;
        if let Some((at, answer)) = cache.as_ref() {
            if at.elapsed() < READY_CACHE {
                return answer.clone();
            }
        }
        let answer = async {
            target.ping(READY_TIMEOUT).await?;
            tokio::time::timeout(READY_TIMEOUT, target.check_schema())
                .await
                .unwrap_or_else(|_| {
                    Err(TargetError::Timeout {
                        at: target.display().to_string(),
                        reason: "the column check took longer than 2 s".into(),
                    })
                })
        }
        .await
        .map_err(|e| e.to_string());
        self.shared.target_up(answer.is_ok());
        *cache = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// Starts the engine: the watcher, the scheduler, the snapshot writer and the event loop,
/// which begins with a start-up run. Everything stops when `shutdown` turns true; the
/// returned task ends when all of it has.
pub async fn start(
    settings: &Settings,
    target: Option<Target>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> Result<(EngineHandle, JoinHandle<()>), EngineError> {
    let redactor = Redactor::new(&settings.snapshot.redact_keys);
    let mut store = SnapshotStore::new(&settings.snapshot, redactor.clone());
    if let Err(e) = store.prepare() {
        tracing::error!(error = %e, "snapshot directory is not usable; snapshots will fail until it is");
    }
    let board = StatusBoard::new(
        settings.source.sqlite_path.display().to_string(),
        target.as_ref().map(|t| t.display().to_string()),
        settings.target.table.to_string(),
        settings.snapshot.dir.display().to_string(),
    );
    let newest = snapshots::newest_on_disk(&store);
    if let Some(at) = newest.as_ref().and_then(|s| s.written_at.parse().ok()) {
        metrics.snapshot_written_at(at);
    }
    board.snapshot_written(newest);
    let shared = Arc::new(Shared {
        board,
        metrics,
        target,
        target_settings: settings.target.clone(),
        source_settings: settings.source.clone(),
        snapshot_settings: settings.snapshot.clone(),
        redactor,
        image: watch::channel(None).0,
        ready_cache: tokio::sync::Mutex::new(None),
    });

    let file_watch = fswatch::spawn(
        &settings.source.sqlite_path,
        &settings.watch,
        shutdown.clone(),
    )?;
    let (ticks_tx, ticks) = mpsc::channel(4);
    let scheduler = start_scheduler(settings, ticks_tx)
        .await
        .map_err(EngineError::Scheduler)?;
    let (writer, writer_task) = SnapshotWriter::start(
        store,
        settings.snapshot.min_interval,
        shared.clone(),
        shutdown.clone(),
    );
    let (requests, inbox) = mpsc::channel(64);
    let (first_run_tx, first_run) = watch::channel(false);

    let event_loop = Loop {
        state: Some(RunState::new(shared.new_source())),
        shared: shared.clone(),
        writer,
        running: None,
        pending: Pending {
            startup: true,
            ..Default::default()
        },
        failures: 0,
        failure: None,
        retry_at: None,
        retry_trigger: Trigger::Startup,
        retry_max: settings.target.retry_max,
        probe: Probe::default(),
        read_ahead_delay: (settings.watch.debounce / 4).max(Duration::from_millis(5)),
        read_ahead_at: None,
        first_run: first_run_tx,
    };
    let inputs = Inputs {
        changes: file_watch.changes,
        burst: file_watch.burst.clone(),
        fs_events: file_watch.events.clone(),
        ticks,
        requests: inbox,
        shutdown,
    };
    let shared_for_close = shared.clone();
    let task = tokio::spawn(async move {
        event_loop.run(inputs).await;
        let mut scheduler = scheduler;
        let _ = scheduler.shutdown().await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, writer_task).await;
        let _ = file_watch.task.await;
        // No run is left: the pool's connections can go (and their server sessions end).
        if let Some(target) = &shared_for_close.target {
            target.close();
        }
    });
    Ok((
        EngineHandle {
            requests,
            shared,
            first_run,
        },
        task,
    ))
}

async fn start_scheduler(
    settings: &Settings,
    ticks: mpsc::Sender<Tick>,
) -> Result<JobScheduler, String> {
    let scheduler = JobScheduler::new().await.map_err(|e| e.to_string())?;
    for (expr, tick) in [
        (&settings.schedule.reconcile, Tick::Reconcile),
        (&settings.schedule.snapshot, Tick::Snapshot),
    ] {
        let ticks = ticks.clone();
        let job = Job::new_async(expr.as_str(), move |_, _| {
            let ticks = ticks.clone();
            Box::pin(async move {
                // A full inbox already holds a tick of each kind: dropping this one is fine.
                let _ = ticks.try_send(tick);
            })
        })
        .map_err(|e| format!("{expr}: {e}"))?;
        scheduler.add(job).await.map_err(|e| e.to_string())?;
    }
    scheduler.start().await.map_err(|e| e.to_string())?;
    Ok(scheduler)
}

/// A `POST /sync` caller waiting for its run.
struct Waiter {
    opts: SyncOptions,
    reply: oneshot::Sender<Result<SyncReport, RunError>>,
}

/// Triggers not yet served.
#[derive(Default)]
struct Pending {
    startup: bool,
    schedule: bool,
    watch: Option<Change>,
    retry: bool,
    waiters: Vec<Waiter>,
}

/// What the event loop listens to.
struct Inputs {
    changes: mpsc::Receiver<Change>,
    /// Notified at the first event of a burst (see [`Loop::read_ahead`]).
    burst: Arc<tokio::sync::Notify>,
    fs_events: Arc<std::sync::atomic::AtomicU64>,
    ticks: mpsc::Receiver<Tick>,
    requests: mpsc::Receiver<Request>,
    shutdown: watch::Receiver<bool>,
}

/// The Postgres probe while it is unreachable: when the next one is due, and the one in
/// flight.
#[derive(Default)]
struct Probe {
    at: Option<tokio::time::Instant>,
    flight: Option<JoinHandle<bool>>,
}

struct Loop {
    shared: Arc<Shared>,
    writer: SnapshotWriter,
    /// `None` while a run holds it.
    state: Option<RunState>,
    running: Option<Running>,
    pending: Pending,
    failures: u32,
    /// What the last run failed on, while failures last.
    failure: Option<RunError>,
    retry_at: Option<tokio::time::Instant>,
    /// The trigger of the run being retried.
    retry_trigger: Trigger,
    retry_max: Duration,
    probe: Probe,
    /// How long after the first event of a burst to read ahead: the commit that caused the
    /// event becomes visible to readers only after the application's WAL write is synced.
    read_ahead_delay: Duration,
    read_ahead_at: Option<tokio::time::Instant>,
    first_run: watch::Sender<bool>,
}

struct Running {
    task: JoinHandle<(RunState, Outcome)>,
    plan: Plan,
    waiters: Vec<Waiter>,
}

impl Loop {
    async fn run(mut self, mut inputs: Inputs) {
        let mut watchdog = watchdog_interval().map(tokio::time::interval);
        self.start_next();
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut inputs.shutdown) => break,
                _ = inputs.burst.notified() => {
                    self.read_ahead_at.get_or_insert(tokio::time::Instant::now() + self.read_ahead_delay);
                }
                _ = sleep_until_some(self.read_ahead_at) => {
                    self.read_ahead_at = None;
                    self.read_ahead();
                }
                Some(change) = inputs.changes.recv() => {
                    tracing::debug!(?change, "file change");
                    self.shared.metrics.set_fs_events(inputs.fs_events.load(std::sync::atomic::Ordering::Relaxed));
                    fswatch::merge_into(&mut self.pending.watch, change);
                }
                Some(tick) = inputs.ticks.recv() => match tick {
                    Tick::Reconcile => self.pending.schedule = true,
                    Tick::Snapshot => self.writer.request(None).await,
                },
                Some(request) = inputs.requests.recv() => match request {
                    Request::Sync { opts, reply } => self.pending.waiters.push(Waiter { opts, reply }),
                    Request::Snapshot(reply) => self.writer.request(Some(reply)).await,
                },
                joined = async { (&mut self.running.as_mut().expect("guarded").task).await }, if self.running.is_some() => {
                    self.finish(joined);
                }
                _ = sleep_until_some(self.retry_at), if self.running.is_none() => {
                    self.retry_at = None;
                    self.pending.retry = true;
                }
                _ = sleep_until_some(self.probe.at), if self.running.is_none() && self.probe.flight.is_none() => {
                    self.probe.at = None;
                    self.start_probe();
                }
                answered = async { (&mut self.probe.flight.as_mut().expect("guarded")).await }, if self.probe.flight.is_some() => {
                    self.probe.flight = None;
                    self.probe_answered(answered.unwrap_or(false));
                }
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
            self.start_next();
        }
        self.stop().await;
    }

    /// Pings Postgres in the background (see [`PROBE_EVERY`]).
    fn start_probe(&mut self) {
        let Some(target) = self.shared.target.clone() else {
            return;
        };
        self.probe.flight = Some(tokio::spawn(async move {
            target
                .ping(PROBE_EVERY.max(Duration::from_secs(2)))
                .await
                .is_ok()
        }));
    }

    /// Postgres answered (retry now, whatever the backoff timer says) or not (probe again).
    fn probe_answered(&mut self, up: bool) {
        if up {
            tracing::info!("Postgres answers again; retrying now");
            self.retry_at = None;
            self.pending.retry = true;
        } else if self.failure.is_some() {
            self.probe.at = Some(tokio::time::Instant::now() + PROBE_EVERY);
        }
    }

    /// Starts a run if nothing runs and something is pending.
    fn start_next(&mut self) {
        if self.running.is_some() {
            return;
        }
        if let Some((plan, waiters)) = self.next_plan() {
            self.start(plan, waiters);
        }
    }

    /// A burst of commits began: while the debounce waits for its end, read the file (no
    /// push), so that the run at the end of the burst only has to push, if nothing else
    /// committed meanwhile. Only when idle and in a steady state.
    fn read_ahead(&mut self) {
        let steady = self.state.as_ref().is_some_and(|s| s.mirrored.is_some());
        let idle = self.running.is_none()
            && self.retry_at.is_none()
            && self.pending.waiters.is_empty()
            && !self.pending.startup;
        if steady && idle {
            let plan = Plan {
                trigger: Trigger::Watch,
                full: false,
                gate: true,
                push: false,
                opts: self.shared.default_opts(),
            };
            self.start(plan, Vec::new());
        }
    }

    fn start(&mut self, plan: Plan, waiters: Vec<Waiter>) {
        let state = self.state.take().expect("no run holds the state");
        self.shared.board.set_running(true);
        let task = tokio::spawn(run::run(state, plan, self.shared.clone()));
        self.running = Some(Running {
            task,
            plan,
            waiters,
        });
    }

    /// Picks the next run from the pending triggers, most urgent first, and clears the
    /// triggers it serves.
    fn next_plan(&mut self) -> Option<(Plan, Vec<Waiter>)> {
        // Only a failing target holds pushes back; after a source failure (the file was
        // missing, locked, damaged) the next file event pushes at once.
        let backing_off = self.retry_at.is_some()
            && self
                .failure
                .as_ref()
                .is_some_and(|f| f.kind == RunErrorKind::Target);
        let default_opts = self.shared.default_opts();
        let never_synced = self.state.as_ref().is_none_or(|s| s.mirrored.is_none());
        let p = &mut self.pending;
        let plan = |trigger, full, gate, push, opts| Plan {
            trigger,
            full,
            gate,
            push,
            opts,
        };
        if let Some(first) = p.waiters.first() {
            let opts = first.opts;
            let (served, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut p.waiters)
                .into_iter()
                .partition(|w| w.opts == opts);
            p.waiters = rest;
            // A full run serves every other trigger too.
            p.startup = false;
            p.schedule = false;
            p.watch = None;
            p.retry = false;
            return Some((plan(Trigger::Manual, true, false, true, opts), served));
        }
        let (trigger, full, gate) = if p.startup {
            (Trigger::Startup, true, false)
        } else if p.retry {
            (self.retry_trigger, never_synced, false)
        } else if p.schedule {
            (Trigger::Schedule, true, false)
        } else if let Some(change) = p.watch {
            let full = change == Change::Rescan || never_synced;
            (Trigger::Watch, full, change == Change::Commit)
        } else {
            return None;
        };
        let push = !backing_off || p.retry || p.startup;
        p.watch = None;
        p.retry = false;
        p.startup = false;
        if full {
            p.schedule = false;
        }
        Some((plan(trigger, full, gate, push, default_opts), Vec::new()))
    }

    /// Takes back the state of a finished run, answers its waiters, and schedules a retry
    /// after a failure.
    fn finish(&mut self, joined: Result<(RunState, Outcome), tokio::task::JoinError>) {
        let running = self.running.take().expect("a run was in progress");
        self.shared.board.set_running(false);
        let outcome = match joined {
            Ok((state, outcome)) => {
                self.state = Some(state);
                outcome
            }
            Err(e) => {
                // The run panicked: start over from a fresh state rather than stop syncing.
                tracing::error!(error = %e, "a sync run stopped unexpectedly; starting over");
                self.state = Some(RunState::new(self.shared.new_source()));
                Outcome::Failed(RunError::other(format!(
                    "the run stopped unexpectedly: {e}"
                )))
            }
        };
        let answer = match &outcome {
            Outcome::Synced(report) => {
                self.failures = 0;
                self.failure = None;
                self.retry_at = None;
                self.probe.at = None;
                log_report(report);
                notify_status(&format!(
                    "{}: {} mappings, {} changed, {} deleted ({}, {} ms)",
                    report.status.as_str(),
                    report.synced_count,
                    report.changed_count,
                    report.deleted_count,
                    report.trigger.as_str(),
                    report.duration_ms
                ));
                Ok(report.clone())
            }
            Outcome::Failed(e) => {
                self.failures += 1;
                let delay = backoff(self.failures, self.retry_max);
                self.retry_at = Some(tokio::time::Instant::now() + delay);
                self.retry_trigger = running.plan.trigger;
                if e.fault == Some(TargetFault::Network) {
                    self.probe.at = Some(tokio::time::Instant::now() + PROBE_EVERY);
                }
                self.failure = Some(e.clone());
                tracing::error!(
                    trigger = running.plan.trigger.as_str(),
                    retry_in_ms = delay.as_millis() as u64,
                    "sync failed: {e}"
                );
                notify_status(&format!("error: {e}"));
                Err(e.clone())
            }
            Outcome::Unchanged | Outcome::ReadOnly => {
                tracing::debug!(?outcome, "read, nothing pushed");
                Ok(crate::sync::SyncReport::skipped(running.plan.trigger))
            }
        };
        self.shared
            .board
            .retry_at(self.retry_at.map(|t| t.into_std()));
        for w in running.waiters {
            let _ = w.reply.send(answer.clone());
        }
        self.first_run.send_replace(true);
    }

    /// Shutdown: the run in progress gets [`SHUTDOWN_GRACE`] to commit; then its Postgres
    /// query is cancelled (a run waiting on a lock would otherwise keep its server session,
    /// and the table's advisory lock, after mapsync is gone) and it rolls back; waiters are
    /// told.
    async fn stop(mut self) {
        if let Some(flight) = self.probe.flight.take() {
            flight.abort();
        }
        if let Some(mut running) = self.running.take() {
            let mut joined = tokio::time::timeout(SHUTDOWN_GRACE, &mut running.task).await;
            if joined.is_err() {
                if let Some(target) = &self.shared.target {
                    let cancelled = target.cancel_running().await;
                    tracing::warn!(
                        cancelled,
                        "the run in progress did not finish in time; cancelled its query, rolling it back"
                    );
                }
                joined = tokio::time::timeout(CANCEL_GRACE, &mut running.task).await;
            }
            match joined {
                Ok(joined) => {
                    self.running = Some(running);
                    self.finish(joined);
                }
                Err(_) => {
                    running.task.abort();
                    let error = RunError::shutting_down(
                        "mapsync shut down during the run; it was rolled back",
                    );
                    for w in running.waiters {
                        let _ = w.reply.send(Err(error.clone()));
                    }
                }
            }
        }
        let error = RunError::shutting_down("mapsync is shutting down: try again once it is back");
        for w in self.pending.waiters.drain(..) {
            let _ = w.reply.send(Err(error.clone()));
        }
    }
}

/// Sleeps until `at`; never wakes when `at` is `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `FIRST_RETRY × 2^(failures-1)`, capped at `max`, then ±20 % jitter so several instances
/// do not retry in step.
fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = FIRST_RETRY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(max);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // 0.8 .. 1.2 from the clock's low bits: enough to spread retries, no RNG needed.
    let factor = 0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0;
    capped.mul_f64(factor)
}

/// Hands memory freed by the allocator back to the system, so the RSS an operator sees
/// follows what the daemon holds (glibc keeps freed memory otherwise).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Half of systemd's watchdog interval, when the unit sets `WatchdogSec=`.
fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

fn notify_status(text: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(text)]);
}

fn log_report(r: &SyncReport) {
    if r.changed_count > 0 || r.deleted_count > 0 || r.detail.is_some() {
        tracing::info!(
            trigger = r.trigger.as_str(),
            status = r.status.as_str(),
            synced = r.synced_count,
            changed = r.changed_count,
            deleted = r.deleted_count,
            duration_ms = r.duration_ms,
            detail = r.detail.as_deref().unwrap_or(""),
            "sync run"
        );
    } else {
        tracing::debug!(
            trigger = r.trigger.as_str(),
            duration_ms = r.duration_ms,
            "sync run: mirror up to date"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let max = Duration::from_secs(60);
        for (failures, base) in [
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (6, 32.0),
            (7, 60.0),
            (30, 60.0),
        ] {
            let d = backoff(failures, max).as_secs_f64();
            assert!(
                d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9,
                "{failures}: {d}"
            );
        }
    }
}
