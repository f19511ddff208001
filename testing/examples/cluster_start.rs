//! Times `PgCluster` start-up and teardown per backend, the runs of the
//! backends interleaved so that a busy phase of a shared machine hits both
//! alike:
//!
//! ```sh
//! cargo run --release -p lagrouter-testing --features docker --example cluster_start -- 5
//! ```
//!
//! The argument is the number of runs per backend and cluster size
//! (default 5). The Docker backend is timed when the `docker` feature is
//! compiled in and an engine answers; one warm-up start per backend comes
//! first (it builds the image if it is missing).

use std::time::{Duration, Instant};

use lagrouter_testing::{BackendKind, DOCKER_BACKEND_COMPILED, PgCluster, docker_engine_reachable};

async fn once(
    backend: BackendKind,
    replicas: usize,
) -> Result<(Duration, Duration), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let pg = PgCluster::builder()
        .backend(backend)
        .replicas(replicas)
        .start()
        .await?;
    let start = started.elapsed();
    let dropped = Instant::now();
    drop(pg);
    Ok((start, dropped.elapsed()))
}

fn summary(mut d: Vec<Duration>) -> String {
    d.sort();
    format!(
        "median {:>6.2} s  (min {:.2}, max {:.2})",
        d[d.len() / 2].as_secs_f64(),
        d[0].as_secs_f64(),
        d[d.len() - 1].as_secs_f64()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 5,
    };
    let mut backends = vec![BackendKind::Local];
    if DOCKER_BACKEND_COMPILED && docker_engine_reachable() {
        backends.push(BackendKind::Docker);
    }
    for &b in &backends {
        once(b, 1).await?;
    }
    println!("| backend | replicas | start | drop |");
    println!("|---|---|---|---|");
    for replicas in [0, 1, 2] {
        let mut times = vec![(Vec::new(), Vec::new()); backends.len()];
        for _ in 0..runs {
            for (i, &b) in backends.iter().enumerate() {
                let (start, drop) = once(b, replicas).await?;
                times[i].0.push(start);
                times[i].1.push(drop);
            }
        }
        for (i, b) in backends.iter().enumerate() {
            let (starts, drops) = times[i].clone();
            println!(
                "| {b} | {replicas} | {} | {} |",
                summary(starts),
                summary(drops)
            );
        }
    }
    Ok(())
}
