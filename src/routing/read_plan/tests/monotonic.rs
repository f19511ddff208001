//! Monotonic reads without a position probe after each read: the session
//! stays on the node of its last read until the monitor has sampled that
//! node after the read (a floor), then goes anywhere that has the floor.

use super::*;

/// The topology of [`topo`], every node sampled at `sampled` (epoch 0).
fn sampled(replicas: &[(u64, u64, bool)], sampled: Instant) -> Topology {
    let mut t = topo(replicas);
    for n in &mut t.nodes {
        n.sampled_at = Some(sampled);
    }
    t
}

/// The last read ran on `node` in epoch 0 and ended at `ended`.
fn last(node: usize, ended: Instant) -> LastRead {
    LastRead {
        node,
        epoch: 0,
        ended,
        captured: None,
        next: None,
    }
}

/// A replica run on `node` that captures its position for a move to
/// `next`.
fn capturing(node: usize) -> Step {
    Step::Run(Run {
        node,
        primary: false,
        check: None,
        verify: None,
        retryable: true,
        capture: true,
    })
}

/// A monotonic-read case: the topology is sampled `sample_ms` after the
/// last read ended (negative: before it).
struct Mono {
    name: &'static str,
    policy: Consistency,
    token: Option<ConsistencyToken>,
    last_node: usize,
    sample_ms: i64,
    replicas: &'static [(u64, u64, bool)],
    /// Changes to the topology (e.g. a new epoch).
    adjust: fn(&mut Topology),
    /// The last read captured this position and wanted to move here.
    captured: Option<(u64, usize)>,
    first: Step,
    script: Vec<(u64, Outcome, Step)>,
}

fn run_mono(c: Mono) {
    let t0 = Instant::now() + ms(1000);
    let ended = t0 - ms(100);
    let at = if c.sample_ms >= 0 {
        ended + ms(c.sample_ms as u64)
    } else {
        ended - ms(c.sample_ms.unsigned_abs())
    };
    let mut t = sampled(c.replicas, at);
    (c.adjust)(&mut t);
    let router = Router::new(t.nodes.len(), LoadBalance::RoundRobin);
    let mut last_read = last(c.last_node, ended);
    if let Some((lsn, next)) = c.captured {
        last_read.captured = Some(Lsn(lsn));
        last_read.next = Some(next);
    }
    let request = ReadRequest {
        last_read: Some(last_read),
        ..req(c.policy, c.token)
    };
    let mut plan = ReadPlan::new(request, t0);
    assert_same(c.name, 0, &plan.start(&t, &router, t0), &c.first);
    for (k, (at_ms, outcome, want)) in c.script.into_iter().enumerate() {
        let got = plan.feed(&t, &router, outcome, t0 + ms(at_ms));
        assert_same(c.name, k + 1, &got, &want);
    }
}

fn no_change(_: &mut Topology) {}

fn run_of(step: Step) -> Run {
    match step {
        Step::Run(r) => r,
        _ => unreachable!(),
    }
}

fn served(node: usize) -> Served {
    match done(node, None, 0, false) {
        Step::Done(s) => s,
        _ => unreachable!(),
    }
}

#[test]
fn monotonic_reads_table() {
    use FallbackReason::*;
    let rr = ryw(50, Fallback::Primary);
    let two: &[(u64, u64, bool)] = &[(980, 5, true), (990, 5, true)];
    let cases = vec![
        Mono {
            name: "no sample since the read: stays on its node, no probe",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: -1,
            replicas: two,
            adjust: no_change,
            captured: None,
            first: replica(2),
            script: vec![(1, ran(None), done(2, None, 0, false))],
        },
        Mono {
            name: "stays, and checks a write token its node lacks",
            policy: rr,
            token: tok(995),
            last_node: 1,
            sample_ms: -1,
            replicas: two,
            adjust: no_change,
            captured: None,
            // Replica 2 is further ahead: this run also captures the
            // position, for a move there.
            first: Step::Run(Run {
                capture: true,
                ..run_of(checked(1, 995))
            }),
            script: vec![
                (1, ran(at(990, true)), poll(1, 0)),
                (2, polled(995), replica(1)),
            ],
        },
        Mono {
            name: "its node was ejected: the primary, which has everything",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: -1,
            replicas: &[(980, 5, true), (990, 5, false)],
            adjust: no_change,
            captured: None,
            first: primary(None),
            script: vec![(1, ran(None), done(0, Some(NoReplica), 0, false))],
        },
        Mono {
            name: "its node failed since (new epoch): the primary",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: 5,
            replicas: two,
            adjust: |t| t.nodes[2].epoch = 1,
            captured: None,
            first: primary(None),
            script: vec![],
        },
        Mono {
            name: "the read fails on its node: the primary",
            policy: rr,
            token: None,
            last_node: 1,
            sample_ms: -1,
            replicas: two,
            adjust: no_change,
            captured: None,
            first: replica(1),
            script: vec![
                (1, failed(Failure::Connection), primary(None)),
                (2, ran(None), done(0, Some(ReplicaError), 0, false)),
            ],
        },
        Mono {
            name: "sampled after the read: its position is a floor, the lagging replica is out",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: 1,
            replicas: two,
            adjust: |t| t.nodes[2].lsn = Some(Lsn(985)),
            captured: None,
            first: replica(2),
            script: vec![],
        },
        Mono {
            name: "a floor the other replica has: routing is free again",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: 1,
            replicas: &[(990, 5, true), (990, 5, true)],
            adjust: no_change,
            captured: None,
            first: replica(1),
            script: vec![],
        },
        Mono {
            name: "floor known, its node ejected since: check the other one",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: 1,
            replicas: &[(980, 5, true), (990, 5, true)],
            adjust: |t| t.nodes[2].healthy = false,
            captured: None,
            first: checked(1, 990),
            script: vec![(1, ran(at(980, true)), poll(1, 0))],
        },
        Mono {
            name: "a write token newer than the floor wins",
            policy: rr,
            token: tok(1000),
            last_node: 2,
            sample_ms: 1,
            replicas: two,
            adjust: no_change,
            captured: None,
            first: checked(2, 1000),
            script: vec![],
        },
        Mono {
            name: "last read on the primary, not sampled since: the primary again",
            policy: rr,
            token: None,
            last_node: 0,
            sample_ms: -1,
            replicas: two,
            adjust: no_change,
            captured: None,
            first: primary(None),
            script: vec![(1, ran(None), done(0, None, 0, false))],
        },
        Mono {
            name: "last read on the primary, sampled since: replicas that reached it",
            policy: rr,
            token: None,
            last_node: 0,
            sample_ms: 1,
            replicas: &[(1000, 0, true), (990, 5, true)],
            adjust: no_change,
            captured: None,
            first: replica(1),
            script: vec![],
        },
        Mono {
            name: "bounded staleness: its node too stale, the primary",
            policy: Consistency::BoundedStaleness(ms(10)),
            token: None,
            last_node: 2,
            sample_ms: -1,
            replicas: &[(980, 5, true), (990, 50, true)],
            adjust: no_change,
            captured: None,
            first: primary(None),
            script: vec![],
        },
        Mono {
            name: "its node is gone from the configuration: the primary",
            policy: Consistency::BoundedStaleness(ms(10)),
            token: None,
            last_node: 9,
            sample_ms: -1,
            replicas: two,
            adjust: no_change,
            captured: None,
            first: primary(None),
            script: vec![],
        },
        Mono {
            name: "eventual reads ignore the last read",
            policy: Consistency::Eventual,
            token: None,
            last_node: 2,
            sample_ms: -1,
            replicas: two,
            adjust: no_change,
            captured: None,
            first: replica(1),
            script: vec![],
        },
        Mono {
            name: "the router prefers a replica further ahead: stay, capture, move next",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: -1,
            replicas: &[(990, 5, true), (980, 5, true)],
            adjust: no_change,
            captured: None,
            first: capturing(2),
            script: vec![(
                1,
                ran(None),
                Step::Done(Served {
                    next: Some(1),
                    ..served(2)
                }),
            )],
        },
        Mono {
            name: "the captured floor: the next read moves where it wanted to",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: -1,
            replicas: &[(990, 5, true), (980, 5, true)],
            adjust: no_change,
            captured: Some((985, 1)),
            first: replica(1),
            script: vec![],
        },
        Mono {
            name: "a captured floor the wanted replica lacks: routed by it",
            policy: rr,
            token: None,
            last_node: 2,
            sample_ms: -1,
            replicas: &[(990, 5, true), (995, 5, true)],
            adjust: no_change,
            captured: Some((995, 1)),
            first: replica(2),
            script: vec![],
        },
        Mono {
            name: "a write covers the last read: its node again, checked for the token",
            policy: rr,
            token: tok(995),
            last_node: 2,
            sample_ms: -1,
            replicas: two,
            adjust: no_change,
            captured: Some((0, 2)),
            first: checked(2, 995),
            script: vec![],
        },
        Mono {
            name: "a write covers the last read, whose node is behind: routed as usual",
            policy: rr,
            token: tok(995),
            last_node: 2,
            sample_ms: -1,
            replicas: &[(990, 5, true), (980, 5, true)],
            adjust: no_change,
            captured: Some((0, 2)),
            first: checked(1, 995),
            script: vec![],
        },
    ];
    for c in cases {
        run_mono(c);
    }
}

#[test]
fn served_carries_the_epoch_it_was_routed_by() {
    let t0 = Instant::now();
    let mut t = sampled(&[(990, 5, true)], t0);
    t.nodes[1].epoch = 7;
    let router = Router::new(2, LoadBalance::RoundRobin);
    let mut plan = ReadPlan::new(req(ryw(50, Fallback::Primary), None), t0);
    assert_eq!(plan.start(&t, &router, t0), replica(1));
    // A failure seen meanwhile does not relabel the read.
    let mut later = t.clone();
    later.nodes[1].epoch = 8;
    match plan.feed(&later, &router, ran(None), t0 + MS) {
        Step::Done(served) => {
            assert_eq!(served.epoch, 7);
            let last = LastRead::new(&served, t0 + MS);
            assert_eq!(
                last.with_floor(Some(Lsn(991))).floor(&later),
                Some(Lsn(991)),
                "a position captured on the read's connection needs no sample"
            );
            assert_eq!(last.floor(&later), None, "another epoch");
            let mut resampled = t.clone();
            resampled.nodes[1].sampled_at = Some(t0 + ms(2));
            assert_eq!(last.floor(&resampled), Some(Lsn(990)));
            resampled.nodes[1].sampled_at = Some(t0 + MS);
            assert_eq!(last.floor(&resampled), None, "not after the read");
        }
        other => panic!("{other:?}"),
    }
}
