//! Extended attributes: entry tables in the inode body (after the extra
//! fields) and in a separate block with a 32-byte header.

use super::{get16, get32, put16, put32};
use crate::csum::crc32c_raw;

pub const MAGIC: u32 = 0xEA02_0000;
pub const BLOCK_HEADER_LEN: usize = 32;
const ENTRY_FIXED: usize = 16;

/// One attribute: `index` selects the name prefix (see [`PREFIXES`]).
/// With `ea` set (the ea_inode feature) the value lives in an inode of
/// its own and `value` is empty here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Xattr {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    pub ea: Option<EaRef>,
}

/// An entry's reference to the EA inode holding its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EaRef {
    pub inum: u32,
    /// The value's length (the EA inode's size).
    pub size: u32,
    /// The entry's hash: of its name and the EA inode's value hash.
    pub entry_hash: u32,
}

/// The hash of a value kept in an EA inode (stored in that inode, where
/// i_atime is): crc32c of the value seeded with the filesystem's
/// checksum seed, as the kernel's `ext4_xattr_inode_hash`.
pub fn ea_value_hash(fs_seed: u32, value: &[u8]) -> u32 {
    crc32c_raw(fs_seed, value)
}

/// Name prefixes by index, as Linux maps them.
pub const PREFIXES: &[(u8, &str)] = &[
    (1, "user."),
    (2, "system.posix_acl_access"),
    (3, "system.posix_acl_default"),
    (4, "trusted."),
    (6, "security."),
    (7, "system."),
    (8, "system.richacl"),
];

impl Xattr {
    /// The full name as userspace sees it.
    pub fn full_name(&self) -> Vec<u8> {
        let prefix = PREFIXES
            .iter()
            .find(|(i, _)| *i == self.index)
            .map_or("", |(_, p)| p);
        let mut n = prefix.as_bytes().to_vec();
        n.extend_from_slice(&self.name);
        n
    }

    /// Split a full name into (index, suffix); `None` for an unknown prefix.
    pub fn split_name(full: &[u8]) -> Option<(u8, Vec<u8>)> {
        // Exact-match names first (ACLs), then the longest prefix.
        for (i, p) in PREFIXES {
            if (*i == 2 || *i == 3 || *i == 8) && full == p.as_bytes() {
                return Some((*i, Vec::new()));
            }
        }
        for (i, p) in PREFIXES {
            if *i == 2 || *i == 3 || *i == 8 {
                continue;
            }
            if let Some(rest) = full.strip_prefix(p.as_bytes()) {
                if !rest.is_empty() {
                    return Some((*i, rest.to_vec()));
                }
            }
        }
        None
    }

    fn entry_len(&self) -> usize {
        (ENTRY_FIXED + self.name.len() + 3) & !3
    }

    fn value_len(&self) -> usize {
        (self.value.len() + 3) & !3
    }

    /// The length of the value, wherever it is kept.
    pub fn value_size(&self) -> usize {
        self.ea.map_or(self.value.len(), |e| e.size as usize)
    }

    /// The hash of an entry naming `name` whose value is in an EA inode
    /// with value hash `value_hash`: the name's hash with the value hash
    /// folded in as one value word (`ext4_xattr_hash_entry` with one).
    pub fn ea_entry_hash(name: &[u8], value_hash: u32) -> u32 {
        let h = Self::name_hash(name);
        (h << 16) ^ (h >> 16) ^ value_hash
    }

    fn name_hash(name: &[u8]) -> u32 {
        let mut h = 0u32;
        for &c in name {
            h = (h << 5) ^ (h >> 27) ^ u32::from(c);
        }
        h
    }

    /// Bytes this attribute takes in a table (entry + padded value).
    pub fn footprint(&self) -> usize {
        self.entry_len() + self.value_len()
    }

    pub fn hash(&self) -> u32 {
        if let Some(e) = self.ea {
            return e.entry_hash;
        }
        let mut h = Self::name_hash(&self.name);
        let mut padded = self.value.clone();
        padded.resize(self.value_len(), 0);
        for w in padded.chunks_exact(4) {
            let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            h = (h << 16) ^ (h >> 16) ^ v;
        }
        h
    }
}

/// Parse an entry table. `entries_at` is where entries start in `area`,
/// `values_base` the offset value offsets are relative to.
pub fn parse_table(
    area: &[u8],
    entries_at: usize,
    values_base: usize,
) -> Result<Vec<Xattr>, &'static str> {
    let mut out = Vec::new();
    let mut off = entries_at;
    loop {
        let first = get32(area, off).ok_or("xattr entries run past their area")?;
        if first == 0 {
            break;
        }
        let name_len = usize::from(area[off]);
        let index = area[off + 1];
        let value_offs = usize::from(get16(area, off + 2).ok_or("truncated xattr entry")?);
        let value_inum = get32(area, off + 4).ok_or("truncated xattr entry")?;
        let value_size = get32(area, off + 8).ok_or("truncated xattr entry")? as usize;
        let name = area
            .get(off + ENTRY_FIXED..off + ENTRY_FIXED + name_len)
            .ok_or("xattr name runs past its area")?
            .to_vec();
        if value_inum != 0 {
            if value_size == 0 {
                return Err("xattr entry with an EA inode but no value size");
            }
            let entry_hash = get32(area, off + 12).ok_or("truncated xattr entry")?;
            out.push(Xattr {
                index,
                name,
                value: Vec::new(),
                ea: Some(EaRef {
                    inum: value_inum,
                    size: u32::try_from(value_size).map_err(|_| "xattr value size overflows")?,
                    entry_hash,
                }),
            });
            off += (ENTRY_FIXED + name_len + 3) & !3;
            if out.len() > area.len() / ENTRY_FIXED {
                return Err("xattr table does not terminate");
            }
            continue;
        }
        let vstart = values_base
            .checked_add(value_offs)
            .ok_or("xattr value offset overflows")?;
        let value = area
            .get(
                vstart
                    ..vstart
                        .checked_add(value_size)
                        .ok_or("xattr value size overflows")?,
            )
            .ok_or("xattr value runs past its area")?
            .to_vec();
        out.push(Xattr {
            index,
            name,
            value,
            ea: None,
        });
        off += (ENTRY_FIXED + name_len + 3) & !3;
        if out.len() > area.len() / ENTRY_FIXED {
            return Err("xattr table does not terminate");
        }
    }
    Ok(out)
}

/// Bytes a table of `attrs` needs (entries, terminator, values).
pub fn table_len(attrs: &[Xattr]) -> usize {
    attrs.iter().map(Xattr::footprint).sum::<usize>() + 4
}

/// Write `attrs` into `area` (zeroing the rest of it): entries from
/// `entries_at`, values packed at the end. Value offsets are relative to
/// `values_base`. Returns false if they do not fit.
pub fn write_table(
    area: &mut [u8],
    entries_at: usize,
    values_base: usize,
    attrs: &[Xattr],
) -> bool {
    if entries_at + table_len(attrs) > area.len() {
        return false;
    }
    area[entries_at..].fill(0);
    let mut off = entries_at;
    let mut vend = area.len();
    for a in attrs {
        let vstart = vend - a.value_len();
        put16(area, off + 2, (vstart - values_base) as u16);
        area[off] = a.name.len() as u8;
        area[off + 1] = a.index;
        put32(area, off + 4, a.ea.map_or(0, |e| e.inum));
        put32(area, off + 8, a.value_size() as u32);
        put32(area, off + 12, a.hash());
        area[off + ENTRY_FIXED..off + ENTRY_FIXED + a.name.len()].copy_from_slice(&a.name);
        if a.ea.is_some() {
            // The value is elsewhere: offset 0, nothing in this area.
            put16(area, off + 2, 0);
            off += a.entry_len();
            continue;
        }
        area[vstart..vstart + a.value.len()].copy_from_slice(&a.value);
        if a.value.is_empty() {
            // Empty values store offset 0, as Linux does.
            put16(area, off + 2, 0);
        } else {
            vend = vstart;
        }
        off += a.entry_len();
    }
    true
}

/// The order Linux keeps attributes in a block.
pub fn sort_for_block(attrs: &mut [Xattr]) {
    attrs.sort_by(|a, b| {
        a.index
            .cmp(&b.index)
            .then(a.name.len().cmp(&b.name.len()))
            .then(a.name.cmp(&b.name))
    });
}

/// Fill in an xattr block's header (magic, refcount, blocks, hash).
pub fn write_block_header(block: &mut [u8], refcount: u32, attrs: &[Xattr]) {
    block[..BLOCK_HEADER_LEN].fill(0);
    put32(block, 0, MAGIC);
    put32(block, 4, refcount);
    put32(block, 8, 1);
    let mut h = 0u32;
    for a in attrs {
        h = (h << 16) ^ (h >> 16) ^ a.hash();
    }
    put32(block, 12, h);
}

pub fn block_refcount(block: &[u8]) -> u32 {
    get32(block, 4).unwrap_or(0)
}

pub fn block_csum(fs_seed: u32, block_nr: u64, block: &[u8]) -> u32 {
    let c = crc32c_raw(fs_seed, &block_nr.to_le_bytes());
    let c = crc32c_raw(c, &block[..16]);
    let c = crc32c_raw(c, &[0; 4]);
    crc32c_raw(c, &block[20..])
}

pub fn block_csum_stored(block: &[u8]) -> u32 {
    get32(block, 16).unwrap_or(0)
}

pub fn set_block_csum(block: &mut [u8], v: u32) {
    put32(block, 16, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trip() {
        let mut attrs = vec![
            Xattr {
                index: 1,
                name: b"a".to_vec(),
                value: b"hello".to_vec(),
                ea: None,
            },
            Xattr {
                index: 6,
                name: b"selinux".to_vec(),
                value: vec![],
                ea: None,
            },
            Xattr {
                index: 2,
                name: vec![],
                value: vec![1, 2, 3, 4, 5, 6, 7, 8],
                ea: None,
            },
        ];
        attrs.push(Xattr {
            index: 1,
            name: b"big".to_vec(),
            value: Vec::new(),
            ea: Some(EaRef {
                inum: 13,
                size: 70000,
                entry_hash: Xattr::ea_entry_hash(b"big", 0xdead_beef),
            }),
        });
        let mut area = vec![0u8; 200];
        assert!(write_table(&mut area, 4, 4, &attrs));
        // The EA entry takes no value bytes: offset 0, size and inode set.
        let at = 4 + attrs[..3].iter().map(Xattr::entry_len).sum::<usize>();
        assert_eq!(get16(&area, at + 2), Some(0));
        assert_eq!(get32(&area, at + 4), Some(13));
        assert_eq!(get32(&area, at + 8), Some(70000));
        assert_eq!(parse_table(&area, 4, 4).unwrap(), attrs);
        let mut small = vec![0u8; 40];
        assert!(!write_table(&mut small, 0, 0, &attrs));
    }

    #[test]
    fn names_split_and_join() {
        assert_eq!(Xattr::split_name(b"user.foo"), Some((1, b"foo".to_vec())));
        assert_eq!(
            Xattr::split_name(b"system.posix_acl_access"),
            Some((2, vec![]))
        );
        assert_eq!(
            Xattr::split_name(b"system.data"),
            Some((7, b"data".to_vec()))
        );
        assert_eq!(Xattr::split_name(b"bogus.x"), None);
        assert_eq!(Xattr::split_name(b"user."), None);
        let x = Xattr {
            index: 4,
            name: b"t".to_vec(),
            value: vec![],
            ea: None,
        };
        assert_eq!(x.full_name(), b"trusted.t");
    }

    #[test]
    fn hostile_tables_fail_cleanly() {
        let mut area = vec![0xffu8; 64];
        assert!(parse_table(&area, 0, 0).is_err());
        area.fill(0);
        area[0] = 200; // name runs past the area
        area[1] = 1;
        assert!(parse_table(&area, 0, 0).is_err());
    }
}

/// POSIX ACLs: ext4 stores `system.posix_acl_*` in its own compact
/// encoding (version 1; 4-byte entries for the owner, group, mask and
/// other, 8-byte entries with an id for named users and groups), while the
/// xattr interface uses the VFS encoding (version 2, 8-byte entries, id
/// 0xFFFFFFFF where unused).
pub mod acl {
    const EXT4_VERSION: u32 = 1;
    const VFS_VERSION: u32 = 2;
    const USER: u16 = 0x02;
    const GROUP: u16 = 0x08;
    const KNOWN: [u16; 6] = [0x01, USER, 0x04, GROUP, 0x10, 0x20];

    fn le16(b: &[u8], o: usize) -> Option<u16> {
        Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
    }
    fn le32(b: &[u8], o: usize) -> Option<u32> {
        Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
    }

    /// ext4 encoding → VFS encoding; `None` if malformed.
    pub fn to_vfs(ext4: &[u8]) -> Option<Vec<u8>> {
        if le32(ext4, 0)? != EXT4_VERSION {
            return None;
        }
        let mut out = VFS_VERSION.to_le_bytes().to_vec();
        let mut o = 4;
        while o < ext4.len() {
            let tag = le16(ext4, o)?;
            let perm = le16(ext4, o + 2)?;
            if !KNOWN.contains(&tag) {
                return None;
            }
            let id = if tag == USER || tag == GROUP {
                let id = le32(ext4, o + 4)?;
                o += 8;
                id
            } else {
                o += 4;
                u32::MAX
            };
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        Some(out)
    }

    /// VFS encoding → ext4 encoding; `None` if malformed.
    pub fn to_ext4(vfs: &[u8]) -> Option<Vec<u8>> {
        if le32(vfs, 0)? != VFS_VERSION || !(vfs.len() - 4).is_multiple_of(8) {
            return None;
        }
        let mut out = EXT4_VERSION.to_le_bytes().to_vec();
        for e in vfs[4..].chunks_exact(8) {
            let tag = le16(e, 0)?;
            if !KNOWN.contains(&tag) {
                return None;
            }
            out.extend_from_slice(&e[0..4]);
            if tag == USER || tag == GROUP {
                out.extend_from_slice(&e[4..8]);
            }
        }
        Some(out)
    }

    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;

    /// One ACL entry: tag, permission bits (rwx), and the uid or gid of
    /// a named entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Entry {
        pub tag: u16,
        pub perm: u16,
        pub id: u32,
    }

    /// The entries of a VFS-encoded ACL; `None` if malformed.
    pub fn entries(vfs: &[u8]) -> Option<Vec<Entry>> {
        if le32(vfs, 0)? != VFS_VERSION || !(vfs.len() - 4).is_multiple_of(8) {
            return None;
        }
        vfs[4..]
            .chunks_exact(8)
            .map(|e| {
                let tag = le16(e, 0)?;
                KNOWN.contains(&tag).then_some(Entry {
                    tag,
                    perm: le16(e, 2)? & 7,
                    id: le32(e, 4)?,
                })
            })
            .collect()
    }

    /// The VFS encoding of `entries`.
    pub fn encode(entries: &[Entry]) -> Vec<u8> {
        let mut out = VFS_VERSION.to_le_bytes().to_vec();
        for e in entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            let id = if e.tag == USER || e.tag == GROUP {
                e.id
            } else {
                u32::MAX
            };
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// The permission bits an access ACL gives a file, and whether the
    /// ACL says nothing more than they do (no named entries, no mask:
    /// then no ACL is stored, only the mode), as Linux's
    /// `posix_acl_equiv_mode`.
    pub fn equiv_mode(entries: &[Entry]) -> (u16, bool) {
        let mut mode = 0u16;
        let mut equiv = true;
        for e in entries {
            match e.tag {
                USER_OBJ => mode |= e.perm << 6,
                GROUP_OBJ => mode |= e.perm << 3,
                OTHER => mode |= e.perm,
                MASK => {
                    mode = (mode & !0o070) | (e.perm << 3);
                    equiv = false;
                }
                _ => equiv = false,
            }
        }
        // The mask may come before GROUP_OBJ in a caller's order: it wins.
        if let Some(m) = entries.iter().find(|e| e.tag == MASK) {
            mode = (mode & !0o070) | (m.perm << 3);
        }
        (mode, equiv)
    }

    /// A chmod of a file with an access ACL: the owner, group class (the
    /// mask, or the owning group without one) and other entries take the
    /// new mode's bits, as Linux's `posix_acl_chmod`.
    pub fn chmod(entries: &mut [Entry], mode: u16) {
        let has_mask = entries.iter().any(|e| e.tag == MASK);
        for e in entries.iter_mut() {
            match e.tag {
                USER_OBJ => e.perm = (mode >> 6) & 7,
                OTHER => e.perm = mode & 7,
                MASK => e.perm = (mode >> 3) & 7,
                GROUP_OBJ if !has_mask => e.perm = (mode >> 3) & 7,
                _ => {}
            }
        }
    }

    /// A new inode in a directory whose default ACL is `entries`: the
    /// ACL's owner, group class and other entries are masked by the
    /// requested mode and the mode by them, as Linux's
    /// `posix_acl_create_masq`. Returns the new permission bits and
    /// whether the new access ACL says more than they do (it is stored
    /// only then).
    pub fn create_masq(entries: &mut [Entry], mode: u16) -> (u16, bool) {
        let mut mode = mode & 0o777;
        let mut not_equiv = false;
        let has_mask = entries.iter().any(|e| e.tag == MASK);
        for e in entries.iter_mut() {
            match e.tag {
                USER_OBJ => {
                    e.perm &= (mode >> 6) & 7;
                    mode &= (e.perm << 6) | !0o700;
                }
                OTHER => {
                    e.perm &= mode & 7;
                    mode &= e.perm | !0o007;
                }
                MASK => {
                    e.perm &= (mode >> 3) & 7;
                    mode &= (e.perm << 3) | !0o070;
                    not_equiv = true;
                }
                GROUP_OBJ if !has_mask => {
                    e.perm &= (mode >> 3) & 7;
                    mode &= (e.perm << 3) | !0o070;
                }
                USER | GROUP => not_equiv = true,
                _ => {}
            }
        }
        (mode & 0o777, not_equiv)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn acl(list: &[(u16, u16, u32)]) -> Vec<Entry> {
            list.iter()
                .map(|&(tag, perm, id)| Entry {
                    tag,
                    perm,
                    id: if tag == USER || tag == GROUP {
                        id
                    } else {
                        u32::MAX
                    },
                })
                .collect()
        }

        #[test]
        fn an_acl_like_the_mode_is_only_the_mode() {
            // chacl u::r--,g::rwx,o::rw-
            let a = acl(&[(1, 4, 0), (4, 7, 0), (0x20, 6, 0)]);
            assert_eq!(equiv_mode(&a), (0o476, true));
            let b = acl(&[
                (1, 6, 0),
                (2, 4, 1234),
                (4, 0, 0),
                (0x10, 4, 0),
                (0x20, 0, 0),
            ]);
            assert_eq!(
                equiv_mode(&b),
                (0o640, false),
                "the mask is the group class"
            );
            let v = encode(&b);
            assert_eq!(entries(&v).unwrap(), b);
            assert_eq!(to_vfs(&to_ext4(&v).unwrap()).unwrap(), v);
        }

        #[test]
        fn chmod_moves_owner_mask_and_other() {
            let mut a = acl(&[(1, 4, 0), (2, 7, 9), (4, 7, 0), (0x10, 7, 0), (0x20, 6, 0)]);
            chmod(&mut a, 0o640);
            assert_eq!(
                a,
                acl(&[(1, 6, 0), (2, 7, 9), (4, 7, 0), (0x10, 4, 0), (0x20, 0, 0)])
            );
            let mut b = acl(&[(1, 4, 0), (4, 7, 0), (0x20, 6, 0)]);
            chmod(&mut b, 0o751);
            assert_eq!(b, acl(&[(1, 7, 0), (4, 5, 0), (0x20, 1, 0)]));
        }

        #[test]
        fn a_default_acl_masks_the_new_mode_and_the_umask_does_not_apply() {
            // setfacl -d u::r-x,g::r--,o::--- on a directory; touch (0666).
            let mut d = acl(&[(1, 5, 0), (4, 4, 0), (0x20, 0, 0)]);
            assert_eq!(create_masq(&mut d, 0o666), (0o440, false));
            // setfacl -d --set u::rwx,g::rwx,o::- ; mkdir (0777).
            let mut d = acl(&[(1, 7, 0), (4, 7, 0), (0x20, 0, 0)]);
            assert_eq!(create_masq(&mut d, 0o777), (0o770, false));
            assert_eq!(d, acl(&[(1, 7, 0), (4, 7, 0), (0x20, 0, 0)]));
            // A named entry and a mask: the access ACL is kept, masked.
            let mut d = acl(&[(1, 7, 0), (2, 7, 5), (4, 5, 0), (0x10, 7, 0), (0x20, 5, 0)]);
            assert_eq!(create_masq(&mut d, 0o640), (0o640, true));
            assert_eq!(
                d,
                acl(&[(1, 6, 0), (2, 7, 5), (4, 5, 0), (0x10, 4, 0), (0x20, 0, 0)])
            );
        }

        #[test]
        fn round_trip_and_reject_garbage() {
            let mut vfs = 2u32.to_le_bytes().to_vec();
            for (tag, perm, id) in [
                (1u16, 6u16, u32::MAX),
                (2, 4, 1234),
                (4, 4, u32::MAX),
                (0x10, 6, u32::MAX),
                (0x20, 0, u32::MAX),
            ] {
                vfs.extend_from_slice(&tag.to_le_bytes());
                vfs.extend_from_slice(&perm.to_le_bytes());
                vfs.extend_from_slice(&id.to_le_bytes());
            }
            let e = to_ext4(&vfs).unwrap();
            assert_eq!(e.len(), 4 + 4 + 8 + 4 + 4 + 4);
            assert_eq!(to_vfs(&e).unwrap(), vfs);
            assert!(to_ext4(&vfs[..7]).is_none());
            assert!(to_vfs(&[1, 0, 0, 0, 0x40, 0, 0, 0]).is_none());
        }
    }
}
