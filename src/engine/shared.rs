//! The state the engine's parts share: the status record, the metrics, the target, the image
//! as last read, and Postgres's last readiness answer. Only the engine touches it; the HTTP
//! port asks [`super::EngineHandle`], which answers from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::status::StatusBoard;
use crate::appdb::{SourceImage, SqliteSource};
use crate::config::{SnapshotSettings, SourceSettings, TargetSettings};
use crate::mapping::Redactor;
use crate::metrics::Metrics;
use crate::postgres::{Target, TargetError};
use crate::sync::{Limits, SyncOptions};

/// How long `/readyz` may reuse Postgres's last answer.
const READY_CACHE: Duration = Duration::from_secs(2);
/// How long `/readyz` waits for Postgres.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct Shared {
    pub board: StatusBoard,
    pub metrics: Arc<Metrics>,
    pub target: Option<Target>,
    pub target_settings: TargetSettings,
    pub source_settings: SourceSettings,
    pub snapshot_settings: SnapshotSettings,
    pub redactor: Redactor,
    /// The mappings as last read (`None` before the first read). The snapshot writer
    /// subscribes to it: publishing an image is offering it for a snapshot.
    pub image: watch::Sender<Option<Arc<SourceImage>>>,
    /// Postgres's last readiness answer, and when it was asked.
    ready_cache: tokio::sync::Mutex<Option<(Instant, Result<(), TargetError>)>>,
}

impl Shared {
    pub fn new(
        board: StatusBoard,
        metrics: Arc<Metrics>,
        target: Option<Target>,
        target_settings: TargetSettings,
        source_settings: SourceSettings,
        snapshot_settings: SnapshotSettings,
        redactor: Redactor,
    ) -> Shared {
        Shared {
            board,
            metrics,
            target,
            target_settings,
            source_settings,
            snapshot_settings,
            redactor,
            image: watch::channel(None).0,
            ready_cache: tokio::sync::Mutex::new(None),
        }
    }

    /// What a run does unless asked otherwise: deletes as `target.delete_missing` says.
    pub fn default_opts(&self) -> SyncOptions {
        SyncOptions {
            delete_missing: self.target_settings.delete_missing,
            ..Default::default()
        }
    }

    pub fn limits(&self) -> Limits {
        Limits::of(&self.target_settings)
    }

    pub fn new_source(&self) -> SqliteSource {
        SqliteSource::new(&self.source_settings, self.redactor.clone()).memoizing()
    }

    /// Makes `image` the current one (for `/mappings`, `/export`, snapshots, metrics). The
    /// image goes out before the status says it was read, so whoever sees the status also
    /// sees the image.
    pub fn publish(&self, image: Arc<SourceImage>, skipped_total: u64) {
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
                crate::release_free_memory();
            });
        }
    }

    /// The file was read and held nothing new: the status says when it was read, the image
    /// stays.
    pub fn source_unchanged(&self) {
        if let Some(image) = self.image.borrow().as_ref() {
            self.board
                .source_read(image.mappings.len() as u64, image.skipped as u64);
        }
    }

    pub fn record_pending(&self, pending: u64) {
        self.board.pending(pending);
        self.metrics.pending_changes.set(pending as i64);
    }

    pub fn target_up(&self, up: bool) {
        self.board.target_up(up);
        if let Some(g) = &self.metrics.target_up {
            g.set(up as i64);
        }
    }

    /// Postgres's readiness (pooled `SELECT 1` and the column check), cached for 2 s. `Ok`
    /// when no target is configured.
    pub async fn target_ready(&self) -> Result<(), TargetError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let mut cache = self.ready_cache.lock().await;
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
        .await;
        self.target_up(answer.is_ok());
        *cache = Some((Instant::now(), answer.clone()));
        answer
    }
}
