//! Basic end-to-end behaviour through the proxy with tokio-postgres:
//! simple and extended queries, prepared statements reused across pooled
//! backends, transactions, COPY in both directions, cancel, settings.

use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::SimpleQueryMessage;

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_extended_prepared_and_transactions() {
    let env = start(1).await;
    let c = env.connect().await;
    let rows = simple_rows(&c.simple_query("SELECT 1 AS one, 'x' AS two").await.unwrap());
    assert_eq!(rows, vec![vec![Some("1".into()), Some("x".into())]]);

    c.batch_execute("CREATE TABLE t(id int primary key, v text)")
        .await
        .unwrap();
    c.execute("INSERT INTO t VALUES ($1, $2)", &[&1i32, &"a"])
        .await
        .unwrap();
    let r = c
        .query_one("SELECT v FROM t WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "a");

    // Prepared statements reused many times from several clients: the
    // calls land on different pooled backends (primary and replica), which
    // re-prepare them on demand.
    let ins = c.prepare("INSERT INTO t VALUES ($1, $2)").await.unwrap();
    let sel = c.prepare("SELECT v FROM t WHERE id = $1").await.unwrap();
    let other = env.connect().await;
    let sel2 = other
        .prepare("SELECT v FROM t WHERE id = $1")
        .await
        .unwrap();
    for i in 2..60i32 {
        c.execute(&ins, &[&i, &format!("v{i}")]).await.unwrap();
        let row = c.query_one(&sel, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("v{i}"));
        let row = other.query_opt(&sel2, &[&(i - 1)]).await.unwrap();
        // `other` has no token: it may read an older snapshot, never garbage.
        if let Some(row) = row {
            assert_eq!(
                row.get::<_, String>(0),
                if i == 2 {
                    "a".to_string()
                } else {
                    format!("v{}", i - 1)
                }
            );
        }
    }
    // Statement closed by the client, then prepared again under the same name.
    drop(sel);
    let sel = c.prepare("SELECT count(*) FROM t").await.unwrap();
    let n: i64 = c.query_one(&sel, &[]).await.unwrap().get(0);
    assert_eq!(n, 59);

    // Transactions: pinned to one backend; rollback discards.
    let mut c = c;
    {
        let tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (1000, 'tx')", &[])
            .await
            .unwrap();
        let n: i64 = tx
            .query_one("SELECT count(*) FROM t WHERE id = 1000", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        tx.rollback().await.unwrap();
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM t WHERE id = 1000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    {
        let tx = c.transaction().await.unwrap();
        tx.execute("INSERT INTO t VALUES (1001, 'tx')", &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM t WHERE id = 1001", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // Errors keep the session usable, in both protocols.
    let e = c
        .simple_query("SELECT * FROM missing_table")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42P01");
    let e = c.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012");
    let e = c.batch_execute("BEGIN; SELECT 1/0;").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012");
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        simple_rows(&c.simple_query("SELECT 2").await.unwrap()),
        vec![vec![Some("2".into())]]
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let env = start(1).await;
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE c(id int, v text)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tvalue {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 5000);
    let count: i64 = c
        .query_one("SELECT count(*) FROM c", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 5000);

    let stream = c
        .copy_out("COPY (SELECT id FROM c ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 5000);
    assert_eq!(text.lines().last(), Some("4999"));

    // A failing COPY leaves the session usable.
    let sink = c
        .copy_in::<_, bytes::Bytes>("COPY c FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22P02");
    let count: i64 = c
        .query_one("SELECT count(*) FROM c", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 5000);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_backend() {
    let env = start(1).await;
    let c = env.connect().await;
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(30)").await;
        (r, c)
    });
    // Wait until the query runs on some node.
    let probe = env.cluster.connect(0).await.unwrap();
    let replica = env.cluster.connect(1).await.unwrap();
    wait_until(Duration::from_secs(10), "pg_sleep running", || async {
        let q = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'";
        let a: i64 = probe.query_one(q, &[]).await.unwrap().get(0);
        let b: i64 = replica.query_one(q, &[]).await.unwrap().get(0);
        a + b == 1
    })
    .await;
    let started = std::time::Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, c) = sleeper.await.unwrap();
    let e = r.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57014");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Still usable afterwards.
    assert_eq!(
        simple_rows(&c.simple_query("SELECT 3").await.unwrap()),
        vec![vec![Some("3".into())]]
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_the_session_across_backends() {
    let env = start(1).await;
    let a = env.connect().await;
    let b = env.connect().await;
    a.batch_execute("SET application_name = 'client-a'")
        .await
        .unwrap();
    a.batch_execute("SET search_path TO pg_catalog, public")
        .await
        .unwrap();
    for _ in 0..20 {
        let r = a
            .query_one("SELECT current_setting('application_name')", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "client-a");
        let r = b
            .query_one("SELECT current_setting('application_name')", &[])
            .await
            .unwrap();
        assert_ne!(r.get::<_, String>(0), "client-a");
        let r = a.simple_query("SHOW search_path").await.unwrap();
        assert_eq!(
            simple_rows(&r),
            vec![vec![Some("pg_catalog, public".into())]]
        );
    }
    a.batch_execute("RESET application_name").await.unwrap();
    let r = a
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_ne!(r.get::<_, String>(0), "client-a");
    // A SET inside a transaction that does not commit is undone, as the
    // server undoes it; one that commits stays.
    let mut a = a;
    async fn work_mem(c: &tokio_postgres::Client) -> String {
        let r = c.simple_query("SHOW work_mem").await.unwrap();
        simple_rows(&r)[0][0].clone().unwrap()
    }
    let default_work_mem = work_mem(&a).await;
    a.batch_execute("BEGIN; SET work_mem = '7MB'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(
        work_mem(&a).await,
        default_work_mem,
        "simple-query ROLLBACK"
    );
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET work_mem = '8MB'").await.unwrap();
    a.batch_execute("SELECT 1/0").await.unwrap_err();
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        work_mem(&a).await,
        default_work_mem,
        "COMMIT of a failed transaction"
    );
    {
        let tx = a.transaction().await.unwrap();
        tx.execute("SET work_mem = '9MB'", &[]).await.unwrap();
        tx.rollback().await.unwrap();
    }
    assert_eq!(
        work_mem(&a).await,
        default_work_mem,
        "extended-protocol ROLLBACK"
    );
    {
        let tx = a.transaction().await.unwrap();
        tx.execute("SET work_mem = '10MB'", &[]).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(work_mem(&a).await, "10MB", "committed SET");
    a.batch_execute("BEGIN; SET work_mem = '11MB'; SAVEPOINT s")
        .await
        .unwrap();
    a.batch_execute("SELECT 1/0").await.unwrap_err();
    a.batch_execute("ROLLBACK TO SAVEPOINT s; COMMIT")
        .await
        .unwrap();
    assert_eq!(
        work_mem(&a).await,
        "11MB",
        "committed after a savepoint rollback"
    );
    for _ in 0..5 {
        assert_eq!(work_mem(&a).await, "11MB", "on every backend");
    }

    // Startup parameters apply too.
    let c = connect(&format!("{} application_name=from-startup", env.conn_str())).await;
    for _ in 0..5 {
        let r = c
            .query_one("SELECT current_setting('application_name')", &[])
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "from-startup");
    }
    env.stop().await;
}
