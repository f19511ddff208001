//! Docker backend: one container per node, through testcontainers.
//!
//! The image is [`crate::docker_image`] (by default `lagrouter/postgres:15`,
//! built here from Debian packages when missing). The harness never runs
//! the image's entrypoint: a node container runs `node.sh` as the
//! `postgres` user, which on the first start runs `initdb` (primary) or
//! `pg_basebackup` (standby) into an anonymous volume and then `exec`s the
//! server, so the server is the container's main process.
//!
//! Each cluster has its own bridge network, on which node `i` is called
//! `node{i}` and over which standbys stream WAL. Clients reach the nodes
//! through ports published on the engine's default network, bound to
//! `127.0.0.1` and kept across restarts, so cutting a node off the cluster
//! network leaves it reachable for clients, and cutting it off both
//! networks isolates it. Everything is labelled with the cluster's name and
//! removed when the cluster is dropped; objects of killed processes are
//! removed by the next process that starts a cluster.

mod engine;
mod links;
mod node;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::{join_all, try_join_all};
use testcontainers::ImageExt;
use testcontainers::bollard::Docker;
use testcontainers::runners::AsyncRunner;

use self::engine::CLUSTER_LABEL;
use self::node::{Blueprint, DockerNode, tc_err};
use super::{
    BackendKind, BoxFut, ClusterBackend, ClusterSpec, HarnessError, NodeIndex, quote_conf,
    quote_conn_value, quote_ident, quote_literal, replication_conninfo,
};
use crate::backend::Link;
use crate::engine::{EngineAddr, find_engine};

/// How long a fast shutdown may take before the container is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an immediate shutdown may take before the container is killed.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Command of the `pg_rewind` helper container.
const REWIND_SCRIPT: &str = include_str!("rewind.sh");

/// A cluster of node containers.
pub(crate) struct DockerBackend {
    docker: Docker,
    blueprint: Blueprint,
    /// Host clients connect to.
    host: String,
    user: String,
    password: String,
    nodes: Vec<DockerNode>,
    helpers: AtomicU64,
}

impl DockerBackend {
    /// Creates the network and containers and waits until every node
    /// accepts connections.
    pub(crate) async fn create(spec: &ClusterSpec) -> Result<DockerBackend, HarnessError> {
        let image = spec.image.clone().unwrap_or_else(crate::docker_image);
        let (repository, tag) = engine::split_image(&image)?;
        let found = find_engine().map_err(HarnessError::BackendUnavailable)?;
        let (host, bind_ip) = match &found.addr {
            EngineAddr::Unix(_) => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
            EngineAddr::Tcp(hostport) => {
                let host = hostport
                    .rsplit_once(':')
                    .map_or(hostport.as_str(), |(h, _)| h);
                (
                    host.trim_matches(['[', ']']).to_string(),
                    "0.0.0.0".to_string(),
                )
            }
        };
        let docker = engine::client().await?;
        engine::reap_leftovers(&docker).await;
        engine::ensure_image(&docker, &image).await?;
        let cluster = engine::cluster_name();
        engine::create_network(&docker, &cluster).await?;
        // From here on, dropping `backend` (on error) removes what exists.
        let mut backend = DockerBackend {
            docker,
            blueprint: Blueprint {
                cluster,
                repository,
                tag,
                bind_ip,
            },
            host,
            user: spec.user.clone(),
            password: spec.password.clone(),
            nodes: Vec::new(),
            helpers: AtomicU64::new(0),
        };
        let mut conf = String::from("# lagrouter::testing\nlisten_addresses = '*'\nport = 5432\n");
        conf.push_str("unix_socket_directories = '/tmp'\n");
        for (k, v) in spec.server_settings() {
            conf.push_str(&format!("{k} = {}\n", quote_conf(&v)));
        }
        let common = [
            ("LAGROUTER_USER", spec.user.clone()),
            ("LAGROUTER_PASSWORD", spec.password.clone()),
        ];
        let mut env: Vec<(String, String)> = common
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        env.push(("LAGROUTER_ROLE".into(), "primary".into()));
        env.push(("LAGROUTER_CONF".into(), conf));
        env.push((
            "LAGROUTER_HBA".into(),
            spec.hba_conf(&["0.0.0.0/0", "::/0"]),
        ));
        let primary = DockerNode::create(&backend.docker, &backend.blueprint, 0, &env).await?;
        backend.nodes.push(primary);
        backend.nodes[0]
            .set_link(&backend.docker, Link::Connected)
            .await?;
        backend.nodes[0]
            .wait_ready(&backend.tcp_config(0), Some(false))
            .await?;

        if spec.auth_method == "md5" {
            let client = super::connect_config(&backend.tcp_config(0))
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

        let upstream = backend.nodes[0].alias.clone();
        let replicas = try_join_all((1..=spec.replicas).map(|i| {
            let conninfo = replication_conninfo(
                &format!("host={upstream} port=5432"),
                &spec.user,
                &spec.password,
                i,
            );
            let mut env: Vec<(String, String)> = common
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            env.push(("LAGROUTER_ROLE".into(), "standby".into()));
            env.push(("LAGROUTER_UPSTREAM".into(), upstream.clone()));
            env.push((
                "LAGROUTER_CONNINFO_LINE".into(),
                format!("primary_conninfo = {}", quote_conf(&conninfo)),
            ));
            let backend = &backend;
            async move {
                let node = DockerNode::create(&backend.docker, &backend.blueprint, i, &env).await?;
                // The standby's command waits until it can reach the primary
                // over the cluster network.
                node.set_link(&backend.docker, Link::Connected).await?;
                node.wait_ready(&backend.config_for(node.port), Some(true))
                    .await?;
                Ok::<_, HarnessError>(node)
            }
        }))
        .await?;
        backend.nodes.extend(replicas);
        Ok(backend)
    }

    fn tcp_config(&self, node: NodeIndex) -> tokio_postgres::Config {
        self.config_for(self.nodes[node].port)
    }

    fn config_for(&self, port: u16) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(port)
            .user(&self.user)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    fn node(&self, node: NodeIndex) -> &DockerNode {
        &self.nodes[node]
    }

    fn require_running(&self, node: NodeIndex) -> Result<&DockerNode, HarnessError> {
        let n = self.node(node);
        if n.is_running() {
            Ok(n)
        } else {
            Err(HarnessError::InvalidState {
                node,
                message: "the server is not running".into(),
            })
        }
    }

    /// Runs `pg_rewind` for the stopped `node` against `upstream` in a
    /// helper container that shares the node's volume.
    async fn rewind(&self, node: NodeIndex, upstream: NodeIndex) -> Result<(), HarnessError> {
        let n = self.node(node);
        if n.is_running() {
            return Err(HarnessError::InvalidState {
                node,
                message: "stop the node before rewinding it".into(),
            });
        }
        let source = format!(
            "{} user={} password={} dbname=postgres",
            self.peer_address(upstream),
            quote_conn_value(&self.user),
            quote_conn_value(&self.password)
        );
        let conninfo = replication_conninfo(
            &self.peer_address(upstream),
            &self.user,
            &self.password,
            node,
        );
        let name = format!(
            "{}-rewind{node}-{}",
            self.blueprint.cluster,
            self.helpers.fetch_add(1, Ordering::Relaxed)
        );
        let env = [
            ("LAGROUTER_SOURCE".to_string(), source),
            (
                "LAGROUTER_CONNINFO_LINE".to_string(),
                format!("primary_conninfo = {}", quote_conf(&conninfo)),
            ),
        ];
        let volumes_from = n.container().id().to_string();
        let helper = self
            .blueprint
            .request(&name, REWIND_SCRIPT, &env)
            .with_network(&self.blueprint.cluster)
            .with_host_config_modifier(move |hc| {
                hc.volumes_from = Some(vec![volumes_from.clone()]);
            })
            .start()
            .await
            .map_err(tc_err("starting the pg_rewind container"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let code = loop {
            if let Some(code) = helper
                .exit_code()
                .await
                .map_err(tc_err("inspecting the pg_rewind container"))?
            {
                break Some(code);
            }
            if std::time::Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut output =
            String::from_utf8_lossy(&helper.stdout_to_vec().await.unwrap_or_default()).into_owned();
        output.push_str(&String::from_utf8_lossy(
            &helper.stderr_to_vec().await.unwrap_or_default(),
        ));
        let _ = helper.rm().await;
        match code {
            Some(0) => Ok(()),
            other => Err(HarnessError::Command {
                command: format!("pg_rewind for node {node} (container {name})"),
                status: other.map_or_else(
                    || "still running after 120 s".into(),
                    |c| format!("exit code {c}"),
                ),
                output,
            }),
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

    fn host(&self, _node: NodeIndex) -> String {
        self.host.clone()
    }

    fn port(&self, node: NodeIndex) -> u16 {
        self.node(node).port
    }

    fn peer_address(&self, node: NodeIndex) -> String {
        format!("host={} port=5432", self.node(node).alias)
    }

    fn is_running(&self, node: NodeIndex) -> bool {
        self.node(node).is_running()
    }

    fn stop_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.require_running(node)?;
            n.shut_down(&self.docker, "SIGINT", STOP_TIMEOUT).await
        })
    }

    fn kill_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.require_running(node)?;
            n.shut_down(&self.docker, "SIGQUIT", KILL_TIMEOUT).await
        })
    }

    fn start_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.node(node);
            if n.is_running() {
                return Err(HarnessError::InvalidState {
                    node,
                    message: "already running".into(),
                });
            }
            n.start().await?;
            n.wait_ready(&self.tcp_config(node), None).await
        })
    }

    fn freeze_node(&self, node: NodeIndex, frozen: bool) -> BoxFut<'_, ()> {
        Box::pin(async move { self.require_running(node)?.freeze(frozen).await })
    }

    fn set_link(&self, node: NodeIndex, link: Link) -> BoxFut<'_, ()> {
        Box::pin(async move { self.node(node).set_link(&self.docker, link).await })
    }

    fn cluster_label(&self) -> Option<String> {
        Some(format!("{CLUSTER_LABEL}={}", self.blueprint.cluster))
    }

    fn rewind_node(&self, node: NodeIndex, upstream: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(self.rewind(node, upstream))
    }

    fn log_tail(&self, node: NodeIndex, lines: usize) -> String {
        self.node(node).tail(lines)
    }
}

impl Drop for DockerBackend {
    fn drop(&mut self) {
        let containers: Vec<_> = self
            .nodes
            .iter_mut()
            .filter_map(DockerNode::take_container)
            .collect();
        let cluster = self.blueprint.cluster.clone();
        // Removal needs a runtime, and the one the cluster ran on may be a
        // current-thread runtime blocked right here (or gone, when the
        // cluster is dropped by a panicking plain thread): run it on a
        // thread of its own and wait for it.
        let cleanup = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(
                        "lagrouter::testing: no runtime to remove containers of {cluster}: {e}"
                    );
                    std::mem::forget(containers);
                    return;
                }
            };
            rt.block_on(async {
                join_all(containers.into_iter().map(|c| c.rm())).await;
                match engine::client().await {
                    // Leftovers: containers that never got a handle,
                    // helpers, and the network.
                    Ok(docker) => engine::remove_cluster(&docker, &cluster).await,
                    Err(e) => tracing::error!("lagrouter::testing: removing {cluster}: {e}"),
                }
            });
        });
        if cleanup.join().is_err() {
            tracing::error!("lagrouter::testing: removing the cluster's containers panicked");
        }
    }
}
