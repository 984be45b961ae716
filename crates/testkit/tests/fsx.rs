//! fsx-style model test: random reads, writes, truncates, every fallocate
//! mode, syncs and close/reopen cycles on one file, checked byte for byte
//! against a plain in-memory model, on 1 KiB, 4 KiB and 64 KiB blocks.
//! The image is e2fsck'd after each run.
//!
//! `FOLIO_FSX_OPS=N` operations per run (default 1500) and
//! `FOLIO_FSX_SEEDS=N` seeds (default 2); a failure prints
//! `seed S bs B op K` and the operation, which replays with
//! `FOLIO_FSX_SEED=S`.

use std::sync::Arc;

use folio_blockdev::{BlockDevice, MemDevice};
use folio_ext4::falloc::*;
use folio_ext4::mkfs::{mkfs, MkfsOptions};
use folio_ext4::{Filesystem, OpenOptions, Owner, SetAttr, ROOT_INO};
use folio_testkit::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug)]
enum Op {
    Write(u64, usize),
    Read(u64, usize),
    Truncate(u64),
    Falloc(u32, u64, u64),
    Sync,
    Reopen,
    DropCaches,
    DirectWrite(u64, usize),
    DirectRead(u64, usize),
}

/// `inline`: the file starts as an inline file (80 bytes, past
/// `i_block` into `system.data`) in an image `mkfs.ext4 -O inline_data
/// -d` made, so the run begins by reading it in place and converting it.
fn run(seed: u64, bs: u32, ops: u64, inline: bool) -> Result<(), String> {
    let size = if bs == 65536 { 256 << 20 } else { 64 << 20 };
    let mut model: Vec<u8> = Vec::new();
    let dev = if inline {
        let t = TempDir::new("fsx-inline");
        std::fs::create_dir(t.join("src")).unwrap();
        model = Rng::new(seed ^ 0x1D).bytes(80);
        std::fs::write(t.join("src/fsx"), &model).unwrap();
        let img = t.join("img");
        folio_testkit::run(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "inline_data", "-b", &bs.to_string(), "-d"])
                .arg(t.join("src"))
                .arg(&img)
                .arg(format!("{}k", size >> 10)),
        );
        MemDevice::from_bytes(std::fs::read(&img).unwrap())
    } else {
        let dev = MemDevice::new(size);
        mkfs(
            Arc::new(dev.clone()),
            size as u64,
            &MkfsOptions {
                block_size: Some(bs),
                ..Default::default()
            },
        )
        .unwrap();
        dev
    };
    let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
    // Odd seeds run with a tiny page cache (a few folios), so reclaim,
    // dirty throttling and writeback happen all the time.
    let opts = || {
        let mut o = OpenOptions::default();
        if seed % 2 == 1 {
            o.page_cache.budget_bytes = 4 * u64::from(bs.max(16384));
        }
        o
    };
    let mut fs = Filesystem::open(d.clone(), opts()).unwrap();
    let ino = if inline {
        let ino = fs.lookup(ROOT_INO, b"fsx").unwrap();
        let flags = fs.get_flags(ino).unwrap();
        assert!(flags & 0x1000_0000 != 0, "bs {bs}: not inline ({flags:#x})");
        ino
    } else {
        fs.create(ROOT_INO, b"fsx", 0o644, Owner::default())
            .unwrap()
    };
    let mut rng = Rng::new(seed);
    let b = u64::from(bs);
    let max = 48 * b;
    for k in 0..ops {
        let op = match rng.below(100) {
            0..=29 => Op::Write(rng.below(max), 1 + rng.below(3 * b + 100) as usize),
            30..=44 => Op::Read(rng.below(max), 1 + rng.below(3 * b) as usize),
            45..=52 => Op::Truncate(rng.below(max)),
            53..=58 => Op::Falloc(
                [0, FALLOC_FL_KEEP_SIZE][rng.below(2) as usize],
                rng.below(max),
                1 + rng.below(4 * b),
            ),
            59..=66 => Op::Falloc(
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                rng.below(max),
                1 + rng.below(4 * b),
            ),
            67..=72 => Op::Falloc(
                FALLOC_FL_ZERO_RANGE | [0, FALLOC_FL_KEEP_SIZE][rng.below(2) as usize],
                rng.below(max),
                1 + rng.below(4 * b),
            ),
            73..=78 => Op::Falloc(
                FALLOC_FL_COLLAPSE_RANGE,
                rng.below(40) * b,
                (1 + rng.below(4)) * b,
            ),
            79..=84 => Op::Falloc(
                FALLOC_FL_INSERT_RANGE,
                rng.below(40) * b,
                (1 + rng.below(4)) * b,
            ),
            85..=88 => Op::Sync,
            89..=91 => Op::DropCaches,
            92..=94 => Op::DirectWrite(rng.below(40) * b, ((1 + rng.below(3)) * b) as usize),
            95..=96 => Op::DirectRead(rng.below(48) * b, ((1 + rng.below(3)) * b) as usize),
            _ => Op::Reopen,
        };
        if std::env::var_os("FOLIO_FSX_TRACE").is_some() {
            eprintln!("op {k}: {op:?} (size {})", model.len());
        }
        let ctx = |e: String| format!("seed {seed} bs {bs} op {k} {op:?}: {e}");
        match op {
            Op::Write(off, len) => {
                let data = rng.bytes(len);
                fs.write(ino, off, &data).map_err(|e| ctx(e.to_string()))?;
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            Op::Read(off, len) => {
                let mut buf = vec![0u8; len];
                let n = fs
                    .read(ino, off, &mut buf)
                    .map_err(|e| ctx(e.to_string()))?;
                let want = model
                    .get(off as usize..)
                    .map_or(&[][..], |s| &s[..s.len().min(len)]);
                if &buf[..n] != want {
                    let at = buf[..n].iter().zip(want).position(|(a, b)| a != b);
                    return Err(ctx(format!(
                        "read mismatch (got {n} bytes, want {}, first difference at {at:?})",
                        want.len()
                    )));
                }
            }
            Op::Truncate(size) => {
                fs.setattr(
                    ino,
                    &SetAttr {
                        size: Some(size),
                        ..Default::default()
                    },
                )
                .map_err(|e| ctx(e.to_string()))?;
                model.resize(size as usize, 0);
            }
            Op::Falloc(mode, off, len) => {
                let size = model.len() as u64;
                let end = off + len;
                let r = fs.fallocate(ino, mode, off, len);
                let shift_invalid = (mode == FALLOC_FL_COLLAPSE_RANGE && end >= size)
                    || (mode == FALLOC_FL_INSERT_RANGE && off >= size);
                if shift_invalid {
                    match r {
                        Err(e) if e.errno() == libc::EINVAL => continue,
                        other => return Err(ctx(format!("expected EINVAL, got {other:?}"))),
                    }
                }
                r.map_err(|e| ctx(e.to_string()))?;
                let (o, e) = (off as usize, end as usize);
                if mode == FALLOC_FL_COLLAPSE_RANGE {
                    model.drain(o..e);
                } else if mode == FALLOC_FL_INSERT_RANGE {
                    model.splice(o..o, std::iter::repeat_n(0u8, len as usize));
                } else if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
                    let stop = e.min(model.len());
                    if o < stop {
                        model[o..stop].fill(0);
                    }
                    if mode & FALLOC_FL_KEEP_SIZE == 0 && e > model.len() {
                        model.resize(e, 0);
                    }
                } else if mode & FALLOC_FL_KEEP_SIZE == 0 && e > model.len() {
                    model.resize(e, 0);
                }
            }
            Op::Sync => fs.sync().map_err(|e| ctx(e.to_string()))?,
            Op::DropCaches => {
                fs.drop_caches();
            }
            Op::DirectWrite(off, len) => {
                let data = rng.bytes(len);
                fs.write_direct(ino, off, &data)
                    .map_err(|e| ctx(e.to_string()))?;
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            Op::DirectRead(off, len) => {
                let mut got = vec![0u8; len];
                let n = fs
                    .read_direct(ino, off, &mut got)
                    .map_err(|e| ctx(e.to_string()))?;
                let want: &[u8] = if (off as usize) < model.len() {
                    &model[off as usize..model.len().min(off as usize + len)]
                } else {
                    &[]
                };
                if &got[..n] != want {
                    return Err(ctx(format!("direct read differs ({n} bytes)")));
                }
            }
            Op::Reopen => {
                let (_, over) = fs.handle_stats();
                if over > 0 {
                    return Err(ctx(format!("{over} journal handles overran their credits")));
                }
                fs.close().map_err(|e| ctx(e.to_string()))?;
                fs = Filesystem::open(d.clone(), opts()).map_err(|e| ctx(e.to_string()))?;
            }
        }
        let st = fs.stat(ino).map_err(|e| ctx(e.to_string()))?;
        if st.size != model.len() as u64 {
            return Err(ctx(format!(
                "size {} but the model has {}",
                st.size,
                model.len()
            )));
        }
    }
    let mut all = vec![0u8; model.len()];
    let n = fs.read(ino, 0, &mut all).map_err(|e| e.to_string())?;
    if n != model.len() || all != model {
        return Err(format!(
            "seed {seed} bs {bs}: final contents differ from the model"
        ));
    }
    let problems = fs.check_counts(None).map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!("seed {seed} bs {bs}: {problems:?}"));
    }
    let (handles, over) = fs.handle_stats();
    if over > 0 {
        return Err(format!(
            "seed {seed} bs {bs}: {over} of {handles} journal handles overran their credits"
        ));
    }
    fs.close().map_err(|e| e.to_string())?;
    if have_tool("e2fsck") {
        let t = TempDir::new("fsx");
        let img = t.join("img");
        std::fs::write(&img, dev.snapshot()).unwrap();
        e2fsck(&img).map_err(|e| format!("seed {seed} bs {bs}: {e}"))?;
    }
    Ok(())
}

#[test]
fn fsx_model_agrees_on_every_block_size() {
    let ops = env("FOLIO_FSX_OPS", 1500);
    let seeds: Vec<u64> = match std::env::var("FOLIO_FSX_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=env("FOLIO_FSX_SEEDS", 2)).collect(),
    };
    for seed in seeds {
        for bs in [1024, 4096, 65536] {
            if let Err(e) = run(seed, bs, ops, false) {
                panic!("{e}");
            }
        }
    }
}

/// The same from an inline file of an inline_data image (issue 18).
#[test]
fn fsx_model_agrees_from_an_inline_file() {
    if !require(have_tool("mkfs.ext4"), "mkfs.ext4 is not installed") {
        return;
    }
    let ops = env("FOLIO_FSX_OPS", 1500);
    for seed in 1..=env("FOLIO_FSX_SEEDS", 2) {
        for bs in [1024, 4096] {
            if let Err(e) = run(seed, bs, ops, true) {
                panic!("inline: {e}");
            }
        }
    }
}
