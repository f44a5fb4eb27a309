//! Writes `boot.bin` (the program) and `boot.img` (1 MiB raw disk, boot sector
//! first) into the directory given as the first argument (default: `.`).
use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let dir = PathBuf::from(env::args().nth(1).unwrap_or_else(|| ".".into()));
    match run(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_boot: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let program = kiln_boot::program()?;
    let report = kiln_boot::check(&program)?;
    let sector = kiln_boot::boot_sector(&program)?;
    let mut image = vec![0u8; 1 << 20];
    image[..sector.len()].copy_from_slice(&sector);
    let bin = dir.join("boot.bin");
    let img = dir.join("boot.img");
    fs::write(&bin, &program).map_err(|e| format!("{}: {e}", bin.display()))?;
    fs::write(&img, &image).map_err(|e| format!("{}: {e}", img.display()))?;
    println!(
        "program {} bytes ({} free); wrote {} and {}",
        report.size,
        report.free,
        bin.display(),
        img.display()
    );
    Ok(())
}
