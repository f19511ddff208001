//! The proxy's routing decision for one unit of work, on top of the
//! routing library ([`lagrouter::Router`]): which node serves a read given
//! the policy, the session's token and the current topology.

use std::time::Instant;

use lagrouter::{Consistency, Lsn, ReadContext, Route, Router, Topology};

/// Where a unit of work goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The current primary.
    Primary,
    /// A replica already known (from the topology snapshot) to be fresh
    /// enough.
    Replica(usize),
    /// The most advanced replica, not yet known to have reached the token:
    /// its position is checked in the same round trip as the read.
    ReplicaIfCaughtUp(usize),
}

impl From<Route> for Target {
    fn from(r: Route) -> Self {
        match r {
            Route::Primary => Target::Primary,
            Route::Replica(i) => Target::Replica(i),
            Route::ReplicaIfCaughtUp(i) => Target::ReplicaIfCaughtUp(i),
        }
    }
}

/// Routes a read with the library's [`Router`]: `token` is the position
/// the session must see, `exclude` nodes that already failed this read.
pub fn route_read(
    topo: &Topology,
    router: &Router,
    policy: &Consistency,
    token: Option<Lsn>,
    last_write: Option<Instant>,
    exclude: &[usize],
) -> Target {
    let cx = ReadContext {
        token: if policy.uses_token() { token } else { None },
        last_write,
        exclude,
    };
    let target = Target::from(router.route(topo, policy, &cx));
    match target {
        Target::Replica(i) | Target::ReplicaIfCaughtUp(i) if exclude.contains(&i) => {
            Target::Primary
        }
        // ReplicaIfCaughtUp needs a token to compare with.
        Target::ReplicaIfCaughtUp(i) if cx.token.is_none() => Target::Replica(i),
        t => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lagrouter::{LoadBalance, NodeState, Role};
    use std::time::Duration;

    fn topo() -> Topology {
        let mut p = NodeState::new("p", Role::Primary);
        p.healthy = true;
        p.lsn = Some(Lsn(1000));
        let mut r = NodeState::new("r", Role::Replica);
        r.healthy = true;
        r.lsn = Some(Lsn(900));
        r.lag = Some(Duration::from_millis(5));
        let mut t = Topology::initial(vec![p, r]);
        t.primary_lsn = Some(Lsn(1000));
        t
    }

    #[test]
    fn tokens_gate_replicas() {
        let t = topo();
        let router = Router::new(2, LoadBalance::RoundRobin);
        let ryw = Consistency::read_your_writes(Duration::from_millis(10));
        assert_eq!(
            route_read(&t, &router, &ryw, None, None, &[]),
            Target::Replica(1)
        );
        assert_eq!(
            route_read(&t, &router, &ryw, Some(Lsn(800)), None, &[]),
            Target::Replica(1)
        );
        assert_eq!(
            route_read(&t, &router, &ryw, Some(Lsn(950)), None, &[]),
            Target::ReplicaIfCaughtUp(1)
        );
        assert_eq!(
            route_read(&t, &router, &ryw, Some(Lsn(950)), None, &[1]),
            Target::Primary
        );
        assert_eq!(
            route_read(&t, &router, &Consistency::Primary, None, None, &[]),
            Target::Primary
        );
    }
}
