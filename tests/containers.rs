//! Faults only containers can show, through the library: a replica cut off
//! the network while its server keeps running, a frozen container (`docker
//! pause`), the primary partitioned from its replicas but not from clients,
//! and a failover across containers. Each test starts its own Docker
//! cluster; on the local backend they print why they skip
//! (`LAGROUTER_TEST_BACKEND=docker` runs them).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{DEADLINE, cluster, eventually, ids_on, node_index, start_pg, wait_topology};
use lagrouter::{
    Cluster, Consistency, ConsistencyToken, Error, FallbackReason, MonitorConfig, Role,
};
use lagrouter_testing::{BackendKind, PgCluster, default_backend};
use tokio::time::timeout;

const RYW: Consistency = Consistency::read_your_writes(Duration::from_millis(100));
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Scheduling slack on top of the probe timeout for "ejected in time".
const SLACK: Duration = Duration::from_millis(500);

/// A Docker cluster with two replicas and the `items` table, or `None` (and
/// the reason printed) when the Docker backend is not in use.
async fn docker_pg() -> Option<PgCluster> {
    let backend = default_backend().expect("LAGROUTER_TEST_BACKEND");
    if backend != BackendKind::Docker {
        eprintln!(
            "skipped: container faults need the Docker backend (this run uses the {backend} one; \
             LAGROUTER_TEST_BACKEND=docker runs them)"
        );
        return None;
    }
    Some(start_pg(2).await)
}

/// A lagrouter cluster with a 20 ms monitor and a 2 s probe timeout.
async fn lagrouter(pg: &PgCluster, policy: Consistency) -> Cluster {
    cluster(pg, |b| {
        b.policy(policy)
            .pool_timeout(Duration::from_secs(2))
            .monitor_config(MonitorConfig {
                interval: Duration::from_millis(20),
                probe_timeout: PROBE_TIMEOUT,
                ..MonitorConfig::default()
            })
    })
    .await
}

/// Client traffic: a writer, a reader following the writer's tokens and an
/// eventual reader, each statement bounded by [`DEADLINE`].
#[derive(Default)]
struct Traffic {
    stop: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    served: [AtomicU64; 3],
    slowest_read_ms: AtomicU64,
    errors: Mutex<Vec<String>>,
    last_write: Mutex<Option<(i32, ConsistencyToken)>>,
}

impl Traffic {
    fn start(cluster: &Cluster) -> (Arc<Traffic>, Vec<tokio::task::JoinHandle<()>>) {
        let t = Arc::new(Traffic::default());
        let mut tasks = Vec::new();
        let (c, tr) = (cluster.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = c.session();
            let mut id = 10_000;
            while !tr.stop.load(Ordering::Relaxed) {
                id += 1;
                match timeout(
                    DEADLINE,
                    s.execute("INSERT INTO items VALUES ($1, 'c')", &[&id]),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        tr.writes.fetch_add(1, Ordering::Relaxed);
                        *tr.last_write.lock().unwrap() = Some((id, s.token().unwrap()));
                    }
                    Ok(Err(e)) => tr.error(format!("write {id}: {e}")),
                    Err(_) => tr.error(format!("write {id} hung")),
                }
            }
        }));
        for token_reader in [true, false] {
            let (c, tr) = (cluster.clone(), t.clone());
            tasks.push(tokio::spawn(async move {
                while !tr.stop.load(Ordering::Relaxed) {
                    let last = *tr.last_write.lock().unwrap();
                    let started = Instant::now();
                    let (mut s, sql, id) = match (token_reader, last) {
                        (true, Some((id, token))) => (
                            c.session().with_token(token),
                            "SELECT 1 FROM items WHERE id = $1",
                            id,
                        ),
                        (true, None) => {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        (false, _) => (
                            c.session().with_policy(Consistency::Eventual),
                            "SELECT 1 WHERE $1::int IS NOT NULL",
                            0,
                        ),
                    };
                    match timeout(DEADLINE, s.query_opt(sql, &[&id])).await {
                        Ok(Ok(Some(_))) => {
                            let took = started.elapsed().as_millis() as u64;
                            tr.slowest_read_ms.fetch_max(took, Ordering::Relaxed);
                            tr.reads.fetch_add(1, Ordering::Relaxed);
                            tr.served[s.last_served().unwrap().node]
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(None)) => tr.error(format!("stale read: row {id} missing")),
                        Ok(Err(e)) => tr.error(format!("read: {e}")),
                        Err(_) => tr.error("read hung".into()),
                    }
                }
            }));
        }
        (t, tasks)
    }

    fn error(&self, e: String) {
        self.errors.lock().unwrap().push(e);
    }

    async fn more_reads(self: &Arc<Self>, n: u64) {
        let target = self.reads.load(Ordering::Relaxed) + n;
        eventually(&format!("{n} more reads"), || {
            let t = self.clone();
            async move { t.reads.load(Ordering::Relaxed) >= target }
        })
        .await;
    }

    async fn more_reads_on(self: &Arc<Self>, node: usize, n: u64) {
        let target = self.served[node].load(Ordering::Relaxed) + n;
        eventually(&format!("{n} more reads on node {node}"), || {
            let t = self.clone();
            async move { t.served[node].load(Ordering::Relaxed) >= target }
        })
        .await;
    }

    async fn stop(self: &Arc<Self>, tasks: Vec<tokio::task::JoinHandle<()>>) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            timeout(DEADLINE, t).await.expect("traffic stops").unwrap();
        }
        self.errors.lock().unwrap().clone()
    }
}

/// A replica cut off the network (`docker network disconnect` from every
/// network) while its server runs: its published port refuses and its
/// open connections are closed, so it is ejected well within the probe
/// timeout; reads in flight on it are retried elsewhere, and clients see
/// no error. Reconnected, it catches up and is re-admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_the_network_is_ejected_and_readmitted_without_client_errors() {
    let Some(pg) = docker_pg().await else { return };
    let victim = pg.replicas()[0];
    let vi = node_index(&pg, victim);
    let cluster = lagrouter(&pg, RYW).await;
    let (traffic, tasks) = Traffic::start(&cluster);
    traffic.more_reads_on(vi, 20).await;

    let cut = Instant::now();
    pg.isolate_node(victim).await.unwrap();
    cluster
        .monitor()
        .wait_for(PROBE_TIMEOUT + SLACK, |t| !t.nodes[vi].healthy)
        .await
        .expect("the isolated replica is ejected within the probe timeout");
    let ejected = cut.elapsed();
    assert!(pg.is_running(victim), "its server kept running");
    traffic.more_reads(300).await;
    let written_meanwhile = pg.current_lsn().await.unwrap();

    let reconnected = Instant::now();
    pg.reconnect_node(victim).await.unwrap();
    let t = wait_topology(&cluster, |t| t.nodes[vi].healthy).await;
    let readmitted = reconnected.elapsed();
    assert!(
        t.nodes[vi]
            .lag
            .is_some_and(|l| l <= MonitorConfig::default().readmit_max_lag),
        "re-admitted only once caught up: {:?}",
        t.nodes[vi]
    );
    pg.wait_for_replay(victim, written_meanwhile, DEADLINE)
        .await
        .unwrap();
    traffic.more_reads_on(vi, 20).await;
    let errors = traffic.stop(tasks).await;
    lagrouter_testing::report(format_args!(
        "container cut off the network: ejected {ejected:?} after `docker network disconnect` \
         (probe timeout {PROBE_TIMEOUT:?}); re-admitted {readmitted:?} after reconnecting; \
         {} reads, {} writes, {} errors",
        traffic.reads.load(Ordering::Relaxed),
        traffic.writes.load(Ordering::Relaxed),
        errors.len()
    ));
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
}

/// A frozen container (`docker pause`: no RST, nothing answers) is ejected
/// when its probe times out, bounded by the probe timeout; reads started
/// after that avoid it. A statement already in flight on it waits (the
/// library does not abandon it) and completes after the thaw: slow, not an
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_container_is_ejected_within_the_probe_timeout() {
    let Some(pg) = docker_pg().await else { return };
    let victim = pg.replicas()[0];
    let vi = node_index(&pg, victim);
    let cluster = lagrouter(&pg, RYW).await;
    let (traffic, tasks) = Traffic::start(&cluster);
    traffic.more_reads_on(vi, 20).await;

    let frozen = Instant::now();
    pg.freeze_node(victim).await.unwrap();
    let t = cluster
        .monitor()
        .wait_for(PROBE_TIMEOUT + SLACK, |t| !t.nodes[vi].healthy)
        .await
        .expect("the frozen replica is ejected within the probe timeout");
    let ejected = frozen.elapsed();
    assert!(
        t.nodes[vi]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out")),
        "{:?}",
        t.nodes[vi]
    );
    // The traffic's readers may be stuck on the frozen node; reads started
    // now avoid it and succeed.
    let token = traffic
        .last_write
        .lock()
        .unwrap()
        .expect("writes happened")
        .1;
    for policy in [RYW, Consistency::Eventual] {
        for _ in 0..50 {
            let mut s = cluster.session().with_policy(policy).with_token(token);
            timeout(DEADLINE, s.query_one("SELECT count(*) FROM items", &[]))
                .await
                .expect("a read after the ejection hung")
                .unwrap();
            assert_ne!(
                s.last_served().unwrap().node,
                vi,
                "a read went to the ejected node"
            );
        }
    }
    let thawed = Instant::now();
    pg.thaw_node(victim).await.unwrap();
    wait_topology(&cluster, |t| t.nodes[vi].healthy).await;
    let readmitted = thawed.elapsed();
    traffic.more_reads_on(vi, 20).await;
    let errors = traffic.stop(tasks).await;
    lagrouter_testing::report(format_args!(
        "frozen container (docker pause): ejected {ejected:?} after the freeze (probe timeout \
         {PROBE_TIMEOUT:?}); re-admitted {readmitted:?} after the thaw; slowest read {} ms \
         (a read in flight on it waits for the thaw); {} reads, {} errors",
        traffic.slowest_read_ms.load(Ordering::Relaxed),
        traffic.reads.load(Ordering::Relaxed),
        errors.len()
    ));
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
}

/// The primary partitioned from its replicas, not from clients: writes go
/// on; the replicas stay healthy (they answer probes) but stop advancing,
/// so a read of a fresh write waits `max_wait` and is served by the
/// primary, `BoundedStaleness` reads move to the primary once the lag
/// passes their bound, and `Eventual` reads stay on the (stale) replicas.
/// Healed, the replicas catch up and serve token reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_partitioned_from_its_replicas_keeps_serving_through_the_primary() {
    let Some(pg) = docker_pg().await else { return };
    let cluster = lagrouter(&pg, RYW).await;
    let replicas: Vec<usize> = pg.replicas().iter().map(|&r| node_index(&pg, r)).collect();
    let unhealthy = Arc::new(AtomicU64::new(0));
    let watcher = {
        let mut rx = cluster.monitor().subscribe();
        let (unhealthy, replicas) = (unhealthy.clone(), replicas.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let t = rx.borrow_and_update().clone();
                if replicas.iter().any(|&r| !t.nodes[r].healthy) {
                    unhealthy.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let mut s = cluster.session();
    s.execute("INSERT INTO items VALUES (1, 'before')", &[])
        .await
        .unwrap();
    eventually("a token read served by a replica", || {
        let c = cluster.clone();
        let token = s.token().unwrap();
        async move {
            let mut r = c.session().with_token(token);
            r.query_opt("SELECT 1 FROM items WHERE id = 1", &[])
                .await
                .unwrap()
                .is_some()
                && r.last_served().unwrap().role == Role::Replica
        }
    })
    .await;

    let cut = Instant::now();
    pg.partition_from_peers(pg.primary()).await.unwrap();
    s.execute("INSERT INTO items VALUES (2, 'during')", &[])
        .await
        .unwrap();
    let written = s.token().unwrap().lsn;
    wait_topology(&cluster, |t| t.primary_lsn.is_some_and(|p| p >= written)).await;
    for id in 3..23 {
        s.execute("INSERT INTO items VALUES ($1, 'during')", &[&id])
            .await
            .unwrap();
        assert!(
            s.query_opt("SELECT 1 FROM items WHERE id = $1", &[&id])
                .await
                .unwrap()
                .is_some()
        );
        let served = s.last_served().unwrap();
        assert_eq!(served.role, Role::Primary, "{served:?}");
        assert_eq!(
            served.fallback,
            Some(FallbackReason::WaitTimeout),
            "{served:?}"
        );
        assert!(served.waited >= Duration::from_millis(100), "{served:?}");
    }
    let mut eventual = cluster.session().with_policy(Consistency::Eventual);
    let n: i64 = eventual
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(eventual.last_served().unwrap().role, Role::Replica);
    assert_eq!(n, 1, "a replica serves what it had before the partition");
    let bound = Duration::from_millis(500);
    wait_topology(&cluster, |t| {
        replicas
            .iter()
            .all(|&r| t.nodes[r].lag.is_some_and(|l| l > bound))
    })
    .await;
    let mut bounded = cluster
        .session()
        .with_policy(Consistency::BoundedStaleness(bound));
    let n: i64 = bounded
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bounded.last_served().unwrap().role, Role::Primary);
    assert_eq!(n, 22);
    let partitioned_for = cut.elapsed();

    let healed = Instant::now();
    pg.reconnect_node(pg.primary()).await.unwrap();
    let primary_lsn = pg.current_lsn().await.unwrap();
    for r in pg.replicas() {
        pg.wait_for_replay(r, primary_lsn, DEADLINE).await.unwrap();
    }
    let caught_up = healed.elapsed();
    eventually("token reads back on a replica", || {
        let c = cluster.clone();
        let token = s.token().unwrap();
        async move {
            let mut r = c.session().with_token(token);
            r.query_opt("SELECT 1 FROM items WHERE id = 22", &[])
                .await
                .unwrap()
                .is_some()
                && r.last_served().unwrap().role == Role::Replica
        }
    })
    .await;
    watcher.abort();
    assert_eq!(
        unhealthy.load(Ordering::SeqCst),
        0,
        "a partitioned replica was ejected"
    );
    lagrouter_testing::report(format_args!(
        "primary partitioned from its replicas for {partitioned_for:?}: 0 errors, token reads \
         served by the primary after max_wait, replicas never ejected; caught up {caught_up:?} \
         after the partition healed"
    ));
}

/// Failover across containers: the primary is partitioned from its
/// replicas (writes it acknowledges from then on reach no replica), its
/// container is killed, and the most advanced replica is promoted.
/// Writes resume on the new primary without a restart, and every
/// acknowledged write reads back with its token or is reported lost
/// (55000), never silently missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_across_containers_resumes_writes_and_reports_lost_ones() {
    let Some(pg) = docker_pg().await else { return };
    let old = pg.primary();
    let cluster = lagrouter(&pg, RYW).await;
    let acks: Arc<Mutex<Vec<(i32, ConsistencyToken, Instant)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, acks, failures, stop) = (
            cluster.clone(),
            acks.clone(),
            failures.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut s = c.session();
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                match timeout(
                    Duration::from_secs(5),
                    s.execute("INSERT INTO items VALUES ($1, 'w')", &[&id]),
                )
                .await
                {
                    Ok(Ok(_)) => {
                        acks.lock()
                            .unwrap()
                            .push((id, s.token().unwrap(), Instant::now()))
                    }
                    Ok(Err(e)) => {
                        let code = e.code().unwrap_or_default().to_string();
                        assert!(code.starts_with("08") || code.starts_with("57P"), "{e}");
                        failures.lock().unwrap().push((Instant::now(), code));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(_) => panic!("a write hung"),
                }
            }
        })
    };
    let acked = |n: usize| {
        let acks = acks.clone();
        async move {
            eventually(&format!("{n} acknowledged writes"), || {
                let acks = acks.clone();
                async move { acks.lock().unwrap().len() >= n }
            })
            .await
        }
    };
    acked(20).await;
    let replicated = acks.lock().unwrap().len();
    let lsn = pg.current_lsn().await.unwrap();
    for r in pg.replicas() {
        pg.wait_for_replay(r, lsn, DEADLINE).await.unwrap();
    }
    pg.partition_from_peers(old).await.unwrap();
    let at_cut = acks.lock().unwrap().len();
    acked(at_cut + 20).await;

    // Promote the replica that received the most (the other can follow).
    let target = pg.most_advanced_replica(DEADLINE).await.unwrap();
    let ti = node_index(&pg, target);
    // Killed, not stopped: a fast shutdown waits for the WAL senders to
    // reach the partitioned standbys, up to wal_sender_timeout (60 s).
    let killed = Instant::now();
    pg.kill_node(old).await.unwrap();
    eventually("a write to fail", || {
        let failures = failures.clone();
        async move { !failures.lock().unwrap().is_empty() }
    })
    .await;
    let promote_called = Instant::now();
    pg.promote(target).await.unwrap();
    wait_topology(&cluster, |t| t.primary == Some(ti)).await;
    let detected = promote_called.elapsed();
    eventually("a write acknowledged by the new primary", || {
        let acks = acks.clone();
        async move {
            acks.lock()
                .unwrap()
                .last()
                .is_some_and(|a| a.2 > promote_called)
        }
    })
    .await;
    let first_failure = failures.lock().unwrap()[0].0;
    let first_success = acks
        .lock()
        .unwrap()
        .iter()
        .find(|a| a.2 > first_failure)
        .expect("checked")
        .2;
    let n = acks.lock().unwrap().len();
    acked(n + 20).await;
    stop.store(true, Ordering::Relaxed);
    timeout(DEADLINE, writer)
        .await
        .expect("writer stops")
        .unwrap();

    let acks = acks.lock().unwrap().clone();
    let present = ids_on(&pg, target).await;
    let lost: HashSet<i32> = acks
        .iter()
        .map(|a| a.0)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.len() >= 20,
        "the writes after the partition are lost: {lost:?}"
    );
    assert!(acks[..replicated].iter().all(|a| present.contains(&a.0)));
    let mut reported = HashSet::new();
    for (id, token, _) in &acks {
        let mut s = cluster.session().with_token(*token);
        match timeout(
            DEADLINE,
            s.query_opt("SELECT 1 FROM items WHERE id = $1", &[id]),
        )
        .await
        {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("write {id} is silently missing"),
            Ok(Err(e @ Error::TokenAhead { .. })) => {
                assert_eq!(e.code(), Some("55000"));
                reported.insert(*id);
            }
            Ok(Err(e)) => panic!("reading write {id} back: {e}"),
            Err(_) => panic!("reading write {id} back hung"),
        }
    }
    assert_eq!(reported, lost, "reported lost vs actually lost");
    lagrouter_testing::report(format_args!(
        "failover across containers: the partitioned primary's container killed, the first write \
         failed {:?} later; new primary published {detected:?} after pg_promote was called; \
         writes failed for {:?} (first failure to first write acknowledged by the new primary); \
         {} writes acknowledged, {} lost and all reported (55000), {} failed (08/57P)",
        first_failure - killed,
        first_success - first_failure,
        acks.len(),
        lost.len(),
        failures.lock().unwrap().len()
    ));
}
