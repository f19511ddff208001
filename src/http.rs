//! HTTP token propagation: read-your-writes across the requests of one user,
//! whichever service instance and connection serves them.
//!
//! A web service behind a load balancer runs many instances: a user's write
//! and their next page load hit different instances, pools and connections.
//! [`ConsistencyTokenLayer`] carries the user's [`ConsistencyToken`] from one
//! request to the next in a cookie (for browsers) and/or a response header
//! (for API clients):
//!
//! 1. it reads the token from the request header `x-lagrouter-token` or the
//!    cookie `lagrouter_token` (names configurable), ignoring anything that
//!    is not a valid token of this cluster;
//! 2. it hands it to the handler in a [`TokenCell`] request extension; the
//!    handler opens its [`Session`] from the cell ([`TokenCell::session`])
//!    and writes the session's token back ([`TokenCell::absorb`]);
//! 3. after the handler returns it writes the token back to the client
//!    (header and/or `Set-Cookie`) when it changed.
//!
//! Tokens from clients are untrusted. Garbage, tokens of another cluster and
//! (with [`ConsistencyTokenLayer::signing_key`]) unsigned or badly signed
//! tokens are treated as absent, logged at `debug` and counted in
//! `lagrouter_http_rejected_tokens_total{reason}`; they never fail the
//! request.
//!
//! Without a signing key a client can present a token of this cluster from
//! the future; reads carrying it wait for replicas in vain and then fail
//! with [`Error::TokenAhead`](crate::Error::TokenAhead) on the primary.
//! Handlers can recover with [`TokenCell::clear`] and a fresh session (see
//! `examples/axum_app.rs`); with [`ConsistencyTokenLayer::signing_key`] such
//! tokens cannot be made.
//!
//! ```no_run
//! use axum::{Extension, Router, extract::State, routing::post};
//! use lagrouter::Cluster;
//! use lagrouter::http::{ConsistencyTokenLayer, TokenCell};
//!
//! async fn create(
//!     State(cluster): State<Cluster>,
//!     Extension(cell): Extension<TokenCell>,
//!     body: String,
//! ) -> String {
//!     let mut session = cell.session(&cluster);
//!     let result = session.execute("INSERT INTO notes(body) VALUES ($1)", &[&body]).await;
//!     cell.absorb(&session); // the response carries the new token
//!     match result {
//!         Ok(_) => "ok".into(),
//!         Err(e) => e.to_string(),
//!     }
//! }
//!
//! fn app(cluster: Cluster) -> Router {
//!     Router::new()
//!         .route("/notes", post(create))
//!         .with_state(cluster.clone())
//!         .layer(ConsistencyTokenLayer::new().cluster(cluster))
//! }
//! ```
//!
//! The layer is a plain [`tower::Layer`] over `http::Request<B>` →
//! `http::Response<B2>`, so it works with hyper (through
//! `hyper_util::service::TowerToHyperService`) and any other tower-based
//! server as well; [`ConsistencyTokenLayer::read_token`] and
//! [`ConsistencyTokenLayer::write_token`] serve frameworks without tower.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::header::{COOKIE, HeaderMap, HeaderName, HeaderValue, SET_COOKIE};
use ::http::{Request, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use pin_project::pin_project;
use sha2::Sha256;
use tower::{Layer, Service};

use crate::cluster::Cluster;
use crate::session::Session;
use crate::token::{ClusterId, ConsistencyToken, TokenError};

/// Default name of the request and response header carrying the token.
pub const DEFAULT_HEADER_NAME: &str = "x-lagrouter-token";

/// Default name of the cookie carrying the token.
pub const DEFAULT_COOKIE_NAME: &str = "lagrouter_token";

/// Default `Max-Age` of the cookie: long enough for any replica that is
/// still in rotation to have replayed the write, short enough not to linger.
pub const DEFAULT_COOKIE_MAX_AGE: Duration = Duration::from_secs(300);

/// Name of the counter of client tokens that were ignored (label `reason`,
/// see [`TokenRejection::label`]).
pub const REJECTED_TOKENS_METRIC: &str = "lagrouter_http_rejected_tokens_total";

/// Bytes of HMAC-SHA256 output carried by signed tokens (22 base64url chars).
const SIGNATURE_LEN: usize = 16;
/// Base64url length of a full 32-byte HMAC-SHA256 tag (also accepted).
const FULL_SIGNATURE_CHARS: usize = 43;
/// Domain separation for the HMAC input, so that a key shared with other
/// uses cannot be made to sign tokens.
const SIGNING_CONTEXT: &[u8] = b"lagrouter consistency token\0";
/// Longest wire form accepted (a signed token is 3 + 30 + 1 + 43 at most).
const MAX_WIRE_LEN: usize = 96;
/// At most this many candidate tokens are examined per request.
const MAX_CANDIDATES: usize = 8;

/// The per-request token, shared between the layer and the handler.
///
/// [`ConsistencyTokenService`] inserts one into every request's extensions,
/// seeded with the client's (validated) token. Handlers take it with axum's
/// `Extension<TokenCell>` (or `request.extensions().get::<TokenCell>()`),
/// open their [`Session`] from it and write the session's token back; after
/// the handler the layer sends the newest token to the client.
///
/// Without the layer there is no cell: axum's `Extension<TokenCell>`
/// then rejects the request (500), so install the layer on every route
/// whose handlers take the cell.
///
/// Cloning is cheap and clones share the token. Tokens only move forward:
/// [`TokenCell::observe`] keeps the newer of the current and the given one
/// (only [`TokenCell::clear`] goes back).
#[derive(Clone, Debug, Default)]
pub struct TokenCell(Arc<Mutex<Option<ConsistencyToken>>>);

impl TokenCell {
    /// A cell holding `token`.
    pub fn new(token: Option<ConsistencyToken>) -> Self {
        TokenCell(Arc::new(Mutex::new(token)))
    }

    /// The current token.
    pub fn get(&self) -> Option<ConsistencyToken> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges `token` in, keeping the newer one; `None` changes nothing.
    pub fn observe(&self, token: Option<ConsistencyToken>) {
        let Some(t) = token else { return };
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(g.map_or(t, |cur| cur.max(t)));
    }

    /// Forgets the token: the response then tells the client to drop it
    /// (an expired cookie, an empty header). Use it when the token turned
    /// out to be useless, e.g. after
    /// [`Error::TokenAhead`](crate::Error::TokenAhead): a token ahead of the
    /// primary was forged or stands for writes lost in a failover.
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A new session of `cluster` resuming from the cell's token: its reads
    /// see everything this client wrote or read before.
    pub fn session(&self, cluster: &Cluster) -> Session {
        let session = cluster.session();
        match self.get() {
            Some(t) => session.with_token(t),
            None => session,
        }
    }

    /// Merges the session's token in (call after the session's last
    /// statement, also when it failed: earlier statements may have written).
    pub fn absorb(&self, session: &Session) {
        self.observe(session.token());
    }
}

/// Why a token presented by a client was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRejection {
    /// Not a valid token, of an unknown version, or of another cluster.
    #[error(transparent)]
    Invalid(#[from] TokenError),
    /// A signing key is configured and the token carries no signature.
    #[error("consistency token is not signed")]
    Unsigned,
    /// The token's signature does not verify under any configured key.
    #[error("consistency token signature does not verify")]
    BadSignature,
}

impl TokenRejection {
    /// The `reason` label of [`REJECTED_TOKENS_METRIC`]: `malformed`,
    /// `unsupported_version`, `foreign_cluster`, `unsigned` or
    /// `bad_signature`.
    pub fn label(&self) -> &'static str {
        match self {
            TokenRejection::Invalid(TokenError::Malformed(_)) => "malformed",
            TokenRejection::Invalid(TokenError::UnsupportedVersion(_)) => "unsupported_version",
            TokenRejection::Invalid(TokenError::ForeignCluster { .. }) => "foreign_cluster",
            TokenRejection::Unsigned => "unsigned",
            TokenRejection::BadSignature => "bad_signature",
        }
    }
}

/// Where the layer learns the cluster's identity to reject foreign tokens.
#[derive(Clone)]
enum Identity {
    /// Accept tokens of any cluster.
    Any,
    /// A fixed identity.
    Fixed(ClusterId),
    /// The identity the cluster's lag monitor last observed.
    Cluster(Cluster),
}

impl Identity {
    fn current(&self) -> Option<ClusterId> {
        match self {
            Identity::Any => None,
            Identity::Fixed(id) => Some(*id),
            Identity::Cluster(c) => c.topology().cluster,
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Any => f.write_str("Any"),
            Identity::Fixed(id) => f.debug_tuple("Fixed").field(id).finish(),
            Identity::Cluster(c) => f
                .debug_tuple("Cluster")
                .field(&c.topology().cluster)
                .finish(),
        }
    }
}

/// HMAC keys: the first signs, all verify (for key rotation).
#[derive(Clone)]
struct Signer {
    keys: Vec<Hmac<Sha256>>,
}

impl Signer {
    fn mac(key: &[u8]) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length")
    }

    fn tag(key: &Hmac<Sha256>, body: &str) -> Hmac<Sha256> {
        let mut mac = key.clone();
        mac.update(SIGNING_CONTEXT);
        mac.update(body.as_bytes());
        mac
    }

    fn sign(&self, body: &str) -> Option<String> {
        let key = self.keys.first()?;
        let tag = Self::tag(key, body).finalize().into_bytes();
        Some(URL_SAFE_NO_PAD.encode(&tag[..SIGNATURE_LEN]))
    }

    /// Constant-time verification of a 16-byte (22 chars) or full 32-byte
    /// (43 chars) base64url tag.
    fn verify(&self, body: &str, signature: &str) -> bool {
        if signature.len() > FULL_SIGNATURE_CHARS {
            return false;
        }
        let mut buf = [0u8; 36];
        let Ok(n) = URL_SAFE_NO_PAD.decode_slice(signature, &mut buf) else {
            return false;
        };
        let tag = &buf[..n];
        self.keys.iter().any(|key| {
            let mac = Self::tag(key, body);
            match n {
                SIGNATURE_LEN => mac.verify_truncated_left(tag).is_ok(),
                32 => mac.verify_slice(tag).is_ok(),
                _ => false,
            }
        })
    }
}

#[derive(Clone)]
struct Config {
    header_name: HeaderName,
    cookie_name: String,
    cookie_max_age: u64,
    secure: bool,
    write_header: bool,
    write_cookie: bool,
    signer: Option<Signer>,
    identity: Identity,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("header_name", &self.header_name)
            .field("cookie_name", &self.cookie_name)
            .field("cookie_max_age", &self.cookie_max_age)
            .field("secure", &self.secure)
            .field("write_header", &self.write_header)
            .field("write_cookie", &self.write_cookie)
            .field(
                "signing_keys",
                &self.signer.as_ref().map_or(0, |s| s.keys.len()),
            )
            .field("identity", &self.identity)
            .finish()
    }
}

/// Carries consistency tokens between a client's HTTP requests (see the
/// [module documentation](self)).
///
/// Built with chained setters; cloning is cheap.
///
/// ```
/// use std::time::Duration;
/// use lagrouter::http::ConsistencyTokenLayer;
///
/// let layer = ConsistencyTokenLayer::new()
///     .cookie_name("rw_token")
///     .cookie_max_age(Duration::from_secs(120))
///     .secure(true)
///     .write_header(false)
///     .signing_key(b"a long random secret shared by all instances");
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct ConsistencyTokenLayer {
    config: Arc<Config>,
}

impl Default for ConsistencyTokenLayer {
    fn default() -> Self {
        ConsistencyTokenLayer {
            config: Arc::new(Config {
                header_name: HeaderName::from_static(DEFAULT_HEADER_NAME),
                cookie_name: DEFAULT_COOKIE_NAME.to_string(),
                cookie_max_age: DEFAULT_COOKIE_MAX_AGE.as_secs(),
                secure: false,
                write_header: true,
                write_cookie: true,
                signer: None,
                identity: Identity::Any,
            }),
        }
    }
}

impl ConsistencyTokenLayer {
    /// The defaults: header `x-lagrouter-token` and cookie `lagrouter_token`
    /// read and written, cookie `Max-Age=300` without `Secure`, no signing,
    /// tokens of any cluster accepted.
    pub fn new() -> Self {
        Self::default()
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The request and response header carrying the token (default
    /// `x-lagrouter-token`).
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config_mut().header_name = name;
        self
    }

    /// The cookie carrying the token (default `lagrouter_token`).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid cookie name (empty, or containing control
    /// characters, spaces or separators such as `=` and `;`): a
    /// configuration error, caught when the layer is built.
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        assert!(
            is_cookie_name(&name),
            "invalid cookie name {name:?} for ConsistencyTokenLayer"
        );
        self.config_mut().cookie_name = name;
        self
    }

    /// The cookie's `Max-Age`, in whole seconds, at least one (default
    /// 300 s). A token older than the largest replica lag in rotation adds
    /// nothing, so this can be short.
    pub fn cookie_max_age(mut self, max_age: Duration) -> Self {
        self.config_mut().cookie_max_age = max_age.as_secs().max(1);
        self
    }

    /// Adds the `Secure` attribute to the cookie (default off; turn it on
    /// when the service is reached over HTTPS only).
    pub fn secure(mut self, secure: bool) -> Self {
        self.config_mut().secure = secure;
        self
    }

    /// Whether to send a changed token in the response header (default on).
    pub fn write_header(mut self, on: bool) -> Self {
        self.config_mut().write_header = on;
        self
    }

    /// Whether to send a changed token in a `Set-Cookie` (default on).
    pub fn write_cookie(mut self, on: bool) -> Self {
        self.config_mut().write_cookie = on;
        self
    }

    /// Signs tokens with HMAC-SHA256 under `key` and rejects tokens that are
    /// unsigned or badly signed. The wire form becomes
    /// `<token>.<signature>`, the signature being the first 16 bytes of the
    /// HMAC in unpadded base64url (22 characters; the full 32-byte tag is
    /// accepted as well), verified in constant time.
    ///
    /// Every instance behind the load balancer needs the same key. Use a
    /// long random secret. Calling this again replaces all keys.
    pub fn signing_key(mut self, key: &[u8]) -> Self {
        self.config_mut().signer = Some(Signer {
            keys: vec![Signer::mac(key)],
        });
        self
    }

    /// Also accepts tokens signed with `key` (key rotation: deploy the new
    /// key as a verification key everywhere, then make it the signing key).
    /// Without a [`signing_key`](Self::signing_key) this sets the signing
    /// key.
    pub fn verification_key(mut self, key: &[u8]) -> Self {
        let mac = Signer::mac(key);
        let config = self.config_mut();
        match &mut config.signer {
            Some(s) => s.keys.push(mac),
            None => config.signer = Some(Signer { keys: vec![mac] }),
        }
        self
    }

    /// Rejects tokens of other clusters, as identified by `cluster`'s lag
    /// monitor at the time of the request (accepts all while the identity is
    /// not yet known).
    pub fn cluster(mut self, cluster: Cluster) -> Self {
        self.config_mut().identity = Identity::Cluster(cluster);
        self
    }

    /// Rejects tokens whose system identifier differs from `id`'s.
    pub fn cluster_id(mut self, id: ClusterId) -> Self {
        self.config_mut().identity = Identity::Fixed(id);
        self
    }

    /// The wire form of `token`: its text, signed when a signing key is set.
    pub fn encode(&self, token: &ConsistencyToken) -> String {
        let mut text = token.encode();
        if let Some(sig) = self.config.signer.as_ref().and_then(|s| s.sign(&text)) {
            text.push('.');
            text.push_str(&sig);
        }
        text
    }

    /// Validates a token presented by a client: well formed, correctly
    /// signed when a key is set, and of this cluster when the cluster is
    /// known. Tokens with system identifier 0 (issued while the issuing
    /// instance did not yet know the cluster's identity) pass the cluster
    /// check. Without a signing key a signature is ignored.
    pub fn decode(&self, text: &str) -> Result<ConsistencyToken, TokenRejection> {
        let text = text.trim();
        if text.len() > MAX_WIRE_LEN {
            return Err(TokenError::Malformed("too long").into());
        }
        let body = match &self.config.signer {
            Some(signer) => match split_signature(text) {
                Some((body, signature)) => {
                    if !signer.verify(body, signature) {
                        return Err(TokenRejection::BadSignature);
                    }
                    body
                }
                None => {
                    // Distinguish an unsigned token from plain garbage.
                    ConsistencyToken::decode(text)?;
                    return Err(TokenRejection::Unsigned);
                }
            },
            None => split_signature(text).map_or(text, |(body, _)| body),
        };
        let token = ConsistencyToken::decode(body)?;
        if token.cluster.system_identifier != 0 {
            if let Some(id) = self.config.identity.current() {
                token.check_cluster(&id)?;
            }
        }
        Ok(token)
    }

    /// The newest valid token in `headers`, from the token header and the
    /// token cookie. Invalid ones are ignored, logged at `debug` and counted
    /// in [`REJECTED_TOKENS_METRIC`].
    pub fn read_token(&self, headers: &HeaderMap) -> Option<ConsistencyToken> {
        // (value, where it came from); `None` for a value that is not text.
        let mut candidates: Vec<(Option<&str>, &'static str)> = Vec::new();
        for value in headers.get_all(&self.config.header_name) {
            if candidates.len() == MAX_CANDIDATES {
                break;
            }
            candidates.push((value.to_str().ok(), "header"));
        }
        let name = self.config.cookie_name.as_bytes();
        for value in headers.get_all(COOKIE) {
            for pair in value.as_bytes().split(|&b| b == b';') {
                let pair = pair.trim_ascii();
                let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                    continue;
                };
                if pair[..eq].trim_ascii() != name {
                    continue;
                }
                let raw = pair[eq + 1..].trim_ascii();
                let raw = raw
                    .strip_prefix(b"\"")
                    .and_then(|r| r.strip_suffix(b"\""))
                    .unwrap_or(raw);
                if candidates.len() == MAX_CANDIDATES {
                    break;
                }
                candidates.push((std::str::from_utf8(raw).ok(), "cookie"));
            }
        }
        let mut best: Option<ConsistencyToken> = None;
        for (value, source) in candidates {
            let result = match value {
                Some(v) if v.trim().is_empty() => continue,
                Some(v) => self.decode(v),
                None => Err(TokenError::Malformed("not text").into()),
            };
            match result {
                Ok(t) => best = Some(best.map_or(t, |b| b.max(t))),
                Err(rejection) => record_rejection(&rejection, source),
            }
        }
        best
    }

    /// Writes `token` to response headers: the token header and/or a
    /// `Set-Cookie` (`Path=/; Max-Age=…; HttpOnly; SameSite=Lax`, plus
    /// `Secure` when configured), as configured.
    pub fn write_token(&self, headers: &mut HeaderMap, token: &ConsistencyToken) {
        let max_age = self.config.cookie_max_age;
        self.write_wire(headers, &self.encode(token), max_age);
    }

    /// Tells the client to drop its token: an empty token header and/or an
    /// expired cookie (`Max-Age=0`), as configured.
    pub fn clear_token(&self, headers: &mut HeaderMap) {
        self.write_wire(headers, "", 0);
    }

    fn write_wire(&self, headers: &mut HeaderMap, wire: &str, max_age: u64) {
        let c = &self.config;
        if c.write_header {
            if let Ok(v) = HeaderValue::from_str(wire) {
                headers.insert(c.header_name.clone(), v);
            }
        }
        if c.write_cookie {
            let mut cookie = format!(
                "{}={wire}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax",
                c.cookie_name
            );
            if c.secure {
                cookie.push_str("; Secure");
            }
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                headers.append(SET_COOKIE, v);
            }
        }
    }
}

impl<S> Layer<S> for ConsistencyTokenLayer {
    type Service = ConsistencyTokenService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConsistencyTokenService {
            inner,
            layer: self.clone(),
        }
    }
}

/// Splits `v1.<payload>.<signature>` into its token and signature.
fn split_signature(text: &str) -> Option<(&str, &str)> {
    let (body, signature) = text.rsplit_once('.')?;
    body.contains('.').then_some((body, signature))
}

fn record_rejection(rejection: &TokenRejection, source: &'static str) {
    metrics::counter!(REJECTED_TOKENS_METRIC, "reason" => rejection.label()).increment(1);
    tracing::debug!(
        reason = rejection.label(),
        source,
        error = %rejection,
        "ignoring consistency token from client"
    );
}

/// RFC 6265 cookie-name: a non-empty HTTP token.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// The service made by [`ConsistencyTokenLayer`]: seeds a [`TokenCell`]
/// extension from the request and writes a changed token to the response.
#[derive(Clone, Debug)]
pub struct ConsistencyTokenService<S> {
    inner: S,
    layer: ConsistencyTokenLayer,
}

impl<S> ConsistencyTokenService<S> {
    /// Wraps `inner` with `layer`'s configuration.
    pub fn new(inner: S, layer: &ConsistencyTokenLayer) -> Self {
        layer.layer(inner)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ConsistencyTokenService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ConsistencyTokenFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let initial = self.layer.read_token(req.headers());
        let cell = TokenCell::new(initial);
        req.extensions_mut().insert(cell.clone());
        ConsistencyTokenFuture {
            inner: self.inner.call(req),
            write_back: Some(WriteBack {
                cell,
                initial,
                layer: self.layer.clone(),
            }),
        }
    }
}

#[derive(Debug)]
struct WriteBack {
    cell: TokenCell,
    initial: Option<ConsistencyToken>,
    layer: ConsistencyTokenLayer,
}

/// Response future of [`ConsistencyTokenService`].
#[pin_project]
#[derive(Debug)]
pub struct ConsistencyTokenFuture<F> {
    #[pin]
    inner: F,
    write_back: Option<WriteBack>,
}

impl<F, ResBody, E> Future for ConsistencyTokenFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(wb) = this.write_back.take() {
            let token = wb.cell.get();
            if token != wb.initial {
                match token {
                    Some(t) => wb.layer.write_token(response.headers_mut(), &t),
                    None => wb.layer.clear_token(response.headers_mut()),
                }
            }
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::ServiceExt;

    use super::*;
    use crate::lsn::Lsn;

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
}
