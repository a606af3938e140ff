//! What the daemon knows about itself: the record `/status` serves, `/readyz` judges, and the
//! metrics mirror. The engine writes it; the HTTP port only reads it.
//!
//! Kept behind a `std::sync::Mutex`: every access is a short copy in or out, never held
//! across an await.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::mapping::format_timestamp;
use crate::snapshot::SnapshotInfo;
use crate::sync::{SyncReport, SyncStatus, Trigger};

/// `/status`'s `data`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub started_at: String,
    /// `idle`, `running` or `retrying`.
    pub state: &'static str,
    pub source: SourceStatus,
    pub target: TargetStatus,
    pub last_run: Option<LastRun>,
    pub last_success_at: Option<String>,
    pub pending_changes: u64,
    pub lag_seconds: f64,
    pub next_retry_at: Option<String>,
    pub snapshot: SnapshotStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub path: String,
    pub rows: u64,
    pub skipped: u64,
    pub read_at: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetStatus {
    pub configured: bool,
    /// `user@host:port/db`: never the password.
    pub name: Option<String>,
    pub table: String,
    pub up: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastRun {
    pub trigger: Trigger,
    pub started_at: String,
    pub duration_ms: u64,
    /// A sync status, or `error`.
    pub status: String,
    pub synced_count: u64,
    pub changed_count: u64,
    pub deleted_count: u64,
    pub remote_before: u64,
    pub remote_after: u64,
    pub error: Option<String>,
    /// Why it failed or was refused, as `mapsync_sync_failures_total{reason}` says it
    /// (`source`, `target_network`, …, `mass_delete`, `other_instance`).
    pub reason: Option<&'static str>,
    /// Why a run was refused (naming, for `refused:other_instance`, the other instance), or
    /// what a synced run left alone.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    pub dir: String,
    pub newest: Option<SnapshotInfo>,
    pub last_error: Option<String>,
}

/// The mutable record, plus the clock readings the serialised form is computed from.
#[derive(Debug)]
struct Inner {
    status: Status,
    /// When the oldest change not yet mirrored was first seen.
    behind_since: Option<Instant>,
    running: bool,
    retry_at: Option<DateTime<Utc>>,
}

/// The shared status record.
#[derive(Debug)]
pub struct StatusBoard {
    inner: Mutex<Inner>,
}

impl StatusBoard {
    pub fn new(
        source_path: String,
        target_name: Option<String>,
        table: String,
        snapshot_dir: String,
    ) -> Self {
        StatusBoard {
            inner: Mutex::new(Inner {
                status: Status {
                    version: env!("CARGO_PKG_VERSION"),
                    started_at: format_timestamp(&Utc::now()),
                    state: "idle",
                    source: SourceStatus {
                        path: source_path,
                        rows: 0,
                        skipped: 0,
                        read_at: None,
                        error: None,
                    },
                    target: TargetStatus {
                        configured: target_name.is_some(),
                        name: target_name,
                        table,
                        up: None,
                    },
                    last_run: None,
                    last_success_at: None,
                    pending_changes: 0,
                    lag_seconds: 0.0,
                    next_retry_at: None,
                    snapshot: SnapshotStatus {
                        dir: snapshot_dir,
                        newest: None,
                        last_error: None,
                    },
                },
                behind_since: None,
                running: false,
                retry_at: None,
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding this lock cannot leave the record half-updated in a way that
        // matters more than losing the status page, so a poisoned lock is simply reused.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// A copy of the record, with the lag and state computed now.
    pub fn snapshot(&self) -> Status {
        self.with(|i| {
            let mut s = i.status.clone();
            s.lag_seconds = lag(i.behind_since);
            s.state = if i.running {
                "running"
            } else if i.retry_at.is_some() {
                "retrying"
            } else {
                "idle"
            };
            s.next_retry_at = i.retry_at.map(|at| format_timestamp(&at));
            s
        })
    }

    /// Seconds since the oldest unmirrored change (0 when in sync).
    pub fn lag(&self) -> Duration {
        self.with(|i| i.behind_since.map_or(Duration::ZERO, |t| t.elapsed()))
    }

    pub fn set_running(&self, running: bool) {
        self.with(|i| i.running = running);
    }

    pub fn source_read(&self, rows: u64, skipped: u64) {
        self.with(|i| {
            let s = &mut i.status.source;
            s.rows = rows;
            s.skipped = skipped;
            s.read_at = Some(format_timestamp(&Utc::now()));
            s.error = None;
        });
    }

    pub fn source_failed(&self, error: String) {
        self.with(|i| i.status.source.error = Some(error));
    }

    pub fn source_error(&self) -> Option<String> {
        self.with(|i| i.status.source.error.clone())
    }

    /// Records how many mappings differ from the mirror; starts or stops the lag clock.
    pub fn pending(&self, pending: u64) {
        self.with(|i| {
            i.status.pending_changes = pending;
            if pending == 0 {
                i.behind_since = None;
            } else if i.behind_since.is_none() {
                i.behind_since = Some(Instant::now());
            }
        });
    }

    pub fn target_up(&self, up: bool) {
        self.with(|i| i.status.target.up = Some(up));
    }

    pub fn retry_at(&self, at: Option<Instant>) {
        self.with(|i| {
            i.retry_at = at.map(|t| Utc::now() + t.saturating_duration_since(Instant::now()))
        });
    }

    /// Records a finished run: its report, or its error and the reason.
    pub fn run_finished(
        &self,
        trigger: Trigger,
        started_at: DateTime<Utc>,
        duration: Duration,
        outcome: Result<&SyncReport, (&str, Option<&'static str>)>,
    ) {
        self.with(|i| {
            let run = match outcome {
                Ok(r) => LastRun {
                    trigger,
                    started_at: format_timestamp(&started_at),
                    duration_ms: duration.as_millis() as u64,
                    status: r.status.as_str().to_string(),
                    synced_count: r.synced_count,
                    changed_count: r.changed_count,
                    deleted_count: r.deleted_count,
                    remote_before: r.remote_before,
                    remote_after: r.remote_after,
                    error: None,
                    reason: match r.status {
                        SyncStatus::RefusedMassDelete => Some("mass_delete"),
                        SyncStatus::RefusedOtherInstance => Some("other_instance"),
                        _ => None,
                    },
                    detail: r.detail.clone(),
                },
                Err((e, reason)) => LastRun {
                    trigger,
                    started_at: format_timestamp(&started_at),
                    duration_ms: duration.as_millis() as u64,
                    status: "error".into(),
                    synced_count: 0,
                    changed_count: 0,
                    deleted_count: 0,
                    remote_before: 0,
                    remote_after: 0,
                    error: Some(e.to_string()),
                    reason,
                    detail: None,
                },
            };
            // As `mapsync_last_success_timestamp_seconds`: a run that mirrored, not one that
            // was skipped or refused.
            if matches!(outcome, Ok(r) if r.status == SyncStatus::Synced) {
                i.status.last_success_at = Some(format_timestamp(&Utc::now()));
            }
            i.status.last_run = Some(run);
        });
    }

    pub fn snapshot_written(&self, newest: Option<SnapshotInfo>) {
        self.with(|i| {
            if newest.is_some() {
                i.status.snapshot.newest = newest;
            }
            i.status.snapshot.last_error = None;
        });
    }

    pub fn snapshot_failed(&self, error: String) {
        self.with(|i| i.status.snapshot.last_error = Some(error));
    }
}

fn lag(since: Option<Instant>) -> f64 {
    since.map_or(0.0, |t| t.elapsed().as_secs_f64())
}
