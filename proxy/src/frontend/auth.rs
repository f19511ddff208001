//! Client authentication performed by the proxy itself: SCRAM-SHA-256
//! (server side of RFC 5802 / RFC 7677 as PostgreSQL speaks it), md5 and
//! trust. Backend authentication (the proxy as a client) lives in
//! [`crate::backend`] and uses `postgres-protocol`'s SCRAM client.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The mechanism name offered to clients.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Why authentication failed. Every variant is reported to the client as
/// SQLSTATE 28P01 without detail (no information about which part failed),
/// and logged with the detail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Wrong password (or unknown user).
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    /// The client broke the SCRAM exchange.
    #[error("malformed SCRAM message: {0}")]
    Protocol(&'static str),
    /// A stored verifier could not be parsed.
    #[error("invalid stored SCRAM verifier")]
    BadVerifier,
}

/// A SCRAM-SHA-256 verifier as PostgreSQL stores it in `pg_authid`:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// The salt.
    pub salt: Vec<u8>,
    /// `H(ClientKey)`.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Computes a verifier for a plaintext password (random salt, 4096
    /// iterations), using `postgres-protocol`'s implementation.
    pub fn from_password(password: &str) -> Self {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&text).expect("postgres-protocol produces valid verifiers")
    }

    /// Parses a stored verifier string.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(AuthError::BadVerifier)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or(AuthError::BadVerifier)?;
        let (iter, salt) = iter_salt.split_once(':').ok_or(AuthError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(AuthError::BadVerifier)?;
        let iterations = iter.parse().map_err(|_| AuthError::BadVerifier)?;
        let salt = B64.decode(salt).map_err(|_| AuthError::BadVerifier)?;
        let key = |s: &str| -> Result<[u8; 32], AuthError> {
            B64.decode(s)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(AuthError::BadVerifier)
        };
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any size");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Constant-time comparison.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The server side of one SCRAM-SHA-256 exchange.
#[derive(Debug)]
pub struct ScramServer {
    verifier: ScramVerifier,
    user: String,
    state: ScramState,
}

#[derive(Debug)]
enum ScramState {
    Initial,
    SentFirst {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Done,
}

impl ScramServer {
    /// Starts an exchange for `user` against `verifier`.
    pub fn new(user: &str, verifier: ScramVerifier) -> Self {
        ScramServer {
            verifier,
            user: user.to_string(),
            state: ScramState::Initial,
        }
    }

    /// Handles the client-first-message; returns the server-first-message.
    pub fn client_first(&mut self, message: &[u8]) -> Result<String, AuthError> {
        let text = std::str::from_utf8(message).map_err(|_| AuthError::Protocol("not UTF-8"))?;
        // gs2-header: channel binding flag, authzid, then the bare message.
        let mut parts = text.splitn(3, ',');
        let cbind = parts
            .next()
            .ok_or(AuthError::Protocol("missing gs2 header"))?;
        let authzid = parts
            .next()
            .ok_or(AuthError::Protocol("missing gs2 header"))?;
        let bare = parts
            .next()
            .ok_or(AuthError::Protocol("missing client-first-bare"))?;
        match cbind {
            "n" | "y" => {}
            _ if cbind.starts_with("p=") => {
                return Err(AuthError::Protocol("channel binding is not supported"));
            }
            _ => return Err(AuthError::Protocol("invalid channel binding flag")),
        }
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(AuthError::Protocol("invalid authzid"));
        }
        let mut client_nonce = None;
        for attr in bare.split(',') {
            if let Some(n) = attr.strip_prefix("r=") {
                client_nonce = Some(n);
            } else if attr.starts_with("m=") {
                return Err(AuthError::Protocol(
                    "mandatory extensions are not supported",
                ));
            }
        }
        let client_nonce = client_nonce
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(AuthError::Protocol("missing or invalid nonce"))?;
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = ScramState::SentFirst {
            gs2_header: format!("{cbind},{authzid},"),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// Handles the client-final-message; returns the server-final-message
    /// (`v=…`) when the proof is right.
    pub fn client_final(&mut self, message: &[u8]) -> Result<String, AuthError> {
        let ScramState::SentFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ScramState::Done)
        else {
            return Err(AuthError::Protocol("unexpected SCRAM message"));
        };
        let text = std::str::from_utf8(message).map_err(|_| AuthError::Protocol("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(AuthError::Protocol("missing proof"))?;
        let mut cbind = None;
        let mut rnonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                cbind = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                rnonce = Some(r);
            }
        }
        let cbind = B64
            .decode(cbind.ok_or(AuthError::Protocol("missing channel binding"))?)
            .map_err(|_| AuthError::Protocol("invalid channel binding"))?;
        if cbind != gs2_header.as_bytes() {
            return Err(AuthError::Protocol("channel binding mismatch"));
        }
        if rnonce != Some(nonce.as_str()) {
            return Err(AuthError::Protocol("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| AuthError::Protocol("invalid proof encoding"))?;
        if proof.len() != 32 {
            return Err(AuthError::Protocol("invalid proof length"));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let stored = Sha256::digest(&client_key);
        if !ct_eq(&stored, &self.verifier.stored_key) {
            return Err(AuthError::Failed(self.user.clone()));
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// The response a client must send to an md5 challenge with `salt`, for a
/// user whose password is `password` (plaintext, or an `md5…` hash as
/// stored by PostgreSQL).
pub fn md5_expected(user: &str, password: &str, salt: [u8; 4]) -> String {
    match password.strip_prefix("md5").filter(|h| h.len() == 32) {
        // Stored hash md5(password || user): hash it once more with the salt.
        Some(hash) => {
            let mut data = hash.as_bytes().to_vec();
            data.extend_from_slice(&salt);
            format!("md5{}", md5_hex(&data))
        }
        None => {
            postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt)
        }
    }
}

/// Hex MD5 through postgres-protocol's md5 helper: `md5_hash(u, p, s)` is
/// `"md5" + hex(md5(hex(md5(p || u)) || s))`, so with an empty user, empty
/// salt is not usable; compute it directly instead.
fn md5_hex(data: &[u8]) -> String {
    use md5::Digest as _;
    let digest = md5::Md5::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks an md5 response in constant time.
pub fn md5_check(user: &str, password: &str, salt: [u8; 4], response: &str) -> bool {
    ct_eq(
        md5_expected(user, password, salt).as_bytes(),
        response.as_bytes(),
    )
}

/// A random md5 salt.
pub fn random_salt() -> [u8; 4] {
    let mut s = [0u8; 4];
    rand::rng().fill_bytes(&mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn scram_round_trip_with_postgres_protocol_client() {
        let verifier = ScramVerifier::from_password("s3cret");
        let mut server = ScramServer::new("alice", verifier);
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unrequested());
        let first = server.client_first(client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        let fin = server.client_final(client.message()).unwrap();
        client.finish(fin.as_bytes()).unwrap();
    }

    #[test]
    fn scram_wrong_password_fails() {
        let verifier = ScramVerifier::from_password("s3cret");
        let mut server = ScramServer::new("alice", verifier);
        let mut client = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
        let first = server.client_first(client.message()).unwrap();
        client.update(first.as_bytes()).unwrap();
        assert_eq!(
            server.client_final(client.message()),
            Err(AuthError::Failed("alice".into()))
        );
    }

    #[test]
    fn scram_garbage_is_rejected() {
        let verifier = ScramVerifier::from_password("x");
        for msg in [
            &b""[..],
            b"garbage",
            b"p=tls-server-end-point,,n=,r=abc",
            b"n,,n=",
            b"\xff\xfe",
        ] {
            let mut server = ScramServer::new("u", verifier.clone());
            assert!(server.client_first(msg).is_err(), "{msg:?}");
        }
        let mut server = ScramServer::new("u", verifier);
        server.client_first(b"n,,n=,r=abcdef").unwrap();
        assert!(server.client_final(b"c=biws,r=wrong,p=AAAA").is_err());
    }

    #[test]
    fn md5_plain_and_hashed_agree() {
        let salt = [1, 2, 3, 4];
        let plain = md5_expected("bob", "pw", salt);
        let stored = postgres_protocol::password::md5(b"pw", "bob");
        assert_eq!(plain, md5_expected("bob", &stored, salt));
        assert!(md5_check("bob", "pw", salt, &plain));
        assert!(!md5_check("bob", "other", salt, &plain));
    }
}
