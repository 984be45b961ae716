//! In-memory inode objects: the role of the kernel's `ext4_inode_info`.
//!
//! An [`InodeInfo`] is the filesystem's in-memory state of one inode,
//! shared by the threads that work on it:
//! - lock-free fields: a regular file's size and the millisecond of its
//!   mtime as the core last set them (so that a read of data the page
//!   cache holds, and an overwrite of data already dirty in it, need
//!   neither the core lock nor the inode block), the "nothing to drop on
//!   write" flag, and the open references;
//! - its block-map state behind the inode's *data lock* (the role of
//!   `i_data_sem`, [`InodeInfo::data`]): the extent map (the extent status
//!   tree's role), the delayed-allocation runs and their reservations,
//!   and whether the map is pinned.
//!
//! The core keeps the lock-free fields exact:
//! - every inode write (`Core::write_inode`) and every read through the
//!   core stores the size;
//! - a truncation lowers it *before* the cache is cut (as Linux's
//!   `truncate_setsize` sets i_size before `truncate_pagecache`), so a
//!   reader that finds a folio still cached beyond the new size has
//!   already read the old size: its read is one that ran before the
//!   truncation;
//! - a freed inode's object forgets its state (`reset`).
//!
//! The table is a cache of what can be rebuilt: an object that holds no
//! state of its own (no open reference, no delayed allocation, no pin, no
//! other holder) can go, and is made again, from the inode and its tree,
//! when next needed. Past [`MAX_ENTRIES`] objects the idle ones go; past
//! [`MAX_MAPS`] loaded extent maps the idle ones' maps go, small ones
//! (which cost one inode read to rebuild) first.
//!
//! Free-space accounting that threads share ([`Space`]) lives here too:
//! the free blocks, the blocks freed by the running transaction, and the
//! blocks reserved by delayed allocations, under one small lock, so that
//! a reservation and an allocation can never both take the last block.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use folio_pagecache::lockdep::{Held, Level};

use crate::data::Delalloc;
use crate::extent_tree::ExtentMap;
use crate::format::inode::Inode;
use crate::format::Timespec;

/// Objects kept before idle ones are dropped.
const MAX_ENTRIES: usize = 1 << 16;
/// Loaded extent maps kept before idle ones are dropped.
pub(crate) const MAX_MAPS: usize = 4096;
/// Extents in an inode's root (a map this small costs nothing to reload).
const ROOT_EXTENTS: usize = 4;

/// One inode's in-memory state.
#[derive(Debug)]
pub(crate) struct InodeInfo {
    ino: u32,
    size: AtomicU64,
    /// The file's mtime in milliseconds since the epoch (a lock-free
    /// overwrite within the same millisecond leaves the inode alone, as
    /// the kernel's `file_update_time` does within one clock tick).
    mtime_ms: AtomicU64,
    /// `size` and `mtime_ms` are a live regular file's, as the core last
    /// saw them (lock-free paths serve only such inodes).
    regular: AtomicBool,
    /// The core found nothing a write must drop (no setuid/setgid bit, no
    /// security.capability) and nothing has changed mode bits or
    /// attributes since: a write through the mount needs no core lock to
    /// learn that.
    plain: AtomicBool,
    /// Open references (`open_ref`): an unlinked inode lives until the
    /// last one goes. Dropped only under the inode lock.
    open_refs: AtomicU32,
    /// The file is immutable (chattr +i): no lock-free write.
    immutable: AtomicBool,
    /// The largest size the file's map allows (noted with the size).
    max_size: AtomicU64,
    /// The shape of the file's map (noted with the size), for worst-case
    /// mapping reservations: see [`Shape`].
    shape: AtomicU64,
    /// The inode lock (the role of `i_rwsem`): held exclusively by
    /// anything that changes the file's size, times, mode or block map
    /// from above (writes, truncation, fallocate, direct writes, attribute
    /// changes, the last close). Writeback does not take it.
    rwsem: RwLock<()>,
    /// The thread holding `rwsem` exclusively (a token from
    /// [`thread_token`]), 0 when none.
    owner: AtomicU64,
    /// Size and times set by lock-free writers and not yet in the inode
    /// block (a leaf lock: nothing is taken inside it).
    ahead: Mutex<Ahead>,
    data: Mutex<InodeData>,
}

/// What lock-free writers changed in an inode that its on-disk copy does
/// not show yet (the inode is "dirty" in the kernel's sense). The core
/// folds it into every read of the inode, and into every write of the
/// inode made without the inode lock (writeback), so nothing is lost
/// whichever comes first; sync and fsync write it out.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ahead {
    pub(crate) dirty: bool,
    pub(crate) size: u64,
    /// The new mtime and ctime.
    pub(crate) time: Timespec,
}

/// The shape of an inode's block map, for worst-case reservations.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) extents: bool,
    pub(crate) depth: u16,
    /// Entries in the root.
    pub(crate) entries: u16,
}

impl Shape {
    fn pack(self) -> u64 {
        (u64::from(self.extents) << 32) | (u64::from(self.depth) << 16) | u64::from(self.entries)
    }
    fn unpack(v: u64) -> Self {
        Shape {
            extents: v >> 32 != 0,
            depth: (v >> 16) as u16,
            entries: v as u16,
        }
    }
}

/// What the core notes of a live regular file when it reads or writes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileNote {
    /// chattr +i: lock-free writers leave the file to the core, which
    /// refuses.
    pub(crate) immutable: bool,
    pub(crate) size: u64,
    pub(crate) mtime_ms: u64,
    pub(crate) max_size: u64,
    pub(crate) shape: Shape,
}

/// A small number naming the calling thread (never 0).
pub(crate) fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.with(|t| *t)
}

/// An inode lock held exclusively.
pub(crate) struct InodeLock<'a> {
    info: &'a InodeInfo,
    _g: RwLockWriteGuard<'a, ()>,
    _order: Held,
}

/// An inode lock held shared (lock-free readers).
pub(crate) struct InodeReadLock<'a> {
    _g: RwLockReadGuard<'a, ()>,
    _order: Held,
}

impl Drop for InodeLock<'_> {
    fn drop(&mut self) {
        self.info.owner.store(0, Ordering::Release);
    }
}

/// Block-map state of one inode, under its data lock.
#[derive(Debug, Default)]
pub(crate) struct InodeData {
    /// The extent map, once loaded (extent-mapped inodes).
    pub(crate) extents: Option<ExtentMap>,
    /// Delayed-allocation runs and their reservations.
    pub(crate) delalloc: Delalloc,
    /// The block map is pinned (`pin_mapping`).
    pub(crate) pinned: bool,
}

impl InodeData {
    /// Nothing here that could not be rebuilt from disk.
    fn idle(&self) -> bool {
        self.delalloc.blocks == 0 && self.delalloc.meta == 0 && !self.pinned
    }
}

/// An inode's data lock, held (level `InodeData` in the lock order).
pub(crate) struct DataGuard<'a> {
    g: MutexGuard<'a, InodeData>,
    _order: Held,
}

impl std::ops::Deref for DataGuard<'_> {
    type Target = InodeData;
    fn deref(&self) -> &InodeData {
        &self.g
    }
}

impl std::ops::DerefMut for DataGuard<'_> {
    fn deref_mut(&mut self) -> &mut InodeData {
        &mut self.g
    }
}

impl InodeInfo {
    fn new(ino: u32) -> Self {
        InodeInfo {
            ino,
            size: AtomicU64::new(0),
            mtime_ms: AtomicU64::new(0),
            regular: AtomicBool::new(false),
            plain: AtomicBool::new(false),
            open_refs: AtomicU32::new(0),
            immutable: AtomicBool::new(false),
            max_size: AtomicU64::new(0),
            shape: AtomicU64::new(0),
            rwsem: RwLock::new(()),
            owner: AtomicU64::new(0),
            ahead: Mutex::new(Ahead::default()),
            data: Mutex::new(InodeData::default()),
        }
    }

    /// Take the inode lock exclusively (level `Inode`, keyed by number).
    pub(crate) fn lock(&self) -> InodeLock<'_> {
        let order = Held::take(Level::Inode, u64::from(self.ino));
        let g = self.rwsem.write().unwrap_or_else(|e| e.into_inner());
        self.owner.store(thread_token(), Ordering::Release);
        InodeLock {
            info: self,
            _g: g,
            _order: order,
        }
    }

    /// Take the inode lock shared: excludes writers and every change of
    /// the file's size or block map from above, not other readers.
    pub(crate) fn lock_shared(&self) -> InodeReadLock<'_> {
        let order = Held::take(Level::Inode, u64::from(self.ino));
        InodeReadLock {
            _g: self.rwsem.read().unwrap_or_else(|e| e.into_inner()),
            _order: order,
        }
    }

    /// Whether the calling thread holds the inode lock.
    pub(crate) fn locked_by_me(&self) -> bool {
        self.owner.load(Ordering::Acquire) == thread_token()
    }

    pub(crate) fn max_size(&self) -> u64 {
        self.max_size.load(Ordering::Acquire)
    }

    pub(crate) fn shape(&self) -> Shape {
        Shape::unpack(self.shape.load(Ordering::Acquire))
    }

    pub(crate) fn ahead(&self) -> MutexGuard<'_, Ahead> {
        self.ahead.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fold what lock-free writers changed into `inode` as read from its
    /// block.
    pub(crate) fn overlay(&self, inode: &mut Inode) {
        let a = self.ahead();
        if a.dirty {
            inode.set_size(a.size);
            inode.set_mtime(a.time);
            inode.set_ctime(a.time.max(inode.ctime()));
        }
    }

    /// A lock-free writer wrote up to byte `end` at time `now`: raise the
    /// size and set the times in memory (the inode block follows at the
    /// next sync, fsync or write of the inode). Call holding the inode
    /// lock, after the data is in the cache.
    pub(crate) fn advance(&self, end: u64, now: Timespec) {
        let mut a = self.ahead();
        let size = self.size().max(end);
        let now_ms = millis(now);
        if size == self.size() && now_ms == self.mtime_ms() {
            return;
        }
        *a = Ahead {
            dirty: true,
            size,
            time: now,
        };
        self.mtime_ms.store(now_ms, Ordering::Release);
        self.size.store(size, Ordering::Release);
    }

    /// Forget what lock-free writers changed (the inode is being freed).
    pub(crate) fn discard_ahead(&self) {
        self.ahead().dirty = false;
    }
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub(crate) fn mtime_ms(&self) -> u64 {
        self.mtime_ms.load(Ordering::Acquire)
    }
    pub(crate) fn plain(&self) -> bool {
        self.plain.load(Ordering::Acquire)
    }
    /// A live regular file whose size and mtime the core has noted.
    pub(crate) fn regular(&self) -> bool {
        self.regular.load(Ordering::Acquire)
    }

    /// Lock-free writers may write it: a live regular file, not immutable.
    pub(crate) fn writable_lock_free(&self) -> bool {
        self.regular() && !self.immutable.load(Ordering::Acquire)
    }
    pub(crate) fn open_refs(&self) -> u32 {
        self.open_refs.load(Ordering::Acquire)
    }
    /// Take the inode's data lock (its block-map state).
    pub(crate) fn data(&self) -> DataGuard<'_> {
        let order = Held::take(Level::InodeData, u64::from(self.ino));
        DataGuard {
            // A panic under the lock leaves a map the core treats as a
            // cache: the filesystem turns read-only (CoreGuard) anyway.
            g: self.data.lock().unwrap_or_else(|e| e.into_inner()),
            _order: order,
        }
    }
}

/// Free-space accounting shared by the core and lock-free writers.
#[derive(Debug, Default)]
pub(crate) struct Space {
    m: Mutex<SpaceState>,
}

#[derive(Debug, Default, Clone, Copy)]
struct SpaceState {
    /// Free blocks (the superblock's count, kept exact by the core).
    free: u64,
    /// Blocks freed by the running transaction (not reusable before it
    /// commits).
    pinned: u64,
    /// Blocks reserved: delayed allocations (data and worst-case mapping
    /// blocks) and allocations in progress.
    reserved: u64,
}

impl SpaceState {
    fn unclaimed(&self) -> u64 {
        self.free
            .saturating_sub(self.pinned)
            .saturating_sub(self.reserved)
    }
}

impl Space {
    fn state(&self) -> MutexGuard<'_, SpaceState> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Free blocks nobody has claimed: not reserved, not pinned.
    #[cfg(test)]
    fn unclaimed(&self) -> u64 {
        self.state().unclaimed()
    }
    /// Blocks reserved in total.
    pub(crate) fn reserved(&self) -> u64 {
        self.state().reserved
    }
    /// Reserve up to `n` blocks; returns how many (0 when full).
    pub(crate) fn reserve_upto(&self, n: u64) -> u64 {
        let mut s = self.state();
        let k = n.min(s.unclaimed());
        s.reserved += k;
        k
    }
    /// Reserve exactly `n` blocks if they fit.
    pub(crate) fn reserve(&self, n: u64) -> bool {
        let mut s = self.state();
        if s.unclaimed() < n {
            return false;
        }
        s.reserved += n;
        true
    }
    /// Reserve `n` blocks whether or not they fit (a worst-case allowance
    /// recomputed after a change that may need it).
    pub(crate) fn reserve_anyway(&self, n: u64) {
        self.state().reserved += n;
    }
    pub(crate) fn unreserve(&self, n: u64) {
        let mut s = self.state();
        debug_assert!(s.reserved >= n, "unreserving more than is reserved");
        s.reserved = s.reserved.saturating_sub(n);
    }
    pub(crate) fn set_free(&self, free: u64) {
        self.state().free = free;
    }
    pub(crate) fn set_pinned(&self, pinned: u64) {
        self.state().pinned = pinned;
    }
}

/// Inode objects by inode number, and what threads share beside them.
#[derive(Debug)]
pub(crate) struct InodeTable {
    map: RwLock<HashMap<u32, Arc<InodeInfo>>>,
    /// Objects holding a loaded extent map.
    maps: AtomicUsize,
    /// Cleared when the filesystem stops taking writes (a panic under the
    /// core lock): lock-free writers check it.
    writable: AtomicBool,
    /// Bytes written by lock-free writers since the core last took them
    /// (for the superblock's lifetime-writes counter).
    written: AtomicU64,
    /// Bytes written by lock-free writers since open (never reset).
    lock_free_bytes: AtomicU64,
    /// Bytes read from the device into the cache without the core lock.
    lock_free_fills: AtomicU64,
    /// Free-space accounting.
    pub(crate) space: Space,
    /// The image has the large_file feature (files may pass 2 GiB
    /// without a superblock change).
    large_file: AtomicBool,
    /// New files may become inline at their first write (inline_data):
    /// writes to empty files go through the core.
    inline_files: AtomicBool,
    /// Inodes whose attributes the library changed without a request on
    /// them (`Filesystem::take_attr_changes`), recorded once someone asks
    /// for them (`Some`).
    changed: Mutex<Option<std::collections::BTreeSet<u32>>>,
}

impl Default for InodeTable {
    fn default() -> Self {
        InodeTable {
            map: RwLock::default(),
            maps: AtomicUsize::new(0),
            writable: AtomicBool::new(true),
            written: AtomicU64::new(0),
            lock_free_bytes: AtomicU64::new(0),
            lock_free_fills: AtomicU64::new(0),
            space: Space::default(),
            large_file: AtomicBool::new(false),
            inline_files: AtomicBool::new(false),
            changed: Mutex::new(None),
        }
    }
}

/// Milliseconds since the epoch of a timestamp (0 before it).
pub(crate) fn millis(t: crate::format::Timespec) -> u64 {
    u64::try_from(t.sec).map_or(0, |s| s * 1000 + u64::from(t.nsec) / 1_000_000)
}

impl InodeTable {
    /// Record that `ino`'s attributes changed behind the back of whoever
    /// caches them (if anyone asked to be told).
    pub(crate) fn attrs_changed(&self, ino: u32) {
        if let Some(set) = self
            .changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            set.insert(ino);
        }
    }

    /// Start recording attribute changes, or take those recorded.
    pub(crate) fn take_changed(&self) -> Vec<u32> {
        let mut c = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        c.get_or_insert_with(Default::default);
        std::mem::take(c.as_mut().expect("just set"))
            .into_iter()
            .collect()
    }

    /// The object of `ino`, if there is one.
    pub(crate) fn get(&self, ino: u32) -> Option<Arc<InodeInfo>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned()
    }

    /// The object of `ino`, made if there is none.
    pub(crate) fn obj(&self, ino: u32) -> Arc<InodeInfo> {
        if let Some(i) = self.get(ino) {
            return i;
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            self.drop_idle(&mut map);
        }
        Arc::clone(
            map.entry(ino)
                .or_insert_with(|| Arc::new(InodeInfo::new(ino))),
        )
    }

    /// Drop the objects that hold nothing that cannot be rebuilt.
    fn drop_idle(&self, map: &mut HashMap<u32, Arc<InodeInfo>>) {
        let mut dropped_maps = 0;
        map.retain(|_, i| {
            // Held elsewhere (a lock-free reader or writer, a core path
            // in the middle of using it), open, or ahead of its block:
            // keep.
            if Arc::strong_count(i) > 1 || i.open_refs() > 0 {
                return true;
            }
            if i.ahead.try_lock().map_or(true, |a| a.dirty) {
                return true;
            }
            match i.data.try_lock() {
                Ok(d) if d.idle() => {
                    dropped_maps += usize::from(d.extents.is_some());
                    false
                }
                _ => true,
            }
        });
        self.maps.fetch_sub(dropped_maps, Ordering::AcqRel);
    }

    /// The core read or wrote live regular file `ino` and found this.
    /// What lock-free writers put ahead of the block wins: a core read
    /// that began before a lock-free write must not take its size back.
    pub(crate) fn note(&self, ino: u32, n: FileNote) {
        let i = self.obj(ino);
        let a = i.ahead();
        let (size, mtime_ms) = if a.dirty {
            (a.size, millis(a.time))
        } else {
            (n.size, n.mtime_ms)
        };
        i.immutable.store(n.immutable, Ordering::Release);
        i.max_size.store(n.max_size, Ordering::Release);
        i.shape.store(n.shape.pack(), Ordering::Release);
        i.size.store(size, Ordering::Release);
        i.mtime_ms.store(mtime_ms, Ordering::Release);
        i.regular.store(true, Ordering::Release);
    }

    /// `ino` is no longer a live regular file (unlinked, or not regular):
    /// lock-free paths leave it to the core.
    pub(crate) fn unnote(&self, ino: u32) {
        if let Some(i) = self.get(ino) {
            i.regular.store(false, Ordering::Release);
        }
    }

    /// Whether a write to `ino` has privileges to drop (see
    /// `InodeInfo::plain`).
    pub(crate) fn set_plain(&self, ino: u32, plain: bool) {
        if let Some(i) = self.get(ino) {
            i.plain.store(plain, Ordering::Release);
        }
    }

    pub(crate) fn large_file(&self) -> bool {
        self.large_file.load(Ordering::Acquire)
    }

    pub(crate) fn inline_files(&self) -> bool {
        self.inline_files.load(Ordering::Relaxed)
    }

    pub(crate) fn set_inline_files(&self) {
        self.inline_files.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_large_file(&self) {
        self.large_file.store(true, Ordering::Release);
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
        self.lock_free_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes written by lock-free writers since open.
    pub(crate) fn lock_free_bytes(&self) -> u64 {
        self.lock_free_bytes.load(Ordering::Relaxed)
    }

    /// A lock-free reader read `n` bytes of data the cache did not hold.
    pub(crate) fn add_fill(&self, n: u64) {
        self.lock_free_fills.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes lock-free readers have read that the cache did not hold.
    pub(crate) fn lock_free_fills(&self) -> u64 {
        self.lock_free_fills.load(Ordering::Relaxed)
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

    /// `ino` is freed, or starts a new life: its object forgets the old
    /// one's state. The object itself stays (one object per number, so
    /// that a thread still holding its inode lock excludes whoever works
    /// on the number next); it goes with the idle ones.
    pub(crate) fn reset(&self, ino: u32) {
        let Some(i) = self.get(ino) else {
            return;
        };
        i.regular.store(false, Ordering::Release);
        i.plain.store(false, Ordering::Release);
        *i.ahead() = Ahead::default();
        i.size.store(0, Ordering::Release);
        i.mtime_ms.store(0, Ordering::Release);
        let mut d = i.data();
        debug_assert!(d.delalloc.blocks == 0, "a freed inode kept delayed blocks");
        d.pinned = false;
        if d.extents.take().is_some() {
            self.maps.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Count one more open reference to `ino`.
    pub(crate) fn open_ref(&self, ino: u32) {
        self.obj(ino).open_refs.fetch_add(1, Ordering::AcqRel);
    }

    /// Drop an open reference; true if it was the last. False, changing
    /// nothing, if `ino` had none.
    pub(crate) fn close_ref(&self, ino: u32) -> bool {
        let Some(i) = self.get(ino) else {
            return false;
        };
        let r = i
            .open_refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        r == Ok(1)
    }

    /// Whether `ino` is open.
    pub(crate) fn is_open(&self, ino: u32) -> bool {
        self.get(ino).is_some_and(|i| i.open_refs() > 0)
    }

    /// Make room for one more loaded extent map (for `keep`): past
    /// [`MAX_MAPS`], idle objects' maps go. Call without holding any
    /// inode's data lock.
    pub(crate) fn make_room_for_map(&self, keep: u32) {
        if self.maps.load(Ordering::Acquire) >= MAX_MAPS {
            self.drop_maps(keep);
        }
    }

    /// Install `map` as the extent map of the object whose data `d` is.
    pub(crate) fn install_map(&self, d: &mut InodeData, map: ExtentMap) {
        if d.extents.is_none() {
            self.maps.fetch_add(1, Ordering::AcqRel);
        }
        d.extents = Some(map);
    }

    /// Forget `ino`'s extent map (it may no longer match the tree).
    pub(crate) fn drop_map(&self, ino: u32) {
        if let Some(i) = self.get(ino) {
            if i.data().extents.take().is_some() {
                self.maps.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Drop loaded maps of idle objects other than `keep`: small ones
    /// first, then all of them if that was not enough.
    fn drop_maps(&self, keep: u32) {
        let all: Vec<Arc<InodeInfo>> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|i| i.ino != keep)
            .cloned()
            .collect();
        for pass in 0..2 {
            for i in &all {
                // Busy (its data lock held): leave it.
                let Ok(mut d) = i.data.try_lock() else {
                    continue;
                };
                let small = d.extents.as_ref().is_some_and(|m| m.len() <= ROOT_EXTENTS);
                if (pass == 1 || small) && d.extents.take().is_some() {
                    self.maps.fetch_sub(1, Ordering::AcqRel);
                }
            }
            if self.maps.load(Ordering::Acquire) < MAX_MAPS / 2 {
                break;
            }
        }
    }

    /// Inodes whose in-memory size or times are ahead of their block.
    pub(crate) fn ahead_inodes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|i| i.ahead().dirty)
            .map(|i| i.ino)
            .collect();
        v.sort_unstable();
        v
    }

    /// Loaded extent maps (for tests).
    #[cfg(test)]
    pub(crate) fn maps_loaded(&self) -> usize {
        self.maps.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_noted_lowered_and_forgotten() {
        let t = InodeTable::default();
        assert!(t.get(12).is_none());
        let note = |size, mtime_ms| FileNote {
            immutable: false,
            size,
            mtime_ms,
            max_size: 1 << 40,
            shape: Shape::default(),
        };
        t.note(12, note(8192, 7));
        let i = t.get(12).expect("noted");
        assert!(i.regular());
        t.shrink(12, 100);
        assert_eq!(i.size(), 100, "the object a reader holds sees the cut");
        t.shrink(12, 5000);
        assert_eq!(i.size(), 100, "shrink never grows");
        t.note(12, note(5000, 9));
        assert_eq!((i.size(), i.mtime_ms()), (5000, 9));
        t.unnote(12);
        assert!(!i.regular(), "an unlinked file is left to the core");
        i.advance(9000, Timespec { sec: 5, nsec: 0 });
        t.reset(12);
        let again = t.get(12).expect("the object stays for its number");
        assert!(Arc::ptr_eq(&i, &again));
        assert_eq!(
            (i.size(), i.ahead().dirty),
            (0, false),
            "nothing of the old life"
        );
    }

    #[test]
    fn open_references_count_down_to_the_last() {
        let t = InodeTable::default();
        assert!(!t.close_ref(5), "no reference to drop");
        t.open_ref(5);
        t.open_ref(5);
        assert!(t.is_open(5));
        assert!(!t.close_ref(5));
        assert!(t.close_ref(5), "the last one");
        assert!(!t.is_open(5));
        assert!(!t.close_ref(5), "never below zero");
    }

    #[test]
    fn idle_objects_go_and_busy_ones_stay() {
        let t = InodeTable::default();
        let mut map = HashMap::new();
        for ino in 1..=4u32 {
            map.insert(ino, Arc::new(InodeInfo::new(ino)));
        }
        map[&1].open_refs.store(1, Ordering::Release);
        map[&2].data().delalloc.blocks = 3;
        let held = Arc::clone(&map[&3]);
        t.drop_idle(&mut map);
        let mut left: Vec<u32> = map.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, vec![1, 2, 3], "open, delayed and held objects stay");
        drop(held);
    }

    #[test]
    fn loaded_maps_are_bounded_and_busy_ones_stay() {
        let t = InodeTable::default();
        for ino in 1..=MAX_MAPS as u32 {
            let o = t.obj(ino);
            t.install_map(&mut o.data(), ExtentMap::from_sorted(Vec::new()));
        }
        assert_eq!(t.maps_loaded(), MAX_MAPS);
        let busy = t.obj(7);
        let held = busy.data();
        t.make_room_for_map(1);
        assert!(t.maps_loaded() < MAX_MAPS / 2, "idle maps went");
        assert!(held.extents.is_some(), "a map in use stays");
        drop(held);
        assert!(
            t.obj(1).data().extents.is_some(),
            "the one being loaded for stays"
        );
    }

    #[test]
    fn space_never_promises_a_block_twice() {
        let s = Space::default();
        s.set_free(10);
        s.set_pinned(2);
        assert_eq!(s.unclaimed(), 8);
        assert_eq!(s.reserve_upto(5), 5);
        assert!(!s.reserve(4), "only 3 left");
        assert!(s.reserve(3));
        assert_eq!(s.reserve_upto(1), 0);
        s.unreserve(8);
        assert_eq!(s.unclaimed(), 8);
    }
}
