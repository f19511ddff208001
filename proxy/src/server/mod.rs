//! The proxy as a whole: listeners, shared state (configuration, lag
//! monitor, router, pools, cancel keys), graceful shutdown and reload.
//!
//! ```no_run
//! # async fn demo(config: lagrouter_proxy::config::Config) -> Result<(), lagrouter_proxy::server::ProxyError> {
//! let proxy = lagrouter_proxy::server::Proxy::start(config).await?;
//! println!("listening on {}", proxy.local_addr());
//! proxy.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Files, lowest first: [`error`], [`settings`] (the reloadable
//! configuration snapshot), [`clients`] (the client registry and the pause
//! gate of the admin console), [`history`] (lag samples for the status
//! page), [`catalog`] (schema knowledge), [`shared`] (state every session uses; it imports neither the
//! client side nor the session), [`status_page`] (the HTML page at `/`),
//! [`admin`] (the HTTP endpoint), [`workers`] (the per-core threads that
//! run sessions), [`handle`], [`reload`], [`shutdown`], and [`listen`],
//! which starts everything and hands each accepted connection to a worker,
//! where it runs [`crate::frontend`] and then [`crate::session`] or
//! [`crate::console`].
#![warn(missing_docs)]

pub mod admin;
pub mod catalog;
pub mod clients;
pub mod error;
pub mod handle;
pub mod history;
pub mod listen;
pub mod reload;
pub mod settings;
pub mod shared;
pub mod shutdown;
pub mod status_page;
pub mod workers;

pub use clients::{ClientRegistry, ClientStatus, PauseGate, Paused, Registration};
pub use error::ProxyError;
pub use handle::ProxyHandle;
pub use listen::Proxy;
pub use settings::{Settings, UserEntry};
pub use shared::{CancelSlot, ClientGuard, Shared};
