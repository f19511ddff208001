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
use crate::model::lsn::Lsn;
use crate::model::policy::{Consistency, Fallback};
use crate::model::token::{ClusterId, ConsistencyToken};
use crate::model::topology::{Role, Topology};
use crate::routing::{ReadContext, Route};

/// One statement round trip: where it ran, and the WAL position it saw.
///
/// On a replica the position is `pg_last_wal_replay_lsn()`; on the primary
/// `pg_current_wal_insert_lsn()`, read after the statement in the same
/// pipeline. Either way the statement's effects (or the data it read) are at
/// or before it.
///
/// The third column is the node's own timeline: the primary's insert
/// timeline, or the timeline a replica's WAL receiver streams (NULL when it
/// is not streaming or the user may not see `pg_stat_wal_receiver`). Tokens
/// are labelled with it rather than with the monitor's last view, which can
/// lag behind a promotion. `pg_is_in_recovery()` is read once, so the three
/// columns agree even while the node is being promoted.
pub const POSITION_SQL: &str = "SELECT r, \
     (CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text, \
     CASE WHEN r THEN (SELECT received_tli FROM pg_stat_wal_receiver) \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int END \
     FROM (SELECT pg_is_in_recovery() AS r) AS s";

/// Why a read was not served by the replica routing first chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
    /// Capture the position the read saw (monotonic reads).
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

/// A node's position, as read by [`POSITION_SQL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// Replay position (replica) or insert position (primary).
    pub lsn: Option<Lsn>,
    /// The node's timeline, when it could be read.
    pub timeline: Option<u32>,
}

pub(crate) fn parse_position(row: &Row) -> Position {
    let in_recovery: bool = row.get(0);
    let lsn = row
        .get::<_, Option<&str>>(1)
        .and_then(|s| s.parse::<Lsn>().ok());
    let timeline = if row.len() > 2 {
        row.get::<_, Option<i32>>(2)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|&t| t > 0)
    } else {
        None
    };
    Position {
        in_recovery,
        lsn,
        timeline,
    }
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

    /// Reports a failed statement on `node` to the monitor, which ejects it
    /// until a probe succeeds, unless the failure says nothing about the
    /// node's health (a busy pool).
    fn report(&self, node: usize, e: &Error) {
        if e.is_connection_error() && !e.is_pool_exhausted() {
            self.inner.monitor.report_failure(node, &e.to_string());
        }
    }

    fn cluster_id(topo: &Topology) -> ClusterId {
        topo.cluster.unwrap_or(ClusterId {
            system_identifier: 0,
            timeline: 1,
        })
    }

    /// Turns an observed position into a token, labelled with the node's
    /// own timeline when known (else the primary's, as last probed).
    pub(crate) fn token_at(topo: &Topology, pos: Position) -> Option<ConsistencyToken> {
        let lsn = pos.lsn?;
        let lsn = if pos.in_recovery {
            lsn
        } else {
            lsn.round_to_record_boundary(topo.wal_segment_size)
        };
        let id = Self::cluster_id(topo);
        let timeline = pos.timeline.unwrap_or(id.timeline);
        Some(ConsistencyToken::new(lsn, id.system_identifier, timeline))
    }

    /// Runs `stmt` on `node`, pipelining position checks before and/or after
    /// it: one round trip in all.
    async fn run_on(
        &self,
        node: usize,
        stmt: Stmt<'_>,
        before: bool,
        after: bool,
    ) -> Result<RunResult> {
        let name = &self.inner.nodes[node].name;
        let _inflight = self.inner.router.track(node);
        let client = self.checkout(node).await?;
        // Prepare first (cached per connection; both in one round trip), so
        // that the executions below go out in order in a single pipeline.
        let (prepared, position) = tokio::try_join!(
            client.prepare_cached(stmt.sql),
            client.prepare_cached(POSITION_SQL)
        )
        .map_err(|e| Error::db(name, e))?;
        let pre = async {
            if before {
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
        let (rows, rows_affected) = main.map_err(|e| Error::db(name, e))?;
        let before = pre
            .map_err(|e| Error::db(name, e))?
            .map(|r| parse_position(&r));
        let after = post
            .map_err(|e| Error::db(name, e))?
            .map(|r| parse_position(&r));
        Ok(RunResult {
            rows,
            rows_affected,
            before,
            after,
        })
    }

    /// Reads the node's position alone (while waiting for a token).
    async fn position_of(&self, node: usize) -> Result<Position> {
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
        Ok(parse_position(&row))
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
                Err(e) => {
                    self.report(primary, &e);
                    return Err(e);
                }
            };
            metrics::counter!(WRITES_TOTAL, "node" => self.inner.nodes[primary].name.clone())
                .increment(1);
            let token = r.after.and_then(|p| Self::token_at(&topo, p));
            debug!(token = ?token.map(|t| t.lsn), "write committed");
            Ok(Outcome {
                rows: r.rows,
                rows_affected: r.rows_affected,
                token,
                served: self.served(primary, Role::Primary, Duration::ZERO, None),
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

    async fn read_inner(&self, stmt: Stmt<'_>, opts: ReadOpts) -> Result<Outcome> {
        let mut topo = self.inner.monitor.snapshot();
        let token = match opts.token {
            Some(t) if opts.policy.uses_token() => {
                if let Some(id) = &topo.cluster {
                    t.check_cluster(id)?;
                }
                check_not_lost(&topo, &t)?;
                Some(t)
            }
            _ => None,
        };
        let token_lsn = token.map(|t| t.lsn);
        let max_wait = match opts.policy {
            Consistency::ReadYourWrites { max_wait, .. } => max_wait,
            _ => Duration::ZERO,
        };
        let then = match opts.policy {
            Consistency::ReadYourWrites { then, .. } => then,
            _ => Fallback::Primary,
        };
        let start = Instant::now();
        let mut exclude: Vec<usize> = Vec::new();
        let mut waited = Duration::ZERO;
        let mut fallback: Option<FallbackReason> = None;
        let mut poll = self.inner.wait_poll;
        // A replica whose position was checked to be at/after the token.
        let mut verified: Option<usize> = None;
        // The first check on a replica goes in the same round trip as the read.
        let mut optimistic_done = false;
        let mut counted_wait = false;

        loop {
            let cx = ReadContext {
                token: token_lsn,
                last_write: opts.last_write,
                exclude: &exclude,
            };
            let route = match verified {
                Some(v) if !exclude.contains(&v) => Route::Replica(v),
                _ => self.inner.router.route(&topo, &opts.policy, &cx),
            };
            let (node, check) = match route {
                Route::Replica(i) => (i, false),
                Route::ReplicaIfCaughtUp(i) => {
                    if !counted_wait {
                        counted_wait = true;
                        metrics::counter!(TOKEN_WAITS_TOTAL).increment(1);
                    }
                    if optimistic_done && max_wait.is_zero() {
                        // No waiting in this policy: the check in the read's
                        // round trip failed, so the primary it is.
                        waited = start.elapsed();
                        fallback = Some(FallbackReason::WaitTimeout);
                        return self
                            .read_on_primary(stmt, &topo, token, opts, waited, fallback)
                            .await;
                    }
                    if optimistic_done {
                        // Poll the position only, until it passes or time is up.
                        match self.position_of(i).await {
                            Ok(Position { lsn: Some(l), .. })
                                if token_lsn.is_none_or(|t| l >= t) =>
                            {
                                verified = Some(i);
                                waited = start.elapsed();
                                continue;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                self.eject(i, &e);
                                exclude.push(i);
                                verified = None;
                                continue;
                            }
                        }
                        if start.elapsed() >= max_wait {
                            waited = start.elapsed();
                            metrics::histogram!(TOKEN_WAIT_SECONDS).record(waited.as_secs_f64());
                            match then {
                                Fallback::Primary => {
                                    fallback = Some(FallbackReason::WaitTimeout);
                                    return self
                                        .read_on_primary(stmt, &topo, token, opts, waited, fallback)
                                        .await;
                                }
                                Fallback::Error => {
                                    return Err(Error::WaitTimeout {
                                        token: token_lsn.unwrap_or_default(),
                                        waited,
                                    });
                                }
                            }
                        }
                        tokio::time::sleep(poll.min(max_wait.saturating_sub(start.elapsed())))
                            .await;
                        poll = (poll * 2).min(self.inner.wait_poll * 8);
                        topo = self.inner.monitor.snapshot();
                        continue;
                    }
                    optimistic_done = true;
                    (i, true)
                }
                Route::Primary => {
                    if fallback.is_none()
                        && !matches!(opts.policy, Consistency::Primary)
                        && !matches!(opts.policy, Consistency::PrimaryAfterWrite(w) if opts.last_write.is_some_and(|lw| lw.elapsed() < w))
                    {
                        fallback = Some(FallbackReason::NoReplica);
                    }
                    return self
                        .read_on_primary(stmt, &topo, token, opts, start.elapsed(), fallback)
                        .await;
                }
            };

            match self.run_on(node, stmt, check, opts.capture).await {
                Ok(r) => {
                    if check {
                        let reached = matches!(r.before, Some(Position { lsn: Some(l), .. }) if token_lsn.is_none_or(|t| l >= t));
                        if !reached {
                            // Not there yet: wait (the result is discarded).
                            topo = self.inner.monitor.snapshot();
                            continue;
                        }
                    }
                    if counted_wait {
                        waited = start.elapsed();
                    }
                    if opts.expect_row && r.rows.is_empty() && self.inner.retry_on_empty {
                        fallback = Some(FallbackReason::EmptyResult);
                        return self
                            .read_on_primary(stmt, &topo, token, opts, waited, fallback)
                            .await;
                    }
                    let role = match r.after.or(r.before) {
                        Some(p) if !p.in_recovery => Role::Primary,
                        _ => Role::Replica,
                    };
                    return Ok(Outcome {
                        token: r.after.and_then(|p| Self::token_at(&topo, p)),
                        rows: r.rows,
                        rows_affected: r.rows_affected,
                        served: self.served(node, role, waited, fallback),
                    });
                }
                Err(e) if e.is_read_only_violation() => {
                    debug!(node, "statement writes; running it on the primary");
                    let mut out = self.run_write(stmt).await?;
                    out.served.fallback = Some(FallbackReason::ReadOnly);
                    out.served.waited = waited;
                    return Ok(out);
                }
                Err(e) if e.is_recovery_conflict() => {
                    debug!(node, error = %e, "recovery conflict; retrying elsewhere");
                    fallback = Some(FallbackReason::RecoveryConflict);
                    exclude.push(node);
                    verified = None;
                }
                Err(e) if e.is_connection_error() => {
                    self.eject(node, &e);
                    fallback = Some(FallbackReason::ReplicaError);
                    exclude.push(node);
                    verified = None;
                    topo = self.inner.monitor.snapshot();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Ejects replica `node` after `e` (never the primary, see
    /// [`Cluster::report`]).
    pub(crate) fn eject(&self, node: usize, e: &Error) {
        if self.inner.monitor.snapshot().primary != Some(node) {
            self.report(node, e);
        }
    }

    /// Runs a read on the primary. With a token, the primary's position is
    /// read in the same round trip: a token ahead of it is reported.
    async fn read_on_primary(
        &self,
        stmt: Stmt<'_>,
        topo: &Topology,
        token: Option<ConsistencyToken>,
        opts: ReadOpts,
        waited: Duration,
        fallback: Option<FallbackReason>,
    ) -> Result<Outcome> {
        let primary = Self::primary_index(topo)?;
        let capture = opts.capture || token.is_some();
        let r = match self.run_on(primary, stmt, false, capture).await {
            Ok(r) => r,
            Err(e) => {
                self.report(primary, &e);
                return Err(e);
            }
        };
        if let (
            Some(t),
            Some(Position {
                in_recovery: false,
                lsn: Some(pos),
                ..
            }),
        ) = (token, r.after)
        {
            if pos < t.lsn {
                metrics::counter!(TOKENS_AHEAD_TOTAL).increment(1);
                return Err(Error::TokenAhead {
                    token: t.lsn,
                    primary: pos,
                });
            }
        }
        Ok(Outcome {
            token: if opts.capture {
                r.after.and_then(|p| Self::token_at(topo, p))
            } else {
                None
            },
            rows: r.rows,
            rows_affected: r.rows_affected,
            served: self.served(primary, Role::Primary, waited, fallback),
        })
    }
}

/// Fails with [`Error::TokenAhead`] (and counts it) when `token` stands for
/// writes that the current primary's history does not contain: acknowledged
/// on a former primary and lost in a failover (see
/// [`Topology::token_lost`]). A replica of the new timeline may well have
/// replayed past the token's position, so this is checked before routing.
pub fn check_not_lost(topo: &Topology, token: &ConsistencyToken) -> Result<()> {
    match topo.token_lost(token) {
        Some(survived) => {
            metrics::counter!(TOKENS_AHEAD_TOTAL).increment(1);
            tracing::warn!(
                token = %token.lsn,
                token_timeline = token.cluster.timeline,
                survived = %survived,
                "consistency token names writes lost in a failover"
            );
            Err(Error::TokenAhead {
                token: token.lsn,
                primary: survived,
            })
        }
        None => Ok(()),
    }
}
