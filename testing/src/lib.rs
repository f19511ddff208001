//! PostgreSQL primary/replica test harness.
//!
//! [`PgCluster`] starts a throw-away streaming-replication cluster (one
//! primary, any number of hot standbys) and offers the controls the
//! lagrouter tests need: pausing and delaying WAL replay, stopping, crashing
//! and restarting nodes, promoting a standby, and waiting for replay
//! positions.
//!
//! Two backends exist:
//!
//! * [`BackendKind::Local`] runs the PostgreSQL server binaries found through
//!   `PG_BIN` or `pg_config --bindir` as child processes, each cluster in its
//!   own temporary directory and on OS-assigned ports. When the test runs as
//!   root the servers run as the unprivileged `postgres` OS user.
//! * [`BackendKind::Docker`] (cargo feature `docker`) runs the official
//!   `postgres:15` image through testcontainers.
//!
//! Without an explicit [`PgClusterBuilder::backend`] call the backend comes
//! from the `LAGROUTER_TEST_BACKEND` environment variable (`docker`, `local`
//! or `auto`); `auto` (the default) picks Docker when the `docker` feature is
//! compiled in and an engine answers, else the local binaries.
//!
//! Dropping a [`PgCluster`] stops every server it started (also while a
//! panic unwinds) and removes its files.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use lagrouter_testing::PgCluster;
//!
//! let cluster = PgCluster::start(1).await?;
//! let primary = cluster.connect(cluster.primary()).await?;
//! primary.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await?;
//! let lsn = cluster.current_lsn().await?;
//! cluster.wait_for_replay(1, lsn, Duration::from_secs(10)).await?;
//! let replica = cluster.connect(1).await?;
//! assert_eq!(replica.query("SELECT id FROM t", &[]).await?.len(), 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use lagrouter::Lsn;
use lagrouter::lsn::DEFAULT_WAL_SEGMENT_SIZE;

#[cfg(feature = "docker")]
mod docker;
mod local;

/// Index of a node in a [`PgCluster`]: `0` is the initial primary,
/// `1..=n` are the replicas in creation order.
pub type NodeIndex = usize;

/// Name of the environment variable that selects the default backend.
pub const BACKEND_ENV: &str = "LAGROUTER_TEST_BACKEND";

/// Whether this build contains the Docker backend (cargo feature `docker`).
pub const DOCKER_BACKEND_COMPILED: bool = cfg!(feature = "docker");

/// How long a node may take to accept connections after it was started.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between polls while awaiting a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Lines of server log attached to error messages.
const ERROR_LOG_LINES: usize = 40;

/// Which implementation runs the PostgreSQL servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Server binaries on this machine, run as child processes.
    Local,
    /// Containers of the official `postgres:15` image (feature `docker`).
    Docker,
}

impl BackendKind {
    /// The lowercase name used in `LAGROUTER_TEST_BACKEND`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Docker => "docker",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The backend asked for through `LAGROUTER_TEST_BACKEND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendRequest {
    /// Always the local binaries.
    Local,
    /// Always Docker (fails at start when the feature or engine is missing).
    Docker,
    /// Docker when compiled in and an engine is reachable, else local.
    Auto,
}

impl BackendRequest {
    /// Parses the value of `LAGROUTER_TEST_BACKEND`. A missing or empty value
    /// means [`BackendRequest::Auto`]; matching ignores case and surrounding
    /// whitespace.
    ///
    /// ```
    /// use lagrouter_testing::BackendRequest;
    /// assert_eq!(BackendRequest::parse(None).unwrap(), BackendRequest::Auto);
    /// assert_eq!(BackendRequest::parse(Some(" Docker ")).unwrap(), BackendRequest::Docker);
    /// assert!(BackendRequest::parse(Some("podman")).is_err());
    /// ```
    pub fn parse(value: Option<&str>) -> Result<BackendRequest, HarnessError> {
        let Some(raw) = value else {
            return Ok(BackendRequest::Auto);
        };
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(BackendRequest::Auto),
            "local" => Ok(BackendRequest::Local),
            "docker" => Ok(BackendRequest::Docker),
            _ => Err(HarnessError::InvalidBackend {
                value: raw.to_string(),
            }),
        }
    }

    /// Reads and parses `LAGROUTER_TEST_BACKEND` from the environment.
    pub fn from_env() -> Result<BackendRequest, HarnessError> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) => BackendRequest::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Ok(BackendRequest::Auto),
            Err(std::env::VarError::NotUnicode(v)) => Err(HarnessError::InvalidBackend {
                value: v.to_string_lossy().into_owned(),
            }),
        }
    }
}

impl FromStr for BackendRequest {
    type Err = HarnessError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendRequest::parse(Some(s))
    }
}

/// Turns a [`BackendRequest`] into a backend. Pure apart from calling
/// `engine_reachable`, which is only consulted for [`BackendRequest::Auto`]
/// when `docker_compiled` is true.
///
/// ```
/// use lagrouter_testing::{resolve_backend, BackendKind, BackendRequest};
/// assert_eq!(resolve_backend(BackendRequest::Auto, true, || true), BackendKind::Docker);
/// assert_eq!(resolve_backend(BackendRequest::Auto, false, || true), BackendKind::Local);
/// assert_eq!(resolve_backend(BackendRequest::Local, true, || true), BackendKind::Local);
/// ```
pub fn resolve_backend(
    request: BackendRequest,
    docker_compiled: bool,
    engine_reachable: impl FnOnce() -> bool,
) -> BackendKind {
    match request {
        BackendRequest::Local => BackendKind::Local,
        BackendRequest::Docker => BackendKind::Docker,
        BackendRequest::Auto => {
            if docker_compiled && engine_reachable() {
                BackendKind::Docker
            } else {
                BackendKind::Local
            }
        }
    }
}

/// The backend a builder without an explicit [`PgClusterBuilder::backend`]
/// uses: `LAGROUTER_TEST_BACKEND` resolved with [`resolve_backend`].
pub fn default_backend() -> Result<BackendKind, HarnessError> {
    let request = BackendRequest::from_env()?;
    Ok(resolve_backend(
        request,
        DOCKER_BACKEND_COMPILED,
        docker_engine_reachable,
    ))
}

/// Writes a measurement line (`measured: …`) straight to the process's
/// standard error. Unlike `println!`, it is not captured by the test
/// harness, so the numbers a test observes (recovery times, lost-write
/// counts, …) show in every test run's output, CI's included.
pub fn report(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "measured: {line}");
}

/// Whether a Docker engine answers `GET /_ping`: at `DOCKER_HOST` when set
/// (`unix://` or `tcp://`), else at `/var/run/docker.sock` or
/// `~/.docker/run/docker.sock`. Each probe gives up after about a second.
pub fn docker_engine_reachable() -> bool {
    use std::io::{Read, Write};

    fn ping<S: Read + Write>(mut stream: S) -> bool {
        if stream
            .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = Vec::new();
        let _ = stream.take(4096).read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        text.starts_with("HTTP/1.") && text.lines().next().is_some_and(|l| l.contains(" 200"))
    }

    fn ping_unix(path: &str) -> bool {
        let Ok(stream) = std::os::unix::net::UnixStream::connect(path) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        ping(stream)
    }

    fn ping_tcp(addr: &str) -> bool {
        use std::net::ToSocketAddrs;
        let Ok(addrs) = addr.to_socket_addrs() else {
            return false;
        };
        for a in addrs {
            if let Ok(stream) = std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                if std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty()) {
                    // Speaking TLS is out of scope here; an open port is
                    // taken as a live engine.
                    return true;
                }
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                return ping(stream);
            }
        }
        false
    }

    if let Ok(host) = std::env::var("DOCKER_HOST") {
        let host = host.trim();
        if !host.is_empty() {
            if let Some(path) = host.strip_prefix("unix://") {
                return ping_unix(path);
            }
            if let Some(addr) = host.strip_prefix("tcp://") {
                return ping_tcp(addr.trim_end_matches('/'));
            }
            return false;
        }
    }
    if ping_unix("/var/run/docker.sock") {
        return true;
    }
    match std::env::var_os("HOME") {
        Some(home) => {
            let p = std::path::Path::new(&home).join(".docker/run/docker.sock");
            p.to_str().is_some_and(ping_unix)
        }
        None => false,
    }
}

/// Errors of the test harness. Messages carry the failing command's output
/// or the tail of the server log so that test failures are diagnosable.
///
/// `Debug` prints the same multi-line text as `Display`, so that
/// `.unwrap()` / `.expect()` in tests show readable server logs.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// `LAGROUTER_TEST_BACKEND` holds an unknown value.
    #[error("invalid {BACKEND_ENV} value {value:?} (expected docker, local or auto)")]
    InvalidBackend {
        /// The rejected value.
        value: String,
    },
    /// The requested backend cannot run here (feature missing, no engine,
    /// no PostgreSQL binaries, operation not supported by the backend).
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
    /// A builder option has an unusable value.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The node index is out of range.
    #[error("node {node} does not exist (the cluster has {count} nodes)")]
    NoSuchNode {
        /// The requested node.
        node: NodeIndex,
        /// Number of nodes in the cluster.
        count: usize,
    },
    /// The operation does not fit the node's current state (for example
    /// promoting a node that is not a standby).
    #[error("node {node}: {message}")]
    InvalidState {
        /// The node concerned.
        node: NodeIndex,
        /// What is wrong.
        message: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An external command (initdb, pg_basebackup, ...) failed.
    #[error("`{command}` failed ({status})\n--- output ---\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status description.
        status: String,
        /// Its combined stdout and stderr.
        output: String,
    },
    /// A server did not come up.
    #[error("node {node} failed to start: {message}\n--- server log tail ---\n{log_tail}")]
    Startup {
        /// The node concerned.
        node: NodeIndex,
        /// What went wrong.
        message: String,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// Connecting to or querying a node failed.
    #[error("node {node}: {context}: {source}\n--- server log tail ---\n{log_tail}")]
    Postgres {
        /// The node concerned.
        node: NodeIndex,
        /// What was being done.
        context: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// A condition was not reached in time.
    #[error("timed out after {timeout:?} waiting for {what}\n{detail}")]
    Timeout {
        /// The awaited condition.
        what: String,
        /// The deadline that passed.
        timeout: Duration,
        /// Last observed state and log tail.
        detail: String,
    },
    /// The container engine reported an error.
    #[error("docker: {0}")]
    Docker(String),
}

impl std::fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Boxed future returned by [`ClusterBackend`] methods.
pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, HarnessError>> + Send + 'a>>;

/// What both backends must provide. `PgCluster` implements the SQL-level
/// controls on top of it once.
pub(crate) trait ClusterBackend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Number of nodes (fixed after creation).
    fn node_count(&self) -> usize;
    /// Host clients connect to.
    fn host(&self, node: NodeIndex) -> String;
    /// Port clients connect to (may change after a restart on Docker).
    fn port(&self, node: NodeIndex) -> u16;
    /// libpq `host=... port=...` part other nodes use to reach `node`.
    fn peer_address(&self, node: NodeIndex) -> String;
    /// Configuration for the harness' own control connections. Defaults to
    /// the client configuration; the local backend uses the Unix socket,
    /// which skips password hashing.
    fn control_config(&self, node: NodeIndex) -> Option<tokio_postgres::Config> {
        let _ = node;
        None
    }
    /// Whether the node's server is believed to be running.
    fn is_running(&self, node: NodeIndex) -> bool;
    /// Fast shutdown, waiting for the server to exit.
    fn stop_node(&self, node: NodeIndex) -> BoxFut<'_, ()>;
    /// Crash (immediate shutdown), waiting for the server to exit.
    fn kill_node(&self, node: NodeIndex) -> BoxFut<'_, ()>;
    /// Starts a stopped node and waits until it accepts connections.
    fn start_node(&self, node: NodeIndex) -> BoxFut<'_, ()>;
    /// Stops (`frozen`) or resumes every process of the node's server, as
    /// a host that hangs without closing its connections.
    fn freeze_node(&self, node: NodeIndex, frozen: bool) -> BoxFut<'_, ()> {
        let _ = (node, frozen);
        Box::pin(async move {
            Err(HarnessError::BackendUnavailable(format!(
                "freezing a node is not supported by the {} backend",
                self.kind()
            )))
        })
    }
    /// Turns a stopped former primary into a standby of `upstream` with
    /// `pg_rewind` (the node stays stopped).
    fn rewind_node(&self, node: NodeIndex, upstream: NodeIndex) -> BoxFut<'_, ()> {
        let _ = (node, upstream);
        Box::pin(async move {
            Err(HarnessError::BackendUnavailable(format!(
                "rejoining a former primary is not supported by the {} backend",
                self.kind()
            )))
        })
    }
    /// Path of the node's data directory, when it is on this machine.
    fn data_dir(&self, node: NodeIndex) -> Option<std::path::PathBuf> {
        let _ = node;
        None
    }
    /// The last `lines` lines of the server log.
    fn log_tail(&self, node: NodeIndex, lines: usize) -> String;
}

// `PgCluster` is shared between tasks and threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PgCluster>();
    assert_send_sync::<PgClusterBuilder>();
    assert_send_sync::<HarnessError>();
};

/// Settings shared by both backends, collected by [`PgClusterBuilder`].
#[derive(Debug, Clone)]
pub(crate) struct ClusterSpec {
    pub(crate) replicas: usize,
    pub(crate) settings: Vec<(String, String)>,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) auth_method: String,
}

impl ClusterSpec {
    /// `postgresql.conf` lines every node gets, harness defaults first.
    pub(crate) fn server_settings(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = [
            ("wal_level", "replica"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("hot_standby", "on"),
            ("fsync", "off"),
            // pg_rewind needs full page writes and hint-bit logging.
            ("full_page_writes", "on"),
            ("wal_log_hints", "on"),
            ("synchronous_commit", "on"),
            ("max_connections", "300"),
            ("shared_buffers", "32MB"),
            ("wal_receiver_status_interval", "1s"),
            ("wal_retrieve_retry_interval", "200ms"),
            ("wal_keep_size", "256MB"),
            ("hot_standby_feedback", "off"),
            ("logging_collector", "off"),
            ("log_destination", "stderr"),
            ("log_line_prefix", "%m [%p] %b "),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        out.extend(self.settings.iter().cloned());
        out
    }

    /// `pg_hba.conf` contents: local trust, TCP with the chosen method.
    pub(crate) fn hba_conf(&self, tcp_sources: &[&str]) -> String {
        let mut s = String::from(
            "# generated by lagrouter::testing\n\
             local all all trust\n\
             local replication all trust\n",
        );
        for src in tcp_sources {
            s.push_str(&format!("host all all {src} {}\n", self.auth_method));
            s.push_str(&format!(
                "host replication all {src} {}\n",
                self.auth_method
            ));
        }
        s
    }
}

/// Quotes an SQL string literal (`standard_conforming_strings` on).
pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes a value for a `postgresql.conf` line, whose lexer also treats
/// backslashes as escapes.
pub(crate) fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a libpq connection-string value when needed.
pub(crate) fn quote_conn_value(value: &str) -> String {
    if !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return value.to_string();
    }
    let mut s = String::from("'");
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// Quotes an SQL identifier.
pub(crate) fn quote_ident(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// Wraps an I/O error with context.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// Connects with `config`, spawning the connection task.
pub(crate) async fn connect_config(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "lagrouter::testing connection ended with an error");
        }
    });
    Ok(client)
}

/// One readiness probe: connects and returns `pg_is_in_recovery()`.
pub(crate) async fn probe(config: &tokio_postgres::Config) -> Result<bool, tokio_postgres::Error> {
    let client = connect_config(config).await?;
    let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await?;
    Ok(row.get(0))
}

/// The role a node currently has in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The current primary.
    Primary,
    /// A standby following `upstream`'s conninfo.
    Standby {
        /// The node its `primary_conninfo` points at.
        upstream: NodeIndex,
    },
    /// A former primary replaced by a promotion (not a standby).
    Retired,
}

#[derive(Debug)]
struct Topology {
    roles: Vec<Role>,
}

impl Topology {
    fn primary(&self) -> NodeIndex {
        self.roles
            .iter()
            .position(|r| *r == Role::Primary)
            .expect("a cluster always has a primary")
    }
}

/// A running PostgreSQL primary with streaming-replication standbys.
///
/// `PgCluster` is `Send + Sync`; share it through `Arc` if tasks need it.
/// Dropping it stops every server (immediate shutdown, escalating to
/// `SIGKILL`) and deletes the data, also while a panic unwinds.
pub struct PgCluster {
    backend: Box<dyn ClusterBackend>,
    topology: Mutex<Topology>,
    user: String,
    password: String,
}

/// Builder for [`PgCluster`]; obtained from [`PgCluster::builder`].
#[derive(Debug, Clone)]
pub struct PgClusterBuilder {
    replicas: usize,
    backend: Option<BackendKind>,
    settings: Vec<(String, String)>,
    user: String,
    password: String,
    auth_method: String,
}

impl Default for PgClusterBuilder {
    fn default() -> Self {
        PgClusterBuilder {
            replicas: 1,
            backend: None,
            settings: Vec::new(),
            user: "postgres".to_string(),
            password: "postgres".to_string(),
            auth_method: "scram-sha-256".to_string(),
        }
    }
}

impl PgClusterBuilder {
    /// Number of streaming standbys (default 1).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// Chooses the backend instead of the `LAGROUTER_TEST_BACKEND` /
    /// auto-detection default (see [`default_backend`]).
    pub fn backend(mut self, kind: BackendKind) -> Self {
        self.backend = Some(kind);
        self
    }

    /// Adds a `postgresql.conf` setting for every node (applied after the
    /// harness defaults, so it can override them). The value is quoted.
    ///
    /// The Docker backend passes settings as `-c` server options, which
    /// `ALTER SYSTEM` (used by [`PgCluster::set_apply_delay`] and
    /// [`PgCluster::promote`]) cannot override there.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// Superuser name and password (default `postgres` / `postgres`).
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.user = name.to_string();
        self.password = password.to_string();
        self
    }

    /// `pg_hba.conf` method for TCP connections (client and replication):
    /// `scram-sha-256` (default), `md5`, `password` or `trust`. With `md5`
    /// the password is stored as an MD5 hash so the md5 exchange is really
    /// used.
    pub fn auth_method(mut self, m: &str) -> Self {
        self.auth_method = m.to_string();
        self
    }

    /// Creates and starts the cluster; returns once every node accepts
    /// connections and every standby is in recovery.
    pub async fn start(self) -> Result<PgCluster, HarnessError> {
        const METHODS: [&str; 4] = ["scram-sha-256", "md5", "password", "trust"];
        if !METHODS.contains(&self.auth_method.as_str()) {
            return Err(HarnessError::InvalidConfig(format!(
                "auth method {:?} is not one of {METHODS:?}",
                self.auth_method
            )));
        }
        if self.user.is_empty() {
            return Err(HarnessError::InvalidConfig("empty user name".into()));
        }
        if self.password.is_empty() || self.password.contains('\n') {
            return Err(HarnessError::InvalidConfig(
                "the password must be non-empty and on one line".into(),
            ));
        }
        for (name, value) in &self.settings {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return Err(HarnessError::InvalidConfig(format!(
                    "invalid setting name {name:?}"
                )));
            }
            if value.contains(['\n', '\r', '\0']) {
                return Err(HarnessError::InvalidConfig(format!(
                    "the value of setting {name} must be on one line"
                )));
            }
        }
        let kind = match self.backend {
            Some(k) => k,
            None => default_backend()?,
        };
        let spec = ClusterSpec {
            replicas: self.replicas,
            settings: self.settings,
            user: self.user,
            password: self.password,
            auth_method: self.auth_method,
        };
        let started = Instant::now();
        let backend: Box<dyn ClusterBackend> = match kind {
            BackendKind::Local => Box::new(local::LocalBackend::create(&spec).await?),
            #[cfg(feature = "docker")]
            BackendKind::Docker => Box::new(docker::DockerBackend::create(&spec).await?),
            #[cfg(not(feature = "docker"))]
            BackendKind::Docker => {
                return Err(HarnessError::BackendUnavailable(
                    "the docker backend needs the `docker` cargo feature of lagrouter-testing"
                        .into(),
                ));
            }
        };
        tracing::debug!(
            backend = %kind,
            replicas = spec.replicas,
            elapsed = ?started.elapsed(),
            "lagrouter::testing cluster started"
        );
        let mut roles = vec![Role::Primary];
        roles.extend((0..spec.replicas).map(|_| Role::Standby { upstream: 0 }));
        Ok(PgCluster {
            backend,
            topology: Mutex::new(Topology { roles }),
            user: spec.user,
            password: spec.password,
        })
    }
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("PgCluster");
        d.field("backend", &self.backend.kind());
        let nodes: Vec<String> = (0..self.node_count())
            .map(|n| format!("{}:{}", self.backend.host(n), self.backend.port(n)))
            .collect();
        d.field("nodes", &nodes);
        d.field("topology", &*self.topo());
        d.finish()
    }
}

impl PgCluster {
    /// Starts a primary with `replicas` standbys with default settings;
    /// same as `PgCluster::builder().replicas(replicas).start()`.
    pub async fn start(replicas: usize) -> Result<PgCluster, HarnessError> {
        PgCluster::builder().replicas(replicas).start().await
    }

    /// A builder with the defaults: one replica, backend from the
    /// environment, user `postgres` / `postgres`, `scram-sha-256`.
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    /// The backend running this cluster.
    pub fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Number of nodes (primary plus replicas, including stopped ones).
    pub fn node_count(&self) -> usize {
        self.backend.node_count()
    }

    /// The current primary (changes after [`PgCluster::promote`]).
    pub fn primary(&self) -> NodeIndex {
        self.topo().primary()
    }

    /// The current standbys, running or stopped, in index order. A former
    /// primary replaced by a promotion is not listed until it is rejoined
    /// with [`PgCluster::rejoin_as_standby`].
    pub fn replicas(&self) -> Vec<NodeIndex> {
        self.topo()
            .roles
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Role::Standby { .. }))
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether the node's server is running (not stopped or killed).
    pub fn is_running(&self, node: NodeIndex) -> bool {
        self.check(node).is_ok() && self.backend.is_running(node)
    }

    /// Client configuration for `node`: host, port, user, password and
    /// database `postgres`, with a 10 s connect timeout.
    ///
    /// # Panics
    /// When `node` is out of range.
    pub fn config(&self, node: NodeIndex) -> tokio_postgres::Config {
        self.assert_node(node);
        let mut c = tokio_postgres::Config::new();
        c.host(self.backend.host(node))
            .port(self.backend.port(node))
            .user(&self.user)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// libpq connection string for `node`:
    /// `host=127.0.0.1 port=... user=postgres password=... dbname=postgres`.
    ///
    /// # Panics
    /// When `node` is out of range.
    pub fn connection_string(&self, node: NodeIndex) -> String {
        self.assert_node(node);
        format!(
            "host={} port={} user={} password={} dbname=postgres",
            quote_conn_value(&self.backend.host(node)),
            self.backend.port(node),
            quote_conn_value(&self.user),
            quote_conn_value(&self.password)
        )
    }

    /// The node's data directory (local backend only).
    pub fn data_dir(&self, node: NodeIndex) -> Option<std::path::PathBuf> {
        self.check(node).ok()?;
        self.backend.data_dir(node)
    }

    /// Connects to `node` with [`PgCluster::config`] and spawns the
    /// connection task on the current runtime.
    pub async fn connect(&self, node: NodeIndex) -> Result<tokio_postgres::Client, HarnessError> {
        self.check(node)?;
        connect_config(&self.config(node))
            .await
            .map_err(|e| self.pg_err(node, "connect", e))
    }

    /// Pauses WAL replay (`pg_wal_replay_pause()`) and waits until
    /// `pg_get_wal_replay_pause_state()` reports `paused`.
    pub async fn pause_replay(&self, node: NodeIndex) -> Result<(), HarnessError> {
        let client = self.control(node).await?;
        self.exec(node, &client, "SELECT pg_wal_replay_pause()")
            .await?;
        self.wait_value(
            node,
            &client,
            "SELECT pg_get_wal_replay_pause_state()",
            "paused",
            "replay to pause",
            Duration::from_secs(30),
        )
        .await
    }

    /// Resumes WAL replay (`pg_wal_replay_resume()`) and waits until the
    /// pause state is `not paused`.
    pub async fn resume_replay(&self, node: NodeIndex) -> Result<(), HarnessError> {
        let client = self.control(node).await?;
        self.exec(node, &client, "SELECT pg_wal_replay_resume()")
            .await?;
        self.wait_value(
            node,
            &client,
            "SELECT pg_get_wal_replay_pause_state()",
            "not paused",
            "replay to resume",
            Duration::from_secs(30),
        )
        .await
    }

    /// Sets `recovery_min_apply_delay` (millisecond precision) with
    /// `ALTER SYSTEM` and `pg_reload_conf()`, then waits until the server
    /// reports the new value. `Duration::ZERO` removes the delay.
    pub async fn set_apply_delay(&self, node: NodeIndex, d: Duration) -> Result<(), HarnessError> {
        let ms = d.as_millis();
        if ms > i32::MAX as u128 {
            return Err(HarnessError::InvalidConfig(format!(
                "apply delay {d:?} is too large"
            )));
        }
        self.set_config(
            node,
            "recovery_min_apply_delay",
            &format!("{ms}ms"),
            &ms.to_string(),
        )
        .await
    }

    /// Stops standby `node` from receiving WAL (an empty
    /// `primary_conninfo`) and waits until its WAL receiver is gone: what
    /// the primary writes from now on exists only there, as with an
    /// asynchronous standby cut off just before a failover.
    /// [`PgCluster::promote`] points it at the new primary again.
    pub async fn stop_wal_receiver(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.set_config(node, "primary_conninfo", "", "").await?;
        let client = self.control(node).await?;
        self.wait_value(
            node,
            &client,
            "SELECT count(*)::text FROM pg_stat_wal_receiver",
            "0",
            "the WAL receiver to stop",
            Duration::from_secs(30),
        )
        .await
    }

    /// Fast shutdown of `node` (`SIGINT`); waits for the server to exit.
    pub async fn stop_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.stop_node(node).await
    }

    /// Crashes `node` (immediate shutdown, `SIGQUIT`); waits for the server
    /// to exit and its port to refuse connections.
    pub async fn kill_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.kill_node(node).await
    }

    /// Freezes `node` like a host that hangs without closing connections
    /// (a network partition, a paused VM): every process of its server is
    /// stopped with `SIGSTOP`. Connections stay open and nothing answers;
    /// new connections are accepted by the kernel but never served.
    /// [`PgCluster::thaw_node`] resumes it; stopping the cluster also does.
    /// Local backend only.
    pub async fn freeze_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.freeze_node(node, true).await
    }

    /// Resumes a node frozen by [`PgCluster::freeze_node`].
    pub async fn thaw_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        self.backend.freeze_node(node, false).await
    }

    /// Restarts a stopped or killed node on the same port and waits until it
    /// accepts connections. A standby whose upstream was replaced by a
    /// promotion while it was down is repointed to the current primary.
    ///
    /// With the Docker backend the engine may map a different host port
    /// after a restart; [`PgCluster::config`] always reports the current one.
    pub async fn start_node(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        if self.backend.is_running(node) {
            return Err(HarnessError::InvalidState {
                node,
                message: "already running".into(),
            });
        }
        self.backend.start_node(node).await?;
        let (role, primary) = {
            let t = self.topo();
            (t.roles[node], t.primary())
        };
        if let Role::Standby { upstream } = role {
            if upstream != primary {
                self.repoint(node, primary).await?;
            }
        }
        Ok(())
    }

    /// Promotes the standby `node` (`pg_promote(true)`), waits until it left
    /// recovery, makes it [`PgCluster::primary`] and repoints every other
    /// running standby's `primary_conninfo` to it (stopped standbys are
    /// repointed by [`PgCluster::start_node`]). The former primary is left
    /// as it is; stop it first for a clean failover.
    pub async fn promote(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        let role = self.topo().roles[node];
        if !matches!(role, Role::Standby { .. }) {
            return Err(HarnessError::InvalidState {
                node,
                message: format!("cannot promote a node that is not a standby ({role:?})"),
            });
        }
        let client = self.control(node).await?;
        let row = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .map_err(|e| self.pg_err(node, "pg_promote()", e))?;
        let promoted: bool = row.get(0);
        if !promoted {
            return Err(HarnessError::InvalidState {
                node,
                message: format!(
                    "pg_promote() returned false\n--- server log tail ---\n{}",
                    self.log_tail(node, ERROR_LOG_LINES)
                ),
            });
        }
        self.wait_value(
            node,
            &client,
            "SELECT pg_is_in_recovery()::text",
            "false",
            "the promoted node to leave recovery",
            Duration::from_secs(60),
        )
        .await?;
        let followers: Vec<NodeIndex> = {
            let mut t = self.topo();
            let old = t.primary();
            t.roles[old] = Role::Retired;
            t.roles[node] = Role::Primary;
            t.roles
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r, Role::Standby { .. }))
                .map(|(i, _)| i)
                .collect()
        };
        for f in followers {
            if self.backend.is_running(f) {
                self.repoint(f, node).await?;
            }
        }
        Ok(())
    }

    /// Turns a former primary (replaced by [`PgCluster::promote`]) into a
    /// standby of the current primary: stops it if running, runs
    /// `pg_rewind` against the current primary, configures streaming from
    /// it and starts it. Local backend only.
    pub async fn rejoin_as_standby(&self, node: NodeIndex) -> Result<(), HarnessError> {
        self.check(node)?;
        let (role, primary) = {
            let t = self.topo();
            (t.roles[node], t.primary())
        };
        if role != Role::Retired {
            return Err(HarnessError::InvalidState {
                node,
                message: format!("only a former primary can be rejoined ({role:?})"),
            });
        }
        if self.backend.is_running(node) {
            self.backend.stop_node(node).await?;
        }
        // pg_rewind reads the source's timeline from pg_control, which a
        // freshly promoted server only updates at its next checkpoint.
        let source = self.control(primary).await?;
        self.exec(primary, &source, "CHECKPOINT").await?;
        self.backend.rewind_node(node, primary).await?;
        self.backend.start_node(node).await?;
        self.topo().roles[node] = Role::Standby { upstream: primary };
        Ok(())
    }

    /// `pg_last_wal_replay_lsn()` of `node`: `None` on a node that never
    /// was in recovery.
    pub async fn replay_lsn(&self, node: NodeIndex) -> Result<Option<Lsn>, HarnessError> {
        let client = self.control(node).await?;
        self.query_lsn(node, &client, "SELECT pg_last_wal_replay_lsn()::text")
            .await
    }

    /// `pg_current_wal_insert_lsn()` of the current primary.
    pub async fn current_lsn(&self) -> Result<Lsn, HarnessError> {
        let node = self.primary();
        let client = self.control(node).await?;
        self.query_lsn(node, &client, "SELECT pg_current_wal_insert_lsn()::text")
            .await?
            .ok_or_else(|| HarnessError::InvalidState {
                node,
                message: "pg_current_wal_insert_lsn() returned NULL".into(),
            })
    }

    /// `pg_current_wal_flush_lsn()` of the current primary.
    pub async fn flush_lsn(&self) -> Result<Lsn, HarnessError> {
        let node = self.primary();
        let client = self.control(node).await?;
        self.query_lsn(node, &client, "SELECT pg_current_wal_flush_lsn()::text")
            .await?
            .ok_or_else(|| HarnessError::InvalidState {
                node,
                message: "pg_current_wal_flush_lsn() returned NULL".into(),
            })
    }

    /// Polls until `node` has replayed up to `lsn`, failing after `timeout`.
    ///
    /// `lsn` is first passed through [`Lsn::round_to_record_boundary`], so
    /// a value from [`PgCluster::current_lsn`] that points just past a page
    /// header is reachable. On a node that is not in recovery (the primary)
    /// its flush position counts as replayed.
    pub async fn wait_for_replay(
        &self,
        node: NodeIndex,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        self.check(node)?;
        let target = lsn.round_to_record_boundary(DEFAULT_WAL_SEGMENT_SIZE);
        let deadline = Instant::now() + timeout;
        let mut client: Option<tokio_postgres::Client> = None;
        let mut last = String::from("nothing observed yet");
        loop {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match self.control(node).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        last = format!("connect failed: {e}");
                        client = None;
                    }
                }
            }
            if let Some(c) = &client {
                match self.applied_lsn(node, c).await {
                    Ok(Some(applied)) if applied >= target => return Ok(()),
                    Ok(applied) => {
                        last = format!(
                            "replayed {}",
                            applied.map_or_else(|| "NULL".to_string(), |l| l.to_string())
                        )
                    }
                    Err(e) => {
                        last = format!("query failed: {e}");
                        client = None;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    node,
                    &format!("node {node} to replay {target}"),
                    timeout,
                    last,
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until every running standby has replayed the primary's current
    /// flush position (read once at the start).
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        let target = self.flush_lsn().await?;
        for node in self.replicas() {
            if !self.backend.is_running(node) {
                continue;
            }
            let left = timeout.saturating_sub(started.elapsed());
            self.wait_for_replay(node, target, left).await?;
        }
        Ok(())
    }

    /// The last `lines` lines of the node's server log (for diagnostics).
    pub fn log_tail(&self, node: NodeIndex, lines: usize) -> String {
        if self.check(node).is_err() {
            return String::new();
        }
        self.backend.log_tail(node, lines)
    }

    // ----- internals -----

    fn topo(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, node: NodeIndex) -> Result<(), HarnessError> {
        let count = self.node_count();
        if node < count {
            Ok(())
        } else {
            Err(HarnessError::NoSuchNode { node, count })
        }
    }

    fn assert_node(&self, node: NodeIndex) {
        if let Err(e) = self.check(node) {
            panic!("{e}");
        }
    }

    fn pg_err(&self, node: NodeIndex, context: &str, e: tokio_postgres::Error) -> HarnessError {
        HarnessError::Postgres {
            node,
            context: context.to_string(),
            source: e,
            log_tail: self.log_tail(node, ERROR_LOG_LINES),
        }
    }

    fn timeout(
        &self,
        node: NodeIndex,
        what: &str,
        timeout: Duration,
        state: String,
    ) -> HarnessError {
        HarnessError::Timeout {
            what: what.to_string(),
            timeout,
            detail: format!(
                "last state: {state}\n--- node {node} log tail ---\n{}",
                self.log_tail(node, ERROR_LOG_LINES)
            ),
        }
    }

    /// A connection for the harness' own queries.
    async fn control(&self, node: NodeIndex) -> Result<tokio_postgres::Client, HarnessError> {
        self.check(node)?;
        let config = self
            .backend
            .control_config(node)
            .unwrap_or_else(|| self.config(node));
        connect_config(&config)
            .await
            .map_err(|e| self.pg_err(node, "connect", e))
    }

    async fn exec(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
        sql: &str,
    ) -> Result<(), HarnessError> {
        client
            .batch_execute(sql)
            .await
            .map_err(|e| self.pg_err(node, sql, e))
    }

    async fn query_lsn(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
        sql: &str,
    ) -> Result<Option<Lsn>, HarnessError> {
        let row = client
            .query_one(sql, &[])
            .await
            .map_err(|e| self.pg_err(node, sql, e))?;
        let text: Option<String> = row.get(0);
        text.map(|t| {
            t.parse::<Lsn>().map_err(|_| HarnessError::InvalidState {
                node,
                message: format!("cannot parse LSN {t:?} returned by `{sql}`"),
            })
        })
        .transpose()
    }

    /// Replay position on a standby, flush position on a primary.
    async fn applied_lsn(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
    ) -> Result<Option<Lsn>, HarnessError> {
        self.query_lsn(
            node,
            client,
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_flush_lsn() END)::text",
        )
        .await
    }

    /// `ALTER SYSTEM SET name = value`, reload, and wait until
    /// `pg_settings.setting` equals `expect`.
    async fn set_config(
        &self,
        node: NodeIndex,
        name: &str,
        value: &str,
        expect: &str,
    ) -> Result<(), HarnessError> {
        let client = self.control(node).await?;
        self.exec(
            node,
            &client,
            &format!("ALTER SYSTEM SET {name} = {}", quote_literal(value)),
        )
        .await?;
        self.exec(node, &client, "SELECT pg_reload_conf()").await?;
        self.wait_value(
            node,
            &client,
            &format!(
                "SELECT setting FROM pg_settings WHERE name = {}",
                quote_literal(name)
            ),
            expect,
            &format!("{name} to become {expect:?} after reload"),
            Duration::from_secs(30),
        )
        .await
    }

    /// Polls `sql` (one text value) on `node` until it returns `want`, for
    /// up to `timeout`; the error names `what` and the last value seen.
    async fn wait_value(
        &self,
        node: NodeIndex,
        client: &tokio_postgres::Client,
        sql: &str,
        want: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let row = client
                .query_one(sql, &[])
                .await
                .map_err(|e| self.pg_err(node, sql, e))?;
            let current: String = row.get(0);
            if current == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    node,
                    what,
                    timeout,
                    format!("{sql} returned {current:?}"),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Points standby `node` at `upstream` and records it.
    async fn repoint(&self, node: NodeIndex, upstream: NodeIndex) -> Result<(), HarnessError> {
        let conninfo = self.replication_conninfo(node, upstream);
        self.set_config(node, "primary_conninfo", &conninfo, &conninfo)
            .await?;
        if let Role::Standby { upstream: u } = &mut self.topo().roles[node] {
            *u = upstream;
        }
        Ok(())
    }

    /// `primary_conninfo` for `node` streaming from `upstream`.
    fn replication_conninfo(&self, node: NodeIndex, upstream: NodeIndex) -> String {
        replication_conninfo(
            &self.backend.peer_address(upstream),
            &self.user,
            &self.password,
            node,
        )
    }
}

/// `primary_conninfo` value: `peer` is the `host=... port=...` part.
pub(crate) fn replication_conninfo(
    peer: &str,
    user: &str,
    password: &str,
    node: NodeIndex,
) -> String {
    format!(
        "{peer} user={} password={} application_name=node{node}",
        quote_conn_value(user),
        quote_conn_value(password)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_backend_request() {
        assert_eq!(BackendRequest::parse(None).unwrap(), BackendRequest::Auto);
        assert_eq!(
            BackendRequest::parse(Some("")).unwrap(),
            BackendRequest::Auto
        );
        assert_eq!(
            BackendRequest::parse(Some("AUTO")).unwrap(),
            BackendRequest::Auto
        );
        assert_eq!(
            BackendRequest::parse(Some("local")).unwrap(),
            BackendRequest::Local
        );
        assert_eq!(
            BackendRequest::parse(Some("docker")).unwrap(),
            BackendRequest::Docker
        );
        assert!(matches!(
            BackendRequest::parse(Some("k8s")),
            Err(HarnessError::InvalidBackend { .. })
        ));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_conn_value("abc"), "abc");
        assert_eq!(quote_conn_value(""), "''");
        assert_eq!(quote_conn_value("a b'c\\"), "'a b\\'c\\\\'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_conf("a\\'b"), "'a\\\\''b'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn hba() {
        let spec = ClusterSpec {
            replicas: 0,
            settings: vec![],
            user: "u".into(),
            password: "p".into(),
            auth_method: "md5".into(),
        };
        let hba = spec.hba_conf(&["127.0.0.1/32"]);
        assert!(hba.contains("host all all 127.0.0.1/32 md5\n"));
        assert!(hba.contains("host replication all 127.0.0.1/32 md5\n"));
    }
}
