//! Encoding of the messages the proxy itself sends (`ReadyForQuery`,
//! `ParameterStatus`, `CommandComplete`, one-column text rows, …) and the
//! rewriting of statement names in client messages.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::Message;

use super::framing::Frame;
use super::messages::TxnStatus;

/// Encodes a `pgwire` message into `out`. Encoding the proxy's own
/// messages cannot fail except for oversize, which is logged.
pub fn encode<M: Message>(m: &M, out: &mut BytesMut) {
    if let Err(e) = m.encode(out) {
        tracing::error!(error = %e, "failed to encode a message");
    }
}

/// `ReadyForQuery` with the given transaction status.
pub fn ready_for_query(status: TxnStatus, out: &mut BytesMut) {
    out.put_u8(b'Z');
    out.put_i32(5);
    out.put_u8(status.byte());
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
    use crate::wire::{MAX_MESSAGE_LEN, split_frame};

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
}
