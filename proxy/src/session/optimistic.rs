//! Optimistic read transactions (`routing.transactions = "optimistic"`,
//! after MaxScale's `optimistic_trx`): a transaction that is not `READ
//! ONLY` starts on a replica, routed (and token-gated) by the read engine
//! like any read, and stays there while it only reads. Every client
//! message it sends is recorded, and a checksum is kept of the results the
//! client receives (data rows, command tags, error codes).
//!
//! At its first write, or at a statement that cannot be replayed
//! identically (see [`replay_rule`]), the transaction moves: the replica's
//! transaction is rolled back, the recorded messages are replayed on the
//! primary (the same translation of statement names as for the client's
//! own messages, replies swallowed) and the checksum of their results is
//! compared with the client's. Equal: the transaction goes on on the
//! primary, starting with the message that moved it. Different (or the
//! replay failed): the client gets 40001 (`serialization_failure`, which
//! drivers and ORMs retry) and the transaction is answered as an aborted
//! one without a server (`lost.rs`); the session's next transaction then
//! starts on the primary, so that the retry cannot fail the same way.
//!
//! | the transaction | where it runs |
//! |---|---|
//! | `BEGIN` / `START TRANSACTION` (READ COMMITTED), reads only | a replica, to its end |
//! | … then a write, `FOR UPDATE`, a pinning statement | moves at that statement (replay + checksum) |
//! | … then a volatile function (`now()`, `random()`, …), `COPY`, a session `SET`, an isolation change, more than [`MAX_RECORDED_MESSAGES`] messages or [`MAX_RECORDED_BYTES`] bytes | moves at that statement |
//! | `ISOLATION LEVEL REPEATABLE READ` / `SERIALIZABLE` (or that default), `READ WRITE` (a replica refuses it), a `BEGIN` batched with a write, the `primary` policy, `then = "error"`, a pinned session | the primary from its `BEGIN` |
//! | `BEGIN READ ONLY` | a replica, as any read (never moves) |

use std::time::Duration;

use postgres_protocol::message::frontend;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::backend::{BackendError, PooledConn};
use crate::classify::{Classification, RouteHint, StatementKind};
use crate::config::Transactions;
use crate::metrics as m;
use crate::wire::{self as protocol, ClientMessage, Frame, PgError, TxnStatus};

use super::lost::LostTxn;
use super::pipeline::{ErrorState, Held, Mode};
use super::unit::Send;
use super::{Flow, Pooling, Session};

/// Most client messages recorded for one transaction; beyond, it moves to
/// the primary.
pub(super) const MAX_RECORDED_MESSAGES: usize = 1_000;
/// Most bytes of client messages recorded for one transaction; beyond, it
/// moves to the primary.
pub(super) const MAX_RECORDED_BYTES: usize = 1 << 20;
/// How long rolling a moved transaction back may take before its
/// connection is closed instead.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The session's optimistic-transaction state.
#[derive(Debug, Default)]
pub(super) enum OptState {
    /// No optimistic transaction.
    #[default]
    Off,
    /// A transaction started on a replica (or is starting).
    Armed(Box<Recording>),
    /// The last one failed its checksum: the next transaction starts on
    /// the primary.
    PrimaryNext,
}

/// What an optimistic transaction sent and what its client received.
#[derive(Debug)]
pub(super) struct Recording {
    /// The client messages sent to the replica, in order.
    log: Vec<ClientMessage>,
    /// Their size in bytes.
    bytes: usize,
    /// Checksum of the results the client received.
    client: Sha256,
    /// Checksum of the results of the replay.
    replay: Sha256,
    /// The replay on the primary is running.
    replaying: bool,
}

impl Recording {
    fn new(first: &[ClientMessage]) -> Recording {
        Recording {
            bytes: first.iter().map(message_len).sum(),
            log: first.to_vec(),
            client: Sha256::new(),
            replay: Sha256::new(),
            replaying: false,
        }
    }

    /// A server reply attributed to a client message: its results count
    /// in the client's checksum (replies that reach the client) or the
    /// replay's (replies swallowed while replaying).
    pub(super) fn observe(&mut self, f: &Frame, mode: &Mode) {
        let code;
        let data: &[u8] = match f.tag {
            b'D' | b'C' => &f.bytes,
            b'E' => {
                code = protocol::error_fields(f).code;
                code.as_bytes()
            }
            _ => return,
        };
        let discarded = matches!(mode, Mode::Discard);
        let sum = match (self.replaying, discarded) {
            (false, false) => &mut self.client,
            (true, true) => &mut self.replay,
            _ => return,
        };
        sum.update([f.tag]);
        sum.update((data.len() as u64).to_be_bytes());
        sum.update(data);
    }

    /// The first unit is sent again (the read engine retries it
    /// elsewhere): what its first run returned does not count.
    pub(super) fn unit_restarted(&mut self) {
        if !self.replaying {
            self.client = Sha256::new();
        }
    }

    fn matches(&self) -> bool {
        self.client.clone().finalize() == self.replay.clone().finalize()
    }
}

/// Why a statement moves an optimistic transaction to the primary (a
/// `reason` of [`m::TRANSACTIONS_REPLAYED_TOTAL`]), if it does.
pub(super) fn replay_rule(class: &Classification, sql: &str) -> Option<&'static str> {
    if class.hint == Some(RouteHint::Primary) {
        return Some("write");
    }
    for k in &class.statements {
        match k {
            StatementKind::Write
            | StatementKind::Other
            | StatementKind::SessionPinning(_)
            | StatementKind::TransactionBegin { .. } => return Some("write"),
            StatementKind::Set { local: false, .. }
            | StatementKind::Reset { .. }
            | StatementKind::Discard => return Some("unsafe"),
            _ => {}
        }
    }
    unsafe_text(sql).then_some("unsafe")
}

/// Words that make a statement's result differ between runs (volatile
/// functions), or that it cannot be checked or replayed as a read (COPY,
/// isolation changes, two-phase commit).
const UNSAFE_WORDS: &[&str] = &[
    "now(",
    "current_timestamp",
    "current_time",
    "current_date",
    "localtime",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "random(",
    "gen_random_uuid",
    "uuid_generate",
    "setseed",
    "nextval",
    "currval",
    "lastval",
    "txid_",
    "pg_current_xact_id",
    "copy ",
    "isolation",
    "prepare transaction",
];

fn unsafe_text(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    UNSAFE_WORDS.iter().any(|w| lower.contains(w))
}

/// Whether `sql` asks for an isolation level a replay cannot reproduce
/// (`REPEATABLE READ`, `SERIALIZABLE`: one snapshot for the whole
/// transaction).
fn snapshot_isolation(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    lower.contains("serializable") || lower.contains("repeatable")
}

/// Whether a transaction under `policy` may start on a replica: not under
/// `primary`, nor when a read that finds no fresh replica fails (`then =
/// "error"`) rather than going to the primary, as a `BEGIN` always could.
fn replica_start_allowed(policy: &lagrouter::Consistency) -> bool {
    use lagrouter::Consistency as C;
    !matches!(
        policy,
        C::Primary
            | C::ReadYourWrites {
                then: lagrouter::Fallback::Error,
                ..
            }
    )
}

/// Whether `sql` asks for `READ WRITE` explicitly, which a replica refuses
/// (psycopg sends it when `read_only` is `False` rather than `None`).
fn read_write(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    words.windows(2).any(|w| w[0] == "read" && w[1] == "write")
}

fn message_len(m: &ClientMessage) -> usize {
    match m {
        ClientMessage::Query { frame, .. }
        | ClientMessage::Parse { frame, .. }
        | ClientMessage::Bind { frame, .. }
        | ClientMessage::Describe { frame, .. }
        | ClientMessage::Execute { frame, .. }
        | ClientMessage::Close { frame, .. }
        | ClientMessage::Sync { frame }
        | ClientMessage::Flush { frame } => frame.bytes.len(),
    }
}

/// What to do with a client message of an optimistic transaction.
enum Verdict {
    /// Record it and send it to the replica.
    Record,
    /// It ends the transaction on the replica.
    End,
    /// Move the transaction to the primary before it, for this reason.
    Move(&'static str),
    /// The transaction is no longer optimistic: send it as usual.
    Release,
}

impl Session {
    /// Whether the unit `batch` (classified as `classes`) that begins a
    /// transaction starts it on a replica; if so, recording starts.
    pub(super) fn optimistic_begin(
        &mut self,
        batch: &[ClientMessage],
        classes: &[std::sync::Arc<Classification>],
    ) -> bool {
        if matches!(self.optimistic, OptState::PrimaryNext) {
            let begins = classes.iter().any(|c| {
                c.statements
                    .iter()
                    .any(|s| matches!(s, StatementKind::TransactionBegin { .. }))
            });
            if begins {
                self.optimistic = OptState::Off;
            }
            return false;
        }
        let settings = self.settings();
        if settings.config.routing.transactions != Transactions::Optimistic
            || self.pooling != Pooling::Transaction
            || self.txn_status != TxnStatus::Idle
            || !replica_start_allowed(&self.unit_policy)
        {
            return false;
        }
        let mut begins = false;
        for c in classes {
            if c.hint.is_some() || c.pin_reason().is_some() {
                return false;
            }
            for s in &c.statements {
                match s {
                    StatementKind::TransactionBegin { read_only: false } => begins = true,
                    StatementKind::TransactionEnd
                    | StatementKind::Set { local: false, .. }
                    | StatementKind::Reset { .. }
                    | StatementKind::Discard => return false,
                    s if !s.may_run_on_replica() => return false,
                    _ => {}
                }
            }
        }
        let texts = batch.iter().filter_map(|m| match m {
            ClientMessage::Query { sql, .. } | ClientMessage::Parse { sql, .. } => Some(sql),
            _ => None,
        });
        for sql in texts {
            if snapshot_isolation(sql) || read_write(sql) || unsafe_text(sql) {
                return false;
            }
        }
        let isolation = self
            .desired
            .get("default_transaction_isolation")
            .is_some_and(|s| snapshot_isolation(s));
        let size: usize = batch.iter().map(message_len).sum();
        if !begins || isolation || size > MAX_RECORDED_BYTES || batch.len() > MAX_RECORDED_MESSAGES
        {
            return false;
        }
        self.optimistic = OptState::Armed(Box::new(Recording::new(batch)));
        true
    }

    /// A unit is dispatched while no server connection is held: an
    /// optimistic transaction left from before is over (it never began, or
    /// its connection was lost).
    pub(super) fn optimistic_dispatch(&mut self) {
        if matches!(self.optimistic, OptState::Armed(_)) {
            self.optimistic = OptState::Off;
        }
    }

    /// A client message while a server connection is held: in an
    /// optimistic transaction, recorded, or the transaction ends or moves.
    /// `Some(msg)`: the caller sends it as usual.
    pub(super) async fn optimistic_message(
        &mut self,
        msg: ClientMessage,
    ) -> Result<Option<ClientMessage>, super::SessionEnd> {
        let OptState::Armed(_) = &self.optimistic else {
            return Ok(Some(msg));
        };
        let verdict = self.verdict(&msg);
        let OptState::Armed(rec) = &mut self.optimistic else {
            return Ok(Some(msg));
        };
        match verdict {
            Verdict::Record => {
                rec.bytes += message_len(&msg);
                rec.log.push(msg.clone());
                Ok(Some(msg))
            }
            Verdict::End => {
                metrics::counter!(m::TRANSACTIONS_OFFLOADED_TOTAL).increment(1);
                self.optimistic = OptState::Off;
                Ok(Some(msg))
            }
            Verdict::Release => {
                self.optimistic = OptState::Off;
                Ok(Some(msg))
            }
            Verdict::Move(reason) => {
                // Boxed: rare, and its future would otherwise be part of
                // every idle session's task.
                Box::pin(self.move_to_primary(msg, reason)).await?;
                Ok(None)
            }
        }
    }

    fn verdict(&self, msg: &ClientMessage) -> Verdict {
        let OptState::Armed(rec) = &self.optimistic else {
            return Verdict::Release;
        };
        let Some(h) = &self.backend else {
            return Verdict::Release;
        };
        if !h.on_replica
            || self.pooling != Pooling::Transaction
            || self.txn_status == TxnStatus::Failed
        {
            return Verdict::Release;
        }
        let stmt = match msg {
            ClientMessage::Query { sql, .. } => Some((self.classify(sql), sql.clone())),
            ClientMessage::Bind { stmt, .. } => self
                .stmt_info(stmt)
                .map(|i| (i.class.clone(), i.sql.clone())),
            _ => None,
        };
        if let Some((class, sql)) = &stmt {
            if let Some(reason) = replay_rule(class, sql) {
                return Verdict::Move(reason);
            }
            if class
                .statements
                .iter()
                .any(|s| matches!(s, StatementKind::TransactionEnd))
            {
                return Verdict::End;
            }
        }
        if rec.log.len() >= MAX_RECORDED_MESSAGES
            || rec.bytes + message_len(msg) > MAX_RECORDED_BYTES
        {
            return Verdict::Move("limit");
        }
        Verdict::Record
    }

    /// Moves the optimistic transaction to the primary before `msg` (see
    /// the module docs).
    async fn move_to_primary(&mut self, msg: ClientMessage, reason: &'static str) -> Flow {
        // 1. Everything sent to the replica so far has its replies (and
        //    they count in the client's checksum).
        if let Err(e) = self.settle().await {
            self.optimistic = OptState::Off;
            self.backend_failed(e).await?;
            return Box::pin(self.on_message(msg)).await;
        }
        let failed = self.txn_status == TxnStatus::Failed
            || self
                .backend
                .as_ref()
                .is_none_or(|h| h.error != ErrorState::None);
        let OptState::Armed(mut rec) = std::mem::take(&mut self.optimistic) else {
            return Ok(());
        };
        if failed {
            // An aborted transaction answers the same anywhere.
            self.forward(msg);
            return Ok(());
        }
        // 2. The replica's transaction is rolled back.
        let h = self.backend.take().expect("held");
        *self.status.server.lock().expect("cancel slot") = None;
        let open = h.unit_state.is_open();
        let Held { conn, .. } = *h;
        roll_back(conn, open).await;
        // 3. The recorded messages run again on the primary.
        let got = match self.topology().primary {
            Some(p) => self
                .checkout(p)
                .await
                .map(|c| (p, c))
                .map_err(|e| PgError::error(e.sqlstate(), e.to_string())),
            None => Err(PgError::error("08006", "no primary server is available")),
        };
        let (primary, conn) = match got {
            Ok(pc) => pc,
            Err(e) => return self.abort_moved(msg, e, false).await,
        };
        let log = std::mem::take(&mut rec.log);
        rec.replaying = true;
        self.optimistic = OptState::Armed(rec);
        let skip = self.skip;
        self.start_unit(primary, Send::Write, log, conn);
        self.skip = skip;
        if let Some(h) = &mut self.backend {
            h.mode = Mode::Discard;
        }
        let replayed = self.settle().await;
        let OptState::Armed(rec) = std::mem::take(&mut self.optimistic) else {
            return Ok(());
        };
        let same = replayed.is_ok()
            && rec.matches()
            && self
                .backend
                .as_ref()
                .is_some_and(|h| h.error == ErrorState::None);
        if !same {
            if let Err(e) = &replayed {
                warn!(pid = self.pid, error = %e, "replaying a transaction on the primary failed");
            }
            if let Some(h) = self.backend.take() {
                *self.status.server.lock().expect("cancel slot") = None;
                let open = h.unit_state.is_open();
                let Held { mut conn, .. } = *h;
                if replayed.is_err() {
                    conn.broken = true;
                }
                roll_back(conn, open).await;
            }
            let e = PgError::error(
                "40001",
                "could not serialize access: the transaction read different data on the replica it began on than on the primary it moved to at its first write",
            )
            .with_hint("Retry the transaction: the session's next transaction begins on the primary.");
            return self.abort_moved(msg, e, true).await;
        }
        // 4. Same results: the transaction goes on on the primary.
        debug!(
            pid = self.pid,
            reason, "optimistic transaction moved to the primary"
        );
        metrics::counter!(m::TRANSACTIONS_REPLAYED_TOTAL, m::LABEL_REASON => reason).increment(1);
        if let Some(h) = &mut self.backend {
            h.mode = Mode::Direct;
        }
        self.forward(msg);
        Ok(())
    }

    /// Reads the held connection's replies until nothing more is expected
    /// (asking the server to flush an open unit's replies first).
    async fn settle(&mut self) -> Result<(), BackendError> {
        if let Some(h) = &mut self.backend {
            if h.unit_state.is_open() && !h.queue.is_empty() {
                frontend::flush(&mut h.conn.wbuf);
            }
        }
        loop {
            let Some(h) = &mut self.backend else {
                return Ok(());
            };
            h.drain_synth();
            if h.queue.is_empty() {
                self.move_output();
                return Ok(());
            }
            h.conn.flush().await?;
            let f = h.conn.read_frame().await?;
            self.on_backend_frame(f);
        }
    }

    /// The moved transaction is over, aborted: `e` answers `msg` (unless
    /// it ends the transaction), and the rest of the transaction is
    /// answered as an aborted one.
    async fn abort_moved(&mut self, msg: ClientMessage, e: PgError, checksum: bool) -> Flow {
        if checksum {
            metrics::counter!(m::TRANSACTIONS_CHECKSUM_FAILED_TOTAL).increment(1);
            self.optimistic = OptState::PrimaryNext;
        }
        debug!(pid = self.pid, code = %e.code, "optimistic transaction aborted");
        if let Some(before) = self.settings_before_txn.take() {
            self.desired = before.desired;
        }
        self.txn_status = TxnStatus::Failed;
        self.lost = Some(Box::new(LostTxn::aborted(e)));
        Box::pin(self.on_message(msg)).await
    }
}

/// Rolls back the transaction on `conn` (ending the client's open unit
/// first) and gives the connection back; closes it instead when that
/// fails or takes too long.
async fn roll_back(mut conn: PooledConn, open: bool) {
    let done = !conn.broken
        && tokio::time::timeout(ROLLBACK_TIMEOUT, async {
            if open {
                frontend::sync(&mut conn.wbuf);
                conn.flush().await?;
                while conn.read_frame().await?.tag != b'Z' {}
            }
            conn.simple_query("ROLLBACK").await.map(|_| ())
        })
        .await
        .is_ok_and(|r| r.is_ok());
    if done {
        conn.release();
    } else {
        conn.broken = true;
        drop(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::classify;

    fn rule(sql: &str) -> Option<&'static str> {
        replay_rule(&classify(sql), sql)
    }

    #[test]
    fn reads_stay_and_the_rest_moves() {
        for sql in [
            "SELECT * FROM t WHERE id = 1",
            "SELECT pg_is_in_recovery()",
            "SET LOCAL statement_timeout = '1s'",
            "SAVEPOINT a",
            "SHOW search_path",
            "COMMIT",
        ] {
            assert_eq!(rule(sql), None, "{sql}");
        }
        for (sql, why) in [
            ("INSERT INTO t VALUES (1)", "write"),
            ("SELECT * FROM t FOR UPDATE", "write"),
            ("SELECT nextval('s')", "write"),
            ("/* lagrouter:primary */ SELECT 1", "write"),
            ("LISTEN x", "write"),
            ("SELECT now()", "unsafe"),
            ("SELECT random() FROM t", "unsafe"),
            ("SELECT CURRENT_TIMESTAMP", "unsafe"),
            ("COPY t TO STDOUT", "unsafe"),
            ("SET search_path = a", "unsafe"),
            // Not a statement the classifier knows: the primary's.
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "write"),
        ] {
            assert_eq!(rule(sql), Some(why), "{sql}");
        }
    }

    #[test]
    fn snapshot_isolation_is_recognised() {
        assert!(snapshot_isolation("BEGIN ISOLATION LEVEL REPEATABLE READ"));
        assert!(snapshot_isolation("begin isolation level serializable"));
        assert!(!snapshot_isolation("BEGIN"));
        assert!(!snapshot_isolation("BEGIN ISOLATION LEVEL READ COMMITTED"));
        assert!(read_write("BEGIN READ  WRITE"));
        assert!(read_write(
            "start transaction isolation level read committed, read write"
        ));
        assert!(!read_write("BEGIN READ ONLY"));
    }
}
