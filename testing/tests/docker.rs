//! The Docker backend's own behaviour: backend selection that never
//! switches silently, clear errors for a missing image, images whose
//! entrypoint is not PostgreSQL's, and cutting nodes off the network.
//!
//! Tests that need a Docker cluster print why they skip when the cluster
//! under test is not on Docker (`LAGROUTER_TEST_BACKEND=docker` runs them).

mod common;

use std::time::{Duration, Instant};

use lagrouter_testing::{BackendKind, HarnessError, PgCluster, default_backend};

const DEADLINE: Duration = Duration::from_secs(30);
/// Set in a child process of this binary to the test it runs.
const CHILD_ENV: &str = "LAGROUTER_HARNESS_CHILD";

/// Runs `test` of this binary in a child process with `env` and returns
/// whether it passed and its combined output.
fn run_child(test: &str, env: &[(&str, &str)]) -> (bool, String) {
    let exe = std::env::current_exe().expect("path of the test binary");
    let out = std::process::Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .envs(env.iter().copied())
        .output()
        .expect("run the test binary");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let ran = text.contains("1 passed") || text.contains("1 failed");
    assert!(ran, "{test} did not run in the child process:\n{text}");
    (out.status.success(), text)
}

fn is_child(test: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == test)
}

/// An address where no engine listens.
const NO_ENGINE: &str = "unix:///nonexistent/lagrouter/docker.sock";

#[test]
fn forced_docker_without_an_engine_is_an_error_not_a_switch() {
    let (ok, out) = run_child(
        "child_forced_docker",
        &[
            ("LAGROUTER_TEST_BACKEND", "docker"),
            ("DOCKER_HOST", NO_ENGINE),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("lagrouter-testing: docker backend (LAGROUTER_TEST_BACKEND=docker)"),
        "{out}"
    );
}

#[tokio::test]
async fn child_forced_docker() {
    if !is_child("child_forced_docker") {
        return;
    }
    assert_eq!(default_backend().unwrap(), BackendKind::Docker);
    let err = PgCluster::start(0).await.expect_err("no engine");
    assert!(matches!(err, HarnessError::BackendUnavailable(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("no Docker engine answers") || text.contains("`docker` cargo feature"),
        "{text}"
    );
}

#[test]
fn auto_without_an_engine_uses_local_processes_and_says_why() {
    let (ok, out) = run_child(
        "child_auto",
        &[
            ("LAGROUTER_TEST_BACKEND", "auto"),
            ("DOCKER_HOST", NO_ENGINE),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("lagrouter-testing: local backend (auto: "),
        "{out}"
    );
}

#[tokio::test]
async fn child_auto() {
    if !is_child("child_auto") {
        return;
    }
    assert_eq!(default_backend().unwrap(), BackendKind::Local);
    let pg = PgCluster::start(0).await.expect("a local cluster");
    assert_eq!(pg.backend(), BackendKind::Local);
}

/// Starts a Docker cluster, or says why not and returns `None` when the
/// suite does not run on Docker.
async fn docker_cluster(replicas: usize) -> Option<PgCluster> {
    if default_backend().unwrap() != BackendKind::Docker {
        eprintln!(
            "skipped: the Docker backend is not in use (LAGROUTER_TEST_BACKEND=docker runs this)"
        );
        return None;
    }
    let started = Instant::now();
    let pg = PgCluster::builder()
        .replicas(replicas)
        .start()
        .await
        .expect("a Docker cluster");
    lagrouter_testing::report(format_args!(
        "docker cluster with {replicas} replicas started in {:.2?}",
        started.elapsed()
    ));
    Some(pg)
}

#[tokio::test]
async fn a_missing_image_is_a_clear_error_and_nothing_is_pulled() {
    if default_backend().unwrap() != BackendKind::Docker {
        eprintln!("skipped: the Docker backend is not in use");
        return;
    }
    let started = Instant::now();
    let err = PgCluster::builder()
        .backend(BackendKind::Docker)
        .image("lagrouter-testing/no-such-image:0")
        .start()
        .await
        .expect_err("the image does not exist");
    assert!(matches!(err, HarnessError::BackendUnavailable(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("lagrouter-testing/no-such-image:0") && text.contains("nothing is pulled"),
        "{text}"
    );
    assert!(started.elapsed() < DEADLINE, "answered at once");
    let err = PgCluster::builder()
        .backend(BackendKind::Docker)
        .image("postgres@sha256:00")
        .start()
        .await
        .expect_err("digests are not supported");
    assert!(matches!(err, HarnessError::InvalidConfig(_)), "{err}");
}

/// Removes a test image when dropped.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

/// The harness runs its own command, not the image's entrypoint, and finds
/// the server binaries without the image's `PATH`: an image whose
/// entrypoint fails works, as the official image does.
#[tokio::test]
async fn the_image_entrypoint_and_path_are_not_used() {
    if default_backend().unwrap() != BackendKind::Docker {
        eprintln!("skipped: the Docker backend is not in use");
        return;
    }
    // Make sure the base image exists (a cluster start builds it if needed).
    drop(docker_cluster(0).await);
    let tag = format!("lagrouter-testing/entrypoint-{}:15", std::process::id());
    let _guard = ImageGuard(tag.clone());
    let dockerfile = format!(
        "FROM {}\nENTRYPOINT [\"/bin/false\"]\nENV PATH=/usr/sbin:/usr/bin:/sbin:/bin\n",
        lagrouter_testing::docker_image()
    );
    let mut child = std::process::Command::new("docker")
        .args(["build", "-q", "-t", &tag, "-"])
        .env("DOCKER_BUILDKIT", "0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker build");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "docker build of {tag}");

    let pg = PgCluster::builder()
        .backend(BackendKind::Docker)
        .image(&tag)
        .replicas(1)
        .start()
        .await
        .expect("a cluster on an image with a failing entrypoint");
    let c = pg.connect(0).await.unwrap();
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let lsn = pg.current_lsn().await.unwrap();
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
}

/// Whether a connection to `node` gets a session within `within`.
async fn reachable(pg: &PgCluster, node: usize, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, pg.connect(node)).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn network_faults_need_the_docker_backend() {
    let pg = PgCluster::builder()
        .backend(BackendKind::Local)
        .replicas(0)
        .start()
        .await
        .unwrap();
    for result in [
        pg.isolate_node(0).await,
        pg.partition_from_peers(0).await,
        pg.reconnect_node(0).await,
    ] {
        let err = result.expect_err("local clusters have no networks to cut");
        assert!(matches!(err, HarnessError::BackendUnavailable(_)), "{err}");
    }
    assert_eq!(pg.docker_label(), None);
}

/// An isolated replica keeps running but nobody reaches it; reconnected,
/// it catches up with what the primary wrote meanwhile.
#[tokio::test]
async fn an_isolated_replica_is_unreachable_until_reconnected() {
    let Some(pg) = docker_cluster(1).await else {
        return;
    };
    let p = pg.connect(0).await.unwrap();
    p.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let open = pg.connect(1).await.unwrap();

    pg.isolate_node(1).await.unwrap();
    assert!(pg.is_running(1), "the server keeps running");
    assert!(
        !reachable(&pg, 1, Duration::from_secs(2)).await,
        "clients cannot reach it"
    );
    assert!(
        open.simple_query("SELECT 1").await.is_err(),
        "an open session through the published port is cut"
    );
    p.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let lsn = pg.current_lsn().await.unwrap();

    pg.reconnect_node(1).await.unwrap();
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    let c = pg.connect(1).await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    pg.reconnect_node(1).await.unwrap();
}

/// A primary cut off from its replicas still serves clients, while the
/// replicas stay reachable but stop advancing until the partition heals.
#[tokio::test]
async fn a_primary_partitioned_from_its_replicas_still_serves_clients() {
    let Some(pg) = docker_cluster(1).await else {
        return;
    };
    let p = pg.connect(0).await.unwrap();
    p.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    pg.wait_caught_up(DEADLINE).await.unwrap();

    pg.partition_from_peers(0).await.unwrap();
    p.batch_execute("INSERT INTO t VALUES (1)")
        .await
        .expect("a session opened before the partition keeps working");
    let fresh = pg
        .connect(0)
        .await
        .expect("new client sessions on the primary");
    fresh
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    let lsn = pg.current_lsn().await.unwrap();
    let err = pg
        .wait_for_replay(1, lsn, Duration::from_millis(500))
        .await
        .expect_err("the replica receives nothing across the partition");
    assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
    let r = pg
        .connect(1)
        .await
        .expect("clients still reach the replica");
    let n: i64 = r
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the replica serves what it had");

    pg.reconnect_node(0).await.unwrap();
    pg.wait_for_replay(1, lsn, DEADLINE).await.unwrap();
    let n: i64 = r
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}
