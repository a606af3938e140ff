//! The admin HTTP port (SPEC §4): health and readiness, metrics, status, the sync and export
//! endpoints the application's mapping page calls, snapshots, and the admin page.
//!
//! hyper 1 over HTTP/1.1, one task per connection, one request per connection (an admin port
//! gains nothing from keep-alive, and every request head then passes the same limits).
//! What keeps the port from being a liability, whatever clients send:
//! - every connection is accepted at once; its request head is read by `conn` within
//!   `conn::HEAD_TIMEOUT`, among at most `conn::PENDING_MAX` waiting heads (the oldest
//!   is closed when one more arrives), and refused with the envelope when hyper would refuse
//!   it;
//! - at most [`MAX_CONNECTIONS`] connections are open; beyond that a new one is closed at
//!   once;
//! - bodies are read only by the route that takes one, within a deadline and a shared
//!   budget (`routes`); a connection waiting for its body counts among the waiting heads,
//!   so slow bodies cannot pile up either;
//! - handlers never do heavy work on the event loop: sorting, searching and serialising
//!   100,000 mappings run on the blocking pool (or under `crate::cpu_bound`: `block_in_place`
//!   on the daemon's runtime).
//!
//! On shutdown the listener closes and open requests get [`DRAIN`] to finish.

mod auth;
mod conn;
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

pub use auth::Jwks;
pub use routes::{App, BODY_LIMIT, Peer};

/// Open connections at most (the unit allows 8192 descriptors).
pub const MAX_CONNECTIONS: usize = 1024;
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
    let pending = app.pending().clone();
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(conn::HEAD_TIMEOUT)
        .keep_alive(false);
    let http = Arc::new(http);
    loop {
        let (stream, remote) = tokio::select! {
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: closing this one at once keeps the others served.
            drop(stream);
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, pending, http) = (app.clone(), pending.clone(), http.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let (place, pushed_out) = pending.enter();
            let head = tokio::select! {
                head = tokio::time::timeout(conn::HEAD_TIMEOUT, conn::read_head(&mut stream)) => head,
                _ = pushed_out => return,
            };
            drop(place);
            let prefix = match head {
                Ok(conn::Head::Ready(prefix)) => prefix,
                Ok(conn::Head::Refused(refused)) => {
                    let answer = app.refuse_head(&refused, remote);
                    conn::answer_and_close(stream, &answer).await;
                    return;
                }
                // Slow, idle or gone: nothing to answer.
                Ok(conn::Head::Gone) | Err(_) => return,
            };
            let peer = Peer { remote, local };
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req, peer).await) }
            });
            let io = TokioIo::new(conn::Prefixed::new(prefix, stream));
            // Errors here are clients going away: nothing to report.
            let _ = watcher.watch(http.serve_connection(io, service)).await;
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
