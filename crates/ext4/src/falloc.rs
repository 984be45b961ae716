//! fallocate(2) modes, SEEK_DATA/SEEK_HOLE, and FIEMAP-style maps.
//!
//! Semantics follow Linux ext4: preallocation makes unwritten extents that
//! read as zeros (extending the size unless KEEP_SIZE); PUNCH_HOLE frees
//! whole blocks and zeroes partial ones (size kept); ZERO_RANGE turns the
//! range into zeros (whole blocks become unwritten); COLLAPSE_RANGE and
//! INSERT_RANGE shift the block map by whole blocks. Indirect-mapped files
//! (ext2/3) support only hole punching, as in Linux; the rest is
//! EOPNOTSUPP.

use crate::bmap::{insert_extent, Mapping};
use crate::error::{Error, Result};
use crate::format::extent::Extent;
use crate::format::inode::Inode;
use crate::format::Timespec;
use crate::fs::Core;
use folio_pagecache::lockdep::{Held, Level};

pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_COLLAPSE_RANGE: u32 = 0x08;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
pub const FALLOC_FL_INSERT_RANGE: u32 = 0x20;

impl Core {
    /// fallocate(2) on inode `ino`. `mode` is Linux's FALLOC_FL_* bits.
    pub fn fallocate(&mut self, ino: u32, mode: u32, offset: u64, len: u64) -> Result<()> {
        let i = self.read_inode(ino)?;
        crate::fscrypt::need_key(&i, "allocate its blocks")?;
        crate::verity::check_data_changeable(&i)?;
        self.uninline(ino)?;
        // Invalidates cached pages of the range: before the transaction.
        let _order = Held::take(Level::Invalidate, u64::from(ino));
        // Allocation of the range, writeback of its cached data (which may
        // allocate too), and freeing (punch, zero, collapse).
        let blocks = len
            .div_ceil(u64::from(self.geo.block_size))
            .saturating_add(1);
        let c = 2 * self.alloc_credits(ino, blocks) + self.free_credits(ino);
        self.retry_nospc(c, |fs| fs.fallocate_impl(ino, mode, offset, len))
    }

    fn fallocate_impl(&mut self, ino: u32, mode: u32, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let known = FALLOC_FL_KEEP_SIZE
            | FALLOC_FL_PUNCH_HOLE
            | FALLOC_FL_COLLAPSE_RANGE
            | FALLOC_FL_ZERO_RANGE
            | FALLOC_FL_INSERT_RANGE;
        if mode & !known != 0 {
            return Err(Error::Unsupported("fallocate mode".into()));
        }
        if len == 0 || offset > i64::MAX as u64 || len > i64::MAX as u64 {
            return Err(Error::Invalid("fallocate offset or length".into()));
        }
        // As vfs_fallocate: nothing on an immutable file, only plain
        // preallocation beyond the data on an append-only one.
        let flags_of = self.read_inode(ino)?;
        crate::ops::check_changeable(&flags_of, mode & !FALLOC_FL_KEEP_SIZE == 0)?;
        if self.map_pinned(ino) {
            return Err(Error::Busy);
        }
        // Work on the device directly below: write back and drop the
        // cache where this can change data (the whole tail when ranges
        // shift), so no stale folio survives and no delayed allocation is
        // left in the range.
        let shift_modes = FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE;
        let flush_to = if mode & shift_modes != 0 {
            u64::MAX
        } else {
            offset.saturating_add(len)
        };
        self.flush_range(ino, offset, flush_to)?;
        let mut inode = self.read_inode(ino)?;
        if inode.is_dir() {
            return Err(Error::IsDir);
        }
        if !inode.is_reg() {
            return Err(Error::Invalid(
                "fallocate needs a regular file (ENODEV)".into(),
            ));
        }
        let end = offset.checked_add(len).ok_or(Error::FileTooBig)?;
        let shift = mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) != 0;
        if shift && mode != FALLOC_FL_COLLAPSE_RANGE && mode != FALLOC_FL_INSERT_RANGE {
            return Err(Error::Invalid(
                "COLLAPSE_RANGE and INSERT_RANGE take no other flags".into(),
            ));
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Error::Unsupported("PUNCH_HOLE needs KEEP_SIZE".into()));
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_ZERO_RANGE != 0 {
            return Err(Error::Unsupported("PUNCH_HOLE with ZERO_RANGE".into()));
        }
        let extents = Self::uses_extents(&inode);
        if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            self.punch(&mut inode, offset, end)?;
        } else if !extents {
            return Err(Error::Unsupported(
                "fallocate on an indirect-mapped (ext2/3) file".into(),
            ));
        } else if mode == FALLOC_FL_COLLAPSE_RANGE {
            self.collapse(&mut inode, offset, len)?;
        } else if mode == FALLOC_FL_INSERT_RANGE {
            self.insert(&mut inode, offset, len)?;
        } else {
            if end > self.max_file_size(&inode) {
                return Err(Error::FileTooBig);
            }
            if mode & FALLOC_FL_ZERO_RANGE != 0 {
                self.zero_range(&mut inode, offset, end)?;
            } else {
                self.prealloc(&mut inode, offset, end)?;
            }
            if mode & FALLOC_FL_KEEP_SIZE == 0 && end > inode.size() {
                let old = inode.size();
                self.zero_tail_of(&inode, old)?;
                inode.set_size(end);
                self.note_large_file(end);
            }
        }
        let now = Timespec::now();
        inode.set_mtime(now);
        inode.set_ctime(now);
        self.write_inode(&mut inode)
    }

    fn bs(&self) -> u64 {
        u64::from(self.geo.block_size)
    }

    /// Zero bytes `[from, to)` of mapped, written blocks (partial blocks
    /// at the edges of a range).
    fn zero_bytes(&mut self, inode: &Inode, from: u64, to: u64) -> Result<()> {
        let bs = self.bs();
        let mut pos = from;
        while pos < to {
            let lblk = pos / bs;
            let blk_end = ((lblk + 1) * bs).min(to);
            if let (
                Mapping::Mapped {
                    pblk,
                    unwritten: false,
                },
                _,
            ) = self.map_block(inode, lblk, 1)?
            {
                let zeros = vec![0u8; (blk_end - pos) as usize];
                self.dev().write_at(pblk * bs + pos % bs, &zeros)?;
            }
            pos = blk_end;
        }
        Ok(())
    }

    fn zero_tail_of(&mut self, inode: &Inode, size: u64) -> Result<()> {
        let bs = self.bs();
        if !size.is_multiple_of(bs) {
            self.zero_bytes(inode, size, size.div_ceil(bs) * bs)?;
        }
        Ok(())
    }

    /// Free whole blocks inside `[from, to)` and zero the partial ones.
    fn punch(&mut self, inode: &mut Inode, from: u64, to: u64) -> Result<()> {
        let bs = self.bs();
        let to = to.min(inode.size().max(from));
        if from >= to {
            return Ok(());
        }
        let first_full = from.div_ceil(bs);
        let last_full = to / bs; // exclusive
        if first_full >= last_full {
            return self.zero_bytes(inode, from, to);
        }
        self.zero_bytes(inode, from, first_full * bs)?;
        self.zero_bytes(inode, last_full * bs, to)?;
        self.free_range(inode, first_full, last_full)
    }

    /// Free logical blocks `[from, to)`.
    fn free_range(&mut self, inode: &mut Inode, from: u64, to: u64) -> Result<()> {
        let spb = u64::from(self.geo.block_size / 512);
        if Self::uses_extents(inode) {
            self.free_extent_range(inode, from, to)
        } else {
            // Indirect maps: free block by block below `to`, then let
            // truncate-style pruning happen only at the end of the file.
            for l in from..to {
                if let (Mapping::Mapped { pblk, .. }, _) = self.map_block(inode, l, 1)? {
                    self.ind_clear(inode, l)?;
                    self.free_blocks(pblk, 1)?;
                    self.add_i_blocks(inode, -(spb as i64))?;
                }
            }
            Ok(())
        }
    }

    /// Allocate unwritten extents over the holes of `[from, to)` (bytes).
    fn prealloc(&mut self, inode: &mut Inode, from: u64, to: u64) -> Result<()> {
        let bs = self.bs();
        let (first, last) = (from / bs, to.div_ceil(bs));
        // Fresh blocks read as zeros because they are unwritten; no need
        // to write them. All or nothing, as ext4 leaves no partial
        // preallocation behind on ENOSPC.
        self.ext_fill_holes(inode, first, last, true).map(drop)
    }

    /// Make `[from, to)` read as zeros: partial blocks zeroed in place,
    /// whole blocks replaced by unwritten extents.
    fn zero_range(&mut self, inode: &mut Inode, from: u64, to: u64) -> Result<()> {
        let bs = self.bs();
        let first_full = from.div_ceil(bs);
        let last_full = to / bs;
        if first_full >= last_full {
            self.zero_bytes(inode, from, to.min(inode.size().max(from)))?;
            return self.prealloc(inode, from, to);
        }
        let size = inode.size();
        self.zero_bytes(inode, from, (first_full * bs).min(size.max(from)))?;
        self.zero_bytes(inode, last_full * bs, to.min(size.max(last_full * bs)))?;
        self.free_range(inode, first_full, last_full)?;
        self.prealloc(inode, from, to)
    }

    fn check_shift_args(&self, inode: &Inode, offset: u64, len: u64) -> Result<()> {
        let bs = self.bs();
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Error::Invalid(
                "COLLAPSE/INSERT_RANGE need block-aligned offset and length".into(),
            ));
        }
        let _ = inode;
        Ok(())
    }

    fn collapse(&mut self, inode: &mut Inode, offset: u64, len: u64) -> Result<()> {
        self.check_shift_args(inode, offset, len)?;
        let size = inode.size();
        if offset + len >= size {
            return Err(Error::Invalid(
                "COLLAPSE_RANGE reaches the end of the file".into(),
            ));
        }
        let bs = self.bs();
        let (start, n) = (offset / bs, len / bs);
        self.free_range(inode, start, start + n)?;
        let mut list = self.extent_list(inode)?;
        for e in &mut list {
            if u64::from(e.lblk) >= start + n {
                e.lblk -= n as u32;
            }
        }
        let merged = Self::remerge(list);
        self.write_extent_tree(inode, merged)?;
        inode.set_size(size - len);
        Ok(())
    }

    fn insert(&mut self, inode: &mut Inode, offset: u64, len: u64) -> Result<()> {
        self.check_shift_args(inode, offset, len)?;
        let size = inode.size();
        if offset >= size {
            return Err(Error::Invalid(
                "INSERT_RANGE at or past the end of the file".into(),
            ));
        }
        let new_size = size.checked_add(len).ok_or(Error::FileTooBig)?;
        if new_size > self.max_file_size(inode) {
            return Err(Error::FileTooBig);
        }
        let bs = self.bs();
        let (start, n) = (offset / bs, len / bs);
        let mut list = self.extent_list(inode)?;
        // Split an extent spanning the insertion point.
        let mut split = Vec::with_capacity(list.len() + 1);
        for e in list.drain(..) {
            let s = u64::from(e.lblk);
            if s < start && e.end() > start {
                let head = (start - s) as u32;
                split.push(Extent { len: head, ..e });
                split.push(Extent {
                    lblk: start as u32,
                    len: e.len - head,
                    pblk: e.pblk + u64::from(head),
                    unwritten: e.unwritten,
                });
            } else {
                split.push(e);
            }
        }
        for e in &mut split {
            if u64::from(e.lblk) >= start {
                if e.end() + n > 1 << 32 {
                    return Err(Error::FileTooBig);
                }
                e.lblk += n as u32;
            }
        }
        self.write_extent_tree(inode, split)?;
        inode.set_size(new_size);
        Ok(())
    }

    fn remerge(list: Vec<Extent>) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::with_capacity(list.len());
        for e in list {
            insert_extent(&mut out, e);
        }
        out
    }

    /// lseek(2) SEEK_DATA (`data`) or SEEK_HOLE from `offset`; ENXIO
    /// ([`Error::NoSuchOffset`]) at or past the end, as Linux.
    pub fn seek_data_hole(&mut self, ino: u32, offset: u64, data: bool) -> Result<u64> {
        let st = self.stat(ino)?;
        if offset >= st.size {
            return Err(Error::NoSuchOffset);
        }
        // Delayed allocations are data; unwritten extents are holes except
        // where dirty data is cached for them (as ext4 reports them).
        let m = self.mapping_of(ino);
        folio_iomap::seek_data_hole(self, &m, u64::from(ino), st.size, offset, data)?
            .ok_or(Error::NoSuchOffset)
    }
}
