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
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
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

/// The OS user the servers run as when the harness runs as root.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// Looks up the `postgres` OS user when running as root.
fn server_owner() -> Result<Option<Owner>, HarnessError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    // SAFETY: `name` is a valid C string; the returned record is read
    // immediately, before any other getpw* call on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(HarnessError::BackendUnavailable(
            "running as root, but there is no `postgres` OS user to run the servers as \
             (PostgreSQL refuses to run as root)"
                .into(),
        ));
    }
    // SAFETY: non-null pointer from getpwnam.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some(Owner { uid, gid }))
}

/// The directory holding `initdb`, `postgres`, `pg_basebackup`, ...
fn find_bin_dir() -> Result<PathBuf, HarnessError> {
    let dir = match std::env::var_os("PG_BIN").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = std::process::Command::new("pg_config")
                .arg("--bindir")
                .output()
                .map_err(|e| {
                    HarnessError::BackendUnavailable(format!(
                        "PG_BIN is not set and `pg_config --bindir` could not run: {e}"
                    ))
                })?;
            if !out.status.success() {
                return Err(HarnessError::BackendUnavailable(format!(
                    "`pg_config --bindir` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    for exe in ["initdb", "postgres", "pg_basebackup"] {
        if !dir.join(exe).is_file() {
            return Err(HarnessError::BackendUnavailable(format!(
                "{} not found (set PG_BIN to the PostgreSQL bin directory)",
                dir.join(exe).display()
            )));
        }
    }
    Ok(dir)
}

/// Whether every ancestor of `dir` can be traversed by other users.
fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}

/// Creates the cluster's root directory.
fn make_root(owner: Option<Owner>) -> Result<tempfile::TempDir, HarnessError> {
    let mut base = std::env::temp_dir();
    // Unix socket paths are limited to ~107 bytes; the root dir doubles as
    // the socket directory. The server user must also be able to reach it.
    if base.as_os_str().len() > 60 || (owner.is_some() && !traversable_by_others(&base)) {
        base = PathBuf::from("/tmp");
    }
    let root = tempfile::Builder::new()
        .prefix("lagrouter-pg-")
        .tempdir_in(&base)
        .map_err(io_err(format!(
            "creating a temporary directory in {}",
            base.display()
        )))?;
    fs::write(root.path().join(OWNER_FILE), std::process::id().to_string())
        .map_err(io_err("writing the owner pid file"))?;
    chown(root.path(), owner)?;
    remove_stale_roots(&base);
    Ok(root)
}

/// Holds the pid of the process owning a cluster directory.
const OWNER_FILE: &str = "owner.pid";

fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

fn read_pid(path: &Path) -> Option<libc::pid_t> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Removes cluster directories left behind by test processes that died
/// without unwinding (their servers got `SIGQUIT` through the parent-death
/// signal, but nobody removed the files). Directories whose owner or any
/// postmaster is still alive, or without an owner file, are left alone.
fn remove_stale_roots(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("lagrouter-pg-") {
            continue;
        }
        let dir = entry.path();
        let Some(owner) = read_pid(&dir.join(OWNER_FILE)) else {
            continue;
        };
        if owner as u32 == std::process::id() || process_alive(owner) {
            continue;
        }
        let alive: Vec<libc::pid_t> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read_pid(&e.path().join("postmaster.pid")))
            .filter(|&pid| process_alive(pid))
            .collect();
        // A server its dead owner had frozen (`freeze_node`) holds its
        // parent-death SIGQUIT pending: let it run so that it shuts down.
        for &pid in &alive {
            signal_server(pid as u32, libc::SIGCONT);
        }
        let busy = !alive.is_empty();
        if !busy {
            tracing::debug!("removing stale {}", dir.display());
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

fn chown(path: &Path, owner: Option<Owner>) -> Result<(), HarnessError> {
    if let Some(o) = owner {
        std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16, HarnessError> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(io_err("binding 127.0.0.1:0 to pick a port"))?;
    let port = l
        .local_addr()
        .map_err(io_err("reading a bound port"))?
        .port();
    Ok(port)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn port_accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall; `pid` is a child we have not reaped yet.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The children of the postmaster `pid` (backends, WAL receiver, startup
/// process, …). PostgreSQL puts each child in its own session, so they are
/// not in the postmaster's process group; they are found by parent pid.
fn server_children(pid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may contain spaces and parens.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// Stops (`SIGSTOP`) or resumes (`SIGCONT`) a whole server: the postmaster
/// first, so that once stopped it forks nothing the scan could miss.
fn signal_server(pid: u32, sig: libc::c_int) {
    signal(pid, sig);
    for p in server_children(pid) {
        signal(p, sig);
    }
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall on the process group the postmaster leads.
    unsafe {
        libc::killpg(pgid as libc::pid_t, sig);
    }
}

/// Waits (blocking) up to `timeout` for `child` to exit.
fn wait_blocking(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops a postmaster for good (blocking): `SIGQUIT`, then `SIGKILL` to its
/// process group after [`KILL_TIMEOUT`].
fn terminate_blocking(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal_server(child.id(), libc::SIGCONT);
    signal(child.id(), libc::SIGQUIT);
    if !wait_blocking(child, KILL_TIMEOUT) {
        signal_group(child.id(), libc::SIGKILL);
        let _ = child.wait();
    }
}

/// Last `lines` lines of a file (reading at most its last 256 KiB).
pub(crate) fn file_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(256 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads a file from byte `offset` on (for the log of one start attempt).
fn file_from(path: &Path, offset: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let _ = f.seek(SeekFrom::Start(offset));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Spawns postmasters from one thread that lives as long as the cluster,
/// so that `PR_SET_PDEATHSIG` (which fires when the spawning *thread*
/// exits) only fires when the cluster is gone or the process died.
struct Spawner {
    tx: Option<std::sync::mpsc::Sender<SpawnJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct SpawnJob {
    cmd: std::process::Command,
    reply: tokio::sync::oneshot::Sender<io::Result<Child>>,
}

impl Spawner {
    fn new() -> Result<Spawner, HarnessError> {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let thread = std::thread::Builder::new()
            .name("lagrouter-pg-spawner".into())
            .spawn(move || {
                for mut job in rx {
                    let result = job.cmd.spawn();
                    if let Err(Ok(mut child)) = job.reply.send(result) {
                        // Nobody waits for it any more: do not leak it.
                        terminate_blocking(&mut child);
                    }
                }
            })
            .map_err(io_err("spawning the postmaster spawner thread"))?;
        Ok(Spawner {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    async fn spawn(&self, mut cmd: std::process::Command) -> io::Result<Child> {
        let parent = std::process::id();
        // SAFETY: the closure only makes async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(SpawnJob { cmd, reply }).is_ok());
        if !sent {
            return Err(io::Error::other("the spawner thread is gone"));
        }
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("the spawner thread is gone")))
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One server of the cluster.
struct LocalNode {
    index: NodeIndex,
    dir: PathBuf,
    log: PathBuf,
    port: AtomicU16,
    child: Mutex<Option<Child>>,
}

impl LocalNode {
    fn new(root: &Path, index: NodeIndex) -> LocalNode {
        LocalNode {
            index,
            dir: root.join(format!("node{index}")),
            log: root.join(format!("node{index}.log")),
            port: AtomicU16::new(0),
            child: Mutex::new(None),
        }
    }

    fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pid of the running postmaster, if any.
    fn running_pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// `Some(status)` when the postmaster was started and has exited.
    fn exit_status(&self) -> Option<String> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Waits (async) for the postmaster to exit; `false` on timeout.
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.running_pid().is_none() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends `sig` and waits up to `timeout`, then escalates to immediate
    /// shutdown and finally `SIGKILL` of the process group.
    async fn shut_down(&self, sig: libc::c_int, timeout: Duration) -> Result<(), HarnessError> {
        let Some(pid) = self.running_pid() else {
            return Err(HarnessError::InvalidState {
                node: self.index,
                message: "the server is not running".into(),
            });
        };
        // A frozen server must run to shut down.
        signal_server(pid, libc::SIGCONT);
        signal(pid, sig);
        if self.wait_exit(timeout).await {
            return Ok(());
        }
        tracing::warn!(
            node = self.index,
            "postgres did not stop in time; escalating"
        );
        signal(pid, libc::SIGQUIT);
        if self.wait_exit(KILL_TIMEOUT).await {
            return Ok(());
        }
        signal_group(pid, libc::SIGKILL);
        self.wait_exit(KILL_TIMEOUT).await;
        Ok(())
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.lock().take() {
            terminate_blocking(&mut child);
        }
    }
}

/// Why one start attempt failed.
enum StartFailure {
    /// The port was taken; another port may work.
    PortInUse(HarnessError),
    /// Anything else.
    Fatal(HarnessError),
}

impl From<HarnessError> for StartFailure {
    fn from(e: HarnessError) -> Self {
        StartFailure::Fatal(e)
    }
}

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
