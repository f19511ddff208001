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

use std::collections::HashMap;
use std::ops::{ControlFlow, Range};
use std::sync::{Arc, Mutex, OnceLock};

use sqlparser::ast::{
    CopySource, CopyTarget, DiscardObject, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    ObjectName, Query, Reset, Select, Set, SetExpr, Statement, TableFactor, TransactionAccessMode,
    TransactionIsolationLevel, TransactionMode, UnaryOperator, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// Input longer than this many bytes is not parsed: it is classified from
/// its leading keywords only (see the module documentation).
pub const MAX_PARSE_BYTES: usize = 256 * 1024;

/// Input with more statements than this is not parsed: each statement is
/// classified from its leading keywords only.
pub const MAX_PARSE_STATEMENTS: usize = 1000;

/// Stack reserved for parsing, walking and dropping a statement tree, per
/// byte of input (debug builds need about 64 in the worst case).
const STACK_PER_INPUT_BYTE: usize = 256;

/// Longest token text accepted from a `lagrouter:token=` hint.
const MAX_HINT_TOKEN_LEN: usize = 256;

/// GUCs whose list values PostgreSQL quotes element by element
/// (`GUC_LIST_QUOTE`): their values are replayed as identifier lists.
const LIST_QUOTE_GUCS: &[&str] = &[
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
    "local_preload_libraries",
    "shared_preload_libraries",
];

/// What one SQL statement is, as far as routing is concerned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// A read that may run on a replica: `SELECT`/`VALUES`/`TABLE`/`WITH …
    /// SELECT` without row locks or data-modifying CTEs, `EXPLAIN` without
    /// `ANALYZE` of a write, `COPY … TO STDOUT` of a table or read query,
    /// `FETCH`/`MOVE`/`CLOSE`, `DECLARE` of a cursor without `WITH HOLD`, and
    /// `SELECT set_config(…, true)` (transaction-local). Calls to unknown user
    /// functions stay reads: a replica rejects a writing one with SQLSTATE
    /// 25006 and the proxy retries it on the primary.
    Read,
    /// Writes data or schema, or otherwise needs the primary: DML, DDL,
    /// `GRANT`, `VACUUM`, `CALL`, `DO`, `NOTIFY`, `SELECT … INTO`, `COPY …
    /// FROM` a server file, `COPY … TO` a server file, row-locking `SELECT …
    /// FOR UPDATE/SHARE/NO KEY UPDATE/KEY SHARE`, and reads that call
    /// functions known to write (`nextval`, `setval`, `pg_notify`, `lo_*`,
    /// `txid_current`, `pg_advisory_xact_lock*`, …).
    Write,
    /// `BEGIN` / `START TRANSACTION`; `read_only` when `READ ONLY` was given.
    TransactionBegin {
        /// `true` for `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`.
        read_only: bool,
    },
    /// `COMMIT`, `END`, `ROLLBACK`, `ABORT` (including `AND CHAIN`) and
    /// `PREPARE TRANSACTION`.
    TransactionEnd,
    /// `SET TRANSACTION READ ONLY` (possibly with other modes).
    SetTransactionReadOnly,
    /// `SAVEPOINT`, `RELEASE [SAVEPOINT]`, `ROLLBACK TO [SAVEPOINT]`.
    Savepoint,
    /// A session (or, with `local`, transaction) setting: `SET name = value`,
    /// `SET LOCAL …`, `SET TIME ZONE …` (name `timezone`), `SET ROLE …`
    /// (`role`), `SET SESSION AUTHORIZATION …` (`session_authorization`),
    /// `SET NAMES …` (`client_encoding`) and `SET SESSION CHARACTERISTICS AS
    /// TRANSACTION …` with one mode (`default_transaction_read_only` /
    /// `default_transaction_isolation`).
    ///
    /// `name` is lower-cased (GUC names are case-insensitive). `value` is the
    /// text PostgreSQL stores, as `SHOW` prints it: string literals without
    /// their quotes, unquoted identifiers lower-cased, lists joined by `, `
    /// (with identifier quoting for list GUCs such as `search_path`). Replay
    /// it with [`set_statement_sql`]. `SET x TO DEFAULT` comes out as
    /// [`StatementKind::Reset`]; `SET LOCAL x TO DEFAULT` as a local `Set`
    /// whose value is `DEFAULT` (local settings need no replay).
    Set {
        /// Lower-cased parameter name, e.g. `search_path` or
        /// `lagrouter.min_token`.
        name: String,
        /// The value as PostgreSQL stores it.
        value: String,
        /// `SET LOCAL`: lasts until the end of the transaction only.
        local: bool,
    },
    /// `RESET name`, `RESET ALL` (`name: None`), `SET name TO DEFAULT`.
    Reset {
        /// The lower-cased parameter, or `None` for `RESET ALL`.
        name: Option<String>,
    },
    /// `DISCARD ALL`: resets all session state.
    Discard,
    /// Creates state that lives in the backend session, so the client must
    /// keep the same backend connection from now on (or, for
    /// [`PinReason::Copy`] and [`PinReason::Lock`], until the statement or
    /// transaction completes — see [`PinReason::is_session_scoped`]). Such a
    /// statement runs on the primary.
    SessionPinning(PinReason),
    /// `SHOW name` / `SHOW ALL`: may run anywhere.
    Show,
    /// Not recognised (including anything the parser rejects): run it on the
    /// primary, which returns the real error if it is invalid, and treat it
    /// as a potential write.
    Other,
}

/// Why a statement ties the client to one backend connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// `CREATE TEMP TABLE` / `VIEW` / `SEQUENCE`, `SELECT … INTO TEMP`.
    TempTable,
    /// `LISTEN channel`.
    Listen,
    /// `UNLISTEN channel` / `UNLISTEN *`.
    Unlisten,
    /// Session-level advisory locks: `pg_advisory_lock*`,
    /// `pg_try_advisory_lock*`, `pg_advisory_unlock*`.
    AdvisoryLock,
    /// SQL-level `PREPARE name AS …`.
    SqlPrepare,
    /// `DECLARE … CURSOR WITH HOLD`.
    HoldCursor,
    /// `LOCK TABLE`: holds table locks until the transaction ends.
    Lock,
    /// `COPY … FROM STDIN`: a write; the client streams `CopyData` messages
    /// to the backend until `CopyDone`/`CopyFail`.
    Copy,
    /// `SELECT set_config(name, value, false)` (or with a non-literal
    /// `is_local`): changes a session setting the proxy cannot replay.
    SetConfig,
    /// A session-level `SET` form whose value the proxy cannot replay (for
    /// example `SET TIME ZONE INTERVAL '…'` or forms the parser rejects).
    UnsupportedSet,
}

impl PinReason {
    /// Whether the pin lasts for the rest of the session (`true`) or only
    /// until the statement or transaction completes (`false`: [`Copy`] and
    /// [`Lock`]).
    ///
    /// [`Copy`]: PinReason::Copy
    /// [`Lock`]: PinReason::Lock
    pub fn is_session_scoped(self) -> bool {
        !matches!(self, PinReason::Copy | PinReason::Lock)
    }

    /// A short, stable, lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::TempTable => "temp_table",
            PinReason::Listen => "listen",
            PinReason::Unlisten => "unlisten",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::Lock => "lock",
            PinReason::Copy => "copy",
            PinReason::SetConfig => "set_config",
            PinReason::UnsupportedSet => "unsupported_set",
        }
    }
}

impl StatementKind {
    /// Whether this statement may run on a replica (hot standby): reads,
    /// `SHOW`, settings, savepoints, transaction ends and `BEGIN READ ONLY`.
    /// A plain `BEGIN` is `false` because the transaction may write.
    pub fn may_run_on_replica(&self) -> bool {
        match self {
            StatementKind::Read
            | StatementKind::Show
            | StatementKind::TransactionEnd
            | StatementKind::SetTransactionReadOnly
            | StatementKind::Savepoint
            | StatementKind::Set { .. }
            | StatementKind::Reset { .. }
            | StatementKind::Discard => true,
            StatementKind::TransactionBegin { read_only } => *read_only,
            StatementKind::Write | StatementKind::SessionPinning(_) | StatementKind::Other => false,
        }
    }

    /// A short, stable, lower-case name for logs and metric labels (the
    /// `kind` label of `lagrouter_proxy_queries_total`).
    pub fn label(&self) -> &'static str {
        match self {
            StatementKind::Read => "read",
            StatementKind::Write => "write",
            StatementKind::TransactionBegin { .. } => "begin",
            StatementKind::TransactionEnd => "end",
            StatementKind::SetTransactionReadOnly => "set_transaction",
            StatementKind::Savepoint => "savepoint",
            StatementKind::Set { .. } => "set",
            StatementKind::Reset { .. } => "reset",
            StatementKind::Discard => "discard",
            StatementKind::SessionPinning(_) => "pin",
            StatementKind::Show => "show",
            StatementKind::Other => "other",
        }
    }
}

/// A routing hint given in an SQL comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteHint {
    /// `/* lagrouter:primary */`: run on the primary.
    Primary,
    /// `/* lagrouter:replica */`: a replica is acceptable.
    Replica,
}

/// The classification of one client query string (which may hold several
/// statements separated by `;`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Classification {
    /// One entry per statement, in order. Empty for an empty query (only
    /// whitespace, comments or `;`).
    pub statements: Vec<StatementKind>,
    /// A `lagrouter:primary` / `lagrouter:replica` hint from a comment.
    /// When both appear, `Primary` wins.
    pub hint: Option<RouteHint>,
    /// The raw text of the first `lagrouter:token=…` hint in a comment (not
    /// validated here).
    pub token: Option<String>,
}

impl Classification {
    /// Whether every statement may run on a replica (see
    /// [`StatementKind::may_run_on_replica`]); `true` for an empty query.
    /// Hints are not taken into account.
    pub fn is_read_only(&self) -> bool {
        self.statements
            .iter()
            .all(StatementKind::may_run_on_replica)
    }

    /// The first session-pinning reason among the statements, if any.
    pub fn pin_reason(&self) -> Option<PinReason> {
        self.statements.iter().find_map(|s| match s {
            StatementKind::SessionPinning(r) => Some(*r),
            _ => None,
        })
    }

    /// Whether any statement is a [`StatementKind::Write`] or
    /// [`StatementKind::Other`] (a potential write).
    pub fn has_write(&self) -> bool {
        self.statements
            .iter()
            .any(|s| matches!(s, StatementKind::Write | StatementKind::Other))
    }

    fn single(kind: StatementKind) -> Self {
        Classification {
            statements: vec![kind],
            hint: None,
            token: None,
        }
    }
}

/// Classifies one client query string. Never panics; runs in time linear in
/// the input for input over [`MAX_PARSE_BYTES`].
pub fn classify(sql: &str) -> Classification {
    if let Some(fast) = fast_path(sql) {
        return Classification::single(fast.kind());
    }
    classify_slow(sql)
}

/// Builds the `SET` statement that re-applies a session setting recorded as
/// [`StatementKind::Set`] on another backend connection.
///
/// The name is quoted as an identifier (each dotted part separately) and the
/// value as a string literal (an `E''` literal when it contains a
/// backslash, so the result does not depend on
/// `standard_conforming_strings`). For list GUCs such as `search_path`, a
/// value that is a list of identifiers (`"$user", public`) is emitted as a
/// list of quoted identifiers, which PostgreSQL stores identically.
///
/// ```
/// use lagrouter_proxy::classify::set_statement_sql;
/// assert_eq!(
///     set_statement_sql("application_name", "it's"),
///     r#"SET "application_name" TO 'it''s'"#
/// );
/// assert_eq!(
///     set_statement_sql("search_path", r#""$user", public"#),
///     r#"SET "search_path" TO "$user", "public""#
/// );
/// ```
pub fn set_statement_sql(name: &str, value: &str) -> String {
    let mut out = String::with_capacity(16 + name.len() + value.len());
    out.push_str("SET ");
    push_guc_name(&mut out, name);
    out.push_str(" TO ");
    let lowered = name.to_ascii_lowercase();
    if LIST_QUOTE_GUCS.contains(&lowered.as_str())
        && let Some(elems) = split_ident_list(value)
    {
        for (i, e) in elems.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            push_quoted_ident(&mut out, e);
        }
        return out;
    }
    push_string_literal(&mut out, value);
    out
}

/// Builds the `RESET` statement for a parameter, or `RESET ALL` for `None`.
///
/// ```
/// use lagrouter_proxy::classify::reset_statement_sql;
/// assert_eq!(reset_statement_sql(None), "RESET ALL");
/// assert_eq!(reset_statement_sql(Some("lagrouter.min_token")), r#"RESET "lagrouter"."min_token""#);
/// ```
pub fn reset_statement_sql(name: Option<&str>) -> String {
    match name {
        None => "RESET ALL".to_owned(),
        Some(n) => {
            let mut out = String::from("RESET ");
            push_guc_name(&mut out, n);
            out
        }
    }
}

fn push_guc_name(out: &mut String, name: &str) {
    for (i, part) in name.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_quoted_ident(out, part);
    }
}

fn push_quoted_ident(out: &mut String, ident: &str) {
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        if c != '\0' {
            out.push(c);
        }
    }
    out.push('"');
}

fn push_string_literal(out: &mut String, value: &str) {
    let escape = value.contains('\\');
    if escape {
        out.push('E');
    }
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// Splits `a, "B c", d` into its identifiers; `None` when it is not such a
/// list (or is empty).
fn split_ident_list(value: &str) -> Option<Vec<String>> {
    let b = value.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return None; // empty list or trailing comma
        }
        if b[i] == b'"' {
            let mut s = String::new();
            i += 1;
            loop {
                let rest = value.get(i..)?;
                let q = rest.find('"')?;
                s.push_str(&rest[..q]);
                i += q + 1;
                if b.get(i) == Some(&b'"') {
                    s.push('"');
                    i += 1;
                } else {
                    break;
                }
            }
            out.push(s);
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' && !b[i].is_ascii_whitespace() {
                if b[i] == b'"' || b[i] == b'\'' {
                    return None;
                }
                i += 1;
            }
            out.push(value[start..i].to_owned());
        }
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return Some(out);
        }
        if b[i] != b',' {
            return None;
        }
        i += 1;
    }
}

/// PostgreSQL's `quote_identifier`, without its keyword check.
fn pg_quote_ident(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if safe {
        s.to_owned()
    } else {
        let mut out = String::with_capacity(s.len() + 2);
        push_quoted_ident(&mut out, s);
        out
    }
}

// ---------------------------------------------------------------------------
// Cached classifier
// ---------------------------------------------------------------------------

/// A thread-safe classifier that caches results by SQL text in a bounded
/// LRU. Statements longer than [`Classifier::MAX_CACHED_SQL_LEN`] bytes or
/// carrying a `lagrouter:token=` hint are classified but not cached; trivial
/// statements take the fast path and share preallocated results.
pub struct Classifier {
    cache: Option<Mutex<Lru>>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish()
    }
}

impl Default for Classifier {
    /// A classifier caching up to [`Classifier::DEFAULT_CAPACITY`] entries.
    fn default() -> Self {
        Classifier::new(Self::DEFAULT_CAPACITY)
    }
}

impl Classifier {
    /// The cache capacity of [`Classifier::default`].
    pub const DEFAULT_CAPACITY: usize = 1024;
    /// SQL texts longer than this many bytes are not cached.
    pub const MAX_CACHED_SQL_LEN: usize = 8 * 1024;

    /// A classifier caching up to `capacity` results (`0`: no cache).
    pub fn new(capacity: usize) -> Self {
        Classifier {
            cache: (capacity > 0).then(|| Mutex::new(Lru::new(capacity))),
        }
    }

    /// Classifies `sql`, from the cache when it was seen recently.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        if let Some(fast) = fast_path(sql) {
            return fast.shared();
        }
        let Some(cache) = &self.cache else {
            return Arc::new(classify_slow(sql));
        };
        // Texts carrying a token hint are nearly always unique: caching them
        // would only evict useful entries.
        if sql.len() > Self::MAX_CACHED_SQL_LEN || sql.contains("lagrouter:token=") {
            return Arc::new(classify_slow(sql));
        }
        if let Some(hit) = lock(cache).get(sql) {
            return hit;
        }
        let result = Arc::new(classify_slow(sql));
        lock(cache).insert(sql, result.clone());
        result
    }

    /// The number of cached results.
    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| lock(c).len())
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache capacity (`0`: no cache).
    pub fn capacity(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| lock(c).capacity)
    }
}

fn lock(m: &Mutex<Lru>) -> std::sync::MutexGuard<'_, Lru> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const NIL: usize = usize::MAX;

struct LruNode {
    key: Arc<str>,
    value: Arc<Classification>,
    prev: usize,
    next: usize,
}

/// A least-recently-used map from SQL text to classification: a hash map
/// into a slab of nodes threaded on a doubly linked list (head = newest).
struct Lru {
    capacity: usize,
    map: HashMap<Arc<str>, usize>,
    nodes: Vec<LruNode>,
    head: usize,
    tail: usize,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            map: HashMap::with_capacity(capacity.min(4096)),
            nodes: Vec::with_capacity(capacity.min(4096)),
            head: NIL,
            tail: NIL,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.nodes[i].prev = NIL;
        self.nodes[i].next = self.head;
        if self.head != NIL {
            self.nodes[self.head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    fn get(&mut self, key: &str) -> Option<Arc<Classification>> {
        let i = *self.map.get(key)?;
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        Some(self.nodes[i].value.clone())
    }

    fn insert(&mut self, key: &str, value: Arc<Classification>) {
        if let Some(&i) = self.map.get(key) {
            self.nodes[i].value = value;
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return;
        }
        let key: Arc<str> = Arc::from(key);
        let i = if self.nodes.len() < self.capacity {
            self.nodes.push(LruNode {
                key: key.clone(),
                value,
                prev: NIL,
                next: NIL,
            });
            self.nodes.len() - 1
        } else {
            let i = self.tail;
            self.unlink(i);
            let old = std::mem::replace(&mut self.nodes[i].key, key.clone());
            self.map.remove(&old);
            self.nodes[i].value = value;
            i
        };
        self.map.insert(key, i);
        self.push_front(i);
    }
}

// ---------------------------------------------------------------------------
// Fast path
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fast {
    Read,
    Write,
    Begin,
    End,
}

impl Fast {
    fn kind(self) -> StatementKind {
        match self {
            Fast::Read => StatementKind::Read,
            Fast::Write => StatementKind::Write,
            Fast::Begin => StatementKind::TransactionBegin { read_only: false },
            Fast::End => StatementKind::TransactionEnd,
        }
    }

    fn shared(self) -> Arc<Classification> {
        static SHARED: [OnceLock<Arc<Classification>>; 4] = [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ];
        SHARED[self as usize]
            .get_or_init(|| Arc::new(Classification::single(self.kind())))
            .clone()
    }
}

/// Recognises trivial statements without parsing. Returns `None` whenever
/// in doubt.
fn fast_path(sql: &str) -> Option<Fast> {
    let mut s = sql.trim_ascii();
    if let Some(stripped) = s.strip_suffix(';') {
        s = stripped.trim_ascii_end();
    }
    let b = s.as_bytes();
    let first_len = b
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(b.len());
    let first = &s[..first_len];
    let rest = &b[first_len..];
    if !rest.is_empty() && !rest[0].is_ascii_whitespace() {
        return None;
    }
    if first.eq_ignore_ascii_case("select") {
        return fast_select(b).then_some(Fast::Read);
    }
    if rest.is_empty() {
        return match first.to_ascii_lowercase().as_str() {
            "begin" => Some(Fast::Begin),
            "commit" | "end" | "rollback" | "abort" => Some(Fast::End),
            _ => None,
        };
    }
    if first.eq_ignore_ascii_case("insert")
        || first.eq_ignore_ascii_case("update")
        || first.eq_ignore_ascii_case("delete")
    {
        // Any statement starting with these keywords is a write; only make
        // sure there is exactly one statement and no comment (hint).
        let clean = !b.contains(&b';') && !b.windows(2).any(|w| w == b"--" || w == b"/*");
        return clean.then_some(Fast::Write);
    }
    None
}

/// A `SELECT` made only of words, numbers, `$n` parameters and simple
/// operators: no parentheses (so no function calls, subqueries or CTEs), no
/// quotes, no comments, no `;`, and no `FOR` (locking) or `INTO`.
fn fast_select(b: &[u8]) -> bool {
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let w = &b[start..i];
            if w.eq_ignore_ascii_case(b"for") || w.eq_ignore_ascii_case(b"into") {
                return false;
            }
            // `$` inside an identifier (`a$b`) is fine; a word directly
            // followed by `$` could also be a dollar-quote tag.
            if b.get(i) == Some(&b'$') {
                return false;
            }
            continue;
        }
        match c {
            b'0'..=b'9'
            | b' '
            | b'\t'
            | b'\n'
            | b'\r'
            | b','
            | b'.'
            | b'='
            | b'<'
            | b'>'
            | b'*'
            | b'+'
            | b'%'
            | b'!' => {}
            b'-' if b.get(i + 1) != Some(&b'-') => {}
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

// ---------------------------------------------------------------------------
// Lexer (for comments, statement boundaries and keyword fallbacks)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok<'a> {
    /// An unquoted identifier or keyword.
    Word(&'a str),
    Number,
    /// A string literal, quoted identifier or dollar-quoted string.
    Quoted,
    Param,
    /// The text of a comment, without its delimiters.
    Comment(&'a str),
    /// A `;`, with its byte offset.
    Semicolon(usize),
    Punct(u8),
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// A PostgreSQL-aware lexer that never fails: unterminated strings and
/// comments extend to the end of the input.
struct Lexer<'a> {
    s: &'a str,
    i: usize,
    /// Set when a block comment ran to the end of the input.
    unterminated: bool,
}

impl<'a> Lexer<'a> {
    fn new(s: &'a str) -> Self {
        Lexer {
            s,
            i: 0,
            unterminated: false,
        }
    }

    /// Skips a quoted run starting at the opening quote `self.i`; `q` is the
    /// quote byte, doubled to escape; `backslash` enables `\` escapes.
    fn skip_quoted(&mut self, q: u8, backslash: bool) {
        let b = self.s.as_bytes();
        let mut j = self.i + 1;
        while j < b.len() {
            if backslash && b[j] == b'\\' {
                j += 2;
                continue;
            }
            if b[j] == q {
                if b.get(j + 1) == Some(&q) {
                    j += 2;
                    continue;
                }
                self.i = j + 1;
                return;
            }
            j += 1;
        }
        self.i = b.len();
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Tok<'a>;

    fn next(&mut self) -> Option<Tok<'a>> {
        let s = self.s;
        let b = s.as_bytes();
        while self.i < b.len() && (b[self.i].is_ascii_whitespace() || b[self.i] == 0x0b) {
            self.i += 1;
        }
        let i = self.i;
        let c = *b.get(i)?;
        let next = b.get(i + 1).copied();
        match c {
            b'-' if next == Some(b'-') => {
                let end = s[i..].find('\n').map_or(b.len(), |p| i + p);
                self.i = end;
                Some(Tok::Comment(&s[i + 2..end]))
            }
            b'/' if next == Some(b'*') => {
                let mut depth = 1usize;
                let mut j = i + 2;
                let mut content_end = b.len();
                while j < b.len() {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            content_end = j - 2;
                            break;
                        }
                    } else {
                        j += 1;
                    }
                }
                self.i = j.min(b.len());
                if depth > 0 {
                    self.unterminated = true;
                }
                Some(Tok::Comment(&s[i + 2..content_end]))
            }
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Some(Tok::Quoted)
            }
            b'"' => {
                self.skip_quoted(b'"', false);
                Some(Tok::Quoted)
            }
            b';' => {
                self.i += 1;
                Some(Tok::Semicolon(i))
            }
            b'$' => {
                if next.is_some_and(|n| n.is_ascii_digit()) {
                    let mut j = i + 1;
                    while j < b.len() && b[j].is_ascii_digit() {
                        j += 1;
                    }
                    self.i = j;
                    return Some(Tok::Param);
                }
                let mut j = i + 1;
                while j < b.len() && (is_ident_start(b[j]) || b[j].is_ascii_digit()) {
                    j += 1;
                }
                if b.get(j) == Some(&b'$') {
                    let tag = &s[i..=j];
                    self.i = s[j + 1..]
                        .find(tag)
                        .map_or(b.len(), |p| j + 1 + p + tag.len());
                    Some(Tok::Quoted)
                } else {
                    self.i += 1;
                    Some(Tok::Punct(b'$'))
                }
            }
            c if is_ident_start(c) => {
                let mut j = i + 1;
                while j < b.len() && is_ident_char(b[j]) {
                    j += 1;
                }
                let w = &s[i..j];
                self.i = j;
                if b.get(j) == Some(&b'\'') {
                    if w.eq_ignore_ascii_case("e") {
                        self.skip_quoted(b'\'', true);
                        return Some(Tok::Quoted);
                    }
                    if matches!(w, "b" | "B" | "x" | "X" | "n" | "N") {
                        self.skip_quoted(b'\'', false);
                        return Some(Tok::Quoted);
                    }
                }
                if w.eq_ignore_ascii_case("u")
                    && b.get(j) == Some(&b'&')
                    && let Some(&q @ (b'\'' | b'"')) = b.get(j + 1)
                {
                    self.i = j + 1;
                    self.skip_quoted(q, false);
                    return Some(Tok::Quoted);
                }
                Some(Tok::Word(w))
            }
            c if c.is_ascii_digit() || (c == b'.' && next.is_some_and(|n| n.is_ascii_digit())) => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'.')
                {
                    j += 1;
                }
                self.i = j;
                Some(Tok::Number)
            }
            c => {
                self.i += 1;
                Some(Tok::Punct(c))
            }
        }
    }
}

/// Hints, and the byte ranges of the non-empty statements.
struct Scan {
    hint: Option<RouteHint>,
    token: Option<String>,
    pieces: Vec<Range<usize>>,
}

fn scan(sql: &str) -> Scan {
    let mut out = Scan {
        hint: None,
        token: None,
        pieces: Vec::new(),
    };
    let mut start = 0;
    let mut has_tokens = false;
    let mut prev_begin = false;
    let mut atomic = false;
    let mut lexer = Lexer::new(sql);
    for tok in lexer.by_ref() {
        match tok {
            Tok::Comment(text) => parse_hints(text, &mut out),
            Tok::Semicolon(pos) if !atomic => {
                if has_tokens {
                    out.pieces.push(start..pos);
                }
                start = pos + 1;
                has_tokens = false;
                prev_begin = false;
            }
            Tok::Word(w) => {
                has_tokens = true;
                // `BEGIN ATOMIC … END` bodies contain `;`: stop splitting.
                if prev_begin && w.eq_ignore_ascii_case("atomic") {
                    atomic = true;
                }
                prev_begin = w.eq_ignore_ascii_case("begin");
            }
            _ => {
                has_tokens = true;
                prev_begin = false;
            }
        }
    }
    // An unterminated comment is a syntax error, not an empty query.
    if has_tokens || lexer.unterminated {
        out.pieces.push(start..sql.len());
    }
    out
}

fn parse_hints(comment: &str, out: &mut Scan) {
    const TAG: &str = "lagrouter:";
    let mut rest = comment;
    while let Some(p) = rest.find(TAG) {
        rest = &rest[p + TAG.len()..];
        let word_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..word_end];
        if word.eq_ignore_ascii_case("primary") {
            out.hint = Some(RouteHint::Primary);
        } else if word.eq_ignore_ascii_case("replica") {
            if out.hint.is_none() {
                out.hint = Some(RouteHint::Replica);
            }
        } else if word.eq_ignore_ascii_case("token") && rest[word_end..].starts_with('=') {
            let value = &rest[word_end + 1..];
            let end = value
                .find(|c: char| {
                    !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '~' | '+' | '='))
                })
                .unwrap_or(value.len());
            let token = &value[..end];
            if out.token.is_none() && !token.is_empty() && token.len() <= MAX_HINT_TOKEN_LEN {
                out.token = Some(token.to_owned());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

const DIALECT: PostgreSqlDialect = PostgreSqlDialect {};

fn classify_slow(sql: &str) -> Classification {
    let scan = scan(sql);
    let statements = if sql.len() > MAX_PARSE_BYTES || scan.pieces.len() > MAX_PARSE_STATEMENTS {
        scan.pieces
            .iter()
            .map(|r| fallback_kind(&sql[r.clone()]))
            .collect()
    } else {
        // sqlparser guards its own recursion, but walking and dropping the
        // tree recurse once per nesting level (a `1+1+…` chain nests once
        // per two bytes). Make sure there is ample stack, growing it on the
        // heap when the caller's (e.g. a tokio worker's) is short.
        let need = sql
            .len()
            .saturating_mul(STACK_PER_INPUT_BYTE)
            .max(64 * 1024);
        stacker::maybe_grow(need, need, || parse_all(sql, &scan.pieces))
    };
    Classification {
        statements,
        hint: scan.hint,
        token: scan.token,
    }
}

fn parse_all(sql: &str, pieces: &[Range<usize>]) -> Vec<StatementKind> {
    if pieces.is_empty() {
        return Vec::new();
    }
    match Parser::parse_sql(&DIALECT, sql) {
        Ok(stmts) => stmts.iter().map(classify_statement).collect(),
        Err(_) if pieces.len() == 1 => vec![fallback_kind(&sql[pieces[0].clone()])],
        Err(_) => pieces
            .iter()
            .flat_map(|r| {
                let piece = &sql[r.clone()];
                match Parser::parse_sql(&DIALECT, piece) {
                    Ok(stmts) => stmts.iter().map(classify_statement).collect(),
                    Err(_) => vec![fallback_kind(piece)],
                }
            })
            .collect(),
    }
}

fn classify_statement(stmt: &Statement) -> StatementKind {
    use StatementKind as K;
    match stmt {
        Statement::Query(q) => classify_query(q),
        Statement::Insert { .. }
        | Statement::Update { .. }
        | Statement::Delete { .. }
        | Statement::Merge { .. }
        | Statement::Truncate { .. }
        | Statement::Call { .. }
        | Statement::Vacuum { .. }
        | Statement::Analyze { .. }
        | Statement::Grant { .. }
        | Statement::Revoke { .. }
        | Statement::GrantRole { .. }
        | Statement::RevokeRole { .. }
        | Statement::Deny { .. }
        | Statement::AlterDefaultPrivileges { .. }
        | Statement::Comment { .. }
        | Statement::RefreshMaterializedView { .. }
        | Statement::NOTIFY { .. }
        | Statement::CreateIndex { .. }
        | Statement::CreateRole { .. }
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateFunction { .. }
        | Statement::CreateTrigger { .. }
        | Statement::CreateProcedure { .. }
        | Statement::CreateType { .. }
        | Statement::CreateDomain { .. }
        | Statement::CreateExtension { .. }
        | Statement::CreatePolicy { .. }
        | Statement::CreateUser { .. }
        | Statement::AlterTable { .. }
        | Statement::AlterSchema { .. }
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterFunction { .. }
        | Statement::AlterType { .. }
        | Statement::AlterRole { .. }
        | Statement::AlterPolicy { .. }
        | Statement::AlterUser { .. }
        | Statement::Drop { .. }
        | Statement::DropFunction { .. }
        | Statement::DropDomain { .. }
        | Statement::DropProcedure { .. }
        | Statement::DropPolicy { .. }
        | Statement::DropExtension { .. }
        | Statement::DropTrigger { .. } => K::Write,
        Statement::CreateTable(ct) => temp_or_write(ct.temporary),
        Statement::CreateView(cv) => temp_or_write(cv.temporary),
        Statement::CreateSequence { temporary, .. } => temp_or_write(*temporary),
        Statement::StartTransaction { modes, .. } => K::TransactionBegin {
            read_only: read_only_mode(modes).unwrap_or(false),
        },
        Statement::Commit { .. } => K::TransactionEnd,
        Statement::Rollback { savepoint, .. } => {
            if savepoint.is_some() {
                K::Savepoint
            } else {
                K::TransactionEnd
            }
        }
        Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => K::Savepoint,
        Statement::Set(set) => classify_set(set),
        Statement::Reset(r) => match &r.reset {
            Reset::ALL => K::Reset { name: None },
            Reset::SessionAuthorization => K::Reset {
                name: Some("session_authorization".to_owned()),
            },
            Reset::ConfigurationParameter(name) => K::Reset {
                name: Some(guc_name(name)),
            },
        },
        Statement::Discard { object_type } => match object_type {
            DiscardObject::ALL => K::Discard,
            _ => K::Other,
        },
        Statement::ShowVariable { .. } => K::Show,
        Statement::LISTEN { .. } => K::SessionPinning(PinReason::Listen),
        Statement::UNLISTEN { .. } => K::SessionPinning(PinReason::Unlisten),
        Statement::Prepare { .. } => K::SessionPinning(PinReason::SqlPrepare),
        Statement::Lock(_) => K::SessionPinning(PinReason::Lock),
        Statement::Declare { stmts, .. } => {
            let mut kind = K::Read;
            for d in stmts {
                let k = if d.hold == Some(true) {
                    K::SessionPinning(PinReason::HoldCursor)
                } else if let Some(q) = &d.for_query {
                    classify_query(q)
                } else {
                    K::Other
                };
                kind = worst(kind, k);
            }
            kind
        }
        Statement::Fetch { .. } | Statement::Close { .. } => K::Read,
        Statement::Copy {
            source, to, target, ..
        } => {
            if !*to {
                return match target {
                    CopyTarget::Stdin => K::SessionPinning(PinReason::Copy),
                    _ => K::Write,
                };
            }
            if !matches!(target, CopyTarget::Stdout) {
                return K::Write; // server-side file or program
            }
            match source {
                CopySource::Table { .. } => K::Read,
                CopySource::Query(q) => classify_query(q),
            }
        }
        Statement::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            let analyze = *analyze
                || options.as_ref().is_some_and(|opts| {
                    opts.iter().any(|o| {
                        o.name.value.eq_ignore_ascii_case("analyze") && option_enabled(&o.arg)
                    })
                });
            if !analyze {
                return K::Read;
            }
            match classify_statement(statement) {
                K::Read => K::Read,
                pin @ K::SessionPinning(_) => pin,
                _ => K::Write,
            }
        }
        Statement::ExplainTable { .. } => K::Read,
        other => {
            // Rare statements: decide by the leading keyword of their
            // canonical text.
            let text = other.to_string();
            let first = text.split_ascii_whitespace().next().unwrap_or("");
            const WRITE_WORDS: &[&str] = &[
                "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "REFRESH", "TRUNCATE",
                "SECURITY", "REINDEX", "CLUSTER", "IMPORT", "RENAME",
            ];
            if WRITE_WORDS.iter().any(|w| first.eq_ignore_ascii_case(w)) {
                K::Write
            } else {
                K::Other
            }
        }
    }
}

fn temp_or_write(temporary: bool) -> StatementKind {
    if temporary {
        StatementKind::SessionPinning(PinReason::TempTable)
    } else {
        StatementKind::Write
    }
}

/// `READ ONLY` (`Some(true)`), `READ WRITE` (`Some(false)`) or neither; the
/// last one given wins.
fn read_only_mode(modes: &[TransactionMode]) -> Option<bool> {
    modes.iter().rev().find_map(|m| match m {
        TransactionMode::AccessMode(TransactionAccessMode::ReadOnly) => Some(true),
        TransactionMode::AccessMode(TransactionAccessMode::ReadWrite) => Some(false),
        TransactionMode::IsolationLevel(_) => None,
    })
}

/// Whether an `EXPLAIN (OPTION [arg])` option is on.
fn option_enabled(arg: &Option<Expr>) -> bool {
    match arg {
        None => true,
        Some(Expr::Value(v)) => match &v.value {
            Value::Boolean(b) => *b,
            Value::Number(n, _) => n != "0",
            Value::SingleQuotedString(s) => truthy(s),
            _ => true,
        },
        Some(Expr::Identifier(id)) => truthy(&id.value),
        Some(_) => true,
    }
}

fn truthy(s: &str) -> bool {
    !["false", "off", "0", "no", "f", "n"]
        .iter()
        .any(|f| s.eq_ignore_ascii_case(f))
}

/// The more restrictive of two kinds for a single statement: a pin beats a
/// write beats anything else.
fn worst(a: StatementKind, b: StatementKind) -> StatementKind {
    fn rank(k: &StatementKind) -> u8 {
        match k {
            StatementKind::SessionPinning(_) => 3,
            StatementKind::Write => 2,
            StatementKind::Other => 1,
            _ => 0,
        }
    }
    if rank(&b) > rank(&a) { b } else { a }
}

fn guc_name(name: &ObjectName) -> String {
    let mut out = String::new();
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part.as_ident() {
            Some(id) => out.push_str(&id.value.to_lowercase()),
            None => out.push_str(&part.to_string().to_lowercase()),
        }
    }
    out
}

enum FlatValue {
    Default,
    /// A string literal or quoted identifier: list GUCs quote it.
    Text(String),
    /// A number or keyword: never quoted.
    Bare(String),
}

fn flat_value(e: &Expr) -> Option<FlatValue> {
    Some(match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::NationalStringLiteral(s)
            | Value::UnicodeStringLiteral(s) => FlatValue::Text(s.clone()),
            Value::DollarQuotedString(d) => FlatValue::Text(d.value.clone()),
            Value::Number(n, _) => FlatValue::Bare(n.clone()),
            Value::Boolean(b) => FlatValue::Bare(b.to_string()),
            _ => return None,
        },
        Expr::Identifier(id) => match id.quote_style {
            None if id.value.eq_ignore_ascii_case("default") => FlatValue::Default,
            None => FlatValue::Text(id.value.to_lowercase()),
            Some('"') => FlatValue::Text(id.value.clone()),
            Some(_) => return None,
        },
        Expr::UnaryOp { op, expr } => match (op, flat_value(expr)?) {
            (UnaryOperator::Minus, FlatValue::Bare(n)) => FlatValue::Bare(format!("-{n}")),
            (UnaryOperator::Plus, FlatValue::Bare(n)) => FlatValue::Bare(n),
            _ => return None,
        },
        _ => return None,
    })
}

/// A `SET name = values` statement as a [`StatementKind`].
fn set_kind(name: String, values: &[Expr], local: bool) -> StatementKind {
    let flats: Option<Vec<FlatValue>> = values.iter().map(flat_value).collect();
    let Some(flats) = flats.filter(|f| !f.is_empty()) else {
        return unsupported_set(local);
    };
    if flats.iter().any(|f| matches!(f, FlatValue::Default)) {
        if flats.len() != 1 {
            return unsupported_set(local);
        }
        return if local {
            StatementKind::Set {
                name,
                value: "DEFAULT".to_owned(),
                local,
            }
        } else {
            StatementKind::Reset { name: Some(name) }
        };
    }
    let quote = LIST_QUOTE_GUCS.contains(&name.as_str());
    let mut value = String::new();
    for (i, f) in flats.iter().enumerate() {
        if i > 0 {
            value.push_str(", ");
        }
        match f {
            FlatValue::Text(t) if quote => value.push_str(&pg_quote_ident(t)),
            FlatValue::Text(t) | FlatValue::Bare(t) => value.push_str(t),
            FlatValue::Default => {}
        }
    }
    StatementKind::Set { name, value, local }
}

fn unsupported_set(local: bool) -> StatementKind {
    if local {
        // Transaction-local: nothing to replay, runs wherever the
        // transaction runs.
        StatementKind::Other
    } else {
        StatementKind::SessionPinning(PinReason::UnsupportedSet)
    }
}

fn classify_set(set: &Set) -> StatementKind {
    use sqlparser::ast::{ContextModifier, SetSessionAuthorizationParamKind};
    match set {
        Set::SingleAssignment {
            scope,
            hivevar: false,
            variable,
            values,
        } => set_kind(
            guc_name(variable),
            values,
            matches!(scope, Some(ContextModifier::Local)),
        ),
        Set::SetTimeZone { local, value } => {
            let name = "timezone".to_owned();
            if let Expr::Identifier(id) = value
                && id.quote_style.is_none()
                && id.value.eq_ignore_ascii_case("local")
            {
                // `SET TIME ZONE LOCAL` means DEFAULT.
                return set_kind(name, &[Expr::Identifier("DEFAULT".into())], *local);
            }
            set_kind(name, std::slice::from_ref(value), *local)
        }
        Set::SetRole {
            context_modifier,
            role_name,
        } => {
            let local = matches!(context_modifier, Some(ContextModifier::Local));
            let value = match role_name {
                Some(r) if r.quote_style.is_some() => r.value.clone(),
                Some(r) => r.value.to_lowercase(),
                None => "none".to_owned(),
            };
            StatementKind::Set {
                name: "role".to_owned(),
                value,
                local,
            }
        }
        Set::SetSessionAuthorization(p) => {
            let local = matches!(p.scope, ContextModifier::Local);
            let name = "session_authorization".to_owned();
            match &p.kind {
                SetSessionAuthorizationParamKind::Default => {
                    set_kind(name, &[Expr::Identifier("DEFAULT".into())], local)
                }
                SetSessionAuthorizationParamKind::User(u) => {
                    set_kind(name, &[Expr::Identifier(u.clone())], local)
                }
            }
        }
        Set::SetNames {
            charset_name,
            collation_name: None,
        } => StatementKind::Set {
            name: "client_encoding".to_owned(),
            value: charset_name.value.clone(),
            local: false,
        },
        Set::SetNamesDefault {} => StatementKind::Reset {
            name: Some("client_encoding".to_owned()),
        },
        Set::SetTransaction {
            modes,
            snapshot: _,
            session: false,
        } => {
            if read_only_mode(modes) == Some(true) {
                StatementKind::SetTransactionReadOnly
            } else {
                StatementKind::Other
            }
        }
        Set::SetTransaction {
            modes,
            snapshot: None,
            session: true,
        } => match modes.as_slice() {
            [TransactionMode::AccessMode(m)] => StatementKind::Set {
                name: "default_transaction_read_only".to_owned(),
                value: match m {
                    TransactionAccessMode::ReadOnly => "on",
                    TransactionAccessMode::ReadWrite => "off",
                }
                .to_owned(),
                local: false,
            },
            [TransactionMode::IsolationLevel(level)] => StatementKind::Set {
                name: "default_transaction_isolation".to_owned(),
                value: match level {
                    TransactionIsolationLevel::ReadUncommitted => "read uncommitted",
                    TransactionIsolationLevel::ReadCommitted => "read committed",
                    TransactionIsolationLevel::RepeatableRead => "repeatable read",
                    TransactionIsolationLevel::Serializable => "serializable",
                    _ => return StatementKind::SessionPinning(PinReason::UnsupportedSet),
                }
                .to_owned(),
                local: false,
            },
            _ => StatementKind::SessionPinning(PinReason::UnsupportedSet),
        },
        _ => StatementKind::Other,
    }
}

// ---------------------------------------------------------------------------
// Queries: locking clauses, data-modifying CTEs, SELECT INTO, functions
// ---------------------------------------------------------------------------

fn classify_query(q: &Query) -> StatementKind {
    let mut v = QueryVisitor {
        kind: StatementKind::Read,
    };
    let _ = q.visit(&mut v);
    v.kind
}

struct QueryVisitor {
    kind: StatementKind,
}

impl QueryVisitor {
    fn raise(&mut self, k: StatementKind) -> ControlFlow<()> {
        self.kind = worst(std::mem::replace(&mut self.kind, StatementKind::Read), k);
        if matches!(self.kind, StatementKind::SessionPinning(_)) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn function(&mut self, name: &ObjectName, args: &[FunctionArg]) -> ControlFlow<()> {
        let Some(last) = name.0.last().and_then(|p| p.as_ident()) else {
            return ControlFlow::Continue(());
        };
        match function_effect(&last.value.to_ascii_lowercase(), args) {
            StatementKind::Read => ControlFlow::Continue(()),
            k => self.raise(k),
        }
    }
}

fn setexpr_has_dml(e: &SetExpr) -> bool {
    match e {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::SetOperation { left, right, .. } => {
            setexpr_has_dml(left) || setexpr_has_dml(right)
        }
        _ => false,
    }
}

impl Visitor for QueryVisitor {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if !q.locks.is_empty() || setexpr_has_dml(&q.body) {
            return self.raise(StatementKind::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        match &s.into {
            Some(into) if into.temporary => {
                self.raise(StatementKind::SessionPinning(PinReason::TempTable))
            }
            Some(_) => self.raise(StatementKind::Write),
            None => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        match s {
            Statement::Insert { .. }
            | Statement::Update { .. }
            | Statement::Delete { .. }
            | Statement::Merge { .. } => self.raise(StatementKind::Write),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            let args: &[FunctionArg] = match &f.args {
                FunctionArguments::List(l) => &l.args,
                _ => &[],
            };
            return self.function(&f.name, args);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => self.function(name, &args.args),
            TableFactor::Function { name, args, .. } => self.function(name, args),
            _ => ControlFlow::Continue(()),
        }
    }
}

/// What calling the function `name` (lower-cased, unqualified) implies.
fn function_effect(name: &str, args: &[FunctionArg]) -> StatementKind {
    const WRITES: &[&str] = &[
        "nextval",
        "setval",
        "currval",
        "lastval",
        "pg_notify",
        "txid_current",
        "txid_current_if_assigned",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "pg_current_wal_lsn",
        "pg_current_wal_insert_lsn",
        "pg_current_wal_flush_lsn",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_logical_emit_message",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        "pg_cancel_backend",
        "pg_terminate_backend",
        "loread",
        "lowrite",
    ];
    const ADVISORY: &[&str] = &[
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
    ];
    if name.starts_with("lo_") || WRITES.contains(&name) {
        return StatementKind::Write;
    }
    if ADVISORY.contains(&name) {
        return StatementKind::SessionPinning(PinReason::AdvisoryLock);
    }
    if name == "set_config" {
        // set_config(name, value, is_local): a literal `true` is
        // transaction-local and harmless anywhere.
        let is_local = match args.get(2) {
            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => match &v.value {
                Value::Boolean(b) => *b,
                Value::SingleQuotedString(s) => ["t", "true", "on", "yes", "y", "1"]
                    .iter()
                    .any(|t| s.eq_ignore_ascii_case(t)),
                _ => false,
            },
            _ => false,
        };
        return if is_local {
            StatementKind::Read
        } else {
            StatementKind::SessionPinning(PinReason::SetConfig)
        };
    }
    StatementKind::Read
}

// ---------------------------------------------------------------------------
// Keyword fallback for what the parser rejects (or is too big to parse)
// ---------------------------------------------------------------------------

/// Classifies one statement from its keywords. Used for statements the
/// parser rejects and for oversized input; conservative: anything not
/// clearly recognised is [`StatementKind::Other`].
fn fallback_kind(piece: &str) -> StatementKind {
    use StatementKind as K;
    let mut toks = Lexer::new(piece).filter(|t| !matches!(t, Tok::Comment(_)));
    let first = match toks.next() {
        Some(Tok::Word(w)) => w.to_ascii_uppercase(),
        Some(Tok::Punct(b'(')) => "(".to_owned(),
        _ => return K::Other,
    };
    let second = match toks.next() {
        Some(Tok::Word(w)) => Some(w.to_ascii_uppercase()),
        _ => None,
    };
    let second = second.as_deref();
    let words: Vec<&str> = Lexer::new(piece)
        .filter_map(|t| match t {
            Tok::Word(w) => Some(w),
            _ => None,
        })
        .collect();
    let has_seq = |seq: &[&str]| -> bool {
        words
            .windows(seq.len())
            .any(|win| win.iter().zip(seq).all(|(a, b)| a.eq_ignore_ascii_case(b)))
    };
    let locking = || {
        has_seq(&["FOR", "UPDATE"])
            || has_seq(&["FOR", "SHARE"])
            || has_seq(&["FOR", "NO", "KEY"])
            || has_seq(&["FOR", "KEY", "SHARE"])
    };
    match first.as_str() {
        "SELECT" | "WITH" | "VALUES" | "(" => {
            if locking() {
                K::Write
            } else {
                K::Other
            }
        }
        "TABLE" => {
            // `TABLE name [*]` alone is a read.
            let simple = Lexer::new(piece)
                .filter(|t| !matches!(t, Tok::Comment(_)))
                .skip(1)
                .all(|t| matches!(t, Tok::Word(_) | Tok::Quoted | Tok::Punct(b'.' | b'*')));
            let reserved = words.iter().skip(1).any(|w| {
                ["FOR", "UNION", "INTERSECT", "EXCEPT", "ORDER", "LIMIT"]
                    .iter()
                    .any(|r| w.eq_ignore_ascii_case(r))
            });
            if simple && !reserved {
                K::Read
            } else if locking() {
                K::Write
            } else {
                K::Other
            }
        }
        "BEGIN" => match second {
            None | Some("WORK" | "TRANSACTION" | "ISOLATION" | "READ" | "NOT" | "DEFERRABLE") => {
                K::TransactionBegin {
                    read_only: has_seq(&["READ", "ONLY"]),
                }
            }
            _ => K::Other,
        },
        "START" if second == Some("TRANSACTION") => K::TransactionBegin {
            read_only: has_seq(&["READ", "ONLY"]),
        },
        "CREATE" => {
            if matches!(second, Some("TEMP" | "TEMPORARY"))
                || (matches!(second, Some("LOCAL" | "GLOBAL"))
                    && (has_seq(&["LOCAL", "TEMP"])
                        || has_seq(&["LOCAL", "TEMPORARY"])
                        || has_seq(&["GLOBAL", "TEMP"])
                        || has_seq(&["GLOBAL", "TEMPORARY"])))
            {
                K::SessionPinning(PinReason::TempTable)
            } else {
                K::Write
            }
        }
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "ALTER" | "DROP" | "TRUNCATE" | "GRANT"
        | "REVOKE" | "COMMENT" | "REINDEX" | "CLUSTER" | "VACUUM" | "ANALYZE" | "REFRESH"
        | "CALL" | "DO" | "CHECKPOINT" | "SECURITY" | "IMPORT" | "REASSIGN" | "NOTIFY" => K::Write,
        "COPY" => {
            if has_seq(&["FROM", "STDIN"]) {
                K::SessionPinning(PinReason::Copy)
            } else {
                K::Write
            }
        }
        "PREPARE" => {
            if second == Some("TRANSACTION") {
                K::TransactionEnd
            } else {
                K::SessionPinning(PinReason::SqlPrepare)
            }
        }
        "COMMIT" | "ROLLBACK" => match second {
            Some("PREPARED") => K::Write,
            Some("TO") => K::Savepoint,
            _ => K::TransactionEnd,
        },
        "END" | "ABORT" => K::TransactionEnd,
        "SAVEPOINT" | "RELEASE" => K::Savepoint,
        "MOVE" | "FETCH" | "CLOSE" => K::Read,
        "SHOW" => K::Show,
        "LISTEN" => K::SessionPinning(PinReason::Listen),
        "UNLISTEN" => K::SessionPinning(PinReason::Unlisten),
        "LOCK" => K::SessionPinning(PinReason::Lock),
        "DECLARE" => {
            if has_seq(&["WITH", "HOLD"]) {
                K::SessionPinning(PinReason::HoldCursor)
            } else {
                K::Other
            }
        }
        "SET" => match second {
            Some("LOCAL" | "CONSTRAINTS" | "TRANSACTION") => K::Other,
            _ => K::SessionPinning(PinReason::UnsupportedSet),
        },
        "RESET" => match second {
            Some("ALL") => K::Reset { name: None },
            Some("TIME") if has_seq(&["TIME", "ZONE"]) => K::Reset {
                name: Some("timezone".to_owned()),
            },
            _ => K::SessionPinning(PinReason::UnsupportedSet),
        },
        "DISCARD" => {
            if second == Some("ALL") {
                K::Discard
            } else {
                K::Other
            }
        }
        "EXPLAIN" => {
            if words.iter().any(|w| w.eq_ignore_ascii_case("analyze")) {
                K::Other
            } else {
                K::Read
            }
        }
        _ => K::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok<'_>> {
        Lexer::new(s).collect()
    }

    #[test]
    fn lexer_skips_strings_and_comments() {
        let s = "a 'b;c' \"d;\" $$e;$$ $t$f$$;$t$ E'\\';' -- x\n/* /* y */ */ ;";
        assert_eq!(
            toks(s),
            vec![
                Tok::Word("a"),
                Tok::Quoted,
                Tok::Quoted,
                Tok::Quoted,
                Tok::Quoted,
                Tok::Quoted,
                Tok::Comment(" x"),
                Tok::Comment(" /* y */ "),
                Tok::Semicolon(s.len() - 1),
            ]
        );
    }

    #[test]
    fn lexer_params_numbers_and_unterminated() {
        assert_eq!(
            toks("$1 1.5e3 a$b U&'x' 'open"),
            vec![
                Tok::Param,
                Tok::Number,
                Tok::Word("a$b"),
                Tok::Quoted,
                Tok::Quoted
            ]
        );
        assert_eq!(toks("/* open"), vec![Tok::Comment(" open")]);
        assert_eq!(toks("$tag$ open"), vec![Tok::Quoted]);
        assert_eq!(toks("-- x"), vec![Tok::Comment(" x")]);
        assert_eq!(toks("é;"), vec![Tok::Word("é"), Tok::Semicolon(2)]);
    }

    #[test]
    fn scan_splits_statements() {
        let s = scan("SELECT 1; ; /* c */ ; SELECT ';' ;");
        assert_eq!(s.pieces, vec![0..8, 21..33]);
        let s = scan("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END; SELECT 2");
        assert_eq!(s.pieces.len(), 1);
    }

    #[test]
    fn fast_path_cases() {
        assert_eq!(fast_path("SELECT 1"), Some(Fast::Read));
        assert_eq!(
            fast_path("SELECT abalance FROM pgbench_accounts WHERE aid = $1;"),
            Some(Fast::Read)
        );
        assert_eq!(fast_path("select a from t for update"), None);
        assert_eq!(fast_path("SELECT a INTO b FROM t"), None);
        assert_eq!(fast_path("SELECT nextval('s')"), None);
        assert_eq!(fast_path("SELECT 1 -- lagrouter:primary"), None);
        assert_eq!(fast_path("SELECT 1; SELECT 2"), None);
        assert_eq!(fast_path("SELECT $a$x$a$"), None);
        assert_eq!(fast_path("SELECTX"), None);
        assert_eq!(fast_path(" begin ; "), Some(Fast::Begin));
        assert_eq!(fast_path("COMMIT"), Some(Fast::End));
        assert_eq!(
            fast_path("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"),
            Some(Fast::Write)
        );
        assert_eq!(fast_path("INSERT INTO t VALUES (1); SET x = 1"), None);
        assert_eq!(
            fast_path("INSERT INTO t VALUES (1) /* lagrouter:token=x */"),
            None
        );
        assert_eq!(fast_path(""), None);
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut lru = Lru::new(2);
        let v = Arc::new(Classification::default());
        lru.insert("a", v.clone());
        lru.insert("b", v.clone());
        assert!(lru.get("a").is_some()); // a is now newest
        lru.insert("c", v.clone()); // evicts b
        assert!(lru.get("b").is_none());
        assert!(lru.get("a").is_some());
        assert!(lru.get("c").is_some());
        assert_eq!(lru.len(), 2);
        lru.insert("c", v.clone());
        assert_eq!(lru.len(), 2);
        for i in 0..100 {
            lru.insert(&i.to_string(), v.clone());
        }
        assert_eq!(lru.len(), 2);
        assert!(lru.get("99").is_some() && lru.get("98").is_some());
    }

    #[test]
    fn lru_capacity_one() {
        let mut lru = Lru::new(1);
        let v = Arc::new(Classification::default());
        lru.insert("a", v.clone());
        lru.insert("b", v.clone());
        assert!(lru.get("a").is_none());
        assert!(lru.get("b").is_some());
    }

    #[test]
    fn ident_list_split() {
        assert_eq!(
            split_ident_list(r#""$user", public ,"a""b""#),
            Some(vec!["$user".into(), "public".into(), "a\"b".into()])
        );
        assert_eq!(split_ident_list(""), None);
        assert_eq!(split_ident_list("a,"), None);
        assert_eq!(split_ident_list("a b"), None);
        assert_eq!(split_ident_list("'a'"), None);
        assert_eq!(split_ident_list("\"open"), None);
    }

    #[test]
    fn hints_parse() {
        let mut s = Scan {
            hint: None,
            token: None,
            pieces: vec![],
        };
        parse_hints(" lagrouter:replica lagrouter:token=v1.AbC-_9 ", &mut s);
        assert_eq!(s.hint, Some(RouteHint::Replica));
        assert_eq!(s.token.as_deref(), Some("v1.AbC-_9"));
        parse_hints("lagrouter:primary", &mut s);
        parse_hints("lagrouter:replica", &mut s);
        assert_eq!(s.hint, Some(RouteHint::Primary));
        parse_hints("lagrouter:token=", &mut s);
        parse_hints("lagrouter:primaryx lagrouter:", &mut s);
        assert_eq!(s.token.as_deref(), Some("v1.AbC-_9"));
    }
}
