//! From client messages to a unit of work: client messages are batched
//! (one `Query`, or extended-protocol messages up to `Sync`/`Flush`),
//! answered locally when they can be, else classified and routed; a
//! connection is checked out of the chosen node's pool and the unit is
//! sent there ([`Session::start_unit`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tracing::info;

use crate::backend::{NodePool, PoolError, PooledConn};
use crate::classify::{Classification, RouteHint, StatementKind};
use crate::config::parse_consistency;
use crate::metrics as m;
use crate::wire::{self as protocol, ClientMessage, Frame, PgError};
use lagrouter::routing::Run;

use super::pipeline::ProbeKind;
use super::pipeline::{CopyState, ErrorState, UnitState};
use super::probe::{encode_probe, probe};

use super::pipeline::{Expect, Held, Mode};
use super::settings::prelude_sql;
use super::{Flow, MAX_PENDING, Pooling, Session, SessionEnd, Skip};

impl Session {
    pub(super) async fn on_client_frame(&mut self, frame: Frame) -> Flow {
        tracing::trace!(pid = self.pid, tag = %char::from(frame.tag), held = self.backend.is_some(), "client message");
        match frame.tag {
            b'X' => Err(SessionEnd::Closed),
            b'd' | b'c' | b'f' => {
                if let Some(h) = &mut self.backend {
                    if h.copy.is_in() {
                        h.conn.wbuf.extend_from_slice(&frame.bytes);
                        if frame.tag != b'd' {
                            h.copy = CopyState::None;
                        }
                    }
                }
                // Outside COPY the server ignores these too.
                Ok(())
            }
            b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' => {
                let tag = frame.tag;
                match ClientMessage::decode(frame) {
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
    pub(super) fn invalid_utf8(&mut self, tag: u8, e: protocol::ProtocolError) -> Flow {
        let err = PgError::error("22021", e.to_string());
        if self.backend.is_some() {
            return Err(SessionEnd::Fatal(PgError::fatal("22021", e.to_string())));
        }
        if self.skip == Skip::UntilSync {
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
            self.skip = Skip::UntilSync;
        }
        Ok(())
    }

    pub(super) async fn on_message(&mut self, msg: ClientMessage) -> Flow {
        if self.skip == Skip::UntilSync {
            if !matches!(msg, ClientMessage::Sync { .. }) {
                return Ok(());
            }
            self.skip = Skip::No;
        }
        if self.backend.is_some() {
            self.forward(msg);
            return Ok(());
        }

        // Routing and checkout are boxed: their futures are large, and
        // would otherwise be part of every idle session's task.
        match msg {
            ClientMessage::Query { .. } => Box::pin(self.dispatch(vec![msg])).await,
            ClientMessage::Sync { .. } | ClientMessage::Flush { .. } => {
                if self.pending.is_empty() {
                    if matches!(msg, ClientMessage::Sync { .. }) {
                        protocol::ready_for_query(self.txn_status, &mut self.client.wbuf);
                    }
                    return Ok(());
                }
                self.pending.push(msg);
                let batch = std::mem::take(&mut self.pending);
                Box::pin(self.dispatch(batch)).await
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

    /// Routes and starts a unit (one `Query`, or a batch up to `Sync` /
    /// `Flush`) while no backend is held.
    pub(super) async fn dispatch(&mut self, batch: Vec<ClientMessage>) -> Flow {
        if self.last_read.is_some() && batch.iter().any(shows_token) {
            Box::pin(self.settle_last_read()).await;
        }
        // Simple query answered locally?
        if let [ClientMessage::Query { sql, .. }] = batch.as_slice() {
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
        if !matches!(batch.first(), Some(ClientMessage::Query { .. }))
            && self.batch_is_local(&batch)
        {
            for msg in &batch {
                if self.skip == Skip::UntilSync {
                    if matches!(msg, ClientMessage::Sync { .. }) {
                        self.skip = Skip::No;
                    } else {
                        continue;
                    }
                }
                match msg {
                    ClientMessage::Sync { .. } => {
                        protocol::ready_for_query(self.txn_status, &mut self.client.wbuf)
                    }
                    ClientMessage::Flush { .. } => {}
                    other => match self.local_ext(other) {
                        Some(Ok(msgs)) => {
                            for b in msgs {
                                self.client.wbuf.extend_from_slice(&b);
                            }
                        }
                        Some(Err(e)) => {
                            e.encode(&mut self.client.wbuf);
                            self.skip = Skip::UntilSync;
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
                ClientMessage::Query { sql, .. } | ClientMessage::Parse { sql, .. } => {
                    classes.push(self.classify(sql))
                }
                ClientMessage::Bind { stmt: name, .. }
                | ClientMessage::Describe {
                    kind: b'S', name, ..
                } => {
                    if let Some(i) = self.stmt_info(name) {
                        classes.push(i.class.clone());
                    }
                }
                _ => {}
            }
        }
        // The unit's policy: a `lagrouter:consistency` hint, else the
        // session's.
        self.unit_policy = match classes.iter().find_map(|c| c.consistency.as_deref()) {
            None => self.session_policy(),
            Some(text) => match parse_consistency(text, &self.settings().config.routing) {
                Ok(p) => p,
                Err(e) => {
                    let e =
                        PgError::error("22023", format!("invalid lagrouter:consistency hint: {e}"));
                    self.unit_error(&batch, e);
                    return Ok(());
                }
            },
        };
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
        let pin_session = pin.is_some_and(|p| p.is_session_scoped());
        if read {
            self.start_read(batch).await?;
        } else {
            self.plan = None;
            let Some(primary) = self.shared.monitor.snapshot().primary else {
                self.unit_error(
                    &batch,
                    PgError::error("08006", "no primary server is available"),
                );
                return Ok(());
            };
            match self.checkout(primary).await {
                Ok(conn) => self.start_unit(primary, Send::Write, batch, conn),
                Err(e) => self.unit_error(&batch, PgError::error(e.sqlstate(), e.to_string())),
            }
        }
        if pin_session && self.backend.is_some() {
            if self.pooling == Pooling::Transaction {
                info!(
                    pid = self.pid,
                    reason = pin.map(|p| p.as_str()),
                    "session pinned to the primary"
                );
                metrics::counter!(m::PINNED_SESSIONS_TOTAL).increment(1);
            }
            self.pooling = Pooling::Pinned;
        }
        Ok(())
    }

    /// Reports an error for a whole unit that did not reach a server.
    pub(super) fn unit_error(&mut self, batch: &[ClientMessage], e: PgError) {
        e.encode(&mut self.client.wbuf);
        if batch.last().is_some_and(ClientMessage::ends_unit) {
            protocol::ready_for_query(self.txn_status, &mut self.client.wbuf);
        } else {
            self.skip = Skip::UntilSync;
        }
    }

    pub(super) async fn checkout(&self, node: usize) -> Result<PooledConn, PoolError> {
        let pool = self.pool(node);
        let r = pool.checkout().await;
        if let Err(PoolError::Connect(e)) = &r {
            self.backend_failure(node, e);
        }
        r
    }

    /// The pool of `node` for the session's server user and database
    /// (looked up once per node: pools are never removed).
    fn pool(&self, node: usize) -> Arc<NodePool> {
        let mut cache = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(p)) = cache.get(node) {
            return p.clone();
        }
        let key = crate::backend::PoolKey {
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
        if cache.len() <= node {
            cache.resize(node + 1, None);
        }
        cache[node] = Some(pool.clone());
        pool
    }

    /// Sends the unit on `conn`, a connection to `node`: the settings
    /// prelude, the probe before a read when the engine asked for one, then
    /// the client's messages, with what replies to expect.
    pub(super) fn start_unit(
        &mut self,
        node: usize,
        send: Send,
        batch: Vec<ClientMessage>,
        conn: PooledConn,
    ) {
        let (on_replica, retryable, checked) = match send {
            Send::Read(run) => (
                !run.primary,
                run.retryable,
                run.check.or(run.verify).is_some(),
            ),
            Send::Write | Send::ReadAsWrite => (false, false, false),
        };
        let label = match send {
            Send::Read(run) if run.primary => m::TARGET_PRIMARY_READ,
            Send::Read(run) if run.check.is_some() => m::TARGET_REPLICA_CHECKED,
            Send::Read(_) => m::TARGET_REPLICA,
            Send::Write | Send::ReadAsWrite => m::TARGET_PRIMARY,
        };
        let counters = self.shared.route_counters();
        counters.routed(node, label);
        for kind in self.unit_kinds.drain(..) {
            counters.query(node, kind);
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
            // Kept while the engine may still send the unit elsewhere, or
            // answer it with an error after the probe before it.
            unit: (retryable || checked).then(|| batch.clone()),
            held_rfq: None,
            copy: CopyState::None,
            error: ErrorState::None,
            // A read that turned out to write: capture its commit.
            wrote_since_probe: matches!(send, Send::ReadAsWrite),
            capture: matches!(send, Send::Read(run) if run.capture),
            no_pipelined_probe: false,
            predicted: self.txn_status,
            unit_state: UnitState::Ended,
            unnamed_ok: false,
            txn_failed: false,
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
        if checked {
            let parsed = encode_probe(&mut h.conn);
            h.queue.push_back(probe(ProbeKind::Before, parsed));
        }
        self.backend = Some(Box::new(h));
        self.forward_all(batch);
    }
}

/// What a unit is sent as.
#[derive(Clone, Copy, Debug)]
pub(super) enum Send {
    /// A write (or anything not classified as a read): the primary.
    Write,
    /// A read, as the read engine's run step says.
    Read(Run),
    /// A read that wrote on a replica (25006), re-run on the primary as a
    /// write so that its commit advances the token.
    ReadAsWrite,
}

/// Whether `msg` asks for the session's token (`SHOW lagrouter.token`).
fn shows_token(msg: &ClientMessage) -> bool {
    match msg {
        ClientMessage::Query { sql, .. } | ClientMessage::Parse { sql, .. } => {
            super::local::show_lagrouter(sql).is_some()
        }
        _ => false,
    }
}
