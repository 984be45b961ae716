//! `folio`: make, inspect and modify ext2/3/4 images without mounting them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use folio_ext4::mkfs::{FsType, MkfsOptions};
use folio_ext4::{Filesystem, OpenOptions};

use folio_cli::{copy, show};

#[derive(Parser)]
#[command(
    name = "folio",
    version,
    about = "A userspace ext4 stack: make, inspect and modify ext2/3/4 images"
)]
struct Cli {
    /// Read an image that another folio process (a mount, a write
    /// command) has locked: the data shown may be stale. Read-only
    /// commands only; writers always refuse a locked image.
    #[arg(long, global = true)]
    ignore_lock: bool,
    /// Do not confine the commands that only read an image (info, ls,
    /// stat, cat, check) once it is open; for debugging.
    #[arg(long, global = true)]
    no_confine: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Global `--no-confine`, set once in `main`.
static NO_CONFINE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Open an image for a command that only reads it and prints to stdout,
/// then confine the process as the servers are (docs/semantics.md, "A
/// hostile image"): parsing a crafted image can then reach nothing else.
fn open_confined(image: &Path) -> Result<Filesystem, String> {
    let fs = open(image, true)?;
    if !NO_CONFINE.get().copied().unwrap_or(false) {
        folio_cli::confine::confine(&folio_cli::confine::Policy::default());
    }
    // Debug builds: show the tests what a compromised command could do.
    #[cfg(debug_assertions)]
    if std::env::var_os("FOLIO_DEBUG_ESCAPE").is_some() {
        eprintln!(
            "escape probe: {}",
            String::from_utf8_lossy(&folio_fuse::escape_probe())
        );
    }
    Ok(fs)
}

/// `--ignore-lock`, set once in `main`.
static IGNORE_LOCK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

#[derive(Subcommand)]
// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Make a demo image with a small tree in it and list it.
    Demo {
        /// Where to put the image.
        #[arg(default_value = "folio-demo.img")]
        image: PathBuf,
    },
    /// Make a new filesystem (mke2fs defaults).
    Mkfs {
        image: PathBuf,
        /// Size as mke2fs takes it after the device: a number of KiB (of
        /// blocks with -b), or with a k/m/g/t suffix.
        #[arg(value_name = "FS-SIZE")]
        fs_size: Option<String>,
        /// Size, e.g. 64M, 1G (created or resized if the image is a file).
        #[arg(long, short = 's', conflicts_with = "fs_size")]
        size: Option<String>,
        /// Block size in bytes: 1024, 2048, 4096 ... 65536 (or 1k ... 64k).
        #[arg(long, short = 'b')]
        block_size: Option<String>,
        /// Volume label (at most 16 bytes).
        #[arg(long, short = 'L')]
        label: Option<String>,
        /// ext2, ext3 or ext4.
        #[arg(long, short = 't', default_value = "ext4")]
        r#type: String,
        /// Bytes per inode.
        #[arg(long, short = 'i')]
        inode_ratio: Option<u32>,
        /// Inode size in bytes.
        #[arg(long, short = 'I')]
        inode_size: Option<u16>,
        /// Journal options, as mke2fs: `size=MiB` sets the journal size.
        #[arg(short = 'J', value_name = "size=MiB")]
        journal: Option<String>,
        /// Print nothing but errors.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Overwrite an existing ext2/3/4 filesystem (mkfs refuses
        /// otherwise, as mke2fs asks first).
        #[arg(long, short = 'F')]
        force: bool,
        /// Do not make anything: print what would be made.
        #[arg(short = 'n')]
        dry_run: bool,
        /// Percentage of blocks reserved for root (0 to 50; default 5).
        #[arg(short = 'm', value_name = "PERCENT")]
        reserved_percent: Option<f64>,
        /// Number of inodes (instead of a bytes-per-inode ratio).
        #[arg(short = 'N', value_name = "NUMBER", conflicts_with = "inode_ratio")]
        inodes: Option<u64>,
        /// Usage type from mke2fs.conf's defaults: floppy, small, default,
        /// news, big, huge, largefile, largefile4, hurd.
        #[arg(short = 'T', value_name = "USAGE")]
        usage: Option<String>,
        /// Filesystem UUID: a UUID, `random`, `time` (random here) or
        /// `clear`.
        #[arg(short = 'U', value_name = "UUID")]
        uuid: Option<String>,
        /// Features, comma-separated, as mke2fs: `name` to add one,
        /// `^name` to remove one, `none` to start from nothing (given more
        /// than once, the lists are applied in order).
        #[arg(short = 'O', value_name = "FEATURES")]
        features: Vec<String>,
        /// Extended options, comma-separated: `root_owner[=UID:GID]`
        /// (default: the caller's), and the accepted no-ops
        /// `lazy_itable_init[=N]`, `lazy_journal_init[=N]`, `discard`,
        /// `nodiscard`.
        #[arg(short = 'E', value_name = "OPTIONS")]
        extended: Vec<String>,
    },
    /// Show the superblock summary.
    Info { image: PathBuf },
    /// List a directory.
    Ls {
        image: PathBuf,
        #[arg(default_value = "/")]
        path: String,
        /// Long listing.
        #[arg(short = 'l')]
        long: bool,
        /// Include "." and "..".
        #[arg(short = 'a')]
        all: bool,
    },
    /// Show an inode's attributes.
    Stat { image: PathBuf, path: String },
    /// Print a file's contents.
    Cat { image: PathBuf, path: String },
    /// Copy a host file or tree into the image.
    Put {
        image: PathBuf,
        /// Host file or directory.
        source: PathBuf,
        /// Destination path in the image.
        dest: String,
        /// No progress bar (bars are drawn only on a terminal).
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Copy a file or tree out of the image.
    Get {
        image: PathBuf,
        /// Path in the image.
        source: String,
        /// Host destination.
        dest: PathBuf,
        /// Undo an export's transform (xor:BYTE or
        /// aes-xts-plain64:KEYFILE) while copying one file.
        #[arg(long, value_name = "SPEC")]
        transform: Option<String>,
        /// No progress bar (bars are drawn only on a terminal).
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Remove files (and with -r, directories).
    Rm {
        image: PathBuf,
        #[arg(required = true)]
        paths: Vec<String>,
        #[arg(short = 'r')]
        recursive: bool,
    },
    /// fs-verity, as fsverity-utils: `enable` builds a file's Merkle tree
    /// and makes it read-only and verified (FS_IOC_ENABLE_VERITY);
    /// `measure` prints its digest as `sha256:HEX PATH`
    /// (FS_IOC_MEASURE_VERITY). The image needs the verity feature.
    Verity {
        /// `enable` or `measure`.
        #[arg(value_parser = ["enable", "measure"])]
        action: String,
        image: PathBuf,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Make directories.
    Mkdir {
        image: PathBuf,
        #[arg(required = true)]
        paths: Vec<String>,
        /// Make parents as needed; no error if it exists.
        #[arg(short = 'p')]
        parents: bool,
    },
    /// Mount an image through FUSE (with no arguments: make a demo image
    /// and mount it on ./folio-demo).
    Mount {
        image: Option<PathBuf>,
        mountpoint: Option<PathBuf>,
        /// Mount options (comma-separated, repeatable): ro, rw,
        /// allow_other, allow_root, fsname=, subtype=, auto_unmount,
        /// nodev, nosuid, noexec, noatime, ...
        #[arg(short = 'o', action = clap::ArgAction::Append)]
        options: Vec<String>,
        /// Stay in the foreground.
        #[arg(short = 'f', long)]
        foreground: bool,
        /// Threads serving FUSE requests.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Serve the file PATH inside the image as an NBD export (for
    /// qemu-img, qemu-io, nbdcopy, nbdinfo, fio, nbd-client). Runs until
    /// SIGINT/SIGTERM, then writes everything back and closes the image.
    Export {
        image: PathBuf,
        /// The file to serve (absolute path inside the image).
        path: String,
        /// unix:SOCKET, tcp:HOST:PORT or tcp:PORT (default tcp:127.0.0.1:10809).
        #[arg(long, value_name = "ADDR", default_value = "tcp:127.0.0.1:10809")]
        listen: folio_nbd::Listen,
        /// Export name (default: PATH without its leading '/'); the empty
        /// name finds the export too.
        #[arg(long)]
        name: Option<String>,
        /// Serve read-only (the image is opened read-only).
        #[arg(short = 'r', long)]
        read_only: bool,
        /// Create PATH, sparse, of SIZE bytes if it does not exist.
        #[arg(long, value_name = "SIZE")]
        create: Option<String>,
        /// Create PATH or grow it to SIZE bytes.
        #[arg(long, value_name = "SIZE")]
        size: Option<String>,
        /// Transform the data on its way to the file: xor:BYTE or
        /// aes-xts-plain64:KEYFILE (32- or 64-byte raw key, dm-crypt layout).
        #[arg(long, value_name = "SPEC")]
        transform: Option<String>,
        /// Serve in the background; print the export's URI once listening.
        #[arg(long)]
        fork: bool,
        /// Write the serving process's pid here.
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
        /// Run a shell command with $uri set to the export's URI, then stop
        /// and exit with its status (as nbdkit --run).
        #[arg(long, value_name = "CMD")]
        run: Option<String>,
        /// Most client connections at once.
        #[arg(long, default_value_t = 16)]
        max_connections: usize,
        /// Bounce buffers of 1 MiB reserved at start; requests wait for one.
        #[arg(long, default_value_t = 8)]
        bounce_buffers: usize,
        /// Do not confine the server (no capabilities, no new privileges,
        /// Landlock, seccomp) once it listens; for debugging.
        #[arg(long)]
        no_confine: bool,
    },
    /// Internal: unmounts MOUNTPOINT for a confined mount server when asked.
    #[command(hide = true)]
    UnmountHelper { mountpoint: PathBuf },
    /// Unmount a folio mount and wait for its final sync.
    Umount {
        mountpoint: PathBuf,
        /// Lazy unmount (detach now, clean up when no longer busy).
        #[arg(short = 'l')]
        lazy: bool,
    },
    /// xfs_io-style commands on a file in the image: pwrite [-S byte]
    /// [-b size], pread [-v], truncate, falloc [-k], fpunch, fzero [-k],
    /// fcollapse, finsert, fiemap [-v], seek -d|-h, fsync, fdatasync, stat.
    Io {
        image: PathBuf,
        path: String,
        /// A command; repeat for several (run in order).
        #[arg(short = 'c', required = true, action = clap::ArgAction::Append)]
        commands: Vec<String>,
        /// Create the file if it does not exist.
        #[arg(short = 'f')]
        create: bool,
    },
    /// Replay the journal if it needs recovery, process orphans, and exit
    /// (like `e2fsck -E journal_only`).
    Recover {
        image: PathBuf,
        /// No progress bar (bars are drawn only on a terminal).
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Write-heavy workload for crash tests: creates and rewrites files
    /// with deterministic contents, fsyncs, and prints `synced NAME LEN
    /// SEED` for each file once durable. Runs until killed or --ops.
    #[command(hide = true)]
    Torture {
        image: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = u64::MAX)]
        ops: u64,
    },
    /// Verify the image's allocation counters against its bitmaps. Exit
    /// status as e2fsck's: 0 clean, 4 problems left uncorrected, 8 the
    /// image could not be checked.
    Check {
        image: PathBuf,
        /// Open read-only and answer no (what folio always does).
        #[arg(short = 'n')]
        no: bool,
        /// Repair (e2fsck -y): not implemented; problems are reported
        /// with exit status 4.
        #[arg(short = 'y', conflicts_with = "no")]
        yes: bool,
        /// Preen (e2fsck -p): as -y.
        #[arg(short = 'p', conflicts_with_all = ["no", "yes"])]
        preen: bool,
        /// Check even if the image seems clean (folio always does).
        #[arg(short = 'f')]
        force: bool,
        /// No progress bar (bars are drawn only on a terminal).
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Benchmark the library data path against the kernel's ext4 (loop
    /// mount of an identical image; needs root for the kernel column).
    Bench {
        /// File size in MiB.
        #[arg(long, default_value_t = 256)]
        size: u64,
        /// Directory for the scratch images.
        #[arg(long, default_value = "/tmp")]
        dir: PathBuf,
        /// Instead: random 4 KiB writes into fresh sparse files of each
        /// size in `--sizes`, then overwrites, with extent counts.
        #[arg(long)]
        scaling: bool,
        /// File sizes for `--scaling`, in MiB.
        #[arg(long, value_delimiter = ',', default_values_t = [32u64, 256, 1024, 4096])]
        sizes: Vec<u64>,
        /// Seconds per workload for `--scaling` and `--threads`.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Instead: the library from N threads (parallel random writers,
        /// parallel metadata, latency during a big fsync) against the
        /// kernel; `--size` is each writer's file size.
        #[arg(long, value_name = "N", conflicts_with = "scaling")]
        threads: Option<u32>,
    },
}

type CliResult = Result<(), String>;

/// Open an image for a command. Every open locks the image (exclusive to
/// write, shared to read); a locked image is refused, naming the holder,
/// except that a read-only command with `--ignore-lock` reads it anyway
/// and warns that what it shows may be stale.
fn open(image: &Path, read_only: bool) -> Result<Filesystem, String> {
    open_with(
        image,
        OpenOptions {
            read_only,
            ..Default::default()
        },
    )
}

/// [`open`] with options of the caller's.
fn open_with(image: &Path, opts: OpenOptions) -> Result<Filesystem, String> {
    let read_only = opts.read_only;
    match folio_cli::image::open(image, opts.clone()) {
        Err(folio_ext4::Error::Locked(holder))
            if read_only && IGNORE_LOCK.get().copied().unwrap_or(false) =>
        {
            eprintln!(
                "folio: warning: {} is in use by {holder}; reading it anyway, what follows may be stale",
                image.display()
            );
            folio_cli::image::open(
                image,
                OpenOptions {
                    lock: false,
                    ..opts
                },
            )
            .map_err(|e| format!("{}: {e}", image.display()))
        }
        Err(folio_ext4::Error::Locked(holder)) => Err(format!(
            "{}: the image is in use by {holder}{}",
            image.display(),
            if read_only {
                " (--ignore-lock reads it anyway, possibly stale)"
            } else {
                ""
            }
        )),
        r => r.map_err(|e| format!("{}: {e}", image.display())),
    }
}

fn ctx<T>(r: folio_ext4::Result<T>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Make the filesystem; what was made.
fn mkfs(
    image: &Path,
    size: Option<&str>,
    opts: MkfsOptions,
) -> Result<folio_ext4::mkfs::Report, String> {
    let size = match size {
        Some(s) => Some(folio_cli::parse_size(s)?),
        None => None,
    };
    let report = match folio_cli::image::connect(image, false)
        .map_err(|e| format!("{}: {e}", image.display()))?
    {
        Some(dev) => {
            // An export has its size: -s may only use less of it.
            let have = folio_blockdev::BlockDevice::size_bytes(&dev);
            let size = match size {
                Some(s) if s > have => {
                    return Err(format!(
                        "{}: the export is {have} bytes, smaller than {s}",
                        image.display()
                    ))
                }
                Some(s) => s,
                None => have,
            };
            folio_ext4::mkfs::mkfs(std::sync::Arc::new(dev), size, &opts)
        }
        None => folio_ext4::mkfs::mkfs_path(image, size, &opts),
    }
    .map_err(|e| format!("{}: {e}", image.display()))?;
    Ok(report)
}

/// `-N` asked for more inodes than fit (one inode bitmap block per group:
/// mke2fs would shrink the groups instead, which folio does not).
fn warn_inodes(asked: Option<u64>, made: u32) {
    if let Some(n) = asked.filter(|&n| n > u64::from(made)) {
        eprintln!(
            "folio: -N {n}: only {made} inodes fit at this block size (mke2fs would make \
             smaller groups; folio does not yet)"
        );
    }
}

/// Apply `f` to every path, reporting each failure like rm(1) and mkdir(1)
/// do, then sync; fails if any path failed.
fn each_path(
    image: &Path,
    paths: &[String],
    f: impl Fn(&mut Filesystem, &str) -> CliResult,
) -> CliResult {
    let mut fs = open(image, false)?;
    let mut result = Ok(());
    for p in paths {
        if let Err(e) = f(&mut fs, p) {
            eprintln!("folio: {e}");
            result = Err(String::new());
        }
    }
    ctx(fs.close(), "sync")?;
    result
}

fn run(cli: Cli) -> CliResult {
    match cli.cmd {
        Cmd::Demo { image } => copy::demo(&image),
        Cmd::Mkfs {
            image,
            fs_size,
            size,
            block_size,
            label,
            r#type,
            inode_ratio,
            inode_size,
            journal,
            quiet,
            force,
            dry_run,
            reserved_percent,
            inodes,
            usage,
            uuid,
            features,
            extended,
        } => {
            if !force && !dry_run {
                refuse_existing_fs(&image)?;
            }
            let fs_type = match r#type.as_str() {
                "ext2" => FsType::Ext2,
                "ext3" => FsType::Ext3,
                "ext4" => FsType::Ext4,
                t => {
                    return Err(format!(
                        "unknown filesystem type {t:?} (ext2, ext3 or ext4)"
                    ))
                }
            };
            let block_size = block_size
                .map(|b| {
                    folio_cli::parse_size(&b)
                        .ok()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| format!("invalid block size {b:?}"))
                })
                .transpose()?;
            if let Some(r) = inode_ratio {
                if !(1024..=65536 * 1024).contains(&r) {
                    return Err(format!(
                        "invalid inode ratio {r} (min 1024/max {})",
                        65536 * 1024
                    ));
                }
            }
            // mke2fs's positional size: KiB without a suffix (blocks with
            // -b), else the suffix's unit.
            let size = match (size, fs_size) {
                (Some(s), _) => Some(s),
                (None, Some(p)) if p.chars().all(|c| c.is_ascii_digit()) => {
                    let unit = u64::from(block_size.unwrap_or(1024));
                    let n: u64 = p.parse().map_err(|_| format!("invalid size {p:?}"))?;
                    Some(
                        n.checked_mul(unit)
                            .ok_or_else(|| format!("size {p:?} is too large"))?
                            .to_string(),
                    )
                }
                (None, p) => p,
            };
            // -T: mke2fs.conf's usage types (this machine's defaults
            // section: 4 KiB blocks, 256-byte inodes, 16 KiB per inode).
            let (mut block_size, mut inode_ratio, mut inode_size) =
                (block_size, inode_ratio, inode_size);
            if let Some(t) = usage.as_deref() {
                let (bs, ratio, isize) = match t {
                    "floppy" => (1024, 8192, None),
                    "small" => (1024, 4096, None),
                    "default" => (4096, 16384, None),
                    "news" => (4096, 4096, None),
                    "big" => (4096, 32768, None),
                    "huge" => (4096, 65536, None),
                    "largefile" => (4096, 1 << 20, None),
                    "largefile4" => (4096, 4 << 20, None),
                    "hurd" => (4096, 16384, Some(128)),
                    t => return Err(format!("unknown usage type {t:?} for -T")),
                };
                block_size = block_size.or(Some(bs));
                inode_ratio = inode_ratio.or(Some(ratio));
                inode_size = inode_size.or(isize);
            }
            let size_bytes = match &size {
                Some(s) => Some(folio_cli::parse_size(s)?),
                None => None,
            };
            if let Some(n) = inodes {
                // -N: the ratio that gives (about) that many inodes.
                let bytes = size_bytes
                    .or_else(|| std::fs::metadata(&image).ok().map(|m| m.len()))
                    .ok_or("-N needs the size (the image does not exist)")?;
                if n == 0 {
                    return Err("-N 0: a filesystem needs inodes".into());
                }
                inode_ratio = Some(u32::try_from((bytes / n).max(1024)).unwrap_or(u32::MAX));
            }
            let reserved_percent = match reserved_percent {
                None => 5.0,
                Some(p) if (0.0..=50.0).contains(&p) => p,
                Some(p) => return Err(format!("invalid reserved blocks percent {p} (0 to 50)")),
            };
            let mut root_owner = folio_ext4::Owner::default();
            for opt in extended
                .iter()
                .flat_map(|e| e.split(','))
                .filter(|o| !o.is_empty())
            {
                match opt.split_once('=') {
                    None if opt == "root_owner" => root_owner = caller_owner(),
                    Some(("root_owner", v)) => {
                        root_owner = v
                            .split_once(':')
                            .and_then(|(u, g)| {
                                Some(folio_ext4::Owner {
                                    uid: u.parse().ok()?,
                                    gid: g.parse().ok()?,
                                })
                            })
                            .ok_or_else(|| format!("-E root_owner={v}: give UID:GID"))?;
                    }
                    _ if [
                        "lazy_itable_init",
                        "lazy_journal_init",
                        "discard",
                        "nodiscard",
                    ]
                    .contains(&opt.split('=').next().unwrap_or("")) => {}
                    _ => return Err(format!("-E {opt}: not supported")),
                }
            }
            let uuid = match uuid.as_deref() {
                None | Some("random" | "time") => None,
                Some("clear") => Some([0u8; 16]),
                Some(u) => Some(parse_uuid(u).ok_or_else(|| format!("invalid UUID {u:?}"))?),
            };
            let features = {
                let mut f = folio_ext4::mkfs::Features::defaults(fs_type);
                for list in &features {
                    f.edit(list).map_err(|e| e.to_string())?;
                }
                f
            };
            let opts = MkfsOptions {
                features: Some(features),
                fs_type,
                block_size,
                label: label.unwrap_or_default(),
                inode_ratio,
                inode_size,
                journal_bytes: journal.map(|j| journal_size_bytes(&j)).transpose()?,
                reserved_percent,
                uuid,
                root_owner,
                ..Default::default()
            };
            if dry_run {
                let bytes = size_bytes
                    .or_else(|| std::fs::metadata(&image).ok().map(|m| m.len()))
                    .ok_or("-n needs the size (the image does not exist)")?;
                let report =
                    folio_ext4::mkfs::mkfs_plan(bytes, &opts).map_err(|e| e.to_string())?;
                if !quiet {
                    println!("{report}");
                }
                warn_inodes(inodes, report.inodes);
                return Ok(());
            }
            let bar = folio_cli::progress::bar("mkfs", "groups", 0, quiet);
            let opts = MkfsOptions {
                progress: bar.as_ref().map(folio_cli::progress::ext4),
                ..opts
            };
            let made = mkfs(&image, size.as_deref(), opts);
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let report = made?;
            if !quiet {
                println!("{report}");
            }
            warn_inodes(inodes, report.inodes);
            Ok(())
        }
        Cmd::Info { image } => {
            let fs = open_confined(&image)?;
            show::info(&fs);
            Ok(())
        }
        Cmd::Ls {
            image,
            path,
            long,
            all,
        } => {
            let mut fs = open_confined(&image)?;
            show::ls(&mut fs, &path, long, all)
        }
        Cmd::Stat { image, path } => {
            let mut fs = open_confined(&image)?;
            let ino = ctx(fs.resolve(&path), &path)?;
            show::stat(&mut fs, &path, ino)
        }
        Cmd::Cat { image, path } => {
            let mut fs = open_confined(&image)?;
            show::cat(&mut fs, &path)
        }
        Cmd::Put {
            image,
            source,
            dest,
            quiet,
        } => {
            let mut fs = open(&image, false)?;
            // Committed either way: a failed copy has removed what it made.
            folio_cli::progress::copy_start("put", quiet);
            let r = copy::put(&mut fs, &source, &dest);
            folio_cli::progress::copy_done();
            let closed = ctx(fs.close(), "sync");
            r.and(closed)
        }
        Cmd::Get {
            image,
            source,
            dest,
            transform: Some(t),
            quiet: _,
        } => {
            let t = folio_nbd::Transform::parse(&t).map_err(|e| e.to_string())?;
            let fs = open(&image, true)?;
            folio_cli::export::get_transformed(&fs, &source, &dest, &t)
        }
        Cmd::Get {
            image,
            source,
            dest,
            transform: None,
            quiet,
        } => {
            let mut fs = open(&image, true)?;
            if !NO_CONFINE.get().copied().unwrap_or(false) {
                // Confined too, but for making the tree where it goes:
                // inside DEST if it is a directory, else beside it.
                let beneath = if dest.is_dir() {
                    dest.clone()
                } else {
                    match dest.parent() {
                        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                        _ => PathBuf::from("."),
                    }
                };
                folio_cli::confine::confine(&folio_cli::confine::Policy {
                    write_beneath: Some(beneath),
                    ..Default::default()
                });
                #[cfg(debug_assertions)]
                if std::env::var_os("FOLIO_DEBUG_ESCAPE").is_some() {
                    eprintln!(
                        "escape probe: {}",
                        String::from_utf8_lossy(&folio_fuse::escape_probe())
                    );
                }
            }
            folio_cli::progress::copy_start("get", quiet);
            let r = copy::get(&mut fs, &source, &dest);
            folio_cli::progress::copy_done();
            r
        }
        Cmd::Rm {
            image,
            paths,
            recursive,
        } => each_path(&image, &paths, |fs, p| copy::rm(fs, p, recursive)),
        Cmd::Verity {
            action,
            image,
            paths,
        } => each_path(&image, &paths, |fs, p| {
            let ino = ctx(fs.resolve_follow(p), p)?;
            let digest = if action == "enable" {
                ctx(fs.enable_verity(ino), p)?;
                return Ok(());
            } else {
                ctx(fs.verity_digest(ino), p)?
            };
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            println!("sha256:{hex} {p}");
            Ok(())
        }),
        Cmd::Mkdir {
            image,
            paths,
            parents,
        } => each_path(&image, &paths, |fs, p| copy::mkdir(fs, p, parents)),
        Cmd::Mount {
            image,
            mountpoint,
            options,
            foreground,
            threads,
        } => {
            let (image, mountpoint) = match (image, mountpoint) {
                (Some(i), Some(m)) => (i, m),
                (None, None) => {
                    let img = PathBuf::from("folio-demo.img");
                    if !img.exists() {
                        copy::demo(&img)?;
                    }
                    let mnt = PathBuf::from("folio-demo");
                    std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
                    (img, mnt)
                }
                _ => return Err("give both IMAGE and MOUNTPOINT, or neither for the demo".into()),
            };
            let remounting = options
                .iter()
                .flat_map(|o| o.split(','))
                .any(|o| o == "remount");
            if remounting {
                folio_cli::mount::remount(&image, &mountpoint, &options)
            } else if foreground {
                folio_cli::mount::mount_foreground(&image, &mountpoint, &options, threads)
            } else {
                folio_cli::mount::mount_background(&image, &mountpoint, &options, threads)?;
                if QUIET_MOUNT.get().copied().unwrap_or(false) {
                    // As mount(8)'s helper: silent on success, like mount.
                    return Ok(());
                }
                println!(
                    "Mounted {} on {} (fuse.folio). Unmount with: folio umount {}",
                    image.display(),
                    mountpoint.display(),
                    mountpoint.display()
                );
                Ok(())
            }
        }
        Cmd::Umount { mountpoint, lazy } => folio_cli::mount::umount(&mountpoint, lazy),
        Cmd::UnmountHelper { mountpoint } => folio_cli::mount::unmount_helper(&mountpoint),
        Cmd::Export {
            image,
            path,
            listen,
            name,
            read_only,
            create,
            size,
            transform,
            fork,
            pid_file,
            run,
            max_connections,
            bounce_buffers,
            no_confine,
        } => {
            let parse = |s: Option<String>| s.map(|s| folio_cli::parse_size(&s)).transpose();
            let args = folio_cli::export::ExportArgs {
                image: image.display().to_string(),
                path,
                listen,
                name,
                read_only,
                create: parse(create)?,
                size: parse(size)?,
                transform,
                pid_file,
                run,
                max_connections: max_connections.max(1),
                bounce_buffers: bounce_buffers.max(1),
                confine: !no_confine,
            };
            if fork {
                if args.run.is_some() {
                    return Err("--fork and --run do not go together".into());
                }
                // Refuse a busy image here, where the error can be seen.
                drop(open(&image, read_only)?);
                return folio_cli::export::serve_background();
            }
            // A long-running server: the mount's page cache size.
            let mut opts = OpenOptions {
                read_only,
                ..Default::default()
            };
            opts.page_cache.budget_bytes = folio_cli::mount::default_cache_bytes();
            let fs = open_with(&image, opts)?;
            match folio_cli::export::serve(fs, &args)? {
                0 => Ok(()),
                code => std::process::exit(code),
            }
        }
        Cmd::Io {
            image,
            path,
            commands,
            create,
        } => {
            let mut fs = open(&image, false)?;
            let r = folio_cli::io::run(&mut fs, &path, create, &commands);
            ctx(fs.close(), "sync")?;
            r
        }
        Cmd::Recover { image, quiet } => {
            let spin = folio_cli::progress::spinner("recovering the journal", quiet);
            let fs = open(&image, false);
            if let Some(s) = spin {
                s.finish_and_clear();
            }
            let fs = fs?;
            match fs.recovery_report() {
                Some(r) => println!(
                    "{}: replayed {} transaction(s), {} block(s) written, {} revoked ({})",
                    image.display(),
                    r.transactions,
                    r.blocks_replayed,
                    r.blocks_revoked,
                    r.stopped_because
                ),
                None => println!("{}: journal is clean, nothing to recover", image.display()),
            }
            if let Some(why) = fs.read_only_reason() {
                return Err(format!("{}: {why}", image.display()));
            }
            ctx(fs.close(), "sync")
        }
        Cmd::Torture { image, seed, ops } => {
            let mut fs = open(&image, false)?;
            folio_cli::torture::run(&mut fs, seed, ops)?;
            ctx(fs.close(), "sync")
        }
        Cmd::Bench {
            size,
            dir,
            scaling,
            sizes,
            seconds,
            threads,
        } => {
            if let Some(n) = threads {
                folio_cli::bench_threads::run(&dir, n, size, seconds)
            } else if scaling {
                folio_cli::bench::run_scaling(&dir, &sizes, seconds)
            } else {
                folio_cli::bench::run(&dir, size)
            }
        }
        Cmd::Check {
            image,
            no: _,
            yes,
            preen,
            force: _,
            quiet,
        } => {
            // e2fsck's exit codes: 8 for an operational error. The bar is
            // made before the open confines the process.
            let bar = folio_cli::progress::bar("check", "groups", 0, quiet);
            let progress = bar.as_ref().map(folio_cli::progress::ext4);
            let checked = open_confined(&image)
                .and_then(|fs| ctx(fs.check_counts(progress.as_ref()), "check"));
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let problems = match checked {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("folio: {e}");
                    std::process::exit(8);
                }
            };
            if problems.is_empty() {
                println!("{}: counters match the bitmaps", image.display());
                return Ok(());
            }
            for p in &problems {
                println!("{p}");
            }
            eprintln!(
                "folio: {}: {} problem(s) found{}",
                image.display(),
                problems.len(),
                if yes || preen {
                    "; folio cannot repair them yet (run e2fsck -fy)"
                } else {
                    ""
                }
            );
            std::process::exit(4);
        }
    }
}

/// `mount -t fuse.folio SOURCE DIR -o OPTS` runs `mount.fuse.folio SOURCE
/// DIR -o OPTS`: when called by that name (a symlink to this binary), act
/// as `folio mount`, silently unless mount(8) passes `-v`; its other
/// flags (-n, -s) are ignored.
fn mount_helper_args() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.first()?.rsplit('/').next()?.to_string();
    if name != "mount.fuse.folio" && name != "mount.folio" {
        return None;
    }
    let mut out = vec!["folio".to_string(), "mount".to_string()];
    let mut it = args.into_iter().skip(1);
    let mut verbose = false;
    while let Some(a) = it.next() {
        match a.as_str() {
            "-v" => verbose = true,
            "-n" | "-s" => {}
            "-o" => {
                out.push("-o".into());
                out.push(it.next().unwrap_or_default());
            }
            _ => out.push(a),
        }
    }
    let _ = QUIET_MOUNT.set(!verbose);
    // mount(8) leaves `dev` and `suid` out of the options it hands a
    // helper (they are mount(2)'s defaults) and passes `nodev`/`nosuid`
    // when asked for them. A FUSE mount defaults to nodev,nosuid, so as
    // root (who may have them, as with mount.fuse3) say them explicitly
    // unless told otherwise.
    let words: Vec<&str> = out
        .windows(2)
        .filter(|w| w[0] == "-o")
        .flat_map(|w| w[1].split(','))
        .collect();
    let mut implied = Vec::new();
    if !words.contains(&"nodev") && !words.contains(&"dev") {
        implied.push("dev");
    }
    if !words.contains(&"nosuid") && !words.contains(&"suid") {
        implied.push("suid");
    }
    if is_root() && !implied.is_empty() && !words.contains(&"remount") {
        out.push("-o".into());
        out.push(implied.join(","));
    }
    Some(out)
}

/// The caller's uid and gid (mke2fs's `-E root_owner` without a value).
fn caller_owner() -> folio_ext4::Owner {
    // SAFETY: geteuid and getegid have no preconditions and touch no memory.
    #[allow(unsafe_code)]
    unsafe {
        folio_ext4::Owner {
            uid: libc::geteuid(),
            gid: libc::getegid(),
        }
    }
}

/// A UUID in its usual text form (hyphens optional).
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || s.len() != 36 && s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

/// Set when running as mount(8)'s helper without `-v`: print nothing on
/// success (mount(8) itself prints nothing; scripts read its output).
static QUIET_MOUNT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    // A closed pipe ends the process quietly, as for any Unix filter
    // (`folio cat IMG F | head`), instead of a panic in println!.
    // SAFETY: restoring a signal's default disposition before any thread
    // exists touches no memory of ours.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match mount_helper_args() {
        Some(args) => Cli::parse_from(args),
        None => Cli::parse(),
    };
    let _ = IGNORE_LOCK.set(cli.ignore_lock);
    let _ = NO_CONFINE.set(cli.no_confine);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("folio: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// mkfs over an existing ext2/3/4 filesystem needs `-F`, as mke2fs asks
/// before it overwrites one.
fn refuse_existing_fs(image: &Path) -> CliResult {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    let read = match folio_cli::image::connect(image, true) {
        Ok(Some(dev)) => {
            folio_blockdev::BlockDevice::read_at(&dev, 1024 + 0x38, &mut magic).is_ok()
        }
        Err(e) => return Err(format!("{}: {e}", image.display())),
        Ok(None) => match std::fs::File::open(image) {
            Ok(f) => f.read_exact_at(&mut magic, 1024 + 0x38).is_ok(),
            Err(_) => return Ok(()),
        },
    };
    if read && u16::from_le_bytes(magic) == 0xEF53 {
        return Err(format!(
            "{} contains an ext2/3/4 filesystem; use -F to overwrite it",
            image.display()
        ));
    }
    Ok(())
}

/// `-J size=MiB` as mke2fs takes it.
fn journal_size_bytes(opt: &str) -> Result<u64, String> {
    opt.strip_prefix("size=")
        .and_then(|v| v.parse::<u64>().ok())
        .and_then(|mib| mib.checked_mul(1 << 20))
        .ok_or_else(|| format!("bad journal option {opt:?} (folio takes -J size=MiB)"))
}

#[cfg(test)]
mod tests {
    use folio_cli::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2KiB").unwrap(), 2048);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        // numfmt --from=iec's forms: fractions (rounded up), P and E.
        assert_eq!(parse_size("1.5G").unwrap(), 1_610_612_736);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("0.3K").unwrap(), 308);
        assert_eq!(parse_size(".5M").unwrap(), 512 << 10);
        assert_eq!(parse_size("2P").unwrap(), 2 << 50);
        assert_eq!(parse_size("15E").unwrap(), 15 << 60);
        assert!(parse_size("16E").is_err(), "past u64");
        assert!(parse_size("1.2.3G").is_err());
        assert!(parse_size(".").is_err());
        assert!(parse_size("1.xG").is_err());
    }
}
