//! QCOW2 header parsing and L1 validation, done by hand before imago sees the file so that a
//! corrupt header cannot cause huge allocations.

use std::path::Path;

use super::{COMPRESSED, MAGIC, MAX_SIZE, OFFSET_MASK};
use crate::util::{self, be32, be64};
use crate::{Format, ImageError};

/// The header fields the reader and the check use.
#[derive(Debug)]
pub(crate) struct Header {
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) l1_size: u64,
    pub(crate) l1_offset: u64,
    pub(crate) rt_offset: u64,
    pub(crate) rt_clusters: u64,
    pub(crate) nb_snapshots: u32,
    pub(crate) refcount_order: u32,
}

/// Parse and sanity-check the header against the file size (a backing file is refused).
pub(crate) fn read_header(path: &Path, file: &std::fs::File) -> Result<Header, ImageError> {
    read_header_with(path, file, false)
}

/// [`read_header`], accepting a backing file name when `overlay` (its name is never used:
/// whoever reads an overlay is given its base explicitly).
pub(crate) fn read_header_with(
    path: &Path,
    file: &std::fs::File,
    overlay: bool,
) -> Result<Header, ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Qcow2, m);
    let len = util::file_len(file, path)?;
    if len < 72 {
        return Err(bad(format!("file is {len} bytes, too short for a header")));
    }
    let mut h = [0u8; 104];
    let n = util::read_up_to(file, path, &mut h, 0)?;
    if &h[0..4] != MAGIC {
        return Err(bad("magic QFI\\xfb not found".into()));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(ImageError::unsupported(
            path,
            format!("QCOW2 version {version}"),
        ));
    }
    if version == 3 && n < 104 {
        return Err(bad("file is truncated inside the v3 header".into()));
    }
    let backing = be64(&h, 8);
    let cluster_bits = be32(&h, 20);
    let size = be64(&h, 24);
    let crypt = be32(&h, 32);
    let l1_size = be32(&h, 36) as u64;
    let l1_offset = be64(&h, 40);
    let rt_offset = be64(&h, 48);
    let rt_clusters = be32(&h, 56) as u64;
    let nb_snapshots = be32(&h, 60);
    let (incompat, refcount_order) = if version == 3 {
        (be64(&h, 72), be32(&h, 96))
    } else {
        (0, 4)
    };
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("invalid cluster_bits {cluster_bits}")));
    }
    let cs = 1u64 << cluster_bits;
    if backing != 0 && !overlay {
        return Err(ImageError::unsupported(
            path,
            "QCOW2 images with a backing file are not supported (use qemu-img convert to flatten)",
        ));
    }
    if crypt != 0 {
        return Err(ImageError::unsupported(path, "encrypted QCOW2 images"));
    }
    if incompat & 0b10 != 0 {
        return Err(bad("image is marked corrupt".into()));
    }
    if incompat & !0b1 != 0 {
        return Err(ImageError::unsupported(
            path,
            format!("QCOW2 incompatible features {incompat:#x} (external data file, zstd, extended L2, …)"),
        ));
    }
    if refcount_order > 6 {
        return Err(bad(format!("invalid refcount_order {refcount_order}")));
    }
    if size > MAX_SIZE {
        return Err(bad(format!("virtual size {size} is too large")));
    }
    let l2_entries = cs / 8;
    let needed_l1 = size.div_ceil(cs * l2_entries);
    if l1_size < needed_l1 {
        return Err(bad(format!(
            "L1 table has {l1_size} entries but {needed_l1} are needed for {size} bytes"
        )));
    }
    // Same limits as QEMU (32 MiB L1, 8 MiB refcount table): bounds what we and imago allocate.
    if l1_size * 8 > 32 << 20 {
        return Err(bad(format!("L1 table of {l1_size} entries is too large")));
    }
    if rt_clusters * cs > 8 << 20 {
        return Err(bad(format!(
            "refcount table of {rt_clusters} clusters is too large"
        )));
    }
    let table_fits = |off: u64, bytes: u64| off.checked_add(bytes).is_some_and(|e| e <= len);
    if l1_offset % cs != 0 || !table_fits(l1_offset, l1_size * 8) {
        return Err(bad(format!(
            "L1 table ({l1_size} entries at {l1_offset}) is misaligned or outside the file ({len} bytes)"
        )));
    }
    if rt_offset % cs != 0 || rt_clusters == 0 || !table_fits(rt_offset, rt_clusters * cs) {
        return Err(bad(format!(
            "refcount table ({rt_clusters} clusters at {rt_offset}) is misaligned or outside the file ({len} bytes)"
        )));
    }
    Ok(Header {
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        rt_offset,
        rt_clusters,
        nb_snapshots,
        refcount_order,
    })
}

/// L1 entry bits that must be zero (0-8 and 56-62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero (1-8 and 56-61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Walk the active L1 and L2 tables and the refcount table before anything reads through
/// them: every entry must be well formed (no reserved bits, aligned), and every table, refcount
/// block and data cluster must lie inside the file without overlapping any other (a cluster
/// named by two entries would be copied twice). The walk reads each table once, so its cost is
/// bounded by the file's size, whatever the header claims.
pub(crate) fn validate_tables(
    path: &Path,
    file: &std::fs::File,
    hdr: &Header,
    len: u64,
) -> Result<(), ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Qcow2, m);
    let cs = 1u64 << hdr.cluster_bits;
    let mut claims = util::Claims::new(path, Format::Qcow2, len);
    claims.claim(0, cs.min(len), "header", 0)?;
    claims.claim(hdr.l1_offset, hdr.l1_size * 8, "L1 table", 0)?;
    claims.claim(hdr.rt_offset, hdr.rt_clusters * cs, "refcount table", 0)?;

    let mut rt = vec![0u8; (hdr.rt_clusters * cs) as usize];
    util::read_exact_at(file, path, &mut rt, hdr.rt_offset, Format::Qcow2)?;
    for (i, e) in rt.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
        if e == 0 {
            continue;
        }
        if e % cs != 0 {
            return Err(bad(format!(
                "refcount table entry {i}: block offset {e} is not cluster aligned"
            )));
        }
        claims.claim(e, cs, "refcount block", i as u64)?;
    }

    let mut l1 = vec![0u8; (hdr.l1_size * 8) as usize];
    util::read_exact_at(file, path, &mut l1, hdr.l1_offset, Format::Qcow2)?;
    let l2_entries = cs / 8;
    let csize_shift = 62 - (hdr.cluster_bits - 8);
    let mut compressed = std::collections::HashSet::new();
    let mut l2 = vec![0u8; cs as usize];
    let mut l2_tables = Vec::new();
    for (i, e) in l1.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
        if e & L1_RESERVED != 0 {
            return Err(bad(format!("L1 entry {i} has reserved bits set ({e:#x})")));
        }
        let l2_off = e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if l2_off % cs != 0 {
            return Err(bad(format!(
                "L1 entry {i}: L2 table offset {l2_off} is not cluster aligned"
            )));
        }
        claims.claim(l2_off, cs, "L2 table", i as u64)?;
        l2_tables.push((i, l2_off));
    }
    // Tables named twice are refused before any is read.
    claims.check()?;
    for (i, l2_off) in l2_tables {
        util::read_exact_at(file, path, &mut l2, l2_off, Format::Qcow2)?;
        for (j, e) in l2.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
            let guest = (i as u64 * l2_entries + j as u64) * cs;
            let entry = i as u64 * l2_entries + j as u64;
            if e & COMPRESSED != 0 {
                let host = e & ((1u64 << csize_shift) - 1);
                if host >= len {
                    return Err(bad(format!(
                        "compressed cluster at guest offset {guest} is stored at {host}, beyond the end of the file ({len} bytes)"
                    )));
                }
                if !compressed.insert(host) {
                    return Err(bad(format!(
                        "compressed cluster at guest offset {guest} is stored at {host}, like another one"
                    )));
                }
                continue;
            }
            if e & L2_RESERVED != 0 {
                return Err(bad(format!(
                    "L2 entry for guest offset {guest} has reserved bits set ({e:#x})"
                )));
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                return Err(bad(format!(
                    "L2 entry for guest offset {guest}: cluster offset {off} is not cluster aligned"
                )));
            }
            if guest >= hdr.size {
                return Err(bad(format!(
                    "L2 entry maps guest offset {guest} beyond the virtual size {}",
                    hdr.size
                )));
            }
            claims.claim(off, cs, "data cluster", entry)?;
        }
    }
    claims.finish()
}
