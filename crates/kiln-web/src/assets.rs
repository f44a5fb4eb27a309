//! Finding the files a site needs: the page's own sources (compiled in), npm packages (v86,
//! xterm.js) under `web/node_modules`, and SeaBIOS from Debian's seabios package.

use std::path::{Path, PathBuf};

use crate::{Result, WebError};

/// The page sources, compiled in from the repository's `web/src` (they are kiln's own code).
pub(crate) const INDEX_HTML: &str = include_str!("../../../web/src/index.html");
pub(crate) const KILN_JS: &str = include_str!("../../../web/src/kiln.js");
pub(crate) const V86_MJS: &str = include_str!("../../../web/src/v86.mjs");

const NPM_HINT: &str = "install the page's npm packages with `npm ci` in kiln's web/ directory (scripts/setup does it), or point KILN_WEB_DIR at a directory holding node_modules";
const SEABIOS_HINT: &str =
    "install Debian's seabios package (`apt-get install seabios`), or point KILN_SEABIOS_DIR at a directory holding bios.bin and vgabios-stdvga.bin";

/// Where the run-time assets live.
#[derive(Debug, Clone)]
pub struct Assets {
    /// A directory containing `node_modules/v86` and `node_modules/@xterm/xterm`.
    pub web_dir: PathBuf,
    /// A directory containing SeaBIOS's `bios.bin` and `vgabios-stdvga.bin`.
    pub seabios_dir: PathBuf,
}

/// One asset: its name in the site and where it comes from.
pub(crate) struct AssetFile {
    pub site_path: &'static str,
    pub source: PathBuf,
    pub hint: &'static str,
}

impl Assets {
    /// Find the asset directories: `$KILN_WEB_DIR`, else the `web/` directory of the source
    /// tree kiln was built from, else a `web/` (or `share/kiln/web`) beside or above the running
    /// executable; `$KILN_SEABIOS_DIR`, else `/usr/share/seabios`. Nothing is checked here
    /// beyond choosing the first candidate that has v86: [`Assets::files`] reads and checks.
    pub fn locate() -> Assets {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(d) = std::env::var_os("KILN_WEB_DIR") {
            candidates.push(PathBuf::from(d));
        }
        candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web"));
        if let Ok(exe) = std::env::current_exe() {
            for a in exe.ancestors().skip(1).take(4) {
                candidates.push(a.join("web"));
                candidates.push(a.join("share/kiln/web"));
            }
        }
        let has_v86 = |d: &Path| d.join("node_modules/v86/build/libv86.js").is_file();
        let web_dir = candidates
            .iter()
            .find(|d| has_v86(d))
            .or(candidates.first())
            .cloned()
            .unwrap_or_else(|| PathBuf::from("web"));
        let web_dir = web_dir.canonicalize().unwrap_or(web_dir);
        let seabios_dir = std::env::var_os("KILN_SEABIOS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/share/seabios"));
        Assets {
            web_dir,
            seabios_dir,
        }
    }

    fn npm(&self, rel: &str) -> PathBuf {
        self.web_dir.join("node_modules").join(rel)
    }

    /// A file of the npm packages (`v86/build/v86.wasm`).
    pub(crate) fn npm_file(&self, rel: &str) -> PathBuf {
        self.npm(rel)
    }

    /// The v86 ES module used under Node (kiln boot, `--warm`).
    pub(crate) fn libv86_mjs(&self) -> PathBuf {
        self.npm("v86/build/libv86.mjs")
    }

    /// Every binary asset a site ships, by site path.
    pub(crate) fn files(&self) -> Vec<AssetFile> {
        let npm = |site_path, rel| AssetFile {
            site_path,
            source: self.npm(rel),
            hint: NPM_HINT,
        };
        let bios = |site_path, name| AssetFile {
            site_path,
            source: self.seabios_dir.join(name),
            hint: SEABIOS_HINT,
        };
        vec![
            npm("libv86.js", "v86/build/libv86.js"),
            npm("v86.wasm", "v86/build/v86.wasm"),
            // The ESM build is a quarter smaller than the UMD one (88 vs 121 KiB gzip'd).
            npm("xterm.mjs", "@xterm/xterm/lib/xterm.mjs"),
            npm("xterm.css", "@xterm/xterm/css/xterm.css"),
            bios("bios/seabios.bin", "bios.bin"),
            bios("bios/vgabios.bin", "vgabios-stdvga.bin"),
        ]
    }

    /// Read one asset, or fail naming it and how to install it.
    pub(crate) fn read(file: &AssetFile) -> Result<Vec<u8>> {
        match std::fs::read(&file.source) {
            Ok(b) if !b.is_empty() => Ok(b),
            Ok(_) => Err(WebError::MissingAsset {
                name: file.site_path.to_string(),
                path: file.source.clone(),
                hint: format!("it is empty; {}", file.hint),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(WebError::MissingAsset {
                name: file.site_path.to_string(),
                path: file.source.clone(),
                hint: file.hint.to_string(),
            }),
            Err(e) => Err(WebError::io(&file.source, "read asset", e)),
        }
    }

    /// Check that every asset exists (without reading it): the first missing one is an error.
    pub fn check(&self) -> Result<()> {
        for f in self.files() {
            if !f.source.is_file() {
                return Err(WebError::MissingAsset {
                    name: f.site_path.to_string(),
                    path: f.source,
                    hint: f.hint.to_string(),
                });
            }
        }
        Ok(())
    }
}
