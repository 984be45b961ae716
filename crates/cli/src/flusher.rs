//! The flusher thread of a long-running server (the mount, the NBD
//! export): background writeback when dirty data passes the page cache's
//! background level (checked without the filesystem's lock), and every 5
//! seconds a commit like ext4's `commit=5`, which first writes back the
//! files dirty for 30 seconds or more (the kernel's
//! `dirty_expire_centisecs`). Data dirtied since stays cached until it
//! expires, an fsync, a sync, the dirty limits or the unmount.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use folio_ext4::Filesystem;

/// How long file data may stay dirty before the periodic commit writes
/// it back (the kernel's default `dirty_expire_centisecs`, 3000).
pub const DIRTY_EXPIRE: Duration = Duration::from_secs(30);

pub struct Flusher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Flusher {
    /// `on_attr_change`, if given, is told of each inode whose attributes
    /// the flusher's writeback changed behind its clients' backs
    /// (`Filesystem::take_attr_changes`).
    pub fn spawn(
        fs: Arc<Filesystem>,
        on_attr_change: Option<Arc<dyn Fn(u32) + Send + Sync>>,
    ) -> Flusher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let page_cache = fs.page_cache().clone();
            let tick = Duration::from_millis(100);
            let mut since_commit = Duration::ZERO;
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                since_commit += tick;
                let commit = since_commit >= Duration::from_secs(5);
                if !commit && !page_cache.over_background() {
                    continue;
                }
                let r = if commit {
                    since_commit = Duration::ZERO;
                    fs.commit_expired(DIRTY_EXPIRE)
                } else {
                    fs.writeback_background().map(drop)
                };
                if let Err(e) = r {
                    eprintln!("folio: background writeback failed: {e}");
                }
                if let Some(f) = &on_attr_change {
                    fs.take_attr_changes().into_iter().for_each(|ino| f(ino));
                }
            }
        });
        Flusher { stop, thread }
    }

    /// Stop and wait for the thread (it lets go of the filesystem).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
