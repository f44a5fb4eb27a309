use std::path::PathBuf;

/// Errors of kiln-host. Each names the input or file and what is wrong, in one line.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("invalid VM name '{name}': {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("{what} {value}: {why}")]
    InvalidValue {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("{what} {path}: {why}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("a VM named '{0}' already exists (kiln vm rm {0} to remove it)")]
    NameInUse(String),
    #[error("no VM named '{0}'")]
    NoSuchVm(String),
    #[error("VM '{0}' is running; stop it first or pass --force")]
    Running(String),
    #[error("VM '{0}' is not running")]
    NotRunning(String),
    #[error("{path}: {why}")]
    State { path: PathBuf, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("VM '{name}' failed to start: {detail}")]
    Start { name: String, detail: String },
    #[error(transparent)]
    Qemu(#[from] kiln_qemu::QemuError),
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
}

impl HostError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> HostError {
        HostError::Io {
            what: what.into(),
            source,
        }
    }
}
