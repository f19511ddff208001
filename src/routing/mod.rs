//! Routing: which node may serve a read ([`Router`], from a topology
//! snapshot alone) and the read engine that drives a read to its end
//! ([`ReadPlan`]); no I/O, no locks.

pub mod read_plan;
mod router;

pub use read_plan::{
    Failure, FallbackReason, LastRead, Outcome, PlanError, ReadPlan, ReadRequest, Run, Served, Step,
};
pub use router::{InFlight, LoadBalance, ReadContext, Route, Router};
