//! How far a long operation has got (mkfs of a large image, a check), for
//! a caller that shows it; the library itself never prints.

use std::fmt;
use std::sync::Arc;

/// Called with `(done, total)` as the operation moves on, in its own unit
/// (block groups for mkfs and a check).
#[derive(Clone)]
pub struct Progress(Arc<dyn Fn(u64, u64) + Send + Sync>);

impl Progress {
    pub fn new(f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        Progress(Arc::new(f))
    }

    pub fn report(&self, done: u64, total: u64) {
        (self.0)(done, total)
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Progress")
    }
}
