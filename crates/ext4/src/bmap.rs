//! Logical-to-physical block mapping: extent trees (ext4) and indirect
//! block maps (ext2/3).
//!
//! Extent trees are edited in place, one leaf at a time
//! (`extent_tree`); the list functions here edit the sorted extents of one
//! leaf. `Core::write_extent_tree` rebuilds a whole tree from a
//! list, for the operations that shift every extent anyway (collapse and
//! insert range) and for mkfs.

use crate::error::{Error, Result};
use crate::extent_tree::{Line, ROOT_MAX};
use crate::format::extent::{
    block_capacity, block_csum, parse_node, tail_offset, write_node, Extent, Index, Node,
    MAX_DEPTH, MAX_INIT_LEN, MAX_UNWRITTEN_LEN,
};
use crate::format::inode::{Inode, FL_EXTENTS};
use crate::format::{get32, put32};
use crate::fs::Core;

/// What a logical block maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    Hole,
    Mapped { pblk: u64, unwritten: bool },
}

/// Files of at least this i_size get a region of their own
/// (`Core::empty_file_region`) and displaced blocks out of the way.
const LARGE_FILE_BYTES: u64 = 16 << 20;

/// Blocks left free before a large file's line for its extent tree: a
/// file of `n` blocks written at random has at most about `n / 2`
/// extents, `(bs − 12) / 12` to a tree block (84 on 1 KiB blocks).
fn tree_room(n: u64, bs: u64) -> u64 {
    let per_leaf = (bs.saturating_sub(12) / 12).max(1);
    (n / 256).max(n / (2 * per_leaf)).clamp(16, 8192)
}

pub(crate) fn max_len(unwritten: bool) -> u32 {
    if unwritten {
        MAX_UNWRITTEN_LEN
    } else {
        MAX_INIT_LEN
    }
}

/// Insert `e` into a sorted, non-overlapping list, merging with neighbours
/// that continue it logically and physically.
pub(crate) fn insert_extent(list: &mut Vec<Extent>, e: Extent) {
    let pos = list.partition_point(|x| x.lblk < e.lblk);
    list.insert(pos, e);
    merge_around(list, pos);
}

fn mergeable(a: &Extent, b: &Extent) -> bool {
    a.end() == u64::from(b.lblk)
        && a.pblk + u64::from(a.len) == b.pblk
        && a.unwritten == b.unwritten
        && a.len + b.len <= max_len(a.unwritten)
}

fn merge_around(list: &mut Vec<Extent>, pos: usize) {
    let mut pos = pos;
    if pos > 0 && mergeable(&list[pos - 1], &list[pos]) {
        list[pos - 1].len += list[pos].len;
        list.remove(pos);
        pos -= 1;
    }
    if pos + 1 < list.len() && mergeable(&list[pos], &list[pos + 1]) {
        list[pos].len += list[pos + 1].len;
        list.remove(pos + 1);
    }
}

/// Remove logical blocks `[from, to)` from the list; returns the physical
/// runs that were mapped there.
pub(crate) fn remove_range(list: &mut Vec<Extent>, from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut freed = Vec::new();
    let mut out = Vec::with_capacity(list.len() + 1);
    for e in list.drain(..) {
        let (s, t) = (u64::from(e.lblk), e.end());
        if t <= from || s >= to {
            out.push(e);
            continue;
        }
        let cut_s = s.max(from);
        let cut_t = t.min(to);
        freed.push((e.pblk + (cut_s - s), cut_t - cut_s));
        if s < cut_s {
            out.push(Extent {
                len: (cut_s - s) as u32,
                ..e
            });
        }
        if cut_t < t {
            out.push(Extent {
                lblk: cut_t as u32,
                len: (t - cut_t) as u32,
                pblk: e.pblk + (cut_t - s),
                unwritten: e.unwritten,
            });
        }
    }
    *list = out;
    freed
}

/// Mark `[from, to)` written (splitting unwritten extents); returns the
/// logical ranges that were unwritten before.
pub(crate) fn mark_written(list: &mut Vec<Extent>, from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut converted = Vec::new();
    let mut out = Vec::with_capacity(list.len() + 2);
    for e in list.drain(..) {
        let (s, t) = (u64::from(e.lblk), e.end());
        if !e.unwritten || t <= from || s >= to {
            out.push(e);
            continue;
        }
        let cs = s.max(from);
        let ct = t.min(to);
        converted.push((cs, ct - cs));
        if s < cs {
            out.push(Extent {
                len: (cs - s) as u32,
                ..e
            });
        }
        out.push(Extent {
            lblk: cs as u32,
            len: (ct - cs) as u32,
            pblk: e.pblk + (cs - s),
            unwritten: false,
        });
        if ct < t {
            out.push(Extent {
                lblk: ct as u32,
                len: (t - ct) as u32,
                pblk: e.pblk + (ct - s),
                unwritten: true,
            });
        }
    }
    // Written pieces may now merge with written neighbours.
    let mut merged: Vec<Extent> = Vec::with_capacity(out.len());
    for e in out {
        if let Some(last) = merged.last_mut() {
            if mergeable(last, &e) {
                last.len += e.len;
                continue;
            }
        }
        merged.push(e);
    }
    *list = merged;
    converted
}

impl Core {
    pub(crate) fn uses_extents(inode: &Inode) -> bool {
        inode.flags() & FL_EXTENTS != 0
    }

    /// Largest logical block count a file of this inode may address.
    pub(crate) fn max_file_blocks(&self, inode: &Inode) -> u64 {
        if Self::uses_extents(inode) {
            1 << 32
        } else {
            let apb = u64::from(self.geo.block_size / 4);
            12 + apb + apb * apb + apb * apb * apb
        }
    }

    /// Write `list` as the extent tree of `inode`, reusing its old tree
    /// blocks. Updates i_blocks for tree blocks gained or lost; the caller
    /// writes the inode.
    pub(crate) fn write_extent_tree(&mut self, inode: &mut Inode, list: Vec<Extent>) -> Result<()> {
        self.note_inode_change(inode.ino, true);
        let (_, old_blocks) = self.read_extent_tree(inode)?;
        let bs = self.geo.block_size as usize;
        let cap = usize::from(block_capacity(bs));
        // Level sizes, bottom up: leaves, then index levels, until the
        // top fits in the inode.
        let mut levels: Vec<usize> = Vec::new(); // node counts per on-disk level
        let mut n = list.len();
        while n > usize::from(ROOT_MAX) {
            let nodes = n.div_ceil(cap);
            levels.push(nodes);
            n = nodes;
        }
        if levels.len() > usize::from(MAX_DEPTH) {
            return Err(Error::NoSpace);
        }
        let needed: usize = levels.iter().sum();
        let mut blocks = old_blocks.clone();
        blocks.sort_unstable();
        let goal = list.first().map_or(0, |e| e.pblk.saturating_sub(1));
        let mut fresh = Vec::new();
        while blocks.len() < needed {
            match self.alloc_blocks(goal, (needed - blocks.len()) as u32) {
                Ok((b, len)) => {
                    for x in b..b + u64::from(len) {
                        blocks.push(x);
                        fresh.push(x);
                    }
                }
                Err(e) => {
                    for x in fresh {
                        self.free_blocks(x, 1)?;
                    }
                    return Err(e);
                }
            }
        }
        let surplus: Vec<u64> = blocks.split_off(needed);
        let seed = inode.csum_seed(self.csum_seed);
        let csum = self.has_csum();
        // Build bottom-up. `children` holds (first lblk, block) of the
        // level below.
        let mut next_block = 0usize;
        let mut children: Vec<(u32, u64)> = Vec::new();
        let mut depth = 0u16;
        let mut buf = vec![0u8; bs];
        for (li, &count) in levels.iter().enumerate() {
            let mut this_level = Vec::with_capacity(count);
            for k in 0..count {
                let blk = blocks[next_block];
                next_block += 1;
                let node = if li == 0 {
                    let chunk = &list[k * cap..((k + 1) * cap).min(list.len())];
                    this_level.push((chunk[0].lblk, blk));
                    Node::Leaf(chunk.to_vec())
                } else {
                    let chunk = &children[k * cap..((k + 1) * cap).min(children.len())];
                    this_level.push((chunk[0].0, blk));
                    Node::Index {
                        depth,
                        entries: chunk
                            .iter()
                            .map(|&(l, c)| Index { lblk: l, child: c })
                            .collect(),
                    }
                };
                write_node(&mut buf, cap as u16, &node);
                if csum {
                    let c = block_csum(seed, &buf, cap as u16).expect("tail fits in block");
                    put32(&mut buf, tail_offset(cap as u16), c);
                }
                let changed = self
                    .cache
                    .read(blk)
                    .map(|old| old != &buf[..])
                    .unwrap_or(true);
                if changed {
                    self.cache.write(blk, &buf)?;
                }
            }
            children = this_level;
            depth += 1;
        }
        let root = if levels.is_empty() {
            Node::Leaf(list.clone())
        } else {
            Node::Index {
                depth,
                entries: children
                    .iter()
                    .map(|&(l, c)| Index { lblk: l, child: c })
                    .collect(),
            }
        };
        let mut rootbuf = [0u8; 60];
        write_node(&mut rootbuf, ROOT_MAX, &root);
        inode.i_block_mut().copy_from_slice(&rootbuf);
        for b in &surplus {
            self.free_blocks(*b, 1)?;
        }
        let spb = u64::from(self.geo.block_size / 512);
        let delta = needed as i64 - old_blocks.len() as i64;
        self.add_i_blocks(inode, delta * spb as i64)?;
        self.inodes.make_room_for_map(inode.ino);
        let obj = self.inodes.obj(inode.ino);
        self.inodes.install_map(
            &mut obj.data(),
            crate::extent_tree::ExtentMap::from_sorted(list),
        );
        Ok(())
    }

    pub(crate) fn add_i_blocks(&self, inode: &mut Inode, delta_512: i64) -> Result<()> {
        let huge = self
            .sb
            .has_ro_compat(crate::format::superblock::ro_compat::HUGE_FILE);
        let cur = inode.blocks_512(huge, self.geo.block_size) as i64;
        let new = cur + delta_512;
        if new < 0 {
            return Err(Error::corrupted(
                format!("inode {}: i_blocks underflow", inode.ino),
                0,
            ));
        }
        inode.set_blocks_512(new as u64);
        Ok(())
    }

    // ---- indirect maps ----

    fn ind_ptr(&mut self, blk: u64, idx: usize, ino: u32) -> Result<u64> {
        let b = self.cache.read(blk)?;
        let p = u64::from(get32(b, idx * 4).unwrap_or(0));
        if p != 0 {
            self.check_block(p, format_args!("inode {ino} indirect pointer"), blk)?;
        }
        Ok(p)
    }

    /// Path through the indirect tree for `lblk`: (slot in i_block, indices
    /// within each level, how many levels).
    fn ind_path(&self, lblk: u64) -> Option<(usize, [usize; 3], usize)> {
        let apb = u64::from(self.geo.block_size / 4);
        if lblk < 12 {
            return Some((lblk as usize, [0; 3], 0));
        }
        let mut l = lblk - 12;
        if l < apb {
            return Some((12, [l as usize, 0, 0], 1));
        }
        l -= apb;
        if l < apb * apb {
            return Some((13, [(l / apb) as usize, (l % apb) as usize, 0], 2));
        }
        l -= apb * apb;
        if l < apb * apb * apb {
            return Some((
                14,
                [
                    (l / (apb * apb)) as usize,
                    ((l / apb) % apb) as usize,
                    (l % apb) as usize,
                ],
                3,
            ));
        }
        None
    }

    /// Blocks from `lblk` (a hole) to the end of the subtree whose
    /// missing pointer makes it one: all holes. Past the map's reach,
    /// everything is.
    fn ind_hole_span(&mut self, inode: &Inode, lblk: u64) -> Result<u64> {
        let apb = u64::from(self.geo.block_size / 4);
        let Some((slot, idx, levels)) = self.ind_path(lblk) else {
            return Ok(u64::MAX / 2);
        };
        // Offset of lblk within the subtree below depth `d`, and its size.
        let within = |d: usize| -> (u64, u64) {
            let mut off = 0;
            for &i in &idx[d..levels] {
                off = off * apb + i as u64;
            }
            (off, apb.pow((levels - d) as u32))
        };
        let mut p = u64::from(get32(inode.i_block(), slot * 4).unwrap_or(0));
        let mut d = 0;
        while p != 0 && d < levels {
            p = self.ind_ptr(p, idx[d], inode.ino)?;
            d += 1;
        }
        if p != 0 {
            return Ok(0);
        }
        let (off, size) = within(d);
        Ok(size - off)
    }

    fn ind_lookup(&mut self, inode: &Inode, lblk: u64) -> Result<u64> {
        let Some((slot, idx, levels)) = self.ind_path(lblk) else {
            return Ok(0);
        };
        let path = &idx[..levels];
        let mut p = u64::from(get32(inode.i_block(), slot * 4).unwrap_or(0));
        if p != 0 {
            self.check_block(p, format_args!("inode {} block pointer", inode.ino), 0)?;
        }
        for &i in path {
            if p == 0 {
                return Ok(0);
            }
            p = self.ind_ptr(p, i, inode.ino)?;
        }
        Ok(p)
    }

    /// Map `lblk` to (mapping, number of following blocks with the same
    /// kind and contiguous placement, at most `max`).
    pub(crate) fn map_block(
        &mut self,
        inode: &Inode,
        lblk: u64,
        max: u64,
    ) -> Result<(Mapping, u64)> {
        let max = max.max(1);
        // i_block holds data, not a block map.
        self.not_inline(inode, "a block mapping")?;
        if Self::uses_extents(inode) {
            return self.with_ext(inode, |map| {
                if let Some(e) = map.containing(lblk) {
                    let off = lblk - u64::from(e.lblk);
                    return (
                        Mapping::Mapped {
                            pblk: e.pblk + off,
                            unwritten: e.unwritten,
                        },
                        (u64::from(e.len) - off).min(max),
                    );
                }
                let gap = map
                    .after(lblk)
                    .map_or(max, |e| (u64::from(e.lblk) - lblk).min(max));
                (Mapping::Hole, gap)
            });
        }
        let first = self.ind_lookup(inode, lblk)?;
        if first == 0 {
            // A hole: as long as the missing pointer's subtree (a hostile
            // i_size must not make a walk of the map cost one lookup per
            // block).
            let span = self.ind_hole_span(inode, lblk)?;
            return Ok((Mapping::Hole, span.clamp(1, max)));
        }
        let mut n = 1;
        let limit = max.min(1024);
        while n < limit {
            let p = self.ind_lookup(inode, lblk + n)?;
            let contiguous = if first == 0 { p == 0 } else { p == first + n };
            if !contiguous {
                break;
            }
            n += 1;
        }
        if first == 0 {
            Ok((Mapping::Hole, n))
        } else {
            Ok((
                Mapping::Mapped {
                    pblk: first,
                    unwritten: false,
                },
                n,
            ))
        }
    }

    /// Allocate a zeroed metadata block near `goal`.
    fn alloc_zeroed_block(&mut self, goal: u64) -> Result<u64> {
        let (b, _) = self.alloc_blocks(goal, 1)?;
        let z = vec![0u8; self.geo.block_size as usize];
        self.cache.write(b, &z)?;
        Ok(b)
    }

    /// Map `lblk` in an indirect-mapped inode to `pblk`, allocating
    /// indirect blocks on the way.
    fn ind_set(&mut self, inode: &mut Inode, lblk: u64, pblk: u64) -> Result<()> {
        self.note_inode_change(inode.ino, true);
        let (slot, idx, levels) = self.ind_path(lblk).ok_or(Error::FileTooBig)?;
        let path = &idx[..levels];
        let spb = i64::from(self.geo.block_size / 512);
        if path.is_empty() {
            put32(inode.i_block_mut(), slot * 4, pblk as u32);
            return Ok(());
        }
        let mut p = u64::from(get32(inode.i_block(), slot * 4).unwrap_or(0));
        if p == 0 {
            p = self.alloc_zeroed_block(pblk)?;
            put32(inode.i_block_mut(), slot * 4, p as u32);
            self.add_i_blocks(inode, spb)?;
        }
        for (k, &idx) in path.iter().enumerate() {
            if k + 1 == path.len() {
                let b = self.cache.modify(p)?;
                put32(b, idx * 4, pblk as u32);
            } else {
                let mut next = self.ind_ptr(p, idx, inode.ino)?;
                if next == 0 {
                    next = self.alloc_zeroed_block(pblk)?;
                    let b = self.cache.modify(p)?;
                    put32(b, idx * 4, next as u32);
                    self.add_i_blocks(inode, spb)?;
                }
                p = next;
            }
        }
        Ok(())
    }

    /// Unmap logical block `lblk` of an indirect-mapped inode (the caller
    /// frees the data block; indirect blocks stay).
    pub(crate) fn ind_clear(&mut self, inode: &mut Inode, lblk: u64) -> Result<()> {
        self.note_inode_change(inode.ino, true);
        let Some((slot, idx, levels)) = self.ind_path(lblk) else {
            return Ok(());
        };
        let path = &idx[..levels];
        if path.is_empty() {
            put32(inode.i_block_mut(), slot * 4, 0);
            return Ok(());
        }
        let mut p = u64::from(get32(inode.i_block(), slot * 4).unwrap_or(0));
        for (k, &idx) in path.iter().enumerate() {
            if p == 0 {
                return Ok(());
            }
            if k + 1 == path.len() {
                let b = self.cache.modify(p)?;
                put32(b, idx * 4, 0);
            } else {
                p = self.ind_ptr(p, idx, inode.ino)?;
            }
        }
        Ok(())
    }

    /// Make every block of `[lblk, lblk+len)` mapped and written. Returns the
    /// logical ranges that were newly allocated or converted from unwritten
    /// (their old contents must not be exposed: the caller overwrites or
    /// zeroes them). The caller writes the inode.
    pub(crate) fn allocate_range(
        &mut self,
        inode: &mut Inode,
        lblk: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>> {
        self.check_writable()?;
        let end = lblk + len;
        if end > self.max_file_blocks(inode) {
            return Err(Error::FileTooBig);
        }
        let spb = i64::from(self.geo.block_size / 512);
        let mut fresh = Vec::new();
        if Self::uses_extents(inode) {
            fresh = self.ext_fill_holes(inode, lblk, end, false)?;
            let converted = self.ext_mark_written(inode, lblk, end)?;
            fresh.extend(converted);
        } else {
            for l in lblk..end {
                if self.ind_lookup(inode, l)? != 0 {
                    continue;
                }
                let goal = if l > 0 {
                    self.ind_lookup(inode, l - 1)? + 1
                } else {
                    0
                };
                let goal = if goal <= 1 {
                    self.inode_goal(inode)
                } else {
                    goal
                };
                let (pb, _) = self.alloc_blocks(goal, 1)?;
                if let Err(e) = self.ind_set(inode, l, pb) {
                    self.free_blocks(pb, 1)?;
                    return Err(e);
                }
                self.add_i_blocks(inode, spb)?;
                match fresh.last_mut() {
                    Some((s, n)) if *s + *n == l => *n += 1,
                    _ => fresh.push((l, 1)),
                }
            }
        }
        Ok(fresh)
    }

    /// A good physical goal for logical block `lblk`: where the file's
    /// nearest extent would put it if the file were laid out in one
    /// straight line (before or after that extent, as
    /// `ext4_ext_find_goal`), or, in an empty file, `lblk` blocks past
    /// [`Self::empty_file_region`]. Blocks written in any order then land
    /// where their neighbours expect them, and runs written at different
    /// times merge into one extent.
    ///
    /// Returns the goal and, for a large file, where to look instead if
    /// the goal block is taken: just past the file's straight-line
    /// region, so that a block displaced by metadata or another file
    /// does not take the spot of one of its own later neighbours (which
    /// would displace that one in turn, and so on down the file).
    pub(crate) fn goal_for(&mut self, inode: &Inode, lblk: u64) -> Result<(u64, Option<u64>)> {
        let base = self.inode_goal(inode);
        let bs = u64::from(self.geo.block_size);
        let size_blocks = inode.size().div_ceil(bs);
        let clamp = |g: u64, fs: &Self| if g >= fs.geo.blocks_count { base } else { g };
        if size_blocks >= LARGE_FILE_BYTES / bs {
            // A large file keeps to its line, whatever its neighbours do
            // (one displaced block must not drag the next ones after it).
            // (goal, the line's last block): no copy of the line per block.
            let last = size_blocks.saturating_sub(1);
            let spots = |l: &Line| (l.at(lblk), l.at(last));
            let (goal, end) = match self.with_ext(inode, |m| m.line.as_ref().map(spots))? {
                Some(p) => p,
                None => {
                    let l = self.plan_line(inode, size_blocks)?;
                    let p = spots(&l);
                    self.with_ext(inode, |m| m.line = Some(l))?;
                    p
                }
            };
            // Displaced blocks go on a second line past the end of the
            // first, so that a run displaced together (by a superblock
            // backup or an inode table on the way, or another file's
            // blocks where pieces were planned) stays together.
            let f0 = end.saturating_add(1);
            let fallback =
                (f0 < self.geo.blocks_count).then(|| f0 + lblk % (self.geo.blocks_count - f0));
            return Ok((clamp(goal, self), fallback));
        }
        let goal = self.with_ext(inode, |map| {
            if let Some(e) = map.at_or_before(lblk) {
                e.pblk + (lblk - u64::from(e.lblk))
            } else if let Some(e) = map.after(lblk) {
                e.pblk.saturating_sub(u64::from(e.lblk) - lblk)
            } else {
                base + lblk
            }
        })?;
        Ok((clamp(goal, self), None))
    }

    /// Where new extent-tree blocks of `inode` go: in the room left for
    /// them just before a large file's straight line (so they take none of
    /// its data's places), else at the start of the inode's group.
    pub(crate) fn tree_goal(&mut self, inode: &Inode) -> u64 {
        let base = self.inode_goal(inode);
        let bs = u64::from(self.geo.block_size);
        let size_blocks = inode.size().div_ceil(bs);
        let line = self.inodes.get(inode.ino).and_then(|o| {
            o.data()
                .extents
                .as_ref()
                .and_then(|m| m.line.as_ref().map(Line::start))
        });
        match line {
            Some(l) if size_blocks >= LARGE_FILE_BYTES / bs => l
                .saturating_sub(tree_room(size_blocks, bs))
                .max(base.min(l)),
            _ => base,
        }
    }

    /// The line a large file's blocks will follow: pieces laid over the
    /// filesystem's free runs of at least 8 MiB (or the file's size; 1 MiB,
    /// then 64 KiB, where the long ones do not hold it), in address order
    /// from the inode's group, so that its blocks, written
    /// in any order, land where nothing else is and the file breaks only
    /// where its free space does (a superblock backup, a flex group's
    /// tables, another file). If the runs do not hold the file, a straight
    /// line from the region [`Self::empty_file_region`] finds, or from the
    /// inode's group, past room for the tree's own blocks.
    fn plan_line(&mut self, inode: &Inode, size_blocks: u64) -> Result<Line> {
        // Long runs if they hold the file; else shorter ones too.
        let bs = u64::from(self.geo.block_size);
        for min_bytes in [8u64 << 20, 1 << 20, 64 << 10] {
            let min_run = (min_bytes / bs).max(1);
            if let Some(l) = self.line_over_free_runs(inode, size_blocks, min_run)? {
                return Ok(l);
            }
        }
        let base = self
            .empty_file_region(inode)
            .unwrap_or_else(|| self.inode_goal(inode));
        Ok(Line::straight(base + tree_room(size_blocks, bs)))
    }

    /// Pieces over free runs (see [`Self::plan_line`]), the first leaving
    /// room in front for the tree's blocks; `None` if the runs do not hold
    /// the file. Stops scanning once they do.
    fn line_over_free_runs(
        &mut self,
        inode: &Inode,
        size_blocks: u64,
        min_run: u64,
    ) -> Result<Option<Line>> {
        let bs = u64::from(self.geo.block_size);
        let room = tree_room(size_blocks, bs);
        let need = size_blocks + room;
        let min_run = min_run.clamp(1, need);
        let ng = self.geo.group_count;
        if ng == 0 {
            return Ok(None);
        }
        let g0 = (inode.ino - 1) / self.geo.inodes_per_group % ng;
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut lblk = 0u64;
        // A run in progress, merged across group boundaries.
        let mut cur: Option<(u64, u64)> = None;
        let take = |run: (u64, u64), pieces: &mut Vec<(u64, u64)>, lblk: &mut u64| {
            if run.1 < min_run || *lblk >= size_blocks {
                return;
            }
            let (pblk, len) = if pieces.is_empty() {
                let r = room.min(run.1 / 2);
                (run.0 + r, run.1 - r)
            } else {
                run
            };
            pieces.push((*lblk, pblk));
            *lblk += len;
        };
        for i in 0..ng {
            if lblk >= size_blocks {
                break;
            }
            let g = (g0 + i) % ng;
            if g == 0 && i != 0 {
                // Wrapped: the last group's run does not go on into group 0.
                if let Some(r) = cur.take() {
                    take(r, &mut pieces, &mut lblk);
                }
            }
            let free = u64::from(self.groups[g as usize].free_blocks());
            if free < min_run && cur.is_none() {
                continue;
            }
            if free == 0 {
                if let Some(r) = cur.take() {
                    take(r, &mut pieces, &mut lblk);
                }
                continue;
            }
            let bm = self.load_block_bitmap(g)?;
            let start = self.group_first_block(g);
            let count = self.group_block_count(g) as usize;
            let mut b = 0usize;
            while b < count {
                if b.is_multiple_of(8) && b + 8 <= count && (bm[b / 8] == 0 || bm[b / 8] == 0xFF) {
                    if bm[b / 8] == 0 {
                        cur.get_or_insert((start + b as u64, 0)).1 += 8;
                    } else if let Some(r) = cur.take() {
                        take(r, &mut pieces, &mut lblk);
                    }
                    b += 8;
                    continue;
                }
                if bm[b / 8] & (1 << (b % 8)) == 0 {
                    cur.get_or_insert((start + b as u64, 0)).1 += 1;
                } else if let Some(r) = cur.take() {
                    take(r, &mut pieces, &mut lblk);
                }
                b += 1;
            }
        }
        if let Some(r) = cur.take() {
            take(r, &mut pieces, &mut lblk);
        }
        if lblk < size_blocks {
            return Ok(None);
        }
        Ok(Line::from_pieces(pieces))
    }

    /// Where logical block 0 of a file with no extents yet should go. A
    /// small file starts at its inode's group, next to its neighbours; a
    /// large one (16 MiB or more of i_size, typically a file about to be
    /// written at random, as a database or VM image is) gets the first
    /// run of groups, from its inode's group on, that are at least three
    /// quarters free and together hold its size, so that its blocks, laid
    /// out in one straight line from there, do not run into another
    /// file's.
    fn empty_file_region(&mut self, inode: &Inode) -> Option<u64> {
        let bs = u64::from(self.geo.block_size);
        let blocks = inode.size().div_ceil(bs);
        if blocks < LARGE_FILE_BYTES / bs {
            return Some(self.inode_goal(inode));
        }
        let ng = self.geo.group_count;
        let bpg = u64::from(self.geo.blocks_per_group);
        let k = u32::try_from(blocks.div_ceil(bpg))
            .unwrap_or(u32::MAX)
            .clamp(1, ng);
        let roomy = |g: u32| {
            let gd = &self.groups[g as usize];
            u64::from(gd.free_blocks()) * 4 >= u64::from(self.group_block_count(g)) * 3
        };
        // The region starts in group `start` (after its metadata) and runs
        // on into the next `k` groups. First a region whose later groups hold no superblock backup
        // (the file's straight line would run into it), then any.
        let fits = |start: u32, strict: bool| -> Option<u32> {
            let end = (start + k).min(ng - 1);
            if !roomy(start) {
                return Some(start);
            }
            (start + 1..=end).find(|&g| !roomy(g) || (strict && crate::fs::has_super(&self.sb, g)))
        };
        let g0 = (inode.ino - 1) / self.geo.inodes_per_group;
        let mut found = None;
        'search: for strict in [true, false] {
            for (from, to) in [(g0, ng), (0, g0.min(ng))] {
                let mut start = from;
                while start + k <= to {
                    match fits(start, strict) {
                        Some(bad) => start = bad + 1,
                        None => {
                            found = Some(start);
                            break 'search;
                        }
                    }
                }
            }
        }
        found.and_then(|g| self.first_free_in_group(g))
    }

    /// Allocate up to `n` blocks (one contiguous piece, near
    /// [`Self::goal_for`]) for the hole at `lblk` and map them as one
    /// extent, written or unwritten; i_blocks is updated, the caller
    /// writes the inode. Returns (first block, count). Nothing stays
    /// allocated if the mapping fails.
    pub(crate) fn ext_alloc_extent(
        &mut self,
        inode: &mut Inode,
        lblk: u64,
        n: u64,
        unwritten: bool,
    ) -> Result<(u64, u32)> {
        let (goal, fallback) = self.goal_for(inode, lblk)?;
        let want = n.min(u64::from(max_len(unwritten))) as u32;
        let (pb, got) = self.alloc_blocks_at(goal, fallback, want)?;
        let e = Extent {
            lblk: lblk as u32,
            len: got,
            pblk: pb,
            unwritten,
        };
        if let Err(err) = self.ext_insert(inode, e) {
            self.free_blocks(pb, u64::from(got))?;
            return Err(err);
        }
        self.add_i_blocks(inode, i64::from(got) * i64::from(self.geo.block_size / 512))?;
        Ok((pb, got))
    }

    /// Map every hole of `[from, to)` to new blocks, as written or
    /// unwritten extents, all or nothing (on failure nothing new stays
    /// mapped: the blocks were never written, so they must not be
    /// readable). Returns the logical runs filled; i_blocks is updated,
    /// the caller writes the inode.
    pub(crate) fn ext_fill_holes(
        &mut self,
        inode: &mut Inode,
        from: u64,
        to: u64,
        unwritten: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let mut holes = Vec::new();
        let mut cur = from;
        while cur < to {
            let (m, n) = self.map_block(inode, cur, to - cur)?;
            if m == Mapping::Hole {
                holes.push((cur, n));
            }
            cur += n;
        }
        let mut filled: Vec<(u64, u64)> = Vec::new();
        let result = (|| -> Result<()> {
            for (start, n) in holes {
                let mut cur = start;
                while cur < start + n {
                    let (_, got) = self.ext_alloc_extent(inode, cur, start + n - cur, unwritten)?;
                    filled.push((cur, u64::from(got)));
                    cur += u64::from(got);
                }
            }
            Ok(())
        })();
        if let Err(err) = result {
            for (l, n) in filled {
                self.free_extent_range(inode, l, l + n)?;
            }
            return Err(err);
        }
        Ok(filled)
    }

    pub(crate) fn inode_goal(&self, inode: &Inode) -> u64 {
        let g = (inode.ino - 1) / self.geo.inodes_per_group;
        self.group_first_block(g)
    }

    /// Unmap and free logical blocks `[from, to)` of an extent-mapped
    /// inode (tree rewritten, i_blocks updated; the caller writes the
    /// inode).
    pub(crate) fn free_extent_range(
        &mut self,
        inode: &mut Inode,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let spb = u64::from(self.geo.block_size / 512);
        let freed = self.ext_remove(inode, from, to)?;
        let mut total = 0;
        for (p, l) in freed {
            self.free_blocks(p, l)?;
            total += l;
        }
        self.add_i_blocks(inode, -((total * spb) as i64))
    }

    /// Free every block mapped at or beyond logical block `from` (and
    /// indirect blocks left empty). The caller writes the inode.
    pub(crate) fn truncate_blocks(&mut self, inode: &mut Inode, from: u64) -> Result<()> {
        self.check_writable()?;
        if Self::is_inline(inode) {
            // No blocks: an inline inode being freed (its data goes with
            // the inode and its xattrs).
            return Ok(());
        }
        let spb = u64::from(self.geo.block_size / 512);
        if Self::uses_extents(inode) {
            return self.free_extent_range(inode, from, u64::MAX);
        }
        let apb = u64::from(self.geo.block_size / 4);
        let mut freed_blocks = 0u64;
        // Direct blocks.
        for slot in 0..12u64 {
            if slot >= from {
                let p = u64::from(get32(inode.i_block(), slot as usize * 4).unwrap_or(0));
                if p != 0 {
                    self.check_block(p, "block pointer", 0)?;
                    self.free_blocks(p, 1)?;
                    freed_blocks += 1;
                    put32(inode.i_block_mut(), slot as usize * 4, 0);
                }
            }
        }
        let mut base = 12u64;
        for (slot, level) in [(12usize, 1u32), (13, 2), (14, 3)] {
            let span = apb.pow(level);
            let p = u64::from(get32(inode.i_block(), slot * 4).unwrap_or(0));
            if p != 0 && from < base + span {
                self.check_block(p, "indirect pointer", 0)?;
                let (empty, n) = self.free_ind_subtree(p, level, base, from, inode.ino, 0)?;
                freed_blocks += n;
                if empty {
                    self.free_blocks(p, 1)?;
                    freed_blocks += 1;
                    put32(inode.i_block_mut(), slot * 4, 0);
                }
            }
            base += span;
        }
        self.add_i_blocks(inode, -((freed_blocks * spb) as i64))?;
        Ok(())
    }

    /// Free the part of the subtree at `blk` (covering logical blocks from
    /// `base`) at or beyond `from`. Returns (subtree now empty, blocks freed).
    fn free_ind_subtree(
        &mut self,
        blk: u64,
        level: u32,
        base: u64,
        from: u64,
        ino: u32,
        depth: u32,
    ) -> Result<(bool, u64)> {
        if depth > 3 {
            return Err(Error::corrupted("indirect tree too deep", blk));
        }
        let apb = u64::from(self.geo.block_size / 4);
        let child_span = apb.pow(level - 1);
        let mut freed = 0;
        let mut any_left = false;
        for i in 0..apb {
            let p = self.ind_ptr(blk, i as usize, ino)?;
            if p == 0 {
                continue;
            }
            let cbase = base + i * child_span;
            if cbase + child_span <= from {
                any_left = true;
                continue;
            }
            let remove = if level == 1 {
                true
            } else {
                let (empty, n) =
                    self.free_ind_subtree(p, level - 1, cbase, from, ino, depth + 1)?;
                freed += n;
                empty
            };
            if remove {
                self.free_blocks(p, 1)?;
                freed += 1;
                let b = self.cache.modify(blk)?;
                put32(b, i as usize * 4, 0);
            } else {
                any_left = true;
            }
        }
        Ok((!any_left, freed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(l: u32, n: u32, p: u64, u: bool) -> Extent {
        Extent {
            lblk: l,
            len: n,
            pblk: p,
            unwritten: u,
        }
    }

    #[test]
    fn insert_merges_neighbours() {
        let mut v = vec![e(0, 4, 100, false), e(8, 4, 108, false)];
        insert_extent(&mut v, e(4, 4, 104, false));
        assert_eq!(v, vec![e(0, 12, 100, false)]);
        insert_extent(&mut v, e(12, 1, 500, false));
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn remove_range_splits() {
        let mut v = vec![e(0, 10, 100, false)];
        let freed = remove_range(&mut v, 3, 5);
        assert_eq!(freed, vec![(103, 2)]);
        assert_eq!(v, vec![e(0, 3, 100, false), e(5, 5, 105, false)]);
    }

    #[test]
    fn mark_written_converts_middle() {
        let mut v = vec![e(0, 10, 100, true)];
        let c = mark_written(&mut v, 2, 4);
        assert_eq!(c, vec![(2, 2)]);
        assert_eq!(
            v,
            vec![e(0, 2, 100, true), e(2, 2, 102, false), e(4, 6, 104, true)]
        );
        mark_written(&mut v, 0, 10);
        assert_eq!(v, vec![e(0, 10, 100, false)]);
    }
}

/// One run of a file's block map, for FIEMAP-style reporting and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRun {
    pub lblk: u64,
    pub pblk: u64,
    pub len: u64,
    pub unwritten: bool,
    /// Delayed allocation: no device block yet (`pblk` is 0).
    pub delalloc: bool,
}

impl Core {
    /// The mapped runs of inode `ino` on the device, in logical order.
    /// Dirty cached data is written back first (FIEMAP_FLAG_SYNC), so
    /// the answer shows where the data really lives.
    pub fn block_runs(&mut self, ino: u32) -> Result<Vec<BlockRun>> {
        self.writeback_range(ino, 0, u64::MAX)?;
        self.block_runs_nosync(ino)
    }

    /// FIEMAP: like [`Self::block_runs`] but, with `sync` false, without
    /// writing back: delayed allocations appear as runs flagged
    /// `delalloc`, as ext4 reports them.
    pub fn fiemap(&mut self, ino: u32, sync: bool) -> Result<Vec<BlockRun>> {
        if sync {
            return self.block_runs(ino);
        }
        let mut runs = self.block_runs_nosync(ino)?;
        if let Some(obj) = self.inodes.get(ino) {
            for (&s, &l) in &obj.data().delalloc.runs {
                runs.push(BlockRun {
                    lblk: s,
                    pblk: 0,
                    len: l,
                    unwritten: false,
                    delalloc: true,
                });
            }
            runs.sort_by_key(|r| r.lblk);
        }
        Ok(runs)
    }

    pub(crate) fn block_runs_nosync(&mut self, ino: u32) -> Result<Vec<BlockRun>> {
        let inode = self.read_inode(ino)?;
        if Self::is_inline(&inode) {
            // Its data is in the inode: no blocks on the device.
            return Ok(Vec::new());
        }
        let bs = u64::from(self.geo.block_size);
        let end = inode.size().div_ceil(bs);
        if Self::uses_extents(&inode) {
            return self.with_ext(&inode, |m| {
                m.iter()
                    .map(|e| BlockRun {
                        lblk: u64::from(e.lblk),
                        pblk: e.pblk,
                        len: u64::from(e.len),
                        unwritten: e.unwritten,
                        delalloc: false,
                    })
                    .collect()
            });
        }
        let mut out = Vec::new();
        let mut l = 0;
        while l < end {
            let (m, n) = self.map_block(&inode, l, end - l)?;
            if let Mapping::Mapped { pblk, unwritten } = m {
                out.push(BlockRun {
                    lblk: l,
                    pblk,
                    len: n,
                    unwritten,
                    delalloc: false,
                });
            }
            l += n;
        }
        Ok(out)
    }

    /// Blocks holding inode `ino`'s mapping metadata (extent tree nodes or
    /// indirect blocks).
    pub fn mapping_blocks(&mut self, ino: u32) -> Result<Vec<u64>> {
        self.writeback_range(ino, 0, u64::MAX)?;
        let inode = self.read_inode(ino)?;
        if Self::uses_extents(&inode) {
            return Ok(self.read_extent_tree(&inode)?.1);
        }
        let mut out = Vec::new();
        for (slot, level) in [(12usize, 1u32), (13, 2), (14, 3)] {
            let p = u64::from(get32(inode.i_block(), slot * 4).unwrap_or(0));
            if p != 0 {
                self.check_block(p, "indirect pointer", 0)?;
                self.collect_ind(p, level, ino, &mut out)?;
            }
        }
        Ok(out)
    }

    fn collect_ind(&mut self, blk: u64, level: u32, ino: u32, out: &mut Vec<u64>) -> Result<()> {
        out.push(blk);
        if level == 1 {
            return Ok(());
        }
        for i in 0..(self.geo.block_size / 4) as usize {
            let p = self.ind_ptr(blk, i, ino)?;
            if p != 0 {
                self.collect_ind(p, level - 1, ino, out)?;
            }
        }
        Ok(())
    }

    /// Depth of an extent-mapped inode's tree (`None` for indirect maps).
    pub fn extent_depth(&mut self, ino: u32) -> Result<Option<u16>> {
        self.writeback_range(ino, 0, u64::MAX)?;
        let inode = self.read_inode(ino)?;
        if !Self::uses_extents(&inode) {
            return Ok(None);
        }
        let (h, _) = parse_node(inode.i_block())
            .map_err(|e| Error::corrupted(format!("inode {ino}: {}", e.describe()), 0))?;
        Ok(Some(h.depth))
    }
}
