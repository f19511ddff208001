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
use crate::wire::{self as protocol, ClientMessage, Frame, PgError, TxnStatus};
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
                let decoded = if self.client_utf8 {
                    ClientMessage::decode(frame)
                } else {
                    ClientMessage::decode_any_encoding(frame)
                };
                match decoded {
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
            let Some(msg) = self.optimistic_message(msg).await? else {
                return Ok(());
            };
            if self.starts_new_unit(&msg) {
                self.end_open_unit(msg);
            } else {
                self.forward(msg);
            }
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

    /// Whether `msg`, sent while a unit the client left open with `Flush`
    /// runs on a replica outside a transaction, must start a unit of its
    /// own: a `Query` (which ends the implicit transaction anyway), or a
    /// `Bind` of a statement that may write. The replica is then left, and
    /// the message routed like any other, with the retries that gives.
    fn starts_new_unit(&self, msg: &ClientMessage) -> bool {
        let Some(h) = &self.backend else { return false };
        if !h.on_replica
            || !h.unit_state.is_open()
            || h.error != ErrorState::None
            || h.copy.is_in()
            || self.pooling != Pooling::Transaction
            || h.predicted != TxnStatus::Idle
            || self.txn_status != TxnStatus::Idle
        {
            return false;
        }
        match msg {
            ClientMessage::Query { .. } => true,
            ClientMessage::Bind { stmt, .. } => self
                .stmt_info(stmt)
                .is_some_and(|i| !i.class.is_read_only()),
            _ => false,
        }
    }

    /// Ends the open unit with a Sync of the proxy's own; `next` waits
    /// until the connection is given back, then is routed.
    fn end_open_unit(&mut self, next: ClientMessage) {
        let h = self.backend.as_mut().expect("held");
        frontend::sync(&mut h.conn.wbuf);
        h.queue.push_back(Expect::ProxySync);
        h.unit_state = UnitState::Ended;
        h.unit_has_portal = false;
        self.deferred = Some(Box::new(next));
    }

    /// Routes and starts a unit (one `Query`, or a batch up to `Sync` /
    /// `Flush`) while no backend is held.
    pub(super) async fn dispatch(&mut self, batch: Vec<ClientMessage>) -> Flow {
        self.optimistic_dispatch();
        if self.lost.is_some() {
            self.answer_in_lost_transaction(batch);
            return Ok(());
        }
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

        // The admin console's PAUSE holds new transactions back.
        if self.shared.pause.is_paused(&self.status.database) {
            self.wait_resumed().await?;
        }
        // Classify the unit. A Bind or Describe of a statement the batch
        // itself parses refers to that one (the unnamed statement of
        // psycopg, node-postgres, pgjdbc), not to what the session had.
        let mut classes: Vec<Arc<Classification>> = Vec::new();
        let mut parsed: Vec<(&str, Arc<Classification>)> = Vec::new();
        let mut kinds: Vec<&'static str> = Vec::new();
        for msg in &batch {
            match msg {
                ClientMessage::Query { sql, .. } => {
                    let c = self.classify(sql);
                    kinds.extend(c.statements.iter().map(StatementKind::label));
                    classes.push(c);
                }
                ClientMessage::Parse { name, sql, .. } => {
                    let c = self.classify(sql);
                    parsed.push((name, c.clone()));
                    classes.push(c);
                }
                ClientMessage::Bind { stmt: name, .. }
                | ClientMessage::Describe {
                    kind: b'S', name, ..
                } => {
                    let class = match parsed.iter().rev().find(|(n, _)| n == name) {
                        Some((_, c)) => Some(c.clone()),
                        None => self.stmt_info(name).map(|i| i.class.clone()),
                    };
                    if let Some(c) = class {
                        // Each execution counts once: at its Bind.
                        if matches!(msg, ClientMessage::Bind { .. }) {
                            kinds.extend(c.statements.iter().map(StatementKind::label));
                        }
                        classes.push(c);
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
        // A transaction that is not READ ONLY may start on a replica
        // (`optimistic.rs`).
        let read = read || (hint.is_none() && self.optimistic_begin(&batch, &classes));
        self.unit_kinds = kinds;
        if !read && classes.iter().any(|c| c.has_write()) {
            self.last_write = Some(Instant::now());
        }
        if read {
            if self.reads_unlogged(&batch).await {
                // A hot standby cannot read it: the engine's primary policy.
                self.unit_policy = lagrouter::Consistency::Primary;
            }
            self.start_read(batch).await?;
        } else {
            self.plan = None;
            let Some(primary) = self.topology().primary else {
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
        Ok(())
    }

    /// Waits for the admin console's `RESUME` (or shutdown, which ends
    /// the session with 57P01).
    async fn wait_resumed(&mut self) -> Flow {
        use std::sync::atomic::Ordering;
        info!(pid = self.pid, database = %self.status.database, "paused: waiting for RESUME");
        self.status.waiting.store(true, Ordering::Relaxed);
        let mut shutdown = self.shared.shutdown_signal();
        let resumed = tokio::select! {
            () = self.shared.pause.wait(&self.status.database) => true,
            _ = shutdown.wait_for(|s| *s) => false,
        };
        self.status.waiting.store(false, Ordering::Relaxed);
        if resumed {
            Ok(())
        } else {
            Err(SessionEnd::Fatal(PgError::fatal(
                "57P01",
                "terminating connection due to administrator command",
            )))
        }
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
            user: self.status.server_user().to_owned(),
            database: self.status.database.to_string(),
        };
        let shared = &self.shared;
        let pool = shared.pools.get(&key, || {
            shared.backend_target(
                node,
                self.status.server_user(),
                self.status.entry.server_password.clone(),
                &self.status.database,
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
        if !matches!(send, Send::Read(_)) {
            // Only the read this unit is part of is the session's last read.
            self.read_served = None;
        }
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
        tracing::debug!(
            pid = self.pid,
            node,
            target = label,
            policy = self.unit_policy.label(),
            statements = ?self.unit_kinds,
            "routed"
        );
        self.shared.stats.sent(
            node,
            &self.unit_policy,
            self.unit_kinds.len(),
            matches!(send, Send::Write | Send::ReadAsWrite),
        );
        // Counted once per unit, on the node it is first sent to.
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
            unit_has_portal: false,
            count: false,
            txn_failed: false,
            portal_class: HashMap::new(),
            server_fatal: None,
            _inflight: self.shared.router().track(node),
            conn,
        };
        *self.status.server.lock().expect("cancel slot") = Some(h.conn.cancel_target());
        if let super::optimistic::OptState::Armed(rec) = &mut self.optimistic {
            rec.unit_restarted();
        }
        if let Some(sql) = prelude_sql(&self.desired, &h.conn) {
            if frontend::query(&sql, &mut h.conn.wbuf).is_ok() {
                h.queue.push_back(Expect::Prelude);
                h.conn.applied = (*self.desired).clone();
            }
        }
        if checked {
            let parsed = encode_probe(&mut h.conn);
            h.queue.push_back(probe(ProbeKind::Before, parsed));
        }
        self.backend = Some(Box::new(h));
        self.forward_all(batch);
        if let Some(h) = &mut self.backend {
            h.count = true;
        }
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
