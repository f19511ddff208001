//! Sessions: a sequence of statements with read-your-writes and monotonic
//! reads, carried by a consistency token.

use std::time::Instant;

use deadpool_postgres::Object;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::cluster::Cluster;
use super::exec::{FallbackReason, ReadOpts, ServedBy, Stmt};
use crate::error::{Error, Result};
use crate::model::policy::Consistency;
use crate::model::token::{ConsistencyToken, TokenHolder};
use crate::model::topology::Role;
use crate::probe::{POSITION_SQL, Position};
use crate::routing::read_plan::{LastRead, Outcome, ReadPlan, ReadRequest, Step};

impl Cluster {
    /// A new session with the cluster's default policy and no token.
    pub fn session(&self) -> Session {
        Session::new(self.clone())
    }
}

/// A logical session: reads see the session's own writes and never go back
/// in time, whichever nodes serve them.
///
/// The session keeps a [`ConsistencyToken`]: after each write it advances to
/// the commit's WAL position (read in the same round trip as the write).
/// Reads cost no extra statement: the session remembers where its last read
/// ran and stays there until the lag monitor has sampled that node after
/// the read, whose position then bounds what the read saw (see
/// ARCHITECTURE.md, "Monotonic reads"). Hand [`Session::token`] to another
/// process and resume with [`Session::with_token`] to carry the guarantees
/// across requests; a session whose token leaves it after reads should
/// [capture read positions](Session::capture_read_positions).
///
/// `query*` calls are reads (routed by the policy); `execute` and
/// [`Session::write_query`] are writes (the primary). A "read" that turns out
/// to write (SQLSTATE 25006 on a replica) is re-run on the primary.
#[derive(Debug, Clone)]
pub struct Session {
    cluster: Cluster,
    token: TokenHolder,
    last_write: Option<Instant>,
    policy: Consistency,
    last_served: Option<ServedBy>,
    /// Where the last read ran, until a captured position covers it.
    last_read: Option<LastRead>,
    /// Read each read's position into the token (one more statement, in
    /// the read's round trip).
    capture_reads: bool,
}

impl Session {
    pub(crate) fn new(cluster: Cluster) -> Self {
        let policy = cluster.policy();
        Session {
            cluster,
            token: TokenHolder::default(),
            last_write: None,
            policy,
            last_served: None,
            last_read: None,
            capture_reads: false,
        }
    }

    /// Reads the position of the node after each read, in the read's round
    /// trip, so that [`Session::token`] covers every read at once (for a
    /// token handed to another process right after a read, as
    /// [`TokenCell::session`](crate::TokenCell) does). Without it a read's
    /// position enters the token once the lag monitor has sampled its node
    /// after it (within about one monitor interval).
    pub fn capture_read_positions(mut self, on: bool) -> Self {
        self.capture_reads = on;
        self
    }

    /// Resumes from a token handed back by a client (e.g. from a cookie).
    pub fn with_token(mut self, token: ConsistencyToken) -> Self {
        self.observe(Some(token));
        self
    }

    /// Uses `policy` for this session's reads instead of the cluster default.
    pub fn with_policy(mut self, policy: Consistency) -> Self {
        self.policy = policy;
        self
    }

    /// Changes the policy for subsequent reads.
    pub fn set_policy(&mut self, policy: Consistency) {
        self.policy = policy;
    }

    /// The session's token: at or after its last write, and at or after
    /// its last read once that read's position is known (captured with
    /// [`Session::capture_read_positions`], or sampled by the lag monitor
    /// after the read).
    pub fn token(&self) -> Option<ConsistencyToken> {
        let mut token = self.token;
        if let Some(last) = self.last_read {
            token.observe(last.floor_token(&self.cluster.topology()));
        }
        token.get()
    }

    /// Merges a token into the session's (keeps the newer one).
    pub fn observe(&mut self, token: Option<ConsistencyToken>) {
        self.token.observe(token);
    }

    /// Where the last statement ran.
    pub fn last_served(&self) -> Option<&ServedBy> {
        self.last_served.as_ref()
    }

    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    async fn read(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        expect_row: bool,
    ) -> Result<Vec<Row>> {
        let opts = ReadOpts {
            policy: self.policy,
            token: self.token.get(),
            last_write: self.last_write,
            last_read: self.last_read,
            capture: self.capture_reads,
            expect_row,
        };
        let out = self.cluster.run_read(Stmt { sql, params }, opts).await?;
        if out.served.fallback == Some(FallbackReason::ReadOnly) {
            self.last_write = Some(Instant::now());
        }
        self.last_read = out.last_read;
        self.observe(out.token);
        self.last_served = Some(out.served);
        Ok(out.rows)
    }

    /// Runs a read and returns its rows.
    pub async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.read(sql, params, false).await
    }

    /// Runs a read that must return exactly one row. With retry-on-miss on,
    /// a replica that finds none is followed by a try on the primary.
    pub async fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let rows = self.read(sql, params, true).await?;
        exactly_one(rows)
    }

    /// Runs a read that returns at most one row (retry-on-miss as
    /// [`Session::query_one`]).
    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let rows = self.read(sql, params, true).await?;
        at_most_one(rows)
    }

    /// Runs a write on the primary and returns the number of rows affected.
    pub async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        Ok(self.write(sql, params).await?.1)
    }

    /// Runs a write that returns rows (`INSERT … RETURNING`).
    pub async fn write_query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        Ok(self.write(sql, params).await?.0)
    }

    async fn write(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Vec<Row>, u64)> {
        let out = self.cluster.run_write(Stmt { sql, params }).await?;
        self.last_write = Some(Instant::now());
        if out.token.is_some() {
            // Read on the primary after the commit: at or after everything
            // any earlier read saw.
            self.last_read = self.last_read.map(LastRead::covered);
        }
        self.observe(out.token);
        self.last_served = Some(out.served);
        Ok((out.rows, out.rows_affected))
    }

    /// Starts a read-write transaction on the primary. Its commit advances
    /// the session token (in the same round trip as the `COMMIT`).
    pub async fn transaction(&mut self) -> Result<Transaction<'_>> {
        let topo = self.cluster.topology();
        let primary = topo
            .primary
            .ok_or_else(|| Error::Unavailable("no primary is known".into()))?;
        let client = self.checkout(primary).await?;
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| Error::db(self.cluster.node_name(primary), e))?;
        Ok(Transaction {
            session: self,
            client: Some(client),
            node: primary,
            read_only: false,
        })
    }

    /// Starts a read-only transaction (`REPEATABLE READ READ ONLY`) on a
    /// node chosen by the session's policy: a replica that has reached the
    /// session token, else the primary. The read engine ([`ReadPlan`])
    /// decides; the position is checked on the chosen connection before
    /// `BEGIN`, and replay only moves forward, so the transaction's snapshot
    /// is at least as fresh.
    pub async fn read_transaction(&mut self) -> Result<Transaction<'_>> {
        let req = ReadRequest {
            last_write: self.last_write,
            first_poll: self.cluster.inner.wait_poll,
            last_read: self.last_read,
            ..ReadRequest::new(self.policy, self.token.get())
        };
        let router = &self.cluster.inner.router;
        let mut topo = self.cluster.topology();
        let mut plan = ReadPlan::new(req, Instant::now());
        let mut step = plan.start(&topo, router, Instant::now());
        let mut held: Option<(usize, Object)> = None;
        let mut error: Option<Error> = None;
        loop {
            let outcome = match step {
                Step::Run(run) => {
                    let client = match self.checkout(run.node).await {
                        Ok(c) => c,
                        Err(e) => {
                            let f = self.cluster.failed(run.node, &e);
                            topo = self.cluster.topology();
                            step = plan.feed(&topo, router, Outcome::Failed(f), Instant::now());
                            continue;
                        }
                    };
                    let name = self.cluster.node_name(run.node).to_string();
                    let outcome = if run.check.is_some() || run.verify.is_some() {
                        match client.query_one(POSITION_SQL, &[]).await {
                            Ok(row) => Outcome::Ran {
                                position: Some(Position::from_row(&row)),
                                empty: false,
                            },
                            Err(e) => {
                                let e = Error::db(&name, e);
                                let f = self.cluster.failed(run.node, &e);
                                error = Some(e);
                                Outcome::Failed(f)
                            }
                        }
                    } else {
                        Outcome::Ran {
                            position: None,
                            empty: false,
                        }
                    };
                    held = Some((run.node, client));
                    outcome
                }
                Step::Poll { node, after } => {
                    tokio::time::sleep(after).await;
                    match self.cluster.position_of(node).await {
                        Ok(p) => Outcome::Polled(p),
                        Err(e) => Outcome::Failed(self.cluster.failed(node, &e)),
                    }
                }
                Step::Done(served) => {
                    let (node, client) = held
                        .take()
                        .filter(|(n, _)| *n == served.node)
                        .ok_or_else(|| {
                            Error::Unavailable("no connection was checked out".into())
                        })?;
                    client
                        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        .await
                        .map_err(|e| Error::db(self.cluster.node_name(node), e))?;
                    return Ok(Transaction {
                        session: self,
                        client: Some(client),
                        node,
                        read_only: true,
                    });
                }
                Step::Fail(Some(e)) => return Err(e.into()),
                // Only a statement writes; a position probe never does.
                Step::RunAsWrite { .. } | Step::Fail(None) | Step::Proceed => {
                    return Err(error.take().unwrap_or_else(|| {
                        Error::Unavailable("no node could start the read transaction".into())
                    }));
                }
            };
            topo = self.cluster.topology();
            step = plan.feed(&topo, router, outcome, Instant::now());
        }
    }

    async fn checkout(&self, node: usize) -> Result<Object> {
        self.cluster.checkout(node).await
    }
}

fn exactly_one(rows: Vec<Row>) -> Result<Row> {
    let n = rows.len();
    let mut it = rows.into_iter();
    match (it.next(), n) {
        (Some(r), 1) => Ok(r),
        _ => Err(Error::Unavailable(format!(
            "query returned {n} rows where exactly one was expected"
        ))),
    }
}

fn at_most_one(rows: Vec<Row>) -> Result<Option<Row>> {
    let n = rows.len();
    if n > 1 {
        return Err(Error::Unavailable(format!(
            "query returned {n} rows where at most one was expected"
        )));
    }
    Ok(rows.into_iter().next())
}

/// A transaction pinned to one node. Dropping it without
/// [`Transaction::commit`] rolls it back.
pub struct Transaction<'s> {
    session: &'s mut Session,
    client: Option<Object>,
    node: usize,
    read_only: bool,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("node", &self.node)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Transaction<'_> {
    fn client(&self) -> &Object {
        self.client.as_ref().expect("transaction is open")
    }

    fn name(&self) -> String {
        self.session.cluster.node_name(self.node).to_string()
    }

    /// The node the transaction runs on.
    pub fn node(&self) -> usize {
        self.node
    }

    /// `sql` prepared on the transaction's connection (cached).
    async fn prepared(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        self.client()
            .prepare_cached(sql)
            .await
            .map_err(|e| Error::db(&self.name(), e))
    }

    /// Runs a statement and returns its rows.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let stmt = self.prepared(sql).await?;
        self.client()
            .query(&stmt, params)
            .await
            .map_err(|e| Error::db(&self.name(), e))
    }

    /// Runs a statement that returns exactly one row.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        exactly_one(self.query(sql, params).await?)
    }

    /// Runs a statement and returns the number of rows affected.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let stmt = self.prepared(sql).await?;
        self.client()
            .execute(&stmt, params)
            .await
            .map_err(|e| Error::db(&self.name(), e))
    }

    /// Commits. For a read-write transaction the session token advances to
    /// the commit's position, read in the same round trip as the `COMMIT`.
    pub async fn commit(mut self) -> Result<()> {
        let client = self.client.take().expect("transaction is open");
        let name = self.name();
        let topo = self.session.cluster.topology();
        let position = client
            .prepare_cached(POSITION_SQL)
            .await
            .map_err(|e| Error::db(&name, e))?;
        // COMMIT and the position probe in one pipeline: the probe runs after
        // the commit record is written.
        let commit = client.batch_execute("COMMIT");
        let pos = client.query_one(&position, &[]);
        let (commit, pos) = tokio::join!(commit, pos);
        commit.map_err(|e| Error::db(&name, e))?;
        let pos = Position::from_row(&pos.map_err(|e| Error::db(&name, e))?);
        let in_recovery = pos.in_recovery;
        let token = pos.token(&topo);
        if token.is_some() {
            // Read after the commit on the transaction's node: covers the
            // transaction and every earlier read.
            self.session.last_read = self.session.last_read.map(LastRead::covered);
        }
        self.session.observe(token);
        if !self.read_only {
            self.session.last_write = Some(Instant::now());
        }
        self.session.last_served = Some(ServedBy {
            node: self.node,
            name,
            role: if in_recovery {
                Role::Replica
            } else {
                Role::Primary
            },
            waited: std::time::Duration::ZERO,
            fallback: None,
        });
        Ok(())
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<()> {
        let client = self.client.take().expect("transaction is open");
        client
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| Error::db(&self.name(), e))
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(async move {
                        if client.batch_execute("ROLLBACK").await.is_err() {
                            // Do not return a connection in an unknown state.
                            let _ = Object::take(client);
                        }
                    });
                }
                Err(_) => {
                    let _ = Object::take(client);
                }
            }
        }
    }
}
