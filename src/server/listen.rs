//! The listening sockets of the main listener: one per worker.

use std::net::SocketAddr;
use std::num::NonZeroUsize;

use tokio::net::TcpSocket;

/// Opens `count` listening sockets on `addr`. With more than one, each has `SO_REUSEPORT` and
/// the kernel spreads new connections across them, so that each worker accepts its own without
/// waking the others. The first socket's port is used for the rest (`addr` may ask for port 0).
pub(crate) fn bind_listeners(
    addr: SocketAddr,
    count: NonZeroUsize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(count.get());
    let mut addr = addr;
    for _ in 0..count.get() {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if count.get() > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        addr = listener.local_addr()?;
        // Handed to its worker's runtime when that starts (see `Worker::serve`).
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

/// Connections the kernel queues for each listening socket before the gateway accepts them.
const LISTEN_BACKLOG: u32 = 1024;
