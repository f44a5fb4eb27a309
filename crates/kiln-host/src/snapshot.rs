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
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Restore, Running};
use crate::{EngineKind, HostError, Result, VmRecord, VmSpec};

/// The store's directory in a VM's directory.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// The manifest's name in a snapshot's directory.
pub const MANIFEST: &str = "snapshot.json";
/// Version of [`Manifest`].
pub const FORMAT: u32 = 1;
/// The machine state's file name in a snapshot.
pub const MACHINE: &str = "machine";
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
    /// [`kiln_sys::sparse::digest`]: a SHA-256 of the content that never reads holes.
    pub digest: String,
}

/// A guest disk's content at the snapshot: the file `file` of the snapshot, in the VM disk's
/// own format (a QCOW2 overlay over the same base, or raw).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub device: String,
    pub file: String,
}

/// `snapshot.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tag: String,
    /// The VM it was taken of.
    pub vm: String,
    /// The id of the VM it was taken of (a new VM of the same name is another VM).
    pub vm_id: String,
    pub created_at: String,
    pub config: SnapshotConfig,
    /// The file holding the machine (vCPUs, devices, memory), in the engine's format.
    pub machine: String,
    /// How the engine wrote it (e.g. `qemu-migration+mapped-ram`, `kiln-vmm/1`): it resumes
    /// only with an engine that reads the same.
    pub machine_format: String,
    /// Every writable disk at the snapshot.
    pub disks: Vec<DiskEntry>,
    /// How long the guest was paused while it was taken, in milliseconds.
    pub paused_ms: u64,
    /// Bytes its files take on disk (their holes, e.g. memory the guest never touched, take
    /// nothing).
    pub stored_bytes: u64,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Fails, saying why, unless this snapshot was taken of the very VM `rec` (not another of
    /// the same name) on the same machine.
    pub fn fits(&self, rec: &VmRecord) -> Result<()> {
        if self.vm_id != rec.meta.id {
            return Err(HostError::invalid(
                "snapshot",
                &self.tag,
                format!(
                    "was taken of another VM (one named '{}'), not of '{}'",
                    self.vm, rec.meta.name
                ),
            ));
        }
        self.config
            .check(&SnapshotConfig::of(&rec.config), &self.tag)
    }
}

/// A snapshot whose files all match its manifest.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Snapshot {
    /// The machine state an engine starts from.
    fn restore_point(&self) -> Restore {
        Restore {
            machine: self.dir.join(&self.manifest.machine),
            format: self.manifest.machine_format.clone(),
        }
    }

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
    vm_id: String,
    config: SnapshotConfig,
    names: Vec<String>,
    /// The format of the machine state (in [`MACHINE`]), once the engine has written it.
    machine_format: Option<String>,
    disks: Vec<DiskEntry>,
    /// Set by the taker: how long the guest was paused.
    pub paused_ms: u64,
}

impl SnapshotWriter {
    /// Starts snapshot `tag` of the VM `vm` (id `vm_id`) in `vm_dir`; refused when the tag
    /// exists.
    pub fn new(
        vm_dir: &Path,
        vm: &str,
        vm_id: &str,
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
            vm_id: vm_id.to_string(),
            config,
            names: Vec::new(),
            machine_format: None,
            disks: Vec::new(),
            paused_ms: 0,
        })
    }

    /// Where the engine writes the machine state.
    pub fn machine(&mut self) -> Result<PathBuf> {
        self.path(MACHINE)
    }

    /// The format the engine wrote the machine state in.
    pub fn machine_format(&mut self, format: &str) {
        self.machine_format = Some(format.to_string());
    }

    /// Where the content of the disk `device` goes (`name` is its file in the snapshot).
    pub fn disk(&mut self, device: &str, name: &str) -> Result<PathBuf> {
        let path = self.path(name)?;
        self.disks.push(DiskEntry {
            device: device.to_string(),
            file: name.to_string(),
        });
        Ok(path)
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
        let Some(machine_format) = self.machine_format.clone() else {
            return Err(HostError::invalid(
                "snapshot",
                &self.tag,
                "the engine wrote no machine state",
            ));
        };
        let mut files = Vec::new();
        let mut stored_bytes = 0;
        for name in &self.names {
            let p = self.tmp.join(name);
            let (size, digest) = digest(&p, None)?;
            stored_bytes += fs::metadata(&p).map_or(0, |m| {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            });
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| HostError::io(format!("{}: cannot sync", p.display()), e))?;
            files.push(FileEntry {
                name: name.clone(),
                size,
                digest,
            });
        }
        let manifest = Manifest {
            format: FORMAT,
            tag: self.tag.clone(),
            vm: self.vm.clone(),
            vm_id: self.vm_id.clone(),
            created_at: kiln_sys::now_rfc3339(),
            config: self.config.clone(),
            machine: MACHINE.to_string(),
            machine_format,
            disks: std::mem::take(&mut self.disks),
            paused_ms: self.paused_ms,
            stored_bytes,
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

/// The size and [`kiln_sys::sparse::digest`] of `path`, reading at most `limit` bytes.
fn digest(path: &Path, limit: Option<u64>) -> Result<(u64, String)> {
    kiln_sys::sparse::digest(path, limit)
        .map_err(|e| HostError::io(format!("{}: cannot read", path.display()), e))
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
    let listed = |name: &str| manifest.files.iter().any(|f| f.name == name);
    for name in std::iter::once(&manifest.machine).chain(manifest.disks.iter().map(|d| &d.file)) {
        if !listed(name) {
            return Err(bad(format!("its manifest does not list {name:?}")));
        }
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
        if sha != f.digest {
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

impl crate::Host {
    /// Takes snapshot `tag` (by default named after the time, `s-YYYYMMDD-HHMMSS`) of the
    /// running VM `name` (see [`take`]); with `stop`, the VM ends after it (as `snapshotted`).
    /// Returns the snapshot's manifest.
    pub fn snapshot(&self, name: &str, tag: Option<&str>, stop: bool) -> Result<Manifest> {
        let tag = tag.map_or_else(default_tag, str::to_string);
        let tag = tag.as_str();
        validate_tag(tag)?;
        let rec = self.running(name)?;
        if rec.meta.foreground {
            return Err(HostError::invalid(
                "snapshot",
                tag,
                format!("VM '{name}' runs in the foreground of `kiln run`, which leaves nothing behind; run it with `kiln vm run` to snapshot it"),
            ));
        }
        let dir = &rec.config.dir;
        if fs::symlink_metadata(dir.join(SNAPSHOTS_DIR).join(tag)).is_ok() {
            return Err(exists(name, tag));
        }
        crate::supervisor::done(
            name,
            &rec.meta.control_socket,
            &crate::supervisor::Request::Snapshot {
                tag: tag.to_string(),
                stop,
            },
            std::time::Duration::from_secs(1800),
            "the snapshot did not complete within 30 minutes",
            "it ended before the snapshot was complete",
        )?;
        if stop {
            self.wait_stopped(name, std::time::Duration::from_secs(30))?;
        }
        manifest(dir, tag)
    }

    /// Starts the stopped VM `name` from its snapshot `tag` (by default its newest) instead of
    /// booting it (see [`restore`]); returns once it runs. The VM's disks are put back to the
    /// snapshot's.
    pub fn resume(&self, name: &str, tag: Option<&str>) -> Result<VmRecord> {
        let rec = self.get(name)?;
        if rec.is_alive() {
            return Err(HostError::invalid(
                "vm",
                name,
                format!("is running; stop it first (kiln vm stop {name}, or take the snapshot with --stop)"),
            ));
        }
        let tag = match tag {
            Some(t) => t.to_string(),
            None => list(&rec.config.dir)
                .into_iter()
                .rev()
                .find_map(|m| m.ok())
                .map(|m| m.tag)
                .ok_or_else(|| {
                    HostError::invalid(
                        "snapshot",
                        name,
                        format!("VM '{name}' has no snapshot (kiln vm snapshot {name} takes one)"),
                    )
                })?,
        };
        let tag = tag.as_str();
        // The cheap checks first, for a clear error before anything starts; the supervisor
        // checks every file.
        manifest(&rec.config.dir, tag)?.fits(&rec)?;
        self.spawn_supervisor(
            &rec.config.dir,
            name,
            &crate::supervisor::Start::Resume(tag.to_string()),
        )?
        .go()
    }

    /// The snapshots of VM `name` (see [`list`]).
    pub fn snapshots(
        &self,
        name: &str,
    ) -> Result<Vec<std::result::Result<Manifest, (String, String)>>> {
        let rec = self.get(name)?;
        Ok(list(&rec.config.dir))
    }

    /// Removes snapshot `tag` of VM `name`; refused while a clone's disks are backed by it.
    pub fn remove_snapshot(&self, name: &str, tag: &str) -> Result<()> {
        validate_tag(tag)?;
        let rec = self.get(name)?;
        self.unused(
            &rec.config.dir.join(SNAPSHOTS_DIR).join(tag),
            "snapshot",
            tag,
        )?;
        remove(&rec.config.dir, name, tag)
    }
}

/// A tag named after the time: `s-YYYYMMDD-HHMMSS` (UTC).
pub fn default_tag() -> String {
    let now = kiln_sys::now_rfc3339();
    let digits: String = now.chars().take(19).filter(char::is_ascii_digit).collect();
    format!(
        "s-{}-{}",
        &digits[..8.min(digits.len())],
        &digits[8.min(digits.len())..]
    )
}

/// A disk's file name in a snapshot: its device's last part and its file's extension
/// (`/dev/vda` in `root.qcow2` is `vda.qcow2`).
fn disk_file(device: &str, path: &Path) -> String {
    let dev = device.rsplit('/').next().unwrap_or(device);
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "img".into());
    format!("{dev}.{ext}")
}

/// Takes snapshot `tag` of the running VM `vm` (recorded as `rec`, run by `engine`): pauses
/// the guest, saves the machine, copies every writable disk, and lets the guest run again
/// unless `stop`. The guest is paused only while its state and disks are written; the
/// checksums are computed after it runs again. Nothing is left of a snapshot that failed.
pub(crate) fn take(
    vm: &mut dyn Running,
    engine: &dyn Engine,
    rec: &VmRecord,
    tag: &str,
    stop: bool,
) -> Result<Snapshot> {
    let spec = &rec.config;
    let mut w = SnapshotWriter::new(
        &spec.dir,
        &spec.name,
        &rec.meta.id,
        tag,
        SnapshotConfig::of(spec),
    )?;
    let disks = engine.writable_disks(spec)?;
    let t0 = Instant::now();
    vm.pause()?;
    let saved = (|| -> Result<()> {
        let machine = w.machine()?;
        let format = vm.save_state(&machine)?;
        w.machine_format(&format);
        for (device, path) in &disks {
            let to = w.disk(device, &disk_file(device, path))?;
            kiln_sys::sparse::copy(path, &to).map_err(|e| {
                HostError::io(
                    format!("{}: cannot copy into the snapshot", path.display()),
                    e,
                )
            })?;
        }
        Ok(())
    })();
    let paused = t0.elapsed();
    if saved.is_err() || !stop {
        match (vm.resume(), &saved) {
            (Err(e), Ok(())) => return Err(e),
            (Err(e), Err(_)) => tracing::warn!("resuming after a failed snapshot: {e}"),
            _ => {}
        }
    }
    saved?;
    w.paused_ms = paused.as_millis() as u64;
    let snap = w.commit()?;
    tracing::info!(
        "{}: snapshot '{tag}' taken ({} bytes, guest paused {} ms)",
        spec.name,
        snap.manifest.bytes(),
        snap.manifest.paused_ms
    );
    Ok(snap)
}

/// Prepares the stopped VM `rec` to resume from its snapshot `tag` on `engine`: checks every
/// file of the snapshot, that it was taken of this very VM on the same machine, and puts its
/// disks back in place of the VM's (all or none). Returns the machine state to start from.
pub(crate) fn restore(engine: &dyn Engine, rec: &VmRecord, tag: &str) -> Result<Restore> {
    let spec = &rec.config;
    let snap = open(&spec.dir, tag)?;
    let m = &snap.manifest;
    m.fits(rec)?;
    let disks = engine.writable_disks(spec)?;
    if m.disks.len() != disks.len() {
        return Err(HostError::invalid(
            "snapshot",
            tag,
            format!(
                "holds {} disks, the VM writes to {}",
                m.disks.len(),
                disks.len()
            ),
        ));
    }
    kiln_sys::temp::sweep(&spec.dir);
    // Every disk is copied under a temporary name first; only then are they all renamed.
    let mut staged: Vec<(PathBuf, &Path)> = Vec::new();
    let staging = (|| -> Result<()> {
        for (device, path) in &disks {
            let entry = m
                .disks
                .iter()
                .find(|d| &d.device == device)
                .ok_or_else(|| {
                    HostError::invalid("snapshot", tag, format!("holds no disk {device}"))
                })?;
            let tmp = kiln_sys::temp::beside(path);
            staged.push((tmp.clone(), path));
            kiln_sys::sparse::copy(&snap.dir.join(&entry.file), &tmp).map_err(|e| {
                HostError::io(
                    format!("{}: cannot restore from the snapshot", path.display()),
                    e,
                )
            })?;
        }
        Ok(())
    })();
    if let Err(e) = staging {
        for (tmp, _) in &staged {
            let _ = fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (tmp, path) in &staged {
        fs::rename(tmp, path)
            .map_err(|e| HostError::io(format!("{}: cannot replace", path.display()), e))?;
    }
    Ok(snap.restore_point())
}

/// The machine state a new clone (`spec`, in `dir`, its disks already made from the snapshot)
/// starts from: snapshot `tag` of the VM `from` (beside `dir`), every file checked, taken on
/// the same machine.
pub(crate) fn clone_source(dir: &Path, from: &str, tag: &str, spec: &VmSpec) -> Result<Restore> {
    crate::validate_name(from)?;
    let vms = dir.parent().ok_or_else(|| HostError::State {
        path: dir.to_path_buf(),
        why: "not in a registry".into(),
    })?;
    let snap = open(&vms.join(from), tag)?;
    snap.manifest.config.check(&SnapshotConfig::of(spec), tag)?;
    Ok(snap.restore_point())
}

/// The manifest of snapshot `tag` in `vm_dir`, unchecked files (see [`open`]).
pub(crate) fn manifest(vm_dir: &Path, tag: &str) -> Result<Manifest> {
    validate_tag(tag)?;
    read_manifest(&vm_dir.join(SNAPSHOTS_DIR).join(tag))
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
        let mut w = SnapshotWriter::new(vm_dir, "web", "id1", tag, config())?;
        fs::write(w.machine()?, vec![7u8; 100_000]).unwrap();
        w.machine_format("test/1");
        fs::write(w.disk("vda", "root.qcow2")?, b"disk").unwrap();
        w.commit()
    }

    #[test]
    fn a_snapshot_is_complete_checked_and_listed() {
        let d = tempfile::tempdir().unwrap();
        let s = take(d.path(), "t1").unwrap();
        assert_eq!(s.manifest.bytes(), 100_004);
        let again = open(d.path(), "t1").unwrap();
        assert_eq!(again.manifest, s.manifest);
        assert!(again.file(MACHINE).is_some() && again.file("nope").is_none());
        assert_eq!(again.manifest.machine_format, "test/1");
        assert_eq!(again.manifest.disks[0].file, "root.qcow2");
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
            let mut w = SnapshotWriter::new(d.path(), "web", "id1", "half", config()).unwrap();
            fs::write(w.machine().unwrap(), b"x").unwrap();
            assert!(w.path(MACHINE).is_err(), "a name is written once");
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
        let mem = s.dir.join(MACHINE);
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
    fn default_tags_are_valid_and_dated() {
        let t = default_tag();
        validate_tag(&t).unwrap();
        assert_eq!(t.len(), "s-20261201-235959".len(), "{t}");
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
