//! The Docker engine as the backend selection sees it, without a client
//! library: where it listens, whether it answers and with which API
//! version, whether it has the PostgreSQL image, and whether that image can
//! be built here. Compiled with or without the `docker` feature.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Environment variable naming the image the Docker backend runs.
pub const PG_IMAGE_ENV: &str = "LAGROUTER_PG_IMAGE";

/// The image the Docker backend runs unless [`PG_IMAGE_ENV`] names
/// another: Debian's `postgresql-15` packages, built on this machine by
/// `testing/scripts/build-pg-image.sh` (no registry needed).
pub const DEFAULT_DOCKER_IMAGE: &str = "lagrouter/postgres:15";

/// How long one raw request to the engine may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The image the Docker backend runs: `LAGROUTER_PG_IMAGE` when set and
/// non-empty (for example `postgres:15`, the official image, where a
/// registry is reachable), else [`DEFAULT_DOCKER_IMAGE`].
pub fn docker_image() -> String {
    match std::env::var(PG_IMAGE_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => DEFAULT_DOCKER_IMAGE.to_string(),
    }
}

/// Where the engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EngineAddr {
    /// A Unix socket path.
    Unix(String),
    /// `host:port` of a plain-TCP engine.
    Tcp(String),
}

/// A reachable engine: its address and the highest API version it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Engine {
    pub(crate) addr: EngineAddr,
    /// `(major, minor)` from the `Api-Version` header of `/_ping`.
    pub(crate) api_version: (usize, usize),
}

/// Why no engine can be used, for messages.
pub(crate) const NO_ENGINE: &str = "no Docker engine answers at DOCKER_HOST, \
     /var/run/docker.sock or ~/.docker/run/docker.sock";

/// Finds the engine: `DOCKER_HOST` (`unix://` or `tcp://`) when set, else
/// the first of `/var/run/docker.sock` and `~/.docker/run/docker.sock`
/// that answers `GET /_ping`. Engines behind TLS (`DOCKER_TLS_VERIFY`) are
/// not supported.
pub(crate) fn find_engine() -> Result<Engine, String> {
    let candidates: Vec<EngineAddr> = match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.trim().is_empty() => {
            let host = host.trim();
            if std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty()) {
                return Err(format!(
                    "DOCKER_HOST={host} with DOCKER_TLS_VERIFY: engines behind TLS are not supported"
                ));
            }
            if let Some(socket) = host.strip_prefix("unix://") {
                vec![EngineAddr::Unix(socket.to_string())]
            } else if let Some(addr) = host.strip_prefix("tcp://") {
                vec![EngineAddr::Tcp(addr.trim_end_matches('/').to_string())]
            } else {
                return Err(format!(
                    "DOCKER_HOST={host}: only unix:// and tcp:// are supported"
                ));
            }
        }
        _ => {
            let mut v = vec![EngineAddr::Unix("/var/run/docker.sock".into())];
            if let Some(home) = std::env::var_os("HOME") {
                let p = Path::new(&home).join(".docker/run/docker.sock");
                if let Some(s) = p.to_str() {
                    v.push(EngineAddr::Unix(s.to_string()));
                }
            }
            v
        }
    };
    for addr in candidates {
        if let Some(resp) = get(&addr, "/_ping") {
            if resp.status == 200 {
                let api_version = resp
                    .header("api-version")
                    .and_then(parse_api_version)
                    .unwrap_or((1, 41));
                return Ok(Engine { addr, api_version });
            }
        }
    }
    Err(NO_ENGINE.to_string())
}

/// Parses `1.41` into `(1, 41)`.
pub(crate) fn parse_api_version(v: &str) -> Option<(usize, usize)> {
    let (major, minor) = v.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether a Docker engine answers `GET /_ping`: at `DOCKER_HOST` when set
/// (`unix://` or `tcp://`), else at `/var/run/docker.sock` or
/// `~/.docker/run/docker.sock`. Each probe gives up after about two
/// seconds.
pub fn docker_engine_reachable() -> bool {
    find_engine().is_ok()
}

/// Whether the engine has the image the Docker backend runs
/// ([`docker_image`]). Nothing is pulled.
pub fn docker_image_present() -> bool {
    find_engine().is_ok_and(|e| image_present(&e, &docker_image()))
}

/// Whether the engine has `image` (`GET /images/{image}/json`).
pub(crate) fn image_present(engine: &Engine, image: &str) -> bool {
    get(&engine.addr, &format!("/images/{image}/json")).is_some_and(|r| r.status == 200)
}

/// Whether the default image can be built here without installing
/// anything: the requested image is [`DEFAULT_DOCKER_IMAGE`], the process
/// runs as root (mmdebstrap's root mode), and `mmdebstrap`, `docker` and
/// `flock` are on `PATH`. Otherwise the reason it cannot.
pub(crate) fn docker_image_buildable() -> Result<(), String> {
    let image = docker_image();
    if image != DEFAULT_DOCKER_IMAGE {
        return Err(format!(
            "{image} (from {PG_IMAGE_ENV}) is not built here; pull it where a registry is reachable"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("building it needs root (mmdebstrap in root mode)".into());
    }
    for tool in ["mmdebstrap", "docker", "flock"] {
        if !on_path(tool) {
            return Err(format!("building it needs `{tool}` on PATH"));
        }
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let p = dir.join(tool);
            std::fs::metadata(&p).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// Status line and headers of a raw HTTP/1.0 answer.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on the engine's unversioned API, reading the status line and
/// headers; `None` when the engine cannot be reached or does not speak HTTP.
fn get(addr: &EngineAddr, path: &str) -> Option<Response> {
    fn exchange<S: Read + Write>(mut stream: S, path: &str) -> Option<Response> {
        let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut buf = Vec::new();
        let _ = stream.take(16 * 1024).read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        let head = text.split("\r\n\r\n").next()?;
        let mut lines = head.lines();
        let status_line = lines.next()?;
        if !status_line.starts_with("HTTP/1.") {
            return None;
        }
        let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(Response { status, headers })
    }

    match addr {
        EngineAddr::Unix(socket) => {
            let stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
            stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
            stream.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
            exchange(stream, path)
        }
        EngineAddr::Tcp(hostport) => {
            use std::net::ToSocketAddrs;
            for a in hostport.to_socket_addrs().ok()? {
                if let Ok(stream) = std::net::TcpStream::connect_timeout(&a, PROBE_TIMEOUT) {
                    stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
                    stream.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
                    return exchange(stream, path);
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions() {
        assert_eq!(parse_api_version("1.41"), Some((1, 41)));
        assert_eq!(parse_api_version(" 1.53\r"), Some((1, 53)));
        assert_eq!(parse_api_version("141"), None);
        assert_eq!(parse_api_version("1.x"), None);
    }

    #[test]
    fn a_missing_socket_is_not_an_engine() {
        assert!(
            get(
                &EngineAddr::Unix("/nonexistent/docker.sock".into()),
                "/_ping"
            )
            .is_none()
        );
    }
}
