//! One fault table, two drivers. The library's `Session` and the proxy both
//! drive the library's read engine, so the same fault must look the same to
//! a client of either: the same node serves the read after the same
//! fallback, or the same SQLSTATE comes back.

use std::time::Duration;

use lagrouter::{Cluster, Consistency, ConsistencyToken, Fallback, Lsn};
use lagrouter_proxy::config::Config;
use lagrouter_testing::PgCluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(30);
const REASONS: [&str; 6] = [
    "wait_timeout",
    "no_replica",
    "empty_result",
    "read_only",
    "recovery_conflict",
    "replica_error",
];

/// What a client sees.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Rows; `primary`: `pg_is_in_recovery()` said false; `fallback`: why
    /// the read left the replica it was meant for.
    Rows {
        primary: bool,
        fallback: Option<String>,
    },
    /// An error with this SQLSTATE.
    Error(String),
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The replica's backend is terminated (57P01) while the read runs.
    TerminatedMidRead,
    /// Replay is paused: a read of the session's own write finds no
    /// replica in time, and `then = error`.
    WaitTimeout,
    /// The token names a position far past the primary's (forged, or
    /// writes lost in a failover).
    TokenAhead,
}

/// The policy each fault runs under.
fn policy(fault: Fault) -> Consistency {
    match fault {
        Fault::WaitTimeout => Consistency::ReadYourWrites {
            max_wait: Duration::from_millis(50),
            then: Fallback::Error,
        },
        _ => Consistency::read_your_writes(Duration::from_millis(20)),
    }
}

fn proxy_config(base: &Config, fault: Fault) -> Config {
    let mut c = base.clone();
    if let Consistency::ReadYourWrites { max_wait, then } = policy(fault) {
        c.routing.max_wait = max_wait;
        c.routing.then = then;
    }
    c
}

const READ: &str = "SELECT pg_is_in_recovery()::text, pg_sleep(0.5)::text /* parity_marker */";

/// Terminates the replica backend running the marked read, once it runs.
async fn terminate_marked_read(pg: &PgCluster) {
    let replica = pg.connect(pg.replicas()[0]).await.unwrap();
    wait_until(DEADLINE, "the marked read runs on the replica", || async {
        replica
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE query LIKE '%parity_marker%' AND query NOT LIKE '%pg_stat_activity%'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .any(|r| r.get::<_, bool>(0))
    })
    .await;
}

async fn replica_healthy_again(env: &Env, cluster: &Cluster) {
    let r = env.cluster.replicas()[0];
    wait_until(DEADLINE, "the replica re-admitted", || async {
        cluster.topology().nodes[r].healthy && env.proxy.topology().nodes[r].healthy
    })
    .await;
}

async fn through_library(env: &Env, cluster: &Cluster, fault: Fault) -> Seen {
    let mut s = cluster.session().with_policy(policy(fault));
    let pg = &env.cluster;
    let read = async |s: &mut lagrouter::Session| match s.query_one(READ, &[]).await {
        Ok(row) => Seen::Rows {
            primary: row.get::<_, &str>(0) == "false",
            fallback: s
                .last_served()
                .and_then(|x| x.fallback)
                .map(|f| f.label().to_string()),
        },
        Err(e) => Seen::Error(e.code().unwrap_or("?").to_string()),
    };
    match fault {
        Fault::TerminatedMidRead => {
            let (seen, ()) = tokio::join!(read(&mut s), terminate_marked_read(pg));
            seen
        }
        Fault::WaitTimeout => {
            pg.pause_replay(pg.replicas()[0]).await.unwrap();
            s.execute("INSERT INTO parity VALUES (1)", &[])
                .await
                .unwrap();
            let seen = read(&mut s).await;
            pg.resume_replay(pg.replicas()[0]).await.unwrap();
            seen
        }
        Fault::TokenAhead => {
            s.execute("INSERT INTO parity VALUES (2)", &[])
                .await
                .unwrap();
            let mut s = cluster
                .session()
                .with_policy(policy(fault))
                .with_token(forged(s.token().unwrap()));
            read(&mut s).await
        }
    }
}

fn forged(t: ConsistencyToken) -> ConsistencyToken {
    ConsistencyToken::new(
        Lsn(t.lsn.0 + (1 << 30)),
        t.cluster.system_identifier,
        t.cluster.timeline,
    )
}

/// This proxy's fallbacks by reason (its own counters, as `/status` and
/// `SHOW STATS` give them: the Prometheus metrics are shared by every
/// proxy in this test process).
async fn fallbacks(env: &Env) -> Vec<f64> {
    let status = env.proxy.status();
    let rows = status["stats"].as_array().cloned().unwrap_or_default();
    REASONS
        .iter()
        .map(|r| {
            rows.iter()
                .filter_map(|row| row["fallbacks"][*r].as_u64())
                .sum::<u64>() as f64
        })
        .collect()
}

/// This proxy's reads refused with 55000, from `/status`.
fn proxy_tokens_ahead(env: &Env) -> u64 {
    env.proxy.status()["tokens_ahead"].as_u64().unwrap_or(0)
}

async fn proxy_read(c: &Client) -> Result<bool, String> {
    match c.simple_query(READ).await {
        Ok(msgs) => Ok(msgs
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("false")))),
        Err(e) => Err(e.code().map(|c| c.code().to_string()).unwrap_or_default()),
    }
}

async fn through_proxy(env: &Env, base: &Config, fault: Fault) -> Seen {
    env.proxy.reload(proxy_config(base, fault)).unwrap();
    let pg = &env.cluster;
    let c = env.connect().await;
    let before = fallbacks(env).await;
    let r = match fault {
        Fault::TerminatedMidRead => {
            let (r, ()) = tokio::join!(proxy_read(&c), terminate_marked_read(pg));
            r
        }
        Fault::WaitTimeout => {
            pg.pause_replay(pg.replicas()[0]).await.unwrap();
            c.batch_execute("INSERT INTO parity VALUES (3)")
                .await
                .unwrap();
            let r = proxy_read(&c).await;
            pg.resume_replay(pg.replicas()[0]).await.unwrap();
            r
        }
        Fault::TokenAhead => {
            c.batch_execute("INSERT INTO parity VALUES (4)")
                .await
                .unwrap();
            let token = token_of(&c).await;
            let fresh = env.connect().await;
            fresh
                .batch_execute(&format!(
                    "SET lagrouter.min_token = '{}'",
                    forged(token).encode()
                ))
                .await
                .unwrap();
            proxy_read(&fresh).await
        }
    };
    let after = fallbacks(env).await;
    env.proxy.reload(base.clone()).unwrap();
    match r {
        Ok(primary) => {
            let moved: Vec<&str> = REASONS
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| a > b)
                .map(|(r, _)| *r)
                .collect();
            assert!(moved.len() <= 1, "one read, one fallback: {moved:?}");
            Seen::Rows {
                primary,
                fallback: moved.first().map(|r| r.to_string()),
            }
        }
        Err(code) => Seen::Error(code),
    }
}

async fn token_of(c: &Client) -> ConsistencyToken {
    let msgs = c.simple_query("SHOW lagrouter.token").await.unwrap();
    let text = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap();
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_and_the_proxy_answer_a_fault_alike() {
    let env = start_with(PgCluster::builder().replicas(1), |_| {}).await;
    let base = env.proxy_config();
    let pg = &env.cluster;
    pg.connect(pg.primary())
        .await
        .unwrap()
        .batch_execute("CREATE TABLE parity (id int)")
        .await
        .unwrap();
    let mut b = Cluster::builder()
        .primary(pg.config(pg.primary()))
        .monitor_interval(Duration::from_millis(20));
    for r in pg.replicas() {
        b = b.replica(pg.config(r));
    }
    let cluster = b.build().await.unwrap();
    replica_healthy_again(&env, &cluster).await;

    let table = [
        (
            Fault::TerminatedMidRead,
            Seen::Rows {
                primary: true,
                fallback: Some("replica_error".into()),
            },
        ),
        (Fault::WaitTimeout, Seen::Error("57014".into())),
        (Fault::TokenAhead, Seen::Error("55000".into())),
    ];
    for (fault, want) in table {
        let lib = through_library(&env, &cluster, fault).await;
        replica_healthy_again(&env, &cluster).await;
        let ahead_lib = env.metric("lagrouter_tokens_ahead_total", "").await;
        let ahead_proxy = proxy_tokens_ahead(&env);
        let proxy = through_proxy(&env, &base, fault).await;
        replica_healthy_again(&env, &cluster).await;
        assert_eq!(lib, want, "{fault:?} through the library");
        assert_eq!(proxy, want, "{fault:?} through the proxy");
        // The proxy counts a token ahead once (its own counter: the
        // Prometheus one is shared by every proxy of this test process),
        // and not again under the library's name.
        let counted = u64::from(matches!(fault, Fault::TokenAhead));
        assert_eq!(proxy_tokens_ahead(&env) - ahead_proxy, counted, "{fault:?}");
        assert_eq!(
            env.metric("lagrouter_tokens_ahead_total", "").await,
            ahead_lib,
            "{fault:?}: the proxy's event counted again under the library's name"
        );
    }
    env.stop().await;
}
