//! The HTTP admin endpoint (`proxy.admin_listen`). The metric names are in
//! [`crate::metrics`].
//!
//! * `GET /metrics` — Prometheus text exposition of every metric recorded
//!   through the [`metrics`] facade (the proxy's and the routing
//!   library's).
//! * `GET /health` — `200 ok` while the proxy is healthy (the primary is
//!   reachable), `503 unavailable` otherwise.
//! * `GET /status` — JSON describing the topology (nodes, roles, LSNs, lag),
//!   pools, clients, lag history and read counters.
//! * `GET /` — the status page ([`super::status_page`]): the same, drawn.
//!
//! `HEAD` is accepted wherever `GET` is; other methods get `405`, unknown
//! paths `404`.
#![warn(missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::{TOKEN_WAIT_BUCKETS, TOKEN_WAIT_SECONDS};

/// Most admin connections served at once; more are closed on accept.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight admin requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often histogram upkeep runs while serving.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs a Prometheus recorder as the global [`metrics`] recorder and
/// returns its handle. Idempotent: later calls return the same handle.
///
/// If another global recorder was installed first (by something else in the
/// process), a detached recorder is returned instead and a warning logged:
/// `/metrics` then renders only what that recorder sees (nothing).
pub fn install_metrics_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = || {
                let b = PrometheusBuilder::new();
                match b.set_buckets_for_metric(
                    Matcher::Full(TOKEN_WAIT_SECONDS.to_owned()),
                    TOKEN_WAIT_BUCKETS,
                ) {
                    Ok(b) => b,
                    // Unreachable: the bucket list is not empty.
                    Err(_) => PrometheusBuilder::new(),
                }
            };
            match builder().install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "cannot install the Prometheus metrics recorder; /metrics will be empty"
                    );
                    builder().build_recorder().handle()
                }
            }
        })
        .clone()
}

/// What the admin endpoint serves.
#[derive(Clone)]
pub struct AdminState {
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// `/health`: `true` when healthy (the primary is reachable).
    pub health: Arc<dyn Fn() -> bool + Send + Sync>,
    /// `/status`: the topology as JSON.
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

impl AdminState {
    /// Bundles the three providers.
    pub fn new(
        metrics: PrometheusHandle,
        health: impl Fn() -> bool + Send + Sync + 'static,
        status: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        AdminState {
            metrics,
            health: Arc::new(health),
            status: Arc::new(status),
        }
    }
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` completes, then
/// stops accepting, gives in-flight requests up to 5 s, and returns.
///
/// Accept errors (such as running out of file descriptors) are logged and
/// retried, never fatal. At most 64 connections are served at once; request
/// headers must arrive within 10 s. While serving, metrics upkeep runs every
/// 5 s.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = shutdown;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = upkeep.tick() => state.metrics.run_upkeep(),
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!("admin endpoint: too many connections, closing one");
                    drop(stream);
                    continue;
                };
                let state = state.clone();
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, &req)) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "admin endpoint: connection error");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin endpoint: in-flight requests did not finish in time");
    }
    Ok(())
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let mut resp = match req.uri().path() {
        "/metrics" => match catch_unwind(AssertUnwindSafe(|| state.metrics.render())) {
            Ok(body) => {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"),
        },
        "/health" => match catch_unwind(AssertUnwindSafe(|| (state.health)())) {
            Ok(true) => text(StatusCode::OK, "ok\n"),
            Ok(false) => text(StatusCode::SERVICE_UNAVAILABLE, "unavailable\n"),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"),
        },
        "/" => match catch_unwind(AssertUnwindSafe(|| {
            super::status_page::render(&(state.status)())
        })) {
            Ok(page) => {
                let mut r = Response::new(Full::new(Bytes::from(page)));
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                h.insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(super::status_page::content_security_policy()),
                );
                h.insert(
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                );
                h.insert(
                    header::REFERRER_POLICY,
                    HeaderValue::from_static("no-referrer"),
                );
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"),
        },
        "/status" => match catch_unwind(AssertUnwindSafe(|| (state.status)())) {
            Ok(value) => {
                let mut body =
                    serde_json::to_vec_pretty(&value).unwrap_or_else(|_| b"null".to_vec());
                body.push(b'\n');
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if head {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{
        AUTH_FAILURES_TOTAL, LABEL_KIND, LABEL_NODE, QUERIES_TOTAL, REPLICA_LAG_BYTES,
        describe_metrics,
    };
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends one raw HTTP/1.1 request and returns (status, headers, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    struct Running {
        addr: SocketAddr,
        healthy: Arc<AtomicBool>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start() -> Running {
        let handle = install_metrics_recorder();
        describe_metrics();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let state = AdminState::new(
            handle,
            move || h.load(Ordering::SeqCst),
            || serde_json::json!({"nodes": [{"name": "primary", "lsn": "0/3000060", "lag_bytes": 0}]}),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state, async move {
            let _ = rx.await;
        }));
        Running {
            addr,
            healthy,
            stop: Some(tx),
            task,
        }
    }

    impl Running {
        async fn stop(mut self) {
            self.stop.take().unwrap().send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("serve returns after shutdown")
                .unwrap()
                .unwrap();
        }
    }

    #[tokio::test]
    async fn health_follows_the_provider() {
        let r = start().await;
        let (status, head, body) = request(r.addr, "GET", "/health").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert!(
            head.to_ascii_lowercase()
                .contains("cache-control: no-store")
        );
        r.healthy.store(false, Ordering::SeqCst);
        let (status, _, body) = request(r.addr, "GET", "/health").await;
        assert_eq!((status, body.as_str()), (503, "unavailable\n"));
        r.stop().await;
    }

    #[tokio::test]
    async fn status_is_json() {
        let r = start().await;
        let (status, head, body) = request(r.addr, "GET", "/status").await;
        assert_eq!(status, 200);
        assert!(head.contains("application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["nodes"][0]["name"], "primary");
        assert_eq!(v["nodes"][0]["lsn"], "0/3000060");
        r.stop().await;
    }

    #[tokio::test]
    async fn metrics_render_prometheus_text() {
        let r = start().await;
        metrics::counter!(QUERIES_TOTAL, LABEL_NODE => "primary", LABEL_KIND => "write")
            .increment(3);
        metrics::gauge!(REPLICA_LAG_BYTES, LABEL_NODE => "replica1").set(1024.0);
        metrics::histogram!(TOKEN_WAIT_SECONDS).record(0.003);
        let (status, head, body) = request(r.addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        assert!(
            body.contains("lagrouter_proxy_queries_total{node=\"primary\",kind=\"write\"} 3"),
            "{body}"
        );
        assert!(
            body.contains("# HELP lagrouter_proxy_queries_total"),
            "{body}"
        );
        assert!(
            body.contains("lagrouter_proxy_replica_lag_bytes{node=\"replica1\"} 1024"),
            "{body}"
        );
        assert!(
            body.contains("lagrouter_proxy_token_wait_seconds_bucket{le=\"0.005\"} "),
            "histogram rendered with buckets: {body}"
        );
        r.stop().await;
    }

    #[tokio::test]
    async fn the_page_is_html_with_a_strict_policy() {
        let r = start().await;
        let (status, head, body) = request(r.addr, "GET", "/").await;
        assert_eq!(status, 200);
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-type: text/html"), "{head}");
        assert!(
            head.contains("content-security-policy: default-src 'none'"),
            "{head}"
        );
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert!(body.contains(r#"<table id="nodes">"#), "{body}");
        r.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_and_methods() {
        let r = start().await;
        assert_eq!(request(r.addr, "GET", "/nope").await.0, 404);
        assert_eq!(request(r.addr, "GET", "/index.html").await.0, 404);
        assert_eq!(request(r.addr, "GET", "/health/extra").await.0, 404);
        let (status, head, _) = request(r.addr, "POST", "/health").await;
        assert_eq!(status, 405);
        assert!(
            head.to_ascii_lowercase().contains("allow: get, head"),
            "{head}"
        );
        let (status, _, body) = request(r.addr, "HEAD", "/health").await;
        assert_eq!((status, body.as_str()), (200, ""));
        // Query strings are ignored.
        assert_eq!(request(r.addr, "GET", "/health?verbose=1").await.0, 200);
        r.stop().await;
    }

    #[tokio::test]
    async fn garbage_requests_do_not_break_the_server() {
        let r = start().await;
        let mut s = TcpStream::connect(r.addr).await.unwrap();
        s.write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        drop(s);
        // A client that connects and says nothing does not block others.
        let _idle = TcpStream::connect(r.addr).await.unwrap();
        assert_eq!(request(r.addr, "GET", "/health").await.0, 200);
        r.stop().await;
    }

    #[tokio::test]
    async fn panicking_providers_give_500() {
        let state = AdminState::new(
            install_metrics_recorder(),
            || panic!("health provider failed"),
            || panic!("status provider failed"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state, async move {
            let _ = rx.await;
        }));
        assert_eq!(request(addr, "GET", "/health").await.0, 500);
        assert_eq!(request(addr, "GET", "/status").await.0, 500);
        assert_eq!(request(addr, "GET", "/metrics").await.0, 200);
        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn recorder_install_is_idempotent() {
        let a = install_metrics_recorder();
        let b = install_metrics_recorder();
        metrics::counter!(AUTH_FAILURES_TOTAL).increment(1);
        assert!(a.render().contains(AUTH_FAILURES_TOTAL));
        assert!(b.render().contains(AUTH_FAILURES_TOTAL));
    }
}
