//! The HTTP token layer end to end: real PostgreSQL primary and replicas,
//! two instances of the example axum app, and an HTTP client that shares
//! nothing with them but the token cookie or header.
#![cfg(feature = "http")]

#[allow(dead_code)]
#[path = "../examples/axum_app.rs"]
mod app;
mod common;

use common::init_tracing;

use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Path};
use axum::routing::{get, post};
use lagrouter::http::{ConsistencyTokenLayer, TokenCell};
use lagrouter::{Cluster, ConsistencyToken, Lsn};
use lagrouter_testing::PgCluster;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, HeaderMap, SET_COOKIE};

/// Generous deadline for conditions that normally hold within milliseconds.
const DEADLINE: Duration = Duration::from_secs(30);
/// Replicas replay each commit this long after it happened.
const APPLY_DELAY: Duration = Duration::from_millis(50);
const TOKEN_HEADER: &str = "x-lagrouter-token";
const SYSID: u64 = 7_000_000_000_000_000_007;

/// A primary and `replicas` replicas with the app's schema, replaying with
/// an apply delay (so that a read without a token right after a write is
/// stale on every replica).
async fn start_pg(replicas: usize) -> PgCluster {
    init_tracing();
    let pg = PgCluster::start(replicas).await.expect("start PostgreSQL");
    pg.connect(pg.primary())
        .await
        .expect("connect to primary")
        .batch_execute(app::SCHEMA)
        .await
        .expect("create schema");
    pg.wait_caught_up(DEADLINE)
        .await
        .expect("replicas catch up");
    for r in pg.replicas() {
        pg.set_apply_delay(r, APPLY_DELAY)
            .await
            .expect("set apply delay");
    }
    pg
}

/// A separate lagrouter cluster (own pools and monitor) over `pg`, as
/// another service instance would build it; returns once every node is
/// healthy and the cluster identity is known.
async fn instance_cluster(pg: &PgCluster) -> Cluster {
    let cluster = app::connect(pg).await.expect("build cluster");
    let ready = cluster
        .monitor()
        .wait_for(DEADLINE, |t| {
            t.cluster.is_some() && t.nodes.iter().all(|n| n.healthy)
        })
        .await;
    assert!(
        ready.is_some(),
        "cluster not ready: {:#?}",
        cluster.topology()
    );
    cluster
}

/// Serves `router` on an OS-assigned loopback port; returns its base URL.
/// The server task ends with the test's runtime.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    format!("http://{addr}")
}

fn client(cookies: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(cookies)
        .timeout(DEADLINE)
        .build()
        .expect("HTTP client")
}

async fn post_item(client: &reqwest::Client, base: &str, body: &str) -> (i64, HeaderMap) {
    post_item_with(client, base, body, &[]).await
}

async fn post_item_with(
    client: &reqwest::Client,
    base: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (i64, HeaderMap) {
    let mut req = client.post(format!("{base}/items")).body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("POST /items");
    assert_eq!(res.status(), StatusCode::CREATED);
    let headers = res.headers().clone();
    let id = res.text().await.expect("body").parse().expect("numeric id");
    (id, headers)
}

/// `GET /items/{id}`: status, `x-served-by`, body, response headers.
async fn get_item(
    client: &reqwest::Client,
    base: &str,
    id: i64,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String, HeaderMap) {
    let mut req = client.get(format!("{base}/items/{id}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("GET /items/{id}");
    let status = res.status();
    let served = res
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let headers = res.headers().clone();
    let body = res.text().await.expect("body");
    (status, served, body, headers)
}

/// The value of our `Set-Cookie`, if any.
fn token_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("lagrouter_token="))
        .map(|c| c.split(';').next().unwrap_or("").to_string())
}

async fn pause_replicas(pg: &PgCluster) {
    for r in pg.replicas() {
        pg.pause_replay(r).await.expect("pause replay");
    }
}

async fn resume_replicas(pg: &PgCluster) {
    for r in pg.replicas() {
        pg.resume_replay(r).await.expect("resume replay");
    }
}

/// A token of the cluster that issued `genuine`, far ahead of anything the
/// cluster will reach: a read carrying it can only be served by the primary
/// (after waiting in vain for a replica).
fn far_future(genuine: &ConsistencyToken) -> ConsistencyToken {
    ConsistencyToken::new(
        Lsn(u64::MAX / 2),
        genuine.cluster.system_identifier,
        genuine.cluster.timeline,
    )
}

/// The consistency token inside a (possibly signed) wire form.
fn token_of(wire: &str) -> ConsistencyToken {
    let text = match wire.match_indices('.').nth(1) {
        Some((i, _)) => &wire[..i],
        None => wire,
    };
    text.parse().expect("a token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_carries_read_your_writes_across_instances() {
    let pg = start_pg(2).await;
    let a = serve(app::app(instance_cluster(&pg).await)).await;
    let b = serve(app::app(instance_cluster(&pg).await)).await;

    // A browser-like client: the cookie jar is all it shares between the
    // instances (cookies are per host, not per port).
    let browser = client(true);
    let no_cookies = client(false);
    let (mut stale_without_token, mut by_replica) = (0, 0);
    for i in 0..100 {
        let body = format!("item {i}");
        let (id, headers) = post_item(&browser, &a, &body).await;
        assert!(token_cookie(&headers).is_some(), "POST set no token cookie");
        if i % 10 == 0 {
            // Control: the same read without the token is stale, which is
            // what the token has to prevent.
            let (status, _, _, _) = get_item(&no_cookies, &b, id, &[]).await;
            if status == StatusCode::NOT_FOUND {
                stale_without_token += 1;
            }
        }
        let (status, served, got, _) = get_item(&browser, &b, id, &[]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "stale read at iteration {i}: item {id} not found on instance B (served by {served})"
        );
        assert_eq!(got, body);
        if served == "replica" {
            by_replica += 1;
        }
    }
    lagrouter_testing::report(format_args!(
        "100 reads after writes: {by_replica} by replicas; controls without token: {stale_without_token}/10 stale"
    ));
    assert!(
        stale_without_token > 0,
        "reads without a token were never stale: the test cannot tell whether the token works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_carries_read_your_writes_across_instances() {
    let pg = start_pg(1).await;
    let layer = || ConsistencyTokenLayer::new().write_cookie(false);
    let a = serve(app::app_with_layer(instance_cluster(&pg).await, layer())).await;
    let b = serve(app::app_with_layer(instance_cluster(&pg).await, layer())).await;
    let http = client(false);

    let mut token: Option<String> = None;
    for i in 0..20 {
        let body = format!("header item {i}");
        let sent: Vec<(&str, &str)> = token.iter().map(|t| (TOKEN_HEADER, t.as_str())).collect();
        let (id, headers) = post_item_with(&http, &a, &body, &sent).await;
        assert!(
            headers.get(SET_COOKIE).is_none(),
            "cookie written although disabled"
        );
        let wire = headers
            .get(TOKEN_HEADER)
            .expect("POST returns the new token in the header")
            .to_str()
            .expect("ASCII token")
            .to_string();
        let written = token_of(&wire);
        if let Some(previous) = &token {
            assert!(written.lsn > token_of(previous).lsn, "token went back");
        }
        let (status, served, got, headers) =
            get_item(&http, &b, id, &[(TOKEN_HEADER, wire.as_str())]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "stale read of {id} (served by {served})"
        );
        assert_eq!(got, body);
        // A newer position (the replica's) comes back only if it changed.
        token = Some(match headers.get(TOKEN_HEADER) {
            Some(v) => {
                let newer = v.to_str().expect("ASCII token").to_string();
                assert!(token_of(&newer).lsn > written.lsn);
                newer
            }
            None => wire,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_without_recent_writes_use_replicas_and_bad_tokens_are_ignored() {
    let pg = start_pg(2).await;
    let a = serve(app::app(instance_cluster(&pg).await)).await;
    let b = serve(app::app(instance_cluster(&pg).await)).await;

    let writer = client(true);
    let (id, headers) = post_item(&writer, &a, "old news").await;
    assert!(token_cookie(&headers).is_some());
    pg.wait_caught_up(DEADLINE)
        .await
        .expect("replicas catch up");

    // Fresh visitors without a token: replicas serve them.
    let mut by_replica = 0;
    for _ in 0..20 {
        let (status, served, got, headers) = get_item(&client(false), &b, id, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got, "old news");
        assert!(
            served == "replica" || served == "primary",
            "bad x-served-by {served:?}"
        );
        if served == "replica" {
            by_replica += 1;
        }
        // Monotonic reads: a read hands out the position it saw, too.
        assert!(token_cookie(&headers).is_some());
    }
    assert!(
        by_replica >= 15,
        "only {by_replica}/20 reads without a token used a replica"
    );

    // With replay paused, a token of a new write can only be honoured by
    // the primary: a read carrying it waits for the replicas in vain and
    // falls back. So "served by replica" below means "token ignored".
    pause_replicas(&pg).await;
    let (_, headers) = post_item(&writer, &a, "newer").await;
    let ahead = token_of(&token_cookie(&headers).expect("token cookie"));
    let (status, served, _, _) = get_item(
        &client(false),
        &b,
        id,
        &[("cookie", &format!("lagrouter_token={ahead}"))],
    )
    .await;
    assert_eq!((status, served.as_str()), (StatusCode::OK, "primary"));

    // Garbage and foreign tokens are ignored: 200 from a replica.
    let foreign = ConsistencyToken::new(
        ahead.lsn,
        ahead.cluster.system_identifier ^ 1,
        ahead.cluster.timeline,
    )
    .to_string();
    let bad_cookies = [
        "lagrouter_token=garbage".to_string(),
        "lagrouter_token=v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string(),
        "lagrouter_token=%7F%01; other=1".to_string(),
        format!("lagrouter_token={}", "x".repeat(3000)),
        format!("lagrouter_token={foreign}"),
    ];
    for cookie in &bad_cookies {
        let (status, served, got, headers) =
            get_item(&client(false), &b, id, &[("cookie", cookie)]).await;
        assert_eq!(status, StatusCode::OK, "{cookie:.40}");
        assert_eq!(got, "old news");
        assert_eq!(served, "replica", "{cookie:.40} was not ignored");
        // The bad cookie is replaced by a genuine token.
        let fresh = token_of(&token_cookie(&headers).expect("token cookie"));
        assert_eq!(fresh.cluster, ahead.cluster);
    }
    for header in ["garbage", "v9.AAAA", foreign.as_str()] {
        let (status, served, _, _) =
            get_item(&client(false), &b, id, &[(TOKEN_HEADER, header)]).await;
        assert_eq!(status, StatusCode::OK, "{header}");
        assert_eq!(served, "replica", "{header} was not ignored");
    }

    // A token of this cluster from the future (forged, or its writes lost in
    // a failover) makes the primary answer TokenAhead; the app forgets it
    // and answers from current data instead of failing.
    let future = far_future(&ahead);
    let (status, _, got, headers) = get_item(
        &client(false),
        &b,
        id,
        &[("cookie", &format!("lagrouter_token={future}"))],
    )
    .await;
    assert_eq!((status, got.as_str()), (StatusCode::OK, "old news"));
    let replaced = token_of(&token_cookie(&headers).expect("token cookie"));
    assert!(replaced.lsn < future.lsn);
    resume_replicas(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_tokens_carry_across_instances_and_forgeries_are_ignored() {
    let pg = start_pg(1).await;
    let key = b"0123456789abcdef0123456789abcdef";
    let layer = |c: &Cluster| {
        ConsistencyTokenLayer::new()
            .cluster(c.clone())
            .signing_key(key)
    };
    let ca = instance_cluster(&pg).await;
    let cb = instance_cluster(&pg).await;
    let a = serve(app::app_with_layer(ca.clone(), layer(&ca))).await;
    let b = serve(app::app_with_layer(cb.clone(), layer(&cb))).await;

    let browser = client(true);
    let mut last_wire = String::new();
    for i in 0..20 {
        let body = format!("signed {i}");
        let (id, headers) = post_item(&browser, &a, &body).await;
        last_wire = token_cookie(&headers).expect("token cookie");
        assert_eq!(
            last_wire.split('.').count(),
            3,
            "unsigned cookie {last_wire}"
        );
        let (status, served, got, _) = get_item(&browser, &b, id, &[]).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "stale read of {id} (served by {served})"
        );
        assert_eq!(got, body);
    }

    let (id, _) = post_item(&client(false), &a, "target").await;
    pg.wait_caught_up(DEADLINE)
        .await
        .expect("replicas catch up");
    // As above: with replay paused, only the primary can honour a new token.
    pause_replicas(&pg).await;
    let (_, headers) = post_item(&browser, &a, "newer").await;
    let genuine = token_cookie(&headers).expect("token cookie");
    let (token, signature) = genuine.rsplit_once('.').expect("signed");
    let (status, served, _, _) = get_item(
        &client(false),
        &b,
        id,
        &[("cookie", &format!("lagrouter_token={genuine}"))],
    )
    .await;
    assert_eq!((status, served.as_str()), (StatusCode::OK, "primary"));

    let mut flipped = signature.as_bytes().to_vec();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).expect("ASCII");
    let t = token_of(token);
    let nearby = ConsistencyToken::new(
        Lsn(t.lsn.0 - 1),
        t.cluster.system_identifier,
        t.cluster.timeline,
    );
    let forgeries = [
        // Unsigned.
        token.to_string(),
        // Tampered signature.
        format!("{token}.{flipped}"),
        // Another token's signature.
        format!(
            "{token}.{}",
            last_wire.rsplit('.').next().expect("signature")
        ),
        // This token's signature on another token.
        format!("{nearby}.{signature}"),
        // Signed with another key.
        ConsistencyTokenLayer::new()
            .signing_key(b"not the key")
            .encode(&t),
        // Empty, garbage and truncated signatures.
        format!("{token}."),
        format!("{token}.!!!!"),
        format!("{token}.{}", &signature[..10]),
    ];
    for forged in &forgeries {
        let cookie = format!("lagrouter_token={forged}");
        let (status, served, _, headers) =
            get_item(&client(false), &b, id, &[("cookie", &cookie)]).await;
        assert_eq!(status, StatusCode::OK, "{cookie}");
        assert_eq!(served, "replica", "forged token {forged} was not ignored");
        // The read hands out a genuine, signed token instead.
        let fresh = token_cookie(&headers).expect("token cookie");
        assert_eq!(fresh.split('.').count(), 3, "{fresh}");
        assert_ne!(fresh, genuine);
    }
    resume_replicas(&pg).await;
}

// ---------------------------------------------------------------------------
// The layer alone, over HTTP, without a database.

/// `GET /echo` returns the token the handler sees (`none` if none);
/// `POST /bump/{lsn}` moves the request's token to `lsn`.
fn echo_app(layer: ConsistencyTokenLayer) -> Router {
    Router::new()
        .route(
            "/echo",
            get(|Extension(cell): Extension<TokenCell>| async move {
                cell.get()
                    .map_or_else(|| "none".to_string(), |t| t.to_string())
            }),
        )
        .route(
            "/bump/{lsn}",
            post(
                |Extension(cell): Extension<TokenCell>, Path(lsn): Path<u64>| async move {
                    cell.observe(Some(ConsistencyToken::new(Lsn(lsn), SYSID, 1)));
                    "ok"
                },
            ),
        )
        .layer(layer)
}

async fn echo(base: &str, headers: &[(&str, &str)]) -> (StatusCode, String, HeaderMap) {
    let mut req = client(false).get(format!("{base}/echo"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("GET /echo");
    let (status, headers) = (res.status(), res.headers().clone());
    (status, res.text().await.expect("body"), headers)
}

async fn bump(base: &str, lsn: u64, headers: &[(&str, &str)]) -> HeaderMap {
    let mut req = client(false).post(format!("{base}/bump/{lsn}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("POST /bump");
    assert_eq!(res.status(), StatusCode::OK);
    res.headers().clone()
}

fn tok(lsn: u64) -> ConsistencyToken {
    ConsistencyToken::new(Lsn(lsn), SYSID, 1)
}

#[tokio::test]
async fn garbage_cookie_and_header_are_ignored() {
    let base = serve(echo_app(ConsistencyTokenLayer::new())).await;
    let long = "A".repeat(4000);
    for bad in [
        "garbage",
        "v1.",
        "v1.!!!!",
        "v7.AAAA",
        "v1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        long.as_str(),
    ] {
        let cookie = format!("a=b; lagrouter_token={bad}; c=d");
        let (status, seen, headers) =
            echo(&base, &[("cookie", &cookie), (TOKEN_HEADER, bad)]).await;
        assert_eq!(status, StatusCode::OK, "{bad:.40}");
        assert_eq!(seen, "none", "{bad:.40}");
        assert!(headers.get(SET_COOKIE).is_none());
        assert!(headers.get(TOKEN_HEADER).is_none());
    }
    // A valid token next to garbage is still used.
    let good = tok(77).to_string();
    let cookie = format!("lagrouter_token=garbage; lagrouter_token={good}");
    let (_, seen, _) = echo(&base, &[("cookie", &cookie)]).await;
    assert_eq!(seen, good);
    // Non-UTF-8 cookie bytes.
    let res = client(false)
        .get(format!("{base}/echo"))
        .header(
            COOKIE,
            reqwest::header::HeaderValue::from_bytes(b"lagrouter_token=\xff\xfe").unwrap(),
        )
        .send()
        .await
        .expect("GET /echo");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), "none");
}

#[tokio::test]
async fn token_header_round_trip() {
    let base = serve(echo_app(ConsistencyTokenLayer::new())).await;
    // Out: a handler that produces a token sends it in the header.
    let headers = bump(&base, 1000, &[]).await;
    let wire = headers[TOKEN_HEADER].to_str().unwrap().to_string();
    assert_eq!(wire.parse::<ConsistencyToken>().unwrap(), tok(1000));
    // In: the next request's handler sees it.
    let (_, seen, headers) = echo(&base, &[(TOKEN_HEADER, &wire)]).await;
    assert_eq!(seen, wire);
    assert!(
        headers.get(TOKEN_HEADER).is_none(),
        "unchanged token resent"
    );
    // Older than the client's: nothing changes, nothing is sent.
    let headers = bump(&base, 10, &[(TOKEN_HEADER, &wire)]).await;
    assert!(headers.get(TOKEN_HEADER).is_none());
    assert!(headers.get(SET_COOKIE).is_none());
    // Newer: sent back.
    let headers = bump(&base, 2000, &[(TOKEN_HEADER, &wire)]).await;
    assert_eq!(headers[TOKEN_HEADER], tok(2000).to_string().as_str());

    // A custom header name.
    let base = serve(echo_app(
        ConsistencyTokenLayer::new().header_name(reqwest::header::HeaderName::from_static("x-rw")),
    ))
    .await;
    let headers = bump(&base, 5, &[]).await;
    assert!(headers.get(TOKEN_HEADER).is_none());
    let wire = headers["x-rw"].to_str().unwrap().to_string();
    let (_, seen, _) = echo(&base, &[("x-rw", &wire)]).await;
    assert_eq!(seen, wire);
}

#[tokio::test]
async fn cookie_attributes_are_set() {
    let base = serve(echo_app(ConsistencyTokenLayer::new())).await;
    let headers = bump(&base, 42, &[]).await;
    let cookie = headers[SET_COOKIE].to_str().unwrap().to_string();
    let parts: Vec<&str> = cookie.split("; ").collect();
    assert_eq!(parts[0], format!("lagrouter_token={}", tok(42)));
    for attr in ["Path=/", "HttpOnly", "SameSite=Lax", "Max-Age=300"] {
        assert!(parts.contains(&attr), "{attr} missing in {cookie}");
    }
    assert!(!parts.contains(&"Secure"));
    // The cookie goes back in and is seen.
    let (_, seen, _) = echo(&base, &[("cookie", parts[0])]).await;
    assert_eq!(seen, tok(42).to_string());

    let base = serve(echo_app(
        ConsistencyTokenLayer::new()
            .cookie_name("rw")
            .cookie_max_age(Duration::from_secs(30))
            .secure(true)
            .write_header(false),
    ))
    .await;
    let headers = bump(&base, 42, &[]).await;
    let cookie = headers[SET_COOKIE].to_str().unwrap().to_string();
    let parts: Vec<&str> = cookie.split("; ").collect();
    assert_eq!(parts[0], format!("rw={}", tok(42)));
    for attr in ["Path=/", "HttpOnly", "SameSite=Lax", "Max-Age=30", "Secure"] {
        assert!(parts.contains(&attr), "{attr} missing in {cookie}");
    }
    assert!(headers.get(TOKEN_HEADER).is_none());
}

#[tokio::test]
async fn forged_signature_is_rejected() {
    let layer = ConsistencyTokenLayer::new().signing_key(b"server secret");
    let base = serve(echo_app(layer.clone())).await;
    let headers = bump(&base, 500, &[]).await;
    let signed = token_cookie(&headers).expect("cookie");
    assert_eq!(signed, layer.encode(&tok(500)));
    let (token, signature) = signed.rsplit_once('.').unwrap();
    assert_eq!(token, tok(500).to_string());

    // The genuine signed token is accepted (cookie and header).
    let (_, seen, _) = echo(&base, &[("cookie", &format!("lagrouter_token={signed}"))]).await;
    assert_eq!(seen, token);
    let (_, seen, _) = echo(&base, &[(TOKEN_HEADER, &signed)]).await;
    assert_eq!(seen, token);

    let mut flipped = signature.as_bytes().to_vec();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let forgeries = [
        token.to_string(),                       // unsigned
        format!("{}.{signature}", tok(5000)),    // signature moved to another token
        format!("{token}.{flipped}"),            // tampered signature
        format!("{token}."),                     // empty signature
        format!("{token}.{}", &signature[..21]), // truncated
        ConsistencyTokenLayer::new()
            .signing_key(b"guess")
            .encode(&tok(5000)),
    ];
    for forged in &forgeries {
        let (status, seen, headers) = echo(
            &base,
            &[
                ("cookie", &format!("lagrouter_token={forged}")),
                (TOKEN_HEADER, forged),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{forged}");
        assert_eq!(seen, "none", "accepted forged token {forged}");
        assert!(headers.get(SET_COOKIE).is_none());
    }
}
