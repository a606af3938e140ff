//! The daemon in this process, the way zero-to-production's `spawn_app` and mini-redis's tests
//! host theirs: [`TestApp::spawn`] loads a [`Workspace`]'s config as `mapsync run` would,
//! binds 127.0.0.1:0 and runs [`mapsync::daemon::run`] on a runtime of its own (two workers,
//! as `main` builds it) in a thread of its own. Dropping it resolves the shutdown future and
//! joins the thread, so the daemon has stopped in order — run rolled back, sessions closed,
//! last snapshot flushed — before the test goes on.
//!
//! What the daemon logs on its runtime's threads is kept per daemon ([`Admin::log`]), at the
//! config's `log.level`, for failure messages. Tests of what needs a real process (signals,
//! exit codes, the environment, stderr, resource limits, process measurements) use
//! [`super::daemon::Daemon`] instead, and so do tests of how the daemon and the application
//! share the SQLite file (checkpoints, locks, files swapped or damaged under them): in
//! production they are two processes, and within one process SQLite's POSIX locks are
//! shared (any `close()` of the database file drops all of the process's locks on it).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mapsync::config::Settings;

use super::admin::Admin;
use super::workspace::Workspace;

pub struct TestApp {
    pub addr: SocketAddr,
    pub token: Option<String>,
    log: Log,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl TestApp {
    /// Runs the daemon on `ws`'s config, rewritten with `target_url` and `extra` TOML as for
    /// [`super::daemon::Daemon::start`]; the environment plays no part. Returns once the admin
    /// port is bound (requests wait until the daemon serves them).
    #[track_caller]
    pub fn spawn(ws: &Workspace, target_url: Option<&str>, extra: &str) -> TestApp {
        let token = ws.write_daemon_config(target_url, extra);
        let settings = Settings::load_with_env(Some(&ws.config), std::iter::empty())
            .unwrap_or_else(|e| panic!("the test's config does not load: {e}"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("its address");
        let log = Log::default();
        let dispatch = log.dispatch(&settings.log.level);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                // The runtime's threads log into this daemon's log for as long as they live.
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .build()
            .expect("a tokio runtime");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("mapsync-{}", addr.port()))
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("cannot use the listener: {e}"))?;
                    let shutdown = async move {
                        let _ = stopped.await;
                    };
                    mapsync::daemon::run(settings, listener, shutdown)
                        .await
                        .map_err(|e| e.to_string())
                });
                runtime.shutdown_timeout(Duration::from_secs(10));
                result
            })
            .expect("a thread for the daemon");
        TestApp {
            addr,
            token,
            log,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Resolves the shutdown future and waits for the daemon to return; its result.
    fn shut_down(&mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the daemon's thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Admin for TestApp {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn log(&self) -> String {
        self.log.text()
    }

    fn exit(&self) -> Option<String> {
        self.thread
            .as_ref()
            .is_none_or(|t| t.is_finished())
            .then(|| "mapsync::daemon::run returned (see the log)".into())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        match self.shut_down() {
            Err(e) if !std::thread::panicking() => {
                panic!("the daemon failed: {e}; its log:\n{}", self.log.text())
            }
            _ => {}
        }
    }
}

/// One daemon's log: the text its runtime's threads logged.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    /// A subscriber writing plain text into this log, filtered as `mapsync run` filters.
    fn dispatch(&self, level: &str) -> tracing::Dispatch {
        let directives = if level.contains('=') {
            level.to_string()
        } else {
            format!("{level},tokio_cron_scheduler=warn")
        };
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(directives))
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::Dispatch::new(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
