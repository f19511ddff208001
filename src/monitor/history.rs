//! The primary's WAL position history, and lag in time computed from it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::model::lsn::Lsn;

/// History of the primary's WAL positions, for lag in time.
pub(super) struct LsnHistory {
    pub(super) samples: VecDeque<(Instant, Lsn)>,
}

const HISTORY_LEN: usize = 4096;

impl LsnHistory {
    pub(super) fn push(&mut self, at: Instant, lsn: Lsn) {
        if let Some(&(_, last)) = self.samples.back() {
            if lsn < last {
                // A new primary with a lower position (failover): start over.
                self.samples.clear();
            }
        }
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back((at, lsn));
    }

    /// Upper bound on the staleness of a node that replayed up to `replayed`.
    pub(super) fn lag(&self, replayed: Lsn, now: Instant) -> Option<Duration> {
        let &(_, newest) = self.samples.back()?;
        if replayed >= newest {
            return Some(Duration::ZERO);
        }
        // The last time the primary was still at or below `replayed`: every
        // write the replica misses was made after it.
        match self.samples.iter().rev().find(|(_, l)| *l <= replayed) {
            Some(&(t, _)) => Some(now.saturating_duration_since(t)),
            None => self
                .samples
                .front()
                .map(|&(t, _)| now.saturating_duration_since(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up_and_bounded_otherwise() {
        let t0 = Instant::now();
        let mut h = LsnHistory {
            samples: VecDeque::new(),
        };
        h.push(t0, Lsn(100));
        h.push(t0 + Duration::from_millis(100), Lsn(100));
        h.push(t0 + Duration::from_millis(200), Lsn(300));
        let now = t0 + Duration::from_millis(250);
        assert_eq!(h.lag(Lsn(300), now), Some(Duration::ZERO));
        assert_eq!(h.lag(Lsn(400), now), Some(Duration::ZERO));
        // Replayed 100: the primary was last at 100 at t0+100ms.
        assert_eq!(h.lag(Lsn(100), now), Some(Duration::from_millis(150)));
        // Older than all history: bounded by the oldest sample.
        assert_eq!(h.lag(Lsn(50), now), Some(Duration::from_millis(250)));
    }

    #[test]
    fn history_restarts_when_position_goes_back() {
        let t0 = Instant::now();
        let mut h = LsnHistory {
            samples: VecDeque::new(),
        };
        h.push(t0, Lsn(500));
        h.push(t0, Lsn(10));
        assert_eq!(h.samples.len(), 1);
    }
}
