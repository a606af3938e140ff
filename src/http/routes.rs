//! The routes of SPEC §4, their guards (Host, CSRF, credentials), CORS, the access log and
//! the metrics each request counts.
//!
//! Every request goes through the same gates, in this order, before a handler runs:
//! 1. `Host` must be the address the client connected to, `localhost[:port]`, or one of
//!    `http.allowed_hosts` (421 otherwise: a DNS-rebinding page cannot read anything);
//! 2. a state-changing request (any method but GET, HEAD and OPTIONS) whose `Origin` is
//!    neither the request's own origin nor one of `http.cors_origins` is refused (403) —
//!    nothing is started;
//! 3. the route and the method (404, 405; `OPTIONS` answers a CORS preflight);
//! 4. token routes: the credential (401 with `WWW-Authenticate: Bearer`, or 403 for a
//!    login token without admin rights), see [`super::auth`].
//!
//! Only `POST /api/v1/llm/model-groups/sync` reads a body; every other route refuses a
//! request that declares one (413) without reading it. The one body is read within
//! [`BODY_TIMEOUT`], at most
//! [`BODY_LIMIT`] bytes, copied as they arrive (memory follows the bytes received), and under
//! [`BODY_BUDGET`] bytes held across all connections.
//!
//! Every token route answers in the application's envelope; `/livez`, `/readyz` and
//! `/metrics` answer plainly for probes and scrapers. Every answer carries `X-Request-Id`.
//! Each request is logged once (method, route, status, duration, request id, peer, and who
//! asked). Nothing secret is ever in an answer or a log line: errors come from the engine
//! already free of passwords, and credentials are only compared.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ALLOW,
    CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, HOST, HeaderMap, HeaderName,
    HeaderValue, ORIGIN, VARY, WWW_AUTHENTICATE, X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::{Auth, Caller, Refusal};
use super::conn::{Pending, Refused};
use super::reply::{self, Body, quote};
use crate::appdb::SourceImage;
use crate::config::HttpSettings;
use crate::engine::{Check, EngineHandle, RunErrorKind};
use crate::mapping::{self, Mapping};
use crate::metrics::{CONTENT_TYPE as METRICS_CONTENT_TYPE, HttpLabels};
use crate::snapshot::{self, Written};
use crate::sync::{SyncOptions, SyncReport};

/// The admin page, compiled in.
const ADMIN_PAGE: &str = include_str!("admin.html");
const ADMIN_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
    connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The largest request body (413 beyond).
pub const BODY_LIMIT: usize = 64 * 1024;
/// A body must arrive whole within this time of its handler starting to read it (408).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of request bodies held at once across all connections (503 beyond).
pub const BODY_BUDGET: usize = 4 * 1024 * 1024;
/// The longest `X-Request-Id` kept; a longer or unprintable one is replaced.
const REQUEST_ID_MAX: usize = 128;
/// Request headers a CORS preflight may allow.
const CORS_HEADERS: [&str; 4] = ["Authorization", "Content-Type", "X-Request-Id", "token"];
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The most `/mappings` returns at once.
const PAGE_MAX: usize = 500;

const SYNC_COMPAT: &str = "/api/v1/llm/model-groups/sync-to-supabase";
const SYNC_PUSH: &str = "/api/v1/llm/model-groups/sync";

/// What every request needs: the engine, the settings, and a cache of the sorted mappings.
pub struct App {
    engine: EngineHandle,
    auth: Auth,
    cors_origins: Vec<String>,
    allowed_hosts: Vec<String>,
    ready_max_lag: Duration,
    /// Bytes of request bodies held now, as permits of a semaphore of [`BODY_BUDGET`].
    body_budget: Arc<Semaphore>,
    /// Connections waiting on their client (for a head, or for a body): the oldest is
    /// pushed out when one more would exceed the limit.
    pending: Arc<Pending>,
    /// For generated request ids: the start time and a counter.
    started_us: u64,
    next_id: AtomicU64,
    /// The last image sorted in export order, reused while the image is the same.
    sorted: Mutex<Option<(Arc<SourceImage>, Sorted)>>,
}

/// Where a request came from and where it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// Mappings in export order, shared between requests.
type Sorted = Arc<Vec<Arc<Mapping>>>;

/// How a route is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Open,
    Token,
}

/// The routes of SPEC §4.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Page,
    Livez,
    Healthz,
    Readyz,
    Metrics,
    Status,
    Mappings,
    Sync,
    SyncCompat,
    SyncPush,
    Export,
    Snapshots,
    Snapshot,
}

/// The route table: each route's path (its metrics label), methods and access. A path
/// maps to its route here and nowhere else.
const ROUTES: [(Route, &str, &[Method], Access); 13] = [
    (Route::Page, "/", &[Method::GET], Access::Open),
    (Route::Livez, "/livez", &[Method::GET], Access::Open),
    (Route::Healthz, "/healthz", &[Method::GET], Access::Open),
    (Route::Readyz, "/readyz", &[Method::GET], Access::Open),
    (Route::Metrics, "/metrics", &[Method::GET], Access::Open),
    (Route::Status, "/status", &[Method::GET], Access::Token),
    (Route::Mappings, "/mappings", &[Method::GET], Access::Token),
    (Route::Sync, "/sync", &[Method::POST], Access::Token),
    (
        Route::SyncCompat,
        SYNC_COMPAT,
        &[Method::POST],
        Access::Token,
    ),
    (Route::SyncPush, SYNC_PUSH, &[Method::POST], Access::Token),
    (Route::Export, "/export", &[Method::GET], Access::Token),
    (
        Route::Snapshots,
        "/snapshots",
        &[Method::GET, Method::POST],
        Access::Token,
    ),
    (
        Route::Snapshot,
        "/snapshots/{name}",
        &[Method::GET],
        Access::Token,
    ),
];

impl Route {
    /// The route serving `path`.
    fn of(path: &str) -> Option<Route> {
        if path.starts_with("/snapshots/") {
            return Some(Route::Snapshot);
        }
        ROUTES.iter().find(|(_, p, _, _)| *p == path).map(|r| r.0)
    }

    /// (label, methods, access) from [`ROUTES`].
    fn spec(self) -> (&'static str, &'static [Method], Access) {
        let (_, label, methods, access) = ROUTES.iter().find(|r| r.0 == self).copied().unwrap_or((
            self,
            "other",
            &[],
            Access::Token,
        ));
        (label, methods, access)
    }
}

/// What the access log says about one request besides its answer.
struct Answered {
    route: &'static str,
    /// Who asked, for state-changing requests (and refusals of them).
    caller: Option<String>,
    res: Response<Body>,
}

impl Answered {
    fn new(route: &'static str, res: Response<Body>) -> Answered {
        Answered {
            route,
            caller: None,
            res,
        }
    }
}

impl App {
    pub fn new(settings: &HttpSettings, engine: EngineHandle) -> App {
        App {
            engine,
            auth: Auth::new(settings),
            cors_origins: settings.cors_origins.clone(),
            allowed_hosts: settings.allowed_hosts.clone(),
            ready_max_lag: settings.ready_max_lag,
            body_budget: Arc::new(Semaphore::new(BODY_BUDGET)),
            pending: Arc::new(Pending::default()),
            started_us: Utc::now().timestamp_micros().unsigned_abs(),
            next_id: AtomicU64::new(0),
            sorted: Mutex::new(None),
        }
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let request_id = self.request_id(req.headers().get(X_REQUEST_ID).map(|v| v.as_bytes()));
        let origin = self.allowed_origin(req.headers());
        let Answered {
            route,
            caller,
            mut res,
        } = self.route(req, peer, origin.is_some()).await;
        let h = res.headers_mut();
        h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(X_REQUEST_ID, reply::header(&request_id));
        if let Some(origin) = origin {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(
                ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("Content-Disposition, X-Request-Id"),
            );
            h.append(VARY, HeaderValue::from_static("Origin"));
        }
        self.record(
            method.as_str(),
            route,
            res.status(),
            started,
            &request_id,
            peer.remote,
            caller.as_deref(),
        );
        res
    }

    /// The connections waiting on their client, shared with the head reader.
    pub fn pending(&self) -> &Arc<Pending> {
        &self.pending
    }

    /// The whole answer (status line, headers, envelope) to a request head refused before
    /// hyper saw it; logged and counted like any other request.
    pub fn refuse_head(&self, refused: &Refused, peer: SocketAddr) -> Vec<u8> {
        let request_id = self.request_id(refused.request_id.as_deref().map(str::as_bytes));
        let msg = if refused.path.is_empty() {
            refused.msg.clone()
        } else {
            format!(
                "{}: {} {}",
                refused.msg,
                quote(&refused.method),
                quote(&refused.path)
            )
        };
        let body = reply::envelope_bytes(refused.status, &msg, None::<&()>);
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\n\
             x-content-type-options: nosniff\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n",
            refused.status.as_u16(),
            refused.status.canonical_reason().unwrap_or(""),
            reply::JSON,
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        // A refused head's method may be anything: only its first visible characters.
        let method: String = refused
            .method
            .chars()
            .filter(char::is_ascii_graphic)
            .take(16)
            .collect();
        self.record(
            &method,
            "other",
            refused.status,
            Instant::now(),
            &request_id,
            peer,
            None,
        );
        out
    }

    /// Counts the request and writes its access-log line.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        method: &str,
        route: &'static str,
        status: StatusCode,
        started: Instant,
        request_id: &str,
        peer: SocketAddr,
        caller: Option<&str>,
    ) {
        self.engine
            .metrics()
            .http_requests
            .get_or_create(&HttpLabels {
                route,
                code: status.as_u16(),
            })
            .inc();
        tracing::info!(
            target: "mapsync::access",
            method,
            route,
            status = status.as_u16(),
            duration_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0,
            request_id,
            peer = %peer,
            caller = caller.unwrap_or("-"),
            "request"
        );
    }

    /// The request's `X-Request-Id` when it is printable ASCII of at most
    /// [`REQUEST_ID_MAX`] characters; else a new one.
    fn request_id(&self, given: Option<&[u8]>) -> String {
        match given {
            Some(id)
                if !id.is_empty()
                    && id.len() <= REQUEST_ID_MAX
                    && id.iter().all(|b| (0x21..=0x7e).contains(b)) =>
            {
                String::from_utf8_lossy(id).into_owned()
            }
            _ => format!(
                "mapsync-{:x}-{:x}",
                self.started_us,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// The gates of the module doc, then the handler.
    async fn route(&self, req: Request<Incoming>, peer: Peer, cors: bool) -> Answered {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        let Some(host) = host.filter(|h| host_allowed(h, peer.local, &self.allowed_hosts)) else {
            return Answered::new(
                "other",
                reply::envelope_error(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this Host is not served here: use the listen address or localhost, or add the name to http.allowed_hosts",
                ),
            );
        };
        let method = req.method().clone();
        let safe = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe {
            if let Some(origin) = req.headers().get(ORIGIN) {
                let text = String::from_utf8_lossy(origin.as_bytes());
                if !cors && !same_origin(&text, &host) {
                    return Answered {
                        route: "other",
                        caller: Some("refused: cross-origin".into()),
                        res: reply::envelope_error(
                            StatusCode::FORBIDDEN,
                            &format!(
                                "a {method} from origin {} is refused: only the admin page's own origin and http.cors_origins may change anything",
                                quote(&text)
                            ),
                        ),
                    };
                }
            }
        }
        let path = req.uri().path().to_string();
        let Some(which) = Route::of(&path) else {
            return Answered::new(
                "other",
                reply::envelope_error(StatusCode::NOT_FOUND, &format!("no route {}", quote(&path))),
            );
        };
        let (route, methods, access) = which.spec();
        if method == Method::OPTIONS {
            return Answered::new(route, preflight(methods, cors, req.headers()));
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
                &format!(
                    "{} is not allowed on {}: use {allow}",
                    quote(method.as_str()),
                    quote(&path)
                ),
            );
            res.headers_mut().insert(ALLOW, reply::header(&allow));
            return Answered::new(route, res);
        }
        if which != Route::SyncPush && has_body(req.headers()) {
            // Never read: the request is refused before it can start anything.
            return Answered::new(
                route,
                reply::envelope_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("{} takes no request body", quote(&path)),
                ),
            );
        }
        let mut caller = None;
        if access == Access::Token {
            match self.auth.check(req.headers()) {
                Ok(who) => caller = Some(who),
                Err(refusal) => {
                    let (res, who) = refused(refusal);
                    return Answered {
                        route,
                        caller: (!safe).then_some(who),
                        res,
                    };
                }
            }
        }
        let caller = caller.filter(|_| !safe).map(|c: Caller| c.to_string());
        let query = req.uri().query().map(str::to_string);
        let query = query.as_deref();
        let res = match which {
            Route::Page => admin_page(),
            Route::Livez | Route::Healthz => {
                reply::json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            Route::Readyz => self.readyz().await,
            Route::Metrics => self.metrics(),
            Route::Status => reply::ok(&self.engine.status()),
            Route::Mappings => self.mappings(query).await,
            Route::Sync | Route::SyncCompat => {
                match sync_options(query, self.engine.deletes_by_default()) {
                    Ok(opts) => self.sync(opts, false).await,
                    Err(e) => reply::envelope_error(StatusCode::BAD_REQUEST, &e.to_string()),
                }
            }
            Route::SyncPush => match self.read_body(req).await {
                Ok((body, _held)) => self.sync_with_direction(&body).await,
                Err(res) => res,
            },
            Route::Export => self.export().await,
            Route::Snapshots if method == Method::POST => self.write_snapshot().await,
            Route::Snapshots => self.list_snapshots().await,
            Route::Snapshot => self.snapshot_file(&path["/snapshots/".len()..]).await,
        };
        Answered { route, caller, res }
    }

    /// The request's `Origin`, when it is one of `http.cors_origins`.
    fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(ORIGIN)?.to_str().ok()?;
        self.cors_origins
            .iter()
            .any(|o| o == "*" || o == origin)
            .then(|| reply::header(origin))
    }

    /// Reads the request's body: 413 over [`BODY_LIMIT`], 408 when it takes longer than
    /// [`BODY_TIMEOUT`], 503 when [`BODY_BUDGET`] is spent or when newer connections push
    /// this one out of the waiting list (a body counts as waiting on the client, like a
    /// head). Each frame is copied and dropped at once, so the memory held follows the bytes
    /// received (a frame kept whole would pin hyper's whole read buffer). The permit holds
    /// the bytes' share of the budget.
    async fn read_body(
        &self,
        req: Request<Incoming>,
    ) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), Response<Body>> {
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
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
            return Err(too_large());
        }
        let mut body = req.into_body();
        let mut buf = Vec::new();
        let mut held: Option<OwnedSemaphorePermit> = None;
        let read =
            async {
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| {
                        reply::envelope_error(
                            StatusCode::BAD_REQUEST,
                            &format!("cannot read the body: {e}"),
                        )
                    })?;
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers
                    };
                    if buf.len() + data.len() > BODY_LIMIT {
                        return Err(too_large());
                    }
                    let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    let permit = self.body_budget.clone().try_acquire_many_owned(n).map_err(
                        |_| {
                            reply::envelope_error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "too many request bodies are arriving at once: retry in a moment",
                            )
                        },
                    )?;
                    match &mut held {
                        Some(h) => h.merge(permit),
                        None => held = Some(permit),
                    }
                    buf.extend_from_slice(&data);
                }
                Ok(())
            };
        let (_place, pushed_out) = self.pending.enter();
        let outcome = tokio::select! {
            r = tokio::time::timeout(BODY_TIMEOUT, read) => r,
            _ = pushed_out => {
                return Err(reply::envelope_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many slow requests: this body was arriving too slowly",
                ));
            }
        };
        match outcome {
            Ok(Ok(())) => Ok((buf, held)),
            Ok(Err(res)) => Err(res),
            Err(_) => Err(reply::envelope_error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    async fn readyz(&self) -> Response<Body> {
        let checks: BTreeMap<&str, Check> = self
            .engine
            .readiness(self.ready_max_lag)
            .await
            .into_iter()
            .collect();
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
        reply::bytes(
            StatusCode::OK,
            METRICS_CONTENT_TYPE,
            self.engine.metrics_text(),
        )
    }

    /// The current mappings in export order; sorted once per image on the blocking pool. A 503
    /// before the first successful read: an empty list would pass for a file with no mappings.
    async fn sorted(&self) -> Result<Sorted, Response<Body>> {
        let unavailable = |why: &str| reply::envelope_error(StatusCode::SERVICE_UNAVAILABLE, why);
        let Some(image) = self.engine.image() else {
            return Err(unavailable(
                "no mappings have been read yet from the SQLite file (GET /status says why): try again once it has been read",
            ));
        };
        if let Some((cached, sorted)) = self
            .sorted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if Arc::ptr_eq(cached, &image) {
                return Ok(sorted.clone());
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
                Ok(sorted)
            }
            // Only a panic in the sort gets here: cache nothing, say so.
            Err(_) => Err(unavailable(
                "the mappings could not be sorted for this answer: try again",
            )),
        }
    }

    async fn mappings(&self, query: Option<&str>) -> Response<Body> {
        let params = match Query::parse(query) {
            Ok(p) => p,
            Err(e) => return reply::envelope_error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let (offset, limit) = match (params.number("offset", 0), params.number("limit", 100)) {
            (Ok(o), Ok(l)) => (o, l.clamp(1, PAGE_MAX)),
            (Err(e), _) | (_, Err(e)) => {
                return reply::envelope_error(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
        let needle = params.get("q").unwrap_or("").trim().to_lowercase();
        let sorted = match self.sorted().await {
            Ok(sorted) => sorted,
            Err(unavailable) => return unavailable,
        };
        let matches = |m: &&Arc<Mapping>| {
            needle.is_empty()
                || [Some(m.id()), m.name(), m.default_model()]
                    .into_iter()
                    .flatten()
                    .any(|f| f.to_lowercase().contains(&needle))
        };
        // A search looks at every mapping: off the runtime thread other requests share.
        // One pass: count every match, keep the page's.
        let (total, items) = crate::cpu_bound(|| {
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
            Ok(report) => {
                let data = if under_push {
                    serde_json::json!({ "push": report })
                } else {
                    serde_json::to_value(&report).unwrap_or(Value::Null)
                };
                match refusal_msg(&report) {
                    Some(msg) => reply::envelope(StatusCode::CONFLICT, &msg, Some(&data)),
                    None => reply::ok(&data),
                }
            }
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

    /// `POST /api/v1/llm/model-groups/sync` with `{"direction": "push", "delete_missing":
    /// bool}` (the page also sends `overwrite`; `force` is accepted too). Each field must have
    /// its JSON type; other fields are ignored.
    async fn sync_with_direction(&self, body: &[u8]) -> Response<Body> {
        let bad = |msg: &str| reply::envelope_error(StatusCode::BAD_REQUEST, msg);
        let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Default::default())
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return bad(&format!("the body is not valid JSON: {e}")),
            }
        };
        let Some(obj) = value.as_object() else {
            return bad("the body must be a JSON object like {\"direction\":\"push\"}");
        };
        match obj.get("direction") {
            None => {}
            Some(Value::String(d)) if d == "push" => {}
            Some(Value::String(d)) if d == "pull" || d == "both" => {
                return bad(&format!(
                    "direction {}: mapsync mirrors one way, SQLite → Postgres, and never pulls; pulling from Supabase stays the application's job (its own \"Pull from Supabase\")",
                    quote(d)
                ));
            }
            Some(Value::String(d)) => {
                return bad(&format!(
                    "direction {} is not supported: use \"push\"",
                    quote(d)
                ));
            }
            Some(other) => {
                return bad(&format!(
                    "direction must be a string (\"push\"), not {}",
                    json_type(other)
                ));
            }
        }
        let mut flags = [None; 3];
        for (slot, field) in flags
            .iter_mut()
            .zip(["delete_missing", "force", "overwrite"])
        {
            match obj.get(field) {
                None => {}
                Some(Value::Bool(b)) => *slot = Some(*b),
                Some(other) => {
                    return bad(&format!(
                        "{field} must be true or false, not {}",
                        json_type(other)
                    ));
                }
            }
        }
        let [delete_missing, force, _overwrite] = flags;
        self.sync(
            SyncOptions {
                delete_missing: delete_missing.unwrap_or(self.engine.deletes_by_default()),
                force: force.unwrap_or(false),
                dry_run: false,
            },
            true,
        )
        .await
    }

    async fn export(&self) -> Response<Body> {
        let sorted = match self.sorted().await {
            Ok(sorted) => sorted,
            Err(unavailable) => return unavailable,
        };
        let now = Utc::now();
        let redact = self.engine.redacts_exports();
        let mut res =
            reply::streamed_json(move |out| snapshot::write_document(out, &sorted, now, redact));
        res.headers_mut().insert(
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
                let newest = self.engine.status().snapshot.newest;
                reply::ok(&serde_json::json!({
                    "name": newest.as_ref().map(|n| n.name.clone()),
                    "written": false,
                    "snapshot": newest,
                }))
            }
            Err(e) => reply::envelope_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
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

    /// A snapshot file, streamed as the export is (memory stays bounded by the channel
    /// whatever the file's size and however many clients ask).
    async fn snapshot_file(&self, name: &str) -> Response<Body> {
        let store = self.store();
        let wanted = name.to_string();
        let Ok(Some(mut file)) = tokio::task::spawn_blocking(move || store.open(&wanted)).await
        else {
            return reply::envelope_error(
                StatusCode::NOT_FOUND,
                &format!("no snapshot named {}", quote(name)),
            );
        };
        reply::streamed_json(move |out| std::io::copy(&mut file, out).map(drop))
    }

    fn store(&self) -> snapshot::SnapshotStore {
        self.engine.snapshot_store()
    }
}

/// Answers an `OPTIONS` preflight: 204, with the CORS headers only for an allowed origin.
/// The headers allowed are those the browser asks for among [`CORS_HEADERS`].
fn preflight(methods: &[Method], cors: bool, headers: &HeaderMap) -> Response<Body> {
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
    let asked = headers
        .get(ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let granted: Vec<&str> = CORS_HEADERS
        .into_iter()
        .filter(|h| asked.split(',').any(|a| a.trim().eq_ignore_ascii_case(h)))
        .collect();
    let granted = if granted.is_empty() {
        CORS_HEADERS.join(", ")
    } else {
        granted.join(", ")
    };
    let h = res.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_METHODS, reply::header(&allow));
    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, reply::header(&granted));
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    res
}

/// The answer to a refused credential, and who asked for the log.
fn refused(refusal: Refusal) -> (Response<Body>, String) {
    match refusal {
        Refusal::Unauthorized(why) => {
            let mut res =
                reply::envelope_error(StatusCode::UNAUTHORIZED, &format!("unauthorized: {why}"));
            res.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            (res, format!("refused: {why}"))
        }
        Refusal::Forbidden(sub) => (
            reply::envelope_error(StatusCode::FORBIDDEN, "LLM admin privileges required"),
            format!("refused: {} (not an admin)", Caller::User(sub)),
        ),
    }
}

/// For a refused run (`refused:…`): what happened and how an operator forces it.
fn refusal_msg(report: &SyncReport) -> Option<String> {
    let kind = report.status.as_str().strip_prefix("refused:")?;
    let detail = report.detail.as_deref().unwrap_or("");
    let how = if detail.contains("--force") {
        ""
    } else {
        ". An operator forces it with `mapsync sync --delete-missing --force` or POST /sync?delete_missing=true&force=true"
    };
    let sep = if detail.is_empty() { "" } else { ": " };
    Some(format!(
        "sync refused ({kind}), nothing was changed{sep}{detail}{how}"
    ))
}

/// Whether `host` (a `Host` value) names this server: the address the client connected
/// to, `localhost` on any port, or one of `http.allowed_hosts` (an entry without a port
/// matches any port).
fn host_allowed(host: &str, local: SocketAddr, allowed_hosts: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let (name, port) = split_port(&host);
    if name == "localhost" {
        return true;
    }
    // A dual-stack socket sees an IPv4 client's address as ::ffff:a.b.c.d.
    let local_names = match local {
        SocketAddr::V4(a) => [Some(a.ip().to_string()), None],
        SocketAddr::V6(a) => [
            Some(format!("[{}]", a.ip())),
            a.ip().to_ipv4_mapped().map(|v4| v4.to_string()),
        ],
    };
    if local_names.iter().flatten().any(|n| *n == name) && port.unwrap_or(80) == local.port() {
        return true;
    }
    allowed_hosts
        .iter()
        .any(|a| *a == host || (split_port(a).1.is_none() && split_port(a).0 == name))
}

/// `Origin` is the origin of a page served from `host` (http or https, default ports
/// spelled or not).
fn same_origin(origin: &str, host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let origin = origin.trim().to_ascii_lowercase();
    let (authority, default_port) = if let Some(a) = origin.strip_prefix("http://") {
        (a, 80)
    } else if let Some(a) = origin.strip_prefix("https://") {
        (a, 443)
    } else {
        return false;
    };
    let (o_name, o_port) = split_port(authority);
    let (h_name, h_port) = split_port(&host);
    o_name == h_name && o_port.unwrap_or(default_port) == h_port.unwrap_or(default_port)
}

/// `name[:port]` → (name, port); IPv6 names keep their brackets.
fn split_port(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.is_empty() && (!name.contains(':') || name.ends_with(']')) => {
            match port.parse() {
                Ok(p) => (name, Some(p)),
                Err(_) => (host, None),
            }
        }
        _ => (host, None),
    }
}

/// The request declares a body: a `Content-Length` above 0, or `Transfer-Encoding`.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(hyper::header::TRANSFER_ENCODING)
        || headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().iter().any(|&b| b != b'0'))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn admin_page() -> Response<Body> {
    let mut res = reply::bytes(StatusCode::OK, "text/html; charset=utf-8", ADMIN_PAGE);
    res.headers_mut()
        .insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(ADMIN_CSP));
    res
}

/// A query string the port does not take: a 400 whose `msg` is this error's text. Values are
/// quoted (control characters escaped), so a message stays one line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum QueryError {
    #[error("malformed query: bad escape in {0}")]
    BadEscape(String),
    #[error("malformed query: not UTF-8")]
    NotUtf8,
    #[error("{key} must be true or false, not {value}")]
    NotBool { key: String, value: String },
    #[error("{key} must be a non-negative integer, not {value}")]
    NotNumber { key: String, value: String },
}

/// `delete_missing` and `force` from a query string; anything but true/false/1/0 is a 400.
fn sync_options(query: Option<&str>, default_delete: bool) -> Result<SyncOptions, QueryError> {
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
    fn parse(query: Option<&str>) -> Result<Query, QueryError> {
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

    fn flag(&self, key: &str) -> Result<Option<bool>, QueryError> {
        match self.get(key) {
            None => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(other) => Err(QueryError::NotBool {
                key: key.into(),
                value: quote(other),
            }),
        }
    }

    fn number(&self, key: &str, default: usize) -> Result<usize, QueryError> {
        match self.get(key) {
            None | Some("") => Ok(default),
            Some(v) => v.parse().map_err(|_| QueryError::NotNumber {
                key: key.into(),
                value: quote(v),
            }),
        }
    }
}

/// Percent-decoding (`+` as space), rejecting malformed escapes and invalid UTF-8.
fn decode(s: &str) -> Result<String, QueryError> {
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
                    .ok_or_else(|| QueryError::BadEscape(quote(s)))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

/// A page of `/mappings`.
#[derive(Serialize)]
struct Page<'a> {
    total: usize,
    offset: usize,
    limit: usize,
    items: Vec<mapping::View<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins() {
        let local: SocketAddr = "127.0.0.1:9187".parse().unwrap();
        let allowed = [
            "app.example.com".to_string(),
            "ops.example.com:8443".to_string(),
        ];
        for ok in [
            "127.0.0.1:9187",
            "localhost",
            "LocalHost:1234",
            "app.example.com",
            "app.example.com:9999",
            "ops.example.com:8443",
        ] {
            assert!(host_allowed(ok, local, &allowed), "{ok}");
        }
        for no in [
            "127.0.0.1",
            "127.0.0.1:80",
            "evil.example:9187",
            "ops.example.com",
            "app.example.com.evil",
            "",
        ] {
            assert!(!host_allowed(no, local, &allowed), "{no}");
        }
        let dual: SocketAddr = "[::ffff:127.0.0.1]:9187".parse().unwrap();
        assert!(host_allowed("127.0.0.1:9187", dual, &[]));
        assert!(host_allowed("[::ffff:127.0.0.1]:9187", dual, &[]));
        assert!(same_origin("http://127.0.0.1:9187", "127.0.0.1:9187"));
        assert!(same_origin("https://app.example.com", "app.example.com"));
        assert!(same_origin(
            "https://app.example.com",
            "app.example.com:443"
        ));
        assert!(!same_origin(
            "http://app.example.com",
            "app.example.com:443"
        ));
        assert!(!same_origin("null", "127.0.0.1:9187"));
        assert!(!same_origin("http://127.0.0.1:9188", "127.0.0.1:9187"));
        assert_eq!(split_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
    }

    #[test]
    fn a_refusal_says_what_happened_and_how_to_force_it() {
        let mut report = SyncReport::skipped(crate::sync::Trigger::Manual);
        assert_eq!(refusal_msg(&report), None);
        report.status = crate::sync::SyncStatus::RefusedMassDelete;
        let msg = refusal_msg(&report).unwrap();
        assert!(
            msg.contains("mass_delete") && msg.contains("--force"),
            "{msg}"
        );
        report.detail = Some("would delete 9 of 10 remote rows: pass --force".into());
        let msg = refusal_msg(&report).unwrap();
        assert_eq!(
            msg,
            "sync refused (mass_delete), nothing was changed: would delete 9 of 10 remote rows: pass --force"
        );
    }

    #[test]
    fn queries_are_decoded_and_flags_checked() {
        let q = Query::parse(Some("q=gpt%2D4o+mini&delete_missing=true&force=0")).unwrap();
        assert_eq!(q.get("q"), Some("gpt-4o mini"));
        assert_eq!(q.flag("delete_missing"), Ok(Some(true)));
        assert_eq!(q.flag("force"), Ok(Some(false)));
        assert_eq!(q.flag("absent"), Ok(None));
        let bad = Query::parse(Some("force=maybe")).unwrap();
        assert_eq!(
            bad.flag("force").unwrap_err().to_string(),
            "force must be true or false, not `maybe`"
        );
        assert!(Query::parse(Some("q=%zz")).is_err());
        assert!(Query::parse(Some("q=%ff")).is_err());
    }
}
