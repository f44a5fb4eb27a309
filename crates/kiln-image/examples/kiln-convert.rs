//! Minimal converter for benchmarking against `qemu-img convert`:
//! `kiln-convert INPUT OUTPUT FORMAT` (set KILN_NO_FSYNC=1 to skip the fsync).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: kiln-convert INPUT OUTPUT FORMAT");
        std::process::exit(2);
    }
    let format: kiln_image::Format = match args[3].parse() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let start = std::time::Instant::now();
    // KILN_NO_FSYNC=1 skips the final fsync, like qemu-img (for like-for-like timing).
    let opts = kiln_image::WriteOptions {
        fsync: std::env::var_os("KILN_NO_FSYNC").is_none(),
    };
    if let Err(e) = kiln_image::convert_with(
        std::path::Path::new(&args[1]),
        std::path::Path::new(&args[2]),
        format,
        &opts,
        &mut |_, _| {},
    ) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    eprintln!("converted in {:.3}s", start.elapsed().as_secs_f64());
}
