//! Commits written without the core lock: the committing transaction.
//!
//! As in jbd2, a commit has a part that needs the filesystem's state and
//! a part that is only device I/O. [`Core::commit_begin`] runs under the
//! core lock: it settles ordered data, snapshots the dirty metadata
//! blocks with their versions, lays the transaction out in the log
//! ([`folio_journal::Journal::prepare_commit`]) and makes it the
//! *committing* transaction; the running transaction is empty again and
//! new handles start on it at once. The returned [`PreparedCommit`] is
//! written with the core lock released (descriptors and copies, flush,
//! commit block, flush). [`Core::finish_committing`], under the core lock
//! again, marks committed the blocks still at their snapshot version (a
//! block a new handle changed meanwhile stays dirty for the next
//! transaction; its committed bytes are in the log) and releases the
//! blocks the transaction freed for reuse.
//!
//! At most one transaction commits at a time. Everything that needs the
//! journal consistent with the device — the next commit, a checkpoint,
//! close — first finishes the committing one, waiting for its write if
//! it is still running (the writer needs no lock to complete it). An
//! fsync of an inode the committing transaction changed waits for it
//! (without the core lock) instead of committing again.
//!
//! A failed commit write aborts the journal: the writer reports the
//! error, whoever finishes the transaction turns the filesystem
//! read-only, and the next open replays what reached the log.

use std::collections::HashMap;
use std::io;
use std::sync::{mpsc, Arc, Condvar, Mutex};

use folio_journal::CommitWrite;

use crate::error::{Error, Result};
use crate::fs::Core;

/// The outcome of one committing transaction's write, for whoever
/// finishes it (a leaf lock: nothing is taken while it is held).
#[derive(Default)]
pub(crate) struct CommitSlot {
    /// Set once, when the write has ended; kept (any number of threads
    /// may wait for it, one finishes the transaction).
    done: Mutex<Option<std::result::Result<(), (io::ErrorKind, String)>>>,
    cv: Condvar,
}

impl CommitSlot {
    fn set(&self, r: &io::Result<()>) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_none() {
            *d = Some(match r {
                Ok(()) => Ok(()),
                Err(e) => Err((e.kind(), e.to_string())),
            });
        }
        self.cv.notify_all();
    }

    /// Has the write ended?
    fn is_done(&self) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Wait until the write has ended; its outcome.
    pub(crate) fn wait(&self) -> io::Result<()> {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*d {
                Some(Ok(())) => return Ok(()),
                Some(Err((kind, msg))) => return Err(io::Error::new(*kind, msg.clone())),
                None => d = self.cv.wait(d).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// The device writes of the committing transaction, to be done without
/// the core lock ([`PreparedCommit::write`]); then, under the lock,
/// [`Core::finish_committing`].
#[must_use = "a prepared commit must be written, then finished"]
pub(crate) struct PreparedCommit {
    write: Option<CommitWrite>,
    slot: Arc<CommitSlot>,
}

impl PreparedCommit {
    /// Write the transaction and make it durable. Needs no filesystem
    /// lock. The error, if any, is the caller's to report (the journal is
    /// aborted when the transaction is finished).
    pub(crate) fn write(mut self) -> Result<()> {
        let w = self.write.take().expect("written once");
        let r = w.write().map_err(|e| match e {
            folio_journal::Error::Io(e) => e,
            other => io::Error::other(other.to_string()),
        });
        self.slot.set(&r);
        r.map_err(Error::Io)
    }
}

impl Drop for PreparedCommit {
    /// Dropped unwritten (an early return, a panic): the transaction never
    /// becomes durable, so the journal must abort rather than wait for it.
    fn drop(&mut self) {
        if self.write.is_some() {
            self.slot.set(&Err(io::Error::other(
                "a prepared commit was dropped without being written",
            )));
        }
    }
}

/// The commit thread (jbd2's kjournald2): writes the commits that
/// handles start when they find the running transaction full, so that
/// the operation that found it full goes on at once on the next one.
/// Started at the first such commit; stopped (after its last write) when
/// the filesystem is dropped.
pub(crate) struct CommitThread {
    tx: Option<mpsc::Sender<PreparedCommit>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl CommitThread {
    fn spawn() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<PreparedCommit>();
        let handle = std::thread::Builder::new()
            .name("folio-commit".into())
            .spawn(move || {
                for p in rx {
                    // The outcome is in the slot, for the finisher.
                    let _ = p.write();
                }
            })?;
        Ok(CommitThread {
            tx: Some(tx),
            handle: Some(handle),
        })
    }
}

impl Drop for CommitThread {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The transaction being committed (see the module docs).
pub(crate) struct Committing {
    /// (block, version) of every block it logs.
    versions: Vec<(u64, u64)>,
    /// The blocks pinned (freed) when it was prepared: free for reuse once
    /// it is durable.
    freed: Vec<u64>,
    /// Inodes it changed → whether fdatasync needs the change.
    changes: HashMap<u32, bool>,
    slot: Arc<CommitSlot>,
}

/// What an fsync, sync or periodic commit has left to do after its step
/// under the core lock.
pub(crate) enum Durable {
    /// Nothing: what was asked for is durable.
    Done,
    /// Write this commit without the core lock, then finish it under it.
    Commit(PreparedCommit),
    /// Wait (without the core lock) for the committing transaction, then
    /// finish it and ask again.
    Wait(Arc<CommitSlot>),
    /// Flush the device (without the core lock): data written since the
    /// last flush needs it, and no commit will do it.
    Flush,
}

impl Core {
    /// Blocks the running transaction holds: the dirty blocks but those
    /// the committing transaction logs (a block both hold is counted once,
    /// for the committing one: an estimate for the commit limits).
    pub(crate) fn running_dirty(&self) -> usize {
        let committing = self.committing.as_ref().map_or(0, |c| c.versions.len());
        self.cache.dirty_count().saturating_sub(committing)
    }

    /// Start a commit of the running transaction (see the module docs).
    /// `Ok(None)` when it committed here already (nothing to commit, or
    /// one too large for a single log transaction, committed in parts
    /// under the lock). An I/O error aborts the journal.
    pub(crate) fn commit_begin(&mut self) -> Result<Option<PreparedCommit>> {
        let r = self.commit_begin_inner();
        if let Err(Error::Io(e)) = &r {
            self.abort_journal(e);
        }
        r
    }

    fn commit_begin_inner(&mut self) -> Result<Option<PreparedCommit>> {
        self.finish_committing()?;
        if !self.prepare_journalled_commit()? {
            return Ok(None);
        }
        let dirty = self.cache.dirty_blocks_versioned();
        if !self.journal_fits(dirty.len(), self.revokes.len()) {
            self.checkpoint()?;
        }
        if !self.journal_fits(dirty.len(), self.revokes.len()) {
            // Only an operation without a handle can build a transaction
            // this big: committed in parts, here.
            self.commit_in_parts()?;
            return Ok(None);
        }
        let refs: Vec<(u64, &[u8])> = dirty.iter().map(|(b, d, _)| (*b, d.as_slice())).collect();
        let j = self.journal.as_mut().expect("journalled");
        let write = j.prepare_commit(&refs, &self.revokes)?;
        self.revokes.clear();
        let slot = Arc::new(CommitSlot::default());
        self.committing = Some(Committing {
            versions: dirty.iter().map(|(b, _, v)| (*b, *v)).collect(),
            freed: self.pinned.iter().copied().collect(),
            changes: std::mem::take(&mut self.txn_changes),
            slot: Arc::clone(&slot),
        });
        Ok(Some(PreparedCommit {
            write: Some(write),
            slot,
        }))
    }

    fn journal_fits(&self, blocks: usize, revokes: usize) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| j.fits(blocks, revokes))
    }

    /// Finish the committing transaction, if there is one, waiting for its
    /// write (see the module docs). Its failure aborts the journal and is
    /// returned.
    pub(crate) fn finish_committing(&mut self) -> Result<()> {
        let Some(c) = self.committing.take() else {
            return Ok(());
        };
        match c.slot.wait() {
            Ok(()) => {
                self.cache.mark_committed_versions(&c.versions);
                for b in &c.freed {
                    self.pinned.remove(b);
                }
                self.inodes.space.set_pinned(self.pinned.len() as u64);
                Ok(())
            }
            Err(e) => {
                self.abort_journal(&e);
                Err(Error::Io(e))
            }
        }
    }

    /// The running transaction is full (a handle found no room for its
    /// credits, or one brought it to its limit): start its commit and
    /// leave the device writes to the commit thread. The next commit,
    /// checkpoint or fsync that needs it finishes it.
    pub(crate) fn commit_full(&mut self) -> Result<()> {
        let Some(p) = self.commit_begin()? else {
            return Ok(());
        };
        if self.commit_thread.is_none() {
            match CommitThread::spawn() {
                Ok(t) => self.commit_thread = Some(t),
                Err(_) => {
                    // No thread to be had: write it here.
                    let w = p.write();
                    return self.commit_written(w);
                }
            }
        }
        let tx = self
            .commit_thread
            .as_ref()
            .and_then(|t| t.tx.as_ref())
            .expect("the commit thread runs");
        if let Err(mpsc::SendError(p)) = tx.send(p) {
            let w = p.write();
            return self.commit_written(w);
        }
        Ok(())
    }

    /// Finish the committing transaction if its write has ended (cheap;
    /// taken with the core lock, so blocks it freed and logged are
    /// released soon after the commit thread wrote it).
    pub(crate) fn finish_if_written(&mut self) -> Result<()> {
        match &self.committing {
            Some(c) if c.slot.is_done() => self.finish_committing(),
            _ => Ok(()),
        }
    }

    /// Wait for a commit write still running (the commit thread's), so
    /// that nothing is written after the filesystem is dropped or
    /// abandoned.
    pub(crate) fn wait_commit_write(&self) {
        if let Some(c) = &self.committing {
            let _ = c.slot.wait();
        }
    }

    /// Finish a commit this thread wrote (`write` is its outcome).
    pub(crate) fn commit_written(&mut self, write: Result<()>) -> Result<()> {
        let f = self.finish_committing();
        write.and(f)
    }

    /// Run what `Durable` asks for while holding the core lock the whole
    /// time (internal callers that cannot release it).
    pub(crate) fn durable_locked(
        &mut self,
        mut step: impl FnMut(&mut Self) -> Result<Durable>,
    ) -> Result<()> {
        loop {
            match step(self)? {
                Durable::Done => return Ok(()),
                Durable::Commit(p) => {
                    let w = p.write();
                    return self.commit_written(w);
                }
                Durable::Wait(_) => self.finish_committing()?,
                Durable::Flush => return Ok(self.dev().flush()?),
            }
        }
    }

    /// The step under the core lock of a journalled sync or periodic
    /// commit: wait for a transaction still committing, else commit the
    /// running one.
    pub(crate) fn commit_step(&mut self) -> Result<Durable> {
        if let Some(c) = &self.committing {
            return Ok(Durable::Wait(Arc::clone(&c.slot)));
        }
        Ok(match self.commit_begin()? {
            Some(p) => Durable::Commit(p),
            None => Durable::Done,
        })
    }

    /// The step under the core lock of fsync/fdatasync of `ino` after its
    /// data was written back: commit the running transaction if it holds
    /// a change of the inode that `datasync` needs; wait for the
    /// committing one if that holds it; otherwise flush what was written
    /// since the last flush.
    pub(crate) fn fsync_step(&mut self, ino: u32, datasync: bool) -> Result<Durable> {
        let needs = |m: &HashMap<u32, bool>| m.get(&ino).is_some_and(|&ds| ds || !datasync);
        if needs(&self.txn_changes) {
            return self.commit_step();
        }
        if let Some(c) = &self.committing {
            if needs(&c.changes) {
                return Ok(Durable::Wait(Arc::clone(&c.slot)));
            }
        }
        Ok(if self.flush_needed() {
            Durable::Flush
        } else {
            Durable::Done
        })
    }
}
