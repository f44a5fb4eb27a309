//! The streaming copy loop shared by all writers.

use crate::util::{is_zero, start_writeback, CHUNK};
use crate::{ImageError, ImageReader};

/// Granularity of zero detection inside data extents: zero runs of at least this size
/// (aligned to it) are not written, so they stay holes / unallocated.
pub(crate) const ZERO_GRAIN: usize = 4096;

/// Destination of a copy: receives only non-zero runs, in increasing offset order.
pub(crate) trait Sink {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError>;
}

/// Kick off writeback of the output after this many bytes of data were copied.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Stream `size` bytes of `source` into `sink`, skipping unallocated extents and zero runs.
/// `out` is the output file whose writeback is started as we go (see [`start_writeback`]).
pub(crate) fn copy(
    source: &mut dyn ImageReader,
    size: u64,
    sink: &mut dyn Sink,
    out: Option<&std::fs::File>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    let mut since_kick = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    progress(0, size);
    while off < size {
        let want = size - off;
        let (data, len) = source.block_status(off, want)?;
        // A reader must make progress; treat a zero-length answer as one data chunk.
        let len = len.clamp(1, want);
        if !data {
            off += len;
            progress(off, size);
            continue;
        }
        let end = off + len;
        while off < end {
            // Align chunks to CHUNK boundaries so block formats see whole blocks per call.
            let n = ((CHUNK as u64 - off % CHUNK as u64).min(end - off)) as usize;
            let b = &mut buf[..n];
            source.read_at(b, off)?;
            write_nonzero_runs(sink, off, b)?;
            off += n as u64;
            since_kick += n as u64;
            if since_kick >= WRITEBACK_EVERY {
                if let Some(f) = out {
                    start_writeback(f);
                }
                since_kick = 0;
            }
            progress(off, size);
        }
    }
    Ok(())
}

fn write_nonzero_runs(sink: &mut dyn Sink, base: u64, buf: &[u8]) -> Result<(), ImageError> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0usize;
    while pos < buf.len() {
        // Pieces aligned to absolute ZERO_GRAIN boundaries.
        let abs = base + pos as u64;
        let piece = ((ZERO_GRAIN as u64 - abs % ZERO_GRAIN as u64) as usize).min(buf.len() - pos);
        let zero = is_zero(&buf[pos..pos + piece]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                sink.write(base + s as u64, &buf[s..pos])?;
                run_start = None;
            }
            _ => {}
        }
        pos += piece;
    }
    if let Some(s) = run_start {
        sink.write(base + s as u64, &buf[s..])?;
    }
    Ok(())
}

/// Bounds check for `read_at` implementations.
pub(crate) fn check_range(
    path: &std::path::Path,
    offset: u64,
    len: usize,
    size: u64,
) -> Result<(), ImageError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len: len as u64,
            size,
        }),
    }
}
