//! ext2/3/4 for folio: the on-disk format ([`format`]) and a filesystem
//! that reads and writes it ([`Filesystem`]).

pub mod csum;
pub mod error;
pub mod format;

pub use error::{Error, Result};
