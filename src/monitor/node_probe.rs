//! Probing one node: its role, WAL position and timeline, plus the identity
//! and timeline history the snapshot needs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::MonitorTarget;
use crate::connect::Connector;
use crate::error::describe;
use crate::model::lsn::Lsn;

/// What one probe found.
pub(super) struct Probe {
    pub(super) in_recovery: bool,
    pub(super) lsn: Option<Lsn>,
    pub(super) timeline: Option<u32>,
    /// When the probe query was sent: the position is the node's at some
    /// instant after this one.
    pub(super) sent: Instant,
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END";

/// The timeline history file of timeline `$1` (needs superuser,
/// `pg_read_server_files` or `EXECUTE` on `pg_read_file(text)`).
const HISTORY_SQL: &str =
    "SELECT pg_read_file('pg_wal/' || upper(lpad(to_hex($1::int), 8, '0')) || '.history')";

const IDENTITY_SQL: &str = "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
     (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')";

/// What the snapshot needs of a node besides its probe result: identity
/// and timeline history, as of the node's latest probe.
#[derive(Clone, Default)]
pub(super) struct NodeMeta {
    pub(super) system_identifier: Option<u64>,
    pub(super) wal_segment_size: Option<u64>,
    /// The timeline history read from this node while it was a primary:
    /// `(its timeline, entries)`; the entries are empty when the file could
    /// not be read. Read once per timeline and connection.
    pub(super) history: Option<(u32, Vec<(u32, Lsn)>)>,
}

/// A probe's outcome, handed from the node's probe task to the round.
pub(super) struct Outcome {
    /// When the probe started (a query failure reported after this makes
    /// a success meaningless).
    pub(super) started: Instant,
    pub(super) result: Result<Probe, String>,
    pub(super) meta: NodeMeta,
}

pub(super) struct NodeProbe {
    pub(super) target: MonitorTarget,
    pub(super) client: Option<tokio_postgres::Client>,
    pub(super) meta: NodeMeta,
}

/// Parses a timeline history file: one `parent_tli<TAB>switch_lsn<TAB>reason`
/// line per ancestor timeline. Unparsable lines are skipped.
fn parse_timeline_history(text: &str) -> Vec<(u32, Lsn)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut fields = line.split_whitespace();
            let tli = fields.next()?.parse().ok()?;
            let lsn = fields.next()?.parse().ok()?;
            Some((tli, lsn))
        })
        .collect()
}

impl NodeProbe {
    /// Probes in its own task, so that a node that hangs holds up nobody:
    /// the round goes on without it (keeping its previous state) until its
    /// probe times out.
    pub(super) fn spawn_probe(
        probe: &Arc<tokio::sync::Mutex<NodeProbe>>,
        connector: &Arc<Connector>,
        timeout: Duration,
    ) -> JoinHandle<Outcome> {
        let (probe, connector) = (probe.clone(), connector.clone());
        tokio::spawn(async move {
            let mut p = probe.lock().await;
            let started = Instant::now();
            let result = p.probe(&connector, timeout).await;
            Outcome {
                started,
                result,
                meta: p.meta.clone(),
            }
        })
    }

    async fn probe(&mut self, connector: &Connector, timeout: Duration) -> Result<Probe, String> {
        match tokio::time::timeout(timeout, self.probe_inner(connector)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => {
                self.client = None;
                Err(e)
            }
            Err(_) => {
                self.client = None;
                Err(format!("probe timed out after {timeout:?}"))
            }
        }
    }

    async fn probe_inner(&mut self, connector: &Connector) -> Result<Probe, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = connector
                .connect(&self.target.config)
                .await
                .map_err(|e| describe(&e))?;
            let row = client
                .query_one(IDENTITY_SQL, &[])
                .await
                .map_err(|e| describe(&e))?;
            self.meta.system_identifier =
                row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok());
            self.meta.wal_segment_size =
                row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
            self.meta.history = None;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        let sent = Instant::now();
        let row = client
            .query_one(PROBE_SQL, &[])
            .await
            .map_err(|e| describe(&e))?;
        let in_recovery: bool = row.get(0);
        let lsn = row
            .get::<_, Option<&str>>(1)
            .and_then(|s| s.parse::<Lsn>().ok());
        // A primary's insert position just past a WAL page header is where
        // no record can end: an idle replica never reports it, and would
        // look behind (and lag ever more in time) until the next write.
        let lsn = match lsn {
            Some(l) if !in_recovery => Some(
                l.round_to_record_boundary(
                    self.meta
                        .wal_segment_size
                        .unwrap_or(crate::model::lsn::DEFAULT_WAL_SEGMENT_SIZE),
                ),
            ),
            other => other,
        };
        let timeline = row.get::<_, Option<i32>>(2).map(|t| t as u32);
        if let Some(tli) = timeline.filter(|&t| t > 1 && !in_recovery) {
            if self.meta.history.as_ref().is_none_or(|(t, _)| *t != tli) {
                let entries = match client.query_one(HISTORY_SQL, &[&(tli as i32)]).await {
                    Ok(row) => {
                        let entries = parse_timeline_history(row.get::<_, &str>(0));
                        info!(node = %self.target.name, timeline = tli, ?entries, "timeline history read");
                        entries
                    }
                    Err(e) if e.is_closed() => return Err(describe(&e)),
                    Err(e) => {
                        warn!(
                            node = %self.target.name,
                            timeline = tli,
                            error = %describe(&e),
                            "cannot read the timeline history; writes lost in a failover are \
                             detected only while ahead of the primary's position"
                        );
                        Vec::new()
                    }
                };
                self.meta.history = Some((tli, entries));
            }
        }
        Ok(Probe {
            in_recovery,
            lsn,
            timeline,
            sent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_history_is_parsed() {
        let text = "1\t0/3000060\tno recovery target specified\n\n\
                    2\t1/A0000D8\tbefore 2024-01-01 00:00:00+00\n";
        assert_eq!(
            parse_timeline_history(text),
            vec![(1, Lsn(0x300_0060)), (2, Lsn(0x1_0A00_00D8))]
        );
        assert!(parse_timeline_history("garbage\n").is_empty());
    }
}
