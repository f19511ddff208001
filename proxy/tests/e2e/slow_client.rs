//! A client that stops reading a large result: everyone else is served,
//! the proxy buffers no more than a batch of its replies, and the client is
//! cut off after `client_write_timeout`, freeing its server connection.
//!
//! The test runs alone in a child process of the test binary
//! ([`alone_in_process`]), so the process's peak memory is the proxy's.

use std::time::Duration;

use crate::support::*;

/// Peak resident memory of this process (the proxy runs in it), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_blocks_no_one() {
    if !alone_in_process("slow_client::a_client_that_stops_reading_blocks_no_one") {
        return;
    }
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        c.proxy.client_write_timeout = Duration::from_secs(2);
        c.pool.size = 2;
    })
    .await;
    let before = peak_rss();
    // A 400 MB result that the client never reads.
    let (mut stalled, _) = Raw::login(env.addr(), "raw").await;
    let mut q = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query(
        "SELECT repeat('x', 1000) FROM generate_series(1, 400000)",
        &mut q,
    )
    .unwrap();
    stalled.send(&q).await;

    // Meanwhile everyone else is served, on every node.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = env.connect().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let n: i32 = c.query_one("SELECT $1::int + 1", &[&i]).await?.get(0);
                assert_eq!(n, i + 1);
                c.simple_query("SELECT 1").await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("other clients are served");
    }

    // The stalled client is cut off after client_write_timeout, its server
    // connection discarded, and the proxy never buffered its result.
    wait_until(Duration::from_secs(30), "the write timeout", || async {
        env.metric("lagrouter_proxy_client_timeouts_total", "reason=\"write\"")
            .await
            >= 1.0
    })
    .await;
    let grew = peak_rss().saturating_sub(before);
    assert!(
        grew < 100 * 1024 * 1024,
        "peak RSS grew by {} MiB while a client stalled on a 400 MB result",
        grew / (1024 * 1024)
    );
    assert!(stalled.closed().await);
    let proxy = &env.proxy;
    wait_until(
        Duration::from_secs(10),
        "no server connection in use",
        || async {
            proxy.status()["pools"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["in_use"] == 0))
        },
    )
    .await;
    let c = env.connect().await;
    c.simple_query("SELECT 1").await.unwrap();
    lagrouter_testing::report(format_args!(
        "stalled client: peak RSS grew {} KiB; cut off after client_write_timeout",
        grew / 1024
    ));
    env.stop().await;
}
