//! TLS for client connections: a rustls server configuration (ring crypto
//! provider) built from PEM files.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol name PostgreSQL (17+) uses for direct TLS connections.
pub const POSTGRESQL_ALPN: &[u8] = b"postgresql";

/// An error building the TLS server configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    Read {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("{what} file {}: invalid PEM: {source}", path.display())]
    Pem {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file (empty when parsing from memory).
        path: PathBuf,
        /// The PEM parser's error.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error("certificate file {}: no PEM CERTIFICATE block found", path.display())]
    NoCertificate {
        /// The file (empty when parsing from memory).
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error(
        "private key file {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found",
        path.display()
    )]
    NoPrivateKey {
        /// The file (empty when parsing from memory).
        path: PathBuf,
    },
    /// rustls rejected the certificate or key (for example, they do not
    /// match, or the key type is unsupported).
    #[error("invalid TLS certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds a server configuration from a PEM certificate chain (leaf first)
/// and a PEM private key. TLS 1.2 and 1.3, no client certificates, ALPN
/// `postgresql` advertised (clients that offer no ALPN are accepted too).
pub fn load_server_config(
    cert_path: impl AsRef<Path>,
    key_path: impl AsRef<Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read("certificate", cert_path)?;
    let key_pem = read("private key", key_path)?;
    build(&cert_pem, cert_path, &key_pem, key_path)
}

/// Like [`load_server_config`], from PEM text in memory.
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    build(cert_pem, Path::new(""), key_pem, Path::new(""))
}

fn build(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: "certificate",
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: key_path.to_owned(),
        },
        source => TlsError::Pem {
            what: "private key",
            path: key_path.to_owned(),
            source,
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![POSTGRESQL_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    #[test]
    fn builds_from_memory() {
        let (cert, key) = self_signed();
        let config = server_config_from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(config.alpn_protocols, vec![POSTGRESQL_ALPN.to_vec()]);
    }

    #[test]
    fn typed_errors_from_memory() {
        let (cert, key) = self_signed();
        assert!(matches!(
            server_config_from_pem(b"", key.as_bytes()),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            server_config_from_pem(cert.as_bytes(), b"not a key"),
            Err(TlsError::NoPrivateKey { .. })
        ));
        assert!(matches!(
            server_config_from_pem(cert.as_bytes(), cert.as_bytes()),
            Err(TlsError::NoPrivateKey { .. })
        ));
        let (_, other_key) = self_signed();
        assert!(matches!(
            server_config_from_pem(cert.as_bytes(), other_key.as_bytes()),
            Err(TlsError::Rustls(_))
        ));
    }

    #[test]
    fn load_from_files_and_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let cert_path = dir.path().join("server.crt");
        let key_path = dir.path().join("server.key");
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(&key_path, &key).unwrap();
        load_server_config(&cert_path, &key_path).unwrap();

        let missing = dir.path().join("missing.pem");
        let e = load_server_config(&missing, &key_path).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Read {
                    what: "certificate",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = load_server_config(&cert_path, &missing).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Read {
                    what: "private key",
                    ..
                }
            ),
            "{e:?}"
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_server_config(&garbage, &key_path).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Pem {
                    what: "certificate",
                    ..
                }
            ),
            "{e:?}"
        );
        let truncated = dir.path().join("truncated.pem");
        std::fs::write(&truncated, &cert[..cert.len() / 2]).unwrap();
        let e = load_server_config(&truncated, &key_path).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");
        let e = load_server_config(&key_path, &key_path).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains("server.key"), "{e}");
    }

    #[tokio::test]
    async fn handshake_with_a_client() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let server = server_config_from_pem(
            generated.cert.pem().as_bytes(),
            generated.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(generated.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![POSTGRESQL_ALPN.to_vec()];

        let (a, b) = tokio::io::duplex(16 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let server_task = tokio::spawn(async move {
            let mut tls = acceptor.accept(a).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(POSTGRESQL_ALPN));
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(&buf).await.unwrap();
            tls.flush().await.unwrap();
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, b).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        tls.flush().await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server_task.await.unwrap();
    }
}
