//! The boot disk abstraction the firmware reads and writes through.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A virtual disk as seen by int 13h: a flat array of bytes.
///
/// The lead adapts image-format readers (QCOW2, VMDK, ...) to this trait.
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from byte offset `off`; fails if the range is outside the disk.
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes `buf` at byte offset `off`; fails if the range is outside the disk or the
    /// disk is read-only.
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
}

fn check_range(size: u64, off: u64, len: usize) -> io::Result<()> {
    match off.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("access of {len} bytes at offset {off} is beyond the disk end ({size} bytes)"),
        )),
    }
}

/// A disk held in memory (writes change the vector only).
#[derive(Debug, Clone, Default)]
pub struct MemDisk {
    data: Vec<u8>,
}

impl MemDisk {
    /// Wraps `data` as a disk.
    pub fn new(data: Vec<u8>) -> MemDisk {
        MemDisk { data }
    }
    /// The current contents.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(self.size(), off, buf.len())?;
        let off = off as usize;
        buf.copy_from_slice(&self.data[off..off + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(self.size(), off, buf.len())?;
        let off = off as usize;
        self.data[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

/// A raw disk image file.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileDisk {
    /// Opens a raw image; `read_only` makes guest writes fail (int 13h reports an error).
    pub fn open(path: &std::path::Path, read_only: bool) -> io::Result<FileDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let size = file.metadata()?.len();
        Ok(FileDisk {
            file,
            size,
            read_only,
        })
    }
}

impl Disk for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(self.size, off, buf.len())?;
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        check_range(self.size, off, buf.len())?;
        self.file.write_all_at(buf, off)
    }
}
