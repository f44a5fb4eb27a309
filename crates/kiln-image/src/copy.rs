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
const WRITEBACK_EVERY: u64 = 16 << 20;

/// Buffers in flight between the reader thread and the writer.
const BUFFERS: usize = 3;

/// What the reader thread hands to the writer.
enum Piece {
    /// `len` bytes of data at `offset` in the buffer.
    Data(u64, Vec<u8>, usize),
    /// Everything before this offset is done (a zero or unallocated extent was skipped).
    Skipped(u64),
}

/// Stream `size` bytes of `source` into `sink`, skipping zero and unallocated extents and zero
/// runs inside data.
/// `out` is the output file whose writeback is started as we go (see [`start_writeback`]).
///
/// Reading runs on a scoped helper thread, writing on the caller's, so the two overlap;
/// a few CHUNK-sized buffers circulate between them, bounding memory.
pub(crate) fn copy(
    source: &mut dyn ImageReader,
    size: u64,
    sink: &mut dyn Sink,
    out: Option<&std::fs::File>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ImageError> {
    use std::sync::mpsc::sync_channel;
    progress(0, size);
    let (full_tx, full_rx) = sync_channel::<Piece>(BUFFERS);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        // Cannot fail: the receiver is alive and the channel has room.
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_pieces(source, size, full_tx, empty_rx));
        let written = write_pieces(sink, size, out, progress, full_rx, empty_tx);
        // If writing failed, full_rx is dropped by now, so the reader stops at its next send.
        let read = reader.join().unwrap_or_else(|_| {
            Err(ImageError::Io {
                path: "<source>".into(),
                what: "reader thread".into(),
                source: std::io::Error::other("panicked"),
            })
        });
        written.and(read)
    })
}

fn read_pieces(
    source: &mut dyn ImageReader,
    size: u64,
    full: std::sync::mpsc::SyncSender<Piece>,
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<(), ImageError> {
    let mut off = 0u64;
    while off < size {
        let want = size - off;
        let (status, len) = source.block_status(off, want)?;
        // A reader must make progress; treat a zero-length answer as one byte.
        let len = len.clamp(1, want);
        // Zero and unallocated extents are both skipped: they stay holes / unallocated.
        if !status.is_data() {
            off += len;
            if full.send(Piece::Skipped(off)).is_err() {
                return Ok(()); // writer gave up; its error is reported
            }
            continue;
        }
        let end = off + len;
        while off < end {
            // Align chunks to CHUNK boundaries so block formats see whole blocks per call.
            let n = ((CHUNK as u64 - off % CHUNK as u64).min(end - off)) as usize;
            let Ok(mut buf) = empty.recv() else {
                return Ok(());
            };
            source.read_at(&mut buf[..n], off)?;
            if full.send(Piece::Data(off, buf, n)).is_err() {
                return Ok(());
            }
            off += n as u64;
        }
    }
    Ok(())
}

fn write_pieces(
    sink: &mut dyn Sink,
    size: u64,
    out: Option<&std::fs::File>,
    progress: &mut dyn FnMut(u64, u64),
    full: std::sync::mpsc::Receiver<Piece>,
    empty: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Result<(), ImageError> {
    let mut since_kick = 0u64;
    for piece in full {
        match piece {
            Piece::Skipped(upto) => progress(upto, size),
            Piece::Data(off, buf, n) => {
                write_nonzero_runs(sink, off, &buf[..n])?;
                since_kick += n as u64;
                if since_kick >= WRITEBACK_EVERY {
                    if let Some(f) = out {
                        start_writeback(f);
                    }
                    since_kick = 0;
                }
                progress(off + n as u64, size);
                // The reader may already be done; then the buffer is simply dropped.
                let _ = empty.send(buf);
            }
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
