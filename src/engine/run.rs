//! One engine run: read the source (unless the files say nothing committed), publish the
//! image (for the snapshot writer and the admin port), work out what the mirror lacks, and
//! push it through [`sync::run`] — the same call `mapsync sync` makes.
//!
//! Full runs walk every row and let [`sync::run`] compare the whole mirror; watch runs read
//! the rows stamped since the last read (a watermark read, see [`crate::appdb::read`]), and
//! the walk that checks them reads every row; unchanged rows keep their mappings, and these
//! runs push only the [`Diff`] from what the last successful run left in the mirror
//! ([`Mirrored`]), computed from the read's delta alone when the mirror held the previous
//! read. A read that changed nothing ends the run there, unless it pushes an earlier read. A
//! run that may not push (read ahead during the debounce, or while backing off) keeps its read
//! for the next one.
//!
//! The run owns its [`RunState`] while it runs and hands it back, so no lock guards it. It
//! records nothing itself: the event loop reports how it ended ([`Outcome`]) through one
//! [`super::events::RunFinished`].

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::policy::Plan;
use super::shared::Shared;
use crate::appdb::{ReadMode, SourceError, SourceImage, SqliteSource};
use crate::metrics::FailureReason;
use crate::postgres::TargetError;
use crate::sync::{self, Diff, Mirrored, Ran};

/// What runs carry from one to the next.
pub(super) struct RunState {
    pub source: SqliteSource,
    /// What the mirror holds as of the last successful run; `None` until one succeeded.
    pub mirrored: Option<Mirrored>,
    /// Rows in the mirror, as last counted (and kept up to date by incremental runs).
    pub remote_rows: u64,
    /// Whether `mirrored` holds what the last read read: then the next incremental read's
    /// delta is the difference to the mirror, and the whole image need not be compared.
    pub in_step: bool,
    /// A read that was not pushed (read ahead during the debounce, or while backing off),
    /// with its diff: the next run pushes it if nothing committed since.
    pub unpushed: Option<Unpushed>,
}

impl RunState {
    /// Nothing known yet: the next run reads everything and compares it with the mirror.
    pub(super) fn new(source: SqliteSource) -> RunState {
        RunState {
            source,
            mirrored: None,
            remote_rows: 0,
            in_step: false,
            unpushed: None,
        }
    }
}

/// What a read found, waiting for a run that pushes.
pub(super) struct Unpushed {
    image: Arc<SourceImage>,
    diff: Option<Diff>,
}

/// How a run ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The gate saw no commit: nothing was read.
    Unchanged,
    /// Read and published, not pushed.
    ReadOnly,
    /// Pushed (or skipped: no target), synced or refused.
    Ran(Ran),
    Failed(RunError),
}

/// A run as the event loop reports it.
pub(super) struct Finished {
    pub started_at: DateTime<Utc>,
    pub duration: std::time::Duration,
    pub outcome: Outcome,
}

/// Why a run failed, as one line (already free of secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunError {
    pub kind: RunErrorKind,
    /// Why, as `mapsync_sync_failures_total` names it (`None`: none of its reasons).
    pub reason: Option<FailureReason>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunErrorKind {
    Source,
    Target,
    ShuttingDown,
    Other,
}

impl RunError {
    pub(super) fn source(e: SourceError) -> Self {
        RunError {
            kind: RunErrorKind::Source,
            reason: Some(FailureReason::Source),
            message: e.to_string(),
        }
    }

    pub(super) fn target(e: TargetError) -> Self {
        let reason = match &e {
            TargetError::Unreachable { .. } => Some(FailureReason::TargetNetwork),
            TargetError::Timeout { .. } | TargetError::Locked { .. } => {
                Some(FailureReason::TargetTimeout)
            }
            TargetError::Auth { .. } | TargetError::NoDatabase { .. } => {
                Some(FailureReason::TargetAuth)
            }
            TargetError::Tls { .. } => Some(FailureReason::TargetTls),
            TargetError::MissingTable { .. }
            | TargetError::WrongColumns { .. }
            | TargetError::Permission { .. } => Some(FailureReason::TargetSchema),
            TargetError::Other { .. } => None,
        };
        RunError {
            kind: RunErrorKind::Target,
            reason,
            message: e.to_string(),
        }
    }

    pub(super) fn other(message: String) -> Self {
        RunError {
            kind: RunErrorKind::Other,
            reason: None,
            message,
        }
    }

    pub(super) fn shutting_down(message: &str) -> Self {
        RunError {
            kind: RunErrorKind::ShuttingDown,
            reason: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub(super) async fn run(
    mut state: RunState,
    plan: Plan,
    shared: Arc<Shared>,
) -> (RunState, Finished) {
    let started = Instant::now();
    let started_at = Utc::now();
    let outcome = run_inner(&mut state, plan, &shared).await;
    let finished = Finished {
        started_at,
        duration: started.elapsed(),
        outcome,
    };
    (state, finished)
}

async fn run_inner(state: &mut RunState, plan: Plan, shared: &Arc<Shared>) -> Outcome {
    let (image, diff) = match read(state, &plan, shared).await {
        Ok(Read::Image(image)) => {
            state.unpushed = None;
            shared.publish(image.clone(), state.source.skipped_total());
            let diff = state
                .mirrored
                .as_ref()
                .map(|m| match (&image.delta, state.in_step) {
                    (Some(delta), true) => m.diff_delta(delta),
                    // Comparing the whole image is CPU work the admin port must not wait behind.
                    _ => tokio::task::block_in_place(|| m.diff(&image.mappings)),
                });
            // Until this run succeeds, the mirror is behind what was just read.
            state.in_step = false;
            (image, diff)
        }
        // Nothing committed since the last read, or nothing that the mirror lacks: push what
        // that read found, if it was read ahead of this run and not pushed yet.
        Ok(read) => match state.unpushed.take() {
            Some(u) if plan.push => (u.image, u.diff),
            kept => {
                state.unpushed = kept;
                if matches!(read, Read::Same) {
                    shared.source_unchanged();
                }
                return Outcome::Unchanged;
            }
        },
        Err(e) => {
            // The source's memo is gone with the failed read: its next delta would miss rows
            // deleted meanwhile, so the next run compares the whole image.
            state.in_step = false;
            state.unpushed = None;
            return Outcome::Failed(e);
        }
    };
    let pending = match &diff {
        Some(d) => {
            d.changed.len()
                + if plan.opts.delete_missing {
                    d.removed.len()
                } else {
                    0
                }
        }
        None => image.mappings.len(),
    };
    shared.record_pending(if shared.target.is_some() {
        pending as u64
    } else {
        0
    });
    if !plan.push && shared.target.is_some() {
        state.unpushed = Some(Unpushed { image, diff });
        return Outcome::ReadOnly;
    }
    let mode = match (&diff, plan.full) {
        (Some(d), false) => sync::Mode::Incremental(d),
        _ => sync::Mode::Full,
    };
    let run = sync::Run {
        mappings: &image.mappings,
        mode,
        opts: plan.opts,
        trigger: plan.trigger,
        remote_known: state.remote_rows,
    };
    let ran = match sync::run(shared.target.as_ref(), shared.limits(), run).await {
        Ok(ran) => ran,
        Err(e) => return Outcome::Failed(RunError::target(e)),
    };
    if ran.counts.refused.is_none() && shared.target.is_some() {
        remember(state, &plan, &image, diff, &ran);
    }
    Outcome::Ran(ran)
}

/// After a run that wrote: what the mirror now holds.
fn remember(state: &mut RunState, plan: &Plan, image: &SourceImage, diff: Option<Diff>, ran: &Ran) {
    state.in_step = true;
    state.remote_rows = ran.report.remote_after;
    match (&mut state.mirrored, diff, plan.full) {
        (Some(mirrored), Some(diff), false) => mirrored.apply(diff, plan.opts.delete_missing),
        _ => {
            // Indexing 100,000 mappings, and freeing the old index (which may hold the last
            // references to the previous read's mappings), takes tens of milliseconds: not on
            // a runtime thread that the admin port shares.
            let fresh = tokio::task::block_in_place(|| Mirrored::of(&image.mappings));
            if let Some(old) = state.mirrored.replace(fresh) {
                tokio::task::spawn_blocking(move || drop(old));
            }
        }
    }
}

/// What [`read`] found.
enum Read {
    /// The gate saw no commit: nothing was read.
    Gated,
    /// Read, and every mapping is as the previous read left it, which the mirror holds (the
    /// image is not made again).
    Same,
    Image(Arc<SourceImage>),
}

/// Reads the source on the blocking pool.
async fn read(state: &mut RunState, plan: &Plan, shared: &Shared) -> Result<Read, RunError> {
    let mode = if plan.walk {
        ReadMode::Full
    } else {
        ReadMode::Incremental
    };
    let (gate, full) = (plan.gate, plan.full);
    // A full run compares the whole image with the mirror, changed or not; and a mirror
    // behind the previous read needs the image too.
    let image_always = full || !state.in_step;
    let source = std::mem::replace(&mut state.source, shared.new_source());
    let joined = tokio::task::spawn_blocking(move || {
        let mut source = source;
        let result = (|| {
            if gate && !source.changed()? {
                return Ok(Read::Gated);
            }
            let rows = source.read_rows(mode)?;
            tracing::debug!(
                read = if rows.watermark { "watermark" } else { "walk" },
                unchanged = rows.unchanged(),
                "source read"
            );
            if !image_always && rows.unchanged() {
                return Ok(Read::Same);
            }
            Ok(Read::Image(Arc::new(source.image_of(rows))))
        })();
        if result.is_err() {
            // The next gated run must read, even if the files look the same again.
            source.forget();
        }
        (source, result)
    })
    .await;
    match joined {
        Ok((source, result)) => {
            state.source = source;
            result.map_err(RunError::source)
        }
        // The read panicked; the fresh source put in its place starts over.
        Err(e) => Err(RunError::other(format!(
            "reading the SQLite file stopped: {e}"
        ))),
    }
}
