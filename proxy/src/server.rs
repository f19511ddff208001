//! The proxy as a whole: listeners, shared state (configuration, lag
//! monitor, router, pools, cancel keys), graceful shutdown and reload.
//!
//! ```no_run
//! # async fn demo(config: lagrouter_proxy::config::Config) -> Result<(), lagrouter_proxy::server::ProxyError> {
//! let proxy = lagrouter_proxy::server::Proxy::start(config).await?;
//! println!("listening on {}", proxy.local_addr());
//! proxy.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use lagrouter::{
    Connector, Consistency, LagMonitor, LoadBalance, MonitorConfig, MonitorTarget, Router,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OnceCell, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::admin;
use crate::auth::ScramVerifier;
use crate::backend::{BackendConn, BackendError, BackendTarget, CancelTarget};
use crate::config::{AuthMethod, Config, PasswordKind};
use crate::pool::{PoolSettings, Pools};

/// Counter: units of work routed, by `target` (`primary`, `primary_read`,
/// `replica`, `replica_checked`) and `node`.
pub const ROUTED_TOTAL: &str = "lagrouter_proxy_routed_total";
/// Counter: consistency tokens accepted from clients.
pub const TOKENS_ACCEPTED_TOTAL: &str = "lagrouter_proxy_tokens_accepted_total";
/// Counter: sessions pinned to the primary by session-bound state.
pub const PINNED_SESSIONS_TOTAL: &str = "lagrouter_proxy_pinned_sessions_total";

/// Why the proxy could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A user's stored password cannot be used with its method.
    #[error("user {user}: {message}")]
    User {
        /// The user.
        user: String,
        /// What is wrong.
        message: String,
    },
}

/// A configured user, prepared for authentication.
#[derive(Clone, Debug)]
pub struct UserEntry {
    /// Client user name.
    pub name: String,
    /// Authentication method.
    pub auth: AuthMethod,
    /// The configured password (plain text or md5 hash) for md5.
    pub password: String,
    /// SCRAM verifier for `scram-sha-256`.
    pub scram: Option<ScramVerifier>,
    /// Backend user.
    pub server_user: String,
    /// Backend password.
    pub server_password: Option<String>,
}

/// Settings that can change on reload.
pub struct Settings {
    /// The configuration they come from.
    pub config: Config,
    /// The read policy.
    pub policy: Consistency,
    /// Users by name.
    pub users: HashMap<String, Arc<UserEntry>>,
    /// TLS for clients, when configured.
    pub tls: Option<TlsAcceptor>,
}

impl Settings {
    fn build(config: Config, previous: Option<&Settings>) -> Result<Settings, ProxyError> {
        config.validate()?;
        let mut users = HashMap::new();
        for u in &config.users {
            // Reuse the verifier of an unchanged user (PBKDF2 is slow).
            let reuse = previous
                .and_then(|p| p.users.get(&u.name))
                .filter(|e| e.password == u.password && e.auth == u.auth)
                .and_then(|e| e.scram.clone());
            let scram = match (u.auth, u.password_kind()) {
                (AuthMethod::ScramSha256, PasswordKind::ScramVerifier) => Some(
                    ScramVerifier::parse(&u.password).map_err(|e| ProxyError::User {
                        user: u.name.clone(),
                        message: e.to_string(),
                    })?,
                ),
                (AuthMethod::ScramSha256, PasswordKind::Plain) => {
                    Some(reuse.unwrap_or_else(|| ScramVerifier::from_password(&u.password)))
                }
                (AuthMethod::ScramSha256, PasswordKind::Md5Hash) => {
                    return Err(ProxyError::User {
                        user: u.name.clone(),
                        message: "an md5 hash cannot be used with scram-sha-256".into(),
                    });
                }
                (AuthMethod::Md5, PasswordKind::ScramVerifier) => {
                    return Err(ProxyError::User {
                        user: u.name.clone(),
                        message: "a SCRAM verifier cannot be used with md5".into(),
                    });
                }
                _ => None,
            };
            users.insert(
                u.name.clone(),
                Arc::new(UserEntry {
                    name: u.name.clone(),
                    auth: u.auth,
                    password: u.password.clone(),
                    scram,
                    server_user: u.effective_server_user().to_string(),
                    server_password: u.effective_server_password().map(str::to_string),
                }),
            );
        }
        let tls = match &config.tls {
            Some(t) => Some(TlsAcceptor::from(crate::tls::load_server_config(
                &t.cert, &t.key,
            )?)),
            None => None,
        };
        Ok(Settings {
            policy: config.routing.consistency(),
            users,
            tls,
            config,
        })
    }

    fn pool_settings(&self) -> PoolSettings {
        let p = &self.config.pool;
        PoolSettings {
            size: p.size,
            node_sizes: self.config.nodes.iter().map(|n| n.pool_size).collect(),
            min_idle: p.min_idle,
            checkout_timeout: p.checkout_timeout,
            connect_timeout: p.connect_timeout,
            idle_timeout: p.server_idle_timeout,
            max_lifetime: Duration::ZERO,
        }
    }
}

/// Where a session's current query can be cancelled.
pub type CancelSlot = Mutex<Option<CancelTarget>>;

/// Node addresses, fixed at start.
#[derive(Clone, Debug)]
struct NodeAddr {
    name: String,
    host: String,
    port: u16,
}

/// State shared by every session.
pub struct Shared {
    settings: RwLock<Arc<Settings>>,
    nodes: Vec<NodeAddr>,
    /// The background lag/health monitor.
    pub monitor: LagMonitor,
    router: RwLock<&'static Router>,
    /// Backend pools.
    pub pools: Pools,
    /// The statement classifier (with its cache).
    pub classifier: crate::classify::Classifier,
    cancels: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
    shutdown: watch::Receiver<bool>,
    guc_names: OnceCell<Arc<HashSet<String>>>,
    clients: AtomicUsize,
    /// Client sockets open, logged in or not (what
    /// `max_client_connections` limits).
    connections: AtomicUsize,
    clients_total: AtomicU64,
    clients_gone: Notify,
    sessions: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next_session: AtomicU64,
    started: Instant,
}

/// Decrements the connection count when a client socket is closed.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Decrements the client count when a session ends.
pub struct ClientGuard(Arc<Shared>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let left = self.0.clients.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!(admin::CLIENTS).set(left as f64);
        if left == 0 {
            self.0.clients_gone.notify_waiters();
        }
    }
}

impl Shared {
    /// The current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// The routing library's router (per-node in-flight counts).
    pub fn router(&self) -> &'static Router {
        *self.router.read().expect("router lock")
    }

    /// A receiver that changes when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Counts a client session until the guard drops.
    pub fn client_guard(self: &Arc<Self>) -> ClientGuard {
        let n = self.clients.fetch_add(1, Ordering::SeqCst) + 1;
        self.clients_total.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(admin::CLIENTS).set(n as f64);
        ClientGuard(self.clone())
    }

    /// Allocates the (pid, secret) a session reports in `BackendKeyData`.
    pub fn register_session(&self) -> (i32, i32, Arc<CancelSlot>) {
        let slot = Arc::new(Mutex::new(None));
        let mut map = self.cancels.lock().expect("cancel map");
        loop {
            let pid = rand::random::<i32>() & 0x3fff_ffff;
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<i32>();
            map.insert(pid, (secret, slot.clone()));
            return (pid, secret, slot);
        }
    }

    /// Forgets a session's cancel key.
    pub fn unregister_session(&self, pid: i32) {
        self.cancels.lock().expect("cancel map").remove(&pid);
    }

    /// Handles a client's `CancelRequest`: forwards it to the backend
    /// currently running that session's query, if any.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = {
            let map = self.cancels.lock().expect("cancel map");
            match map.get(&pid) {
                Some((s, slot)) if *s == secret => *slot.lock().expect("cancel slot"),
                _ => {
                    warn!(pid, "cancel request with an unknown key ignored");
                    return;
                }
            }
        };
        match target {
            Some(t) => {
                info!(pid, backend_pid = t.pid, "forwarding cancel request");
                if let Err(e) = crate::backend::send_cancel(t).await {
                    warn!(pid, error = %e, "cancel request failed");
                }
            }
            None => info!(pid, "cancel request for an idle session ignored"),
        }
    }

    /// Where node `node` is, as `user` on `database`.
    pub fn backend_target(
        &self,
        node: usize,
        user: &str,
        password: Option<String>,
        database: &str,
    ) -> BackendTarget {
        let n = &self.nodes[node.min(self.nodes.len() - 1)];
        BackendTarget {
            host: n.host.clone(),
            port: n.port,
            user: user.to_string(),
            password,
            database: database.to_string(),
        }
    }

    /// The server's parameter names (lower-cased), to validate startup
    /// parameters; learnt once from the first backend.
    pub async fn guc_names(
        &self,
        conn: &mut BackendConn,
    ) -> Result<Arc<HashSet<String>>, BackendError> {
        self.guc_names
            .get_or_try_init(|| async {
                let rows = conn
                    .simple_query("SELECT name FROM pg_catalog.pg_settings")
                    .await?;
                Ok(Arc::new(
                    rows.into_iter()
                        .filter_map(|r| r.into_iter().next().flatten())
                        .map(|n| n.to_ascii_lowercase())
                        .collect(),
                ))
            })
            .await
            .cloned()
    }

    /// Runs a client connection in its own task, tracked for shutdown.
    fn spawn_session(self: &Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let shared = self.clone();
        self.connections.fetch_add(1, Ordering::SeqCst);
        let guard = ConnectionGuard(self.clone());
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let task = tokio::spawn(async move {
            let _guard = guard;
            crate::frontend::handle(shared.clone(), tcp, peer).await;
            shared.sessions.lock().expect("sessions lock").remove(&id);
        });
        if !task.is_finished() {
            sessions.insert(id, task.abort_handle());
        }
    }

    fn status_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Status<'a> {
            topology: &'a lagrouter::Topology,
            pools: Vec<crate::pool::PoolStats>,
            clients: usize,
            connections: usize,
            clients_total: u64,
            policy: &'static str,
            uptime_seconds: f64,
        }
        let topo = self.monitor.snapshot();
        serde_json::to_value(Status {
            topology: &topo,
            pools: self.pools.stats(),
            clients: self.clients.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
            clients_total: self.clients_total.load(Ordering::Relaxed),
            policy: self.settings().policy.label(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
        })
        .unwrap_or_default()
    }

    fn healthy(&self) -> bool {
        let topo = self.monitor.snapshot();
        topo.primary.is_some_and(|p| topo.nodes[p].healthy)
    }

    fn publish_gauges(&self) {
        let topo = self.monitor.snapshot();
        for n in &topo.nodes {
            if let Some(b) = n.lag_bytes {
                metrics::gauge!(admin::REPLICA_LAG_BYTES, admin::LABEL_NODE => n.name.clone())
                    .set(b as f64);
            }
            if let Some(l) = n.lag {
                metrics::gauge!(admin::REPLICA_LAG_SECONDS, admin::LABEL_NODE => n.name.clone())
                    .set(l.as_secs_f64());
            }
        }
        let mut per_node: HashMap<usize, (usize, usize)> = HashMap::new();
        for p in self.pools.stats() {
            let e = per_node.entry(p.node).or_default();
            e.0 += p.idle;
            e.1 += p.in_use;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let (idle, active) = per_node.get(&i).copied().unwrap_or_default();
            metrics::gauge!(admin::POOL_CONNECTIONS, admin::LABEL_NODE => n.name.clone(), admin::LABEL_STATE => "idle")
                .set(idle as f64);
            metrics::gauge!(admin::POOL_CONNECTIONS, admin::LABEL_NODE => n.name.clone(), admin::LABEL_STATE => "active")
                .set(active as f64);
        }
    }
}

/// Entry point: [`Proxy::start`].
pub struct Proxy;

impl Proxy {
    /// Starts the proxy: lag monitor, client listener and admin endpoint.
    /// Returns once both listeners are bound and the monitor has probed
    /// every node once (or 5 s passed).
    pub async fn start(config: Config) -> Result<ProxyHandle, ProxyError> {
        let settings = Settings::build(config, None)?;
        let config = settings.config.clone();
        let nodes: Vec<NodeAddr> = config
            .nodes
            .iter()
            .map(|n| NodeAddr {
                name: n.name.clone(),
                host: n.host.clone(),
                port: n.port,
            })
            .collect();
        // The monitor logs in with the first user's server credentials.
        let monitor_user = config.users.first();
        let targets = config
            .nodes
            .iter()
            .map(|n| {
                let mut pg = tokio_postgres::Config::new();
                pg.host(&n.host)
                    .port(n.port)
                    .dbname("postgres")
                    .application_name("lagrouter-proxy-monitor")
                    .connect_timeout(config.routing.probe_timeout);
                if let Some(u) = monitor_user {
                    pg.user(u.effective_server_user());
                    if let Some(p) = u.effective_server_password() {
                        pg.password(p);
                    }
                }
                MonitorTarget {
                    name: n.name.clone(),
                    role: n.role.into(),
                    config: pg,
                }
            })
            .collect();
        let monitor = LagMonitor::spawn(
            targets,
            MonitorConfig {
                interval: config.routing.monitor_interval,
                probe_timeout: config.routing.probe_timeout,
                ..MonitorConfig::default()
            },
            Connector::NoTls,
        );
        let listener = TcpListener::bind(config.proxy.listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: config.proxy.listen,
                source,
            })?;
        let admin_listener =
            TcpListener::bind(config.proxy.admin_listen)
                .await
                .map_err(|source| ProxyError::Bind {
                    addr: config.proxy.admin_listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: config.proxy.listen,
            source,
        })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| ProxyError::Bind {
                addr: config.proxy.admin_listen,
                source,
            })?;
        monitor.first_probe(Duration::from_secs(5)).await;

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let router: &'static Router =
            Box::leak(Box::new(Router::new(nodes.len(), LoadBalance::RoundRobin)));
        let pool_settings = settings.pool_settings();
        let shared = Arc::new(Shared {
            settings: RwLock::new(Arc::new(settings)),
            nodes,
            monitor,
            router: RwLock::new(router),
            pools: Pools::new(pool_settings),
            classifier: crate::classify::Classifier::new(10_000),
            cancels: Mutex::new(HashMap::new()),
            shutdown: shutdown_rx.clone(),
            guc_names: OnceCell::new(),
            clients: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            clients_total: AtomicU64::new(0),
            clients_gone: Notify::new(),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            started: Instant::now(),
        });

        // Admin endpoint.
        let metrics_handle = admin::install_metrics_recorder();
        admin::describe_metrics();
        let (s1, s2) = (shared.clone(), shared.clone());
        let state = admin::AdminState::new(
            metrics_handle,
            move || s1.healthy(),
            move || s2.status_json(),
        );
        let mut admin_shutdown = shutdown_rx.clone();
        let admin_task = tokio::spawn(async move {
            let stop = async move {
                let _ = admin_shutdown.wait_for(|s| *s).await;
            };
            if let Err(e) = admin::serve(admin_listener, state, stop).await {
                error!(error = %e, "admin endpoint failed");
            }
        });

        // Gauges.
        let weak = Arc::downgrade(&shared);
        let gauges_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                s.publish_gauges();
            }
        });

        // Pool maintenance: idle expiry and min_idle.
        let weak = Arc::downgrade(&shared);
        let maintain_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { return };
                s.pools.maintain().await;
            }
        });

        // Client listener.
        let accept_shared = shared.clone();
        let mut accept_shutdown = shutdown_rx.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = async { let _ = accept_shutdown.wait_for(|s| *s).await; } => break,
                    r = listener.accept() => match r {
                        Ok((tcp, peer)) => {
                            metrics::counter!(admin::CLIENT_CONNECTIONS_TOTAL).increment(1);
                            let max = accept_shared.settings().config.proxy.max_client_connections;
                            if accept_shared.connections.load(Ordering::SeqCst) >= max {
                                let s = accept_shared.clone();
                                tokio::spawn(refuse(s, tcp, peer));
                                continue;
                            }
                            accept_shared.spawn_session(tcp, peer);
                        }
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
        info!(%local_addr, %admin_addr, "lagrouter-proxy listening");
        Ok(ProxyHandle {
            shared,
            local_addr,
            admin_addr,
            shutdown_tx,
            tasks: vec![accept_task, admin_task, gauges_task, maintain_task],
        })
    }
}

/// Refuses a client over the connection limit with SQLSTATE 53300.
async fn refuse(_shared: Arc<Shared>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
    let mut conn =
        crate::frontend::ClientConn::new(crate::frontend::ClientStream::Plain(tcp), peer);
    conn.fatal(&crate::protocol::PgError::fatal(
        "53300",
        "sorry, too many clients already",
    ))
    .await;
}

/// A running proxy.
pub struct ProxyHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ProxyHandle {
    /// The PostgreSQL protocol listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin endpoint's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The latest topology snapshot.
    pub fn topology(&self) -> Arc<lagrouter::Topology> {
        self.shared.monitor.snapshot()
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.shared.settings().config.clone()
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        self.shared.status_json()
    }

    /// Client sessions currently open.
    pub fn clients(&self) -> usize {
        self.shared.clients.load(Ordering::SeqCst)
    }

    /// Applies a new configuration: routing policy and timings (except the
    /// monitor interval and probe timeout), users, pool sizes and timeouts,
    /// TLS files and client limits. Nodes and listen addresses are kept as
    /// started.
    pub fn reload(&self, config: Config) -> Result<(), ProxyError> {
        let old = self.shared.settings();
        let mut config = config;
        if config.nodes != old.config.nodes {
            warn!("reload: [[nodes]] changes need a restart and are ignored");
            config.nodes = old.config.nodes.clone();
        }
        if config.proxy.listen != old.config.proxy.listen
            || config.proxy.admin_listen != old.config.proxy.admin_listen
        {
            warn!("reload: listen address changes need a restart and are ignored");
            config.proxy.listen = old.config.proxy.listen;
            config.proxy.admin_listen = old.config.proxy.admin_listen;
        }
        let settings = Settings::build(config, Some(&old))?;
        self.shared.pools.reconfigure(settings.pool_settings());
        *self.shared.settings.write().expect("settings lock") = Arc::new(settings);
        info!("configuration reloaded");
        Ok(())
    }

    /// Graceful shutdown: stops accepting, lets sessions finish their
    /// current transaction (idle ones are closed at once) for up to
    /// `proxy.shutdown_timeout`, then closes everything.
    pub async fn shutdown(self) {
        let timeout = self.shared.settings().config.proxy.shutdown_timeout;
        let _ = self.shutdown_tx.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let gone = self.shared.clients_gone.notified();
            if self.shared.clients.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                warn!(
                    clients = self.shared.clients.load(Ordering::SeqCst),
                    "shutdown timeout: closing remaining sessions"
                );
                break;
            }
        }
        let remaining: Vec<_> = self
            .shared
            .sessions
            .lock()
            .expect("sessions lock")
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in remaining {
            h.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.shared.pools.close_idle();
        info!("lagrouter-proxy stopped");
    }
}
