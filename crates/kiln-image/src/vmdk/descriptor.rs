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
    util::read_exact_at(file, path, &mut raw, 0, Format::Vmdk)?;
    let text = String::from_utf8(raw).map_err(|_| {
        ImageError::corrupt(path, Format::Vmdk, "descriptor is not valid UTF-8 text")
    })?;
    parse(path, &text)
}

/// Parse descriptor text; a parent (differencing disk) is refused as unsupported.
fn parse(path: &Path, text: &str) -> Result<Descriptor, ImageError> {
    let bad = |m: String| ImageError::corrupt(path, Format::Vmdk, m);
    let mut create_type = String::new();
    let mut extents = Vec::new();
    for (no, line) in text.lines().enumerate() {
        // qemu pads descriptors with NULs; treat them as whitespace.
        let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
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
                "parentFileNameHint" => {
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
        if words.len() != 3 || !["RW", "RDONLY", "NOACCESS"].contains(&words[0]) {
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

/// Resolve an extent file name relative to the descriptor, refusing anything that escapes the
/// descriptor's directory (absolute paths, `..`, symlinks pointing elsewhere).
pub(super) fn resolve_extent(descriptor: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let outside = || ImageError::ExtentOutsideDirectory {
        path: descriptor.to_path_buf(),
        extent: name.to_string(),
    };
    let rel = Path::new(name);
    if name.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(outside());
    }
    let dir = util::parent_dir(descriptor);
    let candidate = dir.join(rel);
    let canon_dir = dir
        .canonicalize()
        .map_err(|e| ImageError::io(&dir, "cannot resolve directory", e))?;
    let canon = candidate.canonicalize().map_err(|e| {
        ImageError::io(
            &candidate,
            format!(
                "cannot open VMDK extent referenced by {}",
                descriptor.display()
            ),
            e,
        )
    })?;
    if !canon.starts_with(&canon_dir) {
        return Err(outside());
    }
    // Opening a FIFO or device would block or read endlessly; extents are regular files.
    let meta =
        std::fs::metadata(&canon).map_err(|e| ImageError::io(&candidate, "cannot stat", e))?;
    if !meta.is_file() {
        return Err(ImageError::corrupt(
            descriptor,
            Format::Vmdk,
            format!("extent \"{name}\" is not a regular file"),
        ));
    }
    Ok(candidate)
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
