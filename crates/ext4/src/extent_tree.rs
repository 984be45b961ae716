//! Extent trees edited in place, as ext4's `extents.c` edits them.
//!
//! Two structures describe an extent-mapped file:
//!
//! - the **on-disk tree**: the root in `i_block` (up to 4 entries), index
//!   blocks and leaf blocks. An edit descends from the root to the one leaf
//!   that covers the logical block (`Core::ext_path`), changes that
//!   leaf, and touches the blocks above it only when the leaf's first key
//!   changes (the parent keys follow, as `ext4_ext_correct_indexes`), when
//!   it overflows (it splits, and the split may climb to the root, which
//!   then grows a level, as `ext4_ext_grow_indepth`) or when it empties
//!   (it is freed and its index entry removed). A root with one child
//!   whose entries fit in the inode pulls them up again.
//! - the **extent map** ([`ExtentMap`]): an in-memory mirror of every
//!   extent of the file, extent for extent, loaded by one validated walk of
//!   the tree and then kept in step with every edit by diffing the edited
//!   leaf. Lookups (`map_block`, goals, SEEK, FIEMAP) use it and never read
//!   the tree. It is the role of the kernel's extent status tree.
//!
//! Invariants (checked by e2fsck on every image the tests leave): every
//! index entry's key is the first logical block of its child; keys and
//! extents are sorted and do not overlap; no node below the root is empty;
//! a node never holds more than its `eh_max`.
//!
//! Costs: one edit reads and writes the blocks on one root-to-leaf path
//! and at most one new block per level; the credits it needs are bounded
//! by the depth of the tree (`Core::ext_change_credits`). Tree
//! blocks are validated (header, checksum, entry order, block ranges) once
//! per read from the device, as the buffer cache's verified bit records.

use std::collections::BTreeMap;

use crate::bmap::{insert_extent, mark_written, remove_range};
use crate::error::{Error, Result};
use crate::format::extent::{
    block_capacity, block_csum, parse_node, tail_offset, write_node, Extent, Header, Index, Node,
    MAX_DEPTH,
};
use crate::format::inode::Inode;
use crate::format::{get16, get32, put32};
use crate::fs::Core;

/// Entries in the root node inside the inode.
pub(crate) const ROOT_MAX: u16 = 4;
/// Most tree blocks a file may have (a bound on hostile trees).
const TREE_BLOCKS_MAX: usize = 1 << 20;

/// Every extent of one file, by first logical block: a mirror of the
/// leaves of its tree.
#[derive(Debug, Default, Clone)]
pub(crate) struct ExtentMap {
    map: BTreeMap<u32, Extent>,
    /// Blocks mapped by all extents.
    blocks: u64,
    /// Where a large file's blocks go (`Core::goal_for`): chosen at its
    /// first allocation, or, for a map read from disk, taken from its
    /// long extents.
    pub(crate) line: Option<Line>,
}

/// A large file's placement: logical block `lblk` of a piece starting at
/// logical block `first` goes to `pblk + (lblk - first)`. One piece is a
/// straight line; a file larger than any free run of the filesystem is
/// laid over several, in logical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// (first logical block, its physical block), by first; the first
    /// piece starts at 0.
    pieces: Vec<(u64, u64)>,
}

/// An extent at least this long, read from disk, marks a piece of a
/// line (shorter ones are blocks displaced from it).
const PIECE_MIN_BLOCKS: u32 = 2048;

impl Line {
    pub(crate) fn straight(pblk_of_0: u64) -> Line {
        Line {
            pieces: vec![(0, pblk_of_0)],
        }
    }

    /// Pieces in logical order; the first is moved to start at 0.
    pub(crate) fn from_pieces(mut pieces: Vec<(u64, u64)>) -> Option<Line> {
        pieces.sort_unstable();
        let first = pieces.first_mut()?;
        first.1 = first.1.saturating_sub(first.0);
        first.0 = 0;
        Some(Line { pieces })
    }

    /// Where logical block 0 lies on the first piece.
    pub(crate) fn start(&self) -> u64 {
        self.pieces[0].1
    }

    /// Where `lblk` goes.
    pub(crate) fn at(&self, lblk: u64) -> u64 {
        let i = self.pieces.partition_point(|&(first, _)| first <= lblk);
        let (first, pblk) = self.pieces[i.saturating_sub(1)];
        pblk.saturating_add(lblk - first.min(lblk))
    }

    /// The line a map read from disk implies: each run of long extents
    /// at one offset (pblk − lblk) is a piece; without long extents, the
    /// longest extent's offset is the line.
    fn of_extents<'a>(list: impl Iterator<Item = &'a Extent> + Clone) -> Option<Line> {
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut offset = None;
        for e in list.clone().filter(|e| e.len >= PIECE_MIN_BLOCKS) {
            let o = e.pblk.wrapping_sub(u64::from(e.lblk));
            if offset != Some(o) {
                pieces.push((u64::from(e.lblk), e.pblk));
                offset = Some(o);
            }
        }
        if pieces.is_empty() {
            let e = list.max_by_key(|e| e.len)?;
            return Some(Line::straight(e.pblk.saturating_sub(u64::from(e.lblk))));
        }
        Line::from_pieces(pieces)
    }
}

impl ExtentMap {
    pub(crate) fn from_sorted(list: Vec<Extent>) -> Self {
        let blocks = list.iter().map(|e| u64::from(e.len)).sum();
        let line = Line::of_extents(list.iter());
        ExtentMap {
            map: list.into_iter().map(|e| (e.lblk, e)).collect(),
            blocks,
            line,
        }
    }

    /// Blocks mapped by all extents.
    pub(crate) fn mapped_blocks(&self) -> u64 {
        self.blocks
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Extent> {
        self.map.values()
    }

    /// The last extent starting at or before `lblk` (it may end before).
    pub(crate) fn at_or_before(&self, lblk: u64) -> Option<&Extent> {
        let key = u32::try_from(lblk).unwrap_or(u32::MAX);
        self.map.range(..=key).next_back().map(|(_, e)| e)
    }

    /// The first extent starting after `lblk`.
    pub(crate) fn after(&self, lblk: u64) -> Option<&Extent> {
        let key = u32::try_from(lblk).ok()?.checked_add(1)?;
        self.map.range(key..).next().map(|(_, e)| e)
    }

    /// The extent containing `lblk`, if any.
    pub(crate) fn containing(&self, lblk: u64) -> Option<&Extent> {
        self.at_or_before(lblk).filter(|e| e.end() > lblk)
    }

    /// Extents overlapping `[from, to)`, in order.
    pub(crate) fn overlapping(&self, from: u64, to: u64) -> impl Iterator<Item = &Extent> {
        let first = self.containing(from).map(|e| e.lblk);
        let lo = first.unwrap_or_else(|| u32::try_from(from).unwrap_or(u32::MAX));
        let hi = u32::try_from(to).unwrap_or(u32::MAX);
        let empty = from >= to || u64::from(lo) >= to;
        self.map
            .range(lo..=hi)
            .map(|(_, e)| e)
            .filter(move |e| !empty && u64::from(e.lblk) < to && e.end() > from)
    }

    /// Replace the extents of `old` (a leaf before an edit) by `new` (the
    /// same leaf after it). Both are sorted; only differences touch the map.
    fn apply_diff(&mut self, old: &[Extent], new: &[Extent]) {
        let sum = |l: &[Extent]| l.iter().map(|e| u64::from(e.len)).sum::<u64>();
        self.blocks = self.blocks + sum(new) - sum(old);
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a.lblk == b.lblk => {
                    self.map.insert(b.lblk, *b);
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a.lblk < b.lblk => {
                    self.map.remove(&a.lblk);
                    i += 1;
                }
                (_, Some(b)) => {
                    self.map.insert(b.lblk, *b);
                    j += 1;
                }
                (Some(a), None) => {
                    self.map.remove(&a.lblk);
                    i += 1;
                }
                (None, None) => break,
            }
        }
    }
}

/// One index level on the path from the root to a leaf.
struct IdxLevel {
    /// The tree block (0: the root in the inode).
    blk: u64,
    /// eh_max of the node.
    max: u16,
    entries: Vec<Index>,
    /// The entry the path follows.
    pos: usize,
    dirty: bool,
}

/// A root-to-leaf path. `levels[0]` is the root when the tree has index
/// levels; a tree of depth 0 has none and its leaf is the root.
struct Path {
    levels: Vec<IdxLevel>,
    /// The leaf block (0: the root in the inode).
    leaf_blk: u64,
    leaf_max: u16,
    leaf: Vec<Extent>,
}

impl Path {
    /// First key of the leaf after this one, if there is one.
    fn next_key(&self) -> Option<u64> {
        self.levels
            .iter()
            .rev()
            .find_map(|l| l.entries.get(l.pos + 1).map(|ix| u64::from(ix.lblk)))
    }
}

/// What an edit does to the extents of a range.
#[derive(Clone, Copy, Debug)]
enum Edit {
    /// Map a hole (the extent must not overlap any other).
    Insert(Extent),
    /// Unmap `[from, to)`.
    Remove,
    /// Mark `[from, to)` written.
    Written,
}

/// Point at which to split an overfull node of `len` entries: in half,
/// or, when it grew at the right end of the tree (an appending file),
/// leaving the old node full so the tree stays dense.
fn split_point(len: usize, max: usize, appending: bool) -> usize {
    if appending {
        max
    } else {
        len / 2
    }
}

impl Core {
    fn tree_cap(&self) -> u16 {
        block_capacity(self.geo.block_size as usize)
    }

    /// Blocks of `inode`'s extent tree below the root: what i_blocks
    /// counts beyond the mapped data and the xattr block.
    pub(crate) fn ext_tree_blocks(&mut self, inode: &Inode) -> Result<u64> {
        let huge = self
            .sb
            .has_ro_compat(crate::format::superblock::ro_compat::HUGE_FILE);
        let spb = u64::from(self.geo.block_size / 512);
        let total = inode.blocks_512(huge, self.geo.block_size) / spb;
        let data = self.with_ext(inode, |m| m.mapped_blocks())?;
        Ok(total.saturating_sub(data))
    }

    /// Credits for one extent change (insert, split, conversion or
    /// removal within one leaf): the path from the root to the leaf, a
    /// new block per level if splits climb to the root, a new root level,
    /// and the inode.
    pub(crate) fn ext_change_credits(inode: &Inode) -> usize {
        let depth = usize::from(get16(inode.i_block(), 6).unwrap_or(0)).min(5);
        2 * depth + 3
    }

    /// Read tree block `blk` expected at `depth`, validating it the first
    /// time it is seen since it came from the device.
    fn read_tree_block(&mut self, inode: &Inode, blk: u64, depth: u16) -> Result<(Header, Node)> {
        let ino = inode.ino;
        if !self.block_in_fs(blk) {
            return Err(Error::corrupted(
                format!("inode {ino}: extent index points to block {blk}, outside the filesystem"),
                blk,
            ));
        }
        let csum = self.has_csum();
        let seed = inode.csum_seed(self.csum_seed);
        let bs = self.geo.block_size as usize;
        let (data, verified) = self.cache.read_verified(blk)?;
        let (h, node) = parse_node(data)
            .map_err(|e| Error::corrupted(format!("inode {ino}: {}", e.describe()), blk))?;
        if !verified && csum {
            let t = tail_offset(h.max);
            let good = t + 4 <= bs && block_csum(seed, data, h.max) == get32(data, t);
            if !good {
                return Err(Error::BadChecksum {
                    what: format!("extent block of inode {ino}"),
                    block: blk,
                });
            }
        }
        if h.depth != depth {
            return Err(Error::corrupted(
                format!(
                    "inode {ino}: extent block at depth {} where {depth} belongs",
                    h.depth
                ),
                blk,
            ));
        }
        if !verified {
            self.check_node(ino, &node, blk)?;
            self.cache.set_verified(blk);
        }
        Ok((h, node))
    }

    /// Entries in order, blocks inside the filesystem.
    fn check_node(&self, ino: u32, node: &Node, blk: u64) -> Result<()> {
        match node {
            Node::Leaf(list) => {
                for e in list {
                    let end = e.pblk.checked_add(u64::from(e.len));
                    if !self.block_in_fs(e.pblk)
                        || end.is_none_or(|end| end > self.geo.blocks_count)
                    {
                        return Err(Error::corrupted(
                            format!(
                                "inode {ino}: extent at {} maps blocks outside the filesystem",
                                e.lblk
                            ),
                            blk,
                        ));
                    }
                }
                if list.windows(2).any(|w| w[0].end() > u64::from(w[1].lblk)) {
                    return Err(Error::corrupted(
                        format!("inode {ino}: extents overlap or are unsorted"),
                        blk,
                    ));
                }
            }
            Node::Index { entries, .. } => {
                if entries.windows(2).any(|w| w[0].lblk >= w[1].lblk) {
                    return Err(Error::corrupted(
                        format!("inode {ino}: extent index entries are unsorted"),
                        blk,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The root node of an extent-mapped inode.
    fn ext_root(inode: &Inode) -> Result<(Header, Node)> {
        let ino = inode.ino;
        let (h, node) = parse_node(inode.i_block())
            .map_err(|e| Error::corrupted(format!("inode {ino}: {}", e.describe()), 0))?;
        if h.max > ROOT_MAX {
            return Err(Error::corrupted(
                format!("inode {ino}: bad extent root eh_max"),
                0,
            ));
        }
        Ok((h, node))
    }

    /// Every extent of `inode` and every tree block, by a validated walk
    /// of the whole tree.
    pub(crate) fn read_extent_tree(&mut self, inode: &Inode) -> Result<(Vec<Extent>, Vec<u64>)> {
        let ino = inode.ino;
        let (h, root) = Self::ext_root(inode)?;
        self.check_node(ino, &root, 0)?;
        let mut extents = Vec::new();
        let mut blocks = Vec::new();
        // Depth-first, children in order: (node, depth).
        let mut stack: Vec<(Node, u16)> = vec![(root, h.depth)];
        while let Some((node, depth)) = stack.pop() {
            match node {
                Node::Leaf(list) => {
                    if depth != 0 {
                        return Err(Error::corrupted(
                            format!("inode {ino}: extent leaf at depth {depth}"),
                            0,
                        ));
                    }
                    if let (Some(last), Some(first)) = (extents.last(), list.first()) {
                        let last: &Extent = last;
                        if last.end() > u64::from(first.lblk) {
                            return Err(Error::corrupted(
                                format!("inode {ino}: extents overlap or are unsorted"),
                                0,
                            ));
                        }
                    }
                    extents.extend(list);
                }
                Node::Index { depth: d, entries } => {
                    if d != depth || d == 0 || d > MAX_DEPTH {
                        return Err(Error::corrupted(
                            format!("inode {ino}: extent index at wrong depth"),
                            0,
                        ));
                    }
                    if blocks.len() + entries.len() > TREE_BLOCKS_MAX {
                        return Err(Error::corrupted(
                            format!("inode {ino}: extent tree too large"),
                            0,
                        ));
                    }
                    let mut children = Vec::with_capacity(entries.len());
                    for ix in &entries {
                        blocks.push(ix.child);
                        let (_, child) = self.read_tree_block(inode, ix.child, depth - 1)?;
                        children.push((child, depth - 1));
                    }
                    // Pushed in reverse so the first child is walked first.
                    stack.extend(children.into_iter().rev());
                }
            }
        }
        Ok((extents, blocks))
    }

    /// Run `f` on `inode`'s extent map (in its inode object, under the
    /// inode's data lock), loading the map first if it is not there.
    pub(crate) fn with_ext<R>(
        &mut self,
        inode: &Inode,
        f: impl FnOnce(&mut ExtentMap) -> R,
    ) -> Result<R> {
        let obj = self.inodes.obj(inode.ino);
        if obj.data().extents.is_none() {
            let (list, _) = self.read_extent_tree(inode)?;
            self.inodes.make_room_for_map(inode.ino);
            let mut d = obj.data();
            if d.extents.is_none() {
                self.inodes
                    .install_map(&mut d, ExtentMap::from_sorted(list));
            }
        }
        let mut d = obj.data();
        // Only a freed inode loses its map while someone holds its object.
        let map = d
            .extents
            .as_mut()
            .ok_or_else(|| Error::corrupted(format!("inode {} was freed in use", inode.ino), 0))?;
        Ok(f(map))
    }

    /// Load `inode`'s extent map if it is not loaded.
    pub(crate) fn ext_load(&mut self, inode: &Inode) -> Result<()> {
        self.with_ext(inode, |_| ())
    }

    /// Every extent of the file, copied (for operations that rewrite the
    /// whole map anyway: collapse and insert range).
    pub(crate) fn extent_list(&mut self, inode: &Inode) -> Result<Vec<Extent>> {
        self.with_ext(inode, |m| m.iter().copied().collect())
    }

    /// Descend from the root to the leaf that covers `lblk` (the last one
    /// whose key is at or before it, or the first).
    fn ext_path(&mut self, inode: &Inode, lblk: u64) -> Result<Path> {
        let ino = inode.ino;
        let (h, mut node) = Self::ext_root(inode)?;
        let mut depth = h.depth;
        if depth > MAX_DEPTH {
            return Err(Error::corrupted(
                format!("inode {ino}: extent tree too deep"),
                0,
            ));
        }
        let mut blk = 0u64;
        let mut max = ROOT_MAX;
        let mut levels = Vec::new();
        loop {
            match node {
                Node::Leaf(leaf) => {
                    if depth != 0 {
                        return Err(Error::corrupted(
                            format!("inode {ino}: extent leaf at depth {depth}"),
                            blk,
                        ));
                    }
                    return Ok(Path {
                        levels,
                        leaf_blk: blk,
                        leaf_max: max,
                        leaf,
                    });
                }
                Node::Index { depth: d, entries } => {
                    if d != depth || d == 0 || entries.is_empty() {
                        return Err(Error::corrupted(
                            format!("inode {ino}: empty or misplaced extent index node"),
                            blk,
                        ));
                    }
                    let pos = entries
                        .partition_point(|ix| u64::from(ix.lblk) <= lblk)
                        .saturating_sub(1);
                    let child = entries[pos].child;
                    levels.push(IdxLevel {
                        blk,
                        max,
                        entries,
                        pos,
                        dirty: false,
                    });
                    let (ch, cn) = self.read_tree_block(inode, child, depth - 1)?;
                    node = cn;
                    blk = child;
                    max = ch.max;
                    depth -= 1;
                }
            }
        }
    }

    /// Write a node: into the inode for the root (`blk` 0), else into its
    /// tree block with the checksum tail.
    fn put_node(
        &mut self,
        inode: &mut Inode,
        blk: u64,
        max: u16,
        node: &Node,
        fresh: bool,
    ) -> Result<()> {
        if blk == 0 {
            let mut root = [0u8; 60];
            write_node(&mut root, ROOT_MAX, node);
            inode.i_block_mut().copy_from_slice(&root);
            return Ok(());
        }
        let csum = self.has_csum();
        let seed = inode.csum_seed(self.csum_seed);
        let write = |b: &mut [u8]| {
            write_node(b, max, node);
            if csum {
                let c = block_csum(seed, b, max).expect("the tail fits: eh_max was checked");
                put32(b, tail_offset(max), c);
            }
        };
        if fresh {
            let mut buf = vec![0u8; self.geo.block_size as usize];
            write(&mut buf);
            self.cache.write(blk, &buf)?;
        } else {
            write(self.cache.modify(blk)?);
        }
        Ok(())
    }

    /// Write a new index block `blk` at `depth`, full capacity.
    fn put_new_index(
        &mut self,
        inode: &mut Inode,
        blk: u64,
        depth: u16,
        entries: Vec<Index>,
    ) -> Result<()> {
        let cap = self.tree_cap();
        self.put_node(inode, blk, cap, &Node::Index { depth, entries }, true)
    }

    /// `n` blocks for new tree nodes, all or none.
    fn alloc_tree_blocks(&mut self, inode: &Inode, goal: u64, n: usize) -> Result<Vec<u64>> {
        let mut got: Vec<u64> = Vec::with_capacity(n);
        let mut goal = if goal == 0 {
            self.inode_goal(inode)
        } else {
            goal
        };
        while got.len() < n {
            match self.alloc_blocks(goal, (n - got.len()) as u32) {
                Ok((b, len)) => {
                    got.extend(b..b + u64::from(len));
                    goal = b + u64::from(len);
                }
                Err(e) => {
                    for b in got {
                        self.free_blocks(b, 1)?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// Apply `edit` to `[from, to)` of `inode`, leaf by leaf. Returns the
    /// physical runs unmapped (`Remove`) or the logical runs converted
    /// (`Written`). The caller frees unmapped data blocks and writes the
    /// inode.
    fn ext_edit(
        &mut self,
        inode: &mut Inode,
        from: u64,
        to: u64,
        edit: Edit,
    ) -> Result<Vec<(u64, u64)>> {
        self.ext_load(inode)?;
        self.note_inode_change(inode.ino, true);
        let mut out = Vec::new();
        let mut cur = from;
        // Bounded: each round moves to a later leaf.
        loop {
            let mut path = self.ext_path(inode, cur)?;
            let next = path.next_key();
            let old = path.leaf.clone();
            match edit {
                Edit::Insert(e) => {
                    let pos = path.leaf.partition_point(|x| x.lblk < e.lblk);
                    let clash_before = pos > 0 && path.leaf[pos - 1].end() > u64::from(e.lblk);
                    let clash_after = path
                        .leaf
                        .get(pos)
                        .is_some_and(|x| u64::from(x.lblk) < e.end());
                    if clash_before || clash_after || next.is_some_and(|k| e.end() > k) {
                        return Err(Error::corrupted(
                            format!(
                                "inode {}: new extent at {} overlaps a mapped block",
                                inode.ino, e.lblk
                            ),
                            path.leaf_blk,
                        ));
                    }
                    insert_extent(&mut path.leaf, e);
                }
                Edit::Remove => out.extend(remove_range(&mut path.leaf, from, to)),
                Edit::Written => out.extend(mark_written(&mut path.leaf, from, to)),
            }
            if path.leaf != old {
                let appending =
                    next.is_none() && path.leaf.last().map(|e| e.lblk) > old.last().map(|e| e.lblk);
                if let Some(o) = self.inodes.get(inode.ino) {
                    if let Some(m) = o.data().extents.as_mut() {
                        m.apply_diff(&old, &path.leaf);
                    }
                }
                if let Err(e) = self.ext_store(inode, path, appending) {
                    // The map may now say more than the tree: read it
                    // again next time.
                    self.inodes.drop_map(inode.ino);
                    return Err(e);
                }
            }
            match next {
                Some(k) if k < to && !matches!(edit, Edit::Insert(_)) => cur = k,
                _ => break,
            }
        }
        Ok(out)
    }

    /// Write an edited leaf back into the tree: free it if it emptied,
    /// split it (and its ancestors) if it overflowed, and keep every index
    /// key equal to the first key below it.
    fn ext_store(&mut self, inode: &mut Inode, mut p: Path, appending: bool) -> Result<()> {
        let spb = i64::from(self.geo.block_size / 512);
        let cap = self.tree_cap();
        let depth = p.levels.len();
        let node_max = |lv: &IdxLevel| if lv.blk == 0 { ROOT_MAX } else { lv.max };
        if p.leaf.is_empty() && depth > 0 {
            // The leaf goes, and every ancestor it leaves empty.
            let mut freed = vec![p.leaf_blk];
            let mut k = depth - 1;
            let removed_first;
            loop {
                let lv = &mut p.levels[k];
                lv.entries.remove(lv.pos);
                lv.dirty = true;
                if !lv.entries.is_empty() || k == 0 {
                    removed_first = lv.pos == 0;
                    break;
                }
                freed.push(lv.blk);
                k -= 1;
            }
            p.levels.truncate(k + 1);
            if p.levels[0].entries.is_empty() {
                // The whole tree emptied: the root is an empty leaf again.
                p.levels.clear();
                self.put_node(inode, 0, ROOT_MAX, &Node::Leaf(Vec::new()), false)?;
            } else if removed_first && k > 0 {
                let first = p.levels[k].entries[0].lblk;
                Self::fix_keys(&mut p.levels, k - 1, first);
            }
            self.write_levels(inode, &mut p.levels, depth)?;
            for b in &freed {
                self.free_blocks(*b, 1)?;
            }
            self.add_i_blocks(inode, -(freed.len() as i64) * spb)?;
            return self.ext_shrink_root(inode);
        }
        if depth > 0 {
            if let Some(first) = p.leaf.first().map(|e| e.lblk) {
                Self::fix_keys(&mut p.levels, depth - 1, first);
            }
        }
        let leaf_max = if p.leaf_blk == 0 {
            ROOT_MAX
        } else {
            p.leaf_max
        };
        if p.leaf.len() <= usize::from(leaf_max) {
            let leaf = std::mem::take(&mut p.leaf);
            self.put_node(inode, p.leaf_blk, leaf_max, &Node::Leaf(leaf), false)?;
            self.write_levels(inode, &mut p.levels, depth)?;
            return self.ext_shrink_root(inode);
        }
        // Overflow: count the new blocks the split needs before changing
        // anything, so that running out of space changes nothing.
        let mut need = 1usize;
        if depth > 0 {
            for k in (0..depth).rev() {
                if p.levels[k].entries.len() < usize::from(node_max(&p.levels[k])) {
                    break;
                }
                need += 1;
            }
            if need > depth && depth >= usize::from(MAX_DEPTH) {
                return Err(Error::FileTooBig);
            }
        }
        let goal = if p.leaf_blk != 0 {
            p.leaf_blk
        } else {
            self.tree_goal(inode)
        };
        let fresh = self.alloc_tree_blocks(inode, goal, need)?;
        let mut fresh = fresh.into_iter();
        let mut take = || fresh.next().expect("blocks for the split were counted");
        if depth == 0 {
            // The root leaf moves into a block; the root indexes it.
            let b = take();
            let leaf = std::mem::take(&mut p.leaf);
            let first = leaf[0].lblk;
            self.put_node(inode, b, cap, &Node::Leaf(leaf), true)?;
            let root = Node::Index {
                depth: 1,
                entries: vec![Index {
                    lblk: first,
                    child: b,
                }],
            };
            self.put_node(inode, 0, ROOT_MAX, &root, false)?;
            return self.add_i_blocks(inode, spb);
        }
        let at = split_point(p.leaf.len(), usize::from(leaf_max), appending);
        let right = p.leaf.split_off(at);
        let rb = take();
        let mut carry = Index {
            lblk: right[0].lblk,
            child: rb,
        };
        let leaf = std::mem::take(&mut p.leaf);
        self.put_node(inode, p.leaf_blk, leaf_max, &Node::Leaf(leaf), false)?;
        self.put_node(inode, rb, cap, &Node::Leaf(right), true)?;
        let mut k = depth - 1;
        let mut root_depth = depth as u16;
        loop {
            let lv = &mut p.levels[k];
            let at_end = lv.pos + 1 == lv.entries.len();
            lv.entries.insert(lv.pos + 1, carry);
            lv.dirty = true;
            let max = node_max(lv);
            if lv.entries.len() <= usize::from(max) {
                break;
            }
            let level_depth = (depth - k) as u16;
            if k == 0 {
                // A full root: its entries move into a new block and the
                // tree grows a level.
                let b = take();
                let entries = std::mem::take(&mut lv.entries);
                let first = entries[0].lblk;
                lv.entries = vec![Index {
                    lblk: first,
                    child: b,
                }];
                self.put_new_index(inode, b, level_depth, entries)?;
                root_depth += 1;
                break;
            }
            let at = split_point(lv.entries.len(), usize::from(max), appending && at_end);
            let right = lv.entries.split_off(at);
            let b = take();
            carry = Index {
                lblk: right[0].lblk,
                child: b,
            };
            self.put_new_index(inode, b, level_depth, right)?;
            k -= 1;
        }
        // The root's depth may have grown: write levels with their depth.
        for (k, lv) in p.levels.iter_mut().enumerate() {
            if !lv.dirty {
                continue;
            }
            let d = if k == 0 {
                root_depth
            } else {
                (depth - k) as u16
            };
            let max = node_max(lv);
            let node = Node::Index {
                depth: d,
                entries: std::mem::take(&mut lv.entries),
            };
            self.put_node(inode, lv.blk, max, &node, false)?;
        }
        self.add_i_blocks(inode, need as i64 * spb)
    }

    /// The child at `levels[k].pos` now starts at `first`: update its key,
    /// and the keys above it while it is the first child.
    fn fix_keys(levels: &mut [IdxLevel], k: usize, first: u32) {
        for lv in levels[..=k].iter_mut().rev() {
            if lv.entries[lv.pos].lblk != first {
                lv.entries[lv.pos].lblk = first;
                lv.dirty = true;
            }
            if lv.pos != 0 {
                break;
            }
        }
    }

    /// Write the dirty index levels of a path whose shape did not change
    /// (`depth`: the tree's depth, the root's level).
    fn write_levels(
        &mut self,
        inode: &mut Inode,
        levels: &mut [IdxLevel],
        depth: usize,
    ) -> Result<()> {
        for (k, lv) in levels.iter_mut().enumerate() {
            if !lv.dirty {
                continue;
            }
            let max = if lv.blk == 0 { ROOT_MAX } else { lv.max };
            let node = Node::Index {
                depth: (depth - k) as u16,
                entries: std::mem::take(&mut lv.entries),
            };
            self.put_node(inode, lv.blk, max, &node, false)?;
            lv.dirty = false;
        }
        Ok(())
    }

    /// While the root has a single child whose entries fit in the inode,
    /// pull them up and free the child (the tree loses a level).
    fn ext_shrink_root(&mut self, inode: &mut Inode) -> Result<()> {
        let spb = i64::from(self.geo.block_size / 512);
        for _ in 0..MAX_DEPTH {
            let (h, root) = Self::ext_root(inode)?;
            let Node::Index { entries, .. } = root else {
                return Ok(());
            };
            if entries.len() != 1 || h.depth == 0 {
                return Ok(());
            }
            let child = entries[0].child;
            if !self.block_in_fs(child) {
                return Ok(());
            }
            // The entry count alone decides; most of the time the child is
            // too full and need not be parsed.
            let count = get16(self.cache.read(child)?, 2).unwrap_or(u16::MAX);
            if count > ROOT_MAX {
                return Ok(());
            }
            let (_, node) = self.read_tree_block(inode, child, h.depth - 1)?;
            self.put_node(inode, 0, ROOT_MAX, &node, false)?;
            self.free_blocks(child, 1)?;
            self.add_i_blocks(inode, -spb)?;
        }
        Ok(())
    }

    /// Map the hole at `e.lblk` to `e` (merging with neighbours in its
    /// leaf). The caller accounts the data blocks in i_blocks.
    pub(crate) fn ext_insert(&mut self, inode: &mut Inode, e: Extent) -> Result<()> {
        self.ext_edit(inode, u64::from(e.lblk), e.end(), Edit::Insert(e))
            .map(drop)
    }

    /// Unmap `[from, to)`; returns the physical runs that were mapped
    /// there (the caller frees them and updates i_blocks).
    pub(crate) fn ext_remove(
        &mut self,
        inode: &mut Inode,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        if !self.with_ext(inode, |m| m.overlapping(from, to).next().is_some())? {
            return Ok(Vec::new());
        }
        self.ext_edit(inode, from, to, Edit::Remove)
    }

    /// Mark `[from, to)` written; returns the logical runs that were
    /// unwritten.
    pub(crate) fn ext_mark_written(
        &mut self,
        inode: &mut Inode,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, u64)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        if !self.with_ext(inode, |m| m.overlapping(from, to).any(|e| e.unwritten))? {
            return Ok(Vec::new());
        }
        self.ext_edit(inode, from, to, Edit::Written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_map_each_piece_and_come_back_from_their_extents() {
        let l = Line::from_pieces(vec![(5000, 90_000), (0, 10_000)]).unwrap();
        assert_eq!(l.at(0), 10_000);
        assert_eq!(l.at(4999), 14_999);
        assert_eq!(l.at(5000), 90_000);
        assert_eq!(l.at(7000), 92_000);
        // Read back from disk: long extents at two offsets give the two
        // pieces; a short displaced extent between them does not.
        let list = [
            e(0, 3000, 10_000),
            e(3000, 1, 500),
            e(3001, 1999, 13_001),
            e(5000, 4000, 90_000),
        ];
        assert_eq!(Line::of_extents(list.iter()), Some(l));
        // A straight line: one offset, whatever is displaced.
        let list = [e(10, 4000, 1010), e(4010, 7, 77), e(4017, 2100, 5017)];
        assert_eq!(Line::of_extents(list.iter()), Some(Line::straight(1000)));
        // Short extents only: the longest one's offset.
        let list = [e(0, 5, 100), e(50, 9, 400)];
        assert_eq!(Line::of_extents(list.iter()), Some(Line::straight(350)));
    }

    fn e(l: u32, n: u32, p: u64) -> Extent {
        Extent {
            lblk: l,
            len: n,
            pblk: p,
            unwritten: false,
        }
    }

    #[test]
    fn diff_keeps_the_map_a_mirror() {
        let mut m = ExtentMap::from_sorted(vec![e(0, 1, 10), e(5, 1, 15), e(9, 1, 19)]);
        let old = vec![e(5, 1, 15), e(9, 1, 19)];
        let new = vec![e(4, 2, 14), e(7, 1, 17), e(9, 2, 19)];
        m.apply_diff(&old, &new);
        let got: Vec<Extent> = m.iter().copied().collect();
        assert_eq!(
            got,
            vec![e(0, 1, 10), e(4, 2, 14), e(7, 1, 17), e(9, 2, 19)]
        );
        assert_eq!(m.containing(5), Some(&e(4, 2, 14)));
        assert_eq!(m.containing(6), None);
        assert_eq!(m.after(6), Some(&e(7, 1, 17)));
        let over: Vec<u32> = m.overlapping(5, 10).map(|x| x.lblk).collect();
        assert_eq!(over, vec![4, 7, 9]);
        assert_eq!(m.overlapping(2, 4).count(), 0);
    }

    #[test]
    fn appending_splits_leave_full_nodes() {
        assert_eq!(split_point(341, 340, true), 340);
        assert_eq!(split_point(341, 340, false), 170);
    }
}
