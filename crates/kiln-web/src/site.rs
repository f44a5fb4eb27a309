//! Building the static site in memory and writing it out all-or-nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use crate::assets::{self, Assets};
use crate::disk::{load_disk, Disk};
use crate::session::Job;
use crate::{warm, Result, WebError};

/// What [`prepare`] and [`build_site`] do.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Boot under Node until this text appears on serial and ship the saved state.
    pub warm: Option<String>,
    /// How long the warm boot may take.
    pub warm_timeout: Duration,
    /// Guest memory in MiB (default: 16 for a disk, the image's for a Linux image).
    pub memory_mib: Option<u32>,
    /// Where the assets are (default: [`Assets::locate`]).
    pub assets: Option<Assets>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            warm: None,
            warm_timeout: Duration::from_secs(60),
            memory_mib: None,
            assets: None,
        }
    }
}

/// A site: file paths relative to its root (`/`-separated) and their content.
#[derive(Clone, Debug, Default)]
pub struct Site {
    files: BTreeMap<String, Content>,
}

/// A site file's content: in memory, or a file kiln checked (a Linux image's 9p content
/// files, hundreds of megabytes, stay on disk).
#[derive(Clone, Debug)]
pub enum Content {
    Bytes(Bytes),
    /// A regular file and its size when it was checked.
    File(PathBuf, u64),
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::File(_, n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Site {
    /// The in-memory content at a site path such as `index.html` or `state/manifest.json`.
    pub fn get(&self, path: &str) -> Option<&Bytes> {
        match self.files.get(path) {
            Some(Content::Bytes(b)) => Some(b),
            _ => None,
        }
    }

    /// The content at a site path, wherever it is.
    pub fn entry(&self, path: &str) -> Option<&Content> {
        self.files.get(path)
    }

    /// All files, sorted by path.
    pub fn files(&self) -> impl Iterator<Item = (&str, &Content)> {
        self.files.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Total size in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.values().map(Content::len).sum()
    }

    pub(crate) fn insert(&mut self, path: impl Into<String>, content: impl Into<Bytes>) {
        self.files
            .insert(path.into(), Content::Bytes(content.into()));
    }

    pub(crate) fn insert_file(&mut self, path: impl Into<String>, source: PathBuf, len: u64) {
        self.files.insert(path.into(), Content::File(source, len));
    }

    /// Write the site to `out` all-or-nothing: into a temporary sibling directory, checked
    /// file by file, then renamed into place. `out` may be absent, an empty directory, or a
    /// previous kiln site (which is replaced); anything else is refused.
    pub fn write_to(&self, out: &Path) -> Result<()> {
        let replace_old = match std::fs::read_dir(out) {
            Ok(mut it) => {
                if it.next().is_none() {
                    false
                } else if out.join("kiln.json").is_file() {
                    true
                } else {
                    return Err(WebError::OutNotEmpty {
                        path: out.to_path_buf(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(WebError::OutNotEmpty {
                    path: out.to_path_buf(),
                })
            }
            Err(e) => return Err(WebError::io(out, "open output directory", e)),
        };
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .map_err(|e| WebError::io(&parent, "create output's parent directory", e))?;
        // Written beside `out` under a name that records this process, so a prepare killed
        // half-way is swept by the next one (kiln_sys::temp).
        kiln_sys::temp::sweep(&parent);
        let tmp = kiln_sys::temp::beside(out);
        std::fs::create_dir(&tmp).map_err(|e| {
            WebError::io(
                out,
                "create the site (in a temporary directory beside it)",
                e,
            )
        })?;
        let written = self.write_files(&tmp, out);
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written?;
        let _ = std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        let result = (|| {
            if replace_old {
                let old = kiln_sys::temp::beside(out);
                std::fs::rename(out, &old)
                    .map_err(|e| WebError::io(out, "move the previous site aside", e))?;
                std::fs::rename(&tmp, out).map_err(|e| {
                    let _ = std::fs::rename(&old, out);
                    WebError::io(out, "move the new site into place", e)
                })?;
                let _ = std::fs::remove_dir_all(&old);
            } else {
                // An empty directory (or nothing) is replaced by the rename.
                let _ = std::fs::remove_dir(out);
                std::fs::rename(&tmp, out)
                    .map_err(|e| WebError::io(out, "move the new site into place", e))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Writes every file of the site under `tmp` and checks each is complete (`out` names them
    /// in errors).
    fn write_files(&self, tmp: &Path, out: &Path) -> Result<(), WebError> {
        for (rel, content) in &self.files {
            let p = tmp.join(rel);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| WebError::io(d, "create directory", e))?;
            }
            match content {
                Content::Bytes(b) => std::fs::write(&p, b).map(|_| ()),
                Content::File(src, _) => std::fs::copy(src, &p).map(|_| ()),
            }
            .map_err(|e| WebError::io(out.join(rel), "write", e))?;
        }
        // Every asset the page needs must be there before we claim success: a missing BIOS
        // makes v86 hang silently.
        for (rel, content) in &self.files {
            let p = tmp.join(rel);
            let len = std::fs::metadata(&p)
                .map_err(|e| WebError::io(out.join(rel), "verify written file", e))?
                .len();
            if len != content.len() {
                return Err(WebError::io(
                    out.join(rel),
                    "verify written file",
                    std::io::Error::other(format!(
                        "{len} bytes on disk, expected {}",
                        content.len()
                    )),
                ));
            }
        }
        Ok(())
    }
}

/// What [`prepare`] wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PrepareReport {
    /// Output directory.
    pub out: PathBuf,
    /// Number of files.
    pub files: usize,
    /// Total bytes.
    pub bytes: u64,
    /// How the disk is attached: "hda", "fda" or "cdrom" (none for a Linux image).
    pub disk: Option<crate::DiskKind>,
    /// Whether it boots a Linux image (kernel, initrd and 9p filesystem).
    pub linux: bool,
    /// Whether a warm state ships (and its compressed size).
    pub warm_state_bytes: Option<u64>,
}

/// Where an asset of the site comes from.
pub(crate) fn asset_source(assets: &Assets, site_path: &str) -> PathBuf {
    assets
        .files()
        .into_iter()
        .find(|f| f.site_path == site_path)
        .map(|f| f.source)
        .unwrap_or_default()
}

/// What every site's `kiln.json` says: the machine's memory and where the page's assets are
/// (a disk site adds `disk`, a Linux site `filesystem` and the kernel; `state` when it ships
/// one).
pub(crate) fn page_config(name: &str, memory_size: u64) -> serde_json::Value {
    serde_json::json!({
        "kiln": 1,
        "name": name,
        "memory_size": memory_size,
        "vga_memory_size": 2u64 << 20,
        "libv86": "libv86.js",
        "xterm": "xterm.mjs",
        "wasm": "v86.wasm",
        "bios": "bios/seabios.bin",
        "vga_bios": "bios/vgabios.bin",
        "disk": null,
        "state": null,
    })
}

/// The page and its assets, the same for every site.
pub(crate) fn site_base(assets: &Assets) -> Result<Site> {
    // Assets first: a missing one is the most common setup problem and cheap to find.
    assets.check()?;
    let mut site = Site::default();
    for f in assets.files() {
        site.insert(f.site_path, Assets::read(&f)?);
    }
    site.insert("index.html", assets::INDEX_HTML);
    site.insert("kiln.js", assets::KILN_JS);
    Ok(site)
}

/// Build the site for `image` (a disk image, or a Linux image directory: see
/// [`crate::linux`]) in memory (see [`prepare`]).
pub fn build_site(image: &Path, opts: &PrepareOptions) -> Result<Site> {
    let assets = opts.assets.clone().unwrap_or_else(Assets::locate);
    if image.is_dir() {
        return crate::linux_site::build(image, opts, &assets);
    }
    let mut site = site_base(&assets)?;
    let disk = load_disk(image)?;
    let disk_path = format!("disk/{}", disk.file_name);
    let name = image.file_name().and_then(|s| s.to_str()).unwrap_or("disk");
    let mut config = page_config(name, u64::from(opts.memory_mib.unwrap_or(16)) << 20);
    config["disk"] =
        serde_json::json!({ "kind": disk.kind, "url": disk_path, "size": disk.bytes.len() });
    if let Some(marker) = &opts.warm {
        // The same machine the page makes: memory sizes, firmware, the disk.
        let scratch = kiln_sys::temp::TempDir::beside(&std::env::temp_dir().join("kiln-warm"))
            .map_err(|e| WebError::io(std::env::temp_dir(), "create temp dir", e))?;
        let disk_file = scratch.path().join("disk");
        std::fs::write(&disk_file, &disk.bytes)
            .map_err(|e| WebError::io(&disk_file, "write", e))?;
        let mut job = Job::default();
        for k in ["memory_size", "vga_memory_size"] {
            job.options.insert(k.into(), config[k].clone());
        }
        job.files
            .insert("bios", asset_source(&assets, "bios/seabios.bin"));
        job.files
            .insert("vga_bios", asset_source(&assets, "bios/vgabios.bin"));
        job.files.insert(disk.kind.v86_option(), disk_file);
        let (raw, serial, ms) = warm::boot_and_save(&assets, job, marker, opts.warm_timeout)
            .map_err(|e| WebError::Warm {
                image: image.to_path_buf(),
                msg: e.to_string(),
            })?;
        let z = crate::state::compress(&raw, crate::state::LEVEL)?;
        for (name, content) in
            warm::state_files(&z, raw.len() as u64, Some(marker), &serial, Some(ms))?
        {
            site.insert(format!("state/{name}"), content);
        }
        config["state"] = "state/manifest.json".into();
    }
    let Disk { bytes, .. } = disk;
    site.insert(disk_path, bytes);
    site.insert(
        "kiln.json",
        serde_json::to_vec_pretty(&config)
            .map_err(|e| WebError::io(image, "encode kiln.json", e.into()))?,
    );
    Ok(site)
}

/// `kiln prepare IMAGE OUT`: write a static site that boots IMAGE in the browser. Works under
/// any base path. Nothing is left at `out` when it fails.
pub fn prepare(image: &Path, out: &Path, opts: &PrepareOptions) -> Result<PrepareReport> {
    let site = build_site(image, opts)?;
    site.write_to(out)?;
    let config: serde_json::Value = site
        .get("kiln.json")
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let disk = match config["disk"]["kind"].as_str() {
        Some("fda") => Some(crate::DiskKind::Fda),
        Some("cdrom") => Some(crate::DiskKind::Cdrom),
        Some(_) => Some(crate::DiskKind::Hda),
        None => None,
    };
    let warm_state_bytes = site
        .get("state/manifest.json")
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|m| m["size"].as_u64());
    Ok(PrepareReport {
        out: out.to_path_buf(),
        files: site.files.len(),
        linux: config["filesystem"].is_object(),
        bytes: site.total_size(),
        disk,
        warm_state_bytes,
    })
}
