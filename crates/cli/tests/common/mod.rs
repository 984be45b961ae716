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
