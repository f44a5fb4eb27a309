//! `kiln image create OUT --from-dir DIR | --from-oci PATH`: an image directory from a root
//! tree or an OCI image, without a container runtime. The tree is copied or unpacked exactly
//! ([`crate::tree::copy_tree`], [`crate::oci::unpack`]), checked (it has a `/bin/sh`, whose ELF
//! header says its architecture; `--arch` must agree), and written as `rootfs.ext4` with the
//! kernel and initrd (from the tree's `/boot`, or given) beside it and an `image.json` that
//! `kiln vm run --image` boots. The output is made under a temporary name and renamed into
//! place when complete.

use std::fs;
use std::path::{Path, PathBuf};

use crate::tree::Arch;
use crate::{io_at, refused, ImageManifest, RootfsError};

/// Where the tree comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A root directory, copied exactly.
    Dir(PathBuf),
    /// An OCI layout directory, an OCI archive or a `docker save` tarball.
    Oci(PathBuf),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::Oci(p) => p,
        }
    }
}

/// What `kiln image create` makes.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub source: Source,
    /// The architecture the image must have (checked against its `/bin/sh`).
    pub arch: Option<Arch>,
    /// The kernel (default: the newest `/boot/vmlinuz*` of the tree).
    pub kernel: Option<PathBuf>,
    /// The initrd (default: the newest `/boot/initrd.img*` of the tree, if any).
    pub initrd: Option<PathBuf>,
    /// Size of rootfs.ext4 (default: the tree's size and half again, at least 256 MiB).
    pub size: Option<u64>,
}

/// The image's architecture and manifest.
#[derive(Clone, Debug)]
pub struct Created {
    pub arch: Arch,
    pub manifest: ImageManifest,
}

/// Makes the image directory `out` (it must not exist).
pub fn create_image(
    opts: &CreateOptions,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Created, RootfsError> {
    let src = opts.source.path();
    if fs::symlink_metadata(out).is_ok() {
        return Err(refused(out, "exists"));
    }
    let staging = kiln_sys::temp::TempDir::beside(out)
        .map_err(io_at(out, "cannot make a temporary directory"))?;
    let tree = staging.path().join("tree");
    match &opts.source {
        Source::Dir(dir) => {
            progress(&format!("copying {}", dir.display()));
            crate::tree::copy_tree(dir, &tree)?;
        }
        Source::Oci(image) => {
            progress(&format!("unpacking {}", image.display()));
            crate::oci::unpack(image, &tree)?;
        }
    }
    let arch = crate::tree::arch_of(&tree).map_err(|e| match e {
        RootfsError::Output { why, .. } => refused(src, why),
        e => e,
    })?;
    if let Some(want) = opts.arch {
        if want != arch {
            return Err(refused(
                src,
                format!(
                    "its binaries are {} (/bin/sh), not {}",
                    arch.name(),
                    want.name()
                ),
            ));
        }
    }
    let image = staging.path().join("image");
    fs::create_dir(&image).map_err(io_at(&image, "cannot create"))?;
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => boot_file(&tree, "vmlinuz")
            .ok_or_else(|| refused(src, "has no /boot/vmlinuz*: give the kernel with --kernel"))?,
    };
    let initrd = match &opts.initrd {
        Some(i) => Some(i.clone()),
        None if opts.kernel.is_none() => boot_file(&tree, "initrd.img"),
        None => None,
    };
    let spec = ImageSpec {
        name: src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
        arch,
        kernel,
        initrd,
        size: opts.size,
        cmdline: String::new(),
        builder: serde_json::json!({
            "builder": "kiln image create",
            "source": src,
            "from": match opts.source { Source::Dir(_) => "dir", Source::Oci(_) => "oci" },
            "arch": arch.name(),
        }),
    };
    let manifest = write_image(&tree, &image, &spec, progress)?;
    fs::rename(&image, out).map_err(io_at(out, "cannot rename into place"))?;
    Ok(Created { arch, manifest })
}

/// What [`write_image`] writes besides the tree.
pub(crate) struct ImageSpec {
    pub name: String,
    pub arch: Arch,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Size of rootfs.ext4 (default: the tree's size and half again, at least 256 MiB).
    pub size: Option<u64>,
    pub cmdline: String,
    pub builder: serde_json::Value,
}

/// Writes the image directory `image` (existing, empty) from `tree`: the kernel and initrd,
/// `rootfs.ext4`, for i386 v86's 9p filesystem, and `image.json`. Shared by `kiln image
/// create` and the i386 Debian builder.
pub(crate) fn write_image(
    tree: &Path,
    image: &Path,
    spec: &ImageSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<ImageManifest, RootfsError> {
    let copy = |from: &Path, name: &str| -> Result<PathBuf, RootfsError> {
        fs::copy(from, image.join(name)).map_err(io_at(from, "cannot copy"))?;
        Ok(PathBuf::from(name))
    };
    let kernel = copy(&spec.kernel, "vmlinuz")?;
    let initrd = spec
        .initrd
        .as_deref()
        .map(|i| copy(i, "initrd.img"))
        .transpose()?;
    let size = match spec.size {
        Some(s) => s,
        None => (tree_bytes(tree) / 2 * 3)
            .max(256 << 20)
            .next_multiple_of(1 << 20),
    };
    progress(&format!(
        "making rootfs.ext4 ({})",
        crate::format_size(size)
    ));
    crate::make_ext4_disk(&image.join("rootfs.ext4"), size, Some(tree), "kiln-root")?;
    let fs9p = if spec.arch == Arch::I386 {
        progress("writing the 9p filesystem for v86 (fs.json, fs/)");
        let w = crate::fs9p::write(tree, image)?;
        if w.skipped > 0 {
            progress(&format!(
                "{} device nodes, FIFOs or sockets are not in the 9p filesystem (v86 has none)",
                w.skipped
            ));
        }
        Some(crate::manifest::Fs9p {
            index: crate::fs9p::INDEX.into(),
            files: crate::fs9p::FILES.into(),
        })
    } else {
        None
    };
    let manifest = ImageManifest {
        name: spec.name.clone(),
        rootfs: "rootfs.ext4".into(),
        kernel,
        initrd,
        cmdline: spec.cmdline.clone(),
        home_seed: None,
        var_seed: None,
        created_at: Some(kiln_sys::now_rfc3339()),
        builder: spec.builder.clone(),
        arch: Some(spec.arch),
        fs9p,
    };
    manifest.save(image)?;
    Ok(manifest)
}

/// The newest `/boot/PREFIX*` regular file of the tree, if it has one.
fn boot_file(tree: &Path, prefix: &str) -> Option<PathBuf> {
    crate::newest_file(&tree.join("boot"), prefix)
        .ok()
        .flatten()
}

/// The bytes of the regular files under `dir` (links not followed).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
