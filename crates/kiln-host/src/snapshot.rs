//! The snapshot store of a VM (issue 13's foundation; the engines' save and restore build on
//! it): `VMDIR/snapshots/TAG/` holds the files an engine wrote (machine state, disk copies)
//! and `snapshot.json`, which names each file with its size and SHA-256 and records the
//! machine config the snapshot needs.
//!
//! A snapshot exists complete or not at all: [`SnapshotWriter`] fills a temporary directory
//! beside the store (named after its writer, so one left by a killed process is swept by the
//! next), checksums every file, fsyncs, and renames it into place only if the tag is still
//! free. [`open`] checks every file against the manifest (size first, then the digest) before
//! anything may resume from it, and [`SnapshotConfig::check`] refuses a different machine
//! config with the difference named.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{EngineKind, HostError, Result, VmSpec};

/// The store's directory in a VM's directory.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// The manifest's name in a snapshot's directory.
pub const MANIFEST: &str = "snapshot.json";
/// Version of [`Manifest`].
pub const FORMAT: u32 = 1;
/// Largest manifest read.
const MANIFEST_MAX: u64 = 1 << 20;

/// The machine a snapshot was taken of, and must resume on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotConfig {
    pub engine: EngineKind,
    pub vcpu: u32,
    pub ram_mib: u32,
    /// The guest's disks by device, with their sizes.
    pub disks: Vec<(String, u64)>,
}

impl SnapshotConfig {
    /// The config of `spec`'s machine.
    pub fn of(spec: &VmSpec) -> SnapshotConfig {
        SnapshotConfig {
            engine: spec.engine,
            vcpu: spec.vcpu,
            ram_mib: spec.ram_mib,
            disks: spec
                .disks
                .iter()
                .map(|d| (d.device.clone(), d.size))
                .collect(),
        }
    }

    /// Fails, naming the first difference, unless `other` is the same machine.
    pub fn check(&self, other: &SnapshotConfig, tag: &str) -> Result<()> {
        let differ = |what: &str, snap: String, now: String| {
            Err(HostError::invalid(
                "snapshot",
                tag,
                format!("was taken with {what} {snap}, this VM has {now}; it resumes only on the same machine"),
            ))
        };
        if self.engine != other.engine {
            return differ(
                "engine",
                self.engine.name().into(),
                other.engine.name().into(),
            );
        }
        if self.vcpu != other.vcpu {
            return differ("vCPUs", self.vcpu.to_string(), other.vcpu.to_string());
        }
        if self.ram_mib != other.ram_mib {
            return differ(
                "RAM (MiB)",
                self.ram_mib.to_string(),
                other.ram_mib.to_string(),
            );
        }
        if self.disks != other.disks {
            let show = |d: &[(String, u64)]| {
                d.iter()
                    .map(|(n, s)| format!("{n} ({s} bytes)"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return differ("disks", show(&self.disks), show(&other.disks));
        }
        Ok(())
    }
}

/// One file of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `snapshot.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tag: String,
    /// The VM it was taken of.
    pub vm: String,
    pub created_at: String,
    pub config: SnapshotConfig,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A snapshot whose files all match its manifest.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    /// The path of one of its files.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        self.manifest
            .files
            .iter()
            .any(|f| f.name == name)
            .then(|| self.dir.join(name))
    }
}

/// Checks a tag: 1 to 64 letters, digits, `.`, `_` or `-`, not starting with a dot.
pub fn validate_tag(tag: &str) -> Result<()> {
    let ok = (1..=64).contains(&tag.len())
        && !tag.starts_with('.')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(HostError::invalid(
            "snapshot tag",
            tag,
            "use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
        ))
    }
}

/// Fills a new snapshot; nothing is visible until [`SnapshotWriter::commit`].
pub struct SnapshotWriter {
    tmp: PathBuf,
    target: PathBuf,
    tag: String,
    vm: String,
    config: SnapshotConfig,
    names: Vec<String>,
}

impl SnapshotWriter {
    /// Starts snapshot `tag` of the VM `vm` in `vm_dir`; refused when the tag exists.
    pub fn new(
        vm_dir: &Path,
        vm: &str,
        tag: &str,
        config: SnapshotConfig,
    ) -> Result<SnapshotWriter> {
        validate_tag(tag)?;
        let store = vm_dir.join(SNAPSHOTS_DIR);
        fs::create_dir_all(&store)
            .map_err(|e| HostError::io(format!("{}: cannot create", store.display()), e))?;
        let target = store.join(tag);
        if fs::symlink_metadata(&target).is_ok() {
            return Err(exists(vm, tag));
        }
        kiln_sys::temp::sweep(&store);
        let tmp = kiln_sys::temp::beside(&target);
        fs::create_dir(&tmp)
            .map_err(|e| HostError::io(format!("{}: cannot create", tmp.display()), e))?;
        Ok(SnapshotWriter {
            tmp,
            target,
            tag: tag.to_string(),
            vm: vm.to_string(),
            config,
            names: Vec::new(),
        })
    }

    /// Where the engine writes the file `name` (a plain file name, once each).
    pub fn path(&mut self, name: &str) -> Result<PathBuf> {
        let plain = !name.is_empty()
            && name != MANIFEST
            && !name.starts_with('.')
            && !name.contains('/')
            && !self.names.iter().any(|n| n == name);
        if !plain {
            return Err(HostError::invalid(
                "snapshot file",
                name,
                "not a new plain file name",
            ));
        }
        self.names.push(name.to_string());
        Ok(self.tmp.join(name))
    }

    /// Checksums and fsyncs every file, writes the manifest, and renames the snapshot into
    /// place; fails (leaving nothing) if a file is missing or the tag was taken meanwhile.
    pub fn commit(mut self) -> Result<Snapshot> {
        let mut files = Vec::new();
        for name in &self.names {
            let p = self.tmp.join(name);
            let (size, sha256) = digest(&p, None)?;
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| HostError::io(format!("{}: cannot sync", p.display()), e))?;
            files.push(FileEntry {
                name: name.clone(),
                size,
                sha256,
            });
        }
        let manifest = Manifest {
            format: FORMAT,
            tag: self.tag.clone(),
            vm: self.vm.clone(),
            created_at: kiln_sys::now_rfc3339(),
            config: self.config.clone(),
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| HostError::io("encode snapshot.json", e.into()))?;
        let mpath = self.tmp.join(MANIFEST);
        fs::File::create(&mpath)
            .and_then(|mut f| f.write_all(&json).and_then(|_| f.sync_all()))
            .map_err(|e| HostError::io(format!("{}: cannot write", mpath.display()), e))?;
        // rename(2) onto an existing directory succeeds when that one is empty; the check
        // before it and a non-empty temporary make a taken tag an error either way.
        if fs::symlink_metadata(&self.target).is_ok() {
            return Err(exists(&self.vm, &self.tag));
        }
        fs::rename(&self.tmp, &self.target).map_err(|e| {
            HostError::io(
                format!("{}: cannot move into place", self.target.display()),
                e,
            )
        })?;
        if let Some(store) = self.target.parent() {
            let _ = fs::File::open(store).and_then(|d| d.sync_all());
        }
        self.tmp = PathBuf::new();
        Ok(Snapshot {
            dir: self.target.clone(),
            manifest,
        })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn exists(vm: &str, tag: &str) -> HostError {
    HostError::invalid(
        "snapshot",
        tag,
        format!("exists already for VM '{vm}' (kiln vm rm-snapshot {vm} {tag} removes it)"),
    )
}

/// The size and hex SHA-256 of `path`, reading at most `limit` bytes (+1, to tell a longer
/// file).
fn digest(path: &Path, limit: Option<u64>) -> Result<(u64, String)> {
    let f = fs::File::open(path)
        .map_err(|e| HostError::io(format!("{}: cannot read", path.display()), e))?;
    let mut r: Box<dyn Read> = match limit {
        Some(n) => Box::new(f.take(n + 1)),
        None => Box::new(f),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r
            .read(&mut buf)
            .map_err(|e| HostError::io(format!("{}: cannot read", path.display()), e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, format!("{:x}", h.finalize())))
}

/// The snapshot `tag` of the VM in `vm_dir`, every file checked against its manifest.
pub fn open(vm_dir: &Path, tag: &str) -> Result<Snapshot> {
    validate_tag(tag)?;
    let dir = vm_dir.join(SNAPSHOTS_DIR).join(tag);
    let manifest = read_manifest(&dir)?;
    let bad = |why: String| HostError::State {
        path: dir.clone(),
        why,
    };
    if manifest.tag != tag {
        return Err(bad(format!(
            "its manifest names the tag '{}'",
            manifest.tag
        )));
    }
    for f in &manifest.files {
        let plain = !f.name.is_empty() && !f.name.contains('/') && !f.name.starts_with('.');
        if !plain {
            return Err(bad(format!("its manifest names the file {:?}", f.name)));
        }
        let p = dir.join(&f.name);
        let m = fs::symlink_metadata(&p).map_err(|_| bad(format!("{} is missing", f.name)))?;
        if !m.file_type().is_file() {
            return Err(bad(format!("{} is not a regular file", f.name)));
        }
        if m.len() != f.size {
            return Err(bad(format!(
                "{} is {} bytes, the manifest says {}: truncated or damaged",
                f.name,
                m.len(),
                f.size
            )));
        }
        let (_, sha) = digest(&p, Some(f.size))?;
        if sha != f.sha256 {
            return Err(bad(format!(
                "{} does not match its checksum: damaged",
                f.name
            )));
        }
    }
    Ok(Snapshot { dir, manifest })
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bad = |why: String| HostError::State {
        path: path.clone(),
        why,
    };
    let f = fs::File::open(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bad("no such snapshot".into())
        } else {
            bad(format!("cannot read: {e}"))
        }
    })?;
    let mut text = Vec::new();
    f.take(MANIFEST_MAX + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    if text.len() as u64 > MANIFEST_MAX {
        return Err(bad("is larger than 1 MiB".into()));
    }
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not a snapshot manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!(
            "is of format {}, kiln reads {FORMAT}",
            m.format
        )));
    }
    Ok(m)
}

/// The snapshots of the VM in `vm_dir`, oldest first (manifests only: [`open`] checks the
/// files). An unreadable one is listed with its error.
pub fn list(vm_dir: &Path) -> Vec<std::result::Result<Manifest, (String, String)>> {
    let store = vm_dir.join(SNAPSHOTS_DIR);
    let mut out: Vec<std::result::Result<Manifest, (String, String)>> = Vec::new();
    let Ok(entries) = fs::read_dir(&store) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if validate_tag(&name).is_err() || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        out.push(read_manifest(&e.path()).map_err(|err| (name, err.to_string())));
    }
    out.sort_by(|a, b| match (a, b) {
        (Ok(a), Ok(b)) => a.created_at.cmp(&b.created_at).then(a.tag.cmp(&b.tag)),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(a), Err(b)) => a.0.cmp(&b.0),
    });
    out
}

/// Removes snapshot `tag` of the VM in `vm_dir`.
pub fn remove(vm_dir: &Path, vm: &str, tag: &str) -> Result<()> {
    validate_tag(tag)?;
    let dir = vm_dir.join(SNAPSHOTS_DIR).join(tag);
    if fs::symlink_metadata(&dir).is_err() {
        return Err(HostError::invalid(
            "snapshot",
            tag,
            format!("VM '{vm}' has no such snapshot (kiln vm snapshots {vm} lists them)"),
        ));
    }
    // Out of the store's namespace first, so a half-removed snapshot is never listed.
    let doomed = kiln_sys::temp::beside(&dir);
    fs::rename(&dir, &doomed)
        .map_err(|e| HostError::io(format!("{}: cannot remove", dir.display()), e))?;
    fs::remove_dir_all(&doomed)
        .map_err(|e| HostError::io(format!("{}: cannot remove", doomed.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SnapshotConfig {
        SnapshotConfig {
            engine: EngineKind::QemuMicrovm,
            vcpu: 2,
            ram_mib: 1024,
            disks: vec![("vda".into(), 2 << 30), ("vdb".into(), 1 << 30)],
        }
    }

    fn take(vm_dir: &Path, tag: &str) -> Result<Snapshot> {
        let mut w = SnapshotWriter::new(vm_dir, "web", tag, config())?;
        fs::write(w.path("memory")?, vec![7u8; 100_000]).unwrap();
        fs::write(w.path("root.qcow2")?, b"disk").unwrap();
        w.commit()
    }

    #[test]
    fn a_snapshot_is_complete_checked_and_listed() {
        let d = tempfile::tempdir().unwrap();
        let s = take(d.path(), "t1").unwrap();
        assert_eq!(s.manifest.bytes(), 100_004);
        let again = open(d.path(), "t1").unwrap();
        assert_eq!(again.manifest, s.manifest);
        assert!(again.file("memory").is_some() && again.file("nope").is_none());
        take(d.path(), "t2").unwrap();
        let tags: Vec<String> = list(d.path()).into_iter().map(|m| m.unwrap().tag).collect();
        assert_eq!(tags, ["t1", "t2"]);
        // Nothing temporary is left in the store.
        let names: Vec<_> = fs::read_dir(d.path().join(SNAPSHOTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        remove(d.path(), "web", "t1").unwrap();
        assert_eq!(list(d.path()).len(), 1);
        let e = remove(d.path(), "web", "t1").unwrap_err().to_string();
        assert!(e.contains("no such snapshot"), "{e}");
    }

    #[test]
    fn a_taken_tag_an_unfinished_writer_and_bad_names_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        take(d.path(), "t").unwrap();
        let e = take(d.path(), "t").unwrap_err().to_string();
        assert!(e.contains("exists already") && !e.contains('\n'), "{e}");
        {
            let mut w = SnapshotWriter::new(d.path(), "web", "half", config()).unwrap();
            fs::write(w.path("memory").unwrap(), b"x").unwrap();
            assert!(w.path("memory").is_err(), "a name is written once");
            assert!(w.path("../x").is_err() && w.path(MANIFEST).is_err());
            // Dropped without commit: as if the snapshot failed half-way.
        }
        assert!(open(d.path(), "half").is_err());
        assert_eq!(list(d.path()).len(), 1);
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_tag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn truncated_or_damaged_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = take(d.path(), "t").unwrap();
        let mem = s.dir.join("memory");
        let full = fs::read(&mem).unwrap();
        fs::write(&mem, &full[..full.len() / 2]).unwrap();
        let e = open(d.path(), "t").unwrap_err().to_string();
        assert!(
            e.contains("truncated or damaged") && !e.contains('\n'),
            "{e}"
        );
        let mut flipped = full.clone();
        flipped[10] ^= 1;
        fs::write(&mem, &flipped).unwrap();
        let e = open(d.path(), "t").unwrap_err().to_string();
        assert!(e.contains("does not match its checksum"), "{e}");
        fs::write(s.dir.join(MANIFEST), b"{").unwrap();
        let e = open(d.path(), "t").unwrap_err().to_string();
        assert!(e.contains("not a snapshot manifest"), "{e}");
        assert!(list(d.path())[0].is_err());
    }

    #[test]
    fn a_different_machine_is_named() {
        let a = config();
        a.check(&config(), "t").unwrap();
        let more_ram = SnapshotConfig {
            ram_mib: 2048,
            ..config()
        };
        let e = a.check(&more_ram, "t").unwrap_err().to_string();
        assert!(e.contains("RAM (MiB) 1024, this VM has 2048"), "{e}");
        let other = SnapshotConfig {
            engine: EngineKind::Builtin,
            ..config()
        };
        let e = a.check(&other, "t").unwrap_err().to_string();
        assert!(
            e.contains("engine qemu-microvm, this VM has builtin"),
            "{e}"
        );
        let disks = SnapshotConfig {
            disks: vec![("vda".into(), 2 << 30)],
            ..config()
        };
        assert!(a
            .check(&disks, "t")
            .unwrap_err()
            .to_string()
            .contains("disks"));
    }
}
