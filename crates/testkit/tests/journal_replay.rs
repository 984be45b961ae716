//! Journals written by others replay in folio exactly as e2fsck replays
//! them: transactions made with debugfs (`jo`, `jw`, `jc`, with a revoke
//! and a torn transaction), and the journal the Linux kernel leaves when a
//! mounted filesystem is shut down without a checkpoint.

use std::path::Path;
use std::process::Command;

use folio_ext4::{Filesystem, OpenOptions, ROOT_INO};
use folio_testkit::*;

/// Blocks that differ between two images, except the primary superblock's
/// block (replay stamps times and counters there) and the journal's own
/// blocks (the log is scratch space; both journals are empty afterwards).
fn differing_blocks(a: &Path, b: &Path, bs: usize) -> Vec<usize> {
    let fs = Filesystem::open_path(
        b,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let journal: std::collections::HashSet<usize> = fs
        .block_runs(8)
        .unwrap()
        .iter()
        .flat_map(|r| (r.pblk..r.pblk + r.len).map(|x| x as usize))
        .collect();
    drop(fs);
    let a = std::fs::read(a).unwrap();
    let b = std::fs::read(b).unwrap();
    assert_eq!(a.len(), b.len());
    let sb_block = 1024 / bs;
    (0..a.len() / bs)
        .filter(|&i| {
            i != sb_block
                && !journal.contains(&i)
                && a[i * bs..(i + 1) * bs] != b[i * bs..(i + 1) * bs]
        })
        .collect()
}

fn superblock_fields(img: &Path) -> (u32, u32, u32, u64, u32) {
    let bytes = std::fs::read(img).unwrap();
    let sb = folio_ext4::format::superblock::Superblock::from_bytes(&bytes[1024..2048]).unwrap();
    (
        sb.feature_compat(),
        sb.feature_incompat(),
        sb.feature_ro_compat(),
        sb.free_blocks_count(),
        sb.free_inodes_count(),
    )
}

/// Replay `img` with e2fsck and with folio; the results must agree.
fn replay_both(
    t: &TempDir,
    img: &Path,
    bs: usize,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    folio_ext4::RecoveryReport,
) {
    let a = t.join("by-e2fsck.img");
    let b = t.join("by-folio.img");
    std::fs::copy(img, &a).unwrap();
    std::fs::copy(img, &b).unwrap();
    let out = Command::new("e2fsck")
        .args(["-fy", "-E", "journal_only"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        out.status.code().unwrap_or(8) <= 1,
        "e2fsck replay failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let fs = Filesystem::open_path(&b, OpenOptions::default()).unwrap();
    let report = fs.recovery_report().expect("folio ran recovery");
    fs.close().unwrap();
    let d = differing_blocks(&a, &b, bs);
    assert!(
        d.is_empty(),
        "blocks differ after replay: {d:?} (report {report:?})"
    );
    assert_eq!(superblock_fields(&a), superblock_fields(&b));
    e2fsck(&b).unwrap();
    (a, b, report)
}

#[test]
fn debugfs_journals_replay_like_e2fsck() {
    if !require(
        have_tool("debugfs") && have_tool("e2fsck") && have_tool("mkfs.ext4"),
        "e2fsprogs is not installed",
    ) {
        return;
    }
    let t = TempDir::new("jr-debugfs");
    for (bs, extra) in [(1024usize, ""), (4096, ""), (4096, "^metadata_csum")] {
        let img = t.join("j.img");
        let mut mk = Command::new("mkfs.ext4");
        mk.args(["-q", "-F", "-b", &bs.to_string()]);
        if !extra.is_empty() {
            mk.args(["-O", extra]);
        }
        run(mk.arg(&img).arg("32M"));
        let mut rng = Rng::new(bs as u64);
        let one = t.join("one.bin");
        let three = t.join("three.bin");
        std::fs::write(&one, rng.bytes(bs)).unwrap();
        std::fs::write(&three, rng.bytes(3 * bs)).unwrap();
        // Blocks well past the metadata of the first group.
        let base = 3000; // well past the first group's metadata
        let script = format!(
            "jo\njw -b {b0},{b1},{b2} -c {three}\njw -b {b3} -c {one}\njw -r {b1}\njw -b {b4} -c {one}\njw -b {b5} {one}\njc\n",
            b0 = base,
            b1 = base + 1,
            b2 = base + 2,
            b3 = base + 10,
            b4 = base + 20,
            b5 = base + 30,
            three = three.display(),
            one = one.display(),
        );
        let out = Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg("-")
            .arg(&img)
            .stdin_str(&script);
        assert!(out.contains("jc"), "{out}");
        let (_, _, report) = replay_both(&t, &img, bs);
        assert!(report.transactions >= 2, "bs {bs} {extra}: {report:?}");
    }
}

trait StdinStr {
    fn stdin_str(&mut self, input: &str) -> String;
}

impl StdinStr for Command {
    fn stdin_str(&mut self, input: &str) -> String {
        use std::io::Write;
        let mut child = self
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// e2fsprogs and kernel loop mounts are at hand; if not, says that the
/// test `what` is skipped.
fn kernel_available(what: &str) -> bool {
    require(
        have_tool("e2fsck") && have_tool("mkfs.ext4"),
        "e2fsprogs is not installed",
    ) && require(
        can_loop_mount(),
        &format!("not root or no loop devices: {what} test skipped"),
    )
}

#[test]
fn kernel_journals_replay_like_e2fsck_and_kernel_trees_read_back() {
    if !kernel_available("kernel journal") {
        return;
    }
    let t = TempDir::new("jr-kernel");
    let src = t.join("src");
    make_tree(&src, 0xCAFE, 600);
    for bs in [1024usize, 4096] {
        let img = t.join("k.img");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", &bs.to_string()])
            .arg(&img)
            .arg("128M"));
        let mnt = TempDir::new("kmnt");
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt.path));
        // A tree the kernel writes (htree directories included), synced;
        // then more changes that only reach the journal.
        let cp = Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(mnt.path.join("tree"))
            .status()
            .unwrap();
        let sync = Command::new("sync")
            .arg("-f")
            .arg(&mnt.path)
            .status()
            .unwrap();
        let late = mnt.path.join("late");
        std::fs::create_dir(&late).unwrap();
        for i in 0..300 {
            std::fs::write(late.join(format!("n{i}")), format!("late {i}")).unwrap();
        }
        std::fs::rename(mnt.path.join("tree/many"), mnt.path.join("moved")).unwrap();
        let shut = shutdown_ext4(&mnt.path);
        let _ = Command::new("umount").arg(&mnt.path).status();
        assert!(cp.success() && sync.success());
        shut.unwrap();
        let sb = folio_ext4::format::superblock::Superblock::from_bytes(
            &std::fs::read(&img).unwrap()[1024..2048],
        )
        .unwrap();
        assert!(
            sb.has_incompat(folio_ext4::format::superblock::incompat::RECOVER),
            "the kernel left a journal to replay"
        );
        let (a, b, report) = replay_both(&t, &img, bs);
        assert!(report.transactions >= 1, "{report:?}");
        // The kernel's view of e2fsck's replay equals folio's reading of
        // folio's replay.
        let m = LoopMount::new(&a).unwrap();
        let kernel = host_tree(&m.dir.path);
        drop(m);
        let mut fs = Filesystem::open_path(
            &b,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let ours = folio_tree(&mut fs, ROOT_INO);
        let d = diff_trees(&kernel, &ours, 10);
        assert!(d.is_empty(), "bs {bs}: {d:#?}");
        assert!(ours.contains_key("moved") && ours.len() > 500);
        drop(fs);
        // A read-only open of the image still needing recovery replays it
        // in memory: the same tree, and the image is not written.
        let before = std::fs::read(&img).unwrap();
        let mut fs = open_read_only(&img, false);
        assert!(fs.recovery_report().is_some());
        let ro = folio_tree(&mut fs, ROOT_INO);
        let d = diff_trees(&kernel, &ro, 10);
        assert!(d.is_empty(), "bs {bs}, read-only replay: {d:#?}");
        drop(fs);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "a read-only open wrote the image"
        );
        // norecovery shows the image as it is, and says why.
        let fs = open_read_only(&img, true);
        assert!(fs.recovery_report().is_none());
        assert!(fs.read_only_reason().unwrap().contains("needs recovery"));
    }
}

/// A journal folio itself left (committed transactions, no checkpoint, no
/// clean close: the process died) is replayed in memory by a read-only
/// open, which then shows every committed file; the image is unchanged.
#[test]
fn read_only_opens_replay_folio_journals_in_memory() {
    let t = TempDir::new("jr-ro");
    let img = t.join("img");
    folio_ext4::mkfs::mkfs_path(&img, Some(32 << 20), &Default::default()).unwrap();
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let me = folio_ext4::Owner::default();
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, me).unwrap();
    for i in 0..50u32 {
        let f = fs.create(d, format!("f{i}").as_bytes(), 0o644, me).unwrap();
        fs.write(f, 0, &vec![i as u8; 3000 + i as usize]).unwrap();
    }
    fs.sync().unwrap();
    fs.abandon();
    let before = std::fs::read(&img).unwrap();
    let fs = open_read_only(&img, false);
    let report = fs.recovery_report().expect("replayed in memory");
    assert!(report.transactions >= 1, "{report:?}");
    let d = fs.lookup(ROOT_INO, b"d").unwrap();
    for i in 0..50u32 {
        let f = fs.lookup(d, format!("f{i}").as_bytes()).unwrap();
        let mut b = vec![0u8; 4000];
        let n = fs.read(f, 0, &mut b).unwrap();
        assert_eq!(n, 3000 + i as usize);
        assert!(b[..n].iter().all(|&x| x == i as u8));
    }
    drop(fs);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open wrote the image"
    );
    // Without the in-memory replay the files are not there yet.
    let fs = open_read_only(&img, true);
    assert!(fs.lookup(ROOT_INO, b"d").is_err());
    drop(fs);
    // A read-write open replays for real; e2fsck agrees.
    Filesystem::open_path(&img, OpenOptions::default())
        .unwrap()
        .close()
        .unwrap();
    if require(have_tool("e2fsck"), "e2fsck is not installed") {
        e2fsck(&img).unwrap();
    }
}

/// A file unlinked while still open when the system went down stays on
/// the orphan list (entry gone, links 0, blocks allocated, listed in
/// `s_last_orphan`). folio frees it at the next read-write open, as the
/// kernel and e2fsck do. The state is made with debugfs, exactly as such a
/// crash leaves it.
#[test]
fn orphans_are_freed_at_open() {
    if !require(
        have_tool("debugfs") && have_tool("e2fsck") && have_tool("mkfs.ext4"),
        "e2fsprogs is not installed",
    ) {
        return;
    }
    let t = TempDir::new("jr-orphan");
    let img = t.join("o.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .arg("64M"));
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let free0 = fs.statfs().blocks_free;
    let owner = folio_ext4::Owner::default();
    let v = fs.create(ROOT_INO, b"victim", 0o644, owner).unwrap();
    fs.write(v, 0, &vec![5u8; 4 << 20]).unwrap();
    let keep = fs.create(ROOT_INO, b"keep", 0o644, owner).unwrap();
    fs.write(keep, 0, b"still here").unwrap();
    fs.close().unwrap();
    let script = format!(
        "unlink /victim\nsif <{v}> links_count 0\nsif <{v}> dtime 0\nssv last_orphan {v}\n"
    );
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg("-")
        .arg(&img)
        .stdin_str(&script);
    assert!(out.contains("ssv"), "{out}");
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    assert_eq!(fs.superblock().last_orphan(), 0, "orphan list processed");
    let st = fs.stat(v).unwrap();
    assert_eq!(
        (st.nlink, st.size, st.blocks_512),
        (0, 0, 0),
        "the orphan is freed"
    );
    assert_eq!(
        fs.statfs().blocks_free,
        free0 - 1,
        "only keep's block is in use"
    );
    assert_eq!(fs.check_counts(None).unwrap(), Vec::<String>::new());
    fs.close().unwrap();
    e2fsck(&img).unwrap();
}

/// The kernel's orphan file: a file unlinked while still open when the
/// system went down is listed in the orphan file (`orphan_file`, with
/// `orphan_present` set while mounted). folio replays the journal, frees
/// the orphan at the read-write open, blanks its slot and clears
/// `orphan_present`: the same free counts and features as e2fsck's
/// repair of the same image, and a clean image.
#[test]
fn kernel_orphan_file_is_processed_at_open() {
    if !kernel_available("kernel orphan file") {
        return;
    }
    let t = TempDir::new("jr-orphanfile");
    let img = t.join("o.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "orphan_file"])
        .arg(&img)
        .arg("64M"));
    let mnt = TempDir::new("omnt");
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt.path));
    std::fs::write(mnt.path.join("keep"), b"still here").unwrap();
    std::fs::write(mnt.path.join("victim"), vec![7u8; 4 << 20]).unwrap();
    let sync = Command::new("sync")
        .arg("-f")
        .arg(&mnt.path)
        .status()
        .unwrap();
    let open = std::fs::File::open(mnt.path.join("victim")).unwrap();
    std::fs::remove_file(mnt.path.join("victim")).unwrap();
    // The unlink (and the orphan slot) reach the journal; nothing more.
    let shut = shutdown_ext4(&mnt.path);
    drop(open);
    let _ = Command::new("umount").arg(&mnt.path).status();
    assert!(sync.success());
    shut.unwrap();
    let ro = superblock_fields(&img).2;
    assert!(
        ro & folio_ext4::format::superblock::ro_compat::ORPHAN_PRESENT != 0,
        "the kernel left orphan_present set"
    );
    let a = t.join("by-e2fsck.img");
    let b = t.join("by-folio.img");
    std::fs::copy(&img, &a).unwrap();
    std::fs::copy(&img, &b).unwrap();
    let out = Command::new("e2fsck").arg("-fy").arg(&a).output().unwrap();
    assert!(
        out.status.code().unwrap_or(8) <= 1,
        "e2fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let fs = Filesystem::open_path(&b, OpenOptions::default()).unwrap();
    assert!(fs.read_only_reason().is_none(), "opens read-write");
    assert!(fs.lookup(ROOT_INO, b"victim").is_err());
    let keep = fs.lookup(ROOT_INO, b"keep").unwrap();
    let mut buf = [0u8; 32];
    let n = fs.read(keep, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"still here");
    assert_eq!(fs.check_counts(None).unwrap(), Vec::<String>::new());
    fs.close().unwrap();
    e2fsck(&b).unwrap();
    let (ours, theirs) = (superblock_fields(&b), superblock_fields(&a));
    assert_eq!(
        ours.2 & folio_ext4::format::superblock::ro_compat::ORPHAN_PRESENT,
        0,
        "orphan_present cleared"
    );
    assert_eq!(
        ours, theirs,
        "features and free counts as e2fsck leaves them"
    );
}

/// Dropping a writable filesystem without `close` commits and closes it:
/// nothing written is lost and nothing is left to replay.
#[test]
fn dropping_a_writable_filesystem_closes_it() {
    let t = TempDir::new("jr-drop");
    let img = t.join("img");
    folio_ext4::mkfs::mkfs_path(&img, Some(32 << 20), &Default::default()).unwrap();
    {
        let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
        let f = fs
            .create(ROOT_INO, b"kept", 0o644, folio_ext4::Owner::default())
            .unwrap();
        fs.write(f, 0, b"written, never synced").unwrap();
        // Dropped here.
    }
    let raw = std::fs::read(&img).unwrap();
    let sb = folio_ext4::format::superblock::Superblock::from_bytes(&raw[1024..2048]).unwrap();
    assert!(
        !sb.has_incompat(folio_ext4::format::superblock::incompat::RECOVER),
        "the drop left the journal needing recovery"
    );
    let fs = open_read_only(&img, false);
    let f = fs.lookup(ROOT_INO, b"kept").unwrap();
    let mut b = [0u8; 64];
    let n = fs.read(f, 0, &mut b).unwrap();
    assert_eq!(&b[..n], b"written, never synced");
    drop(fs);
    if require(have_tool("e2fsck"), "e2fsck is not installed") {
        e2fsck(&img).unwrap();
    }
}

/// Multiple-mount protection (issue 18, `mmp`): a read-write open of an
/// image made with `mkfs.ext4 -O mmp` takes it (at once: it is clean),
/// keeps its sequence changing while open, so that the kernel's own
/// read-write mount of the image watches it for 11 s and refuses it as
/// in use on another node, and marks it clean at close; e2fsck is clean
/// and the kernel sees the file. After a crash (the mark left behind) the
/// next open watches the block twice before taking it. An image e2fsck holds (sequence SEQ_FSCK, set with debugfs) is
/// refused read-write at once and opens read-only.
#[test]
fn mmp_images_are_held_while_open_and_released_clean() {
    if !require(
        have_tool("mkfs.ext4") && have_tool("debugfs") && have_tool("e2fsck"),
        "e2fsprogs is not installed",
    ) {
        return;
    }
    let dir = TempDir::new("mmp");
    let img = dir.join("mmp.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "mmp", "-E", "mmp_update_interval=1"])
        .arg(&img));
    // The MMP block: s_mmp_block (superblock offset 0x168), 1 KiB blocks.
    let sb = std::fs::read(&img).unwrap()[1024..2048].to_vec();
    let at = u64::from_le_bytes(sb[0x168..0x170].try_into().unwrap()) * 1024;
    let seq = || {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut b, at + 4)
            .unwrap();
        u32::from_le_bytes(b)
    };
    const CLEAN: u32 = 0xFF4D_4D50;
    assert_eq!(seq(), CLEAN, "mke2fs leaves it clean");
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let held = seq();
    assert_ne!(held, CLEAN);
    let f = fs
        .create(ROOT_INO, b"f", 0o644, folio_ext4::Owner::default())
        .unwrap();
    fs.write(f, 0, b"held under mmp").unwrap();
    fs.sync().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_ne!(seq(), held, "the sequence keeps changing while open");
    if can_loop_mount() {
        // The kernel watches the block for 11 s, sees it change and
        // refuses: "Device is already active on another node".
        let mnt = TempDir::new("mmp-kernel");
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt.path)
            .output()
            .unwrap();
        if out.status.success() {
            let _ = Command::new("umount").arg(&mnt.path).status();
            panic!("the kernel mounted read-write an image folio holds");
        }
        let log = Command::new("dmesg")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        assert!(
            log.contains("active on another node") || log.contains("MMP"),
            "the kernel refused for another reason: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A crash: the mark stays, and the next open watches it twice.
    fs.abandon();
    assert_ne!(seq(), CLEAN);
    let t0 = std::time::Instant::now();
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    assert!(t0.elapsed() >= std::time::Duration::from_secs(20));
    assert!(fs.lookup(ROOT_INO, b"f").is_ok(), "the synced file");
    fs.close().unwrap();
    assert_eq!(seq(), CLEAN, "clean after close");
    e2fsck(&img).unwrap();
    if can_loop_mount() {
        let m = LoopMount::new(&img).unwrap();
        assert_eq!(std::fs::read(m.dir.join("f")).unwrap(), b"held under mmp");
    }
    // e2fsck's mark (what e2fsck writes while it runs; debugfs -w would
    // put its own clean mark back on exit): refused read-write without
    // waiting, read-only fine.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut b = [0u8; 1024];
        f.read_exact_at(&mut b, at).unwrap();
        b[4..8].copy_from_slice(&0xE24D_4D50u32.to_le_bytes());
        let sb = folio_ext4::format::superblock::Superblock {
            raw: sb.clone().try_into().unwrap(),
        };
        let c = folio_ext4::csum::crc32c_raw(sb.csum_seed(), &b[..1020]);
        b[1020..].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&b, at).unwrap();
    }
    let t0 = std::time::Instant::now();
    match Filesystem::open_path(&img, OpenOptions::default()) {
        Err(folio_ext4::Error::Locked(m)) => assert!(m.contains("e2fsck"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened an image e2fsck holds"),
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    let ro = open_read_only(&img, false);
    assert!(ro.lookup(ROOT_INO, b"f").is_ok());
}

/// meta_bg images (issue 18) open read-write: made by `mkfs.ext4 -O
/// meta_bg,^resize_inode` on 1 KiB blocks (32 groups, 16 descriptors per
/// block: two meta groups, their descriptor blocks in each one's first,
/// second and last group), filled to most of their space so that
/// allocation crosses every group, including never-initialised ones
/// whose bitmaps folio builds itself: e2fsck clean, and the kernel reads
/// back every byte.
#[test]
fn meta_bg_images_are_read_write() {
    if !require(
        have_tool("mkfs.ext4") && have_tool("e2fsck"),
        "e2fsprogs is not installed",
    ) {
        return;
    }
    let dir = TempDir::new("metabg");
    let img = dir.join("metabg.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(256 << 20))
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "1024", "-O", "meta_bg,^resize_inode"])
        .arg(&img));
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    assert_eq!(fs.read_only_reason(), None);
    let me = folio_ext4::Owner::default();
    let mut rng = Rng::new(77);
    let mut files = Vec::new();
    for d in 0..6 {
        let dir_ino = fs
            .mkdir(ROOT_INO, format!("d{d}").as_bytes(), 0o755, me)
            .unwrap();
        for f in 0..6 {
            let name = format!("f{f}");
            let ino = fs.create(dir_ino, name.as_bytes(), 0o644, me).unwrap();
            let data = rng.bytes(5 << 20);
            fs.write(ino, 0, &data).unwrap();
            files.push((format!("d{d}/{name}"), data));
        }
    }
    assert!(
        fs.statfs().blocks_free < fs.statfs().blocks / 3,
        "the files cross most groups"
    );
    fs.close().unwrap();
    e2fsck(&img).unwrap();
    if can_loop_mount() {
        let m = LoopMount::new(&img).unwrap();
        for (path, data) in &files {
            assert!(
                std::fs::read(m.dir.join(path)).unwrap() == *data,
                "{path} as the kernel reads it"
            );
        }
    }
}

/// Write `data` at `off` in `p` (created if missing), cut it to `cut`
/// first if given, and fsync it.
fn write_fsync(p: &Path, data: &[u8], off: u64, cut: Option<u64>) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap();
    if let Some(c) = cut {
        f.set_len(c).unwrap();
    }
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

/// `tree` without directory times: what an fsync of a file leaves
/// undefined (its parent's times are not part of it).
fn without_dir_times(
    tree: &std::collections::BTreeMap<String, Node>,
) -> std::collections::BTreeMap<String, Node> {
    let mut t = tree.clone();
    for n in t.values_mut() {
        if n.kind == "dir" {
            n.mtime = (0, 0);
        }
    }
    t
}

/// Damage the values of the records of the fast-commit area in `img`
/// (found by its HEAD at the start of a block) and recompute every
/// TAIL's checksum, so that the damage reaches the replay rather than
/// stopping at the scan. `None` if there is no area.
fn damage_fast_commits(img: &[u8], bs: usize, rng: &mut Rng) -> Option<Vec<u8>> {
    let base = (0..img.len() / bs)
        .map(|b| b * bs)
        .find(|&o| img[o..o + 4] == [9, 0, 8, 0])?;
    let mut x = img.to_vec();
    let records = |x: &[u8]| {
        let mut out = Vec::new();
        let mut cur = base;
        while cur + 4 <= base + bs {
            let tag = u16::from_le_bytes([x[cur], x[cur + 1]]);
            let len = usize::from(u16::from_le_bytes([x[cur + 2], x[cur + 3]]));
            if (tag == 0 && len == 0) || cur + 4 + len > base + bs {
                break;
            }
            out.push((cur, tag, len));
            cur += 4 + len;
        }
        out
    };
    let values: Vec<usize> = records(&x)
        .into_iter()
        .filter(|&(_, tag, _)| (1..=6).contains(&tag))
        .flat_map(|(cur, _, len)| cur + 4..cur + 4 + len)
        .collect();
    for _ in 0..1 + rng.below(3) {
        let o = values[rng.below(values.len() as u64) as usize];
        x[o] = match rng.below(4) {
            0 => 0,
            1 => 0xFF,
            2 => rng.below(256) as u8,
            _ => x[o] ^ (1 << rng.below(8)),
        };
    }
    let mut crc = 0;
    for (cur, tag, len) in records(&x) {
        if tag == 8 {
            crc = folio_journal::format::crc32c_raw(crc, &x[cur..cur + 8]);
            x[cur + 8..cur + 12].copy_from_slice(&crc.to_le_bytes());
            crc = 0;
        } else {
            crc = folio_journal::format::crc32c_raw(crc, &x[cur..cur + 4 + len]);
        }
    }
    Some(x)
}

/// Free blocks and inodes the superblock of `img` counts.
fn free_counts(img: &Path) -> (u64, u32) {
    let sb = folio_ext4::format::superblock::Superblock::from_bytes(
        &std::fs::read(img).unwrap()[1024..2048],
    )
    .unwrap();
    (sb.free_blocks_count(), sb.free_inodes_count())
}

/// A journal the kernel leaves with fast commits (`-O fast_commit`, every
/// change fsync'd after the last full commit, then EXT4_IOC_SHUTDOWN
/// without a log flush) is replayed with its fast-commit area: folio's
/// view is the tree the kernel showed before the crash, e2fsck calls it
/// clean, a read-only open shows the same without writing the image, and
/// for files (creates, appends, overwrites, truncations, links, renames,
/// unlinks) the kernel's own replay gives the same tree and free counts.
/// New directories too, where the kernel's replay is not an oracle: it
/// gives a new directory no block and one link, which e2fsck reports.
/// Directory times are left out of the comparisons: a file's fsync does
/// not cover its parent's, and both replays stamp the directories they
/// add entries to with the time of the replay. One image is made by
/// `folio mkfs -O fast_commit` (the area's length as mke2fs sets it).
#[test]
fn kernel_fast_commits_replay_to_the_fsynced_tree() {
    if !kernel_available("fast commit") {
        return;
    }
    let t = TempDir::new("jr-fc");
    // (block size, new directories, made by folio's mkfs)
    let cases = [
        (4096usize, false, false),
        (1024, false, false),
        (4096, true, false),
        (1024, true, false),
        (4096, false, true),
    ];
    for (bs, mkdirs, ours_mkfs) in cases {
        let img = t.join("fc.img");
        if ours_mkfs {
            let mut features = folio_ext4::mkfs::Features::defaults(Default::default());
            features.edit("fast_commit").unwrap();
            folio_ext4::mkfs::mkfs_path(
                &img,
                Some(64 << 20),
                &folio_ext4::mkfs::MkfsOptions {
                    block_size: Some(bs as u32),
                    features: Some(features),
                    ..Default::default()
                },
            )
            .unwrap();
        } else {
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "fast_commit", "-b", &bs.to_string()])
                .arg(&img)
                .arg("64M"));
        }
        let mnt = TempDir::new("fcmnt");
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt.path));
        let m = mnt.path.clone();
        for (i, n) in ["p", "q", "r", "s", "t", "u"].iter().enumerate() {
            write_fsync(&m.join(n), &vec![b'a' + i as u8; 50_000], 0, None);
        }
        write_fsync(&m.join("big"), &vec![7; 3 << 20], 0, None);
        std::fs::create_dir(m.join("d")).unwrap();
        let sync = Command::new("sync").arg("-f").arg(&m).status().unwrap();
        // Each change fsync'd: fast commits from here on.
        if mkdirs {
            std::fs::create_dir(m.join("d/sub")).unwrap();
            write_fsync(&m.join("d/sub/f"), &[b'F'; 3000], 0, None);
            for i in 0..40u32 {
                let body = i.to_string().repeat(1 + 90 * i as usize);
                write_fsync(&m.join(format!("d/n{i:02}")), body.as_bytes(), 0, None);
            }
        } else {
            write_fsync(&m.join("p"), &[], 0, Some(4096));
            write_fsync(&m.join("q"), &[b'Q'; 8192], 8192, None);
            write_fsync(&m.join("s"), &[b'S'; 30_000], 50_000, None);
            write_fsync(&m.join("big"), &[], 0, Some(100_000));
            write_fsync(&m.join("big"), &[b'g'; 5000], 1 << 21, None);
            std::fs::hard_link(m.join("s"), m.join("s2")).unwrap();
            write_fsync(&m.join("s"), b"L", 1, None);
            std::fs::rename(m.join("t"), m.join("t2")).unwrap();
            write_fsync(&m.join("t2"), b"T", 1, None);
            std::fs::rename(m.join("u"), m.join("d/u")).unwrap();
            write_fsync(&m.join("d/u"), b"U", 1, None);
            for i in 0..12u32 {
                write_fsync(
                    &m.join(format!("new{i}")),
                    &vec![i as u8; 700 * i as usize + 1],
                    0,
                    None,
                );
            }
        }
        let live = without_dir_times(&host_tree(&m));
        let shut = shutdown_ext4_with(&m, false);
        let _ = Command::new("umount").arg(&m).status();
        assert!(sync.success());
        shut.unwrap();
        let tag = format!("bs {bs}, mkdirs {mkdirs}, folio's mkfs {ours_mkfs}");

        // Read-only: replayed in memory, the image untouched.
        let before = std::fs::read(&img).unwrap();
        let mut ro = open_read_only(&img, false);
        let report = ro.recovery_report().unwrap();
        assert!(report.fast_commits >= 3, "{tag}: {report:?}");
        let d = diff_trees(
            &live,
            &without_dir_times(&folio_tree(&mut ro, ROOT_INO)),
            10,
        );
        assert!(d.is_empty(), "{tag}, read-only: {d:#?}");
        drop(ro);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{tag}: image written"
        );

        // Hostile fast commits (damaged, checksums recomputed): the
        // replay reports an error or does what they say, never panics.
        if bs == 4096 && !mkdirs && !ours_mkfs {
            let mut rng = Rng::new(0xFC);
            let (mut opened, mut refused) = (0, 0);
            for _ in 0..150 {
                let x = damage_fast_commits(&before, bs, &mut rng).expect("no fast-commit area");
                let dev = std::sync::Arc::new(folio_blockdev::MemDevice::from_bytes(x));
                match Filesystem::open(dev, OpenOptions::default()) {
                    Ok(fs) => {
                        opened += 1;
                        let _ = fs.close();
                    }
                    Err(_) => refused += 1,
                }
            }
            eprintln!("hostile fast commits: {opened} replayed, {refused} refused");
            assert!(opened > 0 && refused > 0, "{opened} / {refused}");
        }

        // The kernel's replay, on a copy.
        let kimg = t.join("k.img");
        std::fs::copy(&img, &kimg).unwrap();
        let kmnt = TempDir::new("fckmnt");
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&kimg)
            .arg(&kmnt.path));
        let kernel = host_tree(&kmnt.path);
        run(Command::new("umount").arg(&kmnt.path));

        // folio's replay, for real.
        let mut fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
        let r = fs.recovery_report().unwrap();
        assert_eq!(r.fast_commits, report.fast_commits, "{tag}");
        let ours = folio_tree(&mut fs, ROOT_INO);
        fs.close().unwrap();
        let d = diff_trees(&live, &without_dir_times(&ours), 10);
        assert!(d.is_empty(), "{tag}: {d:#?}");
        e2fsck(&img).unwrap_or_else(|e| panic!("{tag}: {e}"));
        if !mkdirs {
            // (Both replays stamp the directories they add entries to
            // with the time of the replay.)
            let d = diff_trees(&without_dir_times(&kernel), &without_dir_times(&ours), 10);
            assert!(d.is_empty(), "{tag}, against the kernel's replay: {d:#?}");
            e2fsck(&kimg).unwrap();
            assert_eq!(free_counts(&kimg), free_counts(&img), "{tag}");
        }
        // The kernel reads folio's replay as folio does.
        let km = LoopMount::new(&img).unwrap();
        let d = diff_trees(&host_tree(&km.dir.path), &ours, 10);
        assert!(d.is_empty(), "{tag}, kernel view of folio's replay: {d:#?}");
    }
}
