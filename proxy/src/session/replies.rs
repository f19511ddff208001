//! Server messages: each is attributed to the head of the expectation
//! queue (a client message, a reply the proxy synthesises, the settings
//! prelude, an injected `Parse` or a position probe) and forwarded,
//! held back or swallowed; [`Session::on_client_ready`] ends a unit.

use tracing::warn;

use crate::server::catalog::is_ddl_tag;
use crate::wire::{self as protocol, Frame, TxnStatus};

use super::pipeline::{Action, CopyState, ErrorState, fail_until_sync, terminates};
use lagrouter::probe::Position;
use lagrouter::routing::Failure;

use super::pipeline::ProbeKind;
use super::probe::{encode_probe, position, probe};

use super::Session;
use super::optimistic::OptState;
use super::pipeline::{Expect, Mode};

impl Session {
    pub(super) fn on_backend_frame(&mut self, f: Frame) {
        tracing::trace!(pid = self.pid, tag = %char::from(f.tag), queue = ?self.backend.as_ref().map(|h| &h.queue), "server message");
        let mut actions: Vec<Action> = Vec::new();
        let mut client_z: Option<Frame> = None;
        let mut probe_done: Option<(ProbeKind, bool, Option<Position>)> = None;
        let mut committed = false;
        // A server error while a read's replies are held back.
        let mut read_failure: Option<Failure> = None;
        let mut proxy_sync: Option<TxnStatus> = None;
        let pinned = self.pooling == super::Pooling::Pinned;
        {
            let h = self.backend.as_mut().expect("held");
            h.drain_synth();
            if f.tag == b'E' && !pinned {
                let e = protocol::error_fields(&f);
                if matches!(e.severity.as_str(), "FATAL" | "PANIC") {
                    // The server is closing the connection. The client
                    // keeps its own (and its token): it is told when the
                    // connection's end is seen (`lost.rs`).
                    warn!(node = h.node, code = %e.code, message = %e.message, "the server ended the connection");
                    h.conn.broken = true;
                    h.server_fatal = Some(format!("{} (SQLSTATE {})", e.message, e.code));
                    return;
                }
            }
            let head_is_client = matches!(h.queue.front(), Some(Expect::Client { .. }) | None);
            if let (true, OptState::Armed(rec)) = (head_is_client, &mut self.optimistic) {
                rec.observe(&f, &h.mode);
            }
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
                        if let Some(v) = f.body().strip_prefix(b"client_encoding\0") {
                            self.client_utf8 = v.eq_ignore_ascii_case(b"UTF8\0");
                        }
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
                Expect::ProxySync => {
                    if f.tag == b'Z' {
                        h.queue.pop_front();
                        proxy_sync = Some(TxnStatus::of_ready_for_query(&f));
                    }
                }
                Expect::FlushPoint => {
                    warn!("internal: flush point at the head of the queue");
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
                            if matches!(h.mode, Mode::Buffer(_)) {
                                read_failure = Some(Failure::classify(
                                    &fields.code,
                                    &fields.message,
                                    fields.detail.as_deref(),
                                ));
                            }
                            h.emit(&f.bytes);
                            h.txn_failed = true;
                            if kind == b'Q' {
                                h.error = ErrorState::QueryFailed;
                            } else if let Some(Expect::Client { on_fail, .. }) = h.queue.pop_front()
                            {
                                actions.extend(on_fail);
                                fail_until_sync(h, &mut actions);
                            }
                        }
                        b'Z' => {
                            if let Some(Expect::Client { on_success, .. }) = h.queue.pop_front() {
                                if kind == b'Q' && h.error != ErrorState::QueryFailed {
                                    actions.extend(on_success);
                                }
                            }
                            h.error.clear_query_failed();
                            client_z = Some(f);
                        }
                        b'G' => {
                            if h.copy == CopyState::None {
                                h.copy = CopyState::In;
                            }
                            h.emit(&f.bytes);
                            if kind == b'E' {
                                h.copy = CopyState::InIgnoringSync;
                                // The client's real Sync follows the COPY data.
                                h.unit_state.open();
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
                            h.copy = CopyState::None;
                            h.emit(&f.bytes);
                            match protocol::command_tag(&f) {
                                b"ROLLBACK" => h.txn_failed = true,
                                b"COMMIT" => committed = true,
                                tag if is_ddl_tag(tag) => self.shared.catalog.schema_changed(),
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
        if let Some(failure) = read_failure {
            self.on_read_error(failure);
        }
        if committed {
            self.settings_at_boundary();
        }
        if let Some(z) = client_z {
            self.on_client_ready(z);
        }
        if let Some(status) = proxy_sync {
            self.on_proxy_sync(status);
        }
        if let Some((kind, lost_parse, result)) = probe_done {
            self.on_probe(kind, lost_parse, result);
        }
        if let Some(h) = &mut self.backend {
            h.drain_synth();
        }
        self.finish_read();
    }

    /// The client's `ReadyForQuery` arrived (a unit finished).
    pub(super) fn on_client_ready(&mut self, z: Frame) {
        let status = TxnStatus::of_ready_for_query(&z);
        let h = self.backend.as_mut().expect("held");
        if matches!(h.mode, Mode::Discard) {
            return;
        }
        self.txn_status = status;
        self.settings_at_ready(status);
        let h = self.backend.as_mut().expect("held");
        if !h.has_client_entries() {
            h.predicted = status;
        }
        h.commit_output();
        h.unit = None;
        if status != TxnStatus::Idle {
            h.emit(&z.bytes);
            return;
        }
        let probe_follows = matches!(
            h.queue.front(),
            Some(Expect::Probe {
                kind: ProbeKind::Write,
                ..
            })
        );
        if !probe_follows && h.wrote_since_probe && !h.on_replica {
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

    /// The `ReadyForQuery` of a Sync the proxy sent to end a unit arrived:
    /// the unit's replies go to the client (without it).
    fn on_proxy_sync(&mut self, status: TxnStatus) {
        let h = self.backend.as_mut().expect("held");
        if !h.has_client_entries() {
            h.predicted = status;
        }
        if !matches!(h.mode, Mode::Discard) {
            h.commit_output();
            h.unit = None;
        }
    }

    pub(super) fn apply_actions(&mut self, actions: Vec<Action>) {
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
                Action::Setting(kind) => {
                    let discarded = self
                        .backend
                        .as_ref()
                        .is_some_and(|h| matches!(h.mode, Mode::Discard));
                    if discarded {
                        // A run the read engine retries elsewhere: the
                        // setting changed this connection only; the retry
                        // makes it the session's.
                        self.apply_setting_on_conn(kind);
                    } else {
                        self.apply_setting(kind);
                    }
                }
                Action::DeallocatedAll => self.deallocated_all(),
            }
        }
    }
}
