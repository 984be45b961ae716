//! Make a new ext2/3/4 filesystem with mke2fs's defaults (e2fsprogs 1.47).
//!
//! Phase 1 lays out the fixed structures directly: superblock and backups,
//! group descriptors, bitmaps, inode tables, the resize inode. Phase 2 opens
//! the result as a `Core` and makes the root directory, lost+found
//! and the journal through the ordinary allocation paths.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use folio_blockdev::{BlockDevice, FileDevice};

use crate::error::{Error, Result};
use crate::format::dirent::{write_entry, TAIL_LEN};
use crate::format::extent::{Extent, MAX_INIT_LEN};
use crate::format::group::{GroupDesc, BG_BLOCK_UNINIT, BG_INODE_UNINIT, BG_INODE_ZEROED};
use crate::format::inode::{Inode, JOURNAL_INO, RESIZE_INO, ROOT_INO, S_IFDIR, S_IFREG};
use crate::format::superblock::{
    compat, incompat, ro_compat, Superblock, FLAG_SIGNED_HASH, MAGIC, STATE_VALID,
    SUPERBLOCK_OFFSET,
};
use crate::format::{put32, Timespec};
use crate::fs::{has_super, Core, OpenOptions};
use crate::ops::Owner;

/// Which flavour of filesystem to make.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsType {
    Ext2,
    Ext3,
    #[default]
    Ext4,
}

/// Options; `None` fields take mke2fs's defaults for the size.
#[derive(Clone, Debug)]
pub struct MkfsOptions {
    pub fs_type: FsType,
    pub block_size: Option<u32>,
    pub label: String,
    pub inode_ratio: Option<u32>,
    pub inode_size: Option<u16>,
    /// Percentage of blocks reserved for root (mke2fs `-m`, fractions
    /// allowed).
    pub reserved_percent: f64,
    pub uuid: Option<[u8; 16]>,
    /// Owner of the root directory.
    pub root_owner: Owner,
    /// The device is known to read as zeros (a freshly created file), so
    /// inode tables and the journal need not be written.
    pub device_zeroed: bool,
    /// Journal size in bytes (mke2fs `-J size=`); `None` takes mke2fs's
    /// table. At least 1,024 blocks, as jbd2 requires.
    pub journal_bytes: Option<u64>,
    /// Feature bits (mke2fs `-O`); `None` takes `fs_type`'s defaults.
    pub features: Option<Features>,
    /// Told of each block group as it is written.
    pub progress: Option<crate::Progress>,
}

/// The feature bits of a new filesystem, as mke2fs.conf's defaults give
/// them and mke2fs's `-O` edits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
}

/// Which of the three feature words a bit is in.
#[derive(Clone, Copy)]
enum Word {
    Compat,
    Incompat,
    RoCompat,
}

/// The features folio's mkfs can make, by mke2fs's names.
const MAKEABLE: &[(&str, Word, u32)] = &[
    ("has_journal", Word::Compat, compat::HAS_JOURNAL),
    ("fast_commit", Word::Compat, compat::FAST_COMMIT),
    ("ext_attr", Word::Compat, compat::EXT_ATTR),
    ("resize_inode", Word::Compat, compat::RESIZE_INODE),
    ("dir_index", Word::Compat, compat::DIR_INDEX),
    ("filetype", Word::Incompat, incompat::FILETYPE),
    ("extent", Word::Incompat, incompat::EXTENTS),
    ("extents", Word::Incompat, incompat::EXTENTS),
    ("64bit", Word::Incompat, incompat::BIT64),
    ("flex_bg", Word::Incompat, incompat::FLEX_BG),
    ("large_dir", Word::Incompat, incompat::LARGEDIR),
    ("ea_inode", Word::Incompat, incompat::EA_INODE),
    // folio makes no inline inodes itself; the kernel will.
    ("inline_data", Word::Incompat, incompat::INLINE_DATA),
    // The kernel sets policies on directories; folio holds no keys.
    ("encrypt", Word::Incompat, incompat::ENCRYPT),
    ("sparse_super", Word::RoCompat, ro_compat::SPARSE_SUPER),
    ("large_file", Word::RoCompat, ro_compat::LARGE_FILE),
    ("huge_file", Word::RoCompat, ro_compat::HUGE_FILE),
    ("uninit_bg", Word::RoCompat, ro_compat::GDT_CSUM),
    ("uninit_groups", Word::RoCompat, ro_compat::GDT_CSUM),
    ("dir_nlink", Word::RoCompat, ro_compat::DIR_NLINK),
    ("extra_isize", Word::RoCompat, ro_compat::EXTRA_ISIZE),
    ("metadata_csum", Word::RoCompat, ro_compat::METADATA_CSUM),
    ("verity", Word::RoCompat, ro_compat::VERITY),
];

/// Features mke2fs knows that folio reads but cannot make yet.
const NOT_MAKEABLE: &[&str] = &[
    "sparse_super2",
    "stable_inodes",
    "orphan_file",
    "meta_bg",
    "mmp",
    "metadata_csum_seed",
    "casefold",
    "bigalloc",
    "quota",
    "project",
    "journal_dev",
];

impl Features {
    /// mke2fs.conf's defaults for a filesystem type (e2fsprogs 1.47).
    pub fn defaults(t: FsType) -> Features {
        let mut f = Features {
            compat: compat::EXT_ATTR | compat::RESIZE_INODE | compat::DIR_INDEX,
            incompat: incompat::FILETYPE,
            ro_compat: ro_compat::SPARSE_SUPER | ro_compat::LARGE_FILE,
        };
        if t != FsType::Ext2 {
            f.compat |= compat::HAS_JOURNAL;
        }
        if t == FsType::Ext4 {
            f.incompat |= incompat::EXTENTS | incompat::BIT64 | incompat::FLEX_BG;
            f.ro_compat |= ro_compat::HUGE_FILE
                | ro_compat::DIR_NLINK
                | ro_compat::EXTRA_ISIZE
                | ro_compat::METADATA_CSUM;
        }
        f
    }

    /// Apply mke2fs's `-O` list: comma-separated names, `^name` to clear
    /// one, `none` to clear all.
    pub fn edit(&mut self, list: &str) -> Result<()> {
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if item == "none" || item == "^none" {
                *self = Features {
                    compat: 0,
                    incompat: 0,
                    ro_compat: 0,
                };
                continue;
            }
            let (on, name) = match item.strip_prefix('^') {
                Some(n) => (false, n),
                None => (true, item),
            };
            let Some(&(_, word, bit)) = MAKEABLE.iter().find(|(n, _, _)| *n == name) else {
                if NOT_MAKEABLE.contains(&name) {
                    return Err(Error::Unsupported(format!(
                        "-O {item}: folio's mkfs cannot make the {name} feature yet"
                    )));
                }
                return Err(Error::Invalid(format!(
                    "-O {item}: invalid filesystem option"
                )));
            };
            let w = match word {
                Word::Compat => &mut self.compat,
                Word::Incompat => &mut self.incompat,
                Word::RoCompat => &mut self.ro_compat,
            };
            if on {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
        // As mke2fs: metadata_csum supersedes uninit_bg.
        if self.ro_compat & ro_compat::METADATA_CSUM != 0 {
            self.ro_compat &= !ro_compat::GDT_CSUM;
        }
        Ok(())
    }

    fn check(&self, blocks: u64, bs: u32) -> Result<()> {
        if self.incompat & incompat::BIT64 != 0 && self.incompat & incompat::EXTENTS == 0 {
            return Err(Error::Invalid(
                "extents must be enabled for a 64-bit filesystem (-O extent)".into(),
            ));
        }
        if self.compat(compat::RESIZE_INODE) && !self.ro_compat(ro_compat::SPARSE_SUPER) {
            return Err(Error::Invalid(
                "reserved online resize blocks not supported on non-sparse filesystem \
                 (-O ^resize_inode)"
                    .into(),
            ));
        }
        if self.incompat & incompat::BIT64 == 0 && blocks > u64::from(u32::MAX) {
            return Err(Error::Invalid(format!(
                "{blocks} blocks of {bs} bytes cannot be expressed in 32 bits: \
                 enable the 64bit feature"
            )));
        }
        Ok(())
    }

    fn compat(&self, bit: u32) -> bool {
        self.compat & bit != 0
    }
    fn incompat(&self, bit: u32) -> bool {
        self.incompat & bit != 0
    }
    fn ro_compat(&self, bit: u32) -> bool {
        self.ro_compat & bit != 0
    }
}

impl MkfsOptions {
    /// The feature bits to make: `features`, or the type's defaults.
    pub fn features(&self) -> Features {
        self.features
            .unwrap_or_else(|| Features::defaults(self.fs_type))
    }
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            fs_type: FsType::Ext4,
            block_size: None,
            label: String::new(),
            inode_ratio: None,
            inode_size: None,
            reserved_percent: 5.0,
            uuid: None,
            root_owner: Owner::default(),
            device_zeroed: false,
            journal_bytes: None,
            features: None,
            progress: None,
        }
    }
}

/// What mkfs made.
#[derive(Clone, Debug)]
pub struct Report {
    pub block_size: u32,
    pub blocks: u64,
    pub inodes: u32,
    pub groups: u32,
    pub journal_blocks: u32,
    pub uuid: [u8; 16],
    pub fs_type: FsType,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(
            f,
            "Creating filesystem with {} {}k blocks and {} inodes",
            self.blocks,
            self.block_size / 1024,
            self.inodes
        )?;
        writeln!(
            f,
            "Filesystem UUID: {}-{}-{}-{}-{}",
            &u[0..8],
            &u[8..12],
            &u[12..16],
            &u[16..20],
            &u[20..32]
        )?;
        writeln!(f, "Block groups: {}", self.groups)?;
        if self.journal_blocks > 0 {
            write!(f, "Journal: {} blocks", self.journal_blocks)
        } else {
            write!(f, "Journal: none")
        }
    }
}

fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut b).is_ok() {
            return b;
        }
    }
    // Fall back to time and address entropy; uniqueness, not secrecy.
    let t = Timespec::now();
    let x = (t.sec as u64) ^ (u64::from(t.nsec) << 20) ^ (&b as *const _ as u64);
    b[..8].copy_from_slice(&x.to_le_bytes());
    b[8..].copy_from_slice(
        &x.rotate_left(29)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .to_le_bytes(),
    );
    b
}

fn uuid_v4() -> [u8; 16] {
    let mut u = random_bytes();
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// mke2fs's journal size (in blocks) for a filesystem of `blocks`.
pub fn default_journal_blocks(blocks: u64) -> Option<u32> {
    Some(match blocks {
        b if b < 2048 => return None,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131_072,
        _ => 262_144,
    })
}

/// Make a filesystem in the file at `path`, creating it (or setting its
/// size) when `size_bytes` is given.
pub fn mkfs_path(path: &Path, size_bytes: Option<u64>, opts: &MkfsOptions) -> Result<Report> {
    let mut opts = opts.clone();
    // An image in use (mounted, or open in another command) is refused
    // before anything is written; the lock is held until mkfs is done.
    let _lock = if path.exists() {
        Some(crate::fs::lock_image(path, false)?)
    } else {
        None
    };
    let existed = path.exists();
    let is_file = !existed
        || std::fs::metadata(path)
            .map(|m| m.is_file())
            .unwrap_or(false);
    let dev: Arc<dyn BlockDevice> = match size_bytes {
        Some(size) if is_file => {
            // Built beside the target and renamed over it only when
            // complete: a bad argument, a size the host refuses or any
            // other failure leaves an existing image exactly as it was.
            let target = if existed {
                std::fs::canonicalize(path)?
            } else {
                path.to_path_buf()
            };
            let name = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into());
            let tmp = target.with_file_name(format!(".{name}.folio-mkfs-{}", std::process::id()));
            let made = (|| -> Result<Report> {
                // A new file reads as zeros.
                opts.device_zeroed = true;
                let dev = Arc::new(FileDevice::create(&tmp, size)?);
                let report = mkfs(dev, size, &opts)?;
                if existed {
                    let perms = std::fs::metadata(&target)?.permissions();
                    std::fs::set_permissions(&tmp, perms)?;
                }
                std::fs::rename(&tmp, &target)?;
                Ok(report)
            })();
            if made.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            return made;
        }
        Some(size) => {
            let d = FileDevice::open(path, false)?;
            if d.size_bytes() < size {
                return Err(Error::Invalid(format!(
                    "device is smaller ({} bytes) than the requested size",
                    d.size_bytes()
                )));
            }
            Arc::new(d)
        }
        None => Arc::new(FileDevice::open(path, false)?),
    };
    let size = size_bytes.unwrap_or_else(|| dev.size_bytes());
    mkfs(dev, size, &opts)
}

/// Bit helpers over a group bitmap.
fn set(b: &mut [u8], i: usize) {
    b[i / 8] |= 1 << (i % 8);
}

/// Set every bit of `b` from bit `from` on (the padding past a group's
/// end).
fn set_from(b: &mut [u8], from: usize) {
    let whole = from.div_ceil(8);
    for i in from..(whole * 8).min(b.len() * 8) {
        set(b, i);
    }
    if whole < b.len() {
        b[whole..].fill(0xFF);
    }
}

/// One bit per block of the filesystem being made, set where mkfs put
/// metadata: 32 MiB for a 1 TiB filesystem of 4 KiB blocks, copied into
/// group bitmaps a word at a time.
struct UsedMap {
    words: Vec<u64>,
    len: u64,
}

impl UsedMap {
    fn new(len: u64) -> Self {
        UsedMap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn get(&self, b: u64) -> bool {
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn set_range(&mut self, start: u64, len: u64) {
        let mut b = start;
        let end = start + len;
        while b < end {
            let (w, s) = ((b / 64) as usize, b % 64);
            let n = (64 - s).min(end - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << s
            };
            self.words[w] |= mask;
            b += n;
        }
    }

    /// The 64 bits from bit `at` on (zeros past the end).
    fn word_at(&self, at: u64) -> u64 {
        let (w, s) = ((at / 64) as usize, at % 64);
        let lo = self.words.get(w).copied().unwrap_or(0) >> s;
        if s == 0 {
            lo
        } else {
            lo | self.words.get(w + 1).copied().unwrap_or(0) << (64 - s)
        }
    }

    /// Copy bits `[start, start + n)` into the bitmap `out` (bit 0 is
    /// `start`); the number of them set.
    fn copy_into(&self, start: u64, n: u64, out: &mut [u8]) -> u64 {
        let mut set = 0;
        let mut i = 0u64;
        while i < n {
            let mut w = self.word_at(start + i);
            let take = (n - i).min(64);
            if take < 64 {
                w &= (1u64 << take) - 1;
            }
            // Most of a new filesystem is free: `out` starts zeroed.
            if w != 0 {
                set += u64::from(w.count_ones());
                let at = (i / 8) as usize;
                let bytes = w.to_le_bytes();
                let k = (take.div_ceil(8) as usize).min(out.len() - at);
                out[at..at + k].copy_from_slice(&bytes[..k]);
            }
            i += 64;
        }
        set
    }
}

/// Make a filesystem on the first `size_bytes` of `dev`.
/// The layout mkfs would make: sizes, counts and the journal, decided
/// before anything is written.
#[derive(Clone, Copy)]
struct Plan {
    bs: u32,
    inode_size: u32,
    blocks: u64,
    fdb: u64,
    bpg: u32,
    groups: u32,
    ipg: u32,
    /// Journal blocks, fast-commit area included.
    jblocks: Option<u32>,
    /// Of which the fast-commit area (`s_num_fc_blks`).
    fc_blocks: u32,
}

fn plan(size_bytes: u64, opts: &MkfsOptions) -> Result<Plan> {
    let mib = 1u64 << 20;
    let (class_bs, class_ratio) = if size_bytes < 3 * mib {
        (1024, 8192)
    } else if size_bytes < 512 * mib {
        (1024, 4096)
    } else if size_bytes >= 16u64 << 40 {
        (4096, 65536)
    } else if size_bytes >= 4u64 << 40 {
        (4096, 32768)
    } else {
        (4096, 16384)
    };
    let bs = opts.block_size.unwrap_or(class_bs);
    if !bs.is_power_of_two() || !(1024..=65536).contains(&bs) {
        return Err(Error::Invalid(format!(
            "block size {bs} (must be a power of two from 1024 to 65536)"
        )));
    }
    let inode_ratio = opts.inode_ratio.unwrap_or(class_ratio).max(bs);
    let inode_size = u32::from(opts.inode_size.unwrap_or(256));
    if !inode_size.is_power_of_two() || inode_size < 128 || inode_size > bs {
        return Err(Error::Invalid(format!("inode size {inode_size}")));
    }
    if opts.label.len() > 16 {
        return Err(Error::Invalid("label is longer than 16 bytes".into()));
    }
    let features = opts.features();
    if features.incompat & incompat::INLINE_DATA != 0 && inode_size == 128 {
        return Err(Error::Invalid(format!(
            "{inode_size} byte inodes are too small for inline data; specify larger size"
        )));
    }
    let journal = features.compat(compat::HAS_JOURNAL);
    let bsz = u64::from(bs);
    let mut blocks = size_bytes / bsz;
    features.check(blocks, bs)?;
    let fdb: u64 = if bs == 1024 { 1 } else { 0 };
    // Free counts are 16-bit per group in 32-byte descriptors: mke2fs caps at 65528.
    let bpg = (bs * 8).min(65528);
    let itable_for = |ipg: u32| (u64::from(ipg) * u64::from(inode_size)).div_ceil(bsz);
    let ipb = bs / inode_size;

    // Groups and inodes; drop a last group too small for its metadata.
    let (groups, ipg) = loop {
        if blocks < fdb + 64 {
            return Err(Error::Invalid(format!(
                "{size_bytes} bytes is too small for a filesystem"
            )));
        }
        let groups = (blocks - fdb).div_ceil(u64::from(bpg));
        let groups32 =
            u32::try_from(groups).map_err(|_| Error::Invalid("too many groups".into()))?;
        let total_inodes = (size_bytes / u64::from(inode_ratio)).max(16);
        let mut ipg = total_inodes.div_ceil(groups).max(16) as u32;
        // As ext2fs_initialize: fill whole inode-table blocks, then round
        // down to a multiple of 8 (bitmap bytes).
        ipg = ipg.min(bs * 8).min(65536 - ipb);
        ipg = (itable_for(ipg) * bsz / u64::from(inode_size)) as u32 & !7;
        ipg = ipg.min(bs * 8).min(65536 - ipb);
        if u64::from(ipg) * groups > u64::from(u32::MAX) {
            return Err(Error::Invalid("too many inodes".into()));
        }
        let last = (blocks - fdb) % u64::from(bpg);
        if groups > 1 && last != 0 && last < 3 + itable_for(ipg) + 50 {
            blocks -= last;
            continue;
        }
        break (groups32, ipg);
    };
    let jblocks = match (journal, opts.journal_bytes) {
        (false, _) => None,
        (true, None) => default_journal_blocks(blocks),
        (true, Some(bytes)) => {
            let j = u32::try_from(bytes / u64::from(bs)).unwrap_or(u32::MAX);
            if j < 1024 || u64::from(j) > blocks / 2 {
                return Err(Error::Invalid(format!(
                    "journal size {j} blocks: it must be between 1024 blocks and half the \
                     filesystem ({} blocks)",
                    blocks / 2
                )));
            }
            Some(j)
        }
    };
    // Fast commits: the journal grows by an area of a 64th of the default
    // journal's size (mke2fs's EXT2_JOURNAL_TO_FC_BLKS_RATIO), whatever
    // size was asked for the journal itself.
    let fc_blocks = match jblocks {
        Some(_) if features.compat(compat::FAST_COMMIT) => {
            default_journal_blocks(blocks).unwrap_or(1024) / 64
        }
        _ => 0,
    };
    let jblocks = jblocks.map(|j| j + fc_blocks);
    Ok(Plan {
        bs,
        inode_size,
        blocks,
        fdb,
        bpg,
        groups,
        ipg,
        jblocks,
        fc_blocks,
    })
}

/// What `mkfs` would make of `size_bytes` with `opts`, writing nothing
/// (mke2fs `-n`).
pub fn mkfs_plan(size_bytes: u64, opts: &MkfsOptions) -> Result<Report> {
    Ok(plan(size_bytes, opts)?.report(opts.uuid.unwrap_or_else(uuid_v4), opts.fs_type))
}

impl Plan {
    fn report(&self, uuid: [u8; 16], fs_type: FsType) -> Report {
        Report {
            block_size: self.bs,
            blocks: self.blocks,
            inodes: self.ipg * self.groups,
            groups: self.groups,
            journal_blocks: self.jblocks.unwrap_or(0),
            uuid,
            fs_type,
        }
    }
}

pub fn mkfs(dev: Arc<dyn BlockDevice>, size_bytes: u64, opts: &MkfsOptions) -> Result<Report> {
    let layout = plan(size_bytes.min(dev.size_bytes()), opts)?;
    let Plan {
        bs,
        inode_size,
        blocks,
        fdb,
        bpg,
        groups,
        ipg,
        jblocks,
        fc_blocks,
    } = layout;
    let features = opts.features();
    let bsz = u64::from(bs);
    let itable_for = |ipg: u32| (u64::from(ipg) * u64::from(inode_size)).div_ceil(bsz);
    // Superblock.
    let mut sb = Superblock::zeroed();
    // has_journal is set by make_journal once the journal exists (phase 2
    // runs unjournalled).
    let mut f_compat = features.compat & !compat::HAS_JOURNAL;
    let resize = features.compat(compat::RESIZE_INODE) && blocks < (1u64 << 32) - 1;
    if !resize {
        f_compat &= !compat::RESIZE_INODE;
    }
    sb.set_feature_compat(f_compat);
    sb.set_feature_incompat(features.incompat);
    sb.set_feature_ro_compat(features.ro_compat);
    let flex_bg = features.incompat(incompat::FLEX_BG);
    let metadata_csum = features.ro_compat(ro_compat::METADATA_CSUM);
    let desc_size: u32 = if features.incompat(incompat::BIT64) {
        64
    } else {
        32
    };
    let gdt_blocks = groups.div_ceil(bs / desc_size);
    let rsv_gdt: u32 = if resize {
        let max_blocks = if blocks < u64::from(u32::MAX) / 1024 {
            blocks * 1024
        } else {
            u64::from(u32::MAX)
        };
        let rsv_groups = (max_blocks - fdb).div_ceil(u64::from(bpg));
        let want = rsv_groups.div_ceil(u64::from(bs / desc_size)) as i64 - i64::from(gdt_blocks);
        want.clamp(0, i64::from(bs / 4)) as u32
    } else {
        0
    };
    let now = Timespec::now();
    let uuid = opts.uuid.unwrap_or_else(uuid_v4);
    sb.set_inodes_count(ipg * groups);
    sb.set_blocks_count(blocks);
    // As mke2fs: the fraction of the block count, truncated.
    sb.set_r_blocks_count((blocks as f64 * opts.reserved_percent.clamp(0.0, 50.0) / 100.0) as u64);
    sb.set_first_data_block(fdb as u32);
    sb.set_log_block_size(bs.trailing_zeros() - 10);
    sb.set_log_cluster_size(bs.trailing_zeros() - 10);
    sb.set_blocks_per_group(bpg);
    sb.set_clusters_per_group(bpg);
    sb.set_inodes_per_group(ipg);
    sb.set_wtime(now.sec as u32);
    sb.set_max_mnt_count(0xFFFF);
    sb.set_magic(MAGIC);
    sb.set_state(STATE_VALID);
    sb.set_errors(1);
    sb.set_lastcheck(now.sec as u32);
    sb.set_rev_level(1);
    sb.set_first_ino(11);
    sb.set_inode_size(inode_size as u16);
    sb.set_uuid(uuid);
    sb.set_volume_name(opts.label.as_bytes());
    sb.set_reserved_gdt_blocks(rsv_gdt as u16);
    let seed = random_bytes();
    sb.set_hash_seed([0, 1, 2, 3].map(|i| {
        u32::from_le_bytes([
            seed[4 * i],
            seed[4 * i + 1],
            seed[4 * i + 2],
            seed[4 * i + 3],
        ])
    }));
    sb.set_def_hash_version(crate::format::hash::HALF_MD4);
    if features.incompat & incompat::ENCRYPT != 0 {
        sb.set_encrypt_algos([1, 4, 0, 0]);
    }
    sb.set_flags(FLAG_SIGNED_HASH);
    if desc_size == 64 {
        sb.set_desc_size(64);
    }
    // As mke2fs, whatever the features: the inodes made have 32 extra bytes.
    if inode_size > 128 {
        sb.set_min_extra_isize(32);
        sb.set_want_extra_isize(32);
    }
    if flex_bg {
        sb.set_log_groups_per_flex(4);
    }
    if metadata_csum {
        sb.set_checksum_type(1);
    }
    sb.set_default_mount_opts(0x0004 | 0x0008); // user_xattr, acl
    sb.set_mkfs_time(now.sec as u32);

    // Layout: a used-block map over the whole filesystem.
    let mut used = UsedMap::new(blocks);
    used.set_range(0, fdb);
    let group_start = |g: u32| fdb + u64::from(g) * u64::from(bpg);
    let group_len = |g: u32| (blocks - group_start(g)).min(u64::from(bpg));
    // Superblock, descriptors and reserved descriptors at a group's start.
    let sb_gdt_len = |g: u32| {
        if has_super(&sb, g) {
            1 + u64::from(gdt_blocks) + u64::from(rsv_gdt)
        } else {
            0
        }
    };
    for g in 0..groups {
        let n = sb_gdt_len(g);
        if n > group_len(g) {
            return Err(Error::Invalid(
                "filesystem too small for its group descriptors".into(),
            ));
        }
        used.set_range(group_start(g), n);
    }
    let alloc_run = |used: &mut UsedMap, goal: u64, len: u64| -> Result<u64> {
        let n = used.len();
        let mut start = goal.max(fdb);
        let mut wrapped = false;
        loop {
            if start + len > n {
                if wrapped {
                    return Err(Error::Invalid(
                        "filesystem too small for its metadata".into(),
                    ));
                }
                wrapped = true;
                start = fdb;
                continue;
            }
            match (start..start + len).find(|&b| used.get(b)) {
                Some(b) => start = b + 1,
                None => {
                    used.set_range(start, len);
                    return Ok(start);
                }
            }
        }
    };
    let itb = itable_for(ipg);
    let mut gds: Vec<GroupDesc> = (0..groups)
        .map(|_| GroupDesc::new(desc_size as usize))
        .collect();
    if flex_bg {
        let flex = 16u32;
        for f in (0..groups).step_by(flex as usize) {
            let members: Vec<u32> = (f..(f + flex).min(groups)).collect();
            let base = group_start(f);
            let mut goal = base;
            for &g in &members {
                let b = alloc_run(&mut used, goal, 1)?;
                gds[g as usize].set_block_bitmap(b);
                goal = b + 1;
            }
            let mut goal = base + u64::from(flex).max(members.len() as u64);
            for &g in &members {
                let b = alloc_run(&mut used, goal, 1)?;
                gds[g as usize].set_inode_bitmap(b);
                goal = b + 1;
            }
            let mut goal = base + 2 * u64::from(flex);
            for &g in &members {
                let b = alloc_run(&mut used, goal, itb)?;
                gds[g as usize].set_inode_table(b);
                goal = b + itb;
            }
        }
    } else {
        for g in 0..groups {
            let gs = group_start(g);
            let b = alloc_run(&mut used, gs, 1)?;
            let i = alloc_run(&mut used, b + 1, 1)?;
            let t = alloc_run(&mut used, i + 1, itb)?;
            if t + itb > gs + group_len(g) {
                return Err(Error::Invalid(
                    "filesystem too small: inode table does not fit its group".into(),
                ));
            }
            gds[g as usize].set_block_bitmap(b);
            gds[g as usize].set_inode_bitmap(i);
            gds[g as usize].set_inode_table(t);
        }
    }
    // Resize inode's double-indirect block.
    let dind = if resize && rsv_gdt > 0 {
        Some(alloc_run(&mut used, group_start(0), 1)?)
    } else {
        None
    };
    let backup_groups: Vec<u32> = (1..groups).filter(|&g| has_super(&sb, g)).collect();

    // Bitmaps and descriptors: uninitialised groups and their flags with
    // either kind of group-descriptor checksum.
    let csum = metadata_csum || features.ro_compat(ro_compat::GDT_CSUM);
    let gdt_csum_seed = sb.csum_seed();
    let mut free_total = 0u64;
    let zero_block = vec![0u8; bs as usize];
    for g in 0..groups {
        let gs = group_start(g);
        let gl = group_len(g);
        let mut bb = vec![0u8; bs as usize];
        let in_use = used.copy_into(gs, gl, &mut bb);
        set_from(&mut bb, gl as usize);
        let free = (gl - in_use) as u32;
        // As mke2fs: with checksums, every group but the last whose blocks
        // hold nothing but its superblock and descriptor copies is
        // BLOCK_UNINIT (its bitmap follows from the descriptors, and is
        // neither written nor summed); every group but the first is
        // INODE_UNINIT.
        let block_uninit = csum && g + 1 != groups && in_use == sb_gdt_len(g);
        let inode_uninit = csum && g != 0;
        let mut ib = vec![0u8; bs as usize];
        let reserved_inodes = if g == 0 { 10 } else { 0 };
        set_from(&mut ib[..], ipg as usize);
        for i in 0..reserved_inodes {
            set(&mut ib, i);
        }
        free_total += u64::from(free);
        let gd = &mut gds[g as usize];
        gd.set_free_blocks(free);
        gd.set_free_inodes(ipg - reserved_inodes as u32);
        gd.set_used_dirs(0);
        if metadata_csum {
            if !block_uninit {
                gd.set_block_bitmap_csum(crate::format::group::bitmap_csum(
                    gdt_csum_seed,
                    &bb[..(bpg / 8) as usize],
                ));
            }
            if !inode_uninit {
                gd.set_inode_bitmap_csum(crate::format::group::bitmap_csum(
                    gdt_csum_seed,
                    &ib[..(ipg / 8) as usize],
                ));
            }
        }
        if csum {
            let mut flags = 0;
            if inode_uninit {
                flags |= BG_INODE_UNINIT;
            }
            if block_uninit {
                flags |= BG_BLOCK_UNINIT;
            }
            if opts.device_zeroed {
                flags |= BG_INODE_ZEROED;
            }
            gd.set_flags(flags);
            gd.set_itable_unused(ipg - reserved_inodes as u32);
        }
        if let Some(p) = &opts.progress {
            p.report(u64::from(g), u64::from(groups));
        }
        if !block_uninit {
            dev.write_at(gd.block_bitmap() * bsz, &bb)?;
        }
        if !inode_uninit {
            dev.write_at(gd.inode_bitmap() * bsz, &ib)?;
        }
        if !opts.device_zeroed {
            // Inode tables must read as zeros where e2fsck scans them.
            let t = gd.inode_table();
            let chunk = vec![0u8; (bsz * itb).min(1 << 20) as usize];
            let mut off = 0u64;
            while off < itb * bsz {
                let n = (itb * bsz - off).min(chunk.len() as u64) as usize;
                dev.write_at(t * bsz + off, &chunk[..n])?;
                off += n as u64;
            }
        }
    }
    sb.set_free_blocks_count(free_total);
    // Like mke2fs: metadata overhead (without the resize inode's block),
    // journal included; statfs leaves it out of the total.
    let overhead =
        blocks - free_total - u64::from(dind.is_some()) + u64::from(jblocks.unwrap_or(0));
    sb.set_overhead_clusters(overhead as u32);
    sb.set_free_inodes_count(ipg * groups - 10);

    // Resize inode: the reserved descriptor blocks form its indirect tree.
    if let Some(dind) = dind {
        let apb = (bs / 4) as usize;
        let mut dbuf = vec![0u8; bs as usize];
        for j in 0..rsv_gdt {
            let pblk = fdb + 1 + u64::from(gdt_blocks) + u64::from(j);
            put32(
                &mut dbuf,
                ((gdt_blocks + j) as usize % apb) * 4,
                pblk as u32,
            );
            let mut ind = vec![0u8; bs as usize];
            for (k, &g) in backup_groups.iter().enumerate() {
                put32(
                    &mut ind,
                    k * 4,
                    (pblk + u64::from(g) * u64::from(bpg)) as u32,
                );
            }
            dev.write_at(pblk * bsz, &ind)?;
            // The backups' reserved blocks must read as zeros (a fresh
            // file already does).
            if !opts.device_zeroed {
                for &g in &backup_groups {
                    dev.write_at((pblk + u64::from(g) * u64::from(bpg)) * bsz, &zero_block)?;
                }
            }
        }
        dev.write_at(dind * bsz, &dbuf)?;
        let extra = if inode_size > 128 {
            32.min(inode_size as u16 - 128)
        } else {
            0
        };
        let mut ri = Inode::new(RESIZE_INO, inode_size as usize, extra);
        ri.set_mode(S_IFREG | 0o600);
        ri.set_links(1);
        let apb64 = apb as u64;
        ri.set_size((apb64 * apb64 + apb64 + 12) * bsz);
        ri.set_atime(now);
        ri.set_mtime(now);
        ri.set_ctime(now);
        put32(ri.i_block_mut(), 13 * 4, dind as u32);
        let nblocks = 1 + u64::from(rsv_gdt) * (1 + backup_groups.len() as u64);
        ri.set_blocks_512(nblocks * bsz / 512);
        if metadata_csum {
            ri.update_checksum(gdt_csum_seed);
        }
        let t = gds[0].inode_table();
        let off = u64::from(RESIZE_INO - 1) * u64::from(inode_size);
        dev.write_at(t * bsz + off, &ri.raw)?;
    }

    // Descriptors, then superblocks (primary and backups).
    for (g, gd) in gds.iter_mut().enumerate() {
        if csum {
            let c = gd.compute_checksum(g as u32, metadata_csum, gdt_csum_seed, &uuid);
            gd.set_checksum(c);
        }
    }
    let mut gdt = vec![0u8; gdt_blocks as usize * bs as usize];
    for (g, gd) in gds.iter().enumerate() {
        gdt[g * desc_size as usize..(g + 1) * desc_size as usize].copy_from_slice(&gd.raw);
    }
    for g in std::iter::once(0).chain(backup_groups.iter().copied()) {
        let gs = group_start(g);
        dev.write_at((gs + 1) * bsz, &gdt)?;
        if g != 0 {
            let mut b = sb.clone();
            b.raw[0x5A..0x5C].copy_from_slice(&(g as u16).to_le_bytes());
            b.update_checksum();
            let mut blk = vec![0u8; bs as usize];
            blk[..1024].copy_from_slice(&b.raw);
            dev.write_at(gs * bsz, &blk)?;
        }
    }
    sb.update_checksum();
    dev.write_at(SUPERBLOCK_OFFSET, &sb.raw)?;
    dev.flush()?;

    // Phase 2: root, lost+found and journal through the filesystem.
    let mut fs = Core::open(dev.clone(), OpenOptions::default())?;
    fs.make_root(opts.root_owner)?;
    fs.dir_spread = false;
    let lpf = fs.mkdir(ROOT_INO, b"lost+found", 0o700, Owner::default())?;
    fs.dir_spread = true;
    // mke2fs grows lost+found to 16 KiB within its direct blocks.
    fs.expand_dir(lpf, 16384.min(12 * u64::from(bs)))?;
    if let Some(j) = jblocks {
        fs.make_journal(j, fc_blocks, opts.device_zeroed)?;
    }
    fs.sync()?;
    Ok(layout.report(uuid, opts.fs_type))
}

impl Core {
    /// A reserved inode (root, journal) made by mkfs: mode, links, times,
    /// and an empty extent root on extent filesystems.
    fn special_inode(&self, ino: u32, mode: u16, links: u16) -> Inode {
        let isz = self.geo.inode_size;
        let mut i = Inode::new(ino, isz as usize, 32.min(isz.saturating_sub(128)) as u16);
        i.set_mode(mode);
        i.set_links(links);
        let now = Timespec::now();
        i.set_atime(now);
        i.set_mtime(now);
        i.set_ctime(now);
        i.set_crtime(now);
        if self.sb.has_incompat(incompat::EXTENTS) {
            self.init_extent_root(&mut i);
        }
        i
    }

    /// Initialise inode 2 as the root directory (mkfs only: the inode is
    /// reserved, not allocated).
    fn make_root(&mut self, owner: Owner) -> Result<()> {
        let mut root = self.special_inode(ROOT_INO, S_IFDIR | 0o755, 2);
        root.set_uid(owner.uid);
        root.set_gid(owner.gid);
        self.dir_init(&mut root, ROOT_INO)?;
        self.write_inode(&mut root)?;
        let gd = &mut self.groups[0];
        gd.set_used_dirs(gd.used_dirs() + 1);
        self.mark_group_dirty(0);
        Ok(())
    }

    /// Grow a directory with empty blocks to at least `bytes` (and two
    /// blocks), as mke2fs does for lost+found.
    fn expand_dir(&mut self, ino: u32, bytes: u64) -> Result<()> {
        let mut dir = self.read_inode(ino)?;
        let bs = u64::from(self.geo.block_size);
        let usable = bs as usize - if self.has_csum() { TAIL_LEN } else { 0 };
        while dir.size() < bytes || dir.size() < 2 * bs {
            let lblk = dir.size() / bs;
            self.allocate_range(&mut dir, lblk, 1)?;
            dir.set_size((lblk + 1) * bs);
            let pblk = match self.map_block(&dir, lblk, 1)?.0 {
                crate::bmap::Mapping::Mapped { pblk, .. } => pblk,
                crate::bmap::Mapping::Hole => unreachable!("just allocated"),
            };
            let mut data = vec![0u8; bs as usize];
            write_entry(&mut data, 0, 0, usable, 0, b"");
            if self.has_csum() {
                let c = crate::format::dirent::leaf_csum(dir.csum_seed(self.csum_seed), &data);
                crate::format::dirent::write_tail(&mut data, c);
            }
            self.cache.write(pblk, &data)?;
        }
        self.write_inode(&mut dir)
    }

    /// Create the internal journal (inode 8) with an empty jbd2 superblock.
    #[allow(clippy::big_endian_bytes)] // jbd2's on-disk format is big-endian
    fn make_journal(&mut self, jblocks: u32, fc_blocks: u32, zeroed: bool) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let mut j = self.special_inode(JOURNAL_INO, S_IFREG | 0o600, 1);
        if self.sb.has_incompat(incompat::EXTENTS) {
            // Like mke2fs: start in the middle of the filesystem, at a flex
            // group boundary when there is more than one flex group.
            let mut g = self.block_group((self.geo.blocks_count - self.geo.first_data_block) / 2);
            let flex = 1u32 << self.sb.log_groups_per_flex();
            if self.geo.group_count > flex {
                g &= !(flex - 1);
            }
            let mut goal = self.group_first_block(g);
            let mut list = Vec::new();
            let mut lblk = 0u32;
            while lblk < jblocks {
                let want = (jblocks - lblk).min(MAX_INIT_LEN);
                let (p, n) = self.alloc_blocks(goal, want)?;
                crate::bmap::insert_extent(
                    &mut list,
                    Extent {
                        lblk,
                        len: n,
                        pblk: p,
                        unwritten: false,
                    },
                );
                lblk += n;
                goal = p + u64::from(n);
            }
            self.write_extent_tree(&mut j, list)?;
            self.add_i_blocks(&mut j, i64::from(jblocks) * (bs / 512) as i64)?;
        } else {
            self.allocate_range(&mut j, 0, u64::from(jblocks))?;
        }
        j.set_size(u64::from(jblocks) * bs);
        // jbd2 superblock (big-endian).
        let mut jsb = vec![0u8; bs as usize];
        let be =
            |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
        be(&mut jsb, 0x0, 0xC03B_3998);
        be(&mut jsb, 0x4, 4);
        be(&mut jsb, 0xC, bs as u32);
        be(&mut jsb, 0x10, jblocks);
        be(&mut jsb, 0x14, 1);
        be(&mut jsb, 0x18, 1);
        jsb[0x30..0x40].copy_from_slice(&self.sb.uuid());
        be(&mut jsb, 0x40, 1);
        // The fast-commit area's length; the kernel sets jbd2's
        // fast-commit feature when it mounts.
        be(&mut jsb, 0x54, fc_blocks);
        let mut l = 0u64;
        while l < u64::from(jblocks) {
            let (m, n) = self.map_block(&j, l, u64::from(jblocks) - l)?;
            let crate::bmap::Mapping::Mapped { pblk, .. } = m else {
                return Err(Error::corrupted("journal has a hole", 0));
            };
            if l == 0 {
                self.dev().write_at(pblk * bs, &jsb)?;
            }
            if !zeroed {
                let skip = u64::from(l == 0);
                let zeros = vec![0u8; (bs * 256) as usize];
                let mut b = skip;
                while b < n {
                    let k = (n - b).min(256);
                    self.dev()
                        .write_at((pblk + b) * bs, &zeros[..(k * bs) as usize])?;
                    b += k;
                }
            }
            l += n;
        }
        self.write_inode(&mut j)?;
        let mut backup = [0u32; 17];
        for (i, w) in backup.iter_mut().take(15).enumerate() {
            *w = crate::format::get32(j.i_block(), i * 4).unwrap_or(0);
        }
        backup[15] = (j.size() >> 32) as u32;
        backup[16] = j.size() as u32;
        self.sb.set_jnl_backup(&backup);
        self.sb.set_journal_inum(JOURNAL_INO);
        let c = self.sb.feature_compat() | compat::HAS_JOURNAL;
        self.sb.set_feature_compat(c);
        self.sb_dirty = true;
        Ok(())
    }
}
