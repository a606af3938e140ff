//! Typed settings: defaults < TOML file < `MAPSYNC_<SECTION>__<KEY>` environment variables.
//!
//! [`Settings::load`] is the only way in. It reads the file (when there is one), applies the
//! environment, resolves the `*_file` secrets, and validates every value, so the rest of the
//! program never sees a half-valid configuration. Any problem is a [`ConfigError`]: one line
//! naming the key, which `main` turns into exit code 78 (EX_CONFIG), the code the systemd unit
//! refuses to restart on.
//!
//! Secrets (`target.url`, `http.admin_token`) are kept in [`Secret`], whose `Debug` prints
//! nothing, so they cannot leak through a log line by accident.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where `--config` points when it is not given. A missing file at this default path is not an
/// error (the defaults and the environment apply); a missing file that was asked for is.
pub const DEFAULT_CONFIG_PATH: &str = "config/mapsync.toml";

/// The environment prefix: `MAPSYNC_TARGET__URL` sets `target.url`.
const ENV_PREFIX: &str = "MAPSYNC_";

/// A configuration problem, already phrased as one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("bad configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

/// A value that must never be printed: `Debug` shows `"***"`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Everything mapsync can be told, section by section (SPEC §6).
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: SourceSettings,
    pub watch: WatchSettings,
    pub target: TargetSettings,
    pub schedule: ScheduleSettings,
    pub snapshot: SnapshotSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub sqlite_path: PathBuf,
    pub include_prompt_mappings: bool,
    pub busy_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct WatchSettings {
    pub debounce: Duration,
    pub max_delay: Duration,
}

#[derive(Debug, Clone)]
pub struct TargetSettings {
    /// `None`: no target, snapshots-only mode.
    pub url: Option<Secret>,
    /// `schema.table`, already validated as two plain identifiers.
    pub table: TableName,
    pub ssl_root_cert: Option<PathBuf>,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub delete_missing: bool,
    pub max_delete_fraction: f64,
    pub max_delete_floor: u64,
    pub retry_max: Duration,
    /// Who this instance is, as recorded in `public.mapsync_instances`.
    pub instance: Instance,
    /// How recently another instance must have written the table for a deleting run to
    /// refuse (`refused:other_instance`).
    pub instance_grace: Duration,
}

/// This mapsync instance, as other instances see it in `public.mapsync_instances`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// `instance.name`; default `<host name>:<sqlite_path>`.
    pub name: String,
    pub host: String,
    pub sqlite_path: String,
}

#[derive(Debug, Clone)]
pub struct ScheduleSettings {
    pub reconcile: String,
    pub snapshot: String,
}

#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    pub dir: PathBuf,
    pub keep: usize,
    pub redact_keys: Vec<String>,
    /// The least time between two snapshot writes after sync runs (later changes wait for
    /// it and are written together).
    pub min_interval: Duration,
    /// Write the mirror's (redacted) metadata into snapshots and exports too.
    pub redact: bool,
}

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub admin_token: Option<Secret>,
    pub cors_origins: Vec<String>,
    pub ready_max_lag: Duration,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A validated `schema.table` name, kept as its two parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    /// Parses `table` or `schema.table`; each part must be a plain SQL identifier
    /// (letters, digits, `_`, not starting with a digit), so it can be quoted safely.
    pub fn parse(s: &str) -> Option<TableName> {
        let (schema, table) = match s.split_once('.') {
            Some((schema, table)) => (schema, table),
            None => ("public", s),
        };
        let plain = |p: &str| {
            !p.is_empty()
                && p.len() <= 63
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        };
        (plain(schema) && plain(table)).then(|| TableName {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    /// The name quoted for SQL: `"public"."model_mappings"`.
    pub fn quoted(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.table)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

pub const DEFAULT_REDACT_KEYS: &[&str] = &[
    "api_key",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "password",
    "authorization",
    "private_key",
    "access_key",
];

// ---------------------------------------------------------------------------------------------
// The raw, file-shaped form. Every section denies unknown keys, and every key has a default, so
// the file only needs the keys that differ.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSettings {
    source: RawSource,
    watch: RawWatch,
    target: RawTarget,
    schedule: RawSchedule,
    snapshot: RawSnapshot,
    http: RawHttp,
    instance: RawInstance,
    log: RawLog,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawInstance {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSource {
    sqlite_path: PathBuf,
    include_prompt_mappings: bool,
    busy_timeout_ms: u64,
}

impl Default for RawSource {
    fn default() -> Self {
        RawSource {
            sqlite_path: PathBuf::from("data/db.sqlite3"),
            include_prompt_mappings: true,
            busy_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWatch {
    debounce_ms: u64,
    max_delay_ms: u64,
}

impl Default for RawWatch {
    fn default() -> Self {
        RawWatch {
            debounce_ms: 200,
            max_delay_ms: 2_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTarget {
    url: Option<String>,
    url_file: Option<PathBuf>,
    table: String,
    ssl_root_cert: Option<PathBuf>,
    pool_size: usize,
    connect_timeout_ms: u64,
    statement_timeout_ms: u64,
    delete_missing: bool,
    max_delete_fraction: f64,
    max_delete_floor: u64,
    retry_max: u64,
    instance_grace_s: u64,
}

impl Default for RawTarget {
    fn default() -> Self {
        RawTarget {
            url: None,
            url_file: None,
            table: "public.model_mappings".into(),
            ssl_root_cert: None,
            pool_size: 4,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 60_000,
            delete_missing: false,
            max_delete_fraction: 0.5,
            max_delete_floor: 10,
            retry_max: 60,
            instance_grace_s: 3_600,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSchedule {
    reconcile: String,
    snapshot: String,
}

impl Default for RawSchedule {
    fn default() -> Self {
        RawSchedule {
            reconcile: "0 */5 * * * *".into(),
            snapshot: "0 0 * * * *".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSnapshot {
    dir: PathBuf,
    keep: usize,
    redact_keys: Vec<String>,
    min_interval_s: u64,
    redact: bool,
}

impl Default for RawSnapshot {
    fn default() -> Self {
        RawSnapshot {
            dir: PathBuf::from("data/ai_runtime/mapping_snapshots"),
            keep: 48,
            redact_keys: DEFAULT_REDACT_KEYS.iter().map(|k| k.to_string()).collect(),
            min_interval_s: 10,
            redact: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    listen: String,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
    cors_origins: Vec<String>,
    ready_max_lag_s: u64,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: "127.0.0.1:9187".into(),
            admin_token: None,
            admin_token_file: None,
            cors_origins: Vec::new(),
            ready_max_lag_s: 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: LogFormat,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &["http.cors_origins", "snapshot.redact_keys"];

impl Settings {
    /// Loads the settings from `path` (or [`DEFAULT_CONFIG_PATH`] when `None`) and the process
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        let (file, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        if required || file.exists() {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                ConfigError::new(format!("cannot read config file {}: {e}", file.display()))
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let mut environment = config::Environment::with_prefix("MAPSYNC")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(section_vars(env)));
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        let raw: RawSettings = builder
            .add_source(environment)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::new(describe(&e, &file)))?;
        raw.validate()
    }
}

/// Only `MAPSYNC_<SECTION>__<KEY>` variables are configuration; others that share the prefix
/// (`MAPSYNC_CONFIG`, `MAPSYNC_TEST_DATABASE_URL`) are not and must not trip the unknown-key
/// check.
fn section_vars(env: impl IntoIterator<Item = (String, String)>) -> config::Map<String, String> {
    env.into_iter()
        .filter(|(k, _)| {
            k.strip_prefix(ENV_PREFIX)
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect::<HashMap<_, _>>()
        .into_iter()
        .collect()
}

/// One line from the config crate's error, naming the file when the problem is in it.
fn describe(e: &config::ConfigError, file: &Path) -> String {
    let msg = e.to_string().replace('\n', " ");
    match e {
        config::ConfigError::FileParse { .. } | config::ConfigError::Foreign(_) => {
            format!("{}: {msg}", file.display())
        }
        _ => msg,
    }
}

/// A secret from a file, trimmed. An empty (or whitespace-only) file means "not set": systemd
/// gives a missing credential as an empty one (`SetCredential=` fallback in the unit).
fn read_secret_file(key: &str, path: &Path) -> Result<Option<Secret>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(format!("{key}: cannot read {}: {e}", path.display())))?;
    let value = text.trim();
    Ok((!value.is_empty()).then(|| Secret::new(value)))
}

/// A secret given inline or through a file; both set (and non-empty) is ambiguous.
fn secret(
    key: &str,
    inline: Option<String>,
    file_key: &str,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    let from_file = match non_empty_path(file) {
        Some(path) => read_secret_file(file_key, &path)?,
        None => None,
    };
    match (non_empty(inline), from_file) {
        (Some(_), Some(_)) => Err(ConfigError::new(format!(
            "{file_key}: set either {key} or {file_key}, not both"
        ))),
        (Some(v), None) => Ok(Some(Secret::new(v.trim()))),
        (None, from_file) => Ok(from_file),
    }
}

/// An empty string in the file or the environment means "not set".
fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

fn non_empty_path(p: Option<PathBuf>) -> Option<PathBuf> {
    p.filter(|p| !p.as_os_str().is_empty())
}

impl RawSettings {
    fn validate(self) -> Result<Settings, ConfigError> {
        let err = |key: &str, msg: &str| Err(ConfigError::new(format!("{key}: {msg}")));

        // source
        if self.source.sqlite_path.as_os_str().is_empty() {
            return err("source.sqlite_path", "must not be empty");
        }

        // watch
        if self.watch.debounce_ms == 0 {
            return err("watch.debounce_ms", "must be at least 1");
        }
        if self.watch.max_delay_ms < self.watch.debounce_ms {
            return err(
                "watch.max_delay_ms",
                &format!(
                    "must be at least watch.debounce_ms ({})",
                    self.watch.debounce_ms
                ),
            );
        }

        // target
        let t = self.target;
        let url = secret("target.url", t.url, "target.url_file", t.url_file)?;
        if let Some(url) = &url {
            crate::target::ConnectSpec::parse(url.expose(), None)
                .map_err(|e| ConfigError::new(format!("target.url: {e}")))?;
        }
        let Some(table) = TableName::parse(t.table.trim()) else {
            return err(
                "target.table",
                "must be `schema.table` made of letters, digits and `_`",
            );
        };
        let ssl_root_cert = non_empty_path(t.ssl_root_cert);
        if let Some(ca) = &ssl_root_cert {
            if let Err(e) = std::fs::metadata(ca) {
                return err("target.ssl_root_cert", &format!("{}: {e}", ca.display()));
            }
        }
        if t.pool_size == 0 || t.pool_size > 64 {
            return err("target.pool_size", "must be between 1 and 64");
        }
        if t.connect_timeout_ms == 0 {
            return err("target.connect_timeout_ms", "must be at least 1");
        }
        if t.statement_timeout_ms == 0 {
            return err("target.statement_timeout_ms", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&t.max_delete_fraction) {
            return err("target.max_delete_fraction", "must be between 0 and 1");
        }
        if t.retry_max == 0 {
            return err("target.retry_max", "must be at least 1 (seconds)");
        }

        // schedule
        for (key, expr) in [
            ("schedule.reconcile", &self.schedule.reconcile),
            ("schedule.snapshot", &self.schedule.snapshot),
        ] {
            if let Err(e) = crate::schedule::validate(expr) {
                return err(key, &e);
            }
        }

        // snapshot
        if self.snapshot.dir.as_os_str().is_empty() {
            return err("snapshot.dir", "must not be empty");
        }
        if self.snapshot.keep == 0 {
            return err("snapshot.keep", "must be at least 1");
        }

        // http
        let h = self.http;
        let listen: SocketAddr = h.listen.trim().parse().map_err(|_| {
            ConfigError::new(format!(
                "http.listen: `{}` is not an address like 127.0.0.1:9187",
                h.listen
            ))
        })?;
        let admin_token = secret(
            "http.admin_token",
            h.admin_token,
            "http.admin_token_file",
            h.admin_token_file,
        )?;
        if !listen.ip().is_loopback() && admin_token.is_none() {
            return err(
                "http.admin_token",
                &format!(
                    "must be set (or http.admin_token_file) when http.listen ({listen}) is not a loopback address"
                ),
            );
        }
        let cors_origins: Vec<String> = h
            .cors_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        if let Some(bad) = cors_origins
            .iter()
            .find(|o| !(o.starts_with("http://") || o.starts_with("https://")) && *o != "*")
        {
            return err(
                "http.cors_origins",
                &format!("`{bad}` is not an origin like https://admin.example.com"),
            );
        }

        // log
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return err(
                "log.level",
                &format!(
                    "`{}` is not a level (error, warn, info, debug, trace) or filter",
                    self.log.level
                ),
            );
        }

        let instance = instance(self.instance.name, &self.source.sqlite_path);
        Ok(Settings {
            source: SourceSettings {
                sqlite_path: self.source.sqlite_path,
                include_prompt_mappings: self.source.include_prompt_mappings,
                busy_timeout: Duration::from_millis(self.source.busy_timeout_ms),
            },
            watch: WatchSettings {
                debounce: Duration::from_millis(self.watch.debounce_ms),
                max_delay: Duration::from_millis(self.watch.max_delay_ms),
            },
            target: TargetSettings {
                url,
                table,
                ssl_root_cert,
                pool_size: t.pool_size,
                connect_timeout: Duration::from_millis(t.connect_timeout_ms),
                statement_timeout: Duration::from_millis(t.statement_timeout_ms),
                delete_missing: t.delete_missing,
                max_delete_fraction: t.max_delete_fraction,
                max_delete_floor: t.max_delete_floor,
                retry_max: Duration::from_secs(t.retry_max),
                instance,
                instance_grace: Duration::from_secs(t.instance_grace_s),
            },
            schedule: ScheduleSettings {
                reconcile: self.schedule.reconcile,
                snapshot: self.schedule.snapshot,
            },
            snapshot: SnapshotSettings {
                dir: self.snapshot.dir,
                keep: self.snapshot.keep,
                redact_keys: self.snapshot.redact_keys,
                min_interval: Duration::from_secs(self.snapshot.min_interval_s),
                redact: self.snapshot.redact,
            },
            http: HttpSettings {
                listen,
                admin_token,
                cors_origins,
                ready_max_lag: Duration::from_secs(h.ready_max_lag_s),
            },
            log: LogSettings {
                level: self.log.level,
                format: self.log.format,
            },
        })
    }
}

/// This instance's identity: `instance.name`, or `<host>:<sqlite path>` when unset.
fn instance(name: Option<String>, sqlite_path: &Path) -> Instance {
    let host = host_name();
    let sqlite_path = std::path::absolute(sqlite_path)
        .unwrap_or_else(|_| sqlite_path.to_path_buf())
        .display()
        .to_string();
    Instance {
        name: non_empty(name).unwrap_or_else(|| format!("{host}:{sqlite_path}")),
        host,
        sqlite_path,
    }
}

/// The kernel's host name (`localhost` when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Default for Settings {
    /// The built-in defaults, as documented in `config/mapsync.toml`.
    fn default() -> Self {
        RawSettings::default()
            .validate()
            .expect("the built-in defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        Settings::load_with_env(
            Some(file.path()),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn the_shipped_config_file_documents_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let shipped = Settings::load_with_env(Some(&path), []).unwrap();
        assert_eq!(format!("{shipped:?}"), format!("{:?}", Settings::default()));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load("[watch]\ndebounce = 5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("debounce"), "{e}");
        let e = load("[sourc]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("sourc"), "{e}");
        let e = load("", &[("MAPSYNC_TARGET__URLL", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("urll"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = load("[watch]\ndebounce_ms = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("debounce_ms"), "{e}");
        let e = load("[target]\ndelete_missing = \"maybe\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("delete_missing"), "{e}");
    }

    #[test]
    fn invalid_values_are_named() {
        for (toml, key) in [
            (
                "[schedule]\nreconcile = \"*/5 * * * *\"\n",
                "schedule.reconcile",
            ),
            ("[http]\nlisten = \"localhost\"\n", "http.listen"),
            (
                "[target]\nmax_delete_fraction = 1.5\n",
                "target.max_delete_fraction",
            ),
            ("[target]\ntable = \"public.bad-name\"\n", "target.table"),
            (
                "[target]\nurl = \"postgres://u:pw@h/db?sslmode=nope\"\n",
                "target.url",
            ),
            (
                "[watch]\ndebounce_ms = 500\nmax_delay_ms = 100\n",
                "watch.max_delay_ms",
            ),
            ("[log]\nformat = \"xml\"\n", "format"),
        ] {
            let e = load(toml, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn a_missing_requested_file_is_an_error() {
        let e = Settings::load_with_env(Some(Path::new("/nonexistent/mapsync.toml")), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/mapsync.toml"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load(
            "[watch]\ndebounce_ms = 300\n[target]\nurl = \"postgres://u:pw@file-host/db\"\n",
            &[
                ("MAPSYNC_WATCH__DEBOUNCE_MS", "50"),
                ("MAPSYNC_TARGET__URL", "postgres://u:pw@env-host/db"),
                (
                    "MAPSYNC_HTTP__CORS_ORIGINS",
                    "https://a.example, https://b.example/",
                ),
                ("MAPSYNC_HTTP__ADMIN_TOKEN", "12345"),
                ("MAPSYNC_TEST_DATABASE_URL", "postgres://ignored"),
                ("MAPSYNC_CONFIG", "ignored.toml"),
            ],
        )
        .unwrap();
        assert_eq!(s.watch.debounce, Duration::from_millis(50));
        assert_eq!(
            s.target.url.unwrap().expose(),
            "postgres://u:pw@env-host/db"
        );
        assert_eq!(
            s.http.cors_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(s.http.admin_token.unwrap().expose(), "12345");
    }

    #[test]
    fn secrets_come_from_files_and_an_empty_file_means_unset() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("target-url");
        std::fs::write(&url, "postgres://u:pw@h/db\n").unwrap();
        let empty = dir.path().join("admin-token");
        std::fs::write(&empty, "\n").unwrap();
        let s = load(
            &format!(
                "[target]\nurl_file = \"{}\"\n[http]\nadmin_token_file = \"{}\"\n",
                url.display(),
                empty.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(s.target.url.unwrap().expose(), "postgres://u:pw@h/db");
        assert!(s.http.admin_token.is_none());

        // An empty credential does not hide a URL given in the file.
        let s = load(
            "[target]\nurl = \"postgres://u:pw@h/db\"\n",
            &[("MAPSYNC_TARGET__URL_FILE", empty.to_str().unwrap())],
        )
        .unwrap();
        assert!(s.target.url.is_some());

        let e = load("[target]\nurl_file = \"/nonexistent/url\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("target.url_file"), "{e}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let s = load(
            "[target]\nurl = \"postgres://u:hunter2@h/db\"\n[http]\nadmin_token = \"tok-secret\"\n",
            &[],
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("tok-secret"),
            "{debug}"
        );
    }
}
