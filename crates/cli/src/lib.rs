//! The `folio` command's building blocks, usable from tests: host tree
//! copies (put/get), listings and size parsing.

pub mod bench;
pub mod bench_threads;
pub mod confine;
pub mod copy;
pub mod export;
pub mod flusher;
pub mod hostxattr;
pub mod image;
pub mod io;
pub mod mount;
pub mod progress;
pub mod show;
pub mod torture;

/// Parse a size such as `64M`, `1G`, `4096`, `2KiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let suffix = s[i..].to_ascii_uppercase();
            if matches!(suffix.as_str(), "KB" | "MB" | "GB" | "TB") {
                // Decimal or binary? mke2fs refuses it too.
                return Err(format!(
                    "ambiguous size {s:?}: use K, M, G, T (or KiB ... TiB) for powers of 1024"
                ));
            }
            let m = match suffix.trim_end_matches("IB") {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                "P" => 1u64 << 50,
                "E" => 1u64 << 60,
                "S" => 512,
                other => return Err(format!("unknown size suffix {other:?} in {s:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    // A fraction as numfmt --from=iec reads it (`1.5G`), rounded up to a
    // whole byte.
    let bad = || format!("invalid size {s:?}");
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let part = if frac.is_empty() {
        0
    } else {
        if frac.len() > 18 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let digits: u128 = frac.parse().map_err(|_| bad())?;
        let scale = 10u128.pow(frac.len() as u32);
        u64::try_from((digits * u128::from(mult)).div_ceil(scale)).map_err(|_| bad())?
    };
    whole
        .checked_mul(mult)
        .and_then(|n| n.checked_add(part))
        .ok_or_else(|| format!("size {s:?} is too large"))
}
