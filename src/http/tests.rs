//! Unit tests of the HTTP token layer.

use std::convert::Infallible;
use std::time::Duration;

use ::http::header::{COOKIE, HeaderMap, HeaderName, HeaderValue, SET_COOKIE};
use ::http::{Request, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac;
use tower::{Layer, Service, ServiceExt};

use super::layer::is_cookie_name;
use super::signer::Signer;
use super::*;
use crate::model::lsn::Lsn;
use crate::model::token::{ClusterId, ConsistencyToken};

const SYSID: u64 = 7_400_000_000_000_000_001;

fn token(lsn: u64) -> ConsistencyToken {
    ConsistencyToken::new(Lsn(lsn), SYSID, 1)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// A service that reports the token it saw and advances it to `bump`.
fn echo(
    bump: Option<ConsistencyToken>,
) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send> + Clone
{
    tower::service_fn(move |req: Request<()>| async move {
        let cell = req.extensions().get::<TokenCell>().cloned().unwrap();
        let seen = cell.get().map_or("none".to_string(), |t| t.to_string());
        cell.observe(bump);
        Ok::<_, Infallible>(Response::new(seen))
    })
}

#[test]
fn cell_keeps_newest() {
    let cell = TokenCell::default();
    assert_eq!(cell.get(), None);
    cell.observe(Some(token(10)));
    cell.observe(Some(token(5)));
    cell.observe(None);
    assert_eq!(cell.get(), Some(token(10)));
    let clone = cell.clone();
    clone.observe(Some(token(20)));
    assert_eq!(cell.get(), Some(token(20)));
}

#[test]
fn reads_header_and_cookie_taking_the_newest() {
    let layer = ConsistencyTokenLayer::new();
    let a = token(100).to_string();
    let b = token(200).to_string();
    assert_eq!(layer.read_token(&HeaderMap::new()), None);
    assert_eq!(
        layer.read_token(&headers(&[("x-lagrouter-token", &a)])),
        Some(token(100))
    );
    let cookie = format!("other=1; lagrouter_token={b}; x=\"y\"");
    assert_eq!(
        layer.read_token(&headers(&[("cookie", &cookie)])),
        Some(token(200))
    );
    let quoted = format!("lagrouter_token=\"{a}\"");
    assert_eq!(
        layer.read_token(&headers(&[("cookie", &quoted)])),
        Some(token(100))
    );
    assert_eq!(
        layer.read_token(&headers(&[("x-lagrouter-token", &a), ("cookie", &cookie)])),
        Some(token(200))
    );
    // A garbage value next to a good one does not hide the good one.
    assert_eq!(
        layer.read_token(&headers(&[
            ("cookie", "lagrouter_token=garbage"),
            ("cookie", &format!("lagrouter_token={a}")),
        ])),
        Some(token(100))
    );
}

#[test]
fn garbage_is_ignored() {
    let layer = ConsistencyTokenLayer::new();
    let long = "v1.".to_string() + &"A".repeat(10_000);
    for bad in [
        "",
        "garbage",
        "v1.",
        "v1.!!!",
        "v2.AAAA",
        long.as_str(),
        "lagrouter_token",
    ] {
        let cookie = format!("lagrouter_token={bad}");
        assert_eq!(
            layer.read_token(&headers(&[("x-lagrouter-token", bad), ("cookie", &cookie)])),
            None,
            "{bad:?}"
        );
    }
    // Non-UTF-8 bytes in the cookie header.
    let mut h = HeaderMap::new();
    h.insert(
        COOKIE,
        HeaderValue::from_bytes(b"a=\xff\xfe; lagrouter_token=\xff").unwrap(),
    );
    assert_eq!(layer.read_token(&h), None);
    // Cookies with similar names are not ours.
    let t = token(1).to_string();
    assert_eq!(
        layer.read_token(&headers(&[("cookie", &format!("xlagrouter_token={t}"))])),
        None
    );
}

#[test]
fn foreign_tokens_rejected() {
    let ours = ClusterId {
        system_identifier: SYSID,
        timeline: 3,
    };
    let layer = ConsistencyTokenLayer::new().cluster_id(ours);
    assert_eq!(layer.decode(&token(1).to_string()), Ok(token(1)));
    let foreign = ConsistencyToken::new(Lsn(1), 42, 1);
    assert_eq!(
        layer.decode(&foreign.to_string()).unwrap_err().label(),
        "foreign_cluster"
    );
    // Issued while the identity was unknown.
    let unknown = ConsistencyToken::new(Lsn(1), 0, 1);
    assert_eq!(layer.decode(&unknown.to_string()), Ok(unknown));
    // Without an identity, anything well formed passes.
    assert_eq!(
        ConsistencyTokenLayer::new().decode(&foreign.to_string()),
        Ok(foreign)
    );
}

#[test]
fn signing() {
    let layer = ConsistencyTokenLayer::new().signing_key(b"secret");
    let t = token(0xABCDEF);
    let wire = layer.encode(&t);
    let (body, sig) = wire.rsplit_once('.').unwrap();
    assert_eq!(body, t.to_string());
    assert_eq!(sig.len(), 22);
    assert_eq!(layer.decode(&wire), Ok(t));

    // Full-length tag accepted.
    let full = Signer::tag(&Signer::mac(b"secret"), body)
        .finalize()
        .into_bytes();
    let full = format!("{body}.{}", URL_SAFE_NO_PAD.encode(full));
    assert_eq!(layer.decode(&full), Ok(t));

    // Unsigned, wrong key, tampered signature, tampered token.
    assert_eq!(layer.decode(body), Err(TokenRejection::Unsigned));
    let other = ConsistencyTokenLayer::new()
        .signing_key(b"other")
        .encode(&t);
    assert_eq!(layer.decode(&other), Err(TokenRejection::BadSignature));
    let mut forged = wire.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'Q' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert!(layer.decode(&forged).is_err());
    let moved = format!("{}.{sig}", token(0xABCDF0));
    assert_eq!(layer.decode(&moved), Err(TokenRejection::BadSignature));
    for bad in [
        "",
        ".",
        "..",
        "v1..",
        "garbage",
        "a.b.c",
        "v1.x.y",
        "v1.AAAA.!!",
    ] {
        assert!(layer.decode(bad).is_err(), "{bad:?}");
    }
    assert_eq!(layer.decode("garbage").unwrap_err().label(), "malformed");

    // Rotation: old key verifies, new key signs.
    let rotated = ConsistencyTokenLayer::new()
        .signing_key(b"new")
        .verification_key(b"secret");
    assert_eq!(rotated.decode(&wire), Ok(t));
    assert_ne!(rotated.encode(&t), wire);

    // Without a key, a signature is ignored.
    assert_eq!(ConsistencyTokenLayer::new().decode(&wire), Ok(t));
}

#[test]
fn cookie_name_validation() {
    assert!(is_cookie_name("lagrouter_token"));
    assert!(is_cookie_name("__Host-rw"));
    for bad in ["", "a b", "a=b", "a;b", "é", "a\"b"] {
        assert!(!is_cookie_name(bad), "{bad:?}");
    }
    let r = std::panic::catch_unwind(|| ConsistencyTokenLayer::new().cookie_name("a=b"));
    assert!(r.is_err());
}

#[tokio::test]
async fn service_writes_back_only_changes() {
    let layer = ConsistencyTokenLayer::new();

    // No token in, none produced: nothing written.
    let res = layer
        .layer(echo(None))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    assert_eq!(res.body(), "none");
    assert!(res.headers().get(SET_COOKIE).is_none());
    assert!(res.headers().get(DEFAULT_HEADER_NAME).is_none());

    // A token produced: header and cookie written.
    let res = layer
        .layer(echo(Some(token(50))))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    let wire = token(50).to_string();
    assert_eq!(res.headers()[DEFAULT_HEADER_NAME], wire.as_str());
    assert_eq!(
        res.headers()[SET_COOKIE],
        format!("lagrouter_token={wire}; Path=/; Max-Age=300; HttpOnly; SameSite=Lax").as_str()
    );

    // Same token in and out: nothing written.
    let req = Request::builder()
        .header(DEFAULT_HEADER_NAME, &wire)
        .body(())
        .unwrap();
    let res = layer
        .layer(echo(Some(token(40))))
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.body(), &wire);
    assert!(res.headers().get(SET_COOKIE).is_none());
    assert!(res.headers().get(DEFAULT_HEADER_NAME).is_none());
}

#[tokio::test]
async fn service_clear_tells_the_client_to_drop_its_token() {
    let layer = ConsistencyTokenLayer::new();
    let svc = layer.layer(tower::service_fn(|req: Request<()>| async move {
        req.extensions().get::<TokenCell>().unwrap().clear();
        Ok::<_, Infallible>(Response::new(String::new()))
    }));
    let req = Request::builder()
        .header("cookie", format!("lagrouter_token={}", token(9)))
        .body(())
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(
        res.headers()[SET_COOKIE],
        "lagrouter_token=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
    );
    assert_eq!(res.headers()[DEFAULT_HEADER_NAME], "");
    // Nothing to clear: nothing written.
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert!(res.headers().get(SET_COOKIE).is_none());
}

#[tokio::test]
async fn service_configuration() {
    let layer = ConsistencyTokenLayer::new()
        .header_name(HeaderName::from_static("x-rw"))
        .cookie_name("rw")
        .cookie_max_age(Duration::from_secs(60))
        .secure(true)
        .write_header(false);
    let res = layer
        .layer(echo(Some(token(7))))
        .oneshot(Request::new(()))
        .await
        .unwrap();
    assert!(res.headers().get("x-rw").is_none());
    assert_eq!(
        res.headers()[SET_COOKIE],
        format!(
            "rw={}; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure",
            token(7)
        )
        .as_str()
    );

    let layer = layer.write_header(true).write_cookie(false);
    let req = Request::builder()
        .header("cookie", format!("rw={}", token(3)))
        .body(())
        .unwrap();
    let res = layer
        .layer(echo(Some(token(7))))
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.body(), &token(3).to_string());
    assert!(res.headers().get(SET_COOKIE).is_none());
    assert_eq!(res.headers()["x-rw"], token(7).to_string().as_str());
}
