//! Encrypted directories, files and symlinks without their keys (fscrypt,
//! issue 18), as the kernel shows them when no key has been added.
//!
//! folio holds no keys: an image with the `encrypt` feature opens
//! read-write, everything unencrypted in it stays fully usable, and what
//! fscrypt encrypted is shown the way the kernel shows it with no key:
//!
//! - an encrypted directory lists its entries under **no-key names**:
//!   base64url (RFC 4648, no padding) of the directory hash pair (8
//!   bytes), then the ciphertext name; a ciphertext longer than 149 bytes
//!   keeps its first 149 bytes and the SHA-256 of the rest (the kernel's
//!   `struct fscrypt_nokey_name`). The hash pair is the htree hash of the
//!   ciphertext where the kernel's readdir takes the htree path
//!   (`is_dx_dir`: dir_index, and an indexed, inline or one-block
//!   directory), else zeros. "." and ".." are stored in the clear;
//! - a lookup of a no-key name finds the entry (the short form by its
//!   ciphertext, the long one by its prefix and digest), so stat, unlink
//!   and rmdir work on what readdir listed, as on the kernel;
//! - an encrypted symlink reads back as the no-key name of its ciphertext
//!   target (hash pair zero), and stat gives that string's length;
//! - what needs the key is ENOKEY, as the kernel answers: opening,
//!   reading, writing or truncating an encrypted file, and adding a name
//!   to an encrypted directory (create, mkdir, mknod, symlink, link, and
//!   rename into or out of one). The encryption context (xattr index 9)
//!   is never listed.
//!
//! Nothing encrypted is ever written: removal rewrites only a directory's
//! entry chain, exactly as the kernel's no-key unlink does.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::dir::DirEntry;
use crate::error::{Error, Result};
use crate::format::dirent::parse_root_info;
use crate::format::inode::{Inode, FL_INDEX};
use crate::format::superblock::compat;
use crate::fs::Core;

/// EXT4_ENCRYPT_FL: the inode's contents (or names, or target) are
/// encrypted.
pub const FL_ENCRYPT: u32 = 0x800;
/// Ciphertext bytes a no-key name carries before it switches to a digest.
const NOKEY_BYTES: usize = 149;
/// The hash pair that leads a no-key name.
const NOKEY_HASH: usize = 8;
/// The long form: hash pair, 149 bytes, SHA-256 of the rest.
const NOKEY_MAX: usize = NOKEY_HASH + NOKEY_BYTES + 32;
/// fscrypt pads ciphertext names to at least one AES block.
const MIN_CIPHERTEXT: usize = 16;

/// Whether `inode` is encrypted (EXT4_ENCRYPT_FL).
pub fn is_encrypted(inode: &Inode) -> bool {
    inode.flags() & FL_ENCRYPT != 0
}

/// ENOKEY for what needs `inode`'s key.
pub(crate) fn need_key(inode: &Inode, what: &str) -> Result<()> {
    if is_encrypted(inode) {
        return Err(Error::NoKey(format!(
            "inode {} is encrypted and folio holds no keys: cannot {what}",
            inode.ino
        )));
    }
    Ok(())
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding.
pub fn base64url_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize]);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize]);
    }
    out
}

/// The inverse of [`base64url_encode`]; `None` for a character outside
/// the alphabet or leftover bits that are not zero (the kernel's
/// `fscrypt_base64url_decode` refuses both).
pub fn base64url_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = ((acc << 6) | v) & 0xFFFF;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if acc & ((1 << bits) - 1) != 0 {
        return None;
    }
    Some(out)
}

/// The no-key name of ciphertext `name` with hash pair `(hash, minor)`.
pub fn nokey_name(name: &[u8], hash: u32, minor: u32) -> Vec<u8> {
    let mut raw = Vec::with_capacity(NOKEY_MAX);
    raw.extend_from_slice(&hash.to_le_bytes());
    raw.extend_from_slice(&minor.to_le_bytes());
    if name.len() <= NOKEY_BYTES {
        raw.extend_from_slice(name);
    } else {
        raw.extend_from_slice(&name[..NOKEY_BYTES]);
        raw.extend_from_slice(&Sha256::digest(&name[NOKEY_BYTES..]));
    }
    base64url_encode(&raw)
}

/// What a no-key name given to a lookup stands for.
#[derive(Debug, PartialEq, Eq)]
pub enum NoKey {
    /// The whole ciphertext.
    Exact(Vec<u8>),
    /// A long ciphertext: its first 149 bytes and the SHA-256 of the rest.
    Long { prefix: Vec<u8>, digest: [u8; 32] },
}

/// Decode a no-key name; `None` if it cannot be one (as the kernel's
/// `fscrypt_setup_filename`: a short form holds 1 to 149 ciphertext
/// bytes, a long one exactly 149 and a digest).
pub fn parse_nokey(name: &[u8]) -> Option<NoKey> {
    if name.len() > NOKEY_MAX.div_ceil(3) * 4 {
        return None;
    }
    let raw = base64url_decode(name)?;
    if raw.len() > NOKEY_HASH && raw.len() <= NOKEY_HASH + NOKEY_BYTES {
        return Some(NoKey::Exact(raw[NOKEY_HASH..].to_vec()));
    }
    if raw.len() == NOKEY_MAX {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&raw[NOKEY_HASH + NOKEY_BYTES..]);
        return Some(NoKey::Long {
            prefix: raw[NOKEY_HASH..NOKEY_HASH + NOKEY_BYTES].to_vec(),
            digest,
        });
    }
    None
}

impl NoKey {
    /// Whether ciphertext `disk` is the name this stands for.
    fn matches(&self, disk: &[u8]) -> bool {
        match self {
            NoKey::Exact(n) => n == disk,
            NoKey::Long { prefix, digest } => {
                disk.len() > NOKEY_BYTES
                    && disk[..NOKEY_BYTES] == prefix[..]
                    && Sha256::digest(&disk[NOKEY_BYTES..])[..] == digest[..]
            }
        }
    }
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

impl Core {
    /// The on-disk name that `name`, as a caller gives it, stands for in
    /// `dir`: itself, or in an encrypted directory the ciphertext its
    /// no-key name encodes (`None`: it names nothing there).
    pub(crate) fn disk_name<'a>(
        &mut self,
        dir: &Inode,
        name: &'a [u8],
    ) -> Result<Option<Cow<'a, [u8]>>> {
        if !is_encrypted(dir) || is_dot(name) {
            return Ok(Some(Cow::Borrowed(name)));
        }
        match parse_nokey(name) {
            None => Ok(None),
            Some(NoKey::Exact(n)) => Ok(Some(Cow::Owned(n))),
            // The digest form cannot be hashed to a leaf: look at every
            // entry, as the kernel's match does within its probe.
            Some(long) => Ok(self
                .entries_of(dir)?
                .into_iter()
                .find(|e| !is_dot(&e.name) && long.matches(&e.name))
                .map(|e| Cow::Owned(e.name))),
        }
    }

    /// The hash version the kernel's readdir hashes an encrypted
    /// directory's names with, or `None` where it reads the directory
    /// linearly and the hash pair is zero (`is_dx_dir`).
    fn readdir_hash_version(&mut self, dir: &Inode) -> Result<Option<u8>> {
        if !self.sb.has_compat(compat::DIR_INDEX) {
            return Ok(None);
        }
        if dir.flags() & FL_INDEX != 0 {
            let (pblk, data) = self.read_dir_block(dir, 0)?;
            let info = parse_root_info(&data)
                .ok_or_else(|| Error::corrupted("htree root is truncated", pblk))?;
            return Ok(Some(info.hash_version));
        }
        if Self::is_inline(dir) || dir.size() == u64::from(self.geo.block_size) {
            return Ok(Some(self.sb.def_hash_version()));
        }
        Ok(None)
    }

    /// `entries` of encrypted directory `dir` under their no-key names.
    pub(crate) fn nokey_entries(
        &mut self,
        dir: &Inode,
        mut entries: Vec<DirEntry>,
    ) -> Result<Vec<DirEntry>> {
        let version = self.readdir_hash_version(dir)?;
        for e in &mut entries {
            if is_dot(&e.name) {
                continue;
            }
            if e.name.len() < MIN_CIPHERTEXT {
                return Err(Error::corrupted(
                    format!(
                        "encrypted directory {}: a {}-byte name is shorter than any ciphertext",
                        dir.ino,
                        e.name.len()
                    ),
                    0,
                ));
            }
            let (hash, minor) = match version {
                Some(v) => self.name_hash_pair(v, &e.name)?,
                None => (0, 0),
            };
            e.name = nokey_name(&e.name, hash, minor);
        }
        Ok(entries)
    }

    /// What readlink shows of an encrypted symlink whose stored target is
    /// `raw`: a little-endian length, then that many ciphertext bytes.
    pub(crate) fn nokey_target(ino: u32, raw: &[u8]) -> Result<Vec<u8>> {
        let bad = |why: &str| Error::corrupted(format!("encrypted symlink {ino}: {why}"), 0);
        let len = raw
            .get(..2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .ok_or_else(|| bad("no length"))?;
        let cipher = raw
            .get(2..2 + len)
            .filter(|c| c.len() >= MIN_CIPHERTEXT)
            .ok_or_else(|| bad("bad ciphertext length"))?;
        Ok(nokey_name(cipher, 0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips_and_refuses_what_the_kernel_refuses() {
        for n in 0..40usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base64url_encode(&data);
            assert_eq!(enc.len(), (n * 8).div_ceil(6));
            assert_eq!(base64url_decode(&enc).unwrap(), data);
        }
        // RFC 4648's example, in the url alphabet without padding.
        assert_eq!(base64url_encode(b"\xfb\xff\xbf"), b"-_-_");
        assert_eq!(base64url_encode(b"foob"), b"Zm9vYg");
        assert_eq!(base64url_decode(b"Zm9vYg").unwrap(), b"foob");
        // Leftover bits set, a padding character, a '/' of plain base64.
        assert!(base64url_decode(b"Zm9vYh").is_none());
        assert!(base64url_decode(b"Zm9vYg==").is_none());
        assert!(base64url_decode(b"ab/c").is_none());
    }

    #[test]
    fn nokey_names_short_and_long() {
        let short = vec![7u8; 32];
        let n = nokey_name(&short, 0x1234_5678, 0x9abc_def0);
        assert_eq!(n.len(), 54); // 40 bytes
        assert_eq!(parse_nokey(&n), Some(NoKey::Exact(short.clone())));
        let long: Vec<u8> = (0..208u32).map(|i| i as u8).collect();
        let n = nokey_name(&long, 1, 2);
        assert_eq!(n.len(), 252); // 189 bytes: the kernel's NAME_MAX fit
        let p = parse_nokey(&n).unwrap();
        assert!(p.matches(&long));
        let mut other = long.clone();
        other[200] ^= 1;
        assert!(!p.matches(&other), "the digest covers the tail");
        assert!(!p.matches(&long[..150]));
        // Sizes no name can have: the hash pair only, and between the
        // short and the long form.
        assert_eq!(parse_nokey(&base64url_encode(&[0u8; 8])), None);
        assert_eq!(parse_nokey(&base64url_encode(&[0u8; 170])), None);
        assert_eq!(parse_nokey(b"plain.txt"), None);
    }

    #[test]
    fn symlink_targets_need_a_whole_ciphertext() {
        let mut raw = vec![16u8, 0];
        raw.extend_from_slice(&[9u8; 16]);
        let t = Core::nokey_target(5, &raw).unwrap();
        assert!(t.starts_with(b"AAAAAAAAAAA"), "hash pair zero");
        assert!(Core::nokey_target(5, &raw[..10]).is_err());
        assert!(Core::nokey_target(5, &[4, 0, 1, 2, 3, 4]).is_err());
        assert!(Core::nokey_target(5, &[]).is_err());
    }
}
