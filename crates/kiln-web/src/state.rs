//! v86 machine states: checked before v86 restores one, written atomically.
//!
//! A v86 state (raw, or one zstd frame around it) starts with four little-endian 32-bit
//! words: the magic `0x86768676`, the format version (6), the total length and the length of
//! the JSON info block that follows; the buffers come after it. [`check_state`] inflates it
//! (bounded by the image's memory size), checks the header against the real length, parses
//! the info block, and checks that every content file the state's 9p filesystem names is one
//! of the image's: a state saved from another image (or a truncated one) is refused with one
//! line instead of a guest that hangs on a file v86 cannot fetch.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use serde_json::Value;

use crate::linux::{hash_stem, is_blob_name, LinuxImage};
use crate::{Result, WebError};

const MAGIC: u32 = 0x8676_8676;
const VERSION: u32 = 6;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Room beyond guest memory for VGA memory, the info block and device buffers.
const OVERHEAD: u64 = 512 << 20;

/// What a checked state holds.
#[derive(Clone, Debug)]
pub struct CheckedState {
    /// The state as v86 gets it: kiln's zstd encoding of the checked raw state.
    pub raw_size: u64,
    /// Content files of the image the state refers to.
    pub files: usize,
}

/// Checks `bytes` (read from `path`) as a saved state of `image`; returns the raw state.
pub fn check_state(
    path: &Path,
    bytes: &[u8],
    image: &LinuxImage,
) -> Result<(Vec<u8>, CheckedState)> {
    let limit = image.memory_size + OVERHEAD;
    let raw = if bytes.starts_with(&ZSTD_MAGIC) {
        let mut out = Vec::new();
        let r = zstd::stream::read::Decoder::new(bytes)
            .and_then(|d| d.take(limit + 1).read_to_end(&mut out));
        if let Err(e) = r {
            return Err(WebError::bad(
                path,
                format!("is not a complete zstd stream ({e}): truncated or damaged"),
            ));
        }
        if out.len() as u64 > limit {
            return Err(WebError::bad(
                path,
                format!("inflates to more than {} MiB", limit >> 20),
            ));
        }
        out
    } else {
        if bytes.len() as u64 > limit {
            return Err(WebError::bad(
                path,
                format!("is larger than {} MiB", limit >> 20),
            ));
        }
        bytes.to_vec()
    };
    let word = |i: usize| -> u32 {
        raw.get(i * 4..i * 4 + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0)
    };
    if raw.len() < 16 || word(0) != MAGIC {
        return Err(WebError::bad(
            path,
            "is not a v86 state (no v86 state header)",
        ));
    }
    if word(1) != VERSION {
        return Err(WebError::bad(
            path,
            format!(
                "is a v86 state of format {}, this v86 reads format {VERSION}",
                word(1)
            ),
        ));
    }
    let (total, info_len) = (word(2) as usize, word(3) as usize);
    if total != raw.len() {
        return Err(WebError::bad(
            path,
            format!(
                "is truncated or damaged: its header says {total} bytes, it holds {}",
                raw.len()
            ),
        ));
    }
    let Some(info) = raw.get(16..16 + info_len) else {
        return Err(WebError::bad(
            path,
            "is damaged: its info block runs past its end",
        ));
    };
    let info: Value = serde_json::from_slice(info).map_err(|e| {
        WebError::bad(
            path,
            format!("is damaged: its info block is not JSON ({e})"),
        )
    })?;
    // Content file names are hashes (64 hex digits in kiln's images, 8 in env86's): strings
    // of that shape with a hash length the image uses.
    let stems: BTreeSet<usize> = image.blobs.iter().filter_map(|b| hash_stem(b)).collect();
    let mut names = BTreeSet::new();
    collect_blob_names(&info, &stems, &mut names, 0);
    if names.is_empty() {
        return Err(WebError::bad(
            path,
            "holds no 9p filesystem: it was saved from another image (a disk, not a Linux 9p image)",
        ));
    }
    let missing: Vec<&String> = names.iter().filter(|n| !image.blobs.contains(*n)).collect();
    if let Some(first) = missing.first() {
        return Err(WebError::bad(
            path,
            format!(
                "was saved from another image: it names {} file(s) {} does not have (e.g. {first})",
                missing.len(),
                image.dir.display()
            ),
        ));
    }
    let checked = CheckedState {
        raw_size: raw.len() as u64,
        files: names.len(),
    };
    Ok((raw, checked))
}

/// Strings in the info block shaped like the image's content file names.
fn collect_blob_names(
    v: &Value,
    stems: &BTreeSet<usize>,
    out: &mut BTreeSet<String>,
    depth: usize,
) {
    if depth > 256 {
        return;
    }
    match v {
        Value::String(s) if hash_stem(s).is_some_and(|n| stems.contains(&n)) && is_blob_name(s) => {
            out.insert(s.clone());
        }
        Value::Array(a) => a
            .iter()
            .for_each(|x| collect_blob_names(x, stems, out, depth + 1)),
        Value::Object(o) => o
            .values()
            .for_each(|x| collect_blob_names(x, stems, out, depth + 1)),
        _ => {}
    }
}

/// zstd level of the states kiln keeps and ships: level 9 makes a Debian prompt's 44 MB
/// state 13.5 MB in 2 s here; 19 saves 10 % more in 30 times the time.
pub const LEVEL: i32 = 9;

/// The zstd encoding kiln ships and keeps states in.
pub fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut enc = zstd::bulk::Compressor::new(level)
        .map_err(|e| WebError::bad("state", format!("zstd: {e}")))?;
    let _ = enc.include_checksum(true);
    let _ = enc.include_contentsize(true);
    enc.compress(raw)
        .map_err(|e| WebError::bad("state", format!("zstd: {e}")))
}

/// Writes `raw` (checked) as the image's saved state: zstd, to a temporary name, fsynced,
/// renamed into place; an older uncompressed `initial.state` goes.
pub fn save(image: &LinuxImage, raw: &[u8], level: i32) -> Result<u64> {
    let z = compress(raw, level)?;
    let path = image.dir.join(crate::linux::STATE_FILE);
    kiln_sys::temp::write_atomic(&path, &z, None, 0o644)
        .map_err(|e| WebError::io(&path, "write", e))?;
    let _ = std::fs::remove_file(image.dir.join(crate::linux::RAW_STATE_FILE));
    Ok(z.len() as u64)
}
