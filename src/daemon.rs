//! `mapsync run`: the long-running service as a library call, in the shape of mini-redis:
//! [`run`] takes the settings, a bound listener for the admin port and a shutdown future;
//! `main` passes the socket it bound and the OS signals ([`bind`], [`crate::shutdown::signal`]),
//! and tests host the daemon in-process on port 0 with a future of their own. It starts the
//! engine and the admin port, tells systemd when it is ready, and shuts everything down in
//! order when the shutdown future resolves.
//!
//! Shutdown order: stop accepting HTTP connections and new runs; let the run in progress
//! commit or roll back within [`crate::engine::SHUTDOWN_GRACE`]; let open requests and the
//! snapshot being written finish; exit 0 — all within [`STOP_DEADLINE`], well inside
//! systemd's `TimeoutStopSec`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::Error;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::postgres::Target;
use crate::{engine, http, shutdown};

/// The whole shutdown must fit in this (SPEC §9: within 10 s).
pub const STOP_DEADLINE: Duration = Duration::from_secs(9);

/// Binds the admin port at `http.listen`.
pub async fn bind(settings: &Settings) -> Result<TcpListener, Error> {
    TcpListener::bind(settings.http.listen).await.map_err(|e| {
        Error::Other(format!(
            "cannot listen on {}: {e}: another process holds the port, or choose another http.listen",
            settings.http.listen
        ))
    })
}

/// Binds `http.listen` and runs the daemon until SIGTERM or SIGINT (`mapsync run`).
pub async fn run_until_signalled(settings: Settings) -> Result<(), Error> {
    let listener = bind(&settings).await?;
    run(settings, listener, shutdown::signal()).await
}

/// Runs the daemon on `listener` until `shutdown` resolves, then stops in order.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Other(format!("cannot read the listening address: {e}")))?;
    let target = Target::from_settings(&settings.target)?;
    let metrics = Arc::new(Metrics::new(target.is_some()));
    let (stop, stopping) = shutdown::channel();
    let (engine, engine_task) = engine::start(&settings, target, metrics, stopping.clone()).await?;
    let server = tokio::spawn({
        let (http, engine, stopping) = (settings.http.clone(), engine.clone(), stopping.clone());
        async move { http::serve(listener, &http, engine, stopping).await }
    });
    tracing::info!(
        addr = %addr,
        sqlite = %settings.source.sqlite_path.display(),
        target = engine.target_name().unwrap_or("none (snapshots only)"),
        "mapsync running: admin port listening"
    );

    tokio::pin!(shutdown);
    let signalled = tokio::select! {
        _ = engine.first_run_attempted() => false,
        _ = &mut shutdown => true,
    };
    if !signalled {
        engine::systemd::ready();
        shutdown.await;
    }
    tracing::info!("shutting down");
    engine::systemd::stopping();
    stop.send_replace(true);
    let finished = tokio::time::timeout(STOP_DEADLINE, async {
        let _ = server.await;
        let _ = engine_task.await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!("shutdown took longer than {STOP_DEADLINE:?}; exiting anyway");
    }
    Ok(())
}
