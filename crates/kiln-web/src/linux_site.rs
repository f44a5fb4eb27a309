//! The static site of a Linux image: v86 boots the kernel and initrd (fetched only for a cold
//! boot) with the root on the 9p filesystem, whose content files it fetches over HTTP when the
//! guest reads them; with a saved state (the image's own, checked, or `--warm`'s) the page
//! restores it instead, fetching neither the kernel nor the index. Every URL is relative.

use std::path::Path;

use crate::linux::{load_linux_image, Start};
use crate::site::{page_config, site_base, Site};
use crate::{state, warm, Assets, PrepareOptions, Result, WebError};

/// Builds the site of the Linux image directory `dir`.
pub(crate) fn build(dir: &Path, opts: &PrepareOptions, assets: &Assets) -> Result<Site> {
    let img = load_linux_image(dir)?;
    let mut site = site_base(assets)?;
    let memory = opts
        .memory_mib
        .map(|m| u64::from(m) << 20)
        .unwrap_or(img.memory_size);
    site.insert("fs.json", img.index.clone());
    for blob in &img.blobs {
        let p = img.files.join(blob);
        let len = std::fs::metadata(&p)
            .map_err(|e| WebError::io(&p, "read", e))?
            .len();
        site.insert_file(format!("fs/{blob}"), p, len);
    }
    if let Some(k) = &img.kernel {
        site.insert("boot/vmlinuz", k.read()?);
    }
    if let Some(i) = &img.initrd {
        site.insert("boot/initrd.img", i.read()?);
    }
    let mut config = page_config(&img.name, memory);
    config["kind"] = "linux".into();
    config["cmdline"] = img.cmdline.clone().into();
    config["bzimage"] = img.kernel.as_ref().map(|_| "boot/vmlinuz").into();
    config["initrd"] = img.initrd.as_ref().map(|_| "boot/initrd.img").into();
    config["filesystem"] = serde_json::json!({ "basefs": "fs.json", "baseurl": "fs/" });
    config["mac_address_translation"] = true.into();
    let shipped = if let Some(marker) = &opts.warm {
        let scratch = kiln_sys::temp::TempDir::beside(&std::env::temp_dir().join("kiln-warm"))
            .map_err(|e| WebError::io(std::env::temp_dir(), "create temp dir", e))?;
        let job = img.job(assets, scratch.path(), memory, Start::Cold)?;
        let (raw, serial, ms) = warm::boot_and_save(assets, job, marker, opts.warm_timeout)
            .map_err(|e| WebError::Warm {
                image: dir.to_path_buf(),
                msg: e.to_string(),
            })?;
        let (raw, _) = state::check_state(Path::new("the warm boot's state"), &raw, &img)?;
        Some((raw, Some(marker.as_str()), serial, Some(ms)))
    } else {
        img.saved_state()?
            .map(|(raw, _)| (raw, None, String::new(), None))
    };
    if shipped.is_none() && img.kernel.is_none() {
        img.require_kernel()?;
    }
    if let Some((raw, marker, serial, ms)) = shipped {
        let z = state::compress(&raw, state::LEVEL)?;
        for (name, content) in warm::state_files(&z, raw.len() as u64, marker, &serial, ms)? {
            site.insert(format!("state/{name}"), content);
        }
        config["state"] = "state/manifest.json".into();
    }
    site.insert(
        "kiln.json",
        serde_json::to_vec_pretty(&config).map_err(|e| WebError::bad(dir, e.to_string()))?,
    );
    Ok(site)
}
