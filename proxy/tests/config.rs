//! Behaviour of the TOML configuration (`lagrouter_proxy::config`).

use std::time::Duration;

use lagrouter_proxy::config::{
    AuthMethod, Config, ConfigError, EXAMPLE_TOML, NodeRole, PasswordKind, Policy, Transactions,
};

const MINIMAL: &str = r#"
[[nodes]]
name = "primary"
host = "127.0.0.1"
role = "primary"

[[users]]
name = "app"
password = "secret"
"#;

fn err(text: &str) -> ConfigError {
    match Config::from_toml_str(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

fn err_msg(text: &str) -> String {
    err(text).to_string()
}

#[test]
fn example_parses_with_all_values() {
    let c = Config::from_toml_str(EXAMPLE_TOML).unwrap();
    assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:6432");
    assert_eq!(c.proxy.admin_listen.to_string(), "127.0.0.1:9930");
    assert_eq!(c.proxy.max_client_connections, 10_000);
    assert_eq!(c.proxy.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(c.proxy.client_idle_timeout, Duration::ZERO);
    assert_eq!(c.routing.policy, Policy::ReadYourWrites);
    assert_eq!(c.routing.max_wait, Duration::from_millis(100));
    assert_eq!(c.routing.then, lagrouter::Fallback::Primary);
    assert_eq!(c.routing.max_lag, Duration::from_secs(1));
    assert_eq!(c.routing.primary_window, Duration::from_secs(2));
    assert_eq!(c.routing.monitor_interval, Duration::from_millis(100));
    assert_eq!(c.routing.probe_timeout, Duration::from_secs(2));
    assert_eq!(c.proxy.client_write_timeout, Duration::from_secs(30));
    assert_eq!(c.proxy.idle_transaction_timeout, Duration::ZERO);
    assert_eq!(c.proxy.client_login_timeout, Duration::from_secs(60));
    assert!(c.routing.retry_on_replica_error);
    assert!(c.tls.is_none());
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.primary().unwrap().name, "primary");
    assert_eq!(c.primary().unwrap().port, 5432);
    let replicas: Vec<_> = c.replicas().map(|n| n.name.as_str()).collect();
    assert_eq!(replicas, ["replica1"]);
    assert_eq!(c.pool.size, 20);
    assert_eq!(c.pool.min_idle, 0);
    assert_eq!(c.pool.checkout_timeout, Duration::from_secs(5));
    assert_eq!(c.pool.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.pool.server_idle_timeout, Duration::from_secs(600));
    let u = c.user("app").unwrap();
    assert_eq!(u.auth, AuthMethod::ScramSha256);
    assert_eq!(u.effective_server_user(), "app");
    assert_eq!(u.effective_server_password(), Some("secret"));
    assert!(c.user("nobody").is_none());
}

#[test]
fn minimal_config_uses_defaults() {
    let c = Config::from_toml_str(MINIMAL).unwrap();
    let example = Config::from_toml_str(EXAMPLE_TOML).unwrap();
    assert_eq!(c.proxy, example.proxy);
    assert_eq!(c.routing, example.routing);
    assert_eq!(c.pool, example.pool);
    assert_eq!(c.nodes[0].port, 5432);
    assert_eq!(c.nodes[0].role, NodeRole::Primary);
    assert_eq!(c.replicas().count(), 0);
}

#[test]
fn full_custom_config() {
    let c = Config::from_toml_str(
        r#"
[proxy]
listen = "0.0.0.0:7432"
admin_listen = "[::1]:9000"
max_client_connections = 50
shutdown_timeout = "1m"
client_idle_timeout = "15m"

[routing]
policy = "bounded-staleness"
max_wait = "250ms"
then = "error"
max_lag = "1.5s"
primary_window = "500ms"
monitor_interval = "50ms"
retry_on_replica_error = false
transactions = "primary"

[[nodes]]
name = "r1"
host = "replica1.internal"
port = 5433
role = "replica"
pool_size = 5

[[nodes]]
name = "p"
host = "primary.internal"
role = "primary"

[pool]
size = 8
min_idle = 2
checkout_timeout = "2s"
connect_timeout = "3s"
server_idle_timeout = "0s"

[[users]]
name = "app"
password = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVka2V5:c2VydmVya2V5"
server_password = "real"

[[users]]
name = "legacy"
password = "md5e5e28d0bbdf7ecf1f7c4e4e1d8a3d6f3"
auth = "md5"
server_user = "legacy_backend"
server_password = "x"

[[users]]
name = "monitor"
auth = "trust"
"#,
    )
    .unwrap();
    assert_eq!(c.proxy.listen.port(), 7432);
    assert!(c.proxy.admin_listen.is_ipv6());
    assert_eq!(c.proxy.shutdown_timeout, Duration::from_secs(60));
    assert_eq!(c.routing.policy, Policy::BoundedStaleness);
    assert_eq!(c.routing.then, lagrouter::Fallback::Error);
    assert_eq!(c.routing.max_lag, Duration::from_millis(1500));
    assert_eq!(c.routing.transactions, Transactions::Primary);
    assert_eq!(
        c.routing.consistency(),
        lagrouter::Consistency::BoundedStaleness(Duration::from_millis(1500))
    );
    assert_eq!(c.primary().unwrap().name, "p");
    assert_eq!(c.nodes[0].effective_pool_size(&c.pool), 5);
    assert_eq!(c.nodes[1].effective_pool_size(&c.pool), 8);
    assert_eq!(c.pool.server_idle_timeout, Duration::ZERO);
    let app = c.user("app").unwrap();
    assert_eq!(app.password_kind(), PasswordKind::ScramVerifier);
    assert_eq!(app.effective_server_password(), Some("real"));
    let legacy = c.user("legacy").unwrap();
    assert_eq!(legacy.password_kind(), PasswordKind::Md5Hash);
    assert_eq!(legacy.effective_server_user(), "legacy_backend");
    let monitor = c.user("monitor").unwrap();
    assert_eq!(monitor.auth, AuthMethod::Trust);
    assert_eq!(monitor.effective_server_password(), None);
}

#[test]
fn policies_map_to_consistency() {
    use lagrouter::Consistency as C;
    let with = |policy: &str| {
        let text = format!("[routing]\npolicy = \"{policy}\"\nmax_wait = \"7ms\"\n{MINIMAL}");
        Config::from_toml_str(&text).unwrap().routing.consistency()
    };
    assert_eq!(
        with("read-your-writes"),
        C::ReadYourWrites {
            max_wait: Duration::from_millis(7),
            then: lagrouter::Fallback::Primary
        }
    );
    assert_eq!(with("eventual"), C::Eventual);
    assert_eq!(with("primary"), C::Primary);
    assert_eq!(
        with("primary-after-write"),
        C::PrimaryAfterWrite(Duration::from_secs(2))
    );
    assert_eq!(
        with("bounded-staleness"),
        C::BoundedStaleness(Duration::from_secs(1))
    );
}

#[test]
fn transactions_take_two_values() {
    let c = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(c.routing.transactions, Transactions::Optimistic);
    let c = Config::from_toml_str(&format!("[routing]\ntransactions = \"primary\"\n{MINIMAL}"))
        .unwrap();
    assert_eq!(c.routing.transactions, Transactions::Primary);
    let msg = err_msg(&format!(
        "[routing]\ntransactions = \"sometimes\"\n{MINIMAL}"
    ));
    assert!(
        msg.contains("sometimes") && msg.contains("optimistic"),
        "{msg}"
    );
}

#[test]
fn unknown_top_level_key_is_rejected() {
    let msg = err_msg(&format!("bogus = 1\n{MINIMAL}"));
    assert!(msg.contains("bogus"), "{msg}");
    let msg = err_msg(&format!("{MINIMAL}\n[extra]\na = 1\n"));
    assert!(msg.contains("extra"), "{msg}");
}

#[test]
fn unknown_nested_keys_are_rejected() {
    for (text, key) in [
        (
            format!("[proxy]\nlisten_addr = \"1.2.3.4:5\"\n{MINIMAL}"),
            "listen_addr",
        ),
        (format!("[routing]\nmaxwait = \"1s\"\n{MINIMAL}"), "maxwait"),
        (format!("[pool]\nmax_size = 3\n{MINIMAL}"), "max_size"),
        (
            format!("[tls]\ncert = \"a\"\nkey = \"b\"\nca = \"c\"\n{MINIMAL}"),
            "ca",
        ),
        (
            format!(
                "{MINIMAL}\n[[nodes]]\nname = \"r\"\nhost = \"h\"\nrole = \"replica\"\nweight = 2\n"
            ),
            "weight",
        ),
        (
            format!("{MINIMAL}\n[[users]]\nname = \"u\"\npassword = \"p\"\npasswd = \"x\"\n"),
            "passwd",
        ),
    ] {
        let e = err(&text);
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(key), "{key}: {msg}");
        assert!(
            msg.contains("line"),
            "error should carry a line number: {msg}"
        );
    }
}

#[test]
fn parse_errors_keep_line_and_column() {
    let msg = err_msg("[proxy]\nlisten = \n");
    assert!(msg.contains("line 2"), "{msg}");
    let msg = err_msg("[proxy\n");
    assert!(msg.contains("line 1"), "{msg}");
}

#[test]
fn missing_primary_is_rejected() {
    let text = r#"
[[nodes]]
name = "r1"
host = "h"
role = "replica"

[[users]]
name = "app"
password = "x"
"#;
    assert!(matches!(err(text), ConfigError::NoPrimary));
    let no_nodes = "[[users]]\nname = \"app\"\npassword = \"x\"\n";
    assert!(matches!(err(no_nodes), ConfigError::NoPrimary));
    assert!(err_msg(text).contains("primary"));
}

#[test]
fn two_primaries_are_rejected() {
    let text = format!("{MINIMAL}\n[[nodes]]\nname = \"p2\"\nhost = \"h\"\nrole = \"primary\"\n");
    match err(&text) {
        ConfigError::MultiplePrimaries { names } => assert_eq!(names, ["primary", "p2"]),
        e => panic!("{e:?}"),
    }
}

#[test]
fn missing_required_node_keys_are_rejected() {
    let msg = err_msg("[[nodes]]\nname = \"p\"\nrole = \"primary\"\n");
    assert!(msg.contains("host"), "{msg}");
    let msg = err_msg("[[nodes]]\nname = \"p\"\nhost = \"h\"\n");
    assert!(msg.contains("role"), "{msg}");
}

#[test]
fn bad_durations_are_rejected() {
    for (key, value) in [
        ("max_wait", "\"100\""),
        ("max_wait", "\"fast\""),
        ("max_wait", "\"-1s\""),
        ("max_wait", "100"),
        ("max_lag", "\"1 fortnight\""),
        ("primary_window", "\"\""),
    ] {
        let text = format!("[routing]\n{key} = {value}\n{MINIMAL}");
        let e = err(&text);
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.contains(key), "{key}={value}: {msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }
    let msg = err_msg(&format!("[routing]\nmonitor_interval = \"0s\"\n{MINIMAL}"));
    assert!(msg.contains("routing.monitor_interval"), "{msg}");
    let msg = err_msg(&format!("[routing]\nprobe_timeout = \"0s\"\n{MINIMAL}"));
    assert!(msg.contains("routing.probe_timeout"), "{msg}");
    let msg = err_msg(&format!("[pool]\ncheckout_timeout = \"0ms\"\n{MINIMAL}"));
    assert!(msg.contains("pool.checkout_timeout"), "{msg}");
    let msg = err_msg(&format!("[proxy]\nshutdown_timeout = \"400d\"\n{MINIMAL}"));
    assert!(msg.contains("proxy.shutdown_timeout"), "{msg}");
}

#[test]
fn bad_enum_values_are_rejected() {
    let msg = err_msg(&format!("[routing]\npolicy = \"fastest\"\n{MINIMAL}"));
    assert!(msg.contains("fastest"), "{msg}");
    assert!(
        msg.contains("read-your-writes"),
        "lists the valid names: {msg}"
    );
    let msg = err_msg(&format!(
        "[routing]\npolicy = \"read_your_writes\"\n{MINIMAL}"
    ));
    assert!(msg.contains("policy"), "{msg}");
    let msg = err_msg(&format!("[routing]\nthen = \"retry\"\n{MINIMAL}"));
    assert!(msg.contains("retry"), "{msg}");
    let msg = err_msg("[[nodes]]\nname = \"p\"\nhost = \"h\"\nrole = \"leader\"\n");
    assert!(msg.contains("leader"), "{msg}");
    let msg = err_msg(&format!(
        "{MINIMAL}\n[[users]]\nname = \"u\"\npassword = \"p\"\nauth = \"password\"\n"
    ));
    assert!(msg.contains("password"), "{msg}");
}

#[test]
fn bad_values_name_their_key() {
    for (text, key) in [
        (
            format!("[proxy]\nlisten = \"not an address\"\n{MINIMAL}"),
            "listen",
        ),
        (
            format!("[proxy]\nmax_client_connections = 0\n{MINIMAL}"),
            "proxy.max_client_connections",
        ),
        (format!("[pool]\nsize = 0\n{MINIMAL}"), "pool.size"),
        (
            format!("[proxy]\nadmin_users = [\"app\", \"nobody\"]\n{MINIMAL}"),
            "proxy.admin_users[1]",
        ),
        (
            format!("[proxy]\nstats_users = [\"ghost\"]\n{MINIMAL}"),
            "proxy.stats_users[0]",
        ),
        (
            format!(
                "[proxy]\nlisten = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7000\"\n{MINIMAL}"
            ),
            "proxy.admin_listen",
        ),
        (
            format!("[pool]\nsize = 2\nmin_idle = 3\n{MINIMAL}"),
            "pool.min_idle",
        ),
        (format!("[pool]\nsize = -1\n{MINIMAL}"), "size"),
        (
            format!(
                "{MINIMAL}\n[[nodes]]\nname = \"r\"\nhost = \"h\"\nrole = \"replica\"\nport = 0\n"
            ),
            "nodes[1].port",
        ),
        (
            format!(
                "{MINIMAL}\n[[nodes]]\nname = \"r\"\nhost = \"h\"\nrole = \"replica\"\nport = 70000\n"
            ),
            "port",
        ),
        (
            format!("{MINIMAL}\n[[nodes]]\nname = \"r\"\nhost = \"\"\nrole = \"replica\"\n"),
            "nodes[1].host",
        ),
        (
            format!(
                "{MINIMAL}\n[[nodes]]\nname = \"r\"\nhost = \"h\"\nrole = \"replica\"\npool_size = 0\n"
            ),
            "nodes[1].pool_size",
        ),
        (
            format!("{MINIMAL}\n[[users]]\nname = \"u\"\n"),
            "users[1].password",
        ),
        (
            format!(
                "{MINIMAL}\n[[users]]\nname = \"u\"\npassword = \"md5e5e28d0bbdf7ecf1f7c4e4e1d8a3d6f3\"\n"
            ),
            "users[1].password",
        ),
        (
            format!(
                "{MINIMAL}\n[[users]]\nname = \"u\"\nauth = \"md5\"\npassword = \"SCRAM-SHA-256$4096:c2FsdA==$YQ==:Yg==\"\n"
            ),
            "users[1].password",
        ),
        (
            format!("{MINIMAL}\n[[users]]\nname = \"u\"\npassword = \"SCRAM-SHA-256$garbage\"\n"),
            "users[1].password",
        ),
    ] {
        let msg = err_msg(&text);
        assert!(msg.contains(key), "{key}: {msg}");
    }
    let no_users = "[[nodes]]\nname = \"p\"\nhost = \"h\"\nrole = \"primary\"\n";
    assert!(err_msg(no_users).contains("users"));
}

#[test]
fn duplicate_names_are_rejected() {
    let text =
        format!("{MINIMAL}\n[[nodes]]\nname = \"primary\"\nhost = \"h\"\nrole = \"replica\"\n");
    match err(&text) {
        ConfigError::DuplicateName { section, name } => {
            assert_eq!((section, name.as_str()), ("nodes", "primary"))
        }
        e => panic!("{e:?}"),
    }
    let text = format!("{MINIMAL}\n[[users]]\nname = \"app\"\npassword = \"y\"\n");
    assert!(matches!(
        err(&text),
        ConfigError::DuplicateName {
            section: "users",
            ..
        }
    ));
}

#[test]
fn tls_files_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[tls]\ncert = \"/nonexistent/server.crt\"\nkey = \"/nonexistent/server.key\"\n{MINIMAL}"
    );
    match err(&text) {
        ConfigError::TlsFile { key, .. } => assert_eq!(key, "tls.cert"),
        e => panic!("{e:?}"),
    }
    // Relative paths are resolved against the configuration file's directory.
    std::fs::write(dir.path().join("server.crt"), "cert").unwrap();
    std::fs::write(dir.path().join("server.key"), "key").unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!("[tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n{MINIMAL}"),
    )
    .unwrap();
    let c = Config::load(&path).unwrap();
    let tls = c.tls.unwrap();
    assert_eq!(tls.cert, dir.path().join("server.crt"));
    assert_eq!(tls.key, dir.path().join("server.key"));
    // A missing key file is named.
    std::fs::remove_file(dir.path().join("server.key")).unwrap();
    match Config::load(&path) {
        Err(ConfigError::TlsFile { key, .. }) => assert_eq!(key, "tls.key"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn load_reports_io_and_parse_errors_with_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    match Config::load(&missing) {
        Err(e @ ConfigError::Io { .. }) => assert!(e.to_string().contains("missing.toml")),
        other => panic!("{other:?}"),
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[proxy]\nnope = 1\n").unwrap();
    match Config::load(&bad) {
        Err(e @ ConfigError::Parse { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("bad.toml") && msg.contains("nope"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn demo_config_is_valid() {
    let c = Config::demo(
        ("127.0.0.1".into(), 5432),
        vec![("127.0.0.1".into(), 5433), ("127.0.0.1".into(), 5434)],
        "demo",
        "demo-password",
    );
    c.validate().unwrap();
    assert_eq!(c.primary().unwrap().port, 5432);
    let names: Vec<_> = c.replicas().map(|n| n.name.clone()).collect();
    assert_eq!(names, ["replica1", "replica2"]);
    let u = c.user("demo").unwrap();
    assert_eq!(u.effective_server_password(), Some("demo-password"));
    assert_eq!(u.auth, AuthMethod::ScramSha256);
}

#[test]
fn round_trips_through_toml() {
    let c = Config::from_toml_str(EXAMPLE_TOML).unwrap();
    let text = c.to_toml_string();
    let back = Config::from_toml_str(&text).unwrap();
    assert_eq!(c, back);
    assert!(text.contains("max_wait = \"100ms\""), "{text}");
}
