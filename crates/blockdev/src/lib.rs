//! The bottom layer of folio: byte-addressed block devices and a small
//! write-back buffer cache for metadata blocks.
//!
//! A [`BlockDevice`] is anything that can read, write, flush and discard
//! byte ranges: an image file ([`FileDevice`]), memory ([`MemDevice`]),
//! and later crash-recording and fault-injecting wrappers. Every method takes
//! `&self` so a device can be shared between threads behind an `Arc`.
//!
//! Durability contract: a write is durable only after a later `flush()`
//! returns `Ok`. Until then the device may lose or reorder it. Layers above
//! must issue flushes where durability needs them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

mod cache;
mod cow;
pub mod crash;
mod fault;
pub use cache::{BufferCache, CheckpointSource};
pub use cow::CowDevice;
pub use crash::CrashDevice;
pub use fault::FaultDevice;

/// A byte-addressed device. Offsets and lengths are in bytes.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;
    /// Fill `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `buf` at `offset`; writing past the end is an error.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Tell the device a range no longer holds data. Afterwards the range
    /// reads as zeros on the backends here; callers must not rely on it.
    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()>;
    /// True if writes are refused.
    fn is_read_only(&self) -> bool;
}

fn out_of_range(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("I/O at byte {offset} (+{len}) is beyond the end of the device ({size} bytes)"),
    )
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out_of_range(offset, len, size)),
    }
}

/// An image file (or a real block device node) used as a device.
pub struct FileDevice {
    file: File,
    size_bytes: u64,
    read_only: bool,
}

impl FileDevice {
    /// Open `path` for reading and, unless `read_only`, writing.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let size_bytes = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block device nodes report 0 from metadata; seek to learn the size.
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        };
        Ok(FileDevice {
            file,
            size_bytes,
            read_only,
        })
    }

    /// Create (or truncate) an image file of `size_bytes`, sparse.
    pub fn create(path: &Path, size_bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size_bytes)?;
        Ok(FileDevice {
            file,
            size_bytes,
            read_only: false,
        })
    }
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size_bytes)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device is open read-only",
            ));
        }
        check_range(offset, buf.len(), self.size_bytes)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device is open read-only",
            ));
        }
        check_range(offset, len_bytes as usize, self.size_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        // Punching a hole keeps the file size and frees host space; on a
        // host filesystem without hole punching we write zeros instead so
        // that the documented "reads as zeros" holds on every host.
        if punch_hole(&self.file, offset, len_bytes).is_err() {
            let zeros = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len_bytes {
                let n = (len_bytes - done).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
        }
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[allow(unsafe_code)]
fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len_bytes)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate(2) only reads its integer arguments; the descriptor
    // is owned by `file`, which outlives the call.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A device held in memory; cloning shares the same bytes.
#[derive(Clone)]
pub struct MemDevice {
    bytes: Arc<RwLock<Vec<u8>>>,
}

impl MemDevice {
    /// A zero-filled device of `size_bytes`.
    pub fn new(size_bytes: usize) -> Self {
        MemDevice {
            bytes: Arc::new(RwLock::new(vec![0; size_bytes])),
        }
    }

    /// A device holding a copy of `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemDevice {
            bytes: Arc::new(RwLock::new(bytes)),
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len(), bytes.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, buf.len(), bytes.len() as u64)?;
        let start = offset as usize;
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, len_bytes as usize, bytes.len() as u64)?;
        let start = offset as usize;
        bytes[start..start + len_bytes as usize].fill(0);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        false
    }
}

/// A device wrapper that knows whether anything was written since the last
/// completed flush, so that callers can skip flushes nothing needs.
///
/// Writes are counted when they complete, and a flush covers the writes
/// that had completed when it started: a write still running while
/// another thread flushes stays unflushed (a flag cleared at the flush's
/// start would call it flushed, and an fsync that checked afterwards would
/// skip the flush its data needs).
pub struct FlushTracker {
    inner: Arc<dyn BlockDevice>,
    /// Writes and discards completed (or failed) so far.
    done: AtomicU64,
    /// `done` as it was when the latest successful flush started.
    flushed: AtomicU64,
}

impl FlushTracker {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        FlushTracker {
            inner,
            done: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    /// Were writes (or discards) completed since the start of the last
    /// successful flush?
    pub fn unflushed(&self) -> bool {
        self.done.load(Ordering::Acquire) > self.flushed.load(Ordering::Acquire)
    }
}

impl BlockDevice for FlushTracker {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        // Counted even if it fails: part of it may have reached the device.
        let r = self.inner.write_at(offset, buf);
        self.done.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn flush(&self) -> io::Result<()> {
        let covers = self.done.load(Ordering::Acquire);
        self.inner.flush()?;
        self.flushed.fetch_max(covers, Ordering::AcqRel);
        Ok(())
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let r = self.inner.discard(offset, len_bytes);
        self.done.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_device_round_trip_and_bounds() {
        let d = MemDevice::new(4096);
        d.write_at(100, b"hello").unwrap();
        let mut b = [0u8; 5];
        d.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(d.read_at(4094, &mut b).is_err());
        assert!(d.write_at(u64::MAX - 1, &b).is_err());
        d.discard(100, 5).unwrap();
        d.read_at(100, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
    }

    #[test]
    fn file_device_round_trip_and_discard() {
        let dir = std::env::temp_dir().join(format!("folio-bd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let d = FileDevice::create(&path, 1 << 20).unwrap();
        d.write_at(8192, &[0xab; 8192]).unwrap();
        d.discard(8192, 4096).unwrap();
        let mut b = vec![0u8; 8192];
        d.read_at(8192, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 0xab));
        assert!(d.read_at((1 << 20) - 1, &mut b).is_err());
        drop(d);
        let ro = FileDevice::open(&path, true).unwrap();
        assert!(ro.write_at(0, b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A device where a write of `b"late"` starts before a flush and
    /// completes only once that flush has started.
    struct WriteAcrossFlush {
        inner: MemDevice,
        started: std::sync::mpsc::SyncSender<()>,
        flushing: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        flush_tx: std::sync::mpsc::SyncSender<()>,
        armed: std::sync::atomic::AtomicBool,
    }

    impl BlockDevice for WriteAcrossFlush {
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            if buf == b"late" {
                self.armed.store(true, Ordering::SeqCst);
                self.started.send(()).unwrap();
                self.flushing.lock().unwrap().recv().unwrap();
            }
            self.inner.write_at(offset, buf)
        }
        fn flush(&self) -> io::Result<()> {
            if self.armed.swap(false, Ordering::SeqCst) {
                self.flush_tx.send(()).unwrap();
            }
            Ok(())
        }
        fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
            self.inner.discard(offset, len_bytes)
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_write_running_across_a_flush_stays_unflushed() {
        let (started, started_rx) = std::sync::mpsc::sync_channel(1);
        let (flush_tx, flushing) = std::sync::mpsc::sync_channel(1);
        let dev = Arc::new(WriteAcrossFlush {
            inner: MemDevice::new(4096),
            started,
            flushing: std::sync::Mutex::new(flushing),
            flush_tx,
            armed: std::sync::atomic::AtomicBool::new(false),
        });
        let t = Arc::new(FlushTracker::new(dev));
        assert!(!t.unflushed());
        t.write_at(0, b"x").unwrap();
        assert!(t.unflushed());
        t.flush().unwrap();
        assert!(!t.unflushed());
        let t2 = Arc::clone(&t);
        let w = std::thread::spawn(move || t2.write_at(0, b"late").unwrap());
        started_rx.recv().unwrap();
        t.flush().unwrap();
        w.join().unwrap();
        assert!(
            t.unflushed(),
            "a write that completed after the flush began"
        );
        t.flush().unwrap();
        assert!(!t.unflushed());
    }
}
