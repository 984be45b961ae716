//! POSIX-shaped namespace and attribute operations on inode numbers.
//!
//! Permission checks are not made here: the library acts with the
//! caller's full authority (like root); the mount layer enforces access.

use crate::error::{Error, Result};
use crate::format::extent::{write_node, Node};
use crate::format::inode::{
    FileType, Inode, FL_APPEND, FL_EXTENTS, FL_FOLIO_SETTABLE, FL_IMMUTABLE, FL_USER_MODIFIABLE,
    FL_USER_VISIBLE, ROOT_INO, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG,
};

/// EPERM if `inode`'s flags forbid changing it, as the kernel's VFS
/// checks IS_IMMUTABLE and IS_APPEND for ext4: immutable forbids every
/// change; append-only every change but adding (data at the end, entries
/// to a directory) when `adding`.
pub(crate) fn check_changeable(inode: &Inode, adding: bool) -> Result<()> {
    let f = inode.flags();
    if f & FL_IMMUTABLE != 0 {
        return Err(Error::NotPermitted(format!(
            "inode {} is immutable",
            inode.ino
        )));
    }
    if f & FL_APPEND != 0 && !adding {
        return Err(Error::NotPermitted(format!(
            "inode {} is append-only",
            inode.ino
        )));
    }
    Ok(())
}
use crate::format::superblock::{incompat, ro_compat};
use crate::format::Timespec;
use crate::fs::Core;
use crate::fscrypt::need_key;
use folio_pagecache::lockdep::{Held, Level};

/// Link count limit for ext4 (directories past it count as 1 with dir_nlink).
pub const LINK_MAX: u16 = 65000;
const SYMLOOP_MAX: usize = 40;

/// File attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ino: u32,
    pub mode: u16,
    pub file_type: FileType,
    pub nlink: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Allocated space in 512-byte sectors.
    pub blocks_512: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Option<Timespec>,
    pub rdev: (u32, u32),
    pub flags: u32,
    pub generation: u32,
}

/// Attribute changes for [`crate::Filesystem::setattr`]; `None` leaves a field.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// Permission bits (0o7777); the file type is kept.
    pub mode: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timespec>,
    pub mtime: Option<Timespec>,
    pub ctime: Option<Timespec>,
    pub crtime: Option<Timespec>,
    /// Drop setuid/setgid bits and file capabilities as Linux does for this
    /// change by this caller: a size change counts as a write, an owner or
    /// group change as a chown. `None`: the caller has already done it
    /// (as the kernel's VFS does above a FUSE server without
    /// FUSE_HANDLE_KILLPRIV_V2).
    pub drop_privs: Option<Caller>,
}

/// Who makes a change, for the rules that drop setuid/setgid bits and file
/// capabilities ([`crate::Filesystem::drop_privs_for_write`], [`SetAttr`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// The caller's (filesystem) group. Supplementary groups are not
    /// consulted.
    pub gid: u32,
    /// Holds CAP_FSETID.
    pub privileged: bool,
}

const S_ISUID: u16 = 0o4000;
const S_ISGID: u16 = 0o2000;
const S_IXGRP: u16 = 0o0010;

/// The permission bits left after a change by `caller` (Linux 6.x
/// `setattr_should_drop_suidgid` and `chown_common`): setuid and an
/// executable setgid go on a write by an unprivileged caller and on any
/// chown; a non-executable setgid (mandatory locking's marker) goes only
/// when the caller is neither privileged nor in the file's group.
/// Writes touch regular files only; a chown, every non-directory.
fn dropped_mode(mode: u16, gid: u32, caller: Caller, chown: bool) -> u16 {
    // A write or truncate drops bits of regular files only; a chown of any
    // non-directory (fifos, sockets and device nodes too), as Linux's
    // chown_common asks ATTR_KILL_SUID and setattr_should_drop_sgid for
    // every type but directories.
    let ft = mode & S_IFMT;
    if ft == S_IFDIR || (!chown && ft != S_IFREG) {
        return mode;
    }
    let mut m = mode;
    let hard = chown || !caller.privileged;
    if hard {
        m &= !S_ISUID;
    }
    if m & S_ISGID != 0 {
        let keep = if m & S_IXGRP != 0 {
            !hard
        } else {
            caller.privileged || caller.gid == gid
        };
        if !keep {
            m &= !S_ISGID;
        }
    }
    m
}

/// renameat2 flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
    /// RENAME_WHITEOUT: the source name is left pointing at a new
    /// whiteout (a character device 0:0, mode 0) owned by this owner, as
    /// overlayfs asks of its upper directory. Not with `exchange`.
    pub whiteout: Option<Owner>,
}

/// Filesystem statistics, as statfs(2) reports them.
#[derive(Clone, Debug)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub files: u64,
    pub files_free: u64,
    pub name_max: u32,
    pub fsid: u64,
}

/// open(2) flags the library honours.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenFlags {
    /// O_CREAT: create a regular file if the name does not exist.
    pub create: bool,
    /// O_EXCL (with `create`): fail with EEXIST if it exists.
    pub exclusive: bool,
    /// O_TRUNC: truncate an existing regular file to 0.
    pub truncate: bool,
    /// O_DIRECTORY: fail with ENOTDIR unless it is a directory.
    pub directory: bool,
}

/// Who creates a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Core {
    pub(crate) fn next_generation(&mut self) -> u32 {
        // xorshift32: distinct generations for inode checksum seeds and NFS.
        let mut x = self.generation_seed;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.generation_seed = x;
        x
    }

    pub(crate) fn extra_isize(&self) -> u16 {
        let isz = self.geo.inode_size as u16;
        if isz <= 128 {
            return 0;
        }
        let want = self.sb.want_extra_isize().max(self.sb.min_extra_isize());
        let want = if want == 0 { 32 } else { want };
        want.min(isz - 128)
    }

    /// Allocate and initialise a new inode (links 0; the caller sets them).
    fn new_inode(
        &mut self,
        parent: &Inode,
        mode: u16,
        owner: Owner,
        rdev: (u32, u32),
    ) -> Result<Inode> {
        let is_dir = mode & S_IFMT == S_IFDIR;
        let ino = self.alloc_inode(parent.ino, is_dir)?;
        let mut inode = Inode::new(ino, self.geo.inode_size as usize, self.extra_isize());
        let mut mode = mode;
        let mut gid = owner.gid;
        // setgid directories pass their group (and, to directories, the bit) on.
        if parent.mode() & 0o2000 != 0 {
            gid = parent.gid();
            if is_dir {
                mode |= 0o2000;
            }
        }
        inode.set_mode(mode);
        inode.set_uid(owner.uid);
        inode.set_gid(gid);
        let now = Timespec::now();
        inode.set_atime(now);
        inode.set_mtime(now);
        inode.set_ctime(now);
        inode.set_crtime(now);
        let generation = self.next_generation();
        inode.set_generation(generation);
        let ft = FileType::from_mode(mode);
        if matches!(ft, FileType::Regular | FileType::Directory)
            && self.sb.has_incompat(incompat::EXTENTS)
        {
            self.init_extent_root(&mut inode);
        }
        if matches!(ft, FileType::CharDev | FileType::BlockDev) {
            inode.set_rdev(rdev.0, rdev.1);
        }
        // A new life for the number: no state of an earlier one.
        self.inodes.reset(ino);
        Ok(inode)
    }

    pub(crate) fn init_extent_root(&self, inode: &mut Inode) {
        inode.set_flags(inode.flags() | FL_EXTENTS);
        let mut root = [0u8; 60];
        write_node(&mut root, 4, &Node::Leaf(vec![]));
        inode.i_block_mut().copy_from_slice(&root);
    }

    fn dir_inode(&mut self, ino: u32) -> Result<Inode> {
        let d = self.read_inode(ino)?;
        if !d.is_dir() {
            return Err(Error::NotDir);
        }
        if d.links() == 0 {
            return Err(Error::NotFound);
        }
        Ok(d)
    }

    /// Look `name` up in directory `parent`.
    pub fn lookup(&mut self, parent: u32, name: &[u8]) -> Result<u32> {
        let dir = self.dir_inode(parent)?;
        let Some(name) = self.disk_name(&dir, name)? else {
            return Err(Error::NotFound);
        };
        self.dir_lookup(&dir, &name)?
            .map(|(i, _)| i)
            .ok_or(Error::NotFound)
    }

    /// Resolve an absolute path. Symlinks in the middle are followed; the
    /// last component is not (like lstat).
    pub fn resolve(&mut self, path: &str) -> Result<u32> {
        self.resolve_at(ROOT_INO, path.as_bytes(), false, 0)
    }

    /// Resolve a path following a final symlink too (like stat).
    pub fn resolve_follow(&mut self, path: &str) -> Result<u32> {
        self.resolve_at(ROOT_INO, path.as_bytes(), true, 0)
    }

    fn resolve_at(
        &mut self,
        start: u32,
        path: &[u8],
        follow_last: bool,
        depth: usize,
    ) -> Result<u32> {
        if depth > SYMLOOP_MAX {
            return Err(Error::Invalid("too many levels of symbolic links".into()));
        }
        let mut cur = if path.first() == Some(&b'/') {
            ROOT_INO
        } else {
            start
        };
        let comps: Vec<&[u8]> = path
            .split(|&c| c == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .collect();
        for (i, comp) in comps.iter().enumerate() {
            let parent = cur;
            cur = self.lookup(cur, comp)?;
            let last = i + 1 == comps.len();
            if !last || follow_last {
                let inode = self.read_inode(cur)?;
                if inode.is_symlink() {
                    let target = self.readlink(cur)?;
                    cur = self.resolve_at(parent, &target, true, depth + 1)?;
                }
            }
        }
        Ok(cur)
    }

    /// Split "/a/b/c" into (inode of "/a/b", "c").
    pub fn resolve_parent<'a>(&mut self, path: &'a str) -> Result<(u32, &'a str)> {
        let trimmed = path.trim_end_matches('/');
        let (dir, name) = match trimmed.rfind('/') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => ("", trimmed),
        };
        if name.is_empty() {
            return Err(Error::Invalid(format!("{path:?} has no final component")));
        }
        let parent = self.resolve_follow(if dir.is_empty() { "/" } else { dir })?;
        Ok((parent, name))
    }

    /// `st_blocks` of an inode: its blocks, and its delayed ones as ext4
    /// counts them (du sees data not yet placed).
    pub(crate) fn shown_blocks(&self, i: &Inode, ino: u32) -> u64 {
        let huge = self.sb.has_ro_compat(ro_compat::HUGE_FILE);
        i.blocks_512(huge, self.geo.block_size)
            + self.delalloc_blocks(ino) * u64::from(self.geo.block_size / 512)
    }

    /// Attributes of inode `ino`.
    pub fn stat(&mut self, ino: u32) -> Result<Stat> {
        let i = self.read_inode(ino)?;
        let ft = i.file_type();
        // An encrypted symlink's size is that of what readlink shows
        // without the key (the kernel's fscrypt_symlink_getattr).
        let size = if ft == FileType::Symlink && crate::fscrypt::is_encrypted(&i) {
            self.readlink(ino)?.len() as u64
        } else {
            i.size()
        };
        Ok(Stat {
            ino,
            mode: i.mode(),
            file_type: ft,
            nlink: i.links(),
            uid: i.uid(),
            gid: i.gid(),
            size,
            // Delayed blocks count, as in ext4 (du sees data not yet placed).
            blocks_512: self.shown_blocks(&i, ino),
            atime: i.atime(),
            mtime: i.mtime(),
            ctime: i.ctime(),
            crtime: i.crtime(),
            rdev: if matches!(ft, FileType::CharDev | FileType::BlockDev) {
                i.rdev()
            } else {
                (0, 0)
            },
            flags: i.flags(),
            generation: i.generation(),
        })
    }

    /// The inode a file handle names (inode number and, when the handle
    /// carries one, generation), as NFS export and `open_by_handle_at`
    /// need: [`Error::Stale`] unless the number is the root's or a
    /// non-reserved one within the filesystem, the inode is in use (linked,
    /// or unlinked but still open) and its generation matches.
    pub fn stat_by_handle(&mut self, ino: u32, generation: Option<u32>) -> Result<Stat> {
        if ino != ROOT_INO && (ino < self.geo.first_ino || ino > self.geo.inodes_count) {
            return Err(Error::Stale);
        }
        let st = match self.stat(ino) {
            Ok(st) => st,
            Err(Error::NotFound | Error::Invalid(_)) => return Err(Error::Stale),
            Err(e) => return Err(e),
        };
        let open = self.inodes.is_open(ino);
        if st.mode == 0 || (st.nlink == 0 && !open) {
            return Err(Error::Stale);
        }
        if generation.is_some_and(|g| g != st.generation) {
            return Err(Error::Stale);
        }
        Ok(st)
    }

    fn check_new_name(&mut self, dir: &Inode, name: &[u8]) -> Result<()> {
        crate::dir::check_name(name)?;
        if let Some(disk) = self.disk_name(dir, name)? {
            if self.dir_lookup(dir, &disk)?.is_some() {
                return Err(Error::Exists);
            }
        }
        // A new name in an encrypted directory is encrypted with its key.
        need_key(dir, "add a name to it")
    }

    /// Create a non-directory node (regular file, fifo, socket, device).
    /// `mode` includes the file type bits; a missing type means regular.
    pub fn mknod(
        &mut self,
        parent: u32,
        name: &[u8],
        mode: u16,
        rdev: (u32, u32),
        owner: Owner,
    ) -> Result<u32> {
        self.uninline_unless_fits(parent, name)?;
        let c = self.namespace_credits();
        self.retry_nospc(c, |fs| fs.mknod_impl(parent, name, mode, rdev, owner))
    }

    fn mknod_impl(
        &mut self,
        parent: u32,
        name: &[u8],
        mode: u16,
        rdev: (u32, u32),
        owner: Owner,
    ) -> Result<u32> {
        self.check_writable()?;
        let mut dir = self.dir_inode(parent)?;
        check_changeable(&dir, true)?;
        self.check_new_name(&dir, name)?;
        let mode = if mode & S_IFMT == 0 {
            mode | S_IFREG
        } else {
            mode
        };
        let ft = FileType::from_mode(mode);
        if matches!(
            ft,
            FileType::Directory | FileType::Symlink | FileType::Unknown
        ) {
            return Err(Error::Invalid(
                "mknod makes files, fifos, sockets and devices".into(),
            ));
        }
        let mut inode = self.new_inode(&dir, mode, owner, rdev)?;
        inode.set_links(1);
        if let Err(e) = self.inherit_acl(&dir, &mut inode) {
            self.free_inode(inode.ino, false)?;
            return Err(e);
        }
        self.write_inode(&mut inode)?;
        if let Err(e) = self.dir_add(&mut dir, name, inode.ino, ft) {
            self.free_inode(inode.ino, false)?;
            return Err(e);
        }
        Ok(inode.ino)
    }

    /// openat(2) without file handles: resolve `name` in `parent`,
    /// creating or truncating as `flags` say, and return the inode number.
    /// A final symlink is not followed (O_NOFOLLOW).
    pub fn openat(
        &mut self,
        parent: u32,
        name: &[u8],
        flags: OpenFlags,
        perm: u16,
        owner: Owner,
    ) -> Result<u32> {
        match self.lookup(parent, name) {
            Ok(ino) if flags.truncate => self.uninline_past(ino, 0)?,
            Err(Error::NotFound) if flags.create => self.uninline_unless_fits(parent, name)?,
            _ => {}
        }
        // O_TRUNC may free the existing file's blocks.
        let c = self.namespace_credits() + self.name_free_credits(parent, name);
        self.retry_nospc(c, |fs| fs.openat_impl(parent, name, flags, perm, owner))
    }

    fn openat_impl(
        &mut self,
        parent: u32,
        name: &[u8],
        flags: OpenFlags,
        perm: u16,
        owner: Owner,
    ) -> Result<u32> {
        let dir = self.dir_inode(parent)?;
        let found = match self.disk_name(&dir, name)? {
            Some(disk) => self.dir_lookup(&dir, &disk)?,
            None => None,
        };
        let ino = match found {
            Some(_) if flags.create && flags.exclusive => return Err(Error::Exists),
            Some((ino, _)) => ino,
            None if flags.create => return self.create(parent, name, perm, owner),
            None => return Err(Error::NotFound),
        };
        let mut inode = self.read_inode(ino)?;
        if flags.directory && !inode.is_dir() {
            return Err(Error::NotDir);
        }
        if flags.truncate {
            if inode.is_dir() {
                return Err(Error::IsDir);
            }
            need_key(&inode, "truncate it")?;
            crate::verity::check_data_changeable(&inode)?;
            if inode.is_reg() && inode.size() != 0 {
                self.set_size(&mut inode, 0)?;
                self.write_inode(&mut inode)?;
            }
        }
        Ok(ino)
    }

    /// The O_TRUNC part of an open of `ino` (run under its inode lock):
    /// an existing regular file with data is cut to 0; a directory is
    /// EISDIR.
    pub(crate) fn truncate_opened(&mut self, ino: u32) -> Result<()> {
        self.uninline_past(ino, 0)?;
        let c = self.namespace_credits() + self.free_credits(ino);
        self.retry_nospc(c, |fs| {
            let mut inode = fs.read_inode(ino)?;
            if inode.is_dir() {
                return Err(Error::IsDir);
            }
            check_changeable(&inode, false)?;
            need_key(&inode, "truncate it")?;
            crate::verity::check_data_changeable(&inode)?;
            if inode.is_reg() && inode.size() != 0 && inode.links() > 0 {
                fs.set_size(&mut inode, 0)?;
                fs.write_inode(&mut inode)?;
            }
            Ok(())
        })
    }

    /// The inode's flags as chattr/lsattr see them (FS_IOC_GETFLAGS).
    pub fn get_flags(&mut self, ino: u32) -> Result<u32> {
        Ok(self.read_inode(ino)?.flags() & FL_USER_VISIBLE)
    }

    /// Set the inode's flags (FS_IOC_SETFLAGS): the ones ext4 lets users
    /// change take the values in `flags`, the others stay. Immutable and
    /// append-only are enforced (EPERM); a change folio does not honour
    /// (synchronous updates, data journalling, extent migration, casefold,
    /// project inheritance) is refused (EOPNOTSUPP). Who may change
    /// immutable and append-only (CAP_LINUX_IMMUTABLE) is the caller's to
    /// check, as the VFS does before it asks the filesystem.
    pub fn set_flags(&mut self, ino: u32, flags: u32) -> Result<()> {
        let c = self.namespace_credits();
        self.retry_nospc(c, |fs| {
            fs.check_writable()?;
            let mut inode = fs.read_inode(ino)?;
            let old = inode.flags();
            let change = (old ^ flags) & FL_USER_MODIFIABLE;
            if change & !FL_FOLIO_SETTABLE != 0 {
                return Err(Error::Unsupported(format!(
                    "inode flags {:#x} (folio honours {FL_FOLIO_SETTABLE:#x})",
                    change & !FL_FOLIO_SETTABLE
                )));
            }
            if change == 0 {
                return Ok(());
            }
            inode.set_flags((old & !FL_USER_MODIFIABLE) | (flags & FL_USER_MODIFIABLE));
            inode.set_ctime(Timespec::now());
            fs.write_inode(&mut inode)
        })
    }

    /// Create a regular file.
    pub fn create(&mut self, parent: u32, name: &[u8], perm: u16, owner: Owner) -> Result<u32> {
        self.mknod(parent, name, S_IFREG | (perm & 0o7777), (0, 0), owner)
    }

    fn inc_dir_links(&self, dir: &mut Inode) -> Result<()> {
        let l = dir.links();
        if l == 1 {
            return Ok(()); // already counted as "many" (dir_nlink)
        }
        if l + 1 >= LINK_MAX {
            if self.sb.has_ro_compat(ro_compat::DIR_NLINK) {
                dir.set_links(1);
                return Ok(());
            }
            return Err(Error::TooManyLinks);
        }
        dir.set_links(l + 1);
        Ok(())
    }

    fn dec_dir_links(dir: &mut Inode) {
        let l = dir.links();
        if l > 2 {
            dir.set_links(l - 1);
        }
    }

    /// Create a directory.
    pub fn mkdir(&mut self, parent: u32, name: &[u8], perm: u16, owner: Owner) -> Result<u32> {
        self.uninline_unless_fits(parent, name)?;
        let c = self.namespace_credits();
        self.retry_nospc(c, |fs| fs.mkdir_impl(parent, name, perm, owner))
    }

    fn mkdir_impl(&mut self, parent: u32, name: &[u8], perm: u16, owner: Owner) -> Result<u32> {
        self.check_writable()?;
        let mut pdir = self.dir_inode(parent)?;
        check_changeable(&pdir, true)?;
        self.check_new_name(&pdir, name)?;
        let mut probe = pdir.clone();
        self.inc_dir_links(&mut probe)?;
        let mut inode = self.new_inode(&pdir, S_IFDIR | (perm & 0o7777), owner, (0, 0))?;
        inode.set_links(2);
        if let Err(e) = self.inherit_acl(&pdir, &mut inode) {
            self.free_inode(inode.ino, true)?;
            return Err(e);
        }
        // e2fsck wants lost+found in blocks (it must not need any to
        // take entries).
        let lpf = parent == ROOT_INO && name == b"lost+found";
        let init = if self.inline_dirs() && !lpf {
            self.inline_dir_init(&mut inode, parent)
        } else {
            self.dir_init(&mut inode, parent)
        };
        if let Err(e) = init {
            self.free_inode(inode.ino, true)?;
            return Err(e);
        }
        self.write_inode(&mut inode)?;
        if let Err(e) = self.dir_add(&mut pdir, name, inode.ino, FileType::Directory) {
            self.release_inode(&mut inode)?;
            return Err(e);
        }
        let mut pdir = self.read_inode(parent)?;
        self.inc_dir_links(&mut pdir)?;
        self.write_inode(&mut pdir)?;
        Ok(inode.ino)
    }

    /// Create a symbolic link to `target`.
    pub fn symlink(
        &mut self,
        parent: u32,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<u32> {
        self.uninline_unless_fits(parent, name)?;
        let c = self.namespace_credits();
        self.retry_nospc(c, |fs| fs.symlink_impl(parent, name, target, owner))
    }

    fn symlink_impl(
        &mut self,
        parent: u32,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<u32> {
        self.check_writable()?;
        let bs = self.geo.block_size as usize;
        if target.is_empty() {
            return Err(Error::NotFound);
        }
        if target.len() >= bs.min(4096) {
            return Err(Error::NameTooLong);
        }
        let mut dir = self.dir_inode(parent)?;
        check_changeable(&dir, true)?;
        self.check_new_name(&dir, name)?;
        let mut inode = self.new_inode(&dir, S_IFLNK | 0o777, owner, (0, 0))?;
        inode.set_links(1);
        if target.len() < 60 {
            inode.i_block_mut()[..target.len()].copy_from_slice(target);
        } else {
            if self.sb.has_incompat(incompat::EXTENTS) {
                self.init_extent_root(&mut inode);
            }
            if let Err(e) = self.allocate_range(&mut inode, 0, 1) {
                self.free_inode(inode.ino, false)?;
                return Err(e);
            }
            let pblk = match self.map_block(&inode, 0, 1)?.0 {
                crate::bmap::Mapping::Mapped { pblk, .. } => pblk,
                crate::bmap::Mapping::Hole => unreachable!("block 0 was just allocated"),
            };
            let mut buf = vec![0u8; bs];
            buf[..target.len()].copy_from_slice(target);
            self.cache.write(pblk, &buf)?;
        }
        inode.set_size(target.len() as u64);
        self.write_inode(&mut inode)?;
        if let Err(e) = self.dir_add(&mut dir, name, inode.ino, FileType::Symlink) {
            self.release_inode(&mut inode)?;
            return Err(e);
        }
        Ok(inode.ino)
    }

    fn is_fast_symlink(&self, inode: &Inode) -> bool {
        let huge = self.sb.has_ro_compat(ro_compat::HUGE_FILE);
        let ea = if inode.file_acl() != 0 {
            u64::from(self.geo.block_size / 512)
        } else {
            0
        };
        inode.is_symlink() && inode.blocks_512(huge, self.geo.block_size) == ea
    }

    /// The target of symlink `ino`.
    pub fn readlink(&mut self, ino: u32) -> Result<Vec<u8>> {
        let inode = self.read_inode(ino)?;
        if !inode.is_symlink() {
            return Err(Error::Invalid("not a symbolic link".into()));
        }
        if crate::fscrypt::is_encrypted(&inode) {
            let raw = self.readlink_raw(&inode)?;
            return Self::nokey_target(ino, &raw);
        }
        self.readlink_raw(&inode)
    }

    /// The target of symlink `inode` as stored.
    fn readlink_raw(&mut self, inode: &Inode) -> Result<Vec<u8>> {
        let ino = inode.ino;
        let size = inode.size() as usize;
        let bs = self.geo.block_size as usize;
        if Self::is_inline(inode) {
            return self.inline_data(inode);
        }
        if self.is_fast_symlink(inode) {
            return inode
                .i_block()
                .get(..size)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| Error::corrupted(format!("fast symlink {ino} is too long"), 0));
        }
        if size > bs {
            return Err(Error::corrupted(
                format!("symlink {ino} is longer than a block"),
                0,
            ));
        }
        match self.map_block(inode, 0, 1)?.0 {
            crate::bmap::Mapping::Mapped { pblk, .. } => {
                Ok(self.cache.read(pblk)?[..size].to_vec())
            }
            crate::bmap::Mapping::Hole => {
                Err(Error::corrupted(format!("symlink {ino} has no block"), 0))
            }
        }
    }

    /// Add a hard link to `ino` as `new_parent/new_name`.
    pub fn link(&mut self, ino: u32, new_parent: u32, new_name: &[u8]) -> Result<()> {
        self.uninline_unless_fits(new_parent, new_name)?;
        let c = self.namespace_credits();
        self.retry_nospc(c, |fs| fs.link_impl(ino, new_parent, new_name))
    }

    fn link_impl(&mut self, ino: u32, new_parent: u32, new_name: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.note_inode_change(ino, true);
        let mut inode = self.read_inode(ino)?;
        if inode.is_dir() {
            return Err(Error::Invalid(
                "hard links to directories are not allowed".into(),
            ));
        }
        if inode.links() >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        check_changeable(&inode, false)?;
        let mut dir = self.dir_inode(new_parent)?;
        check_changeable(&dir, true)?;
        self.check_new_name(&dir, new_name)?;
        self.dir_add(&mut dir, new_name, ino, inode.file_type())?;
        // dir_add wrote other inodes; re-read before changing this one.
        inode = self.read_inode(ino)?;
        inode.set_links(inode.links() + 1);
        inode.set_ctime(Timespec::now());
        self.write_inode(&mut inode)
    }

    /// Free an inode whose last link is gone: its blocks, its xattr block,
    /// then the inode itself.
    pub(crate) fn release_inode(&mut self, inode: &mut Inode) -> Result<()> {
        let is_dir = inode.is_dir();
        let has_blocks = !Self::is_inline(inode)
            && (matches!(inode.file_type(), FileType::Regular | FileType::Directory)
                || (inode.is_symlink() && !self.is_fast_symlink(inode)));
        if inode.is_reg() {
            self.cache_truncate(inode.ino, 0)?;
        }
        if has_blocks {
            self.truncate_blocks(inode, 0)?;
        }
        if self.has_ea_inode() && inode.flags() & crate::format::inode::FL_EA_INODE == 0 {
            // Values in EA inodes lose this inode's references.
            for x in self.all_xattrs(inode)? {
                if let Some(e) = x.ea {
                    self.ea_inode_unref(inode.ino, &e)?;
                }
            }
        }
        let acl = inode.file_acl();
        if acl != 0 {
            self.check_block(acl, "xattr block", 0)?;
            let refs = crate::format::xattr::block_refcount(self.cache.read(acl)?);
            self.release_xattr_block(acl, refs)?;
            inode.set_file_acl(0);
        }
        if let Some(o) = self.inodes.get(inode.ino) {
            // Nothing a lock-free writer left in memory survives the inode.
            o.discard_ahead();
        }
        inode.set_links(0);
        inode.set_size(0);
        inode.set_blocks_512(0);
        inode.set_dtime(Timespec::now().sec as u32);
        self.write_inode(inode)?;
        self.free_inode(inode.ino, is_dir)?;
        self.inodes.reset(inode.ino);
        Ok(())
    }

    fn drop_link(&mut self, ino: u32) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        let l = inode.links();
        if inode.is_dir() || l <= 1 {
            if self.inodes.is_open(ino) {
                // Still open: keep it on the orphan list until the last
                // close (a crash meanwhile frees it at recovery).
                return self.orphan_add(&mut inode);
            }
            self.release_inode(&mut inode)
        } else {
            inode.set_links(l - 1);
            inode.set_ctime(Timespec::now());
            self.write_inode(&mut inode)
        }
    }

    /// Note that `ino` is open (one more reference). An inode whose last
    /// name goes while it is open stays readable and writable until
    /// [`Self::close_ref`] drops the last reference.
    pub fn open_ref(&mut self, ino: u32) {
        self.inodes.open_ref(ino);
    }

    /// Drop a reference taken by [`Self::open_ref`]; the last one frees an
    /// inode that has no names left.
    pub fn close_ref(&mut self, ino: u32) -> Result<()> {
        if !self.inodes.close_ref(ino) {
            return Ok(());
        }
        let mut inode = self.read_inode(ino)?;
        if inode.links() == 0 && inode.mode() != 0 && self.read_only.is_none() {
            let c = self.namespace_credits() + self.free_credits(ino);
            let h = self.journal_start(c)?;
            let r = self
                .orphan_remove(ino)
                .and_then(|()| self.release_inode(&mut inode));
            self.journal_stop(h)?;
            r?;
        }
        Ok(())
    }

    /// Put an unlinked-but-open inode on the orphan list (`s_last_orphan`,
    /// chained through `i_dtime`, as ext4 does).
    fn orphan_add(&mut self, inode: &mut Inode) -> Result<()> {
        inode.set_links(0);
        inode.set_dtime(self.sb.last_orphan());
        inode.set_ctime(Timespec::now());
        self.write_inode(inode)?;
        self.sb.set_last_orphan(inode.ino);
        self.sb_dirty = true;
        Ok(())
    }

    /// Take `ino` off the orphan list.
    fn orphan_remove(&mut self, ino: u32) -> Result<()> {
        let mut prev: Option<u32> = None;
        let mut cur = self.sb.last_orphan();
        for _ in 0..=self.geo.inodes_count {
            if cur == 0 {
                return Ok(());
            }
            let next = self.read_inode(cur)?.dtime();
            if cur == ino {
                match prev {
                    None => {
                        self.sb.set_last_orphan(next);
                        self.sb_dirty = true;
                    }
                    Some(p) => {
                        let mut pi = self.read_inode(p)?;
                        pi.set_dtime(next);
                        self.write_inode(&mut pi)?;
                    }
                }
                return Ok(());
            }
            prev = Some(cur);
            cur = next;
        }
        Err(Error::corrupted("the orphan list has a loop", 0))
    }

    /// Remove a non-directory name.
    pub fn unlink(&mut self, parent: u32, name: &[u8]) -> Result<()> {
        let c = self.namespace_credits() + self.name_free_credits(parent, name);
        self.retry_nospc(c, |fs| fs.unlink_impl(parent, name))
    }

    fn unlink_impl(&mut self, parent: u32, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        let dir = self.dir_inode(parent)?;
        let name = self.disk_name(&dir, name)?.ok_or(Error::NotFound)?;
        let (ino, _) = self.dir_lookup(&dir, &name)?.ok_or(Error::NotFound)?;
        let victim = self.read_inode(ino)?;
        if victim.is_dir() {
            return Err(Error::IsDir);
        }
        check_changeable(&dir, false)?;
        check_changeable(&victim, false)?;
        self.dir_remove(&dir, &name)?;
        self.touch_dir(parent)?;
        self.drop_link(ino)
    }

    fn touch_dir(&mut self, ino: u32) -> Result<()> {
        let mut d = self.read_inode(ino)?;
        let now = Timespec::now();
        d.set_mtime(now);
        d.set_ctime(now);
        self.write_inode(&mut d)
    }

    /// Remove an empty directory.
    pub fn rmdir(&mut self, parent: u32, name: &[u8]) -> Result<()> {
        let c = self.namespace_credits() + self.name_free_credits(parent, name);
        self.retry_nospc(c, |fs| fs.rmdir_impl(parent, name))
    }

    fn rmdir_impl(&mut self, parent: u32, name: &[u8]) -> Result<()> {
        self.check_writable()?;
        if name == b"." {
            return Err(Error::Invalid("cannot remove \".\"".into()));
        }
        if name == b".." {
            return Err(Error::NotEmpty);
        }
        let dir = self.dir_inode(parent)?;
        let name = self.disk_name(&dir, name)?.ok_or(Error::NotFound)?;
        let (ino, _) = self.dir_lookup(&dir, &name)?.ok_or(Error::NotFound)?;
        let victim = self.read_inode(ino)?;
        if !victim.is_dir() {
            return Err(Error::NotDir);
        }
        if !self.dir_is_empty(&victim)? {
            return Err(Error::NotEmpty);
        }
        check_changeable(&dir, false)?;
        check_changeable(&victim, false)?;
        self.dir_remove(&dir, &name)?;
        let mut dir = self.read_inode(parent)?;
        Self::dec_dir_links(&mut dir);
        let now = Timespec::now();
        dir.set_mtime(now);
        dir.set_ctime(now);
        self.write_inode(&mut dir)?;
        self.drop_link(ino)
    }

    /// Is `ino` (a directory) `ancestor` or below it?
    fn is_within(&mut self, ino: u32, ancestor: u32) -> Result<bool> {
        let mut cur = ino;
        for _ in 0..65536 {
            if cur == ancestor {
                return Ok(true);
            }
            if cur == ROOT_INO {
                return Ok(false);
            }
            cur = self.lookup(cur, b"..")?;
        }
        Err(Error::corrupted(
            "directory tree has a loop through \"..\"",
            0,
        ))
    }

    /// Rename `parent/name` to `new_parent/new_name` (renameat2 semantics).
    pub fn rename(
        &mut self,
        parent: u32,
        name: &[u8],
        new_parent: u32,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        // Names leave and change in inline directories in place; the
        // new one needs room there.
        if self.lookup(parent, name).is_ok() {
            self.uninline_unless_fits(new_parent, new_name)?;
        }
        // A replaced target may lose its last name and its blocks; a
        // whiteout is one more inode.
        let c = 3 * self.namespace_credits() + self.name_free_credits(new_parent, new_name);
        self.retry_nospc(c, |fs| {
            fs.rename_impl(parent, name, new_parent, new_name, flags)
        })
    }

    fn rename_impl(
        &mut self,
        parent: u32,
        name: &[u8],
        new_parent: u32,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        self.check_writable()?;
        if flags.noreplace && flags.exchange {
            return Err(Error::Invalid(
                "RENAME_NOREPLACE and RENAME_EXCHANGE together".into(),
            ));
        }
        if flags.whiteout.is_some() && flags.exchange {
            return Err(Error::Invalid(
                "RENAME_WHITEOUT and RENAME_EXCHANGE together".into(),
            ));
        }
        if name == b"." || name == b".." || new_name == b"." || new_name == b".." {
            return Err(Error::Invalid("cannot rename \".\" or \"..\"".into()));
        }
        crate::dir::check_name(new_name)?;
        let sdir = self.dir_inode(parent)?;
        let ddir = self.dir_inode(new_parent)?;
        if crate::fscrypt::is_encrypted(&sdir) || crate::fscrypt::is_encrypted(&ddir) {
            // Renaming needs the names' keys (the kernel's
            // fscrypt_prepare_rename): only what names nothing fails
            // otherwise.
            let s = self.disk_name(&sdir, name)?.ok_or(Error::NotFound)?;
            self.dir_lookup(&sdir, &s)?.ok_or(Error::NotFound)?;
            need_key(&sdir, "rename out of it")?;
            need_key(&ddir, "rename into it")?;
        }
        let (sino, sft) = self.dir_lookup(&sdir, name)?.ok_or(Error::NotFound)?;
        let target = self.dir_lookup(&ddir, new_name)?;
        // A file's name is part of reaching its data: fdatasync after a
        // rename commits it (stricter than ext4, which leaves that to an
        // fsync of the directory).
        self.note_inode_change(sino, true);
        if let Some((t, _)) = target {
            self.note_inode_change(t, true);
        }
        let s_is_dir = self.read_inode(sino)?.is_dir();
        if flags.noreplace && target.is_some() {
            return Err(Error::Exists);
        }
        check_changeable(&sdir, false)?;
        check_changeable(&self.read_inode(sino)?, false)?;
        match target {
            Some((t, _)) => {
                check_changeable(&ddir, false)?;
                check_changeable(&self.read_inode(t)?, false)?;
            }
            None => check_changeable(&ddir, true)?,
        }
        if flags.exchange {
            let (tino, tft) = target.ok_or(Error::NotFound)?;
            return self.rename_exchange(parent, name, sino, sft, new_parent, new_name, tino, tft);
        }
        if s_is_dir && parent != new_parent && self.is_within(new_parent, sino)? {
            return Err(Error::Invalid("cannot move a directory into itself".into()));
        }
        let mut replaced_dir = false;
        if let Some((tino, _)) = target {
            if tino == sino {
                return Ok(());
            }
            let t = self.read_inode(tino)?;
            if s_is_dir {
                if !t.is_dir() {
                    return Err(Error::NotDir);
                }
                if !self.dir_is_empty(&t)? {
                    return Err(Error::NotEmpty);
                }
            } else if t.is_dir() {
                return Err(Error::IsDir);
            }
            replaced_dir = t.is_dir();
            self.dir_set(&ddir, new_name, sino, sft)?;
            self.drop_link(tino)?;
            self.touch_dir(new_parent)?;
        } else {
            if s_is_dir && parent != new_parent {
                let mut probe = ddir.clone();
                self.inc_dir_links(&mut probe)?;
            }
            let mut ddir = self.read_inode(new_parent)?;
            self.dir_add(&mut ddir, new_name, sino, sft)?;
        }
        let sdir = self.read_inode(parent)?;
        match flags.whiteout {
            Some(owner) => {
                // The source name now reaches a whiteout, made here, as
                // ext4_whiteout_for_rename does.
                let mut w = self.new_inode(&sdir, crate::format::inode::S_IFCHR, owner, (0, 0))?;
                w.set_links(1);
                self.write_inode(&mut w)?;
                let sdir = self.read_inode(parent)?;
                self.dir_set(&sdir, name, w.ino, FileType::CharDev)?;
            }
            None => {
                self.dir_remove(&sdir, name)?;
            }
        }
        self.touch_dir(parent)?;
        if s_is_dir && parent != new_parent {
            let moved = self.read_inode(sino)?;
            self.set_dotdot(&moved, new_parent)?;
            let mut sdir = self.read_inode(parent)?;
            Self::dec_dir_links(&mut sdir);
            self.write_inode(&mut sdir)?;
            if !replaced_dir {
                let mut ddir = self.read_inode(new_parent)?;
                self.inc_dir_links(&mut ddir)?;
                self.write_inode(&mut ddir)?;
            }
        } else if replaced_dir {
            // Same parent: the replaced directory's ".." link is gone.
            let mut d = self.read_inode(new_parent)?;
            Self::dec_dir_links(&mut d);
            self.write_inode(&mut d)?;
        }
        let mut moved = self.read_inode(sino)?;
        moved.set_ctime(Timespec::now());
        self.write_inode(&mut moved)
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_exchange(
        &mut self,
        parent: u32,
        name: &[u8],
        sino: u32,
        sft: FileType,
        new_parent: u32,
        new_name: &[u8],
        tino: u32,
        tft: FileType,
    ) -> Result<()> {
        let s_dir = sft == FileType::Directory || self.read_inode(sino)?.is_dir();
        let t_dir = tft == FileType::Directory || self.read_inode(tino)?.is_dir();
        if parent != new_parent {
            if s_dir && self.is_within(new_parent, sino)? {
                return Err(Error::Invalid("cannot move a directory into itself".into()));
            }
            if t_dir && self.is_within(parent, tino)? {
                return Err(Error::Invalid("cannot move a directory into itself".into()));
            }
        }
        let sdir = self.read_inode(parent)?;
        self.dir_set(&sdir, name, tino, tft)?;
        let ddir = self.read_inode(new_parent)?;
        self.dir_set(&ddir, new_name, sino, sft)?;
        if parent != new_parent && s_dir != t_dir {
            // One directory moves each way at most; fix ".." and counts.
            let (to_new, to_old) = if s_dir {
                (new_parent, parent)
            } else {
                (parent, new_parent)
            };
            let mut gain = self.read_inode(to_new)?;
            self.inc_dir_links(&mut gain)?;
            self.write_inode(&mut gain)?;
            let mut lose = self.read_inode(to_old)?;
            Self::dec_dir_links(&mut lose);
            self.write_inode(&mut lose)?;
        }
        if parent != new_parent {
            if s_dir {
                let m = self.read_inode(sino)?;
                self.set_dotdot(&m, new_parent)?;
            }
            if t_dir {
                let m = self.read_inode(tino)?;
                self.set_dotdot(&m, parent)?;
            }
        }
        self.touch_dir(parent)?;
        self.touch_dir(new_parent)?;
        for i in [sino, tino] {
            let mut x = self.read_inode(i)?;
            x.set_ctime(Timespec::now());
            self.write_inode(&mut x)?;
        }
        Ok(())
    }

    /// Change attributes of `ino`.
    pub fn setattr(&mut self, ino: u32, attr: &SetAttr) -> Result<Stat> {
        if let Some(size) = attr.size {
            let i = self.read_inode(ino)?;
            need_key(&i, "change its size")?;
            crate::verity::check_data_changeable(&i)?;
            self.uninline_past(ino, size)?;
        }
        // A size change invalidates cached pages: that level comes before
        // the transaction (lock order).
        let _order = attr
            .size
            .map(|_| Held::take(Level::Invalidate, u64::from(ino)));
        let c = self.namespace_credits()
            + if attr.size.is_some() {
                self.free_credits(ino)
            } else {
                0
            };
        self.retry_nospc(c, |fs| fs.setattr_impl(ino, attr))
    }

    fn setattr_impl(&mut self, ino: u32, attr: &SetAttr) -> Result<Stat> {
        self.check_writable()?;
        let mut inode = self.read_inode(ino)?;
        // Mode, owner, size and times set by a caller (utimes; times that
        // come with a ctime are the kernel's own writeback of times after
        // writes, which ext4 makes on append-only files too) are changes
        // an immutable or append-only file refuses.
        let user_times = (attr.atime.is_some() || attr.mtime.is_some()) && attr.ctime.is_none();
        if attr.mode.is_some()
            || attr.uid.is_some()
            || attr.gid.is_some()
            || attr.size.is_some()
            || user_times
        {
            check_changeable(&inode, false)?;
        }
        if let Some(caller) = attr.drop_privs {
            let chown = attr.uid.is_some() || attr.gid.is_some();
            if chown || attr.size.is_some() {
                // Judged against the group before the change, as chown(2) does.
                let m = dropped_mode(inode.mode(), inode.gid(), caller, chown);
                inode.set_mode(m);
                self.remove_capability(&mut inode)?;
            }
        }
        if let Some(size) = attr.size {
            if size != inode.size() || inode.is_reg() {
                self.set_size(&mut inode, size)?;
            }
        }
        if let Some(m) = attr.mode {
            inode.set_mode((inode.mode() & S_IFMT) | (m & 0o7777));
            // An access ACL follows the new owner, group-class and other
            // bits (the kernel's posix_acl_chmod).
            if !inode.is_symlink() {
                if let Some(mut acl) = self.acl_of(&inode, 2)? {
                    crate::format::xattr::acl::chmod(&mut acl, m);
                    self.put_acl(&mut inode, 2, Some(&acl))?;
                }
            }
        }
        if let Some(u) = attr.uid {
            inode.set_uid(u);
        }
        if let Some(g) = attr.gid {
            inode.set_gid(g);
        }
        if let Some(t) = attr.atime {
            inode.set_atime(t);
        }
        if let Some(t) = attr.mtime {
            inode.set_mtime(t);
        }
        if let Some(t) = attr.crtime {
            inode.set_crtime(t);
        }
        inode.set_ctime(attr.ctime.unwrap_or_else(Timespec::now));
        self.write_inode(&mut inode)?;
        self.stat(ino)
    }

    /// Drop privileges as a write by `caller` does: setuid, and setgid
    /// where it means privilege, unless the caller is privileged; the
    /// file's capabilities (`security.capability`) always. Does nothing,
    /// and takes no transaction, when there is nothing to drop. Returns
    /// whether the mode changed.
    pub fn drop_privs_for_write(&mut self, ino: u32, caller: Caller) -> Result<bool> {
        let inode = self.read_inode(ino)?;
        let mode = dropped_mode(inode.mode(), inode.gid(), caller, false);
        let caps = self.has_capability(&inode)?;
        if inode.mode() & 0o6000 == 0 && !caps {
            // Nothing any write could drop: later writes may skip asking.
            self.inodes.set_plain(ino, true);
        }
        if mode == inode.mode() && !caps {
            return Ok(false);
        }
        let c = self.namespace_credits();
        self.retry_nospc(c, |fs| {
            fs.check_writable()?;
            let mut inode = fs.read_inode(ino)?;
            let m = dropped_mode(inode.mode(), inode.gid(), caller, false);
            inode.set_mode(m);
            fs.remove_capability(&mut inode)?;
            inode.set_ctime(Timespec::now());
            fs.write_inode(&mut inode)
        })?;
        Ok(mode != inode.mode())
    }

    /// fsync(2)/fdatasync(2) of `ino`: its data and the metadata that
    /// reaches it are durable on return.
    ///
    /// Writes back this file's dirty data (not other files': ordered mode
    /// needs only the data the commit's metadata maps, and delayed or
    /// unwritten blocks map nothing stale). Then, if the running
    /// transaction changed the inode — for fdatasync, in a way that
    /// matters for reading the data back (size, block map; not timestamps)
    /// — commits it (the whole transaction: it is shared by all files, as
    /// in jbd2); otherwise only flushes the device, and only if something
    /// was written since the last flush.
    ///
    /// This is the part under the core lock up to the commit
    /// (`Core::fsync_step` does the rest): `None` if it is done, else
    /// whether it is an fdatasync.
    pub(crate) fn fsync_begin(&mut self, ino: u32, datasync: bool) -> Result<Option<bool>> {
        // A directory's entries live in its blocks, which a timestamp
        // change may accompany alone: fdatasync of a directory is fsync.
        let datasync = datasync && !self.read_inode(ino)?.is_dir();
        if self.read_only.is_some() {
            return Ok(None);
        }
        if self.journal.is_none() {
            self.sync()?;
            return Ok(None);
        }
        self.writeback_range(ino, 0, u64::MAX)?;
        self.flush_ahead(Some(ino))?;
        Ok(Some(datasync))
    }

    /// Blocks taken by fixed metadata (what statfs leaves out of f_blocks).
    fn overhead_blocks(&mut self) -> u64 {
        let itb = (u64::from(self.geo.inodes_per_group) * u64::from(self.geo.inode_size))
            .div_ceil(u64::from(self.geo.block_size));
        let mut o = self.geo.first_data_block;
        for g in 0..self.geo.group_count {
            o += u64::from(self.group_sb_gdt_len(g));
            o += 2 + itb;
        }
        let j = self.sb.journal_inum();
        if j != 0 {
            if let Ok(i) = self.read_inode(j) {
                o += i.size() / u64::from(self.geo.block_size);
            }
        }
        o
    }

    /// Filesystem statistics.
    pub fn statfs(&mut self) -> StatFs {
        let recorded = u64::from(self.sb.overhead_clusters());
        let overhead = if recorded != 0 {
            recorded
        } else {
            self.overhead_blocks()
        };
        // Reserved (delayed) blocks are not free to anyone else.
        let free = self
            .sb
            .free_blocks_count()
            .saturating_sub(self.reserved_blocks());
        let uuid = self.sb.uuid();
        let mut fsid = 0u64;
        for (i, b) in uuid.iter().enumerate() {
            fsid ^= u64::from(*b) << ((i % 8) * 8);
        }
        StatFs {
            block_size: self.geo.block_size,
            blocks: self.geo.blocks_count.saturating_sub(overhead),
            blocks_free: free,
            blocks_avail: free.saturating_sub(self.sb.r_blocks_count()),
            files: u64::from(self.geo.inodes_count),
            files_free: u64::from(self.sb.free_inodes_count()),
            name_max: 255,
            fsid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S_IFIFO: u16 = 0o010000;
    const S_IFCHR: u16 = 0o020000;

    #[test]
    fn chown_drops_setuid_and_setgid_of_every_non_directory() {
        let owner = Caller {
            uid: 1000,
            gid: 100,
            privileged: false,
        };
        for ft in [S_IFREG, S_IFIFO, S_IFCHR] {
            // 06555: group-executable setgid goes with setuid.
            assert_eq!(dropped_mode(ft | 0o6555, 101, owner, true), ft | 0o555);
        }
        // A directory keeps both; a write keeps them on a fifo.
        assert_eq!(
            dropped_mode(S_IFDIR | 0o6555, 101, owner, true),
            S_IFDIR | 0o6555
        );
        assert_eq!(
            dropped_mode(S_IFIFO | 0o6555, 101, owner, false),
            S_IFIFO | 0o6555
        );
        // A write by the owner drops them from a regular file.
        assert_eq!(
            dropped_mode(S_IFREG | 0o6555, 101, owner, false),
            S_IFREG | 0o555
        );
    }
}
