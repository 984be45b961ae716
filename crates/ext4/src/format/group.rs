//! Block group descriptors (32 bytes, or `s_desc_size` with 64bit).

use super::{le16, le32, put16, put32};
use crate::csum::{crc16, crc32c_raw};

pub const BG_INODE_UNINIT: u16 = 0x1;
pub const BG_BLOCK_UNINIT: u16 = 0x2;
pub const BG_INODE_ZEROED: u16 = 0x4;

const BLOCK_BITMAP_LO: usize = 0x0;
const INODE_BITMAP_LO: usize = 0x4;
const INODE_TABLE_LO: usize = 0x8;
const FREE_BLOCKS_LO: usize = 0xC;
const FREE_INODES_LO: usize = 0xE;
const USED_DIRS_LO: usize = 0x10;
const FLAGS: usize = 0x12;
const BLOCK_BITMAP_CSUM_LO: usize = 0x18;
const INODE_BITMAP_CSUM_LO: usize = 0x1A;
const ITABLE_UNUSED_LO: usize = 0x1C;
const CHECKSUM: usize = 0x1E;
const BLOCK_BITMAP_HI: usize = 0x20;
const INODE_BITMAP_HI: usize = 0x24;
const INODE_TABLE_HI: usize = 0x28;
const FREE_BLOCKS_HI: usize = 0x2C;
const FREE_INODES_HI: usize = 0x2E;
const USED_DIRS_HI: usize = 0x30;
const ITABLE_UNUSED_HI: usize = 0x32;
const BLOCK_BITMAP_CSUM_HI: usize = 0x38;
const INODE_BITMAP_CSUM_HI: usize = 0x3A;

/// One group descriptor as raw bytes (32 or 64+ bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDesc {
    pub raw: Vec<u8>,
}

impl GroupDesc {
    pub fn new(desc_size: usize) -> Self {
        GroupDesc {
            raw: vec![0; desc_size],
        }
    }

    fn wide(&self) -> bool {
        self.raw.len() >= 64
    }

    fn get_lohi32(&self, lo: usize, hi: usize) -> u64 {
        let mut v = u64::from(le32(&self.raw, lo));
        if self.wide() {
            v |= u64::from(le32(&self.raw, hi)) << 32;
        }
        v
    }
    fn set_lohi32(&mut self, lo: usize, hi: usize, v: u64) {
        put32(&mut self.raw, lo, v as u32);
        if self.wide() {
            put32(&mut self.raw, hi, (v >> 32) as u32);
        }
    }
    fn get_lohi16(&self, lo: usize, hi: usize) -> u32 {
        let mut v = u32::from(le16(&self.raw, lo));
        if self.wide() {
            v |= u32::from(le16(&self.raw, hi)) << 16;
        }
        v
    }
    fn set_lohi16(&mut self, lo: usize, hi: usize, v: u32) {
        put16(&mut self.raw, lo, v as u16);
        if self.wide() {
            put16(&mut self.raw, hi, (v >> 16) as u16);
        }
    }

    pub fn block_bitmap(&self) -> u64 {
        self.get_lohi32(BLOCK_BITMAP_LO, BLOCK_BITMAP_HI)
    }
    pub fn set_block_bitmap(&mut self, v: u64) {
        self.set_lohi32(BLOCK_BITMAP_LO, BLOCK_BITMAP_HI, v)
    }
    pub fn inode_bitmap(&self) -> u64 {
        self.get_lohi32(INODE_BITMAP_LO, INODE_BITMAP_HI)
    }
    pub fn set_inode_bitmap(&mut self, v: u64) {
        self.set_lohi32(INODE_BITMAP_LO, INODE_BITMAP_HI, v)
    }
    pub fn inode_table(&self) -> u64 {
        self.get_lohi32(INODE_TABLE_LO, INODE_TABLE_HI)
    }
    pub fn set_inode_table(&mut self, v: u64) {
        self.set_lohi32(INODE_TABLE_LO, INODE_TABLE_HI, v)
    }
    pub fn free_blocks(&self) -> u32 {
        self.get_lohi16(FREE_BLOCKS_LO, FREE_BLOCKS_HI)
    }
    pub fn set_free_blocks(&mut self, v: u32) {
        self.set_lohi16(FREE_BLOCKS_LO, FREE_BLOCKS_HI, v)
    }
    pub fn free_inodes(&self) -> u32 {
        self.get_lohi16(FREE_INODES_LO, FREE_INODES_HI)
    }
    pub fn set_free_inodes(&mut self, v: u32) {
        self.set_lohi16(FREE_INODES_LO, FREE_INODES_HI, v)
    }
    pub fn used_dirs(&self) -> u32 {
        self.get_lohi16(USED_DIRS_LO, USED_DIRS_HI)
    }
    pub fn set_used_dirs(&mut self, v: u32) {
        self.set_lohi16(USED_DIRS_LO, USED_DIRS_HI, v)
    }
    pub fn itable_unused(&self) -> u32 {
        self.get_lohi16(ITABLE_UNUSED_LO, ITABLE_UNUSED_HI)
    }
    pub fn set_itable_unused(&mut self, v: u32) {
        self.set_lohi16(ITABLE_UNUSED_LO, ITABLE_UNUSED_HI, v)
    }
    pub fn flags(&self) -> u16 {
        le16(&self.raw, FLAGS)
    }
    pub fn set_flags(&mut self, v: u16) {
        put16(&mut self.raw, FLAGS, v)
    }
    pub fn checksum(&self) -> u16 {
        le16(&self.raw, CHECKSUM)
    }

    pub fn block_bitmap_csum(&self) -> u32 {
        self.get_lohi16(BLOCK_BITMAP_CSUM_LO, BLOCK_BITMAP_CSUM_HI)
    }
    pub fn set_block_bitmap_csum(&mut self, v: u32) {
        self.set_lohi16(BLOCK_BITMAP_CSUM_LO, BLOCK_BITMAP_CSUM_HI, v)
    }
    pub fn inode_bitmap_csum(&self) -> u32 {
        self.get_lohi16(INODE_BITMAP_CSUM_LO, INODE_BITMAP_CSUM_HI)
    }
    pub fn set_inode_bitmap_csum(&mut self, v: u32) {
        self.set_lohi16(INODE_BITMAP_CSUM_LO, INODE_BITMAP_CSUM_HI, v)
    }

    /// The descriptor checksum: crc32c (low 16 bits) with metadata_csum,
    /// crc16 with gdt_csum (uninit_bg). `uuid` is only used for crc16.
    pub fn compute_checksum(
        &self,
        group: u32,
        metadata_csum: bool,
        seed: u32,
        uuid: &[u8; 16],
    ) -> u16 {
        let g = group.to_le_bytes();
        if metadata_csum {
            let mut c = crc32c_raw(seed, &g);
            c = crc32c_raw(c, &self.raw[..CHECKSUM]);
            c = crc32c_raw(c, &[0, 0]);
            if self.raw.len() > CHECKSUM + 2 {
                c = crc32c_raw(c, &self.raw[CHECKSUM + 2..]);
            }
            (c & 0xFFFF) as u16
        } else {
            let mut c = crc16(!0, uuid);
            c = crc16(c, &g);
            c = crc16(c, &self.raw[..CHECKSUM]);
            if self.raw.len() > CHECKSUM + 2 {
                c = crc16(c, &self.raw[CHECKSUM + 2..]);
            }
            c
        }
    }

    pub fn set_checksum(&mut self, v: u16) {
        put16(&mut self.raw, CHECKSUM, v)
    }
}

/// Checksum of a block bitmap (`clusters_per_group / 8` bytes of it).
pub fn bitmap_csum(seed: u32, bitmap: &[u8]) -> u32 {
    crc32c_raw(seed, bitmap)
}
