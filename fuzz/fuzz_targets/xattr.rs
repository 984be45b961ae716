//! Extended attribute tables: in the inode body and in a block.
#![no_main]

use folio_ext4::format::xattr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // In-inode: entries after the 4-byte magic, values from there.
    let _ = xattr::parse_table(data, 4, 4);
    // Block: entries after the 32-byte header, values from the block start.
    if data.len() >= 32 {
        let _ = xattr::block_refcount(data);
        let _ = xattr::parse_table(data, 32, 0);
    }
});
