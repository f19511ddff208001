//! Consistency tokens: the WAL position a reader must see, portable between
//! processes.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::lsn::Lsn;

/// Identity of a PostgreSQL cluster (a primary and its physical replicas).
///
/// `system_identifier` is fixed at `initdb` and shared by every physical
/// replica; `timeline` increases by one at each promotion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId {
    /// `pg_control_system().system_identifier`.
    pub system_identifier: u64,
    /// The primary's WAL timeline.
    pub timeline: u32,
}

/// A read-your-writes token: "a read must see at least this WAL position of
/// this cluster".
///
/// Tokens are opaque, versioned, URL-safe strings (`v1.` followed by
/// unpadded base64url) that a service can hand to its clients in a header or
/// cookie and accept back. Decoding untrusted input never panics: anything
/// that is not a well-formed token is a [`TokenError`].
///
/// ```
/// use lagrouter::{ConsistencyToken, Lsn};
/// let t = ConsistencyToken::new(Lsn(0x1_0000_2000), 7_300_000_000_000_000_001, 1);
/// let s = t.to_string();
/// assert!(s.starts_with("v1."));
/// assert_eq!(s.parse::<ConsistencyToken>().unwrap(), t);
/// assert!("v1.garbage".parse::<ConsistencyToken>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConsistencyToken {
    /// The WAL position the reader must see.
    pub lsn: Lsn,
    /// The cluster the position belongs to.
    pub cluster: ClusterId,
}

const VERSION_PREFIX: &str = "v1.";
/// lsn (8) + system identifier (8) + timeline (4) + check (2).
const PAYLOAD_LEN: usize = 22;
/// Longest text accepted before decoding (protects against huge inputs).
const MAX_TEXT_LEN: usize = 64;

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token at all (wrong prefix, bad base64, wrong length, bad check).
    #[error("malformed consistency token: {0}")]
    Malformed(&'static str),
    /// A token format this version does not understand.
    #[error("unsupported consistency token version {0:?}")]
    UnsupportedVersion(String),
    /// A well-formed token issued by a different cluster.
    #[error(
        "consistency token belongs to another cluster (system identifier {token}, this cluster is {cluster})"
    )]
    ForeignCluster {
        /// The token's system identifier.
        token: u64,
        /// This cluster's system identifier.
        cluster: u64,
    },
}

impl ConsistencyToken {
    /// A token for `lsn` on the cluster `system_identifier`, timeline `timeline`.
    pub fn new(lsn: Lsn, system_identifier: u64, timeline: u32) -> Self {
        ConsistencyToken {
            lsn,
            cluster: ClusterId {
                system_identifier,
                timeline,
            },
        }
    }

    /// The newer of two tokens of the same cluster (by timeline, then LSN).
    pub fn max(self, other: ConsistencyToken) -> ConsistencyToken {
        if (other.cluster.timeline, other.lsn) > (self.cluster.timeline, self.lsn) {
            other
        } else {
            self
        }
    }

    /// Checks that the token was issued by the cluster `id`. A system
    /// identifier of 0 on either side means "unknown" (a token issued before
    /// the cluster's identity could be read) and is accepted.
    pub fn check_cluster(&self, id: &ClusterId) -> Result<(), TokenError> {
        if self.cluster.system_identifier != 0
            && id.system_identifier != 0
            && self.cluster.system_identifier != id.system_identifier
        {
            return Err(TokenError::ForeignCluster {
                token: self.cluster.system_identifier,
                cluster: id.system_identifier,
            });
        }
        Ok(())
    }

    /// Encodes the token as its URL-safe text form.
    pub fn encode(&self) -> String {
        let mut buf = [0u8; PAYLOAD_LEN];
        buf[0..8].copy_from_slice(&self.lsn.as_u64().to_be_bytes());
        buf[8..16].copy_from_slice(&self.cluster.system_identifier.to_be_bytes());
        buf[16..20].copy_from_slice(&self.cluster.timeline.to_be_bytes());
        let check = fletcher16(&buf[..20]);
        buf[20..22].copy_from_slice(&check.to_be_bytes());
        let mut s = String::with_capacity(VERSION_PREFIX.len() + 30);
        s.push_str(VERSION_PREFIX);
        URL_SAFE_NO_PAD.encode_string(buf, &mut s);
        s
    }

    /// Decodes a token from untrusted text.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TEXT_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let Some(body) = text.strip_prefix(VERSION_PREFIX) else {
            return match text.split_once('.') {
                Some((v, _))
                    if v.len() <= 8
                        && v.starts_with('v')
                        && v.len() > 1
                        && v[1..].bytes().all(|b| b.is_ascii_digit()) =>
                {
                    Err(TokenError::UnsupportedVersion(v.to_string()))
                }
                _ => Err(TokenError::Malformed("missing version prefix")),
            };
        };
        let mut buf = [0u8; PAYLOAD_LEN + 3];
        let n = URL_SAFE_NO_PAD
            .decode_slice(body, &mut buf)
            .map_err(|_| TokenError::Malformed("invalid base64url"))?;
        if n != PAYLOAD_LEN {
            return Err(TokenError::Malformed("wrong length"));
        }
        let check = u16::from_be_bytes([buf[20], buf[21]]);
        if check != fletcher16(&buf[..20]) {
            return Err(TokenError::Malformed("checksum mismatch"));
        }
        let lsn = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        let sysid = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
        let timeline = u32::from_be_bytes(buf[16..20].try_into().expect("4 bytes"));
        if timeline == 0 {
            return Err(TokenError::Malformed("timeline 0"));
        }
        Ok(ConsistencyToken::new(Lsn(lsn), sysid, timeline))
    }
}

/// Fletcher-16 over the payload: catches truncation and typos, not forgery
/// (sign tokens with the `http` layer's HMAC where clients are untrusted).
fn fletcher16(data: &[u8]) -> u16 {
    let (mut a, mut b) = (0u16, 0u16);
    for &x in data {
        a = (a + x as u16) % 255;
        b = (b + a) % 255;
    }
    (b << 8) | a
}

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl FromStr for ConsistencyToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConsistencyToken::decode(s)
    }
}

impl Serialize for ConsistencyToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for ConsistencyToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ConsistencyToken::decode(&s).map_err(serde::de::Error::custom)
    }
}

/// The "keep the newer token" rule in one place: a session's token, which
/// only moves forward (by [`ConsistencyToken::max`]) until cleared.
///
/// A plain value (`Copy`); share it between tasks as a [`SharedToken`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenHolder(Option<ConsistencyToken>);

impl TokenHolder {
    /// Starts from `token`.
    pub const fn new(token: Option<ConsistencyToken>) -> Self {
        TokenHolder(token)
    }

    /// The current token.
    pub const fn get(&self) -> Option<ConsistencyToken> {
        self.0
    }

    /// Merges `token` in, keeping the newer one; `None` changes nothing.
    pub fn observe(&mut self, token: Option<ConsistencyToken>) {
        self.0 = match (self.0, token) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Forgets the token (the only way back).
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

/// A [`TokenHolder`] shared between tasks: cloning is cheap and clones share
/// the token.
///
/// Used by every request through a
/// [`TokenTrackingLayer`](crate::TokenTrackingLayer) (reads carry it, and
/// each response advances it) and, as `http::TokenCell`, between the HTTP
/// layer and a handler (feature `http`).
#[derive(Clone, Debug, Default)]
pub struct SharedToken(Arc<Mutex<TokenHolder>>);

impl SharedToken {
    /// Starts from `token`.
    pub fn new(token: Option<ConsistencyToken>) -> Self {
        SharedToken(Arc::new(Mutex::new(TokenHolder::new(token))))
    }

    fn lock(&self) -> MutexGuard<'_, TokenHolder> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current token.
    pub fn get(&self) -> Option<ConsistencyToken> {
        self.lock().get()
    }

    /// Merges `token` in, keeping the newer one; `None` changes nothing.
    pub fn observe(&self, token: Option<ConsistencyToken>) {
        self.lock().observe(token);
    }

    /// Forgets the token (the only way back). For the HTTP layer this tells
    /// the client to drop its token (an expired cookie, an empty header):
    /// use it when the token turned out to be useless, e.g. after
    /// [`Error::TokenAhead`](crate::Error::TokenAhead): a token ahead of the
    /// primary was forged or stands for writes lost in a failover.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConsistencyToken {
        ConsistencyToken::new(Lsn(0x0000_0003_0A00_1F28), 7_412_345_678_901_234_567, 2)
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with("v1."));
        assert!(
            s[3..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{s} is not URL-safe"
        );
        assert_eq!(ConsistencyToken::decode(&s), Ok(t));
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<ConsistencyToken>(&json).unwrap(), t);
    }

    #[test]
    fn extreme_values_round_trip() {
        for t in [
            ConsistencyToken::new(Lsn(0), 0, 1),
            ConsistencyToken::new(Lsn(u64::MAX), u64::MAX, u32::MAX),
        ] {
            assert_eq!(ConsistencyToken::decode(&t.encode()), Ok(t));
        }
    }

    #[test]
    fn rejects_garbage() {
        let good = sample().encode();
        let cases: Vec<String> = vec![
            String::new(),
            "v1.".into(),
            "v1".into(),
            "hello".into(),
            "v1.!!!!".into(),
            "v1.AAAA".into(),
            format!("{good}AA"),
            good[..good.len() - 1].to_string(),
            "x".repeat(10_000),
            "v1.\u{1F600}\u{1F600}".into(),
            good.replace("v1.", "V1."),
        ];
        for c in cases {
            assert!(
                matches!(ConsistencyToken::decode(&c), Err(TokenError::Malformed(_))),
                "accepted {c:?}"
            );
        }
    }

    #[test]
    fn detects_corruption() {
        let good = sample().encode();
        let mut bytes = good.into_bytes();
        // Flip one base64 character in the LSN part.
        let i = 5;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bytes).unwrap();
        assert_eq!(
            ConsistencyToken::decode(&bad),
            Err(TokenError::Malformed("checksum mismatch"))
        );
    }

    #[test]
    fn unknown_version_is_reported() {
        assert_eq!(
            ConsistencyToken::decode("v9.AAAA"),
            Err(TokenError::UnsupportedVersion("v9".into()))
        );
    }

    #[test]
    fn foreign_cluster_detected() {
        let t = sample();
        let other = ClusterId {
            system_identifier: 1,
            timeline: 2,
        };
        assert!(matches!(
            t.check_cluster(&other),
            Err(TokenError::ForeignCluster { cluster: 1, .. })
        ));
        assert_eq!(t.check_cluster(&t.cluster), Ok(()));
        let unknown = ConsistencyToken::new(Lsn(1), 0, 1);
        assert_eq!(unknown.check_cluster(&other), Ok(()));
    }

    #[test]
    fn max_prefers_later_timeline_then_lsn() {
        let a = ConsistencyToken::new(Lsn(100), 1, 1);
        let b = ConsistencyToken::new(Lsn(50), 1, 2);
        let c = ConsistencyToken::new(Lsn(200), 1, 1);
        assert_eq!(a.max(b), b);
        assert_eq!(a.max(c), c);
        assert_eq!(c.max(a), c);
    }

    #[test]
    fn holder_keeps_the_newer_token() {
        let t = |lsn, tli| ConsistencyToken::new(Lsn(lsn), 7, tli);
        let mut h = TokenHolder::default();
        assert_eq!(h.get(), None);
        h.observe(None);
        assert_eq!(h.get(), None);
        h.observe(Some(t(10, 1)));
        assert_eq!(h.get(), Some(t(10, 1)));
        h.observe(Some(t(5, 1)));
        h.observe(None);
        assert_eq!(h.get(), Some(t(10, 1)));
        // A later timeline wins over a higher position.
        h.observe(Some(t(3, 2)));
        assert_eq!(h.get(), Some(t(3, 2)));
        let copy = h;
        h.clear();
        assert_eq!(h.get(), None);
        assert_eq!(copy.get(), Some(t(3, 2)));
        assert_eq!(TokenHolder::new(Some(t(1, 1))).get(), Some(t(1, 1)));
    }

    #[test]
    fn shared_token_clones_share_the_holder() {
        let t = |lsn| ConsistencyToken::new(Lsn(lsn), 7, 1);
        let shared = SharedToken::new(Some(t(10)));
        let clone = shared.clone();
        clone.observe(Some(t(5)));
        assert_eq!(shared.get(), Some(t(10)));
        clone.observe(Some(t(20)));
        assert_eq!(shared.get(), Some(t(20)));
        shared.clear();
        assert_eq!(clone.get(), None);
    }
}
