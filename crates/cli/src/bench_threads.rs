//! `folio bench --threads N`: the library used from N threads (no FUSE)
//! against the same work on a kernel ext4 loop mount of an identical
//! image, in one run, with ratios.
//!
//! Workloads:
//! - rand-write-1: one thread, random 4 KiB writes into its own file of
//!   `--size` MiB for `--seconds`, then fsync (the single-stream rate);
//! - rand-write-N: N threads doing the same, each on its own file;
//! - meta-N: N threads each creating, stat-ing and unlinking 2,000 files
//!   in a directory of its own (operations per second);
//! - stat and 4 KiB cached-read latency (median, p99, worst) on one file
//!   while another thread fsyncs 256 MiB of dirty data, and how many
//!   stats completed meanwhile.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use folio_ext4::{Filesystem, OpenOptions, Owner, ROOT_INO};

use crate::bench::{in_scratch, is_root, loop_mount, twin_images};

/// What the workloads need of a filesystem, from many threads at once.
trait Par: Sync {
    type F: Send + Sync;
    fn mkdir(&self, dir: &str) -> Result<(), String>;
    fn create(&self, dir: &str, name: &str) -> Result<Self::F, String>;
    /// Hold `f` open for the rest of the run, as a program writing it
    /// would (the kernel side's files are open already).
    fn hold_open(&self, _f: &Self::F) {}
    fn write_at(&self, f: &Self::F, off: u64, buf: &[u8]) -> Result<(), String>;
    fn read_at(&self, f: &Self::F, off: u64, buf: &mut [u8]) -> Result<(), String>;
    fn fsync(&self, f: &Self::F) -> Result<(), String>;
    fn stat(&self, dir: &str, name: &str) -> Result<(), String>;
    fn unlink(&self, dir: &str, name: &str) -> Result<(), String>;
}

struct FolioPar(Filesystem);

impl FolioPar {
    fn dir(&self, dir: &str) -> Result<u32, String> {
        self.0
            .resolve(&format!("/{dir}"))
            .map_err(|e| e.to_string())
    }
}

impl Par for FolioPar {
    type F = u32;
    fn mkdir(&self, dir: &str) -> Result<(), String> {
        self.0
            .mkdir(ROOT_INO, dir.as_bytes(), 0o755, Owner::default())
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn create(&self, dir: &str, name: &str) -> Result<u32, String> {
        let d = self.dir(dir)?;
        self.0
            .create(d, name.as_bytes(), 0o644, Owner::default())
            .map_err(|e| e.to_string())
    }
    fn hold_open(&self, f: &u32) {
        self.0.open_ref(*f);
    }
    fn write_at(&self, f: &u32, off: u64, buf: &[u8]) -> Result<(), String> {
        match self.0.write(*f, off, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(format!("short write ({n} of {})", buf.len())),
            Err(e) => Err(e.to_string()),
        }
    }
    fn read_at(&self, f: &u32, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0
            .read(*f, off, buf)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn fsync(&self, f: &u32) -> Result<(), String> {
        self.0.fsync(*f, false).map_err(|e| e.to_string())
    }
    fn stat(&self, dir: &str, name: &str) -> Result<(), String> {
        let d = self.dir(dir)?;
        let ino = self
            .0
            .lookup(d, name.as_bytes())
            .map_err(|e| e.to_string())?;
        self.0.stat(ino).map(drop).map_err(|e| e.to_string())
    }
    fn unlink(&self, dir: &str, name: &str) -> Result<(), String> {
        let d = self.dir(dir)?;
        self.0.unlink(d, name.as_bytes()).map_err(|e| e.to_string())
    }
}

struct KernelPar(PathBuf);

impl Par for KernelPar {
    type F = std::fs::File;
    fn mkdir(&self, dir: &str) -> Result<(), String> {
        std::fs::create_dir(self.0.join(dir)).map_err(|e| e.to_string())
    }
    fn create(&self, dir: &str, name: &str) -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.0.join(dir).join(name))
            .map_err(|e| e.to_string())
    }
    fn write_at(&self, f: &std::fs::File, off: u64, buf: &[u8]) -> Result<(), String> {
        f.write_all_at(buf, off).map_err(|e| e.to_string())
    }
    fn read_at(&self, f: &std::fs::File, off: u64, buf: &mut [u8]) -> Result<(), String> {
        f.read_at(buf, off).map(drop).map_err(|e| e.to_string())
    }
    fn fsync(&self, f: &std::fs::File) -> Result<(), String> {
        f.sync_all().map_err(|e| e.to_string())
    }
    fn stat(&self, dir: &str, name: &str) -> Result<(), String> {
        std::fs::metadata(self.0.join(dir).join(name))
            .map(drop)
            .map_err(|e| e.to_string())
    }
    fn unlink(&self, dir: &str, name: &str) -> Result<(), String> {
        std::fs::remove_file(self.0.join(dir).join(name)).map_err(|e| e.to_string())
    }
}

/// Figures of one side.
struct Figures {
    write_1: f64,
    write_n: f64,
    meta_n: f64,
    /// Appends + fsync per second, `threads` threads.
    fsync_n: f64,
    /// stat (median, p99, worst) and read (median, p99) in ms, stats done,
    /// fsync seconds.
    latency: ([f64; 3], [f64; 2], usize, f64),
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Run `work(t)` on `threads` threads at once, `t` = 0..threads; their
/// results in order, or the first error.
fn on_threads<T: Send>(
    threads: u32,
    work: impl Fn(u32) -> Result<T, String> + Sync,
) -> Result<Vec<T>, String> {
    let work = &work;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|t| s.spawn(move || work(t))).collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect()
    })
}

/// `threads` writers, each on a file of its own in `dir`: MiB/s in all,
/// the fsyncs included.
fn rand_writes<P: Par>(
    p: &P,
    dir: &str,
    threads: u32,
    size: u64,
    secs: f64,
) -> Result<f64, String> {
    p.mkdir(dir)?;
    let t0 = Instant::now();
    let done = on_threads(threads, |t| {
        let f = p.create(dir, &format!("w{t}"))?;
        p.hold_open(&f);
        let buf = vec![t as u8 ^ 0x5a; 4096];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(t + 1);
        let mut n = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            for _ in 0..64 {
                p.write_at(&f, xorshift(&mut rng) % (size / 4096) * 4096, &buf)?;
                n += 1;
            }
        }
        p.fsync(&f)?;
        Ok(n)
    })?;
    let bytes = done.iter().sum::<u64>() * 4096;
    Ok(bytes as f64 / f64::from(1 << 20) / t0.elapsed().as_secs_f64())
}

/// `threads` threads each appending 4 KiB to a file of its own and
/// fsyncing it, for `secs`: fsyncs per second in all (a mail spool's or a
/// database log's pattern; each fsync commits, so this measures commits
/// under contention).
fn fsyncs<P: Par>(p: &P, threads: u32, secs: f64) -> Result<f64, String> {
    p.mkdir("fsync")?;
    let t0 = Instant::now();
    let done = on_threads(threads, |t| {
        let f = p.create("fsync", &format!("log{t}"))?;
        p.hold_open(&f);
        let buf = vec![t as u8 ^ 0xa5; 4096];
        let mut n = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            p.write_at(&f, n * 4096, &buf)?;
            p.fsync(&f)?;
            n += 1;
        }
        Ok(n)
    })?;
    Ok(done.iter().sum::<u64>() as f64 / t0.elapsed().as_secs_f64())
}

/// `threads` threads each creating, stat-ing and unlinking `n` files in a
/// directory of its own: operations per second.
fn metadata<P: Par>(p: &P, threads: u32, n: u32) -> Result<f64, String> {
    for t in 0..threads {
        p.mkdir(&format!("meta{t}"))?;
    }
    let t0 = Instant::now();
    on_threads(threads, |t| {
        let dir = format!("meta{t}");
        for i in 0..n {
            let f = p.create(&dir, &format!("f{i}"))?;
            p.write_at(&f, 0, &[7u8; 100])?;
        }
        for i in 0..n {
            p.stat(&dir, &format!("f{i}"))?;
        }
        for i in 0..n {
            p.unlink(&dir, &format!("f{i}"))?;
        }
        Ok(())
    })?;
    Ok(f64::from(3 * n * threads) / t0.elapsed().as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Stats of 4,000 files (each once, in turn) and 4 KiB reads of a cached
/// file while another thread fsyncs `mib` MiB of dirty data.
fn latency<P: Par>(p: &P, mib: u64) -> Result<([f64; 3], [f64; 2], usize, f64), String> {
    const FILES: usize = 4000;
    p.mkdir("lat")?;
    for i in 0..FILES {
        p.create("lat", &format!("s{i}"))?;
    }
    let cached = p.create("lat", "cached")?;
    p.hold_open(&cached);
    let mut buf = vec![0x33u8; 1 << 20];
    p.write_at(&cached, 0, &buf)?;
    p.fsync(&cached)?;
    p.read_at(&cached, 0, &mut buf)?;
    let big = p.create("lat", "big")?;
    p.hold_open(&big);
    for i in 0..mib {
        p.write_at(&big, i << 20, &buf)?;
    }
    let running = AtomicBool::new(true);
    let (mut stats, mut reads) = (Vec::new(), Vec::new());
    let mut small = [0u8; 4096];
    let took = std::thread::scope(|s| {
        let syncer = s.spawn(|| {
            let t = Instant::now();
            let r = p.fsync(&big);
            running.store(false, Ordering::Release);
            r.map(|()| t.elapsed().as_secs_f64())
        });
        let mut i = 0usize;
        while running.load(Ordering::Acquire) {
            let a = Instant::now();
            p.stat("lat", &format!("s{}", i % FILES))?;
            let b = Instant::now();
            p.read_at(&cached, (i as u64 * 4096) % (1 << 20), &mut small)?;
            stats.push((b - a).as_secs_f64() * 1e3);
            reads.push(b.elapsed().as_secs_f64() * 1e3);
            i += 1;
        }
        syncer
            .join()
            .unwrap_or_else(|_| Err("the fsync thread panicked".into()))
    })?;
    stats.sort_by(f64::total_cmp);
    reads.sort_by(f64::total_cmp);
    Ok((
        [
            percentile(&stats, 0.5),
            percentile(&stats, 0.99),
            stats.last().copied().unwrap_or(f64::NAN),
        ],
        [percentile(&reads, 0.5), percentile(&reads, 0.99)],
        stats.len(),
        took,
    ))
}

fn run_side<P: Par>(p: &P, threads: u32, size_mib: u64, secs: f64) -> Result<Figures, String> {
    let size = size_mib << 20;
    Ok(Figures {
        write_1: rand_writes(p, "one", 1, size, secs)?,
        write_n: rand_writes(p, "many", threads, size, secs)?,
        meta_n: metadata(p, threads, 2000)?,
        fsync_n: fsyncs(p, threads, secs)?,
        latency: latency(p, 256)?,
    })
}

/// `folio bench --threads N`.
pub fn run(dir: &Path, threads: u32, size_mib: u64, secs: f64) -> Result<(), String> {
    in_scratch(dir, "folio-bench-threads", |work| {
        run_in(work, threads.max(1), size_mib, secs)
    })
}

fn run_in(work: &Path, threads: u32, size_mib: u64, secs: f64) -> Result<(), String> {
    // Room for the files of both write workloads and the 256 MiB fsync.
    let img_size = (size_mib * (u64::from(threads) + 1) + 768) << 20;
    let (folio_img, kernel_img) = twin_images(work, img_size)?;
    println!(
        "folio bench --threads {threads}: {size_mib} MiB files, {secs} s per write workload, \
         images of {} MiB in {}",
        img_size >> 20,
        work.display()
    );
    let fs =
        Filesystem::open_path(&folio_img, OpenOptions::default()).map_err(|e| e.to_string())?;
    let folio_side = FolioPar(fs);
    let folio = run_side(&folio_side, threads, size_mib, secs)?;
    folio_side.0.close().map_err(|e| e.to_string())?;
    let kernel = if is_root() {
        let mnt = work.join("mnt");
        let _m = loop_mount(&kernel_img, &mnt)?;
        Some(run_side(&KernelPar(mnt.clone()), threads, size_mib, secs)?)
    } else {
        println!("(not root: no loop mount, so the kernel column is skipped)");
        None
    };
    println!();
    println!(
        "{:<26}{:>12}{:>12}{:>14}",
        "workload", "folio", "kernel", "folio/kernel"
    );
    let row = |name: String, f: f64, k: Option<f64>, unit: &str| match k {
        Some(k) => println!(
            "{name:<26}{f:>12.3}{k:>12.3}{:>14.2}   ({unit})",
            f / k.max(1e-9)
        ),
        None => println!("{name:<26}{f:>12.3}{:>12}{:>14}   ({unit})", "-", "-"),
    };
    let k = kernel.as_ref();
    row(
        "rand-write-1".into(),
        folio.write_1,
        k.map(|k| k.write_1),
        "MiB/s",
    );
    row(
        format!("rand-write-{threads}"),
        folio.write_n,
        k.map(|k| k.write_n),
        "MiB/s",
    );
    row(
        format!("meta-{threads}"),
        folio.meta_n,
        k.map(|k| k.meta_n),
        "ops/s",
    );
    row(
        format!("fsync-{threads}"),
        folio.fsync_n,
        k.map(|k| k.fsync_n),
        "fsyncs/s",
    );
    let (fs_, fr, fnum, ft) = folio.latency;
    let names = ["stat median", "stat p99", "stat worst"];
    for (i, name) in names.iter().enumerate() {
        row(
            format!("{name} (fsync 256M)"),
            fs_[i],
            k.map(|k| k.latency.0[i]),
            "ms",
        );
    }
    row(
        "read median (fsync 256M)".into(),
        fr[0],
        k.map(|k| k.latency.1[0]),
        "ms",
    );
    row(
        "read p99 (fsync 256M)".into(),
        fr[1],
        k.map(|k| k.latency.1[1]),
        "ms",
    );
    row(
        "stats during the fsync".into(),
        fnum as f64,
        k.map(|k| k.latency.2 as f64),
        "count",
    );
    row("fsync of 256 MiB".into(), ft, k.map(|k| k.latency.3), "s");
    println!(
        "\nrand-write-{threads} / rand-write-1 on folio: {:.2}",
        folio.write_n / folio.write_1.max(1e-9)
    );
    Ok(())
}
