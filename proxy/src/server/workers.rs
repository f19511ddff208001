//! Per-core worker threads that run client sessions.
//!
//! Each worker is a thread with its own current-thread tokio runtime. A
//! session runs on one worker from login to disconnect, and the server
//! connections it checks out are moved to that worker's event loop
//! ([`crate::backend::home`]), so a query's round trip (client socket,
//! server socket, session task) never leaves one thread: no cross-thread
//! wake-ups, which on the multi-thread runtime cost a `futex` call every
//! few transactions. The listener, lag monitor, admin endpoint and pool
//! maintenance stay on the runtime that started the proxy.
//!
//! New connections go to the worker with the fewest sessions.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Worker threads when `proxy.workers` is 0: half the CPUs, at least one.
///
/// A pooler usually shares its host with its clients or its servers; a
/// worker that must share a core wakes up (a context switch) for nearly
/// every message, where one busy worker handles several per wake-up. On the
/// 2-core benchmark machine, with PostgreSQL and pgbench beside it, one
/// worker gave more transactions per second and less CPU per transaction
/// than two (BENCHMARKS.md, section 3). On a host of its own, set
/// `workers` to the number of cores.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// One worker thread.
struct Worker {
    /// Its runtime.
    handle: Handle,
    /// Sessions running on it.
    load: Arc<AtomicUsize>,
}

/// The worker threads of one proxy. Dropping it, or [`Workers::stop`],
/// ends the threads (their sessions are dropped with them).
pub struct Workers {
    workers: Vec<Worker>,
    stop: watch::Sender<bool>,
}

/// Counts a session against its worker while it runs.
struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `n` worker threads (`0`: [`default_count`]).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let n = if n == 0 { default_count() } else { n };
        let (stop, _) = watch::channel(false);
        let mut workers = Vec::with_capacity(n);
        for id in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let mut stopped = stop.subscribe();
            std::thread::Builder::new()
                .name(format!("lagrouter-worker-{id}"))
                .spawn(move || {
                    crate::backend::home::set_current(id);
                    rt.block_on(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                    // Dropping the runtime here drops the sessions still on it.
                    drop(rt);
                })?;
            workers.push(Worker {
                handle,
                load: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Workers { workers, stop })
    }

    /// How many worker threads run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there are no workers (never: [`Workers::start`] starts one
    /// at least).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Sessions running on each worker.
    pub fn loads(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `make()`'s future on the least loaded worker. `make` runs on
    /// that worker's thread, so what it registers (a socket moved over with
    /// `TcpStream::from_std`) belongs to that worker's event loop.
    pub fn spawn<F, Fut>(&self, make: F) -> JoinHandle<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let w = self
            .workers
            .iter()
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
            .expect("at least one worker");
        w.load.fetch_add(1, Ordering::Relaxed);
        let guard = LoadGuard(w.load.clone());
        w.handle.spawn(async move {
            let _guard = guard;
            make().await;
        })
    }

    /// Ends the worker threads (idempotent).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_go_to_the_least_loaded_worker_and_run_there() {
        let w = Workers::start(2).unwrap();
        assert_eq!(w.len(), 2);
        let (release_tx, release_rx) = watch::channel(false);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let mut release = release_rx.clone();
            let seen = seen_tx.clone();
            tasks.push(w.spawn(move || async move {
                seen.send(crate::backend::home::current()).unwrap();
                let _ = release.wait_for(|r| *r).await;
            }));
        }
        let mut homes = Vec::new();
        for _ in 0..4 {
            homes.push(seen_rx.recv().await.unwrap());
        }
        homes.sort_unstable();
        assert_eq!(homes, [0, 0, 1, 1], "two sessions on each worker");
        assert_eq!(w.loads(), [2, 2]);
        release_tx.send_replace(true);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(w.loads(), [0, 0], "a session's load ends with it");
    }

    #[tokio::test]
    async fn stopping_drops_the_sessions_still_running() {
        let w = Workers::start(1).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = w.spawn(move || async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        w.stop();
        // The session's future is dropped with its runtime: the channel closes.
        assert!(rx.await.is_err());
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
