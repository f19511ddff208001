//! What the Docker backend needs from the engine beyond testcontainers'
//! container handles, through the bollard client testcontainers is built
//! on: the image (built when missing), networks, labels, and the removal of
//! what a cluster, or an earlier process that was killed, left behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::future::join_all;
use testcontainers::bollard::Docker;
use testcontainers::bollard::models::NetworkCreateRequest;
use testcontainers::bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptions,
    RemoveContainerOptionsBuilder,
};

use crate::engine::DEFAULT_DOCKER_IMAGE;
use crate::{HarnessError, PG_IMAGE_ENV};

/// Label carrying the cluster name; present on every object of ours.
pub(super) const CLUSTER_LABEL: &str = "org.lagrouter.testing.cluster";
/// Label naming the process that created the object (see [`owner`]).
pub(super) const OWNER_LABEL: &str = "org.lagrouter.testing.owner";

/// The image build script (`testing/scripts/build-pg-image.sh`).
const BUILD_SCRIPT: &str = include_str!("../../scripts/build-pg-image.sh");

pub(super) fn docker_err(
    context: &str,
) -> impl FnOnce(testcontainers::bollard::errors::Error) -> HarnessError + '_ {
    move |e| HarnessError::Docker(format!("{context}: {e}"))
}

/// The bollard client testcontainers uses (same engine discovery).
pub(super) async fn client() -> Result<Docker, HarnessError> {
    testcontainers::core::client::docker_client_instance()
        .await
        .map_err(|e| {
            HarnessError::BackendUnavailable(format!("connecting to the Docker engine: {e}"))
        })
}

/// A cluster name unique on this engine: pid, counter and randomness.
pub(super) fn cluster_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "lagrouter-{}-{}-{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// The labels of every object of cluster `cluster`.
pub(super) fn labels(cluster: &str) -> HashMap<String, String> {
    HashMap::from([
        (CLUSTER_LABEL.to_string(), cluster.to_string()),
        (OWNER_LABEL.to_string(), owner()),
    ])
}

/// This process: `host/boot-id/pid/start-time`, so that a later process can
/// tell whether the creator of an object is gone (a reused pid has another
/// start time; a reboot changes the boot id).
fn owner() -> String {
    format!(
        "{}/{}/{}/{}",
        hostname(),
        boot_id(),
        std::process::id(),
        start_time(std::process::id()).unwrap_or(0)
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Start time of `pid` in clock ticks since boot (field 22 of its stat).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process named by an owner label is gone. Objects of another
/// host are never judged (that host may share the engine).
fn owner_gone(label: &str) -> bool {
    let parts: Vec<&str> = label.split('/').collect();
    let [host, boot, pid, start] = parts[..] else {
        return false;
    };
    if host != hostname() {
        return false;
    }
    if boot != boot_id() {
        return true;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    start_time(pid).is_none_or(|t| t.to_string() != start)
}

/// Makes sure the engine has `image`. The default image is built with the
/// build script when missing (once per process, serialised across processes
/// by the script's lock; its progress goes to standard error); any other
/// image must be present already, since nothing is pulled.
pub(super) async fn ensure_image(docker: &Docker, image: &str) -> Result<(), HarnessError> {
    static BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    if docker.inspect_image(image).await.is_ok() {
        return Ok(());
    }
    if image != DEFAULT_DOCKER_IMAGE {
        return Err(HarnessError::BackendUnavailable(format!(
            "the Docker engine has no image {image}, and nothing is pulled: pull it \
             (`docker pull {image}`) where a registry is reachable, or use \
             {DEFAULT_DOCKER_IMAGE} (unset {PG_IMAGE_ENV}), which the harness builds from \
             Debian packages"
        )));
    }
    let _guard = BUILD.lock().await;
    if docker.inspect_image(image).await.is_ok() {
        return Ok(());
    }
    let started = Instant::now();
    let status = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(BUILD_SCRIPT)
        .arg("build-pg-image.sh")
        .arg(image)
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| {
            HarnessError::BackendUnavailable(format!("running the image build script: {e}"))
        })?;
    if !status.success() {
        return Err(HarnessError::BackendUnavailable(format!(
            "building the image {image} failed ({status}, its output is above); run \
             testing/scripts/build-pg-image.sh to retry, or set LAGROUTER_TEST_BACKEND=local"
        )));
    }
    tracing::info!(elapsed = ?started.elapsed(), "lagrouter::testing built {image}");
    Ok(())
}

/// Creates the cluster's replication network.
pub(super) async fn create_network(docker: &Docker, cluster: &str) -> Result<(), HarnessError> {
    docker
        .create_network(NetworkCreateRequest {
            name: cluster.to_string(),
            driver: Some("bridge".into()),
            labels: Some(labels(cluster)),
            ..Default::default()
        })
        .await
        .map_err(docker_err("creating the cluster network"))?;
    Ok(())
}

/// Removes every container (with its anonymous volumes) and the network
/// labelled with `cluster`. Errors are logged, not returned: this runs
/// while a cluster is dropped.
pub(super) async fn remove_cluster(docker: &Docker, cluster: &str) {
    let filter = format!("{CLUSTER_LABEL}={cluster}");
    remove_matching(docker, &filter, |_| true).await;
}

/// Once per process: removes what processes of this host that are gone
/// left behind (containers, networks, volumes), e.g. after a test binary
/// was killed before it could drop its clusters.
pub(super) async fn reap_leftovers(docker: &Docker) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let removed = remove_matching(docker, CLUSTER_LABEL, |labels| {
            labels.get(OWNER_LABEL).is_some_and(|o| owner_gone(o))
        })
        .await;
        if removed > 0 {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "lagrouter-testing: removed {removed} containers, networks and volumes \
                 left behind by test processes that are gone"
            );
        }
    })
    .await;
}

/// Removes the containers, then networks, then volumes matching the label
/// `filter` whose labels satisfy `pick`; returns how many went.
async fn remove_matching(
    docker: &Docker,
    filter: &str,
    pick: impl Fn(&HashMap<String, String>) -> bool,
) -> usize {
    let filters = HashMap::from([("label", vec![filter])]);
    let mut removed = 0;
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!("lagrouter::testing: listing containers: {e}");
            Vec::new()
        });
    let ids: Vec<String> = containers
        .into_iter()
        .filter(|c| c.labels.as_ref().is_some_and(&pick))
        .filter_map(|c| c.id)
        .collect();
    let results = join_all(ids.iter().map(|id| {
        docker.remove_container(
            id,
            Some(
                RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
    }))
    .await;
    for (id, r) in ids.iter().zip(results) {
        match r {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!("lagrouter::testing: removing container {id}: {e}"),
        }
    }
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .unwrap_or_default();
    for n in networks {
        if n.labels.as_ref().is_some_and(&pick) {
            if let Some(id) = n.id {
                match docker.remove_network(&id).await {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!("lagrouter::testing: removing network {id}: {e}"),
                }
            }
        }
    }
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![filter.to_string()],
            )])),
        }))
        .await
        .map(|v| v.volumes.unwrap_or_default())
        .unwrap_or_default();
    for v in volumes {
        if pick(&v.labels)
            && docker
                .remove_volume(
                    &v.name,
                    None::<testcontainers::bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await
                .is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Splits an image reference `repository[:tag]` into repository and tag
/// (`latest` when none). Digest references are not supported (testcontainers
/// names images as `repository:tag`).
pub(super) fn split_image(image: &str) -> Result<(String, String), HarnessError> {
    if image.contains('@') || image.is_empty() {
        return Err(HarnessError::InvalidConfig(format!(
            "{PG_IMAGE_ENV}={image:?}: expected repository[:tag] (digests are not supported)"
        )));
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    Ok(match image[last_slash..].rfind(':') {
        Some(i) => (
            image[..last_slash + i].to_string(),
            image[last_slash + i + 1..].to_string(),
        ),
        None => (image.to_string(), "latest".to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let s = |i: &str| split_image(i).unwrap();
        assert_eq!(
            s("lagrouter/postgres:15"),
            ("lagrouter/postgres".into(), "15".into())
        );
        assert_eq!(s("postgres"), ("postgres".into(), "latest".into()));
        assert_eq!(
            s("registry:5000/pg/postgres:15.4"),
            ("registry:5000/pg/postgres".into(), "15.4".into())
        );
        assert_eq!(
            s("registry:5000/postgres"),
            ("registry:5000/postgres".into(), "latest".into())
        );
        assert!(split_image("postgres@sha256:abc").is_err());
        assert!(split_image("").is_err());
    }

    #[test]
    fn owners() {
        let me = owner();
        assert!(!owner_gone(&me), "this process is alive: {me}");
        let parts: Vec<&str> = me.split('/').collect();
        let dead_pid = format!("{}/{}/{}/{}", parts[0], parts[1], parts[2], "1");
        assert!(
            owner_gone(&dead_pid),
            "another start time is another process"
        );
        let rebooted = format!("{}/{}/{}/{}", parts[0], "old-boot", parts[2], parts[3]);
        assert!(owner_gone(&rebooted));
        let elsewhere = format!("{}/{}/{}/{}", "some-other-host", "x", "1", "1");
        assert!(!owner_gone(&elsewhere), "other hosts are not judged");
        assert!(!owner_gone("garbage"));
    }
}
