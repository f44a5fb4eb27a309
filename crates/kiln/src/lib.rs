//! The kiln library behind the `kiln` command: each command is a thin shell over a function here
//! or in one of the focused crates (kiln-boot, kiln-image, kiln-host, kiln-web).

pub mod build;

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// A crash leaves either the old file or the new one, never half of it.
pub fn write_atomic(path: &Path, bytes: &[u8], sparse_len: Option<u64>) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-tmp-")
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "{}: cannot create a file in {}",
                path.display(),
                dir.display()
            )
        })?;
    tmp.write_all(bytes)
        .with_context(|| format!("{}: write failed", path.display()))?;
    if let Some(len) = sparse_len {
        // Extending with set_len leaves a hole: the padding costs no disk space.
        tmp.as_file()
            .set_len(len)
            .with_context(|| format!("{}: cannot extend to {len} bytes", path.display()))?;
    }
    // tempfile creates 0600; an image is an ordinary file like any other the user writes.
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("{}: fsync failed", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
