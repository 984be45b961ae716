//! Directory blocks: linear entries, the htree root and index nodes.
#![no_main]

use folio_ext4::format::dirent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 64 {
        return;
    }
    let usable = data.len() - if dirent::has_tail(data) { 12 } else { 0 };
    for e in dirent::entries(data, usable).take(10_000) {
        let _ = e;
    }
    let _ = dirent::parse_entries(data, usable);
    if let Some(info) = dirent::parse_root_info(data) {
        let _ = info;
        let _ = dirent::parse_dx_entries(data, 0x20);
    }
    let _ = dirent::parse_dx_entries(data, 8);
    let _ = dirent::dx_csum(1, data, 8);
    let _ = dirent::dx_csum_stored(data, 0x20);
});
