//! fs-verity (issue 18). This machine's kernel has no CONFIG_FS_VERITY,
//! so the oracle for the tree is fsverity-utils: the digest folio stores
//! and checks for a file must be the one `fsverity digest` computes from
//! the same bytes. folio enables verity (library and CLI), reads verified
//! data back, refuses changes with EPERM, and a flipped byte in a data or
//! tree block is EIO; e2fsck calls the images clean and the kernel's
//! read-only mount sees the same names, sizes and flags.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use folio_ext4::{Filesystem, OpenOptions, Owner, SetAttr, ROOT_INO};

const ME: Owner = Owner { uid: 0, gid: 0 };

fn tool(name: &str) -> bool {
    ["/sbin", "/usr/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

fn prerequisites() -> bool {
    let ok = tool("fsverity") && tool("mkfs.ext4") && tool("e2fsck");
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true but fsverity (fsverity-utils) or e2fsprogs is missing"
        );
        eprintln!("SKIP: the verity test needs fsverity-utils and e2fsprogs");
    }
    ok
}

/// `fsverity digest` of `data` with `bs`-byte tree blocks.
fn fsverity_digest(dir: &Path, data: &[u8], bs: u32) -> String {
    let f = dir.join("host-copy");
    std::fs::write(&f, data).unwrap();
    let o = Command::new("fsverity")
        .args(["digest", "--compact", &format!("--block-size={bs}")])
        .arg(&f)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn flip_byte(img: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

fn check_case(dir: &Path, tag: &str, bs: u32, mkfs: &dyn Fn(&Path)) {
    let img = dir.join(format!("{tag}.img"));
    mkfs(&img);
    let b = bs as usize;
    // Sizes around the tree's shapes: empty, one block, one block and a
    // byte (one level), past one level block (two), and on 1 KiB blocks
    // past two (three levels: 3,000 blocks / 32 hashes a block).
    let sizes = [
        0,
        5,
        b,
        b + 1,
        1_000_000,
        (b / 32 + 1) * b + 7,
        3_000 * b + 3,
    ];
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("v{i}"), pattern(n, (i as u64 + 1) * 0x9E37_79B9)))
        .collect();
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    for (i, (name, data)) in files.iter().enumerate() {
        let ino = fs.create(ROOT_INO, name.as_bytes(), 0o644, ME).unwrap();
        fs.write(ino, 0, data).unwrap();
        if i % 2 == 0 {
            // Half straight after the write, half from the device.
            fs.sync().unwrap();
            fs.drop_caches();
        }
        let d = fs.enable_verity(ino).unwrap();
        assert_eq!(
            hex(&d),
            fsverity_digest(dir, data, bs),
            "{tag} {name}: digest"
        );
        assert_eq!(fs.verity_digest(ino).unwrap(), d);
        assert_eq!(fs.enable_verity(ino).unwrap_err().errno(), libc::EEXIST);
    }
    let plain = fs.create(ROOT_INO, b"plain", 0o644, ME).unwrap();
    fs.write(plain, 0, b"not verity").unwrap();
    assert_eq!(fs.verity_digest(plain).unwrap_err().errno(), libc::ENODATA);
    // Immutable data; names and attributes still change.
    let v4 = fs.lookup(ROOT_INO, b"v4").unwrap();
    assert_eq!(fs.write(v4, 0, b"x").unwrap_err().errno(), libc::EPERM);
    assert_eq!(
        fs.write(v4, 1 << 20, b"x").unwrap_err().errno(),
        libc::EPERM
    );
    let cut = SetAttr {
        size: Some(10),
        ..Default::default()
    };
    assert_eq!(fs.setattr(v4, &cut).unwrap_err().errno(), libc::EPERM);
    assert_eq!(
        fs.fallocate(v4, 0, 0, 8192).unwrap_err().errno(),
        libc::EPERM
    );
    let chmod = SetAttr {
        mode: Some(0o444),
        ..Default::default()
    };
    fs.setattr(v4, &chmod).unwrap();
    fs.rename(ROOT_INO, b"v1", ROOT_INO, b"v1-moved", Default::default())
        .unwrap();
    fs.close().unwrap();
    e2fsck_clean(&img);

    // Reopened: every byte reads back verified, and the CLI measures
    // what fsverity-utils computes.
    let names = |n: &str| {
        if n == "v1" {
            "v1-moved".to_string()
        } else {
            n.to_string()
        }
    };
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    for (name, data) in &files {
        let ino = fs.lookup(ROOT_INO, names(name).as_bytes()).unwrap();
        let mut got = vec![0u8; data.len() + 100];
        let n = fs.read(ino, 0, &mut got).unwrap();
        assert!(
            n == data.len() && got[..n] == data[..],
            "{tag} {name}: content"
        );
        assert_eq!(fs.stat(ino).unwrap().size, data.len() as u64);
    }
    // Where the largest file's blocks are, for the tampering below.
    let big = fs.lookup(ROOT_INO, b"v6").unwrap();
    let runs = fs.block_runs(big).unwrap();
    let pblk_of = |lblk: u64| {
        let r = runs
            .iter()
            .find(|r| r.lblk <= lblk && lblk < r.lblk + r.len)
            .unwrap();
        r.pblk + (lblk - r.lblk)
    };
    let data_blocks = (files[6].1.len() as u64).div_ceil(u64::from(bs));
    let meta = (files[6].1.len() as u64).next_multiple_of(65536) / u64::from(bs);
    let tree_leaf0 = {
        // The last tree level (level 0) starts after the levels above it.
        let lv = folio_ext4::verity::level_blocks(files[6].1.len() as u64, u64::from(bs));
        meta + lv[1..].iter().sum::<u64>()
    };
    let (data_victim, tree_victim) = (pblk_of(5), pblk_of(tree_leaf0 + 1));
    fs.close().unwrap();
    let measured = ok(&[&"verity", &"measure", &img, &"/v4", &"/v6"]);
    let want = format!(
        "sha256:{} /v4\nsha256:{} /v6\n",
        fsverity_digest(dir, &files[4].1, bs),
        fsverity_digest(dir, &files[6].1, bs)
    );
    assert_eq!(measured, want, "{tag}: folio verity measure");

    // The kernel (no CONFIG_FS_VERITY here: mounts read-only, cannot read
    // verity data) sees the same names, sizes and flags.
    if can_mount() && Path::new("/dev/loop-control").exists() {
        let mnt = dir.join(format!("{tag}.mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        assert!(Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap()
            .success());
        let mut seen = Vec::new();
        for (name, data) in &files {
            let m = std::fs::metadata(mnt.join(names(name))).unwrap();
            seen.push((m.len() == data.len() as u64, name.clone()));
        }
        assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
        assert!(
            seen.iter().all(|(same, _)| *same),
            "{tag}: kernel sizes {seen:?}"
        );
    }
    // debugfs reads the flag as e2fsprogs knows it (the kernel here cannot
    // open verity files, so lsattr cannot ask it).
    let o = Command::new("debugfs")
        .args(["-R", "stat /v4"])
        .arg(&img)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let flags = out
        .split("Flags: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|h| u32::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    assert_ne!(
        flags & folio_ext4::verity::FL_VERITY,
        0,
        "{tag}: debugfs stat: {out}"
    );

    // A flipped byte in a data block, then in a level-0 tree block: EIO
    // for the blocks it covers, the rest still reads.
    flip_byte(&img, data_victim * u64::from(bs) + 17);
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; b];
    let e = fs.read(big, 5 * u64::from(bs), &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{tag}: tampered data block: {e}");
    let e = fs.read(big, 0, &mut vec![0u8; 8 * b]).unwrap_err();
    assert_eq!(
        e.errno(),
        libc::EIO,
        "{tag}: a read over the tampered block"
    );
    fs.read(big, 6 * u64::from(bs), &mut buf).unwrap();
    fs.close().unwrap();
    flip_byte(&img, data_victim * u64::from(bs) + 17);
    flip_byte(&img, tree_victim * u64::from(bs) + 3);
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let per = u64::from(bs) / 32;
    let covered = per + 1; // a data block the second level-0 block covers
    assert!(covered < data_blocks);
    let e = fs.read(big, covered * u64::from(bs), &mut buf).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{tag}: tampered tree block");
    fs.read(big, 0, &mut buf).unwrap();
    assert_eq!(buf[..], files[6].1[..b]);
    fs.abandon();
    flip_byte(&img, tree_victim * u64::from(bs) + 3);
    e2fsck_clean(&img);
    if tag == "mke2fs-4096" && can_mount() {
        through_the_mount(dir, &img, &files[4].1);
    }
}

/// fsverity-utils through a folio mount: `fsverity enable` and
/// `fsverity measure` reach folio as FUSE ioctls.
fn through_the_mount(dir: &Path, img: &Path, v4: &[u8]) {
    let mnt = dir.join("fuse.mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    ok(&[&"mount", &img, &mnt]);
    let data = pattern(300_000, 77);
    let f = mnt.join("by-mount");
    std::fs::write(&f, &data).unwrap();
    let fsverity = |args: &[&str]| {
        Command::new("fsverity")
            .args(args)
            .arg(&f)
            .output()
            .unwrap()
    };
    let enable = fsverity(&["enable", "--block-size=4096"]);
    let measure = fsverity(&["measure"]);
    let again = fsverity(&["enable", "--block-size=4096"]);
    let salted = Command::new("fsverity")
        .args(["enable", "--salt=ab"])
        .arg(mnt.join("plain"))
        .output()
        .unwrap();
    let reread = std::fs::read(mnt.join("v4")).map_err(|e| e.raw_os_error());
    let for_write = std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .map_err(|e| e.raw_os_error());
    ok(&[&"umount", &mnt]);
    assert!(
        enable.status.success(),
        "fsverity enable: {}",
        String::from_utf8_lossy(&enable.stderr)
    );
    let want = fsverity_digest(dir, &data, 4096);
    let got = String::from_utf8_lossy(&measure.stdout);
    assert!(
        got.starts_with(&format!("sha256:{want} ")),
        "fsverity measure through the mount: {got} {}",
        String::from_utf8_lossy(&measure.stderr)
    );
    assert!(!again.status.success(), "enabling twice");
    assert!(!salted.status.success(), "a salt folio does not build");
    assert_eq!(
        reread.as_deref().ok(),
        Some(v4),
        "a verity file read through the mount"
    );
    assert_eq!(for_write.err(), Some(Some(libc::EPERM)), "open for writing");
    e2fsck_clean(img);
    let fs = Filesystem::open_path(img, OpenOptions::default()).unwrap();
    let ino = fs.lookup(ROOT_INO, b"by-mount").unwrap();
    assert_eq!(hex(&fs.verity_digest(ino).unwrap()), want);
    fs.close().unwrap();
}

#[test]
fn verity_files_are_made_checked_and_measured_as_fsverity_does() {
    if !prerequisites() {
        return;
    }
    let dir = scratch("verity", "tree");
    for bs in [4096u32, 1024] {
        let tag = format!("mke2fs-{bs}");
        check_case(&dir, &tag, bs, &|img| {
            let o = Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "verity", "-b", &bs.to_string()])
                .arg(img)
                .arg("64M")
                .output()
                .unwrap();
            assert!(o.status.success());
        });
    }
    check_case(&dir, "folio-mkfs", 4096, &|img| {
        ok(&[
            &"mkfs", &"-q", &"-b", &"4096", &"-O", &"verity", &img, &"64M",
        ]);
    });
    // Without the feature: refused, as the kernel's EOPNOTSUPP.
    let img = dir.join("plain.img");
    ok(&[&"mkfs", &"-q", &img, &"16M"]);
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let f = fs.create(ROOT_INO, b"f", 0o644, ME).unwrap();
    fs.write(f, 0, b"data").unwrap();
    assert_eq!(fs.enable_verity(f).unwrap_err().errno(), libc::EOPNOTSUPP);
    fs.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
