//! `kiln image ...`: build guest images (see kiln-rootfs).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Guest image builders.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Make an image directory from a root tree or an OCI image (no container runtime):
    /// OUT/rootfs.ext4, OUT/vmlinuz, OUT/initrd.img, OUT/image.json. Owners, modes, links and
    /// device nodes are kept; the architecture is read from the tree's /bin/sh.
    Create {
        /// Output directory (created; must not exist).
        out: PathBuf,
        /// A root directory to copy.
        #[arg(
            long,
            value_name = "DIR",
            conflicts_with = "from_oci",
            required_unless_present = "from_oci"
        )]
        from_dir: Option<PathBuf>,
        /// An OCI layout directory, an OCI archive or a `docker save` tarball.
        #[arg(long, value_name = "PATH")]
        from_oci: Option<PathBuf>,
        /// The architecture the image must have: i386 or amd64 (checked, not converted).
        #[arg(long)]
        arch: Option<String>,
        /// The kernel (default: the newest /boot/vmlinuz* of the tree).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// The initrd (default: the tree's /boot/initrd.img*, unless --kernel is given).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Size of rootfs.ext4 (M or G suffix; default: the tree's size and half again).
        #[arg(long)]
        size: Option<String>,
    },
    /// Build a Debian image with debootstrap (needs root). amd64 (the default): a microVM image
    /// for `kiln vm run --image OUT` (rootfs.ext4, vmlinuz, initrd.img, home.ext4, var.ext4,
    /// image.json). i386: a v86 image for `kiln boot OUT` and `kiln prepare` (bookworm's
    /// linux-image-686, busybox init, a slim 9p initramfs, root logged in on the serial
    /// console; fs.json + fs/, rootfs.ext4, vmlinuz, initrd.img, image.json).
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
        /// amd64 (a microVM image) or i386 (a v86 image).
        #[arg(long, default_value = "amd64")]
        arch: String,
    },
}

pub fn dispatch(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Create {
            out,
            from_dir,
            from_oci,
            arch,
            kernel,
            initrd,
            size,
        } => {
            let source = match (from_dir, from_oci) {
                (Some(d), _) => kiln_rootfs::create::Source::Dir(d),
                (None, Some(o)) => kiln_rootfs::create::Source::Oci(o),
                (None, None) => anyhow::bail!("give --from-dir DIR or --from-oci PATH"),
            };
            let opts = kiln_rootfs::create::CreateOptions {
                source,
                arch: arch.as_deref().map(parse_arch).transpose()?,
                kernel,
                initrd,
                size: size
                    .map(|s| {
                        kiln_rootfs::parse_size(&s).map_err(|e| anyhow::anyhow!("--size: {e}"))
                    })
                    .transpose()?,
            };
            let show = std::io::stderr().is_terminal();
            let c = kiln_rootfs::create::create_image(&opts, &out, &mut |step| {
                if show {
                    eprintln!("  {step}");
                }
            })?;
            println!("{}: {} ({})", out.display(), c.manifest.name, c.arch.name());
        }
        ImageCommand::Debian {
            out,
            suite,
            size,
            mirror,
            packages,
            arch,
        } => {
            let opts = kiln_rootfs::DebianOptions {
                suite,
                size: kiln_rootfs::parse_size(&size)?,
                mirror,
                extra_packages: packages,
                arch: parse_arch(&arch)?,
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

fn parse_arch(a: &str) -> anyhow::Result<kiln_rootfs::tree::Arch> {
    a.parse()
        .map_err(|e: String| anyhow::anyhow!("--arch: {e}"))
}
