//! Operations: replicas that fall behind (wait, fallback, error), reload,
//! graceful shutdown, TLS, extended-protocol error recovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_waits_then_falls_back() {
    let env = start(1).await;
    let replica = env.cluster.replicas()[0];
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE lag(id int)").await.unwrap();
    env.cluster
        .wait_caught_up(Duration::from_secs(10))
        .await
        .unwrap();

    // Replay paused: the read waits max_wait (100 ms) for the replica, then
    // goes to the primary, and still sees the write.
    env.cluster.pause_replay(replica).await.unwrap();
    c.execute("INSERT INTO lag VALUES (1)", &[]).await.unwrap();
    let started = Instant::now();
    let r = c
        .query_one("SELECT count(*), pg_is_in_recovery() FROM lag", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 1);
    assert!(!r.get::<_, bool>(1), "served by the primary");
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );

    // With `then = "error"` the read fails with 57014 instead.
    let mut config = env.proxy_config();
    config.routing.then = lagrouter::Fallback::Error;
    env.proxy.reload(config.clone()).unwrap();
    let e = c
        .query_one("SELECT count(*) FROM lag", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57014", "{e}");
    let e = c
        .simple_query("SELECT count(*) FROM lag")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57014", "{e}");

    // Replay resumes while a read waits: it is served by the replica.
    config.routing.max_wait = Duration::from_secs(10);
    env.proxy.reload(config.clone()).unwrap();
    let resume = {
        let cluster = &env.cluster;
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cluster.resume_replay(replica).await.unwrap();
        }
    };
    let read = c.query_one("SELECT count(*), pg_is_in_recovery() FROM lag", &[]);
    let (r, ()) = tokio::join!(read, resume);
    let r = r.unwrap();
    assert_eq!(r.get::<_, i64>(0), 1);
    assert!(r.get::<_, bool>(1), "served by the caught-up replica");

    // Reload to policy "primary": everything goes to the primary.
    config.routing.policy = lagrouter_proxy::config::Policy::Primary;
    env.proxy.reload(config).unwrap();
    let fresh = env.connect().await;
    let r: bool = fresh
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!r);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_transactions() {
    let env = start(1).await;
    let setup = env.connect().await;
    setup.batch_execute("CREATE TABLE s(id int)").await.unwrap();
    let idle = env.connect().await;
    let mut busy = env.connect().await;
    let tx = busy.transaction().await.unwrap();
    tx.execute("INSERT INTO s VALUES (1)", &[]).await.unwrap();

    let Env { cluster, proxy } = env;
    let addr = proxy.local_addr();
    let shutdown = tokio::spawn(proxy.shutdown());
    // Idle sessions are told to go away.
    wait_until(Duration::from_secs(10), "idle session closed", || async {
        idle.is_closed()
    })
    .await;
    // New connections are refused.
    wait_until(Duration::from_secs(10), "listener closed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The transaction in flight completes.
    tx.execute("INSERT INTO s VALUES (2)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    let direct = cluster.connect(cluster.primary()).await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM s", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    drop(busy);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        c.tls = Some(lagrouter_proxy::config::TlsConfig {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = tokio::net::TcpStream::connect(env.addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = Vec::new();
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&80877103i32.to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let mut b = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "raw"), ("database", "postgres")],
        &mut b,
    )
    .unwrap();
    postgres_protocol::message::frontend::query("SELECT 'over tls'", &mut b).unwrap();
    tls.write_all(&b).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains("over tls") {
        assert!(Instant::now() < deadline, "no answer over TLS");
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    // Plain clients still work (sslmode=prefer falls back only when refused;
    // here TLS is offered, tokio-postgres without TLS support uses plain).
    let c = env.connect().await;
    c.simple_query("SELECT 1").await.unwrap();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_error_recovery() {
    let env = start_with(
        lagrouter_testing::PgCluster::builder().replicas(1),
        add_trust_user,
    )
    .await;
    let (mut r, startup) = Raw::login(env.addr(), "raw").await;
    assert!(startup.iter().any(|m| m.0 == b'K'), "BackendKeyData sent");
    assert!(startup.iter().any(|m| m.0 == b'S'), "ParameterStatus sent");
    use postgres_protocol::message::frontend as f;
    let mut b = bytes::BytesMut::new();
    // A batch whose second statement fails: the rest is skipped until Sync.
    f::parse("a", "SELECT 1", std::iter::empty(), &mut b).unwrap();
    f::parse(
        "b",
        "SELECT * FROM no_such_table",
        std::iter::empty(),
        &mut b,
    )
    .unwrap();
    f::parse("c", "SELECT 3", std::iter::empty(), &mut b).unwrap();
    f::sync(&mut b);
    r.send(&b).await;
    let msgs = r.read_until(b'Z').await;
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    assert_eq!(tags, vec![b'1', b'E', b'Z'], "{msgs:?}");
    assert_eq!(sqlstate(&msgs).as_deref(), Some("42P01"));

    // "a" exists, "c" does not (it was skipped).
    let mut b = bytes::BytesMut::new();
    for stmt in ["a", "c"] {
        f::bind(
            "",
            stmt,
            std::iter::empty::<i16>(),
            std::iter::empty::<Option<&[u8]>>(),
            |_: Option<&[u8]>, _: &mut bytes::BytesMut| Ok(postgres_protocol::IsNull::Yes),
            std::iter::empty::<i16>(),
            &mut b,
        )
        .map_err(|_| ())
        .unwrap();
        f::execute("", 0, &mut b).unwrap();
        f::sync(&mut b);
    }
    r.send(&b).await;
    let first = r.read_until(b'Z').await;
    assert_eq!(
        first.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![b'2', b'D', b'C', b'Z'],
        "{first:?}"
    );
    let second = r.read_until(b'Z').await;
    assert_eq!(sqlstate(&second).as_deref(), Some("26000"), "{second:?}");

    // A write then its token as a ParameterStatus before ReadyForQuery.
    let msgs = r.query("CREATE TABLE ext(id int)").await;
    let token = msgs
        .iter()
        .find(|m| m.0 == b'S' && m.1.starts_with(b"lagrouter.token\0"))
        .map(|m| String::from_utf8_lossy(&m.1[16..m.1.len() - 1]).into_owned());
    assert!(
        token.as_deref().is_some_and(|t| t.starts_with("v1.")),
        "{msgs:?}"
    );
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'));

    // Flush-driven exchange (no Sync until later).
    let mut b = bytes::BytesMut::new();
    f::parse("", "SELECT 42", std::iter::empty(), &mut b).unwrap();
    f::describe(b'S', "", &mut b).unwrap();
    f::flush(&mut b);
    r.send(&b).await;
    let msgs = r.read_until(b'T').await;
    assert_eq!(
        msgs.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![b'1', b't', b'T'],
        "{msgs:?}"
    );
    let mut b = bytes::BytesMut::new();
    f::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        std::iter::empty::<Option<&[u8]>>(),
        |_: Option<&[u8]>, _: &mut bytes::BytesMut| Ok(postgres_protocol::IsNull::Yes),
        std::iter::empty::<i16>(),
        &mut b,
    )
    .map_err(|_| ())
    .unwrap();
    f::execute("", 0, &mut b).unwrap();
    f::sync(&mut b);
    r.send(&b).await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(
        msgs.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![b'2', b'D', b'C', b'Z'],
        "{msgs:?}"
    );
    env.stop().await;
}

/// Reloads (pool sizes, policies, timeouts, and one invalid configuration
/// that is rejected) while clients write: no client sees an error and every
/// acknowledged write is on the primary afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let env = start(1).await;
    let setup = env.connect().await;
    setup
        .batch_execute("CREATE TABLE rl(writer int, id int, PRIMARY KEY (writer, id))")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..3 {
        let c = env.connect().await;
        let (stop, acked) = (stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                if id % 2 == 0 {
                    c.execute("INSERT INTO rl VALUES ($1, $2)", &[&w, &id])
                        .await
                        .map_err(|e| format!("write {id}: {e}"))?;
                } else {
                    // A transaction across the reload point.
                    c.batch_execute(&format!(
                        "BEGIN; INSERT INTO rl VALUES ({w}, {id}); SELECT count(*) FROM rl; COMMIT"
                    ))
                    .await
                    .map_err(|e| format!("transaction {id}: {e}"))?;
                }
                ids.push(id);
                acked.fetch_add(1, Ordering::Relaxed);
                // Reads with the session's token see the write.
                let n: i64 = c
                    .query_one(
                        "SELECT count(*) FROM rl WHERE writer = $1 AND id = $2",
                        &[&w, &id],
                    )
                    .await
                    .map_err(|e| format!("read {id}: {e}"))?
                    .get(0);
                if n != 1 {
                    return Err(format!("write {id} of writer {w} not visible"));
                }
            }
            Ok::<_, String>((w, ids))
        }));
    }
    let policies = [
        lagrouter_proxy::config::Policy::Primary,
        lagrouter_proxy::config::Policy::ReadYourWrites,
        lagrouter_proxy::config::Policy::BoundedStaleness,
        lagrouter_proxy::config::Policy::ReadYourWrites,
    ];
    for round in 0..8 {
        let target = (round + 1) * 20;
        let a = acked.clone();
        wait_until(Duration::from_secs(30), "writes between reloads", || {
            let a = a.clone();
            async move { a.load(Ordering::Relaxed) >= target }
        })
        .await;
        let mut config = env.proxy_config();
        config.pool.size = if round % 2 == 0 { 2 } else { 8 };
        config.routing.policy = policies[round % policies.len()];
        config.proxy.client_write_timeout = Duration::from_secs(10 + round as u64);
        env.proxy.reload(config.clone()).unwrap();
        if round == 3 {
            // An invalid configuration is rejected and changes nothing.
            let mut bad = config.clone();
            bad.pool.size = 0;
            assert!(env.proxy.reload(bad).is_err());
            assert_eq!(env.proxy_config().pool.size, config.pool.size);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let direct = env.cluster.connect(env.cluster.primary()).await.unwrap();
    let mut total = 0;
    for t in tasks {
        let (w, ids) = t
            .await
            .unwrap()
            .expect("no client-visible error across reloads");
        let rows = direct
            .query("SELECT id FROM rl WHERE writer = $1 ORDER BY id", &[&w])
            .await
            .unwrap();
        let stored: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(stored, ids, "writer {w}: acknowledged vs stored");
        total += ids.len();
    }
    assert!(total >= 160);
    lagrouter_testing::report(format_args!(
        "reload under load: 9 reloads (1 rejected), {total} acknowledged writes, all stored"
    ));
    env.stop().await;
}

/// `pool.min_idle` connections are opened ahead of demand, a node's
/// `pool_size` caps its pools, and connections idle past
/// `server_idle_timeout` are closed down to `min_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_keep_min_idle_respect_node_sizes_and_expire_idle_connections() {
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        c.pool.size = 4;
        c.pool.min_idle = 2;
        c.pool.server_idle_timeout = Duration::from_millis(500);
        c.nodes[1].pool_size = Some(3);
    })
    .await;
    let pools = |env: &Env| -> Vec<serde_json::Value> {
        env.proxy.status()["pools"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE mi(i int)").await.unwrap();
    env.cluster
        .wait_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    c.query("SELECT count(*) FROM mi", &[]).await.unwrap();
    // Both nodes' pools exist and are topped up to min_idle.
    wait_until(
        Duration::from_secs(30),
        "min_idle idle connections",
        || async {
            let p = pools(&env);
            p.len() == 2 && p.iter().all(|p| p["idle"].as_u64() >= Some(2))
        },
    )
    .await;
    let sizes: Vec<(u64, u64)> = pools(&env)
        .iter()
        .map(|p| (p["node"].as_u64().unwrap(), p["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(sizes, vec![(0, 4), (1, 3)]);

    // A burst of 6 concurrent reads on the replica: never more than 3
    // connections to it.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(env.connect().await);
    }
    let reads = clients
        .iter()
        .map(|c| c.query("SELECT pg_sleep(0.1), count(*) FROM mi", &[]));
    let watch = async {
        let mut most = 0;
        for _ in 0..50 {
            for p in pools(&env) {
                if p["node"] == 1 {
                    most = most.max(p["open"].as_u64().unwrap());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        most
    };
    let (results, most) = tokio::join!(futures_util::future::join_all(reads), watch);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert!(most <= 3, "{most} connections to a node with pool_size 3");

    // Idle connections are closed after server_idle_timeout, down to
    // min_idle, without any client activity.
    drop(clients);
    wait_until(
        Duration::from_secs(30),
        "idle connections expired",
        || async { pools(&env).iter().all(|p| p["open"].as_u64() == Some(2)) },
    )
    .await;
    c.simple_query("SELECT 1").await.unwrap();
    env.stop().await;
}
