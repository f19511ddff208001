//! The last few minutes of replication lag per node, sampled once a second
//! by the proxy's gauge task, for the status page's sparklines (served in
//! `/status` as `history`).
#![warn(missing_docs)]

use std::collections::VecDeque;

use serde::Serialize;

/// Samples kept: five minutes at one a second.
pub const HISTORY_SAMPLES: usize = 300;

/// One node's lag samples, oldest first (`null` when unknown).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeHistory {
    /// The node's name.
    pub name: String,
    /// Lag in bytes.
    pub lag_bytes: Vec<Option<u64>>,
    /// Lag in seconds.
    pub lag_seconds: Vec<Option<f64>>,
}

/// A ring of lag samples for every node.
#[derive(Debug)]
pub struct LagHistory {
    names: Vec<String>,
    samples: VecDeque<Vec<(Option<u64>, Option<f64>)>>,
    capacity: usize,
}

impl LagHistory {
    /// An empty history of `names`' lag, keeping `capacity` samples.
    pub fn new(names: Vec<String>, capacity: usize) -> Self {
        LagHistory {
            names,
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Adds one sample: each node's (bytes, seconds), in node order.
    pub fn record(&mut self, sample: Vec<(Option<u64>, Option<f64>)>) {
        if self.capacity == 0 {
            return;
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Per node, its samples oldest first.
    pub fn per_node(&self) -> Vec<NodeHistory> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, name)| NodeHistory {
                name: name.clone(),
                lag_bytes: self
                    .samples
                    .iter()
                    .map(|s| s.get(i).and_then(|x| x.0))
                    .collect(),
                lag_seconds: self
                    .samples
                    .iter()
                    .map(|s| s.get(i).and_then(|x| x.1))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_samples_per_node() {
        let mut h = LagHistory::new(vec!["p".into(), "r".into()], 3);
        for i in 0..5u64 {
            h.record(vec![(Some(0), Some(0.0)), (Some(i), Some(i as f64 / 10.0))]);
        }
        let nodes = h.per_node();
        assert_eq!(nodes[1].name, "r");
        assert_eq!(nodes[1].lag_bytes, [Some(2), Some(3), Some(4)]);
        assert_eq!(nodes[1].lag_seconds, [Some(0.2), Some(0.3), Some(0.4)]);
        assert_eq!(nodes[0].lag_bytes.len(), 3);
    }

    #[test]
    fn short_samples_read_as_unknown() {
        let mut h = LagHistory::new(vec!["p".into(), "r".into()], 2);
        h.record(vec![(Some(1), None)]);
        assert_eq!(h.per_node()[1].lag_bytes, [None]);
        let mut none = LagHistory::new(vec!["p".into()], 0);
        none.record(vec![(Some(1), None)]);
        assert!(none.per_node()[0].lag_bytes.is_empty());
    }
}
