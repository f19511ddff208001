//! The routing decision alone: [`Router::route`] on hand-built [`Topology`]
//! snapshots with 1, 3 and 10 replicas, no I/O.
//!
//! Run with:
//!
//! ```text
//! cargo bench --bench routing
//! ```
//!
//! Cases, each for 1, 3 and 10 healthy replicas:
//!
//! * `ryw_token_hit`: read-your-writes with a token every replica has
//!   reached (the common case: round robin over all of them);
//! * `ryw_token_some`: a token only the last replica has reached (one
//!   eligible replica);
//! * `ryw_token_none`: a token no replica has reached in the snapshot (the
//!   "check the most advanced replica in the same round trip" path);
//! * `ryw_no_token`, `eventual`: any healthy replica;
//! * `bounded_staleness`: replicas within the lag bound, token honoured;
//! * `primary_after_write`: the time-window heuristic, outside its window;
//! * `least_outstanding`: read-your-writes with the least-outstanding
//!   balancer instead of round robin.
//!
//! The target is well under 1 µs per decision. Results are in
//! `BENCHMARKS.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lagrouter::{Consistency, LoadBalance, Lsn, NodeState, ReadContext, Role, Router, Topology};

/// A healthy primary at LSN 1_000_000 and `replicas` healthy replicas, the
/// `k`-th of which has replayed up to `1_000_000 - (replicas - 1 - k) * 100`
/// (so the last one is fully caught up) with a lag of a few milliseconds.
fn topology(replicas: usize) -> Topology {
    let mut primary = NodeState::new("primary", Role::Primary);
    primary.healthy = true;
    primary.lsn = Some(Lsn(1_000_000));
    primary.lag_bytes = Some(0);
    primary.lag = Some(Duration::ZERO);
    let mut nodes = vec![primary];
    for k in 0..replicas {
        let behind = (replicas - 1 - k) as u64 * 100;
        let mut n = NodeState::new(format!("replica{}", k + 1), Role::Replica);
        n.healthy = true;
        n.lsn = Some(Lsn(1_000_000 - behind));
        n.lag_bytes = Some(behind);
        n.lag = Some(Duration::from_millis(behind / 100));
        nodes.push(n);
    }
    let mut t = Topology::initial(nodes);
    t.primary_lsn = Some(Lsn(1_000_000));
    t
}

fn bench_route(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));

    let ryw = Consistency::read_your_writes(Duration::from_millis(100));
    let old_write = Instant::now() - Duration::from_secs(10);
    for replicas in [1usize, 3, 10] {
        let topo = topology(replicas);
        let lowest = Lsn(1_000_000 - (replicas as u64 - 1) * 100);
        let cases: [(&str, Consistency, ReadContext<'static>, LoadBalance); 8] = [
            (
                "ryw_token_hit",
                ryw,
                ReadContext {
                    token: Some(lowest),
                    ..Default::default()
                },
                LoadBalance::RoundRobin,
            ),
            (
                "ryw_token_some",
                ryw,
                ReadContext {
                    token: Some(Lsn(1_000_000)),
                    ..Default::default()
                },
                LoadBalance::RoundRobin,
            ),
            (
                "ryw_token_none",
                ryw,
                ReadContext {
                    token: Some(Lsn(1_000_001)),
                    ..Default::default()
                },
                LoadBalance::RoundRobin,
            ),
            (
                "ryw_no_token",
                ryw,
                ReadContext::default(),
                LoadBalance::RoundRobin,
            ),
            (
                "eventual",
                Consistency::Eventual,
                ReadContext::default(),
                LoadBalance::RoundRobin,
            ),
            (
                "bounded_staleness",
                Consistency::BoundedStaleness(Duration::from_millis(100)),
                ReadContext {
                    token: Some(lowest),
                    ..Default::default()
                },
                LoadBalance::RoundRobin,
            ),
            (
                "primary_after_write",
                Consistency::PrimaryAfterWrite(Duration::from_millis(20)),
                ReadContext {
                    last_write: Some(old_write),
                    ..Default::default()
                },
                LoadBalance::RoundRobin,
            ),
            (
                "least_outstanding",
                ryw,
                ReadContext {
                    token: Some(lowest),
                    ..Default::default()
                },
                LoadBalance::LeastOutstanding,
            ),
        ];
        for (name, policy, cx, balance) in cases {
            let router = Router::new(replicas + 1, balance);
            group.bench_with_input(BenchmarkId::new(name, replicas), &replicas, |b, _| {
                b.iter(|| router.route(black_box(&topo), black_box(&policy), black_box(&cx)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
