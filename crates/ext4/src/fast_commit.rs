//! Replay of ext4 fast commits (the kernel's `fs/ext4/fast_commit.c`
//! format), for images a kernel with `-O fast_commit` left needing
//! recovery. folio itself writes full commits only.
//!
//! A fast commit is a run of tag-length-value records in the blocks after
//! the journal's log (`Journal::fast_commit_area`): little-endian `u16`
//! tag and `u16` length, then the value. A HEAD opens the area (the
//! transaction id the fast commits extend: the one after the last full
//! commit); each fast commit ends with a TAIL carrying that id and the
//! CRC32C of every record since the previous TAIL. Only records up to the
//! last TAIL whose id and checksum hold are replayed, in order, after the
//! full commits have been:
//!
//! - INODE: the raw inode, copied over the on-disk one except for its
//!   block map (kept: the range records change it); the inode is marked
//!   in use.
//! - ADD_RANGE / DEL_RANGE: map an extent into a file (blocks mapped
//!   elsewhere before are released) or unmap a range.
//! - CREAT / LINK / UNLINK: directory entries (a created directory gets
//!   "." and ".." first); link counts as the operations leave them (1
//!   after a create, 2 after a mkdir and one more for its parent, one
//!   more per link, one fewer per unlink), and a later INODE record sets
//!   them as the inode had them. (The kernel's replay gives a new
//!   directory one link and leaves its parent's count, which e2fsck then
//!   reports; folio's result is what the mkdir left.)
//!
//! At the end every block the replayed inodes map (data and tree) is
//! marked in use, i_blocks is recounted, and blocks the area named but no
//! inode maps any more go back to the free pool, as the kernel's
//! `ext4_fc_set_bitmaps_and_counters` leaves them. The oracle is the
//! kernel's own replay (its mount); e2fsprogs 1.47.0's replay is not one
//! (it writes back group descriptors read before the full replay, and an
//! inode created by the last full commit can end up beyond
//! `bg_itable_unused`, so e2fsck then clears its directory entry).

use std::collections::BTreeSet;

use folio_journal::format::crc32c_raw;

use crate::error::{Error, Result};
use crate::format::extent::Extent;
use crate::format::inode::{FileType, Inode, FL_EXTENTS, FL_INLINE_DATA};
use crate::format::{get16, get32};
use crate::fs::Core;

const TAG_ADD_RANGE: u16 = 1;
const TAG_DEL_RANGE: u16 = 2;
const TAG_CREAT: u16 = 3;
const TAG_LINK: u16 = 4;
const TAG_UNLINK: u16 = 5;
const TAG_INODE: u16 = 6;
const TAG_PAD: u16 = 7;
const TAG_TAIL: u16 = 8;
const TAG_HEAD: u16 = 9;

/// Offset of `i_block` in an on-disk inode, and of `i_generation` (the
/// first field after it).
const I_BLOCK: usize = 0x28;
const I_GENERATION: usize = 0x64;

/// One replayable record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FcOp {
    Inode {
        ino: u32,
        raw: Vec<u8>,
    },
    AddRange {
        ino: u32,
        ext: Extent,
    },
    DelRange {
        ino: u32,
        lblk: u32,
        len: u32,
    },
    Create {
        parent: u32,
        ino: u32,
        name: Vec<u8>,
    },
    Link {
        parent: u32,
        ino: u32,
        name: Vec<u8>,
    },
    Unlink {
        parent: u32,
        ino: u32,
        name: Vec<u8>,
    },
}

/// What the scan found.
#[derive(Debug, Default)]
pub(crate) struct FcScan {
    pub ops: Vec<FcOp>,
    /// Fast commits (TAILs) that verified.
    pub commits: u32,
    /// Why the scan stopped.
    pub stopped: String,
}

/// Decode a 12-byte on-disk extent (`struct ext4_extent`).
fn decode_extent(b: &[u8]) -> Option<Extent> {
    let lblk = get32(b, 0)?;
    let raw_len = get16(b, 4)?;
    let hi = get16(b, 6)?;
    let lo = get32(b, 8)?;
    let (len, unwritten) = if raw_len > 32768 {
        (u32::from(raw_len) - 32768, true)
    } else {
        (u32::from(raw_len), false)
    };
    if len == 0 || u64::from(lblk) + u64::from(len) > 1 << 32 {
        return None;
    }
    Some(Extent {
        lblk,
        len,
        pblk: u64::from(hi) << 32 | u64::from(lo),
        unwritten,
    })
}

/// Is `len` a valid value length for `tag` (the kernel's
/// `ext4_fc_value_len_isvalid`)?
fn len_ok(tag: u16, len: usize, inode_size: usize) -> bool {
    match tag {
        TAG_ADD_RANGE => len == 16,
        TAG_DEL_RANGE => len == 12,
        TAG_CREAT | TAG_LINK | TAG_UNLINK => (9..=8 + 255).contains(&len),
        TAG_INODE => (4 + 128..=4 + inode_size).contains(&len),
        TAG_PAD => true,
        TAG_TAIL => len >= 8,
        TAG_HEAD => len == 8,
        _ => false,
    }
}

/// Parse the fast-commit area: the records of every fast commit of
/// transaction `tid` whose TAIL verifies, up to the first that does not.
pub(crate) fn scan(blocks: &[Vec<u8>], tid: u32, inode_size: usize) -> FcScan {
    let mut out = FcScan::default();
    let mut pending: Vec<FcOp> = Vec::new();
    let mut crc = 0u32;
    let first = blocks.first().and_then(|b| get16(b, 0));
    if first != Some(TAG_HEAD) {
        out.stopped = "no fast commit (the area does not start with a HEAD)".into();
        return out;
    }
    for (bi, b) in blocks.iter().enumerate() {
        let mut cur = 0usize;
        while cur + 4 <= b.len() {
            let (Some(tag), Some(len)) = (get16(b, cur), get16(b, cur + 2)) else {
                break;
            };
            let len = usize::from(len);
            if tag == 0 && len == 0 {
                out.stopped = format!("end of the fast commits (block {bi} is empty)");
                return out;
            }
            let val = cur + 4;
            if val + len > b.len() || !len_ok(tag, len, inode_size) {
                out.stopped = format!("block {bi}: tag {tag} with a bad length {len}");
                return out;
            }
            let v = &b[val..val + len];
            let name = || v[8..].to_vec();
            let dentry = |v: &[u8]| (get32(v, 0).unwrap_or(0), get32(v, 4).unwrap_or(0));
            match tag {
                TAG_TAIL => {
                    crc = crc32c_raw(crc, &b[cur..val + 4]);
                    let (t, c) = (get32(v, 0).unwrap_or(0), get32(v, 4).unwrap_or(0));
                    if t != tid || c != crc {
                        out.stopped = if t != tid {
                            format!("a fast commit of transaction {t}, not {tid}")
                        } else {
                            "a fast commit fails its checksum (torn)".into()
                        };
                        return out;
                    }
                    out.ops.append(&mut pending);
                    out.commits += 1;
                    crc = 0;
                }
                TAG_HEAD => {
                    let (features, t) = (get32(v, 0).unwrap_or(0), get32(v, 4).unwrap_or(0));
                    if features != 0 {
                        out.stopped = format!("fast-commit features {features:#x} not supported");
                        return out;
                    }
                    if t != tid {
                        out.stopped = format!("fast commits of transaction {t}, not {tid}");
                        return out;
                    }
                    crc = crc32c_raw(crc, &b[cur..val + len]);
                }
                _ => {
                    crc = crc32c_raw(crc, &b[cur..val + len]);
                    let op = match tag {
                        TAG_ADD_RANGE => match decode_extent(&v[4..16]) {
                            Some(ext) => Some(FcOp::AddRange {
                                ino: get32(v, 0).unwrap_or(0),
                                ext,
                            }),
                            None => {
                                out.stopped = "an ADD_RANGE of no blocks or past 2^32".into();
                                return out;
                            }
                        },
                        TAG_DEL_RANGE => Some(FcOp::DelRange {
                            ino: get32(v, 0).unwrap_or(0),
                            lblk: get32(v, 4).unwrap_or(0),
                            len: get32(v, 8).unwrap_or(0),
                        }),
                        TAG_CREAT | TAG_LINK | TAG_UNLINK => {
                            let (parent, ino) = dentry(v);
                            let name = name();
                            Some(match tag {
                                TAG_CREAT => FcOp::Create { parent, ino, name },
                                TAG_LINK => FcOp::Link { parent, ino, name },
                                _ => FcOp::Unlink { parent, ino, name },
                            })
                        }
                        TAG_INODE => Some(FcOp::Inode {
                            ino: get32(v, 0).unwrap_or(0),
                            raw: v[4..].to_vec(),
                        }),
                        _ => None, // PAD
                    };
                    pending.extend(op);
                }
            }
            cur = val + len;
        }
    }
    out.stopped = "end of the fast-commit area".into();
    out
}

impl Core {
    /// Apply replayed fast-commit records (see the module docs). The
    /// filesystem is open without its journal: what this changes goes
    /// home at the next `sync`.
    pub(crate) fn replay_fast_commits(&mut self, ops: &[FcOp]) -> Result<()> {
        let mut modified: BTreeSet<u32> = BTreeSet::new();
        // Blocks the area maps are marked in use for the whole replay (so
        // that a directory block or tree block allocated meanwhile cannot
        // take them, and releasing an old map leaves them alone); those
        // it turned on and no replayed inode maps at the end are released.
        let mut area: Vec<(u64, u64)> = Vec::new();
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        for op in ops {
            if let FcOp::AddRange { ext, .. } = op {
                self.check_range(ext.pblk, u64::from(ext.len))?;
                area.push((ext.pblk, u64::from(ext.len)));
                claimed.extend(self.set_block_range(ext.pblk, u64::from(ext.len), true)?);
            }
        }
        self.fc_area = area;
        for op in ops {
            match op {
                FcOp::Inode { ino, raw } => {
                    // (Unlike the kernel, the old map's blocks are not
                    // released here: the range records say what leaves
                    // it, and a released block could be handed out to a
                    // directory before the end marks it again.)
                    self.fc_inode(*ino, raw)?;
                    modified.insert(*ino);
                }
                FcOp::AddRange { ino, ext } => {
                    self.fc_map(*ino, *ext, false)?;
                    modified.insert(*ino);
                }
                FcOp::DelRange { ino, lblk, len } => {
                    let ext = Extent {
                        lblk: *lblk,
                        len: *len,
                        pblk: 0,
                        unwritten: false,
                    };
                    self.fc_map(*ino, ext, true)?;
                    modified.insert(*ino);
                }
                FcOp::Create { parent, ino, name } => {
                    let mut inode = self.fc_read(*ino)?;
                    let dir = inode.is_dir();
                    self.set_inode_used(*ino, true, dir)?;
                    if dir && self.fc_blocks(&inode)? == 0 {
                        // The new directory's first block was journalled
                        // metadata, not in the fast commit: made again.
                        inode.set_size(0);
                        self.dir_init(&mut inode, *parent)?;
                        self.write_inode(&mut inode)?;
                    }
                    let added = self.fc_link(*parent, &inode, name)?;
                    // As mkdir and create leave them (the kernel's replay
                    // sets 1 for directories too, and leaves the parent's
                    // count, which e2fsck then finds wrong).
                    inode.set_links(if dir { 2 } else { 1 });
                    self.write_inode(&mut inode)?;
                    self.inodes.reset(*ino);
                    if dir && added {
                        let mut p = self.fc_read(*parent)?;
                        p.set_links(p.links().saturating_add(1));
                        self.write_inode(&mut p)?;
                        self.inodes.reset(*parent);
                    }
                    modified.insert(*ino);
                }
                FcOp::Link { parent, ino, name } => {
                    let mut inode = self.fc_read(*ino)?;
                    if self.fc_link(*parent, &inode, name)? {
                        inode.set_links(inode.links().saturating_add(1));
                        self.write_inode(&mut inode)?;
                    }
                    self.inodes.reset(*ino);
                }
                FcOp::Unlink { parent, ino, name } => {
                    let dir = self.fc_read(*parent)?;
                    if !dir.is_dir() {
                        continue;
                    }
                    match self.dir_lookup(&dir, name)? {
                        Some((i, _)) if i == *ino => {
                            self.dir_remove(&dir, name)?;
                            let mut inode = self.fc_read(*ino)?;
                            inode.set_links(inode.links().saturating_sub(1));
                            self.write_inode(&mut inode)?;
                            self.inodes.reset(*ino);
                            self.inodes.reset(*parent);
                            modified.insert(*ino);
                        }
                        _ => {}
                    }
                }
            }
        }
        // Every block the replayed inodes map is in use; i_blocks as they
        // map; what the area named and nothing maps is free again.
        let mut mapped: BTreeSet<u64> = BTreeSet::new();
        for &ino in &modified {
            let mut inode = self.fc_read(ino)?;
            if inode.mode() == 0 {
                continue;
            }
            if inode.links() == 0 {
                // Unlinked for good: freed, as orphan processing would.
                self.fc_release_map(ino)?;
                self.set_inode_used(ino, false, inode.is_dir())?;
                let mut inode = self.fc_read(ino)?;
                inode.set_dtime(crate::format::Timespec::now().sec as u32);
                self.write_inode(&mut inode)?;
                self.inodes.reset(ino);
                continue;
            }
            if inode.flags() & FL_INLINE_DATA != 0 || !Self::uses_extents(&inode) {
                continue;
            }
            let (list, tree) = self.read_extent_tree(&inode)?;
            let mut count = tree.len() as u64;
            for &t in &tree {
                claimed.extend(self.set_block_range(t, 1, true)?);
                mapped.insert(t);
            }
            for e in &list {
                self.check_range(e.pblk, u64::from(e.len))?;
                claimed.extend(self.set_block_range(e.pblk, u64::from(e.len), true)?);
                mapped.extend(e.pblk..e.pblk + u64::from(e.len));
                count += u64::from(e.len);
            }
            if inode.file_acl() != 0 {
                count += 1;
            }
            inode.set_blocks_512(count * u64::from(self.geo.block_size / 512));
            self.write_inode(&mut inode)?;
            self.inodes.reset(ino);
        }
        self.fc_area.clear();
        for (s, n) in claimed {
            for b in s..s + n {
                if !mapped.contains(&b) {
                    self.set_block_range(b, 1, false)?;
                }
            }
        }
        Ok(())
    }

    /// Release blocks `[p, p + n)` a map no longer uses, but for those
    /// the fast-commit area maps (settled at the end of the replay).
    fn fc_release(&mut self, p: u64, n: u64) -> Result<()> {
        let mut b = p;
        while b < p + n {
            let in_area = self.fc_area.iter().any(|&(s, l)| b >= s && b < s + l);
            if !in_area {
                self.set_block_range(b, 1, false)?;
            }
            b += 1;
        }
        Ok(())
    }

    /// Release every block an extent-mapped inode's map uses (data and
    /// tree), as the kernel's `ext4_ext_clear_bb` before an INODE record;
    /// the end of the replay marks what the final map uses again.
    fn fc_release_map(&mut self, ino: u32) -> Result<()> {
        let inode = self.fc_read(ino)?;
        if inode.mode() == 0
            || !Self::uses_extents(&inode)
            || inode.flags() & FL_INLINE_DATA != 0
            || get16(inode.i_block(), 0) != Some(0xF30A)
        {
            return Ok(());
        }
        let (list, tree) = self.read_extent_tree(&inode)?;
        for e in &list {
            self.fc_release(e.pblk, u64::from(e.len))?;
        }
        for t in tree {
            self.fc_release(t, 1)?;
        }
        Ok(())
    }

    fn check_range(&self, pblk: u64, len: u64) -> Result<()> {
        let end = pblk.saturating_add(len);
        if pblk < self.geo.first_data_block || end > self.geo.blocks_count {
            return Err(Error::corrupted(
                format!("a fast commit maps blocks {pblk}+{len}, outside the filesystem"),
                0,
            ));
        }
        Ok(())
    }

    /// Read an inode a record names (its number checked).
    fn fc_read(&mut self, ino: u32) -> Result<Inode> {
        if ino == 0 || ino > self.geo.inodes_count {
            return Err(Error::corrupted(
                format!("a fast commit names inode {ino}, out of range"),
                0,
            ));
        }
        self.read_inode(ino)
    }

    /// Blocks an extent-mapped inode maps (0 for anything else).
    fn fc_blocks(&mut self, inode: &Inode) -> Result<u64> {
        if !Self::uses_extents(inode) || inode.flags() & FL_INLINE_DATA != 0 {
            return Ok(0);
        }
        if get16(inode.i_block(), 0) != Some(0xF30A) {
            return Ok(0);
        }
        let (list, _) = self.read_extent_tree(inode)?;
        Ok(list.iter().map(|e| u64::from(e.len)).sum())
    }

    /// INODE: copy the record over the inode but for its map, mark it in
    /// use (the caller released the old map's blocks).
    fn fc_inode(&mut self, ino: u32, raw: &[u8]) -> Result<()> {
        let mut inode = self.fc_read(ino)?;
        let isz = inode.raw.len();
        if raw.len() < I_GENERATION || raw.len() > isz {
            return Err(Error::corrupted(
                format!("a fast commit holds inode {ino} of a bad size"),
                0,
            ));
        }
        inode.raw[..I_BLOCK].copy_from_slice(&raw[..I_BLOCK]);
        inode.raw[I_GENERATION..raw.len()].copy_from_slice(&raw[I_GENERATION..]);
        let flags = inode.flags();
        if flags & FL_EXTENTS != 0 && flags & FL_INLINE_DATA == 0 {
            if get16(inode.i_block(), 0) != Some(0xF30A) {
                let b = inode.i_block_mut();
                b.fill(0);
                b[0..2].copy_from_slice(&0xF30Au16.to_le_bytes());
                b[4..6].copy_from_slice(&4u16.to_le_bytes());
            }
        } else if flags & FL_INLINE_DATA != 0 {
            inode.raw[I_BLOCK..I_GENERATION].copy_from_slice(&raw[I_BLOCK..I_GENERATION]);
        }
        // In use first: a slot past the table's used part reads as zeros
        // until the group's `bg_itable_unused` covers it.
        self.set_inode_used(ino, true, inode.is_dir())?;
        self.write_inode(&mut inode)?;
        self.inodes.reset(ino);
        Ok(())
    }

    /// ADD_RANGE (`del` false) or DEL_RANGE: change an extent-mapped
    /// file's map; blocks it no longer maps are released.
    fn fc_map(&mut self, ino: u32, ext: Extent, del: bool) -> Result<()> {
        let mut inode = self.fc_read(ino)?;
        if inode.mode() == 0 || !Self::uses_extents(&inode) || inode.flags() & FL_INLINE_DATA != 0 {
            return Ok(());
        }
        let (mut list, _) = self.read_extent_tree(&inode)?;
        let from = u64::from(ext.lblk);
        let to = from + u64::from(ext.len);
        let removed = crate::bmap::remove_range(&mut list, from, to);
        for (p, n) in removed {
            self.fc_release(p, n)?;
        }
        if !del {
            let mut lblk = u64::from(ext.lblk);
            let mut pblk = ext.pblk;
            let mut left = u64::from(ext.len);
            while left > 0 {
                let n = left.min(crate::bmap::max_len(ext.unwritten).into());
                crate::bmap::insert_extent(
                    &mut list,
                    Extent {
                        lblk: lblk as u32,
                        len: n as u32,
                        pblk,
                        unwritten: ext.unwritten,
                    },
                );
                lblk += n;
                pblk += n;
                left -= n;
            }
        }
        self.write_extent_tree(&mut inode, list)?;
        self.write_inode(&mut inode)?;
        self.inodes.reset(ino);
        Ok(())
    }

    /// Add `name` → `inode` to `parent` unless the name is there already
    /// (the kernel's replay takes an existing entry as done). `true` if
    /// it added one.
    fn fc_link(&mut self, parent: u32, inode: &Inode, name: &[u8]) -> Result<bool> {
        let mut dir = self.fc_read(parent)?;
        if !dir.is_dir() || parent == inode.ino {
            return Err(Error::corrupted(
                format!(
                    "a fast commit links inode {} into inode {parent}, not a directory \
                     apart from it",
                    inode.ino
                ),
                0,
            ));
        }
        if self.dir_lookup(&dir, name)?.is_some() {
            return Ok(false);
        }
        let ft = FileType::from_mode(inode.mode());
        self.dir_add(&mut dir, name, inode.ino, ft)?;
        self.inodes.reset(parent);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(out: &mut Vec<u8>, tag: u16, val: &[u8]) {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&(val.len() as u16).to_le_bytes());
        out.extend_from_slice(val);
    }

    /// Close a fast commit: TAIL with `tid` and the CRC of everything
    /// since `from` (plus the TAIL's own tag, length and tid).
    fn tail(out: &mut Vec<u8>, from: usize, tid: u32, bad: bool) {
        let start = out.len();
        let mut v = tid.to_le_bytes().to_vec();
        v.extend_from_slice(&[0; 4]);
        rec(out, TAG_TAIL, &v);
        let crc = crc32c_raw(0, &out[from..start + 8]) ^ u32::from(bad);
        out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    }

    fn add_range(ino: u32, lblk: u32, len: u16, pblk: u32) -> Vec<u8> {
        let mut v = ino.to_le_bytes().to_vec();
        v.extend_from_slice(&lblk.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&pblk.to_le_bytes());
        v
    }

    /// Only fast commits of the expected transaction whose TAIL checksum
    /// holds are replayed, and nothing after the first that fails.
    #[test]
    fn scan_keeps_verified_fast_commits_only() {
        let mut b = Vec::new();
        let mut head = 0u32.to_le_bytes().to_vec();
        head.extend_from_slice(&7u32.to_le_bytes());
        rec(&mut b, TAG_HEAD, &head);
        rec(&mut b, TAG_ADD_RANGE, &add_range(12, 0, 2, 500));
        tail(&mut b, 0, 7, false);
        let second = b.len();
        rec(&mut b, TAG_ADD_RANGE, &add_range(13, 4, 1, 600));
        tail(&mut b, second, 7, false);
        let third = b.len();
        rec(&mut b, TAG_ADD_RANGE, &add_range(14, 0, 1, 700));
        tail(&mut b, third, 7, true);
        let fourth = b.len();
        rec(&mut b, TAG_ADD_RANGE, &add_range(15, 0, 1, 800));
        tail(&mut b, fourth, 7, false);
        b.resize(4096, 0);
        let s = scan(std::slice::from_ref(&b), 7, 256);
        assert_eq!(s.commits, 2, "{}", s.stopped);
        assert_eq!(s.ops.len(), 2);
        assert!(matches!(s.ops[1], FcOp::AddRange { ino: 13, .. }));
        assert!(s.stopped.contains("checksum"), "{}", s.stopped);
        // Another transaction's fast commits are not this one's.
        let s = scan(std::slice::from_ref(&b), 8, 256);
        assert_eq!((s.commits, s.ops.len()), (0, 0), "{}", s.stopped);
        // No HEAD, no fast commits.
        let s = scan(&[vec![0; 4096]], 7, 256);
        assert_eq!(s.commits, 0);
    }
}
