//! A jbd2-compatible journal: recovery of journals written by Linux,
//! e2fsprogs or folio, and a writer for folio's transactions.
//!
//! The journal lives in blocks of the filesystem device given by `map`
//! (journal logical block → device block), as an internal ext4 journal
//! does. It is a circular log, as jbd2's is:
//!
//! - [`Journal::commit`] appends a transaction at the head: descriptor
//!   blocks with the copies, revoke blocks, then (after a flush) the commit
//!   block, then a flush. Two flushes per commit; the journal superblock is
//!   written only when the log was empty (to point `s_start` at it).
//! - Committed blocks may then be written in place at any time. The
//!   checkpoint is lazy: the caller writes every block of
//!   [`Journal::checkpoint_targets`] in place when the log has no room for
//!   the next transaction, flushes, and calls [`Journal::checkpoint_done`],
//!   which moves the tail to the head; the log wraps around its end. At
//!   unmount, [`Journal::mark_empty`] leaves `s_start = 0`.
//! - A block freed while a copy of it is in the live log gets a revoke
//!   record in the transaction that frees it ([`Journal::is_logged`]), so
//!   that replay never writes the old copy over the block's next user.
//!
//! Recovery replays every committed transaction from the tail, honouring
//! revoke records, whoever wrote them (Linux, e2fsprogs or folio).

// jbd2 stores every integer big-endian.
#![allow(clippy::big_endian_bytes)]

pub mod format;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use folio_blockdev::BlockDevice;

use format::*;

/// Journal errors.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    Io(io::Error),
    /// The journal is inconsistent in a way recovery cannot pass over.
    Corrupted(String),
    /// A feature this implementation does not replay.
    Unsupported(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "journal I/O error: {e}"),
            Error::Corrupted(s) => write!(f, "journal corrupted: {s}"),
            Error::Unsupported(s) => write!(f, "journal feature not supported: {s}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Committed transactions found and replayed.
    pub transactions: u32,
    pub blocks_replayed: u64,
    /// Journalled blocks skipped because a later revoke record covers them.
    pub blocks_revoked: u64,
    /// Why the scan stopped (end of log, torn transaction, ...).
    pub stopped_because: String,
    /// Fast commits replayed after the last full commit (ext4's
    /// fast-commit area; the filesystem fills this in).
    pub fast_commits: u32,
    /// Their records (inodes, ranges, directory entries).
    pub fast_commit_records: u32,
}

struct Txn {
    seq: u32,
    /// (target block, flags, journal logical block of the copy)
    blocks: Vec<(u64, u32, u64)>,
    revokes: Vec<u64>,
}

/// An open journal.
pub struct Journal {
    dev: Arc<dyn BlockDevice>,
    map: Vec<u64>,
    bs: usize,
    fs_blocks: u64,
    sb: JSuperblock,
    /// Next log block to write while transactions are live.
    head: u64,
    /// Log blocks used by committed transactions not yet checkpointed.
    used: u64,
    /// Committed transactions not yet checkpointed (the first one has the
    /// superblock's `s_sequence`).
    live_txns: u32,
    /// Latest live copy of each journalled block.
    logged: HashMap<u64, LoggedCopy>,
    stats: JournalStats,
}

impl Journal {
    /// Open the journal whose blocks are `map` on `dev`. `fs_blocks` bounds
    /// the block numbers a transaction may name.
    pub fn load(
        dev: Arc<dyn BlockDevice>,
        map: Vec<u64>,
        block_size: usize,
        fs_blocks: u64,
    ) -> Result<Self> {
        let first = *map
            .first()
            .ok_or_else(|| Error::Corrupted("journal has no blocks".into()))?;
        let mut raw = vec![0u8; block_size];
        dev.read_at(first * block_size as u64, &mut raw)?;
        let sb = JSuperblock { raw };
        if sb.magic() != MAGIC {
            return Err(Error::Corrupted("bad journal superblock magic".into()));
        }
        if sb.blocktype() != SUPERBLOCK_V2 && sb.blocktype() != SUPERBLOCK_V1 {
            return Err(Error::Corrupted(format!(
                "unknown journal superblock type {}",
                sb.blocktype()
            )));
        }
        if sb.block_size() as usize != block_size {
            return Err(Error::Corrupted(
                "journal block size differs from the filesystem's".into(),
            ));
        }
        let maxlen = sb.maxlen() as usize;
        if maxlen > map.len() || maxlen < 16 || sb.first() == 0 || sb.first() as usize >= maxlen {
            return Err(Error::Corrupted(
                "journal length or first block out of range".into(),
            ));
        }
        if sb.log_end() < sb.first().saturating_add(16) {
            return Err(Error::Corrupted(format!(
                "the fast-commit area ({} blocks) leaves no room for the log",
                sb.fast_commit_blocks()
            )));
        }
        if sb.blocktype() == SUPERBLOCK_V2 {
            let unknown = sb.feature_incompat() & !INCOMPAT_SUPPORTED;
            if unknown != 0 {
                return Err(Error::Unsupported(format!(
                    "jbd2 incompatible feature bits {unknown:#x}"
                )));
            }
            if sb.csum_v2or3() {
                if sb.checksum_type() != CSUM_TYPE_CRC32C {
                    return Err(Error::Unsupported("journal checksum type".into()));
                }
                if sb.compute_checksum() != sb.checksum() {
                    return Err(Error::Corrupted(
                        "journal superblock checksum mismatch".into(),
                    ));
                }
            }
        }
        if sb.start() != 0 && (sb.start() < sb.first() || sb.start() >= sb.log_end()) {
            return Err(Error::Corrupted("journal start out of range".into()));
        }
        let head = u64::from(sb.first());
        Ok(Journal {
            dev,
            map,
            bs: block_size,
            fs_blocks,
            sb,
            head,
            used: 0,
            live_txns: 0,
            logged: HashMap::new(),
            stats: JournalStats::default(),
        })
    }

    /// True if the log holds transactions that may need replay.
    pub fn needs_recovery(&self) -> bool {
        self.sb.start() != 0
    }

    pub fn superblock(&self) -> &JSuperblock {
        &self.sb
    }

    fn read_log(&self, lblk: u64) -> Result<Vec<u8>> {
        let p = self.map[lblk as usize];
        let mut b = vec![0u8; self.bs];
        self.dev.read_at(p * self.bs as u64, &mut b)?;
        Ok(b)
    }

    fn write_log(&self, lblk: u64, data: &[u8]) -> Result<()> {
        let p = self.map[lblk as usize];
        self.dev.write_at(p * self.bs as u64, data)?;
        Ok(())
    }

    fn next(&self, lblk: u64) -> u64 {
        let n = lblk + 1;
        if n >= u64::from(self.sb.log_end()) {
            u64::from(self.sb.first())
        } else {
            n
        }
    }

    fn write_sb(&mut self) -> Result<()> {
        self.sb.update_checksum();
        let raw = self.sb.raw.clone();
        self.write_log(0, &raw)
    }

    /// Scan the log for committed transactions (jbd2's PASS_SCAN).
    fn scan(&self) -> Result<(Vec<Txn>, String)> {
        let csum = self.sb.csum_v2or3();
        let v3 = self.sb.has_incompat(INCOMPAT_CSUM_V3);
        let seed = self.sb.csum_seed();
        let bit64 = self.sb.has_incompat(INCOMPAT_64BIT);
        let mut seq = self.sb.sequence();
        let mut pos = u64::from(self.sb.start());
        let mut txns = Vec::new();
        let mut cur = Txn {
            seq,
            blocks: Vec::new(),
            revokes: Vec::new(),
        };
        let limit = u64::from(self.sb.maxlen()) * 2;
        let mut steps = 0u64;
        let why = loop {
            steps += 1;
            if steps > limit {
                break "the log wrapped without an end".to_string();
            }
            let b = self.read_log(pos)?;
            let Some((kind, bseq)) = header(&b) else {
                break format!("no journal block at log block {pos}");
            };
            if bseq != seq {
                break format!("sequence {bseq} where {seq} was expected");
            }
            match kind {
                DESCRIPTOR => {
                    if csum
                        && block_tail_csum(seed, &b) != be32(&b, self.bs - TAIL_LEN).unwrap_or(0)
                    {
                        break format!("descriptor checksum mismatch in transaction {seq}");
                    }
                    let Some(tags) = parse_tags(&b, &self.sb) else {
                        break format!("malformed descriptor in transaction {seq}");
                    };
                    let mut torn = None;
                    for t in tags {
                        pos = self.next(pos);
                        if t.blocknr >= self.fs_blocks {
                            return Err(Error::Corrupted(format!(
                                "transaction {seq} names block {} beyond the filesystem",
                                t.blocknr
                            )));
                        }
                        if csum {
                            let data = self.read_log(pos)?;
                            let mut c = data_csum(seed, seq, &data);
                            if !v3 {
                                c &= 0xFFFF;
                            }
                            if c != t.checksum {
                                torn = Some(t.blocknr);
                            }
                        }
                        cur.blocks.push((t.blocknr, t.flags, pos));
                    }
                    if let Some(blk) = torn {
                        break format!(
                            "transaction {seq} is torn (copy of block {blk} fails its checksum)"
                        );
                    }
                    pos = self.next(pos);
                }
                REVOKE => {
                    if csum
                        && block_tail_csum(seed, &b) != be32(&b, self.bs - TAIL_LEN).unwrap_or(0)
                    {
                        break format!("revoke block checksum mismatch in transaction {seq}");
                    }
                    let count = be32(&b, 12).unwrap_or(0) as usize;
                    let rec = if bit64 { 8 } else { 4 };
                    let end = count.min(self.bs - if csum { TAIL_LEN } else { 0 });
                    let mut off = 16;
                    while off + rec <= end {
                        let v = if bit64 {
                            u64::from(be32(&b, off).unwrap_or(0)) << 32
                                | u64::from(be32(&b, off + 4).unwrap_or(0))
                        } else {
                            u64::from(be32(&b, off).unwrap_or(0))
                        };
                        cur.revokes.push(v);
                        off += rec;
                    }
                    pos = self.next(pos);
                }
                COMMIT => {
                    if csum && commit_csum(seed, &b) != be32(&b, 0x10).unwrap_or(0) {
                        break format!("commit block checksum mismatch in transaction {seq}");
                    }
                    txns.push(std::mem::replace(
                        &mut cur,
                        Txn {
                            seq: seq.wrapping_add(1),
                            blocks: Vec::new(),
                            revokes: Vec::new(),
                        },
                    ));
                    seq = seq.wrapping_add(1);
                    pos = self.next(pos);
                }
                other => break format!("unknown journal block type {other}"),
            }
        };
        Ok((txns, why))
    }

    /// Replay committed transactions, honouring revokes, then mark the
    /// journal empty. Writes go straight to the device and are flushed.
    /// (A filesystem with fast commits calls [`Journal::replay`],
    /// replays [`Journal::fast_commit_area`] and then
    /// [`Journal::finish_recovery`] instead.)
    pub fn recover(&mut self) -> Result<RecoveryReport> {
        let (report, end) = self.replay()?;
        if let Some(end) = end {
            self.finish_recovery(end)?;
        }
        Ok(report)
    }

    /// [`Journal::recover`] without its last step: replay the committed
    /// transactions and flush, but leave the log as it is. Returns the
    /// report and the sequence the next transaction would have had (the
    /// one a fast commit written after the last full commit carries), or
    /// `None` if the journal was empty.
    pub fn replay(&mut self) -> Result<(RecoveryReport, Option<u32>)> {
        let mut report = RecoveryReport::default();
        if !self.needs_recovery() {
            report.stopped_because = "journal is empty".into();
            return Ok((report, None));
        }
        let (txns, why) = self.scan()?;
        report.stopped_because = why;
        // PASS_REVOKE: the newest transaction revoking each block.
        let mut revoked: HashMap<u64, u32> = HashMap::new();
        for t in &txns {
            for &b in &t.revokes {
                let e = revoked.entry(b).or_insert(t.seq);
                if t.seq.wrapping_sub(*e) as i32 > 0 {
                    *e = t.seq;
                }
            }
        }
        // PASS_REPLAY.
        for t in &txns {
            for &(target, flags, pos) in &t.blocks {
                if let Some(&r) = revoked.get(&target) {
                    if r.wrapping_sub(t.seq) as i32 >= 0 {
                        report.blocks_revoked += 1;
                        continue;
                    }
                }
                let mut data = self.read_log(pos)?;
                if flags & FLAG_ESCAPE != 0 {
                    put_be32(&mut data, 0, MAGIC);
                }
                self.dev.write_at(target * self.bs as u64, &data)?;
                report.blocks_replayed += 1;
            }
        }
        report.transactions = txns.len() as u32;
        self.dev.flush()?;
        let end = txns
            .last()
            .map_or(self.sb.sequence(), |t| t.seq.wrapping_add(1));
        Ok((report, Some(end)))
    }

    /// The fast-commit area of a journal with the fast-commit feature
    /// (the blocks after the log, in order), with the sequence its valid
    /// fast commits carry (`end`, from [`Journal::replay`]); `None`
    /// without the feature. What the tags in it mean is the filesystem's
    /// business (ext4's `fast_commit.h`).
    pub fn fast_commit_area(&self) -> Result<Option<Vec<Vec<u8>>>> {
        if self.sb.fast_commit_blocks() == 0 {
            return Ok(None);
        }
        let first = u64::from(self.sb.log_end()) + 1;
        let last = u64::from(self.sb.maxlen());
        (first..last)
            .map(|l| self.read_log(l))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Mark a replayed journal empty (`end` from [`Journal::replay`]):
    /// like jbd2, skip one past the first uncommitted sequence, so a torn
    /// transaction's leftovers — and fast commits already replayed — can
    /// never pass for the next one. The fast-commit feature is cleared
    /// with it (the kernel sets it again at its next mount; folio writes
    /// full commits only, over the whole log).
    pub fn finish_recovery(&mut self, end: u32) -> Result<()> {
        let next = end.wrapping_add(1);
        self.sb.set_start(0);
        self.sb.set_sequence(next);
        self.sb
            .set_feature_incompat(self.sb.feature_incompat() & !INCOMPAT_FAST_COMMIT);
        self.write_sb()?;
        self.dev.flush()?;
        Ok(())
    }

    /// Turn on the features folio writes with: checksums v3 and 64-bit
    /// block numbers when the filesystem has metadata_csum / 64bit, and
    /// revoke records, as Linux does when it mounts.
    pub fn set_write_features(&mut self, csum_v3: bool, bit64: bool) {
        let mut inc = self.sb.feature_incompat() | INCOMPAT_REVOKE;
        if csum_v3 {
            inc = (inc & !INCOMPAT_CSUM_V2) | INCOMPAT_CSUM_V3;
            self.sb.set_checksum_type(CSUM_TYPE_CRC32C);
            self.sb
                .set_feature_compat(self.sb.feature_compat() & !COMPAT_CHECKSUM);
        }
        if bit64 {
            inc |= INCOMPAT_64BIT;
        }
        self.sb.set_feature_incompat(inc);
        if self.sb.blocktype() == SUPERBLOCK_V1 {
            self.sb.set_blocktype(SUPERBLOCK_V2);
        }
    }

    fn tags_per_descriptor(&self) -> usize {
        let room =
            self.bs - HEADER_LEN - UUID_LEN - if self.sb.csum_v2or3() { TAIL_LEN } else { 0 };
        room / self.sb.tag_bytes()
    }

    fn revokes_per_block(&self) -> usize {
        let rec = if self.sb.has_incompat(INCOMPAT_64BIT) {
            8
        } else {
            4
        };
        let room = self.bs - 16 - if self.sb.csum_v2or3() { TAIL_LEN } else { 0 };
        room / rec
    }

    /// Log blocks between the superblock and the end of the journal.
    fn log_len(&self) -> u64 {
        u64::from(self.sb.log_end() - self.sb.first())
    }

    /// Log blocks a transaction of `blocks` copies and `revokes` revoke
    /// records takes (descriptors, copies, revoke blocks, commit block).
    pub fn blocks_needed(&self, blocks: usize, revokes: usize) -> u64 {
        let per = self.tags_per_descriptor();
        (blocks.div_ceil(per) + blocks + revokes.div_ceil(self.revokes_per_block()) + 1) as u64
    }

    /// Most blocks one transaction can carry (in an empty log).
    pub fn capacity_blocks(&self) -> usize {
        let log = self.log_len() as usize;
        let per = self.tags_per_descriptor();
        // descriptors + copies + commit block must fit in the log.
        (log.saturating_sub(2)) * per / (per + 1)
    }

    /// Does a transaction of this size fit in the free part of the log?
    /// If not, [`Journal::checkpoint_targets`] and
    /// [`Journal::checkpoint_done`] make room.
    pub fn fits(&self, blocks: usize, revokes: usize) -> bool {
        self.used + self.blocks_needed(blocks, revokes) < self.log_len()
    }

    /// Log blocks in use by committed transactions not yet checkpointed.
    pub fn used_blocks(&self) -> u64 {
        self.used
    }

    /// Counters since open.
    pub fn stats(&self) -> JournalStats {
        self.stats
    }

    /// Is a copy of `block` in the live log? When the filesystem frees
    /// such a block, the transaction that frees it must carry a revoke
    /// record for it (otherwise a replay could write that old copy over
    /// whatever the block holds next). Until that transaction commits the
    /// copy stays on the checkpoint list: the committed state still uses
    /// the block.
    pub fn is_logged(&self, block: u64) -> bool {
        self.logged.contains_key(&block)
    }

    /// Blocks whose latest committed copy is in the live log, with where:
    /// what a checkpoint must write in place (ascending block order).
    pub fn checkpoint_targets(&self) -> Vec<(u64, LoggedCopy)> {
        let mut v: Vec<(u64, LoggedCopy)> = self.logged.iter().map(|(&b, &c)| (b, c)).collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    }

    /// The committed contents of a block from its copy in the log.
    pub fn read_copy(&self, copy: LoggedCopy) -> Result<Vec<u8>> {
        let mut data = self.read_log(copy.pos)?;
        if copy.escaped {
            put_be32(&mut data, 0, MAGIC);
        }
        Ok(data)
    }

    /// Write one transaction holding `blocks` (target block, new contents)
    /// and `revokes`, and make it durable. It goes at the head of the log,
    /// after the transactions still waiting for their checkpoint; the
    /// caller makes room first when [`Journal::fits`] says no.
    ///
    /// Device writes: descriptor, copies and revoke blocks (and the journal
    /// superblock, if the log was empty), flush, commit block, flush. The
    /// first flush also makes file data written before it durable, which is
    /// what ordered mode needs.
    pub fn commit(&mut self, blocks: &[(u64, &[u8])], revokes: &[u64]) -> Result<()> {
        self.prepare_commit(blocks, revokes)?.write()
    }

    /// [`Journal::commit`] in two halves: lay the transaction out in the
    /// log and account it as committed in memory (head, live copies,
    /// statistics) now, and leave its device writes to the returned
    /// [`CommitWrite`], which needs nothing of the journal — so a
    /// filesystem can write it without its locks while the next
    /// transaction starts. Until the write has succeeded, the journal
    /// must not be checkpointed or committed to again; if it fails, the
    /// journal's memory is ahead of the device and the caller must stop
    /// using it (abort: the next open replays what did reach the log).
    pub fn prepare_commit(
        &mut self,
        blocks: &[(u64, &[u8])],
        revokes: &[u64],
    ) -> Result<CommitWrite> {
        if !self.fits(blocks.len(), revokes.len()) {
            return Err(Error::Corrupted(format!(
                "transaction of {} blocks and {} revokes does not fit in the {} free log blocks \
                 (checkpoint first)",
                blocks.len(),
                revokes.len(),
                self.log_len() - self.used
            )));
        }
        let seq = self.sb.sequence().wrapping_add(self.live_txns);
        let seed = self.sb.csum_seed();
        let csum = self.sb.csum_v2or3();
        let v3 = self.sb.has_incompat(INCOMPAT_CSUM_V3);
        let tb = self.sb.tag_bytes();
        let per = self.tags_per_descriptor();
        let mut out = CommitWrite {
            dev: Arc::clone(&self.dev),
            writes: Vec::with_capacity(blocks.len() + blocks.len().div_ceil(per) + 2),
            commit: (0, Vec::new()),
        };
        // A journal marked empty (s_start = 0, after an unmount or a
        // recovery) starts again at the first log block; otherwise the log
        // continues at the head, wrapping around its end.
        let was_empty = self.sb.start() == 0;
        if was_empty {
            self.head = u64::from(self.sb.first());
        }
        let start = self.head;
        let mut pos = start;
        let mut placed = Vec::with_capacity(blocks.len());
        for chunk in blocks.chunks(per) {
            let mut desc = vec![0u8; self.bs];
            write_header(&mut desc, DESCRIPTOR, seq);
            let desc_pos = pos;
            let desc_at = out.writes.len();
            out.writes.push((self.log_offset(desc_pos), Vec::new()));
            pos = self.next(pos);
            let mut off = HEADER_LEN;
            for (i, (target, data)) in chunk.iter().enumerate() {
                if data.len() != self.bs || *target >= self.fs_blocks {
                    return Err(Error::Corrupted(format!(
                        "bad journal write: block {target} of {} bytes",
                        data.len()
                    )));
                }
                let mut flags = 0;
                if i > 0 {
                    flags |= FLAG_SAME_UUID;
                }
                if i + 1 == chunk.len() {
                    flags |= FLAG_LAST_TAG;
                }
                let mut copy = data.to_vec();
                let escaped = be32(&copy, 0) == Some(MAGIC);
                if escaped {
                    flags |= FLAG_ESCAPE;
                    put_be32(&mut copy, 0, 0);
                }
                let mut c = if csum { data_csum(seed, seq, &copy) } else { 0 };
                if !v3 {
                    c &= 0xFFFF;
                }
                write_tag(
                    &mut desc,
                    off,
                    &self.sb,
                    &Tag {
                        blocknr: *target,
                        flags,
                        checksum: c,
                    },
                );
                off += tb;
                if i == 0 {
                    desc[off..off + UUID_LEN].copy_from_slice(&self.sb.uuid());
                    off += UUID_LEN;
                }
                out.writes.push((self.log_offset(pos), copy));
                placed.push((*target, LoggedCopy { pos, escaped }));
                pos = self.next(pos);
            }
            if csum {
                let c = block_tail_csum(seed, &desc);
                put_be32(&mut desc, self.bs - TAIL_LEN, c);
            }
            out.writes[desc_at].1 = desc;
        }
        let bit64 = self.sb.has_incompat(INCOMPAT_64BIT);
        let rec = if bit64 { 8 } else { 4 };
        for chunk in revokes.chunks(self.revokes_per_block()) {
            let mut rb = vec![0u8; self.bs];
            write_header(&mut rb, REVOKE, seq);
            let mut off = 16;
            for &b in chunk {
                if bit64 {
                    put_be32(&mut rb, off, (b >> 32) as u32);
                    put_be32(&mut rb, off + 4, b as u32);
                } else {
                    put_be32(&mut rb, off, b as u32);
                }
                off += rec;
            }
            put_be32(&mut rb, 12, off as u32);
            if csum {
                let c = block_tail_csum(seed, &rb);
                put_be32(&mut rb, self.bs - TAIL_LEN, c);
            }
            out.writes.push((self.log_offset(pos), rb));
            pos = self.next(pos);
        }
        if was_empty {
            // The superblock must point at the first live transaction
            // before its commit block can count.
            self.sb.set_start(start as u32);
            self.sb.set_sequence(seq);
            self.sb.update_checksum();
            out.writes.push((self.log_offset(0), self.sb.raw.clone()));
        }
        let mut commit = vec![0u8; self.bs];
        write_header(&mut commit, COMMIT, seq);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        commit[0x30..0x38].copy_from_slice(&now.as_secs().to_be_bytes());
        put_be32(&mut commit, 0x38, now.subsec_nanos());
        if csum {
            let c = commit_csum(seed, &commit);
            put_be32(&mut commit, 0x10, c);
        }
        out.commit = (self.log_offset(pos), commit);
        pos = self.next(pos);
        let len = self.blocks_needed(blocks.len(), revokes.len());
        self.used += len;
        self.head = pos;
        self.live_txns += 1;
        for b in revokes {
            self.logged.remove(b);
        }
        for (b, c) in placed {
            self.logged.insert(b, c);
        }
        self.stats.commits += 1;
        self.stats.blocks_logged += blocks.len() as u64;
        self.stats.revokes += revokes.len() as u64;
        Ok(out)
    }

    /// Device byte offset of log block `lblk`.
    fn log_offset(&self, lblk: u64) -> u64 {
        self.map[lblk as usize] * self.bs as u64
    }

    /// After the caller has written every checkpoint target in place and
    /// flushed: move the tail to the head, freeing the whole log, and make
    /// that durable (`s_start` = head, `s_sequence` = next transaction, as
    /// jbd2 writes it when nothing is left to checkpoint). The next commit
    /// continues at the head.
    pub fn checkpoint_done(&mut self) -> Result<()> {
        self.set_tail(self.head as u32)
    }

    /// After the caller has written every checkpoint target in place and
    /// flushed: mark the log empty (`s_start = 0`), as a clean unmount
    /// leaves it.
    pub fn mark_empty(&mut self) -> Result<()> {
        self.set_tail(0)?;
        self.head = u64::from(self.sb.first());
        Ok(())
    }

    fn set_tail(&mut self, start: u32) -> Result<()> {
        let next = self.sb.sequence().wrapping_add(self.live_txns);
        if self.live_txns == 0 && self.sb.start() == start {
            return Ok(());
        }
        self.sb.set_start(start);
        self.sb.set_sequence(next);
        self.write_sb()?;
        self.dev.flush()?;
        self.used = 0;
        self.live_txns = 0;
        self.logged.clear();
        self.stats.checkpoints += 1;
        Ok(())
    }
}

/// The device writes of one prepared commit ([`Journal::prepare_commit`]):
/// descriptors, copies, revoke blocks (and the journal superblock when the
/// log was empty), then a flush, the commit block, a flush.
#[must_use = "a prepared commit is durable only once written"]
pub struct CommitWrite {
    dev: Arc<dyn BlockDevice>,
    /// (device byte offset, bytes) before the first flush.
    writes: Vec<(u64, Vec<u8>)>,
    commit: (u64, Vec<u8>),
}

impl CommitWrite {
    /// Write the transaction and make it durable.
    pub fn write(self) -> Result<()> {
        for (off, data) in &self.writes {
            self.dev.write_at(*off, data)?;
        }
        self.dev.flush()?;
        self.dev.write_at(self.commit.0, &self.commit.1)?;
        self.dev.flush()?;
        Ok(())
    }
}

/// Where the latest committed copy of a block sits in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedCopy {
    /// Journal-relative log block.
    pub pos: u64,
    /// The copy's first word was escaped (it looked like a journal header).
    pub escaped: bool,
}

/// What the journal has done since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub commits: u64,
    pub checkpoints: u64,
    pub blocks_logged: u64,
    pub revokes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use folio_blockdev::MemDevice;

    fn new_journal(bs: usize, len: u32, features: (bool, bool)) -> (MemDevice, Journal) {
        // Filesystem blocks 0..64, journal at 64..64+len.
        let dev = MemDevice::new(bs * (64 + len as usize));
        let mut sb = vec![0u8; bs];
        write_header(&mut sb, SUPERBLOCK_V2, 0);
        put_be32(&mut sb, 0xC, bs as u32);
        put_be32(&mut sb, 0x10, len);
        put_be32(&mut sb, 0x14, 1);
        put_be32(&mut sb, 0x18, 7);
        sb[0x30..0x40].copy_from_slice(&[9; 16]);
        dev.write_at(64 * bs as u64, &sb).unwrap();
        let map = (64..64 + u64::from(len)).collect();
        let mut j = Journal::load(Arc::new(dev.clone()), map, bs, 64).unwrap();
        j.set_write_features(features.0, features.1);
        (dev, j)
    }

    #[test]
    fn committed_transactions_replay_and_uncommitted_do_not() {
        for features in [(false, false), (true, true), (true, false), (false, true)] {
            let bs = 1024;
            let (dev, mut j) = new_journal(bs, 64, features);
            let a = vec![0xAA; bs];
            let mut escaped = vec![0xBB; bs];
            escaped[..4].copy_from_slice(&MAGIC.to_be_bytes());
            j.commit(&[(3, &a), (5, &escaped)], &[]).unwrap();
            // Crash before checkpoint: recovery writes both blocks.
            let mut j2 = Journal::load(Arc::new(dev.clone()), (64..128).collect(), bs, 64).unwrap();
            assert!(j2.needs_recovery());
            let r = j2.recover().unwrap();
            assert_eq!(
                (r.transactions, r.blocks_replayed),
                (1, 2),
                "{features:?}: {r:?}"
            );
            let snap = dev.snapshot();
            assert_eq!(&snap[3 * bs..4 * bs], &a[..]);
            assert_eq!(&snap[5 * bs..6 * bs], &escaped[..]);
            assert!(!j2.needs_recovery());
            // A transaction without its commit block is not replayed.
            let (dev, mut j) = new_journal(bs, 64, features);
            j.commit(&[(3, &a)], &[]).unwrap();
            let commit_pos = 64 + 1 + 2; // sb, descriptor, copy, commit
            dev.write_at(commit_pos as u64 * bs as u64, &vec![0u8; bs])
                .unwrap();
            let mut j2 = Journal::load(Arc::new(dev.clone()), (64..128).collect(), bs, 64).unwrap();
            assert_eq!(j2.recover().unwrap().transactions, 0);
            assert!(dev.snapshot()[3 * bs..4 * bs].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn torn_copies_are_detected_with_checksums() {
        let bs = 1024;
        let (dev, mut j) = new_journal(bs, 64, (true, true));
        j.commit(&[(3, &vec![1u8; bs]), (4, &vec![2u8; bs])], &[])
            .unwrap();
        // Tear the second copy.
        dev.write_at((64 + 3) as u64 * bs as u64, &vec![7u8; 512])
            .unwrap();
        let mut j2 = Journal::load(Arc::new(dev.clone()), (64..128).collect(), bs, 64).unwrap();
        let r = j2.recover().unwrap();
        assert_eq!(r.transactions, 0, "{r:?}");
        assert!(r.stopped_because.contains("torn"));
    }

    #[test]
    fn hostile_superblocks_are_errors() {
        let bs = 1024;
        let (dev, _) = new_journal(bs, 64, (false, false));
        let map: Vec<u64> = (64..128).collect();
        put_be32_dev(&dev, 64 * bs + 0x10, 1_000_000);
        assert!(Journal::load(Arc::new(dev.clone()), map.clone(), bs, 64).is_err());
        put_be32_dev(&dev, 64 * bs + 0x10, 64);
        put_be32_dev(&dev, 64 * bs + 0x1C, 500);
        assert!(Journal::load(Arc::new(dev.clone()), map.clone(), bs, 64).is_err());
        put_be32_dev(&dev, 64 * bs + 0x1C, 0);
        put_be32_dev(&dev, 64 * bs + 0x28, 0x8000);
        assert!(matches!(
            Journal::load(Arc::new(dev), map, bs, 64),
            Err(Error::Unsupported(_))
        ));
    }

    /// A v1 superblock has no feature words: bytes there that look like
    /// the fast-commit bit and a 60-block area must not shorten the log
    /// (the fuzzer found a subtraction overflow in `log_len` this way),
    /// and a v2 one whose area leaves no log is refused.
    #[test]
    fn a_fast_commit_area_never_swallows_the_log() {
        let bs = 1024;
        let map: Vec<u64> = (64..128).collect();
        let (dev, _) = new_journal(bs, 64, (false, false));
        put_be32_dev(&dev, 64 * bs + 4, SUPERBLOCK_V1);
        put_be32_dev(&dev, 64 * bs + 0x28, INCOMPAT_FAST_COMMIT);
        put_be32_dev(&dev, 64 * bs + 0x54, 60);
        let mut j = Journal::load(Arc::new(dev.clone()), map.clone(), bs, 64).unwrap();
        assert_eq!(j.sb.log_end(), 64);
        j.commit(&[(3, &vec![1u8; bs])], &[]).unwrap();
        let (dev, _) = new_journal(bs, 64, (false, false));
        put_be32_dev(&dev, 64 * bs + 0x28, INCOMPAT_FAST_COMMIT);
        put_be32_dev(&dev, 64 * bs + 0x54, 60);
        assert!(matches!(
            Journal::load(Arc::new(dev), map, bs, 64),
            Err(Error::Corrupted(_))
        ));
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Write every checkpoint target in place from its log copy.
    fn checkpoint(dev: &MemDevice, j: &mut Journal, bs: usize) {
        for (b, c) in j.checkpoint_targets() {
            let data = j.read_copy(c).unwrap();
            dev.write_at(b * bs as u64, &data).unwrap();
        }
        dev.flush().unwrap();
        j.checkpoint_done().unwrap();
    }

    /// Recover a copy of `dev` and return the first byte of blocks 0..32.
    fn recovered_firsts(dev: &MemDevice, bs: usize, len: u64) -> Vec<u8> {
        let copy = MemDevice::from_bytes(dev.snapshot());
        let map = (64..64 + len).collect();
        let mut j = Journal::load(Arc::new(copy.clone()), map, bs, 64).unwrap();
        j.recover().unwrap();
        let snap = copy.snapshot();
        (0..32).map(|b| snap[b * bs]).collect()
    }

    #[test]
    fn the_log_wraps_and_replay_gives_the_newest_copies() {
        for features in [(false, false), (true, true), (true, false)] {
            let bs = 1024;
            let len = 40u32;
            let (dev, mut j) = new_journal(bs, len, features);
            let mut model = vec![0u8; 32];
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            let mut wraps = 0;
            for round in 0..300u32 {
                let n = 1 + (xorshift(&mut rng) % 6) as usize;
                let mut blocks: Vec<(u64, Vec<u8>)> = (0..n)
                    .map(|i| {
                        let b = xorshift(&mut rng) % 32;
                        let mut d = vec![(round % 251) as u8 + 1; bs];
                        d[1] = i as u8;
                        if b.is_multiple_of(5) {
                            // Looks like a journal block: must be escaped.
                            d[..4].copy_from_slice(&MAGIC.to_be_bytes());
                        }
                        (b, d)
                    })
                    .collect();
                blocks.sort_by_key(|x| x.0);
                blocks.dedup_by_key(|x| x.0);
                if !j.fits(blocks.len(), 0) {
                    checkpoint(&dev, &mut j, bs);
                }
                let before = j.head;
                let refs: Vec<(u64, &[u8])> = blocks.iter().map(|(b, d)| (*b, &d[..])).collect();
                j.commit(&refs, &[]).unwrap();
                if j.head < before {
                    wraps += 1;
                }
                for (b, d) in &blocks {
                    model[*b as usize] = d[0];
                }
                if round % 7 == 3 {
                    assert_eq!(
                        recovered_firsts(&dev, bs, u64::from(len)),
                        model,
                        "{features:?} round {round}"
                    );
                }
            }
            assert!(wraps >= 3, "{features:?}: the log wrapped {wraps} times");
            assert!(j.stats().checkpoints >= 3);
        }
    }

    #[test]
    fn revoke_records_stop_replay_of_freed_blocks() {
        for features in [(false, false), (true, true), (false, true)] {
            for revoke in [false, true] {
                let bs = 1024;
                let (dev, mut j) = new_journal(bs, 64, features);
                j.commit(&[(5, &vec![0xAA; bs])], &[]).unwrap();
                // Block 5 is freed and reused for file data, written in place.
                assert!(j.is_logged(5));
                let revokes: Vec<u64> = if revoke {
                    // Enough records to need several revoke blocks.
                    std::iter::once(5)
                        .chain((0..300).map(|i| 20 + i % 40))
                        .collect()
                } else {
                    Vec::new()
                };
                j.commit(&[(6, &vec![0xBB; bs])], &revokes).unwrap();
                assert_eq!(
                    j.is_logged(5),
                    !revoke,
                    "a committed revoke ends the copy's life"
                );
                dev.write_at(5 * bs as u64, &vec![0xDD; bs]).unwrap();
                dev.flush().unwrap();
                let firsts = recovered_firsts(&dev, bs, 64);
                assert_eq!(firsts[6], 0xBB, "{features:?}");
                let want = if revoke { 0xDD } else { 0xAA };
                assert_eq!(firsts[5], want, "{features:?} revoke={revoke}");
            }
        }
    }

    #[test]
    fn commits_take_two_flushes() {
        let bs = 1024;
        let (dev, _) = new_journal(bs, 64, (true, true));
        let crash = folio_blockdev::CrashDevice::new(dev.snapshot());
        let map: Vec<u64> = (64..128).collect();
        let mut j2 = Journal::load(Arc::new(crash.clone()), map, bs, 64).unwrap();
        j2.set_write_features(true, true);
        let flushes = |c: &folio_blockdev::CrashDevice| {
            c.events()
                .iter()
                .filter(|e| matches!(e, folio_blockdev::crash::Event::Flush))
                .count()
        };
        for i in 0..5u8 {
            let before = flushes(&crash);
            j2.commit(&[(u64::from(i), &vec![i; bs])], &[]).unwrap();
            assert_eq!(flushes(&crash) - before, 2, "commit {i}");
        }
    }

    fn put_be32_dev(dev: &MemDevice, off: usize, v: u32) {
        let mut b = [0u8; 4];
        put_be32(&mut b, 0, v);
        dev.write_at(off as u64, &b).unwrap();
    }
}
