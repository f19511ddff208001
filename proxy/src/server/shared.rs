//! State shared by every session: the settings snapshot, the lag monitor,
//! the router, the pools, the classifier, cancel keys, the session registry
//! and the client counts. This file depends on neither the client side nor
//! the session: they use it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use lagrouter::{LagMonitor, Router};
use serde::Serialize;
use tokio::sync::{Notify, OnceCell, watch};
use tracing::{info, warn};

use super::settings::Settings;
use crate::backend::{BackendConn, BackendError, BackendTarget, Pools};
use crate::metrics as m;

pub use super::clients::CancelSlot;

/// Node addresses, fixed at start.
#[derive(Clone, Debug)]
pub(super) struct NodeAddr {
    /// Configured name.
    pub(super) name: String,
    /// Host name or address.
    pub(super) host: String,
    /// TCP port.
    pub(super) port: u16,
}

/// State shared by every session.
pub struct Shared {
    /// The settings in force (replaced on reload).
    pub(super) settings: RwLock<Arc<Settings>>,
    /// Counts reloads: sessions keep the settings they last read and take
    /// them again only when this changed (an atomic load, where reading
    /// the lock and cloning the `Arc` would write to memory every session
    /// on every thread shares).
    pub(super) settings_epoch: AtomicU64,
    /// Node addresses, by node index.
    pub(super) nodes: Vec<NodeAddr>,
    /// The background lag/health monitor.
    pub monitor: LagMonitor,
    /// The routing library's router.
    pub(super) router: &'static Router,
    /// Backend pools.
    pub pools: Pools,
    /// The statement classifier (with its cache).
    pub classifier: crate::classify::Classifier,
    /// What the proxy knows about the schema (epoch of the last DDL).
    pub catalog: super::catalog::Catalog,
    /// Cancel keys: session pid → (secret, where its query runs).
    pub(super) cancels: Mutex<HashMap<i32, (i32, Arc<super::clients::ClientStatus>)>>,
    /// Becomes `true` when shutdown begins.
    pub(super) shutdown: watch::Receiver<bool>,
    /// The server's parameter names, learnt from the first backend.
    pub(super) guc_names: OnceCell<Arc<HashSet<String>>>,
    /// Client sessions open (logged in).
    pub(super) clients: AtomicUsize,
    /// Client sockets open, logged in or not (what
    /// `max_client_connections` limits).
    pub(super) connections: AtomicUsize,
    /// Client sessions since start.
    pub(super) clients_total: AtomicU64,
    /// Notified when the last client session ends.
    pub(super) clients_gone: Notify,
    /// Running connection tasks, aborted at the end of shutdown.
    pub(super) sessions: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    /// Id of the next connection task.
    pub(super) next_session: AtomicU64,
    /// When the proxy started.
    pub(super) started: Instant,
    /// Counters for the console's `SHOW STATS`.
    pub stats: crate::stats::Stats,
    /// Connected clients, for the console.
    pub registry: Arc<super::clients::ClientRegistry>,
    /// `PAUSE` / `RESUME`.
    pub pause: super::clients::PauseGate,
    /// The configuration file `RELOAD` reads (none in demo mode).
    pub(super) config_path: Mutex<Option<std::path::PathBuf>>,
    /// Lag samples for the status page.
    pub(super) history: Mutex<super::history::LagHistory>,
    /// Set by the console's `SHUTDOWN`; whoever runs the proxy watches it
    /// ([`super::ProxyHandle::shutdown_requested`]).
    pub(super) shutdown_request: watch::Sender<bool>,
    /// The query path's counters, registered on first use (after the
    /// metrics recorder is installed).
    pub(super) route_counters: std::sync::OnceLock<crate::metrics::RouteCounters>,
    /// The threads that run the sessions.
    pub(super) workers: super::workers::Workers,
}

/// Decrements the connection count when a client socket is closed.
pub(super) struct ConnectionGuard(pub(super) Arc<Shared>);

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
        metrics::gauge!(m::CLIENTS).set(left as f64);
        if left == 0 {
            self.0.clients_gone.notify_waiters();
        }
    }
}

impl Shared {
    /// The query path's counters (see [`crate::metrics::RouteCounters`]).
    pub fn route_counters(&self) -> &crate::metrics::RouteCounters {
        self.route_counters.get_or_init(|| {
            crate::metrics::RouteCounters::new(self.nodes.iter().map(|n| n.name.as_str()))
        })
    }

    /// The settings if they changed since `epoch` (see `settings_epoch`),
    /// with the new epoch.
    pub fn settings_since(&self, epoch: u64) -> Option<(u64, Arc<Settings>)> {
        let now = self.settings_epoch.load(Ordering::Acquire);
        (now != epoch).then(|| (now, self.settings()))
    }

    /// The current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// The routing library's router (per-node in-flight counts).
    pub fn router(&self) -> &'static Router {
        self.router
    }

    /// A receiver that changes when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Counts a client session until the guard drops.
    pub fn client_guard(self: &Arc<Self>) -> ClientGuard {
        let n = self.clients.fetch_add(1, Ordering::SeqCst) + 1;
        self.clients_total.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::CLIENTS).set(n as f64);
        ClientGuard(self.clone())
    }

    /// Allocates the (pid, secret) a session reports in `BackendKeyData`;
    /// a cancel request with them goes to whatever `client`'s cancel slot
    /// (`ClientStatus::server`) holds.
    pub fn register_session(&self, client: Arc<super::clients::ClientStatus>) -> (i32, i32) {
        let mut map = self.cancels.lock().expect("cancel map");
        loop {
            let pid = rand::random::<i32>() & 0x3fff_ffff;
            if pid == 0 || map.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<i32>();
            map.insert(pid, (secret, client));
            return (pid, secret);
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
                Some((s, client)) if *s == secret => *client.server.lock().expect("cancel slot"),
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

    /// The `/status` document.
    pub(super) fn status_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Status<'a> {
            topology: &'a lagrouter::Topology,
            pools: Vec<crate::backend::PoolStats>,
            clients: usize,
            connections: usize,
            clients_total: u64,
            policy: &'static str,
            uptime_seconds: f64,
            /// Lag per node over the last minutes, one sample a second.
            history: Vec<super::history::NodeHistory>,
            /// Reads, fallbacks and token waits per node and policy.
            stats: Vec<StatsRow>,
            /// Reads refused with 55000 (token ahead of the primary).
            tokens_ahead: u64,
            /// Connections (logging in or in session) on each worker thread.
            workers: Vec<usize>,
        }
        #[derive(Serialize)]
        struct StatsRow {
            node: String,
            policy: &'static str,
            statements: u64,
            writes: u64,
            reads: u64,
            replica_reads: u64,
            fallbacks: BTreeMap<&'static str, u64>,
            token_waits: u64,
            token_wait_seconds: f64,
        }
        let topo = self.monitor.snapshot();
        let stats = self
            .stats
            .rows()
            .into_iter()
            .map(|r| StatsRow {
                node: self
                    .nodes
                    .get(r.node)
                    .map(|n| n.name.clone())
                    .unwrap_or_default(),
                policy: r.policy,
                statements: r.statements,
                writes: r.writes,
                reads: r.reads,
                replica_reads: r.replica_reads,
                fallbacks: crate::stats::FALLBACK_REASONS
                    .iter()
                    .zip(r.fallbacks)
                    .map(|(reason, n)| (reason.label(), n))
                    .collect(),
                token_waits: r.token_waits,
                token_wait_seconds: r.token_wait_us as f64 / 1e6,
            })
            .collect();
        serde_json::to_value(Status {
            topology: &topo,
            pools: self.pools.stats(),
            clients: self.clients.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
            clients_total: self.clients_total.load(Ordering::Relaxed),
            policy: self.settings().policy.label(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            history: self.history.lock().expect("history").per_node(),
            stats,
            tokens_ahead: self.stats.tokens_ahead(),
            workers: self.workers.loads(),
        })
        .unwrap_or_default()
    }

    /// Node names, by index.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// A node's configured host and port.
    pub fn node_address(&self, node: usize) -> Option<(String, u16)> {
        self.nodes.get(node).map(|n| (n.host.clone(), n.port))
    }

    /// Client sessions open, client sockets open, sessions since start.
    pub fn client_counts(&self) -> (usize, usize, u64) {
        (
            self.clients.load(Ordering::SeqCst),
            self.connections.load(Ordering::SeqCst),
            self.clients_total.load(Ordering::Relaxed),
        )
    }

    /// How long the proxy has been running.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Asks whoever runs the proxy to shut it down gracefully (the
    /// console's `SHUTDOWN`).
    pub fn request_shutdown(&self) {
        self.shutdown_request.send_replace(true);
    }

    /// Applies a new configuration: routing policy and timings (except the
    /// monitor interval and probe timeout), users, pool sizes and timeouts,
    /// TLS files, client limits and console users. Nodes and listen
    /// addresses are kept as started.
    pub fn reload(&self, config: crate::config::Config) -> Result<(), super::ProxyError> {
        let old = self.settings();
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
        self.pools.reconfigure(settings.pool_settings());
        *self.settings.write().expect("settings lock") = Arc::new(settings);
        self.settings_epoch.fetch_add(1, Ordering::Release);
        info!("configuration reloaded");
        Ok(())
    }

    /// Re-reads the configuration file the proxy was started with
    /// ([`super::ProxyHandle::set_config_path`]) and applies it.
    pub fn reload_from_file(&self) -> Result<std::path::PathBuf, super::ProxyError> {
        let path = self
            .config_path
            .lock()
            .expect("config path")
            .clone()
            .ok_or(super::ProxyError::NoConfigFile)?;
        let config = crate::config::Config::load(&path)?;
        self.reload(config)?;
        Ok(path)
    }

    /// `/health`: whether the primary is reachable.
    pub(super) fn healthy(&self) -> bool {
        let topo = self.monitor.snapshot();
        topo.primary.is_some_and(|p| topo.nodes[p].healthy)
    }

    /// Publishes the lag and pool gauges, and records a lag sample for the
    /// status page.
    pub(super) fn publish_gauges(&self) {
        let topo = self.monitor.snapshot();
        self.history.lock().expect("history").record(
            topo.nodes
                .iter()
                .map(|n| (n.lag_bytes, n.lag.map(|l| l.as_secs_f64())))
                .collect(),
        );
        for n in &topo.nodes {
            if let Some(b) = n.lag_bytes {
                metrics::gauge!(m::REPLICA_LAG_BYTES, m::LABEL_NODE => n.name.clone())
                    .set(b as f64);
            }
            if let Some(l) = n.lag {
                metrics::gauge!(m::REPLICA_LAG_SECONDS, m::LABEL_NODE => n.name.clone())
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
            metrics::gauge!(m::POOL_CONNECTIONS, m::LABEL_NODE => n.name.clone(), m::LABEL_STATE => "idle")
                .set(idle as f64);
            metrics::gauge!(m::POOL_CONNECTIONS, m::LABEL_NODE => n.name.clone(), m::LABEL_STATE => "active")
                .set(active as f64);
        }
    }
}
