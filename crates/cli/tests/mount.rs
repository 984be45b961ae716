//! `folio mount` end to end: a POSIX behaviour suite of our own runs,
//! unchanged, on a folio FUSE mount and on a kernel ext4 mount of an
//! identical image; both images are e2fsck clean afterwards. Needs root,
//! /dev/fuse and loop devices: skipped outside CI without them.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use folio_cli::hostxattr;

fn ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

fn prerequisites() -> bool {
    let root = fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let ok = root && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists();
    if !ok {
        assert!(
            !ci(),
            "CI=true but root, /dev/fuse or loop devices are missing"
        );
        eprintln!("SKIP: mount tests need root, /dev/fuse and loop devices");
    }
    ok
}

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("folio-mt-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).unwrap();
    p
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> i32 {
    let (ca, cb) = (cpath(a), cpath(b));
    // SAFETY: both paths are NUL-terminated strings alive for the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// The behaviour suite. Returns the list of deviations (empty = pass).
/// A POSIX ACL in the VFS xattr encoding (entries in canonical order).
fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        let id = if tag == 2 || tag == 8 { id } else { u32::MAX };
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The POSIX ACL rules a program sees (issue 15 point 3): an ACL equal
/// to the mode is only the mode; chmod moves the ACL; default ACLs mask
/// new inodes instead of the umask and pass on to subdirectories, also
/// under setgid directories; setting an ACL clears setgid for a caller
/// outside the file's group.
fn acl_rules(d: &Path, check: &mut impl FnMut(bool, &str)) {
    const ACCESS: &[u8] = b"system.posix_acl_access";
    const DEFAULT: &[u8] = b"system.posix_acl_default";
    let mode = |p: &Path| fs::symlink_metadata(p).map_or(0, |m| m.permissions().mode() & 0o7777);
    let sh = |cmd: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .is_ok_and(|s| s.success())
    };
    // chacl u::r--,g::rwx,o::rw-: nothing but the mode.
    let f = d.join("acl_equiv");
    fs::write(&f, b"x").unwrap();
    check(
        hostxattr::set(
            &f,
            ACCESS,
            &acl_bytes(&[(1, 4, 0), (4, 7, 0), (0x20, 6, 0)]),
        )
        .is_ok(),
        "set an ACL equal to a mode",
    );
    check(mode(&f) == 0o476, "an ACL equal to a mode sets that mode");
    check(
        hostxattr::get(&f, ACCESS).is_err(),
        "an ACL equal to a mode is not stored",
    );
    // chmod of a file with an ACL updates its owner, mask and other.
    let f = d.join("acl_chmod");
    fs::write(&f, b"x").unwrap();
    let named = [
        (1, 6, 0),
        (2, 4, 1234),
        (4, 0, 0),
        (0x10, 4, 0),
        (0x20, 0, 0),
    ];
    check(
        hostxattr::set(&f, ACCESS, &acl_bytes(&named)).is_ok(),
        "set an ACL with a named user",
    );
    fs::set_permissions(&f, fs::Permissions::from_mode(0o751)).unwrap();
    let want = acl_bytes(&[
        (1, 7, 0),
        (2, 4, 1234),
        (4, 0, 0),
        (0x10, 5, 0),
        (0x20, 1, 0),
    ]);
    check(
        hostxattr::get(&f, ACCESS).ok() == Some(want),
        "chmod updates the ACL's owner, mask and other entries",
    );
    // A default ACL masks new files; the umask does not apply.
    let dd = d.join("acl_default");
    fs::create_dir(&dd).unwrap();
    let default = acl_bytes(&[(1, 5, 0), (4, 4, 0), (0x20, 0, 0)]);
    check(
        hostxattr::set(&dd, DEFAULT, &default).is_ok(),
        "set a default ACL",
    );
    let (f0, f1) = (dd.join("f0"), dd.join("f1"));
    check(
        sh(&format!(
            "umask 0; : > {}; umask 722; : > {}",
            f0.display(),
            f1.display()
        )),
        "create under a default ACL",
    );
    check(
        mode(&f0) == 0o440,
        "a default ACL masks a new file (umask 0)",
    );
    check(
        mode(&f1) == 0o440,
        "a default ACL masks a new file (umask 722 ignored)",
    );
    // mkdir under a default ACL: masked, and the default passes on.
    let dd = d.join("acl_default_dir");
    fs::create_dir(&dd).unwrap();
    let default = acl_bytes(&[(1, 7, 0), (4, 7, 0), (0x20, 0, 0)]);
    check(
        hostxattr::set(&dd, DEFAULT, &default).is_ok(),
        "set a default ACL (rwx)",
    );
    let sub = dd.join("sub");
    check(
        sh(&format!("umask 022; mkdir {}", sub.display())),
        "mkdir under a default ACL",
    );
    check(
        mode(&sub) == 0o770,
        "a subdirectory gets group rwx and other none",
    );
    check(
        hostxattr::get(&sub, DEFAULT).ok() == Some(default.clone()),
        "a subdirectory inherits the default ACL",
    );
    check(
        hostxattr::get(&sub, ACCESS).is_err(),
        "an inherited ACL equal to the mode is not stored",
    );
    // Under a setgid directory with a default ACL.
    let dd = d.join("acl_setgid");
    fs::create_dir(&dd).unwrap();
    fs::set_permissions(&dd, fs::Permissions::from_mode(0o2775)).unwrap();
    let default = acl_bytes(&[(1, 7, 0), (4, 7, 0), (0x20, 5, 0)]);
    check(
        hostxattr::set(&dd, DEFAULT, &default).is_ok(),
        "set a default ACL (setgid dir)",
    );
    let sub = dd.join("sub");
    check(
        sh(&format!("umask 022; mkdir {}", sub.display())),
        "mkdir under setgid",
    );
    check(
        mode(&sub) == 0o2775,
        "a setgid directory's default ACL gives drwxrwsr-x",
    );
    // A caller outside the file's group setting an ACL loses setgid.
    let f = d.join("acl_sgid");
    fs::write(&f, b"x").unwrap();
    std::os::unix::fs::chown(&f, Some(1234), Some(100)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o2755)).unwrap();
    let acl = acl_bytes(&[(1, 7, 0), (4, 7, 0), (0x20, 7, 0)]);
    let path = cpath(&f);
    let name = std::ffi::CString::new(ACCESS).unwrap();
    let set_as_user = {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new("true");
        c.uid(1234).gid(101);
        // SAFETY: setxattr(2) is async-signal-safe; the buffers outlive
        // the spawn, and the closure allocates nothing.
        unsafe {
            c.pre_exec(move || {
                let r = libc::setxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    acl.as_ptr().cast(),
                    acl.len(),
                    0,
                );
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
        c.status().is_ok_and(|s| s.success())
    };
    check(set_as_user, "the owner sets an ACL on its setgid file");
    check(
        mode(&f) == 0o777,
        "setting an ACL clears setgid for a caller outside the file's group",
    );
    // Inside a user namespace (uid 1000 mapped to root there), the owner
    // sets an ACL with a named entry and a mask that restricts it, and
    // reads back its effective rights (getfacl from the acl package,
    // which scripts/test.sh installs).
    let f = d.join("acl_userns");
    fs::write(&f, b"x").unwrap();
    std::os::unix::fs::chown(&f, Some(1000), Some(1000)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    let p = f.display();
    let out = Command::new("setpriv")
        .args(["--reuid", "1000", "--regid", "1000", "--clear-groups"])
        .args([
            "unshare",
            "--user",
            "--map-user=0",
            "--map-group=0",
            "sh",
            "-c",
        ])
        .arg(format!("setfacl -m u:0:rwx,m::r-- {p} && getfacl -n {p}"))
        .output();
    let shown = out.map_or(String::new(), |o| {
        String::from_utf8_lossy(&o.stdout).into_owned()
    });
    check(
        shown.contains("user:0:rwx\t#effective:r--"),
        "in a user namespace the owner sets an ACL and the mask restricts its named entry",
    );
}

/// Issue 15 points 1 and 2: the owner (not root) of a fifo or device
/// node with mode 06555 changing its group loses both bits; a directory
/// stream read to its end, then 1,000 creates, then `rewinddir`, lists
/// them all.
fn special_chown_and_rewinddir(d: &Path, check: &mut impl FnMut(bool, &str)) {
    use std::os::unix::process::CommandExt;
    let mode = |p: &Path| fs::symlink_metadata(p).map_or(0, |m| m.permissions().mode() & 0o7777);
    for (name, node) in [("sp_fifo", "p"), ("sp_chr", "c")] {
        let p = d.join(name);
        let made = Command::new("mknod")
            .arg(&p)
            .arg(node)
            .args(if node == "c" {
                &["1", "3"][..]
            } else {
                &[][..]
            })
            .status()
            .is_ok_and(|s| s.success());
        check(made, "mknod");
        std::os::unix::fs::lchown(&p, Some(1234), Some(1234)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o6555)).unwrap();
        let chgrp = Command::new("chgrp")
            .arg("-h")
            .arg("1234")
            .arg(&p)
            .uid(1234)
            .gid(1234)
            .status()
            .is_ok_and(|s| s.success());
        check(chgrp, "the owner changes a special file's group");
        check(
            mode(&p) == 0o555,
            &format!("the owner's chgrp of a {node} node drops setuid and setgid"),
        );
    }
    let dir = d.join("rewind");
    fs::create_dir(&dir).unwrap();
    let c = cpath(&dir);
    // SAFETY: a NUL-terminated path; the stream is used by this thread
    // only and closed below.
    let stream = unsafe { libc::opendir(c.as_ptr()) };
    check(!stream.is_null(), "opendir");
    if stream.is_null() {
        return;
    }
    let count = |s: *mut libc::DIR| {
        let mut n = 0;
        // SAFETY: `s` is an open stream; readdir's entries are not kept.
        while !unsafe { libc::readdir(s) }.is_null() {
            n += 1;
        }
        n
    };
    let before = count(stream);
    for i in 0..1000 {
        fs::write(dir.join(format!("f{i}")), b"").unwrap();
    }
    // SAFETY: the stream is open.
    unsafe { libc::rewinddir(stream) };
    let after = count(stream);
    // SAFETY: closed once.
    unsafe { libc::closedir(stream) };
    check(
        (before, after) == (2, 1002),
        "rewinddir shows the entries created since the stream was opened",
    );
}

/// chattr/lsattr (issue 15 point 10): immutable and append-only files and
/// directories refuse what ext4 refuses, with EPERM.
fn inode_flag_rules(d: &Path, check: &mut impl FnMut(bool, &str)) {
    use std::io::Write;
    let tool = |t: &str, args: &[&std::ffi::OsStr]| {
        Command::new(t)
            .args(args)
            .output()
            .map_or((false, String::new()), |o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                )
            })
    };
    let attr = |p: &Path| {
        let (ok, out) = tool("lsattr", &["-d".as_ref(), p.as_os_str()]);
        if ok {
            out.split_whitespace().next().unwrap_or("").to_string()
        } else {
            String::new()
        }
    };
    let chattr = |flag: &str, p: &Path| tool("chattr", &[flag.as_ref(), p.as_os_str()]).0;
    let eperm = |r: std::io::Result<()>| r.is_err_and(|e| e.raw_os_error() == Some(libc::EPERM));
    let f = d.join("immutable");
    fs::write(&f, b"keep").unwrap();
    check(chattr("+i", &f), "chattr +i");
    check(attr(&f).contains('i'), "lsattr shows i");
    check(
        eperm(fs::OpenOptions::new().write(true).open(&f).map(drop)),
        "an immutable file refuses an open for writing",
    );
    check(
        eperm(fs::remove_file(&f)),
        "an immutable file refuses unlink",
    );
    check(
        eperm(fs::rename(&f, d.join("moved"))),
        "an immutable file refuses rename",
    );
    check(
        eperm(fs::hard_link(&f, d.join("linked"))),
        "an immutable file refuses link",
    );
    check(
        eperm(fs::set_permissions(&f, fs::Permissions::from_mode(0o600))),
        "an immutable file refuses chmod",
    );
    check(
        eperm(hostxattr::set(&f, b"user.x", b"1")),
        "an immutable file refuses setxattr",
    );
    check(chattr("-i", &f), "chattr -i");
    check(!attr(&f).contains('i'), "lsattr no longer shows i");
    check(fs::remove_file(&f).is_ok(), "unlink once mutable again");
    let f = d.join("append");
    fs::write(&f, b"head").unwrap();
    check(chattr("+a", &f), "chattr +a");
    check(attr(&f).contains('a'), "lsattr shows a");
    check(
        eperm(fs::OpenOptions::new().write(true).open(&f).map(drop)),
        "an append-only file refuses an open for writing without O_APPEND",
    );
    let appended = fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .and_then(|mut h| h.write_all(b"tail"));
    check(appended.is_ok(), "an append-only file takes appends");
    check(
        eperm(
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&f)
                .map(drop),
        ),
        "an append-only file refuses O_TRUNC",
    );
    check(
        eperm(fs::remove_file(&f)),
        "an append-only file refuses unlink",
    );
    check(chattr("-a", &f), "chattr -a");
    check(
        fs::read(&f).ok().as_deref() == Some(&b"headtail"[..]),
        "appended bytes kept",
    );
    let dd = d.join("append_dir");
    fs::create_dir(&dd).unwrap();
    fs::write(dd.join("old"), b"").unwrap();
    check(chattr("+a", &dd), "chattr +a on a directory");
    check(
        fs::write(dd.join("new"), b"").is_ok(),
        "an append-only directory takes new entries",
    );
    check(
        eperm(fs::remove_file(dd.join("old"))),
        "an append-only directory keeps its entries",
    );
    check(chattr("-a", &dd), "chattr -a on a directory");
    check(chattr("+i", &dd), "chattr +i on a directory");
    check(
        eperm(fs::write(dd.join("newer"), b"").map(drop)),
        "an immutable directory refuses new entries",
    );
    check(chattr("-i", &dd), "chattr -i on a directory");
}

fn posix_suite(root: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    let d = root.join("suite");
    fs::create_dir(&d).unwrap();
    // Files: create, exclusive create, write, read back.
    let f = d.join("file");
    fs::write(&f, b"hello world").unwrap();
    check(
        fs::read(&f).unwrap() == b"hello world",
        "read back what was written",
    );
    check(
        errno_of(fs::File::options().write(true).create_new(true).open(&f)) == Some(libc::EEXIST),
        "O_EXCL on existing is EEXIST",
    );
    // Long names.
    let long = d.join("n".repeat(256));
    check(
        errno_of(fs::write(&long, b"x")) == Some(libc::ENAMETOOLONG),
        "256-byte name is ENAMETOOLONG",
    );
    check(
        fs::read_dir(&d).unwrap().count() == 1,
        "a failed long-name create changes nothing",
    );
    let ok255 = d.join("m".repeat(255));
    check(fs::write(&ok255, b"x").is_ok(), "255-byte name works");
    // Directories.
    fs::create_dir(d.join("sub")).unwrap();
    fs::write(d.join("sub/inner"), b"i").unwrap();
    check(
        errno_of(fs::remove_dir(d.join("sub"))) == Some(libc::ENOTEMPTY),
        "rmdir non-empty is ENOTEMPTY",
    );
    check(
        errno_of(fs::remove_file(d.join("sub"))) == Some(libc::EISDIR),
        "unlink of a directory is EISDIR",
    );
    check(
        errno_of(fs::remove_dir(&f)) == Some(libc::ENOTDIR),
        "rmdir of a file is ENOTDIR",
    );
    check(
        fs::metadata(&d).unwrap().nlink() == 3,
        "directory link count counts subdirectories",
    );
    // Rename: over a file, NOREPLACE, EXCHANGE, directory over non-empty.
    fs::write(d.join("a"), b"A").unwrap();
    fs::write(d.join("b"), b"B").unwrap();
    fs::rename(d.join("a"), d.join("b")).unwrap();
    check(
        fs::read(d.join("b")).unwrap() == b"A" && !d.join("a").exists(),
        "rename replaces the target",
    );
    fs::write(d.join("c"), b"C").unwrap();
    check(
        renameat2(&d.join("c"), &d.join("b"), libc::RENAME_NOREPLACE) == libc::EEXIST,
        "RENAME_NOREPLACE is EEXIST",
    );
    check(
        renameat2(&d.join("c"), &d.join("b"), libc::RENAME_EXCHANGE) == 0,
        "RENAME_EXCHANGE works",
    );
    check(
        fs::read(d.join("b")).unwrap() == b"C" && fs::read(d.join("c")).unwrap() == b"A",
        "RENAME_EXCHANGE swaps",
    );
    // RENAME_WHITEOUT (overlayfs's upper directory): the source name is
    // left as a whiteout, a character device 0:0 of mode 0.
    fs::write(d.join("wsrc"), b"W").unwrap();
    check(
        renameat2(&d.join("wsrc"), &d.join("wdst"), libc::RENAME_WHITEOUT) == 0,
        "RENAME_WHITEOUT works",
    );
    {
        use std::os::unix::fs::MetadataExt;
        let w = fs::symlink_metadata(d.join("wsrc"));
        check(
            w.is_ok_and(|m| {
                m.file_type().is_char_device() && m.rdev() == 0 && m.mode() & 0o7777 == 0
            }) && fs::read(d.join("wdst")).is_ok_and(|b| b == b"W"),
            "RENAME_WHITEOUT leaves a 0:0 character device",
        );
        check(
            renameat2(
                &d.join("wdst"),
                &d.join("b"),
                libc::RENAME_WHITEOUT | libc::RENAME_EXCHANGE,
            ) == libc::EINVAL,
            "RENAME_WHITEOUT with RENAME_EXCHANGE is EINVAL",
        );
    }
    fs::create_dir(d.join("empty")).unwrap();
    check(
        errno_of(fs::rename(d.join("empty"), d.join("sub"))) == Some(libc::ENOTEMPTY),
        "dir over non-empty dir is ENOTEMPTY",
    );
    check(
        errno_of(fs::rename(d.join("sub"), d.join("sub/inner2"))) == Some(libc::EINVAL),
        "dir into itself is EINVAL",
    );
    // Links.
    fs::hard_link(d.join("b"), d.join("b2")).unwrap();
    check(
        fs::metadata(d.join("b")).unwrap().nlink() == 2,
        "hard link counts",
    );
    std::os::unix::fs::symlink("b", d.join("sym")).unwrap();
    check(
        fs::read_link(d.join("sym")).unwrap() == Path::new("b"),
        "readlink",
    );
    check(fs::read(d.join("sym")).unwrap() == b"C", "symlink resolves");
    let longt = "t".repeat(300);
    std::os::unix::fs::symlink(&longt, d.join("longsym")).unwrap();
    check(
        fs::read_link(d.join("longsym")).unwrap() == Path::new(&longt),
        "long symlink target",
    );
    // Sizes: truncate down then up leaves zeros.
    let t = d.join("trunc");
    fs::write(&t, vec![b'x'; 5000]).unwrap();
    let h = fs::File::options().write(true).open(&t).unwrap();
    h.set_len(10).unwrap();
    h.set_len(5000).unwrap();
    drop(h);
    let data = fs::read(&t).unwrap();
    check(
        data.len() == 5000 && data[10..].iter().all(|&b| b == 0) && &data[..10] == b"xxxxxxxxxx",
        "truncate down/up zeroes the tail",
    );
    let h = fs::File::options().write(true).open(&t).unwrap();
    check(
        errno_of(h.set_len(1u64 << 50)) == Some(libc::EFBIG),
        "truncate past the maximum file size is EFBIG",
    );
    drop(h);
    // Sparse files and SEEK_DATA / SEEK_HOLE.
    let s = d.join("sparse");
    {
        let mut h = fs::File::create(&s).unwrap();
        h.seek(SeekFrom::Start(1 << 20)).unwrap();
        h.write_all(b"data").unwrap();
    }
    {
        use std::os::fd::AsRawFd;
        let h = fs::File::open(&s).unwrap();
        // SAFETY: valid descriptor; lseek has no memory effects.
        let data = unsafe { libc::lseek(h.as_raw_fd(), 0, libc::SEEK_DATA) };
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(h.as_raw_fd(), 0, libc::SEEK_HOLE) };
        check(
            data > 0 && data <= 1 << 20,
            "SEEK_DATA skips the leading hole",
        );
        check(hole == 0, "SEEK_HOLE finds the hole at 0");
    }
    // SEEK_DATA on data just written, before any fsync or close (issue 15
    // point 9: the data is still in the kernel's writeback cache; answered
    // from folio's map alone it was ENXIO, and `cp` would skip it).
    {
        use std::os::fd::AsRawFd;
        let mut h = fs::File::create(d.join("fresh")).unwrap();
        h.write_all(&[7u8; 4096]).unwrap();
        let fd = h.as_raw_fd();
        // SAFETY: valid descriptor; lseek has no memory effects.
        let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
        check(data == 0, "SEEK_DATA finds data written a moment ago");
        h.seek(SeekFrom::Start(1 << 20)).unwrap();
        h.write_all(&[8u8; 4096]).unwrap();
        // SAFETY: as above.
        let data = unsafe { libc::lseek(fd, 8192, libc::SEEK_DATA) };
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
        check(data == 1 << 20, "SEEK_DATA skips to fresh data past a hole");
        check(
            (4096..1 << 20).contains(&hole),
            "SEEK_HOLE finds the hole between fresh data",
        );
    }
    // SEEK_DATA on a file nobody has open for writing leaves its cached
    // pages cached (the step above is for files being written only).
    {
        use std::os::fd::AsRawFd;
        let p = d.join("cached");
        fs::write(&p, vec![5u8; 256 << 10]).unwrap();
        let h = fs::File::open(&p).unwrap();
        let mut back = Vec::new();
        (&h).read_to_end(&mut back).unwrap();
        let resident = |fd: i32| -> usize {
            let len = 256usize << 10;
            // SAFETY: a shared read-only mapping of an open file, unmapped
            // below; mincore writes one byte per page into `vec`.
            unsafe {
                let m = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                if m == libc::MAP_FAILED {
                    return 0;
                }
                let mut vec = vec![0u8; len / 4096];
                let r = libc::mincore(m, len, vec.as_mut_ptr());
                libc::munmap(m, len);
                if r != 0 {
                    return 0;
                }
                vec.iter().filter(|&&b| b & 1 != 0).count()
            }
        };
        let fd = h.as_raw_fd();
        let before = resident(fd);
        // SAFETY: valid descriptor; lseek has no memory effects.
        let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
        check(
            data == 0 && before == 64,
            "a read file is cached and SEEK_DATA finds it",
        );
        check(
            resident(fd) == 64,
            "SEEK_DATA on a file nobody writes keeps its cached pages",
        );
    }
    check(
        fs::metadata(&s).unwrap().blocks() < 64,
        "a sparse file allocates little",
    );
    // Modes, owners, times with nanoseconds.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o4751)).unwrap();
    check(
        fs::metadata(&f).unwrap().mode() & 0o7777 == 0o4751,
        "chmod keeps special bits",
    );
    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    let m = fs::metadata(&f).unwrap();
    check((m.uid(), m.gid()) == (1234, 5678), "chown");
    let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000, 123_456_789);
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(when))
        .unwrap();
    let m = fs::metadata(&f).unwrap();
    check(
        (m.mtime(), m.mtime_nsec()) == (1_500_000_000, 123_456_789),
        "utimens keeps nanoseconds",
    );
    // Extended attributes.
    check(hostxattr::set(&f, b"user.k", b"value").is_ok(), "setxattr");
    check(
        hostxattr::get(&f, b"user.k").ok().as_deref() == Some(&b"value"[..]),
        "getxattr",
    );
    check(
        hostxattr::list(&f).unwrap().contains(&b"user.k".to_vec()),
        "listxattr",
    );
    check(
        errno_of(hostxattr::get(&f, b"user.none")) == Some(libc::ENODATA),
        "missing xattr is ENODATA",
    );
    check(
        hostxattr::set(&f, b"user.big", &[7u8; 700]).is_ok(),
        "xattr in a block",
    );
    // Special files.
    let fifo = cpath(&d.join("fifo"));
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) } == 0, "mkfifo");
    check(
        fs::symlink_metadata(d.join("fifo"))
            .map(|m| m.file_type().is_fifo())
            .unwrap_or(false),
        "fifo type",
    );
    // fallocate: preallocate, punch, collapse.
    {
        use std::os::fd::AsRawFd;
        let fa = d.join("falloc");
        let h = fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&fa)
            .unwrap();
        let fd = h.as_raw_fd();
        // SAFETY: valid descriptor; fallocate has no memory effects.
        check(
            unsafe { libc::fallocate(fd, 0, 0, 1 << 20) } == 0,
            "fallocate preallocates",
        );
        check(
            fs::metadata(&fa).unwrap().len() == 1 << 20,
            "fallocate extends the size",
        );
        check(
            fs::read(&fa).unwrap().iter().all(|&b| b == 0),
            "preallocated space reads as zeros",
        );
        drop(h);
        fs::write(&fa, vec![9u8; 64 << 10]).unwrap();
        let h = fs::File::options()
            .read(true)
            .write(true)
            .open(&fa)
            .unwrap();
        let fd = h.as_raw_fd();
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: as above.
        check(
            unsafe { libc::fallocate(fd, mode, 4096, 8192) } == 0,
            "punch hole",
        );
        // SAFETY: as above.
        check(
            unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE, 4096, 8192) } == -1,
            "punch without KEEP_SIZE fails",
        );
        let data = fs::read(&fa).unwrap();
        check(
            data.len() == 64 << 10 && data[4096..12288].iter().all(|&b| b == 0) && data[12288] == 9,
            "punched range reads zeros, size kept",
        );
        // The kernel's FUSE driver refuses COLLAPSE/INSERT_RANGE itself
        // (EOPNOTSUPP) before asking the filesystem; elsewhere they work.
        // SAFETY: as above.
        let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 16384) };
        if r == 0 {
            check(
                fs::metadata(&fa).unwrap().len() == (64 << 10) - 16384,
                "collapse shrinks the file",
            );
            // SAFETY: as above.
            check(
                unsafe { libc::fallocate(fd, libc::FALLOC_FL_COLLAPSE_RANGE, 100, 4096) } == -1,
                "unaligned collapse fails",
            );
        } else {
            check(
                std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP),
                "collapse is done or refused by the FUSE driver",
            );
        }
    }
    // A file unlinked while open stays readable; its space returns on close.
    {
        let u = d.join("unlinked");
        fs::write(&u, vec![6u8; 1 << 20]).unwrap();
        let h = fs::File::open(&u).unwrap();
        fs::remove_file(&u).unwrap();
        let mut back = Vec::new();
        (&h).read_to_end(&mut back).unwrap();
        check(
            back.len() == 1 << 20 && back.iter().all(|&b| b == 6),
            "an unlinked open file stays readable",
        );
        let free = |p: &Path| {
            let c = cpath(p);
            // SAFETY: zeroed statvfs is a valid out-parameter.
            let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: NUL-terminated path and a valid out-pointer.
            unsafe { libc::statvfs(c.as_ptr(), &mut sv) };
            sv.f_bfree * sv.f_frsize
        };
        let before = free(root);
        drop(h);
        let mut freed = false;
        for _ in 0..100 {
            if free(root) >= before + (1 << 20) - 65536 {
                freed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        check(freed, "its space returns at the last close");
    }
    // POSIX ACLs: a named-user entry opens a 0600 file to uid 1234.
    {
        let acl_file = d.join("acl");
        let plain = d.join("noacl");
        fs::write(&acl_file, b"secret").unwrap();
        fs::write(&plain, b"secret").unwrap();
        fs::set_permissions(&acl_file, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o600)).unwrap();
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1234),
            (4, 0, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        check(
            hostxattr::set(&acl_file, b"system.posix_acl_access", &acl).is_ok(),
            "set a POSIX ACL",
        );
        check(
            hostxattr::get(&acl_file, b"system.posix_acl_access").ok() == Some(acl.clone()),
            "the ACL reads back",
        );
        let as_user = |p: &Path| {
            use std::os::unix::process::CommandExt;
            Command::new("cat")
                .arg(p)
                .uid(1234)
                .gid(1234)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        check(as_user(&acl_file), "the ACL grants uid 1234 read access");
        check(!as_user(&plain), "without an ACL uid 1234 is refused");
        acl_rules(&d, &mut check);
        inode_flag_rules(&d, &mut check);
        special_chown_and_rewinddir(&d, &mut check);
        // Setuid/setgid and file capabilities: which changes drop them
        // (Linux 6.x rules; folio applies them itself under
        // FUSE_HANDLE_KILLPRIV_V2). Each case: initial mode, a shell
        // command run on the file by uid 1234 or root, expected mode.
        let run = |user: bool, cmd: &str| {
            use std::os::unix::process::CommandExt;
            let mut c = Command::new("sh");
            c.arg("-c").arg(cmd);
            if user {
                c.uid(1234).gid(1234);
            }
            c.status().map(|s| s.success()).unwrap_or(false)
        };
        let cases: &[(&str, u32, bool, &str, u32)] = &[
            ("user write", 0o6777, true, "echo more >> F", 0o777),
            ("root write", 0o6777, false, "echo more >> F", 0o6777),
            ("user truncate", 0o6777, true, "truncate -s 0 F", 0o777),
            ("root truncate", 0o6777, false, "truncate -s 0 F", 0o6777),
            ("root chown", 0o6755, false, "chown 1234 F", 0o755),
            (
                "root chown, setgid without group exec",
                0o2744,
                false,
                "chown 1234 F",
                0o2744,
            ),
            (
                "root chown, setgid with group exec",
                0o2754,
                false,
                "chown 1234 F",
                0o754,
            ),
            (
                "user write, setgid with group exec",
                0o2777,
                true,
                "echo more >> F",
                0o777,
            ),
        ];
        for (i, &(what, before, user, cmd, after)) in cases.iter().enumerate() {
            let p = d.join(format!("priv{i}"));
            fs::write(&p, b"x").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
            let cmd = cmd.replace('F', &format!("'{}'", p.display()));
            check(run(user, &cmd), &format!("{what}: command runs"));
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            check(
                mode == after,
                &format!("{what}: mode {before:o} becomes {after:o} (got {mode:o})"),
            );
        }
        // A write, even root's, drops the file's capabilities (a valid
        // version-2 security.capability value).
        let capf = d.join("caps");
        fs::write(&capf, b"x").unwrap();
        let mut cap = vec![0u8; 20];
        cap[3] = 2; // VFS_CAP_REVISION_2, little-endian
        cap[5] = 0x20; // one permitted capability
        check(
            hostxattr::set(&capf, b"security.capability", &cap).is_ok(),
            "set security.capability",
        );
        check(
            run(false, &format!("echo more >> '{}'", capf.display())),
            "root appends",
        );
        check(
            hostxattr::get(&capf, b"security.capability").is_err(),
            "a write drops security.capability",
        );
    }
    // Bulk data.
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(d.join("big"), &big).unwrap();
    let mut back = Vec::new();
    fs::File::open(d.join("big"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    check(back == big, "8 MiB round trip");
    // statfs.
    let c = cpath(root);
    // SAFETY: zeroed statvfs is a valid out-parameter for statvfs.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path and a valid out-pointer.
    check(
        unsafe { libc::statvfs(c.as_ptr(), &mut sv) } == 0
            && sv.f_blocks > 0
            && sv.f_namemax == 255,
        "statfs",
    );
    // Clean up a tree.
    fs::remove_dir_all(d.join("sub")).unwrap();
    check(!d.join("sub").exists(), "remove a tree");
    // Timestamps from one clock: a link made after a socket was created
    // never carries an earlier ctime than the socket's.
    {
        use std::os::unix::fs::MetadataExt;
        let sock = d.join("order.sock");
        let target = d.join("order-target");
        fs::write(&target, b"t").unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        fs::hard_link(&target, d.join("order-link")).unwrap();
        let (s, t) = (fs::metadata(&sock).unwrap(), fs::metadata(&target).unwrap());
        check(
            (t.ctime(), t.ctime_nsec()) >= (s.ctime(), s.ctime_nsec()),
            "a link's ctime is not earlier than an older socket's",
        );
    }
    for (ok, what) in file_handles(root, &d) {
        check(ok, what);
    }
    bad
}

/// `name_to_handle_at` on a file, a directory and a file in it; every
/// cache dropped; each handle opens the right file again; a handle of a
/// file deleted meanwhile is ESTALE (what an NFS export of the mount
/// needs).
fn file_handles(root: &Path, d: &Path) -> Vec<(bool, &'static str)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    const ROOM: usize = 128;
    let mut out = Vec::new();
    let hd = d.join("hdir");
    fs::create_dir(&hd).unwrap();
    let files = [
        (d.join("hfile"), b"one".to_vec()),
        (hd.join("hinner"), b"two".to_vec()),
    ];
    for (p, data) in &files {
        fs::write(p, data).unwrap();
    }
    let gone = d.join("hgone");
    fs::write(&gone, b"doomed").unwrap();
    // struct file_handle: handle_bytes, handle_type, then the handle.
    let take = |p: &Path| -> Option<Vec<u8>> {
        let mut h = vec![0u8; 8 + ROOM];
        // The kernel's ABI: handle_bytes is a u32 in host order.
        #[allow(clippy::host_endian_bytes)]
        h[..4].copy_from_slice(&(ROOM as u32).to_ne_bytes());
        let mut mount_id: libc::c_int = 0;
        let c = cpath(p);
        // SAFETY: a NUL-terminated path, a buffer of 8 + ROOM bytes whose
        // handle_bytes says ROOM, and a valid out-pointer.
        let r = unsafe {
            libc::name_to_handle_at(
                libc::AT_FDCWD,
                c.as_ptr(),
                h.as_mut_ptr().cast(),
                &mut mount_id,
                0,
            )
        };
        (r == 0).then_some(h)
    };
    let handles: Vec<Option<Vec<u8>>> = files
        .iter()
        .map(|(p, _)| take(p))
        .chain([take(&hd), take(&gone)])
        .collect();
    out.push((handles.iter().all(Option::is_some), "name_to_handle_at"));
    let dir_ino = fs::metadata(&hd).unwrap().ino();
    fs::remove_file(&gone).unwrap();
    let drop_caches = || {
        let _ = Command::new("sync").status();
        let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    };
    drop_caches();
    let mount_fd = fs::File::open(root).unwrap();
    let open = |h: &Option<Vec<u8>>, flags: libc::c_int| -> Result<fs::File, i32> {
        let mut h = h.clone().ok_or(0)?;
        // SAFETY: a handle filled by name_to_handle_at and an open fd of
        // the mount; the returned fd, if any, is ours to own.
        // O_CLOEXEC: a descriptor without it leaks into any process
        // another test thread spawns meanwhile (a background mount lives
        // on), and the kernel's umount of this mount then says busy.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount_fd.as_raw_fd(),
                h.as_mut_ptr().cast(),
                flags | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        // SAFETY: fd was just returned by open_by_handle_at and nothing else owns it.
        Ok(unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    };
    let mut right = true;
    for (i, (_, data)) in files.iter().enumerate() {
        let mut got = Vec::new();
        right &= open(&handles[i], libc::O_RDONLY)
            .map(|mut f| std::io::Read::read_to_end(&mut f, &mut got).is_ok() && &got == data)
            .unwrap_or(false);
    }
    out.push((
        right,
        "open_by_handle_at after drop_caches opens the right files",
    ));
    let dir = open(&handles[2], libc::O_RDONLY | libc::O_DIRECTORY);
    out.push((
        dir.is_ok_and(|f| f.metadata().is_ok_and(|m| m.ino() == dir_ino)),
        "open_by_handle_at of a directory",
    ));
    out.push((
        open(&handles[3], libc::O_RDONLY).err() == Some(libc::ESTALE),
        "a deleted file's handle is ESTALE",
    ));
    out
}

use std::os::unix::fs::FileTypeExt;

/// `folio mkfs -q IMG --size SIZE`, which must succeed.
fn folio_mkfs(img: &Path, size: &str) {
    assert!(Command::new(env!("CARGO_BIN_EXE_folio"))
        .args(["mkfs", "-q"])
        .arg(img)
        .args(["--size", size])
        .status()
        .unwrap()
        .success());
}

/// A scratch directory for test `tag` holding a fresh folio image of
/// `size` and an empty mount point: (directory, image, mount point).
fn fresh_image(tag: &str, size: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = tmp(tag);
    let img = dir.join("folio.img");
    folio_mkfs(&img, size);
    let mnt = dir.join("m");
    fs::create_dir(&mnt).unwrap();
    (dir, img, mnt)
}

/// `folio mount IMG MNT` (in the background), which must succeed.
fn folio_mount(img: &Path, mnt: &Path) {
    assert!(Command::new(env!("CARGO_BIN_EXE_folio"))
        .arg("mount")
        .arg(img)
        .arg(mnt)
        .status()
        .unwrap()
        .success());
}

/// `folio umount MNT`, which must succeed.
/// `folio mount IMG MNT -f [extra]` as a child, once the mount is there.
fn mount_foreground(img: &Path, mnt: &Path, extra: &[&str]) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_folio"))
        .arg("mount")
        .arg(img)
        .arg(mnt)
        .arg("-f")
        .args(extra)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .contains(mnt.to_str().unwrap())
    {
        assert!(
            start.elapsed().as_secs() < 20,
            "foreground mount did not appear"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// SIGTERM to a foreground mount: it exits 0 and the mount is gone.
fn sigterm_unmounts(mut child: std::process::Child, mnt: &Path) {
    // SAFETY: signalling a child process we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(
        !fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(mnt.to_str().unwrap()),
        "unmounted"
    );
}

fn folio_ls_l(img: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_folio"))
        .arg("ls")
        .arg("-l")
        .arg(img)
        .arg("/")
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn folio_umount(mnt: &Path) {
    assert!(Command::new(env!("CARGO_BIN_EXE_folio"))
        .arg("umount")
        .arg(mnt)
        .status()
        .unwrap()
        .success());
}

/// `folio cat IMG PATH`.
fn folio_cat(img: &Path, path: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_folio"))
        .arg("cat")
        .arg(img)
        .arg(path)
        .output()
        .unwrap()
}

fn e2fsck_clean(img: &Path) -> bool {
    Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn posix_suite_passes_on_folio_and_on_the_kernel() {
    if !prerequisites() {
        return;
    }
    let dir = tmp("posix");
    let folio = env!("CARGO_BIN_EXE_folio");
    let a = dir.join("folio.img");
    let b = dir.join("kernel.img");
    folio_mkfs(&a, "256M");
    fs::copy(&a, &b).unwrap();
    // folio FUSE mount.
    let ma = dir.join("ma");
    fs::create_dir(&ma).unwrap();
    let out = Command::new(folio)
        .arg("mount")
        .arg(&a)
        .arg(&ma)
        .args(["-o", "allow_other"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        info.lines()
            .any(|l| l.contains(ma.to_str().unwrap()) && l.contains("fuse.folio")),
        "listed as fuse.folio"
    );
    let folio_bad = posix_suite(&ma);
    folio_umount(&ma);
    // Kernel ext4 on an identical image.
    let mb = dir.join("mb");
    fs::create_dir(&mb).unwrap();
    assert!(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&b)
        .arg(&mb)
        .status()
        .unwrap()
        .success());
    let kernel_bad = posix_suite(&mb);
    assert!(Command::new("umount").arg(&mb).status().unwrap().success());
    assert!(
        kernel_bad.is_empty(),
        "the suite itself disagrees with the kernel: {kernel_bad:?}"
    );
    assert!(folio_bad.is_empty(), "folio deviates: {folio_bad:?}");
    assert!(e2fsck_clean(&a), "folio image not clean after unmount");
    assert!(e2fsck_clean(&b));
    let _ = fs::remove_dir_all(&dir);
}

/// `mount -t fuse.folio` runs `mount.fuse.folio SOURCE DIR -o OPTS`.
#[test]
fn mount_helper_and_signals() {
    if !prerequisites() {
        return;
    }
    let (dir, img, mnt) = fresh_image("helper", "64M");
    let folio = env!("CARGO_BIN_EXE_folio");
    let helper = dir.join("mount.fuse.folio");
    std::os::unix::fs::symlink(folio, &helper).unwrap();
    let out = Command::new(&helper)
        .arg(&img)
        .arg(&mnt)
        .args(["-o", "rw,noatime"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helper: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "as mount(8)'s helper, silent on success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // As root the helper mounts dev,suid unless told nodev/nosuid, as
    // mount(8) with an ext4 image would (it leaves dev and suid out).
    let line = fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(1) == mnt.to_str())
        .map(str::to_string)
        .unwrap_or_default();
    let flags = line.split(' ').nth(3).unwrap_or("");
    assert!(
        !flags.split(',').any(|f| f == "nosuid" || f == "nodev"),
        "helper mount flags: {flags}"
    );
    fs::write(mnt.join("via-helper"), b"ok").unwrap();
    folio_umount(&mnt);
    // Foreground mount; SIGTERM unmounts cleanly and syncs.
    let child = mount_foreground(&img, &mnt, &[]);
    fs::write(mnt.join("before-sigterm"), b"kept").unwrap();
    sigterm_unmounts(child, &mnt);
    assert!(e2fsck_clean(&img));
    let out = folio_cat(&img, "/before-sigterm");
    assert_eq!(out.stdout, b"kept");
    let out = folio_cat(&img, "/via-helper");
    assert_eq!(out.stdout, b"ok");
    let _ = fs::remove_dir_all(&dir);
}

/// An ordinary user (nobody, 65534) with /dev/fuse usable (mode 0666, as
/// distributions make it): mkfs with `-E root_owner` makes an image whose
/// root they own; they mount it, write and read a file, and unmount it
/// through fusermount3; the server was confined; e2fsck clean. The
/// refusals name what is missing: `allow_other` without
/// `user_allow_other` (/etc/fuse.conf), a root-owned image mounted
/// read-write (not writable), /dev/fuse at mode 0600.
#[test]
fn an_ordinary_user_mounts_their_own_image() {
    if !prerequisites() {
        return;
    }
    let setpriv = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let dir = tmp("user");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    // The binary where the user can run it.
    let folio = dir.join("folio");
    fs::copy(env!("CARGO_BIN_EXE_folio"), &folio).unwrap();
    let as_user = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut c = Command::new("setpriv");
        c.args(setpriv).arg(&folio);
        for a in args {
            c.arg(a);
        }
        c.output().unwrap()
    };
    let img = dir.join("img");
    let mnt = dir.join("mnt");
    let o = as_user(&[&"mkfs", &"-q", &"-E", &"root_owner", &img, &"64M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Command::new("setpriv")
        .args(setpriv)
        .args(["mkdir"])
        .arg(&mnt)
        .status()
        .unwrap();
    let dev_mode = fs::metadata("/dev/fuse").unwrap().permissions().mode();
    let set_dev = |m: u32| fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(m)).unwrap();

    // /dev/fuse not usable: said so.
    set_dev(0o600);
    let o = as_user(&[&"mount", &img, &mnt]);
    set_dev(0o666);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/dev/fuse"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let o = as_user(&[&"mount", &img, &mnt]);
    let ok = o.status.success();
    let result = std::panic::catch_unwind(|| {
        assert!(ok, "user mount: {}", String::from_utf8_lossy(&o.stderr));
        let sh = Command::new("setpriv")
            .args(setpriv)
            .args([
                "sh",
                "-c",
                "echo hello > \"$1\"/f && cat \"$1\"/f && stat -c %u \"$1\"/f",
                "sh",
            ])
            .arg(&mnt)
            .output()
            .unwrap();
        // Written, read back, owned by the user (root cannot look: a
        // user's FUSE mount without allow_other is the user's alone).
        assert_eq!(
            String::from_utf8_lossy(&sh.stdout),
            "hello\n65534\n",
            "{}",
            String::from_utf8_lossy(&sh.stderr)
        );
        // The server runs as the user, confined.
        let server = *folio_cli::mount::mount_servers_of(&img)
            .first()
            .expect("the mount server");
        assert_eq!(
            folio_cli::confine::proc_status(server),
            Some((true, true, true))
        );
        // allow_other without user_allow_other: refused, naming fuse.conf.
        let other = dir.join("mnt2");
        Command::new("setpriv")
            .args(setpriv)
            .arg("mkdir")
            .arg(&other)
            .status()
            .unwrap();
        let o = as_user(&[&"mount", &"-o", &"allow_other,ro", &img, &other]);
        assert!(!o.status.success());
        let conf = fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
        if !conf.lines().any(|l| l.trim() == "user_allow_other") {
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("/etc/fuse.conf"),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    });
    let o = as_user(&[&"umount", &mnt]);
    set_dev(dev_mode & 0o7777);
    if let Err(e) = result {
        let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
        std::panic::resume_unwind(e);
    }
    assert!(
        o.status.success(),
        "user umount: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(e2fsck_clean(&img));
    assert_eq!(folio_cat(&img, "/f").stdout, b"hello\n");

    // A root-owned image, read-write: not writable, said so.
    let root_img = dir.join("root.img");
    folio_mkfs(&root_img, "64M");
    set_dev(0o666);
    let o = as_user(&[&"mount", &root_img, &mnt]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot open for writing") && err.contains("-o ro"),
        "{err}"
    );
    // The user's copy of an image whose root directory root owns: without
    // fakeroot the user cannot write into /, with it (as fuse2fs) they can.
    std::os::unix::fs::chown(&root_img, Some(65534), Some(65534)).unwrap();
    let mut wrote = Vec::new();
    for opts in ["rw", "fakeroot"] {
        let o = as_user(&[&"mount", &"-o", &opts, &root_img, &mnt]);
        assert!(
            o.status.success(),
            "{opts}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let sh = Command::new("setpriv")
            .args(setpriv)
            .args(["sh", "-c", "echo x > \"$1\"/in-root", "sh"])
            .arg(&mnt)
            .output()
            .unwrap();
        wrote.push(sh.status.success());
        let o = as_user(&[&"umount", &mnt]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    set_dev(dev_mode & 0o7777);
    assert_eq!(
        wrote,
        [false, true],
        "writes into a root-owned / without and with fakeroot"
    );
    assert!(e2fsck_clean(&root_img));
    // What the user made under fakeroot is root's in the image.
    let ls = folio_ls_l(&root_img);
    let line = ls
        .lines()
        .find(|l| l.ends_with(" in-root"))
        .unwrap_or_default();
    let ids: Vec<&str> = line.split_whitespace().skip(2).take(2).collect();
    assert_eq!(ids, ["0", "0"], "{ls}");
    let _ = fs::remove_dir_all(&dir);
}

/// A running mount server is confined (issue 17): no effective
/// capabilities, NoNewPrivs, a seccomp filter; asked (through the
/// debug-build probe attribute) to open a host file and run a program,
/// it fails at both; SIGTERM still unmounts (through the helper started
/// before confinement), e2fsck clean. With `-o noconfine` the same probe
/// succeeds, so the probe does try.
#[test]
fn a_running_mount_is_confined() {
    if !prerequisites() {
        return;
    }
    let (dir, img, mnt) = fresh_image("confine", "64M");
    for confined in [true, false] {
        let opts: &[&str] = if confined { &[] } else { &["-o", "noconfine"] };
        let child = mount_foreground(&img, &mnt, opts);
        let f = mnt.join(format!("f-{confined}"));
        fs::write(&f, b"data").unwrap();
        let (no_caps, nnp, seccomp) = folio_cli::confine::proc_status(child.id()).unwrap();
        assert_eq!((no_caps, nnp, seccomp), (confined, confined, confined));
        let probe = hostxattr::get(&f, b"user.folio.debug.escape").unwrap();
        let probe = String::from_utf8_lossy(&probe).to_string();
        if confined {
            assert!(
                probe.contains("open=errno") && probe.contains("exec=errno"),
                "the confined server reached the host: {probe}"
            );
        } else {
            assert_eq!(probe, "open=ok exec=ok");
        }
        assert_eq!(fs::read(&f).unwrap(), b"data");
        sigterm_unmounts(child, &mnt);
        assert!(e2fsck_clean(&img));
    }
    let _ = fs::remove_dir_all(&dir);
}

/// `mount -o remount,ro` and `remount,rw` as mount(8) runs them (the
/// helper with `-o remount,...`): read-only after committing everything
/// (a write is EROFS; a read-only open of the image, replaying its
/// journal in memory, sees the data written just before), then writable
/// again; the mount's other flags are kept; e2fsck clean.
#[test]
fn remount_read_only_and_back() {
    if !prerequisites() {
        return;
    }
    let (dir, img, mnt) = fresh_image("remount", "64M");
    let helper = dir.join("mount.fuse.folio");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_folio"), &helper).unwrap();
    let run = |opts: &str| {
        let out = Command::new(&helper)
            .arg(&img)
            .arg(&mnt)
            .args(["-o", opts])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "-o {opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let flags = || {
        fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .find(|l| l.split(' ').nth(1) == mnt.to_str())
            .and_then(|l| l.split(' ').nth(3).map(str::to_string))
            .unwrap_or_default()
    };
    run("rw,noexec");
    fs::write(mnt.join("before"), b"committed at remount").unwrap();
    run("remount,ro");
    let f = flags();
    assert!(
        f.starts_with("ro,") && f.contains("noexec"),
        "after remount,ro: {f}"
    );
    assert_eq!(
        errno_of(fs::write(mnt.join("nope"), b"x")),
        Some(libc::EROFS),
        "writes refused"
    );
    // Everything is committed: a read-only open (journal replayed in
    // memory) sees the file, the server still running.
    let out = Command::new(env!("CARGO_BIN_EXE_folio"))
        .args(["--ignore-lock", "cat"])
        .arg(&img)
        .arg("/before")
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"committed at remount");
    run("remount,rw");
    let f = flags();
    assert!(
        f.starts_with("rw,") && f.contains("noexec"),
        "after remount,rw: {f}"
    );
    fs::write(mnt.join("after"), b"writable again").unwrap();
    folio_umount(&mnt);
    assert!(e2fsck_clean(&img));
    assert_eq!(folio_cat(&img, "/after").stdout, b"writable again");
    let _ = fs::remove_dir_all(&dir);
}

/// `folio umount -l` on a busy mount (a file held open inside) detaches
/// it and returns 0 within seconds, as `umount -l` does; the server keeps
/// serving the open file, and once it is closed makes its final commit and
/// lets go of the image, which is e2fsck clean with the file's data.
#[test]
fn lazy_umount_of_a_busy_mount() {
    if !prerequisites() {
        return;
    }
    let (dir, img, mnt) = fresh_image("lazy", "64M");
    folio_mount(&img, &mnt);
    let mut held = fs::File::create(mnt.join("held")).unwrap();
    let start = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_folio"))
        .args(["umount", "-l"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umount -l: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed().as_secs() < 20,
        "umount -l returned promptly"
    );
    assert!(
        !fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(mnt.to_str().unwrap()),
        "detached"
    );
    // The open file still works, then is closed.
    std::io::Write::write_all(&mut held, b"written after the detach").unwrap();
    held.sync_all().unwrap();
    drop(held);
    let start = std::time::Instant::now();
    while folio_ext4::fs::lock_image(&img, false).is_err() {
        assert!(start.elapsed().as_secs() < 60, "the server never finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(e2fsck_clean(&img));
    assert_eq!(folio_cat(&img, "/held").stdout, b"written after the detach");
    let _ = fs::remove_dir_all(&dir);
}

/// A plain `umount` (which returns before the server's final commit)
/// followed at once by a mount of the same image, 100 times, as scripts
/// do on the kernel's ext4: every mount succeeds (waiting for the
/// finishing server when it must), every file written is there, and the
/// image is e2fsck clean.
#[test]
fn plain_umount_then_mount_at_once() {
    if !prerequisites() {
        return;
    }
    let (dir, img, mnt) = fresh_image("remount-loop", "128M");
    let helper = dir.join("mount.fuse.folio");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_folio"), &helper).unwrap();
    let mut waited = 0;
    for i in 0..100 {
        let out = Command::new(&helper)
            .arg(&img)
            .arg(&mnt)
            .args(["-o", "rw"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if String::from_utf8_lossy(&out.stderr).contains("waiting for the folio process") {
            waited += 1;
        }
        fs::write(mnt.join(format!("f{i}")), format!("{i}")).unwrap();
        // Enough dirty data that the final commit takes a while.
        fs::write(mnt.join("bulk"), vec![i as u8; 32 << 20]).unwrap();
        let st = Command::new("umount").arg(&mnt).status().unwrap();
        assert!(st.success(), "umount {i}");
    }
    eprintln!("{waited} of 100 mounts waited for the previous server");
    // The last server may still be finishing: wait for the image lock.
    let start = std::time::Instant::now();
    while folio_ext4::fs::lock_image(&img, false).is_err() {
        assert!(
            start.elapsed().as_secs() < 60,
            "the last server never exits"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(e2fsck_clean(&img));
    for i in [0, 42, 99] {
        assert_eq!(
            folio_cat(&img, &format!("/f{i}")).stdout,
            format!("{i}").as_bytes()
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

/// An fstab entry of type fuse.folio mounts through mount(8) and the
/// `mount.fuse.folio` helper (installed in /sbin for the test if absent,
/// and removed again), using an alternative fstab (`mount -T`), so the
/// system's /etc/fstab is not touched.
#[test]
fn fstab_entry_mounts_through_mount8() {
    if !prerequisites() {
        return;
    }
    let (dir, img, mnt) = fresh_image("fstab", "64M");
    let folio = env!("CARGO_BIN_EXE_folio");
    /// Removes the helper it installed, however the test ends.
    struct Installed(Option<PathBuf>);
    impl Drop for Installed {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                let _ = fs::remove_file(p);
            }
        }
    }
    let helper = Path::new("/sbin/mount.fuse.folio");
    let _installed = if helper.symlink_metadata().is_ok() {
        Installed(None)
    } else {
        std::os::unix::fs::symlink(folio, helper).unwrap();
        Installed(Some(helper.to_path_buf()))
    };
    let fstab = dir.join("fstab");
    fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} fuse.folio defaults,noatime,nofail,x-test.opt 0 0\n",
            img.display(),
            mnt.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -T: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == mnt.to_str())
        .expect("the fstab entry is mounted");
    assert_eq!(line.split(' ').nth(2), Some("fuse.folio"), "{line}");
    assert!(line.contains("noatime"), "{line}");
    fs::write(mnt.join("via-fstab"), b"fstab").unwrap();
    folio_umount(&mnt);
    assert!(e2fsck_clean(&img));
    let out = folio_cat(&img, "/via-fstab");
    assert_eq!(out.stdout, b"fstab");
    let _ = fs::remove_dir_all(&dir);
}

/// xorshift for the mount model test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The model test through the mount, with ordinary system calls
/// (pread/pwrite, ftruncate, fallocate, fsync, mmap reads and writes).
#[test]
fn model_test_through_the_mount_with_mmap() {
    if !prerequisites() {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let (dir, img, mnt) = fresh_image("fsxm", "64M");
    folio_mount(&img, &mnt);
    let path = mnt.join("model");
    let f = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let fd = f.as_raw_fd();
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng(0x5EED_F00D);
    let max = 200_000u64;
    let mut failure = None;
    for k in 0..4000u32 {
        let what = rng.below(100);
        let op = match what {
            0..=34 => {
                let (off, len) = (rng.below(max), 1 + rng.below(9000));
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                f.write_all_at(&data, off).unwrap();
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
                format!("pwrite {off} {len}")
            }
            35..=49 => {
                let (off, len) = (rng.below(max), 1 + rng.below(9000) as usize);
                let mut buf = vec![0u8; len];
                let n = f.read_at(&mut buf, off).unwrap();
                let want = model
                    .get(off as usize..)
                    .map_or(&[][..], |s| &s[..s.len().min(len)]);
                if &buf[..n] != want {
                    failure = Some(format!("op {k}: pread {off} {len} differs"));
                    break;
                }
                format!("pread {off} {len}")
            }
            50..=57 => {
                let size = rng.below(max);
                f.set_len(size).unwrap();
                model.resize(size as usize, 0);
                format!("truncate {size}")
            }
            58..=67 => {
                let (off, len) = (rng.below(max), 1 + rng.below(20_000));
                let mode = [
                    0,
                    libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_ZERO_RANGE,
                ][rng.below(4) as usize];
                // SAFETY: valid descriptor; fallocate has no memory effects.
                let r = unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
                assert_eq!(
                    r,
                    0,
                    "op {k}: fallocate mode {mode:#x}: {}",
                    std::io::Error::last_os_error()
                );
                let (o, e) = (off as usize, (off + len) as usize);
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    let stop = e.min(model.len());
                    if o < stop {
                        model[o..stop].fill(0);
                    }
                }
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && e > model.len() {
                    model.resize(e, 0);
                }
                format!("fallocate {mode:#x} {off} {len}")
            }
            68..=75 => {
                f.sync_all().unwrap();
                // Drop the kernel's (now clean) cached pages, so that the
                // next reads come from folio, not from the kernel's
                // writeback cache.
                // SAFETY: valid descriptor; advice has no memory effects.
                let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
                assert_eq!(r, 0, "op {k}: posix_fadvise");
                "fsync + drop cached pages".to_string()
            }
            _ if !model.is_empty() => {
                // mmap the file; read a window and write a few bytes.
                let len = model.len();
                // SAFETY: mapping a file we hold open, length = its size.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        fd,
                        0,
                    )
                };
                assert_ne!(
                    p,
                    libc::MAP_FAILED,
                    "op {k}: mmap: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: the mapping is `len` bytes long and stays mapped
                // until munmap below; nothing else aliases it here.
                let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
                let at = rng.below(len as u64) as usize;
                let n = (1 + rng.below(5000) as usize).min(len - at);
                if mem[at..at + n] != model[at..at + n] {
                    failure = Some(format!("op {k}: mmap read at {at} differs"));
                }
                let v = rng.next() as u8;
                mem[at..at + n].fill(v);
                model[at..at + n].fill(v);
                // SAFETY: flushing and unmapping the mapping made above.
                unsafe {
                    libc::msync(p, len, libc::MS_SYNC);
                    libc::munmap(p, len);
                }
                if failure.is_some() {
                    break;
                }
                format!("mmap rw {at} {n}")
            }
            _ => continue,
        };
        let size = f.metadata().unwrap().len();
        if size != model.len() as u64 {
            failure = Some(format!("op {k} ({op}): size {size}, model {}", model.len()));
            break;
        }
    }
    let all = fs::read(&path).unwrap();
    drop(f);
    folio_umount(&mnt);
    assert!(failure.is_none(), "{}", failure.unwrap());
    assert!(
        all == model,
        "final contents through the mount differ from the model"
    );
    assert!(e2fsck_clean(&img), "image not clean after the model test");
    let out = folio_cat(&img, "/model");
    assert!(
        out.stdout == model,
        "the image holds different bytes than the model"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// Seed 001's loop-over-a-filesystem scenario: `losetup` on a file in the
/// folio mount, `mkfs.ext4` on the loop device, mount it, write and read,
/// unmount; both images are e2fsck clean.
#[test]
fn loop_device_on_a_file_inside_the_mount() {
    if !prerequisites() {
        return;
    }
    let (dir, outer, mnt) = fresh_image("loop", "256M");
    let inner_mnt = dir.join("inner");
    fs::create_dir(&inner_mnt).unwrap();
    folio_mount(&outer, &mnt);
    let disk = mnt.join("disk.img");
    fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", &loopdev])
        .status()
        .unwrap()
        .success();
    ok &= Command::new("mount")
        .arg(&loopdev)
        .arg(&inner_mnt)
        .status()
        .unwrap()
        .success();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 253) as u8).collect();
    if ok {
        fs::write(inner_mnt.join("payload"), &data).unwrap();
        fs::create_dir(inner_mnt.join("d")).unwrap();
        for i in 0..200 {
            fs::write(inner_mnt.join(format!("d/f{i}")), format!("{i}")).unwrap();
        }
        ok &= Command::new("umount")
            .arg(&inner_mnt)
            .status()
            .unwrap()
            .success();
        ok &= Command::new("mount")
            .arg(&loopdev)
            .arg(&inner_mnt)
            .status()
            .unwrap()
            .success();
        ok &= fs::read(inner_mnt.join("payload"))
            .map(|d| d == data)
            .unwrap_or(false);
        ok &= fs::read_to_string(inner_mnt.join("d/f199"))
            .map(|s| s == "199")
            .unwrap_or(false);
        let _ = Command::new("umount").arg(&inner_mnt).status();
    }
    let inner_clean = Command::new("e2fsck")
        .arg("-fn")
        .arg(&loopdev)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let _ = Command::new("losetup").arg("-d").arg(&loopdev).status();
    folio_umount(&mnt);
    assert!(ok, "the ext4 inside the loop device did not work");
    assert!(inner_clean, "the inner filesystem is not clean");
    assert!(e2fsck_clean(&outer), "the folio image is not clean");
    let _ = fs::remove_dir_all(&dir);
}

/// Threads through the mount (the FUSE workers call the library at once,
/// with no lock of the adapter's): 8 threads, each 400 seeded operations
/// — create, write, read back, truncate, rename within and across a
/// private and a shared directory, link, unlink, mkdir/rmdir, readdir,
/// fsync — each with an exact model of what it owns (its names are its
/// own). Checked during the run (reads, listings) and after a remount
/// (every file's bytes, every listing); e2fsck clean.
/// `FOLIO_MOUNT_STRESS_OPS=N` operations per thread, `FOLIO_STRESS_SEED`.
#[test]
fn threads_race_through_the_mount() {
    use std::collections::{BTreeMap, BTreeSet};
    if !prerequisites() {
        return;
    }
    let ops: u64 = std::env::var("FOLIO_MOUNT_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seed: u64 = std::env::var("FOLIO_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (dir, img, mnt) = fresh_image("mount-stress", "256M");
    folio_mount(&img, &mnt);
    let shared = mnt.join("shared");
    fs::create_dir(&shared).unwrap();
    type Model = (BTreeMap<PathBuf, Vec<u8>>, BTreeSet<PathBuf>);
    let run = |t: u64| -> Result<Model, String> {
        let own = mnt.join(format!("t{t}"));
        fs::create_dir(&own).map_err(|e| e.to_string())?;
        // A small xorshift, seeded per thread.
        let mut x = (seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n.max(1)
        };
        let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
        let mut counter = 0u64;
        let mut name = |base: &Path| {
            counter += 1;
            base.join(format!("t{t}_{counter}"))
        };
        for k in 0..ops {
            let ctx = |e: std::io::Error, what: &str| format!("thread {t} op {k}: {what}: {e}");
            let keys: Vec<PathBuf> = files.keys().cloned().collect();
            let pick = |i: u64| keys.get(i as usize % keys.len().max(1)).cloned();
            let base = if next(2) == 0 {
                own.clone()
            } else {
                shared.clone()
            };
            match next(100) {
                0..=19 => {
                    let p = name(&base);
                    let data: Vec<u8> = (0..next(20_000)).map(|i| (i ^ k ^ t) as u8).collect();
                    fs::write(&p, &data).map_err(|e| ctx(e, "create"))?;
                    files.insert(p, data);
                }
                20..=39 => {
                    let Some(p) = pick(next(1 << 20)) else {
                        continue;
                    };
                    let off = next(30_000) as usize;
                    let data: Vec<u8> = (0..1 + next(8_000)).map(|i| (i ^ k) as u8).collect();
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .map_err(|e| ctx(e, "open"))?;
                    std::os::unix::fs::FileExt::write_all_at(&f, &data, off as u64)
                        .map_err(|e| ctx(e, "pwrite"))?;
                    let m = files.get_mut(&p).expect("modelled");
                    if m.len() < off + data.len() {
                        m.resize(off + data.len(), 0);
                    }
                    m[off..off + data.len()].copy_from_slice(&data);
                    if next(4) == 0 {
                        f.sync_all().map_err(|e| ctx(e, "fsync"))?;
                    }
                }
                40..=54 => {
                    let Some(p) = pick(next(1 << 20)) else {
                        continue;
                    };
                    let got = fs::read(&p).map_err(|e| ctx(e, "read"))?;
                    if got != files[&p] {
                        return Err(format!(
                            "thread {t} op {k}: {} differs from the model",
                            p.display()
                        ));
                    }
                }
                55..=62 => {
                    let Some(p) = pick(next(1 << 20)) else {
                        continue;
                    };
                    let size = next(25_000);
                    fs::OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .and_then(|f| f.set_len(size))
                        .map_err(|e| ctx(e, "truncate"))?;
                    files
                        .get_mut(&p)
                        .expect("modelled")
                        .resize(size as usize, 0);
                }
                63..=72 => {
                    let Some(p) = pick(next(1 << 20)) else {
                        continue;
                    };
                    let q = name(&base);
                    fs::rename(&p, &q).map_err(|e| ctx(e, "rename"))?;
                    let data = files.remove(&p).expect("modelled");
                    files.insert(q, data);
                }
                73..=80 => {
                    let Some(p) = pick(next(1 << 20)) else {
                        continue;
                    };
                    fs::remove_file(&p).map_err(|e| ctx(e, "unlink"))?;
                    files.remove(&p);
                }
                81..=86 => {
                    if let Some(d) = dirs.iter().next().cloned().filter(|_| next(2) == 0) {
                        fs::remove_dir(&d).map_err(|e| ctx(e, "rmdir"))?;
                        dirs.remove(&d);
                    } else {
                        let d = name(&shared);
                        fs::create_dir(&d).map_err(|e| ctx(e, "mkdir"))?;
                        dirs.insert(d);
                    }
                }
                _ => {
                    // Listings: this thread's names in each directory are
                    // exactly its model's.
                    for d in [&own, &shared] {
                        let got: BTreeSet<PathBuf> = fs::read_dir(d)
                            .map_err(|e| ctx(e, "readdir"))?
                            .map(|e| e.map(|e| e.path()))
                            .collect::<Result<_, _>>()
                            .map_err(|e| ctx(e, "readdir entry"))?;
                        let prefix = format!("t{t}_");
                        let got: BTreeSet<PathBuf> = got
                            .into_iter()
                            .filter(|p| {
                                p.file_name()
                                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                            })
                            .collect();
                        let want: BTreeSet<PathBuf> = files
                            .keys()
                            .chain(dirs.iter())
                            .filter(|p| p.parent() == Some(d.as_path()))
                            .cloned()
                            .collect();
                        if got != want {
                            return Err(format!(
                                "thread {t} op {k}: listing of {} differs",
                                d.display()
                            ));
                        }
                    }
                }
            }
        }
        Ok((files, dirs))
    };
    let models: Vec<Model> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8u64).map(|t| s.spawn(move || run(t))).collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect::<Result<_, _>>()
    })
    .unwrap_or_else(|e| panic!("seed {seed}: {e} (replay: FOLIO_STRESS_SEED={seed})"));
    folio_umount(&mnt);
    assert!(e2fsck_clean(&img), "seed {seed}: image not clean");
    folio_mount(&img, &mnt);
    for (files, dirs) in &models {
        for (p, data) in files {
            assert_eq!(
                &fs::read(p).unwrap(),
                data,
                "seed {seed}: {} after remount",
                p.display()
            );
        }
        for d in dirs {
            assert!(d.is_dir(), "seed {seed}: {} after remount", d.display());
        }
    }
    folio_umount(&mnt);
    let _ = fs::remove_dir_all(&dir);
}

/// ea_inode through the mount (issue 18): values past a block go through
/// FUSE's setxattr and getxattr into inodes of their own, survive the
/// unmount, and the image is e2fsck-clean with the kernel reading them.
/// Run `f` on a read-only kernel loop mount of `img` at `at` (made).
fn kernel_ro<T>(img: &Path, at: &Path, f: impl FnOnce(&Path) -> T) -> T {
    fs::create_dir(at).unwrap();
    assert!(Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(img)
        .arg(at)
        .status()
        .unwrap()
        .success());
    let r = f(at);
    assert!(Command::new("umount").arg(at).status().unwrap().success());
    r
}

#[test]
fn large_xattrs_through_the_mount_on_an_ea_inode_image() {
    if !prerequisites() {
        return;
    }
    let dir = tmp("ea");
    let img = dir.join("folio.img");
    assert!(Command::new(env!("CARGO_BIN_EXE_folio"))
        .args(["mkfs", "-q", "-O", "ea_inode"])
        .arg(&img)
        .args(["--size", "64M"])
        .status()
        .unwrap()
        .success());
    let mnt = dir.join("m");
    fs::create_dir(&mnt).unwrap();
    folio_mount(&img, &mnt);
    let f = mnt.join("f");
    fs::write(&f, b"owner").unwrap();
    let values: Vec<(&[u8], Vec<u8>)> = vec![
        (
            b"user.big",
            (0..20000u32).map(|i| (i % 253) as u8).collect(),
        ),
        (b"user.max", vec![7u8; 65536]),
        (b"user.small", b"s".to_vec()),
    ];
    for (n, v) in &values {
        hostxattr::set(&f, n, v).unwrap();
    }
    for (n, v) in &values {
        assert!(
            &hostxattr::get(&f, n).unwrap() == v,
            "read back through the mount"
        );
    }
    // Too large for the VFS: E2BIG before folio sees it.
    assert!(hostxattr::set(&f, b"user.toobig", &vec![1u8; 65537]).is_err());
    folio_umount(&mnt);
    assert!(e2fsck_clean(&img), "e2fsck after the mount");
    let seen: Vec<bool> = kernel_ro(&img, &dir.join("k"), |k| {
        values
            .iter()
            .map(|(n, v)| hostxattr::get(&k.join("f"), n).ok().as_ref() == Some(v))
            .collect()
    });
    assert_eq!(seen, vec![true; 3], "the kernel reads every value");
    let _ = fs::remove_dir_all(&dir);
}

/// An inline_data image made by mke2fs through the mount (issue 18):
/// inline files, symlinks and directories read as they were made, and
/// appends, truncation, creates, removes and renames in inline
/// directories leave an image e2fsck calls clean, read by the kernel as
/// the mount showed it.
#[test]
fn inline_data_through_the_mount() {
    if !prerequisites() || !Path::new("/sbin/mkfs.ext4").exists() {
        return;
    }
    let dir = tmp("inline");
    let src = dir.join("src");
    fs::create_dir_all(src.join("d/sub")).unwrap();
    fs::write(src.join("small"), b"hello\n").unwrap();
    fs::write(src.join("d/tail"), vec![b't'; 100]).unwrap();
    fs::write(src.join("d/sub/x"), b"x").unwrap();
    std::os::unix::fs::symlink("l".repeat(80), src.join("d/long")).unwrap();
    let img = dir.join("folio.img");
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "inline_data", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap()
        .success());
    // The commands read it too: cat, ls, and get (the tree as made).
    let cat = Command::new(env!("CARGO_BIN_EXE_folio"))
        .args(["cat"])
        .arg(&img)
        .arg("/d/tail")
        .output()
        .unwrap();
    assert!(cat.status.success());
    assert_eq!(cat.stdout, vec![b't'; 100]);
    let ls = Command::new(env!("CARGO_BIN_EXE_folio"))
        .args(["ls"])
        .arg(&img)
        .arg("/d")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ls.stdout), "long\nsub\ntail\n");
    let got = dir.join("got");
    assert!(Command::new(env!("CARGO_BIN_EXE_folio"))
        .args(["get", "-q"])
        .arg(&img)
        .arg("/")
        .arg(&got)
        .status()
        .unwrap()
        .success());
    assert_eq!(fs::read(got.join("d/sub/x")).unwrap(), b"x");
    assert_eq!(
        fs::read_link(got.join("d/long")).unwrap().as_os_str().len(),
        80
    );
    let mnt = dir.join("m");
    fs::create_dir(&mnt).unwrap();
    folio_mount(&img, &mnt);
    assert_eq!(fs::read(mnt.join("small")).unwrap(), b"hello\n");
    assert_eq!(fs::read(mnt.join("d/tail")).unwrap(), vec![b't'; 100]);
    assert_eq!(
        fs::read_link(mnt.join("d/long")).unwrap().as_os_str().len(),
        80
    );
    let mut names: Vec<_> = fs::read_dir(mnt.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["long", "sub", "tail"]);
    // Changes: each inline inode touched moves to blocks first.
    fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("small"))
        .unwrap()
        .write_all(&vec![b'a'; 5000])
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("d/tail"))
        .unwrap()
        .set_len(7)
        .unwrap();
    fs::write(mnt.join("d/sub/new"), b"new").unwrap();
    fs::rename(mnt.join("d/sub"), mnt.join("moved")).unwrap();
    fs::remove_file(mnt.join("d/long")).unwrap();
    folio_umount(&mnt);
    assert!(e2fsck_clean(&img), "e2fsck after the mount");
    // The 3-byte file written through the mount is inline, as the
    // kernel makes a small new file; the 5 KiB one is not.
    for (p, inline) in [("/moved/new", true), ("/small", false), ("/moved", true)] {
        let out = Command::new("debugfs")
            .args(["-R", &format!("stat {p}")])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.contains("Size of inline data"), inline, "{p}: {text}");
    }
    let seen = kernel_ro(&img, &dir.join("k"), |k| {
        (
            fs::read(k.join("small")).map(|v| v.len()).ok(),
            fs::read(k.join("d/tail")).ok(),
            fs::read(k.join("moved/new")).ok(),
            fs::read(k.join("moved/x")).ok(),
            k.join("d/long").exists(),
        )
    });
    assert_eq!(
        seen,
        (
            Some(5006),
            Some(vec![b't'; 7]),
            Some(b"new".to_vec()),
            Some(b"x".to_vec()),
            false
        ),
        "the kernel reads what the mount wrote"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// The kernel keeps attributes for an hour (`attr_timeout`): what the
/// library changes behind its back must reach it. A file written in
/// alternate blocks gets an extent-tree block when its fsync writes it
/// back; `st_blocks` after the fsync counts it, as the kernel's own ext4
/// shows the image afterwards.
#[test]
fn st_blocks_after_writeback_reaches_the_kernel() {
    if !prerequisites() {
        return;
    }
    use std::os::unix::fs::{FileExt, MetadataExt};
    let (dir, img, mnt) = fresh_image("blocks", "64M");
    folio_mount(&img, &mnt);
    let f = mnt.join("holes");
    {
        let file = fs::File::create(&f).unwrap();
        for i in 0..256u64 {
            file.write_all_at(&[0x42; 4096], i * 8192).unwrap();
        }
    }
    // Closed: its pages went to the server (delayed blocks, no tree yet),
    // and the kernel caches what a stat now says.
    let before = fs::metadata(&f).unwrap().blocks();
    let file = fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.sync_all().unwrap();
    // Asked before the close (whose FLUSH makes the kernel forget
    // st_blocks anyway in writeback-cache mode).
    let after = fs::metadata(&f).unwrap().blocks();
    drop(file);
    folio_umount(&mnt);
    let truth = kernel_ro(&img, &dir.join("k"), |k| {
        fs::metadata(k.join("holes")).unwrap().blocks()
    });
    assert!(
        truth > before,
        "the fsync should add a tree block ({before} -> {truth})"
    );
    assert_eq!(after, truth, "st_blocks after fsync (before it: {before})");
    assert!(e2fsck_clean(&img));
}
