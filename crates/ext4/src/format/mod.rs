//! Pure parsing and serialising of ext2/3/4 on-disk structures: no I/O.
//!
//! Fixed-size structures (superblock, group descriptor, inode) keep their raw
//! bytes and expose typed accessors, so fields folio does not interpret
//! survive a read-modify-write unchanged. Variable structures read from disk
//! (directory blocks, extent nodes, xattr areas) are parsed with checked
//! slicing: bytes from a disk never cause a panic.

pub mod dirent;
pub mod extent;
pub mod group;
pub mod hash;
pub mod inode;
pub mod reseal;
pub mod superblock;
pub mod xattr;

/// Little-endian u16 at `off`; `None` when out of range.
pub fn get16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

/// Little-endian u32 at `off`; `None` when out of range.
pub fn get32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Store a little-endian u16 at `off`. Panics if out of range: callers
/// write only into buffers whose size they chose.
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// Store a little-endian u32 at `off` (see [`put16`]).
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Little-endian u16 at a constant offset of a buffer of known size.
pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Little-endian u32 at a constant offset of a buffer of known size.
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A timestamp: seconds since the epoch and nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    /// The time for a timestamp: the kernel's coarse realtime clock
    /// (CLOCK_REALTIME_COARSE, one clock tick of resolution), which is
    /// what the kernel's `current_time()` stamps inodes with — through a
    /// FUSE mount the kernel sets some times itself (a link's ctime, with
    /// the writeback cache mtime and ctime), and times from a finer clock
    /// could then run ahead of later changes. Falls back to the system
    /// clock where the coarse one is missing.
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a valid
        // pointer to a local; it has no other effect.
        #[allow(unsafe_code)]
        let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        if r == 0 && (0..1_000_000_000).contains(&ts.tv_nsec) {
            return Timespec {
                sec: ts.tv_sec,
                nsec: ts.tv_nsec as u32,
            };
        }
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}
