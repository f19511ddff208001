//! Backend selection (`LAGROUTER_TEST_BACKEND`, Docker detection) and the
//! interface both backends implement.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use crate::engine::{docker_image_buildable, find_engine, image_present};
use crate::{BACKEND_ENV, DOCKER_BACKEND_COMPILED, HarnessError, NodeIndex, docker_image};

/// Which implementation runs the PostgreSQL servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Server binaries on this machine, run as child processes.
    Local,
    /// One Docker container per node (feature `docker`), from the image
    /// [`docker_image`] names.
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
    /// Docker when compiled in, an engine is reachable and the image is
    /// present or can be built; else local (see [`default_backend`]).
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
/// `docker_usable`, which is only consulted for [`BackendRequest::Auto`]
/// when `docker_compiled` is true ([`default_backend`] passes "an engine
/// answers, and the image is present or can be built here").
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
    docker_usable: impl FnOnce() -> bool,
) -> BackendKind {
    match request {
        BackendRequest::Local => BackendKind::Local,
        BackendRequest::Docker => BackendKind::Docker,
        BackendRequest::Auto => {
            if docker_compiled && docker_usable() {
                BackendKind::Docker
            } else {
                BackendKind::Local
            }
        }
    }
}

/// The backend a builder without an explicit [`PgClusterBuilder::backend`]
/// uses: `LAGROUTER_TEST_BACKEND` resolved with [`resolve_backend`].
///
/// `auto` picks Docker when the `docker` feature is compiled in, an engine
/// answers, and the image ([`docker_image`]) is present or can be built
/// here without installing anything (the default image, as root, with
/// `mmdebstrap` and the `docker` CLI on `PATH`); else the local binaries.
/// The choice and its reason are printed once per process on standard
/// error. A forced backend is never replaced: if it cannot start, starting
/// a cluster fails with [`HarnessError::BackendUnavailable`].
///
/// [`PgClusterBuilder::backend`]: crate::PgClusterBuilder::backend
pub fn default_backend() -> Result<BackendKind, HarnessError> {
    let request = BackendRequest::from_env()?;
    let mut reason = String::new();
    let kind = resolve_backend(request, DOCKER_BACKEND_COMPILED, || {
        let (usable, why) = docker_usable();
        reason = why;
        usable
    });
    let reason = match request {
        BackendRequest::Auto if !DOCKER_BACKEND_COMPILED => {
            "auto: the `docker` feature of lagrouter-testing is not compiled in".to_string()
        }
        BackendRequest::Auto => format!("auto: {reason}"),
        _ => format!("{BACKEND_ENV}={kind}"),
    };
    announce(kind, &reason);
    Ok(kind)
}

/// Whether the Docker backend can run a cluster here, and why (not).
fn docker_usable() -> (bool, String) {
    let engine = match find_engine() {
        Ok(e) => e,
        Err(why) => return (false, why),
    };
    let image = docker_image();
    let version = format!("{}.{}", engine.api_version.0, engine.api_version.1);
    if image_present(&engine, &image) {
        return (
            true,
            format!("Docker engine (API {version}) with the image {image}"),
        );
    }
    match docker_image_buildable() {
        Ok(()) => (
            true,
            format!(
                "Docker engine (API {version}); the image {image} is missing and will be \
                 built from Debian packages (testing/scripts/build-pg-image.sh)"
            ),
        ),
        Err(why) => (
            false,
            format!(
                "Docker engine (API {version}) reachable, but the image {image} is missing: {why}"
            ),
        ),
    }
}

/// Prints the backend choice once per process, past the test harness's
/// output capture.
fn announce(kind: BackendKind, reason: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "lagrouter-testing: {kind} backend ({reason})"
        );
    });
}

/// The network links of a node (see [`ClusterBackend::set_link`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    /// Reachable by clients and by the other nodes.
    Connected,
    /// Reachable by clients only: the other nodes cannot reach it, nor it
    /// them.
    ClientsOnly,
    /// Reachable by nobody.
    Isolated,
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
    /// Cuts the node's network links as `link` says, or restores them,
    /// while its server keeps running.
    fn set_link(&self, node: NodeIndex, link: Link) -> BoxFut<'_, ()> {
        let _ = (node, link);
        Box::pin(async move {
            Err(HarnessError::BackendUnavailable(format!(
                "cutting a node off the network needs the docker backend (this cluster runs on the {} backend)",
                self.kind()
            )))
        })
    }
    /// The label that every container and network of this cluster carries
    /// (`key=value`), when the backend creates such objects.
    fn cluster_label(&self) -> Option<String> {
        None
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
