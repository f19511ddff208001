//! The binary's logs: plain text without colour codes when stderr is not a
//! terminal, and one JSON object a line with `--log-format json`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Starts the proxy on a configuration whose node does not answer (port 1
/// on loopback is closed), and returns its first stderr lines up to the
/// one that says it listens.
fn first_lines(extra: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lagrouter.toml");
    std::fs::write(
        &config,
        r#"
[proxy]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[nodes]]
name = "primary"
host = "127.0.0.1"
port = 1
role = "primary"

[[users]]
name = "app"
password = "secret"
"#,
    )
    .unwrap();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_lagrouter-proxy"))
        .arg("--config")
        .arg(&config)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("LAGROUTER_LOG_FORMAT")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the proxy binary");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let done = line.contains("listening");
            if tx.send(line).is_err() || done {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        let done = line.contains("listening");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("listening")),
        "the proxy did not log that it listens: {lines:?}"
    );
    lines
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() {
    let lines = first_lines(&[]);
    for l in &lines {
        assert!(!l.contains('\u{1b}'), "ANSI escape in {l:?}");
    }
}

#[test]
fn json_logs_are_one_object_a_line() {
    let lines = first_lines(&["--log-format", "json"]);
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}
