//! The lag monitor: watches every node's WAL position, role and health in
//! the background and publishes [`Topology`](crate::Topology) snapshots.

mod history;
mod lag_monitor;
mod node_probe;
mod snapshot;

pub use lag_monitor::{LagMonitor, MonitorConfig, MonitorTarget};
