//! One node of a Docker cluster: its testcontainers container, published
//! port, run state, network links and log.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testcontainers::bollard::Docker;
use testcontainers::bollard::models::{Mount, MountType, MountVolumeOptions};
use testcontainers::bollard::query_parameters::{
    KillContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use testcontainers::core::IntoContainerPort;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use tokio::io::AsyncBufReadExt;

use super::engine::{docker_err, labels};
use crate::{HarnessError, NodeIndex, STARTUP_TIMEOUT, probe};

/// The data directory inside the containers (an anonymous volume).
pub(super) const PGDATA: &str = "/var/lib/postgresql/data";
/// Command of node containers.
const NODE_SCRIPT: &str = include_str!("node.sh");
/// Log lines kept per node for `log_tail`.
const LOG_LINES_KEPT: usize = 5000;
/// Attempts to find a free host port for a node's first start.
const PORT_ATTEMPTS: usize = 8;

pub(super) fn tc_err(
    context: &str,
) -> impl FnOnce(testcontainers::TestcontainersError) -> HarnessError + '_ {
    move |e| HarnessError::Docker(format!("{context}: {e}"))
}

/// What every container of a cluster shares.
pub(super) struct Blueprint {
    /// Cluster name: network name, container name prefix, label value.
    pub(super) cluster: String,
    pub(super) repository: String,
    pub(super) tag: String,
    /// Host address the published ports are bound to.
    pub(super) bind_ip: String,
}

impl Blueprint {
    /// A container request of the cluster's image running `script` with
    /// bash as the `postgres` user, labelled as the cluster's.
    pub(super) fn request(
        &self,
        name: &str,
        script: &'static str,
        env: &[(String, String)],
    ) -> testcontainers::ContainerRequest<GenericImage> {
        let mut req = GenericImage::new(&self.repository, &self.tag)
            .with_entrypoint("bash")
            .with_cmd(["-c", script, name])
            .with_container_name(name)
            .with_user("postgres")
            .with_labels(labels(&self.cluster))
            .with_env_var("PGDATA", PGDATA)
            .with_startup_timeout(Duration::from_secs(120));
        for (k, v) in env {
            req = req.with_env_var(k, v);
        }
        req
    }
}

/// Which networks a node is attached to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Links {
    /// The engine's default network, where the port is published.
    pub(super) clients: bool,
    /// The cluster's replication network.
    pub(super) peers: bool,
}

/// One container of the cluster.
pub(super) struct DockerNode {
    pub(super) index: NodeIndex,
    /// Container name.
    pub(super) name: String,
    /// Host name of the node on the cluster network.
    pub(super) alias: String,
    /// Published host port (the same across restarts).
    pub(super) port: u16,
    pub(super) container: Option<ContainerAsync<GenericImage>>,
    /// The network the port is published on (the engine's default).
    pub(super) clients_network: String,
    pub(super) cluster_network: String,
    running: Arc<AtomicBool>,
    paused: AtomicBool,
    pub(super) links: Mutex<Links>,
    logs: Arc<Mutex<VecDeque<String>>>,
    log_tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    generation: Arc<AtomicU64>,
}

impl DockerNode {
    /// Creates and starts the node's container (on the engine's default
    /// network only) and starts following its log. Does not wait for the
    /// server.
    pub(super) async fn create(
        docker: &Docker,
        bp: &Blueprint,
        index: NodeIndex,
        env: &[(String, String)],
    ) -> Result<DockerNode, HarnessError> {
        let name = format!("{}-node{index}", bp.cluster);
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let bind_ip = bp.bind_ip.clone();
            let volume_labels = labels(&bp.cluster);
            let req = bp
                .request(&name, NODE_SCRIPT, env)
                .with_mapped_port(port, 5432.tcp())
                .with_host_config_modifier(move |hc| {
                    for bindings in hc.port_bindings.iter_mut().flat_map(|m| m.values_mut()) {
                        for b in bindings.iter_mut().flatten() {
                            b.host_ip = Some(bind_ip.clone());
                        }
                    }
                    hc.mounts = Some(vec![Mount {
                        target: Some(PGDATA.to_string()),
                        typ: Some(MountType::VOLUME),
                        volume_options: Some(MountVolumeOptions {
                            labels: Some(volume_labels.clone()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]);
                });
            match req.start().await {
                Ok(container) => {
                    let node = DockerNode::adopt(docker, bp, index, name, port, container).await?;
                    return Ok(node);
                }
                Err(e) => {
                    // A container that was created but not started is not
                    // owned by a handle: remove it before trying again.
                    let _ = docker
                        .remove_container(
                            &name,
                            Some(
                                RemoveContainerOptionsBuilder::new()
                                    .force(true)
                                    .v(true)
                                    .build(),
                            ),
                        )
                        .await;
                    let text = e.to_string();
                    if text.contains("port is already allocated")
                        || text.contains("address already in use")
                    {
                        tracing::debug!(node = index, "host port {port} taken, retrying: {text}");
                        last_err = Some(text);
                        continue;
                    }
                    return Err(HarnessError::Docker(format!(
                        "starting container {name}: {text}"
                    )));
                }
            }
        }
        Err(HarnessError::Docker(format!(
            "starting container {name}: no free host port after {PORT_ATTEMPTS} attempts ({})",
            last_err.unwrap_or_default()
        )))
    }

    async fn adopt(
        docker: &Docker,
        bp: &Blueprint,
        index: NodeIndex,
        name: String,
        port: u16,
        container: ContainerAsync<GenericImage>,
    ) -> Result<DockerNode, HarnessError> {
        let info = docker
            .inspect_container(container.id(), None)
            .await
            .map_err(docker_err("inspecting the new container"))?;
        let clients_network = info
            .network_settings
            .and_then(|s| s.networks)
            .and_then(|n: HashMap<_, _>| n.into_keys().next())
            .unwrap_or_else(|| "bridge".to_string());
        let node = DockerNode {
            index,
            alias: format!("node{index}"),
            name,
            port,
            container: Some(container),
            clients_network,
            cluster_network: bp.cluster.clone(),
            running: Arc::new(AtomicBool::new(true)),
            paused: AtomicBool::new(false),
            links: Mutex::new(Links {
                clients: true,
                peers: false,
            }),
            logs: Arc::new(Mutex::new(VecDeque::new())),
            log_tasks: Mutex::new(Vec::new()),
            generation: Arc::new(AtomicU64::new(0)),
        };
        node.follow_logs();
        Ok(node)
    }

    pub(super) fn container(&self) -> &ContainerAsync<GenericImage> {
        self.container
            .as_ref()
            .expect("the container lives as long as the backend")
    }

    pub(super) fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Takes the container handle and stops following the log (teardown).
    pub(super) fn take_container(&mut self) -> Option<ContainerAsync<GenericImage>> {
        for t in self
            .log_tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.container.take()
    }

    /// (Re)starts collecting the container's output. Docker replays the
    /// whole log of the container, so the buffer is reset. When the output
    /// ends (the container stopped) and the node was not restarted since,
    /// the node counts as not running: this notices exits the harness did
    /// not cause.
    fn follow_logs(&self) {
        let mut tasks = self.log_tasks.lock().unwrap_or_else(|p| p.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let c = self.container();
        for (reader, watches_exit) in [(c.stdout(true), false), (c.stderr(true), true)] {
            let logs = Arc::clone(&self.logs);
            let running = Arc::clone(&self.running);
            let current = Arc::clone(&self.generation);
            let task = tokio::spawn(async move {
                let mut lines = reader.lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut buf = logs.lock().unwrap_or_else(|p| p.into_inner());
                    if buf.len() >= LOG_LINES_KEPT {
                        buf.pop_front();
                    }
                    buf.push_back(line);
                }
                if watches_exit && current.load(Ordering::SeqCst) == generation {
                    running.store(false, Ordering::SeqCst);
                }
            });
            tasks.push(task.abort_handle());
        }
    }

    pub(super) fn tail(&self, lines: usize) -> String {
        let buf = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let skip = buf.len().saturating_sub(lines);
        buf.iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the server accepts connections with `config` (and is or
    /// is not in recovery, when `expect_standby` says so), failing early
    /// when the container exits.
    pub(super) async fn wait_ready(
        &self,
        config: &tokio_postgres::Config,
        expect_standby: Option<bool>,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last_err: String;
        let mut last_inspect = Instant::now();
        loop {
            match probe(config).await {
                Ok(in_recovery) => match expect_standby {
                    Some(expected) if in_recovery != expected => {
                        return Err(self.startup_error(format!(
                            "pg_is_in_recovery() = {in_recovery}, expected {expected}"
                        )));
                    }
                    _ => return Ok(()),
                },
                Err(e) => last_err = e.to_string(),
            }
            if last_inspect.elapsed() >= Duration::from_millis(250) {
                last_inspect = Instant::now();
                if !self.container().is_running().await.unwrap_or(true) {
                    // Let the log follower drain the last lines.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.running.store(false, Ordering::SeqCst);
                    return Err(self.startup_error(format!(
                        "container {} exited before accepting connections",
                        self.name
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(self.startup_error(format!(
                    "not accepting connections after {STARTUP_TIMEOUT:?} (last error: {last_err})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn startup_error(&self, message: String) -> HarnessError {
        HarnessError::Startup {
            node: self.index,
            message,
            log_tail: self.tail(40),
        }
    }

    /// Sends `signal` to the server (the container's main process) and
    /// waits up to `timeout` for the container to stop, then kills it. A
    /// paused container is resumed first, so that it can act on the signal.
    pub(super) async fn shut_down(
        &self,
        docker: &Docker,
        signal: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        if self.paused.swap(false, Ordering::SeqCst) {
            self.container()
                .unpause()
                .await
                .map_err(tc_err("resuming the container"))?;
        }
        let id = self.container().id().to_string();
        let kill = |signal: &str| {
            let options = KillContainerOptionsBuilder::new().signal(signal).build();
            let docker = docker.clone();
            let id = id.clone();
            async move { docker.kill_container(&id, Some(options)).await }
        };
        kill(signal)
            .await
            .map_err(docker_err("signalling the container"))?;
        if !self.wait_stopped(timeout).await? {
            tracing::warn!(
                node = self.index,
                "no exit {timeout:?} after {signal}; killing the container"
            );
            let _ = kill("SIGKILL").await;
            if !self.wait_stopped(Duration::from_secs(30)).await? {
                return Err(HarnessError::Timeout {
                    what: format!("container {} to stop", self.name),
                    timeout,
                    detail: self.tail(40),
                });
            }
        }
        self.running.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Polls until the container is no longer running.
    async fn wait_stopped(&self, timeout: Duration) -> Result<bool, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self
                .container()
                .is_running()
                .await
                .map_err(tc_err("inspecting the container"))?;
            if !running {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the stopped container again; the server is not awaited.
    pub(super) async fn start(&self) -> Result<(), HarnessError> {
        self.container()
            .start()
            .await
            .map_err(tc_err("starting the container"))?;
        self.running.store(true, Ordering::SeqCst);
        self.follow_logs();
        Ok(())
    }

    /// Pauses (`frozen`) or resumes the container.
    pub(super) async fn freeze(&self, frozen: bool) -> Result<(), HarnessError> {
        if self.paused.load(Ordering::SeqCst) == frozen {
            return Ok(());
        }
        if frozen {
            self.container()
                .pause()
                .await
                .map_err(tc_err("pausing the container"))?;
        } else {
            self.container()
                .unpause()
                .await
                .map_err(tc_err("resuming the container"))?;
        }
        self.paused.store(frozen, Ordering::SeqCst);
        Ok(())
    }
}

/// A host port that was free a moment ago.
fn free_port() -> Result<u16, HarnessError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(crate::io_err("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(crate::io_err("finding a free port"))?
        .port();
    Ok(port)
}
