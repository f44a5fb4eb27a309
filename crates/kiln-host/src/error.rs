use std::path::PathBuf;

/// Errors of kiln-host. Each names the input or file and what is wrong, in one line. Values
/// are named by their field in [`crate::VmRequest`] (`vcpus`, `ram_mib`, ...), never by a
/// command-line flag: the CLI maps fields to its flags.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("invalid VM name '{name}': {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("{field} {value}: {why}")]
    InvalidValue {
        /// The request field: `vcpus`, `ram_mib`, `home_size`, `var_size`, `image`, `rootfs`,
        /// `kernel`, `disk`, `engine`, `machine`, ...
        field: &'static str,
        value: String,
        why: String,
    },
    #[error("{what} {path}: {why}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{}", if *running { format!("a VM named '{name}' is already running (see `kiln ps`)") } else { format!("a VM named '{name}' already exists (kiln vm rm {name} to remove it)") })]
    NameInUse { name: String, running: bool },
    #[error("VM '{name}' is broken ({reason}); remove it with `kiln vm rm --force {name}`")]
    Broken { name: String, reason: String },
    #[error("VM '{name}' is broken ({reason}) and a process still holds {}; `kiln vm rm --force {name}` kills it first", lock.display())]
    BrokenHeld {
        name: String,
        reason: String,
        lock: PathBuf,
    },
    #[error("no VM named '{0}' (see `kiln ps`)")]
    NoSuchVm(String),
    #[error("VM '{0}' is running; stop it first or pass --force")]
    Running(String),
    #[error("VM '{0}' is still being created; wait for it, or pass --force to kill its creator")]
    Creating(String),
    #[error("no running VM named '{0}' (see `kiln ps`)")]
    NotRunning(String),
    #[error("VM '{0}' is not running (`kiln vm logs {0}` shows its serial log)")]
    Stopped(String),
    #[error("{path}: {why}")]
    State { path: PathBuf, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("VM '{name}' failed to start: {detail}")]
    Start { name: String, detail: String },
    #[error("VM '{name}': {detail}")]
    Control { name: String, detail: String },
    #[error(transparent)]
    Qemu(#[from] kiln_qemu::QemuError),
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    #[error(transparent)]
    Rootfs(#[from] kiln_rootfs::RootfsError),
    #[error(transparent)]
    Vmm(#[from] kiln_vmm::VmmError),
    #[error(transparent)]
    Net(#[from] kiln_net::NetError),
}

impl HostError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> HostError {
        HostError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        field: &'static str,
        value: impl ToString,
        why: impl Into<String>,
    ) -> HostError {
        HostError::InvalidValue {
            field,
            value: value.to_string(),
            why: why.into(),
        }
    }
}
