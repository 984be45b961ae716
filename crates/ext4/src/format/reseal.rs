//! Recompute the checksums of an image's fixed metadata in place, for
//! fault injection and fuzzing: damage made to a superblock, a group
//! descriptor, a bitmap or an inode then passes its checksum, so that what
//! validates the *fields* is what sees it. Pure byte work, no I/O; any
//! structure out of the buffer's bounds is left alone.

use super::group::{bitmap_csum, GroupDesc};
use super::inode::Inode;
use super::superblock::{ro_compat, Superblock, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};

/// Reseal `image` (the whole filesystem image); inodes are resealed in the
/// first `max_inodes` slots of each group's table.
pub fn reseal(image: &mut [u8], max_inodes: u32) {
    let at = SUPERBLOCK_OFFSET as usize;
    let Some(raw) = image.get(at..at + SUPERBLOCK_SIZE) else {
        return;
    };
    let Some(mut sb) = Superblock::from_bytes(raw) else {
        return;
    };
    let Some(bs) = sb.block_size().map(|b| b as usize) else {
        return;
    };
    let csum = sb.metadata_csum();
    let gdt_csum = csum || sb.has_ro_compat(ro_compat::GDT_CSUM);
    let seed = sb.csum_seed();
    let uuid = sb.uuid();
    let desc = if sb.desc_size() >= 64 {
        usize::from(sb.desc_size())
    } else {
        32
    };
    let bpg = sb.blocks_per_group() as usize;
    let ipg = sb.inodes_per_group() as usize;
    let isz = usize::from(sb.inode_size()).max(128);
    let fdb = sb.first_data_block() as usize;
    let groups = if bpg == 0 {
        0
    } else {
        (sb.blocks_count() as usize)
            .saturating_sub(fdb)
            .div_ceil(bpg)
    };
    let gdt = (fdb + 1).saturating_mul(bs);
    for g in 0..groups.min(image.len() / desc) {
        let off = gdt + g * desc;
        let Some(raw) = image.get(off..off + desc) else {
            break;
        };
        let mut gd = GroupDesc { raw: raw.to_vec() };
        if csum {
            let bb = (gd.block_bitmap() as usize).saturating_mul(bs);
            if let Some(b) = image.get(bb..bb.saturating_add(bpg / 8)) {
                gd.set_block_bitmap_csum(bitmap_csum(seed, b));
            }
            let ib = (gd.inode_bitmap() as usize).saturating_mul(bs);
            if let Some(b) = image.get(ib..ib.saturating_add(ipg / 8)) {
                gd.set_inode_bitmap_csum(bitmap_csum(seed, b));
            }
            let table = (gd.inode_table() as usize).saturating_mul(bs);
            for i in 0..ipg.min(max_inodes as usize) {
                let o = table.saturating_add(i * isz);
                let Some(raw) = image.get_mut(o..o.saturating_add(isz)) else {
                    break;
                };
                let ino = (g * ipg + i + 1) as u32;
                let mut inode = Inode {
                    ino,
                    raw: raw.to_vec(),
                };
                if inode.raw.iter().all(|&b| b == 0) {
                    continue;
                }
                inode.update_checksum(seed);
                raw.copy_from_slice(&inode.raw);
            }
        }
        if gdt_csum {
            let c = gd.compute_checksum(g as u32, csum, seed, &uuid);
            gd.set_checksum(c);
        }
        image[off..off + desc].copy_from_slice(&gd.raw);
    }
    if csum {
        sb.update_checksum();
        image[at..at + SUPERBLOCK_SIZE].copy_from_slice(&sb.raw);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use folio_blockdev::{BlockDevice, MemDevice};

    use crate::mkfs::{mkfs, MkfsOptions};
    use crate::{Error, Filesystem, OpenOptions};

    fn open(bytes: Vec<u8>) -> crate::Result<Filesystem> {
        let opts = OpenOptions {
            lock: false,
            ..Default::default()
        };
        Filesystem::open(Arc::new(MemDevice::from_bytes(bytes)), opts)
    }

    #[test]
    fn resealed_damage_passes_the_checksums() {
        let dev = MemDevice::new(8 << 20);
        let opts = MkfsOptions {
            block_size: Some(1024),
            ..Default::default()
        };
        mkfs(Arc::new(dev.clone()), 8 << 20, &opts).unwrap();
        dev.flush().unwrap();
        let clean = dev.snapshot();
        // A harmless change to the superblock (its label) and to group 0's
        // descriptor (its used-directories count) ...
        let mut bytes = clean.clone();
        bytes[1024 + 0x78] = b'x';
        assert!(matches!(
            open(bytes.clone()),
            Err(Error::BadChecksum { .. })
        ));
        super::reseal(&mut bytes, 64);
        open(bytes).expect("a resealed superblock opens");
        let mut bytes = clean;
        bytes[2048 + 0x10] ^= 1;
        assert!(open(bytes.clone()).is_err());
        super::reseal(&mut bytes, 64);
        open(bytes).expect("a resealed descriptor opens");
    }
}
