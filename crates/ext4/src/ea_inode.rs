//! Large xattr values in inodes of their own (the ea_inode feature).
//!
//! An EA inode is a regular file (mode 0600, the owner's ids, the
//! `EA_INODE` flag, one link, in no directory) whose data is one
//! attribute value. Where i_atime is it keeps the value's hash (crc32c
//! with the filesystem's checksum seed), and i_ctime:i_version hold a
//! 64-bit count of the entries that name it: each inode whose in-inode
//! table or xattr block has such an entry holds one reference, as the
//! kernel counts them (e2fsck checks the count in pass 4).
//!
//! The data blocks are written to the device directly before the handle
//! that maps them ends, as writeback writes file data: a commit can only
//! carry the new inode with its data already in place, and the blocks
//! were free in the committed state, so a crash before the commit leaves
//! nothing behind. The kernel journals these blocks as metadata instead;
//! either way the image after a crash holds the old value or the new one.

use crate::bmap::Mapping;
use crate::error::{Error, Result};
use crate::format::inode::{Inode, FL_EA_INODE, S_IFREG};
use crate::format::superblock::incompat;
use crate::format::xattr::{ea_value_hash, EaRef, Xattr};
use crate::format::Timespec;
use crate::fs::Core;

/// The largest value an attribute may have (the VFS's XATTR_SIZE_MAX;
/// the kernel's ext4 takes no more through it).
pub const XATTR_SIZE_MAX: usize = 65536;

/// The largest value ext4's format allows in an EA inode (the kernel's
/// `EXT4_XATTR_SIZE_MAX`); an entry claiming more is corrupt.
const EA_VALUE_MAX: usize = 1 << 24;

impl Core {
    pub(crate) fn has_ea_inode(&self) -> bool {
        self.sb.has_incompat(incompat::EA_INODE)
    }

    /// Values longer than this go to an EA inode right away (the kernel's
    /// `EXT4_XATTR_MIN_LARGE_EA_SIZE`: what no block could hold with its
    /// header and one entry); shorter ones only when the inode and block
    /// are full.
    pub(crate) fn ea_inode_threshold(&self) -> usize {
        self.geo.block_size as usize - 3 - 16 - 4
    }

    /// What a value of `size` bytes in an EA inode adds to its owner's
    /// i_blocks, in 512-byte units (whole blocks, as the kernel charges
    /// it and e2fsck counts it).
    pub(crate) fn ea_charge(&self, size: u32) -> i64 {
        let bs = u64::from(self.geo.block_size);
        (u64::from(size).div_ceil(bs) * (bs / 512)) as i64
    }

    /// The EA inode an entry of `owner` names, checked: a number in range,
    /// the EA_INODE flag, a regular file of the entry's size.
    fn ea_inode_of(&mut self, owner: u32, e: &EaRef) -> Result<Inode> {
        let bad = |why: &str| {
            Error::corrupted(
                format!("inode {owner}: xattr value inode {}: {why}", e.inum),
                0,
            )
        };
        if e.inum < self.sb.first_ino() || e.inum > self.sb.inodes_count() || e.inum == owner {
            return Err(bad("not a valid inode number"));
        }
        if e.size as usize > EA_VALUE_MAX {
            // Checked before anything is read or allocated for it.
            return Err(bad("a value larger than ext4 allows"));
        }
        let inode = self.read_inode(e.inum)?;
        if inode.flags() & FL_EA_INODE == 0 || !inode.is_reg() || inode.links() == 0 {
            return Err(bad("not an EA inode"));
        }
        if inode.size() != u64::from(e.size) {
            return Err(bad("its size differs from the entry's"));
        }
        Ok(inode)
    }

    /// The value of entry `e` of inode `owner`, read from its EA inode and
    /// checked against the inode's hash and the entry's, as the kernel's
    /// `ext4_xattr_inode_verify_hashes` does (corruption, EUCLEAN, if not).
    pub(crate) fn ea_inode_value(&mut self, owner: u32, e: &EaRef, name: &[u8]) -> Result<Vec<u8>> {
        let inode = self.ea_inode_of(owner, e)?;
        let bs = u64::from(self.geo.block_size);
        let size = u64::from(e.size);
        let mut value = vec![0u8; e.size as usize];
        let mut lblk = 0u64;
        while lblk * bs < size {
            let left = size.div_ceil(bs) - lblk;
            let (m, n) = self.map_block(&inode, lblk, left)?;
            let n = n.clamp(1, left);
            let from = (lblk * bs) as usize;
            let to = ((lblk + n) * bs).min(size) as usize;
            match m {
                Mapping::Mapped { pblk, unwritten } => {
                    if !unwritten {
                        self.check_block(pblk, "xattr value inode data", u64::from(e.inum))?;
                        self.dev().read_at(pblk * bs, &mut value[from..to])?;
                    }
                }
                Mapping::Hole => {}
            }
            lblk += n;
        }
        let hash = ea_value_hash(self.csum_seed, &value);
        if hash != inode.ea_hash() || Xattr::ea_entry_hash(name, hash) != e.entry_hash {
            // EFSCORRUPTED, as the kernel answers a hash that disagrees.
            return Err(Error::corrupted(
                format!(
                    "inode {owner}: the xattr value in inode {} does not match its hash",
                    e.inum
                ),
                0,
            ));
        }
        Ok(value)
    }

    /// Make an EA inode holding `value` for `owner` (one reference) and
    /// return the entry's reference to it.
    pub(crate) fn ea_inode_create(
        &mut self,
        owner: &Inode,
        name: &[u8],
        value: &[u8],
    ) -> Result<EaRef> {
        let bs = u64::from(self.geo.block_size);
        let ino = self.alloc_inode(owner.ino, false)?;
        let mut ea = Inode::new(ino, self.geo.inode_size as usize, self.extra_isize());
        ea.set_mode(S_IFREG | 0o600);
        ea.set_uid(owner.uid());
        ea.set_gid(owner.gid());
        ea.set_links(1);
        let now = Timespec::now();
        ea.set_mtime(now);
        ea.set_crtime(now);
        let generation = self.next_generation();
        ea.set_generation(generation);
        if self.sb.has_incompat(incompat::EXTENTS) {
            self.init_extent_root(&mut ea);
        }
        ea.set_flags(ea.flags() | FL_EA_INODE);
        self.inodes.reset(ino);
        let blocks = (value.len() as u64).div_ceil(bs);
        let mut lblk = 0;
        let r = (|| -> Result<()> {
            while lblk < blocks {
                let (pblk, got) = self.alloc_run(&mut ea, lblk, blocks - lblk, true, false)?;
                let from = (lblk * bs) as usize;
                let to = ((lblk + got) * bs).min(value.len() as u64) as usize;
                let mut buf = value[from..to].to_vec();
                buf.resize((got * bs) as usize, 0);
                self.dev().write_at(pblk * bs, &buf)?;
                lblk += got;
            }
            Ok(())
        })();
        ea.set_size(value.len() as u64);
        let hash = ea_value_hash(self.csum_seed, value);
        ea.set_ea_hash(hash);
        ea.set_ea_refs(1);
        if let Err(e) = r {
            // Give back what was taken; the error is what the caller sees.
            let _ = self.release_inode(&mut ea);
            return Err(e);
        }
        self.write_inode(&mut ea)?;
        Ok(EaRef {
            inum: ino,
            size: value.len() as u32,
            entry_hash: Xattr::ea_entry_hash(name, hash),
        })
    }

    /// One reference fewer to the EA inode of entry `e` of `owner`; the
    /// inode goes with the last one.
    pub(crate) fn ea_inode_unref(&mut self, owner: u32, e: &EaRef) -> Result<()> {
        let mut inode = self.ea_inode_of(owner, e)?;
        let refs = inode.ea_refs();
        if refs <= 1 {
            return self.release_inode(&mut inode);
        }
        inode.set_ea_refs(refs - 1);
        self.write_inode(&mut inode)
    }

    /// Drop the references held by the EA entries among `before` that are
    /// not among `after` (an owner's attributes before and after a
    /// change).
    pub(crate) fn ea_inode_unref_gone(
        &mut self,
        owner: u32,
        before: &[Xattr],
        after: &[Xattr],
    ) -> Result<()> {
        for x in before {
            let Some(e) = x.ea else { continue };
            if !after.iter().any(|y| y.ea.is_some_and(|f| f.inum == e.inum)) {
                self.ea_inode_unref(owner, &e)?;
            }
        }
        Ok(())
    }

    /// Credits to drop every EA reference `inode` holds (each may free an
    /// inode and its blocks).
    pub(crate) fn ea_inode_credits(&mut self, inode: &Inode) -> usize {
        if !self.has_ea_inode() {
            return 0;
        }
        let n = self
            .all_xattrs(inode)
            .map_or(0, |v| v.iter().filter(|x| x.ea.is_some()).count());
        n * (8 + self.summary_credits())
    }
}
