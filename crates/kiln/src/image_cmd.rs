//! `kiln image ...`: build guest images (see kiln-rootfs).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Guest image builders.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build a Debian image for `kiln vm run --image OUT` with debootstrap (needs root):
    /// OUT/rootfs.ext4, OUT/vmlinuz, OUT/initrd.img, OUT/home.ext4, OUT/var.ext4, OUT/image.json.
    Debian {
        /// Output directory (created; must be empty).
        out: PathBuf,
        /// Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Size of the root filesystem (M or G suffix).
        #[arg(long, default_value = "2G")]
        size: String,
        /// Debian mirror.
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        /// Extra packages to install (comma-separated).
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
    },
}

pub fn dispatch(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Debian {
            out,
            suite,
            size,
            mirror,
            packages,
        } => {
            let opts = kiln_rootfs::DebianOptions {
                suite,
                size: kiln_rootfs::parse_size(&size)?,
                mirror,
                extra_packages: packages,
            };
            let show = std::io::stderr().is_terminal();
            let t0 = std::time::Instant::now();
            let m = kiln_rootfs::build_debian(&opts, &out, &mut |step| {
                if show {
                    eprintln!("  {step}");
                }
            })?;
            println!(
                "{}: {} ({} s)",
                out.display(),
                m.name,
                t0.elapsed().as_secs()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
