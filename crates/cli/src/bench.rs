//! `folio bench`: the library data path (page cache, delayed allocation,
//! writeback) against the same operations on a kernel ext4 loop mount of
//! an identical image, in one run, with ratios.
//!
//! Workloads, on one file of `--size` MiB:
//! - seq-write: 1 MiB writes, then fsync;
//! - seq-read: 1 MiB reads, caches dropped first;
//! - rand-write: 4 KiB writes at random block-aligned offsets, then fsync;
//! - rand-read: 4 KiB reads at random offsets, caches dropped first;
//! - rewrite-hot: 4 KiB writes within the first MiB (cache hits), fsync.
//!
//! The kernel side needs root (loop mount, drop_caches); without it only
//! folio's figures are printed, and the reason.

use std::fs::OpenOptions as StdOpen;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use folio_ext4::mkfs::{mkfs_path, MkfsOptions};
use folio_ext4::{Filesystem, OpenOptions, Owner, ROOT_INO};

/// A tiny deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The operations a workload needs, on folio or on the kernel.
trait Target {
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<(), String>;
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String>;
    fn fsync(&mut self) -> Result<(), String>;
    fn drop_caches(&mut self) -> Result<(), String>;
}

struct Folio {
    fs: Filesystem,
    ino: u32,
}

impl Target for Folio {
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<(), String> {
        let n = self
            .fs
            .write(self.ino, off, buf)
            .map_err(|e| e.to_string())?;
        if n != buf.len() {
            return Err(format!("short write ({n} of {})", buf.len()));
        }
        Ok(())
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.fs
            .read(self.ino, off, buf)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn fsync(&mut self) -> Result<(), String> {
        self.fs.fsync(self.ino, false).map_err(|e| e.to_string())
    }
    fn drop_caches(&mut self) -> Result<(), String> {
        self.fs.sync().map_err(|e| e.to_string())?;
        self.fs.drop_caches();
        // The image file sits in the host's page cache too: drop that as
        // well, or reads would be memory copies the kernel side never gets.
        host_drop_caches()
    }
}

struct Kernel {
    file: std::fs::File,
}

impl Target for Kernel {
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<(), String> {
        self.file.write_all_at(buf, off).map_err(|e| e.to_string())
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.file.read_exact_at(buf, off).map_err(|e| e.to_string())
    }
    fn fsync(&mut self) -> Result<(), String> {
        self.file.sync_all().map_err(|e| e.to_string())
    }
    fn drop_caches(&mut self) -> Result<(), String> {
        self.file.sync_all().map_err(|e| e.to_string())?;
        host_drop_caches()
    }
}

/// `echo 3 > /proc/sys/vm/drop_caches` when root (the kernel column only
/// runs as root; folio's figures without it say so in the header).
fn host_drop_caches() -> Result<(), String> {
    if !is_root() {
        return Ok(());
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("drop_caches: {e}"))
}

const WORKLOADS: [&str; 5] = [
    "seq-write",
    "seq-read",
    "rand-write",
    "rand-read",
    "rewrite-hot",
];

/// Run every workload on `t`; MiB/s for each.
fn run_all(t: &mut dyn Target, size_mib: u64) -> Result<Vec<f64>, String> {
    let size = size_mib << 20;
    let mut out = Vec::new();
    let mib = |bytes: u64, secs: f64| bytes as f64 / (1 << 20) as f64 / secs.max(1e-9);
    // seq-write
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let t0 = Instant::now();
    for off in (0..size).step_by(1 << 20) {
        t.write_at(off, &chunk)?;
    }
    t.fsync()?;
    out.push(mib(size, t0.elapsed().as_secs_f64()));
    // seq-read
    t.drop_caches()?;
    let mut buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    for off in (0..size).step_by(1 << 20) {
        t.read_at(off, &mut buf)?;
    }
    out.push(mib(size, t0.elapsed().as_secs_f64()));
    // rand-write
    let blocks = size / 4096;
    let n = blocks.min(32768);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let small = vec![0x5au8; 4096];
    let t0 = Instant::now();
    for _ in 0..n {
        t.write_at(rng.next() % blocks * 4096, &small)?;
    }
    t.fsync()?;
    out.push(mib(n * 4096, t0.elapsed().as_secs_f64()));
    // rand-read
    t.drop_caches()?;
    let mut sbuf = vec![0u8; 4096];
    let t0 = Instant::now();
    for _ in 0..n {
        t.read_at(rng.next() % blocks * 4096, &mut sbuf)?;
    }
    out.push(mib(n * 4096, t0.elapsed().as_secs_f64()));
    // rewrite-hot
    let hot = 256u64.min(blocks);
    let t0 = Instant::now();
    for _ in 0..n {
        t.write_at(rng.next() % hot * 4096, &small)?;
    }
    t.fsync()?;
    out.push(mib(n * 4096, t0.elapsed().as_secs_f64()));
    Ok(out)
}

pub(crate) struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Loop-mount `img` on `mnt` (created if missing) for the kernel column;
/// unmounted when the guard drops.
pub(crate) fn loop_mount(img: &Path, mnt: &Path) -> Result<Mounted, String> {
    std::fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
    let st = Command::new("mount")
        .args(["-o", "loop"])
        .arg(img)
        .arg(mnt)
        .status()
        .map_err(|e| format!("mount: {e}"))?;
    if !st.success() {
        return Err("cannot loop-mount the kernel image".into());
    }
    Ok(Mounted(mnt.to_path_buf()))
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

/// `folio bench`: run the workloads on folio and the kernel, print ratios.
pub fn run(dir: &Path, size_mib: u64) -> Result<(), String> {
    in_scratch(dir, "folio-bench", |work| run_in(work, size_mib))
}

/// Run `f` in a fresh scratch directory `NAME-PID` under `dir`, removed
/// afterwards whatever happens.
pub(crate) fn in_scratch(
    dir: &Path,
    name: &str,
    f: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let work = dir.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let result = f(&work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Identical fresh images of `img_size` bytes for folio and the kernel,
/// `folio.img` and `kernel.img` in `work` (copied keeping holes).
pub(crate) fn twin_images(work: &Path, img_size: u64) -> Result<(PathBuf, PathBuf), String> {
    let base = work.join("base.img");
    mkfs_path(&base, Some(img_size), &MkfsOptions::default()).map_err(|e| e.to_string())?;
    let folio_img = work.join("folio.img");
    let kernel_img = work.join("kernel.img");
    for img in [&folio_img, &kernel_img] {
        copy_sparse(&base, img)?;
    }
    let _ = std::fs::remove_file(&base);
    Ok((folio_img, kernel_img))
}

fn run_in(work: &Path, size_mib: u64) -> Result<(), String> {
    let img_size = (size_mib * 2 + 256) << 20;
    let (folio_img, kernel_img) = twin_images(work, img_size)?;
    println!(
        "folio bench: {size_mib} MiB file, images of {} MiB, in {}",
        img_size >> 20,
        work.display()
    );
    // folio, in-process.
    let fs =
        Filesystem::open_path(&folio_img, OpenOptions::default()).map_err(|e| e.to_string())?;
    let ino = fs
        .create(ROOT_INO, b"bench", 0o644, Owner::default())
        .map_err(|e| e.to_string())?;
    // Open, as the kernel side's file is: writes take the lock-free path.
    fs.open_ref(ino);
    let mut f = Folio { fs, ino };
    let folio = run_all(&mut f, size_mib)?;
    let stats = f.fs.page_cache().stats();
    f.fs.close().map_err(|e| e.to_string())?;
    // The kernel, on a loop mount of an identical image.
    let kernel = if is_root() {
        let mnt = work.join("mnt");
        let _m = loop_mount(&kernel_img, &mnt)?;
        let file = StdOpen::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(mnt.join("bench"))
            .map_err(|e| e.to_string())?;
        let mut k = Kernel { file };
        let figures = run_all(&mut k, size_mib)?;
        drop(k);
        Some(figures)
    } else {
        println!("(not root: no loop mount or drop_caches, so the kernel column is skipped)");
        None
    };
    println!();
    println!(
        "{:<14}{:>12}{:>12}{:>14}",
        "workload", "folio", "kernel", "folio/kernel"
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        match &kernel {
            Some(k) => println!(
                "{w:<14}{:>12.1}{:>12.1}{:>14.2}   (MiB/s)",
                folio[i],
                k[i],
                folio[i] / k[i].max(1e-9)
            ),
            None => println!("{w:<14}{:>12.1}{:>12}{:>14}   (MiB/s)", folio[i], "-", "-"),
        }
    }
    println!(
        "\nfolio page cache: budget {} MiB, hits {}, misses {}, reclaimed {} MiB, written back {} MiB",
        stats.budget_bytes >> 20,
        stats.hits,
        stats.misses,
        stats.reclaimed_bytes >> 20,
        stats.written_back_bytes >> 20
    );
    Ok(())
}

/// A file's extent count as the kernel reports it (`filefrag`).
fn filefrag_extents(path: &Path) -> Option<u64> {
    let out = Command::new("filefrag").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "<path>: N extents found" (or "1 extent found").
    let tail = text.rsplit(": ").next()?;
    tail.split_whitespace().next()?.parse().ok()
}

/// Random 4 KiB writes at block-aligned offsets of a `size` byte file for
/// `secs` seconds, then fsync: (MiB/s including the fsync, writes done).
fn random_writes(
    t: &mut dyn Target,
    size: u64,
    secs: f64,
    seed: u64,
) -> Result<(f64, u64), String> {
    let blocks = size / 4096;
    let mut rng = Rng(seed | 1);
    let buf: Vec<u8> = (0..4096u32).map(|i| (i as u64 ^ seed) as u8).collect();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..256 {
            t.write_at(rng.next() % blocks * 4096, &buf)?;
            n += 1;
        }
    }
    t.fsync()?;
    let s = t0.elapsed().as_secs_f64();
    Ok((n as f64 * 4096.0 / (1 << 20) as f64 / s.max(1e-9), n))
}

/// One row of the scaling benchmark.
struct ScaleRow {
    size_mib: u64,
    /// (fresh MiB/s, overwrite MiB/s, extents)
    folio: (f64, f64, u64),
    kernel: Option<(f64, f64, Option<u64>)>,
}

/// `folio bench --scaling`: random 4 KiB writes into fresh sparse files
/// of each size, then random overwrites of the same file, on folio's
/// library and on the kernel's ext4 (identical fresh images), with the
/// extent count of each result.
pub fn run_scaling(dir: &Path, sizes_mib: &[u64], secs: f64) -> Result<(), String> {
    in_scratch(dir, "folio-bench-scaling", |work| {
        scaling_in(work, sizes_mib, secs)
    })
}

fn scaling_in(work: &Path, sizes_mib: &[u64], secs: f64) -> Result<(), String> {
    println!(
        "folio bench --scaling: random 4 KiB writes for {secs} s into a fresh sparse file, \
         then random overwrites for {secs} s; fsync included; in {}",
        work.display()
    );
    if !is_root() {
        println!("(not root: no loop mount, so the kernel column is skipped)");
    }
    let mut rows = Vec::new();
    for &size_mib in sizes_mib {
        let size = size_mib << 20;
        let img_size = size + size / 4 + (256 << 20);
        let (folio_img, kernel_img) = twin_images(work, img_size)?;
        let fs =
            Filesystem::open_path(&folio_img, OpenOptions::default()).map_err(|e| e.to_string())?;
        let ino = fs
            .create(ROOT_INO, b"bench", 0o644, Owner::default())
            .map_err(|e| e.to_string())?;
        fs.open_ref(ino);
        let set = folio_ext4::SetAttr {
            size: Some(size),
            ..Default::default()
        };
        fs.setattr(ino, &set).map_err(|e| e.to_string())?;
        let mut f = Folio { fs, ino };
        let (fresh, n1) = random_writes(&mut f, size, secs, 0x1234_5678)?;
        let (over, n2) = random_writes(&mut f, size, secs, 0x8765_4321)?;
        // Counted as filefrag counts: a new extent where the physical
        // layout breaks from a straight line, as for the kernel's column.
        let runs = f.fs.block_runs(ino).map_err(|e| e.to_string())?;
        let extents = 1 + runs
            .windows(2)
            .filter(|w| w[1].pblk != w[0].pblk + (w[1].lblk - w[0].lblk))
            .count() as u64;
        f.fs.close().map_err(|e| e.to_string())?;
        println!(
            "  {size_mib:>5} MiB  folio:  fresh {fresh:8.1} MiB/s ({n1} writes), \
             overwrite {over:8.1} MiB/s ({n2} writes), {extents} extents ({} in the tree)",
            runs.len()
        );
        let kernel = if is_root() {
            let mnt = work.join("mnt");
            let _m = loop_mount(&kernel_img, &mnt)?;
            let path = mnt.join("bench");
            let file = StdOpen::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| e.to_string())?;
            file.set_len(size).map_err(|e| e.to_string())?;
            let mut k = Kernel { file };
            let (kf, k1) = random_writes(&mut k, size, secs, 0x1234_5678)?;
            let (ko, k2) = random_writes(&mut k, size, secs, 0x8765_4321)?;
            drop(k);
            let kx = filefrag_extents(&path);
            println!(
                "  {size_mib:>5} MiB  kernel: fresh {kf:8.1} MiB/s ({k1} writes), \
                 overwrite {ko:8.1} MiB/s ({k2} writes), {} extents",
                kx.map_or("?".to_string(), |x| x.to_string())
            );
            Some((kf, ko, kx))
        } else {
            None
        };
        let _ = std::fs::remove_file(&folio_img);
        let _ = std::fs::remove_file(&kernel_img);
        rows.push(ScaleRow {
            size_mib,
            folio: (fresh, over, extents),
            kernel,
        });
    }
    println!();
    println!(
        "{:>9} {:>12} {:>12} {:>8} {:>12} {:>12} {:>8} {:>9} {:>9}",
        "size MiB",
        "folio fresh",
        "kernel",
        "ratio",
        "folio over",
        "kernel",
        "ratio",
        "ext folio",
        "ext kern"
    );
    for r in &rows {
        let (kf, ko, kx) = r.kernel.unwrap_or((f64::NAN, f64::NAN, None));
        println!(
            "{:>9} {:>12.1} {:>12.1} {:>8.2} {:>12.1} {:>12.1} {:>8.2} {:>9} {:>9}",
            r.size_mib,
            r.folio.0,
            kf,
            r.folio.0 / kf,
            r.folio.1,
            ko,
            r.folio.1 / ko,
            r.folio.2,
            kx.map_or("-".to_string(), |x| x.to_string())
        );
    }
    let fresh: Vec<f64> = rows.iter().map(|r| r.folio.0).collect();
    if let (Some(max), Some(min)) = (
        fresh.iter().cloned().reduce(f64::max),
        fresh.iter().cloned().reduce(f64::min),
    ) {
        println!(
            "\nfolio fresh-write curve: fastest/slowest = {:.2}",
            max / min.max(1e-9)
        );
    }
    Ok(())
}

/// Copy an image keeping its holes (cp --sparse=always).
fn copy_sparse(from: &Path, to: &Path) -> Result<(), String> {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cp {} {} failed", from.display(), to.display()))
    }
}
