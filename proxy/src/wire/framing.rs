//! Message framing: splitting the byte stream at message boundaries (type
//! byte and length) and enforcing the length limits, and the error for a
//! byte stream that does not hold valid messages ([`ProtocolError`]). Each frame is then
//! decoded in isolation ([`super::messages`]), so a malformed length inside a
//! message can never make a decoder read into the next message.

use bytes::{Bytes, BytesMut};

/// Largest client message accepted (64 MiB); longer ones close the
/// connection with SQLSTATE 08P01.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;
/// Largest startup packet accepted (10 KiB), as PostgreSQL's
/// `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_LEN: usize = 10 * 1024;
/// Largest server message accepted (1 GiB, PostgreSQL's own limit).
pub const MAX_BACKEND_MESSAGE_LEN: usize = 0x3fff_ffff;

/// The byte stream did not hold a valid protocol message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The length field exceeds the limit.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The length field is smaller than the header itself.
    #[error("invalid message length {0}")]
    BadLength(i64),
    /// The message body could not be decoded.
    #[error("malformed {what} message: {detail}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A name or query string is not valid UTF-8 (the only client encoding
    /// the proxy accepts). The message itself is well-framed, so this is an
    /// ordinary error (SQLSTATE 22021), not a protocol violation.
    #[error("invalid byte sequence for encoding \"UTF8\" in {0} message")]
    InvalidUtf8(&'static str),
    /// A message type this side of the protocol does not know.
    #[error("invalid frontend message type {:?}", char::from(*.0))]
    UnknownType(u8),
}

impl ProtocolError {
    /// A [`ProtocolError::Malformed`] for message `what`.
    pub(crate) fn malformed(what: &'static str, detail: impl ToString) -> Self {
        ProtocolError::Malformed {
            what,
            detail: detail.to_string(),
        }
    }
}

/// One complete tagged message: the type byte and the whole message bytes
/// (type byte and length included), ready to be forwarded unchanged.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// The whole message, header included.
    pub bytes: Bytes,
}

impl Frame {
    /// The body after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Splits one complete tagged message off the front of `buf`, if present.
/// Reserves room for the rest of a partially received message.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    let total = len + 1;
    if buf.len() < total {
        // Grow ahead for big messages instead of many small reallocations,
        // but never by more than 1 MiB before the bytes arrive: a client that
        // announces a large message and stalls pins little memory.
        buf.reserve((total - buf.len()).min(1 << 20));
        return Ok(None);
    }
    let bytes = buf.split_to(total).freeze();
    Ok(Some(Frame { tag, bytes }))
}

/// Splits one complete untagged (startup-phase) packet off `buf`.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > MAX_STARTUP_LEN {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_STARTUP_LEN,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn frames_are_split_and_limited() {
        let mut b = BytesMut::new();
        b.put_u8(b'Q');
        b.put_i32(9);
        b.put_slice(b"abcd");
        b.put_u8(b'S');
        assert!(split_frame(&mut b, 100).unwrap().is_some());
        assert!(split_frame(&mut b, 100).unwrap().is_none());
        let mut big = BytesMut::new();
        big.put_u8(b'Q');
        big.put_i32(1_000_000);
        assert!(matches!(
            split_frame(&mut big, 1000),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut neg = BytesMut::new();
        neg.put_u8(b'Q');
        neg.put_i32(2);
        assert!(matches!(
            split_frame(&mut neg, 1000),
            Err(ProtocolError::BadLength(2))
        ));
    }
}
