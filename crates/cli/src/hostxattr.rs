//! Extended attributes of host files (not following symlinks).

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Names of the attributes of `p`.
pub fn list(p: &Path) -> io::Result<Vec<Vec<u8>>> {
    let c = cpath(p)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `c` is a NUL-terminated path and `buf` is writable for
        // `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

/// The value of attribute `name` of `p`.
pub fn get(p: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cpath(p)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 65536];
    // SAFETY: both strings are NUL-terminated; `buf` is writable for its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Set attribute `name` of `p`.
pub fn set(p: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cpath(p)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both strings are NUL-terminated; `value` is readable for its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the access and modification times of `p` itself (a symlink is not
/// followed: `utimensat` with `AT_SYMLINK_NOFOLLOW`), as (seconds,
/// nanoseconds).
pub fn set_times_nofollow(p: &Path, atime: (i64, u32), mtime: (i64, u32)) -> io::Result<()> {
    let c = cpath(p)?;
    let ts = |(sec, nsec): (i64, u32)| libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: `c` is a NUL-terminated path and `times` points to two
    // initialised timespecs for the duration of the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes an unprivileged writer may still use on the filesystem holding
/// the open file or directory `f` (statfs's f_bavail).
pub fn free_bytes(f: &std::fs::File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: the descriptor is open for the duration of the call and `st`
    // points to writable memory the size of a statfs.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize as u64))
}
