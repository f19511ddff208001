//! Node failures through the proxy: a replica killed under read load causes
//! no client-visible read error; with the primary killed, writes fail fast
//! with a connection-class SQLSTATE while reads keep being served.

mod e2e_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use e2e_support::*;

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
