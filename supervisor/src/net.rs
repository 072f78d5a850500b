//! Connections between the hosts: the supervisor opens (source) or accepts
//! (destination) every connection, runs its TLS handshake (when the
//! transport is TLS, see [`crate::tls`]), does the hello, sets the socket
//! options, and only then hands a data connection to a role, with the
//! session's keys.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::control::{recv_control, ControlMsg};
use common::tls::{RecvHalf, SendHalf, Session};
use common::types::{MemLayout, MigrationId};
use common::wire::{
    client_hello, send_control, server_check_hello, server_reply, ConnKind, FrameReader, Hello,
    HelloStatus, WireError, HELLO_LEN,
};

use crate::events::{Event, Gate};
use crate::tls::{Advance, ConnectError, ServerHandshake, Tls};

/// How the hosts talk: plain TCP, or mutual TLS 1.3 on every connection.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    #[default]
    Tcp,
    Tls(Arc<Tls>),
}

impl Transport {
    /// As the report names it: `tcp` or `tls1.3`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls1.3",
        }
    }
}

/// A connection whose hello is done: the socket, and with TLS the session
/// that whoever uses the socket from here on continues.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub tls: Option<Session>,
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

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
    #[error("{kind} connection to {addr}: {why}")]
    Tls {
        kind: ConnKind,
        addr: String,
        why: String,
    },
    #[error("{kind} connection to {addr}: {source}")]
    Hello {
        kind: ConnKind,
        addr: String,
        source: WireError,
    },
    #[error("no {what} arrived in time")]
    AcceptTimeout { what: String },
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

/// Whether the peer has closed or reset `stream`, without reading from it:
/// `Some("closed by the peer")` (FIN seen), `Some("broken")` (error or
/// hang-up), `None` while it looks alive. A silent dead host shows up as
/// alive here; heartbeats and the TCP user timeout catch that.
pub fn closed(stream: &TcpStream) -> Option<&'static str> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; a timeout of 0
    // never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n <= 0 {
        return None;
    }
    if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        Some("broken")
    } else if pfd.revents & libc::POLLRDHUP != 0 {
        Some("closed by the peer")
    } else {
        None
    }
}

/// Connects and says hello as `kind` (with TLS: after the handshake,
/// inside the session).
pub fn connect(
    transport: &Transport,
    addr: &str,
    kind: ConnKind,
    id: MigrationId,
    link_timeout: Duration,
) -> Result<Conn, NetError> {
    connect_within(
        transport,
        addr,
        kind,
        id,
        link_timeout,
        Duration::from_secs(10),
    )
}

/// [`connect`], giving up on each address after `within` (reconnecting
/// while the link may still be down).
pub fn connect_within(
    transport: &Transport,
    addr: &str,
    kind: ConnKind,
    id: MigrationId,
    link_timeout: Duration,
    within: Duration,
) -> Result<Conn, NetError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| NetError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, within) {
            Ok(mut s) => {
                tune(&s, link_timeout);
                s.set_read_timeout(Some(within)).ok();
                let hello_err = |source| NetError::Hello {
                    kind,
                    addr: addr.to_string(),
                    source,
                };
                let tls = match transport {
                    Transport::Tcp => {
                        client_hello(&mut s, kind, id).map_err(hello_err)?;
                        None
                    }
                    Transport::Tls(tls) => Some(
                        tls.connect(&mut s, addr, |io| client_hello(io, kind, id))
                            .map_err(|e| match e {
                                ConnectError::Tls(why) => NetError::Tls {
                                    kind,
                                    addr: addr.to_string(),
                                    why,
                                },
                                ConnectError::Hello(source) => hello_err(source),
                            })?,
                    ),
                };
                s.set_read_timeout(None).ok();
                return Ok(Conn { stream: s, tls });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(NetError::Connect {
        addr: addr.to_string(),
        source: last.unwrap_or_else(|| std::io::Error::other("no address")),
    })
}

/// How long one accepted connection may take to say its hello. Each has its
/// own deadline and they are read side by side, so a client that connects
/// and says nothing delays no one else.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections waiting for their hello at once; beyond this the oldest
/// is dropped (an honest peer says its hello within a round trip).
pub const MAX_PENDING_HELLOS: usize = 64;

/// An accepted connection whose hello is not complete yet.
struct PendingHello {
    stream: TcpStream,
    /// With TLS: its handshake, which comes before any byte of the hello.
    tls: Option<ServerHandshake>,
    peer: SocketAddr,
    buf: [u8; HELLO_LEN],
    got: usize,
    deadline: Instant,
}

/// What reading a pending hello came to.
enum HelloRead {
    /// Not all of it yet.
    Waiting,
    /// Whole: decide on it.
    Complete,
    /// Dropped, with the reason to log.
    Failed(String),
}

impl PendingHello {
    fn read(&mut self) -> HelloRead {
        if let Some(hs) = &mut self.tls {
            return match hs.advance(&mut self.stream, &mut self.buf, &mut self.got) {
                Advance::Hello => HelloRead::Complete,
                Advance::Refused(why) => HelloRead::Failed(why),
                Advance::Wait if Instant::now() >= self.deadline => HelloRead::Failed(format!(
                    "no TLS handshake and hello within {} s ({} of {HELLO_LEN} hello bytes)",
                    HELLO_TIMEOUT.as_secs(),
                    self.got
                )),
                Advance::Wait => HelloRead::Waiting,
            };
        }
        loop {
            match self.stream.read(&mut self.buf[self.got..]) {
                Ok(0) => {
                    return HelloRead::Failed(
                        WireError::ClosedInHello {
                            got: self.got,
                            want: HELLO_LEN,
                        }
                        .to_string(),
                    )
                }
                Ok(n) => {
                    self.got += n;
                    if self.got == HELLO_LEN {
                        return HelloRead::Complete;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return if Instant::now() >= self.deadline {
                        HelloRead::Failed(format!(
                            "{} ({} of {HELLO_LEN} bytes in {} s)",
                            WireError::Silent(ConnKind::Control),
                            self.got,
                            HELLO_TIMEOUT.as_secs()
                        ))
                    } else {
                        HelloRead::Waiting
                    };
                }
                Err(e) => return HelloRead::Failed(WireError::Io(e).to_string()),
            }
        }
    }
}

/// The listening socket of `incoming`, and the connections it accepted whose
/// hellos are still coming in. Kept between calls to [`Acceptor::accept`],
/// so the data connections that arrive together are all served.
pub struct Acceptor {
    listener: TcpListener,
    transport: Transport,
    pending: Vec<PendingHello>,
}

impl Acceptor {
    pub fn new(listener: TcpListener, transport: Transport) -> Result<Self, NetError> {
        listener.set_nonblocking(true).map_err(NetError::Accept)?;
        Ok(Acceptor {
            listener,
            transport,
            pending: Vec::new(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until one says a good hello. Hellos (with TLS:
    /// handshakes, then hellos) are read from every pending connection at
    /// once, each within [`HELLO_TIMEOUT`]. A peer without an acceptable
    /// certificate is dropped before any byte of its hello is read. Bad
    /// hellos are refused (the refusal names our version) and logged;
    /// `check` decides on the rest.
    ///
    /// `keep_waiting` runs between polls: an error from it (a signal, the
    /// peer gone) ends the wait with that error; so does `deadline` passing
    /// (`what` names what was awaited and within which limit).
    pub fn accept<E: From<NetError>>(
        &mut self,
        deadline: Option<Instant>,
        link_timeout: Duration,
        what: &str,
        mut check: impl FnMut(&Hello) -> HelloStatus,
        mut keep_waiting: impl FnMut() -> Result<(), E>,
    ) -> Result<(Hello, Conn), E> {
        loop {
            self.accept_ready(link_timeout)?;
            let mut i = 0;
            while i < self.pending.len() {
                match self.pending[i].read() {
                    HelloRead::Waiting => i += 1,
                    HelloRead::Failed(why) => {
                        let p = self.pending.remove(i);
                        log::error!("refused connection from {}: {why}", p.peer);
                    }
                    HelloRead::Complete => {
                        let mut p = self.pending.remove(i);
                        if let Some(h) = decide(&mut p, &mut check) {
                            p.stream.set_nonblocking(false).map_err(NetError::Accept)?;
                            let tls = match p.tls.map(ServerHandshake::session).transpose() {
                                Ok(t) => t,
                                Err(why) => {
                                    log::error!("refused connection from {}: {why}", p.peer);
                                    continue;
                                }
                            };
                            return Ok((
                                h,
                                Conn {
                                    stream: p.stream,
                                    tls,
                                },
                            ));
                        }
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(NetError::AcceptTimeout {
                    what: what.to_string(),
                }
                .into());
            }
            keep_waiting()?;
            self.poll(deadline);
        }
    }

    /// Takes every connection waiting in the backlog.
    fn accept_ready(&mut self, link_timeout: Duration) -> Result<(), NetError> {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(true).map_err(NetError::Accept)?;
                    tune(&stream, link_timeout);
                    if self.pending.len() >= MAX_PENDING_HELLOS {
                        let old = self.pending.remove(0);
                        log::warn!(
                            "{MAX_PENDING_HELLOS} connections are waiting to say hello; dropping the oldest, from {}",
                            old.peer
                        );
                    }
                    let tls = match &self.transport {
                        Transport::Tcp => None,
                        Transport::Tls(t) => match ServerHandshake::new(t.clone()) {
                            Ok(hs) => Some(hs),
                            Err(why) => {
                                log::error!("refused connection from {peer}: {why}");
                                continue;
                            }
                        },
                    };
                    self.pending.push(PendingHello {
                        stream,
                        tls,
                        peer,
                        buf: [0; HELLO_LEN],
                        got: 0,
                        deadline: Instant::now() + HELLO_TIMEOUT,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The peer gave up before we took it (ECONNABORTED): not ours
                // to fail on.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(e) => return Err(NetError::Accept(e)),
            }
        }
    }

    /// Sleeps until the listener or a pending connection has something, a
    /// hello deadline passes, or 50 ms go by (`keep_waiting` runs that often).
    fn poll(&self, deadline: Option<Instant>) {
        let now = Instant::now();
        let wake = self
            .pending
            .iter()
            .map(|p| p.deadline)
            .chain(deadline)
            .min()
            .map_or(Duration::from_millis(50), |d| {
                d.saturating_duration_since(now)
                    .min(Duration::from_millis(50))
            });
        let mut fds: Vec<libc::pollfd> = std::iter::once((self.listener.as_raw_fd(), false))
            .chain(self.pending.iter().map(|p| {
                let out = p.tls.as_ref().is_some_and(ServerHandshake::wants_write);
                (p.stream.as_raw_fd(), out)
            }))
            .map(|(fd, out)| libc::pollfd {
                fd,
                // A handshake whose flight did not fit the socket buffer
                // waits for room as well.
                events: if out {
                    libc::POLLIN | libc::POLLOUT
                } else {
                    libc::POLLIN
                },
                revents: 0,
            })
            .collect();
        // SAFETY: poll on a live array of pollfds for fds we own, with a
        // bounded timeout; the kernel writes only `revents`.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wake.as_millis().max(1) as i32,
            )
        };
    }
}

/// A whole hello: refuse it (logged) or accept it (returned).
fn decide(p: &mut PendingHello, check: &mut impl FnMut(&Hello) -> HelloStatus) -> Option<Hello> {
    // The reply is 16 bytes on a fresh connection (one record with TLS):
    // it fits the socket buffer, so a nonblocking write does not come up
    // short.
    let mut plain;
    let mut sealed;
    let mut out: &mut dyn Write = match &mut p.tls {
        None => {
            plain = &p.stream;
            &mut plain
        }
        Some(hs) => {
            sealed = hs.writer(&mut p.stream);
            &mut sealed
        }
    };
    match server_check_hello(&mut out, &p.buf) {
        Ok(h) => {
            let status = check(&h);
            let _ = server_reply(&mut out, status);
            if status == HelloStatus::Ok {
                return Some(h);
            }
            log::warn!("refused {} connection from {}: {status}", h.kind, p.peer);
        }
        Err(e) => log::error!("refused connection from {}: {e}", p.peer),
    }
    None
}

/// Control frames carry no page ranges; any layout will do for the reader.
fn control_layout() -> MemLayout {
    MemLayout::new(common::types::PAGE_SIZE as u64).expect("one page is a valid layout")
}

/// The control connection: a writer here, a reader thread that turns each
/// message into an [`Event::Peer`].
pub struct Control {
    out: SendHalf,
    /// Retired when the connection is replaced (postcopy recovery): what
    /// the old one still reads is not heard.
    pub gate: Gate,
}

impl Control {
    pub fn new(conn: Conn, events: Sender<Event>) -> std::io::Result<Self> {
        let layout = control_layout();
        let session = |e: common::tls::TlsError| std::io::Error::other(e.to_string());
        let reader = RecvHalf::new(conn.stream.try_clone()?, conn.tls.as_ref()).map_err(session)?;
        let out = SendHalf::new(conn.stream, conn.tls.as_ref()).map_err(session)?;
        let gate = Gate::default();
        let g = gate.clone();
        std::thread::Builder::new()
            .name("control-reader".into())
            .spawn(move || {
                let mut r = FrameReader::new(reader, ConnKind::Control, layout);
                loop {
                    let ev = match recv_control(&mut r) {
                        Ok(m) => Event::Peer(m),
                        Err(e) => Event::PeerLost(e.to_string()),
                    };
                    let lost = matches!(ev, Event::PeerLost(_));
                    if !g.pass(&events, ev) || lost {
                        return;
                    }
                }
            })?;
        Ok(Control { out, gate })
    }

    pub fn send(&mut self, msg: &ControlMsg) -> Result<(), NetError> {
        send_control(&mut self.out, msg).map_err(NetError::Control)
    }

    /// Closes our side for good.
    pub fn shutdown(&mut self) {
        let _ = self.out.flush();
        let _ = self.out.stream().shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(kind: ConnKind) -> [u8; HELLO_LEN] {
        Hello {
            kind,
            migration: MigrationId([9; 16]),
        }
        .encode()
    }

    #[test]
    fn silent_and_slow_clients_do_not_hold_up_a_hello() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acc = Acceptor::new(listener, Transport::Tcp).unwrap();
        // Two that say nothing, one that stops half-way through its hello.
        let _idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(&hello(ConnKind::Main)[..20]).unwrap();
        // Then two real ones, back to back.
        let mut main = TcpStream::connect(addr).unwrap();
        main.write_all(&hello(ConnKind::Main)).unwrap();
        let mut urgent = TcpStream::connect(addr).unwrap();
        urgent.write_all(&hello(ConnKind::Urgent)).unwrap();
        let t = Instant::now();
        let deadline = Some(t + Duration::from_secs(5));
        let link = Duration::from_secs(20);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (h, _s) = acc
                .accept::<NetError>(deadline, link, "test", |_| HelloStatus::Ok, || Ok(()))
                .unwrap();
            kinds.push(h.kind);
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        kinds.sort_by_key(|k| k.to_string());
        assert_eq!(kinds, vec![ConnKind::Main, ConnKind::Urgent]);
        // Each got its reply: accepted.
        let mut reply = [0u8; 16];
        main.read_exact(&mut reply).unwrap();
        assert_eq!(reply[6], 0);
        // Nothing else is coming: the deadline ends the wait, by name.
        let err = acc
            .accept::<NetError>(
                Some(Instant::now() + Duration::from_millis(200)),
                link,
                "data connection within the test's limit",
                |_| HelloStatus::Ok,
                || Ok(()),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("no data connection within the test's limit arrived in time"),
            "{err}"
        );
    }

    /// With TLS: a client whose certificate chains to another CA is dropped
    /// in its handshake; once the control connection's hello is accepted,
    /// a data connection from another certificate of the same CA is
    /// refused, one from the same certificate accepted. The other way
    /// round, a source refuses a second destination whose certificate is
    /// not the first one's.
    #[test]
    fn tls_peers_are_bound_to_the_first_certificate() {
        use crate::pki::{TestCa, Validity};
        use crate::tls::{Tls, TlsFiles};
        let dir = std::env::temp_dir().join(format!("postcopy-net-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new(&dir, "a").unwrap();
        let other = TestCa::new(&dir, "b").unwrap();
        let tls = |f| Transport::Tls(Arc::new(Tls::load(&f, None).unwrap()));
        let host = |name| ca.host(&dir, name, Validity::Now).unwrap();
        let (dest, src, thief) = (tls(host("dest")), host("src"), host("thief"));
        // A certificate of another CA, from a client that trusts ours.
        let stranger = tls(TlsFiles {
            ca: ca.ca_path.clone(),
            ..other.host(&dir, "stranger", Validity::Now).unwrap()
        });
        let id = MigrationId([9; 16]);
        let link = Duration::from_secs(20);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut acc = Acceptor::new(listener, dest).unwrap();
        let accept = |acc: &mut Acceptor, within_ms| {
            acc.accept::<NetError>(
                Some(Instant::now() + Duration::from_millis(within_ms)),
                link,
                "test",
                |_| HelloStatus::Ok,
                || Ok(()),
            )
        };
        let dial = |t: Transport, kind| {
            let addr = addr.clone();
            std::thread::spawn(move || connect(&t, &addr, kind, id, link))
        };

        let c = dial(stranger, ConnKind::Control);
        let e = accept(&mut acc, 1500).unwrap_err();
        assert!(matches!(e, NetError::AcceptTimeout { .. }), "{e}");
        let e = c.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("refused our certificate"), "{e}");

        let src_t = tls(src);
        let c = dial(src_t.clone(), ConnKind::Control);
        let (h, conn) = accept(&mut acc, 5000).unwrap();
        assert_eq!(h.kind, ConnKind::Control);
        assert!(conn.tls.is_some());
        assert!(c.join().unwrap().unwrap().tls.is_some());

        let c = dial(tls(thief), ConnKind::Main);
        let e = accept(&mut acc, 1500).unwrap_err();
        assert!(matches!(e, NetError::AcceptTimeout { .. }), "{e}");
        assert!(c.join().unwrap().is_err());

        let c = dial(src_t.clone(), ConnKind::Main);
        let (h, _) = accept(&mut acc, 5000).unwrap();
        assert_eq!(h.kind, ConnKind::Main);
        c.join().unwrap().unwrap();

        // The source, bound to `dest`, meets another destination of the
        // same CA.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr2 = listener.local_addr().unwrap().to_string();
        let mut acc2 = Acceptor::new(listener, tls(host("dest2"))).unwrap();
        let c = std::thread::spawn(move || connect(&src_t, &addr2, ConnKind::Urgent, id, link));
        let _ = accept(&mut acc2, 1500);
        let e = c.join().unwrap().unwrap_err().to_string();
        assert!(
            e.contains("is not the one this migration's first connection presented"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
