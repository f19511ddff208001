//! Operating-system helpers of the local backend: the server user, the
//! PostgreSQL binaries, directories, ports, signals and log files.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use super::{HarnessError, KILL_TIMEOUT, io_err};

/// The OS user the servers run as when the harness runs as root.
#[derive(Debug, Clone, Copy)]
pub(super) struct Owner {
    pub(super) uid: u32,
    pub(super) gid: u32,
}

/// Looks up the `postgres` OS user when running as root.
pub(super) fn server_owner() -> Result<Option<Owner>, HarnessError> {
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
pub(super) fn find_bin_dir() -> Result<PathBuf, HarnessError> {
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
pub(super) fn make_root(owner: Option<Owner>) -> Result<tempfile::TempDir, HarnessError> {
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

pub(super) fn chown(path: &Path, owner: Option<Owner>) -> Result<(), HarnessError> {
    if let Some(o) = owner {
        std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// A port that was free a moment ago.
pub(super) fn free_port() -> Result<u16, HarnessError> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(io_err("binding 127.0.0.1:0 to pick a port"))?;
    let port = l
        .local_addr()
        .map_err(io_err("reading a bound port"))?
        .port();
    Ok(port)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(super) fn port_accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

pub(super) fn signal(pid: u32, sig: libc::c_int) {
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
pub(super) fn signal_server(pid: u32, sig: libc::c_int) {
    signal(pid, sig);
    for p in server_children(pid) {
        signal(p, sig);
    }
}

pub(super) fn signal_group(pgid: u32, sig: libc::c_int) {
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
pub(super) fn terminate_blocking(child: &mut Child) {
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
pub(super) fn file_tail(path: &Path, lines: usize) -> String {
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
pub(super) fn file_from(path: &Path, offset: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let _ = f.seek(SeekFrom::Start(offset));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
