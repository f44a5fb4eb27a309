//! Advisory whole-file locks (flock): released on drop or when the process dies, so a lock can
//! never outlive its holder.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// A held flock on a file (created if missing).
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Blocks until the exclusive lock on `path` is held.
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        let file = open(path)?;
        flock(&file, libc::LOCK_EX)?;
        Ok(FileLock { file })
    }

    /// The exclusive lock on `path` if nobody holds it now; `None` if someone does.
    pub fn try_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
        let file = open(path)?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// True when some process holds a lock on `path` now (a missing file is not locked).
pub fn is_locked(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    // A shared lock we get is released when `file` closes at the end of this function.
    matches!(flock(&file, libc::LOCK_SH | libc::LOCK_NB), Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK))
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
}

fn flock(file: &File, op: i32) -> io::Result<()> {
    loop {
        // SAFETY: flock(2) on a descriptor `file` owns for the whole call; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = std::env::temp_dir().join(format!("kiln-sys-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l");
        assert!(!is_locked(&path));
        let held = FileLock::exclusive(&path).unwrap();
        assert!(is_locked(&path));
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop(held);
        assert!(!is_locked(&path));
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
