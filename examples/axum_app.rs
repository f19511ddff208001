//! An axum service with read-your-writes across instances.
//!
//! `POST /items` (body: text) inserts a row and returns its id;
//! `GET /items/{id}` reads it back (404 when missing) and says in
//! `x-served-by` whether a replica or the primary answered. Both open their
//! [`Session`](lagrouter::Session) from the request's [`TokenCell`], so a
//! client that sends back the `lagrouter_token` cookie (or the
//! `x-lagrouter-token` header) reads its own writes on any instance, while
//! everyone else reads from replicas.
//!
//! Run it with a throw-away local PostgreSQL primary and replica:
//!
//! ```text
//! cargo run --example axum_app --features http
//! ```

use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lagrouter::http::{ConsistencyTokenLayer, TokenCell};
use lagrouter::{Cluster, Role};
use lagrouter_testing::PgCluster;

/// The table the app uses.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS items (
    id bigserial PRIMARY KEY,
    body text NOT NULL
)";

/// The app with the default token layer, rejecting tokens of other clusters.
pub fn app(cluster: Cluster) -> Router {
    let layer = ConsistencyTokenLayer::new().cluster(cluster.clone());
    app_with_layer(cluster, layer)
}

/// The app with a token layer of your choice (signing, cookie settings…).
pub fn app_with_layer(cluster: Cluster, layer: ConsistencyTokenLayer) -> Router {
    Router::new()
        .route("/items", post(create_item))
        .route("/items/{id}", get(get_item))
        .with_state(cluster)
        .layer(layer)
}

/// `POST /items`: inserts the body, returns the new id (201).
async fn create_item(
    State(cluster): State<Cluster>,
    Extension(cell): Extension<TokenCell>,
    body: String,
) -> Response {
    let mut session = cell.session(&cluster);
    let result = session
        .write_query(
            "INSERT INTO items (body) VALUES ($1) RETURNING id",
            &[&body],
        )
        .await;
    cell.absorb(&session);
    let rows = match result {
        Ok(rows) => rows,
        Err(e) => return internal_error(e),
    };
    match rows.first().map(|row| row.try_get::<_, i64>(0)) {
        Some(Ok(id)) => (StatusCode::CREATED, id.to_string()).into_response(),
        Some(Err(e)) => internal_error(e),
        None => internal_error("INSERT returned no row"),
    }
}

/// `GET /items/{id}`: the item's body, or 404; `x-served-by` names the role
/// of the node that answered.
async fn get_item(
    State(cluster): State<Cluster>,
    Extension(cell): Extension<TokenCell>,
    Path(id): Path<i64>,
) -> Response {
    const SQL: &str = "SELECT body FROM items WHERE id = $1";
    let mut session = cell.session(&cluster);
    let mut result = session.query_opt(SQL, &[&id]).await;
    if let Err(lagrouter::Error::TokenAhead { .. }) = result {
        // The client's token names writes the primary does not have: forged
        // (sign tokens to rule that out) or lost in a failover. Forget it and
        // read the current data.
        cell.clear();
        session = cell.session(&cluster);
        result = session.query_opt(SQL, &[&id]).await;
    }
    cell.absorb(&session);
    let served_by = match session.last_served().map(|s| s.role) {
        Some(Role::Primary) => "primary",
        Some(Role::Replica) => "replica",
        Some(Role::Unknown) | None => "unknown",
    };
    let served = [("x-served-by", served_by)];
    match result {
        Ok(Some(row)) => match row.try_get::<_, String>(0) {
            Ok(body) => (StatusCode::OK, served, body).into_response(),
            Err(e) => internal_error(e),
        },
        Ok(None) => (StatusCode::NOT_FOUND, served, "no such item").into_response(),
        Err(e) => internal_error(e),
    }
}

fn internal_error(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "request failed");
    (StatusCode::INTERNAL_SERVER_ERROR, "database error").into_response()
}

/// Builds a lagrouter cluster over every node of `pg`.
pub async fn connect(pg: &PgCluster) -> lagrouter::Result<Cluster> {
    let mut builder = Cluster::builder()
        .primary(pg.config(pg.primary()))
        .monitor_interval(Duration::from_millis(50));
    for r in pg.replicas() {
        builder = builder.named_replica(format!("replica{r}"), pg.config(r));
    }
    builder.build().await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "lagrouter=info,axum_app=info".into()),
        )
        .init();

    println!("starting PostgreSQL (primary + 1 replica)...");
    let pg = PgCluster::start(1).await?;
    pg.connect(pg.primary())
        .await?
        .batch_execute(SCHEMA)
        .await?;
    pg.wait_caught_up(Duration::from_secs(30)).await?;
    let cluster = connect(&pg).await?;

    let addr = "127.0.0.1:3000";
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{addr}  (Ctrl-C to stop)");
    println!();
    println!("# write, then read your write (the cookie jar carries the token):");
    println!(
        "curl -si -c /tmp/lagrouter.jar -b /tmp/lagrouter.jar --data 'hello' http://{addr}/items"
    );
    println!("curl -si -c /tmp/lagrouter.jar -b /tmp/lagrouter.jar http://{addr}/items/1");
    println!("# the same with the header instead of the cookie:");
    println!("curl -si --data 'hi' http://{addr}/items | grep -i x-lagrouter-token");
    println!("curl -si -H 'x-lagrouter-token: <token from above>' http://{addr}/items/2");
    println!("# no token: any replica (see x-served-by):");
    println!("curl -si http://{addr}/items/1");

    axum::serve(listener, app(cluster))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Dropping `pg` stops the servers and removes their data.
    drop(pg);
    Ok(())
}
