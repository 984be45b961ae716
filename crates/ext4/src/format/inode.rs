//! On-disk inodes (`s_inode_size` bytes, 128 or more).

use super::{le16, le32, put16, put32, Timespec};
use crate::csum::crc32c_raw;

pub const ROOT_INO: u32 = 2;
pub const RESIZE_INO: u32 = 7;
pub const JOURNAL_INO: u32 = 8;
pub const LOST_FOUND_INO_DEFAULT: u32 = 11;

pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFIFO: u16 = 0o010000;

/// `i_flags` bits.
/// chattr +i: no change at all.
pub const FL_IMMUTABLE: u32 = 0x10;
/// chattr +a: data may only be appended; no other change.
pub const FL_APPEND: u32 = 0x20;
/// The flags FS_IOC_GETFLAGS shows (ext4's EXT4_FL_USER_VISIBLE).
pub const FL_USER_VISIBLE: u32 = 0x705B_DFFF;
/// The flags FS_IOC_SETFLAGS may change on ext4 (EXT4_FL_USER_MODIFIABLE).
pub const FL_USER_MODIFIABLE: u32 = 0x604B_C0FF;
/// Of those, the ones folio honours (or, like ext4, ignores): secure
/// deletion, undelete and compression (ignored by ext4 too), immutable,
/// append-only, no-dump, no-atime, no-tail and top-directory. The others
/// (synchronous updates and directory sync, data journalling, extent
/// migration, casefold, project inheritance) are refused rather than
/// stored and not honoured.
pub const FL_FOLIO_SETTABLE: u32 = 0x1 | 0x2 | 0x4 | 0x10 | 0x20 | 0x40 | 0x80 | 0x8000 | 0x2_0000;
pub const FL_INDEX: u32 = 0x1000;
pub const FL_HUGE_FILE: u32 = 0x40000;
pub const FL_EXTENTS: u32 = 0x80000;
pub const FL_EA_INODE: u32 = 0x200000;
pub const FL_INLINE_DATA: u32 = 0x1000_0000;

const MODE: usize = 0x0;
const UID: usize = 0x2;
const SIZE_LO: usize = 0x4;
const ATIME: usize = 0x8;
const CTIME: usize = 0xC;
const MTIME: usize = 0x10;
const DTIME: usize = 0x14;
const GID: usize = 0x18;
const LINKS: usize = 0x1A;
const BLOCKS_LO: usize = 0x1C;
const FLAGS: usize = 0x20;
/// osd1: i_version on Linux.
const OSD1: usize = 0x24;
pub const BLOCK: usize = 0x28;
pub const BLOCK_LEN: usize = 60;
const GENERATION: usize = 0x64;
const FILE_ACL_LO: usize = 0x68;
const SIZE_HI: usize = 0x6C;
const BLOCKS_HI: usize = 0x74;
const FILE_ACL_HI: usize = 0x76;
const UID_HI: usize = 0x78;
const GID_HI: usize = 0x7A;
const CHECKSUM_LO: usize = 0x7C;
pub const GOOD_OLD_SIZE: usize = 128;
const EXTRA_ISIZE: usize = 0x80;
const CHECKSUM_HI: usize = 0x82;
const CTIME_EXTRA: usize = 0x84;
const MTIME_EXTRA: usize = 0x88;
const ATIME_EXTRA: usize = 0x8C;
const CRTIME: usize = 0x90;
const CRTIME_EXTRA: usize = 0x94;

/// File type, from the mode bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
    Unknown,
}

impl FileType {
    pub fn from_mode(mode: u16) -> Self {
        match mode & S_IFMT {
            S_IFREG => FileType::Regular,
            S_IFDIR => FileType::Directory,
            S_IFLNK => FileType::Symlink,
            S_IFCHR => FileType::CharDev,
            S_IFBLK => FileType::BlockDev,
            S_IFIFO => FileType::Fifo,
            S_IFSOCK => FileType::Socket,
            _ => FileType::Unknown,
        }
    }

    /// The directory entry file_type code.
    pub fn dirent_code(self) -> u8 {
        match self {
            FileType::Unknown => 0,
            FileType::Regular => 1,
            FileType::Directory => 2,
            FileType::CharDev => 3,
            FileType::BlockDev => 4,
            FileType::Fifo => 5,
            FileType::Socket => 6,
            FileType::Symlink => 7,
        }
    }

    pub fn from_dirent_code(c: u8) -> Self {
        match c {
            1 => FileType::Regular,
            2 => FileType::Directory,
            3 => FileType::CharDev,
            4 => FileType::BlockDev,
            5 => FileType::Fifo,
            6 => FileType::Socket,
            7 => FileType::Symlink,
            _ => FileType::Unknown,
        }
    }
}

/// An inode as raw bytes plus its number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u32,
    pub raw: Vec<u8>,
}

fn decode_time(sec: u32, extra: Option<u32>) -> Timespec {
    let base = i64::from(sec as i32);
    match extra {
        Some(x) => Timespec {
            sec: base + (i64::from(x & 3) << 32),
            nsec: (x >> 2).min(999_999_999),
        },
        None => Timespec { sec: base, nsec: 0 },
    }
}

fn encode_time(t: Timespec) -> (u32, u32) {
    let lo = t.sec as i32;
    let epoch = ((t.sec - i64::from(lo)) >> 32) as u32 & 3;
    (lo as u32, epoch | (t.nsec.min(999_999_999) << 2))
}

impl Inode {
    /// A zeroed inode of `size` bytes with `i_extra_isize` set to `extra`
    /// (when the inode is large enough to have the field).
    pub fn new(ino: u32, size: usize, extra: u16) -> Self {
        let mut i = Inode {
            ino,
            raw: vec![0; size],
        };
        if size > GOOD_OLD_SIZE {
            put16(&mut i.raw, EXTRA_ISIZE, extra);
        }
        i
    }

    pub fn mode(&self) -> u16 {
        le16(&self.raw, MODE)
    }
    pub fn set_mode(&mut self, m: u16) {
        put16(&mut self.raw, MODE, m)
    }
    pub fn file_type(&self) -> FileType {
        FileType::from_mode(self.mode())
    }
    pub fn is_dir(&self) -> bool {
        self.mode() & S_IFMT == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.mode() & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode() & S_IFMT == S_IFLNK
    }
    pub fn uid(&self) -> u32 {
        u32::from(le16(&self.raw, UID)) | u32::from(le16(&self.raw, UID_HI)) << 16
    }
    pub fn set_uid(&mut self, v: u32) {
        put16(&mut self.raw, UID, v as u16);
        put16(&mut self.raw, UID_HI, (v >> 16) as u16);
    }
    pub fn gid(&self) -> u32 {
        u32::from(le16(&self.raw, GID)) | u32::from(le16(&self.raw, GID_HI)) << 16
    }
    pub fn set_gid(&mut self, v: u32) {
        put16(&mut self.raw, GID, v as u16);
        put16(&mut self.raw, GID_HI, (v >> 16) as u16);
    }
    pub fn size(&self) -> u64 {
        u64::from(le32(&self.raw, SIZE_LO)) | u64::from(le32(&self.raw, SIZE_HI)) << 32
    }
    pub fn set_size(&mut self, v: u64) {
        put32(&mut self.raw, SIZE_LO, v as u32);
        put32(&mut self.raw, SIZE_HI, (v >> 32) as u32);
    }
    pub fn links(&self) -> u16 {
        le16(&self.raw, LINKS)
    }
    pub fn set_links(&mut self, v: u16) {
        put16(&mut self.raw, LINKS, v)
    }
    pub fn flags(&self) -> u32 {
        le32(&self.raw, FLAGS)
    }
    pub fn set_flags(&mut self, v: u32) {
        put32(&mut self.raw, FLAGS, v)
    }
    pub fn generation(&self) -> u32 {
        le32(&self.raw, GENERATION)
    }
    pub fn set_generation(&mut self, v: u32) {
        put32(&mut self.raw, GENERATION, v)
    }
    pub fn dtime(&self) -> u32 {
        le32(&self.raw, DTIME)
    }
    pub fn set_dtime(&mut self, v: u32) {
        put32(&mut self.raw, DTIME, v)
    }
    /// The xattr block, 0 if none.
    pub fn file_acl(&self) -> u64 {
        u64::from(le32(&self.raw, FILE_ACL_LO)) | u64::from(le16(&self.raw, FILE_ACL_HI)) << 32
    }
    pub fn set_file_acl(&mut self, v: u64) {
        put32(&mut self.raw, FILE_ACL_LO, v as u32);
        put16(&mut self.raw, FILE_ACL_HI, (v >> 32) as u16);
    }

    /// `i_blocks` in 512-byte sectors, taking HUGE_FILE (fs-block units)
    /// into account. `block_size` is the filesystem block size.
    pub fn blocks_512(&self, huge_file_feature: bool, block_size: u32) -> u64 {
        let mut v = u64::from(le32(&self.raw, BLOCKS_LO));
        if huge_file_feature {
            v |= u64::from(le16(&self.raw, BLOCKS_HI)) << 32;
            if self.flags() & FL_HUGE_FILE != 0 {
                v *= u64::from(block_size / 512);
            }
        }
        v
    }
    /// Store `i_blocks` in 512-byte units (48 bits; callers check range).
    pub fn set_blocks_512(&mut self, v: u64) {
        put32(&mut self.raw, BLOCKS_LO, v as u32);
        put16(&mut self.raw, BLOCKS_HI, (v >> 32) as u16);
        let f = self.flags() & !FL_HUGE_FILE;
        self.set_flags(f);
    }

    pub fn i_block(&self) -> &[u8] {
        &self.raw[BLOCK..BLOCK + BLOCK_LEN]
    }
    pub fn i_block_mut(&mut self) -> &mut [u8] {
        &mut self.raw[BLOCK..BLOCK + BLOCK_LEN]
    }

    /// `i_extra_isize`, 0 for 128-byte inodes.
    pub fn extra_isize(&self) -> usize {
        if self.raw.len() > GOOD_OLD_SIZE {
            usize::from(le16(&self.raw, EXTRA_ISIZE))
        } else {
            0
        }
    }

    fn has_extra(&self, field_end: usize) -> bool {
        GOOD_OLD_SIZE + self.extra_isize() >= field_end && self.raw.len() >= field_end
    }

    pub fn atime(&self) -> Timespec {
        let ex = self
            .has_extra(ATIME_EXTRA + 4)
            .then(|| le32(&self.raw, ATIME_EXTRA));
        decode_time(le32(&self.raw, ATIME), ex)
    }
    pub fn mtime(&self) -> Timespec {
        let ex = self
            .has_extra(MTIME_EXTRA + 4)
            .then(|| le32(&self.raw, MTIME_EXTRA));
        decode_time(le32(&self.raw, MTIME), ex)
    }
    pub fn ctime(&self) -> Timespec {
        let ex = self
            .has_extra(CTIME_EXTRA + 4)
            .then(|| le32(&self.raw, CTIME_EXTRA));
        decode_time(le32(&self.raw, CTIME), ex)
    }
    /// Creation time, if the inode has room for it.
    pub fn crtime(&self) -> Option<Timespec> {
        if !self.has_extra(CRTIME_EXTRA + 4) {
            return None;
        }
        Some(decode_time(
            le32(&self.raw, CRTIME),
            Some(le32(&self.raw, CRTIME_EXTRA)),
        ))
    }

    fn set_time(&mut self, base: usize, extra: usize, t: Timespec) {
        let (lo, ex) = encode_time(t);
        put32(&mut self.raw, base, lo);
        if self.has_extra(extra + 4) {
            put32(&mut self.raw, extra, ex);
        }
    }
    pub fn set_atime(&mut self, t: Timespec) {
        self.set_time(ATIME, ATIME_EXTRA, t)
    }
    pub fn set_mtime(&mut self, t: Timespec) {
        self.set_time(MTIME, MTIME_EXTRA, t)
    }
    pub fn set_ctime(&mut self, t: Timespec) {
        self.set_time(CTIME, CTIME_EXTRA, t)
    }
    pub fn set_crtime(&mut self, t: Timespec) {
        if self.has_extra(CRTIME_EXTRA + 4) {
            self.set_time(CRTIME, CRTIME_EXTRA, t)
        }
    }

    /// An EA inode's value hash (ea_inode: kept where i_atime is).
    pub fn ea_hash(&self) -> u32 {
        le32(&self.raw, ATIME)
    }
    pub fn set_ea_hash(&mut self, hash: u32) {
        self.set_time(ATIME, ATIME_EXTRA, Timespec { sec: 0, nsec: 0 });
        put32(&mut self.raw, ATIME, hash);
    }
    /// An EA inode's reference count: i_ctime holds its high 32 bits and
    /// i_version (osd1) its low ones, as the kernel and e2fsprogs keep it.
    pub fn ea_refs(&self) -> u64 {
        (u64::from(le32(&self.raw, CTIME)) << 32) | u64::from(le32(&self.raw, OSD1))
    }
    pub fn set_ea_refs(&mut self, refs: u64) {
        self.set_time(CTIME, CTIME_EXTRA, Timespec { sec: 0, nsec: 0 });
        put32(&mut self.raw, CTIME, (refs >> 32) as u32);
        put32(&mut self.raw, OSD1, refs as u32);
    }

    /// Per-inode checksum seed: crc32c(fs seed, ino, generation).
    pub fn csum_seed(&self, fs_seed: u32) -> u32 {
        let c = crc32c_raw(fs_seed, &self.ino.to_le_bytes());
        crc32c_raw(c, &self.generation().to_le_bytes())
    }

    fn has_csum_hi(&self) -> bool {
        self.has_extra(CHECKSUM_HI + 2)
    }

    /// The metadata_csum inode checksum (32 bits, or 16 in small inodes).
    pub fn compute_checksum(&self, fs_seed: u32) -> u32 {
        let seed = self.csum_seed(fs_seed);
        let mut c = crc32c_raw(seed, &self.raw[..CHECKSUM_LO]);
        c = crc32c_raw(c, &[0, 0]);
        c = crc32c_raw(c, &self.raw[CHECKSUM_LO + 2..GOOD_OLD_SIZE]);
        if self.raw.len() > GOOD_OLD_SIZE {
            if self.has_csum_hi() {
                c = crc32c_raw(c, &self.raw[GOOD_OLD_SIZE..CHECKSUM_HI]);
                c = crc32c_raw(c, &[0, 0]);
                c = crc32c_raw(c, &self.raw[CHECKSUM_HI + 2..]);
            } else {
                c = crc32c_raw(c, &self.raw[GOOD_OLD_SIZE..]);
            }
        }
        if self.has_csum_hi() {
            c
        } else {
            c & 0xFFFF
        }
    }

    pub fn stored_checksum(&self) -> u32 {
        let mut v = u32::from(le16(&self.raw, CHECKSUM_LO));
        if self.has_csum_hi() {
            v |= u32::from(le16(&self.raw, CHECKSUM_HI)) << 16;
        }
        v
    }

    pub fn update_checksum(&mut self, fs_seed: u32) {
        let c = self.compute_checksum(fs_seed);
        put16(&mut self.raw, CHECKSUM_LO, c as u16);
        if self.has_csum_hi() {
            put16(&mut self.raw, CHECKSUM_HI, (c >> 16) as u16);
        }
    }

    /// True if every byte is zero (a never-used inode slot).
    pub fn is_all_zero(&self) -> bool {
        self.raw.iter().all(|&b| b == 0)
    }

    /// Offset of the in-inode xattr area (after the extra fields), if the
    /// inode has one.
    pub fn inline_xattr_offset(&self) -> Option<usize> {
        let off = GOOD_OLD_SIZE + self.extra_isize();
        (self.raw.len() > GOOD_OLD_SIZE && off + 4 <= self.raw.len() && off.is_multiple_of(4))
            .then_some(off)
    }

    /// Device number stored in i_block for device nodes (new encoding in
    /// i_block[1] when the old one does not fit, as Linux does).
    pub fn rdev(&self) -> (u32, u32) {
        let b0 = le32(&self.raw, BLOCK);
        if b0 != 0 {
            ((b0 >> 8) & 0xff, b0 & 0xff)
        } else {
            let d = le32(&self.raw, BLOCK + 4);
            ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00))
        }
    }
    pub fn set_rdev(&mut self, major: u32, minor: u32) {
        if major < 256 && minor < 256 {
            put32(&mut self.raw, BLOCK, (major << 8) | minor);
            put32(&mut self.raw, BLOCK + 4, 0);
        } else {
            put32(&mut self.raw, BLOCK, 0);
            let d = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
            put32(&mut self.raw, BLOCK + 4, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_including_past_2038_and_before_1970() {
        let mut i = Inode::new(12, 256, 32);
        for t in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timespec { sec: -1, nsec: 5 },
            Timespec {
                sec: 3_000_000_000,
                nsec: 999_999_999,
            },
        ] {
            i.set_mtime(t);
            assert_eq!(i.mtime(), t);
            i.set_crtime(t);
            assert_eq!(i.crtime(), Some(t));
        }
    }

    #[test]
    fn checksum_changes_with_content_and_verifies() {
        let mut i = Inode::new(12, 256, 32);
        i.set_mode(S_IFREG | 0o644);
        i.update_checksum(0x1234);
        assert_eq!(i.stored_checksum(), i.compute_checksum(0x1234));
        i.set_size(5);
        assert_ne!(i.stored_checksum(), i.compute_checksum(0x1234));
    }

    #[test]
    fn rdev_encodings() {
        let mut i = Inode::new(12, 256, 32);
        for (ma, mi) in [(1, 3), (8, 0), (259, 70000), (4095, 255)] {
            i.set_rdev(ma, mi);
            assert_eq!(i.rdev(), (ma, mi));
        }
    }
}
