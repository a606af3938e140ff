//! One sync run (SPEC §2): the only way mappings reach the mirror. `mapsync sync` and the
//! daemon's engine both call [`run`]; neither talks to Postgres on its own. A run does not
//! decide *when* it happens: that is the engine's business (`mapsync run`), or the user's
//! (`mapsync sync`, `POST /sync`).
//!
//! Three modes, one transaction each, all or nothing:
//! - [`Mode::Full`] (start-up, schedule, `POST /sync`, dry runs, any run before the first
//!   success): scans every remote row and compares it with the source, which also repairs
//!   rows changed or deleted by hand in Postgres;
//! - [`Mode::Incremental`] (file-watch runs): writes only what the source changed since the
//!   mirror was known to hold the previous read ([`Diff`]), without a scan;
//! - [`Mode::OneShot`] (`mapsync sync`): a full run that reads the SQLite file itself, beside
//!   its connection and transaction, and skips the scan and the read when the state the
//!   previous one left still holds ([`state`]).
//!
//! Guards come before any write: with delete propagation, another instance writing the same
//! table refuses the run (`refused:other_instance`), and so does a delete beyond the limits
//! (`refused:mass_delete`); `force` overrides both. Rows that already match are not
//! rewritten (no new row version, no trigger).

mod compare;
mod diff;
mod report;
pub mod state;

use std::sync::Arc;
use std::time::Instant;

pub use diff::{Diff, compose};
pub use report::{SyncOptions, SyncReport, SyncStatus, Trigger};

use crate::appdb::SourceError;
use crate::config::TargetSettings;
use crate::mapping::Mapping;
use crate::postgres::{Rejected, Target, TargetError, Txn, Written};

/// How a run finds what to write.
pub enum Mode<'a> {
    /// Scan every remote row and compare (repairs drift).
    Full,
    /// Only these changes since the mirror held the previous read.
    Incremental(&'a Diff),
    /// Read the file inside the run, beside the state the previous one left (the run's
    /// `mappings` are empty: it reads them itself).
    OneShot(Box<state::OneShot>),
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Reading the SQLite file inside a run ([`Mode::OneShot`]).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A task of the run panicked or was cancelled (a bug).
    #[error("a task of the run stopped: {0}")]
    Stopped(String),
}

/// The mass-delete limits (`target.max_delete_fraction`, `target.max_delete_floor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_delete_fraction: f64,
    pub max_delete_floor: u64,
}

impl Limits {
    pub fn of(settings: &TargetSettings) -> Limits {
        Limits {
            max_delete_fraction: settings.max_delete_fraction,
            max_delete_floor: settings.max_delete_floor,
        }
    }
}

/// A run to do.
pub struct Run<'a> {
    /// The source as read (its count is the report's `synced_count`).
    pub mappings: &'a [Arc<Mapping>],
    pub mode: Mode<'a>,
    pub opts: SyncOptions,
    pub trigger: Trigger,
    /// The mirror's row count as last known, for runs that do not count it (incremental).
    pub remote_known: u64,
}

/// What a run found and did; its [`SyncReport`] is made from it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Rows in the mirror before the run, when the run counted them.
    pub remote_before: Option<u64>,
    /// Rows inserted (or, in a dry run, to insert).
    pub inserted: u64,
    /// Rows rewritten because they differed.
    pub updated: u64,
    pub deleted: u64,
    /// Remote rows absent from the source (deleted only with delete propagation).
    pub extra: u64,
    /// Set when a guard refused the run; nothing was written.
    pub refused: Option<Refusal>,
    /// Rows the run would change or delete (what a refused or dry run leaves pending).
    pub pending: u64,
    /// Mappings Postgres refused to store; every other one was written.
    pub rejected: Vec<Rejected>,
}

impl Counts {
    fn record(&mut self, w: Written) {
        self.inserted += w.inserted;
        self.updated += w.updated;
        self.rejected = w.rejected;
    }
}

/// Why a guard refused a run, with a message that says how to force it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The run would delete more than the limits allow.
    MassDelete(String),
    /// Another instance has written the table recently.
    OtherInstance(String),
}

impl Refusal {
    /// `refused:mass_delete` or `refused:other_instance`.
    pub fn status(&self) -> &'static str {
        match self {
            Refusal::MassDelete(_) => "refused:mass_delete",
            Refusal::OtherInstance(_) => "refused:other_instance",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::MassDelete(m) | Refusal::OtherInstance(m) => m,
        }
    }
}

/// A finished run: what the caller reports, and what it did in detail.
#[derive(Debug, Clone)]
pub struct Ran {
    pub report: SyncReport,
    pub counts: Counts,
}

/// The status a run that wrote records in the instance registry.
const SYNCED: &str = "synced";

/// Aligns `target` with the source, in one transaction. Without a target, reports
/// `skipped:supabase_not_configured`.
pub async fn run(target: Option<&Target>, limits: Limits, run: Run<'_>) -> Result<Ran, SyncError> {
    let started = Instant::now();
    let Some(target) = target else {
        return Ok(Ran {
            report: SyncReport::skipped(run.trigger),
            counts: Counts::default(),
        });
    };
    let counts = match run.mode {
        Mode::Full => full(target, limits, run.mappings, run.opts).await?,
        Mode::Incremental(diff) => incremental(target, limits, diff, run.opts).await?,
        Mode::OneShot(one) => return state::run_checked(target, limits, run.opts, *one).await,
    };
    let report = SyncReport::of_counts(
        &counts,
        run.mappings.len() as u64,
        run.remote_known,
        run.opts,
        run.trigger,
        started.elapsed(),
    );
    Ok(Ran { report, counts })
}

/// Scan, compare, guard, write, delete, commit.
async fn full(
    target: &Target,
    limits: Limits,
    mappings: &[Arc<Mapping>],
    opts: SyncOptions,
) -> Result<Counts, TargetError> {
    let mut session = target.session().await?;
    let txn = session.begin().await?;
    // Every remote row is compared as it arrives (on the runtime, between the stream's
    // reads): none is held. Indexing the image and collecting what the mirror lacks go over
    // every mapping at once: off the runtime thread the admin port shares.
    let mut compare = crate::cpu_bound(|| compare::Compare::new(mappings));
    let remote_before = txn.scan(|id, digest| compare.visit(id, digest)).await?;
    let compare::Found {
        missing,
        differing,
        extra,
    } = crate::cpu_bound(|| compare.finish());
    let mut counts = Counts {
        remote_before: Some(remote_before),
        extra: extra.len() as u64,
        pending: (missing.len() + differing.len()) as u64
            + if opts.delete_missing {
                extra.len() as u64
            } else {
                0
            },
        ..Default::default()
    };
    if let Some(refusal) =
        guard(&txn, limits, extra.len() as u64, Some(remote_before), opts).await?
    {
        counts.refused = Some(refusal);
        refuse(txn, &counts, opts.dry_run).await?;
        return Ok(counts);
    }
    if opts.dry_run {
        counts.inserted = missing.len() as u64;
        counts.updated = differing.len() as u64;
        counts.deleted = if opts.delete_missing { counts.extra } else { 0 };
        return Ok(counts);
    }
    counts.record(txn.write(&missing, &differing).await?);
    if opts.delete_missing {
        counts.deleted = txn.delete(&extra).await?;
    }
    txn.record_run(SYNCED, true).await?;
    txn.commit().await?;
    Ok(counts)
}

/// Guard, write the changed mappings, delete the removed ones, commit: no scan.
async fn incremental(
    target: &Target,
    limits: Limits,
    diff: &Diff,
    opts: SyncOptions,
) -> Result<Counts, TargetError> {
    let removed: Vec<&str> = diff.removed.iter().map(|m| m.id()).collect();
    let deletes: &[&str] = if opts.delete_missing { &removed } else { &[] };
    let mut counts = Counts {
        extra: removed.len() as u64,
        pending: (diff.changed.len() + deletes.len()) as u64,
        ..Default::default()
    };
    if diff.changed.is_empty() && deletes.is_empty() {
        return Ok(counts);
    }
    let mut session = target.session().await?;
    let txn = session.begin().await?;
    if let Some(refusal) = guard(&txn, limits, deletes.len() as u64, None, opts).await? {
        counts.refused = Some(refusal);
        refuse(txn, &counts, opts.dry_run).await?;
        return Ok(counts);
    }
    if opts.dry_run {
        counts.updated = diff.changed.len() as u64;
        counts.deleted = deletes.len() as u64;
        return Ok(counts);
    }
    let changed: Vec<&Mapping> = diff
        .changed
        .iter()
        .map(AsRef::as_ref)
        .filter(|m| m.mirrorable())
        .collect();
    counts.record(txn.write(&[], &changed).await?);
    counts.deleted = txn.delete(deletes).await?;
    txn.record_run(SYNCED, true).await?;
    txn.commit().await?;
    Ok(counts)
}

/// The guards of a run with delete propagation, before anything is written: another instance
/// writing this table, then the mass-delete limits. `remote` is the mirror's row count, when
/// known; it is counted here only when the limits need it.
async fn guard(
    txn: &Txn<'_>,
    limits: Limits,
    deletes: u64,
    remote: Option<u64>,
    opts: SyncOptions,
) -> Result<Option<Refusal>, TargetError> {
    if !opts.delete_missing || opts.force {
        return Ok(None);
    }
    if let Some(other) = txn.recent_others().await?.first() {
        return Ok(Some(Refusal::OtherInstance(format!(
            "another mapsync instance, {other}, writes {} too (this one is `{}`), and deleting the rows missing from this SQLite file would delete that instance's rows: point one of them at another table, give both the same instance.name if they mirror the same file, or pass force=true (--force) once the other is gone for good",
            txn.table(),
            txn.instance_name(),
        ))));
    }
    // Only a large delete needs the remote count for the limits.
    if deletes <= limits.max_delete_floor {
        return Ok(None);
    }
    let remote = match remote {
        Some(n) => n,
        None => txn.count().await?,
    };
    Ok(mass_delete(deletes, remote, limits).map(Refusal::MassDelete))
}

/// Ends a refused run: nothing is written but this instance's status in the registry (a dry
/// run records nothing: dropping its transaction rolls it back).
async fn refuse(txn: Txn<'_>, counts: &Counts, dry_run: bool) -> Result<(), TargetError> {
    if dry_run {
        return Ok(());
    }
    if let Some(refusal) = &counts.refused {
        txn.record_run(refusal.status(), false).await?;
    }
    txn.commit().await
}

/// `Some(reason)` when deleting `extra` of `remote` rows crosses both limits.
fn mass_delete(extra: u64, remote: u64, limits: Limits) -> Option<String> {
    let over_floor = extra > limits.max_delete_floor;
    let over_fraction = (extra as f64) > limits.max_delete_fraction * remote as f64;
    (over_floor && over_fraction).then(|| {
        format!(
            "would delete {extra} of {remote} remote rows, more than target.max_delete_fraction ({}) and target.max_delete_floor ({}): pass force=true (--force) if the source really lost them",
            limits.max_delete_fraction, limits.max_delete_floor
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(fraction: f64, floor: u64) -> Limits {
        Limits {
            max_delete_fraction: fraction,
            max_delete_floor: floor,
        }
    }

    #[test]
    fn mass_delete_needs_both_limits_crossed() {
        // 11 of 12 rows: over the floor (10) and over half.
        assert!(mass_delete(11, 12, limits(0.5, 10)).is_some());
        // 10 of 12: not over the floor.
        assert!(mass_delete(10, 12, limits(0.5, 10)).is_none());
        // 40 of 100: over the floor, not over half.
        assert!(mass_delete(40, 100, limits(0.5, 10)).is_none());
        // An emptied source against 1000 remote rows.
        let why = mass_delete(1000, 1000, limits(0.5, 10)).unwrap();
        assert!(why.contains("would delete 1000 of 1000"), "{why}");
        assert!(why.contains("force"), "{why}");
    }
}
