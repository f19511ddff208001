//! Node faults under load: a replica killed while several tasks read, the
//! primary killed (fail-fast writes, degraded read-only mode), and pool
//! exhaustion. Each test starts its own PostgreSQL cluster.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DEADLINE, cluster, counters, eventually, node_index, start_pg, wait_topology};
use lagrouter::{
    Consistency, ConsistencyToken, Error, Fallback, FallbackReason, MonitorConfig, Role,
};
use lagrouter_testing::PgCluster;
use tokio::time::timeout;

/// SQLSTATE classes a failed write may have when its node dies: connection
/// exception (08) or operator intervention / shutdown (57P).
fn is_node_down_code(e: &Error) -> bool {
    e.code()
        .is_some_and(|c| c.starts_with("08") || c.starts_with("57P"))
}

/// Polls `sql` (a boolean query) on `node` through the harness until true.
async fn wait_sql(pg: &PgCluster, node: usize, what: &str, sql: &str) {
    let c = pg.connect(node).await.expect("connect");
    eventually(what, || {
        let c = &c;
        async move { c.query_one(sql, &[]).await.expect(sql).get::<_, bool>(0) }
    })
    .await;
}

/// What the load tasks saw.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    /// Reads served per lagrouter node.
    served: [AtomicU64; 3],
    /// Reads that failed on one node and were served by another.
    retried: AtomicU64,
    slow_reads_done: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// The writer's last committed id and token.
    last_write: Mutex<Option<(i32, ConsistencyToken)>>,
}

impl Load {
    fn error(&self, what: String) {
        self.errors.lock().unwrap().push(what);
    }

    fn served(&self, s: &lagrouter::Session) {
        let served = s.last_served().expect("served");
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.served[served.node].fetch_add(1, Ordering::Relaxed);
        if served.fallback == Some(FallbackReason::ReplicaError) {
            self.retried.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A node's lag as published by the monitor.
type Lag = Option<Duration>;

const RYW: Consistency = Consistency::read_your_writes(Duration::from_millis(100));
const SLOW_READ: &str = "SELECT pg_sleep(0.3)::text";

/// Starts the load: one writer, a reader following the writer's tokens
/// (read-your-writes across sessions), a monotonic reader, an eventual
/// reader, and a slow eventual reader whose reads are likely in flight.
fn start_load(cluster: &lagrouter::Cluster, load: &Arc<Load>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    {
        let (cluster, load) = (cluster.clone(), load.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = cluster.session();
            let mut id = 1_000;
            while !load.stop.load(Ordering::Relaxed) {
                id += 1;
                match timeout(
                    DEADLINE,
                    s.execute("INSERT INTO items VALUES ($1, 'w')", &[&id]),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        load.writes.fetch_add(1, Ordering::Relaxed);
                        *load.last_write.lock().unwrap() = Some((id, s.token().unwrap()));
                    }
                    Ok(Err(e)) => load.error(format!("write {id}: {e}")),
                    Err(_) => load.error(format!("write {id} hung")),
                }
            }
        }));
    }
    {
        let (cluster, load) = (cluster.clone(), load.clone());
        tasks.push(tokio::spawn(async move {
            while !load.stop.load(Ordering::Relaxed) {
                let last = *load.last_write.lock().unwrap();
                let Some((id, token)) = last else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let mut s = cluster.session().with_token(token);
                match timeout(
                    DEADLINE,
                    s.query_opt("SELECT 1 FROM items WHERE id = $1", &[&id]),
                )
                .await
                {
                    Ok(Ok(Some(_))) => load.served(&s),
                    Ok(Ok(None)) => load.error(format!("stale read: row {id} missing")),
                    Ok(Err(e)) => load.error(format!("token read: {e}")),
                    Err(_) => load.error("token read hung".into()),
                }
            }
        }));
    }
    for (policy, sql) in [
        (RYW, "SELECT count(*)::text FROM items"),
        (Consistency::Eventual, "SELECT 1::text"),
        (Consistency::Eventual, SLOW_READ),
    ] {
        let (cluster, load) = (cluster.clone(), load.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = cluster.session().with_policy(policy);
            while !load.stop.load(Ordering::Relaxed) {
                match timeout(DEADLINE, s.query(sql, &[])).await {
                    Ok(Ok(_)) => {
                        load.served(&s);
                        if sql == SLOW_READ {
                            load.slow_reads_done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Err(e)) => load.error(format!("{sql}: {e}")),
                    Err(_) => load.error(format!("{sql} hung")),
                }
            }
        }));
    }
    tasks
}

/// A replica is killed while five tasks read and write continuously: no
/// request fails, in-flight reads are retried elsewhere, the replica is
/// ejected at once and only re-admitted once it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_under_concurrent_load_causes_no_errors() {
    counters::install();
    let pg = start_pg(2).await;
    let victim = pg.replicas()[0];
    let vi = node_index(&pg, victim);
    let readmit_max_lag = MonitorConfig::default().readmit_max_lag;
    let cluster = cluster(&pg, |b| {
        b.policy(RYW)
            .pool_size(8)
            .pool_timeout(Duration::from_secs(2))
    })
    .await;
    let ejections0 = counters::get("lagrouter_node_ejections_total");

    // Records any snapshot where the victim is healthy while `armed`, and
    // the first healthy snapshot after its restart.
    let armed = Arc::new(AtomicBool::new(false));
    let flaps = Arc::new(AtomicU64::new(0));
    // When the victim was first seen healthy again, and its lag then.
    // The victim's lag when it was first seen healthy again.
    let readmitted: Arc<Mutex<Option<Lag>>> = Arc::default();
    let watching = Arc::new(AtomicBool::new(false));
    let watcher = {
        let mut rx = cluster.monitor().subscribe();
        let (armed, flaps, readmitted, watching) = (
            armed.clone(),
            flaps.clone(),
            readmitted.clone(),
            watching.clone(),
        );
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let t = rx.borrow_and_update().clone();
                let n = &t.nodes[vi];
                if n.healthy && armed.load(Ordering::SeqCst) {
                    flaps.fetch_add(1, Ordering::SeqCst);
                }
                if n.healthy && watching.load(Ordering::SeqCst) {
                    readmitted.lock().unwrap().get_or_insert(n.lag);
                }
            }
        })
    };

    let load = Arc::new(Load::default());
    let tasks = start_load(&cluster, &load);
    eventually("load on every node", || {
        let load = load.clone();
        async move {
            load.reads.load(Ordering::Relaxed) >= 200
                && load.served[vi].load(Ordering::Relaxed) >= 10
        }
    })
    .await;

    // After its restart the victim will apply WAL 3 s late: too stale to be
    // re-admitted until the delay is lifted.
    pg.set_apply_delay(victim, Duration::from_secs(3))
        .await
        .unwrap();

    // Kill it while a slow read is running on it.
    wait_sql(
        &pg,
        victim,
        "a slow read in flight on the victim",
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(0.3)%'",
    )
    .await;
    let retried0 = load.retried.load(Ordering::Relaxed);
    let killed = Instant::now();
    pg.kill_node(victim).await.unwrap();
    let kill_took = killed.elapsed();
    let ejected = cluster
        .monitor()
        .wait_for(Duration::from_secs(2), |t| !t.nodes[vi].healthy)
        .await
        .expect("the killed replica is ejected within 2 s");
    let ejected_after = killed.elapsed();
    assert!(ejected.nodes[vi].last_error.is_some());
    // From now on it must stay ejected (one round after the kill settled:
    // a probe that started while it was alive may still land).
    let generation = cluster.topology().generation;
    wait_topology(&cluster, |t| t.generation >= generation + 2).await;
    armed.store(true, Ordering::SeqCst);
    assert!(!cluster.topology().nodes[vi].healthy);

    // Reads keep flowing while it is down.
    let reads_at_kill = load.reads.load(Ordering::Relaxed);
    let slow_at_kill = load.slow_reads_done.load(Ordering::Relaxed);
    eventually("reads during the outage", || {
        let load = load.clone();
        async move {
            load.reads.load(Ordering::Relaxed) >= reads_at_kill + 300
                && load.slow_reads_done.load(Ordering::Relaxed) >= slow_at_kill + 3
        }
    })
    .await;
    let served_by_victim_while_down = load.served[vi].load(Ordering::Relaxed);

    // It comes back, still 3 s behind: answering probes but not re-admitted.
    armed.store(false, Ordering::SeqCst);
    pg.start_node(victim).await.unwrap();
    let t = wait_topology(&cluster, |t| {
        t.nodes[vi].role == Role::Replica
            && t.nodes[vi].last_error.is_none()
            && t.nodes[vi].lag.is_some_and(|l| l > readmit_max_lag)
    })
    .await;
    assert!(
        !t.nodes[vi].healthy,
        "re-admitted while lagging: {:?}",
        t.nodes[vi]
    );
    armed.store(true, Ordering::SeqCst);
    let generation = t.generation;
    let t = wait_topology(&cluster, |t| t.generation >= generation + 10).await;
    assert!(
        !t.nodes[vi].healthy,
        "re-admitted while lagging: {:?}",
        t.nodes[vi]
    );
    armed.store(false, Ordering::SeqCst);

    // Once it has caught up it is re-admitted and serves reads again.
    watching.store(true, Ordering::SeqCst);
    let lifted = Instant::now();
    pg.set_apply_delay(victim, Duration::ZERO).await.unwrap();
    wait_topology(&cluster, |t| t.nodes[vi].healthy).await;
    let readmitted_after = lifted.elapsed();
    eventually("reads on the re-admitted replica", || {
        let load = load.clone();
        async move { load.served[vi].load(Ordering::Relaxed) > served_by_victim_while_down + 10 }
    })
    .await;

    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        timeout(DEADLINE, t)
            .await
            .expect("load task stops")
            .unwrap();
    }
    watcher.abort();

    let lag_at_readmission = readmitted.lock().unwrap().expect("re-admission seen");
    let errors = load.errors.lock().unwrap().clone();
    let retried = load.retried.load(Ordering::Relaxed) - retried0;
    lagrouter_testing::report(format_args!(
        "replica kill under load: {} reads, {} writes, {} errors; served per node {:?}; \
         {retried} reads retried elsewhere; kill_node took {kill_took:?}, ejected {ejected_after:?} \
         after the kill started; re-admitted {readmitted_after:?} after the apply delay was lifted \
         (lag then {lag_at_readmission:?})",
        load.reads.load(Ordering::Relaxed),
        load.writes.load(Ordering::Relaxed),
        errors.len(),
        load.served
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect::<Vec<_>>(),
    ));
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    assert!(
        retried >= 1,
        "the in-flight read on the victim was not retried"
    );
    assert_eq!(
        flaps.load(Ordering::SeqCst),
        0,
        "victim re-admitted while down or lagging"
    );
    assert!(
        lag_at_readmission.is_some_and(|l| l <= readmit_max_lag),
        "re-admitted with lag {lag_at_readmission:?}"
    );
    assert!(counters::get("lagrouter_node_ejections_total") > ejections0);
}

/// The primary is killed: writes in flight and new writes fail fast with a
/// connection error, reads without a token are served by the replicas, a
/// token-gated read is served by a replica that has the token or fails with
/// a clear error, and writes resume when the primary is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_writes_fail_fast_and_replicas_keep_serving_reads() {
    let pg = start_pg(2).await;
    let primary = pg.primary();
    let (r1, r2) = (pg.replicas()[0], pg.replicas()[1]);
    // Default pool timeout (5 s): failing fast must not depend on it.
    let cluster = cluster(&pg, |b| b.policy(RYW)).await;
    let mut w = cluster.session();
    w.execute("INSERT INTO items VALUES (1, 'one')", &[])
        .await
        .unwrap();
    let t1 = w.token().unwrap();
    for r in [r1, r2] {
        pg.wait_for_replay(r, t1.lsn, DEADLINE).await.unwrap();
    }
    // A second write that both replicas receive but do not replay (yet).
    for r in [r1, r2] {
        pg.pause_replay(r).await.unwrap();
    }
    w.execute("INSERT INTO items VALUES (2, 'two')", &[])
        .await
        .unwrap();
    let t2 = w.token().unwrap();
    for r in [r1, r2] {
        wait_sql(
            &pg,
            r,
            "the replica to receive the second write",
            &format!("SELECT pg_last_wal_receive_lsn() >= '{}'::pg_lsn", t2.lsn),
        )
        .await;
    }

    // A write in flight when the primary dies: blocked on a row lock.
    let locker = pg.connect(primary).await.unwrap();
    locker
        .batch_execute("BEGIN; SELECT * FROM items WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let blocked = {
        let mut s = cluster.session();
        tokio::spawn(async move {
            s.execute("UPDATE items SET body = 'uno' WHERE id = 1", &[])
                .await
                .map(|_| ())
        })
    };
    wait_sql(
        &pg,
        primary,
        "the update to wait for the lock",
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE items%'",
    )
    .await;

    let killed = Instant::now();
    pg.kill_node(primary).await.unwrap();
    let in_flight = timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the in-flight write hung")
        .unwrap()
        .expect_err("the in-flight write cannot succeed");
    let in_flight_after = killed.elapsed();
    assert!(
        is_node_down_code(&in_flight),
        "{in_flight:?} ({:?})",
        in_flight.code()
    );

    // New writes fail fast, well within the 5 s pool timeout.
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let start = Instant::now();
        let e = timeout(
            Duration::from_secs(3),
            w.execute("INSERT INTO items VALUES ($1, 'lost')", &[&(10 + i)]),
        )
        .await
        .expect("a write to the dead primary hung")
        .expect_err("a write to the dead primary succeeded");
        slowest = slowest.max(start.elapsed());
        assert!(is_node_down_code(&e), "{e:?} ({:?})", e.code());
        assert!(!e.is_pool_exhausted());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "slowest failed write took {slowest:?}"
    );
    let e = timeout(Duration::from_secs(3), w.transaction())
        .await
        .expect("BEGIN on the dead primary hung")
        .expect_err("BEGIN on the dead primary succeeded");
    assert_eq!(e.code(), Some("08006"), "{e:?}");
    cluster
        .monitor()
        .wait_for(Duration::from_secs(2), |t| !t.nodes[0].healthy)
        .await
        .expect("the dead primary is marked down");

    // Degraded read-only mode: reads without a token use the replicas.
    for policy in [RYW, Consistency::Eventual] {
        let mut s = cluster.session().with_policy(policy);
        for _ in 0..20 {
            let n: i64 = timeout(DEADLINE, s.query_one("SELECT count(*) FROM items", &[]))
                .await
                .unwrap()
                .unwrap()
                .get(0);
            assert_eq!(n, 1, "replay is paused after the first row");
            assert_eq!(s.last_served().unwrap().role, Role::Replica);
        }
    }
    // A token every replica has reached: served by a replica.
    let mut s = cluster.session().with_token(t1);
    let row = s
        .query_opt("SELECT body FROM items WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.unwrap().get::<_, &str>(0), "one");
    assert_eq!(s.last_served().unwrap().role, Role::Replica);
    assert_eq!(s.last_served().unwrap().fallback, None);
    // A token no replica has reached: a clear error after max_wait.
    let mut s = cluster.session().with_token(t2);
    let start = Instant::now();
    let e = timeout(
        Duration::from_secs(3),
        s.query_opt("SELECT body FROM items WHERE id = 2", &[]),
    )
    .await
    .expect("token-gated read hung")
    .expect_err("no node can serve the token");
    assert!(
        matches!(&e, Error::Connect { node, .. } if node == "primary"),
        "{e:?}"
    );
    assert_eq!(e.code(), Some("08006"));
    assert!(start.elapsed() >= Duration::from_millis(100));
    let mut s = cluster
        .session()
        .with_token(t2)
        .with_policy(Consistency::ReadYourWrites {
            max_wait: Duration::from_millis(100),
            then: Fallback::Error,
        });
    let e = s
        .query_opt("SELECT body FROM items WHERE id = 2", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout { .. }), "{e:?}");
    assert_eq!(e.code(), Some("57014"));
    // Once a replica replays what it received, it serves the token.
    pg.resume_replay(r1).await.unwrap();
    let mut s = cluster
        .session()
        .with_token(t2)
        .with_policy(Consistency::ReadYourWrites {
            max_wait: Duration::from_secs(5),
            then: Fallback::Error,
        });
    let row = s
        .query_opt("SELECT body FROM items WHERE id = 2", &[])
        .await
        .unwrap();
    assert_eq!(row.unwrap().get::<_, &str>(0), "two");
    assert_eq!(s.last_served().unwrap().node, node_index(&pg, r1));

    // The primary comes back: writes resume, no restart of lagrouter.
    pg.resume_replay(r2).await.unwrap();
    pg.start_node(primary).await.unwrap();
    let restarted = Instant::now();
    let mut attempts = 0;
    let mut w = cluster.session();
    loop {
        attempts += 1;
        let r = timeout(
            Duration::from_secs(3),
            w.execute("INSERT INTO items VALUES (3, 'three')", &[]),
        )
        .await
        .expect("write hung");
        match r {
            Ok(_) => break,
            Err(e) => {
                assert!(is_node_down_code(&e), "{e:?}");
                assert!(restarted.elapsed() < DEADLINE, "writes did not resume: {e}");
                // Client-side retry back-off.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    lagrouter_testing::report(format_args!(
        "primary kill: in-flight write failed {in_flight_after:?} after the kill started ({:?}); \
         slowest of 5 failed writes {slowest:?}; writes resumed {:?} after the restart ({attempts} attempts)",
        in_flight.code(),
        restarted.elapsed()
    ));
    drop(locker);
}

/// Pool exhaustion: a call that cannot get a connection fails with a clear
/// `Connect` error after the pool timeout, never hangs, and does not eject
/// the busy node; a read whose replica pool is exhausted is served elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_a_clear_error_after_the_pool_timeout() {
    let pg = start_pg(1).await;
    let ri = node_index(&pg, pg.replicas()[0]);
    let pool_timeout = Duration::from_millis(500);
    let cluster = cluster(&pg, |b| {
        b.policy(Consistency::Eventual)
            .pool_size(1)
            .pool_timeout(pool_timeout)
    })
    .await;
    // Counts snapshots in which a node is not healthy: a busy node must not
    // be ejected.
    let unhealthy = Arc::new(AtomicU64::new(0));
    let watcher = {
        let mut rx = cluster.monitor().subscribe();
        let unhealthy = unhealthy.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if rx.borrow_and_update().nodes.iter().any(|n| !n.healthy) {
                    unhealthy.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    // The replica's only connection is held by a read-only transaction: a
    // read waits the pool timeout, then goes to the primary.
    let mut holder = cluster.session();
    let rtx = holder.read_transaction().await.unwrap();
    assert_eq!(rtx.node(), ri);
    let mut s = cluster.session();
    let start = Instant::now();
    timeout(Duration::from_secs(5), s.query("SELECT 1", &[]))
        .await
        .expect("read hung")
        .unwrap();
    let waited = start.elapsed();
    let served = s.last_served().unwrap();
    assert_eq!(served.role, Role::Primary);
    assert_eq!(served.fallback, Some(FallbackReason::ReplicaError));
    assert!(waited >= pool_timeout, "{waited:?}");
    rtx.commit().await.unwrap();

    // The primary's only connection is held by a transaction: a write fails
    // after the pool timeout with a clear error.
    let mut holder = cluster.session();
    let tx = holder.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES (1, 'held')", &[])
        .await
        .unwrap();
    let mut s = cluster.session();
    let start = Instant::now();
    let e = timeout(
        Duration::from_secs(5),
        s.execute("INSERT INTO items VALUES (2, 'blocked')", &[]),
    )
    .await
    .expect("a write on an exhausted pool hung")
    .unwrap_err();
    let waited = start.elapsed();
    lagrouter_testing::report(format_args!(
        "pool exhaustion: write failed after {waited:?} (pool timeout {pool_timeout:?}): {e}"
    ));
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert_eq!(e.code(), Some("08006"));
    assert!(e.is_pool_exhausted());
    assert!(e.to_string().contains("pool exhausted"), "{e}");
    assert!(waited >= pool_timeout, "{waited:?}");
    assert!(waited < pool_timeout + Duration::from_secs(1), "{waited:?}");
    let e = timeout(Duration::from_secs(5), s.transaction())
        .await
        .expect("BEGIN on an exhausted pool hung")
        .unwrap_err();
    assert!(e.is_pool_exhausted(), "{e:?}");
    tx.commit().await.unwrap();
    // Busy nodes are not failed ones: nothing was ejected.
    let generation = cluster.topology().generation;
    wait_topology(&cluster, |t| t.generation >= generation + 2).await;
    watcher.abort();
    assert_eq!(
        unhealthy.load(Ordering::SeqCst),
        0,
        "a busy node was ejected"
    );
    s.execute("INSERT INTO items VALUES (2, 'free')", &[])
        .await
        .unwrap();

    // A storm of 64 sessions on pools of one connection: they queue, none
    // fails or hangs.
    let cluster = common::cluster(&pg, |b| {
        b.policy(RYW)
            .pool_size(1)
            .pool_timeout(Duration::from_secs(10))
    })
    .await;
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|k| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let mut s = cluster.session();
                if k % 8 == 0 {
                    s.execute("INSERT INTO items VALUES ($1, 'storm')", &[&(100 + k)])
                        .await?;
                }
                for _ in 0..5 {
                    s.query("SELECT count(*) FROM items", &[]).await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for t in tasks {
        timeout(DEADLINE, t)
            .await
            .expect("storm task hung")
            .unwrap()
            .unwrap();
    }
    lagrouter_testing::report(format_args!(
        "connection storm: 64 sessions on 1-connection pools done in {:?}",
        start.elapsed()
    ));
}

/// A replica that hangs without closing its connections (every process of
/// its server stopped, like a partitioned host) holds up nobody: while its
/// probe is outstanding the monitor keeps publishing the other nodes'
/// positions; after the probe timeout it is ejected and reads avoid it;
/// once it answers again it is re-admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_stalls_nobody_and_is_ejected_after_the_probe_timeout() {
    let pg = start_pg(2).await;
    let r1 = pg.replicas()[0];
    let r1i = node_index(&pg, r1);
    let probe_timeout = Duration::from_secs(5);
    let cluster = cluster(&pg, |b| {
        b.policy(Consistency::Eventual)
            .monitor_config(MonitorConfig {
                interval: Duration::from_millis(20),
                probe_timeout,
                ..MonitorConfig::default()
            })
    })
    .await;
    pg.freeze_node(r1).await.unwrap();
    let frozen_at = Instant::now();

    // Writes move the primary; snapshots keep showing them while the hung
    // replica's probe is still outstanding (it is not ejected yet).
    let mut s = cluster.session();
    let mut published = Vec::new();
    for i in 0..3 {
        s.execute(
            "INSERT INTO items VALUES ($1, 'while hung')",
            &[&(1000 + i)],
        )
        .await
        .unwrap();
        let want = pg.current_lsn().await.unwrap();
        let t = cluster
            .monitor()
            .wait_for(probe_timeout, |t| t.primary_lsn.is_some_and(|l| l >= want))
            .await
            .expect("the primary's position is published");
        assert!(
            t.nodes[r1i].healthy && t.nodes[r1i].last_error.is_none(),
            "published only after the hung replica's probe gave up: {:?}",
            t.nodes[r1i]
        );
        published.push(frozen_at.elapsed());
    }

    // After the probe timeout it is ejected, and reads avoid it.
    let t = wait_topology(&cluster, |t| !t.nodes[r1i].healthy).await;
    let ejected = frozen_at.elapsed();
    assert!(
        t.nodes[r1i]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out")),
        "{:?}",
        t.nodes[r1i]
    );
    for _ in 0..50 {
        timeout(DEADLINE, s.query("SELECT 1", &[]))
            .await
            .expect("a read hung")
            .unwrap();
        assert_ne!(s.last_served().unwrap().node, r1i);
    }

    // Answering again, it is re-admitted.
    pg.thaw_node(r1).await.unwrap();
    wait_topology(&cluster, |t| t.nodes[r1i].healthy).await;
    lagrouter_testing::report(format_args!(
        "hung replica: primary positions published {published:?} after the freeze while its \
         probe hung; ejected {ejected:?} after the freeze (probe timeout {probe_timeout:?})"
    ));
}
