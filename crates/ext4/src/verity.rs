//! fs-verity (issue 18): files whose every read is checked against a
//! Merkle tree of SHA-256 hashes, and folio's own `enable`.
//!
//! Layout, as ext4 keeps it (Documentation/filesystems/ext4/verity.rst):
//! past the data, from the first 64 KiB boundary at or after i_size, the
//! Merkle tree with its levels stored from the root down; then, at the
//! next block boundary, the 256-byte `fsverity_descriptor` (version 1,
//! hash algorithm 1 = SHA-256, log2 of the tree's block size, salt,
//! data size, root hash); and in the last 4 bytes of the block that ends
//! the file's last extent, the descriptor's size. i_size stays the
//! data's size; the inode has EXT4_VERITY_FL.
//!
//! The tree: each data block (the last one zero-padded; with a salt, the
//! salt zero-padded to 64 bytes hashed first) is hashed; the hashes,
//! packed into blocks and zero-padded, make level 0; each level's blocks
//! are hashed into the next until a level is one block, whose hash is
//! the root hash. A file of one block has no tree (its root hash is that
//! block's hash), an empty file a root hash of zeros. The file digest
//! (`fsverity digest`, FS_IOC_MEASURE_VERITY) is the SHA-256 of the
//! descriptor.
//!
//! folio verifies on every read that reaches the core (verity files are
//! left out of the lock-free paths): each data block read is hashed and
//! its path checked up to the root hash; a mismatch is EIO, as on the
//! kernel. Verity files are immutable (EPERM for writes, truncation,
//! fallocate), deletable and renamable. Only trees whose block size is
//! the filesystem's are read (what the kernel's ext4 makes on 4 KiB
//! pages with 4 KiB blocks).

use sha2::{Digest, Sha256};

use crate::bmap::Mapping;
use crate::error::{Error, Result};
use crate::format::inode::{Inode, FL_EXTENTS};
use crate::format::superblock::ro_compat;
use crate::fs::Core;

/// EXT4_VERITY_FL.
pub const FL_VERITY: u32 = 0x0010_0000;
const METADATA_ALIGN: u64 = 65536;
const DESCRIPTOR_SIZE: usize = 256;
const HASH: usize = 32;
const SHA256_ALG: u8 = 1;

/// Whether `inode` is a verity file.
pub fn is_verity(inode: &Inode) -> bool {
    inode.flags() & FL_VERITY != 0
}

/// EPERM for a change of a verity file's data.
pub(crate) fn check_data_changeable(inode: &Inode) -> Result<()> {
    if is_verity(inode) {
        return Err(Error::NotPermitted(format!(
            "inode {} has fs-verity: its data is read-only",
            inode.ino
        )));
    }
    Ok(())
}

/// The parsed descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub log_blocksize: u8,
    pub salt: Vec<u8>,
    pub data_size: u64,
    pub root_hash: [u8; HASH],
}

impl Descriptor {
    fn to_bytes(&self) -> [u8; DESCRIPTOR_SIZE] {
        let mut d = [0u8; DESCRIPTOR_SIZE];
        d[0] = 1;
        d[1] = SHA256_ALG;
        d[2] = self.log_blocksize;
        d[3] = self.salt.len() as u8;
        d[8..16].copy_from_slice(&self.data_size.to_le_bytes());
        d[16..16 + HASH].copy_from_slice(&self.root_hash);
        d[80..80 + self.salt.len()].copy_from_slice(&self.salt);
        d
    }

    fn parse(b: &[u8], block: u64) -> Result<Descriptor> {
        let bad = |why: String| Error::corrupted(format!("fs-verity descriptor: {why}"), block);
        if b.len() < DESCRIPTOR_SIZE {
            return Err(bad(format!("{} bytes", b.len())));
        }
        if b[0] != 1 {
            return Err(bad(format!("version {}", b[0])));
        }
        if b[1] != SHA256_ALG {
            return Err(Error::Unsupported(format!(
                "fs-verity hash algorithm {} (folio checks SHA-256 trees)",
                b[1]
            )));
        }
        let salt_size = usize::from(b[3]);
        if salt_size > 32 {
            return Err(bad(format!("salt of {salt_size} bytes")));
        }
        if b[16 + HASH..80].iter().any(|&x| x != 0) {
            return Err(bad("a SHA-256 root hash with bytes past 32".into()));
        }
        let mut root_hash = [0u8; HASH];
        root_hash.copy_from_slice(&b[16..16 + HASH]);
        Ok(Descriptor {
            log_blocksize: b[2],
            salt: b[80..80 + salt_size].to_vec(),
            data_size: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            root_hash,
        })
    }

    /// The fs-verity file digest (what `fsverity digest` prints).
    pub fn digest(&self) -> [u8; HASH] {
        Sha256::digest(self.to_bytes()).into()
    }
}

/// Hash of one tree or data block, the salt first when there is one.
fn hash_block(salt: &[u8], block: &[u8]) -> [u8; HASH] {
    let mut h = Sha256::new();
    if !salt.is_empty() {
        let mut padded = [0u8; 64];
        padded[..salt.len()].copy_from_slice(salt);
        h.update(padded);
    }
    h.update(block);
    h.finalize().into()
}

/// Block counts of the tree's levels, from level 0 (hashes of the data)
/// up; empty for a file of at most one block.
pub fn level_blocks(data_size: u64, bs: u64) -> Vec<u64> {
    let per = bs / HASH as u64;
    let mut n = data_size.div_ceil(bs);
    let mut out = Vec::new();
    while n > 1 {
        n = n.div_ceil(per);
        out.push(n);
    }
    out
}

/// The first tree block (from the tree's start) of each level: levels
/// are stored from the root down.
fn level_starts(levels: &[u64]) -> Vec<u64> {
    (0..levels.len())
        .map(|i| levels[i + 1..].iter().sum())
        .collect()
}

/// The metadata of `data` (its blocks of size `bs`): the tree as stored
/// (root level first) and the descriptor.
pub fn build(data: &[u8], bs: usize) -> (Vec<u8>, Descriptor) {
    let leaves = data.chunks(bs).map(|c| leaf_hash(c, bs)).collect();
    build_from_leaves(leaves, data.len() as u64, bs)
}

/// Hash of a data block, zero-padded to `bs`.
fn leaf_hash(block: &[u8], bs: usize) -> [u8; HASH] {
    if block.len() == bs {
        return hash_block(&[], block);
    }
    let mut b = block.to_vec();
    b.resize(bs, 0);
    hash_block(&[], &b)
}

/// [`build`] from the hashes of the data blocks (level 0's entries), so
/// that the data itself need not be held at once.
fn build_from_leaves(leaves: Vec<[u8; HASH]>, data_size: u64, bs: usize) -> (Vec<u8>, Descriptor) {
    let mut root_hash = [0u8; HASH];
    let mut stored: Vec<Vec<u8>> = Vec::new();
    if !leaves.is_empty() {
        let mut cur = leaves;
        while cur.len() > 1 {
            let mut level = cur.concat();
            level.resize(level.len().div_ceil(bs) * bs, 0);
            cur = level.chunks(bs).map(|b| hash_block(&[], b)).collect();
            stored.push(level);
        }
        root_hash = cur[0];
    }
    stored.reverse();
    let desc = Descriptor {
        log_blocksize: bs.trailing_zeros() as u8,
        salt: Vec::new(),
        data_size,
        root_hash,
    };
    (stored.concat(), desc)
}

impl Core {
    /// One logical block of `inode` as the device has it (zeros for a
    /// hole or an unwritten extent), past i_size as well.
    fn file_block(&mut self, inode: &Inode, lblk: u64) -> Result<Vec<u8>> {
        match self.map_block(inode, lblk, 1)?.0 {
            Mapping::Mapped {
                pblk,
                unwritten: false,
            } => Ok(self.cache.read(pblk)?.to_vec()),
            _ => Ok(vec![0u8; self.geo.block_size as usize]),
        }
    }

    /// Where the metadata starts (in blocks) and the descriptor.
    fn verity_descriptor(&mut self, inode: &Inode) -> Result<(u64, Descriptor)> {
        let bs = u64::from(self.geo.block_size);
        let meta = inode.size().next_multiple_of(METADATA_ALIGN) / bs;
        let end = self
            .block_runs_nosync(inode.ino)?
            .iter()
            .map(|r| r.lblk + r.len)
            .max()
            .unwrap_or(0);
        if end <= meta {
            return Err(Error::corrupted(
                format!("verity file {}: nothing past its data", inode.ino),
                0,
            ));
        }
        let last = self.file_block(inode, end - 1)?;
        let size_at = end * bs - 4;
        let dsize = u64::from(u32::from_le_bytes(
            last[bs as usize - 4..].try_into().expect("4 bytes"),
        ));
        let dpos = size_at
            .checked_sub(dsize)
            .map(|p| p / bs * bs)
            .filter(|&p| dsize >= DESCRIPTOR_SIZE as u64 && p >= meta * bs)
            .ok_or_else(|| {
                Error::corrupted(
                    format!("verity file {}: descriptor size {dsize}", inode.ino),
                    0,
                )
            })?;
        let mut raw = Vec::new();
        for lblk in dpos / bs..=(dpos + DESCRIPTOR_SIZE as u64 - 1) / bs {
            raw.extend(self.file_block(inode, lblk)?);
        }
        let d = Descriptor::parse(&raw[(dpos % bs) as usize..], 0)?;
        if d.data_size != inode.size() {
            return Err(Error::corrupted(
                format!(
                    "verity file {}: descriptor says {} bytes, the inode {}",
                    inode.ino,
                    d.data_size,
                    inode.size()
                ),
                0,
            ));
        }
        if u64::from(self.geo.block_size) != 1u64 << d.log_blocksize.min(63) {
            return Err(Error::Unsupported(format!(
                "verity file {}: Merkle tree blocks of 2^{} bytes on a {}-byte block filesystem",
                inode.ino, d.log_blocksize, self.geo.block_size
            )));
        }
        Ok((meta, d))
    }

    /// FS_IOC_MEASURE_VERITY: the file digest of verity file `ino`.
    pub fn verity_digest(&mut self, ino: u32) -> Result<[u8; HASH]> {
        let inode = self.read_inode(ino)?;
        if !is_verity(&inode) {
            return Err(Error::NoAttr);
        }
        Ok(self.verity_descriptor(&inode)?.1.digest())
    }

    /// Check data blocks `[first, last]` of verity file `inode` against
    /// its tree, each up to the root hash: EIO at the first mismatch.
    pub(crate) fn verify_blocks(&mut self, inode: &Inode, first: u64, last: u64) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let (meta, d) = self.verity_descriptor(inode)?;
        let levels = level_blocks(d.data_size, bs);
        let starts = level_starts(&levels);
        let per = bs / HASH as u64;
        let fail = |what: String| {
            Error::Io(std::io::Error::other(format!(
                "fs-verity: inode {}: {what} does not match its hash",
                inode.ino
            )))
        };
        for b in first..=last {
            if b * bs >= d.data_size {
                break;
            }
            let data = self.data_block(inode, b)?;
            let mut want_index = b;
            let mut got = hash_block(&d.salt, &data);
            for (lvl, &start) in starts.iter().enumerate() {
                let tb = start + want_index / per;
                let block = self.file_block(inode, meta + tb)?;
                let at = ((want_index % per) as usize) * HASH;
                if block[at..at + HASH] != got {
                    return Err(fail(if lvl == 0 {
                        format!("data block {b}")
                    } else {
                        format!("Merkle tree block at level {}", lvl - 1)
                    }));
                }
                got = hash_block(&d.salt, &block);
                want_index /= per;
            }
            if got != d.root_hash {
                return Err(fail(if starts.is_empty() {
                    format!("data block {b}")
                } else {
                    "the Merkle tree's root block".into()
                }));
            }
        }
        Ok(())
    }

    /// Data block `lblk` of `inode`, zeroed past i_size, from the device
    /// (or the cache, for blocks still dirty there).
    fn data_block(&mut self, inode: &Inode, lblk: u64) -> Result<Vec<u8>> {
        let bs = u64::from(self.geo.block_size);
        let mut b = vec![0u8; bs as usize];
        let n = self.read_data(inode, lblk * bs, &mut b)?;
        b[n..].fill(0);
        Ok(b)
    }

    /// FS_IOC_ENABLE_VERITY: build the Merkle tree of regular file `ino`
    /// (SHA-256, the filesystem's block size, no salt), store it and its
    /// descriptor past the data and set EXT4_VERITY_FL, all in one
    /// transaction: after a crash the file either has verity or is as
    /// it was. Returns the file digest.
    pub fn enable_verity(&mut self, ino: u32) -> Result<[u8; HASH]> {
        self.check_writable()?;
        if !self.sb.has_ro_compat(ro_compat::VERITY) {
            return Err(Error::Unsupported(
                "the filesystem has no verity feature (mkfs -O verity, tune2fs -O verity)".into(),
            ));
        }
        self.uninline(ino)?;
        let inode = self.read_inode(ino)?;
        if !inode.is_reg() {
            return Err(Error::Invalid("fs-verity is for regular files".into()));
        }
        if is_verity(&inode) {
            return Err(Error::Exists);
        }
        crate::fscrypt::need_key(&inode, "hash its data")?;
        crate::ops::check_changeable(&inode, false)?;
        if inode.flags() & FL_EXTENTS == 0 {
            return Err(Error::Unsupported(
                "fs-verity needs an extent-mapped file".into(),
            ));
        }
        let bs = self.geo.block_size as usize;
        let size = inode.size();
        // The data is hashed a megabyte at a time: only the tree (about
        // 1/127 of the file on 4 KiB blocks) is held whole.
        let chunk = bs * (1usize << 20).div_ceil(bs);
        let mut buf = vec![0u8; chunk];
        let mut leaves = Vec::with_capacity(size.div_ceil(bs as u64) as usize);
        let mut at = 0u64;
        while at < size {
            let want = chunk.min((size - at) as usize);
            let n = self.read_data(&inode, at, &mut buf[..want])?;
            if n != want {
                return Err(Error::corrupted(
                    format!("file {ino}: short read while hashing"),
                    0,
                ));
            }
            leaves.extend(buf[..n].chunks(bs).map(|c| leaf_hash(c, bs)));
            at += n as u64;
        }
        drop(buf);
        let (tree, desc) = build_from_leaves(leaves, size, bs);
        let mut meta = tree;
        let mut last = vec![0u8; bs];
        last[..DESCRIPTOR_SIZE].copy_from_slice(&desc.to_bytes());
        last[bs - 4..].copy_from_slice(&(DESCRIPTOR_SIZE as u32).to_le_bytes());
        meta.extend(last);
        let at = size.next_multiple_of(METADATA_ALIGN);
        let blocks = (meta.len() / bs) as u64 + 1;
        let c = self.namespace_credits() + 2 * self.alloc_credits(ino, blocks);
        // Direct writes drop cached pages of the range: before the
        // transaction.
        let _order = folio_pagecache::lockdep::Held::take(
            folio_pagecache::lockdep::Level::Invalidate,
            u64::from(ino),
        );
        self.retry_nospc(c, |fs| {
            fs.write_direct_impl(ino, at, &meta)?;
            let mut i = fs.read_inode(ino)?;
            i.set_size(size);
            i.set_flags(i.flags() | FL_VERITY);
            i.set_ctime(crate::format::Timespec::now());
            fs.write_inode(&mut i)
        })?;
        Ok(desc.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_their_order() {
        assert!(level_blocks(0, 4096).is_empty());
        assert!(level_blocks(4096, 4096).is_empty());
        assert_eq!(level_blocks(4097, 4096), vec![1]);
        assert_eq!(level_blocks(128 * 4096, 4096), vec![1]);
        assert_eq!(level_blocks(129 * 4096, 4096), vec![2, 1]);
        assert_eq!(level_starts(&[2, 1]), vec![1, 0]);
        let (tree, d) = build(&[1u8; 129 * 4096], 4096);
        assert_eq!(tree.len(), 3 * 4096);
        // The root level comes first: its hash is the root hash.
        assert_eq!(hash_block(&[], &tree[..4096]), d.root_hash);
        let (tree, d) = build(b"hello", 4096);
        assert!(tree.is_empty());
        let mut b = b"hello".to_vec();
        b.resize(4096, 0);
        assert_eq!(d.root_hash, hash_block(&[], &b));
        assert_eq!(build(&[], 4096).1.root_hash, [0u8; 32]);
        let parsed = Descriptor::parse(&d.to_bytes(), 0).unwrap();
        assert_eq!(parsed, d);
    }
}
