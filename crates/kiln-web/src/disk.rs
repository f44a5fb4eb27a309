//! Reading any image kiln understands into the raw bytes v86 boots, and deciding how to attach it.

use std::path::{Path, PathBuf};

use kiln_image::Format;

use crate::{Result, WebError};

/// Largest disk a page loads: v86 keeps the whole image in browser memory.
const MAX_DISK: u64 = 512 << 20;

/// How the page attaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    /// First IDE hard disk.
    Hda,
    /// First floppy drive (floppy-sized images).
    Fda,
    /// CD-ROM (ISO images), booted through El Torito.
    Cdrom,
}

impl DiskKind {
    /// v86's option for the drive (`hda`, `fda`, `cdrom`).
    pub fn v86_option(self) -> &'static str {
        match self {
            DiskKind::Hda => "hda",
            DiskKind::Fda => "fda",
            DiskKind::Cdrom => "cdrom",
        }
    }
}

/// A disk image read into memory as v86 needs it.
#[derive(Clone, Debug)]
pub struct Disk {
    /// The image as given.
    pub path: PathBuf,
    /// Its on-disk format (non-raw formats are converted to raw bytes).
    pub format: Format,
    /// How it is attached.
    pub kind: DiskKind,
    /// The raw disk content.
    pub bytes: Vec<u8>,
    /// File name in the site: the image's stem plus `.img` or `.iso`.
    pub file_name: String,
}

/// Read `path` (raw, ISO, QCOW2, VMDK, VHD or VDI) into raw bytes and check that it can boot:
/// an ISO needs an El Torito boot record, other images a 0x55AA boot signature.
pub fn load_disk(path: &Path) -> Result<Disk> {
    let meta = std::fs::metadata(path).map_err(|e| WebError::io(path, "open image", e))?;
    if meta.is_dir() {
        return Err(WebError::NotBootable {
            path: path.to_path_buf(),
            why: "is a directory, not a disk image".into(),
        });
    }
    let mut reader = kiln_image::open(path)?;
    let format = reader.format();
    let size = reader.virtual_size();
    if size < 512 {
        return Err(WebError::NotBootable {
            path: path.to_path_buf(),
            why: format!("{size} bytes is smaller than one 512-byte sector"),
        });
    }
    if size > MAX_DISK {
        return Err(WebError::NotBootable {
            path: path.to_path_buf(),
            why: format!(
                "virtual size {size} bytes is over the {} MiB a browser page can hold",
                MAX_DISK >> 20
            ),
        });
    }
    let len = usize::try_from(size).map_err(|_| WebError::NotBootable {
        path: path.to_path_buf(),
        why: "too large for this platform".into(),
    })?;
    let mut bytes = vec![0u8; len];
    reader.read_at(&mut bytes, 0)?;

    // The one rule every engine uses decides the media; v86 then checks what it needs of it.
    let kind = match kiln_image::boot_media(format, size) {
        kiln_image::BootMedia::Cdrom => {
            if !has_el_torito(&bytes) {
                return Err(WebError::NotBootable {
                    path: path.to_path_buf(),
                    why: "ISO has no El Torito boot record".into(),
                });
            }
            DiskKind::Cdrom
        }
        media => {
            if bytes[510..512] != [0x55, 0xAA] {
                return Err(WebError::NotBootable {
                    path: path.to_path_buf(),
                    why: "no boot signature 0x55AA at the end of sector 0".into(),
                });
            }
            if media == kiln_image::BootMedia::Floppy {
                DiskKind::Fda
            } else {
                DiskKind::Hda
            }
        }
    };
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(sanitize)
        .unwrap_or_else(|| "disk".into());
    let file_name = format!(
        "{stem}.{}",
        if kind == DiskKind::Cdrom {
            "iso"
        } else {
            "img"
        }
    );
    Ok(Disk {
        path: path.to_path_buf(),
        format,
        kind,
        bytes,
        file_name,
    })
}

/// URL-safe file name: keep `[A-Za-z0-9._-]`, replace the rest.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// An El Torito boot record volume descriptor in the ISO's volume descriptor set (sector 16 on).
fn has_el_torito(iso: &[u8]) -> bool {
    for sector in 16..64usize {
        let off = sector * 2048;
        let Some(vd) = iso.get(off..off + 71) else {
            return false;
        };
        if &vd[1..6] != b"CD001" {
            return false;
        }
        match vd[0] {
            0 if &vd[7..30] == b"EL TORITO SPECIFICATION" => return true,
            255 => return false,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_size_and_signature() {
        let dir = tempfile::tempdir().unwrap();
        let mut sector = vec![0u8; 512];
        sector[510] = 0x55;
        sector[511] = 0xAA;
        let hd = dir.path().join("boot.img");
        let mut b = sector.clone();
        b.resize(1 << 20, 0);
        std::fs::write(&hd, &b).unwrap();
        assert_eq!(load_disk(&hd).unwrap().kind, DiskKind::Hda);
        let fd = dir.path().join("floppy img.img");
        b.resize(1440 << 10, 0);
        std::fs::write(&fd, &b).unwrap();
        let d = load_disk(&fd).unwrap();
        assert_eq!(d.kind, DiskKind::Fda);
        assert_eq!(d.file_name, "floppy_img.img");
        let bad = dir.path().join("zero.img");
        std::fs::write(&bad, vec![0u8; 4096]).unwrap();
        let e = load_disk(&bad).unwrap_err().to_string();
        assert!(e.contains("not bootable") && e.contains("0x55AA"), "{e}");
        let e = load_disk(&dir.path().join("nope.img"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.img"), "{e}");
    }
}
