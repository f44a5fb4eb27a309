//! Advisory whole-file locks (flock): released on drop or when the process dies, so a lock can
//! never outlive its holder.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::process;

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

    /// Writes "PID START" of this process into the locked file, so that [`holder`] can prove
    /// which process holds it (the start time guards against a reused pid).
    pub fn record_holder(&self) -> io::Result<()> {
        let me = std::process::id();
        let start = process::start_time(me).unwrap_or(0);
        let mut f = &self.file;
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(format!("{me} {start}\n").as_bytes())
    }
}

/// A lock file opened (not locked) to be waited for later, identified by its inode so that a
/// file of the same name made later by someone else is never taken for it.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    id: (u64, u64),
}

impl LockFile {
    /// Opens the existing lock file `path`.
    pub fn open(path: &Path) -> io::Result<LockFile> {
        let file = File::open(path)?;
        let m = file.metadata()?;
        Ok(LockFile {
            file,
            id: (m.dev(), m.ino()),
        })
    }

    /// True when `path` is this very file (not one made under its name since).
    pub fn is_at(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    /// Waits up to `timeout` until nobody holds the lock; true once it is free (and held by
    /// this process until the `LockFile` is dropped).
    pub fn wait_free(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match flock(&self.file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => return true,
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
                Err(_) => return false,
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// The process holding the lock on `path`, when it can be proven: the lock is held now, the
/// file names "PID START" (see [`FileLock::record_holder`]), that pid runs with that very
/// start time, and it has this very file open. `None` when nobody holds it or the holder
/// cannot be proven: never signal a pid this did not return.
pub fn holder(path: &Path) -> Option<u32> {
    if !is_locked(path) {
        return None;
    }
    let (pid, start) = recorded_holder(path)?;
    let m = std::fs::metadata(path).ok()?;
    let proven = start != 0
        && process::alive(pid, Some(start))
        && has_open(pid, (m.dev(), m.ino()))
        && process::alive(pid, Some(start))
        && is_locked(path);
    proven.then_some(pid)
}

/// True when process `pid` has the file `(dev, ino)` open.
fn has_open(pid: u32, id: (u64, u64)) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == id))
}

/// The "PID START" recorded in the lock file `path` by its last holder, alive or not.
pub fn recorded_holder(path: &Path) -> Option<(u32, u64)> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    let mut words = text.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    let start = words.next()?.parse().ok()?;
    Some((pid, start))
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

    /// A lock released here stays held until a child forked meanwhile by another test of this
    /// process has exec'd (the child shares the open file description until its close-on-exec):
    /// so "released" is checked with a short grace period.
    fn released(path: &Path) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_locked(path) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

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
        assert!(released(&path));
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_holder_is_proven_or_not_named() {
        let dir = std::env::temp_dir().join(format!("kiln-sys-holder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l");
        let held = FileLock::exclusive(&path).unwrap();
        // Held, but nothing recorded: not proven.
        assert_eq!(holder(&path), None);
        held.record_holder().unwrap();
        assert_eq!(holder(&path), Some(std::process::id()));
        // A recorded holder whose start time does not match is somebody else.
        let start = process::start_time(std::process::id()).unwrap();
        std::fs::write(&path, format!("{} {}\n", std::process::id(), start + 1)).unwrap();
        assert_eq!(holder(&path), None);
        held.record_holder().unwrap();
        // Held by a process other than the one named (which does not have it open).
        let other = dir.join("other");
        let elsewhere = FileLock::exclusive(&other).unwrap();
        drop(held);
        let init_start = process::start_time(1).unwrap_or(1);
        std::fs::write(&other, format!("1 {init_start}\n")).unwrap();
        assert_eq!(holder(&other), None, "pid 1 does not hold it");
        drop(elsewhere);
        let held = FileLock::exclusive(&path).unwrap();
        held.record_holder().unwrap();
        // Not held: nobody to name, whatever the file says.
        drop(held);
        assert_eq!(holder(&path), None);
        assert_eq!(recorded_holder(&path), Some((std::process::id(), start)));
        let waiting = LockFile::open(&path).unwrap();
        assert!(waiting.is_at(&path));
        assert!(waiting.wait_free(std::time::Duration::from_secs(5)));
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "").unwrap();
        assert!(
            !waiting.is_at(&path),
            "a new file of the same name is not the one opened"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
