//! `kiln`: build a 256-byte boot program into every disk format, inspect and convert images, and
//! boot them. Each command is a thin shell over the library (see `kiln::build`, `kiln::run`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kiln_image::Format;

mod image_cmd;
mod net_cmd;
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
    /// Boot an image (any format kiln reads; an ISO boots as a CD) in the foreground. Ctrl-A X
    /// quits. Exits with the VM's end code (0 powered off, 2 killed, 3 reset, 4 crashed).
    Run(RunArgs),
    /// List VMs: every VM, foreground or background, whatever its engine (= `kiln vm ls`).
    Ps {
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Manage(vm_cmd::ManageCommand),
    /// Background VMs: Linux microVMs (copy-on-write roots, per-VM disks) and firmware VMs.
    #[command(subcommand)]
    Vm(vm_cmd::VmCommand),
    /// NAT for TAP VMs: `kiln net up|down|status` (root).
    #[command(subcommand)]
    Net(net_cmd::NetCommand),
    /// Build guest images: `kiln image debian OUT` (debootstrap; needs root).
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    #[command(flatten)]
    Web(web_cmd::WebCommand),
    /// A background VM's supervisor (run by kiln itself: `kiln __supervise HOME NAME
    /// [--resume TAG | --clone VM:TAG]`).
    #[command(name = "__supervise", hide = true)]
    Supervise {
        home: PathBuf,
        name: String,
        #[arg(long, conflicts_with = "clone")]
        resume: Option<String>,
        #[arg(long)]
        clone: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    image: PathBuf,
    /// The engine: builtin (kiln's own VMM on KVM, milliseconds to boot) or qemu (with SeaBIOS).
    /// Default: builtin where the CPU has hardware virtualization (vmx/svm), else qemu (-v says
    /// which and why).
    #[arg(long, value_enum)]
    engine: Option<EngineArg>,
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
    /// Guest memory in MiB, 2 to 3584 (default: 16 on builtin, 128 on qemu).
    #[arg(long)]
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

/// A firmware engine on the command line.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum EngineArg {
    /// kiln's own VMM on KVM with a built-in minimal BIOS.
    Builtin,
    /// qemu-system-x86_64 with SeaBIOS (pc, or q35 with --machine).
    Qemu,
}

/// How the guest sees a firmware disk.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum MediaArg {
    Disk,
    Cdrom,
    Floppy,
}

impl MediaArg {
    pub(crate) fn media(self) -> kiln_image::BootMedia {
        match self {
            MediaArg::Disk => kiln_image::BootMedia::Disk,
            MediaArg::Cdrom => kiln_image::BootMedia::Cdrom,
            MediaArg::Floppy => kiln_image::BootMedia::Floppy,
        }
    }
}

/// The engine and accelerator the flags ask for (`None`: kiln decides).
pub(crate) fn engine_choice(
    engine: Option<EngineArg>,
    machine: Option<kiln_qemu::Machine>,
    accel: Option<kiln_qemu::Accel>,
) -> anyhow::Result<(Option<kiln_host::EngineKind>, Option<kiln_qemu::Accel>)> {
    use kiln_host::EngineKind;
    let qemu = |m: Option<kiln_qemu::Machine>| match m {
        None | Some(kiln_qemu::Machine::Pc) => Ok(EngineKind::QemuPc),
        Some(kiln_qemu::Machine::Q35) => Ok(EngineKind::QemuQ35),
        Some(kiln_qemu::Machine::Microvm) => {
            anyhow::bail!("--machine microvm boots Linux kernels: use kiln vm run --image")
        }
    };
    let kind = match engine {
        Some(EngineArg::Builtin) => {
            if machine.is_some() || accel.is_some() {
                anyhow::bail!("--machine and --accel apply to --engine qemu only");
            }
            Some(EngineKind::Builtin)
        }
        Some(EngineArg::Qemu) => Some(qemu(machine)?),
        // A QEMU-only flag means QEMU.
        None if machine.is_some() || accel.is_some() => Some(qemu(machine)?),
        None => None,
    };
    Ok((kind, accel))
}

/// The registry, supervising background VMs with this very binary.
pub(crate) fn host() -> anyhow::Result<kiln_host::Host> {
    Ok(kiln_host::Host::from_env()?)
}

/// Prints a line on stdout; a closed stdout (`kiln ps | head -1`) ends kiln quietly.
pub(crate) fn out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{line}")
        .and_then(|_| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A closed stdout ends a command quietly. Not for a supervisor: it outlives the pipe it
    // reported on, and must never die of a write.
    if !matches!(cli.command, Command::Supervise { .. }) {
        kiln_sys::signal::default_sigpipe();
    }
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
            eprintln!("kiln: error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: a cause whose text its parent already
/// shows is not repeated. Library errors name request fields; they are shown as the flags.
fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<kiln_host::HostError>() {
            Some(kiln_host::HostError::InvalidValue { field, value, why }) => {
                format!("{} {value}: {why}", flag_of(field))
            }
            _ => fields_as_flags(&cause.to_string()),
        };
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Library messages name option fields in backticks (`public`); people see the flags.
fn fields_as_flags(text: &str) -> String {
    let mut out = text.to_string();
    for field in [
        "public",
        "allow_hosts",
        "max_relays",
        "warm",
        "vcpus",
        "ram_mib",
        "home_size",
        "var_size",
    ] {
        out = out.replace(&format!("`{field}`"), &flag_of(field));
    }
    out
}

/// The command-line flag for a request field of kiln-host.
fn flag_of(field: &str) -> String {
    match field {
        "vcpus" => "--vcpu".into(),
        "ram_mib" => "--ram".into(),
        "allow_hosts" => "--allow-host".into(),
        "disks" => "--disk".into(),
        "name" => "NAME".into(),
        "home" => "KILN_HOME".into(),
        other => format!("--{}", other.replace('_', "-")),
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
        Command::Ps { json } => return vm_cmd::list(&host()?, json),
        Command::Manage(cmd) => return vm_cmd::manage(&host()?, cmd),
        Command::Supervise {
            home,
            name,
            resume,
            clone,
        } => {
            let start = match (resume, clone.as_deref().and_then(|c| c.split_once(':'))) {
                (Some(tag), _) => kiln_host::Start::Resume(tag),
                (None, Some((from, tag))) => kiln_host::Start::Clone {
                    from: from.into(),
                    tag: tag.into(),
                },
                (None, None) => kiln_host::Start::Boot,
            };
            return Ok(ExitCode::from(kiln_host::supervise_main(
                &home, &name, &start,
            )));
        }
        Command::Vm(cmd) => return vm_cmd::dispatch(cmd),
        Command::Net(cmd) => return net_cmd::dispatch(cmd),
        Command::Image(cmd) => return image_cmd::dispatch(cmd),
        Command::Web(cmd) => return web_cmd::dispatch(cmd),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value >= 0.0) {
        anyhow::bail!("{flag} {value}: must be a number of seconds ≥ 0");
    }
    Ok(Duration::from_secs_f64(value))
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let stop_timeout = seconds("--stop-timeout", args.stop_timeout)?;
    let accel = args.accel.map(|a| match a {
        AccelArg::Kvm => kiln_qemu::Accel::Kvm,
        AccelArg::Tcg => kiln_qemu::Accel::Tcg,
    });
    let (engine, accel) = engine_choice(args.engine, args.machine, accel)?;
    let request = kiln_host::DiskRequest {
        name: args.name,
        image: args.image,
        vcpu: None,
        media: args.media.map(MediaArg::media),
        ram_mib: args.ram,
        engine,
        accel,
        bios_console: !args.serial_only,
        console_socket: args.console_socket,
    };
    let on_terminal = request.console_socket.is_none() && std::io::stdin().is_terminal();
    let end = host()?.run_foreground(&request, stop_timeout, &mut |rec| {
        if on_terminal {
            eprint!(
                "kiln: {}'s console; {}\r\n",
                rec.meta.name,
                kiln_host::escape_help(false)
            );
        }
        tracing::info!(
            "{}: running on {} ({})",
            rec.meta.name,
            rec.config.engine.name(),
            rec.config.accelerator.name()
        );
    })?;
    eprintln!("kiln: {end}");
    Ok(ExitCode::from(end.exit_code()))
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

/// `212.4 MiB`, `100 B`.
pub(crate) fn human(bytes: u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once_and_fields_become_flags() {
        let io = std::io::Error::from_raw_os_error(libc::EMFILE);
        let e: anyhow::Error = kiln_host::HostError::Io {
            what: "/x/vm.json: cannot read".into(),
            source: io,
        }
        .into();
        let line = report(&e.context("kiln vm ls"));
        assert_eq!(line.matches("Too many open files").count(), 1, "{line}");
        assert!(
            line.starts_with("kiln vm ls: /x/vm.json: cannot read"),
            "{line}"
        );
        let e: anyhow::Error = kiln_host::HostError::InvalidValue {
            field: "vcpus",
            value: "0".into(),
            why: "must be between 1 and 16".into(),
        }
        .into();
        assert_eq!(report(&e), "--vcpu 0: must be between 1 and 16");
        let e = anyhow::anyhow!("0.0.0.0:0: served only when `public` is set");
        assert_eq!(report(&e), "0.0.0.0:0: served only when --public is set");
        let e = anyhow::anyhow!("`allow_hosts`: \"a b\" is not a host name");
        assert_eq!(report(&e), "--allow-host: \"a b\" is not a host name");
    }
}
