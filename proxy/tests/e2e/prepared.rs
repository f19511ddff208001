//! Prepared statements as the client sees them, with every client sharing
//! one backend connection (pool size 1): `DEALLOCATE [ALL]` in both
//! protocols, `Close`, DDL that invalidates plans, pinned sessions, and the
//! proxy's own statement names.

use bytes::BytesMut;
use lagrouter_proxy::config::Policy;
use lagrouter_testing::PgCluster;
use tokio_postgres::{Client, NoTls};

use crate::support::*;

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

async fn direct(env: &Env) -> Client {
    let (c, conn) = env
        .cluster
        .config(env.cluster.primary())
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_deallocate_and_ddl() {
    let env = start_with(PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        c.routing.policy = Policy::Primary;
        c.pool.size = 1;
    })
    .await;
    let a = env.connect().await;
    a.batch_execute("CREATE TABLE prep_t(a int); INSERT INTO prep_t VALUES (1)")
        .await
        .unwrap();
    const SQL: &str = "SELECT * FROM prep_t";
    let sa = a.prepare(SQL).await.unwrap();
    assert_eq!(a.query(&sa, &[]).await.unwrap().len(), 1);

    // DEALLOCATE ALL through the extended protocol (psycopg sends it so
    // after DDL): the client's statements are gone, as directly, and
    // nobody else's.
    a.query_typed("DEALLOCATE ALL", &[]).await.unwrap();
    assert_eq!(code(&a.query(&sa, &[]).await.unwrap_err()), "26000");
    let b = env.connect().await;
    let sb = b.prepare(SQL).await.unwrap();
    assert_eq!(b.query(&sb, &[]).await.unwrap().len(), 1);
    let sa = a.prepare(SQL).await.unwrap();
    assert_eq!(a.query(&sa, &[]).await.unwrap().len(), 1);

    // DDL that changes the result type. A statement prepared before it
    // fails as it does on a direct connection; one prepared after it, by
    // any client, sees the new shape.
    let d = direct(&env).await;
    let sd = d.prepare(SQL).await.unwrap();
    a.batch_execute("ALTER TABLE prep_t ADD COLUMN b int DEFAULT 2")
        .await
        .unwrap();
    let direct_code = code(&d.query(&sd, &[]).await.unwrap_err());
    assert_eq!(direct_code, "0A000");
    assert_eq!(code(&a.query(&sa, &[]).await.unwrap_err()), direct_code);
    let c = env.connect().await;
    let sc = c.prepare(SQL).await.unwrap();
    assert_eq!(sc.columns().len(), 2);
    let row = c.query_one(&sc, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(1), 2);
    // A change that keeps the result type is re-planned transparently.
    let sc2 = c.prepare("SELECT a FROM prep_t").await.unwrap();
    c.query(&sc2, &[]).await.unwrap();
    a.batch_execute("CREATE INDEX ON prep_t(a)").await.unwrap();
    assert_eq!(c.query(&sc2, &[]).await.unwrap().len(), 1);

    // A type dropped and created again.
    a.batch_execute("CREATE TYPE prep_mood AS ENUM ('x')")
        .await
        .unwrap();
    const MOOD: &str = "SELECT 'x'::prep_mood::text";
    let s = a.prepare(MOOD).await.unwrap();
    a.query(&s, &[]).await.unwrap();
    a.batch_execute("DROP TYPE prep_mood; CREATE TYPE prep_mood AS ENUM ('x')")
        .await
        .unwrap();
    let e = env.connect().await;
    let s = e.prepare(MOOD).await.unwrap();
    assert_eq!(e.query_one(&s, &[]).await.unwrap().get::<_, &str>(0), "x");

    // DEALLOCATE of one client's statement leaves another's alone.
    let (mut r1, _) = Raw::login(env.addr(), "raw").await;
    let (mut r2, _) = Raw::login(env.addr(), "raw").await;
    for r in [&mut r1, &mut r2] {
        let mut b = BytesMut::new();
        ext::parse(&mut b, "fortytwo", "SELECT 42");
        ext::sync(&mut b);
        r.send(&b).await;
        assert_eq!(tags(&r.read_until(b'Z').await), "1Z");
    }
    assert_eq!(tags(&r1.query("DEALLOCATE fortytwo").await), "CZ");
    let run = || {
        let mut b = BytesMut::new();
        ext::bind(&mut b, "", "fortytwo", &[]);
        ext::execute(&mut b, "");
        ext::sync(&mut b);
        b
    };
    let b2 = run();
    r2.send(&b2).await;
    assert_eq!(
        first_value(&r2.read_until(b'Z').await).as_deref(),
        Some("42")
    );
    let b1 = run();
    r1.send(&b1).await;
    assert_eq!(
        sqlstate(&r1.read_until(b'Z').await).as_deref(),
        Some("26000")
    );
    assert_eq!(
        code(&a.batch_execute("DEALLOCATE nosuch").await.unwrap_err()),
        "26000"
    );

    // The proxy's own statement names are reserved.
    let r = a
        .batch_execute("PREPARE lagrouter_position_probe AS SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(code(&r), "42939");
    drop((a, b, c, d, e, r1, r2));

    // A pinned session: DEALLOCATE ALL runs on its server, dropping the
    // SQL-level statements too; its protocol-level ones prepare again.
    let p = env.connect().await;
    p.batch_execute("CREATE TEMP TABLE prep_tmp(i int); PREPARE sqlp AS SELECT 1")
        .await
        .unwrap();
    let s = p.prepare("SELECT 7").await.unwrap();
    p.query(&s, &[]).await.unwrap();
    p.batch_execute("DEALLOCATE ALL").await.unwrap();
    assert_eq!(
        code(&p.batch_execute("EXECUTE sqlp").await.unwrap_err()),
        "26000"
    );
    let s = p.prepare("SELECT 7").await.unwrap();
    assert_eq!(p.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 7);
    p.batch_execute("INSERT INTO prep_t VALUES (3)")
        .await
        .unwrap();
    let n: i64 = p
        .query_one("SELECT count(*) FROM prep_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    drop(p);
    env.stop().await;
}
