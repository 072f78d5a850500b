//! Connections between the hosts: the supervisor opens (source) or accepts
//! (destination) every connection, does the hello, sets the socket options,
//! and only then hands a data connection to a role.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use common::control::{recv_control, ControlMsg};
use common::types::{MemLayout, MigrationId};
use common::wire::{
    client_hello, send_control, server_read_hello, server_reply, ConnKind, FrameReader, Hello,
    HelloStatus, WireError,
};

use crate::events::Event;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{kind} connection to {addr}: {source}")]
    Hello {
        kind: ConnKind,
        addr: String,
        source: WireError,
    },
    #[error("no {what} arrived within {secs} s")]
    AcceptTimeout { what: String, secs: u64 },
    #[error("accept failed: {0}")]
    Accept(std::io::Error),
    #[error("control connection: {0}")]
    Control(WireError),
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) {
    // SAFETY: setsockopt with a pointer to a live i32 and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        log::debug!(
            "setsockopt({level}, {name}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// No Nagle delay (page requests and urgent pages are latency-bound), and
/// dead-peer detection within about `link_timeout`, even when the link
/// silently drops: keepalive probes on idle connections, a user timeout on
/// busy ones.
pub fn tune(stream: &TcpStream, link_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    let secs = link_timeout.as_secs().clamp(2, 3600) as i32;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, (secs / 2).max(1));
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        (secs / 4).max(1),
    );
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 2);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, secs * 1000);
}

/// Keeps at most `bytes` of unsent data queued in the socket, so bulk pages
/// cannot pile up far ahead of what the link carries (and the package, or
/// a pushed page the guest waits for, does not queue behind them).
pub fn limit_unsent(stream: &TcpStream, bytes: i32) {
    setsockopt_int(
        stream.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        bytes,
    );
}

/// Connects and says hello as `kind`.
pub fn connect(
    addr: &str,
    kind: ConnKind,
    id: MigrationId,
    link_timeout: Duration,
) -> Result<TcpStream, NetError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| NetError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, Duration::from_secs(10)) {
            Ok(mut s) => {
                tune(&s, link_timeout);
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                client_hello(&mut s, kind, id).map_err(|source| NetError::Hello {
                    kind,
                    addr: addr.to_string(),
                    source,
                })?;
                s.set_read_timeout(None).ok();
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(NetError::Connect {
        addr: addr.to_string(),
        source: last.unwrap_or_else(|| std::io::Error::other("no address")),
    })
}

/// Accepts connections until one says a good hello. Bad ones are refused
/// (the refusal names our version) and logged; `check` decides on the rest.
///
/// `keep_waiting` runs between polls: an error from it (a signal, the peer
/// gone) ends the wait with that error.
pub fn accept<E: From<NetError>>(
    listener: &TcpListener,
    timeout: Option<Duration>,
    link_timeout: Duration,
    what: &str,
    mut check: impl FnMut(&Hello) -> HelloStatus,
    mut keep_waiting: impl FnMut() -> Result<(), E>,
) -> Result<(Hello, TcpStream), E> {
    let deadline = timeout.map(|t| Instant::now() + t);
    listener.set_nonblocking(true).map_err(NetError::Accept)?;
    loop {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).map_err(NetError::Accept)?;
                // A peer that connects and says nothing holds this loop for
                // at most this long.
                tune(&s, link_timeout);
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                match server_read_hello(&mut s) {
                    Ok(h) => {
                        let status = check(&h);
                        let _ = server_reply(&mut s, status);
                        if status == HelloStatus::Ok {
                            s.set_read_timeout(None).ok();
                            return Ok((h, s));
                        }
                        log::warn!("refused {} connection from {peer}: {status}", h.kind);
                    }
                    Err(e) => log::error!("refused connection from {peer}: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(NetError::AcceptTimeout {
                        what: what.to_string(),
                        secs: timeout.map(|t| t.as_secs()).unwrap_or(0),
                    }
                    .into());
                }
                keep_waiting()?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(NetError::Accept(e).into()),
        }
    }
}

/// Control frames carry no page ranges; any layout will do for the reader.
fn control_layout() -> MemLayout {
    MemLayout::new(common::types::PAGE_SIZE as u64).expect("one page is a valid layout")
}

/// The control connection: a writer here, a reader thread that turns each
/// message into an [`Event::Peer`].
pub struct Control {
    out: TcpStream,
}

impl Control {
    pub fn new(stream: TcpStream, events: Sender<Event>) -> std::io::Result<Self> {
        let layout = control_layout();
        let reader = stream.try_clone()?;
        std::thread::Builder::new()
            .name("control-reader".into())
            .spawn(move || {
                let mut r = FrameReader::new(reader, ConnKind::Control, layout);
                loop {
                    match recv_control(&mut r) {
                        Ok(m) => {
                            if events.send(Event::Peer(m)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = events.send(Event::PeerLost(e.to_string()));
                            return;
                        }
                    }
                }
            })?;
        Ok(Control { out: stream })
    }

    pub fn send(&mut self, msg: &ControlMsg) -> Result<(), NetError> {
        send_control(&mut self.out, msg).map_err(NetError::Control)
    }

    /// Closes our side for good.
    pub fn shutdown(&mut self) {
        let _ = self.out.flush();
        let _ = self.out.shutdown(std::net::Shutdown::Both);
    }
}
