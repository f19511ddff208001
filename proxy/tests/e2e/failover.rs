//! Failover through the proxy: the primary dies after the standbys stopped
//! receiving WAL, a replica is promoted, and the proxy follows it without a
//! restart. Every write a client saw acknowledged is either readable with
//! its token or reported lost (SQLSTATE 55000), never silently missing. The
//! old primary then rejoins as a standby and serves reads again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use lagrouter_testing::PgCluster;
use tokio_postgres::SimpleQueryMessage;

const DEADLINE: Duration = Duration::from_secs(30);

/// A write the proxy acknowledged, with the session token after it.
#[derive(Clone, Debug)]
pub(crate) struct Ack {
    pub(crate) id: i32,
    pub(crate) token: String,
    pub(crate) at: Instant,
}

/// A write that failed: how long it took and its SQLSTATE.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub(crate) at: Instant,
    pub(crate) took: Duration,
    pub(crate) code: String,
    pub(crate) error: String,
}

#[derive(Default)]
pub(crate) struct Log {
    pub(crate) acks: Mutex<Vec<Ack>>,
    pub(crate) failures: Mutex<Vec<Failure>>,
    pub(crate) stop: AtomicBool,
}

impl Log {
    pub(crate) fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    pub(crate) async fn wait_acks(&self, n: usize) {
        wait_until(DEADLINE, &format!("{n} acknowledged writes"), || async {
            self.acked() >= n
        })
        .await;
    }

    /// Waits for a write acknowledged after `t`.
    pub(crate) async fn wait_ack_after(&self, t: Instant, what: &str) {
        wait_until(DEADLINE, what, || async {
            self.acks.lock().unwrap().last().is_some_and(|a| a.at > t)
        })
        .await;
    }

    /// Lets `more` further writes be acknowledged, stops the writer `task`
    /// and returns every acknowledged and failed write.
    pub(crate) async fn finish(
        &self,
        task: tokio::task::JoinHandle<()>,
        more: usize,
    ) -> (Vec<Ack>, Vec<Failure>) {
        self.wait_acks(self.acked() + more).await;
        self.stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("writer stops")
            .unwrap();
        (
            self.acks.lock().unwrap().clone(),
            self.failures.lock().unwrap().clone(),
        )
    }
}

/// The ids in the `items` table of `node` (the writer's rows).
pub(crate) async fn ids_on(pg: &PgCluster, node: usize) -> HashSet<i32> {
    pg.connect(node)
        .await
        .unwrap()
        .query("SELECT id FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

pub(crate) fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// One client writing through the proxy in a loop; it reconnects when the
/// proxy closes its connection (a write in flight on a dying primary).
pub(crate) async fn writer(conn: String, log: Arc<Log>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut id = 0;
    while !log.stop.load(Ordering::Relaxed) {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                client = Some(connect(&conn).await);
                client.as_ref().unwrap()
            }
        };
        id += 1;
        let started = Instant::now();
        let write = tokio::time::timeout(
            Duration::from_secs(10),
            c.simple_query(&format!("INSERT INTO items VALUES ({id})")),
        )
        .await
        .expect("a write hung");
        match write {
            Ok(_) => {
                let token = first_value(&c.simple_query("SHOW lagrouter.token").await.unwrap())
                    .expect("a token after a write");
                log.acks.lock().unwrap().push(Ack {
                    id,
                    token,
                    at: Instant::now(),
                });
            }
            Err(e) => {
                log.failures.lock().unwrap().push(Failure {
                    at: started,
                    took: started.elapsed(),
                    code: e.code().map(|c| c.code().to_string()).unwrap_or_default(),
                    error: e.to_string(),
                });
                // Writes fail fast while there is no primary: do not spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// The proxy's index of the harness node `node` (matched by port).
pub(crate) fn proxy_index(env: &Env, node: usize) -> usize {
    let port = env.cluster.config(node).get_ports()[0];
    env.proxy_config()
        .nodes
        .iter()
        .position(|n| n.port == port)
        .expect("node configured")
}

/// Reads `id` back on a fresh connection carrying `token`.
pub(crate) async fn read_back(env: &Env, id: i32, token: &str) -> Result<bool, (String, String)> {
    let c = connect(&raw_conn_str(env.addr())).await;
    c.batch_execute(&format!("SET lagrouter.min_token = '{token}'"))
        .await
        .map_err(|e| (String::new(), e.to_string()))?;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.simple_query(&format!("SELECT 1 FROM items WHERE id = {id}")),
    )
    .await
    .expect("a token-gated read hung");
    match r {
        Ok(msgs) => Ok(first_value(&msgs).is_some()),
        Err(e) => Err((
            e.code().map(|c| c.code().to_string()).unwrap_or_default(),
            e.to_string(),
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_replica_is_followed_and_lost_writes_are_reported() {
    let env = start_with(PgCluster::builder().replicas(2), |c| {
        add_trust_user(c);
        c.routing.max_wait = Duration::from_millis(200);
    })
    .await;
    let pg = &env.cluster;
    let old_primary = pg.primary();
    let (r1, r2) = (pg.replicas()[0], pg.replicas()[1]);
    let r1i = proxy_index(&env, r1);
    let setup = env.connect().await;
    setup
        .batch_execute("CREATE TABLE items(id int PRIMARY KEY)")
        .await
        .unwrap();
    pg.wait_caught_up(DEADLINE).await.unwrap();

    let log = Arc::new(Log::default());
    let task = tokio::spawn(writer(raw_conn_str(env.addr()), log.clone()));
    log.wait_acks(20).await;
    // Everything so far reached both standbys.
    let replicated = log.acked();
    let lsn = pg.current_lsn().await.unwrap();
    for r in [r1, r2] {
        pg.wait_for_replay(r, lsn, DEADLINE).await.unwrap();
    }
    // The standbys stop receiving WAL (r2 first, so it can follow r1's new
    // timeline); writes acknowledged from now on exist only on the primary.
    pg.stop_wal_receiver(r2).await.unwrap();
    pg.stop_wal_receiver(r1).await.unwrap();
    let at_cut = log.acked();
    log.wait_acks(at_cut + 20).await;

    // The primary dies. Writes fail fast with a connection-class error.
    pg.kill_node(old_primary).await.unwrap();
    wait_until(DEADLINE, "a write to fail", || async {
        !log.failures.lock().unwrap().is_empty()
    })
    .await;
    let first_failure = log.failures.lock().unwrap()[0].at;

    // Degraded mode: a token the replicas have is served; one they can
    // never reach gets a clear error, not a hang.
    let acks = log.acks.lock().unwrap().clone();
    let replicated_ack = &acks[replicated - 1];
    assert_eq!(
        read_back(&env, replicated_ack.id, &replicated_ack.token).await,
        Ok(true)
    );
    let newest = acks.last().unwrap();
    let (code, error) = read_back(&env, newest.id, &newest.token)
        .await
        .expect_err("no node has this write while the primary is down");
    assert!(
        code.starts_with("08") || code == "57014" || code == "55000",
        "{code}: {error}"
    );

    // A replica is promoted; the proxy routes writes there, no restart.
    let promoted_at = Instant::now();
    pg.promote(r1).await.unwrap();
    let proxy = &env.proxy;
    wait_until(DEADLINE, "the proxy to follow the promotion", || async {
        proxy.topology().primary == Some(r1i)
    })
    .await;
    let detected = promoted_at.elapsed();
    log.wait_ack_after(first_failure, "a write acknowledged after the failover")
        .await;
    let (acks, failures) = log.finish(task, 20).await;
    for f in &failures {
        assert!(
            f.code.starts_with("08") || f.code.starts_with("57P"),
            "a write failed with {:?}: {}",
            f.code,
            f.error
        );
        assert!(f.took < Duration::from_secs(5), "a write took {:?}", f.took);
    }
    let first_success = acks.iter().find(|a| a.at > first_failure).unwrap().at;

    // Which acknowledged writes the new primary lacks.
    let present = ids_on(pg, r1).await;
    let lost: Vec<i32> = acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.len() >= 20, "writes after the cut are lost: {lost:?}");
    assert!(
        acks[..replicated].iter().all(|a| present.contains(&a.id)),
        "a replicated write was lost"
    );

    // Every acknowledged write reads back, or is reported lost.
    let lib_ahead = env.metric("lagrouter_tokens_ahead_total", "").await;
    let (mut found, mut reported, mut silent, mut errors) = (0, Vec::new(), Vec::new(), Vec::new());
    for a in &acks {
        match read_back(&env, a.id, &a.token).await {
            Ok(true) => found += 1,
            Ok(false) => silent.push(a.id),
            Err((code, _)) if code == "55000" => reported.push(a.id),
            Err(e) => errors.push((a.id, e)),
        }
    }
    assert!(silent.is_empty(), "silently missing: {silent:?}");
    assert!(errors.is_empty(), "{errors:?}");
    let reported: HashSet<i32> = reported.into_iter().collect();
    let lost_set: HashSet<i32> = lost.iter().copied().collect();
    assert_eq!(reported, lost_set, "reported lost vs actually lost");
    assert_eq!(found, acks.len() - lost.len());

    // The metric shows it, under the proxy's name only: the library's
    // counter (shared by this process's recorder) did not count the same
    // events again. (Another test of this binary may count one of its own
    // meanwhile, hence "fewer", not "none".)
    assert!(env.metric("lagrouter_proxy_tokens_ahead_total", "").await >= lost.len() as f64);
    assert!(
        env.metric("lagrouter_tokens_ahead_total", "").await - lib_ahead < reported.len() as f64,
        "tokens ahead counted twice"
    );

    // The old primary comes back as a standby of the new one (pg_rewind):
    // the proxy re-admits it as a replica and sends it reads.
    let old_i = proxy_index(&env, old_primary);
    pg.rejoin_as_standby(old_primary).await.unwrap();
    wait_until(DEADLINE, "the old primary back as a replica", || async {
        let n = &proxy.topology().nodes[old_i];
        n.healthy && n.role == lagrouter::Role::Replica
    })
    .await;
    // Nodes are told apart by the application name the harness gives each
    // standby's WAL receiver (server ports are all 5432 on Docker).
    let old_name = format!("application_name=node{old_primary}");
    let reader = env.connect().await;
    wait_until(DEADLINE, "a read served by the rejoined node", || async {
        let msgs = reader
            .simple_query("SELECT current_setting('primary_conninfo')")
            .await
            .unwrap();
        first_value(&msgs).is_some_and(|c| c.contains(&old_name))
    })
    .await;

    lagrouter_testing::report(format_args!(
        "proxy failover: {} writes acknowledged, {} lost and all {} reported (55000), \
         {} failed writes (slowest {:?}); new primary in the proxy's topology {:?} after \
         pg_promote was called; recovery (first failed write to first write acknowledged after promotion) {:?}",
        acks.len(),
        lost.len(),
        lost_set.len(),
        failures.len(),
        failures.iter().map(|f| f.took).max().unwrap_or_default(),
        detected,
        first_success - first_failure,
    ));
    env.stop().await;
}
