//! SQL statement classification: decides whether what a client sent may run
//! on a replica, must run on the primary, or changes session state that the
//! proxy has to track.
//!
//! Classification uses a real SQL parser ([`sqlparser`] with its PostgreSQL
//! dialect), not regular expressions. Comments are read by a small lexer of
//! its own (the parser drops them) to find routing hints:
//!
//! * `/* lagrouter:primary */` — run on the primary,
//! * `/* lagrouter:replica */` — a replica is acceptable,
//! * `/* lagrouter:token=v1.… */` — a read-your-writes token.
//!
//! Hints may stand anywhere in the text, in block or `--` line comments, but
//! never inside string literals, quoted identifiers or dollar-quoted bodies.
//!
//! Classification is on the proxy's hot path: trivial statements (`SELECT 1`,
//! pgbench's `SELECT abalance FROM pgbench_accounts WHERE aid = $1`, plain
//! `INSERT`/`UPDATE`/`DELETE`, `BEGIN`/`COMMIT`) are recognised by a cheap
//! byte scan without parsing, and [`Classifier`] caches results by SQL text
//! in a bounded LRU. Input that is too big to parse cheaply (over
//! [`MAX_PARSE_BYTES`] or [`MAX_PARSE_STATEMENTS`] statements) is classified
//! from its leading keywords only, conservatively (anything that is not
//! clearly a write, a transaction command and so on is [`StatementKind::Other`],
//! which goes to the primary). Deeply nested input never overflows the stack:
//! when the caller's stack is short for the input's size, parsing runs on a
//! stack grown on the heap.
#![warn(missing_docs)]

mod cache;
mod fallback;
mod fast_path;
mod lexer;
mod parser;
mod query;
mod release;
mod scan;
mod set;
mod types;

pub use cache::Classifier;
pub use release::may_release_session_state;
pub use set::{reset_statement_sql, set_statement_sql};
pub use types::{Classification, PinReason, RouteHint, StatementKind};

use fast_path::fast_path;
use parser::classify_slow;

/// Input longer than this many bytes is not parsed: it is classified from
/// its leading keywords only (see the module documentation).
pub const MAX_PARSE_BYTES: usize = 256 * 1024;

/// Input with more statements than this is not parsed: each statement is
/// classified from its leading keywords only.
pub const MAX_PARSE_STATEMENTS: usize = 1000;

/// Classifies one client query string. Never panics; runs in time linear in
/// the input for input over [`MAX_PARSE_BYTES`].
pub fn classify(sql: &str) -> Classification {
    if let Some(fast) = fast_path(sql) {
        return Classification::single(fast.kind());
    }
    classify_slow(sql)
}
