//! Typed settings: defaults < TOML file < `MAPSYNC_<SECTION>__<KEY>` environment variables.
//!
//! [`Settings::load`] is the only way in ([`Effective::load`], for `mapsync config show` and
//! `config check`, goes through the same steps). It reads the file (when there is one), applies
//! the environment, resolves the `*_file` secrets, and validates every value, so the rest of the
//! program never sees a half-valid configuration. Any problem is a [`ConfigError`]: one line
//! naming the key, which `main` turns into exit code 78 (EX_CONFIG), the code the systemd unit
//! refuses to restart on.
//!
//! Values are literal (SPEC §6): every key has one type in `SCHEMA`; a file value of another
//! TOML type is an error, and an environment value is read as that type only — a string as the
//! exact text (`000123` stays `000123`), a boolean as `true` or `false`, an integer as digits.
//! Nothing is guessed from what a value looks like. [`Settings::origins`] records, for every
//! key, whether its value came from the defaults, the file or the environment.
//!
//! Secrets (`target.url`, `http.admin_token`, the JWT secret) are kept in [`Secret`], whose
//! `Debug` prints nothing, so they cannot leak through a log line by accident.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::mapping::DEFAULT_REDACT_KEYS;
use crate::one_line;

mod show;
pub use show::{Effective, Shown};

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
    /// Where each key's value came from.
    pub origins: Origins,
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
    /// `url` (with `ssl_root_cert`) parsed, once, for the pool.
    pub connect: Option<crate::postgres::ConnectSpec>,
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
    pub reconcile: crate::schedule::Schedule,
    pub snapshot: crate::schedule::Schedule,
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
    pub jwt: JwtSettings,
    /// Origins allowed to call the port from a browser (CORS), without a trailing `/`.
    pub cors_origins: Vec<String>,
    /// `Host` values accepted besides the listen address and `localhost[:port]`, lower-cased.
    pub allowed_hosts: Vec<String>,
    pub ready_max_lag: Duration,
}

impl HttpSettings {
    /// True when some credential guards the token routes (else they are open to same-origin
    /// requests only).
    pub fn has_credential(&self) -> bool {
        self.admin_token.is_some() || self.jwt.secret.is_some() || self.jwt.jwks.is_some()
    }
}

/// How the application's login tokens are checked (SPEC §4).
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The HS256 secret (`http.jwt_secret_file`).
    pub secret: Option<Secret>,
    /// The ES256/RS256 keys of `http.jwt_jwks_file`.
    pub jwks: Option<crate::http::Jwks>,
    pub audience: String,
    pub issuer: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
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

// ---------------------------------------------------------------------------------------------
// The raw, file-shaped form. Every section denies unknown keys, and every key has a default, so
// the file only needs the keys that differ. (Serialize: `mapsync config show` reads the defaults
// from `RawSettings::default()`.)

#[derive(Debug, Deserialize, Serialize, Default)]
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

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawInstance {
    name: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
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

#[derive(Debug, Deserialize, Serialize)]
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

#[derive(Debug, Deserialize, Serialize)]
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

#[derive(Debug, Deserialize, Serialize)]
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

#[derive(Debug, Deserialize, Serialize)]
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

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    listen: String,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
    jwt_secret_file: Option<PathBuf>,
    jwt_jwks_file: Option<PathBuf>,
    jwt_audience: String,
    jwt_issuer: Option<String>,
    cors_origins: Vec<String>,
    allowed_hosts: Vec<String>,
    ready_max_lag_s: u64,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: "127.0.0.1:9187".into(),
            admin_token: None,
            admin_token_file: None,
            jwt_secret_file: None,
            jwt_jwks_file: None,
            jwt_audience: "authenticated".into(),
            jwt_issuer: None,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            ready_max_lag_s: 60,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
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

/// The type of a key's value; the only type it is read as, from the file or the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Any text, taken literally.
    Str,
    /// `true` or `false`.
    Bool,
    /// A non-negative integer (digits only in the environment).
    UInt,
    /// A number (an integer is accepted).
    Float,
    /// A list of strings; comma-separated in the environment.
    List,
    /// One of these strings.
    OneOf(&'static [&'static str]),
}

/// Every key mapsync knows, `section.key`, with its type. The raw structs below must have
/// exactly these fields (a unit test checks every key loads).
const SCHEMA: &[(&str, Kind)] = &[
    ("source.sqlite_path", Kind::Str),
    ("source.include_prompt_mappings", Kind::Bool),
    ("source.busy_timeout_ms", Kind::UInt),
    ("watch.debounce_ms", Kind::UInt),
    ("watch.max_delay_ms", Kind::UInt),
    ("target.url", Kind::Str),
    ("target.url_file", Kind::Str),
    ("target.table", Kind::Str),
    ("target.ssl_root_cert", Kind::Str),
    ("target.pool_size", Kind::UInt),
    ("target.connect_timeout_ms", Kind::UInt),
    ("target.statement_timeout_ms", Kind::UInt),
    ("target.delete_missing", Kind::Bool),
    ("target.max_delete_fraction", Kind::Float),
    ("target.max_delete_floor", Kind::UInt),
    ("target.retry_max", Kind::UInt),
    ("target.instance_grace_s", Kind::UInt),
    ("schedule.reconcile", Kind::Str),
    ("schedule.snapshot", Kind::Str),
    ("snapshot.dir", Kind::Str),
    ("snapshot.keep", Kind::UInt),
    ("snapshot.min_interval_s", Kind::UInt),
    ("snapshot.redact_keys", Kind::List),
    ("snapshot.redact", Kind::Bool),
    ("http.listen", Kind::Str),
    ("http.admin_token", Kind::Str),
    ("http.admin_token_file", Kind::Str),
    ("http.jwt_secret_file", Kind::Str),
    ("http.jwt_jwks_file", Kind::Str),
    ("http.jwt_audience", Kind::Str),
    ("http.jwt_issuer", Kind::Str),
    ("http.cors_origins", Kind::List),
    ("http.allowed_hosts", Kind::List),
    ("http.ready_max_lag_s", Kind::UInt),
    ("instance.name", Kind::Str),
    ("log.level", Kind::Str),
    ("log.format", Kind::OneOf(&["text", "json"])),
];

fn kind_of(key: &str) -> Option<Kind> {
    SCHEMA
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
}

/// Where a key's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Default,
    File,
    Environment,
}

impl Origin {
    /// `default`, `file` or `environment`, as `mapsync config show` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::File => "file",
            Origin::Environment => "environment",
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The origin of every key that was set; the others are [`Origin::Default`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(BTreeMap<&'static str, Origin>);

impl Origins {
    /// Where `key` (`section.key`) came from.
    pub fn of(&self, key: &str) -> Origin {
        self.0.get(key).copied().unwrap_or(Origin::Default)
    }

    /// Every key mapsync knows, in the order `config/mapsync.toml` documents them, with its
    /// origin.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, Origin)> + '_ {
        SCHEMA.iter().map(|(k, _)| (*k, self.of(k)))
    }

    fn set(&mut self, key: &str, origin: Origin) {
        if let Some((k, _)) = SCHEMA.iter().find(|(k, _)| *k == key) {
            self.0.insert(k, origin);
        }
    }
}

impl Settings {
    /// Loads the settings from `path` (or [`DEFAULT_CONFIG_PATH`] when `None`) and the process
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, process_env()?)
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        Layers::read(path, env)?.settings()
    }
}

/// The process environment's `MAPSYNC_` variables. No other variable is read, so one that is
/// not valid UTF-8 (which `std::env::vars` would panic on) cannot stop the daemon; one of
/// ours that is not is an error naming it.
pub(crate) fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let value = value.into_string().map_err(|_| {
            ConfigError::new(format!(
                "{name}: the value is not valid UTF-8: set it as UTF-8 text"
            ))
        })?;
        vars.push((name.to_string(), value));
    }
    Ok(vars)
}

/// The file's and the environment's values, merged in order and checked against [`SCHEMA`].
#[derive(Default)]
struct Layers {
    table: toml::Table,
    origins: Origins,
    /// The file that was read: `None` when `--config` was not given and
    /// [`DEFAULT_CONFIG_PATH`] does not exist.
    file: Option<PathBuf>,
}

impl Layers {
    /// The file at `path` (or [`DEFAULT_CONFIG_PATH`], when it exists) and the environment.
    fn read(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Layers, ConfigError> {
        let (file, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut layers = Layers::default();
        if required || file.exists() {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                ConfigError::new(format!("cannot read config file {}: {e}", file.display()))
            })?;
            layers.add_file(&file, &text)?;
            layers.file = Some(file);
        }
        layers.add_env(env)?;
        Ok(layers)
    }

    /// The validated settings these layers give.
    fn settings(&self) -> Result<Settings, ConfigError> {
        let raw: RawSettings = toml::Value::Table(self.table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::new(one_line(e.message())))?;
        raw.validate(self.origins.clone())
    }

    fn add_file(&mut self, file: &Path, text: &str) -> Result<(), ConfigError> {
        let fail = |msg: String| ConfigError::new(format!("{}: {msg}", file.display()));
        let parsed: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            fail(match line {
                Some(n) => format!("line {n}: {}", one_line(e.message())),
                None => one_line(e.message()),
            })
        })?;
        for (section, keys) in parsed {
            let toml::Value::Table(keys) = keys else {
                return Err(fail(format!(
                    "`{section}` is not a section: settings go under [source], [watch], [target], [schedule], [snapshot], [http] or [log]"
                )));
            };
            if !SCHEMA
                .iter()
                .any(|(k, _)| k.split('.').next() == Some(&section))
            {
                return Err(fail(unknown(&format!("{section}."))));
            }
            for (key, value) in keys {
                let full = format!("{section}.{key}");
                let Some(kind) = kind_of(&full) else {
                    return Err(fail(unknown(&full)));
                };
                check(kind, &value).map_err(|why| fail(format!("{full}: {why}")))?;
                self.put(&section, key, value, Origin::File);
            }
        }
        Ok(())
    }

    /// `MAPSYNC_<SECTION>__<KEY>` variables. Others that share the prefix (`MAPSYNC_CONFIG`,
    /// `MAPSYNC_TEST_DATABASE_URL`) are not configuration and are ignored.
    fn add_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let vars: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix(ENV_PREFIX)
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        for (name, text) in vars {
            let rest = &name[ENV_PREFIX.len()..];
            let (section, key) = rest.split_once("__").unwrap_or((rest, ""));
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            let full = format!("{section}.{key}");
            let Some(kind) = kind_of(&full) else {
                return Err(ConfigError::new(format!("{name}: {}", unknown(&full))));
            };
            let value = from_env(kind, &text)
                .map_err(|why| ConfigError::new(format!("{name} ({full}): {why}")))?;
            self.put(&section, key, value, Origin::Environment);
        }
        Ok(())
    }

    fn put(&mut self, section: &str, key: String, value: toml::Value, origin: Origin) {
        self.origins.set(&format!("{section}.{key}"), origin);
        let entry = self
            .table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = entry {
            t.insert(key, value);
        }
    }
}

fn unknown(key: &str) -> String {
    let section = key.split('.').next().unwrap_or(key);
    if SCHEMA
        .iter()
        .any(|(k, _)| k.split('.').next() == Some(section))
    {
        format!("unknown key {key} (config/mapsync.toml lists every key)")
    } else {
        format!(
            "unknown section [{section}] (sections: source, watch, target, schedule, snapshot, http, instance, log)"
        )
    }
}

/// A value of another type than its key's.
#[derive(Debug, thiserror::Error)]
#[error("expected {}, found {found}", expected(*.kind))]
struct Mismatch {
    kind: Kind,
    found: String,
}

/// What a key of `kind` takes, for messages.
fn expected(kind: Kind) -> String {
    match kind {
        Kind::Str => "a string".into(),
        Kind::Bool => "true or false".into(),
        Kind::UInt => "a non-negative integer (digits)".into(),
        Kind::Float => "a number".into(),
        Kind::List => "a list of strings".into(),
        Kind::OneOf(allowed) => format!("one of {}", allowed.join(", ")),
    }
}

/// Whether a value from the file has the key's type. Never echoes a string that may be a
/// secret (only the allowed words of a [`Kind::OneOf`]).
fn check(kind: Kind, value: &toml::Value) -> Result<(), Mismatch> {
    use toml::Value as V;
    match (kind, value) {
        (Kind::Str, V::String(_)) | (Kind::Bool, V::Boolean(_)) => Ok(()),
        (Kind::UInt, V::Integer(i)) if *i >= 0 => Ok(()),
        (Kind::Float, V::Float(f)) if f.is_finite() => Ok(()),
        (Kind::Float, V::Integer(_)) => Ok(()),
        (Kind::List, V::Array(items)) if items.iter().all(|i| i.is_str()) => Ok(()),
        (Kind::OneOf(allowed), V::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        (Kind::UInt, V::Integer(i)) => Err(Mismatch {
            kind,
            found: i.to_string(),
        }),
        (Kind::OneOf(_), V::String(s)) => Err(Mismatch {
            kind,
            found: format!("\"{}\"", s.escape_default()),
        }),
        _ => Err(Mismatch {
            kind,
            found: format!("a {}", value.type_str()),
        }),
    }
}

/// An environment value read as the key's type, and nothing else.
fn from_env(kind: Kind, text: &str) -> Result<toml::Value, Mismatch> {
    use toml::Value as V;
    let value = match kind {
        Kind::Str => Some(V::String(text.to_string())),
        Kind::Bool => match text {
            "true" => Some(V::Boolean(true)),
            "false" => Some(V::Boolean(false)),
            _ => None,
        },
        Kind::UInt => text
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| text.parse::<i64>().ok())
            .flatten()
            .map(V::Integer),
        Kind::Float => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(V::Float),
        Kind::List => Some(V::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| V::String(s.to_string()))
                .collect(),
        )),
        Kind::OneOf(allowed) => allowed.contains(&text).then(|| V::String(text.to_string())),
    };
    value.ok_or_else(|| {
        let cut: String = text.chars().take(40).collect();
        Mismatch {
            kind,
            found: format!("\"{}\"", cut.escape_default()),
        }
    })
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
    fn validate(self, origins: Origins) -> Result<Settings, ConfigError> {
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
        let cron = |key: &str, expr: &str| {
            crate::schedule::Schedule::parse(expr)
                .map_err(|e| ConfigError::new(format!("{key}: {e}")))
        };
        let schedule = ScheduleSettings {
            reconcile: cron("schedule.reconcile", &self.schedule.reconcile)?,
            snapshot: cron("schedule.snapshot", &self.schedule.snapshot)?,
        };

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
        let jwks = match non_empty_path(h.jwt_jwks_file) {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(format!(
                        "http.jwt_jwks_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                Some(crate::http::Jwks::parse(&text).map_err(|e| {
                    ConfigError::new(format!("http.jwt_jwks_file: {}: {e}", path.display()))
                })?)
            }
            None => None,
        };
        let jwt = JwtSettings {
            secret: match non_empty_path(h.jwt_secret_file) {
                Some(path) => read_secret_file("http.jwt_secret_file", &path)?,
                None => None,
            },
            jwks,
            audience: h.jwt_audience.trim().to_string(),
            issuer: non_empty(h.jwt_issuer).map(|i| i.trim().to_string()),
        };
        if jwt.audience.is_empty() {
            return err(
                "http.jwt_audience",
                "must not be empty (the application's login tokens say \"authenticated\")",
            );
        }
        let credential = admin_token.is_some() || jwt.secret.is_some() || jwt.jwks.is_some();
        if !listen.ip().is_loopback() && !credential {
            return err(
                "http.admin_token",
                &format!(
                    "must be set (or http.admin_token_file, http.jwt_secret_file or http.jwt_jwks_file) when http.listen ({listen}) is not a loopback address"
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
        if !credential && cors_origins.iter().any(|o| o == "*") {
            return err(
                "http.cors_origins",
                "`*` lets every web page call the sync routes: list the origins, or set http.admin_token or a JWT key",
            );
        }
        let allowed_hosts: Vec<String> = h
            .allowed_hosts
            .iter()
            .map(|a| a.trim().to_ascii_lowercase())
            .filter(|a| !a.is_empty())
            .collect();
        if let Some(bad) = allowed_hosts.iter().find(|a| {
            a.contains("://")
                || a.contains(['/', '@', '?', '#'])
                || a.chars().any(char::is_whitespace)
        }) {
            return err(
                "http.allowed_hosts",
                &format!(
                    "`{bad}` is not a Host value like app.example.com or app.example.com:8443"
                ),
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
                connect: connect_spec(url.as_ref(), ssl_root_cert.as_deref())?,
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
            schedule,
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
                jwt,
                cors_origins,
                allowed_hosts,
                ready_max_lag: Duration::from_secs(h.ready_max_lag_s),
            },
            log: LogSettings {
                level: self.log.level,
                format: self.log.format,
            },
            origins,
        })
    }
}

/// `target.url` parsed (with `target.ssl_root_cert`), once.
fn connect_spec(
    url: Option<&Secret>,
    root_cert: Option<&Path>,
) -> Result<Option<crate::postgres::ConnectSpec>, ConfigError> {
    url.map(|u| {
        crate::postgres::ConnectSpec::parse(u.expose(), root_cert).map_err(|e| {
            let key = match e {
                crate::postgres::UrlError::Tls(_) if root_cert.is_some() => "target.ssl_root_cert",
                crate::postgres::UrlError::Tls(_) => "target.url (its sslrootcert)",
                _ => "target.url",
            };
            ConfigError::new(format!("{key}: {e}"))
        })
    })
    .transpose()
}

impl TargetSettings {
    /// Points the target at `url` (`None`: snapshots only), parsed like the configured one.
    pub fn set_url(&mut self, url: Option<Secret>) -> Result<(), ConfigError> {
        self.connect = connect_spec(url.as_ref(), self.ssl_root_cert.as_deref())?;
        self.url = url;
        Ok(())
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
            .validate(Origins::default())
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
        assert!(
            shipped.origins.iter().any(|(_, o)| o == Origin::File),
            "{:?}",
            shipped.origins
        );
        let shipped = Settings {
            origins: Origins::default(),
            ..shipped
        };
        assert_eq!(format!("{shipped:?}"), format!("{:?}", Settings::default()));
    }

    #[test]
    fn the_schema_lists_the_keys_in_the_order_the_shipped_file_documents_them() {
        // `mapsync config show` prints them in this order.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let text = std::fs::read_to_string(path).unwrap();
        let mut section = "";
        let mut documented = Vec::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
                continue;
            }
            // A key, or a key that is unset by default (`# url = ""`).
            let line = line.strip_prefix("# ").unwrap_or(line);
            if let Some((key, _)) = line.split_once(" = ") {
                if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    documented.push(format!("{section}.{key}"));
                }
            }
        }
        let schema: Vec<&str> = SCHEMA.iter().map(|(k, _)| *k).collect();
        assert_eq!(documented, schema);
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
        let dir = tempfile::tempdir().unwrap();
        let jwt = dir.path().join("jwt-secret");
        std::fs::write(&jwt, "jwt-secret-value\n").unwrap();
        let s = load(
            &format!(
                "[target]\nurl = \"postgres://u:hunter2@h/db\"\n[http]\nadmin_token = \"tok-secret\"\njwt_secret_file = \"{}\"\n",
                jwt.display()
            ),
            &[],
        )
        .unwrap();
        assert!(s.http.jwt.secret.is_some());
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("hunter2")
                && !debug.contains("tok-secret")
                && !debug.contains("jwt-secret-value"),
            "{debug}"
        );
    }

    /// The environment variable that sets `key`.
    fn env_name(key: &str) -> String {
        let (section, name) = key.split_once('.').unwrap();
        format!(
            "MAPSYNC_{}__{}",
            section.to_uppercase(),
            name.to_uppercase()
        )
    }

    const TRICKY: [&str; 7] = [
        "000123",
        "1e3",
        "TRUE",
        "false",
        "12345678901234567890123",
        "0x1F",
        "null",
    ];

    #[test]
    fn every_string_key_is_taken_literally_from_the_environment() {
        let strings: Vec<&str> = SCHEMA
            .iter()
            .filter(|(_, kind)| *kind == Kind::Str)
            .map(|(k, _)| *k)
            .collect();
        assert!(strings.len() >= 16, "{strings:?}");
        for key in &strings {
            for value in TRICKY {
                let mut layers = Layers::default();
                layers
                    .add_env([(env_name(key), value.to_string())])
                    .unwrap_or_else(|e| panic!("{key}={value}: {e}"));
                let (section, name) = key.split_once('.').unwrap();
                assert_eq!(
                    layers.table[section][name],
                    toml::Value::String(value.into()),
                    "{key}={value}"
                );
                assert_eq!(layers.origins.of(key), Origin::Environment);
            }
        }
        // And through to the settings, for the strings that reach them as they are.
        for value in TRICKY {
            let s = load(
                "",
                &[
                    ("MAPSYNC_HTTP__ADMIN_TOKEN", value),
                    ("MAPSYNC_HTTP__JWT_AUDIENCE", value),
                    ("MAPSYNC_HTTP__JWT_ISSUER", value),
                    ("MAPSYNC_SOURCE__SQLITE_PATH", value),
                    ("MAPSYNC_SNAPSHOT__DIR", value),
                    ("MAPSYNC_TARGET__TABLE", &format!("t{value}")),
                ],
            )
            .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(s.http.admin_token.unwrap().expose(), value);
            assert_eq!(s.http.jwt.audience, value);
            assert_eq!(s.http.jwt.issuer.as_deref(), Some(value));
            assert_eq!(s.source.sqlite_path, PathBuf::from(value));
            assert_eq!(s.snapshot.dir, PathBuf::from(value));
            assert_eq!(s.target.table.table, format!("t{value}"));
            assert_eq!(s.origins.of("http.admin_token"), Origin::Environment);
        }
        let s = load(
            "",
            &[
                ("MAPSYNC_HTTP__CORS_ORIGINS", "https://000123.example"),
                ("MAPSYNC_SNAPSHOT__REDACT_KEYS", "000123, 1e3,TRUE"),
                ("MAPSYNC_HTTP__ALLOWED_HOSTS", "1e3,000123:8080"),
            ],
        )
        .unwrap();
        assert_eq!(s.snapshot.redact_keys, ["000123", "1e3", "TRUE"]);
        assert_eq!(s.http.allowed_hosts, ["1e3", "000123:8080"]);
        assert_eq!(s.http.cors_origins, ["https://000123.example"]);
    }

    #[test]
    fn booleans_and_numbers_are_never_guessed() {
        for (var, value) in [
            ("MAPSYNC_TARGET__DELETE_MISSING", "1"),
            ("MAPSYNC_TARGET__DELETE_MISSING", "TRUE"),
            ("MAPSYNC_TARGET__DELETE_MISSING", "yes"),
            ("MAPSYNC_SOURCE__INCLUDE_PROMPT_MAPPINGS", ""),
            ("MAPSYNC_WATCH__DEBOUNCE_MS", "1e3"),
            ("MAPSYNC_WATCH__DEBOUNCE_MS", "-1"),
            ("MAPSYNC_WATCH__DEBOUNCE_MS", "12345678901234567890123"),
            ("MAPSYNC_WATCH__DEBOUNCE_MS", " 50"),
            ("MAPSYNC_TARGET__MAX_DELETE_FRACTION", "half"),
            ("MAPSYNC_LOG__FORMAT", "JSON"),
        ] {
            let e = load("", &[(var, value)]).unwrap_err().to_string();
            assert!(e.contains(var), "{var}={value}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        for (toml, key) in [
            ("[target]\ndelete_missing = 3\n", "target.delete_missing"),
            (
                "[target]\ndelete_missing = \"true\"\n",
                "target.delete_missing",
            ),
            ("[watch]\ndebounce_ms = 1.5\n", "watch.debounce_ms"),
            ("[watch]\ndebounce_ms = -5\n", "watch.debounce_ms"),
            ("[http]\nadmin_token = 123\n", "http.admin_token"),
            (
                "[http]\ncors_origins = \"https://a\"\n",
                "http.cors_origins",
            ),
            ("source = 1\n", "source"),
        ] {
            let e = load(toml, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let s = load(
            "[target]\nmax_delete_fraction = 1\n",
            &[
                ("MAPSYNC_WATCH__DEBOUNCE_MS", "050"),
                ("MAPSYNC_TARGET__DELETE_MISSING", "true"),
            ],
        )
        .unwrap();
        assert_eq!(s.watch.debounce, Duration::from_millis(50));
        assert!(s.target.delete_missing);
        assert_eq!(s.target.max_delete_fraction, 1.0);
    }

    #[test]
    fn each_key_says_where_its_value_came_from() {
        let s = load(
            "[watch]\ndebounce_ms = 300\n[http]\nadmin_token = \"from-file\"\n",
            &[("MAPSYNC_HTTP__ADMIN_TOKEN", "from-env")],
        )
        .unwrap();
        assert_eq!(s.origins.of("watch.debounce_ms"), Origin::File);
        assert_eq!(s.origins.of("http.admin_token"), Origin::Environment);
        assert_eq!(s.origins.of("watch.max_delay_ms"), Origin::Default);
        assert_eq!(s.origins.iter().count(), SCHEMA.len());
        assert_eq!(s.http.admin_token.unwrap().expose(), "from-env");
    }

    #[test]
    fn every_key_of_the_schema_loads() {
        // Catches a key in SCHEMA that the raw structs lack (serde would call it unknown).
        for (key, kind) in SCHEMA {
            let value = match kind {
                Kind::Str => "",
                Kind::Bool => "false",
                Kind::UInt => "7",
                Kind::Float => "0.5",
                Kind::List => "",
                Kind::OneOf(v) => v[0],
            };
            let r = load("", &[(&env_name(key), value)]);
            if let Err(e) = r {
                assert!(!e.to_string().contains("unknown"), "{key}: {e}");
            }
        }
    }

    #[test]
    fn a_public_address_needs_a_credential_and_star_needs_one_too() {
        let e = load("[http]\nlisten = \"0.0.0.0:9187\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.admin_token") && e.contains("jwt"), "{e}");
        let e = load("[http]\ncors_origins = [\"*\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.cors_origins"), "{e}");
        let e = load("[http]\nallowed_hosts = [\"https://a.example\"]\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.allowed_hosts"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("jwt-secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let s = load(
            &format!(
                "[http]\nlisten = \"0.0.0.0:9187\"\njwt_secret_file = \"{}\"\n",
                secret.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(s.http.jwt.secret.unwrap().expose(), "s3cret");
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
        let e = load(
            &format!("[http]\njwt_jwks_file = \"{}\"\n", jwks.display()),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("http.jwt_jwks_file"), "{e}");
    }
}
