//! The one registry: every VM, whatever its engine or kind, foreground or background, lives in
//! `$KILN_HOME/vms/NAME/` with the same `vm.json`, and every command (`ps`/`ls`, `stop`,
//! `kill`, `logs`, `console`, `rm`) works on any of them by name.

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_image::BootMedia;
use kiln_qemu::Accel;
use kiln_sys::lock::{self, FileLock, LockFile};
use kiln_sys::process::{self, ChildSetup};

use crate::spec::control_socket;
use crate::state::{
    held_lock, record_path, remove_stale_sockets, VmKind, CONSOLE_SOCKET, CREATE_LOCK, LOCK,
    SUPERVISOR_LOCK,
};
use crate::supervisor::{self, Request, Start};
use crate::{
    default_firmware_engine, generate_name, validate_name, Boot, BrokenVm, ConsoleSpec, End,
    EngineKind, HostError, NetSpec, VmDisk, VmEntry, VmMeta, VmRecord, VmSpec, VmState,
};

/// The hidden subcommand a re-executed kiln runs a background VM's supervisor with:
/// `kiln __supervise HOME NAME` (see [`supervise_main`]).
pub const SUPERVISE_COMMAND: &str = "__supervise";

/// What `kiln run IMAGE` and `kiln vm run --disk IMAGE` ask for: a firmware VM booting a disk
/// image of any format kiln reads.
#[derive(Clone, Debug, Default)]
pub struct DiskRequest {
    /// Generated in the style `calm-otter` when `None`.
    pub name: Option<String>,
    pub image: PathBuf,
    /// vCPUs: 1 when `None` (the only count a firmware VM may have today).
    pub vcpu: Option<u32>,
    /// How the guest sees the image; decided by [`kiln_image::boot_media`] when `None`.
    pub media: Option<BootMedia>,
    /// Guest memory; 16 MiB on the builtin VMM, 128 MiB on QEMU when `None`.
    pub ram_mib: Option<u32>,
    /// [`default_firmware_engine`] when `None`.
    pub engine: Option<EngineKind>,
    /// QEMU's accelerator; KVM only with hardware virtualization when `None`.
    pub accel: Option<Accel>,
    /// Mirror the BIOS screen (int 10h) onto the console and send its keys to int 16h too.
    pub bios_console: bool,
    /// In the foreground: serve the console on this socket instead of the terminal.
    pub console_socket: Option<PathBuf>,
}

/// kiln's VMs on this host.
pub struct Host {
    home: PathBuf,
    supervisor: PathBuf,
}

impl Host {
    /// `$KILN_HOME`, else `~/.local/share/kiln`; background VMs are supervised by this
    /// executable (which must answer [`SUPERVISE_COMMAND`]).
    pub fn from_env() -> Result<Host, HostError> {
        let home = match std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h),
            None => {
                let user_home = std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        HostError::invalid("home", "(unset)", "neither KILN_HOME nor HOME is set")
                    })?;
                PathBuf::from(user_home).join(".local/share/kiln")
            }
        };
        Ok(Host::new(home))
    }

    /// A host rooted at `home`, supervising background VMs with this executable.
    pub fn new(home: PathBuf) -> Host {
        Host {
            home,
            supervisor: std::env::current_exe().unwrap_or_else(|_| "kiln".into()),
        }
    }

    /// Supervises background VMs with `exe` (a kiln binary) instead of this executable, for
    /// programs that embed kiln-host (tests, other tools).
    pub fn with_supervisor(mut self, exe: impl Into<PathBuf>) -> Host {
        self.supervisor = exe.into();
        self
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

    /// Claims a name: creates its directory (exactly one of two racing claims wins) and holds
    /// its creation lock. The leftovers of a foreground VM whose `kiln run` died are reclaimed.
    pub(crate) fn claim(&self, wanted: Option<&str>) -> Result<Claim, HostError> {
        if let Some(n) = wanted {
            validate_name(n)?;
        }
        let vms = self.vms_dir();
        fs::create_dir_all(&vms)
            .map_err(|e| HostError::io(format!("{}: cannot create", vms.display()), e))?;
        for _ in 0..1000 {
            let name = match wanted {
                Some(n) => n.to_string(),
                None => generate_name(|n| vms.join(n).exists()),
            };
            let dir = vms.join(&name);
            match fs::create_dir(&dir) {
                Ok(()) => {
                    let lock_path = dir.join(CREATE_LOCK);
                    let lock = FileLock::exclusive(&lock_path)
                        .and_then(|l| l.record_holder().map(|()| l))
                        .map_err(|e| {
                            HostError::io(format!("{}: cannot lock", lock_path.display()), e)
                        })?;
                    return Ok(Claim {
                        name,
                        dir,
                        _lock: lock,
                        keep: false,
                    });
                }
                // A generated name another run took meanwhile: draw again.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && wanted.is_none() => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    match VmEntry::load(&name, &dir) {
                        Some(VmEntry::Vm(rec)) if rec.is_alive() => {
                            return Err(HostError::NameInUse {
                                name,
                                running: true,
                            })
                        }
                        Some(VmEntry::Vm(rec)) if dead_foreground(&rec) => {
                            let _ = fs::remove_dir_all(&dir);
                        }
                        _ => {
                            return Err(HostError::NameInUse {
                                name,
                                running: false,
                            })
                        }
                    }
                }
                Err(e) => {
                    return Err(HostError::io(
                        format!("{}: cannot create", dir.display()),
                        e,
                    ))
                }
            }
        }
        Err(HostError::NameInUse {
            name: wanted.unwrap_or("(generated)").into(),
            running: false,
        })
    }

    /// The launch spec of a firmware VM booting `req.image` in `dir`.
    fn disk_spec(
        &self,
        req: &DiskRequest,
        name: &str,
        dir: &Path,
        background: bool,
    ) -> Result<VmSpec, HostError> {
        // Opening validates the image (and a VMDK's extents) before any engine sees it.
        let image = kiln_image::open(&req.image)?;
        let (format, size) = (image.format(), image.virtual_size());
        drop(image);
        let path = fs::canonicalize(&req.image).map_err(|e| HostError::MissingFile {
            what: "image",
            path: req.image.clone(),
            why: e.to_string(),
        })?;
        let media = req
            .media
            .unwrap_or_else(|| kiln_image::boot_media(format, size));
        let engine = match req.engine {
            Some(e) => e,
            None => {
                let (engine, why) = default_firmware_engine();
                tracing::info!("engine {}: {why}", engine.name());
                engine
            }
        };
        if !engine.boots_firmware() {
            return Err(HostError::invalid(
                "engine",
                engine.name(),
                "cannot boot a disk image (use builtin, qemu-pc or qemu-q35)",
            ));
        }
        let accelerator = match (engine, req.accel) {
            (EngineKind::Builtin, Some(a)) if a != Accel::Kvm => {
                return Err(HostError::invalid(
                    "accel",
                    a.name(),
                    "applies to the qemu engines only (the builtin VMM is KVM)",
                ))
            }
            (EngineKind::Builtin, _) => Accel::Kvm,
            (_, Some(a)) => a,
            (_, None) => Accel::detect(),
        };
        let ram_mib = req.ram_mib.unwrap_or(if engine == EngineKind::Builtin {
            16
        } else {
            128
        });
        let console = if background {
            ConsoleSpec::Socket {
                path: dir.join(CONSOLE_SOCKET),
                log: Some(dir.join("serial.log")),
                bios: req.bios_console,
            }
        } else {
            match &req.console_socket {
                Some(path) => ConsoleSpec::Socket {
                    path: path.clone(),
                    log: None,
                    bios: req.bios_console,
                },
                None => ConsoleSpec::Terminal {
                    bios: req.bios_console,
                },
            }
        };
        let spec = VmSpec {
            name: name.to_string(),
            vcpu: req.vcpu.unwrap_or(1),
            ram_mib,
            engine,
            accelerator,
            boot: Boot::Firmware { media },
            disks: vec![VmDisk {
                serial: None,
                device: match media {
                    BootMedia::Disk => "hd0",
                    BootMedia::Cdrom => "cd0",
                    BootMedia::Floppy => "fd0",
                }
                .into(),
                mount: String::new(),
                path,
                format,
                size,
                read_only: format == kiln_image::Format::Iso,
                backing: None,
            }],
            console,
            net: NetSpec::None,
            dir: dir.to_path_buf(),
            command: Vec::new(),
        };
        spec.checked()
    }

    /// Starts a firmware VM booting `req.image` in the background; returns once it runs.
    pub fn run_disk(&self, req: &DiskRequest) -> Result<VmRecord, HostError> {
        let claim = self.claim(req.name.as_deref())?;
        let result = (|| {
            // The supervisor starts first: from now on, if this process dies, it removes the
            // half-made VM (see [`supervise_main`]).
            let supervisor = self.spawn_supervisor(&claim.dir, &claim.name, &Start::Boot)?;
            let spec = self.disk_spec(req, &claim.name, &claim.dir, true)?;
            let rec = new_record(spec, Some(req.image.clone()), false);
            rec.save(&record_path(&claim.dir))?;
            supervisor.go()
        })();
        claim.finish(result)
    }

    /// Runs a firmware VM in the foreground of this process until it ends (the console on the
    /// terminal, or on `req.console_socket`); `on_start` is told its record once it runs. The
    /// VM is in the registry while it runs, and removed when it ends.
    pub fn run_foreground(
        &self,
        req: &DiskRequest,
        stop_timeout: Duration,
        on_start: &mut dyn FnMut(&VmRecord),
    ) -> Result<End, HostError> {
        let claim = self.claim(req.name.as_deref())?;
        let result = (|| {
            let spec = self.disk_spec(req, &claim.name, &claim.dir, false)?;
            let rec = new_record(spec, Some(req.image.clone()), true);
            rec.save(&record_path(&claim.dir))?;
            let mut ready = |r: Result<&VmRecord, String>| {
                if let Ok(rec) = r {
                    on_start(rec);
                }
                true
            };
            supervisor::run_vm(&claim.dir, stop_timeout, &Start::Boot, &mut ready)
        })();
        // A foreground VM leaves nothing behind, however it ended: dropping the claim removes
        // its directory.
        drop(claim);
        result
    }

    /// Starts the supervisor of the VM recorded in `dir`: a re-executed kiln in a session of
    /// its own, so it outlives this process. It waits for [`Supervisor::go`] before it reads the
    /// record, so its start-up overlaps whatever the caller still prepares (the VM's disks).
    /// It starts the VM as `start` says; resuming an existing VM, it leaves the VM in place if
    /// this process dies before it runs.
    pub(crate) fn spawn_supervisor(
        &self,
        dir: &Path,
        name: &str,
        start: &Start,
    ) -> Result<Supervisor, HostError> {
        let log_path = dir.join("engine.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| HostError::io(format!("{}: cannot open", log_path.display()), e))?;
        let mut command = Command::new(&self.supervisor);
        command
            .arg(SUPERVISE_COMMAND)
            .arg(&self.home)
            .arg(name)
            .args(match start {
                Start::Boot => Vec::new(),
                Start::Resume(tag) => vec![RESUME_FLAG.to_string(), tag.clone()],
                Start::Clone { from, tag } => vec![CLONE_FLAG.to_string(), format!("{from}:{tag}")],
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        process::configure(
            &mut command,
            ChildSetup {
                new_session: true,
                ..ChildSetup::default()
            },
        );
        let child = command.spawn().map_err(|e| HostError::Start {
            name: name.to_string(),
            detail: format!("cannot run {}: {e}", self.supervisor.display()),
        })?;
        Ok(Supervisor {
            child: Some(child),
            dir: dir.to_path_buf(),
            name: name.to_string(),
            log: log_path,
        })
    }

    /// The VM named `name`; a broken one is an error that says so ([`HostError::Broken`]).
    pub fn get(&self, name: &str) -> Result<VmRecord, HostError> {
        match self.entry(name)? {
            VmEntry::Vm(rec) => Ok(*rec),
            VmEntry::Broken(b) => Err(HostError::Broken {
                name: b.name,
                reason: b.reason,
            }),
        }
    }

    /// The registry's entry `name`, broken or not. Sockets its dead supervisor left behind are
    /// removed on the way.
    pub fn entry(&self, name: &str) -> Result<VmEntry, HostError> {
        validate_name(name)?;
        let dir = self.vm_dir(name);
        if fs::symlink_metadata(&dir).is_err() {
            return Err(HostError::NoSuchVm(name.to_string()));
        }
        let entry =
            VmEntry::load(name, &dir).ok_or_else(|| HostError::NoSuchVm(name.to_string()))?;
        tidy(&entry);
        Ok(entry)
    }

    /// Every entry of the registry, sorted by name: the VMs and the broken directories (a
    /// `vm.json` missing, unreadable or invalid). Directories still being claimed and names
    /// that cannot be VM names (kiln makes none) are skipped.
    pub fn entries(&self) -> Result<Vec<VmEntry>, HostError> {
        let vms = self.vms_dir();
        let dir = match fs::read_dir(&vms) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HostError::io(format!("{}: cannot list", vms.display()), e)),
        };
        let mut out = Vec::new();
        for item in dir.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_err() {
                tracing::debug!("{}: not a VM name; skipped", item.path().display());
                continue;
            }
            match VmEntry::load(&name, &item.path()) {
                // A foreground VM is removed when it ends; one whose `kiln run` was killed is
                // removed by the next command that finds it.
                Some(VmEntry::Vm(rec)) if dead_foreground(&rec) => {
                    let _ = fs::remove_dir_all(item.path());
                }
                Some(entry) => {
                    tidy(&entry);
                    out.push(entry);
                }
                None => {}
            }
        }
        out.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(out)
    }

    /// The VMs whose records can be read, sorted by name ([`Host::entries`] also has the
    /// broken ones).
    pub fn list(&self) -> Result<Vec<VmRecord>, HostError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter_map(|e| match e {
                VmEntry::Vm(rec) => Some(*rec),
                VmEntry::Broken(_) => None,
            })
            .collect())
    }

    /// The serial console socket of the running VM `name`.
    pub fn console_socket(&self, name: &str) -> Result<PathBuf, HostError> {
        let rec = self.get(name)?;
        if !rec.is_alive() {
            return Err(HostError::Stopped(name.to_string()));
        }
        rec.meta.console_socket.ok_or_else(|| {
            HostError::invalid(
                "name",
                name,
                "its console is the terminal of its `kiln run`",
            )
        })
    }

    /// Presses the VM's ACPI power button and waits up to `timeout` for the guest to power
    /// off, then kills it. Returns how it ended.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<End, HostError> {
        let rec = self.running(name)?;
        supervisor::request(
            name,
            &rec.meta.control_socket,
            &Request::Stop {
                timeout_s: timeout.as_secs_f64(),
            },
            timeout + Duration::from_secs(30),
        )
    }

    /// Ends the VM at once.
    pub fn kill(&self, name: &str) -> Result<End, HostError> {
        self.end_now(name, Request::Kill)
    }

    /// Saves a PNG picture of the running VM's screen to `path`.
    pub fn screendump(&self, name: &str, path: &Path) -> Result<(), HostError> {
        let rec = self.running(name)?;
        // The supervisor runs elsewhere (its own working directory): give it a full path.
        let path = std::path::absolute(path)
            .map_err(|e| HostError::io(format!("{}: cannot resolve", path.display()), e))?;
        supervisor::screendump(name, &rec.meta.control_socket, &path)
    }

    /// Ends the VM at once because its console's user quit (Ctrl-A X).
    pub fn quit(&self, name: &str) -> Result<End, HostError> {
        self.end_now(name, Request::Quit)
    }

    fn end_now(&self, name: &str, request: Request) -> Result<End, HostError> {
        let rec = self.running(name)?;
        match supervisor::request(
            name,
            &rec.meta.control_socket,
            &request,
            Duration::from_secs(10),
        ) {
            Ok(end) => Ok(end),
            Err(e) => {
                // A supervisor that cannot answer is killed (if it is proven to be the one
                // holding the VM's supervisor lock); its engine dies with it.
                tracing::warn!("{e}; killing its supervisor");
                if let Some(pid) = lock::holder(&rec.config.dir.join(SUPERVISOR_LOCK)) {
                    process::signal(pid, libc::SIGKILL);
                }
                let rec = self.wait_stopped(name, Duration::from_secs(10))?;
                Ok(rec.end().unwrap_or(End::Killed))
            }
        }
    }

    pub(crate) fn running(&self, name: &str) -> Result<VmRecord, HostError> {
        let rec = match self.get(name) {
            Err(HostError::NoSuchVm(_)) => return Err(HostError::NotRunning(name.to_string())),
            other => other?,
        };
        if !rec.is_alive() {
            return Err(HostError::NotRunning(name.to_string()));
        }
        Ok(rec)
    }

    /// Deletes the VM's directory (its overlay, disks, logs; never a base image or a disk it
    /// booted from). Refuses a running (or still creating) VM unless `force`, which kills it
    /// first. A broken VM is removed unless a process still holds its supervisor or creation
    /// lock; `force` then kills that process first, if it can be proven to be the holder (the
    /// lock file names its pid and start time), and refuses otherwise.
    pub fn remove(&self, name: &str, force: bool) -> Result<(), HostError> {
        let dir = self.vm_dir(name);
        let seen = self.entry(name)?;
        self.unused(&dir.join(crate::snapshot::SNAPSHOTS_DIR), "vm", name)?;
        match &seen {
            VmEntry::Vm(rec) => {
                let state = rec.effective_state();
                if !force && state == VmState::Running {
                    return Err(HostError::Running(name.to_string()));
                }
                if !force && state == VmState::Creating {
                    return Err(HostError::Creating(name.to_string()));
                }
                if rec.is_alive() {
                    self.kill(name)?;
                }
            }
            VmEntry::Broken(BrokenVm { reason, .. }) => {
                if let (Some(lock), false) = (held_lock(&dir), force) {
                    return Err(HostError::BrokenHeld {
                        name: name.to_string(),
                        reason: reason.clone(),
                        lock,
                    });
                }
                if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                    return fs::remove_file(&dir).or_else(gone).map_err(|e| {
                        HostError::io(format!("{}: cannot remove", dir.display()), e)
                    });
                }
            }
        }
        if force {
            kill_lock_holders(&dir)?;
        }
        let lock_path = dir.join(LOCK);
        let _lock = match FileLock::exclusive(&lock_path) {
            Ok(l) => l,
            // Removed meanwhile (by the supervisor of a VM whose creator died).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(HostError::io(
                    format!("{}: cannot lock", lock_path.display()),
                    e,
                ))
            }
        };
        // Still the entry looked at? Its lock file may be one of a directory removed meanwhile,
        // and the name taken again by a new VM that must not be removed.
        let same_lock = fs::metadata(&lock_path).ok().map(|m| (m.dev(), m.ino()))
            == _lock.file().metadata().ok().map(|m| (m.dev(), m.ino()));
        if !same_lock {
            return Ok(());
        }
        let same = match (&seen, VmEntry::load(name, &dir)) {
            (VmEntry::Vm(a), Some(VmEntry::Vm(b))) => a.meta.id == b.meta.id,
            (VmEntry::Broken(_), Some(VmEntry::Broken(_))) => true,
            _ => false,
        };
        if !same {
            return Err(HostError::State {
                path: dir,
                why: "changed while it was being removed (see `kiln ps`)".into(),
            });
        }
        fs::remove_dir_all(&dir)
            .or_else(gone)
            .map_err(|e| HostError::io(format!("{}: cannot remove", dir.display()), e))?;
        let rec = match &seen {
            VmEntry::Vm(rec) => Some(&**rec),
            VmEntry::Broken(_) => None,
        };
        crate::net::release(self, rec, name)
    }

    /// Waits until the VM is no longer running (at most `timeout`), returning its record.
    pub fn wait_stopped(&self, name: &str, timeout: Duration) -> Result<VmRecord, HostError> {
        let deadline = Instant::now() + timeout;
        loop {
            let rec = self.get(name)?;
            if !rec.is_alive() || Instant::now() >= deadline {
                return Ok(rec);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes the VM's serial log to `out`; with `follow`, keeps writing what the guest prints
    /// until the VM stops.
    pub fn write_log(
        &self,
        name: &str,
        follow: bool,
        out: &mut dyn Write,
    ) -> Result<(), HostError> {
        let rec = self.get(name)?;
        let Some(path) = rec.meta.log.clone() else {
            return Err(HostError::invalid(
                "name",
                name,
                "this VM's console is its terminal; it keeps no serial log",
            ));
        };
        let mut pos = 0u64;
        loop {
            let running = follow && self.get(name)?.is_alive();
            match fs::File::open(&path) {
                Ok(mut f) => {
                    f.seek(SeekFrom::Start(pos)).map_err(|e| {
                        HostError::io(format!("{}: cannot read", path.display()), e)
                    })?;
                    let mut chunk = Vec::new();
                    f.read_to_end(&mut chunk).map_err(|e| {
                        HostError::io(format!("{}: cannot read", path.display()), e)
                    })?;
                    pos += chunk.len() as u64;
                    if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                        return Ok(()); // the reader went away (a closed pipe)
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HostError::io(format!("{}: cannot read", path.display()), e)),
            }
            if !running {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A background VM's supervisor that has started but waits for the word to run the VM.
/// Dropped without [`Supervisor::go`], it exits without doing anything.
pub(crate) struct Supervisor {
    child: Option<std::process::Child>,
    dir: PathBuf,
    name: String,
    log: PathBuf,
}

impl Supervisor {
    /// Lets the supervisor run the VM; returns once the VM runs (or failed to start).
    pub(crate) fn go(mut self) -> Result<VmRecord, HostError> {
        let Some(mut child) = self.child.take() else {
            return Err(HostError::Start {
                name: self.name.clone(),
                detail: "its supervisor is gone".into(),
            });
        };
        let mut stdin = child.stdin.take();
        if let Some(stdin) = &mut stdin {
            let _ = stdin.write_all(GO);
        }
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out.take(4096)).read_line(&mut line);
        }
        // The supervisor is our child until we exit: reap it whenever it ends.
        std::thread::spawn(move || child.wait());
        let line = line.trim();
        match line.strip_prefix("ok ") {
            Some(_) => {
                let rec = VmRecord::load(&record_path(&self.dir))?;
                // Heard: the VM is this process's to report now. Without the word (this
                // process died, or the record is unreadable) the supervisor ends the VM.
                if let Some(stdin) = &mut stdin {
                    let _ = stdin.write_all(ACK);
                }
                Ok(rec)
            }
            None => Err(HostError::Start {
                name: self.name.clone(),
                detail: match line.strip_prefix("err ") {
                    Some(why) => why.to_string(),
                    None => format!("its supervisor died (see {})", self.log.display()),
                },
            }),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // "no" tells it not to run anything: this process cleans up itself. It exits at
            // once. (Its stdin closing without a word would mean this process died.)
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(NO);
            }
            let _ = child.wait();
        }
    }
}

/// The flag of [`SUPERVISE_COMMAND`] that resumes the VM from a snapshot: `--resume TAG`.
pub const RESUME_FLAG: &str = "--resume";
/// The flag of [`SUPERVISE_COMMAND`] that starts a new clone: `--clone VM:TAG`.
pub const CLONE_FLAG: &str = "--clone";

/// The word that lets a waiting supervisor run its VM.
const GO: &[u8] = b"go\n";
/// The word that tells a waiting supervisor its creator gave up (and cleans up itself).
const NO: &[u8] = b"no\n";
/// The creator's answer to "ok": it heard that the VM runs, and reports it.
const ACK: &[u8] = b"ack\n";

/// Treats "already gone" as done.
fn gone(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Removes the sockets of an entry whose supervisor is gone (see [`remove_stale_sockets`]).
fn tidy(entry: &VmEntry) {
    if let VmEntry::Vm(rec) = entry {
        if matches!(rec.effective_state(), VmState::Stopped | VmState::Failed) {
            remove_stale_sockets(&rec.config.dir);
            // A supervisor that died without recording the end left its network's rules.
            if rec.meta.state != VmState::Stopped {
                crate::net::tidy(&rec.config.net);
            }
        }
    }
}

/// Kills the processes holding `dir`'s supervisor and creation locks, each only if it is
/// proven to be the holder, and waits for the locks to be free. A lock held by a process that
/// cannot be proven is an error: nothing is signalled, and the directory stays.
fn kill_lock_holders(dir: &Path) -> Result<(), HostError> {
    for name in [SUPERVISOR_LOCK, CREATE_LOCK] {
        let path = dir.join(name);
        if !lock::is_locked(&path) {
            continue;
        }
        let Some(pid) = lock::holder(&path) else {
            return Err(HostError::State {
                path,
                why: "held by a process kiln cannot identify (the file names no live holder of it); end that process, then remove the VM".into(),
            });
        };
        tracing::info!("{}: killing its holder, pid {pid}", path.display());
        process::signal(pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock::is_locked(&path) {
            if Instant::now() >= deadline {
                return Err(HostError::State {
                    path,
                    why: format!("still held 10 s after its holder (pid {pid}) was killed"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// A claimed name: its directory is removed on drop unless the VM was created.
pub(crate) struct Claim {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    _lock: FileLock,
    keep: bool,
}

impl Claim {
    /// Keeps the directory when `result` is a VM that runs; removes it otherwise.
    pub(crate) fn finish<T>(mut self, result: Result<T, HostError>) -> Result<T, HostError> {
        self.keep = result.is_ok();
        result
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A new record in state `creating` for `spec`.
/// Whether `rec` is a foreground VM whose `kiln run` is gone without removing it.
fn dead_foreground(rec: &VmRecord) -> bool {
    rec.meta.foreground && matches!(rec.effective_state(), VmState::Stopped | VmState::Failed)
}

pub(crate) fn new_record(spec: VmSpec, image: Option<PathBuf>, foreground: bool) -> VmRecord {
    let kind = match spec.boot {
        Boot::Firmware { .. } => VmKind::Firmware,
        Boot::Linux { .. } => VmKind::Linux,
    };
    VmRecord {
        meta: VmMeta {
            id: random_id(),
            name: spec.name.clone(),
            kind,
            foreground,
            pid: None,
            pid_start: None,
            supervisor_pid: None,
            created_at: kiln_sys::now_rfc3339(),
            started_at: None,
            stopped_at: None,
            net: crate::NetMeta::of(&spec.net),
            ssh_identity: None,
            control_socket: control_socket(&spec.dir),
            console_socket: spec.console_socket().map(Path::to_path_buf),
            log: match &spec.console {
                ConsoleSpec::Socket { log, .. } => log.clone(),
                ConsoleSpec::Terminal { .. } => None,
            },
            image: image.map(|i| fs::canonicalize(&i).unwrap_or(i)),
            rootfs: None,
            kernel: None,
            initrd: None,
            overlay: None,
            home_disk: None,
            var_disk: None,
            state: VmState::Creating,
            resumed_from: None,
            end: None,
            exit_reason: None,
        },
        config: spec,
    }
}

/// The body of `kiln __supervise HOME NAME`: runs the VM recorded there to its end, telling
/// the process that started it "ok PID" or "err WHY" on stdout. Returns the exit code.
///
/// It is started while its creator still makes the VM, and waits for the word: "go" runs the
/// VM, "no" means the creator gave up (and removes the VM itself). A creator that died
/// instead (Ctrl-C, kill -9) closes the pipe without a word, or is gone when the VM runs and
/// "ok" cannot be told to it: the supervisor then ends the VM and removes what was created, so
/// a failed `kiln vm run` leaves no name behind.
///
/// Resuming a stopped VM ([`Start::Resume`]), nothing is created: a creator that gave up or
/// died leaves the VM as it was.
pub fn supervise_main(home: &Path, name: &str, start: &Start) -> u8 {
    // Descriptors inherited from whoever ran `kiln vm run` (a shell's pipes) must not reach
    // the engine, which would keep them open for the VM's lifetime.
    process::cloexec_from(3);
    if validate_name(name).is_err() {
        println!("err invalid VM name");
        return 1;
    }
    let dir = home.join("vms").join(name);
    // The creation lock of this very creation (a VM made later under the name has another).
    let creation = match start {
        Start::Resume(_) => None,
        Start::Boot | Start::Clone { .. } => LockFile::open(&dir.join(CREATE_LOCK)).ok(),
    };
    // Wait for the word: the VM's creator may still be making its disks.
    let mut word = String::new();
    let _ = std::io::stdin().read_line(&mut word);
    match word.trim() {
        "go" => {}
        "no" => return 1,
        _ => {
            remove_abandoned(&dir, creation);
            return 1;
        }
    }
    let creator_gone = std::cell::Cell::new(false);
    let mut ready = |r: Result<&VmRecord, String>| {
        let started = r.is_ok();
        let mut out = std::io::stdout().lock();
        let told = match r {
            Ok(rec) => writeln!(out, "ok {}", rec.meta.pid.unwrap_or(0)),
            Err(why) => writeln!(out, "err {}", why.replace('\n', " ")),
        }
        .and_then(|()| out.flush())
        .is_ok();
        drop(out);
        // A write fails (EPIPE) only once the reading end is closed: the creator died. A
        // creator told that the VM runs acknowledges it; one that dies first never does.
        let heard = told && (!started || heard_ack());
        if !heard {
            creator_gone.set(true);
        }
        heard
    };
    let result = supervisor::run_vm(&dir, supervisor::DEFAULT_STOP_TIMEOUT, start, &mut ready);
    if creator_gone.get() {
        remove_abandoned(&dir, creation);
    }
    match result {
        Ok(end) => {
            tracing::info!("{name}: {end}");
            end.exit_code()
        }
        Err(e) => {
            tracing::error!("{name}: {e}");
            1
        }
    }
}

/// True when the creator answers "ack" on stdin (see [`Supervisor::go`]).
fn heard_ack() -> bool {
    let mut word = String::new();
    std::io::stdin().read_line(&mut word).is_ok() && word.trim() == "ack"
}

/// Removes the directory of a VM whose creator died while creating it, once the creator's
/// lock is free, and only if `dir` is still that creation (its creation lock is the very file
/// `creation` opened) and no supervisor runs it.
fn remove_abandoned(dir: &Path, creation: Option<LockFile>) {
    let Some(creation) = creation else {
        return;
    };
    // Free at once when the creator died; a live creator cleans up itself.
    if !creation.wait_free(Duration::from_secs(10)) {
        return;
    }
    // Under the record's lock, as `kiln vm rm`: a directory gone meanwhile stays gone.
    let Ok(_lock) = FileLock::exclusive(&dir.join(LOCK)) else {
        return;
    };
    if !creation.is_at(&dir.join(CREATE_LOCK)) || lock::is_locked(&dir.join(SUPERVISOR_LOCK)) {
        return;
    }
    tracing::info!(
        "{}: its creator died while creating it; removed",
        dir.display()
    );
    let _ = fs::remove_dir_all(dir);
}

pub(crate) fn random_id() -> String {
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
