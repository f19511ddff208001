//! Every metric the proxy emits (through the [`metrics`] facade, rendered
//! by the admin endpoint's `/metrics`), with its labels, and their
//! descriptions. The routing library records its own metrics besides.
#![warn(missing_docs)]

use metrics::Unit;

/// Counter: queries (statements sent to a backend), by `node` and `kind`
/// (`read`, `write`, … — see `StatementKind::label`).
pub const QUERIES_TOTAL: &str = "lagrouter_proxy_queries_total";
/// Counter: reads that could not be served as the policy wanted, by
/// `reason` (e.g. `token_timeout`, `no_healthy_replica`, `replica_error`).
pub const FALLBACKS_TOTAL: &str = "lagrouter_proxy_fallbacks_total";
/// Counter: reads that had to wait for a replica to reach their token.
pub const TOKEN_WAITS_TOTAL: &str = "lagrouter_proxy_token_waits_total";
/// Histogram: how long token-gated reads waited for a replica, in seconds.
pub const TOKEN_WAIT_SECONDS: &str = "lagrouter_proxy_token_wait_seconds";
/// Counter: reads refused with SQLSTATE 55000 because the session's token
/// is ahead of the primary: forged, or writes lost in a failover.
pub const TOKENS_AHEAD_TOTAL: &str = "lagrouter_proxy_tokens_ahead_total";
/// Counter: client sessions closed by a timeout, by `reason`
/// (`idle`, `idle_in_transaction`, `write`).
pub const CLIENT_TIMEOUTS_TOTAL: &str = "lagrouter_proxy_client_timeouts_total";
/// Gauge: client connections currently open.
pub const CLIENTS: &str = "lagrouter_proxy_clients";
/// Counter: client connections accepted since start.
pub const CLIENT_CONNECTIONS_TOTAL: &str = "lagrouter_proxy_client_connections_total";
/// Counter: failed client authentications.
pub const AUTH_FAILURES_TOTAL: &str = "lagrouter_proxy_auth_failures_total";
/// Counter: client connections closed for protocol violations.
pub const PROTOCOL_ERRORS_TOTAL: &str = "lagrouter_proxy_protocol_errors_total";
/// Gauge: backend connections, by `node` and `state` (`idle`, `active`).
pub const POOL_CONNECTIONS: &str = "lagrouter_proxy_pool_connections";
/// Counter: units of work routed, by `target` (`primary`, `primary_read`,
/// `replica`, `replica_checked`) and `node`.
pub const ROUTED_TOTAL: &str = "lagrouter_proxy_routed_total";
/// Counter: consistency tokens accepted from clients.
pub const TOKENS_ACCEPTED_TOTAL: &str = "lagrouter_proxy_tokens_accepted_total";
/// Counter: sessions pinned to the primary by session-bound state.
pub const PINNED_SESSIONS_TOTAL: &str = "lagrouter_proxy_pinned_sessions_total";
/// Counter: connections opened to servers (by the pools).
pub const SERVER_CONNECTIONS_OPENED_TOTAL: &str = "lagrouter_proxy_server_connections_opened_total";
/// Gauge: bytes of WAL each replica has yet to replay, by `node`.
pub const REPLICA_LAG_BYTES: &str = "lagrouter_proxy_replica_lag_bytes";
/// Gauge: how stale each replica's data is, in seconds, by `node`.
pub const REPLICA_LAG_SECONDS: &str = "lagrouter_proxy_replica_lag_seconds";
/// Counter: transactions that were not `READ ONLY` and ran on a replica
/// to their end (`routing.transactions = "optimistic"`).
pub const TRANSACTIONS_OFFLOADED_TOTAL: &str = "lagrouter_proxy_transactions_offloaded_total";
/// Counter: optimistic transactions moved from a replica to the primary,
/// their statements replayed there with the same results, by `reason`
/// (`write`, `unsafe`, `limit`).
pub const TRANSACTIONS_REPLAYED_TOTAL: &str = "lagrouter_proxy_transactions_replayed_total";
/// Counter: optimistic transactions whose replay on the primary gave
/// different results (or failed): the client got 40001.
pub const TRANSACTIONS_CHECKSUM_FAILED_TOTAL: &str =
    "lagrouter_proxy_transactions_checksum_failed_total";

/// Label: the node's configured name.
pub const LABEL_NODE: &str = "node";
/// Label: the statement kind.
pub const LABEL_KIND: &str = "kind";
/// Label: a fallback reason.
pub const LABEL_REASON: &str = "reason";
/// Label: where a unit of work was routed ([`ROUTED_TOTAL`]).
pub const LABEL_TARGET: &str = "target";
/// `target` of a read sent to the primary.
pub const TARGET_PRIMARY_READ: &str = "primary_read";
/// `target` of anything else sent to the primary.
pub const TARGET_PRIMARY: &str = "primary";
/// `target` of a read sent to a replica known to be fresh enough.
pub const TARGET_REPLICA: &str = "replica";
/// `target` of a read sent to a replica with a freshness check before it.
pub const TARGET_REPLICA_CHECKED: &str = "replica_checked";
/// Label: a pooled connection's state.
pub const LABEL_STATE: &str = "state";

/// The `reason` values of [`TRANSACTIONS_REPLAYED_TOTAL`]: the first
/// write, a statement that cannot be replayed identically (volatile
/// functions, COPY, session settings, …), or the recording limit.
pub const REPLAY_REASONS: [&str; 3] = ["write", "unsafe", "limit"];

/// Buckets (seconds) of the [`TOKEN_WAIT_SECONDS`] histogram.
pub const TOKEN_WAIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Registers descriptions (help text and units) for the proxy's and the
/// routing library's metrics, and the counters with a fixed set of series
/// at zero. Idempotent; call it after
/// [`crate::server::admin::install_metrics_recorder`].
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    // The routing library's metrics (its monitor may have described them
    // before the recorder was installed).
    lagrouter::metrics::describe();
    // Counters with a fixed set of series start at zero.
    for c in [
        TOKEN_WAITS_TOTAL,
        TOKENS_AHEAD_TOTAL,
        CLIENT_CONNECTIONS_TOTAL,
        AUTH_FAILURES_TOTAL,
        PROTOCOL_ERRORS_TOTAL,
        TOKENS_ACCEPTED_TOTAL,
        PINNED_SESSIONS_TOTAL,
        SERVER_CONNECTIONS_OPENED_TOTAL,
        TRANSACTIONS_OFFLOADED_TOTAL,
        TRANSACTIONS_CHECKSUM_FAILED_TOTAL,
    ] {
        metrics::counter!(c).increment(0);
    }
    for reason in crate::stats::FALLBACK_REASONS {
        metrics::counter!(FALLBACKS_TOTAL, LABEL_REASON => reason.label()).increment(0);
    }
    for reason in REPLAY_REASONS {
        metrics::counter!(TRANSACTIONS_REPLAYED_TOTAL, LABEL_REASON => reason).increment(0);
    }
    for reason in ["idle", "idle_in_transaction", "write"] {
        metrics::counter!(CLIENT_TIMEOUTS_TOTAL, LABEL_REASON => reason).increment(0);
    }
    describe_counter!(
        QUERIES_TOTAL,
        Unit::Count,
        "Queries sent to a backend, by node and statement kind."
    );
    describe_counter!(
        FALLBACKS_TOTAL,
        Unit::Count,
        "Reads not served as the routing policy wanted, by reason."
    );
    describe_counter!(
        TOKEN_WAITS_TOTAL,
        Unit::Count,
        "Reads that waited for a replica to replay up to their consistency token."
    );
    describe_histogram!(
        TOKEN_WAIT_SECONDS,
        Unit::Seconds,
        "How long token-gated reads waited for a replica."
    );
    describe_gauge!(CLIENTS, Unit::Count, "Client connections currently open.");
    describe_counter!(
        TOKENS_AHEAD_TOTAL,
        Unit::Count,
        "Reads refused because the session token is ahead of the primary (lost writes or a forged token)."
    );
    describe_counter!(
        CLIENT_TIMEOUTS_TOTAL,
        Unit::Count,
        "Client sessions closed by a timeout, by reason."
    );
    describe_counter!(
        CLIENT_CONNECTIONS_TOTAL,
        Unit::Count,
        "Client connections accepted."
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        Unit::Count,
        "Failed client authentications."
    );
    describe_counter!(
        PROTOCOL_ERRORS_TOTAL,
        Unit::Count,
        "Client connections closed for protocol violations."
    );
    describe_gauge!(
        POOL_CONNECTIONS,
        Unit::Count,
        "Backend connections, by node and state (idle, active)."
    );
    describe_counter!(
        TRANSACTIONS_OFFLOADED_TOTAL,
        Unit::Count,
        "Transactions (not READ ONLY) that ran on a replica to their end."
    );
    describe_counter!(
        TRANSACTIONS_REPLAYED_TOTAL,
        Unit::Count,
        "Transactions moved from a replica to the primary with the same results on replay, by reason."
    );
    describe_counter!(
        TRANSACTIONS_CHECKSUM_FAILED_TOTAL,
        Unit::Count,
        "Transactions whose replay on the primary gave different results: the client got 40001."
    );
    describe_gauge!(
        REPLICA_LAG_BYTES,
        Unit::Bytes,
        "Bytes of WAL each replica has yet to replay."
    );
    describe_gauge!(
        REPLICA_LAG_SECONDS,
        Unit::Seconds,
        "Upper bound on how stale each replica's data is."
    );
}

/// The per-unit counters ([`ROUTED_TOTAL`] by target, [`QUERIES_TOTAL`] by
/// statement kind) of every node, registered once: the query path only
/// increments them, with no label building or registry lookup.
pub struct RouteCounters {
    nodes: Vec<NodeCounters>,
}

struct NodeCounters {
    routed: [metrics::Counter; 4],
    queries: Vec<(&'static str, metrics::Counter)>,
}

/// The `target` labels of [`ROUTED_TOTAL`].
const TARGETS: [&str; 4] = [
    TARGET_PRIMARY,
    TARGET_PRIMARY_READ,
    TARGET_REPLICA,
    TARGET_REPLICA_CHECKED,
];

impl RouteCounters {
    /// Registers the counters of nodes named `names` (call once the
    /// recorder is installed).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let nodes = names
            .into_iter()
            .map(|name| NodeCounters {
                routed: TARGETS.map(|t| {
                    metrics::counter!(ROUTED_TOTAL, LABEL_TARGET => t, LABEL_NODE => name.to_string())
                }),
                queries: crate::classify::StatementKind::LABELS
                    .iter()
                    .map(|&k| {
                        let c = metrics::counter!(QUERIES_TOTAL, LABEL_NODE => name.to_string(), LABEL_KIND => k);
                        (k, c)
                    })
                    .collect(),
            })
            .collect();
        RouteCounters { nodes }
    }

    /// Counts a unit routed to `node` as `target` (one of the `TARGET_*`
    /// labels).
    pub fn routed(&self, node: usize, target: &'static str) {
        if let Some(n) = self.nodes.get(node) {
            if let Some(i) = TARGETS.iter().position(|t| *t == target) {
                n.routed[i].increment(1);
            }
        }
    }

    /// Counts a statement of kind `kind` (a `StatementKind` label) sent to
    /// `node`.
    pub fn query(&self, node: usize, kind: &'static str) {
        if let Some(n) = self.nodes.get(node) {
            if let Some((_, c)) = n.queries.iter().find(|(k, _)| *k == kind) {
                c.increment(1);
            }
        }
    }
}
