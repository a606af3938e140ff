//! The admin HTTP port (SPEC §4): health and readiness, metrics, status, the sync and export
//! endpoints the application's mapping page calls, snapshots, and the admin page.
//!
//! hyper 1 over HTTP/1.1, one task per connection. Limits that keep the port from being a
//! liability: at most [`MAX_CONNECTIONS`] open connections (further ones wait in the kernel's
//! backlog), a [`HEADER_TIMEOUT`] for a request's head (slow or idle clients are cut off), a
//! [`BODY_LIMIT`] for bodies (413). Handlers never do heavy work on the event loop: sorting,
//! searching and serialising 100,000 mappings run on the blocking pool (or under
//! `block_in_place`). On shutdown the listener
//! closes and open connections get [`DRAIN`] to finish their requests.

mod reply;
mod routes;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::HttpSettings;
use crate::engine::EngineHandle;

pub use routes::App;

pub const MAX_CONNECTIONS: usize = 256;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const BODY_LIMIT: usize = 64 * 1024;
pub const DRAIN: Duration = Duration::from_secs(2);

/// Serves `listener` until `shutdown` turns true, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    settings: &HttpSettings,
    engine: EngineHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Arc::new(App::new(settings, engine));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            _ = crate::shutdown::stopped(&mut shutdown) => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _peer) = tokio::select! {
            _ = crate::shutdown::stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.handle(req).await) }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Errors here are clients going away or timing out: nothing to report.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections were still open after {DRAIN:?}; closing them");
    }
}
