//! In-memory inode objects, the part of each that is read without the
//! core lock (the role of the kernel's `ext4_inode_info`, begun).
//!
//! Today an [`InodeInfo`] holds a regular file's size as the core last
//! set it, so that a read of data the page cache holds needs neither the
//! core lock nor the inode block (`Filesystem::read`). The core keeps it
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Entries kept before the table is emptied.
const MAX_ENTRIES: usize = 1 << 16;

/// The lock-free part of one regular file's state.
#[derive(Debug)]
pub(crate) struct InodeInfo {
    size: AtomicU64,
}

impl InodeInfo {
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
}

/// Inode objects by inode number.
#[derive(Debug, Default)]
pub(crate) struct InodeTable {
    map: RwLock<HashMap<u32, Arc<InodeInfo>>>,
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

    /// The core read or wrote regular file `ino` with this size.
    pub(crate) fn note_size(&self, ino: u32, size: u64) {
        if let Some(i) = self.get(ino) {
            i.size.store(size, Ordering::Release);
            return;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.entry(ino)
            .or_insert_with(|| {
                Arc::new(InodeInfo {
                    size: AtomicU64::new(size),
                })
            })
            .size
            .store(size, Ordering::Release);
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
        t.note_size(12, 8192);
        let i = t.get(12).expect("noted");
        t.shrink(12, 100);
        assert_eq!(i.size(), 100, "the object a reader holds sees the cut");
        t.shrink(12, 5000);
        assert_eq!(i.size(), 100, "shrink never grows");
        t.note_size(12, 5000);
        assert_eq!(i.size(), 5000);
        t.forget(12);
        assert!(t.get(12).is_none());
    }
}
