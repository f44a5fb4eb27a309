//! A root tree as v86's 9p filesystem: `fs.json` (v86's format version 3) and the file
//! contents under `fs/`, named by their SHA-256, fetched by v86 only when the guest reads them.
//!
//! Each entry is `[name, size, mtime, mode, uid, gid, x]`, where `mode` is the whole `st_mode`
//! (type bits tell a directory, a regular file or a symlink) and `x` is the child array of a
//! directory, the content's file name for a regular file, the target of a symlink. The root
//! itself has no entry. v86 has no hard links (each path gets an entry; the contents are shared
//! by name), no device nodes, FIFOs or sockets (skipped and counted), 32-bit sizes and times,
//! and UTF-8 names only. A content file is zstd-compressed (`.bin.zst`, which v86 inflates to
//! exactly the entry's size) when that saves at least a tenth; empty files are plain `.bin`.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{io_at, refused, RootfsError};

/// v86's filesystem JSON version.
pub const VERSION: u32 = 3;
/// The index file's name in an image directory.
pub const INDEX: &str = "fs.json";
/// The content directory's name in an image directory.
pub const FILES: &str = "fs";
/// Largest file v86 can serve (its 9p sizes are 32-bit, and it holds a file whole in memory).
const MAX_FILE: u64 = (1 << 32) - 1;

/// What [`write`] made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub entries: u64,
    /// Distinct contents written under `fs/`.
    pub blobs: u64,
    /// Bytes of regular files (v86's `size`).
    pub bytes: u64,
    /// Device nodes, FIFOs and sockets v86 cannot represent.
    pub skipped: u64,
}

/// Writes `tree` as `out/fs.json` and `out/fs/` (which must not exist).
pub fn write(tree: &Path, out: &Path) -> Result<Written, RootfsError> {
    let files = out.join(FILES);
    fs::create_dir(&files).map_err(io_at(&files, "cannot create"))?;
    let mut w = Written::default();
    let mut seen = HashSet::new();
    let root = children(tree, tree, &files, &mut seen, &mut w)?;
    let index = json!({ "fsroot": root, "version": VERSION, "size": w.bytes });
    let path = out.join(INDEX);
    let text =
        serde_json::to_vec(&index).map_err(|e| refused(&path, format!("cannot encode: {e}")))?;
    kiln_sys::temp::write_atomic(&path, &text, None, 0o644)
        .map_err(io_at(&path, "cannot write"))?;
    Ok(w)
}

fn children(
    tree: &Path,
    dir: &Path,
    files: &Path,
    seen: &mut HashSet<String>,
    w: &mut Written,
) -> Result<Vec<Value>, RootfsError> {
    let entries = crate::tree::sorted_entries(dir)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(tree).unwrap_or(&p);
        let name = e
            .file_name()
            .into_string()
            .map_err(|_| refused(&p, "its name is not UTF-8, which v86's 9p cannot carry"))?;
        let m = fs::symlink_metadata(&p).map_err(io_at(&p, "cannot read"))?;
        let t = m.file_type();
        let (size, x) = if t.is_dir() {
            (0, Value::Array(children(tree, &p, files, seen, w)?))
        } else if t.is_symlink() {
            let to = fs::read_link(&p).map_err(io_at(&p, "cannot read"))?;
            let to = to.into_os_string().into_string().map_err(|_| {
                refused(
                    &p,
                    "its symlink target is not UTF-8, which v86's 9p cannot carry",
                )
            })?;
            (to.len() as u64, Value::String(to))
        } else if t.is_file() {
            if m.len() > MAX_FILE {
                return Err(refused(
                    &PathBuf::from("/").join(rel),
                    "is 4 GiB or larger: v86's 9p sizes are 32-bit",
                ));
            }
            let blob = store(&p, m.len(), files, seen, w)?;
            w.bytes += m.len();
            (m.len(), Value::String(blob))
        } else {
            w.skipped += 1;
            continue;
        };
        let mtime = m.mtime().clamp(0, u32::MAX as i64);
        let entry = json!([name, size, mtime, m.mode(), m.uid(), m.gid(), x]);
        w.entries += 1;
        out.push(entry);
    }
    Ok(out)
}

/// Stores the content of `path` under `files` by its SHA-256 (once per content) and returns
/// its file name there.
fn store(
    path: &Path,
    len: u64,
    files: &Path,
    seen: &mut HashSet<String>,
    w: &mut Written,
) -> Result<String, RootfsError> {
    let mut data = Vec::with_capacity(len.min(64 << 20) as usize);
    fs::File::open(path)
        .and_then(|f| f.take(len).read_to_end(&mut data))
        .map_err(io_at(path, "cannot read"))?;
    if data.len() as u64 != len {
        return Err(refused(path, "changed size while it was read"));
    }
    let hex = format!("{:x}", Sha256::digest(&data));
    let compressed = if data.len() >= 512 {
        zstd::bulk::compress(&data, 3)
            .ok()
            .filter(|c| c.len() < data.len() - data.len() / 10)
    } else {
        None
    };
    let name = match &compressed {
        Some(_) => format!("{hex}.bin.zst"),
        None => format!("{hex}.bin"),
    };
    if seen.insert(name.clone()) {
        let target = files.join(&name);
        let bytes = compressed.as_deref().unwrap_or(&data);
        let mut f = fs::File::create(&target).map_err(io_at(&target, "cannot create"))?;
        f.write_all(bytes).map_err(io_at(&target, "cannot write"))?;
        w.blobs += 1;
    }
    Ok(name)
}
