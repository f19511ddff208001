//! The position probe: the SQL that reads a node's WAL position, parsing its
//! reply, and turning a reply into a [`ConsistencyToken`]. The library and
//! the proxy both use this module, and nothing else reads positions.

use crate::model::lsn::Lsn;
use crate::model::token::{ClusterId, ConsistencyToken};
use crate::model::topology::Topology;

/// Reads a node's position: `(in_recovery, lsn, timeline)`.
///
/// On a replica the position is `pg_last_wal_replay_lsn()`; on the primary
/// `pg_current_wal_insert_lsn()`. Pipelined after a statement, the
/// statement's effects (or the data it read) are at or before it; pipelined
/// before a read on a replica, the read's snapshot is at or after it (replay
/// only moves forward).
///
/// The third column is the node's own timeline: the primary's insert
/// timeline, or the timeline a replica's WAL receiver streams (NULL when it
/// is not streaming or the user may not see `pg_stat_wal_receiver`). Tokens
/// are labelled with it rather than with the monitor's last view, which can
/// lag behind a promotion. `pg_is_in_recovery()` is read once, so the three
/// columns agree even while the node is being promoted.
pub const POSITION_SQL: &str = "SELECT r, \
     (CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text, \
     CASE WHEN r THEN (SELECT received_tli FROM pg_stat_wal_receiver) \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int END \
     FROM (SELECT pg_is_in_recovery() AS r) AS s";

/// A node's position, as read by [`POSITION_SQL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Position {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// Replay position (replica) or insert position (primary).
    pub lsn: Option<Lsn>,
    /// The node's timeline, when it could be read.
    pub timeline: Option<u32>,
}

impl Position {
    /// Parses the probe's columns in text format (a `DataRow` of the simple
    /// protocol, or of the extended one with text results). Missing or
    /// malformed columns read as unknown.
    pub fn from_text<S: AsRef<str>>(cols: &[Option<S>]) -> Position {
        let col = |i: usize| cols.get(i).and_then(|c| c.as_ref()).map(AsRef::as_ref);
        Position {
            in_recovery: matches!(col(0), Some("t" | "true")),
            lsn: col(1).and_then(|s| s.parse().ok()),
            timeline: col(2)
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(|t| u32::try_from(t).ok())
                .filter(|&t| t > 0),
        }
    }

    /// Parses a row of [`POSITION_SQL`] as tokio-postgres returns it.
    pub fn from_row(row: &tokio_postgres::Row) -> Position {
        let in_recovery = row.try_get::<_, bool>(0).unwrap_or(false);
        let lsn = row
            .try_get::<_, Option<&str>>(1)
            .ok()
            .flatten()
            .and_then(|s| s.parse::<Lsn>().ok());
        let timeline = row
            .try_get::<_, Option<i32>>(2)
            .ok()
            .flatten()
            .and_then(|t| u32::try_from(t).ok())
            .filter(|&t| t > 0);
        Position {
            in_recovery,
            lsn,
            timeline,
        }
    }

    /// The token for what this position covers: rounded down to a record
    /// boundary on a primary (an insert position can point just past a page
    /// header, where no replica ever reports being), labelled with the
    /// node's own timeline when it reported one, else the primary's as last
    /// probed. `None` without a position.
    pub fn token(self, topo: &Topology) -> Option<ConsistencyToken> {
        let lsn = self.lsn?;
        let lsn = if self.in_recovery {
            lsn
        } else {
            lsn.round_to_record_boundary(topo.wal_segment_size)
        };
        let id = topo.cluster.unwrap_or(ClusterId {
            system_identifier: 0,
            timeline: 1,
        });
        let timeline = self.timeline.unwrap_or(id.timeline);
        Some(ConsistencyToken::new(lsn, id.system_identifier, timeline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::topology::{NodeState, Role};

    fn topo(timeline: u32) -> Topology {
        let mut t = Topology::initial(vec![NodeState::new("p", Role::Primary)]);
        t.cluster = Some(ClusterId {
            system_identifier: 7,
            timeline,
        });
        t
    }

    #[test]
    fn parses_text_columns() {
        let p = Position::from_text(&[Some("f"), Some("0/3000060"), Some("2")]);
        assert_eq!(
            p,
            Position {
                in_recovery: false,
                lsn: Some("0/3000060".parse().unwrap()),
                timeline: Some(2)
            }
        );
        let r = Position::from_text(&[Some("t"), None, None::<&str>]);
        assert!(r.in_recovery);
        assert_eq!((r.lsn, r.timeline), (None, None));
        assert_eq!(
            Position::from_text(&[Some("t"), Some("junk"), Some("-1")]),
            Position {
                in_recovery: true,
                lsn: None,
                timeline: None
            }
        );
        assert_eq!(Position::from_text::<&str>(&[]), Position::default());
    }

    #[test]
    fn tokens_carry_the_nodes_own_timeline() {
        // The monitor still believes timeline 1; the node says 2 (promoted).
        let pos = Position::from_text(&[Some("f"), Some("0/5000100"), Some("2")]);
        let t = pos.token(&topo(1)).unwrap();
        assert_eq!(t.cluster.timeline, 2);
        assert_eq!(t.cluster.system_identifier, 7);
        // Without a reported timeline, the monitor's is the best there is.
        let pos = Position::from_text(&[Some("t"), Some("0/5000100"), None]);
        assert_eq!(pos.token(&topo(3)).unwrap().cluster.timeline, 3);
        assert_eq!(Position::default().token(&topo(1)), None);
    }

    #[test]
    fn primary_positions_round_down_past_a_page_header() {
        // 0/2000018 is just past the 24-byte header of a page that is not a
        // segment start: the last record ended at the page boundary.
        let pos = Position::from_text(&[Some("f"), Some("0/2002018"), Some("1")]);
        let t = pos.token(&topo(1)).unwrap();
        assert_eq!(t.lsn, "0/2002000".parse().unwrap());
        // A replica's replay position is a record end already.
        let pos = Position::from_text(&[Some("t"), Some("0/2002018"), Some("1")]);
        assert_eq!(
            pos.token(&topo(1)).unwrap().lsn,
            "0/2002018".parse().unwrap()
        );
    }
}
