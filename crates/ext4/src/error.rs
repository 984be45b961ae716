//! The ext4 layer's error type and its single errno mapping.

use std::fmt;
use std::io;

/// Everything that can go wrong in the ext4 layer.
///
/// Corruption, checksum failures, I/O failures and user errors stay distinct;
/// [`Error::errno`] is the one place that turns them into errno values.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The device failed.
    Io(io::Error),
    /// An on-disk structure is inconsistent. `block` is where it was read
    /// from (0 when not tied to a block).
    Corrupted { what: String, block: u64 },
    /// A checksum did not match.
    BadChecksum { what: String, block: u64 },
    /// The image uses an incompatible feature folio does not implement.
    UnsupportedFeature(String),
    /// The filesystem is read-only; the string says why.
    ReadOnly(String),
    /// No such file or directory.
    NotFound,
    /// The name exists already.
    Exists,
    /// A path component is not a directory.
    NotDir,
    /// The operation needs a non-directory.
    IsDir,
    /// A directory to remove or replace is not empty.
    NotEmpty,
    /// No free blocks or inodes.
    NoSpace,
    /// A name is longer than 255 bytes.
    NameTooLong,
    /// A size or offset beyond the largest file the format allows.
    FileTooBig,
    /// Too many hard links.
    TooManyLinks,
    /// No such extended attribute.
    NoAttr,
    /// An attribute value or list does not fit the caller's buffer or the
    /// inode/block.
    Range,
    /// No data (or hole) at or after the offset: lseek's ENXIO.
    NoSuchOffset,
    /// An argument is invalid; the string says which.
    Invalid(String),
    /// The file's block map is pinned (EBUSY).
    Busy,
    /// The file's block map is pinned and may not be truncated (ETXTBSY,
    /// as for an active swap file).
    TextBusy,
    /// Not implemented yet; the string says what.
    Unsupported(String),
    /// The image is locked by another user (a mount, another command);
    /// the string names the holder.
    Locked(String),
    /// A file handle names an inode that no longer exists (or never did,
    /// or was reused: the generation differs), as NFS's ESTALE.
    Stale,
    /// The file's flags forbid the change (immutable, append-only): EPERM.
    NotPermitted(String),
    /// The inode is encrypted and its key is not available (ENOKEY, as
    /// the kernel answers without the key); the string says what needed it.
    NoKey(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn corrupted(what: impl Into<String>, block: u64) -> Self {
        Error::Corrupted {
            what: what.into(),
            block,
        }
    }

    /// The errno the Linux kernel's ext4 returns for this condition.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupted { .. } => libc::EUCLEAN,
            Error::BadChecksum { .. } => libc::EBADMSG,
            Error::UnsupportedFeature(_) => libc::EOPNOTSUPP,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NotFound => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotDir => libc::ENOTDIR,
            Error::IsDir => libc::EISDIR,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::NoSpace => libc::ENOSPC,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::FileTooBig => libc::EFBIG,
            Error::TooManyLinks => libc::EMLINK,
            Error::NoAttr => libc::ENODATA,
            Error::Range => libc::ERANGE,
            Error::NoSuchOffset => libc::ENXIO,
            Error::Invalid(_) => libc::EINVAL,
            Error::Busy => libc::EBUSY,
            Error::TextBusy => libc::ETXTBSY,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::Locked(_) => libc::EBUSY,
            Error::Stale => libc::ESTALE,
            Error::NotPermitted(_) => libc::EPERM,
            Error::NoKey(_) => libc::ENOKEY,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Corrupted { what, block } => {
                write!(f, "filesystem corrupted: {what} (block {block})")
            }
            Error::BadChecksum { what, block } => {
                write!(f, "checksum mismatch: {what} (block {block})")
            }
            Error::UnsupportedFeature(s) => write!(f, "unsupported ext4 feature: {s}"),
            Error::ReadOnly(why) => write!(f, "read-only filesystem: {why}"),
            Error::NotFound => write!(f, "no such file or directory"),
            Error::Exists => write!(f, "file exists"),
            Error::NotDir => write!(f, "not a directory"),
            Error::IsDir => write!(f, "is a directory"),
            Error::NotEmpty => write!(f, "directory not empty"),
            Error::NoSpace => write!(f, "no space left on device"),
            Error::NameTooLong => write!(f, "file name too long"),
            Error::FileTooBig => write!(f, "file too large"),
            Error::TooManyLinks => write!(f, "too many links"),
            Error::NoAttr => write!(f, "no such attribute"),
            Error::Range => write!(f, "value out of range"),
            Error::NoSuchOffset => write!(f, "no such device or address (offset past the data)"),
            Error::Invalid(s) => write!(f, "invalid argument: {s}"),
            Error::Busy => write!(
                f,
                "the file's block map is pinned (device or resource busy)"
            ),
            Error::TextBusy => write!(f, "the file's block map is pinned (text file busy)"),
            Error::Unsupported(s) => write!(f, "not supported: {s}"),
            Error::Locked(holder) => write!(f, "the image is in use by {holder}"),
            Error::Stale => write!(f, "stale file handle"),
            Error::NotPermitted(why) => write!(f, "operation not permitted: {why}"),
            Error::NoKey(why) => write!(f, "required key not available: {why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}
