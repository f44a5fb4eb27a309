//! Linux images for v86: a kiln image directory (`image.json` with `fs9p`, from `kiln image
//! debian --arch i386` or `kiln image create`) or an image directory of the Go toolchain kiln
//! replaces (env86: an `image.json` of v86 options, `fs.json` + `fs/`, optionally
//! `initial.state[.zst]`).
//!
//! Everything is hostile input and checked before v86 sees any of it ([`load_linux_image`]):
//! - the 9p index (`fs.json`) is parsed with bounds (depth, entries, sizes), every name is a
//!   plain file name, every type a directory, regular file or symlink, and every content file
//!   it names is a plain file name present in `fs/` as a regular file (a missing one would
//!   hang the guest's read), of the entry's size (for `.zst` files, the size the zstd frame
//!   declares). v86 gets kiln's own re-encoding of the checked index, never the input bytes;
//! - the kernel and initrd are regular files inside the image directory (for an env86 image
//!   with `bzimage_initrd_from_filesystem`, found in the checked index by v86's own rule);
//! - v86 options are taken from a short list with checked types; anything else is ignored;
//! - a saved state is checked by [`crate::state`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{Result, WebError};

/// Largest `fs.json` read (Debian's minbase index is about 1 MB).
const INDEX_MAX: u64 = 256 << 20;
/// Largest `image.json` read.
const CONFIG_MAX: u64 = 1 << 20;
/// Deepest directory nesting accepted in the index.
const MAX_DEPTH: usize = 64;
/// Most entries accepted in the index.
const MAX_ENTRIES: usize = 4_000_000;
/// Guest memory of a kiln Linux image unless it says otherwise.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Guest memory of an env86 image unless it says otherwise (env86's own default).
pub const ENV86_DEFAULT_MEMORY: u64 = 512 << 20;
/// Most guest memory accepted (v86 is 32-bit).
const MAX_MEMORY: u64 = 3 << 30;
/// The saved state's file name in an image directory (as env86 names its zstd state).
pub const STATE_FILE: &str = "initial.state.zst";
/// env86's uncompressed state.
pub const RAW_STATE_FILE: &str = "initial.state";

/// Who made the image directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Kiln,
    Env86,
}

/// A checked Linux image.
#[derive(Clone, Debug)]
pub struct LinuxImage {
    pub dir: PathBuf,
    pub name: String,
    pub format: ImageFormat,
    /// kiln's encoding of the checked 9p index: what v86 gets as `fs.json`.
    pub index: Vec<u8>,
    /// The content files the index names (file names in [`LinuxImage::files`]).
    pub blobs: BTreeSet<String>,
    /// The image's `fs/` directory.
    pub files: PathBuf,
    /// Regular files of the index (not counting directories and symlinks), and their bytes.
    pub file_count: u64,
    pub file_bytes: u64,
    pub kernel: Option<Payload>,
    pub initrd: Option<Payload>,
    pub cmdline: String,
    pub memory_size: u64,
    /// The saved state in the directory, if there is one (checked when used).
    pub state: Option<PathBuf>,
}

/// A kernel or initrd: a plain file of the image directory, or a content file of `fs/`
/// (compressed when its name ends in `.zst`).
#[derive(Clone, Debug)]
pub struct Payload {
    pub path: PathBuf,
    pub zstd: bool,
    pub size: u64,
}

impl Payload {
    /// The payload's bytes (inflated, bounded by its recorded size).
    pub fn read(&self) -> Result<Vec<u8>> {
        let f = fs::File::open(&self.path).map_err(|e| WebError::io(&self.path, "open", e))?;
        let mut out = Vec::with_capacity(self.size.min(1 << 30) as usize);
        let r = if self.zstd {
            zstd::stream::read::Decoder::new(f)
                .and_then(|d| d.take(self.size + 1).read_to_end(&mut out))
        } else {
            f.take(self.size + 1).read_to_end(&mut out)
        };
        r.map_err(|e| WebError::io(&self.path, "read", e))?;
        if out.len() as u64 != self.size {
            return Err(WebError::bad(
                &self.path,
                format!("holds {} bytes, expected {}", out.len(), self.size),
            ));
        }
        Ok(out)
    }
}

/// Whether `dir` is a Linux image directory (it holds an image.json and an fs.json).
pub fn is_linux_image(dir: &Path) -> bool {
    dir.join("image.json").is_file() && dir.join("fs.json").is_file()
}

/// Reads and checks the Linux image directory `dir` (see the module's documentation).
pub fn load_linux_image(dir: &Path) -> Result<LinuxImage> {
    let config_path = dir.join("image.json");
    let config: Value = serde_json::from_slice(&read_bounded(&config_path, CONFIG_MAX)?)
        .map_err(|e| WebError::bad(&config_path, format!("not valid JSON: {e}")))?;
    let Some(obj) = config.as_object() else {
        return Err(WebError::bad(&config_path, "is not a JSON object"));
    };
    // kiln's manifest names its rootfs; env86's holds v86 options.
    let format = if obj.contains_key("rootfs") {
        ImageFormat::Kiln
    } else {
        ImageFormat::Env86
    };
    let manifest = match format {
        ImageFormat::Kiln => Some(
            kiln_rootfs::ImageManifest::load(dir)
                .map_err(|e| WebError::bad(&config_path, e.to_string()))?,
        ),
        ImageFormat::Env86 => None,
    };
    let (index_path, files) = match &manifest {
        Some(m) => {
            if m.arch != Some(kiln_rootfs::tree::Arch::I386) {
                return Err(WebError::bad(
                    dir,
                    format!(
                        "is an {} image; v86 runs only i386 (32-bit) guests",
                        m.arch.map(|a| a.name()).unwrap_or("amd64")
                    ),
                ));
            }
            let Some(f) = &m.fs9p else {
                return Err(WebError::bad(
                    dir,
                    "has no 9p filesystem (fs9p in image.json)",
                ));
            };
            (plain_inside(dir, &f.index)?, plain_inside(dir, &f.files)?)
        }
        None => (dir.join("fs.json"), dir.join("fs")),
    };
    match fs::symlink_metadata(&files) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => {
            return Err(WebError::bad(
                &files,
                "is not a directory (a symlink is refused)",
            ))
        }
        Err(e) => return Err(WebError::io(&files, "open", e)),
    }
    let checked = check_index(&index_path, &files)?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let memory_size = match obj.get("memory_size") {
        None | Some(Value::Null) if format == ImageFormat::Env86 => ENV86_DEFAULT_MEMORY,
        None | Some(Value::Null) => DEFAULT_MEMORY,
        Some(v) => match v.as_u64() {
            Some(m) if (16 << 20..=MAX_MEMORY).contains(&m) && m % (1 << 20) == 0 => m,
            _ => {
                return Err(WebError::bad(
                    &config_path,
                    format!(
                        "memory_size {v} is not a whole number of MiB between 16 MiB and 3 GiB"
                    ),
                ))
            }
        },
    };
    let (kernel, initrd, cmdline, name) = match manifest {
        Some(m) => {
            let kernel = file_payload(dir, &m.kernel)?;
            let initrd = m
                .initrd
                .as_deref()
                .map(|i| file_payload(dir, i))
                .transpose()?;
            let cmdline = if m.cmdline.is_empty() {
                kiln_rootfs::v86::CMDLINE.to_string()
            } else {
                m.cmdline.clone()
            };
            (Some(kernel), initrd, cmdline, m.name)
        }
        None => {
            let url = |k: &str| -> Result<Option<Payload>> {
                match obj
                    .get(k)
                    .and_then(|v| v.get("url"))
                    .and_then(Value::as_str)
                {
                    Some(u) => Ok(Some(file_payload(
                        dir,
                        Path::new(u.trim_start_matches("./")),
                    )?)),
                    None => Ok(None),
                }
            };
            let (mut kernel, mut initrd) = (url("bzimage")?, url("initrd")?);
            if obj.get("bzimage_initrd_from_filesystem") == Some(&Value::Bool(true)) {
                let (k, i) = boot_files(&checked, &files);
                kernel = kernel.or(k);
                initrd = initrd.or(i);
            }
            let cmdline = text("cmdline").unwrap_or_else(|| kiln_rootfs::v86::CMDLINE.into());
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into());
            (kernel, initrd, cmdline, name)
        }
    };
    if cmdline.len() > 2048 || cmdline.contains(['\n', '\0']) {
        return Err(WebError::bad(
            &config_path,
            "its kernel command line is over 2 KiB or holds a newline",
        ));
    }
    let state = [STATE_FILE, RAW_STATE_FILE]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| fs::symlink_metadata(p).is_ok());
    Ok(LinuxImage {
        dir: dir.to_path_buf(),
        name,
        format,
        index: checked.encoded,
        blobs: checked.blobs,
        files,
        file_count: checked.file_count,
        file_bytes: checked.file_bytes,
        kernel,
        initrd,
        cmdline,
        memory_size,
        state,
    })
}

impl LinuxImage {
    /// The hex SHA-256 of the checked index: what a saved state is bound to.
    pub fn index_sha256(&self) -> String {
        format!("{:x}", Sha256::digest(&self.index))
    }

    /// Fails unless the image can boot cold (it has a kernel).
    pub fn require_kernel(&self) -> Result<(&Payload, Option<&Payload>)> {
        match &self.kernel {
            Some(k) => Ok((k, self.initrd.as_ref())),
            None => Err(WebError::bad(
                &self.dir,
                "has no kernel to boot cold (no bzimage in image.json and none found in the 9p filesystem's / or /boot) and no saved state",
            )),
        }
    }
}

/// The checked index.
struct CheckedIndex {
    encoded: Vec<u8>,
    blobs: BTreeSet<String>,
    /// Name -> (blob, size) of the regular files directly in `/` and `/boot`.
    boot_candidates: Vec<(String, String, u64)>,
    file_count: u64,
    file_bytes: u64,
}

fn check_index(path: &Path, files: &Path) -> Result<CheckedIndex> {
    let bytes = read_bounded(path, INDEX_MAX)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| WebError::bad(path, format!("not valid JSON: {e}")))?;
    if v.get("version").and_then(Value::as_u64) != Some(3) {
        return Err(WebError::bad(
            path,
            "is not a v86 filesystem index of version 3",
        ));
    }
    let Some(root) = v.get("fsroot").and_then(Value::as_array) else {
        return Err(WebError::bad(path, "has no fsroot array"));
    };
    let mut w = Walk {
        path,
        entries: 0,
        sizes: BTreeMap::new(),
        boot_candidates: Vec::new(),
        file_count: 0,
        file_bytes: 0,
    };
    let fsroot = w.dir(root, "", 0)?;
    // Every content file must be there, a regular file (no symlink) of the right size.
    for (blob, size) in &w.sizes {
        let p = files.join(blob);
        let m = fs::symlink_metadata(&p)
            .map_err(|_| WebError::bad(&p, format!("is missing: {} names it", path.display())))?;
        if !m.file_type().is_file() {
            return Err(WebError::bad(&p, "is not a regular file"));
        }
        let actual = if blob.ends_with(".zst") {
            zstd_content_size(&p)?
        } else {
            Some(m.len())
        };
        if let Some(actual) = actual {
            if actual != *size {
                return Err(WebError::bad(
                    &p,
                    format!("holds {actual} bytes, but {} says {size}", path.display()),
                ));
            }
        }
    }
    let total = w.file_bytes;
    let encoded = serde_json::to_vec(&json!({ "fsroot": fsroot, "version": 3, "size": total }))
        .map_err(|e| WebError::bad(path, format!("cannot encode: {e}")))?;
    Ok(CheckedIndex {
        encoded,
        blobs: w.sizes.into_keys().collect(),
        boot_candidates: w.boot_candidates,
        file_count: w.file_count,
        file_bytes: w.file_bytes,
    })
}

struct Walk<'a> {
    path: &'a Path,
    entries: usize,
    /// Content file -> size.
    sizes: BTreeMap<String, u64>,
    boot_candidates: Vec<(String, String, u64)>,
    file_count: u64,
    file_bytes: u64,
}

impl Walk<'_> {
    fn dir(&mut self, list: &[Value], at: &str, depth: usize) -> Result<Vec<Value>> {
        if depth > MAX_DEPTH {
            return Err(WebError::bad(
                self.path,
                format!("nests directories deeper than {MAX_DEPTH} at {at}"),
            ));
        }
        let mut out = Vec::with_capacity(list.len());
        let mut names = BTreeSet::new();
        for e in list {
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return Err(WebError::bad(
                    self.path,
                    format!("has more than {MAX_ENTRIES} entries"),
                ));
            }
            let bad = |why: String| WebError::bad(self.path, why);
            let Some(a) = e.as_array().filter(|a| a.len() >= 7) else {
                return Err(bad(format!(
                    "has an entry in {at}/ that is not [name, size, mtime, mode, uid, gid, x]"
                )));
            };
            let name = a[0].as_str().unwrap_or("");
            if name.is_empty()
                || name == "."
                || name == ".."
                || name.contains(['/', '\0'])
                || name.len() > 255
            {
                return Err(bad(format!(
                    "has an entry in {at}/ with the bad name {:?}",
                    a[0]
                )));
            }
            let here = format!("{at}/{name}");
            if !names.insert(name.to_string()) {
                return Err(bad(format!("lists {here} twice")));
            }
            let num = |i: usize, what: &str| -> Result<u64> {
                a[i].as_u64()
                    .filter(|n| *n <= u64::from(u32::MAX))
                    .ok_or_else(|| {
                        WebError::bad(
                            self.path,
                            format!("{here}: its {what} is not a 32-bit number"),
                        )
                    })
            };
            let size = num(1, "size")?;
            let mtime = num(2, "mtime")?;
            let mode = num(3, "mode")?;
            let uid = num(4, "uid")?;
            let gid = num(5, "gid")?;
            let x = match mode & 0o170000 {
                0o040000 => {
                    let Some(children) = a[6].as_array() else {
                        return Err(bad(format!("{here}: a directory without a child list")));
                    };
                    Value::Array(self.dir(children, &here, depth + 1)?)
                }
                0o100000 => {
                    let blob = a[6].as_str().unwrap_or("");
                    if !is_blob_name(blob) {
                        return Err(bad(format!(
                            "{here}: content file name {:?} is not a hash and .bin or .bin.zst",
                            a[6]
                        )));
                    }
                    if let Some(prev) = self.sizes.insert(blob.to_string(), size) {
                        if prev != size {
                            return Err(bad(format!(
                                "{here}: {blob} is listed with sizes {prev} and {size}"
                            )));
                        }
                    }
                    if at.is_empty() || at == "/boot" {
                        self.boot_candidates
                            .push((here.clone(), blob.to_string(), size));
                    }
                    self.file_count += 1;
                    self.file_bytes += size;
                    Value::String(blob.to_string())
                }
                0o120000 => match a[6].as_str() {
                    Some(t) if !t.is_empty() && t.len() <= 4096 && !t.contains('\0') => {
                        Value::String(t.to_string())
                    }
                    _ => return Err(bad(format!("{here}: a symlink without a target"))),
                },
                _ => {
                    return Err(bad(format!(
                        "{here}: mode {mode:o} is not a directory, regular file or symlink"
                    )))
                }
            };
            out.push(json!([name, size, mtime, mode, uid, gid, x]));
        }
        Ok(out)
    }
}

/// A content file name as v86's tools make them: a hex hash (kiln: 64 digits, env86: 8) and
/// `.bin`, or `.bin.zst` for a zstd-compressed one. Nothing else is ever looked up in `fs/`,
/// so an index cannot name `passwd` next to a planted link.
pub(crate) fn is_blob_name(s: &str) -> bool {
    hash_stem(s).is_some()
}

/// The length of the hash a content file name is made of.
pub(crate) fn hash_stem(name: &str) -> Option<usize> {
    let stem = name
        .strip_suffix(".bin.zst")
        .or_else(|| name.strip_suffix(".bin"))?;
    ((8..=128).contains(&stem.len()) && stem.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(stem.len())
}

/// v86's `bzimage_initrd_from_filesystem` rule on the checked index: among the regular files
/// directly in `/` and `/boot`, the last whose name says vmlinuz/bzimage (initrd/initramfs),
/// preferring names without "old" or "fallback".
fn boot_files(idx: &CheckedIndex, files: &Path) -> (Option<Payload>, Option<Payload>) {
    let pick = |pats: &[&str]| {
        let mut found: Option<&(String, String, u64)> = None;
        for c in &idx.boot_candidates {
            let lower = c.0.to_lowercase();
            if !pats.iter().any(|p| lower.contains(p)) {
                continue;
            }
            let old = lower.contains("old") || lower.contains("fallback");
            if found.is_none() || !old {
                found = Some(c);
            }
        }
        found.map(|(_, blob, size)| Payload {
            path: files.join(blob),
            zstd: blob.ends_with(".zst"),
            size: *size,
        })
    };
    (
        pick(&["vmlinuz", "bzimage"]),
        pick(&["initrd", "initramfs"]),
    )
}

/// A file named by image.json: a relative path of plain components inside `dir`, a regular
/// file (not a symlink).
fn file_payload(dir: &Path, rel: &Path) -> Result<Payload> {
    let path = plain_inside(dir, rel)?;
    let m = fs::symlink_metadata(&path).map_err(|e| WebError::io(&path, "open", e))?;
    if !m.file_type().is_file() {
        return Err(WebError::bad(&path, "is not a regular file"));
    }
    Ok(Payload {
        path,
        zstd: false,
        size: m.len(),
    })
}

/// `rel` joined to `dir` if it stays inside (kiln's manifest loader makes paths absolute:
/// those must already be inside `dir`).
fn plain_inside(dir: &Path, rel: &Path) -> Result<PathBuf> {
    let rel = rel.strip_prefix(dir).unwrap_or(rel);
    let ok = !rel.as_os_str().is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !ok {
        return Err(WebError::bad(
            dir.join("image.json"),
            format!("names {} outside the image directory", rel.display()),
        ));
    }
    Ok(dir.join(rel))
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = fs::File::open(path).map_err(|e| WebError::io(path, "open", e))?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| WebError::io(path, "read", e))?;
    if out.len() as u64 > max {
        return Err(WebError::bad(
            path,
            format!("is larger than {} MiB", max >> 20),
        ));
    }
    Ok(out)
}

/// The content size a zstd file's first frame header declares (None when it does not say).
fn zstd_content_size(path: &Path) -> Result<Option<u64>> {
    let mut head = [0u8; 18];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| WebError::io(path, "read", e))?;
    match zstd::zstd_safe::get_frame_content_size(&head[..n]) {
        Ok(size) => Ok(size),
        Err(_) => Err(WebError::bad(path, "is not a zstd frame")),
    }
}

/// How a Linux image's machine starts.
pub enum Start<'a> {
    /// From its kernel and initrd.
    Cold,
    /// From this checked raw state.
    Restore(&'a [u8]),
}

impl LinuxImage {
    /// The v86 machine for this image (the same for `kiln boot`, `--warm` and the page):
    /// memory, the 9p filesystem, MAC address translation (a restored guest keeps its
    /// network), and either the firmware, kernel, initrd and kernel command line or the state.
    /// Files kiln wrote (the index, inflated payloads, the state) go into `scratch`.
    pub(crate) fn job(
        &self,
        assets: &crate::Assets,
        scratch: &Path,
        memory_size: u64,
        start: Start<'_>,
    ) -> Result<crate::session::Job> {
        let mut job = crate::session::Job::default();
        job.options.insert("memory_size".into(), memory_size.into());
        job.options
            .insert("vga_memory_size".into(), (2u64 << 20).into());
        job.options
            .insert("mac_address_translation".into(), true.into());
        let write = |name: &str, bytes: &[u8]| -> Result<PathBuf> {
            let p = scratch.join(name);
            fs::write(&p, bytes).map_err(|e| WebError::io(&p, "write", e))?;
            Ok(p)
        };
        match start {
            Start::Cold => {
                let (kernel, initrd) = self.require_kernel()?;
                let file = |p: &Payload, name: &str| -> Result<PathBuf> {
                    if p.zstd {
                        write(name, &p.read()?)
                    } else {
                        Ok(p.path.clone())
                    }
                };
                job.options
                    .insert("cmdline".into(), self.cmdline.clone().into());
                job.files.insert(
                    "bios",
                    crate::site::asset_source(assets, "bios/seabios.bin"),
                );
                job.files.insert(
                    "vga_bios",
                    crate::site::asset_source(assets, "bios/vgabios.bin"),
                );
                job.files.insert("bzimage", file(kernel, "vmlinuz")?);
                if let Some(i) = initrd {
                    job.files.insert("initrd", file(i, "initrd.img")?);
                }
                job.filesystem = Some((Some(write("fs.json", &self.index)?), self.files.clone()));
            }
            Start::Restore(raw) => {
                job.files.insert("initial_state", write("state.bin", raw)?);
                // The state holds the 9p inode table; v86 fetches contents from the files.
                job.filesystem = Some((None, self.files.clone()));
            }
        }
        Ok(job)
    }

    /// The image's saved state, checked (`None` when it has none).
    pub fn saved_state(&self) -> Result<Option<(Vec<u8>, crate::state::CheckedState)>> {
        let Some(path) = &self.state else {
            return Ok(None);
        };
        let m = fs::symlink_metadata(path).map_err(|e| WebError::io(path, "open", e))?;
        if !m.file_type().is_file() {
            return Err(WebError::bad(path, "is not a regular file"));
        }
        let bytes = read_bounded(path, self.memory_size + (512 << 20))?;
        crate::state::check_state(path, &bytes, self).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// An env86-style image whose index has `root` as its fsroot; `/boot/vmlinuz-1` and
    /// `/boot/initrd.img-1` hold 3 bytes of the same content file.
    fn image(root: Value) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("fs")).unwrap();
        fs::write(d.path().join("fs").join(format!("{H}.bin")), b"abc").unwrap();
        fs::write(
            d.path().join("image.json"),
            json!({ "bzimage_initrd_from_filesystem": true }).to_string(),
        )
        .unwrap();
        fs::write(
            d.path().join("fs.json"),
            json!({ "fsroot": root, "version": 3, "size": 3 }).to_string(),
        )
        .unwrap();
        d
    }

    fn boot_dir() -> Value {
        json!([
            "boot",
            0,
            0,
            0o40755,
            0,
            0,
            [
                ["vmlinuz-1", 3, 0, 0o100644, 0, 0, format!("{H}.bin")],
                ["initrd.img-1", 3, 0, 0o100644, 0, 0, format!("{H}.bin")],
            ]
        ])
    }

    fn refused(root: Value, needle: &str) {
        let d = image(root);
        let e = load_linux_image(d.path()).unwrap_err().to_string();
        assert!(
            e.contains(needle) && !e.contains('\n'),
            "{needle:?} not in {e}"
        );
    }

    #[test]
    fn a_good_index_is_reencoded_and_its_kernel_found() {
        let d = image(json!([
            boot_dir(),
            ["sh", 4, 0, 0o120777, 0, 0, "busybox", "extra"]
        ]));
        let img = load_linux_image(d.path()).unwrap();
        assert_eq!(img.format, ImageFormat::Env86);
        assert_eq!(img.memory_size, ENV86_DEFAULT_MEMORY);
        assert_eq!(img.file_count, 2);
        assert!(img
            .kernel
            .as_ref()
            .unwrap()
            .path
            .ends_with(format!("{H}.bin")));
        assert_eq!(img.initrd.as_ref().unwrap().read().unwrap(), b"abc");
        // kiln's encoding keeps the seven fields v86 reads, nothing else.
        let text = String::from_utf8(img.index.clone()).unwrap();
        assert!(!text.contains("extra"), "{text}");
    }

    #[test]
    fn hostile_indexes_are_refused_with_one_line() {
        let file = |name: &str, size: u64, blob: &str| json!([name, size, 0, 0o100644, 0, 0, blob]);
        refused(json!([file("..", 3, &format!("{H}.bin"))]), "bad name");
        refused(json!([file("a/b", 3, &format!("{H}.bin"))]), "bad name");
        refused(json!([file("passwd", 3, "passwd")]), "is not a hash");
        refused(
            json!([file("x", 3, &format!("{H}.bin/../../etc"))]),
            "is not a hash",
        );
        refused(
            json!([file("x", 4, &format!("{H}.bin"))]),
            "holds 3 bytes, but",
        );
        refused(
            json!([file("x", 3, &format!("{}.bin", &H[..60]))]),
            "is missing",
        );
        refused(
            json!([
                file("x", 3, &format!("{H}.bin")),
                file("x", 3, &format!("{H}.bin"))
            ]),
            "lists /x twice",
        );
        refused(
            json!([["null", 0, 0, 0o020666, 0, 0, null]]),
            "is not a directory, regular file or symlink",
        );
        refused(
            json!([["x", 0, 0]]),
            "is not [name, size, mtime, mode, uid, gid, x]",
        );
        let mut deep = json!([]);
        for _ in 0..70 {
            deep = json!([["d", 0, 0, 0o40755, 0, 0, deep]]);
        }
        // serde_json's own nesting limit (128 levels: 64 directories) comes first.
        refused(deep, "fs.json: not valid JSON: recursion limit exceeded");
    }

    #[test]
    fn a_symlinked_content_directory_is_refused() {
        let d = image(json!([boot_dir()]));
        let real = d.path().join("real");
        fs::rename(d.path().join("fs"), &real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("fs")).unwrap();
        let e = load_linux_image(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("is not a directory (a symlink is refused)"),
            "{e}"
        );
    }
}
