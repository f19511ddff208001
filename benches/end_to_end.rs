//! End-to-end cost of routing through lagrouter compared with the same call
//! on a plain deadpool-postgres pool, on a real local PostgreSQL 15 primary
//! and replica started by the bench (`lagrouter::testing::PgCluster`).
//!
//! Run with:
//!
//! ```text
//! cargo bench --bench end_to_end --features testing
//! ```
//!
//! (needs the PostgreSQL server binaries, found through `PG_BIN` or
//! `pg_config --bindir`; as root the servers run as the `postgres` user).
//!
//! Two parts:
//!
//! 1. Criterion benchmarks `read/*` and `write/*` (small sample sizes so the
//!    whole bench takes about a minute).
//! 2. A paired comparison printed as a markdown table at the end: the
//!    variants of each operation run in interleaved blocks (`ROUNDS` rounds
//!    of `BLOCK` sequential calls each, the order rotating every round), so
//!    that a busy machine slows all of them alike. It reports the median and
//!    p99 of the per-call latency and, as the overhead figure, the median over
//!    rounds of `median(variant block) / median(plain block)`. Set
//!    `LAGROUTER_BENCH_ROUNDS` / `LAGROUTER_BENCH_BLOCK` to change the
//!    sizes, `LAGROUTER_BENCH_PAIRED=0` to skip it. It is skipped in
//!    criterion's `--test` and `--list` modes.
//!
//! The variants:
//!
//! * `read/plain`: `SELECT 1` on a plain pool to the replica: checkout,
//!   `prepare_cached` (a cache hit after the first call), `query_one`;
//! * `read/session`: the same through [`Session::query_one`] with the default
//!   read-your-writes policy: route, checkout, run, and pipeline the
//!   replica's replay position after the statement to advance the session
//!   token (monotonic reads);
//! * `read/service_no_capture`: the same through [`RouterService`] with
//!   `capture_token = false` (routing only, nothing pipelined);
//! * `write/plain`: a single-row `INSERT` on a plain pool to the primary;
//! * `write/session`: the same through [`Session::execute`], which pipelines
//!   `pg_current_wal_insert_lsn()` after the insert to capture the token;
//! * `write/service`: the same through [`RouterService`] (also captures).
//!
//! The plain pools are built exactly as lagrouter builds its own
//! ([`Connector::pool`], 16 connections, fast recycling) and both sides use
//! prepared, per-connection cached statements.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use criterion::Criterion;
use deadpool_postgres::Pool;
use lagrouter::testing::PgCluster;
use lagrouter::{Cluster, Connector, Request, Role, RouterService, Session};
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

const READ_SQL: &str = "SELECT 1";
const WRITE_SQL: &str = "INSERT INTO bench_rows (v) VALUES ($1)";
const POOL_SIZE: usize = 16;

/// Everything the benchmarks share. Field order matters for drop order: the
/// pools and the cluster close their connections before the servers stop.
struct Env {
    cluster: Cluster,
    plain_primary: Pool,
    plain_replica: Pool,
    pg: PgCluster,
}

async fn setup() -> Result<Env, Box<dyn std::error::Error>> {
    let pg = PgCluster::start(1).await?;
    let admin = pg.connect(pg.primary()).await?;
    admin
        .batch_execute("CREATE TABLE bench_rows (id bigserial PRIMARY KEY, v bigint NOT NULL)")
        .await?;
    pg.wait_caught_up(Duration::from_secs(30)).await?;
    let replica = pg.replicas()[0];
    let cluster = Cluster::builder()
        .primary(pg.config(pg.primary()))
        .replica(pg.config(replica))
        .pool_size(POOL_SIZE)
        .build()
        .await?;
    let healthy = cluster
        .monitor()
        .wait_for(Duration::from_secs(30), |t| {
            t.nodes.iter().all(|n| n.healthy)
        })
        .await;
    if healthy.is_none() {
        return Err(format!("nodes not healthy: {:?}", cluster.topology()).into());
    }
    let timeout = Some(Duration::from_secs(5));
    let plain_primary = Connector::NoTls.pool(pg.config(pg.primary()), POOL_SIZE, timeout)?;
    let plain_replica = Connector::NoTls.pool(pg.config(replica), POOL_SIZE, timeout)?;
    Ok(Env {
        cluster,
        plain_primary,
        plain_replica,
        pg,
    })
}

async fn plain_read(pool: &Pool) {
    let c = pool.get().await.expect("checkout");
    let s = c.prepare_cached(READ_SQL).await.expect("prepare");
    let row = c.query_one(&s, &[]).await.expect("read");
    assert_eq!(row.get::<_, i32>(0), 1);
}

async fn plain_write(pool: &Pool, v: i64) {
    let c = pool.get().await.expect("checkout");
    let s = c.prepare_cached(WRITE_SQL).await.expect("prepare");
    let n = c.execute(&s, &[&v]).await.expect("write");
    assert_eq!(n, 1);
}

async fn session_read(session: &mut Session) {
    let row = session.query_one(READ_SQL, &[]).await.expect("read");
    assert_eq!(row.get::<_, i32>(0), 1);
}

async fn session_write(session: &mut Session, v: i64) {
    let n = session.execute(WRITE_SQL, &[&v]).await.expect("write");
    assert_eq!(n, 1);
}

async fn service_read(svc: &mut RouterService) {
    let mut req = Request::read(READ_SQL);
    req.capture_token = false;
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("read");
    assert_eq!(resp.rows[0].get::<_, i32>(0), 1);
}

async fn service_write(svc: &mut RouterService, v: i64) {
    let req = Request::write(WRITE_SQL).bind(v);
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("write");
    assert_eq!(resp.rows_affected, 1);
    assert!(resp.token.is_some());
}

/// One benchmarked operation with its own state.
#[derive(Clone)]
enum Variant {
    PlainRead(Pool),
    SessionRead(Session),
    ServiceRead(RouterService),
    PlainWrite(Pool),
    SessionWrite(Session),
    ServiceWrite(RouterService),
}

impl Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::PlainRead(_) => "read/plain",
            Variant::SessionRead(_) => "read/session",
            Variant::ServiceRead(_) => "read/service_no_capture",
            Variant::PlainWrite(_) => "write/plain",
            Variant::SessionWrite(_) => "write/session",
            Variant::ServiceWrite(_) => "write/service",
        }
    }

    /// One call.
    fn call(&mut self, i: u64) -> Pin<Box<dyn Future<Output = ()> + '_>> {
        let v = i as i64;
        match self {
            Variant::PlainRead(p) => Box::pin(plain_read(p)),
            Variant::SessionRead(s) => Box::pin(session_read(s)),
            Variant::ServiceRead(s) => Box::pin(service_read(s)),
            Variant::PlainWrite(p) => Box::pin(plain_write(p, v)),
            Variant::SessionWrite(s) => Box::pin(session_write(s, v)),
            Variant::ServiceWrite(s) => Box::pin(service_write(s, v)),
        }
    }
}

fn variants(env: &Env) -> (Vec<Variant>, Vec<Variant>) {
    let svc = RouterService::new(env.cluster.clone());
    let reads = vec![
        Variant::PlainRead(env.plain_replica.clone()),
        Variant::SessionRead(env.cluster.session()),
        Variant::ServiceRead(svc.clone()),
    ];
    let writes = vec![
        Variant::PlainWrite(env.plain_primary.clone()),
        Variant::SessionWrite(env.cluster.session()),
        Variant::ServiceWrite(svc),
    ];
    (reads, writes)
}

fn criterion_benches(c: &mut Criterion, rt: &Runtime, env: &Env) {
    let (reads, writes) = variants(env);
    for (group_name, vs) in [("read", reads), ("write", writes)] {
        let mut group = c.benchmark_group(group_name);
        group
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        for v in vs {
            let id = v.name().split_once('/').map_or(v.name(), |(_, b)| b);
            group.bench_function(id, |b| {
                b.to_async(rt).iter_custom(|iters| {
                    let mut v = v.clone();
                    async move {
                        let start = Instant::now();
                        for i in 0..iters {
                            v.call(i).await;
                        }
                        start.elapsed()
                    }
                })
            });
        }
        group.finish();
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let k = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[k]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Interleaved blocks of each variant; the first variant is the baseline.
async fn paired(mut vs: Vec<Variant>, rounds: usize, block: usize) -> String {
    // Warm up every variant (connections, statement caches).
    for v in vs.iter_mut() {
        for i in 0..block.min(200) as u64 {
            v.call(i).await;
        }
    }
    let n = vs.len();
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); n];
    let mut block_medians: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut seq = 1_000_000u64;
    for round in 0..rounds {
        for k in 0..n {
            let idx = (round + k) % n;
            let mut lat = Vec::with_capacity(block);
            for _ in 0..block {
                seq += 1;
                let t = Instant::now();
                vs[idx].call(seq).await;
                lat.push(t.elapsed());
            }
            lat.sort();
            block_medians[idx].push(percentile(&lat, 0.5).as_secs_f64());
            all[idx].extend(lat);
        }
    }
    let mut out = String::from(
        "| variant | calls | median µs | p99 µs | ratio to plain (median of rounds) |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for (i, v) in vs.iter().enumerate() {
        let lat = &mut all[i];
        lat.sort();
        let mut ratios: Vec<f64> = block_medians[i]
            .iter()
            .zip(&block_medians[0])
            .map(|(a, b)| a / b)
            .collect();
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.3} |\n",
            v.name(),
            lat.len(),
            percentile(lat, 0.5).as_secs_f64() * 1e6,
            percentile(lat, 0.99).as_secs_f64() * 1e6,
            median(&mut ratios),
        ));
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listing = args.iter().any(|a| a == "--list");
    let test_mode = args.iter().any(|a| a == "--test");
    if listing {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let env = match rt.block_on(setup()) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("end_to_end: skipped, could not start a PostgreSQL cluster: {e}");
            return;
        }
    };

    // Check that the routed reads really go to the replica, like the plain
    // read, and writes to the primary.
    rt.block_on(async {
        let mut s = env.cluster.session();
        session_read(&mut s).await;
        let served = s.last_served().expect("served");
        assert_eq!(served.role, Role::Replica, "routed read not on the replica");
        session_write(&mut s, 0).await;
        assert_eq!(s.last_served().expect("served").role, Role::Primary);
    });

    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &rt, &env);
    c.final_summary();

    if test_mode || std::env::var("LAGROUTER_BENCH_PAIRED").is_ok_and(|v| v == "0") {
        return;
    }
    let rounds = env_usize("LAGROUTER_BENCH_ROUNDS", 30).max(1);
    let block = env_usize("LAGROUTER_BENCH_BLOCK", 300).max(1);
    let (reads, writes) = variants(&env);
    let started = Instant::now();
    let read_table = rt.block_on(paired(reads, rounds, block));
    let write_table = rt.block_on(paired(writes, rounds, block));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\n## Paired comparison ({rounds} rounds x {block} calls per variant, interleaved; {:.1} s; \
         PostgreSQL {}; loadavg {})\n",
        started.elapsed().as_secs_f64(),
        env.pg.backend(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    println!("### Read (`{READ_SQL}`)\n\n{read_table}");
    println!("### Write (`{WRITE_SQL}`)\n\n{write_table}");
    drop(env);
}
