//! ext4 on the jbd2 journal: recovery at open, ordered-mode commits,
//! the needs_recovery flag, the free-block rule and orphan processing.
//!
//! A transaction is every metadata block dirtied since the last commit.
//! The buffer cache runs in no-steal mode, so no metadata reaches its home
//! location before the transaction holding it has committed; committed
//! blocks go home lazily (eviction, or the checkpoint when the log is
//! full). File data is written to the device before the commit's first
//! flush (ordered mode). Every operation runs in a handle with credits;
//! commits happen at `Core::sync`/fsync, before a handle whose
//! credits would not fit, and after one that fills the transaction —
//! never in the middle of an operation, so each operation is atomic.
//!
//! Free-block rule: a block freed by the running transaction is not
//! allocated again until that transaction has committed ([`pinned`]);
//! otherwise new data could land in a block the last committed metadata
//! still points to. When an allocation fails with pinned blocks pending,
//! the operation is retried once after a commit.
//!
//! [`pinned`]: Core::pinned

use std::sync::Arc;

use folio_journal::{Journal, RecoveryReport};

use crate::bmap::Mapping;
use crate::csum::crc32c_raw;
use crate::error::{Error, Result};
use crate::format::inode::{Inode, JOURNAL_INO};
use crate::format::superblock::{
    compat, incompat, ro_compat, Superblock, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE,
};
use crate::format::{get32, put32};
use crate::fs::{Core, OpenOptions};
use folio_pagecache::lockdep::{Held, Level};

/// A share of the running transaction (see `Core::journal_start`).
#[must_use = "a handle must be given back with journal_stop"]
pub(crate) struct Handle {
    credits: usize,
    start: usize,
    /// The lock-order entry (outermost handle only).
    order: Option<Held>,
}

impl From<folio_journal::Error> for Error {
    fn from(e: folio_journal::Error) -> Self {
        match e {
            folio_journal::Error::Io(e) => Error::Io(e),
            folio_journal::Error::Unsupported(s) => {
                Error::UnsupportedFeature(format!("journal: {s}"))
            }
            other => Error::Corrupted {
                what: other.to_string(),
                block: 0,
            },
        }
    }
}

impl Core {
    /// Device blocks of the journal inode, in journal order.
    fn journal_map(&mut self) -> Result<Vec<u64>> {
        let ino = self.sb.journal_inum();
        if ino != JOURNAL_INO && ino == 0 {
            return Err(Error::corrupted("has_journal without a journal inode", 0));
        }
        let inode = self.read_inode(ino)?;
        if !inode.is_reg() {
            return Err(Error::corrupted(
                "the journal inode is not a regular file",
                0,
            ));
        }
        let bs = u64::from(self.geo.block_size);
        let blocks = inode.size() / bs;
        if blocks > self.geo.blocks_count || blocks < 16 {
            return Err(Error::corrupted("journal inode size out of range", 0));
        }
        let mut map = Vec::with_capacity(blocks as usize);
        for r in self.block_runs_nosync(ino)? {
            if r.lblk != map.len() as u64 || r.unwritten {
                return Err(Error::corrupted("the journal inode has holes", 0));
            }
            for k in 0..r.len {
                if map.len() as u64 == blocks {
                    break;
                }
                map.push(r.pblk + k);
            }
        }
        if (map.len() as u64) < blocks {
            return Err(Error::corrupted("the journal inode has holes", 0));
        }
        Ok(map)
    }

    /// Open with journal recovery: if the image needs it and may be
    /// written, replay the journal, clear needs_recovery, process orphans.
    pub(crate) fn open_recovering(
        dev: Arc<dyn folio_blockdev::BlockDevice>,
        opts: OpenOptions,
    ) -> Result<Self> {
        let mmp = Self::take_mmp(&dev, &opts)?;
        match Self::open_recovering_held(dev, opts) {
            Ok(mut fs) => {
                fs.mmp = mmp;
                Ok(fs)
            }
            Err(e) => {
                if let Some(m) = mmp {
                    let _ = m.release(true);
                }
                Err(e)
            }
        }
    }

    fn open_recovering_held(
        dev: Arc<dyn folio_blockdev::BlockDevice>,
        opts: OpenOptions,
    ) -> Result<Self> {
        let writable = !opts.read_only && !dev.is_read_only();
        let fs = match Self::open_once(dev.clone(), opts.clone()) {
            Ok(fs) => fs,
            Err(e @ (Error::BadChecksum { .. } | Error::Corrupted { .. })) if writable => {
                // A crash in the middle of a checkpoint can tear the
                // superblock or a descriptor block; the journal holds good
                // copies. Find it through a backup superblock.
                let report = match Self::rescue_replay(&dev) {
                    Ok(Some(r)) => r,
                    _ => match Self::repair_torn_flag_write(&dev) {
                        Ok(true) => RecoveryReport {
                            stopped_because: "repaired a superblock torn while needs_recovery was being set or cleared".into(),
                            ..Default::default()
                        },
                        _ => return Err(e),
                    },
                };
                let fs = Self::open_once(dev, opts)?;
                return fs.finish_open(Some(report));
            }
            Err(e) => return Err(e),
        };
        let recover =
            fs.sb.has_incompat(incompat::RECOVER) && fs.sb.has_compat(compat::HAS_JOURNAL);
        if !recover || opts.norecovery {
            return fs.finish_open(None);
        }
        if opts.read_only || dev.is_read_only() {
            // Replayed onto a copy-on-write view: the image itself is
            // never written, and what is shown is the recovered state.
            let cow: Arc<dyn folio_blockdev::BlockDevice> =
                Arc::new(folio_blockdev::CowDevice::new(dev.clone()));
            let report = Self::replay(fs, &cow)?;
            let ro = OpenOptions {
                read_only: true,
                ..opts
            };
            let mut fs = Self::open_once(cow, ro)?.finish_open(Some(report))?;
            fs.read_only = Some(
                "opened read-only; the journal was replayed in memory only (the image still \
                 needs recovery on disk)"
                    .into(),
            );
            return Ok(fs);
        }
        let report = Self::replay(fs, &dev)?;
        Self::open_once(dev, opts)?.finish_open(Some(report))
    }

    /// The steps after every open: attach the journal, recompute the
    /// summary counts, process orphans (read-write opens only).
    fn finish_open(mut self, report: Option<RecoveryReport>) -> Result<Self> {
        self.last_recovery = report;
        self.attach_journal()?;
        self.refresh_summary_counts();
        if self.read_only.is_none() {
            if self.sb.has_ro_compat(ro_compat::ORPHAN_PRESENT) {
                self.process_orphan_file()?;
            }
            if self.sb.last_orphan() != 0 {
                self.process_orphans()?;
            }
        }
        Ok(self)
    }

    /// Replay the journal of `fs` (opened read-only because of
    /// needs_recovery) and clear the flag on disk.
    fn replay(mut fs: Core, dev: &Arc<dyn folio_blockdev::BlockDevice>) -> Result<RecoveryReport> {
        let map = fs.journal_map()?;
        let bs = fs.geo.block_size as usize;
        let blocks = fs.geo.blocks_count;
        let inode_size = fs.geo.inode_size as usize;
        drop(fs);
        let mut j = Journal::load(dev.clone(), map, bs, blocks)?;
        let (mut report, end) = j.replay()?;
        if let Some(end) = end {
            // Fast commits after the last full commit, replayed before
            // the log is marked empty (a crash meanwhile replays both
            // again: every step can be redone).
            if let Some(area) = j.fast_commit_area()? {
                let scan = crate::fast_commit::scan(&area, end, inode_size);
                if !scan.ops.is_empty() {
                    let mut core = Self::open_once(dev.clone(), OpenOptions::default())?;
                    // Not journalled: the replay's changes go home at
                    // the sync, as the kernel's and e2fsck's do.
                    core.read_only = None;
                    let r = core
                        .replay_fast_commits(&scan.ops)
                        .and_then(|()| core.sync());
                    core.closed = true;
                    r?;
                    dev.flush()?;
                }
                report.fast_commits = scan.commits;
                report.fast_commit_records = scan.ops.len() as u32;
                report.stopped_because = format!(
                    "{}; fast commits: {} ({})",
                    report.stopped_because, scan.commits, scan.stopped
                );
            }
            j.finish_recovery(end)?;
        }
        // The replayed superblock may be a journalled copy with the flag
        // still set: clear it on disk.
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        dev.read_at(SUPERBLOCK_OFFSET, &mut raw)?;
        let mut sb = Superblock { raw };
        sb.set_feature_incompat(sb.feature_incompat() & !incompat::RECOVER);
        sb.update_checksum();
        dev.write_at(SUPERBLOCK_OFFSET, &sb.raw)?;
        dev.flush()?;
        Ok(report)
    }

    /// Replay the journal found through the group 1 backup superblock's
    /// `s_jnl_blocks` (e2fsck's way when the primary cannot be read).
    /// `Ok(None)` if there is no usable backup or nothing to replay.
    fn rescue_replay(dev: &Arc<dyn folio_blockdev::BlockDevice>) -> Result<Option<RecoveryReport>> {
        // Candidates: the group 1 backup for each block size (checksum
        // verified), then the primary itself with its checksum not trusted
        // (a tear leaves the journal location intact: it never changes and
        // lies in the superblock's first sector; the journal superblock is
        // validated on its own). The replay rewrites the primary whole.
        let mut candidates: Vec<(u64, Option<u64>, bool)> = (0..=6u32)
            .map(|log| {
                let bs = 1024u64 << log;
                let bpg = (bs * 8).min(65528);
                let fdb = u64::from(bs == 1024);
                ((fdb + bpg) * bs, Some(bs), true)
            })
            .collect();
        candidates.push((SUPERBLOCK_OFFSET, None, false));
        for (off, want_bs, verify) in candidates {
            if off + SUPERBLOCK_SIZE as u64 > dev.size_bytes() {
                continue;
            }
            let mut raw = [0u8; SUPERBLOCK_SIZE];
            dev.read_at(off, &mut raw)?;
            let sb = Superblock { raw };
            let Some(bs) = sb.block_size().map(u64::from) else {
                continue;
            };
            let valid = sb.magic() == crate::format::superblock::MAGIC
                && want_bs.is_none_or(|w| w == bs)
                && (!verify || sb.block_group_nr() == 1)
                && (!verify || !sb.metadata_csum() || sb.compute_checksum() == sb.checksum())
                && sb.has_compat(compat::HAS_JOURNAL)
                && sb.jnl_backup_type() == 1
                && sb.blocks_count().saturating_mul(bs) <= dev.size_bytes();
            if !valid {
                continue;
            }
            let Ok(map) = Self::map_from_jnl_backup(dev, &sb, bs) else {
                continue;
            };
            let Ok(mut j) = Journal::load(dev.clone(), map, bs as usize, sb.blocks_count()) else {
                continue;
            };
            if !j.needs_recovery() {
                return Ok(None);
            }
            let report = j.recover()?;
            let mut raw = [0u8; SUPERBLOCK_SIZE];
            dev.read_at(SUPERBLOCK_OFFSET, &mut raw)?;
            let mut psb = Superblock { raw };
            if psb.magic() == crate::format::superblock::MAGIC {
                psb.set_feature_incompat(psb.feature_incompat() & !incompat::RECOVER);
                psb.update_checksum();
                dev.write_at(SUPERBLOCK_OFFSET, &psb.raw)?;
                dev.flush()?;
            }
            return Ok(Some(report));
        }
        Ok(None)
    }

    /// The superblock writes that bypass the journal only set or clear
    /// needs_recovery. Torn between sectors, the old and new versions
    /// differ in that one flag and in the checksum, so toggling the flag
    /// and finding the checksum valid recovers an exact copy.
    fn repair_torn_flag_write(dev: &Arc<dyn folio_blockdev::BlockDevice>) -> Result<bool> {
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        dev.read_at(SUPERBLOCK_OFFSET, &mut raw)?;
        let mut sb = Superblock { raw };
        if sb.magic() != crate::format::superblock::MAGIC || !sb.metadata_csum() {
            return Ok(false);
        }
        sb.set_feature_incompat(sb.feature_incompat() ^ incompat::RECOVER);
        if sb.compute_checksum() != sb.checksum() {
            return Ok(false);
        }
        // Either version will do: the journal is empty (checked by the
        // caller's failed replay) — keep the flag clear.
        sb.set_feature_incompat(sb.feature_incompat() & !incompat::RECOVER);
        sb.update_checksum();
        dev.write_at(SUPERBLOCK_OFFSET, &sb.raw)?;
        dev.flush()?;
        Ok(true)
    }

    /// Journal block map from `s_jnl_blocks` (extent root or indirect map).
    fn map_from_jnl_backup(
        dev: &Arc<dyn folio_blockdev::BlockDevice>,
        sb: &Superblock,
        bs: u64,
    ) -> Result<Vec<u64>> {
        use crate::format::extent::{parse_node, Node};
        let w = sb.jnl_blocks();
        let mut iblock = [0u8; 60];
        for (i, v) in w.iter().take(15).enumerate() {
            iblock[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        let size = u64::from(w[15]) << 32 | u64::from(w[16]);
        let nblocks = size / bs;
        if nblocks < 16 || nblocks > sb.blocks_count() {
            return Err(Error::corrupted("backup journal size out of range", 0));
        }
        let bad = || Error::corrupted("backup journal map is corrupt", 0);
        let read_block = |blk: u64| -> Result<Vec<u8>> {
            let mut b = vec![0u8; bs as usize];
            dev.read_at(blk.checked_mul(bs).ok_or_else(bad)?, &mut b)?;
            Ok(b)
        };
        let mut map = Vec::with_capacity(nblocks as usize);
        if sb.has_incompat(incompat::EXTENTS) {
            // Walk the tree (bounded depth) collecting leaf extents.
            let mut stack = vec![(iblock.to_vec(), 0u32)];
            let mut leaves = Vec::new();
            while let Some((node, depth)) = stack.pop() {
                if depth > 5 {
                    return Err(bad());
                }
                match parse_node(&node).map_err(|_| bad())?.1 {
                    Node::Leaf(v) => leaves.extend(v),
                    Node::Index { entries, .. } => {
                        for ix in entries.iter().rev() {
                            stack.push((read_block(ix.child)?, depth + 1));
                        }
                    }
                }
            }
            leaves.sort_by_key(|e| e.lblk);
            for e in leaves {
                if u64::from(e.lblk) != map.len() as u64 {
                    return Err(bad());
                }
                map.extend(e.pblk..e.pblk + u64::from(e.len));
            }
        } else {
            let ptrs = |blk: u64| -> Result<Vec<u64>> {
                Ok(read_block(blk)?
                    .chunks_exact(4)
                    .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect())
            };
            map.extend(w.iter().take(12).map(|&v| u64::from(v)));
            for (slot, depth) in [(12usize, 1u32), (13, 2), (14, 3)] {
                let root = u64::from(w[slot]);
                if root == 0 || map.len() as u64 >= nblocks {
                    continue;
                }
                let mut frontier = vec![root];
                for _ in 1..depth {
                    let mut next = Vec::new();
                    for b in frontier {
                        next.extend(ptrs(b)?.into_iter().filter(|&p| p != 0));
                        if next.len() as u64 > nblocks {
                            return Err(bad());
                        }
                    }
                    frontier = next;
                }
                for b in frontier {
                    map.extend(ptrs(b)?);
                }
            }
        }
        map.truncate(nblocks as usize);
        if (map.len() as u64) < nblocks || map.iter().any(|&b| b == 0 || b >= sb.blocks_count()) {
            return Err(bad());
        }
        Ok(map)
    }

    /// Load the journal for writing (read-write opens of journalled
    /// images). A journal that cannot be used makes the filesystem
    /// read-only with the reason.
    fn attach_journal(&mut self) -> Result<()> {
        if self.read_only.is_some() || !self.sb.has_compat(compat::HAS_JOURNAL) {
            return Ok(());
        }
        if self.sb.has_incompat(incompat::JOURNAL_DEV) || self.sb.journal_inum() == 0 {
            self.read_only = Some("external journals are not supported".into());
            return Ok(());
        }
        let map = match self.journal_map() {
            Ok(m) => m,
            Err(e) => {
                self.read_only = Some(format!("the journal is unusable: {e}"));
                return Ok(());
            }
        };
        let dev = self.dev().clone();
        let mut j = match Journal::load(
            dev,
            map,
            self.geo.block_size as usize,
            self.geo.blocks_count,
        ) {
            Ok(j) => j,
            Err(e) => {
                self.read_only = Some(format!("the journal is unusable: {e}"));
                return Ok(());
            }
        };
        if j.needs_recovery() {
            self.read_only = Some(
                "the journal holds transactions but needs_recovery is clear; run e2fsck".into(),
            );
            return Ok(());
        }
        j.set_write_features(
            self.sb.metadata_csum(),
            self.sb.has_incompat(incompat::BIT64),
        );
        self.cache.set_no_steal(true);
        self.journal = Some(j);
        Ok(())
    }

    /// The superblock's free counts are hints the kernel does not keep
    /// current on disk (it counts from the group descriptors at mount, and
    /// so does e2fsck after a replay): recompute them on read-write opens.
    fn refresh_summary_counts(&mut self) {
        if self.read_only.is_some() {
            return;
        }
        let blocks: u64 = self.groups.iter().map(|g| u64::from(g.free_blocks())).sum();
        let inodes: u64 = self.groups.iter().map(|g| u64::from(g.free_inodes())).sum();
        if blocks != self.sb.free_blocks_count() || inodes != u64::from(self.sb.free_inodes_count())
        {
            self.set_free_blocks(blocks);
            self.sb.set_free_inodes_count(inodes as u32);
            self.sb_dirty = true;
        }
    }

    /// What the journal did since open (commits, checkpoints, ...).
    pub fn journal_stats(&self) -> Option<folio_journal::JournalStats> {
        self.journal.as_ref().map(Journal::stats)
    }

    /// Is the filesystem journalled (writes are atomic per transaction)?
    pub fn is_journalled(&self) -> bool {
        self.journal.is_some()
    }

    /// Set or clear needs_recovery in the on-disk superblock alone
    /// (nothing else of the running transaction) and make it durable.
    fn set_recover_on_disk(&mut self, on: bool) -> Result<()> {
        let dev = self.dev().clone();
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        dev.read_at(SUPERBLOCK_OFFSET, &mut raw)?;
        let mut sb = Superblock { raw };
        let f = sb.feature_incompat() & !incompat::RECOVER;
        sb.set_feature_incompat(if on { f | incompat::RECOVER } else { f });
        sb.update_checksum();
        dev.write_at(SUPERBLOCK_OFFSET, &sb.raw)?;
        dev.flush()?;
        Ok(())
    }

    /// Commit every dirty metadata block (and the revoke records of the
    /// blocks freed since the last commit) through the journal. The
    /// blocks stay in the buffer cache, committed, until a checkpoint (or
    /// the cache's eviction) writes them home.
    pub(crate) fn sync_journalled(&mut self) -> Result<()> {
        let r = self.durable_locked(Core::commit_step);
        if let Err(Error::Io(e)) = &r {
            self.abort_journal(e);
        }
        r
    }

    /// An I/O error while writing the journal or checkpointing: what is
    /// committed on the device is whatever the log holds, and the
    /// in-memory metadata may be ahead of it. Nothing more is written
    /// (as jbd2 aborts the journal and ext4 remounts read-only); the next
    /// open replays the log.
    pub(crate) fn abort_journal(&mut self, e: &std::io::Error) {
        if self.aborted.is_some() {
            return;
        }
        let why = format!("the journal was aborted after an I/O error ({e}); reopen the image");
        eprintln!("folio: {why}");
        self.read_only = Some(why.clone());
        self.aborted = Some(why);
        self.inodes.stop_writes();
    }

    /// What every commit does first, under the core lock: ordered data
    /// settled (every block the transaction maps has its data on the
    /// device, or its mapping undone), needs_recovery set on disk before
    /// the first transaction, the superblock and group descriptors put
    /// into their buffers. `false`: nothing to commit (the device was
    /// flushed if it needed it: fsync still needs written data durable).
    pub(crate) fn prepare_journalled_commit(&mut self) -> Result<bool> {
        self.settle_writeback()?;
        if !self.recover_on_disk
            && (self.sb_dirty || !self.gdt_dirty.is_empty() || self.cache.dirty_count() > 0)
        {
            self.set_recover_on_disk(true)?;
            self.recover_on_disk = true;
            let f = self.sb.feature_incompat() | incompat::RECOVER;
            self.sb.set_feature_incompat(f);
            self.sb_dirty = true;
        }
        self.write_metadata_to_cache()?;
        if self.cache.dirty_count() == 0 && self.revokes.is_empty() {
            if self.flush_needed() {
                self.dev().flush()?;
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// Commit a transaction too big for one log transaction (only an
    /// operation without a handle builds one), atomic per part, all under
    /// the core lock. No transaction is committing (`commit_begin`).
    pub(crate) fn commit_in_parts(&mut self) -> Result<()> {
        let dirty = self.cache.dirty_blocks();
        let cap = self
            .journal
            .as_ref()
            .map_or(1, Journal::capacity_blocks)
            .max(1);
        // The revoke records go with the first part that has room for
        // them.
        let chunks: Vec<&[(u64, Vec<u8>)]> = if dirty.is_empty() {
            vec![&[]]
        } else {
            dirty.chunks(cap).collect()
        };
        let mut revoked = self.revokes.is_empty();
        for chunk in chunks {
            let refs: Vec<(u64, &[u8])> = chunk.iter().map(|(b, d)| (*b, d.as_slice())).collect();
            let nrev = if revoked { 0 } else { self.revokes.len() };
            if !self
                .journal
                .as_ref()
                .expect("journalled")
                .fits(refs.len(), nrev)
            {
                self.checkpoint()?;
            }
            let j = self.journal.as_mut().expect("journalled");
            let with = !revoked && j.fits(refs.len(), self.revokes.len());
            j.commit(&refs, if with { &self.revokes } else { &[] })?;
            revoked |= with;
        }
        if !revoked {
            // Too many revokes to share a part: a transaction of their own.
            self.checkpoint()?;
            self.journal
                .as_mut()
                .expect("journalled")
                .commit(&[], &self.revokes)?;
        }
        self.revokes.clear();
        self.cache.mark_committed();
        self.pinned.clear();
        self.inodes.space.set_pinned(0);
        self.txn_changes.clear();
        Ok(())
    }

    /// Write every committed block home, flush, and free the log.
    pub(crate) fn checkpoint(&mut self) -> Result<()> {
        // The log must match the device: a transaction still committing
        // is finished first.
        self.finish_committing()?;
        let Some(j) = self.journal.as_ref() else {
            return Ok(());
        };
        let bs = u64::from(self.geo.block_size);
        let dev = self.dev().clone();
        let targets = j.checkpoint_targets();
        let freed: std::collections::HashSet<u64> = self.revokes.iter().copied().collect();
        for (b, copy) in targets {
            use folio_blockdev::CheckpointSource as Src;
            let from_log = match self.cache.checkpoint_copy(b) {
                Src::Cache(data) => {
                    dev.write_at(b * bs, data)?;
                    false
                }
                Src::Log => true,
                // Freed by the running transaction (and dropped from the
                // cache), still in use in the committed state.
                Src::Home => freed.contains(&b),
            };
            if from_log {
                let data = self.journal.as_ref().expect("journalled").read_copy(copy)?;
                dev.write_at(b * bs, &data)?;
            }
        }
        dev.flush()?;
        self.journal
            .as_mut()
            .expect("journalled")
            .checkpoint_done()?;
        Ok(())
    }

    /// Checkpoint and leave the log marked empty (clean unmount).
    fn empty_journal(&mut self) -> Result<()> {
        if self.journal.is_none() {
            return Ok(());
        }
        self.checkpoint()?;
        self.journal.as_mut().expect("journalled").mark_empty()?;
        Ok(())
    }

    /// A clean close of a journalled image: commit what is pending, write
    /// everything home, empty the log, then clear needs_recovery in place.
    pub(crate) fn close_journalled(&mut self) -> Result<()> {
        self.sync()?;
        self.empty_journal()?;
        if self.recover_on_disk {
            // Only the flag changes (see `repair_torn_flag_write`).
            self.set_recover_on_disk(false)?;
            self.recover_on_disk = false;
            let f = self.sb.feature_incompat() & !incompat::RECOVER;
            self.sb.set_feature_incompat(f);
        }
        Ok(())
    }

    /// Most blocks the running transaction may hold before it commits:
    /// half the log (the rest is room for the descriptors and the next
    /// transaction) and half the buffer cache (its dirty blocks are pinned).
    pub(crate) fn txn_limit(&self) -> usize {
        self.journal.as_ref().map_or(usize::MAX, |j| {
            (j.capacity_blocks() / 2)
                .min(self.cache.capacity() / 2)
                .max(8)
        })
    }

    /// Start a handle on the running transaction (jbd2's
    /// `jbd2_journal_start`): `credits` is the most metadata blocks the
    /// operation may add to the transaction. If they would not fit beside
    /// what the transaction holds, it commits first, so that an operation
    /// never has to be split over two transactions. Handles nest (the
    /// inner one shares the outer's transaction and credits). Takes the
    /// "transaction" level of the lock order.
    pub(crate) fn journal_start(&mut self, credits: usize) -> Result<Handle> {
        self.handle_depth += 1;
        if self.handle_depth > 1 {
            return Ok(Handle {
                credits,
                start: self.cache.dirty_count(),
                order: None,
            });
        }
        let order = Held::take(Level::Transaction, 0);
        if self.journal.is_some() && self.read_only.is_none() {
            let dirty = self.running_dirty();
            if dirty > 0 && dirty + credits > self.txn_limit() {
                if let Err(e) = self.commit_full() {
                    self.handle_depth -= 1;
                    return Err(e);
                }
            }
        }
        Ok(Handle {
            credits,
            start: self.cache.dirty_count(),
            order: Some(order),
        })
    }

    /// End a handle: account the blocks it used against its credits (an
    /// overrun is counted in [`crate::Filesystem::handle_stats`]; tests require
    /// none) and, for the outermost handle, commit if the transaction has
    /// grown to its limit.
    pub(crate) fn journal_stop(&mut self, h: Handle) -> Result<()> {
        self.journal_stop_inner(h, true)
    }

    /// End a handle without the commit `journal_stop` may make: for a
    /// writeback batch whose new mappings wait for data written after
    /// the core lock is released (a commit now would wait for that data
    /// in `settle_writeback` and never see it). The next handle to start
    /// commits if the transaction is full.
    pub(crate) fn journal_stop_deferred(&mut self, h: Handle) {
        // Cannot fail: it never commits.
        let _ = self.journal_stop_inner(h, false);
    }

    fn journal_stop_inner(&mut self, h: Handle, may_commit: bool) -> Result<()> {
        let used = self.cache.dirty_count().saturating_sub(h.start);
        self.handle_stats.0 += 1;
        if used > h.credits {
            self.handle_stats.1 += 1;
        }
        self.handle_depth -= 1;
        let outer = h.order.is_some();
        drop(h);
        if outer
            && may_commit
            && self.journal.is_some()
            && self.read_only.is_none()
            && self.running_dirty() >= self.txn_limit()
        {
            // Metadata only: whatever it maps was written already or
            // is unwritten (ordered mode needs no data writeback here).
            self.commit_full()?;
        }
        Ok(())
    }

    /// Metadata blocks the running transaction has dirtied so far (what
    /// the next commit logs, before descriptors and the superblock): how
    /// tests see what one operation touched.
    pub fn txn_dirty_blocks(&self) -> usize {
        self.cache.dirty_count()
    }

    /// Handles run and how many used more blocks than their credits.
    pub fn handle_stats(&self) -> (u64, u64) {
        self.handle_stats
    }

    /// Run `f` in a handle of `credits`; if it fails for lack of space
    /// while freed blocks wait for a commit (or reservations hold their
    /// worst-case allowance), end the handle, commit, and run it once more
    /// in a new one.
    pub(crate) fn retry_nospc<T>(
        &mut self,
        credits: usize,
        mut f: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let h = self.journal_start(credits)?;
        let r = f(self);
        self.journal_stop(h)?;
        match r {
            Err(Error::NoSpace) if !self.pinned.is_empty() || self.reserved_blocks() > 0 => {
                self.sync()?;
                let h = self.journal_start(credits)?;
                let r = f(self);
                self.journal_stop(h)?;
                r
            }
            r => r,
        }
    }

    // ---- credits: upper bounds of the blocks an operation dirties ----

    /// Credits to free what `name` in `parent` holds, if it exists.
    pub(crate) fn name_free_credits(&mut self, parent: u32, name: &[u8]) -> usize {
        match self.lookup(parent, name) {
            Ok(ino) => self.free_credits(ino),
            Err(_) => 0,
        }
    }

    /// Blocks of the summary metadata any allocation or free may touch:
    /// every group descriptor block, the superblock.
    pub(crate) fn summary_credits(&self) -> usize {
        self.geo.gdt_blocks as usize + 1
    }

    /// Credits of a namespace operation (create, link, unlink, rename ...):
    /// inodes, bitmaps, directory blocks and their index, an ACL block.
    pub(crate) fn namespace_credits(&self) -> usize {
        32 + self.summary_credits()
    }

    /// Credits to allocate `blocks` data blocks to `ino` (bitmaps of the
    /// groups they may land in and the descriptor blocks of those groups,
    /// the extent tree or indirect blocks).
    pub(crate) fn alloc_credits(&mut self, ino: u32, blocks: u64) -> usize {
        let groups = u64::from(self.geo.group_count);
        let bitmaps = blocks.saturating_add(1).min(groups) as usize;
        let descs = bitmaps.min(self.geo.gdt_blocks as usize);
        let map = self.map_credits(ino, blocks);
        8 + 1 + descs + bitmaps + map
    }

    /// Credits to free every block of `ino` (truncate, unlink, punch).
    pub(crate) fn free_credits(&mut self, ino: u32) -> usize {
        let Ok(inode) = self.read_inode(ino) else {
            return self.namespace_credits();
        };
        let bs = u64::from(self.geo.block_size);
        let blocks = inode.size().div_ceil(bs);
        let groups = u64::from(self.geo.group_count);
        let bpg = u64::from(self.geo.blocks_per_group);
        let spans = match Self::uses_extents(&inode) {
            true => self
                .with_ext(&inode, |m| {
                    m.iter().map(|e| u64::from(e.len) / bpg + 2).sum::<u64>()
                })
                .unwrap_or(blocks + 1),
            false => blocks + 1,
        };
        let map = if Self::uses_extents(&inode) {
            // Every tree block, and one split (a punch inside an extent).
            let tree = self.ext_tree_blocks(&inode).unwrap_or(0);
            (tree + 2 * Self::ext_change_credits(&inode) as u64).min(u64::from(u32::MAX)) as usize
        } else {
            self.map_credits(ino, blocks)
        };
        let ea = self.ea_inode_credits(&inode);
        8 + self.summary_credits() + spans.min(groups) as usize + map + ea
    }

    /// Mapping blocks `ino` may dirty when `more` blocks are mapped or
    /// converted. An extent tree changes at most once per block: each
    /// change dirties one root-to-leaf path (never more than the tree
    /// has), and splits add at most one block per half leaf of new
    /// entries plus one per level. Indirect maps: the pointer blocks.
    fn map_credits(&mut self, ino: u32, more: u64) -> usize {
        let per = u64::from(self.geo.block_size) / 12;
        let Ok(inode) = self.read_inode(ino) else {
            return 8;
        };
        let n = if Self::uses_extents(&inode) {
            let depth = u64::from(crate::format::get16(inode.i_block(), 6).unwrap_or(0)).min(5);
            let tree = self.ext_tree_blocks(&inode).unwrap_or(u64::MAX);
            let paths = tree.min(more.saturating_mul(depth + 1));
            let splits = more.saturating_mul(2).div_ceil(per / 2);
            paths.saturating_add(splits).saturating_add(depth + 2)
        } else {
            // Indirect maps: one pointer block per `bs / 4` blocks.
            more.saturating_mul(3).div_ceil(per).saturating_mul(2) + 6
        };
        n.min(u64::from(u32::MAX)) as usize
    }

    /// Finish one orphan: free it if it has no links left (unlinked while
    /// open), otherwise cut its blocks back to its size (an interrupted
    /// truncate or extension).
    fn finish_orphan(&mut self, inode: &mut Inode) -> Result<()> {
        if inode.links() == 0 {
            return self.release_inode(inode);
        }
        if inode.is_reg() || inode.is_dir() {
            let keep = inode.size().div_ceil(u64::from(self.geo.block_size));
            self.truncate_blocks(inode, keep)?;
        }
        inode.set_dtime(0);
        self.write_inode(inode)
    }

    /// Process the orphan list left by an interrupted unlink or truncate:
    /// free unlinked inodes, cut the others back to their size.
    pub(crate) fn process_orphans(&mut self) -> Result<u32> {
        let mut ino = self.sb.last_orphan();
        let mut n = 0u32;
        while ino != 0 {
            if n > self.geo.inodes_count || ino > self.geo.inodes_count {
                return Err(Error::corrupted("the orphan list is corrupt", 0));
            }
            let mut inode = self.read_inode(ino)?;
            let next = inode.dtime();
            self.finish_orphan(&mut inode)?;
            n += 1;
            ino = next;
        }
        if self.sb.last_orphan() != 0 {
            self.sb.set_last_orphan(0);
            self.sb_dirty = true;
            self.sync()?;
        }
        Ok(n)
    }

    /// Process the orphan file (`orphan_file` with `orphan_present` set:
    /// the filesystem was not unmounted cleanly). Each of its blocks holds
    /// little-endian inode numbers (0 = free slot) followed by a tail of
    /// magic and checksum; each orphan is finished as on the list, its
    /// slot cleared and the block's checksum renewed; then
    /// `orphan_present` is cleared. Returns the number of orphans.
    pub(crate) fn process_orphan_file(&mut self) -> Result<u32> {
        let of_ino = self.sb.orphan_file_inum();
        if of_ino == 0 || of_ino > self.geo.inodes_count {
            return Err(Error::corrupted(
                format!("the orphan file inode number {of_ino} is invalid"),
                0,
            ));
        }
        let of = self.read_inode(of_ino)?;
        let bs = self.geo.block_size as usize;
        let slots = (bs - ORPHAN_TAIL_LEN) / 4;
        let mut n = 0u32;
        for lblk in 0..of.size() / bs as u64 {
            let pblk = match self.map_block(&of, lblk, 1)?.0 {
                Mapping::Mapped {
                    pblk,
                    unwritten: false,
                } => pblk,
                _ => {
                    return Err(Error::corrupted(
                        format!("the orphan file has a hole at block {lblk}"),
                        0,
                    ))
                }
            };
            let mut data = self.cache.read(pblk)?.to_vec();
            if get32(&data, bs - ORPHAN_TAIL_LEN) != Some(ORPHAN_BLOCK_MAGIC) {
                return Err(Error::corrupted(
                    format!("orphan file block {lblk} has a bad magic number"),
                    pblk,
                ));
            }
            if self.has_csum()
                && get32(&data, bs - 4) != Some(self.orphan_block_csum(&of, pblk, &data))
            {
                return Err(Error::BadChecksum {
                    what: format!("orphan file block {lblk}"),
                    block: pblk,
                });
            }
            let mut changed = false;
            for slot in 0..slots {
                let ino = get32(&data, slot * 4).unwrap_or(0);
                if ino == 0 {
                    continue;
                }
                if ino < self.geo.first_ino || ino > self.geo.inodes_count {
                    return Err(Error::corrupted(
                        format!("orphan file block {lblk} names invalid inode {ino}"),
                        pblk,
                    ));
                }
                let mut inode = self.read_inode(ino)?;
                self.finish_orphan(&mut inode)?;
                put32(&mut data, slot * 4, 0);
                changed = true;
                n += 1;
            }
            if changed {
                if self.has_csum() {
                    let c = self.orphan_block_csum(&of, pblk, &data);
                    put32(&mut data, bs - 4, c);
                }
                self.cache.write(pblk, &data)?;
            }
        }
        let f = self.sb.feature_ro_compat() & !ro_compat::ORPHAN_PRESENT;
        self.sb.set_feature_ro_compat(f);
        self.sb_dirty = true;
        self.sync()?;
        Ok(n)
    }

    /// Checksum of an orphan file block: crc32c over the orphan file's
    /// inode number and generation, the block's physical number (64 bits)
    /// and its slots, seeded with the filesystem's checksum seed.
    fn orphan_block_csum(&self, of: &Inode, pblk: u64, data: &[u8]) -> u32 {
        let slots = (data.len() - ORPHAN_TAIL_LEN) / 4;
        let mut c = crc32c_raw(self.csum_seed, &of.ino.to_le_bytes());
        c = crc32c_raw(c, &of.generation().to_le_bytes());
        c = crc32c_raw(c, &pblk.to_le_bytes());
        crc32c_raw(c, &data[..slots * 4])
    }
}

/// Magic number in the tail of every orphan file block.
const ORPHAN_BLOCK_MAGIC: u32 = 0x0b10_ca04;
/// Tail of an orphan file block: magic, then checksum.
const ORPHAN_TAIL_LEN: usize = 8;
