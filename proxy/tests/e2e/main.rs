//! End-to-end tests of the proxy: a real PostgreSQL cluster started with
//! `lagrouter-testing` and an in-process proxy, one module per area, all in
//! one test binary.
//!
//! The proxy's metrics recorder is process-wide (installed once), and
//! tracing is initialised once with `try_init`, so the modules share the
//! process safely. A test that needs the process to itself (it measures
//! the peak memory) re-runs itself in a child process of this binary
//! ([`support::alone_in_process`]).

mod support;

mod bad_input;
mod basic;
mod consistency;
mod console;
mod containers;
mod dashboard;
mod drivers;
mod extended;
mod failover;
mod faults;
mod lost_backend;
mod ops;
mod optimistic;
mod parity;
mod pinning;
mod prepared;
mod session_policy;
mod session_state;
mod slow_client;
mod status_page;
mod tools;
mod workers;
