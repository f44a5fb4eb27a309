//! Published ports of a TAP VM: the supervisor listens on the host side and relays each TCP
//! connection, or each UDP peer, to the guest's address (like docker-proxy). Listening in a
//! process (rather than rewriting addresses in the kernel) makes a taken port an error before
//! the VM starts, and works for 127.0.0.1 without `route_localnet`.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::ports::{bind, Bound};
use crate::{NetError, PortForward};

/// Most connections (TCP) or peers (UDP) relayed at once per published port.
pub const MAX_FLOWS: usize = 256;
/// A UDP peer that has been silent this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long connecting to the guest may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The relays of one VM; dropping it closes the listeners.
pub struct Proxy {
    bound: Vec<(PortForward, Bound)>,
}

impl Proxy {
    /// Binds every host port (the first one taken is the error), relaying nothing yet.
    pub fn bind(forwards: &[PortForward]) -> Result<Proxy, NetError> {
        let bound = forwards
            .iter()
            .map(|f| Ok((*f, bind(f)?)))
            .collect::<Result<_, NetError>>()?;
        Ok(Proxy { bound })
    }

    /// Starts relaying to `guest`.
    pub fn start(&self, guest: Ipv4Addr) -> Result<(), NetError> {
        for (f, bound) in &self.bound {
            let to = SocketAddrV4::new(guest, f.guest_port);
            let clone_err = |e| NetError::io(format!("port {f}: cannot clone its socket"), e);
            match bound {
                Bound::Tcp(l) => {
                    let l = l.try_clone().map_err(clone_err)?;
                    let live = Arc::new(AtomicUsize::new(0));
                    thread::spawn(move || {
                        for conn in l.incoming() {
                            let Ok(conn) = conn else { return };
                            if live.load(Ordering::SeqCst) >= MAX_FLOWS {
                                continue;
                            }
                            live.fetch_add(1, Ordering::SeqCst);
                            let live = Arc::clone(&live);
                            thread::spawn(move || {
                                let _ = relay_tcp(conn, to);
                                live.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                    });
                }
                Bound::Udp(s) => {
                    let s = s.try_clone().map_err(clone_err)?;
                    thread::spawn(move || relay_udp(s, to));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for (_, bound) in &self.bound {
            let fd = match bound {
                Bound::Tcp(l) => l.as_raw_fd(),
                Bound::Udp(s) => s.as_raw_fd(),
            };
            // SAFETY: shutdown(2) on a descriptor this Proxy owns (closed only after this):
            // it wakes the relay threads blocked in accept or recv on their clones.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

fn relay_tcp(client: TcpStream, to: SocketAddrV4) -> io::Result<()> {
    let guest = TcpStream::connect_timeout(&SocketAddr::V4(to), CONNECT_TIMEOUT)?;
    let (mut c2, mut g2) = (client.try_clone()?, guest.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut c2, &mut g2);
        let _ = g2.shutdown(Shutdown::Write);
    });
    let (mut g, mut c) = (guest, client);
    let _ = io::copy(&mut g, &mut c);
    let _ = c.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn relay_udp(host: UdpSocket, to: SocketAddrV4) {
    // Each peer gets a socket of its own connected to the guest, so replies find their way
    // back; the table is bounded and idle peers are dropped.
    let peers: Arc<Mutex<Vec<(SocketAddr, UdpSocket)>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    while let Ok((n, peer)) = host.recv_from(&mut buf) {
        let existing = peers.lock().ok().and_then(|p| {
            p.iter()
                .find(|(a, _)| *a == peer)
                .and_then(|(_, s)| s.try_clone().ok())
        });
        let sock = match existing {
            Some(s) => s,
            None => {
                let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                    continue;
                };
                if s.connect(to).is_err() || s.set_read_timeout(Some(UDP_IDLE)).is_err() {
                    continue;
                }
                let (Ok(back), Ok(reply_to), Ok(mut table)) =
                    (s.try_clone(), host.try_clone(), peers.lock())
                else {
                    continue;
                };
                if table.len() >= MAX_FLOWS {
                    continue;
                }
                table.push((peer, back));
                drop(table);
                let peers = Arc::clone(&peers);
                let reader = s.try_clone();
                thread::spawn(move || {
                    if let Ok(reader) = reader {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = reader.recv(&mut buf) {
                            if reply_to.send_to(&buf[..n], peer).is_err() {
                                break;
                            }
                        }
                    }
                    if let Ok(mut p) = peers.lock() {
                        p.retain(|(a, _)| *a != peer);
                    }
                });
                s
            }
        };
        let _ = sock.send(&buf[..n]);
    }
}
