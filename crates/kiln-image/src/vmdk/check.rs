//! VMDK consistency check. Opening already refused grains outside their file or shared by two
//! entries; the check adds the virtual size's alignment and inflates every compressed grain,
//! as converting would.

use std::path::Path;

use super::{Extent, VmdkReader};
use crate::driver::Check;
use crate::ImageError;

/// Structural check: descriptor, extent files and sizes, sparse grain tables.
pub(super) fn check(path: &Path) -> Result<Check, ImageError> {
    let mut r = VmdkReader::open(path)?;
    let mut problems = Vec::new();
    if r.size % 512 != 0 {
        problems.push(format!("virtual size {} is not a multiple of 512", r.size));
    }
    for e in &mut r.extents {
        let Extent::Sparse(s) = e else { continue };
        if !s.compressed {
            continue;
        }
        s.for_each_grain(|s, gt_idx, j, off| {
            if let Err(err) = s.inflate_grain(off) {
                problems.push(format!("grain {gt_idx}/{j}: {err}"));
                if problems.len() > 50 {
                    problems.push("too many problems; stopping".into());
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        if problems.len() > 50 {
            break;
        }
    }
    Ok(Check {
        virtual_size: r.size,
        files: r.files,
        problems,
    })
}
