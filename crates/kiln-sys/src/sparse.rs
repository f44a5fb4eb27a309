//! Sparse files: where their data lies (SEEK_DATA/SEEK_HOLE), copying only that, and a digest
//! that depends on the content alone, never on where the holes happen to be. A VM's 2 GiB
//! disk or 1 GiB memory file holds a few hundred MiB of data; these never read the rest.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use sha2::{Digest, Sha256};

/// True when `buf` is all zero bytes (a few leading bytes first: real data rarely starts with
/// many zeros; then 4 KiB at a time, which the compiler vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    if buf.iter().take(64).any(|&b| b != 0) {
        return false;
    }
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// lseek(2) with `whence` from `off`; moving the file position is harmless to callers, which
/// read and write with pread/pwrite only.
fn seek(file: &File, off: u64, whence: i32) -> io::Result<u64> {
    let at =
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor `file` owns; it touches no memory.
    let to = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if to < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(to as u64)
}

/// The first data of `file` at or after `off` (SEEK_DATA); `None` when only a hole follows. An
/// error where the file system cannot tell.
pub fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    match seek(file, off, libc::SEEK_DATA) {
        Ok(at) => Ok(Some(at)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The first hole of `file` at or after `off` (SEEK_HOLE; the end of the file is one).
pub fn seek_hole(file: &File, off: u64) -> io::Result<u64> {
    seek(file, off, libc::SEEK_HOLE)
}

/// The data extents `(offset, end)` of `file` (of length `len`) in order: everything but its
/// holes. Where the file system cannot tell, the whole file is one extent.
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match seek_data(file, pos) {
            Ok(Some(data)) => data.min(len),
            Ok(None) => break,
            // No SEEK_DATA here: treat the rest as data.
            Err(_) => {
                out.push((pos, len));
                break;
            }
        };
        let end = seek_hole(file, start).map_or(len, |hole| hole.clamp(start, len));
        if end > start {
            out.push((start, end));
        }
        // Always forward, whatever the file system answers.
        pos = end.max(pos + 1);
    }
    out
}

/// The size of a memory page.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Which pages of the mapping at `addr` (page-aligned) of `len` bytes are in memory: of a new
/// anonymous mapping, the ones something has touched. mincore(2) only reports; an address that
/// is not mapped is an error, never a fault.
pub fn resident_pages(addr: usize, len: usize) -> io::Result<Vec<bool>> {
    let page = page_size();
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: mincore reads no memory at `addr`; it writes one byte per page into `vec`,
    // which has exactly that many.
    if unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

/// The block size of [`digest`].
pub const DIGEST_BLOCK: usize = 4096;

/// A SHA-256 of `path`'s content that skips zeros: the hash of `le64(offset) || block` for
/// every 4 KiB block that is not all zero, then `le64(length)`. Two files with the same bytes
/// have the same digest however their holes lie, and only data extents are read. Reads at
/// most `limit` bytes of length (a longer file is reported with its real length, unhashed
/// past it). Returns the length and the hex digest.
pub fn digest(path: &Path, limit: Option<u64>) -> io::Result<(u64, String)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut h = Sha256::new();
    let hashed = limit.map_or(len, |l| len.min(l));
    let mut buf = vec![0u8; 1 << 20];
    // Everything before this offset is hashed (extents of a file system with blocks smaller
    // than the digest's may share a digest block).
    let mut done = 0u64;
    for (start, end) in data_extents(&file, hashed) {
        // Blocks are aligned to the file, not the extent, so the layout cannot matter.
        let mut off = (start / DIGEST_BLOCK as u64 * DIGEST_BLOCK as u64).max(done);
        while off < end {
            let want = ((end - off) as usize).min(buf.len());
            let want = want.div_ceil(DIGEST_BLOCK) * DIGEST_BLOCK;
            let want = want.min((hashed - off) as usize);
            let chunk = &mut buf[..want];
            file.read_exact_at(chunk, off)?;
            for (i, block) in chunk.chunks(DIGEST_BLOCK).enumerate() {
                if !is_zero(block) {
                    h.update((off + (i * DIGEST_BLOCK) as u64).to_le_bytes());
                    h.update(block);
                }
            }
            off += want as u64;
        }
        done = done.max(off);
    }
    h.update(len.to_le_bytes());
    Ok((len, format!("{:x}", h.finalize())))
}

/// Copies `from` to the new file `to` (which must not exist), keeping holes: a reflink where
/// the file system has them, else only the data extents, copied in the kernel.
pub fn copy(from: &Path, to: &Path) -> io::Result<()> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    // SAFETY: FICLONE with two descriptors we own; failure just means "copy instead".
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    dst.set_len(len)?;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    for (start, end) in data_extents(&src, len) {
        let (mut off_in, mut off_out) = (start as i64, start as i64);
        while (off_in as u64) < end {
            let n = (end - off_in as u64) as usize;
            // SAFETY: copy_file_range between our descriptors with offsets we own.
            let k = unsafe { libc::copy_file_range(s, &mut off_in, d, &mut off_out, n, 0) };
            if k < 0 {
                return Err(io::Error::last_os_error());
            }
            if k == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while it was copied", from.display()),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn holes_do_not_change_the_digest_and_copies_keep_them() {
        let d = tempfile::tempdir().unwrap();
        let sparse = d.path().join("sparse");
        let mut f = File::create(&sparse).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        drop(f);
        // The same bytes written out in full, zeros and all.
        let dense = d.path().join("dense");
        let mut bytes = vec![0u8; 64 << 20];
        bytes[10 << 20..(10 << 20) + 5000].fill(7);
        std::fs::write(&dense, &bytes).unwrap();
        let (len, a) = digest(&sparse, None).unwrap();
        assert_eq!(len, 64 << 20);
        assert_eq!(digest(&dense, None).unwrap().1, a);
        // One changed byte, or another length, is another digest.
        bytes[(10 << 20) + 4999] = 8;
        std::fs::write(&dense, &bytes).unwrap();
        assert_ne!(digest(&dense, None).unwrap().1, a);
        std::fs::write(&dense, &bytes[..32 << 20]).unwrap();
        assert_ne!(digest(&dense, None).unwrap().1, a);

        let copy_path = d.path().join("copy");
        copy(&sparse, &copy_path).unwrap();
        assert_eq!(digest(&copy_path, None).unwrap().1, a);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&copy_path).unwrap().blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "{blocks} blocks: the copy is not sparse"
        );
        assert!(
            copy(&sparse, &copy_path).is_err(),
            "never over an existing file"
        );
    }
}
