//! Routing behaviour on a real primary + 2 replicas.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{DEADLINE, cluster, eventually, node_index, start_pg, wait_topology};
use lagrouter::{
    Consistency, ConsistencyToken, Error, Fallback, FallbackReason, LoadBalance, Lsn, Role,
    TokenError,
};

const RYW: Consistency = Consistency::read_your_writes(Duration::from_millis(100));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_gated_read_waits_for_paused_replica_then_is_served_there() {
    let pg = start_pg(2).await;
    let (r1, r2) = (pg.replicas()[0], pg.replicas()[1]);
    let cluster = cluster(&pg, |b| {
        b.policy(Consistency::ReadYourWrites {
            max_wait: Duration::from_secs(60),
            then: Fallback::Error,
        })
    })
    .await;
    pg.pause_replay(r1).await.unwrap();
    pg.pause_replay(r2).await.unwrap();

    let mut session = cluster.session();
    session
        .execute("INSERT INTO items VALUES (1, 'one')", &[])
        .await
        .unwrap();
    let token = session.token().expect("a write yields a token");

    let reader = tokio::spawn(async move {
        let row = session
            .query_opt("SELECT body FROM items WHERE id = 1", &[])
            .await;
        (row, session)
    });
    // While both replicas are paused the read cannot be served: let the
    // monitor publish a few rounds (~60 ms) and check it is still waiting.
    let gen0 = cluster.topology().generation;
    wait_topology(&cluster, |t| t.generation >= gen0 + 3).await;
    assert!(
        !reader.is_finished(),
        "read finished while no replica had the write"
    );

    pg.resume_replay(r1).await.unwrap();
    let (row, session) = reader.await.unwrap();
    let row = row.expect("read succeeds").expect("the write is visible");
    assert_eq!(row.get::<_, &str>(0), "one");
    let served = session.last_served().unwrap();
    assert_eq!(served.role, Role::Replica);
    assert_eq!(served.node, node_index(&pg, r1));
    assert!(served.waited > Duration::ZERO);
    assert_eq!(served.fallback, None);
    assert!(session.token().unwrap().lsn >= token.lsn);
    pg.resume_replay(r2).await.unwrap();
}

/// A table created after the replicas stopped replaying does not exist
/// there yet: the read carrying the creator's token must not fail with the
/// replica's "relation does not exist" (42P01); the check decides, and the
/// read waits, then falls back to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_lagging_replica_lacks_is_read_from_the_primary() {
    let pg = start_pg(1).await;
    let cluster = cluster(&pg, |b| b).await;
    for r in pg.replicas() {
        pg.pause_replay(r).await.unwrap();
    }
    let mut session = cluster
        .session()
        .with_policy(Consistency::read_your_writes(Duration::from_millis(50)));
    session
        .execute("CREATE TABLE created_late(i int)", &[])
        .await
        .unwrap();
    session
        .execute("INSERT INTO created_late VALUES (7)", &[])
        .await
        .unwrap();
    let row = session
        .query_one("SELECT i FROM created_late", &[])
        .await
        .expect("served despite the replica lacking the table");
    assert_eq!(row.get::<_, i32>(0), 7);
    let served = session.last_served().unwrap().clone();
    assert_eq!(served.role, Role::Primary);
    assert_eq!(served.fallback, Some(FallbackReason::WaitTimeout));
    for r in pg.replicas() {
        pg.resume_replay(r).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replicas_past_max_wait_fall_back_or_error_per_policy() {
    let pg = start_pg(2).await;
    let cluster = cluster(&pg, |b| b).await;
    for r in pg.replicas() {
        pg.pause_replay(r).await.unwrap();
    }
    let mut session = cluster.session().with_policy(Consistency::ReadYourWrites {
        max_wait: Duration::from_millis(50),
        then: Fallback::Primary,
    });
    session
        .execute("INSERT INTO items VALUES (2, 'two')", &[])
        .await
        .unwrap();
    let row = session
        .query_opt("SELECT body FROM items WHERE id = 2", &[])
        .await
        .unwrap();
    assert!(row.is_some(), "fallback read sees the write");
    let served = session.last_served().unwrap().clone();
    assert_eq!(served.role, Role::Primary);
    assert_eq!(served.fallback, Some(FallbackReason::WaitTimeout));
    assert!(served.waited >= Duration::from_millis(50));

    session.set_policy(Consistency::ReadYourWrites {
        max_wait: Duration::from_millis(50),
        then: Fallback::Error,
    });
    session
        .execute("INSERT INTO items VALUES (3, 'three')", &[])
        .await
        .unwrap();
    let err = session
        .query_opt("SELECT body FROM items WHERE id = 3", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WaitTimeout { .. }), "{err:?}");
    assert_eq!(err.code(), Some("57014"));
    for r in pg.replicas() {
        pg.resume_replay(r).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_your_writes_violation_in_1000_pairs_with_50ms_apply_delay() {
    let pg = start_pg(2).await;
    for r in pg.replicas() {
        pg.set_apply_delay(r, Duration::from_millis(50))
            .await
            .unwrap();
    }
    let cluster = cluster(&pg, |b| b.policy(RYW).pool_size(12)).await;
    let violations = Arc::new(AtomicUsize::new(0));
    let on_replica = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    const WRITERS: i32 = 10;
    const PAIRS: i32 = 100;
    for w in 0..WRITERS {
        let cluster = cluster.clone();
        let violations = violations.clone();
        let on_replica = on_replica.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = cluster.session();
            for k in 0..PAIRS {
                let id = 10_000 + w * PAIRS + k;
                s.execute("INSERT INTO items VALUES ($1, 'x')", &[&id])
                    .await
                    .unwrap();
                let row = s
                    .query_opt("SELECT id FROM items WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                if row.is_none() {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
                if s.last_served().unwrap().role == Role::Replica {
                    on_replica.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = (WRITERS * PAIRS) as usize;
    let replica_reads = on_replica.load(Ordering::Relaxed);
    lagrouter_testing::report(format_args!(
        "{total} write-then-read pairs: {replica_reads} reads served by replicas"
    ));
    assert_eq!(violations.load(Ordering::Relaxed), 0, "stale reads");
    // The delay (50 ms) is below max_wait (100 ms): replicas serve most reads.
    assert!(
        replica_reads > total / 2,
        "only {replica_reads} of {total} on replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monotonic_reads_across_replicas_with_different_lag() {
    let pg = start_pg(2).await;
    let (behind, ahead) = (pg.replicas()[0], pg.replicas()[1]);
    let cluster = cluster(&pg, |b| b.policy(RYW).load_balance(LoadBalance::RoundRobin)).await;
    pg.pause_replay(behind).await.unwrap();
    let c = pg.connect(pg.primary()).await.unwrap();
    c.execute("INSERT INTO items VALUES (7, 'seven')", &[])
        .await
        .unwrap();
    let lsn = pg.current_lsn().await.unwrap();
    pg.wait_for_replay(ahead, lsn, DEADLINE).await.unwrap();
    let (bi, ai) = (node_index(&pg, behind), node_index(&pg, ahead));
    wait_topology(&cluster, |t| t.nodes[ai].lsn >= Some(lsn)).await;

    // A session with no writes: reads alternate between replicas until one
    // sees the row; from then on none may miss it.
    let mut session = cluster.session();
    let mut seen = false;
    let mut served_by_ahead = 0;
    for _ in 0..20 {
        let n: i64 = session
            .query_one("SELECT count(*) FROM items WHERE id = 7", &[])
            .await
            .unwrap()
            .get(0);
        let node = session.last_served().unwrap().node;
        if seen {
            assert_eq!(n, 1, "read went back in time (node {node})");
            assert_ne!(
                node, bi,
                "a lagging replica served a session that saw newer data"
            );
        }
        if n == 1 {
            seen = true;
        }
        if node == ai {
            served_by_ahead += 1;
        }
    }
    assert!(seen && served_by_ahead > 0);
    pg.resume_replay(behind).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_miss_reads_the_primary_when_replica_has_no_row() {
    let pg = start_pg(2).await;
    let with_retry = cluster(&pg, |b| {
        b.policy(Consistency::Eventual).retry_on_empty(true)
    })
    .await;
    let without = cluster(&pg, |b| b.policy(Consistency::Eventual)).await;
    for r in pg.replicas() {
        pg.pause_replay(r).await.unwrap();
    }
    // Written outside the sessions: no token tells lagrouter about it.
    let c = pg.connect(pg.primary()).await.unwrap();
    c.execute("INSERT INTO items VALUES (4, 'four')", &[])
        .await
        .unwrap();

    let mut s = without.session();
    let row = s
        .query_opt("SELECT body FROM items WHERE id = 4", &[])
        .await
        .unwrap();
    assert!(row.is_none(), "a paused replica cannot have the row");
    assert_eq!(s.last_served().unwrap().role, Role::Replica);

    let mut s = with_retry.session();
    let row = s
        .query_opt("SELECT body FROM items WHERE id = 4", &[])
        .await
        .unwrap();
    assert_eq!(row.expect("retried on primary").get::<_, &str>(0), "four");
    let served = s.last_served().unwrap();
    assert_eq!(served.role, Role::Primary);
    assert_eq!(served.fallback, Some(FallbackReason::EmptyResult));
    // A plain query (not expecting a row) is not retried.
    let rows = s
        .query("SELECT body FROM items WHERE id = 4", &[])
        .await
        .unwrap();
    assert!(rows.is_empty());
    assert_eq!(s.last_served().unwrap().role, Role::Replica);
    for r in pg.replicas() {
        pg.resume_replay(r).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_writing_function_in_a_read_goes_to_the_primary() {
    let pg = start_pg(2).await;
    let c = pg.connect(pg.primary()).await.unwrap();
    c.batch_execute(
        "CREATE FUNCTION add_item(i int) RETURNS int VOLATILE LANGUAGE sql
           AS 'INSERT INTO items VALUES (i, ''fn'') RETURNING id';",
    )
    .await
    .unwrap();
    pg.wait_caught_up(DEADLINE).await.unwrap();
    let cluster = cluster(&pg, |b| b.policy(Consistency::Eventual)).await;
    let mut s = cluster.session();
    let row = s.query_one("SELECT add_item(5)", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 5);
    let served = s.last_served().unwrap();
    assert_eq!(served.role, Role::Primary);
    assert_eq!(served.fallback, Some(FallbackReason::ReadOnly));
    assert!(s.token().is_some(), "the write advanced the token");
    let n: i64 = c
        .query_one("SELECT count(*) FROM items WHERE id = 5", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "written exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_is_ejected_and_reads_continue() {
    let pg = start_pg(2).await;
    let victim = pg.replicas()[0];
    let vi = node_index(&pg, victim);
    let cluster = cluster(&pg, |b| {
        b.policy(Consistency::Eventual)
            .pool_timeout(Duration::from_secs(2))
    })
    .await;
    let mut s = cluster.session();
    // Warm the pools of both replicas.
    for _ in 0..4 {
        s.query("SELECT 1", &[]).await.unwrap();
    }
    pg.kill_node(victim).await.unwrap();
    // Every read succeeds, served by the other replica or the primary.
    for i in 0..40 {
        s.query("SELECT 1", &[])
            .await
            .unwrap_or_else(|e| panic!("read {i} failed: {e}"));
        assert_ne!(s.last_served().unwrap().node, vi);
    }
    let topo = wait_topology(&cluster, |t| !t.nodes[vi].healthy).await;
    assert!(topo.nodes[vi].last_error.is_some());

    // It comes back and is re-admitted.
    pg.start_node(victim).await.unwrap();
    wait_topology(&cluster, |t| t.nodes[vi].healthy).await;
    eventually("reads on the restarted replica", || {
        let cluster = cluster.clone();
        async move {
            let mut s = cluster.session();
            s.query("SELECT 1", &[]).await.unwrap();
            s.last_served().unwrap().node == vi
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_staleness_excludes_a_lagging_replica() {
    let pg = start_pg(2).await;
    let (lagging, fresh) = (pg.replicas()[0], pg.replicas()[1]);
    let (li, fi) = (node_index(&pg, lagging), node_index(&pg, fresh));
    let cluster = cluster(&pg, |b| b).await;
    pg.pause_replay(lagging).await.unwrap();
    let c = pg.connect(pg.primary()).await.unwrap();
    c.execute("INSERT INTO items VALUES (8, 'eight')", &[])
        .await
        .unwrap();
    wait_topology(&cluster, |t| {
        t.nodes[li]
            .lag
            .is_some_and(|l| l > Duration::from_millis(300))
            && t.nodes[fi].lag == Some(Duration::ZERO)
    })
    .await;

    let mut s = cluster
        .session()
        .with_policy(Consistency::BoundedStaleness(Duration::from_millis(200)));
    for _ in 0..20 {
        s.query("SELECT 1", &[]).await.unwrap();
        assert_eq!(s.last_served().unwrap().node, fi);
    }
    // Eventual consistency still uses it.
    let mut s = cluster.session().with_policy(Consistency::Eventual);
    let mut used = false;
    for _ in 0..10 {
        s.query("SELECT 1", &[]).await.unwrap();
        used |= s.last_served().unwrap().node == li;
    }
    assert!(used, "eventual reads never used the lagging replica");
    pg.resume_replay(lagging).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_foreign_and_future_tokens_are_typed_errors() {
    let pg = start_pg(1).await;
    let cluster = cluster(&pg, |b| {
        b.policy(Consistency::ReadYourWrites {
            max_wait: Duration::from_millis(30),
            then: Fallback::Primary,
        })
    })
    .await;
    let id = cluster
        .topology()
        .cluster
        .expect("cluster identity is known");

    assert!(matches!(
        "not-a-token".parse::<ConsistencyToken>(),
        Err(TokenError::Malformed(_))
    ));

    let foreign = ConsistencyToken::new(Lsn(1), id.system_identifier ^ 1, id.timeline);
    let mut s = cluster.session().with_token(foreign);
    let err = s.query("SELECT 1", &[]).await.unwrap_err();
    assert!(
        matches!(err, Error::Token(TokenError::ForeignCluster { .. })),
        "{err:?}"
    );
    assert_eq!(err.code(), Some("22023"));

    let now = pg.current_lsn().await.unwrap();
    let future = ConsistencyToken::new(
        Lsn(now.as_u64() + (1 << 30)),
        id.system_identifier,
        id.timeline,
    );
    let mut s = cluster.session().with_token(future);
    let err = s.query("SELECT 1", &[]).await.unwrap_err();
    assert!(matches!(err, Error::TokenAhead { .. }), "{err:?}");
    assert_eq!(err.code(), Some("55000"));

    // A valid token of this cluster works.
    let mut s = cluster.session();
    s.execute("INSERT INTO items VALUES (9, 'nine')", &[])
        .await
        .unwrap();
    let text = s.token().unwrap().to_string();
    let mut s2 = cluster.session().with_token(text.parse().unwrap());
    assert!(
        s2.query_opt("SELECT 1 FROM items WHERE id = 9", &[])
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_token_is_at_or_after_the_commit_and_reached_by_replicas() {
    let pg = start_pg(1).await;
    let cluster = cluster(&pg, |b| b).await;
    let mut s = cluster.session();
    for i in 0..50 {
        s.execute("INSERT INTO items VALUES ($1, 'w')", &[&(100 + i)])
            .await
            .unwrap();
        let t = s.token().unwrap();
        // Never beyond what the primary has, never unreachable for replicas.
        assert!(t.lsn <= pg.current_lsn().await.unwrap());
        pg.wait_for_replay(pg.replicas()[0], t.lsn, DEADLINE)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_advances_token_and_drop_rolls_back() {
    let pg = start_pg(1).await;
    let cluster = cluster(&pg, |b| b.policy(RYW)).await;
    let mut s = cluster.session();
    let tx = s.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES (20, 'a')", &[])
        .await
        .unwrap();
    tx.execute("INSERT INTO items VALUES (21, 'b')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let t1 = s.token().unwrap();
    let n: i64 = s
        .query_one("SELECT count(*) FROM items WHERE id IN (20, 21)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    {
        let tx = s.transaction().await.unwrap();
        tx.execute("INSERT INTO items VALUES (22, 'c')", &[])
            .await
            .unwrap();
        // dropped: rolled back
    }
    let tx = s.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES (23, 'd')", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let c = pg.connect(pg.primary()).await.unwrap();
    let gone: i64 = c
        .query_one("SELECT count(*) FROM items WHERE id IN (22, 23)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);

    // A read-only transaction on a replica that reached the token.
    let rtx = s.read_transaction().await.unwrap();
    let n: i64 = rtx
        .query_one("SELECT count(*) FROM items WHERE id IN (20, 21)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    rtx.commit().await.unwrap();
    assert!(s.token().unwrap().lsn >= t1.lsn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_at_a_segment_boundary_is_reached_by_an_idle_replica() {
    let pg = start_pg(1).await;
    let r = pg.replicas()[0];
    let cluster = cluster(&pg, |b| {
        b.policy(Consistency::ReadYourWrites {
            max_wait: Duration::from_secs(5),
            then: Fallback::Error,
        })
    })
    .await;
    let mut s = cluster.session();
    s.execute("INSERT INTO items VALUES (30, 'x')", &[])
        .await
        .unwrap();
    // After a WAL switch the insert position is just past the next
    // segment's long page header, where no record ends: the replica's replay
    // position stops at the segment start.
    s.write_query("SELECT pg_switch_wal()", &[]).await.unwrap();
    let raw = pg.current_lsn().await.unwrap();
    let seg = cluster.topology().wal_segment_size;
    assert_eq!(
        raw.as_u64() % seg,
        40,
        "insert position after pg_switch_wal: {raw}"
    );
    let token = s.token().unwrap();
    assert_eq!(
        token.lsn.as_u64() % seg,
        0,
        "token rounded to the segment start"
    );
    pg.wait_for_replay(r, token.lsn, DEADLINE).await.unwrap();
    let replayed = pg.replay_lsn(r).await.unwrap().unwrap();
    assert!(
        replayed < raw,
        "an idle replica stops before the raw position"
    );
    // The read is served by the replica, without waiting for max_wait.
    let row = s
        .query_opt("SELECT 1 FROM items WHERE id = 30", &[])
        .await
        .unwrap();
    assert!(row.is_some());
    assert_eq!(s.last_served().unwrap().role, Role::Replica);
    // The monitor rounds the primary's position the same way: the idle
    // replica shows no lag (it would otherwise grow until the next write).
    let ri = node_index(&pg, r);
    let t = wait_topology(&cluster, |t| {
        t.primary_lsn == Some(token.lsn) && t.nodes[ri].lsn == Some(replayed)
    })
    .await;
    assert_eq!(t.nodes[ri].lag_bytes, Some(0), "{:?}", t.nodes[ri]);
    assert_eq!(t.nodes[ri].lag, Some(Duration::ZERO), "{:?}", t.nodes[ri]);
}
