//! `kiln prepare` and `kiln serve`: web-embeddable VMs (see kiln-web). Wired into main.rs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kiln_web::{PrepareOptions, ServeOptions, ServeSource};

/// Web commands, flattened into kiln's top level (`kiln boot`, `kiln prepare`, `kiln serve`).
#[derive(clap::Subcommand)]
pub enum WebCommand {
    /// Boot a Linux image (i386: `kiln image debian --arch i386`, `kiln image create`, or an
    /// env86 image directory) on v86 under Node, with the serial console on the terminal
    /// (Ctrl-A X quits). Resumes from the image's saved state unless --cold.
    Boot {
        /// The image directory.
        image: std::path::PathBuf,
        /// Write the machine's state into the image when the session ends, so the next boot
        /// resumes there (a guest that powers off leaves no state: the next boot is cold).
        #[arg(long)]
        save: bool,
        /// Ignore the image's saved state and boot from the kernel.
        #[arg(long)]
        cold: bool,
        /// Give the guest a network through passt (DHCP, DNS, NAT to the host).
        #[arg(short = 'n', long)]
        net: bool,
        /// Forward a host TCP port to the guest: [HOST_IP:]HOST_PORT:GUEST_PORT[/udp]
        /// (repeatable; implies --net).
        #[arg(short = 'p', long = "publish", value_name = "SPEC")]
        publish: Vec<String>,
        /// End the session when TEXT appears on serial.
        #[arg(long, value_name = "TEXT")]
        exit_on: Option<String>,
        /// Guest memory in MiB (default: the image's, 256 for kiln's images).
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// Print how the session went as JSON on stderr at its end.
        #[arg(long)]
        json: bool,
        /// The serial console on the terminal: kiln boot's console, so always on (accepted
        /// for env86's command line, as are `-n` and `-p`).
        #[arg(long = "ttyS0")]
        _tty_s0: bool,
    },
    /// Write a static site that boots IMAGE in the browser (v86); works under any base path.
    Prepare {
        /// Any image kiln reads: a disk boots as a hard disk (a floppy-sized one as a floppy),
        /// an ISO as a CD.
        image: PathBuf,
        /// Output directory (created; a previous kiln site there is replaced).
        out: PathBuf,
        /// Boot under Node until MARKER appears on serial and ship the saved state, so the
        /// page resumes instead of booting.
        #[arg(long, value_name = "MARKER")]
        warm: Option<String>,
        /// Seconds the warm boot may take.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        warm_timeout: u64,
        /// Guest memory in MiB (default: 16 for a disk, the image's own for a Linux image).
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve IMAGE (prepared in memory) or a prepared SITE, with a /ctl debug console
    /// WebSocket and a /net network relay (passt). Ctrl-C stops.
    Serve {
        /// A disk image or a directory written by `kiln prepare`.
        source: PathBuf,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8086")]
        addr: SocketAddr,
        /// Allow a non-loopback address (the console and relay then face the network).
        #[arg(long)]
        public: bool,
        /// Guest memory in MiB when preparing an image (default: 16 for a disk, the image's
        /// own for a Linux image).
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// The passt binary used by /net.
        #[arg(long, default_value = "passt")]
        passt: PathBuf,
        /// Also answer to this host name (any port), e.g. a reverse proxy's; repeatable.
        /// Requests naming any other host are refused (the DNS-rebinding defence).
        #[arg(long = "allow-host", value_name = "NAME")]
        allow_hosts: Vec<String>,
        /// Network relays (each a passt process) at once; more get HTTP 503. 0 turns /net off.
        #[arg(long, default_value_t = kiln_web::DEFAULT_MAX_RELAYS, value_name = "N")]
        max_relays: usize,
        /// Forward a host port to the guest through the page's relay (passt):
        /// [HOST_IP:]HOST_PORT:GUEST_PORT[/udp] (repeatable).
        #[arg(short = 'p', long = "publish", value_name = "SPEC")]
        publish: Vec<String>,
    },
}

pub fn dispatch(cmd: WebCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WebCommand::Boot {
            image,
            save,
            cold,
            net,
            publish,
            exit_on,
            memory,
            json,
            _tty_s0: _,
        } => {
            let forwards = publish
                .iter()
                .map(|p| p.parse())
                .collect::<Result<Vec<kiln_net::ports::PortForward>, _>>()?;
            let opts = kiln_web::boot::BootOptions {
                cold,
                save,
                net,
                forwards,
                exit_on,
                memory_mib: memory,
                assets: None,
                passt: None,
            };
            let r = kiln_web::boot::boot(&image, &opts, &mut |line| eprintln!("{line}\r"))?;
            if json {
                eprintln!("{}", serde_json::to_string(&r)?);
            } else if let Some(n) = r.saved_bytes {
                eprintln!(
                    "\r\nkiln boot: state saved into {} ({} KiB)",
                    image.display(),
                    n.div_ceil(1024)
                );
            } else if r.state_removed {
                eprintln!("\r\nkiln boot: the guest powered off; its saved state is removed (the next boot is cold)");
            }
            Ok(ExitCode::SUCCESS)
        }
        WebCommand::Prepare {
            image,
            out,
            warm,
            warm_timeout,
            memory,
            json,
        } => {
            let opts = PrepareOptions {
                warm,
                warm_timeout: Duration::from_secs(warm_timeout),
                memory_mib: memory,
                assets: None,
            };
            if let (Some(m), true) = (&opts.warm, image.is_dir()) {
                eprintln!(
                    "kiln prepare: booting {} under Node until {m:?} appears on serial (about 40 s)",
                    image.display()
                );
            }
            let r = kiln_web::prepare(&image, &out, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let warm = r
                    .warm_state_bytes
                    .map(|n| format!(", warm state {} KiB", n.div_ceil(1024)))
                    .unwrap_or_default();
                let what = match r.disk {
                    Some(d) => format!("disk as {}", d.v86_option()),
                    None => "Linux on a 9p filesystem".into(),
                };
                println!(
                    "{}: {} files, {} KiB, {what}{warm}",
                    r.out.display(),
                    r.files,
                    r.bytes.div_ceil(1024),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WebCommand::Serve {
            source,
            addr,
            public,
            memory,
            passt,
            allow_hosts,
            max_relays,
            publish,
        } => {
            let src = ServeSource::from_path(&source)?;
            let forwards = publish
                .iter()
                .map(|p| p.parse())
                .collect::<Result<Vec<kiln_net::ports::PortForward>, _>>()?;
            let opts = ServeOptions {
                addr,
                public,
                prepare: PrepareOptions {
                    memory_mib: memory,
                    ..Default::default()
                },
                passt,
                allow_hosts,
                max_relays,
                forwards,
            };
            kiln_web::serve(src, opts, |s| {
                println!(
                    "kiln serve: {}; debug console {} (keep it private: it drives the VM); Ctrl-C stops",
                    s.url, s.console_url
                );
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
