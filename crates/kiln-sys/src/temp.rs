//! Temporary names for outputs being written, and sweeping up the ones a killed process left.
//!
//! Every output kiln writes (images, descriptors, state files, sites, image caches) is written
//! under a temporary name beside its final one, then renamed: a reader never sees half a file.
//! The temporary name records its writer — `.NAME.kiln-tmp-PID-START-N`, with the process's
//! start time so a reused pid is not mistaken for it — and whoever next writes into that
//! directory removes the temporaries whose writer is dead ([`sweep`]). So `kill -9` in the
//! middle of a conversion strands nothing for longer than the next command.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What marks a temporary name (after the final name, before the writer).
pub const MARK: &str = ".kiln-tmp-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory `path` is in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A fresh temporary name beside `target`, owned by this process: `.NAME.kiln-tmp-PID-START-N`.
/// The caller creates it (with `create_new`) and renames it onto `target` when complete.
pub fn beside(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let pid = std::process::id();
    let start = crate::process::start_time(pid).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_dir(target).join(format!(".{name}{MARK}{pid}-{start}-{n}"))
}

/// The writer (pid, start time) a temporary name records, if it is one.
fn writer(name: &str) -> Option<(u32, u64)> {
    if !name.starts_with('.') {
        return None;
    }
    let tail = &name[name.rfind(MARK)? + MARK.len()..];
    let mut parts = tail.split('-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?.parse::<u64>().ok()?;
    parts.next().is_none().then_some((pid, start))
}

/// Removes the temporaries in `dir` whose writer is no longer running (files, or directories
/// and everything in them; a symlink is removed, never followed). Best effort: returns how
/// many were removed, and a directory that cannot be read is simply left alone.
pub fn sweep(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((pid, start)) = name.to_str().and_then(writer) else {
            continue;
        };
        // Start time 0: recorded where /proc was unreadable; trust the pid alone.
        if crate::process::alive(pid, (start != 0).then_some(start)) {
            continue;
        }
        let path = e.path();
        let gone = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) => Err(e),
        };
        if gone.is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Writes `bytes` to `path` atomically: [`sweep`] its directory, write a temporary beside it,
/// extend it to `sparse_len` if given (a hole: no disk space), set `mode`, fsync, rename. A
/// crash leaves the old file or the new one, never half of one; a failure removes the
/// temporary.
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    sparse_len: Option<u64>,
    mode: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    sweep(&parent_dir(path));
    let tmp = beside(path);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if let Some(len) = sparse_len {
            f.set_len(len)?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A temporary directory beside `target` ([`beside`]), removed with everything in it when
/// dropped; creating one sweeps its parent first.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn beside(target: &Path) -> std::io::Result<TempDir> {
        sweep(&parent_dir(target));
        let dir = beside(target);
        fs::create_dir(&dir)?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_record_their_writer() {
        let t = beside(Path::new("/d/disk.qcow2"));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".disk.qcow2.kiln-tmp-"), "{name}");
        let (pid, start) = writer(name).unwrap();
        assert_eq!(pid, std::process::id());
        assert_eq!(Some(start), crate::process::start_time(pid));
        assert_eq!(t.parent(), Some(Path::new("/d")));
        for not in [
            "disk.qcow2",
            ".x.kiln-tmp-1-2",
            ".x.kiln-tmp-a-2-3",
            ".x.kiln-tmp-1-2-3-4",
        ] {
            assert_eq!(writer(not), None, "{not}");
        }
    }

    #[test]
    fn sweep_removes_only_the_dead_writers_temporaries() {
        let dir = std::env::temp_dir().join(format!("kiln-sweep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        // A writer that no longer runs: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = beside(&dir.join("live.img"));
        fs::write(&mine, b"x").unwrap();
        let stale_file = dir.join(format!(".a.img{MARK}{dead}-1-0"));
        fs::write(&stale_file, b"x").unwrap();
        let stale_dir = dir.join(format!(".site{MARK}{dead}-1-1"));
        fs::create_dir(&stale_dir).unwrap();
        fs::write(stale_dir.join("f"), b"x").unwrap();
        // Our own pid with another start time is a previous process that had our pid.
        let reused = dir.join(format!(".b.img{MARK}{}-1-2", std::process::id()));
        fs::write(&reused, b"x").unwrap();
        let other = dir.join("keep.img");
        fs::write(&other, b"x").unwrap();
        assert_eq!(sweep(&dir), 3);
        assert!(mine.exists() && other.exists());
        assert!(!stale_file.exists() && !stale_dir.exists() && !reused.exists());
        write_atomic(&dir.join("out"), b"hello", Some(4096), 0o644).unwrap();
        assert_eq!(fs::metadata(dir.join("out")).unwrap().len(), 4096);
        fs::remove_dir_all(&dir).unwrap();
    }
}
