//! A lock-order checker for debug builds (a small lockdep).
//!
//! folio's lock order, outermost first (docs/architecture.md):
//!
//! freeze > inodes in ascending number order > core > mapping
//! invalidation > transaction start > folio locks in ascending index
//! order > an inode's data lock > allocator
//!
//! Each thread keeps the list of what it holds. Taking a lock of a level
//! at or above one already held (or a folio at or below a held folio's
//! index) panics with both names: a violation fails the test that runs it
//! instead of deadlocking some day under load. Non-blocking acquisitions
//! (`try_lock`) cannot deadlock and are recorded without the check. In
//! release builds every call compiles to nothing.

/// Lock levels, outermost first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// A filesystem freeze (none yet: reserved for the order).
    Freeze,
    /// An inode (its i_rwsem); the key is the inode number, several only
    /// in ascending order.
    Inode,
    /// The filesystem's core lock (its metadata state; `folio_ext4::api`).
    Core,
    /// A mapping's invalidation (truncate, hole punch, direct I/O).
    Invalidate,
    /// A journal handle: the start of a transaction's share.
    Transaction,
    /// A folio lock; the key is the folio's index.
    Folio,
    /// An inode's data lock (its block-map state: extent map, delayed
    /// allocations; the role of ext4's `i_data_sem`); the key is the inode
    /// number. One at a time.
    InodeData,
    /// The block allocator.
    Allocator,
}

#[cfg(debug_assertions)]
mod imp {
    use super::Level;
    use std::cell::RefCell;

    thread_local! {
        static HELD: RefCell<Vec<(Level, u64)>> = const { RefCell::new(Vec::new()) };
    }

    pub fn acquire(level: Level, key: u64, checked: bool) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if checked {
                for &(l, k) in h.iter() {
                    let ascending = matches!(level, Level::Folio | Level::Inode);
                    let ok = l < level || (ascending && l == level && k < key);
                    if !ok {
                        panic!(
                            "lock order violation: taking {level:?} {key} while holding {l:?} {k} \
                             (order: freeze > inodes ascending > core > invalidate > transaction > folios \
                             ascending > inode data > allocator)"
                        );
                    }
                }
            }
            h.push((level, key));
        });
    }

    pub fn release(level: Level, key: u64) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|&e| e == (level, key)) {
                h.remove(i);
            }
        });
    }

    pub fn held() -> Vec<(Level, u64)> {
        HELD.with(|h| h.borrow().clone())
    }
}

#[cfg(not(debug_assertions))]
mod imp {
    use super::Level;
    #[inline]
    pub fn acquire(_: Level, _: u64, _: bool) {}
    #[inline]
    pub fn release(_: Level, _: u64) {}
    pub fn held() -> Vec<(Level, u64)> {
        Vec::new()
    }
}

/// Record that this thread takes `level` (`key`: a folio index, or 0),
/// checking the order first (debug builds).
pub fn acquire(level: Level, key: u64) {
    imp::acquire(level, key, true);
}

/// Record a non-blocking acquisition (no order check).
pub fn acquire_nonblocking(level: Level, key: u64) {
    imp::acquire(level, key, false);
}

/// Record that this thread released `level`/`key`.
pub fn release(level: Level, key: u64) {
    imp::release(level, key);
}

/// Take and release at once: checks that `level` may be taken here (for
/// locks held only inside one call, like the allocator).
pub fn check(level: Level, key: u64) {
    imp::acquire(level, key, true);
    imp::release(level, key);
}

/// What this thread holds (empty in release builds).
pub fn held() -> Vec<(Level, u64)> {
    imp::held()
}

/// Holds a level until dropped.
#[must_use = "the level is released when this is dropped"]
pub struct Held {
    level: Level,
    key: u64,
}

impl Held {
    /// Take `level` (checked) until the returned value is dropped.
    pub fn take(level: Level, key: u64) -> Held {
        acquire(level, key);
        Held { level, key }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        release(self.level, self.key);
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn the_documented_order_passes() {
        let _i = Held::take(Level::Inode, 0);
        let _t = Held::take(Level::Transaction, 0);
        let _a = Held::take(Level::Folio, 3);
        let _b = Held::take(Level::Folio, 7);
        check(Level::Allocator, 0);
        drop(_b);
        assert_eq!(held().len(), 4 - 1);
    }

    #[test]
    #[should_panic(expected = "lock order violation: taking Transaction 0 while holding Folio 5")]
    fn a_transaction_inside_a_folio_lock_panics() {
        let _f = Held::take(Level::Folio, 5);
        let _t = Held::take(Level::Transaction, 0);
    }

    #[test]
    #[should_panic(expected = "taking Folio 2 while holding Folio 5")]
    fn descending_folio_locks_panic() {
        let _a = Held::take(Level::Folio, 5);
        let _b = Held::take(Level::Folio, 2);
    }

    #[test]
    fn inodes_ascend_and_their_data_locks_do_not_nest() {
        let _a = Held::take(Level::Inode, 12);
        let _b = Held::take(Level::Inode, 40);
        let _f = Held::take(Level::Folio, 1);
        let _d = Held::take(Level::InodeData, 12);
        check(Level::Allocator, 0);
        let r = std::panic::catch_unwind(|| {
            let _e = Held::take(Level::InodeData, 40);
        });
        assert!(r.is_err(), "a second data lock must panic");
    }

    #[test]
    #[should_panic(expected = "taking Inode 7 while holding Inode 9")]
    fn descending_inode_locks_panic() {
        let _a = Held::take(Level::Inode, 9);
        let _b = Held::take(Level::Inode, 7);
    }

    #[test]
    fn try_locks_are_not_checked() {
        let _a = Held::take(Level::Folio, 5);
        acquire_nonblocking(Level::Folio, 2);
        release(Level::Folio, 2);
        assert_eq!(held(), vec![(Level::Folio, 5)]);
    }
}
