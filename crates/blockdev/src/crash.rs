//! A device that records every write and flush so that tests can produce
//! any state a power cut could leave behind.
//!
//! Model: a write is durable once a later flush has completed. A crash
//! keeps everything before the last completed flush, plus any subset of
//! the writes issued after it, torn into `piece`-byte units (sectors) that
//! land or not independently. Kept pieces are applied in issue order, as a
//! drive that completes writes to the same sector in order would.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use crate::BlockDevice;

/// One recorded device operation.
#[derive(Clone, Debug)]
pub enum Event {
    Write { offset: u64, data: Arc<[u8]> },
    Flush,
}

struct State {
    live: Vec<u8>,
    log: Vec<Event>,
}

/// An in-memory device recording its history. Cloning shares it.
#[derive(Clone)]
pub struct CrashDevice {
    state: Arc<Mutex<State>>,
}

impl CrashDevice {
    /// A device whose durable contents start as `base`.
    pub fn new(base: Vec<u8>) -> Self {
        CrashDevice {
            state: Arc::new(Mutex::new(State {
                live: base,
                log: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of events recorded so far.
    pub fn event_count(&self) -> usize {
        self.lock().log.len()
    }

    /// A copy of the event log.
    pub fn events(&self) -> Vec<Event> {
        self.lock().log.clone()
    }
}

/// Apply a write event to an image.
pub fn apply(image: &mut [u8], ev: &Event) {
    if let Event::Write { offset, data } = ev {
        let o = *offset as usize;
        image[o..o + data.len()].copy_from_slice(data);
    }
}

/// The image a crash could leave: `durable` (everything up to the last
/// completed flush) plus the pieces of `pending` writes that `keep(write
/// index, piece index)` selects.
pub fn crash_image(
    durable: &[u8],
    pending: &[Event],
    piece: usize,
    keep: impl FnMut(usize, usize) -> bool,
) -> Vec<u8> {
    let mut img = durable.to_vec();
    patch(&mut img, &crash_chunks(durable, pending, piece, keep));
    img
}

/// Copy chunks over the image they were taken from.
fn patch(img: &mut [u8], chunks: &Chunks) {
    for (&idx, data) in chunks {
        img[idx * CHUNK..idx * CHUNK + data.len()].copy_from_slice(data);
    }
}

/// The same state as [`crash_image`], as an [`Overlay`] on `durable`: only
/// the chunks the kept pieces touch are copied.
pub fn crash_overlay(
    durable: &Arc<Vec<u8>>,
    pending: &[Event],
    piece: usize,
    keep: impl FnMut(usize, usize) -> bool,
) -> Overlay {
    Overlay {
        chunks: Mutex::new(crash_chunks(durable, pending, piece, keep)),
        base: durable.clone(),
    }
}

/// Chunks of `durable` changed by the kept pieces of `pending`, with
/// their new contents.
fn crash_chunks(
    durable: &[u8],
    pending: &[Event],
    piece: usize,
    mut keep: impl FnMut(usize, usize) -> bool,
) -> Chunks {
    let mut chunks = Chunks::new();
    for (wi, ev) in pending.iter().enumerate() {
        let Event::Write { offset, data } = ev else {
            continue;
        };
        for (pi, bytes) in data.chunks(piece).enumerate() {
            if keep(wi, pi) {
                put(&mut chunks, durable, *offset as usize + pi * piece, bytes);
            }
        }
    }
    chunks
}

/// Granularity of an [`Overlay`]'s copies.
pub const CHUNK: usize = 4096;

type Chunks = BTreeMap<usize, Box<[u8]>>;

/// Write `bytes` at `offset` into the chunk copies of `base`.
fn put(chunks: &mut Chunks, base: &[u8], offset: usize, mut bytes: &[u8]) {
    let mut at = offset;
    while !bytes.is_empty() {
        let idx = at / CHUNK;
        let chunk = chunks.entry(idx).or_insert_with(|| {
            let start = idx * CHUNK;
            base[start..(start + CHUNK).min(base.len())].into()
        });
        let inner = at - idx * CHUNK;
        let n = bytes.len().min(chunk.len() - inner);
        chunk[inner..inner + n].copy_from_slice(&bytes[..n]);
        bytes = &bytes[n..];
        at += n;
    }
}

/// A copy-on-write device over a shared image: reads fall through to the
/// base, writes land in private 4 KiB chunk copies. A crash state is
/// recovered and checked on one of these without copying the whole image.
pub struct Overlay {
    base: Arc<Vec<u8>>,
    chunks: Mutex<Chunks>,
}

impl Overlay {
    /// A device that reads as `base` until written.
    pub fn new(base: Arc<Vec<u8>>) -> Self {
        Overlay {
            base,
            chunks: Mutex::new(Chunks::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Chunks> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Visit each chunk that differs from the base by having been written
    /// (`index`, contents), in ascending order.
    pub fn for_each_chunk(&self, mut f: impl FnMut(usize, &[u8])) {
        for (idx, data) in self.lock().iter() {
            f(*idx, data);
        }
    }

    /// The whole image.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut img = self.base.to_vec();
        patch(&mut img, &self.lock());
        img
    }
}

impl BlockDevice for Overlay {
    fn size_bytes(&self) -> u64 {
        self.base.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        range_check(offset, buf.len(), self.base.len())?;
        let chunks = self.lock();
        let mut at = offset as usize;
        let mut out = &mut buf[..];
        while !out.is_empty() {
            let idx = at / CHUNK;
            let inner = at - idx * CHUNK;
            let n = out.len().min(CHUNK - inner);
            let src = match chunks.get(&idx) {
                Some(c) => &c[inner..inner + n],
                None => &self.base[at..at + n],
            };
            out[..n].copy_from_slice(src);
            out = &mut out[n..];
            at += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        range_check(offset, buf.len(), self.base.len())?;
        put(&mut self.lock(), &self.base, offset as usize, buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        self.write_at(offset, &vec![0u8; len_bytes as usize])
    }

    fn is_read_only(&self) -> bool {
        false
    }
}

fn range_check(offset: u64, len: usize, size: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size as u64 => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "I/O beyond the end of the device",
        )),
    }
}

impl BlockDevice for CrashDevice {
    fn size_bytes(&self) -> u64 {
        self.lock().live.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.lock();
        range_check(offset, buf.len(), s.live.len())?;
        let o = offset as usize;
        buf.copy_from_slice(&s.live[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.lock();
        range_check(offset, buf.len(), s.live.len())?;
        let o = offset as usize;
        s.live[o..o + buf.len()].copy_from_slice(buf);
        s.log.push(Event::Write {
            offset,
            data: buf.into(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.lock().log.push(Event::Flush);
        Ok(())
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        // A discard is modelled as a write of zeros (what our other
        // backends leave behind).
        self.write_at(offset, &vec![0u8; len_bytes as usize])
    }

    fn is_read_only(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_states_keep_flushed_writes_and_subsets_of_the_rest() {
        let d = CrashDevice::new(vec![0; 4096]);
        d.write_at(0, &[1; 1024]).unwrap();
        d.flush().unwrap();
        d.write_at(1024, &[2; 1024]).unwrap();
        d.write_at(0, &[3; 1024]).unwrap();
        let ev = d.events();
        let flush = ev.iter().position(|e| matches!(e, Event::Flush)).unwrap();
        let mut durable = vec![0u8; 4096];
        for e in &ev[..flush] {
            apply(&mut durable, e);
        }
        let pending = &ev[flush + 1..];
        let none = crash_image(&durable, pending, 512, |_, _| false);
        assert_eq!(&none[..1024], &[1; 1024][..]);
        assert_eq!(none[1024], 0);
        // Only the second write's first sector lands: a torn write.
        let torn = crash_image(&durable, pending, 512, |w, p| w == 1 && p == 0);
        assert_eq!(&torn[..512], &[3; 512][..]);
        assert_eq!(&torn[512..1024], &[1; 512][..]);
        assert_eq!(torn[1024], 0);
    }

    #[test]
    fn an_overlay_reads_and_writes_like_a_copy_and_leaves_its_base_alone() {
        // Odd sizes and offsets cross chunk boundaries and the short last
        // chunk.
        let base: Vec<u8> = (0..3 * CHUNK + 700).map(|i| (i % 251) as u8).collect();
        let shared = Arc::new(base.clone());
        let o = Overlay::new(shared.clone());
        let mut copy = base.clone();
        let mut seed = 7u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for round in 0..200 {
            let off = next(copy.len());
            let len = 1 + next((copy.len() - off).min(9000));
            let data = vec![round as u8; len];
            if round % 7 == 0 {
                o.discard(off as u64, len as u64).unwrap();
                copy[off..off + len].fill(0);
            } else {
                o.write_at(off as u64, &data).unwrap();
                copy[off..off + len].copy_from_slice(&data);
            }
            let roff = next(copy.len());
            let rlen = next(copy.len() - roff + 1);
            let mut buf = vec![0u8; rlen];
            o.read_at(roff as u64, &mut buf).unwrap();
            assert_eq!(buf, copy[roff..roff + rlen], "round {round}");
        }
        assert_eq!(o.to_vec(), copy);
        assert_eq!(*shared, base);
        assert!(o.write_at(copy.len() as u64 - 1, &[0, 0]).is_err());
        assert!(o.read_at(u64::MAX, &mut [0]).is_err());
    }

    #[test]
    fn a_crash_overlay_is_the_crash_image() {
        let d = CrashDevice::new(vec![9; 3 * CHUNK]);
        d.write_at(100, &[1; 5000]).unwrap();
        d.write_at(4000, &[2; 600]).unwrap();
        d.write_at(8192, &[3; 4096]).unwrap();
        let ev = d.events();
        let durable = Arc::new(vec![9u8; 3 * CHUNK]);
        let keep = |w: usize, p: usize| (w + p) % 3 != 1;
        let o = crash_overlay(&durable, &ev, 512, keep);
        assert_eq!(o.to_vec(), crash_image(&durable, &ev, 512, keep));
        let mut touched = Vec::new();
        o.for_each_chunk(|i, _| touched.push(i));
        assert_eq!(touched, [0, 1, 2]);
    }
}
