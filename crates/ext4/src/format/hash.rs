//! Directory index (htree) name hashes: legacy, half-MD4 and TEA, each in
//! a signed-char and an unsigned-char flavour.

pub const LEGACY: u8 = 0;
pub const HALF_MD4: u8 = 1;
pub const TEA: u8 = 2;
pub const LEGACY_UNSIGNED: u8 = 3;
pub const HALF_MD4_UNSIGNED: u8 = 4;
pub const TEA_UNSIGNED: u8 = 5;
pub const SIPHASH: u8 = 6;

/// The largest 32-bit hash value, reserved to mean end of directory.
const EOF_32: u32 = 0x7fff_ffff;

fn char_val(c: u8, signed: bool) -> u32 {
    if signed {
        i32::from(c as i8) as u32
    } else {
        u32::from(c)
    }
}

fn legacy_hash(name: &[u8], signed: bool) -> u32 {
    let (mut h0, mut h1) = (0x12a3_fe2d_u32, 0x37ab_e8f9_u32);
    for &c in name {
        let mut h = h1.wrapping_add(h0 ^ char_val(c, signed).wrapping_mul(7_152_373));
        if h & 0x8000_0000 != 0 {
            h = h.wrapping_sub(0x7fff_ffff);
        }
        h1 = h0;
        h0 = h;
    }
    h0 << 1
}

/// Pack up to `num * 4` bytes of `msg` into words as ext4 does, padding
/// with a value derived from the length.
fn str2hashbuf(msg: &[u8], num: usize, signed: bool) -> [u32; 8] {
    let len = msg.len();
    let mut pad = (len as u32) | ((len as u32) << 8);
    pad |= pad << 16;
    let mut out = [pad; 8];
    let take = len.min(num * 4);
    let mut val = pad;
    let mut w = 0;
    for (i, &c) in msg[..take].iter().enumerate() {
        val = char_val(c, signed).wrapping_add(val << 8);
        if i % 4 == 3 {
            out[w] = val;
            w += 1;
            val = pad;
        }
    }
    if w < num {
        out[w] = val;
    }
    out
}

fn half_md4_transform(buf: &mut [u32; 4], inp: &[u32; 8]) {
    let (mut a, mut b, mut c, mut d) = (buf[0], buf[1], buf[2], buf[3]);
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    macro_rules! round {
        ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    round!(f, a, b, c, d, inp[0], 3);
    round!(f, d, a, b, c, inp[1], 7);
    round!(f, c, d, a, b, inp[2], 11);
    round!(f, b, c, d, a, inp[3], 19);
    round!(f, a, b, c, d, inp[4], 3);
    round!(f, d, a, b, c, inp[5], 7);
    round!(f, c, d, a, b, inp[6], 11);
    round!(f, b, c, d, a, inp[7], 19);

    round!(g, a, b, c, d, inp[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, inp[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, inp[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, inp[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, inp[6].wrapping_add(K2), 13);

    round!(h, a, b, c, d, inp[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, inp[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, inp[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, inp[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, inp[4].wrapping_add(K3), 15);

    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

fn tea_transform(buf: &mut [u32; 4], inp: &[u32; 8]) {
    let (mut b0, mut b1) = (buf[0], buf[1]);
    let (a, b, c, d) = (inp[0], inp[1], inp[2], inp[3]);
    let mut sum = 0u32;
    for _ in 0..16 {
        sum = sum.wrapping_add(0x9E37_79B9);
        b0 = b0.wrapping_add(
            (b1 << 4).wrapping_add(a) ^ b1.wrapping_add(sum) ^ (b1 >> 5).wrapping_add(b),
        );
        b1 = b1.wrapping_add(
            (b0 << 4).wrapping_add(c) ^ b0.wrapping_add(sum) ^ (b0 >> 5).wrapping_add(d),
        );
    }
    buf[0] = buf[0].wrapping_add(b0);
    buf[1] = buf[1].wrapping_add(b1);
}

/// (major, minor) hash of `name` for hash `version` (0..=5) and `seed`.
/// `None` for versions folio does not implement (siphash needs casefold).
pub fn dx_hash(name: &[u8], version: u8, seed: [u32; 4]) -> Option<(u32, u32)> {
    let mut buf = if seed.iter().any(|&w| w != 0) {
        seed
    } else {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    };
    let (hash, minor) = match version {
        LEGACY | LEGACY_UNSIGNED => (legacy_hash(name, version == LEGACY), 0),
        HALF_MD4 | HALF_MD4_UNSIGNED => {
            let signed = version == HALF_MD4;
            let mut p = name;
            while !p.is_empty() {
                let inp = str2hashbuf(p, 8, signed);
                half_md4_transform(&mut buf, &inp);
                p = p.get(32..).unwrap_or(&[]);
            }
            (buf[1], buf[2])
        }
        TEA | TEA_UNSIGNED => {
            let signed = version == TEA;
            let mut p = name;
            while !p.is_empty() {
                let inp = str2hashbuf(p, 4, signed);
                tea_transform(&mut buf, &inp);
                p = p.get(16..).unwrap_or(&[]);
            }
            (buf[0], buf[1])
        }
        _ => return None,
    };
    let mut hash = hash & !1;
    if hash == EOF_32 << 1 {
        hash = (EOF_32 - 1) << 1;
    }
    Some((hash, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_even_and_deterministic() {
        for v in [
            LEGACY,
            HALF_MD4,
            TEA,
            LEGACY_UNSIGNED,
            HALF_MD4_UNSIGNED,
            TEA_UNSIGNED,
        ] {
            let a = dx_hash(b"some-file-name.txt", v, [0; 4]).unwrap();
            assert_eq!(a, dx_hash(b"some-file-name.txt", v, [0; 4]).unwrap());
            assert_eq!(a.0 & 1, 0);
            assert_ne!(a, dx_hash(b"some-file-name.txu", v, [0; 4]).unwrap());
        }
        assert!(dx_hash(b"x", SIPHASH, [0; 4]).is_none());
        // Signed and unsigned differ only for bytes >= 0x80.
        assert_eq!(
            dx_hash(b"ascii", HALF_MD4, [1, 2, 3, 4]),
            dx_hash(b"ascii", HALF_MD4_UNSIGNED, [1, 2, 3, 4])
        );
        assert_ne!(
            dx_hash("é".as_bytes(), HALF_MD4, [1, 2, 3, 4]),
            dx_hash("é".as_bytes(), HALF_MD4_UNSIGNED, [1, 2, 3, 4])
        );
    }
}
