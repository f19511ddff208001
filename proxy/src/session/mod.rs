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
//!
//! # Files
//!
//! * this file: the `Session` and its main loop (events, flushing,
//!   idle timeouts, releasing the server connection);
//! * `unit`: from client messages to a unit of work — batching,
//!   classification, routing, checkout, `Session::start_unit`;
//! * `read`: the read engine's driver: where a read runs, waits, fallbacks
//!   and retries, as [`lagrouter::routing::ReadPlan`] decides;
//! * `pipeline`: the held connection (`pipeline::Held`) and which replies
//!   are expected (`pipeline::Expect`);
//! * `forward`: sending client messages to the held connection;
//! * `replies`: attributing server messages to what was sent;
//! * `prepared`: prepared statements under proxy-global names;
//! * `settings`: `SET`/`RESET` tracking, the prelude that replays them,
//!   and their undo on rollback;
//! * `local`: statements the proxy answers itself;
//! * `lost`: a server connection that died under the client: the error it
//!   gets, and its transaction answered as aborted until it ends it;
//! * `optimistic`: transactions that start on a replica and move to the
//!   primary at their first write, replayed and checked;
//! * `pin`: pinning to the server connection and unpinning;
//! * `probe`: the position probes pipelined before and after statements;
//! * `unlogged`: reads of unlogged relations go to the primary.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lagrouter::TokenHolder;
use lagrouter::routing::{LastRead, ReadPlan, Served};
use tracing::{debug, warn};

use crate::backend::BackendError;
use crate::classify::set_statement_sql;
use crate::frontend::{ClientConn, ClientError, StartupInfo};
use crate::metrics as m;
use crate::server::Shared;
use crate::wire::{self as protocol, ClientMessage, Frame, PgError, TxnStatus};

mod forward;
mod local;
mod lost;
mod optimistic;
mod pin;
mod pipeline;
mod prepared;
mod probe;
mod read;
mod replies;
mod settings;
mod unit;
mod unlogged;

pub use local::{MIN_TOKEN_SETTING, TOKEN_PARAMETER};
pub use probe::PROBE_STATEMENT;

use local::LocalStmt;
use pipeline::{Held, Mode, UnitState};
use prepared::StmtInfo;
use settings::{SettingMap, prelude_sql};

/// Most extended-protocol messages buffered before a `Sync`/`Flush`.
const MAX_PENDING: usize = 100_000;

/// What woke the session up.
enum Event {
    /// A server message (or the connection failed).
    Backend(Result<Frame, BackendError>),
    /// Client bytes arrived (or the connection failed or closed).
    Client(Result<(), ClientError>),
    /// Shutdown began.
    Shutdown,
    /// The client was idle for too long.
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

/// Whether client messages are being skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    /// Client messages are processed.
    No,
    /// After an error the proxy reported itself in an extended-protocol
    /// batch, client messages are skipped up to the next `Sync`, as the
    /// server would.
    UntilSync,
}

/// Whether the session gives its server connection back between
/// transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pooling {
    /// Transaction pooling: the connection returns to the pool whenever
    /// the session is idle with nothing outstanding.
    Transaction,
    /// Pinned to the primary by session-bound state (temporary tables,
    /// `LISTEN`, advisory locks, …): the connection is kept to the end.
    Pinned,
}

/// Where the session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lifecycle {
    /// Serving the client.
    Running,
    /// Shutdown began: the session ends (57P01) as soon as it holds no
    /// server connection.
    Closing,
}

/// One client session after startup.
struct Session {
    /// State shared with the whole proxy.
    shared: Arc<Shared>,
    /// The client connection.
    client: ClientConn,
    /// The pid reported to the client in `BackendKeyData`.
    pid: i32,
    /// The session's consistency token: the newest position it wrote or
    /// read, or was given.
    token: TokenHolder,
    /// The read engine's plan for the read unit in flight, if any.
    plan: Option<Box<ReadPlan>>,
    /// The read unit whose result stands, recorded as the session's last
    /// read when its server connection is released.
    read_served: Option<Served>,
    /// Where the session's last read ran (monotonic reads), until a write
    /// token covers it.
    last_read: Option<LastRead>,
    /// The position read after the last read unit, when the engine asked.
    read_capture: Option<lagrouter::Lsn>,
    /// The session's own read policy (`SET lagrouter.consistency`, else the
    /// user's `consistency` from the configuration).
    consistency: Option<lagrouter::Consistency>,
    /// The session's read-your-writes wait (`SET lagrouter.max_wait`).
    max_wait: Option<Duration>,
    /// The policy of the unit being sent: the session's, or a
    /// `lagrouter:consistency` hint's for that statement.
    unit_policy: lagrouter::Consistency,
    /// When the session last wrote (given to the router with each read).
    last_write: Option<Instant>,
    /// Session settings to have on any backend (name → SQL to apply);
    /// copied on write.
    desired: Arc<SettingMap>,
    /// The settings from the startup packet (what `RESET` returns to).
    startup_desired: Arc<SettingMap>,
    /// `desired` and the held connection's applied settings as they were
    /// before the first setting change since the last transaction
    /// boundary: what a rollback returns them to, as the server undoes a
    /// `SET` made inside a transaction that does not commit.
    settings_before_txn: Option<Box<settings::BeforeTxn>>,
    /// The client's named prepared statements.
    prepared: HashMap<String, Arc<StmtInfo>>,
    /// The client's unnamed statement.
    unnamed: Option<Arc<StmtInfo>>,
    /// Portals bound to statements the proxy answers itself.
    local_portals: HashMap<String, LocalStmt>,
    /// Extended-protocol messages received while no backend is held,
    /// up to the `Sync`/`Flush` that ends the batch.
    pending: Vec<ClientMessage>,
    /// Whether client messages are skipped up to the next `Sync` (after an
    /// error the proxy reported itself).
    skip: Skip,
    /// The server connection held for the current unit or transaction.
    /// (Boxed, as the plan: an idle session's task stays small.)
    backend: Option<Box<Held>>,
    /// Whether the server connection is given back between transactions.
    pooling: Pooling,
    /// The transaction status last reported to the client.
    txn_status: TxnStatus,
    /// Whether the session is closing (shutdown began).
    lifecycle: Lifecycle,
    /// Statement kinds of the unit being routed (for metrics).
    unit_kinds: Vec<&'static str>,
    /// What the admin console shows of this client; also its user, its
    /// database, its configuration (`entry`) and where its current query
    /// can be cancelled (`server`, set while a backend is held).
    status: Arc<crate::server::ClientStatus>,
    /// A transaction whose server connection died, answered as aborted
    /// until the client ends it (`lost.rs`).
    lost: Option<Box<lost::LostTxn>>,
    /// What keeps a pinned session pinned besides server-side objects.
    sticky: pin::Sticky,
    /// A statement that may have released session state ran on the pinned
    /// connection: the server is asked what is left at the next idle moment.
    pin_recheck: bool,
    /// Whether the client's encoding is UTF-8 (as the last `client_encoding`
    /// parameter status it was sent says); if not, its SQL is classified
    /// from a stand-in text (see `ClientMessage::decode_any_encoding`).
    client_utf8: bool,
    /// A client message that starts a new unit, held while the open unit
    /// before it ends on the replica that ran it.
    deferred: Option<Box<ClientMessage>>,
    /// The optimistic transaction running on a replica, if any.
    optimistic: optimistic::OptState,
    /// The last statement text classified.
    recent: prepared::Recent,
    /// The session's pool of each node, once used.
    pools: std::sync::Mutex<Vec<Option<Arc<crate::backend::NodePool>>>>,
    /// The settings as of `settings_epoch` (see `Shared::settings_since`):
    /// a session reads its own copy, not the shared lock.
    settings: Arc<crate::server::Settings>,
    /// The reload count when `settings` was taken.
    settings_epoch: u64,
    /// The lag monitor's snapshots.
    topo_rx: tokio::sync::watch::Receiver<Arc<lagrouter::Topology>>,
    /// The newest snapshot seen ([`Session::topology`]).
    topo: Arc<lagrouter::Topology>,
}

/// Runs an authenticated client session to its end.
///
/// Not an `async fn`: the session is built before the future exists, so
/// the future, which every connected client's task holds, keeps the
/// session once and not also the arguments it is built from (an `async
/// fn` keeps a slot for each argument).
pub fn run(
    shared: Arc<Shared>,
    client: ClientConn,
    info: StartupInfo,
    status: Arc<crate::server::ClientStatus>,
) -> impl Future<Output = ()> + Send {
    let (pid, secret) = shared.register_session(status.clone());
    let guard = shared.client_guard();
    let mut s = Session::new(shared, client, pid, status);
    // Only the setup needs the startup parameters: boxed, they go with it.
    let info = Box::new(info);
    async move {
        let _guard = guard;
        // (A failed setup's end is boxed: a value as large as `Flow` held
        // here would be kept in the task while the session runs.)
        let failed = Box::pin(s.setup(info, secret)).await.err().map(Box::new);
        let result = match failed {
            None => s.main_loop().await,
            Some(e) => Err(*e),
        };
        // Boxed, as the setup: only a closing session needs it.
        Box::pin(s.close(result)).await;
    }
}

impl Session {
    /// A session for `status`'s client, before its setup.
    fn new(
        shared: Arc<Shared>,
        client: ClientConn,
        pid: i32,
        status: Arc<crate::server::ClientStatus>,
    ) -> Session {
        let settings = shared.settings();
        let unit_policy = settings.policy;
        let topo = shared.monitor.snapshot();
        let topo_rx = shared.monitor.subscribe();
        let no_settings = settings::shared_startup(SettingMap::new());
        Session {
            shared,
            client,
            pid,
            token: TokenHolder::default(),
            plan: None,
            read_served: None,
            last_read: None,
            read_capture: None,
            consistency: status.entry.consistency,
            max_wait: None,
            unit_policy,
            last_write: None,
            desired: no_settings.clone(),
            startup_desired: no_settings,
            settings_before_txn: None,
            prepared: HashMap::new(),
            unnamed: None,
            local_portals: HashMap::new(),
            pending: Vec::new(),
            skip: Skip::No,
            backend: None,
            pooling: Pooling::Transaction,
            txn_status: TxnStatus::Idle,
            lifecycle: Lifecycle::Running,
            unit_kinds: Vec::new(),
            status,
            lost: None,
            deferred: None,
            optimistic: optimistic::OptState::Off,
            client_utf8: true,
            sticky: pin::Sticky::No,
            pin_recheck: false,
            recent: prepared::Recent::default(),
            pools: std::sync::Mutex::new(Vec::new()),
            settings_epoch: 0,
            settings,
            topo,
            topo_rx,
        }
    }
}

impl Session {
    /// Ends the session: the fatal error it ended with, if any, is sent to
    /// the client, a server connection still held is closed, and the
    /// cancel key forgotten.
    async fn close(&mut self, result: Flow) {
        let pid = self.pid;
        match result {
            Ok(()) | Err(SessionEnd::Closed) => {}
            Err(SessionEnd::Fatal(e)) => {
                debug!(pid, error = %e, "session ended with a fatal error");
                if e.code == protocol::SQLSTATE_PROTOCOL_VIOLATION {
                    metrics::counter!(m::PROTOCOL_ERRORS_TOTAL).increment(1);
                }
                self.client.fatal(&e).await;
            }
            Err(SessionEnd::Client(e)) => debug!(pid, error = %e, "client connection failed"),
        }
        if let Some(h) = self.backend.take() {
            // Mid-statement or pinned: the connection's state is unknown or
            // belongs to this session; close it.
            drop(h);
        }
        self.shared.unregister_session(pid);
        debug!(pid, user = %self.status.user(), "session closed");
    }

    /// The settings in force (as of the last [`Session::refresh_settings`]).
    fn settings(&self) -> &crate::server::Settings {
        &self.settings
    }

    /// Takes the settings again if a reload replaced them.
    fn refresh_settings(&mut self) {
        if let Some((epoch, settings)) = self.shared.settings_since(self.settings_epoch) {
            self.settings_epoch = epoch;
            self.settings = settings;
        }
    }

    /// The lag monitor's newest snapshot. Checking for a new one is an
    /// atomic load; the shared snapshot is cloned only when it changed.
    fn topology(&mut self) -> &Arc<lagrouter::Topology> {
        if self.topo_rx.has_changed().unwrap_or(false) {
            self.topo = self.topo_rx.borrow_and_update().clone();
        }
        &self.topo
    }

    /// Validates the startup settings on a backend, learns the server's
    /// parameters and completes the startup exchange.
    /// (`info` is dropped when it ends: an idle session keeps none of it.)
    async fn setup(&mut self, info: Box<StartupInfo>, secret: i32) -> Flow {
        // Any node can validate the startup: the primary when it is up,
        // else a healthy replica, so that clients can still connect and read
        // while the primary is down (degraded read-only mode).
        let topo = self.topology().clone();
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
        let mut startup = SettingMap::new();
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
            startup.insert(name.clone(), set_statement_sql(name, value));
        }
        self.desired = settings::shared_startup(startup);
        self.startup_desired = self.desired.clone();
        if let Some(sql) = prelude_sql(&self.desired, &conn) {
            if let Err(e) = conn.simple_query(&sql).await {
                return Err(SessionEnd::Fatal(backend_fatal(&e)));
            }
            conn.applied = (*self.desired).clone();
        }
        let params = conn.server_params.clone();
        conn.release();
        for (k, v) in &params {
            protocol::parameter_status(k, v, &mut self.client.wbuf);
        }
        self.client_utf8 = params
            .get("client_encoding")
            .is_none_or(|e| e.eq_ignore_ascii_case("UTF8"));
        crate::frontend::backend_key_data(self.pid, secret, &mut self.client.wbuf);
        protocol::ready_for_query(TxnStatus::Idle, &mut self.client.wbuf);
        self.client.flush().await.map_err(ClientError::from)?;
        Ok(())
    }

    async fn main_loop(&mut self) -> Flow {
        let mut shutdown = self.shared.shutdown_signal();
        let mut topology = self.shared.monitor.subscribe();
        loop {
            self.refresh_settings();
            // Shutdown is looked for here (an atomic load) and waited for
            // only while idle: registering with the shared channel on
            // every wait was 4 % of the proxy's instructions.
            if self.lifecycle == Lifecycle::Running && shutdown.has_changed().unwrap_or(true) {
                self.lifecycle = Lifecycle::Closing;
            }
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
            if self.lifecycle == Lifecycle::Closing && self.backend.is_none() {
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
            if !has_backend {
                // Idle between transactions: hold no buffer memory.
                self.client.release_buffers();
            }
            let idle_timeout = self.idle_timeout();
            let idle = !idle_timeout.is_zero();
            let closing = self.lifecycle == Lifecycle::Closing;
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
                _ = shutdown.changed(), if !closing && !has_backend => Event::Shutdown,
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
                Event::Shutdown => self.lifecycle = Lifecycle::Closing,
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
                if self.txn_status != TxnStatus::Idle
                    && h.queue.is_empty()
                    && !h.copy.is_in()
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
        if self.deferred.is_some() {
            return false;
        }
        match &self.backend {
            None => true,
            Some(h) => {
                self.pooling == Pooling::Pinned
                    || h.copy.is_in()
                    || (h.unit_state == UnitState::Open
                        && h.retry.is_none()
                        && !matches!(h.mode, Mode::Discard))
                    || (h.predicted != TxnStatus::Idle
                        && h.retry.is_none()
                        && matches!(h.mode, Mode::Direct))
            }
        }
    }

    fn move_output(&mut self) {
        if let Some(h) = &mut self.backend {
            if !h.out.is_empty() {
                if self.client.wbuf.is_empty() {
                    // Hand the buffer over instead of copying it.
                    std::mem::swap(&mut self.client.wbuf, &mut h.out);
                } else {
                    self.client.wbuf.extend_from_slice(&h.out);
                    h.out.clear();
                }
            }
        }
    }

    /// Runs pending retries and returns the backend to its pool when the
    /// session no longer needs it.
    async fn housekeeping(&mut self) -> Flow {
        loop {
            self.move_output();
            // A message held back while an open unit ended: routed once
            // the connection is given back (or sent on, when a retry left
            // the unit open on the primary).
            let deferred_ready = self.backend.as_ref().is_none_or(|h| {
                h.unit_state.is_open() && h.retry.is_none() && !matches!(h.mode, Mode::Discard)
            });
            if deferred_ready {
                if let Some(msg) = self.deferred.take() {
                    self.on_message(*msg).await?;
                    continue;
                }
            }
            let Some(h) = &mut self.backend else {
                return Ok(());
            };
            if !h.queue.is_empty() || h.copy.is_in() || !h.conn.wbuf.is_empty() {
                return Ok(());
            }
            if let Some(step) = h.retry.take() {
                self.resume_read(step).await?;
                continue;
            }
            if self.pin_recheck
                && self.pooling == Pooling::Pinned
                && self.txn_status == TxnStatus::Idle
                && !h.unit_state.is_open()
                && h.held_rfq.is_none()
            {
                self.recheck_pin().await?;
                continue;
            }
            if self.pooling == Pooling::Pinned
                || self.txn_status != TxnStatus::Idle
                || h.unit_state.is_open()
                || h.held_rfq.is_some()
            {
                return Ok(());
            }
            self.release();
        }
    }

    fn release(&mut self) {
        if let Some(mut h) = self.backend.take() {
            if let Some(served) = self.read_served.take() {
                // After the unit's last statement took its snapshot.
                self.last_read = Some(
                    LastRead::new(&served, Instant::now()).with_floor(self.read_capture.take()),
                );
            }
            *self.status.server.lock().expect("cancel slot") = None;
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

    /// The size of the future `f` returns.
    fn future_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connected client's task holds its session's future, so it
    /// must stay small (BENCHMARKS.md, memory per idle client): rare and
    /// large steps (setup, routing, the optimistic move to the primary,
    /// closing, the console) are boxed. On `main` before this test it was
    /// 4.5 KiB.
    #[test]
    fn an_idle_session_future_stays_small() {
        let session = future_size(run);
        assert!(session <= 2048, "session future: {session} bytes");
        let console = future_size(crate::console::run);
        assert!(console <= 64, "console future: {console} bytes");
    }
}
