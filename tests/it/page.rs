//! The application's mapping page against mapsync (issue 10, SPEC §4): its login tokens
//! (JWTs minted here with a test secret and a test ES256 key), and its exact requests sent
//! through a real nginx configured by `deploy/nginx/mapsync.conf` in front of the real
//! binary, with a real PostgreSQL behind.
//!
//! What the page needs (NOTES, "The application's mapping page"): every call carries
//! `Authorization: Bearer <the user's login JWT>` and `X-Request-Id: <uuid>`, JSON bodies
//! with `Content-Type: application/json`; any 401 logs its user out; any `code` other than
//! 200 is an error whose `msg` it shows; `data.status` (or `data.push.status`) starting with
//! `skipped:` means "not configured". Its buttons send:
//! - "Sync to Supabase": `POST /api/v1/llm/model-groups/sync` `{"direction":"push",
//!   "overwrite":false,"delete_missing":false}` (older builds: `POST …/sync-to-supabase`,
//!   no body);
//! - "Overwrite Supabase": `{"direction":"push","overwrite":false,"delete_missing":true}`;
//! - "Pull from Supabase": `{"direction":"pull","overwrite":true,"delete_missing":false}`.

use std::net::SocketAddr;

use crate::harness::daemon::Daemon;
use crate::harness::http::{self, Reply};
use crate::harness::jwt::{self, Keys, at, claims};
use crate::harness::nginx::Nginx;
use crate::harness::workspace::{Workspace, remote_count, supabase_db};
use crate::harness::*;
use serde_json::{Value, json};

const PUSH_PATH: &str = "/api/v1/llm/model-groups/sync";
const COMPAT_PATH: &str = "/api/v1/llm/model-groups/sync-to-supabase";
const TOKEN: &str = "page-admin-token-SECRET";
const APP_HOST: &str = "app.example.com";

/// `[http]` accepting the test's login tokens (and the admin token).
fn http_section(keys: &Keys, extra: &str) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\njwt_secret_file = {:?}\n\
         jwt_jwks_file = {:?}\njwt_issuer = \"{}\"\n{extra}\n",
        keys.secret_file,
        keys.jwks_file,
        jwt::ISSUER
    )
}

/// `POST path` as the page sends it, with `bearer` as the login token.
fn page_post(addr: SocketAddr, host: &str, path: &str, bearer: &str, body: &[u8]) -> Reply {
    let authz = format!("Bearer {bearer}");
    let origin = format!("http://{host}");
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nAuthorization: {authz}\r\n\
         X-Request-Id: 0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d\r\nAccept: application/json, text/plain, */*\r\n\
         Connection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        raw.push_str("Content-Type: application/json\r\n");
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    http::send_raw(addr, &bytes).expect("an answer")
}

/// The envelope's `code` and `msg`, after checking HTTP status = code.
#[track_caller]
fn envelope(r: &Reply, code: u16) -> Value {
    assert_eq!(r.status, code, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], code, "{v}");
    let msg = v["msg"].as_str().expect("msg");
    assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
    v
}

#[track_caller]
fn unauthorized(r: &Reply, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
    assert_eq!(r.json()["code"], 401, "{what}");
}

#[test]
fn login_tokens_are_accepted_by_the_applications_admin_rules_and_nothing_else() {
    let ws = Workspace::new(None, "");
    for r in Row::numbered("m", 3) {
        ws.app.upsert(&r);
    }
    let keys = Keys::generate(ws.path());
    let d = Daemon::start(&ws, None, &http_section(&keys, ""));
    d.wait_first_run();
    let host = d.addr.to_string();
    let call = |bearer: &str| page_post(d.addr, &host, COMPAT_PATH, bearer, b"");

    // An admin by each of the application's rules, HS256 and ES256 alike → 200.
    let rules = [
        json!({"app_metadata": {"dashboard_role": "admin"}}),
        json!({"app_metadata": {"dashboard_role": "manager"}}),
        json!({"user_metadata": {"is_admin": true}}),
        json!({"app_metadata": {"is_admin": true}}),
        json!({"app_metadata": {"role": "admin"}}),
        json!({"role": "admin", "app_metadata": {}}),
    ];
    for rule in &rules {
        let c = claims("admin-user", rule.clone());
        for token in [
            keys.hs256(&c),
            keys.es256(&c, Some(jwt::KID)),
            keys.es256(&c, None),
        ] {
            let r = call(&token);
            let v = envelope(&r, 200);
            assert_eq!(
                v["data"]["status"], "skipped:supabase_not_configured",
                "{rule}"
            );
        }
    }
    // Within the 30 s leeway.
    let c = claims("admin-user", json!({"role": "admin", "exp": at(-10)}));
    envelope(&call(&keys.hs256(&c)), 200);
    // The admin token still works.
    envelope(&call(TOKEN), 200);

    // A plain user: 403 with the application's message (and the page does not log out).
    let user = claims("plain-user", json!({}));
    for token in [keys.hs256(&user), keys.es256(&user, Some(jwt::KID))] {
        let r = call(&token);
        assert_eq!(
            r.json(),
            json!({"code": 403, "msg": "LLM admin privileges required", "data": null})
        );
        assert_eq!(r.status, 403);
    }

    // Everything else: 401 with WWW-Authenticate.
    let admin = jwt::admin("admin-user");
    let with = |extra: Value| {
        let mut c = admin.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let other_dir = tempfile::tempdir().unwrap();
    let other_keys = Keys::generate(other_dir.path());
    let no_iat = claims("admin-user", json!({"role": "admin", "iat": null}));
    let no_sub = claims("admin-user", json!({"role": "admin", "sub": null}));
    let no_exp = claims("admin-user", json!({"role": "admin", "exp": null}));
    let jwk_text = keys.jwk.to_string();
    let cases: Vec<(&str, String)> = vec![
        ("expired", keys.hs256(&with(json!({"exp": at(-120)})))),
        (
            "expired ES256",
            keys.es256(&with(json!({"exp": at(-120)})), Some(jwt::KID)),
        ),
        ("wrong audience", keys.hs256(&with(json!({"aud": "anon"})))),
        (
            "wrong issuer",
            keys.hs256(&with(json!({"iss": "https://evil.example/auth/v1"}))),
        ),
        (
            "bad HS256 signature",
            jwt::hs256_with(b"not-the-secret", &admin),
        ),
        (
            "bad ES256 signature",
            other_keys.es256(&admin, Some(jwt::KID)),
        ),
        ("unknown kid", keys.es256(&admin, Some("another-key"))),
        ("alg none", jwt::unsigned(&admin)),
        (
            "HS256 signed with the public key (PEM)",
            jwt::hs256_with(keys.public_pem.as_bytes(), &admin),
        ),
        (
            "HS256 signed with the public key (DER)",
            jwt::hs256_with(&keys.public_der, &admin),
        ),
        (
            "HS256 signed with the public key (JWK)",
            jwt::hs256_with(jwk_text.as_bytes(), &admin),
        ),
        ("no iat", keys.hs256(&no_iat)),
        ("no sub", keys.hs256(&no_sub)),
        ("no exp", keys.hs256(&no_exp)),
        ("not yet valid", keys.hs256(&with(json!({"nbf": at(3600)})))),
        ("garbage", "not.a.token".into()),
        ("empty", String::new()),
    ];
    for (what, token) in &cases {
        unauthorized(&call(token), what);
    }
    // No Authorization at all.
    let r = http::post(d.addr, COMPAT_PATH, None, b"");
    unauthorized(&r, "no credential");
    // Nothing secret in the log.
    let log = d.log();
    assert!(!log.contains(&keys.secret) && !log.contains(TOKEN));
    assert!(
        !cases
            .iter()
            .any(|(_, t)| t.len() > 20 && log.contains(t.as_str()))
    );
    assert!(
        log.contains("jwt sub=`admin-user`"),
        "the audit log names the JWT's sub"
    );
}

#[test]
fn a_jwt_issuer_is_only_checked_when_set_and_the_audience_is_configurable() {
    let ws = Workspace::new(None, "");
    ws.app.upsert(&Row::mapping("one", "gpt-4o"));
    let keys = Keys::generate(ws.path());
    let section = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\njwt_secret_file = {:?}\njwt_audience = \"000123\"\n",
        keys.secret_file
    );
    let d = TestApp::spawn(&ws, None, &section);
    d.wait_first_run();
    let host = d.addr.to_string();
    let mut c = jwt::admin("someone");
    c["iss"] = json!("https://anything.example");
    c["aud"] = json!("000123");
    envelope(
        &page_post(d.addr, &host, COMPAT_PATH, &keys.hs256(&c), b""),
        200,
    );
    c["aud"] = json!("authenticated");
    unauthorized(
        &page_post(d.addr, &host, COMPAT_PATH, &keys.hs256(&c), b""),
        "audience 000123 expected",
    );
}

#[test]
fn rs256_and_es256_tokens_are_each_checked_with_a_key_of_their_own_type() {
    let ws = Workspace::new(None, "");
    ws.app.upsert(&Row::mapping("one", "gpt-4o"));
    let keys = Keys::generate(ws.path());
    let section = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\njwt_jwks_file = {:?}\n",
        keys.both_jwks_file
    );
    let d = TestApp::spawn(&ws, None, &section);
    d.wait_first_run();
    let host = d.addr.to_string();
    let call = |t: &str| page_post(d.addr, &host, COMPAT_PATH, t, b"");
    let admin = jwt::admin("rsa-admin");
    envelope(&call(&keys.rs256(&admin, jwt::RSA_KID)), 200);
    envelope(&call(&keys.es256(&admin, Some(jwt::KID))), 200);
    // A token naming the other type's key, or no key when there are two: refused.
    unauthorized(
        &call(&keys.rs256(&admin, jwt::KID)),
        "RS256 naming the EC key",
    );
    unauthorized(
        &call(&keys.es256(&admin, Some(jwt::RSA_KID))),
        "ES256 naming the RSA key",
    );
    unauthorized(&call(&keys.es256(&admin, None)), "no kid among two keys");
    // No HS256 secret is configured: an HS256 token is refused, whatever signed it.
    unauthorized(&call(&keys.hs256(&admin)), "HS256 without a secret");
    unauthorized(
        &call(&jwt::hs256_with(keys.public_pem.as_bytes(), &admin)),
        "HS256 signed with the public key",
    );
    let user = claims("rsa-user", json!({}));
    assert_eq!(call(&keys.rs256(&user, jwt::RSA_KID)).status, 403);
}

#[test]
fn the_pages_requests_through_nginx_get_the_envelopes_it_expects() {
    crate::harness::nginx::nginx_path(); // fails with the install command before anything starts
    let db = supabase_db();
    let ws = Workspace::new(Some(&db.url), "");
    for r in Row::numbered("m", 13) {
        ws.app.upsert(&r);
    }
    ws.mapsync(&["migrate"]).expect_code(0);
    let keys = Keys::generate(ws.path());
    let d = Daemon::start(
        &ws,
        Some(&db.url),
        &format!(
            "[schedule]\nreconcile = \"0 0 0 1 1 *\"\n\n[watch]\ndebounce_ms = 600000\nmax_delay_ms = 600000\n\n{}",
            http_section(&keys, &format!("allowed_hosts = [\"{APP_HOST}\"]"))
        ),
    );
    let first = d.wait_first_run();
    assert_eq!(first["last_run"]["status"], "synced", "{first}");
    // A stand-in for the application behind the same nginx.
    let app = http::StubServer::start(
        "application/json",
        r#"{"code":200,"msg":"from the application","data":null}"#,
    );
    let nginx = Nginx::start(d.addr, app.addr);
    // The browser's Host: the page's origin, on nginx's port.
    let host = format!("{APP_HOST}:{}", nginx.addr.port());
    let admin = keys.es256(&jwt::admin("page-admin"), Some(jwt::KID));
    let user = keys.hs256(&claims("page-user", json!({})));
    let post = |path: &str, bearer: &str, body: &str| {
        page_post(nginx.addr, &host, path, bearer, body.as_bytes())
    };

    // "Sync to Supabase": synced, with the page's request id echoed.
    let r = post(
        PUSH_PATH,
        &admin,
        r#"{"direction":"push","overwrite":false,"delete_missing":false}"#,
    );
    let v = envelope(&r, 200);
    assert_eq!(v["msg"], "ok");
    assert_eq!(v["data"]["push"]["status"], "synced", "{v}");
    assert_eq!(v["data"]["push"]["synced_count"], 13, "{v}");
    assert_eq!(
        r.header("x-request-id"),
        Some("0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"),
        "the page's X-Request-Id comes back through nginx"
    );
    let r = post(COMPAT_PATH, &admin, "");
    assert_eq!(envelope(&r, 200)["data"]["status"], "synced");

    // "Overwrite Supabase" after 12 of 13 mappings were deleted: refused, 409, and a msg
    // the page shows.
    for i in 0..12 {
        ws.app.delete(&format!("mapping:m{i:03}"));
    }
    let r = post(
        PUSH_PATH,
        &admin,
        r#"{"direction":"push","overwrite":false,"delete_missing":true}"#,
    );
    let v = envelope(&r, 409);
    assert_eq!(v["data"]["push"]["status"], "refused:mass_delete", "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("would delete 12 of 13") && msg.contains("force"),
        "{msg}"
    );
    assert_eq!(remote_count(&db), 13, "nothing was deleted");

    // "Pull from Supabase": a 400 that says why.
    let r = post(
        PUSH_PATH,
        &admin,
        r#"{"direction":"pull","overwrite":true,"delete_missing":false}"#,
    );
    let msg = envelope(&r, 400)["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("one way") && msg.contains("application"),
        "{msg}"
    );

    // A user who is not an admin: 403, the page stays logged in.
    let r = post(PUSH_PATH, &user, r#"{"direction":"push"}"#);
    assert_eq!(
        r.json(),
        json!({"code": 403, "msg": "LLM admin privileges required", "data": null})
    );
    // An expired token: 401 with WWW-Authenticate (the page logs out, as it should).
    let expired = keys.hs256(&jwt::claims(
        "page-admin",
        json!({"role": "admin", "exp": at(-3600)}),
    ));
    unauthorized(&post(COMPAT_PATH, &expired, ""), "expired, through nginx");

    // The export, through the proxy, is the download.
    let authz = format!("Bearer {admin}");
    let r = http::send_raw(
        nginx.addr,
        format!(
            "GET /export HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authz}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("an answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-disposition")
            .is_some_and(|c| c.starts_with("attachment; filename=\"model-mappings-")),
        "{:?}",
        r.headers
    );
    // Everything else is the application's.
    let r = http::send_raw(
        nginx.addr,
        format!(
            "GET /api/v1/llm/model-groups HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("an answer");
    assert_eq!(r.json()["msg"], "from the application", "{}", r.text());

    // Without a target the page is told "not configured" (skipped), through the proxy.
    drop(nginx);
    let ws2 = Workspace::new(None, "");
    ws2.app.upsert(&Row::mapping("solo", "gpt-4o"));
    let d2 = Daemon::start(
        &ws2,
        None,
        &http_section(&keys, &format!("allowed_hosts = [\"{APP_HOST}\"]")),
    );
    d2.wait_first_run();
    let nginx = Nginx::start(d2.addr, app.addr);
    let host = format!("{APP_HOST}:{}", nginx.addr.port());
    let r = page_post(
        nginx.addr,
        &host,
        PUSH_PATH,
        &admin,
        br#"{"direction":"push","overwrite":false,"delete_missing":false}"#,
    );
    let v = envelope(&r, 200);
    assert_eq!(
        v["data"]["push"]["status"], "skipped:supabase_not_configured",
        "{v}"
    );
    assert!(!d.log().contains(&admin) && !d2.log().contains(&admin));
}
