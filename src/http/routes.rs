//! The routes of SPEC §4, their authorisation and CORS, and the metrics each request counts.
//!
//! Every token route answers in the application's envelope; `/livez`, `/readyz` and
//! `/metrics` answer plainly for probes and scrapers. Nothing secret is ever in an answer:
//! errors come from the engine already free of passwords, and the token is only compared.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ALLOW, AUTHORIZATION,
    CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, HeaderMap, HeaderValue, ORIGIN,
    VARY, X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::BODY_LIMIT;
use super::reply::{self, Body, ChannelBody, ChannelWriter};
use crate::config::{HttpSettings, Secret};
use crate::engine::{EngineHandle, RunErrorKind};
use crate::mapping::{self, Mapping};
use crate::metrics::{CONTENT_TYPE as METRICS_CONTENT_TYPE, HttpLabels};
use crate::snapshot::{self, Written};
use crate::source::SourceImage;
use crate::sync::SyncOptions;

/// The admin page, compiled in.
const ADMIN_PAGE: &str = include_str!("admin.html");
const ADMIN_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
    connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The most `/mappings` returns at once.
const PAGE_MAX: usize = 500;

/// What every request needs: the engine, the settings, and a cache of the sorted mappings.
pub struct App {
    engine: EngineHandle,
    token: Option<Secret>,
    cors_origins: Vec<String>,
    ready_max_lag: std::time::Duration,
    /// The last image sorted in export order, reused while the image is the same.
    sorted: Mutex<Option<(Arc<SourceImage>, Sorted)>>,
}

/// Mappings in export order, shared between requests.
type Sorted = Arc<Vec<Arc<Mapping>>>;

/// How a route is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Open,
    Token,
}

impl App {
    pub fn new(settings: &HttpSettings, engine: EngineHandle) -> App {
        App {
            engine,
            token: settings.admin_token.clone(),
            cors_origins: settings.cors_origins.clone(),
            ready_max_lag: settings.ready_max_lag,
            sorted: Mutex::new(None),
        }
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let origin = self.allowed_origin(req.headers());
        let (route, mut res) = self.route(req, origin.is_some()).await;
        let h = res.headers_mut();
        h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if let Some(origin) = origin {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(
                ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("Content-Disposition"),
            );
            h.append(VARY, HeaderValue::from_static("Origin"));
        }
        self.engine
            .shared()
            .metrics
            .http_requests
            .get_or_create(&HttpLabels {
                route,
                code: res.status().as_u16(),
            })
            .inc();
        res
    }

    /// Dispatches on path and method; returns the route's label for the metrics.
    async fn route(&self, req: Request<Incoming>, cors: bool) -> (&'static str, Response<Body>) {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let (route, methods, access): (&'static str, &[Method], Access) = match path.as_str() {
            "/" => ("/", &[Method::GET], Access::Open),
            "/livez" => ("/livez", &[Method::GET], Access::Open),
            "/healthz" => ("/healthz", &[Method::GET], Access::Open),
            "/readyz" => ("/readyz", &[Method::GET], Access::Open),
            "/metrics" => ("/metrics", &[Method::GET], Access::Open),
            "/status" => ("/status", &[Method::GET], Access::Token),
            "/mappings" => ("/mappings", &[Method::GET], Access::Token),
            "/sync" => ("/sync", &[Method::POST], Access::Token),
            "/api/v1/llm/model-groups/sync-to-supabase" => (
                "/api/v1/llm/model-groups/sync-to-supabase",
                &[Method::POST],
                Access::Token,
            ),
            "/api/v1/llm/model-groups/sync" => (
                "/api/v1/llm/model-groups/sync",
                &[Method::POST],
                Access::Token,
            ),
            "/export" => ("/export", &[Method::GET], Access::Token),
            "/snapshots" => ("/snapshots", &[Method::GET, Method::POST], Access::Token),
            p if p.starts_with("/snapshots/") => {
                ("/snapshots/{name}", &[Method::GET], Access::Token)
            }
            _ => {
                return (
                    "other",
                    reply::envelope_error(StatusCode::NOT_FOUND, &format!("no route {path}")),
                );
            }
        };
        if method == Method::OPTIONS {
            return (route, preflight(methods, cors));
        }
        let allowed =
            methods.contains(&method) || (method == Method::HEAD && methods.contains(&Method::GET));
        if !allowed {
            let allow = methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut res = reply::envelope_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} is not allowed on {path}: use {allow}"),
            );
            res.headers_mut().insert(ALLOW, reply::header(&allow));
            return (route, res);
        }
        if access == Access::Token && !self.authorized(req.headers()) {
            return (
                route,
                reply::envelope_error(StatusCode::UNAUTHORIZED, "unauthorized"),
            );
        }
        // Every body is read (and capped) here, whether the route uses it or not: a request
        // over the limit is refused before it can start anything.
        let query = req.uri().query().map(str::to_string);
        let query = query.as_deref();
        let body = match read_body(req).await {
            Ok(b) => b,
            Err(res) => return (route, res),
        };
        let res = match (route, method) {
            ("/", _) => admin_page(),
            ("/livez" | "/healthz", _) => {
                reply::json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            ("/readyz", _) => self.readyz().await,
            ("/metrics", _) => self.metrics(),
            ("/status", _) => reply::ok(&self.engine.shared().board.snapshot()),
            ("/mappings", _) => self.mappings(query).await,
            ("/sync" | "/api/v1/llm/model-groups/sync-to-supabase", _) => {
                match sync_options(query, self.engine.deletes_by_default()) {
                    Ok(opts) => self.sync(opts, false).await,
                    Err(msg) => reply::envelope_error(StatusCode::BAD_REQUEST, &msg),
                }
            }
            ("/api/v1/llm/model-groups/sync", _) => self.sync_with_direction(&body).await,
            ("/export", _) => self.export().await,
            ("/snapshots", Method::POST) => self.write_snapshot().await,
            ("/snapshots", _) => self.list_snapshots().await,
            ("/snapshots/{name}", _) => self.snapshot_file(&path["/snapshots/".len()..]).await,
            _ => reply::envelope_error(StatusCode::NOT_FOUND, &format!("no route {path}")),
        };
        (route, res)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        // The scheme is case-insensitive (RFC 7235).
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token);
        reply::constant_time_eq(given.trim().as_bytes(), token.expose().as_bytes())
    }

    /// The request's `Origin`, when it is one of `http.cors_origins`.
    fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(ORIGIN)?.to_str().ok()?;
        self.cors_origins
            .iter()
            .any(|o| o == "*" || o == origin)
            .then(|| reply::header(origin))
    }

    async fn readyz(&self) -> Response<Body> {
        let shared = self.engine.shared();
        let mut checks = BTreeMap::new();
        let sqlite = match shared.board.source_error() {
            Some(e) => Check::fail(e),
            None if shared.board.snapshot().source.read_at.is_none() => {
                Check::fail("the SQLite file has not been read yet".into())
            }
            None => Check::ok(),
        };
        checks.insert("sqlite", sqlite);
        if shared.target.is_some() {
            checks.insert(
                "target",
                match self.engine.target_ready().await {
                    Ok(()) => Check::ok(),
                    Err(e) => Check::fail(e),
                },
            );
        }
        let lag = shared.board.lag();
        checks.insert(
            "lag",
            if lag < self.ready_max_lag {
                Check::ok()
            } else {
                Check::fail(format!(
                    "the oldest unmirrored change is {} s old (http.ready_max_lag_s = {})",
                    lag.as_secs(),
                    self.ready_max_lag.as_secs()
                ))
            },
        );
        let ready = checks.values().all(|c| c.ok);
        reply::json(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            &serde_json::json!({
                "status": if ready { "ready" } else { "not_ready" },
                "checks": checks,
            }),
        )
    }

    fn metrics(&self) -> Response<Body> {
        let shared = self.engine.shared();
        let text = shared.metrics.encode(shared.board.lag().as_secs_f64());
        reply::bytes(StatusCode::OK, METRICS_CONTENT_TYPE, text)
    }

    /// The current mappings in export order; sorted once per image on the blocking pool.
    async fn sorted(&self) -> Sorted {
        let image = self.engine.image();
        if let Some((cached, sorted)) = self
            .sorted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if Arc::ptr_eq(cached, &image) {
                return sorted.clone();
            }
        }
        let for_sort = image.clone();
        let sorted = tokio::task::spawn_blocking(move || {
            let mut v = for_sort.mappings.clone();
            mapping::sort_for_export(&mut v);
            Arc::new(v)
        })
        .await;
        match sorted {
            Ok(sorted) => {
                *self.sorted.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((image, sorted.clone()));
                sorted
            }
            // Only a panic in the sort gets here: answer with nothing, cache nothing.
            Err(_) => Sorted::default(),
        }
    }

    async fn mappings(&self, query: Option<&str>) -> Response<Body> {
        let params = match Query::parse(query) {
            Ok(p) => p,
            Err(msg) => return reply::envelope_error(StatusCode::BAD_REQUEST, &msg),
        };
        let (offset, limit) = match (params.number("offset", 0), params.number("limit", 100)) {
            (Ok(o), Ok(l)) => (o, l.clamp(1, PAGE_MAX)),
            (Err(msg), _) | (_, Err(msg)) => {
                return reply::envelope_error(StatusCode::BAD_REQUEST, &msg);
            }
        };
        let needle = params.get("q").unwrap_or("").trim().to_lowercase();
        let sorted = self.sorted().await;
        let matches = |m: &&Arc<Mapping>| {
            needle.is_empty()
                || [Some(m.id()), m.name(), m.default_model()]
                    .into_iter()
                    .flatten()
                    .any(|f| f.to_lowercase().contains(&needle))
        };
        // A search looks at every mapping: off the runtime thread other requests share.
        // One pass: count every match, keep the page's.
        let (total, items) = tokio::task::block_in_place(|| {
            let mut items: Vec<mapping::View<'_>> = Vec::with_capacity(limit.min(sorted.len()));
            let mut total = 0;
            for m in sorted.iter().filter(matches) {
                if total >= offset && items.len() < limit {
                    // The page shows what the mirror holds: no secret on screen.
                    items.push(m.view(true));
                }
                total += 1;
            }
            (total, items)
        });
        reply::ok(&Page {
            total,
            offset,
            limit,
            items,
        })
    }

    async fn sync(&self, opts: SyncOptions, under_push: bool) -> Response<Body> {
        match self.engine.sync(opts).await {
            Ok(report) if under_push => reply::ok(&serde_json::json!({ "push": report })),
            Ok(report) => reply::ok(&report),
            Err(e) => {
                let status = match e.kind {
                    RunErrorKind::Source | RunErrorKind::Target | RunErrorKind::ShuttingDown => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    RunErrorKind::Other => StatusCode::INTERNAL_SERVER_ERROR,
                };
                reply::envelope_error(status, &e.message)
            }
        }
    }

    /// `POST /api/v1/llm/model-groups/sync` with `{"direction": "push", "delete_missing": bool}`.
    async fn sync_with_direction(&self, body: &[u8]) -> Response<Body> {
        let value: Value = if body.is_empty() {
            Value::Object(Default::default())
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return reply::envelope_error(
                        StatusCode::BAD_REQUEST,
                        &format!("the body is not valid JSON: {e}"),
                    );
                }
            }
        };
        let Some(obj) = value.as_object() else {
            return reply::envelope_error(
                StatusCode::BAD_REQUEST,
                "the body must be a JSON object",
            );
        };
        match obj
            .get("direction")
            .and_then(Value::as_str)
            .unwrap_or("push")
        {
            "push" => {}
            other => {
                return reply::envelope_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "unsupported_direction: `{other}`: mapsync only pushes (SQLite is the source of truth)"
                    ),
                );
            }
        }
        let delete_missing = match obj.get("delete_missing") {
            None | Some(Value::Null) => self.engine.deletes_by_default(),
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return reply::envelope_error(
                    StatusCode::BAD_REQUEST,
                    "delete_missing must be true or false",
                );
            }
        };
        let force = matches!(obj.get("force"), Some(Value::Bool(true)));
        self.sync(
            SyncOptions {
                delete_missing,
                force,
                dry_run: false,
            },
            true,
        )
        .await
    }

    async fn export(&self) -> Response<Body> {
        let sorted = self.sorted().await;
        let now = Utc::now();
        let redact = self.engine.redacts_exports();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        tokio::task::spawn_blocking(move || {
            let mut out = ChannelWriter::new(tx);
            // A client that goes away ends the write; nothing to report.
            let _ = snapshot::write_document(&mut out, &sorted, now, redact);
        });
        let mut res = Response::new(BodyExt::boxed(ChannelBody(rx)));
        let h = res.headers_mut();
        h.insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static(reply::JSON),
        );
        h.insert(
            hyper::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        h.insert(
            CONTENT_DISPOSITION,
            reply::header(&format!(
                "attachment; filename=\"model-mappings-{}.json\"",
                now.format("%Y%m%d-%H%M%S")
            )),
        );
        res
    }

    async fn write_snapshot(&self) -> Response<Body> {
        match self.engine.snapshot().await {
            Ok(Written::New(info)) => reply::ok(
                &serde_json::json!({"name": info.name, "written": true, "snapshot": info}),
            ),
            Ok(Written::Unchanged) => {
                let newest = self.engine.shared().board.snapshot().snapshot.newest;
                reply::ok(&serde_json::json!({
                    "name": newest.as_ref().map(|n| n.name.clone()),
                    "written": false,
                    "snapshot": newest,
                }))
            }
            Err(e) => reply::envelope_error(StatusCode::SERVICE_UNAVAILABLE, &e),
        }
    }

    async fn list_snapshots(&self) -> Response<Body> {
        let store = self.store();
        match tokio::task::spawn_blocking(move || store.list()).await {
            Ok(Ok(list)) => reply::ok(&list),
            Ok(Err(e)) => reply::envelope_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            Err(e) => reply::envelope_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    async fn snapshot_file(&self, name: &str) -> Response<Body> {
        let Some(path) = self.store().path_of(name) else {
            return reply::envelope_error(
                StatusCode::NOT_FOUND,
                &format!("no snapshot named {name}"),
            );
        };
        match tokio::fs::read(&path).await {
            Ok(bytes) => reply::bytes(StatusCode::OK, reply::JSON, bytes),
            Err(e) => reply::envelope_error(
                StatusCode::NOT_FOUND,
                &format!("cannot read snapshot {name}: {e}"),
            ),
        }
    }

    fn store(&self) -> snapshot::SnapshotStore {
        self.engine.snapshot_store()
    }
}

/// Answers an `OPTIONS` preflight: 204, with the CORS headers only for an allowed origin.
fn preflight(methods: &[Method], cors: bool) -> Response<Body> {
    let mut res = reply::bytes(StatusCode::NO_CONTENT, "text/plain", Bytes::new());
    if !cors {
        return res;
    }
    let allow = methods
        .iter()
        .map(Method::as_str)
        .chain(["OPTIONS"])
        .collect::<Vec<_>>()
        .join(", ");
    let h = res.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_METHODS, reply::header(&allow));
    h.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    res
}

fn admin_page() -> Response<Body> {
    let mut res = reply::bytes(StatusCode::OK, "text/html; charset=utf-8", ADMIN_PAGE);
    res.headers_mut()
        .insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(ADMIN_CSP));
    res
}

/// Reads a request body of at most [`BODY_LIMIT`] bytes; 413 beyond it.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        reply::envelope_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the body is larger than {} KiB", BODY_LIMIT / 1024),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(reply::envelope_error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read the body: {e}"),
        )),
    }
}

/// `delete_missing` and `force` from a query string; anything but true/false/1/0 is a 400.
fn sync_options(query: Option<&str>, default_delete: bool) -> Result<SyncOptions, String> {
    let params = Query::parse(query)?;
    Ok(SyncOptions {
        delete_missing: params.flag("delete_missing")?.unwrap_or(default_delete),
        force: params.flag("force")?.unwrap_or(false),
        dry_run: false,
    })
}

/// A parsed query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Result<Query, String> {
        let mut out = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((decode(k)?, decode(v)?));
        }
        Ok(Query(out))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(other) => Err(format!("{key} must be true or false, not `{other}`")),
        }
    }

    fn number(&self, key: &str, default: usize) -> Result<usize, String> {
        match self.get(key) {
            None | Some("") => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{key} must be a non-negative integer, not `{v}`")),
        }
    }
}

/// Percent-decoding (`+` as space), rejecting malformed escapes and invalid UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("malformed query: bad escape in `{s}`"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "malformed query: not UTF-8".to_string())
}

/// A page of `/mappings`.
#[derive(Serialize)]
struct Page<'a> {
    total: usize,
    offset: usize,
    limit: usize,
    items: Vec<mapping::View<'a>>,
}

/// One readiness check.
#[derive(Serialize)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Check {
    fn ok() -> Check {
        Check {
            ok: true,
            error: None,
        }
    }
    fn fail(error: String) -> Check {
        Check {
            ok: false,
            error: Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_flags_checked() {
        let q = Query::parse(Some("q=gpt%2D4o+mini&delete_missing=true&force=0")).unwrap();
        assert_eq!(q.get("q"), Some("gpt-4o mini"));
        assert_eq!(q.flag("delete_missing"), Ok(Some(true)));
        assert_eq!(q.flag("force"), Ok(Some(false)));
        assert_eq!(q.flag("absent"), Ok(None));
        let bad = Query::parse(Some("force=maybe")).unwrap();
        assert!(bad.flag("force").unwrap_err().contains("force"));
        assert!(Query::parse(Some("q=%zz")).is_err());
        assert!(Query::parse(Some("q=%ff")).is_err());
    }
}
