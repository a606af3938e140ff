//! The effective settings, key by key, as `mapsync config show` prints them: every key of
//! [`SCHEMA`] in the order `config/mapsync.toml` documents them, its value, and where the value
//! came from.
//!
//! Secrets are masked here, while the layers are read, so no caller ever holds them in a
//! printable form: `target.url` becomes `postgres://user:***@host:5432/db?sslmode=…` and
//! `http.admin_token` becomes `***`. The `*_file` keys are paths and are shown as they are; what
//! those files hold never is.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{ConfigError, Layers, Origin, RawSettings, SCHEMA, Secret, Settings};
use crate::postgres::ConnectSpec;

/// The settings, with every key's effective value (secrets masked) and origin.
#[derive(Debug)]
pub struct Effective {
    pub settings: Settings,
    /// The file the settings were read from; `None` when `--config` was not given and
    /// `config/mapsync.toml` does not exist.
    pub file: Option<PathBuf>,
    /// Every key of the schema, in the order `config/mapsync.toml` documents them.
    pub keys: Vec<Shown>,
}

/// One key as `mapsync config show` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shown {
    #[serde(skip)]
    pub key: &'static str,
    /// The effective value; `None` when the key is not set (or set to an empty string, which
    /// means the same). A masked secret is a string that stands for it, never the secret.
    pub value: Option<toml::Value>,
    pub origin: Origin,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub masked: bool,
    /// The `*_file` key whose file the value was read from (`target.url_file` for
    /// `target.url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_from: Option<&'static str>,
}

impl Effective {
    /// As [`Settings::load`], with every key's value and origin.
    pub fn load(path: Option<&Path>) -> Result<Effective, ConfigError> {
        Self::load_with_env(path, super::process_env()?)
    }

    /// As [`Effective::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Effective, ConfigError> {
        let layers = Layers::read(path, env)?;
        let settings = layers.settings()?;
        let keys = shown(&layers, &settings);
        Ok(Effective {
            settings,
            file: layers.file,
            keys,
        })
    }
}

/// Every key of [`SCHEMA`], its value from the layers (else the default) and its origin; the
/// secrets and the values that validation completes (the table's schema, the instance's
/// default name, the normalised lists) from `settings`.
fn shown(layers: &Layers, settings: &Settings) -> Vec<Shown> {
    // Only `None` fields are left out (they are unset by default); the rest cannot fail.
    let defaults = toml::Table::try_from(RawSettings::default()).unwrap_or_default();
    let plain = |key: &'static str, value: Option<toml::Value>| Shown {
        key,
        value,
        origin: layers.origins.of(key),
        masked: false,
        read_from: None,
    };
    let strings = |items: &[String]| {
        Some(toml::Value::Array(
            items
                .iter()
                .map(|s| toml::Value::from(s.as_str()))
                .collect(),
        ))
    };
    SCHEMA
        .iter()
        .map(|&(key, _)| match key {
            "target.url" => secret(
                layers,
                key,
                "target.url_file",
                settings.target.url.as_ref(),
                masked_url,
            ),
            "http.admin_token" => secret(
                layers,
                key,
                "http.admin_token_file",
                settings.http.admin_token.as_ref(),
                |_| "***".into(),
            ),
            "target.table" => plain(key, Some(settings.target.table.to_string().into())),
            "instance.name" => plain(key, Some(settings.target.instance.name.as_str().into())),
            "http.listen" => plain(key, Some(settings.http.listen.to_string().into())),
            "http.cors_origins" => plain(key, strings(&settings.http.cors_origins)),
            "http.allowed_hosts" => plain(key, strings(&settings.http.allowed_hosts)),
            _ => plain(
                key,
                lookup(&layers.table, key)
                    .or_else(|| lookup(&defaults, key))
                    .filter(|v| v.as_str().is_none_or(|s| !s.trim().is_empty()))
                    .cloned(),
            ),
        })
        .collect()
}

/// `section.key` in a table of sections.
fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (section, name) = key.split_once('.')?;
    table.get(section)?.get(name)
}

/// A secret given inline (`key`) or through a file (`file_key`): its mask, and the origin of
/// the key it came from.
fn secret(
    layers: &Layers,
    key: &'static str,
    file_key: &'static str,
    value: Option<&Secret>,
    mask: impl Fn(&Secret) -> String,
) -> Shown {
    let inline = lookup(&layers.table, key)
        .and_then(toml::Value::as_str)
        .is_some_and(|s| !s.trim().is_empty());
    let read_from = (value.is_some() && !inline).then_some(file_key);
    Shown {
        key,
        value: value.map(|v| mask(v).into()),
        origin: layers.origins.of(read_from.unwrap_or(key)),
        masked: value.is_some(),
        read_from,
    }
}

/// `postgres://user:***@host:port/db?sslmode=…`: who, where and how, never the password
/// (nor any other parameter of the URL, which may carry one).
fn masked_url(url: &Secret) -> String {
    let Ok(spec) = ConnectSpec::parse(url.expose(), None) else {
        return "***".into();
    };
    let pg = &spec.pg;
    let user = match (pg.get_user(), pg.get_password()) {
        (Some(user), Some(_)) => format!("{user}:***@"),
        (Some(user), None) => format!("{user}@"),
        (None, Some(_)) => ":***@".into(),
        (None, None) => String::new(),
    };
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(dir) => {
                    dir.display().to_string().replace('/', "%2F")
                }
            };
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let db = pg.get_dbname().unwrap_or_default();
    let mode = spec.ssl_mode.as_str();
    let root = spec
        .ssl_root_cert
        .map(|p| format!("&sslrootcert={}", p.display()))
        .unwrap_or_default();
    format!(
        "postgres://{user}{}/{db}?sslmode={mode}{root}",
        hosts.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn effective(toml: &str, env: &[(&str, &str)]) -> Effective {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        Effective::load_with_env(
            Some(file.path()),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    }

    fn get<'a>(e: &'a Effective, key: &str) -> &'a Shown {
        e.keys.iter().find(|s| s.key == key).unwrap()
    }

    #[test]
    fn every_key_has_its_default_when_nothing_is_set() {
        let e = effective("", &[]);
        assert_eq!(e.keys.len(), SCHEMA.len());
        for s in &e.keys {
            assert_eq!(s.origin, Origin::Default, "{s:?}");
        }
        let value = |key| get(&e, key).value.clone();
        assert_eq!(value("watch.debounce_ms"), Some(200.into()));
        assert_eq!(value("target.max_delete_fraction"), Some(0.5.into()));
        assert_eq!(value("log.format"), Some("text".into()));
        assert_eq!(value("target.table"), Some("public.model_mappings".into()));
        assert_eq!(value("target.url"), None);
        assert_eq!(value("http.jwt_issuer"), None);
        let name = value("instance.name").unwrap();
        assert!(
            name.as_str().unwrap().ends_with("data/db.sqlite3"),
            "{name:?}"
        );
        let keys = value("snapshot.redact_keys").unwrap();
        assert_eq!(keys.as_array().unwrap().len(), 10);
    }

    #[test]
    fn secrets_are_masked_and_say_which_file_they_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("url");
        std::fs::write(
            &url,
            "postgres://app:pw-7e1f@db.example.com:6543/postgres\n",
        )
        .unwrap();
        let e = effective(
            &format!(
                "[target]\nurl_file = {:?}\n[http]\nadmin_token = \"tok-9c2d\"\n",
                url.display()
            ),
            &[],
        );
        let u = get(&e, "target.url");
        assert_eq!(
            u.value,
            Some("postgres://app:***@db.example.com:6543/postgres?sslmode=prefer".into())
        );
        assert_eq!((u.origin, u.masked), (Origin::File, true));
        assert_eq!(u.read_from, Some("target.url_file"));
        let t = get(&e, "http.admin_token");
        assert_eq!(t.value, Some("***".into()));
        assert_eq!((t.origin, t.read_from), (Origin::File, None));
        let debug = format!("{e:?}");
        assert!(
            !debug.contains("pw-7e1f") && !debug.contains("tok-9c2d"),
            "{debug}"
        );

        let ca = crate::postgres::tls::test_ca_file(dir.path());
        let e = effective(
            "[target]\nurl = \"postgres://app:pw@h/db\"\n",
            &[
                (
                    "MAPSYNC_TARGET__URL",
                    &format!(
                        "host=/run/postgresql,db2 port=5432,5433 user=u password=pw dbname=d sslmode=verify-full sslrootcert={}",
                        ca.display()
                    ),
                ),
                ("MAPSYNC_HTTP__ADMIN_TOKEN", " "),
            ],
        );
        let u = get(&e, "target.url");
        assert_eq!(
            u.value,
            Some(
                format!("postgres://u:***@%2Frun%2Fpostgresql:5432,db2:5433/d?sslmode=verify-full&sslrootcert={}", ca.display())
                    .into()
            )
        );
        assert_eq!((u.origin, u.read_from), (Origin::Environment, None));
        let t = get(&e, "http.admin_token");
        assert_eq!((t.value.as_ref(), t.masked), (None, false));
        assert_eq!(t.origin, Origin::Environment);
    }

    #[test]
    fn values_are_the_effective_ones() {
        let e = effective(
            "[target]\ntable = \"mirror\"\n[http]\ncors_origins = [\"https://a.example/\"]\nallowed_hosts = [\"App.Example\"]\n",
            &[("MAPSYNC_INSTANCE__NAME", "blue")],
        );
        assert_eq!(get(&e, "target.table").value, Some("public.mirror".into()));
        assert_eq!(
            get(&e, "http.cors_origins").value,
            Some(toml::Value::Array(vec!["https://a.example".into()]))
        );
        assert_eq!(
            get(&e, "http.allowed_hosts").value,
            Some(toml::Value::Array(vec!["app.example".into()]))
        );
        let name = get(&e, "instance.name");
        assert_eq!(
            (name.value.clone(), name.origin),
            (Some("blue".into()), Origin::Environment)
        );
    }
}
