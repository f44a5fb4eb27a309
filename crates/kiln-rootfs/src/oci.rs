//! OCI and Docker images as a root tree, without a container runtime: an OCI layout directory,
//! an OCI archive (a tar of one) or a `docker save` tarball. Every blob is checked against its
//! sha256 digest before it is used; layers (tar, gzip or zstd, told by their magic bytes) are
//! applied in order with whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`); real
//! uids, gids, modes, symlinks, hard links and device nodes are kept.
//!
//! A layer is hostile data: no entry may leave the root. Names with `..` are refused, and every
//! path is resolved inside the root the way the image's own processes will see it: a symlink an
//! earlier entry made (`etc -> /host/etc`) is followed within the root, never on the host, and
//! the entry's own last component is never followed. Work is bounded by the input: JSON
//! documents are read up to 16 MiB, layers are streamed.

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{io_at, refused, RootfsError};

/// Largest JSON document (index, manifest, config) read from an image.
const MAX_JSON: u64 = 16 << 20;
/// Most layers an image may have (Docker's own limit is 127).
const MAX_LAYERS: usize = 256;

/// What [`unpack`] read besides the tree.
#[derive(Clone, Debug)]
pub struct OciImage {
    /// The image config's `architecture` (`386`, `amd64`, ...), when it names one.
    pub architecture: Option<String>,
    /// The image config (environment, entrypoint, command), as the image gives it.
    pub config: serde_json::Value,
    pub layers: usize,
}

/// Unpacks the image at `source` into `dest`, which must not exist (it is made through a
/// temporary name beside it and renamed when complete, so a failure leaves nothing).
pub fn unpack(source: &Path, dest: &Path) -> Result<OciImage, RootfsError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(refused(dest, "exists"));
    }
    let scratch = kiln_sys::temp::TempDir::beside(dest)
        .map_err(io_at(dest, "cannot make a temporary directory"))?;
    let tree = scratch.path().join("tree");
    fs::create_dir(&tree).map_err(io_at(&tree, "cannot create"))?;
    let layout = if source.is_dir() {
        source.to_path_buf()
    } else {
        let unpacked = scratch.path().join("archive");
        extract_archive(source, &unpacked)?;
        unpacked
    };
    let (config, layers) = read_manifest(source, &layout)?;
    if layers.len() > MAX_LAYERS {
        return Err(refused(
            source,
            format!("{} layers (at most {MAX_LAYERS})", layers.len()),
        ));
    }
    for layer in &layers {
        apply_layer(layer, &tree)?;
    }
    fs::rename(&tree, dest).map_err(io_at(dest, "cannot rename into place"))?;
    Ok(OciImage {
        architecture: config
            .get("architecture")
            .and_then(|a| a.as_str())
            .map(String::from),
        config,
        layers: layers.len(),
    })
}

/// Extracts the regular files of an image archive (blobs, index, manifests) into `out`: only
/// plain relative names, never a link or a device.
fn extract_archive(archive: &Path, out: &Path) -> Result<(), RootfsError> {
    let file = fs::File::open(archive).map_err(io_at(archive, "cannot open"))?;
    fs::create_dir(out).map_err(io_at(out, "cannot create"))?;
    let mut ar = tar::Archive::new(BufReader::new(file));
    let not_tar = |e: io::Error| {
        refused(
            archive,
            format!("not an OCI archive or docker save tarball: {e}"),
        )
    };
    for entry in ar.entries().map_err(not_tar)? {
        let mut e = entry.map_err(not_tar)?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let path = e.path().map_err(not_tar)?.into_owned();
        let Some(rel) = clean(&path) else {
            return Err(refused(
                archive,
                format!("entry '{}' leaves the archive", path.display()),
            ));
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = out.join(&rel);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent, "cannot create"))?;
        }
        let mut f = fs::File::create(&target).map_err(io_at(&target, "cannot create"))?;
        io::copy(&mut e, &mut f).map_err(io_at(archive, "cannot read"))?;
    }
    Ok(())
}

/// `path` without `.`, a leading `/` or `./`; `None` when it has a `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RootfsError> {
    let mut text = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_JSON + 1).read_to_end(&mut text))
        .map_err(io_at(path, "cannot read"))?;
    if text.len() as u64 > MAX_JSON {
        return Err(refused(path, "larger than 16 MiB"));
    }
    serde_json::from_slice(&text).map_err(|e| refused(path, format!("invalid: {e}")))
}

/// The blob `digest` names in `layout`, after checking its content has that digest.
fn blob(source: &Path, layout: &Path, digest: &str) -> Result<PathBuf, RootfsError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| refused(source, format!("digest '{digest}' is not a sha256 digest")))?;
    let path = layout.join("blobs").join("sha256").join(hex);
    verify(source, &path, hex)?;
    Ok(path)
}

fn verify(source: &Path, path: &Path, hex: &str) -> Result<(), RootfsError> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(refused(source, format!("blob sha256:{hex} is missing")))
        }
        Err(e) => return Err(io_at(path, "cannot open")(e)),
    };
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(io_at(path, "cannot read"))?;
    let got = format!("{:x}", h.finalize());
    if got != hex {
        return Err(refused(
            source,
            format!("blob sha256:{hex} has digest sha256:{got}"),
        ));
    }
    Ok(())
}

/// The image config and the layer files, in order, of the one image in `layout`.
fn read_manifest(
    source: &Path,
    layout: &Path,
) -> Result<(serde_json::Value, Vec<PathBuf>), RootfsError> {
    let index = layout.join("index.json");
    if index.is_file() {
        let mut idx: Index = read_json(&index)?;
        // One level of image index (multi-platform): the first manifest of an image.
        let mut depth = 0;
        let manifest = loop {
            let Some(d) = idx.manifests.first() else {
                return Err(refused(source, "its index names no manifest"));
            };
            let d = idx
                .manifests
                .iter()
                .find(|m| m.platform.as_ref().is_some_and(|p| p.architecture == "386"))
                .unwrap_or(d);
            let path = blob(source, layout, &d.digest)?;
            if d.media_type.ends_with("image.index.v1+json") && depth < 2 {
                idx = read_json(&path)?;
                depth += 1;
                continue;
            }
            break read_json::<Manifest>(&path)?;
        };
        let config = read_json(&blob(source, layout, &manifest.config.digest)?)?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| blob(source, layout, &l.digest))
            .collect::<Result<_, _>>()?;
        return Ok((config, layers));
    }
    let docker = layout.join("manifest.json");
    if docker.is_file() {
        let manifests: Vec<DockerManifest> = read_json(&docker)?;
        let m = manifests
            .first()
            .ok_or_else(|| refused(source, "its manifest.json names no image"))?;
        let file = |name: &str| -> Result<PathBuf, RootfsError> {
            let rel = clean(Path::new(name))
                .filter(|r| !r.as_os_str().is_empty())
                .ok_or_else(|| refused(source, format!("'{name}' leaves the archive")))?;
            let path = layout.join(&rel);
            // Blobs named by their digest (docker 25 and later) are checked like OCI blobs.
            if let (Some("blobs"), Some("sha256"), Some(hex)) = (
                rel.iter().next().and_then(|c| c.to_str()),
                rel.iter().nth(1).and_then(|c| c.to_str()),
                rel.iter().nth(2).and_then(|c| c.to_str()),
            ) {
                verify(source, &path, hex)?;
            } else if !path.is_file() {
                return Err(refused(source, format!("'{name}' is missing")));
            }
            Ok(path)
        };
        let config = read_json(&file(&m.config)?)?;
        let layers = m.layers.iter().map(|l| file(l)).collect::<Result<_, _>>()?;
        return Ok((config, layers));
    }
    Err(refused(
        source,
        "not an OCI layout, OCI archive or docker save tarball (no index.json or manifest.json)",
    ))
}

/// A layer's bytes, decompressed as their magic says (gzip, zstd, or a plain tar).
fn open_layer(path: &Path) -> Result<Box<dyn Read>, RootfsError> {
    let mut f = BufReader::new(fs::File::open(path).map_err(io_at(path, "cannot open"))?);
    let mut magic = [0u8; 4];
    let n = {
        use std::io::BufRead;
        let buf = f.fill_buf().map_err(io_at(path, "cannot read"))?;
        let n = buf.len().min(4);
        magic[..n].copy_from_slice(&buf[..n]);
        n
    };
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(f)),
        [0x28, 0xb5, 0x2f, 0xfd] => Box::new(
            zstd::stream::read::Decoder::with_buffer(f).map_err(io_at(path, "cannot read"))?,
        ),
        _ => Box::new(f),
    })
}

/// Applies one layer to `root`.
fn apply_layer(layer: &Path, root: &Path) -> Result<(), RootfsError> {
    let bad_layer = |why: String| refused(layer, why);
    let mut ar = tar::Archive::new(open_layer(layer)?);
    let mut mine: HashSet<PathBuf> = HashSet::new();
    let entries = ar
        .entries()
        .map_err(|e| bad_layer(format!("not a tar layer: {e}")))?;
    for entry in entries {
        let mut e = entry.map_err(|e| bad_layer(format!("unreadable entry: {e}")))?;
        let raw = e
            .path()
            .map_err(|e| bad_layer(format!("unreadable name: {e}")))?
            .into_owned();
        let rel = clean(&raw)
            .ok_or_else(|| bad_layer(format!("entry '{}' leaves the root", raw.display())))?;
        let (Some(name), parent) = (
            rel.file_name().map(|n| n.to_owned()),
            rel.parent().unwrap_or(Path::new("")),
        ) else {
            continue; // the root itself
        };
        let dir = in_root(root, parent, layer)?;
        let name_str = name.to_string_lossy();
        if name_str == ".wh..wh..opq" {
            // Opaque: what lower layers put in this directory is gone.
            if let Ok(children) = fs::read_dir(root.join(&dir)) {
                for c in children.flatten() {
                    if !mine.contains(&dir.join(c.file_name())) {
                        remove(&c.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(victim) = name_str.strip_prefix(".wh.") {
            if victim.is_empty() || victim == "." || victim == ".." || victim.contains('/') {
                return Err(bad_layer(format!(
                    "whiteout '{}' names nothing",
                    raw.display()
                )));
            }
            remove(&root.join(&dir).join(victim))?;
            continue;
        }
        let rel = dir.join(&name);
        let target = root.join(&rel);
        let h = e.header().clone();
        let kind = h.entry_type();
        let mode = h
            .mode()
            .map_err(|e| bad_layer(format!("'{}': {e}", raw.display())))?
            & 0o7777;
        let existing = fs::symlink_metadata(&target).ok();
        let keep_dir = kind.is_dir() && existing.as_ref().is_some_and(|m| m.is_dir());
        if existing.is_some() && !keep_dir {
            remove(&target)?;
        }
        let made = |r: io::Result<()>| r.map_err(io_at(&target, "cannot create"));
        match kind {
            tar::EntryType::Directory => {
                if !keep_dir {
                    made(fs::create_dir(&target))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(io_at(&target, "cannot create"))?;
                io::copy(&mut e, &mut f)
                    .map_err(|err| bad_layer(format!("'{}': {err}", raw.display())))?;
            }
            tar::EntryType::Symlink => {
                let to = e
                    .link_name()
                    .map_err(|err| bad_layer(format!("'{}': {err}", raw.display())))?
                    .ok_or_else(|| {
                        bad_layer(format!("symlink '{}' has no target", raw.display()))
                    })?;
                made(symlink(&to, &target))?;
            }
            tar::EntryType::Link => {
                let to = e
                    .link_name()
                    .map_err(|err| bad_layer(format!("'{}': {err}", raw.display())))?
                    .ok_or_else(|| {
                        bad_layer(format!("hard link '{}' has no target", raw.display()))
                    })?;
                let to_rel = clean(&to).ok_or_else(|| {
                    bad_layer(format!("hard link '{}' leaves the root", raw.display()))
                })?;
                let to_dir = in_root(root, to_rel.parent().unwrap_or(Path::new("")), layer)?;
                let source = root
                    .join(to_dir)
                    .join(to_rel.file_name().unwrap_or_default());
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    return Err(bad_layer(format!(
                        "hard link '{}' to '{}', which is no file of the image",
                        raw.display(),
                        to.display()
                    )));
                }
                made(fs::hard_link(&source, &target))?;
                mine.insert(rel);
                continue; // a link shares its file's owner and mode
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let node = match kind {
                    tar::EntryType::Char => kiln_sys::fs::Node::Char { major, minor },
                    tar::EntryType::Block => kiln_sys::fs::Node::Block { major, minor },
                    _ => kiln_sys::fs::Node::Fifo,
                };
                made(kiln_sys::fs::mknod(&target, node, mode))?;
            }
            // pax and GNU headers are read by the tar crate; anything else has no file.
            _ => continue,
        }
        let uid = h
            .uid()
            .map_err(|err| bad_layer(format!("'{}': {err}", raw.display())))?;
        let gid = h
            .gid()
            .map_err(|err| bad_layer(format!("'{}': {err}", raw.display())))?;
        if kiln_sys::process::is_root() {
            let id = |v: u64| {
                u32::try_from(v)
                    .map_err(|_| bad_layer(format!("'{}': id {v} is out of range", raw.display())))
            };
            std::os::unix::fs::lchown(&target, Some(id(uid)?), Some(id(gid)?))
                .map_err(io_at(&target, "cannot chown"))?;
        }
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(io_at(&target, "cannot chmod"))?;
        }
        mine.insert(rel);
    }
    Ok(())
}

/// The directory `rel` inside `root` as the image sees it (see [`crate::tree`]), made where
/// missing.
fn in_root(root: &Path, rel: &Path, layer: &Path) -> Result<PathBuf, RootfsError> {
    Ok(crate::tree::resolve(root, rel, crate::tree::Missing::Make, layer)?.unwrap_or_default())
}

/// Removes `path` (a file, link or a whole directory) if it exists; never follows a symlink.
fn remove(path: &Path) -> Result<(), RootfsError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_at(path, "cannot remove")),
        Ok(_) => fs::remove_file(path).map_err(io_at(path, "cannot remove")),
        Err(_) => Ok(()),
    }
}
