//! Crash consistency: workloads (creates, writes, appends, truncates,
//! renames, unlinks, directory growth, fallocate modes, syncs) run on a
//! crash-recording device; at every
//! flush and at random points between flushes (random subsets of the
//! pending writes, torn into 512-byte sectors) the image is recovered by
//! folio and checked:
//! 1. `e2fsck -fn` is clean;
//! 2. every file synced and not touched since is there, exact;
//! 3. no file holds a byte that was never written to it (the device is
//!    filled with a marker first; each file is written with its own tag);
//! 4. a rename is all-or-nothing.
//!
//! Workloads alternate between 1 KiB and 4 KiB blocks; every eighth runs
//! on 64 KiB blocks (`FOLIO_CRASH_BS=N` puts every workload on N).
//! `FOLIO_CRASH_WORKLOADS=N` runs N workloads instead of 16 and
//! `FOLIO_CRASH_CUTS=N` takes N random crash points per flush interval
//! instead of 20 (a workload has about 100 flush intervals); a failure
//! prints the workload seed and crash point to replay.
//!
//! Checks 2–4 run on every state. e2fsck (check 1) runs once per distinct
//! crash image: a state whose image before recovery equals one already
//! recovered and checked clean is not checked again, since recovery is
//! deterministic (only clock readings differ) and e2fsck's verdict does
//! not depend on them. Images are keyed by a 64-bit hash of their
//! per-4-KiB-block CRC32Cs.
//!
//! A crash state is an [`Overlay`] on the last flushed image: building,
//! recovering and checking it copies only the 4 KiB chunks that the crash
//! and the recovery touch, and e2fsck reads a scratch copy of the flushed
//! image patched with those chunks (and restored after).

use std::collections::BTreeMap;
use std::sync::Arc;

use folio_blockdev::crash::{apply, crash_overlay, Event, Overlay, CHUNK};
use folio_blockdev::{CrashDevice, MemDevice};
use folio_ext4::mkfs::{mkfs, MkfsOptions};
use folio_ext4::{FileType, Filesystem, OpenOptions, Owner, RenameFlags, SetAttr, ROOT_INO};
use folio_testkit::*;

/// Image size by block size: big enough that mke2fs's table gives it a
/// journal (2,048 blocks or more).
fn img_size(bs: u32) -> usize {
    match bs {
        1024 => 4 << 20,
        // 2,048 blocks: mke2fs's table gives a 1,024-block journal.
        65536 => 128 << 20,
        _ => 16 << 20,
    }
}
const PIECE: usize = 512;
const MARK: u8 = 0xEE;
const ME: Owner = Owner { uid: 0, gid: 0 };

/// `small_journal`: the smallest journal jbd2 allows (1,024 blocks), so
/// that the workload wraps the log and checkpoints many times.
fn base_image(bs: u32, small_journal: bool) -> Vec<u8> {
    let dev = MemDevice::from_bytes(vec![MARK; img_size(bs)]);
    // ea_inode on: large xattr values in inodes of their own are part
    // of the mix (e2fsck checks their reference counts and charges).
    let mut features = folio_ext4::mkfs::Features::defaults(folio_ext4::mkfs::FsType::Ext4);
    features.edit("ea_inode").unwrap();
    // verity on: files are made verity in the mix, and every crash
    // state must read them back verified (or as plain files).
    features.edit("verity").unwrap();
    let opts = MkfsOptions {
        block_size: Some(bs),
        journal_bytes: small_journal.then_some(1024 * u64::from(bs)),
        features: Some(features),
        ..Default::default()
    };
    mkfs(Arc::new(dev.clone()), img_size(bs) as u64, &opts).unwrap();
    dev.snapshot()
}

#[derive(Clone, Debug, Default)]
struct Model {
    /// tag → (path, content)
    files: BTreeMap<u8, (String, Vec<u8>)>,
    dirs: Vec<String>,
}

struct Checkpoint {
    /// Event count when the sync returned.
    event: usize,
    step: usize,
    model: Model,
}

#[derive(Default, Clone)]
struct OpRec {
    event_start: usize,
    step: usize,
    /// Tags whose content or existence changed.
    changed: Vec<u8>,
    /// A rename of a tag to a path.
    renamed: Option<(u8, String)>,
}

/// A file fsync'd or fdatasync'd: durable from `event` on.
struct Fsynced {
    event: usize,
    step: usize,
    tag: u8,
    path: String,
    content: Vec<u8>,
}

struct Workload {
    base: Vec<u8>,
    events: Vec<Event>,
    checkpoints: Vec<Checkpoint>,
    ops: Vec<OpRec>,
    fsynced: Vec<Fsynced>,
    journal: folio_ext4::JournalStats,
    /// Deepest extent tree a fragmented-file step built.
    deepest: u16,
    /// Files made verity.
    verity: usize,
}

/// End a workload as a power cut would (no close), after checking that
/// writes took the lock-free path and no handle overran its credits;
/// returns the journal's counts.
fn crash_now(fs: Filesystem, seed: u64) -> folio_ext4::JournalStats {
    assert!(
        fs.lock_free_write_bytes() > 0,
        "seed {seed}: no write took the lock-free path"
    );
    let journal = fs.journal_stats().expect("journalled");
    let (handles, over) = fs.handle_stats();
    assert_eq!(
        over, 0,
        "seed {seed}: {over} of {handles} handles overran their credits"
    );
    fs.abandon();
    journal
}

/// What fallocate `mode` over `[off, off+len)` does to a file's bytes.
fn model_fallocate(content: &mut Vec<u8>, mode: u32, off: usize, len: usize) {
    use folio_ext4::falloc::*;
    if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
        let stop = (off + len).min(content.len());
        if off < stop {
            content[off..stop].fill(0);
        }
    }
    if mode & FALLOC_FL_KEEP_SIZE == 0 && off + len > content.len() {
        content.resize(off + len, 0);
    }
}

fn lookup_path(fs: &mut Filesystem, path: &str) -> (u32, Vec<u8>) {
    let (p, n) = fs.resolve_parent(path).unwrap();
    (p, n.as_bytes().to_vec())
}

fn run_workload(seed: u64, bs: u32, steps: usize, small_journal: bool) -> Workload {
    let base = base_image(bs, small_journal);
    let dev = CrashDevice::new(base.clone());
    let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    assert!(
        fs.is_journalled(),
        "the crash test needs a journalled image"
    );
    let mut rng = Rng::new(seed);
    let mut m = Model {
        dirs: vec!["/".into()],
        ..Default::default()
    };
    let mut checkpoints = vec![Checkpoint {
        event: 0,
        step: 0,
        model: m.clone(),
    }];
    let mut ops = Vec::new();
    let mut fsynced = Vec::new();
    let mut big_batch: Vec<Vec<u8>> = Vec::new();
    let trace = std::env::var_os("FOLIO_CRASH_TRACE").is_some();
    let mut next_tag = 1u8;
    let mut deepest = 0u16;
    // Files are held open (as through the mount), so their writes take
    // the lock-free path and their size and times reach the inode block
    // through writeback, fsync and sync: tag → inode.
    let mut open = BTreeMap::<u8, u32>::new();
    // Files made verity: read-only from then on, so left out of the
    // choices (the checks still read them, verified).
    let mut verity = Vec::<u8>::new();
    for step in 1..=steps {
        let mut rec = OpRec {
            event_start: dev.event_count(),
            step,
            ..Default::default()
        };
        let tags: Vec<u8> = m
            .files
            .keys()
            .copied()
            .filter(|t| !verity.contains(t))
            .collect();
        let mut victims = Vec::new();
        let pick = |rng: &mut Rng| tags[rng.below(tags.len() as u64) as usize];
        match rng.below(100) {
            0..=14 if next_tag < 200 => {
                let dir = m.dirs[rng.below(m.dirs.len() as u64) as usize].clone();
                let tag = next_tag;
                next_tag += if next_tag + 1 == MARK { 2 } else { 1 };
                let path = format!("{}/f{tag}", dir.trim_end_matches('/'));
                let (p, n) = lookup_path(&mut fs, &path);
                let ino = fs.create(p, &n, 0o644, ME).unwrap();
                fs.open_ref(ino);
                open.insert(tag, ino);
                m.files.insert(tag, (path, Vec::new()));
                rec.changed.push(tag);
            }
            15..=44 if !tags.is_empty() => {
                let tag = pick(&mut rng);
                let (path, content) = m.files.get_mut(&tag).unwrap();
                let off = if rng.below(3) == 0 {
                    content.len()
                } else {
                    rng.below(40_000) as usize
                };
                let len = 1 + rng.below(6000) as usize;
                let ino = fs.resolve(path).unwrap();
                fs.write(ino, off as u64, &vec![tag; len]).unwrap();
                if content.len() < off + len {
                    content.resize(off + len, 0);
                }
                content[off..off + len].fill(tag);
                rec.changed.push(tag);
            }
            45..=52 if !tags.is_empty() => {
                let tag = pick(&mut rng);
                let (path, content) = m.files.get_mut(&tag).unwrap();
                let size = rng.below(50_000) as usize;
                let ino = fs.resolve(path).unwrap();
                fs.setattr(
                    ino,
                    &SetAttr {
                        size: Some(size as u64),
                        ..Default::default()
                    },
                )
                .unwrap();
                content.resize(size, 0);
                rec.changed.push(tag);
            }
            53..=64 if !tags.is_empty() => {
                let tag = pick(&mut rng);
                let from = m.files[&tag].0.clone();
                let over = rng.below(3) == 0 && tags.len() > 1;
                let to = if over {
                    let victim = pick(&mut rng);
                    if victim == tag {
                        continue;
                    }
                    let p = m.files[&victim].0.clone();
                    m.files.remove(&victim);
                    rec.changed.push(victim);
                    victims.push(victim);
                    p
                } else {
                    let dir = &m.dirs[rng.below(m.dirs.len() as u64) as usize];
                    format!("{}/r{tag}-{step}", dir.trim_end_matches('/'))
                };
                let (p, n) = lookup_path(&mut fs, &from);
                let (q, o) = lookup_path(&mut fs, &to);
                fs.rename(p, &n, q, &o, RenameFlags::default()).unwrap();
                for v in victims.drain(..) {
                    // The replaced file's last reference frees it.
                    fs.close_ref(open.remove(&v).unwrap()).unwrap();
                }
                m.files.get_mut(&tag).unwrap().0 = to.clone();
                rec.renamed = Some((tag, to));
            }
            65..=70 if !tags.is_empty() => {
                let tag = pick(&mut rng);
                let (p, n) = lookup_path(&mut fs, &m.files[&tag].0);
                fs.unlink(p, &n).unwrap();
                fs.close_ref(open.remove(&tag).unwrap()).unwrap();
                m.files.remove(&tag);
                rec.changed.push(tag);
            }
            71..=76 if m.dirs.len() < 6 => {
                let path = format!("/d{step}");
                fs.mkdir(ROOT_INO, &path.as_bytes()[1..], 0o755, ME)
                    .unwrap();
                m.dirs.push(path);
            }
            77..=82 => {
                // Directory growth: many empty entries in one directory.
                let d = match fs.lookup(ROOT_INO, b"big") {
                    Ok(d) => d,
                    Err(_) => fs.mkdir(ROOT_INO, b"big", 0o755, ME).unwrap(),
                };
                // Big transactions on the small journal, so that it wraps:
                // the last batch goes (freeing inodes and dirents), a
                // bigger one comes.
                if small_journal {
                    for name in big_batch.drain(..) {
                        fs.unlink(d, &name).unwrap();
                    }
                }
                for i in 0..if small_journal { 150 } else { 40 } {
                    let name = format!("entry-{step}-{i}-padding-the-name").into_bytes();
                    fs.create(d, &name, 0o644, ME).unwrap();
                    if small_journal {
                        big_batch.push(name);
                    }
                }
                if small_journal {
                    fs.sync().unwrap();
                    checkpoints.push(Checkpoint {
                        event: dev.event_count(),
                        step,
                        model: m.clone(),
                    });
                }
            }
            83..=88 if !tags.is_empty() => {
                use folio_ext4::falloc::*;
                let tag = pick(&mut rng);
                let (path, content) = m.files.get_mut(&tag).unwrap();
                let mode = [
                    0,
                    FALLOC_FL_KEEP_SIZE,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    FALLOC_FL_ZERO_RANGE,
                ][rng.below(4) as usize];
                let (off, len) = (rng.below(40_000) as usize, 1 + rng.below(12_000) as usize);
                let ino = fs.resolve(path).unwrap();
                fs.fallocate(ino, mode, off as u64, len as u64).unwrap();
                model_fallocate(content, mode, off, len);
                rec.changed.push(tag);
            }
            95..=96 if !tags.is_empty() => {
                // A fragmented file: every other block over a range, so the
                // extent tree grows a level or two (1 KiB blocks: more than
                // 4 extents is depth 1, more than 336 is depth 2), with the
                // crash cutting through its splits.
                let tag = pick(&mut rng);
                let (path, content) = m.files.get_mut(&tag).unwrap();
                let b = bs as usize;
                let n = if bs > 4096 {
                    [6, 24][rng.below(2) as usize]
                } else {
                    [6, 60, 360][rng.below(3) as usize]
                };
                let ino = fs.resolve(path).unwrap();
                let chunk = vec![tag; b];
                for i in 0..n {
                    let off = 2 * i * b;
                    // The 4 MiB images of 1 KiB blocks may fill up: the
                    // file then keeps what was accepted.
                    let done = match fs.write(ino, off as u64, &chunk) {
                        Ok(done) => done,
                        Err(folio_ext4::Error::NoSpace) => 0,
                        Err(e) => panic!("fragmented write: {e}"),
                    };
                    if done > 0 && content.len() < off + done {
                        content.resize(off + done, 0);
                    }
                    content[off..off + done].fill(tag);
                    if done < b {
                        break;
                    }
                }
                // (Writes the file back, as FIEMAP would.)
                let depth = fs.extent_depth(ino).unwrap().unwrap_or(0);
                deepest = deepest.max(depth);
                rec.changed.push(tag);
            }
            97..=98 if !tags.is_empty() => {
                // A large xattr value (an EA inode) set, replaced or
                // removed; the crash states must keep the EA inodes'
                // reference counts and their owners' block counts exact.
                let tag = pick(&mut rng);
                let ino = fs.resolve(&m.files[&tag].0).unwrap();
                let name = [b"user.ea0".as_slice(), b"user.ea1"][rng.below(2) as usize];
                if rng.below(4) == 0 {
                    match fs.remove_xattr(ino, name) {
                        Ok(()) | Err(folio_ext4::Error::NoAttr) => {}
                        Err(e) => panic!("remove_xattr: {e}"),
                    }
                } else {
                    let len = 4000 + rng.below(16_000) as usize;
                    match fs.set_xattr(ino, name, &vec![tag; len], folio_ext4::XattrMode::Any) {
                        Ok(()) | Err(folio_ext4::Error::NoSpace) => {}
                        Err(e) => panic!("set_xattr: {e}"),
                    }
                }
            }
            99 if !tags.is_empty() => {
                // fs-verity enabled (tree, descriptor and flag in one
                // transaction): the content does not change, and a crash
                // state must show the file as it was or verity with a
                // tree that verifies every read.
                let tag = pick(&mut rng);
                let ino = fs.resolve(&m.files[&tag].0).unwrap();
                match fs.enable_verity(ino) {
                    Ok(_) => verity.push(tag),
                    Err(folio_ext4::Error::NoSpace) => {}
                    Err(e) => panic!("enable_verity: {e}"),
                }
            }
            89..=94 if !tags.is_empty() => {
                let tag = pick(&mut rng);
                let (path, content) = m.files[&tag].clone();
                let ino = fs.resolve(&path).unwrap();
                fs.fsync(ino, rng.below(2) == 0).unwrap();
                fsynced.push(Fsynced {
                    event: dev.event_count(),
                    step,
                    tag,
                    path,
                    content,
                });
            }
            _ => {
                fs.sync().unwrap();
                checkpoints.push(Checkpoint {
                    event: dev.event_count(),
                    step,
                    model: m.clone(),
                });
            }
        }
        if trace {
            eprintln!(
                "step {step} events {}..{} changed {:?} renamed {:?}",
                rec.event_start,
                dev.event_count(),
                rec.changed,
                rec.renamed
            );
        }
        ops.push(rec);
    }
    let journal = crash_now(fs, seed);
    Workload {
        base,
        events: dev.events(),
        checkpoints,
        ops,
        fsynced,
        deepest,
        journal,
        verity: verity.len(),
    }
}

/// Threads of a threaded workload.
const THREADS: u8 = 3;

/// The workload from `THREADS` threads on one filesystem, so that
/// transactions hold interleaved handles and lock-free writes race
/// other threads' commits, fsyncs and writeback. Each thread works in a
/// directory of its own, on files whose tags are its own (tag ≡ thread
/// mod `THREADS`): every file's history is one thread's sequence, while
/// the device sees all threads' writes interleaved. Steps are numbered in
/// the order operations start (one counter for all threads), so "touched
/// after its fsync" keeps its meaning; there are no sync checkpoints
/// (what a sync covers is not one thread's to say), so checks 2b
/// (fsync'd files), 3 (no stale bytes) and 1 (e2fsck) carry the test.
fn run_threaded_workload(seed: u64, bs: u32, steps: usize) -> Workload {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let base = base_image(bs, false);
    let dev = CrashDevice::new(base.clone());
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let dirs: Vec<u32> = (0..THREADS)
        .map(|t| {
            fs.mkdir(ROOT_INO, format!("t{t}").as_bytes(), 0o755, ME)
                .unwrap()
        })
        .collect();
    let step_no = AtomicUsize::new(0);
    let ops = Mutex::new(Vec::new());
    let fsynced = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (fs, dev, step_no, ops, fsynced) = (&fs, &dev, &step_no, &ops, &fsynced);
            let dir = dirs[usize::from(t)];
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ ((u64::from(t) + 1) * 0x9E37_79B9));
                // tag → (name, content, inode held open)
                let mut files = BTreeMap::<u8, (Vec<u8>, Vec<u8>, u32)>::new();
                let mut next_tag = t + 1;
                for k in 0..steps {
                    let mut rec = OpRec {
                        event_start: dev.event_count(),
                        step: step_no.fetch_add(1, Ordering::AcqRel) + 1,
                        ..Default::default()
                    };
                    let tags: Vec<u8> = files.keys().copied().collect();
                    let pick = |rng: &mut Rng| tags[rng.below(tags.len() as u64) as usize];
                    match rng.below(100) {
                        0..=14 if next_tag < 200 => {
                            let tag = next_tag;
                            next_tag += THREADS;
                            if next_tag == MARK {
                                next_tag += THREADS;
                            }
                            let name = format!("f{tag}").into_bytes();
                            let ino = fs.create(dir, &name, 0o644, ME).unwrap();
                            fs.open_ref(ino);
                            files.insert(tag, (name, Vec::new(), ino));
                            rec.changed.push(tag);
                        }
                        15..=54 if !tags.is_empty() => {
                            let tag = pick(&mut rng);
                            let (_, content, ino) = files.get_mut(&tag).unwrap();
                            let off = if rng.below(3) == 0 {
                                content.len()
                            } else {
                                rng.below(40_000) as usize
                            };
                            let len = 1 + rng.below(6000) as usize;
                            fs.write(*ino, off as u64, &vec![tag; len]).unwrap();
                            if content.len() < off + len {
                                content.resize(off + len, 0);
                            }
                            content[off..off + len].fill(tag);
                            rec.changed.push(tag);
                        }
                        55..=62 if !tags.is_empty() => {
                            let tag = pick(&mut rng);
                            let (_, content, ino) = files.get_mut(&tag).unwrap();
                            let size = rng.below(50_000) as usize;
                            let set = SetAttr {
                                size: Some(size as u64),
                                ..Default::default()
                            };
                            fs.setattr(*ino, &set).unwrap();
                            content.resize(size, 0);
                            rec.changed.push(tag);
                        }
                        63..=68 if !tags.is_empty() => {
                            let tag = pick(&mut rng);
                            let (name, _, _) = files.get_mut(&tag).unwrap();
                            let new = format!("r{tag}-{k}").into_bytes();
                            fs.rename(dir, name, dir, &new, RenameFlags::default())
                                .unwrap();
                            *name = new.clone();
                            let path = format!("/t{t}/{}", String::from_utf8_lossy(&new));
                            rec.renamed = Some((tag, path));
                        }
                        69..=73 if !tags.is_empty() => {
                            let tag = pick(&mut rng);
                            let (name, _, ino) = files.remove(&tag).unwrap();
                            fs.unlink(dir, &name).unwrap();
                            fs.close_ref(ino).unwrap();
                            rec.changed.push(tag);
                        }
                        74..=79 if !tags.is_empty() => {
                            use folio_ext4::falloc::*;
                            let tag = pick(&mut rng);
                            let (_, content, ino) = files.get_mut(&tag).unwrap();
                            let mode = [
                                0,
                                FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_ZERO_RANGE,
                            ][rng.below(4) as usize];
                            let (off, len) =
                                (rng.below(40_000) as usize, 1 + rng.below(12_000) as usize);
                            fs.fallocate(*ino, mode, off as u64, len as u64).unwrap();
                            model_fallocate(content, mode, off, len);
                            rec.changed.push(tag);
                        }
                        80..=96 if !tags.is_empty() => {
                            let tag = pick(&mut rng);
                            let (name, content, ino) = files[&tag].clone();
                            fs.fsync(ino, rng.below(2) == 0).unwrap();
                            fsynced.lock().unwrap().push(Fsynced {
                                event: dev.event_count(),
                                step: rec.step,
                                tag,
                                path: format!("/t{t}/{}", String::from_utf8_lossy(&name)),
                                content,
                            });
                        }
                        _ => fs.sync().unwrap(),
                    }
                    ops.lock().unwrap().push(rec);
                }
            });
        }
    });
    let journal = crash_now(fs, seed);
    let mut ops = ops.into_inner().unwrap();
    ops.sort_by_key(|o: &OpRec| o.step);
    Workload {
        base,
        events: dev.events(),
        checkpoints: vec![Checkpoint {
            event: 0,
            step: 0,
            model: Model {
                dirs: vec!["/".into()],
                ..Default::default()
            },
        }],
        ops,
        fsynced: fsynced.into_inner().unwrap(),
        journal,
        deepest: 0,
        verity: 0,
    }
}

/// Files of a recovered image: path → content.
fn files_of(fs: &mut Filesystem) -> folio_ext4::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in fs.read_dir(dir)? {
            if e.name == b"." || e.name == b".." || e.name == b"lost+found" || e.name == b"big" {
                continue;
            }
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
            let st = fs.stat(e.ino)?;
            match st.file_type {
                FileType::Directory => stack.push((e.ino, path)),
                _ => {
                    let mut b = vec![0u8; st.size as usize];
                    fs.read(e.ino, 0, &mut b)?;
                    out.insert(path, b);
                }
            }
        }
    }
    Ok(out)
}

/// The last flushed image, shared by the crash states built on it, with
/// the CRC32C of each chunk, and an e2fsck scratch file that holds it.
struct Durable {
    image: Arc<Vec<u8>>,
    crcs: Vec<u32>,
    scratch: std::fs::File,
    scratch_path: std::path::PathBuf,
    /// Chunks where the scratch file lags behind `image` (it is brought
    /// up to date lazily, only when a state needs e2fsck); `None`: all.
    scratch_stale: Option<std::collections::BTreeSet<usize>>,
}

impl Durable {
    fn new(image: Vec<u8>, scratch: &std::path::Path) -> Self {
        let crcs = image
            .chunks(CHUNK)
            .map(|c| folio_ext4::csum::crc32c_raw(0, c))
            .collect();
        Durable {
            image: Arc::new(image),
            crcs,
            scratch: std::fs::File::create(scratch).unwrap(),
            scratch_path: scratch.to_path_buf(),
            scratch_stale: None,
        }
    }

    /// Apply flushed writes. No crash state may still hold the image.
    fn apply(&mut self, events: &[Event]) {
        let img = Arc::get_mut(&mut self.image).expect("no state holds the durable image");
        for e in events {
            apply(img, e);
            if let Event::Write { offset, data } = e {
                let (first, end) = (*offset as usize / CHUNK, *offset as usize + data.len());
                for idx in first..end.div_ceil(CHUNK) {
                    let c = &img[idx * CHUNK..((idx + 1) * CHUNK).min(img.len())];
                    self.crcs[idx] = folio_ext4::csum::crc32c_raw(0, c);
                    if let Some(stale) = &mut self.scratch_stale {
                        stale.insert(idx);
                    }
                }
            }
        }
    }

    fn chunk(&self, idx: usize) -> &[u8] {
        &self.image[idx * CHUNK..((idx + 1) * CHUNK).min(self.image.len())]
    }

    /// Key of a crash state's image, for the e2fsck verdict cache: a
    /// 64-bit hash of its per-chunk CRC32Cs.
    fn key(&self, state: &Overlay) -> u64 {
        use std::hash::Hasher;
        let mut changed = Vec::new();
        state.for_each_chunk(|idx, data| {
            changed.push((idx, folio_ext4::csum::crc32c_raw(0, data)));
        });
        // The chunks come in ascending order: walk both lists together.
        let mut changed = changed.into_iter().peekable();
        let mut h = std::hash::DefaultHasher::new();
        for (idx, &crc) in self.crcs.iter().enumerate() {
            match changed.next_if(|&(i, _)| i == idx) {
                Some((_, c)) => h.write_u32(c),
                None => h.write_u32(crc),
            }
        }
        h.finish()
    }

    /// Run `e2fsck -fn` on the durable image patched with `state`'s
    /// chunks; the scratch file is put back afterwards.
    fn e2fsck(&mut self, state: &Overlay) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        match self.scratch_stale.replace(Default::default()) {
            None => self.scratch.write_all_at(&self.image, 0).unwrap(),
            Some(stale) => {
                for idx in stale {
                    let at = (idx * CHUNK) as u64;
                    self.scratch.write_all_at(self.chunk(idx), at).unwrap();
                }
            }
        }
        let mut patched = Vec::new();
        state.for_each_chunk(|idx, data| {
            self.scratch
                .write_all_at(data, (idx * CHUNK) as u64)
                .unwrap();
            patched.push(idx);
        });
        let verdict = e2fsck(&self.scratch_path);
        for idx in patched {
            let at = (idx * CHUNK) as u64;
            self.scratch.write_all_at(self.chunk(idx), at).unwrap();
        }
        verdict
    }
}

/// Keys of crash images whose recovery e2fsck called clean.
type Verdicts = std::collections::HashSet<u64>;

/// Check one crash state. `durable_upto`: events certainly durable;
/// `crash_at`: events issued before the crash.
fn check_state(
    w: &Workload,
    durable: &mut Durable,
    state: Overlay,
    durable_upto: usize,
    crash_at: usize,
    clean: &mut Verdicts,
) -> Result<(), String> {
    let key = durable.key(&state);
    let cp = w
        .checkpoints
        .iter()
        .rev()
        .find(|c| c.event <= durable_upto)
        .expect("checkpoint 0");
    let after: Vec<&OpRec> = w
        .ops
        .iter()
        .filter(|o| o.step > cp.step && o.event_start < crash_at)
        .collect();
    let dump = std::env::var_os("FOLIO_CRASH_DUMP").map(|d| (d, state.to_vec()));
    let state = Arc::new(state);
    let mut fs = Filesystem::open(state.clone(), OpenOptions::default())
        .map_err(|e| format!("open/recovery failed: {e}"))?;
    let files = files_of(&mut fs).map_err(|e| {
        if let Some((dir, img)) = &dump {
            // The state before recovery, for a look with debugfs logdump.
            let p = std::path::Path::new(dir).join(format!("crash-{crash_at}.img"));
            std::fs::write(p, img).unwrap();
        }
        format!("walk failed: {e}")
    })?;
    // 3. No stale or foreign bytes.
    for (path, data) in &files {
        let tag = data.iter().copied().find(|&b| b != 0);
        if let Some(t) = tag {
            if t == MARK || data.iter().any(|&b| b != 0 && b != t) {
                return Err(format!("{path} holds bytes never written to it"));
            }
        }
    }
    // 2. Synced, untouched files are exact.
    for (tag, (path, content)) in &cp.model.files {
        let touched = after
            .iter()
            .any(|o| o.changed.contains(tag) || o.renamed.as_ref().is_some_and(|r| r.0 == *tag));
        let renamed_only = !after.iter().any(|o| o.changed.contains(tag));
        if !touched {
            match files.get(path) {
                Some(d) if d == content => {}
                Some(d) => {
                    return Err(format!(
                        "{path} (synced) has {} bytes, expected {}",
                        d.len(),
                        content.len()
                    ))
                }
                None => return Err(format!("{path} (synced) is missing")),
            }
        } else if renamed_only && !content.is_empty() {
            // 4. All or nothing: exactly one of its names holds it.
            let mut names = vec![path.clone()];
            names.extend(after.iter().filter_map(|o| {
                o.renamed
                    .as_ref()
                    .filter(|r| r.0 == *tag)
                    .map(|r| r.1.clone())
            }));
            let hits = names
                .iter()
                .filter(|n| files.get(*n) == Some(content))
                .count();
            if hits != 1 {
                return Err(format!(
                    "renamed file f{tag} found under {hits} of its names {names:?}"
                ));
            }
        }
    }
    // 2b. Files fsync'd (or fdatasync'd) and untouched since are exact.
    for f in w.fsynced.iter().filter(|f| f.event <= durable_upto) {
        let touched = w.ops.iter().any(|o| {
            o.step > f.step
                && o.event_start < crash_at
                && (o.changed.contains(&f.tag) || o.renamed.as_ref().is_some_and(|r| r.0 == f.tag))
        });
        if touched {
            continue;
        }
        match files.get(&f.path) {
            Some(d) if *d == f.content => {}
            Some(d) => {
                return Err(format!(
                    "{} (fsync'd at step {}) has {} bytes, expected {}",
                    f.path,
                    f.step,
                    d.len(),
                    f.content.len()
                ))
            }
            None => {
                return Err(format!(
                    "{} (fsync'd at step {}) is missing",
                    f.path, f.step
                ))
            }
        }
    }
    for d in &cp.model.dirs {
        if fs.resolve(d).is_err() {
            return Err(format!("synced directory {d} is missing"));
        }
    }
    fs.close().map_err(|e| format!("close failed: {e}"))?;
    // 1. e2fsck, once per distinct crash image.
    if clean.contains(&key) {
        return Ok(());
    }
    let state = Arc::into_inner(state).expect("the filesystem let go of its device");
    durable.e2fsck(&state)?;
    clean.insert(key);
    Ok(())
}

struct Tally {
    checked: usize,
    /// Distinct crash images (e2fsck runs).
    distinct: usize,
    failed: Vec<String>,
    journal: folio_ext4::JournalStats,
    deepest: u16,
    verity: usize,
}

fn crash_states(seed: u64, bs: u32, scratch: &std::path::Path) -> Tally {
    // Every other pair of workloads runs on the smallest journal.
    let small_journal = seed % 4 >= 2;
    let steps = if small_journal { 420 } else { 160 };
    // Every fourth workload (seeds 1, 5, 9, ...) runs from threads.
    let w = if seed % 4 == 1 {
        run_threaded_workload(seed, bs, steps / usize::from(THREADS) + 20)
    } else {
        run_workload(seed, bs, steps, small_journal)
    };
    let mut rng = Rng::new(seed ^ 0x5EED);
    let cuts: usize = env_num("FOLIO_CRASH_CUTS").unwrap_or(20);
    let mut clean = Verdicts::new();
    let mut tally = Tally {
        checked: 0,
        distinct: 0,
        failed: Vec::new(),
        journal: w.journal,
        deepest: w.deepest,
        verity: w.verity,
    };
    let mut durable = Durable::new(w.base.clone(), scratch);
    let mut prev = 0usize;
    let flushes: Vec<usize> = w
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Flush))
        .map(|(i, _)| i)
        .collect();
    let ends = flushes
        .iter()
        .copied()
        .chain(std::iter::once(w.events.len()));
    for f in ends {
        // Random points between the previous flush and this one, with
        // random subsets of the pending writes, torn by sector.
        if f > prev {
            for _ in 0..cuts {
                let cut = prev + 1 + rng.below((f - prev) as u64) as usize;
                let p = [10, 50, 90][rng.below(3) as usize];
                let mut kr = Rng::new(rng.next_u64());
                let state = crash_overlay(&durable.image, &w.events[prev..cut], PIECE, |_, _| {
                    kr.below(100) < p
                });
                tally.checked += 1;
                if let Err(e) = check_state(&w, &mut durable, state, prev, cut, &mut clean) {
                    tally.failed.push(format!("seed {seed} bs {bs}: crash after event {cut} (durable {prev}, keep {p}%): {e}"));
                }
            }
        }
        if f == w.events.len() {
            break;
        }
        durable.apply(&w.events[prev..f]);
        prev = f + 1;
        tally.checked += 1;
        let state = Overlay::new(durable.image.clone());
        if let Err(e) = check_state(&w, &mut durable, state, prev, prev, &mut clean) {
            tally.failed.push(format!(
                "seed {seed} bs {bs}: crash at flush event {f}: {e}"
            ));
        }
    }
    tally.distinct = clean.len() + tally.failed.len();
    tally
}

/// A numeric setting from the environment.
fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn every_crash_state_recovers_clean_with_synced_data_intact() {
    if !require(have_tool("e2fsck"), "e2fsck is not installed") {
        return;
    }
    let workloads: u64 = env_num("FOLIO_CRASH_WORKLOADS").unwrap_or(16);
    let forced_bs: Option<u32> = env_num("FOLIO_CRASH_BS");
    let t = TempDir::in_memory("crash");
    let results: Vec<Tally> = std::thread::scope(|s| {
        // One worker per core (two on the development VM).
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get() as u64)
            .clamp(1, workloads.max(1));
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                let scratch = t.join(&format!("state-{worker}.img"));
                s.spawn(move || {
                    let mut out = Vec::new();
                    let only: Option<u64> = env_num("FOLIO_CRASH_SEED");
                    for seed in (worker..workloads).step_by(workers as usize) {
                        if only.is_some_and(|o| o != seed) {
                            continue;
                        }
                        // 1 KiB and 4 KiB blocks in turn; every eighth
                        // workload on 64 KiB blocks (larger than a page).
                        let bs = forced_bs.unwrap_or(match seed % 8 {
                            7 => 65536,
                            s if s % 2 == 0 => 1024,
                            _ => 4096,
                        });
                        out.push(crash_states(seed, bs, &scratch));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let checked: usize = results.iter().map(|r| r.checked).sum();
    let distinct: usize = results.iter().map(|r| r.distinct).sum();
    let failed: Vec<&String> = results.iter().flat_map(|r| &r.failed).collect();
    let commits: u64 = results.iter().map(|r| r.journal.commits).sum();
    let checkpoints: u64 = results.iter().map(|r| r.journal.checkpoints).sum();
    let revokes: u64 = results.iter().map(|r| r.journal.revokes).sum();
    let deepest = results.iter().map(|r| r.deepest).max().unwrap_or(0);
    let verity: usize = results.iter().map(|r| r.verity).sum();
    println!(
        "crash states checked: {checked} ({distinct} distinct images), failed: {} (workloads \
         made {commits} commits, {checkpoints} checkpoints, {revokes} revoke records; \
         deepest extent tree {deepest}; {verity} files made verity)",
        failed.len()
    );
    for f in &failed {
        println!("FAILED {f}");
    }
    assert!(checked > 500, "only {checked} crash states");
    if workloads >= 8 && std::env::var_os("FOLIO_CRASH_SEED").is_none() {
        assert!(
            checkpoints > 0 && revokes > 0,
            "the workloads must wrap the log and revoke blocks"
        );
        assert!(
            deepest >= 2,
            "the fragmented files must reach extent depth 2 (got {deepest})"
        );
        assert!(verity > 0, "the workloads must make files verity");
    }
    assert!(
        failed.is_empty(),
        "{} of {checked} crash states failed:\n{}",
        failed.len(),
        failed
            .iter()
            .take(10)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
