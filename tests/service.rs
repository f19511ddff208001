//! The tower service and its layers.

mod common;

use std::time::Duration;

use common::{cluster, start_pg};
use lagrouter::{
    Consistency, ConsistencyLayer, Intent, Request, Role, RouterService, SharedToken,
    TokenTrackingLayer,
};
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_routes_writes_to_primary_and_token_reads_see_them() {
    let pg = start_pg(1).await;
    let r = pg.replicas()[0];
    pg.set_apply_delay(r, Duration::from_millis(50))
        .await
        .unwrap();
    let cluster = cluster(&pg, |b| {
        b.policy(Consistency::read_your_writes(Duration::from_secs(5)))
    })
    .await;
    let mut svc = RouterService::new(cluster);

    let w = svc
        .ready()
        .await
        .unwrap()
        .call(
            Request::write("INSERT INTO items VALUES ($1, $2)")
                .bind(1i32)
                .bind("a".to_string()),
        )
        .await
        .unwrap();
    assert_eq!(w.rows_affected, 1);
    assert_eq!(w.served_by.role, Role::Primary);
    let token = w.token.expect("write token");

    let read = svc
        .ready()
        .await
        .unwrap()
        .call(
            Request::read("SELECT body FROM items WHERE id = $1")
                .bind(1i32)
                .token(Some(token))
                .intent(Intent::ReadExpectingRow),
        )
        .await
        .unwrap();
    assert_eq!(read.rows.len(), 1, "token-gated read sees the write");
    assert_eq!(read.served_by.role, Role::Replica);
    assert!(read.token.unwrap().lsn >= token.lsn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_set_policy_and_track_tokens() {
    let pg = start_pg(1).await;
    pg.set_apply_delay(pg.replicas()[0], Duration::from_millis(50))
        .await
        .unwrap();
    let cluster = cluster(&pg, |b| b.policy(Consistency::Eventual)).await;

    // ConsistencyLayer: requests without a policy get Primary.
    let mut primary_only = ServiceBuilder::new()
        .layer(ConsistencyLayer::new(Consistency::Primary))
        .service(RouterService::new(cluster.clone()));
    let r = primary_only
        .ready()
        .await
        .unwrap()
        .call(Request::read("SELECT 1"))
        .await
        .unwrap();
    assert_eq!(r.served_by.role, Role::Primary);
    // …but an explicit policy wins.
    let r = primary_only
        .ready()
        .await
        .unwrap()
        .call(Request::read("SELECT 1").consistency(Consistency::Eventual))
        .await
        .unwrap();
    assert_eq!(r.served_by.role, Role::Replica);

    // TokenTrackingLayer + read-your-writes with tower's timeout on top.
    let shared = SharedToken::default();
    let mut tracked = ServiceBuilder::new()
        .timeout(Duration::from_secs(10))
        .layer(TokenTrackingLayer::new(shared.clone()))
        .layer(ConsistencyLayer::new(Consistency::read_your_writes(
            Duration::from_secs(5),
        )))
        .service(RouterService::new(cluster));
    for id in 10..30i32 {
        tracked
            .ready()
            .await
            .unwrap()
            .call(Request::write("INSERT INTO items VALUES ($1, 'x')").bind(id))
            .await
            .unwrap();
        let written = shared.get().expect("token tracked after a write");
        let r = tracked
            .ready()
            .await
            .unwrap()
            .call(Request::read("SELECT 1 FROM items WHERE id = $1").bind(id))
            .await
            .unwrap();
        assert_eq!(r.rows.len(), 1, "read {id} missed its own write");
        assert!(shared.get().unwrap().lsn >= written.lsn);
    }
}
