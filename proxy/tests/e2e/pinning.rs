//! Pinning decided by what a statement does, in both protocols and inside
//! transactions: `WITH HOLD` cursors, `LISTEN`, session advisory locks,
//! temporary tables and `set_config` pin; releasing them unpins; reads of
//! unlogged relations go to the primary.

use lagrouter_testing::PgCluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

/// Whether a read runs on a replica: `false` while the session is pinned
/// to the primary.
async fn on_replica(c: &Client) -> bool {
    let rows = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
    rows.iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("t")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_and_releasing_it_unpins() {
    let env = start_with(PgCluster::builder().replicas(1), |_| {}).await;
    let c = env.connect().await;
    assert!(on_replica(&c).await);

    // A WITH HOLD cursor declared through the extended protocol inside a
    // transaction (psycopg's server-side cursors) survives COMMIT.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(
        "DECLARE hc CURSOR WITH HOLD FOR SELECT generate_series(1, 3)",
        &[],
    )
    .await
    .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert!(!on_replica(&c).await, "pinned by the cursor");
    assert_eq!(c.query("FETCH ALL FROM hc", &[]).await.unwrap().len(), 3);
    c.batch_execute("CLOSE hc").await.unwrap();
    assert!(on_replica(&c).await, "unpinned once the cursor closed");

    // LISTEN inside a transaction; UNLISTEN * releases it.
    c.batch_execute("BEGIN; LISTEN pin_ch; COMMIT")
        .await
        .unwrap();
    assert!(!on_replica(&c).await, "pinned by LISTEN");
    c.batch_execute("UNLISTEN *").await.unwrap();
    assert!(on_replica(&c).await, "unpinned after UNLISTEN *");

    // Session advisory locks (extended protocol): pinned while one is
    // held.
    c.query("SELECT pg_advisory_lock(7)", &[]).await.unwrap();
    c.query("SELECT pg_advisory_lock(7)", &[]).await.unwrap();
    c.query("SELECT pg_advisory_unlock(7)", &[]).await.unwrap();
    assert!(!on_replica(&c).await, "one lock still held");
    c.query("SELECT pg_advisory_unlock(7)", &[]).await.unwrap();
    assert!(on_replica(&c).await, "unpinned once no lock is held");

    // Temporary tables: pinned until they are gone.
    c.batch_execute("CREATE TEMP TABLE pin_tmp(i int); INSERT INTO pin_tmp VALUES (1)")
        .await
        .unwrap();
    assert!(!on_replica(&c).await);
    c.batch_execute("DROP TABLE pin_tmp").await.unwrap();
    assert!(
        on_replica(&c).await,
        "unpinned after DROP of the temp table"
    );

    // A session setting the proxy cannot replay: pinned until RESET ALL.
    c.batch_execute("SELECT set_config('work_mem', '8MB', false)")
        .await
        .unwrap();
    c.batch_execute("UNLISTEN *").await.unwrap();
    assert!(!on_replica(&c).await, "set_config keeps the pin");
    c.batch_execute("RESET ALL").await.unwrap();
    assert!(on_replica(&c).await, "unpinned after RESET ALL");

    // asyncpg's pool reset on a pinned connection releases everything.
    c.batch_execute("LISTEN a; SELECT pg_advisory_lock(1)")
        .await
        .unwrap();
    assert!(!on_replica(&c).await);
    c.batch_execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")
        .await
        .unwrap();
    assert!(on_replica(&c).await);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_unlogged_relations_go_to_the_primary() {
    let env = start_with(PgCluster::builder().replicas(1), |_| {}).await;
    let c = env.connect().await;
    // Read once so the proxy has listed the (no) unlogged relations.
    assert!(on_replica(&c).await);
    c.batch_execute(
        "CREATE UNLOGGED TABLE pin_ul(i int); INSERT INTO pin_ul VALUES (1);
         CREATE TABLE pin_logged(i int); INSERT INTO pin_logged VALUES (1)",
    )
    .await
    .unwrap();
    replicas_caught_up(&env).await;
    let ask = |table: &'static str| {
        let c = &c;
        async move {
            let sql = format!("SELECT count(*)::int, pg_is_in_recovery() FROM {table}");
            let row = c.query_one(&sql, &[]).await.unwrap();
            (row.get::<_, i32>(0), row.get::<_, bool>(1))
        }
    };
    for _ in 0..3 {
        assert_eq!(ask("pin_ul").await, (1, false), "unlogged: the primary");
        assert_eq!(ask("pin_logged").await, (1, true), "logged: a replica");
    }
    c.batch_execute("ALTER TABLE pin_ul SET LOGGED")
        .await
        .unwrap();
    replicas_caught_up(&env).await;
    assert_eq!(ask("pin_ul").await, (1, true), "logged now: a replica");

    // Made unlogged past the proxy: the replica refuses the read, and the
    // read engine moves it to the primary before the client sees anything.
    let (direct, conn) = env
        .cluster
        .config(env.cluster.primary())
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    direct
        .batch_execute("ALTER TABLE pin_logged SET UNLOGGED")
        .await
        .unwrap();
    replicas_caught_up(&env).await;
    assert_eq!(ask("pin_logged").await, (1, false));
    env.stop().await;
}
