//! File-system calls std has no safe wrapper for: device nodes and FIFOs.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What [`mknod`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// Makes the device node or FIFO `path` with permission bits `mode` (device nodes need
/// CAP_MKNOD). Never follows a symlink: an existing `path` is an error.
pub fn mknod(path: &Path, node: Node, mode: u32) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let (kind, dev) = match node {
        Node::Char { major, minor } => (libc::S_IFCHR, libc::makedev(major, minor)),
        Node::Block { major, minor } => (libc::S_IFBLK, libc::makedev(major, minor)),
        Node::Fifo => (libc::S_IFIFO, 0),
    };
    // SAFETY: mknod(2) with a NUL-terminated path this function owns; it only creates a node.
    if unsafe { libc::mknod(c.as_ptr(), kind | (mode & 0o7777), dev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A device number's major and minor parts.
pub fn split_dev(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fifos_are_made_and_existing_paths_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fifo");
        super::mknod(&p, super::Node::Fifo, 0o640).unwrap();
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_fifo());
        assert!(super::mknod(&p, super::Node::Fifo, 0o640).is_err());
    }
}
