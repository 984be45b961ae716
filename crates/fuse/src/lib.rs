//! Serve a folio [`Filesystem`] through the kernel's FUSE.
//!
//! A thin adapter: every request calls the POSIX-shaped library API from
//! the FUSE worker thread that received it (the library does its own
//! locking) and replies; errno values come from
//! [`folio_ext4::Error::errno`], the one place they are chosen. Permission
//! checks are the kernel's (`default_permissions`). Inode numbers are
//! ext4's, except that the root (2) is FUSE's 1.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use folio_ext4::format::inode::S_IFMT;
use folio_ext4::{
    Caller, DirEntry, Error, FileType as FT, Filesystem, OpenFlags as FOpen, Owner,
    RenameFlags as FRename, SetAttr, Stat, Timespec, XattrMode, ROOT_INO,
};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

/// How long the kernel may cache attributes and entries. Every change goes
/// through this process, so the kernel's cache cannot go stale behind it.
/// How long the kernel may cache attributes and names it was given when
/// the server sets nothing else ([`FolioFuse::with_timeouts`]).
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);

/// The filesystem shared between the FUSE threads and whoever mounted it
/// (who closes it after the session ends).
pub type Shared = Arc<Filesystem>;

/// A FUSE filesystem over a folio [`Filesystem`].
pub struct FolioFuse {
    fs: Shared,
    block_size: u32,
    /// Directory listings snapshotted at opendir, by handle: offsets stay
    /// valid while the directory changes. With each, whether it was read since
    /// the last time the stream was at its start (a `readdir` at offset 0
    /// of a used stream, i.e. after `rewinddir`, reads the directory
    /// again, as POSIX asks).
    dirs: Mutex<HashMap<u64, (Vec<DirEntry>, bool)>>,
    next_fh: AtomicU64,
    /// Set by the mounter once the session exists: lets a request tell the
    /// kernel that attributes it caches have changed behind its back.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// `-o fakeroot`: the mounting user's (uid, gid), which stand for
    /// root's in the image: files root owns are shown as theirs, and what
    /// they create or chown to themselves is stored as root's (as
    /// fakeroot(1) does for a build tree).
    fakeroot: Option<(u32, u32)>,
    /// Threads serving requests (see `with_workers`).
    workers: usize,
    /// Open handles with write access, by inode: only such a file can have
    /// dirty pages in the kernel's writeback cache (its close writes them
    /// back before the release), so `lseek` need not drop the pages of
    /// files nobody is writing.
    writers: Mutex<HashMap<u64, u32>>,
    /// How long the kernel may cache attributes (`attr_timeout=`) and
    /// names (`entry_timeout=`).
    attr_ttl: Duration,
    entry_ttl: Duration,
}

fn to_fuse(ino: u32) -> INodeNo {
    INodeNo(if ino == ROOT_INO { 1 } else { u64::from(ino) })
}

fn from_fuse(ino: INodeNo) -> u32 {
    if ino.0 == 1 {
        ROOT_INO
    } else {
        ino.0 as u32
    }
}

/// Reply to a request whose success carries no data.
fn answer(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn systime(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nsec))
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

fn kind(t: FT) -> FileType {
    match t {
        FT::Directory => FileType::Directory,
        FT::Symlink => FileType::Symlink,
        FT::CharDev => FileType::CharDevice,
        FT::BlockDev => FileType::BlockDevice,
        FT::Fifo => FileType::NamedPipe,
        FT::Socket => FileType::Socket,
        FT::Regular | FT::Unknown => FileType::RegularFile,
    }
}

/// Linux's dev_t encoding of (major, minor).
fn makedev((major, minor): (u32, u32)) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn splitdev(rdev: u32) -> (u32, u32) {
    (
        (rdev >> 8) & 0xfff,
        (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
    )
}

impl FolioFuse {
    pub fn new(fs: Shared) -> Self {
        let block_size = fs.block_size();
        // Start recording attribute changes made behind the kernel's back.
        let _ = fs.take_attr_changes();
        FolioFuse {
            fs,
            block_size,
            dirs: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            notifier: Arc::new(OnceLock::new()),
            fakeroot: None,
            workers: 1,
            attr_ttl: DEFAULT_TTL,
            entry_ttl: DEFAULT_TTL,
        }
    }

    /// How long the kernel may cache the attributes and the names it is
    /// given (libfuse's `attr_timeout` and `entry_timeout`). A mount owns
    /// its image (it is locked), so nothing changes it behind the
    /// kernel's back except what the server itself tells the kernel
    /// about (`invalidate_attrs`), and long timeouts are safe.
    pub fn with_timeouts(mut self, attr: Duration, entry: Duration) -> Self {
        self.attr_ttl = attr;
        self.entry_ttl = entry;
        self
    }

    /// How many threads serve requests (more than one lets an lseek wait
    /// for the kernel's writeback of the file, which others serve).
    pub fn with_workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Map the user `uid`:`gid` to root in the image (`-o fakeroot`).
    pub fn with_fakeroot(mut self, uid: u32, gid: u32) -> Self {
        self.fakeroot = Some((uid, gid));
        self
    }

    /// An id of the image as the kernel is shown it.
    fn shown(&self, uid: u32, gid: u32) -> (u32, u32) {
        match self.fakeroot {
            Some((fu, fg)) => (
                if uid == 0 { fu } else { uid },
                if gid == 0 { fg } else { gid },
            ),
            None => (uid, gid),
        }
    }

    /// An id the kernel sent, as stored in the image.
    fn stored(&self, uid: u32, gid: u32) -> (u32, u32) {
        match self.fakeroot {
            Some((fu, fg)) => (
                if uid == fu { 0 } else { uid },
                if gid == fg { 0 } else { gid },
            ),
            None => (uid, gid),
        }
    }

    /// Where the mounter puts the session's notifier (see
    /// `fuser::Session::notifier`).
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Tell the kernel to forget the attributes of the inodes the library
    /// changed behind its back (`Filesystem::take_attr_changes`; the first
    /// call, at `new`, starts the recording).
    fn invalidate_changed(&self) {
        for ino in self.fs.take_attr_changes() {
            self.invalidate_attrs(ino);
        }
    }

    /// What the flusher thread calls for the inodes its writeback changed
    /// behind the kernel's back (see `invalidate_changed`).
    pub fn attr_invalidator(&self) -> Arc<dyn Fn(u32) + Send + Sync> {
        let slot = self.notifier.clone();
        Arc::new(move |ino| {
            if let Some(n) = slot.get() {
                let _ = n.inval_inode(to_fuse(ino), -1, 0);
            }
        })
    }

    /// Drop the kernel's cached attributes of `ino` (not its pages).
    fn invalidate_attrs(&self, ino: u32) {
        if let Some(n) = self.notifier.get() {
            // Failure only means the kernel has no such inode cached.
            let _ = n.inval_inode(to_fuse(ino), -1, 0);
        }
    }

    /// Run `f` on the filesystem, mapping its error to an errno.
    fn with<T>(&self, f: impl FnOnce(&Filesystem) -> folio_ext4::Result<T>) -> Result<T, Errno> {
        f(&self.fs).map_err(|e| errno(&e))
    }

    fn attr(&self, st: &Stat) -> FileAttr {
        FileAttr {
            ino: to_fuse(st.ino),
            size: st.size,
            blocks: st.blocks_512,
            atime: systime(st.atime),
            mtime: systime(st.mtime),
            ctime: systime(st.ctime),
            crtime: systime(st.crtime.unwrap_or(st.ctime)),
            kind: kind(st.file_type),
            perm: st.mode & 0o7777,
            nlink: u32::from(st.nlink),
            uid: self.shown(st.uid, st.gid).0,
            gid: self.shown(st.uid, st.gid).1,
            rdev: makedev(st.rdev),
            blksize: self.block_size,
            flags: 0,
        }
    }

    fn entry(&self, ino: u32, reply: ReplyEntry) {
        match self.with(|fs| fs.stat(ino)) {
            Ok(st) => reply.entry_with_ttls(
                &self.attr_ttl,
                &self.entry_ttl,
                &self.attr(&st),
                Generation(u64::from(st.generation)),
            ),
            Err(e) => reply.error(e),
        }
    }

    /// The caller, for the privilege-dropping rules. The kernel tells a
    /// FUSE server only uid and gid: root stands for CAP_FSETID and the
    /// supplementary groups are not seen.
    /// One more (`true`) or one fewer open handle with write access to
    /// `ino`.
    fn writer(&self, ino: u32, opened: bool) {
        let mut w = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.entry(u64::from(ino)).or_insert(0);
        if opened {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(&u64::from(ino));
            }
        }
    }

    /// The umask a new inode in `parent` gets: none under a default ACL,
    /// which masks the mode instead (the library applies it), as the
    /// kernel's `posix_acl_create`; the process's otherwise. The kernel
    /// leaves both to folio (FUSE_DONT_MASK).
    fn umask_under(&self, parent: INodeNo, umask: u32) -> u32 {
        let default = self.with(|fs| fs.get_xattr(from_fuse(parent), b"system.posix_acl_default"));
        if default.is_ok() {
            0
        } else {
            umask
        }
    }

    fn caller(&self, req: &Request) -> Caller {
        let (uid, gid) = self.stored(req.uid(), req.gid());
        Caller {
            uid,
            gid,
            privileged: uid == 0,
        }
    }

    fn owner(&self, req: &Request) -> Owner {
        let (uid, gid) = self.stored(req.uid(), req.gid());
        Owner { uid, gid }
    }
}

/// The transport settings of folio's mount, which the benchmarks' memfs
/// (crates/fuse/examples/memfs.rs) shares so that it measures the same
/// transport: large requests (the kernel's own checks do the rest),
/// asynchronous reads, parallel directory operations and the kernel's
/// writeback cache. Each capability is asked for on its own: fuser refuses
/// the whole set if the kernel lacks any one of them (FUSE_BIG_WRITES is
/// implied and no longer offered by recent kernels).
pub fn request_transport(config: &mut KernelConfig) {
    let _ = config.set_max_write(1 << 20);
    let _ = config.set_max_readahead(1 << 20);
    for cap in [
        fuser::InitFlags::FUSE_ASYNC_READ,
        fuser::InitFlags::FUSE_BIG_WRITES,
        fuser::InitFlags::FUSE_PARALLEL_DIROPS,
        // The kernel's page cache absorbs writes and sends them in
        // page-sized batches; it keeps i_size, mtime and ctime itself and
        // sends them back through setattr. Safe for folio because every
        // change to the image goes through its mount.
        fuser::InitFlags::FUSE_WRITEBACK_CACHE,
    ] {
        let _ = config.add_capabilities(cap);
    }
}

const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC32_GETFLAGS: u32 = 0x8004_6601;
const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
/// _IOW('f', 133, struct fsverity_enable_arg), 128 bytes.
const FS_IOC_ENABLE_VERITY: u32 = 0x4080_6685;
/// _IOWR('f', 134, struct fsverity_digest), 4 bytes and the digest.
const FS_IOC_MEASURE_VERITY: u32 = 0xc004_6686;

/// What folio's enable takes of a `struct fsverity_enable_arg`: version
/// 1, SHA-256, the filesystem's block size, no salt, no signature.
fn check_enable_verity(arg: &[u8], fs_block: u32) -> folio_ext4::Result<()> {
    let word = |at: usize| {
        arg.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (Some(version), Some(alg), Some(bs), Some(salt), Some(sig)) =
        (word(0), word(4), word(8), word(12), word(24))
    else {
        return Err(folio_ext4::Error::Invalid(
            "short fsverity_enable_arg".into(),
        ));
    };
    if version != 1 {
        return Err(folio_ext4::Error::Invalid(format!(
            "fs-verity version {version}"
        )));
    }
    if alg != 1 {
        return Err(folio_ext4::Error::Unsupported(format!(
            "fs-verity hash algorithm {alg} (folio builds SHA-256 trees)"
        )));
    }
    if bs != fs_block {
        return Err(folio_ext4::Error::Unsupported(format!(
            "Merkle tree blocks of {bs} bytes (folio builds them of the filesystem's {fs_block})"
        )));
    }
    if salt != 0 || sig != 0 {
        return Err(folio_ext4::Error::Unsupported(
            "fs-verity salts and built-in signatures".into(),
        ));
    }
    Ok(())
}
const FL_IMMUTABLE: u32 = 0x10;
const FL_APPEND: u32 = 0x20;

/// Inode flags ↔ the `fsxattr` flags that stand for them (FS_XFLAG_*):
/// immutable, append-only, sync, no-atime, no-dump.
const XFLAG_PAIRS: [(u32, u32); 5] = [
    (0x10, 0x8),
    (0x20, 0x10),
    (0x8, 0x20),
    (0x80, 0x40),
    (0x40, 0x80),
];

fn xflags_of(flags: u32) -> u32 {
    XFLAG_PAIRS
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .fold(0, |x, (_, xf)| x | xf)
}

fn flags_with_xflags(old: u32, xflags: u32) -> u32 {
    XFLAG_PAIRS.iter().fold(
        old,
        |f, &(fl, xf)| {
            if xflags & xf != 0 {
                f | fl
            } else {
                f & !fl
            }
        },
    )
}

/// Whether open flags ask for write access.
fn writes(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

fn answer_ioctl(reply: fuser::ReplyIoctl, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ioctl(0, &[]),
        Err(e) => reply.error(e),
    }
}

/// What ext4's may_open refuses for a file's flags: any write (or
/// O_TRUNC) of an immutable file; of an append-only one, a write without
/// O_APPEND or an O_TRUNC.
fn check_open_flags(inode_flags: u32, open: i32) -> folio_ext4::Result<()> {
    if inode_flags & folio_ext4::fscrypt::FL_ENCRYPT != 0 {
        // Only regular files are opened this way (directories by
        // opendir): their contents need the key.
        return Err(folio_ext4::Error::NoKey(
            "the file is encrypted and folio holds no keys".into(),
        ));
    }
    let writing = open & libc::O_ACCMODE != libc::O_RDONLY;
    let trunc = open & libc::O_TRUNC != 0;
    if inode_flags & folio_ext4::verity::FL_VERITY != 0 && (writing || trunc) {
        return Err(folio_ext4::Error::NotPermitted(
            "the file has fs-verity: its data is read-only".into(),
        ));
    }
    if inode_flags & FL_IMMUTABLE != 0 && (writing || trunc) {
        return Err(folio_ext4::Error::NotPermitted(
            "the file is immutable".into(),
        ));
    }
    if inode_flags & FL_APPEND != 0 && ((writing && open & libc::O_APPEND == 0) || trunc) {
        return Err(folio_ext4::Error::NotPermitted(
            "the file is append-only: open it with O_APPEND".into(),
        ));
    }
    Ok(())
}

impl fuser::Filesystem for FolioFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        request_transport(config);
        for cap in [
            // The kernel enforces POSIX ACLs (read through getxattr in the
            // VFS encoding the library serves) and keeps mode and ACL mask
            // in step.
            fuser::InitFlags::FUSE_POSIX_ACL,
            // The umask is folio's to apply (`umask_under`): under a
            // default ACL it must not be.
            fuser::InitFlags::FUSE_DONT_MASK,
            // chattr/lsattr on directories too (the kernel's fileattr
            // calls become FUSE_IOCTL requests; see `ioctl`).
            fuser::InitFlags::FUSE_HAS_IOCTL_DIR,
            // Dropping setuid/setgid and capabilities on write, truncate and
            // chown is ours (see `write` and `setattr`): the kernel then
            // stops asking for security.capability before every write.
            fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // File handles (name_to_handle_at/open_by_handle_at, an NFS
            // export of the mount) survive the kernel dropping its inode
            // cache: it looks up "." of the handle's inode number (see
            // `lookup`).
            fuser::InitFlags::FUSE_EXPORT_SUPPORT,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.sync() {
            eprintln!("folio: sync at unmount failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if name.as_bytes() == b"." {
            // FUSE_EXPORT_SUPPORT: a file handle's inode is no longer in
            // the kernel's cache and the kernel asks whether it still
            // exists (for any file type, not only directories); it checks
            // the generation itself. ".." is an ordinary directory entry.
            return match self.with(|fs| fs.stat_by_handle(from_fuse(parent), None)) {
                Ok(st) => reply.entry_with_ttls(
                    &self.attr_ttl,
                    &self.entry_ttl,
                    &self.attr(&st),
                    Generation(u64::from(st.generation)),
                ),
                Err(e) => reply.error(e),
            };
        }
        match self.with(|fs| fs.lookup(from_fuse(parent), name.as_bytes())) {
            Ok(ino) => self.entry(ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|fs| fs.stat(from_fuse(ino))) {
            Ok(st) => reply.attr(&self.attr_ttl, &self.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = |x: TimeOrNow| match x {
            TimeOrNow::SpecificTime(s) => timespec(s),
            TimeOrNow::Now => Timespec::now(),
        };
        let attr = SetAttr {
            mode: mode.map(|m| (m & 0o7777) as u16),
            uid: uid.map(|u| self.stored(u, u32::MAX).0),
            gid: gid.map(|g| self.stored(u32::MAX, g).1),
            size,
            atime: atime.map(t),
            mtime: mtime.map(t),
            ctime: ctime.map(timespec),
            crtime: crtime.map(timespec),
            // FUSE_HANDLE_KILLPRIV_V2: a truncate or chown drops setuid,
            // setgid and capabilities here, not in the kernel.
            drop_privs: Some(self.caller(req)),
        };
        match self.with(|fs| fs.setattr(from_fuse(ino), &attr)) {
            Ok(st) => reply.attr(&self.attr_ttl, &self.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|fs| fs.readlink(from_fuse(ino))) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let umask = self.umask_under(parent, umask);
        let m = ((mode & !umask) & 0o7777) as u16 | (mode as u16 & S_IFMT);
        match self.with(|fs| {
            fs.mknod(
                from_fuse(parent),
                name.as_bytes(),
                m,
                splitdev(rdev),
                self.owner(req),
            )
        }) {
            Ok(ino) => self.entry(ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let umask = self.umask_under(parent, umask);
        let perm = ((mode & !umask) & 0o7777) as u16;
        match self.with(|fs| fs.mkdir(from_fuse(parent), name.as_bytes(), perm, self.owner(req))) {
            Ok(ino) => self.entry(ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(
            reply,
            self.with(|fs| fs.unlink(from_fuse(parent), name.as_bytes())),
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(
            reply,
            self.with(|fs| fs.rmdir(from_fuse(parent), name.as_bytes())),
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = target.as_os_str().as_bytes();
        match self
            .with(|fs| fs.symlink(from_fuse(parent), link_name.as_bytes(), t, self.owner(req)))
        {
            Ok(ino) => self.entry(ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        // The kernel has checked CAP_MKNOD for RENAME_WHITEOUT.
        let f = FRename {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
            whiteout: flags
                .contains(RenameFlags::RENAME_WHITEOUT)
                .then(|| self.owner(req)),
        };
        match self.with(|fs| {
            fs.rename(
                from_fuse(parent),
                name.as_bytes(),
                from_fuse(newparent),
                newname.as_bytes(),
                f,
            )
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let ino = from_fuse(ino);
        match self.with(|fs| fs.link(ino, from_fuse(newparent), newname.as_bytes())) {
            Ok(()) => self.entry(ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = from_fuse(ino);
        match self.with(|fs| {
            fs.stat(ino)?;
            check_open_flags(fs.get_flags(ino)?, flags.0)?;
            fs.open_ref(ino);
            Ok(())
        }) {
            Ok(()) if writes(flags.0) => {
                self.writer(ino, true);
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            // Keep the kernel's cached pages across opens: nothing changes
            // the file except through this mount.
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    /// FS_IOC_GETFLAGS/SETFLAGS (chattr, lsattr) and FS_IOC_FSGETXATTR/
    /// FSSETXATTR (xfs_io's chattr and lsattr), which the kernel sends
    /// for its fileattr calls with a 4-byte flags word or a `fsxattr`.
    /// The kernel has checked ownership and CAP_LINUX_IMMUTABLE.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        let ino = from_fuse(ino);
        let word = |d: &[u8]| {
            d.get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match cmd {
            FS_IOC_GETFLAGS | FS_IOC32_GETFLAGS => match self.with(|fs| fs.get_flags(ino)) {
                Ok(f) => {
                    let out = f.to_le_bytes();
                    let n = (out_size as usize).min(4);
                    reply.ioctl(0, &out[..n]);
                }
                Err(e) => reply.error(e),
            },
            FS_IOC_SETFLAGS | FS_IOC32_SETFLAGS => match word(in_data) {
                Some(f) => answer_ioctl(reply, self.with(|fs| fs.set_flags(ino, f))),
                None => reply.error(Errno::EINVAL),
            },
            FS_IOC_FSGETXATTR => match self.with(|fs| fs.get_flags(ino)) {
                Ok(f) => {
                    // struct fsxattr: fsx_xflags, then four words and 8
                    // bytes of padding, all zero here.
                    let mut out = [0u8; 28];
                    out[..4].copy_from_slice(&xflags_of(f).to_le_bytes());
                    let n = (out_size as usize).min(28);
                    reply.ioctl(0, &out[..n]);
                }
                Err(e) => reply.error(e),
            },
            FS_IOC_FSSETXATTR => match word(in_data) {
                Some(x) => answer_ioctl(
                    reply,
                    self.with(|fs| {
                        let old = fs.get_flags(ino)?;
                        fs.set_flags(ino, flags_with_xflags(old, x))
                    }),
                ),
                None => reply.error(Errno::EINVAL),
            },
            // fsverity-utils' `enable` and `measure` (the kernel passes
            // the argument, and the room for the digest, as in_data and
            // out_size).
            FS_IOC_ENABLE_VERITY => answer_ioctl(
                reply,
                self.with(|fs| {
                    check_enable_verity(in_data, fs.block_size())?;
                    fs.enable_verity(ino).map(|_| ())
                }),
            ),
            FS_IOC_MEASURE_VERITY => match self.with(|fs| fs.verity_digest(ino)) {
                Ok(d) => {
                    let room = in_data
                        .get(2..4)
                        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
                    if room < d.len() || (out_size as usize) < 4 + d.len() {
                        // As fsverity_ioctl_measure: the digest size it
                        // needs goes back with EOVERFLOW.
                        reply.error(Errno::from_i32(libc::EOVERFLOW));
                    } else {
                        let mut out = vec![1u8, 0];
                        out.extend_from_slice(&(d.len() as u16).to_le_bytes());
                        out.extend_from_slice(&d);
                        reply.ioctl(0, &out);
                    }
                }
                Err(e) => reply.error(e),
            },
            _ => reply.error(Errno::ENOTTY),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if writes(flags.0) {
            self.writer(from_fuse(ino), false);
        }
        // The last close of an unlinked file frees it.
        answer(reply, self.with(|fs| fs.close_ref(from_fuse(ino))))
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut buf = vec![0u8; size as usize];
        match self.with(|fs| fs.read(from_fuse(ino), offset, &mut buf)) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel asks for setuid/setgid to go (it knows the caller's
        // capabilities); capabilities go on every write.
        let caller = Caller {
            privileged: !write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID),
            ..self.caller(req)
        };
        let ino = from_fuse(ino);
        match self.with(|fs| {
            let dropped = fs.drop_privs_for_write(ino, caller)?;
            Ok((dropped, fs.write(ino, offset, data)?))
        }) {
            Ok((dropped, n)) => {
                // A writer over the dirty limit wrote back.
                self.invalidate_changed();
                reply.written(n as u32);
                if dropped {
                    // The kernel keeps the mode it had: make it ask again.
                    self.invalidate_attrs(ino);
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close: the kernel writes back the file's dirty
        // pages (and reports their errors) before it would send FLUSH.
        // ENOSYS tells it so once and for all, saving a round trip per
        // close.
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.with(|fs| fs.fsync(from_fuse(ino), datasync));
        // Before the reply, so that a stat after fsync(2) sees the change.
        self.invalidate_changed();
        answer(reply, r)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|fs| fs.read_dir(from_fuse(ino))) {
            Ok(list) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fh, (list, false));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let rewound = match self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
        {
            Some((_, used)) => offset == 0 && *used,
            None => return reply.error(Errno::EBADF),
        };
        if rewound {
            // rewinddir: the stream shows the directory as it is now. (Not
            // under the streams' lock: that one is a leaf.)
            match self.with(|fs| fs.read_dir(from_fuse(ino))) {
                Ok(list) => {
                    if let Some(d) = self
                        .dirs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(&fh.0)
                    {
                        *d = (list, false);
                    }
                }
                Err(e) => return reply.error(e),
            }
        }
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let Some((list, used)) = dirs.get_mut(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        *used = true;
        for (i, e) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(
                to_fuse(e.ino),
                i as u64 + 1,
                kind(e.file_type),
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let ino = from_fuse(ino);
        // The kernel passes no syncfs(2) to a FUSE server, so an fsync of
        // the mount's root directory commits everything (what `remount,ro`
        // and anyone who needs the whole filesystem durable use).
        if ino == ROOT_INO {
            return answer(reply, self.with(Filesystem::sync));
        }
        answer(reply, self.with(|fs| fs.fsync(ino, datasync)))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with(|fs| Ok(fs.statfs())) {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_avail,
                s.files,
                s.files_free,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        answer(
            reply,
            self.with(|fs| {
                // Setting an access ACL clears setgid for a caller outside
                // the file's group (the kernel asks this of servers with
                // FUSE_POSIX_ACL; fuser has no FUSE_SETXATTR_EXT to carry
                // its verdict, so folio judges by the caller's group).
                let by = Some(self.caller(req));
                fs.set_xattr_by(from_fuse(ino), name.as_bytes(), value, mode, by)
            }),
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        #[cfg(debug_assertions)]
        if name.as_bytes() == ESCAPE_PROBE {
            let v = escape_probe();
            return if size == 0 {
                reply.size(v.len() as u32)
            } else {
                reply.data(&v[..v.len().min(size as usize)])
            };
        }
        match self.with(|fs| fs.get_xattr(from_fuse(ino), name.as_bytes())) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.with(|fs| fs.list_xattr(from_fuse(ino))) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if buf.len() <= size as usize {
                    reply.data(&buf)
                } else {
                    reply.error(Errno::ERANGE)
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer(
            reply,
            self.with(|fs| fs.remove_xattr(from_fuse(ino), name.as_bytes())),
        )
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has already checked.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let umask = self.umask_under(parent, umask);
        let perm = ((mode & !umask) & 0o7777) as u16;
        let of = FOpen {
            create: true,
            exclusive: flags & libc::O_EXCL != 0,
            truncate: flags & libc::O_TRUNC != 0,
            directory: false,
        };
        let r = self.with(|fs| {
            let ino = fs.openat(
                from_fuse(parent),
                name.as_bytes(),
                of,
                perm,
                self.owner(req),
            )?;
            check_open_flags(fs.get_flags(ino)?, flags)?;
            fs.open_ref(ino);
            fs.stat(ino)
        });
        if let Ok(st) = &r {
            if writes(flags) {
                self.writer(st.ino, true);
            }
        }
        match r {
            // One timeout for both here (FUSE_CREATE's reply as fuser
            // sends it): the shorter.
            Ok(st) => reply.created(
                &self.attr_ttl.min(self.entry_ttl),
                &self.attr(&st),
                Generation(u64::from(st.generation)),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        // With the writeback cache the kernel may hold data for this file
        // that folio has not seen, and it does not write it back before
        // asking (FUSE_LSEEK): answered from folio's map alone, SEEK_DATA
        // would call fresh data a hole and `cp` would skip it. Invalidating
        // the file's pages makes the kernel write the dirty ones back
        // first (launder_folio: WRITE requests, served by the other
        // workers while this one waits), then the map is complete.
        // Only a file open for writing can have such pages.
        let written = self
            .writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&u64::from(from_fuse(ino)))
            .is_some_and(|&n| n > 0);
        if self.workers > 1 && written {
            if let Some(n) = self.notifier.get() {
                let _ = n.inval_inode(ino, 0, 0);
            }
        }
        match self.with(|fs| fs.seek_data_hole(from_fuse(ino), offset as u64, data)) {
            Ok(p) => reply.offset(p as i64),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        answer(
            reply,
            self.with(|fs| fs.fallocate(from_fuse(ino), mode as u32, offset, length)),
        )
    }
}

/// Debug builds only: reading this extended attribute of any file makes
/// the server try what a compromised server would — open a host file and
/// run a program — and answer how each went (`open=... exec=...`), so
/// that the tests can show the confinement holds (issue 17).
#[cfg(debug_assertions)]
pub const ESCAPE_PROBE: &[u8] = b"user.folio.debug.escape";

#[cfg(debug_assertions)]
pub fn escape_probe() -> Vec<u8> {
    let how = |r: std::io::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e
            .raw_os_error()
            .map_or_else(|| e.to_string(), |n| format!("errno{n}")),
    };
    let open = how(std::fs::File::open("/etc/hostname").map(drop));
    let exec = how(std::process::Command::new("/bin/true").status().map(drop));
    format!("open={open} exec={exec}").into_bytes()
}
