//! Decoding of messages: the startup-phase packets and client messages
//! (through `pgwire`'s codec, after a structural check of every length),
//! typed as [`ClientMessage`], and the few server messages the proxy reads
//! (through `postgres-protocol`).

use std::io;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::{GssEncRequest, SslRequest, Startup};
use pgwire::messages::{DecodeContext, Message, PgWireFrontendMessage, ProtocolVersion};
use postgres_protocol::message::backend;

use super::framing::{Frame, ProtocolError};

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

/// A decoded client message after startup, with its original bytes for
/// forwarding unchanged.
#[derive(Clone, Debug)]
pub enum ClientMessage {
    /// `Query`: a simple-protocol query string.
    Query {
        /// The SQL text.
        sql: Arc<str>,
        /// The original message.
        frame: Frame,
    },
    /// `Parse`: prepares a statement.
    Parse {
        /// Statement name (empty: the unnamed statement).
        name: String,
        /// The SQL text.
        sql: Arc<str>,
        /// Parameter type OIDs given by the client.
        types: Arc<[u32]>,
        /// The original message.
        frame: Frame,
    },
    /// `Bind`: creates a portal from a statement.
    Bind {
        /// Portal name (empty: the unnamed portal).
        portal: String,
        /// Statement name (empty: the unnamed statement).
        stmt: String,
        /// The original message.
        frame: Frame,
    },
    /// `Describe` of a statement (`S`) or portal (`P`).
    Describe {
        /// `b'S'` or `b'P'`.
        kind: u8,
        /// Statement or portal name.
        name: String,
        /// The original message.
        frame: Frame,
    },
    /// `Execute` of a portal.
    Execute {
        /// Portal name.
        portal: String,
        /// The original message.
        frame: Frame,
    },
    /// `Close` of a statement (`S`) or portal (`P`).
    Close {
        /// `b'S'` or `b'P'`.
        kind: u8,
        /// Statement or portal name.
        name: String,
        /// The original message.
        frame: Frame,
    },
    /// `Sync`: ends an extended-protocol batch.
    Sync {
        /// The original message.
        frame: Frame,
    },
    /// `Flush`: asks for the replies so far.
    Flush {
        /// The original message.
        frame: Frame,
    },
}

impl ClientMessage {
    /// Decodes one client message after startup (as split by
    /// [`super::split_frame`]); the frame is kept for forwarding.
    ///
    /// The fields the proxy needs are read in place once [`check_layout`]
    /// has checked the whole message (no copy, no decoder run); anything
    /// else goes through `pgwire`'s codec.
    pub fn decode(frame: Frame) -> Result<ClientMessage, ProtocolError> {
        let what = frontend_name(frame.tag);
        if matches!(frame.tag, b'Q' | b'P' | b'B' | b'D' | b'E' | b'C')
            || (matches!(frame.tag, b'S' | b'H') && frame.body().is_empty())
        {
            check_layout(frame.tag, frame.body()).map_err(|d| match d {
                INVALID_UTF8 => ProtocolError::InvalidUtf8(what),
                d => ProtocolError::malformed(what, d),
            })?;
            return Ok(Self::from_checked(frame));
        }
        Self::decode_with_codec(frame)
    }

    /// The fields of a message [`check_layout`] accepted.
    fn from_checked(frame: Frame) -> ClientMessage {
        let body = frame.body();
        // Checked above: every string is NUL-terminated UTF-8.
        let cstr = |at: usize| -> (&str, usize) {
            let len = body[at..].iter().position(|&b| b == 0).unwrap_or(0);
            let s = std::str::from_utf8(&body[at..at + len]).unwrap_or_default();
            (s, at + len + 1)
        };
        match frame.tag {
            b'Q' => {
                let sql: Arc<str> = cstr(0).0.into();
                ClientMessage::Query { sql, frame }
            }
            b'P' => {
                let (name, at) = cstr(0);
                let (sql, at) = cstr(at);
                let n = i16::from_be_bytes([body[at], body[at + 1]]).max(0) as usize;
                let types: Arc<[u32]> = (0..n)
                    .map(|k| {
                        let o = at + 2 + 4 * k;
                        u32::from_be_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]])
                    })
                    .collect();
                let (name, sql) = (name.to_string(), Arc::from(sql));
                ClientMessage::Parse {
                    name,
                    sql,
                    types,
                    frame,
                }
            }
            b'B' => {
                let (portal, at) = cstr(0);
                let (stmt, _) = cstr(at);
                let (portal, stmt) = (portal.to_string(), stmt.to_string());
                ClientMessage::Bind {
                    portal,
                    stmt,
                    frame,
                }
            }
            b'D' | b'C' => {
                let kind = body[0];
                let name = cstr(1).0.to_string();
                if frame.tag == b'D' {
                    ClientMessage::Describe { kind, name, frame }
                } else {
                    ClientMessage::Close { kind, name, frame }
                }
            }
            b'E' => {
                let portal = cstr(0).0.to_string();
                ClientMessage::Execute { portal, frame }
            }
            b'S' => ClientMessage::Sync { frame },
            _ => ClientMessage::Flush { frame },
        }
    }

    /// Decodes through `pgwire`'s codec (messages with unusual bodies).
    fn decode_with_codec(frame: Frame) -> Result<ClientMessage, ProtocolError> {
        let msg = decode_frontend(&frame)?;
        Ok(match msg {
            PgWireFrontendMessage::Query(q) => ClientMessage::Query {
                sql: q.query.into(),
                frame,
            },
            PgWireFrontendMessage::Parse(p) => ClientMessage::Parse {
                name: p.name.unwrap_or_default(),
                sql: p.query.into(),
                types: p.type_oids.into(),
                frame,
            },
            PgWireFrontendMessage::Bind(b) => ClientMessage::Bind {
                portal: b.portal_name.unwrap_or_default(),
                stmt: b.statement_name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Describe(d) => ClientMessage::Describe {
                kind: d.target_type,
                name: d.name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Execute(e) => ClientMessage::Execute {
                portal: e.name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Close(c) => ClientMessage::Close {
                kind: c.target_type,
                name: c.name.unwrap_or_default(),
                frame,
            },
            PgWireFrontendMessage::Sync(_) => ClientMessage::Sync { frame },
            PgWireFrontendMessage::Flush(_) => ClientMessage::Flush { frame },
            _ => return Err(ProtocolError::UnknownType(frame.tag)),
        })
    }

    /// As [`ClientMessage::decode`], for a session whose client encoding is
    /// not UTF-8: in a `Query` or `Parse`, bytes from 0x80 up (characters
    /// outside ASCII, in whatever encoding) are read as `_`, so that the
    /// SQL can be classified (keywords, quotes and comments are ASCII in
    /// every client encoding PostgreSQL offers). The frame is kept
    /// unchanged for forwarding; the SQL text is then a stand-in whose
    /// bytes differ from the frame's.
    pub fn decode_any_encoding(frame: Frame) -> Result<ClientMessage, ProtocolError> {
        if !matches!(frame.tag, b'Q' | b'P') || frame.body().is_ascii() {
            return ClientMessage::decode(frame);
        }
        let mut copy = frame.bytes.to_vec();
        for b in &mut copy[5..] {
            if *b >= 0x80 {
                *b = b'_';
            }
        }
        let stand_in = Frame {
            tag: frame.tag,
            bytes: Bytes::from(copy),
        };
        Ok(match ClientMessage::decode(stand_in)? {
            ClientMessage::Query { sql, .. } => ClientMessage::Query { sql, frame },
            ClientMessage::Parse {
                name, sql, types, ..
            } => ClientMessage::Parse {
                name,
                sql,
                types,
                frame,
            },
            other => other,
        })
    }

    /// Whether the message ends a unit of work (`Query` or `Sync`).
    pub fn ends_unit(&self) -> bool {
        matches!(
            self,
            ClientMessage::Query { .. } | ClientMessage::Sync { .. }
        )
    }
}

/// A session's transaction status, as `ReadyForQuery` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (statements are refused until
    /// its end).
    Failed,
}

impl TxnStatus {
    /// The status byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            TxnStatus::Idle => b'I',
            TxnStatus::InTransaction => b'T',
            TxnStatus::Failed => b'E',
        }
    }

    /// The status of a `ReadyForQuery` frame (see [`rfq_status`]).
    pub fn of_ready_for_query(frame: &Frame) -> TxnStatus {
        TxnStatus::from(rfq_status(frame))
    }
}

impl From<u8> for TxnStatus {
    /// `I` and `T` map to themselves; `E` and any other byte (PostgreSQL
    /// sends none) to [`TxnStatus::Failed`].
    fn from(b: u8) -> Self {
        match b {
            b'I' => TxnStatus::Idle,
            b'T' => TxnStatus::InTransaction,
            _ => TxnStatus::Failed,
        }
    }
}

impl From<TxnStatus> for u8 {
    fn from(s: TxnStatus) -> u8 {
        s.byte()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{MAX_MESSAGE_LEN, split_frame};
    use bytes::BufMut;

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
    fn in_place_decoding_agrees_with_the_codec() {
        use postgres_protocol::message::frontend as fe;
        let mut b = BytesMut::new();
        fe::query("SELECT 'é' /* x */", &mut b).unwrap();
        fe::parse("s1", "SELECT $1::int, $2", [23u32, 25], &mut b).unwrap();
        fe::parse("", "SELECT 1", std::iter::empty(), &mut b).unwrap();
        fe::bind(
            "p1",
            "s1",
            [1i16],
            [Some(&b"\0\0\0\x07"[..]), None],
            |v: Option<&[u8]>, buf: &mut BytesMut| match v {
                Some(v) => {
                    buf.extend_from_slice(v);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            [0i16],
            &mut b,
        )
        .map_err(|_| "bind")
        .unwrap();
        fe::describe(b'S', "s1", &mut b).unwrap();
        fe::describe(b'P', "", &mut b).unwrap();
        fe::execute("p1", 10, &mut b).unwrap();
        fe::close(b'S', "s1", &mut b).unwrap();
        fe::sync(&mut b);
        fe::flush(&mut b);
        let mut n = 0;
        while let Some(f) = split_frame(&mut b, MAX_MESSAGE_LEN).unwrap() {
            let fast = format!("{:?}", ClientMessage::decode(f.clone()).unwrap());
            let codec = format!("{:?}", ClientMessage::decode_with_codec(f).unwrap());
            assert_eq!(fast, codec);
            n += 1;
        }
        assert_eq!(n, 10);
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
}
