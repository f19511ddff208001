//! Shared helpers for the library's integration tests.
#![allow(dead_code)]

pub mod counters;

use std::future::Future;
use std::time::{Duration, Instant};

use lagrouter::{Cluster, ClusterBuilder, Topology};
use lagrouter_testing::PgCluster;

/// Generous deadline for conditions that normally hold within milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "lagrouter=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts a primary with `replicas` replicas and a table `items(id int primary key, body text)`.
pub async fn start_pg(replicas: usize) -> PgCluster {
    init_tracing();
    let pg = PgCluster::start(replicas)
        .await
        .expect("start PostgreSQL cluster");
    let c = pg.connect(pg.primary()).await.expect("connect to primary");
    c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, body text NOT NULL);
         CREATE SEQUENCE item_ids;",
    )
    .await
    .expect("create schema");
    pg.wait_caught_up(DEADLINE)
        .await
        .expect("replicas catch up");
    pg
}

/// A lagrouter cluster over every node of `pg`, with a 20 ms monitor.
pub async fn cluster(pg: &PgCluster, f: impl FnOnce(ClusterBuilder) -> ClusterBuilder) -> Cluster {
    let mut b = Cluster::builder()
        .primary(pg.config(pg.primary()))
        .monitor_interval(Duration::from_millis(20));
    for r in pg.replicas() {
        b = b.named_replica(format!("replica{r}"), pg.config(r));
    }
    let cluster = f(b).build().await.expect("build cluster");
    // Wait until every node has been probed and found healthy.
    wait_topology(&cluster, |t| t.nodes.iter().all(|n| n.healthy)).await;
    cluster
}

/// Waits (with a deadline) until the topology satisfies `pred`.
pub async fn wait_topology(
    cluster: &Cluster,
    pred: impl FnMut(&Topology) -> bool,
) -> std::sync::Arc<Topology> {
    match cluster.monitor().wait_for(DEADLINE, pred).await {
        Some(t) => t,
        None => panic!("topology condition not reached: {:#?}", cluster.topology()),
    }
}

/// Waits until `f` returns true, polling with a short back-off.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Index of the lagrouter node for harness node `pg_node`
/// (lagrouter's order: primary first, then replicas in harness order).
pub fn node_index(pg: &PgCluster, pg_node: usize) -> usize {
    if pg_node == pg.primary() {
        0
    } else {
        1 + pg
            .replicas()
            .iter()
            .position(|&r| r == pg_node)
            .expect("a replica")
    }
}

/// The ids in the `items` table of `node` (the failover tests' writes).
pub async fn ids_on(pg: &PgCluster, node: usize) -> std::collections::HashSet<i32> {
    let c = pg.connect(node).await.unwrap();
    c.query("SELECT id FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}
