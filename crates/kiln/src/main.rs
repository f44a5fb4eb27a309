//! `kiln`: build a 256-byte boot program into every disk format, inspect and convert images, and
//! boot them. Each command is a thin shell over the library (see `kiln::build`, `kiln::run`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kiln_image::Format;

mod image_cmd;
mod vm_cmd;
mod web_cmd;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Tiny VMs: build a boot program into every disk format and run it"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the boot program into boot.bin, boot.img, boot.iso, boot.qcow2, boot.vmdk, boot.vhd, boot.vdi.
    Build {
        /// A program of your own (≤ 256 bytes of real-mode code at 0x7C00) instead of kiln's.
        #[arg(long)]
        program: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "build")]
        out: PathBuf,
        /// List what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the program's size: `N / 256 bytes (M free)`.
    Size {
        #[arg(long)]
        program: Option<PathBuf>,
    },
    /// Validate a program: size, and that it fits before the boot signature.
    Check {
        #[arg(long)]
        program: Option<PathBuf>,
    },
    /// Show an image's format, virtual size, allocated size and consistency.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Convert between raw/img, qcow2, vmdk, vhd and vdi (streaming, sparse-aware).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Output format; taken from OUTPUT's extension when absent.
        #[arg(long, short = 'f')]
        format: Option<Format>,
        /// Skip the final fsync (as `qemu-img convert` does): faster, but a crash soon after may
        /// leave an empty file under OUTPUT's name.
        #[arg(long)]
        no_fsync: bool,
    },
    /// Boot an image (any format kiln reads; an ISO boots as a CD). Ctrl-A X quits.
    Run(RunArgs),
    /// Press a running VM's ACPI power button and wait for it to power off (kill after --timeout).
    Stop {
        name: String,
        /// Seconds to wait for the guest before killing it.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// End a running VM at once.
    Kill { name: String },
    /// List running VMs started by `kiln run`.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Linux microVMs: copy-on-write roots, per-VM disks, serial console, graceful stop.
    #[command(subcommand)]
    Vm(vm_cmd::VmCommand),
    /// Build guest images: `kiln image debian OUT` (debootstrap; needs root).
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    #[command(flatten)]
    Web(web_cmd::WebCommand),
}

#[derive(clap::Args)]
struct RunArgs {
    image: PathBuf,
    /// The engine: builtin (kiln's own VMM on KVM, milliseconds to boot) or qemu (with SeaBIOS).
    /// Default: builtin where /dev/kvm works, else qemu.
    #[arg(long, value_enum)]
    engine: Option<Engine>,
    /// Serial console only: do not mirror the BIOS screen onto the terminal.
    #[arg(long, conflicts_with = "bios_console")]
    serial_only: bool,
    /// BIOS console: int 10h output on the terminal and terminal keys to int 16h, so boot
    /// sectors that use only BIOS video and keyboard can be driven over a serial line. This is
    /// the default on both engines (SeaBIOS's serial console on QEMU); the flag says so explicitly.
    #[arg(long)]
    bios_console: bool,
    /// QEMU machine type: pc or q35 (qemu engine only; default pc).
    #[arg(long)]
    machine: Option<kiln_qemu::Machine>,
    /// How the guest sees the image (detected when absent).
    #[arg(long, value_enum)]
    media: Option<MediaArg>,
    /// Guest memory in MiB (default: 16 on builtin, 128 on qemu).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=3584))]
    ram: Option<u32>,
    /// Seconds to wait for the guest to power off after SIGTERM presses the power button.
    #[arg(long, default_value_t = 30.0)]
    stop_timeout: f64,
    /// Force an accelerator (qemu engine only; default: kvm only with hardware virtualization, else tcg).
    #[arg(long, value_enum)]
    accel: Option<AccelArg>,
    /// The VM's name for `kiln stop`, `kiln ps` (generated when absent).
    #[arg(long)]
    name: Option<String>,
    /// Serve the serial console on this Unix socket instead of the terminal (one client at a
    /// time; e.g. `socat - UNIX-CONNECT:PATH`).
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// kiln's own VMM on KVM with a built-in minimal BIOS.
    Builtin,
    /// qemu-system-x86_64 with SeaBIOS.
    Qemu,
}

#[derive(Clone, Copy, ValueEnum)]
enum MediaArg {
    Disk,
    Cdrom,
    Floppy,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Build { program, out, json } => {
            let program = load_program(program.as_deref())?.bytes;
            let show = std::io::stderr().is_terminal() && !json;
            let artifacts = kiln::build::build(&program, &out, &mut |p| {
                if show {
                    eprintln!("  writing {}", p.display());
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&artifacts)?);
            } else {
                for a in &artifacts {
                    println!(
                        "{:<24} {:<6} {}",
                        a.path.display(),
                        a.format.name(),
                        a.description
                    );
                }
            }
        }
        Command::Size { program } => {
            let r = load_program(program.as_deref())?.report;
            println!(
                "{} / {} bytes ({} free)",
                r.size,
                kiln_boot::MAX_PROGRAM_SIZE,
                r.free
            );
        }
        Command::Check { program } => {
            let Program {
                name, report: r, ..
            } = load_program(program.as_deref())?;
            println!(
                "{name}: ok, {} / {} bytes ({} free), fits before the boot signature",
                r.size,
                kiln_boot::MAX_PROGRAM_SIZE,
                r.free
            );
        }
        Command::Inspect { image, json } => {
            let info = kiln_image::inspect(&image)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("image:          {}", info.path.display());
                println!("format:         {}", info.format.name());
                println!(
                    "virtual size:   {} ({} bytes)",
                    human(info.virtual_size),
                    info.virtual_size
                );
                println!(
                    "allocated size: {} ({} bytes)",
                    human(info.allocated_size),
                    info.allocated_size
                );
                if info.files.len() > 1 {
                    for f in &info.files {
                        println!("file:           {}", f.display());
                    }
                }
                if info.consistent {
                    println!("consistency:    ok");
                } else {
                    println!("consistency:    {} problem(s)", info.problems.len());
                    for p in &info.problems {
                        println!("  - {p}");
                    }
                }
            }
            if !info.consistent {
                anyhow::bail!(
                    "{}: {} image is inconsistent: {}",
                    info.path.display(),
                    info.format.name(),
                    info.problems.join("; ")
                );
            }
        }
        Command::Convert {
            input,
            output,
            format,
            no_fsync,
        } => {
            let format = match format {
                Some(f) => f,
                None => Format::from_extension(&output).with_context(|| {
                    format!(
                        "{}: cannot tell the output format from the extension; pass --format (raw, qcow2, vmdk, vhd, vdi)",
                        output.display()
                    )
                })?,
            };
            let bar = progress_bar();
            let options = kiln_image::WriteOptions { fsync: !no_fsync };
            kiln_image::convert_with(&input, &output, format, &options, &mut |done, total| {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        }
        Command::Run(args) => return run(args),
        Command::Stop { name, timeout } => {
            let timeout = seconds("--timeout", timeout)?;
            let reply = kiln::control::send(
                &name,
                &kiln::control::Request::Stop {
                    timeout_s: timeout.as_secs_f64(),
                },
                timeout + Duration::from_secs(30),
            )?;
            println!("{name}: {}", reply.description);
            if reply.outcome != "powered-off" {
                // As `kiln vm stop`: 2 means the VM is gone, but not by the guest's own power-off.
                return Ok(ExitCode::from(2));
            }
        }
        Command::Kill { name } => {
            let reply = kiln::control::send(
                &name,
                &kiln::control::Request::Kill,
                Duration::from_secs(30),
            )?;
            println!("{name}: {}", reply.description);
        }
        Command::Ps { json } => {
            let vms = kiln::control::list();
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                println!("{:<24} {:>8} {:<8} IMAGE", "NAME", "PID", "ENGINE");
                for vm in vms {
                    println!(
                        "{:<24} {:>8} {:<8} {}",
                        vm.name,
                        vm.pid,
                        vm.engine,
                        vm.image.display()
                    );
                }
            }
        }
        Command::Vm(cmd) => return vm_cmd::dispatch(cmd),
        Command::Image(cmd) => return image_cmd::dispatch(cmd),
        Command::Web(cmd) => return web_cmd::dispatch(cmd),
    }
    Ok(ExitCode::SUCCESS)
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value >= 0.0) {
        anyhow::bail!("{flag} {value}: must be a number of seconds ≥ 0");
    }
    Ok(Duration::from_secs_f64(value))
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    use kiln::run::Event;
    let stop_timeout = seconds("--stop-timeout", args.stop_timeout)?;
    let name = match args.name {
        Some(n) => {
            kiln_host::validate_name(&n)?;
            n
        }
        None => kiln::control::free_name(),
    };
    // One KVM probe (it creates a throw-away VM): asked for the builtin engine, or for no
    // engine, where KVM decides.
    let engine = match args.engine {
        Some(Engine::Qemu) => Engine::Qemu,
        explicit => match (kiln_vmm::kvm_available(), explicit) {
            (Ok(()), _) => Engine::Builtin,
            (Err(why), Some(Engine::Builtin)) => {
                anyhow::bail!("the builtin engine needs KVM: {why} (or use --engine qemu)")
            }
            (Err(why), _) => {
                tracing::info!("{why}; using the qemu engine");
                Engine::Qemu
            }
        },
    };
    if engine == Engine::Builtin && (args.machine.is_some() || args.accel.is_some()) {
        anyhow::bail!("--machine and --accel apply to --engine qemu only");
    }
    let media = args.media.map(|m| match m {
        MediaArg::Disk => kiln_qemu::Media::Disk,
        MediaArg::Cdrom => kiln_qemu::Media::Cdrom,
        MediaArg::Floppy => kiln_qemu::Media::Floppy,
    });
    let (tx, events) = mpsc::channel();
    let ended = tx.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if signal_tx.send(Event::Signal(sig)).is_err() {
                break;
            }
        }
    });
    let engine_name = match engine {
        Engine::Builtin => "builtin",
        Engine::Qemu => "qemu",
    };
    let _registration =
        kiln::control::Registration::claim(&name, engine_name, &args.image, move |incoming| {
            tx.send(Event::Control(incoming)).is_ok()
        })?;
    let outcome = match engine {
        Engine::Builtin => {
            let opts = kiln::builtin::BuiltinOptions {
                image: args.image,
                boot: media.map(|m| match m {
                    kiln_qemu::Media::Disk => kiln_vmm::BootDevice::HardDisk,
                    kiln_qemu::Media::Cdrom => kiln_vmm::BootDevice::Cdrom,
                    kiln_qemu::Media::Floppy => kiln_vmm::BootDevice::Floppy,
                }),
                ram_mib: args.ram.unwrap_or(16),
                serial_only: args.serial_only,
                console_socket: args.console_socket,
            };
            let notify = ended.clone();
            let mut vm = kiln::builtin::BuiltinVm::start(
                &opts,
                Box::new(move || {
                    let _ = notify.send(Event::Ended);
                }),
            )?;
            let outcome = kiln::run::supervise(&mut vm, &events, stop_timeout);
            let c = vm.counters();
            tracing::info!(
                "VM exits: {} total ({} port I/O, {} BIOS calls, {} MMIO, {} hlt)",
                c.total,
                c.io,
                c.bios,
                c.mmio,
                c.hlt
            );
            outcome
        }
        Engine::Qemu => {
            let opts = kiln::run::RunOptions {
                image: args.image,
                machine: args.machine.unwrap_or(kiln_qemu::Machine::Pc),
                media,
                serial_only: args.serial_only,
                ram_mib: args.ram.unwrap_or(128),
                stop_timeout,
                accel: args.accel.map(|a| match a {
                    AccelArg::Kvm => kiln_qemu::Accel::Kvm,
                    AccelArg::Tcg => kiln_qemu::Accel::Tcg,
                }),
                name: Some(name.clone()),
                console_socket: args.console_socket,
            };
            kiln::run::run_qemu(&opts, &events, ended.clone())?
        }
    };
    eprintln!("kiln: {}", outcome.description);
    Ok(if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A program loaded from `--program` (or kiln's own) and validated.
struct Program {
    name: String,
    bytes: Vec<u8>,
    report: kiln_boot::ProgramReport,
}

fn load_program(path: Option<&Path>) -> anyhow::Result<Program> {
    let (name, bytes) = match path {
        None => ("kiln's program".to_string(), kiln_boot::program()?),
        Some(p) => (
            p.display().to_string(),
            std::fs::read(p)
                .with_context(|| format!("{}: cannot read the program", p.display()))?,
        ),
    };
    let report = kiln_boot::check(&bytes).with_context(|| name.clone())?;
    Ok(Program {
        name,
        bytes,
        report,
    })
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
