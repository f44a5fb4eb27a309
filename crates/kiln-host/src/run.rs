//! The VM lifecycle: run (claim, storage, supervised start), list, stop, kill, remove.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::engine::{Engine, LaunchDisk, LaunchSpec, QemuMicrovm};
use crate::lock::FileLock;
use crate::state::{now_rfc3339, VmConfig, VmDisk, VmMeta, VmRecord, VmState};
use crate::storage::{self, Seed};
use crate::{generate_name, proc, validate_name, HostError, ImageManifest, DEFAULT_DISK_SIZE};

/// Default vCPUs of a VM.
pub const DEFAULT_VCPUS: u32 = 2;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 16;
/// Default memory of a VM in MiB.
pub const DEFAULT_RAM_MIB: u32 = 1024;
/// Most memory a VM may have in MiB.
pub const MAX_RAM_MIB: u32 = 32768;
/// Least memory a VM may have: a Debian kernel and systemd need about this much.
const MIN_RAM_MIB: u32 = 128;

const VM_JSON: &str = "vm.json";
const LOCK: &str = "lock";

/// What `kiln vm run` asks for.
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
    /// User-mode networking with SSH forwarded from a free port on 127.0.0.1.
    pub net: bool,
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
            net: false,
        }
    }
}

/// What [`Host::stop`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReport {
    /// The guest answered the power button and powered off.
    PoweredOff { after: Duration },
    /// The VM ended another way while we waited (`reason` from the engine).
    Ended { reason: String, after: Duration },
    /// The guest ignored the power button for the whole timeout and was killed.
    Killed { timeout: Duration },
}

impl StopReport {
    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            StopReport::PoweredOff { after } => {
                format!(
                    "guest powered off (ACPI power button) after {:.1} s",
                    after.as_secs_f64()
                )
            }
            StopReport::Ended { reason, after } => {
                format!("VM ended ({reason}) after {:.1} s", after.as_secs_f64())
            }
            StopReport::Killed { timeout } => format!(
                "guest did not power off within {} s of the power button; killed",
                timeout.as_secs_f64()
            ),
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

/// kiln's VMs on this host: the state directory and the engine.
pub struct Host {
    home: PathBuf,
    engine: Box<dyn Engine>,
}

impl Host {
    /// `$KILN_HOME`, else `~/.local/share/kiln`, with the QEMU microvm engine.
    pub fn from_env() -> Result<Host, HostError> {
        let home = match std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h),
            None => {
                let user_home = std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| HostError::InvalidValue {
                        what: "environment",
                        value: "HOME".into(),
                        why: "neither KILN_HOME nor HOME is set".into(),
                    })?;
                PathBuf::from(user_home).join(".local/share/kiln")
            }
        };
        Ok(Host::new(home, Box::new(QemuMicrovm::default())))
    }

    /// A host rooted at `home` running VMs with `engine`.
    pub fn new(home: PathBuf, engine: Box<dyn Engine>) -> Host {
        Host { home, engine }
    }

    /// The state directory (`$KILN_HOME`).
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `$KILN_HOME/vms`.
    pub fn vms_dir(&self) -> PathBuf {
        self.home.join("vms")
    }

    /// `$KILN_HOME/vms/NAME`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    /// The engine VMs run on.
    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    /// Validates `req`, claims the name, prepares the copy-on-write root and the VM's disks and
    /// starts the VM in the background under a supervisor. Returns once the VM runs. On any
    /// error nothing is left under `vms/` (except a VM that already had the name).
    pub fn run(&self, req: &RunRequest) -> Result<VmRecord, HostError> {
        let inputs = self.validate(req)?;
        let vms = self.vms_dir();
        fs::create_dir_all(&vms)
            .map_err(|e| HostError::io(format!("{}: cannot create", vms.display()), e))?;
        let (name, dir) = loop {
            let name = match &req.name {
                Some(n) => n.clone(),
                None => generate_name(|n| vms.join(n).exists()),
            };
            let dir = vms.join(&name);
            // mkdir is atomic: of two runs with one name, exactly one creates the directory.
            match fs::create_dir(&dir) {
                Ok(()) => break (name, dir),
                // A generated name another run took meanwhile: draw again.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && req.name.is_none() => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(HostError::NameInUse(name))
                }
                Err(e) => {
                    return Err(HostError::io(
                        format!("{}: cannot create", dir.display()),
                        e,
                    ))
                }
            }
        };
        match self.create_and_start(&name, &dir, req, &inputs) {
            Ok(rec) => Ok(rec),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn validate(&self, req: &RunRequest) -> Result<Inputs, HostError> {
        if let Some(name) = &req.name {
            validate_name(name)?;
        }
        if !(1..=MAX_VCPUS).contains(&req.vcpu) {
            return Err(HostError::InvalidValue {
                what: "--vcpu",
                value: req.vcpu.to_string(),
                why: format!("must be between 1 and {MAX_VCPUS}"),
            });
        }
        if !(MIN_RAM_MIB..=MAX_RAM_MIB).contains(&req.ram_mib) {
            return Err(HostError::InvalidValue {
                what: "--ram",
                value: req.ram_mib.to_string(),
                why: format!("must be between {MIN_RAM_MIB} and {MAX_RAM_MIB} MiB"),
            });
        }
        for (what, size) in [("--home-size", req.home_size), ("--var-size", req.var_size)] {
            if !(16 << 20..=16 << 40).contains(&size) {
                return Err(HostError::InvalidValue {
                    what,
                    value: size.to_string(),
                    why: "must be between 16M and 16384G".into(),
                });
            }
        }
        let (manifest, rootfs, kernel, initrd) = match &req.image {
            Some(dir) => {
                if req.rootfs.is_some() || req.kernel.is_some() {
                    return Err(HostError::InvalidValue {
                        what: "--image",
                        value: dir.display().to_string(),
                        why: "give either --image or --rootfs/--kernel, not both".into(),
                    });
                }
                let m = ImageManifest::load(dir)?;
                let initrd = req.initrd.clone().or_else(|| m.initrd.clone());
                (Some(m.clone()), m.rootfs, m.kernel, initrd)
            }
            None => {
                let rootfs = req.rootfs.clone().ok_or_else(|| HostError::InvalidValue {
                    what: "--rootfs",
                    value: "(missing)".into(),
                    why: "give --image DIR, or --rootfs PATH and --kernel PATH".into(),
                })?;
                let kernel = req.kernel.clone().ok_or_else(|| HostError::InvalidValue {
                    what: "--kernel",
                    value: "(missing)".into(),
                    why: "give --image DIR, or --rootfs PATH and --kernel PATH".into(),
                })?;
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

    fn create_and_start(
        &self,
        name: &str,
        dir: &Path,
        req: &RunRequest,
        inputs: &Inputs,
    ) -> Result<VmRecord, HostError> {
        let t0 = Instant::now();
        let lock = FileLock::acquire(&dir.join(LOCK))?;
        let overlay = dir.join("root.qcow2");
        let home_disk = dir.join("home.ext4");
        let var_disk = dir.join("var.ext4");
        let ssh_port = if req.net { Some(free_port()?) } else { None };
        let mut extra = vec![
            format!("systemd.hostname={name}"),
            format!("kiln.name={name}"),
        ];
        if req.net {
            extra.push("kiln.ip=10.0.2.15/24,10.0.2.2".into());
            extra.push("kiln.dns=10.0.2.3".into());
        } else {
            let dns = host_nameservers();
            if !dns.is_empty() {
                extra.push(format!("kiln.dns={}", dns.join(",")));
            }
        }
        extra.push(inputs.image_cmdline.clone());
        extra.extend(req.cmdline.clone());
        let cmdline =
            kiln_qemu::default_kernel_cmdline(kiln_qemu::host_tsc_khz(), &extra.join(" "));
        let spec = LaunchSpec {
            name: name.to_string(),
            vcpus: req.vcpu,
            ram_mib: req.ram_mib,
            kernel: inputs.kernel.clone(),
            initrd: inputs.initrd.clone(),
            cmdline: cmdline.clone(),
            disks: vec![
                LaunchDisk {
                    path: overlay.clone(),
                    qcow2: true,
                },
                LaunchDisk {
                    path: home_disk.clone(),
                    qcow2: false,
                },
                LaunchDisk {
                    path: var_disk.clone(),
                    qcow2: false,
                },
            ],
            console_socket: dir.join("console.sock"),
            serial_log: dir.join("serial.log"),
            control_socket: dir.join("qmp.sock"),
            supervisor_socket: dir.join("supervisor.sock"),
            engine_log: dir.join("engine.log"),
            ssh_port,
        };
        let mut rec = VmRecord {
            meta: VmMeta {
                id: random_id(),
                name: name.to_string(),
                pid: None,
                pid_start: None,
                supervisor_pid: None,
                created_at: now_rfc3339(),
                started_at: None,
                stopped_at: None,
                guest_ip: req.net.then(|| "10.0.2.15".to_string()),
                net: if req.net { "user" } else { "none" }.into(),
                ssh_port,
                control_socket: spec.control_socket.clone(),
                console_socket: spec.console_socket.clone(),
                log: spec.serial_log.clone(),
                image: inputs.image.clone(),
                rootfs: inputs.rootfs.clone(),
                kernel: inputs.kernel.clone(),
                initrd: inputs.initrd.clone(),
                overlay: overlay.clone(),
                home_disk: home_disk.clone(),
                var_disk: var_disk.clone(),
                state: VmState::Creating,
                exit_reason: None,
            },
            config: VmConfig {
                vcpu: req.vcpu,
                ram_mib: req.ram_mib,
                disks: Vec::new(),
                kernel: inputs.kernel.clone(),
                initrd: inputs.initrd.clone(),
                cmdline,
                engine: self.engine.name().into(),
                accelerator: self.engine.accelerator().into(),
                command: self.engine.command_line(&spec),
            },
        };
        let json = dir.join(VM_JSON);
        rec.save(&json)?;

        tracing::debug!("{name}: vm.json written after {:?}", t0.elapsed());
        let root_size = crate::create_overlay(&inputs.rootfs, &overlay)?;
        tracing::debug!("{name}: overlay made after {:?}", t0.elapsed());
        let seeded = |disk: &Path, size: u64, seed: &Seed, label: &str| match seed {
            Seed::Dir(in_image) => {
                let seed_tmp = dir.join(format!(".seed-{label}"));
                let tree =
                    storage::extract_dir(&inputs.rootfs, &in_image.to_string_lossy(), &seed_tmp)?;
                storage::make_seeded_disk(disk, size, &Seed::Dir(tree), label)?;
                fs::remove_dir_all(&seed_tmp)
                    .map_err(|e| HostError::io(format!("{}: cannot remove", seed_tmp.display()), e))
            }
            image => storage::make_seeded_disk(disk, size, image, label),
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
        rec.config.disks = vec![
            disk("/dev/vda", "/", &overlay, "qcow2", root_size),
            disk("/dev/vdb", "/home", &home_disk, "raw", req.home_size),
            disk("/dev/vdc", "/var", &var_disk, "raw", req.var_size),
        ];
        rec.save(&json)?;
        // The supervisor inherits open file descriptions: release the lock before forking.
        drop(lock);
        self.spawn_supervised(&spec, &json)?;
        tracing::debug!("{name}: running after {:?}", t0.elapsed());
        VmRecord::load(&json)
    }

    /// Forks a supervisor (detached: new session, reparented to init) that starts the engine,
    /// records `running`, and later records how the VM ended. Returns once the VM runs.
    fn spawn_supervised(&self, spec: &LaunchSpec, json: &Path) -> Result<(), HostError> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(HostError::io(
                "cannot create a pipe",
                std::io::Error::last_os_error(),
            ));
        }
        let (rfd, wfd) = (fds[0], fds[1]);
        // SAFETY: fork; the child only runs `supervise` and then _exit, never returning.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            unsafe {
                libc::close(rfd);
                libc::close(wfd);
            }
            return Err(HostError::io("cannot fork the supervisor", e));
        }
        if pid == 0 {
            // SAFETY: in the child: a second fork detaches the supervisor so it is nobody's
            // zombie; the intermediate child exits at once.
            unsafe {
                libc::close(rfd);
                libc::setsid();
                if libc::fork() != 0 {
                    libc::_exit(0);
                }
            }
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                supervise(self.engine.as_ref(), spec, json, wfd)
            }))
            .unwrap_or(101);
            unsafe { libc::_exit(code) };
        }
        unsafe {
            libc::close(wfd);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        // SAFETY: rfd is ours; File closes it.
        let mut reader = unsafe { fs::File::from_raw_fd(rfd) };
        let mut msg = String::new();
        let _ = reader.read_to_string(&mut msg);
        match msg.trim().strip_prefix("ok") {
            Some(_) => Ok(()),
            None => Err(HostError::Start {
                name: spec.name.clone(),
                detail: msg
                    .trim()
                    .strip_prefix("err ")
                    .unwrap_or("the supervisor died")
                    .to_string(),
            }),
        }
    }

    /// The VM named `name`.
    pub fn get(&self, name: &str) -> Result<VmRecord, HostError> {
        validate_name(name)?;
        let json = self.vm_dir(name).join(VM_JSON);
        if !json.exists() {
            return Err(HostError::NoSuchVm(name.to_string()));
        }
        VmRecord::load(&json)
    }

    /// All VMs, sorted by name. Directories still being created are skipped.
    pub fn list(&self) -> Result<Vec<VmRecord>, HostError> {
        let vms = self.vms_dir();
        let entries = match fs::read_dir(&vms) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HostError::io(format!("{}: cannot list", vms.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let json = entry.path().join(VM_JSON);
            if json.exists() {
                if let Ok(rec) = VmRecord::load(&json) {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        Ok(out)
    }

    /// Presses the ACPI power button and waits up to `timeout` for the guest to power off; then
    /// kills the VM. Says which happened.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<StopReport, HostError> {
        let rec = self.get(name)?;
        let pid = match rec.meta.pid {
            Some(pid) if rec.is_alive() => pid,
            _ => return Err(HostError::NotRunning(name.to_string())),
        };
        let t0 = Instant::now();
        let watch = self.engine.power_button(&rec.meta.control_socket)?;
        let deadline = t0 + timeout;
        while proc::alive(pid, rec.meta.pid_start) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let report = if proc::alive(pid, rec.meta.pid_start) {
            proc::signal(pid, libc::SIGKILL);
            self.wait_dead(pid, rec.meta.pid_start, Duration::from_secs(10));
            StopReport::Killed { timeout }
        } else {
            let after = t0.elapsed();
            // The QMP connection may deliver SHUTDOWN just after the process is gone.
            let settle = Instant::now() + Duration::from_millis(300);
            let mut ev = watch.shutdown();
            while ev.is_none() && Instant::now() < settle {
                thread::sleep(Duration::from_millis(10));
                ev = watch.shutdown();
            }
            match ev {
                Some((true, reason)) if reason == "guest-shutdown" => {
                    StopReport::PoweredOff { after }
                }
                Some((_, reason)) => StopReport::Ended { reason, after },
                None => StopReport::Ended {
                    reason: "exited".into(),
                    after,
                },
            }
        };
        self.await_record(name, &report)?;
        Ok(report)
    }

    /// Kills the VM at once (SIGKILL).
    pub fn kill(&self, name: &str) -> Result<VmRecord, HostError> {
        let rec = self.get(name)?;
        let pid = match rec.meta.pid {
            Some(pid) if rec.is_alive() => pid,
            _ => return Err(HostError::NotRunning(name.to_string())),
        };
        proc::signal(pid, libc::SIGKILL);
        self.wait_dead(pid, rec.meta.pid_start, Duration::from_secs(10));
        self.await_record(
            name,
            &StopReport::Killed {
                timeout: Duration::ZERO,
            },
        )
    }

    /// Deletes the VM's directory (its overlay, disks, logs; never the base image). Refuses a
    /// running VM unless `force`, which kills it first.
    pub fn remove(&self, name: &str, force: bool) -> Result<(), HostError> {
        let rec = self.get(name)?;
        if rec.is_alive() {
            if !force {
                return Err(HostError::Running(name.to_string()));
            }
            self.kill(name)?;
        }
        let dir = self.vm_dir(name);
        let _lock = FileLock::acquire(&dir.join(LOCK))?;
        fs::remove_dir_all(&dir)
            .map_err(|e| HostError::io(format!("{}: cannot remove", dir.display()), e))
    }

    /// Waits until the VM is no longer running (at most `timeout`), returning its record.
    pub fn wait_stopped(&self, name: &str, timeout: Duration) -> Result<VmRecord, HostError> {
        let deadline = Instant::now() + timeout;
        loop {
            let rec = self.get(name)?;
            if rec.effective_state() == VmState::Stopped || Instant::now() >= deadline {
                return Ok(rec);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_dead(&self, pid: u32, start: Option<u64>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while proc::alive(pid, start) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Gives the supervisor a moment to record the end; records it here if it did not.
    fn await_record(&self, name: &str, report: &StopReport) -> Result<VmRecord, HostError> {
        let json = self.vm_dir(name).join(VM_JSON);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let rec = VmRecord::load(&json)?;
            if rec.meta.state == VmState::Stopped {
                return Ok(rec);
            }
            if Instant::now() >= deadline {
                let _lock = FileLock::acquire(&self.vm_dir(name).join(LOCK))?;
                let mut rec = VmRecord::load(&json)?;
                rec.meta.state = VmState::Stopped;
                rec.meta.stopped_at = Some(now_rfc3339());
                rec.meta.exit_reason = Some(report.describe());
                rec.save(&json)?;
                return Ok(rec);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The supervisor's body (in the forked, detached process). Returns its exit code.
fn supervise(engine: &dyn Engine, spec: &LaunchSpec, json: &Path, wfd: i32) -> i32 {
    // SAFETY: wfd is the pipe's write end, ours alone in this process.
    let mut report = unsafe { fs::File::from_raw_fd(wfd) };
    redirect_stdio(&spec.engine_log);
    // Descriptors inherited from kiln's caller (a shell's pipes) must not reach QEMU: it would
    // keep them open for the VM's lifetime. CLOSE_RANGE_CLOEXEC (4) marks them all close-on-exec.
    // SAFETY: close_range only changes descriptor flags.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) };
    let lock_path = json.with_file_name(LOCK);
    let started = match engine.start(spec) {
        Ok(s) => s,
        Err(e) => {
            let _ = write!(report, "err {e}");
            return 1;
        }
    };
    let pid = started.pid();
    tracing::debug!("{}: supervisor: engine started", spec.name);
    let recorded = (|| -> Result<(), HostError> {
        let _lock = FileLock::acquire(&lock_path)?;
        let mut rec = VmRecord::load(json)?;
        rec.meta.pid = Some(pid);
        rec.meta.pid_start = proc::start_time(pid);
        rec.meta.supervisor_pid = Some(std::process::id());
        rec.meta.started_at = Some(now_rfc3339());
        rec.meta.state = VmState::Running;
        rec.save(json)
    })();
    if let Err(e) = recorded {
        proc::signal(pid, libc::SIGKILL);
        let _ = write!(report, "err {e}");
        return 1;
    }
    let _ = write!(report, "ok {pid}");
    drop(report);
    let end = started.wait();
    let recorded = (|| -> Result<(), HostError> {
        let _lock = FileLock::acquire(&lock_path)?;
        let mut rec = VmRecord::load(json)?;
        rec.meta.state = VmState::Stopped;
        rec.meta.stopped_at = Some(now_rfc3339());
        rec.meta.exit_reason = Some(end.description.clone());
        rec.save(json)
    })();
    for s in [
        &spec.control_socket,
        &spec.supervisor_socket,
        &spec.console_socket,
    ] {
        let _ = fs::remove_file(s);
    }
    i32::from(recorded.is_err())
}

fn redirect_stdio(log: &Path) {
    use std::os::unix::io::AsRawFd;
    let null = fs::File::open("/dev/null");
    let out = fs::OpenOptions::new().create(true).append(true).open(log);
    // SAFETY: dup2 onto the standard descriptors of this (supervisor) process.
    unsafe {
        if let Ok(n) = &null {
            libc::dup2(n.as_raw_fd(), 0);
        }
        if let Ok(o) = &out {
            libc::dup2(o.as_raw_fd(), 1);
            libc::dup2(o.as_raw_fd(), 2);
        }
    }
}

fn disk(device: &str, mount: &str, path: &Path, format: &str, size: u64) -> VmDisk {
    VmDisk {
        device: device.into(),
        mount: mount.into(),
        path: path.to_path_buf(),
        format: format.into(),
        size,
        read_only: false,
    }
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

fn random_id() -> String {
    let mut buf = [0u8; 16];
    let ok = fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        buf = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A free TCP port on 127.0.0.1 (the kernel picks it).
fn free_port() -> Result<u16, HostError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HostError::io("cannot find a free port on 127.0.0.1", e))
}

/// The host's nameservers (at most 3, IPv4/IPv6 literals) from /etc/resolv.conf.
fn host_nameservers() -> Vec<String> {
    fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .take(3)
        .map(String::from)
        .collect()
}
