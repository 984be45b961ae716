//! `folio mount` and `folio umount`.
//!
//! Lifecycle of a mount: the image is locked (flock) for as long as the
//! serving process lives, so a second mount of it fails and `folio umount`
//! can wait until the final sync has finished. The filesystem commits every
//! 5 seconds (ext4's default commit interval) and on unmount; SIGINT,
//! SIGTERM and SIGHUP unmount cleanly.

#![allow(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use folio_ext4::OpenOptions;
use folio_fuse::{FolioFuse, Shared};
use fuser::{Config, MountOption, SessionACL};

/// Parsed `-o` options.
#[derive(Debug)]
struct Opts {
    read_only: bool,
    acl: SessionACL,
    mount: Vec<MountOption>,
    /// Page-cache budget in bytes (`cache_size=`).
    cache_bytes: Option<u64>,
    /// `-o norecovery` (with ro): show the image as it is on disk instead
    /// of replaying a journal that needs recovery in memory.
    norecovery: bool,
    /// Confine the server once mounted (`-o noconfine` turns it off, for
    /// debugging); see `confine.rs`.
    confine: bool,
    /// `-o fakeroot` (as fuse2fs offers): the mounting user stands for
    /// root in the image (see `FolioFuse::with_fakeroot`).
    fakeroot: bool,
    /// How long the kernel caches attributes and names
    /// (`attr_timeout=`, `entry_timeout=`, in seconds, as libfuse has
    /// them).
    attr_timeout: Duration,
    entry_timeout: Duration,
}

/// The mount's attribute and name cache timeouts without
/// `attr_timeout=`/`entry_timeout=`. The image is locked while mounted,
/// so only requests through the mount change it, and the kernel learns
/// of each change from the request itself or from the server's
/// invalidation; libfuse's 1 s default is for servers whose data can
/// change underneath them.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// A timeout in seconds (fractions allowed), as libfuse's options take it.
fn parse_timeout(k: &str, v: &str) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(t) if t.is_finite() && (0.0..=1e9).contains(&t) => Ok(Duration::from_secs_f64(t)),
        _ => Err(format!("{k}={v}: give a number of seconds (0 to 1e9)")),
    }
}

/// The mount's page-cache budget without `cache_size=`: 1/16 of the
/// machine's memory, within 256 MiB..4 GiB. A budget, not an allocation:
/// only data in use takes memory, and clean data is reclaimed first. The
/// kernel's own page cache grows to all free memory; this keeps folio's
/// well below that while letting a working set of random writes stay
/// cached until writeback can sort it (a quarter of the 4-writer random
/// write figure of issue 12 was lost at the old fixed 256 MiB).
/// The page cache of a long-running server: 1/16 of RAM, within
/// 256 MiB..4 GiB.
pub fn default_cache_bytes() -> u64 {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib << 10);
    (mem / 16).clamp(256 << 20, 4 << 30)
}

/// A size with an optional K/M/G suffix (powers of 1024).
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mul) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        (i, 't' | 'T') => (&v[..i], 1 << 40),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

fn parse_opts(list: &[String], image: &Path) -> Result<Opts, String> {
    let mut o = Opts {
        read_only: false,
        acl: SessionACL::Owner,
        mount: Vec::new(),
        cache_bytes: None,
        norecovery: false,
        confine: true,
        fakeroot: false,
        attr_timeout: DEFAULT_TIMEOUT,
        entry_timeout: DEFAULT_TIMEOUT,
    };
    let mut fsname = None;
    let mut subtype = None;
    let mut no_auto_unmount = false;
    for opt in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (k, v) {
            ("ro", None) => o.read_only = true,
            ("norecovery" | "noload", None) => o.norecovery = true,
            ("confine", None) => o.confine = true,
            ("noconfine", None) => o.confine = false,
            ("fakeroot", None) => o.fakeroot = true,
            ("rw", None) => o.read_only = false,
            ("allow_other", None) => o.acl = SessionACL::All,
            ("allow_root", None) => o.acl = SessionACL::RootAndOwner,
            ("default_permissions", None) => {}
            ("auto_unmount", None) => o.mount.push(MountOption::AutoUnmount),
            ("no_auto_unmount", None) => no_auto_unmount = true,
            ("dev", None) => o.mount.push(MountOption::Dev),
            ("nodev", None) => o.mount.push(MountOption::NoDev),
            ("suid", None) => o.mount.push(MountOption::Suid),
            ("nosuid", None) => o.mount.push(MountOption::NoSuid),
            ("exec", None) => o.mount.push(MountOption::Exec),
            ("noexec", None) => o.mount.push(MountOption::NoExec),
            ("atime", None) => o.mount.push(MountOption::Atime),
            ("noatime", None) => o.mount.push(MountOption::NoAtime),
            ("sync", None) => o.mount.push(MountOption::Sync),
            ("async", None) => o.mount.push(MountOption::Async),
            ("dirsync", None) => o.mount.push(MountOption::DirSync),
            ("fsname", Some(v)) => fsname = Some(v.to_string()),
            ("cache_size", Some(v)) => match parse_size(v) {
                Some(n) if n >= 1 << 20 => o.cache_bytes = Some(n),
                _ => return Err(format!("cache_size={v}: give a size of at least 1M")),
            },
            ("subtype", Some(v)) => subtype = Some(v.to_string()),
            ("attr_timeout", Some(v)) => o.attr_timeout = parse_timeout(k, v)?,
            ("entry_timeout", Some(v)) => o.entry_timeout = parse_timeout(k, v)?,
            // fstab-only words mount(8) may pass through.
            (
                "defaults" | "user" | "users" | "nouser" | "auto" | "noauto" | "nofail" | "_netdev",
                None,
            ) => {}
            (k, _) if k.starts_with("x-") => {}
            _ => return Err(format!("unknown mount option {opt:?}")),
        }
    }
    // auto_unmount by default: the mount goes away if this process dies
    // (no ENOTCONN left behind), and it routes the mount through
    // fusermount3, which records the type as fuse.<subtype> (fuser's
    // direct mount(2) path would list it as plain "fuse").
    // fuser needs a non-owner ACL for auto_unmount; for root, allow_root
    // grants nothing beyond owner-only. Other users mount through
    // fusermount3 anyway (mount(2) needs root), which records the subtype.
    let root = is_root();
    if !root && !matches!(o.acl, SessionACL::Owner) && !fuse_conf_allows_other() {
        return Err(
            "allow_other and allow_root need `user_allow_other` in /etc/fuse.conf \
             (fusermount3 refuses them to users otherwise)"
                .into(),
        );
    }
    if root && !no_auto_unmount {
        if matches!(o.acl, SessionACL::Owner) {
            o.acl = SessionACL::RootAndOwner;
        }
        if !o.mount.contains(&MountOption::AutoUnmount) {
            o.mount.push(MountOption::AutoUnmount);
        }
    }
    o.mount.push(MountOption::DefaultPermissions);
    o.mount.push(if o.read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    o.mount.push(MountOption::FSName(
        fsname.unwrap_or_else(|| image.display().to_string()),
    ));
    o.mount.push(MountOption::Subtype(
        subtype.unwrap_or_else(|| "folio".into()),
    ));
    Ok(o)
}

/// Does this process run with effective uid 0?
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Is `user_allow_other` set in /etc/fuse.conf?
fn fuse_conf_allows_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|c| {
        c.lines()
            .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other")
    })
}

/// What a mount needs of the host, checked before anything starts so
/// that the error names what is missing: /dev/fuse usable, fusermount3
/// for an ordinary user, and a writable image for a read-write mount.
fn preflight(image: &Path, opts: &Opts) -> Result<(), String> {
    if let Err(e) = File::options().read(true).write(true).open("/dev/fuse") {
        return Err(format!(
            "/dev/fuse: {e} (FUSE must be usable by this user; distributions make \
             /dev/fuse mode 0666 when the fuse3 package is installed)"
        ));
    }
    if !is_root() {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()));
        if !found {
            return Err(
                "fusermount3 not found: an ordinary user mounts through it (install fuse3)".into(),
            );
        }
    }
    if !opts.read_only && !crate::image::is_nbd(image) {
        if let Err(e) = File::options().read(true).write(true).open(image) {
            return Err(format!(
                "{}: cannot open for writing: {e} (mount it with -o ro)",
                image.display()
            ));
        }
    }
    Ok(())
}

/// Is `dir` a mount point (per /proc/self/mountinfo)?
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    let target = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
        })
        .unwrap_or(false)
}

/// The image lock the mount holds until its final sync ends (shared for a
/// read-only mount), taken before anything else so that a busy image is
/// refused before daemonising.
///
/// A folio process that served a mount of this image which is gone (a
/// plain `umount` returns before the server has made its final commit and
/// let go of the image) is waited for, up to a minute, with a message: on
/// the kernel's ext4 an image is free once `umount` returns, and scripts
/// that unmount and mount again rely on that.
fn lock_image(image: &Path, read_only: bool) -> Result<File, String> {
    const PATIENCE: Duration = Duration::from_secs(60);
    let start = Instant::now();
    let mut said = false;
    loop {
        let e = match folio_ext4::fs::lock_image(image, read_only) {
            Ok(f) => return Ok(f),
            Err(folio_ext4::Error::Locked(holder)) => {
                if start.elapsed() < PATIENCE && finishing_folio_mount(image) {
                    if !said {
                        eprintln!(
                            "folio: {}: waiting for the folio process of its last mount to \
                             finish its final commit",
                            image.display()
                        );
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                format!("{}: in use by {holder}", image.display())
            }
            Err(e) => format!("{}: cannot lock: {e}", image.display()),
        };
        return Err(e);
    }
}

/// Is the image's lock held by a folio mount server whose mount is gone
/// (or by nobody any more)? Such a server's mount point is no longer a
/// mount point, or it has closed /dev/fuse (its session ended), and it is
/// making its final commit.
fn finishing_folio_mount(image: &Path) -> bool {
    let Ok(f) = File::open(image) else {
        return false;
    };
    let Some((pid, argv)) = folio_ext4::fs::flock_holder(&f) else {
        // Nobody holds it any more (the server exited a moment ago): try
        // again.
        return true;
    };
    let server = argv.first().is_some_and(|exe| {
        let name = exe.rsplit('/').next().unwrap_or(exe);
        name == "folio" || name == "mount.fuse.folio" || name == "mount.folio"
    });
    // `folio mount IMAGE MOUNTPOINT ...`: the mount point is the second
    // argument after "mount" that is not an option.
    let Some(at) = argv.iter().position(|a| a == "mount") else {
        return false;
    };
    let mut positional = Vec::new();
    let mut args = argv[at + 1..].iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-o" | "--threads" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => positional.push(a),
        }
    }
    let Some(mnt) = positional.get(1) else {
        return false;
    };
    if !server {
        return false;
    }
    if !is_mounted(Path::new(mnt)) {
        return true;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    !fds.flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/fuse")))
}

/// Mount in this process and serve until unmounted or signalled.
pub fn mount_foreground(
    image: &Path,
    mountpoint: &Path,
    options: &[String],
    threads: usize,
) -> Result<(), String> {
    let opts = parse_opts(options, image)?;
    preflight(image, &opts)?;
    if is_mounted(mountpoint) {
        return Err(format!(
            "{}: already a mount point (unmount it first)",
            mountpoint.display()
        ));
    }
    // An image on an NBD server has no host file to lock.
    let lock = if crate::image::is_nbd(image) {
        None
    } else {
        Some(lock_image(image, opts.read_only)?)
    };
    let fs = crate::image::open(image, {
        let mut o = OpenOptions {
            read_only: opts.read_only,
            // Held above, for the whole life of the mount.
            lock: false,
            ..Default::default()
        };
        o.norecovery = opts.norecovery;
        o.page_cache.budget_bytes = opts.cache_bytes.unwrap_or_else(default_cache_bytes);
        o
    })
    .map_err(|e| format!("{}: {e}", image.display()))?;
    if let Some(r) = fs.recovery_report() {
        eprintln!(
            "folio: {}: journal recovered ({} transactions)",
            image.display(),
            r.transactions
        );
    }
    if let (Some(why), false) = (fs.read_only_reason(), opts.read_only) {
        eprintln!("folio: {}: mounting read-only: {why}", image.display());
    }
    let shared: Shared = Arc::new(fs);
    // Block the signals we wait for before any thread exists, so that
    // every thread inherits the mask and only sigwait sees them.
    let set = signal_set();
    // SAFETY: `set` is a valid, initialised sigset_t; a null old-set is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let mut config = Config::default();
    config.mount_options = opts.mount;
    config.acl = opts.acl;
    config.n_threads = Some(threads.max(1));
    let mut fuse = FolioFuse::new(shared.clone())
        .with_workers(threads.max(1))
        .with_timeouts(opts.attr_timeout, opts.entry_timeout);
    if opts.fakeroot {
        // SAFETY: getuid/getgid only return this process's ids.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        fuse = fuse.with_fakeroot(uid, gid);
    }
    let notifier = fuse.notifier_slot();
    let invalidate = fuse.attr_invalidator();
    let mut session = fuser::Session::new(fuse, mountpoint, &config)
        .map_err(|e| format!("{}: mount failed: {e}", mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    let mut unmounter = session.unmount_callable();
    if std::env::var_os(DAEMON_ENV).is_some() {
        // Mounted: let go of the starter's stdio (it exits once it sees the
        // mount), as a daemon does.
        detach_stdio();
    }
    // Confined, the server can no longer unmount (no capabilities, no
    // exec): a helper started now does it when asked.
    let mut helper = if opts.confine {
        let h = UnmountHelper::start(mountpoint)?;
        crate::confine::confine(&crate::confine::Policy::default());
        Some(h)
    } else {
        None
    };
    let bg = session
        .spawn()
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    // The session ends on unmount (by us or by anyone): wake the main
    // thread with SIGUSR1.
    std::thread::spawn(move || {
        let _ = bg.join();
        // SAFETY: sending a signal to our own process has no memory effects.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    });
    let flusher = crate::flusher::Flusher::spawn(shared.clone(), Some(invalidate));
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        if sig == libc::SIGUSR1 {
            break;
        }
        // SIGINT / SIGTERM / SIGHUP: unmount; the session then ends.
        if let Some(h) = &mut helper {
            h.unmount();
            continue;
        }
        // (With auto_unmount, fuser's own unmount leaves the work to the
        // fusermount3 helper, so ask for it explicitly.)
        unmount_now(mountpoint, || {
            unmounter.unmount().is_ok() && !is_mounted(mountpoint)
        });
    }
    // The session has ended (its handlers are gone); stop the flusher, and
    // the filesystem is ours alone to close.
    // Let go of /dev/fuse before the final commit (the notifier and the
    // unmounter hold channels to it): a new mount of the image waits for
    // a server that has done so (see `finishing_folio_mount`).
    drop(notifier);
    drop(unmounter);
    drop(helper);
    flusher.stop();
    let result = match Arc::try_unwrap(shared) {
        Ok(fs) => fs.close(),
        // Something still holds it (a FUSE worker not yet gone): make
        // everything durable now; its last holder closes it on drop.
        Err(fs) => fs.sync(),
    }
    .map_err(|e| format!("{}: final sync failed: {e}", image.display()));
    drop(lock);
    result
}

/// The process that unmounts a confined server's mount when asked: a
/// `folio unmount-helper MOUNTPOINT` started before confinement, reading
/// requests on a pipe. It ends when the server closes the pipe.
struct UnmountHelper {
    child: std::process::Child,
}

impl UnmountHelper {
    fn start(mountpoint: &Path) -> Result<UnmountHelper, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .arg("unmount-helper")
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the unmount helper: {e}"))?;
        Ok(UnmountHelper { child })
    }

    fn unmount(&mut self) {
        use std::io::Write;
        if let Some(w) = self.child.stdin.as_mut() {
            if w.write_all(b"u").is_err() {
                eprintln!("folio: the unmount helper is gone; unmount by hand");
            }
        }
    }
}

impl Drop for UnmountHelper {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Unmount `mountpoint`: `fusermount3 -u`, else `other`; if both fail,
/// detach it lazily (`umount -l`).
fn unmount_now(mountpoint: &Path, other: impl FnOnce() -> bool) {
    let done = Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status()
        .is_ok_and(|s| s.success())
        || other();
    if !done {
        eprintln!("folio: unmount failed; detaching lazily");
        let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
    }
}

/// `folio unmount-helper MOUNTPOINT` (internal): unmount MOUNTPOINT each
/// time a byte arrives on stdin; exit at its end.
pub fn unmount_helper(mountpoint: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut stdin = std::io::stdin().lock();
    let mut b = [0u8; 1];
    while matches!(stdin.read(&mut b), Ok(1)) {
        unmount_now(mountpoint, || {
            Command::new("umount")
                .arg(mountpoint)
                .status()
                .is_ok_and(|s| s.success())
        });
    }
    Ok(())
}

/// Set for the background server process started by [`mount_background`].
const DAEMON_ENV: &str = "FOLIO_MOUNT_DAEMON";

pub(crate) fn detach_stdio() {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        for fd in [0, 1, 2] {
            // SAFETY: dup2 onto the standard descriptors of a file we keep
            // open for the call; no Rust object owns descriptors 0-2.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

pub(crate) fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only adds valid
    // signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Mount in a background process and return once the mount is live.
pub fn mount_background(
    image: &Path,
    mountpoint: &Path,
    options: &[String],
    threads: usize,
) -> Result<(), String> {
    // Check what we can before detaching, for clear errors.
    preflight(image, &parse_opts(options, image)?)?;
    if !mountpoint.is_dir() {
        return Err(format!(
            "{}: mount point is not a directory",
            mountpoint.display()
        ));
    }
    // Something already mounted there would make the wait below succeed
    // at once, whatever the new mount process does: refuse instead of
    // stacking a second mount.
    if is_mounted(mountpoint) {
        return Err(format!(
            "{}: already a mount point (unmount it first)",
            mountpoint.display()
        ));
    }
    // A busy image: said here, before detaching, not by a daemon that
    // fails where nobody sees it.
    let ro = parse_opts(options, image)?.read_only;
    if !crate::image::is_nbd(image) {
        drop(lock_image(image, ro)?);
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(image)
        .arg(mountpoint)
        .arg("-f")
        .arg("--threads")
        .arg(threads.to_string());
    for o in options {
        cmd.arg("-o").arg(o);
    }
    use std::os::unix::process::CommandExt;
    cmd.env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the mount process: {e}"))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if is_mounted(mountpoint) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut why = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut why);
            }
            let why = why.trim().trim_start_matches("folio: ");
            return Err(if why.is_empty() {
                format!("the mount process exited ({status}) before mounting")
            } else {
                why.to_string()
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    Err(format!("{}: not mounted after 20 s", mountpoint.display()))
}

/// Unmount `mountpoint`; with `wait_for`, wait until the serving process
/// has released the image (its final sync is done).
pub fn umount(mountpoint: &Path, lazy: bool) -> Result<(), String> {
    let source = mount_source(mountpoint);
    // An image on an NBD server has no host file whose lock tells when
    // the server is done: wait for the server process itself.
    let nbd_servers: Vec<u32> = source
        .as_deref()
        .filter(|s| crate::image::is_nbd(s))
        .map(mount_servers_of)
        .unwrap_or_default();
    let status = Command::new("fusermount3")
        .arg(if lazy { "-uz" } else { "-u" })
        .arg(mountpoint)
        .status()
        .or_else(|_| {
            Command::new("umount")
                .args(if lazy { vec!["-l"] } else { vec![] })
                .arg(mountpoint)
                .status()
        })
        .map_err(|e| format!("cannot run fusermount3 or umount: {e}"))?;
    if !status.success() {
        return Err(format!("{}: unmount failed", mountpoint.display()));
    }
    if !nbd_servers.is_empty() {
        let patience = Duration::from_secs(if lazy { 2 } else { 60 });
        let start = Instant::now();
        while start.elapsed() < patience {
            if nbd_servers
                .iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if lazy {
            return Ok(());
        }
        return Err(format!(
            "{}: the folio process serving its NBD image did not finish within 60 s",
            mountpoint.display()
        ));
    }
    if let Some(img) = source.filter(|p| p.is_file()) {
        // The server holds a lock on the image until its final sync ends.
        // A lazy unmount of a busy mount detaches it at once, but the
        // server serves the files still open until the last is closed:
        // like umount -l, report success after a short wait and say so.
        let patience = Duration::from_secs(if lazy { 2 } else { 60 });
        if let Ok(f) = File::open(&img) {
            let start = Instant::now();
            let mut said = false;
            while start.elapsed() < patience {
                if f.try_lock_shared().is_ok() {
                    return Ok(());
                }
                if !said && !lazy && start.elapsed() > Duration::from_secs(1) {
                    // A large final commit: say what is being waited for.
                    eprintln!(
                        "folio: {}: waiting for the folio process serving {} to make its \
                         final commit",
                        mountpoint.display(),
                        img.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if lazy {
                eprintln!(
                    "folio: {}: detached; the folio process makes its final commit once the \
                     last file open on it is closed",
                    mountpoint.display()
                );
                return Ok(());
            }
            return Err(format!(
                "{}: the folio process serving {} did not finish within 60 s",
                mountpoint.display(),
                img.display()
            ));
        }
    }
    Ok(())
}

/// The source (fsname) of a fuse.folio mount, if `dir` is one.
/// The folio processes serving a mount of `source`: their command line
/// is `folio mount SOURCE ...` and they hold /dev/fuse open.
pub fn mount_servers_of(source: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            let serving = args.iter().any(|a| *a == b"mount")
                && args.contains(&source.as_os_str().as_encoded_bytes());
            serving
                && std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                    fds.flatten().any(|e| {
                        std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new("/dev/fuse"))
                    })
                })
        })
        .collect()
}

fn mount_source(dir: &Path) -> Option<PathBuf> {
    let canon = dir.canonicalize().ok()?;
    let target = canon.to_string_lossy().replace(' ', "\\040");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for l in info.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) != Some(&target.as_str()) {
            continue;
        }
        let dash = f.iter().position(|x| *x == "-")?;
        if f.get(dash + 1).is_some_and(|t| t.starts_with("fuse")) {
            return f
                .get(dash + 2)
                .map(|s| PathBuf::from(s.replace("\\040", " ")));
        }
    }
    None
}

/// `mount -o remount,ro|rw DIR` (mount(8) runs the helper so, and
/// `folio mount -o remount,... IMAGE DIR` does the same): for `ro`, make
/// everything durable first — syncfs(2) makes the kernel write back the
/// mount's cached pages, and an fsync of the mount's root directory makes
/// the server commit everything — then switch the mount with mount(2)'s
/// MS_REMOUNT, keeping its nosuid/nodev/noexec/atime flags. Needs root
/// (CAP_SYS_ADMIN), as remounting any filesystem does. A mount whose
/// server opened the image read-only cannot become read-write.
pub fn remount(image: &Path, mountpoint: &Path, options: &[String]) -> Result<(), String> {
    let words: Vec<&str> = options
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
        .collect();
    let ro = words
        .iter()
        .rev()
        .find(|w| **w == "ro" || **w == "rw")
        .is_some_and(|w| *w == "ro");

    let canon = mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let target = canon.to_string_lossy().replace(' ', "\\040");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(target.as_str()))
        .ok_or_else(|| format!("{}: not mounted", mountpoint.display()))?;
    if line.split(" - ").nth(1).and_then(|r| r.split(' ').next()) != Some("fuse.folio") {
        return Err(format!("{}: not a folio mount", mountpoint.display()));
    }
    if !ro {
        if let Ok(f) = File::open(image) {
            if let Some((_, argv)) = folio_ext4::fs::flock_holder(&f) {
                let server_ro = argv
                    .windows(2)
                    .any(|w| w[0] == "-o" && w[1].split(',').any(|o| o == "ro"));
                if server_ro {
                    return Err(format!(
                        "{}: the server opened the image read-only; unmount and mount it rw",
                        mountpoint.display()
                    ));
                }
            }
        }
    }
    let dir = File::open(&canon).map_err(|e| format!("{}: {e}", canon.display()))?;
    if ro {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor we hold open; no memory is shared.
        #[allow(unsafe_code)]
        let r = unsafe { libc::syncfs(dir.as_raw_fd()) };
        if r != 0 {
            return Err(format!(
                "{}: syncfs: {}",
                canon.display(),
                std::io::Error::last_os_error()
            ));
        }
        dir.sync_all()
            .map_err(|e| format!("{}: final commit before remount: {e}", canon.display()))?;
    }
    let mut flags = libc::MS_REMOUNT;
    if ro {
        flags |= libc::MS_RDONLY;
    }
    // The mount's flags as they are, then as the options change them (a
    // remount replaces them all).
    let flag = |o: &str| match o {
        "nosuid" => Some(libc::MS_NOSUID),
        "nodev" => Some(libc::MS_NODEV),
        "noexec" => Some(libc::MS_NOEXEC),
        "noatime" => Some(libc::MS_NOATIME),
        "nodiratime" => Some(libc::MS_NODIRATIME),
        "relatime" => Some(libc::MS_RELATIME),
        "strictatime" => Some(libc::MS_STRICTATIME),
        _ => None,
    };
    let per_mount = line.split(' ').nth(5).unwrap_or("");
    for o in per_mount.split(',') {
        flags |= flag(o).unwrap_or(0);
    }
    for w in &words {
        let off = match *w {
            "suid" => libc::MS_NOSUID,
            "dev" => libc::MS_NODEV,
            "exec" => libc::MS_NOEXEC,
            "atime" => libc::MS_NOATIME | libc::MS_RELATIME | libc::MS_STRICTATIME,
            "diratime" => libc::MS_NODIRATIME,
            _ => 0,
        };
        flags &= !off;
        if let Some(f) = flag(w) {
            if f & (libc::MS_NOATIME | libc::MS_RELATIME | libc::MS_STRICTATIME) != 0 {
                flags &= !(libc::MS_NOATIME | libc::MS_RELATIME | libc::MS_STRICTATIME);
            }
            flags |= f;
        } else if off == 0
            && !matches!(*w, "remount" | "ro" | "rw" | "defaults")
            && !w.starts_with("x-")
        {
            return Err(format!(
                "remount: option {w:?} cannot be changed on a mounted folio filesystem"
            ));
        }
    }
    let c = std::ffi::CString::new(canon.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: path has a NUL byte", canon.display()))?;
    // SAFETY: a NUL-terminated target path; source, type and data may be
    // null for MS_REMOUNT.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(format!(
            "{}: remount: {}",
            canon.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_like_fuse_mounts() {
        let img = Path::new("/x.img");
        let o = parse_opts(
            &["ro,allow_other".into(), "fsname=disk,noatime".into()],
            img,
        )
        .unwrap();
        assert!(o.read_only);
        assert!(matches!(o.acl, SessionACL::All));
        assert!(o.mount.contains(&MountOption::FSName("disk".into())));
        assert!(o.mount.contains(&MountOption::Subtype("folio".into())));
        assert!(o.mount.contains(&MountOption::NoAtime));
        assert!(parse_opts(&["defaults,nofail,x-systemd.automount".into()], img).is_ok());
        let o = parse_opts(&["cache_size=64M".into()], img).unwrap();
        assert_eq!(o.cache_bytes, Some(64 << 20));
        assert!(parse_opts(&["cache_size=12".into()], img).is_err());
        assert_eq!(o.attr_timeout, DEFAULT_TIMEOUT);
        let o = parse_opts(&["attr_timeout=0.5,entry_timeout=0".into()], img).unwrap();
        assert_eq!(o.attr_timeout, Duration::from_millis(500));
        assert_eq!(o.entry_timeout, Duration::ZERO);
        for bad in ["attr_timeout=-1", "entry_timeout=soon", "attr_timeout=inf"] {
            let e = parse_opts(&[bad.into()], img).unwrap_err();
            assert!(e.contains("seconds"), "{bad}: {e}");
        }
        assert!(parse_opts(&["bogus".into()], img)
            .unwrap_err()
            .contains("bogus"));
    }
}
