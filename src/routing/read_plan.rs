//! The read engine: every decision a routed read takes, without I/O.
//!
//! A [`ReadPlan`] is a state machine. Its driver (the library's
//! [`Session`](crate::Session) and [`RouterService`](crate::RouterService),
//! [`Session::read_transaction`](crate::Session::read_transaction), the
//! proxy's client session) asks it for a [`Step`], carries the step out on a
//! node and feeds back what happened as an [`Outcome`]; the plan answers with
//! the next step, until [`Step::Done`] or [`Step::Fail`]. Routing, the
//! in-round-trip freshness check, waiting and polling, the fallback to the
//! primary, the lost-write check, retry-on-miss and the retries after 25006,
//! recovery conflicts and lost connections are decided here and nowhere
//! else; which failures eject a node is decided by [`Failure::ejects_node`].
//!
//! ```text
//!  start ──► Run{replica, check} ──Ran(position ≥ token)──► Done
//!              │ position < token
//!              ▼
//!            Poll{replica, after} ◄─┐ (2 ms doubling to 8×, until max_wait)
//!              │ reached   │ behind ┘
//!              ▼           ▼ max_wait over
//!          Run{replica}   Run{primary, verify: token} ─► Done, or Fail(TokenAhead)
//!                         or Fail(WaitTimeout) when `then = error`
//! ```
//!
//! Time is passed in (`now`), so the tests below are tables of topologies,
//! outcomes and instants.

use std::time::{Duration, Instant};

use crate::error::Error;
pub use crate::error::Failure;
use crate::model::lsn::Lsn;
use crate::model::policy::{Consistency, Fallback};
use crate::model::token::{ConsistencyToken, TokenError};
use crate::model::topology::Topology;
use crate::probe::Position;
use crate::routing::{ReadContext, Route, Router};

/// Why a read was not served by the replica routing first chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    /// No replica reached the token within `max_wait`.
    WaitTimeout,
    /// No replica was eligible (none healthy, or all too stale).
    NoReplica,
    /// The replica found no row and retry-on-miss is on.
    EmptyResult,
    /// The statement writes (SQLSTATE 25006 on the replica).
    ReadOnly,
    /// The replica cancelled the query for a recovery conflict.
    RecoveryConflict,
    /// The replica could not be reached or failed.
    ReplicaError,
}

impl FallbackReason {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            FallbackReason::WaitTimeout => "wait_timeout",
            FallbackReason::NoReplica => "no_replica",
            FallbackReason::EmptyResult => "empty_result",
            FallbackReason::ReadOnly => "read_only",
            FallbackReason::RecoveryConflict => "recovery_conflict",
            FallbackReason::ReplicaError => "replica_error",
        }
    }
}

/// What a read asks of the engine.
#[derive(Clone, Copy, Debug)]
pub struct ReadRequest {
    /// The consistency policy of this read.
    pub policy: Consistency,
    /// The session's token, if any (ignored by policies that do not use one).
    pub token: Option<ConsistencyToken>,
    /// When the session last wrote ([`Consistency::PrimaryAfterWrite`]).
    pub last_write: Option<Instant>,
    /// Retry on the primary when a replica returns no row (retry-on-miss).
    pub retry_on_empty: bool,
    /// Retry on the primary when a replica rejects the statement as a write
    /// (25006) or cancels it for a recovery conflict. When off, those errors
    /// go to the caller.
    pub retry_replica_errors: bool,
    /// First interval between position polls while waiting (doubles up to
    /// eight times this).
    pub first_poll: Duration,
    /// Where the session's previous read ran (monotonic reads, for policies
    /// that use a token): see [`LastRead`].
    pub last_read: Option<LastRead>,
}

impl ReadRequest {
    /// A request with the library's defaults: replica errors retried, no
    /// retry-on-miss, a 2 ms first poll.
    pub fn new(policy: Consistency, token: Option<ConsistencyToken>) -> Self {
        ReadRequest {
            policy,
            token,
            last_write: None,
            retry_on_empty: false,
            retry_replica_errors: true,
            first_poll: Duration::from_millis(2),
            last_read: None,
        }
    }
}

/// The next thing a driver does for a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the read to a node.
    Run(Run),
    /// Wait `after`, then read `node`'s position alone and feed
    /// [`Outcome::Polled`].
    Poll {
        /// The replica waited for.
        node: usize,
        /// How long to sleep before the poll.
        after: Duration,
    },
    /// The statement writes (25006 on a replica): run it on the primary as a
    /// write, capturing its commit position. The read ends there.
    RunAsWrite {
        /// Why the read left the replica (always [`FallbackReason::ReadOnly`]).
        fallback: FallbackReason,
        /// Time spent waiting for a replica before that.
        waited: Duration,
    },
    /// The check fed in [`Outcome::Checked`] passed: let the run go on and
    /// feed its end ([`Outcome::Ran`]) or failure.
    Proceed,
    /// The read is served: keep the result of the last [`Step::Run`].
    Done(Served),
    /// Give up with this error. `None`: return the error the node gave.
    Fail(Option<PlanError>),
}

/// Why the engine gives a read up (besides the node's own errors).
/// Converts into [`Error`], which gives the SQLSTATE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// The token belongs to another cluster (22023).
    Token(TokenError),
    /// The token is ahead of the primary, or names writes lost in a
    /// failover (55000).
    TokenAhead {
        /// The token's position.
        token: Lsn,
        /// The primary's position, or the switch point of the token's
        /// timeline.
        primary: Lsn,
    },
    /// No replica reached the token within `max_wait` and the policy says
    /// not to fall back (57014).
    WaitTimeout {
        /// The position waited for.
        token: Lsn,
        /// How long the read waited.
        waited: Duration,
    },
    /// No primary is known (08006).
    NoPrimary,
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        match e {
            PlanError::Token(e) => Error::Token(e),
            PlanError::TokenAhead { token, primary } => Error::TokenAhead { token, primary },
            PlanError::WaitTimeout { token, waited } => Error::WaitTimeout { token, waited },
            PlanError::NoPrimary => Error::Unavailable("no primary is known".into()),
        }
    }
}

/// Where and how to run the read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The node.
    pub node: usize,
    /// True when the node is the primary.
    pub primary: bool,
    /// A replica not yet known to have the token: pipeline a position probe
    /// *before* the statement, in the same round trip, and feed its answer
    /// in [`Outcome::Ran`]. Replay only moves forward, so when the probe
    /// shows this position the statement's snapshot has it too.
    pub check: Option<Lsn>,
    /// The primary must have reached this position, else the token is ahead
    /// of it (lost writes, or forged): probe its position in the statement's
    /// round trip (before or after it) and feed the answer.
    pub verify: Option<Lsn>,
    /// The result may still be discarded (replica reads: a probe that fails,
    /// an error that moves the read elsewhere). Drivers that stream replies
    /// hold them back until the first row or the end.
    pub retryable: bool,
    /// Pipeline the position probe *after* the statement and keep its
    /// answer as the floor of the session's next read
    /// ([`LastRead::with_floor`]): the read stays on its last node while the
    /// router would rather use a more advanced one, which the next read
    /// then moves to ([`Served::next`]).
    pub capture: bool,
}

/// How a read was served, for [`ServedBy`](crate::ServedBy), metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The node whose result stands.
    pub node: usize,
    /// True when it is the primary.
    pub primary: bool,
    /// Set when the read was meant for a replica and went elsewhere.
    pub fallback: Option<FallbackReason>,
    /// Time from the start of the read to the run whose result stands,
    /// when the read had to wait for a replica (else zero).
    pub waited: Duration,
    /// True when the read waited for a replica to reach its token (polled
    /// at least once): count it as a token wait of `waited`.
    pub token_wait: bool,
    /// The node's epoch in the snapshot the run was routed by (for
    /// [`LastRead`]).
    pub epoch: u64,
    /// The run captured its position ([`Run::capture`]) so that the
    /// session's next read can move to this node.
    pub next: Option<usize>,
}

/// What happened to the last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The statement ran. `position` is the probe the step asked for
    /// (`check` or `verify`), `None` when none was asked or it gave no row.
    /// `empty`: it returned no row.
    Ran {
        /// The probe's answer.
        position: Option<Position>,
        /// The statement returned no row.
        empty: bool,
    },
    /// Only the probe of a run with `check` or `verify` has answered
    /// (drivers that stream replies learn it before the statement's end):
    /// the plan answers [`Step::Proceed`], or with the next step when the
    /// run's result must be discarded.
    Checked(Option<Position>),
    /// A position poll answered.
    Polled(Position),
    /// The statement, the probe or the connection failed.
    Failed(Failure),
}

/// What the plan sent last, to interpret the next [`Outcome`].
#[derive(Clone, Copy, Debug)]
enum Pending {
    Nothing,
    Run(Run),
    Poll(usize),
}

/// One read's routing state (see the [module docs](self)).
#[derive(Debug)]
pub struct ReadPlan {
    req: ReadRequest,
    /// The token, when the policy uses one.
    token: Option<ConsistencyToken>,
    /// The position the read must see: the token's, or the floor of the
    /// session's last read when that is newer.
    need: Option<Lsn>,
    /// The node the read stays on: the session's last read ran there and
    /// no floor is known yet.
    stay: Option<usize>,
    /// The epoch of the node of the last run, as routed.
    run_epoch: u64,
    /// Where the session wanted to move when its last read captured a
    /// floor: tried first.
    prefer: Option<usize>,
    /// Where a capturing run (staying) would rather have gone.
    next: Option<usize>,
    max_wait: Duration,
    then: Fallback,
    start: Instant,
    /// Nodes that failed this read.
    exclude: Vec<usize>,
    /// A replica whose position was seen at or past the token.
    verified: Option<usize>,
    /// The in-round-trip check has been tried once (later ones poll).
    checked: bool,
    /// The read polled a replica's position at least once.
    polled: bool,
    poll: Duration,
    fallback: Option<FallbackReason>,
    pending: Pending,
}

impl ReadPlan {
    /// A plan for `req`, started at `now`.
    pub fn new(req: ReadRequest, now: Instant) -> Self {
        let (max_wait, then) = match req.policy {
            Consistency::ReadYourWrites { max_wait, then } => (max_wait, then),
            _ => (Duration::ZERO, Fallback::Primary),
        };
        let token = req.token.filter(|_| req.policy.uses_token());
        ReadPlan {
            token,
            need: token.map(|t| t.lsn),
            stay: None,
            run_epoch: 0,
            prefer: None,
            next: None,
            req,
            max_wait,
            then,
            start: now,
            exclude: Vec::new(),
            verified: None,
            checked: false,
            polled: false,
            poll: req.first_poll,
            fallback: None,
            pending: Pending::Nothing,
        }
    }

    /// How much of `max_wait` is left at `now` (bounds a position poll).
    pub fn wait_left(&self, now: Instant) -> Duration {
        self.max_wait
            .saturating_sub(now.saturating_duration_since(self.start))
    }

    /// The first step. Fails at once for a token of another cluster
    /// (22023) or one standing for writes lost in a failover (55000).
    pub fn start(&mut self, topo: &Topology, router: &Router, now: Instant) -> Step {
        if let Some(t) = self.token {
            if let Some(id) = &topo.cluster {
                if let Err(e) = t.check_cluster(id) {
                    return Step::Fail(Some(PlanError::Token(e)));
                }
            }
            if let Some(survived) = topo.token_lost(&t) {
                return Step::Fail(Some(PlanError::TokenAhead {
                    token: t.lsn,
                    primary: survived,
                }));
            }
        }
        if let Some(last) = self.req.last_read.filter(|_| self.req.policy.uses_token()) {
            match last.floor(topo) {
                Some(floor) => {
                    self.need = self.need.max(Some(floor));
                    self.prefer = last.next;
                }
                None => self.stay = Some(last.node),
            }
        }
        self.route(topo, router, now)
    }

    /// Feeds the outcome of the last step and returns the next one.
    pub fn feed(
        &mut self,
        topo: &Topology,
        router: &Router,
        outcome: Outcome,
        now: Instant,
    ) -> Step {
        let pending = std::mem::replace(&mut self.pending, Pending::Nothing);
        match (pending, outcome) {
            (Pending::Run(run), Outcome::Ran { position, empty }) => {
                match self.checked(topo, router, run, position, now) {
                    Ok(run) => self.ran(topo, run, empty, now),
                    Err(next) => next,
                }
            }
            (Pending::Run(run), Outcome::Checked(position)) => {
                match self.checked(topo, router, run, position, now) {
                    Ok(run) => {
                        self.pending = Pending::Run(run);
                        Step::Proceed
                    }
                    Err(next) => next,
                }
            }
            (Pending::Poll(node), Outcome::Polled(pos)) => {
                if self.reached(Some(pos)) {
                    self.verified = Some(node);
                }
                self.route(topo, router, now)
            }
            (Pending::Run(run), Outcome::Failed(f)) => self.failed(topo, router, run, f, now),
            (Pending::Poll(node), Outcome::Failed(f)) => {
                // A poll carries no statement: any failure moves the wait on.
                self.leave(node);
                if f != Failure::Statement {
                    self.fallback = Some(FallbackReason::ReplicaError);
                }
                self.route(topo, router, now)
            }
            // An outcome that answers nothing the plan asked: start over.
            _ => self.route(topo, router, now),
        }
    }

    fn reached(&self, pos: Option<Position>) -> bool {
        match (self.need, pos) {
            (None, _) => true,
            (Some(need), Some(Position { lsn: Some(l), .. })) => l >= need,
            _ => false,
        }
    }

    fn leave(&mut self, node: usize) {
        self.exclude.push(node);
        if self.verified == Some(node) {
            self.verified = None;
        }
    }

    fn waited(&self, now: Instant) -> Duration {
        if self.checked {
            now.saturating_duration_since(self.start)
        } else {
            Duration::ZERO
        }
    }

    /// Applies the run's `check` and `verify` to the probe's answer:
    /// `Ok` with the run (its checks done) when its result may stand, else
    /// the next step.
    fn checked(
        &mut self,
        topo: &Topology,
        router: &Router,
        run: Run,
        position: Option<Position>,
        now: Instant,
    ) -> Result<Run, Step> {
        if let Some(need) = run.check {
            if position.is_none_or(|p| p.lsn.is_none_or(|l| l < need)) {
                // Not there yet: the result is discarded; wait.
                return Err(self.route(topo, router, now));
            }
        }
        if let Some(need) = run.verify {
            if let Some(Position {
                in_recovery: false,
                lsn: Some(at),
                ..
            }) = position
            {
                if at < need {
                    return Err(Step::Fail(Some(PlanError::TokenAhead {
                        token: need,
                        primary: at,
                    })));
                }
            }
        }
        Ok(Run {
            check: None,
            verify: None,
            ..run
        })
    }

    fn ran(&mut self, topo: &Topology, run: Run, empty: bool, now: Instant) -> Step {
        if !run.primary && empty && self.req.retry_on_empty {
            self.fallback = Some(FallbackReason::EmptyResult);
            return self.on_primary(topo);
        }
        Step::Done(Served {
            node: run.node,
            primary: run.primary,
            fallback: self.fallback,
            waited: self.waited(now),
            token_wait: self.polled,
            epoch: self.run_epoch,
            next: if run.capture { self.next } else { None },
        })
    }

    fn failed(
        &mut self,
        topo: &Topology,
        router: &Router,
        run: Run,
        f: Failure,
        now: Instant,
    ) -> Step {
        if run.primary {
            return Step::Fail(None);
        }
        match f {
            Failure::ReadOnly if self.req.retry_replica_errors => Step::RunAsWrite {
                fallback: FallbackReason::ReadOnly,
                waited: self.waited(now),
            },
            Failure::RecoveryConflict if self.req.retry_replica_errors => {
                self.fallback = Some(FallbackReason::RecoveryConflict);
                self.leave(run.node);
                self.route(topo, router, now)
            }
            Failure::Connection | Failure::PoolExhausted | Failure::Ejected => {
                self.fallback = Some(FallbackReason::ReplicaError);
                self.leave(run.node);
                self.route(topo, router, now)
            }
            _ => Step::Fail(None),
        }
    }

    /// Routes from the current snapshot.
    fn route(&mut self, topo: &Topology, router: &Router, now: Instant) -> Step {
        if let Some(v) = self.verified {
            if topo.nodes.get(v).is_some_and(|n| n.is_serving_replica()) {
                return self.run(
                    topo,
                    Run {
                        node: v,
                        primary: false,
                        check: None,
                        verify: None,
                        retryable: true,
                        capture: false,
                    },
                );
            }
            self.verified = None;
        }
        if let Some(node) = self.stay {
            return self.stay_on(topo, router, node, now);
        }
        if let Some(m) = self.prefer.take() {
            if let Some(step) = self.preferred(topo, m) {
                return step;
            }
        }
        let cx = ReadContext {
            token: self.need,
            last_write: self.req.last_write,
            exclude: &self.exclude,
        };
        match router.route(topo, &self.req.policy, &cx) {
            Route::Replica(i) => self.run(
                topo,
                Run {
                    node: i,
                    primary: false,
                    check: None,
                    verify: None,
                    retryable: true,
                    capture: false,
                },
            ),
            Route::ReplicaIfCaughtUp(i) => match self.need {
                // Without a token there is nothing to check.
                None => self.run(
                    topo,
                    Run {
                        node: i,
                        primary: false,
                        check: None,
                        verify: None,
                        retryable: true,
                        capture: false,
                    },
                ),
                Some(need) if !self.checked => {
                    self.checked = true;
                    self.run(
                        topo,
                        Run {
                            node: i,
                            primary: false,
                            check: Some(need),
                            verify: None,
                            retryable: true,
                            capture: false,
                        },
                    )
                }
                Some(need) => self.wait(topo, i, need, now),
            },
            Route::Primary => {
                let window = matches!(self.req.policy, Consistency::PrimaryAfterWrite(w)
                    if self.req.last_write.is_some_and(|lw| now.saturating_duration_since(lw) < w));
                if self.fallback.is_none()
                    && !window
                    && !matches!(self.req.policy, Consistency::Primary)
                {
                    self.fallback = Some(if self.checked {
                        FallbackReason::WaitTimeout
                    } else {
                        FallbackReason::NoReplica
                    });
                }
                self.on_primary(topo)
            }
        }
    }

    /// The in-round-trip check failed: poll replica `node` until it reaches
    /// `need` or `max_wait` is over.
    fn wait(&mut self, topo: &Topology, node: usize, need: Lsn, now: Instant) -> Step {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= self.max_wait {
            return match self.then {
                Fallback::Error if !self.max_wait.is_zero() => {
                    Step::Fail(Some(PlanError::WaitTimeout {
                        token: need,
                        waited: elapsed,
                    }))
                }
                _ => {
                    self.fallback = Some(FallbackReason::WaitTimeout);
                    self.on_primary(topo)
                }
            };
        }
        let after = if self.polled {
            let next = self.poll.min(self.max_wait - elapsed);
            self.poll = (self.poll * 2).min(self.req.first_poll * 8);
            next
        } else {
            Duration::ZERO
        };
        self.polled = true;
        self.pending = Pending::Poll(node);
        Step::Poll { node, after }
    }

    fn on_primary(&mut self, topo: &Topology) -> Step {
        match topo.primary {
            Some(p) => self.run(
                topo,
                Run {
                    node: p,
                    primary: true,
                    check: None,
                    verify: self.token.map(|t| t.lsn),
                    retryable: false,
                    // The primary's position after the read bounds what it
                    // saw: the floor of the session's next read.
                    capture: self.req.policy.uses_token(),
                },
            ),
            None => Step::Fail(Some(PlanError::NoPrimary)),
        }
    }

    fn run(&mut self, topo: &Topology, run: Run) -> Step {
        self.run_epoch = topo.nodes.get(run.node).map_or(0, |n| n.epoch);
        self.pending = Pending::Run(run);
        Step::Run(run)
    }
}

mod monotonic;
#[cfg(test)]
mod tests;

pub use monotonic::LastRead;
