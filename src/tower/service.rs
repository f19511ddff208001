//! Lag-aware routing as a `tower::Service`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project::pin_project;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::client::exec::{ReadOpts, Stmt};
use crate::client::{Cluster, ServedBy};
use crate::error::Error;
use crate::model::policy::Consistency;
use crate::model::token::{ConsistencyToken, TokenHolder};

/// What a request means to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Intent {
    /// A read, routed by the consistency policy.
    #[default]
    Read,
    /// A read expected to find a row: with retry-on-miss enabled on the
    /// cluster, an empty replica result is retried on the primary.
    ReadExpectingRow,
    /// A write: always the primary; the response carries its commit token.
    Write,
}

/// An owned statement parameter.
pub type Param = Box<dyn ToSql + Send + Sync>;

/// A statement to route: SQL, owned parameters, intent, and optionally a
/// consistency token and a policy for this request alone.
pub struct Request {
    /// The SQL text.
    pub sql: String,
    /// Its parameters.
    pub params: Vec<Param>,
    /// Read or write.
    pub intent: Intent,
    /// The position the read must see (read-your-writes).
    pub token: Option<ConsistencyToken>,
    /// Overrides the cluster's default policy.
    pub consistency: Option<Consistency>,
    /// Capture the position the read saw into the response token (monotonic
    /// reads). Costs nothing extra in round trips; on by default.
    pub capture_token: bool,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("sql", &self.sql)
            .field("params", &self.params.len())
            .field("intent", &self.intent)
            .field("token", &self.token)
            .field("consistency", &self.consistency)
            .finish()
    }
}

impl Request {
    /// A read.
    pub fn read(sql: impl Into<String>) -> Self {
        Request {
            sql: sql.into(),
            params: Vec::new(),
            intent: Intent::Read,
            token: None,
            consistency: None,
            capture_token: true,
        }
    }

    /// A write.
    pub fn write(sql: impl Into<String>) -> Self {
        Request {
            intent: Intent::Write,
            ..Request::read(sql)
        }
    }

    /// Adds a parameter.
    pub fn bind(mut self, value: impl ToSql + Send + Sync + 'static) -> Self {
        self.params.push(Box::new(value));
        self
    }

    /// Sets the token the read must see.
    pub fn token(mut self, token: Option<ConsistencyToken>) -> Self {
        self.token = token;
        self
    }

    /// Sets the policy for this request.
    pub fn consistency(mut self, policy: Consistency) -> Self {
        self.consistency = Some(policy);
        self
    }

    /// Sets the intent.
    pub fn intent(mut self, intent: Intent) -> Self {
        self.intent = intent;
        self
    }
}

/// The rows, the new token, and which node served the request.
#[derive(Debug)]
pub struct Response {
    /// Rows returned.
    pub rows: Vec<Row>,
    /// Rows affected (writes) or returned (reads).
    pub rows_affected: u64,
    /// The request token advanced by what this request wrote or read.
    pub token: Option<ConsistencyToken>,
    /// Where it ran.
    pub served_by: ServedBy,
}

/// The routing core as a `tower::Service<Request>`.
///
/// Always ready; concurrency is bounded by the node pools (add tower's
/// `ConcurrencyLimitLayer`, `TimeoutLayer` or retries around it as needed).
///
/// ```no_run
/// # async fn demo(cluster: lagrouter::Cluster) -> Result<(), lagrouter::Error> {
/// use tower::{Service, ServiceExt};
/// use lagrouter::{Request, RouterService};
///
/// let mut svc = RouterService::new(cluster);
/// let written = svc.ready().await?.call(Request::write("INSERT INTO t VALUES ($1)").bind(1i32)).await?;
/// let read = svc
///     .ready()
///     .await?
///     .call(Request::read("SELECT count(*) FROM t").token(written.token))
///     .await?;
/// println!("served by {}", read.served_by.name);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RouterService {
    cluster: Cluster,
}

impl RouterService {
    /// A service routing over `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        RouterService { cluster }
    }

    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }
}

type BoxedResponse = Pin<Box<dyn Future<Output = Result<Response, Error>> + Send>>;

/// The future returned by [`RouterService`].
#[pin_project]
pub struct ResponseFuture {
    #[pin]
    inner: BoxedResponse,
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response, Error>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl tower::Service<Request> for RouterService {
    type Response = Response;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> ResponseFuture {
        let cluster = self.cluster.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let params: Vec<&(dyn ToSql + Sync)> = req
                    .params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                let stmt = Stmt {
                    sql: &req.sql,
                    params: &params,
                };
                let out = match req.intent {
                    Intent::Write => cluster.run_write(stmt).await?,
                    Intent::Read | Intent::ReadExpectingRow => {
                        let opts = ReadOpts {
                            policy: req.consistency.unwrap_or(cluster.policy()),
                            token: req.token,
                            last_write: None::<Instant>,
                            last_read: None,
                            capture: req.capture_token,
                            expect_row: req.intent == Intent::ReadExpectingRow,
                        };
                        cluster.run_read(stmt, opts).await?
                    }
                };
                let mut token = TokenHolder::new(req.token);
                token.observe(out.token);
                Ok(Response {
                    rows: out.rows,
                    rows_affected: out.rows_affected,
                    token: token.get(),
                    served_by: out.served,
                })
            }),
        }
    }
}
