//! A write-back cache of fixed-size metadata blocks.
//!
//! Invariants:
//! - an entry's bytes are what the device holds, or (if `dirty`) what it
//!   will hold after the next [`BufferCache::flush_dirty`];
//! - a failed write-back leaves the entry dirty and reports the error, so no
//!   metadata change is dropped silently;
//! - the cache holds at most `capacity` clean entries beyond the dirty ones;
//!   when dirty entries alone exceed the capacity they are written back.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;

use crate::BlockDevice;

struct Entry {
    data: Box<[u8]>,
    /// Changed by the running transaction (or, without a journal, simply
    /// not written back yet).
    dirty: bool,
    /// A committed version is not yet in its home location (journal
    /// checkpoint pending). If `dirty` too, that version is not these
    /// bytes any more: the journal's log holds it.
    committed: bool,
    referenced: bool,
    /// The user checked these bytes (a checksum, say) since they came from
    /// the device, or wrote them itself; see [`BufferCache::set_verified`].
    verified: bool,
    /// The cache's change counter when these bytes were last changed
    /// (see [`BufferCache::dirty_blocks_versioned`]).
    version: u64,
}

/// Where a checkpoint finds the committed version of a block.
#[derive(Debug)]
pub enum CheckpointSource<'a> {
    /// These bytes, which the caller must write home.
    Cache(&'a [u8]),
    /// Only in the journal's log: the cached bytes changed since.
    Log,
    /// Home already (written back early, or never changed since it was).
    Home,
}

/// Write-back cache of `block_size`-byte blocks of one device.
pub struct BufferCache {
    dev: Arc<dyn BlockDevice>,
    block_size: usize,
    capacity: usize,
    map: HashMap<u64, Entry>,
    /// Clock order for eviction (block numbers; may hold stale numbers).
    clock: VecDeque<u64>,
    hits: u64,
    misses: u64,
    /// Never write a dirty block back on its own (a journal decides when
    /// metadata may reach its home location): the cache grows instead.
    no_steal: bool,
    /// Number of dirty entries.
    ndirty: usize,
    /// Changes so far (each `modify` or `write` of a block takes the next).
    changes: u64,
}

impl BufferCache {
    /// A cache of at most about `capacity` blocks of `block_size` bytes.
    pub fn new(dev: Arc<dyn BlockDevice>, block_size: usize, capacity: usize) -> Self {
        assert!(block_size.is_power_of_two() && block_size >= 512);
        BufferCache {
            dev,
            block_size,
            capacity: capacity.max(16),
            map: HashMap::new(),
            clock: VecDeque::new(),
            hits: 0,
            misses: 0,
            no_steal: false,
            ndirty: 0,
            changes: 0,
        }
    }

    /// The device below the cache.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn offset(&self, block: u64) -> io::Result<u64> {
        block
            .checked_mul(self.block_size as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "block number overflows"))
    }

    fn load(&mut self, block: u64) -> io::Result<()> {
        if let Some(e) = self.map.get_mut(&block) {
            e.referenced = true;
            self.hits += 1;
            return Ok(());
        }
        self.misses += 1;
        let mut data = vec![0u8; self.block_size].into_boxed_slice();
        self.dev.read_at(self.offset(block)?, &mut data)?;
        self.insert(block, data, false)
    }

    fn insert(&mut self, block: u64, data: Box<[u8]>, dirty: bool) -> io::Result<()> {
        self.evict_if_needed()?;
        self.ndirty += usize::from(dirty);
        self.map.insert(
            block,
            Entry {
                data,
                dirty,
                committed: false,
                referenced: false,
                // Bytes the user wrote need no check; bytes from the
                // device do.
                verified: dirty,
                version: self.changes,
            },
        );
        self.clock.push_back(block);
        Ok(())
    }

    fn evict_if_needed(&mut self) -> io::Result<()> {
        if self.map.len() < self.capacity {
            return Ok(());
        }
        let dirty = self.ndirty;
        if dirty * 2 >= self.capacity && !self.no_steal {
            self.flush_dirty()?;
        }
        // Second-chance clock over at most two sweeps.
        let mut budget = self.clock.len() * 2;
        while self.map.len() >= self.capacity && budget > 0 {
            budget -= 1;
            let Some(b) = self.clock.pop_front() else {
                break;
            };
            match self.map.get_mut(&b) {
                None => {}
                Some(e) if e.dirty || e.referenced => {
                    e.referenced = false;
                    self.clock.push_back(b);
                }
                Some(e) => {
                    if e.committed {
                        // Committed: it may go home now (a checkpoint
                        // write ahead of the checkpoint).
                        let off = b * self.block_size as u64;
                        if let Err(err) = self.dev.write_at(off, &e.data) {
                            self.clock.push_back(b);
                            return Err(err);
                        }
                    }
                    self.map.remove(&b);
                }
            }
        }
        Ok(())
    }

    /// The bytes of `block`, read from the device if not cached.
    pub fn read(&mut self, block: u64) -> io::Result<&[u8]> {
        self.load(block)?;
        Ok(&self.map[&block].data)
    }

    /// The bytes of `block` and whether they are verified: checked by the
    /// user since they were read from the device ([`Self::set_verified`]),
    /// or written by the user. Lets a checksum be checked once per read
    /// from the device rather than on every access, as Linux's
    /// buffer_verified does.
    pub fn read_verified(&mut self, block: u64) -> io::Result<(&[u8], bool)> {
        self.load(block)?;
        let e = &self.map[&block];
        Ok((&e.data, e.verified))
    }

    /// The bytes of `block` if it is cached (no device read).
    pub fn peek(&self, block: u64) -> Option<&[u8]> {
        self.map.get(&block).map(|e| &e.data[..])
    }

    /// Record that the cached bytes of `block` passed the user's checks.
    pub fn set_verified(&mut self, block: u64) {
        if let Some(e) = self.map.get_mut(&block) {
            e.verified = true;
        }
    }

    /// Mutable bytes of `block` (read first), marked dirty.
    pub fn modify(&mut self, block: u64) -> io::Result<&mut [u8]> {
        if self.dev.is_read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device is open read-only",
            ));
        }
        self.load(block)?;
        self.changes += 1;
        let e = self.map.get_mut(&block).expect("block was just loaded");
        self.ndirty += usize::from(!e.dirty);
        e.dirty = true;
        e.verified = true;
        e.version = self.changes;
        Ok(&mut e.data)
    }

    /// Replace the whole of `block` without reading it first, marked dirty.
    pub fn write(&mut self, block: u64, data: &[u8]) -> io::Result<()> {
        assert_eq!(data.len(), self.block_size, "whole blocks only");
        if self.dev.is_read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device is open read-only",
            ));
        }
        self.changes += 1;
        if let Some(e) = self.map.get_mut(&block) {
            e.data.copy_from_slice(data);
            self.ndirty += usize::from(!e.dirty);
            e.dirty = true;
            e.verified = true;
            e.version = self.changes;
            return Ok(());
        }
        self.insert(block, data.into(), true)
    }

    /// Drop `block` from the cache, discarding unwritten changes: used when
    /// a metadata block is freed, so that a stale copy can never be written
    /// over data that later lands in the same block.
    pub fn forget(&mut self, block: u64) {
        if self.map.remove(&block).is_some_and(|e| e.dirty) {
            self.ndirty -= 1;
        }
    }

    /// Write every dirty block back to the device (ascending order) without
    /// flushing the device.
    pub fn flush_dirty(&mut self) -> io::Result<()> {
        let mut dirty: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&b, _)| b)
            .collect();
        dirty.sort_unstable();
        for b in dirty {
            let off = self.offset(b)?;
            let e = self.map.get_mut(&b).expect("listed above");
            self.dev.write_at(off, &e.data)?;
            e.dirty = false;
            self.ndirty -= 1;
        }
        Ok(())
    }

    /// Write back every dirty block, then flush the device.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush_dirty()?;
        self.dev.flush()
    }

    /// Keep dirty blocks until told (see the field).
    pub fn set_no_steal(&mut self, on: bool) {
        self.no_steal = on;
    }

    /// Copies of every dirty block, in ascending block order.
    pub fn dirty_blocks(&self) -> Vec<(u64, Vec<u8>)> {
        let mut v: Vec<(u64, Vec<u8>)> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&b, e)| (b, e.data.to_vec()))
            .collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    }

    /// Copies of every dirty block with the version of its bytes, in
    /// ascending block order: a transaction about to commit while the
    /// next one may change the same blocks ([`Self::mark_committed_versions`]).
    pub fn dirty_blocks_versioned(&self) -> Vec<(u64, Vec<u8>, u64)> {
        let mut v: Vec<(u64, Vec<u8>, u64)> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(&b, e)| (b, e.data.to_vec(), e.version))
            .collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    }

    /// A transaction of the blocks `done` (block, version) committed:
    /// each block still at that version becomes committed; one changed
    /// since stays dirty (the next transaction holds it; the committed
    /// version is in the journal's log, see [`Self::checkpoint_copy`]).
    pub fn mark_committed_versions(&mut self, done: &[(u64, u64)]) {
        for &(b, v) in done {
            if let Some(e) = self.map.get_mut(&b) {
                if e.dirty && e.version == v {
                    e.dirty = false;
                    e.committed = true;
                    self.ndirty -= 1;
                }
            }
        }
    }

    /// Mark every block clean: the caller wrote them all to the device.
    pub fn mark_clean(&mut self) {
        for e in self.map.values_mut() {
            e.dirty = false;
            e.committed = false;
        }
        self.ndirty = 0;
    }

    /// The running transaction committed: every dirty block becomes
    /// committed (free to go home; see [`BufferCache::checkpoint_copy`]).
    pub fn mark_committed(&mut self) {
        for e in self.map.values_mut() {
            if e.dirty {
                e.dirty = false;
                e.committed = true;
            }
        }
        self.ndirty = 0;
    }

    /// Where a checkpoint of `block` finds its committed version. `Cache`
    /// marks the entry home (the caller writes it).
    pub fn checkpoint_copy(&mut self, block: u64) -> CheckpointSource<'_> {
        match self.map.get_mut(&block) {
            Some(e) if e.dirty => CheckpointSource::Log,
            Some(e) if e.committed => {
                e.committed = false;
                CheckpointSource::Cache(&e.data)
            }
            _ => CheckpointSource::Home,
        }
    }

    /// Capacity in blocks.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of dirty blocks.
    pub fn dirty_count(&self) -> usize {
        self.ndirty
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    /// A commit of a snapshot marks committed only the blocks that were
    /// not changed again after it; those stay dirty for the next one, and
    /// a checkpoint finds their committed version in the log.
    #[test]
    fn blocks_changed_after_a_snapshot_stay_dirty() {
        let dev = MemDevice::new(1024 * 64);
        let mut c = BufferCache::new(Arc::new(dev), 1024, 32);
        c.set_no_steal(true);
        for b in 1..4u64 {
            c.modify(b).unwrap()[0] = 1;
        }
        let snap = c.dirty_blocks_versioned();
        assert_eq!(snap.len(), 3);
        c.modify(2).unwrap()[0] = 2;
        c.write(5, &[7u8; 1024]).unwrap();
        let done: Vec<(u64, u64)> = snap.iter().map(|(b, _, v)| (*b, *v)).collect();
        c.mark_committed_versions(&done);
        assert_eq!(c.dirty_count(), 2);
        let dirty: Vec<u64> = c.dirty_blocks().iter().map(|(b, _)| *b).collect();
        assert_eq!(dirty, vec![2, 5]);
        assert!(matches!(c.checkpoint_copy(1), CheckpointSource::Cache(_)));
        assert!(matches!(c.checkpoint_copy(2), CheckpointSource::Log));
    }

    #[test]
    fn write_back_and_eviction_keep_data() {
        let dev = MemDevice::new(1024 * 200);
        let mut c = BufferCache::new(Arc::new(dev.clone()), 1024, 16);
        for b in 0..100u64 {
            c.modify(b).unwrap()[0] = b as u8 + 1;
        }
        // Some were written back by eviction, the rest are still dirty.
        for b in 0..100u64 {
            assert_eq!(c.read(b).unwrap()[0], b as u8 + 1);
        }
        c.sync().unwrap();
        assert_eq!(c.dirty_count(), 0);
        let snap = dev.snapshot();
        for b in 0..100usize {
            assert_eq!(snap[b * 1024], b as u8 + 1);
        }
    }

    #[test]
    fn verified_holds_until_the_block_comes_from_the_device_again() {
        let dev = MemDevice::new(1024 * 200);
        let mut c = BufferCache::new(Arc::new(dev), 1024, 16);
        assert!(!c.read_verified(3).unwrap().1, "fresh from the device");
        c.set_verified(3);
        assert!(c.read_verified(3).unwrap().1);
        c.write(4, &[7u8; 1024]).unwrap();
        assert!(c.read_verified(4).unwrap().1, "our own bytes");
        c.sync().unwrap();
        // Push 3 and 4 out, then read them back from the device.
        for b in 10..60u64 {
            c.read(b).unwrap();
        }
        assert!(c.peek(3).is_none() && c.peek(4).is_none());
        assert!(!c.read_verified(3).unwrap().1);
        assert!(!c.read_verified(4).unwrap().1);
    }

    #[test]
    fn no_steal_keeps_dirty_blocks_off_the_device() {
        let dev = MemDevice::new(1024 * 200);
        let mut c = BufferCache::new(Arc::new(dev.clone()), 1024, 16);
        c.set_no_steal(true);
        for b in 0..100u64 {
            c.modify(b).unwrap()[0] = 1;
        }
        assert!(dev.snapshot().iter().all(|&x| x == 0));
        assert_eq!(c.dirty_blocks().len(), 100);
        c.sync().unwrap();
        assert_eq!(dev.snapshot()[99 * 1024], 1);
    }

    #[test]
    fn the_dirty_count_follows_every_transition() {
        let dev = MemDevice::new(1024 * 64);
        let mut c = BufferCache::new(Arc::new(dev), 1024, 16);
        c.set_no_steal(true);
        let count = |c: &BufferCache| c.map.values().filter(|e| e.dirty).count();
        for b in 0..40u64 {
            c.modify(b % 30).unwrap()[0] = 1;
            c.write(b % 7 + 30, &[2u8; 1024]).unwrap();
            let _ = c.read(b + 20).unwrap();
            assert_eq!(c.dirty_count(), count(&c));
        }
        c.forget(3);
        assert_eq!(c.dirty_count(), count(&c));
        c.mark_committed();
        assert_eq!((c.dirty_count(), count(&c)), (0, 0));
        c.modify(5).unwrap();
        c.flush_dirty().unwrap();
        assert_eq!((c.dirty_count(), count(&c)), (0, 0));
    }

    #[test]
    fn forget_drops_unwritten_changes() {
        let dev = MemDevice::new(1024 * 4);
        let mut c = BufferCache::new(Arc::new(dev.clone()), 1024, 16);
        c.write(2, &[7u8; 1024]).unwrap();
        c.forget(2);
        c.sync().unwrap();
        assert_eq!(dev.snapshot()[2048], 0);
    }
}
