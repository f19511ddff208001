//! The Grafana dashboard (`deploy/grafana/lagrouter.json`) queries only
//! metrics that exist: every metric name in its expressions is in
//! `/metrics` of a running proxy, after traffic that makes each event
//! happen at least once. The library's own metrics (reads and writes of a
//! `lagrouter::Cluster`) are recorded by the same process-wide recorder, so
//! the same scrape shows them.

use std::collections::BTreeSet;
use std::time::Duration;

use lagrouter_testing::PgCluster;

use crate::support::*;

/// Every `lagrouter_…` metric name the dashboard's queries use.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/lagrouter.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard exists");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs: Vec<String> = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("a query").to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    assert!(exprs.len() >= 20, "the dashboard has its queries");
    let mut names = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("lagrouter_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let wanted = dashboard_metrics();
    let env = start_with(PgCluster::builder().replicas(1), |c| {
        c.routing.max_wait = Duration::from_millis(20);
    })
    .await;
    let pg = &env.cluster;
    let replica = pg.replicas()[0];

    // Proxy traffic: writes, reads, and a read that waits for a replica
    // and falls back (replay paused).
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS dash_t(i int); INSERT INTO dash_t VALUES (1)")
        .await
        .unwrap();
    c.simple_query("SELECT count(*) FROM dash_t").await.unwrap();
    pg.pause_replay(replica).await.unwrap();
    c.batch_execute("INSERT INTO dash_t VALUES (2)")
        .await
        .unwrap();
    c.simple_query("SELECT count(*) FROM dash_t").await.unwrap();

    // Library traffic in the same process: a write, a read, a token wait.
    let lib = lagrouter::Cluster::builder()
        .primary(pg.connection_string(pg.primary()).as_str())
        .replica(pg.connection_string(replica).as_str())
        .policy(lagrouter::Consistency::read_your_writes(
            Duration::from_millis(20),
        ))
        .build()
        .await
        .expect("library cluster");
    let mut s = lib.session();
    s.execute("INSERT INTO dash_t VALUES (3)", &[])
        .await
        .unwrap();
    s.query("SELECT count(*) FROM dash_t", &[]).await.unwrap();
    pg.resume_replay(replica).await.unwrap();

    // The gauges are published once a second: poll until every name is
    // there, or report the missing ones.
    let admin = env.proxy.admin_addr();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(admin, "/metrics").await;
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|name| {
                !body.lines().any(|l| {
                    l.strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard queries metrics that are not exported: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.stop().await;
}
