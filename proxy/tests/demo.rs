//! The demo (`lagrouter-proxy` without `--config`): when one of its servers
//! dies, the proxy exits with a clear message and stops the rest, leaving
//! no server process behind.
#![cfg(feature = "demo")]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Pids of the processes whose parent is `parent` and whose name is `name`.
fn children(parent: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid …"; comm may hold spaces, so split at ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry: count it as alive (not reaped).
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dead_demo_server_stops_the_demo_with_a_clear_message() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lagrouter-proxy"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--demo-replicas",
            "1",
        ])
        .env("RUST_LOG", "warn")
        // The test watches the demo's server processes, children of the
        // proxy: the local backend's.
        .env("LAGROUTER_TEST_BACKEND", "local")
        .env_remove("LAGROUTER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the proxy binary");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "the demo exited before it was ready");
        if line.contains("demo is ready") {
            break;
        }
    }
    let servers = children(pid, "postgres");
    assert_eq!(servers.len(), 2, "a primary and a replica: {servers:?}");
    // SAFETY: plain kill(2) of a pid this test just read as a child of
    // the proxy it started.
    assert_eq!(unsafe { libc::kill(servers[1] as i32, libc::SIGKILL) }, 0);

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("exited; stopping the demo"),
        "no clear message: {stderr}"
    );
    // The other server was stopped and nothing is left, zombie or not.
    wait_for(
        "the demo's servers to be gone",
        Duration::from_secs(30),
        || servers.iter().all(|&p| !alive(p)),
    );
}
