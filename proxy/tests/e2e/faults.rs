//! Faults through the proxy: a replica killed under read load causes no
//! client-visible read error; with the primary killed, writes fail fast with
//! a connection-class SQLSTATE while reads keep being served; a read in
//! flight on a hung replica is retried elsewhere; connection storms, silent
//! sockets and exhausted pools get clear errors (53300, 08006), and clients
//! idle in a transaction are closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_under_read_load_is_invisible_to_clients() {
    let env = start(2).await;
    let victim = env.cluster.replicas()[0];
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = env.connect().await;
        let (stop, reads) = (stop.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.simple_query("SELECT 1").await {
                    Ok(_) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    // Let the load reach both replicas, then kill one mid-stream.
    let r = reads.clone();
    wait_until(Duration::from_secs(30), "reads flowing", || {
        let r = r.clone();
        async move { r.load(Ordering::Relaxed) >= 200 }
    })
    .await;
    env.cluster.kill_node(victim).await.unwrap();
    let proxy = &env.proxy;
    wait_until(Duration::from_secs(30), "replica ejected", || async {
        !proxy.topology().nodes[victim].healthy
    })
    .await;
    let after_kill = reads.load(Ordering::Relaxed);
    let r = reads.clone();
    wait_until(
        Duration::from_secs(30),
        "reads continue after the kill",
        || {
            let r = r.clone();
            async move { r.load(Ordering::Relaxed) >= after_kill + 200 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let errors = t.await.unwrap();
        assert!(errors.is_empty(), "client-visible read errors: {errors:?}");
    }

    // Back up and caught up: re-admitted.
    env.cluster.start_node(victim).await.unwrap();
    wait_until(Duration::from_secs(30), "replica re-admitted", || async {
        proxy.topology().nodes[victim].healthy
    })
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_writes_fail_fast_and_reads_continue() {
    let env = start(2).await;
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE f(i int); INSERT INTO f VALUES (1)")
        .await
        .unwrap();
    env.cluster
        .wait_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    env.cluster.kill_node(env.cluster.primary()).await.unwrap();

    // A write fails with a connection-class error, well before any hang.
    let fresh = env.connect().await;
    let res = tokio::time::timeout(
        Duration::from_secs(15),
        fresh.simple_query("INSERT INTO f VALUES (2)"),
    )
    .await
    .expect("the write must not hang");
    let err = res.expect_err("no primary to write to");
    let code = err.code().map(|c| c.code().to_string()).unwrap_or_default();
    assert!(
        code.starts_with("08") || code.starts_with("57P"),
        "write failed with {code:?}: {err}"
    );

    // Reads without a token are still served, by replicas.
    let reader = env.connect().await;
    for _ in 0..20 {
        let rows = reader
            .simple_query("SELECT count(*), pg_is_in_recovery() FROM f")
            .await
            .expect("reads keep working in degraded mode");
        let row = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .expect("a row");
        assert_eq!(row.get(0), Some("1"));
        assert_eq!(row.get(1), Some("t"), "served by a replica");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storms_and_exhausted_pools_get_clear_errors() {
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        c.proxy.max_client_connections = 40;
        c.proxy.client_login_timeout = Duration::from_secs(3);
        c.pool.size = 2;
        c.pool.checkout_timeout = Duration::from_millis(500);
    })
    .await;
    let raw = raw_conn_str(env.addr());
    let proxy = &env.proxy;

    // Sockets that never log in count against the limit, and are closed
    // after client_login_timeout.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(Raw::connect(env.addr()).await);
    }
    wait_until(Duration::from_secs(10), "40 connections", || async {
        proxy.status()["connections"] == 40
    })
    .await;
    let e = tokio_postgres::connect(&raw, tokio_postgres::NoTls)
        .await
        .err()
        .expect("over the connection limit");
    assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
    for s in &mut silent {
        let msgs = s.read_until(b'E').await;
        assert_eq!(sqlstate(&msgs).as_deref(), Some("08006"), "{msgs:?}");
        assert!(s.closed().await);
    }
    drop(silent);
    wait_until(Duration::from_secs(10), "silent sockets gone", || async {
        proxy.status()["connections"] == 0
    })
    .await;

    // At the client limit, one more is refused with 53300.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(connect(&raw).await);
    }
    wait_until(Duration::from_secs(10), "40 clients", || async {
        proxy.clients() == 40
    })
    .await;
    let e = tokio_postgres::connect(&raw, tokio_postgres::NoTls)
        .await
        .err()
        .expect("over the client limit");
    assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");

    // Both primary connections held by open transactions: a third writer
    // waits checkout_timeout, then gets 53300; nothing hangs.
    held[0]
        .batch_execute("CREATE TABLE storm(i int)")
        .await
        .unwrap();
    held[0]
        .batch_execute("BEGIN; INSERT INTO storm VALUES (1)")
        .await
        .unwrap();
    held[1]
        .batch_execute("BEGIN; INSERT INTO storm VALUES (2)")
        .await
        .unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        held[2].simple_query("INSERT INTO storm VALUES (3)"),
    )
    .await
    .expect("an exhausted pool must not hang the client")
    .expect_err("no server connection free");
    assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
    // Reads still go to the replica meanwhile.
    held[3].simple_query("SELECT 1").await.unwrap();
    held[0].batch_execute("COMMIT").await.unwrap();
    held[2]
        .simple_query("INSERT INTO storm VALUES (3)")
        .await
        .unwrap();
    held[1].batch_execute("COMMIT").await.unwrap();
    drop(held);
    wait_until(Duration::from_secs(10), "clients gone", || async {
        proxy.clients() == 0
    })
    .await;

    // A storm of 150 simultaneous clients, each connecting and querying:
    // each is served or refused with 53300, none hangs or sees another error.
    let mut tasks = Vec::new();
    for i in 0..150 {
        let raw = raw.clone();
        tasks.push(tokio::spawn(async move {
            let work = async {
                let (c, conn) = tokio_postgres::connect(&raw, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                c.simple_query(&format!("SELECT {i}")).await?;
                if i % 3 == 0 {
                    c.simple_query(&format!("INSERT INTO storm VALUES ({i})"))
                        .await?;
                }
                Ok::<_, tokio_postgres::Error>(())
            };
            tokio::time::timeout(Duration::from_secs(60), work)
                .await
                .expect("a storm client hung")
        }));
    }
    let (mut served, mut refused, mut other) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => served += 1,
            Err(e) if e.code().map(|c| c.code()) == Some("53300") => refused += 1,
            Err(e) => other.push(e.to_string()),
        }
    }
    assert!(other.is_empty(), "unexpected errors: {other:?}");
    assert!(served > 0, "no storm client was served");
    wait_until(Duration::from_secs(10), "storm clients gone", || async {
        proxy.clients() == 0
    })
    .await;
    let c = env.connect().await;
    c.simple_query("SELECT 1").await.unwrap();
    lagrouter_testing::report(format_args!(
        "connection storm: 150 clients, {served} served, {refused} refused with 53300"
    ));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_clients_are_closed_and_rolled_back() {
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        c.proxy.idle_transaction_timeout = Duration::from_millis(300);
        c.pool.size = 1;
    })
    .await;
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE itx(i int)").await.unwrap();
    // Idle outside a transaction: not affected.
    let idle = env.connect().await;
    let c2 = env.connect().await;
    c2.batch_execute("BEGIN; INSERT INTO itx VALUES (1)")
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), async {
        // The proxy closes the connection: the next statement fails.
        wait_until(
            Duration::from_secs(30),
            "the idle transaction closed",
            || async { c2.is_closed() },
        )
        .await;
        c2.simple_query("SELECT 1").await.unwrap_err()
    })
    .await
    .unwrap();
    assert!(e.is_closed(), "{e}");
    // The held primary connection (pool size 1) is free again and the
    // transaction was rolled back.
    let n: i64 = c
        .query_one("SELECT count(*) FROM itx", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    c.batch_execute("INSERT INTO itx VALUES (2)").await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    assert!(
        env.metric(
            "lagrouter_proxy_client_timeouts_total",
            "idle_in_transaction"
        )
        .await
            >= 1.0
    );
    env.stop().await;
}

/// A replica that hangs without closing connections: a read in flight on
/// it (nothing sent to the client yet) is retried on the primary once the
/// monitor ejects the node, and reads go on; thawed, it is re-admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_flight_on_a_hung_replica_are_retried_elsewhere() {
    let env = start(1).await;
    let replica = env.cluster.replicas()[0];
    let c = env.connect().await;
    async fn in_recovery(c: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
        c.query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
    }
    // A pooled connection to the replica exists.
    assert!(in_recovery(&c).await.unwrap(), "served by the replica");

    env.cluster.freeze_node(replica).await.unwrap();
    let frozen_at = std::time::Instant::now();
    let served_by_replica = tokio::time::timeout(Duration::from_secs(30), in_recovery(&c))
        .await
        .expect("a read on a hung replica must not hang")
        .expect("and must not fail: it is retried");
    let took = frozen_at.elapsed();
    assert!(!served_by_replica, "retried on the primary");
    let proxy = &env.proxy;
    assert!(!proxy.topology().nodes[replica].healthy);
    // Later reads avoid it.
    for _ in 0..10 {
        assert!(!in_recovery(&c).await.unwrap());
    }
    env.cluster.thaw_node(replica).await.unwrap();
    wait_until(Duration::from_secs(30), "replica re-admitted", || async {
        proxy.topology().nodes[replica].healthy
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "reads back on the replica",
        || async { in_recovery(&c).await.unwrap() },
    )
    .await;
    lagrouter_testing::report(format_args!(
        "hung replica through the proxy: the read in flight was answered by the primary {took:?} \
         after the freeze (probe timeout 2 s)"
    ));
    env.stop().await;
}
