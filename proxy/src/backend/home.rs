//! Which event loop a server connection's socket is registered with.
//!
//! Sessions run on per-core worker threads, each with its own
//! current-thread runtime ([`crate::server::workers`]). A socket belongs to
//! the runtime that registered it: its readiness events arrive on that
//! runtime's thread. A pooled connection taken by a session on another
//! worker is moved over ([`super::BackendConn::rehome`]) so that its
//! events wake the session's own thread, never a thread across the
//! machine.

use std::cell::Cell;

/// The home of sockets registered outside any worker (the runtime that
/// started the proxy).
pub const NO_WORKER: usize = usize::MAX;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(NO_WORKER) };
}

/// The worker this thread is (set once by the worker thread itself).
pub fn set_current(worker: usize) {
    WORKER.with(|w| w.set(worker));
}

/// The worker running on this thread, or [`NO_WORKER`].
pub fn current() -> usize {
    WORKER.with(Cell::get)
}
