//! The client side: the connection from an application to the proxy
//! ([`conn`]), its startup phase — negotiation, startup packet, cancel
//! requests and authentication — ([`startup`]), the server side of SCRAM
//! and md5 ([`auth`]) and the TLS configuration ([`tls`]).
//!
//! `auth` and `tls` depend on nothing else in the crate; `startup` uses the
//! shared state ([`crate::server::shared`]) but never the session.
#![warn(missing_docs)]

pub mod auth;
pub mod conn;
pub mod startup;
pub mod tls;

pub use conn::{ClientConn, ClientError, ClientStream};
pub use startup::{CONSOLE_DATABASES, ConsoleRole, StartupInfo, accept, backend_key_data};
