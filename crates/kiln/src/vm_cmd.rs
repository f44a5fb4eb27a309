//! `kiln vm ...` (and the top-level `kiln ps`, `stop`, `kill`, `logs`, `console`, `rm`, which
//! are the same commands): a thin shell over `kiln_host::Host`, the one registry of VMs.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kiln_host::{ConsoleEnd, DiskRequest, Host, RunRequest, VmEntry, VmKind, VmState};

use crate::{seconds, EngineArg, MediaArg};

/// VM commands.
#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Start a VM in the background: a Linux microVM (--image, or --rootfs and --kernel;
    /// copy-on-write root, own /home and /var disks), a firmware VM (--disk IMAGE, any format
    /// kiln reads), or a clone of a snapshot (--from NAME:TAG). Prints its name and pid.
    Run(Box<RunArgs>),
    /// List VMs (all of them, whatever their engine; `kiln ps` is the same list).
    #[command(visible_alias = "ps")]
    Ls {
        /// Print each VM's vm.json as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Log in to a VM as root over SSH with kiln's key, checking the VM's pinned host key;
    /// waits for sshd first. Runs CMD when given, else an interactive shell. Exits with ssh's
    /// exit code (the command's).
    Ssh {
        name: String,
        /// Seconds to wait for the guest's sshd.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// The command to run (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Print a VM's guest IP address.
    Ip { name: String },
    /// Save a running VM's complete state (vCPUs, devices, memory, and every writable disk at
    /// the same instant) into its directory, then let it run on (or stop it with --stop).
    Snapshot {
        name: String,
        /// The snapshot's name (default: s-YYYYMMDD-HHMMSS).
        #[arg(long)]
        tag: Option<String>,
        /// End the VM once the snapshot is taken.
        #[arg(long)]
        stop: bool,
        /// Print the snapshot's manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped VM from one of its snapshots instead of booting it (its disks go back
    /// to the snapshot's).
    Resume {
        name: String,
        /// The snapshot (default: the newest).
        #[arg(long)]
        tag: Option<String>,
        /// Stay on the serial console (Ctrl-A D detaches; the VM keeps running).
        #[arg(long)]
        attach: bool,
    },
    /// List a VM's snapshots with their size, time and the machine they need.
    Snapshots {
        name: String,
        /// Print the manifests as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Delete one snapshot of a VM.
    RmSnapshot { name: String, tag: String },
    #[command(flatten)]
    Manage(ManageCommand),
}

/// Commands that act on one VM by name, whatever its engine; also top-level commands.
#[derive(clap::Subcommand)]
pub enum ManageCommand {
    /// Print a VM's serial log.
    Logs {
        name: String,
        /// Keep printing until the VM stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Attach to a VM's serial console (on a terminal: Ctrl-A X quits, ending the VM; Ctrl-A D
    /// detaches; with piped input, the input is sent and the output shown until it goes quiet).
    Console {
        name: String,
        /// With piped input: seconds of quiet output to wait for after the input ends.
        #[arg(long, default_value_t = 1.0)]
        linger: f64,
    },
    /// Press the ACPI power button and wait for the guest to power off; kill after the timeout.
    /// Exits with the VM's end code (0 powered off, 2 killed; see the README).
    Stop {
        name: String,
        /// Seconds to wait for the guest before killing it.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// End a VM at once.
    Kill { name: String },
    /// Save a picture of the VM's screen as PNG (firmware VMs: the BIOS text screen or mode
    /// 13h; QEMU through its own screendump).
    Screendump {
        name: String,
        /// The PNG file to write.
        file: std::path::PathBuf,
    },
    /// Delete a stopped VM's files (overlay, disks, logs); never a base image.
    Rm {
        name: String,
        /// Kill the VM first if it runs.
        #[arg(long)]
        force: bool,
    },
}

/// `--net MODE`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum NetArg {
    /// tap as root, else user.
    Auto,
    User,
    Tap,
    None,
}

impl NetArg {
    fn mode(self) -> kiln_host::NetMode {
        match self {
            NetArg::Auto => kiln_host::NetMode::Auto,
            NetArg::User => kiln_host::NetMode::User,
            NetArg::Tap => kiln_host::NetMode::Tap,
            NetArg::None => kiln_host::NetMode::None,
        }
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// A unique name ([a-z0-9][a-z0-9-]{0,63}); generated (like calm-otter) when absent.
    #[arg(long)]
    name: Option<String>,
    /// Virtual CPUs (1 to 16; firmware VMs have 1).
    #[arg(long)]
    vcpu: Option<u32>,
    /// Memory in MiB (Linux: 128 to 32768, default 1024; firmware: default 16 builtin, 128 qemu).
    #[arg(long)]
    ram: Option<u32>,
    /// A firmware disk image to boot (raw, qcow2, vmdk, vhd, vdi; an ISO boots as a CD).
    #[arg(long, conflicts_with_all = ["image", "rootfs", "kernel", "initrd", "net", "publish", "ssh_key", "pool"])]
    disk: Option<PathBuf>,
    /// Firmware VMs: the engine (default: builtin with hardware virtualization, else qemu).
    #[arg(long, value_enum, requires = "disk")]
    engine: Option<EngineArg>,
    /// Firmware VMs: how the guest sees the disk (detected when absent).
    #[arg(long, value_enum, requires = "disk")]
    media: Option<MediaArg>,
    /// Firmware VMs: QEMU machine type, pc or q35 (qemu engine only).
    #[arg(long, requires = "disk")]
    machine: Option<kiln_qemu::Machine>,
    /// Firmware VMs: mirror the BIOS screen onto the serial console (and send keys to int 16h).
    #[arg(long, requires = "disk")]
    bios_console: bool,
    /// Clone a snapshot: a new VM that resumes from snapshot TAG of VM NAME, with its own
    /// copy-on-write disks over the snapshot's, its own name, keys and network.
    #[arg(long, value_name = "NAME:TAG", conflicts_with_all = ["disk", "image", "rootfs", "kernel", "initrd", "cmdline", "vcpu", "ram", "home_size", "var_size"])]
    from: Option<String>,
    /// An image directory (image.json names rootfs, kernel and initrd), e.g. from `kiln image debian`.
    #[arg(long)]
    image: Option<PathBuf>,
    /// A raw ext4 root filesystem (opened read-only; the VM writes to its own overlay).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// The Linux kernel (bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The initrd.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Size of the VM's own /home disk (M or G suffix).
    #[arg(long, default_value = "2G")]
    home_size: String,
    /// Size of the VM's own /var disk (M or G suffix).
    #[arg(long, default_value = "2G")]
    var_size: String,
    /// Extra kernel arguments (appended to kiln's).
    #[arg(long, allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Network: `tap` (root: a TAP device and a /30 of the pool; `kiln net up` for NAT),
    /// `user` (passt, no privileges; SSH published on 127.0.0.1) or `none`. `--net` alone:
    /// tap as root, else user.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "auto", value_name = "MODE")]
    net: Option<NetArg>,
    /// Publish a guest port: [HOST_IP:]HOST_PORT:GUEST_PORT[/udp] (repeatable; host address
    /// default 127.0.0.1). Implies --net.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
    /// The public key root may log in with (default: kiln's own, $KILN_HOME/ssh/id_ed25519).
    #[arg(long, value_name = "FILE.pub")]
    ssh_key: Option<PathBuf>,
    /// TAP mode: the pool of /30s guests get theirs from.
    #[arg(long, value_name = "CIDR", default_value = kiln_net::DEFAULT_POOL)]
    pool: String,
    /// Stay on the serial console (Ctrl-A D detaches; the VM keeps running).
    #[arg(long)]
    attach: bool,
}

pub fn dispatch(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    let host = crate::host()?;
    match cmd {
        VmCommand::Run(args) => run(&host, *args),
        VmCommand::Ls { json } => list(&host, json),
        VmCommand::Ssh {
            name,
            timeout,
            command,
        } => {
            let mut ssh = host.ssh_command(&name, &command, seconds("--timeout", timeout)?)?;
            let status = ssh.status().map_err(|e| {
                anyhow::anyhow!("cannot run ssh: {e} (apt-get install openssh-client)")
            })?;
            Ok(ExitCode::from(
                status.code().unwrap_or(255).clamp(0, 255) as u8
            ))
        }
        VmCommand::Ip { name } => {
            let rec = host.get(&name)?;
            let ip = rec.meta.net.guest_ip.ok_or_else(|| {
                anyhow::anyhow!("VM '{name}' has no network (start it with --net)")
            })?;
            crate::out(format_args!("{ip}"));
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Snapshot {
            name,
            tag,
            stop,
            json,
        } => {
            let m = host.snapshot(&name, tag.as_deref(), stop)?;
            if json {
                crate::out(format_args!("{}", serde_json::to_string_pretty(&m)?));
            } else {
                crate::out(format_args!(
                    "{name}:{} {} stored (guest paused {} ms){}",
                    m.tag,
                    crate::human(m.stored_bytes),
                    m.paused_ms,
                    if stop { "; VM stopped" } else { "" }
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Resume { name, tag, attach } => {
            let rec = host.resume(&name, tag.as_deref())?;
            crate::out(format_args!(
                "{} {} resumed from {}",
                rec.meta.name,
                rec.meta.pid.unwrap_or(0),
                rec.meta.resumed_from.as_deref().unwrap_or("?")
            ));
            if attach {
                return console(&host, &name, 1.0);
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Snapshots { name, json } => snapshots(&host, &name, json),
        VmCommand::RmSnapshot { name, tag } => {
            host.remove_snapshot(&name, &tag)?;
            crate::out(format_args!("{name}:{tag}: removed"));
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Manage(cmd) => manage(&host, cmd),
    }
}

/// `kiln vm snapshots NAME`.
fn snapshots(host: &Host, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let all = host.snapshots(name)?;
    if json {
        let items: Vec<serde_json::Value> = all
            .iter()
            .map(|s| match s {
                Ok(m) => serde_json::to_value(m).unwrap_or_default(),
                Err((tag, error)) => serde_json::json!({ "tag": tag, "error": error }),
            })
            .collect();
        crate::out(format_args!("{}", serde_json::to_string_pretty(&items)?));
        return Ok(ExitCode::SUCCESS);
    }
    crate::out(format_args!(
        "{:<24} {:>10} {:>8} {:<24} {:<12} {:>4} {:>6} DISKS",
        "TAG", "STORED", "PAUSED", "CREATED", "ENGINE", "VCPU", "RAM"
    ));
    for s in all {
        match s {
            Ok(m) => crate::out(format_args!(
                "{:<24} {:>10} {:>8} {:<24} {:<12} {:>4} {:>6} {}",
                m.tag,
                crate::human(m.stored_bytes),
                format!("{}ms", m.paused_ms),
                m.created_at,
                m.config.engine.name(),
                m.config.vcpu,
                format!("{}M", m.config.ram_mib),
                m.config
                    .disks
                    .iter()
                    .map(|(d, size)| format!("{d}={}", crate::human(*size)))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            Err((tag, error)) => crate::out(format_args!("{tag:<24} unreadable: {error}")),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(host: &Host, args: RunArgs) -> anyhow::Result<ExitCode> {
    let rec = match &args.disk {
        None if args.from.is_some() => {
            let from = args.from.as_deref().unwrap_or_default();
            let (vm, tag) = from
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--from {from}: give NAME:TAG"))?;
            host.clone_vm(&kiln_host::CloneRequest {
                name: args.name,
                from: vm.to_string(),
                tag: tag.to_string(),
                net: net_request(args.net, &args.publish, &args.pool)?,
                ssh_key: args.ssh_key,
            })?
        }
        Some(disk) => {
            let (engine, accel) = crate::engine_choice(args.engine, args.machine, None)?;
            host.run_disk(&DiskRequest {
                name: args.name,
                image: disk.clone(),
                vcpu: args.vcpu,
                media: args.media.map(MediaArg::media),
                ram_mib: args.ram,
                engine,
                accel,
                bios_console: args.bios_console,
                console_socket: None,
            })?
        }
        None if matches!(args.net, Some(NetArg::None)) && !args.publish.is_empty() => {
            anyhow::bail!(
                "-p publishes a port of the guest's network, and --net none gives it none"
            )
        }
        None => host.run(&RunRequest {
            home_size: kiln_rootfs::parse_size(&args.home_size)
                .map_err(|e| anyhow::anyhow!("--home-size: {e}"))?,
            var_size: kiln_rootfs::parse_size(&args.var_size)
                .map_err(|e| anyhow::anyhow!("--var-size: {e}"))?,
            name: args.name,
            vcpu: args.vcpu.unwrap_or(kiln_host::DEFAULT_VCPUS),
            ram_mib: args.ram.unwrap_or(kiln_host::DEFAULT_RAM_MIB),
            image: args.image,
            rootfs: args.rootfs,
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            net: net_request(args.net, &args.publish, &args.pool)?,
            ssh_key: args.ssh_key,
        })?,
    };
    crate::out(format_args!(
        "{} {}",
        rec.meta.name,
        rec.meta.pid.unwrap_or(0)
    ));
    if let Some(ssh) = rec.meta.net.ssh {
        eprintln!(
            "kiln: {} network, guest {}; `kiln vm ssh {}` (ssh at {ssh})",
            rec.meta.net.mode,
            rec.meta
                .net
                .guest_ip
                .map(|i| i.to_string())
                .unwrap_or_default(),
            rec.meta.name
        );
    }
    if rec.meta.net.mode == "tap" && host.net_status().is_ok_and(|s| !s.nat.up) {
        eprintln!("kiln: NAT is down: the VM reaches only the host until `kiln net up`");
    }
    if rec.meta.net.stack == Some(kiln_host::UserStack::Slirp) {
        eprintln!("kiln: passt is not installed (apt-get install passt): using QEMU's slirp");
    }
    if args.attach {
        return console(host, &rec.meta.name, 1.0);
    }
    Ok(ExitCode::SUCCESS)
}

/// The network a `vm run` asks for.
fn net_request(
    net: Option<NetArg>,
    publish: &[String],
    pool: &str,
) -> anyhow::Result<kiln_host::NetRequest> {
    Ok(kiln_host::NetRequest {
        mode: net.map(NetArg::mode).unwrap_or_default(),
        ports: publish
            .iter()
            .map(|p| p.parse::<kiln_net::PortForward>())
            .collect::<Result<_, _>>()?,
        pool: Some(
            pool.parse()
                .map_err(|e| anyhow::anyhow!("invalid --pool '{pool}': {e}"))?,
        ),
    })
}

/// `kiln ps` / `kiln vm ls`.
pub fn list(host: &Host, json: bool) -> anyhow::Result<ExitCode> {
    let entries = host.entries()?;
    if json {
        let vms: Vec<serde_json::Value> = entries.iter().map(VmEntry::to_json).collect();
        crate::out(format_args!("{}", serde_json::to_string_pretty(&vms)?));
        return Ok(ExitCode::SUCCESS);
    }
    crate::out(format_args!(
        "{:<24} {:<9} {:<8} {:<12} {:>8} {:>4} {:>6} {:<5} {:<15} {:<24} END",
        "NAME", "STATE", "KIND", "ENGINE", "PID", "VCPU", "RAM", "ACCEL", "IP", "CREATED"
    ));
    for entry in entries {
        let rec = match entry {
            VmEntry::Vm(rec) => rec.effective(),
            VmEntry::Broken(b) => {
                crate::out(format_args!(
                    "{:<24} {:<9} {:<8} {:<12} {:>8} {:>4} {:>6} {:<5} {:<15} {:<24} {}",
                    b.name, "broken", "-", "-", "-", "-", "-", "-", "-", "-", b.reason
                ));
                continue;
            }
        };
        let state = rec.meta.state;
        let pid = match (state, rec.meta.supervisor_pid.or(rec.meta.pid)) {
            (VmState::Running, Some(p)) => p.to_string(),
            _ => "-".into(),
        };
        let end = match state {
            VmState::Stopped | VmState::Failed => rec.meta.exit_reason.clone().unwrap_or_default(),
            _ => String::new(),
        };
        crate::out(format_args!(
            "{:<24} {:<9} {:<8} {:<12} {:>8} {:>4} {:>6} {:<5} {:<15} {:<24} {}",
            rec.meta.name,
            state.name(),
            match rec.meta.kind {
                VmKind::Firmware => "firmware",
                VmKind::Linux => "linux",
            },
            rec.config.engine.name(),
            pid,
            rec.config.vcpu,
            format!("{}M", rec.config.ram_mib),
            rec.config.accelerator.name(),
            rec.meta
                .net
                .guest_ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            rec.meta.created_at,
            end
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The commands on one VM by name.
pub fn manage(host: &Host, cmd: ManageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ManageCommand::Logs { name, follow } => {
            host.write_log(&name, follow, &mut std::io::stdout().lock())?;
        }
        ManageCommand::Console { name, linger } => {
            return console(host, &name, seconds("--linger", linger)?.as_secs_f64());
        }
        ManageCommand::Stop { name, timeout } => {
            let end = host.stop(&name, seconds("--timeout", timeout)?)?;
            crate::out(format_args!("{name}: {end}"));
            return Ok(ExitCode::from(end.exit_code()));
        }
        ManageCommand::Kill { name } => {
            let end = host.kill(&name)?;
            crate::out(format_args!("{name}: {end}"));
        }
        ManageCommand::Screendump { name, file } => {
            host.screendump(&name, &file)?;
            crate::out(format_args!("{name}: screen saved to {}", file.display()));
        }
        ManageCommand::Rm { name, force } => {
            host.remove(&name, force)?;
            crate::out(format_args!("{name}: removed"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn console(host: &Host, name: &str, linger: f64) -> anyhow::Result<ExitCode> {
    let socket = host.console_socket(name)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "kiln: {name}'s serial console; {}\r",
            kiln_host::escape_help(true)
        );
    }
    let end = kiln_host::attach_console(&socket, interactive, Duration::from_secs_f64(linger))
        // It may have stopped since: say so rather than what connecting failed with.
        .map_err(|e| host.console_socket(name).err().unwrap_or(e))?;
    match end {
        ConsoleEnd::VmEnded => {
            let rec = host.wait_stopped(name, Duration::from_secs(3))?;
            let why = rec
                .end()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "ended".into());
            eprintln!("\r\nkiln: {name}: {why}\r");
        }
        ConsoleEnd::Quit => {
            let end = host.quit(name)?;
            eprintln!("\r\nkiln: {name}: {end}\r");
            return Ok(ExitCode::from(end.exit_code()));
        }
        ConsoleEnd::Detached => eprintln!("\r\nkiln: detached from {name}\r"),
        ConsoleEnd::InputDone => {}
    }
    Ok(ExitCode::SUCCESS)
}
