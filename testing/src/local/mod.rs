//! Local backend: PostgreSQL server binaries run as child processes.
//!
//! Each cluster lives in its own temporary directory:
//!
//! ```text
//! <tmp>/lagrouter-pg-XXXXXX/      (also the Unix socket directory)
//!     node0/  node1/ ...          data directories
//!     node0.log node1.log ...     server stderr/stdout
//! ```
//!
//! Postmasters are spawned from a dedicated thread that lives as long as the
//! cluster, with `PR_SET_PDEATHSIG = SIGQUIT`, so that servers also go away
//! when the test process is killed without unwinding (e.g. by a test-runner
//! timeout). Normal teardown happens in `Drop`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;

use super::{
    BackendKind, BoxFut, ClusterBackend, ClusterSpec, HarnessError, NodeIndex, STARTUP_TIMEOUT,
    io_err, probe, quote_conf, quote_ident, quote_literal, replication_conninfo,
};

/// Attempts to find a free port before giving up on a node's first start.
const PORT_ATTEMPTS: usize = 8;
/// How long a fast shutdown may take before escalating.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an immediate shutdown may take before `SIGKILL`.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

mod node;
mod os;

use node::{LocalNode, Spawner, StartFailure};
use os::{
    Owner, chown, file_from, file_tail, find_bin_dir, free_port, make_root, port_accepts,
    server_owner, signal, signal_server, terminate_blocking,
};

/// A cluster of local PostgreSQL servers.
pub(crate) struct LocalBackend {
    bin: PathBuf,
    owner: Option<Owner>,
    root_path: PathBuf,
    user: String,
    password: String,
    nodes: Vec<LocalNode>,
    spawner: Option<Spawner>,
    root: Option<tempfile::TempDir>,
}

impl LocalBackend {
    /// Creates, configures and starts the cluster described by `spec`.
    pub(crate) async fn create(spec: &ClusterSpec) -> Result<LocalBackend, HarnessError> {
        let bin = find_bin_dir()?;
        let owner = server_owner()?;
        let root = make_root(owner)?;
        let mut backend = LocalBackend {
            bin,
            owner,
            root_path: root.path().to_path_buf(),
            user: spec.user.clone(),
            password: spec.password.clone(),
            nodes: Vec::new(),
            spawner: Some(Spawner::new()?),
            root: Some(root),
        };
        // From here on, dropping `backend` (on error) stops what was started.
        let primary = backend.create_primary(spec).await?;
        backend.nodes.push(primary);
        let primary_port = backend.nodes[0].port();
        let replicas = try_join_all(
            (1..=spec.replicas).map(|i| backend.create_replica(i, primary_port, spec)),
        )
        .await?;
        backend.nodes.extend(replicas);
        Ok(backend)
    }

    /// Runs a one-shot server tool as the server user, capturing output.
    async fn run_tool(
        &self,
        exe: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(), HarnessError> {
        let path = self.bin.join(exe);
        let mut cmd = tokio::process::Command::new(&path);
        cmd.args(args)
            .current_dir(&self.root_path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .env("LC_ALL", "C")
            .env_remove("PGDATA");
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(o) = self.owner {
            cmd.uid(o.uid).gid(o.gid);
        }
        let line = format!("{} {}", path.display(), args.join(" "));
        let out = cmd
            .output()
            .await
            .map_err(io_err(format!("running {line}")))?;
        if out.status.success() {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(HarnessError::Command {
            command: line,
            status: out.status.to_string(),
            output,
        })
    }

    async fn create_primary(&self, spec: &ClusterSpec) -> Result<LocalNode, HarnessError> {
        let node = LocalNode::new(&self.root_path, 0);
        let pwfile = self.root_path.join("pwfile");
        fs::write(&pwfile, format!("{}\n", spec.password))
            .map_err(io_err("writing the password file"))?;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod of the password file"))?;
        chown(&pwfile, self.owner)?;
        let dir = node.dir.to_string_lossy().into_owned();
        let pw_arg = format!("--pwfile={}", pwfile.display());
        let result = self
            .run_tool(
                "initdb",
                &[
                    "-D",
                    &dir,
                    "-U",
                    &spec.user,
                    &pw_arg,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-N",
                    "--no-instructions",
                ],
                &[],
            )
            .await;
        let _ = fs::remove_file(&pwfile);
        result?;

        let mut conf = String::from("\n# lagrouter::testing\n");
        conf.push_str("listen_addresses = '127.0.0.1'\n");
        conf.push_str(&format!(
            "unix_socket_directories = {}\n",
            quote_conf(&self.root_path.to_string_lossy())
        ));
        for (k, v) in spec.server_settings() {
            conf.push_str(&format!("{k} = {}\n", quote_conf(&v)));
        }
        let conf_path = node.dir.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(io_err(format!("appending to {}", conf_path.display())))?;
        let hba_path = node.dir.join("pg_hba.conf");
        fs::write(&hba_path, spec.hba_conf(&["127.0.0.1/32", "::1/128"]))
            .map_err(io_err(format!("writing {}", hba_path.display())))?;

        self.first_start(&node, false).await?;

        if spec.auth_method == "md5" {
            // Store an MD5 hash so that the md5 exchange is really used.
            let client = super::connect_config(&self.socket_config(&node))
                .await
                .map_err(|e| self.pg_err(&node, "connect over the Unix socket", e))?;
            let sql = format!(
                "SET password_encryption = 'md5'; ALTER ROLE {} PASSWORD {}",
                quote_ident(&spec.user),
                quote_literal(&spec.password)
            );
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| self.pg_err(&node, "storing an md5 password", e))?;
        }
        Ok(node)
    }

    async fn create_replica(
        &self,
        index: NodeIndex,
        primary_port: u16,
        spec: &ClusterSpec,
    ) -> Result<LocalNode, HarnessError> {
        let node = LocalNode::new(&self.root_path, index);
        let dir = node.dir.to_string_lossy().into_owned();
        let port = primary_port.to_string();
        self.run_tool(
            "pg_basebackup",
            &[
                "-D",
                &dir,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-N",
                "-w",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                &spec.user,
            ],
            &[("PGPASSWORD", &spec.password)],
        )
        .await?;
        let conninfo = replication_conninfo(
            &format!("host=127.0.0.1 port={primary_port}"),
            &spec.user,
            &spec.password,
            index,
        );
        self.write_primary_conninfo(&node, &conninfo)?;
        self.first_start(&node, true).await?;
        Ok(node)
    }

    /// Replaces `primary_conninfo` in `postgresql.auto.conf`.
    fn write_primary_conninfo(&self, node: &LocalNode, conninfo: &str) -> Result<(), HarnessError> {
        let path = node.dir.join("postgresql.auto.conf");
        let old = fs::read_to_string(&path).unwrap_or_default();
        let mut new: String = old
            .lines()
            .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        new.push_str(&format!("primary_conninfo = {}\n", quote_conf(conninfo)));
        fs::write(&path, new).map_err(io_err(format!("writing {}", path.display())))?;
        chown(&path, self.owner)
    }

    /// First start of a node: picks a port, retrying with another one when
    /// the server cannot bind it.
    async fn first_start(&self, node: &LocalNode, standby: bool) -> Result<(), HarnessError> {
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            node.port.store(free_port()?, Ordering::SeqCst);
            match self.start_once(node, Some(standby)).await {
                Ok(()) => return Ok(()),
                Err(StartFailure::PortInUse(e)) => {
                    tracing::debug!(node = node.index, "port taken, retrying: {e}");
                    last = Some(e);
                }
                Err(StartFailure::Fatal(e)) => return Err(e),
            }
        }
        Err(last.expect("PORT_ATTEMPTS > 0"))
    }

    /// Spawns the postmaster on the node's port and waits until it accepts
    /// TCP connections (and is / is not in recovery, when `expect_standby`
    /// says so).
    async fn start_once(
        &self,
        node: &LocalNode,
        expect_standby: Option<bool>,
    ) -> Result<(), StartFailure> {
        let port = node.port();
        let log_offset = fs::metadata(&node.log).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(io_err(format!("opening {}", node.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicating the log handle"))?;
        let mut cmd = std::process::Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&node.dir)
            .arg("-c")
            .arg(format!("port={port}"))
            .current_dir(&self.root_path)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        if let Some(o) = self.owner {
            cmd.uid(o.uid).gid(o.gid);
        }
        let spawner = self
            .spawner
            .as_ref()
            .expect("spawner lives as long as the backend");
        let child = spawner
            .spawn(cmd)
            .await
            .map_err(io_err(format!("spawning postgres for node {}", node.index)))?;
        {
            let mut guard = node.lock();
            if let Some(mut old) = guard.replace(child) {
                terminate_blocking(&mut old);
            }
        }

        let socket = self.socket_config(node);
        let tcp = self.tcp_config(node);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last_err: String;
        loop {
            if let Some(status) = node.exit_status() {
                let attempt_log = file_from(&node.log, log_offset);
                let err = HarnessError::Startup {
                    node: node.index,
                    message: format!("postgres exited with {status} before accepting connections"),
                    log_tail: self.log_tail_of(node, 40),
                };
                let bind_failed = attempt_log.contains("could not bind")
                    || attempt_log.contains("Address already in use")
                    || attempt_log.contains("could not create any TCP/IP sockets");
                return Err(if bind_failed {
                    StartFailure::PortInUse(err)
                } else {
                    StartFailure::Fatal(err)
                });
            }
            match probe(&socket).await {
                Ok(in_recovery) => {
                    if let Some(expected) = expect_standby {
                        if in_recovery != expected {
                            return Err(StartFailure::Fatal(HarnessError::Startup {
                                node: node.index,
                                message: format!(
                                    "pg_is_in_recovery() = {in_recovery}, expected {expected}"
                                ),
                                log_tail: self.log_tail_of(node, 40),
                            }));
                        }
                    }
                    // The server is up; make sure clients get in over TCP.
                    match probe(&tcp).await {
                        Ok(_) => return Ok(()),
                        Err(e) => last_err = format!("TCP connection: {e}"),
                    }
                }
                Err(e) => last_err = format!("Unix socket connection: {e}"),
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Fatal(HarnessError::Startup {
                    node: node.index,
                    message: format!(
                        "not accepting connections after {STARTUP_TIMEOUT:?} (last error: {last_err})"
                    ),
                    log_tail: self.log_tail_of(node, 40),
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn socket_config(&self, node: &LocalNode) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.root_path)
            .port(node.port())
            .user(&self.user)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    fn tcp_config(&self, node: &LocalNode) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(node.port())
            .user(&self.user)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    fn log_tail_of(&self, node: &LocalNode, lines: usize) -> String {
        file_tail(&node.log, lines)
    }

    fn pg_err(&self, node: &LocalNode, context: &str, e: tokio_postgres::Error) -> HarnessError {
        HarnessError::Postgres {
            node: node.index,
            context: context.to_string(),
            source: e,
            log_tail: self.log_tail_of(node, 40),
        }
    }

    fn node(&self, node: NodeIndex) -> &LocalNode {
        &self.nodes[node]
    }
}

impl ClusterBackend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn host(&self, _node: NodeIndex) -> String {
        "127.0.0.1".to_string()
    }

    fn port(&self, node: NodeIndex) -> u16 {
        self.node(node).port()
    }

    fn peer_address(&self, node: NodeIndex) -> String {
        format!("host=127.0.0.1 port={}", self.node(node).port())
    }

    fn control_config(&self, node: NodeIndex) -> Option<tokio_postgres::Config> {
        Some(self.socket_config(self.node(node)))
    }

    fn is_running(&self, node: NodeIndex) -> bool {
        self.node(node).running_pid().is_some()
    }

    fn stop_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move { self.node(node).shut_down(libc::SIGINT, STOP_TIMEOUT).await })
    }

    fn kill_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.node(node);
            n.shut_down(libc::SIGQUIT, KILL_TIMEOUT).await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while port_accepts(n.port()) {
                if Instant::now() >= deadline {
                    return Err(HarnessError::Timeout {
                        what: format!("port {} of node {node} to refuse connections", n.port()),
                        timeout: Duration::from_secs(10),
                        detail: "another process may have taken the port".into(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        })
    }

    fn start_node(&self, node: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.node(node);
            if n.running_pid().is_some() {
                return Err(HarnessError::InvalidState {
                    node,
                    message: "already running".into(),
                });
            }
            match self.start_once(n, None).await {
                Ok(()) => Ok(()),
                Err(StartFailure::PortInUse(e)) | Err(StartFailure::Fatal(e)) => Err(e),
            }
        })
    }

    fn freeze_node(&self, node: NodeIndex, frozen: bool) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let Some(pid) = self.node(node).running_pid() else {
                return Err(HarnessError::InvalidState {
                    node,
                    message: "the server is not running".into(),
                });
            };
            signal_server(pid, if frozen { libc::SIGSTOP } else { libc::SIGCONT });
            Ok(())
        })
    }

    fn rewind_node(&self, node: NodeIndex, upstream: NodeIndex) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let n = self.node(node);
            if n.running_pid().is_some() {
                return Err(HarnessError::InvalidState {
                    node,
                    message: "stop the node before rewinding it".into(),
                });
            }
            let source = format!(
                "{} user={} password={} dbname=postgres",
                self.peer_address(upstream),
                super::quote_conn_value(&self.user),
                super::quote_conn_value(&self.password)
            );
            let dir = n.dir.to_string_lossy().into_owned();
            let source_arg = format!("--source-server={source}");
            self.run_tool("pg_rewind", &["-D", &dir, &source_arg, "-R", "-N"], &[])
                .await?;
            let signal_file = n.dir.join("standby.signal");
            if !signal_file.exists() {
                fs::write(&signal_file, "").map_err(io_err("creating standby.signal"))?;
                chown(&signal_file, self.owner)?;
            }
            let conninfo = replication_conninfo(
                &self.peer_address(upstream),
                &self.user,
                &self.password,
                node,
            );
            self.write_primary_conninfo(n, &conninfo)
        })
    }

    fn data_dir(&self, node: NodeIndex) -> Option<PathBuf> {
        Some(self.node(node).dir.clone())
    }

    fn log_tail(&self, node: NodeIndex, lines: usize) -> String {
        self.log_tail_of(self.node(node), lines)
    }
}

impl Drop for LocalBackend {
    fn drop(&mut self) {
        // Signal every server first so they shut down in parallel, then
        // wait for each (LocalNode::drop escalates to SIGKILL if needed).
        for n in &self.nodes {
            if let Some(pid) = n.running_pid() {
                signal_server(pid, libc::SIGCONT);
                signal(pid, libc::SIGQUIT);
            }
        }
        self.nodes.clear();
        self.spawner.take();
        if let Some(root) = self.root.take() {
            if let Err(e) = root.close() {
                tracing::warn!(
                    "lagrouter::testing: removing {}: {e}",
                    self.root_path.display()
                );
            }
        }
    }
}
