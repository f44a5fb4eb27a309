use std::path::PathBuf;

/// Errors of kiln-web; each message is one line naming the input and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// A file the page needs (v86, xterm.js, SeaBIOS, ...) is not installed.
    #[error("missing asset {name}: {} not found; {hint}", path.display())]
    MissingAsset {
        /// What the asset is (e.g. "libv86.js").
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// How to install it.
        hint: String,
    },
    /// The image could not be read. (Not a `#[source]`: the message already includes the
    /// cause, and error-chain printers would repeat it.)
    #[error("{0}")]
    Image(kiln_image::ImageError),
    /// The image is readable but nothing in it can boot.
    #[error("{}: not bootable: {why}", path.display())]
    NotBootable {
        /// The image.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// A file-system operation failed.
    #[error("{}: {what}: {err}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The underlying error (part of the message, so not a `#[source]`).
        err: std::io::Error,
    },
    /// The output directory exists and holds something that is not a kiln site.
    #[error("{}: exists and is not an empty directory or a kiln site; refusing to overwrite it", path.display())]
    OutNotEmpty {
        /// The output directory.
        path: PathBuf,
    },
    /// `--warm` failed: Node, v86 or the marker.
    #[error("warm boot of {}: {msg}", image.display())]
    Warm {
        /// The image being warmed.
        image: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// The server could not start.
    #[error("cannot listen on {addr}: {msg}")]
    Listen {
        /// The requested address.
        addr: String,
        /// Why.
        msg: String,
    },
    /// An option given to serve is invalid.
    #[error("`{field}`: {msg}")]
    BadOption {
        /// The option's field name.
        field: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A SITE directory given to serve is not a kiln site.
    /// A Linux image directory, its 9p index, a content file or a saved state is not what it
    /// must be.
    #[error("{}: {why}", path.display())]
    BadImage { path: PathBuf, why: String },
    #[error("{}: not a kiln site (no kiln.json) and not a disk image", path.display())]
    NotASite {
        /// The directory.
        path: PathBuf,
    },
}

impl From<kiln_image::ImageError> for WebError {
    fn from(e: kiln_image::ImageError) -> Self {
        WebError::Image(e)
    }
}

impl WebError {
    /// `path` is not a usable Linux image (or part of one) because of `why`.
    pub(crate) fn bad(path: impl Into<PathBuf>, why: impl Into<String>) -> WebError {
        WebError::BadImage {
            path: path.into(),
            why: why.into(),
        }
    }

    pub(crate) fn io(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        err: std::io::Error,
    ) -> Self {
        WebError::Io {
            path: path.into(),
            what: what.into(),
            err,
        }
    }
}
