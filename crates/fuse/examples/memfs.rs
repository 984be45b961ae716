//! An in-memory FUSE filesystem that does no filesystem work at all: the
//! FUSE transport's ceiling for folio's benchmarks (issues 12 and 16
//! compare folio with it, as libfuse's memfs_ll was used by hand before;
//! memfs_ll is not packaged in Debian).
//!
//! It is configured as folio's mount is — the same kernel capabilities
//! (writeback cache, async reads, parallel directory operations), 4
//! worker threads, 1 s TTLs, default permissions — and keeps file data in
//! a `Vec<u8>` per file behind a lock of its own, so parallel writers on
//! different files do not contend. It supports what `bench/` drives
//! through it: lookup, getattr, setattr (size, mode, times), create,
//! mkdir, unlink, rmdir, open, read, write, fsync, readdir, statfs.
//!
//!     cargo run --release -p folio-fuse --example memfs -- MOUNTPOINT
//!
//! It serves until unmounted (`fusermount3 -u MOUNTPOINT`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

const TTL: Duration = Duration::from_secs(1);

struct Node {
    attr: FileAttr,
    /// Directory entries (directories only).
    children: BTreeMap<OsString, u64>,
    data: Arc<RwLock<Vec<u8>>>,
}

struct MemFs {
    nodes: Mutex<HashMap<u64, Node>>,
    next: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_attr(ino: u64, kind: FileType, perm: u16, req: &Request) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: req.uid(),
        gid: req.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl MemFs {
    fn add(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: FileType,
        mode: u32,
    ) -> Result<FileAttr, Errno> {
        let mut nodes = lock(&self.nodes);
        let p = nodes.get_mut(&parent.0).ok_or(Errno::ENOENT)?;
        if p.children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        p.children.insert(name.to_os_string(), ino);
        let attr = new_attr(ino, kind, (mode & 0o7777) as u16, req);
        nodes.insert(
            ino,
            Node {
                attr,
                children: BTreeMap::new(),
                data: Arc::default(),
            },
        );
        Ok(attr)
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut nodes = lock(&self.nodes);
        let ino = *nodes
            .get(&parent.0)
            .and_then(|p| p.children.get(name))
            .ok_or(Errno::ENOENT)?;
        let n = nodes.get(&ino).ok_or(Errno::ENOENT)?;
        match (dir, n.attr.kind == FileType::Directory) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !n.children.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        nodes.remove(&ino);
        if let Some(p) = nodes.get_mut(&parent.0) {
            p.children.remove(name);
        }
        Ok(())
    }

    fn data_of(&self, ino: INodeNo) -> Option<Arc<RwLock<Vec<u8>>>> {
        lock(&self.nodes).get(&ino.0).map(|n| Arc::clone(&n.data))
    }
}

impl fuser::Filesystem for MemFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        folio_fuse::request_transport(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let nodes = lock(&self.nodes);
        match nodes
            .get(&parent.0)
            .and_then(|p| p.children.get(name))
            .and_then(|i| nodes.get(i))
        {
            Some(n) => reply.entry(&TTL, &n.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match lock(&self.nodes).get(&ino.0) {
            Some(n) => reply.attr(&TTL, &n.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut nodes = lock(&self.nodes);
        let Some(n) = nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let time = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => SystemTime::now(),
        };
        if let Some(m) = mode {
            n.attr.perm = (m & 0o7777) as u16;
        }
        if let Some(s) = size {
            n.data
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .resize(s as usize, 0);
            n.attr.size = s;
        }
        if let Some(t) = atime {
            n.attr.atime = time(t);
        }
        if let Some(t) = mtime {
            n.attr.mtime = time(t);
        }
        reply.attr(&TTL, &n.attr);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.add(req, parent, name, FileType::Directory, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
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
        let Some(d) = self.data_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let d = d.read().unwrap_or_else(|e| e.into_inner());
        let from = (offset as usize).min(d.len());
        let to = (from + size as usize).min(d.len());
        reply.data(&d[from..to]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(d) = self.data_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let len = {
            let mut d = d.write().unwrap_or_else(|e| e.into_inner());
            let end = offset as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset as usize..end].copy_from_slice(data);
            d.len() as u64
        };
        if let Some(n) = lock(&self.nodes).get_mut(&ino.0) {
            n.attr.size = len;
            n.attr.blocks = len.div_ceil(512);
        }
        reply.written(data.len() as u32);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // As folio's mount: nothing to do at close.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let nodes = lock(&self.nodes);
        let Some(d) = nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let entries = [
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ]
        .into_iter()
        .chain(d.children.iter().map(|(name, &i)| {
            let kind = nodes.get(&i).map_or(FileType::RegularFile, |n| n.attr.kind);
            (i, kind, name.clone())
        }));
        for (k, (i, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.add(req, parent, name, FileType::RegularFile, mode) {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }
}

fn main() -> std::io::Result<()> {
    let Some(mountpoint) = std::env::args_os().nth(1) else {
        eprintln!("usage: memfs MOUNTPOINT");
        std::process::exit(2);
    };
    let fs = MemFs {
        nodes: Mutex::new(HashMap::new()),
        next: AtomicU64::new(2),
    };
    // The root (FUSE's inode 1).
    {
        let now = SystemTime::now();
        lock(&fs.nodes).insert(
            1,
            Node {
                attr: FileAttr {
                    ino: INodeNo(1),
                    size: 0,
                    blocks: 0,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    crtime: now,
                    kind: FileType::Directory,
                    perm: 0o755,
                    nlink: 2,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 4096,
                    flags: 0,
                },
                children: BTreeMap::new(),
                data: Arc::default(),
            },
        );
    }
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("memfs".into()),
        MountOption::Subtype("memfs".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    config.acl = SessionACL::Owner;
    config.n_threads = Some(4);
    let session = fuser::Session::new(fs, mountpoint.as_ref() as &std::path::Path, &config)?;
    session.spawn()?.join()
}
