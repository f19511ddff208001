//! [`PgClusterBuilder`]: options and start-up of a [`PgCluster`].

use std::sync::Mutex;
use std::time::Instant;

use crate::backend::ClusterBackend;
use crate::cluster::{Role, Topology};
use crate::spec::ClusterSpec;
use crate::{BackendKind, HarnessError, PgCluster, default_backend, local};

/// Builder for [`PgCluster`]; obtained from [`PgCluster::builder`].
#[derive(Debug, Clone)]
pub struct PgClusterBuilder {
    replicas: usize,
    backend: Option<BackendKind>,
    settings: Vec<(String, String)>,
    user: String,
    password: String,
    auth_method: String,
    image: Option<String>,
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
            image: None,
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

    /// The Docker image to run instead of [`crate::docker_image`]
    /// (`LAGROUTER_PG_IMAGE` or `lagrouter/postgres:15`), as
    /// `repository[:tag]`. An image other than the default must already be
    /// in the engine: nothing is pulled. Ignored by the local backend.
    pub fn image(mut self, image: &str) -> Self {
        self.image = Some(image.to_string());
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
            image: self.image,
        };
        let started = Instant::now();
        let backend: Box<dyn ClusterBackend> = match kind {
            BackendKind::Local => Box::new(local::LocalBackend::create(&spec).await?),
            #[cfg(feature = "docker")]
            BackendKind::Docker => Box::new(crate::docker::DockerBackend::create(&spec).await?),
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
