//! File helpers shared by the format modules: positioned I/O with file-naming errors,
//! hole detection and atomic output files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{BlockStatus, Format, ImageError};

/// Copy chunk size: big enough for throughput, small enough to never matter for memory.
pub(crate) const CHUNK: usize = 2 << 20;

pub(crate) fn open_ro(path: &Path) -> Result<File, ImageError> {
    use std::os::unix::fs::FileTypeExt;
    // Opening a FIFO would block forever; refuse it (and sockets) up front.
    if let Ok(m) = std::fs::metadata(path) {
        let t = m.file_type();
        if t.is_fifo() || t.is_socket() || t.is_dir() {
            return Err(ImageError::unsupported(
                path,
                "not a regular file or block device",
            ));
        }
    }
    File::open(path).map_err(|e| ImageError::io(path, "cannot open", e))
}

pub(crate) fn open_rw(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| ImageError::io(path, "cannot open for writing", e))
}

pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64, ImageError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| ImageError::io(path, "cannot stat", e))
}

/// Bytes allocated on disk (st_blocks * 512).
pub(crate) fn allocated_bytes(path: &Path) -> Result<u64, ImageError> {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .map_err(|e| ImageError::io(path, "cannot stat", e))
}

/// Read exactly `buf.len()` bytes at `off`; hitting end of file is reported as a truncated image.
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    off: u64,
    format: Format,
) -> Result<(), ImageError> {
    file.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ImageError::corrupt(
                path,
                format,
                format!(
                    "file is truncated (needed {} bytes at offset {off})",
                    buf.len()
                ),
            )
        } else {
            ImageError::io(path, format!("read at offset {off}"), e)
        }
    })
}

/// Read as many bytes as available (up to `buf.len()`) at `off`.
pub(crate) fn read_up_to(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    off: u64,
) -> Result<usize, ImageError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(path, format!("read at offset {off}"), e)),
        }
    }
    Ok(done)
}

pub(crate) fn write_all_at(
    file: &File,
    path: &Path,
    buf: &[u8],
    off: u64,
) -> Result<(), ImageError> {
    file.write_all_at(buf, off)
        .map_err(|e| ImageError::io(path, format!("write at offset {off}"), e))
}

pub(crate) fn set_len(file: &File, path: &Path, len: u64) -> Result<(), ImageError> {
    file.set_len(len)
        .map_err(|e| ImageError::io(path, "cannot set file size", e))
}

/// The [`crate::ImageReader::block_status`] answer at or past the end of a disk of `size`
/// bytes: unallocated, for `max_len` bytes but at least 1. `None` inside the disk.
pub(crate) fn past_end(offset: u64, size: u64, max_len: u64) -> Option<(BlockStatus, u64)> {
    (offset >= size).then_some((BlockStatus::Unallocated, max_len.max(1)))
}

/// Data/hole status of a plain file region `[off, end)` via SEEK_DATA/SEEK_HOLE: holes are
/// [`BlockStatus::Zero`] (a plain file has no backing file). Falls back to "all data" where
/// the filesystem cannot tell.
pub(crate) fn file_block_status(file: &File, off: u64, end: u64) -> (BlockStatus, u64) {
    if off >= end {
        return (BlockStatus::Data, 0);
    }
    let data = match kiln_sys::sparse::seek_data(file, off) {
        Ok(Some(data)) => data,
        // No data after `off`: hole up to EOF (and beyond, which reads as zero for us).
        Ok(None) => return (BlockStatus::Zero, end - off),
        Err(_) => return (BlockStatus::Data, end - off),
    };
    if data > off {
        return (BlockStatus::Zero, data.min(end) - off);
    }
    let Ok(hole) = kiln_sys::sparse::seek_hole(file, off) else {
        return (BlockStatus::Data, end - off);
    };
    let hole = hole.max(off + 1);
    (BlockStatus::Data, hole.min(end) - off)
}

/// Start asynchronous writeback of everything dirty in `file`, so the final fsync overlaps
/// with copying instead of running after it. Best effort: errors surface at fsync time.
pub(crate) fn start_writeback(file: &File) {
    // SAFETY: plain syscall on a valid fd; offset 0 / nbytes 0 means "whole file".
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

pub(crate) use kiln_sys::sparse::is_zero;

pub(crate) fn round_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x / align * align)
}

/// An output file under a temporary name, removed on drop unless committed by [`commit`].
/// Creating one first sweeps the directory of temporaries that killed writers left behind
/// (see [`kiln_sys::temp`]).
pub(crate) struct TempOut {
    pub(crate) tmp: PathBuf,
    pub(crate) target: PathBuf,
    pub(crate) file: Option<File>,
    done: bool,
}

impl TempOut {
    /// Create a fresh temporary file next to `target`.
    pub(crate) fn create(target: &Path) -> Result<TempOut, ImageError> {
        if target.file_name().is_none() {
            return Err(ImageError::unsupported(
                target,
                "output path has no file name",
            ));
        }
        kiln_sys::temp::sweep(&parent_dir(target));
        let tmp = kiln_sys::temp::beside(target);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(|e| ImageError::io(target, "cannot create output file", e))?;
        Ok(TempOut {
            tmp,
            target: target.to_path_buf(),
            file: Some(file),
            done: false,
        })
    }

    pub(crate) fn file(&self) -> Result<&File, ImageError> {
        self.file
            .as_ref()
            .ok_or_else(|| ImageError::unsupported(&self.target, "output file already closed"))
    }

    /// A second handle to the temporary file, for a library that takes ownership of one.
    pub(crate) fn file_clone(&self) -> Result<File, ImageError> {
        self.file()?
            .try_clone()
            .map_err(|e| ImageError::io(&self.target, "cannot duplicate file handle", e))
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The directory a path is in (`.` for a bare name).
pub(crate) use kiln_sys::temp::parent_dir;

/// fsync every output (unless `fsync` is false), then rename them into place in order and
/// fsync their directories.
pub(crate) fn commit(mut outs: Vec<TempOut>, fsync: bool) -> Result<(), ImageError> {
    for o in &mut outs {
        if !fsync {
            o.file = None;
            continue;
        }
        if let Some(f) = o.file.take() {
            f.sync_all()
                .map_err(|e| ImageError::io(&o.target, "fsync failed", e))?;
        } else {
            let f = open_ro(&o.tmp)?;
            f.sync_all()
                .map_err(|e| ImageError::io(&o.target, "fsync failed", e))?;
        }
    }
    for o in &mut outs {
        std::fs::rename(&o.tmp, &o.target)
            .map_err(|e| ImageError::io(&o.target, "cannot rename temporary file into place", e))?;
        o.done = true;
    }
    if !fsync {
        return Ok(());
    }
    // Make the renames durable: one fsync per distinct directory.
    let mut dirs: Vec<PathBuf> = outs.iter().map(|o| parent_dir(&o.target)).collect();
    dirs.dedup();
    for d in dirs {
        if let Ok(d) = File::open(d) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A pseudo-random 16-byte identifier (image UUIDs) without pulling in an RNG crate.
pub(crate) fn pseudo_uuid() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i as u64);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out[6] = (out[6] & 0x0f) | 0x40; // version 4
    out[8] = (out[8] & 0x3f) | 0x80; // RFC 4122 variant
    out
}

pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// The byte ranges of one file that an image's metadata says hold distinct things (tables,
/// blocks, grains, clusters). Every range must lie inside the file and no two may overlap:
/// that is what bounds a reader's work and output by the file's real size, whatever its header
/// claims. Two table entries naming the same block (which would multiply it in the output) or a
/// table pointing into another table are refused.
pub(crate) struct Claims<'a> {
    path: &'a Path,
    format: Format,
    file_len: u64,
    spans: Vec<Span>,
}

/// One claimed range `[start, end)`, with what claimed it for error messages.
struct Span {
    start: u64,
    end: u64,
    what: &'static str,
    index: u64,
}

impl<'a> Claims<'a> {
    pub(crate) fn new(path: &'a Path, format: Format, file_len: u64) -> Self {
        Claims {
            path,
            format,
            file_len,
            spans: Vec::new(),
        }
    }

    /// Claim `[start, start + len)` for `what` number `index`; it must lie inside the file
    /// (`slack` bytes past its end are allowed, for formats that let the last block end
    /// short).
    pub(crate) fn claim_with_slack(
        &mut self,
        start: u64,
        len: u64,
        slack: u64,
        what: &'static str,
        index: u64,
    ) -> Result<(), ImageError> {
        let end = start.checked_add(len).filter(|e| {
            *e <= self.file_len.saturating_add(slack) && (len > 0 || start <= self.file_len)
        });
        let Some(end) = end else {
            return Err(ImageError::corrupt(
                self.path,
                self.format,
                format!(
                    "{what} {index} ({len} bytes at offset {start}) lies beyond the end of the file ({} bytes)",
                    self.file_len
                ),
            ));
        };
        if len == 0 {
            return Ok(());
        }
        // Images are usually laid out in order: extend the previous span when this one
        // continues it, so memory stays small for large, well-formed images.
        if let Some(last) = self.spans.last_mut() {
            if last.end == start && last.what == what {
                last.end = end;
                return Ok(());
            }
        }
        self.spans.push(Span {
            start,
            end,
            what,
            index,
        });
        Ok(())
    }

    /// [`Claims::claim_with_slack`] without slack.
    pub(crate) fn claim(
        &mut self,
        start: u64,
        len: u64,
        what: &'static str,
        index: u64,
    ) -> Result<(), ImageError> {
        self.claim_with_slack(start, len, 0, what, index)
    }

    /// Refuse the image if any two claimed ranges overlap.
    pub(crate) fn finish(mut self) -> Result<(), ImageError> {
        self.check()
    }

    /// Refuse the image if any two ranges claimed so far overlap: call it after claiming a
    /// level of tables and before walking them, so a table named a million times is refused
    /// before it is read a million times.
    pub(crate) fn check(&mut self) -> Result<(), ImageError> {
        self.spans.sort_unstable_by_key(|s| (s.start, s.end));
        for w in self.spans.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if b.start < a.end {
                return Err(ImageError::corrupt(
                    self.path,
                    self.format,
                    format!(
                        "{} {} (offset {}) overlaps {} {} (offset {}): two entries claim the same bytes",
                        b.what, b.index, b.start, a.what, a.index, a.start
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod claims_tests {
    use super::*;

    #[test]
    fn overlapping_and_out_of_file_claims_are_refused() {
        let p = Path::new("x.img");
        let mut c = Claims::new(p, Format::Vdi, 4096);
        c.claim(0, 512, "header", 0).unwrap();
        c.claim(512, 512, "block", 0).unwrap();
        c.claim(1024, 512, "block", 1).unwrap();
        c.finish().unwrap();

        let mut c = Claims::new(p, Format::Vdi, 4096);
        c.claim(1024, 512, "block", 0).unwrap();
        c.claim(0, 512, "header", 0).unwrap();
        c.claim(1024, 512, "block", 7).unwrap();
        let e = c.finish().unwrap_err().to_string();
        assert!(e.contains("block 7 (offset 1024) overlaps block 0"), "{e}");

        let mut c = Claims::new(p, Format::Vdi, 4096);
        let e = c.claim(4000, 512, "block", 3).unwrap_err().to_string();
        assert!(
            e.contains("block 3 (512 bytes at offset 4000) lies beyond"),
            "{e}"
        );
        assert!(c.claim(u64::MAX, 2, "block", 4).is_err());
    }
}
