//! Failover: a replica is promoted while writes keep coming. lagrouter
//! follows the new primary without a restart, and every acknowledged write
//! is either readable with its token or reported lost (`TokenAhead`), never
//! silently missing. Each test starts its own PostgreSQL cluster.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    DEADLINE, cluster, counters, eventually, ids_on, node_index, start_pg, wait_topology,
};
use lagrouter::{Cluster, Consistency, ConsistencyToken, Error, Fallback, Role};
use lagrouter_testing::PgCluster;
use tokio::time::timeout;

const RYW: Consistency = Consistency::ReadYourWrites {
    max_wait: Duration::from_millis(200),
    then: Fallback::Primary,
};

/// An acknowledged write: its id, the session token after it, and when the
/// acknowledgement arrived.
#[derive(Clone, Copy, Debug)]
struct Ack {
    id: i32,
    token: ConsistencyToken,
    at: Instant,
}

/// A failed write: when it returned, how long it took, its SQLSTATE.
#[derive(Clone, Debug)]
struct Failure {
    at: Instant,
    took: Duration,
    code: Option<String>,
    error: String,
}

/// A writer inserting one row per statement, as fast as it can, retrying
/// after a short back-off when a write fails (as an application would).
#[derive(Default)]
struct Writer {
    stop: AtomicBool,
    acks: Mutex<Vec<Ack>>,
    failures: Mutex<Vec<Failure>>,
    hung: AtomicU64,
}

impl Writer {
    fn start(cluster: &Cluster) -> (Arc<Writer>, tokio::task::JoinHandle<()>) {
        let w = Arc::new(Writer::default());
        let task = {
            let (cluster, w) = (cluster.clone(), w.clone());
            tokio::spawn(async move {
                let mut s = cluster.session();
                let mut id = 0;
                while !w.stop.load(Ordering::Relaxed) {
                    id += 1;
                    let start = Instant::now();
                    let r = timeout(
                        Duration::from_secs(5),
                        s.execute("INSERT INTO items VALUES ($1, 'w')", &[&id]),
                    )
                    .await;
                    match r {
                        Ok(Ok(_)) => w.acks.lock().unwrap().push(Ack {
                            id,
                            token: s.token().expect("a write yields a token"),
                            at: Instant::now(),
                        }),
                        Ok(Err(e)) => {
                            w.failures.lock().unwrap().push(Failure {
                                at: Instant::now(),
                                took: start.elapsed(),
                                code: e.code().map(str::to_string),
                                error: e.to_string(),
                            });
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(_) => {
                            w.hung.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        (w, task)
    }

    fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    async fn wait_acks(self: &Arc<Self>, n: usize) {
        eventually(&format!("{n} acknowledged writes"), || {
            let w = self.clone();
            async move { w.acked() >= n }
        })
        .await;
    }

    /// Waits for the first failure and returns it (polling every
    /// millisecond: the failover is timed from it).
    async fn first_failure(self: &Arc<Self>) -> Failure {
        let start = Instant::now();
        loop {
            if let Some(f) = self.failures.lock().unwrap().first() {
                return f.clone();
            }
            assert!(start.elapsed() < DEADLINE, "no write failed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits for the first acknowledgement after `t` and returns it.
    async fn first_ack_after(self: &Arc<Self>, t: Instant) -> Ack {
        eventually("a write acknowledged by the new primary", || {
            let w = self.clone();
            async move { w.acks.lock().unwrap().iter().any(|a| a.at > t) }
        })
        .await;
        *self
            .acks
            .lock()
            .unwrap()
            .iter()
            .find(|a| a.at > t)
            .expect("checked")
    }
}

/// Records when the monitor first publishes node `index` as the primary.
fn watch_primary(cluster: &Cluster, index: usize) -> Arc<Mutex<Option<Instant>>> {
    let seen: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut rx = cluster.monitor().subscribe();
    let s = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            if rx.borrow_and_update().primary == Some(index) {
                *s.lock().unwrap() = Some(Instant::now());
                break;
            }
        }
    });
    seen
}

/// A lagrouter cluster over `pg` connecting as `app`, a user without the
/// right to read server files (so without the timeline history).
async fn unprivileged_cluster(pg: &PgCluster) -> Cluster {
    let c = pg.connect(pg.primary()).await.unwrap();
    c.batch_execute("CREATE ROLE app LOGIN PASSWORD 'app'; GRANT SELECT, INSERT ON items TO app")
        .await
        .unwrap();
    pg.wait_caught_up(DEADLINE).await.unwrap();
    let app = |node: usize| {
        let mut config = pg.config(node);
        config.user("app").password("app");
        config
    };
    let mut b = Cluster::builder()
        .primary(app(pg.primary()))
        .monitor_interval(Duration::from_millis(20))
        .policy(RYW);
    for r in pg.replicas() {
        b = b.named_replica(format!("replica{r}"), app(r));
    }
    let cluster = b.build().await.unwrap();
    wait_topology(&cluster, |t| {
        t.cluster.is_some() && t.nodes.iter().all(|n| n.healthy)
    })
    .await;
    cluster
}

/// What reading an acknowledged write back with its token gave.
#[derive(Debug, Default)]
struct Verdicts {
    /// The row is there.
    found: Vec<i32>,
    /// `TokenAhead`: reported lost.
    reported_lost: Vec<i32>,
    /// Served, but the row is missing: a silent loss (must never happen).
    silently_missing: Vec<i32>,
    /// Any other error.
    errors: Vec<(i32, String)>,
}

/// Reads every acknowledged write back through lagrouter with its token.
async fn verify(cluster: &Cluster, acks: &[Ack], policy: Consistency) -> Verdicts {
    let mut v = Verdicts::default();
    for a in acks {
        let mut s = cluster.session().with_policy(policy).with_token(a.token);
        let r = timeout(
            Duration::from_secs(5),
            s.query_opt("SELECT 1 FROM items WHERE id = $1", &[&a.id]),
        )
        .await
        .expect("token-gated read hung");
        match r {
            Ok(Some(_)) => v.found.push(a.id),
            Ok(None) => v.silently_missing.push(a.id),
            Err(e @ Error::TokenAhead { .. }) => {
                assert_eq!(e.code(), Some("55000"));
                v.reported_lost.push(a.id);
            }
            Err(e) => v.errors.push((a.id, e.to_string())),
        }
    }
    v
}

/// Asynchronous-replication failover: writes acknowledged by the old
/// primary after the standbys stopped receiving WAL are lost. lagrouter
/// detects the promoted replica, routes writes there, and reports every
/// lost write's token as `TokenAhead` — also once the new timeline's WAL
/// has passed the token's position (timeline switch point).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_routes_writes_to_the_promoted_replica_and_reports_lost_writes() {
    counters::install();
    let pg = start_pg(2).await;
    let old_primary = pg.primary();
    let (r1, r2) = (pg.replicas()[0], pg.replicas()[1]);
    let (r1i, r2i) = (node_index(&pg, r1), node_index(&pg, r2));
    let cluster = cluster(&pg, |b| b.policy(RYW).pool_timeout(Duration::from_secs(2))).await;
    // A second lagrouter whose user may not read the timeline history.
    let unprivileged = unprivileged_cluster(&pg).await;
    let ahead0 = counters::get("lagrouter_tokens_ahead_total");
    let changes0 = counters::get("lagrouter_primary_changes_total");

    let (writer, task) = Writer::start(&cluster);
    writer.wait_acks(20).await;
    // These reached both standbys.
    let replicated = writer.acked();
    let last_replicated = writer.acks.lock().unwrap()[replicated - 1].token;
    for r in [r1, r2] {
        pg.wait_for_replay(r, last_replicated.lsn, DEADLINE)
            .await
            .unwrap();
    }
    // The standbys stop receiving WAL (r2 first, so it stays behind r1 and
    // can follow r1's new timeline); the writes acknowledged from now on
    // exist only on the old primary.
    pg.stop_wal_receiver(r2).await.unwrap();
    pg.stop_wal_receiver(r1).await.unwrap();
    let at_cut = writer.acked();
    writer.wait_acks(at_cut + 20).await;

    // The primary dies; writes fail fast until a replica is promoted.
    let switched = watch_primary(&cluster, r1i);
    pg.kill_node(old_primary).await.unwrap();
    let first_failure = writer.first_failure().await;
    let promote_start = Instant::now();
    pg.promote(r1).await.unwrap();
    let promoted = Instant::now();
    let topo = cluster
        .monitor()
        .wait_for(Duration::from_secs(2), |t| t.primary == Some(r1i))
        .await
        .expect("the promoted replica is detected within 2 s");
    let switched = switched.lock().unwrap().expect("switch seen");
    assert_eq!(topo.nodes[r1i].role, Role::Primary);
    assert_eq!(topo.cluster.map(|c| c.timeline), Some(2));
    let first_success = writer.first_ack_after(first_failure.at).await;
    assert_eq!(first_success.token.cluster.timeline, 2);
    let recovered = writer.acked();
    writer.wait_acks(recovered + 20).await;
    writer.stop.store(true, Ordering::Relaxed);
    timeout(DEADLINE, task)
        .await
        .expect("writer stops")
        .unwrap();

    let acks = writer.acks.lock().unwrap().clone();
    let failures = writer.failures.lock().unwrap().clone();
    assert_eq!(writer.hung.load(Ordering::Relaxed), 0, "a write hung");
    for f in &failures {
        let code = f.code.as_deref().unwrap_or("");
        assert!(
            code.starts_with("08") || code.starts_with("57P"),
            "a write failed with {code:?}: {}",
            f.error
        );
        assert!(
            f.took < Duration::from_secs(2),
            "a write took {:?} to fail",
            f.took
        );
    }
    let slowest_failure = failures.iter().map(|f| f.took).max().unwrap_or_default();

    // Which acknowledged writes the new primary lacks.
    // What opening a connection costs here (SCRAM in a debug build): the
    // first write on the promoted node pays it when its pool is empty.
    let t = Instant::now();
    drop(pg.connect(r1).await.unwrap());
    let connect_took = t.elapsed();
    let present = ids_on(&pg, r1).await;
    let lost: Vec<i32> = acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.len() >= 20,
        "expected the writes after the cut to be lost: {lost:?}"
    );
    assert!(
        acks[..replicated].iter().all(|a| present.contains(&a.id)),
        "a replicated write was lost"
    );

    // Every acknowledged write reads back or is reported lost.
    let v = verify(&cluster, &acks, RYW).await;
    assert!(
        v.silently_missing.is_empty(),
        "silently lost: {:?}",
        v.silently_missing
    );
    assert!(v.errors.is_empty(), "errors: {:?}", v.errors);
    let reported: HashSet<i32> = v.reported_lost.iter().copied().collect();
    assert!(
        lost.iter().all(|id| reported.contains(id)),
        "lost {lost:?}, reported {reported:?}"
    );

    // Without the timeline history (no superuser), a lost token is still
    // reported while it is ahead of the new primary's position; one the new
    // timeline has already passed can no longer be told from a valid one.
    let topo = unprivileged
        .monitor()
        .wait_for(Duration::from_secs(2), |t| t.primary == Some(r1i))
        .await
        .expect("the unprivileged monitor follows the promotion");
    assert!(topo.timeline_history.is_empty());
    let lost_acks: Vec<Ack> = acks
        .iter()
        .filter(|a| reported.contains(&a.id))
        .copied()
        .collect();
    let u = verify(&unprivileged, &lost_acks, RYW).await;
    let primary_then = unprivileged.topology().primary_lsn.unwrap();
    assert!(u.errors.is_empty(), "{u:?}");
    for id in &u.silently_missing {
        let a = lost_acks.iter().find(|a| a.id == *id).unwrap();
        assert!(
            a.token.lsn <= primary_then,
            "lost write {id} ahead of the primary was not reported"
        );
    }
    let unprivileged_reported = u.reported_lost.len();

    // Push the new timeline past every lost token: the LSNs alone no longer
    // tell; the timeline switch point does.
    let topo = cluster.topology();
    let switch = topo
        .timeline_history
        .iter()
        .find(|(tli, _)| *tli == 1)
        .map(|&(_, lsn)| lsn)
        .expect("the new primary's timeline history is known");
    let max_lost = lost_acks.iter().map(|a| a.token.lsn).max().unwrap();
    assert!(max_lost > switch);
    let c = pg.connect(r1).await.unwrap();
    let mut filler = 1_000_000;
    while pg.current_lsn().await.unwrap() <= max_lost {
        filler += 1;
        c.execute("INSERT INTO items VALUES ($1, 'filler')", &[&filler])
            .await
            .unwrap();
        c.batch_execute("SELECT pg_switch_wal()").await.unwrap();
    }
    let target = pg.current_lsn().await.unwrap();
    // r2 follows the new timeline and replays past the lost positions.
    pg.wait_for_replay(r2, target, Duration::from_secs(10))
        .await
        .unwrap();
    let topo = wait_topology(&cluster, |t| {
        t.nodes[r2i].healthy && t.nodes[r2i].lsn.is_some_and(|l| l > max_lost)
    })
    .await;
    assert!(topo.primary_lsn.is_some_and(|p| p > max_lost));
    for policy in [
        RYW,
        Consistency::ReadYourWrites {
            max_wait: Duration::from_millis(200),
            then: Fallback::Error,
        },
    ] {
        let v2 = verify(&cluster, &lost_acks, policy).await;
        assert_eq!(v2.reported_lost.len(), lost_acks.len(), "{v2:?}");
    }
    // Older tokens of surviving writes still work, on a replica.
    let survivor = acks.iter().find(|a| !reported.contains(&a.id)).unwrap();
    let mut s = cluster.session().with_token(survivor.token);
    assert!(
        s.query_opt("SELECT 1 FROM items WHERE id = $1", &[&survivor.id])
            .await
            .unwrap()
            .is_some()
    );
    assert!(counters::get("lagrouter_tokens_ahead_total") >= ahead0 + 3 * reported.len() as u64);
    assert!(counters::get("lagrouter_primary_changes_total") > changes0);

    lagrouter_testing::report(format_args!(
        "failover (asynchronous, {} acknowledged writes): recovery {:?} from the first failed write \
         to the first write acknowledged by the promoted replica (failure -> promote call {:?}; \
         promote call -> lagrouter's topology switch {:?}, of which pg_promote + repointing the \
         other standby took {:?} in all; switch -> first acknowledged write {:?}); {} failed writes \
         (slowest {slowest_failure:?}; a new connection takes {connect_took:?}); lost writes: {} (all reported as TokenAhead; {} reported in \
         all, {} conservatively; without the timeline history {unprivileged_reported} of them were \
         reported); timeline 1 ends at {switch}, last lost token {max_lost}",
        acks.len(),
        first_success.at - first_failure.at,
        promote_start - first_failure.at,
        switched - promote_start,
        promoted - promote_start,
        first_success.at.saturating_duration_since(switched),
        failures.len(),
        lost.len(),
        reported.len(),
        reported.len() - lost.len(),
    ));
}

/// A clean switchover (fast shutdown sends all WAL to the standbys): no
/// acknowledged write is lost, no read fails, and the old primary rejoins as
/// a replica that lagrouter routes reads to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_loses_nothing_and_the_old_primary_rejoins_as_a_replica() {
    let pg = start_pg(2).await;
    let old_primary = pg.primary();
    let r1 = pg.replicas()[0];
    let r1i = node_index(&pg, r1);
    let cluster = cluster(&pg, |b| b.policy(RYW)).await;

    // Readers of every kind run throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let read_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let readers: Vec<_> = [RYW, RYW, Consistency::Eventual]
        .into_iter()
        .map(|policy| {
            let (cluster, stop, reads, read_errors) = (
                cluster.clone(),
                stop.clone(),
                reads.clone(),
                read_errors.clone(),
            );
            tokio::spawn(async move {
                let mut s = cluster.session().with_policy(policy);
                while !stop.load(Ordering::Relaxed) {
                    match timeout(DEADLINE, s.query("SELECT count(*) FROM items", &[])).await {
                        Ok(Ok(_)) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => read_errors.lock().unwrap().push(e.to_string()),
                        Err(_) => read_errors.lock().unwrap().push("read hung".into()),
                    }
                }
            })
        })
        .collect();

    let (writer, task) = Writer::start(&cluster);
    writer.wait_acks(20).await;
    let switched = watch_primary(&cluster, r1i);
    pg.stop_node(old_primary).await.unwrap();
    let first_failure = writer.first_failure().await;
    let reads_at_stop = reads.load(Ordering::Relaxed);
    let promote_start = Instant::now();
    pg.promote(r1).await.unwrap();
    cluster
        .monitor()
        .wait_for(Duration::from_secs(2), |t| t.primary == Some(r1i))
        .await
        .expect("the promoted replica is detected within 2 s");
    let switched = switched.lock().unwrap().expect("switch seen");
    let first_success = writer.first_ack_after(first_failure.at).await;
    let recovered = writer.acked();
    writer.wait_acks(recovered + 20).await;
    writer.stop.store(true, Ordering::Relaxed);
    timeout(DEADLINE, task)
        .await
        .expect("writer stops")
        .unwrap();
    let acks = writer.acks.lock().unwrap().clone();
    assert_eq!(writer.hung.load(Ordering::Relaxed), 0, "a write hung");

    let present = ids_on(&pg, r1).await;
    let lost: Vec<i32> = acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "a clean switchover lost {lost:?}");
    let v = verify(&cluster, &acks, RYW).await;
    assert_eq!(v.found.len(), acks.len(), "{v:?}");

    // The old primary comes back as a standby of the new one and serves
    // reads once it has caught up.
    pg.rejoin_as_standby(old_primary).await.unwrap();
    wait_topology(&cluster, |t| {
        t.nodes[0].role == Role::Replica && t.nodes[0].healthy
    })
    .await;
    let mut s = cluster.session().with_policy(Consistency::Eventual);
    let start = Instant::now();
    loop {
        s.query("SELECT 1", &[]).await.unwrap();
        if s.last_served().unwrap().node == 0 {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the rejoined node serves no reads"
        );
    }

    stop.store(true, Ordering::Relaxed);
    for r in readers {
        timeout(DEADLINE, r).await.expect("reader stops").unwrap();
    }
    let read_errors = read_errors.lock().unwrap().clone();
    lagrouter_testing::report(format_args!(
        "switchover (clean shutdown, {} acknowledged writes): recovery {:?} from the first failed \
         write to the first write acknowledged by the promoted replica (failure -> promote call {:?}; \
         promote call -> topology switch {:?}; switch -> first acknowledged write {:?}); lost \
         writes: 0; {} reads ({} during and after the switchover), {} read errors",
        acks.len(),
        first_success.at - first_failure.at,
        promote_start - first_failure.at,
        switched - promote_start,
        first_success.at.saturating_duration_since(switched),
        reads.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed) - reads_at_stop,
        read_errors.len(),
    ));
    assert!(read_errors.is_empty(), "read errors: {read_errors:#?}");
}
