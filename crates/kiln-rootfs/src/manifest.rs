//! `image.json`: what an image directory holds (written by the image builders, read by `kiln vm run --image`).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::RootfsError;

/// The manifest's file name inside an image directory.
pub const IMAGE_MANIFEST: &str = "image.json";

/// An image directory's manifest. File names are relative to the directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// `debian-bookworm`, ...
    pub name: String,
    /// The root filesystem (ext4, raw): the VMs' read-only base.
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel arguments the image wants.
    #[serde(default)]
    pub cmdline: String,
    /// A ready ext4 filesystem holding the image's /home (the per-VM /home disk's seed).
    #[serde(default)]
    pub home_seed: Option<PathBuf>,
    /// A ready ext4 filesystem holding the image's /var.
    #[serde(default)]
    pub var_seed: Option<PathBuf>,
    #[serde(default)]
    pub created_at: Option<String>,
    /// Builder details (suite, packages, fingerprint), informational.
    #[serde(default)]
    pub builder: serde_json::Value,
    /// The CPU architecture of its binaries (absent in images made before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<crate::tree::Arch>,
    /// The root tree as v86's 9p filesystem (i386 images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs9p: Option<Fs9p>,
}

/// Where an image's 9p filesystem is: v86's index and the content files it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fs9p {
    /// `fs.json`.
    pub index: PathBuf,
    /// `fs/`.
    pub files: PathBuf,
}

impl ImageManifest {
    /// Reads `DIR/image.json` and makes its paths absolute (relative to `DIR`).
    pub fn load(dir: &Path) -> Result<ImageManifest, RootfsError> {
        let path = dir.join(IMAGE_MANIFEST);
        let text = fs::read_to_string(&path).map_err(|e| RootfsError::Manifest {
            path: path.clone(),
            why: format!("cannot read: {e}"),
        })?;
        let mut m: ImageManifest =
            serde_json::from_str(&text).map_err(|e| RootfsError::Manifest {
                path: path.clone(),
                why: format!("not a valid image.json: {e}"),
            })?;
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        m.rootfs = abs(&m.rootfs);
        m.kernel = abs(&m.kernel);
        m.initrd = m.initrd.as_deref().map(abs);
        m.home_seed = m.home_seed.as_deref().map(abs);
        m.var_seed = m.var_seed.as_deref().map(abs);
        if let Some(f) = &mut m.fs9p {
            f.index = abs(&f.index);
            f.files = abs(&f.files);
        }
        Ok(m)
    }

    /// Writes `DIR/image.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), RootfsError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| RootfsError::Manifest {
            path: dir.join(IMAGE_MANIFEST),
            why: format!("cannot encode: {e}"),
        })?;
        crate::write_atomic(&dir.join(IMAGE_MANIFEST), &json)
    }
}
