//! The client side: the connection from an application to the proxy,
//! SSL/GSS negotiation, the startup packet, cancel requests and
//! authentication. After a successful startup the connection is handed to
//! [`crate::session`].

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgwire::messages::PgWireFrontendMessage;
use pgwire::messages::startup::Authentication;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::auth::{self, AuthError, ScramServer, ScramVerifier};
use crate::config::AuthMethod;
use crate::protocol::{self, Frame, PgError, ProtocolError, StartupPacket};
use crate::server::{Shared, UserEntry};

/// A client's byte stream: plain TCP or TLS.
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS through rustls.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Momentarily detached while TLS is being negotiated.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream detached")
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Detached => Poll::Ready(Ok(())),
        }
    }
}

/// Why a client connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network failure.
    #[error("client I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("client protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// The client closed the connection.
    #[error("client disconnected")]
    Closed,
    /// The proxy reported a fatal error to the client and closed.
    #[error("{0}")]
    Fatal(PgError),
}

/// A client connection with its buffers.
pub struct ClientConn {
    stream: ClientStream,
    /// Bytes received and not yet framed.
    pub rbuf: BytesMut,
    /// Bytes to send; written by [`ClientConn::flush`].
    pub wbuf: BytesMut,
    /// The client's address.
    pub peer: SocketAddr,
}

impl ClientConn {
    /// Wraps a stream.
    pub fn new(stream: ClientStream, peer: SocketAddr) -> Self {
        ClientConn {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(8192),
            peer,
        }
    }

    /// Splits one complete message off the receive buffer, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        protocol::split_frame(&mut self.rbuf, protocol::MAX_MESSAGE_LEN)
    }

    /// Whether a complete message (or a malformed header) is buffered.
    pub fn has_frame(&self) -> bool {
        if self.rbuf.len() < 5 {
            return false;
        }
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        len < 4 || len as usize > protocol::MAX_MESSAGE_LEN || self.rbuf.len() > len as usize
    }

    /// Reads more bytes into the receive buffer (cancel-safe). Fails with
    /// [`ClientError::Closed`] at end of stream.
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(8192);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Reads one complete message.
    pub async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Writes out the send buffer.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        r?;
        self.stream.flush().await
    }

    /// Sends a fatal error and closes (best effort).
    pub async fn fatal(&mut self, err: &PgError) {
        err.encode(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await;
    }
}

/// What a client asked for in its startup packet, after authentication.
#[derive(Clone, Debug)]
pub struct StartupInfo {
    /// The client user.
    pub user: String,
    /// The database.
    pub database: String,
    /// Other parameters (`application_name`, `client_encoding`, GUCs, …),
    /// lower-cased names, `options` expanded.
    pub params: BTreeMap<String, String>,
    /// The user's configuration.
    pub entry: Arc<UserEntry>,
}

/// Runs one client connection from accept to close.
pub async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let mut conn = ClientConn::new(ClientStream::Plain(tcp), peer);
    let login_timeout = shared.settings().config.proxy.client_login_timeout;
    let startup = tokio::time::timeout(login_timeout, startup(&shared, &mut conn)).await;
    let info = match startup {
        Ok(Ok(Some(info))) => info,
        Ok(Ok(None)) => return, // cancel request or clean close
        Ok(Err(ClientError::Fatal(e))) => {
            debug!(%peer, error = %e, "startup refused");
            conn.fatal(&e).await;
            return;
        }
        Ok(Err(ClientError::Protocol(e))) => {
            debug!(%peer, error = %e, "startup protocol violation");
            metrics::counter!(crate::admin::PROTOCOL_ERRORS_TOTAL).increment(1);
            conn.fatal(&PgError::fatal(
                protocol::SQLSTATE_PROTOCOL_VIOLATION,
                e.to_string(),
            ))
            .await;
            return;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "client left during startup");
            return;
        }
        Err(_) => {
            conn.fatal(&PgError::fatal(
                "08006",
                "canceling authentication due to timeout",
            ))
            .await;
            return;
        }
    };
    crate::session::run(shared, conn, info).await;
}

async fn read_startup_packet(conn: &mut ClientConn) -> Result<Bytes, ClientError> {
    loop {
        if let Some(p) = protocol::split_startup(&mut conn.rbuf)? {
            return Ok(p);
        }
        conn.fill().await?;
    }
}

/// Negotiation, startup packet and authentication. `Ok(None)` when the
/// connection was a cancel request.
async fn startup(
    shared: &Arc<Shared>,
    conn: &mut ClientConn,
) -> Result<Option<StartupInfo>, ClientError> {
    let mut tls_done = false;
    let mut gss_done = false;
    let startup = loop {
        let packet = read_startup_packet(conn).await?;
        match protocol::decode_startup(&packet)? {
            StartupPacket::Ssl => {
                if tls_done {
                    return Err(ProtocolError::Malformed {
                        what: "SSLRequest",
                        detail: "duplicate SSLRequest".into(),
                    }
                    .into());
                }
                tls_done = true;
                // Bytes sent after the SSLRequest before our answer would be
                // processed unencrypted (CVE-2021-23222): refuse them.
                if !conn.rbuf.is_empty() {
                    return Err(ProtocolError::Malformed {
                        what: "SSLRequest",
                        detail: "unencrypted data after SSLRequest".into(),
                    }
                    .into());
                }
                let acceptor = shared.settings().tls.clone();
                match acceptor {
                    Some(acceptor) => {
                        conn.stream.write_all(b"S").await?;
                        let ClientStream::Plain(tcp) =
                            std::mem::replace(&mut conn.stream, ClientStream::Detached)
                        else {
                            return Err(ClientError::Closed);
                        };
                        let tls = acceptor.accept(tcp).await?;
                        conn.stream = ClientStream::Tls(Box::new(tls));
                    }
                    None => conn.stream.write_all(b"N").await?,
                }
            }
            StartupPacket::Gss => {
                if gss_done {
                    return Err(ProtocolError::Malformed {
                        what: "GSSENCRequest",
                        detail: "duplicate GSSENCRequest".into(),
                    }
                    .into());
                }
                gss_done = true;
                conn.stream.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                shared.cancel(pid, secret).await;
                return Ok(None);
            }
            StartupPacket::Startup(s) => break s,
        }
    };

    let mut params: BTreeMap<String, String> = BTreeMap::new();
    let mut unsupported_options = Vec::new();
    let mut user = None;
    let mut database = None;
    let mut replication = false;
    for (k, v) in startup.parameters {
        match k.as_str() {
            "user" => user = Some(v),
            "database" => database = Some(v),
            "replication" => replication = !matches!(v.as_str(), "false" | "off" | "no" | "0"),
            "options" => {
                for (name, value) in
                    parse_options(&v).map_err(|m| ClientError::Fatal(PgError::fatal("22023", m)))?
                {
                    params.insert(name.to_ascii_lowercase(), value);
                }
            }
            k if k.starts_with("_pq_.") => unsupported_options.push(k.to_string()),
            _ => {
                params.insert(k.to_ascii_lowercase(), v);
            }
        }
    }
    if startup.protocol_number_minor != 0 || !unsupported_options.is_empty() {
        protocol::encode(
            &pgwire::messages::startup::NegotiateProtocolVersion::new(0, unsupported_options),
            &mut conn.wbuf,
        );
    }
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Err(ClientError::Fatal(PgError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )));
    };
    if replication {
        return Err(ClientError::Fatal(PgError::fatal(
            "0A000",
            "replication connections are not supported by lagrouter-proxy",
        )));
    }
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    let entry = shared.settings().users.get(&user).cloned();
    authenticate(conn, &user, entry.as_deref()).await?;
    let Some(entry) = entry else {
        unreachable!("authentication fails for unknown users")
    };
    info!(peer = %conn.peer, %user, %database, "client authenticated");
    Ok(Some(StartupInfo {
        user,
        database,
        params,
        entry,
    }))
}

/// Splits the `options` startup parameter (`-c name=value --name=value`,
/// backslash escapes spaces) into settings.
fn parse_options(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or("missing setting after -c in options")?
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else {
            return Err(format!("unsupported command-line option {w:?} in options"));
        };
        let (n, v) = setting.split_once('=').ok_or_else(|| {
            format!("invalid setting {setting:?} in options: expected name=value")
        })?;
        out.push((n.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

fn auth_failed(user: &str) -> ClientError {
    metrics::counter!(crate::admin::AUTH_FAILURES_TOTAL).increment(1);
    ClientError::Fatal(PgError::fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    ))
}

async fn read_password_message(
    conn: &mut ClientConn,
) -> Result<pgwire::messages::startup::PasswordMessageFamily, ClientError> {
    conn.flush().await?;
    let frame = conn.read_frame().await?;
    if frame.tag != b'p' {
        return Err(ClientError::Fatal(PgError::fatal(
            protocol::SQLSTATE_PROTOCOL_VIOLATION,
            format!(
                "expected password response, got message type {:?}",
                char::from(frame.tag)
            ),
        )));
    }
    match protocol::decode_frontend(&frame)? {
        PgWireFrontendMessage::PasswordMessageFamily(p) => Ok(p),
        _ => Err(ProtocolError::UnknownType(frame.tag).into()),
    }
}

fn bad_message(e: impl std::fmt::Display) -> ClientError {
    ClientError::Fatal(PgError::fatal(
        protocol::SQLSTATE_PROTOCOL_VIOLATION,
        format!("malformed authentication message: {e}"),
    ))
}

/// Authenticates the client against its configured user. Unknown users go
/// through the same exchange and fail at the end, as PostgreSQL does.
async fn authenticate(
    conn: &mut ClientConn,
    user: &str,
    entry: Option<&UserEntry>,
) -> Result<(), ClientError> {
    let method = entry.map_or(AuthMethod::ScramSha256, |e| e.auth);
    match method {
        AuthMethod::Trust => {}
        AuthMethod::Md5 => {
            let salt = auth::random_salt();
            protocol::encode(&Authentication::MD5Password(salt.to_vec()), &mut conn.wbuf);
            let p = read_password_message(conn)
                .await?
                .into_password()
                .map_err(bad_message)?;
            let ok = entry.is_some_and(|e| auth::md5_check(user, &e.password, salt, &p.password));
            if !ok {
                warn!(peer = %conn.peer, %user, "md5 authentication failed");
                return Err(auth_failed(user));
            }
        }
        AuthMethod::ScramSha256 => {
            let verifier = match entry.and_then(|e| e.scram.clone()) {
                Some(v) => v,
                // Unknown user: a throwaway verifier so the exchange looks
                // the same and fails.
                None => ScramVerifier::from_password(&format!("{:x}", rand::random::<u128>())),
            };
            let mut server = ScramServer::new(user, verifier);
            protocol::encode(
                &Authentication::SASL(vec![auth::SCRAM_SHA_256.to_string()]),
                &mut conn.wbuf,
            );
            let init = read_password_message(conn)
                .await?
                .into_sasl_initial_response()
                .map_err(bad_message)?;
            if init.auth_method != auth::SCRAM_SHA_256 {
                return Err(ClientError::Fatal(PgError::fatal(
                    protocol::SQLSTATE_PROTOCOL_VIOLATION,
                    "client selected an invalid SASL authentication mechanism",
                )));
            }
            let data = init.data.unwrap_or_default();
            let first = server
                .client_first(&data)
                .map_err(|e| scram_error(conn, user, e))?;
            protocol::encode(
                &Authentication::SASLContinue(Bytes::from(first)),
                &mut conn.wbuf,
            );
            let resp = read_password_message(conn)
                .await?
                .into_sasl_response()
                .map_err(bad_message)?;
            let fin = server
                .client_final(&resp.data)
                .map_err(|e| scram_error(conn, user, e))?;
            if entry.is_none() {
                return Err(auth_failed(user));
            }
            protocol::encode(&Authentication::SASLFinal(Bytes::from(fin)), &mut conn.wbuf);
        }
    }
    if entry.is_none() {
        return Err(auth_failed(user));
    }
    protocol::encode(&Authentication::Ok, &mut conn.wbuf);
    Ok(())
}

fn scram_error(conn: &ClientConn, user: &str, e: AuthError) -> ClientError {
    warn!(peer = %conn.peer, %user, error = %e, "SCRAM authentication failed");
    match e {
        AuthError::Protocol(m) => ClientError::Fatal(PgError::fatal(
            protocol::SQLSTATE_PROTOCOL_VIOLATION,
            format!("malformed SCRAM message: {m}"),
        )),
        _ => auth_failed(user),
    }
}

/// Appends `BackendKeyData`.
pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    use pgwire::messages::startup::{BackendKeyData, SecretKey};
    protocol::encode(&BackendKeyData::new(pid, SecretKey::I32(secret)), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "4MB".into())
            ]
        );
        assert_eq!(
            parse_options(r"-c application_name=a\ b").unwrap(),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
    }
}
