//! Reading a served site directory without ever leaving it: each path component is opened
//! relative to its parent's descriptor with `O_NOFOLLOW`, so a symlink anywhere in the path
//! (to a file or a directory, inside the site or out of it) is refused rather than followed.

use std::ffi::CString;
use std::fs::File;
use std::io::{Error, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Why a site path cannot be served.
#[derive(Debug)]
pub(crate) enum Refused {
    /// A component is a symlink.
    Symlink,
    /// Absent, not a regular file, or unreadable.
    NotFound,
}

fn open_at(dir: &OwnedFd, name: &str, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let name =
        CString::new(name).map_err(|_| Error::new(ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `dir` is an open descriptor we own and `name` a NUL-terminated string that
    // outlives the call; openat returns a new descriptor or -1 and touches no other memory.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat, is valid, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open the regular file `rel` (`/`-separated, components already checked to be plain names)
/// inside `root`. Returns the file and its size.
pub(crate) fn open_inside(root: &Path, rel: &str) -> Result<(File, u64), Refused> {
    let mut fd: OwnedFd = File::open(root).map_err(|_| Refused::NotFound)?.into();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() || *part == "." || *part == ".." {
            return Err(Refused::NotFound);
        }
        let last = i + 1 == parts.len();
        // O_NONBLOCK: opening a FIFO planted in the site must not hang the server.
        let flags = libc::O_RDONLY
            | libc::O_CLOEXEC
            | libc::O_NOFOLLOW
            | if last {
                libc::O_NONBLOCK
            } else {
                libc::O_DIRECTORY
            };
        fd = match open_at(&fd, part, flags) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(Refused::Symlink),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) && !last => {
                // O_DIRECTORY|O_NOFOLLOW on a symlink to a directory: tell which.
                let is_link = open_at(&fd, part, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .ok()
                    .map(File::from)
                    .and_then(|f| f.metadata().ok())
                    .is_some_and(|m| m.file_type().is_symlink());
                return Err(if is_link {
                    Refused::Symlink
                } else {
                    Refused::NotFound
                });
            }
            Err(_) => return Err(Refused::NotFound),
        };
    }
    let file = File::from(fd);
    match file.metadata() {
        Ok(m) if m.is_file() => Ok((file, m.len())),
        _ => Err(Refused::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_refused_anywhere_in_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let site = tmp.path().join("site");
        std::fs::create_dir_all(site.join("sub")).unwrap();
        std::fs::write(site.join("sub/a.txt"), b"inside").unwrap();
        std::fs::write(tmp.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), site.join("link")).unwrap();
        std::os::unix::fs::symlink("sub/a.txt", site.join("inner-link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), site.join("up")).unwrap();
        let (_, n) = open_inside(&site, "sub/a.txt").unwrap();
        assert_eq!(n, 6);
        assert!(matches!(open_inside(&site, "link"), Err(Refused::Symlink)));
        assert!(matches!(
            open_inside(&site, "inner-link"),
            Err(Refused::Symlink)
        ));
        assert!(matches!(
            open_inside(&site, "up/secret"),
            Err(Refused::Symlink)
        ));
        assert!(matches!(open_inside(&site, "sub"), Err(Refused::NotFound)));
        assert!(matches!(open_inside(&site, "nope"), Err(Refused::NotFound)));
        assert!(matches!(
            open_inside(&site, "../secret"),
            Err(Refused::NotFound)
        ));
    }
}
