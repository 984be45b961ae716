//! Where an image lives: a file (or block device node) on this host, or
//! an export on an NBD server named by a URI
//! (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), which
//! every command accepts wherever it takes an image.
//!
//! An image on an NBD server has no host file to lock: two processes that
//! open it read-write at once would damage it, as two hosts mounting one
//! iSCSI disk would (ext4's answer, `mmp`, is not implemented yet).

use std::io;
use std::path::Path;
use std::sync::Arc;

use folio_blockdev::BlockDevice;
use folio_ext4::{Filesystem, OpenOptions};
use folio_nbd::{NbdDevice, NbdUri};

/// The NBD URI `image` names, if it is one.
pub fn nbd_uri(image: &Path) -> Option<Result<NbdUri, String>> {
    let s = image.to_str()?;
    NbdUri::looks_like(s).then(|| NbdUri::parse(s))
}

/// Is `image` an NBD URI rather than a host path?
pub fn is_nbd(image: &Path) -> bool {
    nbd_uri(image).is_some()
}

/// Connect to the NBD export `image` names.
pub fn connect(image: &Path, read_only: bool) -> io::Result<Option<NbdDevice>> {
    match nbd_uri(image) {
        None => Ok(None),
        Some(Err(e)) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        Some(Ok(uri)) => NbdDevice::connect(&uri, read_only).map(Some),
    }
}

/// Open the filesystem in `image`: a host file through
/// [`Filesystem::open_path`] (which locks it), an NBD export through
/// [`Filesystem::open`] on an [`NbdDevice`].
pub fn open(image: &Path, opts: OpenOptions) -> folio_ext4::Result<Filesystem> {
    match connect(image, opts.read_only)? {
        Some(dev) => Filesystem::open(Arc::new(dev) as Arc<dyn BlockDevice>, opts),
        None => Filesystem::open_path(image, opts),
    }
}
