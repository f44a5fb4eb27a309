//! VMDK consistency check: virtual size alignment and, in sparse extents, grains that lie
//! beyond the end of their file or share an offset.

use std::path::Path;

use super::{Extent, VmdkReader};
use crate::driver::Check;
use crate::util;
use crate::ImageError;

/// Structural check: descriptor, extent files and sizes, sparse grain tables.
pub(super) fn check(path: &Path) -> Result<Check, ImageError> {
    let mut r = VmdkReader::open(path)?;
    let mut problems = Vec::new();
    if r.size % 512 != 0 {
        problems.push(format!("virtual size {} is not a multiple of 512", r.size));
    }
    for e in &mut r.extents {
        if let Extent::Sparse(s) = e {
            let mut owners = std::collections::HashMap::new();
            for gt_idx in 0..s.gd.len() {
                let gt = match s.load_gt(gt_idx) {
                    Ok(Some(gt)) => gt.to_vec(),
                    Ok(None) => continue,
                    Err(err) => {
                        problems.push(err.to_string());
                        continue;
                    }
                };
                for (j, &g) in gt.iter().enumerate() {
                    if g == 0 || (g == 1 && s.zero_grains) {
                        continue;
                    }
                    let off = g as u64 * 512;
                    let need = if s.compressed { 12 } else { s.grain };
                    if off + need > util::round_up(s.file_len, 512).unwrap_or(u64::MAX) {
                        problems.push(format!(
                            "{}: grain {gt_idx}/{j} at offset {off} lies beyond the end of the file",
                            s.path.display()
                        ));
                    }
                    if let Some((a, b)) = owners.insert(g, (gt_idx, j)) {
                        problems.push(format!(
                            "{}: grains {a}/{b} and {gt_idx}/{j} share offset {off}",
                            s.path.display()
                        ));
                    }
                    if problems.len() > 50 {
                        problems.push("too many problems; stopping".into());
                        return Ok(Check {
                            virtual_size: r.size,
                            files: r.files,
                            problems,
                        });
                    }
                }
            }
        }
    }
    Ok(Check {
        virtual_size: r.size,
        files: r.files,
        problems,
    })
}
