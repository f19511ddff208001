//! The server side: one connection from the proxy to a PostgreSQL node,
//! with startup and authentication (SCRAM-SHA-256 through
//! `postgres-protocol`, md5, cleartext, trust), framed reads and buffered
//! writes.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::{self, ErrorFields, Frame, ProtocolError};
use lagrouter::routing::Failure;

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendTarget {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Server user.
    pub user: String,
    /// Server password (`None` for trust).
    pub password: Option<String>,
    /// Database.
    pub database: String,
}

/// What is needed to cancel the query running on a backend connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    /// The server's address.
    pub addr: SocketAddr,
    /// Backend process id.
    pub pid: i32,
    /// Backend secret key.
    pub secret: i32,
    /// The node the connection belongs to.
    pub node: usize,
    /// When the connection was opened.
    pub created_at: Instant,
}

/// A failure talking to a backend. Server errors keep their SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Network failure.
    #[error("I/O error talking to the server: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an error.
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(ErrorFields),
    /// Authentication with the server could not be completed.
    #[error("server authentication failed: {0}")]
    Auth(String),
    /// The server sent something that is not valid protocol.
    #[error("protocol error from the server: {0}")]
    Protocol(#[from] ProtocolError),
    /// Connecting took too long.
    #[error("timed out connecting to the server")]
    Timeout,
    /// The connection was closed by the server.
    #[error("the server closed the connection")]
    Closed,
    /// The server stopped answering (a hung host): a wait on it timed out,
    /// or the lag monitor ejected its node.
    #[error("the server stopped answering: {0}")]
    Unresponsive(String),
}

impl BackendError {
    /// SQLSTATE to report to a client for this failure.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Server(f) if !f.code.is_empty() => &f.code,
            BackendError::Auth(_) => "28000",
            BackendError::Protocol(_) => "08P01",
            _ => "08006",
        }
    }

    /// Whether the node itself looks unreachable (to eject it).
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            BackendError::Io(_)
                | BackendError::Timeout
                | BackendError::Closed
                | BackendError::Unresponsive(_)
        ) || matches!(self, BackendError::Server(f)
            if Failure::classify(&f.code, &f.message, f.detail.as_deref()) == Failure::Connection)
    }
}

/// One authenticated connection to a node.
pub struct BackendConn {
    stream: TcpStream,
    rbuf: BytesMut,
    /// Messages queued for the server; sent by [`BackendConn::flush`].
    pub wbuf: BytesMut,
    /// Index of the node.
    pub node: usize,
    /// The server's address (for cancel requests).
    pub addr: SocketAddr,
    /// Backend process id.
    pub pid: i32,
    /// Backend secret key.
    pub secret: i32,
    /// `ParameterStatus` values as last reported by the server.
    pub server_params: BTreeMap<String, String>,
    /// Proxy-global names of the prepared statements this connection has.
    pub prepared: HashSet<String>,
    /// Whether the position probe statement is prepared here.
    pub probe_prepared: bool,
    /// Session settings applied by the proxy (name → replay SQL).
    pub applied: BTreeMap<String, String>,
    /// Set when the connection must not be reused.
    pub broken: bool,
    /// When the connection was opened.
    pub created_at: Instant,
    /// When it was last returned to the pool.
    pub idle_since: Instant,
    /// The worker whose event loop the socket is registered with
    /// ([`super::home`]).
    pub home: usize,
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .field("pid", &self.pid)
            .finish()
    }
}

impl BackendConn {
    /// Moves the socket to the event loop of the worker running this
    /// thread if it is registered with another one (a connection opened by
    /// a session on another worker, or by pool maintenance), so that its
    /// readiness wakes this thread directly. Must run inside a runtime.
    pub fn rehome(self: Box<Self>) -> io::Result<Box<Self>> {
        let here = super::home::current();
        if self.home == here {
            return Ok(self);
        }
        let mut conn = *self;
        let std = conn.stream.into_std()?;
        conn.stream = TcpStream::from_std(std)?;
        conn.home = here;
        Ok(Box::new(conn))
    }

    /// Connects and authenticates, within `timeout`.
    pub async fn connect(
        node: usize,
        target: &BackendTarget,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        match tokio::time::timeout(timeout, Self::connect_inner(node, target)).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout),
        }
    }

    async fn connect_inner(node: usize, target: &BackendTarget) -> Result<Self, BackendError> {
        let stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
        stream.set_nodelay(true)?;
        let addr = stream.peer_addr()?;
        let now = Instant::now();
        let mut conn = BackendConn {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(8192),
            node,
            addr,
            pid: 0,
            secret: 0,
            server_params: BTreeMap::new(),
            prepared: HashSet::new(),
            probe_prepared: false,
            applied: BTreeMap::new(),
            broken: false,
            created_at: now,
            idle_since: now,
            home: super::home::current(),
        };
        let params = [
            ("user", target.user.as_str()),
            ("database", target.database.as_str()),
            ("application_name", "lagrouter-proxy"),
        ];
        frontend::startup_message(params.iter().copied(), &mut conn.wbuf)?;
        conn.flush().await?;
        conn.authenticate(target).await?;
        // Parameter status, key data, ready for query.
        loop {
            let frame = conn.read_frame().await?;
            match frame.tag {
                b'S' => conn.note_parameter(&frame),
                b'K' => {
                    if let Ok(Message::BackendKeyData(k)) = wire::parse_backend(&frame) {
                        conn.pid = k.process_id();
                        conn.secret = k.secret_key();
                    }
                }
                b'Z' => break,
                b'E' => return Err(BackendError::Server(wire::error_fields(&frame))),
                b'N' => {}
                b'v' => {}
                other => {
                    return Err(BackendError::Auth(format!(
                        "unexpected message {:?} during startup",
                        char::from(other)
                    )));
                }
            }
        }
        Ok(conn)
    }

    async fn authenticate(&mut self, target: &BackendTarget) -> Result<(), BackendError> {
        let password = || {
            target.password.as_deref().ok_or_else(|| {
                BackendError::Auth("the server asks for a password but none is configured".into())
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            if frame.tag == b'E' {
                return Err(BackendError::Server(wire::error_fields(&frame)));
            }
            if frame.tag != b'R' {
                return Err(BackendError::Auth(format!(
                    "expected an authentication request, got {:?}",
                    char::from(frame.tag)
                )));
            }
            match wire::parse_backend(&frame)? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.wbuf)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        target.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut has_scram = false;
                    let mut mechs = body.mechanisms();
                    use fallible_iterator::FallibleIterator;
                    while let Some(m) = mechs.next()? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(BackendError::Auth(
                            "the server offers no supported SASL mechanism".into(),
                        ));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut self.wbuf,
                    )?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| BackendError::Auth("unexpected SASL continue".into()))?;
                    s.update(body.data())
                        .map_err(|e| BackendError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| BackendError::Auth("unexpected SASL final".into()))?;
                    s.finish(body.data())
                        .map_err(|e| BackendError::Auth(e.to_string()))?;
                    continue;
                }
                _ => {
                    return Err(BackendError::Auth(
                        "the server asks for an unsupported authentication method".into(),
                    ));
                }
            }
            self.flush().await?;
        }
    }

    /// Records a `ParameterStatus` frame.
    pub fn note_parameter(&mut self, frame: &Frame) {
        if let Ok(Message::ParameterStatus(p)) = wire::parse_backend(frame) {
            if let (Ok(n), Ok(v)) = (p.name(), p.value()) {
                self.server_params.insert(n.to_string(), v.to_string());
            }
        }
    }

    /// Reads one complete message. Cancel-safe: a partially read message
    /// stays buffered.
    pub async fn read_frame(&mut self) -> Result<Frame, BackendError> {
        loop {
            if let Some(f) = wire::split_frame(&mut self.rbuf, wire::MAX_BACKEND_MESSAGE_LEN)? {
                return Ok(f);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(8192);
            }
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                self.broken = true;
                return Err(BackendError::Closed);
            }
        }
    }

    /// Whether a complete message is already buffered.
    pub fn has_buffered_frame(&self) -> bool {
        if self.rbuf.len() < 5 {
            return false;
        }
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        len >= 4 && self.rbuf.len() > len as usize
    }

    /// Sends everything queued in [`BackendConn::wbuf`].
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Runs one simple query to completion and returns its rows as text
    /// (for the proxy's own setup statements). Server errors are returned.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, BackendError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'D' => rows.push(wire::data_row_texts(&f)),
                b'E' => error = Some(wire::error_fields(&f)),
                b'S' => self.note_parameter(&f),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(BackendError::Server(e)),
            None => Ok(rows),
        }
    }

    /// Where to send a cancel request for this connection.
    pub fn cancel_target(&self) -> CancelTarget {
        CancelTarget {
            addr: self.addr,
            pid: self.pid,
            secret: self.secret,
            node: self.node,
            created_at: self.created_at,
        }
    }

    /// Sends `Terminate` and closes (best effort).
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_millis(200), self.flush()).await;
    }
}

/// Sends a `CancelRequest` for `target` on a new connection.
pub async fn send_cancel(target: CancelTarget) -> io::Result<()> {
    let mut buf = BytesMut::new();
    frontend::cancel_request(target.pid, target.secret, &mut buf);
    let fut = async {
        let mut s = TcpStream::connect(target.addr).await?;
        s.write_all(&buf).await?;
        // The server closes the connection after processing the request.
        let mut sink = [0u8; 16];
        let _ = s.read(&mut sink).await;
        Ok::<_, io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "cancel timed out")))
}
