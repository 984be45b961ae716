//! Test helpers for folio: the external oracles (e2fsck, the kernel's ext4
//! through loop mounts), seeded host trees, and tree comparison.
//!
//! Tests that need a tool or root skip with a message outside CI; with
//! `CI=true` a missing prerequisite fails the test instead.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use folio_cli::hostxattr;
use folio_ext4::{FileType, Filesystem, SetAttr};

/// True when running under CI (`CI=true`).
pub fn ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Is `tool` on PATH (or in /sbin, /usr/sbin)?
pub fn have_tool(tool: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/sbin", "/usr/sbin"])
        .any(|d| Path::new(d).join(tool).is_file());
    found
}

/// Returns true if `ok`; otherwise skips (prints why) or, under CI, panics.
pub fn require(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    assert!(!ci(), "CI=true but a test prerequisite is missing: {why}");
    eprintln!("SKIP: {why}");
    false
}

/// Effective uid 0?
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self::under(&std::env::temp_dir(), tag)
    }

    /// A temporary directory in memory (/dev/shm) where there is one, for
    /// scratch files written and read thousands of times.
    pub fn in_memory(tag: &str) -> Self {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            Self::under(shm, tag)
        } else {
            Self::new(tag)
        }
    }

    fn under(base: &Path, tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("folio-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// xorshift64*: a small seeded generator so failures replay from a seed.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Open the image at `path` read-only through folio (`norecovery`: do not
/// replay a journal that needs it, not even in memory).
pub fn open_read_only(path: &Path, norecovery: bool) -> folio_ext4::Filesystem {
    folio_ext4::Filesystem::open_path(
        path,
        folio_ext4::OpenOptions {
            read_only: true,
            norecovery,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Run `e2fsck -fn`; Ok if it reports a clean filesystem.
pub fn e2fsck(img: &Path) -> Result<(), String> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .map_err(|e| format!("cannot run e2fsck: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {} exited {:?}:\n{}{}",
            img.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Run a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A read-only loop mount by the kernel, unmounted on drop.
pub struct LoopMount {
    pub dir: TempDir,
}

impl LoopMount {
    pub fn new(img: &Path) -> Result<Self, String> {
        let dir = TempDir::new("mnt");
        let out = Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(img)
            .arg(&dir.path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(LoopMount { dir })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir.path).status();
    }
}

/// Shut a mounted ext4 filesystem down the way a crash would leave it:
/// the journal is committed but not checkpointed (EXT4_IOC_SHUTDOWN with
/// LOGFLUSH), so the image is left needing recovery.
pub fn shutdown_ext4(mountpoint: &Path) -> Result<(), String> {
    shutdown_ext4_with(mountpoint, true)
}

/// [`shutdown_ext4`], or with `logflush` false, NOLOGFLUSH: the running
/// transaction is not committed, so what fast commits recorded since the
/// last full commit stays in the fast-commit area only.
#[allow(unsafe_code)]
pub fn shutdown_ext4_with(mountpoint: &Path, logflush: bool) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D; // _IOR('X', 125, __u32)
    const LOGFLUSH: u32 = 1;
    const NOLOGFLUSH: u32 = 2;
    let dir = fs::File::open(mountpoint).map_err(|e| e.to_string())?;
    let flags = if logflush { LOGFLUSH } else { NOLOGFLUSH };
    // SAFETY: the descriptor is open for the duration of the call and the
    // argument points to a u32, which is what this ioctl reads.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags as *const u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Truncate or extend file `ino` of `fs` to `size` (ftruncate), panicking
/// on an error.
pub fn set_size(fs: &Filesystem, ino: u32, size: u64) {
    let attr = SetAttr {
        size: Some(size),
        ..Default::default()
    };
    fs.setattr(ino, &attr)
        .unwrap_or_else(|e| panic!("size {size} of inode {ino}: {e}"));
}

/// Can this process make loop mounts (root, mount and losetup present)?
pub fn can_loop_mount() -> bool {
    is_root() && have_tool("mount") && Path::new("/dev/loop-control").exists()
}

/// Build a seeded tree under `root`: nested directories, one large
/// directory, files of many sizes, sparse files (one past 4 GiB), short and
/// long symlinks, hard links, xattrs, varied modes, owners and nanosecond
/// timestamps. Returns the number of entries made.
pub fn make_tree(root: &Path, seed: u64, nfiles: usize) -> usize {
    let mut rng = Rng::new(seed);
    fs::create_dir_all(root).unwrap();
    let mut dirs = vec![root.to_path_buf()];
    let mut files = Vec::new();
    let mut count = 0;
    for d in 0..12 {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let p = parent.join(format!("dir{d}"));
        fs::create_dir(&p).unwrap();
        dirs.push(p);
        count += 1;
    }
    let big = root.join("many");
    fs::create_dir(&big).unwrap();
    for i in 0..nfiles {
        let dir = if i % 2 == 0 {
            big.clone()
        } else {
            dirs[rng.below(dirs.len() as u64) as usize].clone()
        };
        let name = format!("file-{i:05}-{}", "x".repeat(rng.below(40) as usize));
        let p = dir.join(&name);
        let size = match rng.below(10) {
            0 => 0,
            1..=6 => rng.below(5000) as usize,
            7 | 8 => rng.below(70_000) as usize,
            _ => rng.below(600_000) as usize,
        };
        fs::write(&p, rng.bytes(size)).unwrap();
        let mode = [0o644, 0o600, 0o755, 0o640, 0o4755, 0o2750][rng.below(6) as usize];
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        files.push(p);
        count += 1;
    }
    // Sparse files: holes between data, and one past 4 GiB.
    let sp = root.join("sparse");
    {
        let f = fs::File::create(&sp).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[7u8; 10000], 1 << 20).unwrap();
        f.write_all_at(b"tail", (3 << 20) + 5).unwrap();
    }
    let huge = root.join("huge-sparse");
    {
        let f = fs::File::create(&huge).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"past four gibibytes", (4u64 << 30) + 12345)
            .unwrap();
        f.set_len((5u64 << 30) + 1).unwrap();
    }
    count += 2;
    // Symlinks and hard links.
    for i in 0..20 {
        let target = files[rng.below(files.len() as u64) as usize].clone();
        let link = dirs[rng.below(dirs.len() as u64) as usize].join(format!("link{i}"));
        if i % 3 == 0 {
            let long = format!("{}/{}", "long-component".repeat(8), i);
            std::os::unix::fs::symlink(long, &link).unwrap();
        } else {
            std::os::unix::fs::symlink(&target, &link).unwrap();
        }
        count += 1;
    }
    for i in 0..15 {
        let target = files[rng.below(files.len() as u64) as usize].clone();
        let link = dirs[rng.below(dirs.len() as u64) as usize].join(format!("hard{i}"));
        if fs::hard_link(&target, &link).is_ok() {
            count += 1;
        }
    }
    // Extended attributes: small ones in the inode, large ones in a block.
    for (i, f) in files.iter().enumerate().step_by(17) {
        let _ = hostxattr::set(f, b"user.small", format!("v{i}").as_bytes());
        if i % 2 == 0 {
            let _ = hostxattr::set(f, b"user.large", &rng.bytes(400));
        }
    }
    // Owners (as root) and timestamps with nanoseconds.
    let root_user = is_root();
    for (i, f) in files.iter().enumerate() {
        if root_user && i % 5 == 0 {
            std::os::unix::fs::lchown(f, Some(1000 + i as u32 % 7), Some(100 + i as u32 % 3))
                .unwrap();
        }
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                1_600_000_000 + rng.below(100_000_000),
                rng.below(1_000_000_000) as u32,
            );
        let h = fs::File::options().write(true).open(f).unwrap();
        h.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
            .unwrap();
    }
    count
}

/// Attributes compared between two trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub mtime: (i64, u32),
    pub content: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn fnv(h: &mut u64, data: &[u8]) {
    for &b in data {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// Describe a host tree, keyed by relative path.
pub fn host_tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk_host(root, root, &mut out);
    out
}

fn walk_host(root: &Path, p: &Path, out: &mut BTreeMap<String, Node>) {
    let mut entries: Vec<_> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for e in entries {
        let rel = e.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel == "lost+found" {
            continue;
        }
        let m = fs::symlink_metadata(&e).unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", 0)
        } else if ft.is_symlink() {
            let mut h = 0xcbf2_9ce4_8422_2325;
            fnv(
                &mut h,
                fs::read_link(&e).unwrap().as_os_str().as_encoded_bytes(),
            );
            ("symlink", h)
        } else if ft.is_file() {
            let mut h = 0xcbf2_9ce4_8422_2325;
            let data = if m.len() > 64 << 20 {
                sparse_digest(&e)
            } else {
                fs::read(&e).unwrap()
            };
            fnv(&mut h, &data);
            ("file", h)
        } else {
            ("other", 0)
        };
        let mut xattrs = BTreeMap::new();
        for n in hostxattr::list(&e).unwrap_or_default() {
            if !n.starts_with(b"system.") {
                xattrs.insert(n.clone(), hostxattr::get(&e, &n).unwrap());
            }
        }
        out.insert(
            rel.clone(),
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_dir() { 0 } else { m.len() },
                nlink: if ft.is_dir() { 0 } else { m.nlink() },
                mtime: if ft.is_symlink() {
                    (0, 0)
                } else {
                    (m.mtime(), m.mtime_nsec() as u32)
                },
                content,
                xattrs,
            },
        );
        if ft.is_dir() {
            walk_host(root, &e, out);
        }
    }
}

/// For huge sparse files: the bytes at a fixed set of offsets.
fn sparse_digest(p: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len();
    let mut out = Vec::new();
    for off in [
        0,
        4096,
        1 << 20,
        (4u64 << 30) + 12300,
        len.saturating_sub(4096),
    ] {
        let mut b = vec![0u8; 4096.min((len - off.min(len)) as usize)];
        f.read_exact_at(&mut b, off.min(len)).unwrap();
        out.extend(b);
    }
    out
}

/// Describe the tree under directory `ino` of a folio filesystem.
pub fn folio_tree(fs: &mut Filesystem, ino: u32) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk_folio(fs, ino, "", &mut out);
    out
}

fn walk_folio(fs: &mut Filesystem, dir: u32, prefix: &str, out: &mut BTreeMap<String, Node>) {
    let mut entries = fs.read_dir(dir).unwrap();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for e in entries {
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let name = String::from_utf8_lossy(&e.name).into_owned();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if rel == "lost+found" {
            continue;
        }
        let st = fs.stat(e.ino).unwrap();
        let mut h = 0xcbf2_9ce4_8422_2325;
        let kind = match st.file_type {
            FileType::Directory => "dir",
            FileType::Symlink => {
                fnv(&mut h, &fs.readlink(e.ino).unwrap());
                "symlink"
            }
            FileType::Regular => {
                if st.size > 64 << 20 {
                    let mut data = Vec::new();
                    for off in [
                        0,
                        4096,
                        1 << 20,
                        (4u64 << 30) + 12300,
                        st.size.saturating_sub(4096),
                    ] {
                        let mut b = vec![0u8; 4096.min((st.size - off.min(st.size)) as usize)];
                        let n = fs.read(e.ino, off.min(st.size), &mut b).unwrap();
                        assert_eq!(n, b.len());
                        data.extend(b);
                    }
                    fnv(&mut h, &data);
                } else {
                    let mut b = vec![0u8; st.size as usize];
                    let n = fs.read(e.ino, 0, &mut b).unwrap();
                    assert_eq!(n, b.len(), "short read of {rel}");
                    fnv(&mut h, &b);
                }
                "file"
            }
            _ => "other",
        };
        let mut xattrs = BTreeMap::new();
        for n in fs.list_xattr(e.ino).unwrap() {
            if !n.starts_with(b"system.") {
                let v = fs.get_xattr(e.ino, &n).unwrap();
                xattrs.insert(n, v);
            }
        }
        out.insert(
            rel.clone(),
            Node {
                kind,
                mode: u32::from(st.mode & 0o7777),
                uid: st.uid,
                gid: st.gid,
                size: if kind == "dir" { 0 } else { st.size },
                nlink: if kind == "dir" {
                    0
                } else {
                    u64::from(st.nlink)
                },
                mtime: if kind == "symlink" {
                    (0, 0)
                } else {
                    (st.mtime.sec, st.mtime.nsec)
                },
                content: if kind == "dir" { 0 } else { h },
                xattrs,
            },
        );
        if kind == "dir" {
            walk_folio(fs, e.ino, &rel, out);
        }
    }
}

/// Differences between two tree descriptions (at most `max` listed).
pub fn diff_trees(
    a: &BTreeMap<String, Node>,
    b: &BTreeMap<String, Node>,
    max: usize,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("{k}: missing on the right")),
            Some(w) if w != v => d.push(format!("{k}: {v:?} != {w:?}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            d.push(format!("{k}: only on the right"));
        }
    }
    d.truncate(max);
    d
}
