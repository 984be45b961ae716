//! ext4 under the page cache: the iomap operations, delayed allocation and
//! space reservation.
//!
//! - A buffered write reserves every hole of its span at the first
//!   `begin` (`Core::reserve_interval`): the blocks are counted
//!   against free space (plus a worst-case allowance for the extent-tree
//!   or indirect blocks they may need) but not chosen. A write that cannot
//!   reserve fails with ENOSPC, or is short, at write time; `end` gives
//!   back exactly the reservation the copy did not use.
//! - Writeback `begin` turns a delayed run into real blocks in one
//!   allocation, mapped written at once: the data goes out in the same
//!   journal handle, before any commit can carry the mapping, and if the
//!   write fails `end` unmaps the run and reserves it again, so no stale
//!   block ever becomes readable. Direct I/O and fallocate allocate
//!   unwritten extents, converted once the data is on the device.
//! - The allocation API ([`AllocOp`]) needs no page cache: reserve,
//!   allocate (unwritten) or deallocate a file interval.
//!
//! Reserved blocks are invisible to every other allocation
//! (`Core::alloc_blocks` keeps them), so data accepted into the
//! cache always finds space at writeback.

use folio_pagecache::lockdep::{Held, Level};
use std::collections::BTreeMap;
use std::sync::Arc;

use folio_blockdev::BlockDevice;
use folio_iomap::{flags, Iomap, IomapKind, IomapOps};
use folio_pagecache::AddressSpace;

use crate::bmap::Mapping;
use crate::error::{Error, Result};
use crate::format::inode::Inode;
use crate::fs::Core;
use crate::inodes::{Shape, Space};

/// What [`crate::Filesystem::allocate_interval`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocOp {
    /// Count the holes of the interval against free space (delayed).
    Reserve,
    /// Give real blocks to the interval's holes and reservations, as
    /// unwritten extents (they read as zeros until written).
    Allocate,
    /// Unmap the interval: free its blocks and drop its reservations.
    Deallocate,
}

/// Delayed-allocation state of one inode.
#[derive(Default, Debug)]
pub(crate) struct Delalloc {
    /// Reserved logical runs: start -> length, non-overlapping.
    pub(crate) runs: BTreeMap<u64, u64>,
    /// Blocks in `runs`.
    pub(crate) blocks: u64,
    /// Worst-case mapping blocks reserved for them.
    pub(crate) meta: u64,
}

impl Delalloc {
    /// The reserved run containing `lblk`, as (start, len).
    pub(crate) fn run_at(&self, lblk: u64) -> Option<(u64, u64)> {
        let (&s, &l) = self.runs.range(..=lblk).next_back()?;
        (lblk < s + l).then_some((s, l))
    }
    /// First reserved block at or after `lblk`.
    pub(crate) fn next_start(&self, lblk: u64) -> Option<u64> {
        if let Some((s, _)) = self.run_at(lblk) {
            return Some(s.max(lblk));
        }
        self.runs.range(lblk..).next().map(|(&s, _)| s)
    }
    fn insert(&mut self, start: u64, len: u64) {
        let mut s = start;
        let mut e = start + len;
        if let Some((ps, pl)) = self.runs.range(..s).next_back().map(|(a, b)| (*a, *b)) {
            if ps + pl >= s {
                s = ps;
                e = e.max(ps + pl);
                self.runs.remove(&ps);
                self.blocks -= pl;
            }
        }
        let overl: Vec<(u64, u64)> = self.runs.range(s..=e).map(|(a, b)| (*a, *b)).collect();
        for (a, b) in overl {
            e = e.max(a + b);
            self.runs.remove(&a);
            self.blocks -= b;
        }
        self.runs.insert(s, e - s);
        self.blocks += e - s;
    }
    /// Remove `[start, start+len)`; returns the blocks removed.
    fn remove(&mut self, start: u64, len: u64) -> u64 {
        let end = start + len;
        let mut removed = 0;
        // Runs do not overlap: only the last one starting before `start`
        // can reach into the range from the left, so the cost follows the
        // runs removed, not the runs the inode has.
        let before = self
            .runs
            .range(..start)
            .next_back()
            .filter(|(a, b)| **a + **b > start)
            .map(|(a, b)| (*a, *b));
        let hits: Vec<(u64, u64)> = before
            .into_iter()
            .chain(self.runs.range(start..end).map(|(a, b)| (*a, *b)))
            .collect();
        for (a, l) in hits {
            self.runs.remove(&a);
            let e = a + l;
            if a < start {
                self.runs.insert(a, start - a);
            }
            if e > end {
                self.runs.insert(end, e - end);
            }
            removed += e.min(end) - a.max(start);
        }
        self.blocks -= removed;
        removed
    }
}

/// Where a writeback of many inodes has got to: the inodes that were
/// dirty when it started, and a position in the current one.
pub(crate) struct WritebackCursor {
    inos: Vec<u64>,
    next: usize,
    from: u64,
}

impl WritebackCursor {
    pub(crate) fn new(pc: &folio_pagecache::PageCache) -> Self {
        WritebackCursor {
            inos: pc.dirty_inodes(),
            next: 0,
            from: 0,
        }
    }
}

/// Writeback data written outside the core lock (`Filesystem`'s
/// writeback loops): how many batches are between their mapping and the
/// end of their writes, and the new mappings whose write failed. Its
/// mutex is a leaf (nothing is taken inside it).
///
/// A batch maps its delayed blocks *written* under the core lock and
/// writes their data after releasing it. That is safe because every
/// commit first waits here until no batch is in flight
/// (`Core::settle_writeback`, under the core lock, so no new batch can
/// start meanwhile, and a batch in flight needs no lock the waiter holds)
/// and then undoes the mappings whose data did not arrive: a committed
/// mapping always has its data on the device (ordered mode).
#[derive(Default)]
pub(crate) struct WritebackIo {
    state: std::sync::Mutex<WbState>,
    idle: std::sync::Condvar,
}

#[derive(Default)]
struct WbState {
    inflight: usize,
    /// (inode, file byte, bytes, device byte) of new mappings whose
    /// write failed.
    failed: Vec<(u32, u64, u64, u64)>,
}

impl WritebackIo {
    fn state(&self) -> std::sync::MutexGuard<'_, WbState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until no batch is in flight; take the failures to undo.
    fn wait_idle(&self) -> Vec<(u32, u64, u64, u64)> {
        let mut st = self.state();
        while st.inflight > 0 {
            st = self.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut st.failed)
    }
}

/// One batch in flight (counted in [`WritebackIo`] until dropped, even
/// by a panic).
struct InFlight(Arc<WritebackIo>);

impl InFlight {
    fn new(io: &Arc<WritebackIo>) -> Self {
        io.state().inflight += 1;
        InFlight(Arc::clone(io))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.inflight -= 1;
        if st.inflight == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A writeback batch mapped under the core lock, its data to be written
/// without it ([`DeferredWriteback::perform`]).
pub(crate) struct DeferredWriteback {
    ino: u32,
    prep: Option<folio_iomap::PreparedWriteback>,
    m: Arc<AddressSpace>,
    pc: Arc<folio_pagecache::PageCache>,
    dev: Arc<dyn BlockDevice>,
    inflight: Option<InFlight>,
    /// What stopped the mapping part way, reported after the writes.
    error: Option<Error>,
}

impl DeferredWriteback {
    /// Bytes of the batch still to be written.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.prep.as_ref().map_or(0, |p| p.pending_bytes())
    }

    /// Write the batch's data, clean and unlock its folios, and record
    /// the new mappings whose write failed (the next commit undoes them;
    /// their folios stay dirty). Takes no filesystem lock. Returns the
    /// bytes written, or the first error.
    pub(crate) fn perform(mut self) -> Result<u64> {
        self.run()
    }

    fn run(&mut self) -> Result<u64> {
        let Some(prep) = self.prep.take() else {
            return Ok(0);
        };
        let out = prep.perform(&*self.dev, &self.pc, &self.m);
        if let Some(f) = &self.inflight {
            let bad: Vec<_> = out
                .failed
                .iter()
                .filter(|(_, _, map)| map.new)
                .map(|(pos, len, map)| (self.ino, *pos, *len, map.addr_of(*pos)))
                .collect();
            if !bad.is_empty() {
                f.0.state().failed.extend(bad);
            }
        }
        self.inflight = None;
        if let Some(e) = out.error {
            return Err(e.into());
        }
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(out.written),
        }
    }
}

impl Drop for DeferredWriteback {
    /// A batch dropped unperformed (an early return, a panic) still
    /// writes its data: its new mappings must not be committed without
    /// it, and its folios must leave writeback.
    fn drop(&mut self) {
        let _ = self.run();
    }
}

/// Re-derive the mapping-block allowance of delayed runs `da` of a file
/// whose map has `shape` after their blocks changed; fails (changing
/// nothing) if it would grow and `only_if_fits` and it does not fit.
pub(crate) fn set_meta(
    space: &Space,
    bs: u64,
    shape: Shape,
    da: &mut Delalloc,
    only_if_fits: bool,
) -> Result<()> {
    let want = meta_for(bs, shape, da.blocks);
    let have = da.meta;
    if want > have {
        if only_if_fits {
            if !space.reserve(want - have) {
                return Err(Error::NoSpace);
            }
        } else {
            space.reserve_anyway(want - have);
        }
    } else {
        space.unreserve(have - want);
    }
    da.meta = want;
    Ok(())
}

/// Worst-case mapping blocks needed to map `d` more blocks into a file
/// whose map has `shape`: a new leaf for every half-full leaf's worth of
/// extents, plus one split per level and a new root level.
fn meta_for(bs: u64, shape: Shape, d: u64) -> u64 {
    if d == 0 {
        return 0;
    }
    if shape.extents {
        let per_leaf = (bs - 12) / 12 / 2;
        let (depth, entries) = (u64::from(shape.depth), u64::from(shape.entries));
        if depth == 0 && entries + d <= 4 {
            return 0;
        }
        d.div_ceil(per_leaf) + depth + 2
    } else {
        let ppb = bs / 4;
        d.div_ceil(ppb) + 3
    }
}

/// Reserve the runs `holes` (logical, in order) as delayed allocations
/// in `da`, as far as space allows, with their mapping allowance; returns
/// the runs reserved (a prefix of `holes`, the last one maybe cut).
pub(crate) fn reserve_runs(
    space: &Space,
    bs: u64,
    shape: Shape,
    da: &mut Delalloc,
    holes: &[(u64, u64)],
) -> Result<Vec<(u64, u64)>> {
    let mut got = Vec::new();
    for &(s, l) in holes {
        let take = space.reserve_upto(l);
        if take == 0 {
            break;
        }
        da.insert(s, take);
        if set_meta(space, bs, shape, da, true).is_err() {
            // Not even the mapping allowance fits: undo this run.
            da.remove(s, take);
            space.unreserve(take);
            set_meta(space, bs, shape, da, false)?;
            break;
        }
        got.push((s, take));
        if take < l {
            break;
        }
    }
    Ok(got)
}

/// Give back the parts of the reservations `inflight` (made by one
/// buffered write) from block `keep` to block `stop`: the copy did not
/// reach them. Parts past `stop` belong to the next step of the same
/// write and stay in `inflight`.
pub(crate) fn give_back(
    space: &Space,
    bs: u64,
    shape: Shape,
    da: &mut Delalloc,
    inflight: &mut Vec<(u64, u64)>,
    keep: u64,
    stop: u64,
) -> Result<()> {
    for (s, l) in std::mem::take(inflight) {
        let a = s.max(keep);
        let b = (s + l).min(stop);
        if a < b {
            let removed = da.remove(a, b - a);
            space.unreserve(removed);
        }
        if s + l > stop {
            let from = s.max(stop);
            inflight.push((from, s + l - from));
        }
    }
    set_meta(space, bs, shape, da, false)
}

impl Core {
    /// The page-cache mapping of inode `ino`.
    pub(crate) fn mapping_of(&self, ino: u32) -> Arc<AddressSpace> {
        self.pc
            .mapping(u64::from(ino), self.geo.block_size as usize)
    }

    /// Blocks reserved for delayed allocation, data and mapping, in total.
    pub(crate) fn reserved_blocks(&self) -> u64 {
        self.inodes.space.reserved()
    }

    /// Re-derive the mapping allowance of `inode`'s delayed runs `da`
    /// after they shrank or were given back (it may grow past the free
    /// space: the runs were already accepted).
    fn settle_meta(&self, inode: &Inode, da: &mut Delalloc) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        set_meta(&self.inodes.space, bs, Self::shape_of(inode), da, false)
    }

    /// Delayed-allocation blocks of `ino` (for st_blocks, like ext4).
    pub(crate) fn delalloc_blocks(&self, ino: u32) -> u64 {
        self.inodes.get(ino).map_or(0, |i| i.data().delalloc.blocks)
    }

    /// Re-derive `ino`'s mapping-block allowance after its delayed blocks
    /// changed; fails (changing nothing) if it would not fit.
    fn set_meta_reservation(&mut self, inode: &Inode, grow_ok_only_if_fits: bool) -> Result<()> {
        let obj = self.inodes.obj(inode.ino);
        let mut d = obj.data();
        set_meta(
            &self.inodes.space,
            u64::from(self.geo.block_size),
            Self::shape_of(inode),
            &mut d.delalloc,
            grow_ok_only_if_fits,
        )
    }

    /// Reserve the holes of `[lblk, lblk+n)` that are neither mapped nor
    /// reserved. Reserves from the start as far as space allows; returns
    /// the newly reserved runs (empty and ENOSPC if not even one block).
    fn reserve_holes(&mut self, inode: &Inode, lblk: u64, n: u64) -> Result<Vec<(u64, u64)>> {
        let mut holes = Vec::new();
        let mut cur = lblk;
        let end = lblk + n;
        let obj = self.inodes.obj(inode.ino);
        while cur < end {
            let (m, k) = self.map_block(inode, cur, end - cur)?;
            if m == Mapping::Hole {
                // Split the hole around existing reservations.
                let d = obj.data();
                let mut p = cur;
                while p < cur + k {
                    if let Some((s, l)) = d.delalloc.run_at(p) {
                        p = (s + l).min(cur + k);
                        continue;
                    }
                    let next = d.delalloc.next_start(p).unwrap_or(u64::MAX).min(cur + k);
                    holes.push((p, next - p));
                    p = next;
                }
            }
            cur += k;
        }
        let wanted = !holes.is_empty();
        let got = reserve_runs(
            &self.inodes.space,
            u64::from(self.geo.block_size),
            Self::shape_of(inode),
            &mut obj.data().delalloc,
            &holes,
        )?;
        if got.is_empty() && wanted {
            return Err(Error::NoSpace);
        }
        Ok(got)
    }

    /// Drop reservations of `[lblk, lblk+n)` of `ino`.
    pub(crate) fn unreserve(&mut self, ino: u32, lblk: u64, n: u64) -> Result<()> {
        let Some(obj) = self.inodes.get(ino) else {
            return Ok(());
        };
        let removed = obj.data().delalloc.remove(lblk, n);
        self.inodes.space.unreserve(removed);
        if removed == 0 && obj.data().delalloc.meta == 0 {
            return Ok(());
        }
        let inode = self.read_inode(ino)?;
        let mut d = obj.data();
        self.settle_meta(&inode, &mut d.delalloc)
    }

    /// The allocation API: reserve, allocate or deallocate blocks
    /// `[lblk, lblk+n)` of `ino`, with no page cache involved.
    pub fn allocate_interval(&mut self, ino: u32, op: AllocOp, lblk: u64, n: u64) -> Result<()> {
        // Allocate and Deallocate drop cached pages of the interval.
        let _order = Held::take(Level::Invalidate, u64::from(ino));
        self.check_writable()?;
        let inode = self.read_inode(ino)?;
        if !inode.is_reg() {
            return Err(Error::Invalid("not a regular file".into()));
        }
        crate::fscrypt::need_key(&inode, "allocate its blocks")?;
        crate::verity::check_data_changeable(&inode)?;
        match lblk.checked_add(n) {
            Some(e) if e <= self.max_file_blocks(&inode) => {}
            _ => return Err(Error::FileTooBig),
        }
        if op != AllocOp::Reserve && self.map_pinned(ino) {
            return Err(Error::Busy);
        }
        match op {
            AllocOp::Reserve => {
                let got = self.reserve_holes(&inode, lblk, n)?;
                let want = self.count_holes(&inode, lblk, n)?;
                if want > 0 {
                    // Partial: give it back, reservation is all or nothing here.
                    for (s, l) in got {
                        self.unreserve(ino, s, l)?;
                    }
                    return Err(Error::NoSpace);
                }
                Ok(())
            }
            AllocOp::Allocate => {
                // Cached data of the interval goes to its blocks first, so
                // no reservation is left under the new extents.
                let bs = u64::from(self.geo.block_size);
                self.flush_range(ino, lblk * bs, (lblk + n).saturating_mul(bs))?;
                let mut inode = self.read_inode(ino)?;
                let mut cur = lblk;
                while cur < lblk + n {
                    let (m, k) = self.map_block(&inode, cur, lblk + n - cur)?;
                    if m == Mapping::Hole {
                        self.alloc_run(&mut inode, cur, k, true, true)?;
                    }
                    cur += k;
                }
                self.write_inode(&mut inode)
            }
            AllocOp::Deallocate => {
                // Like a punched hole: the cache of the interval is
                // written back and dropped, then the blocks go.
                let bs = u64::from(self.geo.block_size);
                self.flush_range(ino, lblk * bs, (lblk + n).saturating_mul(bs))?;
                self.unreserve(ino, lblk, n)?;
                let mut inode = self.read_inode(ino)?;
                if Self::uses_extents(&inode) {
                    self.free_extent_range(&mut inode, lblk, lblk + n)?;
                } else {
                    self.ind_free_range(&mut inode, lblk, lblk + n)?;
                }
                self.write_inode(&mut inode)
            }
        }
    }

    /// Holes of `[lblk, lblk+n)` not covered by a reservation, in blocks.
    fn count_holes(&mut self, inode: &Inode, lblk: u64, n: u64) -> Result<u64> {
        let mut cur = lblk;
        let mut holes = 0;
        while cur < lblk + n {
            let (m, k) = self.map_block(inode, cur, lblk + n - cur)?;
            if m == Mapping::Hole {
                let obj = self.inodes.obj(inode.ino);
                let d = obj.data();
                for b in cur..cur + k {
                    if d.delalloc.run_at(b).is_none() {
                        holes += 1;
                    }
                }
            }
            cur += k;
        }
        Ok(holes)
    }

    /// Free the blocks of `[from, to)` of an indirect-mapped inode.
    fn ind_free_range(&mut self, inode: &mut Inode, from: u64, to: u64) -> Result<()> {
        let spb = i64::from(self.geo.block_size / 512);
        for l in from..to {
            let (m, _) = self.map_block(inode, l, 1)?;
            if let Mapping::Mapped { pblk, .. } = m {
                self.ind_clear(inode, l)?;
                self.free_blocks(pblk, 1)?;
                self.add_i_blocks(inode, -spb)?;
            }
        }
        Ok(())
    }

    /// Allocate real blocks for up to `n` blocks at `lblk` (a hole or a
    /// reservation) in one contiguous piece; returns (pblk, count).
    /// Extent files get an unwritten extent, or a written one for
    /// writeback (`unwritten` false: see `writeback_allocate`); indirect
    /// files written blocks. Draws on the reservation unless `fresh`.
    pub(crate) fn alloc_run(
        &mut self,
        inode: &mut Inode,
        lblk: u64,
        n: u64,
        fresh: bool,
        unwritten: bool,
    ) -> Result<(u64, u64)> {
        if Self::uses_extents(inode) {
            let was = self.alloc_from_reserve;
            self.alloc_from_reserve = !fresh;
            let r = self.ext_alloc_extent(inode, lblk, n, unwritten);
            self.alloc_from_reserve = was;
            let (pb, got) = r?;
            Ok((pb, u64::from(got)))
        } else {
            // One block at a time: indirect maps have no runs to speak of.
            let fresh_range = self.allocate_range_reserved(inode, lblk, fresh)?;
            Ok(fresh_range)
        }
    }

    fn allocate_range_reserved(
        &mut self,
        inode: &mut Inode,
        lblk: u64,
        fresh: bool,
    ) -> Result<(u64, u64)> {
        let was = self.alloc_from_reserve;
        self.alloc_from_reserve = !fresh;
        let r = self.allocate_range(inode, lblk, 1);
        self.alloc_from_reserve = was;
        r?;
        match self.map_block(inode, lblk, 1)?.0 {
            Mapping::Mapped { pblk, .. } => Ok((pblk, 1)),
            Mapping::Hole => Err(Error::corrupted("block unmapped right after allocation", 0)),
        }
    }

    /// Writeback of delayed run at `lblk`: give it real blocks.
    fn writeback_allocate(&mut self, ino: u32, lblk: u64, n: u64) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        let shown = self.shown_blocks(&inode, ino);
        let obj = self.inodes.obj(ino);
        let run = obj.data().delalloc.run_at(lblk);
        let (s, l) = run.ok_or_else(|| Error::corrupted("writeback of an unreserved block", 0))?;
        let k = n.min(s + l - lblk);
        // The data blocks come out of the reservation: release it first so
        // the allocation below may use them; the mapping allowance stays
        // until the run is done.
        let was = self.alloc_from_reserve;
        self.alloc_from_reserve = true;
        // Written at once: the data goes to the device in this same handle,
        // before any commit can carry the new mapping (commits happen only
        // between handles, and a commit flushes the data before its commit
        // block), and a failed write unmaps the run again
        // (`writeback_failed`). So the mapping is never durable without
        // its data, and the extent tree is edited once per run, not twice
        // (allocate unwritten, then convert).
        let r = self.alloc_run(&mut inode, lblk, k, false, false);
        self.alloc_from_reserve = was;
        let (_, got) = r?;
        let removed = obj.data().delalloc.remove(lblk, got);
        self.inodes.space.unreserve(removed);
        self.write_inode(&mut inode)?;
        if self.shown_blocks(&inode, ino) != shown {
            // Mapping blocks (extent tree, indirect) came with the data:
            // st_blocks moved without a request on the file.
            self.inodes.attrs_changed(ino);
        }
        self.set_meta_reservation(&inode, false)
    }

    /// Convert `[lblk, lblk+n)` to written.
    fn convert_written(&mut self, ino: u32, lblk: u64, n: u64) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        if !Self::uses_extents(&inode) {
            return Ok(());
        }
        if self
            .ext_mark_written(&mut inode, lblk, lblk + n)?
            .is_empty()
        {
            return Ok(());
        }
        self.write_inode(&mut inode)
    }

    /// A failed writeback to freshly allocated blocks: unmap them and make
    /// them a reservation again (the data stays dirty in the cache), so
    /// that no mapping ever points at a block whose data did not arrive.
    fn writeback_failed(&mut self, ino: u32, lblk: u64, n: u64) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        if Self::uses_extents(&inode) {
            self.free_extent_range(&mut inode, lblk, lblk + n)?;
        } else {
            self.ind_free_range(&mut inode, lblk, lblk + n)?;
        }
        self.write_inode(&mut inode)?;
        let obj = self.inodes.obj(ino);
        let mut d = obj.data();
        d.delalloc.insert(lblk, n);
        self.inodes.space.reserve_anyway(n);
        self.settle_meta(&inode, &mut d.delalloc)
    }

    /// Describe the file at `lblk` for `n` blocks.
    fn describe(&mut self, inode: &Inode, lblk: u64, n: u64) -> Result<Iomap> {
        let bs = u64::from(self.geo.block_size);
        if Self::is_inline(inode) {
            // All of an inline file is in its first block; the rest of
            // the range reads as a hole.
            let (kind, inline, len) = if lblk == 0 {
                (IomapKind::Inline, self.inline_data(inode)?, 1)
            } else {
                (IomapKind::Hole, Vec::new(), n.max(1))
            };
            return Ok(Iomap {
                kind,
                offset: lblk * bs,
                length: len * bs,
                addr: 0,
                new: false,
                inline,
            });
        }
        let (m, k) = self.map_block(inode, lblk, n)?;
        let (kind, addr, len) = match m {
            Mapping::Mapped { pblk, unwritten } => (
                if unwritten {
                    IomapKind::Unwritten
                } else {
                    IomapKind::Mapped
                },
                pblk * bs,
                k,
            ),
            Mapping::Hole => {
                let obj = self.inodes.get(inode.ino);
                let d = obj.as_ref().map(|o| o.data());
                let da = d.as_ref().map(|d| &d.delalloc);
                match da.and_then(|d| d.run_at(lblk)) {
                    Some((s, l)) => (IomapKind::Delalloc, 0, (s + l - lblk).min(k)),
                    None => {
                        let next = da.and_then(|d| d.next_start(lblk)).unwrap_or(u64::MAX);
                        (IomapKind::Hole, 0, (next - lblk).min(k))
                    }
                }
            }
        };
        Ok(Iomap {
            kind,
            offset: lblk * bs,
            length: len.max(1) * bs,
            addr,
            new: false,
            inline: Vec::new(),
        })
    }

    fn begin_impl(&mut self, ino: u32, pos: u64, len: u64, fl: u32) -> Result<Iomap> {
        let bs = u64::from(self.geo.block_size);
        let lblk = pos / bs;
        let n = (pos + len.max(1)).div_ceil(bs) - lblk;
        let inode = self.read_inode(ino)?;
        if fl & flags::WRITE != 0 && fl & flags::DIRECT == 0 {
            // Reserve the whole span now; running out part way is fine
            // (the write comes out short where the reservation stops).
            match self.reserve_holes(&inode, lblk, n) {
                Ok(got) => self.inflight.extend(got),
                Err(Error::NoSpace) => {}
                Err(e) => return Err(e),
            }
            let map = self.describe(&inode, lblk, n)?;
            if map.kind == IomapKind::Hole {
                // Could not reserve this far: out of space.
                return Err(Error::NoSpace);
            }
            return Ok(map);
        }
        if fl & flags::WRITEBACK != 0 {
            let map = self.describe(&inode, lblk, n)?;
            if map.kind == IomapKind::Delalloc {
                self.writeback_allocate(ino, lblk, map.length / bs)?;
                let inode = self.read_inode(ino)?;
                let mut map = self.describe(&inode, lblk, n)?;
                map.new = true;
                return Ok(map);
            }
            return Ok(map);
        }
        if fl & flags::DIRECT != 0 {
            let map = self.describe(&inode, lblk, n)?;
            match map.kind {
                IomapKind::Hole => {
                    let mut inode = inode;
                    self.alloc_run(&mut inode, lblk, map.length / bs, true, true)?;
                    self.write_inode(&mut inode)?;
                    let inode = self.read_inode(ino)?;
                    let mut map = self.describe(&inode, lblk, n)?;
                    map.new = true;
                    return Ok(map);
                }
                IomapKind::Delalloc => {
                    return Err(Error::corrupted(
                        "direct I/O met a delayed allocation that writeback left",
                        0,
                    ))
                }
                _ => return Ok(map),
            }
        }
        self.describe(&inode, lblk, n)
    }

    fn end_impl(
        &mut self,
        ino: u32,
        pos: u64,
        len: u64,
        done: u64,
        fl: u32,
        map: &Iomap,
    ) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        if fl & flags::WRITE != 0 && fl & flags::DIRECT == 0 {
            // Give back what this write reserved and did not use.
            let keep = (pos + done).div_ceil(bs);
            let stop = (pos + len).div_ceil(bs);
            if self.inflight.is_empty() {
                return Ok(());
            }
            let inode = self.read_inode(ino)?;
            let obj = self.inodes.obj(ino);
            let mut inflight = std::mem::take(&mut self.inflight);
            let r = give_back(
                &self.inodes.space,
                bs,
                Self::shape_of(&inode),
                &mut obj.data().delalloc,
                &mut inflight,
                keep,
                stop,
            );
            self.inflight = inflight;
            return r;
        }
        if fl & (flags::WRITEBACK | flags::DIRECT) != 0 {
            let lblk = pos / bs;
            let n = len / bs;
            if done == len {
                if map.kind == IomapKind::Unwritten {
                    self.convert_written(ino, lblk, n)?;
                }
            } else if map.new && fl & flags::WRITEBACK != 0 {
                self.writeback_failed(ino, lblk, n)?;
            }
        }
        Ok(())
    }

    /// Write back every dirty folio of `ino` in bytes `[start, end)`, in
    /// logical order, a batch of folios per handle (as ext4_writepages
    /// starts a handle per chunk): each handle's credits are bounded by
    /// the batch, and the running transaction may commit between batches.
    pub(crate) fn writeback_range(&mut self, ino: u32, start: u64, end: u64) -> Result<u64> {
        let mut from = start;
        let mut total = 0;
        while let Some(n) = self.writeback_batch(ino, &mut from, end)? {
            total += n;
        }
        Ok(total)
    }

    /// Write back the next batch of dirty folios of `ino` at or after
    /// byte `*from` (below `end`) in one journal handle, and move `*from`
    /// past them. `None` once nothing dirty is left in the range. Between
    /// batches no handle is open: callers may let other threads in
    /// (`Filesystem` yields the core lock there).
    pub(crate) fn writeback_batch(
        &mut self,
        ino: u32,
        from: &mut u64,
        end: u64,
    ) -> Result<Option<u64>> {
        let Some((m, start, to, credits)) = self.next_batch(ino, *from, end) else {
            return Ok(None);
        };
        let pc = Arc::clone(&self.pc);
        let h = self.journal_start(credits)?;
        let r = folio_iomap::writeback(self, &pc, &m, u64::from(ino), start, to);
        self.journal_stop(h)?;
        *from = to;
        Ok(Some(r?))
    }

    /// `writeback_batch` whose data is written after the core lock is
    /// released: the batch's folios are locked and its delayed blocks
    /// mapped (written) here, in a handle that does not commit; the
    /// caller releases the core lock and calls `perform`. Commits wait
    /// for it ([`WritebackIo`]).
    pub(crate) fn writeback_batch_deferred(
        &mut self,
        ino: u32,
        from: &mut u64,
        end: u64,
    ) -> Result<Option<DeferredWriteback>> {
        self.batch_deferred(ino, from, end, false)
    }

    /// `writeback_batch_deferred`, leaving folios other threads are
    /// writing back to them (`nowait`) or waiting for them.
    fn batch_deferred(
        &mut self,
        ino: u32,
        from: &mut u64,
        end: u64,
        nowait: bool,
    ) -> Result<Option<DeferredWriteback>> {
        let Some((m, start, to, credits)) = self.next_batch(ino, *from, end) else {
            return Ok(None);
        };
        let pc = Arc::clone(&self.pc);
        let h = self.journal_start(credits)?;
        let (prep, r) =
            folio_iomap::writeback_prepare(self, &pc, &m, u64::from(ino), (start, to), nowait);
        let inflight = (prep.pending_bytes() > 0).then(|| InFlight::new(&self.wb_io));
        self.journal_stop_deferred(h);
        *from = to;
        Ok(Some(DeferredWriteback {
            ino,
            prep: Some(prep),
            m,
            pc,
            dev: Arc::clone(self.dev()),
            inflight,
            error: r.err(),
        }))
    }

    /// The next batch of dirty folios of `ino` at or after byte `from`
    /// (below `end`): its mapping, byte range and journal credits.
    fn next_batch(
        &mut self,
        ino: u32,
        from: u64,
        end: u64,
    ) -> Option<(Arc<AddressSpace>, u64, u64, usize)> {
        const BATCH_FOLIOS: usize = 128;
        let m = self.pc.existing(u64::from(ino))?;
        if end <= from {
            return None;
        }
        let fsz = m.folio_size() as u64;
        let batch = m.first_dirty_indices(m.index_of(from), m.index_of(end - 1), BATCH_FOLIOS);
        let (Some(&first), Some(&last)) = (batch.first(), batch.last()) else {
            return None;
        };
        let start = (first * fsz).max(from);
        let to = (last + 1).saturating_mul(fsz).min(end);
        let per = (fsz / u64::from(self.geo.block_size)).max(1);
        // Every dirty block may start a run: an allocation and a
        // conversion each.
        let credits = self.alloc_credits(ino, 2 * batch.len() as u64 * per);
        Some((m, start, to, credits))
    }

    /// Before a commit (or, without a journal, before metadata goes
    /// home): wait until no deferred writeback is in flight, then undo
    /// the new mappings whose data did not arrive — block by block, only
    /// where the block is still mapped there and still dirty in the cache
    /// (a truncate, punch or rewrite since then may have changed either;
    /// nothing was committed in between, so whatever maps the block now
    /// was mapped by the running transaction).
    pub(crate) fn settle_writeback(&mut self) -> Result<()> {
        for (ino, pos, len, addr) in self.wb_io.wait_idle() {
            self.settle_failed(ino, pos, len, addr)?;
        }
        Ok(())
    }

    fn settle_failed(&mut self, ino: u32, pos: u64, len: u64, addr: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let Some(m) = self.pc.existing(u64::from(ino)) else {
            return Ok(());
        };
        let inode = self.read_inode(ino)?;
        if Self::is_inline(&inode) {
            return Ok(());
        }
        let (l0, p0) = (pos / bs, addr / bs);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in 0..len / bs {
            let mapped = matches!(
                self.map_block(&inode, l0 + b, 1)?.0,
                Mapping::Mapped { pblk, unwritten: false } if pblk == p0 + b
            );
            if !mapped || !block_dirty(&m, (l0 + b) * bs) {
                continue;
            }
            match runs.last_mut() {
                Some((s, k)) if *s + *k == l0 + b => *k += 1,
                _ => runs.push((l0 + b, 1)),
            }
        }
        for (s, k) in runs {
            self.writeback_failed(ino, s, k)?;
        }
        Ok(())
    }

    /// Write back all dirty data.
    pub(crate) fn writeback_all(&mut self) -> Result<()> {
        let mut cur = WritebackCursor::new(&self.pc);
        while self.writeback_step(&mut cur, 0)?.is_some() {}
        Ok(())
    }

    /// Write back and drop the cached folios of `[start, end)` of `ino`,
    /// so that code working on the device directly sees current data and
    /// leaves no stale cache behind.
    pub(crate) fn flush_range(&mut self, ino: u32, start: u64, end: u64) -> Result<()> {
        let Some(m) = self.pc.existing(u64::from(ino)) else {
            return Ok(());
        };
        let pc = Arc::clone(&self.pc);
        folio_iomap::flush_and_invalidate(self, &pc, &m, u64::from(ino), start, end)
    }

    /// Forget the cache and reservations of an inode that is going away
    /// or being cut back to `size` bytes.
    pub(crate) fn cache_truncate(&mut self, ino: u32, size: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        // Lock-free readers check the size before the cache: lower it
        // first (see `inodes`).
        self.inodes.shrink(ino, size);
        if let Some(m) = self.pc.existing(u64::from(ino)) {
            m.truncate(size);
            if size == 0 {
                self.pc.remove_mapping(u64::from(ino));
            }
        }
        let from = size.div_ceil(bs);
        self.unreserve(ino, from, u64::MAX / 2 - from)
    }

    /// Reclaim clean folios if the cache is over its budget.
    pub(crate) fn balance_budget(&self) {
        if self.pc.over_budget() {
            self.pc.balance();
        }
    }

    /// One batch of writeback towards at most `target` dirty bytes, inode
    /// after inode (see `writeback_batch`); `None` once there or once
    /// every inode the cursor started with is clean.
    pub(crate) fn writeback_step(
        &mut self,
        cur: &mut WritebackCursor,
        target: u64,
    ) -> Result<Option<u64>> {
        self.step_with(cur, target, Self::writeback_batch)
    }

    /// `writeback_step` with the data written after the core lock is
    /// released (see `writeback_batch_deferred`). Writeback towards a
    /// dirty level above zero (background, throttled writers) leaves
    /// folios other threads are writing back to them, so that threads
    /// writing back at once take different batches.
    pub(crate) fn writeback_step_deferred(
        &mut self,
        cur: &mut WritebackCursor,
        target: u64,
    ) -> Result<Option<DeferredWriteback>> {
        let nowait = target > 0;
        self.step_with(cur, target, |c, ino, from, end| {
            c.batch_deferred(ino, from, end, nowait)
        })
    }

    fn step_with<T>(
        &mut self,
        cur: &mut WritebackCursor,
        target: u64,
        mut batch: impl FnMut(&mut Self, u32, &mut u64, u64) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        loop {
            if self.pc.dirty_bytes() <= target {
                return Ok(None);
            }
            let Some(&ino) = cur.inos.get(cur.next) else {
                return Ok(None);
            };
            if let Some(t) = batch(self, ino as u32, &mut cur.from, u64::MAX)? {
                return Ok(Some(t));
            }
            cur.next += 1;
            cur.from = 0;
        }
    }

    /// Drop every clean cached folio (like `echo 1 > drop_caches`); dirty
    /// data stays.
    pub fn drop_caches(&mut self) -> u64 {
        self.pc.drop_clean()
    }
}

impl IomapOps for Core {
    type Error = Error;
    fn device(&self) -> Arc<dyn BlockDevice> {
        Arc::clone(self.dev())
    }
    fn begin(&mut self, ino: u64, pos: u64, len: u64, fl: u32) -> Result<Iomap> {
        let ino = u32::try_from(ino).map_err(|_| Error::Invalid("inode number".into()))?;
        self.begin_impl(ino, pos, len, fl)
    }
    fn end(&mut self, ino: u64, pos: u64, len: u64, done: u64, fl: u32, map: &Iomap) -> Result<()> {
        let ino = u32::try_from(ino).map_err(|_| Error::Invalid("inode number".into()))?;
        self.end_impl(ino, pos, len, done, fl, map)
    }
    /// Written mappings need nothing at `end` when the write succeeds
    /// (`end_impl`); unwritten ones are converted there.
    fn writeback_defers(&self, map: &Iomap) -> bool {
        map.kind == IomapKind::Mapped
    }
}

/// Is the block at file byte `at` dirty in the cache? Locks its folio
/// (callers hold the core lock and no folio lock).
fn block_dirty(m: &AddressSpace, at: u64) -> bool {
    let Some(f) = m.find(m.index_of(at)) else {
        return false;
    };
    let Ok(g) = m.lock_folio(&f) else {
        return false;
    };
    let bit = (at - g.pos()) / m.block_size() as u64;
    let dirty = g.state().dirty_mask() & (1 << bit) != 0;
    dirty
}

#[cfg(test)]
mod tests {
    use super::Delalloc;
    use std::collections::BTreeSet;

    /// Reserved runs against a set of blocks: seeded inserts and removes
    /// that start before, inside and past runs.
    #[test]
    fn delayed_runs_insert_and_remove_like_a_set() {
        let mut d = Delalloc::default();
        let mut model = BTreeSet::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let start = x % 5000;
            let len = 1 + (x >> 20) % 40;
            if i % 3 == 0 {
                let want = (start..start + len).filter(|b| model.contains(b)).count() as u64;
                assert_eq!(d.remove(start, len), want, "remove {start}+{len}");
                for b in start..start + len {
                    model.remove(&b);
                }
            } else {
                d.insert(start, len);
                model.extend(start..start + len);
            }
            assert_eq!(d.blocks, model.len() as u64);
        }
        let got: BTreeSet<u64> = d.runs.iter().flat_map(|(&s, &l)| s..s + l).collect();
        assert_eq!(got, model);
        // Runs stay apart and never empty.
        let runs: Vec<(u64, u64)> = d.runs.iter().map(|(&s, &l)| (s, l)).collect();
        assert!(runs.iter().all(|r| r.1 > 0));
        assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
    }
}
