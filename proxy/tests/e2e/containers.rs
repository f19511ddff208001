//! Faults only containers can show, through the proxy: a replica cut off
//! the network while its server keeps running, a frozen container (`docker
//! pause`), the primary partitioned from its replicas but not from clients,
//! and a failover across containers. They need the Docker backend
//! (`LAGROUTER_TEST_BACKEND=docker`) and print why they skip without it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lagrouter_testing::{BackendKind, PgCluster, default_backend};
use tokio_postgres::Client;

use crate::failover::{Log, first_value, ids_on, proxy_index, read_back, writer};
use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(30);
/// The proxy's default `routing.probe_timeout`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Scheduling slack on top of the probe timeout for "ejected in time".
const SLACK: Duration = Duration::from_millis(500);

/// Whether the Docker backend is in use; prints why the test skips if not.
fn docker_in_use() -> bool {
    let backend = default_backend().expect("LAGROUTER_TEST_BACKEND");
    if backend != BackendKind::Docker {
        eprintln!(
            "skipped: container faults need the Docker backend (this run uses the {backend} one; \
             LAGROUTER_TEST_BACKEND=docker runs them)"
        );
    }
    backend == BackendKind::Docker
}

/// The harness node that answered: `0` for a primary, else the standby's
/// index from the application name the harness gives its WAL receiver.
async fn served_by(c: &Client) -> Result<usize, tokio_postgres::Error> {
    let msgs = c
        .simple_query(
            "SELECT CASE WHEN pg_is_in_recovery() \
             THEN substring(current_setting('primary_conninfo') FROM 'application_name=node([0-9]+)') \
             ELSE 'primary' END",
        )
        .await?;
    let v = first_value(&msgs).unwrap_or_default();
    Ok(v.parse().unwrap_or(0))
}

/// Readers on their own connections, counting reads per node and errors.
#[derive(Default)]
struct Readers {
    stop: AtomicBool,
    reads: AtomicU64,
    served: [AtomicU64; 3],
    slowest_ms: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Readers {
    async fn start(env: &Env, n: usize) -> (Arc<Readers>, Vec<tokio::task::JoinHandle<()>>) {
        let r = Arc::new(Readers::default());
        let mut tasks = Vec::new();
        for _ in 0..n {
            let c = env.connect().await;
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                while !r.stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match tokio::time::timeout(DEADLINE, served_by(&c)).await {
                        Ok(Ok(node)) => {
                            r.reads.fetch_add(1, Ordering::Relaxed);
                            r.served[node].fetch_add(1, Ordering::Relaxed);
                            let took = started.elapsed().as_millis() as u64;
                            r.slowest_ms.fetch_max(took, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => r.errors.lock().unwrap().push(e.to_string()),
                        Err(_) => r.errors.lock().unwrap().push("a read hung".into()),
                    }
                }
            }));
        }
        (r, tasks)
    }

    async fn more(self: &Arc<Self>, node: Option<usize>, n: u64) {
        let count = |r: &Readers| match node {
            Some(i) => r.served[i].load(Ordering::Relaxed),
            None => r.reads.load(Ordering::Relaxed),
        };
        let target = count(self) + n;
        wait_until(DEADLINE, &format!("{n} more reads on {node:?}"), || async {
            count(self) >= target
        })
        .await;
    }

    async fn stop(self: &Arc<Self>, tasks: Vec<tokio::task::JoinHandle<()>>) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            tokio::time::timeout(DEADLINE, t)
                .await
                .expect("readers stop")
                .unwrap();
        }
        self.errors.lock().unwrap().clone()
    }
}

/// Cuts `victim` off as `cut` does, checks it is ejected within the probe
/// timeout while reads go on without error, undoes it with `restore` and
/// checks it is re-admitted and serves reads again. Returns (ejected after,
/// re-admitted after, reads, slowest read in ms).
async fn eject_and_readmit<C, R, CF, RF>(
    env: &Env,
    victim: usize,
    cut: C,
    restore: R,
) -> (Duration, Duration, u64, u64)
where
    C: FnOnce() -> CF,
    CF: std::future::Future<Output = ()>,
    R: FnOnce() -> RF,
    RF: std::future::Future<Output = ()>,
{
    let (readers, tasks) = Readers::start(env, 4).await;
    readers.more(Some(victim), 20).await;
    let started = Instant::now();
    cut().await;
    let proxy = &env.proxy;
    wait_until(
        PROBE_TIMEOUT + SLACK,
        "the node ejected within the probe timeout",
        || async { !proxy.topology().nodes[victim].healthy },
    )
    .await;
    let ejected = started.elapsed();
    readers.more(None, 300).await;
    let restored = Instant::now();
    restore().await;
    wait_until(DEADLINE, "the node re-admitted", || async {
        proxy.topology().nodes[victim].healthy
    })
    .await;
    let readmitted = restored.elapsed();
    readers.more(Some(victim), 20).await;
    let errors = readers.stop(tasks).await;
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    (
        ejected,
        readmitted,
        readers.reads.load(Ordering::Relaxed),
        readers.slowest_ms.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_the_network_is_ejected_and_readmitted_without_client_errors() {
    if !docker_in_use() {
        return;
    }
    let env = start(2).await;
    let victim = env.cluster.replicas()[0];
    let pg = &env.cluster;
    let (ejected, readmitted, reads, _) = eject_and_readmit(
        &env,
        victim,
        || async { pg.isolate_node(victim).await.unwrap() },
        || async { pg.reconnect_node(victim).await.unwrap() },
    )
    .await;
    lagrouter_testing::report(format_args!(
        "proxy, container cut off the network: ejected {ejected:?} after `docker network \
         disconnect` (probe timeout {PROBE_TIMEOUT:?}); re-admitted {readmitted:?} after \
         reconnecting; {reads} reads, 0 errors"
    ));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_container_is_ejected_within_the_probe_timeout_and_reads_move_on() {
    if !docker_in_use() {
        return;
    }
    let env = start(2).await;
    let victim = env.cluster.replicas()[0];
    let pg = &env.cluster;
    let (ejected, readmitted, reads, slowest) = eject_and_readmit(
        &env,
        victim,
        || async { pg.freeze_node(victim).await.unwrap() },
        || async { pg.thaw_node(victim).await.unwrap() },
    )
    .await;
    lagrouter_testing::report(format_args!(
        "proxy, frozen container (docker pause): ejected {ejected:?} after the freeze (probe \
         timeout {PROBE_TIMEOUT:?}); reads in flight on it moved to another node, slowest read \
         {slowest} ms; re-admitted {readmitted:?} after the thaw; {reads} reads, 0 errors"
    ));
    env.stop().await;
}

/// Whether a query on `c` was answered by a replica, and its value.
async fn in_recovery_and(c: &Client, sql: &str) -> (bool, String) {
    let msgs = c
        .simple_query(&format!(
            "SELECT pg_is_in_recovery()::text || ' ' || ({sql})::text"
        ))
        .await
        .unwrap();
    let v = first_value(&msgs).unwrap();
    let (r, value) = v.split_once(' ').unwrap();
    (r == "true", value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_partitioned_from_its_replicas_keeps_serving_through_the_primary() {
    if !docker_in_use() {
        return;
    }
    let env = start(2).await;
    let pg = &env.cluster;
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE pt(id int PRIMARY KEY); INSERT INTO pt VALUES (1)")
        .await
        .unwrap();
    wait_until(
        DEADLINE,
        "a read of the write served by a replica",
        || async {
            in_recovery_and(&c, "EXISTS (SELECT 1 FROM pt WHERE id = 1)").await
                == (true, "true".into())
        },
    )
    .await;
    let proxy = &env.proxy;
    let replicas = pg.replicas();
    let stop = AtomicBool::new(false);
    // Samples the proxy's topology while the body runs: a replica that
    // answers probes is never ejected for its lag.
    let watcher = async {
        let mut unhealthy = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = proxy.topology();
            for &r in &replicas {
                if !t.nodes[r].healthy {
                    unhealthy.push(format!("{:?}", t.nodes[r]));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        unhealthy
    };
    let body = async {
        let waits0 = env
            .metric("lagrouter_proxy_fallbacks_total", "wait_timeout")
            .await;
        let cut = Instant::now();
        pg.partition_from_peers(pg.primary()).await.unwrap();
        for id in 2..22 {
            c.batch_execute(&format!("INSERT INTO pt VALUES ({id})"))
                .await
                .unwrap();
            let started = Instant::now();
            let got =
                in_recovery_and(&c, &format!("EXISTS (SELECT 1 FROM pt WHERE id = {id})")).await;
            assert_eq!(
                got,
                (false, "true".into()),
                "read-your-writes served by the primary"
            );
            assert!(
                started.elapsed() >= Duration::from_millis(100),
                "after max_wait"
            );
        }
        let eventual = env.connect().await;
        eventual
            .batch_execute("SET lagrouter.consistency = 'eventual'")
            .await
            .unwrap();
        assert_eq!(
            in_recovery_and(&eventual, "(SELECT count(*) FROM pt)").await,
            (true, "1".into()),
            "eventual reads stay on the stale replicas"
        );
        wait_until(DEADLINE, "the replicas' lag to pass 500 ms", || async {
            let t = proxy.topology();
            replicas.iter().all(|&r| {
                t.nodes[r]
                    .lag
                    .is_some_and(|l| l > Duration::from_millis(500))
            })
        })
        .await;
        let bounded = env.connect().await;
        bounded
            .batch_execute("SET lagrouter.consistency = 'bounded-staleness 500ms'")
            .await
            .unwrap();
        assert_eq!(
            in_recovery_and(&bounded, "(SELECT count(*) FROM pt)").await,
            (false, "21".into()),
            "bounded-staleness reads move to the primary"
        );
        let partitioned_for = cut.elapsed();
        assert!(
            env.metric("lagrouter_proxy_fallbacks_total", "wait_timeout")
                .await
                >= waits0 + 20.0
        );

        let healed = Instant::now();
        pg.reconnect_node(pg.primary()).await.unwrap();
        let lsn = pg.current_lsn().await.unwrap();
        for r in pg.replicas() {
            pg.wait_for_replay(r, lsn, DEADLINE).await.unwrap();
        }
        let caught_up = healed.elapsed();
        c.batch_execute("INSERT INTO pt VALUES (100)")
            .await
            .unwrap();
        wait_until(
            DEADLINE,
            "reads of fresh writes back on a replica",
            || async {
                in_recovery_and(&c, "EXISTS (SELECT 1 FROM pt WHERE id = 100)").await
                    == (true, "true".into())
            },
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        (partitioned_for, caught_up)
    };
    let (unhealthy, (partitioned_for, caught_up)) = tokio::join!(watcher, body);
    assert!(
        unhealthy.is_empty(),
        "a partitioned replica was ejected: {unhealthy:#?}"
    );
    lagrouter_testing::report(format_args!(
        "proxy, primary partitioned from its replicas for {partitioned_for:?}: 0 errors, \
         read-your-writes served by the primary after max_wait, replicas never ejected; caught up \
         {caught_up:?} after the partition healed"
    ));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_across_containers_resumes_writes_and_reports_lost_ones() {
    if !docker_in_use() {
        return;
    }
    let env = start_with(PgCluster::builder().replicas(2), |c| {
        add_trust_user(c);
        c.routing.max_wait = Duration::from_millis(200);
    })
    .await;
    let pg = &env.cluster;
    let old = pg.primary();
    env.connect()
        .await
        .batch_execute("CREATE TABLE items(id int PRIMARY KEY)")
        .await
        .unwrap();
    pg.wait_caught_up(DEADLINE).await.unwrap();

    let log = Arc::new(Log::default());
    let task = tokio::spawn(writer(raw_conn_str(env.addr()), log.clone()));
    log.wait_acks(20).await;
    let replicated = log.acked();
    let lsn = pg.current_lsn().await.unwrap();
    for r in pg.replicas() {
        pg.wait_for_replay(r, lsn, DEADLINE).await.unwrap();
    }
    pg.partition_from_peers(old).await.unwrap();
    let at_cut = log.acked();
    log.wait_acks(at_cut + 20).await;

    let target = pg.most_advanced_replica(DEADLINE).await.unwrap();
    let ti = proxy_index(&env, target);
    // Killed, not stopped: a fast shutdown waits for the WAL senders to
    // reach the partitioned standbys, up to wal_sender_timeout (60 s).
    pg.kill_node(old).await.unwrap();
    wait_until(DEADLINE, "a write to fail", || async {
        !log.failures.lock().unwrap().is_empty()
    })
    .await;
    let first_failure = log.failures.lock().unwrap()[0].at;
    let promote_called = Instant::now();
    pg.promote(target).await.unwrap();
    let proxy = &env.proxy;
    wait_until(DEADLINE, "the proxy to follow the promotion", || async {
        proxy.topology().primary == Some(ti)
    })
    .await;
    let detected = promote_called.elapsed();
    log.wait_ack_after(promote_called, "a write acknowledged by the new primary")
        .await;
    let (acks, failures) = log.finish(task, 20).await;
    for f in &failures {
        assert!(
            f.code.starts_with("08") || f.code.starts_with("57P"),
            "{}: {}",
            f.code,
            f.error
        );
    }
    let first_success = acks
        .iter()
        .find(|a| a.at > first_failure)
        .expect("checked")
        .at;
    let present = ids_on(pg, target).await;
    let lost: HashSet<i32> = acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.len() >= 20,
        "the writes after the partition are lost: {lost:?}"
    );
    assert!(acks[..replicated].iter().all(|a| present.contains(&a.id)));
    let mut reported = HashSet::new();
    for a in &acks {
        match read_back(&env, a.id, &a.token).await {
            Ok(true) => {}
            Ok(false) => panic!("write {} is silently missing", a.id),
            Err((code, _)) if code == "55000" => {
                reported.insert(a.id);
            }
            Err(e) => panic!("reading write {} back: {e:?}", a.id),
        }
    }
    assert_eq!(reported, lost, "reported lost vs actually lost");
    lagrouter_testing::report(format_args!(
        "proxy, failover across containers: new primary in the proxy's topology {detected:?} \
         after pg_promote was called; writes failed for {:?} (first failure to first write \
         acknowledged by the new primary), no restart; {} writes acknowledged, {} lost and all \
         reported (55000)",
        first_success - first_failure,
        acks.len(),
        lost.len()
    ));
    env.stop().await;
}
