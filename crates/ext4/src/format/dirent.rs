//! Directory blocks: linear entries (`ext4_dir_entry_2`), the 12-byte
//! checksum tail, and htree (dx) root and node blocks.

use super::{get16, get32, put16, put32};
use crate::csum::crc32c_raw;

pub const ENTRY_HEADER: usize = 8;
pub const TAIL_LEN: usize = 12;
const TAIL_FT: u8 = 0xDE;
pub const NAME_MAX: usize = 255;

/// Bytes an entry with a `name_len`-byte name needs (4-byte aligned).
pub fn entry_len(name_len: usize) -> usize {
    (ENTRY_HEADER + name_len + 3) & !3
}

/// Decode `rec_len` as stored (64 KiB blocks need the special encoding).
pub fn rec_len_from_disk(v: u16, block_size: usize) -> usize {
    let v = usize::from(v);
    if block_size < 65536 {
        return v;
    }
    if v == 65535 || v == 0 {
        return block_size;
    }
    (v & 65532) | ((v & 3) << 16)
}

/// Encode `len` for storage.
pub fn rec_len_to_disk(len: usize, block_size: usize) -> u16 {
    if len < 65536 {
        return len as u16;
    }
    if len == block_size {
        return if block_size == 65536 { 65535 } else { 0 };
    }
    ((len & 65532) | ((len >> 16) & 3)) as u16
}

/// One entry as found in a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry {
    /// Byte offset of the entry in its block.
    pub offset: usize,
    pub inode: u32,
    pub rec_len: usize,
    pub file_type: u8,
    pub name: Vec<u8>,
}

/// True if the block ends with a valid-looking checksum tail.
pub fn has_tail(block: &[u8]) -> bool {
    let t = block.len() - TAIL_LEN;
    get32(block, t) == Some(0)
        && get16(block, t + 4) == Some(TAIL_LEN as u16)
        && block.get(t + 6) == Some(&0)
        && block.get(t + 7) == Some(&TAIL_FT)
}

/// Write a checksum tail with checksum `csum` into the last 12 bytes.
pub fn write_tail(block: &mut [u8], csum: u32) {
    let t = block.len() - TAIL_LEN;
    block[t..].fill(0);
    put16(block, t + 4, TAIL_LEN as u16);
    block[t + 7] = TAIL_FT;
    put32(block, t + 8, csum);
}

pub fn tail_csum_stored(block: &[u8]) -> u32 {
    get32(block, block.len() - TAIL_LEN).map_or(0, |_| get32(block, block.len() - 4).unwrap_or(0))
}

/// Checksum of a leaf block: inode seed over everything before the tail.
pub fn leaf_csum(inode_seed: u32, block: &[u8]) -> u32 {
    crc32c_raw(inode_seed, &block[..block.len() - TAIL_LEN])
}

/// One entry as found in a block, borrowing its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// Byte offset of the entry in its block.
    pub offset: usize,
    pub inode: u32,
    pub rec_len: usize,
    pub file_type: u8,
    /// Empty for an unused record (inode 0).
    pub name: &'a [u8],
}

impl EntryRef<'_> {
    pub fn to_owned(&self) -> RawEntry {
        RawEntry {
            offset: self.offset,
            inode: self.inode,
            rec_len: self.rec_len,
            file_type: self.file_type,
            name: self.name.to_vec(),
        }
    }
}

/// The entries of a leaf block in order, checked one by one as they are
/// reached; an inconsistency is yielded as an error (once, then the
/// iterator ends). `usable` is the length covered by entries (block size,
/// minus the tail when there is one).
pub fn entries(block: &[u8], usable: usize) -> Entries<'_> {
    Entries {
        block,
        usable,
        off: 0,
    }
}

/// Iterator returned by [`entries`].
pub struct Entries<'a> {
    block: &'a [u8],
    usable: usize,
    off: usize,
}

impl<'a> Entries<'a> {
    fn entry_at(&self, off: usize) -> Result<EntryRef<'a>, &'static str> {
        let block = self.block;
        let inode = get32(block, off).ok_or("directory entry runs past the block")?;
        let rec_len =
            rec_len_from_disk(get16(block, off + 4).ok_or("truncated entry")?, block.len());
        let name_len = usize::from(*block.get(off + 6).ok_or("truncated entry")?);
        let file_type = *block.get(off + 7).ok_or("truncated entry")?;
        if rec_len < ENTRY_HEADER || !rec_len.is_multiple_of(4) {
            return Err("directory entry has a bad rec_len");
        }
        if off + rec_len > self.usable {
            return Err("directory entry rec_len runs past the block");
        }
        if inode != 0 && entry_len(name_len) > rec_len {
            return Err("directory entry name is longer than its record");
        }
        let name = if inode != 0 {
            block
                .get(off + ENTRY_HEADER..off + ENTRY_HEADER + name_len)
                .ok_or("name runs past the block")?
        } else {
            &[]
        };
        Ok(EntryRef {
            offset: off,
            inode,
            rec_len,
            file_type,
            name,
        })
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<EntryRef<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.off >= self.usable {
            return None;
        }
        match self.entry_at(self.off) {
            Ok(e) => {
                self.off += e.rec_len;
                Some(Ok(e))
            }
            Err(msg) => {
                self.off = self.usable;
                Some(Err(msg))
            }
        }
    }
}

/// Parse the entries of a leaf block (see [`entries`]). Errors name the
/// inconsistency.
pub fn parse_entries(block: &[u8], usable: usize) -> Result<Vec<RawEntry>, &'static str> {
    entries(block, usable)
        .map(|e| e.map(|e| e.to_owned()))
        .collect()
}

/// Write one entry header and name at `off` with record length `rec_len`.
pub fn write_entry(
    block: &mut [u8],
    off: usize,
    inode: u32,
    rec_len: usize,
    file_type: u8,
    name: &[u8],
) {
    let bs = block.len();
    put32(block, off, inode);
    put16(block, off + 4, rec_len_to_disk(rec_len, bs));
    block[off + 6] = name.len() as u8;
    block[off + 7] = file_type;
    block[off + ENTRY_HEADER..off + ENTRY_HEADER + name.len()].copy_from_slice(name);
}

// ---- htree (dx) blocks ----

/// Where the dx root info starts (after the "." and ".." entries).
pub const DX_ROOT_INFO: usize = 0x18;
pub const DX_ROOT_INFO_LEN: usize = 8;
/// Where a dx node's count/limit starts (after its empty fake dirent).
pub const DX_NODE_COUNT: usize = 8;
pub const DX_ENTRY: usize = 8;
pub const DX_TAIL_LEN: usize = 8;

/// dx root info fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DxRootInfo {
    pub hash_version: u8,
    pub info_length: u8,
    pub indirect_levels: u8,
}

pub fn parse_root_info(block: &[u8]) -> Option<DxRootInfo> {
    Some(DxRootInfo {
        hash_version: *block.get(DX_ROOT_INFO + 4)?,
        info_length: *block.get(DX_ROOT_INFO + 5)?,
        indirect_levels: *block.get(DX_ROOT_INFO + 6)?,
    })
}

/// Entries of a dx node (root or interior): `(hash, logical block)`, the
/// first entry's hash being implicitly 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DxEntries {
    pub count_offset: usize,
    pub limit: u16,
    pub entries: Vec<(u32, u32)>,
}

/// Parse count/limit and entries at `count_offset`.
pub fn parse_dx_entries(block: &[u8], count_offset: usize) -> Result<DxEntries, &'static str> {
    let limit = get16(block, count_offset).ok_or("dx count/limit past the block")?;
    let count = get16(block, count_offset + 2).ok_or("dx count/limit past the block")?;
    let max = (block.len() - count_offset) / DX_ENTRY;
    if usize::from(limit) > max || count > limit || count == 0 {
        return Err("dx node has a bad count or limit");
    }
    let mut entries = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let o = count_offset + i * DX_ENTRY;
        let hash = if i == 0 {
            0
        } else {
            get32(block, o).ok_or("dx entry past the block")?
        };
        let blk = get32(block, o + 4).ok_or("dx entry past the block")?;
        entries.push((hash, blk));
    }
    Ok(DxEntries {
        count_offset,
        limit,
        entries,
    })
}

/// Write count/limit and entries at their offset.
pub fn write_dx_entries(block: &mut [u8], dx: &DxEntries) {
    assert!(dx.entries.len() <= usize::from(dx.limit));
    put16(block, dx.count_offset, dx.limit);
    put16(block, dx.count_offset + 2, dx.entries.len() as u16);
    for (i, (h, b)) in dx.entries.iter().enumerate() {
        let o = dx.count_offset + i * DX_ENTRY;
        if i != 0 {
            put32(block, o, *h);
        }
        put32(block, o + 4, *b);
    }
}

/// Limit of a dx node whose entries start at `count_offset`.
pub fn dx_limit(block_size: usize, count_offset: usize, csum: bool) -> u16 {
    let mut n = (block_size - count_offset) / DX_ENTRY;
    if csum {
        n -= 1;
    }
    n as u16
}

/// The dx node checksum: over the count/limit header and used entries,
/// then the tail's reserved word. Returns `None` if the tail would not fit.
pub fn dx_csum(inode_seed: u32, block: &[u8], dx_count_offset: usize) -> Option<u32> {
    let limit = usize::from(get16(block, dx_count_offset)?);
    let count = usize::from(get16(block, dx_count_offset + 2)?);
    let tail = dx_count_offset + limit * DX_ENTRY;
    let size = dx_count_offset + count * DX_ENTRY;
    let c = crc32c_raw(inode_seed, block.get(..size)?);
    let c = crc32c_raw(c, block.get(tail..tail + 4)?);
    // The checksum field itself counts as zero.
    Some(crc32c_raw(c, &[0; 4]))
}

/// Store the dx checksum in the tail after `limit` entries.
pub fn write_dx_tail(block: &mut [u8], dx_count_offset: usize, inode_seed: u32) {
    let limit = usize::from(get16(block, dx_count_offset).unwrap_or(0));
    let tail = dx_count_offset + limit * DX_ENTRY;
    block[tail..tail + 8].fill(0);
    let c =
        dx_csum(inode_seed, block, dx_count_offset).expect("tail fits: limit was computed for it");
    put32(block, tail + 4, c);
}

pub fn dx_csum_stored(block: &[u8], dx_count_offset: usize) -> Option<u32> {
    let limit = usize::from(get16(block, dx_count_offset)?);
    get32(block, dx_count_offset + limit * DX_ENTRY + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rec_len_encoding_for_64k_blocks() {
        for bs in [1024usize, 4096, 65536] {
            for len in [12usize, 4096, bs] {
                if len > bs {
                    continue;
                }
                assert_eq!(rec_len_from_disk(rec_len_to_disk(len, bs), bs), len);
            }
        }
    }

    #[test]
    fn entries_round_trip_and_hostile_blocks_fail() {
        let mut b = vec![0u8; 1024];
        write_entry(&mut b, 0, 2, 12, 2, b".");
        write_entry(&mut b, 12, 2, 1024 - 12 - TAIL_LEN, 2, b"..");
        write_tail(&mut b, 0);
        let e = parse_entries(&b, 1024 - TAIL_LEN).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].name, b"..");
        assert!(has_tail(&b));
        // rec_len 0 would loop forever if not rejected.
        put16(&mut b, 4, 0);
        assert!(parse_entries(&b, 1024 - TAIL_LEN).is_err());
        put16(&mut b, 4, 2000);
        assert!(parse_entries(&b, 1024 - TAIL_LEN).is_err());
    }

    #[test]
    fn dx_entries_round_trip() {
        let mut b = vec![0u8; 4096];
        let dx = DxEntries {
            count_offset: 0x20,
            limit: dx_limit(4096, 0x20, true),
            entries: vec![(0, 1), (0x1000, 2), (0x8000_0000, 3)],
        };
        write_dx_entries(&mut b, &dx);
        write_dx_tail(&mut b, 0x20, 7);
        let p = parse_dx_entries(&b, 0x20).unwrap();
        assert_eq!(p, dx);
        assert_eq!(dx_csum_stored(&b, 0x20), dx_csum(7, &b, 0x20));
    }
}
