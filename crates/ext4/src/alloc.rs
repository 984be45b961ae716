//! Block and inode allocation through the group bitmaps.
//!
//! Invariants kept here: a group's free counts equal the zero bits of its
//! bitmap; the superblock's free counts are the sums over the groups; a
//! bitmap's checksum in its descriptor matches the bitmap; a block freed
//! here is dropped from the metadata cache so no stale copy is written over
//! its next owner.

use crate::error::{Error, Result};
use crate::format::group::{bitmap_csum, BG_BLOCK_UNINIT, BG_INODE_UNINIT};
use crate::fs::{has_super, Core};
use folio_pagecache::lockdep::{Held, Level};

fn bit(b: &[u8], i: usize) -> bool {
    b[i / 8] & (1 << (i % 8)) != 0
}
fn set_bit(b: &mut [u8], i: usize) {
    b[i / 8] |= 1 << (i % 8);
}
fn clear_bit(b: &mut [u8], i: usize) {
    b[i / 8] &= !(1 << (i % 8));
}

/// First zero bit in `b` in `[from, to)`.
fn find_zero(b: &[u8], from: usize, to: usize) -> Option<usize> {
    let mut i = from;
    while i < to {
        if i.is_multiple_of(8) && i + 8 <= to && b[i / 8] == 0xff {
            i += 8;
            continue;
        }
        if !bit(b, i) {
            return Some(i);
        }
        i += 1;
    }
    None
}

impl Core {
    /// Blocks used by the fixed metadata at the start of group `g`
    /// (superblock or its backup, descriptor blocks, reserved descriptor
    /// blocks), as the kernel's `ext4_num_base_meta_clusters` counts them.
    /// With meta_bg, the descriptor blocks of the groups before
    /// `s_first_meta_bg` follow each superblock copy as a classic table,
    /// and each later meta group (the groups one descriptor block
    /// describes) keeps its descriptor block in its first group and copies
    /// in its second and last.
    pub(crate) fn group_sb_gdt_len(&self, g: u32) -> u32 {
        let has = has_super(&self.sb, g);
        let meta = self
            .sb
            .has_incompat(crate::format::superblock::incompat::META_BG);
        let per = self.geo.descs_per_block.max(1);
        let gdt = if !meta {
            if has {
                self.geo.gdt_blocks
            } else {
                0
            }
        } else if g / per < self.sb.first_meta_bg() {
            if has {
                self.sb.first_meta_bg()
            } else {
                0
            }
        } else {
            let i = g % per;
            u32::from(i == 0 || i == 1 || i == per - 1)
        };
        let reserved = if has {
            u32::from(self.sb.reserved_gdt_blocks())
        } else {
            0
        };
        u32::from(has) + gdt + reserved
    }

    /// The block bitmap a BLOCK_UNINIT group implicitly has.
    fn synth_block_bitmap(&self, g: u32) -> Vec<u8> {
        let bs = self.geo.block_size as usize;
        let mut bm = vec![0u8; bs];
        let start = self.group_first_block(g);
        let count = self.group_block_count(g) as usize;
        let n = self.group_sb_gdt_len(g) as usize;
        for i in 0..n.min(count) {
            set_bit(&mut bm, i);
        }
        let itable_blocks = (u64::from(self.geo.inodes_per_group) * u64::from(self.geo.inode_size))
            .div_ceil(u64::from(self.geo.block_size));
        let end = start + count as u64;
        for gd in &self.groups {
            // Only the part of [b, b + len) inside this group.
            let mut mark = |b: u64, len: u64| {
                for x in b.max(start)..b.saturating_add(len).min(end) {
                    set_bit(&mut bm, (x - start) as usize);
                }
            };
            mark(gd.block_bitmap(), 1);
            mark(gd.inode_bitmap(), 1);
            mark(gd.inode_table(), itable_blocks);
        }
        for i in count..bs * 8 {
            set_bit(&mut bm, i);
        }
        bm
    }

    /// Check a bitmap against the checksum its descriptor holds (16 bits
    /// of it in 32-byte descriptors).
    fn verify_bitmap(&self, bits: &[u8], want: u32, kind: &str, g: u32, blk: u64) -> Result<()> {
        let mut got = bitmap_csum(self.csum_seed, bits);
        if self.geo.desc_size < 64 {
            got &= 0xFFFF;
        }
        if got != want {
            return Err(Error::BadChecksum {
                what: format!("{kind} bitmap of group {g}"),
                block: blk,
            });
        }
        Ok(())
    }

    /// The block bitmap of group `g`, verified.
    pub(crate) fn load_block_bitmap(&mut self, g: u32) -> Result<Vec<u8>> {
        if self.block_uninit(g) {
            return Ok(self.synth_block_bitmap(g));
        }
        let blk = self.groups[g as usize].block_bitmap();
        let bm = self.cache.read(blk)?.to_vec();
        if self.has_csum() {
            let n = (self.geo.blocks_per_group / 8) as usize;
            let want = self.groups[g as usize].block_bitmap_csum();
            self.verify_bitmap(&bm[..n], want, "block", g, blk)?;
        }
        Ok(bm)
    }

    fn store_block_bitmap(&mut self, g: u32, bm: &[u8]) -> Result<()> {
        let blk = self.groups[g as usize].block_bitmap();
        self.cache.write(blk, bm)?;
        let n = (self.geo.blocks_per_group / 8) as usize;
        let c = bitmap_csum(self.csum_seed, &bm[..n]);
        let gd = &mut self.groups[g as usize];
        if self.sb.metadata_csum() {
            gd.set_block_bitmap_csum(c);
        }
        gd.set_flags(gd.flags() & !BG_BLOCK_UNINIT);
        self.mark_group_dirty(g);
        Ok(())
    }

    /// The first free block of group `g`, if it has one.
    pub(crate) fn first_free_in_group(&mut self, g: u32) -> Option<u64> {
        let bm = self.load_block_bitmap(g).ok()?;
        let count = self.group_block_count(g) as usize;
        let first = find_zero(&bm, 0, count)?;
        Some(self.group_first_block(g) + first as u64)
    }

    /// Set the free-blocks count (the superblock's and the shared
    /// accounting's).
    pub(crate) fn set_free_blocks(&mut self, n: u64) {
        self.sb.set_free_blocks_count(n);
        self.inodes.space.set_free(n);
    }

    /// Allocate up to `want` contiguous blocks, at or after `goal` if
    /// possible. Returns (first block, count ≥ 1).
    pub(crate) fn alloc_blocks(&mut self, goal: u64, want: u32) -> Result<(u64, u32)> {
        self.alloc_blocks_at(goal, None, want)
    }

    /// Like [`Self::alloc_blocks`], but if the goal block itself is taken
    /// and there is a `fallback`, search from there instead of taking the
    /// next free block after the goal.
    pub(crate) fn alloc_blocks_at(
        &mut self,
        goal: u64,
        fallback: Option<u64>,
        want: u32,
    ) -> Result<(u64, u32)> {
        let _order = Held::take(Level::Allocator, 0);
        self.check_writable()?;
        assert!(want > 0);
        // Blocks reserved for delayed allocations are spoken for: only
        // their own writeback may take them.
        // Anything else claims its blocks first, so that a reservation
        // made meanwhile without the core lock cannot take them too.
        let claimed = if self.alloc_from_reserve {
            0
        } else {
            match self.inodes.space.reserve_upto(u64::from(want)) {
                0 => return Err(Error::NoSpace),
                k => k,
            }
        };
        let want = if claimed > 0 { claimed as u32 } else { want };
        let mut fallback = fallback;
        let in_fs = |b: u64| b >= self.geo.first_data_block && b < self.geo.blocks_count;
        let start = match (in_fs(goal), fallback.take()) {
            (true, f) => {
                fallback = f;
                goal
            }
            (false, Some(f)) if in_fs(f) => f,
            (false, _) => self.geo.first_data_block,
        };
        let r = self.alloc_from(start, &mut fallback, want);
        self.inodes.space.unreserve(claimed);
        r
    }

    /// First fit from `goal`. If the goal block itself is taken and there
    /// is a fallback, the search starts again from the fallback instead
    /// (decided on the bitmap the search loads anyway).
    fn alloc_from(
        &mut self,
        goal: u64,
        fallback: &mut Option<u64>,
        want: u32,
    ) -> Result<(u64, u32)> {
        let ng = self.geo.group_count;
        let g0 = self.block_group(goal);
        for i in 0..=ng {
            let g = (g0 + i) % ng;
            if self.groups[g as usize].free_blocks() == 0 {
                continue;
            }
            let mut bm = self.load_block_bitmap(g)?;
            let count = self.group_block_count(g) as usize;
            let gstart = self.group_first_block(g);
            // Blocks freed by the running transaction look used here: they
            // may not be reused before it commits.
            let mut search = bm.clone();
            let mut pinned_here = false;
            for &b in self.pinned.range(gstart..gstart + count as u64) {
                set_bit(&mut search, (b - gstart) as usize);
                pinned_here = true;
            }
            let from = if i == 0 { (goal - gstart) as usize } else { 0 };
            if i != 0 || bit(&search, from) {
                if let Some(f) = fallback.take() {
                    // The goal block itself is taken: look from the
                    // fallback instead of taking the next free block.
                    let f = if self.block_in_fs(f) {
                        f
                    } else {
                        self.geo.first_data_block
                    };
                    return self.alloc_from(f, fallback, want);
                }
            }
            let found =
                find_zero(&search, from, count).or_else(|| find_zero(&search, 0, from.min(count)));
            let Some(first) = found else {
                if pinned_here {
                    continue;
                }
                return Err(Error::corrupted(
                    format!("group {g} claims free blocks but its bitmap is full"),
                    self.groups[g as usize].block_bitmap(),
                ));
            };
            let mut len = 0usize;
            while first + len < count && len < want as usize && !bit(&search, first + len) {
                set_bit(&mut bm, first + len);
                len += 1;
            }
            // The descriptor must have counted at least the free bits the
            // bitmap showed: a hostile image is an error, not a wrap.
            let free = self.groups[g as usize]
                .free_blocks()
                .checked_sub(len as u32)
                .ok_or_else(|| {
                    Error::corrupted(
                        format!("group {g} counts fewer free blocks than its bitmap shows"),
                        self.groups[g as usize].block_bitmap(),
                    )
                })?;
            self.store_block_bitmap(g, &bm)?;
            let gd = &mut self.groups[g as usize];
            gd.set_free_blocks(free);
            self.mark_group_dirty(g);
            let f = self.sb.free_blocks_count();
            self.set_free_blocks(f.saturating_sub(len as u64));
            return Ok((self.group_first_block(g) + first as u64, len as u32));
        }
        Err(Error::NoSpace)
    }

    /// `[start, start + count)` (checked to lie in the filesystem, as
    /// `what`) cut at group boundaries: (group, its first block, chunk
    /// start, chunk end).
    fn group_chunks(
        &self,
        start: u64,
        count: u64,
        what: &str,
    ) -> Result<Vec<(u32, u64, u64, u64)>> {
        self.check_block(start, what, 0)?;
        self.check_block(start + count - 1, what, 0)?;
        let mut out = Vec::new();
        let mut b = start;
        let end = start + count;
        while b < end {
            let g = self.block_group(b);
            let gstart = self.group_first_block(g);
            let chunk_end = end.min(gstart + u64::from(self.group_block_count(g)));
            out.push((g, gstart, b, chunk_end));
            b = chunk_end;
        }
        Ok(out)
    }

    /// Free `count` blocks from `start`. Freeing a free block is reported as
    /// corruption and changes nothing in that group.
    pub(crate) fn free_blocks(&mut self, start: u64, count: u64) -> Result<()> {
        let _order = Held::take(Level::Allocator, 0);
        self.check_writable()?;
        if count == 0 {
            return Ok(());
        }
        for (g, gstart, b, chunk_end) in self.group_chunks(start, count, "freed extent")? {
            let mut bm = self.load_block_bitmap(g)?;
            for x in b..chunk_end {
                if !bit(&bm, (x - gstart) as usize) {
                    return Err(Error::corrupted(
                        format!("block {x} is freed but already free"),
                        x,
                    ));
                }
            }
            for x in b..chunk_end {
                clear_bit(&mut bm, (x - gstart) as usize);
                self.cache.forget(x);
                if let Some(j) = self.journal.as_ref() {
                    // Until this transaction commits, the committed state
                    // still uses the block: no reuse, and a checkpoint
                    // still writes its committed copy home (from the log).
                    self.pinned.insert(x);
                    self.inodes.space.set_pinned(self.pinned.len() as u64);
                    if j.is_logged(x) {
                        self.revokes.push(x);
                    }
                }
            }
            let n = chunk_end - b;
            let free = u64::from(self.groups[g as usize].free_blocks()) + n;
            if free > u64::from(self.group_block_count(g)) {
                return Err(Error::corrupted(
                    format!("group {g} would count more free blocks than it has"),
                    self.groups[g as usize].block_bitmap(),
                ));
            }
            self.store_block_bitmap(g, &bm)?;
            let gd = &mut self.groups[g as usize];
            gd.set_free_blocks(free as u32);
            self.mark_group_dirty(g);
            let f = self.sb.free_blocks_count();
            self.set_free_blocks(f + n);
        }
        Ok(())
    }

    /// Set blocks `[start, start + count)` in use or free in the bitmaps,
    /// whatever they were, keeping the counts (for replays that name
    /// blocks: fast commits). Returns the runs whose state changed.
    pub(crate) fn set_block_range(
        &mut self,
        start: u64,
        count: u64,
        used: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let _order = Held::take(Level::Allocator, 0);
        self.check_writable()?;
        let mut changed = Vec::new();
        if count == 0 {
            return Ok(changed);
        }
        for (g, gstart, b, chunk_end) in self.group_chunks(start, count, "replayed extent")? {
            let mut bm = self.load_block_bitmap(g)?;
            let mut n = 0u64;
            let mut run: Option<(u64, u64)> = None;
            for x in b..chunk_end {
                let i = (x - gstart) as usize;
                if bit(&bm, i) == used {
                    continue;
                }
                if used {
                    set_bit(&mut bm, i);
                } else {
                    clear_bit(&mut bm, i);
                    self.cache.forget(x);
                }
                n += 1;
                run = match run {
                    Some((s, l)) if s + l == x => Some((s, l + 1)),
                    Some(r) => {
                        changed.push(r);
                        Some((x, 1))
                    }
                    None => Some((x, 1)),
                };
            }
            changed.extend(run);
            if n > 0 {
                let free = u64::from(self.groups[g as usize].free_blocks());
                let free = if used {
                    free.saturating_sub(n)
                } else {
                    (free + n).min(u64::from(self.group_block_count(g)))
                };
                self.store_block_bitmap(g, &bm)?;
                self.groups[g as usize].set_free_blocks(free as u32);
                self.mark_group_dirty(g);
                let f = self.sb.free_blocks_count();
                self.set_free_blocks(if used { f.saturating_sub(n) } else { f + n });
            }
        }
        Ok(changed)
    }

    // ---- inodes ----

    fn load_inode_bitmap(&mut self, g: u32) -> Result<Vec<u8>> {
        let bs = self.geo.block_size as usize;
        let ipg = self.geo.inodes_per_group as usize;
        if self.has_gdt_csum() && self.groups[g as usize].flags() & BG_INODE_UNINIT != 0 {
            let mut bm = vec![0u8; bs];
            for i in ipg..bs * 8 {
                set_bit(&mut bm, i);
            }
            return Ok(bm);
        }
        let blk = self.groups[g as usize].inode_bitmap();
        let bm = self.cache.read(blk)?.to_vec();
        if self.has_csum() {
            let want = self.groups[g as usize].inode_bitmap_csum();
            self.verify_bitmap(&bm[..ipg / 8], want, "inode", g, blk)?;
        }
        Ok(bm)
    }

    fn store_inode_bitmap(&mut self, g: u32, bm: &[u8]) -> Result<()> {
        let blk = self.groups[g as usize].inode_bitmap();
        self.cache.write(blk, bm)?;
        let ipg = self.geo.inodes_per_group as usize;
        let c = bitmap_csum(self.csum_seed, &bm[..ipg / 8]);
        let gd = &mut self.groups[g as usize];
        if self.sb.metadata_csum() {
            gd.set_inode_bitmap_csum(c);
        }
        gd.set_flags(gd.flags() & !BG_INODE_UNINIT);
        self.mark_group_dirty(g);
        Ok(())
    }

    /// Inode `idx` of group `g` was just marked in use: the group now
    /// counts `free` free inodes, one more directory if `is_dir`, and its
    /// used part of the inode table reaches the inode.
    fn inode_taken(&mut self, g: u32, idx: usize, is_dir: bool, free: u32) {
        let ipg = self.geo.inodes_per_group;
        let gdt_csum = self.has_gdt_csum();
        let gd = &mut self.groups[g as usize];
        gd.set_free_inodes(free);
        if is_dir {
            gd.set_used_dirs(gd.used_dirs() + 1);
        }
        if gdt_csum {
            let unused_from = ipg.saturating_sub(gd.itable_unused());
            if idx as u32 >= unused_from {
                gd.set_itable_unused(ipg - idx as u32 - 1);
            }
        }
        self.mark_group_dirty(g);
        let f = self.sb.free_inodes_count();
        self.sb.set_free_inodes_count(f.saturating_sub(1));
    }

    /// Allocate an inode: files near their parent, directories spread to
    /// the group with the most free inodes among those with free blocks.
    pub(crate) fn alloc_inode(&mut self, parent: u32, is_dir: bool) -> Result<u32> {
        let _order = Held::take(Level::Allocator, 0);
        self.check_writable()?;
        let ng = self.geo.group_count;
        let ipg = self.geo.inodes_per_group;
        let parent_group = (parent.max(1) - 1) / ipg;
        let start = if is_dir && self.dir_spread {
            let avg_free = self.sb.free_inodes_count() / ng.max(1);
            (0..ng)
                .filter(|&g| self.groups[g as usize].free_inodes() >= avg_free.max(1))
                .max_by_key(|&g| (self.groups[g as usize].free_blocks(), std::cmp::Reverse(g)))
                .unwrap_or(parent_group)
        } else {
            parent_group
        };
        for i in 0..ng {
            let g = (start + i) % ng;
            if self.groups[g as usize].free_inodes() == 0 {
                continue;
            }
            let mut bm = self.load_inode_bitmap(g)?;
            let from = if g == 0 {
                (self.geo.first_ino - 1) as usize
            } else {
                0
            };
            let Some(idx) = find_zero(&bm, from, ipg as usize) else {
                return Err(Error::corrupted(
                    format!("group {g} claims free inodes but its bitmap is full"),
                    self.groups[g as usize].inode_bitmap(),
                ));
            };
            set_bit(&mut bm, idx);
            let free = self.groups[g as usize]
                .free_inodes()
                .checked_sub(1)
                .ok_or_else(|| {
                    Error::corrupted(
                        format!("group {g} counts no free inodes but its bitmap shows one"),
                        self.groups[g as usize].inode_bitmap(),
                    )
                })?;
            self.store_inode_bitmap(g, &bm)?;
            self.inode_taken(g, idx, is_dir, free);
            return Ok(g * ipg + idx as u32 + 1);
        }
        Err(Error::NoSpace)
    }

    /// Mark inode `ino` in use or free in its bitmap, whatever it was,
    /// keeping the counts (for fast-commit replay). A directory counts
    /// in `bg_used_dirs`.
    pub(crate) fn set_inode_used(&mut self, ino: u32, used: bool, is_dir: bool) -> Result<()> {
        if ino == 0 || ino > self.geo.inodes_count {
            return Err(Error::corrupted(format!("inode {ino} out of range"), 0));
        }
        let _order = Held::take(Level::Allocator, 0);
        self.check_writable()?;
        let ipg = self.geo.inodes_per_group;
        let g = (ino - 1) / ipg;
        let idx = ((ino - 1) % ipg) as usize;
        let mut bm = self.load_inode_bitmap(g)?;
        if bit(&bm, idx) == used {
            return Ok(());
        }
        if used {
            set_bit(&mut bm, idx);
        } else {
            clear_bit(&mut bm, idx);
        }
        self.store_inode_bitmap(g, &bm)?;
        let free = self.groups[g as usize].free_inodes();
        if used {
            self.inode_taken(g, idx, is_dir, free.saturating_sub(1));
            return Ok(());
        }
        self.inode_given_back(g, is_dir, (free + 1).min(ipg));
        Ok(())
    }

    pub(crate) fn free_inode(&mut self, ino: u32, is_dir: bool) -> Result<()> {
        let _order = Held::take(Level::Allocator, 0);
        self.check_writable()?;
        let ipg = self.geo.inodes_per_group;
        let g = (ino - 1) / ipg;
        let idx = ((ino - 1) % ipg) as usize;
        let mut bm = self.load_inode_bitmap(g)?;
        if !bit(&bm, idx) {
            return Err(Error::corrupted(
                format!("inode {ino} is freed but already free"),
                0,
            ));
        }
        clear_bit(&mut bm, idx);
        let free = self.groups[g as usize].free_inodes() + 1;
        if free > ipg {
            return Err(Error::corrupted(
                format!("group {g} would count more free inodes than it has"),
                self.groups[g as usize].inode_bitmap(),
            ));
        }
        self.store_inode_bitmap(g, &bm)?;
        self.inode_given_back(g, is_dir, free);
        Ok(())
    }

    /// An inode of group `g` was just marked free: the group counts
    /// `free` free inodes, one directory fewer if `is_dir`.
    fn inode_given_back(&mut self, g: u32, is_dir: bool, free: u32) {
        let gd = &mut self.groups[g as usize];
        gd.set_free_inodes(free);
        if is_dir {
            gd.set_used_dirs(gd.used_dirs().saturating_sub(1));
        }
        self.mark_group_dirty(g);
        let f = self.sb.free_inodes_count();
        self.sb.set_free_inodes_count(f + 1);
    }

    /// Count free blocks and inodes from the bitmaps and compare them with
    /// the descriptors and superblock. Returns a list of mismatches.
    pub fn check_counts(&mut self, progress: Option<&crate::Progress>) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let (mut fb, mut fi) = (0u64, 0u64);
        for g in 0..self.geo.group_count {
            if let Some(p) = progress {
                p.report(u64::from(g), u64::from(self.geo.group_count));
            }
            let bm = self.load_block_bitmap(g)?;
            let n = self.group_block_count(g) as usize;
            let free = (0..n).filter(|&i| !bit(&bm, i)).count() as u64;
            if free != u64::from(self.groups[g as usize].free_blocks()) {
                problems.push(format!(
                    "group {g}: {free} free blocks in bitmap, descriptor says {}",
                    self.groups[g as usize].free_blocks()
                ));
            }
            fb += free;
            let ib = self.load_inode_bitmap(g)?;
            let ipg = self.geo.inodes_per_group as usize;
            let ifree = (0..ipg).filter(|&i| !bit(&ib, i)).count() as u64;
            if ifree != u64::from(self.groups[g as usize].free_inodes()) {
                problems.push(format!(
                    "group {g}: {ifree} free inodes in bitmap, descriptor says {}",
                    self.groups[g as usize].free_inodes()
                ));
            }
            fi += ifree;
        }
        if fb != self.sb.free_blocks_count() {
            problems.push(format!(
                "superblock: {} free blocks, bitmaps say {fb}",
                self.sb.free_blocks_count()
            ));
        }
        if fi != u64::from(self.sb.free_inodes_count()) {
            problems.push(format!(
                "superblock: {} free inodes, bitmaps say {fi}",
                self.sb.free_inodes_count()
            ));
        }
        Ok(problems)
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Error;
    use crate::fs::{Core, OpenOptions};
    use crate::mkfs::{mkfs, FsType, MkfsOptions};
    use folio_blockdev::MemDevice;
    use std::sync::Arc;

    fn ext2() -> Core {
        let size = 8usize << 20;
        let dev = MemDevice::new(size);
        let opts = MkfsOptions {
            fs_type: FsType::Ext2,
            ..Default::default()
        };
        mkfs(Arc::new(dev.clone()), size as u64, &opts).unwrap();
        Core::open(Arc::new(dev), OpenOptions::default()).unwrap()
    }

    /// A descriptor counting fewer free blocks or inodes than its bitmap
    /// shows (a hostile image; ext2 has no checksum to stop it) is an
    /// error naming the group, never a wrapped count written back.
    #[test]
    fn descriptor_counts_below_the_bitmap_are_errors() {
        let mut fs = ext2();
        let g0 = fs.group_first_block(0);
        fs.groups[0].set_free_blocks(1);
        let e = fs.alloc_blocks(g0, 8).unwrap_err();
        assert!(
            matches!(e, Error::Corrupted { .. }) && e.to_string().contains("group 0"),
            "{e}"
        );
        assert_eq!(fs.groups[0].free_blocks(), 1, "nothing changed");
        // Freeing a block the bitmap shows used into a group that already
        // counts every block free.
        let (b, _) = fs.alloc_blocks(g0, 1).unwrap_or((0, 0));
        let count = fs.group_block_count(0);
        fs.groups[0].set_free_blocks(count);
        if b != 0 {
            let e = fs.free_blocks(b, 1).unwrap_err();
            assert!(e.to_string().contains("more free blocks"), "{e}");
        }
        fs.closed = true;
    }
}
