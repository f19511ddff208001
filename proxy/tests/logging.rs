//! The binary's logs: plain text without colour codes when stderr is not a
//! terminal, and one JSON object a line with `--log-format json`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The proxy binary running on a configuration whose node does not answer
/// (port 1 on loopback is closed), its stderr lines arriving on `lines`.
/// Dropping it kills the process.
struct Running {
    _dir: tempfile::TempDir,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the proxy with `user` as its `[[users]]` entry and `extra`
/// arguments, logging at `info`.
fn start(user: &str, extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lagrouter.toml");
    std::fs::write(
        &config,
        format!(
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
{user}
"#
        ),
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
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running {
        _dir: dir,
        child,
        lines,
    }
}

/// The proxy's first stderr lines up to the one that says it listens.
fn first_lines(extra: &[&str]) -> Vec<String> {
    let proxy = start("name = \"app\"\npassword = \"secret\"", extra);
    let mut lines = Vec::new();
    while let Ok(line) = proxy.lines.recv_timeout(Duration::from_secs(30)) {
        let done = line.contains("listening");
        lines.push(line);
        if done {
            break;
        }
    }
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

/// A startup packet for `user` (protocol 3.0).
fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", "app")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

#[test]
fn every_client_connection_logs_under_its_own_id() {
    use std::io::{Read, Write};
    let proxy = start("name = \"t\"\nauth = \"trust\"", &["--log-format", "json"]);
    let next = |what: &str| loop {
        let line = proxy
            .lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no log line with {what:?}"));
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(what))
        {
            return v;
        }
    };
    let listening = next("listening");
    let addr = listening["fields"]["local_addr"]
        .as_str()
        .expect("the listen address is logged")
        .to_string();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(&startup_packet("t")).unwrap();
        // The node is down: the client is authenticated, then refused.
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        let line = next("client authenticated");
        let id = line["span"]["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no connection id in {line}"));
        assert_eq!(line["span"]["name"], "client", "{line}");
        ids.push(id);
    }
    drop(proxy);
    assert_ne!(ids[0], ids[1], "each connection has its own id");
}
