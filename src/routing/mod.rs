//! Routing: which node may serve a read, decided from a topology snapshot
//! alone (no I/O, no locks).

mod router;

pub use router::{InFlight, LoadBalance, ReadContext, Route, Router};
