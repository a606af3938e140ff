//! The snapshot writer: a task that owns the [`SnapshotStore`] and writes the newest image.
//!
//! Runs publish every image they read ([`Shared`]'s `watch` channel); the writer takes the
//! latest one when it is free, so a burst of changes costs one write, not one per change, and a slow disk
//! never delays a push to Postgres. A failed write is logged and counted; the next offer or the
//! snapshot schedule tries again. Writes happen on the blocking pool.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::Shared;
use crate::mapping::{self, Mapping};
use crate::snapshot::{SnapshotInfo, SnapshotStore, Written};
use crate::source::SourceImage;

/// An explicit request: `POST /snapshots` (with a reply) or the snapshot schedule (without).
pub(super) type Request = Option<oneshot::Sender<Result<Written, String>>>;

/// The writer's inbox for explicit requests; images arrive through [`Shared`]'s image channel.
#[derive(Clone)]
pub(super) struct SnapshotWriter {
    requests: mpsc::Sender<Request>,
}

impl SnapshotWriter {
    /// Starts the writer task. It stops when `shutdown` turns true, after the write in
    /// progress (a write is atomic either way).
    pub(super) fn start(
        store: SnapshotStore,
        shared: Arc<Shared>,
        mut shutdown: watch::Receiver<bool>,
    ) -> (SnapshotWriter, JoinHandle<()>) {
        let mut offered = shared.image.subscribe();
        let (requests, mut inbox) = mpsc::channel::<Request>(16);
        let task = tokio::spawn(async move {
            let mut store = Some(store);
            loop {
                let reply = tokio::select! {
                    _ = crate::shutdown::stopped(&mut shutdown) => break,
                    changed = offered.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        None
                    }
                    Some(request) = inbox.recv() => request,
                };
                let image = offered.borrow_and_update().clone();
                let result = match image {
                    Some(image) => write(&mut store, image, &shared).await,
                    None => Err("no mappings have been read yet".to_string()),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
        });
        (SnapshotWriter { requests }, task)
    }

    /// Asks for a write of the current image now (written only if its content is new).
    pub(super) async fn request(&self, reply: Request) {
        let _ = self.requests.send(reply).await;
    }
}

/// Writes `image` unless the newest snapshot holds the same content; records the result.
async fn write(
    store: &mut Option<SnapshotStore>,
    image: Arc<SourceImage>,
    shared: &Shared,
) -> Result<Written, String> {
    let Some(mut owned) = store.take() else {
        return Err("the snapshot store is gone after an earlier failure".into());
    };
    let (owned, result) = tokio::task::spawn_blocking(move || {
        let mut sorted: Vec<Arc<Mapping>> = image.mappings.clone();
        mapping::sort_for_export(&mut sorted);
        let digest = mapping::digest(sorted.iter().map(|m| m.as_ref()));
        let result = owned.write(&sorted, digest, Utc::now());
        (owned, result)
    })
    .await
    .map_err(|e| format!("the snapshot write stopped: {e}"))?;
    *store = Some(owned);
    let metrics = &shared.metrics;
    match result {
        Ok(Written::New(info)) => {
            tracing::info!(file = %info.name, mappings = ?info.count, bytes = info.bytes, "snapshot written");
            count(shared, "ok");
            metrics.snapshot_bytes.set(info.bytes as i64);
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
            Err(e.to_string())
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
