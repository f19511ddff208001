//! Table tests of the read engine: a topology, a request, then a script of
//! outcomes (at given instants) and the step each must produce.

use std::time::{Duration, Instant};

use super::*;
use crate::model::token::ClusterId;
use crate::routing::LoadBalance;

const MS: Duration = Duration::from_millis(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const SYSID: u64 = 42;

/// The router tests' topology (primary at 1000, then replicas `(lsn,
/// lag_ms, healthy)`), with a known cluster identity.
fn topo(replicas: &[(u64, u64, bool)]) -> Topology {
    let mut t = crate::routing::router::tests::topo(replicas);
    t.cluster = Some(ClusterId {
        system_identifier: SYSID,
        timeline: 1,
    });
    t
}

fn tok(lsn: u64) -> Option<ConsistencyToken> {
    Some(ConsistencyToken::new(Lsn(lsn), SYSID, 1))
}

fn ryw(max_ms: u64, then: Fallback) -> Consistency {
    Consistency::ReadYourWrites {
        max_wait: ms(max_ms),
        then,
    }
}

fn replica(node: usize) -> Step {
    Step::Run(Run {
        node,
        primary: false,
        check: None,
        verify: None,
        retryable: true,
        capture: false,
    })
}

fn checked(node: usize, lsn: u64) -> Step {
    Step::Run(Run {
        node,
        primary: false,
        check: Some(Lsn(lsn)),
        verify: None,
        retryable: true,
        capture: false,
    })
}

/// A read on the primary under a policy without tokens.
fn plain_primary(verify: Option<u64>) -> Step {
    match primary(verify) {
        Step::Run(r) => Step::Run(Run {
            capture: false,
            ..r
        }),
        other => other,
    }
}

/// A read on the primary (policies with tokens: its position captured
/// after it, the floor of the session's next read).
fn primary(verify: Option<u64>) -> Step {
    Step::Run(Run {
        node: 0,
        primary: true,
        check: None,
        verify: verify.map(Lsn),
        retryable: false,
        capture: true,
    })
}

fn poll(node: usize, after_ms: u64) -> Step {
    Step::Poll {
        node,
        after: ms(after_ms),
    }
}

fn done(node: usize, fallback: Option<FallbackReason>, waited_ms: u64, token_wait: bool) -> Step {
    Step::Done(Served {
        node,
        primary: node == 0,
        fallback,
        waited: ms(waited_ms),
        token_wait,
        epoch: 0,
        next: None,
    })
}

fn at(lsn: u64, in_recovery: bool) -> Option<Position> {
    Some(Position {
        in_recovery,
        lsn: Some(Lsn(lsn)),
        timeline: Some(1),
    })
}

fn ran(position: Option<Position>) -> Outcome {
    Outcome::Ran {
        position,
        empty: false,
    }
}

fn polled(lsn: u64) -> Outcome {
    Outcome::Polled(at(lsn, true).unwrap())
}

fn failed(f: Failure) -> Outcome {
    Outcome::Failed(f)
}

/// A read: the request, the topology, the expected first step and the
/// script of `(ms since start, outcome, expected step)`.
struct Case {
    name: &'static str,
    req: ReadRequest,
    topo: Topology,
    first: Step,
    script: Vec<(u64, Outcome, Step)>,
}

fn req(policy: Consistency, token: Option<ConsistencyToken>) -> ReadRequest {
    ReadRequest::new(policy, token)
}

fn code(step: &Step) -> Option<String> {
    match step {
        Step::Fail(Some(e)) => Error::from(e.clone()).code().map(str::to_string),
        _ => None,
    }
}

fn run_case(c: Case) {
    let t0 = Instant::now();
    let router = Router::new(c.topo.nodes.len(), LoadBalance::RoundRobin);
    let mut plan = ReadPlan::new(c.req, t0);
    let first = plan.start(&c.topo, &router, t0);
    assert_same(c.name, 0, &first, &c.first);
    for (k, (at_ms, outcome, want)) in c.script.into_iter().enumerate() {
        let got = plan.feed(&c.topo, &router, outcome, t0 + ms(at_ms));
        assert_same(c.name, k + 1, &got, &want);
    }
}

fn assert_same(name: &str, k: usize, got: &Step, want: &Step) {
    assert_eq!(got, want, "{name}, step {k}");
}

#[test]
fn routing_table() {
    use FallbackReason::*;
    let cases = vec![
        Case {
            name: "no token: any replica, no check",
            req: req(ryw(50, Fallback::Primary), None),
            topo: topo(&[(900, 10, true)]),
            first: replica(1),
            script: vec![(1, ran(None), done(1, None, 0, false))],
        },
        Case {
            name: "a replica known to have the token",
            req: req(ryw(50, Fallback::Primary), tok(950)),
            topo: topo(&[(900, 10, true), (1000, 0, true)]),
            first: replica(2),
            script: vec![(1, ran(None), done(2, None, 0, false))],
        },
        Case {
            name: "check in the read's round trip passes",
            req: req(ryw(50, Fallback::Primary), tok(1000)),
            topo: topo(&[(900, 10, true), (950, 5, true)]),
            first: checked(2, 1000),
            script: vec![(3, ran(at(1000, true)), done(2, None, 3, false))],
        },
        Case {
            name: "check fails, polls double, the replica catches up",
            req: req(ryw(50, Fallback::Primary), tok(1000)),
            topo: topo(&[(950, 5, true)]),
            first: checked(1, 1000),
            script: vec![
                (1, ran(at(990, true)), poll(1, 0)),
                (1, polled(990), poll(1, 2)),
                (3, polled(995), poll(1, 4)),
                (7, polled(999), poll(1, 8)),
                (15, polled(999), poll(1, 16)),
                (31, polled(999), poll(1, 16)),
                (47, polled(1000), replica(1)),
                (48, ran(None), done(1, None, 48, true)),
            ],
        },
        Case {
            name: "wait times out: primary, which must have the token",
            req: req(ryw(10, Fallback::Primary), tok(1000)),
            topo: topo(&[(950, 5, true)]),
            first: checked(1, 1000),
            script: vec![
                (1, ran(at(990, true)), poll(1, 0)),
                (2, polled(990), poll(1, 2)),
                (10, polled(990), primary(Some(1000))),
                (
                    11,
                    ran(at(1000, false)),
                    done(0, Some(WaitTimeout), 11, true),
                ),
            ],
        },
        Case {
            name: "token ahead of the primary: lost writes or forged",
            req: req(ryw(0, Fallback::Primary), tok(5000)),
            topo: topo(&[(950, 5, true)]),
            first: checked(1, 5000),
            script: vec![
                (1, ran(at(990, true)), primary(Some(5000))),
                (
                    2,
                    ran(at(1000, false)),
                    Step::Fail(Some(PlanError::TokenAhead {
                        token: Lsn(5000),
                        primary: Lsn(1000),
                    })),
                ),
            ],
        },
        Case {
            name: "then = error: 57014 after max_wait",
            req: req(ryw(5, Fallback::Error), tok(1000)),
            topo: topo(&[(950, 5, true)]),
            first: checked(1, 1000),
            script: vec![
                (1, ran(at(990, true)), poll(1, 0)),
                (
                    6,
                    polled(990),
                    Step::Fail(Some(PlanError::WaitTimeout {
                        token: Lsn(1000),
                        waited: ms(6),
                    })),
                ),
            ],
        },
        Case {
            name: "25006 on a replica: run it as a write",
            req: req(ryw(50, Fallback::Primary), None),
            topo: topo(&[(1000, 0, true)]),
            first: replica(1),
            script: vec![(
                1,
                failed(Failure::ReadOnly),
                Step::RunAsWrite {
                    fallback: ReadOnly,
                    waited: Duration::ZERO,
                },
            )],
        },
        Case {
            name: "25006 goes to the caller when replica retries are off",
            req: ReadRequest {
                retry_replica_errors: false,
                ..req(ryw(50, Fallback::Primary), None)
            },
            topo: topo(&[(1000, 0, true)]),
            first: replica(1),
            script: vec![(1, failed(Failure::ReadOnly), Step::Fail(None))],
        },
        Case {
            name: "recovery conflict: another replica, then the primary",
            req: req(Consistency::Eventual, None),
            topo: topo(&[(1000, 0, true), (1000, 0, true)]),
            first: replica(1),
            script: vec![
                (1, failed(Failure::RecoveryConflict), replica(2)),
                (2, failed(Failure::RecoveryConflict), plain_primary(None)),
                (3, ran(None), done(0, Some(RecoveryConflict), 0, false)),
            ],
        },
        Case {
            name: "lost connection or busy pool: elsewhere",
            req: req(Consistency::Eventual, None),
            topo: topo(&[(1000, 0, true), (1000, 0, true)]),
            first: replica(1),
            script: vec![
                (1, failed(Failure::Connection), replica(2)),
                (2, failed(Failure::PoolExhausted), plain_primary(None)),
                (3, ran(None), done(0, Some(ReplicaError), 0, false)),
            ],
        },
        Case {
            name: "node ejected mid-read",
            req: req(ryw(50, Fallback::Primary), tok(900)),
            topo: topo(&[(1000, 0, true)]),
            first: replica(1),
            script: vec![
                (1, failed(Failure::Ejected), primary(Some(900))),
                (
                    2,
                    ran(at(1000, false)),
                    done(0, Some(ReplicaError), 0, false),
                ),
            ],
        },
        Case {
            name: "the statement's own error goes to the caller",
            req: req(Consistency::Eventual, None),
            topo: topo(&[(1000, 0, true)]),
            first: replica(1),
            script: vec![(1, failed(Failure::Statement), Step::Fail(None))],
        },
        Case {
            name: "a failure on the primary goes to the caller",
            req: req(Consistency::Primary, None),
            topo: topo(&[(1000, 0, true)]),
            first: plain_primary(None),
            script: vec![(1, failed(Failure::Connection), Step::Fail(None))],
        },
        Case {
            name: "retry-on-miss",
            req: ReadRequest {
                retry_on_empty: true,
                ..req(ryw(50, Fallback::Primary), tok(900))
            },
            topo: topo(&[(1000, 0, true)]),
            first: replica(1),
            script: vec![
                (
                    1,
                    Outcome::Ran {
                        position: None,
                        empty: true,
                    },
                    primary(Some(900)),
                ),
                (
                    2,
                    Outcome::Ran {
                        position: at(1000, false),
                        empty: true,
                    },
                    done(0, Some(EmptyResult), 0, false),
                ),
            ],
        },
        Case {
            name: "no healthy replica",
            req: req(ryw(50, Fallback::Primary), None),
            topo: topo(&[(1000, 0, false)]),
            first: primary(None),
            script: vec![(1, ran(None), done(0, Some(NoReplica), 0, false))],
        },
        Case {
            name: "policy primary is no fallback",
            req: req(Consistency::Primary, tok(900)),
            topo: topo(&[(1000, 0, true)]),
            first: plain_primary(None),
            script: vec![(1, ran(None), done(0, None, 0, false))],
        },
        Case {
            name: "eventual ignores the token",
            req: req(Consistency::Eventual, tok(99_999)),
            topo: topo(&[(10, 60_000, true)]),
            first: replica(1),
            script: vec![],
        },
        Case {
            name: "bounded staleness: check a fresh replica, no wait",
            req: req(Consistency::BoundedStaleness(ms(100)), tok(995)),
            topo: topo(&[(500, 5_000, true), (990, 20, true)]),
            first: checked(2, 995),
            script: vec![
                (1, ran(at(990, true)), primary(Some(995))),
                (
                    2,
                    ran(at(1000, false)),
                    done(0, Some(WaitTimeout), 2, false),
                ),
            ],
        },
        Case {
            name: "primary-after-write window",
            req: ReadRequest {
                last_write: Some(Instant::now()),
                ..req(
                    Consistency::PrimaryAfterWrite(Duration::from_secs(60)),
                    None,
                )
            },
            topo: topo(&[(1000, 0, true)]),
            first: plain_primary(None),
            script: vec![],
        },
        Case {
            name: "a poll that fails moves the wait to the primary",
            req: req(ryw(50, Fallback::Primary), tok(1000)),
            topo: topo(&[(950, 5, true)]),
            first: checked(1, 1000),
            script: vec![
                (1, ran(at(990, true)), poll(1, 0)),
                (2, failed(Failure::Connection), primary(Some(1000))),
                (
                    3,
                    ran(at(1000, false)),
                    done(0, Some(ReplicaError), 3, true),
                ),
            ],
        },
        Case {
            name: "a token of another cluster: 22023",
            req: req(
                ryw(50, Fallback::Primary),
                Some(ConsistencyToken::new(Lsn(10), 7, 1)),
            ),
            topo: topo(&[(1000, 0, true)]),
            first: Step::Fail(Some(PlanError::Token(
                ConsistencyToken::new(Lsn(10), 7, 1)
                    .check_cluster(&ClusterId {
                        system_identifier: SYSID,
                        timeline: 1,
                    })
                    .unwrap_err(),
            ))),
            script: vec![],
        },
    ];
    for c in cases {
        run_case(c);
    }
}

#[test]
fn tokens_lost_in_a_failover_fail_before_routing() {
    let mut t = topo(&[(5_000, 0, true)]);
    t.cluster = Some(ClusterId {
        system_identifier: SYSID,
        timeline: 2,
    });
    t.timeline_history = vec![(1, Lsn(800))];
    let router = Router::new(2, LoadBalance::RoundRobin);
    let now = Instant::now();
    // Written on timeline 1 past its switch point: lost, although the
    // replica of timeline 2 has passed that position.
    let mut plan = ReadPlan::new(req(ryw(50, Fallback::Primary), tok(900)), now);
    let step = plan.start(&t, &router, now);
    assert_eq!(code(&step).as_deref(), Some("55000"), "{step:?}");
    // Before the switch point it survived.
    let mut plan = ReadPlan::new(req(ryw(50, Fallback::Primary), tok(700)), now);
    assert_eq!(plan.start(&t, &router, now), replica(1));
    // Policies without tokens never look at it.
    let mut plan = ReadPlan::new(req(Consistency::Eventual, tok(900)), now);
    assert_eq!(plan.start(&t, &router, now), replica(1));
}

#[test]
fn streaming_drivers_feed_the_check_first() {
    let t = topo(&[(950, 5, true)]);
    let router = Router::new(2, LoadBalance::RoundRobin);
    let t0 = Instant::now();
    let mut plan = ReadPlan::new(req(ryw(50, Fallback::Primary), tok(1000)), t0);
    assert_eq!(plan.start(&t, &router, t0), checked(1, 1000));
    // The probe passes: the run goes on, and a later 25006 is still retried.
    assert_eq!(
        plan.feed(&t, &router, Outcome::Checked(at(1000, true)), t0 + ms(1)),
        Step::Proceed
    );
    assert_eq!(
        plan.feed(&t, &router, failed(Failure::ReadOnly), t0 + ms(2)),
        Step::RunAsWrite {
            fallback: FallbackReason::ReadOnly,
            waited: ms(2)
        }
    );
    // The probe fails: the run's result is discarded and the read waits.
    let mut plan = ReadPlan::new(req(ryw(50, Fallback::Primary), tok(1000)), t0);
    plan.start(&t, &router, t0);
    assert_eq!(
        plan.feed(&t, &router, Outcome::Checked(at(999, true)), t0 + ms(1)),
        poll(1, 0)
    );
    assert_eq!(plan.wait_left(t0 + ms(20)), ms(30));
    // A verified primary read ends like any other.
    let mut plan = ReadPlan::new(req(ryw(0, Fallback::Primary), tok(1000)), t0);
    plan.start(&t, &router, t0);
    assert_eq!(
        plan.feed(&t, &router, ran(at(999, true)), t0 + ms(1)),
        primary(Some(1000))
    );
    assert_eq!(
        plan.feed(&t, &router, Outcome::Checked(at(1000, false)), t0 + ms(2)),
        Step::Proceed
    );
    assert_eq!(
        plan.feed(&t, &router, ran(None), t0 + ms(3)),
        done(0, Some(FallbackReason::WaitTimeout), 3, false)
    );
}

#[test]
fn no_primary_known() {
    let mut t = topo(&[(1000, 0, false)]);
    t.primary = None;
    let router = Router::new(2, LoadBalance::RoundRobin);
    let now = Instant::now();
    let mut plan = ReadPlan::new(req(ryw(50, Fallback::Primary), None), now);
    assert_eq!(
        code(&plan.start(&t, &router, now)).as_deref(),
        Some("08006")
    );
}

#[test]
fn a_verified_replica_that_is_ejected_is_not_reused() {
    let t = topo(&[(950, 5, true), (900, 5, true)]);
    let router = Router::new(3, LoadBalance::RoundRobin);
    let t0 = Instant::now();
    let mut plan = ReadPlan::new(req(ryw(50, Fallback::Primary), tok(1000)), t0);
    assert_eq!(plan.start(&t, &router, t0), checked(1, 1000));
    assert_eq!(
        plan.feed(&t, &router, ran(at(990, true)), t0 + MS),
        poll(1, 0)
    );
    // The poll sees the token, but the monitor ejects the node meanwhile.
    let mut ejected = t.clone();
    ejected.nodes[1].healthy = false;
    let step = plan.feed(&ejected, &router, polled(1000), t0 + ms(2));
    assert_eq!(step, poll(2, 2), "waits on the other replica instead");
}

#[test]
fn failures_are_classified_once_for_everyone() {
    let conflict = "canceling statement due to conflict with recovery";
    let table: &[(&str, &str, Option<&str>, Failure)] = &[
        (
            "25006",
            "cannot execute INSERT in a read-only transaction",
            None,
            Failure::ReadOnly,
        ),
        (
            "40001",
            conflict,
            Some("User query might have needed to see row versions that must be removed."),
            Failure::RecoveryConflict,
        ),
        (
            "40P01",
            conflict,
            Some("User transaction caused buffer deadlock with recovery."),
            Failure::RecoveryConflict,
        ),
        (
            "57P01",
            "terminating connection due to conflict with recovery",
            None,
            Failure::RecoveryConflict,
        ),
        (
            "57P04",
            "terminating connection due to conflict with recovery",
            Some("User was connected to a database that must be dropped."),
            Failure::RecoveryConflict,
        ),
        (
            "40001",
            "could not serialize access due to concurrent update",
            None,
            Failure::Statement,
        ),
        ("40P01", "deadlock detected", None, Failure::Statement),
        (
            "57P01",
            "terminating connection due to administrator command",
            None,
            Failure::Connection,
        ),
        (
            "57P02",
            "terminating connection because of crash of another server process",
            None,
            Failure::Connection,
        ),
        (
            "57P03",
            "the database system is starting up",
            None,
            Failure::Connection,
        ),
        ("08006", "connection lost", None, Failure::Connection),
        (
            "0A000",
            "cannot access temporary or unlogged relations during recovery",
            None,
            Failure::ReadOnly,
        ),
        (
            "0A000",
            "cached plan must not change result type",
            None,
            Failure::Statement,
        ),
        (
            "57014",
            "canceling statement due to statement timeout",
            None,
            Failure::Statement,
        ),
        (
            "42P01",
            "relation \"nope\" does not exist",
            None,
            Failure::Statement,
        ),
    ];
    for &(code, message, detail, want) in table {
        assert_eq!(
            Failure::classify(code, message, detail),
            want,
            "{code} {message}"
        );
    }
    assert!(Failure::Connection.ejects_node());
    for f in [
        Failure::ReadOnly,
        Failure::RecoveryConflict,
        Failure::PoolExhausted,
        Failure::Ejected,
        Failure::Statement,
    ] {
        assert!(!f.ejects_node(), "{f:?}");
    }
}

mod monotonic;
