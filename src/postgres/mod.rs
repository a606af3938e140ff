//! The Postgres mirror: connection pool, TLS ([`tls`]), the table's schema and `mapsync
//! migrate` ([`schema`]), the instance registry ([`registry`]), and the steps of a run's
//! transaction (`txn`: [`Session`], [`Txn`]). What a run does with those steps is the
//! [`sync`](crate::sync) module's business.
//!
//! [`Target`] owns a deadpool-postgres pool. Creating it never touches the network; the first
//! use does. Every statement of a run runs inside an explicit transaction (only the one-shot
//! `SELECT 1` of a probe and `mapsync migrate`'s scripts do not), and no prepared statement
//! outlives its transaction, so the same code works through PgBouncer or Supavisor in
//! transaction-pooling mode. Timeouts are set per transaction with `SET LOCAL` for the same
//! reason (poolers refuse the `options` startup parameter).
//!
//! Errors are [`TargetError`]s: one line that says what failed, on which server (never with
//! the password), and the fix.

pub mod registry;
pub mod schema;
pub mod tls;
mod txn;

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::CancelToken;
use tokio_postgres::error::SqlState;

pub use tls::SslMode;
pub use txn::{Rejected, RemoteFingerprint, Session, Txn, Written, digest};

use crate::config::{TableName, TargetSettings};

/// A parsed `target.url`: the tokio-postgres config, the TLS mode and its connector (the CA
/// file read and parsed), and a printable name.
#[derive(Clone)]
pub struct ConnectSpec {
    pub pg: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
    pub tls: tls::Connector,
    /// `user@host:port/dbname`: safe to print, never holds the password.
    pub display: String,
}

/// Prints only the safe name: the config holds the password.
impl std::fmt::Debug for ConnectSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSpec")
            .field("display", &self.display)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

/// Why `target.url` is not usable. Never repeats the URL (it holds the password).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error(
        "not a valid Postgres URL ({0}); expected postgres://user:password@host:5432/dbname?sslmode=require"
    )]
    Syntax(String),
    #[error(transparent)]
    SslMode(#[from] tls::SslModeError),
    #[error("it names no host")]
    NoHost,
    #[error(
        "{0}: give the PEM file of the CA that signed the server's certificate (Supabase: Dashboard → Database settings → SSL Configuration → Download certificate)"
    )]
    Tls(#[from] tls::TlsSetupError),
}

impl ConnectSpec {
    /// Parses a libpq URL (`postgres://user:pw@host:port/db?sslmode=…`) or key=value string.
    /// `sslmode` and `sslrootcert` are taken out and handled here; the rest goes to
    /// tokio-postgres. Errors never repeat the URL (it holds the password).
    pub fn parse(url: &str, root_cert: Option<&Path>) -> Result<ConnectSpec, UrlError> {
        let (rest, sslmode, sslrootcert) = split_tls_params(url);
        let mut pg: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| UrlError::Syntax(e.to_string()))?;
        let mut ssl_mode = match sslmode.as_deref() {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Prefer,
        };
        if pg.get_hosts().is_empty() {
            return Err(UrlError::NoHost);
        }
        // As libpq: no TLS over a Unix socket, whatever sslmode says (tokio-postgres would
        // try, and fail on the socket's path as a server name).
        if pg
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)))
        {
            ssl_mode = SslMode::Disable;
        }
        pg.ssl_mode(ssl_mode.for_tokio_postgres());
        let host = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg.get_user().unwrap_or("postgres").to_string();
        let db = pg.get_dbname().unwrap_or(&user).to_string();
        pg.application_name("mapsync");
        let ssl_root_cert = root_cert
            .map(Path::to_path_buf)
            .or(sslrootcert.map(PathBuf::from));
        let tls = tls::connector(ssl_mode, ssl_root_cert.as_deref())?;
        Ok(ConnectSpec {
            display: format!("{user}@{host}:{port}/{db}"),
            pg,
            ssl_mode,
            ssl_root_cert,
            tls,
        })
    }

    fn user(&self) -> &str {
        self.pg.get_user().unwrap_or("postgres")
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query string or a key=value string.
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut sslmode, mut sslrootcert) = (None, None);
    let mut take = |k: &str, v: &str| match k {
        "sslmode" => {
            sslmode = Some(v.to_string());
            true
        }
        "sslrootcert" => {
            sslrootcert = Some(v.to_string());
            true
        }
        _ => false,
    };
    let url = url.trim();
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        !take(k, v)
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                !take(k.trim(), v.trim().trim_matches('\''))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, sslmode, sslrootcert)
}

/// Why a Postgres operation failed, with the fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    #[error(
        "cannot connect to Postgres at {at}: {reason}: check that the server is up and the host and port in target.url"
    )]
    Unreachable { at: String, reason: String },
    #[error("Postgres at {at} rejected the login of user {user}: check the password in target.url")]
    Auth { at: String, user: String },
    #[error("database {db} does not exist on {at}: check the database name in target.url")]
    NoDatabase { at: String, db: String },
    #[error("TLS with Postgres at {at} failed: {reason}: {hint}")]
    Tls {
        at: String,
        reason: String,
        hint: &'static str,
    },
    #[error(
        "table {table} is missing on {at}: run `mapsync migrate` or apply sql/001_model_mappings.sql and sql/002_security.sql"
    )]
    MissingTable { table: String, at: String },
    #[error(
        "table {table} on {at} does not have the expected columns ({problems}): run `mapsync migrate` or apply sql/001_model_mappings.sql"
    )]
    WrongColumns {
        table: String,
        at: String,
        problems: String,
    },
    #[error(
        "user {user} may not write {table} on {at} ({reason}): grant the rights in sql/003_mapsync_role.sql or connect as the table owner or service role"
    )]
    Permission {
        table: String,
        at: String,
        user: String,
        reason: String,
    },
    #[error(
        "Postgres at {at} did not answer in time ({reason}): raise target.statement_timeout_ms or check the server's load"
    )]
    Timeout { at: String, reason: String },
    #[error(
        "a row of {table} on {at}, or the table itself, stayed locked by another session for over 10 s: find the session in pg_stat_activity (wait_event_type = 'Lock', or another mapsync instance's long run) and end it"
    )]
    Locked { at: String, table: String },
    #[error("Postgres at {at} failed: {reason}")]
    Other { at: String, reason: String },
    #[error("{script} failed: {source}")]
    Migration {
        script: &'static str,
        source: Box<TargetError>,
    },
}

/// The mirror: a pool and the table it keeps aligned.
#[derive(Clone)]
pub struct Target {
    pool: Pool,
    spec: ConnectSpec,
    table: TableName,
    statement_timeout: Duration,
    /// The cancel tokens of the runs in progress, so that shutdown can cancel their queries
    /// (a backend waiting on a lock notices a closed client only when the wait ends).
    running: Arc<Mutex<Vec<(u64, CancelToken)>>>,
    /// Who this instance is, for `public.mapsync_instances`.
    identity: Arc<Identity>,
}

/// This instance and the other-instance guard's window.
struct Identity {
    instance: crate::config::Instance,
    grace: Duration,
}

/// How long a run waits for a row or table lock before it gives up (`SET LOCAL
/// lock_timeout`): a session holding a row of the mirror must not stall mirroring for the
/// whole `statement_timeout`.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// A run's registration in [`Target::running`]; unregisters on drop.
pub(crate) struct RunningGuard {
    running: Arc<Mutex<Vec<(u64, CancelToken)>>>,
    key: u64,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.running).retain(|(k, _)| *k != self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Target {
    /// Builds the pool (no connection is made yet). `None` when no target is configured.
    pub fn from_settings(settings: &TargetSettings) -> Result<Option<Target>, TargetError> {
        let Some(spec) = &settings.connect else {
            return Ok(None);
        };
        let mut spec = spec.clone();
        spec.pg.connect_timeout(settings.connect_timeout);
        spec.pg.keepalives_idle(Duration::from_secs(30));
        let manager = Manager::from_config(
            spec.pg.clone(),
            spec.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.connect_timeout + settings.statement_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| TargetError::Other {
                at: spec.display.clone(),
                reason: e.to_string(),
            })?;
        Ok(Some(Target {
            pool,
            spec,
            table: settings.table.clone(),
            statement_timeout: settings.statement_timeout,
            running: Arc::default(),
            identity: Arc::new(Identity {
                instance: settings.instance.clone(),
                grace: settings.instance_grace,
            }),
        }))
    }

    /// Registers a run's connection so that [`Target::cancel_running`] can reach it.
    pub(crate) fn register_run(&self, client: &tokio_postgres::Client) -> RunningGuard {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let key = NEXT.fetch_add(1, Ordering::Relaxed);
        lock(&self.running).push((key, client.cancel_token()));
        RunningGuard {
            running: self.running.clone(),
            key,
        }
    }

    /// Asks Postgres to cancel the query of every run in progress (shutdown): the run fails,
    /// its transaction rolls back, and its session can end. Returns how many were asked.
    pub async fn cancel_running(&self) -> usize {
        let tokens: Vec<CancelToken> = lock(&self.running).iter().map(|(_, t)| t.clone()).collect();
        for token in &tokens {
            if let Err(e) =
                // A cancel request opens a connection of its own, with the same TLS.
                token.cancel_query(self.spec.tls.clone()).await
            {
                tracing::warn!(target = %self.spec.display, error = %error_chain(&e), "cannot cancel the run's query");
            }
        }
        tokens.len()
    }

    /// Closes the pool: idle connections end now, connections in use when they come back.
    pub fn close(&self) {
        self.pool.close();
    }

    /// `user@host:port/db`, for messages and `/status`.
    pub fn display(&self) -> &str {
        &self.spec.display
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// A pooled `SELECT 1` (simple protocol: no prepared statement), within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> Result<(), TargetError> {
        let work = async {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| self.error_of(&e))?;
            Ok(())
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(TargetError::Unreachable {
                at: self.spec.display.clone(),
                reason: format!("no answer within {} ms", timeout.as_millis()),
            }),
        }
    }

    /// Server version and whether this connection is encrypted (for `mapsync check`).
    pub async fn describe_server(&self) -> Result<(String, bool), TargetError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error_of(&e))?;
        let row = tx
            .query_one(
                "SELECT current_setting('server_version'), \
                 coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                &[],
            )
            .await
            .map_err(|e| self.error_of(&e))?;
        let out = (row.get::<_, String>(0), row.get::<_, bool>(1));
        tx.commit().await.map_err(|e| self.error_of(&e))?;
        Ok(out)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, TargetError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.error_of(&e),
            PoolError::Timeout(_) => TargetError::Unreachable {
                at: self.spec.display.clone(),
                reason: "timed out (target.connect_timeout_ms)".into(),
            },
            other => TargetError::Other {
                at: self.spec.display.clone(),
                reason: other.to_string(),
            },
        })
    }

    /// Turns a tokio-postgres error into a [`TargetError`] with the right hint.
    fn error_of(&self, e: &tokio_postgres::Error) -> TargetError {
        let at = self.spec.display.clone();
        let reason = error_chain(e);
        if let Some(db) = e.as_db_error() {
            let code = db.code();
            let reason = error_chain(db);
            return if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                TargetError::Auth {
                    at,
                    user: self.spec.user().to_string(),
                }
            } else if *code == SqlState::INVALID_CATALOG_NAME {
                TargetError::NoDatabase {
                    at,
                    db: self.spec.pg.get_dbname().unwrap_or("?").to_string(),
                }
            } else if *code == SqlState::UNDEFINED_TABLE {
                TargetError::MissingTable {
                    table: self.table.to_string(),
                    at,
                }
            } else if *code == SqlState::UNDEFINED_COLUMN
                || *code == SqlState::INVALID_COLUMN_REFERENCE
                || *code == SqlState::DATATYPE_MISMATCH
            {
                TargetError::WrongColumns {
                    table: self.table.to_string(),
                    at,
                    problems: reason,
                }
            } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
                TargetError::Permission {
                    table: self.table.to_string(),
                    at,
                    user: self.spec.user().to_string(),
                    reason,
                }
            } else if *code == SqlState::LOCK_NOT_AVAILABLE {
                TargetError::Locked {
                    at,
                    table: self.table.to_string(),
                }
            } else if *code == SqlState::QUERY_CANCELED {
                TargetError::Timeout { at, reason }
            } else {
                TargetError::Other { at, reason }
            };
        }
        // tokio-postgres error kinds, by their fixed display text.
        let head = e.to_string();
        if head.starts_with("error performing TLS handshake") || head.contains("TLS") {
            let hint = if reason.contains("UnknownIssuer") {
                "set target.ssl_root_cert to the CA that signed the server's certificate (Supabase: Database settings > SSL), or use sslmode=require"
            } else if reason.contains("NotValidForName") {
                "the certificate does not name this host: connect by the name in the certificate, or use sslmode=verify-ca"
            } else if reason.contains("does not support TLS") {
                "the server does not offer TLS: use sslmode=prefer or disable"
            } else {
                "check sslmode in target.url and target.ssl_root_cert"
            };
            return TargetError::Tls { at, reason, hint };
        }
        if head.starts_with("authentication error") {
            return TargetError::Auth {
                at,
                user: self.spec.user().to_string(),
            };
        }
        if head.starts_with("error connecting to server")
            || head.starts_with("timeout waiting for server")
            || head.starts_with("connection closed")
            || head.starts_with("error communicating with the server")
            || e.is_closed()
        {
            return TargetError::Unreachable { at, reason };
        }
        TargetError::Other { at, reason }
    }
}

/// An error and its causes on one line (`a: b: c`), without repeats.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_socket_is_never_asked_for_tls() {
        for url in [
            "postgres://postgres@%2Fvar%2Frun%2Fpostgresql:5432/postgres",
            "host=/var/run/postgresql user=postgres dbname=postgres sslmode=require",
        ] {
            let spec = ConnectSpec::parse(url, None).unwrap();
            assert!(
                matches!(spec.pg.get_hosts(), [tokio_postgres::config::Host::Unix(_)]),
                "{url}: {:?}",
                spec.pg.get_hosts()
            );
            assert_eq!(spec.ssl_mode, SslMode::Disable, "{url}");
            assert_eq!(
                spec.pg.get_ssl_mode(),
                tokio_postgres::config::SslMode::Disable,
                "{url}"
            );
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let (rest, mode, ca) = split_tls_params(
            "postgres://u:p@db.example.com:6543/postgres?sslmode=verify-full&application_name=x&sslrootcert=/etc/ca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p@db.example.com:6543/postgres?application_name=x"
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(ca.as_deref(), Some("/etc/ca.pem"));

        let (rest, mode, _) = split_tls_params("host=localhost user=u sslmode=require dbname=d");
        assert_eq!(rest, "host=localhost user=u dbname=d");
        assert_eq!(mode.as_deref(), Some("require"));
    }

    #[test]
    fn display_never_holds_the_password() {
        let spec = ConnectSpec::parse(
            "postgresql://mapsync:s3cr3t-pw@pooler.supabase.com:5432/postgres?sslmode=verify-ca",
            None,
        )
        .unwrap();
        assert_eq!(spec.display, "mapsync@pooler.supabase.com:5432/postgres");
        assert_eq!(spec.ssl_mode, SslMode::VerifyCa);
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        let e = ConnectSpec::parse("postgres://u:s3cr3t@host:notaport/db", None)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = ConnectSpec::parse("postgres://u:s3cr3t@host/db?sslmode=verify", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
    }
}
