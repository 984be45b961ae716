//! Opening an image: superblock and group descriptor validation, the
//! feature policy, inode I/O and writing metadata back.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use folio_blockdev::{BlockDevice, BufferCache, FileDevice};

use crate::error::{Error, Result};
use crate::format::group::{GroupDesc, BG_BLOCK_UNINIT, BG_INODE_UNINIT};
use crate::format::inode::Inode;
use crate::format::superblock::{
    compat, feature_names, incompat, ro_compat, Superblock, MAGIC, SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
};

/// How to open a filesystem.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Never write to the device.
    pub read_only: bool,
    /// Metadata buffer cache capacity, in blocks.
    pub cache_blocks: usize,
    /// The page cache for file data (budget, folio size, dirty limits).
    pub page_cache: folio_pagecache::Config,
    /// [`crate::Filesystem::open_path`] locks the image file for as long as the
    /// filesystem is open (flock: exclusive for a read-write open, shared
    /// for a read-only one), so that two writers, or a reader and a
    /// writer, never use one image at once. Off for a caller that holds
    /// the lock itself (the mount) or that was asked to read a busy image
    /// anyway.
    pub lock: bool,
    /// A read-only open of an image whose journal needs recovery replays
    /// the journal in memory (the image is never written), so that it
    /// shows what the kernel's read-only mount shows. `norecovery` (as
    /// ext4's mount option) skips that and shows the image as it is on
    /// disk, which may miss the journal's last transactions.
    pub norecovery: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            cache_blocks: 8192,
            page_cache: folio_pagecache::Config::default(),
            lock: true,
            norecovery: false,
        }
    }
}

/// Lock the image at `path` (see [`OpenOptions::lock`]).
pub fn lock_image(path: &Path, shared: bool) -> Result<std::fs::File> {
    let f = std::fs::File::open(path)?;
    // A few tries over about 100 ms: a flock is shared with every child a
    // process forks until that child execs, so an image just closed by a
    // process that is spawning commands (e2fsck, a test harness) can look
    // busy for a moment.
    for attempt in 0..10 {
        let r = if shared {
            f.try_lock_shared()
        } else {
            f.try_lock()
        };
        match r {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if attempt < 9 => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => break,
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::Io(e)),
        }
    }
    Err(Error::Locked(lock_holder(&f)))
}

/// Who holds the flock on `f`: the process (and its command line) from
/// /proc/locks, as far as it can be found.
fn lock_holder(f: &std::fs::File) -> String {
    match flock_holder(f) {
        Some((pid, argv)) if argv.is_empty() => format!("process {pid}"),
        Some((pid, argv)) => format!("process {pid} ({})", argv.join(" ")),
        None => "another process (already mounted, or open in another folio command)".into(),
    }
}

/// The process holding a flock on `f`, with its arguments (none if
/// unreadable), from /proc/locks.
pub fn flock_holder(f: &std::fs::File) -> Option<(u32, Vec<String>)> {
    use std::os::unix::fs::MetadataExt;
    let ino = f.metadata().ok()?.ino().to_string();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(pid), Some(id)) = (fields.get(4), fields.get(5)) else {
            continue;
        };
        if fields.get(1) != Some(&"FLOCK") || id.rsplit(':').next() != Some(ino.as_str()) {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let argv = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                c.split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        return Some((pid, argv));
    }
    None
}

/// Derived, validated geometry of an image.
#[derive(Clone, Debug)]
pub struct Geometry {
    pub block_size: u32,
    pub blocks_count: u64,
    pub first_data_block: u64,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub inodes_count: u32,
    pub inode_size: u32,
    pub group_count: u32,
    pub desc_size: u32,
    pub descs_per_block: u32,
    /// Blocks the group descriptor table takes.
    pub gdt_blocks: u32,
    pub first_ino: u32,
}

/// The state of an open filesystem, behind the core lock of
/// [`crate::Filesystem`].
pub(crate) struct Core {
    pub(crate) cache: BufferCache,
    pub(crate) sb: Superblock,
    pub(crate) geo: Geometry,
    pub(crate) groups: Vec<GroupDesc>,
    /// Descriptor-table blocks (by index in the table) holding a
    /// descriptor changed since they were last put in the cache.
    pub(crate) gdt_dirty: BTreeSet<u32>,
    pub(crate) sb_dirty: bool,
    pub(crate) csum_seed: u32,
    pub(crate) read_only: Option<String>,
    /// In-memory inode objects (their extent maps, delayed allocations,
    /// open references, pins and lock-free fields), shared with
    /// `Filesystem`, and the free-space accounting threads share.
    pub(crate) inodes: Arc<crate::inodes::InodeTable>,
    pub(crate) generation_seed: u32,
    pub(crate) bytes_written: u64,
    /// Spread new directories over groups (off only while mkfs makes
    /// lost+found, which belongs next to the root).
    pub(crate) dir_spread: bool,
    /// The journal, on read-write opens of journalled images.
    pub(crate) journal: Option<folio_journal::Journal>,
    /// Blocks freed by the running transaction: not allocated again until
    /// it commits.
    pub(crate) pinned: BTreeSet<u64>,
    /// Freed blocks with a copy in the live log: the revoke records the
    /// next commit carries.
    pub(crate) revokes: Vec<u64>,
    /// Inodes changed by the running transaction → whether fdatasync
    /// needs the change (see `note_inode_change`).
    pub(crate) txn_changes: HashMap<u32, bool>,
    /// The transaction being committed without the core lock
    /// (`commit.rs`).
    pub(crate) committing: Option<crate::commit::Committing>,
    /// Writes the commits handles start (`commit_full`).
    pub(crate) commit_thread: Option<crate::commit::CommitThread>,
    /// Blocks a fast-commit replay maps (`fast_commit.rs`), while it runs.
    pub(crate) fc_area: Vec<(u64, u64)>,
    /// Nesting depth of journal handles (see `journal_start`).
    pub(crate) handle_depth: u32,
    /// (handles run, handles that used more blocks than their credits).
    pub(crate) handle_stats: (u64, u64),
    /// The device as the filesystem uses it: knows when a flush is due.
    pub(crate) tracker: Arc<folio_blockdev::FlushTracker>,
    /// Writeback data written outside the core lock (`data.rs`).
    pub(crate) wb_io: Arc<crate::data::WritebackIo>,
    /// needs_recovery is set on disk (we have started writing).
    pub(crate) recover_on_disk: bool,
    pub(crate) last_recovery: Option<folio_journal::RecoveryReport>,
    /// File data cache.
    pub(crate) pc: Arc<folio_pagecache::PageCache>,
    /// Reservations made by the buffered write in progress (given back
    /// by its `end` if the copy stops short).
    pub(crate) inflight: Vec<(u64, u64)>,
    /// Allocations may use reserved blocks (writeback of delayed data).
    pub(crate) alloc_from_reserve: bool,
    /// The image file's flock, held while open (`open_path`).
    pub(crate) image_lock: Option<std::fs::File>,
    /// `close` ran, or `abandon` asked for nothing more to be written:
    /// dropping does not commit.
    /// The journal could not be written (an I/O error in a commit or a
    /// checkpoint): the filesystem turned read-only, as jbd2's abort
    /// with errors=remount-ro, and its close reports the failure.
    pub(crate) aborted: Option<String>,
    pub(crate) closed: bool,
    /// The image held under multiple-mount protection (read-write opens
    /// of `mmp` images).
    pub(crate) mmp: Option<crate::mmp::Mmp>,
}

/// Do two raw inodes differ only in timestamps (and the checksum)? Those
/// are the changes fdatasync may leave uncommitted.
fn same_but_times(a: &[u8], b: &[u8]) -> bool {
    // atime, ctime, mtime; checksum_lo; checksum_hi .. crtime_extra.
    const SKIP: [(usize, usize); 3] = [(0x08, 0x14), (0x7C, 0x7E), (0x82, 0x98)];
    let mut pos = 0;
    for (from, to) in SKIP {
        let from = from.min(a.len());
        if a.get(pos..from) != b.get(pos..from) {
            return false;
        }
        pos = to.min(a.len());
    }
    a.get(pos..) == b.get(pos..)
}

fn names(mask: u32, table: &[(u32, &str)], prefix: &str) -> String {
    feature_names(mask, table, prefix).join(", ")
}

impl Core {
    /// Open the image at `path`.
    ///
    /// The image is locked while the filesystem is open (see
    /// [`OpenOptions::lock`]); a busy image is [`Error::Locked`], naming
    /// the holder.
    pub fn open_path(path: &Path, opts: OpenOptions) -> Result<Self> {
        let lock = if opts.lock {
            Some(lock_image(path, opts.read_only)?)
        } else {
            None
        };
        let dev = FileDevice::open(path, opts.read_only)?;
        let mut fs = Self::open(Arc::new(dev), opts)?;
        fs.image_lock = lock;
        Ok(fs)
    }

    /// Open a filesystem on `dev`. A read-write open of an image whose
    /// journal needs recovery replays it first (and processes orphans); a
    /// read-only open replays it into memory only (a copy-on-write view
    /// of the device), unless [`OpenOptions::norecovery`], in which case
    /// it leaves it and says so in [`Self::read_only_reason`].
    pub fn open(dev: Arc<dyn BlockDevice>, opts: OpenOptions) -> Result<Self> {
        Self::open_recovering(dev, opts)
    }

    /// Open without recovery or journal.
    pub(crate) fn open_once(dev: Arc<dyn BlockDevice>, opts: OpenOptions) -> Result<Self> {
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        if dev.size_bytes() < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE as u64 {
            return Err(Error::corrupted(
                "device is too small to hold a superblock",
                0,
            ));
        }
        dev.read_at(SUPERBLOCK_OFFSET, &mut raw)?;
        let sb = Superblock { raw };
        if sb.magic() != MAGIC {
            return Err(Error::corrupted(
                format!(
                    "bad superblock magic {:#06x} (not an ext2/3/4 filesystem)",
                    sb.magic()
                ),
                1,
            ));
        }
        if sb.metadata_csum() {
            if sb.raw[0x175] != 1 {
                return Err(Error::corrupted("unknown superblock checksum type", 1));
            }
            if sb.compute_checksum() != sb.checksum() {
                return Err(Error::BadChecksum {
                    what: "superblock".into(),
                    block: 1,
                });
            }
        }
        let unknown_incompat = sb.feature_incompat() & !incompat::SUPPORTED;
        if unknown_incompat != 0 {
            return Err(Error::UnsupportedFeature(format!(
                "incompatible feature(s) {} (folio refuses to open this image)",
                names(unknown_incompat, incompat::NAMES, "I")
            )));
        }
        let geo = Self::geometry(&sb, dev.size_bytes())?;

        let mut read_only = None;
        if opts.read_only || dev.is_read_only() {
            read_only = Some("opened read-only".to_string());
        }
        let unknown_ro = sb.feature_ro_compat() & !ro_compat::SUPPORTED;
        if unknown_ro != 0 && read_only.is_none() {
            read_only = Some(format!(
                "read-only-compatible feature(s) {} are not supported for writing",
                names(unknown_ro, ro_compat::NAMES, "R")
            ));
        }
        if sb.has_incompat(incompat::RECOVER) {
            // Said even when read-only was asked for: what is shown may
            // miss the journal's last transactions.
            read_only = Some(
                "the journal needs recovery and was not replayed (open read-write, or run \
                 `folio recover`, to replay it)"
                    .into(),
            );
        }
        if sb.has_ro_compat(ro_compat::ORPHAN_PRESENT)
            && !sb.has_compat(compat::ORPHAN_FILE)
            && read_only.is_none()
        {
            read_only = Some("orphan_present is set but there is no orphan_file".into());
        }

        let bs = geo.block_size as usize;
        let tracker = Arc::new(folio_blockdev::FlushTracker::new(dev));
        let mut cache = BufferCache::new(tracker.clone(), bs, opts.cache_blocks);
        let csum_seed = sb.csum_seed();
        let mut groups = Vec::with_capacity(geo.group_count as usize);
        for g in 0..geo.group_count {
            let blk = Self::gdt_block_location(&sb, &geo, g / geo.descs_per_block);
            let off = (g % geo.descs_per_block) as usize * geo.desc_size as usize;
            let b = cache.read(blk)?;
            let gd = GroupDesc {
                raw: b[off..off + geo.desc_size as usize].to_vec(),
            };
            Self::check_group_desc(&sb, &geo, csum_seed, g, &gd, blk)?;
            groups.push(gd);
        }
        let now = crate::format::Timespec::now();
        let core = Core {
            cache,
            generation_seed: (now.nsec ^ (now.sec as u32)).wrapping_mul(2_654_435_761) | 1,
            sb,
            geo,
            groups,
            gdt_dirty: BTreeSet::new(),
            sb_dirty: false,
            csum_seed,
            read_only,
            inodes: Arc::default(),
            bytes_written: 0,
            dir_spread: true,
            journal: None,
            pinned: BTreeSet::new(),
            revokes: Vec::new(),
            txn_changes: HashMap::new(),
            committing: None,
            commit_thread: None,
            fc_area: Vec::new(),
            handle_depth: 0,
            handle_stats: (0, 0),
            tracker,
            wb_io: Arc::default(),
            recover_on_disk: false,
            last_recovery: None,
            pc: Arc::new(folio_pagecache::PageCache::new(opts.page_cache.clone())),
            inflight: Vec::new(),
            alloc_from_reserve: false,
            image_lock: None,
            closed: false,
            aborted: None,
            mmp: None,
        };
        core.inodes.space.set_free(core.sb.free_blocks_count());
        if core.sb.has_ro_compat(ro_compat::LARGE_FILE) {
            core.inodes.set_large_file();
        }
        if core.inline_dirs() {
            core.inodes.set_inline_files();
        }
        Ok(core)
    }

    /// Validate the superblock's geometry before any layout math uses it.
    fn geometry(sb: &Superblock, dev_size: u64) -> Result<Geometry> {
        let bad = |what: &str| Error::corrupted(format!("superblock: {what}"), 1);
        let block_size = sb
            .block_size()
            .ok_or_else(|| bad("block size out of range"))?;
        if sb.has_ro_compat(ro_compat::BIGALLOC) {
            return Err(Error::UnsupportedFeature(
                "bigalloc (cluster allocation) is not supported".into(),
            ));
        }
        if sb.log_cluster_size() != sb.log_block_size() {
            return Err(bad("cluster size differs from block size without bigalloc"));
        }
        let blocks_count = sb.blocks_count();
        let first_data_block = u64::from(sb.first_data_block());
        let bpg = sb.blocks_per_group();
        let ipg = sb.inodes_per_group();
        if bpg == 0 || bpg > block_size * 8 {
            return Err(bad("blocks per group out of range"));
        }
        if ipg == 0 || ipg > block_size * 8 {
            return Err(bad("inodes per group out of range"));
        }
        if first_data_block >= blocks_count || first_data_block > 1 {
            return Err(bad("first data block out of range"));
        }
        if block_size == 1024 && first_data_block != 1 {
            return Err(bad("1 KiB blocks need first data block 1"));
        }
        let group_count = (blocks_count - first_data_block).div_ceil(u64::from(bpg));
        let group_count = u32::try_from(group_count).map_err(|_| bad("too many groups"))?;
        if u64::from(sb.inodes_count()) != u64::from(ipg) * u64::from(group_count) {
            return Err(bad("inode count does not match groups × inodes per group"));
        }
        let inode_size = u32::from(sb.inode_size());
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
            return Err(bad("inode size out of range"));
        }
        if inode_size > 128 {
            let extra = u32::from(sb.min_extra_isize()).max(u32::from(sb.want_extra_isize()));
            if 128 + extra > inode_size {
                return Err(bad("extra inode size does not fit the inode"));
            }
        }
        let desc_size = u32::from(sb.desc_size());
        if desc_size < 32 || desc_size > block_size || !desc_size.is_power_of_two() {
            return Err(bad("group descriptor size out of range"));
        }
        if sb.has_incompat(incompat::BIT64) && desc_size < 64 {
            return Err(bad("64bit needs descriptors of at least 64 bytes"));
        }
        let first_ino = sb.first_ino();
        if first_ino < 11 || first_ino >= sb.inodes_count() {
            return Err(bad("first inode out of range"));
        }
        let needed = blocks_count
            .checked_mul(u64::from(block_size))
            .ok_or_else(|| bad("block count overflows"))?;
        if needed > dev_size {
            return Err(Error::corrupted(
                format!(
                    "the filesystem claims {needed} bytes but the device has only {dev_size} \
                     (truncated image?)"
                ),
                1,
            ));
        }
        let descs_per_block = block_size / desc_size;
        let gdt_blocks = group_count.div_ceil(descs_per_block);
        Ok(Geometry {
            block_size,
            blocks_count,
            first_data_block,
            blocks_per_group: bpg,
            inodes_per_group: ipg,
            inodes_count: sb.inodes_count(),
            inode_size,
            group_count,
            desc_size,
            descs_per_block,
            gdt_blocks,
            first_ino,
        })
    }

    /// Block holding group descriptor block number `i` (primary copy).
    fn gdt_block_location(sb: &Superblock, geo: &Geometry, i: u32) -> u64 {
        let meta_bg = sb.has_incompat(incompat::META_BG);
        if !meta_bg || i < sb.first_meta_bg() {
            return geo.first_data_block + 1 + u64::from(i);
        }
        let g = i * geo.descs_per_block;
        let has_sb = u64::from(has_super(sb, g));
        geo.first_data_block + u64::from(g) * u64::from(geo.blocks_per_group) + has_sb
    }

    fn check_group_desc(
        sb: &Superblock,
        geo: &Geometry,
        seed: u32,
        g: u32,
        gd: &GroupDesc,
        blk: u64,
    ) -> Result<()> {
        let meta = sb.metadata_csum();
        if meta || sb.has_ro_compat(ro_compat::GDT_CSUM) {
            let c = gd.compute_checksum(g, meta, seed, &sb.uuid());
            if c != gd.checksum() {
                return Err(Error::BadChecksum {
                    what: format!("group descriptor {g}"),
                    block: blk,
                });
            }
        }
        let in_fs = |b: u64| b >= geo.first_data_block && b < geo.blocks_count;
        let itable_blocks = (u64::from(geo.inodes_per_group) * u64::from(geo.inode_size))
            .div_ceil(u64::from(geo.block_size));
        if !in_fs(gd.block_bitmap())
            || !in_fs(gd.inode_bitmap())
            || !in_fs(gd.inode_table())
            || gd.inode_table() + itable_blocks > geo.blocks_count
        {
            return Err(Error::corrupted(
                format!("group descriptor {g} points outside the filesystem"),
                blk,
            ));
        }
        if gd.free_inodes() > geo.inodes_per_group || gd.free_blocks() > geo.blocks_per_group {
            return Err(Error::corrupted(
                format!("group descriptor {g} has impossible free counts"),
                blk,
            ));
        }
        // Counters the allocator does arithmetic on: checked here, before
        // any of it, so a hostile value is an error and never wraps.
        if gd.used_dirs() > geo.inodes_per_group
            || (sb.has_ro_compat(ro_compat::GDT_CSUM) || meta)
                && gd.itable_unused() > geo.inodes_per_group
        {
            return Err(Error::corrupted(
                format!("group descriptor {g} has impossible inode counts"),
                blk,
            ));
        }
        Ok(())
    }

    // ---- accessors ----

    /// Metadata buffer cache (hits, misses) since open.
    pub fn cache_stats(&self) -> (u64, u64) {
        self.cache.stats()
    }
    pub(crate) fn check_writable(&self) -> Result<()> {
        match &self.read_only {
            Some(why) => Err(Error::ReadOnly(why.clone())),
            None if self.mmp.as_ref().is_some_and(|m| m.lost()) => Err(Error::ReadOnly(
                "another node has taken the image (multiple-mount protection)".into(),
            )),
            None => Ok(()),
        }
    }

    /// For a read-write open of an `mmp` image: take it (see `mmp`),
    /// before anything is written, journal replay included. `None` for
    /// other opens.
    pub(crate) fn take_mmp(
        dev: &Arc<dyn BlockDevice>,
        opts: &OpenOptions,
    ) -> Result<Option<crate::mmp::Mmp>> {
        if opts.read_only || dev.is_read_only() {
            return Ok(None);
        }
        let mut raw = [0u8; SUPERBLOCK_SIZE];
        if dev.size_bytes() < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE as u64 {
            return Ok(None);
        }
        dev.read_at(SUPERBLOCK_OFFSET, &mut raw)?;
        let sb = Superblock { raw };
        if sb.magic() != MAGIC || !sb.has_incompat(incompat::MMP) {
            return Ok(None);
        }
        crate::mmp::Mmp::start(Arc::clone(dev), &sb, &std::thread::sleep).map(Some)
    }

    pub(crate) fn has_csum(&self) -> bool {
        self.sb.metadata_csum()
    }

    /// Group descriptors carry checksums and the uninit flags are in use.
    pub(crate) fn has_gdt_csum(&self) -> bool {
        self.sb.metadata_csum() || self.sb.has_ro_compat(ro_compat::GDT_CSUM)
    }

    pub(crate) fn dev(&self) -> &Arc<dyn BlockDevice> {
        self.cache.device()
    }

    /// Has anything been written since the device was last flushed?
    pub(crate) fn flush_needed(&self) -> bool {
        self.tracker.unflushed()
    }

    /// First block of group `g`.
    pub(crate) fn group_first_block(&self, g: u32) -> u64 {
        self.geo.first_data_block + u64::from(g) * u64::from(self.geo.blocks_per_group)
    }

    /// Number of blocks in group `g` (the last may be short).
    pub(crate) fn group_block_count(&self, g: u32) -> u32 {
        let start = self.group_first_block(g);
        (self.geo.blocks_count - start).min(u64::from(self.geo.blocks_per_group)) as u32
    }

    pub(crate) fn block_group(&self, blk: u64) -> u32 {
        ((blk - self.geo.first_data_block) / u64::from(self.geo.blocks_per_group)) as u32
    }

    /// Does block `blk` lie in the data area?
    pub(crate) fn block_in_fs(&self, blk: u64) -> bool {
        blk >= self.geo.first_data_block && blk < self.geo.blocks_count
    }

    /// A block number read from disk must lie in the data area. `what`
    /// is formatted only for the error.
    pub(crate) fn check_block(
        &self,
        blk: u64,
        what: impl std::fmt::Display,
        from: u64,
    ) -> Result<()> {
        if !self.block_in_fs(blk) {
            return Err(Error::corrupted(
                format!("{what} points to block {blk}, outside the filesystem"),
                from,
            ));
        }
        Ok(())
    }

    // ---- inodes ----

    fn inode_location(&self, ino: u32) -> Result<(u64, usize)> {
        if ino == 0 || ino > self.geo.inodes_count {
            return Err(Error::corrupted(
                format!("inode number {ino} out of range"),
                0,
            ));
        }
        let g = (ino - 1) / self.geo.inodes_per_group;
        let idx = (ino - 1) % self.geo.inodes_per_group;
        let byte = u64::from(idx) * u64::from(self.geo.inode_size);
        let blk = self.groups[g as usize].inode_table() + byte / u64::from(self.geo.block_size);
        Ok((blk, (byte % u64::from(self.geo.block_size)) as usize))
    }

    /// True if the inode slot is in a part of the table never initialised
    /// (INODE_UNINIT group or beyond the used part of the table).
    pub(crate) fn inode_slot_uninit(&self, ino: u32) -> bool {
        if !self.has_gdt_csum() {
            return false;
        }
        let g = (ino - 1) / self.geo.inodes_per_group;
        let idx = (ino - 1) % self.geo.inodes_per_group;
        let gd = &self.groups[g as usize];
        gd.flags() & BG_INODE_UNINIT != 0
            || idx >= self.geo.inodes_per_group.saturating_sub(gd.itable_unused())
    }

    /// Read inode `ino`, verifying its checksum.
    pub fn read_inode(&mut self, ino: u32) -> Result<Inode> {
        let (blk, off) = self.inode_location(ino)?;
        let isz = self.geo.inode_size as usize;
        if self.inode_slot_uninit(ino) {
            return Ok(Inode {
                ino,
                raw: vec![0; isz],
            });
        }
        let b = self.cache.read(blk)?;
        let mut inode = Inode {
            ino,
            raw: b[off..off + isz].to_vec(),
        };
        if self.has_csum() && !inode.is_all_zero() {
            if inode.extra_isize() + 128 > isz || !inode.extra_isize().is_multiple_of(4) {
                return Err(Error::corrupted(
                    format!("inode {ino} has a bad i_extra_isize"),
                    blk,
                ));
            }
            if inode.compute_checksum(self.csum_seed) != inode.stored_checksum() {
                return Err(Error::BadChecksum {
                    what: format!("inode {ino}"),
                    block: blk,
                });
            }
        }
        // What lock-free writers changed and the block does not show yet.
        if let Some(o) = self.inodes.get(ino) {
            o.overlay(&mut inode);
        }
        Ok(inode)
    }

    /// What the inode objects keep of a live regular file.
    pub(crate) fn file_note(&self, inode: &Inode) -> crate::inodes::FileNote {
        crate::inodes::FileNote {
            immutable: inode.flags() & crate::format::inode::FL_IMMUTABLE != 0,
            size: inode.size(),
            mtime_ms: crate::inodes::millis(inode.mtime()),
            max_size: self.max_file_size(inode),
            shape: Self::shape_of(inode),
        }
    }

    /// The shape of `inode`'s block map (for worst-case reservations).
    pub(crate) fn shape_of(inode: &Inode) -> crate::inodes::Shape {
        let extents = Self::uses_extents(inode);
        crate::inodes::Shape {
            extents,
            depth: if extents {
                crate::format::get16(inode.i_block(), 6).unwrap_or(0)
            } else {
                0
            },
            entries: if extents {
                crate::format::get16(inode.i_block(), 2).unwrap_or(0)
            } else {
                0
            },
        }
    }

    /// Write `inode` back (checksum updated).
    pub fn write_inode(&mut self, inode: &mut Inode) -> Result<()> {
        self.check_writable()?;
        let (blk, off) = self.inode_location(inode.ino)?;
        let isz = self.geo.inode_size as usize;
        assert_eq!(
            inode.raw.len(),
            isz,
            "inode buffer has the filesystem's inode size"
        );
        let obj = self.inodes.get(inode.ino);
        // Held until the block has the inode, so no lock-free writer
        // changes the object in between.
        let mut ahead = obj.as_ref().map(|o| o.ahead());
        if let (Some(o), Some(a)) = (&obj, ahead.as_mut()) {
            if a.dirty {
                // Without the inode lock this is writeback (or a namespace
                // change) working from a copy that may predate a lock-free
                // write: the object's size and times are newer. Under the
                // inode lock no lock-free writer runs, so the copy, read
                // with them folded in, is the truth.
                if !o.locked_by_me() {
                    inode.set_size(a.size);
                    inode.set_mtime(a.time);
                    inode.set_ctime(a.time.max(inode.ctime()));
                }
                a.dirty = false;
            }
        }
        if self.has_csum() {
            inode.update_checksum(self.csum_seed);
        }
        let b = self.cache.modify(blk)?;
        let datasync = !same_but_times(&b[off..off + isz], &inode.raw);
        b[off..off + isz].copy_from_slice(&inode.raw);
        drop(ahead);
        self.note_inode_change(inode.ino, datasync);
        if inode.is_reg() {
            self.note_large_file(inode.size());
        }
        // Encrypted files stay with the core, which refuses their data.
        // So do verity files, whose reads it verifies.
        if inode.is_reg()
            && inode.links() > 0
            && !crate::fscrypt::is_encrypted(inode)
            && !crate::verity::is_verity(inode)
        {
            self.inodes.note(inode.ino, self.file_note(inode));
            if inode.mode() & 0o6000 != 0 {
                self.inodes.set_plain(inode.ino, false);
            }
        } else {
            self.inodes.unnote(inode.ino);
        }
        Ok(())
    }

    /// Write the inodes whose size or times lock-free writers moved ahead
    /// of their blocks (`only`: just that one) into the blocks, in handles
    /// of a bounded size.
    pub(crate) fn flush_ahead(&mut self, only: Option<u32>) -> Result<()> {
        let inos = match only {
            Some(ino) => match self.inodes.get(ino) {
                Some(o) if o.ahead().dirty => vec![ino],
                _ => return Ok(()),
            },
            None => self.inodes.ahead_inodes(),
        };
        for chunk in inos.chunks(64) {
            let h = self.journal_start(chunk.len() + self.namespace_credits())?;
            let mut r = Ok(());
            for &ino in chunk {
                r = self
                    .read_inode(ino)
                    .and_then(|mut inode| self.write_inode(&mut inode));
                if r.is_err() {
                    break;
                }
            }
            self.journal_stop(h)?;
            r?;
        }
        Ok(())
    }

    /// `ino`'s metadata changed in the running transaction; `datasync`:
    /// in a way fdatasync must make durable (size, block map, anything
    /// but timestamps).
    pub(crate) fn note_inode_change(&mut self, ino: u32, datasync: bool) {
        let e = self.txn_changes.entry(ino).or_insert(false);
        *e |= datasync;
    }

    // ---- metadata write-back ----

    pub(crate) fn mark_group_dirty(&mut self, g: u32) {
        let gd = &mut self.groups[g as usize];
        if self.sb.metadata_csum() || self.sb.has_ro_compat(ro_compat::GDT_CSUM) {
            let c =
                gd.compute_checksum(g, self.sb.metadata_csum(), self.csum_seed, &self.sb.uuid());
            gd.set_checksum(c);
        }
        self.gdt_dirty.insert(g / self.geo.descs_per_block);
        self.sb_dirty = true;
    }

    /// Put the descriptor-table blocks that changed into the cache (a
    /// commit logs only those).
    fn write_gdt(&mut self) -> Result<()> {
        let dpb = self.geo.descs_per_block;
        let ds = self.geo.desc_size as usize;
        let dirty: Vec<u32> = self.gdt_dirty.iter().copied().collect();
        for i in dirty {
            let blk = Self::gdt_block_location(&self.sb, &self.geo, i);
            let first = i * dpb;
            let last = (first + dpb).min(self.geo.group_count);
            let descs: Vec<Vec<u8>> = (first..last)
                .map(|g| self.groups[g as usize].raw.clone())
                .collect();
            let b = self.cache.modify(blk)?;
            for (k, d) in descs.iter().enumerate() {
                b[k * ds..(k + 1) * ds].copy_from_slice(d);
            }
            self.gdt_dirty.remove(&i);
        }
        Ok(())
    }

    fn write_superblock(&mut self) -> Result<()> {
        let now = crate::format::Timespec::now();
        self.sb.set_wtime(now.sec as u32);
        self.bytes_written += self.inodes.take_written();
        let kb = self.sb.kbytes_written() + self.bytes_written / 1024;
        self.bytes_written %= 1024;
        self.sb.set_kbytes_written(kb);
        self.sb.update_checksum();
        let bs = u64::from(self.geo.block_size);
        let blk = SUPERBLOCK_OFFSET / bs;
        let off = (SUPERBLOCK_OFFSET % bs) as usize;
        let raw = self.sb.raw;
        let b = self.cache.modify(blk)?;
        b[off..off + SUPERBLOCK_SIZE].copy_from_slice(&raw);
        Ok(())
    }

    /// Put the group descriptors and superblock into the cache.
    pub(crate) fn write_metadata_to_cache(&mut self) -> Result<()> {
        if !self.gdt_dirty.is_empty() {
            self.write_gdt()?;
        }
        if self.sb_dirty || self.cache.dirty_count() > 0 || self.bytes_written > 0 {
            self.write_superblock()?;
            self.sb_dirty = false;
        }
        Ok(())
    }

    /// Make everything written so far durable: file data, then metadata
    /// (through the journal when there is one).
    pub fn sync(&mut self) -> Result<()> {
        if self.sync_begin()? {
            self.sync_journalled()
        } else {
            Ok(())
        }
    }

    /// `sync` up to its commit: data written back, sizes put into inodes;
    /// without a journal, metadata written too. `true`: the journal's
    /// commit is left to do.
    pub(crate) fn sync_begin(&mut self) -> Result<bool> {
        if self.read_only.is_some() {
            return Ok(false);
        }
        // Ordered data: every dirty folio reaches the device (and delayed
        // allocations get their blocks) before the metadata that maps it
        // commits.
        self.writeback_all()?;
        self.flush_ahead(None)?;
        self.commit_begin_unjournalled()
    }

    /// Without a journal, write the metadata home (`false`); with one,
    /// leave the commit to the caller (`true`).
    pub(crate) fn commit_begin_unjournalled(&mut self) -> Result<bool> {
        if self.journal.is_some() {
            return Ok(true);
        }
        self.settle_writeback()?;
        self.write_metadata_to_cache()?;
        self.cache.sync()?;
        Ok(false)
    }

    /// An operation panicked while holding the core lock: metadata may be
    /// half changed, so nothing more is written (not even at drop).
    pub(crate) fn poisoned(&mut self) {
        if self.read_only.is_none() {
            eprintln!("folio: an operation panicked; the filesystem is now read-only");
            self.read_only = Some("an earlier operation panicked".into());
            self.inodes.stop_writes();
        }
        self.closed = true;
    }

    pub(crate) fn close_inner(&mut self) -> Result<()> {
        self.closed = true;
        let r = self.close_steps();
        // The image is free for other nodes now.
        match self.mmp.take() {
            Some(m) => r.and(m.release(true)),
            None => r,
        }
    }

    fn close_steps(&mut self) -> Result<()> {
        if let Some(why) = &self.aborted {
            return Err(Error::ReadOnly(why.clone()));
        }
        if self.read_only.is_some() {
            return Ok(());
        }
        if self.journal.is_some() {
            return self.close_journalled();
        }
        self.sync()
    }

    /// Groups whose block bitmap is not initialised on disk.
    pub(crate) fn block_uninit(&self, g: u32) -> bool {
        self.has_gdt_csum() && self.groups[g as usize].flags() & BG_BLOCK_UNINIT != 0
    }
}

impl Drop for Core {
    /// A writable filesystem dropped without `close` is closed here, so
    /// that nothing written is silently lost; an error is logged.
    fn drop(&mut self) {
        // Whatever happens below, no commit write outlives the filesystem.
        self.wait_commit_write();
        if self.closed || self.read_only.is_some() || std::thread::panicking() {
            return;
        }
        if let Err(e) = self.close_inner() {
            eprintln!("folio: closing the filesystem on drop failed: {e}");
        }
    }
}

/// Does group `g` hold a superblock backup (sparse_super rules)?
pub fn has_super(sb: &Superblock, g: u32) -> bool {
    if g <= 1 || !sb.has_ro_compat(ro_compat::SPARSE_SUPER) {
        return true;
    }
    if g.is_multiple_of(2) {
        return false;
    }
    for base in [3u32, 5, 7] {
        let mut p = base;
        while p < g {
            p = match p.checked_mul(base) {
                Some(v) => v,
                None => break,
            };
        }
        if p == g {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let mut sb = Superblock::zeroed();
        sb.set_feature_ro_compat(ro_compat::SPARSE_SUPER);
        let with: Vec<u32> = (0..100).filter(|&g| has_super(&sb, g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81]);
        sb.set_feature_ro_compat(0);
        assert!(has_super(&sb, 4));
    }
}
