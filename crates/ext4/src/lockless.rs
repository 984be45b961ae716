//! Buffered writes without the core lock (issue 12, step 5).
//!
//! A write to a file that is open (it holds an open reference, so it
//! cannot be freed under the writer) and whose extent map is loaded runs
//! under the file's inode lock only:
//! - `begin` looks the span up in the inode's extent map and delayed
//!   runs (under the inode's data lock), reserves its holes against the
//!   shared free-space accounting — the same reservation the core makes,
//!   so writeback always finds the blocks — and describes the span;
//! - the generic buffered write copies the data into the cache, folio by
//!   folio (edge blocks read from the device or zeroed, as through the
//!   core);
//! - `end` gives back what the copy did not use;
//! - the new size and times go into the inode object
//!   ([`crate::inodes::InodeInfo::advance`]) folio by folio, while each
//!   folio is still locked (`IomapOps::copied`, Linux's `write_end`), so
//!   the core's writeback, which locks the folio, never maps data past
//!   the size it writes with the extent; ahead of the inode block:
//!   every read of the inode through the core folds them in, writeback's
//!   writes of the inode carry them, and sync, fsync and close write them
//!   out (the kernel's dirty inode). No journal handle is taken.
//!
//! Why this is safe against the core working on the same file at the
//! same time: everything that changes the file's size or moves or frees
//! its blocks from above (truncation, fallocate, direct writes, pinning,
//! attribute changes, the last close) takes the inode lock first, and an
//! open file is never freed. What runs without it is writeback, which only
//! turns delayed runs into mapped ones (or back, on a failed write), under
//! the folio locks and the data lock: a hole stays a hole, and a block the
//! writer finds delayed or mapped needs no reservation either way.
//!
//! Anything else — a file not open, an indirect-mapped file, a map not
//! loaded, a full filesystem (the core retries after a commit), a file
//! passing 2 GiB before the image has the large_file feature — goes
//! through the core, from where this path stopped.

use std::sync::Arc;

use folio_blockdev::BlockDevice;
use folio_iomap::{flags, Iomap, IomapKind, IomapOps};

use crate::api::Filesystem;
use crate::data::{give_back, reserve_runs, Delalloc};
use crate::error::{Error, Result};
use crate::extent_tree::ExtentMap;
use crate::format::Timespec;
use crate::inodes::InodeInfo;

/// The mapping operations of a lock-free write.
struct Lockless<'a> {
    fs: &'a Filesystem,
    obj: &'a InodeInfo,
    bs: u64,
    /// Runs this write reserved (given back in part by `end`).
    inflight: Vec<(u64, u64)>,
    /// `begin` declined: the rest of the write goes through the core.
    declined: bool,
    /// The write's time (mtime and ctime).
    now: Timespec,
}

/// The holes of `[lblk, lblk+n)`: neither mapped nor delayed.
fn holes(map: &ExtentMap, da: &Delalloc, lblk: u64, n: u64) -> Vec<(u64, u64)> {
    let end = lblk + n;
    let mut out = Vec::new();
    let mut cur = lblk;
    while cur < end {
        if let Some(e) = map.containing(cur) {
            cur = (u64::from(e.lblk) + u64::from(e.len)).min(end);
            continue;
        }
        if let Some((s, l)) = da.run_at(cur) {
            cur = (s + l).min(end);
            continue;
        }
        let next_extent = map.after(cur).map_or(end, |e| u64::from(e.lblk));
        let next_run = da.next_start(cur).unwrap_or(end);
        let stop = next_extent.min(next_run).min(end);
        out.push((cur, stop - cur));
        cur = stop;
    }
    out
}

/// Describe `[lblk, lblk+n)` from the extent map and the delayed runs.
fn describe(map: &ExtentMap, da: &Delalloc, lblk: u64, n: u64, bs: u64) -> Iomap {
    let (kind, addr, len) = if let Some(e) = map.containing(lblk) {
        let off = lblk - u64::from(e.lblk);
        let kind = if e.unwritten {
            IomapKind::Unwritten
        } else {
            IomapKind::Mapped
        };
        (kind, (e.pblk + off) * bs, (u64::from(e.len) - off).min(n))
    } else {
        let gap = map
            .after(lblk)
            .map_or(n, |e| (u64::from(e.lblk) - lblk).min(n));
        match da.run_at(lblk) {
            Some((s, l)) => (IomapKind::Delalloc, 0, (s + l - lblk).min(gap)),
            None => {
                let next = da.next_start(lblk).unwrap_or(u64::MAX);
                (IomapKind::Hole, 0, (next - lblk).min(gap))
            }
        }
    };
    Iomap {
        kind,
        offset: lblk * bs,
        length: len.max(1) * bs,
        addr,
        new: false,
        inline: Vec::new(),
    }
}

impl Lockless<'_> {
    fn decline(&mut self) -> Error {
        self.declined = true;
        Error::Busy
    }
}

impl IomapOps for Lockless<'_> {
    type Error = Error;

    fn device(&self) -> Arc<dyn BlockDevice> {
        Arc::clone(&self.fs.dev)
    }

    fn begin(&mut self, _ino: u64, pos: u64, len: u64, fl: u32) -> Result<Iomap> {
        let bs = self.bs;
        let lblk = pos / bs;
        let n = (pos + len.max(1)).div_ceil(bs) - lblk;
        let shape = self.obj.shape();
        let mut d = self.obj.data();
        let d = &mut *d;
        let Some(map) = d.extents.as_ref() else {
            return Err(self.decline());
        };
        if fl & flags::WRITE != 0 {
            let want = holes(map, &d.delalloc, lblk, n);
            let got = reserve_runs(&self.fs.inodes.space, bs, shape, &mut d.delalloc, &want)?;
            self.inflight.extend(got);
            let map = describe(map, &d.delalloc, lblk, n, bs);
            if map.kind == IomapKind::Hole {
                // Out of space here: the core writes back, commits and
                // tries again.
                return Err(self.decline());
            }
            return Ok(map);
        }
        let map = describe(map, &d.delalloc, lblk, n, bs);
        if fl == flags::REPORT {
            return Ok(map);
        }
        // A read's fill: holes, unwritten and mapped blocks stay what they
        // are while the reader holds the inode lock shared (see
        // `read_lockless`); a delayed run may become mapped under it
        // (writeback), so it goes through the core.
        if fl == 0 && map.kind != IomapKind::Delalloc {
            return Ok(map);
        }
        Err(self.decline())
    }

    /// The size moves with each folio, under its lock, as Linux's
    /// `generic_write_end` sets i_size before unlocking the page: the
    /// core's writeback, which runs alongside and locks the folio, then
    /// finds the size covering the data it maps and writes it to the
    /// inode with the new extent (a crash never leaves blocks past the
    /// size).
    fn copied(&mut self, _ino: u64, end: u64) {
        self.obj.advance(end, self.now);
    }

    fn end(&mut self, _ino: u64, pos: u64, len: u64, done: u64, fl: u32, _: &Iomap) -> Result<()> {
        if fl & flags::WRITE == 0 || self.inflight.is_empty() {
            return Ok(());
        }
        let bs = self.bs;
        let shape = self.obj.shape();
        let mut d = self.obj.data();
        give_back(
            &self.fs.inodes.space,
            bs,
            shape,
            &mut d.delalloc,
            &mut self.inflight,
            (pos + done).div_ceil(bs),
            (pos + len).div_ceil(bs),
        )
    }
}

impl Filesystem {
    /// A read of an open file's data that the cache does not hold, without
    /// the core lock: under the inode lock held shared, which keeps out
    /// writers and every change of the size or block map from above
    /// (truncation, fallocate, direct writes), and with an open reference
    /// (so the file is not freed meanwhile), the holes, unwritten and
    /// mapped blocks the extent map describes stay what they are while
    /// the blocks are read into the cache; writeback, which runs alongside,
    /// only maps delayed runs, and a range with one goes through the core.
    /// `None`: ask the core.
    pub(crate) fn read_lockless(&self, ino: u32, offset: u64, buf: &mut [u8]) -> Option<usize> {
        let obj = self.inodes.get(ino)?;
        let _shared = obj.lock_shared();
        if !obj.regular() || obj.open_refs() == 0 || !obj.shape().extents {
            return None;
        }
        let m = self
            .pc
            .mapping(u64::from(ino), self.geo.block_size as usize);
        let mut ops = Lockless {
            fs: self,
            obj: &obj,
            bs: u64::from(self.geo.block_size),
            inflight: Vec::new(),
            declined: false,
            now: Timespec::now(),
        };
        let r = folio_iomap::buffered_read(&mut ops, &m, u64::from(ino), obj.size(), offset, buf);
        if self.pc.over_budget() {
            self.pc.balance();
        }
        // An error here is the device's or the map's: the core reads
        // again and reports what it finds.
        let n = r.ok()?;
        self.inodes.add_fill(n as u64);
        Some(n)
    }

    /// The lock-free part of a buffered write (see the module): writes as
    /// much of `[offset, offset+len)` as it can, in order. Returns the
    /// bytes written and whether the source stopped short; 0 bytes and
    /// no error when the write must go through the core. Call holding
    /// the inode lock of `obj`.
    pub(crate) fn write_lockless(
        &self,
        obj: &InodeInfo,
        ino: u32,
        offset: u64,
        len: usize,
        src: &mut dyn FnMut(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<(usize, bool)> {
        const LARGE_FILE: u64 = 0x7fff_ffff;
        let not_here = Ok((0, false));
        if len == 0
            || !self.inodes.writable()
            || !obj.writable_lock_free()
            || obj.open_refs() == 0
            || !obj.shape().extents
            || (obj.size() == 0 && self.inodes.inline_files())
        {
            // (An empty file on an inline_data image may become inline:
            // the core decides.)
            return not_here;
        }
        let Some(end) = offset.checked_add(len as u64) else {
            return not_here;
        };
        if end > obj.max_size() || (end > LARGE_FILE && !self.inodes.large_file()) {
            return not_here;
        }
        let old_size = obj.size();
        let m = self
            .pc
            .mapping(u64::from(ino), self.geo.block_size as usize);
        let mut ops = Lockless {
            fs: self,
            obj,
            bs: u64::from(self.geo.block_size),
            inflight: Vec::new(),
            declined: false,
            now: Timespec::now(),
        };
        if offset > old_size {
            // The old last block's tail must read as zeros once the file
            // grows past it.
            if let Err(e) = folio_iomap::zero_tail(&mut ops, &m, u64::from(ino), old_size) {
                return if ops.declined { not_here } else { Err(e) };
            }
        }
        let out = folio_iomap::buffered_write(
            &mut ops,
            &m,
            u64::from(ino),
            old_size,
            offset,
            len as u64,
            src,
        );
        let written = out.written as usize;
        if written > 0 {
            // (`copied` has moved the size folio by folio already.)
            obj.advance(offset + out.written, ops.now);
            self.inodes.add_written(out.written);
        }
        match out.error {
            None => Ok((written, false)),
            Some(_) if ops.declined => Ok((written, false)),
            Some(e) if written == 0 => Err(e),
            Some(_) => Ok((written, true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::extent::Extent;

    fn map(list: &[(u32, u32, u64, bool)]) -> ExtentMap {
        ExtentMap::from_sorted(
            list.iter()
                .map(|&(lblk, len, pblk, unwritten)| Extent {
                    lblk,
                    len,
                    pblk,
                    unwritten,
                })
                .collect(),
        )
    }

    /// Writeback writes an inode from a copy read before a lock-free
    /// writer moved the size on: the write must keep the newer size and
    /// times (the object's), not the copy's.
    #[test]
    fn an_inode_written_from_an_older_copy_keeps_what_lock_free_writers_set() {
        use crate::mkfs::{mkfs, MkfsOptions};
        use crate::{OpenOptions, Owner, ROOT_INO};
        let dev = Arc::new(folio_blockdev::MemDevice::new(16 << 20));
        mkfs(dev.clone(), 16 << 20, &MkfsOptions::default()).unwrap();
        let fs = Filesystem::open(dev, OpenOptions::default()).unwrap();
        let f = fs.create(ROOT_INO, b"f", 0o644, Owner::default()).unwrap();
        fs.open_ref(f);
        fs.write(f, 0, &[1; 4096]).unwrap();
        let later = Timespec {
            sec: Timespec::now().sec + 100,
            nsec: 0,
        };
        {
            let mut c = fs.core();
            let mut copy = c.read_inode(f).unwrap();
            assert_eq!(copy.size(), 4096);
            // A lock-free writer, between writeback's read and write.
            fs.inodes.get(f).unwrap().advance(10_000, later);
            c.write_inode(&mut copy).unwrap();
        }
        let st = fs.stat(f).unwrap();
        assert_eq!((st.size, st.mtime), (10_000, later));
        // And it is in the block now: nothing is left ahead of it.
        assert!(fs.inodes.ahead_inodes().is_empty());
        fs.close_ref(f).unwrap();
        fs.close().unwrap();
    }

    #[test]
    fn holes_skip_extents_and_delayed_runs() {
        let m = map(&[(10, 5, 100, false), (30, 2, 200, true)]);
        let mut da = Delalloc::default();
        da.runs.insert(20, 4);
        da.blocks = 4;
        assert_eq!(
            holes(&m, &da, 0, 40),
            vec![(0, 10), (15, 5), (24, 6), (32, 8)]
        );
        assert_eq!(holes(&m, &da, 11, 3), vec![], "inside one extent");
        assert_eq!(holes(&m, &da, 21, 12), vec![(24, 6), (32, 1)]);
    }

    #[test]
    fn describe_reports_each_kind_up_to_the_next_change() {
        let m = map(&[(10, 5, 100, false), (30, 2, 200, true)]);
        let mut da = Delalloc::default();
        da.runs.insert(20, 4);
        da.blocks = 4;
        let bs = 1024;
        let d = describe(&m, &da, 12, 100, bs);
        assert_eq!(
            (d.kind, d.addr, d.length),
            (IomapKind::Mapped, 102 * bs, 3 * bs)
        );
        let d = describe(&m, &da, 15, 100, bs);
        assert_eq!((d.kind, d.length), (IomapKind::Hole, 5 * bs));
        let d = describe(&m, &da, 21, 100, bs);
        assert_eq!((d.kind, d.length), (IomapKind::Delalloc, 3 * bs));
        let d = describe(&m, &da, 31, 100, bs);
        assert_eq!(
            (d.kind, d.addr, d.length),
            (IomapKind::Unwritten, 201 * bs, bs)
        );
        let d = describe(&m, &da, 40, 7, bs);
        assert_eq!((d.kind, d.length), (IomapKind::Hole, 7 * bs));
    }
}
