//! Errors the proxy reports to clients with their SQLSTATE ([`PgError`]),
//! and the fields of a server's `ErrorResponse` ([`ErrorFields`]). What is
//! wrong with a byte stream is [`super::ProtocolError`].

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend;

use super::encode::encode;
use super::framing::Frame;
use super::messages::parse_backend;

/// SQLSTATE `protocol_violation`.
pub const SQLSTATE_PROTOCOL_VIOLATION: &str = "08P01";

/// The interesting fields of an `ErrorResponse` / `NoticeResponse`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `S`: ERROR, FATAL, …
    pub severity: String,
    /// `C`: the SQLSTATE.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
    /// `D`: the detail, when given.
    pub detail: Option<String>,
}

/// Reads severity, SQLSTATE, message and detail of an `ErrorResponse`
/// frame.
pub fn error_fields(frame: &Frame) -> ErrorFields {
    let mut out = ErrorFields::default();
    let Ok(backend::Message::ErrorResponse(body)) = parse_backend(frame) else {
        return out;
    };
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'S' => out.severity = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'C' => out.code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => out.message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'D' => out.detail = Some(String::from_utf8_lossy(f.value_bytes()).into_owned()),
            _ => {}
        }
    }
    out
}

/// An error (or notice) the proxy itself reports to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgError {
    /// `ERROR` or `FATAL`.
    pub severity: &'static str,
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl PgError {
    /// An `ERROR` with this SQLSTATE and message.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        PgError {
            severity: "ERROR",
            code: code.to_string(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A `FATAL` error (the connection is closed after it).
    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        PgError {
            severity: "FATAL",
            ..PgError::error(code, message)
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Appends the `ErrorResponse` to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut fields = vec![
            (b'S', self.severity.to_string()),
            (b'V', self.severity.to_string()),
            (b'C', self.code.clone()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        encode(
            &pgwire::messages::response::ErrorResponse::new(sanitize_fields(fields)),
            out,
        );
    }

    /// The encoded `ErrorResponse`.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// C strings cannot hold NUL bytes.
fn sanitize_fields(fields: Vec<(u8, String)>) -> Vec<(u8, String)> {
    fields
        .into_iter()
        .map(|(t, v)| (t, v.replace('\0', "")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{MAX_MESSAGE_LEN, split_frame};

    #[test]
    fn error_fields_roundtrip() {
        let e = PgError::error("22023", "bad token").to_bytes();
        let f = split_frame(&mut BytesMut::from(&e[..]), MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        let fields = error_fields(&f);
        assert_eq!(fields.code, "22023");
        assert_eq!(fields.message, "bad token");
        assert_eq!(fields.severity, "ERROR");
    }
}
