//! The kiln library behind the `kiln` command: each command is a thin shell over a function here
//! or in one of the focused crates (kiln-boot, kiln-image, kiln-host, kiln-web).

pub mod build;

use std::path::Path;

/// Writes `bytes` to `path` atomically (see [`kiln_sys::temp::write_atomic`]), extended with a
/// hole to `sparse_len` if given; a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8], sparse_len: Option<u64>) -> anyhow::Result<()> {
    use anyhow::Context;
    kiln_sys::temp::write_atomic(path, bytes, sparse_len, 0o644)
        .with_context(|| format!("{}: cannot write", path.display()))
}
