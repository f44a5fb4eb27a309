//! `kiln vm ...`: Linux microVMs (see kiln-host). A thin shell over `kiln_host::Host`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kiln_host::{Host, RunRequest, StopReport, VmState};

/// Linux microVM commands.
#[derive(clap::Subcommand)]
pub enum VmCommand {
    /// Start a Linux microVM in the background (copy-on-write root, own /home and /var disks);
    /// prints its name and pid.
    Run(RunArgs),
    /// List VMs.
    Ls {
        /// Print each VM's vm.json as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Print a VM's serial log.
    Logs {
        name: String,
        /// Keep printing until the VM stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches on a terminal; plain pipes otherwise).
    Console {
        name: String,
        /// With piped input: seconds of quiet output to wait for after the input ends.
        #[arg(long, default_value_t = 1.0)]
        linger: f64,
    },
    /// Press the ACPI power button and wait for the guest to power off; kill after the timeout.
    Stop {
        name: String,
        /// Seconds to wait for the guest before killing it.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Kill a VM at once.
    Kill { name: String },
    /// Delete a stopped VM's files (overlay, disks, logs); never the base image.
    Rm {
        name: String,
        /// Kill the VM first if it runs.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// A unique name ([a-z0-9][a-z0-9-]{0,63}); generated (like calm-otter) when absent.
    #[arg(long)]
    name: Option<String>,
    /// Virtual CPUs (1 to 16).
    #[arg(long, default_value_t = kiln_host::DEFAULT_VCPUS)]
    vcpu: u32,
    /// Memory in MiB (at most 32768).
    #[arg(long, default_value_t = kiln_host::DEFAULT_RAM_MIB)]
    ram: u32,
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
    /// User-mode networking, with the guest's SSH port forwarded from a free port on 127.0.0.1.
    #[arg(long)]
    net: bool,
    /// Stay on the serial console (Ctrl-] detaches; the VM keeps running).
    #[arg(long)]
    attach: bool,
}

pub fn dispatch(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    let host = Host::from_env()?;
    match cmd {
        VmCommand::Run(args) => {
            let req = RunRequest {
                home_size: kiln_host::parse_size(&args.home_size)
                    .map_err(|e| anyhow::anyhow!("--home-size: {e}"))?,
                var_size: kiln_host::parse_size(&args.var_size)
                    .map_err(|e| anyhow::anyhow!("--var-size: {e}"))?,
                name: args.name,
                vcpu: args.vcpu,
                ram_mib: args.ram,
                image: args.image,
                rootfs: args.rootfs,
                kernel: args.kernel,
                initrd: args.initrd,
                cmdline: args.cmdline,
                net: args.net,
            };
            let rec = host.run(&req)?;
            println!("{} {}", rec.meta.name, rec.meta.pid.unwrap_or(0));
            if let Some(port) = rec.meta.ssh_port {
                eprintln!("kiln: ssh -p {port} root@127.0.0.1 (once the guest has booted)");
            }
            if args.attach {
                return console(&host, &rec.meta.name, 1.0);
            }
        }
        VmCommand::Ls { json } => {
            let vms = host.list()?;
            if json {
                let mut out = Vec::new();
                for mut rec in vms {
                    rec.meta.state = rec.effective_state();
                    out.push(rec);
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{:<24} {:<9} {:>8} {:>4} {:>6} {:<5} {:<24} EXIT",
                    "NAME", "STATE", "PID", "VCPU", "RAM", "ACCEL", "CREATED"
                );
                for rec in vms {
                    let state = rec.effective_state();
                    let pid = match (state, rec.meta.pid) {
                        (VmState::Running, Some(p)) => p.to_string(),
                        _ => "-".into(),
                    };
                    let exit = match state {
                        VmState::Stopped => rec
                            .meta
                            .exit_reason
                            .clone()
                            .unwrap_or_else(|| "process gone".into()),
                        _ => String::new(),
                    };
                    println!(
                        "{:<24} {:<9} {:>8} {:>4} {:>6} {:<5} {:<24} {}",
                        rec.meta.name,
                        state.name(),
                        pid,
                        rec.config.vcpu,
                        format!("{}M", rec.config.ram_mib),
                        rec.config.accelerator,
                        rec.meta.created_at,
                        exit
                    );
                }
            }
        }
        VmCommand::Logs { name, follow } => {
            host.write_log(&name, follow, &mut std::io::stdout().lock())?;
        }
        VmCommand::Console { name, linger } => {
            if !(linger.is_finite() && linger >= 0.0) {
                anyhow::bail!("--linger {linger}: must be a number of seconds ≥ 0");
            }
            return console(&host, &name, linger);
        }
        VmCommand::Stop { name, timeout } => {
            if !(timeout.is_finite() && timeout >= 0.0) {
                anyhow::bail!("--timeout {timeout}: must be a number of seconds ≥ 0");
            }
            let report = host.stop(&name, Duration::from_secs_f64(timeout))?;
            println!("{name}: {}", report.describe());
            if matches!(report, StopReport::Killed { .. }) {
                return Ok(ExitCode::from(2));
            }
        }
        VmCommand::Kill { name } => {
            host.kill(&name)?;
            println!("{name}: killed");
        }
        VmCommand::Rm { name, force } => {
            host.remove(&name, force)?;
            println!("{name}: removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn console(host: &Host, name: &str, linger: f64) -> anyhow::Result<ExitCode> {
    let rec = host.get(name)?;
    if !rec.is_alive() {
        anyhow::bail!("VM '{name}' is not running (kiln vm logs {name} shows its serial log)");
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("kiln: {name}'s serial console; Ctrl-] detaches (the VM keeps running)\r");
    }
    let end = kiln_host::attach_console(
        &rec.meta.console_socket,
        interactive,
        Duration::from_secs_f64(linger),
    )?;
    if end == kiln_host::ConsoleEnd::VmEnded {
        let rec = host.wait_stopped(name, Duration::from_secs(3))?;
        let why = rec.meta.exit_reason.unwrap_or_else(|| "ended".into());
        eprintln!("\r\nkiln: {name}: {why}\r");
    } else if interactive {
        eprintln!("\r\nkiln: detached from {name}\r");
    }
    Ok(ExitCode::SUCCESS)
}
