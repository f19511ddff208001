//! HMAC-SHA256 signatures of tokens on the wire (`<token>.<signature>`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of HMAC-SHA256 output carried by signed tokens (22 base64url chars).
pub(super) const SIGNATURE_LEN: usize = 16;
/// Base64url length of a full 32-byte HMAC-SHA256 tag (also accepted).
pub(super) const FULL_SIGNATURE_CHARS: usize = 43;
/// Domain separation for the HMAC input, so that a key shared with other
/// uses cannot be made to sign tokens.
pub(super) const SIGNING_CONTEXT: &[u8] = b"lagrouter consistency token\0";

/// HMAC keys: the first signs, all verify (for key rotation).
#[derive(Clone)]
pub(super) struct Signer {
    pub(super) keys: Vec<Hmac<Sha256>>,
}

impl Signer {
    pub(super) fn mac(key: &[u8]) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length")
    }

    pub(super) fn tag(key: &Hmac<Sha256>, body: &str) -> Hmac<Sha256> {
        let mut mac = key.clone();
        mac.update(SIGNING_CONTEXT);
        mac.update(body.as_bytes());
        mac
    }

    pub(super) fn sign(&self, body: &str) -> Option<String> {
        let key = self.keys.first()?;
        let tag = Self::tag(key, body).finalize().into_bytes();
        Some(URL_SAFE_NO_PAD.encode(&tag[..SIGNATURE_LEN]))
    }

    /// Constant-time verification of a 16-byte (22 chars) or full 32-byte
    /// (43 chars) base64url tag.
    pub(super) fn verify(&self, body: &str, signature: &str) -> bool {
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

/// Splits `v1.<payload>.<signature>` into its token and signature.
pub(super) fn split_signature(text: &str) -> Option<(&str, &str)> {
    let (body, signature) = text.rsplit_once('.')?;
    body.contains('.').then_some((body, signature))
}
