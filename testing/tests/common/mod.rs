//! Helpers shared by the harness's test binaries.
#![allow(dead_code)]

/// Containers, networks and volumes carrying `label` (`key=value`), as the
/// `docker` CLI lists them: an independent check of the harness's cleanup.
pub fn docker_objects(label: &str) -> Vec<String> {
    let mut found = Vec::new();
    for kind in [&["ps", "-a"][..], &["network", "ls"], &["volume", "ls"]] {
        let out = std::process::Command::new("docker")
            .args(kind)
            .args(["-q", "--filter", &format!("label={label}")])
            .output()
            .expect("the docker CLI (needed to check what the Docker backend leaves behind)");
        assert!(
            out.status.success(),
            "docker {kind:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        found.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(|id| format!("{} {id}", kind[0])),
        );
    }
    found
}
