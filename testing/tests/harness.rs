//! Tests of the PostgreSQL primary/replica test harness (`lagrouter-testing`).

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lagrouter::Lsn;
mod common;

use lagrouter_testing::{
    BackendKind, BackendRequest, HarnessError, NodeIndex, PgCluster, resolve_backend,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// The backend under test: `LAGROUTER_TEST_BACKEND` or auto-detection.
async fn start(replicas: usize) -> PgCluster {
    let started = Instant::now();
    let pg = PgCluster::start(replicas)
        .await
        .unwrap_or_else(|e| panic!("starting a cluster with {replicas} replicas: {e}"));
    eprintln!(
        "{} cluster with {replicas} replicas started in {:.2?}",
        pg.backend(),
        started.elapsed()
    );
    pg
}

fn accepts_connections(host: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{host}:{port}").parse().expect("socket address");
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

async fn count(pg: &PgCluster, node: NodeIndex, table: &str) -> i64 {
    let c = pg.connect(node).await.expect("connect");
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

async fn exists(pg: &PgCluster, node: NodeIndex, table: &str, id: i32) -> bool {
    let c = pg.connect(node).await.expect("connect");
    c.query_one(
        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1)"),
        &[&id],
    )
    .await
    .expect("exists query")
    .get(0)
}

/// Inserts `id` on the current primary and returns the primary's insert LSN.
async fn insert(pg: &PgCluster, table: &str, id: i32) -> Lsn {
    let c = pg.connect(pg.primary()).await.expect("connect to primary");
    c.execute(&format!("INSERT INTO {table} (id) VALUES ($1)"), &[&id])
        .await
        .expect("insert");
    pg.current_lsn().await.expect("current_lsn")
}

async fn create_table(pg: &PgCluster, table: &str) {
    let c = pg.connect(pg.primary()).await.expect("connect to primary");
    c.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .await
        .expect("create table");
}

/// The futures of `PgCluster` methods can be spawned on a multi-threaded
/// runtime (compile-time check).
fn assert_futures_are_send(pg: &PgCluster) {
    fn is_send<T: Send>(_: T) {}
    is_send(pg.connect(0));
    is_send(pg.pause_replay(1));
    is_send(pg.resume_replay(1));
    is_send(pg.set_apply_delay(1, Duration::ZERO));
    is_send(pg.stop_node(1));
    is_send(pg.kill_node(1));
    is_send(pg.start_node(1));
    is_send(pg.promote(1));
    is_send(pg.rejoin_as_standby(0));
    is_send(pg.replay_lsn(1));
    is_send(pg.current_lsn());
    is_send(pg.flush_lsn());
    is_send(pg.wait_for_replay(1, Lsn(0), DEADLINE));
    is_send(pg.wait_caught_up(DEADLINE));
    is_send(PgCluster::start(0));
}

#[tokio::test]
async fn writes_reach_both_replicas() {
    let pg = start(2).await;
    assert_futures_are_send(&pg);
    assert_eq!(pg.node_count(), 3);
    assert_eq!(pg.primary(), 0);
    assert_eq!(pg.replicas(), vec![1, 2]);
    for node in 0..3 {
        assert!(pg.is_running(node));
        let cs = pg.connection_string(node);
        assert!(
            cs.contains(&format!("port={}", pg.config(node).get_ports()[0])),
            "{cs}"
        );
        assert!(
            cs.contains("user=postgres") && cs.contains("dbname=postgres"),
            "{cs}"
        );
        let c = pg.connect(node).await.unwrap();
        let in_recovery: bool = c
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(in_recovery, node != 0, "node {node}");
    }
    // The connection string works with a plain parse, too.
    let cfg: tokio_postgres::Config = pg.connection_string(1).parse().unwrap();
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();

    assert_eq!(
        pg.replay_lsn(0).await.unwrap(),
        None,
        "primary never replayed"
    );
    create_table(&pg, "t").await;
    let lsn = insert(&pg, "t", 1).await;
    for node in pg.replicas() {
        pg.wait_for_replay(node, lsn, DEADLINE).await.unwrap();
        assert!(
            exists(&pg, node, "t", 1).await,
            "row visible on node {node}"
        );
        let replayed = pg
            .replay_lsn(node)
            .await
            .unwrap()
            .expect("standby replay LSN");
        assert!(
            replayed
                >= lsn.round_to_record_boundary(lagrouter::model::lsn::DEFAULT_WAL_SEGMENT_SIZE),
            "{replayed} < {lsn}"
        );
    }
    // Waiting on the primary itself is satisfied by its flush position.
    pg.wait_for_replay(0, lsn, DEADLINE).await.unwrap();
    pg.wait_caught_up(DEADLINE).await.unwrap();
    assert!(pg.log_tail(0, 20).contains("database system is ready"));
}

#[tokio::test]
async fn paused_replica_falls_behind_until_resumed() {
    let pg = start(2).await;
    create_table(&pg, "t").await;
    pg.wait_caught_up(DEADLINE).await.unwrap();

    pg.pause_replay(1).await.unwrap();
    let lsn = insert(&pg, "t", 7).await;
    pg.wait_for_replay(2, lsn, DEADLINE).await.unwrap();
    assert!(
        exists(&pg, 2, "t", 7).await,
        "visible on the running replica"
    );
    assert!(
        !exists(&pg, 1, "t", 7).await,
        "not visible on the paused replica"
    );
    assert!(pg.replay_lsn(1).await.unwrap().unwrap() < lsn);
    let err = pg
        .wait_for_replay(1, lsn, Duration::from_millis(300))
        .await
        .expect_err("a paused replica cannot catch up");
    assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
    // Still paused after the failed wait.
    assert!(!exists(&pg, 1, "t", 7).await);

    pg.resume_replay(1).await.unwrap();
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    assert!(exists(&pg, 1, "t", 7).await, "visible after resume");
}

#[tokio::test]
async fn apply_delay_makes_replay_lag() {
    let pg = start(1).await;
    create_table(&pg, "t").await;
    pg.wait_caught_up(DEADLINE).await.unwrap();

    let delay = Duration::from_millis(200);
    pg.set_apply_delay(1, delay).await.unwrap();
    let c = pg.connect(1).await.unwrap();
    let shown: String = c
        .query_one("SHOW recovery_min_apply_delay", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "200ms");

    let before_write = Instant::now();
    let lsn = insert(&pg, "t", 1).await;
    let replayed = pg.replay_lsn(1).await.unwrap().unwrap();
    // The commit is replayed no earlier than 200 ms after it happened; only
    // judge the immediate check if this machine was fast enough to make it
    // within that window.
    if before_write.elapsed() < Duration::from_millis(150) {
        assert!(
            replayed < lsn,
            "replayed {replayed} right after the write at {lsn}"
        );
        assert!(!exists(&pg, 1, "t", 1).await);
    }
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    let took = before_write.elapsed();
    assert!(
        took >= Duration::from_millis(190),
        "replay took only {took:?} despite a {delay:?} apply delay"
    );
    assert!(exists(&pg, 1, "t", 1).await);

    // Removing the delay again.
    pg.set_apply_delay(1, Duration::ZERO).await.unwrap();
    let lsn = insert(&pg, "t", 2).await;
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    assert!(exists(&pg, 1, "t", 2).await);
}

#[tokio::test]
async fn killed_replica_can_be_restarted() {
    let pg = start(1).await;
    create_table(&pg, "t").await;
    let port = pg.config(1).get_ports()[0];

    pg.kill_node(1).await.unwrap();
    assert!(!pg.is_running(1));
    assert!(
        pg.connect(1).await.is_err(),
        "connecting to a killed node fails"
    );
    assert!(!accepts_connections("127.0.0.1", port));
    assert!(matches!(
        pg.kill_node(1).await,
        Err(HarnessError::InvalidState { .. })
    ));
    // The primary keeps working meanwhile.
    let lsn = insert(&pg, "t", 1).await;

    pg.start_node(1).await.unwrap();
    assert!(pg.is_running(1));
    assert_eq!(pg.config(1).get_ports()[0], port, "same port after restart");
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    assert!(exists(&pg, 1, "t", 1).await);
    let lsn = insert(&pg, "t", 2).await;
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    assert_eq!(count(&pg, 1, "t").await, 2);

    // A clean stop and restart works as well, also for the primary.
    pg.stop_node(0).await.unwrap();
    assert!(pg.connect(0).await.is_err());
    pg.start_node(0).await.unwrap();
    let lsn = insert(&pg, "t", 3).await;
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    assert_eq!(count(&pg, 1, "t").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_replica_is_followed_by_the_other() {
    let pg = start(2).await;
    create_table(&pg, "t").await;
    insert(&pg, "t", 1).await;
    pg.wait_caught_up(DEADLINE).await.unwrap();

    // Failover: the old primary goes away, replica 1 takes over.
    pg.stop_node(0).await.unwrap();
    pg.promote(1).await.unwrap();
    assert_eq!(pg.primary(), 1);
    assert_eq!(pg.replicas(), vec![2]);
    assert!(matches!(
        pg.promote(0).await,
        Err(HarnessError::InvalidState { .. })
    ));

    let c = pg.connect(1).await.unwrap();
    let in_recovery: bool = c
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);
    let lsn = insert(&pg, "t", 2).await;
    pg.wait_for_replay(2, lsn, DEADLINE).await.unwrap();
    assert!(
        exists(&pg, 2, "t", 2).await,
        "the remaining standby follows"
    );
    assert_eq!(count(&pg, 2, "t").await, 2);
    let c2 = pg.connect(2).await.unwrap();
    let conninfo: String = c2
        .query_one("SHOW primary_conninfo", &[])
        .await
        .unwrap()
        .get(0);
    assert!(conninfo.contains("application_name=node2"), "{conninfo}");
    pg.wait_caught_up(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn standby_restarted_after_promotion_follows_the_new_primary() {
    let pg = start(2).await;
    create_table(&pg, "t").await;
    pg.wait_caught_up(DEADLINE).await.unwrap();

    pg.stop_node(2).await.unwrap();
    pg.stop_node(0).await.unwrap();
    pg.promote(1).await.unwrap();
    let lsn = insert(&pg, "t", 1).await;
    pg.start_node(2).await.unwrap();
    pg.wait_for_replay(2, lsn, DEADLINE).await.unwrap();
    assert!(exists(&pg, 2, "t", 1).await);
}

#[tokio::test]
async fn former_primary_rejoins_after_split_brain() {
    let pg = start(1).await;
    create_table(&pg, "t").await;
    pg.wait_caught_up(DEADLINE).await.unwrap();
    // Promote while the old primary keeps running, then let it diverge.
    pg.promote(1).await.unwrap();
    let old = pg.connect(0).await.unwrap();
    old.execute("INSERT INTO t VALUES (100)", &[])
        .await
        .unwrap();
    insert(&pg, "t", 1).await;

    pg.rejoin_as_standby(0).await.unwrap();
    assert_eq!(pg.replicas(), vec![0]);
    let lsn = insert(&pg, "t", 2).await;
    pg.wait_for_replay(0, lsn, DEADLINE).await.unwrap();
    assert!(exists(&pg, 0, "t", 2).await);
    assert!(
        !exists(&pg, 0, "t", 100).await,
        "the diverged write was rewound"
    );
}

#[tokio::test]
async fn md5_auth_and_custom_user_and_settings() {
    let pg = PgCluster::builder()
        .replicas(1)
        .user("alice", "s3cret pw'")
        .auth_method("md5")
        .setting("work_mem", "8MB")
        .start()
        .await
        .unwrap();
    for node in [0, 1] {
        let c = pg.connect(node).await.unwrap();
        let user: String = c
            .query_one("SELECT current_user", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, "alice");
        let work_mem: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(work_mem, "8MB");
        let hash: String = c
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(hash.starts_with("md5"), "{hash}");
    }
    // The connection string quotes the password properly.
    let cfg: tokio_postgres::Config = pg.connection_string(0).parse().unwrap();
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
    // A wrong password is rejected.
    let mut bad = pg.config(0);
    bad.password("wrong");
    assert!(bad.connect(tokio_postgres::NoTls).await.is_err());
}

#[tokio::test]
async fn password_and_trust_auth_methods() {
    let pg = PgCluster::builder()
        .replicas(1)
        .auth_method("password")
        .start()
        .await
        .unwrap();
    let lsn = {
        let c = pg.connect(0).await.unwrap();
        c.batch_execute("CREATE TABLE t (id int)").await.unwrap();
        pg.current_lsn().await.unwrap()
    };
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    let mut bad = pg.config(1);
    bad.password("wrong");
    assert!(bad.connect(tokio_postgres::NoTls).await.is_err());
    drop(pg);

    let pg = PgCluster::builder()
        .replicas(0)
        .auth_method("trust")
        .start()
        .await
        .unwrap();
    assert!(pg.replicas().is_empty());
    pg.wait_caught_up(DEADLINE).await.unwrap();
    let mut any = pg.config(0);
    any.password("whatever");
    let (c, conn) = any.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn invalid_options_are_rejected() {
    let err = PgCluster::builder()
        .auth_method("ident")
        .start()
        .await
        .expect_err("unsupported auth method");
    assert!(matches!(err, HarnessError::InvalidConfig(_)), "{err}");
    let err = PgCluster::builder()
        .setting("work_mem", "1MB\nfsync = on")
        .start()
        .await
        .expect_err("multi-line setting value");
    assert!(matches!(err, HarnessError::InvalidConfig(_)), "{err}");
    let err = PgCluster::builder()
        .setting("bad name", "1")
        .start()
        .await
        .expect_err("invalid setting name");
    assert!(matches!(err, HarnessError::InvalidConfig(_)), "{err}");
}

#[test]
fn backend_selection() {
    assert_eq!(BackendRequest::parse(None).unwrap(), BackendRequest::Auto);
    assert_eq!(
        BackendRequest::parse(Some("auto")).unwrap(),
        BackendRequest::Auto
    );
    assert_eq!(
        BackendRequest::parse(Some("")).unwrap(),
        BackendRequest::Auto
    );
    assert_eq!(
        BackendRequest::parse(Some("LOCAL")).unwrap(),
        BackendRequest::Local
    );
    assert_eq!(
        BackendRequest::parse(Some(" docker\n")).unwrap(),
        BackendRequest::Docker
    );
    assert!(matches!(
        BackendRequest::parse(Some("podman")),
        Err(HarnessError::InvalidBackend { .. })
    ));

    let never = || -> bool { panic!("engine probe must not run") };
    assert_eq!(
        resolve_backend(BackendRequest::Local, true, never),
        BackendKind::Local
    );
    assert_eq!(
        resolve_backend(BackendRequest::Docker, false, never),
        BackendKind::Docker
    );
    assert_eq!(
        resolve_backend(BackendRequest::Auto, false, never),
        BackendKind::Local
    );
    assert_eq!(
        resolve_backend(BackendRequest::Auto, true, || true),
        BackendKind::Docker
    );
    assert_eq!(
        resolve_backend(BackendRequest::Auto, true, || false),
        BackendKind::Local
    );
}

#[cfg(not(feature = "docker"))]
#[tokio::test]
async fn docker_backend_needs_the_feature() {
    let err = PgCluster::builder()
        .backend(BackendKind::Docker)
        .start()
        .await
        .expect_err("docker backend without the feature");
    assert!(matches!(err, HarnessError::BackendUnavailable(_)), "{err}");
}

/// What a cluster holds that must be gone once it is dropped: the ports
/// of its nodes, their data directories (local backend) and the label of
/// its containers, networks and volumes (Docker backend).
struct Traces {
    nodes: Vec<(String, u16, Option<std::path::PathBuf>)>,
    docker_label: Option<String>,
}

fn traces(pg: &PgCluster) -> Traces {
    let nodes = (0..pg.node_count())
        .map(|n| {
            let cfg = pg.config(n);
            let host = match &cfg.get_hosts()[0] {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                other => panic!("unexpected host {other:?}"),
            };
            (host, cfg.get_ports()[0], pg.data_dir(n))
        })
        .collect();
    let docker_label = pg.docker_label();
    assert_eq!(
        docker_label.is_some(),
        pg.backend() == BackendKind::Docker,
        "only Docker clusters have a label"
    );
    if let Some(label) = &docker_label {
        let objects = common::docker_objects(label);
        assert_eq!(
            objects.len(),
            2 * pg.node_count() + 1,
            "a container and a data volume per node, and the network, carry {label}: {objects:?}"
        );
    }
    Traces {
        nodes,
        docker_label,
    }
}

fn assert_all_gone(t: &Traces) {
    for (host, port, dir) in &t.nodes {
        if host == "127.0.0.1" {
            assert!(
                !accepts_connections(host, *port),
                "port {port} still accepts connections"
            );
        }
        if let Some(dir) = dir {
            assert!(!dir.exists(), "{} still exists", dir.display());
        }
    }
    if let Some(label) = &t.docker_label {
        let left = common::docker_objects(label);
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[tokio::test]
async fn drop_stops_servers() {
    let pg = start(1).await;
    let t = traces(&pg);
    for (host, port, _) in &t.nodes {
        if host == "127.0.0.1" {
            assert!(accepts_connections(host, *port));
        }
    }
    drop(pg);
    assert_all_gone(&t);
}

#[tokio::test]
async fn drop_during_panic_unwind_stops_servers() {
    let pg = start(1).await;
    let t = traces(&pg);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _owned = pg;
        panic!("test panic while owning the cluster");
    }));
    assert!(result.is_err());
    assert_all_gone(&t);
}

#[test]
fn drop_in_panicking_thread_stops_servers() {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The cluster outlives the runtime, so it is dropped by the unwind
        // outside of any runtime context.
        let pg = rt.block_on(start(1));
        drop(rt);
        tx.send(traces(&pg)).unwrap();
        panic!("thread panics while owning the cluster");
    });
    let t = rx.recv().expect("traces");
    assert!(handle.join().is_err(), "the thread panicked");
    assert_all_gone(&t);
}

/// A frozen node answers nothing (it hangs like a partitioned host), a
/// thawed one answers again, and dropping the cluster stops a frozen node
/// too.
#[tokio::test]
async fn frozen_node_hangs_until_thawed_and_drop_still_stops_it() {
    let pg = start(1).await;
    let replica = pg.replicas()[0];
    let c = pg.connect(replica).await.unwrap();
    pg.freeze_node(replica).await.unwrap();
    // Neither an open connection nor a new one gets an answer.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.simple_query("SELECT 1"))
            .await
            .is_err(),
        "a frozen server answered"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), pg.connect(replica))
            .await
            .is_err(),
        "a frozen server accepted a session"
    );
    pg.thaw_node(replica).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    pg.connect(replica).await.unwrap();

    pg.freeze_node(replica).await.unwrap();
    let t = traces(&pg);
    drop(c);
    drop(pg);
    assert_all_gone(&t);
}
