//! Concurrency stress: threads share one `Filesystem` (`&self`
//! operations from many threads) and run mixed namespace and data
//! operations — create, write, read, truncate, fallocate, rename within
//! and across directories, link, unlink, mkdir/rmdir, readdir, fsync —
//! in private directories and in one shared directory, plus disjoint
//! slices of one shared file. Each thread keeps a model of what it owns
//! (names are unique per thread, so every thread's model is exact even
//! though the threads race on the same directories and inodes). At the
//! end every file's content and every directory's listing are compared
//! with the models, the image is closed, reopened and checked again, and
//! e2fsck must call it clean. Debug builds run the lock-order checker on
//! every lock taken.
//!
//! The seed fixes every thread's sequence of operations; the interleaving
//! is the scheduler's, so a failing seed replays the same operations
//! (run it a few times to catch the same race).
//!
//! `FOLIO_STRESS_SEED=S` runs one seed (a failure prints it),
//! `FOLIO_STRESS_OPS=N` operations per thread (default 1500),
//! `FOLIO_STRESS_THREADS=T` threads (default 8), `FOLIO_STRESS_SEEDS=K`
//! seeds (default 2).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use folio_blockdev::{BlockDevice, FileDevice};
use folio_ext4::falloc::*;
use folio_ext4::mkfs::{mkfs, MkfsOptions};
use folio_ext4::{Filesystem, OpenOptions, Owner, RenameFlags, SetAttr, ROOT_INO};
use folio_testkit::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Largest private file.
const MAX_FILE: u64 = 384 << 10;
/// Each thread's slice of the shared file.
const SLICE: u64 = 96 << 10;

/// What one thread owns: its names (directory inode, name) → inode, and
/// the content of its files by inode.
#[derive(Default)]
struct Model {
    names: BTreeMap<(u32, Vec<u8>), u32>,
    data: HashMap<u32, Vec<u8>>,
    /// Subdirectories it made in the shared directory.
    dirs: BTreeSet<Vec<u8>>,
    slice: Vec<u8>,
    /// Files it holds open (`open_ref`): their writes take the lock-free
    /// path, racing writeback and the other threads' metadata work.
    open: BTreeSet<u32>,
}

impl Model {
    fn files(&self) -> Vec<(u32, Vec<u8>, u32)> {
        self.names
            .iter()
            .map(|((d, n), i)| (*d, n.clone(), *i))
            .collect()
    }
    fn links(&self, ino: u32) -> usize {
        self.names.values().filter(|&&i| i == ino).count()
    }
    /// The names this thread has in `dir` (subdirectories included).
    fn names_in(&self, dir: u32, shared_dir: u32) -> BTreeSet<Vec<u8>> {
        let mut want: BTreeSet<Vec<u8>> = self
            .names
            .keys()
            .filter(|(d, _)| *d == dir)
            .map(|(_, n)| n.clone())
            .collect();
        if dir == shared_dir {
            want.extend(self.dirs.iter().cloned());
        }
        want
    }
}

/// The names in `dir` that start with `prefix` ("." and ".." left out).
fn listing(fs: &Filesystem, dir: u32, prefix: &[u8]) -> Result<BTreeSet<Vec<u8>>, String> {
    Ok(fs
        .read_dir(dir)
        .map_err(|e| format!("readdir {dir}: {e}"))?
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n != b"." && n != b".." && n.starts_with(prefix))
        .collect())
}

struct Shared {
    fs: Filesystem,
    shared_dir: u32,
    big: u32,
}

fn owner() -> Owner {
    Owner { uid: 0, gid: 0 }
}

fn worker(sh: &Shared, t: u32, private: u32, seed: u64, ops: u64) -> Result<Model, String> {
    let fs = &sh.fs;
    let mut rng = Rng::new(seed ^ (u64::from(t) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut m = Model {
        slice: vec![0; SLICE as usize],
        ..Default::default()
    };
    let prefix = format!("t{t}_");
    let mut counter = 0u64;
    let dirs = [private, sh.shared_dir];
    for k in 0..ops {
        let ctx = |what: String| format!("thread {t} op {k}: {what}");
        let files = m.files();
        let pick = |rng: &mut Rng| -> Option<(u32, Vec<u8>, u32)> {
            (!files.is_empty()).then(|| files[rng.below(files.len() as u64) as usize].clone())
        };
        match rng.below(100) {
            // Creates stop at 40 names a thread, so that long runs stay
            // within the image (8 × 40 × 384 KiB).
            0..=11 if m.names.len() < 40 => {
                let dir = dirs[rng.below(2) as usize];
                counter += 1;
                let name = format!("{prefix}{counter}").into_bytes();
                let ino = fs
                    .create(dir, &name, 0o644, owner())
                    .map_err(|e| ctx(format!("create: {e}")))?;
                m.names.insert((dir, name), ino);
                m.data.insert(ino, Vec::new());
                if rng.below(4) != 0 {
                    fs.open_ref(ino);
                    m.open.insert(ino);
                }
            }
            12..=31 => {
                let Some((_, _, ino)) = pick(&mut rng) else {
                    continue;
                };
                let off = rng.below(MAX_FILE - 1);
                let len = (1 + rng.below(24 << 10)).min(MAX_FILE - off) as usize;
                let bytes = rng.bytes(len);
                let n = fs
                    .write(ino, off, &bytes)
                    .map_err(|e| ctx(format!("write {ino} at {off}: {e}")))?;
                if n != len {
                    return Err(ctx(format!("short write {n} of {len}")));
                }
                let d = m.data.get_mut(&ino).expect("modelled");
                let end = off as usize + len;
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[off as usize..end].copy_from_slice(&bytes);
            }
            32..=41 => {
                let Some((_, _, ino)) = pick(&mut rng) else {
                    continue;
                };
                let want = &m.data[&ino];
                let off = rng.below(want.len() as u64 + 1);
                let mut buf = vec![0u8; 1 + rng.below(32 << 10) as usize];
                let n = fs
                    .read(ino, off, &mut buf)
                    .map_err(|e| ctx(format!("read {ino}: {e}")))?;
                let exp = &want[off as usize..(off as usize + buf.len()).min(want.len())];
                if &buf[..n] != exp {
                    return Err(ctx(format!(
                        "read {ino} at {off}: {n} bytes differ from the model ({} expected)",
                        exp.len()
                    )));
                }
            }
            42..=47 => {
                let Some((_, _, ino)) = pick(&mut rng) else {
                    continue;
                };
                let size = rng.below(MAX_FILE);
                fs.setattr(
                    ino,
                    &SetAttr {
                        size: Some(size),
                        ..Default::default()
                    },
                )
                .map_err(|e| ctx(format!("truncate {ino} to {size}: {e}")))?;
                m.data
                    .get_mut(&ino)
                    .expect("modelled")
                    .resize(size as usize, 0);
            }
            48..=53 => {
                let Some((_, _, ino)) = pick(&mut rng) else {
                    continue;
                };
                let mode = [
                    0,
                    FALLOC_FL_KEEP_SIZE,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    FALLOC_FL_ZERO_RANGE,
                ][rng.below(4) as usize];
                let off = rng.below(MAX_FILE - 1);
                let len = (1 + rng.below(64 << 10)).min(MAX_FILE - off);
                fs.fallocate(ino, mode, off, len)
                    .map_err(|e| ctx(format!("fallocate {mode:#x} {ino} {off}+{len}: {e}")))?;
                let d = m.data.get_mut(&ino).expect("modelled");
                let end = (off + len) as usize;
                if mode & FALLOC_FL_KEEP_SIZE == 0 && d.len() < end {
                    d.resize(end, 0);
                }
                if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
                    let stop = end.min(d.len());
                    if (off as usize) < stop {
                        d[off as usize..stop].fill(0);
                    }
                }
            }
            54..=61 => {
                // Rename within or across the two directories.
                let Some((dir, name, ino)) = pick(&mut rng) else {
                    continue;
                };
                let to = dirs[rng.below(2) as usize];
                counter += 1;
                let new = format!("{prefix}{counter}").into_bytes();
                fs.rename(dir, &name, to, &new, RenameFlags::default())
                    .map_err(|e| ctx(format!("rename {ino}: {e}")))?;
                m.names.remove(&(dir, name));
                m.names.insert((to, new), ino);
            }
            62..=65 => {
                let Some((_, _, ino)) = pick(&mut rng) else {
                    continue;
                };
                let to = dirs[rng.below(2) as usize];
                counter += 1;
                let new = format!("{prefix}{counter}").into_bytes();
                fs.link(ino, to, &new)
                    .map_err(|e| ctx(format!("link {ino}: {e}")))?;
                m.names.insert((to, new), ino);
            }
            66..=73 => {
                let Some((dir, name, ino)) = pick(&mut rng) else {
                    continue;
                };
                fs.unlink(dir, &name)
                    .map_err(|e| ctx(format!("unlink {ino}: {e}")))?;
                m.names.remove(&(dir, name));
                if m.links(ino) == 0 {
                    m.data.remove(&ino);
                    if m.open.remove(&ino) {
                        // The last reference frees the unlinked file.
                        fs.close_ref(ino)
                            .map_err(|e| ctx(format!("close {ino}: {e}")))?;
                    }
                }
            }
            74..=77 => {
                // The private directory is this thread's alone: exact.
                let got = listing(fs, private, b"").map_err(ctx)?;
                if got != m.names_in(private, sh.shared_dir) {
                    return Err(ctx(format!(
                        "private listing: {} entries differ",
                        got.len()
                    )));
                }
            }
            78..=80 => {
                // The shared directory: this thread's entries are exactly
                // its model's, whatever the others are doing.
                let got = listing(fs, sh.shared_dir, prefix.as_bytes()).map_err(ctx)?;
                if got != m.names_in(sh.shared_dir, sh.shared_dir) {
                    return Err(ctx(format!(
                        "shared listing: {} own entries differ",
                        got.len()
                    )));
                }
            }
            81..=84 => {
                let Some((_, _, ino)) = pick(&mut rng) else {
                    continue;
                };
                fs.fsync(ino, rng.below(2) == 0)
                    .map_err(|e| ctx(format!("fsync {ino}: {e}")))?;
            }
            85..=88 => {
                // A subdirectory in the shared directory, made or removed.
                if let Some(d) = m.dirs.iter().next().cloned().filter(|_| rng.below(2) == 0) {
                    fs.rmdir(sh.shared_dir, &d)
                        .map_err(|e| ctx(format!("rmdir: {e}")))?;
                    m.dirs.remove(&d);
                } else {
                    counter += 1;
                    let name = format!("{prefix}{counter}d").into_bytes();
                    fs.mkdir(sh.shared_dir, &name, 0o755, owner())
                        .map_err(|e| ctx(format!("mkdir: {e}")))?;
                    m.dirs.insert(name);
                }
            }
            89..=95 => {
                // This thread's slice of the shared file.
                let base = u64::from(t) * SLICE;
                let off = rng.below(SLICE - 1);
                let len = (1 + rng.below(16 << 10)).min(SLICE - off) as usize;
                let bytes = rng.bytes(len);
                fs.write(sh.big, base + off, &bytes)
                    .map_err(|e| ctx(format!("write shared file: {e}")))?;
                m.slice[off as usize..off as usize + len].copy_from_slice(&bytes);
                let mut back = vec![0u8; SLICE as usize];
                let n = fs
                    .read(sh.big, base, &mut back)
                    .map_err(|e| ctx(format!("read shared file: {e}")))?;
                if back[..n] != m.slice[..n] {
                    return Err(ctx("shared file slice differs from the model".into()));
                }
            }
            _ => {
                let Some((_, _, ino)) = pick(&mut rng) else {
                    continue;
                };
                let st = fs.stat(ino).map_err(|e| ctx(format!("stat {ino}: {e}")))?;
                let want = m.data[&ino].len() as u64;
                if st.size != want || usize::from(st.nlink) != m.links(ino) {
                    return Err(ctx(format!(
                        "stat {ino}: size {} nlink {}, model {want} {}",
                        st.size,
                        st.nlink,
                        m.links(ino)
                    )));
                }
            }
        }
    }
    for &ino in &m.open {
        fs.close_ref(ino)
            .map_err(|e| format!("thread {t}: close {ino}: {e}"))?;
    }
    Ok(m)
}

/// Everything the models say, checked against the filesystem.
fn verify(
    fs: &Filesystem,
    sh_dir: u32,
    big: u32,
    privs: &[u32],
    models: &[Model],
) -> Result<(), String> {
    let mut shared_want = BTreeSet::new();
    for (t, m) in models.iter().enumerate() {
        for ((dir, name), ino) in &m.names {
            let found = fs.lookup(*dir, name).map_err(|e| {
                format!("thread {t}: lookup {}: {e}", String::from_utf8_lossy(name))
            })?;
            if found != *ino {
                return Err(format!(
                    "thread {t}: {} is inode {found}, model {ino}",
                    String::from_utf8_lossy(name)
                ));
            }
        }
        shared_want.extend(m.names_in(sh_dir, sh_dir));
        for (ino, want) in &m.data {
            let mut got = vec![0u8; want.len() + 1];
            let n = fs
                .read(*ino, 0, &mut got)
                .map_err(|e| format!("read {ino}: {e}"))?;
            if n != want.len() || &got[..n] != want.as_slice() {
                return Err(format!(
                    "thread {t}: inode {ino}: content differs ({n} bytes, model {})",
                    want.len()
                ));
            }
        }
        if listing(fs, privs[t], b"")? != m.names_in(privs[t], sh_dir) {
            return Err(format!("thread {t}: private listing differs"));
        }
        let mut slice = vec![0u8; SLICE as usize];
        let n = fs
            .read(big, t as u64 * SLICE, &mut slice)
            .map_err(|e| e.to_string())?;
        if slice[..n] != m.slice[..n] || m.slice[n..].iter().any(|&b| b != 0) {
            return Err(format!("thread {t}: shared file slice differs"));
        }
    }
    let got = listing(fs, sh_dir, b"")?;
    if got != shared_want {
        return Err(format!(
            "shared listing: {} entries, models {}",
            got.len(),
            shared_want.len()
        ));
    }
    Ok(())
}

fn run(seed: u64, threads: u32, ops: u64) -> Result<(), String> {
    let dir = TempDir::new("stress");
    let img = dir.join("stress.img");
    let size = 256u64 << 20;
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(size))
        .map_err(|e| e.to_string())?;
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&img, false).map_err(|e| e.to_string())?);
    // Even seeds: an inline_data image (new directories inline, small
    // files inline from their first write, converted as they grow, while
    // the other threads race).
    let mut features = folio_ext4::mkfs::Features::defaults(folio_ext4::mkfs::FsType::Ext4);
    if seed.is_multiple_of(2) {
        features.edit("inline_data").unwrap();
    }
    let mkopts = MkfsOptions {
        features: Some(features),
        ..Default::default()
    };
    mkfs(dev, size, &mkopts).map_err(|e| e.to_string())?;
    let mut opts = OpenOptions::default();
    // Odd seeds: a small page cache, so reclaim and throttled writeback
    // run inside the racing writes.
    if seed % 2 == 1 {
        opts.page_cache.budget_bytes = 2 << 20;
    }
    let fs = Filesystem::open_path(&img, opts.clone()).map_err(|e| e.to_string())?;
    let shared_dir = fs
        .mkdir(ROOT_INO, b"shared", 0o755, owner())
        .map_err(|e| e.to_string())?;
    let big = fs
        .create(ROOT_INO, b"big", 0o644, owner())
        .map_err(|e| e.to_string())?;
    fs.open_ref(big);
    let privs: Vec<u32> = (0..threads)
        .map(|t| fs.mkdir(ROOT_INO, format!("t{t}").as_bytes(), 0o755, owner()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let sh = Shared {
        fs,
        shared_dir,
        big,
    };
    let models: Vec<Model> = std::thread::scope(|s| {
        let handles: Vec<_> = privs
            .iter()
            .enumerate()
            .map(|(t, &p)| {
                let sh = &sh;
                s.spawn(move || worker(sh, t as u32, p, seed, ops))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect::<Result<Vec<_>, String>>()
    })?;
    verify(&sh.fs, shared_dir, big, &privs, &models).map_err(|e| format!("after the run: {e}"))?;
    sh.fs.close_ref(big).map_err(|e| e.to_string())?;
    if sh.fs.lock_free_write_bytes() == 0 {
        return Err("no write took the lock-free path".into());
    }
    sh.fs.close().map_err(|e| format!("close: {e}"))?;
    let fs = Filesystem::open_path(&img, opts).map_err(|e| format!("reopen: {e}"))?;
    verify(&fs, shared_dir, big, &privs, &models).map_err(|e| format!("after reopen: {e}"))?;
    if seed.is_multiple_of(2) {
        // The inline_data run did keep inodes inline.
        let mut inline = 0;
        for &d in privs.iter().chain([&shared_dir]) {
            inline += usize::from(fs.get_flags(d).map_err(|e| e.to_string())? & 0x1000_0000 != 0);
            for e in fs.read_dir(d).map_err(|e| e.to_string())? {
                if e.name != b"." && e.name != b".." {
                    let f = fs.get_flags(e.ino).map_err(|e| e.to_string())?;
                    inline += usize::from(f & 0x1000_0000 != 0);
                }
            }
        }
        if inline == 0 {
            return Err("the inline_data run left no inline inode".into());
        }
        eprintln!("seed {seed}: {inline} inline inodes at the end");
    }
    fs.close().map_err(|e| e.to_string())?;
    if have_tool("e2fsck") {
        e2fsck(&img)?;
    }
    Ok(())
}

#[test]
fn threads_race_on_shared_and_private_directories() {
    let threads = env("FOLIO_STRESS_THREADS", 8) as u32;
    let ops = env("FOLIO_STRESS_OPS", 1500);
    let seeds: Vec<u64> = match std::env::var("FOLIO_STRESS_SEED") {
        Ok(s) => vec![s.parse().expect("FOLIO_STRESS_SEED is a number")],
        Err(_) => (1..=env("FOLIO_STRESS_SEEDS", 2)).collect(),
    };
    for seed in seeds {
        if let Err(e) = run(seed, threads, ops) {
            panic!("seed {seed} ({threads} threads, {ops} ops each): {e}\nreplay: FOLIO_STRESS_SEED={seed} cargo test -p folio-testkit --test concurrent");
        }
    }
}

/// Lock-free cached reads and overwrites racing truncation, hole
/// punching, rewrites and writeback of the same file (4 KiB blocks): a
/// writer thread keeps cutting (to block boundaries), punching, fsyncing
/// and refilling whole blocks, each write with one byte value, a second
/// writer rewrites whole blocks without pause (its overwrites of blocks
/// still dirty go lock-free), and readers read without pause while a tiny
/// page cache keeps reclaim busy (about half the reads take the lock-free
/// path). At every instant each block is all one value, so a read that
/// copied a block while it was being changed (a torn copy, when the race
/// is hit), or that returned bytes past the largest size the file ever
/// had, fails; every read and every operation must succeed, and e2fsck
/// must find the image clean. (With 1 KiB blocks a 4 KiB piece may be
/// written in more than one copy, and a reader can see it half new, as on
/// Linux.)
#[test]
fn cached_reads_and_overwrites_race_truncate_punch_and_rewrite() {
    const MAX: u64 = 256 << 10;
    let rounds = env("FOLIO_STRESS_OPS", 1500);
    let dir = TempDir::new("race");
    let img = dir.join("race.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, false).unwrap());
    let four_k = MkfsOptions {
        block_size: Some(4096),
        ..Default::default()
    };
    mkfs(dev, 64 << 20, &four_k).unwrap();
    let mut opts = OpenOptions::default();
    opts.page_cache.budget_bytes = 1 << 20;
    let fs = Filesystem::open_path(&img, opts).unwrap();
    let ino = fs.create(ROOT_INO, b"f", 0o644, owner()).unwrap();
    // Open: writes into new blocks and past the end take the lock-free
    // path too.
    fs.open_ref(ino);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for r in 0..3u64 {
            let (fs, done) = (&fs, &done);
            s.spawn(move || {
                let mut rng = Rng::new(r + 7);
                let mut buf = vec![0u8; 64 << 10];
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let off = rng.below(MAX);
                    let n = fs.read(ino, off, &mut buf).expect("read");
                    assert!(off + n as u64 <= MAX, "read past the largest size");
                    // Whole blocks of the read (those it covers entirely).
                    let mut p = off.div_ceil(4096) * 4096;
                    while p + 4096 <= off + n as u64 {
                        let blk = &buf[(p - off) as usize..(p - off + 4096) as usize];
                        if let Some(&other) = blk.iter().find(|&&b| b != blk[0]) {
                            panic!("block at {p} is torn: {} and {other}", blk[0]);
                        }
                        p += 4096;
                    }
                }
            });
        }
        {
            // A second writer rewriting whole blocks all the time: its
            // overwrites of blocks still dirty take the lock-free path.
            let (fs, done) = (&fs, &done);
            s.spawn(move || {
                let mut rng = Rng::new(5);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let off = rng.below(MAX / 4096 - 8) * 4096;
                    let len = 4096 * (1 + rng.below(8)) as usize;
                    let v = 250 + rng.below(5) as u8;
                    fs.write(ino, off, &vec![v; len]).expect("write");
                }
            });
        }
        let mut rng = Rng::new(99);
        for gen in 1..=rounds {
            let g = (gen % 249 + 1) as u8;
            match rng.below(6) {
                0 => {
                    let size = rng.below(MAX / 4096) * 4096;
                    fs.setattr(
                        ino,
                        &SetAttr {
                            size: Some(size),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                }
                1 => {
                    let off = rng.below(MAX - 4096) / 4096 * 4096;
                    fs.fallocate(
                        ino,
                        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        off,
                        4096 * (1 + rng.below(8)),
                    )
                    .unwrap();
                }
                2 => {
                    fs.fsync(ino, false).unwrap();
                }
                _ => {
                    let off = rng.below(MAX / 4096 - 8) * 4096;
                    let len = 4096 * (1 + rng.below(8)) as usize;
                    fs.write(ino, off, &vec![g; len]).unwrap();
                }
            }
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    assert!(
        fs.lock_free_read_bytes() > 0,
        "no read filled the cache without the core lock"
    );
    fs.close_ref(ino).unwrap();
    fs.close().unwrap();
    if have_tool("e2fsck") {
        e2fsck(&img).unwrap();
    }
}

/// Cold reads of an open file (filled from the device without the core
/// lock, under the file's inode lock held shared) race hole punching and
/// truncation: a reader must never bring a block's old data back into the
/// cache after the block left the file. Each round writes the file, syncs
/// it, drops the cache (so the readers fill from the device), then
/// punches the whole range (or cuts the file to 0 and extends it again)
/// and reads it: all zeros, or a reader cached stale data.
#[test]
fn cold_reads_race_punch_and_truncate() {
    const LEN: usize = 256 << 10;
    let rounds = env("FOLIO_STRESS_OPS", 1500) / 3;
    let dir = TempDir::new("coldrace");
    let img = dir.join("cold.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(32 << 20))
        .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, false).unwrap());
    let four_k = MkfsOptions {
        block_size: Some(4096),
        ..Default::default()
    };
    mkfs(dev, 32 << 20, &four_k).unwrap();
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let ino = fs.create(ROOT_INO, b"f", 0o644, owner()).unwrap();
    fs.open_ref(ino);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for r in 0..2u64 {
            let (fs, done) = (&fs, &done);
            s.spawn(move || {
                let mut rng = Rng::new(r + 31);
                let mut buf = vec![0u8; 64 << 10];
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let off = rng.below(LEN as u64);
                    fs.read(ino, off, &mut buf).expect("read");
                }
            });
        }
        let mut back = vec![0u8; LEN];
        for gen in 1..=rounds {
            let v = (gen % 200 + 1) as u8;
            fs.write(ino, 0, &vec![v; LEN]).unwrap();
            fs.fsync(ino, false).unwrap();
            fs.drop_caches();
            std::thread::sleep(std::time::Duration::from_micros(200));
            if gen % 3 == 0 {
                for size in [0, LEN as u64] {
                    let set = SetAttr {
                        size: Some(size),
                        ..Default::default()
                    };
                    fs.setattr(ino, &set).unwrap();
                }
            } else {
                fs.fallocate(
                    ino,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    0,
                    LEN as u64,
                )
                .unwrap();
            }
            let n = fs.read(ino, 0, &mut back).unwrap();
            assert_eq!(n, LEN);
            if let Some(p) = back.iter().position(|&b| b != 0) {
                done.store(true, std::sync::atomic::Ordering::Release);
                panic!(
                    "round {gen}: byte {p} is {} after the range left the file",
                    back[p]
                );
            }
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    assert!(
        fs.lock_free_read_bytes() > 0,
        "the readers filled lock-free"
    );
    fs.close_ref(ino).unwrap();
    fs.close().unwrap();
    if have_tool("e2fsck") {
        e2fsck(&img).unwrap();
    }
}
