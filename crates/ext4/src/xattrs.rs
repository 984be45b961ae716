//! Extended attribute operations: in-inode table first, then one block.
//!
//! Values are stored and returned as raw bytes, except POSIX ACLs
//! (`system.posix_acl_access` / `_default`): callers see the VFS xattr
//! encoding, the disk holds ext4's compact one, as with Linux.

use crate::error::{Error, Result};
use crate::format::inode::Inode;
use crate::format::xattr::{
    block_csum, block_csum_stored, block_refcount, parse_table, set_block_csum, sort_for_block,
    table_len, write_block_header, write_table, Xattr, BLOCK_HEADER_LEN, MAGIC,
};
use crate::format::{get32, put32, Timespec};
use crate::fs::Core;

/// The name index of `security.` attributes.
const SECURITY_INDEX: u8 = 6;

/// `system.posix_acl_access` and `system.posix_acl_default`.
fn is_acl(index: u8) -> bool {
    index == 2 || index == 3
}

/// The attribute holding ACL `entries` at name index `index` (2: access,
/// 3: default), in ext4's encoding.
fn acl_xattr(index: u8, entries: &[crate::format::xattr::acl::Entry]) -> Result<Xattr> {
    use crate::format::xattr::acl;
    let value = acl::to_ext4(&acl::encode(entries))
        .ok_or_else(|| Error::Invalid("malformed POSIX ACL".into()))?;
    Ok(Xattr {
        index,
        name: Vec::new(),
        value,
        ea: None,
    })
}

/// How `set_xattr` treats an existing attribute (XATTR_CREATE/REPLACE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XattrMode {
    #[default]
    Any,
    /// Fail with EEXIST if it exists.
    Create,
    /// Fail with ENODATA if it does not.
    Replace,
}

impl Core {
    /// The attributes kept in the inode body.
    pub(crate) fn inode_xattrs_of(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        self.inode_xattrs(inode)
    }

    fn inode_xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        let Some(off) = inode.inline_xattr_offset() else {
            return Ok(Vec::new());
        };
        if get32(&inode.raw, off) != Some(MAGIC) {
            return Ok(Vec::new());
        }
        parse_table(&inode.raw[off..], 4, 4)
            .map_err(|e| Error::corrupted(format!("inode {}: in-inode xattrs: {e}", inode.ino), 0))
    }

    fn block_xattrs(&mut self, inode: &Inode) -> Result<Vec<Xattr>> {
        let blk = inode.file_acl();
        if blk == 0 {
            return Ok(Vec::new());
        }
        self.check_block(blk, format_args!("inode {} xattr block", inode.ino), 0)?;
        let data = self.cache.read(blk)?.to_vec();
        if get32(&data, 0) != Some(MAGIC) || get32(&data, 8) != Some(1) {
            return Err(Error::corrupted(
                format!("inode {}: bad xattr block header", inode.ino),
                blk,
            ));
        }
        if self.has_csum() && block_csum(self.csum_seed, blk, &data) != block_csum_stored(&data) {
            return Err(Error::BadChecksum {
                what: format!("xattr block of inode {}", inode.ino),
                block: blk,
            });
        }
        parse_table(&data, BLOCK_HEADER_LEN, 0)
            .map_err(|e| Error::corrupted(format!("inode {}: xattr block: {e}", inode.ino), blk))
    }

    /// All attributes of `inode`, in-inode ones first.
    pub(crate) fn all_xattrs(&mut self, inode: &Inode) -> Result<Vec<Xattr>> {
        let mut v = self.inode_xattrs(inode)?;
        v.extend(self.block_xattrs(inode)?);
        Ok(v)
    }

    /// The value of attribute `name` of inode `ino`.
    pub fn get_xattr(&mut self, ino: u32, name: &[u8]) -> Result<Vec<u8>> {
        let inode = self.read_inode(ino)?;
        let (index, suffix) = Xattr::split_name(name).ok_or(Error::NoAttr)?;
        if crate::inline::is_data_xattr(index, &suffix) {
            return Err(Error::Unsupported("system.data is inline data".into()));
        }
        let x = self
            .all_xattrs(&inode)?
            .into_iter()
            .find(|x| x.index == index && x.name == suffix)
            .ok_or(Error::NoAttr)?;
        let value = self.xattr_value(ino, x)?;
        if is_acl(index) {
            return crate::format::xattr::acl::to_vfs(&value).ok_or_else(|| {
                Error::corrupted(
                    format!("inode {ino}: malformed POSIX ACL"),
                    inode.file_acl(),
                )
            });
        }
        Ok(value)
    }

    /// An attribute's value, from its EA inode when it has one.
    fn xattr_value(&mut self, owner: u32, x: Xattr) -> Result<Vec<u8>> {
        match x.ea {
            Some(e) => self.ea_inode_value(owner, &e, &x.name),
            None => Ok(x.value),
        }
    }

    /// Full names of every attribute of inode `ino`.
    pub fn list_xattr(&mut self, ino: u32) -> Result<Vec<Vec<u8>>> {
        let inode = self.read_inode(ino)?;
        Ok(self
            .all_xattrs(&inode)?
            .iter()
            .filter(|x| !crate::inline::hidden_xattr(x))
            // Indices with no name prefix (9: the encryption context)
            // have no handler in the kernel either: never listed.
            .filter(|x| {
                crate::format::xattr::PREFIXES
                    .iter()
                    .any(|(i, _)| *i == x.index)
            })
            .map(Xattr::full_name)
            .collect())
    }

    /// Set attribute `name` of inode `ino` to `value`. An access ACL
    /// (`system.posix_acl_access`) also sets the permission bits it
    /// implies, and is not stored at all when it says no more than they
    /// do, as the kernel's `posix_acl_update_mode`.
    pub fn set_xattr(
        &mut self,
        ino: u32,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<()> {
        self.set_xattr_by(ino, name, value, mode, None)
    }

    /// [`Self::set_xattr`] by `caller`: setting an access ACL also clears
    /// the setgid bit when the caller is neither in the file's group nor
    /// privileged (`None`: the caller's VFS has done it).
    pub fn set_xattr_by(
        &mut self,
        ino: u32,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
        caller: Option<crate::ops::Caller>,
    ) -> Result<()> {
        if Xattr::split_name(name).is_some_and(|(i, n)| crate::inline::is_data_xattr(i, &n)) {
            return Err(Error::Unsupported("system.data is inline data".into()));
        }
        // system.data must stay in the inode: an inline inode leaves it
        // before its xattrs are laid out again.
        self.uninline(ino)?;
        // A capability may appear: writes must ask the core again.
        self.inodes.set_plain(ino, false);
        // A value in an EA inode: one made, one freed.
        let c = self.namespace_credits()
            + if self.has_ea_inode() {
                2 * (8 + self.summary_credits())
            } else {
                0
            };
        self.retry_nospc(c, |fs| fs.set_xattr_impl(ino, name, value, mode, caller))
    }

    /// The POSIX ACL of `inode` at name index `index` (2: access, 3:
    /// default), if it has one.
    pub(crate) fn acl_of(
        &mut self,
        inode: &Inode,
        index: u8,
    ) -> Result<Option<Vec<crate::format::xattr::acl::Entry>>> {
        use crate::format::xattr::acl;
        let attrs = self.all_xattrs(inode)?;
        let Some(x) = attrs
            .into_iter()
            .find(|x| x.index == index && x.name.is_empty())
        else {
            return Ok(None);
        };
        let value = self.xattr_value(inode.ino, x)?;
        acl::to_vfs(&value)
            .and_then(|v| acl::entries(&v))
            .map(Some)
            .ok_or_else(|| Error::corrupted(format!("inode {}: malformed POSIX ACL", inode.ino), 0))
    }

    /// Store (or, with `None`, remove) the POSIX ACL at `index` of
    /// `inode`; the caller writes the inode.
    pub(crate) fn put_acl(
        &mut self,
        inode: &mut Inode,
        index: u8,
        entries: Option<&[crate::format::xattr::acl::Entry]>,
    ) -> Result<()> {
        let mut attrs = self.all_xattrs(inode)?;
        attrs.retain(|x| !(x.index == index && x.name.is_empty()));
        if let Some(e) = entries {
            attrs.push(acl_xattr(index, e)?);
        }
        self.store_xattrs(inode, attrs)
    }

    /// A new inode in directory `dir` inherits its default ACL, as the
    /// kernel's `posix_acl_create`: the mode asked for is masked by the
    /// ACL (the umask does not apply then: callers apply it only when the
    /// directory has no default ACL), the ACL by the mode and stored as
    /// the access ACL when it says more than the mode, and a directory
    /// gets the default ACL too. The caller writes the inode.
    pub(crate) fn inherit_acl(&mut self, dir: &Inode, inode: &mut Inode) -> Result<()> {
        use crate::format::xattr::acl;
        if inode.is_symlink() {
            return Ok(());
        }
        let Some(default) = self.acl_of(dir, 3)? else {
            return Ok(());
        };
        let mut access = default.clone();
        let (bits, not_equiv) = acl::create_masq(&mut access, inode.mode() & 0o777);
        inode.set_mode((inode.mode() & !0o777) | bits);
        let mut attrs = Vec::new();
        if not_equiv {
            attrs.push(acl_xattr(2, &access)?);
        }
        if inode.is_dir() {
            attrs.push(acl_xattr(3, &default)?);
        }
        if attrs.is_empty() {
            return Ok(());
        }
        self.store_xattrs(inode, attrs)
    }

    fn set_xattr_impl(
        &mut self,
        ino: u32,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
        caller: Option<crate::ops::Caller>,
    ) -> Result<()> {
        self.check_writable()?;
        let (index, suffix) = Xattr::split_name(name)
            .ok_or_else(|| Error::Unsupported("extended attribute namespace".into()))?;
        if suffix.len() > 255 {
            return Err(Error::Range);
        }
        // An access ACL: the mode bits it implies, and whether it is to
        // be stored at all.
        let acl_mode = if index == 2 {
            let e = crate::format::xattr::acl::entries(value)
                .filter(|e| !e.is_empty())
                .ok_or_else(|| Error::Invalid("malformed POSIX ACL".into()))?;
            Some(crate::format::xattr::acl::equiv_mode(&e))
        } else {
            None
        };
        let converted;
        let value = if is_acl(index) {
            converted = crate::format::xattr::acl::to_ext4(value)
                .ok_or_else(|| Error::Invalid("malformed POSIX ACL".into()))?;
            &converted[..]
        } else {
            value
        };
        let mut inode = self.read_inode(ino)?;
        crate::ops::check_changeable(&inode, false)?;
        let mut attrs = self.all_xattrs(&inode)?;
        let pos = attrs
            .iter()
            .position(|x| x.index == index && x.name == suffix);
        match (pos, mode) {
            (Some(_), XattrMode::Create) => return Err(Error::Exists),
            (None, XattrMode::Replace) => return Err(Error::NoAttr),
            _ => {}
        }
        if value.len() > crate::ea_inode::XATTR_SIZE_MAX
            || (!self.has_ea_inode() && value.len() > self.geo.block_size as usize)
        {
            return Err(Error::NoSpace);
        }
        let new = Xattr {
            index,
            name: suffix,
            value: value.to_vec(),
            ea: None,
        };
        let new_name = new.name.clone();
        match (pos, acl_mode) {
            // Nothing more than the mode: only the mode is kept.
            (Some(i), Some((_, true))) => {
                attrs.remove(i);
            }
            (None, Some((_, true))) => {}
            (Some(i), _) => attrs[i] = new,
            (None, _) => attrs.push(new),
        }
        if let Some((bits, _)) = acl_mode {
            // An access ACL sets the group class to its mask, as in ext4:
            // the kernel's permission check consults the ACL through it.
            let mut m = (inode.mode() & !0o777) | bits;
            // And a caller outside the file's group loses its setgid bit.
            if caller.is_some_and(|c| !c.privileged && c.gid != inode.gid()) {
                m &= !0o2000;
            }
            inode.set_mode(m);
        }
        // The entry being set, if it is stored at all.
        let at = attrs
            .iter()
            .position(|x| x.index == index && x.name == new_name);
        let to_ea_inode = |fs: &mut Self, attrs: &mut [Xattr], inode: &Inode| -> Result<_> {
            let Some(i) = at else { return Ok(None) };
            let e = fs.ea_inode_create(inode, &new_name, value)?;
            attrs[i].ea = Some(e);
            attrs[i].value.clear();
            Ok(Some(e))
        };
        // A value no block could hold goes to an EA inode at once.
        let ea_ok = self.has_ea_inode() && !value.is_empty();
        let mut made = None;
        if ea_ok && value.len().next_multiple_of(4) > self.ea_inode_threshold() {
            made = to_ea_inode(self, &mut attrs, &inode)?;
        }
        let snapshot = inode.clone();
        let mut r = self.store_xattrs(&mut inode, attrs.clone());
        if matches!(r, Err(Error::NoSpace)) && ea_ok && made.is_none() && at.is_some() {
            // Inode and block are full: the value goes to an EA inode, as
            // the kernel retries with `in_inode`.
            inode = snapshot;
            made = to_ea_inode(self, &mut attrs, &inode)?;
            r = self.store_xattrs(&mut inode, attrs);
        }
        if let Err(e) = r {
            if let Some(made) = made {
                // The new value's inode is no one's: give it back.
                self.ea_inode_unref(ino, &made)?;
            }
            return Err(e);
        }
        inode.set_ctime(Timespec::now());
        self.write_inode(&mut inode)
    }

    /// Remove attribute `name` of inode `ino`.
    pub fn remove_xattr(&mut self, ino: u32, name: &[u8]) -> Result<()> {
        if Xattr::split_name(name).is_some_and(|(i, n)| crate::inline::is_data_xattr(i, &n)) {
            return Err(Error::Unsupported("system.data is inline data".into()));
        }
        self.uninline(ino)?;
        self.inodes.set_plain(ino, false);
        let c = self.namespace_credits();
        self.retry_nospc(c, |fs| fs.remove_xattr_impl(ino, name))
    }

    fn remove_xattr_impl(&mut self, ino: u32, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        let (index, suffix) = Xattr::split_name(name).ok_or(Error::NoAttr)?;
        let mut inode = self.read_inode(ino)?;
        crate::ops::check_changeable(&inode, false)?;
        let mut attrs = self.all_xattrs(&inode)?;
        let pos = attrs
            .iter()
            .position(|x| x.index == index && x.name == suffix)
            .ok_or(Error::NoAttr)?;
        attrs.remove(pos);
        self.store_xattrs(&mut inode, attrs)?;
        inode.set_ctime(Timespec::now());
        self.write_inode(&mut inode)
    }

    /// Whether `inode` carries file capabilities (`security.capability`).
    pub(crate) fn has_capability(&mut self, inode: &Inode) -> Result<bool> {
        if inode.file_acl() == 0 && inode.inline_xattr_offset().is_none() {
            return Ok(false);
        }
        Ok(self
            .all_xattrs(inode)?
            .iter()
            .any(|x| x.index == SECURITY_INDEX && x.name == b"capability"))
    }

    /// Remove `security.capability` from `inode`, if it has it (what the
    /// kernel does on a write, truncate or chown). The caller writes the
    /// inode.
    pub(crate) fn remove_capability(&mut self, inode: &mut Inode) -> Result<()> {
        if !self.has_capability(inode)? {
            return Ok(());
        }
        let mut attrs = self.all_xattrs(inode)?;
        attrs.retain(|x| !(x.index == SECURITY_INDEX && x.name == b"capability"));
        self.store_xattrs(inode, attrs)
    }

    /// Lay `attrs` out: as many as fit in the inode, in order, the rest in
    /// the xattr block. The caller writes the inode. Values in EA inodes
    /// that `attrs` no longer names lose this inode's reference.
    pub(crate) fn store_xattrs(&mut self, inode: &mut Inode, attrs: Vec<Xattr>) -> Result<()> {
        let before = if self.has_ea_inode() {
            self.all_xattrs(inode)?
        } else {
            Vec::new()
        };
        let gone: Vec<Xattr> = before.into_iter().filter(|x| x.ea.is_some()).collect();
        let kept = attrs.clone();
        self.store_xattrs_inner(inode, attrs)?;
        // An owner's i_blocks counts its values in EA inodes (the blocks
        // the kernel charges to its quota), as e2fsck expects.
        let charge = |x: &Xattr, others: &[Xattr]| match x.ea {
            Some(e)
                if !others
                    .iter()
                    .any(|y| y.ea.is_some_and(|f| f.inum == e.inum)) =>
            {
                self.ea_charge(e.size)
            }
            _ => 0,
        };
        let added: i64 = kept.iter().map(|x| charge(x, &gone)).sum();
        let removed: i64 = gone.iter().map(|x| charge(x, &kept)).sum();
        if added != removed {
            self.add_i_blocks(inode, added - removed)?;
        }
        self.ea_inode_unref_gone(inode.ino, &gone, &kept)
    }

    fn store_xattrs_inner(&mut self, inode: &mut Inode, attrs: Vec<Xattr>) -> Result<()> {
        let bs = self.geo.block_size as usize;
        let inline_off = inode.inline_xattr_offset();
        let mut in_inode = Vec::new();
        let mut in_block = Vec::new();
        let mut room = inline_off.map_or(0, |o| inode.raw.len() - o - 4);
        for a in attrs {
            let fits_inode = inline_off.is_some() && table_len(&in_inode) + a.footprint() <= room;
            if fits_inode && in_block.is_empty() {
                in_inode.push(a);
            } else {
                in_block.push(a);
            }
        }
        if table_len(&in_block) + BLOCK_HEADER_LEN > bs {
            return Err(Error::NoSpace);
        }
        if let Some(off) = inline_off {
            let area = &mut inode.raw[off..];
            if in_inode.is_empty() {
                area.fill(0);
            } else {
                put32(area, 0, MAGIC);
                let ok = write_table(area, 4, 4, &in_inode);
                assert!(ok, "in-inode attributes were sized to fit");
            }
            room = 0;
        }
        let _ = room;
        let spb = i64::from(self.geo.block_size / 512);
        let old = inode.file_acl();
        let old_refs = if old != 0 {
            self.check_block(old, "xattr block", 0)?;
            block_refcount(self.cache.read(old)?)
        } else {
            0
        };
        if in_block.is_empty() {
            if old != 0 {
                self.release_xattr_block(old, old_refs)?;
                inode.set_file_acl(0);
                self.add_i_blocks(inode, -spb)?;
            }
            return Ok(());
        }
        sort_for_block(&mut in_block);
        let mut data = vec![0u8; bs];
        write_block_header(&mut data, 1, &in_block);
        let ok = write_table(&mut data, BLOCK_HEADER_LEN, 0, &in_block);
        assert!(ok, "block attributes were sized to fit");
        let blk = if old != 0 && old_refs <= 1 {
            old
        } else {
            if old != 0 {
                self.release_xattr_block(old, old_refs)?;
            } else {
                self.add_i_blocks(inode, spb)?;
            }
            let goal = self.inode_goal(inode);
            self.alloc_blocks(goal, 1)?.0
        };
        if self.has_csum() {
            let c = block_csum(self.csum_seed, blk, &data);
            set_block_csum(&mut data, c);
        }
        self.cache.write(blk, &data)?;
        inode.set_file_acl(blk);
        Ok(())
    }

    /// Drop one reference to an xattr block, freeing it at zero.
    pub(crate) fn release_xattr_block(&mut self, blk: u64, refs: u32) -> Result<()> {
        if refs <= 1 {
            return self.free_blocks(blk, 1);
        }
        let mut data = self.cache.read(blk)?.to_vec();
        put32(&mut data, 4, refs - 1);
        if self.has_csum() {
            let c = block_csum(self.csum_seed, blk, &data);
            set_block_csum(&mut data, c);
        }
        self.cache.write(blk, &data)?;
        Ok(())
    }
}
