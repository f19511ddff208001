//! Shared helpers of the end-to-end tests: a harness cluster plus an
//! in-process proxy on OS-assigned ports.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lagrouter_proxy::config::Config;
use lagrouter_proxy::server::{Proxy, ProxyHandle};
use lagrouter_testing::PgCluster;
use tokio_postgres::{Client, NoTls};

pub const USER: &str = "postgres";
pub const PASSWORD: &str = "postgres";

pub struct Env {
    pub cluster: PgCluster,
    pub proxy: ProxyHandle,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub async fn start(replicas: usize) -> Env {
    start_with(PgCluster::builder().replicas(replicas), |_| {}).await
}

pub async fn start_with(
    builder: lagrouter_testing::PgClusterBuilder,
    adjust: impl FnOnce(&mut Config),
) -> Env {
    init_tracing();
    let cluster = builder.start().await.expect("cluster starts");
    let mut config = lagrouter_proxy::demo::config_for(&cluster, USER, PASSWORD);
    config.proxy.listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.proxy.shutdown_timeout = Duration::from_secs(5);
    config.routing.monitor_interval = Duration::from_millis(20);
    adjust(&mut config);
    let proxy = Proxy::start(config).await.expect("proxy starts");
    let env = Env { cluster, proxy };
    // Every replica healthy in the proxy's view before tests begin.
    let replicas = env.cluster.replicas();
    let proxy = &env.proxy;
    wait_until(Duration::from_secs(30), "replicas healthy", || async {
        let t = proxy.topology();
        t.primary.is_some()
            && replicas
                .iter()
                .all(|&i| t.nodes[i].healthy && t.nodes[i].lsn.is_some())
    })
    .await;
    env
}

impl Env {
    pub fn addr(&self) -> SocketAddr {
        self.proxy.local_addr()
    }

    pub fn conn_str(&self) -> String {
        conn_str(self.addr(), USER, PASSWORD)
    }

    pub async fn connect(&self) -> Client {
        connect(&self.conn_str()).await
    }

    /// A metric's value from `/metrics`, summed over the label sets whose
    /// line contains `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = http_get(self.proxy.admin_addr(), "/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// As [`Env::metric`], over the label sets whose line contains every
    /// one of `labels`.
    pub async fn metric_with(&self, name: &str, labels: &[&str]) -> f64 {
        let (_, body) = http_get(self.proxy.admin_addr(), "/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|s| l.contains(s)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn proxy_config(&self) -> Config {
        self.proxy.config()
    }

    pub async fn stop(self) {
        self.proxy.shutdown().await;
        drop(self.cluster);
    }
}

pub fn conn_str(addr: SocketAddr, user: &str, password: &str) -> String {
    format!(
        "host={} port={} user={user} password={password} dbname=postgres connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// Connection string of the trust user `raw` (see [`add_trust_user`]).
pub fn raw_conn_str(addr: SocketAddr) -> String {
    format!(
        "host={} port={} user=raw dbname=postgres connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

pub async fn connect(s: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(s, NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Polls `cond` until it holds, panicking after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a client binary from PostgreSQL's bin directory.
pub fn pg_bin(name: &str) -> std::path::PathBuf {
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output();
    let dir = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "/usr/lib/postgresql/15/bin".to_string(),
    };
    std::path::Path::new(&dir).join(name)
}

/// A raw GET on the admin endpoint: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A raw protocol client for malformed-input and protocol-level tests.
pub struct Raw {
    pub stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// One server message: type byte and body.
pub type Msg = (u8, Vec<u8>);

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("raw connect");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        // The peer may already have closed: ignore write errors.
        let _ = self.stream.write_all(bytes).await;
    }

    pub async fn startup(&mut self, params: &[(&str, &str)]) {
        let mut b = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut b)
            .unwrap();
        self.send(&b).await;
    }

    /// Next message, `None` at end of stream (or after 10 s).
    pub async fn read_msg(&mut self) -> Option<Msg> {
        use tokio::io::AsyncReadExt;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let body = self.buf[5..len + 1].to_vec();
                    self.buf.drain(..len + 1);
                    return Some((tag, body));
                }
            }
            let mut chunk = [0u8; 8192];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads messages up to and including one of type `tag`.
    pub async fn read_until(&mut self, tag: u8) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.read_msg().await {
            let done = m.0 == tag;
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Whether the server closed the connection (after any messages).
    pub async fn closed(&mut self) -> bool {
        while let Some(_m) = self.read_msg().await {}
        true
    }

    /// Connects and completes startup as a trust user; returns the
    /// startup messages.
    pub async fn login(addr: SocketAddr, user: &str) -> (Raw, Vec<Msg>) {
        let mut r = Raw::connect(addr).await;
        r.startup(&[("user", user), ("database", "postgres")]).await;
        let msgs = r.read_until(b'Z').await;
        assert_eq!(
            msgs.last().map(|m| m.0),
            Some(b'Z'),
            "login failed: {msgs:?}"
        );
        (r, msgs)
    }

    pub async fn query(&mut self, sql: &str) -> Vec<Msg> {
        let mut b = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut b).unwrap();
        self.send(&b).await;
        self.read_until(b'Z').await
    }
}

/// Field `code` (e.g. b'C' for SQLSTATE) of an ErrorResponse body.
pub fn error_field(body: &[u8], code: u8) -> Option<String> {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let t = body[i];
        let end = i + 1 + body[i + 1..].iter().position(|&b| b == 0)?;
        if t == code {
            return Some(String::from_utf8_lossy(&body[i + 1..end]).into_owned());
        }
        i = end + 1;
    }
    None
}

/// SQLSTATE of the first ErrorResponse among `msgs`.
pub fn sqlstate(msgs: &[Msg]) -> Option<String> {
    msgs.iter()
        .find(|m| m.0 == b'E')
        .and_then(|m| error_field(&m.1, b'C'))
}

/// Adds a trust-authenticated user `raw` (backend credentials of the
/// harness superuser) for raw-protocol tests.
pub fn add_trust_user(config: &mut Config) {
    config.users.push(lagrouter_proxy::config::UserConfig {
        name: "raw".into(),
        password: String::new(),
        auth: lagrouter_proxy::config::AuthMethod::Trust,
        server_user: Some(USER.into()),
        server_password: Some(PASSWORD.into()),
        consistency: None,
    });
}

/// Environment variable naming the test a child process of this binary
/// runs alone (see [`alone_in_process`]).
const ALONE_ENV: &str = "LAGROUTER_E2E_ALONE";

/// Runs the test named `test` (its libtest path, e.g.
/// `slow_client::some_test`) alone in a fresh process of this test binary,
/// for tests that measure the whole process (peak memory).
///
/// Returns `true` in that child process: the caller then runs its body.
/// In the parent it waits for the child, fails when the child's test
/// failed or did not run, and returns `false`: the caller returns at once.
/// The child's `report` lines go straight to the inherited standard error.
pub fn alone_in_process(test: &str) -> bool {
    if std::env::var(ALONE_ENV).is_ok_and(|v| v == test) {
        return true;
    }
    let exe = std::env::current_exe().expect("path of the test binary");
    let out = std::process::Command::new(exe)
        .args([test, "--exact", "--test-threads=1"])
        .env(ALONE_ENV, test)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run the test in its own process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "{test} failed in its own process ({})",
        out.status
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{test} did not run in its own process"
    );
    false
}

/// Waits until every replica has replayed what the primary has written so
/// far (DDL a test is about to read on a replica).
pub async fn replicas_caught_up(env: &Env) {
    let lsn = env.cluster.current_lsn().await.expect("primary position");
    for r in env.cluster.replicas() {
        env.cluster
            .wait_for_replay(r, lsn, Duration::from_secs(30))
            .await
            .expect("replica catches up");
    }
}

/// Gives the nodes names of the test's own (`{prefix}_primary`,
/// `{prefix}_replica1`, …), so that its metrics are told apart from those
/// of tests running alongside in the same process.
pub fn name_nodes(config: &mut Config, prefix: &str) {
    for n in &mut config.nodes {
        n.name = format!("{prefix}_{}", n.name);
    }
}

/// Extended-protocol messages for raw-protocol tests (text parameters and
/// results).
pub mod ext {
    use bytes::BytesMut;
    use postgres_protocol::IsNull;
    use postgres_protocol::message::frontend;

    pub fn parse(b: &mut BytesMut, name: &str, sql: &str) {
        frontend::parse(name, sql, std::iter::empty(), b).unwrap();
    }

    pub fn bind(b: &mut BytesMut, portal: &str, stmt: &str, params: &[&str]) {
        let r = frontend::bind(
            portal,
            stmt,
            std::iter::empty::<i16>(),
            params.iter(),
            |p, buf| {
                buf.extend_from_slice(p.as_bytes());
                Ok(IsNull::No)
            },
            std::iter::empty::<i16>(),
            b,
        );
        assert!(r.is_ok(), "bind encodes");
    }

    pub fn describe(b: &mut BytesMut, kind: u8, name: &str) {
        frontend::describe(kind, name, b).unwrap();
    }

    pub fn execute(b: &mut BytesMut, portal: &str) {
        frontend::execute(portal, 0, b).unwrap();
    }

    pub fn flush(b: &mut BytesMut) {
        frontend::flush(b);
    }

    pub fn sync(b: &mut BytesMut) {
        frontend::sync(b);
    }

    /// Parse/Bind/Describe/Execute/Sync of `sql` through the unnamed
    /// statement: what node-postgres, psycopg and pgjdbc send per query.
    pub fn unnamed_query(sql: &str, params: &[&str]) -> BytesMut {
        let mut b = BytesMut::new();
        parse(&mut b, "", sql);
        bind(&mut b, "", "", params);
        describe(&mut b, b'P', "");
        execute(&mut b, "");
        sync(&mut b);
        b
    }
}

/// Message types of `msgs`, as a string (e.g. `"12TDCZ"`).
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.0 as char).collect()
}

/// The first column of the first `DataRow` among `msgs`, as text.
pub fn first_value(msgs: &[Msg]) -> Option<String> {
    let body = &msgs.iter().find(|m| m.0 == b'D')?.1;
    let len = i32::from_be_bytes(body[2..6].try_into().ok()?);
    if len < 0 {
        return None;
    }
    Some(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned())
}

impl Raw {
    /// A simple query whose text is given as bytes (any client encoding).
    pub async fn query_bytes(&mut self, sql: &[u8]) -> Vec<Msg> {
        self.send(&raw_message(b'Q', &[sql, b"\0"])).await;
        self.read_until(b'Z').await
    }
}

/// A message of type `tag` whose body is `parts` concatenated.
pub fn raw_message(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = parts.concat();
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(&body);
    m
}

/// A `Parse` of `sql` given as bytes, without parameter types.
pub fn raw_parse(name: &str, sql: &[u8]) -> Vec<u8> {
    raw_message(
        b'P',
        &[name.as_bytes(), b"\0", sql, b"\0", &0i16.to_be_bytes()],
    )
}

/// The first column of the first `DataRow` among `msgs`, as bytes.
pub fn first_bytes(msgs: &[Msg]) -> Option<Vec<u8>> {
    let body = &msgs.iter().find(|m| m.0 == b'D')?.1;
    let len = i32::from_be_bytes(body[2..6].try_into().ok()?);
    (len >= 0).then(|| body[6..6 + len as usize].to_vec())
}

/// The `ParameterStatus` messages among `msgs`, as (name, value).
pub fn parameter_statuses(msgs: &[Msg]) -> Vec<(String, String)> {
    msgs.iter()
        .filter(|m| m.0 == b'S')
        .filter_map(|m| {
            let mut it = m.1.split(|&b| b == 0);
            let k = String::from_utf8_lossy(it.next()?).into_owned();
            let v = String::from_utf8_lossy(it.next()?).into_owned();
            Some((k, v))
        })
        .collect()
}
