//! Starting the proxy: the lag monitor, the client listener (each accepted
//! connection runs its startup phase, then its session, in a task of its
//! own), the admin endpoint and the periodic tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use lagrouter::{Connector, LagMonitor, LoadBalance, MonitorConfig, MonitorTarget, Router};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OnceCell, watch};
use tracing::{Instrument, error, info, warn};

use super::admin;
use super::clients::ClientStatus;
use super::error::ProxyError;
use super::handle::ProxyHandle;
use super::settings::Settings;
use super::shared::{ConnectionGuard, NodeAddr, Shared};
use crate::backend::Pools;
use crate::config::Config;
use crate::metrics as m;

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
        let workers =
            super::workers::Workers::start(config.proxy.workers).map_err(ProxyError::Workers)?;

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let router: &'static Router =
            Box::leak(Box::new(Router::new(nodes.len(), LoadBalance::RoundRobin)));
        let pool_settings = settings.pool_settings();
        let shared = Arc::new(Shared {
            settings: RwLock::new(Arc::new(settings)),
            settings_epoch: AtomicU64::new(0),
            nodes,
            monitor,
            router,
            pools: Pools::new(pool_settings),
            classifier: crate::classify::Classifier::new(10_000),
            catalog: Default::default(),
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
            stats: crate::stats::Stats::new(config.nodes.len()),
            registry: Default::default(),
            pause: Default::default(),
            config_path: Mutex::new(None),
            history: Mutex::new(super::history::LagHistory::new(
                config.nodes.iter().map(|n| n.name.clone()).collect(),
                super::history::HISTORY_SAMPLES,
            )),
            shutdown_request: watch::Sender::new(false),
            route_counters: std::sync::OnceLock::new(),
            workers,
        });

        // Admin endpoint.
        let metrics_handle = admin::install_metrics_recorder();
        m::describe_metrics();
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
                            metrics::counter!(m::CLIENT_CONNECTIONS_TOTAL).increment(1);
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
        info!(%local_addr, %admin_addr, workers = shared.workers.len(), "lagrouter-proxy listening");
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
    conn.fatal(&crate::wire::PgError::fatal(
        "53300",
        "sorry, too many clients already",
    ))
    .await;
}

impl Shared {
    /// Runs a client connection on a worker thread, tracked for shutdown.
    fn spawn_session(self: &Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        // The socket moves to the worker's event loop: deregistered here,
        // registered again on the worker's thread.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!(error = %e, %peer, "could not hand the connection to a worker");
                return;
            }
        };
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let shared = self.clone();
        self.connections.fetch_add(1, Ordering::SeqCst);
        let guard = ConnectionGuard(self.clone());
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let span = tracing::info_span!("client", id);
        let task = self.workers.spawn(move || {
            async move {
                let _guard = guard;
                match tokio::net::TcpStream::from_std(tcp) {
                    Ok(tcp) => serve_client(shared.clone(), tcp, peer, id).await,
                    Err(e) => warn!(error = %e, %peer, "could not register the connection"),
                }
                shared.sessions.lock().expect("sessions lock").remove(&id);
            }
            .instrument(span)
        });
        if !task.is_finished() {
            sessions.insert(id, task.abort_handle());
        }
    }
}

/// Runs one client connection: its startup phase, then its session (or
/// the admin console), registered for `SHOW CLIENTS` while it lasts.
async fn serve_client(shared: Arc<Shared>, tcp: tokio::net::TcpStream, peer: SocketAddr, id: u64) {
    // Boxed: the startup phase's future is large and done with before the
    // session starts. (The connection and its startup are moved into the
    // session's future in a block: the task keeps no room for them.)
    let (_registration, serve) = {
        let Some((conn, info)) = Box::pin(crate::frontend::accept(&shared, tcp, peer)).await else {
            return;
        };
        let status = Arc::new(ClientStatus::new(
            id,
            info.entry.clone(),
            &info.database,
            peer,
            conn.is_tls(),
            info.params
                .get("application_name")
                .map_or("", |a| a.as_str()),
        ));
        let registration = shared.registry.register(status.clone());
        let serve = match info.console {
            Some(role) => Either::Left(crate::console::run(shared, conn, info, role)),
            None => Either::Right(crate::session::run(shared, conn, info, status)),
        };
        (registration, serve)
    };
    serve.await;
}
