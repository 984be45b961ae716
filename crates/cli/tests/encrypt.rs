//! Encrypted directories without their keys (fscrypt, issue 18). The
//! kernel, with a key, makes an encrypted tree; without it, it shows
//! no-key names, no-key symlink targets and ENOKEY for contents. folio
//! (library, CLI and mount) must show exactly that, refuse with ENOKEY
//! what needs the key, and still delete by no-key name; afterwards
//! e2fsck calls the image clean, the kernel without the key sees folio's
//! view, and the kernel with the key finds every remaining plaintext
//! name and byte intact. Needs root, loop devices and the kernel's
//! fscrypt (this machine's kernel has it).

#![allow(unsafe_code)]

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use folio_ext4::{
    FileType, Filesystem, OpenFlags, OpenOptions, Owner, RenameFlags, SetAttr, ROOT_INO,
};

const ME: Owner = Owner { uid: 0, gid: 0 };
const KEY: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = (i as u8).wrapping_mul(7).wrapping_add(3);
        i += 1;
    }
    k
};

fn prerequisites() -> bool {
    let tools = ["mkfs.ext4", "e2fsck", "mount"].iter().all(|t| {
        ["/sbin", "/usr/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(t).exists())
    });
    let ok = tools
        && can_mount()
        && Path::new("/dev/loop-control").exists()
        && Path::new("/sys/fs/ext4/features/encryption").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true but e2fsprogs, loop devices or the kernel's fscrypt are missing"
        );
        eprintln!("SKIP: the encrypt test needs root, loop devices and fscrypt");
    }
    ok
}

fn sh(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn kmount(img: &Path, mnt: &Path) {
    sh(Command::new("mount").args(["-o", "loop"]).arg(img).arg(mnt));
}

fn kumount(mnt: &Path) {
    sh(Command::new("umount").arg(mnt));
}

/// The kernel's fscrypt ioctls (linux/fscrypt.h), v2 policies.
mod keys {
    use super::*;
    const ADD_KEY: libc::c_ulong = 0xC050_6617; // _IOWR('f', 23, fscrypt_add_key_arg)
    const SET_POLICY: libc::c_ulong = 0x800C_6613; // _IOR('f', 19, policy_v1)
    const SPEC_IDENTIFIER: u32 = 2;

    fn ioctl(path: &Path, req: libc::c_ulong, arg: &mut [u8]) {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: the descriptor is open for the call; `arg` is a buffer
        // of the size this request reads and writes.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), req, arg.as_mut_ptr()) };
        assert_eq!(
            rc,
            0,
            "fscrypt ioctl {req:#x} on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }

    /// FS_IOC_ADD_ENCRYPTION_KEY: the key's identifier.
    pub fn add(mnt: &Path) -> [u8; 16] {
        let mut arg = vec![0u8; 80 + KEY.len()];
        arg[..4].copy_from_slice(&SPEC_IDENTIFIER.to_le_bytes());
        arg[40..44].copy_from_slice(&(KEY.len() as u32).to_le_bytes());
        arg[80..].copy_from_slice(&KEY);
        ioctl(mnt, ADD_KEY, &mut arg);
        arg[8..24].try_into().unwrap()
    }

    /// FS_IOC_SET_ENCRYPTION_POLICY, v2: AES-256-XTS contents,
    /// AES-256-CTS names, names padded to 16 bytes.
    pub fn set_policy(dir: &Path, id: &[u8; 16]) {
        let mut p = vec![2u8, 1, 4, 2, 0, 0, 0, 0];
        p.extend_from_slice(id);
        ioctl(dir, SET_POLICY, &mut p);
    }
}

/// What a tree shows of each node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    ino: u64,
    kind: &'static str,
    mode: u32,
    size: u64,
    nlink: u64,
    target: Vec<u8>,
    /// A regular file's bytes, or the errno reading it gave.
    data: Result<Vec<u8>, i32>,
}

type Tree = BTreeMap<Vec<u8>, Node>;

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = prefix.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// The tree under a host directory (the kernel's or folio's mount).
fn host_tree(root: &Path) -> Tree {
    fn walk(dir: &Path, prefix: &[u8], out: &mut Tree) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = join(prefix, e.file_name().as_bytes());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "other"
            };
            let node = Node {
                ino: m.ino(),
                kind,
                mode: m.mode() & 0o7777,
                size: m.len(),
                nlink: m.nlink(),
                target: if ft.is_symlink() {
                    std::fs::read_link(e.path())
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                } else {
                    Vec::new()
                },
                data: if ft.is_file() {
                    std::fs::read(e.path()).map_err(|e| e.raw_os_error().unwrap_or(-1))
                } else {
                    Ok(Vec::new())
                },
            };
            out.insert(rel.clone(), node);
            if ft.is_dir() {
                walk(&e.path(), &rel, out);
            }
        }
    }
    let mut out = Tree::new();
    walk(root, b"", &mut out);
    out
}

/// The same through the library.
fn folio_tree(fs: &Filesystem, dir: u32) -> Tree {
    fn walk(fs: &Filesystem, dir: u32, prefix: &[u8], out: &mut Tree) {
        for e in fs.read_dir(dir).unwrap() {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let rel = join(prefix, &e.name);
            assert_eq!(
                fs.lookup(dir, &e.name).unwrap(),
                e.ino,
                "lookup of a listed name"
            );
            let st = fs.stat(e.ino).unwrap();
            let kind = match st.file_type {
                FileType::Directory => "dir",
                FileType::Symlink => "symlink",
                FileType::Regular => "file",
                FileType::Fifo => "fifo",
                _ => "other",
            };
            let data = if kind == "file" {
                let mut b = vec![0u8; st.size as usize];
                fs.read(e.ino, 0, &mut b).map(|_| b).map_err(|e| e.errno())
            } else {
                Ok(Vec::new())
            };
            out.insert(
                rel.clone(),
                Node {
                    ino: u64::from(e.ino),
                    kind,
                    mode: u32::from(st.mode & 0o7777),
                    size: st.size,
                    nlink: u64::from(st.nlink),
                    target: if kind == "symlink" {
                        fs.readlink(e.ino).unwrap()
                    } else {
                        Vec::new()
                    },
                    data,
                },
            );
            if kind == "dir" {
                walk(fs, e.ino, &rel, out);
            }
        }
    }
    let mut out = Tree::new();
    walk(fs, dir, b"", &mut out);
    out
}

fn assert_same(a: &Tree, b: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => diffs.push(format!("{}: only on the left", String::from_utf8_lossy(k))),
            Some(w) if w != v => {
                diffs.push(format!("{}: {v:?} != {w:?}", String::from_utf8_lossy(k)))
            }
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        diffs.push(format!("{}: only on the right", String::from_utf8_lossy(k)));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(8)]
    );
}

/// The encrypted tree the kernel writes with the key: plaintext path →
/// content (files) or target (symlinks); directories map to nothing.
fn populate(mnt: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let id = keys::add(mnt);
    let plain = mnt.join("plain");
    std::fs::create_dir(&plain).unwrap();
    for i in 0..4 {
        std::fs::write(
            plain.join(format!("p{i}")),
            format!("plain {i}\n").repeat(50),
        )
        .unwrap();
    }
    let secret = mnt.join("secret");
    std::fs::create_dir(&secret).unwrap();
    keys::set_policy(&secret, &id);
    let mut model = BTreeMap::new();
    let mut file = |rel: String, data: Vec<u8>| {
        std::fs::write(secret.join(&rel), &data).unwrap();
        model.insert(rel.into_bytes(), data);
    };
    for i in 0..5 {
        file(
            format!("f{i}.txt"),
            format!("secret {i}\n").repeat(100 + i).into_bytes(),
        );
    }
    file("y".repeat(120), b"mid".to_vec());
    std::fs::create_dir(secret.join("sub")).unwrap();
    file(format!("sub/{}", "x".repeat(200)), b"long".to_vec());
    file(format!("sub/{}", "z".repeat(180)), vec![7u8; 9000]);
    std::fs::create_dir(secret.join("empty")).unwrap();
    std::fs::create_dir(secret.join("many")).unwrap();
    for i in 0..300 {
        file(format!("many/entry-{i:03}"), format!("{i}").into_bytes());
    }
    std::os::unix::fs::symlink("target/of/link", secret.join("lnk")).unwrap();
    // Past 60 bytes: the ciphertext target lives in a block.
    std::os::unix::fs::symlink("t/".repeat(50), secret.join("longlnk")).unwrap();
    let fifo = CString::new(secret.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path alive for the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    for d in ["sub", "empty", "many"] {
        model.insert(d.as_bytes().to_vec(), Vec::new());
    }
    model.insert(b"lnk".to_vec(), b"target/of/link".to_vec());
    model.insert(b"longlnk".to_vec(), "t/".repeat(50).into_bytes());
    model.insert(b"pipe".to_vec(), Vec::new());
    model
}

/// Plaintext path → inode number, from the kernel with the key.
fn inodes(root: &Path) -> BTreeMap<Vec<u8>, u64> {
    host_tree(root)
        .into_iter()
        .map(|(k, v)| (k, v.ino))
        .collect()
}

fn errno<T: std::fmt::Debug>(r: folio_ext4::Result<T>) -> i32 {
    r.expect_err("must fail").errno()
}

/// What folio must refuse in an encrypted directory, and what it must
/// do there without the key. Returns the plaintext paths it removed.
fn folio_changes(fs: &Filesystem, view: &Tree, by_ino: &BTreeMap<u64, Vec<u8>>) -> Vec<Vec<u8>> {
    let secret = fs.lookup(ROOT_INO, b"secret").unwrap();
    let plain = fs.lookup(ROOT_INO, b"plain").unwrap();
    // The no-key name of a plaintext path.
    let nokey = |plain_path: &str| -> Vec<u8> {
        let (k, _) = view
            .iter()
            .find(|(_, n)| by_ino.get(&n.ino).map(Vec::as_slice) == Some(plain_path.as_bytes()))
            .unwrap_or_else(|| panic!("{plain_path} not in the no-key view"));
        k.rsplit(|&c| c == b'/').next().unwrap().to_vec()
    };
    let f0 = nokey("f0.txt");
    let f1 = fs.lookup(secret, &nokey("f1.txt")).unwrap();
    let p0 = fs.lookup(plain, b"p0").unwrap();
    // Names need the key.
    assert_eq!(errno(fs.create(secret, b"new", 0o644, ME)), libc::ENOKEY);
    assert_eq!(errno(fs.mkdir(secret, b"d", 0o755, ME)), libc::ENOKEY);
    assert_eq!(errno(fs.symlink(secret, b"s", b"t", ME)), libc::ENOKEY);
    assert_eq!(
        errno(fs.mknod(secret, b"n", 0o10644, (0, 0), ME)),
        libc::ENOKEY
    );
    assert_eq!(errno(fs.link(p0, secret, b"p0")), libc::ENOKEY);
    let none = RenameFlags::default();
    assert_eq!(
        errno(fs.rename(secret, &f0, secret, b"g", none)),
        libc::ENOKEY
    );
    assert_eq!(
        errno(fs.rename(plain, b"p1", secret, b"p1", none)),
        libc::ENOKEY
    );
    assert_eq!(
        errno(fs.rename(secret, &f0, plain, b"out", none)),
        libc::ENOKEY
    );
    assert_eq!(errno(fs.create(secret, &f0, 0o644, ME)), libc::EEXIST);
    assert_eq!(errno(fs.lookup(secret, b"not-a-no-key-name")), libc::ENOENT);
    assert_eq!(errno(fs.lookup(secret, b"AAAAAAAAAAA")), libc::ENOENT);
    // Contents need the key.
    assert_eq!(errno(fs.write(f1, 0, b"x")), libc::ENOKEY);
    let trunc = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(errno(fs.setattr(f1, &trunc)), libc::ENOKEY);
    assert_eq!(errno(fs.fallocate(f1, 0, 0, 4096)), libc::ENOKEY);
    assert_eq!(errno(fs.read_direct(f1, 0, &mut [0u8; 4096])), libc::ENOKEY);
    let o_trunc = OpenFlags {
        truncate: true,
        ..Default::default()
    };
    assert_eq!(
        errno(fs.openat(secret, &nokey("f1.txt"), o_trunc, 0, ME)),
        libc::ENOKEY
    );
    fs.open_ref(f1);
    assert_eq!(errno(fs.read(f1, 0, &mut [0u8; 10])), libc::ENOKEY);
    fs.close_ref(f1).unwrap();
    // The encryption context is nobody's attribute.
    assert!(fs.list_xattr(f1).unwrap().is_empty());
    // What needs no key: attributes, and removing names.
    let chmod = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    fs.setattr(f1, &chmod).unwrap();
    let mut gone = Vec::new();
    fs.unlink(secret, &f0).unwrap();
    gone.push(b"f0.txt".to_vec());
    let sub = fs.lookup(secret, &nokey("sub")).unwrap();
    // A long name: found by its digest form.
    let long = format!("sub/{}", "x".repeat(200));
    let n = nokey(&long);
    assert_eq!(n.len(), 252, "the digest form");
    fs.unlink(sub, &n).unwrap();
    gone.push(long.into_bytes());
    fs.rmdir(secret, &nokey("empty")).unwrap();
    gone.push(b"empty".to_vec());
    let many = fs.lookup(secret, &nokey("many")).unwrap();
    for i in (0..300).step_by(2) {
        let p = format!("many/entry-{i:03}");
        fs.unlink(many, &nokey(&p)).unwrap();
        gone.push(p.into_bytes());
    }
    fs.unlink(secret, &nokey("lnk")).unwrap();
    gone.push(b"lnk".to_vec());
    // The encrypted directory itself moves within an unencrypted parent.
    fs.rename(ROOT_INO, b"secret", ROOT_INO, b"vault", none)
        .unwrap();
    // Everything unencrypted stays usable.
    let n = fs.create(plain, b"new", 0o644, ME).unwrap();
    fs.write(n, 0, &vec![5u8; 20000]).unwrap();
    fs.rename(plain, b"p1", plain, b"p1-moved", none).unwrap();
    fs.unlink(plain, b"p2").unwrap();
    fs.mkdir(ROOT_INO, b"more", 0o755, ME).unwrap();
    gone
}

fn check_case(dir: &Path, tag: &str, mkfs: &dyn Fn(&Path)) {
    let img = dir.join(format!("{tag}.img"));
    let mnt = dir.join(format!("{tag}.mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    mkfs(&img);
    // The kernel writes an encrypted tree with the key...
    kmount(&img, &mnt);
    let model = populate(&mnt);
    let plain_model = host_tree(&mnt.join("plain"));
    let plain_inos = inodes(&mnt.join("secret"));
    kumount(&mnt);
    e2fsck_clean(&img);
    // ... and shows it without the key.
    kmount(&img, &mnt);
    let kernel_view = host_tree(&mnt.join("secret"));
    kumount(&mnt);
    assert!(kernel_view.values().any(|n| n.data == Err(libc::ENOKEY)));
    assert_eq!(kernel_view.len(), plain_inos.len());

    // folio shows the same, through the CLI...
    let listed = ok(&[&"ls", &img, &"/secret"]);
    let mut want: Vec<String> = kernel_view
        .keys()
        .filter(|k| !k.contains(&b'/'))
        .map(|k| String::from_utf8(k.clone()).unwrap())
        .collect();
    want.sort();
    let mut got: Vec<String> = listed.lines().map(str::to_string).collect();
    got.sort();
    assert_eq!(got, want, "{tag}: folio ls");

    // ... and through the library.
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    assert!(
        fs.read_only_reason().is_none(),
        "{:?}",
        fs.read_only_reason()
    );
    let secret = fs.lookup(ROOT_INO, b"secret").unwrap();
    assert_same(
        &kernel_view,
        &folio_tree(&fs, secret),
        &format!("{tag}: folio's no-key view"),
    );
    let by_ino: BTreeMap<u64, Vec<u8>> = plain_inos.iter().map(|(k, v)| (*v, k.clone())).collect();
    let gone = folio_changes(&fs, &kernel_view, &by_ino);
    let vault = fs.lookup(ROOT_INO, b"vault").unwrap();
    let folio_after = folio_tree(&fs, vault);
    let plain = fs.lookup(ROOT_INO, b"plain").unwrap();
    let plain_after = folio_tree(&fs, plain);
    fs.close().unwrap();
    e2fsck_clean(&img);

    // The mount shows folio's view and answers ENOKEY as the kernel does.
    if tag == "mke2fs-4k" {
        let fm = dir.join("fuse.mnt");
        std::fs::create_dir_all(&fm).unwrap();
        ok(&[&"mount", &img, &fm]);
        let through_mount = host_tree(&fm.join("vault"));
        let any_file = fm.join("vault").join(
            folio_after
                .iter()
                .find(|(k, n)| n.kind == "file" && !k.contains(&b'/'))
                .map(|(k, _)| std::ffi::OsStr::from_bytes(k).to_os_string())
                .unwrap(),
        );
        let open = std::fs::File::open(&any_file).map_err(|e| e.raw_os_error());
        let create = std::fs::File::create(fm.join("vault/new")).map_err(|e| e.raw_os_error());
        let mkdir = std::fs::create_dir(fm.join("vault/d")).map_err(|e| e.raw_os_error());
        ok(&[&"umount", &fm]);
        assert_same(
            &folio_after,
            &through_mount,
            "the folio mount's no-key view",
        );
        assert_eq!(
            open.err(),
            Some(Some(libc::ENOKEY)),
            "open through the mount"
        );
        assert_eq!(
            create.err(),
            Some(Some(libc::ENOKEY)),
            "create through the mount"
        );
        assert_eq!(
            mkdir.err(),
            Some(Some(libc::ENOKEY)),
            "mkdir through the mount"
        );
        e2fsck_clean(&img);
    }

    // The kernel without the key sees what folio left...
    kmount(&img, &mnt);
    assert_same(
        &folio_after,
        &host_tree(&mnt.join("vault")),
        &format!("{tag}: kernel after folio"),
    );
    assert_same(
        &plain_after,
        &host_tree(&mnt.join("plain")),
        &format!("{tag}: plain tree"),
    );
    kumount(&mnt);
    // ... and with the key, every remaining name and byte.
    kmount(&img, &mnt);
    keys::add(&mnt);
    let with_key = host_tree(&mnt.join("vault"));
    kumount(&mnt);
    let mut want = model.clone();
    want.retain(|k, _| !gone.contains(k));
    let got: BTreeMap<Vec<u8>, Vec<u8>> = with_key
        .iter()
        .map(|(k, n)| {
            let v = match n.kind {
                "file" => n.data.clone().unwrap(),
                "symlink" => n.target.clone(),
                _ => Vec::new(),
            };
            (k.clone(), v)
        })
        .collect();
    assert_eq!(got.len(), want.len(), "{tag}: plaintext names left");
    assert!(
        got == want,
        "{tag}: plaintext contents after folio's changes differ"
    );
    assert_eq!(with_key[&b"f1.txt"[..]].mode, 0o600, "the chmod folio made");
    assert!(plain_model.contains_key(&b"p2"[..]));
    e2fsck_clean(&img);
}

#[test]
fn encrypted_trees_show_as_the_kernel_shows_them_without_the_key() {
    if !prerequisites() {
        return;
    }
    let dir: PathBuf = scratch("encrypt", "nokey");
    for bs in ["4096", "1024"] {
        let tag = if bs == "4096" {
            "mke2fs-4k"
        } else {
            "mke2fs-1k"
        };
        check_case(&dir, tag, &|img| {
            sh(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "encrypt", "-b", bs])
                .arg(img)
                .arg("64M"));
        });
    }
    check_case(&dir, "folio-mkfs", &|img| {
        ok(&[&"mkfs", &"-q", &"-O", &"encrypt", &img, &"64M"]);
    });
    let _ = std::fs::remove_dir_all(&dir);
}
