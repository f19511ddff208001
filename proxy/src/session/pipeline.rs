//! The held backend connection and its pipeline: [`Held`], what was sent
//! and which replies are still expected ([`Expect`]), where replies go
//! ([`Mode`]). Sending is in `forward.rs`, reading replies in `replies.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use lagrouter::routing::InFlight;

use super::prepared::StmtInfo;
use crate::backend::PooledConn;
use crate::classify::{Classification, StatementKind};
use crate::wire::{ClientMessage, Frame, TxnStatus};

use lagrouter::probe::Position;
use lagrouter::routing::Step;

/// Session-state effects of a client message, applied when the server
/// confirms (or rejects) it.
#[derive(Clone, Debug)]
pub(super) enum Action {
    /// Record a `SET`/`RESET`/`DISCARD` (see [`Session::apply_setting`]).
    Setting(StatementKind),
    /// Forget a client statement name (its `Parse` failed).
    ForgetClientStmt(String),
    /// Forget that the held connection has this global statement.
    ForgetBackendStmt(String),
    /// The server dropped every prepared statement of the connection.
    DeallocatedAll,
}

/// Why a position probe was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProbeKind {
    /// Before a read: the read engine's `check` or `verify`.
    Before,
    /// After a replica read the engine asked to capture (a floor for the
    /// session's next read, which moves to another replica).
    After,
    /// After a write committed: read-your-writes.
    Write,
}

/// One thing sent to the backend whose replies are still expected.
#[derive(Debug)]
pub(super) enum Expect {
    /// A client message; `kind` is its type byte.
    Client {
        /// The message type byte.
        kind: u8,
        /// Effects applied when the server completes it.
        on_success: Vec<Action>,
        /// Effects applied when the server rejects it (or skips it after
        /// an earlier error).
        on_fail: Vec<Action>,
    },
    /// A reply the proxy produces itself, emitted in order.
    Synth(Bytes),
    /// The settings prelude (a simple query); replies swallowed.
    Prelude,
    /// A `Parse` the proxy injected before a client's `Bind`/`Describe`.
    Injected {
        /// The global name it prepares (`None`: the unnamed statement).
        global: Option<String>,
    },
    /// A `Sync` the proxy sent to end a unit the client left open with
    /// `Flush` (its `ReadyForQuery` is swallowed): the unit held only
    /// statements, or the client's next message must be routed afresh.
    ProxySync,
    /// Where the client sent `Flush` in a unit whose replies are held
    /// back: once every reply before it has arrived (and none was an error
    /// the read engine retries), they go to the client.
    FlushPoint,
    /// A position probe; replies swallowed.
    Probe {
        /// Why it was sent.
        kind: ProbeKind,
        /// It includes the `Parse` of the probe statement.
        parsed: bool,
        /// Its `ParseComplete` arrived.
        saw_parse_complete: bool,
        /// The server answered with an error.
        failed: bool,
        /// Its answer, once the `DataRow` arrived.
        result: Option<Position>,
    },
}

/// Where replies for the client go.
#[derive(Debug)]
pub(super) enum Mode {
    /// Straight to the client.
    Direct,
    /// Held back (a replica read that may still be retried elsewhere).
    Buffer(BytesMut),
    /// Dropped (the read will be retried).
    Discard,
}

/// Whether a `COPY FROM STDIN` is running on the held connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CopyState {
    /// No COPY data is expected from the client.
    None,
    /// The server asked for COPY data (`CopyInResponse`): the client's
    /// `CopyData`/`CopyDone`/`CopyFail` are forwarded.
    In,
    /// As [`CopyState::In`], for a COPY started by an extended-protocol
    /// `Execute`: the server ignores `Sync` until the COPY ends, so a
    /// client `Sync` gets no reply expected.
    InIgnoringSync,
}

impl CopyState {
    /// Whether COPY data is expected from the client.
    pub(super) fn is_in(self) -> bool {
        !matches!(self, CopyState::None)
    }
}

/// How the server treats the session's messages after an error in the
/// current unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ErrorState {
    /// No error pending.
    None,
    /// A simple `Query` failed and its `ReadyForQuery` has not arrived yet:
    /// its settings changes are not applied.
    QueryFailed,
    /// An extended-protocol message failed and every expectation up to the
    /// next `Sync` was dropped: the server skips client messages until
    /// `Sync`, and so does the proxy when forwarding.
    SkippingToSync,
}

impl ErrorState {
    /// Ends [`ErrorState::QueryFailed`] (a new `Query`, or a
    /// `ReadyForQuery`); leaves the other states alone.
    pub(super) fn clear_query_failed(&mut self) {
        if *self == ErrorState::QueryFailed {
            *self = ErrorState::None;
        }
    }
}

/// Whether the client continues the current unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UnitState {
    /// The last unit ended with `Query` or `Sync`.
    Ended,
    /// Extended-protocol messages were sent without `Sync` (the unit ended
    /// with `Flush`, or a COPY awaits the client's `Sync`): the client
    /// continues it, so the connection stays held.
    Open,
}

impl UnitState {
    /// The client sent a message that continues the unit.
    pub(super) fn open(&mut self) {
        if *self == UnitState::Ended {
            *self = UnitState::Open;
        }
    }

    /// Whether the unit is open.
    pub(super) fn is_open(self) -> bool {
        !matches!(self, UnitState::Ended)
    }
}

/// A backend connection the session holds, with its pipeline state.
pub(super) struct Held {
    /// The connection (returned to its pool on release).
    pub(super) conn: PooledConn,
    /// The node it belongs to.
    pub(super) node: usize,
    /// Whether the node was chosen as a replica (the unit is a read).
    pub(super) on_replica: bool,
    /// What was sent and whose replies are still expected, in order.
    pub(super) queue: VecDeque<Expect>,
    /// Where replies for the client go.
    pub(super) mode: Mode,
    /// Replies for the client, moved to the client's buffer after each
    /// batch of server messages.
    pub(super) out: BytesMut,
    /// A retry decided while replies were read, run once nothing is
    /// outstanding.
    pub(super) retry: Option<Step>,
    /// The unit's client messages while it may be retried elsewhere.
    pub(super) unit: Option<Vec<ClientMessage>>,
    /// The client's `ReadyForQuery`, held back until the position probe
    /// behind it has advanced the token.
    pub(super) held_rfq: Option<Frame>,
    /// Whether a `COPY FROM STDIN` is running.
    pub(super) copy: CopyState,
    /// How the server treats messages after an error.
    pub(super) error: ErrorState,
    /// A write ran on the primary since the last read-your-writes probe
    /// (only counted when the policy uses tokens): a probe is due.
    pub(super) wrote_since_probe: bool,
    /// The statement just forwarded runs COPY: no probe may be pipelined
    /// behind it (the server would take it as COPY data); taken by the
    /// next [`Session::attach_probe`].
    pub(super) no_pipelined_probe: bool,
    /// Transaction status expected after what was forwarded.
    pub(super) predicted: TxnStatus,
    /// Whether the client continues the current unit.
    pub(super) unit_state: UnitState,
    /// The connection has the client's current unnamed statement prepared.
    pub(super) unnamed_ok: bool,
    /// A portal was bound since the current unit began: it lives on this
    /// connection until the unit ends.
    pub(super) unit_has_portal: bool,
    /// The node's name (the `node` label of the statement metrics).

    /// Client statements forwarded from now on are counted (`false` while
    /// a unit is first sent or re-sent: `start_unit` counts it once).
    pub(super) count: bool,
    /// Since the last transaction boundary, a statement failed or the
    /// transaction was rolled back: if the session ends up idle, settings
    /// made since then were undone by the server.
    pub(super) txn_failed: bool,
    /// The statement of each portal bound on this connection (for the
    /// session changes its `Execute` makes).
    pub(super) portal_class: HashMap<String, Arc<StmtInfo>>,
    /// The server ended the connection with this FATAL error (not
    /// forwarded: the client keeps its connection, see `lost.rs`).
    pub(super) server_fatal: Option<String>,
    /// The read engine asked for the position after the unit
    /// ([`lagrouter::routing::Run::capture`]).
    pub(super) capture: bool,
    /// Counts the unit in the router's per-node in-flight figures.
    pub(super) _inflight: InFlight<'static>,
}

impl Held {
    pub(super) fn emit(&mut self, bytes: &[u8]) {
        match &mut self.mode {
            Mode::Direct => self.out.extend_from_slice(bytes),
            Mode::Buffer(b) => b.extend_from_slice(bytes),
            Mode::Discard => {}
        }
    }

    /// Stops buffering: what was held back goes to the client.
    pub(super) fn commit_output(&mut self) {
        if let Mode::Buffer(b) = &mut self.mode {
            let b = std::mem::take(b);
            if self.out.is_empty() {
                self.out = b;
            } else {
                self.out.extend_from_slice(&b);
            }
            self.mode = Mode::Direct;
        }
    }

    /// Emits the synthesised replies at the head of the queue, and passes
    /// the flush points there (the replies before them go to the client
    /// unless a retry discards them).
    pub(super) fn drain_synth(&mut self) {
        loop {
            match self.queue.front() {
                Some(Expect::Synth(_)) => {
                    if let Some(Expect::Synth(b)) = self.queue.pop_front() {
                        self.emit(&b);
                    }
                }
                Some(Expect::FlushPoint) => {
                    self.queue.pop_front();
                    if matches!(self.mode, Mode::Buffer(_)) && self.retry.is_none() {
                        self.commit_output();
                        self.unit = None;
                    }
                }
                _ => return,
            }
        }
    }

    /// Counts a client statement forwarded on the held connection in
    /// `lagrouter_proxy_queries_total` and the console's `SHOW STATS` (a
    /// unit's statements are counted
    /// once, by `start_unit`, however often it is sent).
    pub(super) fn count_statements(
        &self,
        class: &Classification,
        shared: &crate::server::Shared,
        policy: &lagrouter::Consistency,
    ) {
        if !self.count {
            return;
        }
        shared
            .stats
            .sent(self.node, policy, class.statements.len(), false);
        let counters = shared.route_counters();
        for k in &class.statements {
            counters.query(self.node, k.label());
        }
    }

    pub(super) fn has_client_entries(&self) -> bool {
        self.queue
            .iter()
            .any(|e| matches!(e, Expect::Client { .. } | Expect::Synth(_)))
    }
}

/// Which replies end a client message's expectation.
pub(super) fn terminates(kind: u8, tag: u8) -> bool {
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

/// After an error in the extended protocol the server skips everything up
/// to the next `Sync`: drop those expectations (undoing their effects).
pub(super) fn fail_until_sync(h: &mut Held, actions: &mut Vec<Action>) {
    loop {
        match h.queue.front() {
            Some(Expect::Client { kind: b'S', .. } | Expect::ProxySync) => return,
            None => {
                h.error = ErrorState::SkippingToSync;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminators() {
        assert!(terminates(b'P', b'1'));
        assert!(terminates(b'D', b'n'));
        assert!(terminates(b'E', b's'));
        assert!(!terminates(b'Q', b'C'));
        assert!(terminates(b'S', b'Z'));
    }
}
