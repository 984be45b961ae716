//! Read-only commands: info, ls, stat, cat.

use std::io::Write;

use folio_ext4::format::superblock::{compat, feature_names, incompat, ro_compat};
use folio_ext4::{FileType, Filesystem, Stat, Timespec};

/// "2024-05-01 12:34:56.123456789 +0000" (UTC).
pub fn fmt_time(t: Timespec) -> String {
    let days = t.sec.div_euclid(86400);
    let secs = t.sec.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:09} +0000",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        t.nsec
    )
}

pub fn mode_string(mode: u16) -> String {
    let t = match FileType::from_mode(mode) {
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::CharDev => 'c',
        FileType::BlockDev => 'b',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
        _ => '-',
    };
    let mut s = String::from(t);
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o40, 'r'),
        (0o20, 'w'),
        (0o10, 'x'),
        (0o4, 'r'),
        (0o2, 'w'),
        (0o1, 'x'),
    ];
    for (i, (b, c)) in bits.iter().enumerate() {
        let special = match i {
            2 if mode & 0o4000 != 0 => Some(if mode & 0o100 != 0 { 's' } else { 'S' }),
            5 if mode & 0o2000 != 0 => Some(if mode & 0o10 != 0 { 's' } else { 'S' }),
            8 if mode & 0o1000 != 0 => Some(if mode & 0o1 != 0 { 't' } else { 'T' }),
            _ => None,
        };
        s.push(special.unwrap_or(if mode & b != 0 { *c } else { '-' }));
    }
    s
}

fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::Regular => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::CharDev => "character special file",
        FileType::BlockDev => "block special file",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::Unknown => "unknown",
    }
}

pub fn info(fs: &Filesystem) {
    let sb = fs.superblock();
    let g = fs.geometry_info();
    let uuid = sb.uuid();
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "Filesystem volume name:   {}",
        if sb.volume_name().is_empty() {
            "<none>".into()
        } else {
            sb.volume_name()
        }
    );
    println!(
        "Filesystem UUID:          {}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let mut feats = feature_names(sb.feature_compat(), COMPAT_NAMES, "C");
    feats.extend(feature_names(sb.feature_incompat(), incompat::NAMES, "I"));
    feats.extend(feature_names(sb.feature_ro_compat(), ro_compat::NAMES, "R"));
    println!("Filesystem features:      {}", feats.join(" "));
    println!("Inode count:              {}", g.inodes_count);
    println!("Block count:              {}", g.blocks_count);
    println!("Reserved block count:     {}", sb.r_blocks_count());
    println!("Free blocks:              {}", sb.free_blocks_count());
    println!("Free inodes:              {}", sb.free_inodes_count());
    println!("First block:              {}", g.first_data_block);
    println!("Block size:               {}", g.block_size);
    println!("Group count:              {}", g.group_count);
    println!("Blocks per group:         {}", g.blocks_per_group);
    println!("Inodes per group:         {}", g.inodes_per_group);
    println!("Inode size:               {}", g.inode_size);
    println!("Reserved GDT blocks:      {}", sb.reserved_gdt_blocks());
    if let Some(why) = fs.read_only_reason() {
        println!("folio access:             read-only ({why})");
    }
}

pub const COMPAT_NAMES: &[(u32, &str)] = &[
    (compat::DIR_PREALLOC, "dir_prealloc"),
    (compat::IMAGIC_INODES, "imagic_inodes"),
    (compat::HAS_JOURNAL, "has_journal"),
    (compat::EXT_ATTR, "ext_attr"),
    (compat::RESIZE_INODE, "resize_inode"),
    (compat::DIR_INDEX, "dir_index"),
    (compat::SPARSE_SUPER2, "sparse_super2"),
    (compat::FAST_COMMIT, "fast_commit"),
    (compat::STABLE_INODES, "stable_inodes"),
    (compat::ORPHAN_FILE, "orphan_file"),
];

pub fn ls(fs: &mut Filesystem, path: &str, long: bool, all: bool) -> Result<(), String> {
    let ino = fs
        .resolve_follow(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let st = fs.stat(ino).map_err(|e| format!("{path}: {e}"))?;
    let entries = if st.file_type == FileType::Directory {
        let mut v = fs.read_dir(ino).map_err(|e| format!("{path}: {e}"))?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.into_iter()
            .filter(|e| all || (e.name != b"." && e.name != b".."))
            .map(|e| (String::from_utf8_lossy(&e.name).into_owned(), e.ino))
            .collect()
    } else {
        vec![(path.to_string(), ino)]
    };
    let out = std::io::stdout();
    let mut out = out.lock();
    for (name, ino) in entries {
        if !long {
            let _ = writeln!(out, "{name}");
            continue;
        }
        let st = fs.stat(ino).map_err(|e| format!("{name}: {e}"))?;
        let size = if matches!(st.file_type, FileType::CharDev | FileType::BlockDev) {
            format!("{}, {}", st.rdev.0, st.rdev.1)
        } else {
            st.size.to_string()
        };
        let mut line = format!(
            "{} {:>3} {:>5} {:>5} {:>10} {} {}",
            mode_string(st.mode),
            st.nlink,
            st.uid,
            st.gid,
            size,
            &fmt_time(st.mtime)[..16],
            name
        );
        if st.file_type == FileType::Symlink {
            let t = fs.readlink(ino).map_err(|e| format!("{name}: {e}"))?;
            line.push_str(" -> ");
            line.push_str(&String::from_utf8_lossy(&t));
        }
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

pub fn stat(fs: &mut Filesystem, path: &str, ino: u32) -> Result<(), String> {
    let st: Stat = fs.stat(ino).map_err(|e| format!("{path}: {e}"))?;
    println!("  File: {path}");
    println!(
        "  Size: {:<15} Blocks: {:<10} IO Block: {:<6} {}",
        st.size,
        st.blocks_512,
        fs.block_size(),
        type_name(st.file_type)
    );
    println!(
        "Inode: {:<15} Links: {:<10} Generation: {}",
        st.ino, st.nlink, st.generation
    );
    println!(
        "Access: ({:04o}/{})  Uid: ({:>5})   Gid: ({:>5})",
        st.mode & 0o7777,
        mode_string(st.mode),
        st.uid,
        st.gid
    );
    if matches!(st.file_type, FileType::CharDev | FileType::BlockDev) {
        println!("Device type: {},{}", st.rdev.0, st.rdev.1);
    }
    println!("Access: {}", fmt_time(st.atime));
    println!("Modify: {}", fmt_time(st.mtime));
    println!("Change: {}", fmt_time(st.ctime));
    match st.crtime {
        Some(t) => println!(" Birth: {}", fmt_time(t)),
        None => println!(" Birth: -"),
    }
    println!("Flags: {:#x}", st.flags);
    let names = fs.list_xattr(ino).map_err(|e| format!("{path}: {e}"))?;
    for n in names {
        let v = fs.get_xattr(ino, &n).map_err(|e| format!("{path}: {e}"))?;
        println!(
            "Xattr: {} = {:?}",
            String::from_utf8_lossy(&n),
            String::from_utf8_lossy(&v)
        );
    }
    Ok(())
}

pub fn cat(fs: &mut Filesystem, path: &str) -> Result<(), String> {
    let ino = fs
        .resolve_follow(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = fs
            .read(ino, off, &mut buf)
            .map_err(|e| format!("{path}: {e}"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| format!("stdout: {e}"))?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_modes_format() {
        assert_eq!(
            fmt_time(Timespec { sec: 0, nsec: 0 }),
            "1970-01-01 00:00:00.000000000 +0000"
        );
        assert_eq!(
            fmt_time(Timespec {
                sec: 951_782_400,
                nsec: 5
            }),
            "2000-02-29 00:00:00.000000005 +0000"
        );
        assert_eq!(
            fmt_time(Timespec { sec: -1, nsec: 0 }),
            "1969-12-31 23:59:59.000000000 +0000"
        );
        assert_eq!(mode_string(0o104755), "-rwsr-xr-x");
        assert_eq!(mode_string(0o041777), "drwxrwxrwt");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx");
    }
}
