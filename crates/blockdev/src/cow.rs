//! A copy-on-write view of a device: reads fall through to the base
//! device, writes land in private in-memory chunks and never reach it.
//! A read-only open of an image whose journal needs recovery replays the
//! journal onto one of these, so that it shows the recovered state (as
//! the kernel's read-only mount does) without writing a byte of the image.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use crate::{check_range, BlockDevice};

const CHUNK: u64 = 4096;

pub struct CowDevice {
    base: Arc<dyn BlockDevice>,
    /// Chunk index → contents (whole chunks, the last one possibly short).
    chunks: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

impl CowDevice {
    pub fn new(base: Arc<dyn BlockDevice>) -> Self {
        CowDevice {
            base,
            chunks: Mutex::new(BTreeMap::new()),
        }
    }

    /// Bytes held in memory.
    pub fn private_bytes(&self) -> u64 {
        self.lock().values().map(|c| c.len() as u64).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chunk_len(&self, idx: u64) -> usize {
        (self.base.size_bytes() - idx * CHUNK).min(CHUNK) as usize
    }
}

impl BlockDevice for CowDevice {
    fn size_bytes(&self) -> u64 {
        self.base.size_bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size_bytes())?;
        let chunks = self.lock();
        let mut at = offset;
        let mut out = &mut buf[..];
        while !out.is_empty() {
            let idx = at / CHUNK;
            let inner = (at - idx * CHUNK) as usize;
            let n = out.len().min(CHUNK as usize - inner);
            match chunks.get(&idx) {
                Some(c) => out[..n].copy_from_slice(&c[inner..inner + n]),
                None => self.base.read_at(at, &mut out[..n])?,
            }
            out = &mut out[n..];
            at += n as u64;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size_bytes())?;
        let mut chunks = self.lock();
        let mut at = offset;
        let mut src = buf;
        while !src.is_empty() {
            let idx = at / CHUNK;
            let inner = (at - idx * CHUNK) as usize;
            let n = src.len().min(CHUNK as usize - inner);
            let c = match chunks.entry(idx) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let mut c = vec![0u8; self.chunk_len(idx)].into_boxed_slice();
                    self.base.read_at(idx * CHUNK, &mut c)?;
                    e.insert(c)
                }
            };
            c[inner..inner + n].copy_from_slice(&src[..n]);
            src = &src[n..];
            at += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let len = usize::try_from(len_bytes).map_err(io::Error::other)?;
        self.write_at(offset, &vec![0u8; len])
    }

    fn is_read_only(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[test]
    fn writes_stay_private_and_read_back() {
        let base = MemDevice::from_bytes((0..20_000u32).map(|i| i as u8).collect());
        let base: Arc<dyn BlockDevice> = Arc::new(base);
        let cow = CowDevice::new(base.clone());
        cow.write_at(4090, &[0xAA; 12]).unwrap();
        cow.write_at(19_990, &[0xBB; 10]).unwrap();
        let mut got = vec![0u8; 20_000];
        cow.read_at(0, &mut got).unwrap();
        let mut want: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        want[4090..4102].fill(0xAA);
        want[19_990..20_000].fill(0xBB);
        assert_eq!(got, want);
        let mut orig = vec![0u8; 20_000];
        base.read_at(0, &mut orig).unwrap();
        assert_eq!(orig, (0..20_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        assert!(cow.write_at(19_995, &[0; 10]).is_err());
        assert_eq!(cow.private_bytes(), 4096 * 2 + (20_000 - 4 * 4096));
    }
}
