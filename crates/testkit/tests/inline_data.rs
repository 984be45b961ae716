//! inline_data images (issue 18): files, symlinks and directories that
//! the kernel and mke2fs keep inside their inodes read back through folio
//! exactly; folio's changes to them (each inline inode it changes moves to
//! blocks first, as the kernel does when inline data outgrows the inode)
//! leave images e2fsck calls clean and the kernel reads as folio does.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use folio_ext4::mkfs::{mkfs_path, Features, FsType, MkfsOptions};
use folio_ext4::{Error, Filesystem, OpenOptions, Owner, RenameFlags, XattrMode, ROOT_INO};
use folio_testkit::*;

const ME: Owner = Owner { uid: 0, gid: 0 };

fn tools_present() -> bool {
    require(
        have_tool("mkfs.ext4") && have_tool("e2fsck") && have_tool("debugfs"),
        "e2fsprogs (mkfs.ext4, e2fsck, debugfs) is not installed",
    )
}

/// A tree of what ends up inline: small and empty files, files past
/// i_block's 60 bytes (their tail in system.data), short and long
/// symlinks, small directories (one with names past i_block), an empty
/// directory; and a few that do not fit (a block file, a big directory).
fn inline_tree(root: &Path, rng: &mut Rng) {
    for d in ["a", "b", "c/deep", "empty", "wide", "big"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for (i, len) in [0usize, 1, 6, 59, 60, 61, 100, 140].into_iter().enumerate() {
        fs::write(root.join(format!("a/f{i}")), rng.bytes(len)).unwrap();
    }
    fs::write(root.join("b/one"), b"one\n").unwrap();
    fs::write(root.join("c/deep/x"), rng.bytes(30)).unwrap();
    fs::write(root.join("blockfile"), rng.bytes(5000)).unwrap();
    for i in 0..3 {
        fs::write(root.join(format!("wide/name-number-{i}")), rng.bytes(10)).unwrap();
    }
    for i in 0..60 {
        fs::write(root.join(format!("big/file{i}")), [i as u8]).unwrap();
    }
    std::os::unix::fs::symlink("short", root.join("a/short")).unwrap();
    std::os::unix::fs::symlink("l".repeat(90), root.join("a/long")).unwrap();
}

/// `mkfs.ext4 -O inline_data -b BS -d SRC IMG SIZE`.
fn mke2fs_inline(src: &Path, img: &Path, bs: u32, size: &str) {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "inline_data", "-b", &bs.to_string(), "-d"])
        .arg(src)
        .arg(img)
        .arg(size));
}

/// The paths among `paths` of `img` that are not inline, by debugfs.
fn not_inline(img: &Path, paths: &[&str]) -> Vec<String> {
    paths
        .iter()
        .filter(|p| {
            let out = run(Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat /{p}"))
                .arg(img));
            let flags = out
                .split("Flags: 0x")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|h| u32::from_str_radix(h, 16).ok());
            flags.is_none_or(|f| f & 0x1000_0000 == 0)
        })
        .map(|p| p.to_string())
        .collect()
}

/// What folio does to the tree, mirrored on `want` (a host copy).
fn change(fs: &Filesystem, want: &Path, rng: &mut Rng) {
    let at = |p: &str| -> u32 {
        let mut ino = ROOT_INO;
        for c in p.split('/') {
            ino = fs
                .lookup(ino, c.as_bytes())
                .unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        ino
    };
    let a = at("a");
    // Appends past the inline area, and one that stays within it (the
    // empty file: 10 of its 60 bytes).
    for (f, len) in [("f2", 200usize), ("f5", 3000), ("f0", 10)] {
        let ino = at(&format!("a/{f}"));
        let size = fs.stat(ino).unwrap().size;
        let data = rng.bytes(len);
        fs.write(ino, size, &data).unwrap();
        let mut old = fs::read(want.join("a").join(f)).unwrap();
        old.extend_from_slice(&data);
        fs::write(want.join("a").join(f), old).unwrap();
    }
    // An overwrite inside, truncations down and up.
    let f6 = at("a/f6");
    fs.write(f6, 10, b"XYZ").unwrap();
    let mut v = fs::read(want.join("a/f6")).unwrap();
    v[10..13].copy_from_slice(b"XYZ");
    fs::write(want.join("a/f6"), v).unwrap();
    for (f, size) in [("f7", 20u64), ("f3", 5000), ("f6", 30)] {
        let ino = at(&format!("a/{f}"));
        set_size(fs, ino, size);
        fs::OpenOptions::new()
            .write(true)
            .open(want.join("a").join(f))
            .unwrap()
            .set_len(size)
            .unwrap();
    }
    // Names added to and removed from inline directories.
    let b = at("b");
    let n = fs.create(b, b"two", 0o644, ME).unwrap();
    fs.write(n, 0, b"two\n").unwrap();
    fs::write(want.join("b/two"), b"two\n").unwrap();
    fs.unlink(a, b"f1").unwrap();
    fs::remove_file(want.join("a/f1")).unwrap();
    fs.unlink(a, b"long").unwrap();
    fs::remove_file(want.join("a/long")).unwrap();
    // A file across inline directories; an inline directory moved (its
    // parent pointer is in its inline area) and one removed.
    let wide = at("wide");
    fs.rename(wide, b"name-number-2", b, b"moved", RenameFlags::default())
        .unwrap();
    fs::rename(want.join("wide/name-number-2"), want.join("b/moved")).unwrap();
    let c = at("c");
    fs.rename(c, b"deep", b, b"deep", RenameFlags::default())
        .unwrap();
    fs::rename(want.join("c/deep"), want.join("b/deep")).unwrap();
    fs.rmdir(ROOT_INO, b"empty").unwrap();
    fs::remove_dir(want.join("empty")).unwrap();
    // A new directory folio makes (inline, as the kernel makes it) and a
    // symlink in it.
    let d = fs.mkdir(c, b"new", 0o755, ME).unwrap();
    // More names than an inline directory holds: it moves to a block.
    for i in 0..6 {
        let n = format!("a-long-name-that-needs-room-{i}");
        fs.create(c, n.as_bytes(), 0o644, ME).unwrap();
        fs::write(want.join("c").join(&n), b"").unwrap();
    }
    fs.symlink(d, b"ln", "t".repeat(70).as_bytes(), ME).unwrap();
    fs::create_dir(want.join("c/new")).unwrap();
    std::os::unix::fs::symlink("t".repeat(70), want.join("c/new/ln")).unwrap();
    // An xattr on an inline file; system.data is not the user's.
    let f4 = at("a/f4");
    // Still inline: no blocks on the device to report.
    assert!(fs.block_runs(f4).unwrap().is_empty());
    fs.set_xattr(f4, b"user.k", b"v", XattrMode::Any).unwrap();
    let f0 = at("a/f0");
    assert!(matches!(
        fs.get_xattr(at("a/f4"), b"system.data"),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        fs.set_xattr(f0, b"system.data", b"x", XattrMode::Any),
        Err(Error::Unsupported(_))
    ));
}

/// Type, size and content of each path: what the host copy and folio
/// must agree on (times and owners differ between them).
fn shape(t: &BTreeMap<String, Node>) -> BTreeMap<String, (&'static str, u64, u64)> {
    t.iter()
        .filter(|(k, _)| !k.starts_with("lost+found"))
        .map(|(k, v)| {
            let size = if v.kind == "dir" { 0 } else { v.size };
            (k.clone(), (v.kind, size, v.content))
        })
        .collect()
}

/// `stays`: inline inodes whose changes fit their inline area.
fn check_image(img: &Path, want: &Path, what: &str, mount_ok: bool, stays: &[&str]) {
    e2fsck(img).unwrap_or_else(|e| panic!("{what}: {e}"));
    // What folio changed left its inline area whole: no system.data stays
    // behind on a block-mapped inode.
    for p in ["a/f2", "a/f3", "c"] {
        let out = run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat /{p}"))
            .arg(img));
        assert!(
            !out.contains("system.data"),
            "{what}: {p} kept system.data: {out}"
        );
    }
    let kept = not_inline(img, &["a/f2", "a/f3", "c"]);
    assert_eq!(kept.len(), 3, "{what}: still inline");
    // Changes within the inline area stay there (an append to the empty
    // file, an overwrite, a truncation, names added, removed and renamed
    // in directories with room), as on the kernel.
    let flat = not_inline(img, stays);
    assert!(flat.is_empty(), "{what}: converted: {flat:?}");
    let mut fs = open_read_only(img, false);
    let got = folio_tree(&mut fs, ROOT_INO);
    let host = host_tree(want);
    assert_eq!(shape(&got), shape(&host), "{what}: folio against the model");
    drop(fs);
    if mount_ok {
        let m = LoopMount::new(img).unwrap_or_else(|e| panic!("{what}: kernel mount: {e}"));
        let kernel = host_tree(&m.dir.path);
        let d = diff_trees(&got, &kernel, 10);
        assert!(d.is_empty(), "{what}: folio and the kernel differ: {d:?}");
    }
}

#[test]
fn inline_data_images_read_back_and_change_cleanly() {
    if !tools_present() {
        return;
    }
    let mount_ok = require(
        can_loop_mount(),
        "not root or no loop devices: kernel comparison skipped",
    );
    let t = TempDir::new("inline");
    let mut rng = Rng::new(0x1D);
    let src = t.join("src");
    inline_tree(&src, &mut rng);
    let inline_paths = ["a/f0", "a/f2", "a/f6", "a/long", "b", "empty", "c/deep"];
    for bs in [1024u32, 4096] {
        let what = format!("mkfs.ext4 -O inline_data -b {bs} -d");
        let img = t.join(&format!("k{bs}.img"));
        mke2fs_inline(&src, &img, bs, "64M");
        let flat = not_inline(&img, &inline_paths);
        assert!(
            flat.is_empty(),
            "{what}: not inline in the test tree: {flat:?}"
        );
        // As mke2fs left it: the same tree, system.data hidden.
        let mut fs = open_read_only(&img, false);
        let got = folio_tree(&mut fs, ROOT_INO);
        // (mke2fs -d keeps whole seconds only.)
        assert_eq!(shape(&got), shape(&host_tree(&src)), "{what}: folio reads");
        drop(fs);
        // Changed by folio.
        let want = t.join(&format!("want{bs}"));
        run(Command::new("cp").arg("-a").arg(&src).arg(&want));
        let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
        change(&fs, &want, &mut rng);
        let (_, overruns) = fs.handle_stats();
        assert_eq!(overruns, 0, "{what}: handles overran their credits");
        let problems = fs.check_counts(None).unwrap();
        assert!(problems.is_empty(), "{what}: {problems:?}");
        fs.close().unwrap();
        check_image(
            &img,
            &want,
            &what,
            mount_ok,
            &["a/f0", "a/f6", "b/deep", "b", "c/new", "b/two"],
        );
    }
    if !mount_ok {
        return;
    }
    // folio's mkfs -O inline_data; the kernel makes the inline inodes.
    let what = "folio mkfs -O inline_data, kernel-written";
    let img = t.join("f.img");
    let mut features = Features::defaults(FsType::Ext4);
    features.edit("inline_data").unwrap();
    let opts = MkfsOptions {
        features: Some(features),
        ..Default::default()
    };
    mkfs_path(&img, Some(64 << 20), &opts).unwrap();
    let out = run(Command::new("dumpe2fs").arg("-h").arg(&img));
    assert!(out.contains("inline_data"), "{what}: {out}");
    let dir = TempDir::new("inline-mnt");
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&dir.path));
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&dir.path));
    run(Command::new("umount").arg(&dir.path));
    // The kernel spills a directory's entries into system.data.
    let flat = not_inline(&img, &["wide", "a/f2", "a/f6", "b"]);
    assert!(flat.is_empty(), "{what}: not inline: {flat:?}");
    let want = t.join("wantf");
    run(Command::new("cp").arg("-a").arg(&src).arg(&want));
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    change(&fs, &want, &mut rng);
    fs.close().unwrap();
    check_image(
        &img,
        &want,
        what,
        true,
        &["a/f6", "b/deep", "b", "wide", "c/new", "b/two"],
    );
}

/// An inline file whose size claims more than its inline area, and an
/// inline directory whose entries run past it: errors, never a panic or
/// bytes from elsewhere.
#[test]
fn hostile_inline_inodes_are_corruption() {
    if !tools_present() {
        return;
    }
    let t = TempDir::new("inline-bad");
    let mut rng = Rng::new(0xBAD);
    let src = t.join("src");
    inline_tree(&src, &mut rng);
    let img = t.join("bad.img");
    mke2fs_inline(&src, &img, 4096, "64M");
    // debugfs recomputes the inode checksum after each change.
    for cmd in ["sif /a/f2 size 4000", "sif /b block[2] 0x00ff0000"] {
        run(Command::new("debugfs").args(["-w", "-R", cmd]).arg(&img));
    }
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let a = fs.lookup(ROOT_INO, b"a").unwrap();
    let f2 = fs.lookup(a, b"f2").unwrap();
    let mut buf = vec![0u8; 8192];
    let e = fs.read(f2, 0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::Corrupted { .. }), "read: {e}");
    let e = fs.write(f2, 0, b"x").unwrap_err();
    assert!(matches!(e, Error::Corrupted { .. }), "write: {e}");
    let e = fs.read_dir(fs.lookup(ROOT_INO, b"b").unwrap()).unwrap_err();
    assert!(matches!(e, Error::Corrupted { .. }), "read_dir: {e}");
    fs.close().unwrap();
}

/// Power cuts while folio moves inline inodes to blocks and makes small
/// new files inline: every state a
/// cut could leave (at each flush, and between flushes with random torn
/// subsets of the pending writes) recovers e2fsck clean, every fsync'd
/// file and name is there with its bytes, and no file ever shows bytes
/// other than its old inline data followed by its appended bytes or
/// zeros (never another block's contents).
#[test]
fn crashes_while_converting_inline_inodes_recover_clean() {
    use folio_blockdev::crash::{crash_overlay, CrashDevice, Event, Overlay};
    use std::sync::Arc;
    if !tools_present() {
        return;
    }
    let t = TempDir::new("inline-crash");
    let mut rng = Rng::new(0xC0);
    let src = t.join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let mut old: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..12 {
        // Tags 1..=12 so that bytes from elsewhere show.
        let v = vec![i as u8 + 1; 20 + 8 * i];
        fs::write(src.join(format!("d/f{i}")), &v).unwrap();
        old.insert(format!("f{i}"), v);
    }
    let img = t.join("base.img");
    mke2fs_inline(&src, &img, 1024, "8M");
    assert!(not_inline(&img, &["d/f0", "d/f11"]).is_empty());
    let base = fs::read(&img).unwrap();
    let dev = CrashDevice::new(base.clone());
    let fs = Filesystem::open(Arc::new(dev.clone()), OpenOptions::default()).unwrap();
    let d = fs.lookup(ROOT_INO, b"d").unwrap();
    // (event count once durable, name, content)
    let mut synced: Vec<(usize, String, Vec<u8>)> = Vec::new();
    let mut new: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..12usize {
        let name = format!("f{i}");
        let ino = fs.lookup(d, name.as_bytes()).unwrap();
        let extra = vec![i as u8 + 1; 50 + 300 * i];
        let size = old[&name].len() as u64;
        fs.write(ino, size, &extra).unwrap();
        let mut all = old[&name].clone();
        all.extend_from_slice(&extra);
        new.insert(name.clone(), all.clone());
        if i % 3 == 0 {
            fs.fsync(ino, false).unwrap();
            synced.push((dev.event_count(), name, all));
        }
        if i % 4 == 1 {
            // A name added to the (inline) directory, made durable.
            let n = format!("n{i}");
            // A small new file: inline from its first write.
            let c = fs.create(d, n.as_bytes(), 0o644, ME).unwrap();
            let small = vec![0x40 + i as u8; 10 + i];
            fs.write(c, 0, &small).unwrap();
            assert!(
                fs.get_flags(c).unwrap() & 0x1000_0000 != 0,
                "{n} is not inline"
            );
            fs.fsync(c, false).unwrap();
            fs.fsync(d, false).unwrap();
            synced.push((dev.event_count(), n.clone(), small.clone()));
            new.insert(n, small);
        }
    }
    fs.abandon();
    let events = dev.events();
    let flushes: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Flush))
        .map(|(i, _)| i)
        .collect();
    assert!(flushes.len() >= 6, "too few flushes: {}", flushes.len());
    let scratch = t.join("state.img");
    let mut durable = Arc::new(base);
    let mut prev = 0usize;
    let mut checked = 0;
    let check = |state: Overlay, upto: usize| -> Result<(), String> {
        let state = Arc::new(state);
        let fs = Filesystem::open(state.clone(), OpenOptions::default())
            .map_err(|e| format!("recovery: {e}"))?;
        let d = fs.lookup(ROOT_INO, b"d").map_err(|e| e.to_string())?;
        for (at, name, content) in &synced {
            if *at > upto {
                continue;
            }
            let ino = fs
                .lookup(d, name.as_bytes())
                .map_err(|e| format!("fsync'd {name} is gone: {e}"))?;
            let mut buf = vec![0u8; content.len() + 1];
            let n = fs.read(ino, 0, &mut buf).map_err(|e| e.to_string())?;
            if &buf[..n] != content.as_slice() {
                return Err(format!("fsync'd {name}: {n} bytes, not its content"));
            }
        }
        for e in fs.read_dir(d).map_err(|e| e.to_string())? {
            let name = String::from_utf8(e.name.clone()).unwrap();
            if name == "." || name == ".." {
                continue;
            }
            let mut buf = vec![0u8; 8192];
            let n = fs.read(e.ino, 0, &mut buf).map_err(|e| e.to_string())?;
            let got = &buf[..n];
            let was = old.get(&name).cloned().unwrap_or_default();
            let now = &new[&name];
            let ok = got.len() >= was.len()
                && got[..was.len()] == was[..]
                && got[was.len()..]
                    .iter()
                    .zip(&now[was.len().min(now.len())..])
                    .all(|(g, w)| *g == 0 || g == w)
                && got.len() <= now.len().max(was.len());
            if !ok {
                return Err(format!("{name}: {n} bytes it never held"));
            }
        }
        fs.close().map_err(|e| e.to_string())?;
        fs::write(&scratch, state.to_vec()).unwrap();
        e2fsck(&scratch)
    };
    let mut failed = Vec::new();
    for f in flushes.iter().copied().chain(std::iter::once(events.len())) {
        if f > prev {
            for _ in 0..4 {
                let cut = prev + 1 + rng.below((f - prev) as u64) as usize;
                let p = [10, 50, 90][rng.below(3) as usize];
                let mut kr = Rng::new(rng.next_u64());
                let state =
                    crash_overlay(&durable, &events[prev..cut], 512, |_, _| kr.below(100) < p);
                checked += 1;
                if let Err(e) = check(state, prev) {
                    failed.push(format!("cut at {cut} (durable {prev}, {p}%): {e}"));
                }
            }
        }
        if f == events.len() {
            break;
        }
        let mut img = durable.as_ref().clone();
        for ev in &events[prev..f] {
            folio_blockdev::crash::apply(&mut img, ev);
        }
        durable = Arc::new(img);
        prev = f + 1;
        checked += 1;
        if let Err(e) = check(Overlay::new(durable.clone()), prev) {
            failed.push(format!("flush {f}: {e}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {checked} states: {failed:?}",
        failed.len()
    );
    eprintln!("inline crash states checked: {checked}");
    assert!(checked > 20, "only {checked} states");
}

/// Writes and size changes inside an inline file's area are done in
/// place: 400 random ones (each within the 100 bytes `i_block` and
/// `system.data` hold), with reopens between, agree with a model, and
/// the file is still inline and e2fsck clean at the end.
#[test]
fn writes_within_the_inline_area_stay_inline() {
    if !tools_present() {
        return;
    }
    let t = TempDir::new("inline-inplace");
    let mut rng = Rng::new(0x1A);
    let src = t.join("src");
    fs::create_dir(&src).unwrap();
    let mut model = rng.bytes(100);
    fs::write(src.join("f"), &model).unwrap();
    let img = t.join("img");
    mke2fs_inline(&src, &img, 1024, "8M");
    assert!(not_inline(&img, &["f"]).is_empty());
    let mut fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let mut ino = fs.lookup(ROOT_INO, b"f").unwrap();
    for k in 0..400 {
        match rng.below(10) {
            0..=5 => {
                let off = rng.below(100) as usize;
                let len = 1 + rng.below((100 - off) as u64) as usize;
                let data = rng.bytes(len);
                assert_eq!(fs.write(ino, off as u64, &data).unwrap(), len, "op {k}");
                if model.len() < off + len {
                    model.resize(off + len, 0);
                }
                model[off..off + len].copy_from_slice(&data);
            }
            6..=7 => {
                let size = rng.below(101);
                set_size(&fs, ino, size);
                model.resize(size as usize, 0);
            }
            8 => {
                fs.close().unwrap();
                fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
                ino = fs.lookup(ROOT_INO, b"f").unwrap();
            }
            _ => {
                let mut buf = vec![0u8; 200];
                let n = fs.read(ino, 0, &mut buf).unwrap();
                assert_eq!(&buf[..n], &model[..], "op {k}: read");
            }
        }
        assert_eq!(
            fs.stat(ino).unwrap().size,
            model.len() as u64,
            "op {k}: size"
        );
    }
    fs.close().unwrap();
    e2fsck(&img).unwrap();
    assert!(
        not_inline(&img, &["f"]).is_empty(),
        "the file left its inline area"
    );
    let fs = open_read_only(&img, false);
    let mut buf = vec![0u8; 200];
    let n = fs.read(ino, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], &model[..], "after reopening");
}
