//! VMDK: monolithicFlat read/write (NAME.vmdk text descriptor + NAME-flat.vmdk extent),
//! hosted sparse extents (monolithicSparse, twoGbMaxExtentSparse) read, ZERO extents read.
//!
//! Extent files named by a descriptor must resolve (after following symlinks) inside the
//! descriptor's own directory; anything else is refused so a crafted descriptor cannot make
//! kiln read arbitrary host files.

mod check;
mod descriptor;
mod flat;
mod sparse;

use std::path::{Path, PathBuf};

use crate::copy::check_range;
use crate::driver::Driver;
use crate::raw::FileRange;
use crate::util;
use crate::{BlockStatus, Format, ImageError, ImageReader};
use sparse::{SparseExtent, SPARSE_MAGIC};

/// VMDK: monolithicFlat (read, written in place, written) and sparse extents (read).
pub(crate) const DRIVER: Driver = Driver {
    format: Format::Vmdk,
    // `KDMV` at 0: a monolithicSparse or streamOptimized file.
    probe_magic: |head| head.starts_with(SPARSE_MAGIC),
    // A text descriptor.
    probe_hint: |file| Ok(descriptor::looks_like_descriptor(file.head)),
    open: |path| Ok(Box::new(VmdkReader::open(path)?)),
    in_place: Some(|path| Ok(Box::new(flat::open_flat_rw(path)?))),
    check: check::check,
    write: flat::write_flat,
};

/// One extent of the disk, in descriptor order.
enum Extent {
    /// A byte range of a plain file.
    Flat(FileRange),
    /// Reads as zeros; stored nowhere.
    Zero { size: u64 },
    /// A hosted sparse extent file.
    Sparse(Box<SparseExtent>),
}

impl Extent {
    fn size(&self) -> u64 {
        match self {
            Extent::Flat(r) => r.size,
            Extent::Zero { size } => *size,
            Extent::Sparse(s) => s.size,
        }
    }
}

/// The bytes `[start, end)` of one file (by device and inode, so two names of one file are one
/// file) that the descriptor or an extent uses.
struct FileUse {
    id: (u64, u64),
    start: u64,
    end: u64,
    what: &'static str,
    path: PathBuf,
}

impl FileUse {
    fn of(
        path: &Path,
        file: &std::fs::File,
        start: u64,
        len: u64,
        what: &'static str,
    ) -> Result<Self, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let m = file
            .metadata()
            .map_err(|e| ImageError::io(path, "cannot stat", e))?;
        Ok(FileUse {
            id: (m.dev(), m.ino()),
            start,
            end: start.saturating_add(len),
            what,
            path: path.to_path_buf(),
        })
    }

    /// Refuse `descriptor` if two uses of one file overlap.
    fn refuse_overlaps(descriptor: &Path, mut uses: Vec<FileUse>) -> Result<(), ImageError> {
        uses.sort_by_key(|u| (u.id, u.start));
        for w in uses.windows(2) {
            if w[0].id == w[1].id && w[1].start < w[0].end.max(w[0].start + 1) {
                return Err(ImageError::corrupt(
                    descriptor,
                    Format::Vmdk,
                    format!(
                        "{} uses bytes of {} that {} already uses",
                        w[1].what,
                        w[1].path.display(),
                        w[0].what
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Reader over the extents of a VMDK.
struct VmdkReader {
    path: PathBuf,
    extents: Vec<Extent>,
    size: u64,
    files: Vec<PathBuf>,
    create_type: String,
}

impl VmdkReader {
    /// Open a monolithicSparse file, or a descriptor and every extent it lists.
    fn open(path: &Path) -> Result<Self, ImageError> {
        let file = util::open_ro(path)?;
        let len = util::file_len(&file, path)?;
        let mut magic = [0u8; 4];
        let n = util::read_up_to(&file, path, &mut magic, 0)?;
        if n == 4 && &magic == SPARSE_MAGIC {
            // monolithicSparse: the file is its own (single) extent.
            let sparse = SparseExtent::open(path, file)?;
            let size = sparse.size;
            return Ok(VmdkReader {
                path: path.to_path_buf(),
                extents: vec![Extent::Sparse(Box::new(sparse))],
                size,
                files: vec![path.to_path_buf()],
                create_type: "monolithicSparse".into(),
            });
        }
        let desc = descriptor::read(path, &file, len)?;
        let mut extents = Vec::new();
        let mut files = vec![path.to_path_buf()];
        let mut size = 0u64;
        // The bytes of each file the extents use, to refuse two extents over the same bytes
        // (which would multiply them in the output) and an extent over the descriptor.
        let mut uses = vec![FileUse::of(path, &file, 0, len, "the descriptor")?];
        for e in &desc.extents {
            let bytes = e
                .sectors
                .checked_mul(512)
                .ok_or_else(|| ImageError::corrupt(path, Format::Vmdk, "extent size overflows"))?;
            let ext = match e.kind.as_str() {
                "ZERO" => Extent::Zero { size: bytes },
                "FLAT" | "VMFS" => {
                    let range = flat::open_listed(path, e, bytes)?;
                    files.push(range.path.clone());
                    Extent::Flat(range)
                }
                "SPARSE" => {
                    let s = SparseExtent::open_listed(path, &e.file, bytes)?;
                    files.push(s.path.clone());
                    Extent::Sparse(Box::new(s))
                }
                other => {
                    return Err(ImageError::unsupported(
                        path,
                        format!("VMDK extent type {other}"),
                    ))
                }
            };
            match &ext {
                Extent::Flat(r) => {
                    uses.push(FileUse::of(&r.path, &r.file, r.base, r.size, "an extent")?)
                }
                Extent::Sparse(s) => {
                    uses.push(FileUse::of(&s.path, s.file(), 0, s.file_len, "an extent")?)
                }
                Extent::Zero { .. } => {}
            }
            size = size
                .checked_add(ext.size())
                .ok_or_else(|| ImageError::corrupt(path, Format::Vmdk, "total size overflows"))?;
            extents.push(ext);
        }
        FileUse::refuse_overlaps(path, uses)?;
        Ok(VmdkReader {
            path: path.to_path_buf(),
            extents,
            size,
            files,
            create_type: desc.create_type,
        })
    }

    /// Find the extent holding `offset`: (index, offset within extent).
    fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        let mut start = 0u64;
        for (i, e) in self.extents.iter().enumerate() {
            if offset < start + e.size() {
                return Some((i, offset - start));
            }
            start += e.size();
        }
        None
    }
}

impl ImageReader for VmdkReader {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(&self.path, offset, buf.len(), self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let Some((i, within)) = self.locate(pos) else {
                break;
            };
            let e = &mut self.extents[i];
            let n = ((e.size() - within) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match e {
                Extent::Flat(r) => r.read_at(piece, within)?,
                Extent::Zero { .. } => piece.fill(0),
                Extent::Sparse(s) => s.read_at(piece, within)?,
            }
            done += n;
        }
        Ok(())
    }
    /// Flat extents: holes are zero. `ZERO` extents: zero. Sparse extents: see
    /// [`SparseExtent::block_status`].
    fn block_status(
        &mut self,
        offset: u64,
        max_len: u64,
    ) -> Result<(BlockStatus, u64), ImageError> {
        if let Some(past) = util::past_end(offset, self.size, max_len) {
            return Ok(past);
        }
        // The extents cover the whole disk; a gap is answered as unallocated, never a panic.
        let Some((i, within)) = self.locate(offset) else {
            return Ok((BlockStatus::Unallocated, max_len.max(1)));
        };
        let e = &mut self.extents[i];
        let max = max_len.min(e.size() - within);
        Ok(match e {
            Extent::Flat(r) => r.block_status(within, max),
            Extent::Zero { .. } => (BlockStatus::Zero, max.max(1)),
            Extent::Sparse(s) => s.block_status(within, max)?,
        })
    }
}
