//! The snapshot writer: a task that owns the [`SnapshotStore`] and writes the newest image.
//!
//! Runs publish every image they read ([`Shared`]'s `watch` channel); the writer takes the
//! latest one when it is free, so a burst of changes costs one write, not one per change, and a slow disk
//! never delays a push to Postgres. A failed write is logged and counted; the next offer or the
//! snapshot schedule tries again. Writes happen on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::SnapshotRequestError;
use super::shared::Shared;
use crate::appdb::SourceImage;
use crate::snapshot::{SnapshotInfo, SnapshotStore, Written};

/// An explicit request to write now: `POST /snapshots` (with a reply) or the snapshot
/// schedule (without).
pub(super) type SnapshotRequest = Option<oneshot::Sender<Result<Written, SnapshotRequestError>>>;

/// The writer's inbox for explicit requests; images arrive through [`Shared`]'s image channel.
#[derive(Clone)]
pub(super) struct SnapshotWriter {
    requests: mpsc::Sender<SnapshotRequest>,
}

impl SnapshotWriter {
    /// Starts the writer task. Images offered by runs are written at most once per
    /// `min_interval` (the newest one then); requests are written at once. It stops when
    /// `shutdown` turns true, after the write in progress, and writes an image still waiting
    /// for its turn first (a write is atomic either way).
    pub(super) fn start(
        store: SnapshotStore,
        min_interval: Duration,
        shared: Arc<Shared>,
        mut shutdown: watch::Receiver<bool>,
    ) -> (SnapshotWriter, JoinHandle<()>) {
        let mut offered = shared.image.subscribe();
        let (requests, mut inbox) = mpsc::channel::<SnapshotRequest>(16);
        let task = tokio::spawn(async move {
            let mut store = Some(store);
            // When an offered image may be written next, and whether one is waiting.
            let mut not_before = Instant::now();
            let mut waiting = false;
            loop {
                let mut reply = tokio::select! {
                    _ = crate::shutdown::stopped(&mut shutdown) => break,
                    changed = offered.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        waiting = true;
                        None
                    }
                    Some(request) = inbox.recv() => Some(request),
                };
                if reply.is_none() {
                    // An offer: wait for its turn (a request meanwhile is served at once).
                    tokio::select! {
                        _ = crate::shutdown::stopped(&mut shutdown) => break,
                        _ = sleep_until(not_before) => {}
                        Some(request) = inbox.recv() => reply = Some(request),
                    }
                }
                let result = write_newest(&mut store, &mut offered, &shared).await;
                waiting = false;
                if matches!(result, Ok(Written::New(_))) {
                    not_before = Instant::now() + min_interval;
                }
                if let Some(Some(reply)) = reply {
                    let _ = reply.send(result);
                }
            }
            if waiting || offered.has_changed().unwrap_or(false) {
                let _ = write_newest(&mut store, &mut offered, &shared).await;
            }
        });
        (SnapshotWriter { requests }, task)
    }

    /// Asks for a write of the current image now (written only if its content is new).
    pub(super) async fn request(&self, reply: SnapshotRequest) {
        let _ = self.requests.send(reply).await;
    }
}

/// Writes the newest image offered, if there is one yet.
async fn write_newest(
    store: &mut Option<SnapshotStore>,
    offered: &mut watch::Receiver<Option<Arc<SourceImage>>>,
    shared: &Shared,
) -> Result<Written, SnapshotRequestError> {
    let image = offered.borrow_and_update().clone();
    match image {
        Some(image) => write(store, image, shared).await,
        None => Err(SnapshotRequestError::NothingRead),
    }
}

/// Writes `image` unless the newest snapshot holds the same content; records the result.
async fn write(
    store: &mut Option<SnapshotStore>,
    image: Arc<SourceImage>,
    shared: &Shared,
) -> Result<Written, SnapshotRequestError> {
    let Some(mut owned) = store.take() else {
        return Err(SnapshotRequestError::Stopped(
            "the snapshot store is gone after an earlier failure".into(),
        ));
    };
    let (owned, result) = tokio::task::spawn_blocking(move || {
        let result = owned.write(&image.mappings, Utc::now());
        (owned, result)
    })
    .await
    .map_err(|e| SnapshotRequestError::Stopped(e.to_string()))?;
    *store = Some(owned);
    let metrics = &shared.metrics;
    match result {
        Ok(Written::New(info)) => {
            tracing::info!(file = %info.name, mappings = ?info.count, bytes = info.bytes, "snapshot written");
            count(shared, "ok");
            metrics.snapshot_bytes.set(info.bytes as i64);
            metrics.snapshot_written_at(Utc::now());
            shared.board.snapshot_written(Some(info.clone()));
            Ok(Written::New(info))
        }
        Ok(Written::Unchanged) => {
            count(shared, "unchanged");
            shared.board.snapshot_written(None);
            Ok(Written::Unchanged)
        }
        Err(e) => {
            tracing::error!(error = %e, "snapshot write failed");
            count(shared, "error");
            shared.board.snapshot_failed(e.to_string());
            Err(e.into())
        }
    }
}

fn count(shared: &Shared, result: &'static str) {
    shared
        .metrics
        .snapshot_writes
        .get_or_create(&crate::metrics::ResultLabel { result })
        .inc();
}

/// The newest snapshot on disk at start-up, for `/status` before the first write.
pub(super) fn newest_on_disk(store: &SnapshotStore) -> Option<SnapshotInfo> {
    store.newest()
}
