//! The engine's event loop: listens to the file watcher, the cron ticks, the HTTP port's
//! requests, run completions, the retry timer and the Postgres probe, and asks the
//! [`Policy`] what to do. It never runs a sync itself: it spawns one run at a time and keeps
//! listening, so triggers that arrive during a run are coalesced into the next one, and the
//! loop stays free to send the systemd watchdog.
//!
//! Invariants:
//! - runs never overlap (the loop holds at most one [`Running`]);
//! - a `POST /sync` caller gets the result of a run that started after its request arrived
//!   (requests wait in the policy until the run in progress ends);
//! - on shutdown no new run starts; the run in progress gets [`super::SHUTDOWN_GRACE`] to
//!   commit, then its Postgres query is cancelled and it rolls back; waiters are told.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::events::RunFinished;
use super::policy::{self, Failure, Plan, Policy};
use super::run::{self, Finished, Outcome, RunError, RunErrorKind, RunState};
use super::shared::Shared;
use super::snapshots::SnapshotWriter;
use super::{CANCEL_GRACE, Request, SHUTDOWN_GRACE, Tick, systemd};
use crate::appdb::watch::Change;
use crate::sync::SyncReport;

/// A `POST /sync` caller waiting for its run's result.
pub(super) type Reply = oneshot::Sender<Result<SyncReport, RunError>>;

/// What the event loop listens to.
pub(super) struct Inputs {
    pub changes: mpsc::Receiver<Change>,
    /// Notified at the first event of a burst (see [`Loop::read_ahead`]).
    pub burst: Arc<Notify>,
    pub fs_events: Arc<AtomicU64>,
    pub ticks: mpsc::Receiver<Tick>,
    pub requests: mpsc::Receiver<Request>,
    pub shutdown: watch::Receiver<bool>,
}

pub(super) struct Loop {
    pub shared: Arc<Shared>,
    pub writer: SnapshotWriter,
    pub policy: Policy<Reply>,
    /// `None` while a run holds it.
    pub state: Option<RunState>,
    pub running: Option<Running>,
    /// The probe of an unreachable Postgres in flight.
    pub probe: Option<JoinHandle<bool>>,
    /// How long after the first event of a burst to read ahead: the commit that caused the
    /// event becomes visible to readers only after the application's WAL write is synced.
    pub read_ahead_delay: Duration,
    pub read_ahead_at: Option<Instant>,
    pub first_run: watch::Sender<bool>,
}

pub(super) struct Running {
    task: JoinHandle<(RunState, Finished)>,
    plan: Plan,
    waiters: Vec<Reply>,
}

impl Loop {
    pub async fn run(mut self, mut inputs: Inputs) {
        let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
        self.start_next();
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut inputs.shutdown) => break,
                _ = inputs.burst.notified() => {
                    self.read_ahead_at.get_or_insert(Instant::now() + self.read_ahead_delay);
                }
                _ = sleep_until_some(self.read_ahead_at) => {
                    self.read_ahead_at = None;
                    self.read_ahead();
                }
                Some(change) = inputs.changes.recv() => {
                    tracing::debug!(?change, "file change");
                    self.shared.metrics.set_fs_events(inputs.fs_events.load(Ordering::Relaxed));
                    self.policy.watch(change, Instant::now());
                }
                Some(tick) = inputs.ticks.recv() => match tick {
                    Tick::Reconcile => self.policy.schedule(),
                    Tick::Snapshot => self.writer.request(None).await,
                },
                Some(request) = inputs.requests.recv() => match request {
                    Request::Sync { opts, reply } => self.policy.request(opts, reply),
                    Request::Snapshot(reply) => self.writer.request(Some(reply)).await,
                },
                joined = async { (&mut self.running.as_mut().expect("guarded").task).await }, if self.running.is_some() => {
                    self.finish(joined);
                }
                _ = sleep_until_some(self.policy.retry_at()), if self.running.is_none() => {
                    self.policy.retry_due();
                }
                _ = sleep_until_some(self.policy.walk_at()), if self.running.is_none() => {
                    self.policy.walk_due();
                }
                _ = sleep_until_some(self.policy.probe_at()), if self.running.is_none() && self.probe.is_none() => {
                    self.start_probe();
                }
                answered = async { (&mut self.probe.as_mut().expect("guarded")).await }, if self.probe.is_some() => {
                    self.probe = None;
                    let up = answered.unwrap_or(false);
                    if up {
                        tracing::info!("Postgres answers again; retrying now");
                    }
                    self.policy.probe_answered(up, Instant::now());
                }
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    systemd::watchdog();
                }
            }
            self.start_next();
        }
        self.stop().await;
    }

    /// Whether a run has succeeded, so the mirror's content is known.
    fn steady(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.pushed.is_some())
    }

    /// Starts a run if nothing runs and something is pending.
    fn start_next(&mut self) {
        if self.running.is_some() {
            return;
        }
        let steady = self.steady();
        if let Some((plan, waiters)) = self.policy.next(steady) {
            self.start(plan, waiters);
        }
    }

    /// A burst of commits began: while the debounce waits for its end, read the file (no
    /// push), so that the run at the end of the burst only has to push.
    fn read_ahead(&mut self) {
        if self.running.is_some() {
            return;
        }
        if let Some(plan) = self.policy.read_ahead(self.steady()) {
            self.start(plan, Vec::new());
        }
    }

    fn start(&mut self, plan: Plan, waiters: Vec<Reply>) {
        let Some(state) = self.state.take() else {
            return;
        };
        self.shared.board.set_running(true);
        let task = tokio::spawn(run::run(state, plan, self.shared.clone()));
        self.running = Some(Running {
            task,
            plan,
            waiters,
        });
    }

    /// Pings Postgres in the background ([`policy::PROBE_EVERY`]).
    fn start_probe(&mut self) {
        self.policy.probing();
        let Some(target) = self.shared.target.clone() else {
            return;
        };
        self.probe = Some(tokio::spawn(async move {
            target.ping(Duration::from_secs(2)).await.is_ok()
        }));
    }

    /// Takes back the state of a finished run, records it, answers its waiters, and tells
    /// the policy how it went.
    fn finish(&mut self, joined: Result<(RunState, Finished), tokio::task::JoinError>) {
        let Some(running) = self.running.take() else {
            return;
        };
        self.shared.board.set_running(false);
        let finished = match joined {
            Ok((state, finished)) => {
                self.policy
                    .source_read(state.source.needs_walk(), Instant::now());
                self.state = Some(state);
                finished
            }
            Err(e) => {
                // The run panicked: start over from a fresh state rather than stop syncing.
                tracing::error!(error = %e, "a sync run stopped unexpectedly; starting over");
                self.state = Some(RunState::new(self.shared.new_source()));
                Finished {
                    started_at: chrono::Utc::now(),
                    duration: Duration::ZERO,
                    outcome: Outcome::Failed(RunError::other(format!(
                        "the run stopped unexpectedly: {e}"
                    ))),
                }
            }
        };
        let trigger = running.plan.trigger;
        let retry_in = match &finished.outcome {
            Outcome::Ran(_) => {
                self.policy.succeeded();
                None
            }
            Outcome::Failed(e) => {
                let failure = match e.kind {
                    RunErrorKind::Source => Failure::Source,
                    _ => Failure::Target(e.reason),
                };
                Some(
                    self.policy
                        .failed(trigger, failure, Instant::now(), policy::jitter()),
                )
            }
            Outcome::Unchanged | Outcome::ReadOnly => None,
        };
        RunFinished {
            trigger,
            started_at: finished.started_at,
            duration: finished.duration,
            outcome: &finished.outcome,
            retry_in,
        }
        .emit(&self.shared);
        self.shared
            .board
            .retry_at(self.policy.retry_at().map(Instant::into_std));
        let answer = match finished.outcome {
            Outcome::Ran(ran) => Ok(ran.report),
            Outcome::Failed(e) => Err(e),
            Outcome::Unchanged | Outcome::ReadOnly => Ok(SyncReport::skipped(trigger)),
        };
        for w in running.waiters {
            let _ = w.send(answer.clone());
        }
        self.first_run.send_replace(true);
    }

    /// Shutdown (see the module doc).
    async fn stop(mut self) {
        if let Some(probe) = self.probe.take() {
            probe.abort();
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
                        let _ = w.send(Err(error.clone()));
                    }
                }
            }
        }
        let error = RunError::shutting_down("mapsync is shutting down: try again once it is back");
        for w in self.policy.take_waiters() {
            let _ = w.send(Err(error.clone()));
        }
    }
}

/// Sleeps until `at`; never wakes when `at` is `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
