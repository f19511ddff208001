//! The public result types of classification: [`StatementKind`],
//! [`PinReason`], [`RouteHint`] and [`Classification`].

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
    /// it with [`set_statement_sql`](super::set_statement_sql). `SET x TO
    /// DEFAULT` comes out as [`StatementKind::Reset`]; `SET LOCAL x TO
    /// DEFAULT` as a local `Set` whose value is `DEFAULT` (local settings
    /// need no replay).
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
    /// Session-level advisory locks: `pg_advisory_lock*`,
    /// `pg_try_advisory_lock*` (releasing them never pins).
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

    /// Every value [`StatementKind::label`] returns.
    pub const LABELS: [&'static str; 12] = [
        "read",
        "write",
        "begin",
        "end",
        "set_transaction",
        "savepoint",
        "set",
        "reset",
        "discard",
        "pin",
        "show",
        "other",
    ];

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
    /// The raw text of the first `lagrouter:consistency=…` hint in a
    /// comment, e.g. `bounded-staleness 5s` (not validated here).
    pub consistency: Option<String>,
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

    pub(super) fn single(kind: StatementKind) -> Self {
        Classification {
            statements: vec![kind],
            hint: None,
            token: None,
            consistency: None,
        }
    }
}
