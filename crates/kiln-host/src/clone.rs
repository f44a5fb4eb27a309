//! `kiln vm run --from VM:TAG`: a new VM from another's snapshot. It resumes where the
//! snapshot was taken, with disks of its own that share the snapshot's data: its root overlay
//! is a copy of the snapshot's (the root's changes only, over the same read-only base), and
//! its /home and /var are new QCOW2 overlays over the snapshot's raw disks, so nothing is
//! copied in full. It has its own name, seed disk (host key, client key) and network; the
//! guest's kiln hook applies them when it notices the resume (see kiln-rootfs).

use std::path::PathBuf;

use kiln_image::Format;

use crate::host::new_record;
use crate::snapshot::SNAPSHOTS_DIR;
use crate::state::{record_path, CONSOLE_SOCKET};
use crate::supervisor::Start;
use crate::{ConsoleSpec, Host, HostError, NetMode, NetRequest, NetSpec, VmKind, VmRecord};

/// What `kiln vm run --from VM:TAG` asks for.
#[derive(Clone, Debug, Default)]
pub struct CloneRequest {
    /// Generated in the style `calm-otter` when `None`.
    pub name: Option<String>,
    /// The VM whose snapshot it starts from.
    pub from: String,
    pub tag: String,
    /// Its network: the origin's mode unless asked otherwise (the guest has the origin's
    /// network card, or none); its own address and published ports.
    pub net: NetRequest,
    /// The public key root's `authorized_keys` gets (default: kiln's own client key).
    pub ssh_key: Option<PathBuf>,
}

impl Host {
    /// Starts a new VM from snapshot `req.tag` of VM `req.from`; returns once it runs. On any
    /// error nothing is left of it.
    pub fn clone_vm(&self, req: &CloneRequest) -> Result<VmRecord, HostError> {
        let origin = self.get(&req.from)?;
        if origin.meta.kind != VmKind::Linux {
            return Err(HostError::invalid(
                "from",
                &req.from,
                "only Linux microVMs can be cloned (a firmware VM writes to its own disk image)",
            ));
        }
        // The cheap checks first, for a clear error; the clone's supervisor checks every file.
        let manifest = crate::snapshot::manifest(&origin.config.dir, &req.tag)?;
        manifest.fits(&origin)?;
        let claim = self.claim(req.name.as_deref())?;
        let name = claim.name.clone();
        let result = self
            .make_clone(&claim.name, &claim.dir, &origin, &manifest, req)
            .and_then(|supervisor| supervisor.go());
        let result = claim.finish(result);
        if result.is_err() && !self.vm_dir(&name).exists() {
            let _ = crate::net::release(self, None, &name);
        }
        result
    }

    fn make_clone(
        &self,
        name: &str,
        dir: &std::path::Path,
        origin: &VmRecord,
        manifest: &crate::snapshot::Manifest,
        req: &CloneRequest,
    ) -> Result<crate::host::Supervisor, HostError> {
        let start = Start::Clone {
            from: req.from.clone(),
            tag: req.tag.clone(),
        };
        let supervisor = self.spawn_supervisor(dir, name, &start)?;
        let snap_dir = origin.config.dir.join(SNAPSHOTS_DIR).join(&req.tag);
        let mut net_req = req.net.clone();
        if net_req.mode == NetMode::None && net_req.ports.is_empty() {
            net_req.mode = match origin.config.net {
                NetSpec::None => NetMode::None,
                NetSpec::User { .. } => NetMode::User,
                NetSpec::Tap { .. } => NetMode::Tap,
            };
        }
        let net = crate::net::resolve(self, name, &net_req)?;
        if (net == NetSpec::None) != (origin.config.net == NetSpec::None) {
            return Err(HostError::invalid(
                "net",
                net.mode(),
                format!(
                    "the snapshot's machine has {} network card",
                    if origin.config.net == NetSpec::None {
                        "no"
                    } else {
                        "a"
                    }
                ),
            ));
        }
        let client = self.client_key(req.ssh_key.as_deref())?;
        let identity = crate::linux::identity_args(name, &net);
        let seed = crate::ssh::make_seed(dir, name, &client, &identity.join(" "))?;
        let mut spec = origin.config.clone();
        spec.name = name.to_string();
        spec.dir = dir.to_path_buf();
        spec.net = net;
        spec.console = ConsoleSpec::Socket {
            path: dir.join(CONSOLE_SOCKET),
            log: Some(dir.join("serial.log")),
            bios: false,
        };
        let mut rec_paths = Vec::new();
        for d in &mut spec.disks {
            if d.serial.as_deref() == Some(kiln_rootfs::SEED_SERIAL) {
                d.path = seed.clone();
                d.size = std::fs::metadata(&seed)
                    .map_err(|e| HostError::io(format!("{}: cannot read", seed.display()), e))?
                    .len();
                continue;
            }
            if d.read_only {
                continue;
            }
            let entry = manifest
                .disks
                .iter()
                .find(|e| e.device == d.device)
                .ok_or_else(|| {
                    HostError::invalid("snapshot", &req.tag, format!("holds no disk {}", d.device))
                })?;
            let in_snapshot = snap_dir.join(&entry.file);
            let stem = d
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "disk".into());
            let own = dir.join(format!("{stem}.qcow2"));
            match d.format {
                // An overlay holds only the guest's changes: the clone's is a copy of it, over
                // the same base.
                Format::Qcow2 => {
                    kiln_image::validate_overlay(&in_snapshot)?;
                    kiln_sys::sparse::copy(&in_snapshot, &own).map_err(|e| {
                        HostError::io(format!("{}: cannot copy", in_snapshot.display()), e)
                    })?;
                }
                // A whole disk: the clone writes to an overlay over the snapshot's.
                _ => {
                    kiln_image::create_overlay(&in_snapshot, &own)?;
                    d.format = Format::Qcow2;
                    d.backing = Some(in_snapshot.clone());
                }
            }
            d.path = own.clone();
            rec_paths.push((d.mount.clone(), own));
        }
        let spec = spec.checked()?;
        let mut rec = new_record(spec, origin.meta.image.clone(), false);
        crate::linux::name_root_disk(&mut rec)?;
        rec.meta.rootfs = origin.meta.rootfs.clone();
        rec.meta.kernel = origin.meta.kernel.clone();
        rec.meta.initrd = origin.meta.initrd.clone();
        rec.meta.ssh_identity = client.identity.clone();
        for (mount, path) in rec_paths {
            match mount.as_str() {
                "/" => rec.meta.overlay = Some(path),
                "/home" => rec.meta.home_disk = Some(path),
                "/var" => rec.meta.var_disk = Some(path),
                _ => {}
            }
        }
        rec.save(&record_path(dir))?;
        Ok(supervisor)
    }

    /// Fails, naming them, when clones' disks are backed by files under `prefix` (a snapshot,
    /// or a VM's store), which is the `field` `value` about to be removed.
    pub(crate) fn unused(
        &self,
        prefix: &std::path::Path,
        field: &'static str,
        value: &str,
    ) -> Result<(), HostError> {
        let users = self.users_of(prefix);
        if users.is_empty() {
            return Ok(());
        }
        Err(HostError::invalid(
            field,
            value,
            format!(
                "backs the disks of {} (cloned from it); remove {} first",
                users.join(", "),
                if users.len() == 1 {
                    "that VM"
                } else {
                    "those VMs"
                }
            ),
        ))
    }

    /// The VMs whose disks are backed by files under `prefix`: clones that need them.
    fn users_of(&self, prefix: &std::path::Path) -> Vec<String> {
        self.entries()
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.record())
            .filter(|r| {
                r.config
                    .disks
                    .iter()
                    .any(|d| d.backing.as_ref().is_some_and(|b| b.starts_with(prefix)))
            })
            .map(|r| r.meta.name.clone())
            .collect()
    }
}
