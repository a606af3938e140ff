//! mapsync keeps a Postgres table aligned with the LLM model mappings an application stores in
//! its SQLite file, writes rolling JSON snapshots of them, and serves a small admin HTTP port.
//!
//! Data flows one way (only `mapsync restore`, run by an operator, writes a snapshot back
//! into the SQLite file):
//!
//! ```text
//! SQLite file ──source──▶ Vec<Mapping> ──sync──▶ target (Postgres mirror)
//!                              └──────────snapshot──▶ JSON files on disk
//! ```
//!
//! - [`config`]: typed, validated settings (defaults < file < environment).
//! - [`mapping`]: the `Mapping` type and every normalisation rule.
//! - [`source`]: reading the SQLite file without disturbing the application; the watcher.
//! - [`target`]: the Postgres pool, TLS, schema check and the one-transaction sync.
//! - [`sync`]: one run and its result.
//! - [`snapshot`]: atomic rolling JSON files, and the export format.
//! - [`engine`]: the daemon's sync loop: triggers, debounce, one run at a time, retry, status.
//! - [`http`] and [`metrics`]: the admin port and its Prometheus registry.
//! - [`logging`]: the log writer (stderr, with syslog priorities when it is the journal).
//! - [`daemon`]: `mapsync run`, wiring the engine and the admin port to signals and systemd.
//! - [`restore`] and [`demo`]: `mapsync restore` and `mapsync demo`.
//! - [`commands`]: what each `mapsync` subcommand does; `main.rs` only parses and dispatches.

pub mod commands;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod http;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod restore;
pub mod schedule;
pub mod shutdown;
pub mod snapshot;
pub mod source;
pub mod sync;
pub mod target;

/// The version this binary was built as, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision it was built from (`build.rs`): a short hash, with `-dirty` when the tree
/// had uncommitted changes, or `unknown` when it was not built from a git checkout.
pub const REVISION: &str = env!("MAPSYNC_REVISION");

/// Any failure a command can end with. `main` prints it as one line and exits with
/// [`Error::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Target(#[from] target::TargetError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Restore(#[from] restore::RestoreError),
    #[error("{0}")]
    Other(String),
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
