//! ext4 tooling: sparse ext4 disks made with mkfs.ext4 (seeded from a directory or a ready
//! filesystem), sparse copies, and reading a directory out of an image with debugfs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io_at, RootfsError};

/// Where a new disk's initial files come from.
#[derive(Clone, Debug)]
pub enum Seed {
    /// A ready ext4 image (shipped by the image builder): copied sparsely, then resized.
    Image(PathBuf),
    /// A directory tree: `mkfs.ext4 -d`.
    Dir(PathBuf),
}

/// Makes `path` a sparse ext4 filesystem of `size` bytes labelled `label`, holding the files of
/// `seed`. `path` must not exist.
pub fn make_ext4_disk(
    path: &Path,
    size: u64,
    seed_dir: Option<&Path>,
    label: &str,
) -> Result<(), RootfsError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_at(path, "cannot create"))?;
    file.set_len(size)
        .map_err(io_at(path, &format!("cannot size to {size} bytes")))?;
    drop(file);
    let mut cmd = Command::new("mkfs.ext4");
    // A sparse file already reads as zeros: no need to zero inode tables or the journal.
    cmd.args([
        "-q",
        "-F",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1",
        "-L",
        label,
    ]);
    if let Some(dir) = seed_dir {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(path);
    run_tool(&mut cmd, "mkfs.ext4", "apt-get install e2fsprogs")
}

/// Makes the disk from `seed` (see [`Seed`]).
pub fn make_seeded_disk(
    path: &Path,
    size: u64,
    seed: &Seed,
    label: &str,
) -> Result<(), RootfsError> {
    match seed {
        Seed::Dir(dir) => make_ext4_disk(path, size, Some(dir), label),
        Seed::Image(image) => {
            copy_sparse(image, path)?;
            let seed_size = fs::metadata(image)
                .map_err(io_at(image, "cannot read"))?
                .len();
            if seed_size != size {
                run_tool(
                    Command::new("resize2fs")
                        .arg(path)
                        .arg(format!("{}K", size / 1024)),
                    "resize2fs",
                    "apt-get install e2fsprogs",
                )?;
                // Growing leaves the file at its old length until written; make it exact.
                fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(size))
                    .map_err(io_at(path, "cannot size"))?;
            }
            Ok(())
        }
    }
}

/// Copies `from` (an ext4 image on the host) to a new file `to`, keeping holes (see
/// [`kiln_sys::sparse::copy`]).
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), RootfsError> {
    kiln_sys::sparse::copy(from, to)
        .map_err(io_at(to, &format!("cannot copy from {}", from.display())))
}

/// Copies directory `dir` (absolute, like `/var`) out of the ext4 image `image` into `dest`
/// with debugfs (no mount, no root needed), returning the extracted directory. A directory the
/// image lacks yields an empty directory. `/` is extracted into `dest` itself (debugfs's rdump
/// writes the root's entries there).
pub fn extract_dir(image: &Path, dir: &str, dest: &Path) -> Result<PathBuf, RootfsError> {
    fs::create_dir_all(dest).map_err(io_at(dest, "cannot create"))?;
    let base = dir.trim_matches('/');
    let out = if base.is_empty() {
        dest.to_path_buf()
    } else {
        dest.join(base)
    };
    let mut cmd = Command::new("debugfs");
    cmd.arg("-R")
        .arg(format!("rdump {dir} {}", dest.display()))
        .arg(image);
    run_tool(&mut cmd, "debugfs", "apt-get install e2fsprogs")?;
    if !out.is_dir() {
        fs::create_dir_all(&out).map_err(io_at(&out, "cannot create"))?;
    }
    Ok(out)
}

/// Runs an external tool, turning a missing binary or a failure into a one-line error.
pub(crate) fn run_tool(cmd: &mut Command, tool: &str, install: &str) -> Result<(), RootfsError> {
    use kiln_sys::process::ToolError;
    let detail = match kiln_sys::process::run_tool(cmd, None) {
        Ok(_) => return Ok(()),
        Err(ToolError::Missing) => format!("not installed ({install})"),
        Err(ToolError::Io(e)) => e.to_string(),
        Err(ToolError::Failed { status, stderr }) => format!(
            "{} ({status})",
            kiln_sys::process::stderr_line(&stderr, true).unwrap_or("no message")
        ),
    };
    Err(RootfsError::ToolFailed {
        tool: tool.to_string(),
        detail,
    })
}
