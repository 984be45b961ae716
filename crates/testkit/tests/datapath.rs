//! The page cache and iomap data path under faults: a copy that fails
//! midway (seed 000), a device that fails writes, direct I/O against a
//! dirty cache and a pinned block map written behind the filesystem's back
//! (seed 002). Every image left behind is e2fsck'd, and devices are filled
//! with a marker first so a stale block would show.

use std::io;
use std::sync::Arc;

use folio_blockdev::{BlockDevice, FaultDevice, MemDevice};
use folio_ext4::falloc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE};
use folio_ext4::mkfs::{mkfs, MkfsOptions};
use folio_ext4::{Error, Filesystem, OpenOptions, Owner, SetAttr, ROOT_INO};
use folio_testkit::*;

const MARK: u8 = 0xe7;
const ME: Owner = Owner { uid: 0, gid: 0 };

/// A marker-filled memory device with a fresh filesystem.
fn marked_dev(size: usize, bs: u32) -> MemDevice {
    let dev = MemDevice::from_bytes(vec![MARK; size]);
    let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
    mkfs(
        d,
        size as u64,
        &MkfsOptions {
            block_size: Some(bs),
            ..Default::default()
        },
    )
    .unwrap();
    dev
}

fn read_all(fs: &mut Filesystem, ino: u32) -> Vec<u8> {
    let size = fs.stat(ino).unwrap().size as usize;
    let mut b = vec![0u8; size];
    assert_eq!(fs.read(ino, 0, &mut b).unwrap(), size);
    b
}

fn fsck_bytes(bytes: Vec<u8>, tag: &str) {
    if !require(have_tool("e2fsck"), "e2fsck is not installed") {
        return;
    }
    let t = TempDir::new(tag);
    let img = t.join("img");
    std::fs::write(&img, bytes).unwrap();
    e2fsck(&img).unwrap_or_else(|e| panic!("{tag}: {e}"));
}

/// What a power cut leaves of `base` after the writes `dev` recorded:
/// everything up to its last completed flush.
fn at_last_flush(base: Vec<u8>, dev: &folio_blockdev::CrashDevice) -> Vec<u8> {
    use folio_blockdev::crash::{apply, Event};
    let events = dev.events();
    let last = events
        .iter()
        .rposition(|e| matches!(e, Event::Flush))
        .unwrap();
    let mut img = base;
    for e in &events[..last] {
        apply(&mut img, e);
    }
    img
}

/// Blocks in use, counted from the bitmaps' summary.
fn used_blocks(fs: &mut Filesystem) -> u64 {
    let s = fs.statfs();
    s.blocks - s.blocks_free
}

#[test]
fn a_copy_failing_midway_keeps_exactly_what_was_copied() {
    for bs in [1024u32, 4096, 65536] {
        let size = if bs == 65536 { 64 << 20 } else { 16 << 20 };
        let dev = marked_dev(size, bs);
        let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
        let mut fs = Filesystem::open(d.clone(), OpenOptions::default()).unwrap();
        let f = fs.create(ROOT_INO, b"f", 0o644, ME).unwrap();
        fs.sync().unwrap();
        let used0 = used_blocks(&mut fs);
        let b = bs as usize;
        // Ask for 10 blocks; the source faults after 3.5 of them.
        let mut given = 0usize;
        let stop = 3 * b + b / 2;
        let n = fs
            .write_with(f, 0, 10 * b, &mut |buf: &mut [u8]| {
                let room = (stop - given).min(buf.len());
                for (i, x) in buf[..room].iter_mut().enumerate() {
                    *x = ((given + i) % 253) as u8;
                }
                given += room;
                // Like copy_from_user: a fault makes the copy short.
                Ok(room)
            })
            .unwrap();
        // The half-copied block was never uptodate: it does not count.
        assert_eq!(n, 3 * b, "bs {bs}");
        assert_eq!(fs.stat(f).unwrap().size, 3 * b as u64);
        let want: Vec<u8> = (0..3 * b).map(|i| (i % 253) as u8).collect();
        assert_eq!(read_all(&mut fs, f), want);
        // The reservation for the other 7 blocks was given back: after
        // writeback exactly 3 data blocks are used (the map fits in the
        // inode).
        fs.sync().unwrap();
        assert_eq!(used_blocks(&mut fs) - used0, 3, "bs {bs}");
        let runs = fs.block_runs(f).unwrap();
        assert_eq!(runs.iter().map(|r| r.len).sum::<u64>(), 3);
        // A source failing at once: EFAULT, nothing changes.
        let e = fs
            .write_with(f, 5 * b as u64, b, &mut |_buf: &mut [u8]| {
                Err(io::Error::from_raw_os_error(libc::EFAULT))
            })
            .unwrap_err();
        assert_eq!(e.errno(), libc::EFAULT);
        assert_eq!(fs.stat(f).unwrap().size, 3 * b as u64);
        // Midway into existing data: the rest of the old data stays.
        let mut given = 0usize;
        let n = fs
            .write_with(f, 0, 3 * b, &mut |buf: &mut [u8]| {
                let room = (b + 10 - given).min(buf.len());
                buf[..room].fill(0xaa);
                given += room;
                Ok(room)
            })
            .unwrap();
        // Block 1 was uptodate (cached), so the 10 bytes into it count.
        assert_eq!(n, b + 10);
        let got = read_all(&mut fs, f);
        assert!(got[..b + 10].iter().all(|&x| x == 0xaa));
        assert_eq!(&got[b + 10..], &want[b + 10..]);
        assert_eq!(fs.check_counts(None).unwrap(), Vec::<String>::new());
        fs.close().unwrap();
        let snap = dev.snapshot();
        let mut fs = Filesystem::open(
            Arc::new(MemDevice::from_bytes(snap.clone())),
            OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(read_all(&mut fs, f), got);
        drop(fs);
        fsck_bytes(snap, &format!("shortcopy-{bs}"));
    }
}

#[test]
fn a_device_failing_writes_loses_nothing_and_exposes_nothing() {
    for bs in [1024u32, 4096] {
        let size = 32 << 20;
        let dev = marked_dev(size, bs);
        let fault = Arc::new(FaultDevice::new(Arc::new(dev.clone())));
        let d: Arc<dyn BlockDevice> = fault.clone();
        let mut fs = Filesystem::open(d, OpenOptions::default()).unwrap();
        let x = fs.create(ROOT_INO, b"x", 0o644, ME).unwrap();
        let d1 = vec![0x11u8; 64 << 10];
        fs.write(x, 0, &d1).unwrap();
        fs.sync().unwrap();
        // New data: an overwrite, an append (delayed blocks) and a new file.
        let d2: Vec<u8> = (0..96 << 10).map(|i| (i % 241) as u8 + 1).collect();
        fs.write(x, 0, &d2).unwrap();
        let y = fs.create(ROOT_INO, b"y", 0o644, ME).unwrap();
        let dy = vec![0x22u8; 40 << 10];
        fs.write(y, 0, &dy).unwrap();
        // Every write fails from now on (for the second block size only
        // those to the first half of the device, where the data goes; the
        // journal in the middle still works).
        if bs == 4096 {
            fault.set_range(0, size as u64 / 2);
        }
        fault.set_fail_writes(true);
        fs.write(y, dy.len() as u64, &[0x33u8; 9000]).unwrap();
        let e = fs.sync().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "bs {bs}: {e}");
        assert!(fault.failures() > 0);
        let e = fs.fsync(x, false).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        // Nothing is lost in memory: the data is still there, dirty.
        assert_eq!(read_all(&mut fs, x), d2);
        let mut want_y = dy.clone();
        want_y.extend_from_slice(&[0x33u8; 9000]);
        assert_eq!(read_all(&mut fs, y), want_y);

        // A power cut now: the device as it is recovers clean to the last
        // good sync, with no stale (marker) bytes and no half state.
        let crashed = dev.snapshot();
        {
            let mut c = Filesystem::open(
                Arc::new(MemDevice::from_bytes(crashed.clone())),
                OpenOptions::default(),
            )
            .unwrap();
            let cx = c.lookup(ROOT_INO, b"x").unwrap();
            assert_eq!(read_all(&mut c, cx), d1, "bs {bs}: x after the crash");
            if let Ok(cy) = c.lookup(ROOT_INO, b"y") {
                let got = read_all(&mut c, cy);
                assert!(!got.contains(&MARK), "bs {bs}: stale bytes in y");
            }
            c.close().unwrap();
        }
        let recovered = {
            let mut v = crashed;
            // Recovery wrote to its own copy; replay on this one too.
            let m = MemDevice::from_bytes(std::mem::take(&mut v));
            Filesystem::open(Arc::new(m.clone()), OpenOptions::default())
                .unwrap()
                .close()
                .unwrap();
            m.snapshot()
        };
        fsck_bytes(recovered, &format!("eio-crash-{bs}"));

        // The device heals: the next sync writes everything.
        fault.set_fail_writes(false);
        fs.sync().unwrap();
        fs.close().unwrap();
        let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
        assert_eq!(read_all(&mut fs, x), d2);
        assert_eq!(read_all(&mut fs, y), want_y);
        fs.close().unwrap();
        fsck_bytes(dev.snapshot(), &format!("eio-healed-{bs}"));
    }
}

#[test]
fn direct_io_and_pinned_maps_stay_coherent_with_the_cache() {
    let bs = 4096u32;
    let size = 32 << 20;
    let dev = marked_dev(size, bs);
    let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let f = fs.create(ROOT_INO, b"bitmap", 0o644, ME).unwrap();
    let k = 64 << 10;
    // Dirty cached data, then a direct write into the middle of it.
    fs.write(f, 0, &vec![b'A'; k]).unwrap();
    fs.write_direct(f, 16 << 10, &vec![b'B'; 16 << 10]).unwrap();
    let mut want = vec![b'A'; k];
    want[16 << 10..32 << 10].fill(b'B');
    assert_eq!(read_all(&mut fs, f), want);
    // A later writeback must not bring the cached A's back over the B's.
    fs.sync().unwrap();
    fs.drop_caches();
    assert_eq!(read_all(&mut fs, f), want);
    let mut direct = vec![0u8; k];
    assert_eq!(fs.read_direct(f, 0, &mut direct).unwrap(), k);
    assert_eq!(direct, want);
    // Unaligned direct I/O is EINVAL.
    assert_eq!(
        fs.write_direct(f, 100, &[0u8; 4096]).unwrap_err().errno(),
        libc::EINVAL
    );

    // The md-bitmap window: a client takes the block map, writes the
    // blocks itself, while the cache holds (dirty) data of the file.
    fs.write(f, 0, &vec![b'C'; 8 << 10]).unwrap();
    want[..8 << 10].fill(b'C');
    let runs = fs.pin_mapping(f).unwrap();
    assert_eq!(runs.iter().map(|r| r.2).sum::<u64>(), (k / 4096) as u64);
    for &(l, p, n) in &runs {
        for i in 0..n {
            let at = ((l + i) * 4096) as usize;
            let blk = vec![b'D' ^ (at / 4096) as u8; 4096];
            dev.write_at((p + i) * 4096, &blk).unwrap();
            want[at..at + 4096].copy_from_slice(&blk);
        }
    }
    // Nothing may move or free the pinned blocks.
    let trunc = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(fs.setattr(f, &trunc).unwrap_err().errno(), libc::ETXTBSY);
    let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        fs.fallocate(f, punch, 0, 4096).unwrap_err().errno(),
        libc::EBUSY
    );
    assert!(matches!(
        fs.write_direct(f, 0, &[0u8; 4096]),
        Err(Error::Busy)
    ));
    // Syncing while pinned writes nothing stale over the client's blocks.
    fs.sync().unwrap();
    fs.unpin_mapping(f).unwrap();
    assert_eq!(read_all(&mut fs, f), want);
    fs.setattr(f, &trunc).unwrap();
    fs.close().unwrap();
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    assert_eq!(fs.stat(f).unwrap().size, 0);
    fs.close().unwrap();
    fsck_bytes(dev.snapshot(), "dio-pinned");
}

#[test]
fn writes_that_fill_the_disk_all_read_back_after_reopen() {
    // Delayed allocation must not accept what writeback cannot place:
    // fill a small image with many files until ENOSPC, then check every
    // byte reported written survives close and reopen.
    for bs in [1024u32, 4096] {
        let size = 4 << 20;
        let dev = marked_dev(size, bs);
        let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
        let mut files = Vec::new();
        let mut rng = Rng::new(u64::from(bs));
        'fill: for i in 0.. {
            let name = format!("f{i}");
            let Ok(ino) = fs.create(ROOT_INO, name.as_bytes(), 0o644, ME) else {
                break;
            };
            let mut content = Vec::new();
            loop {
                let len = 1 + rng.below(20000) as usize;
                let chunk = rng.bytes(len);
                match fs.write(ino, content.len() as u64, &chunk) {
                    Ok(n) => {
                        content.extend_from_slice(&chunk[..n]);
                        if n < chunk.len() {
                            files.push((name, content));
                            break 'fill;
                        }
                    }
                    Err(e) => {
                        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
                        files.push((name, content));
                        break 'fill;
                    }
                }
                if content.len() > 200_000 {
                    break;
                }
            }
            files.push((name, content));
        }
        assert!(fs.statfs().blocks_free < 8, "bs {bs}: the disk is full");
        fs.close().unwrap();
        let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
        for (name, content) in &files {
            let ino = fs.lookup(ROOT_INO, name.as_bytes()).unwrap();
            assert_eq!(&read_all(&mut fs, ino), content, "bs {bs}: {name}");
        }
        fs.close().unwrap();
        fsck_bytes(dev.snapshot(), &format!("full-{bs}"));
    }
}

#[test]
fn the_allocation_api_reserves_allocates_and_deallocates_without_the_cache() {
    use folio_ext4::AllocOp;
    let dev = marked_dev(16 << 20, 4096);
    let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let f = fs.create(ROOT_INO, b"f", 0o644, ME).unwrap();
    fs.setattr(
        f,
        &SetAttr {
            size: Some(64 << 10),
            ..Default::default()
        },
    )
    .unwrap();
    let free0 = fs.statfs().blocks_free;
    // Reserve: counted against free space, nothing placed, reads zeros.
    fs.allocate_interval(f, AllocOp::Reserve, 0, 4).unwrap();
    assert_eq!(fs.statfs().blocks_free, free0 - 4);
    assert!(fs.block_runs(f).unwrap().is_empty());
    let runs = fs.fiemap(f, false).unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].delalloc && runs[0].len == 4);
    // Deallocate gives the reservation back.
    fs.allocate_interval(f, AllocOp::Deallocate, 0, 4).unwrap();
    assert_eq!(fs.statfs().blocks_free, free0);
    // Allocate: real blocks, unwritten, reading as zeros; no marker leaks.
    fs.allocate_interval(f, AllocOp::Allocate, 2, 6).unwrap();
    let runs = fs.block_runs(f).unwrap();
    assert_eq!(runs.iter().map(|r| r.len).sum::<u64>(), 6);
    assert!(runs.iter().all(|r| r.unwritten && r.lblk >= 2));
    assert!(read_all(&mut fs, f).iter().all(|&b| b == 0));
    // A buffered write into them, then deallocate part: the rest stays.
    fs.write(f, 2 * 4096, &[7u8; 4096 * 6]).unwrap();
    fs.allocate_interval(f, AllocOp::Deallocate, 4, 2).unwrap();
    let got = read_all(&mut fs, f);
    assert!(got[2 * 4096..4 * 4096].iter().all(|&b| b == 7));
    assert!(got[4 * 4096..6 * 4096].iter().all(|&b| b == 0));
    assert!(got[6 * 4096..8 * 4096].iter().all(|&b| b == 7));
    assert_eq!(fs.check_counts(None).unwrap(), Vec::<String>::new());
    fs.close().unwrap();
    fsck_bytes(dev.snapshot(), "alloc-api");
}

/// Flushes are issued where durability needs them and nowhere else: a
/// commit takes two, an fsync with nothing to commit flushes only if data
/// went out, fdatasync leaves timestamp-only changes uncommitted, and one
/// file's fsync does not write another file's data. The durable state at
/// the end recovers with the fsync'd bytes.
#[test]
fn fsync_and_fdatasync_flush_only_what_durability_needs() {
    use folio_blockdev::crash::Event;
    let base = marked_dev(16 << 20, 4096).snapshot();
    let dev = folio_blockdev::CrashDevice::new(base.clone());
    let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let flushes = |dev: &folio_blockdev::CrashDevice| {
        dev.events()
            .iter()
            .filter(|e| matches!(e, Event::Flush))
            .count()
    };
    let ino = fs.create(ROOT_INO, b"f", 0o644, ME).unwrap();
    let mut model = vec![1u8; 8192];
    fs.write(ino, 0, &model).unwrap();
    fs.fsync(ino, false).unwrap();
    let step = |fs: &mut Filesystem, what: &str, want: usize, f: &dyn Fn(&mut Filesystem)| {
        let before = flushes(&dev);
        f(fs);
        assert_eq!(flushes(&dev) - before, want, "{what}");
    };
    step(&mut fs, "append + fsync: one commit", 2, &|fs| {
        fs.write(ino, 8192, &[2u8; 4096]).unwrap();
        fs.fsync(ino, false).unwrap();
    });
    model.extend_from_slice(&[2u8; 4096]);
    step(&mut fs, "fsync with nothing to do", 0, &|fs| {
        fs.fsync(ino, false).unwrap();
    });
    step(
        &mut fs,
        "overwrite + fdatasync: data flush only",
        1,
        &|fs| {
            fs.write(ino, 0, &[3u8; 4096]).unwrap();
            fs.fsync(ino, true).unwrap();
        },
    );
    model[..4096].fill(3);
    step(
        &mut fs,
        "fsync commits the mtime fdatasync left",
        2,
        &|fs| {
            fs.fsync(ino, false).unwrap();
        },
    );
    step(&mut fs, "a size change + fdatasync: one commit", 2, &|fs| {
        fs.write(ino, 12288, &[4u8; 100]).unwrap();
        fs.fsync(ino, true).unwrap();
    });
    model.extend_from_slice(&[4u8; 100]);
    let other = fs.create(ROOT_INO, b"other", 0o644, ME).unwrap();
    fs.write(other, 0, &[5u8; 65536]).unwrap();
    step(
        &mut fs,
        "fsync of an unchanged file beside another's dirty data",
        0,
        &|fs| {
            fs.fsync(ino, true).unwrap();
        },
    );
    // Power cut: only what the last flush made durable.
    fs.abandon();
    let mem = MemDevice::from_bytes(at_last_flush(base, &dev));
    let mut fs = Filesystem::open(Arc::new(mem.clone()), OpenOptions::default()).unwrap();
    let ino = fs.lookup(ROOT_INO, b"f").unwrap();
    assert!(
        read_all(&mut fs, ino) == model,
        "the fsync'd file after the crash"
    );
    fs.close().unwrap();
    fsck_bytes(mem.snapshot(), "fsync-flushes");
}

/// The periodic commit (`commit_expired`, the mount's flusher every 5 s):
/// files dirty for the expiry age are written back and their data is
/// durable at the commit; a file dirtied since keeps its data cached, and
/// a power cut then leaves it with its committed name and never with
/// stale blocks.
#[test]
fn the_periodic_commit_writes_back_only_expired_files() {
    use std::time::Duration;
    let base = marked_dev(16 << 20, 4096).snapshot();
    let dev = folio_blockdev::CrashDevice::new(base.clone());
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let old = fs.create(ROOT_INO, b"old", 0o644, ME).unwrap();
    let old_data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    fs.write(old, 0, &old_data).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    let young = fs.create(ROOT_INO, b"young", 0o644, ME).unwrap();
    fs.write(young, 0, &[9u8; 65536]).unwrap();
    let pc = fs.page_cache().clone();
    assert_eq!(
        pc.expired_inodes(Duration::from_millis(50)),
        vec![u64::from(old)]
    );
    fs.commit_expired(Duration::from_millis(50)).unwrap();
    assert_eq!(
        pc.dirty_inodes(),
        vec![u64::from(young)],
        "only the young file stays dirty"
    );
    fs.abandon();
    let mem = MemDevice::from_bytes(at_last_flush(base, &dev));
    let mut fs = Filesystem::open(Arc::new(mem.clone()), OpenOptions::default()).unwrap();
    let old = fs.lookup(ROOT_INO, b"old").unwrap();
    assert!(
        read_all(&mut fs, old) == old_data,
        "the expired file's data"
    );
    let young = fs.lookup(ROOT_INO, b"young").unwrap();
    let got = read_all(&mut fs, young);
    assert!(
        got.iter().all(|&b| b == 0),
        "the young file shows no stale block ({} bytes)",
        got.len()
    );
    fs.close().unwrap();
    fsck_bytes(mem.snapshot(), "periodic-commit");
}

/// A journal that cannot be written (the device failing under the log,
/// as an NBD server that went away): the commit fails with EIO, the
/// filesystem turns read-only (jbd2's abort, ext4's errors=remount-ro)
/// and stays so even when the device heals, reads still work, close
/// reports the failure, and the next open replays the log to the last
/// good commit.
#[test]
fn a_failed_journal_write_turns_the_filesystem_read_only() {
    let bs = 4096u32;
    let size = 32 << 20;
    let dev = marked_dev(size, bs);
    let fault = Arc::new(FaultDevice::new(Arc::new(dev.clone())));
    let d: Arc<dyn BlockDevice> = fault.clone();
    let fs = Filesystem::open(d, OpenOptions::default()).unwrap();
    let a = fs.create(ROOT_INO, b"a", 0o644, ME).unwrap();
    let da = vec![0x5au8; 48 << 10];
    fs.write(a, 0, &da).unwrap();
    fs.sync().unwrap();
    // Fail writes to the journal's span (it is in a few runs; the
    // metadata between them is only written at checkpoints).
    let log = fs
        .block_runs(folio_ext4::format::inode::JOURNAL_INO)
        .unwrap();
    let (start, end) = (
        log.iter().map(|r| r.pblk).min().unwrap() * u64::from(bs),
        log.iter().map(|r| r.pblk + r.len).max().unwrap() * u64::from(bs),
    );
    fault.set_range(start, end);
    fault.set_fail_writes(true);
    fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap();
    let e = fs.sync().unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(fault.failures() > 0);
    fault.set_fail_writes(false);
    // Read-only from now on, healed device or not.
    let why = fs.read_only_reason().expect("read-only after the abort");
    assert!(why.contains("journal was aborted"), "{why}");
    assert_eq!(
        fs.create(ROOT_INO, b"b", 0o644, ME).unwrap_err().errno(),
        libc::EROFS
    );
    assert_eq!(fs.write(a, 0, b"x").unwrap_err().errno(), libc::EROFS);
    assert_eq!(fs.sync().unwrap_err().errno(), libc::EROFS);
    let mut fs = fs;
    assert_eq!(read_all(&mut fs, a), da);
    assert_eq!(fs.close().unwrap_err().errno(), libc::EROFS);
    // The next open replays what was committed: a is there, e2fsck clean.
    let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let a = fs.lookup(ROOT_INO, b"a").unwrap();
    assert_eq!(read_all(&mut fs, a), da);
    fs.close().unwrap();
    fsck_bytes(dev.snapshot(), "journal-abort");
}

/// Which writes a [`GateDevice`] holds back or fails.
type WriteMatcher = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// A device that holds back or fails the writes it matches (by default,
/// of one data pattern: a write whose first 512 bytes are all `pattern`),
/// for tests of writes in flight.
struct GateDevice {
    inner: Arc<dyn BlockDevice>,
    matches: WriteMatcher,
    /// (mode, writes held back so far): mode 0 passes, 1 holds the write
    /// until the mode changes, 2 fails it with EIO.
    state: std::sync::Mutex<(u8, usize)>,
    cv: std::sync::Condvar,
}

impl GateDevice {
    fn new(inner: Arc<dyn BlockDevice>, pattern: u8) -> Self {
        Self::matching(inner, move |buf| {
            buf.len() >= 512 && buf[..512].iter().all(|&b| b == pattern)
        })
    }
    fn matching(
        inner: Arc<dyn BlockDevice>,
        matches: impl Fn(&[u8]) -> bool + Send + Sync + 'static,
    ) -> Self {
        GateDevice {
            inner,
            matches: Box::new(matches),
            state: std::sync::Mutex::new((0, 0)),
            cv: std::sync::Condvar::new(),
        }
    }
    fn set_mode(&self, mode: u8) {
        self.state.lock().unwrap().0 = mode;
        self.cv.notify_all();
    }
    /// Is a write held back, or is one within `wait`?
    fn held_within(&self, wait: std::time::Duration) -> bool {
        let st = self.state.lock().unwrap();
        let (st, _) = self
            .cv
            .wait_timeout_while(st, wait, |st| st.1 == 0)
            .unwrap();
        st.1 > 0
    }
    /// Wait until a write is being held back.
    fn wait_held(&self) {
        let mut st = self.state.lock().unwrap();
        while st.1 == 0 {
            st = self.cv.wait(st).unwrap();
        }
    }
}

impl BlockDevice for GateDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if (self.matches)(buf) {
            let mut st = self.state.lock().unwrap();
            if st.0 == 2 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if st.0 == 1 {
                st.1 += 1;
                self.cv.notify_all();
                while st.0 == 1 {
                    st = self.cv.wait(st).unwrap();
                }
            }
        }
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        self.inner.discard(offset, len_bytes)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}

/// The file `name` of an image as its journal replay leaves it.
fn recovered_file(bytes: Vec<u8>, name: &[u8]) -> Option<Vec<u8>> {
    let mut fs = Filesystem::open(
        Arc::new(MemDevice::from_bytes(bytes)),
        OpenOptions::default(),
    )
    .unwrap();
    let got = fs.lookup(ROOT_INO, name).ok().map(|x| read_all(&mut fs, x));
    fs.close().unwrap();
    got
}

/// Writeback writes file data with the core lock released, after it has
/// mapped the blocks *written*: a commit by another thread meanwhile must
/// wait for that data (ordered mode), and a mapping whose data failed to
/// arrive must be undone before any commit carries it. Checked on the
/// device as it is while a data write is held back (a power cut then),
/// and after a failed one and another file's commit.
#[test]
fn commits_wait_for_writeback_data_written_without_the_core_lock() {
    const DATA: u8 = 0xa7;
    let size = 32 << 20;
    let dev = marked_dev(size, 4096);
    let gate = Arc::new(GateDevice::new(Arc::new(dev.clone()), DATA));
    let d: Arc<dyn BlockDevice> = gate.clone();
    let fs = Filesystem::open(d, OpenOptions::default()).unwrap();
    let x = fs.create(ROOT_INO, b"x", 0o644, ME).unwrap();
    let y = fs.create(ROOT_INO, b"y", 0o644, ME).unwrap();
    fs.sync().unwrap();
    let dx = vec![DATA; 256 << 10];
    fs.write(x, 0, &dx).unwrap();

    // A write held back: x's fsync is in flight while y's commits.
    gate.set_mode(1);
    let during = std::thread::scope(|s| {
        let a = s.spawn(|| fs.fsync(x, false));
        gate.wait_held();
        let b = s.spawn(|| {
            fs.write(y, 0, &[0x5c; 8192]).unwrap();
            fs.fsync(y, false)
        });
        // Time for y's commit to run (it must wait for x's data); the
        // check below does not depend on it, a commit that did not wait
        // would be caught only if it had run by then.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let during = dev.snapshot();
        gate.set_mode(0);
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
        during
    });
    if let Some(got) = recovered_file(during, b"x") {
        assert!(
            !got.contains(&MARK),
            "x maps blocks whose data was not written yet"
        );
    }
    assert!(
        recovered_file(dev.snapshot(), b"x").unwrap() == dx,
        "x after its fsync"
    );

    // A write that fails: the next commit (y's) undoes x's new mapping.
    let dx2 = vec![DATA; 512 << 10];
    fs.write(x, 256 << 10, &dx2).unwrap();
    gate.set_mode(2);
    assert_eq!(fs.fsync(x, false).unwrap_err().errno(), libc::EIO);
    fs.write(y, 0, &[0x5d; 8192]).unwrap();
    fs.fsync(y, false).unwrap();
    let got = recovered_file(dev.snapshot(), b"x").unwrap();
    assert!(!got.contains(&MARK), "x maps blocks whose write failed");
    assert!(got[..dx.len()] == dx[..], "x lost fsync'd data");
    // Nothing is lost: the data is still dirty, and goes once the device heals.
    gate.set_mode(0);
    let mut fs = fs;
    let mut want = dx.clone();
    want.extend_from_slice(&dx2);
    assert!(
        read_all(&mut fs, x) == want,
        "x in memory after the failed write"
    );
    // A failed write rewritten before any commit: that commit keeps the
    // mapping, whose data is there now.
    fs.write(x, want.len() as u64, &dx2).unwrap();
    want.extend_from_slice(&dx2);
    gate.set_mode(2);
    assert_eq!(fs.fsync(x, false).unwrap_err().errno(), libc::EIO);
    gate.set_mode(0);
    fs.fsync(x, false).unwrap();
    assert!(
        recovered_file(dev.snapshot(), b"x").unwrap() == want,
        "x after a rewrite that followed a failed write"
    );
    fs.close().unwrap();
    assert!(
        recovered_file(dev.snapshot(), b"x").unwrap() == want,
        "x after close"
    );
    fsck_bytes(dev.snapshot(), "deferred-writeback");
}

/// A jbd2 commit block (magic, block type 2).
fn is_commit_block(buf: &[u8]) -> bool {
    buf.len() >= 1024 && buf[..8] == [0xc0, 0x3b, 0x39, 0x98, 0, 0, 0, 2]
}

/// Run `f` on another thread; if it has not returned after a long grace
/// (it is waiting for the held-back commit, say), give up: release the
/// gate so the test can end, and fail.
fn finishes_while_held<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    gate: &GateDevice,
    what: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = s.spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
        gate.set_mode(0);
        panic!("{what} waited for a commit being written");
    }
    h.join().unwrap()
}

/// A commit's device writes run without the core lock: while its commit
/// block is held back, other requests — lookups, reads, creates and
/// writes on the next transaction — complete; an fsync of a file the
/// committing transaction holds waits for it, and one of a file the next
/// transaction holds commits after it. Blocks the next transaction changed
/// meanwhile stay dirty for it (a power cut after both commits recovers
/// both). A failed commit write aborts the journal.
#[test]
fn commits_are_written_without_the_core_lock() {
    let dev = marked_dev(32 << 20, 4096);
    let gate = Arc::new(GateDevice::matching(Arc::new(dev.clone()), is_commit_block));
    let d: Arc<dyn BlockDevice> = gate.clone();
    let fs = Filesystem::open(d, OpenOptions::default()).unwrap();
    let a = fs.create(ROOT_INO, b"a", 0o644, ME).unwrap();
    fs.sync().unwrap();
    let da = vec![0x3a; 64 << 10];
    let db = vec![0x3b; 24 << 10];
    fs.write(a, 0, &da).unwrap();
    gate.set_mode(1);
    let (fsr, dar, dbr) = (&fs, &da, &db);
    let (b, before) = std::thread::scope(|s| {
        let fa = s.spawn(move || fsr.fsync(a, false));
        gate.wait_held();
        let b = finishes_while_held(s, &gate, "a create and write", move || {
            assert_eq!(fsr.lookup(ROOT_INO, b"a").unwrap(), a);
            assert_eq!(fsr.stat(a).unwrap().size, dar.len() as u64);
            let mut buf = vec![0; dar.len()];
            assert_eq!(fsr.read(a, 0, &mut buf).unwrap(), dar.len());
            assert!(buf == *dar);
            let b = fsr.create(ROOT_INO, b"b", 0o644, ME).unwrap();
            fsr.write(b, 0, dbr).unwrap();
            fsr.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap();
            b
        });
        // Both wait for the commit held back: a's is that commit, b's
        // follows it.
        let fa2 = s.spawn(move || fsr.fsync(a, false));
        let fb = s.spawn(move || fsr.fsync(b, false));
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (a_waited, b_waited) = (!fa2.is_finished(), !fb.is_finished());
        let before = dev.snapshot();
        gate.set_mode(0);
        assert!(a_waited, "an fsync of a did not wait for its commit");
        assert!(b_waited, "an fsync of b returned before any commit of b");
        fa.join().unwrap().unwrap();
        fa2.join().unwrap().unwrap();
        fb.join().unwrap().unwrap();
        (b, before)
    });
    // Power cut while the commit block was held: neither commit counts.
    let mut cut = Filesystem::open(
        Arc::new(MemDevice::from_bytes(before)),
        OpenOptions::default(),
    )
    .unwrap();
    assert!(cut.lookup(ROOT_INO, b"b").is_err());
    let a_cut = cut.lookup(ROOT_INO, b"a").unwrap();
    assert!(!read_all(&mut cut, a_cut).contains(&MARK));
    cut.close().unwrap();
    // After both: everything, as fsync'd.
    assert!(recovered_file(dev.snapshot(), b"a").unwrap() == da);
    assert!(recovered_file(dev.snapshot(), b"b").unwrap() == db);
    let after = Filesystem::open(
        Arc::new(MemDevice::from_bytes(dev.snapshot())),
        OpenOptions::default(),
    )
    .unwrap();
    assert!(after.lookup(ROOT_INO, b"d").is_ok());
    after.close().unwrap();
    fsck_bytes(dev.snapshot(), "commit-unlocked");

    // A commit write that fails aborts the journal: the fsync reports
    // it, later changes are EROFS, the log replays clean.
    fs.write(b, db.len() as u64, &db).unwrap();
    gate.set_mode(2);
    assert_eq!(fs.fsync(b, false).unwrap_err().errno(), libc::EIO);
    assert_eq!(
        fs.create(ROOT_INO, b"c", 0o644, ME).unwrap_err().errno(),
        libc::EROFS
    );
    gate.set_mode(0);
    assert_eq!(fs.close().unwrap_err().errno(), libc::EROFS);
    assert!(recovered_file(dev.snapshot(), b"b").unwrap() == db);
    fsck_bytes(dev.snapshot(), "commit-unlocked-abort");
}

/// A handle that finds the running transaction full starts its commit
/// and goes on: the commit thread writes it. While that commit block is
/// held back, the operations that filled the transaction go on on the next
/// one and other requests complete; a power cut then recovers clean
/// without it, and after it everything is there.
#[test]
fn full_transactions_are_committed_by_the_commit_thread() {
    let dev = marked_dev(32 << 20, 4096);
    let gate = Arc::new(GateDevice::matching(Arc::new(dev.clone()), is_commit_block));
    let d: Arc<dyn BlockDevice> = gate.clone();
    // A 256-block buffer cache: a transaction (128 blocks, less the
    // credits of a mkdir) fills after a few dozen mkdirs.
    let opts = OpenOptions {
        cache_blocks: 256,
        ..Default::default()
    };
    let fs = Filesystem::open(d, opts).unwrap();
    gate.set_mode(1);
    let (fsr, gr) = (&fs, &gate);
    let before = std::thread::scope(|s| {
        // mkdirs until one fills the transaction and its commit is held
        // back, then three more: they go into the next transaction. (Each
        // mkdir gives the commit thread 50 ms to reach the commit block,
        // so that the next transaction is not filled before it does.)
        let maker = s.spawn(move || {
            let mut after = 0;
            for i in 0.. {
                fsr.mkdir(ROOT_INO, format!("d{i}").as_bytes(), 0o755, ME)?;
                if gr.held_within(std::time::Duration::from_millis(50)) {
                    after += 1;
                    if after == 3 {
                        return Ok::<_, Error>(i + 1);
                    }
                }
            }
            unreachable!()
        });
        gate.wait_held();
        let made = finishes_while_held(s, &gate, "mkdirs after a full transaction", move || {
            assert!(fsr.stat(ROOT_INO).unwrap().nlink >= 2);
            maker.join().unwrap().unwrap()
        });
        let before = dev.snapshot();
        gate.set_mode(0);
        (before, made)
    });
    let (before, made) = before;
    // The cut: the held commit is not there; replay leaves it clean.
    let cut_dev = MemDevice::from_bytes(before);
    Filesystem::open(Arc::new(cut_dev.clone()), OpenOptions::default())
        .unwrap()
        .close()
        .unwrap();
    fsck_bytes(cut_dev.snapshot(), "commit-thread-cut");
    fs.close().unwrap();
    let after = Filesystem::open(
        Arc::new(MemDevice::from_bytes(dev.snapshot())),
        OpenOptions::default(),
    )
    .unwrap();
    for i in 0..made {
        assert!(after.lookup(ROOT_INO, format!("d{i}").as_bytes()).is_ok());
    }
    after.close().unwrap();
    fsck_bytes(dev.snapshot(), "commit-thread");

    // A commit the commit thread fails to write aborts the journal: a
    // later change fails (EIO or EROFS, never silently), so does close,
    // and the log replays clean.
    let d: Arc<dyn BlockDevice> = gate.clone();
    let fs = Filesystem::open(
        d,
        OpenOptions {
            cache_blocks: 256,
            ..Default::default()
        },
    )
    .unwrap();
    gate.set_mode(2);
    let failed = (0..10_000).find_map(|i| {
        fs.mkdir(ROOT_INO, format!("e{i}").as_bytes(), 0o755, ME)
            .err()
    });
    let errno = failed
        .expect("no change failed after a commit write failed")
        .errno();
    assert!(errno == libc::EROFS || errno == libc::EIO, "errno {errno}");
    assert!(fs.close().is_err());
    gate.set_mode(0);
    let cut_dev = MemDevice::from_bytes(dev.snapshot());
    Filesystem::open(Arc::new(cut_dev.clone()), OpenOptions::default())
        .unwrap()
        .close()
        .unwrap();
    fsck_bytes(cut_dev.snapshot(), "commit-thread-abort");
}

/// A sparse indirect-mapped (ext2) file of 1.5 TiB with two blocks: the
/// map walks answer each hole as far as its missing subtree reaches, so
/// listing the runs and seeking data take a few lookups per run, not one
/// per block (the fuzz smoke's `image` target found a hostile i_size that
/// made `block_runs` walk a billion blocks; this file reaches the same
/// walk legitimately).
#[test]
fn sparse_indirect_files_are_walked_by_subtree() {
    let dev = MemDevice::new(64 << 20);
    let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
    mkfs(
        d.clone(),
        64 << 20,
        &MkfsOptions {
            block_size: Some(4096),
            fs_type: folio_ext4::mkfs::FsType::Ext2,
            ..Default::default()
        },
    )
    .unwrap();
    let fs = Filesystem::open(d, OpenOptions::default()).unwrap();
    let f = fs.create(ROOT_INO, b"sparse", 0o644, ME).unwrap();
    let (gib, tib) = (1u64 << 30, 1u64 << 40);
    fs.write(f, gib, &[0x11; 4096]).unwrap();
    fs.write(f, tib, &[0x22; 4096]).unwrap();
    set_size(&fs, f, tib + (tib >> 1));
    fs.sync().unwrap();
    let (h0, m0) = fs.cache_stats();
    let runs = fs.block_runs(f).unwrap();
    let at: Vec<(u64, u64)> = runs.iter().map(|r| (r.lblk, r.len)).collect();
    assert_eq!(at, [(gib / 4096, 1), (tib / 4096, 1)]);
    assert_eq!(fs.seek_data_hole(f, 0, true).unwrap(), gib);
    assert_eq!(fs.seek_data_hole(f, gib + 4096, true).unwrap(), tib);
    assert_eq!(fs.seek_data_hole(f, tib, false).unwrap(), tib + 4096);
    // Counted in buffer-cache lookups of map blocks, not in time.
    let (h1, m1) = fs.cache_stats();
    let lookups = (h1 - h0) + (m1 - m0);
    assert!(
        lookups < 1_000_000,
        "{lookups} map block lookups for two runs"
    );
    let mut buf = [0u8; 4096];
    fs.read(f, tib, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    fs.close().unwrap();
    fsck_bytes(dev.snapshot(), "sparse-indirect");
}
