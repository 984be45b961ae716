//! ext2/3/4 for folio: the on-disk format ([`format`]) and a filesystem
//! that reads and writes it ([`Filesystem`]).
//!
//! Module map (bottom up): `format` parses raw structures with no I/O;
//! `fs` opens and validates an image and does inode I/O; `alloc` owns the
//! bitmaps; `bmap` maps logical to physical blocks (extents, indirect), with
//! `extent_tree` editing extent trees in place;
//! `dir` and `xattrs` implement directories and attributes; `file` moves
//! data; `ops` is the POSIX-shaped API; `mkfs` makes new images.

pub mod alloc;
pub mod api;
pub mod bmap;
pub(crate) mod commit;
pub mod csum;
pub mod data;
pub mod dir;
pub mod ea_inode;
pub mod error;
pub(crate) mod extent_tree;
pub mod falloc;
mod fast_commit;
pub mod file;
pub mod format;
pub mod fs;
pub mod fscrypt;
pub(crate) mod inline;
pub(crate) mod inodes;
pub mod journaling;
pub(crate) mod lockless;
pub mod mkfs;
pub(crate) mod mmp;
pub mod ops;
pub mod progress;
pub mod verity;
pub mod xattrs;

pub use api::Filesystem;
pub use data::AllocOp;
pub use dir::DirEntry;
pub use error::{Error, Result};
pub use folio_journal::{JournalStats, RecoveryReport};
pub use folio_pagecache::lockdep;
pub use folio_pagecache::Config as CacheConfig;
pub use format::inode::{FileType, ROOT_INO};
pub use format::Timespec;
pub use fs::OpenOptions;
pub use ops::{Caller, OpenFlags, Owner, RenameFlags, SetAttr, Stat, StatFs};
pub use progress::Progress;
pub use xattrs::XattrMode;
