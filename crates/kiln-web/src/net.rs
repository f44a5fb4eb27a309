//! `/net`: v86's network relay protocol (one Ethernet frame per binary WebSocket message)
//! bridged to passt, a user-mode network stack, over QEMU's stream protocol (each frame
//! preceded by its length as a 4-byte big-endian integer). One passt per connection, so each
//! page gets its own network with DHCP, DNS and NAT to the host.
//!
//! Each relay holds one of `max_relays` slots (taken before the upgrade, so the rest are
//! refused with a 503) until it ends; its passt is killed and reaped when the connection ends,
//! and dies with the server: passt exits when its end of the socket pair closes, and it gets
//! SIGKILL when the thread that started it dies (`PR_SET_PDEATHSIG`).

use std::path::PathBuf;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

/// Largest frame relayed (jumbo frames are not used by v86's NICs); also the largest
/// WebSocket message `/net` accepts.
pub(crate) const MAX_FRAME: usize = 65536;

/// Relay `ws` through a new passt until either side ends; `slot` is held until then, and so
/// are the published ports `forwards` gives this relay's passt.
pub(crate) async fn relay(
    ws: WebSocket,
    passt: PathBuf,
    slot: OwnedSemaphorePermit,
    forwards: Option<(Vec<kiln_net::ports::PortForward>, OwnedSemaphorePermit)>,
) {
    let _slot = slot;
    let (forwards, _forwards_slot) = match forwards {
        Some((f, permit)) => (f, Some(permit)),
        None => (Vec::new(), None),
    };
    let (mut ws_tx, mut ws_rx) = ws.split();
    let socket = match kiln_net::passt::socket_pair() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("net: {e}");
            return;
        }
    };
    // kiln's one passt command: foreground, quiet, on its end of the pair, kiln's user-mode
    // layout (the guest 10.0.2.15, the host's loopback behind the gateway 10.0.2.2), the
    // published ports if this relay holds them, SIGKILL if the server dies.
    let mut cmd = tokio::process::Command::from(kiln_net::passt::command(
        &passt,
        &socket,
        &kiln_net::passt::PasstOptions {
            forwards,
            guest_layout: true,
        },
    ));
    cmd.stderr(std::process::Stdio::null()).kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!(
                "cannot start {}: {e} (install Debian's passt package)",
                passt.display()
            );
            tracing::warn!("net: {msg}");
            let _ = ws_tx
                .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                    code: 1011,
                    reason: msg.chars().take(120).collect::<String>().into(),
                })))
                .await;
            return;
        }
    };
    let ours = socket.peer;
    drop(socket.passt);
    if ours.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(stream) = tokio::net::UnixStream::from_std(ours) else {
        return;
    };
    let (mut rd, mut wr) = stream.into_split();

    let to_passt = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(frame) if !frame.is_empty() && frame.len() <= MAX_FRAME => {
                    let mut buf = Vec::with_capacity(frame.len() + 4);
                    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                    buf.extend_from_slice(&frame);
                    if wr.write_all(&buf).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    let from_passt = async move {
        let mut len = [0u8; 4];
        loop {
            if rd.read_exact(&mut len).await.is_err() {
                break;
            }
            let n = u32::from_be_bytes(len) as usize;
            if n > MAX_FRAME {
                tracing::warn!("net: passt sent a {n}-byte frame; closing");
                break;
            }
            let mut frame = vec![0u8; n];
            if rd.read_exact(&mut frame).await.is_err() {
                break;
            }
            if ws_tx.send(Message::Binary(frame.into())).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = to_passt => {}
        _ = from_passt => {}
        _ = child.wait() => { tracing::warn!("net: passt exited"); }
    }
    let _ = child.kill().await;
}
