//! Consistency per session (`SET lagrouter.consistency`, `SET
//! lagrouter.max_wait`, `RESET`, `SHOW`) and per statement (`/*
//! lagrouter:consistency=… */`): where each read runs, checked with
//! `pg_is_in_recovery()`.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

fn value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// Where a read runs: `true` on a replica.
async fn on_replica(c: &Client, sql: &str) -> bool {
    value(&c.simple_query(sql).await.unwrap()).as_deref() == Some("t")
}

async fn show(c: &Client, name: &str) -> String {
    value(&c.simple_query(&format!("SHOW {name}")).await.unwrap()).unwrap()
}

async fn sqlstate(c: &Client, sql: &str) -> String {
    let e = c.simple_query(sql).await.unwrap_err();
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

const READ: &str = "SELECT pg_is_in_recovery()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_per_session_and_per_statement() {
    let env = start(1).await;
    let c = env.connect().await;
    // The configured default (read-your-writes) until the session sets one.
    assert_eq!(
        show(&c, "lagrouter.consistency").await,
        "read-your-writes 100ms"
    );
    assert!(on_replica(&c, READ).await);

    c.batch_execute("SET lagrouter.consistency = 'primary'")
        .await
        .unwrap();
    assert_eq!(show(&c, "lagrouter.consistency").await, "primary");
    // Survives transaction pooling: every later read, on any connection
    // the proxy gives this client.
    for _ in 0..3 {
        assert!(!on_replica(&c, READ).await, "primary policy read a replica");
    }
    // A hint overrides it for one statement.
    assert!(on_replica(&c, &format!("/* lagrouter:consistency=eventual */ {READ}")).await);
    assert!(!on_replica(&c, READ).await);

    c.batch_execute("SET lagrouter.consistency = 'eventual'")
        .await
        .unwrap();
    assert!(on_replica(&c, READ).await);
    assert!(!on_replica(&c, &format!("/* lagrouter:consistency=primary */ {READ}")).await);

    c.batch_execute("SET lagrouter.consistency = 'bounded-staleness 500ms'")
        .await
        .unwrap();
    assert_eq!(
        show(&c, "lagrouter.consistency").await,
        "bounded-staleness 500ms"
    );
    assert!(on_replica(&c, READ).await);

    c.batch_execute("SET lagrouter.consistency = 'primary-after-write 1h'")
        .await
        .unwrap();
    assert!(on_replica(&c, READ).await, "no write yet");
    c.batch_execute("CREATE TEMP TABLE IF NOT EXISTS w(i int)")
        .await
        .ok();
    let writer = env.connect().await;
    writer
        .batch_execute("SET lagrouter.consistency = 'primary-after-write 1h'")
        .await
        .unwrap();
    writer
        .batch_execute("CREATE TABLE IF NOT EXISTS sp_w(i int); INSERT INTO sp_w VALUES (1)")
        .await
        .unwrap();
    assert!(
        !on_replica(&writer, READ).await,
        "inside the window after a write"
    );

    c.batch_execute("RESET lagrouter.consistency")
        .await
        .unwrap();
    assert_eq!(
        show(&c, "lagrouter.consistency").await,
        "read-your-writes 100ms"
    );

    // max_wait changes read-your-writes' wait, and shows.
    c.batch_execute("SET lagrouter.max_wait = '50ms'")
        .await
        .unwrap();
    assert_eq!(show(&c, "lagrouter.max_wait").await, "50ms");
    assert_eq!(
        show(&c, "lagrouter.consistency").await,
        "read-your-writes 50ms"
    );
    c.batch_execute("RESET lagrouter.max_wait").await.unwrap();
    assert_eq!(show(&c, "lagrouter.max_wait").await, "100ms");

    // Malformed values: 22023, and nothing changes.
    let fresh = env.connect().await;
    for bad in [
        "SET lagrouter.consistency = 'fast'",
        "SET lagrouter.consistency = 'eventual 1s'",
        "SET lagrouter.max_wait = 'soon'",
    ] {
        assert_eq!(sqlstate(&fresh, bad).await, "22023", "{bad}");
    }
    assert_eq!(
        sqlstate(&fresh, &format!("/* lagrouter:consistency=never */ {READ}")).await,
        "22023"
    );
    assert_eq!(
        show(&fresh, "lagrouter.consistency").await,
        "read-your-writes 100ms"
    );
    // The extended protocol sees the same settings.
    fresh
        .execute("SET lagrouter.consistency = 'primary'", &[])
        .await
        .unwrap();
    let row = fresh.query_one(READ, &[]).await.unwrap();
    assert!(!row.get::<_, bool>(0));
    env.stop().await;
}

/// A user's `consistency` in the configuration is its sessions' default:
/// `RESET` returns to it, other users keep `routing.policy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_can_carry_a_default_policy() {
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        c.users.last_mut().unwrap().consistency = Some("primary".into());
    })
    .await;
    let raw = connect(&raw_conn_str(env.addr())).await;
    assert_eq!(show(&raw, "lagrouter.consistency").await, "primary");
    assert!(!on_replica(&raw, READ).await);
    raw.batch_execute("SET lagrouter.consistency = 'eventual'")
        .await
        .unwrap();
    assert!(on_replica(&raw, READ).await);
    raw.batch_execute("RESET lagrouter.consistency")
        .await
        .unwrap();
    assert!(
        !on_replica(&raw, READ).await,
        "RESET returns to the user's default"
    );
    let other = env.connect().await;
    assert!(
        on_replica(&other, READ).await,
        "other users keep routing.policy"
    );

    // A malformed default is refused when the configuration is loaded.
    let mut bad = env.proxy_config();
    bad.users.last_mut().unwrap().consistency = Some("sometimes".into());
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("consistency"), "{e}");
    env.stop().await;
}
