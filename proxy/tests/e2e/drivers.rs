//! Real drivers through the proxy: small Python and Java programs in
//! `proxy/tests/drivers/` (psycopg 3, asyncpg, pgjdbc), each run against
//! the proxy on a primary and two replicas; each asserts its results and
//! where its statements ran. node-postgres' pattern (the unnamed statement,
//! Parse/Bind/Describe/Execute/Sync per query) is in `extended.rs`.
//!
//! A driver that is not installed fails the test in CI (`CI=true`, where
//! `.ci/run` installs them all) and skips it, with the reason printed,
//! elsewhere.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use lagrouter_testing::PgCluster;
use tokio::process::Command;

use crate::support::*;

/// Where the pgjdbc jar is (Debian's `libpostgresql-jdbc-java`), unless
/// `PGJDBC_JAR` says otherwise.
const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn programs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Whether the driver is there; if not, fails in CI and skips elsewhere.
async fn available(driver: &str, probe: &mut Command) -> bool {
    let ok = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    let how = "install it as .ci/run does (pip install \"psycopg[binary]\" asyncpg; \
               apt-get install libpostgresql-jdbc-java default-jdk-headless)";
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{driver} is not installed in CI: {how}"
    );
    println!("skipping the {driver} test: {driver} is not installed; {how}");
    false
}

/// Runs a driver program to its end (at most 3 minutes) and fails the
/// test with its output when it fails.
async fn run(driver: &str, cmd: &mut Command) {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        cmd.kill_on_drop(true).stdin(Stdio::null()).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the {driver} program did not finish in 3 minutes"))
    .expect("run the driver program");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{driver} program failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    lagrouter_testing::report(format!("{driver}: {}", stdout.trim()));
}

/// A proxy on a primary and two replicas; reads wait up to 2 s for a
/// replica that has the session's writes, so that where read-backs run
/// does not depend on the machine's load.
async fn env() -> Env {
    start_with(PgCluster::builder().replicas(2), |c| {
        c.routing.max_wait = Duration::from_secs(2);
    })
    .await
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg() {
    if !available(
        "psycopg",
        Command::new(python()).args(["-c", "import psycopg"]),
    )
    .await
    {
        return;
    }
    let env = env().await;
    run(
        "psycopg",
        Command::new(python())
            .arg(programs().join("psycopg_check.py"))
            .env("LAGROUTER_DSN", env.conn_str()),
    )
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    if !available(
        "asyncpg",
        Command::new(python()).args(["-c", "import asyncpg"]),
    )
    .await
    {
        return;
    }
    let env = env().await;
    let url = format!(
        "postgresql://{USER}:{PASSWORD}@{}:{}/postgres",
        env.addr().ip(),
        env.addr().port()
    );
    run(
        "asyncpg",
        Command::new(python())
            .arg(programs().join("asyncpg_check.py"))
            .env("LAGROUTER_URL", url),
    )
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let jar = std::env::var("PGJDBC_JAR").unwrap_or_else(|_| PGJDBC_JAR.into());
    let have_jar = std::path::Path::new(&jar).is_file();
    let mut probe = Command::new(if have_jar { "java" } else { "false" });
    if !available("pgjdbc", probe.arg("-version")).await {
        return;
    }
    let env = env().await;
    let url = format!(
        "jdbc:postgresql://{}:{}/postgres?user={USER}&password={PASSWORD}&prepareThreshold=1&sslmode=disable",
        env.addr().ip(),
        env.addr().port()
    );
    run(
        "pgjdbc",
        Command::new("java")
            .arg("-cp")
            .arg(&jar)
            .arg(programs().join("JdbcCheck.java"))
            .env("LAGROUTER_JDBC_URL", url),
    )
    .await;
    env.stop().await;
}
