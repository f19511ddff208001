//! The admin console: a client that connected to the database `lagrouter`
//! (or `pgbouncer`, for muscle memory) as one of `proxy.admin_users` or
//! `proxy.stats_users` talks to the proxy itself, in the simple query
//! protocol, with ordinary result sets:
//!
//! ```text
//! psql "host=127.0.0.1 port=6432 user=admin dbname=lagrouter" -c 'SHOW NODES'
//! ```
//!
//! * `command`: the command language, parsed without I/O;
//! * `show`: the listings (`SHOW NODES`, `POOLS`, `CLIENTS`, `SERVERS`,
//!   `STATS`, `CONFIG`, `VERSION`, `HELP`);
//! * `config_rows`: `SHOW CONFIG`;
//! * `result`: result sets on the wire;
//! * this file: the connection loop and the commands that act (`RELOAD`,
//!   `PAUSE`, `RESUME`, `SHUTDOWN`).
#![warn(missing_docs)]

mod command;
mod config_rows;
mod result;
mod show;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

pub use command::{Command, HELP, Listing, parse};
pub use result::{Kind, ResultSet};
pub use show::{listing, version};

use crate::frontend::{ClientConn, ConsoleRole, StartupInfo};
use crate::server::Shared;
use crate::wire::{self, PgError, TxnStatus};

/// Whether messages are skipped until `Sync` after a refused
/// extended-protocol message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Skip {
    No,
    UntilSync,
}

/// Serves an admin console connection until the client leaves.
///
/// Boxed: console connections are few, and the future of a connection's
/// task is as large as the larger of the console's and the session's.
pub fn run(
    shared: Arc<Shared>,
    conn: ClientConn,
    info: StartupInfo,
    role: ConsoleRole,
) -> Pin<Box<impl Future<Output = ()> + Send>> {
    Box::pin(serve(shared, conn, info, role))
}

/// The console's loop (see [`run`]).
async fn serve(shared: Arc<Shared>, mut conn: ClientConn, info: StartupInfo, role: ConsoleRole) {
    info!(user = %info.user, ?role, "admin console opened");
    for (k, val) in [
        ("server_version", "15.0 (lagrouter-proxy admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        wire::parameter_status(k, val, &mut conn.wbuf);
    }
    crate::frontend::backend_key_data(0, 0, &mut conn.wbuf);
    wire::ready_for_query(TxnStatus::Idle, &mut conn.wbuf);
    let mut skip = Skip::No;
    let mut shutdown = shared.shutdown_signal();
    loop {
        if conn.flush().await.is_err() {
            return;
        }
        let frame = tokio::select! {
            f = conn.read_frame() => f.ok(),
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(frame) = frame else {
            if *shutdown.borrow() {
                conn.fatal(&PgError::fatal(
                    "57P01",
                    "terminating connection due to administrator command",
                ))
                .await;
            }
            return;
        };
        match frame.tag {
            b'X' => return,
            b'S' => {
                skip = Skip::No;
                wire::ready_for_query(TxnStatus::Idle, &mut conn.wbuf);
            }
            b'Q' => {
                let sql = match crate::wire::decode_frontend(&frame) {
                    Ok(pgwire::messages::PgWireFrontendMessage::Query(q)) => q.query,
                    _ => {
                        conn.fatal(&PgError::fatal(
                            wire::SQLSTATE_PROTOCOL_VIOLATION,
                            "malformed Query message",
                        ))
                        .await;
                        return;
                    }
                };
                let stop = execute(&shared, &mut conn, &sql, role).await;
                wire::ready_for_query(TxnStatus::Idle, &mut conn.wbuf);
                if stop {
                    let _ = conn.flush().await;
                    return;
                }
            }
            _ if skip == Skip::UntilSync => {}
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' => {
                PgError::error(
                    "0A000",
                    "the admin console accepts only simple queries (no extended query protocol)",
                )
                .encode(&mut conn.wbuf);
                skip = Skip::UntilSync;
            }
            other => {
                conn.fatal(&PgError::fatal(
                    wire::SQLSTATE_PROTOCOL_VIOLATION,
                    format!("unexpected message type {:?}", char::from(other)),
                ))
                .await;
                return;
            }
        }
    }
}

/// Runs the commands of one `Query`; stops at the first error. Returns
/// true when the connection should close (`SHUTDOWN`).
async fn execute(shared: &Shared, conn: &mut ClientConn, sql: &str, role: ConsoleRole) -> bool {
    let commands = match parse(sql) {
        Ok(c) => c,
        Err(e) => {
            e.encode(&mut conn.wbuf);
            return false;
        }
    };
    for cmd in commands {
        if role == ConsoleRole::Stats && !cmd.read_only() {
            PgError::error(
                "42501",
                format!(
                    "permission denied: {} needs a user listed in proxy.admin_users",
                    cmd.tag()
                ),
            )
            .encode(&mut conn.wbuf);
            return false;
        }
        match act(shared, conn, &cmd).await {
            Ok(()) if cmd == Command::Empty => {
                conn.wbuf.extend_from_slice(&wire::empty_message(b'I'));
            }
            Ok(()) => {
                if let Command::Show(what) = cmd {
                    listing(shared, what).encode(cmd.tag(), &mut conn.wbuf);
                } else {
                    wire::command_complete(cmd.tag(), &mut conn.wbuf);
                }
                if cmd == Command::Shutdown {
                    return true;
                }
            }
            Err(e) => {
                e.encode(&mut conn.wbuf);
                return false;
            }
        }
    }
    false
}

/// Carries out a command that acts on the proxy (`SHOW` does nothing
/// here).
async fn act(shared: &Shared, conn: &mut ClientConn, cmd: &Command) -> Result<(), PgError> {
    match cmd {
        Command::Show(_) | Command::Empty => Ok(()),
        Command::Reload => match shared.reload_from_file() {
            Ok(path) => {
                info!(path = %path.display(), "RELOAD from the admin console");
                Ok(())
            }
            Err(crate::server::ProxyError::NoConfigFile) => Err(PgError::error(
                "55000",
                "the proxy was started without a configuration file (demo mode); there is nothing to reload",
            )),
            Err(e) => Err(PgError::error(
                "F0000",
                format!("reload failed; the running configuration is kept: {e}"),
            )),
        },
        Command::Pause(db) => {
            shared.pause.pause(db.as_deref());
            info!(database = ?db, "PAUSE from the admin console: waiting for running transactions");
            drain(shared, conn, db.as_deref()).await
        }
        Command::Resume(db) => {
            if shared.pause.resume(db.as_deref()) {
                info!(database = ?db, "RESUME from the admin console");
                Ok(())
            } else if db.is_some() && shared.pause.paused().all {
                Err(PgError::error(
                    "55000",
                    "every database is paused; RESUME without a database name resumes them",
                ))
            } else {
                Err(PgError::error(
                    "55000",
                    match db {
                        Some(d) => format!("database \"{d}\" is not paused"),
                        None => "nothing is paused".to_string(),
                    },
                ))
            }
        }
        Command::Shutdown => {
            info!("SHUTDOWN from the admin console");
            shared.request_shutdown();
            Ok(())
        }
    }
}

/// Waits until no server connection of `db` (or of any database) is in
/// use, for at most `proxy.shutdown_timeout`; reports progress in the log
/// and, on timeout, an error that leaves the pause in force.
async fn drain(shared: &Shared, conn: &mut ClientConn, db: Option<&str>) -> Result<(), PgError> {
    let limit = shared.settings().config.proxy.shutdown_timeout;
    let start = Instant::now();
    let mut last_report = start;
    let in_use = || {
        shared
            .pools
            .stats()
            .iter()
            .filter(|p| db.is_none_or(|d| p.database == d))
            .map(|p| p.in_use)
            .sum::<usize>()
    };
    // Pool check-ins are not signalled; a short poll is cheap here and
    // costs the sessions nothing.
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        let busy = in_use();
        if busy == 0 {
            return Ok(());
        }
        if start.elapsed() >= limit {
            warn!(
                busy,
                "PAUSE: server connections still in use at the timeout"
            );
            return Err(PgError::error(
                "57014",
                format!(
                    "PAUSE timed out after {limit:?}: {busy} server connection(s) still in use (a pinned session or a long transaction); new transactions stay held back until RESUME"
                ),
            ));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            info!(busy, "PAUSE: waiting for running transactions");
            last_report = Instant::now();
        }
        // A client that leaves while waiting ends the wait.
        tokio::select! {
            _ = tick.tick() => {}
            r = conn.fill() => if r.is_err() {
                return Err(PgError::error("57014", "the console client left"));
            },
        }
    }
}
