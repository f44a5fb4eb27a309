//! Advisory locks (flock) on a VM's lock file: vm.json updates are read-modify-write.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::HostError;

/// An exclusive flock, released on drop (or when the process dies).
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is held.
    pub(crate) fn acquire(path: &Path) -> Result<FileLock, HostError> {
        Self::lock(path, libc::LOCK_EX)?.ok_or_else(|| {
            HostError::io(
                format!("{}: cannot lock", path.display()),
                std::io::ErrorKind::WouldBlock.into(),
            )
        })
    }

    fn lock(path: &Path, op: i32) -> Result<Option<FileLock>, HostError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| HostError::io(format!("{}: cannot open lock file", path.display()), e))?;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(None),
                _ => {
                    return Err(HostError::io(
                        format!("{}: cannot lock", path.display()),
                        err,
                    ))
                }
            }
        }
    }
}
