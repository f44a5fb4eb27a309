//! `kiln prepare` and `kiln serve`: web-embeddable VMs (see kiln-web). Wired into main.rs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kiln_web::{PrepareOptions, ServeOptions, ServeSource};

/// Web commands, flattened into kiln's top level (`kiln prepare`, `kiln serve`).
#[derive(clap::Subcommand)]
pub enum WebCommand {
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
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 16, value_name = "MIB")]
        memory: u32,
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
        /// Guest memory in MiB when preparing an image.
        #[arg(long, default_value_t = 16, value_name = "MIB")]
        memory: u32,
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
    },
}

pub fn dispatch(cmd: WebCommand) -> anyhow::Result<ExitCode> {
    match cmd {
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
            let r = kiln_web::prepare(&image, &out, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let warm = r
                    .warm_state_bytes
                    .map(|n| format!(", warm state {} KiB", n.div_ceil(1024)))
                    .unwrap_or_default();
                println!(
                    "{}: {} files, {} KiB, disk as {}{warm}",
                    r.out.display(),
                    r.files,
                    r.bytes.div_ceil(1024),
                    serde_json::to_value(r.disk)?.as_str().unwrap_or("?"),
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
        } => {
            let src = ServeSource::from_path(&source)?;
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
