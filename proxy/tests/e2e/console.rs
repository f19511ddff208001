//! The admin console (`dbname=lagrouter` / `pgbouncer`): every command,
//! who may use it, and what it refuses.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

/// A user allowed `SHOW` only.
const WATCHER: &str = "watcher";

fn with_console(c: &mut lagrouter_proxy::config::Config) {
    c.proxy.admin_users = vec![USER.into()];
    c.users.push(lagrouter_proxy::config::UserConfig {
        name: WATCHER.into(),
        password: "watch".into(),
        auth: lagrouter_proxy::config::AuthMethod::ScramSha256,
        server_user: Some(USER.into()),
        server_password: Some(PASSWORD.into()),
        consistency: None,
    });
    c.proxy.stats_users = vec![WATCHER.into()];
}

fn console_str(env: &Env, user: &str, password: &str, db: &str) -> String {
    conn_str(env.addr(), user, password).replace("dbname=postgres", &format!("dbname={db}"))
}

async fn console(env: &Env) -> Client {
    connect(&console_str(env, USER, PASSWORD, "lagrouter")).await
}

/// The rows of a console command, as column → value maps.
async fn rows(c: &Client, sql: &str) -> Vec<HashMap<String, Option<String>>> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).map(str::to_string)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn get<'a>(row: &'a HashMap<String, Option<String>>, col: &str) -> &'a str {
    row.get(col)
        .unwrap_or_else(|| panic!("no column {col} in {row:?}"))
        .as_deref()
        .unwrap_or("")
}

fn num(row: &HashMap<String, Option<String>>, col: &str) -> u64 {
    get(row, col)
        .parse()
        .unwrap_or_else(|_| panic!("{col} in {row:?}"))
}

/// The first value of the first row.
fn first(msgs: &[SimpleQueryMessage]) -> Option<&str> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0),
        _ => None,
    })
}

async fn code(c: &Client, sql: &str) -> String {
    let e = c.simple_query(sql).await.expect_err(sql);
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_describe_the_proxy() {
    let env = start_with(
        lagrouter_testing::PgCluster::builder().replicas(1),
        with_console,
    )
    .await;
    let app = connect(&format!("{} application_name=shop", env.conn_str())).await;
    app.batch_execute(
        "CREATE TABLE IF NOT EXISTS console_t(i int); INSERT INTO console_t VALUES (1)",
    )
    .await
    .unwrap();
    app.simple_query("SELECT count(*) FROM console_t")
        .await
        .unwrap();
    let eventual = env.connect().await;
    eventual
        .batch_execute("SET lagrouter.consistency = 'eventual'")
        .await
        .unwrap();
    let r = eventual
        .simple_query("SELECT pg_is_in_recovery()")
        .await
        .unwrap();
    assert_eq!(first(&r), Some("t"));

    let admin = console(&env).await;
    let nodes = rows(&admin, "SHOW NODES").await;
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(get(&nodes[0], "role"), "primary");
    assert_eq!(get(&nodes[1], "role"), "replica");
    // The monitor reads the timeline from the primary.
    assert_eq!(get(&nodes[0], "timeline"), "1");
    for n in &nodes {
        assert_eq!(get(n, "healthy"), "t", "{n:?}");
        assert!(get(n, "lsn").contains('/'), "{n:?}");
        assert!(get(n, "lag_bytes").parse::<u64>().is_ok(), "{n:?}");
    }

    let version = rows(&admin, "SHOW VERSION").await;
    assert!(get(&version[0], "version").starts_with("lagrouter-proxy "));
    assert!(rows(&admin, "show help;").await.len() >= 12);

    let config = rows(&admin, "SHOW CONFIG").await;
    let key = |k: &str| {
        config
            .iter()
            .find(|r| get(r, "key") == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    assert_eq!(get(key("routing.policy"), "value"), "read-your-writes");
    assert_eq!(get(key("users[0].password"), "value"), "********");
    assert_eq!(get(key("proxy.listen"), "changeable"), "f");
    for r in config
        .iter()
        .filter(|r| get(r, "key").ends_with("password"))
    {
        assert_eq!(get(r, "value"), "********", "{r:?}");
    }

    // Counters per node and policy.
    let stats = rows(&admin, "SHOW STATS").await;
    let row = |node: &str, policy: &str| {
        stats
            .iter()
            .find(|r| get(r, "node") == node && get(r, "policy") == policy)
            .unwrap_or_else(|| panic!("no {node}/{policy} in {stats:?}"))
    };
    assert!(num(row("primary", "read_your_writes"), "writes") >= 1);
    assert!(num(row("replica1", "eventual"), "replica_reads") >= 1);
    let replica_ryw = row("replica1", "read_your_writes");
    let primary_ryw = row("primary", "read_your_writes");
    assert_eq!(
        num(replica_ryw, "reads") + num(primary_ryw, "reads"),
        1,
        "the one read-your-writes read is counted once, where it ran"
    );

    // A client inside a transaction holds a server connection.
    // (It wrote: a transaction that only reads would be on a replica.)
    app.batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let shop = clients
        .iter()
        .find(|c| get(c, "application_name") == "shop")
        .expect("the app client is listed");
    assert_eq!(get(shop, "state"), "active");
    assert_eq!(get(shop, "node"), "primary");
    assert_eq!(get(shop, "database"), "postgres");
    assert!(
        clients.iter().any(|c| get(c, "database") == "lagrouter"),
        "the console's own client is listed"
    );
    let servers = rows(&admin, "SHOW SERVERS").await;
    let linked = servers
        .iter()
        .find(|s| get(s, "link") == get(shop, "id"))
        .expect("its server is linked to it");
    assert_eq!(get(linked, "state"), "active");
    assert_eq!(get(linked, "remote_pid"), get(shop, "remote_pid"));
    let pools = rows(&admin, "SHOW POOLS").await;
    let primary_pool = pools
        .iter()
        .find(|p| get(p, "node") == "primary")
        .expect("primary pool");
    assert_eq!(num(primary_pool, "cl_active"), 1);
    assert_eq!(num(primary_pool, "sv_active"), 1);
    assert_eq!(get(primary_pool, "pool_mode"), "transaction");
    app.batch_execute("COMMIT").await.unwrap();
    let servers = rows(&admin, "SHOW SERVERS").await;
    assert!(
        servers.iter().all(|s| get(s, "state") == "idle"),
        "{servers:?}"
    );
    assert!(!servers.is_empty());

    // `pgbouncer` is an alias.
    let alias = connect(&console_str(&env, USER, PASSWORD, "pgbouncer")).await;
    assert_eq!(rows(&alias, "SHOW NODES").await.len(), 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_refuses_what_it_should() {
    let env = start_with(
        lagrouter_testing::PgCluster::builder().replicas(1),
        with_console,
    )
    .await;
    let admin = console(&env).await;
    assert_eq!(code(&admin, "SELECT 1").await, "42601");
    assert_eq!(code(&admin, "SHOW TABLES").await, "42601");
    // The extended protocol is refused; the connection stays usable.
    let e = admin.query("SHOW NODES", &[]).await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "0A000");
    assert_eq!(rows(&admin, "SHOW NODES").await.len(), 2);
    // No configuration file: nothing to reload.
    assert_eq!(code(&admin, "RELOAD").await, "55000");
    assert_eq!(code(&admin, "RESUME").await, "55000");

    // A stats user may look, not act.
    let watcher = connect(&console_str(&env, WATCHER, "watch", "lagrouter")).await;
    assert_eq!(
        rows(&watcher, "SHOW POOLS").await.len(),
        rows(&admin, "SHOW POOLS").await.len()
    );
    for cmd in ["RELOAD", "PAUSE", "RESUME", "SHUTDOWN"] {
        assert_eq!(code(&watcher, cmd).await, "42501", "{cmd}");
    }
    // Others may not connect to it at all, even with the right password.
    let mut config = env.proxy.config();
    config.proxy.admin_users.clear();
    env.proxy.reload(config).unwrap();
    let e = tokio_postgres::connect(
        &console_str(&env, USER, PASSWORD, "lagrouter"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("no longer an admin");
    assert_eq!(e.code().unwrap().code(), "28000");
    // The watcher still may (reloadable lists).
    assert!(!rows(&watcher, "SHOW VERSION").await.is_empty());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_transactions_and_holds_new_ones_until_resume() {
    let env = start_with(
        lagrouter_testing::PgCluster::builder().replicas(1),
        with_console,
    )
    .await;
    let admin = console(&env).await;
    let watcher = connect(&console_str(&env, WATCHER, "watch", "lagrouter")).await;
    let busy = env.connect().await;
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let pause =
        tokio::spawn(async move { admin.simple_query("PAUSE postgres").await.map(|_| admin) });
    wait_until(Duration::from_secs(10), "the pool shows paused", || async {
        rows(&watcher, "SHOW POOLS")
            .await
            .iter()
            .any(|p| get(p, "paused") == "t")
    })
    .await;
    assert!(
        !pause.is_finished(),
        "PAUSE returned while a transaction runs"
    );
    busy.batch_execute("COMMIT").await.unwrap();
    let admin = tokio::time::timeout(Duration::from_secs(10), pause)
        .await
        .expect("PAUSE returns once the transaction ended")
        .unwrap()
        .expect("PAUSE succeeds");

    // A new transaction waits.
    let held = env.connect().await;
    let query = tokio::spawn(async move { held.simple_query("SELECT 42").await.is_ok() });
    wait_until(
        Duration::from_secs(10),
        "the client shows waiting",
        || async {
            rows(&watcher, "SHOW CLIENTS")
                .await
                .iter()
                .any(|c| get(c, "state") == "waiting")
        },
    )
    .await;
    assert!(!query.is_finished());
    rows(&admin, "RESUME postgres").await;
    assert!(
        tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .expect("the held query runs after RESUME")
            .unwrap()
    );
    assert_eq!(code(&admin, "RESUME postgres").await, "55000");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reads_the_file_and_shutdown_stops_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lagrouter.toml");
    let env = start_with(
        lagrouter_testing::PgCluster::builder().replicas(1),
        with_console,
    )
    .await;
    let mut config = env.proxy.config();
    std::fs::write(&path, config.to_toml_string()).unwrap();
    env.proxy.set_config_path(&path);
    let admin = console(&env).await;
    let policy = |rows: Vec<HashMap<String, Option<String>>>| {
        rows.iter()
            .find(|r| get(r, "key") == "routing.policy")
            .map(|r| get(r, "value").to_string())
            .unwrap()
    };
    assert_eq!(
        policy(rows(&admin, "SHOW CONFIG").await),
        "read-your-writes"
    );

    config.routing.policy = lagrouter_proxy::config::Policy::Primary;
    std::fs::write(&path, config.to_toml_string()).unwrap();
    rows(&admin, "RELOAD").await;
    assert_eq!(policy(rows(&admin, "SHOW CONFIG").await), "primary");
    let app = env.connect().await;
    let r = app
        .simple_query("SELECT pg_is_in_recovery()")
        .await
        .unwrap();
    assert_eq!(first(&r), Some("f"));

    // A broken file is refused and the running configuration kept.
    std::fs::write(&path, "[routing]\npolicy = \"fastest\"\n").unwrap();
    assert_eq!(code(&admin, "RELOAD").await, "F0000");
    assert_eq!(policy(rows(&admin, "SHOW CONFIG").await), "primary");

    rows(&admin, "SHUTDOWN").await;
    tokio::time::timeout(Duration::from_secs(10), env.proxy.shutdown_requested())
        .await
        .expect("SHUTDOWN reaches whoever runs the proxy");
    let addr = env.addr();
    env.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
