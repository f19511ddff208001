//! The embedded demo: a local primary with two streaming replicas started
//! with the test harness ([`lagrouter_testing::PgCluster`]), and a proxy
//! configuration pointing at them. Cargo feature `demo` (on by default).

use lagrouter_testing::{HarnessError, PgCluster};

use crate::config::Config;

/// Demo user and password (the harness's superuser).
pub const DEMO_USER: &str = "postgres";
/// Demo password.
pub const DEMO_PASSWORD: &str = "postgres";

/// A running demo cluster and the configuration that routes to it.
pub struct Demo {
    /// The cluster; dropping it stops every server.
    pub cluster: PgCluster,
    /// Proxy configuration for it.
    pub config: Config,
}

/// Starts a primary and `replicas` streaming replicas and builds the
/// configuration with [`Config::demo`].
pub async fn start(replicas: usize) -> Result<Demo, HarnessError> {
    // Local processes always: the demo promises the server binaries only,
    // and watches (and reaps) its servers as child processes.
    let cluster = PgCluster::builder()
        .backend(lagrouter_testing::BackendKind::Local)
        .replicas(replicas)
        .user(DEMO_USER, DEMO_PASSWORD)
        .start()
        .await?;
    let config = config_for(&cluster, DEMO_USER, DEMO_PASSWORD);
    Ok(Demo { cluster, config })
}

/// A configuration for an already running harness cluster (listeners on
/// the demo defaults; tests override them).
pub fn config_for(cluster: &PgCluster, user: &str, password: &str) -> Config {
    let addr = |i: usize| {
        let c = cluster.config(i);
        let host = match c.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        let port = c.get_ports().first().copied().unwrap_or(5432);
        (host, port)
    };
    let primary = addr(cluster.primary());
    let replicas = cluster.replicas().into_iter().map(addr).collect();
    Config::demo(primary, replicas, user, password)
}

impl Demo {
    /// Resolves when a server of the demo cluster has exited (killed,
    /// crashed, or stopped from outside), with a message naming it and the
    /// end of its log. Checking also reaps an exited server, so none is
    /// left a zombie.
    pub async fn server_exited(&self) -> String {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            for node in 0..self.cluster.node_count() {
                if !self.cluster.is_running(node) {
                    let role = if node == self.cluster.primary() {
                        "primary"
                    } else {
                        "replica"
                    };
                    return format!(
                        "demo {role} (node {node}) exited; stopping the demo. Its log ends:\n{}",
                        self.cluster.log_tail(node, 5)
                    );
                }
            }
        }
    }
}

/// The `psql` command line for a proxy listening on `addr`.
pub fn psql_command(addr: std::net::SocketAddr, user: &str, password: &str) -> String {
    format!(
        "psql \"host={} port={} user={user} password={password} dbname=postgres\"",
        addr.ip(),
        addr.port()
    )
}
