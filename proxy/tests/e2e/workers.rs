//! Sessions run on several worker threads (`proxy.workers`) and share the
//! pools: a server connection opened on one worker's event loop serves
//! sessions on the other after being moved there.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_two_workers_share_one_server_connection_per_node() {
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        c.proxy.workers = 2;
        c.pool.size = 1;
    })
    .await;
    let setup = env.connect().await;
    setup
        .batch_execute("CREATE TABLE per_worker(client int, i int)")
        .await
        .unwrap();
    let mut clients = vec![setup];
    for _ in 0..3 {
        clients.push(env.connect().await);
    }
    let workers = env.proxy.status()["workers"].clone();
    assert_eq!(
        workers,
        serde_json::json!([2, 2]),
        "new connections go to the least loaded worker"
    );

    // Every client writes and reads its own rows back, all at once: with
    // one server connection per node, each is handed from worker to worker.
    let mut tasks = Vec::new();
    for (n, c) in clients.into_iter().enumerate() {
        let n = n as i32;
        tasks.push(tokio::spawn(async move {
            for i in 1..=30 {
                c.execute("INSERT INTO per_worker VALUES ($1, $2)", &[&n, &i])
                    .await?;
                let seen: i64 = c
                    .query_one("SELECT count(*) FROM per_worker WHERE client = $1", &[&n])
                    .await?
                    .get(0);
                assert_eq!(seen, i as i64, "client {n} reads its own writes");
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no session hangs")
            .unwrap()
            .expect("every statement succeeds");
    }
    let pools = env.proxy.status()["pools"].clone();
    let pools = pools.as_array().expect("pools");
    assert_eq!(pools.len(), 2, "one pool per node: {pools:?}");
    for p in pools {
        assert_eq!(
            p["created_total"], 1,
            "the node's one connection moved between workers, never reopened: {p}"
        );
    }
    env.stop().await;
}
