//! Data transforms applied between an NBD client and the file behind an
//! export, as the loop driver's transfer functions were (seed 001): what
//! the client sees is plaintext, what the file holds is transformed.
//!
//! - `xor:BYTE`: every byte xored with BYTE (the loop driver's toy
//!   `xor` transfer; for tests and demonstrations, not secrecy).
//! - `aes-xts-plain64:KEYFILE`: AES in XTS mode over 512-byte sectors,
//!   with the sector number from the start of the file as the
//!   little-endian tweak, as dm-crypt's `aes-xts-plain64` lays a device
//!   out. A 32-byte key file gives AES-128-XTS (cryptsetup's
//!   `--key-size 256`), a 64-byte one AES-256-XTS (`--key-size 512`).
//!
//! Transforms work in place on the caller's buffer: the export applies
//! them to bounce buffers drawn from a pool reserved at start (see
//! [`crate::BouncePool`]), so no write needs new memory on its way down.

use std::io;
use std::path::Path;

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes128, Aes256};

/// The sector size of the XTS transform (dm-crypt's default).
pub const XTS_SECTOR: u64 = 512;

pub enum Transform {
    Xor(u8),
    Aes128Xts(Box<Xts<Aes128>>),
    Aes256Xts(Box<Xts<Aes256>>),
}

/// XTS (IEEE 1619) over 512-byte sectors on the `aes` crate's block
/// cipher. The mode is ours — a few lines: the tweak is the sector number
/// encrypted with the second key, then multiplied by x in GF(2^128) per
/// 16-byte block — so that all 32 blocks of a sector go through the
/// cipher in one `encrypt_blocks` call, which AES-NI pipelines. The AES
/// itself is the crate's. Checked against the `xts-mode` crate and
/// Python's `cryptography` in the tests.
pub struct Xts<C> {
    data: C,
    tweak: C,
}

const BLOCKS_PER_SECTOR: usize = XTS_SECTOR as usize / 16;

/// Multiply by x in GF(2^128), little-endian as XTS defines it.
fn mul_x(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

impl<C: BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16>> Xts<C> {
    fn new(data: C, tweak: C) -> Self {
        Xts { data, tweak }
    }

    /// Encrypt or decrypt whole sectors in place; `buf` starts at sector
    /// `first`.
    fn apply(&self, first: u64, buf: &mut [u8], encrypt: bool) {
        let mut blocks = [GenericArray::<u8, U16>::default(); BLOCKS_PER_SECTOR];
        let mut tweaks = [0u128; BLOCKS_PER_SECTOR];
        for (n, sector) in buf.chunks_exact_mut(XTS_SECTOR as usize).enumerate() {
            let mut t = GenericArray::from(u128::from(first + n as u64).to_le_bytes());
            self.tweak.encrypt_block(&mut t);
            let mut t = u128::from_le_bytes(t.into());
            for (i, b) in sector.chunks_exact(16).enumerate() {
                let mut v = [0u8; 16];
                v.copy_from_slice(b);
                tweaks[i] = t;
                blocks[i] = GenericArray::from((u128::from_le_bytes(v) ^ t).to_le_bytes());
                t = mul_x(t);
            }
            if encrypt {
                self.data.encrypt_blocks(&mut blocks);
            } else {
                self.data.decrypt_blocks(&mut blocks);
            }
            for (i, b) in sector.chunks_exact_mut(16).enumerate() {
                let v = u128::from_le_bytes(blocks[i].into()) ^ tweaks[i];
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

impl std::fmt::Debug for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Transform {
    /// Parse `xor:BYTE` (decimal or 0x-hex) or `aes-xts-plain64:KEYFILE`.
    pub fn parse(spec: &str) -> io::Result<Transform> {
        let (kind, arg) = spec.split_once(':').ok_or_else(|| {
            invalid(format!(
                "transform {spec:?}: expected xor:BYTE or aes-xts-plain64:KEYFILE"
            ))
        })?;
        match kind {
            "xor" => {
                let v = match arg.strip_prefix("0x") {
                    Some(hex) => u8::from_str_radix(hex, 16),
                    None => arg.parse::<u8>(),
                }
                .map_err(|_| invalid(format!("transform xor:{arg}: BYTE must be 0..255")))?;
                Ok(Transform::Xor(v))
            }
            "aes-xts-plain64" => {
                Self::aes_xts(&std::fs::read(Path::new(arg)).map_err(|e| {
                    io::Error::new(e.kind(), format!("transform key file {arg}: {e}"))
                })?)
                .map_err(|e| invalid(format!("transform key file {arg}: {e}")))
            }
            _ => Err(invalid(format!(
                "unknown transform {kind:?} (known: xor, aes-xts-plain64)"
            ))),
        }
    }

    /// AES-XTS from a raw key: 32 bytes (two AES-128 keys) or 64 (two
    /// AES-256 keys), data key first and tweak key second, as dm-crypt.
    pub fn aes_xts(key: &[u8]) -> io::Result<Transform> {
        let bad = || invalid(format!("key is {} bytes; XTS needs 32 or 64", key.len()));
        match key.len() {
            32 => Ok(Transform::Aes128Xts(Box::new(Xts::new(
                Aes128::new_from_slice(&key[..16]).map_err(|_| bad())?,
                Aes128::new_from_slice(&key[16..]).map_err(|_| bad())?,
            )))),
            64 => Ok(Transform::Aes256Xts(Box::new(Xts::new(
                Aes256::new_from_slice(&key[..32]).map_err(|_| bad())?,
                Aes256::new_from_slice(&key[32..]).map_err(|_| bad())?,
            )))),
            _ => Err(bad()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Transform::Xor(v) => format!("xor:0x{v:02x}"),
            Transform::Aes128Xts(_) => "aes-xts-plain64 (AES-128)".into(),
            Transform::Aes256Xts(_) => "aes-xts-plain64 (AES-256)".into(),
        }
    }

    /// Offsets and lengths must be multiples of this.
    pub fn alignment(&self) -> u64 {
        match self {
            Transform::Xor(_) => 1,
            _ => XTS_SECTOR,
        }
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        let a = self.alignment();
        if !offset.is_multiple_of(a) || !(len as u64).is_multiple_of(a) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// Plaintext at byte `offset` of the file → what the file stores.
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let sector = offset / XTS_SECTOR;
        match self {
            Transform::Xor(v) => buf.iter_mut().for_each(|b| *b ^= v),
            Transform::Aes128Xts(x) => x.apply(sector, buf, true),
            Transform::Aes256Xts(x) => x.apply(sector, buf, true),
        }
        Ok(())
    }

    /// What the file stores at byte `offset` → plaintext.
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let sector = offset / XTS_SECTOR;
        match self {
            Transform::Xor(v) => buf.iter_mut().for_each(|b| *b ^= v),
            Transform::Aes128Xts(x) => x.apply(sector, buf, false),
            Transform::Aes256Xts(x) => x.apply(sector, buf, false),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_changes_the_bytes() {
        let key: Vec<u8> = (0..64u8).collect();
        for t in [
            Transform::Xor(0x5a),
            Transform::aes_xts(&key[..32]).unwrap(),
            Transform::aes_xts(&key).unwrap(),
        ] {
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut b = plain.clone();
            t.encrypt(8192, &mut b).unwrap();
            assert_ne!(b, plain, "{t:?}");
            t.decrypt(8192, &mut b).unwrap();
            assert_eq!(b, plain, "{t:?}");
        }
    }

    #[test]
    fn xts_sectors_are_independent_and_position_bound() {
        let t = Transform::aes_xts(&[3u8; 64]).unwrap();
        // Encrypting 2 sectors at once equals encrypting each on its own.
        let mut both = vec![0u8; 1024];
        t.encrypt(512 * 9, &mut both).unwrap();
        let mut second = vec![0u8; 512];
        t.encrypt(512 * 10, &mut second).unwrap();
        assert_eq!(&both[512..], &second[..]);
        // The same plaintext at another sector differs.
        assert_ne!(&both[..512], &second[..]);
        // Unaligned requests are refused, not panicked on.
        assert!(t.encrypt(100, &mut [0u8; 512]).is_err());
        assert!(t.encrypt(0, &mut [0u8; 100]).is_err());
    }

    /// Our XTS equals the `xts-mode` crate's (the reference), for both key
    /// sizes, at several sector numbers, both ways.
    #[test]
    fn xts_equals_the_reference_crate() {
        use xts_mode::{get_tweak_default, Xts128};
        let key: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        let plain: Vec<u8> = (0..8192u32).map(|i| (i * 131 % 251) as u8).collect();
        for first in [0u64, 1, 77, 1 << 33] {
            let ours = Transform::aes_xts(&key).unwrap();
            let mut a = plain.clone();
            ours.encrypt(first * XTS_SECTOR, &mut a).unwrap();
            let r = Xts128::<Aes256>::new(
                Aes256::new_from_slice(&key[..32]).unwrap(),
                Aes256::new_from_slice(&key[32..]).unwrap(),
            );
            let mut b = plain.clone();
            r.encrypt_area(&mut b, 512, u128::from(first), get_tweak_default);
            assert_eq!(a, b, "AES-256 from sector {first}");
            ours.decrypt(first * XTS_SECTOR, &mut a).unwrap();
            assert_eq!(a, plain);
            let ours = Transform::aes_xts(&key[..32]).unwrap();
            let mut a = plain.clone();
            ours.encrypt(first * XTS_SECTOR, &mut a).unwrap();
            let r = Xts128::<Aes128>::new(
                Aes128::new_from_slice(&key[..16]).unwrap(),
                Aes128::new_from_slice(&key[16..32]).unwrap(),
            );
            let mut b = plain.clone();
            r.encrypt_area(&mut b, 512, u128::from(first), get_tweak_default);
            assert_eq!(a, b, "AES-128 from sector {first}");
        }
    }

    #[test]
    fn parse_rejects_bad_specs() {
        assert!(matches!(
            Transform::parse("xor:0x41"),
            Ok(Transform::Xor(0x41))
        ));
        assert!(matches!(Transform::parse("xor:7"), Ok(Transform::Xor(7))));
        for bad in [
            "xor",
            "xor:300",
            "rot13:1",
            "aes-xts-plain64:/nonexistent/key",
        ] {
            assert!(Transform::parse(bad).is_err(), "{bad}");
        }
        assert!(Transform::aes_xts(&[0u8; 48]).is_err());
    }
}
