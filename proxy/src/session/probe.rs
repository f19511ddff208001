//! Position probes on the held backend: pipelined behind a statement
//! (read-your-writes after a write, monotonic reads after a replica read)
//! or before a read (the read engine's freshness check and lost-write
//! check), and run alone while the engine waits. The SQL, the parsing and
//! the token a position stands for are the library's ([`lagrouter::probe`]).

use std::time::Duration;

use bytes::BytesMut;
use lagrouter::probe::{POSITION_SQL, Position};
use postgres_protocol::message::frontend;

use crate::backend::{BackendConn, BackendError};
use crate::wire::{self as protocol, Frame, TxnStatus};

use super::Session;
use super::local::TOKEN_PARAMETER;
use super::pipeline::{Expect, ProbeKind};

/// Name of the proxy's prepared position probe on each backend connection.
pub const PROBE_STATEMENT: &str = "lagrouter_position_probe";

impl Session {
    /// Pipelines a position probe behind the statement just forwarded:
    /// after every committed write (read-your-writes, whatever the policy:
    /// a later one may use the token). Reads need none: monotonic reads
    /// follow the session's last read ([`lagrouter::routing::LastRead`]),
    /// unless the engine asks for the position to move the next read.
    pub(super) fn attach_probe(&mut self) {
        let Some(h) = &mut self.backend else { return };
        if std::mem::take(&mut h.no_pipelined_probe) || h.predicted != TxnStatus::Idle {
            // COPY FROM STDIN: the server would take the probe as COPY
            // data; the fallback probe runs after ReadyForQuery instead.
            return;
        }
        if h.capture {
            let parsed = encode_probe(&mut h.conn);
            h.queue.push_back(probe(ProbeKind::After, parsed));
        } else if !h.on_replica && h.wrote_since_probe {
            let parsed = encode_probe(&mut h.conn);
            h.queue.push_back(probe(ProbeKind::Write, parsed));
            h.wrote_since_probe = false;
        }
    }

    /// A probe answered (`None`: it failed).
    pub(super) fn on_probe(&mut self, kind: ProbeKind, lost_parse: bool, result: Option<Position>) {
        let h = self.backend.as_mut().expect("held");
        if lost_parse {
            h.conn.probe_prepared = false;
        }
        let new_token = match (kind, result) {
            (ProbeKind::Before, _) => {
                self.on_check(result);
                None
            }
            (ProbeKind::Write, Some(pos))
                if !pos.in_recovery
                    && h.held_rfq
                        .as_ref()
                        .is_some_and(|z| protocol::rfq_status(z) == b'I') =>
            {
                Some(pos)
            }
            (ProbeKind::Write, _) => {
                h.wrote_since_probe = true;
                None
            }
            (ProbeKind::After, pos) => {
                let topo = self.topology().clone();
                self.read_capture = pos.and_then(|p| p.token(&topo)).map(|t| t.lsn);
                None
            }
        };
        // Labelled with the timeline the node reported, not the monitor's.
        if let Some(pos) = new_token {
            let before = self.token.get();
            let token = pos.token(self.topology());
            if token.is_some() {
                // Read on the primary after the commit: at or after
                // everything any earlier read of the session saw.
                self.last_read = self.last_read.map(lagrouter::routing::LastRead::covered);
            }
            self.token.observe(token);
            if self.token.get() != before {
                if let Some(t) = self.token.get() {
                    let h = self.backend.as_mut().expect("held");
                    let mut b = BytesMut::new();
                    protocol::parameter_status(TOKEN_PARAMETER, &t.encode(), &mut b);
                    h.emit(&b);
                }
            }
        }
        if let Some(h) = self.backend.as_mut() {
            if let Some(z) = h.held_rfq.take() {
                h.emit(&z.bytes);
            }
        }
    }
}

/// Expects the replies of a probe queued with [`encode_probe`].
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

/// Runs a simple position probe to completion (while the read engine
/// waits for a replica), for at most `limit`: a node that hangs must not
/// hold the session.
pub(super) async fn poll_position(
    conn: &mut BackendConn,
    limit: Duration,
) -> Result<Position, BackendError> {
    let rows = tokio::time::timeout(limit, conn.simple_query(POSITION_SQL))
        .await
        .map_err(|_| {
            BackendError::Unresponsive(format!("no answer to a position probe within {limit:?}"))
        })??;
    Ok(rows
        .first()
        .map(|r| Position::from_text(r))
        .unwrap_or_default())
}

/// The position in a probe's `DataRow`.
pub(super) fn position(f: &Frame) -> Position {
    Position::from_text(&protocol::data_row_texts(f))
}
