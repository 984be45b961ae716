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

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use xts_mode::{get_tweak_default, Xts128};

/// The sector size of the XTS transform (dm-crypt's default).
pub const XTS_SECTOR: u64 = 512;

pub enum Transform {
    Xor(u8),
    Aes128Xts(Box<Xts128<Aes128>>),
    Aes256Xts(Box<Xts128<Aes256>>),
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
            32 => Ok(Transform::Aes128Xts(Box::new(Xts128::new(
                Aes128::new_from_slice(&key[..16]).map_err(|_| bad())?,
                Aes128::new_from_slice(&key[16..]).map_err(|_| bad())?,
            )))),
            64 => Ok(Transform::Aes256Xts(Box::new(Xts128::new(
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
        let sector = u128::from(offset / XTS_SECTOR);
        match self {
            Transform::Xor(v) => buf.iter_mut().for_each(|b| *b ^= v),
            Transform::Aes128Xts(x) => {
                x.encrypt_area(buf, XTS_SECTOR as usize, sector, get_tweak_default)
            }
            Transform::Aes256Xts(x) => {
                x.encrypt_area(buf, XTS_SECTOR as usize, sector, get_tweak_default)
            }
        }
        Ok(())
    }

    /// What the file stores at byte `offset` → plaintext.
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let sector = u128::from(offset / XTS_SECTOR);
        match self {
            Transform::Xor(v) => buf.iter_mut().for_each(|b| *b ^= v),
            Transform::Aes128Xts(x) => {
                x.decrypt_area(buf, XTS_SECTOR as usize, sector, get_tweak_default)
            }
            Transform::Aes256Xts(x) => {
                x.decrypt_area(buf, XTS_SECTOR as usize, sector, get_tweak_default)
            }
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
