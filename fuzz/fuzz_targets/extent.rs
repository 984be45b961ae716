//! Extent tree nodes (a block, or the 60 bytes of i_block).
#![no_main]

use folio_ext4::format::extent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, node)) = extent::parse_node(data) {
        let _ = extent::block_csum(7, data, h.max);
        let mut out = vec![0u8; data.len().max(12 + 12 * usize::from(h.max))];
        extent::write_node(&mut out, h.max, &node);
        let (h2, node2) = extent::parse_node(&out).expect("a written node parses");
        assert_eq!(h2.max, h.max);
        assert_eq!(format!("{node:?}"), format!("{node2:?}"));
    }
});
