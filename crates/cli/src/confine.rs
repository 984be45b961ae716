//! Confinement of a server after start-up (issue 17): once the image, the
//! journal, /dev/fuse and the listening socket are open, a process that
//! parses an untrusted image needs nothing else of the host. A crafted
//! image that found a bug in the parser then reaches no more than the
//! process holds open.
//!
//! In order:
//! 1. **No new privileges** (`PR_SET_NO_NEW_PRIVS`): nothing it runs can
//!    gain privileges (setuid programs, file capabilities).
//! 2. **No capabilities**: the bounding, ambient, inheritable, permitted
//!    and effective sets are emptied (for root too: unmounting, the one
//!    privileged act a mount server does late, is left to a helper
//!    process started before confinement; see `mount.rs`).
//! 3. **Landlock**: every filesystem access right is handled and none is
//!    granted (but removing files in one directory, for the export's
//!    Unix socket); TCP bind/connect are handled and not granted; signals
//!    and abstract Unix sockets are scoped to the process. On a kernel
//!    without Landlock (or an older ABI) this is best effort, said once.
//! 4. **seccomp**: an allow-list of the system calls the servers use
//!    (read/write on open descriptors, memory, threads, futexes, sockets
//!    already bound); anything else — `openat`, `execve`, `socket`,
//!    `connect`, `bind`, `mount`, `ptrace`, ... — fails with EPERM.
//!
//! Threads inherit the confinement of the thread that creates them, so it
//! is applied on the main thread before any worker thread exists.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a confined process may still do.
#[derive(Default)]
pub struct Policy {
    /// Removing files (not directories) beneath this directory: the
    /// export's Unix socket, removed at exit.
    pub remove_in: Option<PathBuf>,
    /// Making and writing files, directories and symlinks beneath this
    /// directory (`folio get`'s destination), with the system calls that
    /// takes (open, mkdir, symlink, chmod, chown, utimes, xattrs).
    pub write_beneath: Option<PathBuf>,
}

/// What was enforced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Status {
    pub no_new_privs: bool,
    pub capabilities_dropped: bool,
    /// Landlock fully enforced (false: partly or not, see `notes`).
    pub landlock: bool,
    pub seccomp: bool,
    /// What could not be enforced, and why.
    pub notes: Vec<String>,
}

static SAID: AtomicBool = AtomicBool::new(false);

/// Confine the calling thread (and every thread it creates from now on).
/// Never fails: what the kernel lacks is noted, said once on stderr, and
/// the process runs anyway.
pub fn confine(policy: &Policy) -> Status {
    let mut st = Status::default();
    match set_no_new_privs() {
        Ok(()) => st.no_new_privs = true,
        Err(e) => st.notes.push(format!("no_new_privs: {e}")),
    }
    match drop_capabilities() {
        Ok(()) => st.capabilities_dropped = true,
        Err(e) => st.notes.push(format!("capabilities: {e}")),
    }
    match landlock(policy) {
        Ok(None) => st.landlock = true,
        Ok(Some(note)) => st.notes.push(note),
        Err(e) => st.notes.push(format!("Landlock: {e}")),
    }
    match seccomp(policy.write_beneath.is_some()) {
        Ok(()) => st.seccomp = true,
        Err(e) => st.notes.push(format!("seccomp: {e}")),
    }
    if !st.notes.is_empty() && !SAID.swap(true, Ordering::Relaxed) {
        eprintln!(
            "folio: confinement incomplete ({}); running anyway",
            st.notes.join("; ")
        );
    }
    st
}

#[allow(unsafe_code)]
fn set_no_new_privs() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn drop_capabilities() -> Result<(), String> {
    use caps::CapSet;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // clearing the effective set takes away.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| e.to_string())?;
        }
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| format!("{set:?}: {e}"))?;
    }
    Ok(())
}

/// `Ok(None)`: fully enforced; `Ok(Some(why))`: partly or not.
fn landlock(policy: &Policy) -> Result<Option<String>, landlock::RulesetError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    if let Some(dir) = &policy.remove_in {
        ruleset = ruleset.add_rules(path_beneath_rules([dir], AccessFs::RemoveFile))?;
    }
    if let Some(dir) = &policy.write_beneath {
        // Everything but running programs and making device nodes.
        let rights = AccessFs::from_all(abi)
            & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock);
        ruleset = ruleset.add_rules(path_beneath_rules([dir], rights))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => None,
        RulesetStatus::PartiallyEnforced => {
            Some("Landlock only partly enforced (an older kernel ABI)".into())
        }
        RulesetStatus::NotEnforced => Some("Landlock is not available in this kernel".into()),
    })
}

/// The system calls a confined process makes; with `host_writes`, also
/// those that make and write a tree of host files (Landlock says where).
fn allowed_syscalls(host_writes: bool) -> Vec<libc::c_long> {
    let mut v = vec![
        // I/O on descriptors already open.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_fstat,
        libc::SYS_fstatfs,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_flock,
        // Sockets already listening or connected.
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_ppoll,
        // The export's socket file at exit (Landlock limits where).
        libc::SYS_unlinkat,
        // Memory.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_membarrier,
        // Threads, time, signals.
        libc::SYS_futex,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_set_tid_address,
        libc::SYS_prlimit64,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_tkill,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_poll, libc::SYS_unlink, libc::SYS_arch_prctl]);
    if host_writes {
        v.extend([
            libc::SYS_openat,
            libc::SYS_mkdirat,
            libc::SYS_symlinkat,
            libc::SYS_linkat,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_fchown,
            libc::SYS_fchownat,
            libc::SYS_utimensat,
            libc::SYS_ftruncate,
            libc::SYS_setxattr,
            libc::SYS_lsetxattr,
            libc::SYS_fsetxattr,
            libc::SYS_getdents64,
        ]);
        #[cfg(target_arch = "x86_64")]
        v.extend([
            libc::SYS_open,
            libc::SYS_mkdir,
            libc::SYS_symlink,
            libc::SYS_link,
            libc::SYS_chmod,
            libc::SYS_chown,
            libc::SYS_lchown,
            libc::SYS_rmdir,
        ]);
    }
    v
}

fn seccomp(host_writes: bool) -> Result<(), String> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    // c_long is i64 here but not on every target.
    #[allow(clippy::useless_conversion)]
    let rules = allowed_syscalls(host_writes)
        .into_iter()
        .map(|nr| (i64::from(nr), Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| e.to_string())?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    seccompiler::apply_filter(&prog).map_err(|e| e.to_string())
}

/// The confinement of process `pid` as /proc shows it: (CapEff is zero,
/// NoNewPrivs, Seccomp mode 2).
pub fn proc_status(pid: u32) -> Option<(bool, bool, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
    };
    Some((
        field("CapEff:")?.trim_start_matches('0').is_empty(),
        field("NoNewPrivs:")? == "1",
        field("Seccomp:")? == "2",
    ))
}
