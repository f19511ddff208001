//! [`ConsistencyTokenLayer`]: configuration, and reading, validating and
//! writing tokens in HTTP headers.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{COOKIE, HeaderMap, HeaderName, HeaderValue, SET_COOKIE};
use tower::Layer;

use super::ConsistencyTokenService;
use super::signer::{Signer, split_signature};
use crate::client::Cluster;
use crate::metrics::HTTP_REJECTED_TOKENS_TOTAL;
use crate::model::token::{ClusterId, ConsistencyToken, TokenError, TokenHolder};

/// Default name of the request and response header carrying the token.
pub const DEFAULT_HEADER_NAME: &str = "x-lagrouter-token";

/// Default name of the cookie carrying the token.
pub const DEFAULT_COOKIE_NAME: &str = "lagrouter_token";

/// Default `Max-Age` of the cookie: long enough for any replica that is
/// still in rotation to have replayed the write, short enough not to linger.
pub const DEFAULT_COOKIE_MAX_AGE: Duration = Duration::from_secs(300);

/// Name of the counter of client tokens that were ignored (label `reason`,
/// see [`TokenRejection::label`]).
pub const REJECTED_TOKENS_METRIC: &str = HTTP_REJECTED_TOKENS_TOTAL;
/// Longest wire form accepted (a signed token is 3 + 30 + 1 + 43 at most).
const MAX_WIRE_LEN: usize = 96;
/// At most this many candidate tokens are examined per request.
const MAX_CANDIDATES: usize = 8;

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
/// [module documentation](crate::http)).
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
        let mut best = TokenHolder::default();
        for (value, source) in candidates {
            let result = match value {
                Some(v) if v.trim().is_empty() => continue,
                Some(v) => self.decode(v),
                None => Err(TokenError::Malformed("not text").into()),
            };
            match result {
                Ok(t) => best.observe(Some(t)),
                Err(rejection) => record_rejection(&rejection, source),
            }
        }
        best.get()
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

fn record_rejection(rejection: &TokenRejection, source: &'static str) {
    metrics::counter!(HTTP_REJECTED_TOKENS_TOTAL, "reason" => rejection.label()).increment(1);
    tracing::debug!(
        reason = rejection.label(),
        source,
        error = %rejection,
        "ignoring consistency token from client"
    );
}

/// RFC 6265 cookie-name: a non-empty HTTP token.
pub(super) fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}
