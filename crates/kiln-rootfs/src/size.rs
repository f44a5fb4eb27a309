//! Disk sizes with M and G suffixes.

use crate::RootfsError;

/// The default size of each per-VM disk (/home and /var): 2 GiB.
pub const DEFAULT_DISK_SIZE: u64 = 2 << 30;
/// The smallest disk kiln makes: mkfs.ext4 needs room for its metadata and the seed files.
const MIN_SIZE: u64 = 16 << 20;
const MAX_SIZE: u64 = 16 << 40;
/// The sizes a disk kiln makes may have: 16 MiB to 16 TiB.
pub const DISK_SIZES: std::ops::RangeInclusive<u64> = MIN_SIZE..=MAX_SIZE;

/// Parses `512M`, `2G` (binary units; `MiB`/`GiB`, lower case and a plain byte count also
/// accepted) into bytes, between 16 MiB and 16 TiB.
pub fn parse_size(text: &str) -> Result<u64, RootfsError> {
    let bad = |why: &str| RootfsError::Invalid {
        what: "size",
        value: text.to_string(),
        why: why.to_string(),
    };
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(bad(
            "expected a number with an M or G suffix, like 512M or 2G",
        ));
    }
    let n: u64 = t[..digits].parse().map_err(|_| bad("number too large"))?;
    let shift = match t[digits..].to_ascii_uppercase().as_str() {
        "" => 0,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(bad("unknown suffix; use M or G, like 512M or 2G")),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("number too large"))?;
    if bytes < MIN_SIZE {
        return Err(bad("too small; the minimum is 16M"));
    }
    if bytes > MAX_SIZE {
        return Err(bad("too large; the maximum is 16384G"));
    }
    Ok(bytes)
}

/// `2G`, `512M`, or a byte count when neither divides.
pub fn format_size(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}G", bytes >> 30)
    } else if bytes % (1 << 20) == 0 {
        format!("{}M", bytes >> 20)
    } else {
        bytes.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        for bad in [
            "3Q",
            "",
            "G",
            "1T",
            "-1G",
            "1M",
            "99999999999999999999G",
            "1.5G",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(100 << 20), "100M");
    }
}
