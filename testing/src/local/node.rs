//! One local server ([`LocalNode`]) and the thread that spawns postmasters
//! ([`Spawner`]).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::os::{signal, signal_group, signal_server, terminate_blocking};
use super::{HarnessError, KILL_TIMEOUT, NodeIndex, io_err};

/// Spawns postmasters from one thread that lives as long as the cluster,
/// so that `PR_SET_PDEATHSIG` (which fires when the spawning *thread*
/// exits) only fires when the cluster is gone or the process died.
pub(super) struct Spawner {
    pub(super) tx: Option<std::sync::mpsc::Sender<SpawnJob>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

pub(super) struct SpawnJob {
    pub(super) cmd: std::process::Command,
    pub(super) reply: tokio::sync::oneshot::Sender<io::Result<Child>>,
}

impl Spawner {
    pub(super) fn new() -> Result<Spawner, HarnessError> {
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

    pub(super) async fn spawn(&self, mut cmd: std::process::Command) -> io::Result<Child> {
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
pub(super) struct LocalNode {
    pub(super) index: NodeIndex,
    pub(super) dir: PathBuf,
    pub(super) log: PathBuf,
    pub(super) port: AtomicU16,
    pub(super) child: Mutex<Option<Child>>,
}

impl LocalNode {
    pub(super) fn new(root: &Path, index: NodeIndex) -> LocalNode {
        LocalNode {
            index,
            dir: root.join(format!("node{index}")),
            log: root.join(format!("node{index}.log")),
            port: AtomicU16::new(0),
            child: Mutex::new(None),
        }
    }

    pub(super) fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pid of the running postmaster, if any.
    pub(super) fn running_pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// `Some(status)` when the postmaster was started and has exited.
    pub(super) fn exit_status(&self) -> Option<String> {
        let mut guard = self.lock();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Waits (async) for the postmaster to exit; `false` on timeout.
    pub(super) async fn wait_exit(&self, timeout: Duration) -> bool {
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
    pub(super) async fn shut_down(
        &self,
        sig: libc::c_int,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
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
pub(super) enum StartFailure {
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
