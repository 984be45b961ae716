//! File data: reads, writes and size changes, through the page cache and
//! the generic iomap paths (`folio-iomap`) with this crate's mapping
//! operations (`data.rs`).
//!
//! - Buffered writes go to the cache with delayed allocation; writeback
//!   (at sync, fsync, commit, under memory or dirty pressure) places them.
//! - When a file grows (write past EOF, truncate up), the bytes of the old
//!   last block beyond the old size are zeroed first, in the cache.
//! - Direct I/O writes back and drops the cached range first.

use folio_pagecache::lockdep::{Held, Level};
use std::sync::Arc;

use crate::bmap::Mapping;
use crate::error::{Error, Result};
use crate::format::inode::Inode;
use crate::format::superblock::ro_compat;
use crate::format::Timespec;
use crate::fs::Core;

impl Core {
    /// Largest size a file with this inode may have, in bytes.
    pub(crate) fn max_file_size(&self, inode: &Inode) -> u64 {
        let bs = u64::from(self.geo.block_size);
        let by_map = (self.max_file_blocks(inode) - 1) * bs;
        // Without huge_file, i_blocks (512-byte units) must fit in 32 bits.
        if !self.sb.has_ro_compat(ro_compat::HUGE_FILE) {
            return by_map.min(((1u64 << 32) - 1) * 512);
        }
        by_map
    }

    /// Read file data of `inode` at `offset` into `buf` through the page
    /// cache; returns bytes read (short at end of file).
    pub(crate) fn read_data(
        &mut self,
        inode: &Inode,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let m = self.mapping_of(inode.ino);
        let n =
            folio_iomap::buffered_read(self, &m, u64::from(inode.ino), inode.size(), offset, buf)?;
        if self.pc.over_budget() {
            self.pc.balance();
        }
        Ok(n)
    }

    fn regular(&mut self, ino: u32) -> Result<Inode> {
        let inode = self.read_inode(ino)?;
        if inode.is_dir() {
            return Err(Error::IsDir);
        }
        if !inode.is_reg() {
            return Err(Error::Invalid("not a regular file".into()));
        }
        crate::fscrypt::need_key(&inode, "read or write its data")?;
        Ok(inode)
    }

    /// Read from file `ino`.
    pub fn read(&mut self, ino: u32, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.regular(ino)?;
        if crate::verity::is_verity(&inode) {
            return self.read_verified(&inode, offset, buf);
        }
        if inode.links() > 0 {
            self.inodes.note(ino, self.file_note(&inode));
        }
        self.read_data(&inode, offset, buf)
    }

    /// A read of verity file `inode`: its blocks checked against the
    /// Merkle tree first (EIO, and nothing copied, on a mismatch).
    fn read_verified(&mut self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let bs = u64::from(self.geo.block_size);
        let end = offset.saturating_add(buf.len() as u64).min(inode.size());
        if end > offset {
            self.verify_blocks(inode, offset / bs, (end - 1) / bs)?;
        }
        self.read_data(inode, offset, buf)
    }

    /// Zero the bytes of the block holding byte `size` from `size` to the
    /// block's end (the file is about to grow past `size`).
    fn zero_block_tail(&mut self, inode: &Inode, size: u64) -> Result<()> {
        let m = self.mapping_of(inode.ino);
        folio_iomap::zero_tail(self, &m, u64::from(inode.ino), size)
    }

    /// A buffered write (see `Filesystem::write_with`). Dirty-data
    /// throttling is the caller's: `Filesystem` writes back in batches
    /// that let other threads in.
    pub(crate) fn write_with(
        &mut self,
        ino: u32,
        offset: u64,
        len: usize,
        src: &mut dyn FnMut(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<usize> {
        // Delayed allocation: the write itself changes only the inode (the
        // old last block's tail is zeroed through the page cache);
        // allocation happens at writeback, in handles of its own.
        let inode = self.read_inode(ino)?;
        let mut inline = Self::is_inline(&inode);
        if !inline && self.may_become_inline(&inode, offset, len) {
            // The kernel's first write of a small new file: inline.
            self.make_inline_file(ino)?;
            inline = true;
        }
        if inline {
            if let Some(n) = self.write_inline(ino, offset, len, &mut *src)? {
                return Ok(n);
            }
            self.uninline(ino)?;
        }
        let c = self.namespace_credits();
        let r = self.retry_nospc(c, |fs| fs.write_impl(ino, offset, len, &mut *src));
        self.balance_budget();
        r
    }

    fn write_impl(
        &mut self,
        ino: u32,
        offset: u64,
        len: usize,
        src: &mut dyn FnMut(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<usize> {
        self.check_writable()?;
        let inode = self.regular(ino)?;
        // Append-only files are the mount's to police at open (O_APPEND):
        // a write here may be the kernel's writeback of a page.
        crate::ops::check_changeable(&inode, true)?;
        crate::verity::check_data_changeable(&inode)?;
        if len == 0 {
            return Ok(0);
        }
        let end = offset.checked_add(len as u64).ok_or(Error::FileTooBig)?;
        if end > self.max_file_size(&inode) {
            return Err(Error::FileTooBig);
        }
        let old_size = inode.size();
        if offset > old_size {
            self.zero_block_tail(&inode, old_size)?;
        }
        let m = self.mapping_of(ino);
        self.inflight.clear();
        let out = folio_iomap::buffered_write(
            self,
            &m,
            u64::from(ino),
            old_size,
            offset,
            len as u64,
            src,
        );
        self.inflight.clear();
        if out.written > 0 {
            self.note_written(ino, offset, out.written)?;
        }
        match out.error {
            Some(e) if out.written == 0 => Err(e),
            _ => Ok(out.written as usize),
        }
    }

    /// O_DIRECT write: `offset` and `data.len()` must be multiples of the
    /// block size (EINVAL otherwise). Cached data of the range is written
    /// back and dropped first, so no later writeback can overwrite what
    /// this puts on the device.
    pub fn write_direct(&mut self, ino: u32, offset: u64, data: &[u8]) -> Result<usize> {
        self.uninline(ino)?;
        // Drops cached pages of the range: before the transaction.
        let _order = Held::take(Level::Invalidate, u64::from(ino));
        let blocks = (data.len() as u64).div_ceil(u64::from(self.geo.block_size)) + 1;
        let c = self.namespace_credits() + 2 * self.alloc_credits(ino, blocks);
        self.retry_nospc(c, |fs| fs.write_direct_impl(ino, offset, data))
    }

    pub(crate) fn write_direct_impl(
        &mut self,
        ino: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<usize> {
        self.check_writable()?;
        let inode = self.regular(ino)?;
        crate::ops::check_changeable(&inode, true)?;
        crate::verity::check_data_changeable(&inode)?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(Error::FileTooBig)?;
        if end > self.max_file_size(&inode) {
            return Err(Error::FileTooBig);
        }
        if self.map_pinned(ino) {
            return Err(Error::Busy);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let old_size = inode.size();
        if offset > old_size {
            self.zero_block_tail(&inode, old_size)?;
            // The tail block may be cached dirty: direct I/O must not race
            // its writeback, so settle it now.
            let bs = u64::from(self.geo.block_size);
            self.writeback_range(ino, old_size / bs * bs, old_size.div_ceil(bs) * bs)?;
        }
        let m = self.mapping_of(ino);
        let pc = Arc::clone(&self.pc);
        let n = folio_iomap::direct_write(self, &pc, &m, u64::from(ino), offset, data)?;
        self.note_written(ino, offset, n)?;
        Ok(n as usize)
    }

    /// After `n` bytes were written at `offset`: grow the size if they
    /// reach past it, and set mtime and ctime.
    fn note_written(&mut self, ino: u32, offset: u64, n: u64) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        let end = offset + n;
        if end > inode.size() {
            inode.set_size(end);
            self.note_large_file(end);
        }
        let now = Timespec::now();
        inode.set_mtime(now);
        inode.set_ctime(now);
        self.write_inode(&mut inode)?;
        self.bytes_written += n;
        Ok(())
    }

    /// O_DIRECT read: block-aligned offset and length (EINVAL otherwise).
    pub fn read_direct(&mut self, ino: u32, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.regular(ino)?;
        // As ext4: no direct I/O around the verification.
        if crate::verity::is_verity(&inode) {
            return self.read_verified(&inode, offset, buf);
        }
        let m = self.mapping_of(ino);
        let pc = Arc::clone(&self.pc);
        folio_iomap::direct_read(self, &pc, &m, u64::from(ino), inode.size(), offset, buf)
    }

    /// Pin the block map of `ino` for a client that does its own block I/O
    /// (a swap file, the md bitmap of seed 002): dirty data is written
    /// back, delayed and unwritten blocks are made real, the cache is
    /// dropped, and until [`Self::unpin_mapping`] anything that would move
    /// or free blocks (truncate, fallocate, direct I/O) fails with EBUSY
    /// (ETXTBSY for truncate, as for an active swap file). Returns the
    /// map as (logical block, device block, length) runs.
    pub fn pin_mapping(&mut self, ino: u32) -> Result<Vec<(u64, u64, u64)>> {
        self.uninline(ino)?;
        let inode = self.regular(ino)?;
        crate::verity::check_data_changeable(&inode)?;
        self.flush_range(ino, 0, u64::MAX)?;
        let bs = u64::from(self.geo.block_size);
        let blocks = inode.size().div_ceil(bs);
        let mut runs = Vec::new();
        let mut l = 0;
        while l < blocks {
            let (m, n) = self.map_block(&inode, l, blocks - l)?;
            match m {
                Mapping::Mapped {
                    pblk,
                    unwritten: false,
                } => runs.push((l, pblk, n)),
                _ => {
                    return Err(Error::Invalid(
                        "the file has holes or unwritten extents; a pinned map must be fully \
                         written (write it out first)"
                            .into(),
                    ))
                }
            }
            l += n;
        }
        self.sync()?;
        self.inodes.obj(ino).data().pinned = true;
        Ok(runs)
    }

    /// Release a pin taken by [`Self::pin_mapping`]. Data the client wrote
    /// to the blocks meanwhile is what the file now holds; the cache was
    /// dropped at pin time and stays coherent.
    pub fn unpin_mapping(&mut self, ino: u32) -> Result<()> {
        let was = self
            .inodes
            .get(ino)
            .is_some_and(|o| std::mem::take(&mut o.data().pinned));
        if !was {
            return Err(Error::Invalid("the mapping is not pinned".into()));
        }
        self.flush_range(ino, 0, u64::MAX)
    }

    /// Whether `ino`'s block map is pinned (`pin_mapping`).
    pub(crate) fn map_pinned(&self, ino: u32) -> bool {
        self.inodes.get(ino).is_some_and(|o| o.data().pinned)
    }

    /// Set the large_file feature once a file passes 2 GiB.
    pub(crate) fn note_large_file(&mut self, size: u64) {
        if size > 0x7fff_ffff && !self.sb.has_ro_compat(ro_compat::LARGE_FILE) {
            let f = self.sb.feature_ro_compat() | ro_compat::LARGE_FILE;
            self.sb.set_feature_ro_compat(f);
            self.sb_dirty = true;
        }
        if self.sb.has_ro_compat(ro_compat::LARGE_FILE) {
            self.inodes.set_large_file();
        }
    }

    /// Change the size of a regular file, freeing blocks past a smaller
    /// size and zeroing the partial block tail either way. The caller
    /// writes the inode.
    pub(crate) fn set_size(&mut self, inode: &mut Inode, size: u64) -> Result<()> {
        self.check_writable()?;
        if !inode.is_reg() {
            return Err(if inode.is_dir() {
                Error::IsDir
            } else {
                Error::Invalid("only regular files can be truncated".into())
            });
        }
        if size > self.max_file_size(inode) {
            return Err(Error::FileTooBig);
        }
        if self.map_pinned(inode.ino) {
            return Err(Error::TextBusy);
        }
        let bs = u64::from(self.geo.block_size);
        let old = inode.size();
        if Self::is_inline(inode) {
            // Callers convert an inline file that would outgrow its
            // inline area first (`uninline`); within it, in place.
            if !self.resize_inline(inode, size)? {
                return Err(Error::Unsupported(format!(
                    "a size change of inline inode {} without converting it first",
                    inode.ino
                )));
            }
            let now = Timespec::now();
            inode.set_mtime(now);
            inode.set_ctime(now);
            return Ok(());
        }
        if size < old {
            // Cached folios beyond the new size go (dirty data there now
            // belongs to no file), then the blocks, then the new last
            // block's tail is zeroed.
            self.cache_truncate(inode.ino, size)?;
            self.truncate_blocks(inode, size.div_ceil(bs))?;
            inode.set_size(size);
            self.write_inode(inode)?;
            self.zero_block_tail(inode, size)?;
            *inode = self.read_inode(inode.ino)?;
        } else if size > old {
            self.zero_block_tail(inode, old)?;
            self.note_large_file(size);
        }
        inode.set_size(size);
        let now = Timespec::now();
        inode.set_mtime(now);
        inode.set_ctime(now);
        Ok(())
    }
}
