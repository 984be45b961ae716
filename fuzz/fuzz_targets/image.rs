//! Whole-image fuzzing: open the input as an ext2/3/4 image (after
//! resealing the checksums of its superblock, descriptors, bitmaps and
//! inodes, so that damage reaches the validation of fields), read
//! everything reachable, then change it and close. Any panic, overflow or
//! hang is a finding; errors are the expected outcome.
#![no_main]

use std::sync::Arc;

use folio_blockdev::MemDevice;
use folio_ext4::format::inode::FileType;
use folio_ext4::{Filesystem, OpenOptions, Owner, RenameFlags, XattrMode, ROOT_INO};
use libfuzzer_sys::fuzz_target;

const ME: Owner = Owner { uid: 0, gid: 0 };

fn walk(fs: &Filesystem, dir: u32, depth: u32, budget: &mut u32) {
    if depth > 6 {
        return;
    }
    let Ok(entries) = fs.read_dir(dir) else {
        return;
    };
    for e in entries {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let _ = fs.lookup(dir, &e.name);
        let Ok(st) = fs.stat(e.ino) else {
            continue;
        };
        if let Ok(names) = fs.list_xattr(e.ino) {
            for n in names.iter().take(8) {
                let _ = fs.get_xattr(e.ino, n);
            }
        }
        match st.file_type {
            FileType::Directory => walk(fs, e.ino, depth + 1, budget),
            FileType::Regular => {
                let mut buf = vec![0u8; 16 << 10];
                let _ = fs.read(e.ino, 0, &mut buf);
                let _ = fs.read(e.ino, st.size.saturating_sub(4096), &mut buf[..4096]);
                let _ = fs.seek_data_hole(e.ino, 0, true);
                let _ = fs.block_runs(e.ino);
            }
            FileType::Symlink => {
                let _ = fs.readlink(e.ino);
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4096 || data.len() > (8 << 20) {
        return;
    }
    let mut img = data.to_vec();
    // Multiple-mount protection waits for real time (twice its interval
    // and more) on an MMP block that is not clean, as the kernel does: a
    // hang to libFuzzer, not a finding. The feature bit is cleared; the
    // MMP block's checks before that wait are unit-tested (mmp.rs).
    img[1024 + 0x60 + 1] &= !0x01;
    folio_ext4::format::reseal::reseal(&mut img, 64);
    let dev = Arc::new(MemDevice::from_bytes(img));
    let opts = OpenOptions {
        lock: false,
        cache_blocks: 256,
        ..Default::default()
    };
    let Ok(fs) = Filesystem::open(dev, opts) else {
        return;
    };
    let mut budget = 400;
    walk(&fs, ROOT_INO, 0, &mut budget);
    let _ = fs.statfs();
    let _ = fs.check_counts(None);
    // Changes: each may fail; none may panic or corrupt silently.
    if let Ok(f) = fs.create(ROOT_INO, b"fuzz-new", 0o644, ME) {
        let _ = fs.write(f, 0, &[0xA5; 10_000]);
        let _ = fs.write(f, 1 << 20, b"far");
        let _ = fs.set_xattr(f, b"user.k", &[1; 300], XattrMode::Any);
        let shrink = folio_ext4::SetAttr {
            size: Some(5000),
            ..Default::default()
        };
        let _ = fs.setattr(f, &shrink);
    }
    if let Ok(d) = fs.mkdir(ROOT_INO, b"fuzz-dir", 0o755, ME) {
        for i in 0..20u32 {
            let _ = fs.create(d, format!("n{i}").as_bytes(), 0o644, ME);
        }
        let _ = fs.rename(d, b"n1", ROOT_INO, b"moved", RenameFlags::default());
        let _ = fs.unlink(d, b"n2");
    }
    if let Ok(entries) = fs.read_dir(ROOT_INO) {
        for e in entries.iter().filter(|e| e.name.len() > 2).take(3) {
            let _ = fs.unlink(ROOT_INO, &e.name);
        }
    }
    let _ = fs.sync();
    let _ = fs.close();
});
