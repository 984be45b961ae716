//! The checksum functions ext4 uses.
//!
//! ext4's `ext4_chksum(seed, data)` is the raw CRC32C register update: no
//! inversion before or after. The `crc32c` crate computes the standard CRC
//! (inverted in and out), so `raw(seed, d) = !crc32c_append(!seed, d)`.

/// Raw CRC32C update as ext4 and jbd2 use it.
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// CRC16 (ANSI, reflected polynomial 0xA001) as used by `uninit_bg`
/// (gdt_csum) group descriptor checksums.
pub fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_raw_matches_known_vector() {
        // Standard CRC32C("123456789") = 0xE3069283; raw with seed ~0 is its
        // complement.
        assert_eq!(crc32c_raw(!0, b"123456789"), !0xE306_9283);
        // Chaining equals one pass.
        let a = crc32c_raw(!0, b"1234");
        assert_eq!(crc32c_raw(a, b"56789"), crc32c_raw(!0, b"123456789"));
    }

    #[test]
    fn crc16_known_vector() {
        // CRC-16/ARC("123456789") = 0xBB3D (init 0).
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
    }
}
