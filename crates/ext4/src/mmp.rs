//! Multiple-mount protection (the `mmp` incompatible feature), as the
//! kernel's ext4 (`fs/ext4/mmp.c`) and e2fsprogs do it.
//!
//! An image on shared storage (a SAN disk, an NBD export) can be reached
//! by more than one host, which no file lock can see. ext4 keeps a block
//! (`s_mmp_block`) holding a sequence number that whoever has the image
//! open read-write keeps changing:
//! - **open** (read-write only): a sequence of `SEQ_FSCK` means e2fsck is
//!   running: refused. `SEQ_CLEAN`: take it at once (write a new random
//!   sequence). Anything else means someone may be using it (or crashed):
//!   wait twice the check interval plus a second (11 s at least) and read
//!   again; a change means someone is, refused. Then write a new random
//!   sequence, wait the same time and read again: a change means another
//!   host took it at the same moment, refused. The kernel's mount does
//!   exactly this (`ext4_multi_mount_protect`).
//! - **while open**: a thread rewrites the block with a new sequence and
//!   the time every `s_mmp_update_interval` seconds, first checking that
//!   the block still holds the sequence it wrote last; if not, another
//!   host has taken the image and the filesystem stops writing.
//! - **close**: `SEQ_CLEAN`, so the next opener need not wait for a
//!   change. A crash leaves a sequence that stops changing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use folio_blockdev::BlockDevice;

use crate::error::{Error, Result};
#[cfg(test)]
use crate::format::put16;
use crate::format::superblock::Superblock;
use crate::format::{get16, get32, put32};

pub(crate) const MAGIC: u32 = 0x004D_4D50;
/// The image was closed cleanly.
pub(crate) const SEQ_CLEAN: u32 = 0xFF4D_4D50;
/// e2fsck has the image.
pub(crate) const SEQ_FSCK: u32 = 0xE24D_4D50;
/// Largest sequence a user draws.
const SEQ_MAX: u32 = 0xE24D_4D4F;
/// Shortest check interval, in seconds (EXT4_MMP_MIN_CHECK_INTERVAL).
const MIN_CHECK_INTERVAL: u64 = 5;
/// Longest update interval, in seconds (EXT4_MMP_MAX_UPDATE_INTERVAL).
const MAX_UPDATE_INTERVAL: u64 = 300;
/// Bytes of the structure (the checksum is its last word).
const SIZE: usize = 1024;
const CSUM_AT: usize = 1020;

/// The superblock's MMP fields: (block, update interval in seconds).
fn sb_fields(sb: &Superblock) -> (u64, u64) {
    let raw = &sb.raw;
    let block = u64::from_le_bytes(raw[0x168..0x170].try_into().expect("8 bytes"));
    let interval = u64::from(get16(raw, 0x166).unwrap_or(0));
    (block, interval)
}

/// A fresh random sequence number, never `avoid`.
fn new_seq(avoid: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // std's hasher keys are drawn from the OS's random source, fresh for
    // each `RandomState`.
    let mut n = 0u64;
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        let s = (h.finish() % u64::from(SEQ_MAX)) as u32;
        if s != avoid {
            return s;
        }
        n += 1;
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This host's name, for the block's `mmp_nodename` (what e2fsck and
/// the kernel print when they find the image in use).
fn node_name() -> Vec<u8> {
    std::fs::read("/proc/sys/kernel/hostname")
        .map(|n| n.trim_ascii().to_vec())
        .unwrap_or_else(|_| b"folio".to_vec())
}

/// Where the block is and how it is checked.
#[derive(Clone)]
struct Place {
    dev: Arc<dyn BlockDevice>,
    offset: u64,
    /// The checksum seed, with metadata_csum.
    csum_seed: Option<u32>,
}

impl Place {
    fn read(&self) -> Result<[u8; SIZE]> {
        let mut b = [0u8; SIZE];
        self.dev.read_at(self.offset, &mut b)?;
        if get32(&b, 0) != Some(MAGIC) {
            return Err(Error::corrupted(
                "the MMP block has a bad magic number",
                self.offset,
            ));
        }
        if let Some(seed) = self.csum_seed {
            let want = crate::csum::crc32c_raw(seed, &b[..CSUM_AT]);
            if get32(&b, CSUM_AT) != Some(want) {
                return Err(Error::BadChecksum {
                    what: "MMP block".into(),
                    block: self.offset,
                });
            }
        }
        Ok(b)
    }

    /// Write `seq`, the time and this host's name over `b`.
    fn write(&self, b: &mut [u8; SIZE], seq: u32) -> Result<()> {
        put32(b, 4, seq);
        b[8..16].copy_from_slice(&now_secs().to_le_bytes());
        let name = node_name();
        b[16..80].fill(0);
        let n = name.len().min(63);
        b[16..16 + n].copy_from_slice(&name[..n]);
        b[80..112].fill(0);
        b[80..85].copy_from_slice(b"folio");
        if let Some(seed) = self.csum_seed {
            let c = crate::csum::crc32c_raw(seed, &b[..CSUM_AT]);
            put32(b, CSUM_AT, c);
        }
        self.dev.write_at(self.offset, b)?;
        Ok(self.dev.flush()?)
    }
}

/// What a held image's updater shares with the filesystem.
struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    /// Another host took the image: nothing more may be written.
    lost: AtomicBool,
}

/// The image held by this process (see the module).
pub(crate) struct Mmp {
    place: Place,
    shared: Arc<Shared>,
    updater: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Mmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mmp(block at byte {})", self.place.offset)
    }
}

impl Mmp {
    /// Take an MMP image for a read-write open, or say who has it.
    /// `sleep` waits (a parameter so that unit tests need not).
    pub(crate) fn start(
        dev: Arc<dyn BlockDevice>,
        sb: &Superblock,
        sleep: &dyn Fn(Duration),
    ) -> Result<Mmp> {
        let (block, interval) = sb_fields(sb);
        let bs = u64::from(sb.block_size().unwrap_or(1024));
        let blocks = sb.blocks_count();
        if block <= u64::from(sb.first_data_block()) || block >= blocks {
            return Err(Error::corrupted(
                format!("the superblock's MMP block {block} is outside the filesystem"),
                1,
            ));
        }
        // The block is inside the filesystem, whose size the superblock
        // gives: a hostile count may still overflow the byte offset.
        let offset = block.checked_mul(bs).ok_or_else(|| {
            Error::corrupted(
                format!("the superblock's MMP block {block} is outside the filesystem"),
                1,
            )
        })?;
        let place = Place {
            dev,
            offset,
            csum_seed: sb.metadata_csum().then(|| sb.csum_seed()),
        };
        let mut b = place.read()?;
        let check = u64::from(get16(&b, 112).unwrap_or(0)).max(MIN_CHECK_INTERVAL);
        let wait = Duration::from_secs((2 * check + 1).min(check + 60));
        let in_use = |b: &[u8; SIZE], why: &str| {
            let node = String::from_utf8_lossy(&b[16..80]);
            let node = node.trim_end_matches('\0');
            Error::Locked(format!(
                "{why} (multiple-mount protection: the MMP block was last updated by node \
                 {node:?})"
            ))
        };
        let seq = get32(&b, 4).unwrap_or(0);
        if seq == SEQ_FSCK {
            return Err(in_use(&b, "e2fsck is running on the image"));
        }
        let clean = seq == SEQ_CLEAN;
        if !clean {
            // Maybe in use, maybe left by a crash: watch it.
            sleep(wait);
            b = place.read()?;
            if get32(&b, 4) != Some(seq) {
                return Err(in_use(&b, "the image is in use on another node"));
            }
        }
        let mine = new_seq(seq);
        place.write(&mut b, mine)?;
        if !clean {
            sleep(wait);
        }
        let b2 = place.read()?;
        if get32(&b2, 4) != Some(mine) {
            return Err(in_use(
                &b2,
                "another node opened the image at the same time",
            ));
        }
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            lost: AtomicBool::new(false),
        });
        let every = Duration::from_secs(interval.clamp(1, MAX_UPDATE_INTERVAL));
        let updater = {
            let (place, shared) = (place.clone(), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("folio-mmp".into())
                .spawn(move || update(&place, &shared, mine, every))
                .map_err(Error::Io)?
        };
        Ok(Mmp {
            place,
            shared,
            updater: Some(updater),
        })
    }

    /// Another host has taken the image since it was opened.
    pub(crate) fn lost(&self) -> bool {
        self.shared.lost.load(Ordering::Acquire)
    }

    /// Stop updating; with `clean`, mark the image closed cleanly (unless
    /// another host has it now).
    pub(crate) fn release(mut self, clean: bool) -> Result<()> {
        self.stop_updater();
        if clean && !self.lost() {
            let mut b = self.place.read()?;
            self.place.write(&mut b, SEQ_CLEAN)?;
        }
        Ok(())
    }

    fn stop_updater(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.updater.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Mmp {
    /// Dropped without `release` (a crash, as far as the image can tell):
    /// the updater stops and the last sequence stays.
    fn drop(&mut self) {
        self.stop_updater();
    }
}

/// The updater: every `every`, check the block still holds `seq` and
/// write a new one.
fn update(place: &Place, shared: &Shared, mut seq: u32, every: Duration) {
    let mut stop = shared.stop.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if *stop {
            return;
        }
        let (s, _) = shared
            .wake
            .wait_timeout(stop, every)
            .unwrap_or_else(|e| e.into_inner());
        stop = s;
        if *stop {
            return;
        }
        match place.read() {
            Ok(mut b) if get32(&b, 4) == Some(seq) => {
                let next = new_seq(seq);
                if place.write(&mut b, next).is_ok() {
                    seq = next;
                }
            }
            Ok(b) => {
                let node = String::from_utf8_lossy(&b[16..80])
                    .trim_end_matches('\0')
                    .to_string();
                eprintln!(
                    "folio: multiple-mount protection: another node ({node}) has taken the \
                     image; no more writes"
                );
                shared.lost.store(true, Ordering::Release);
                return;
            }
            // A failed read is retried at the next round.
            Err(_) => {}
        }
    }
}

/// Build an MMP block as mke2fs does (for tests).
#[cfg(test)]
fn block_with(seq: u32, check: u16, csum_seed: Option<u32>) -> [u8; SIZE] {
    let mut b = [0u8; SIZE];
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, seq);
    put16(&mut b, 112, check);
    if let Some(seed) = csum_seed {
        let c = crate::csum::crc32c_raw(seed, &b[..CSUM_AT]);
        put32(&mut b, CSUM_AT, c);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use folio_blockdev::MemDevice;
    use std::cell::Cell;

    fn image(seq: u32) -> (Arc<MemDevice>, Superblock) {
        let dev = Arc::new(MemDevice::new(1 << 20));
        let mut raw = [0u8; 1024];
        put32(&mut raw, 0x04, 1024); // blocks_count
        put32(&mut raw, 0x14, 1); // first_data_block
        put32(&mut raw, 0x18, 0); // log_block_size: 1 KiB
        put16(&mut raw, 0x166, 5);
        raw[0x168..0x170].copy_from_slice(&100u64.to_le_bytes());
        let sb = Superblock { raw };
        dev.write_at(100 * 1024, &block_with(seq, 5, None)).unwrap();
        (dev, sb)
    }

    #[test]
    fn a_clean_image_is_taken_at_once_and_released_clean() {
        let (dev, sb) = image(SEQ_CLEAN);
        let m = Mmp::start(dev.clone(), &sb, &|_| panic!("no wait for a clean image")).unwrap();
        let mut b = [0u8; SIZE];
        dev.read_at(100 * 1024, &mut b).unwrap();
        let seq = get32(&b, 4).unwrap();
        assert!(seq <= SEQ_MAX, "a fresh sequence is written");
        assert!(b[16..80].iter().any(|&c| c != 0), "and this node's name");
        m.release(true).unwrap();
        dev.read_at(100 * 1024, &mut b).unwrap();
        assert_eq!(get32(&b, 4), Some(SEQ_CLEAN));
    }

    #[test]
    fn an_mmp_block_past_any_device_is_an_error_not_an_overflow() {
        // Found by the `image` fuzz target: a huge block count lets the
        // MMP block number pass the range check and overflow its offset.
        let (dev, mut sb) = image(SEQ_CLEAN);
        put32(&mut sb.raw, 0x18, 6); // 64 KiB blocks
        put32(&mut sb.raw, 0x60, 0x80); // 64bit
        put32(&mut sb.raw, 0x150, u32::MAX); // blocks_count_hi
        sb.raw[0x168..0x170].copy_from_slice(&(1u64 << 50).to_le_bytes());
        let r = Mmp::start(dev, &sb, &|_| panic!("no wait"));
        assert!(matches!(r, Err(Error::Corrupted { .. })), "{r:?}");
    }

    #[test]
    fn fsck_running_is_refused_at_once() {
        let (dev, sb) = image(SEQ_FSCK);
        let r = Mmp::start(dev, &sb, &|_| panic!("no wait for a running e2fsck"));
        assert!(matches!(r, Err(Error::Locked(m)) if m.contains("e2fsck")));
    }

    #[test]
    fn a_sequence_that_changes_while_watched_is_in_use() {
        let (dev, sb) = image(1234);
        let d2 = dev.clone();
        // Another node updates the block during the first wait.
        let r = Mmp::start(dev, &sb, &|_| {
            d2.write_at(100 * 1024, &block_with(4321, 5, None)).unwrap();
        });
        assert!(matches!(r, Err(Error::Locked(m)) if m.contains("in use")));
    }

    #[test]
    fn a_stale_sequence_left_by_a_crash_is_taken_over_after_two_waits() {
        let (dev, sb) = image(1234);
        let waits = Cell::new(0);
        let m = Mmp::start(dev, &sb, &|d| {
            assert_eq!(d, Duration::from_secs(11));
            waits.set(waits.get() + 1);
        })
        .unwrap();
        assert_eq!(waits.get(), 2, "before and after writing");
        assert!(!m.lost());
        m.release(true).unwrap();
    }

    #[test]
    fn a_bad_checksum_is_an_error() {
        let (dev, mut sb) = image(SEQ_CLEAN);
        // metadata_csum on, the block's checksum not matching.
        let ro = sb.feature_ro_compat() | crate::format::superblock::ro_compat::METADATA_CSUM;
        sb.set_feature_ro_compat(ro);
        let r = Mmp::start(dev, &sb, &|_| {});
        assert!(matches!(r, Err(Error::BadChecksum { .. })));
    }
}
