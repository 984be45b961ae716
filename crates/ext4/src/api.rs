//! [`Filesystem`]: the thread-safe handle every user of the library holds.
//!
//! The filesystem's state (buffer cache, group descriptors, allocator,
//! journal, per-inode maps) lives in a `Core` behind one mutex, the
//! *core lock*. Every operation takes `&self`, so one `Filesystem` can be
//! shared between threads (`Arc<Filesystem>`); the core lock serialises
//! the work on metadata. Without it run: reads of cached data and
//! overwrites of data already dirty in the cache (through the in-memory
//! inode objects of `inodes`), and long writebacks hand it to waiting
//! threads between batches.
//!
//! The lock that the FUSE adapter once held around every request lives
//! here, where it is narrowed one path at a time (issue 12;
//! docs/architecture.md, "Concurrency and lock order"). It sits in the
//! lock order just inside the inode level: a thread holding a folio lock,
//! a journal handle or the allocator never takes it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use folio_ext4::{Filesystem, OpenOptions, Owner, ROOT_INO};
//!
//! let fs = Arc::new(Filesystem::open_path("disk.img".as_ref(), OpenOptions::default())?);
//! let workers: Vec<_> = (0..4u8)
//!     .map(|t| {
//!         let fs = Arc::clone(&fs);
//!         std::thread::spawn(move || -> folio_ext4::Result<()> {
//!             let name = format!("file{t}");
//!             let ino = fs.create(ROOT_INO, name.as_bytes(), 0o644, Owner::default())?;
//!             fs.write(ino, 0, &[t; 4096])?;
//!             fs.fsync(ino, false)
//!         })
//!     })
//!     .collect();
//! for w in workers {
//!     w.join().expect("worker panicked")?;
//! }
//! Arc::into_inner(fs).expect("workers are done").close()?;
//! # Ok::<(), folio_ext4::Error>(())
//! ```

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use folio_blockdev::{BlockDevice, FlushTracker};
use folio_pagecache::lockdep::{Held, Level};
use folio_pagecache::PageCache;

use crate::bmap::BlockRun;
use crate::data::{AllocOp, WritebackCursor};
use crate::dir::DirEntry;
use crate::error::Result;
use crate::format::group::GroupDesc;
use crate::format::inode::Inode;
use crate::format::superblock::Superblock;
use crate::fs::{Core, Geometry, OpenOptions};
use crate::inodes::InodeTable;
use crate::ops::{Caller, OpenFlags, Owner, RenameFlags, SetAttr, Stat, StatFs};
use crate::xattrs::XattrMode;
use folio_journal::{JournalStats, RecoveryReport};

/// An open ext2/3/4 filesystem. `Send + Sync`: share it between threads
/// with an `Arc`; every operation takes `&self`.
pub struct Filesystem {
    core: CoreLock,
    pub(crate) pc: Arc<PageCache>,
    pub(crate) geo: Geometry,
    /// The device, for flushes made without the core lock.
    tracker: Arc<FlushTracker>,
    /// The device as the core uses it, for lock-free writers' reads.
    pub(crate) dev: Arc<dyn BlockDevice>,
    /// In-memory inode objects and the shared free-space accounting.
    pub(crate) inodes: Arc<InodeTable>,
}

/// The core lock: a mutex (the futex-based std one: it spins briefly and
/// sleeps, without the `sched_yield` rounds that cost a 2-core machine
/// dearly under contention) that can be handed to a waiting thread.
struct CoreLock {
    core: Mutex<Core>,
    /// Threads blocked in `lock`.
    waiting: AtomicUsize,
    /// Acquisitions so far (a yielding holder watches it to see that a
    /// waiter got in).
    taken: AtomicU64,
}

impl CoreLock {
    fn new(core: Core) -> Self {
        CoreLock {
            core: Mutex::new(core),
            waiting: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        // A panic under the lock is handled by `CoreGuard`'s drop, which
        // turns the filesystem read-only first: the state itself is safe
        // to read.
        let g = self.core.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.taken.fetch_add(1, Ordering::AcqRel);
        g
    }
}

/// The core lock, held: the filesystem's metadata state, and the lock
/// order's record of holding it.
pub(crate) struct CoreGuard<'a> {
    lock: &'a CoreLock,
    /// Always `Some` except inside `yield_now` and `unlocked`.
    core: Option<MutexGuard<'a, Core>>,
    order: Option<Held>,
}

impl Deref for CoreGuard<'_> {
    type Target = Core;
    fn deref(&self) -> &Core {
        self.core.as_ref().expect("the core lock is held")
    }
}

impl DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        self.core.as_mut().expect("the core lock is held")
    }
}

impl CoreGuard<'_> {
    /// Hand the core lock to a thread waiting for it, if any, and take it
    /// back after it: long work — writeback of many folios — calls this
    /// between its steps, where no journal handle is open and the core is
    /// consistent, so that a `stat` waits for one step, not for the whole
    /// fsync. (Unlocking alone is not enough: the unlocking thread would
    /// usually take the lock again before the woken waiter runs.)
    fn yield_now(&mut self) {
        if self.lock.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        let seen = self.lock.taken.load(Ordering::Acquire);
        self.core = None;
        // Bounded: a waiter that is already blocked gets the lock at once;
        // the bound only covers one that has not reached the mutex yet.
        for _ in 0..100 {
            if self.lock.taken.load(Ordering::Acquire) != seen
                || self.lock.waiting.load(Ordering::Acquire) == 0
            {
                break;
            }
            std::thread::yield_now();
        }
        self.core = Some(self.lock.lock());
    }
}

impl CoreGuard<'_> {
    /// Run `f` with the core lock released (and out of the lock order's
    /// record), then take it again: for writes of data whose metadata is
    /// in place (deferred writeback), which need no lock the core's
    /// holders could be waiting with.
    fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.core = None;
        self.order = None;
        let r = f();
        self.order = Some(Held::take(Level::Core, 0));
        self.core = Some(self.lock.lock());
        r
    }

    /// Write back one deferred batch (`Core::writeback_batch_deferred`):
    /// its data goes to the device with the core lock released.
    /// A batch with nothing left to write (its pieces needed the core)
    /// still yields the lock between batches (see `yield_now`).
    fn perform(&mut self, batch: crate::data::DeferredWriteback) -> Result<u64> {
        if batch.pending_bytes() == 0 {
            let r = batch.perform();
            self.yield_now();
            return r;
        }
        self.unlocked(|| batch.perform())
    }
}

impl Drop for CoreGuard<'_> {
    /// An operation that panicked while holding the core lock may have
    /// left metadata half changed: the filesystem then turns read-only (as
    /// ext4's errors=remount-ro) and is never committed again, so the
    /// image keeps what the journal last committed.
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(core) = self.core.as_mut() {
                core.poisoned();
            }
        }
    }
}

/// Forward `&self` methods to the core under its lock.
macro_rules! forward {
    ($( $(#[$m:meta])* fn $name:ident $(<$lt:lifetime>)? (&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        $(
            $(#[$m])*
            pub fn $name $(<$lt>)? (&self $(, $arg: $ty)*) -> $ret {
                self.core().$name($($arg),*)
            }
        )*
    };
}

/// Forward `&self` methods whose first argument is an inode to the core,
/// under that inode's lock and then the core lock.
macro_rules! forward_locked {
    ($( $(#[$m:meta])* fn $name:ident (&self, $ino:ident : u32 $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        $(
            $(#[$m])*
            pub fn $name(&self, $ino: u32 $(, $arg: $ty)*) -> $ret {
                self.locked($ino, || self.core().$name($ino $(, $arg)*))
            }
        )*
    };
}

impl Filesystem {
    fn wrap(core: Core) -> Filesystem {
        Filesystem {
            pc: Arc::clone(&core.pc),
            geo: core.geo.clone(),
            tracker: Arc::clone(&core.tracker),
            dev: Arc::clone(core.dev()),
            inodes: Arc::clone(&core.inodes),
            core: CoreLock::new(core),
        }
    }

    /// Open the image at `path`, locking it while open (see
    /// [`OpenOptions::lock`]); a busy image is [`crate::Error::Locked`].
    pub fn open_path(path: &Path, opts: OpenOptions) -> Result<Filesystem> {
        Core::open_path(path, opts).map(Filesystem::wrap)
    }

    /// Open a filesystem on `dev`. A read-write open of an image whose
    /// journal needs recovery replays it first (and processes orphans); a
    /// read-only open replays it into memory only (a copy-on-write view of
    /// the device), unless [`OpenOptions::norecovery`], in which case it
    /// leaves it and says so in [`Self::read_only_reason`].
    pub fn open(dev: Arc<dyn BlockDevice>, opts: OpenOptions) -> Result<Filesystem> {
        Core::open(dev, opts).map(Filesystem::wrap)
    }

    /// Take the core lock.
    pub(crate) fn core(&self) -> CoreGuard<'_> {
        let order = Held::take(Level::Core, 0);
        let mut core = self.core.lock();
        // A commit the commit thread has written: finish it now (its
        // failure has aborted the journal, which later calls report).
        let _ = core.finish_if_written();
        CoreGuard {
            lock: &self.core,
            core: Some(core),
            order: Some(order),
        }
    }

    /// Sync and close cleanly (needs_recovery cleared). Dropping a
    /// writable filesystem does the same, but can only log an error (as
    /// `BufWriter` does); `close` is the way to see it.
    pub fn close(self) -> Result<()> {
        let mut core = self.into_core();
        core.close_inner()
    }

    /// Drop without writing anything more, as a process killed at this
    /// point would: what was committed stays in the journal for the next
    /// open to replay. For crash tests and for giving up after an error.
    pub fn abandon(self) {
        let mut core = self.into_core();
        core.wait_commit_write();
        core.closed = true;
    }

    fn into_core(self) -> Core {
        self.core
            .core
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Write back dirty data until at most `target` bytes are dirty, a
    /// batch at a time, each batch's data written with the core lock
    /// released.
    fn writeback_to(&self, c: &mut CoreGuard<'_>, target: u64) -> Result<u64> {
        let mut cur = WritebackCursor::new(&self.pc);
        let mut n = 0;
        while let Some(b) = c.writeback_step_deferred(&mut cur, target)? {
            n += c.perform(b)?;
        }
        Ok(n)
    }

    /// Write back the dirty data of `ino` in bytes `[from, end)`, a batch
    /// at a time, each batch's data written with the core lock released.
    fn writeback_file(&self, c: &mut CoreGuard<'_>, ino: u32, end: u64) -> Result<u64> {
        let mut n = 0;
        let mut from = 0;
        while let Some(b) = c.writeback_batch_deferred(ino, &mut from, end)? {
            n += c.perform(b)?;
        }
        Ok(n)
    }

    /// Finish an fsync, sync or periodic commit whose step under the core
    /// lock is `step` (`Core::commit_step`, `Core::fsync_step`): a commit
    /// it starts is written with the core lock released, so that other
    /// requests — new handles on the next transaction among them — run
    /// during its device writes and flushes; a transaction already
    /// committing is waited for without the lock too.
    fn make_durable(
        &self,
        c: &mut CoreGuard<'_>,
        mut step: impl FnMut(&mut Core) -> Result<crate::commit::Durable>,
    ) -> Result<()> {
        use crate::commit::Durable;
        loop {
            match step(c)? {
                Durable::Done => return Ok(()),
                Durable::Commit(p) => {
                    let w = c.unlocked(|| p.write());
                    return c.commit_written(w);
                }
                Durable::Wait(slot) => {
                    // Its outcome is the finisher's to act on.
                    let _ = c.unlocked(|| slot.wait());
                    c.finish_committing()?;
                }
                Durable::Flush => {
                    let dev = Arc::clone(c.dev());
                    return Ok(c.unlocked(|| dev.flush())?);
                }
            }
        }
    }

    /// After writeback of `written` bytes: flush the device without the
    /// core lock when that was a lot of data, so that it reaches stable
    /// storage while other requests run and the commit that follows under
    /// the lock finds little left to flush. A little data is left to the
    /// commit's own flush (one flush fewer per small fsync).
    fn flush_data(&self, written: u64) -> Result<()> {
        const FLUSH_ALONE_BYTES: u64 = 1 << 20;
        if written >= FLUSH_ALONE_BYTES && self.tracker.unflushed() {
            self.tracker.flush()?;
        }
        Ok(())
    }

    /// Read from file `ino` at `offset` through the page cache; returns
    /// the bytes read (short at end of file). Data the cache holds is
    /// copied without the core lock, so such a read never waits for
    /// another file's writeback or fsync; anything else (a miss, the end
    /// of the file, an inode the core has not seen) goes through the
    /// core.
    pub fn read(&self, ino: u32, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if let Some(n) = self.read_cached(ino, offset, buf) {
            return Ok(n);
        }
        if let Some(n) = self.read_lockless(ino, offset, buf) {
            return Ok(n);
        }
        self.core().read(ino, offset, buf)
    }

    /// The lock-free part of `read`: `None` unless every byte asked for
    /// (up to the size) is uptodate in the cache.
    fn read_cached(&self, ino: u32, offset: u64, buf: &mut [u8]) -> Option<usize> {
        let info = self.inodes.get(ino)?;
        if !info.regular() {
            return None;
        }
        let size = info.size();
        self.pc
            .existing(u64::from(ino))?
            .read_cached(size, offset, buf)
    }

    /// Write `data` to file `ino` at `offset` through the page cache
    /// (delayed allocation). Returns the bytes written.
    pub fn write(&self, ino: u32, offset: u64, data: &[u8]) -> Result<usize> {
        let mut at = 0usize;
        self.write_with(ino, offset, data.len(), &mut |buf: &mut [u8]| {
            let n = buf.len().min(data.len() - at);
            buf[..n].copy_from_slice(&data[at..at + n]);
            at += n;
            Ok(n)
        })
    }

    /// fsync(2)/fdatasync(2) of `ino`: its data and the metadata that
    /// reaches it are durable on return. The file's dirty data (as far as
    /// it reached when the call started) is written back in batches that
    /// yield the core lock, and flushed without it; then the running
    /// transaction commits if it holds a change of the inode that
    /// `datasync` needs (see the core's `fsync`).
    pub fn fsync(&self, ino: u32, datasync: bool) -> Result<()> {
        let mut written = 0;
        {
            let mut c = self.core();
            if let Some(why) = &c.aborted {
                return Err(crate::Error::ReadOnly(why.clone()));
            }
            if c.read_only.is_none() && c.journal.is_some() {
                if let Some(m) = self.pc.existing(u64::from(ino)) {
                    let fsz = m.folio_size() as u64;
                    let end = m
                        .last_dirty_index()
                        .map_or(0, |i| (i + 1).saturating_mul(fsz));
                    written += self.writeback_file(&mut c, ino, end)?;
                }
            }
        }
        self.flush_data(written)?;
        let mut c = self.core();
        match c.fsync_begin(ino, datasync)? {
            Some(ds) => self.make_durable(&mut c, |core| core.fsync_step(ino, ds)),
            None => Ok(()),
        }
    }

    /// Make everything written so far durable: file data (written back
    /// in batches that yield the core lock, then flushed without it),
    /// then metadata (through the journal when there is one).
    pub fn sync(&self) -> Result<()> {
        let written;
        {
            let mut c = self.core();
            if let Some(why) = &c.aborted {
                // What was not committed before the abort never will be.
                return Err(crate::Error::ReadOnly(why.clone()));
            }
            if c.read_only.is_some() {
                return Ok(());
            }
            written = self.writeback_to(&mut c, 0)?;
        }
        self.flush_data(written)?;
        let mut c = self.core();
        if c.sync_begin()? {
            self.make_durable(&mut c, Core::commit_step)?;
        }
        Ok(())
    }

    /// The periodic commit of a long-running server: ext4's `commit=`
    /// interval together with the kernel's `dirty_expire_centisecs`.
    /// Files whose data has been dirty for at least `expire` are written
    /// back whole (in batches that yield the core lock, flushed without
    /// it) and their sizes put into their inodes; then the running
    /// transaction commits. Younger dirty data stays cached, as the
    /// kernel's delayed allocation keeps it: what this commit makes
    /// durable is consistent without that data: its blocks are not
    /// mapped yet, and lock-free writers' sizes are not put into inode
    /// blocks here (a size the core writes for another reason may cover
    /// such data; after a crash that range reads as zeros, never as stale
    /// blocks). `sync` and `fsync` write everything.
    pub fn commit_expired(&self, expire: std::time::Duration) -> Result<()> {
        let mut written = 0;
        {
            let mut c = self.core();
            if let Some(why) = &c.aborted {
                return Err(crate::Error::ReadOnly(why.clone()));
            }
            if c.read_only.is_some() {
                return Ok(());
            }
            for ino in self.pc.expired_inodes(expire) {
                let Ok(ino) = u32::try_from(ino) else {
                    continue;
                };
                let Some(m) = self.pc.existing(u64::from(ino)) else {
                    continue;
                };
                written += self.writeback_file(&mut c, ino, u64::MAX)?;
                m.restart_dirty_clock();
                c.flush_ahead(Some(ino))?;
            }
        }
        self.flush_data(written)?;
        let mut c = self.core();
        if c.read_only.is_none() && c.commit_begin_unjournalled()? {
            self.make_durable(&mut c, Core::commit_step)?;
        }
        Ok(())
    }

    /// Background writeback: write back, yielding the core lock between
    /// batches, until dirty data is below the background level. The FUSE
    /// server calls it from its flusher thread. Returns bytes written.
    pub fn writeback_background(&self) -> Result<u64> {
        if !self.pc.over_background() {
            return Ok(0);
        }
        let mut c = self.core();
        self.writeback_to(&mut c, self.pc.background_target())
    }

    /// Inodes whose attributes (today: `st_blocks`, when writeback
    /// allocated extent-tree or indirect blocks with the data) changed
    /// since the last call without a request on them, for a server whose
    /// clients cache attributes (the mount tells the kernel to forget
    /// them). Recording starts at the first call.
    pub fn take_attr_changes(&self) -> Vec<u32> {
        self.inodes.take_changed()
    }

    /// Bytes written since open without the core lock (buffered writes to
    /// open files, overwrites of dirty cached data): how much of the
    /// write traffic the concurrent paths carried.
    pub fn lock_free_write_bytes(&self) -> u64 {
        self.inodes.lock_free_bytes()
    }

    /// Bytes read since open, without the core lock, from open files whose
    /// data the cache did not hold.
    pub fn lock_free_read_bytes(&self) -> u64 {
        self.inodes.lock_free_fills()
    }

    /// The page cache holding this filesystem's file data.
    pub fn page_cache(&self) -> &Arc<PageCache> {
        &self.pc
    }
    /// The image's geometry (fixed while open).
    pub fn geometry_info(&self) -> &Geometry {
        &self.geo
    }
    pub fn block_size(&self) -> u32 {
        self.geo.block_size
    }
    /// A copy of the superblock as it is in memory now.
    pub fn superblock(&self) -> Superblock {
        self.core().sb.clone()
    }
    /// A copy of group `g`'s descriptor.
    pub fn group_desc(&self, g: u32) -> Option<GroupDesc> {
        self.core().groups.get(g as usize).cloned()
    }
    /// Why the filesystem is read-only, if it is.
    pub fn read_only_reason(&self) -> Option<String> {
        self.core().read_only.clone()
    }
    /// What the journal recovery at open did, if it ran.
    pub fn recovery_report(&self) -> Option<RecoveryReport> {
        self.core().last_recovery.clone()
    }
    /// Write `len` bytes at `offset`, taking the data from `src`, which
    /// fills each slice it is given and returns how much it filled. A
    /// source that fails midway (fewer bytes, or an error) gives a short
    /// write: exactly the bytes copied are kept, the space reserved for the
    /// rest is given back, and nothing else becomes readable. With nothing
    /// copied the source's error (EFAULT for a short source) is returned.
    pub fn write_with(
        &self,
        ino: u32,
        offset: u64,
        len: usize,
        src: &mut dyn FnMut(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<usize> {
        let obj = self.inodes.obj(ino);
        let _inode = obj.lock();
        let (mut done, stopped) = self.write_cached(&obj, ino, offset, len, src)?;
        if stopped || done == len {
            return Ok(done);
        }
        match self.write_lockless(&obj, ino, offset + done as u64, len - done, src) {
            Ok((n, stopped)) => {
                done += n;
                if stopped || done == len {
                    self.throttle()?;
                    return Ok(done);
                }
            }
            Err(_) if done > 0 => return Ok(done),
            Err(e) => return Err(e),
        }
        let mut c = self.core();
        let r = c.write_with(ino, offset + done as u64, len - done, src);
        // Throttling: a writer over the dirty limit writes back (in
        // handles of its own, yielding between batches).
        let b = if self.pc.over_dirty_limit() {
            self.writeback_to(&mut c, self.pc.background_target())
        } else {
            Ok(0)
        };
        let n = match r {
            Ok(n) => n + done,
            // What was copied lock-free stays: a short write.
            Err(_) if done > 0 => done,
            Err(e) => return Err(e),
        };
        b?;
        Ok(n)
    }

    /// A writer that left dirty data behind: write back (in handles of
    /// its own, yielding between batches) while over the dirty limit, and
    /// reclaim clean folios while over the budget.
    fn throttle(&self) -> Result<()> {
        if self.pc.over_dirty_limit() {
            let mut c = self.core();
            self.writeback_to(&mut c, self.pc.background_target())?;
        }
        if self.pc.over_budget() {
            self.pc.balance();
        }
        Ok(())
    }

    /// Run `f` holding `ino`'s inode lock (exclusively): for everything
    /// that changes a file's size, times, mode or block map from above.
    fn locked<R>(&self, ino: u32, f: impl FnOnce() -> R) -> R {
        let obj = self.inodes.obj(ino);
        let _inode = obj.lock();
        f()
    }

    /// open(2) relative to a directory: O_CREAT, O_EXCL, O_TRUNC. The
    /// truncation of an existing file runs under its inode lock.
    pub fn openat(
        &self,
        parent: u32,
        name: &[u8],
        flags: OpenFlags,
        perm: u16,
        owner: Owner,
    ) -> Result<u32> {
        let plain = OpenFlags {
            truncate: false,
            ..flags
        };
        let ino = self.core().openat(parent, name, plain, perm, owner)?;
        if flags.truncate {
            self.locked(ino, || self.core().truncate_opened(ino))?;
        }
        Ok(ino)
    }

    /// Clear setuid/setgid (and file capabilities) before a write by
    /// `caller`; whether the mode changed. A file the core has already
    /// found with nothing to drop (and whose mode bits and attributes have
    /// not changed since) is answered without the core lock, so a write
    /// through the mount can stay lock-free.
    pub fn drop_privs_for_write(&self, ino: u32, caller: Caller) -> Result<bool> {
        if self.inodes.get(ino).is_some_and(|i| i.plain()) {
            return Ok(false);
        }
        self.locked(ino, || self.core().drop_privs_for_write(ino, caller))
    }

    /// The lock-free part of `write_with`: overwrite, folio by folio,
    /// blocks that are already dirty in the cache (so they hold a
    /// reservation or a mapping and nothing needs allocating), inside the
    /// file's size, while the file's mtime is this millisecond's (so the
    /// inode needs no change: the kernel's `file_update_time` also leaves
    /// it alone within one clock tick). Stops at the first folio that does
    /// not qualify. Returns the bytes written (a prefix of the request)
    /// and whether the source stopped short; the source's error only if
    /// nothing was written.
    ///
    /// Safe against the core's changes to the same file without the core
    /// lock: each folio is written under its lock with its dirty bits
    /// checked there (writeback cleans them under the same lock, and
    /// truncation and hole punching remove or clean folios under it), and
    /// the size is checked again under the lock (a truncation lowers it
    /// before cutting the cache).
    fn write_cached(
        &self,
        info: &crate::inodes::InodeInfo,
        ino: u32,
        offset: u64,
        len: usize,
        src: &mut dyn FnMut(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<(usize, bool)> {
        let not_here = Ok((0, false));
        if len == 0 || !self.inodes.writable() {
            return not_here;
        }
        if !info.writable_lock_free() {
            return not_here;
        }
        let Some(end) = offset.checked_add(len as u64) else {
            return not_here;
        };
        let now = crate::inodes::millis(crate::format::Timespec::now());
        if end > info.size() || info.mtime_ms() != now {
            return not_here;
        }
        let Some(m) = self.pc.existing(u64::from(ino)) else {
            return not_here;
        };
        let fsz = m.folio_size() as u64;
        let bs = m.block_size();
        let mut done = 0usize;
        let mut stopped = false;
        while done < len {
            let p = offset + done as u64;
            let Some(f) = m.find(p / fsz) else { break };
            let Ok(g) = m.lock_folio(&f) else { break };
            if info.size() < end {
                break;
            }
            let a = (p - g.pos()) as usize;
            let b = (fsz as usize).min(a + (len - done));
            let (first, last) = ((a / bs) as u32, ((b - 1) / bs) as u32);
            let need = folio_pagecache::mask(first, last - first + 1);
            let mut st = g.state();
            if st.dirty_mask() & need != need {
                break;
            }
            match src(&mut st.data_mut()[a..b]) {
                Ok(n) if n >= b - a => done += b - a,
                Ok(n) => {
                    done += n;
                    stopped = true;
                    break;
                }
                Err(e) if done == 0 => return Err(e.into()),
                Err(_) => {
                    stopped = true;
                    break;
                }
            }
        }
        if stopped && done == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT).into());
        }
        self.inodes.add_written(done as u64);
        Ok((done, stopped))
    }

    forward_locked! {
        fn link(&self, ino: u32, new_parent: u32, new_name: &[u8]) -> Result<()>;
        /// Drop an open reference; the last one frees an unlinked inode.
        fn close_ref(&self, ino: u32) -> Result<()>;
        fn setattr(&self, ino: u32, attr: &SetAttr) -> Result<Stat>;
        fn set_xattr(&self, ino: u32, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()>;
        fn remove_xattr(&self, ino: u32, name: &[u8]) -> Result<()>;
        /// chattr: set the inode's flags (FS_IOC_SETFLAGS; see the core's).
        fn set_flags(&self, ino: u32, flags: u32) -> Result<()>;
        /// `set_xattr` by a caller (an access ACL clears setgid for a
        /// caller outside the file's group).
        fn set_xattr_by(&self, ino: u32, name: &[u8], value: &[u8], mode: XattrMode, caller: Option<Caller>) -> Result<()>;
        /// O_DIRECT write: straight to the device, blocks allocated now.
        fn write_direct(&self, ino: u32, offset: u64, data: &[u8]) -> Result<usize>;
        /// Allocate a file fully and pin its block map: (logical, physical, blocks) runs.
        fn pin_mapping(&self, ino: u32) -> Result<Vec<(u64, u64, u64)>>;
        fn unpin_mapping(&self, ino: u32) -> Result<()>;
        /// fallocate(2) with Linux's mode flags.
        fn fallocate(&self, ino: u32, mode: u32, offset: u64, len: u64) -> Result<()>;
        /// The allocation interface: reserve, allocate or deallocate blocks.
        fn allocate_interval(&self, ino: u32, op: AllocOp, lblk: u64, n: u64) -> Result<()>;
        /// FS_IOC_ENABLE_VERITY: Merkle tree, descriptor and flag in one
        /// transaction; the file digest (see `verity.rs`).
        fn enable_verity(&self, ino: u32) -> Result<[u8; 32]>;
    }

    forward! {
        /// Metadata buffer cache (hits, misses) since open.
        fn cache_stats(&self) -> (u64, u64);
        /// Journal counters, on journalled images.
        fn journal_stats(&self) -> Option<JournalStats>;
        fn is_journalled(&self) -> bool;
        /// Blocks the running transaction has dirtied so far.
        fn txn_dirty_blocks(&self) -> usize;
        /// (handles run, handles that used more blocks than their credits).
        fn handle_stats(&self) -> (u64, u64);
        /// Read inode `ino` as it is on disk (through the journal).
        fn read_inode(&self, ino: u32) -> Result<Inode>;
        /// Write an inode back (in a handle of its own when journalled).
        fn write_inode(&self, inode: &mut Inode) -> Result<()>;
        /// Look `name` up in directory `parent`.
        fn lookup(&self, parent: u32, name: &[u8]) -> Result<u32>;
        /// Resolve an absolute path, not following a final symlink.
        fn resolve(&self, path: &str) -> Result<u32>;
        /// Resolve an absolute path, following symlinks.
        fn resolve_follow(&self, path: &str) -> Result<u32>;
        /// The parent directory of `path` and the final name.
        fn resolve_parent<'a>(&self, path: &'a str) -> Result<(u32, &'a str)>;
        fn stat(&self, ino: u32) -> Result<Stat>;
        /// The inode a file handle names, or `Error::Stale` (see the core's).
        fn stat_by_handle(&self, ino: u32, generation: Option<u32>) -> Result<Stat>;
        fn mknod(&self, parent: u32, name: &[u8], mode: u16, rdev: (u32, u32), owner: Owner) -> Result<u32>;
        fn create(&self, parent: u32, name: &[u8], perm: u16, owner: Owner) -> Result<u32>;
        fn mkdir(&self, parent: u32, name: &[u8], perm: u16, owner: Owner) -> Result<u32>;
        fn symlink(&self, parent: u32, name: &[u8], target: &[u8], owner: Owner) -> Result<u32>;
        fn readlink(&self, ino: u32) -> Result<Vec<u8>>;
        /// lsattr: the inode's flags (FS_IOC_GETFLAGS).
        fn get_flags(&self, ino: u32) -> Result<u32>;
        /// Count an open reference (an unlinked inode lives until the last).
        fn open_ref(&self, ino: u32) -> ();
        fn unlink(&self, parent: u32, name: &[u8]) -> Result<()>;
        fn rmdir(&self, parent: u32, name: &[u8]) -> Result<()>;
        fn rename(&self, parent: u32, name: &[u8], new_parent: u32, new_name: &[u8], flags: RenameFlags) -> Result<()>;
        fn statfs(&self) -> StatFs;
        fn get_xattr(&self, ino: u32, name: &[u8]) -> Result<Vec<u8>>;
        fn list_xattr(&self, ino: u32) -> Result<Vec<Vec<u8>>>;
        /// O_DIRECT read.
        fn read_direct(&self, ino: u32, offset: u64, buf: &mut [u8]) -> Result<usize>;
        /// lseek(2) SEEK_DATA (`data`) or SEEK_HOLE.
        fn seek_data_hole(&self, ino: u32, offset: u64, data: bool) -> Result<u64>;
        /// Every mapped run of the file.
        fn block_runs(&self, ino: u32) -> Result<Vec<BlockRun>>;
        /// FIEMAP: runs with flags (`sync` writes dirty data back first).
        fn fiemap(&self, ino: u32, sync: bool) -> Result<Vec<BlockRun>>;
        /// The blocks the file's map itself takes (tree or indirect blocks).
        fn mapping_blocks(&self, ino: u32) -> Result<Vec<u64>>;
        /// Depth of the file's extent tree (None for block-mapped files).
        fn extent_depth(&self, ino: u32) -> Result<Option<u16>>;
        /// Drop clean cached data; returns the bytes freed.
        fn drop_caches(&self) -> u64;
        fn read_dir(&self, ino: u32) -> Result<Vec<DirEntry>>;
        /// FS_IOC_MEASURE_VERITY: a verity file's digest (ENODATA if none).
        fn verity_digest(&self, ino: u32) -> Result<[u8; 32]>;
        /// Compare the free counts with the bitmaps; the differences found
        /// (`progress` is told of each block group).
        fn check_counts(&self, progress: Option<&crate::Progress>) -> Result<Vec<String>>;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn filesystem_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<super::Filesystem>();
    }
}
