//! Backend selection (`LAGROUTER_TEST_BACKEND`, Docker detection) and the
//! interface both backends implement.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use crate::{BACKEND_ENV, DOCKER_BACKEND_COMPILED, HarnessError, NodeIndex};

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
/// when `docker_compiled` is true ([`default_backend`] passes "an engine
/// answers and has the image").
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
    Ok(resolve_backend(request, DOCKER_BACKEND_COMPILED, || {
        docker_engine_reachable() && docker_image_present()
    }))
}

/// The image the Docker backend runs.
pub(crate) const DOCKER_IMAGE: &str = "postgres:15";

/// Whether a Docker engine answers `GET /_ping`: at `DOCKER_HOST` when set
/// (`unix://` or `tcp://`), else at `/var/run/docker.sock` or
/// `~/.docker/run/docker.sock`. Each probe gives up after about a second.
pub fn docker_engine_reachable() -> bool {
    docker_get_ok("/_ping")
}

/// Whether the engine already has the PostgreSQL image the Docker backend
/// runs (`GET /images/{name}/json`). Nothing is pulled: where no registry
/// is reachable, an engine without the image cannot start a cluster, so
/// [`default_backend`] does not pick Docker for it.
pub fn docker_image_present() -> bool {
    docker_get_ok(&format!("/images/{DOCKER_IMAGE}/json"))
}

/// Whether the engine answers `GET path` with 200.
fn docker_get_ok(path: &str) -> bool {
    use std::io::{Read, Write};

    fn get<S: Read + Write>(mut stream: S, path: &str) -> bool {
        let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut buf = Vec::new();
        let _ = stream.take(4096).read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        text.starts_with("HTTP/1.") && text.lines().next().is_some_and(|l| l.contains(" 200"))
    }

    fn get_unix(socket: &str, path: &str) -> bool {
        let Ok(stream) = std::os::unix::net::UnixStream::connect(socket) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        get(stream, path)
    }

    fn get_tcp(addr: &str, path: &str) -> bool {
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
                return get(stream, path);
            }
        }
        false
    }

    if let Ok(host) = std::env::var("DOCKER_HOST") {
        let host = host.trim();
        if !host.is_empty() {
            if let Some(socket) = host.strip_prefix("unix://") {
                return get_unix(socket, path);
            }
            if let Some(addr) = host.strip_prefix("tcp://") {
                return get_tcp(addr.trim_end_matches('/'), path);
            }
            return false;
        }
    }
    if get_unix("/var/run/docker.sock", path) {
        return true;
    }
    match std::env::var_os("HOME") {
        Some(home) => {
            let p = std::path::Path::new(&home).join(".docker/run/docker.sock");
            p.to_str().is_some_and(|socket| get_unix(socket, path))
        }
        None => false,
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
}
