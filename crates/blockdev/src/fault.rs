//! A fault-injecting device wrapper.

use std::io;
use std::sync::{Arc, RwLock};

use crate::BlockDevice;

/// A device that fails on command: for fault-injection tests. Writes,
/// reads or flushes fail with EIO while armed, optionally only inside a
/// byte range.
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    fail_writes: std::sync::atomic::AtomicBool,
    fail_reads: std::sync::atomic::AtomicBool,
    fail_flush: std::sync::atomic::AtomicBool,
    range: RwLock<(u64, u64)>,
    failures: std::sync::atomic::AtomicU64,
}

impl FaultDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        FaultDevice {
            inner,
            fail_writes: false.into(),
            fail_reads: false.into(),
            fail_flush: false.into(),
            range: RwLock::new((0, u64::MAX)),
            failures: 0.into(),
        }
    }
    /// A device on which every write fails.
    pub fn failing_writes(inner: Arc<dyn BlockDevice>) -> Self {
        let d = Self::new(inner);
        d.set_fail_writes(true);
        d
    }
    pub fn set_fail_writes(&self, on: bool) {
        self.fail_writes
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn set_fail_reads(&self, on: bool) {
        self.fail_reads
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn set_fail_flush(&self, on: bool) {
        self.fail_flush
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
    /// Fail only I/O touching bytes `[start, end)`.
    pub fn set_range(&self, start: u64, end: u64) {
        *self.range.write().unwrap_or_else(|e| e.into_inner()) = (start, end);
    }
    /// How many operations failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn hit(&self, armed: &std::sync::atomic::AtomicBool, offset: u64, len: usize) -> bool {
        if !armed.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let (s, e) = *self.range.read().unwrap_or_else(|e| e.into_inner());
        let hit = offset < e && offset + len as u64 > s;
        if hit {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        hit
    }
}

fn injected() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl BlockDevice for FaultDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.hit(&self.fail_reads, offset, buf.len()) {
            return Err(injected());
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.hit(&self.fail_writes, offset, buf.len()) {
            return Err(injected());
        }
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        if self.hit(&self.fail_flush, 0, 1) {
            return Err(injected());
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        if self.hit(&self.fail_writes, offset, len_bytes as usize) {
            return Err(injected());
        }
        self.inner.discard(offset, len_bytes)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}
