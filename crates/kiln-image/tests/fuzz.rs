//! A mutation fuzzer with a fixed time budget: images of every structured format (written by
//! qemu-img and by kiln) are mutated at random — bytes, bits, table entries, lengths — and each
//! mutant goes through `inspect` and `convert`. Required, for every mutant:
//! - no panic, and each call returns within two seconds;
//! - `inspect` and `convert` agree: an image `convert` rejects is never called consistent;
//! - a conversion's output holds no more than the input's real data (nothing multiplied).
//!
//! `KILN_FUZZ_SECS` sets the budget per seed image (default 8 s; run with e.g. 600 for a
//! longer hunt), `KILN_FUZZ_SEED` replays a run. A failing mutant is kept and its path printed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kiln_image::{convert_with, inspect, Format, WriteOptions};

const LIMIT: Duration = Duration::from_secs(2);

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Values that tend to break table walkers.
fn interesting(r: &mut Rng, len: u64) -> u64 {
    match r.below(10) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u32::MAX as u64,
        4 => len,
        5 => len / 512,
        6 => r.below(len.max(1)) & !511,
        7 => 1 << r.below(63),
        8 => r.below(64),
        _ => r.next(),
    }
}

/// Mutates `img` in place: 1 to 8 edits, mostly in the first 64 KiB and the last 4 KiB (where
/// headers, footers and tables live).
fn mutate(r: &mut Rng, img: &mut Vec<u8>) {
    for _ in 0..1 + r.below(8) {
        let len = img.len() as u64;
        if len == 0 {
            img.push(0);
            continue;
        }
        let at = match r.below(10) {
            0..=5 => r.below(len.min(64 << 10)),
            6 | 7 => len - 1 - r.below(len.min(4096)),
            _ => r.below(len),
        } as usize;
        match r.below(8) {
            0 => img[at] = r.next() as u8,
            1 => img[at] ^= 1 << r.below(8),
            2 | 3 => {
                let v = interesting(r, len);
                let bytes = if r.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let n = if r.below(2) == 0 { 4 } else { 8 };
                let src = if bytes[0] == 0 && n == 4 {
                    &bytes[4..]
                } else {
                    &bytes[..n]
                };
                for (i, b) in src.iter().enumerate() {
                    if let Some(x) = img.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            4 => {
                // Copy a 512-byte run over another (duplicated table entries, repeated headers).
                let from = r.below(len) as usize;
                let n = 512.min(img.len() - from).min(img.len() - at);
                let run = img[from..from + n].to_vec();
                img[at..at + n].copy_from_slice(&run);
            }
            5 => img.truncate(at.max(1)),
            6 => img.resize(img.len() + r.below(1 << 16) as usize, 0),
            _ => img[at] = 0,
        }
    }
}

/// A seed image of `name` in `dir`, made by `make`.
struct Seed {
    name: &'static str,
    path: PathBuf,
    /// Extra files the image needs beside it (a flat VMDK's extent), copied with each mutant.
    companions: Vec<PathBuf>,
}

fn seed_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("seed.raw");
    make_sparse(
        &raw,
        4 * MIB,
        &[(0, 4096), (MIB, 70_000), (3 * MIB + 512, 1000)],
    );
    raw
}

fn qemu_seed(dir: &Path, name: &'static str, fmt: &str, opts: &[&str]) -> Seed {
    let raw = seed_raw(dir);
    let path = dir.join(name);
    let mut args = vec!["convert", "-O", fmt];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[p(&raw), p(&path)]);
    qemu_img_ok(&args);
    Seed {
        name,
        path,
        companions: Vec::new(),
    }
}

fn kiln_seed(dir: &Path, name: &'static str, format: Format) -> Seed {
    let raw = seed_raw(dir);
    let path = dir.join(name);
    convert_with(
        &raw,
        &path,
        format,
        &WriteOptions { fsync: false },
        &mut |_, _| {},
    )
    .unwrap();
    let flat = dir.join(name.replace(".vmdk", "-flat.vmdk"));
    Seed {
        name,
        path,
        companions: if format == Format::Vmdk {
            vec![flat]
        } else {
            vec![]
        },
    }
}

fn budget() -> Duration {
    let secs = std::env::var("KILN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    Duration::from_secs_f64(secs)
}

fn fuzz(make: impl FnOnce(&Path) -> Seed) {
    let seeds = tempfile::tempdir().unwrap();
    let seed = make(seeds.path());
    let original = std::fs::read(&seed.path).unwrap();
    let rng_seed = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut r = Rng(rng_seed);
    let work = tempfile::tempdir().unwrap();
    for c in &seed.companions {
        std::fs::copy(c, work.path().join(c.file_name().unwrap())).unwrap();
    }
    let mutant = work.path().join(seed.name);
    let out = work.path().join("out.raw");
    let (mut n, mut refused, mut inconsistent) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + budget();
    while Instant::now() < deadline {
        let mut img = original.clone();
        mutate(&mut r, &mut img);
        std::fs::write(&mutant, &img).unwrap();
        let case = n;
        n += 1;
        let keep = |why: String| -> ! {
            let kept = std::env::temp_dir().join(format!(
                "kiln-fuzz-{}-{rng_seed}-{case}-{}",
                std::process::id(),
                seed.name
            ));
            std::fs::copy(&mutant, &kept).unwrap();
            panic!(
                "{}: {why} (seed {rng_seed}, mutant kept as {})",
                seed.name,
                kept.display()
            );
        };

        let t = Instant::now();
        let info = inspect(&mutant);
        if t.elapsed() > LIMIT {
            keep(format!("inspect took {:?}", t.elapsed()));
        }
        let t = Instant::now();
        let _ = std::fs::remove_file(&out);
        let converted = convert_with(
            &mutant,
            &out,
            Format::Raw,
            &WriteOptions { fsync: false },
            &mut |_, _| {},
        );
        if t.elapsed() > LIMIT {
            keep(format!("convert took {:?}", t.elapsed()));
        }
        match (&info, &converted) {
            (Ok(i), Err(e)) if i.consistent => {
                keep(format!("inspect calls it consistent, convert fails: {e}"))
            }
            (Ok(i), _) if !i.consistent => inconsistent += 1,
            (Err(_), _) => refused += 1,
            _ => {}
        }
        if converted.is_ok() {
            use std::os::unix::fs::MetadataExt;
            let stored = std::fs::metadata(&out).unwrap().blocks() * 512;
            let bound = (img.len() as u64 * 64).max(4 * MIB);
            if stored > bound {
                keep(format!("{} bytes in, {stored} bytes stored out", img.len()));
            }
        }
    }
    eprintln!(
        "{}: {n} mutants in {:?} (seed {rng_seed}): {refused} refused, {inconsistent} inconsistent",
        seed.name,
        budget()
    );
    assert!(n > 0);
}

#[test]
fn fuzz_qcow2_qemu() {
    fuzz(|d| qemu_seed(d, "q.qcow2", "qcow2", &[]));
}

#[test]
fn fuzz_qcow2_compressed() {
    fuzz(|d| qemu_seed(d, "c.qcow2", "qcow2", &["-c", "-o", "cluster_size=4096"]));
}

#[test]
fn fuzz_qcow2_kiln() {
    fuzz(|d| kiln_seed(d, "k.qcow2", Format::Qcow2));
}

#[test]
fn fuzz_vmdk_sparse() {
    fuzz(|d| qemu_seed(d, "s.vmdk", "vmdk", &[]));
}

#[test]
fn fuzz_vmdk_stream() {
    fuzz(|d| qemu_seed(d, "t.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]));
}

#[test]
fn fuzz_vmdk_descriptor() {
    fuzz(|d| kiln_seed(d, "f.vmdk", Format::Vmdk));
}

#[test]
fn fuzz_vhd_dynamic() {
    fuzz(|d| qemu_seed(d, "d.vhd", "vpc", &["-o", "subformat=dynamic"]));
}

#[test]
fn fuzz_vhd_fixed() {
    fuzz(|d| kiln_seed(d, "x.vhd", Format::Vhd));
}

#[test]
fn fuzz_vdi() {
    fuzz(|d| qemu_seed(d, "v.vdi", "vdi", &[]));
}
