//! One client session after startup: transaction pooling, per-statement
//! routing, read-your-writes probes, prepared-statement translation,
//! session settings replay, COPY and error recovery.
//!
//! # How a statement flows
//!
//! While the client holds no backend connection, simple `Query` messages
//! and extended-protocol batches (everything up to `Sync`, or `Flush`) are
//! classified and routed ([`crate::router`]), and a connection is checked
//! out of the node's pool. Everything sent to that connection is recorded
//! in an expectation queue ([`Expect`]) so that each server message can be
//! attributed: the client's own messages (forwarded), responses the proxy
//! synthesises (for prepared statements the backend already has, for
//! `SET lagrouter.min_token`, …), and the proxy's own statements — the
//! settings prelude and position probes — whose replies are swallowed.
//!
//! The connection returns to the pool when the server reports the session
//! idle (`ReadyForQuery` with status `I`) and nothing is outstanding,
//! unless the session is pinned by session-bound state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lagrouter::exec::POSITION_SQL;
use lagrouter::router::InFlight;
use lagrouter::{ConsistencyToken, Fallback, Lsn};
use pgwire::messages::PgWireFrontendMessage;
use postgres_protocol::message::frontend;
use tracing::{debug, info, warn};

use crate::admin as m;
use crate::backend::{BackendConn, BackendError};
use crate::classify::{
    Classification, RouteHint, StatementKind, reset_statement_sql, set_statement_sql,
};
use crate::frontend::{ClientConn, ClientError, StartupInfo};
use crate::pool::{PoolError, PooledConn};
use crate::protocol::{self, Frame, PgError};
use crate::router::{self as routing, Target};
use crate::server::{CancelSlot, Shared};

/// Name of the proxy's prepared position probe on each backend connection.
pub const PROBE_STATEMENT: &str = "lagrouter_position_probe";
/// The parameter status carrying the session's token, and the name
/// `SHOW lagrouter.token` answers.
pub const TOKEN_PARAMETER: &str = "lagrouter.token";
/// The setting clients use to pass a token in (`SET lagrouter.min_token`).
pub const MIN_TOKEN_SETTING: &str = "lagrouter.min_token";
/// Most extended-protocol messages buffered before a `Sync`/`Flush`.
const MAX_PENDING: usize = 100_000;
/// How often a replica's position is polled while a read waits for it.
const WAIT_POLL: Duration = Duration::from_millis(2);

/// A decoded client message (plus its original bytes for forwarding).
#[derive(Clone, Debug)]
enum CMsg {
    Query {
        sql: Arc<str>,
        frame: Frame,
    },
    Parse {
        name: String,
        sql: Arc<str>,
        types: Arc<[u32]>,
        frame: Frame,
    },
    Bind {
        portal: String,
        stmt: String,
        frame: Frame,
    },
    Describe {
        kind: u8,
        name: String,
        frame: Frame,
    },
    Execute {
        portal: String,
        frame: Frame,
    },
    Close {
        kind: u8,
        name: String,
        frame: Frame,
    },
    Sync {
        frame: Frame,
    },
    Flush {
        frame: Frame,
    },
}

impl CMsg {
    fn decode(frame: Frame) -> Result<CMsg, protocol::ProtocolError> {
        let msg = protocol::decode_frontend(&frame)?;
        Ok(match msg {
            PgWireFrontendMessage::Query(q) => CMsg::Query {
                sql: q.query.into(),
                frame,
            },
            PgWireFrontendMessage::Parse(p) => CMsg::Parse {
                name: p.name.unwrap_or_default(),
                sql: p.query.into(),
                types: p.type_oids.into(),
                frame,
            },
            PgWireFrontendMessage::Bind(b) => CMsg::Bind {
                portal: b.portal_name.unwrap_or_default(),
                stmt: b.statement_name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Describe(d) => CMsg::Describe {
                kind: d.target_type,
                name: d.name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Execute(e) => CMsg::Execute {
                portal: e.name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Close(c) => CMsg::Close {
                kind: c.target_type,
                name: c.name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Sync(_) => CMsg::Sync { frame },
            PgWireFrontendMessage::Flush(_) => CMsg::Flush { frame },
            _ => return Err(protocol::ProtocolError::UnknownType(frame.tag)),
        })
    }

    fn ends_unit(&self) -> bool {
        matches!(self, CMsg::Query { .. } | CMsg::Sync { .. })
    }
}

/// A statement the proxy answers itself.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LocalStmt {
    SetMinToken(String),
    ResetMinToken,
    ShowToken,
    Empty,
}

/// What the session knows about one prepared statement.
#[derive(Debug)]
struct StmtInfo {
    sql: Arc<str>,
    types: Arc<[u32]>,
    /// Proxy-global name: the same SQL and parameter types get the same
    /// name on every backend connection.
    global: String,
    class: Arc<Classification>,
    local: Option<LocalStmt>,
}

fn global_name(sql: &str, types: &[u32]) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: stable within the process, which is all the
    // names need (they live as long as backend connections).
    let mut h = std::hash::DefaultHasher::new();
    sql.hash(&mut h);
    types.hash(&mut h);
    format!("lagrouter_s_{:016x}_{}", h.finish(), sql.len())
}

/// Session-state effects of a client message, applied when the server
/// confirms (or rejects) it.
#[derive(Clone, Debug)]
enum Action {
    Setting(StatementKind),
    ForgetClientStmt(String),
    ForgetBackendStmt(String),
}

/// A probe's answer: `(in_recovery, lsn)`.
type Position = (bool, Option<Lsn>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeKind {
    /// Before a read on a replica that may not have reached `need`.
    Before { need: Lsn },
    /// After a replica read: monotonic reads.
    After,
    /// After a write committed: read-your-writes.
    Write,
}

/// One thing sent to the backend whose replies are still expected.
#[derive(Debug)]
enum Expect {
    /// A client message; `kind` is its type byte.
    Client {
        kind: u8,
        on_success: Vec<Action>,
        on_fail: Vec<Action>,
    },
    /// A reply the proxy produces itself, emitted in order.
    Synth(Bytes),
    /// The settings prelude (a simple query); replies swallowed.
    Prelude,
    /// A `Parse` the proxy injected before a client's `Bind`/`Describe`.
    Injected { global: Option<String> },
    /// A position probe; replies swallowed.
    Probe {
        kind: ProbeKind,
        parsed: bool,
        saw_parse_complete: bool,
        failed: bool,
        result: Option<Position>,
    },
}

/// Where replies for the client go.
#[derive(Debug)]
enum Mode {
    /// Straight to the client.
    Direct,
    /// Held back (a replica read that may still be retried elsewhere).
    Buffer(BytesMut),
    /// Dropped (the read will be retried).
    Discard,
}

#[derive(Clone, Copy, Debug)]
enum Retry {
    /// Run the unit again on the primary.
    Primary(&'static str),
    /// The replica is behind the token: poll it until `deadline`.
    Wait { need: Lsn, deadline: Instant },
}

/// A backend connection the session holds, with its pipeline state.
struct Held {
    conn: PooledConn,
    node: usize,
    on_replica: bool,
    queue: VecDeque<Expect>,
    mode: Mode,
    /// Replies for the client, moved to the client's buffer after each
    /// batch of server messages.
    out: BytesMut,
    retry: Option<Retry>,
    /// The unit's client messages while it may be retried elsewhere.
    unit: Option<Vec<CMsg>>,
    held_rfq: Option<Frame>,
    copy_in: bool,
    copy_ignoring_sync: bool,
    /// The server skips messages until `Sync` after an error.
    server_skipping: bool,
    wrote_since_probe: bool,
    no_pipelined_probe: bool,
    /// Transaction status expected after what was forwarded.
    predicted: u8,
    /// The unit ended with `Flush`: the client continues it.
    unit_open: bool,
    unnamed_ok: bool,
    query_error: bool,
    /// Since the last transaction boundary, a statement failed or the
    /// transaction was rolled back: if the session ends up idle, settings
    /// made since then were undone by the server.
    txn_failed: bool,
    /// A `Flush` arrived while the replica's position was being checked.
    flush_pending: bool,
    portal_class: HashMap<String, Arc<Classification>>,
    _inflight: InFlight<'static>,
}

impl Held {
    fn emit(&mut self, bytes: &[u8]) {
        match &mut self.mode {
            Mode::Direct => self.out.extend_from_slice(bytes),
            Mode::Buffer(b) => b.extend_from_slice(bytes),
            Mode::Discard => {}
        }
    }

    /// Stops buffering: what was held back goes to the client.
    fn commit_output(&mut self) {
        if let Mode::Buffer(b) = &mut self.mode {
            let b = std::mem::take(b);
            self.out.extend_from_slice(&b);
            self.mode = Mode::Direct;
        }
    }

    fn drain_synth(&mut self) {
        while let Some(Expect::Synth(_)) = self.queue.front() {
            if let Some(Expect::Synth(b)) = self.queue.pop_front() {
                self.emit(&b);
            }
        }
    }

    fn has_client_entries(&self) -> bool {
        self.queue
            .iter()
            .any(|e| matches!(e, Expect::Client { .. } | Expect::Synth(_)))
    }
}

/// Which replies end a client message's expectation.
fn terminates(kind: u8, tag: u8) -> bool {
    match kind {
        b'P' => tag == b'1',
        b'B' => tag == b'2',
        b'C' => tag == b'3',
        b'D' => matches!(tag, b'T' | b'n'),
        b'E' => matches!(tag, b'C' | b'I' | b's'),
        b'S' | b'Q' => tag == b'Z',
        _ => false,
    }
}

/// What woke the session up.
enum Event {
    Backend(Result<Frame, BackendError>),
    Client(Result<(), ClientError>),
    Shutdown,
    Idle,
    /// A new topology snapshot (`false`: the monitor is gone).
    Topology(bool),
}

/// Outcome of handling input: keep going or end the session.
type Flow = Result<(), SessionEnd>;

/// Why a session ends.
#[derive(Debug)]
enum SessionEnd {
    /// Terminate, or the client went away.
    Closed,
    /// A fatal error, already queued for the client.
    Fatal(PgError),
    /// I/O error on the client connection.
    Client(ClientError),
}

impl From<ClientError> for SessionEnd {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Closed => SessionEnd::Closed,
            other => SessionEnd::Client(other),
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    client: ClientConn,
    user: String,
    database: String,
    server_user: String,
    server_password: Option<String>,
    pid: i32,
    cancel: Arc<CancelSlot>,
    token: Option<ConsistencyToken>,
    last_write: Option<Instant>,
    /// Session settings to have on any backend (name → SQL to apply).
    desired: BTreeMap<String, String>,
    /// The settings from the startup packet (what `RESET` returns to).
    startup_desired: BTreeMap<String, String>,
    /// `desired` and the held connection's applied settings as they were
    /// before the first setting change since the last transaction
    /// boundary: what a rollback returns them to, as the server undoes a
    /// `SET` made inside a transaction that does not commit.
    settings_before_txn: Option<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    prepared: HashMap<String, Arc<StmtInfo>>,
    unnamed: Option<Arc<StmtInfo>>,
    local_portals: HashMap<String, LocalStmt>,
    pending: Vec<CMsg>,
    skip_until_sync: bool,
    backend: Option<Held>,
    pinned: bool,
    txn_status: u8,
    closing: bool,
    /// Statement kinds of the unit being routed (for metrics).
    unit_kinds: Vec<&'static str>,
}

/// Runs an authenticated client session to its end.
pub async fn run(shared: Arc<Shared>, client: ClientConn, info: StartupInfo) {
    let (pid, secret, cancel) = shared.register_session();
    let _guard = shared.client_guard();
    let entry = info.entry.clone();
    let mut s = Session {
        shared: shared.clone(),
        client,
        user: info.user.clone(),
        database: info.database.clone(),
        server_user: entry.server_user.clone(),
        server_password: entry.server_password.clone(),
        pid,
        cancel,
        token: None,
        last_write: None,
        desired: BTreeMap::new(),
        startup_desired: BTreeMap::new(),
        settings_before_txn: None,
        prepared: HashMap::new(),
        unnamed: None,
        local_portals: HashMap::new(),
        pending: Vec::new(),
        skip_until_sync: false,
        backend: None,
        pinned: false,
        txn_status: b'I',
        closing: false,
        unit_kinds: Vec::new(),
    };
    let result = match s.setup(&info, secret).await {
        Ok(()) => s.main_loop().await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) | Err(SessionEnd::Closed) => {}
        Err(SessionEnd::Fatal(e)) => {
            debug!(pid, error = %e, "session ended with a fatal error");
            if e.code == protocol::SQLSTATE_PROTOCOL_VIOLATION {
                metrics::counter!(m::PROTOCOL_ERRORS_TOTAL).increment(1);
            }
            s.client.fatal(&e).await;
        }
        Err(SessionEnd::Client(e)) => debug!(pid, error = %e, "client connection failed"),
    }
    if let Some(h) = s.backend.take() {
        // Mid-statement or pinned: the connection's state is unknown or
        // belongs to this session; close it.
        drop(h);
    }
    shared.unregister_session(pid);
    debug!(pid, user = %s.user, "session closed");
}

impl Session {
    fn settings(&self) -> Arc<crate::server::Settings> {
        self.shared.settings()
    }

    /// Validates the startup settings on a backend, learns the server's
    /// parameters and completes the startup exchange.
    async fn setup(&mut self, info: &StartupInfo, secret: i32) -> Flow {
        // Any node can validate the startup: the primary when it is up,
        // else a healthy replica, so that clients can still connect and read
        // while the primary is down (degraded read-only mode).
        let topo = self.shared.monitor.snapshot();
        let mut candidates: Vec<usize> = topo
            .primary
            .filter(|&p| topo.nodes[p].healthy)
            .into_iter()
            .chain(topo.serving_replicas())
            .collect();
        let fallback = topo.primary.unwrap_or(0);
        if !candidates.contains(&fallback) {
            candidates.push(fallback);
        }
        let mut last_err = None;
        let mut found = None;
        for node in candidates {
            match self.checkout(node).await {
                Ok(c) => {
                    found = Some(c);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let mut conn = match (found, last_err) {
            (Some(c), _) => c,
            (None, Some(e)) => {
                return Err(SessionEnd::Fatal(PgError::fatal(
                    e.sqlstate(),
                    e.to_string(),
                )));
            }
            (None, None) => {
                return Err(SessionEnd::Fatal(PgError::fatal(
                    "08006",
                    "no node available",
                )));
            }
        };
        let known = match self.shared.guc_names(&mut conn).await {
            Ok(k) => k,
            Err(e) => return Err(SessionEnd::Fatal(backend_fatal(&e))),
        };
        for (name, value) in &info.params {
            if !name.contains('.') && !known.contains(name) {
                return Err(SessionEnd::Fatal(PgError::fatal(
                    "42704",
                    format!("unrecognized configuration parameter \"{name}\""),
                )));
            }
            if name.starts_with("lagrouter.") {
                return Err(SessionEnd::Fatal(PgError::fatal(
                    "42704",
                    format!("lagrouter settings cannot be set at startup: \"{name}\""),
                )));
            }
            self.desired
                .insert(name.clone(), set_statement_sql(name, value));
        }
        self.startup_desired = self.desired.clone();
        if let Some(sql) = prelude_sql(&self.desired, &conn) {
            if let Err(e) = conn.simple_query(&sql).await {
                return Err(SessionEnd::Fatal(backend_fatal(&e)));
            }
            conn.applied = self.desired.clone();
        }
        let params = conn.server_params.clone();
        conn.release();
        for (k, v) in &params {
            protocol::parameter_status(k, v, &mut self.client.wbuf);
        }
        crate::frontend::backend_key_data(self.pid, secret, &mut self.client.wbuf);
        protocol::ready_for_query(b'I', &mut self.client.wbuf);
        self.client.flush().await.map_err(ClientError::from)?;
        Ok(())
    }

    async fn main_loop(&mut self) -> Flow {
        let mut shutdown = self.shared.shutdown_signal();
        let mut topology = self.shared.monitor.subscribe();
        loop {
            // 1. Client input, when it can be taken now.
            while self.accepts_client_input() {
                let frame = match self.client.try_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        return Err(SessionEnd::Fatal(PgError::fatal(
                            protocol::SQLSTATE_PROTOCOL_VIOLATION,
                            e.to_string(),
                        )));
                    }
                };
                self.on_client_frame(frame).await?;
            }
            // 2. Retries, fallback probes and releasing the backend.
            self.housekeeping().await?;
            // 3. Flush both directions.
            if let Some(h) = &mut self.backend {
                if let Err(e) = h.conn.flush().await {
                    self.backend_failed(BackendError::Io(e)).await?;
                    continue;
                }
            }
            self.flush_client().await?;
            if self.closing && self.backend.is_none() {
                return Err(SessionEnd::Fatal(PgError::fatal(
                    "57P01",
                    "terminating connection due to administrator command",
                )));
            }
            // Client messages that arrived while a unit was in flight.
            if self.accepts_client_input() && self.client.has_frame() {
                continue;
            }
            // 4. Wait for something to happen.
            let accept = self.accepts_client_input();
            let has_backend = self.backend.is_some();
            let idle_timeout = self.idle_timeout();
            let idle = !idle_timeout.is_zero();
            let closing = self.closing;
            // A replica read that can still be retried is abandoned when the
            // monitor ejects its node (a hung host answers nothing, not even
            // an error).
            let watch_node = self.backend.as_ref().is_some_and(|h| {
                h.on_replica && h.unit.is_some() && !matches!(h.mode, Mode::Direct)
            });
            let backend = &mut self.backend;
            let client = &mut self.client;
            let event = tokio::select! {
                r = async {
                    match backend.as_mut() {
                        Some(h) => h.conn.read_frame().await,
                        None => std::future::pending().await,
                    }
                }, if has_backend => Event::Backend(r),
                r = client.fill(), if accept => Event::Client(r),
                _ = shutdown.changed(), if !closing => Event::Shutdown,
                _ = tokio::time::sleep(idle_timeout), if idle => Event::Idle,
                r = topology.changed(), if watch_node => Event::Topology(r.is_ok()),
            };
            match event {
                Event::Backend(Ok(frame)) => {
                    self.on_backend_frame(frame);
                    // Drain what is already buffered without going through
                    // select again.
                    while let Some(h) = &mut self.backend {
                        if !h.conn.has_buffered_frame() {
                            break;
                        }
                        match h.conn.read_frame().await {
                            Ok(f) => self.on_backend_frame(f),
                            Err(e) => {
                                self.backend_failed(e).await?;
                                break;
                            }
                        }
                    }
                    self.move_output();
                }
                Event::Backend(Err(e)) => self.backend_failed(e).await?,
                Event::Client(r) => r?,
                Event::Topology(open) => {
                    let node = self.backend.as_ref().map(|h| h.node);
                    let ejected = node.is_some_and(|n| {
                        !topology
                            .borrow_and_update()
                            .nodes
                            .get(n)
                            .is_some_and(|s| s.healthy)
                    });
                    if ejected || !open {
                        self.backend_failed(BackendError::Unresponsive(
                            "its node was ejected by the lag monitor".into(),
                        ))
                        .await?;
                    }
                }
                Event::Shutdown => self.closing = true,
                Event::Idle if self.backend.is_some() => {
                    metrics::counter!(m::CLIENT_TIMEOUTS_TOTAL, m::LABEL_REASON => "idle_in_transaction")
                        .increment(1);
                    return Err(SessionEnd::Fatal(PgError::fatal(
                        "25P03",
                        "terminating connection due to idle-in-transaction timeout",
                    )));
                }
                Event::Idle => {
                    metrics::counter!(m::CLIENT_TIMEOUTS_TOTAL, m::LABEL_REASON => "idle")
                        .increment(1);
                    return Err(SessionEnd::Fatal(PgError::fatal(
                        "57P05",
                        "terminating connection due to idle-session timeout",
                    )));
                }
            }
        }
    }

    /// How long the session may wait for the client now before it is
    /// closed (zero: forever): `client_idle_timeout` while it holds no
    /// server connection, `idle_transaction_timeout` while it sits in a
    /// transaction with nothing outstanding on the server.
    fn idle_timeout(&self) -> Duration {
        let proxy = &self.settings().config.proxy;
        match &self.backend {
            None => proxy.client_idle_timeout,
            Some(h)
                if self.txn_status != b'I'
                    && h.queue.is_empty()
                    && !h.copy_in
                    && h.retry.is_none() =>
            {
                proxy.idle_transaction_timeout
            }
            Some(_) => Duration::ZERO,
        }
    }

    /// Writes queued replies to the client, for at most
    /// `client_write_timeout`: a client that stops reading is disconnected
    /// (and its server connection discarded) rather than holding a server
    /// connection forever. Replies are read from the server only as fast as
    /// the client takes them, so a slow client costs no more memory than
    /// one batch of messages.
    async fn flush_client(&mut self) -> Flow {
        let limit = self.settings().config.proxy.client_write_timeout;
        if limit.is_zero() {
            return Ok(self.client.flush().await.map_err(ClientError::from)?);
        }
        match tokio::time::timeout(limit, self.client.flush()).await {
            Ok(r) => Ok(r.map_err(ClientError::from)?),
            Err(_) => {
                warn!(
                    pid = self.pid,
                    timeout = ?limit,
                    "client stopped reading replies; closing the connection"
                );
                metrics::counter!(m::CLIENT_TIMEOUTS_TOTAL, m::LABEL_REASON => "write")
                    .increment(1);
                Err(SessionEnd::Closed)
            }
        }
    }

    /// Whether client messages may be processed now: not while a finished
    /// unit's replies (or its probes) are still outstanding, so that the
    /// next statement is routed with an up-to-date token.
    fn accepts_client_input(&self) -> bool {
        match &self.backend {
            None => true,
            Some(h) => {
                self.pinned
                    || h.copy_in
                    || (h.unit_open
                        && !h.flush_pending
                        && h.retry.is_none()
                        && !matches!(h.mode, Mode::Discard))
                    || (h.predicted != b'I' && h.retry.is_none() && matches!(h.mode, Mode::Direct))
            }
        }
    }

    fn move_output(&mut self) {
        if let Some(h) = &mut self.backend {
            if !h.out.is_empty() {
                self.client.wbuf.extend_from_slice(&h.out);
                h.out.clear();
            }
        }
    }

    // ---------------------------------------------------------------
    // Client messages
    // ---------------------------------------------------------------

    async fn on_client_frame(&mut self, frame: Frame) -> Flow {
        tracing::trace!(pid = self.pid, tag = %char::from(frame.tag), held = self.backend.is_some(), "client message");
        match frame.tag {
            b'X' => Err(SessionEnd::Closed),
            b'd' | b'c' | b'f' => {
                if let Some(h) = &mut self.backend {
                    if h.copy_in {
                        h.conn.wbuf.extend_from_slice(&frame.bytes);
                        if frame.tag != b'd' {
                            h.copy_in = false;
                            h.copy_ignoring_sync = false;
                        }
                    }
                }
                // Outside COPY the server ignores these too.
                Ok(())
            }
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' => {
                let tag = frame.tag;
                match CMsg::decode(frame) {
                    Ok(msg) => self.on_message(msg).await,
                    Err(e @ protocol::ProtocolError::InvalidUtf8(_)) => self.invalid_utf8(tag, e),
                    Err(e) => Err(SessionEnd::Fatal(PgError::fatal(
                        protocol::SQLSTATE_PROTOCOL_VIOLATION,
                        e.to_string(),
                    ))),
                }
            }
            other => Err(SessionEnd::Fatal(PgError::fatal(
                protocol::SQLSTATE_PROTOCOL_VIOLATION,
                format!("invalid frontend message type {}", other),
            ))),
        }
    }

    /// A well-framed message whose names or SQL are not UTF-8: an ordinary
    /// error (22021) as PostgreSQL gives, when the session holds no server
    /// connection. Inside a transaction the proxy cannot make the server
    /// abort it as PostgreSQL would, so the session ends instead (the
    /// server rolls the uncommitted transaction back).
    fn invalid_utf8(&mut self, tag: u8, e: protocol::ProtocolError) -> Flow {
        let err = PgError::error("22021", e.to_string());
        if self.backend.is_some() {
            return Err(SessionEnd::Fatal(PgError::fatal("22021", e.to_string())));
        }
        if self.skip_until_sync {
            return Ok(());
        }
        if tag == b'Q' {
            err.encode(&mut self.client.wbuf);
            protocol::ready_for_query(self.txn_status, &mut self.client.wbuf);
        } else {
            // The rest of the extended batch is skipped up to Sync, as the
            // server does after an error.
            self.pending.clear();
            err.encode(&mut self.client.wbuf);
            self.skip_until_sync = true;
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: CMsg) -> Flow {
        if self.skip_until_sync {
            if !matches!(msg, CMsg::Sync { .. }) {
                return Ok(());
            }
            self.skip_until_sync = false;
        }
        if self.backend.is_some() {
            self.forward(msg);
            return Ok(());
        }

        match msg {
            CMsg::Query { .. } => self.dispatch(vec![msg]).await,
            CMsg::Sync { .. } | CMsg::Flush { .. } => {
                if self.pending.is_empty() {
                    if matches!(msg, CMsg::Sync { .. }) {
                        protocol::ready_for_query(self.txn_status, &mut self.client.wbuf);
                    }
                    return Ok(());
                }
                self.pending.push(msg);
                let batch = std::mem::take(&mut self.pending);
                self.dispatch(batch).await
            }
            other => {
                if self.pending.len() >= MAX_PENDING {
                    return Err(SessionEnd::Fatal(PgError::fatal(
                        "54000",
                        "too many extended-protocol messages without Sync",
                    )));
                }
                self.pending.push(other);
                Ok(())
            }
        }
    }

    // ---------------------------------------------------------------
    // Local statements
    // ---------------------------------------------------------------

    fn classify(&self, sql: &str) -> Arc<Classification> {
        self.shared.classifier.classify(sql)
    }

    /// Recognises statements the proxy answers itself.
    fn local_stmt(sql: &str, class: &Classification) -> Result<Option<LocalStmt>, PgError> {
        let is_lagrouter = |k: &StatementKind| match k {
            StatementKind::Set { name, .. } => name.starts_with("lagrouter."),
            StatementKind::Reset { name: Some(name) } => name.starts_with("lagrouter."),
            _ => false,
        };
        let show = show_lagrouter(sql);
        if class.statements.is_empty() {
            return Ok(Some(LocalStmt::Empty));
        }
        let n_local = class.statements.iter().filter(|k| is_lagrouter(k)).count();
        if n_local == 0 && show.is_none() {
            return Ok(None);
        }
        if class.statements.len() > 1 {
            return Err(PgError::error(
                "0A000",
                "lagrouter settings must be sent as a statement of their own",
            ));
        }
        if let Some(name) = show {
            return match name.as_str() {
                TOKEN_PARAMETER | MIN_TOKEN_SETTING => Ok(Some(LocalStmt::ShowToken)),
                _ => Err(unknown_setting(&name)),
            };
        }
        match &class.statements[0] {
            StatementKind::Set { name, value, .. } if name == MIN_TOKEN_SETTING => {
                Ok(Some(LocalStmt::SetMinToken(value.clone())))
            }
            StatementKind::Reset { name: Some(name) } if name == MIN_TOKEN_SETTING => {
                Ok(Some(LocalStmt::ResetMinToken))
            }
            StatementKind::Set { name, .. } | StatementKind::Reset { name: Some(name) } => {
                Err(unknown_setting(name))
            }
            _ => Ok(None),
        }
    }

    /// Applies a token given by the client (setting or comment).
    fn accept_token(&mut self, text: &str) -> Result<(), PgError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let token = ConsistencyToken::decode(text).map_err(|e| {
            PgError::error("22023", format!("invalid lagrouter token: {e}"))
                .with_hint("Pass the value of the lagrouter.token parameter status (or SHOW lagrouter.token) unchanged.")
        })?;
        if let Some(cluster) = self.shared.monitor.snapshot().cluster {
            token
                .check_cluster(&cluster)
                .map_err(|e| PgError::error("22023", format!("invalid lagrouter token: {e}")))?;
        }
        self.observe(token);
        metrics::counter!(crate::server::TOKENS_ACCEPTED_TOTAL).increment(1);
        Ok(())
    }

    fn observe(&mut self, token: ConsistencyToken) {
        self.token = Some(match self.token {
            Some(t) => t.max(token),
            None => token,
        });
    }

    /// Advances the session token to `lsn` of the current cluster.
    fn advance_token(&mut self, lsn: Lsn) {
        let topo = self.shared.monitor.snapshot();
        if let Some(c) = topo.cluster {
            self.observe(ConsistencyToken::new(lsn, c.system_identifier, c.timeline));
        }
    }

    /// Runs a local statement (Execute time); returns the reply messages.
    fn run_local(&mut self, stmt: &LocalStmt, extended: bool) -> Result<Vec<Bytes>, PgError> {
        let mut out = BytesMut::new();
        match stmt {
            LocalStmt::SetMinToken(v) => {
                let v = v.clone();
                self.accept_token(&v)?;
                protocol::command_complete("SET", &mut out);
            }
            LocalStmt::ResetMinToken => protocol::command_complete("RESET", &mut out),
            LocalStmt::ShowToken => {
                if !extended {
                    protocol::text_row_description(TOKEN_PARAMETER, &mut out);
                }
                let t = self.token.map(|t| t.encode()).unwrap_or_default();
                protocol::text_data_row(&t, &mut out);
                protocol::command_complete("SHOW", &mut out);
            }
            LocalStmt::Empty => out.extend_from_slice(&protocol::empty_message(b'I')),
        }
        Ok(vec![out.freeze()])
    }

    /// `Describe` reply for a local statement.
    fn describe_local(stmt: &LocalStmt, statement: bool) -> Vec<Bytes> {
        let mut v = Vec::new();
        if statement {
            v.push(protocol::no_parameters());
        }
        match stmt {
            LocalStmt::ShowToken => {
                let mut b = BytesMut::new();
                protocol::text_row_description(TOKEN_PARAMETER, &mut b);
                v.push(b.freeze());
            }
            _ => v.push(protocol::empty_message(b'n')),
        }
        v
    }

    /// Handles a simple query the proxy answers itself (lagrouter
    /// settings, empty queries, `DEALLOCATE` of protocol-level statements).
    /// `None` when the query must go to a server.
    fn local_query(
        &mut self,
        sql: &str,
        class: &Classification,
    ) -> Option<Result<Vec<Bytes>, PgError>> {
        if let Some(t) = &class.token {
            if let Err(e) = self.accept_token(t) {
                return Some(Err(e));
            }
        }
        match Self::local_stmt(sql, class) {
            Ok(Some(stmt)) => return Some(self.run_local(&stmt, false)),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        if let Some(target) = deallocate_target(sql) {
            match target {
                None if !self.pinned => {
                    self.prepared.clear();
                    let mut b = BytesMut::new();
                    protocol::command_complete("DEALLOCATE ALL", &mut b);
                    return Some(Ok(vec![b.freeze()]));
                }
                None => self.prepared.clear(),
                Some(name) if self.prepared.remove(&name).is_some() => {
                    let mut b = BytesMut::new();
                    protocol::command_complete("DEALLOCATE", &mut b);
                    return Some(Ok(vec![b.freeze()]));
                }
                Some(_) => {}
            }
        }
        None
    }

    /// Whether an extended-protocol message can be answered without a
    /// server (used to answer all-local batches directly).
    fn is_local_ext(&self, msg: &CMsg) -> bool {
        match msg {
            CMsg::Parse { sql, .. } => {
                let class = self.classify(sql);
                !matches!(Self::local_stmt(sql, &class), Ok(None))
            }
            CMsg::Bind { stmt, .. } => self.stmt_info(stmt).is_some_and(|i| i.local.is_some()),
            CMsg::Describe {
                kind: b'S', name, ..
            } => self.stmt_info(name).is_some_and(|i| i.local.is_some()),
            CMsg::Describe { name, .. } | CMsg::Execute { portal: name, .. } => {
                self.local_portals.contains_key(name)
            }
            CMsg::Close {
                kind: b'S', name, ..
            } => !name.is_empty(),
            CMsg::Close { name, .. } => self.local_portals.contains_key(name),
            CMsg::Sync { .. } | CMsg::Flush { .. } => true,
            CMsg::Query { .. } => false,
        }
    }

    /// Whether every message of a batch can be answered without a server,
    /// following statements and portals the batch itself defines.
    fn batch_is_local(&self, batch: &[CMsg]) -> bool {
        let mut stmts: HashMap<&str, bool> = HashMap::new();
        let mut portals: HashMap<&str, bool> = HashMap::new();
        for msg in batch {
            let local = match msg {
                CMsg::Parse { name, .. } => {
                    let l = self.is_local_ext(msg);
                    stmts.insert(name, l);
                    l
                }
                CMsg::Bind { portal, stmt, .. } => {
                    let l = stmts
                        .get(stmt.as_str())
                        .copied()
                        .unwrap_or_else(|| self.is_local_ext(msg));
                    portals.insert(portal, l);
                    l
                }
                CMsg::Describe {
                    kind: b'S', name, ..
                } => stmts
                    .get(name.as_str())
                    .copied()
                    .unwrap_or_else(|| self.is_local_ext(msg)),
                CMsg::Describe { name, .. } | CMsg::Execute { portal: name, .. } => portals
                    .get(name.as_str())
                    .copied()
                    .unwrap_or_else(|| self.is_local_ext(msg)),
                other => self.is_local_ext(other),
            };
            if !local {
                return false;
            }
        }
        true
    }

    fn stmt_info(&self, name: &str) -> Option<Arc<StmtInfo>> {
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.prepared.get(name).cloned()
        }
    }

    fn make_info(&self, sql: &Arc<str>, types: &Arc<[u32]>) -> Result<Arc<StmtInfo>, PgError> {
        let class = self.classify(sql);
        let local = Self::local_stmt(sql, &class)?;
        Ok(Arc::new(StmtInfo {
            sql: sql.clone(),
            types: types.clone(),
            global: global_name(sql, types),
            class,
            local,
        }))
    }

    /// Replies for a message that needs no server, or `None`. Effects on
    /// the session are applied. An error means: report it and skip to Sync.
    fn local_ext(&mut self, msg: &CMsg) -> Option<Result<Vec<Bytes>, PgError>> {
        match msg {
            CMsg::Parse {
                name, sql, types, ..
            } => {
                let info = match self.make_info(sql, types) {
                    Ok(i) => i,
                    Err(e) => return Some(Err(e)),
                };
                info.local.as_ref()?;
                if let Some(t) = &info.class.token {
                    if let Err(e) = self.accept_token(&t.clone()) {
                        return Some(Err(e));
                    }
                }
                if name.is_empty() {
                    self.unnamed = Some(info);
                    if let Some(h) = &mut self.backend {
                        h.unnamed_ok = false;
                    }
                } else {
                    self.prepared.insert(name.clone(), info);
                }
                Some(Ok(vec![protocol::empty_message(b'1')]))
            }
            CMsg::Bind { portal, stmt, .. } => {
                let info = self.stmt_info(stmt)?;
                let local = info.local.clone()?;
                self.local_portals.insert(portal.clone(), local);
                Some(Ok(vec![protocol::empty_message(b'2')]))
            }
            CMsg::Describe {
                kind: b'S', name, ..
            } => {
                let info = self.stmt_info(name)?;
                let local = info.local.as_ref()?;
                Some(Ok(Self::describe_local(local, true)))
            }
            CMsg::Describe { name, .. } => {
                let local = self.local_portals.get(name)?;
                Some(Ok(Self::describe_local(local, false)))
            }
            CMsg::Execute { portal, .. } => {
                let local = self.local_portals.get(portal)?.clone();
                Some(self.run_local(&local, true))
            }
            CMsg::Close {
                kind: b'S', name, ..
            } if !name.is_empty() => {
                // Only the client's name goes: the backend statement is
                // shared and stays prepared.
                self.prepared.remove(name);
                Some(Ok(vec![protocol::empty_message(b'3')]))
            }
            CMsg::Close { name, .. } => {
                self.local_portals.remove(name)?;
                Some(Ok(vec![protocol::empty_message(b'3')]))
            }
            _ => None,
        }
    }

    // ---------------------------------------------------------------
    // Routing a unit
    // ---------------------------------------------------------------

    /// Routes and starts a unit (one `Query`, or a batch up to `Sync` /
    /// `Flush`) while no backend is held.
    async fn dispatch(&mut self, batch: Vec<CMsg>) -> Flow {
        // Simple query answered locally?
        if let [CMsg::Query { sql, .. }] = batch.as_slice() {
            let class = self.classify(sql);
            if let Some(r) = self.local_query(sql, &class) {
                match r {
                    Ok(msgs) => {
                        for b in msgs {
                            self.client.wbuf.extend_from_slice(&b);
                        }
                    }
                    Err(e) => e.encode(&mut self.client.wbuf),
                }
                protocol::ready_for_query(self.txn_status, &mut self.client.wbuf);
                return Ok(());
            }
        }
        // Extended batch made only of local messages?
        if !matches!(batch.first(), Some(CMsg::Query { .. })) && self.batch_is_local(&batch) {
            for msg in &batch {
                if self.skip_until_sync {
                    if matches!(msg, CMsg::Sync { .. }) {
                        self.skip_until_sync = false;
                    } else {
                        continue;
                    }
                }
                match msg {
                    CMsg::Sync { .. } => {
                        protocol::ready_for_query(self.txn_status, &mut self.client.wbuf)
                    }
                    CMsg::Flush { .. } => {}
                    other => match self.local_ext(other) {
                        Some(Ok(msgs)) => {
                            for b in msgs {
                                self.client.wbuf.extend_from_slice(&b);
                            }
                        }
                        Some(Err(e)) => {
                            e.encode(&mut self.client.wbuf);
                            self.skip_until_sync = true;
                        }
                        None => {}
                    },
                }
            }
            return Ok(());
        }

        // Classify the unit.
        let mut classes: Vec<Arc<Classification>> = Vec::new();
        for msg in &batch {
            match msg {
                CMsg::Query { sql, .. } | CMsg::Parse { sql, .. } => {
                    classes.push(self.classify(sql))
                }
                CMsg::Bind { stmt: name, .. }
                | CMsg::Describe {
                    kind: b'S', name, ..
                } => {
                    if let Some(i) = self.stmt_info(name) {
                        classes.push(i.class.clone());
                    }
                }
                _ => {}
            }
        }
        // Token hints in comments apply before routing.
        let hints: Vec<String> = classes.iter().filter_map(|c| c.token.clone()).collect();
        for t in hints {
            if let Err(e) = self.accept_token(&t) {
                self.unit_error(&batch, e);
                return Ok(());
            }
        }
        let hint = classes
            .iter()
            .filter_map(|c| c.hint)
            .max_by_key(|h| matches!(h, RouteHint::Primary));
        let pin = classes.iter().find_map(|c| c.pin_reason());
        let read_only =
            !classes.is_empty() && classes.iter().all(|c| c.is_read_only()) && pin.is_none();
        let read = match hint {
            Some(RouteHint::Primary) => false,
            Some(RouteHint::Replica) => pin.is_none(),
            None => read_only,
        };
        self.unit_kinds = classes
            .iter()
            .flat_map(|c| c.statements.iter().map(StatementKind::label))
            .collect();
        if !read && classes.iter().any(|c| c.has_write()) {
            self.last_write = Some(Instant::now());
        }
        if read {
            if let Err(e) = self.check_token_not_lost() {
                self.unit_error(&batch, e);
                return Ok(());
            }
        }
        let target = if read {
            let settings = self.settings();
            routing::route_read(
                &self.shared.monitor.snapshot(),
                self.shared.router(),
                &settings.policy,
                self.token.map(|t| t.lsn),
                self.last_write,
                &[],
            )
        } else {
            Target::Primary
        };
        let pin_session = pin.is_some_and(|p| p.is_session_scoped());
        self.start_unit(target, batch, read, None).await?;
        if pin_session && self.backend.is_some() {
            if !self.pinned {
                info!(
                    pid = self.pid,
                    reason = pin.map(|p| p.as_str()),
                    "session pinned to the primary"
                );
                metrics::counter!(crate::server::PINNED_SESSIONS_TOTAL).increment(1);
            }
            self.pinned = true;
        }
        Ok(())
    }

    /// Refuses a token-gated read whose token stands for writes the current
    /// primary's history lacks: acknowledged by a former primary and lost in
    /// a failover (asynchronous replication). A replica of the new timeline
    /// may well have replayed past the token's position, so this is checked
    /// before routing. A write on the new timeline supersedes the token.
    fn check_token_not_lost(&self) -> Result<(), PgError> {
        let Some(token) = self.token else {
            return Ok(());
        };
        if !self.settings().policy.uses_token() {
            return Ok(());
        }
        lagrouter::exec::check_not_lost(&self.shared.monitor.snapshot(), &token).map_err(|e| {
            metrics::counter!(m::TOKENS_AHEAD_TOTAL).increment(1);
            match e {
                lagrouter::Error::TokenAhead { token, primary } => token_ahead(token, primary),
                other => PgError::error(other.code().unwrap_or("55000"), other.to_string()),
            }
        })
    }

    /// Reports an error for a whole unit that did not reach a server.
    fn unit_error(&mut self, batch: &[CMsg], e: PgError) {
        e.encode(&mut self.client.wbuf);
        if batch.last().is_some_and(CMsg::ends_unit) {
            protocol::ready_for_query(self.txn_status, &mut self.client.wbuf);
        } else {
            self.skip_until_sync = true;
        }
    }

    async fn checkout(&self, node: usize) -> Result<PooledConn, PoolError> {
        let key = crate::pool::PoolKey {
            node,
            user: self.server_user.clone(),
            database: self.database.clone(),
        };
        let shared = &self.shared;
        let pool = shared.pools.get(&key, || {
            shared.backend_target(
                node,
                &self.server_user,
                self.server_password.clone(),
                &self.database,
            )
        });
        let r = pool.checkout().await;
        if let Err(PoolError::Connect(e)) = &r {
            if e.is_connection_failure() {
                shared.monitor.report_failure(node, &e.to_string());
            }
        }
        r
    }

    /// Checks out a connection for `target` and sends the unit there. With
    /// `verify`, a read that falls back to the primary after no replica
    /// reached that position first checks that the primary has it: a token
    /// ahead of the primary was forged or names lost writes (55000).
    async fn start_unit(
        &mut self,
        target: Target,
        batch: Vec<CMsg>,
        read: bool,
        verify: Option<Lsn>,
    ) -> Flow {
        let mut exclude: Vec<usize> = Vec::new();
        let mut target = target;
        loop {
            let topo = self.shared.monitor.snapshot();
            let node = match target {
                Target::Primary => match topo.primary {
                    Some(p) => p,
                    None => {
                        self.unit_error(
                            &batch,
                            PgError::error("08006", "no primary server is available"),
                        );
                        return Ok(());
                    }
                },
                Target::Replica(i) | Target::ReplicaIfCaughtUp(i) => i,
            };
            let on_replica = !matches!(target, Target::Primary);
            let mut conn = match self.checkout(node).await {
                Ok(c) => c,
                Err(e) if on_replica => {
                    warn!(node, error = %e, "replica unavailable, rerouting the read");
                    exclude.push(node);
                    let settings = self.settings();
                    target = routing::route_read(
                        &self.shared.monitor.snapshot(),
                        self.shared.router(),
                        &settings.policy,
                        self.token.map(|t| t.lsn),
                        self.last_write,
                        &exclude,
                    );
                    if let Target::Replica(i) | Target::ReplicaIfCaughtUp(i) = target {
                        if exclude.contains(&i) {
                            target = Target::Primary;
                        }
                    }
                    continue;
                }
                Err(e) => {
                    self.unit_error(&batch, PgError::error(e.sqlstate(), e.to_string()));
                    return Ok(());
                }
            };
            if let (Target::Primary, Some(need)) = (target, verify) {
                let limit = self.settings().config.pool.checkout_timeout;
                match poll_position(&mut conn, limit).await {
                    Ok(Some(at)) if at < need => {
                        conn.release();
                        metrics::counter!(m::TOKENS_AHEAD_TOTAL).increment(1);
                        self.unit_error(&batch, token_ahead(need, at));
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if e.is_connection_failure() {
                            self.shared.monitor.report_failure(node, &e.to_string());
                        }
                        drop(conn);
                        self.unit_error(&batch, PgError::error(e.sqlstate(), e.to_string()));
                        return Ok(());
                    }
                }
            }
            let settings = self.settings();
            let retryable = on_replica && read;
            let label = match target {
                Target::Primary if read => "primary_read",
                Target::Primary => "primary",
                Target::Replica(_) => "replica",
                Target::ReplicaIfCaughtUp(_) => "replica_checked",
            };
            let node_name = topo
                .nodes
                .get(node)
                .map(|n| n.name.clone())
                .unwrap_or_default();
            metrics::counter!(crate::server::ROUTED_TOTAL, "target" => label, m::LABEL_NODE => node_name.clone())
                .increment(1);
            for kind in std::mem::take(&mut self.unit_kinds) {
                metrics::counter!(m::QUERIES_TOTAL, m::LABEL_NODE => node_name.clone(), m::LABEL_KIND => kind)
                    .increment(1);
            }
            let mut h = Held {
                node,
                on_replica,
                queue: VecDeque::new(),
                mode: if retryable {
                    Mode::Buffer(BytesMut::new())
                } else {
                    Mode::Direct
                },
                out: BytesMut::new(),
                retry: None,
                unit: retryable.then(|| batch.clone()),
                held_rfq: None,
                copy_in: false,
                copy_ignoring_sync: false,
                server_skipping: false,
                wrote_since_probe: false,
                no_pipelined_probe: false,
                predicted: self.txn_status,
                unit_open: false,
                unnamed_ok: false,
                query_error: false,
                txn_failed: false,
                flush_pending: false,
                portal_class: HashMap::new(),
                _inflight: self.shared.router().track(node),
                conn,
            };
            *self.cancel.lock().expect("cancel slot") = Some(h.conn.cancel_target());
            if let Some(sql) = prelude_sql(&self.desired, &h.conn) {
                if frontend::query(&sql, &mut h.conn.wbuf).is_ok() {
                    h.queue.push_back(Expect::Prelude);
                    h.conn.applied = self.desired.clone();
                }
            }
            if let (Target::ReplicaIfCaughtUp(_), Some(t)) = (target, self.token) {
                let parsed = encode_probe(&mut h.conn);
                h.queue
                    .push_back(probe(ProbeKind::Before { need: t.lsn }, parsed));
            }
            let _ = settings;
            self.backend = Some(h);
            self.forward_all(batch);
            return Ok(());
        }
    }

    // ---------------------------------------------------------------
    // Forwarding to the held backend
    // ---------------------------------------------------------------

    fn note_statements(&mut self, class: &Classification) {
        let uses_token = self.settings().policy.uses_token();
        let Some(h) = &mut self.backend else { return };
        if class.has_write() || class.pin_reason().is_some() {
            if !h.on_replica {
                h.wrote_since_probe |= uses_token;
            }
            self.last_write = Some(Instant::now());
        }
        if class.pin_reason() == Some(crate::classify::PinReason::Copy) {
            h.no_pipelined_probe = true;
        }
        for k in &class.statements {
            match k {
                StatementKind::TransactionBegin { .. } if h.predicted == b'I' => h.predicted = b'T',
                StatementKind::TransactionEnd => h.predicted = b'I',
                _ => {}
            }
        }
    }

    /// Sends one client message to the held backend, translating statement
    /// names and recording what replies to expect.
    fn forward(&mut self, msg: CMsg) {
        // Local replies (lagrouter statements, statement closes, …).
        if !matches!(
            msg,
            CMsg::Query { .. } | CMsg::Sync { .. } | CMsg::Flush { .. }
        ) {
            if let Some(r) = self.local_ext(&msg) {
                let h = self.backend.as_mut().expect("held");
                match r {
                    Ok(msgs) => h.queue.extend(msgs.into_iter().map(Expect::Synth)),
                    Err(e) => {
                        h.queue.push_back(Expect::Synth(e.to_bytes()));
                        self.skip_until_sync = true;
                    }
                }
                self.backend.as_mut().expect("held").drain_synth();
                return;
            }
        }
        {
            let h = self.backend.as_mut().expect("held");
            if h.server_skipping {
                // After an error the server ignores everything up to Sync.
                if !matches!(msg, CMsg::Sync { .. }) {
                    return;
                }
                h.server_skipping = false;
            }
        }
        match msg {
            CMsg::Query { sql, frame } => {
                let class = self.classify(&sql);
                if let Some(r) = self.local_query(&sql, &class) {
                    let status = self
                        .backend
                        .as_ref()
                        .map_or(self.txn_status, |h| h.predicted);
                    let h = self.backend.as_mut().expect("held");
                    match r {
                        Ok(msgs) => h.queue.extend(msgs.into_iter().map(Expect::Synth)),
                        Err(e) => h.queue.push_back(Expect::Synth(e.to_bytes())),
                    }
                    let mut z = BytesMut::new();
                    protocol::ready_for_query(status, &mut z);
                    h.queue.push_back(Expect::Synth(z.freeze()));
                    h.drain_synth();
                    return;
                }
                self.note_statements(&class);
                let actions = setting_actions(&class);
                let h = self.backend.as_mut().expect("held");
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.unnamed_ok = false;
                h.unit_open = false;
                h.query_error = false;
                h.queue.push_back(Expect::Client {
                    kind: b'Q',
                    on_success: actions,
                    on_fail: Vec::new(),
                });
                self.attach_probe();
            }
            CMsg::Parse {
                name,
                sql,
                types,
                frame,
            } => {
                let info = match self.make_info(&sql, &types) {
                    Ok(i) => i,
                    Err(e) => return self.local_error(e),
                };
                let h = self.backend.as_mut().expect("held");
                h.unit_open = true;
                if name.is_empty() {
                    h.conn.wbuf.extend_from_slice(&frame.bytes);
                    h.unnamed_ok = true;
                    h.queue.push_back(Expect::Client {
                        kind: b'P',
                        on_success: Vec::new(),
                        on_fail: Vec::new(),
                    });
                    self.unnamed = Some(info);
                    return;
                }
                let global = info.global.clone();
                self.prepared.insert(name.clone(), info);
                if h.conn.prepared.contains(&global) {
                    h.queue
                        .push_back(Expect::Synth(protocol::empty_message(b'1')));
                    h.drain_synth();
                    return;
                }
                match protocol::rename_statement(&frame, 0, &global) {
                    Some(bytes) => h.conn.wbuf.extend_from_slice(&bytes),
                    None => return self.local_error(malformed("Parse")),
                }
                h.conn.prepared.insert(global.clone());
                h.queue.push_back(Expect::Client {
                    kind: b'P',
                    on_success: Vec::new(),
                    on_fail: vec![
                        Action::ForgetClientStmt(name),
                        Action::ForgetBackendStmt(global),
                    ],
                });
            }
            CMsg::Bind {
                portal,
                stmt,
                frame,
            } => {
                self.local_portals.remove(&portal);
                let Some(info) = self.stmt_info(&stmt) else {
                    return self.local_error(no_such_statement(&stmt));
                };
                let class = info.class.clone();
                self.note_statements(&class);
                let h = self.backend.as_mut().expect("held");
                h.unit_open = true;
                h.portal_class.insert(portal.clone(), class);
                ensure_prepared(h, &info, stmt.is_empty());
                if stmt.is_empty() {
                    h.conn.wbuf.extend_from_slice(&frame.bytes);
                } else {
                    match protocol::rename_statement(&frame, 1, &info.global) {
                        Some(bytes) => h.conn.wbuf.extend_from_slice(&bytes),
                        None => return self.local_error(malformed("Bind")),
                    }
                }
                h.queue.push_back(Expect::Client {
                    kind: b'B',
                    on_success: Vec::new(),
                    on_fail: Vec::new(),
                });
            }
            CMsg::Describe { kind, name, frame } => {
                let h = self.backend.as_mut().expect("held");
                h.unit_open = true;
                if kind == b'S' {
                    let Some(info) = (if name.is_empty() {
                        self.unnamed.clone()
                    } else {
                        self.prepared.get(&name).cloned()
                    }) else {
                        return self.local_error(no_such_statement(&name));
                    };
                    ensure_prepared(h, &info, name.is_empty());
                    if name.is_empty() {
                        h.conn.wbuf.extend_from_slice(&frame.bytes);
                    } else {
                        let _ = frontend::describe(b'S', &info.global, &mut h.conn.wbuf);
                    }
                } else {
                    h.conn.wbuf.extend_from_slice(&frame.bytes);
                }
                h.queue.push_back(Expect::Client {
                    kind: b'D',
                    on_success: Vec::new(),
                    on_fail: Vec::new(),
                });
            }
            CMsg::Execute { portal, frame } => {
                let h = self.backend.as_mut().expect("held");
                h.unit_open = true;
                let actions = h
                    .portal_class
                    .get(&portal)
                    .map(|c| setting_actions(c))
                    .unwrap_or_default();
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.queue.push_back(Expect::Client {
                    kind: b'E',
                    on_success: actions,
                    on_fail: Vec::new(),
                });
            }
            CMsg::Close { frame, .. } => {
                // Portals and the unnamed statement (named statements are
                // answered locally above).
                let h = self.backend.as_mut().expect("held");
                h.unit_open = true;
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.queue.push_back(Expect::Client {
                    kind: b'C',
                    on_success: Vec::new(),
                    on_fail: Vec::new(),
                });
            }
            CMsg::Sync { frame } => {
                let h = self.backend.as_mut().expect("held");
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.unit_open = false;
                if h.copy_ignoring_sync {
                    // Ignored by the server while COPY FROM STDIN runs.
                    return;
                }
                h.queue.push_back(Expect::Client {
                    kind: b'S',
                    on_success: Vec::new(),
                    on_fail: Vec::new(),
                });
                self.attach_probe();
            }
            CMsg::Flush { frame } => {
                let h = self.backend.as_mut().expect("held");
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                // The client waits for the replies so far: stop holding them
                // back (the unit can no longer be retried elsewhere), once
                // the replica is known to be fresh enough.
                let checking = h.queue.iter().any(|e| {
                    matches!(
                        e,
                        Expect::Probe {
                            kind: ProbeKind::Before { .. },
                            ..
                        }
                    )
                });
                if checking {
                    h.flush_pending = true;
                } else if matches!(h.mode, Mode::Buffer(_)) {
                    h.commit_output();
                    h.unit = None;
                }
            }
        }
        if let Some(h) = &mut self.backend {
            h.drain_synth();
        }
    }

    /// Forwards a unit's messages, skipping to `Sync` after a local error.
    fn forward_all(&mut self, msgs: Vec<CMsg>) {
        for msg in msgs {
            if self.skip_until_sync {
                if !matches!(msg, CMsg::Sync { .. }) {
                    continue;
                }
                self.skip_until_sync = false;
            }
            self.forward(msg);
        }
    }

    /// A proxy-detected error in the middle of an extended batch: reply it
    /// in order and skip client messages until `Sync`, as the server would.
    fn local_error(&mut self, e: PgError) {
        if let Some(h) = &mut self.backend {
            h.queue.push_back(Expect::Synth(e.to_bytes()));
            h.drain_synth();
        }
        self.skip_until_sync = true;
    }

    /// Pipelines a position probe behind the statement just forwarded,
    /// when read-your-writes or monotonic reads need one.
    fn attach_probe(&mut self) {
        let uses_token = self.settings().policy.uses_token();
        let Some(h) = &mut self.backend else { return };
        if std::mem::take(&mut h.no_pipelined_probe) || !uses_token || h.predicted != b'I' {
            // COPY FROM STDIN: the server would take the probe as COPY
            // data; the fallback probe runs after ReadyForQuery instead.
            return;
        }
        if h.on_replica {
            let parsed = encode_probe(&mut h.conn);
            h.queue.push_back(probe(ProbeKind::After, parsed));
        } else if h.wrote_since_probe {
            let parsed = encode_probe(&mut h.conn);
            h.queue.push_back(probe(ProbeKind::Write, parsed));
            h.wrote_since_probe = false;
        }
    }

    // ---------------------------------------------------------------
    // Server messages
    // ---------------------------------------------------------------

    fn on_backend_frame(&mut self, f: Frame) {
        tracing::trace!(pid = self.pid, tag = %char::from(f.tag), queue = ?self.backend.as_ref().map(|h| &h.queue), "server message");
        let mut actions: Vec<Action> = Vec::new();
        let mut client_z: Option<Frame> = None;
        let mut probe_done: Option<(ProbeKind, bool, Option<Position>)> = None;
        let mut committed = false;
        {
            let h = self.backend.as_mut().expect("held");
            let head_is_client = matches!(h.queue.front(), Some(Expect::Client { .. }) | None);
            match f.tag {
                b'A' => {
                    // Notifications are not part of any reply.
                    h.out.extend_from_slice(&f.bytes);
                    return;
                }
                b'S' => {
                    h.conn.note_parameter(&f);
                    if head_is_client {
                        h.emit(&f.bytes);
                    }
                    return;
                }
                b'N' => {
                    if head_is_client {
                        h.emit(&f.bytes);
                    }
                    return;
                }
                _ => {}
            }
            let Some(head) = h.queue.front_mut() else {
                // Unsolicited: typically FATAL before the server closes.
                if f.tag == b'E' {
                    let e = protocol::error_fields(&f);
                    warn!(node = h.node, code = %e.code, message = %e.message, "server error outside a request");
                    h.out.extend_from_slice(&f.bytes);
                }
                h.conn.broken = true;
                return;
            };
            match head {
                Expect::Synth(_) => {
                    warn!("internal: synthesized reply at the head of the queue");
                    h.drain_synth();
                }
                Expect::Prelude => match f.tag {
                    b'E' => {
                        let e = protocol::error_fields(&f);
                        warn!(code = %e.code, message = %e.message, "settings replay failed");
                    }
                    b'Z' => {
                        h.queue.pop_front();
                    }
                    _ => {}
                },
                Expect::Injected { global } => match f.tag {
                    b'1' => {
                        h.queue.pop_front();
                    }
                    b'E' => {
                        if let Some(g) = global.take() {
                            actions.push(Action::ForgetBackendStmt(g));
                        }
                        h.queue.pop_front();
                        h.emit(&f.bytes);
                        fail_until_sync(h, &mut actions);
                    }
                    _ => {}
                },
                Expect::Probe {
                    kind,
                    parsed,
                    saw_parse_complete,
                    failed,
                    result,
                } => match f.tag {
                    b'1' => *saw_parse_complete = true,
                    b'D' => *result = Some(position(&f)),
                    b'E' => *failed = true,
                    b'Z' => {
                        let (k, res) = (*kind, if *failed { None } else { *result });
                        let lost_parse = *failed && *parsed && !*saw_parse_complete;
                        probe_done = Some((k, lost_parse, res));
                        h.queue.pop_front();
                    }
                    _ => {}
                },
                Expect::Client { kind, .. } => {
                    let kind = *kind;
                    match f.tag {
                        b'E' => {
                            let fields = protocol::error_fields(&f);
                            let retryable = matches!(h.mode, Mode::Buffer(_))
                                && (fields.code == "25006"
                                    || (fields.code == "40001"
                                        && fields.message.contains("recovery"))
                                    || fields.code.starts_with("57P"))
                                && self.shared.settings().config.routing.retry_on_replica_error;
                            if retryable {
                                debug!(code = %fields.code, "replica rejected the read; retrying on the primary");
                                h.mode = Mode::Discard;
                                h.retry = Some(Retry::Primary(if fields.code == "25006" {
                                    "read_only"
                                } else {
                                    "recovery_conflict"
                                }));
                            }
                            h.emit(&f.bytes);
                            h.txn_failed = true;
                            if kind == b'Q' {
                                h.query_error = true;
                            } else if let Some(Expect::Client { on_fail, .. }) = h.queue.pop_front()
                            {
                                actions.extend(on_fail);
                                fail_until_sync(h, &mut actions);
                            }
                        }
                        b'Z' => {
                            if let Some(Expect::Client { on_success, .. }) = h.queue.pop_front() {
                                if kind == b'Q' && !h.query_error {
                                    actions.extend(on_success);
                                }
                            }
                            h.query_error = false;
                            client_z = Some(f);
                        }
                        b'G' => {
                            h.copy_in = true;
                            h.emit(&f.bytes);
                            if kind == b'E' {
                                h.copy_ignoring_sync = true;
                                // The client's real Sync follows the COPY data.
                                h.unit_open = true;
                                // Syncs sent before COPY started are ignored
                                // by the server: expect no reply to them.
                                let head = h.queue.pop_front();
                                h.queue
                                    .retain(|e| !matches!(e, Expect::Client { kind: b'S', .. }));
                                if let Some(head) = head {
                                    h.queue.push_front(head);
                                }
                            }
                        }
                        b'D' | b'H' | b'W' => {
                            h.commit_output();
                            h.emit(&f.bytes);
                        }
                        b'C' => {
                            h.copy_in = false;
                            h.copy_ignoring_sync = false;
                            h.emit(&f.bytes);
                            match protocol::command_tag(&f) {
                                b"ROLLBACK" => h.txn_failed = true,
                                b"COMMIT" => committed = true,
                                _ => {}
                            }
                            if kind == b'E' {
                                if let Some(Expect::Client { on_success, .. }) = h.queue.pop_front()
                                {
                                    actions.extend(on_success);
                                }
                            }
                        }
                        tag => {
                            h.emit(&f.bytes);
                            if terminates(kind, tag) {
                                h.queue.pop_front();
                            }
                        }
                    }
                }
            }
            // Synthesized replies queued behind a ReadyForQuery or a probe
            // wait until that has been handled (below).
            if client_z.is_none() && probe_done.is_none() {
                h.drain_synth();
            }
        }
        self.apply_actions(actions);
        if committed {
            self.settings_at_boundary();
        }
        if let Some(z) = client_z {
            self.on_client_ready(z);
        }
        if let Some((kind, lost_parse, result)) = probe_done {
            self.on_probe(kind, lost_parse, result);
        }
        if let Some(h) = &mut self.backend {
            h.drain_synth();
        }
    }

    /// The client's `ReadyForQuery` arrived (a unit finished).
    fn on_client_ready(&mut self, z: Frame) {
        let status = protocol::rfq_status(&z);
        let uses_token = self.settings().policy.uses_token();
        let h = self.backend.as_mut().expect("held");
        if matches!(h.mode, Mode::Discard) {
            return;
        }
        self.txn_status = status;
        match status {
            b'I' => {
                let before = self.settings_before_txn.take();
                if let (true, Some((desired, applied))) =
                    (std::mem::take(&mut h.txn_failed), before)
                {
                    // Rolled back: the server undid this transaction's SETs.
                    self.desired = desired;
                    h.conn.applied = applied;
                }
            }
            // Recovered (ROLLBACK TO SAVEPOINT): the transaction goes on.
            b'T' => h.txn_failed = false,
            _ => {}
        }
        if !h.has_client_entries() {
            h.predicted = status;
        }
        h.commit_output();
        h.unit = None;
        if status != b'I' {
            h.emit(&z.bytes);
            return;
        }
        let probe_follows = matches!(
            h.queue.front(),
            Some(Expect::Probe {
                kind: ProbeKind::After | ProbeKind::Write,
                ..
            })
        );
        if !probe_follows && h.wrote_since_probe && uses_token && !h.on_replica {
            // Not pipelined (COPY, or a transaction end the proxy could
            // not predict): probe now, before the client may go on.
            let parsed = encode_probe(&mut h.conn);
            h.queue.push_front(probe(ProbeKind::Write, parsed));
            h.wrote_since_probe = false;
            h.held_rfq = Some(z);
            return;
        }
        if probe_follows {
            h.held_rfq = Some(z);
        } else {
            h.emit(&z.bytes);
        }
    }

    fn on_probe(&mut self, kind: ProbeKind, lost_parse: bool, result: Option<Position>) {
        let max_wait = match self.settings().policy {
            lagrouter::Consistency::ReadYourWrites { max_wait, .. } => max_wait,
            _ => Duration::ZERO,
        };
        let mut new_token = None;
        {
            let h = self.backend.as_mut().expect("held");
            if lost_parse {
                h.conn.probe_prepared = false;
            }
            match kind {
                ProbeKind::Before { need } => {
                    let caught_up = matches!(result, Some((_, Some(lsn))) if lsn >= need);
                    if caught_up && std::mem::take(&mut h.flush_pending) {
                        h.commit_output();
                        h.unit = None;
                    }
                    if !caught_up && !matches!(h.mode, Mode::Discard) {
                        h.mode = Mode::Discard;
                        h.retry = Some(if result.is_some() {
                            Retry::Wait {
                                need,
                                deadline: Instant::now() + max_wait,
                            }
                        } else {
                            Retry::Primary("replica_error")
                        });
                    }
                }
                ProbeKind::After => {
                    if let Some((_, Some(lsn))) = result {
                        new_token = Some((lsn, false));
                    }
                }
                ProbeKind::Write => {
                    let committed = h
                        .held_rfq
                        .as_ref()
                        .is_some_and(|z| protocol::rfq_status(z) == b'I');
                    match result {
                        Some((false, Some(lsn))) if committed => new_token = Some((lsn, true)),
                        _ => h.wrote_since_probe = true,
                    }
                }
            }
        }
        if let Some((lsn, write)) = new_token {
            let seg = self.shared.monitor.snapshot().wal_segment_size;
            let lsn = if write {
                lsn.round_to_record_boundary(seg)
            } else {
                lsn
            };
            let before = self.token;
            self.advance_token(lsn);
            if write && self.token != before {
                if let Some(t) = self.token {
                    let h = self.backend.as_mut().expect("held");
                    let mut b = BytesMut::new();
                    protocol::parameter_status(TOKEN_PARAMETER, &t.encode(), &mut b);
                    h.emit(&b);
                }
            }
        }
        let h = self.backend.as_mut().expect("held");
        if let Some(z) = h.held_rfq.take() {
            h.emit(&z.bytes);
        }
    }

    fn apply_actions(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::ForgetClientStmt(name) => {
                    self.prepared.remove(&name);
                }
                Action::ForgetBackendStmt(g) => {
                    if let Some(h) = &mut self.backend {
                        h.conn.prepared.remove(&g);
                    }
                }
                Action::Setting(kind) => self.apply_setting(kind),
            }
        }
    }

    /// A transaction committed: its settings are now the session's.
    fn settings_at_boundary(&mut self) {
        self.settings_before_txn = None;
        if let Some(h) = &mut self.backend {
            h.txn_failed = false;
        }
    }

    /// Records a successful `SET`/`RESET`/`DISCARD` so it is replayed on
    /// whichever backend serves the next statement.
    fn apply_setting(&mut self, kind: StatementKind) {
        if self.settings_before_txn.is_none()
            && matches!(
                kind,
                StatementKind::Set { local: false, .. }
                    | StatementKind::Reset { .. }
                    | StatementKind::Discard
            )
        {
            let applied = self
                .backend
                .as_ref()
                .map(|h| h.conn.applied.clone())
                .unwrap_or_default();
            self.settings_before_txn = Some((self.desired.clone(), applied));
        }
        let h = self.backend.as_mut();
        match kind {
            StatementKind::Set {
                name,
                value,
                local: false,
            } => {
                let sql = set_statement_sql(&name, &value);
                if let Some(h) = h {
                    h.conn.applied.insert(name.clone(), sql.clone());
                }
                self.desired.insert(name, sql);
            }
            StatementKind::Reset { name: Some(name) } => {
                match self.startup_desired.get(&name) {
                    Some(v) => self.desired.insert(name.clone(), v.clone()),
                    None => self.desired.remove(&name),
                };
                if let Some(h) = h {
                    h.conn.applied.remove(&name);
                }
            }
            StatementKind::Reset { name: None } => {
                self.desired = self.startup_desired.clone();
                if let Some(h) = h {
                    h.conn.applied.clear();
                }
            }
            StatementKind::Discard => {
                self.desired = self.startup_desired.clone();
                self.prepared.clear();
                self.unnamed = None;
                if let Some(h) = h {
                    h.conn.applied.clear();
                    h.conn.prepared.clear();
                    h.conn.probe_prepared = false;
                }
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------
    // Between units
    // ---------------------------------------------------------------

    /// Runs pending retries and returns the backend to its pool when the
    /// session no longer needs it.
    async fn housekeeping(&mut self) -> Flow {
        loop {
            self.move_output();
            let Some(h) = &mut self.backend else {
                return Ok(());
            };
            if !h.queue.is_empty() || h.copy_in || !h.conn.wbuf.is_empty() {
                return Ok(());
            }
            if let Some(retry) = h.retry.take() {
                self.run_retry(retry).await?;
                continue;
            }
            if self.pinned || self.txn_status != b'I' || h.unit_open || h.held_rfq.is_some() {
                return Ok(());
            }
            self.release();
            return Ok(());
        }
    }

    fn release(&mut self) {
        if let Some(mut h) = self.backend.take() {
            *self.cancel.lock().expect("cancel slot") = None;
            if !h.out.is_empty() {
                self.client.wbuf.extend_from_slice(&h.out);
                h.out.clear();
            }
            if h.conn.broken {
                drop(h);
            } else {
                h.conn.release();
            }
        }
    }

    async fn run_retry(&mut self, retry: Retry) -> Flow {
        let Some(mut h) = self.backend.take() else {
            return Ok(());
        };
        let unit = h.unit.take().unwrap_or_default();
        *self.cancel.lock().expect("cancel slot") = None;
        match retry {
            Retry::Primary(reason) => {
                metrics::counter!(m::FALLBACKS_TOTAL, "reason" => reason).increment(1);
                if h.conn.broken {
                    drop(h);
                } else {
                    h.conn.release();
                }
                self.start_unit(Target::Primary, unit, true, None).await
            }
            Retry::Wait { need, deadline } => {
                metrics::counter!(m::TOKEN_WAITS_TOTAL).increment(1);
                let started = Instant::now();
                loop {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
                    // Bounded: a replica that hangs must not hold the read.
                    let left = deadline.saturating_duration_since(Instant::now()) + WAIT_POLL;
                    match poll_position(&mut h.conn, left).await {
                        Ok(Some(lsn)) if lsn >= need => {
                            metrics::histogram!(m::TOKEN_WAIT_SECONDS)
                                .record(started.elapsed().as_secs_f64());
                            // Caught up: run the unit here after all.
                            h.mode = Mode::Buffer(BytesMut::new());
                            h.flush_pending = false;
                            h.unit = Some(unit.clone());
                            h.predicted = self.txn_status;
                            *self.cancel.lock().expect("cancel slot") =
                                Some(h.conn.cancel_target());
                            self.backend = Some(h);
                            self.forward_all(unit);
                            return Ok(());
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!(node = h.node, error = %e, "replica failed while waiting for it");
                            if e.is_connection_failure() {
                                self.shared.monitor.report_failure(h.node, &e.to_string());
                            }
                            h.conn.broken = true;
                            break;
                        }
                    }
                }
                metrics::histogram!(m::TOKEN_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
                if h.conn.broken {
                    drop(h);
                } else {
                    h.conn.release();
                }
                let then = match self.settings().policy {
                    lagrouter::Consistency::ReadYourWrites { then, .. } => then,
                    _ => Fallback::Primary,
                };
                match then {
                    Fallback::Primary => {
                        metrics::counter!(m::FALLBACKS_TOTAL, "reason" => "wait_timeout")
                            .increment(1);
                        self.start_unit(Target::Primary, unit, true, Some(need))
                            .await
                    }
                    Fallback::Error => {
                        let waited = started.elapsed();
                        self.unit_error(
                            &unit,
                            PgError::error(
                                lagrouter::error::SQLSTATE_WAIT_TIMEOUT,
                                format!("no replica reached {need} within {waited:?}"),
                            )
                            .with_hint("Raise routing.max_wait or set routing.then = \"primary\"."),
                        );
                        Ok(())
                    }
                }
            }
        }
    }

    /// The held backend failed: retry a replica read elsewhere when nothing
    /// reached the client yet, else end the session (its transaction or
    /// pipeline state is lost).
    async fn backend_failed(&mut self, e: BackendError) -> Flow {
        let Some(mut h) = self.backend.take() else {
            return Ok(());
        };
        *self.cancel.lock().expect("cancel slot") = None;
        warn!(node = h.node, error = %e, "server connection failed");
        if e.is_connection_failure() {
            self.shared.monitor.report_failure(h.node, &e.to_string());
        }
        h.conn.broken = true;
        let retryable =
            h.unit.is_some() && matches!(h.mode, Mode::Buffer(_) | Mode::Discard) && !self.pinned;
        if retryable {
            let unit = h.unit.take().unwrap_or_default();
            drop(h);
            metrics::counter!(m::FALLBACKS_TOTAL, "reason" => "replica_error").increment(1);
            return self.start_unit(Target::Primary, unit, true, None).await;
        }
        self.client.wbuf.extend_from_slice(&h.out);
        drop(h);
        Err(SessionEnd::Fatal(PgError::fatal(
            "08006",
            format!("lost the server connection: {e}"),
        )))
    }
}

fn probe(kind: ProbeKind, parsed: bool) -> Expect {
    Expect::Probe {
        kind,
        parsed,
        saw_parse_complete: false,
        failed: false,
        result: None,
    }
}

/// Queues a position probe on `conn`: `Bind`/`Execute`/`Sync` of the
/// proxy's own named statement (prepared once per connection, never the
/// client's unnamed statement), after either protocol's messages. Returns
/// `true` when it includes the `Parse`.
fn encode_probe(conn: &mut BackendConn) -> bool {
    let parsed = !conn.probe_prepared;
    if parsed {
        let _ = frontend::parse(
            PROBE_STATEMENT,
            POSITION_SQL,
            std::iter::empty(),
            &mut conn.wbuf,
        );
        conn.probe_prepared = true;
    }
    let _ = frontend::bind(
        "",
        PROBE_STATEMENT,
        std::iter::empty::<i16>(),
        std::iter::empty::<Option<&[u8]>>(),
        |_: Option<&[u8]>, _: &mut BytesMut| Ok(postgres_protocol::IsNull::Yes),
        std::iter::empty::<i16>(),
        &mut conn.wbuf,
    );
    let _ = frontend::execute("", 0, &mut conn.wbuf);
    frontend::sync(&mut conn.wbuf);
    parsed
}

/// Runs a simple position probe to completion (while waiting for a
/// replica, or to check the primary), for at most `limit`: a node that
/// hangs must not hold the session.
async fn poll_position(
    conn: &mut BackendConn,
    limit: Duration,
) -> Result<Option<Lsn>, BackendError> {
    let rows = tokio::time::timeout(limit, conn.simple_query(POSITION_SQL))
        .await
        .map_err(|_| {
            BackendError::Unresponsive(format!("no answer to a position probe within {limit:?}"))
        })??;
    Ok(rows.first().and_then(|r| {
        r.get(1)
            .and_then(|v| v.as_deref())
            .and_then(|s| s.parse().ok())
    }))
}

/// `(in_recovery, lsn)` from a probe's `DataRow`.
fn position(f: &Frame) -> Position {
    let cols = protocol::data_row_texts(f);
    let in_recovery = cols
        .first()
        .and_then(|c| c.as_deref())
        .is_some_and(|v| v == "t" || v == "true");
    let lsn = cols
        .get(1)
        .and_then(|c| c.as_deref())
        .and_then(|s| s.parse().ok());
    (in_recovery, lsn)
}

/// Makes sure the held backend has `info` prepared (as the unnamed
/// statement, or under its global name) before a Bind or Describe uses it.
fn ensure_prepared(h: &mut Held, info: &StmtInfo, unnamed: bool) {
    if unnamed {
        if !h.unnamed_ok {
            inject_parse(h, info, None);
        }
    } else if !h.conn.prepared.contains(&info.global) {
        inject_parse(h, info, Some(info.global.clone()));
    }
}

/// Re-parses a client's statement on a backend that lacks it.
fn inject_parse(h: &mut Held, info: &StmtInfo, global: Option<String>) {
    let name = global.as_deref().unwrap_or("");
    if frontend::parse(
        name,
        &info.sql,
        info.types.iter().copied(),
        &mut h.conn.wbuf,
    )
    .is_err()
    {
        return;
    }
    match &global {
        Some(g) => {
            h.conn.prepared.insert(g.clone());
        }
        None => h.unnamed_ok = true,
    }
    h.queue.push_back(Expect::Injected { global });
}

/// After an error in the extended protocol the server skips everything up
/// to the next `Sync`: drop those expectations (undoing their effects).
fn fail_until_sync(h: &mut Held, actions: &mut Vec<Action>) {
    loop {
        match h.queue.front() {
            Some(Expect::Client { kind: b'S', .. }) => return,
            None => {
                h.server_skipping = true;
                return;
            }
            Some(Expect::Prelude | Expect::Probe { .. }) => return,
            _ => {}
        }
        match h.queue.pop_front() {
            Some(Expect::Client { on_fail, .. }) => actions.extend(on_fail),
            Some(Expect::Injected { global: Some(g) }) => {
                actions.push(Action::ForgetBackendStmt(g))
            }
            _ => {}
        }
    }
}

/// Settings changes a statement makes, applied when it succeeds.
fn setting_actions(class: &Classification) -> Vec<Action> {
    class
        .statements
        .iter()
        .filter(|k| {
            matches!(
                k,
                StatementKind::Set { local: false, .. }
                    | StatementKind::Reset { .. }
                    | StatementKind::Discard
            )
        })
        .cloned()
        .map(Action::Setting)
        .collect()
}

/// The statements that bring `conn` to the session's settings.
fn prelude_sql(desired: &BTreeMap<String, String>, conn: &BackendConn) -> Option<String> {
    let mut sql = String::new();
    for (k, v) in desired {
        if conn.applied.get(k) != Some(v) {
            sql.push_str(v);
            sql.push_str(";\n");
        }
    }
    for k in conn.applied.keys() {
        if !desired.contains_key(k) {
            sql.push_str(&reset_statement_sql(Some(k)));
            sql.push_str(";\n");
        }
    }
    (!sql.is_empty()).then_some(sql)
}

/// `SHOW lagrouter.*` → the setting name.
fn show_lagrouter(sql: &str) -> Option<String> {
    let s = sql.trim().trim_end_matches(';').trim();
    let mut words = s.split_whitespace();
    let first = words.next()?;
    let name = words.next()?;
    if !first.eq_ignore_ascii_case("show") || words.next().is_some() {
        return None;
    }
    let name = name.trim_matches('"').to_ascii_lowercase();
    name.starts_with("lagrouter.").then_some(name)
}

/// `DEALLOCATE [PREPARE] name | ALL` → `Some(Some(name))` / `Some(None)`.
fn deallocate_target(sql: &str) -> Option<Option<String>> {
    let s = sql.trim().trim_end_matches(';').trim();
    let mut words = s.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut w = words.next()?;
    if w.eq_ignore_ascii_case("prepare") {
        w = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if w.eq_ignore_ascii_case("all") {
        return Some(None);
    }
    let name = if w.starts_with('"') && w.ends_with('"') && w.len() >= 2 {
        w[1..w.len() - 1].replace("\"\"", "\"")
    } else {
        w.to_ascii_lowercase()
    };
    Some(Some(name))
}

/// SQLSTATE 55000 for a token ahead of what the primary has.
/// The library's [`lagrouter::Error::TokenAhead`], as a client error.
fn token_ahead(token: Lsn, primary: Lsn) -> PgError {
    let e = lagrouter::Error::TokenAhead { token, primary };
    PgError::error(e.code().unwrap_or("55000"), e.to_string())
    .with_hint("The token was forged, or writes acknowledged before a failover were lost. Check the data; a write on the current primary, or a new connection, starts from a fresh token.")
}

fn unknown_setting(name: &str) -> PgError {
    PgError::error(
        "42704",
        format!("unrecognized configuration parameter \"{name}\""),
    )
    .with_hint("lagrouter-proxy knows lagrouter.min_token (SET) and lagrouter.token (SHOW).")
}

fn no_such_statement(name: &str) -> PgError {
    PgError::error(
        "26000",
        format!("prepared statement \"{name}\" does not exist"),
    )
}

fn malformed(what: &str) -> PgError {
    PgError::error(
        protocol::SQLSTATE_PROTOCOL_VIOLATION,
        format!("malformed {what} message"),
    )
}

fn backend_fatal(e: &BackendError) -> PgError {
    match e {
        BackendError::Server(f) => PgError::fatal(&f.code, f.message.clone()),
        other => PgError::fatal(other.sqlstate(), other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_and_deallocate_are_recognised() {
        assert_eq!(
            show_lagrouter("SHOW lagrouter.token;"),
            Some("lagrouter.token".into())
        );
        assert_eq!(
            show_lagrouter("show  LAGROUTER.TOKEN"),
            Some("lagrouter.token".into())
        );
        assert_eq!(show_lagrouter("SHOW search_path"), None);
        assert_eq!(deallocate_target("DEALLOCATE s1"), Some(Some("s1".into())));
        assert_eq!(
            deallocate_target("deallocate prepare \"S1\";"),
            Some(Some("S1".into()))
        );
        assert_eq!(deallocate_target("DEALLOCATE ALL"), Some(None));
        assert_eq!(deallocate_target("SELECT 1"), None);
    }

    #[test]
    fn global_names_depend_on_sql_and_types() {
        assert_eq!(
            global_name("SELECT $1", &[23]),
            global_name("SELECT $1", &[23])
        );
        assert_ne!(
            global_name("SELECT $1", &[23]),
            global_name("SELECT $1", &[25])
        );
        assert_ne!(global_name("SELECT 1", &[]), global_name("SELECT 2", &[]));
    }

    #[test]
    fn terminators() {
        assert!(terminates(b'P', b'1'));
        assert!(terminates(b'D', b'n'));
        assert!(terminates(b'E', b's'));
        assert!(!terminates(b'Q', b'C'));
        assert!(terminates(b'S', b'Z'));
    }
}
