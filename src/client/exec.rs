//! Running statements on the routed node: pipelined position checks, waits
//! for replicas to reach a token, fallbacks and retries.

use std::time::{Duration, Instant};

use deadpool_postgres::{Object, PoolError, TimeoutType};
use futures_util::{TryStreamExt, pin_mut};
use serde::Serialize;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tracing::{Instrument, debug, debug_span};

use super::cluster::Cluster;
use crate::error::{Error, POOL_EXHAUSTED, Result, describe};
use crate::metrics::{
    FALLBACKS_TOTAL, READS_TOTAL, TOKEN_WAIT_SECONDS, TOKEN_WAITS_TOTAL, TOKENS_AHEAD_TOTAL,
    WRITES_TOTAL,
};
use crate::model::policy::Consistency;
use crate::model::token::ConsistencyToken;
use crate::model::topology::{Role, Topology};
use crate::probe::{POSITION_SQL, Position};
use crate::routing::read_plan::{LastRead, Outcome as PlanOutcome, ReadPlan, ReadRequest, Step};

pub use crate::routing::read_plan::FallbackReason;

/// Which node served a statement, and how it got there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServedBy {
    /// Index of the node (see [`Cluster::nodes`]).
    pub node: usize,
    /// The node's name.
    pub name: String,
    /// Primary or replica at the time.
    pub role: Role,
    /// Time spent waiting for a replica to reach the token.
    #[serde(with = "serde_micros")]
    pub waited: Duration,
    /// Set when the read was meant for a replica and went elsewhere.
    pub fallback: Option<FallbackReason>,
}

mod serde_micros {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }
}

/// The result of one routed statement.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub rows: Vec<Row>,
    pub rows_affected: u64,
    /// Position at or after what the statement saw or wrote, when captured.
    pub token: Option<ConsistencyToken>,
    pub served: ServedBy,
    /// Where the read ran, for the next read's monotonic routing (`None`
    /// for writes, and for reads whose position was captured: the token
    /// covers them).
    pub last_read: Option<LastRead>,
}

/// A statement and its parameters.
#[derive(Clone, Copy)]
pub(crate) struct Stmt<'a> {
    pub sql: &'a str,
    pub params: &'a [&'a (dyn ToSql + Sync)],
}

/// A read's routing requirements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadOpts {
    pub policy: Consistency,
    pub token: Option<ConsistencyToken>,
    pub last_write: Option<Instant>,
    /// Where the session's previous read ran (monotonic reads).
    pub last_read: Option<LastRead>,
    /// Capture the position the read saw into the token (for a token that
    /// leaves the session); without it monotonic reads use `last_read`.
    pub capture: bool,
    /// Retry on the primary when the replica returns no row.
    pub expect_row: bool,
}

struct RunResult {
    rows: Vec<Row>,
    rows_affected: u64,
    /// Position read before the statement (only when a pre-check was asked).
    before: Option<Position>,
    /// Position read after the statement (only when capture was asked).
    after: Option<Position>,
}

async fn run_stmt(
    client: &Object,
    prepared: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(Vec<Row>, u64), tokio_postgres::Error> {
    // With a prepared statement the request is sent on the first poll, so
    // futures joined with this one are pipelined in poll order.
    let stream = client.query_raw(prepared, params.iter().copied()).await?;
    pin_mut!(stream);
    let mut rows = Vec::new();
    while let Some(row) = stream.try_next().await? {
        rows.push(row);
    }
    let affected = stream.rows_affected().unwrap_or(rows.len() as u64);
    Ok((rows, affected))
}

impl Cluster {
    /// A pooled connection to `node`. Fails with [`Error::Connect`] when the
    /// node cannot be reached (bounded by the connect timeout and the pool
    /// timeout) or when no pooled connection becomes free within the pool
    /// timeout ([`Error::is_pool_exhausted`]).
    pub(crate) async fn checkout(&self, node: usize) -> Result<Object> {
        let n = &self.inner.nodes[node];
        n.pool.get().await.map_err(|e| Error::Connect {
            node: n.name.clone(),
            message: match e {
                PoolError::Timeout(TimeoutType::Wait) => {
                    let status = n.pool.status();
                    format!(
                        "{POOL_EXHAUSTED}: all {} connections stayed busy for {:?}",
                        status.max_size,
                        n.pool.timeouts().wait.unwrap_or_default()
                    )
                }
                PoolError::Backend(e) => describe(&e),
                PoolError::Timeout(TimeoutType::Create) => format!(
                    "connecting timed out after {:?}",
                    n.pool.timeouts().create.unwrap_or_default()
                ),
                e => e.to_string(),
            },
        })
    }

    /// Runs `stmt` on `node`, pipelining position checks before and/or after
    /// it: one round trip in all. A failure comes with the check's answer
    /// when it is known (`before`): a replica behind the token can fail a
    /// statement it lacks the schema for, and then the check, not the
    /// error, decides.
    async fn run_on(
        &self,
        node: usize,
        stmt: Stmt<'_>,
        before: bool,
        after: bool,
    ) -> std::result::Result<RunResult, (Error, Option<Position>)> {
        let name = &self.inner.nodes[node].name;
        let db = |e| (Error::db(name, e), None);
        let _inflight = self.inner.router.track(node);
        let client = self.checkout(node).await.map_err(|e| (e, None))?;
        // Prepare first (cached per connection; both in one round trip), so
        // that the executions below go out in order in a single pipeline.
        let (position, prepared) = tokio::join!(
            client.prepare_cached(POSITION_SQL),
            client.prepare_cached(stmt.sql)
        );
        let position = position.map_err(db)?;
        let mut checked = None;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) if !before => return Err(db(e)),
            Err(_) => {
                // Prepared against a catalog older than the check: check
                // first, then prepare again (replay only moves forward).
                let row = client.query_one(&position, &[]).await.map_err(db)?;
                let pos = Position::from_row(&row);
                checked = Some(pos);
                client
                    .prepare_cached(stmt.sql)
                    .await
                    .map_err(|e| (Error::db(name, e), Some(pos)))?
            }
        };
        let pre = async {
            if before && checked.is_none() {
                client.query_one(&position, &[]).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let main = run_stmt(&client, &prepared, stmt.params);
        let post = async {
            if after {
                client.query_one(&position, &[]).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let (pre, main, post) = tokio::join!(pre, main, post);
        let before = match checked {
            Some(p) => Some(p),
            None => pre.map_err(db)?.map(|r| Position::from_row(&r)),
        };
        let (rows, rows_affected) = main.map_err(|e| (Error::db(name, e), before))?;
        let after = post.map_err(db)?.map(|r| Position::from_row(&r));
        Ok(RunResult {
            rows,
            rows_affected,
            before,
            after,
        })
    }

    /// Reads the node's position alone (while waiting for a token).
    pub(crate) async fn position_of(&self, node: usize) -> Result<Position> {
        let name = &self.inner.nodes[node].name;
        let client = self.checkout(node).await?;
        let position = client
            .prepare_cached(POSITION_SQL)
            .await
            .map_err(|e| Error::db(name, e))?;
        let row = client
            .query_one(&position, &[])
            .await
            .map_err(|e| Error::db(name, e))?;
        Ok(Position::from_row(&row))
    }

    fn primary_index(topo: &Topology) -> Result<usize> {
        topo.primary
            .ok_or_else(|| Error::Unavailable("no primary is known".into()))
    }

    fn served(
        &self,
        node: usize,
        role: Role,
        waited: Duration,
        fallback: Option<FallbackReason>,
    ) -> ServedBy {
        ServedBy {
            node,
            name: self.inner.nodes[node].name.clone(),
            role,
            waited,
            fallback,
        }
    }

    /// Runs a write on the primary and returns the token of its commit.
    pub(crate) async fn run_write(&self, stmt: Stmt<'_>) -> Result<Outcome> {
        let topo = self.inner.monitor.snapshot();
        let primary = Self::primary_index(&topo)?;
        let span = debug_span!("lagrouter.write", node = %self.inner.nodes[primary].name);
        async {
            let r = self.run_on(primary, stmt, false, true).await;
            let r = match r {
                Ok(r) => r,
                Err((e, _)) => {
                    self.failed(primary, &e);
                    return Err(e);
                }
            };
            metrics::counter!(WRITES_TOTAL, "node" => self.inner.nodes[primary].name.clone())
                .increment(1);
            let token = r.after.and_then(|p| p.token(&topo));
            debug!(token = ?token.map(|t| t.lsn), "write committed");
            Ok(Outcome {
                rows: r.rows,
                rows_affected: r.rows_affected,
                token,
                served: self.served(primary, Role::Primary, Duration::ZERO, None),
                last_read: None,
            })
        }
        .instrument(span)
        .await
    }

    /// Routes and runs a read.
    pub(crate) async fn run_read(&self, stmt: Stmt<'_>, opts: ReadOpts) -> Result<Outcome> {
        let span = debug_span!(
            "lagrouter.read",
            policy = opts.policy.label(),
            node = tracing::field::Empty,
            waited_us = tracing::field::Empty,
            fallback = tracing::field::Empty,
        );
        let out = self.read_inner(stmt, opts).instrument(span.clone()).await;
        if let Ok(o) = &out {
            span.record("node", o.served.name.as_str());
            span.record("waited_us", o.served.waited.as_micros() as u64);
            if let Some(f) = o.served.fallback {
                span.record("fallback", f.label());
                metrics::counter!(FALLBACKS_TOTAL, "reason" => f.label()).increment(1);
            }
            metrics::counter!(
                READS_TOTAL,
                "node" => o.served.name.clone(),
                "policy" => opts.policy.label()
            )
            .increment(1);
        }
        out
    }

    /// Drives the read engine ([`ReadPlan`]): carries out each step on the
    /// pools and feeds back what happened.
    async fn read_inner(&self, stmt: Stmt<'_>, opts: ReadOpts) -> Result<Outcome> {
        let req = ReadRequest {
            last_write: opts.last_write,
            retry_on_empty: opts.expect_row && self.inner.retry_on_empty,
            first_poll: self.inner.wait_poll,
            last_read: opts.last_read,
            ..ReadRequest::new(opts.policy, opts.token)
        };
        let router = &self.inner.router;
        let mut topo = self.inner.monitor.snapshot();
        let mut plan = ReadPlan::new(req, Instant::now());
        let mut step = plan.start(&topo, router, Instant::now());
        // The result of the last run, and the last node error.
        let mut last: Option<RunResult> = None;
        let mut error: Option<Error> = None;
        loop {
            let outcome = match step {
                Step::Run(run) => {
                    let capture = opts.capture || run.verify.is_some() || run.capture;
                    match self
                        .run_on(run.node, stmt, run.check.is_some(), capture)
                        .await
                    {
                        Ok(r) => {
                            let position = if run.check.is_some() {
                                r.before
                            } else {
                                r.after
                            };
                            let empty = r.rows.is_empty();
                            last = Some(r);
                            PlanOutcome::Ran { position, empty }
                        }
                        Err((e, checked)) => {
                            debug!(node = run.node, error = %e, "read failed");
                            let f = self.failed(run.node, &e);
                            error = Some(e);
                            if run.check.is_some() && checked.is_some() {
                                // The check answered: when the node was
                                // behind, the failure does not count.
                                topo = self.inner.monitor.snapshot();
                                let next = plan.feed(
                                    &topo,
                                    router,
                                    PlanOutcome::Checked(checked),
                                    Instant::now(),
                                );
                                if next != Step::Proceed {
                                    step = next;
                                    continue;
                                }
                            }
                            PlanOutcome::Failed(f)
                        }
                    }
                }
                Step::Poll { node, after } => {
                    tokio::time::sleep(after).await;
                    match self.position_of(node).await {
                        Ok(p) => PlanOutcome::Polled(p),
                        Err(e) => PlanOutcome::Failed(self.failed(node, &e)),
                    }
                }
                Step::RunAsWrite { fallback, waited } => {
                    debug!("statement writes; running it on the primary");
                    let mut out = self.run_write(stmt).await?;
                    out.served.fallback = Some(fallback);
                    out.served.waited = waited;
                    return Ok(out);
                }
                Step::Done(served) => {
                    if served.token_wait {
                        count_token_wait(served.waited);
                    }
                    let r = last
                        .take()
                        .ok_or_else(|| Error::Unavailable("no result".into()))?;
                    let role = match r.after.or(r.before) {
                        Some(p) if !p.in_recovery => Role::Primary,
                        Some(_) => Role::Replica,
                        None if served.primary => Role::Primary,
                        None => Role::Replica,
                    };
                    let token = r
                        .after
                        .filter(|_| opts.capture)
                        .and_then(|p| p.token(&topo));
                    return Ok(Outcome {
                        last_read: token.is_none().then(|| {
                            LastRead::new(&served, Instant::now())
                                .with_floor(r.after.and_then(|p| p.token(&topo)).map(|t| t.lsn))
                        }),
                        token,
                        rows: r.rows,
                        rows_affected: r.rows_affected,
                        served: self.served(served.node, role, served.waited, served.fallback),
                    });
                }
                Step::Fail(Some(e)) => {
                    let e = Error::from(e);
                    match &e {
                        Error::TokenAhead { token, primary } => {
                            metrics::counter!(TOKENS_AHEAD_TOTAL).increment(1);
                            tracing::warn!(token = %token, primary = %primary, "consistency token is ahead of the primary");
                        }
                        Error::WaitTimeout { waited, .. } => count_token_wait(*waited),
                        _ => {}
                    }
                    return Err(e);
                }
                // `Proceed` answers `Checked`, which this driver feeds only
                // for a failed run, and then feeds the failure.
                Step::Fail(None) | Step::Proceed => {
                    return Err(error
                        .take()
                        .unwrap_or_else(|| Error::Unavailable("the read failed".into())));
                }
            };
            topo = self.inner.monitor.snapshot();
            step = plan.feed(&topo, router, outcome, Instant::now());
        }
    }

    /// Classifies a node's failure and ejects the node when the engine says
    /// it looks down.
    pub(crate) fn failed(&self, node: usize, e: &Error) -> crate::routing::read_plan::Failure {
        let f = e.failure();
        if f.ejects_node() {
            self.inner.monitor.report_failure(node, &e.to_string());
        }
        f
    }
}

/// Counts a read that waited for a replica to reach its token, and how long.
fn count_token_wait(waited: Duration) {
    metrics::counter!(TOKEN_WAITS_TOTAL).increment(1);
    metrics::histogram!(TOKEN_WAIT_SECONDS).record(waited.as_secs_f64());
}
