//! How lagrouter opens connections: plain TCP, or TLS through rustls.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

/// Opens connections to the nodes, with or without TLS.
#[derive(Clone, Default)]
pub enum Connector {
    /// No TLS (`sslmode=disable`).
    #[default]
    NoTls,
    /// TLS through rustls (feature `rustls`).
    #[cfg(feature = "rustls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::NoTls => f.write_str("NoTls"),
            #[cfg(feature = "rustls")]
            Connector::Rustls(_) => f.write_str("Rustls"),
        }
    }
}

impl Connector {
    /// TLS with the given rustls client configuration.
    #[cfg(feature = "rustls")]
    pub fn rustls(config: rustls::ClientConfig) -> Self {
        Connector::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    /// TLS verified against the Mozilla root certificates (webpki-roots).
    #[cfg(feature = "rustls")]
    pub fn rustls_webpki_roots() -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self::rustls(config)
    }

    /// Opens one connection and spawns its connection task.
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        match self {
            Connector::NoTls => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
                Ok(client)
            }
            #[cfg(feature = "rustls")]
            Connector::Rustls(tls) => {
                let (client, conn) = config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection closed");
                    }
                });
                Ok(client)
            }
        }
    }

    /// A deadpool-postgres pool of `max_size` connections to `config`.
    pub fn pool(
        &self,
        config: tokio_postgres::Config,
        max_size: usize,
        wait_timeout: Option<std::time::Duration>,
    ) -> Result<Pool, deadpool_postgres::BuildError> {
        let mgr_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match self {
            Connector::NoTls => Manager::from_config(config, tokio_postgres::NoTls, mgr_config),
            #[cfg(feature = "rustls")]
            Connector::Rustls(tls) => Manager::from_config(config, tls.clone(), mgr_config),
        };
        Pool::builder(mgr)
            .max_size(max_size)
            .wait_timeout(wait_timeout)
            .create_timeout(wait_timeout)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
    }
}
