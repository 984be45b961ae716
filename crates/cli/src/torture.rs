//! A write-heavy workload whose durable results can be checked after the
//! process is killed: every file's contents follow from (name, length,
//! seed), and a file is reported only after an fsync returned.

use std::io::Write;

use folio_ext4::{Error, Filesystem, Owner, SetAttr, ROOT_INO};

/// The bytes of a torture file: a function of its seed and offset.
pub fn contents(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Run `ops` operations (or until killed). Reports go to stdout.
pub fn run(fs: &mut Filesystem, seed: u64, ops: u64) -> Result<(), String> {
    let e = |what: &str, err: Error| format!("{what}: {err}");
    let dir = match fs.lookup(ROOT_INO, b"torture") {
        Ok(d) => d,
        Err(Error::NotFound) => fs
            .mkdir(ROOT_INO, b"torture", 0o755, Owner::default())
            .map_err(|x| e("mkdir", x))?,
        Err(x) => return Err(e("lookup", x)),
    };
    let out = std::io::stdout();
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for op in 0..ops {
        // Unique names: a file reported synced is never touched again, so
        // it must survive any later kill exactly.
        let name = format!("file-{seed}-{op}");
        let file_seed = next();
        let len = (next() % 200_000) as usize;
        let ino = match fs.lookup(dir, name.as_bytes()) {
            Ok(i) => i,
            Err(Error::NotFound) => fs
                .create(dir, name.as_bytes(), 0o644, Owner::default())
                .map_err(|x| e(&name, x))?,
            Err(x) => return Err(e(&name, x)),
        };
        // Grow it past the final size, then cut back: exercises truncate.
        fs.setattr(
            ino,
            &SetAttr {
                size: Some(len as u64 + 5000),
                ..Default::default()
            },
        )
        .map_err(|x| e(&name, x))?;
        let data = contents(file_seed, len);
        for chunk_start in (0..len).step_by(65_536) {
            let end = (chunk_start + 65_536).min(len);
            fs.write(ino, chunk_start as u64, &data[chunk_start..end])
                .map_err(|x| e(&name, x))?;
        }
        fs.setattr(
            ino,
            &SetAttr {
                size: Some(len as u64),
                ..Default::default()
            },
        )
        .map_err(|x| e(&name, x))?;
        if op % 3 == 0 {
            fs.fsync(ino, false).map_err(|x| e("fsync", x))?;
            let mut o = out.lock();
            let _ = writeln!(o, "synced {name} {len} {file_seed}");
            let _ = o.flush();
        }
    }
    Ok(())
}
