//! Directories: linear blocks and hashed (htree) indexes.
//!
//! A directory of one block that fills up is converted to an htree (as
//! Linux's make_indexed_dir does) when the filesystem has dir_index; from
//! then on lookups descend the index by name hash and inserts split full
//! leaves and index nodes, growing the index depth up to the limit the
//! format allows (2 levels, 3 with large_dir).

use crate::bmap::Mapping;
use crate::error::{Error, Result};
use crate::format::dirent::{
    dx_csum, dx_csum_stored, dx_limit, entries, entry_len, has_tail, leaf_csum, parse_dx_entries,
    parse_entries, parse_root_info, rec_len_from_disk, rec_len_to_disk, tail_csum_stored,
    write_dx_entries, write_dx_tail, write_entry, write_tail, DxEntries, EntryRef, RawEntry,
    DX_NODE_COUNT, DX_ROOT_INFO, NAME_MAX, TAIL_LEN,
};
use crate::format::hash::dx_hash;
use crate::format::inode::{FileType, Inode, FL_INDEX};
use crate::format::superblock::{compat, incompat, FLAG_UNSIGNED_HASH};
use crate::format::{get16, get32, put16, put32, Timespec};
use crate::fs::Core;

/// A directory entry as returned by [`crate::Filesystem::read_dir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u32,
    pub file_type: FileType,
}

/// Check a name for a new entry.
pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Error::Invalid(
            "file names must be non-empty and contain no '/' or NUL".into(),
        ));
    }
    if name == b"." || name == b".." {
        return Err(Error::Exists);
    }
    Ok(())
}

/// One level of an htree descent.
struct DxFrame {
    pblk: u64,
    data: Vec<u8>,
    dx: DxEntries,
    /// Index of the entry followed.
    at: usize,
}

struct Found {
    lblk: u64,
    pblk: u64,
    data: Vec<u8>,
    entry: RawEntry,
    prev: Option<RawEntry>,
}

/// Insert an entry into a leaf block if it fits: into the first unused
/// record that is big enough, or the slack at the end of a used one.
pub(crate) fn leaf_insert(
    block: &mut [u8],
    usable: usize,
    name: &[u8],
    ino: u32,
    ft: u8,
) -> Result<bool> {
    let need = entry_len(name.len());
    // Find the slot without allocating: (offset, record length, bytes the
    // entry there keeps; 0 if unused).
    let mut slot = None;
    for e in entries(block, usable) {
        let e = e.map_err(|e| Error::corrupted(e, 0))?;
        if e.inode == 0 && e.rec_len >= need {
            slot = Some((e.offset, e.rec_len, 0));
            break;
        }
        let used = entry_len(e.name.len());
        if e.inode != 0 && e.rec_len >= used + need {
            slot = Some((e.offset, e.rec_len, used));
            break;
        }
    }
    let Some((off, rec_len, keep)) = slot else {
        return Ok(false);
    };
    if keep > 0 {
        // Shorten the used record to its entry; ours takes the rest.
        let bs = block.len();
        put16(block, off + 4, rec_len_to_disk(keep, bs));
    }
    write_entry(block, off + keep, ino, rec_len - keep, ft, name);
    Ok(true)
}

/// Lay `entries` out compactly in an empty leaf block.
fn fill_leaf(block: &mut [u8], usable: usize, entries: &[(Vec<u8>, u32, u8)]) {
    block.fill(0);
    let mut off = 0;
    for (i, (name, ino, ft)) in entries.iter().enumerate() {
        let len = if i + 1 == entries.len() {
            usable - off
        } else {
            entry_len(name.len())
        };
        write_entry(block, off, *ino, len, *ft, name);
        off += len;
    }
    if entries.is_empty() {
        write_entry(block, 0, 0, usable, 0, b"");
    }
}

impl Core {
    fn leaf_usable(&self) -> usize {
        self.geo.block_size as usize - if self.has_csum() { TAIL_LEN } else { 0 }
    }

    pub(crate) fn is_indexed(&self, dir: &Inode) -> bool {
        dir.flags() & FL_INDEX != 0
    }

    fn dir_blocks(&self, dir: &Inode) -> u64 {
        dir.size() / u64::from(self.geo.block_size)
    }

    fn dir_pblk(&mut self, dir: &Inode, lblk: u64) -> Result<u64> {
        match self.map_block(dir, lblk, 1)?.0 {
            Mapping::Mapped {
                pblk,
                unwritten: false,
            } => Ok(pblk),
            _ => Err(Error::corrupted(
                format!("directory inode {} has a hole at block {lblk}", dir.ino),
                0,
            )),
        }
    }

    /// Offset of the dx count/limit if `data` (block `lblk` of `dir`) is an
    /// htree root or interior node.
    fn dx_count_offset(&self, dir: &Inode, lblk: u64, data: &[u8]) -> Option<usize> {
        if !self.is_indexed(dir) {
            return None;
        }
        if lblk == 0 {
            let info = parse_root_info(data)?;
            return Some(DX_ROOT_INFO + usize::from(info.info_length));
        }
        let bs = self.geo.block_size as usize;
        let fake = get32(data, 0)? == 0 && rec_len_from_disk(get16(data, 4)?, bs) == bs;
        fake.then_some(DX_NODE_COUNT)
    }

    pub(crate) fn read_dir_block(&mut self, dir: &Inode, lblk: u64) -> Result<(u64, Vec<u8>)> {
        let pblk = self.check_dir_block(dir, lblk)?;
        Ok((pblk, self.cache.read(pblk)?.to_vec()))
    }

    /// Make sure block `lblk` of `dir` is cached and its checksum checked
    /// (once per read from the device); its physical block number.
    fn check_dir_block(&mut self, dir: &Inode, lblk: u64) -> Result<u64> {
        let pblk = self.dir_pblk(dir, lblk)?;
        let csum = self.has_csum();
        let (data, verified) = self.cache.read_verified(pblk)?;
        if csum && !verified {
            let data = data.to_vec();
            // Index blocks are recognised by position and shape first, as
            // Linux does: a root converted from a full leaf keeps the old
            // leaf tail's bytes and would pass for a leaf.
            let seed = dir.csum_seed(self.csum_seed);
            if let Some(co) = self.dx_count_offset(dir, lblk, &data) {
                let stored = dx_csum_stored(&data, co);
                if stored.is_none() || dx_csum(seed, &data, co) != stored {
                    return Err(Error::BadChecksum {
                        what: format!("directory index block {lblk} of inode {}", dir.ino),
                        block: pblk,
                    });
                }
            } else if has_tail(&data) {
                if leaf_csum(seed, &data) != tail_csum_stored(&data) {
                    return Err(Error::BadChecksum {
                        what: format!("directory block {lblk} of inode {}", dir.ino),
                        block: pblk,
                    });
                }
            } else {
                return Err(Error::corrupted(
                    format!(
                        "directory block {lblk} of inode {} has no checksum tail",
                        dir.ino
                    ),
                    pblk,
                ));
            }
            self.cache.set_verified(pblk);
        }
        Ok(pblk)
    }

    fn write_leaf_block(&mut self, dir: &Inode, pblk: u64, data: &mut [u8]) -> Result<()> {
        if self.has_csum() {
            let c = leaf_csum(dir.csum_seed(self.csum_seed), data);
            write_tail(data, c);
        }
        self.cache.write(pblk, data)?;
        Ok(())
    }

    fn write_dx_block(&mut self, dir: &Inode, pblk: u64, data: &mut [u8], co: usize) -> Result<()> {
        if self.has_csum() {
            write_dx_tail(data, co, dir.csum_seed(self.csum_seed));
        }
        self.cache.write(pblk, data)?;
        Ok(())
    }

    fn block_entries(
        &self,
        dir: &Inode,
        lblk: u64,
        data: &[u8],
        pblk: u64,
    ) -> Result<Vec<RawEntry>> {
        let usable = if self.dx_count_offset(dir, lblk, data).is_some() || !has_tail(data) {
            data.len()
        } else {
            data.len() - TAIL_LEN
        };
        parse_entries(data, usable).map_err(|e| Error::corrupted(format!("directory: {e}"), pblk))
    }

    /// All entries of directory `ino`, "." and ".." included; an
    /// encrypted directory's under their no-key names (`fscrypt.rs`).
    pub fn read_dir(&mut self, ino: u32) -> Result<Vec<DirEntry>> {
        let dir = self.read_inode(ino)?;
        let entries = self.entries_of(&dir)?;
        if crate::fscrypt::is_encrypted(&dir) {
            return self.nokey_entries(&dir, entries);
        }
        Ok(entries)
    }

    /// All entries of directory `dir` under their names on disk.
    pub(crate) fn entries_of(&mut self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let ino = dir.ino;
        if !dir.is_dir() {
            return Err(Error::NotDir);
        }
        let mut out = Vec::new();
        if Self::is_inline(dir) {
            let (parent, ents) = self.inline_dir(dir)?;
            for (name, ino) in [(&b"."[..], ino), (&b".."[..], parent)] {
                out.push(DirEntry {
                    name: name.to_vec(),
                    ino,
                    file_type: FileType::Directory,
                });
            }
            out.extend(ents.into_iter().filter(|e| e.inode != 0).map(|e| DirEntry {
                name: e.name,
                ino: e.inode,
                file_type: FileType::from_dirent_code(e.file_type),
            }));
            return Ok(out);
        }
        for lblk in 0..self.dir_blocks(dir) {
            let (pblk, data) = self.read_dir_block(dir, lblk)?;
            for e in self.block_entries(dir, lblk, &data, pblk)? {
                if e.inode != 0 {
                    out.push(DirEntry {
                        name: e.name,
                        ino: e.inode,
                        file_type: FileType::from_dirent_code(e.file_type),
                    });
                }
            }
        }
        Ok(out)
    }

    fn name_hash(&self, version: u8, name: &[u8]) -> Result<u32> {
        self.name_hash_pair(version, name).map(|h| h.0)
    }

    /// (hash, minor hash) of `name` for a directory hashing with
    /// `version`, the superblock's unsigned flag applied.
    pub(crate) fn name_hash_pair(&self, version: u8, name: &[u8]) -> Result<(u32, u32)> {
        let mut v = version;
        if v <= 2 && self.sb.flags() & FLAG_UNSIGNED_HASH != 0 {
            v += 3;
        }
        dx_hash(name, v, self.sb.hash_seed())
            .ok_or_else(|| Error::Unsupported(format!("directory hash version {version}")))
    }

    fn max_dx_levels(&self) -> u8 {
        if self.sb.has_incompat(incompat::LARGEDIR) {
            3
        } else {
            2
        }
    }

    /// Descend the htree of `dir` towards `hash`. Returns the frames and
    /// the root's hash version.
    fn dx_path(&mut self, dir: &Inode, name: &[u8]) -> Result<(Vec<DxFrame>, u32, u8)> {
        let (pblk, data) = self.read_dir_block(dir, 0)?;
        let info = parse_root_info(&data)
            .ok_or_else(|| Error::corrupted("htree root is truncated", pblk))?;
        if info.info_length != 8 || get32(&data, DX_ROOT_INFO) != Some(0) {
            return Err(Error::corrupted(
                format!("directory {}: bad htree root", dir.ino),
                pblk,
            ));
        }
        if info.indirect_levels >= self.max_dx_levels() {
            return Err(Error::corrupted(
                format!("directory {}: htree too deep", dir.ino),
                pblk,
            ));
        }
        let hash = self.name_hash(info.hash_version, name)?;
        let co = DX_ROOT_INFO + 8;
        let mut frames = Vec::new();
        let (mut cur_pblk, mut cur, mut cur_co) = (pblk, data, co);
        let nblocks = self.dir_blocks(dir);
        for level in 0..=info.indirect_levels {
            let dx = parse_dx_entries(&cur, cur_co)
                .map_err(|e| Error::corrupted(format!("directory {}: {e}", dir.ino), cur_pblk))?;
            let at = dx
                .entries
                .partition_point(|&(h, _)| h <= hash)
                .saturating_sub(1);
            let child = u64::from(dx.entries[at].1);
            if child >= nblocks || child == 0 {
                return Err(Error::corrupted(
                    format!("directory {}: htree points past the directory", dir.ino),
                    cur_pblk,
                ));
            }
            frames.push(DxFrame {
                pblk: cur_pblk,
                data: cur,
                dx,
                at,
            });
            if level == info.indirect_levels {
                break;
            }
            let (p, d) = self.read_dir_block(dir, child)?;
            if self.dx_count_offset(dir, child, &d) != Some(DX_NODE_COUNT) {
                return Err(Error::corrupted(
                    format!("directory {}: bad htree node", dir.ino),
                    p,
                ));
            }
            cur_pblk = p;
            cur = d;
            cur_co = DX_NODE_COUNT;
        }
        Ok((frames, hash, info.hash_version))
    }

    /// Step to the next leaf if it may hold more names with `hash`.
    fn dx_next(&mut self, dir: &Inode, frames: &mut [DxFrame], hash: u32) -> Result<bool> {
        let mut p = frames.len();
        loop {
            if p == 0 {
                return Ok(false);
            }
            p -= 1;
            if frames[p].at + 1 < frames[p].dx.entries.len() {
                break;
            }
        }
        frames[p].at += 1;
        let bhash = frames[p].dx.entries[frames[p].at].0;
        if bhash & !1 != hash {
            return Ok(false);
        }
        for q in p + 1..frames.len() {
            let child = u64::from(frames[q - 1].dx.entries[frames[q - 1].at].1);
            let (pb, d) = self.read_dir_block(dir, child)?;
            let dx = parse_dx_entries(&d, DX_NODE_COUNT)
                .map_err(|e| Error::corrupted(format!("directory {}: {e}", dir.ino), pb))?;
            frames[q] = DxFrame {
                pblk: pb,
                data: d,
                dx,
                at: 0,
            };
        }
        Ok(true)
    }

    fn search_block(&mut self, dir: &Inode, lblk: u64, name: &[u8]) -> Result<Option<Found>> {
        let pblk = self.check_dir_block(dir, lblk)?;
        // Scan the cached bytes in place; copy only on a match.
        // check_dir_block left it cached; a shared borrow lets the scan
        // call &self helpers.
        let data = self
            .cache
            .peek(pblk)
            .ok_or_else(|| Error::corrupted("directory block left the cache", pblk))?;
        let usable = if self.dx_count_offset(dir, lblk, data).is_some() || !has_tail(data) {
            data.len()
        } else {
            data.len() - TAIL_LEN
        };
        let mut prev = None;
        for e in entries(data, usable) {
            let e = e.map_err(|e| Error::corrupted(format!("directory: {e}"), pblk))?;
            if e.inode != 0 && e.name == name {
                return Ok(Some(Found {
                    lblk,
                    pblk,
                    data: data.to_vec(),
                    entry: e.to_owned(),
                    prev: prev.map(|p: EntryRef<'_>| p.to_owned()),
                }));
            }
            prev = Some(e);
        }
        Ok(None)
    }

    fn find_entry(&mut self, dir: &Inode, name: &[u8]) -> Result<Option<Found>> {
        self.not_inline(dir, "a directory change")?;
        if self.is_indexed(dir) && self.sb.has_compat(compat::DIR_INDEX) {
            let (mut frames, hash, _) = self.dx_path(dir, name)?;
            for _ in 0..self.dir_blocks(dir) {
                let f = frames.last().expect("at least the root frame");
                let leaf = u64::from(f.dx.entries[f.at].1);
                if let Some(found) = self.search_block(dir, leaf, name)? {
                    return Ok(Some(found));
                }
                if !self.dx_next(dir, &mut frames, hash)? {
                    return Ok(None);
                }
            }
            return Ok(None);
        }
        for lblk in 0..self.dir_blocks(dir) {
            if let Some(f) = self.search_block(dir, lblk, name)? {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// The "." and ".." entries: the first two of block 0, in linear and
    /// indexed directories alike (in an htree they sit in the dx root and
    /// are not reachable by hash). Returns their offsets and inodes.
    fn dot_entries(&mut self, dir: &Inode) -> Result<(u64, Vec<u8>, RawEntry, RawEntry)> {
        self.not_inline(dir, "a \"..\" change")?;
        let (pblk, data) = self.read_dir_block(dir, 0)?;
        let ents = self.block_entries(dir, 0, &data, pblk)?;
        match (ents.first(), ents.get(1)) {
            (Some(d), Some(dd)) if d.name == b"." && dd.name == b".." => {
                Ok((pblk, data, d.clone(), dd.clone()))
            }
            _ => Err(Error::corrupted(
                format!("directory {} does not start with \".\" and \"..\"", dir.ino),
                pblk,
            )),
        }
    }

    /// Point ".." of `dir` at `parent`.
    pub(crate) fn set_dotdot(&mut self, dir: &Inode, parent: u32) -> Result<()> {
        if Self::is_inline(dir) {
            return self.inline_set_parent(dir.ino, parent);
        }
        let (pblk, mut data, _, dd) = self.dot_entries(dir)?;
        put32(&mut data, dd.offset, parent);
        match self.dx_count_offset(dir, 0, &data) {
            Some(co) => self.write_dx_block(dir, pblk, &mut data, co),
            None => self.write_leaf_block(dir, pblk, &mut data),
        }
    }

    /// Look `name` up in directory inode `dir`.
    pub(crate) fn dir_lookup(
        &mut self,
        dir: &Inode,
        name: &[u8],
    ) -> Result<Option<(u32, FileType)>> {
        if !dir.is_dir() {
            return Err(Error::NotDir);
        }
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if Self::is_inline(dir) {
            let (parent, ents) = self.inline_dir(dir)?;
            return Ok(match name {
                b"." => Some((dir.ino, FileType::Directory)),
                b".." => Some((parent, FileType::Directory)),
                _ => ents
                    .into_iter()
                    .find(|e| e.inode != 0 && e.name == name)
                    .map(|e| (e.inode, FileType::from_dirent_code(e.file_type))),
            });
        }
        if name == b"." || name == b".." {
            let (_, _, d, dd) = self.dot_entries(dir)?;
            let ino = if name == b"." { d.inode } else { dd.inode };
            return Ok(Some((ino, FileType::Directory)));
        }
        Ok(self
            .find_entry(dir, name)?
            .map(|f| (f.entry.inode, FileType::from_dirent_code(f.entry.file_type))))
    }

    /// Point an existing entry at a different inode.
    pub(crate) fn dir_set(
        &mut self,
        dir: &Inode,
        name: &[u8],
        ino: u32,
        ft: FileType,
    ) -> Result<()> {
        if Self::is_inline(dir) {
            let code = self.ft_code(ft);
            return self.inline_dir_set(dir.ino, name, ino, code);
        }
        let Some(mut f) = self.find_entry(dir, name)? else {
            return Err(Error::NotFound);
        };
        let o = f.entry.offset;
        put32(&mut f.data, o, ino);
        f.data[o + 7] = self.ft_code(ft);
        self.write_leaf_block(dir, f.pblk, &mut f.data)
    }

    pub(crate) fn ft_code(&self, ft: FileType) -> u8 {
        if self.sb.has_incompat(incompat::FILETYPE) {
            ft.dirent_code()
        } else {
            0
        }
    }

    /// Remove `name` from `dir`; returns the inode it named. The caller
    /// writes the directory inode (times).
    pub(crate) fn dir_remove(&mut self, dir: &Inode, name: &[u8]) -> Result<u32> {
        if Self::is_inline(dir) {
            return self.inline_dir_remove(dir.ino, name);
        }
        let Some(mut f) = self.find_entry(dir, name)? else {
            return Err(Error::NotFound);
        };
        let bs = self.geo.block_size as usize;
        match &f.prev {
            Some(p) => {
                let merged = p.rec_len + f.entry.rec_len;
                crate::format::put16(
                    &mut f.data,
                    p.offset + 4,
                    crate::format::dirent::rec_len_to_disk(merged, bs),
                );
            }
            None => put32(&mut f.data, f.entry.offset, 0),
        }
        let _ = f.lblk;
        self.write_leaf_block(dir, f.pblk, &mut f.data)?;
        Ok(f.entry.inode)
    }

    /// True if `dir` holds nothing but "." and "..".
    pub(crate) fn dir_is_empty(&mut self, dir: &Inode) -> Result<bool> {
        if Self::is_inline(dir) {
            return Ok(self.inline_dir(dir)?.1.iter().all(|e| e.inode == 0));
        }
        for lblk in 0..self.dir_blocks(dir) {
            let (pblk, data) = self.read_dir_block(dir, lblk)?;
            for e in self.block_entries(dir, lblk, &data, pblk)? {
                if e.inode != 0 && e.name != b"." && e.name != b".." {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Append a zero-initialised block to a directory.
    fn dir_append_block(&mut self, dir: &mut Inode) -> Result<(u64, u64)> {
        let bs = u64::from(self.geo.block_size);
        let lblk = self.dir_blocks(dir);
        self.allocate_range(dir, lblk, 1)?;
        dir.set_size((lblk + 1) * bs);
        let pblk = self.dir_pblk(dir, lblk)?;
        Ok((lblk, pblk))
    }

    /// Add an entry. The name must not exist yet (callers look it up
    /// first). Writes the directory inode.
    pub(crate) fn dir_add(
        &mut self,
        dir: &mut Inode,
        name: &[u8],
        ino: u32,
        ft: FileType,
    ) -> Result<()> {
        check_name(name)?;
        let code = self.ft_code(ft);
        if Self::is_inline(dir) {
            // Callers convert a directory the name does not fit
            // (`uninline_unless_fits`).
            if !self.inline_dir_add(dir, name, ino, code)? {
                return Err(Error::Unsupported(format!(
                    "a name that does not fit inline directory {}",
                    dir.ino
                )));
            }
            return Ok(());
        }
        let indexed = self.is_indexed(dir) && self.sb.has_compat(compat::DIR_INDEX);
        if indexed {
            self.dx_add(dir, name, ino, code)?;
        } else {
            self.linear_add(dir, name, ino, code)?;
        }
        let now = Timespec::now();
        dir.set_mtime(now);
        dir.set_ctime(now);
        self.write_inode(dir)
    }

    fn linear_add(&mut self, dir: &mut Inode, name: &[u8], ino: u32, code: u8) -> Result<()> {
        let usable = self.leaf_usable();
        let nblocks = self.dir_blocks(dir);
        for lblk in 0..nblocks {
            let (pblk, mut data) = self.read_dir_block(dir, lblk)?;
            if leaf_insert(&mut data, usable, name, ino, code).map_err(|_| {
                Error::corrupted(
                    format!("directory {} block {lblk} is malformed", dir.ino),
                    pblk,
                )
            })? {
                return self.write_leaf_block(dir, pblk, &mut data);
            }
        }
        if nblocks == 1 && self.sb.has_compat(compat::DIR_INDEX) && self.sb.def_hash_version() <= 2
        {
            self.make_indexed(dir)?;
            return self.dx_add(dir, name, ino, code);
        }
        let (_, pblk) = self.dir_append_block(dir)?;
        let mut data = vec![0u8; self.geo.block_size as usize];
        fill_leaf(&mut data, usable, &[(name.to_vec(), ino, code)]);
        self.write_leaf_block(dir, pblk, &mut data)
    }

    /// Turn a one-block directory into an htree with one leaf.
    fn make_indexed(&mut self, dir: &mut Inode) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let usable = self.leaf_usable();
        let (pblk0, data0) = self.read_dir_block(dir, 0)?;
        let entries = self.block_entries(dir, 0, &data0, pblk0)?;
        let mut dot = dir.ino;
        let mut dotdot = dir.ino;
        let mut rest = Vec::new();
        for e in entries {
            if e.inode == 0 {
                continue;
            }
            match e.name.as_slice() {
                b"." => dot = e.inode,
                b".." => dotdot = e.inode,
                _ => rest.push((e.name, e.inode, e.file_type)),
            }
        }
        let (l1, p1) = self.dir_append_block(dir)?;
        let mut leaf = vec![0u8; bs];
        fill_leaf(&mut leaf, usable, &rest);
        self.write_leaf_block(dir, p1, &mut leaf)?;
        let mut root = vec![0u8; bs];
        let dcode = self.ft_code(FileType::Directory);
        write_entry(&mut root, 0, dot, 12, dcode, b".");
        write_entry(&mut root, 12, dotdot, bs - 12, dcode, b"..");
        root[DX_ROOT_INFO + 4] = self.sb.def_hash_version();
        root[DX_ROOT_INFO + 5] = 8;
        let co = DX_ROOT_INFO + 8;
        let dx = DxEntries {
            count_offset: co,
            limit: dx_limit(bs, co, self.has_csum()),
            entries: vec![(0, l1 as u32)],
        };
        write_dx_entries(&mut root, &dx);
        self.write_dx_block(dir, pblk0, &mut root, co)?;
        dir.set_flags(dir.flags() | FL_INDEX);
        self.write_inode(dir)
    }

    fn dx_add(&mut self, dir: &mut Inode, name: &[u8], ino: u32, code: u8) -> Result<()> {
        let usable = self.leaf_usable();
        let bs = self.geo.block_size as usize;
        let (mut frames, hash, version) = self.dx_path(dir, name)?;
        let f = frames.last().expect("root frame");
        let leaf_lblk = u64::from(f.dx.entries[f.at].1);
        let (pblk, mut data) = self.read_dir_block(dir, leaf_lblk)?;
        if leaf_insert(&mut data, usable, name, ino, code)? {
            return self.write_leaf_block(dir, pblk, &mut data);
        }
        // Split the leaf by hash, upper half to a new block.
        let mut ents: Vec<(u32, Vec<u8>, u32, u8)> = Vec::new();
        for e in self.block_entries(dir, leaf_lblk, &data, pblk)? {
            if e.inode != 0 {
                ents.push((
                    self.name_hash(version, &e.name)?,
                    e.name,
                    e.inode,
                    e.file_type,
                ));
            }
        }
        ents.sort_by_key(|e| e.0);
        let total: usize = ents.iter().map(|e| entry_len(e.1.len())).sum();
        let mut acc = 0;
        let mut split = ents.len() / 2;
        for (i, e) in ents.iter().enumerate() {
            acc += entry_len(e.1.len());
            if acc * 2 >= total {
                split = i + 1;
                break;
            }
        }
        let split = split.clamp(1, ents.len().saturating_sub(1).max(1));
        let mut hash2 = ents.get(split).map_or(hash, |e| e.0);
        if split > 0 && ents.get(split - 1).map(|e| e.0) == Some(hash2) {
            hash2 |= 1;
        }
        let (new_lblk, new_pblk) = self.dir_append_block(dir)?;
        let as_tuple = |v: &[(u32, Vec<u8>, u32, u8)]| -> Vec<(Vec<u8>, u32, u8)> {
            v.iter().map(|e| (e.1.clone(), e.2, e.3)).collect()
        };
        let mut left = vec![0u8; bs];
        fill_leaf(&mut left, usable, &as_tuple(&ents[..split]));
        let mut right = vec![0u8; bs];
        fill_leaf(&mut right, usable, &as_tuple(&ents[split..]));
        let target = if hash >= hash2 { &mut right } else { &mut left };
        if !leaf_insert(target, usable, name, ino, code)? {
            return Err(Error::corrupted(
                "directory leaf still full after a split",
                pblk,
            ));
        }
        self.write_leaf_block(dir, pblk, &mut left)?;
        self.write_leaf_block(dir, new_pblk, &mut right)?;
        let level = frames.len() - 1;
        self.dx_insert_index(dir, &mut frames, level, hash2, new_lblk as u32)
    }

    fn dx_insert_index(
        &mut self,
        dir: &mut Inode,
        frames: &mut Vec<DxFrame>,
        level: usize,
        hash: u32,
        blk: u32,
    ) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let csum = self.has_csum();
        if frames[level].dx.entries.len() < usize::from(frames[level].dx.limit) {
            let f = &mut frames[level];
            f.dx.entries.insert(f.at + 1, (hash, blk));
            write_dx_entries(&mut f.data, &f.dx);
            let (pblk, co) = (f.pblk, f.dx.count_offset);
            let mut data = std::mem::take(&mut f.data);
            self.write_dx_block(dir, pblk, &mut data, co)?;
            frames[level].data = data;
            return Ok(());
        }
        if level == 0 {
            let levels = frames.len() as u8 - 1;
            if levels + 1 >= self.max_dx_levels() {
                return Err(Error::NoSpace);
            }
            // Grow the tree: the root's entries move to a new node.
            let (node_lblk, node_pblk) = self.dir_append_block(dir)?;
            let mut node = vec![0u8; bs];
            write_entry(&mut node, 0, 0, bs, 0, b"");
            let node_dx = DxEntries {
                count_offset: DX_NODE_COUNT,
                limit: dx_limit(bs, DX_NODE_COUNT, csum),
                entries: frames[0].dx.entries.clone(),
            };
            write_dx_entries(&mut node, &node_dx);
            self.write_dx_block(dir, node_pblk, &mut node, DX_NODE_COUNT)?;
            let root = &mut frames[0];
            let old_at = root.at;
            root.dx.entries = vec![(0, node_lblk as u32)];
            root.at = 0;
            root.data[DX_ROOT_INFO + 6] = levels + 1;
            write_dx_entries(&mut root.data, &root.dx);
            let (rp, rco) = (root.pblk, root.dx.count_offset);
            let mut rdata = std::mem::take(&mut root.data);
            self.write_dx_block(dir, rp, &mut rdata, rco)?;
            frames[0].data = rdata;
            frames.insert(
                1,
                DxFrame {
                    pblk: node_pblk,
                    data: node,
                    dx: node_dx,
                    at: old_at,
                },
            );
            self.write_inode(dir)?;
            return self.dx_insert_index(dir, frames, 1, hash, blk);
        }
        // Split an interior node in two.
        let f = &mut frames[level];
        let mut entries = f.dx.entries.clone();
        entries.insert(f.at + 1, (hash, blk));
        let mid = entries.len() / 2;
        let right_entries = entries.split_off(mid);
        let split_hash = right_entries[0].0;
        let (new_lblk, new_pblk) = self.dir_append_block(dir)?;
        let f = &mut frames[level];
        f.dx.entries = entries;
        write_dx_entries(&mut f.data, &f.dx);
        let (lp, lco) = (f.pblk, f.dx.count_offset);
        let mut ldata = std::mem::take(&mut f.data);
        self.write_dx_block(dir, lp, &mut ldata, lco)?;
        frames[level].data = ldata;
        let mut node = vec![0u8; bs];
        write_entry(&mut node, 0, 0, bs, 0, b"");
        let rdx = DxEntries {
            count_offset: DX_NODE_COUNT,
            limit: dx_limit(bs, DX_NODE_COUNT, csum),
            entries: right_entries,
        };
        write_dx_entries(&mut node, &rdx);
        self.write_dx_block(dir, new_pblk, &mut node, DX_NODE_COUNT)?;
        self.dx_insert_index(dir, frames, level - 1, split_hash, new_lblk as u32)
    }

    /// Create the first block of a new directory with "." and "..".
    pub(crate) fn dir_init(&mut self, dir: &mut Inode, parent: u32) -> Result<()> {
        self.dir_init_with(dir, parent, &[])
    }

    /// Create the first block of a directory with "." and "..", then
    /// `entries` (name, inode, file type code): a directory leaving its
    /// inline area.
    pub(crate) fn dir_init_with(
        &mut self,
        dir: &mut Inode,
        parent: u32,
        entries: &[(Vec<u8>, u32, u8)],
    ) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let usable = self.leaf_usable();
        let d = self.ft_code(FileType::Directory);
        let mut all = vec![(b".".to_vec(), dir.ino, d), (b"..".to_vec(), parent, d)];
        all.extend_from_slice(entries);
        let need: usize = all.iter().map(|(n, _, _)| entry_len(n.len())).sum();
        if need > usable {
            return Err(Error::corrupted(
                format!("directory {}: its entries do not fit in a block", dir.ino),
                0,
            ));
        }
        let (_, pblk) = self.dir_append_block(dir)?;
        let mut data = vec![0u8; bs];
        fill_leaf(&mut data, usable, &all);
        self.write_leaf_block(dir, pblk, &mut data)
    }
}
