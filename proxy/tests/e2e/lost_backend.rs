//! A server connection dies under a client (the primary crashes): the
//! client gets an error for what was in flight but keeps its connection and
//! its token, its open transaction behaves as an aborted one until it ends
//! it, and after a failover that lost its acknowledged write its next read
//! gets 55000.

use std::time::Duration;

use lagrouter_testing::PgCluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(30);

fn first(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

async fn code(c: &Client, sql: &str) -> String {
    let e = tokio::time::timeout(DEADLINE, c.simple_query(sql))
        .await
        .unwrap_or_else(|_| panic!("{sql} hung"))
        .expect_err(sql);
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_connection_and_token_when_the_primary_dies() {
    let env = start_with(PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        c.routing.max_wait = Duration::from_millis(200);
    })
    .await;
    let pg = &env.cluster;
    let old_primary = pg.primary();
    let replica = pg.replicas()[0];
    let setup = env.connect().await;
    setup
        .batch_execute("CREATE TABLE lost_items(id int PRIMARY KEY)")
        .await
        .unwrap();
    pg.wait_caught_up(DEADLINE).await.unwrap();
    // From now on the replica receives no WAL: what is written next exists
    // only on the primary.
    pg.stop_wal_receiver(replica).await.unwrap();

    // W: an acknowledged write (lost later), then a transaction left open.
    let w = connect(&raw_conn_str(env.addr())).await;
    w.batch_execute("INSERT INTO lost_items VALUES (1)")
        .await
        .unwrap();
    let token = first(&w.simple_query("SHOW lagrouter.token").await.unwrap()).unwrap();
    w.batch_execute("BEGIN; INSERT INTO lost_items VALUES (2)")
        .await
        .unwrap();
    // M: a statement in flight on the primary when it dies.
    let m = connect(&raw_conn_str(env.addr())).await;
    let m = std::sync::Arc::new(m);
    let in_flight = tokio::spawn({
        let m = m.clone();
        async move {
            let e = m
                .simple_query("/* lagrouter:primary */ SELECT pg_sleep(60)")
                .await
                .expect_err("the sleep cannot finish");
            e.code()
                .map(|c| c.code().to_string())
                .unwrap_or_else(|| e.to_string())
        }
    });
    wait_until(DEADLINE, "the sleep to run on the primary", || async {
        let c = pg.connect(old_primary).await.unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;

    pg.kill_node(old_primary).await.unwrap();

    // The statement in flight: whether it committed is unknown (08007);
    // the connection stays.
    let m_code = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("the in-flight statement got an answer")
        .unwrap();
    assert_eq!(m_code, "08007");
    assert!(!m.is_closed(), "the client's connection was closed");
    // Its next read is served (by the replica).
    assert_eq!(
        first(&m.simple_query("SELECT pg_is_in_recovery()").await.unwrap()).as_deref(),
        Some("t")
    );

    // W's open transaction is gone: its next statement is told (08006),
    // then the transaction is aborted until it ends it.
    assert_eq!(code(&w, "INSERT INTO lost_items VALUES (3)").await, "08006");
    assert!(!w.is_closed());
    assert_eq!(code(&w, "SELECT 1").await, "25P02");
    w.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        first(&w.simple_query("SHOW lagrouter.token").await.unwrap()),
        Some(token.clone()),
        "the token survived"
    );

    // The replica is promoted without the lost write; the proxy follows.
    pg.promote(replica).await.unwrap();
    let proxy = &env.proxy;
    wait_until(DEADLINE, "the proxy to follow the promotion", || async {
        let t = proxy.topology();
        t.primary.is_some_and(|p| t.nodes[p].healthy && p != 0)
    })
    .await;
    // W's next read: its acknowledged write was lost, and it is told.
    assert_eq!(
        code(&w, "SELECT id FROM lost_items WHERE id = 1").await,
        "55000"
    );
    // The same connection writes again on the new primary, which gives it
    // a fresh token, and reads its own write.
    w.batch_execute("INSERT INTO lost_items VALUES (4)")
        .await
        .unwrap();
    assert_eq!(
        first(
            &w.simple_query("SELECT id FROM lost_items WHERE id = 4")
                .await
                .unwrap()
        )
        .as_deref(),
        Some("4")
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_transaction_ends_in_the_extended_protocol_too() {
    let env = start_with(PgCluster::builder().replicas(1), add_trust_user).await;
    let pg = &env.cluster;
    let w = connect(&raw_conn_str(env.addr())).await;
    w.batch_execute("CREATE TABLE IF NOT EXISTS ext_items(id int)")
        .await
        .unwrap();
    w.batch_execute("BEGIN").await.unwrap();
    w.execute("INSERT INTO ext_items VALUES ($1)", &[&1i32])
        .await
        .unwrap();
    // The server ends the connection under the open transaction.
    let victim: i32 = {
        let c = pg.connect(pg.primary()).await.unwrap();
        c.query_one(
            "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE 'INSERT INTO ext_items%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    pg.connect(pg.primary())
        .await
        .unwrap()
        .execute("SELECT pg_terminate_backend($1)", &[&victim])
        .await
        .unwrap();
    // Prepared statements and COMMIT through the extended protocol: the
    // first is told the connection was lost, the rest are refused until
    // the transaction ends; COMMIT then answers ROLLBACK.
    let e = w
        .execute("INSERT INTO ext_items VALUES ($1)", &[&2i32])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "08006", "{e}");
    let e = w.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "25P02", "{e}");
    let commit = w.prepare("COMMIT").await.unwrap();
    w.execute(&commit, &[]).await.unwrap();
    let n: i64 = w
        .query_one(
            "/* lagrouter:primary */ SELECT count(*) FROM ext_items",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the lost transaction did not commit");
    assert!(!w.is_closed());
    env.stop().await;
}
