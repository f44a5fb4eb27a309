//! Benchmark (run by `bench/snapshot.py --builtin`): the 256-byte program on the builtin VMM,
//! resumed from a saved machine state to the REPL's answer, against a cold boot to the same
//! answer, in this process (no kiln CLI or supervisor around it).
//!
//! A VM boots, `hel` is typed, the VM is paused and saved. Then, `RUNS` times each: a new VM
//! restored from the state, `lo\r` typed, until `olleh` and the prompt come back; and a new
//! VM booted to its prompt, `hello\r` typed, until the same answer.
//!
//! Run: `cargo run --release -p kiln-vmm --example resume [RUNS]`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_vmm::{MemDisk, Vm, VmConfig, VmHandle};

/// The console: everything the guest prints, for the timing loop to look into.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&self.0.lock().unwrap()).contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} within 30 s");
            std::thread::yield_now();
        }
    }
}

fn disk() -> MemDisk {
    let sector = kiln_boot::boot_sector(&kiln_boot::program().unwrap()).unwrap();
    let mut image = sector.to_vec();
    image.resize(1 << 20, 0);
    MemDisk::new(image)
}

/// Runs `vm` on a thread of its own; returns its handle and the thread.
fn start(mut vm: Vm) -> (VmHandle, std::thread::JoinHandle<()>) {
    let handle = vm.handle();
    let t = std::thread::spawn(move || {
        let _ = vm.run();
    });
    (handle, t)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("machine");
    let config = VmConfig::default();

    let out = Capture::default();
    let (vm, t) = start(Vm::new(config.clone(), Box::new(disk()), Box::new(out.clone())).unwrap());
    out.wait_for("$ ");
    vm.send_input(b"hel");
    out.wait_for("$ hel");
    let t0 = Instant::now();
    vm.pause(Duration::from_secs(5)).unwrap();
    vm.save(&state).unwrap();
    let save = t0.elapsed();
    vm.kill();
    t.join().unwrap();

    let (mut resume, mut boot, mut built, mut prompt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let out = Capture::default();
        let t0 = Instant::now();
        let restored = Vm::restore(
            config.clone(),
            Box::new(disk()),
            Box::new(out.clone()),
            &state,
        )
        .unwrap();
        built.push(t0.elapsed());
        let (vm, t) = start(restored);
        vm.send_input(b"lo\r");
        out.wait_for("olleh\r\n$ ");
        resume.push(t0.elapsed());
        vm.kill();
        t.join().unwrap();

        let out = Capture::default();
        let t0 = Instant::now();
        let (vm, t) =
            start(Vm::new(config.clone(), Box::new(disk()), Box::new(out.clone())).unwrap());
        out.wait_for("$ ");
        prompt.push(t0.elapsed());
        vm.send_input(b"hello\r");
        out.wait_for("olleh\r\n$ ");
        boot.push(t0.elapsed());
        vm.kill();
        t.join().unwrap();
    }
    let stored = std::fs::metadata(&state).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    println!(
        "builtin VMM, {runs} runs: resume -> REPL answer {:.2} ms (min {:.2}; the machine restored after {:.2}); boot -> answer {:.2} ms (min {:.2}; the prompt after {:.2}); save {:.2} ms; state {} KiB stored of {} MiB RAM",
        median(resume.clone()).as_secs_f64() * 1e3,
        resume.iter().min().unwrap().as_secs_f64() * 1e3,
        median(built).as_secs_f64() * 1e3,
        median(boot.clone()).as_secs_f64() * 1e3,
        boot.iter().min().unwrap().as_secs_f64() * 1e3,
        median(prompt).as_secs_f64() * 1e3,
        save.as_secs_f64() * 1e3,
        stored.unwrap_or(0) / 1024,
        config.ram_mib
    );
}
