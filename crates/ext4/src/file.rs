//! File data: reads, writes and size changes.
//!
//! This is the direct data path the issue-2 library uses (data goes to the
//! device, metadata through the buffer cache). The page cache and iomap
//! layers will take its place. Two rules hold already:
//! - a block allocated for a write is fully written (data plus zeros)
//!   before anything can read it, so no stale disk contents are exposed;
//! - when a file grows (write past EOF, truncate up), the bytes of the old
//!   last block beyond the old size are zeroed first.

use crate::bmap::Mapping;
use crate::error::{Error, Result};
use crate::format::inode::Inode;
use crate::format::superblock::ro_compat;
use crate::format::Timespec;
use crate::fs::Filesystem;

/// Largest single device write the data path issues.
const MAX_IO_BYTES: u64 = 1 << 20;

impl Filesystem {
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

    /// Read file data of `inode` at `offset` into `buf`; returns bytes read
    /// (short at end of file).
    pub(crate) fn read_data(
        &mut self,
        inode: &Inode,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let size = inode.size();
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = (size - offset).min(buf.len() as u64) as usize;
        let bs = u64::from(self.geo.block_size);
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let lblk = pos / bs;
            let in_blk = pos % bs;
            let want_blocks = (in_blk + (len - done) as u64).div_ceil(bs);
            let (m, n) = self.map_block(inode, lblk, want_blocks)?;
            let run_bytes = (n * bs - in_blk).min((len - done) as u64) as usize;
            let out = &mut buf[done..done + run_bytes];
            match m {
                Mapping::Hole
                | Mapping::Mapped {
                    unwritten: true, ..
                } => out.fill(0),
                Mapping::Mapped { pblk, .. } => {
                    self.dev().read_at(pblk * bs + in_blk, out)?;
                }
            }
            done += run_bytes;
        }
        Ok(len)
    }

    /// Read from file `ino`.
    pub fn read(&mut self, ino: u32, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.read_inode(ino)?;
        if inode.is_dir() {
            return Err(Error::IsDir);
        }
        if !inode.is_reg() {
            return Err(Error::Invalid("not a regular file".into()));
        }
        self.read_data(&inode, offset, buf)
    }

    /// Zero the bytes of the block holding byte `size` from `size` to the
    /// block's end, if that block is mapped and written.
    fn zero_block_tail(&mut self, inode: &Inode, size: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let in_blk = size % bs;
        if in_blk == 0 {
            return Ok(());
        }
        if let (
            Mapping::Mapped {
                pblk,
                unwritten: false,
            },
            _,
        ) = self.map_block(inode, size / bs, 1)?
        {
            let zeros = vec![0u8; (bs - in_blk) as usize];
            self.dev().write_at(pblk * bs + in_blk, &zeros)?;
        }
        Ok(())
    }

    /// Write `data` to file `ino` at `offset`. Returns the bytes written.
    pub fn write(&mut self, ino: u32, offset: u64, data: &[u8]) -> Result<usize> {
        self.retry_nospc(|fs| fs.write_impl(ino, offset, data))
    }

    fn write_impl(&mut self, ino: u32, offset: u64, data: &[u8]) -> Result<usize> {
        self.check_writable()?;
        let mut inode = self.read_inode(ino)?;
        if inode.is_dir() {
            return Err(Error::IsDir);
        }
        if !inode.is_reg() {
            return Err(Error::Invalid("not a regular file".into()));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(Error::FileTooBig)?;
        if end > self.max_file_size(&inode) {
            return Err(Error::FileTooBig);
        }
        let old_size = inode.size();
        if offset > old_size {
            self.zero_block_tail(&inode, old_size)?;
        }
        let bs = u64::from(self.geo.block_size);
        let first = offset / bs;
        let last = (end - 1) / bs;
        let fresh = self.allocate_range(&mut inode, first, last - first + 1)?;
        let is_fresh = |l: u64| fresh.iter().any(|&(s, n)| l >= s && l < s + n);
        let mut pos = offset;
        while pos < end {
            let lblk = pos / bs;
            let (m, n) = self.map_block(&inode, lblk, last - lblk + 1)?;
            let Mapping::Mapped {
                pblk,
                unwritten: false,
            } = m
            else {
                return Err(Error::corrupted(
                    format!("inode {ino}: block {lblk} unmapped right after allocation"),
                    0,
                ));
            };
            // Cut the run where freshness changes and at MAX_IO_BYTES.
            let fresh_run = is_fresh(lblk);
            let mut k = 1;
            while k < n && is_fresh(lblk + k) == fresh_run && k * bs < MAX_IO_BYTES {
                k += 1;
            }
            let run_start = lblk * bs;
            let run_end = ((lblk + k) * bs).min(if fresh_run { u64::MAX } else { end });
            let data_from = pos;
            let data_to = end.min((lblk + k) * bs);
            let src = &data[(data_from - offset) as usize..(data_to - offset) as usize];
            if fresh_run {
                // Whole blocks: the data, zeros around it.
                let mut buf = vec![0u8; (run_end - run_start) as usize];
                let at = (data_from - run_start) as usize;
                buf[at..at + src.len()].copy_from_slice(src);
                self.dev().write_at(pblk * bs, &buf)?;
            } else {
                self.dev()
                    .write_at(pblk * bs + (data_from - run_start), src)?;
            }
            pos = data_to;
        }
        self.bytes_written += data.len() as u64;
        if end > old_size {
            inode.set_size(end);
            self.note_large_file(end);
        }
        let now = Timespec::now();
        inode.set_mtime(now);
        inode.set_ctime(now);
        self.write_inode(&mut inode)?;
        Ok(data.len())
    }

    /// Set the large_file feature once a file passes 2 GiB.
    pub(crate) fn note_large_file(&mut self, size: u64) {
        if size > 0x7fff_ffff && !self.sb.has_ro_compat(ro_compat::LARGE_FILE) {
            let f = self.sb.feature_ro_compat() | ro_compat::LARGE_FILE;
            self.sb.set_feature_ro_compat(f);
            self.sb_dirty = true;
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
        let bs = u64::from(self.geo.block_size);
        let old = inode.size();
        if size < old {
            self.truncate_blocks(inode, size.div_ceil(bs))?;
            self.zero_block_tail(inode, size)?;
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
