//! The generic data path of folio, after Linux's iomap.
//!
//! A filesystem implements [`IomapOps`]: asked `begin(ino, pos, len,
//! flags)`, it describes the file at `pos` as one [`Iomap`] — a hole, a
//! delayed allocation, mapped blocks, unwritten (allocated, reading as
//! zeros) blocks or inline data — and is told the outcome with `end(...)`.
//! On that, this crate implements, for any filesystem:
//! - buffered read with readahead ([`buffered_read`]);
//! - buffered write ([`buffered_write`]): the filesystem reserves the whole
//!   span at the first `begin` (delayed allocation), the data is copied
//!   folio by folio, and `end` is told exactly how much was copied so it
//!   can give back the unused part of the reservation;
//! - writeback ([`writeback`]): dirty blocks are gathered into runs, mapped
//!   with [`flags::WRITEBACK`] (where delayed allocations become real
//!   blocks) and written; `end` is told what reached the device (the
//!   filesystem converts unwritten blocks then, or undoes a new mapping
//!   whose write failed). A failed write leaves the folios dirty. Split in
//!   two ([`writeback_prepare`], [`PreparedWriteback::perform`]), the
//!   mapping runs under the filesystem's locks and the writes of pieces it
//!   defers ([`IomapOps::writeback_defers`]) after it has released them;
//! - tail zeroing when a file grows ([`zero_tail`]);
//! - direct I/O coherent with the cache ([`direct_write`], [`direct_read`]);
//! - SEEK_DATA/SEEK_HOLE that see dirty data in the cache ([`seek_data_hole`]).
//!
//! Locking: these functions take folio locks in ascending order and call
//! back into the filesystem with folio locks held (`begin` for writeback),
//! so the filesystem's allocator sits below the folio lock in the lock
//! order, as in Linux.

use std::io;
use std::sync::Arc;

use folio_blockdev::BlockDevice;
use folio_pagecache::{mask, AddressSpace, FolioGuard, PageCache};

/// What a range of a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IomapKind {
    /// No blocks: reads as zeros.
    Hole,
    /// Space reserved, blocks not chosen yet (data only in the cache).
    Delalloc,
    /// Blocks holding the file's data at `addr`.
    Mapped,
    /// Blocks allocated at `addr` that read as zeros until converted.
    Unwritten,
    /// Data stored in the inode itself ([`Iomap::inline`]).
    Inline,
}

/// One mapping answer.
#[derive(Clone, Debug)]
pub struct Iomap {
    pub kind: IomapKind,
    /// File byte offset where the mapping starts (block aligned).
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Device byte address of `offset` (Mapped and Unwritten).
    pub addr: u64,
    /// The blocks were allocated or reserved by this `begin`: their old
    /// contents must never be read, only overwritten or zeroed.
    pub new: bool,
    /// The data of an inline mapping.
    pub inline: Vec<u8>,
}

impl Iomap {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
    /// Device address of file byte `pos` inside this mapping.
    pub fn addr_of(&self, pos: u64) -> u64 {
        self.addr + (pos - self.offset)
    }
}

/// Flags for [`IomapOps::begin`].
pub mod flags {
    /// A buffered write: reserve (delay-allocate) holes.
    pub const WRITE: u32 = 1;
    /// Report the mapping only (FIEMAP, SEEK): allocate nothing.
    pub const REPORT: u32 = 2;
    /// Direct I/O: allocate real blocks now (unwritten until `end`).
    pub const DIRECT: u32 = 4;
    /// Writeback: turn delayed allocations into real (unwritten) blocks.
    pub const WRITEBACK: u32 = 8;
}

/// The mapping interface a filesystem implements.
pub trait IomapOps {
    type Error: From<io::Error>;
    /// The device file data lives on.
    fn device(&self) -> Arc<dyn BlockDevice>;
    /// Describe `[pos, pos+len)` of inode `ino` starting at `pos` (the
    /// answer may be shorter than `len`, never longer, never empty).
    fn begin(&mut self, ino: u64, pos: u64, len: u64, flags: u32) -> Result<Iomap, Self::Error>;
    /// The operation started by `begin` at `pos` for `len` bytes finished
    /// having done `done` bytes from `pos`.
    fn end(
        &mut self,
        ino: u64,
        pos: u64,
        len: u64,
        done: u64,
        flags: u32,
        map: &Iomap,
    ) -> Result<(), Self::Error>;
    /// A buffered write has copied data up to file byte `end` into a
    /// folio it still holds locked (Linux's `write_end`): a filesystem
    /// whose writeback can run alongside its writers raises the file's
    /// size here, so that writeback, which locks the folio, never writes
    /// back data beyond the size it knows.
    fn copied(&mut self, _ino: u64, _end: u64) {}
    /// May the data of this writeback mapping be written after `begin`
    /// returns, outside the filesystem's locks, with no `end` call when
    /// it succeeds ([`writeback_prepare`])? A filesystem says yes where
    /// its `end` has nothing to do on success (blocks mapped written);
    /// the default keeps every piece in [`writeback`]'s order.
    fn writeback_defers(&self, _map: &Iomap) -> bool {
        false
    }
}

/// Largest readahead window.
pub const MAX_READAHEAD: u64 = 1 << 20;

/// Fill the blocks `[first, first+n)` of a locked folio from `map` unless
/// they are uptodate, then mark them uptodate. Bytes at or beyond `isize`
/// are zeroed in the block straddling it.
fn fill_blocks<E: From<io::Error>>(
    dev: &dyn BlockDevice,
    g: &FolioGuard,
    bs: usize,
    first: u32,
    n: u32,
    map: &Iomap,
    isize: u64,
) -> Result<(), E> {
    let mut st = g.state();
    let mut b = first;
    while b < first + n {
        if st.is_block_uptodate(b) {
            b += 1;
            continue;
        }
        // A run of blocks that are not uptodate.
        let mut e = b + 1;
        while e < first + n && !st.is_block_uptodate(e) {
            e += 1;
        }
        let from = b as usize * bs;
        let to = e as usize * bs;
        let pos = g.pos() + from as u64;
        let buf = &mut st.data_mut()[from..to];
        match map.kind {
            IomapKind::Mapped if !map.new => dev.read_at(map.addr_of(pos), buf)?,
            IomapKind::Inline => {
                buf.fill(0);
                let at = (pos - map.offset) as usize;
                if at < map.inline.len() {
                    let k = (map.inline.len() - at).min(buf.len());
                    buf[..k].copy_from_slice(&map.inline[at..at + k]);
                }
            }
            _ => buf.fill(0),
        }
        let fpos = g.pos();
        if isize < fpos + to as u64 && isize > fpos + from as u64 {
            let cut = (isize - fpos) as usize;
            st.data_mut()[cut..to].fill(0);
        }
        st.set_uptodate(b, e - b);
        b = e;
    }
    Ok(())
}

/// Make `[start, end)` of the file uptodate in the cache (end clamped to
/// the block holding `isize`), folio by folio, one `begin` per mapping.
fn fill_range<O: IomapOps>(
    ops: &mut O,
    m: &AddressSpace,
    ino: u64,
    isize: u64,
    start: u64,
    end: u64,
) -> Result<(), O::Error> {
    let bs = m.block_size() as u64;
    let fsz = m.folio_size() as u64;
    let end = end.min(isize.div_ceil(bs) * bs);
    let dev = ops.device();
    let mut cur = start / bs * bs;
    while cur < end {
        let map = ops.begin(ino, cur, end - cur, 0)?;
        let map_end = map.end().min(end);
        if map_end <= cur {
            return Err(io::Error::other("filesystem returned an empty mapping").into());
        }
        while cur < map_end {
            let g = m.grab(cur / fsz);
            let seg_end = map_end.min(g.pos() + fsz);
            let first = ((cur - g.pos()) / bs) as u32;
            let n = ((seg_end - cur).div_ceil(bs)) as u32;
            fill_blocks::<O::Error>(dev.as_ref(), &g, bs as usize, first, n, &map, isize)?;
            cur = seg_end;
        }
        ops.end(ino, map.offset, map.length, map.length, 0, &map)?;
    }
    Ok(())
}

/// Read `buf.len()` bytes at `pos` of a file of size `isize` through the
/// cache. Returns the bytes read (short at end of file).
pub fn buffered_read<O: IomapOps>(
    ops: &mut O,
    m: &AddressSpace,
    ino: u64,
    isize: u64,
    pos: u64,
    buf: &mut [u8],
) -> Result<usize, O::Error> {
    if pos >= isize || buf.is_empty() {
        return Ok(0);
    }
    let len = (isize - pos).min(buf.len() as u64) as usize;
    let fsz = m.folio_size() as u64;
    let bs = m.block_size();
    let mut done = 0usize;
    let mut filled = false;
    while done < len {
        let p = pos + done as u64;
        let off = (p % fsz) as usize;
        let n = (fsz as usize - off).min(len - done);
        let out = &mut buf[done..done + n];
        if let Some(f) = m.find(p / fsz) {
            if f.read_uptodate(off, out, bs).is_some() {
                done += n;
                continue;
            }
        }
        if filled {
            // Filled a moment ago but gone again (a tiny budget reclaimed
            // it): read this folio under its lock instead.
            let map = ops.begin(ino, p, n as u64, 0)?;
            let g = m.grab(p / fsz);
            let first = (off / bs) as u32;
            let last = ((off + n - 1) / bs) as u32;
            let n2 = (((map.end() - p) as usize).min(n)).max(1);
            let last = last.min(((off + n2 - 1) / bs) as u32);
            fill_blocks::<O::Error>(
                ops.device().as_ref(),
                &g,
                bs,
                first,
                last - first + 1,
                &map,
                isize,
            )?;
            ops.end(ino, map.offset, map.length, map.length, 0, &map)?;
            let take = n.min(n2);
            out[..take].copy_from_slice(&g.state().data()[off..off + take]);
            done += take;
            filled = false;
            continue;
        }
        let win = m.readahead_window(p, (len - done) as u64, MAX_READAHEAD);
        let fill_to = p + ((len - done) as u64).max(win);
        fill_range(ops, m, ino, isize, p, fill_to)?;
        filled = true;
    }
    Ok(len)
}

/// Outcome of a buffered write: bytes copied, and the error that stopped
/// it early, if any.
pub struct WriteOutcome<E> {
    pub written: u64,
    pub error: Option<E>,
}

/// Write `len` bytes at `pos` through the cache. `src` fills each slice
/// it is given with the next bytes of data and returns how many it
/// filled: fewer (or an error) means the source failed midway, like a
/// faulting user buffer. The filesystem's `end` learns exactly how much
/// was copied. The caller updates the file size from `written`.
pub fn buffered_write<O: IomapOps>(
    ops: &mut O,
    m: &AddressSpace,
    ino: u64,
    isize: u64,
    pos: u64,
    len: u64,
    src: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
) -> WriteOutcome<O::Error> {
    let mut written = 0u64;
    let end = pos + len;
    let bs = m.block_size();
    let fsz = m.folio_size() as u64;
    let dev = ops.device();
    while pos + written < end {
        let start = pos + written;
        let map = match ops.begin(ino, start, end - start, flags::WRITE) {
            Ok(map) => map,
            Err(e) => {
                return WriteOutcome {
                    written,
                    error: Some(e),
                }
            }
        };
        let map_end = map.end().min(end);
        let mut error: Option<O::Error> = None;
        let mut short = false;
        while pos + written < map_end {
            let cur = pos + written;
            let g = m.grab(cur / fsz);
            let seg_end = map_end.min(g.pos() + fsz);
            let a = (cur - g.pos()) as usize;
            let b = (seg_end - g.pos()) as usize;
            let first = (a / bs) as u32;
            let last = ((b - 1) / bs) as u32;
            // Edge blocks only partly overwritten must be read (or zeroed)
            // first; whole blocks are simply overwritten.
            let mut edges = Vec::with_capacity(2);
            if a % bs != 0 {
                edges.push(first);
            }
            if b % bs != 0 && (last != first || a % bs == 0) {
                edges.push(last);
            }
            for blk in edges {
                if let Err(e) = fill_blocks::<O::Error>(dev.as_ref(), &g, bs, blk, 1, &map, isize) {
                    error = Some(e);
                    break;
                }
            }
            if error.is_some() {
                break;
            }
            let copied = {
                let mut st = g.state();
                let r = src(&mut st.data_mut()[a..b]);
                let n = match r {
                    Ok(n) => n.min(b - a),
                    Err(e) => {
                        error = Some(e.into());
                        0
                    }
                };
                if n < b - a {
                    short = true;
                    // Keep only what landed in blocks that are valid: a
                    // block that was not uptodate and is only partly
                    // copied holds garbage past the copy.
                    let stop = a + n;
                    if stop % bs != 0 && !st.is_block_uptodate((stop / bs) as u32) {
                        (stop / bs * bs).max(a) - a
                    } else {
                        n
                    }
                } else {
                    n
                }
            };
            if copied > 0 {
                let fb = (a / bs) as u32;
                let lb = ((a + copied - 1) / bs) as u32;
                m.mark_dirty(&g, fb, lb - fb + 1);
                ops.copied(ino, g.pos() + (a + copied) as u64);
            }
            written += copied as u64;
            if short {
                break;
            }
        }
        let done = pos + written - start;
        // Stopping early: `end` covers the rest of the span, so the
        // filesystem gives back every reservation the copy did not use.
        let stopping = short || error.is_some();
        let seg = if stopping {
            end - start
        } else {
            map_end - start
        };
        if let Err(e) = ops.end(ino, start, seg, done, flags::WRITE, &map) {
            error.get_or_insert(e);
        }
        if short || error.is_some() {
            if error.is_none() && written == 0 {
                error = Some(io::Error::from_raw_os_error(14).into()); // EFAULT
            }
            return WriteOutcome { written, error };
        }
    }
    WriteOutcome {
        written,
        error: None,
    }
}

/// A run of dirty blocks waiting to be written: locked folios and, for
/// each part, the dirty block mask being written. Parts of one folio share
/// its guard; the folio unlocks when the last part is done.
struct Run {
    pos: u64,
    len: u64,
    parts: Vec<(Arc<FolioGuard>, u64)>,
}

/// Lock the dirty folios of bytes `[start, end)` in ascending order, mark
/// them under writeback and hand their dirty blocks to `on_run` as runs of
/// contiguous blocks of at most one pool buffer each, in file order. With
/// `nowait`, folios another thread holds (being written back by it, most
/// likely) are left out instead of waited for.
fn for_each_run<E>(
    pc: &PageCache,
    m: &AddressSpace,
    start: u64,
    end: u64,
    nowait: bool,
    mut on_run: impl FnMut(Run) -> Result<(), E>,
) -> Result<(), E> {
    if end <= start {
        return Ok(());
    }
    let bs = m.block_size() as u64;
    let max_run = pc.pool().buf_bytes().max(bs as usize) as u64;
    let mut run: Option<Run> = None;
    for idx in m.dirty_indices(m.index_of(start), m.index_of(end - 1)) {
        let Some(f) = m.find(idx) else { continue };
        let g = if nowait {
            m.try_lock_folio(&f)
        } else {
            m.lock_folio(&f).ok()
        };
        let Some(g) = g else { continue };
        let dirty = g.state().dirty_mask();
        if dirty == 0 {
            continue;
        }
        m.set_writeback(&g, true);
        // Split the folio's dirty bits into contiguous block runs.
        let g = Arc::new(g);
        let mut b = 0u32;
        while b < g.blocks() {
            if dirty & (1 << b) == 0 {
                b += 1;
                continue;
            }
            let mut e = b + 1;
            while e < g.blocks() && dirty & (1 << e) != 0 {
                e += 1;
            }
            let p = g.pos() + u64::from(b) * bs;
            let l = u64::from(e - b) * bs;
            let extend = matches!(&run, Some(r) if r.pos + r.len == p && r.len + l <= max_run);
            if !extend {
                if let Some(r) = run.take() {
                    on_run(r)?;
                }
                run = Some(Run {
                    pos: p,
                    len: 0,
                    parts: Vec::new(),
                });
            }
            let r = run.as_mut().expect("a run was just started");
            r.len += l;
            r.parts.push((Arc::clone(&g), mask(b, e - b)));
            b = e;
        }
    }
    match run {
        Some(r) => on_run(r),
        None => Ok(()),
    }
}

/// Write back the dirty blocks of bytes `[start, end)` of inode `ino`.
/// Returns the bytes written. On error the blocks not written stay dirty.
pub fn writeback<O: IomapOps>(
    ops: &mut O,
    pc: &PageCache,
    m: &AddressSpace,
    ino: u64,
    start: u64,
    end: u64,
) -> Result<u64, O::Error> {
    let mut total = 0;
    for_each_run::<O::Error>(pc, m, start, end, false, |r| {
        total += flush_run(ops, pc, m, ino, r)?;
        Ok(())
    })?;
    Ok(total)
}

/// Copy bytes `[from, to)` of the file out of the run's folios into `out`.
fn gather(parts: &[(Arc<FolioGuard>, u64)], from: u64, to: u64, out: &mut [u8]) {
    for (g, _) in parts {
        let fp = g.pos();
        let fe = fp + g.size() as u64;
        let a = from.max(fp);
        let b = to.min(fe);
        if a >= b {
            continue;
        }
        let st = g.state();
        out[(a - from) as usize..(b - from) as usize]
            .copy_from_slice(&st.data()[(a - fp) as usize..(b - fp) as usize]);
    }
}

/// Write file bytes `[p, p+n)` of a run's locked folios to the device
/// where `map` puts them: through a pool buffer in one request, or
/// straight from the folios, one piece each, when no buffer is free (no
/// allocation needed).
fn write_piece(
    dev: &dyn BlockDevice,
    pc: &PageCache,
    parts: &[(Arc<FolioGuard>, u64)],
    p: u64,
    n: u64,
    map: &Iomap,
) -> io::Result<()> {
    if let Some(mut buf) = pc.pool().take() {
        let out = &mut buf.bytes_mut()[..n as usize];
        gather(parts, p, p + n, out);
        return dev.write_at(map.addr_of(p), out);
    }
    for (g, _) in parts {
        let a = p.max(g.pos());
        let b = (p + n).min(g.pos() + g.size() as u64);
        if a >= b {
            continue;
        }
        let st = g.state();
        dev.write_at(
            map.addr_of(a),
            &st.data()[(a - g.pos()) as usize..(b - g.pos()) as usize],
        )?;
    }
    Ok(())
}

/// A run's I/O is over: clean every block that lies inside one of the
/// written byte ranges `ok` (ascending, disjoint), end the folios'
/// writeback and unlock them (as the guards drop).
fn finish_run(m: &AddressSpace, parts: Vec<(Arc<FolioGuard>, u64)>, ok: &[(u64, u64)]) {
    let bs = m.block_size() as u64;
    for (g, msk) in &parts {
        let mut clean = 0u64;
        for b in 0..g.blocks() {
            let bit = 1u64 << b;
            let at = g.pos() + u64::from(b) * bs;
            if msk & bit != 0 && ok.iter().any(|&(s, e)| s <= at && at + bs <= e) {
                clean |= bit;
            }
        }
        m.clear_dirty(g, clean);
        m.set_writeback(g, false);
    }
}

/// The mapping answer fit for writeback of `[p, ...)`: Mapped or
/// Unwritten, and not empty.
fn writeback_map<O: IomapOps>(
    ops: &mut O,
    ino: u64,
    p: u64,
    stop: u64,
) -> Result<(Iomap, u64), O::Error> {
    let map = ops.begin(ino, p, stop - p, flags::WRITEBACK)?;
    let n = map.end().min(stop) - p;
    if !matches!(map.kind, IomapKind::Mapped | IomapKind::Unwritten) || n == 0 {
        return Err(io::Error::other(format!(
            "writeback of inode {ino} at byte {p}: the filesystem gave a {:?} mapping",
            map.kind
        ))
        .into());
    }
    Ok((map, n))
}

/// Write one run: map it (allocating delayed blocks), write the data,
/// report the outcome to the filesystem, and clean the folios.
fn flush_run<O: IomapOps>(
    ops: &mut O,
    pc: &PageCache,
    m: &AddressSpace,
    ino: u64,
    r: Run,
) -> Result<u64, O::Error> {
    let dev = ops.device();
    let mut done = 0u64;
    let result = (|| -> Result<(), O::Error> {
        while done < r.len {
            let p = r.pos + done;
            let (map, n) = writeback_map(ops, ino, p, r.pos + r.len)?;
            let io = write_piece(&*dev, pc, &r.parts, p, n, &map);
            let ok = io.is_ok();
            ops.end(ino, p, n, if ok { n } else { 0 }, flags::WRITEBACK, &map)?;
            io?;
            done += n;
        }
        Ok(())
    })();
    finish_run(m, r.parts, &[(r.pos, r.pos + done)]);
    result.map(|()| done)
}

/// A run of a prepared writeback: its mapped pieces (bytes `[pos,
/// pos+len)` each) not written yet, and the byte ranges already written.
struct PreparedRun {
    run: Run,
    pending: Vec<(u64, u64, Iomap)>,
    ok: Vec<(u64, u64)>,
}

/// Writeback split in two (see [`writeback_prepare`]): the dirty folios
/// locked, their blocks mapped, the data not written yet.
pub struct PreparedWriteback {
    runs: Vec<PreparedRun>,
    /// Bytes written while preparing (pieces the filesystem does not
    /// defer).
    written: u64,
}

/// What [`PreparedWriteback::perform`] did.
pub struct WritebackOutcome {
    /// Bytes that reached the device (preparation included).
    pub written: u64,
    /// Pieces `(pos, len, map)` whose write failed: their folios stay
    /// dirty, and the filesystem has not been told (`end` with nothing
    /// done is the caller's to call, under whatever lock it needs).
    pub failed: Vec<(u64, u64, Iomap)>,
    /// The first write error.
    pub error: Option<io::Error>,
}

impl PreparedWriteback {
    /// Bytes of writes still to be done.
    pub fn pending_bytes(&self) -> u64 {
        self.runs
            .iter()
            .flat_map(|r| r.pending.iter().map(|(_, n, _)| n))
            .sum()
    }

    /// Write the pieces prepared, clean what reached the device, and
    /// unlock the folios. Calls nothing of the filesystem: this is the
    /// part that runs without the filesystem's locks.
    pub fn perform(
        self,
        dev: &dyn BlockDevice,
        pc: &PageCache,
        m: &AddressSpace,
    ) -> WritebackOutcome {
        let mut out = WritebackOutcome {
            written: self.written,
            failed: Vec::new(),
            error: None,
        };
        for PreparedRun {
            run: r,
            pending,
            mut ok,
        } in self.runs
        {
            for (p, n, map) in pending {
                match write_piece(dev, pc, &r.parts, p, n, &map) {
                    Ok(()) => {
                        out.written += n;
                        ok.push((p, p + n));
                    }
                    Err(e) => {
                        out.error.get_or_insert(e);
                        out.failed.push((p, n, map));
                    }
                }
            }
            finish_run(m, r.parts, &ok);
        }
        out
    }
}

/// The first half of a writeback of bytes `[start, end)` of `ino` whose
/// data is written without the filesystem's locks: lock the dirty
/// folios and map every run (allocating delayed blocks). Pieces the
/// filesystem defers ([`IomapOps::writeback_defers`]: their `end` has
/// nothing to do on success) are left for [`PreparedWriteback::perform`];
/// the others are written and ended here, as [`writeback`] does. An
/// error stops the mapping: what was prepared before it is returned with
/// it, and must still be performed (its blocks may be allocated already).
/// With `nowait`, folios another thread holds are left to it (writeback
/// towards a dirty level, not for an fsync).
pub fn writeback_prepare<O: IomapOps>(
    ops: &mut O,
    pc: &PageCache,
    m: &AddressSpace,
    ino: u64,
    (start, end): (u64, u64),
    nowait: bool,
) -> (PreparedWriteback, Result<(), O::Error>) {
    let dev = ops.device();
    let mut prep = PreparedWriteback {
        runs: Vec::new(),
        written: 0,
    };
    let mut failed = false;
    let r = for_each_run::<O::Error>(pc, m, start, end, nowait, |r| {
        if failed {
            // Left dirty: unlocked as the guards drop.
            finish_run(m, r.parts, &[]);
            return Ok(());
        }
        let mut pending = Vec::new();
        let mut ok = Vec::new();
        let mut done = 0u64;
        let res = (|| -> Result<(), O::Error> {
            while done < r.len {
                let p = r.pos + done;
                let (map, n) = writeback_map(ops, ino, p, r.pos + r.len)?;
                if ops.writeback_defers(&map) {
                    pending.push((p, n, map));
                } else {
                    let io = write_piece(&*dev, pc, &r.parts, p, n, &map);
                    let good = io.is_ok();
                    ops.end(ino, p, n, if good { n } else { 0 }, flags::WRITEBACK, &map)?;
                    io?;
                    prep.written += n;
                    ok.push((p, p + n));
                }
                done += n;
            }
            Ok(())
        })();
        prep.runs.push(PreparedRun {
            run: r,
            pending,
            ok,
        });
        if res.is_err() {
            failed = true;
        }
        res
    });
    (prep, r)
}
/// Zero the bytes of the block holding byte `size` from `size` to the
/// block's end (the file grows past `size`; the old tail must read as
/// zeros). Blocks that read as zeros anyway are only fixed in the cache.
pub fn zero_tail<O: IomapOps>(
    ops: &mut O,
    m: &AddressSpace,
    ino: u64,
    size: u64,
) -> Result<(), O::Error> {
    let bs = m.block_size() as u64;
    if size % bs == 0 {
        return Ok(());
    }
    let blk_pos = size / bs * bs;
    let fsz = m.folio_size() as u64;
    let map = ops.begin(ino, blk_pos, bs, flags::REPORT)?;
    let backed = matches!(map.kind, IomapKind::Mapped | IomapKind::Delalloc);
    let cached = m.find(size / fsz);
    if !backed && cached.is_none() {
        ops.end(ino, blk_pos, bs, bs, flags::REPORT, &map)?;
        return Ok(());
    }
    let g = m.grab(size / fsz);
    let b = ((blk_pos - g.pos()) / bs) as u32;
    let uptodate = g.state().is_block_uptodate(b);
    if backed {
        fill_blocks::<O::Error>(ops.device().as_ref(), &g, bs as usize, b, 1, &map, u64::MAX)?;
    }
    let from = (size - g.pos()) as usize;
    let to = (blk_pos + bs - g.pos()) as usize;
    if backed || uptodate {
        g.state().data_mut()[from..to].fill(0);
    }
    if backed {
        m.mark_dirty(&g, b, 1);
    }
    ops.end(ino, blk_pos, bs, bs, flags::REPORT, &map)?;
    Ok(())
}

fn einval<E: From<io::Error>>(what: &str) -> E {
    let _ = what; // EINVAL, as Linux gives for misaligned O_DIRECT
    io::Error::from_raw_os_error(22).into()
}

/// Make the cache coherent for direct I/O on `[pos, end)`: write back
/// dirty data there, then drop the folios so that no later writeback or
/// read can use older data than what direct I/O puts on the device.
pub fn flush_and_invalidate<O: IomapOps>(
    ops: &mut O,
    pc: &PageCache,
    m: &AddressSpace,
    ino: u64,
    pos: u64,
    end: u64,
) -> Result<(), O::Error> {
    writeback(ops, pc, m, ino, pos, end)?;
    m.invalidate_range(pos, end).map_err(|idx| {
        let _ = (ino, idx); // EBUSY: a folio was dirtied again meanwhile
        io::Error::from_raw_os_error(16).into()
    })
}

/// Direct write of `data` at `pos` (both block aligned): cached data in
/// the range is written back and dropped first, then the data goes to the
/// device; blocks allocated for it stay unwritten until it is there.
pub fn direct_write<O: IomapOps>(
    ops: &mut O,
    pc: &PageCache,
    m: &AddressSpace,
    ino: u64,
    pos: u64,
    data: &[u8],
) -> Result<u64, O::Error> {
    let bs = m.block_size() as u64;
    if pos % bs != 0 || data.len() as u64 % bs != 0 {
        return Err(einval("direct I/O needs block-aligned offset and length"));
    }
    let end = pos + data.len() as u64;
    flush_and_invalidate(ops, pc, m, ino, pos, end)?;
    let dev = ops.device();
    let mut cur = pos;
    while cur < end {
        let map = ops.begin(ino, cur, end - cur, flags::WRITE | flags::DIRECT)?;
        let n = map.end().min(end) - cur;
        if !matches!(map.kind, IomapKind::Mapped | IomapKind::Unwritten) || n == 0 {
            return Err(io::Error::other(format!(
                "direct write of inode {ino}: the filesystem gave a {:?} mapping",
                map.kind
            ))
            .into());
        }
        let src = &data[(cur - pos) as usize..(cur - pos + n) as usize];
        let io = dev.write_at(map.addr_of(cur), src);
        let ok = io.is_ok();
        ops.end(
            ino,
            cur,
            n,
            if ok { n } else { 0 },
            flags::WRITE | flags::DIRECT,
            &map,
        )?;
        io?;
        cur += n;
    }
    Ok(end - pos)
}

/// Direct read at `pos` (block aligned) of a file of size `isize`:
/// dirty cached data in the range is written back first so the device is
/// current.
pub fn direct_read<O: IomapOps>(
    ops: &mut O,
    pc: &PageCache,
    m: &AddressSpace,
    ino: u64,
    isize: u64,
    pos: u64,
    buf: &mut [u8],
) -> Result<usize, O::Error> {
    let bs = m.block_size() as u64;
    if pos % bs != 0 || buf.len() as u64 % bs != 0 {
        return Err(einval("direct I/O needs block-aligned offset and length"));
    }
    if pos >= isize {
        return Ok(0);
    }
    let len = (isize - pos).min(buf.len() as u64);
    writeback(ops, pc, m, ino, pos, pos + len)?;
    let dev = ops.device();
    let mut cur = pos;
    while cur < pos + len {
        let map = ops.begin(ino, cur, pos + len - cur, flags::REPORT)?;
        let n = map.end().min(pos + len) - cur;
        if n == 0 {
            return Err(io::Error::other("filesystem returned an empty mapping").into());
        }
        let out = &mut buf[(cur - pos) as usize..(cur - pos + n) as usize];
        match map.kind {
            IomapKind::Mapped => dev.read_at(map.addr_of(cur), out)?,
            _ => out.fill(0),
        }
        ops.end(ino, cur, n, n, flags::REPORT, &map)?;
        cur += n;
    }
    Ok(len as usize)
}

/// First dirty block of `[from, to)` in the cache, as a byte offset.
fn first_dirty(m: &AddressSpace, from: u64, to: u64) -> Option<u64> {
    if to <= from {
        return None;
    }
    let bs = m.block_size() as u64;
    for idx in m.dirty_indices(m.index_of(from), m.index_of(to - 1)) {
        let f = m.find(idx)?;
        let Ok(g) = m.lock_folio(&f) else { continue };
        let d = g.state().dirty_mask();
        for b in 0..g.blocks() {
            let p = g.pos() + u64::from(b) * bs;
            if d & (1 << b) != 0 && p + bs > from && p < to {
                return Some(p.max(from));
            }
        }
    }
    None
}

/// SEEK_DATA (`data`) or SEEK_HOLE from `pos` in a file of size `isize`.
/// Delayed allocations are data; unwritten extents are holes except where
/// the cache holds dirty data for them. `None` means ENXIO.
pub fn seek_data_hole<O: IomapOps>(
    ops: &mut O,
    m: &AddressSpace,
    ino: u64,
    isize: u64,
    pos: u64,
    data: bool,
) -> Result<Option<u64>, O::Error> {
    if pos >= isize {
        return Ok(None);
    }
    let mut cur = pos;
    while cur < isize {
        let map = ops.begin(ino, cur, isize - cur, flags::REPORT)?;
        let end = map.end().min(isize);
        ops.end(ino, cur, end - cur, end - cur, flags::REPORT, &map)?;
        if end <= cur {
            return Err(io::Error::other("filesystem returned an empty mapping").into());
        }
        match map.kind {
            IomapKind::Mapped | IomapKind::Delalloc | IomapKind::Inline => {
                if data {
                    return Ok(Some(cur));
                }
            }
            IomapKind::Hole => {
                if !data {
                    return Ok(Some(cur));
                }
            }
            IomapKind::Unwritten => {
                // Data where the cache has dirty blocks, holes elsewhere.
                let mut p = cur;
                while p < end {
                    match first_dirty(m, p, end) {
                        Some(d) if data => return Ok(Some(d)),
                        Some(d) if d > p => return Ok(Some(p)),
                        Some(d) => p = d + m.block_size() as u64 - d % m.block_size() as u64,
                        None if data => break,
                        None => return Ok(Some(p)),
                    }
                }
            }
        }
        cur = end;
    }
    Ok(if data { None } else { Some(isize) })
}

#[cfg(test)]
mod tests;
