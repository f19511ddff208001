//! Optimistic read transactions (`routing.transactions = "optimistic"`):
//! a transaction that is not `READ ONLY` starts on a replica, moves to the
//! primary at its first write with its reads replayed and checked, and
//! gets 40001 when the replay read something else; in both protocols.

use std::time::Duration;

use lagrouter_proxy::config::Transactions;
use lagrouter_testing::PgCluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

const OFFLOADED: &str = "lagrouter_proxy_transactions_offloaded_total";
const REPLAYED: &str = "lagrouter_proxy_transactions_replayed_total";
const FAILED: &str = "lagrouter_proxy_transactions_checksum_failed_total";

/// A proxy on a primary and two replicas with table `opt(id, v)` holding
/// rows 1..=3, replayed everywhere.
async fn env(transactions: Transactions) -> Env {
    let env = start_with(PgCluster::builder().replicas(2), |c| {
        c.routing.max_wait = Duration::from_secs(2);
        c.routing.transactions = transactions;
    })
    .await;
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE opt(id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO opt SELECT i, i * 10 FROM generate_series(1, 3) i",
    )
    .await
    .unwrap();
    replicas_caught_up(&env).await;
    env
}

/// The first value of a simple query's first row.
async fn value(c: &Client, sql: &str) -> String {
    let msgs = c.simple_query(sql).await.unwrap();
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row from {sql}: {msgs:?}"))
}

/// Where the statements of a transaction run: `t` on a replica.
async fn in_recovery(c: &Client) -> String {
    value(c, "SELECT pg_is_in_recovery()").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_run_on_replicas_in_both_protocols() {
    let env = env(Transactions::Optimistic).await;
    let before = env.metric(OFFLOADED, "").await;
    let mut c = env.connect().await;
    for _ in 0..5 {
        // Simple protocol, as psycopg's default mode sends it.
        c.batch_execute("BEGIN").await.unwrap();
        assert_eq!(in_recovery(&c).await, "t");
        assert_eq!(value(&c, "SELECT v FROM opt WHERE id = 2").await, "20");
        c.batch_execute("COMMIT").await.unwrap();
        // Extended protocol: BEGIN, then Parse/Bind/Execute/Sync.
        let t = c.transaction().await.unwrap();
        let row = t
            .query_one(
                "SELECT pg_is_in_recovery(), v FROM opt WHERE id = $1",
                &[&3i32],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0), "an extended read ran on the primary");
        assert_eq!(row.get::<_, i32>(1), 30);
        t.rollback().await.unwrap();
    }
    // `BEGIN READ ONLY` stays on a replica as before; isolation levels with
    // one snapshot start on the primary.
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(in_recovery(&c).await, "t");
    c.batch_execute("COMMIT").await.unwrap();
    for begin in [
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ] {
        c.batch_execute(begin).await.unwrap();
        assert_eq!(in_recovery(&c).await, "f", "{begin}");
        c.batch_execute("COMMIT").await.unwrap();
    }
    let offloaded = env.metric(OFFLOADED, "").await - before;
    assert!(offloaded >= 10.0, "{offloaded} transactions offloaded");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_reads_then_writes_moves_to_the_primary() {
    let env = env(Transactions::Optimistic).await;
    let before = env.metric(REPLAYED, "reason=\"write\"").await;
    let mut c = env.connect().await;
    // Simple protocol.
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(value(&c, "SELECT v FROM opt WHERE id = 1").await, "10");
    assert_eq!(
        value(&c, "UPDATE opt SET v = v + 1 WHERE id = 1 RETURNING v").await,
        "11"
    );
    assert_eq!(
        in_recovery(&c).await,
        "f",
        "the write moved it to the primary"
    );
    assert_eq!(value(&c, "SELECT v FROM opt WHERE id = 1").await, "11");
    c.batch_execute("COMMIT").await.unwrap();
    // Extended protocol, named statements prepared before the transaction
    // and the unnamed statement inside it.
    let read = c.prepare("SELECT v FROM opt WHERE id = $1").await.unwrap();
    let t = c.transaction().await.unwrap();
    assert_eq!(
        t.query_one(&read, &[&2i32]).await.unwrap().get::<_, i32>(0),
        20
    );
    let n = t
        .execute("UPDATE opt SET v = v + 5 WHERE id = $1", &[&2i32])
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        t.query_one(&read, &[&2i32]).await.unwrap().get::<_, i32>(0),
        25
    );
    t.commit().await.unwrap();
    // The session reads its writes afterwards.
    assert_eq!(
        c.query_one(&read, &[&1i32]).await.unwrap().get::<_, i32>(0),
        11
    );
    assert_eq!(
        c.query_one(&read, &[&2i32]).await.unwrap().get::<_, i32>(0),
        25
    );
    // A transaction that writes first never needed a replay of reads, and
    // one that rolls back after moving leaves nothing.
    c.batch_execute("BEGIN; UPDATE opt SET v = 0 WHERE id = 3")
        .await
        .unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(value(&c, "SELECT v FROM opt WHERE id = 3").await, "30");
    let replayed = env.metric(REPLAYED, "reason=\"write\"").await - before;
    assert!(replayed >= 2.0, "{replayed} transactions replayed");
    env.stop().await;
}

/// Runs `body` in a transaction until it commits or fails with something
/// other than 40001 (as drivers and ORMs retry); returns the attempts.
async fn with_retries(c: &mut Client, id: i32) -> (usize, i32, bool) {
    for attempt in 1..=3 {
        let t = c.transaction().await.unwrap();
        let read: i32 = t
            .query_one("SELECT v FROM opt WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let r = t
            .execute("UPDATE opt SET v = $1 WHERE id = $2", &[&(read + 1), &id])
            .await;
        match r {
            Ok(_) => {
                let primary = !t
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .unwrap()
                    .get::<_, bool>(0);
                t.commit().await.unwrap();
                return (attempt, read, primary);
            }
            Err(e) => {
                assert_eq!(
                    e.code(),
                    Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE),
                    "{e}"
                );
                t.rollback().await.unwrap();
            }
        }
    }
    panic!("the transaction did not succeed in 3 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_changed_on_the_primary_gets_40001_and_the_retry_succeeds() {
    let env = env(Transactions::Optimistic).await;
    let failed_before = env.metric(FAILED, "").await;
    for r in env.cluster.replicas() {
        env.cluster.pause_replay(r).await.unwrap();
    }
    // Another client changes row 1 on the primary: the replicas keep 10.
    let direct = connect(&env.cluster.connection_string(env.cluster.primary())).await;
    direct
        .batch_execute("UPDATE opt SET v = 100 WHERE id = 1")
        .await
        .unwrap();
    // Extended protocol: the first attempt reads 10 on a replica, its
    // replay reads 100: 40001 at the UPDATE; the retry runs on the primary.
    let mut c = env.connect().await;
    let (attempts, read, primary) = with_retries(&mut c, 1).await;
    assert_eq!((attempts, read, primary), (2, 100, true));
    // Simple protocol, in a session without writes (whose reads need no
    // replica that has them): the same, and the rest of the aborted
    // transaction is refused until it ends.
    let c = env.connect().await;
    direct
        .batch_execute("UPDATE opt SET v = 200 WHERE id = 2")
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(value(&c, "SELECT v FROM opt WHERE id = 2").await, "20");
    let e = c
        .batch_execute("UPDATE opt SET v = v + 1 WHERE id = 2")
        .await
        .unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("40001"),
        "{e}"
    );
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("25P02"),
        "{e}"
    );
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(value(&c, "SELECT v FROM opt WHERE id = 2").await, "200");
    c.batch_execute("UPDATE opt SET v = v + 1 WHERE id = 2")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        value(&direct, "SELECT v FROM opt WHERE id = 2").await,
        "201"
    );
    assert_eq!(
        value(&direct, "SELECT v FROM opt WHERE id = 1").await,
        "101"
    );
    let failed = env.metric(FAILED, "").await - failed_before;
    assert!(failed >= 2.0, "{failed} checksum failures");
    for r in env.cluster.replicas() {
        env.cluster.resume_replay(r).await.unwrap();
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_functions_and_row_locks_move_the_transaction_at_that_statement() {
    let env = env(Transactions::Optimistic).await;
    let before = env.metric(REPLAYED, "reason=\"unsafe\"").await;
    let c = env.connect().await;
    for (stmt, expect) in [
        (
            "SELECT pg_is_in_recovery() FROM opt WHERE id = 1 FOR UPDATE",
            "f",
        ),
        ("SELECT pg_is_in_recovery() AND now() IS NOT NULL", "f"),
        ("SELECT pg_is_in_recovery() AND random() >= 0", "f"),
    ] {
        c.batch_execute("BEGIN").await.unwrap();
        // (Where the read ran cannot be asked here: the replay would see
        // `pg_is_in_recovery()` change, and give 40001.)
        assert_eq!(value(&c, "SELECT v FROM opt WHERE id = 1").await, "10");
        assert_eq!(value(&c, stmt).await, expect, "{stmt}");
        assert_eq!(in_recovery(&c).await, "f", "after {stmt}");
        c.batch_execute("COMMIT").await.unwrap();
    }
    let unsafe_moves = env.metric(REPLAYED, "reason=\"unsafe\"").await - before;
    assert!(unsafe_moves >= 2.0, "{unsafe_moves}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transactions_primary_every_transaction_runs_on_the_primary() {
    let env = env(Transactions::Primary).await;
    let c = env.connect().await;
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(in_recovery(&c).await, "f");
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(in_recovery(&c).await, "t");
    c.batch_execute("COMMIT").await.unwrap();
    env.stop().await;
}
