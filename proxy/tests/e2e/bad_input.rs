//! Malformed and hostile input: each gets a clear error (or a closed
//! connection) and the proxy keeps serving other clients.

use crate::support::*;
use bytes::{BufMut, BytesMut};

/// A healthy client keeps working.
async fn assert_healthy(env: &Env, c: &tokio_postgres::Client) {
    let n: i32 = c.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    // And new clients can still connect.
    let fresh = env.connect().await;
    fresh.simple_query("SELECT 1").await.unwrap();
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_rejected() {
    let env = start_with(
        lagrouter_testing::PgCluster::builder().replicas(1),
        add_trust_user,
    )
    .await;
    let healthy = env.connect().await;
    let addr = env.addr();

    // Oversized message after startup: FATAL 08P01, connection closed,
    // without allocating the announced 100 MiB.
    let (mut r, _) = Raw::login(addr, "raw").await;
    let mut b = BytesMut::new();
    b.put_u8(b'Q');
    b.put_i32(100 * 1024 * 1024);
    b.put_slice(b"SELECT 1");
    r.send(&b).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    assert!(r.closed().await);
    assert_healthy(&env, &healthy).await;

    // Negative / too-small length.
    let (mut r, _) = Raw::login(addr, "raw").await;
    r.send(&[b'Q', 0xff, 0xff, 0xff, 0xf0]).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");

    // Unknown message type.
    let (mut r, _) = Raw::login(addr, "raw").await;
    r.send(&frame(b'x', b"hello")).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");

    // Bind whose parameter lengths exceed the message.
    let (mut r, _) = Raw::login(addr, "raw").await;
    let mut body = BytesMut::new();
    body.put_slice(b"\0\0");
    body.put_u16(0);
    body.put_u16(3);
    body.put_i32(1_000_000);
    r.send(&frame(b'B', &body)).await;
    r.send(&frame(b'S', b"")).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");

    // Query without its terminating NUL, Parse cut short.
    for m in [frame(b'Q', b"SELECT 1"), frame(b'P', b"\0SELECT 1")] {
        let (mut r, _) = Raw::login(addr, "raw").await;
        r.send(&m).await;
        r.send(&frame(b'S', b"")).await;
        let msgs = r.read_until(b'E').await;
        assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    }

    // Oversized startup packet.
    let mut r = Raw::connect(addr).await;
    let mut b = BytesMut::new();
    b.put_i32(20_000);
    b.put_i32(196608);
    r.send(&b).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");

    // Garbage instead of a startup packet, and an unknown protocol version.
    let mut r = Raw::connect(addr).await;
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.closed().await);
    let mut r = Raw::connect(addr).await;
    let mut b = BytesMut::new();
    b.put_i32(8 + 5);
    b.put_i32(2 << 16);
    b.put_slice(b"user\0");
    r.send(&b).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");

    // Invalid UTF-8 in the startup packet's user name and in a parameter.
    for params in [
        &b"user\0r\xffaw\0database\0postgres\0\0"[..],
        &b"user\0raw\0application_name\0\xc3\x28\0\0"[..],
    ] {
        let mut r = Raw::connect(addr).await;
        let mut b = BytesMut::new();
        b.put_i32(8 + params.len() as i32);
        b.put_i32(196608);
        b.put_slice(params);
        r.send(&b).await;
        let msgs = r.read_until(b'E').await;
        assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
        assert!(r.closed().await);
    }

    // Startup without a user.
    let mut r = Raw::connect(addr).await;
    r.startup(&[("database", "postgres")]).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("28000"), "{msgs:?}");

    // SSL and GSS encryption refused with 'N' (no [tls]), then a normal startup.
    use tokio::io::AsyncReadExt;
    let mut r = Raw::connect(addr).await;
    let mut b = BytesMut::new();
    b.put_i32(8);
    b.put_i32(80877104); // GSSENCRequest
    b.put_i32(8);
    b.put_i32(80877103); // SSLRequest
    r.send(&b[..8]).await;
    let mut answer = [0u8; 1];
    r.stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    r.send(&b[8..]).await;
    r.stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    r.startup(&[("user", "raw"), ("database", "postgres")])
        .await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'));

    // A cancel request with an unknown key is ignored.
    let mut r = Raw::connect(addr).await;
    let mut b = BytesMut::new();
    b.put_i32(16);
    b.put_i32(80877102);
    b.put_i32(12345);
    b.put_i32(678);
    r.send(&b).await;
    assert!(r.closed().await);

    // Messages outside their context: CopyData when not copying is
    // ignored, a lone Sync is answered.
    let (mut r, _) = Raw::login(addr, "raw").await;
    r.send(&frame(b'd', b"stray")).await;
    r.send(&frame(b'S', b"")).await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(msgs.iter().map(|m| m.0).collect::<Vec<_>>(), vec![b'Z']);
    let msgs = r.query("SELECT 5").await;
    assert!(msgs.iter().any(|m| m.0 == b'D'), "{msgs:?}");

    assert_healthy(&env, &healthy).await;
    env.stop().await;
}

/// `Parse`/`Bind`/`Describe`/`Close` bodies for raw tests.
fn parse_msg(name: &[u8], sql: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(name);
    body.push(0);
    body.extend_from_slice(sql);
    body.push(0);
    body.extend_from_slice(&0i16.to_be_bytes());
    frame(b'P', &body)
}

fn bind_msg(portal: &[u8], stmt: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(portal);
    body.push(0);
    body.extend_from_slice(stmt);
    body.push(0);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    frame(b'B', &body)
}

fn execute_msg(portal: &[u8]) -> Vec<u8> {
    let mut body = portal.to_vec();
    body.push(0);
    body.extend_from_slice(&0i32.to_be_bytes());
    frame(b'E', &body)
}

fn sync_msg() -> Vec<u8> {
    frame(b'S', b"")
}

/// Error codes in `msgs`, in order.
fn codes(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.0 == b'E')
        .filter_map(|m| error_field(&m.1, b'C'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_misuse_gets_errors_and_the_session_continues() {
    let env = start_with(
        lagrouter_testing::PgCluster::builder().replicas(1),
        add_trust_user,
    )
    .await;
    let healthy = env.connect().await;
    let (mut r, _) = Raw::login(env.addr(), "raw").await;

    // A Bind for a statement that was never prepared: 26000, then the
    // batch is skipped to Sync and the session goes on.
    r.send(&bind_msg(b"", b"never_prepared")).await;
    r.send(&execute_msg(b"")).await;
    r.send(&sync_msg()).await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(codes(&msgs), vec!["26000"], "{msgs:?}");
    assert!(r.query("SELECT 1").await.iter().any(|m| m.0 == b'D'));

    // Wrong order: Execute of a portal that was never bound (34000 from
    // the server), Describe of an unknown portal, then a valid batch.
    r.send(&execute_msg(b"no_portal")).await;
    r.send(&sync_msg()).await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(codes(&msgs), vec!["34000"], "{msgs:?}");
    r.send(&frame(b'D', b"Pno_portal\0")).await;
    r.send(&sync_msg()).await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(codes(&msgs), vec!["34000"], "{msgs:?}");
    r.send(&parse_msg(b"s1", b"SELECT 7")).await;
    r.send(&bind_msg(b"", b"s1")).await;
    r.send(&execute_msg(b"")).await;
    r.send(&sync_msg()).await;
    let msgs = r.read_until(b'Z').await;
    assert!(codes(&msgs).is_empty(), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.0 == b'D'), "{msgs:?}");

    // Invalid UTF-8 in SQL and in a statement name: 22021 as PostgreSQL
    // gives, and the connection stays usable.
    r.send(&frame(b'Q', b"SELECT '\xff\xfe'\0")).await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(codes(&msgs), vec!["22021"], "{msgs:?}");
    r.send(&parse_msg(b"bad\xc3\x28", b"SELECT 1")).await;
    r.send(&bind_msg(b"", b"bad\xc3\x28")).await;
    r.send(&sync_msg()).await;
    let msgs = r.read_until(b'Z').await;
    assert_eq!(codes(&msgs), vec!["22021"], "{msgs:?}");
    assert!(r.query("SELECT 2").await.iter().any(|m| m.0 == b'D'));

    // A Describe with an invalid target type is a protocol violation.
    r.send(&frame(b'D', b"Xname\0")).await;
    r.send(&sync_msg()).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    assert!(r.closed().await);

    // A password message after startup is out of order: 08P01.
    let (mut r, _) = Raw::login(env.addr(), "raw").await;
    r.send(&frame(b'p', b"secret\0")).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    assert!(r.closed().await);

    // A forged token (valid checksum, position far ahead): after max_wait
    // the primary is asked and the read is refused with 55000.
    let cluster = env
        .proxy
        .topology()
        .cluster
        .expect("cluster identity known");
    let forged = lagrouter::ConsistencyToken::new(
        lagrouter::Lsn(1 << 60),
        cluster.system_identifier,
        cluster.timeline,
    )
    .encode();
    let c = env.connect().await;
    c.batch_execute(&format!("SET lagrouter.min_token = '{forged}'"))
        .await
        .unwrap();
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("55000"), "{e}");
    let e = c.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("55000"), "{e}");

    assert_healthy(&env, &healthy).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures() {
    let env = start_with(lagrouter_testing::PgCluster::builder().replicas(1), |c| {
        add_trust_user(c);
        c.users.push(lagrouter_proxy::config::UserConfig {
            name: "md5user".into(),
            password: "md5pass".into(),
            auth: lagrouter_proxy::config::AuthMethod::Md5,
            server_user: Some(USER.into()),
            server_password: Some(PASSWORD.into()),
            consistency: None,
        });
    })
    .await;
    let healthy = env.connect().await;
    let addr = env.addr();
    let expect_err = |s: String, code: &'static str| async move {
        match tokio_postgres::connect(&s, tokio_postgres::NoTls).await {
            Ok(_) => panic!("{s} connected"),
            Err(e) => assert_eq!(e.code().map(|c| c.code()), Some(code), "{s}: {e}"),
        }
    };
    // Wrong SCRAM password, unknown user, wrong md5 password: 28P01.
    expect_err(conn_str(addr, USER, "wrong"), "28P01").await;
    expect_err(conn_str(addr, "nobody", "x"), "28P01").await;
    expect_err(conn_str(addr, "md5user", "wrong"), "28P01").await;
    // md5 with the right password works.
    let c = connect(&conn_str(addr, "md5user", "md5pass")).await;
    c.simple_query("SELECT 1").await.unwrap();
    // Unknown startup parameters and bad values are reported like
    // PostgreSQL does.
    expect_err(
        format!("{} options='-c no_such_setting=1'", env.conn_str()),
        "42704",
    )
    .await;
    expect_err(
        format!("{} options='-c work_mem=banana'", env.conn_str()),
        "22023",
    )
    .await;
    expect_err(format!("{} dbname=no_such_db", env.conn_str()), "3D000").await;
    // Broken SCRAM exchange on the raw protocol.
    let mut r = Raw::connect(addr).await;
    r.startup(&[("user", USER), ("database", "postgres")]).await;
    let m = r.read_msg().await.unwrap();
    assert_eq!(m.0, b'R');
    let mut b = BytesMut::new();
    postgres_protocol::message::frontend::sasl_initial_response(
        "SCRAM-SHA-256",
        b"garbage",
        &mut b,
    )
    .unwrap();
    r.send(&b).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    // A client that sends a query instead of its password.
    let mut r = Raw::connect(addr).await;
    r.startup(&[("user", USER), ("database", "postgres")]).await;
    let _ = r.read_msg().await.unwrap();
    r.send(&frame(b'Q', b"SELECT 1\0")).await;
    let msgs = r.read_until(b'E').await;
    assert_eq!(sqlstate(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    assert_healthy(&env, &healthy).await;

    // Admin endpoints.
    let (status, body) = http_get(env.proxy.admin_addr(), "/health").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(env.proxy.admin_addr(), "/status").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v.to_string().contains("replica1"), "{v}");
    assert!(v.to_string().contains("pools"), "{v}");
    env.stop().await;
}
