//! The library API: POSIX-shaped operations and their errors, large
//! directories, extent trees growing and shrinking, indirect maps, size
//! changes that must not expose old bytes. Every image is e2fsck'd.

use std::path::Path;
use std::sync::Arc;

use folio_blockdev::{BlockDevice, MemDevice};
use folio_ext4::format::inode::FL_INDEX;
use folio_ext4::mkfs::{mkfs, mkfs_path, FsType, MkfsOptions};
use folio_ext4::{
    Error, FileType, Filesystem, OpenOptions, Owner, RenameFlags, SetAttr, Timespec, XattrMode,
    ROOT_INO,
};
use folio_testkit::*;

const ME: Owner = Owner {
    uid: 1000,
    gid: 1000,
};

fn mem_fs(size: usize, opts: MkfsOptions) -> (MemDevice, Filesystem) {
    let dev = MemDevice::new(size);
    let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
    mkfs(d.clone(), size as u64, &opts).unwrap();
    let fs = Filesystem::open(d, OpenOptions::default()).unwrap();
    (dev, fs)
}

/// Sync, check counters, write the image to a file and e2fsck it.
fn fsck_mem(dev: &MemDevice, fs: Filesystem, tag: &str) {
    assert_eq!(
        fs.check_counts(None).unwrap(),
        Vec::<String>::new(),
        "{tag}"
    );
    fs.close().unwrap();
    if !require(have_tool("e2fsck"), "e2fsck is not installed") {
        return;
    }
    let t = TempDir::new(tag);
    let img = t.join("img");
    std::fs::write(&img, dev.snapshot()).unwrap();
    e2fsck(&img).unwrap_or_else(|e| panic!("{tag}: {e}"));
}

fn read_all(fs: &mut Filesystem, ino: u32) -> Vec<u8> {
    let size = fs.stat(ino).unwrap().size as usize;
    let mut b = vec![0u8; size];
    assert_eq!(fs.read(ino, 0, &mut b).unwrap(), size);
    b
}

#[test]
fn posix_operations_and_their_errors() {
    let (dev, mut fs) = mem_fs(64 << 20, MkfsOptions::default());
    let root = ROOT_INO;
    let free0 = fs.statfs().blocks_free;

    // create / write / read / lookup
    let a = fs.create(root, b"a", 0o644, ME).unwrap();
    assert_eq!(fs.lookup(root, b"a").unwrap(), a);
    assert_eq!(fs.write(a, 0, b"hello world").unwrap(), 11);
    assert_eq!(read_all(&mut fs, a), b"hello world");
    assert!(matches!(
        fs.create(root, b"a", 0o644, ME),
        Err(Error::Exists)
    ));
    assert_eq!(
        fs.create(root, b"a", 0o644, ME).unwrap_err().errno(),
        libc::EEXIST
    );
    let long = vec![b'n'; 256];
    assert_eq!(
        fs.create(root, &long, 0o644, ME).unwrap_err().errno(),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        fs.lookup(root, &long).unwrap_err().errno(),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        fs.lookup(root, b"missing").unwrap_err().errno(),
        libc::ENOENT
    );
    let ok255 = vec![b'm'; 255];
    let m = fs.create(root, &ok255, 0o600, ME).unwrap();
    assert_eq!(fs.lookup(root, &ok255).unwrap(), m);

    // open(2) flags
    let c = folio_ext4::OpenFlags {
        create: true,
        ..Default::default()
    };
    let ce = folio_ext4::OpenFlags {
        create: true,
        exclusive: true,
        ..Default::default()
    };
    let tr = folio_ext4::OpenFlags {
        truncate: true,
        ..Default::default()
    };
    assert_eq!(fs.openat(root, b"a", c, 0o644, ME).unwrap(), a);
    assert_eq!(
        fs.openat(root, b"a", ce, 0o644, ME).unwrap_err().errno(),
        libc::EEXIST
    );
    assert_eq!(
        fs.openat(root, b"nope", Default::default(), 0o644, ME)
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
    let o = fs.openat(root, b"o", ce, 0o600, ME).unwrap();
    fs.write(o, 0, b"12345").unwrap();
    assert_eq!(fs.openat(root, b"o", tr, 0, ME).unwrap(), o);
    assert_eq!(fs.stat(o).unwrap().size, 0);
    let dflag = folio_ext4::OpenFlags {
        directory: true,
        ..Default::default()
    };
    assert_eq!(
        fs.openat(root, b"o", dflag, 0, ME).unwrap_err().errno(),
        libc::ENOTDIR
    );
    fs.unlink(root, b"o").unwrap();

    // stat and setattr with nanoseconds, crtime
    let st = fs.stat(a).unwrap();
    assert_eq!(
        (st.uid, st.gid, st.mode & 0o7777, st.nlink),
        (1000, 1000, 0o644, 1)
    );
    assert!(st.crtime.is_some());
    let t = Timespec {
        sec: 1_234_567_890,
        nsec: 123_456_789,
    };
    let st = fs
        .setattr(
            a,
            &SetAttr {
                mode: Some(0o4750),
                uid: Some(7),
                gid: Some(8),
                atime: Some(t),
                mtime: Some(t),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        (st.mode & 0o7777, st.uid, st.gid, st.mtime, st.atime),
        (0o4750, 7, 8, t, t)
    );
    assert_eq!(st.file_type, FileType::Regular);

    // truncate both ways
    fs.setattr(
        a,
        &SetAttr {
            size: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&mut fs, a), b"hello");
    fs.setattr(
        a,
        &SetAttr {
            size: Some(100_000),
            ..Default::default()
        },
    )
    .unwrap();
    let data = read_all(&mut fs, a);
    assert_eq!(&data[..5], b"hello");
    assert!(data[5..].iter().all(|&b| b == 0));

    // directories
    let d = fs.mkdir(root, b"d", 0o755, ME).unwrap();
    assert_eq!(fs.stat(root).unwrap().nlink, 4); // ., .., lost+found/.., d/..
    let sub = fs.mkdir(d, b"sub", 0o700, ME).unwrap();
    assert_eq!(fs.stat(d).unwrap().nlink, 3);
    assert_eq!(fs.rmdir(root, b"d").unwrap_err().errno(), libc::ENOTEMPTY);
    assert_eq!(fs.unlink(root, b"d").unwrap_err().errno(), libc::EISDIR);
    assert_eq!(fs.rmdir(root, b"a").unwrap_err().errno(), libc::ENOTDIR);
    assert_eq!(
        fs.create(a, b"x", 0o644, ME).unwrap_err().errno(),
        libc::ENOTDIR
    );
    let names: Vec<Vec<u8>> = fs
        .read_dir(d)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b".".to_vec(), b"..".to_vec(), b"sub".to_vec()]);

    // hard links
    fs.link(a, d, b"a-link").unwrap();
    assert_eq!(fs.stat(a).unwrap().nlink, 2);
    assert_eq!(
        fs.link(d, root, b"dirlink").unwrap_err().errno(),
        libc::EINVAL
    );

    // symlinks, fast and slow
    let s1 = fs.symlink(root, b"s1", b"a", ME).unwrap();
    let target = vec![b't'; 300];
    let s2 = fs.symlink(root, b"s2", &target, ME).unwrap();
    assert_eq!(fs.readlink(s1).unwrap(), b"a");
    assert_eq!(fs.readlink(s2).unwrap(), target);
    assert_eq!(fs.stat(s2).unwrap().size, 300);
    assert_eq!(fs.resolve_follow("/s1").unwrap(), a);

    // special files
    let fifo = fs
        .mknod(
            root,
            b"fifo",
            folio_ext4::format::inode::S_IFIFO | 0o644,
            (0, 0),
            ME,
        )
        .unwrap();
    assert_eq!(fs.stat(fifo).unwrap().file_type, FileType::Fifo);
    let chr = fs
        .mknod(
            root,
            b"null",
            folio_ext4::format::inode::S_IFCHR | 0o666,
            (1, 3),
            ME,
        )
        .unwrap();
    assert_eq!(fs.stat(chr).unwrap().rdev, (1, 3));

    // rename: plain, over a file, noreplace, exchange, into own subtree
    fs.rename(root, b"s1", d, b"s1-moved", RenameFlags::default())
        .unwrap();
    assert_eq!(fs.lookup(d, b"s1-moved").unwrap(), s1);
    assert_eq!(fs.lookup(root, b"s1").unwrap_err().errno(), libc::ENOENT);
    let b = fs.create(root, b"b", 0o644, ME).unwrap();
    fs.write(b, 0, b"bbb").unwrap();
    fs.rename(root, b"b", d, b"a-link", RenameFlags::default())
        .unwrap();
    assert_eq!(fs.stat(a).unwrap().nlink, 1, "replaced name drops a link");
    let al = fs.lookup(d, b"a-link").unwrap();
    assert_eq!(read_all(&mut fs, al), b"bbb");
    let nr = RenameFlags {
        noreplace: true,
        ..Default::default()
    };
    assert_eq!(
        fs.rename(root, b"a", d, b"a-link", nr).unwrap_err().errno(),
        libc::EEXIST
    );
    let ex = RenameFlags {
        exchange: true,
        ..Default::default()
    };
    fs.rename(root, b"a", d, b"sub", ex).unwrap();
    assert_eq!(fs.lookup(root, b"a").unwrap(), sub);
    assert_eq!(fs.lookup(d, b"sub").unwrap(), a);
    assert_eq!(
        fs.lookup(sub, b"..").unwrap(),
        root,
        "exchanged directory's .. follows it"
    );
    fs.rename(d, b"sub", root, b"a", ex).unwrap();
    assert_eq!(
        fs.rename(root, b"d", d, b"inside", RenameFlags::default())
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    // a directory over an empty directory, across parents
    let e1 = fs.mkdir(root, b"e1", 0o755, ME).unwrap();
    fs.mkdir(d, b"e2", 0o755, ME).unwrap();
    let links_before = fs.stat(root).unwrap().nlink;
    fs.rename(root, b"e1", d, b"e2", RenameFlags::default())
        .unwrap();
    assert_eq!(fs.lookup(d, b"e2").unwrap(), e1);
    assert_eq!(fs.lookup(e1, b"..").unwrap(), d);
    assert_eq!(fs.stat(root).unwrap().nlink, links_before - 1);
    assert_eq!(
        fs.rename(root, b"d", root, b"a", RenameFlags::default())
            .unwrap_err()
            .errno(),
        libc::ENOTDIR
    );

    // xattrs: in the inode and in a block
    fs.set_xattr(a, b"user.small", b"1", XattrMode::Any)
        .unwrap();
    let bigv = vec![0x5a; 700];
    fs.set_xattr(a, b"user.big", &bigv, XattrMode::Any).unwrap();
    assert_eq!(fs.get_xattr(a, b"user.big").unwrap(), bigv);
    assert_eq!(
        fs.set_xattr(a, b"user.small", b"2", XattrMode::Create)
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        fs.set_xattr(a, b"user.none", b"2", XattrMode::Replace)
            .unwrap_err()
            .errno(),
        libc::ENODATA
    );
    fs.set_xattr(a, b"user.small", b"22", XattrMode::Replace)
        .unwrap();
    assert_eq!(fs.get_xattr(a, b"user.small").unwrap(), b"22");
    let mut names = fs.list_xattr(a).unwrap();
    names.sort();
    assert_eq!(names, vec![b"user.big".to_vec(), b"user.small".to_vec()]);
    fs.remove_xattr(a, b"user.big").unwrap();
    assert_eq!(
        fs.get_xattr(a, b"user.big").unwrap_err().errno(),
        libc::ENODATA
    );

    // unlink frees everything
    for (p, n) in [
        (root, b"a".as_slice()),
        (d, b"a-link"),
        (root, b"s2"),
        (d, b"s1-moved"),
        (root, b"fifo"),
        (root, b"null"),
        (root, &ok255),
    ] {
        fs.unlink(p, n).unwrap();
    }
    fs.rmdir(d, b"e2").unwrap();
    fs.rmdir(d, b"sub").unwrap();
    fs.rmdir(root, b"d").unwrap();
    assert_eq!(fs.statfs().blocks_free, free0, "all blocks are freed again");
    assert_eq!(fs.stat(root).unwrap().nlink, 3);
    fsck_mem(&dev, fs, "posix");
}

#[test]
fn directory_of_100k_entries_uses_the_htree() {
    let t = TempDir::new("bigdir");
    let img = t.join("img");
    let opts = MkfsOptions {
        inode_ratio: Some(4096),
        ..Default::default()
    };
    mkfs_path(&img, Some(600 << 20), &opts).unwrap();
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let d = fs.mkdir(ROOT_INO, b"big", 0o755, ME).unwrap();
    const N: u32 = 100_000;
    for i in 0..N {
        fs.create(d, format!("entry-number-{i}").as_bytes(), 0o644, ME)
            .unwrap();
    }
    let flags = fs.stat(d).unwrap().flags;
    assert!(flags & FL_INDEX != 0, "the directory is indexed");
    // A lookup touches a handful of blocks (root, index node, leaf), not
    // the ~1000 blocks of the directory.
    let mut worst = 0;
    for i in (0..N).step_by(997) {
        let (h0, m0) = fs.cache_stats();
        fs.lookup(d, format!("entry-number-{i}").as_bytes())
            .unwrap();
        let (h1, m1) = fs.cache_stats();
        worst = worst.max((h1 - h0) + (m1 - m0));
    }
    assert!(worst <= 8, "a lookup read {worst} blocks");
    assert_eq!(
        fs.lookup(d, b"entry-number-100000").unwrap_err().errno(),
        libc::ENOENT
    );
    assert_eq!(fs.read_dir(d).unwrap().len() as u32, N + 2);
    for i in (0..N).step_by(2) {
        fs.unlink(d, format!("entry-number-{i}").as_bytes())
            .unwrap();
    }
    assert_eq!(
        fs.lookup(d, b"entry-number-0").unwrap_err().errno(),
        libc::ENOENT
    );
    fs.lookup(d, b"entry-number-1").unwrap();
    fs.close().unwrap();
    if require(have_tool("e2fsck"), "e2fsck is not installed") {
        e2fsck(&img).unwrap();
    }
}

#[test]
fn extent_trees_grow_in_depth_and_shrink_on_truncate() {
    for bs in [1024u32, 4096] {
        let opts = MkfsOptions {
            block_size: Some(bs),
            ..Default::default()
        };
        let (dev, mut fs) = mem_fs(128 << 20, opts);
        let free0 = fs.statfs().blocks_free;
        let f = fs.create(ROOT_INO, b"frag", 0o644, ME).unwrap();
        let mut model = Vec::new();
        // Every other block: one extent each.
        let n = if bs == 1024 { 1200u64 } else { 3000 };
        for i in 0..n {
            let off = i * 2 * u64::from(bs);
            let chunk = vec![(i % 251) as u8 + 1; bs as usize];
            fs.write(f, off, &chunk).unwrap();
            if model.len() < (off as usize) {
                model.resize(off as usize, 0);
            }
            model.extend_from_slice(&chunk);
        }
        assert_eq!(fs.block_runs(f).unwrap().len() as u64, n);
        let depth = fs.extent_depth(f).unwrap().unwrap();
        assert!(depth >= 1, "bs={bs}: depth {depth}");
        if bs == 1024 {
            assert!(depth >= 2, "1 KiB blocks: {n} extents need two levels");
        }
        assert_eq!(read_all(&mut fs, f), model);
        fs.setattr(
            f,
            &SetAttr {
                size: Some(u64::from(bs) * 7 + 3),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(fs.extent_depth(f).unwrap(), Some(0));
        model.truncate(bs as usize * 7 + 3);
        assert_eq!(read_all(&mut fs, f), model);
        assert!(fs.mapping_blocks(f).unwrap().is_empty());
        fs.setattr(
            f,
            &SetAttr {
                size: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(fs.stat(f).unwrap().blocks_512, 0);
        assert_eq!(fs.statfs().blocks_free, free0);
        fsck_mem(&dev, fs, &format!("extents-{bs}"));
    }
}

#[test]
fn ext2_indirect_maps_reach_triple_indirect_and_truncate() {
    let opts = MkfsOptions {
        fs_type: FsType::Ext2,
        block_size: Some(1024),
        ..Default::default()
    };
    let (dev, fs) = mem_fs(96 << 20, opts);
    let free0 = fs.statfs().blocks_free;
    let f = fs.create(ROOT_INO, b"ind", 0o644, ME).unwrap();
    // direct, single, double and triple indirect (1 KiB blocks: triple
    // starts at block 12 + 256 + 65536).
    let offs = [0u64, 100 << 10, 20 << 20, 65804 << 10, 80 << 20];
    for (i, &o) in offs.iter().enumerate() {
        fs.write(f, o, format!("chunk-{i}").as_bytes()).unwrap();
    }
    for (i, &o) in offs.iter().enumerate() {
        let mut b = vec![0u8; 7];
        fs.read(f, o, &mut b).unwrap();
        assert_eq!(b, format!("chunk-{i}").as_bytes());
    }
    assert!(fs.extent_depth(f).unwrap().is_none());
    assert!(fs.mapping_blocks(f).unwrap().len() >= 6);
    fs.setattr(
        f,
        &SetAttr {
            size: Some(30 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = vec![0u8; 7];
    fs.read(f, 20 << 20, &mut b).unwrap();
    assert_eq!(b, b"chunk-2");
    fs.setattr(
        f,
        &SetAttr {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(fs.mapping_blocks(f).unwrap().is_empty());
    assert_eq!(fs.statfs().blocks_free, free0);
    fs.write(f, 65804 << 10, b"again").unwrap();
    fsck_mem(&dev, fs, "ext2-indirect");
}

/// Seed 003: with 1 KiB blocks, bytes past EOF in the last block must
/// never reappear when the file grows (truncate up or write past EOF).
#[test]
fn growing_a_file_zeroes_the_old_tail_on_disk() {
    for ty in [FsType::Ext4, FsType::Ext2] {
        let opts = MkfsOptions {
            fs_type: ty,
            block_size: Some(1024),
            ..Default::default()
        };
        let (dev, mut fs) = mem_fs(32 << 20, opts);
        let f = fs.create(ROOT_INO, b"f", 0o644, ME).unwrap();
        fs.write(f, 0, &[b'x'; 1000]).unwrap();
        fs.setattr(
            f,
            &SetAttr {
                size: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
        // The block itself holds zeros past the new size.
        let run = fs.block_runs(f).unwrap()[0];
        let mut raw = vec![0u8; 1024];
        dev.read_at(run.pblk * 1024, &mut raw).unwrap();
        assert!(
            raw[10..].iter().all(|&b| b == 0),
            "{ty:?}: stale bytes after truncate down"
        );
        fs.setattr(
            f,
            &SetAttr {
                size: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
        let d = read_all(&mut fs, f);
        assert!(d[10..].iter().all(|&b| b == 0));
        // Write past EOF into a later block.
        fs.setattr(
            f,
            &SetAttr {
                size: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
        fs.write(f, 3000, b"z").unwrap();
        let d = read_all(&mut fs, f);
        assert_eq!(d.len(), 3001);
        assert!(
            d[10..3000].iter().all(|&b| b == 0),
            "{ty:?}: old bytes reappeared"
        );
        fsck_mem(&dev, fs, &format!("tail-{ty:?}"));
    }
}

fn patch_sb(img: &Path, f: impl FnOnce(&mut folio_ext4::format::superblock::Superblock)) {
    let mut bytes = std::fs::read(img).unwrap();
    let mut sb =
        folio_ext4::format::superblock::Superblock::from_bytes(&bytes[1024..2048]).unwrap();
    f(&mut sb);
    sb.update_checksum();
    bytes[1024..2048].copy_from_slice(&sb.raw);
    std::fs::write(img, bytes).unwrap();
}

#[test]
fn feature_flags_refuse_or_force_read_only_by_name() {
    use folio_ext4::format::superblock::{incompat, ro_compat};
    let t = TempDir::new("features");
    let img = t.join("img");
    let base = || {
        mkfs_path(&img, Some(8 << 20), &MkfsOptions::default()).unwrap();
    };
    base();
    patch_sb(&img, |sb| {
        sb.set_feature_incompat(sb.feature_incompat() | incompat::CASEFOLD)
    });
    let e = Filesystem::open_path(&img, OpenOptions::default())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("casefold"), "{e}");
    base();
    patch_sb(&img, |sb| {
        sb.set_feature_incompat(sb.feature_incompat() | 0x0100_0000)
    });
    let e = Filesystem::open_path(&img, OpenOptions::default())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("FEATURE_I24"), "{e}");
    base();
    patch_sb(&img, |sb| {
        sb.set_feature_ro_compat(sb.feature_ro_compat() | ro_compat::PROJECT | 0x4000_0000)
    });
    let before = std::fs::read(&img).unwrap();
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let why = fs.read_only_reason().unwrap().to_string();
    assert!(
        why.contains("project") && why.contains("FEATURE_R30"),
        "{why}"
    );
    let e = fs.create(ROOT_INO, b"x", 0o644, ME).unwrap_err();
    assert_eq!(e.errno(), libc::EROFS);
    assert!(fs.read_dir(ROOT_INO).is_ok());
    fs.close().unwrap();
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open wrote to the image"
    );
    base();
    patch_sb(&img, |sb| {
        sb.set_feature_incompat(sb.feature_incompat() | incompat::RECOVER)
    });
    // Read-only: not replayed, and it says why.
    let fs = Filesystem::open_path(
        &img,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(fs.read_only_reason().unwrap().contains("recovery"));
    assert_eq!(
        fs.mkdir(ROOT_INO, b"x", 0o755, ME).unwrap_err().errno(),
        libc::EROFS
    );
    drop(fs);
    // Read-write: the (empty) journal is replayed and the flag cleared.
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    assert!(fs.read_only_reason().is_none());
    assert_eq!(fs.recovery_report().unwrap().transactions, 0);
    fs.mkdir(ROOT_INO, b"x", 0o755, ME).unwrap();
    fs.close().unwrap();
    let sb = folio_ext4::format::superblock::Superblock::from_bytes(
        &std::fs::read(&img).unwrap()[1024..2048],
    )
    .unwrap();
    assert!(!sb.has_incompat(incompat::RECOVER));
    if require(have_tool("e2fsck"), "e2fsck is not installed") {
        e2fsck(&img).unwrap();
    }
}

/// Space freed by the running transaction is reused only after it
/// commits; an allocation that fails while such frees wait commits and
/// retries once. Data accepted up to a full disk survives a reopen.
#[test]
fn full_disk_keeps_accepted_data_and_retries_after_commit() {
    let (dev, fs) = mem_fs(
        16 << 20,
        MkfsOptions {
            block_size: Some(4096),
            ..Default::default()
        },
    );
    assert!(fs.is_journalled());
    let a = fs.create(ROOT_INO, b"a", 0o644, ME).unwrap();
    let chunk = vec![7u8; 64 << 10];
    let mut off = 0u64;
    loop {
        match fs.write(a, off, &chunk) {
            Ok(n) => off += n as u64,
            Err(e) => {
                assert_eq!(e.errno(), libc::ENOSPC);
                break;
            }
        }
    }
    assert!(off > 8 << 20, "filled {off} bytes");
    // Smaller writes use up the last blocks.
    let small = vec![7u8; 4096];
    while fs.write(a, off, &small).is_ok() {
        off += 4096;
    }
    assert_eq!(fs.statfs().blocks_free, 0, "every block is in use");
    fs.close().unwrap();
    let mut fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let a = fs.lookup(ROOT_INO, b"a").unwrap();
    let data = read_all(&mut fs, a);
    assert_eq!(data.len() as u64, off);
    assert!(
        data.iter().all(|&b| b == 7),
        "data accepted before ENOSPC is intact"
    );
    // Free it; until a commit the blocks are pinned, so writing the same
    // amount again needs the retry.
    fs.unlink(ROOT_INO, b"a").unwrap();
    let b = fs.create(ROOT_INO, b"b", 0o644, ME).unwrap();
    let mut boff = 0;
    while boff < off {
        let n = fs
            .write(b, boff, &small)
            .unwrap_or_else(|e| panic!("at {boff} of {off}: {e}"));
        boff += n as u64;
    }
    fsck_mem(&dev, fs, "full-disk");
}

/// A file unlinked while open stays readable; it sits on the orphan list
/// until its last close frees it, and a crash in between leaves it to be
/// freed at recovery.
#[test]
fn unlinked_open_files_live_until_closed() {
    let (dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let free0 = fs.statfs().blocks_free;
    let f = fs.create(ROOT_INO, b"tmp", 0o600, ME).unwrap();
    fs.open_ref(f);
    fs.write(f, 0, &vec![3u8; 200_000]).unwrap();
    fs.unlink(ROOT_INO, b"tmp").unwrap();
    assert_eq!(
        fs.lookup(ROOT_INO, b"tmp").unwrap_err().errno(),
        libc::ENOENT
    );
    assert_eq!(fs.superblock().last_orphan(), f);
    let mut b = vec![0u8; 200_000];
    assert_eq!(fs.read(f, 0, &mut b).unwrap(), 200_000);
    assert!(b.iter().all(|&x| x == 3), "still readable after unlink");
    fs.write(f, 200_000, b"more").unwrap();
    assert!(fs.statfs().blocks_free < free0);
    fs.close_ref(f).unwrap();
    assert_eq!(fs.superblock().last_orphan(), 0);
    assert_eq!(fs.statfs().blocks_free, free0, "freed at the last close");
    // Crash with an unlinked file still open: recovery frees it.
    let g = fs.create(ROOT_INO, b"tmp2", 0o600, ME).unwrap();
    fs.open_ref(g);
    fs.write(g, 0, &vec![4u8; 100_000]).unwrap();
    fs.unlink(ROOT_INO, b"tmp2").unwrap();
    fs.sync().unwrap();
    fs.abandon();
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    assert_eq!(fs.superblock().last_orphan(), 0, "orphan processed at open");
    assert_eq!(fs.statfs().blocks_free, free0);
    assert_eq!(fs.stat(g).unwrap().nlink, 0);
    fsck_mem(&dev, fs, "orphans");
}

/// The lock-order checker sees the library's own levels: every operation
/// takes the core lock, which no thread may take inside a journal handle
/// or the allocator (the innermost level); an operation on a file from
/// above (fallocate, setattr, a write) takes the file's inode lock first,
/// which no thread may take inside the core lock or a handle.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "lock order violation: taking Inode")]
fn fallocate_inside_a_transaction_breaks_the_lock_order() {
    use folio_ext4::lockdep::{Held, Level};
    let (_dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let f = fs
        .create(ROOT_INO, b"f", 0o644, folio_ext4::Owner::default())
        .unwrap();
    let _t = Held::take(Level::Transaction, 0);
    let _ = fs.fallocate(f, 0, 0, 4096);
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "while holding Core 0")]
fn an_inode_lock_inside_the_core_lock_breaks_the_lock_order() {
    use folio_ext4::lockdep::{Held, Level};
    let (_dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let f = fs
        .create(ROOT_INO, b"f", 0o644, folio_ext4::Owner::default())
        .unwrap();
    let _c = Held::take(Level::Core, 0);
    let _ = fs.write(f, 0, b"x");
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "lock order violation: taking Core 0 while holding Allocator")]
fn a_transaction_inside_the_allocator_breaks_the_lock_order() {
    use folio_ext4::lockdep::{Held, Level};
    let (_dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let _a = Held::take(Level::Allocator, 0);
    let _ = fs.create(ROOT_INO, b"f", 0o644, folio_ext4::Owner::default());
}

/// File handles: an inode is found again by number and generation while
/// it is in use (an unlinked file while still open); anything else —
/// a reserved or out-of-range number, a wrong generation, a deleted
/// file — is ESTALE.
#[test]
fn stat_by_handle_finds_live_inodes_only() {
    use folio_ext4::Error;
    let (dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let me = folio_ext4::Owner::default();
    let f = fs.create(ROOT_INO, b"f", 0o644, me).unwrap();
    let g = fs.stat(f).unwrap().generation;
    assert_eq!(fs.stat_by_handle(f, Some(g)).unwrap().ino, f);
    assert_eq!(fs.stat_by_handle(ROOT_INO, None).unwrap().ino, ROOT_INO);
    let stale = |r: folio_ext4::Result<folio_ext4::Stat>| {
        matches!(r, Err(Error::Stale)) && Error::Stale.errno() == libc::ESTALE
    };
    assert!(stale(fs.stat_by_handle(f, Some(g.wrapping_add(1)))));
    assert!(stale(fs.stat_by_handle(5, None)), "reserved inode");
    assert!(stale(fs.stat_by_handle(u32::MAX, None)), "out of range");
    assert!(stale(fs.stat_by_handle(f + 1, None)), "never used");
    fs.open_ref(f);
    fs.unlink(ROOT_INO, b"f").unwrap();
    assert!(fs.stat_by_handle(f, Some(g)).is_ok(), "unlinked but open");
    fs.close_ref(f).unwrap();
    assert!(stale(fs.stat_by_handle(f, Some(g))), "deleted");
    fsck_mem(&dev, fs, "handles");
}

/// A write's privilege check is remembered per inode only while nothing
/// can have changed it: after the core found nothing to drop, a chmod
/// adding setuid and a security.capability attribute each make the next
/// write drop them again.
#[test]
fn remembered_privilege_checks_follow_mode_and_xattr_changes() {
    use folio_ext4::{Caller, SetAttr, XattrMode};
    let (dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let user = Caller {
        uid: 1000,
        gid: 1000,
        privileged: false,
    };
    let f = fs
        .create(
            ROOT_INO,
            b"f",
            0o755,
            folio_ext4::Owner {
                uid: 1000,
                gid: 1000,
            },
        )
        .unwrap();
    fs.write(f, 0, b"x").unwrap();
    assert!(
        !fs.drop_privs_for_write(f, user).unwrap(),
        "nothing to drop"
    );
    assert!(!fs.drop_privs_for_write(f, user).unwrap(), "remembered");
    fs.setattr(
        f,
        &SetAttr {
            mode: Some(0o4755),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        fs.drop_privs_for_write(f, user).unwrap(),
        "setuid added since"
    );
    assert_eq!(fs.stat(f).unwrap().mode & 0o7777, 0o755);
    assert!(!fs.drop_privs_for_write(f, user).unwrap());
    fs.set_xattr(
        f,
        b"security.capability",
        &[1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        XattrMode::Any,
    )
    .unwrap();
    fs.drop_privs_for_write(f, user).unwrap();
    assert!(
        fs.get_xattr(f, b"security.capability").is_err(),
        "the capability added since is dropped"
    );
    fsck_mem(&dev, fs, "privs");
}

/// RENAME_WHITEOUT, as overlayfs uses it: a file and a directory (across
/// parents, so link counts move) are renamed and their old names become
/// whiteouts (character devices 0:0, mode 0, owned by the caller);
/// with RENAME_EXCHANGE it is EINVAL; e2fsck clean.
#[test]
fn rename_whiteout_leaves_whiteouts() {
    use folio_ext4::{FileType, Owner, RenameFlags};
    let (dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let me = Owner { uid: 7, gid: 8 };
    let a = fs.mkdir(ROOT_INO, b"a", 0o755, me).unwrap();
    let b = fs.mkdir(ROOT_INO, b"b", 0o755, me).unwrap();
    let f = fs.create(a, b"f", 0o644, me).unwrap();
    let sub = fs.mkdir(a, b"sub", 0o755, me).unwrap();
    let wo = RenameFlags {
        whiteout: Some(me),
        ..Default::default()
    };
    fs.rename(a, b"f", b, b"f", wo).unwrap();
    fs.rename(a, b"sub", b, b"sub", wo).unwrap();
    assert_eq!(fs.lookup(b, b"f").unwrap(), f);
    assert_eq!(fs.lookup(b, b"sub").unwrap(), sub);
    for name in [&b"f"[..], b"sub"] {
        let w = fs.stat(fs.lookup(a, name).unwrap()).unwrap();
        assert_eq!(w.file_type, FileType::CharDev);
        assert_eq!((w.rdev, w.mode & 0o7777, w.uid, w.gid), ((0, 0), 0, 7, 8));
    }
    assert_eq!(fs.stat(a).unwrap().nlink, 2, "a lost its subdirectory");
    assert_eq!(fs.stat(b).unwrap().nlink, 3, "b gained it");
    let both = RenameFlags {
        exchange: true,
        whiteout: Some(me),
        ..Default::default()
    };
    assert_eq!(
        fs.rename(b, b"f", ROOT_INO, b"a", both)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    fsck_mem(&dev, fs, "whiteout");
}

/// Buffered writes to an open file run without the core lock (issue 12):
/// the size and times they set live in the inode object until sync,
/// fsync or a write of the inode carries them to its block; stat sees
/// them at once, writeback in between loses none of them, and a reopen
/// finds every byte.
#[test]
fn writes_to_an_open_file_go_lock_free_and_reach_the_disk() {
    let (dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let f = fs
        .create(ROOT_INO, b"f", 0o644, folio_ext4::Owner::default())
        .unwrap();
    fs.open_ref(f);
    let mut model = Vec::new();
    let mut rng = Rng::new(3);
    for round in 0..40u64 {
        let off = rng.below(1 << 20);
        let len = 1 + rng.below(20_000) as usize;
        let data = rng.bytes(len);
        let before = fs.lock_free_write_bytes();
        assert_eq!(fs.write(f, off, &data).unwrap(), data.len());
        if round > 0 {
            assert_eq!(
                fs.lock_free_write_bytes() - before,
                data.len() as u64,
                "round {round}: the whole write went lock-free"
            );
        }
        let end = off as usize + data.len();
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        assert_eq!(
            fs.stat(f).unwrap().size,
            model.len() as u64,
            "round {round}"
        );
        match round % 8 {
            // Writeback (which writes the inode without its lock) in
            // between: the size it writes must be the newest.
            3 => fs.writeback_background().map(drop).unwrap(),
            5 => fs.fsync(f, true).unwrap(),
            _ => {}
        }
    }
    // An overwrite of blocks already on disk changes only the mtime, which
    // nothing but fsync carries to the inode block: a crash right after
    // the fsync keeps it.
    fs.write(f, 0, &model[..4096]).unwrap();
    fs.fsync(f, false).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let before = fs.lock_free_write_bytes();
    fs.write(f, 0, &model[..4096]).unwrap();
    assert_eq!(fs.lock_free_write_bytes() - before, 4096);
    let st = fs.stat(f).unwrap();
    fs.fsync(f, false).unwrap();
    fs.abandon();
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let back = fs.stat(f).unwrap();
    assert_eq!(
        (back.size, back.mtime),
        (st.size, st.mtime),
        "fsync'd size and mtime"
    );
    fs.close().unwrap();
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    assert_eq!(fs.stat(f).unwrap().size, model.len() as u64);
    let mut back = vec![0u8; model.len()];
    assert_eq!(fs.read(f, 0, &mut back).unwrap(), model.len());
    assert!(back == model, "content after reopen");
    // Open, with its map loaded: a cold read goes without the core lock.
    fs.open_ref(f);
    fs.drop_caches();
    let mut again = vec![0u8; model.len()];
    assert_eq!(fs.read(f, 0, &mut again).unwrap(), model.len());
    assert!(again == model, "content read lock-free");
    assert!(fs.lock_free_read_bytes() >= model.len() as u64);
    fs.close_ref(f).unwrap();
    fsck_mem(&dev, fs, "lock-free writes");
}

/// POSIX ACL rules in the library (issue 15 point 3): a default ACL masks
/// a new file's mode and passes to a new directory; an access ACL equal
/// to the mode is stored as the mode only; chmod moves an access ACL; a
/// caller outside the file's group setting an ACL loses setgid. The
/// image is e2fsck clean (e2fsck checks the ACLs' encoding).
#[test]
fn acls_mask_new_inodes_follow_chmod_and_vanish_when_equal_to_the_mode() {
    use folio_ext4::{Caller, XattrMode};
    let (dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let acl = |entries: &[(u16, u16, u32)]| {
        let mut v = 2u32.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            let id = if tag == 2 || tag == 8 { id } else { u32::MAX };
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    };
    let me = folio_ext4::Owner::default();
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, me).unwrap();
    let default = acl(&[
        (1, 7, 0),
        (2, 5, 1000),
        (4, 5, 0),
        (0x10, 7, 0),
        (0x20, 0, 0),
    ]);
    fs.set_xattr(d, b"system.posix_acl_default", &default, XattrMode::Any)
        .unwrap();
    let f = fs.create(d, b"f", 0o640, me).unwrap();
    assert_eq!(fs.stat(f).unwrap().mode & 0o7777, 0o640);
    assert_eq!(
        fs.get_xattr(f, b"system.posix_acl_access").unwrap(),
        acl(&[
            (1, 6, 0),
            (2, 5, 1000),
            (4, 5, 0),
            (0x10, 4, 0),
            (0x20, 0, 0)
        ]),
        "the default ACL masked by the mode"
    );
    assert!(fs.get_xattr(f, b"system.posix_acl_default").is_err());
    let sub = fs.mkdir(d, b"sub", 0o777, me).unwrap();
    assert_eq!(fs.stat(sub).unwrap().mode & 0o7777, 0o770);
    assert_eq!(
        fs.get_xattr(sub, b"system.posix_acl_default").unwrap(),
        default
    );
    // chmod moves owner, mask and other.
    let set = folio_ext4::SetAttr {
        mode: Some(0o704),
        ..Default::default()
    };
    fs.setattr(f, &set).unwrap();
    assert_eq!(
        fs.get_xattr(f, b"system.posix_acl_access").unwrap(),
        acl(&[
            (1, 7, 0),
            (2, 5, 1000),
            (4, 5, 0),
            (0x10, 0, 0),
            (0x20, 4, 0)
        ])
    );
    // Equal to a mode: only the mode.
    let g = fs.create(ROOT_INO, b"g", 0o2755, me).unwrap();
    let plain = acl(&[(1, 4, 0), (4, 7, 0), (0x20, 6, 0)]);
    let outsider = Caller {
        uid: 1234,
        gid: 101,
        privileged: false,
    };
    fs.set_xattr_by(
        g,
        b"system.posix_acl_access",
        &plain,
        XattrMode::Any,
        Some(outsider),
    )
    .unwrap();
    assert_eq!(
        fs.stat(g).unwrap().mode & 0o7777,
        0o476,
        "setgid cleared too"
    );
    assert!(fs.get_xattr(g, b"system.posix_acl_access").is_err());
    fsck_mem(&dev, fs, "ACLs");
}

/// chattr flags in the library (issue 15 point 10): immutable refuses
/// writes (also on the lock-free path of an open file with dirty data),
/// truncation, attribute and name changes; append-only refuses all but
/// additions; flags folio does not honour are refused, not stored; the
/// flags reach the disk (e2fsck clean, reopen sees them).
#[test]
fn immutable_and_append_only_refuse_what_ext4_refuses() {
    use folio_ext4::Error;
    let (dev, fs) = mem_fs(32 << 20, MkfsOptions::default());
    let me = folio_ext4::Owner::default();
    let f = fs.create(ROOT_INO, b"f", 0o644, me).unwrap();
    fs.open_ref(f);
    fs.write(f, 0, &[1; 5000]).unwrap();
    fs.write(f, 5000, &[2; 100]).unwrap();
    let flags = fs.get_flags(f).unwrap();
    assert_eq!(flags & 0x30, 0);
    fs.set_flags(f, flags | 0x10).unwrap();
    let eperm = |r: folio_ext4::Result<()>| matches!(r, Err(Error::NotPermitted(_)));
    assert!(
        eperm(fs.write(f, 0, &[3; 10]).map(drop)),
        "a write into dirty cached data"
    );
    assert!(eperm(fs.write(f, 5100, &[3; 10]).map(drop)), "an append");
    let size = folio_ext4::SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert!(eperm(fs.setattr(f, &size).map(drop)));
    let chmod = folio_ext4::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    assert!(eperm(fs.setattr(f, &chmod).map(drop)));
    assert!(eperm(fs.unlink(ROOT_INO, b"f")));
    assert!(eperm(fs.link(f, ROOT_INO, b"g")));
    assert!(eperm(fs.fallocate(f, 0, 0, 4096)));
    assert!(eperm(fs.set_xattr(
        f,
        b"user.a",
        b"1",
        folio_ext4::XattrMode::Any
    )));
    // Append-only: appends (the mount checks O_APPEND at open), no cut.
    fs.set_flags(f, (flags & !0x10) | 0x20).unwrap();
    assert_eq!(fs.write(f, 5100, &[4; 10]).unwrap(), 10);
    assert!(eperm(fs.setattr(f, &size).map(drop)));
    assert!(eperm(fs.unlink(ROOT_INO, b"f")));
    // Not honoured, so not stored: synchronous updates (chattr +S).
    assert!(matches!(
        fs.set_flags(f, flags | 0x20 | 0x8),
        Err(Error::Unsupported(_))
    ));
    assert_eq!(fs.get_flags(f).unwrap() & 0x38, 0x20);
    // An append-only directory takes entries and keeps them.
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, me).unwrap();
    fs.create(d, b"old", 0o644, me).unwrap();
    let dflags = fs.get_flags(d).unwrap();
    fs.set_flags(d, dflags | 0x20).unwrap();
    fs.create(d, b"new", 0o644, me).unwrap();
    assert!(eperm(fs.unlink(d, b"old")));
    fs.set_flags(d, dflags | 0x10).unwrap();
    assert!(matches!(
        fs.create(d, b"newer", 0o644, me),
        Err(Error::NotPermitted(_))
    ));
    fs.close_ref(f).unwrap();
    fs.close().unwrap();
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    assert_eq!(fs.get_flags(f).unwrap() & 0x30, 0x20, "flags on disk");
    assert_eq!(fs.stat(f).unwrap().size, 5110);
    fsck_mem(&dev, fs, "flags");
}
