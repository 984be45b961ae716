//! The superblock: 1024 bytes at byte offset 1024 of the device.

use super::{le16, le32, put16, put32};
use crate::csum::crc32c_raw;

pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const SUPERBLOCK_SIZE: usize = 1024;
pub const MAGIC: u16 = 0xEF53;

// Field offsets (bytes) within the superblock.
const INODES_COUNT: usize = 0x0;
const BLOCKS_COUNT_LO: usize = 0x4;
const R_BLOCKS_COUNT_LO: usize = 0x8;
const FREE_BLOCKS_COUNT_LO: usize = 0xC;
const FREE_INODES_COUNT: usize = 0x10;
const FIRST_DATA_BLOCK: usize = 0x14;
const LOG_BLOCK_SIZE: usize = 0x18;
const LOG_CLUSTER_SIZE: usize = 0x1C;
const BLOCKS_PER_GROUP: usize = 0x20;
const CLUSTERS_PER_GROUP: usize = 0x24;
const INODES_PER_GROUP: usize = 0x28;
const MTIME: usize = 0x2C;
const WTIME: usize = 0x30;
const MAX_MNT_COUNT: usize = 0x36;
const MAGIC_OFF: usize = 0x38;
const STATE: usize = 0x3A;
const ERRORS: usize = 0x3C;
const LASTCHECK: usize = 0x40;
const CREATOR_OS: usize = 0x48;
const REV_LEVEL: usize = 0x4C;
const FIRST_INO: usize = 0x54;
const INODE_SIZE: usize = 0x58;
const FEATURE_COMPAT: usize = 0x5C;
const FEATURE_INCOMPAT: usize = 0x60;
const FEATURE_RO_COMPAT: usize = 0x64;
const UUID: usize = 0x68;
const VOLUME_NAME: usize = 0x78;
const RESERVED_GDT_BLOCKS: usize = 0xCE;
const JOURNAL_INUM: usize = 0xE0;
const LAST_ORPHAN: usize = 0xE8;
const HASH_SEED: usize = 0xEC;
const DEF_HASH_VERSION: usize = 0xFC;
const JNL_BACKUP_TYPE: usize = 0xFD;
const DESC_SIZE: usize = 0xFE;
const DEFAULT_MOUNT_OPTS: usize = 0x100;
const FIRST_META_BG: usize = 0x104;
const MKFS_TIME: usize = 0x108;
const JNL_BLOCKS: usize = 0x10C;
const BLOCKS_COUNT_HI: usize = 0x150;
const R_BLOCKS_COUNT_HI: usize = 0x154;
const FREE_BLOCKS_COUNT_HI: usize = 0x158;
const MIN_EXTRA_ISIZE: usize = 0x15C;
const WANT_EXTRA_ISIZE: usize = 0x15E;
const FLAGS: usize = 0x160;
const LOG_GROUPS_PER_FLEX: usize = 0x174;
const CHECKSUM_TYPE: usize = 0x175;
const KBYTES_WRITTEN: usize = 0x178;
const OVERHEAD_CLUSTERS: usize = 0x248;
const CHECKSUM_SEED: usize = 0x270;
const ORPHAN_FILE_INUM: usize = 0x280;
const CHECKSUM: usize = 0x3FC;

pub mod compat {
    pub const DIR_PREALLOC: u32 = 0x1;
    pub const IMAGIC_INODES: u32 = 0x2;
    pub const HAS_JOURNAL: u32 = 0x4;
    pub const EXT_ATTR: u32 = 0x8;
    pub const RESIZE_INODE: u32 = 0x10;
    pub const DIR_INDEX: u32 = 0x20;
    pub const SPARSE_SUPER2: u32 = 0x200;
    pub const FAST_COMMIT: u32 = 0x400;
    pub const STABLE_INODES: u32 = 0x800;
    pub const ORPHAN_FILE: u32 = 0x1000;
}

pub mod incompat {
    pub const COMPRESSION: u32 = 0x1;
    pub const FILETYPE: u32 = 0x2;
    pub const RECOVER: u32 = 0x4;
    pub const JOURNAL_DEV: u32 = 0x8;
    pub const META_BG: u32 = 0x10;
    pub const EXTENTS: u32 = 0x40;
    pub const BIT64: u32 = 0x80;
    pub const MMP: u32 = 0x100;
    pub const FLEX_BG: u32 = 0x200;
    pub const EA_INODE: u32 = 0x400;
    pub const DIRDATA: u32 = 0x1000;
    pub const CSUM_SEED: u32 = 0x2000;
    pub const LARGEDIR: u32 = 0x4000;
    pub const INLINE_DATA: u32 = 0x8000;
    pub const ENCRYPT: u32 = 0x10000;
    pub const CASEFOLD: u32 = 0x20000;

    /// Incompatible features folio reads and writes.
    pub const SUPPORTED: u32 = FILETYPE
        | RECOVER
        | META_BG
        | EXTENTS
        | BIT64
        | MMP
        | FLEX_BG
        | EA_INODE
        | INLINE_DATA
        // Without keys: see `fscrypt.rs`.
        | ENCRYPT
        | CSUM_SEED
        | LARGEDIR;

    pub const NAMES: &[(u32, &str)] = &[
        (COMPRESSION, "compression"),
        (FILETYPE, "filetype"),
        (RECOVER, "needs_recovery"),
        (JOURNAL_DEV, "journal_dev"),
        (META_BG, "meta_bg"),
        (EXTENTS, "extent"),
        (BIT64, "64bit"),
        (MMP, "mmp"),
        (FLEX_BG, "flex_bg"),
        (EA_INODE, "ea_inode"),
        (DIRDATA, "dirdata"),
        (CSUM_SEED, "metadata_csum_seed"),
        (LARGEDIR, "large_dir"),
        (INLINE_DATA, "inline_data"),
        (ENCRYPT, "encrypt"),
        (CASEFOLD, "casefold"),
    ];
}

pub mod ro_compat {
    pub const SPARSE_SUPER: u32 = 0x1;
    pub const LARGE_FILE: u32 = 0x2;
    pub const BTREE_DIR: u32 = 0x4;
    pub const HUGE_FILE: u32 = 0x8;
    pub const GDT_CSUM: u32 = 0x10;
    pub const DIR_NLINK: u32 = 0x20;
    pub const EXTRA_ISIZE: u32 = 0x40;
    pub const HAS_SNAPSHOT: u32 = 0x80;
    pub const QUOTA: u32 = 0x100;
    pub const BIGALLOC: u32 = 0x200;
    pub const METADATA_CSUM: u32 = 0x400;
    pub const REPLICA: u32 = 0x800;
    pub const READONLY: u32 = 0x1000;
    pub const PROJECT: u32 = 0x2000;
    pub const SHARED_BLOCKS: u32 = 0x4000;
    pub const VERITY: u32 = 0x8000;
    pub const ORPHAN_PRESENT: u32 = 0x10000;

    /// Read-only-compatible features folio keeps consistent when writing.
    pub const SUPPORTED: u32 = SPARSE_SUPER | LARGE_FILE | HUGE_FILE | GDT_CSUM | DIR_NLINK | EXTRA_ISIZE | METADATA_CSUM
        // Reads verified, files immutable, enable: `verity.rs`.
        | VERITY
        // Processed at a read-write open (`process_orphan_file`).
        | ORPHAN_PRESENT;

    pub const NAMES: &[(u32, &str)] = &[
        (SPARSE_SUPER, "sparse_super"),
        (LARGE_FILE, "large_file"),
        (BTREE_DIR, "btree_dir"),
        (HUGE_FILE, "huge_file"),
        (GDT_CSUM, "uninit_bg"),
        (DIR_NLINK, "dir_nlink"),
        (EXTRA_ISIZE, "extra_isize"),
        (HAS_SNAPSHOT, "snapshot"),
        (QUOTA, "quota"),
        (BIGALLOC, "bigalloc"),
        (METADATA_CSUM, "metadata_csum"),
        (REPLICA, "replica"),
        (READONLY, "read-only"),
        (PROJECT, "project"),
        (SHARED_BLOCKS, "shared_blocks"),
        (VERITY, "verity"),
        (ORPHAN_PRESENT, "orphan_present"),
    ];
}

/// Names of the bits of `mask` per `names`, unknown bits as `FEATURE_X0xN`.
pub fn feature_names(mask: u32, names: &[(u32, &str)], prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for bit in 0..32 {
        let b = 1u32 << bit;
        if mask & b == 0 {
            continue;
        }
        match names.iter().find(|(v, _)| *v == b) {
            Some((_, n)) => out.push((*n).to_string()),
            None => out.push(format!("FEATURE_{prefix}{bit}")),
        }
    }
    out
}

/// `s_flags` bits.
pub const FLAG_SIGNED_HASH: u32 = 0x1;
pub const FLAG_UNSIGNED_HASH: u32 = 0x2;

/// `s_state` bits.
pub const STATE_VALID: u16 = 0x1;
pub const STATE_ERROR: u16 = 0x2;

/// The superblock, kept as its raw bytes.
#[derive(Clone)]
pub struct Superblock {
    pub raw: [u8; SUPERBLOCK_SIZE],
}

macro_rules! field32 {
    ($get:ident, $set:ident, $off:expr) => {
        pub fn $get(&self) -> u32 {
            le32(&self.raw, $off)
        }
        pub fn $set(&mut self, v: u32) {
            put32(&mut self.raw, $off, v)
        }
    };
}

macro_rules! field16 {
    ($get:ident, $set:ident, $off:expr) => {
        pub fn $get(&self) -> u16 {
            le16(&self.raw, $off)
        }
        pub fn $set(&mut self, v: u16) {
            put16(&mut self.raw, $off, v)
        }
    };
}

impl Superblock {
    pub fn zeroed() -> Self {
        Superblock {
            raw: [0; SUPERBLOCK_SIZE],
        }
    }

    /// Wrap raw bytes; `None` if fewer than 1024.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let raw: [u8; SUPERBLOCK_SIZE] = b.get(..SUPERBLOCK_SIZE)?.try_into().ok()?;
        Some(Superblock { raw })
    }

    field32!(inodes_count, set_inodes_count, INODES_COUNT);
    field32!(free_inodes_count, set_free_inodes_count, FREE_INODES_COUNT);
    field32!(first_data_block, set_first_data_block, FIRST_DATA_BLOCK);
    field32!(log_block_size, set_log_block_size, LOG_BLOCK_SIZE);
    field32!(log_cluster_size, set_log_cluster_size, LOG_CLUSTER_SIZE);
    field32!(blocks_per_group, set_blocks_per_group, BLOCKS_PER_GROUP);
    field32!(
        clusters_per_group,
        set_clusters_per_group,
        CLUSTERS_PER_GROUP
    );
    field32!(inodes_per_group, set_inodes_per_group, INODES_PER_GROUP);
    field32!(mtime, set_mtime, MTIME);
    field32!(wtime, set_wtime, WTIME);
    field16!(max_mnt_count, set_max_mnt_count, MAX_MNT_COUNT);
    field16!(magic, set_magic, MAGIC_OFF);
    field16!(state, set_state, STATE);
    field16!(errors, set_errors, ERRORS);
    field32!(lastcheck, set_lastcheck, LASTCHECK);
    field32!(creator_os, set_creator_os, CREATOR_OS);
    field32!(rev_level, set_rev_level, REV_LEVEL);
    field32!(first_ino_raw, set_first_ino, FIRST_INO);
    field16!(inode_size_raw, set_inode_size, INODE_SIZE);
    field32!(feature_compat, set_feature_compat, FEATURE_COMPAT);
    field32!(feature_incompat, set_feature_incompat, FEATURE_INCOMPAT);
    field32!(feature_ro_compat, set_feature_ro_compat, FEATURE_RO_COMPAT);
    field16!(
        reserved_gdt_blocks,
        set_reserved_gdt_blocks,
        RESERVED_GDT_BLOCKS
    );
    field32!(journal_inum, set_journal_inum, JOURNAL_INUM);
    field32!(last_orphan, set_last_orphan, LAST_ORPHAN);
    field16!(desc_size_raw, set_desc_size, DESC_SIZE);
    field32!(
        default_mount_opts,
        set_default_mount_opts,
        DEFAULT_MOUNT_OPTS
    );
    field32!(first_meta_bg, set_first_meta_bg, FIRST_META_BG);
    field32!(mkfs_time, set_mkfs_time, MKFS_TIME);
    field16!(min_extra_isize, set_min_extra_isize, MIN_EXTRA_ISIZE);
    field16!(want_extra_isize, set_want_extra_isize, WANT_EXTRA_ISIZE);
    field32!(flags, set_flags, FLAGS);
    field32!(overhead_clusters, set_overhead_clusters, OVERHEAD_CLUSTERS);
    field32!(checksum_seed_raw, set_checksum_seed, CHECKSUM_SEED);
    field32!(orphan_file_inum, set_orphan_file_inum, ORPHAN_FILE_INUM);
    field32!(checksum, set_checksum, CHECKSUM);

    fn lohi(&self, lo: usize, hi: usize) -> u64 {
        let mut v = u64::from(le32(&self.raw, lo));
        if self.has_incompat(incompat::BIT64) {
            v |= u64::from(le32(&self.raw, hi)) << 32;
        }
        v
    }

    fn set_lohi(&mut self, lo: usize, hi: usize, v: u64) {
        put32(&mut self.raw, lo, v as u32);
        if self.has_incompat(incompat::BIT64) {
            put32(&mut self.raw, hi, (v >> 32) as u32);
        }
    }

    pub fn blocks_count(&self) -> u64 {
        self.lohi(BLOCKS_COUNT_LO, BLOCKS_COUNT_HI)
    }
    pub fn set_blocks_count(&mut self, v: u64) {
        self.set_lohi(BLOCKS_COUNT_LO, BLOCKS_COUNT_HI, v)
    }
    pub fn r_blocks_count(&self) -> u64 {
        self.lohi(R_BLOCKS_COUNT_LO, R_BLOCKS_COUNT_HI)
    }
    pub fn set_r_blocks_count(&mut self, v: u64) {
        self.set_lohi(R_BLOCKS_COUNT_LO, R_BLOCKS_COUNT_HI, v)
    }
    pub fn free_blocks_count(&self) -> u64 {
        self.lohi(FREE_BLOCKS_COUNT_LO, FREE_BLOCKS_COUNT_HI)
    }
    pub fn set_free_blocks_count(&mut self, v: u64) {
        self.set_lohi(FREE_BLOCKS_COUNT_LO, FREE_BLOCKS_COUNT_HI, v)
    }

    pub fn kbytes_written(&self) -> u64 {
        u64::from(le32(&self.raw, KBYTES_WRITTEN))
            | u64::from(le32(&self.raw, KBYTES_WRITTEN + 4)) << 32
    }
    pub fn set_kbytes_written(&mut self, v: u64) {
        put32(&mut self.raw, KBYTES_WRITTEN, v as u32);
        put32(&mut self.raw, KBYTES_WRITTEN + 4, (v >> 32) as u32);
    }

    pub fn has_compat(&self, f: u32) -> bool {
        self.feature_compat() & f != 0
    }
    pub fn has_incompat(&self, f: u32) -> bool {
        self.feature_incompat() & f != 0
    }
    pub fn has_ro_compat(&self, f: u32) -> bool {
        self.feature_ro_compat() & f != 0
    }

    pub fn uuid(&self) -> [u8; 16] {
        let mut u = [0; 16];
        u.copy_from_slice(&self.raw[UUID..UUID + 16]);
        u
    }
    pub fn set_uuid(&mut self, u: [u8; 16]) {
        self.raw[UUID..UUID + 16].copy_from_slice(&u);
    }

    pub fn volume_name(&self) -> String {
        let b = &self.raw[VOLUME_NAME..VOLUME_NAME + 16];
        let end = b.iter().position(|&c| c == 0).unwrap_or(16);
        String::from_utf8_lossy(&b[..end]).into_owned()
    }
    /// Set the label; at most 16 bytes are kept.
    pub fn set_volume_name(&mut self, name: &[u8]) {
        let b = &mut self.raw[VOLUME_NAME..VOLUME_NAME + 16];
        b.fill(0);
        let n = name.len().min(16);
        b[..n].copy_from_slice(&name[..n]);
    }

    pub fn hash_seed(&self) -> [u32; 4] {
        [0, 1, 2, 3].map(|i| le32(&self.raw, HASH_SEED + 4 * i))
    }
    pub fn set_hash_seed(&mut self, s: [u32; 4]) {
        for (i, v) in s.iter().enumerate() {
            put32(&mut self.raw, HASH_SEED + 4 * i, *v);
        }
    }
    pub fn def_hash_version(&self) -> u8 {
        self.raw[DEF_HASH_VERSION]
    }
    /// `s_encrypt_algos`: the encryption modes mke2fs records for
    /// `encrypt` (AES-256-XTS contents, AES-256-CTS names).
    pub fn set_encrypt_algos(&mut self, modes: [u8; 4]) {
        self.raw[0x254..0x258].copy_from_slice(&modes);
    }

    pub fn set_def_hash_version(&mut self, v: u8) {
        self.raw[DEF_HASH_VERSION] = v;
    }
    pub fn set_jnl_backup(&mut self, blocks: &[u32; 17]) {
        for (i, v) in blocks.iter().enumerate() {
            put32(&mut self.raw, JNL_BLOCKS + 4 * i, *v);
        }
        self.raw[JNL_BACKUP_TYPE] = 1; // EXT3_JNL_BACKUP_BLOCKS
    }
    /// `s_jnl_blocks`: a copy of the journal inode's i_block (15 words)
    /// and its size (hi, lo), kept so the journal can be found without
    /// the inode.
    pub fn jnl_blocks(&self) -> [u32; 17] {
        std::array::from_fn(|i| le32(&self.raw, JNL_BLOCKS + 4 * i))
    }
    pub fn jnl_backup_type(&self) -> u8 {
        self.raw[JNL_BACKUP_TYPE]
    }
    /// `s_block_group_nr`: which group's copy this is.
    pub fn block_group_nr(&self) -> u16 {
        le16(&self.raw, 0x5A)
    }

    pub fn log_groups_per_flex(&self) -> u8 {
        self.raw[LOG_GROUPS_PER_FLEX]
    }
    pub fn set_log_groups_per_flex(&mut self, v: u8) {
        self.raw[LOG_GROUPS_PER_FLEX] = v;
    }
    pub fn set_checksum_type(&mut self, v: u8) {
        self.raw[CHECKSUM_TYPE] = v;
    }

    /// Block size in bytes, or `None` if the field is out of ext4's range
    /// (1 KiB to 64 KiB).
    pub fn block_size(&self) -> Option<u32> {
        let l = self.log_block_size();
        (l <= 6).then(|| 1024u32 << l)
    }

    /// Inode size in bytes (128 on revision 0).
    pub fn inode_size(&self) -> u16 {
        if self.rev_level() == 0 {
            128
        } else {
            self.inode_size_raw()
        }
    }

    /// First non-reserved inode (11 on revision 0).
    pub fn first_ino(&self) -> u32 {
        if self.rev_level() == 0 {
            11
        } else {
            self.first_ino_raw()
        }
    }

    /// Group descriptor size in bytes: 32 unless 64bit.
    pub fn desc_size(&self) -> u16 {
        if self.has_incompat(incompat::BIT64) {
            self.desc_size_raw()
        } else {
            32
        }
    }

    pub fn metadata_csum(&self) -> bool {
        self.has_ro_compat(ro_compat::METADATA_CSUM)
    }

    /// The seed every metadata checksum starts from.
    pub fn csum_seed(&self) -> u32 {
        if self.has_incompat(incompat::CSUM_SEED) {
            self.checksum_seed_raw()
        } else {
            crc32c_raw(!0, &self.raw[UUID..UUID + 16])
        }
    }

    pub fn compute_checksum(&self) -> u32 {
        crc32c_raw(!0, &self.raw[..CHECKSUM])
    }

    pub fn update_checksum(&mut self) {
        if self.metadata_csum() {
            let c = self.compute_checksum();
            self.set_checksum(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut sb = Superblock::zeroed();
        sb.set_feature_incompat(incompat::BIT64);
        sb.set_blocks_count(0x1_2345_6789);
        sb.set_free_blocks_count(77);
        sb.set_volume_name(b"a-very-long-label-over-16");
        sb.set_log_block_size(2);
        let sb2 = Superblock::from_bytes(&sb.raw).unwrap();
        assert_eq!(sb2.blocks_count(), 0x1_2345_6789);
        assert_eq!(sb2.free_blocks_count(), 77);
        assert_eq!(sb2.volume_name(), "a-very-long-labe");
        assert_eq!(sb2.block_size(), Some(4096));
        assert_eq!(sb2.raw, sb.raw);
    }

    #[test]
    fn feature_names_name_unknown_bits() {
        let n = feature_names(incompat::INLINE_DATA | 0x8000_0000, incompat::NAMES, "I");
        assert_eq!(n, vec!["inline_data".to_string(), "FEATURE_I31".into()]);
    }
}
