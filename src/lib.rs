//! mapsync keeps a Postgres table aligned with the LLM model mappings an application stores in
//! its SQLite file, writes rolling JSON snapshots of them, and serves a small admin HTTP port.
//!
//! Data flows one way (only `mapsync restore`, run by an operator, writes a snapshot back
//! into the SQLite file):
//!
//! ```text
//! SQLite file ──appdb::read──▶ Vec<Mapping> ──sync──▶ postgres (the mirror)
//!                                   └──────snapshot──▶ JSON files on disk
//! ```
//!
//! - [`config`]: typed, validated settings (defaults < file < environment), parsed once.
//! - [`mapping`]: the `Mapping` type and every normalisation rule.
//! - [`appdb`]: the application's SQLite file: its schema, the reader, the watcher, restore.
//! - [`postgres`]: the mirror: pool, TLS, schema, and the steps of a run's transaction.
//! - [`sync`]: one run (full or incremental), the same for the CLI and the daemon.
//! - [`snapshot`]: atomic rolling JSON files, and the export format.
//! - [`engine`]: the daemon's sync loop: when to run, one run at a time, retry, status.
//! - [`http`] and [`metrics`]: the admin port and its Prometheus registry.
//! - [`logging`]: the log writer (stderr, with syslog priorities when it is the journal).
//! - [`daemon`]: `mapsync run` as a library call: `run(settings, listener, shutdown)`.
//! - [`demo`]: `mapsync demo`.
//! - [`commands`]: what each one-shot `mapsync` subcommand does; `main.rs` only parses and
//!   dispatches.

pub mod appdb;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod http;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod postgres;
pub mod schedule;
pub mod shutdown;
pub mod snapshot;
pub mod sync;

/// The version this binary was built as, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision it was built from (`build.rs`): a short hash, with `-dirty` when the tree
/// had uncommitted changes, or `unknown` when it was not built from a git checkout.
pub const REVISION: &str = env!("MAPSYNC_REVISION");

/// `text` on one line: each run of whitespace, line breaks included, becomes one space (the
/// messages of parsers and drivers can span lines; an error here is always one line).
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The directory `path` is in: its parent, or `.` for a bare file name.
pub(crate) fn parent_dir(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    }
}

/// Runs `work`, which goes over every mapping at once, without holding up the runtime's
/// other tasks: on a multi-thread runtime (the daemon, whose admin port shares the workers)
/// the worker hands its tasks to another first; on a one-thread runtime (the one-shot
/// commands, which have nothing else to serve) it simply runs.
pub(crate) fn cpu_bound<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Hands memory freed by the allocator back to the system, so that the RSS an operator sees
/// follows what the process holds (glibc keeps freed memory otherwise, per arena: memory one
/// thread freed is not reused by a thread allocating from the other arena).
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Any failure a command can end with. `main` prints it as one line and exits with
/// [`Error::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Source(#[from] appdb::SourceError),
    #[error(transparent)]
    Target(#[from] postgres::TargetError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Restore(#[from] appdb::restore::RestoreError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("{0}")]
    Other(String),
}

impl From<sync::SyncError> for Error {
    fn from(e: sync::SyncError) -> Error {
        match e {
            sync::SyncError::Target(e) => Error::Target(e),
            sync::SyncError::Source(e) => Error::Source(e),
            e @ sync::SyncError::Stopped(_) => Error::Other(format!(
                "mapsync sync failed: {e}: a bug in mapsync, please report it; mapsync sync --full works around it"
            )),
        }
    }
}

impl Error {
    /// 78 (EX_CONFIG) for configuration problems, so systemd does not restart-loop on them;
    /// 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 78,
            _ => 1,
        }
    }
}
