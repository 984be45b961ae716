//! Large xattr values in inodes of their own (ea_inode, issue 18): values
//! the kernel wrote read back through folio; values folio writes,
//! replaces and drops leave images e2fsck calls clean and whose values the
//! kernel reads; a tampered value is an error, never wrong bytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use folio_cli::hostxattr;
use folio_ext4::mkfs::{mkfs_path, Features, FsType, MkfsOptions};
use folio_ext4::{Error, Filesystem, OpenOptions, Owner, XattrMode, ROOT_INO};
use folio_testkit::*;

const ME: Owner = Owner { uid: 0, gid: 0 };

/// (file name, attribute name) → value.
type Model = BTreeMap<(String, String), Vec<u8>>;

fn tools_present() -> bool {
    require(
        have_tool("mkfs.ext4") && have_tool("e2fsck"),
        "e2fsprogs (mkfs.ext4, e2fsck) is not installed",
    )
}

/// Mount `img` read-write with the kernel, run `f` on the mount, unmount.
fn with_kernel_rw(img: &Path, f: impl FnOnce(&Path)) {
    let dir = TempDir::new("ea-mnt");
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(img)
        .arg(&dir.path));
    f(&dir.path);
    run(Command::new("umount").arg(&dir.path));
}

fn file(fs: &Filesystem, name: &str) -> u32 {
    match fs.lookup(ROOT_INO, name.as_bytes()) {
        Ok(ino) => ino,
        Err(_) => fs.create(ROOT_INO, name.as_bytes(), 0o644, ME).unwrap(),
    }
}

fn set(fs: &Filesystem, model: &mut Model, f: &str, name: &str, value: Vec<u8>) {
    let ino = file(fs, f);
    fs.set_xattr(ino, name.as_bytes(), &value, XattrMode::Any)
        .unwrap_or_else(|e| panic!("set {f} {name} ({} bytes): {e}", value.len()));
    model.insert((f.into(), name.into()), value);
}

/// What folio does to an image: replace, remove, add, and drop an owner.
fn folio_changes(fs: &Filesystem, model: &mut Model, rng: &mut Rng) {
    set(fs, model, "f1", "user.a", rng.bytes(5000));
    set(fs, model, "f1", "user.b", rng.bytes(65536));
    set(fs, model, "f1", "user.a", rng.bytes(30000));
    // An owner deleted with its values.
    set(fs, model, "gone", "user.c", rng.bytes(9000));
    fs.unlink(ROOT_INO, b"gone").unwrap();
    model.retain(|(f, _), _| f != "gone");
    // Medium values that fill the inode and the block: the rest go to EA
    // inodes, as the kernel places them.
    for i in 0..6 {
        set(fs, model, "full", &format!("user.m{i}"), rng.bytes(1500));
    }
    set(fs, model, "full", "user.m0", b"short".to_vec());
    // A large value back to a small one, and one removed.
    set(fs, model, "f2", "user.d", rng.bytes(20000));
    set(fs, model, "f2", "user.e", rng.bytes(12000));
    set(fs, model, "f2", "user.d", b"tiny".to_vec());
    let f2 = file(fs, "f2");
    fs.remove_xattr(f2, b"user.e").unwrap();
    model.remove(&("f2".into(), "user.e".into()));
    // Too large for any attribute.
    assert!(matches!(
        fs.set_xattr(f2, b"user.x", &vec![1u8; 65537], XattrMode::Any),
        Err(Error::NoSpace)
    ));
}

fn folio_agrees(fs: &Filesystem, model: &Model, what: &str) {
    let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ((f, n), v) in model {
        let ino = fs.lookup(ROOT_INO, f.as_bytes()).unwrap();
        let got = fs
            .get_xattr(ino, n.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: {f} {n}: {e}"));
        assert!(
            &got == v,
            "{what}: {f} {n}: {} bytes, wanted {}",
            got.len(),
            v.len()
        );
        names.entry(f.clone()).or_default().push(n.clone());
    }
    for (f, mut want) in names {
        let ino = fs.lookup(ROOT_INO, f.as_bytes()).unwrap();
        let mut got: Vec<String> = fs
            .list_xattr(ino)
            .unwrap()
            .into_iter()
            .map(|n| String::from_utf8(n).unwrap())
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{what}: names of {f}");
    }
}

fn kernel_agrees(dir: &Path, model: &Model, what: &str) {
    for ((f, n), v) in model {
        let got = hostxattr::get(&dir.join(f), n.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: the kernel reads {f} {n}: {e}"));
        assert!(&got == v, "{what}: the kernel's {f} {n} differs");
    }
}

#[test]
fn ea_inode_values_round_trip_with_the_kernel() {
    if !tools_present() {
        return;
    }
    let mount_ok = require(
        can_loop_mount(),
        "not root or no loop devices: kernel comparison skipped",
    );
    let t = TempDir::new("ea-rt");
    let mut rng = Rng::new(0xEA);
    for (i, (maker, bs)) in [("mkfs.ext4", 1024u32), ("mkfs.ext4", 4096), ("folio", 4096)]
        .into_iter()
        .enumerate()
    {
        let img = t.join(&format!("ea{i}.img"));
        let what = format!("{maker} -O ea_inode bs={bs}");
        if maker == "folio" {
            let mut features = Features::defaults(FsType::Ext4);
            features.edit("ea_inode").unwrap();
            let opts = MkfsOptions {
                block_size: Some(bs),
                features: Some(features),
                ..Default::default()
            };
            mkfs_path(&img, Some(64 << 20), &opts).unwrap();
            let out = run(Command::new("dumpe2fs").arg("-h").arg(&img));
            assert!(out.contains("ea_inode"), "{what}: {out}");
        } else {
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "ea_inode", "-b", &bs.to_string()])
                .arg(&img)
                .arg("64M"));
        }
        let mut model = Model::new();
        if mount_ok {
            // The kernel's own EA inodes, for folio to read and change.
            let vals = [
                ("k1", "user.big", rng.bytes(10240)),
                ("k1", "user.huge", rng.bytes(65536)),
                ("k1", "user.small", b"abc".to_vec()),
                ("k2", "user.mid", rng.bytes(3000)),
            ];
            with_kernel_rw(&img, |d| {
                for (f, n, v) in &vals {
                    let p = d.join(f);
                    if !p.exists() {
                        std::fs::write(&p, b"k").unwrap();
                    }
                    hostxattr::set(&p, n.as_bytes(), v).unwrap();
                }
            });
            for (f, n, v) in vals {
                model.insert((f.into(), n.into()), v);
            }
        }
        let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
        folio_agrees(&fs, &model, &format!("{what}, as the kernel left it"));
        if mount_ok {
            let k1 = fs.lookup(ROOT_INO, b"k1").unwrap();
            let big = rng.bytes(40000);
            fs.set_xattr(k1, b"user.big", &big, XattrMode::Replace)
                .unwrap();
            model.insert(("k1".into(), "user.big".into()), big);
            fs.remove_xattr(k1, b"user.huge").unwrap();
            model.remove(&("k1".into(), "user.huge".into()));
        }
        folio_changes(&fs, &mut model, &mut rng);
        folio_agrees(&fs, &model, &format!("{what}, written"));
        let (_, overruns) = fs.handle_stats();
        assert_eq!(overruns, 0, "{what}: handles overran their credits");
        let problems = fs.check_counts(None).unwrap();
        assert!(problems.is_empty(), "{what}: {problems:?}");
        fs.close().unwrap();
        e2fsck(&img).unwrap_or_else(|e| panic!("{what}: {e}"));
        let fs = open_read_only(&img, false);
        folio_agrees(&fs, &model, &format!("{what}, reopened"));
        drop(fs);
        if mount_ok {
            let m = LoopMount::new(&img).unwrap_or_else(|e| panic!("{what}: kernel mount: {e}"));
            kernel_agrees(&m.dir.path, &model, &what);
        }
    }
}

#[test]
fn a_tampered_ea_inode_value_is_an_error() {
    if !tools_present() {
        return;
    }
    let t = TempDir::new("ea-bad");
    let img = t.join("ea.img");
    let mut features = Features::defaults(FsType::Ext4);
    features.edit("ea_inode").unwrap();
    let opts = MkfsOptions {
        block_size: Some(4096),
        features: Some(features),
        ..Default::default()
    };
    mkfs_path(&img, Some(32 << 20), &opts).unwrap();
    let value = Rng::new(7).bytes(20000);
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let ino = fs.create(ROOT_INO, b"f", 0o644, ME).unwrap();
    fs.set_xattr(ino, b"user.big", &value, XattrMode::Any)
        .unwrap();
    fs.set_xattr(ino, b"user.small", b"ok", XattrMode::Any)
        .unwrap();
    fs.close().unwrap();
    // Flip one byte of the value where it lies on the disk.
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w == &value[..64])
        .expect("the value is on the disk");
    bytes[at + 5000] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();
    let fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
    let r = fs.get_xattr(ino, b"user.big");
    assert!(
        matches!(r, Err(Error::Corrupted { .. })),
        "a tampered value: {:?}",
        r.map(|v| v.len())
    );
    assert_eq!(
        r.unwrap_err().errno(),
        libc::EUCLEAN,
        "EFSCORRUPTED, as the kernel"
    );
    assert_eq!(fs.get_xattr(ino, b"user.small").unwrap(), b"ok");
    fs.close().unwrap();
}
