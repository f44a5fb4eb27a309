//! Web-embeddable kiln VMs.
//!
//! [`prepare`] turns any disk image kiln reads, or an i386 Linux image directory ([`linux`]: a
//! 9p root filesystem, its kernel and initrd, a saved state), into a static site that boots it
//! in the browser with [v86](https://github.com/copy/v86): `index.html` (VM screen, xterm.js
//! serial terminal, pause/resume/save/restore, a progress bar), `kiln.js` (the embedding API),
//! v86, SeaBIOS, the disk or the 9p files, and optionally a saved machine state (`--warm`, or
//! the image's own) so the page resumes instead of booting. Every URL in the site is relative,
//! so it works under any base path.
//!
//! [`boot::boot`] runs a Linux image on v86 under Node ([`session`]) with the serial console on
//! the terminal; [`state`] checks and keeps v86 machine states.
//!
//! [`serve()`] serves such a site (preparing it in memory from an image when needed) and adds a
//! `/ctl` WebSocket debug console and a `/net` network relay bridged to passt.
//!
//! Assets come from the project's `web/node_modules` (npm: v86, @xterm/xterm; see
//! [`Assets::locate`]) and Debian's seabios package; a missing one is an error naming it and
//! how to install it.

mod access;
mod assets;
pub mod boot;
mod ctl;
mod disk;
mod error;
pub mod linux;
mod linux_site;
mod net;
mod serve;
pub mod session;
mod site;
mod sitefs;
pub mod state;
mod warm;

pub use assets::Assets;
pub use disk::{load_disk, Disk, DiskKind};
pub use error::WebError;
pub use serve::{serve, ServeOptions, ServeSource, Serving, DEFAULT_MAX_RELAYS};
pub use site::{build_site, prepare, PrepareOptions, PrepareReport, Site};
pub use warm::STATE_PART_SIZE;

/// Result type of this crate.
pub type Result<T, E = WebError> = std::result::Result<T, E>;
