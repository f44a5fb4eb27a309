//! A QEMU machine's state in a file: pause, save (QEMU's migration to a file), load into a QEMU
//! started with [`INCOMING`], resume. The file is written in QEMU's mapped-ram format when the
//! QEMU has it: RAM pages sit at fixed offsets and zero pages are never written, so the file
//! holds only the memory the guest touched (its holes are the rest), and loading reads only
//! those pages.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{QemuError, QemuVm};

/// The arguments that make QEMU wait for its state instead of booting (see
/// [`QemuVm::load_state`]).
pub const INCOMING: [&str; 2] = ["-incoming", "defer"];

/// A migration bandwidth no disk reaches, in bytes per second.
const UNLIMITED: u64 = 1 << 40;

/// How a state file was written: QEMU's migration stream, with or without mapped-ram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateFormat {
    /// The stream with RAM at fixed offsets (QEMU 9.0 and later).
    MappedRam,
    /// The plain sequential stream.
    Stream,
}

impl StateFormat {
    /// The name recorded beside the file.
    pub fn name(self) -> &'static str {
        match self {
            StateFormat::MappedRam => "qemu-migration+mapped-ram",
            StateFormat::Stream => "qemu-migration",
        }
    }

    /// The format named `name`, if it is one of QEMU's.
    pub fn from_name(name: &str) -> Option<StateFormat> {
        [StateFormat::MappedRam, StateFormat::Stream]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// The migration channel of a file: structured, so that no character of the path is ever
/// parsed as URI syntax (a comma in a `file:` URI starts an option).
fn file_channel(path: &Path) -> Value {
    json!([{
        "channel-type": "main",
        "addr": { "transport": "file", "filename": path, "offset": 0 }
    }])
}

impl QemuVm {
    /// Runs a QMP command (negotiating first) and returns its `return` value.
    fn command(&mut self, name: &str, args: Option<Value>) -> Result<Value, QemuError> {
        self.negotiate()?;
        self.qmp()
            .execute(name, args)
            .map_err(|source| self.qmp_error(source))
    }

    /// Pauses the guest's vCPUs. QEMU drains and flushes every disk before it answers, so the
    /// disk files are a consistent point in time while it stays paused.
    pub fn pause(&mut self) -> Result<(), QemuError> {
        self.command("stop", None).map(|_| ())
    }

    /// Lets a paused guest run again (after a saved state, QEMU takes its disks back).
    pub fn resume(&mut self) -> Result<(), QemuError> {
        self.command("cont", None).map(|_| ())
    }

    /// Whether this QEMU writes mapped-ram state files.
    fn has_mapped_ram(&mut self) -> Result<bool, QemuError> {
        let caps = self.command("query-migrate-capabilities", None)?;
        Ok(caps
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["capability"] == "mapped-ram")))
    }

    fn set_format(&mut self, format: StateFormat) -> Result<(), QemuError> {
        if format == StateFormat::MappedRam {
            self.command(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "mapped-ram", "state": true}]})),
            )?;
        }
        Ok(())
    }

    /// Writes the paused machine (vCPUs, devices, memory) to the new file `path`; returns the
    /// format it has. The guest stays paused.
    pub fn save_state(&mut self, path: &Path, timeout: Duration) -> Result<StateFormat, QemuError> {
        let format = if self.has_mapped_ram()? {
            StateFormat::MappedRam
        } else {
            StateFormat::Stream
        };
        self.set_format(format)?;
        // QEMU caps a migration at 128 MiB/s by default (for a live one over a network); the
        // guest is paused and waits for this one: write at the disk's speed.
        self.command(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": UNLIMITED })),
        )?;
        self.command("migrate", Some(json!({ "channels": file_channel(path) })))?;
        self.migration_done("saving the VM's state", timeout)?;
        Ok(format)
    }

    /// Loads the machine from `path` (written by [`QemuVm::save_state`] in `format`) into this
    /// QEMU, started with [`INCOMING`]; returns once the guest runs.
    pub fn load_state(
        &mut self,
        path: &Path,
        format: StateFormat,
        timeout: Duration,
    ) -> Result<(), QemuError> {
        if format == StateFormat::MappedRam && !self.has_mapped_ram()? {
            return Err(QemuError::Config(format!(
                "{}: saved in QEMU's mapped-ram format, which this QEMU cannot read",
                path.display()
            )));
        }
        self.set_format(format)?;
        self.command(
            "migrate-incoming",
            Some(json!({ "channels": file_channel(path) })),
        )?;
        self.migration_done("loading the VM's state", timeout)?;
        // The state was saved from a paused guest, and QEMU keeps the run state it recorded.
        self.resume()?;
        let status = self.command("query-status", None)?;
        if status["running"] != true {
            return Err(QemuError::Config(format!(
                "the VM does not run after its state was loaded (QEMU says {})",
                status["status"]
            )));
        }
        Ok(())
    }

    /// Waits for the migration under way to complete (or fail, with QEMU's reason).
    fn migration_done(&mut self, what: &str, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.command("query-migrate", None)?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(QemuError::Config(format!(
                        "{what} failed: {}",
                        info["error-desc"].as_str().unwrap_or("QEMU gave no reason")
                    )))
                }
                _ if Instant::now() >= deadline => {
                    let _ = self.command("migrate_cancel", None);
                    return Err(QemuError::Config(format!(
                        "{what} did not finish within {} s",
                        timeout.as_secs()
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip_and_paths_are_never_uri_syntax() {
        for f in [StateFormat::MappedRam, StateFormat::Stream] {
            assert_eq!(StateFormat::from_name(f.name()), Some(f));
        }
        assert_eq!(StateFormat::from_name("kiln-vmm/1"), None);
        let c = file_channel(Path::new("/v/a,offset=9/machine"));
        assert_eq!(c[0]["addr"]["filename"], "/v/a,offset=9/machine");
        assert_eq!(c[0]["addr"]["offset"], 0);
    }
}
