//! When the server connection serving a client dies (the node crashed,
//! was cut off or ejected) and the read engine cannot retry elsewhere: the
//! client gets an error for what was in flight, **keeps its connection and
//! its consistency token**, and a transaction it had open behaves as an
//! aborted one until it ends it, as on a server.
//!
//! | in flight | the client sees |
//! |---|---|
//! | a statement inside `BEGIN … ` | 08006, then `E`: statements get 25P02, `COMMIT`/`ROLLBACK` answer `ROLLBACK` |
//! | an autocommit statement or `COMMIT` on the primary | 08007 (transaction resolution unknown), idle |
//! | a read on a replica | 08006, idle |
//! | anything in a pinned session, or during COPY | FATAL 08006: the session's state was on that server |
//!
//! The next read then carries the token as always: after a failover that
//! lost the session's acknowledged writes it gets 55000.

use std::collections::HashMap;

use bytes::BytesMut;

use crate::backend::BackendError;
use crate::classify::StatementKind;
use crate::wire::{self as protocol, ClientMessage, PgError, TxnStatus};

use super::Session;
use super::pipeline::{Expect, Held};
use super::{Flow, Pooling, SessionEnd, Skip};

/// A transaction block whose server connection died: the session answers
/// it as PostgreSQL answers an aborted transaction, without a server.
#[derive(Debug, Default)]
pub(super) struct LostTxn {
    /// Portals bound to a transaction-ending statement, and whether it is
    /// a rollback.
    portals: HashMap<String, bool>,
    /// The connection died while the client was idle in the transaction:
    /// the error it has not seen yet, given in answer to its next
    /// statement (a `COMMIT` included; a `ROLLBACK` needs no error).
    untold: Option<PgError>,
}

impl LostTxn {
    /// A transaction the proxy ended itself: `e` answers the client's next
    /// statement (unless that ends the transaction).
    pub(super) fn aborted(e: PgError) -> LostTxn {
        LostTxn {
            portals: HashMap::new(),
            untold: Some(e),
        }
    }

    /// The answer to a statement that does not end the transaction.
    fn refusal(&mut self) -> PgError {
        self.untold.take().unwrap_or_else(|| {
            PgError::error(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            )
        })
    }

    /// The answer to `COMMIT` (`rollback = false`) or `ROLLBACK`: the
    /// error not told yet, or the `ROLLBACK` tag.
    fn end(&mut self, rollback: bool, out: &mut BytesMut) {
        match self.untold.take() {
            Some(e) if !rollback => e.encode(out),
            _ => protocol::command_complete("ROLLBACK", out),
        }
    }
}

impl Session {
    /// The held connection failed and the unit cannot be retried: reports
    /// the error to the client and keeps the session (see the module
    /// docs). `h` is already marked broken.
    pub(super) fn backend_lost(&mut self, mut h: Box<Held>, e: &BackendError) -> Flow {
        self.plan = None;
        if self.pooling == Pooling::Pinned || h.copy.is_in() {
            self.client.wbuf.extend_from_slice(&h.out);
            return Err(SessionEnd::Fatal(PgError::fatal(
                "08006",
                format!("lost the server connection: {e}"),
            )));
        }
        h.commit_output();
        let e = match h.server_fatal.take() {
            Some(fatal) => format!("the server ended the connection: {fatal}"),
            None => e.to_string(),
        };
        self.client.wbuf.extend_from_slice(&h.out);
        let syncs = h
            .queue
            .iter()
            .filter(|x| {
                matches!(
                    x,
                    Expect::Client {
                        kind: b'S' | b'Q',
                        ..
                    }
                )
            })
            .count()
            + usize::from(h.held_rfq.is_some());
        let (err, status) = if h.predicted != TxnStatus::Idle {
            (
                PgError::error(
                    "08006",
                    format!("lost the server connection: {e}; the transaction was rolled back"),
                )
                .with_hint(
                    "End the transaction (ROLLBACK) and retry it; the connection is still usable.",
                ),
                TxnStatus::Failed,
            )
        } else if !h.on_replica {
            (
                PgError::error(
                    "08007",
                    format!(
                        "lost the connection to the primary while the statement ran: {e}; whether it committed is unknown"
                    ),
                )
                .with_hint("The connection is still usable, and its token still guards later reads."),
                TxnStatus::Idle,
            )
        } else {
            (
                PgError::error("08006", format!("lost the server connection: {e}")),
                TxnStatus::Idle,
            )
        };
        let in_unit = h.has_client_entries() || h.unit_state.is_open();
        drop(h);
        let mut untold = None;
        if syncs == 0 && !in_unit {
            // Idle in its transaction: told at its next statement.
            untold = Some(err);
        } else if syncs == 0 {
            // The client has not ended its unit yet: skip to its Sync.
            err.encode(&mut self.client.wbuf);
            self.pending.clear();
            self.skip = Skip::UntilSync;
        } else {
            for _ in 0..syncs {
                err.encode(&mut self.client.wbuf);
                protocol::ready_for_query(status, &mut self.client.wbuf);
            }
        }
        // The server undid what the lost transaction (or statement) set.
        if let Some(before) = self.settings_before_txn.take() {
            self.desired = before.desired;
        }
        self.txn_status = status;
        self.lost = (status == TxnStatus::Failed).then(|| {
            Box::new(LostTxn {
                portals: HashMap::new(),
                untold,
            })
        });
        Ok(())
    }

    /// Answers a unit sent while the session is in a lost transaction:
    /// only its end is accepted (tagged `ROLLBACK`, as PostgreSQL tags a
    /// `COMMIT` of an aborted transaction); anything else gets 25P02.
    pub(super) fn answer_in_lost_transaction(&mut self, batch: Vec<ClientMessage>) {
        for msg in batch {
            if self.skip == Skip::UntilSync {
                if !matches!(msg, ClientMessage::Sync { .. }) {
                    continue;
                }
                self.skip = Skip::No;
            }
            let sync_point = matches!(
                msg,
                ClientMessage::Query { .. } | ClientMessage::Sync { .. }
            );
            let Some(mut lost) = self.lost.take() else {
                if sync_point {
                    protocol::ready_for_query(self.txn_status, &mut self.client.wbuf);
                    continue;
                }
                // Ended by an earlier message of this batch: the rest
                // would need a server; refuse it.
                PgError::error(
                    "25P02",
                    "statements after the end of a lost transaction must be sent after Sync",
                )
                .encode(&mut self.client.wbuf);
                self.skip = Skip::UntilSync;
                continue;
            };
            let mut out = BytesMut::new();
            // The message is refused: skip to Sync.
            let mut refused = None;
            let mut ended = false;
            match msg {
                ClientMessage::Query { sql, .. } => {
                    let class = self.shared.classifier.classify(&sql);
                    match class.statements.as_slice() {
                        [] => out.extend_from_slice(&protocol::empty_message(b'I')),
                        [StatementKind::TransactionEnd] => {
                            lost.end(is_rollback(&sql), &mut out);
                            ended = true;
                        }
                        _ => lost.refusal().encode(&mut out),
                    }
                }
                ClientMessage::Parse {
                    name,
                    sql,
                    types,
                    frame,
                } => match self.make_info(&sql, &types, Some((&name, &frame))) {
                    Ok(info) if ends_transaction(&info.class.statements) => {
                        if name.is_empty() {
                            self.unnamed = Some(info);
                        } else {
                            self.prepared.insert(name, info);
                        }
                        out.extend_from_slice(&protocol::empty_message(b'1'));
                    }
                    Ok(_) => refused = Some(lost.refusal()),
                    Err(e) => refused = Some(e),
                },
                ClientMessage::Bind { portal, stmt, .. } => match self.ending(&stmt) {
                    Some(rollback) => {
                        lost.portals.insert(portal, rollback);
                        out.extend_from_slice(&protocol::empty_message(b'2'));
                    }
                    None => refused = Some(lost.refusal()),
                },
                ClientMessage::Describe { kind, name, .. } => {
                    let ok = if kind == b'S' {
                        self.ending(&name).is_some()
                    } else {
                        lost.portals.contains_key(&name)
                    };
                    if !ok {
                        refused = Some(lost.refusal());
                    } else {
                        if kind == b'S' {
                            out.extend_from_slice(&protocol::no_parameters());
                        }
                        out.extend_from_slice(&protocol::empty_message(b'n'));
                    }
                }
                ClientMessage::Execute { portal, .. } => match lost.portals.get(&portal) {
                    Some(&rollback) => {
                        lost.end(rollback, &mut out);
                        ended = true;
                    }
                    None => refused = Some(lost.refusal()),
                },
                ClientMessage::Close { kind, name, .. } => {
                    if kind == b'S' && !name.is_empty() {
                        self.prepared.remove(&name);
                    } else {
                        lost.portals.remove(&name);
                    }
                    out.extend_from_slice(&protocol::empty_message(b'3'));
                }
                ClientMessage::Sync { .. } | ClientMessage::Flush { .. } => {}
            }
            if let Some(e) = refused {
                e.encode(&mut out);
                self.skip = Skip::UntilSync;
            }
            if ended {
                self.txn_status = TxnStatus::Idle;
            } else {
                self.lost = Some(lost);
            }
            if sync_point {
                protocol::ready_for_query(self.txn_status, &mut out);
            }
            self.client.wbuf.extend_from_slice(&out);
        }
    }

    /// Whether the client statement `name` ends a transaction, and if so
    /// whether it rolls back.
    fn ending(&self, name: &str) -> Option<bool> {
        self.stmt_info(name)
            .filter(|i| ends_transaction(&i.class.statements))
            .map(|i| is_rollback(&i.sql))
    }
}

/// `COMMIT`, `ROLLBACK`, `END`, `ABORT` (or `PREPARE TRANSACTION`): what
/// an aborted transaction accepts.
fn ends_transaction(statements: &[StatementKind]) -> bool {
    matches!(statements, [StatementKind::TransactionEnd])
}

/// `ROLLBACK …` or `ABORT …` (not `COMMIT`, `END`, `PREPARE TRANSACTION`).
fn is_rollback(sql: &str) -> bool {
    let word = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    word.eq_ignore_ascii_case("rollback") || word.eq_ignore_ascii_case("abort")
}

#[cfg(test)]
mod tests {
    #[test]
    fn rollbacks_are_told_from_commits() {
        for (sql, rollback) in [
            ("ROLLBACK", true),
            ("  abort work", true),
            ("rollback;", true),
            ("COMMIT", false),
            ("END", false),
            ("PREPARE TRANSACTION 'x'", false),
        ] {
            assert_eq!(super::is_rollback(sql), rollback, "{sql}");
        }
    }
}
