//! inline_data: small files, symlinks and directories kept inside the
//! inode (`EXT4_INLINE_DATA_FL`), as the kernel's fs/ext4/inline.c lays
//! them out: the first 60 bytes in `i_block`, the rest in the value of the
//! in-inode xattr `system.data` (index 7, name "data"; present, maybe
//! empty, on every inline inode). A directory's inline area starts with
//! its parent's inode number (4 bytes, no "." or ".." entries); entries
//! follow in the usual dirent format, the `i_block` part and the xattr
//! part each filled by their record lengths.
//!
//! folio reads all of it. A buffered write or a size change of an inline
//! file that stays within its inline capacity (`i_block` and the present
//! length of `system.data`), and a name removed from, renamed in or added
//! to an inline directory with room for it, is done in place, as the
//! kernel does it. Before anything else changes an inline inode's data
//! or entries (a write or size change that outgrows it, a name that does
//! not fit, fallocate, direct I/O, pinning, an xattr change)
//! it is converted to a block-mapped one — what the kernel does when
//! inline data outgrows the inode ([`Core::uninline`]). New directories
//! are made inline, as the kernel makes them ([`Core::inline_dir_init`]),
//! and an empty file's first write becomes inline when it fits in
//! `i_block` ([`Core::make_inline_file`]).

use crate::error::{Error, Result};
use crate::format::dirent::{parse_entries, RawEntry};
use crate::format::inode::{Inode, FL_INLINE_DATA};
use crate::format::put32;
use crate::format::superblock::incompat;
use crate::format::xattr::Xattr;
use crate::format::Timespec;
use crate::fs::Core;
use folio_pagecache::lockdep::{Held, Level};

/// The bytes of `i_block` that hold inline data (EXT4_MIN_INLINE_DATA_SIZE).
pub(crate) const INLINE_ROOT: usize = 60;
/// `system.data`'s index and name.
const DATA_INDEX: u8 = 7;
const DATA_NAME: &[u8] = b"data";

/// True for the xattr that holds inline data past `i_block`.
pub(crate) fn is_data_xattr(index: u8, name: &[u8]) -> bool {
    index == DATA_INDEX && name == DATA_NAME
}

impl Core {
    pub(crate) fn is_inline(inode: &Inode) -> bool {
        inode.flags() & FL_INLINE_DATA != 0
    }

    /// The whole inline area of `inode`: `i_block`, then `system.data`'s
    /// value.
    fn inline_area(&mut self, inode: &Inode) -> Result<Vec<u8>> {
        let mut area = inode.i_block()[..INLINE_ROOT].to_vec();
        let extra = self
            .all_xattrs(inode)?
            .into_iter()
            .find(|x| is_data_xattr(x.index, &x.name));
        match extra {
            Some(x) if x.ea.is_some() => {
                return Err(Error::corrupted(
                    format!("inode {}: inline data in an EA inode", inode.ino),
                    0,
                ))
            }
            Some(x) => area.extend_from_slice(&x.value),
            None => {
                return Err(Error::corrupted(
                    format!("inode {}: inline data without system.data", inode.ino),
                    0,
                ))
            }
        }
        Ok(area)
    }

    /// The data of an inline file or symlink (`i_size` bytes).
    pub(crate) fn inline_data(&mut self, inode: &Inode) -> Result<Vec<u8>> {
        let mut area = self.inline_area(inode)?;
        let size = inode.size();
        if size > area.len() as u64 {
            return Err(Error::corrupted(
                format!(
                    "inode {}: size {size} beyond its {} bytes of inline data",
                    inode.ino,
                    area.len()
                ),
                0,
            ));
        }
        area.truncate(size as usize);
        Ok(area)
    }

    /// An inline directory: its parent and its entries (in use or not).
    pub(crate) fn inline_dir(&mut self, dir: &Inode) -> Result<(u32, Vec<RawEntry>)> {
        let area = self.inline_area(dir)?;
        let bad = |e: &str| Error::corrupted(format!("inline directory {}: {e}", dir.ino), 0);
        let parent = u32::from_le_bytes(area[..4].try_into().expect("4 bytes"));
        let mut out = parse_entries(&area[4..INLINE_ROOT], INLINE_ROOT - 4).map_err(bad)?;
        if area.len() > INLINE_ROOT {
            let rest = &area[INLINE_ROOT..];
            out.extend(parse_entries(rest, rest.len()).map_err(bad)?);
        }
        Ok((parent, out))
    }

    /// Would `name` fit in inline directory `dir` as it is?
    pub(crate) fn inline_dir_fits(&mut self, dir: &Inode, name: &[u8]) -> Result<bool> {
        let mut area = self.inline_area(dir)?;
        self.insert_in_area(dir, &mut area, name, 0, 0)
    }

    /// Insert an entry into the first region of `area` with room for it.
    fn insert_in_area(
        &self,
        dir: &Inode,
        area: &mut [u8],
        name: &[u8],
        ino: u32,
        code: u8,
    ) -> Result<bool> {
        let (root, rest) = area.split_at_mut(INLINE_ROOT);
        for region in [&mut root[4..], rest] {
            if region.is_empty() {
                continue;
            }
            let len = region.len();
            if crate::dir::leaf_insert(region, len, name, ino, code).map_err(|_| bad_dir(dir))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Add an entry to inline directory `dir` in place; `false` if there
    /// is no room (the caller should have converted it). Writes the inode
    /// (times too) and leaves `dir` as written.
    pub(crate) fn inline_dir_add(
        &mut self,
        dir: &mut Inode,
        name: &[u8],
        ino: u32,
        code: u8,
    ) -> Result<bool> {
        *dir = self.read_inode(dir.ino)?;
        let mut area = self.inline_area(dir)?;
        if !self.insert_in_area(dir, &mut area, name, ino, code)? {
            return Ok(false);
        }
        self.store_inline(dir, &area)?;
        let now = Timespec::now();
        dir.set_mtime(now);
        dir.set_ctime(now);
        self.write_inode(dir)?;
        Ok(true)
    }

    /// Remove `name` from inline directory `ino` in place (the record
    /// joins the one before it in its region, or is marked unused);
    /// returns the inode it named. Writes the directory inode.
    pub(crate) fn inline_dir_remove(&mut self, ino: u32, name: &[u8]) -> Result<u32> {
        self.inline_dir_edit(ino, name, |region, prev, e| match prev {
            Some(p) => {
                let merged = p.rec_len + e.rec_len;
                let v = crate::format::dirent::rec_len_to_disk(merged, region.len());
                crate::format::put16(region, p.offset + 4, v);
            }
            None => put32(region, e.offset, 0),
        })
    }

    /// Point `name` of inline directory `ino` at `target` in place.
    pub(crate) fn inline_dir_set(
        &mut self,
        ino: u32,
        name: &[u8],
        target: u32,
        code: u8,
    ) -> Result<()> {
        self.inline_dir_edit(ino, name, |region, _, e| {
            put32(region, e.offset, target);
            region[e.offset + 7] = code;
        })
        .map(|_| ())
    }

    /// Find `name` in inline directory `ino`, let `f` edit its region
    /// (given the entry before it there), store the area and write the
    /// inode. Returns the inode the name held.
    fn inline_dir_edit(
        &mut self,
        ino: u32,
        name: &[u8],
        f: impl FnOnce(&mut [u8], Option<&RawEntry>, &RawEntry),
    ) -> Result<u32> {
        let mut dir = self.read_inode(ino)?;
        let mut area = self.inline_area(&dir)?;
        let (root, rest) = area.split_at_mut(INLINE_ROOT);
        let mut found = None;
        for region in [&mut root[4..], rest] {
            if region.is_empty() {
                continue;
            }
            let ents = parse_entries(region, region.len()).map_err(|_| bad_dir(&dir))?;
            if let Some(i) = ents.iter().position(|e| e.inode != 0 && e.name == name) {
                let prev = i.checked_sub(1).map(|p| &ents[p]);
                found = Some(ents[i].inode);
                f(region, prev, &ents[i]);
                break;
            }
        }
        let Some(was) = found else {
            return Err(Error::NotFound);
        };
        self.store_inline(&mut dir, &area)?;
        self.write_inode(&mut dir)?;
        Ok(was)
    }

    /// May new directories be made inline (inline_data, inodes with room
    /// past the 128-byte core for `system.data`)?
    pub(crate) fn inline_dirs(&self) -> bool {
        self.sb.has_incompat(incompat::INLINE_DATA) && self.geo.inode_size > 128
    }

    /// Make new directory `dir` an empty inline one under `parent`, as the
    /// kernel's `ext4_try_create_inline_dir`: the parent's number, one
    /// unused record over the rest of `i_block`, an empty `system.data`
    /// (first among the xattrs, so that it stays in the inode); size 60.
    /// The caller writes the inode.
    pub(crate) fn inline_dir_init(&mut self, dir: &mut Inode, parent: u32) -> Result<()> {
        let mut root = [0u8; INLINE_ROOT];
        put32(&mut root, 0, parent);
        crate::format::dirent::write_entry(&mut root[4..], 0, 0, INLINE_ROOT - 4, 0, b"");
        self.make_inline(dir, root)?;
        dir.set_size(INLINE_ROOT as u64);
        Ok(())
    }

    /// Is `inode` an empty regular file (no blocks, nothing delayed) that
    /// a write of `len` bytes at `offset` may make inline, as the kernel's
    /// first write of a small file does?
    pub(crate) fn may_become_inline(&self, inode: &Inode, offset: u64, len: usize) -> bool {
        if !self.inline_dirs() || !inode.is_reg() || inode.size() != 0 || self.read_only.is_some() {
            return false;
        }
        if offset.saturating_add(len as u64) > INLINE_ROOT as u64 || inode.file_acl() != 0 {
            return false;
        }
        let huge = self
            .sb
            .has_ro_compat(crate::format::superblock::ro_compat::HUGE_FILE);
        if inode.blocks_512(huge, self.geo.block_size) != 0 {
            return false;
        }
        let obj = self.inodes.get(inode.ino);
        let d = obj.as_ref().map(|o| o.data());
        !d.as_ref()
            .is_some_and(|d| d.delalloc.blocks > 0 || d.pinned)
    }

    /// Make empty regular file `ino` inline (an empty `system.data`, the
    /// data area zero), in a transaction of its own.
    pub(crate) fn make_inline_file(&mut self, ino: u32) -> Result<()> {
        let c = 4 + self.summary_credits();
        self.retry_nospc(c, |fs| {
            fs.check_writable()?;
            let mut inode = fs.read_inode(ino)?;
            fs.make_inline(&mut inode, [0u8; INLINE_ROOT])?;
            fs.write_inode(&mut inode)
        })
    }

    /// Turn `inode` (empty of data) into an inline one whose `i_block` is
    /// `root`, with an empty `system.data` first among its xattrs (so that
    /// it stays in the inode). The caller writes the inode.
    fn make_inline(&mut self, inode: &mut Inode, root: [u8; INLINE_ROOT]) -> Result<()> {
        let mut attrs = self.all_xattrs(inode)?;
        attrs.insert(
            0,
            Xattr {
                index: DATA_INDEX,
                name: DATA_NAME.to_vec(),
                ..Default::default()
            },
        );
        inode.set_flags((inode.flags() & !crate::format::inode::FL_EXTENTS) | FL_INLINE_DATA);
        inode.i_block_mut().copy_from_slice(&root);
        self.store_xattrs(inode, attrs)?;
        if !self
            .inode_xattrs_of(inode)?
            .iter()
            .any(|x| is_data_xattr(x.index, &x.name))
        {
            return Err(Error::corrupted(
                format!("inode {}: no room in the inode for system.data", inode.ino),
                0,
            ));
        }
        self.inodes.drop_map(inode.ino);
        Ok(())
    }

    /// Convert directory `parent` from inline data unless `name` fits in
    /// its inline area (a name is about to be added).
    pub(crate) fn uninline_unless_fits(&mut self, parent: u32, name: &[u8]) -> Result<()> {
        let dir = self.read_inode(parent)?;
        if !Self::is_inline(&dir) || !dir.is_dir() || self.inline_dir_fits(&dir, name)? {
            return Ok(());
        }
        self.uninline(parent)
    }

    /// Point an inline directory's parent at `parent` (a rename across
    /// directories); writes the inode.
    pub(crate) fn inline_set_parent(&mut self, ino: u32, parent: u32) -> Result<()> {
        let mut dir = self.read_inode(ino)?;
        put32(dir.i_block_mut(), 0, parent);
        self.write_inode(&mut dir)
    }

    /// Convert inode `ino` from inline data to blocks (nothing if it is
    /// not inline), in a transaction of its own: a file's data moves to a
    /// new block, a directory's entries to a new leaf block after "." and
    /// "..", `system.data` goes, and the inode maps blocks as every other
    /// (extents where the image has them).
    pub(crate) fn uninline(&mut self, ino: u32) -> Result<()> {
        let inode = self.read_inode(ino)?;
        if !Self::is_inline(&inode) || self.read_only.is_some() {
            return Ok(());
        }
        // Worst case: the inode, a bitmap, a descriptor, the superblock,
        // the new block, an xattr block.
        let c = 8 + self.summary_credits();
        self.retry_nospc(c, |fs| fs.uninline_impl(ino))
    }

    fn uninline_impl(&mut self, ino: u32) -> Result<()> {
        self.check_writable()?;
        let mut inode = self.read_inode(ino)?;
        if !Self::is_inline(&inode) {
            return Ok(());
        }
        let bs = self.geo.block_size as usize;
        enum Content {
            Data(Vec<u8>),
            Dir(u32, Vec<(Vec<u8>, u32, u8)>),
        }
        let content = if inode.is_dir() {
            let (parent, ents) = self.inline_dir(&inode)?;
            let live = ents
                .into_iter()
                .filter(|e| e.inode != 0)
                .map(|e| (e.name, e.inode, e.file_type))
                .collect();
            Content::Dir(parent, live)
        } else {
            Content::Data(self.inline_data(&inode)?)
        };
        // The inode becomes an empty block-mapped one...
        let mut attrs = self.all_xattrs(&inode)?;
        attrs.retain(|x| !is_data_xattr(x.index, &x.name));
        inode.set_flags(inode.flags() & !FL_INLINE_DATA);
        inode.i_block_mut().fill(0);
        if self.sb.has_incompat(incompat::EXTENTS) {
            self.init_extent_root(&mut inode);
        }
        self.store_xattrs(&mut inode, attrs)?;
        self.inodes.drop_map(ino);
        // ...then gets its content back in a block.
        match content {
            Content::Data(data) => {
                let size = inode.size();
                if !data.is_empty() {
                    let (pblk, _) = self.alloc_run(&mut inode, 0, 1, true, false)?;
                    let mut buf = data;
                    buf.resize(bs, 0);
                    // Written before the commit that maps it (ordered).
                    self.dev().write_at(pblk * bs as u64, &buf)?;
                }
                inode.set_size(size);
            }
            Content::Dir(parent, live) => {
                inode.set_size(0);
                self.dir_init_with(&mut inode, parent, &live)?;
            }
        }
        inode.set_ctime(Timespec::now());
        self.write_inode(&mut inode)
    }

    /// Bytes an inline file can hold without growing `system.data`: the
    /// 60 of `i_block` and the value's present length (the kernel's
    /// `i_inline_size`).
    fn inline_capacity(&mut self, inode: &Inode) -> Result<usize> {
        Ok(self.inline_area(inode)?.len())
    }

    /// Store `data` (at most the capacity) as the inline data of `inode`,
    /// zero-padded: `i_block`, then `system.data` at its present length.
    /// The caller sets the size and writes the inode.
    fn store_inline(&mut self, inode: &mut Inode, data: &[u8]) -> Result<()> {
        let mut attrs = self.all_xattrs(inode)?;
        let Some(x) = attrs.iter_mut().find(|x| is_data_xattr(x.index, &x.name)) else {
            return Err(Error::corrupted(
                format!("inode {}: inline data without system.data", inode.ino),
                0,
            ));
        };
        let root = data.len().min(INLINE_ROOT);
        let ib = inode.i_block_mut();
        ib.fill(0);
        ib[..root].copy_from_slice(&data[..root]);
        let rest = &data[root..];
        let changed = rest.len() > x.value.len()
            || x.value[..rest.len()] != *rest
            || x.value[rest.len()..].iter().any(|&b| b != 0);
        if changed {
            let len = x.value.len();
            x.value.fill(0);
            x.value[..rest.len()].copy_from_slice(rest);
            debug_assert_eq!(x.value.len(), len);
            self.store_xattrs(inode, attrs)?;
        }
        Ok(())
    }

    /// A buffered write into an inline file that stays within its
    /// capacity, done in place (the kernel's `ext4_write_inline_data`):
    /// `None` when the file is not inline or the write would outgrow it
    /// (the caller converts it and writes through the cache).
    pub(crate) fn write_inline(
        &mut self,
        ino: u32,
        offset: u64,
        len: usize,
        src: &mut dyn FnMut(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<Option<usize>> {
        let inode = self.read_inode(ino)?;
        if !Self::is_inline(&inode) || !inode.is_reg() || self.read_only.is_some() {
            return Ok(None);
        }
        let cap = self.inline_capacity(&inode)? as u64;
        let Some(end) = offset.checked_add(len as u64) else {
            return Ok(None);
        };
        if end > cap {
            return Ok(None);
        }
        // The file's cached pages are dropped (they were filled from the
        // inode): before the transaction, as truncation does.
        let _order = Held::take(Level::Invalidate, u64::from(ino));
        // The source is read once, before the transaction (a retry must
        // not read it again).
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match src(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if got == 0 => return Err(Error::Io(e)),
                Err(_) => break,
            }
        }
        if got == 0 {
            return Ok(Some(0));
        }
        self.drop_cached(ino);
        let c = 4 + self.summary_credits();
        self.retry_nospc(c, |fs| {
            fs.check_writable()?;
            let mut inode = fs.read_inode(ino)?;
            crate::ops::check_changeable(&inode, true)?;
            let mut data = fs.inline_data(&inode)?;
            let stop = offset as usize + got;
            if data.len() < stop {
                data.resize(stop, 0);
            }
            data[offset as usize..stop].copy_from_slice(&buf[..got]);
            fs.store_inline(&mut inode, &data)?;
            inode.set_size(data.len() as u64);
            let now = Timespec::now();
            inode.set_mtime(now);
            inode.set_ctime(now);
            fs.write_inode(&mut inode)?;
            fs.bytes_written += got as u64;
            Ok(got)
        })
        .map(Some)
    }

    /// A size change of an inline file within its capacity, in place
    /// (bytes past the new size are zeroed, as `ext4_inline_data_truncate`
    /// does); `false` when the file is not inline or would outgrow it.
    /// The caller holds the invalidation level and a handle, sets the
    /// times and writes the inode.
    pub(crate) fn resize_inline(&mut self, inode: &mut Inode, size: u64) -> Result<bool> {
        if !Self::is_inline(inode) || !inode.is_reg() {
            return Ok(false);
        }
        if size > self.inline_capacity(inode)? as u64 {
            return Ok(false);
        }
        let mut data = self.inline_data(inode)?;
        data.resize(size as usize, 0);
        self.drop_cached(inode.ino);
        self.store_inline(inode, &data)?;
        inode.set_size(size);
        Ok(true)
    }

    /// Convert `ino` if it is inline and a size of `size` would outgrow
    /// its inline area, or it is not a regular file (a size change of a
    /// regular file within it is done in place by `set_size`).
    pub(crate) fn uninline_past(&mut self, ino: u32, size: u64) -> Result<()> {
        let inode = self.read_inode(ino)?;
        if !Self::is_inline(&inode) {
            return Ok(());
        }
        if inode.is_reg() && size <= self.inline_capacity(&inode)? as u64 {
            return Ok(());
        }
        self.uninline(ino)
    }

    /// Drop the cached pages of `ino` (filled from its inline data).
    fn drop_cached(&mut self, ino: u32) {
        if let Some(m) = self.pc.existing(u64::from(ino)) {
            m.truncate(0);
            self.pc.remove_mapping(u64::from(ino));
        }
    }

    /// Reject a change to an inline inode that was not converted first
    /// (a safety net: every changing entry point converts).
    pub(crate) fn not_inline(&self, inode: &Inode, what: &str) -> Result<()> {
        if Self::is_inline(inode) {
            return Err(Error::Unsupported(format!(
                "{what} of inline inode {} without converting it first",
                inode.ino
            )));
        }
        Ok(())
    }
}

fn bad_dir(dir: &Inode) -> Error {
    Error::corrupted(format!("inline directory {}: bad entries", dir.ino), 0)
}

/// The names of `system.data` for the caller's error: the kernel has no
/// handler for it, so userspace cannot get, set or remove it.
pub(crate) fn hidden_xattr(x: &Xattr) -> bool {
    is_data_xattr(x.index, &x.name)
}
