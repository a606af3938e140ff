//! What the daemon records when a run ends, in one place (vector's internal events are the
//! model): [`RunFinished::emit`] writes the log line, the metrics, the status record and the
//! systemd `STATUS=` line together, so that no exit path of a run can update one and forget
//! another.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::run::{Outcome, RunError, RunErrorKind};
use super::shared::Shared;
use super::systemd;
use crate::metrics::FailureReason;
use crate::sync::{Ran, Refusal, SyncStatus, Trigger};

/// A run ended.
pub(super) struct RunFinished<'a> {
    pub trigger: Trigger,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub outcome: &'a Outcome,
    /// When a failed run is retried.
    pub retry_in: Option<Duration>,
}

impl RunFinished<'_> {
    pub fn emit(&self, shared: &Shared) {
        match self.outcome {
            Outcome::Unchanged | Outcome::ReadOnly => {
                tracing::debug!(trigger = self.trigger.as_str(), outcome = ?self.outcome, "read, nothing pushed");
            }
            Outcome::Ran(ran) => self.ran(ran, shared),
            Outcome::Failed(e) => self.failed(e, shared),
        }
    }

    fn ran(&self, ran: &Ran, shared: &Shared) {
        let r = &ran.report;
        let m = &shared.metrics;
        m.run_finished(self.trigger, r.status.metric_result());
        if r.status != SyncStatus::SkippedNotConfigured {
            shared.target_up(true);
            m.sync_duration.observe(self.duration.as_secs_f64());
            m.set_target_rows(r.remote_after);
        }
        match r.status {
            SyncStatus::Synced => {
                shared.record_pending(0);
                m.rows_upserted.inc_by(r.changed_count);
                m.rows_deleted.inc_by(r.deleted_count);
                m.last_success
                    .set(Utc::now().timestamp_micros() as f64 / 1e6);
            }
            SyncStatus::SkippedNotConfigured => shared.record_pending(0),
            SyncStatus::RefusedMassDelete | SyncStatus::RefusedOtherInstance => {
                // What the next run would change and delete.
                shared.record_pending(ran.counts.pending);
                m.sync_failed(match ran.counts.refused {
                    Some(Refusal::OtherInstance(_)) => FailureReason::OtherInstance,
                    _ => FailureReason::MassDelete,
                });
            }
        }
        shared
            .board
            .run_finished(self.trigger, self.started_at, self.duration, Ok(r));
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
        systemd::status(&format!(
            "{}: {} mappings, {} changed, {} deleted ({}, {} ms)",
            r.status.as_str(),
            r.synced_count,
            r.changed_count,
            r.deleted_count,
            r.trigger.as_str(),
            r.duration_ms
        ));
    }

    fn failed(&self, e: &RunError, shared: &Shared) {
        let reason = e.reason.map(FailureReason::as_str);
        match e.kind {
            RunErrorKind::Source => shared.board.source_failed(e.message.clone()),
            RunErrorKind::Target => shared.target_up(false),
            RunErrorKind::ShuttingDown | RunErrorKind::Other => {}
        }
        shared.metrics.run_finished(self.trigger, "error");
        if let Some(reason) = e.reason {
            shared.metrics.sync_failed(reason);
        }
        shared.board.run_finished(
            self.trigger,
            self.started_at,
            self.duration,
            Err((&e.message, reason)),
        );
        tracing::error!(
            trigger = self.trigger.as_str(),
            reason = reason.unwrap_or("other"),
            retry_in_ms = self.retry_in.map(|d| d.as_millis() as u64),
            "sync failed: {e}"
        );
        systemd::status(&format!("error ({}): {e}", reason.unwrap_or("other")));
    }
}
