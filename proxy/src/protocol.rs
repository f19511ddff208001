//! Wire-level helpers: message framing with length limits, decoding of
//! client messages (through `pgwire`'s codec) and backend messages (through
//! `postgres-protocol`), and encoding of the messages the proxy itself sends.
//!
//! Framing only splits the byte stream at message boundaries (type byte and
//! length) and enforces the limits; each frame is then decoded in isolation,
//! so a malformed length inside a message can never make a decoder read into
//! the next message.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::{GssEncRequest, SslRequest, Startup};
use pgwire::messages::{DecodeContext, Message, PgWireFrontendMessage, ProtocolVersion};
use postgres_protocol::message::backend;

/// Largest client message accepted (64 MiB); longer ones close the
/// connection with SQLSTATE 08P01.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;
/// Largest startup packet accepted (10 KiB), as PostgreSQL's
/// `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_LEN: usize = 10 * 1024;
/// Largest server message accepted (1 GiB, PostgreSQL's own limit).
pub const MAX_BACKEND_MESSAGE_LEN: usize = 0x3fff_ffff;

/// SQLSTATE `protocol_violation`.
pub const SQLSTATE_PROTOCOL_VIOLATION: &str = "08P01";

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
    fn malformed(what: &'static str, detail: impl ToString) -> Self {
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

/// What a client sent before authentication.
#[derive(Debug)]
pub enum StartupPacket {
    /// `SSLRequest`.
    Ssl,
    /// `GSSENCRequest`.
    Gss,
    /// `CancelRequest` for the session with this (pid, secret).
    Cancel {
        /// Process id from the proxy's `BackendKeyData`.
        pid: i32,
        /// Secret from the proxy's `BackendKeyData`.
        secret: i32,
    },
    /// `StartupMessage`.
    Startup(Startup),
}

/// Runs a `pgwire` decoder on an isolated copy of one message, turning any
/// panic of the decoder on malformed input into an error.
fn isolated<T>(
    what: &'static str,
    bytes: &[u8],
    f: impl FnOnce(&mut BytesMut) -> Result<Option<T>, pgwire::error::PgWireError>,
) -> Result<(T, usize), ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let r = f(&mut buf);
        (r, buf.len())
    }));
    match result {
        Ok((Ok(Some(v)), rest)) => Ok((v, rest)),
        Ok((Ok(None), _)) => Err(ProtocolError::malformed(what, "truncated")),
        Ok((Err(e), _)) => Err(ProtocolError::malformed(what, e)),
        Err(_) => Err(ProtocolError::malformed(what, "inconsistent field lengths")),
    }
}

/// Decodes a startup-phase packet (as split by [`split_startup`]).
pub fn decode_startup(packet: &[u8]) -> Result<StartupPacket, ProtocolError> {
    if SslRequest::is_ssl_request_packet(packet) {
        return Ok(StartupPacket::Ssl);
    }
    if GssEncRequest::is_gss_enc_request_packet(packet) {
        return Ok(StartupPacket::Gss);
    }
    let ctx = frontend_ctx(true);
    if CancelRequest::is_cancel_request_packet(packet) {
        let (c, _) = isolated("CancelRequest", packet, |b| CancelRequest::decode(b, &ctx))?;
        let secret = c
            .secret_key
            .as_i32()
            .ok_or_else(|| ProtocolError::malformed("CancelRequest", "secret key length"))?;
        return Ok(StartupPacket::Cancel { pid: c.pid, secret });
    }
    if packet.len() >= 8 {
        let major = u16::from_be_bytes([packet[4], packet[5]]);
        if major != 3 {
            return Err(ProtocolError::malformed(
                "StartupMessage",
                format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0",
                    major,
                    u16::from_be_bytes([packet[6], packet[7]])
                ),
            ));
        }
    }
    // Names and values must be UTF-8 (a decoder would replace bad bytes,
    // and two different user names could then look alike).
    if packet.len() > 8 && std::str::from_utf8(&packet[8..]).is_err() {
        return Err(ProtocolError::InvalidUtf8("StartupMessage"));
    }
    let (s, _) = isolated("StartupMessage", packet, |b| Startup::decode(b, &ctx))?;
    Ok(StartupPacket::Startup(s))
}

fn frontend_ctx(startup: bool) -> DecodeContext {
    let mut ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    ctx.awaiting_frontend_ssl = false;
    ctx.awaiting_frontend_startup = startup;
    ctx
}

/// Decodes one client message after startup with `pgwire`'s codec.
pub fn decode_frontend(frame: &Frame) -> Result<PgWireFrontendMessage, ProtocolError> {
    let ctx = frontend_ctx(false);
    let what = frontend_name(frame.tag);
    if what == "unknown" {
        return Err(ProtocolError::UnknownType(frame.tag));
    }
    check_layout(frame.tag, frame.body()).map_err(|d| match d {
        INVALID_UTF8 => ProtocolError::InvalidUtf8(what),
        d => ProtocolError::malformed(what, d),
    })?;
    let (msg, rest) = isolated(what, &frame.bytes, |b| {
        PgWireFrontendMessage::decode(b, &ctx)
    })?;
    if rest != 0 {
        return Err(ProtocolError::malformed(what, "trailing bytes"));
    }
    Ok(msg)
}

/// What [`check_layout`] reports for a name or SQL string that is not UTF-8.
const INVALID_UTF8: &str = "invalid UTF-8";

/// Walks the fields of an extended-protocol message or `Query` and checks
/// that every count and length stays inside the message and that names and
/// SQL are UTF-8, so that the decoder is only ever given structurally
/// sound input.
fn check_layout(tag: u8, body: &[u8]) -> Result<(), &'static str> {
    struct Cursor<'a>(&'a [u8]);
    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
            if self.0.len() < n {
                return Err("field extends past the end of the message");
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn cstr(&mut self) -> Result<(), &'static str> {
            let end = self
                .0
                .iter()
                .position(|&b| b == 0)
                .ok_or("string without its terminating NUL")?;
            std::str::from_utf8(&self.0[..end]).map_err(|_| INVALID_UTF8)?;
            self.0 = &self.0[end + 1..];
            Ok(())
        }
        fn count(&mut self) -> Result<usize, &'static str> {
            let b = self.take(2)?;
            let n = i16::from_be_bytes([b[0], b[1]]);
            usize::try_from(n).map_err(|_| "negative count")
        }
    }
    let mut c = Cursor(body);
    match tag {
        b'B' => {
            c.cstr()?; // portal
            c.cstr()?; // statement
            let formats = c.count()?;
            c.take(formats * 2)?;
            for _ in 0..c.count()? {
                let b = c.take(4)?;
                let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                if len < -1 {
                    return Err("negative parameter length");
                }
                if len > 0 {
                    c.take(len as usize)?;
                }
            }
            let results = c.count()?;
            c.take(results * 2)?;
        }
        b'P' => {
            c.cstr()?; // statement
            c.cstr()?; // query
            let types = c.count()?;
            c.take(types * 4)?;
        }
        b'Q' => c.cstr()?,
        b'D' | b'C' => {
            if !matches!(c.take(1)?, b"S" | b"P") {
                return Err("target type must be 'S' or 'P'");
            }
            c.cstr()?;
        }
        b'E' => {
            c.cstr()?;
            c.take(4)?;
        }
        _ => return Ok(()),
    }
    if c.0.is_empty() {
        Ok(())
    } else {
        Err("trailing bytes")
    }
}

/// Human name of a client message type (for errors and logs).
pub fn frontend_name(tag: u8) -> &'static str {
    match tag {
        b'Q' => "Query",
        b'P' => "Parse",
        b'B' => "Bind",
        b'D' => "Describe",
        b'E' => "Execute",
        b'C' => "Close",
        b'S' => "Sync",
        b'H' => "Flush",
        b'X' => "Terminate",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'f' => "CopyFail",
        b'p' => "PasswordMessage",
        _ => "unknown",
    }
}

/// Parses a server message with `postgres-protocol`.
pub fn parse_backend(frame: &Frame) -> io::Result<backend::Message> {
    let mut buf = BytesMut::from(&frame.bytes[..]);
    backend::Message::parse(&mut buf)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated server message"))
}

/// The tag of a `CommandComplete` frame (`b"COMMIT"`, `b"INSERT 0 1"`, …).
pub fn command_tag(frame: &Frame) -> &[u8] {
    let body = frame.body();
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    &body[..end]
}

/// The interesting fields of an `ErrorResponse` / `NoticeResponse`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `S`: ERROR, FATAL, …
    pub severity: String,
    /// `C`: the SQLSTATE.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
}

/// Reads severity, SQLSTATE and message of an `ErrorResponse` frame.
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

/// Encodes a `pgwire` message into `out`. Encoding the proxy's own
/// messages cannot fail except for oversize, which is logged.
pub fn encode<M: Message>(m: &M, out: &mut BytesMut) {
    if let Err(e) = m.encode(out) {
        tracing::error!(error = %e, "failed to encode a message");
    }
}

/// `ReadyForQuery` with the given status byte (`I`, `T` or `E`).
pub fn ready_for_query(status: u8, out: &mut BytesMut) {
    out.put_u8(b'Z');
    out.put_i32(5);
    out.put_u8(status);
}

/// `ParameterStatus`.
pub fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    encode(
        &pgwire::messages::startup::ParameterStatus::new(
            name.replace('\0', ""),
            value.replace('\0', ""),
        ),
        out,
    );
}

/// `CommandComplete`.
pub fn command_complete(tag: &str, out: &mut BytesMut) {
    encode(
        &pgwire::messages::response::CommandComplete::new(tag.to_string()),
        out,
    );
}

/// A one-column text `RowDescription`.
pub fn text_row_description(column: &str, out: &mut BytesMut) {
    use pgwire::messages::data::{FieldDescription, RowDescription};
    // 25 = text, variable size, text format.
    let field = FieldDescription::new(column.to_string(), 0, 0, 25, -1, -1, 0);
    encode(&RowDescription::new(vec![field]), out);
}

/// A one-column `DataRow` holding `value` as text.
pub fn text_data_row(value: &str, out: &mut BytesMut) {
    let mut data = BytesMut::with_capacity(4 + value.len());
    data.put_i32(value.len() as i32);
    data.put_slice(value.as_bytes());
    encode(&pgwire::messages::data::DataRow::new(data, 1), out);
}

/// A message with no body (`ParseComplete`, `BindComplete`, …).
pub fn empty_message(tag: u8) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    b.put_u8(tag);
    b.put_i32(4);
    b.freeze()
}

/// `ParameterDescription` with no parameters.
pub fn no_parameters() -> Bytes {
    let mut b = BytesMut::with_capacity(7);
    b.put_u8(b't');
    b.put_i32(6);
    b.put_i16(0);
    b.freeze()
}

/// Status byte of a `ReadyForQuery` frame.
pub fn rfq_status(frame: &Frame) -> u8 {
    frame.body().first().copied().unwrap_or(b'I')
}

/// Reads the text of the first column of a `DataRow` frame, and of its
/// second column, as used by the position probe (`bool`, `lsn text`).
pub fn data_row_texts(frame: &Frame) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut body = frame.body();
    if body.len() < 2 {
        return out;
    }
    let n = body.get_i16();
    for _ in 0..n.max(0) {
        if body.len() < 4 {
            break;
        }
        let len = body.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            break;
        }
        out.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body.advance(len);
    }
    out
}

/// Rebuilds a `Parse` (`skip = 0`) or `Bind` (`skip = 1`, after the portal
/// name) message with another statement name, copying every other byte of
/// the original unchanged (so SQL text and parameters in any client
/// encoding are preserved exactly). `None` if the frame is malformed.
pub fn rename_statement(frame: &Frame, skip: usize, new_name: &str) -> Option<Bytes> {
    let body = frame.body();
    let mut start = 0;
    for _ in 0..skip {
        start += body[start..].iter().position(|&b| b == 0)? + 1;
    }
    let name_end = start + body[start..].iter().position(|&b| b == 0)?;
    let rest = &body[name_end + 1..];
    let len = 4 + start + new_name.len() + 1 + rest.len();
    let mut out = BytesMut::with_capacity(len + 1);
    out.put_u8(frame.tag);
    out.put_i32(i32::try_from(len).ok()?);
    out.put_slice(&body[..start]);
    out.put_slice(new_name.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn malformed_bind_does_not_panic() {
        // Bind claiming 3 parameters of 1000 bytes in a 20-byte message.
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_i32(4 + 2 + 2 + 2 + 4);
        b.put_u8(0);
        b.put_u8(0);
        b.put_u16(0);
        b.put_u16(3);
        b.put_i32(1000);
        let mut buf = b.clone();
        let f = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert!(decode_frontend(&f).is_err());
    }

    #[test]
    fn statements_are_renamed() {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::parse("s1", "SELECT $1", [23], &mut b).unwrap();
        let f = split_frame(&mut b, MAX_MESSAGE_LEN).unwrap().unwrap();
        let renamed = rename_statement(&f, 0, "lr_abc").unwrap();
        let mut expected = BytesMut::new();
        postgres_protocol::message::frontend::parse("lr_abc", "SELECT $1", [23], &mut expected)
            .unwrap();
        assert_eq!(renamed, expected.freeze());
    }

    #[test]
    fn query_decodes() {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::query("SELECT 1", &mut b).unwrap();
        let f = split_frame(&mut b, MAX_MESSAGE_LEN).unwrap().unwrap();
        match decode_frontend(&f).unwrap() {
            PgWireFrontendMessage::Query(q) => assert_eq!(q.query, "SELECT 1"),
            other => panic!("{other:?}"),
        }
    }

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
