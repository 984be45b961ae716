//! `folio export IMAGE PATH`: serve the file PATH inside an ext4 image as
//! an NBD export, as the loop driver serves a file as a block device
//! (seed 001): every read and write goes through the file's ordinary data
//! path (page cache, delayed allocation, writeback, the journal's ordered
//! mode), TRIM punches holes, WRITE_ZEROES zeroes or punches ranges, and
//! BLOCK_STATUS answers from the file's own map (SEEK_DATA/SEEK_HOLE,
//! which count dirty cached data over unwritten extents as data).

use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use folio_ext4::falloc::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
use folio_ext4::{Filesystem, Owner, SetAttr};
use folio_nbd::{BouncePool, Export, ExportConfig, Listen, Listener, Server, Transform};

use crate::flusher::Flusher;

/// What `folio export` was asked for.
pub struct ExportArgs {
    pub image: String,
    pub path: String,
    pub listen: Listen,
    /// The export's name; by default PATH without its leading '/'.
    pub name: Option<String>,
    pub read_only: bool,
    /// Create PATH (sparse) if it is missing.
    pub create: Option<u64>,
    /// Create PATH or grow it to this size.
    pub size: Option<u64>,
    pub transform: Option<String>,
    pub pid_file: Option<PathBuf>,
    /// Run this shell command with `$uri` set, then stop (as nbdkit --run).
    pub run: Option<String>,
    pub max_connections: usize,
    /// Bounce buffers reserved at start (of [`BOUNCE_CHUNK`] bytes each).
    pub bounce_buffers: usize,
    /// Confine the server once listening (see `confine.rs`).
    pub confine: bool,
}

/// The size of one bounce buffer: requests larger than this stream
/// through it in pieces.
pub const BOUNCE_CHUNK: usize = 1 << 20;

/// Set for the serving process that `--fork` starts.
pub const DAEMON_ENV: &str = "FOLIO_EXPORT_DAEMON";

fn io_err(e: folio_ext4::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// A regular file of a filesystem, as an NBD export.
pub struct FileExport {
    fs: Arc<Filesystem>,
    ino: u32,
    size: u64,
}

impl FileExport {
    pub fn new(fs: Arc<Filesystem>, ino: u32, size: u64) -> FileExport {
        FileExport { fs, ino, size }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.fs.read(self.ino, offset, buf).map_err(io_err)?;
        // Inside the export's size a short read is a hole at the end.
        buf[n..].fill(0);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let n = self.fs.write(self.ino, offset, data).map_err(io_err)?;
        if n < data.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.fs.fsync(self.ino, false).map_err(io_err)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, true)
    }

    fn zero(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = FALLOC_FL_KEEP_SIZE
            | if punch {
                FALLOC_FL_PUNCH_HOLE
            } else {
                FALLOC_FL_ZERO_RANGE
            };
        self.fs
            .fallocate(self.ino, mode, offset, len)
            .map_err(io_err)
    }

    fn extent(&self, offset: u64, len: u64) -> io::Result<(u64, bool)> {
        let end = offset + len;
        match self.fs.seek_data_hole(self.ino, offset, true) {
            // Data here: it runs to the next hole (or the end of file).
            Ok(d) if d == offset => {
                let h = self
                    .fs
                    .seek_data_hole(self.ino, offset, false)
                    .map_err(io_err)?;
                Ok((h.min(end) - offset, false))
            }
            Ok(d) => Ok((d.min(end) - offset, true)),
            // No data from here to the end of the file.
            Err(folio_ext4::Error::NoSuchOffset) => Ok((len, true)),
            Err(e) => Err(io_err(e)),
        }
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // Read the range into the page cache, 64 KiB at a time.
        let mut buf = [0u8; 64 << 10];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(buf.len() as u64) as usize;
            self.fs.read(self.ino, at, &mut buf[..n]).map_err(io_err)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Find (or create, or grow) the file to serve: (inode, size).
fn prepare_file(fs: &Filesystem, args: &ExportArgs) -> Result<(u32, u64), String> {
    let path = &args.path;
    if !path.starts_with('/') {
        return Err(format!(
            "{path}: the path inside the image must be absolute"
        ));
    }
    let ino = match fs.resolve_follow(path) {
        Ok(ino) => ino,
        Err(folio_ext4::Error::NotFound) if args.create.is_some() || args.size.is_some() => {
            if args.read_only {
                return Err(format!(
                    "{path}: no such file (and --read-only cannot create it)"
                ));
            }
            let (parent, name) = fs
                .resolve_parent(path)
                .map_err(|e| format!("{path}: {e}"))?;
            fs.create(parent, name.as_bytes(), 0o644, Owner::default())
                .map_err(|e| format!("{path}: cannot create: {e}"))?
        }
        Err(e) => return Err(format!("{path}: {e}")),
    };
    let st = fs.stat(ino).map_err(|e| format!("{path}: {e}"))?;
    if st.file_type != folio_ext4::FileType::Regular {
        return Err(format!("{path}: not a regular file"));
    }
    let want = args.size.or(args.create.filter(|_| st.size == 0));
    let size = match want {
        Some(s) if s > st.size => {
            if args.read_only {
                return Err(format!(
                    "{path}: --size with --read-only cannot grow the file"
                ));
            }
            let attr = SetAttr {
                size: Some(s),
                ..Default::default()
            };
            fs.setattr(ino, &attr)
                .map_err(|e| format!("{path}: cannot grow to {s} bytes: {e}"))?;
            s
        }
        Some(s) if s < st.size => {
            return Err(format!(
                "{path}: is {} bytes; --size {s} would cut it (shrink it with `folio io` first)",
                st.size
            ))
        }
        _ => st.size,
    };
    if size == 0 {
        return Err(format!("{path}: the file is empty; give --size to grow it"));
    }
    Ok((ino, size))
}

/// Serve until SIGINT/SIGTERM/SIGHUP (or until `--run`'s command ends);
/// then finish the requests under way, write everything back and close
/// the filesystem cleanly. Returns the exit status (`--run`'s, or 0).
pub fn serve(fs: Filesystem, args: &ExportArgs) -> Result<i32, String> {
    let transform = match &args.transform {
        Some(t) => Some(Transform::parse(t).map_err(|e| e.to_string())?),
        None => None,
    };
    let (ino, size) = prepare_file(&fs, args)?;
    if let Some(t) = &transform {
        if size % t.alignment() != 0 {
            return Err(format!(
                "{}: {size} bytes is not a multiple of the transform's {}-byte sectors",
                args.path,
                t.alignment()
            ));
        }
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| args.path.trim_start_matches('/').to_string());
    let fs = Arc::new(fs);
    let server = Arc::new(Server::new(
        Arc::new(FileExport::new(fs.clone(), ino, size)),
        ExportConfig {
            name: name.clone(),
            description: format!("{} in {}", args.path, args.image),
            read_only: args.read_only,
            transform,
        },
        BouncePool::new(args.bounce_buffers, BOUNCE_CHUNK),
    ));
    // A client that goes away must not kill the server with SIGPIPE: the
    // write fails with EPIPE instead and ends that connection only.
    #[allow(unsafe_code)]
    // SAFETY: setting a signal's disposition touches no memory of ours.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN)
    };
    let listener = Listener::bind(&args.listen).map_err(|e| format!("cannot listen: {e}"))?;
    let uri = listener.uri(&name);
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    // Signals are waited for by one thread; every other thread inherits
    // the mask that blocks them.
    let set = crate::mount::signal_set();
    #[allow(unsafe_code)]
    // SAFETY: `set` is a valid, initialised sigset_t; a null old-set is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    let stop = Arc::new(AtomicBool::new(false));
    let status = Arc::new(std::sync::Mutex::new(0));
    // `--run`'s command starts now, before the confinement below, which
    // it must not inherit (the listener is bound: its connections wait).
    let run = match &args.run {
        Some(cmd) => Some(
            Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .env("uri", &uri)
                .env("nbd", &uri)
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run {cmd:?}: {e}"))?,
        ),
        None => None,
    };
    if run.is_none() {
        if std::env::var_os(DAEMON_ENV).is_some() {
            // Tell the starting process where we serve, then let go of
            // its stdio as a daemon does.
            println!("{uri}");
            crate::mount::detach_stdio();
        } else {
            eprintln!(
                "folio export: serving {} of {} at {uri}",
                args.path, args.image
            );
        }
    }
    if args.confine {
        // Nothing of the host is needed from here on but removing the
        // Unix socket's file at exit.
        let remove_in = match &args.listen {
            Listen::Unix(p) => p.parent().map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_path_buf()
                }
            }),
            Listen::Tcp(_) => None,
        };
        crate::confine::confine(&crate::confine::Policy {
            remove_in,
            ..Default::default()
        });
    }
    {
        let stop = stop.clone();
        std::thread::spawn(move || loop {
            let mut sig: libc::c_int = 0;
            #[allow(unsafe_code)]
            // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
            unsafe {
                libc::sigwait(&set, &mut sig)
            };
            if sig != libc::SIGUSR1 {
                stop.store(true, Ordering::Relaxed);
            }
        });
    }
    let flusher = Flusher::spawn(fs.clone(), None);
    if let Some(mut child) = run {
        let (stop, status) = (stop.clone(), status.clone());
        std::thread::spawn(move || {
            let code = child.wait().map(|s| s.code().unwrap_or(1)).unwrap_or(1);
            *status.lock().unwrap_or_else(|e| e.into_inner()) = code;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let served = folio_nbd::serve_until(server.clone(), &listener, &stop, args.max_connections);
    drop(listener);
    drop(server);
    flusher.stop();
    let closed = match Arc::try_unwrap(fs) {
        Ok(fs) => fs.close(),
        Err(fs) => fs.sync(),
    };
    served.map_err(|e| format!("serving stopped: {e}"))?;
    closed.map_err(|e| format!("{}: final sync failed: {e}", args.image))?;
    let code = *status.lock().unwrap_or_else(|e| e.into_inner());
    Ok(code)
}

/// `--fork`: start the server as a background process and return once
/// it listens, printing its URI; its errors before that are ours.
pub fn serve_background() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--fork")
        .collect();
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(exe)
        .args(args)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the export process: {e}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        let _ = io::BufReader::new(out).read_line(&mut line);
    }
    if line.trim().is_empty() {
        let mut why = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut why);
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        let why = why.trim().trim_start_matches("folio: ");
        return Err(if why.is_empty() {
            format!("the export process exited ({status}) before serving")
        } else {
            why.to_string()
        });
    }
    println!("{}", line.trim());
    Ok(())
}

/// `folio get --transform`: copy the file `source` out of the image with
/// the transform undone, as a client of the export would read it.
pub fn get_transformed(
    fs: &Filesystem,
    source: &str,
    dest: &std::path::Path,
    t: &Transform,
) -> Result<(), String> {
    use std::io::Write;
    let ino = fs
        .resolve_follow(source)
        .map_err(|e| format!("{source}: {e}"))?;
    let st = fs.stat(ino).map_err(|e| format!("{source}: {e}"))?;
    if st.file_type != folio_ext4::FileType::Regular {
        return Err(format!("{source}: --transform copies one regular file"));
    }
    if !st.size.is_multiple_of(t.alignment()) {
        return Err(format!(
            "{source}: {} bytes is not a multiple of the transform's {}-byte sectors",
            st.size,
            t.alignment()
        ));
    }
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?,
    );
    let mut buf = vec![0u8; BOUNCE_CHUNK];
    let mut at = 0u64;
    while at < st.size {
        let n = (st.size - at).min(buf.len() as u64) as usize;
        let got = fs
            .read(ino, at, &mut buf[..n])
            .map_err(|e| format!("{source}: {e}"))?;
        buf[got..n].fill(0);
        t.decrypt(at, &mut buf[..n])
            .map_err(|e| format!("{source}: {e}"))?;
        out.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        at += n as u64;
    }
    out.flush().map_err(|e| format!("{}: {e}", dest.display()))
}
