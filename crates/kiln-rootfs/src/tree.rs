//! Root trees: copying one exactly (owners, modes, symlinks, hard links, device nodes), finding
//! a path inside one as its own processes would (symlinks followed within the root, never on
//! the host), and telling the architecture of its binaries from their ELF headers.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::{io_at, refused, RootfsError};

/// Most symlinks followed while resolving one path (Linux's own limit).
const MAX_HOPS: u32 = 40;

/// What [`resolve`] does with a missing directory on the way.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Make it (unpacking a layer whose parent directories are implied).
    Make,
    /// Stop: the path does not exist.
    Fail,
}

/// Resolves `rel` inside `root` as the image's processes see it: symlinks are followed within
/// the root (an absolute target starts again at the root, `..` stops at it), at most 40 of
/// them; every component, the last included, is followed. Returns the resolved path relative to
/// the root; `Ok(None)` when something on the way is missing (with [`Missing::Fail`]).
pub(crate) fn resolve(
    root: &Path,
    rel: &Path,
    missing: Missing,
    context: &Path,
) -> Result<Option<PathBuf>, RootfsError> {
    let mut todo = parts(rel);
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let full = root.join(&next);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(refused(
                        context,
                        format!("'{}': too many levels of symbolic links", rel.display()),
                    ));
                }
                let to = fs::read_link(&full).map_err(io_at(&full, "cannot read"))?;
                let mut parts = parts(&to);
                if to.is_absolute() {
                    cur = PathBuf::new();
                }
                parts.extend(todo.drain(..));
                todo = parts;
            }
            Ok(m) if m.is_dir() || todo.is_empty() => cur = next,
            Ok(_) => {
                return Err(refused(
                    context,
                    format!(
                        "'{}': '{}' is not a directory",
                        rel.display(),
                        next.display()
                    ),
                ))
            }
            Err(_) if missing == Missing::Fail => return Ok(None),
            Err(_) => {
                fs::create_dir(&full).map_err(io_at(&full, "cannot create"))?;
                cur = next;
            }
        }
    }
    Ok(Some(cur))
}

/// The names and `..`s of a path, in order (`/` and `.` dropped).
fn parts(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Copies the tree `src` to `dest` (which must not exist) exactly: contents, owners (as root),
/// modes, symlinks (never followed), hard links (as links), device nodes and FIFOs. Sockets are
/// skipped: they are not files.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<(), RootfsError> {
    let meta = fs::symlink_metadata(src).map_err(io_at(src, "cannot read"))?;
    if !meta.is_dir() {
        return Err(refused(src, "not a directory"));
    }
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    copy_entry(src, dest, &meta, &mut links)
}

fn copy_entry(
    src: &Path,
    dest: &Path,
    meta: &fs::Metadata,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), RootfsError> {
    let t = meta.file_type();
    let made = |r: std::io::Result<()>| r.map_err(io_at(dest, "cannot create"));
    if t.is_dir() {
        made(fs::create_dir(dest))?;
        for e in sorted_entries(src)? {
            let p = e.path();
            let m = fs::symlink_metadata(&p).map_err(io_at(&p, "cannot read"))?;
            copy_entry(&p, &dest.join(e.file_name()), &m, links)?;
        }
    } else if t.is_symlink() {
        let to = fs::read_link(src).map_err(io_at(src, "cannot read"))?;
        made(symlink(to, dest))?;
    } else if t.is_file() {
        if meta.nlink() > 1 {
            if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                return made(fs::hard_link(first, dest));
            }
            links.insert((meta.dev(), meta.ino()), dest.to_path_buf());
        }
        let mut from = fs::File::open(src).map_err(io_at(src, "cannot open"))?;
        let mut to = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(io_at(dest, "cannot create"))?;
        std::io::copy(&mut from, &mut to).map_err(io_at(src, "cannot copy"))?;
    } else if t.is_fifo() || t.is_char_device() || t.is_block_device() {
        let (major, minor) = kiln_sys::fs::split_dev(meta.rdev());
        let node = if t.is_fifo() {
            kiln_sys::fs::Node::Fifo
        } else if t.is_char_device() {
            kiln_sys::fs::Node::Char { major, minor }
        } else {
            kiln_sys::fs::Node::Block { major, minor }
        };
        made(kiln_sys::fs::mknod(dest, node, meta.mode() & 0o7777))?;
    } else {
        return Ok(()); // a socket
    }
    if kiln_sys::process::is_root() {
        std::os::unix::fs::lchown(dest, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_at(dest, "cannot chown"))?;
    }
    if !t.is_symlink() {
        fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_at(dest, "cannot chmod"))?;
    }
    Ok(())
}

/// The entries of the directory `dir`, sorted by name (so what is written from a tree does not
/// depend on the order the file system lists it in).
pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<fs::DirEntry>, RootfsError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_at(dir, "cannot read"))?
        .collect::<Result<_, _>>()
        .map_err(io_at(dir, "cannot read"))?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// A CPU architecture of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// 32-bit x86: what v86 runs.
    I386,
    Amd64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::I386 => "i386",
            Arch::Amd64 => "amd64",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Arch, String> {
        match s {
            "i386" | "i686" | "386" | "x86" => Ok(Arch::I386),
            "amd64" | "x86_64" => Ok(Arch::Amd64),
            _ => Err(format!(
                "unknown architecture '{s}' (expected i386 or amd64)"
            )),
        }
    }
}

/// The architecture of the tree's `/bin/sh` (found as the image would find it), from its ELF
/// header. The error names what is wrong: no `/bin/sh`, not ELF, another CPU.
pub fn arch_of(root: &Path) -> Result<Arch, RootfsError> {
    let Some(sh) = resolve(root, Path::new("bin/sh"), Missing::Fail, root)? else {
        return Err(refused(root, "has no /bin/sh: not a root filesystem"));
    };
    let path = root.join(&sh);
    let mut head = [0u8; 20];
    let n = fs::File::open(&path)
        .and_then(|f| f.take(20).read(&mut head))
        .map_err(io_at(&path, "cannot read"))?;
    if n < 20 || &head[..4] != b"\x7fELF" {
        return Err(refused(
            root,
            format!("/bin/sh (/{}) is not an ELF binary", sh.display()),
        ));
    }
    // e_machine at offset 18, in the file's byte order (EI_DATA: 1 little, 2 big).
    let machine = if head[5] == 2 {
        u16::from_be_bytes([head[18], head[19]])
    } else {
        u16::from_le_bytes([head[18], head[19]])
    };
    match machine {
        3 => Ok(Arch::I386),
        62 => Ok(Arch::Amd64),
        m => Err(refused(
            root,
            format!("/bin/sh is built for ELF machine {m}, neither i386 nor amd64"),
        )),
    }
}
