//! A QCOW2 (version 3) overlay whose backing file is a raw base image: the VM's copy-on-write
//! root. Written directly (a few clusters of metadata), which is faster than spawning qemu-img;
//! `qemu-img check` validates it in the tests.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::HostError;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const HEADER_LEN: u32 = 104;

/// Creates `overlay` as an empty QCOW2 image of `base`'s size whose backing file is `base`
/// (format raw, recorded by absolute path). QEMU opens the backing file read-only, so the
/// base is never modified; writes land in the overlay.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<u64, HostError> {
    let base = fs::canonicalize(base).map_err(|e| {
        HostError::io(
            format!("{}: cannot resolve the base image", base.display()),
            e,
        )
    })?;
    let size = fs::metadata(&base)
        .map_err(|e| HostError::io(format!("{}: cannot read the base image", base.display()), e))?
        .len();
    let name = base.as_os_str().as_encoded_bytes();
    if name.len() > 1023 {
        return Err(HostError::InvalidValue {
            what: "base image path",
            value: base.display().to_string(),
            why: "longer than QCOW2's 1023-byte limit".into(),
        });
    }
    let bytes = overlay_bytes(name, size);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(overlay)
        .map_err(|e| HostError::io(format!("{}: cannot create", overlay.display()), e))?;
    f.write_all(&bytes)
        .map_err(|e| HostError::io(format!("{}: cannot write", overlay.display()), e))?;
    Ok(size)
}

fn overlay_bytes(backing: &[u8], size: u64) -> Vec<u8> {
    // One L2 table maps CLUSTER/8 clusters; the L1 table has one entry per L2 table.
    let l1_entries = size.div_ceil(CLUSTER * (CLUSTER / 8)).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
    // Layout: header | refcount table | refcount block | L1 table.
    let reftable = CLUSTER;
    let refblock = 2 * CLUSTER;
    let l1 = 3 * CLUSTER;
    let total_clusters = 3 + l1_clusters;
    let mut b = vec![0u8; (total_clusters * CLUSTER) as usize];

    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    let ext_len = 8 + 8 + 8; // backing-format extension (3 bytes padded to 8) + end marker
    let backing_offset = u64::from(HEADER_LEN) + ext_len;
    h.extend_from_slice(&backing_offset.to_be_bytes());
    h.extend_from_slice(&(backing.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&(l1_entries as u32).to_be_bytes());
    h.extend_from_slice(&l1.to_be_bytes());
    h.extend_from_slice(&reftable.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount table clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16-bit refcounts
    h.extend_from_slice(&HEADER_LEN.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN as usize);
    h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(b"raw\0\0\0\0\0");
    h.extend_from_slice(&[0u8; 8]); // end of extensions
    h.extend_from_slice(backing);
    b[..h.len()].copy_from_slice(&h);

    b[reftable as usize..reftable as usize + 8].copy_from_slice(&refblock.to_be_bytes());
    for c in 0..total_clusters as usize {
        let at = refblock as usize + 2 * c;
        b[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let b = overlay_bytes(b"/base.raw", 3 << 30);
        assert_eq!(&b[..4], b"QFI\xfb");
        // 3 GiB needs 6 L1 entries; one L1 cluster.
        assert_eq!(u32::from_be_bytes(b[36..40].try_into().unwrap()), 6);
        assert_eq!(b.len() as u64, 4 * CLUSTER);
        assert_eq!(&b[128..137], b"/base.raw");
    }
}
