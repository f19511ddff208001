//! Position probes and retries: the probe pipelined behind a statement
//! (read-your-writes after a write, monotonic reads after a replica read)
//! or before a replica read (is the replica fresh enough?), waiting for a
//! replica to catch up, and falling back to the primary when a replica
//! read cannot be served there (not caught up, rejected, or the connection
//! failed).

use std::time::{Duration, Instant};

use bytes::BytesMut;
use lagrouter::exec::POSITION_SQL;
use lagrouter::{Fallback, Lsn};
use postgres_protocol::message::frontend;
use tracing::warn;

use crate::backend::{BackendConn, BackendError};
use crate::metrics as m;
use crate::router::Target;
use crate::wire::{self as protocol, Frame, PgError, TxnStatus};

use super::local::TOKEN_PARAMETER;
use super::pipeline::{Expect, Mode};
use super::{Flow, Pooling, Session, SessionEnd};

/// Name of the proxy's prepared position probe on each backend connection.
pub const PROBE_STATEMENT: &str = "lagrouter_position_probe";

/// How often a replica's position is polled while a read waits for it.
pub(super) const WAIT_POLL: Duration = Duration::from_millis(2);

/// A probe's answer: `(in_recovery, lsn)`.
pub(super) type Position = (bool, Option<Lsn>);

/// Why a position probe was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProbeKind {
    /// Before a read on a replica that may not have reached `need`.
    Before { need: Lsn },
    /// After a replica read: monotonic reads.
    After,
    /// After a write committed: read-your-writes.
    Write,
}

/// What to do with a replica read that cannot be served where it went.
#[derive(Clone, Copy, Debug)]
pub(super) enum Retry {
    /// Run the unit again on the primary; the fallback reason (label of
    /// the fallbacks metric).
    Primary(&'static str),
    /// The replica is behind the token: poll it until `deadline`.
    Wait { need: Lsn, deadline: Instant },
}

impl Session {
    /// Pipelines a position probe behind the statement just forwarded,
    /// when read-your-writes or monotonic reads need one.
    pub(super) fn attach_probe(&mut self) {
        let uses_token = self.settings().policy.uses_token();
        let Some(h) = &mut self.backend else { return };
        if std::mem::take(&mut h.no_pipelined_probe)
            || !uses_token
            || h.predicted != TxnStatus::Idle
        {
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

    pub(super) fn on_probe(&mut self, kind: ProbeKind, lost_parse: bool, result: Option<Position>) {
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
                    if caught_up && h.unit_state.take_flush_pending() {
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

    pub(super) async fn run_retry(&mut self, retry: Retry) -> Flow {
        let Some(mut h) = self.backend.take() else {
            return Ok(());
        };
        let unit = h.unit.take().unwrap_or_default();
        *self.cancel.lock().expect("cancel slot") = None;
        match retry {
            Retry::Primary(reason) => {
                metrics::counter!(m::FALLBACKS_TOTAL, m::LABEL_REASON => reason).increment(1);
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
                            h.unit_state.take_flush_pending();
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
                        metrics::counter!(m::FALLBACKS_TOTAL, m::LABEL_REASON => "wait_timeout")
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
    pub(super) async fn backend_failed(&mut self, e: BackendError) -> Flow {
        let Some(mut h) = self.backend.take() else {
            return Ok(());
        };
        *self.cancel.lock().expect("cancel slot") = None;
        warn!(node = h.node, error = %e, "server connection failed");
        if e.is_connection_failure() {
            self.shared.monitor.report_failure(h.node, &e.to_string());
        }
        h.conn.broken = true;
        let retryable = h.unit.is_some()
            && matches!(h.mode, Mode::Buffer(_) | Mode::Discard)
            && self.pooling == Pooling::Transaction;
        if retryable {
            let unit = h.unit.take().unwrap_or_default();
            drop(h);
            metrics::counter!(m::FALLBACKS_TOTAL, m::LABEL_REASON => "replica_error").increment(1);
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

pub(super) fn probe(kind: ProbeKind, parsed: bool) -> Expect {
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
pub(super) fn encode_probe(conn: &mut BackendConn) -> bool {
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
pub(super) async fn poll_position(
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
pub(super) fn position(f: &Frame) -> Position {
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
