//! jbd2 on-disk structures. Every integer is big-endian.

#![allow(clippy::big_endian_bytes)] // jbd2's on-disk format is big-endian

pub const MAGIC: u32 = 0xC03B_3998;
pub const DESCRIPTOR: u32 = 1;
pub const COMMIT: u32 = 2;
pub const SUPERBLOCK_V1: u32 = 3;
pub const SUPERBLOCK_V2: u32 = 4;
pub const REVOKE: u32 = 5;

pub const FLAG_ESCAPE: u32 = 1;
pub const FLAG_SAME_UUID: u32 = 2;
pub const FLAG_LAST_TAG: u32 = 8;

pub const COMPAT_CHECKSUM: u32 = 0x1;
pub const INCOMPAT_REVOKE: u32 = 0x1;
pub const INCOMPAT_64BIT: u32 = 0x2;
pub const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
pub const INCOMPAT_CSUM_V2: u32 = 0x8;
pub const INCOMPAT_CSUM_V3: u32 = 0x10;
pub const INCOMPAT_FAST_COMMIT: u32 = 0x20;
/// Incompatible journal features folio replays.
/// (Fast commit: its area is replayed by the filesystem, through
/// [`crate::Journal::fast_commit_area`]; folio never writes one.)
pub const INCOMPAT_SUPPORTED: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;
/// Fast-commit blocks when the superblock's count is 0 (jbd2's
/// `JBD2_DEFAULT_FAST_COMMIT_BLOCKS`).
pub const DEFAULT_FAST_COMMIT_BLOCKS: u32 = 256;
pub const CSUM_TYPE_CRC32C: u8 = 4;

pub const HEADER_LEN: usize = 12;
pub const UUID_LEN: usize = 16;
pub const TAIL_LEN: usize = 4;

pub fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

pub fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

pub fn put_be32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put_be16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Raw CRC32C update, as jbd2's `jbd2_chksum` computes it.
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// (magic ok, block type, sequence) of a block's header.
pub fn header(b: &[u8]) -> Option<(u32, u32)> {
    if be32(b, 0)? != MAGIC {
        return None;
    }
    Some((be32(b, 4)?, be32(b, 8)?))
}

pub fn write_header(b: &mut [u8], kind: u32, seq: u32) {
    put_be32(b, 0, MAGIC);
    put_be32(b, 4, kind);
    put_be32(b, 8, seq);
}

/// The journal superblock (first 1024 bytes of journal block 0).
#[derive(Clone)]
pub struct JSuperblock {
    pub raw: Vec<u8>,
}

macro_rules! jfield {
    ($get:ident, $set:ident, $off:expr) => {
        pub fn $get(&self) -> u32 {
            be32(&self.raw, $off).unwrap_or(0)
        }
        pub fn $set(&mut self, v: u32) {
            put_be32(&mut self.raw, $off, v)
        }
    };
}

impl JSuperblock {
    jfield!(blocktype, set_blocktype, 0x4);
    jfield!(block_size, set_block_size, 0xC);
    jfield!(maxlen, set_maxlen, 0x10);
    jfield!(first, set_first, 0x14);
    jfield!(sequence, set_sequence, 0x18);
    jfield!(start, set_start, 0x1C);
    jfield!(errno, set_errno, 0x20);
    jfield!(feature_compat, set_feature_compat, 0x24);
    jfield!(feature_incompat, set_feature_incompat, 0x28);
    jfield!(feature_ro_compat, set_feature_ro_compat, 0x2C);
    jfield!(nr_users, set_nr_users, 0x40);
    jfield!(checksum, set_checksum, 0xFC);

    pub fn magic(&self) -> u32 {
        be32(&self.raw, 0).unwrap_or(0)
    }
    pub fn uuid(&self) -> [u8; 16] {
        let mut u = [0; 16];
        u.copy_from_slice(&self.raw[0x30..0x40]);
        u
    }
    pub fn checksum_type(&self) -> u8 {
        self.raw[0x50]
    }
    pub fn set_checksum_type(&mut self, t: u8) {
        self.raw[0x50] = t;
    }
    /// Blocks at the end of the journal kept for fast commits
    /// (`s_num_fc_blks`), 0 without the fast-commit feature.
    pub fn fast_commit_blocks(&self) -> u32 {
        // Feature words exist only in v2 superblocks: a v1 one whose
        // bytes there happen to set the bit has no area (and open checks
        // the area leaves room for the log whatever the version).
        if self.blocktype() != SUPERBLOCK_V2 || !self.has_incompat(INCOMPAT_FAST_COMMIT) {
            return 0;
        }
        match be32(&self.raw, 0x54).unwrap_or(0) {
            0 => DEFAULT_FAST_COMMIT_BLOCKS,
            n => n,
        }
    }
    /// End of the circular log (exclusive): `s_maxlen`, less the
    /// fast-commit area when there is one (jbd2's `j_last`). The area
    /// itself starts one block further, at `log_end() + 1`, as jbd2 lays
    /// it out.
    pub fn log_end(&self) -> u32 {
        self.maxlen().saturating_sub(self.fast_commit_blocks())
    }
    pub fn has_incompat(&self, f: u32) -> bool {
        self.feature_incompat() & f != 0
    }
    pub fn csum_v2or3(&self) -> bool {
        self.has_incompat(INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3)
    }
    /// Seed of every journal checksum: crc32c(~0, uuid).
    pub fn csum_seed(&self) -> u32 {
        crc32c_raw(!0, &self.raw[0x30..0x40])
    }
    pub fn compute_checksum(&self) -> u32 {
        let mut copy = self.raw[..1024].to_vec();
        put_be32(&mut copy, 0xFC, 0);
        crc32c_raw(!0, &copy)
    }
    pub fn update_checksum(&mut self) {
        if self.csum_v2or3() {
            let c = self.compute_checksum();
            self.set_checksum(c);
        }
    }
    /// Bytes of one block tag (without the UUID that may follow it).
    pub fn tag_bytes(&self) -> usize {
        if self.has_incompat(INCOMPAT_CSUM_V3) {
            return 16;
        }
        let mut sz = 12;
        if self.has_incompat(INCOMPAT_CSUM_V2) {
            sz += 2;
        }
        if self.has_incompat(INCOMPAT_64BIT) {
            sz
        } else {
            sz - 4
        }
    }
}

/// One tag of a descriptor block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub blocknr: u64,
    pub flags: u32,
    pub checksum: u32,
}

/// Parse the tags of a descriptor block. `None` if they run off the block.
pub fn parse_tags(b: &[u8], sb: &JSuperblock) -> Option<Vec<Tag>> {
    let tb = sb.tag_bytes();
    let end = b.len() - if sb.csum_v2or3() { TAIL_LEN } else { 0 };
    let v3 = sb.has_incompat(INCOMPAT_CSUM_V3);
    let bit64 = sb.has_incompat(INCOMPAT_64BIT);
    let mut off = HEADER_LEN;
    let mut tags = Vec::new();
    while off + tb <= end {
        let lo = u64::from(be32(b, off)?);
        let (flags, checksum, hi) = if v3 {
            (be32(b, off + 4)?, be32(b, off + 12)?, be32(b, off + 8)?)
        } else {
            let csum = if sb.has_incompat(INCOMPAT_CSUM_V2) {
                u32::from(be16(b, off + 4)?)
            } else {
                0
            };
            let hi = if bit64 { be32(b, off + 8)? } else { 0 };
            (u32::from(be16(b, off + 6)?), csum, hi)
        };
        let blocknr = if bit64 { lo | u64::from(hi) << 32 } else { lo };
        tags.push(Tag {
            blocknr,
            flags,
            checksum,
        });
        off += tb;
        if flags & FLAG_SAME_UUID == 0 {
            off += UUID_LEN;
        }
        if flags & FLAG_LAST_TAG != 0 {
            return Some(tags);
        }
    }
    // No LAST_TAG: the block is full of tags (allowed) or garbage; the
    // caller's checksums decide.
    Some(tags)
}

/// Write a tag at `off`.
pub fn write_tag(b: &mut [u8], off: usize, sb: &JSuperblock, t: &Tag) {
    let v3 = sb.has_incompat(INCOMPAT_CSUM_V3);
    put_be32(b, off, t.blocknr as u32);
    if v3 {
        put_be32(b, off + 4, t.flags);
        put_be32(b, off + 8, (t.blocknr >> 32) as u32);
        put_be32(b, off + 12, t.checksum);
    } else {
        put_be16(b, off + 4, t.checksum as u16);
        put_be16(b, off + 6, t.flags as u16);
        if sb.has_incompat(INCOMPAT_64BIT) {
            put_be32(b, off + 8, (t.blocknr >> 32) as u32);
        }
    }
}

/// Checksum of a descriptor or revoke block (tail zeroed).
pub fn block_tail_csum(seed: u32, b: &[u8]) -> u32 {
    let n = b.len() - TAIL_LEN;
    let c = crc32c_raw(seed, &b[..n]);
    crc32c_raw(c, &[0; TAIL_LEN])
}

/// Checksum of a journalled copy of a block in transaction `seq`.
pub fn data_csum(seed: u32, seq: u32, data: &[u8]) -> u32 {
    let c = crc32c_raw(seed, &seq.to_be_bytes());
    crc32c_raw(c, data)
}

/// Checksum of a commit block (its h_chksum[0] as zero).
pub fn commit_csum(seed: u32, b: &[u8]) -> u32 {
    let mut copy = b.to_vec();
    put_be32(&mut copy, 0x10, 0);
    crc32c_raw(seed, &copy)
}
