//! `--warm`: boot under Node until a marker appears on serial, save the machine state, and
//! ship it as zstd in parts listed by a manifest. The parts are also how a Linux image's own
//! saved state is published.

use std::time::Duration;

use crate::assets::Assets;
use crate::session::{Job, Session};
use crate::{Result, WebError};

/// Size of each state part (static hosts often limit file sizes).
pub const STATE_PART_SIZE: usize = 10 << 20;

/// Boots `job` until `marker` appears on serial and returns the raw state with the serial
/// output so far and the milliseconds it took.
pub(crate) fn boot_and_save(
    assets: &Assets,
    job: Job,
    marker: &str,
    timeout: Duration,
) -> Result<(Vec<u8>, String, u64)> {
    if marker.is_empty() {
        return Err(WebError::BadOption {
            field: "warm",
            msg: "the marker is empty".into(),
        });
    }
    let t0 = std::time::Instant::now();
    let mut s = Session::start(assets, job)?;
    let mut serial = s.wait_for(marker, timeout, &mut |_| {})?;
    let raw = s.save(Duration::from_secs(60), &mut |b| {
        serial.push_str(&String::from_utf8_lossy(b))
    })?;
    s.quit();
    Ok((raw, serial, t0.elapsed().as_millis() as u64))
}

/// The files of `state/`: `manifest.json` and `state.bin.zst.NNN` (`compressed` is zstd).
pub(crate) fn state_files(
    compressed: &[u8],
    raw_size: u64,
    marker: Option<&str>,
    serial: &str,
    boot_ms: Option<u64>,
) -> Result<Vec<(String, Vec<u8>)>> {
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
        "raw_size": raw_size,
        "part_size": STATE_PART_SIZE,
        "parts": parts,
        "serial": serial,
        "boot_ms": boot_ms,
    });
    out.push((
        "manifest.json".into(),
        serde_json::to_vec_pretty(&manifest)
            .map_err(|e| WebError::bad("state/manifest.json", e.to_string()))?,
    ));
    Ok(out)
}
