//! Read-your-writes, monotonic reads and cross-connection tokens through
//! the proxy, with and without replication delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use lagrouter::{ConsistencyToken, Lsn};
use lagrouter_testing::PgCluster;
use tokio_postgres::SimpleQueryMessage;

fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_string()),
        _ => None,
    })
}

/// Writers insert a row and read it back on the same connection at once;
/// reader-only clients run meanwhile. Returns (violations, reader queries
/// served by replicas, reader queries).
async fn ryw_round(env: &Env, table: &str, pairs: i32, writers: i32) -> (usize, usize, usize) {
    let violations = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let c = env.connect().await;
        let table = table.to_string();
        let violations = violations.clone();
        tasks.push(tokio::spawn(async move {
            let ins = c
                .prepare(&format!("INSERT INTO {table}(id, writer) VALUES ($1, $2)"))
                .await
                .unwrap();
            let sel = c
                .prepare(&format!("SELECT id FROM {table} WHERE id = $1"))
                .await
                .unwrap();
            for i in 0..pairs {
                let id = w * 1_000_000 + i;
                if i % 2 == 0 {
                    // Extended protocol (prepared statements).
                    c.execute(&ins, &[&id, &w]).await.unwrap();
                    if c.query_opt(&sel, &[&id]).await.unwrap().is_none() {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    // Simple protocol.
                    c.batch_execute(&format!(
                        "INSERT INTO {table}(id, writer) VALUES ({id}, {w})"
                    ))
                    .await
                    .unwrap();
                    let rows = c
                        .simple_query(&format!("SELECT id FROM {table} WHERE id = {id}"))
                        .await
                        .unwrap();
                    if first_value(&rows).is_none() {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let replica_reads = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let c = env.connect().await;
        let (replica_reads, reads, done) = (replica_reads.clone(), reads.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let r = c
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                if r.get::<_, bool>(0) {
                    replica_reads.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    (
        violations.load(Ordering::Relaxed),
        replica_reads.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_has_no_violations() {
    let env = start(2).await;
    let setup = env.connect().await;
    setup
        .batch_execute(
            "CREATE TABLE ryw0(id int primary key, writer int); CREATE TABLE ryw50(id int primary key, writer int)",
        )
        .await
        .unwrap();

    // No replication delay.
    let (violations, replica_reads, reads) = ryw_round(&env, "ryw0", 200, 3).await;
    assert_eq!(violations, 0, "read-your-writes violations without delay");
    assert!(reads > 0);
    assert!(
        replica_reads * 10 >= reads * 9,
        "reader-only clients should be served by replicas: {replica_reads}/{reads}"
    );

    // 50 ms apply delay on every replica.
    for r in env.cluster.replicas() {
        env.cluster
            .set_apply_delay(r, Duration::from_millis(50))
            .await
            .unwrap();
    }
    let (violations, replica_reads, reads) = ryw_round(&env, "ryw50", 200, 3).await;
    assert_eq!(
        violations, 0,
        "read-your-writes violations with 50 ms apply delay"
    );
    assert!(
        replica_reads * 10 >= reads * 9,
        "reader-only clients should be served by replicas: {replica_reads}/{reads}"
    );
    let (status, body) = http_get(env.proxy.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("lagrouter_proxy_queries_total"), "{body}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_carry_writes_across_connections() {
    let env = start(1).await;
    let replica = env.cluster.replicas()[0];
    let a = env.connect().await;
    let b = env.connect().await;
    a.batch_execute("CREATE TABLE notes(id int primary key, body text)")
        .await
        .unwrap();
    env.cluster
        .wait_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    // A large delay: without the token, B would read from the replica and
    // miss A's write.
    env.cluster
        .set_apply_delay(replica, Duration::from_millis(400))
        .await
        .unwrap();

    for (i, how) in ["set", "comment", "extended"].into_iter().enumerate() {
        let id = i as i32;
        a.execute("INSERT INTO notes VALUES ($1, 'hello')", &[&id])
            .await
            .unwrap();
        let token = first_value(&a.simple_query("SHOW lagrouter.token").await.unwrap()).unwrap();
        assert!(token.starts_with("v1."), "{token}");
        let sql = format!("SELECT body FROM notes WHERE id = {id}");
        let rows = match how {
            "set" => {
                b.batch_execute(&format!("SET lagrouter.min_token = '{token}'"))
                    .await
                    .unwrap();
                b.simple_query(&sql).await.unwrap()
            }
            "comment" => b
                .simple_query(&format!("/* lagrouter:token={token} */ {sql}"))
                .await
                .unwrap(),
            _ => {
                b.execute(&format!("SET lagrouter.min_token = '{token}'"), &[])
                    .await
                    .unwrap();
                let r = b
                    .query_opt("SELECT body FROM notes WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                assert_eq!(
                    r.map(|r| r.get::<_, String>(0)).as_deref(),
                    Some("hello"),
                    "{how}"
                );
                continue;
            }
        };
        assert_eq!(first_value(&rows).as_deref(), Some("hello"), "{how}");
        // B's own token now covers the write.
        let tb = first_value(&b.simple_query("SHOW lagrouter.token").await.unwrap()).unwrap();
        let (ta, tb) = (
            ConsistencyToken::decode(&token).unwrap(),
            ConsistencyToken::decode(&tb).unwrap(),
        );
        assert!(tb.lsn >= ta.lsn);
    }

    // Garbage and foreign tokens are rejected with 22023; the session stays usable.
    for bad in ["garbage", "v1.AAAA", "v9.xyz", &"x".repeat(5000)] {
        let e = b
            .batch_execute(&format!("SET lagrouter.min_token = '{bad}'"))
            .await
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "22023", "{bad}");
        let e = b
            .simple_query(&format!(
                "/* lagrouter:token={} */ SELECT 1",
                &bad[..bad.len().min(60)]
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "22023", "{bad}");
    }
    let foreign = ConsistencyToken::new(Lsn(0x1_0000_0000), 42, 1).encode();
    let e = b
        .batch_execute(&format!("SET lagrouter.min_token = '{foreign}'"))
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22023");
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("another cluster"),
        "{e}"
    );
    let e = b
        .execute("SET lagrouter.min_token = 'nonsense'", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22023");
    let e = b
        .batch_execute("SET lagrouter.unknown = 'x'")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42704");
    assert_eq!(
        first_value(&b.simple_query("SELECT 7").await.unwrap()).as_deref(),
        Some("7")
    );
    env.cluster
        .set_apply_delay(replica, Duration::ZERO)
        .await
        .unwrap();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_pins_and_replica_retries() {
    let env = start(1).await;
    let c = env.connect().await;
    let on_replica = |rows: Vec<SimpleQueryMessage>| first_value(&rows).as_deref() == Some("t");
    // A fresh session has no token: plain reads go to the replica.
    assert!(on_replica(
        c.simple_query("SELECT pg_is_in_recovery()").await.unwrap()
    ));
    assert!(!on_replica(
        c.simple_query("/* lagrouter:primary */ SELECT pg_is_in_recovery()")
            .await
            .unwrap()
    ));
    c.batch_execute("CREATE TABLE h(id int)").await.unwrap();
    // A write forced to a replica fails there with 25006 and is retried on
    // the primary before anything reaches the client.
    c.batch_execute("/* lagrouter:replica */ INSERT INTO h VALUES (1)")
        .await
        .unwrap();
    let n = first_value(&c.simple_query("SELECT count(*) FROM h").await.unwrap());
    assert_eq!(n.as_deref(), Some("1"));
    // Read-only transactions may use a replica; others start on one too
    // while they only read (`routing.transactions = "optimistic"`).
    let mut c = c;
    let tx = c.build_transaction().read_only(true).start().await.unwrap();
    let r: bool = tx
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(r);
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    let r: bool = tx
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(r, "a transaction that only reads starts on a replica");
    tx.commit().await.unwrap();

    // Temporary tables pin the session to one primary backend.
    let t = env.connect().await;
    t.batch_execute("CREATE TEMP TABLE scratch(x int)")
        .await
        .unwrap();
    for i in 0..20 {
        t.execute("INSERT INTO scratch VALUES ($1)", &[&i])
            .await
            .unwrap();
        let n: i64 = t
            .query_one("SELECT count(*) FROM scratch", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, i64::from(i) + 1);
    }

    // LISTEN pins too, and notifications are delivered.
    let (listener, mut conn) = tokio_postgres::connect(&env.conn_str(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx_n, mut rx_n) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx_n.send(n.payload().to_string());
            }
        }
    });
    listener.batch_execute("LISTEN events").await.unwrap();
    let notifier = env.connect().await;
    notifier
        .batch_execute("NOTIFY events, 'ping'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx_n.recv())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("ping"));
    // Also while the listener is idle in between statements.
    notifier
        .batch_execute("NOTIFY events, 'pong'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx_n.recv())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("pong"));
    env.stop().await;
}

/// A token is labelled with the timeline the node reports in the probe's
/// reply, never with the monitor's view: right after a promotion the
/// monitor still shows timeline 1, but a read served by the promoted node
/// is on timeline 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_carry_the_timeline_the_node_reports() {
    let env = start_with(PgCluster::builder().replicas(1), |c| {
        // The monitor probes once at start, then not again during the test.
        c.routing.monitor_interval = Duration::from_secs(3600);
    })
    .await;
    let replica = env.cluster.replicas()[0];
    env.cluster.promote(replica).await.unwrap();
    let topo = env.proxy.topology();
    assert_eq!(topo.cluster.map(|c| c.timeline), Some(1));
    assert_eq!(topo.nodes[replica].role, lagrouter::Role::Replica);

    let c = env.connect().await;
    // No token yet: the read goes to the node the proxy believes is a
    // replica, and the probe after it captures that node's position.
    let msgs = c.simple_query("SELECT pg_is_in_recovery()").await.unwrap();
    assert_eq!(
        first_value(&msgs).as_deref(),
        Some("f"),
        "served by the promoted node"
    );
    let text = first_value(&c.simple_query("SHOW lagrouter.token").await.unwrap()).unwrap();
    let token: ConsistencyToken = text.parse().unwrap();
    assert_eq!(token.cluster.timeline, 2, "{token:?}");
    assert_eq!(
        env.proxy.topology().cluster.map(|c| c.timeline),
        Some(1),
        "the monitor had not noticed the promotion yet"
    );
    env.stop().await;
}

/// A table created while the replica does not replay is missing there:
/// the creator's reads wait for the replica, then fall back to the
/// primary, in both protocols; the replica's 42P01 never reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_lagging_replica_lacks_is_read_from_the_primary() {
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        c.routing.max_wait = std::time::Duration::from_millis(50);
    })
    .await;
    let replica = env.cluster.replicas()[0];
    env.cluster.pause_replay(replica).await.unwrap();
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE created_late(i int); INSERT INTO created_late VALUES (7)")
        .await
        .unwrap();
    let rows = c.simple_query("SELECT i FROM created_late").await.unwrap();
    assert!(
        rows.iter().any(
            |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("7"))
        ),
        "{rows:?}"
    );
    let row = c
        .query_one("SELECT i FROM created_late WHERE i = $1", &[&7i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    env.cluster.resume_replay(replica).await.unwrap();
    env.stop().await;
}
