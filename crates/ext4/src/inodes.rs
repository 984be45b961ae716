//! In-memory inode objects, the part of each that is read without the
//! core lock (the role of the kernel's `ext4_inode_info`, begun).
//!
//! Today an [`InodeInfo`] holds a regular file's size and the
//! millisecond of its mtime as the core last set them, so that a read of
//! data the page cache holds, and an overwrite of data that is already
//! dirty in it, need neither the core lock nor the inode block
//! (`Filesystem::read`, `Filesystem::write_with`). The core keeps them
//! exact:
//! - every inode write (`Core::write_inode`) and every read through the
//!   core stores the size;
//! - a truncation lowers it *before* the cache is cut (as Linux's
//!   `truncate_setsize` sets i_size before `truncate_pagecache`), so a
//!   reader that finds a folio still cached beyond the new size has
//!   already read the old size: its read is one that ran before the
//!   truncation;
//! - a freed inode's entry goes.
//!
//! The table is a cache: an inode without an entry is read through the
//! core, which adds one. It is bounded (`MAX_ENTRIES`): past that it is
//! emptied and refills with the inodes in use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Entries kept before the table is emptied.
const MAX_ENTRIES: usize = 1 << 16;

/// The lock-free part of one regular file's state.
#[derive(Debug)]
pub(crate) struct InodeInfo {
    size: AtomicU64,
    /// The file's mtime in milliseconds since the epoch (a lock-free
    /// overwrite within the same millisecond leaves the inode alone, as
    /// the kernel's `file_update_time` does within one clock tick).
    mtime_ms: AtomicU64,
    /// The core found nothing a write must drop (no setuid/setgid bit, no
    /// security.capability) and nothing has changed mode bits or
    /// attributes since: a write through the mount needs no core lock to
    /// learn that.
    plain: AtomicBool,
}

impl InodeInfo {
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub(crate) fn mtime_ms(&self) -> u64 {
        self.mtime_ms.load(Ordering::Acquire)
    }
    pub(crate) fn plain(&self) -> bool {
        self.plain.load(Ordering::Acquire)
    }
}

/// Inode objects by inode number, and the counters lock-free writers keep.
#[derive(Debug)]
pub(crate) struct InodeTable {
    map: RwLock<HashMap<u32, Arc<InodeInfo>>>,
    /// Cleared when the filesystem stops taking writes (a panic under the
    /// core lock): lock-free writers check it.
    writable: AtomicBool,
    /// Bytes written by lock-free writers since the core last took them
    /// (for the superblock's lifetime-writes counter).
    written: AtomicU64,
}

impl Default for InodeTable {
    fn default() -> Self {
        InodeTable {
            map: RwLock::default(),
            writable: AtomicBool::new(true),
            written: AtomicU64::new(0),
        }
    }
}

/// Milliseconds since the epoch of a timestamp (0 before it).
pub(crate) fn millis(t: crate::format::Timespec) -> u64 {
    u64::try_from(t.sec).map_or(0, |s| s * 1000 + u64::from(t.nsec) / 1_000_000)
}

impl InodeTable {
    /// The object of `ino`, if the core has seen it.
    pub(crate) fn get(&self, ino: u32) -> Option<Arc<InodeInfo>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned()
    }

    /// The core read or wrote regular file `ino` with this size and mtime
    /// (milliseconds).
    pub(crate) fn note(&self, ino: u32, size: u64, mtime_ms: u64) {
        let set = |i: &InodeInfo| {
            i.size.store(size, Ordering::Release);
            i.mtime_ms.store(mtime_ms, Ordering::Release);
        };
        if let Some(i) = self.get(ino) {
            set(&i);
            return;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        set(map.entry(ino).or_insert_with(|| {
            Arc::new(InodeInfo {
                size: AtomicU64::new(size),
                mtime_ms: AtomicU64::new(mtime_ms),
                plain: AtomicBool::new(false),
            })
        }));
    }

    /// Whether a write to `ino` has privileges to drop (see
    /// `InodeInfo::plain`).
    pub(crate) fn set_plain(&self, ino: u32, plain: bool) {
        if let Some(i) = self.get(ino) {
            i.plain.store(plain, Ordering::Release);
        }
    }

    pub(crate) fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    pub(crate) fn stop_writes(&self) {
        self.writable.store(false, Ordering::Release);
    }

    /// A lock-free writer wrote `n` bytes.
    pub(crate) fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }

    /// The bytes lock-free writers wrote since the last call.
    pub(crate) fn take_written(&self) -> u64 {
        self.written.swap(0, Ordering::Relaxed)
    }

    /// `ino` is being cut to `size` bytes: lower its size first.
    pub(crate) fn shrink(&self, ino: u32, size: u64) {
        if let Some(i) = self.get(ino) {
            i.size.fetch_min(size, Ordering::AcqRel);
        }
    }

    /// `ino` is gone (freed, or its cache dropped entirely).
    pub(crate) fn forget(&self, ino: u32) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_noted_lowered_and_forgotten() {
        let t = InodeTable::default();
        assert!(t.get(12).is_none());
        t.note(12, 8192, 7);
        let i = t.get(12).expect("noted");
        t.shrink(12, 100);
        assert_eq!(i.size(), 100, "the object a reader holds sees the cut");
        t.shrink(12, 5000);
        assert_eq!(i.size(), 100, "shrink never grows");
        t.note(12, 5000, 9);
        assert_eq!((i.size(), i.mtime_ms()), (5000, 9));
        t.forget(12);
        assert!(t.get(12).is_none());
    }
}
