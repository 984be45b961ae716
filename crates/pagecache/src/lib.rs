//! The page cache of folio: per-inode mappings of folios.
//!
//! A [`Folio`] is a power-of-two group of 4 KiB pages holding one piece of
//! a file. Its size is fixed per mapping: at least one filesystem block (so
//! a 64 KiB block lives in one folio) and at least [`Config::folio_bytes`].
//! When a block is smaller than the folio, the folio keeps per-block
//! uptodate and dirty bitmaps, so a partial write never has to read the
//! rest of the folio and writeback writes only the blocks that changed.
//!
//! Locking, from outside in (see docs/architecture.md for the whole order):
//! - the folio lock ([`FolioGuard`]): held while a folio is filled, written
//!   into, written back or truncated. Several folios are always locked in
//!   ascending index order ([`AddressSpace::lock_range`]);
//! - the mapping's index lock (a short mutex around the folio tree);
//! - a folio's state mutex (data and bitmaps; never held across I/O that
//!   another folio lock could wait for).
//!
//! A folio found in the tree may be truncated by the time its lock is
//! taken: [`AddressSpace::lock_folio`] reports that as [`Stale`] and the
//! range helpers retry the lookup, the way `find_lock_page` does.
//!
//! Memory: the cache is bounded by a budget. New folios are charged to it
//! and clean, unlocked, unreferenced folios are reclaimed (a clock over the
//! mappings) when it is exceeded. Reclaim frees memory and never allocates
//! folios. Dirty data is bounded by the dirty limits ([`PageCache::over_dirty_limit`],
//! [`PageCache::over_background`]); the filesystem writes back when they
//! are crossed. Writeback copies runs into buffers of a [`IoPool`] that is
//! allocated once at start, so writeback never needs new memory to make
//! progress.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// The base page size; folio sizes are power-of-two multiples of it.
pub const PAGE_SIZE: usize = 4096;

/// Most blocks one folio may hold (the width of the block bitmaps).
pub const MAX_BLOCKS_PER_FOLIO: u32 = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these mutexes leaves plain data that is
    // still consistent at every await point, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Cache sizing.
#[derive(Clone, Debug)]
pub struct Config {
    /// Memory the folios may use, in bytes.
    pub budget_bytes: u64,
    /// Preferred folio size (a power of two, at least 4 KiB).
    pub folio_bytes: usize,
    /// Writers are throttled (write back themselves) above this share of
    /// the budget in dirty folios, in percent.
    pub dirty_ratio: u32,
    /// Background writeback starts above this share, in percent.
    pub background_ratio: u32,
    /// Reserved writeback buffers: count and size in bytes.
    pub pool_buffers: usize,
    pub pool_buffer_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            budget_bytes: 256 << 20,
            folio_bytes: 16 << 10,
            dirty_ratio: 40,
            background_ratio: 20,
            pool_buffers: 2,
            pool_buffer_bytes: 1 << 20,
        }
    }
}

/// A folio was truncated (removed from its mapping) while we waited for
/// its lock. Like the kernel's ESTALE from a truncated page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale;

/// Data and state of one folio. Reached through [`FolioGuard::state`].
pub struct FolioState {
    data: Box<[u8]>,
    uptodate: u64,
    dirty: u64,
    writeback: bool,
    referenced: bool,
}

impl FolioState {
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    /// Bitmap of uptodate blocks.
    pub fn uptodate_mask(&self) -> u64 {
        self.uptodate
    }
    /// Bitmap of dirty blocks.
    pub fn dirty_mask(&self) -> u64 {
        self.dirty
    }
    pub fn is_block_uptodate(&self, b: u32) -> bool {
        self.uptodate & (1 << b) != 0
    }
    pub fn is_block_dirty(&self, b: u32) -> bool {
        self.dirty & (1 << b) != 0
    }
    /// Mark blocks `[first, first+n)` uptodate.
    pub fn set_uptodate(&mut self, first: u32, n: u32) {
        self.uptodate |= mask(first, n);
    }
    pub fn in_writeback(&self) -> bool {
        self.writeback
    }
}

/// Bits `[first, first+n)`.
pub fn mask(first: u32, n: u32) -> u64 {
    if n == 0 {
        return 0;
    }
    let m = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    m << first
}

/// One folio: `size` bytes of a file starting at byte `index * size`.
pub struct Folio {
    index: u64,
    size: usize,
    blocks: u32,
    locked: Mutex<bool>,
    unlocked: Condvar,
    truncated: AtomicBool,
    st: Mutex<FolioState>,
}

impl Folio {
    pub fn index(&self) -> u64 {
        self.index
    }
    /// File offset of the first byte.
    pub fn pos(&self) -> u64 {
        self.index * self.size as u64
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn blocks(&self) -> u32 {
        self.blocks
    }
    /// Whether someone holds the folio's lock (a snapshot: for checks
    /// and tests, not for synchronisation).
    pub fn is_locked(&self) -> bool {
        *lock(&self.locked)
    }
    fn lock(self: &Arc<Self>) -> FolioGuard {
        lockdep::acquire(lockdep::Level::Folio, self.index);
        let mut l = lock(&self.locked);
        while *l {
            l = self.unlocked.wait(l).unwrap_or_else(|e| e.into_inner());
        }
        *l = true;
        FolioGuard {
            folio: Arc::clone(self),
        }
    }
    fn try_lock(self: &Arc<Self>) -> Option<FolioGuard> {
        let mut l = lock(&self.locked);
        if *l {
            return None;
        }
        *l = true;
        lockdep::acquire_nonblocking(lockdep::Level::Folio, self.index);
        Some(FolioGuard {
            folio: Arc::clone(self),
        })
    }
    /// True once the folio has left its mapping.
    pub fn is_truncated(&self) -> bool {
        self.truncated.load(Ordering::Acquire)
    }
    /// Copy uptodate data out without taking the folio lock: `None` unless
    /// every block of `[off, off+buf.len())` is uptodate. Uptodate data is
    /// never invalid (a writer changes it under the state mutex), so this
    /// is safe against concurrent writers and truncation.
    pub fn read_uptodate(&self, off: usize, buf: &mut [u8], block_size: usize) -> Option<()> {
        if buf.is_empty() {
            return Some(());
        }
        let first = (off / block_size) as u32;
        let last = ((off + buf.len() - 1) / block_size) as u32;
        let mut st = lock(&self.st);
        let need = mask(first, last - first + 1);
        if st.uptodate & need != need || self.is_truncated() {
            return None;
        }
        st.referenced = true;
        buf.copy_from_slice(&st.data[off..off + buf.len()]);
        Some(())
    }
}

/// A locked folio. Dropping it unlocks.
pub struct FolioGuard {
    folio: Arc<Folio>,
}

impl FolioGuard {
    pub fn folio(&self) -> &Arc<Folio> {
        &self.folio
    }
    pub fn index(&self) -> u64 {
        self.folio.index
    }
    pub fn pos(&self) -> u64 {
        self.folio.pos()
    }
    pub fn size(&self) -> usize {
        self.folio.size
    }
    pub fn blocks(&self) -> u32 {
        self.folio.blocks
    }
    /// The folio's data and bitmaps.
    pub fn state(&self) -> MutexGuard<'_, FolioState> {
        lock(&self.folio.st)
    }
}

impl Drop for FolioGuard {
    fn drop(&mut self) {
        let mut l = lock(&self.folio.locked);
        *l = false;
        self.folio.unlocked.notify_all();
        lockdep::release(lockdep::Level::Folio, self.folio.index);
    }
}

/// Counters shared by every mapping of one cache.
struct Shared {
    cfg: Config,
    used: AtomicU64,
    dirty: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    reclaimed: AtomicU64,
    written_back: AtomicU64,
}

/// A mapping's dirty folios and since when it has had any (the kernel's
/// `dirtied_when`: set when the first folio of a clean mapping becomes
/// dirty, not moved by later ones, cleared when the last is cleaned;
/// [`AddressSpace::restart_dirty_clock`] moves it after a writeback pass
/// that left the mapping dirty).
#[derive(Default)]
struct DirtySet {
    set: BTreeSet<u64>,
    since: Option<Instant>,
}

impl DirtySet {
    fn insert(&mut self, index: u64) {
        if self.set.is_empty() {
            self.since = Some(Instant::now());
        }
        self.set.insert(index);
    }
    fn remove(&mut self, index: u64) {
        self.set.remove(&index);
        if self.set.is_empty() {
            self.since = None;
        }
    }
}

/// The folios of one inode.
pub struct AddressSpace {
    ino: u64,
    folio_size: usize,
    block_size: usize,
    shared: Arc<Shared>,
    folios: Mutex<BTreeMap<u64, Arc<Folio>>>,
    /// Indices of dirty folios (the kernel's DIRTY tag) and since when
    /// the mapping has had any.
    dirty: Mutex<DirtySet>,
    /// Readahead state: end of the last read and the current window.
    ra: Mutex<(u64, u64)>,
    /// Lookups that found a folio and that did not, counted here rather
    /// than in the cache-wide `Shared` so that threads working on
    /// different files do not bounce one cache line on every lookup
    /// (`PageCache::stats` sums them).
    hits: AtomicU64,
    misses: AtomicU64,
    /// Reclaim's clock hand: the folio index the next sweep starts at.
    hand: Mutex<u64>,
}

impl AddressSpace {
    pub fn ino(&self) -> u64 {
        self.ino
    }
    pub fn folio_size(&self) -> usize {
        self.folio_size
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Folio index holding byte `pos`.
    pub fn index_of(&self, pos: u64) -> u64 {
        pos / self.folio_size as u64
    }

    /// The folio at `index`, if cached.
    pub fn find(&self, index: u64) -> Option<Arc<Folio>> {
        let f = lock(&self.folios).get(&index).cloned();
        if f.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        f
    }

    fn new_folio(&self, index: u64) -> Arc<Folio> {
        Arc::new(Folio {
            index,
            size: self.folio_size,
            blocks: (self.folio_size / self.block_size) as u32,
            locked: Mutex::new(false),
            unlocked: Condvar::new(),
            truncated: AtomicBool::new(false),
            st: Mutex::new(FolioState {
                data: vec![0u8; self.folio_size].into_boxed_slice(),
                uptodate: 0,
                dirty: 0,
                writeback: false,
                referenced: true,
            }),
        })
    }

    /// The folio at `index`, inserting a new (not uptodate) one if absent.
    /// The new folio is built outside the index lock; if another thread
    /// inserted one meanwhile, theirs wins and ours is dropped.
    pub fn find_or_create(&self, index: u64) -> Arc<Folio> {
        if let Some(f) = self.find(index) {
            return f;
        }
        let fresh = self.new_folio(index);
        let mut map = lock(&self.folios);
        if let Some(existing) = map.get(&index) {
            return Arc::clone(existing);
        }
        map.insert(index, Arc::clone(&fresh));
        self.shared
            .used
            .fetch_add(self.folio_size as u64, Ordering::Relaxed);
        fresh
    }

    /// Lock `folio`; [`Stale`] if it was truncated meanwhile.
    pub fn lock_folio(&self, folio: &Arc<Folio>) -> Result<FolioGuard, Stale> {
        let g = folio.lock();
        if folio.is_truncated() {
            return Err(Stale);
        }
        Ok(g)
    }

    /// Lock `folio` if nobody holds it (and it was not truncated): for
    /// writeback that leaves folios another thread is writing to it.
    pub fn try_lock_folio(&self, folio: &Arc<Folio>) -> Option<FolioGuard> {
        let g = folio.try_lock()?;
        (!folio.is_truncated()).then_some(g)
    }

    /// Find or create and lock the folio at `index`, retrying when a
    /// truncate removes the one found.
    pub fn grab(&self, index: u64) -> FolioGuard {
        loop {
            let f = self.find_or_create(index);
            if let Ok(g) = self.lock_folio(&f) {
                return g;
            }
        }
    }

    /// Lock every folio of `[first, last]` in ascending order (creating
    /// missing ones). Ascending order makes two range lockers deadlock-free.
    pub fn lock_range(&self, first: u64, last: u64) -> Vec<FolioGuard> {
        (first..=last).map(|i| self.grab(i)).collect()
    }

    /// Cached folio indices in `[first, last]`.
    pub fn cached_indices(&self, first: u64, last: u64) -> Vec<u64> {
        lock(&self.folios)
            .range(first..=last)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Mark blocks `[first, first+n)` of a locked folio uptodate and dirty.
    pub fn mark_dirty(&self, g: &FolioGuard, first: u32, n: u32) {
        let m = mask(first, n);
        let was_clean = {
            let mut st = g.state();
            let was = st.dirty == 0;
            st.dirty |= m;
            st.uptodate |= m;
            st.referenced = true;
            was
        };
        if was_clean && m != 0 {
            self.shared
                .dirty
                .fetch_add(self.folio_size as u64, Ordering::Relaxed);
            lock(&self.dirty).insert(g.index());
        }
    }

    /// Clear dirty bits `m` of a locked folio (its data reached the device).
    pub fn clear_dirty(&self, g: &FolioGuard, m: u64) {
        self.clean(g, m);
        self.shared.written_back.fetch_add(
            u64::from(m.count_ones()) * self.block_size as u64,
            Ordering::Relaxed,
        );
    }

    /// Clear dirty bits `m`, keeping the dirty accounting right.
    fn clean(&self, g: &FolioGuard, m: u64) {
        let now_clean = {
            let mut st = g.state();
            let was = st.dirty != 0;
            st.dirty &= !m;
            was && st.dirty == 0
        };
        if now_clean {
            self.shared
                .dirty
                .fetch_sub(self.folio_size as u64, Ordering::Relaxed);
            lock(&self.dirty).remove(g.index());
        }
    }

    /// Set or clear the writeback flag of a locked folio.
    pub fn set_writeback(&self, g: &FolioGuard, on: bool) {
        g.state().writeback = on;
    }

    /// Indices of dirty folios in `[first, last]`, ascending.
    pub fn dirty_indices(&self, first: u64, last: u64) -> Vec<u64> {
        lock(&self.dirty).set.range(first..=last).copied().collect()
    }

    /// Copy `[pos, pos + buf.len())` out of the cache, clamped to a file
    /// of `isize` bytes, without any folio lock (each folio's copy is
    /// consistent under its state mutex): the bytes copied, or `None`
    /// unless every block asked for is cached and uptodate. Nothing is
    /// filled or changed, so a caller without the filesystem's locks may
    /// use it.
    pub fn read_cached(&self, isize: u64, pos: u64, buf: &mut [u8]) -> Option<usize> {
        if pos >= isize || buf.is_empty() {
            return None;
        }
        let len = (isize - pos).min(buf.len() as u64) as usize;
        let fsz = self.folio_size as u64;
        let mut done = 0usize;
        while done < len {
            let p = pos + done as u64;
            let off = (p % fsz) as usize;
            let n = (fsz as usize - off).min(len - done);
            self.find(p / fsz)?
                .read_uptodate(off, &mut buf[done..done + n], self.block_size)?;
            done += n;
        }
        Some(len)
    }

    /// The highest dirty folio index, if any.
    pub fn last_dirty_index(&self) -> Option<u64> {
        lock(&self.dirty).set.last().copied()
    }

    /// The first `max` dirty folio indices in `[first, last]`.
    pub fn first_dirty_indices(&self, first: u64, last: u64, max: usize) -> Vec<u64> {
        lock(&self.dirty)
            .set
            .range(first..=last)
            .take(max)
            .copied()
            .collect()
    }

    pub fn has_dirty(&self) -> bool {
        !lock(&self.dirty).set.is_empty()
    }

    /// Since when the mapping has had dirty folios (`None`: it is clean).
    pub fn dirty_since(&self) -> Option<Instant> {
        lock(&self.dirty).since
    }

    /// A writeback pass over the whole mapping has finished: if folios
    /// were dirtied again meanwhile, their age counts from now (as the
    /// kernel's `redirty_tail` requeues an inode with a fresh
    /// `dirtied_when`), so a file rewritten without pause is written back
    /// once per expiry interval, not at every tick after its first.
    pub fn restart_dirty_clock(&self) {
        let mut d = lock(&self.dirty);
        if !d.set.is_empty() {
            d.since = Some(Instant::now());
        }
    }

    /// Remove a locked folio from the mapping (it becomes [`Stale`] to
    /// anyone waiting for it). Its dirty data, if any, is discarded: only
    /// truncation, which makes that data part of no file, does this.
    fn remove_locked(&self, g: &FolioGuard) {
        let dirty = g.state().dirty != 0;
        g.folio.truncated.store(true, Ordering::Release);
        if lock(&self.folios).remove(&g.index()).is_some() {
            self.shared
                .used
                .fetch_sub(self.folio_size as u64, Ordering::Relaxed);
        }
        if dirty {
            self.shared
                .dirty
                .fetch_sub(self.folio_size as u64, Ordering::Relaxed);
            lock(&self.dirty).remove(g.index());
        }
    }

    /// Truncate the cache at byte `size`: folios wholly beyond it are
    /// removed (dirty data there belongs to no file any more), and in the
    /// folio straddling it the bytes beyond `size` are zeroed and their
    /// whole blocks made clean. Returns the number of folios removed.
    pub fn truncate(&self, size: u64) -> usize {
        let fs = self.folio_size as u64;
        let first_gone = size.div_ceil(fs);
        let doomed: Vec<Arc<Folio>> = lock(&self.folios)
            .range(first_gone..)
            .map(|(_, f)| Arc::clone(f))
            .collect();
        let n = doomed.len();
        for f in doomed {
            if let Ok(g) = self.lock_folio(&f) {
                self.remove_locked(&g);
            }
        }
        if size % fs != 0 {
            if let Some(f) = lock(&self.folios).get(&(size / fs)).cloned() {
                if let Ok(g) = self.lock_folio(&f) {
                    let off = (size % fs) as usize;
                    let bs = self.block_size;
                    let first_whole = off.div_ceil(bs) as u32;
                    let whole = mask(first_whole, g.blocks() - first_whole);
                    g.state().data[off..].fill(0);
                    self.clean(&g, whole);
                }
            }
        }
        n
    }

    /// Drop the cached folios of bytes `[start, end)` (whole folios
    /// touching the range). Fails with the first dirty folio's index,
    /// leaving it and everything after it: invalidation never silently
    /// drops dirty data; the caller writes back first.
    pub fn invalidate_range(&self, start: u64, end: u64) -> Result<(), u64> {
        if end <= start {
            return Ok(());
        }
        let first = self.index_of(start);
        let last = self.index_of(end - 1);
        for idx in self.cached_indices(first, last) {
            let Some(f) = lock(&self.folios).get(&idx).cloned() else {
                continue;
            };
            let Ok(g) = self.lock_folio(&f) else {
                continue;
            };
            if g.state().dirty != 0 {
                return Err(idx);
            }
            self.remove_locked(&g);
        }
        Ok(())
    }

    /// Remove clean, unlocked, unreferenced folios until `want` bytes are
    /// freed; returns the bytes freed. Folios referenced since the last
    /// pass get a second chance (a clock).
    fn reclaim(&self, want: u64) -> u64 {
        // A clock: resume where the last sweep stopped, look at folios in
        // small batches, and stop after one full turn. Each call costs what
        // it frees (plus the referenced bits it clears), not the size of
        // the mapping.
        const BATCH: usize = 32;
        let total = lock(&self.folios).len();
        let (mut scanned, mut freed) = (0, 0);
        while freed < want && scanned < total {
            let hand = *lock(&self.hand);
            let batch: Vec<(u64, Arc<Folio>)> = lock(&self.folios)
                .range(hand..)
                .take(BATCH)
                .map(|(&i, f)| (i, Arc::clone(f)))
                .collect();
            let Some(&(last, _)) = batch.last() else {
                if hand == 0 {
                    break;
                }
                *lock(&self.hand) = 0;
                continue;
            };
            *lock(&self.hand) = last + 1;
            for (_, f) in batch {
                if freed >= want {
                    break;
                }
                scanned += 1;
                let Some(g) = f.try_lock() else { continue };
                if g.folio.is_truncated() {
                    continue;
                }
                {
                    let mut st = g.state();
                    if st.dirty != 0 || st.writeback {
                        continue;
                    }
                    if st.referenced {
                        st.referenced = false;
                        continue;
                    }
                }
                self.remove_locked(&g);
                freed += self.folio_size as u64;
            }
        }
        freed
    }

    /// Readahead window for a miss at `pos`: grows while reads are
    /// sequential (up to `max`), resets otherwise.
    pub fn readahead_window(&self, pos: u64, len: u64, max: u64) -> u64 {
        let mut ra = lock(&self.ra);
        let (last_end, win) = *ra;
        let win = if pos == last_end && pos != 0 {
            (win * 2).clamp(self.folio_size as u64, max)
        } else {
            0
        };
        *ra = (pos + len, win);
        win
    }
}

/// Statistics of a cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub used_bytes: u64,
    pub dirty_bytes: u64,
    pub budget_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub reclaimed_bytes: u64,
    pub written_back_bytes: u64,
}

/// The page cache: every mapping, the budget and the writeback pool.
pub struct PageCache {
    shared: Arc<Shared>,
    /// By inode number, in order: reclaim goes round them like a clock.
    /// Mappings by inode: read by every lookup (shared), written only to
    /// add or remove one.
    mappings: RwLock<BTreeMap<u64, Arc<AddressSpace>>>,
    /// The inode number reclaim looks at next.
    reclaim_hand: Mutex<u64>,
    pool: IoPool,
}

impl PageCache {
    pub fn new(cfg: Config) -> Self {
        assert!(cfg.folio_bytes.is_power_of_two() && cfg.folio_bytes >= PAGE_SIZE);
        let pool = IoPool::new(cfg.pool_buffers, cfg.pool_buffer_bytes);
        PageCache {
            shared: Arc::new(Shared {
                cfg,
                used: AtomicU64::new(0),
                dirty: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                reclaimed: AtomicU64::new(0),
                written_back: AtomicU64::new(0),
            }),
            mappings: RwLock::new(BTreeMap::new()),
            reclaim_hand: Mutex::new(0),
            pool,
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// Folio size used for files with `block_size` blocks.
    pub fn folio_size_for(&self, block_size: usize) -> usize {
        let want = self.shared.cfg.folio_bytes.max(block_size).max(PAGE_SIZE);
        let cap = block_size * MAX_BLOCKS_PER_FOLIO as usize;
        want.min(cap).max(block_size).next_power_of_two()
    }

    /// The mapping of inode `ino`, created on first use.
    pub fn mapping(&self, ino: u64, block_size: usize) -> Arc<AddressSpace> {
        if let Some(m) = self.existing(ino) {
            return m;
        }
        let mut m = self.mappings.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(m.entry(ino).or_insert_with(|| {
            Arc::new(AddressSpace {
                ino,
                folio_size: self.folio_size_for(block_size),
                block_size,
                shared: Arc::clone(&self.shared),
                folios: Mutex::new(BTreeMap::new()),
                dirty: Mutex::new(DirtySet::default()),
                ra: Mutex::new((0, 0)),
                hand: Mutex::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            })
        }))
    }

    /// The mapping of `ino` if it exists.
    pub fn existing(&self, ino: u64) -> Option<Arc<AddressSpace>> {
        self.mappings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned()
    }

    /// Forget inode `ino` entirely (it was deleted): every folio goes,
    /// dirty or not.
    pub fn remove_mapping(&self, ino: u64) {
        let m = self
            .mappings
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino);
        if let Some(m) = m {
            m.truncate(0);
            let s = &self.shared;
            s.hits
                .fetch_add(m.hits.load(Ordering::Relaxed), Ordering::Relaxed);
            s.misses
                .fetch_add(m.misses.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Inodes with dirty folios, ascending.
    pub fn dirty_inodes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .mappings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|m| m.has_dirty())
            .map(|m| m.ino)
            .collect();
        v.sort_unstable();
        v
    }

    /// Inodes whose mappings have been dirty for at least `age`, the
    /// longest dirty first (the kernel's expired inodes, written back
    /// after `dirty_expire_centisecs`).
    pub fn expired_inodes(&self, age: Duration) -> Vec<u64> {
        let now = Instant::now();
        let mut v: Vec<(Instant, u64)> = self
            .mappings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|m| {
                let since = m.dirty_since()?;
                (now.saturating_duration_since(since) >= age).then_some((since, m.ino))
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, ino)| ino).collect()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.shared.dirty.load(Ordering::Relaxed)
    }
    pub fn used_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Relaxed)
    }
    /// Writers should write back before continuing.
    pub fn over_dirty_limit(&self) -> bool {
        let c = &self.shared.cfg;
        self.dirty_bytes() > c.budget_bytes / 100 * u64::from(c.dirty_ratio)
    }
    /// Background writeback should run.
    pub fn over_background(&self) -> bool {
        let c = &self.shared.cfg;
        self.dirty_bytes() > c.budget_bytes / 100 * u64::from(c.background_ratio)
    }
    /// The level background writeback writes down to: a little below the
    /// level that starts it (Linux stops at the level itself), so a pass
    /// writes a few batches rather than everything down to a far lower
    /// level, which a file rewritten at random dirties again at once.
    pub fn background_target(&self) -> u64 {
        let c = &self.shared.cfg;
        c.budget_bytes / 100 * u64::from(c.background_ratio) * 7 / 8
    }

    /// Reclaim clean folios until the cache is within its budget (or
    /// nothing more can go). Returns the bytes freed.
    pub fn balance(&self) -> u64 {
        let budget = self.shared.cfg.budget_bytes;
        let mut freed = 0;
        // A clock over the mappings: stay on one while it yields enough,
        // move on when it does not. At most two turns (the first may only
        // clear referenced bits).
        let turns = 2 * self
            .mappings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        for _ in 0..turns {
            let used = self.used_bytes();
            if used <= budget {
                break;
            }
            let hand = *lock(&self.reclaim_hand);
            let next = {
                let maps = self.mappings.read().unwrap_or_else(|e| e.into_inner());
                maps.range(hand..)
                    .next()
                    .or_else(|| maps.iter().next())
                    .map(|(&ino, m)| (ino, Arc::clone(m)))
            };
            let Some((ino, m)) = next else { break };
            let want = used - budget;
            let got = m.reclaim(want);
            freed += got;
            *lock(&self.reclaim_hand) = if got >= want { ino } else { ino + 1 };
        }
        self.shared.reclaimed.fetch_add(freed, Ordering::Relaxed);
        freed
    }

    /// Drop every clean folio (echo 1 > drop_caches). Dirty folios stay.
    pub fn drop_clean(&self) -> u64 {
        let maps: Vec<Arc<AddressSpace>> = self
            .mappings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut freed = 0;
        for m in maps {
            // Twice: the first pass only clears referenced bits.
            freed += m.reclaim(u64::MAX);
            freed += m.reclaim(u64::MAX);
        }
        self.shared.reclaimed.fetch_add(freed, Ordering::Relaxed);
        freed
    }

    pub fn over_budget(&self) -> bool {
        self.used_bytes() > self.shared.cfg.budget_bytes
    }

    pub fn pool(&self) -> &IoPool {
        &self.pool
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        let maps = self.mappings.read().unwrap_or_else(|e| e.into_inner());
        let per_mapping = |c: fn(&AddressSpace) -> &AtomicU64| -> u64 {
            maps.values().map(|m| c(m).load(Ordering::Relaxed)).sum()
        };
        Stats {
            used_bytes: s.used.load(Ordering::Relaxed),
            dirty_bytes: s.dirty.load(Ordering::Relaxed),
            budget_bytes: s.cfg.budget_bytes,
            hits: s.hits.load(Ordering::Relaxed) + per_mapping(|m| &m.hits),
            misses: s.misses.load(Ordering::Relaxed) + per_mapping(|m| &m.misses),
            reclaimed_bytes: s.reclaimed.load(Ordering::Relaxed),
            written_back_bytes: s.written_back.load(Ordering::Relaxed),
        }
    }
}

/// Writeback buffers allocated once, up front. [`IoPool::take`] never
/// allocates: when every buffer is in use it returns `None` and the caller
/// writes folio by folio straight from the cache instead.
pub struct IoPool {
    bufs: Mutex<Vec<Box<[u8]>>>,
    buf_bytes: usize,
}

/// A buffer borrowed from an [`IoPool`]; returned on drop.
pub struct PoolBuf<'a> {
    pool: &'a IoPool,
    buf: Option<Box<[u8]>>,
}

impl PoolBuf<'_> {
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for PoolBuf<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            lock(&self.pool.bufs).push(b);
        }
    }
}

impl IoPool {
    fn new(n: usize, bytes: usize) -> Self {
        IoPool {
            bufs: Mutex::new(
                (0..n)
                    .map(|_| vec![0u8; bytes].into_boxed_slice())
                    .collect(),
            ),
            buf_bytes: bytes,
        }
    }
    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }
    pub fn take(&self) -> Option<PoolBuf<'_>> {
        let b = lock(&self.bufs).pop()?;
        Some(PoolBuf {
            pool: self,
            buf: Some(b),
        })
    }
}

pub mod lockdep;

#[cfg(test)]
mod tests;
