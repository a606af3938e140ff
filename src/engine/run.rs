//! One engine run: read the source (unless the files say nothing committed), publish the
//! image (for the snapshot writer and the admin port), work out what the mirror lacks, and
//! push it through [`sync::run`] — the same call `mapsync sync` makes.
//!
//! Full runs walk every row and let [`sync::run`] compare the whole mirror; watch runs read
//! the rows stamped since the last read (a watermark read, see [`crate::appdb::read`]), and
//! the walk that checks them reads every row; unchanged rows keep their mappings, and these
//! runs push only the [`Diff`] from the image the last successful run pushed, computed from
//! the deltas of the reads since ([`sync::compose`]), or from the whole images when a read
//! could not tell its delta. A read that changed nothing ends the run there, unless it pushes
//! an earlier read. A
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
use crate::appdb::{Delta, ReadMode, SourceError, SourceImage, SqliteSource};
use crate::metrics::FailureReason;
use crate::postgres::TargetError;
use crate::sync::{self, Diff, Ran};

/// What runs carry from one to the next.
pub(super) struct RunState {
    pub source: SqliteSource,
    /// The image the mirror holds as of the last successful run (the published one, shared);
    /// `None` until a run succeeded.
    pub pushed: Option<Arc<SourceImage>>,
    /// How the source changed since `pushed`: the deltas of the reads since, composed; `None`
    /// when a read could not tell (then the next diff compares the whole images).
    pub behind: Option<Delta>,
    /// Rows in the mirror, as last counted (and kept up to date by incremental runs).
    pub remote_rows: u64,
    /// A read that was not pushed (read ahead during the debounce, or while backing off),
    /// with its diff: the next run pushes it if nothing committed since.
    pub unpushed: Option<Unpushed>,
}

impl RunState {
    /// Nothing known yet: the next run reads everything and compares it with the mirror.
    pub(super) fn new(source: SqliteSource) -> RunState {
        RunState {
            source,
            pushed: None,
            behind: None,
            remote_rows: 0,
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
            TargetError::Other { .. } | TargetError::Migration { .. } => None,
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
            state.behind = match (state.behind.take(), &image.delta) {
                (Some(behind), Some(delta)) => Some(sync::compose(behind, delta.clone())),
                _ => None,
            };
            let diff = state.pushed.as_ref().map(|pushed| match &state.behind {
                Some(behind) => Diff::of_delta(behind),
                // Comparing the whole image is CPU work the admin port must not wait behind.
                None => crate::cpu_bound(|| Diff::between(&pushed.mappings, &image.mappings)),
            });
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
            // The source's memo is gone with the failed read: its next read tells no delta,
            // so the next run compares the whole image.
            state.behind = None;
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
        Err(sync::SyncError::Target(e)) => return Outcome::Failed(RunError::target(e)),
        Err(sync::SyncError::Source(e)) => return Outcome::Failed(RunError::source(e)),
        Err(e @ sync::SyncError::Stopped(_)) => {
            return Outcome::Failed(RunError {
                kind: RunErrorKind::Other,
                reason: None,
                message: e.to_string(),
            });
        }
    };
    if ran.counts.refused.is_none() && shared.target.is_some() {
        remember(state, image, &ran);
    }
    Outcome::Ran(ran)
}

/// After a run that wrote: the mirror holds `image` (rows removed from the source stay in
/// the mirror without delete propagation; only a full run sees them again).
fn remember(state: &mut RunState, image: Arc<SourceImage>, ran: &Ran) {
    state.remote_rows = ran.report.remote_after;
    state.behind = Some(Delta::default());
    let old = state.pushed.replace(image);
    // The previous image may hold the last references to mappings that changed, and a full
    // run's transient memory (the mirror's digests) is free by now: both go back on the
    // blocking pool.
    tokio::task::spawn_blocking(move || {
        drop(old);
        crate::release_free_memory();
    });
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
    let in_step = state
        .behind
        .as_ref()
        .is_some_and(|b| b.fresh.is_empty() && b.gone.is_empty());
    let image_always = full || !in_step;
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
