//! Commands that change an image: put, rm, mkdir; and get (copy out).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use folio_ext4::format::inode::{S_IFBLK, S_IFCHR, S_IFIFO, S_IFSOCK};
use folio_ext4::mkfs::MkfsOptions;
use folio_ext4::{Error, FileType, Filesystem, OpenOptions, Owner, SetAttr, Timespec, XattrMode};

const CHUNK: usize = 1 << 20;

fn e2s(path: &str, e: Error) -> String {
    format!("{path}: {e}")
}

fn host_err(p: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", p.display())
}

fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

/// Split glibc's dev_t into (major, minor).
fn dev_split(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Copy host `source` into the image at `dest`. If `dest` is an existing
/// directory the source goes inside it under its own name.
pub fn put(fs: &mut Filesystem, source: &Path, dest: &str) -> Result<(), String> {
    let (parent, name) = match fs.resolve_follow(dest) {
        Ok(ino)
            if fs
                .stat(ino)
                .map(|s| s.file_type == FileType::Directory)
                .unwrap_or(false) =>
        {
            let base = source
                .file_name()
                .ok_or_else(|| format!("{}: has no file name", source.display()))?;
            (ino, base.to_string_lossy().into_owned())
        }
        Ok(_) => return Err(format!("{dest}: exists")),
        Err(Error::NotFound) => {
            let (p, n) = fs.resolve_parent(dest).map_err(|e| e2s(dest, e))?;
            (p, n.to_string())
        }
        Err(e) => return Err(e2s(dest, e)),
    };
    let fresh = matches!(fs.lookup(parent, name.as_bytes()), Err(Error::NotFound));
    let mut links = HashMap::new();
    let r = put_node(fs, source, parent, name.as_bytes(), &mut links);
    if r.is_err() && fresh {
        // All or nothing: what this copy made goes again, so that the
        // image committed afterwards holds no partial file or tree.
        if let Ok(ino) = fs.lookup(parent, name.as_bytes()) {
            let is_dir = fs
                .stat(ino)
                .map(|s| s.file_type == FileType::Directory)
                .unwrap_or(false);
            let undo = if is_dir {
                rm_tree(fs, ino, dest)
                    .and_then(|()| fs.rmdir(parent, name.as_bytes()).map_err(|e| e2s(dest, e)))
            } else {
                fs.unlink(parent, name.as_bytes()).map_err(|e| e2s(dest, e))
            };
            if let Err(e) = undo {
                eprintln!("folio: could not remove the partial copy: {e}");
            }
        }
    }
    r
}

fn put_node(
    fs: &mut Filesystem,
    host: &Path,
    parent: u32,
    name: &[u8],
    links: &mut HashMap<(u64, u64), u32>,
) -> Result<(), String> {
    let meta = fs::symlink_metadata(host).map_err(|e| host_err(host, e))?;
    let shown = host.display().to_string();
    crate::progress::copied(1, 0);
    let ft = meta.file_type();
    if !ft.is_dir() && meta.nlink() > 1 {
        if let Some(&ino) = links.get(&(meta.dev(), meta.ino())) {
            return fs.link(ino, parent, name).map_err(|e| e2s(&shown, e));
        }
    }
    let owner = Owner {
        uid: meta.uid(),
        gid: meta.gid(),
    };
    let perm = (meta.mode() & 0o7777) as u16;
    let ino = if ft.is_dir() {
        let ino = fs
            .mkdir(parent, name, perm, owner)
            .map_err(|e| e2s(&shown, e))?;
        let mut children: Vec<_> = fs::read_dir(host)
            .map_err(|e| host_err(host, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| host_err(host, e))?;
        children.sort_by_key(|d| d.file_name());
        for c in children {
            put_node(fs, &c.path(), ino, c.file_name().as_encoded_bytes(), links)?;
        }
        ino
    } else if ft.is_file() {
        let ino = fs
            .create(parent, name, perm, owner)
            .map_err(|e| e2s(&shown, e))?;
        copy_in(fs, host, ino, meta.len())?;
        ino
    } else if ft.is_symlink() {
        let target = fs::read_link(host).map_err(|e| host_err(host, e))?;
        fs.symlink(parent, name, target.as_os_str().as_encoded_bytes(), owner)
            .map_err(|e| e2s(&shown, e))?
    } else {
        let kind = if ft.is_fifo() {
            S_IFIFO
        } else if ft.is_socket() {
            S_IFSOCK
        } else if ft.is_char_device() {
            S_IFCHR
        } else if ft.is_block_device() {
            S_IFBLK
        } else {
            return Err(format!("{shown}: unsupported file type"));
        };
        fs.mknod(parent, name, kind | perm, dev_split(meta.rdev()), owner)
            .map_err(|e| e2s(&shown, e))?
    };
    if !ft.is_dir() && meta.nlink() > 1 {
        links.insert((meta.dev(), meta.ino()), ino);
    }
    copy_xattrs_in(fs, host, ino)?;
    let attr = SetAttr {
        mode: (!ft.is_symlink()).then_some(perm),
        atime: Some(ts(meta.atime(), meta.atime_nsec())),
        mtime: Some(ts(meta.mtime(), meta.mtime_nsec())),
        ..Default::default()
    };
    fs.setattr(ino, &attr).map_err(|e| e2s(&shown, e))?;
    Ok(())
}

/// Copy the host file's extended attributes, POSIX ACLs included (the
/// library converts them to ext4's encoding).
fn copy_xattrs_in(fs: &mut Filesystem, host: &Path, ino: u32) -> Result<(), String> {
    let shown = host.display().to_string();
    for name in crate::hostxattr::list(host).map_err(|e| host_err(host, e))? {
        if name.starts_with(b"system.") && !name.starts_with(b"system.posix_acl_") {
            continue;
        }
        let value = crate::hostxattr::get(host, &name).map_err(|e| host_err(host, e))?;
        fs.set_xattr(ino, &name, &value, XattrMode::Any)
            .map_err(|e| e2s(&shown, e))?;
    }
    Ok(())
}

/// Copy a host file's bytes, leaving all-zero blocks as holes.
fn copy_in(fs: &mut Filesystem, host: &Path, ino: u32, len: u64) -> Result<(), String> {
    let shown = host.display().to_string();
    let mut f = fs::File::open(host).map_err(|e| host_err(host, e))?;
    let bs = fs.block_size() as usize;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = f.read(&mut buf[n..]).map_err(|e| host_err(host, e))?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        let mut i = 0;
        while i < n {
            let blk_end = (i + bs).min(n);
            if buf[i..blk_end].iter().all(|&b| b == 0) {
                i = blk_end;
                continue;
            }
            let mut j = blk_end;
            while j < n {
                let e = (j + bs).min(n);
                if buf[j..e].iter().all(|&b| b == 0) {
                    break;
                }
                j = e;
            }
            fs.write(ino, off + i as u64, &buf[i..j])
                .map_err(|e| e2s(&shown, e))?;
            crate::progress::copied(0, (j - i) as u64);
            i = j;
        }
        off += n as u64;
    }
    if off != len {
        return Err(format!("{shown}: size changed while copying"));
    }
    fs.setattr(
        ino,
        &SetAttr {
            size: Some(len),
            ..Default::default()
        },
    )
    .map_err(|e| e2s(&shown, e))?;
    Ok(())
}

/// Copy `source` from the image to host `dest` (into it if it is a
/// directory).
pub fn get(fs: &mut Filesystem, source: &str, dest: &Path) -> Result<(), String> {
    let ino = fs.resolve(source).map_err(|e| e2s(source, e))?;
    let target = if dest.is_dir() {
        let base = source
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("");
        if base.is_empty() {
            dest.to_path_buf()
        } else {
            dest.join(base)
        }
    } else {
        dest.to_path_buf()
    };
    get_node(fs, ino, &target, source)
}

fn get_node(fs: &mut Filesystem, ino: u32, host: &Path, shown: &str) -> Result<(), String> {
    let st = fs.stat(ino).map_err(|e| e2s(shown, e))?;
    crate::progress::copied(1, 0);
    match st.file_type {
        FileType::Directory => {
            match fs::create_dir(host) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && host.is_dir() => {}
                Err(e) => return Err(host_err(host, e)),
            }
            for e in fs.read_dir(ino).map_err(|e| e2s(shown, e))? {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let name = String::from_utf8_lossy(&e.name).into_owned();
                get_node(fs, e.ino, &host.join(&name), &format!("{shown}/{name}"))?;
            }
        }
        FileType::Regular => {
            // Only the data is copied (SEEK_DATA/SEEK_HOLE on the image);
            // holes stay holes on the host, so a sparse file (or a damaged
            // size field) costs the host no more than the data.
            use std::os::unix::fs::FileExt;
            // Refused before it is made if the host cannot hold its data
            // (what the image allocates for it: holes cost nothing).
            let parent = match host.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let need = st.blocks_512.saturating_mul(512);
            if need > 0 {
                let dir = fs::File::open(parent).map_err(|e| host_err(parent, e))?;
                let free = crate::hostxattr::free_bytes(&dir).map_err(|e| host_err(parent, e))?;
                if need > free {
                    return Err(format!(
                        "{}: no space left on the host: {shown} holds {need} bytes of data, \
                         {} has {free} bytes free",
                        host.display(),
                        parent.display()
                    ));
                }
            }
            let f = fs::File::create(host).map_err(|e| host_err(host, e))?;
            let mut buf = vec![0u8; CHUNK];
            let size = st.size;
            let mut off = 0u64;
            while off < size {
                let data = match fs.seek_data_hole(ino, off, true) {
                    Ok(d) => d,
                    Err(Error::NoSuchOffset) => break,
                    Err(e) => return Err(e2s(shown, e)),
                };
                let hole = match fs.seek_data_hole(ino, data, false) {
                    Ok(h) => h.min(size),
                    Err(Error::NoSuchOffset) => size,
                    Err(e) => return Err(e2s(shown, e)),
                };
                let mut pos = data;
                while pos < hole {
                    let want = (hole - pos).min(CHUNK as u64) as usize;
                    let n = fs
                        .read(ino, pos, &mut buf[..want])
                        .map_err(|e| e2s(shown, e))?;
                    if n == 0 {
                        break;
                    }
                    f.write_all_at(&buf[..n], pos)
                        .map_err(|e| host_err(host, e))?;
                    crate::progress::copied(0, n as u64);
                    pos += n as u64;
                }
                off = hole.max(data + 1);
            }
            f.set_len(size).map_err(|e| host_err(host, e))?;
        }
        FileType::Symlink => {
            let t = fs.readlink(ino).map_err(|e| e2s(shown, e))?;
            let t = std::ffi::OsStr::new(
                std::str::from_utf8(&t)
                    .map_err(|_| format!("{shown}: non-UTF-8 symlink target"))?,
            );
            std::os::unix::fs::symlink(t, host).map_err(|e| host_err(host, e))?;
            // The link's own times (the kernel's lutimes), not its target's.
            crate::hostxattr::set_times_nofollow(
                host,
                (st.atime.sec, st.atime.nsec),
                (st.mtime.sec, st.mtime.nsec),
            )
            .map_err(|e| host_err(host, e))?;
            return Ok(());
        }
        _ => {
            eprintln!("folio: {shown}: skipping special file");
            return Ok(());
        }
    }
    for name in fs.list_xattr(ino).map_err(|e| e2s(shown, e))? {
        if name.starts_with(b"system.") && !name.starts_with(b"system.posix_acl_") {
            continue;
        }
        let v = fs.get_xattr(ino, &name).map_err(|e| e2s(shown, e))?;
        if let Err(e) = crate::hostxattr::set(host, &name, &v) {
            eprintln!(
                "folio: {}: cannot set {}: {e}",
                host.display(),
                String::from_utf8_lossy(&name)
            );
        }
    }
    fs::set_permissions(
        host,
        fs::Permissions::from_mode(u32::from(st.mode & 0o7777)),
    )
    .map_err(|e| host_err(host, e))?;
    let to_sys = |t: Timespec| {
        if t.sec >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::new(t.sec as u64, t.nsec)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(t.sec.unsigned_abs())
        }
    };
    let times = fs::FileTimes::new()
        .set_accessed(to_sys(st.atime))
        .set_modified(to_sys(st.mtime));
    let f = fs::File::open(host).map_err(|e| host_err(host, e))?;
    f.set_times(times).map_err(|e| host_err(host, e))?;
    Ok(())
}

/// Remove a path (recursively with `recursive`).
pub fn rm(fs: &mut Filesystem, path: &str, recursive: bool) -> Result<(), String> {
    let (parent, name) = fs.resolve_parent(path).map_err(|e| e2s(path, e))?;
    let ino = fs
        .lookup(parent, name.as_bytes())
        .map_err(|e| e2s(path, e))?;
    let st = fs.stat(ino).map_err(|e| e2s(path, e))?;
    if st.file_type == FileType::Directory {
        if !recursive {
            return Err(format!("{path}: is a directory (use -r)"));
        }
        rm_tree(fs, ino, path)?;
        fs.rmdir(parent, name.as_bytes()).map_err(|e| e2s(path, e))
    } else {
        fs.unlink(parent, name.as_bytes()).map_err(|e| e2s(path, e))
    }
}

fn rm_tree(fs: &mut Filesystem, dir: u32, shown: &str) -> Result<(), String> {
    for e in fs.read_dir(dir).map_err(|e| e2s(shown, e))? {
        if e.name == b"." || e.name == b".." {
            continue;
        }
        let p = format!("{shown}/{}", String::from_utf8_lossy(&e.name));
        if e.file_type == FileType::Directory
            || fs
                .stat(e.ino)
                .map(|s| s.file_type == FileType::Directory)
                .unwrap_or(false)
        {
            rm_tree(fs, e.ino, &p)?;
            fs.rmdir(dir, &e.name).map_err(|er| e2s(&p, er))?;
        } else {
            fs.unlink(dir, &e.name).map_err(|er| e2s(&p, er))?;
        }
    }
    Ok(())
}

/// Make a directory (and its parents with `parents`).
pub fn mkdir(fs: &mut Filesystem, path: &str, parents: bool) -> Result<(), String> {
    let owner = Owner::default();
    if !parents {
        let (parent, name) = fs.resolve_parent(path).map_err(|e| e2s(path, e))?;
        fs.mkdir(parent, name.as_bytes(), 0o755, owner)
            .map_err(|e| e2s(path, e))?;
        return Ok(());
    }
    let mut cur = folio_ext4::ROOT_INO;
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        cur = match fs.lookup(cur, comp.as_bytes()) {
            Ok(i) => {
                if fs.stat(i).map_err(|e| e2s(path, e))?.file_type != FileType::Directory {
                    return Err(format!("{path}: {comp} is not a directory"));
                }
                i
            }
            Err(Error::NotFound) => fs
                .mkdir(cur, comp.as_bytes(), 0o755, owner)
                .map_err(|e| e2s(path, e))?,
            Err(e) => return Err(e2s(path, e)),
        };
    }
    Ok(())
}

/// Make a demo image with a small tree and list it.
/// The volume label of `folio demo` images: demo overwrites only those.
pub const DEMO_LABEL: &str = "folio-demo";

pub fn demo(image: &Path) -> Result<(), String> {
    if image.exists() {
        // Only an image demo made itself may be made again.
        let label = Filesystem::open_path(
            image,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .map(|fs| fs.superblock().volume_name())
        .ok();
        if label.as_deref() != Some(DEMO_LABEL) {
            return Err(format!(
                "{} exists and is not a folio demo image; not overwriting it",
                image.display()
            ));
        }
    }
    let opts = MkfsOptions {
        label: DEMO_LABEL.into(),
        ..Default::default()
    };
    let report = folio_ext4::mkfs::mkfs_path(image, Some(64 << 20), &opts)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    println!("{report}");
    let mut fs = Filesystem::open_path(image, OpenOptions::default())
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let root = folio_ext4::ROOT_INO;
    let me = Owner { uid: 0, gid: 0 };
    let docs = fs
        .mkdir(root, b"docs", 0o755, me)
        .map_err(|e| e2s("/docs", e))?;
    let hello = fs
        .create(root, b"hello.txt", 0o644, me)
        .map_err(|e| e2s("/hello.txt", e))?;
    fs.write(hello, 0, b"Hello from folio, a userspace ext4.\n")
        .map_err(|e| e2s("/hello.txt", e))?;
    let readme = fs
        .create(docs, b"README", 0o644, me)
        .map_err(|e| e2s("/docs/README", e))?;
    let text = "This image was made by `folio demo`.\nCheck it with: e2fsck -fn IMAGE\n".repeat(50);
    fs.write(readme, 0, text.as_bytes())
        .map_err(|e| e2s("/docs/README", e))?;
    let sparse = fs
        .create(root, b"sparse.bin", 0o600, me)
        .map_err(|e| e2s("/sparse.bin", e))?;
    fs.write(sparse, 5 << 30, b"a byte at 5 GiB")
        .map_err(|e| e2s("/sparse.bin", e))?;
    fs.symlink(root, b"link-to-hello", b"hello.txt", me)
        .map_err(|e| e2s("/link-to-hello", e))?;
    fs.set_xattr(
        hello,
        b"user.comment",
        b"made by folio demo",
        XattrMode::Any,
    )
    .map_err(|e| e2s("/hello.txt", e))?;
    fs.sync().map_err(|e| e2s("sync", e))?;
    println!("\nContents of {}:", image.display());
    crate::show::ls(&mut fs, "/", true, false)?;
    fs.close().map_err(|e| e2s("sync", e))?;
    let img = image.display();
    println!("\nTry: folio cat {img} /hello.txt   |   folio stat {img} /hello.txt   |   e2fsck -fn {img}");
    Ok(())
}
