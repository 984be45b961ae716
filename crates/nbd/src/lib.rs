//! NBD for folio: serve a file inside an image as a network block device
//! ([`Server`] with an [`Export`]; `folio export`), and use a block device
//! on an NBD server as the device under a filesystem ([`NbdDevice`]).
//!
//! The server speaks the fixed newstyle handshake with the options real
//! clients use (EXPORT_NAME, GO, INFO, LIST, ABORT, STRUCTURED_REPLY and
//! the `base:allocation` metadata context) and the commands READ, WRITE
//! (with FUA), FLUSH, TRIM, WRITE_ZEROES (with NO_HOLE and FAST_ZERO),
//! BLOCK_STATUS and CACHE. The client needs only simple replies.

mod client;
mod listen;
pub mod proto;
mod server;
mod transform;

pub use client::{NbdDevice, NbdUri};
pub use listen::{serve_until, Listen, Listener};
pub use server::{
    Bounce, BouncePool, Export, ExportConfig, Server, SocketLike, HEADROOM, MAX_OPTION, MAX_PAYLOAD,
};
pub use transform::{Transform, XTS_SECTOR};

/// The port NBD servers listen on by default.
pub const DEFAULT_PORT: u16 = 10809;
