//! `[routing]`: the consistency policy for reads.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::{duration_str, parse_duration};

/// The routing policy for reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// `"read-your-writes"` (default): a read carrying a token (from
    /// `SET lagrouter.min_token`, a comment hint, or the session's own
    /// writes) goes only to a replica that has replayed up to it, waiting up
    /// to `max_wait`, then `then`. Reads without a token use any healthy
    /// replica.
    #[default]
    ReadYourWrites,
    /// `"bounded-staleness"`: a replica at most `max_lag` behind, else the
    /// primary (tokens are honoured too).
    BoundedStaleness,
    /// `"eventual"`: any healthy replica, however far behind.
    Eventual,
    /// `"primary"`: everything goes to the primary.
    Primary,
    /// `"primary-after-write"`: the primary for `primary_window` after the
    /// session's last write, replicas otherwise (a time heuristic, kept for
    /// comparison).
    PrimaryAfterWrite,
}

/// Where a transaction that is not `READ ONLY` runs
/// (`routing.transactions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transactions {
    /// `"optimistic"` (default): it starts on a replica (token-gated like
    /// any read) while it only reads; at its first write (or a statement
    /// that cannot be replayed) it moves to the primary, where its
    /// statements are replayed and their results compared with what the
    /// client received: equal, it goes on there; different, the client gets
    /// 40001 (serialization failure) and retries.
    #[default]
    Optimistic,
    /// `"primary"`: it runs on the primary from its `BEGIN`.
    Primary,
}

/// `[routing]`: how reads are routed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// One of `"read-your-writes"`, `"bounded-staleness"`, `"eventual"`,
    /// `"primary"`, `"primary-after-write"`. Default `"read-your-writes"`.
    pub policy: Policy,
    /// How long a token-gated read waits for a replica to catch up before
    /// applying `then`. Default `"100ms"`.
    #[serde(with = "duration_str")]
    pub max_wait: Duration,
    /// What a token-gated read does when no replica caught up within
    /// `max_wait`: `"primary"` (serve it there, the default) or `"error"`
    /// (fail the query).
    pub then: lagrouter::Fallback,
    /// For `bounded-staleness`: the most a replica may lag. Default `"1s"`.
    #[serde(with = "duration_str")]
    pub max_lag: Duration,
    /// For `primary-after-write`: how long after a write the session reads
    /// from the primary. Default `"2s"`.
    #[serde(with = "duration_str")]
    pub primary_window: Duration,
    /// How often replica positions and lag are polled. Default `"100ms"`.
    #[serde(with = "duration_str")]
    pub monitor_interval: Duration,
    /// How long one probe of a node (connection included) may take before
    /// the node is ejected as unreachable; it bounds how long a hung node
    /// keeps receiving reads. Default `"2s"`. Needs a restart to change.
    #[serde(with = "duration_str")]
    pub probe_timeout: Duration,
    /// Retry a read on the primary when a replica rejects it as a write
    /// (SQLSTATE 25006) or fails before returning rows. Default `true`.
    pub retry_on_replica_error: bool,
    /// Where transactions that are not `READ ONLY` run: `"optimistic"`
    /// (start on a replica, move to the primary at the first write) or
    /// `"primary"`. Default `"optimistic"`. `BEGIN READ ONLY` always runs on
    /// a replica.
    pub transactions: Transactions,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: Policy::ReadYourWrites,
            max_wait: Duration::from_millis(100),
            then: lagrouter::Fallback::Primary,
            max_lag: Duration::from_secs(1),
            primary_window: Duration::from_secs(2),
            monitor_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_secs(2),
            retry_on_replica_error: true,
            transactions: Transactions::Optimistic,
        }
    }
}

impl RoutingConfig {
    /// The policy as the routing library's [`lagrouter::Consistency`].
    pub fn consistency(&self) -> lagrouter::Consistency {
        use lagrouter::Consistency as C;
        match self.policy {
            Policy::ReadYourWrites => C::ReadYourWrites {
                max_wait: self.max_wait,
                then: self.then,
            },
            Policy::BoundedStaleness => C::BoundedStaleness(self.max_lag),
            Policy::Eventual => C::Eventual,
            Policy::Primary => C::Primary,
            Policy::PrimaryAfterWrite => C::PrimaryAfterWrite(self.primary_window),
        }
    }
}

/// Parses a policy as a client names it in `SET lagrouter.consistency` or a
/// `/* lagrouter:consistency=… */` hint: `read-your-writes`, `eventual`,
/// `primary`, `bounded-staleness`, `primary-after-write`, optionally
/// followed by a duration: the lag bound of `bounded-staleness`, the window
/// of `primary-after-write`, the wait of `read-your-writes`. What is not
/// given comes from `routing`.
pub fn parse_consistency(
    text: &str,
    routing: &RoutingConfig,
) -> Result<lagrouter::Consistency, String> {
    use lagrouter::Consistency as C;
    let mut words = text.split_whitespace();
    let name = words.next().unwrap_or("").to_ascii_lowercase();
    let duration = match (words.next(), words.next()) {
        (None, _) => None,
        (Some(d), None) => Some(parse_duration(d)?),
        (Some(_), Some(_)) => return Err(format!("too many words in {text:?}")),
    };
    let policy = match name.as_str() {
        "read-your-writes" => C::ReadYourWrites {
            max_wait: duration.unwrap_or(routing.max_wait),
            then: routing.then,
        },
        "bounded-staleness" => C::BoundedStaleness(duration.unwrap_or(routing.max_lag)),
        "primary-after-write" => C::PrimaryAfterWrite(duration.unwrap_or(routing.primary_window)),
        "eventual" | "primary" if duration.is_some() => {
            return Err(format!("{name} takes no duration"));
        }
        "eventual" => C::Eventual,
        "primary" => C::Primary,
        _ => {
            return Err(format!(
                "unknown consistency {text:?}: expected read-your-writes, bounded-staleness, \
                 eventual, primary or primary-after-write, optionally with a duration"
            ));
        }
    };
    Ok(policy)
}

/// How [`parse_consistency`] would read `policy` back (for `SHOW`).
pub fn format_consistency(policy: &lagrouter::Consistency) -> String {
    use super::duration::format_duration;
    use lagrouter::Consistency as C;
    match policy {
        C::ReadYourWrites { max_wait, .. } => {
            format!("read-your-writes {}", format_duration(*max_wait))
        }
        C::BoundedStaleness(d) => format!("bounded-staleness {}", format_duration(*d)),
        C::PrimaryAfterWrite(d) => format!("primary-after-write {}", format_duration(*d)),
        C::Eventual => "eventual".into(),
        C::Primary => "primary".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lagrouter::Consistency as C;

    #[test]
    fn client_policies_parse_and_print_back() {
        let r = RoutingConfig::default();
        let table: &[(&str, C)] = &[
            ("eventual", C::Eventual),
            ("PRIMARY", C::Primary),
            ("read-your-writes", r.consistency()),
            (
                "read-your-writes 50ms",
                C::ReadYourWrites {
                    max_wait: Duration::from_millis(50),
                    then: r.then,
                },
            ),
            (
                "bounded-staleness 500ms",
                C::BoundedStaleness(Duration::from_millis(500)),
            ),
            ("bounded-staleness", C::BoundedStaleness(r.max_lag)),
            (
                "primary-after-write 2s",
                C::PrimaryAfterWrite(Duration::from_secs(2)),
            ),
        ];
        for (text, want) in table {
            let got = parse_consistency(text, &r).unwrap();
            assert_eq!(&got, want, "{text}");
            assert_eq!(
                parse_consistency(&format_consistency(&got), &r).unwrap(),
                got
            );
        }
        for bad in [
            "",
            "fast",
            "eventual 1s",
            "bounded-staleness soon",
            "primary-after-write 1s 2s",
        ] {
            assert!(parse_consistency(bad, &r).is_err(), "{bad:?}");
        }
    }
}
