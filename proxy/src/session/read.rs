//! Driving the library's read engine ([`lagrouter::routing::ReadPlan`]) for
//! a read unit: the engine decides where the unit runs, whether its replica
//! is checked first, how long to wait, when to fall back to the primary,
//! what to retry and what to report; this file only carries its steps out
//! on pooled connections and feeds back what the server said.
//!
//! Replies of a run whose result may still be discarded are held back
//! ([`Mode::Buffer`]) until the first data row or the end of the unit. The
//! probe before a read answers before the statement's replies, and is fed
//! as [`Outcome::Checked`]; a server error while replies are held back is
//! fed as [`Outcome::Failed`]; the end of the unit (or the first row that
//! reaches the client) as [`Outcome::Ran`].

use std::time::{Duration, Instant};

use lagrouter::FallbackReason;
use lagrouter::probe::Position;
use lagrouter::routing::{Failure, Outcome, PlanError, ReadPlan, ReadRequest, Served, Step};
use tracing::{debug, warn};

use crate::backend::{BackendError, PoolError, PooledConn};
use crate::metrics as m;
use crate::wire::{ClientMessage, PgError};

use super::pipeline::ProbeKind;
use super::pipeline::{ErrorState, Expect, Held, Mode};
use super::probe::poll_position;
use super::unit::Send;
use super::{Flow, Pooling, Session};

/// Bounds a position poll beyond the wait that is left, so that a reply
/// just at the deadline still counts.
const POLL_SLACK: Duration = Duration::from_millis(2);

impl Session {
    /// Starts a read unit: a new plan, and its first step.
    pub(super) async fn start_read(&mut self, batch: Vec<ClientMessage>) -> Flow {
        let settings = self.settings();
        let req = ReadRequest {
            last_write: self.last_write,
            retry_replica_errors: settings.config.routing.retry_on_replica_error,
            last_read: self.last_read,
            ..ReadRequest::new(self.unit_policy, self.token.get())
        };
        let now = Instant::now();
        let mut plan = ReadPlan::new(req, now);
        let router = self.shared.router();
        let step = plan.start(self.topology(), router, now);
        self.plan = Some(Box::new(plan));
        self.drive(step, batch, None).await
    }

    /// Feeds the plan and returns its next step (`None` without a plan).
    fn feed(&mut self, outcome: Outcome) -> Option<Step> {
        self.topology();
        let plan = self.plan.as_mut()?;
        Some(plan.feed(&self.topo, self.shared.router(), outcome, Instant::now()))
    }

    /// Carries out `step` for the unit `batch` until the unit is sent to a
    /// node or the read ends. `held`: the connection of the last run or
    /// poll, reused when the next step is on the same node.
    pub(super) async fn drive(
        &mut self,
        mut step: Step,
        batch: Vec<ClientMessage>,
        mut held: Option<PooledConn>,
    ) -> Flow {
        let mut error: Option<PgError> = None;
        loop {
            let outcome = match step {
                Step::Run(run) => match self.conn_for(run.node, &mut held).await {
                    Ok(conn) => {
                        self.start_unit(run.node, Send::Read(run), batch, conn);
                        return Ok(());
                    }
                    Err((f, e)) => {
                        warn!(node = run.node, error = %e, "cannot get a connection for a read");
                        error = Some(e);
                        Outcome::Failed(f)
                    }
                },
                Step::Poll { node, after } => match self.conn_for(node, &mut held).await {
                    Ok(mut conn) => {
                        // Boxed, as the other rare paths below: the session's
                        // future stays small while it idles.
                        Box::pin(tokio::time::sleep(after)).await;
                        let left = self
                            .plan
                            .as_ref()
                            .map_or(POLL_SLACK, |p| p.wait_left(Instant::now()) + POLL_SLACK);
                        let r = Box::pin(poll_position(&mut conn, left)).await;
                        match r {
                            Ok(pos) => {
                                held = Some(conn);
                                Outcome::Polled(pos)
                            }
                            Err(e @ BackendError::Unresponsive(_)) => {
                                // Cut short by the read's own deadline: the
                                // wait is over, not the node (the monitor's
                                // probe timeout judges hung nodes).
                                debug!(node, error = %e, "position poll cut short by max_wait");
                                conn.broken = true;
                                Outcome::Failed(Failure::Statement)
                            }
                            Err(e) => {
                                warn!(node, error = %e, "replica failed while waiting for it");
                                conn.broken = true;
                                Outcome::Failed(self.backend_failure(node, &e))
                            }
                        }
                    }
                    Err((f, _)) => Outcome::Failed(f),
                },
                Step::RunAsWrite { fallback, .. } => {
                    self.plan = None;
                    count_fallback(fallback);
                    let Some(primary) = self.topology().primary else {
                        self.unit_error(&batch, PgError::error("08006", "no primary is known"));
                        return Ok(());
                    };
                    self.shared
                        .stats
                        .fallback(primary, &self.unit_policy, fallback);
                    match self.conn_for(primary, &mut held).await {
                        Ok(conn) => self.start_unit(primary, Send::ReadAsWrite, batch, conn),
                        Err((_, e)) => self.unit_error(&batch, e),
                    }
                    return Ok(());
                }
                Step::Done(served) => {
                    self.read_served(served);
                    return Ok(());
                }
                Step::Fail(e) => {
                    self.plan = None;
                    let e = match e {
                        Some(e) => {
                            if matches!(e, PlanError::TokenAhead { .. }) {
                                self.shared.stats.token_ahead();
                            }
                            plan_error(e)
                        }
                        None => error.take().unwrap_or_else(|| {
                            PgError::error("08006", "no server could run the read")
                        }),
                    };
                    self.unit_error(&batch, e);
                    return Ok(());
                }
                // Answers `Checked`, which is fed only while a run is held.
                Step::Proceed => return Ok(()),
            };
            step = match self.feed(outcome) {
                Some(s) => s,
                None => return Ok(()),
            };
        }
    }

    /// A connection to `node`: `held` when it is there, else a new one from
    /// the pool (a failure comes back classified, with the client's error).
    async fn conn_for(
        &mut self,
        node: usize,
        held: &mut Option<PooledConn>,
    ) -> Result<PooledConn, (Failure, PgError)> {
        if let Some(c) = held.take() {
            if c.node() == node && !c.broken {
                return Ok(c);
            }
            release(c);
        }
        self.checkout(node).await.map_err(|e| {
            let f = match &e {
                PoolError::Timeout(_) => Failure::PoolExhausted,
                // Classified (and the node ejected) by `checkout` already.
                PoolError::Connect(b) => failure_of(b),
                PoolError::Closed => Failure::Statement,
            };
            (f, PgError::error(e.sqlstate(), e.to_string()))
        })
    }

    /// Classifies a backend failure and ejects its node when the engine
    /// says it looks down.
    pub(super) fn backend_failure(&self, node: usize, e: &BackendError) -> Failure {
        let f = failure_of(e);
        if f.ejects_node() {
            self.shared.monitor.report_failure(node, &e.to_string());
        }
        f
    }

    /// The probe before the held run answered: the run goes on, or its
    /// replies are discarded and the engine's next step waits until
    /// nothing more is expected from the connection.
    pub(super) fn on_check(&mut self, result: Option<Position>) {
        let Some(step) = self.feed(Outcome::Checked(result)) else {
            return;
        };
        let h = self.backend.as_mut().expect("held");
        match step {
            Step::Proceed => {}
            next => {
                h.mode = Mode::Discard;
                h.retry = Some(next);
            }
        }
    }

    /// A server error on a read whose replies are held back: retried
    /// elsewhere as the engine decides, or left for the client.
    pub(super) fn on_read_error(&mut self, failure: Failure) {
        let node = self.backend.as_ref().map(|h| h.node);
        if failure.ejects_node() {
            if let Some(n) = node {
                self.shared
                    .monitor
                    .report_failure(n, "the server ended the connection");
            }
        }
        let Some(step) = self.feed(Outcome::Failed(failure)) else {
            return;
        };
        match step {
            Step::Fail(None) => {
                // The error stands: it goes to the client now (a unit the
                // client left open with Flush gets no ReadyForQuery that
                // would release it).
                self.plan = None;
                if let Some(h) = self.backend.as_mut() {
                    h.commit_output();
                    h.unit = None;
                }
            }
            next => {
                debug!(
                    ?failure,
                    "replica rejected the read; the read engine moves it"
                );
                let h = self.backend.as_mut().expect("held");
                h.mode = Mode::Discard;
                h.retry = Some(next);
            }
        }
    }

    /// Ends the read once its result stands: the replies reach the client
    /// and no check is outstanding.
    pub(super) fn finish_read(&mut self) {
        let ready = self.plan.is_some()
            && self.backend.as_ref().is_some_and(|h| {
                matches!(h.mode, Mode::Direct)
                    && h.retry.is_none()
                    && !h.queue.iter().any(|e| {
                        matches!(
                            e,
                            Expect::Probe {
                                kind: ProbeKind::Before,
                                ..
                            }
                        )
                    })
            });
        if !ready {
            return;
        }
        match self.feed(Outcome::Ran {
            position: None,
            empty: false,
        }) {
            Some(Step::Done(served)) => self.read_served(served),
            // Nothing else can follow a run that already answered.
            _ => self.plan = None,
        }
    }

    fn read_served(&mut self, served: Served) {
        self.plan = None;
        self.shared.stats.served(&self.unit_policy, &served);
        self.read_served = Some(served);
        if let Some(f) = served.fallback {
            count_fallback(f);
        }
        if served.token_wait {
            count_wait(served.waited);
        }
    }

    /// Before the session's token leaves it (`SHOW lagrouter.token`): makes
    /// it cover the last read, from the monitor's sample after the read or
    /// else from the node's position read now (in the read's epoch).
    pub(super) async fn settle_last_read(&mut self) {
        let Some(last) = self.last_read else { return };
        let topo = self.topology().clone();
        let token = match last.floor_token(&topo) {
            Some(t) => Some(t),
            None if last.same_epoch(&topo) => match self.checkout(last.node).await {
                Ok(mut conn) => {
                    let limit = self.settings().config.routing.probe_timeout;
                    let r = Box::pin(poll_position(&mut conn, limit)).await;
                    match r {
                        Ok(pos) => {
                            conn.release();
                            pos.token(&topo)
                        }
                        Err(e) => {
                            conn.broken = true;
                            self.backend_failure(last.node, &e);
                            None
                        }
                    }
                }
                Err(_) => None,
            },
            None => None,
        };
        if token.is_some() {
            self.token.observe(token);
            self.last_read = None;
        }
    }

    /// Carries out the step decided while the held run's replies were read.
    pub(super) async fn resume_read(&mut self, step: Step) -> Flow {
        let Some(mut h) = self.backend.take() else {
            return Ok(());
        };
        *self.status.server.lock().expect("cancel slot") = None;
        let unit = h.unit.take().unwrap_or_default();
        if h.unit_state.is_open() || h.error == ErrorState::SkippingToSync {
            // Left mid-unit (the client's Sync never came): not reusable.
            h.conn.broken = true;
        }
        let conn = take_conn(h);
        Box::pin(self.drive(step, unit, conn)).await
    }

    /// The held backend failed: a read whose replies were held back goes
    /// where the engine says; anything else ends the session (its
    /// transaction or pipeline state is lost).
    pub(super) async fn backend_failed(&mut self, e: BackendError) -> Flow {
        let Some(mut h) = self.backend.take() else {
            return Ok(());
        };
        *self.status.server.lock().expect("cancel slot") = None;
        warn!(node = h.node, error = %e, "server connection failed");
        h.conn.broken = true;
        let failure = self.backend_failure(h.node, &e);
        let retryable = h.unit.is_some()
            && matches!(h.mode, Mode::Buffer(_) | Mode::Discard)
            && self.pooling == Pooling::Transaction;
        if retryable {
            let step = match h.retry.take() {
                Some(step) => Some(step),
                None => self.feed(Outcome::Failed(failure)),
            };
            if let Some(step) = step {
                let unit = h.unit.take().unwrap_or_default();
                drop(h);
                return Box::pin(self.drive(step, unit, None)).await;
            }
        }
        self.backend_lost(h, &e)
    }
}

/// What a backend failure means for routing: the server's SQLSTATE by
/// the engine's one classification, else a lost or silent connection.
fn failure_of(e: &BackendError) -> Failure {
    match e {
        BackendError::Server(f) => Failure::classify(&f.code, &f.message, f.detail.as_deref()),
        other if other.is_connection_failure() => Failure::Connection,
        _ => Failure::Statement,
    }
}

/// The held run's connection, kept for the next step unless broken.
fn take_conn(h: Box<Held>) -> Option<PooledConn> {
    let Held { conn, .. } = *h;
    (!conn.broken).then_some(conn)
}

fn release(c: PooledConn) {
    if c.broken {
        drop(c);
    } else {
        c.release();
    }
}

fn count_fallback(f: FallbackReason) {
    metrics::counter!(m::FALLBACKS_TOTAL, m::LABEL_REASON => f.label()).increment(1);
}

fn count_wait(waited: Duration) {
    metrics::counter!(m::TOKEN_WAITS_TOTAL).increment(1);
    metrics::histogram!(m::TOKEN_WAIT_SECONDS).record(waited.as_secs_f64());
}

/// The engine's verdict as the client's error, counted once.
fn plan_error(e: PlanError) -> PgError {
    match &e {
        PlanError::TokenAhead { .. } => {
            metrics::counter!(m::TOKENS_AHEAD_TOTAL).increment(1);
        }
        PlanError::WaitTimeout { waited, .. } => count_wait(*waited),
        _ => {}
    }
    let hint = match &e {
        PlanError::TokenAhead { .. } => Some(
            "The token was forged, or writes acknowledged before a failover were lost. Check the data; a write on the current primary, or a new connection, starts from a fresh token.",
        ),
        PlanError::WaitTimeout { .. } => {
            Some("Raise routing.max_wait or set routing.then = \"primary\".")
        }
        _ => None,
    };
    let e = lagrouter::Error::from(e);
    let pg = PgError::error(e.code().unwrap_or("XX000"), e.to_string());
    match hint {
        Some(h) => pg.with_hint(h),
        None => pg,
    }
}
