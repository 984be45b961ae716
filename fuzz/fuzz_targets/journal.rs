//! The jbd2 log on its own: the input is a whole journal (superblock
//! first), loaded and recovered onto a small in-memory device.
#![no_main]

use std::sync::Arc;

use folio_blockdev::{BlockDevice, MemDevice};
use folio_journal::format::JSuperblock;
use folio_journal::Journal;
use libfuzzer_sys::fuzz_target;

const BS: usize = 1024;
/// Filesystem blocks before the log, which replay may write.
const FS_BLOCKS: u64 = 64;

fuzz_target!(|data: &[u8]| {
    let blocks = data.len() / BS;
    if !(2..=1024).contains(&blocks) {
        return;
    }
    let mut log = data[..blocks * BS].to_vec();
    // Fit the superblock to the input (a seed cut from a longer journal)
    // and reseal it, so that mutations reach the log's blocks.
    let mut sb = JSuperblock {
        raw: log[..BS].to_vec(),
    };
    if sb.maxlen() as usize > blocks {
        sb.set_maxlen(blocks as u32);
    }
    sb.update_checksum();
    log[..BS].copy_from_slice(&sb.raw);
    let dev = MemDevice::new((FS_BLOCKS as usize + blocks) * BS);
    if dev.write_at(FS_BLOCKS * BS as u64, &log).is_err() {
        return;
    }
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let map = (FS_BLOCKS..FS_BLOCKS + blocks as u64).collect();
    let Ok(mut j) = Journal::load(dev, map, BS, FS_BLOCKS) else {
        return;
    };
    let _ = j.needs_recovery();
    if j.recover().is_ok() {
        let _ = j.commit(&[(3, &[7u8; BS][..])], &[5]);
    }
});
