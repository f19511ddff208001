//! Read-your-writes workload: what each consistency policy does to
//! correctness and latency when replicas lag.
//!
//! Starts a local PostgreSQL 15 primary with two streaming replicas
//! (`lagrouter_testing::PgCluster`), then for each policy × lag scenario runs
//! for a fixed time:
//!
//! * `--writers` writer sessions, each looping: insert a row `(writer, seq)`
//!   on the primary, read it back at once ("immediate"), wait a random think
//!   time in `[0, --think)`, read it back again ("delayed"). A read-back that
//!   does not find the row is a **read-your-writes violation**.
//! * `--readers` reader sessions, each looping: pick a writer at random and
//!   read `max(seq)` of its rows. Every reader remembers the highest value it
//!   saw per writer; a lower one later is a **monotonic-read violation** (the
//!   session went back in time).
//!
//! Every read also returns `pg_is_in_recovery()`, so the share of reads
//! served by replicas is measured at the server, separately for writers and
//! readers.
//!
//! Lag scenarios (`--lag`, comma separated, or `all` for the three below):
//!
//! * `0ms`: plain streaming replication on loopback (sub-millisecond lag);
//! * `50ms` (any `<N>ms`): `recovery_min_apply_delay` on the replicas;
//! * `paused`: replay paused on the replicas for `--pause` (1 s) in the
//!   middle of the run, then resumed.
//!
//! `--lag-on first` applies the lag to the first replica only (the second
//! stays current), which is when naive splitting goes back in time.
//!
//! Policies (`--policy`, comma separated, or `all`):
//!
//! * `ryw`: [`Consistency::ReadYourWrites`] (wait up to `--max-wait` for a
//!   replica that reached the token, then the primary);
//! * `bounded`: [`Consistency::BoundedStaleness`] (`--bound`), token honoured;
//! * `bounded-notoken` (and `ryw-notoken`, not in `all`): the same policy
//!   with a new session for every statement, i.e. an application that does
//!   not carry the token from one request to the next;
//! * `window`: [`Consistency::PrimaryAfterWrite`] (`--window`, 20 ms): the
//!   time-window heuristic, primary for a while after a write;
//! * `eventual`: [`Consistency::Eventual`], the naive read/write split
//!   (reads straight to a replica, no token);
//! * `primary`: [`Consistency::Primary`], everything on the primary.
//!
//! `--target proxy` runs the same sessions as tokio-postgres connections to
//! lagrouter-proxy (build it first: `cargo build --release -p
//! lagrouter-proxy`): each scenario starts `--proxy-bin` with a generated
//! TOML configuration for that policy over the same cluster, and stops it
//! afterwards. The proxy keeps the token per connection. The `-notoken`
//! variants are library-only.
//!
//! Run:
//!
//! ```text
//! cargo run --release --example ryw_workload -- --policy ryw --lag 50ms
//! # every policy x lag, 3 s each, one table (what BENCHMARKS.md shows):
//! cargo run --release --example ryw_workload -- --policy all --lag all
//! cargo run --release --example ryw_workload -- --policy all --lag all --lag-on first
//! # through lagrouter-proxy instead of the library:
//! cargo run --release --example ryw_workload -- --target proxy --policy all --lag all
//! ```
//!
//! Each scenario prints one JSON line; a markdown table of all of them
//! follows at the end. Besides the violations and replica shares it gives
//! p50/p99 latencies per statement, **fallbacks** (reads meant for a replica
//! and served elsewhere, by reason in the JSON) and **waits** (reads that
//! waited at least 2 ms for a replica to reach their token, with the mean
//! wait). Through the proxy these two come from the proxy's metrics
//! (`lagrouter_proxy_fallbacks_total`, `lagrouter_proxy_token_waits_total`,
//! `lagrouter_proxy_token_wait_seconds`), which count every token wait.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use lagrouter::{Cluster, Consistency, Session};
use lagrouter_testing::PgCluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Parser, Debug, Clone)]
#[command(about = "Read-your-writes workload over a primary and two lagging replicas")]
struct Args {
    /// Writer sessions.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Reader sessions.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Run time of each scenario (default 10s for one scenario, 3s each with
    /// several).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Lag scenarios: `0ms`, `<N>ms`, `paused`, comma separated, or `all`.
    #[arg(long, default_value = "0ms")]
    lag: String,
    /// Which replicas lag.
    #[arg(long, value_enum, default_value_t = LagOn::All)]
    lag_on: LagOn,
    /// How long replay stays paused in the `paused` scenario.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pause: Duration,
    /// Policies: ryw, bounded, window, eventual, primary, comma separated,
    /// or `all`.
    #[arg(long, default_value = "ryw")]
    policy: String,
    /// `max_wait` of the read-your-writes policy.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    max_wait: Duration,
    /// Staleness bound of the bounded-staleness policy.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    bound: Duration,
    /// Window of the primary-after-write (time window) policy.
    #[arg(long, value_parser = parse_duration, default_value = "20ms")]
    window: Duration,
    /// Writers wait a random time below this between the immediate and the
    /// delayed read-back.
    #[arg(long, value_parser = parse_duration, default_value = "40ms")]
    think: Duration,
    /// Readers pause this long between reads.
    #[arg(long, value_parser = parse_duration, default_value = "2ms")]
    reader_think: Duration,
    /// Probe interval of the lag monitor.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    monitor_interval: Duration,
    /// Through the library, or through lagrouter-proxy with plain
    /// tokio-postgres clients (the proxy applies its configured policy).
    #[arg(long, value_enum, default_value_t = Target::Library)]
    target: Target,
    /// The proxy binary (`--target proxy`); built with
    /// `cargo build --release -p lagrouter-proxy`.
    #[arg(long, default_value = "target/release/lagrouter-proxy")]
    proxy_bin: String,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print only the JSON lines, no table.
    #[arg(long)]
    json_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LagOn {
    All,
    First,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Library,
    Proxy,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "ms"), |i| s.split_at(i));
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let ms = match unit {
        "ms" => v,
        "s" => v * 1000.0,
        "us" | "µs" => v / 1000.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, us)")),
    };
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lag {
    Delay(Duration),
    Paused,
}

impl Lag {
    fn label(&self) -> String {
        match self {
            Lag::Delay(d) => format!("{}ms", d.as_millis()),
            Lag::Paused => "paused".into(),
        }
    }
}

fn parse_lags(s: &str) -> Result<Vec<Lag>, String> {
    if s == "all" {
        return Ok(vec![
            Lag::Delay(Duration::ZERO),
            Lag::Delay(Duration::from_millis(50)),
            Lag::Paused,
        ]);
    }
    s.split(',')
        .map(|p| match p.trim() {
            "paused" => Ok(Lag::Paused),
            other => parse_duration(other).map(Lag::Delay),
        })
        .collect()
}

fn parse_policies(s: &str, a: &Args) -> Result<Vec<(&'static str, Consistency)>, String> {
    let names: Vec<&str> = if s == "all" {
        vec![
            "ryw",
            "bounded",
            "bounded-notoken",
            "window",
            "eventual",
            "primary",
        ]
    } else {
        s.split(',').map(str::trim).collect()
    };
    names
        .into_iter()
        .map(|n| match n {
            "ryw" | "read-your-writes" => Ok(("ryw", Consistency::read_your_writes(a.max_wait))),
            "bounded" | "bounded-staleness" => {
                Ok(("bounded", Consistency::BoundedStaleness(a.bound)))
            }
            "bounded-notoken" => Ok(("bounded-notoken", Consistency::BoundedStaleness(a.bound))),
            "ryw-notoken" => Ok(("ryw-notoken", Consistency::read_your_writes(a.max_wait))),
            "window" | "primary-after-write" => {
                Ok(("window", Consistency::PrimaryAfterWrite(a.window)))
            }
            "eventual" | "naive" => Ok(("eventual", Consistency::Eventual)),
            "primary" => Ok(("primary", Consistency::Primary)),
            other => Err(format!("unknown policy {other:?}")),
        })
        .collect()
}

/// What one read observed besides its value.
#[derive(Default, Clone, Copy)]
struct Obs {
    replica: bool,
    waited: Duration,
    fallback: Option<&'static str>,
}

/// A client session: a lagrouter [`Session`] or a connection to the proxy.
enum Client {
    Library(Session),
    /// A new session (no token) for every statement: a stateless
    /// application that does not carry tokens between requests.
    LibraryNoToken(Cluster, Consistency),
    Proxy(tokio_postgres::Client),
}

const INSERT_SQL: &str = "INSERT INTO ryw (writer, seq) VALUES ($1, $2)";
const READ_ROW_SQL: &str =
    "SELECT (SELECT seq FROM ryw WHERE writer = $1 AND seq = $2), pg_is_in_recovery()";
const READ_MAX_SQL: &str = "SELECT max(seq), pg_is_in_recovery() FROM ryw WHERE writer = $1";

/// Token checks that took at least this long count as waits (the first
/// re-check of a replica's position comes after `wait_poll`, 2 ms).
const WAIT_THRESHOLD: Duration = Duration::from_millis(2);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Client {
    async fn write(&mut self, writer: i32, seq: i32) -> Result<(), BoxError> {
        match self {
            Client::Library(s) => {
                s.execute(INSERT_SQL, &[&writer, &seq]).await?;
            }
            Client::LibraryNoToken(c, p) => {
                let mut s = c.session().with_policy(*p);
                s.execute(INSERT_SQL, &[&writer, &seq]).await?;
            }
            Client::Proxy(c) => {
                c.execute(INSERT_SQL, &[&writer, &seq]).await?;
            }
        }
        Ok(())
    }

    /// Runs a one-row read returning `(Option<i32>, bool)`.
    async fn read(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(Option<i32>, Obs), BoxError> {
        if let Client::Proxy(c) = self {
            let row = c.query_one(sql, params).await?;
            let obs = Obs {
                replica: row.get(1),
                ..Obs::default()
            };
            return Ok((row.get(0), obs));
        }
        let mut fresh;
        let s = match self {
            Client::Library(s) => s,
            Client::LibraryNoToken(c, p) => {
                fresh = c.session().with_policy(*p);
                &mut fresh
            }
            Client::Proxy(_) => unreachable!("handled above"),
        };
        let row = s.query_one(sql, params).await?;
        let served = s.last_served().expect("a read was served");
        let obs = Obs {
            replica: row.get(1),
            waited: served.waited,
            fallback: served.fallback.map(|f| f.label()),
        };
        Ok((row.get(0), obs))
    }
}

/// Counters and latencies of one session; merged per scenario.
#[derive(Default)]
struct Stats {
    writes: u64,
    write_lat: Vec<Duration>,
    writer_reads: u64,
    writer_replica_reads: u64,
    writer_read_lat: Vec<Duration>,
    ryw_immediate: u64,
    ryw_delayed: u64,
    reader_reads: u64,
    reader_replica_reads: u64,
    reader_read_lat: Vec<Duration>,
    monotonic: u64,
    fallbacks: BTreeMap<String, u64>,
    waits: u64,
    waited: Duration,
    errors: u64,
    first_error: Option<String>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.writes += o.writes;
        self.write_lat.extend(o.write_lat);
        self.writer_reads += o.writer_reads;
        self.writer_replica_reads += o.writer_replica_reads;
        self.writer_read_lat.extend(o.writer_read_lat);
        self.ryw_immediate += o.ryw_immediate;
        self.ryw_delayed += o.ryw_delayed;
        self.reader_reads += o.reader_reads;
        self.reader_replica_reads += o.reader_replica_reads;
        self.reader_read_lat.extend(o.reader_read_lat);
        self.monotonic += o.monotonic;
        for (k, v) in o.fallbacks {
            *self.fallbacks.entry(k).or_default() += v;
        }
        self.waits += o.waits;
        self.waited += o.waited;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn observe(&mut self, obs: &Obs) {
        if let Some(f) = obs.fallback {
            *self.fallbacks.entry(f.to_string()).or_default() += 1;
        }
        // `waited` also counts the routing time of reads that did not wait;
        // a real wait polls a replica's position at least once (the first
        // poll comes after 2 ms).
        if obs.waited >= WAIT_THRESHOLD {
            self.waits += 1;
            self.waited += obs.waited;
        }
    }

    fn error(&mut self, e: BoxError) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

fn pct_ms(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let k = ((v.len() - 1) as f64 * p).round() as usize;
    v[k].as_secs_f64() * 1000.0
}

fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        f64::NAN
    } else {
        part as f64 / total as f64
    }
}

async fn writer_loop(
    mut client: Client,
    writer: i32,
    deadline: Instant,
    think: Duration,
    seed: u64,
) -> Stats {
    let mut st = Stats::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq = 0i32;
    while Instant::now() < deadline {
        seq += 1;
        let t = Instant::now();
        if let Err(e) = client.write(writer, seq).await {
            st.error(e);
            continue;
        }
        st.write_lat.push(t.elapsed());
        st.writes += 1;
        for delayed in [false, true] {
            if delayed && !think.is_zero() {
                let d = think.mul_f64(rng.random::<f64>());
                tokio::time::sleep(d).await;
            }
            let t = Instant::now();
            match client.read(READ_ROW_SQL, &[&writer, &seq]).await {
                Ok((found, obs)) => {
                    st.writer_read_lat.push(t.elapsed());
                    st.writer_reads += 1;
                    st.writer_replica_reads += u64::from(obs.replica);
                    st.observe(&obs);
                    if found != Some(seq) {
                        if delayed {
                            st.ryw_delayed += 1;
                        } else {
                            st.ryw_immediate += 1;
                        }
                    }
                }
                Err(e) => st.error(e),
            }
        }
    }
    st
}

async fn reader_loop(
    mut client: Client,
    writers: Vec<i32>,
    deadline: Instant,
    think: Duration,
    seed: u64,
) -> Stats {
    let mut st = Stats::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: HashMap<i32, i32> = HashMap::new();
    while Instant::now() < deadline {
        let w = writers[rng.random_range(0..writers.len())];
        let t = Instant::now();
        match client.read(READ_MAX_SQL, &[&w]).await {
            Ok((max, obs)) => {
                st.reader_read_lat.push(t.elapsed());
                st.reader_reads += 1;
                st.reader_replica_reads += u64::from(obs.replica);
                st.observe(&obs);
                let max = max.unwrap_or(0);
                let hw = seen.entry(w).or_insert(0);
                if max < *hw {
                    st.monotonic += 1;
                } else {
                    *hw = max;
                }
            }
            Err(e) => st.error(e),
        }
        if !think.is_zero() {
            tokio::time::sleep(think).await;
        }
    }
    st
}

/// What the proxy target needs: a running proxy and how to reach it.
struct ProxyProcess {
    child: tokio::process::Child,
    config: tokio_postgres::Config,
    admin_port: u16,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `lagrouter-proxy --config` over `pg` with `policy`.
    async fn start(
        args: &Args,
        pg: &PgCluster,
        policy: &str,
        policy_cfg: Consistency,
    ) -> Result<ProxyProcess, BoxError> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let admin_port = free_port()?;
        let mut toml = format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\n\
             [routing]\npolicy = \"{}\"\nmonitor_interval = \"{}ms\"\n",
            proxy_policy_name(policy),
            args.monitor_interval.as_millis()
        );
        match policy_cfg {
            Consistency::ReadYourWrites { max_wait, .. } => {
                toml.push_str(&format!("max_wait = \"{}ms\"\n", max_wait.as_millis()));
            }
            Consistency::BoundedStaleness(b) => {
                toml.push_str(&format!("max_lag = \"{}ms\"\n", b.as_millis()));
            }
            Consistency::PrimaryAfterWrite(w) => {
                toml.push_str(&format!("primary_window = \"{}ms\"\n", w.as_millis()));
            }
            _ => {}
        }
        toml.push_str("\n[pool]\nsize = 16\n");
        for (i, node) in std::iter::once(pg.primary())
            .chain(pg.replicas())
            .enumerate()
        {
            let c = pg.config(node);
            let host = match &c.get_hosts()[0] {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                #[allow(unreachable_patterns)]
                _ => "127.0.0.1".into(),
            };
            toml.push_str(&format!(
                "\n[[nodes]]\nname = \"{}\"\nhost = \"{host}\"\nport = {}\nrole = \"{}\"\n",
                if i == 0 {
                    "primary".to_string()
                } else {
                    format!("replica{i}")
                },
                c.get_ports()[0],
                if i == 0 { "primary" } else { "replica" },
            ));
        }
        toml.push_str(
            "\n[[users]]\nname = \"postgres\"\npassword = \"postgres\"\nauth = \"scram-sha-256\"\n",
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, &toml)?;
        let child = tokio::process::Command::new(&args.proxy_bin)
            .arg("--config")
            .arg(&path)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", args.proxy_bin))?;
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .password("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let proxy = ProxyProcess {
            child,
            config,
            admin_port,
            _dir: dir,
        };
        // Wait until it accepts connections and answers.
        let start = Instant::now();
        loop {
            match proxy.connect().await {
                Ok(c) if c.simple_query("SELECT 1").await.is_ok() => return Ok(proxy),
                _ if start.elapsed() > Duration::from_secs(30) => {
                    return Err("lagrouter-proxy did not answer within 30 s".into());
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, BoxError> {
        let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The proxy's Prometheus metrics (`GET /metrics` on the admin port).
    async fn metrics(&self) -> Result<String, BoxError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok(body)
    }

    /// Copies the proxy's fallback and token-wait counters into `st`.
    async fn collect(&self, st: &mut Stats) {
        let text = match self.metrics().await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("could not read the proxy's metrics: {e}");
                return;
            }
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = key.split('{').next().unwrap_or(key);
            match name {
                "lagrouter_proxy_fallbacks_total" => {
                    let reason = key
                        .split("reason=\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .unwrap_or("unknown");
                    *st.fallbacks.entry(reason.to_string()).or_default() += value as u64;
                }
                "lagrouter_proxy_token_waits_total" => st.waits += value as u64,
                "lagrouter_proxy_token_wait_seconds_sum" => {
                    st.waited += Duration::from_secs_f64(value.max(0.0));
                }
                _ => {}
            }
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn proxy_policy_name(policy: &str) -> &'static str {
    match policy {
        "ryw" => "read-your-writes",
        "bounded" => "bounded-staleness",
        "window" => "primary-after-write",
        "eventual" => "eventual",
        _ => "primary",
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Outcome {
    policy: &'static str,
    lag: String,
    stats: Stats,
    elapsed: Duration,
}

async fn apply_lag(pg: &PgCluster, lag: Lag, on: LagOn) -> Result<(), BoxError> {
    if let Lag::Delay(d) = lag {
        if !d.is_zero() {
            for r in lagging(pg, on) {
                pg.set_apply_delay(r, d).await?;
            }
        }
    }
    Ok(())
}

fn lagging(pg: &PgCluster, on: LagOn) -> Vec<usize> {
    let r = pg.replicas();
    match on {
        LagOn::All => r,
        LagOn::First => r.into_iter().take(1).collect(),
    }
}

async fn reset_lag(pg: &PgCluster, cluster: &Cluster) -> Result<(), BoxError> {
    for r in pg.replicas() {
        pg.set_apply_delay(r, Duration::ZERO).await?;
        pg.resume_replay(r).await?;
    }
    pg.wait_caught_up(Duration::from_secs(60)).await?;
    // Let the lag monitor see the caught-up replicas.
    let generation = cluster.topology().generation;
    cluster
        .monitor()
        .wait_for(Duration::from_secs(10), |t| {
            t.generation >= generation + 2
                && t.nodes
                    .iter()
                    .all(|n| n.healthy && n.lag.is_none_or(|l| l.is_zero()))
        })
        .await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_scenario(
    args: &Args,
    pg: &Arc<PgCluster>,
    cluster: &Cluster,
    run: usize,
    policy_name: &'static str,
    policy: Consistency,
    lag: Lag,
    duration: Duration,
) -> Result<Outcome, BoxError> {
    reset_lag(pg, cluster).await?;
    apply_lag(pg, lag, args.lag_on).await?;
    if args.target == Target::Proxy && policy_name.ends_with("-notoken") {
        return Err(format!("{policy_name} is a library-only variant").into());
    }
    let proxy = match args.target {
        Target::Proxy => Some(ProxyProcess::start(args, pg, policy_name, policy).await?),
        Target::Library => None,
    };
    let mut clients = Vec::new();
    for _ in 0..args.writers + args.readers {
        clients.push(match &proxy {
            Some(p) => Client::Proxy(p.connect().await?),
            None if policy_name.ends_with("-notoken") => {
                Client::LibraryNoToken(cluster.clone(), policy)
            }
            None => Client::Library(cluster.session().with_policy(policy)),
        });
    }
    let writer_ids: Vec<i32> = (0..args.writers).map(|w| (run * 1000 + w) as i32).collect();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let seed = args.seed ^ ((run as u64) << 32) ^ i as u64;
        tasks.push(if i < args.writers {
            tokio::spawn(writer_loop(
                client,
                writer_ids[i],
                deadline,
                args.think,
                seed,
            ))
        } else {
            tokio::spawn(reader_loop(
                client,
                writer_ids.clone(),
                deadline,
                args.reader_think,
                seed,
            ))
        });
    }
    let injector = if lag == Lag::Paused {
        let pg = Arc::clone(pg);
        let nodes = lagging(&pg, args.lag_on);
        let pause = args.pause;
        let at = start + duration.saturating_sub(pause) / 2;
        Some(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            for &r in &nodes {
                pg.pause_replay(r).await?;
            }
            tokio::time::sleep(pause).await;
            for &r in &nodes {
                pg.resume_replay(r).await?;
            }
            Ok::<(), lagrouter_testing::HarnessError>(())
        }))
    } else {
        None
    };
    let mut stats = Stats::default();
    for t in tasks {
        stats.merge(t.await?);
    }
    let elapsed = start.elapsed();
    if let Some(inj) = injector {
        inj.await??;
    }
    if let Some(p) = proxy {
        p.collect(&mut stats).await;
        p.stop().await;
    }
    Ok(Outcome {
        policy: policy_name,
        lag: lag.label(),
        stats,
        elapsed,
    })
}

fn to_json(o: &mut Outcome, args: &Args) -> serde_json::Value {
    let s = &mut o.stats;
    json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "policy": o.policy,
        "lag": o.lag,
        "lag_on": format!("{:?}", args.lag_on).to_lowercase(),
        "seconds": (o.elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "writers": args.writers,
        "readers": args.readers,
        "writes": s.writes,
        "writer_reads": s.writer_reads,
        "reader_reads": s.reader_reads,
        "ryw_violations": s.ryw_immediate + s.ryw_delayed,
        "ryw_violations_immediate": s.ryw_immediate,
        "ryw_violations_delayed": s.ryw_delayed,
        "monotonic_violations": s.monotonic,
        "writer_replica_share": share(s.writer_replica_reads, s.writer_reads),
        "reader_replica_share": share(s.reader_replica_reads, s.reader_reads),
        "write_p50_ms": pct_ms(&mut s.write_lat, 0.5),
        "write_p99_ms": pct_ms(&mut s.write_lat, 0.99),
        "writer_read_p50_ms": pct_ms(&mut s.writer_read_lat, 0.5),
        "writer_read_p99_ms": pct_ms(&mut s.writer_read_lat, 0.99),
        "reader_read_p50_ms": pct_ms(&mut s.reader_read_lat, 0.5),
        "reader_read_p99_ms": pct_ms(&mut s.reader_read_lat, 0.99),
        "fallbacks": s.fallbacks.values().sum::<u64>(),
        "fallbacks_by_reason": s.fallbacks,
        "waits": s.waits,
        "wait_ms_mean": if s.waits == 0 { 0.0 } else { s.waited.as_secs_f64() * 1000.0 / s.waits as f64 },
        "errors": s.errors,
        "first_error": s.first_error,
    })
}

fn table(rows: &[serde_json::Value]) -> String {
    let mut out = String::from(
        "| policy | lag | writes | reads (writers / readers) | RYW violations (immediate + delayed) | \
         monotonic violations | replica share (writers / readers) | write p50 / p99 ms | \
         writer read p50 / p99 ms | reader read p50 / p99 ms | fallbacks | waits (mean wait ms) | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let u = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} / {} | {} ({} + {}) | {} | {:.0}% / {:.0}% | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} | {} ({:.1}) | {} |\n",
            r["policy"].as_str().unwrap_or("?"),
            r["lag"].as_str().unwrap_or("?"),
            u(r, "writes"),
            u(r, "writer_reads"),
            u(r, "reader_reads"),
            u(r, "ryw_violations"),
            u(r, "ryw_violations_immediate"),
            u(r, "ryw_violations_delayed"),
            u(r, "monotonic_violations"),
            f(r, "writer_replica_share") * 100.0,
            f(r, "reader_replica_share") * 100.0,
            f(r, "write_p50_ms"),
            f(r, "write_p99_ms"),
            f(r, "writer_read_p50_ms"),
            f(r, "writer_read_p99_ms"),
            f(r, "reader_read_p50_ms"),
            f(r, "reader_read_p99_ms"),
            u(r, "fallbacks"),
            u(r, "waits"),
            f(r, "wait_ms_mean"),
            u(r, "errors"),
        ));
    }
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let lags = parse_lags(&args.lag)?;
    let mut policies = parse_policies(&args.policy, &args)?;
    if args.target == Target::Proxy && args.policy == "all" {
        // The no-token variants are a library-only illustration.
        policies.retain(|(name, _)| !name.ends_with("-notoken"));
    }
    if args.writers == 0 {
        return Err("--writers must be at least 1".into());
    }
    let scenarios = lags.len() * policies.len();
    let duration = args.duration.unwrap_or(if scenarios > 1 {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    });
    if lags.contains(&Lag::Paused) && duration < args.pause + Duration::from_millis(500) {
        return Err("--duration must exceed --pause by at least 500ms".into());
    }

    eprintln!("starting PostgreSQL primary + 2 replicas ...");
    let pg = Arc::new(PgCluster::start(2).await?);
    {
        let c = pg.connect(pg.primary()).await?;
        c.batch_execute(
            "CREATE TABLE ryw (writer int NOT NULL, seq int NOT NULL, \
             at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (writer, seq))",
        )
        .await?;
    }
    pg.wait_caught_up(Duration::from_secs(60)).await?;
    let mut builder = Cluster::builder()
        .primary(pg.config(pg.primary()))
        .monitor_interval(args.monitor_interval)
        .pool_size(16);
    for r in pg.replicas() {
        builder = builder.replica(pg.config(r));
    }
    let cluster = builder.build().await?;

    let load_before = loadavg();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut run = 0;
    for &lag in &lags {
        for &(name, policy) in &policies {
            run += 1;
            eprintln!(
                "[{run}/{scenarios}] policy={name} lag={} for {:?} ...",
                lag.label(),
                duration
            );
            let mut o =
                run_scenario(&args, &pg, &cluster, run, name, policy, lag, duration).await?;
            let v = to_json(&mut o, &args);
            println!("{v}");
            rows.push(v);
        }
    }
    reset_lag(&pg, &cluster).await?;
    if !args.json_only {
        println!(
            "\n{} writers, {} readers, {} s per scenario, target {:?}, lag on {:?} replica(s), \
             think {:?}, max_wait {:?}, bound {:?}, window {:?}, monitor {:?}; {:.0} s in all; \
             loadavg {} -> {}\n",
            args.writers,
            args.readers,
            duration.as_secs_f64(),
            args.target,
            args.lag_on,
            args.think,
            args.max_wait,
            args.bound,
            args.window,
            args.monitor_interval,
            started.elapsed().as_secs_f64(),
            load_before,
            loadavg(),
        );
        println!("{}", table(&rows));
    }
    drop(cluster);
    Ok(())
}
