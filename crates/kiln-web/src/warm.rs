//! `--warm`: boot the disk in v86 under Node until a marker appears on serial, save the machine
//! state, compress it with zstd and split it into parts listed by a manifest.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::assets::{self, Assets};
use crate::disk::Disk;
use crate::{Result, WebError};

/// Size of each state part (static hosts often limit file sizes).
pub const STATE_PART_SIZE: usize = 10 << 20;

/// Returns the files of `state/`: `manifest.json` and `state.bin.zst.NNN`.
pub(crate) fn warm_state(
    assets: &Assets,
    disk: &Disk,
    config: &serde_json::Value,
    marker: &str,
    timeout: Duration,
) -> Result<Vec<(String, Vec<u8>)>> {
    let err = |msg: String| WebError::Warm {
        image: disk.path.clone(),
        msg,
    };
    if marker.is_empty() {
        return Err(err("the `warm` marker is empty".into()));
    }
    let libv86 = assets.libv86_mjs();
    if !libv86.is_file() {
        return Err(WebError::MissingAsset {
            name: "libv86.mjs".into(),
            path: libv86,
            hint: "install the page's npm packages with `npm ci` in kiln's web/ directory".into(),
        });
    }
    // In the temp directory under a name recording this process: a warm boot killed half-way
    // (it holds a copy of the disk) is swept by the next one.
    let scratch = std::env::temp_dir().join("kiln-warm");
    let tmp = kiln_sys::temp::TempDir::beside(&scratch)
        .map_err(|e| WebError::io(&scratch, "create temp dir", e))?;
    let script = tmp.path().join("warm.mjs");
    let disk_file = tmp.path().join("disk");
    let state_file = tmp.path().join("state.bin");
    let job_file = tmp.path().join("job.json");
    std::fs::write(&script, assets::WARM_MJS).map_err(|e| WebError::io(&script, "write", e))?;
    std::fs::write(&disk_file, &disk.bytes).map_err(|e| WebError::io(&disk_file, "write", e))?;
    let files = assets.files();
    let src = |site: &str| -> PathBuf {
        files
            .iter()
            .find(|f| f.site_path == site)
            .map(|f| f.source.clone())
            .unwrap_or_default()
    };
    let job = serde_json::json!({
        "libv86": libv86,
        "wasm": src("v86.wasm"),
        "bios": src("bios/seabios.bin"),
        "vga_bios": src("bios/vgabios.bin"),
        "disk": disk_file,
        "config": config,
        "marker": marker,
        "timeout_ms": timeout.as_millis() as u64,
        "out_state": state_file,
    });
    std::fs::write(&job_file, job.to_string()).map_err(|e| WebError::io(&job_file, "write", e))?;

    let node = std::env::var_os("KILN_NODE").unwrap_or_else(|| "node".into());
    let mut child = Command::new(&node)
        .arg(&script)
        .arg(&job_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            err(format!(
                "cannot run {}: {e}; `warm` boots the image in v86 under Node.js (apt-get install nodejs)",
                node.to_string_lossy()
            ))
        })?;
    // The script has its own timer; this one guards against a wedged Node.
    let deadline = Instant::now() + timeout + Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!(
                    "Node did not finish within {} s",
                    timeout.as_secs() + 30
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(err(format!("waiting for Node: {e}"))),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    if !status.success() {
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        return Err(err(format!("v86 under Node failed ({status}): {last}")));
    }
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        err(format!(
            "unexpected output from the warm script ({e}): {}",
            stdout.trim()
        ))
    })?;
    let raw =
        std::fs::read(&state_file).map_err(|e| WebError::io(&state_file, "read saved state", e))?;
    let compressed = zstd::bulk::compress(&raw, 19).map_err(|e| err(format!("zstd: {e}")))?;
    let mut out = Vec::new();
    let mut parts = Vec::new();
    for (i, chunk) in compressed.chunks(STATE_PART_SIZE).enumerate() {
        let name = format!("state.bin.zst.{i:03}");
        parts.push(serde_json::json!({ "url": name, "size": chunk.len() }));
        out.push((name, chunk.to_vec()));
    }
    let manifest = serde_json::json!({
        "kiln_state": 1,
        "marker": marker,
        "compression": "zstd",
        "size": compressed.len(),
        "raw_size": raw.len(),
        "part_size": STATE_PART_SIZE,
        "parts": parts,
        "serial": result["serial"],
        "boot_ms": result["ms"],
    });
    out.push((
        "manifest.json".into(),
        serde_json::to_vec_pretty(&manifest).map_err(|e| err(format!("manifest: {e}")))?,
    ));
    Ok(out)
}
