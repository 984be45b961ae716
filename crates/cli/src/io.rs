//! `folio io IMAGE PATH -c CMD ...`: xfs_io-style commands on a file in an
//! image, with output shaped like xfs_io's.

use std::fmt::Write as _;
use std::time::Instant;

use folio_ext4::falloc::*;
use folio_ext4::{Error, Filesystem, OpenFlags, Owner, SetAttr};

use crate::parse_size;

fn num(s: &str) -> Result<u64, String> {
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|_| format!("non-numeric argument -- {s}"));
    }
    parse_size(s).map_err(|_| format!("non-numeric argument -- {s}"))
}

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} bytes")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", U[i])
    } else {
        format!("{v:.3} {}", U[i])
    }
}

fn rate_line(bytes: u64, ops: u64, secs: f64) -> String {
    let secs = secs.max(1e-9);
    format!(
        "{}, {} ops; {:.4} sec ({:.3} MiB/sec and {:.4} ops/sec)",
        human(bytes),
        ops,
        secs,
        bytes as f64 / 1048576.0 / secs,
        ops as f64 / secs
    )
}

fn errstr(e: &Error) -> String {
    std::io::Error::from_raw_os_error(e.errno())
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or("")
        .to_string()
}

/// Run the commands on `path` (created first with `create`).
pub fn run(fs: &mut Filesystem, path: &str, create: bool, cmds: &[String]) -> Result<(), String> {
    let (parent, name) = fs
        .resolve_parent(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let flags = OpenFlags {
        create,
        ..Default::default()
    };
    let ino = fs
        .openat(parent, name.as_bytes(), flags, 0o600, Owner::default())
        .map_err(|e| format!("{path}: {}", errstr(&e)))?;
    let mut failed = false;
    for c in cmds {
        match one(fs, ino, path, c) {
            Ok(out) => print!("{out}"),
            Err(e) => {
                println!("{e}");
                failed = true;
            }
        }
    }
    if failed {
        Err(String::new())
    } else {
        Ok(())
    }
}

fn one(fs: &mut Filesystem, ino: u32, path: &str, cmd: &str) -> Result<String, String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return Ok(String::new());
    };
    let mut opts = Vec::new();
    let mut args = Vec::new();
    let mut it = rest.iter();
    while let Some(&w) = it.next() {
        match w {
            "-S" | "-b" => opts.push((w, it.next().copied().unwrap_or(""))),
            _ if w.starts_with('-')
                && w.len() == 2
                && !w[1..].starts_with(|c: char| c.is_ascii_digit()) =>
            {
                opts.push((w, ""))
            }
            _ => args.push(w),
        }
    }
    let has = |f: &str| opts.iter().any(|(o, _)| *o == f);
    let fail = |what: &str, e: Error| format!("{what}: {}", errstr(&e));
    let two = |args: &[&str]| -> Result<(u64, u64), String> {
        match args {
            [a, b] => Ok((num(a)?, num(b)?)),
            _ => Err(format!("{name}: needs offset and length")),
        }
    };
    let mut out = String::new();
    match name {
        "pwrite" => {
            let (off, len) = two(&args)?;
            let pattern = match opts.iter().find(|(o, _)| *o == "-S") {
                Some((_, v)) => num(v)? as u8,
                None => 0xcd,
            };
            let bsz = match opts.iter().find(|(o, _)| *o == "-b") {
                Some((_, v)) => num(v)?.max(1),
                None => 65536,
            };
            let t = Instant::now();
            let buf = vec![pattern; bsz.min(len.max(1)) as usize];
            let (mut done, mut ops) = (0u64, 0u64);
            while done < len {
                let n = (len - done).min(bsz) as usize;
                fs.write(ino, off + done, &buf[..n])
                    .map_err(|e| fail("pwrite", e))?;
                done += n as u64;
                ops += 1;
            }
            let _ = writeln!(out, "wrote {len}/{len} bytes at offset {off}");
            let _ = writeln!(out, "{}", rate_line(len, ops, t.elapsed().as_secs_f64()));
        }
        "pread" => {
            let (off, len) = two(&args)?;
            let t = Instant::now();
            let mut buf = vec![0u8; len as usize];
            let n = fs.read(ino, off, &mut buf).map_err(|e| fail("pread", e))?;
            if has("-v") {
                for (i, chunk) in buf[..n].chunks(16).enumerate() {
                    let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                    let text: String = chunk
                        .iter()
                        .map(|&b| {
                            if (0x20..0x7f).contains(&b) {
                                b as char
                            } else {
                                '.'
                            }
                        })
                        .collect();
                    let _ = writeln!(
                        out,
                        "{:08x}:  {:<47}  {}",
                        off as usize + i * 16,
                        hex.join(" "),
                        text
                    );
                }
            }
            let _ = writeln!(out, "read {n}/{len} bytes at offset {off}");
            let _ = writeln!(out, "{}", rate_line(n as u64, 1, t.elapsed().as_secs_f64()));
        }
        "truncate" => {
            let [size] = args[..] else {
                return Err("truncate: needs a size".into());
            };
            fs.setattr(
                ino,
                &SetAttr {
                    size: Some(num(size)?),
                    ..Default::default()
                },
            )
            .map_err(|e| fail("truncate", e))?;
        }
        "falloc" | "fpunch" | "fzero" | "fcollapse" | "finsert" => {
            let (off, len) = two(&args)?;
            let keep = if has("-k") { FALLOC_FL_KEEP_SIZE } else { 0 };
            let mode = match name {
                "falloc" => keep,
                "fpunch" => FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                "fzero" => FALLOC_FL_ZERO_RANGE | keep,
                "fcollapse" => FALLOC_FL_COLLAPSE_RANGE,
                _ => FALLOC_FL_INSERT_RANGE,
            };
            fs.fallocate(ino, mode, off, len)
                .map_err(|e| fail("fallocate", e))?;
        }
        "fsync" | "fdatasync" => fs
            .fsync(ino, name == "fdatasync")
            .map_err(|e| fail(name, e))?,
        "seek" => {
            let [o] = args[..] else {
                return Err("seek: needs an offset".into());
            };
            let data = has("-d");
            if !data && !has("-h") {
                return Err("seek: give -d (data) or -h (hole)".into());
            }
            let _ = writeln!(out, "Whence\tResult");
            match fs.seek_data_hole(ino, num(o)?, data) {
                Ok(p) => {
                    let _ = writeln!(out, "{}\t{p}", if data { "DATA" } else { "HOLE" });
                }
                Err(Error::NoSuchOffset) => {
                    let _ = writeln!(out, "{}\tEOF", if data { "DATA" } else { "HOLE" });
                }
                Err(e) => return Err(fail("seek", e)),
            }
        }
        "fiemap" => {
            let verbose = has("-v");
            let bs = u64::from(fs.block_size());
            let size = fs.stat(ino).map_err(|e| fail("fiemap", e))?.size;
            let runs = fs.block_runs(ino).map_err(|e| fail("fiemap", e))?;
            let sec = bs / 512;
            let _ = writeln!(out, "{path}:");
            let flags = fs.get_flags(ino).map_err(|e| fail("fiemap", e))?;
            if flags & folio_ext4::format::inode::FL_INLINE_DATA != 0 {
                // Data in the inode (FIEMAP_EXTENT_DATA_INLINE | NOT_ALIGNED
                // | LAST, as the kernel reports it).
                let b = size.div_ceil(512).max(1) - 1;
                let _ = writeln!(out, "\t0: [0..{b}]: inline (flags 0x301)");
                return Ok(out);
            }
            if verbose {
                let _ = writeln!(out, " EXT: FILE-OFFSET      BLOCK-RANGE      TOTAL FLAGS");
            }
            let mut i = 0;
            let mut pos = 0u64; // in fs blocks
            let end = size
                .div_ceil(bs)
                .max(runs.last().map_or(0, |r| r.lblk + r.len));
            for (k, r) in runs.iter().enumerate() {
                if r.lblk > pos {
                    let (a, b) = (pos * sec, r.lblk * sec - 1);
                    if verbose {
                        let left = format!("{i:>4}: [{a}..{b}]:");
                        let _ = writeln!(out, "{left:<22}{:<17}{:>5}", "hole", b - a + 1);
                    } else {
                        let _ = writeln!(out, "\t{i}: [{a}..{b}]: hole");
                    }
                    i += 1;
                }
                let (a, b) = (r.lblk * sec, (r.lblk + r.len) * sec - 1);
                let (pa, pb) = (r.pblk * sec, (r.pblk + r.len) * sec - 1);
                let mut flags = 0u32;
                if r.unwritten {
                    flags |= 0x800;
                }
                if k + 1 == runs.len() {
                    flags |= 0x1;
                }
                if verbose {
                    let left = format!("{i:>4}: [{a}..{b}]:");
                    let _ = writeln!(
                        out,
                        "{left:<22}{:<17}{:>5} {flags:#x}",
                        format!("{pa}..{pb}"),
                        b - a + 1
                    );
                } else {
                    let _ = writeln!(out, "\t{i}: [{a}..{b}]: {pa}..{pb}");
                }
                i += 1;
                pos = r.lblk + r.len;
            }
            if pos < end {
                let (a, b) = (pos * sec, end * sec - 1);
                if verbose {
                    let left = format!("{i:>4}: [{a}..{b}]:");
                    let _ = writeln!(out, "{left:<22}{:<17}{:>5}", "hole", b - a + 1);
                } else {
                    let _ = writeln!(out, "\t{i}: [{a}..{b}]: hole");
                }
            }
        }
        "stat" => {
            let st = fs.stat(ino).map_err(|e| fail("stat", e))?;
            let _ = writeln!(out, "fd.path = \"{path}\"");
            let _ = writeln!(out, "stat.ino = {}", st.ino);
            let _ = writeln!(out, "stat.size = {}", st.size);
            let _ = writeln!(out, "stat.blocks = {}", st.blocks_512);
        }
        other => return Err(format!("command \"{other}\" not found")),
    }
    Ok(out)
}
