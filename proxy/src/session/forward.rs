//! Sending a client message to the held backend ([`Session::forward`]):
//! statement names translated to the proxy's own, statements the backend
//! lacks re-prepared, local replies queued in order, settings and
//! prepared-statement effects recorded for when the server confirms them.

use std::time::Instant;

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use crate::classify::{Classification, StatementKind};
use crate::wire::{self as protocol, ClientMessage, PgError, TxnStatus};

use super::pipeline::{Action, CopyState, ErrorState, Expect, Mode, UnitState};
use super::prepared::{deallocates_all, ensure_prepared, malformed, no_such_statement};
use super::settings::setting_actions;
use super::{Pooling, Session, Skip};

impl Session {
    pub(super) fn note_statements(&mut self, class: &Classification) {
        let Some(h) = &mut self.backend else { return };
        if let Some(reason) = class.pin_reason() {
            // Session state made on a replica (in a read-only transaction)
            // cannot follow the session: it is not pinned there.
            if !h.on_replica {
                self.pin(reason);
            }
        }
        let Some(h) = &mut self.backend else { return };
        if class.has_write() || class.pin_reason().is_some() {
            // Whatever the policy: a later one (after a reload) may read
            // with the token.
            if !h.on_replica {
                h.wrote_since_probe = true;
            }
            self.last_write = Some(Instant::now());
        }
        if class.pin_reason() == Some(crate::classify::PinReason::Copy) {
            h.no_pipelined_probe = true;
        }
        for k in &class.statements {
            match k {
                StatementKind::TransactionBegin { .. } if h.predicted == TxnStatus::Idle => {
                    h.predicted = TxnStatus::InTransaction
                }
                StatementKind::TransactionEnd => h.predicted = TxnStatus::Idle,
                _ => {}
            }
        }
    }

    /// Sends one client message to the held backend, translating statement
    /// names and recording what replies to expect.
    pub(super) fn forward(&mut self, msg: ClientMessage) {
        // Local replies (lagrouter statements, statement closes, …).
        if !matches!(
            msg,
            ClientMessage::Query { .. } | ClientMessage::Sync { .. } | ClientMessage::Flush { .. }
        ) {
            if let Some(r) = self.local_ext(&msg) {
                let h = self.backend.as_mut().expect("held");
                match r {
                    Ok(msgs) => h.queue.extend(msgs.into_iter().map(Expect::Synth)),
                    Err(e) => {
                        h.queue.push_back(Expect::Synth(e.to_bytes()));
                        self.skip = Skip::UntilSync;
                    }
                }
                self.backend.as_mut().expect("held").drain_synth();
                return;
            }
        }
        {
            let h = self.backend.as_mut().expect("held");
            if h.error == ErrorState::SkippingToSync {
                // After an error the server ignores everything up to Sync.
                if !matches!(msg, ClientMessage::Sync { .. }) {
                    return;
                }
                h.error = ErrorState::None;
            }
        }
        match msg {
            ClientMessage::Query { sql, frame } => {
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
                self.note_pinned_statement(&sql, &class.statements);
                let mut actions = setting_actions(&class);
                if self.pooling == Pooling::Pinned && deallocates_all(&sql, &class) {
                    actions.push(Action::DeallocatedAll);
                }
                let h = self.backend.as_mut().expect("held");
                h.count_statements(&class, &self.shared, &self.unit_policy);
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.unnamed_ok = false;
                h.unit_state = UnitState::Ended;
                h.unit_has_portal = false;
                h.error.clear_query_failed();
                h.queue.push_back(Expect::Client {
                    kind: b'Q',
                    on_success: actions,
                    on_fail: Vec::new(),
                });
                self.attach_probe();
            }
            ClientMessage::Parse {
                name,
                sql,
                types,
                frame,
            } => {
                let info = match self.make_info(&sql, &types, Some((&name, &frame))) {
                    Ok(i) => i,
                    Err(e) => return self.local_error(e),
                };
                let h = self.backend.as_mut().expect("held");
                h.unit_state.open();
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
            ClientMessage::Bind {
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
                self.note_pinned_statement(&info.sql, &class.statements);
                let h = self.backend.as_mut().expect("held");
                h.count_statements(&class, &self.shared, &self.unit_policy);
                h.unit_state.open();
                h.unit_has_portal = true;
                h.portal_class.insert(portal.clone(), info.clone());
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
            ClientMessage::Describe { kind, name, frame } => {
                let h = self.backend.as_mut().expect("held");
                h.unit_state.open();
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
            ClientMessage::Execute { portal, frame } => {
                let h = self.backend.as_mut().expect("held");
                h.unit_state.open();
                let mut actions = Vec::new();
                if let Some(info) = h.portal_class.get(&portal) {
                    actions = setting_actions(&info.class);
                    if info.deallocates_all {
                        actions.push(Action::DeallocatedAll);
                    }
                }
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.queue.push_back(Expect::Client {
                    kind: b'E',
                    on_success: actions,
                    on_fail: Vec::new(),
                });
            }
            ClientMessage::Close { frame, .. } => {
                // Portals and the unnamed statement (named statements are
                // answered locally above).
                let h = self.backend.as_mut().expect("held");
                h.unit_state.open();
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.queue.push_back(Expect::Client {
                    kind: b'C',
                    on_success: Vec::new(),
                    on_fail: Vec::new(),
                });
            }
            ClientMessage::Sync { frame } => {
                let h = self.backend.as_mut().expect("held");
                h.conn.wbuf.extend_from_slice(&frame.bytes);
                h.unit_state = UnitState::Ended;
                h.unit_has_portal = false;
                if h.copy == CopyState::InIgnoringSync {
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
            ClientMessage::Flush { frame } => {
                let pinned = self.pooling == Pooling::Pinned;
                let idle = self.txn_status == TxnStatus::Idle;
                let h = self.backend.as_mut().expect("held");
                if !h.unit_has_portal
                    && !pinned
                    && idle
                    && h.predicted == TxnStatus::Idle
                    && h.copy == CopyState::None
                    && h.error == ErrorState::None
                {
                    // Only statements were parsed or described (asyncpg's
                    // `prepare`): nothing on this connection outlives the
                    // unit, so it ends here with a Sync of the proxy's own,
                    // the connection goes back to its pool, and the client's
                    // next messages are routed afresh (a write never lands
                    // on the replica that answered the Describe).
                    frontend::sync(&mut h.conn.wbuf);
                    h.queue.push_back(Expect::ProxySync);
                    h.unit_state = UnitState::Ended;
                } else {
                    h.conn.wbuf.extend_from_slice(&frame.bytes);
                    // The client waits for the replies so far: they go to it
                    // once they have all arrived (the read engine may still
                    // retry the unit elsewhere until then), and the unit can
                    // no longer be retried.
                    if matches!(h.mode, Mode::Buffer(_)) {
                        h.queue.push_back(Expect::FlushPoint);
                    }
                }
            }
        }
        if let Some(h) = &mut self.backend {
            h.drain_synth();
        }
    }

    /// Forwards a unit's messages, skipping to `Sync` after a local error.
    pub(super) fn forward_all(&mut self, msgs: Vec<ClientMessage>) {
        for msg in msgs {
            if self.skip == Skip::UntilSync {
                if !matches!(msg, ClientMessage::Sync { .. }) {
                    continue;
                }
                self.skip = Skip::No;
            }
            self.forward(msg);
        }
    }

    /// A proxy-detected error in the middle of an extended batch: reply it
    /// in order and skip client messages until `Sync`, as the server would.
    pub(super) fn local_error(&mut self, e: PgError) {
        if let Some(h) = &mut self.backend {
            h.queue.push_back(Expect::Synth(e.to_bytes()));
            h.drain_synth();
        }
        self.skip = Skip::UntilSync;
    }
}
