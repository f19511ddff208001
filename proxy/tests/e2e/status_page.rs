//! The status page at `/` in a real browser: headless Chromium loads it
//! from a running proxy, its script polls `/status`, and the rendered DOM
//! shows every node with its role. A screenshot is written for humans
//! (`status-page.png` in cargo's test temp directory).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

/// The Chromium binary, if installed (Debian package `chromium`). In CI
/// (`CI=true`) it must be.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .filter_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
        .next();
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "chromium is not installed (.ci/run installs it)"
        );
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
    }
    found
}

/// Runs headless Chromium on `url` with `args`, giving the page's
/// scripts `budget` of virtual time; returns its standard output.
async fn headless(chromium: &Path, url: &str, args: &[&str], budget: Duration) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                &format!("--virtual-time-budget={}", budget.as_millis()),
            ])
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished")
    .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number in `data-polls="…"` on the body.
fn polls(dom: &str) -> u64 {
    dom.split("data-polls=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_every_node_in_a_browser() {
    let Some(chromium) = chromium() else { return };
    let env = start(2).await;
    // Some reads and a write, so that the page has reads to share out.
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS page_t(i int); INSERT INTO page_t VALUES (1)")
        .await
        .unwrap();
    for _ in 0..5 {
        c.simple_query("SELECT count(*) FROM page_t").await.unwrap();
    }
    let url = format!("http://{}/", env.proxy.admin_addr());
    let dom = headless(&chromium, &url, &["--dump-dom"], Duration::from_secs(3)).await;
    assert!(polls(&dom) >= 1, "the script never polled /status: {dom}");
    let topo = env.proxy.topology();
    assert_eq!(topo.nodes.len(), 3);
    for n in &topo.nodes {
        let role = match n.role {
            lagrouter::Role::Primary => "primary",
            lagrouter::Role::Replica => "replica",
            lagrouter::Role::Unknown => "unknown",
        };
        let row = format!(r#"data-node="{}" data-role="{role}" data-live="1""#, n.name);
        assert!(dom.contains(&row), "no live row {row} in {dom}");
    }
    assert!(dom.contains("<polyline"), "no sparkline drawn");
    assert!(
        dom.contains(r#"<p id="error"></p>"#),
        "the page reported an error: {dom}"
    );

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &chromium,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,620",
        ],
        Duration::from_secs(3),
    )
    .await;
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    println!("screenshot: {}", shot.display());
    env.stop().await;
}
