//! Round trips against the oracles: trees made by `mkfs.ext4 -d` read back
//! identically; trees folio writes (then half deletes and renames) pass
//! `e2fsck -fn` and show the same contents through the kernel.

use std::fs;
use std::path::Path;
use std::process::Command;

use folio_ext4::mkfs::{mkfs_path, Features, FsType, MkfsOptions};
use folio_ext4::{Filesystem, OpenOptions, RenameFlags, ROOT_INO};
use folio_testkit::*;

const FILES: usize = 2500;

fn tools_present() -> bool {
    require(
        have_tool("mkfs.ext4") && have_tool("e2fsck"),
        "e2fsprogs (mkfs.ext4, e2fsck) is not installed",
    )
}

#[test]
fn mke2fs_d_trees_read_identically_at_every_block_size() {
    if !tools_present() {
        return;
    }
    let t = TempDir::new("rt-read");
    let src = t.join("src");
    make_tree(&src, 0xF0110, FILES);
    let expect = host_tree(&src);
    assert!(expect.len() > FILES);
    let configs = [
        ("ext4", 1024),
        ("ext4", 2048),
        ("ext4", 4096),
        ("ext4", 65536),
        ("ext3", 1024),
        ("ext3", 4096),
        ("ext2", 1024),
        ("ext2", 4096),
    ];
    for (kind, bs) in configs {
        let img = t.join(&format!("{kind}-{bs}.img"));
        run(Command::new(format!("mkfs.{kind}"))
            .args(["-q", "-F", "-b", &bs.to_string(), "-d"])
            .arg(&src)
            .arg(&img)
            .arg("700M"));
        let mut fs = Filesystem::open_path(
            &img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{kind} bs={bs}: open: {e}"));
        let got = folio_tree(&mut fs, ROOT_INO);
        // mke2fs 1.47.0's -d stores whole seconds only; nanoseconds are
        // checked in the write direction against the kernel.
        let d = diff_trees(&whole_seconds(&expect), &whole_seconds(&got), 10);
        assert!(
            d.is_empty(),
            "{kind} bs={bs}: folio reads a different tree: {d:#?}"
        );
        fs::remove_file(&img).unwrap();
    }
}

fn whole_seconds(
    t: &std::collections::BTreeMap<String, Node>,
) -> std::collections::BTreeMap<String, Node> {
    t.iter()
        .map(|(k, n)| {
            let mut n = Node {
                xattrs: n.xattrs.clone(),
                ..*n
            };
            n.mtime.1 = 0;
            (k.clone(), n)
        })
        .collect()
}

/// Apply the same deletes and renames to the host model and to the image.
fn mutate(fs: &mut Filesystem, model: &Path, base: &str) {
    let tree = host_tree(model);
    let files: Vec<String> = tree
        .iter()
        .filter(|(_, n)| n.kind != "dir")
        .map(|(k, _)| k.clone())
        .collect();
    let mut gone = std::collections::HashSet::new();
    let lookup = |fs: &mut Filesystem, rel: &str| {
        let full = format!("{base}/{rel}");
        let (p, n) = fs.resolve_parent(&full).unwrap();
        (p, n.as_bytes().to_vec())
    };
    for (i, rel) in files.iter().enumerate() {
        if gone.contains(rel) {
            continue;
        }
        match i % 4 {
            0 => {
                fs::remove_file(model.join(rel)).unwrap();
                let (p, n) = lookup(fs, rel);
                fs.unlink(p, &n)
                    .unwrap_or_else(|e| panic!("unlink {rel}: {e}"));
                gone.insert(rel.clone());
            }
            1 => {
                let to = format!("many/renamed-{i}");
                fs::rename(model.join(rel), model.join(&to)).unwrap();
                let (p, n) = lookup(fs, rel);
                let (q, m) = lookup(fs, &to);
                fs.rename(p, &n, q, &m, RenameFlags::default())
                    .unwrap_or_else(|e| panic!("rename {rel} -> {to}: {e}"));
                gone.insert(rel.clone());
            }
            2 if i + 1 < files.len() && !gone.contains(&files[i + 1]) => {
                // Rename over an existing file.
                let to = files[i + 1].clone();
                fs::rename(model.join(rel), model.join(&to)).unwrap();
                let (p, n) = lookup(fs, rel);
                let (q, m) = lookup(fs, &to);
                fs.rename(p, &n, q, &m, RenameFlags::default())
                    .unwrap_or_else(|e| panic!("rename {rel} over {to}: {e}"));
                gone.insert(rel.clone());
                gone.insert(to);
            }
            _ => {}
        }
    }
    // Move a directory to another parent, and remove a whole subtree.
    let dirs: Vec<String> = tree
        .iter()
        .filter(|(k, n)| n.kind == "dir" && k.starts_with("dir") && !k.contains('/'))
        .map(|(k, _)| k.clone())
        .collect();
    if dirs.len() >= 2 {
        let (a, b) = (&dirs[0], &dirs[dirs.len() - 1]);
        let to = format!("{b}/moved-{a}");
        if !to.starts_with(&format!("{a}/")) {
            fs::rename(model.join(a), model.join(&to)).unwrap();
            let (p, n) = lookup(fs, a);
            let (q, m) = lookup(fs, &to);
            fs.rename(p, &n, q, &m, RenameFlags::default()).unwrap();
        }
    }
    fs::remove_dir_all(model.join("many")).unwrap();
    folio_cli::copy::rm(fs, &format!("{base}/many"), true).unwrap();
}

fn dirs_without_mtime(
    mut t: std::collections::BTreeMap<String, Node>,
) -> std::collections::BTreeMap<String, Node> {
    for n in t.values_mut() {
        if n.kind == "dir" {
            n.mtime = (0, 0);
        }
    }
    t
}

#[test]
fn folio_written_trees_pass_e2fsck_and_match_through_the_kernel() {
    if !tools_present() {
        return;
    }
    let mount_ok = require(
        can_loop_mount(),
        "not root or no loop devices: kernel comparison skipped",
    );
    let t = TempDir::new("rt-write");
    let src = t.join("src");
    make_tree(&src, 0xBEEF, FILES);
    enum Maker {
        Folio(FsType),
        Mke2fs(&'static str),
        /// mkfs.ext4 with extra `-O` features.
        Mke2fsWith(&'static str),
        /// folio's mkfs with mke2fs's `-O` edits.
        FolioWith(&'static str),
    }
    let configs = [
        (Maker::Folio(FsType::Ext4), 1024),
        (Maker::Folio(FsType::Ext4), 2048),
        (Maker::Folio(FsType::Ext4), 4096),
        (Maker::Folio(FsType::Ext4), 65536),
        (Maker::Folio(FsType::Ext3), 1024),
        (Maker::Folio(FsType::Ext2), 4096),
        (Maker::Mke2fs("ext4"), 1024),
        (Maker::Mke2fs("ext4"), 4096),
        (Maker::Mke2fs("ext4"), 65536),
        (Maker::Mke2fs("ext3"), 4096),
        (Maker::Mke2fs("ext2"), 1024),
        (Maker::Mke2fsWith("orphan_file"), 4096),
        (Maker::FolioWith("^metadata_csum,uninit_bg,^64bit"), 4096),
        (
            Maker::FolioWith("^has_journal,^flex_bg,^resize_inode"),
            1024,
        ),
        (
            Maker::FolioWith("^extent,^64bit,^dir_index,^filetype"),
            4096,
        ),
    ];
    for (i, (maker, bs)) in configs.iter().enumerate() {
        let img = t.join(&format!("w{i}.img"));
        let what = match maker {
            Maker::Folio(ty) => {
                let opts = MkfsOptions {
                    fs_type: *ty,
                    block_size: Some(*bs),
                    ..Default::default()
                };
                mkfs_path(&img, Some(900 << 20), &opts).unwrap();
                format!("folio mkfs {ty:?} bs={bs}")
            }
            Maker::FolioWith(edits) => {
                let mut features = Features::defaults(FsType::Ext4);
                features.edit(edits).unwrap();
                let opts = MkfsOptions {
                    block_size: Some(*bs),
                    features: Some(features),
                    ..Default::default()
                };
                mkfs_path(&img, Some(900 << 20), &opts).unwrap();
                format!("folio mkfs -O {edits} bs={bs}")
            }
            Maker::Mke2fs(kind) => {
                run(Command::new(format!("mkfs.{kind}"))
                    .args(["-q", "-F", "-b", &bs.to_string()])
                    .arg(&img)
                    .arg("900M"));
                format!("mkfs.{kind} bs={bs}")
            }
            Maker::Mke2fsWith(features) => {
                run(Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-O", features, "-b", &bs.to_string()])
                    .arg(&img)
                    .arg("900M"));
                format!("mkfs.ext4 -O {features} bs={bs}")
            }
        };
        e2fsck(&img).unwrap_or_else(|e| panic!("{what}: fresh image: {e}"));
        let model = t.join(&format!("model{i}"));
        run(Command::new("cp").arg("-a").arg(&src).arg(&model));
        let mut fs = Filesystem::open_path(&img, OpenOptions::default()).unwrap();
        folio_cli::copy::put(&mut fs, &src, "/tree").unwrap_or_else(|e| panic!("{what}: put: {e}"));
        mutate(&mut fs, &model, "/tree");
        let problems = fs.check_counts(None).unwrap();
        assert!(problems.is_empty(), "{what}: {problems:?}");
        fs.close().unwrap();
        e2fsck(&img).unwrap_or_else(|e| panic!("{what}: {e}"));
        let expect = dirs_without_mtime(host_tree(&model));
        let mut fs = Filesystem::open_path(
            &img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let tree_ino = fs.resolve("/tree").unwrap();
        let got = dirs_without_mtime(folio_tree(&mut fs, tree_ino));
        let d = diff_trees(&expect, &got, 10);
        assert!(
            d.is_empty(),
            "{what}: folio reread differs from the model: {d:#?}"
        );
        drop(fs);
        if mount_ok && *bs <= 4096 {
            let m =
                LoopMount::new(&img).unwrap_or_else(|e| panic!("{what}: kernel mount failed: {e}"));
            let seen = dirs_without_mtime(host_tree(&m.dir.path.join("tree")));
            let d = diff_trees(&expect, &seen, 10);
            assert!(
                d.is_empty(),
                "{what}: the kernel sees a different tree: {d:#?}"
            );
        }
        fs::remove_file(&img).unwrap();
        fs::remove_dir_all(&model).unwrap();
    }
}

/// `folio mkfs` with no options lays out exactly what mke2fs does:
/// `dumpe2fs -h` agrees on every field but identifiers and times.
#[test]
fn mkfs_defaults_match_mke2fs() {
    if !tools_present() || !require(have_tool("dumpe2fs"), "dumpe2fs is not installed") {
        return;
    }
    let t = TempDir::new("mkfs-cmp");
    let skip = [
        "UUID",
        "time",
        "Hash Seed",
        "Lifetime",
        "Directory Hash",
        "checksum",
        "Checksum",
        "Mount count",
        "Last",
        "created",
        "Filesystem state",
        "Journal start",
        "Journal sequence",
    ];
    let header = |img: &Path| -> Vec<String> {
        run(Command::new("dumpe2fs").arg("-h").arg(img))
            .lines()
            .filter(|l| !skip.iter().any(|s| l.contains(s)))
            .map(str::to_string)
            .collect()
    };
    for size in ["2M", "64M", "1G", "3G"] {
        let a = t.join("folio.img");
        let b = t.join("mke2fs.img");
        let bytes = folio_cli::parse_size(size).unwrap();
        mkfs_path(&a, Some(bytes), &MkfsOptions::default()).unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&b)
            .arg(size));
        assert_eq!(header(&a), header(&b), "size {size}");
        e2fsck(&a).unwrap();
    }
    // mke2fs's -O edits: the same header for every feature set folio can
    // make (journal placement aside, which mke2fs picks by other rules
    // without flex_bg).
    for edits in FEATURE_EDITS {
        let a = t.join("folio.img");
        let b = t.join("mke2fs.img");
        let mut features = Features::defaults(FsType::Ext4);
        features.edit(edits).unwrap();
        let opts = MkfsOptions {
            features: Some(features),
            ..Default::default()
        };
        mkfs_path(&a, Some(300 << 20), &opts).unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", edits])
            .arg(&b)
            .arg("300M"));
        let ours: Vec<String> = header(&a)
            .into_iter()
            .filter(|l| !l.starts_with("Journal backup"))
            .collect();
        let theirs: Vec<String> = header(&b)
            .into_iter()
            .filter(|l| !l.starts_with("Journal backup"))
            .collect();
        assert_eq!(ours, theirs, "-O {edits}");
        e2fsck(&a).unwrap_or_else(|e| panic!("-O {edits}: {e}"));
    }
}

/// Feature sets of mke2fs's `-O` that folio's mkfs makes.
const FEATURE_EDITS: &[&str] = &[
    "^has_journal",
    "^metadata_csum",
    "^metadata_csum,uninit_bg",
    "^64bit",
    "^flex_bg",
    "^resize_inode",
    "^dir_index,^filetype,^ext_attr",
    "^huge_file,^dir_nlink,^extra_isize,^large_file",
    "^extent,^64bit",
    "^metadata_csum,^64bit,^flex_bg",
    "large_dir",
    "none,has_journal,sparse_super",
];
