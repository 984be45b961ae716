//! Ordinary mistakes must not damage an image (issue 13, first part): a
//! write command on an image another process holds is refused, naming the
//! holder, and changes nothing; a read command is refused unless asked to
//! read anyway; mkfs does not touch a busy image; a `put` that runs out of
//! space leaves no partial file and a clean, committed image; a closed
//! pipe ends a command quietly, never with a panic.

mod common;
use common::{folio, ok, scratch};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn tmp(tag: &str) -> PathBuf {
    scratch("misuse", tag)
}

fn e2fsck_clean(img: &Path) {
    let Ok(o) = Command::new("e2fsck").arg("-fn").arg(img).output() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "e2fsck is missing under CI"
        );
        return;
    };
    assert!(
        o.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_locked_image_is_refused_and_left_alone() {
    let dir = tmp("lock");
    let img = dir.join("disk.img");
    ok(&[&"mkfs", &img, &"--size", &"16M"]);
    ok(&[&"mkdir", &img, &"/d"]);
    let host = dir.join("f.txt");
    std::fs::write(&host, b"hello\n").unwrap();
    let before = std::fs::read(&img).unwrap();
    // Another process's lock, as a mount holds it.
    let holder = std::fs::File::open(&img).unwrap();
    holder.lock().unwrap();
    for args in [
        vec!["put", "IMG", "HOST", "/f.txt"],
        vec!["mkdir", "IMG", "/e"],
        vec!["rm", "IMG", "-r", "/d"],
        vec!["recover", "IMG"],
        vec!["io", "IMG", "/g", "-f", "-c", "pwrite 0 4k"],
        vec!["mkfs", "-F", "IMG", "--size", "16M"],
        vec!["ls", "IMG", "/"],
        vec!["cat", "IMG", "/d"],
    ] {
        let args: Vec<std::ffi::OsString> = args
            .iter()
            .map(|a| match *a {
                "IMG" => img.clone().into_os_string(),
                "HOST" => host.clone().into_os_string(),
                a => a.into(),
            })
            .collect();
        let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        let args = refs;
        let o = folio(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{:?} succeeded on a locked image",
            args.len()
        );
        let me = format!("process {}", std::process::id());
        assert!(err.contains("in use by") && err.contains(&me), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Asked to read anyway: it reads, and says the data may be stale.
    let o = folio(&[&"--ignore-lock", &"ls", &img, &"/"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("d\n"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("may be stale"));
    // A writer never reads through the lock.
    let o = folio(&[&"--ignore-lock", &"mkdir", &img, &"/e"]);
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&img).unwrap(), before, "the image changed");
    drop(holder);
    ok(&[&"put", &img, &host, &"/f.txt"]);
    assert_eq!(ok(&[&"cat", &img, &"/f.txt"]), "hello\n");
    e2fsck_clean(&img);
}

#[test]
fn a_put_that_runs_out_of_space_leaves_nothing_behind() {
    let dir = tmp("put");
    let img = dir.join("disk.img");
    ok(&[&"mkfs", &img, &"--size", &"16M"]);
    let src = dir.join("tree");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("small"), b"x").unwrap();
    std::fs::write(src.join("zbig"), vec![7u8; 24 << 20]).unwrap();
    let o = folio(&[&"put", &img, &src, &"/tree"]);
    assert!(!o.status.success(), "a 24 MiB file fit in 16 MiB");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no space left"), "{err}");
    // Nothing of the copy is left, and nothing waits in the journal.
    assert_eq!(ok(&[&"ls", &img, &"/"]), "lost+found\n");
    let info = ok(&[&"info", &img]);
    assert!(!info.contains("needs_recovery"), "{info}");
    e2fsck_clean(&img);
    // Space is all back: the same tree minus the big file fits.
    std::fs::remove_file(src.join("zbig")).unwrap();
    ok(&[&"put", &img, &src, &"/tree"]);
    e2fsck_clean(&img);
}

#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let dir = tmp("pipe");
    let img = dir.join("disk.img");
    ok(&[&"mkfs", &img, &"--size", &"16M"]);
    let host = dir.join("big");
    std::fs::write(&host, vec![b'a'; 4 << 20]).unwrap();
    ok(&[&"put", &img, &host, &"/big"]);
    for args in [
        vec!["cat", "/big"],
        vec!["io", "/big", "-c", "pread -v 0 1m"],
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_folio"));
        c.arg(args[0]).arg(&img).args(&args[1..]);
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 16];
        out.read_exact(&mut first).unwrap();
        drop(out);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(o.status.code(), Some(101), "{args:?}: {err}");
    }
    e2fsck_clean(&img);
}

#[test]
fn a_failed_or_refused_mkfs_leaves_the_target_alone() {
    let dir = tmp("mkfs");
    let img = dir.join("disk.img");
    ok(&[&"mkfs", &img, &"--size", &"16M"]);
    ok(&[&"mkdir", &img, &"/keep"]);
    let before = std::fs::read(&img).unwrap();
    // An existing filesystem needs -F, as mke2fs asks first.
    let o = folio(&[&"mkfs", &img, &"--size", &"16M"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("use -F"));
    // Bad arguments and impossible sizes fail before a byte is written.
    for args in [
        vec!["-b", "3000", "--size", "128M"],
        vec!["--size", "1k"],
        vec!["--size", "17T"],
        vec!["-I", "100", "--size", "16M"],
    ] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"mkfs", &"-F", &img];
        for x in &args {
            a.push(x);
        }
        let o = folio(&a);
        assert!(!o.status.success(), "mkfs {args:?} succeeded");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "mkfs {args:?} changed the image"
        );
    }
    // No scratch file is left beside it.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // demo does not overwrite an image it did not make, and remakes its own.
    let o = folio(&[&"demo", &img]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a folio demo image"));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let demo = dir.join("demo.img");
    ok(&[&"demo", &demo]);
    ok(&[&"demo", &demo]);
    // With -F, mkfs replaces the filesystem.
    ok(&[&"mkfs", &"-F", &img, &"--size", &"16M"]);
    assert_eq!(ok(&[&"ls", &img, &"/"]), "lost+found\n");
    e2fsck_clean(&img);
}

#[test]
fn get_keeps_holes_and_symlink_times() {
    use std::os::unix::fs::MetadataExt;
    let dir = tmp("get");
    let img = dir.join("demo.img");
    ok(&[&"demo", &img]);
    // The demo's sparse.bin has one byte at 5 GiB: the copy must stay
    // sparse (before, 5 GB were written).
    let out = dir.join("sparse.bin");
    ok(&[&"get", &img, &"/sparse.bin", &out]);
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), (5 << 30) + 15);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );
    let mut tail = vec![0u8; 15];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&out).unwrap(),
        &mut tail,
        5 << 30,
    )
    .unwrap();
    assert_eq!(&tail, b"a byte at 5 GiB");
    // A symlink keeps its own mtime.
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::os::unix::fs::symlink("target", src.join("ln")).unwrap();
    let st = Command::new("touch")
        .args(["-h", "-d", "2001-02-03 04:05:06"])
        .arg(src.join("ln"))
        .status()
        .unwrap();
    assert!(st.success());
    let want = std::fs::symlink_metadata(src.join("ln")).unwrap().mtime();
    ok(&[&"put", &img, &src, &"/src"]);
    let back = dir.join("back");
    ok(&[&"get", &img, &"/src", &back]);
    let got = std::fs::symlink_metadata(back.join("ln")).unwrap();
    assert!(got.file_type().is_symlink());
    assert_eq!(got.mtime(), want, "the symlink's mtime was not kept");
    // A file with more data than the host has room for is refused before
    // it is made (root: a 1 MiB tmpfs as the host side).
    std::fs::write(src.join("big"), vec![0x5Au8; 3 << 20]).unwrap();
    ok(&[&"put", &img, &src.join("big"), &"/big"]);
    if unsafe_free_is_root() {
        let small = dir.join("small");
        std::fs::create_dir(&small).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        let o = folio(&[&"get", &img, &"/big", &small.join("big")]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let made = small.join("big").exists();
        let _ = Command::new("umount").arg(&small).status();
        assert!(!o.status.success(), "get into a full host succeeded");
        assert!(err.contains("no space left on the host"), "{err}");
        assert!(!made, "the refused file was made");
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
    }
    e2fsck_clean(&img);
}

#[test]
fn mounting_twice_is_refused_before_daemonising() {
    let root = unsafe_free_is_root();
    if !(root && Path::new("/dev/fuse").exists()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with FUSE"
        );
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    let dir = tmp("mount");
    let img = dir.join("disk.img");
    ok(&[&"mkfs", &img, &"--size", &"16M"]);
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    ok(&[&"mount", &img, &a]);
    // On the same mount point: refused, nothing stacked.
    let other = dir.join("other.img");
    ok(&[&"mkfs", &other, &"--size", &"16M"]);
    let o = folio(&[&"mount", &other, &a]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    // The same image elsewhere: refused, naming the holder.
    let o2 = folio(&[&"mount", &img, &b]);
    let err2 = String::from_utf8_lossy(&o2.stderr).into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let stacked = mounts
        .lines()
        .filter(|l| l.contains(a.to_str().unwrap()))
        .count();
    ok(&[&"umount", &a]);
    assert!(
        !o.status.success() && err.contains("already a mount point"),
        "{err}"
    );
    assert!(!o2.status.success() && err2.contains("in use by"), "{err2}");
    assert_eq!(stacked, 1, "a second mount was stacked");
    e2fsck_clean(&img);
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn mkfs_and_check_follow_e2fsprogs_conventions() {
    let dir = tmp("conv");
    let info = |img: &Path, field: &str| -> String {
        ok(&[&"info", &img])
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_default()
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string()
    };
    // mke2fs's positional size: a suffix, KiB without one, blocks with -b.
    let a = dir.join("a.img");
    ok(&[&"mkfs", &"-q", &a, &"64M"]);
    assert_eq!(info(&a, "Block count"), "65536");
    let b = dir.join("b.img");
    ok(&[&"mkfs", &"-q", &"-b", &"4k", &b, &"16384"]);
    assert_eq!(info(&b, "Block size"), "4096");
    assert_eq!(info(&b, "Block count"), "16384");
    let c = dir.join("c.img");
    ok(&[&"mkfs", &"-q", &c, &"32768"]);
    assert_eq!(info(&c, "Block count"), "32768");
    for img in [&a, &b, &c] {
        e2fsck_clean(img);
    }
    // mke2fs's refusals.
    for (args, why) in [
        (vec!["-i", "100", "64M"], "invalid inode ratio"),
        (vec!["--size", "64MB"], "ambiguous size"),
        (vec!["-b", "3k", "64M"], "block size"),
    ] {
        let d = dir.join("d.img");
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"mkfs", &d];
        for x in &args {
            a.push(x);
        }
        let o = folio(&a);
        assert!(!o.status.success(), "mkfs {args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "mkfs {args:?}: {err}");
        assert!(!d.exists() || std::fs::metadata(&d).unwrap().len() == 0);
    }
    // check: e2fsck's options and exit codes.
    for flags in [vec![], vec!["-f", "-n"], vec!["-y"], vec!["-p", "-f"]] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"check"];
        for x in &flags {
            a.push(x);
        }
        a.push(&c);
        assert_eq!(folio(&a).status.code(), Some(0), "check {flags:?}");
    }
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    assert_eq!(folio(&[&"check", &"-n", &junk]).status.code(), Some(8));
    // A descriptor counting the wrong number of free blocks (ext2: no
    // checksum hides it): problems found, none repaired.
    let e = dir.join("e.img");
    ok(&[&"mkfs", &"-q", &"-t", &"ext2", &e, &"16M"]);
    let mut bytes = std::fs::read(&e).unwrap();
    let desc = 2 * 1024 + 0x0C;
    let v = u16::from_le_bytes([bytes[desc], bytes[desc + 1]]) - 5;
    bytes[desc..desc + 2].copy_from_slice(&v.to_le_bytes());
    std::fs::write(&e, &bytes).unwrap();
    let o = folio(&[&"check", &"-y", &e]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot repair"));
}

/// mkfs's other mke2fs options: `-n` writes nothing and prints what
/// `mkfs.ext4 -n` prints for the same sizes (every `-T` usage type, `-N`),
/// `-m` (fractions too) sets the reserved count mke2fs sets, `-U` the
/// UUID, `-E root_owner=` the root directory's owner; unknown `-T`/`-E`
/// are refused.
#[test]
fn mkfs_n_m_u_e_t_follow_mke2fs() {
    use std::os::unix::fs::MetadataExt;
    let dir = tmp("mke2fs-opts");
    let img = dir.join("a.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let have_mke2fs = std::process::Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .is_ok();
    let line = |out: String| -> String {
        out.lines()
            .find(|l| l.starts_with("Creating filesystem"))
            .unwrap_or_default()
            .to_string()
    };
    for opt in [
        vec!["-T", "floppy"],
        vec!["-T", "small"],
        vec!["-T", "news"],
        vec!["-T", "largefile"],
        vec!["-T", "hurd"],
        vec!["-N", "5000"],
        vec!["-N", "777"],
        vec![],
    ] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"mkfs", &"-n"];
        for x in &opt {
            a.push(x);
        }
        a.push(&img);
        let ours = line(ok(&a));
        assert!(!ours.is_empty(), "mkfs -n {opt:?} printed its layout");
        assert!(
            std::fs::read(&img).unwrap().iter().all(|&b| b == 0),
            "-n wrote nothing"
        );
        if have_mke2fs {
            let theirs = std::process::Command::new("mkfs.ext4")
                .args(["-n", "-F"])
                .args(&opt)
                .arg(&img)
                .output()
                .unwrap();
            assert_eq!(
                ours,
                line(String::from_utf8_lossy(&theirs.stdout).into_owned()),
                "mkfs -n {opt:?}"
            );
        }
    }
    ok(&[
        &"mkfs",
        &"-q",
        &"-m",
        &"0.5",
        &"-U",
        &"01234567-89ab-cdef-0123-456789abcdef",
        &"-E",
        &"root_owner=1000:1001,lazy_itable_init=1",
        &img,
    ]);
    e2fsck_clean(&img);
    let info = ok(&[&"info", &img]);
    assert!(
        info.contains("01234567-89ab-cdef-0123-456789abcdef"),
        "{info}"
    );
    let reserved = info
        .lines()
        .find(|l| l.starts_with("Reserved block count"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        reserved, "327",
        "0.5% of 65,536 blocks, truncated as mke2fs does"
    );
    let st = ok(&[&"stat", &img, &"/"]);
    assert!(
        st.contains("Uid: ( 1000)") && st.contains("Gid: ( 1001)"),
        "{st}"
    );
    // -O, given twice: the lists apply in order.
    ok(&[
        &"mkfs",
        &"-q",
        &"-F",
        &"-O",
        &"^has_journal,^metadata_csum",
        &"-O",
        &"uninit_bg",
        &img,
    ]);
    e2fsck_clean(&img);
    let info = ok(&[&"info", &img]);
    let features = info
        .lines()
        .find(|l| l.starts_with("Filesystem features"))
        .unwrap_or_default();
    assert!(
        features.contains("uninit_bg")
            && features.contains("extent")
            && !features.contains("has_journal")
            && !features.contains("metadata_csum"),
        "{features}"
    );
    for (args, why) in [
        (vec!["-T", "tiny"], "usage type"),
        (vec!["-E", "stride=4"], "not supported"),
        (vec!["-m", "60"], "reserved blocks percent"),
        (vec!["-U", "nonsense"], "invalid UUID"),
        (vec!["-O", "casefold"], "cannot make the casefold feature"),
        (vec!["-O", "bogus"], "invalid filesystem option"),
        (vec!["-O", "^extent"], "extents must be enabled"),
        (vec!["-O", "^sparse_super"], "non-sparse"),
    ] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"mkfs", &"-F"];
        for x in &args {
            a.push(x);
        }
        a.push(&img);
        let before = std::fs::metadata(&img).unwrap().mtime();
        let o = folio(&a);
        assert!(!o.status.success(), "mkfs {args:?} succeeded");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "mkfs {args:?}"
        );
        assert_eq!(std::fs::metadata(&img).unwrap().mtime(), before);
    }
}

/// rewinddir shows the directory as it is now (issue 15, point 2): a
/// stream read once, then 1,000 creates, then rewinddir, lists them all.
#[test]
fn rewinddir_sees_new_entries() {
    let have_perl = Command::new("perl").arg("-e1").status().is_ok();
    if !(unsafe_free_is_root() && Path::new("/dev/fuse").exists() && have_perl) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with FUSE and perl"
        );
        eprintln!("skipped: needs root, /dev/fuse and perl");
        return;
    }
    let dir = tmp("rewind");
    let img = dir.join("disk.img");
    ok(&[&"mkfs", &"-q", &img, &"32M"]);
    let m = dir.join("m");
    std::fs::create_dir(&m).unwrap();
    ok(&[&"mount", &img, &m]);
    let out = Command::new("perl")
        .arg("-e")
        .arg(
            r#"opendir(D, $ARGV[0]) or die; my @a = readdir(D);
               for (1..1000) { open(F, ">$ARGV[0]/f$_") or die; close F }
               rewinddir(D); my @b = readdir(D); print scalar(@a), " ", scalar(@b);"#,
        )
        .arg(&m)
        .output()
        .unwrap();
    ok(&[&"umount", &m]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3 1003");
    e2fsck_clean(&img);
}

/// The commands that only read an image confine themselves once it is
/// open (issue 17): asked through the debug-build probe, `ls` can neither
/// open a host file nor run a program; with `--no-confine` it can.
#[test]
fn read_only_commands_are_confined() {
    let dir = common::scratch("misuse", "confine");
    let img = dir.join("img");
    common::ok(&[&"mkfs", &"-q", &img, &"--size", &"16M"]);
    for (extra, want) in [
        (None, "open=errno1 exec=errno1"),
        (Some("--no-confine"), "open=ok exec=ok"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_folio"));
        c.env("FOLIO_DEBUG_ESCAPE", "1")
            .arg("ls")
            .arg(&img)
            .arg("/");
        if let Some(e) = extra {
            c.arg(e);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("lost+found"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("escape probe: {want}")),
            "{extra:?}: {err}"
        );
    }
    // `get` is confined too, but may write its output tree: the copy
    // lands, while opening a host file elsewhere (Landlock: EACCES) and
    // running a program (seccomp: EPERM) fail.
    let src = dir.join("in.txt");
    std::fs::write(&src, b"payload").unwrap();
    common::ok(&[&"put", &img, &src, &"/in.txt"]);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_folio"))
        .env("FOLIO_DEBUG_ESCAPE", "1")
        .arg("get")
        .arg(&img)
        .arg("/")
        .arg(out.join("tree"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(out.join("tree/in.txt")).unwrap(), b"payload");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("escape probe: open=errno13 exec=errno1"),
        "{err}"
    );
    e2fsck_clean(&img);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Point 9: long work shows a progress bar on a terminal (here a pty made
/// by script(1)), and nothing in a pipe or with -q.
#[test]
fn progress_bars_only_on_a_terminal() {
    if Command::new("script").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "script(1) is missing under CI"
        );
        eprintln!("SKIP: script(1) is not installed");
        return;
    }
    let dir = tmp("progress");
    let img = dir.join("p.img");
    // An existing file: mkfs writes every inode table, so it takes a while.
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(2 << 30))
        .unwrap();
    let bin = env!("CARGO_BIN_EXE_folio");
    let on_tty = |cmd: &str| -> String {
        let o = Command::new("script")
            .args(["-qec", cmd, "/dev/null"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{cmd}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let shown = on_tty(&format!("{bin} mkfs -F {}", img.display()));
    assert!(
        shown.contains("mkfs [") && shown.contains("groups"),
        "{shown}"
    );
    assert!(shown.contains("Creating filesystem"), "{shown}");
    let quiet = on_tty(&format!("{bin} mkfs -F -q {}", img.display()));
    assert!(!quiet.contains("groups"), "-q: {quiet}");
    let src = dir.join("tree");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..50 {
        std::fs::write(src.join("d").join(format!("f{i}")), vec![7u8; 5000]).unwrap();
    }
    let shown = on_tty(&format!("{bin} put {} {} /t", img.display(), src.display()));
    assert!(
        shown.contains("put ") && shown.contains("entries"),
        "{shown}"
    );
    let shown = on_tty(&format!("{bin} check {}", img.display()));
    assert!(
        shown.contains("check [") && shown.contains("counters match"),
        "{shown}"
    );
    // Piped: nothing but the command's own output.
    let o = folio(&[&"mkfs", &"-F", &img]);
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = folio(&[&"put", &img, &src, &"/t"]);
    assert!(o.status.success() && o.stderr.is_empty(), "{o:?}");
    let o = folio(&[&"check", &img]);
    assert!(o.status.success() && o.stderr.is_empty(), "{o:?}");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let o = folio(&[&"get", &img, &"/t", &out]);
    assert!(o.status.success() && o.stderr.is_empty(), "{o:?}");
    e2fsck_clean(&img);
}
