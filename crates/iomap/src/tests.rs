//! The generic paths over a toy filesystem: a flat block map on a memory
//! device with delayed allocation, so the tests see exactly which blocks
//! were reserved, allocated and converted.

use super::*;
use folio_blockdev::MemDevice;
use folio_pagecache::Config;
use std::collections::BTreeMap;

const BS: u64 = 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Blk {
    Delalloc,
    Unwritten(u64),
    Written(u64),
}

struct Toy {
    /// Each `copied` call: the end, and whether the folio holding the
    /// byte before it was locked then.
    copied: Vec<(u64, bool)>,
    /// The mapping written (for the lock check in `copied`).
    watch: Option<Arc<AddressSpace>>,
    dev: Arc<dyn BlockDevice>,
    map: BTreeMap<u64, Blk>,
    next_free: u64,
    reserved: u64,
    fail_writes: bool,
}

impl Toy {
    fn new() -> Self {
        Toy {
            copied: Vec::new(),
            watch: None,
            dev: Arc::new(MemDevice::new(1 << 20)),
            map: BTreeMap::new(),
            next_free: 1,
            reserved: 0,
            fail_writes: false,
        }
    }
}

impl IomapOps for Toy {
    type Error = io::Error;
    fn device(&self) -> Arc<dyn BlockDevice> {
        if self.fail_writes {
            Arc::new(folio_blockdev::FaultDevice::failing_writes(
                self.dev.clone(),
            ))
        } else {
            self.dev.clone()
        }
    }
    fn begin(&mut self, _ino: u64, pos: u64, len: u64, fl: u32) -> io::Result<Iomap> {
        let lblk = pos / BS;
        let nblk = (pos + len).div_ceil(BS) - lblk;
        if fl & flags::WRITE != 0 {
            for l in lblk..lblk + nblk {
                if let std::collections::btree_map::Entry::Vacant(v) = self.map.entry(l) {
                    v.insert(Blk::Delalloc);
                    self.reserved += 1;
                }
            }
        }
        let first = self.map.get(&lblk).copied();
        if fl & flags::WRITEBACK != 0 && first == Some(Blk::Delalloc) {
            let p = self.next_free;
            self.next_free += 1;
            self.reserved -= 1;
            self.map.insert(lblk, Blk::Unwritten(p));
        }
        let (kind, addr, new) = match self.map.get(&lblk) {
            None => (IomapKind::Hole, 0, false),
            Some(Blk::Delalloc) => (IomapKind::Delalloc, 0, true),
            Some(Blk::Unwritten(p)) => (IomapKind::Unwritten, p * BS, false),
            Some(Blk::Written(p)) => (IomapKind::Mapped, p * BS, false),
        };
        Ok(Iomap {
            kind,
            offset: lblk * BS,
            length: BS,
            addr,
            new,
            inline: Vec::new(),
        })
    }
    fn end(
        &mut self,
        _ino: u64,
        pos: u64,
        len: u64,
        done: u64,
        fl: u32,
        map: &Iomap,
    ) -> io::Result<()> {
        if fl & flags::WRITE != 0 {
            // Give back reservations past what was copied.
            let keep = (pos + done).div_ceil(BS);
            for l in keep..(pos + len).div_ceil(BS) {
                if self.map.get(&l) == Some(&Blk::Delalloc) {
                    self.map.remove(&l);
                    self.reserved -= 1;
                }
            }
        }
        if fl & flags::WRITEBACK != 0 && done == map.length {
            if let Some(Blk::Unwritten(p)) = self.map.get(&(map.offset / BS)).copied() {
                self.map.insert(map.offset / BS, Blk::Written(p));
            }
        }
        Ok(())
    }
    fn copied(&mut self, _ino: u64, end: u64) {
        let locked = self.watch.as_ref().is_some_and(|m| {
            let idx = (end - 1) / m.folio_size() as u64;
            m.find(idx).is_some_and(|f| f.is_locked())
        });
        self.copied.push((end, locked));
    }
}

/// A buffered write reports each folio's copy while it still holds the
/// folio locked (the filesystem raises the size there, before writeback
/// can lock the folio), folio by folio, up to the write's end.
#[test]
fn copies_are_reported_under_the_folio_lock() {
    let (mut t, _pc, m) = setup();
    t.watch = Some(Arc::clone(&m));
    let fsz = m.folio_size() as u64;
    let data = vec![3u8; (2 * fsz + 100) as usize];
    assert_eq!(write_all(&mut t, &m, 0, 500, &data), data.len() as u64);
    let ends: Vec<u64> = t.copied.iter().map(|c| c.0).collect();
    assert!(ends.windows(2).all(|w| w[0] < w[1]), "ascending: {ends:?}");
    assert_eq!(ends.last(), Some(&(500 + data.len() as u64)));
    assert!(
        ends.contains(&fsz) && ends.contains(&(2 * fsz)),
        "each folio's end"
    );
    assert!(
        t.copied.iter().all(|c| c.1),
        "every report under the folio lock"
    );
}

fn setup() -> (Toy, PageCache, Arc<AddressSpace>) {
    let pc = PageCache::new(Config::default());
    let m = pc.mapping(12, BS as usize);
    (Toy::new(), pc, m)
}

fn write_all(t: &mut Toy, m: &AddressSpace, isize: u64, pos: u64, data: &[u8]) -> u64 {
    let mut at = 0;
    let out = buffered_write(
        t,
        m,
        12,
        isize,
        pos,
        data.len() as u64,
        &mut |b: &mut [u8]| {
            b.copy_from_slice(&data[at..at + b.len()]);
            at += b.len();
            Ok(b.len())
        },
    );
    assert!(out.error.is_none());
    out.written
}

#[test]
fn write_read_writeback_roundtrip() {
    let (mut t, pc, m) = setup();
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(write_all(&mut t, &m, 0, 300, &data), 5000);
    assert_eq!(t.reserved, 6, "blocks 0..=5 reserved, nothing allocated");
    let size = 5300;
    let mut back = vec![0u8; 5300];
    assert_eq!(
        buffered_read(&mut t, &m, 12, size, 0, &mut back).unwrap(),
        5300
    );
    assert!(back[..300].iter().all(|&b| b == 0));
    assert_eq!(&back[300..], &data[..]);
    let n = writeback(&mut t, &pc, &m, 12, 0, u64::MAX).unwrap();
    assert_eq!(n, 6 * BS);
    assert_eq!(t.reserved, 0);
    assert!(t.map.values().all(|b| matches!(b, Blk::Written(_))));
    assert_eq!(pc.dirty_bytes(), 0);
    // Drop the cache and read from the device.
    pc.drop_clean();
    let mut again = vec![0u8; 5300];
    buffered_read(&mut t, &m, 12, size, 0, &mut again).unwrap();
    assert_eq!(again, back);
}

#[test]
fn short_copy_gives_back_the_unused_reservation() {
    let (mut t, _pc, m) = setup();
    let mut given = 0usize;
    let out = buffered_write(&mut t, &m, 12, 0, 0, 8 * BS, &mut |b: &mut [u8]| {
        // Fault after 2.5 blocks.
        let room = (2560 - given).min(b.len());
        b[..room].fill(7);
        given += room;
        Ok(room)
    });
    // Block 2 was not uptodate and only half copied: it does not count.
    assert_eq!(out.written, 2 * BS);
    assert!(
        out.error.is_none(),
        "a short copy after progress is a short write"
    );
    assert_eq!(t.reserved, 2, "blocks 2..8 given back");
    assert_eq!(t.map.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    // Nothing copied at all: EFAULT, and no reservation left.
    let out = buffered_write(&mut t, &m, 12, 2048, 4096, BS, &mut |_b: &mut [u8]| Ok(0));
    assert_eq!(out.written, 0);
    assert_eq!(out.error.unwrap().raw_os_error(), Some(14));
    assert_eq!(t.reserved, 2);
}

#[test]
fn failed_writeback_keeps_data_dirty_and_blocks_unwritten() {
    let (mut t, pc, m) = setup();
    write_all(&mut t, &m, 0, 0, &[9u8; 3000]);
    t.fail_writes = true;
    assert!(writeback(&mut t, &pc, &m, 12, 0, u64::MAX).is_err());
    assert!(
        pc.dirty_bytes() > 0,
        "data stays dirty after a failed write"
    );
    assert!(t.map.values().all(|b| !matches!(b, Blk::Written(_))));
    t.fail_writes = false;
    writeback(&mut t, &pc, &m, 12, 0, u64::MAX).unwrap();
    assert_eq!(pc.dirty_bytes(), 0);
    assert!(t.map.values().all(|b| matches!(b, Blk::Written(_))));
}

#[test]
fn direct_write_wins_over_dirty_cache() {
    let (mut t, pc, m) = setup();
    write_all(&mut t, &m, 0, 0, &[1u8; 2048]);
    direct_write(&mut t, &pc, &m, 12, 0, &[2u8; 1024]).unwrap();
    // A later writeback must not bring the cached 1s back over the 2s.
    writeback(&mut t, &pc, &m, 12, 0, u64::MAX).unwrap();
    let mut b = vec![0u8; 2048];
    buffered_read(&mut t, &m, 12, 2048, 0, &mut b).unwrap();
    assert!(b[..1024].iter().all(|&x| x == 2));
    assert!(b[1024..].iter().all(|&x| x == 1));
}

#[test]
fn seek_sees_delalloc_as_data() {
    let (mut t, _pc, m) = setup();
    write_all(&mut t, &m, 0, 4 * BS, &[5u8; 1024]);
    let size = 8 * BS;
    assert_eq!(
        seek_data_hole(&mut t, &m, 12, size, 0, true).unwrap(),
        Some(4 * BS)
    );
    assert_eq!(
        seek_data_hole(&mut t, &m, 12, size, 4 * BS, false).unwrap(),
        Some(5 * BS)
    );
    assert_eq!(
        seek_data_hole(&mut t, &m, 12, size, 5 * BS, true).unwrap(),
        None
    );
}
