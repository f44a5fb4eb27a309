//! How a VM ended: one enum for every engine, one table of exit codes for every command.

use serde::{Deserialize, Serialize};

/// How a VM ended.
///
/// | end | meaning | exit code |
/// |---|---|---:|
/// | `powered-off` | the guest powered itself off (ACPI S5), e.g. after the power button | 0 |
/// | `quit` | quit from the console (Ctrl-A X) | 0 |
/// | `snapshotted` | stopped after a snapshot (`kiln vm snapshot --stop`) | 0 |
/// | `killed-after-timeout` | the guest ignored the power button for the whole timeout | 2 |
/// | `killed` | killed on request (`kiln kill`, a second SIGTERM) | 2 |
/// | `reset` | the guest reset (a reboot ends the VM) | 3 |
/// | `crashed` | the engine failed, or the VM's supervisor died | 4 |
///
/// Errors before a VM runs (bad input, a name in use) exit with 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum End {
    PoweredOff,
    Quit,
    Snapshotted { tag: String },
    KilledAfterTimeout { timeout_s: f64 },
    Killed,
    Reset,
    Crashed { reason: String },
}

impl End {
    /// The process exit code of a command that reports this end (see the table above).
    pub fn exit_code(&self) -> u8 {
        match self {
            End::PoweredOff | End::Quit | End::Snapshotted { .. } => 0,
            End::KilledAfterTimeout { .. } | End::Killed => 2,
            End::Reset => 3,
            End::Crashed { .. } => 4,
        }
    }

    /// `powered-off`, `quit`, `snapshotted`, `killed-after-timeout`, `killed`, `reset` or
    /// `crashed`.
    pub fn kind(&self) -> &'static str {
        match self {
            End::PoweredOff => "powered-off",
            End::Quit => "quit",
            End::Snapshotted { .. } => "snapshotted",
            End::KilledAfterTimeout { .. } => "killed-after-timeout",
            End::Killed => "killed",
            End::Reset => "reset",
            End::Crashed { .. } => "crashed",
        }
    }

    /// True when the guest powered itself off.
    pub fn powered_off(&self) -> bool {
        matches!(self, End::PoweredOff)
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::PoweredOff => f.write_str("guest powered off"),
            End::Quit => f.write_str("quit from the console"),
            End::Snapshotted { tag } => write!(f, "stopped after snapshot '{tag}'"),
            End::KilledAfterTimeout { timeout_s } => write!(
                f,
                "guest did not power off within {timeout_s} s of the power button; killed"
            ),
            End::Killed => f.write_str("killed"),
            End::Reset => f.write_str("guest reset (reboot ends the VM)"),
            End::Crashed { reason } => write!(f, "crashed: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_its_documented_code_and_round_trips() {
        let table = [
            (End::PoweredOff, 0, "powered-off"),
            (End::Quit, 0, "quit"),
            (End::Snapshotted { tag: "t".into() }, 0, "snapshotted"),
            (
                End::KilledAfterTimeout { timeout_s: 1.0 },
                2,
                "killed-after-timeout",
            ),
            (End::Killed, 2, "killed"),
            (End::Reset, 3, "reset"),
            (End::Crashed { reason: "x".into() }, 4, "crashed"),
        ];
        for (end, code, kind) in table {
            assert_eq!(end.exit_code(), code, "{end}");
            assert_eq!(end.kind(), kind);
            let json = serde_json::to_value(&end).unwrap();
            assert_eq!(json["kind"], kind);
            assert_eq!(serde_json::from_value::<End>(json).unwrap(), end);
        }
    }
}
