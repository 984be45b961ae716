//! Helpers shared by the CLI tests: run the `folio` binary, scratch
//! directories.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Run `folio` with `args`.
pub fn folio(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_folio"));
    for a in args {
        c.arg(a);
    }
    c.output().expect("run folio")
}

/// Run `folio`, which must succeed; its standard output.
pub fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = folio(args);
    assert!(
        o.status.success(),
        "folio failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh scratch directory for test `tag` (prefix `kind`).
pub fn scratch(kind: &str, tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("folio-{kind}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// e2fsck -fn must call `img` clean (skipped, outside CI, without e2fsck).
#[allow(dead_code)]
pub fn e2fsck_clean(img: &std::path::Path) {
    let tool = ["/sbin/e2fsck", "/usr/sbin/e2fsck", "/usr/bin/e2fsck"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(tool) = tool else {
        assert!(
            std::env::var_os("CI").is_none(),
            "e2fsck is missing under CI"
        );
        return;
    };
    let o = Command::new(tool).arg("-fn").arg(img).output().unwrap();
    assert!(
        o.status.success(),
        "e2fsck {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Root with /dev/fuse: FUSE mounts can be tested (asserted under CI).
#[allow(dead_code)]
pub fn can_mount() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let ok = root && std::path::Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true but root or /dev/fuse is missing"
        );
        eprintln!("SKIP: the FUSE part needs root and /dev/fuse");
    }
    ok
}

/// Deterministic bytes (xorshift), the same for the same seed.
#[allow(dead_code)]
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
