//! A device that records every write and flush so that tests can produce
//! any state a power cut could leave behind.
//!
//! Model: a write is durable once a later flush has completed. A crash
//! keeps everything before the last completed flush, plus any subset of
//! the writes issued after it, torn into `piece`-byte units (sectors) that
//! land or not independently. Kept pieces are applied in issue order, as a
//! drive that completes writes to the same sector in order would.

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
    mut keep: impl FnMut(usize, usize) -> bool,
) -> Vec<u8> {
    let mut img = durable.to_vec();
    for (wi, ev) in pending.iter().enumerate() {
        let Event::Write { offset, data } = ev else {
            continue;
        };
        for (pi, chunk) in data.chunks(piece).enumerate() {
            if keep(wi, pi) {
                let o = *offset as usize + pi * piece;
                img[o..o + chunk.len()].copy_from_slice(chunk);
            }
        }
    }
    img
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
}
