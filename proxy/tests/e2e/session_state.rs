//! Session settings that change the wire (`client_encoding`, `DateStyle`,
//! `IntervalStyle`, `TimeZone`, `standard_conforming_strings`) on every
//! backend that serves the client, in both protocols, compared with a
//! direct connection.

use bytes::BytesMut;
use lagrouter_testing::PgCluster;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::support::*;

/// `€` in LATIN9.
const EURO_LATIN9: u8 = 0xa4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encoding_applies_in_both_protocols_on_every_backend() {
    let env = start_with(PgCluster::builder().replicas(2), add_trust_user).await;
    env.connect()
        .await
        .batch_execute("CREATE TABLE enc_t(t text)")
        .await
        .unwrap();
    replicas_caught_up(&env).await;
    let (mut r, _) = Raw::login(env.addr(), "raw").await;
    let m = r.query("SET client_encoding TO latin9").await;
    assert!(
        parameter_statuses(&m).contains(&("client_encoding".into(), "LATIN9".into())),
        "{m:?}"
    );
    r.send(&raw_parse("euro", b"SELECT '\xa4'::text")).await;
    let mut b = BytesMut::new();
    ext::sync(&mut b);
    r.send(&b).await;
    assert_eq!(tags(&r.read_until(b'Z').await), "1Z");
    for i in 0..4 {
        // Simple protocol: a read (on a replica) and a write.
        let m = r.query_bytes(b"SELECT '\xa4'::text").await;
        assert_eq!(first_bytes(&m), Some(vec![EURO_LATIN9]), "read {i}: {m:?}");
        let m = r
            .query_bytes(b"INSERT INTO enc_t VALUES ('\xa4') RETURNING t")
            .await;
        assert_eq!(first_bytes(&m), Some(vec![EURO_LATIN9]), "write {i}: {m:?}");
        // Extended protocol: the unnamed statement, and the named one
        // prepared once (parsed again on whichever backend runs it).
        let mut b = BytesMut::from(&raw_parse("", b"SELECT '\xa4'::text || ''")[..]);
        ext::bind(&mut b, "", "", &[]);
        ext::execute(&mut b, "");
        ext::bind(&mut b, "", "euro", &[]);
        ext::execute(&mut b, "");
        ext::sync(&mut b);
        r.send(&b).await;
        let m = r.read_until(b'Z').await;
        let rows: Vec<&Msg> = m.iter().filter(|m| m.0 == b'D').collect();
        assert_eq!(rows.len(), 2, "{m:?}");
        for row in rows {
            assert_eq!(
                first_bytes(std::slice::from_ref(row)),
                Some(vec![EURO_LATIN9])
            );
        }
    }
    let n: i64 = env
        .connect()
        .await
        .query_one("SELECT count(*) FROM enc_t WHERE t = '€'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
    env.stop().await;
}

const SETTINGS: &[(&str, &str, &str)] = &[
    ("DateStyle", "'SQL, DMY'", "SQL, DMY"),
    ("IntervalStyle", "postgres_verbose", "postgres_verbose"),
    ("TimeZone", "'Asia/Kolkata'", "Asia/Kolkata"),
    ("standard_conforming_strings", "off", "off"),
];

const SHOWS: &str = "SELECT '2024-03-01 12:00:00+00'::timestamptz::text, \
     '2024-03-01'::date::text, interval '1 day 2 hours'::text, \
     pg_is_in_recovery()";

fn texts(msgs: &[SimpleQueryMessage]) -> Vec<Option<String>> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .unwrap()
}

async fn set_all(c: &Client) {
    for (name, value, _) in SETTINGS {
        c.batch_execute(&format!("SET {name} = {value}"))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_settings_and_parameter_status_match_a_direct_connection() {
    let env = start_with(PgCluster::builder().replicas(2), add_trust_user).await;
    let (d, conn) = env
        .cluster
        .config(env.cluster.primary())
        .connect(NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    set_all(&d).await;
    let mut want = texts(&d.simple_query(SHOWS).await.unwrap());
    want.pop();
    // A backslash escape (standard_conforming_strings off); the proxy
    // cannot parse it, so it runs on the primary.
    const ESCAPED: &str = "SELECT 'it\\'s'";
    let escaped = texts(&d.simple_query(ESCAPED).await.unwrap());
    assert_eq!(escaped, vec![Some("it's".to_string())]);

    let c = env.connect().await;
    set_all(&c).await;
    c.batch_execute("CREATE TABLE IF NOT EXISTS ws_t(i int)")
        .await
        .unwrap();
    for i in 0..4 {
        // Reads spread over the replicas; a write in between.
        let mut got = texts(&c.simple_query(SHOWS).await.unwrap());
        assert_eq!(got.pop(), Some(Some("t".into())), "read {i} on a replica");
        assert_eq!(got, want, "read {i}");
        c.batch_execute("INSERT INTO ws_t VALUES (1)")
            .await
            .unwrap();
        let show = format!("/* lagrouter:primary */ {SHOWS}");
        let mut got = texts(&c.simple_query(&show).await.unwrap());
        assert_eq!(got.pop(), Some(Some("f".into())));
        assert_eq!(got, want, "primary {i}");
        assert_eq!(texts(&c.simple_query(ESCAPED).await.unwrap()), escaped);
        // What a replica reports of itself does not leak into the session.
        for sql in [
            "SHOW transaction_read_only",
            "SELECT current_setting('transaction_read_only')",
        ] {
            let shown = c.simple_query(sql).await.unwrap();
            assert_eq!(texts(&shown), vec![Some("off".to_string())], "{sql}");
        }
    }

    // ParameterStatus: each SET reports its value once, as the server does;
    // statements on other backends (where the proxy replays the settings)
    // report nothing more.
    let (mut r, _) = Raw::login(env.addr(), "raw").await;
    for (name, value, reported) in SETTINGS {
        let m = r.query(&format!("SET {name} = {value}")).await;
        assert_eq!(
            parameter_statuses(&m),
            vec![(name.to_string(), reported.to_string())],
            "{m:?}"
        );
    }
    for _ in 0..4 {
        let m = r.query("SELECT 1").await;
        assert_eq!(parameter_statuses(&m), vec![], "{m:?}");
        let m = r.query("INSERT INTO ws_t VALUES (2)").await;
        let statuses = parameter_statuses(&m);
        assert!(
            statuses.iter().all(|(k, _)| k == "lagrouter.token"),
            "{statuses:?}"
        );
    }
    // RESET ALL after a write, with the replicas behind: its first run on
    // a replica is discarded (the check fails) and it runs again on the
    // primary, which reports every parameter it resets, once.
    for &rep in &env.cluster.replicas() {
        env.cluster.pause_replay(rep).await.unwrap();
    }
    let m = r.query("INSERT INTO ws_t VALUES (3)").await;
    assert_eq!(sqlstate(&m), None);
    let m = r.query("RESET ALL").await;
    let reset = parameter_statuses(&m);
    for (name, _, _) in SETTINGS {
        let n = reset.iter().filter(|(k, _)| k == name).count();
        assert_eq!(n, 1, "{name}: {reset:?}");
    }
    let m = r.query("SHOW DateStyle").await;
    assert_eq!(first_value(&m).as_deref(), Some("ISO, MDY"));
    for &rep in &env.cluster.replicas() {
        env.cluster.resume_replay(rep).await.unwrap();
    }
    env.stop().await;
}
