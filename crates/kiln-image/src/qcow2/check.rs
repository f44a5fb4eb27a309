//! QCOW2 structural check: walk the L1/L2 tables and refcount blocks and compare reference
//! counts, like `qemu-img check`.

use std::path::Path;

use super::header::read_header;
use super::{COMPRESSED, OFFSET_MASK};
use crate::driver::Check;
use crate::util::{self, be32, be64};
use crate::{Format, ImageError};

/// The references the image's metadata makes to each cluster of the file, and the problems
/// found on the way.
struct Refs {
    /// Cluster size in bytes.
    cs: u64,
    /// File length in bytes.
    len: u64,
    /// References to each cluster of the file.
    counts: Vec<u32>,
    problems: Vec<String>,
}

impl Refs {
    /// Note a problem; the first 50 are kept.
    fn problem(&mut self, m: String) {
        if self.problems.len() < 50 {
            self.problems.push(m);
        }
    }

    /// Count a reference from `what` to each cluster of `[off, off + bytes)`.
    fn add(&mut self, off: u64, bytes: u64, what: &str) {
        let (cs, len) = (self.cs, self.len);
        if off % cs != 0 && what != "compressed data" {
            self.problem(format!("{what} at offset {off} is not cluster aligned"));
        }
        let first = off / cs;
        let last = (off + bytes.max(1) - 1) / cs;
        for c in first..=last {
            match self.counts.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    self.problem(format!(
                        "{what} at offset {off} lies beyond the end of the file ({len} bytes)"
                    ));
                    return;
                }
            }
        }
    }

    /// Whether entry `i` of `table` points at a cluster `off` (0: at none) that can be read
    /// and walked: a misaligned one or one beyond the end of the file is a problem naming it
    /// `pointee`. A cluster that can be read is counted as `what`.
    fn follows(&mut self, table: &str, i: usize, off: u64, pointee: &str, what: &str) -> bool {
        if off == 0 {
            return false;
        }
        if off % self.cs != 0 || off + self.cs > self.len {
            self.problem(format!(
                "{table} entry {i}: {pointee} offset {off} is misaligned or beyond the end of the file"
            ));
            return false;
        }
        self.add(off, self.cs, what);
        true
    }
}

/// Walk all metadata and compare reference counts, like `qemu-img check`.
pub(crate) fn check(path: &Path) -> Result<Check, ImageError> {
    // Opening validates every table first (and reads the compressed clusters below).
    let mut reader = super::Qcow2Reader::open_mode(path, false)?;
    let file = util::open_ro(path)?;
    let hdr = read_header(path, &file)?;
    let len = util::file_len(&file, path)?;
    let cs = 1u64 << hdr.cluster_bits;
    let nclusters = len.div_ceil(cs) as usize;
    let mut refs = Refs {
        cs,
        len,
        counts: vec![0u32; nclusters],
        problems: Vec::new(),
    };
    refs.add(0, cs, "header");
    refs.add(hdr.l1_offset, hdr.l1_size * 8, "L1 table");
    refs.add(hdr.rt_offset, hdr.rt_clusters * cs, "refcount table");

    let mut l1 = vec![0u8; (hdr.l1_size * 8) as usize];
    util::read_exact_at(&file, path, &mut l1, hdr.l1_offset, Format::Qcow2)?;
    let mut l2 = vec![0u8; cs as usize];
    let csize_shift = 62 - (hdr.cluster_bits - 8);
    let mut compressed_guest = Vec::new();
    for (i, e) in l1.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
        let l2_off = e & OFFSET_MASK;
        if !refs.follows("L1", i, l2_off, "L2 table", "L2 table") {
            continue;
        }
        util::read_exact_at(&file, path, &mut l2, l2_off, Format::Qcow2)?;
        for (j, e) in l2.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
            if e & COMPRESSED != 0 {
                let coff = e & ((1u64 << csize_shift) - 1);
                let sectors = ((e >> csize_shift) & ((1u64 << (62 - csize_shift)) - 1)) + 1;
                refs.add(coff & !511, sectors * 512, "compressed data");
                compressed_guest.push((i as u64 * (cs / 8) + j as u64) * cs);
                continue;
            }
            let off = e & OFFSET_MASK;
            if off != 0 {
                let guest = ((i as u64 * (cs / 8)) + j as u64) * cs;
                if guest >= hdr.size {
                    refs.problem(format!(
                        "L2 entry maps guest offset {guest} beyond the virtual size"
                    ));
                }
                refs.add(off, cs, "data cluster");
            }
        }
    }

    // Compressed clusters must inflate, as converting would find out: read each through the
    // reader (the tables were validated when it opened, so there are at most as many as the
    // file has L2 entries).
    if !compressed_guest.is_empty() {
        let mut buf = vec![0u8; cs as usize];
        for guest in compressed_guest {
            let n = cs.min(hdr.size.saturating_sub(guest)) as usize;
            if let Err(e) = crate::ImageReader::read_at(&mut reader, &mut buf[..n], guest) {
                refs.problem(format!("compressed cluster at guest offset {guest}: {e}"));
            }
        }
    }

    // Refcount blocks and stored refcounts.
    let bits = 1u64 << hdr.refcount_order;
    let per_block = cs * 8 / bits;
    let mut rt = vec![0u8; (hdr.rt_clusters * cs) as usize];
    util::read_exact_at(&file, path, &mut rt, hdr.rt_offset, Format::Qcow2)?;
    let mut stored = vec![0u64; nclusters];
    let mut block = vec![0u8; cs as usize];
    for (i, e) in rt.chunks_exact(8).map(|c| be64(c, 0)).enumerate() {
        let off = e & !511;
        if !refs.follows("refcount table", i, off, "block", "refcount block") {
            continue;
        }
        util::read_exact_at(&file, path, &mut block, off, Format::Qcow2)?;
        for k in 0..per_block {
            let cluster = i as u64 * per_block + k;
            let v = read_refcount(&block, k, bits);
            match stored.get_mut(cluster as usize) {
                Some(s) => *s = v,
                None if v != 0 => refs.problem(format!(
                    "refcount for cluster {cluster} beyond the end of the file is {v}"
                )),
                None => {}
            }
        }
    }
    if hdr.nb_snapshots == 0 {
        let counts = std::mem::take(&mut refs.counts);
        let mut leaked = 0u64;
        for (c, (&want, &have)) in counts.iter().zip(stored.iter()).enumerate() {
            let want = want as u64;
            if have < want {
                refs.problem(format!(
                    "cluster {c} (offset {}) is in use but its refcount is {have}",
                    c as u64 * cs
                ));
            } else if have > want {
                leaked += 1;
            }
        }
        if leaked > 0 {
            refs.problem(format!(
                "{leaked} leaked clusters (refcount set but unused)"
            ));
        }
    }
    Ok(Check::single(path, hdr.size, refs.problems))
}

fn read_refcount(block: &[u8], idx: u64, bits: u64) -> u64 {
    match bits {
        64 => be64(block, idx as usize * 8),
        32 => be32(block, idx as usize * 4) as u64,
        16 => util::be16(block, idx as usize * 2) as u64,
        8 => block[idx as usize] as u64,
        _ => {
            let bit = idx * bits;
            let byte = block[(bit / 8) as usize];
            ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
        }
    }
}
