//! End-to-end cost of routing through lagrouter compared with the same call
//! on a plain deadpool-postgres pool, on a real local PostgreSQL 15 primary
//! and replica started by the bench (`lagrouter_testing::PgCluster`).
//!
//! Run with:
//!
//! ```text
//! cargo bench --bench end_to_end
//! LAGROUTER_BENCH_PIN=same cargo bench --bench end_to_end
//! ```
//!
//! It needs the PostgreSQL server binaries (found through `PG_BIN` or
//! `pg_config --bindir`; as root the servers run as the `postgres` user) and
//! takes about two minutes. Without them it prints why and exits.
//!
//! Two parts:
//!
//! 1. Criterion benchmarks `read/*` and `write/*` (small samples, a few
//!    seconds each).
//! 2. A paired comparison printed as markdown tables at the end: every
//!    iteration calls each variant once, in random order, so whatever the
//!    machine does at that moment affects all variants alike. It reports the
//!    median and p99 latency, the client thread's CPU time per call, and as
//!    the overhead figure the median over rounds of
//!    `median(variant) / median(plain)` with its range, and the same against
//!    `plain_pipelined_probe` (what lagrouter adds beyond the probe itself).
//!    `LAGROUTER_BENCH_ROUNDS` (30) × `LAGROUTER_BENCH_PER_ROUND` (300) calls
//!    per variant; `LAGROUTER_BENCH_PAIRED=0` skips it. It is skipped in
//!    criterion's `--test` and `--list` modes; `LAGROUTER_BENCH_CRITERION=0`
//!    runs it alone.
//!
//! Placement (`LAGROUTER_BENCH_PIN`): on a small VM a loopback round trip
//! costs ~10 µs when client and server share a CPU and ~60 µs when the
//! server's CPU must be woken, and the scheduler switches between the two
//! for seconds at a time, which swamps the differences measured here. So by
//! default (`split`) the bench thread is pinned to one CPU and every
//! PostgreSQL process to another (every round trip crosses CPUs, as between
//! hosts); `same` puts everything on one CPU (latency = client + server CPU
//! work: the worst case for the relative cost of extra work); `none` leaves
//! placement to the scheduler.
//!
//! The variants (reads go to the replica, writes to the primary):
//!
//! * `read/plain`: `SELECT 1` on a plain pool: checkout, `prepare_cached`
//!   (a cache hit after the first call), `query_one`;
//! * `read/plain_pipelined_probe`: the same plus lagrouter's position query
//!   (`lagrouter::probe::POSITION_SQL`) pipelined by hand: the cost of the
//!   probe alone, without lagrouter;
//! * `read/session`: [`Session::query_one`] with the default read-your-writes
//!   policy: route, checkout and run; monotonic reads follow the session's
//!   last read, with no position probe (the session stays on its replica);
//! * `read/service_no_capture`: [`RouterService`] with `capture_token =
//!   false`: routing only, nothing pipelined;
//! * `write/plain`: a single-row `INSERT` on a plain pool;
//! * `write/plain_pipelined_probe`, `write/plain_sequential_probe`: the same
//!   plus the position query by hand, pipelined (one round trip) or after it
//!   (two round trips);
//! * `write/session`: [`Session::execute`], which pipelines the position
//!   query after the insert to capture the token;
//! * `write/service`: the same through [`RouterService`].
//!
//! The plain calls use lagrouter's own pools (`Cluster::nodes()[i].pool`),
//! so both sides use the same connections and server processes, with
//! prepared, per-connection cached statements. `LAGROUTER_BENCH_SEPARATE_POOLS=1`
//! uses separate pools built the same way ([`Connector::pool`]) instead.
//! Results are in `BENCHMARKS.md`.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use criterion::Criterion;
use deadpool_postgres::Pool;
use lagrouter::probe::POSITION_SQL;
use lagrouter::{Cluster, Connector, Request, Role, RouterService, Session};
use lagrouter_testing::PgCluster;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;
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
    // The plain calls use lagrouter's own pools (`Cluster::nodes()[i].pool`):
    // the same connections, hence the same server processes. With separate
    // pools the comparison depends on where the scheduler puts each backend
    // process: on this 2-vCPU VM a round trip to a backend on the client's
    // CPU takes ~10 µs and one on the other (idle, halted) CPU ~60 µs, and
    // which is which persists for seconds. Set LAGROUTER_BENCH_SEPARATE_POOLS=1
    // for separate pools built the same way (`Connector::pool`).
    let (plain_primary, plain_replica) =
        if std::env::var("LAGROUTER_BENCH_SEPARATE_POOLS").is_ok_and(|v| v == "1") {
            let timeout = Some(Duration::from_secs(5));
            (
                Connector::NoTls.pool(pg.config(pg.primary()), POOL_SIZE, timeout)?,
                Connector::NoTls.pool(pg.config(replica), POOL_SIZE, timeout)?,
            )
        } else {
            (
                cluster.nodes()[0].pool.clone(),
                cluster.nodes()[1].pool.clone(),
            )
        };
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

/// The statement and lagrouter's position probe (`POSITION_SQL`) by hand on
/// a plain pool: pipelined (both sent before either answer is awaited, one
/// round trip, as lagrouter does) or sequential (two round trips).
async fn plain_with_probe(pool: &Pool, sql: &str, v: Option<i64>, pipelined: bool) {
    let c = pool.get().await.expect("checkout");
    let (s, p) =
        tokio::try_join!(c.prepare_cached(sql), c.prepare_cached(POSITION_SQL)).expect("prepare");
    let params: Vec<&(dyn ToSql + Sync)> = match &v {
        Some(v) => vec![v],
        None => vec![],
    };
    let (main, probe) = if pipelined {
        // Both requests go out on the first poll of the join.
        tokio::join!(c.query(&s, &params), c.query_one(&p, &[]))
    } else {
        let main = c.query(&s, &params).await;
        (main, c.query_one(&p, &[]).await)
    };
    main.expect("statement");
    let lsn: Option<&str> = probe.as_ref().expect("probe").get(1);
    assert!(lsn.is_some());
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
    PlainReadPipelinedProbe(Pool),
    SessionRead(Session),
    ServiceRead(RouterService),
    PlainWrite(Pool),
    PlainWritePipelinedProbe(Pool),
    PlainWriteSequentialProbe(Pool),
    SessionWrite(Session),
    ServiceWrite(RouterService),
}

impl Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::PlainRead(_) => "read/plain",
            Variant::PlainReadPipelinedProbe(_) => "read/plain_pipelined_probe",
            Variant::SessionRead(_) => "read/session",
            Variant::ServiceRead(_) => "read/service_no_capture",
            Variant::PlainWrite(_) => "write/plain",
            Variant::PlainWritePipelinedProbe(_) => "write/plain_pipelined_probe",
            Variant::PlainWriteSequentialProbe(_) => "write/plain_sequential_probe",
            Variant::SessionWrite(_) => "write/session",
            Variant::ServiceWrite(_) => "write/service",
        }
    }

    /// One call.
    fn call(&mut self, i: u64) -> Pin<Box<dyn Future<Output = ()> + '_>> {
        let v = i as i64;
        match self {
            Variant::PlainRead(p) => Box::pin(plain_read(p)),
            Variant::PlainReadPipelinedProbe(p) => {
                Box::pin(plain_with_probe(p, READ_SQL, None, true))
            }
            Variant::SessionRead(s) => Box::pin(session_read(s)),
            Variant::ServiceRead(s) => Box::pin(service_read(s)),
            Variant::PlainWrite(p) => Box::pin(plain_write(p, v)),
            Variant::PlainWritePipelinedProbe(p) => {
                Box::pin(plain_with_probe(p, WRITE_SQL, Some(v), true))
            }
            Variant::PlainWriteSequentialProbe(p) => {
                Box::pin(plain_with_probe(p, WRITE_SQL, Some(v), false))
            }
            Variant::SessionWrite(s) => Box::pin(session_write(s, v)),
            Variant::ServiceWrite(s) => Box::pin(service_write(s, v)),
        }
    }
}

fn variants(env: &Env) -> (Vec<Variant>, Vec<Variant>) {
    let svc = RouterService::new(env.cluster.clone());
    let reads = vec![
        Variant::PlainRead(env.plain_replica.clone()),
        Variant::PlainReadPipelinedProbe(env.plain_replica.clone()),
        Variant::SessionRead(env.cluster.session()),
        Variant::ServiceRead(svc.clone()),
    ];
    let writes = vec![
        Variant::PlainWrite(env.plain_primary.clone()),
        Variant::PlainWritePipelinedProbe(env.plain_primary.clone()),
        Variant::PlainWriteSequentialProbe(env.plain_primary.clone()),
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

/// Where the client and the servers run (`LAGROUTER_BENCH_PIN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// Client on one CPU, every PostgreSQL process on another: each round
    /// trip crosses CPUs, as between hosts (default when 2 CPUs are allowed).
    Split,
    /// Everything on one CPU: latency is the sum of client and server CPU
    /// work, the worst case for the relative cost of extra work.
    Same,
    /// Wherever the scheduler puts them.
    None,
}

impl Placement {
    fn from_env(cpus: &[usize]) -> Placement {
        match std::env::var("LAGROUTER_BENCH_PIN").as_deref() {
            Ok("none") => Placement::None,
            Ok("same") if !cpus.is_empty() => Placement::Same,
            Ok("split") | Err(_) if cpus.len() >= 2 => Placement::Split,
            _ => Placement::None,
        }
    }
}

/// CPUs this thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: plain libc calls on a zeroed, properly sized cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread (and what it spawns from now on) to `cpu`.
fn pin_thread(cpu: usize) {
    // SAFETY: plain libc calls on a zeroed, properly sized cpu_set_t.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if !ok {
        eprintln!("end_to_end: could not pin to CPU {cpu}");
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// CPU time of the calling thread. With the current-thread runtime, the
/// client's whole work (including the connection tasks) runs on it.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the struct we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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

/// Per-call interleaving: each iteration calls every variant once (in a new
/// random order, so that no variant always follows the same one), so that whatever the machine does at that moment affects all
/// variants alike. `rounds` rounds of `per_round` iterations; the overhead
/// figure is the median over rounds of `median(variant) / median(plain)`
/// (the first variant is the baseline), with the range over rounds, and the
/// same against the second variant (plain + the position probe by hand).
async fn paired(mut vs: Vec<Variant>, rounds: usize, per_round: usize) -> String {
    // Warm up every variant (connections, statement caches).
    for v in vs.iter_mut() {
        for i in 0..200 {
            v.call(i).await;
        }
    }
    let n = vs.len();
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); n];
    let mut round_ratios: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut probe_ratios: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut cpu: Vec<Duration> = vec![Duration::ZERO; n];
    let mut seq = 1_000_000u64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..rounds {
        let mut lat: Vec<Vec<Duration>> = vec![Vec::with_capacity(per_round); n];
        for _ in 0..per_round {
            order.shuffle(&mut rng);
            for &idx in &order {
                seq += 1;
                let c0 = thread_cpu();
                let t = Instant::now();
                vs[idx].call(seq).await;
                lat[idx].push(t.elapsed());
                cpu[idx] += thread_cpu().saturating_sub(c0);
            }
        }
        let medians: Vec<f64> = lat
            .iter_mut()
            .map(|l| {
                l.sort();
                percentile(l, 0.5).as_secs_f64()
            })
            .collect();
        for i in 0..n {
            round_ratios[i].push(medians[i] / medians[0]);
            probe_ratios[i].push(medians[i] / medians[1.min(n - 1)]);
            all[i].extend_from_slice(&lat[i]);
        }
    }
    let mut out = String::from(
        "| variant | calls | median µs | p99 µs | client CPU µs/call | vs plain: median of rounds (range) | vs plain + probe by hand |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, v) in vs.iter().enumerate() {
        let lat = &mut all[i];
        lat.sort();
        let ratios = &mut round_ratios[i];
        let mid = median(ratios);
        let vs_probe = median(&mut probe_ratios[i]);
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.3} ({:.2}–{:.2}) | {:.3} |\n",
            v.name(),
            lat.len(),
            percentile(lat, 0.5).as_secs_f64() * 1e6,
            percentile(lat, 0.99).as_secs_f64() * 1e6,
            cpu[i].as_secs_f64() * 1e6 / lat.len().max(1) as f64,
            mid,
            ratios.first().copied().unwrap_or(f64::NAN),
            ratios.last().copied().unwrap_or(f64::NAN),
            vs_probe,
        ));
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listing = args.iter().any(|a| a == "--list");
    // `cargo bench` passes `--bench`; without it (e.g. `cargo test --benches`)
    // criterion runs every benchmark once as a test, and so do we.
    let test_mode = args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench");
    if listing {
        return;
    }
    let cpus = allowed_cpus();
    let pin = Placement::from_env(&cpus);
    // The servers inherit the affinity of the thread that starts them.
    match pin {
        Placement::Split => pin_thread(cpus[1]),
        Placement::Same => pin_thread(cpus[0]),
        Placement::None => {}
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

    if pin == Placement::Split {
        pin_thread(cpus[0]);
    }
    let pin_label = match pin {
        Placement::Split => format!("client on CPU {}, servers on CPU {}", cpus[0], cpus[1]),
        Placement::Same => format!("client and servers on CPU {}", cpus[0]),
        Placement::None => "not pinned".to_string(),
    };
    eprintln!("end_to_end: {pin_label}");

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

    if std::env::var("LAGROUTER_BENCH_CRITERION").is_ok_and(|v| v == "0") {
        eprintln!("end_to_end: criterion part skipped (LAGROUTER_BENCH_CRITERION=0)");
    } else {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c, &rt, &env);
        c.final_summary();
    }

    if test_mode || std::env::var("LAGROUTER_BENCH_PAIRED").is_ok_and(|v| v == "0") {
        return;
    }
    let rounds = env_usize("LAGROUTER_BENCH_ROUNDS", 30).max(1);
    let per_round = env_usize("LAGROUTER_BENCH_PER_ROUND", 300).max(1);
    let (reads, writes) = variants(&env);
    let started = Instant::now();
    let read_table = rt.block_on(paired(reads, rounds, per_round));
    let write_table = rt.block_on(paired(writes, rounds, per_round));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\n## Paired comparison ({rounds} rounds x {per_round} calls per variant, interleaved call by call; {:.1} s; \
         {pin_label}; PostgreSQL {}; loadavg {})\n",
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
