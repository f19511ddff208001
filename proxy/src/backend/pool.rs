//! Backend connection pools, one per (node, server user, database).
//!
//! A client holds a connection only while a statement or transaction runs
//! (transaction pooling). Checkout waits up to the configured timeout for a
//! free slot; idle connections are reused newest first and are closed when
//! idle or alive for too long. [`Pools::maintain`], run periodically, closes
//! connections idle past the timeout and opens new ones up to `min_idle`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::{BackendConn, BackendError, BackendTarget};

/// Pool settings (from `[pool]` in the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections per (node, user, database).
    pub size: usize,
    /// Per-node overrides of `size`, by node index.
    pub node_sizes: Vec<Option<usize>>,
    /// Idle connections kept open per pool (opened ahead of demand).
    pub min_idle: usize,
    /// How long a client waits for a free connection.
    pub checkout_timeout: Duration,
    /// Bound on opening one connection.
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed (zero: never).
    pub idle_timeout: Duration,
    /// Connections older than this are closed when returned (zero: never).
    pub max_lifetime: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            size: 20,
            node_sizes: Vec::new(),
            min_idle: 0,
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

impl PoolSettings {
    /// The pool size for node `node`.
    pub fn size_for(&self, node: usize) -> usize {
        self.node_sizes
            .get(node)
            .copied()
            .flatten()
            .unwrap_or(self.size)
            .max(1)
    }

    /// Whether an idle connection has outlived the idle timeout or its
    /// lifetime.
    fn expired(&self, c: &BackendConn, now: Instant) -> bool {
        (!self.idle_timeout.is_zero() && now.duration_since(c.idle_since) > self.idle_timeout)
            || (!self.max_lifetime.is_zero()
                && now.duration_since(c.created_at) > self.max_lifetime)
    }
}

/// Identifies one pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Node index.
    pub node: usize,
    /// Server user.
    pub user: String,
    /// Database.
    pub database: String,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every connection stayed busy for the checkout timeout.
    #[error("no server connection became free within {0:?}")]
    Timeout(Duration),
    /// Opening a new connection failed.
    #[error(transparent)]
    Connect(#[from] BackendError),
    /// The proxy is shutting down.
    #[error("the pool is closed")]
    Closed,
}

impl PoolError {
    /// SQLSTATE for the client.
    pub fn sqlstate(&self) -> &str {
        match self {
            PoolError::Timeout(_) => "53300",
            PoolError::Connect(e) => e.sqlstate(),
            PoolError::Closed => "57P01",
        }
    }
}

/// Connections to one node as one server user on one database.
pub struct NodePool {
    key: PoolKey,
    target: BackendTarget,
    /// Idle connections, boxed: a checkout moves a pointer, not the
    /// connection's few hundred bytes (5 % of the proxy's instructions per
    /// transaction went to those copies).
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<BackendConn>>>,
    sem: Arc<Semaphore>,
    size: Mutex<usize>,
    settings: Mutex<Arc<PoolSettings>>,
    created: AtomicU64,
    open: Arc<AtomicUsize>,
    /// Checkouts waiting for a free slot.
    waiting: AtomicUsize,
}

/// Statistics of one pool for `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStats {
    /// Node index.
    pub node: usize,
    /// Server user.
    pub user: String,
    /// Database.
    pub database: String,
    /// Configured size.
    pub size: usize,
    /// Connections open (idle + in use).
    pub open: usize,
    /// Idle connections.
    pub idle: usize,
    /// Connections checked out.
    pub in_use: usize,
    /// Connections opened since start.
    pub created_total: u64,
    /// Checkouts waiting for a connection (the pool is at its size).
    pub waiting: usize,
}

/// An idle server connection, for the admin console's `SHOW SERVERS`.
#[derive(Clone, Debug)]
pub struct IdleServer {
    /// Node index.
    pub node: usize,
    /// Server user.
    pub user: String,
    /// Database.
    pub database: String,
    /// The server's address.
    pub addr: std::net::SocketAddr,
    /// Backend process id.
    pub pid: i32,
    /// When the connection was opened.
    pub created_at: Instant,
    /// Since when it is idle.
    pub idle_since: Instant,
}

impl NodePool {
    fn new(key: PoolKey, target: BackendTarget, settings: PoolSettings) -> Self {
        let size = settings.size_for(key.node);
        NodePool {
            key,
            target,
            idle: Mutex::new(Vec::new()),
            sem: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
            settings: Mutex::new(Arc::new(settings)),
            created: AtomicU64::new(0),
            open: Arc::new(AtomicUsize::new(0)),
            waiting: AtomicUsize::new(0),
        }
    }

    fn settings(&self) -> Arc<PoolSettings> {
        self.settings.lock().expect("pool lock").clone()
    }

    /// Takes a connection, opening one if none is idle.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, PoolError> {
        let settings = self.settings();
        // A free slot is the common case: no timer for it.
        let permit = match self.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(PoolError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let r = Box::pin(tokio::time::timeout(
                    settings.checkout_timeout,
                    self.sem.clone().acquire_owned(),
                ))
                .await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                match r {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(PoolError::Closed),
                    Err(_) => return Err(PoolError::Timeout(settings.checkout_timeout)),
                }
            }
        };
        let now = Instant::now();
        let here = super::home::current();
        loop {
            let candidate = take_idle(&mut self.idle.lock().expect("pool lock"), here);
            let Some(conn) = candidate else { break };
            if settings.expired(&conn, now) {
                self.open.fetch_sub(1, Ordering::Relaxed);
                tokio::spawn((*conn).terminate());
                continue;
            }
            let conn = match conn.rehome() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(node = self.key.node, error = %e, "moving a server connection to this worker failed");
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
            return Ok(PooledConn {
                conn: Some(conn),
                _permit: permit,
                pool: self.clone(),
            });
        }
        // Rare, and large (authentication): boxed so that every future that
        // checks out a connection stays small.
        let conn = Box::pin(self.open_conn(&settings)).await?;
        Ok(PooledConn {
            conn: Some(conn),
            _permit: permit,
            pool: self.clone(),
        })
    }

    /// Opens and counts a new connection (the caller holds a permit).
    async fn open_conn(&self, settings: &PoolSettings) -> Result<Box<BackendConn>, BackendError> {
        let conn =
            BackendConn::connect(self.key.node, &self.target, settings.connect_timeout).await?;
        self.created.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::SERVER_CONNECTIONS_OPENED_TOTAL).increment(1);
        Ok(Box::new(conn))
    }

    fn checkin(&self, mut conn: Box<BackendConn>) {
        let settings = self.settings();
        let now = Instant::now();
        let too_old = !settings.max_lifetime.is_zero()
            && now.duration_since(conn.created_at) > settings.max_lifetime;
        let mut idle = self.idle.lock().expect("pool lock");
        if conn.broken || too_old || idle.len() >= *self.size.lock().expect("pool lock") {
            drop(idle);
            self.open.fetch_sub(1, Ordering::Relaxed);
            if !conn.broken {
                tokio::spawn((*conn).terminate());
            }
            return;
        }
        conn.idle_since = now;
        idle.push(conn);
    }

    fn resize(&self, settings: PoolSettings) {
        let new = settings.size_for(self.key.node);
        *self.settings.lock().expect("pool lock") = Arc::new(settings);
        let mut size = self.size.lock().expect("pool lock");
        let old = *size;
        *size = new;
        if new > old {
            self.sem.add_permits(new - old);
        } else if new < old {
            let sem = self.sem.clone();
            let n = (old - new) as u32;
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(n).await {
                    p.forget();
                }
            });
        }
    }

    /// Closes idle connections past the idle timeout or lifetime (keeping
    /// `min_idle`), then opens connections until `min_idle` are idle, as far
    /// as the pool size allows. Failures to connect are left to the next
    /// round (the lag monitor reports the node).
    async fn maintain(&self) {
        let settings = self.settings();
        let now = Instant::now();
        let expired: Vec<Box<BackendConn>> = {
            let mut idle = self.idle.lock().expect("pool lock");
            let mut budget = idle.len().saturating_sub(settings.min_idle);
            let mut keep = Vec::with_capacity(idle.len());
            let mut expired = Vec::new();
            // Oldest first (connections are reused from the back).
            for c in idle.drain(..) {
                if budget > 0 && settings.expired(&c, now) {
                    budget -= 1;
                    expired.push(c);
                } else {
                    keep.push(c);
                }
            }
            *idle = keep;
            expired
        };
        if !expired.is_empty() {
            self.open.fetch_sub(expired.len(), Ordering::Relaxed);
            for c in expired {
                (*c).terminate().await;
            }
        }
        let size = *self.size.lock().expect("pool lock");
        let want = settings.min_idle.min(size);
        while self.idle.lock().expect("pool lock").len() < want
            && self.open.load(Ordering::Relaxed) < size
        {
            // Hold a permit while connecting so the pool never exceeds its size.
            let Ok(permit) = self.sem.clone().try_acquire_owned() else {
                return;
            };
            match self.open_conn(&settings).await {
                Ok(conn) => {
                    self.checkin(conn);
                    drop(permit);
                }
                Err(e) => {
                    tracing::debug!(node = self.key.node, error = %e, "min_idle: connect failed");
                    return;
                }
            }
        }
    }

    /// Current statistics.
    pub fn stats(&self) -> PoolStats {
        let size = *self.size.lock().expect("pool lock");
        let idle = self.idle.lock().expect("pool lock").len();
        let open = self.open.load(Ordering::Relaxed);
        PoolStats {
            node: self.key.node,
            user: self.key.user.clone(),
            database: self.key.database.clone(),
            size,
            open,
            idle,
            in_use: open.saturating_sub(idle),
            created_total: self.created.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// The idle connections.
    pub fn idle_servers(&self) -> Vec<IdleServer> {
        self.idle
            .lock()
            .expect("pool lock")
            .iter()
            .map(|c| IdleServer {
                node: self.key.node,
                user: self.key.user.clone(),
                database: self.key.database.clone(),
                addr: c.addr,
                pid: c.pid,
                created_at: c.created_at,
                idle_since: c.idle_since,
            })
            .collect()
    }

    /// Closes every idle connection.
    pub fn close_idle(&self) {
        let conns: Vec<_> = std::mem::take(&mut *self.idle.lock().expect("pool lock"));
        self.open.fetch_sub(conns.len(), Ordering::Relaxed);
        for c in conns {
            tokio::spawn((*c).terminate());
        }
    }
}

/// Takes the newest idle connection registered with worker `here`, else
/// the newest of any worker (it will be moved over).
#[allow(clippy::vec_box)]
fn take_idle(idle: &mut Vec<Box<BackendConn>>, here: usize) -> Option<Box<BackendConn>> {
    match idle.iter().rposition(|c| c.home == here) {
        Some(i) => Some(idle.remove(i)),
        None => idle.pop(),
    }
}

/// A checked-out connection. Return it with [`PooledConn::release`] once
/// it is idle and clean; dropping it closes it instead.
pub struct PooledConn {
    conn: Option<Box<BackendConn>>,
    _permit: OwnedSemaphorePermit,
    pool: Arc<NodePool>,
}

impl PooledConn {
    /// Returns the connection to its pool.
    pub fn release(mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.checkin(c);
        }
    }

    /// The node this connection belongs to.
    pub fn node(&self) -> usize {
        self.pool.key.node
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(mut c) = self.conn.take() {
            c.broken = true;
            self.pool.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl std::ops::Deref for PooledConn {
    type Target = BackendConn;
    fn deref(&self) -> &BackendConn {
        self.conn
            .as_ref()
            .expect("connection present until release")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut BackendConn {
        self.conn
            .as_mut()
            .expect("connection present until release")
    }
}

/// Every pool of the proxy.
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<NodePool>>>,
    settings: Mutex<PoolSettings>,
}

impl Pools {
    /// No pools yet; they are created on first use.
    pub fn new(settings: PoolSettings) -> Self {
        Pools {
            pools: Mutex::new(HashMap::new()),
            settings: Mutex::new(settings),
        }
    }

    /// The pool for `key`, created on first use with `target`.
    pub fn get(&self, key: &PoolKey, target: impl FnOnce() -> BackendTarget) -> Arc<NodePool> {
        let mut pools = self.pools.lock().expect("pools lock");
        if let Some(p) = pools.get(key) {
            return p.clone();
        }
        let settings = self.settings.lock().expect("pools lock").clone();
        let p = Arc::new(NodePool::new(key.clone(), target(), settings));
        pools.insert(key.clone(), p.clone());
        p
    }

    /// Applies new settings to every pool (sizes grow at once and shrink as
    /// connections are returned).
    pub fn reconfigure(&self, settings: PoolSettings) {
        *self.settings.lock().expect("pools lock") = settings.clone();
        for p in self.pools.lock().expect("pools lock").values() {
            p.resize(settings.clone());
        }
    }

    /// Statistics of every pool.
    pub fn stats(&self) -> Vec<PoolStats> {
        let mut v: Vec<_> = self.all().iter().map(|p| p.stats()).collect();
        v.sort_by(|a, b| (a.node, &a.user, &a.database).cmp(&(b.node, &b.user, &b.database)));
        v
    }

    /// The idle connections of every pool.
    pub fn idle_servers(&self) -> Vec<IdleServer> {
        self.all().iter().flat_map(|p| p.idle_servers()).collect()
    }

    /// Expires idle connections and tops pools up to `min_idle`; the proxy
    /// runs this every second.
    pub async fn maintain(&self) {
        for p in self.all() {
            p.maintain().await;
        }
    }

    /// Closes idle connections of every pool (at shutdown).
    pub fn close_idle(&self) {
        for p in self.all() {
            p.close_idle();
        }
    }

    /// Every pool, taken out of the lock (so that what is done with them
    /// holds no lock other sessions need for checkout).
    fn all(&self) -> Vec<Arc<NodePool>> {
        self.pools
            .lock()
            .expect("pools lock")
            .values()
            .cloned()
            .collect()
    }
}
