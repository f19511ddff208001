//! The PostgreSQL wire protocol as the proxy speaks it: framing with length
//! limits ([`framing`]), typed decoding of client messages and the server
//! messages the proxy reads ([`messages`]), errors with their SQLSTATEs
//! ([`errors`]) and encoding of the proxy's own messages ([`encode`]).
//!
//! Framing only splits the byte stream at message boundaries (type byte and
//! length) and enforces the limits; each frame is then decoded in isolation,
//! so a malformed length inside a message can never make a decoder read into
//! the next message.
//!
//! Files, lowest first: `framing`, `messages`, `encode`, `errors`. This
//! module depends on nothing else in the crate. It is also reachable
//! as `lagrouter_proxy::protocol` (its former name).
#![warn(missing_docs)]

pub mod encode;
pub mod errors;
pub mod framing;
pub mod messages;

pub use encode::{
    command_complete, empty_message, encode, no_parameters, parameter_status, ready_for_query,
    rename_statement, text_data_row, text_row_description,
};
pub use errors::{ErrorFields, PgError, SQLSTATE_PROTOCOL_VIOLATION, error_fields};
pub use framing::{
    Frame, MAX_BACKEND_MESSAGE_LEN, MAX_MESSAGE_LEN, MAX_STARTUP_LEN, ProtocolError, split_frame,
    split_startup,
};
pub use messages::{
    ClientMessage, StartupPacket, TxnStatus, command_tag, data_row_texts, decode_frontend,
    decode_startup, frontend_name, parse_backend, rfq_status,
};
