//! The result every caller of a run sees (SPEC §4 "Sync result"), and the choices a run is
//! made with: what started it ([`Trigger`]), its options ([`SyncOptions`]), how it ended
//! ([`SyncStatus`]).

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::{Counts, Refusal};

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Manual,
    Watch,
    Schedule,
    Startup,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Watch => "watch",
            Trigger::Schedule => "schedule",
            Trigger::Startup => "startup",
        }
    }
}

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStatus {
    Synced,
    SkippedNotConfigured,
    RefusedMassDelete,
    RefusedOtherInstance,
}

impl SyncStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Synced => "synced",
            SyncStatus::SkippedNotConfigured => "skipped:supabase_not_configured",
            SyncStatus::RefusedMassDelete => "refused:mass_delete",
            SyncStatus::RefusedOtherInstance => "refused:other_instance",
        }
    }

    /// Whether a guard refused the run (nothing was written).
    pub fn is_refused(self) -> bool {
        matches!(
            self,
            SyncStatus::RefusedMassDelete | SyncStatus::RefusedOtherInstance
        )
    }

    /// The `result` label of `mapsync_sync_runs_total`.
    pub fn metric_result(self) -> &'static str {
        match self {
            SyncStatus::Synced => "ok",
            SyncStatus::SkippedNotConfigured => "skipped",
            SyncStatus::RefusedMassDelete | SyncStatus::RefusedOtherInstance => "refused",
        }
    }
}

impl Serialize for SyncStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Per-run choices (`--delete-missing`, `--force`, `--dry-run`, or the HTTP query).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncOptions {
    pub delete_missing: bool,
    pub force: bool,
    pub dry_run: bool,
}

/// The result of a run, as `mapsync sync` prints it and `POST /sync` answers it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SyncReport {
    pub status: SyncStatus,
    /// Mappings now mirrored (the source's count when synced).
    pub synced_count: u64,
    /// Rows inserted or updated.
    pub changed_count: u64,
    pub deleted_count: u64,
    pub remote_before: u64,
    pub remote_after: u64,
    pub duration_ms: u64,
    pub trigger: Trigger,
    /// Only present (and true) for `--dry-run`: the counts say what would happen.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Why a run was refused, or what a dry run would delete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl SyncReport {
    pub fn skipped(trigger: Trigger) -> SyncReport {
        SyncReport {
            status: SyncStatus::SkippedNotConfigured,
            synced_count: 0,
            changed_count: 0,
            deleted_count: 0,
            remote_before: 0,
            remote_after: 0,
            duration_ms: 0,
            trigger,
            dry_run: false,
            detail: None,
        }
    }
}

impl SyncReport {
    /// The report of a run that reached the target. `synced_count` is the source's mapping
    /// count; `remote_known` stands in for the mirror's row count when the run did not count
    /// it (incremental runs).
    pub fn of_counts(
        outcome: &Counts,
        synced_count: u64,
        remote_known: u64,
        opts: SyncOptions,
        trigger: Trigger,
        duration: Duration,
    ) -> SyncReport {
        let remote_before = outcome.remote_before.unwrap_or(remote_known);
        let duration_ms = duration.as_millis() as u64;
        match &outcome.refused {
            Some(refusal) => SyncReport {
                status: match refusal {
                    Refusal::MassDelete(_) => SyncStatus::RefusedMassDelete,
                    Refusal::OtherInstance(_) => SyncStatus::RefusedOtherInstance,
                },
                synced_count: 0,
                changed_count: 0,
                deleted_count: 0,
                remote_before,
                remote_after: remote_before,
                duration_ms,
                trigger,
                dry_run: opts.dry_run,
                detail: Some(refusal.message().to_string()),
            },
            None => SyncReport {
                status: SyncStatus::Synced,
                synced_count,
                changed_count: outcome.inserted + outcome.updated,
                deleted_count: outcome.deleted,
                remote_before,
                remote_after: (remote_before + outcome.inserted).saturating_sub(outcome.deleted),
                duration_ms,
                trigger,
                dry_run: opts.dry_run,
                detail: detail(outcome, opts),
            },
        }
    }
}

/// What a synced run wants its reader to know: mappings Postgres refused, remote rows left
/// in place.
fn detail(outcome: &Counts, opts: SyncOptions) -> Option<String> {
    let mut parts = Vec::new();
    if !outcome.rejected.is_empty() {
        let ids: Vec<&str> = outcome
            .rejected
            .iter()
            .take(5)
            .map(|r| r.id.as_str())
            .collect();
        parts.push(format!(
            "Postgres refused {} mapping(s) ({}{}); every other mapping is mirrored: see the log for why",
            outcome.rejected.len(),
            ids.join(", "),
            if outcome.rejected.len() > ids.len() { ", …" } else { "" }
        ));
    }
    if !opts.delete_missing && outcome.extra > 0 {
        parts.push(format!(
            "{} remote rows are not in the source; delete propagation is off (target.delete_missing)",
            outcome.extra
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
