//! psql and pgbench (libpq clients) through the proxy.

use std::process::Output;

use crate::support::*;

async fn run_tool(env: &Env, tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let addr = env.addr();
    let mut cmd = tokio::process::Command::new(pg_bin(tool));
    cmd.args([
        "-h",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-U",
        USER,
    ])
    .args(args)
    .env("PGPASSWORD", PASSWORD)
    .env("PGSSLMODE", "prefer")
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    if let Some(input) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(input.as_bytes()).await.unwrap();
        drop(s);
    } else {
        drop(child.stdin.take());
    }
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{tool} {args:?} timed out"))
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script() {
    let env = start(1).await;
    let script = r#"
\set ON_ERROR_STOP on
CREATE TABLE items(id int primary key, name text);
INSERT INTO items VALUES (1, 'one'), (2, 'two');
SELECT name FROM items WHERE id = 2;
BEGIN;
UPDATE items SET name = 'uno' WHERE id = 1;
SELECT name FROM items WHERE id = 1;
COMMIT;
\copy items FROM stdin
3	three
4	four
\.
SELECT count(*) AS n FROM items;
\copy (SELECT id, name FROM items ORDER BY id) TO stdout
SET lagrouter.min_token = '';
SHOW lagrouter.token;
SELECT 'done' AS status;
"#;
    let out = run_tool(
        &env,
        "psql",
        &["-d", "postgres", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"],
        Some(script),
    )
    .await;
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("two"), "{t}");
    assert!(stdout.contains("uno"), "{t}");
    assert!(stdout.lines().any(|l| l.trim() == "4"), "{t}");
    assert!(stdout.contains("4\tfour"), "{t}");
    assert!(stdout.lines().any(|l| l.starts_with("v1.")), "{t}");
    assert!(stdout.contains("done"), "{t}");
    // Meta-commands that query the catalogs.
    let out = run_tool(
        &env,
        "psql",
        &["-d", "postgres", "-X", "-c", "\\d items"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("name"),
        "{}",
        text(&out)
    );
    env.stop().await;
}

fn assert_no_failures(out: &Output) {
    let t = text(out);
    assert!(out.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("number of failed transactions: 0"), "{t}");
    let processed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|l| l.split('/').next())
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(processed > 0, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_all_protocols() {
    let env = start(1).await;
    let out = run_tool(&env, "pgbench", &["-i", "-s", "1", "-q", "postgres"], None).await;
    assert!(out.status.success(), "{}", text(&out));
    for mode in ["simple", "extended", "prepared"] {
        // TPC-B-like (writes, explicit transactions).
        let out = run_tool(
            &env,
            "pgbench",
            &["-c", "4", "-j", "2", "-t", "100", "-M", mode, "postgres"],
            None,
        )
        .await;
        assert_no_failures(&out);
        // Select-only (reads on the replica).
        let out = run_tool(
            &env,
            "pgbench",
            &[
                "-c", "4", "-j", "2", "-T", "2", "-S", "-M", mode, "postgres",
            ],
            None,
        )
        .await;
        assert_no_failures(&out);
    }
    // TPC-B keeps the balances consistent: every transaction committed whole.
    let c = env.connect().await;
    let row = c
        .query_one(
            "/* lagrouter:primary */ SELECT (SELECT sum(abalance) FROM pgbench_accounts), \
             (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers)",
            &[],
        )
        .await
        .unwrap();
    let (a, b, t): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(a, b);
    assert_eq!(b, t);
    env.stop().await;
}
