//! VMDK text descriptors: recognising and parsing them (extent lines; parents refused),
//! resolving the extent file names they list, and writing the monolithicFlat one.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::util;
use crate::{Format, ImageError};

/// Descriptors are small text files; refuse to parse anything bigger.
const MAX_DESCRIPTOR: u64 = 64 << 10;

/// Does this look like the start of a VMDK text descriptor?
pub(super) fn looks_like_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start();
    t.starts_with("# Disk DescriptorFile") || (t.starts_with('#') && text.contains("createType="))
}

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
pub(super) struct ExtentLine {
    /// Extent size in 512-byte sectors.
    pub(super) sectors: u64,
    /// `FLAT`, `SPARSE`, `ZERO`, … as written.
    pub(super) kind: String,
    /// The extent file name as written (empty for `ZERO`).
    pub(super) file: String,
    /// Start of the extent in its file, in sectors (flat extents).
    pub(super) offset: u64,
}

/// What a descriptor says.
pub(super) struct Descriptor {
    /// `createType` (`monolithicFlat`, `twoGbMaxExtentSparse`, …).
    pub(super) create_type: String,
    /// The extents, in disk order.
    pub(super) extents: Vec<ExtentLine>,
}

/// Read and parse the text descriptor `file` (`len` bytes long) at `path`.
pub(super) fn read(path: &Path, file: &File, len: u64) -> Result<Descriptor, ImageError> {
    read_at(path, file, 0, len)?
        .ok_or_else(|| ImageError::corrupt(path, Format::Vmdk, "descriptor is empty"))
}

/// Read and parse the `len`-byte text descriptor at byte `start` of `file` (a separate
/// descriptor file, or the one embedded in a monolithicSparse file, NUL padded); `None` when it
/// is all NUL bytes.
pub(super) fn read_at(
    path: &Path,
    file: &File,
    start: u64,
    len: u64,
) -> Result<Option<Descriptor>, ImageError> {
    if len > MAX_DESCRIPTOR {
        return Err(ImageError::corrupt(
            path,
            Format::Vmdk,
            format!(
                "descriptor is {len} bytes; a VMDK text descriptor is at most {MAX_DESCRIPTOR}"
            ),
        ));
    }
    let mut raw = vec![0u8; len as usize];
    util::read_exact_at(file, path, &mut raw, start, Format::Vmdk)?;
    // The text ends at the first NUL (embedded descriptors are NUL padded).
    if let Some(nul) = raw.iter().position(|&b| b == 0) {
        raw.truncate(nul);
    }
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    let text = String::from_utf8(raw).map_err(|_| {
        ImageError::corrupt(path, Format::Vmdk, "descriptor is not valid UTF-8 text")
    })?;
    parse(path, &text).map(Some)
}

/// The access modes an extent line starts with.
const ACCESS: [&str; 3] = ["RW", "RDONLY", "NOACCESS"];

/// Whether `k` is a descriptor key (`createType`, `ddb.geometry.heads`, …).
fn is_key(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
}

/// Parse descriptor text strictly: every line is blank, a comment, an extent line or
/// `key = value`; anything else is refused, so no other reader can find something in the text
/// that kiln did not see. A parent (differencing disk), named anywhere in the text (even in a
/// comment, where other readers still look), is refused as unsupported.
fn parse(path: &Path, text: &str) -> Result<Descriptor, ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Vmdk, m);
    if text.contains("parentFileNameHint") {
        return Err(ImageError::unsupported(
            path,
            "VMDK with a parent (differencing disk) is not supported",
        ));
    }
    let mut create_type = String::new();
    let mut extents = Vec::new();
    for (no, line) in text.lines().enumerate() {
        // qemu pads descriptors with NULs; treat them as whitespace.
        let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains('\0') {
            return Err(bad(format!("line {}: contains a NUL byte", no + 1)));
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if !ACCESS.contains(&first) {
            let Some((k, v)) = line.split_once('=').filter(|(k, _)| is_key(k.trim())) else {
                return Err(bad(format!("line {}: cannot parse \"{line}\"", no + 1)));
            };
            let k = k.trim();
            let v = v.trim().trim_matches('"');
            match k {
                "createType" => create_type = v.to_string(),
                "parentCID" if !v.eq_ignore_ascii_case("ffffffff") => {
                    return Err(ImageError::unsupported(
                        path,
                        "VMDK with a parent (differencing disk) is not supported",
                    ))
                }
                _ => {}
            }
            continue;
        }
        // ACCESS SECTORS TYPE ["FILE" [OFFSET]]
        let (before, rest) = match line.split_once('"') {
            Some((b, r)) => (b, Some(r)),
            None => (line, None),
        };
        let words: Vec<&str> = before.split_whitespace().collect();
        if words.len() != 3 || !ACCESS.contains(&words[0]) {
            return Err(bad(format!("line {}: cannot parse \"{line}\"", no + 1)));
        }
        let sectors: u64 = words[1]
            .parse()
            .map_err(|_| bad(format!("line {}: bad extent size \"{}\"", no + 1, words[1])))?;
        let kind = words[2].to_string();
        let (file, offset) = match rest {
            Some(r) => {
                let (name, tail) = r
                    .split_once('"')
                    .ok_or_else(|| bad(format!("line {}: unterminated file name", no + 1)))?;
                let tail = tail.trim();
                let offset = if tail.is_empty() {
                    0
                } else {
                    tail.parse().map_err(|_| {
                        bad(format!("line {}: bad extent offset \"{tail}\"", no + 1))
                    })?
                };
                (name.to_string(), offset)
            }
            None => (String::new(), 0),
        };
        if file.is_empty() && kind != "ZERO" {
            return Err(bad(format!("line {}: {kind} extent names no file", no + 1)));
        }
        extents.push(ExtentLine {
            sectors,
            kind,
            file,
            offset,
        });
        if extents.len() > 4096 {
            return Err(bad("too many extents".into()));
        }
    }
    if extents.is_empty() {
        return Err(bad("descriptor lists no extents".into()));
    }
    Ok(Descriptor {
        create_type,
        extents,
    })
}

/// Open an extent file named in `descriptor`: a plain file name in the descriptor's own
/// directory, nothing else. Paths with a directory part (absolute, `..`, or a subdirectory, so
/// a descriptor saved in a home directory cannot name `.ssh/id_rsa`), symlinks and anything
/// but a regular file are refused.
pub(super) fn resolve_extent(descriptor: &Path, name: &str) -> Result<(PathBuf, File), ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let outside = || ImageError::ExtentOutsideDirectory {
        path: descriptor.to_path_buf(),
        extent: name.to_string(),
    };
    let rel = Path::new(name);
    let mut parts = rel.components();
    if !matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) || name.contains('/')
    {
        return Err(outside());
    }
    let candidate = util::parent_dir(descriptor).join(rel);
    // O_NOFOLLOW: a symlink (which could point anywhere) fails to open instead of being
    // followed, with no window between a check and the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&candidate)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                outside()
            } else {
                ImageError::io(
                    &candidate,
                    format!(
                        "cannot open VMDK extent referenced by {}",
                        descriptor.display()
                    ),
                    e,
                )
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| ImageError::io(&candidate, "cannot stat", e))?;
    // A FIFO or device would block or read endlessly; extents are regular files.
    if !meta.is_file() {
        return Err(ImageError::corrupt(
            descriptor,
            Format::Vmdk,
            format!("extent \"{name}\" is not a regular file"),
        ));
    }
    Ok((candidate, file))
}

/// A monolithicFlat descriptor for a `size`-byte disk in the flat extent `extent_name`.
pub(super) fn flat_text(size: u64, extent_name: &str) -> String {
    let sectors = size / 512;
    // Conventional BIOS geometry for IDE disks: 16 heads, 63 sectors.
    let cylinders = (sectors / (16 * 63)).clamp(1, 16383);
    let u = util::pseudo_uuid();
    let cid = u32::from_le_bytes([u[0], u[1], u[2], u[3]]);
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         \n\
         # Extent description\n\
         RW {sectors} FLAT \"{extent_name}\" 0\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"ide\"\n\
         ddb.uuid.image = \"{uuid}\"\n"
    )
}
