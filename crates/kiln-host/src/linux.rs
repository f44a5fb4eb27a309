//! Linux microVMs: a request (image directory or rootfs + kernel) becomes a launch spec and
//! the VM's own storage: a copy-on-write root over the read-only base, its own /home and /var.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_image::Format;
use kiln_qemu::Accel;
use kiln_rootfs::{ImageManifest, Seed, DEFAULT_DISK_SIZE};

use crate::host::new_record;
use crate::state::record_path;
use crate::{Boot, ConsoleSpec, EngineKind, Host, HostError, VmDisk, VmRecord, VmSpec};

/// Default vCPUs of a Linux VM.
pub const DEFAULT_VCPUS: u32 = 2;
/// Default memory of a Linux VM in MiB.
pub const DEFAULT_RAM_MIB: u32 = 1024;

/// What `kiln vm run` asks for: a Linux microVM.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Generated in the style `calm-otter` when `None`.
    pub name: Option<String>,
    pub vcpu: u32,
    pub ram_mib: u32,
    /// An image directory with `image.json` (rootfs, kernel, initrd).
    pub image: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Size of the VM's /home disk in bytes.
    pub home_size: u64,
    /// Size of the VM's /var disk in bytes.
    pub var_size: u64,
    /// Extra kernel arguments, appended to kiln's.
    pub cmdline: Option<String>,
    /// The network: none, user mode or TAP, and published ports.
    pub net: crate::NetRequest,
    /// The public key root's `authorized_keys` gets (default: kiln's own client key).
    pub ssh_key: Option<PathBuf>,
}

impl Default for RunRequest {
    fn default() -> Self {
        RunRequest {
            name: None,
            vcpu: DEFAULT_VCPUS,
            ram_mib: DEFAULT_RAM_MIB,
            image: None,
            rootfs: None,
            kernel: None,
            initrd: None,
            home_size: DEFAULT_DISK_SIZE,
            var_size: DEFAULT_DISK_SIZE,
            cmdline: None,
            net: crate::NetRequest::default(),
            ssh_key: None,
        }
    }
}

/// Resolved inputs of a run.
struct Inputs {
    image: Option<PathBuf>,
    rootfs: PathBuf,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    image_cmdline: String,
    home_seed: Seed,
    var_seed: Seed,
}

impl Host {
    /// Validates `req`, claims the name, prepares the copy-on-write root and the VM's disks and
    /// starts the VM in the background under its supervisor. Returns once the VM runs. On any
    /// error nothing is left under `vms/` (except a VM that already had the name).
    pub fn run(&self, req: &RunRequest) -> Result<VmRecord, HostError> {
        let inputs = validate(req)?;
        let claim = self.claim(req.name.as_deref())?;
        let name = claim.name.clone();
        let result = self
            .create(&claim.name, &claim.dir, req, &inputs)
            .and_then(|supervisor| supervisor.go());
        let result = claim.finish(result);
        if result.is_err() {
            // Whatever the request leased is free again (a lease of a VM that exists stays).
            if !self.vm_dir(&name).exists() {
                let _ = crate::net::release(self, None, &name);
            }
        }
        result
    }

    fn create(
        &self,
        name: &str,
        dir: &Path,
        req: &RunRequest,
        inputs: &Inputs,
    ) -> Result<crate::host::Supervisor, HostError> {
        let t0 = Instant::now();
        // The supervisor starts now and waits: its start-up overlaps making the disks, and if
        // this process dies from now on, it removes the half-made VM.
        let supervisor = self.spawn_supervisor(dir, name, &crate::supervisor::Start::Boot)?;
        let overlay = dir.join("root.qcow2");
        let home_disk = dir.join("home.ext4");
        let var_disk = dir.join("var.ext4");
        let net = crate::net::resolve(self, name, &req.net)?;
        let client = self.client_key(req.ssh_key.as_deref())?;
        // The VM's identity, on the kernel command line and on its seed disk (which a VM
        // cloned from a snapshot reads again: its kernel's command line is the origin's).
        let identity = identity_args(name, &net);
        let mut extra = vec![format!("systemd.hostname={name}")];
        extra.extend(identity.iter().cloned());
        extra.push(inputs.image_cmdline.clone());
        extra.extend(req.cmdline.clone());
        let cmdline =
            kiln_qemu::default_kernel_cmdline(kiln_qemu::host_tsc_khz(), &extra.join(" "));
        let base = inputs.rootfs.canonicalize().map_err(|e| {
            HostError::io(format!("{}: cannot resolve", inputs.rootfs.display()), e)
        })?;
        let root_size = fs::metadata(&inputs.rootfs)
            .map_err(|e| HostError::io(format!("{}: cannot read", inputs.rootfs.display()), e))?
            .len();
        let disk = |device: &str, mount: &str, path: &Path, format, size| VmDisk {
            device: device.into(),
            mount: mount.into(),
            path: path.to_path_buf(),
            format,
            size,
            read_only: false,
            backing: None,
            serial: None,
        };
        let seed = crate::ssh::make_seed(dir, name, &client, &identity.join(" "))?;
        let seed_size = fs::metadata(&seed)
            .map_err(|e| HostError::io(format!("{}: cannot read", seed.display()), e))?
            .len();
        tracing::debug!("{name}: seed disk made after {:?}", t0.elapsed());
        let spec = VmSpec {
            name: name.to_string(),
            vcpu: req.vcpu,
            ram_mib: req.ram_mib,
            engine: EngineKind::QemuMicrovm,
            accelerator: Accel::detect(),
            boot: Boot::Linux {
                kernel: inputs.kernel.clone(),
                initrd: inputs.initrd.clone(),
                cmdline,
            },
            disks: vec![
                VmDisk {
                    backing: Some(base.clone()),
                    ..disk("/dev/vda", "/", &overlay, Format::Qcow2, root_size)
                },
                disk("/dev/vdb", "/home", &home_disk, Format::Raw, req.home_size),
                disk("/dev/vdc", "/var", &var_disk, Format::Raw, req.var_size),
                VmDisk {
                    read_only: true,
                    serial: Some(kiln_rootfs::SEED_SERIAL.into()),
                    ..disk("/dev/vdd", "", &seed, Format::Raw, seed_size)
                },
            ],
            console: ConsoleSpec::Socket {
                path: dir.join(crate::state::CONSOLE_SOCKET),
                log: Some(dir.join("serial.log")),
                bios: false,
            },
            net,
            dir: dir.to_path_buf(),
            command: Vec::new(),
        }
        .checked()?;
        let mut rec = new_record(spec, inputs.image.clone(), false);
        name_root_disk(&mut rec)?;
        rec.meta.rootfs = Some(inputs.rootfs.clone());
        rec.meta.kernel = Some(inputs.kernel.clone());
        rec.meta.initrd = inputs.initrd.clone();
        rec.meta.overlay = Some(overlay.clone());
        rec.meta.home_disk = Some(home_disk.clone());
        rec.meta.var_disk = Some(var_disk.clone());
        rec.meta.ssh_identity = client.identity.clone();
        let json = record_path(dir);
        rec.save(&json)?;
        tracing::debug!("{name}: vm.json written after {:?}", t0.elapsed());

        kiln_image::create_overlay(&inputs.rootfs, &overlay)?;
        tracing::debug!("{name}: overlay made after {:?}", t0.elapsed());
        let seeded = |disk: &Path, size: u64, seed: &Seed, label: &str| -> Result<(), HostError> {
            match seed {
                Seed::Dir(in_image) => {
                    let seed_tmp = dir.join(format!(".seed-{label}"));
                    let tree = kiln_rootfs::extract_dir(
                        &inputs.rootfs,
                        &in_image.to_string_lossy(),
                        &seed_tmp,
                    )?;
                    kiln_rootfs::make_seeded_disk(disk, size, &Seed::Dir(tree), label)?;
                    fs::remove_dir_all(&seed_tmp).map_err(|e| {
                        HostError::io(format!("{}: cannot remove", seed_tmp.display()), e)
                    })
                }
                image => Ok(kiln_rootfs::make_seeded_disk(disk, size, image, label)?),
            }
        };
        // The two disks are independent: make them side by side (most of kiln's start-up time).
        let (home, var) = std::thread::scope(|scope| {
            let home = scope.spawn(|| seeded(&home_disk, req.home_size, &inputs.home_seed, "home"));
            let var = seeded(&var_disk, req.var_size, &inputs.var_seed, "var");
            let home = home.join().unwrap_or_else(|_| {
                Err(HostError::io(
                    "making the /home disk",
                    std::io::Error::other("thread panicked"),
                ))
            });
            (home, var)
        });
        home?;
        var?;
        tracing::debug!("{name}: /home and /var disks made after {:?}", t0.elapsed());
        Ok(supervisor)
    }
}

/// Gives the record's root disk (`/dev/vda`) the serial that names the VM
/// ([`kiln_rootfs::root_serial`]), by which a clone's guest tells itself from its origin.
pub(crate) fn name_root_disk(rec: &mut crate::VmRecord) -> Result<(), HostError> {
    let mut spec = rec.config.clone();
    if let Some(root) = spec.disks.iter_mut().find(|d| d.device == "/dev/vda") {
        root.serial = Some(kiln_rootfs::root_serial(&rec.meta.id));
    }
    rec.config = spec.checked()?;
    Ok(())
}

/// The `kiln.*` kernel arguments that give a VM its identity (see kiln-rootfs's kiln hook).
pub(crate) fn identity_args(name: &str, net: &crate::NetSpec) -> Vec<String> {
    let mut args = vec![format!("kiln.name={name}")];
    args.extend(net.kernel_args());
    args
}

fn validate(req: &RunRequest) -> Result<Inputs, HostError> {
    if let Some(name) = &req.name {
        crate::validate_name(name)?;
    }
    // vCPUs and memory are checked with the rest of the spec (`VmSpec::validate`), before
    // anything is made.
    for (field, size) in [("home_size", req.home_size), ("var_size", req.var_size)] {
        if !kiln_rootfs::DISK_SIZES.contains(&size) {
            return Err(HostError::invalid(
                field,
                size,
                "must be between 16M and 16384G",
            ));
        }
    }
    let either = "give an image directory, or a rootfs and a kernel";
    let (manifest, rootfs, kernel, initrd) = match &req.image {
        Some(dir) => {
            if req.rootfs.is_some() || req.kernel.is_some() {
                return Err(HostError::invalid(
                    "image",
                    dir.display(),
                    "give either an image directory or a rootfs and a kernel, not both",
                ));
            }
            let m = ImageManifest::load(dir)?;
            let initrd = req.initrd.clone().or_else(|| m.initrd.clone());
            (Some(m.clone()), m.rootfs, m.kernel, initrd)
        }
        None => {
            let rootfs = req
                .rootfs
                .clone()
                .ok_or_else(|| HostError::invalid("rootfs", "(missing)", either))?;
            let kernel = req
                .kernel
                .clone()
                .ok_or_else(|| HostError::invalid("kernel", "(missing)", either))?;
            (None, rootfs, kernel, req.initrd.clone())
        }
    };
    let rootfs = readable_file("root filesystem", &rootfs)?;
    let kernel = readable_file("kernel", &kernel)?;
    let initrd = initrd.map(|i| readable_file("initrd", &i)).transpose()?;
    let seed = |s: Option<&PathBuf>, dir: &str| -> Result<Seed, HostError> {
        match s {
            Some(p) => Ok(Seed::Image(readable_file("seed filesystem", p)?)),
            None => Ok(Seed::Dir(PathBuf::from(dir))),
        }
    };
    Ok(Inputs {
        image: req
            .image
            .as_ref()
            .map(|d| fs::canonicalize(d).unwrap_or_else(|_| d.clone())),
        home_seed: seed(
            manifest.as_ref().and_then(|m| m.home_seed.as_ref()),
            "/home",
        )?,
        var_seed: seed(manifest.as_ref().and_then(|m| m.var_seed.as_ref()), "/var")?,
        image_cmdline: manifest.map(|m| m.cmdline).unwrap_or_default(),
        rootfs,
        kernel,
        initrd,
    })
}

/// Checks that `path` is a readable regular file and returns it absolute.
fn readable_file(what: &'static str, path: &Path) -> Result<PathBuf, HostError> {
    let missing = |why: String| HostError::MissingFile {
        what,
        path: path.to_path_buf(),
        why,
    };
    let meta = fs::metadata(path).map_err(|e| missing(e.to_string()))?;
    if !meta.is_file() {
        return Err(missing("not a regular file".into()));
    }
    fs::File::open(path).map_err(|e| missing(format!("cannot open: {e}")))?;
    fs::canonicalize(path).map_err(|e| missing(e.to_string()))
}
