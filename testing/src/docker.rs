//! Docker backend: the official `postgres:15` image through testcontainers.
//!
//! Every cluster gets its own user-defined network; nodes reach each other
//! by container name on port 5432, clients use the mapped host ports. The
//! primary runs the image's normal entrypoint; a replica's command takes a
//! `pg_basebackup` from the primary on its first start and then `exec`s
//! `postgres`. All nodes use a `pg_hba.conf` copied into the container
//! (`hba_file`), so replication connections are allowed with the chosen
//! authentication method.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use testcontainers::core::{CmdWaitFor, ExecCommand, IntoContainerPort};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, CopyTargetOptions, GenericImage, ImageExt};
use tokio::io::AsyncBufReadExt;

use super::{
    BackendKind, BoxFut, ClusterBackend, ClusterSpec, HarnessError, NodeIndex, STARTUP_TIMEOUT,
    probe, quote_conf, quote_ident, quote_literal, replication_conninfo,
};

const IMAGE: &str = "postgres";
const TAG: &str = "15";
const HBA_PATH: &str = "/etc/lagrouter_pg_hba.conf";
/// Log lines kept per node for [`ClusterBackend::log_tail`].
const LOG_LINES_KEPT: usize = 5000;

/// Shell script run by replica containers (as the `postgres` user):
/// base backup on first start, then the server with the given arguments.
const REPLICA_SCRIPT: &str = r#"set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  export PGPASSWORD="$LAGROUTER_PASSWORD"
  n=0
  until pg_isready -q -h "$LAGROUTER_PRIMARY" -p 5432 -U "$LAGROUTER_USER" -d postgres; do
    n=$((n+1))
    if [ "$n" -gt 600 ]; then echo "primary $LAGROUTER_PRIMARY not reachable" >&2; exit 1; fi
    sleep 0.2
  done
  chmod 0700 "$PGDATA"
  pg_basebackup -D "$PGDATA" -R -X stream -c fast -w \
    -h "$LAGROUTER_PRIMARY" -p 5432 -U "$LAGROUTER_USER"
  printf '%s\n' "$LAGROUTER_CONNINFO_LINE" >> "$PGDATA/postgresql.auto.conf"
  unset PGPASSWORD
fi
chmod 0700 "$PGDATA"
exec postgres "$@"
"#;

fn docker_err(
    context: &str,
) -> impl FnOnce(testcontainers::TestcontainersError) -> HarnessError + '_ {
    move |e| HarnessError::Docker(format!("{context}: {e}"))
}

/// Unique-enough prefix for container and network names.
fn cluster_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "lagrouter-{}-{}-{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// One container of the cluster.
struct DockerNode {
    index: NodeIndex,
    name: String,
    container: Option<ContainerAsync<GenericImage>>,
    host: String,
    port: AtomicU16,
    running: AtomicBool,
    logs: Arc<Mutex<VecDeque<String>>>,
    log_tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl DockerNode {
    fn container(&self) -> &ContainerAsync<GenericImage> {
        self.container
            .as_ref()
            .expect("the container lives as long as the backend")
    }

    /// (Re)starts collecting the container's output into `logs`. Docker
    /// replays the whole log of the container, so the buffer is reset.
    fn follow_logs(&self) {
        let mut tasks = self.log_tasks.lock().unwrap_or_else(|p| p.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let c = self.container();
        for reader in [c.stdout(true), c.stderr(true)] {
            let logs = Arc::clone(&self.logs);
            let task = tokio::spawn(async move {
                let mut lines = reader.lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut buf = logs.lock().unwrap_or_else(|p| p.into_inner());
                    if buf.len() >= LOG_LINES_KEPT {
                        buf.pop_front();
                    }
                    buf.push_back(line);
                }
            });
            tasks.push(task.abort_handle());
        }
    }

    fn tail(&self, lines: usize) -> String {
        let buf = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let skip = buf.len().saturating_sub(lines);
        buf.iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn tcp_config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port.load(Ordering::SeqCst))
            .user(user)
            .password(password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// Re-reads the mapped host port (it may change across restarts).
    async fn refresh_port(&self) -> Result<(), HarnessError> {
        let port = self
            .container()
            .get_host_port_ipv4(5432.tcp())
            .await
            .map_err(docker_err("reading the mapped port"))?;
        self.port.store(port, Ordering::SeqCst);
        Ok(())
    }

    /// Waits until the server accepts TCP connections through the mapped
    /// port, failing early when the container exits.
    async fn wait_ready(
        &self,
        user: &str,
        password: &str,
        expect_standby: Option<bool>,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last_err: String;
        loop {
            if !self.container().is_running().await.unwrap_or(true) {
                // Give the log follower a moment to drain.
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.running.store(false, Ordering::SeqCst);
                return Err(HarnessError::Startup {
                    node: self.index,
                    message: format!(
                        "container {} exited before accepting connections",
                        self.name
                    ),
                    log_tail: self.tail(40),
                });
            }
            match probe(&self.tcp_config(user, password)).await {
                Ok(in_recovery) => match expect_standby {
                    Some(expected) if in_recovery != expected => {
                        return Err(HarnessError::Startup {
                            node: self.index,
                            message: format!(
                                "pg_is_in_recovery() = {in_recovery}, expected {expected}"
                            ),
                            log_tail: self.tail(40),
                        });
                    }
                    _ => return Ok(()),
                },
                Err(e) => last_err = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Startup {
                    node: self.index,
                    message: format!(
                        "not accepting connections after {STARTUP_TIMEOUT:?} (last error: {last_err})"
                    ),
                    log_tail: self.tail(40),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the container is no longer running.
    async fn wait_stopped(&self, timeout: Duration) -> Result<bool, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self
                .container()
                .is_running()
                .await
                .map_err(docker_err("inspecting the container"))?;
            if !running {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A cluster of `postgres:15` containers.
pub(crate) struct DockerBackend {
    user: String,
    password: String,
    nodes: Vec<DockerNode>,
}

impl DockerBackend {
    /// Creates the network and containers and waits until all accept
    /// connections.
    pub(crate) async fn create(spec: &ClusterSpec) -> Result<DockerBackend, HarnessError> {
        if !super::docker_engine_reachable() {
            return Err(HarnessError::BackendUnavailable(
                "no Docker engine answers (DOCKER_HOST or /var/run/docker.sock)".into(),
            ));
        }
        let prefix = cluster_name();
        let network = prefix.clone();
        let mut backend = DockerBackend {
            user: spec.user.clone(),
            password: spec.password.clone(),
            nodes: Vec::new(),
        };
        let primary_name = format!("{prefix}-node0");
        let primary = backend
            .create_node(spec, &network, 0, &primary_name, None)
            .await?;
        backend.nodes.push(primary);

        if spec.auth_method == "md5" {
            let node = &backend.nodes[0];
            let client = super::connect_config(&node.tcp_config(&spec.user, &spec.password))
                .await
                .map_err(|e| HarnessError::Docker(format!("connecting to the primary: {e}")))?;
            let sql = format!(
                "SET password_encryption = 'md5'; ALTER ROLE {} PASSWORD {}",
                quote_ident(&spec.user),
                quote_literal(&spec.password)
            );
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| HarnessError::Docker(format!("storing an md5 password: {e}")))?;
        }

        let replicas = try_join_all((1..=spec.replicas).map(|i| {
            let name = format!("{prefix}-node{i}");
            let network = network.clone();
            let primary_name = primary_name.clone();
            let backend = &backend;
            async move {
                backend
                    .create_node(spec, &network, i, &name, Some(&primary_name))
                    .await
            }
        }))
        .await?;
        backend.nodes.extend(replicas);
        Ok(backend)
    }

    /// Starts one container; `upstream` is the primary's container name for
    /// replicas.
    async fn create_node(
        &self,
        spec: &ClusterSpec,
        network: &str,
        index: NodeIndex,
        name: &str,
        upstream: Option<&str>,
    ) -> Result<DockerNode, HarnessError> {
        let mut args: Vec<String> = vec!["-c".into(), format!("hba_file={HBA_PATH}")];
        args.push("-c".into());
        args.push("listen_addresses=*".into());
        for (k, v) in spec.server_settings() {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
        let hba = spec.hba_conf(&["0.0.0.0/0", "::/0"]);
        let hba_target = CopyTargetOptions::new(HBA_PATH).with_mode(0o644);

        let request = match upstream {
            None => {
                let mut cmd = vec!["postgres".to_string()];
                cmd.extend(args);
                GenericImage::new(IMAGE, TAG)
                    .with_exposed_port(5432.tcp())
                    .with_network(network)
                    .with_container_name(name)
                    .with_env_var("POSTGRES_USER", &spec.user)
                    .with_env_var("POSTGRES_PASSWORD", &spec.password)
                    .with_env_var("POSTGRES_DB", "postgres")
                    .with_env_var("POSTGRES_HOST_AUTH_METHOD", &spec.auth_method)
                    .with_env_var("POSTGRES_INITDB_ARGS", "--locale=C --encoding=UTF8")
                    .with_copy_to(hba_target, hba.into_bytes())
                    .with_cmd(cmd)
            }
            Some(primary) => {
                let conninfo = replication_conninfo(
                    &format!("host={primary} port=5432"),
                    &spec.user,
                    &spec.password,
                    index,
                );
                let mut cmd = vec![
                    "-c".to_string(),
                    REPLICA_SCRIPT.to_string(),
                    "lagrouter-replica".to_string(),
                ];
                cmd.extend(args);
                GenericImage::new(IMAGE, TAG)
                    .with_exposed_port(5432.tcp())
                    .with_entrypoint("bash")
                    .with_network(network)
                    .with_container_name(name)
                    .with_user("postgres")
                    .with_env_var("LAGROUTER_PRIMARY", primary)
                    .with_env_var("LAGROUTER_USER", &spec.user)
                    .with_env_var("LAGROUTER_PASSWORD", &spec.password)
                    .with_env_var(
                        "LAGROUTER_CONNINFO_LINE",
                        format!("primary_conninfo = {}", quote_conf(&conninfo)),
                    )
                    .with_copy_to(hba_target, hba.into_bytes())
                    .with_cmd(cmd)
            }
        };
        let container = request
            .with_startup_timeout(Duration::from_secs(300))
            .start()
            .await
            .map_err(docker_err("starting the postgres:15 container"))?;
        let host = container
            .get_host()
            .await
            .map_err(docker_err("reading the container host"))?
            .to_string();
        let node = DockerNode {
            index,
            name: name.to_string(),
            container: Some(container),
            host,
            port: AtomicU16::new(0),
            running: AtomicBool::new(true),
            logs: Arc::new(Mutex::new(VecDeque::new())),
            log_tasks: Mutex::new(Vec::new()),
        };
        node.follow_logs();
        node.refresh_port().await?;
        node.wait_ready(&spec.user, &spec.password, Some(upstream.is_some()))
            .await?;
        Ok(node)
    }

    fn node(&self, node: NodeIndex) -> &DockerNode {
        &self.nodes[node]
    }

    fn require_running(&self, node: NodeIndex) -> Result<&DockerNode, HarnessError> {
        let n = self.node(node);
        if n.running.load(Ordering::SeqCst) {
            Ok(n)
        } else {
            Err(HarnessError::InvalidState {
                node,
                message: "the server is not running".into(),
            })
        }
    }
}

impl ClusterBackend for DockerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Docker
    }

    fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn host(&self, node: NodeIndex) -> String {
        self.node(node).host.clone()
    }

    fn port(&self, node: NodeIndex) -> u16 {
        self.node(node).port.load(Ordering::SeqCst)
    }

    fn peer_address(&self, node: NodeIndex) -> String {
        format!("host={} port=5432", self.node(node).name)
    }

    fn is_running(&self, node: NodeIndex) -> bool {
        self.node(node).running.load(Ordering::SeqCst)
    }

    fn stop_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.require_running(node)?;
            // The image's stop signal is SIGINT: a fast shutdown.
            n.container()
                .stop_with_timeout(Some(60))
                .await
                .map_err(docker_err("stopping the container"))?;
            n.running.store(false, Ordering::SeqCst);
            Ok(())
        })
    }

    fn kill_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.require_running(node)?;
            // Immediate shutdown of the postmaster (PID 1), like a crash.
            let exec = ExecCommand::new(["kill", "-QUIT", "1"])
                .with_cmd_ready_condition(CmdWaitFor::exit());
            let signalled = n.container().exec(exec).await.is_ok();
            if !signalled || !n.wait_stopped(Duration::from_secs(30)).await? {
                n.container()
                    .stop_with_timeout(Some(0))
                    .await
                    .map_err(docker_err("killing the container"))?;
            }
            n.running.store(false, Ordering::SeqCst);
            Ok(())
        })
    }

    fn start_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.node(node);
            if n.running.load(Ordering::SeqCst) {
                return Err(HarnessError::InvalidState {
                    node,
                    message: "already running".into(),
                });
            }
            n.container()
                .start()
                .await
                .map_err(docker_err("starting the container"))?;
            n.running.store(true, Ordering::SeqCst);
            n.follow_logs();
            n.refresh_port().await?;
            n.wait_ready(&self.user, &self.password, None).await
        })
    }

    fn log_tail(&self, node: NodeIndex, lines: usize) -> String {
        self.node(node).tail(lines)
    }
}

impl Drop for DockerBackend {
    fn drop(&mut self) {
        let mut containers = Vec::new();
        for n in &mut self.nodes {
            for t in n
                .log_tasks
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                t.abort();
            }
            containers.extend(n.container.take());
        }
        // testcontainers removes containers (and then the network) in its
        // Drop, which needs a Tokio runtime context; provide one when the
        // cluster is dropped outside of a runtime (e.g. while a plain
        // thread unwinds).
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(containers);
        } else {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let _guard = rt.enter();
                    drop(containers);
                }
                Err(e) => {
                    tracing::error!("lagrouter-testing: no runtime to remove containers: {e}");
                    std::mem::forget(containers);
                }
            }
        }
    }
}
