//! Every metric the library emits, through the [`metrics`]
//! facade: install any recorder (e.g. `metrics-exporter-prometheus`) to
//! collect them. Labels are given with each name.
//!
//! [`describe`] registers their help texts and units; the
//! [`LagMonitor`](crate::LagMonitor) calls it when it starts.

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Counter: reads served, labels `node` and `policy`
/// ([`Consistency::label`](crate::Consistency::label)).
pub const READS_TOTAL: &str = "lagrouter_reads_total";

/// Counter: writes run on the primary, label `node`.
pub const WRITES_TOTAL: &str = "lagrouter_writes_total";

/// Counter: reads not served where routing first meant to, label `reason`
/// ([`FallbackReason::label`](crate::FallbackReason::label)).
pub const FALLBACKS_TOTAL: &str = "lagrouter_fallbacks_total";

/// Counter: reads that had to check or wait for a replica to reach their
/// consistency token.
pub const TOKEN_WAITS_TOTAL: &str = "lagrouter_token_waits_total";

/// Histogram: seconds a read waited for a replica to reach its token before
/// giving up on replicas.
pub const TOKEN_WAIT_SECONDS: &str = "lagrouter_token_wait_seconds";

/// Counter: reads refused because their token is ahead of the primary
/// ([`Error::TokenAhead`](crate::Error::TokenAhead)).
pub const TOKENS_AHEAD_TOTAL: &str = "lagrouter_tokens_ahead_total";

/// Counter: nodes ejected after a failed query or a failed monitor probe.
pub const NODE_EJECTIONS_TOTAL: &str = "lagrouter_node_ejections_total";

/// Counter: changes of the node routed to as the primary (promotions).
pub const PRIMARY_CHANGES_TOTAL: &str = "lagrouter_primary_changes_total";

/// Gauge: 1 when the node serves, 0 when it is ejected, label `node`.
pub const NODE_HEALTHY: &str = "lagrouter_node_healthy";

/// Gauge: bytes of WAL a replica has yet to replay, label `node`.
pub const REPLICA_LAG_BYTES: &str = "lagrouter_replica_lag_bytes";

/// Gauge: upper bound, in seconds, on how stale a replica's data is, label
/// `node`.
pub const REPLICA_LAG_SECONDS: &str = "lagrouter_replica_lag_seconds";

/// Counter: tokens presented by HTTP clients and ignored, label `reason`
/// (see `http::TokenRejection::label`; feature `http`).
pub const HTTP_REJECTED_TOKENS_TOTAL: &str = "lagrouter_http_rejected_tokens_total";

/// Registers the help text and unit of every metric above with the
/// installed recorder, and registers the counters that have a fixed set of
/// series at zero (so that `rate()` and dashboards see them before the
/// first event). Idempotent; a recorder installed later does not see
/// earlier calls.
pub fn describe() {
    for c in [
        TOKEN_WAITS_TOTAL,
        TOKENS_AHEAD_TOTAL,
        NODE_EJECTIONS_TOTAL,
        PRIMARY_CHANGES_TOTAL,
    ] {
        ::metrics::counter!(c).increment(0);
    }
    for reason in [
        crate::routing::FallbackReason::WaitTimeout,
        crate::routing::FallbackReason::NoReplica,
        crate::routing::FallbackReason::EmptyResult,
        crate::routing::FallbackReason::ReadOnly,
        crate::routing::FallbackReason::RecoveryConflict,
        crate::routing::FallbackReason::ReplicaError,
    ] {
        ::metrics::counter!(FALLBACKS_TOTAL, "reason" => reason.label()).increment(0);
    }
    describe_counter!(
        READS_TOTAL,
        Unit::Count,
        "Reads served, by node and consistency policy."
    );
    describe_counter!(
        WRITES_TOTAL,
        Unit::Count,
        "Writes run on the primary, by node."
    );
    describe_counter!(
        FALLBACKS_TOTAL,
        Unit::Count,
        "Reads not served where routing first meant to, by reason."
    );
    describe_counter!(
        TOKEN_WAITS_TOTAL,
        Unit::Count,
        "Reads that checked or waited for a replica to reach their consistency token."
    );
    describe_histogram!(
        TOKEN_WAIT_SECONDS,
        Unit::Seconds,
        "How long token-gated reads waited for a replica before giving up on replicas."
    );
    describe_counter!(
        TOKENS_AHEAD_TOTAL,
        Unit::Count,
        "Reads refused because their token is ahead of the primary (lost writes or a forged token)."
    );
    describe_counter!(
        NODE_EJECTIONS_TOTAL,
        Unit::Count,
        "Nodes ejected after a failed query or a failed monitor probe."
    );
    describe_counter!(
        PRIMARY_CHANGES_TOTAL,
        Unit::Count,
        "Changes of the node routed to as the primary."
    );
    describe_gauge!(
        NODE_HEALTHY,
        Unit::Count,
        "1 when the node serves, 0 while it is ejected."
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
    #[cfg(feature = "http")]
    describe_counter!(
        HTTP_REJECTED_TOKENS_TOTAL,
        Unit::Count,
        "Consistency tokens from HTTP clients that were ignored, by reason."
    );
}
