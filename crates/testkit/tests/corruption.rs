//! Corrupt images: a flipped byte in any metadata object gives an error
//! naming the object, never a panic, and never a write to the image.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use folio_ext4::mkfs::{mkfs_path, FsType, MkfsOptions};
use folio_ext4::{Error, Filesystem, OpenOptions, Owner, XattrMode, ROOT_INO};
use folio_testkit::*;

const ME: Owner = Owner { uid: 0, gid: 0 };

struct Pristine {
    bytes: Vec<u8>,
    bs: u64,
    dir: u32,
    frag: u32,
    x: u32,
    empty: u32,
    /// (what, byte offset) of interesting metadata.
    spots: Vec<(&'static str, u64)>,
    meta_blocks: Vec<u64>,
}

/// The images the fuzz test damages.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// folio's mkfs: ext4 with metadata_csum, or ext2.
    Ours(FsType),
    /// mke2fs's ext4 without metadata_csum: extents, htree, flex_bg and
    /// 64bit with nothing but structure checks to catch damage.
    Ext4NoCsum,
}

fn build(t: &TempDir, ty: FsType) -> Pristine {
    build_kind(t, Kind::Ours(ty))
}

fn build_kind(t: &TempDir, kind: Kind) -> Pristine {
    let img = t.join("pristine.img");
    match kind {
        Kind::Ours(ty) => {
            let opts = MkfsOptions {
                fs_type: ty,
                block_size: Some(1024),
                ..Default::default()
            };
            mkfs_path(&img, Some(16 << 20), &opts).unwrap();
        }
        Kind::Ext4NoCsum => {
            run(std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "1024", "-O", "^metadata_csum"])
                .arg(&img)
                .arg("16M"));
        }
    }
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let dir = fs.mkdir(ROOT_INO, b"dir", 0o755, ME).unwrap();
    for i in 0..300 {
        fs.create(dir, format!("name-{i:04}").as_bytes(), 0o644, ME)
            .unwrap();
    }
    let frag = fs.create(ROOT_INO, b"frag", 0o644, ME).unwrap();
    for i in 0..40u64 {
        fs.write(frag, i * 2048, &[i as u8 + 1; 1024]).unwrap();
    }
    let x = fs.create(ROOT_INO, b"x", 0o644, ME).unwrap();
    fs.write(x, 0, b"xattr holder").unwrap();
    fs.set_xattr(x, b"user.big", &[7u8; 700], XattrMode::Any)
        .unwrap();
    let empty = fs.create(ROOT_INO, b"empty", 0o644, ME).unwrap();
    fs.sync().unwrap();

    let bs = u64::from(fs.block_size());
    let g = fs.geometry_info().clone();
    let gd = fs.group_desc(0).unwrap().clone();
    let inode_off = |ino: u32| gd.inode_table() * bs + u64::from(ino - 1) * u64::from(g.inode_size);
    let dir_runs = fs.block_runs(dir).unwrap();
    let dir_block = |l: u64| {
        let r = dir_runs
            .iter()
            .find(|r| l >= r.lblk && l < r.lblk + r.len)
            .unwrap();
        r.pblk + (l - r.lblk)
    };
    let frag_meta = fs.mapping_blocks(frag).unwrap();
    let xattr_blk = fs.read_inode(x).unwrap().file_acl();
    let mut spots = vec![
        ("superblock", 1024 + 0x30),
        ("group descriptor 0", (g.first_data_block + 1) * bs + 0x0C),
        ("inode", inode_off(x) + 0x4),
        ("block bitmap of group 0", gd.block_bitmap() * bs + 3),
        ("inode bitmap of group 0", gd.inode_bitmap() * bs + 1),
        ("directory block 1", dir_block(1) * bs + 20),
        ("xattr block", xattr_blk * bs + 40),
    ];
    if let Some(&b) = frag_meta.first() {
        spots.push(("extent block", b * bs + 20));
    }
    if fs.stat(dir).unwrap().flags & folio_ext4::format::inode::FL_INDEX != 0 {
        spots.push(("directory index", dir_block(0) * bs + 0x28));
    }
    let mut meta_blocks = vec![
        1,
        g.first_data_block + 1,
        gd.block_bitmap(),
        gd.inode_bitmap(),
    ];
    meta_blocks.extend((0..8).map(|i| gd.inode_table() + i));
    meta_blocks.extend(dir_runs.iter().flat_map(|r| r.pblk..r.pblk + r.len));
    meta_blocks.extend(frag_meta);
    meta_blocks.push(xattr_blk);
    // The journal superblock (inode 8's first block), where there is one.
    if let Some(r) = fs.block_runs(8).ok().and_then(|r| r.first().cloned()) {
        meta_blocks.push(r.pblk);
    }
    fs.close().unwrap();
    Pristine {
        bytes: std::fs::read(&img).unwrap(),
        bs,
        dir,
        frag,
        x,
        empty,
        spots,
        meta_blocks,
    }
}

fn open(img: &Path) -> folio_ext4::Result<Filesystem> {
    Filesystem::open_path(img, OpenOptions::default())
}

/// Read everything reachable; returns the first error.
fn walk(fs: &mut Filesystem, dir: u32, depth: u32) -> folio_ext4::Result<()> {
    if depth > 8 {
        return Ok(());
    }
    for e in fs.read_dir(dir)? {
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let st = fs.stat(e.ino)?;
        fs.list_xattr(e.ino)?;
        match st.file_type {
            folio_ext4::FileType::Directory => walk(fs, e.ino, depth + 1)?,
            folio_ext4::FileType::Regular => {
                let mut b = vec![0u8; 4096];
                let mut off = 0;
                while off < st.size.min(1 << 20) {
                    let n = fs.read(e.ino, off, &mut b)?;
                    if n == 0 {
                        break;
                    }
                    off += n as u64;
                }
            }
            folio_ext4::FileType::Symlink => {
                fs.readlink(e.ino)?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[test]
fn each_corrupted_object_is_named_and_nothing_is_written() {
    let t = TempDir::new("corrupt");
    let p = build(&t, FsType::Ext4);
    assert!(p.spots.len() >= 9, "all objects located: {:?}", p.spots);
    for (what, off) in &p.spots {
        let img = t.join("c.img");
        let mut bytes = p.bytes.clone();
        bytes[*off as usize] ^= 0x5a;
        std::fs::write(&img, &bytes).unwrap();
        let result: Result<(), Error> = (|| {
            let fs = open(&img)?;
            // A read that reaches the object, then a write that needs it.
            let (read, write): (folio_ext4::Result<()>, folio_ext4::Result<()>) = match *what {
                "inode" => (fs.stat(p.x).map(drop), fs.write(p.x, 0, b"y").map(drop)),
                "extent block" => {
                    let mut b = [0u8; 16];
                    (
                        fs.read(p.frag, 70_000, &mut b).map(drop),
                        fs.write(p.frag, 1024, b"y").map(drop),
                    )
                }
                "directory block 1" => (fs.read_dir(p.dir).map(drop), fs.rmdir(ROOT_INO, b"dir")),
                "directory index" => (
                    fs.lookup(p.dir, b"name-0007").map(drop),
                    fs.create(p.dir, b"new", 0o644, ME).map(drop),
                ),
                "xattr block" => (
                    fs.get_xattr(p.x, b"user.big").map(drop),
                    fs.set_xattr(p.x, b"user.more", b"1", XattrMode::Any),
                ),
                // Delayed allocation meets the bitmap at writeback: the
                // error reaches whoever syncs.
                "block bitmap of group 0" => (
                    Ok(()),
                    fs.write(p.empty, 0, b"data").and_then(|_| fs.sync()),
                ),
                "inode bitmap of group 0" => {
                    (Ok(()), fs.create(ROOT_INO, b"new", 0o644, ME).map(drop))
                }
                _ => (Ok(()), Ok(())),
            };
            let err = match (read, write) {
                (Err(e), Err(_)) | (Ok(()), Err(e)) => e,
                (r, w) => panic!("{what}: corruption went unnoticed: read {r:?}, write {w:?}"),
            };
            fs.close()?;
            Err(err)
        })();
        let e = result.expect_err("an error");
        assert!(
            matches!(e, Error::BadChecksum { .. } | Error::Corrupted { .. }),
            "{what}: unexpected error {e:?}"
        );
        let msg = e.to_string();
        let name_word = what.split(' ').next().unwrap();
        assert!(
            msg.contains(name_word),
            "{what}: message does not name it: {msg}"
        );
        assert!(
            std::fs::read(&img).unwrap() == bytes,
            "{what}: the corrupt image was written to"
        );
        if *what == "superblock" {
            assert_eq!(e.errno(), libc::EBADMSG);
        }
    }
    // A bad magic is not ext4 at all.
    let img = t.join("m.img");
    let mut bytes = p.bytes.clone();
    bytes[1024 + 0x38] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let e = open(&img).err().expect("refused");
    assert!(e.to_string().contains("magic"), "{e}");
    assert_eq!(p.bs, 1024);
}

#[test]
fn structural_damage_without_checksums_is_caught() {
    let t = TempDir::new("corrupt2");
    let p = build(&t, FsType::Ext2);
    // Directory entry with rec_len 0 (would loop forever if trusted).
    let img = t.join("c.img");
    let fs = Filesystem::open_path(
        &t.join("pristine.img"),
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let runs = fs.block_runs(p.dir).unwrap();
    let ind = fs.mapping_blocks(p.frag).unwrap();
    drop(fs);
    let mut bytes = p.bytes.clone();
    let off = (runs[0].pblk * p.bs + 4) as usize;
    bytes[off..off + 2].copy_from_slice(&0u16.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let fs = open(&img).unwrap();
    let e = fs.read_dir(p.dir).unwrap_err();
    assert!(
        matches!(e, Error::Corrupted { .. }) && e.to_string().contains("rec_len"),
        "{e}"
    );
    // (The image is locked while open: done with this one.)
    drop(fs);
    // An indirect pointer past the end of the filesystem.
    let mut bytes = p.bytes.clone();
    let off = (ind[0] * p.bs) as usize;
    bytes[off..off + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let fs = open(&img).unwrap();
    let mut b = [0u8; 16];
    let e = fs.read(p.frag, 12 * 1024, &mut b).unwrap_err();
    assert!(e.to_string().contains("outside the filesystem"), "{e}");
    let e = fs.write(p.frag, 12 * 1024 + 5, b"x").unwrap_err();
    assert_eq!(e.errno(), libc::EUCLEAN);
}

/// Damage to one of `blocks` (of `bs` bytes): a flipped bit, or an aligned 16- or
/// 32-bit field set to a value that breaks bounds (zero, all ones, the
/// sign bit, a small count, a random number).
fn damage(bytes: &mut [u8], blocks: &[u64], bs: u64, rng: &mut Rng) -> u64 {
    let blk = blocks[rng.below(blocks.len() as u64) as usize];
    let off = (blk * bs + rng.below(bs)) as usize;
    match rng.below(3) {
        0 => bytes[off] ^= 1 << rng.below(8),
        k => {
            let v = match rng.below(5) {
                0 => 0,
                1 => u32::MAX,
                2 => 0x8000_0000,
                3 => rng.below(64) as u32,
                _ => rng.next_u64() as u32,
            };
            let (off, le) = if k == 1 {
                (off & !1, (v as u16).to_le_bytes().to_vec())
            } else {
                (off & !3, v.to_le_bytes().to_vec())
            };
            bytes[off..off + le.len()].copy_from_slice(&le);
        }
    }
    blk
}

/// `FOLIO_FUZZ_ITERS`, or 150.
fn fuzz_iters() -> u64 {
    std::env::var("FOLIO_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// Random damage to metadata blocks: errors are fine, panics are not.
/// `FOLIO_FUZZ_ITERS=N` damages N images of each kind instead of 150.
#[test]
fn random_metadata_damage_never_panics() {
    let iterations = fuzz_iters();
    let mut kinds = vec![Kind::Ours(FsType::Ext4), Kind::Ours(FsType::Ext2)];
    if require(have_tool("mkfs.ext4"), "mkfs.ext4 is not installed") {
        kinds.push(Kind::Ext4NoCsum);
    }
    for ty in kinds {
        let t = TempDir::new("fuzz");
        let p = build_kind(&t, ty);
        damage_run(ty, &p, iterations, false);
    }
}

/// The same damage with the superblock, descriptor, bitmap and inode
/// checksums recomputed afterwards (issue 13): the damage now reaches
/// the checks of the fields themselves (counts, offsets, sizes), which
/// must give errors, never a panic or a wrapped value.
#[test]
fn random_field_damage_behind_valid_checksums_never_panics() {
    let iterations = fuzz_iters() * 2;
    for ty in [Kind::Ours(FsType::Ext4), Kind::Ours(FsType::Ext2)] {
        let t = TempDir::new("fuzz-resealed");
        let p = build_kind(&t, ty);
        damage_run(ty, &p, iterations, true);
    }
}

/// The same damage, on a thread confined as the servers are (no
/// capabilities, no new privileges, Landlock, seccomp; issue 17): the
/// error paths must not depend on anything the confinement takes away
/// (opening files, running programs), and must stay errors, not crashes.
#[test]
fn random_metadata_damage_never_panics_confined() {
    let iterations = fuzz_iters();
    let t = TempDir::new("fuzz-confined");
    let p = build_kind(&t, Kind::Ours(FsType::Ext4));
    std::thread::spawn(move || {
        let st = folio_cli::confine::confine(&folio_cli::confine::Policy::default());
        assert!(st.no_new_privs && st.seccomp, "{st:?}");
        // The confinement holds on this thread: no host file opens.
        assert!(std::fs::File::open("/etc/hostname").is_err());
        damage_run(Kind::Ours(FsType::Ext4), &p, iterations, false);
    })
    .join()
    .expect("the confined run panicked");
}

fn damage_run(ty: Kind, p: &Pristine, iterations: u64, reseal: bool) {
    {
        // Images that opened, and operations that failed on them: the
        // damage must reach past open for the test to mean anything.
        let (mut opened, mut errors, mut ops) = (0u64, 0u64, 0u64);
        for seed in 0..iterations {
            let mut rng = Rng::new(seed ^ 0xC0FFEE);
            let mut bytes = p.bytes.clone();
            for _ in 0..1 + rng.below(4) {
                damage(&mut bytes, &p.meta_blocks, p.bs, &mut rng);
            }
            if reseal {
                // The damaged fields behind valid checksums: what checks
                // the fields must catch it.
                folio_ext4::format::reseal::reseal(&mut bytes, 64);
            }
            let dev = std::sync::Arc::new(folio_blockdev::MemDevice::from_bytes(bytes));
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let Ok(mut fs) = Filesystem::open(dev, OpenOptions::default()) else {
                    return Vec::new();
                };
                vec![
                    walk(&mut fs, ROOT_INO, 0).is_ok(),
                    fs.create(ROOT_INO, b"new-file", 0o644, ME)
                        .and_then(|i| fs.write(i, 0, &[1u8; 5000]))
                        .is_ok(),
                    fs.mkdir(p.dir, b"new-dir", 0o755, ME).is_ok(),
                    fs.unlink(p.dir, b"name-0100").is_ok(),
                    fs.write(p.frag, 3000, b"overwrite").is_ok(),
                    fs.setattr(
                        p.frag,
                        &folio_ext4::SetAttr {
                            size: Some(10_000),
                            ..Default::default()
                        },
                    )
                    .is_ok(),
                    fs.set_xattr(p.x, b"user.z", &[3u8; 300], XattrMode::Any)
                        .is_ok(),
                    fs.close().is_ok(),
                ]
            }));
            let Ok(results) = outcome else {
                panic!("{ty:?}: panic on damaged image; replay with seed {seed}");
            };
            if !results.is_empty() {
                opened += 1;
                ops += results.len() as u64;
                errors += results.iter().filter(|ok| !**ok).count() as u64;
            }
        }
        println!(
            "{ty:?} (resealed: {reseal}): {iterations} damaged images, {opened} opened, {errors} \
             of {ops} operations on them failed, no panic"
        );
        assert!(opened > 0, "{ty:?}: no damaged image opened");
    }
}

/// An image whose journal holds committed transactions (the writer died
/// before checkpointing), and the journal blocks in use.
fn unrecovered_image() -> (Vec<u8>, Vec<u64>, u64) {
    let dev = folio_blockdev::MemDevice::from_bytes(vec![0; 8 << 20]);
    let opts = MkfsOptions {
        block_size: Some(1024),
        ..Default::default()
    };
    folio_ext4::mkfs::mkfs(std::sync::Arc::new(dev.clone()), 8 << 20, &opts).unwrap();
    let fs = Filesystem::open(std::sync::Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ME).unwrap();
    let mut victims = Vec::new();
    for i in 0..40u32 {
        let f = fs
            .create(d, format!("file-{i}").as_bytes(), 0o644, ME)
            .unwrap();
        fs.write(f, u64::from(i) * 700, &[i as u8 + 1; 3000])
            .unwrap();
        if i % 3 == 0 {
            victims.push(format!("file-{i}"));
        }
        if i % 5 == 4 {
            // Unlinks free blocks: the log gets revoke records.
            for v in victims.drain(..) {
                fs.unlink(d, v.as_bytes()).unwrap();
            }
            fs.fsync(f, false).unwrap();
        }
    }
    fs.set_xattr(d, b"user.a", &[5u8; 400], XattrMode::Any)
        .unwrap();
    fs.sync().unwrap();
    let journal: Vec<u64> = fs
        .block_runs(8)
        .unwrap()
        .iter()
        .flat_map(|r| r.pblk..r.pblk + r.len)
        .collect();
    let bytes = dev.snapshot();
    // The process dies here: the log is never checkpointed.
    fs.abandon();
    let bs = 1024u64;
    let used: Vec<u64> = journal
        .into_iter()
        .filter(|b| {
            let o = (b * bs) as usize;
            bytes[o..o + bs as usize].iter().any(|&x| x != 0)
        })
        .collect();
    (bytes, used, bs)
}

/// Damage to a journal that needs replaying (descriptor, revoke, commit
/// and data blocks, and the journal superblock): recovery may refuse or
/// stop early, but never panics, and what it opens can be used. With
/// checksums v3 every log block is covered, so damage to the log alone
/// only cuts the replay short at the damaged transaction: the result
/// (after folio's own writes on top) must be e2fsck clean.
/// `FOLIO_FUZZ_ITERS=N` damages N images instead of 150.
#[test]
fn damaged_journals_never_panic() {
    let iterations = fuzz_iters();
    let (pristine, used, bs) = unrecovered_image();
    {
        let dev = std::sync::Arc::new(folio_blockdev::MemDevice::from_bytes(pristine.clone()));
        let fs = Filesystem::open(dev, OpenOptions::default()).unwrap();
        let r = fs.recovery_report().expect("the image needs recovery");
        assert!(r.transactions > 1 && r.blocks_revoked + r.blocks_replayed > 0);
    }
    let jsb = used[0];
    let fsck = have_tool("e2fsck");
    let t = TempDir::in_memory("journal-fuzz");
    let scratch = t.join("recovered.img");
    let (mut opened, mut replayed, mut checked) = (0u64, 0u64, 0u64);
    for seed in 0..iterations {
        let mut rng = Rng::new(seed ^ 0x10C);
        let mut bytes = pristine.clone();
        let mut log_only = true;
        for _ in 0..1 + rng.below(3) {
            log_only &= damage(&mut bytes, &used, bs, &mut rng) != jsb;
        }
        let mem = folio_blockdev::MemDevice::from_bytes(bytes);
        let dev = std::sync::Arc::new(mem.clone());
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let Ok(mut fs) = Filesystem::open(dev, OpenOptions::default()) else {
                return None;
            };
            let n = fs.recovery_report().map_or(0, |r| r.transactions);
            let _ = walk(&mut fs, ROOT_INO, 0);
            let _ = fs
                .create(ROOT_INO, b"after", 0o644, ME)
                .and_then(|i| fs.write(i, 0, &[9u8; 3000]));
            let _ = fs.close();
            Some(n)
        }));
        match outcome {
            Ok(Some(n)) => {
                opened += 1;
                replayed += u64::from(n);
                if log_only && fsck {
                    std::fs::write(&scratch, mem.snapshot()).unwrap();
                    if let Err(e) = e2fsck(&scratch) {
                        panic!("seed {seed}: damage to the log left an unclean image: {e}");
                    }
                    checked += 1;
                }
            }
            Ok(None) => {}
            Err(_) => panic!("panic on a damaged journal; replay with seed {seed}"),
        }
    }
    println!(
        "{iterations} damaged journals ({} blocks in use), {opened} opened, {replayed} \
         transactions replayed, no panic; {checked} with only the log damaged e2fsck clean",
        used.len()
    );
    assert!(opened > 0, "no image with a damaged journal opened");
    assert!(
        !fsck || checked > 0,
        "no image with only its log damaged was checked"
    );
}
