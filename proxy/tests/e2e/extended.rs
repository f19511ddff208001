//! The extended protocol as drivers use it, on raw sockets: asyncpg's
//! `prepare` (Parse/Describe/Flush without Sync) followed by a write,
//! units left open with Flush on a replica, node-postgres' and psycopg's
//! unnamed statement per query, and how their statements are counted.

use bytes::BytesMut;
use lagrouter_proxy::config::Policy;
use lagrouter_testing::PgCluster;

use crate::support::*;

async fn setup(env: &Env, ddl: &str) {
    env.connect().await.batch_execute(ddl).await.unwrap();
    replicas_caught_up(env).await;
}

async fn count(env: &Env, table: &str) -> i64 {
    env.connect()
        .await
        .query_one(
            &format!("/* lagrouter:primary */ SELECT count(*) FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_unit_left_open_runs_on_the_primary() {
    let env = start_with(PgCluster::builder().replicas(1), add_trust_user).await;
    setup(
        &env,
        "CREATE TABLE ext_open(i int);
         CREATE FUNCTION ext_open_write() RETURNS int LANGUAGE sql
           AS 'INSERT INTO ext_open VALUES (100) RETURNING 1'",
    )
    .await;
    let (mut r, _) = Raw::login(env.addr(), "raw").await;

    // asyncpg's prepare(): Parse/Describe/Flush, then a simple write (and
    // a transaction of them), for the unnamed and a named statement.
    for name in ["", "s1"] {
        let mut b = BytesMut::new();
        ext::parse(&mut b, name, "SELECT pg_is_in_recovery()");
        ext::describe(&mut b, b'S', name);
        ext::flush(&mut b);
        r.send(&b).await;
        assert_eq!(tags(&r.read_until(b'T').await), "1tT");
        let m = r.query("INSERT INTO ext_open VALUES (1)").await;
        assert_eq!(sqlstate(&m), None, "{name:?}: {m:?}");
        assert!(tags(&m).starts_with('C'), "{m:?}");
        for sql in ["BEGIN", "INSERT INTO ext_open VALUES (2)", "COMMIT"] {
            let m = r.query(sql).await;
            assert_eq!(sqlstate(&m), None, "{sql}: {m:?}");
        }
        // The prepared statement still works, on a replica.
        let mut b = BytesMut::new();
        ext::bind(&mut b, "", name, &[]);
        ext::execute(&mut b, "");
        ext::sync(&mut b);
        r.send(&b).await;
        let m = r.read_until(b'Z').await;
        assert_eq!(tags(&m), "2DCZ");
    }

    // A read executed under Flush stays open on the replica; a write that
    // follows leaves it.
    let mut b = BytesMut::new();
    ext::parse(&mut b, "", "SELECT pg_is_in_recovery()");
    ext::bind(&mut b, "", "", &[]);
    ext::execute(&mut b, "");
    ext::flush(&mut b);
    r.send(&b).await;
    let m = r.read_until(b'C').await;
    assert_eq!(first_value(&m).as_deref(), Some("t"), "read on a replica");
    let m = r.query("INSERT INTO ext_open VALUES (3)").await;
    assert_eq!(sqlstate(&m), None, "{m:?}");

    // A read that turns out to write (25006 on the replica), under Flush:
    // retried on the primary before anything reaches the client.
    let mut b = BytesMut::new();
    ext::parse(&mut b, "", "SELECT ext_open_write()");
    ext::bind(&mut b, "", "", &[]);
    ext::execute(&mut b, "");
    ext::flush(&mut b);
    r.send(&b).await;
    let m = r.read_until(b'C').await;
    assert_eq!(sqlstate(&m), None, "{m:?}");
    assert_eq!(first_value(&m).as_deref(), Some("1"));
    let mut b = BytesMut::new();
    ext::sync(&mut b);
    r.send(&b).await;
    let m = r.read_until(b'Z').await;
    assert_eq!(sqlstate(&m), None, "{m:?}");
    assert_eq!(count(&env, "ext_open").await, 6);
    env.stop().await;
}

async fn queries(env: &Env, kind: &str) -> f64 {
    let kind = format!("kind=\"{kind}\"");
    env.metric_with(
        "lagrouter_proxy_queries_total",
        &["node=\"ext_unnamed_", &kind],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statements_route_like_any_other_and_count_once() {
    let env = start_with(PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        name_nodes(c, "ext_unnamed");
        c.routing.policy = Policy::Eventual;
    })
    .await;
    setup(&env, "CREATE TABLE ext_unnamed(i int)").await;
    let (mut r, _) = Raw::login(env.addr(), "raw").await;
    let writes = queries(&env, "write").await;
    let reads = queries(&env, "read").await;
    // node-postgres / psycopg: every query is Parse/Bind/Describe/Execute/
    // Sync of the unnamed statement. Each read after a write goes to a
    // replica at once, as the eventual policy says.
    for i in 0..10 {
        let v = i.to_string();
        r.send(&ext::unnamed_query(
            "INSERT INTO ext_unnamed VALUES ($1::int)",
            &[&v],
        ))
        .await;
        let m = r.read_until(b'Z').await;
        assert_eq!(sqlstate(&m), None, "{m:?}");
        r.send(&ext::unnamed_query(
            "SELECT pg_is_in_recovery() WHERE $1::int >= 0",
            &[&v],
        ))
        .await;
        let m = r.read_until(b'Z').await;
        assert_eq!(
            first_value(&m).as_deref(),
            Some("t"),
            "read {i} after a write ran on the primary"
        );
    }
    assert_eq!(count(&env, "ext_unnamed").await, 10);
    let writes = queries(&env, "write").await - writes;
    let reads = queries(&env, "read").await - reads;
    // The count(*) above is one more read.
    assert_eq!((writes, reads), (10.0, 11.0), "each statement counted once");

    // Statements inside a transaction count too, once.
    let c = env.connect().await;
    let writes0 = queries(&env, "write").await;
    let tx =
        "BEGIN; INSERT INTO ext_unnamed VALUES (0); INSERT INTO ext_unnamed VALUES (0); COMMIT";
    c.batch_execute(tx).await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO ext_unnamed VALUES ($1)", &[&1i32])
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let writes = queries(&env, "write").await - writes0;
    assert_eq!(writes, 3.0);
    env.stop().await;
}
