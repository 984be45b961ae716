//! The `folio` command end to end: mkfs, mkdir, put, ls, cat, stat, get,
//! rm, check; exit codes and error messages.

mod common;
use common::{folio, ok, scratch};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(tag: &str) -> PathBuf {
    scratch("cli", tag)
}

fn have_e2fsck() -> bool {
    ["/sbin/e2fsck", "/usr/sbin/e2fsck", "/usr/bin/e2fsck"]
        .iter()
        .any(|p| Path::new(p).exists())
}

#[test]
fn commands_work_end_to_end() {
    let dir = tmp("e2e");
    let img = dir.join("disk.img");
    let out = ok(&[&"mkfs", &img, &"--size", &"32M", &"--label", &"test"]);
    assert!(
        out.contains("Creating filesystem with 32768 1k blocks"),
        "{out}"
    );
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(src.join("sub/b.bin"), vec![9u8; 200_000]).unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("ln")).unwrap();
    ok(&[&"mkdir", &img, &"-p", &"/x/y/z"]);
    ok(&[&"put", &img, &src, &"/x/y"]);
    let ls = ok(&[&"ls", &img, &"/x/y/src"]);
    assert_eq!(ls, "a.txt\nln\nsub\n");
    let long = ok(&[&"ls", &img, &"-l", &"/x/y/src"]);
    assert!(long.contains("ln -> a.txt"), "{long}");
    assert_eq!(ok(&[&"cat", &img, &"/x/y/src/a.txt"]), "alpha\n");
    assert_eq!(
        ok(&[&"cat", &img, &"/x/y/src/ln"]),
        "alpha\n",
        "cat follows symlinks"
    );
    let st = ok(&[&"stat", &img, &"/x/y/src/sub/b.bin"]);
    assert!(
        st.contains("Size: 200000") && st.contains("regular file"),
        "{st}"
    );
    let info = ok(&[&"info", &img]);
    assert!(info.contains("Filesystem volume name:   test"), "{info}");
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    ok(&[&"get", &img, &"/x/y/src", &out]);
    assert_eq!(
        std::fs::read(out.join("src/sub/b.bin")).unwrap(),
        vec![9u8; 200_000]
    );
    assert_eq!(
        std::fs::read_link(out.join("src/ln")).unwrap(),
        Path::new("a.txt")
    );
    ok(&[&"check", &img]);

    // Errors: clear message, exit status 1, nothing changed.
    let o = folio(&[&"rm", &img, &"/x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a directory"));
    let o = folio(&[&"cat", &img, &"/nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nope: no such file or directory"));
    let o = folio(&[&"mkfs", &dir.join("bad.img"), &"--size", &"12Q"]);
    assert_eq!(o.status.code(), Some(1));
    let o = folio(&[&"ls"]);
    assert_eq!(o.status.code(), Some(2), "usage errors exit 2");

    ok(&[&"rm", &img, &"-r", &"/x"]);
    assert_eq!(ok(&[&"ls", &img, &"/"]), "lost+found\n");
    if have_e2fsck() {
        let s = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stdout));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_makes_a_clean_image() {
    let dir = tmp("demo");
    let img = dir.join("demo.img");
    let out = ok(&[&"demo", &img]);
    assert!(
        out.contains("hello.txt") && out.contains("sparse.bin"),
        "{out}"
    );
    assert_eq!(
        ok(&[&"cat", &img, &"/hello.txt"]),
        "Hello from folio, a userspace ext4.\n"
    );
    if have_e2fsck() {
        let s = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stdout));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn io_commands_shape_output_like_xfs_io() {
    let dir = tmp("io");
    let img = dir.join("io.img");
    ok(&[&"mkfs", &img, &"-q", &"--size", &"32M", &"-b", &"4096"]);
    let out = ok(&[
        &"io",
        &img,
        &"/f",
        &"-f",
        &"-c",
        &"pwrite -S 0xab 0 64k",
        &"-c",
        &"fpunch 4k 8k",
        &"-c",
        &"falloc -k 128k 16k",
        &"-c",
        &"seek -d 4096",
        &"-c",
        &"seek -h 0",
        &"-c",
        &"pread -v 0 16",
        &"-c",
        &"fiemap -v",
        &"-c",
        &"fzero 0 100",
        &"-c",
        &"pread 0 100",
        &"-c",
        &"finsert 0 4k",
        &"-c",
        &"fcollapse 0 4k",
        &"-c",
        &"truncate 10000",
        &"-c",
        &"fsync",
        &"-c",
        &"stat",
    ]);
    assert!(out.contains("wrote 65536/65536 bytes at offset 0"), "{out}");
    assert!(
        out.contains("DATA\t12288") && out.contains("HOLE\t4096"),
        "{out}"
    );
    assert!(out.contains("00000000:  ab ab ab ab"), "{out}");
    assert!(
        out.contains("hole") && out.contains("0x801"),
        "unwritten last extent flagged: {out}"
    );
    assert!(out.contains("stat.size = 10000"), "{out}");
    let o = folio(&[&"io", &img, &"/f", &"-c", &"fcollapse 100 4k"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("fallocate: Invalid argument"));
    let got = folio(&[&"cat", &img, &"/f"]).stdout;
    assert_eq!(got.len(), 10000);
    assert!(got[..100].iter().all(|&b| b == 0) && got[100..4096].iter().all(|&b| b == 0xab));
    assert!(
        got[4096..].iter().all(|&b| b == 0),
        "the hole runs to the truncated end"
    );
    if have_e2fsck() {
        let s = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stdout));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
