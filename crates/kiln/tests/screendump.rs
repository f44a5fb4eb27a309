//! `kiln screendump NAME FILE.png` on both engines: the builtin VMM renders its text screen
//! with an 8x16 font, QEMU takes its own picture. Different fonts, same text: each dump, cut
//! into 80x25 cells, shows the banner row (nine glyphs, `ClientAPI`, then nothing) followed by
//! the prompt row (`$` first).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{kiln_in, kvm_or_skip, require_tool, start_disk_vm, wait_for, KillOnDrop};

/// Which of the 80x25 text cells of a PNG screen hold any lit pixel.
fn cells(png_file: &Path) -> Vec<Vec<bool>> {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_file).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    let px = info.color_type.samples();
    assert!(w % 80 == 0 && h % 25 == 0, "{w}x{h} is not a text screen");
    let (cw, ch) = (w / 80, h / 25);
    (0..25)
        .map(|row| {
            (0..80)
                .map(|col| {
                    (0..ch).any(|y| {
                        (0..cw).any(|x| {
                            let at = ((row * ch + y) * w + col * cw + x) * px;
                            buf[at..at + 3].iter().any(|&v| v > 0x40)
                        })
                    })
                })
                .collect()
        })
        .collect()
}

fn shows_the_banner_and_prompt(engine: &str) {
    let home = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(home.path().to_path_buf());
    let name = format!("shot-{engine}");
    let rec = start_disk_vm(home.path(), &name, engine);
    let log = rec.meta.log.clone().expect("a serial log");
    wait_for("the prompt", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("$ ")
    });
    let png_file = home.path().join("screen.png");
    let out = kiln_in(
        home.path(),
        &["screendump", &name, png_file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen = cells(&png_file);
    let banner: Vec<bool> = (0..80).map(|c| c < 9).collect();
    let at = screen
        .iter()
        .position(|row| *row == banner)
        .unwrap_or_else(|| panic!("{engine}: no row shows just `ClientAPI`: {screen:?}"));
    assert!(screen[at + 1][0], "{engine}: no `$` under the banner");
    assert!(
        screen[at + 1][3..].iter().all(|lit| !lit),
        "{engine}: the prompt row shows more than `$ `"
    );
    // Asking for a VM that does not run is a clear error, and writes nothing.
    let out = kiln_in(
        home.path(),
        &["screendump", "nope", png_file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn screendump_builtin() {
    if kvm_or_skip("screendump on the builtin VMM") {
        shows_the_banner_and_prompt("builtin");
    }
}

#[test]
fn screendump_qemu() {
    require_tool("qemu-system-x86_64");
    shows_the_banner_and_prompt("qemu");
}
