//! SSH into Linux VMs without touching the base image: kiln's client key
//! (`$KILN_HOME/ssh/id_ed25519`, made on first use) or the user's `--ssh-key FILE.pub` goes into
//! root's authorized keys, and each VM's host key is made by kiln on the host, so `kiln vm ssh`
//! checks the guest strictly against it (`VMDIR/known_hosts`). Both reach the guest on its
//! seed disk: a small read-only virtio disk (serial `kiln-seed`) holding a tar archive that the
//! image's boot hook installs (kiln-rootfs's `KILN_HOOK`).

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_sys::lock::FileLock;

use crate::{Host, HostError, VmState};

/// The seed disk's file in a VM's directory.
pub(crate) const SEED_DISK: &str = "seed.tar";
/// The pinned host key of a VM, in ssh's known_hosts format.
pub(crate) const KNOWN_HOSTS: &str = "known_hosts";
/// The largest public key file kiln takes.
const MAX_PUBKEY: u64 = 16 << 10;

/// The name the VM's host key is pinned under (ssh's `HostKeyAlias`), whatever its address.
fn alias(name: &str) -> String {
    format!("kiln-{name}")
}

fn keygen(args: &[&str], what: &str) -> Result<(), HostError> {
    use kiln_sys::process::ToolError;
    let detail = match kiln_sys::process::run_tool(Command::new("ssh-keygen").args(args), None) {
        Ok(_) => return Ok(()),
        Err(ToolError::Missing) => "not installed (apt-get install openssh-client)".into(),
        Err(ToolError::Io(e)) => return Err(HostError::io("cannot run ssh-keygen", e)),
        Err(ToolError::Failed { stderr, .. }) => format!("{what}: {}", stderr.trim()),
    };
    Err(HostError::Tool {
        tool: "ssh-keygen".into(),
        detail,
    })
}

/// Reads one OpenSSH public key line from `path` and checks its shape.
fn read_pubkey(path: &Path) -> Result<String, HostError> {
    let bad = |why: &str| HostError::MissingFile {
        what: "SSH public key",
        path: path.to_path_buf(),
        why: why.into(),
    };
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_PUBKEY + 1).read_to_string(&mut text))
        .map_err(|e| bad(&e.to_string()))?;
    if text.len() as u64 > MAX_PUBKEY {
        return Err(bad("larger than 16 KiB: not a public key"));
    }
    let line = text.trim();
    let mut fields = line.split_whitespace();
    let kind = fields.next().unwrap_or_default();
    let blob = fields.next().unwrap_or_default();
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    if line.lines().count() != 1
        || !known
        || blob.len() < 16
        || !blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    {
        return Err(bad(
            "not an OpenSSH public key (one line like 'ssh-ed25519 AAAA... comment')",
        ));
    }
    Ok(line.to_string())
}

/// The keys a VM is made with: root's authorized key and the identity that matches it.
pub(crate) struct ClientKey {
    pub(crate) public: String,
    /// The private key `kiln vm ssh` offers, when kiln knows it.
    pub(crate) identity: Option<PathBuf>,
}

impl Host {
    /// kiln's own client key, made on first use.
    fn own_key(&self) -> Result<ClientKey, HostError> {
        let dir = self.home().join("ssh");
        fs::create_dir_all(&dir)
            .map_err(|e| HostError::io(format!("{}: cannot create", dir.display()), e))?;
        let key = dir.join("id_ed25519");
        let public = dir.join("id_ed25519.pub");
        let _lock = FileLock::exclusive(&dir.join(".lock"))
            .map_err(|e| HostError::io(format!("{}: cannot lock", dir.display()), e))?;
        if !public.exists() || !key.exists() {
            let _ = fs::remove_file(&key);
            let _ = fs::remove_file(&public);
            let k = key.to_string_lossy();
            keygen(
                &["-q", "-t", "ed25519", "-N", "", "-C", "kiln", "-f", &k],
                "making kiln's client key",
            )?;
        }
        Ok(ClientKey {
            public: read_pubkey(&public)?,
            identity: Some(key),
        })
    }

    /// The client key a VM gets: `pubkey` (its private half beside it, if there), or kiln's.
    pub(crate) fn client_key(&self, pubkey: Option<&Path>) -> Result<ClientKey, HostError> {
        match pubkey {
            None => self.own_key(),
            Some(p) => {
                let public = read_pubkey(p)?;
                let private = p.with_extension("");
                Ok(ClientKey {
                    public,
                    identity: (p.extension().is_some_and(|e| e == "pub") && private.is_file())
                        .then(|| fs::canonicalize(&private).unwrap_or(private)),
                })
            }
        }
    }
}

/// How long after its start a clone's `kiln vm ssh` first proves a login with the clone's own
/// key: far longer than the guest takes to apply it.
const IDENTITY_WINDOW: Duration = Duration::from_secs(120);

/// Makes the VM's host key, pins it in `dir/known_hosts` and writes the seed disk with it,
/// `client`'s key and the VM's `identity` (its `kiln.*` kernel arguments, as the file
/// `cmdline`). The private host key exists only on the seed disk (mode 0600).
pub(crate) fn make_seed(
    dir: &Path,
    name: &str,
    client: &ClientKey,
    identity: &str,
) -> Result<PathBuf, HostError> {
    let scratch = kiln_sys::temp::TempDir::beside(&dir.join(".ssh-keys")).map_err(|e| {
        HostError::io(
            format!("{}: cannot make a temporary directory", dir.display()),
            e,
        )
    })?;
    let key = scratch.path().join("ssh_host_ed25519_key");
    let k = key.to_string_lossy();
    keygen(
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            &alias(name),
            "-f",
            &k,
        ],
        "making the VM's host key",
    )?;
    let read = |p: &Path| {
        fs::read(p).map_err(|e| HostError::io(format!("{}: cannot read", p.display()), e))
    };
    let private = read(&key)?;
    let public = read(&key.with_extension("pub"))?;
    let host_pub = String::from_utf8_lossy(&public);
    let mut fields = host_pub.split_whitespace();
    let known = format!(
        "{} {} {}\n",
        alias(name),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default()
    );
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, bytes: &[u8], mode: u32| -> Result<(), HostError> {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, path, bytes)
            .map_err(|e| HostError::io("cannot make the seed archive", e))
    };
    add("ssh_host_ed25519_key", &private, 0o600)?;
    add("ssh_host_ed25519_key.pub", &public, 0o644)?;
    add(
        "authorized_keys",
        format!("{}\n", client.public).as_bytes(),
        0o600,
    )?;
    add("cmdline", format!("{identity}\n").as_bytes(), 0o644)?;
    let mut bytes = tar
        .into_inner()
        .map_err(|e| HostError::io("cannot make the seed archive", e))?;
    // A whole number of 4 KiB blocks, at least 64 KiB: any block layer takes it.
    let size = bytes.len().max(64 << 10).next_multiple_of(4096);
    bytes.resize(size, 0);
    let seed = dir.join(SEED_DISK);
    kiln_sys::temp::write_atomic(&seed, &bytes, None, 0o600)
        .map_err(|e| HostError::io(format!("{}: cannot write", seed.display()), e))?;
    let pinned = dir.join(KNOWN_HOSTS);
    kiln_sys::temp::write_atomic(&pinned, known.as_bytes(), None, 0o644)
        .map_err(|e| HostError::io(format!("{}: cannot write", pinned.display()), e))?;
    Ok(seed)
}

/// Waits until something that speaks SSH answers at `addr`. The probe sends its own
/// identification first, as an SSH client does (RFC 4253 lets either side start): Debian
/// bookworm's passt completes a published port's handshake with the guest only once the host
/// side sends something (fixed upstream in passt 2023_10_04).
///
/// Each probe waits up to 15 s for the banner, longer than passt's 10 s handshake timeout: a
/// client that gives up while that passt still waits for the guest makes it spin on the closed
/// socket (fixed upstream in 2024_09_06), stealing a CPU from the booting guest.
fn wait_for_sshd(addr: SocketAddr, deadline: Instant) -> bool {
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_secs(1), Duration::from_secs(15));
            let _ = s.set_read_timeout(Some(wait));
            let _ = s.write_all(b"SSH-2.0-kiln-probe\r\n");
            let mut banner = [0u8; 4];
            if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Host {
    /// `kiln vm ssh NAME [-- CMD...]`: waits up to `timeout` for the guest's sshd, then returns
    /// the `ssh` command that logs in as root with strict checking against the VM's pinned host
    /// key (and runs `command`, when given).
    pub fn ssh_command(
        &self,
        name: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<Command, HostError> {
        let rec = self.get(name)?;
        let Some(addr) = rec.config.net.ssh_endpoint() else {
            return Err(HostError::invalid(
                "net",
                "none",
                format!("VM '{name}' has no network (start it with --net)"),
            ));
        };
        let deadline = Instant::now() + timeout;
        loop {
            if self.get(name)?.effective_state() != VmState::Running {
                return Err(HostError::Stopped(name.to_string()));
            }
            if wait_for_sshd(
                addr,
                (Instant::now() + Duration::from_secs(15)).min(deadline),
            ) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(HostError::Control {
                    name: name.to_string(),
                    detail: format!("sshd did not answer at {addr} within {timeout:?}"),
                });
            }
        }
        let ssh = |command: &[String], extra: &[&str]| {
            let mut cmd = Command::new("ssh");
            if let Some(key) = &rec.meta.ssh_identity {
                cmd.arg("-i").arg(key).args(["-o", "IdentitiesOnly=yes"]);
            }
            let mut known = std::ffi::OsString::from("UserKnownHostsFile=");
            known.push(self.vm_dir(name).join(KNOWN_HOSTS));
            cmd.arg("-o").arg(known);
            for opt in [
                "StrictHostKeyChecking=yes".to_string(),
                "GlobalKnownHostsFile=/dev/null".into(),
                format!("HostKeyAlias={}", alias(name)),
                "HostKeyAlgorithms=ssh-ed25519".into(),
                "PasswordAuthentication=no".into(),
                "ConnectTimeout=10".into(),
                "LogLevel=ERROR".into(),
            ] {
                cmd.arg("-o").arg(opt);
            }
            for opt in extra {
                cmd.arg("-o").arg(opt);
            }
            cmd.arg("-p").arg(addr.port().to_string());
            cmd.arg(format!("root@{}", addr.ip()));
            if !command.is_empty() {
                cmd.arg("--").args(command);
            }
            cmd
        };
        // A clone answers with its origin's sshd until the guest notices the resume and
        // applies its own host key (a second or two): until a login succeeds, not even the
        // user's command is started. Later logins need no such probe.
        let fresh = rec
            .meta
            .started_at
            .as_deref()
            .and_then(kiln_sys::age)
            .is_none_or(|age| age < IDENTITY_WINDOW);
        if rec.meta.cloned() && fresh {
            loop {
                let ok = ssh(&["true".to_string()], &["BatchMode=yes"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(HostError::Control {
                        name: name.to_string(),
                        detail: format!("no SSH login at {addr} within {timeout:?}"),
                    });
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Ok(ssh(command, &[]))
    }
}
