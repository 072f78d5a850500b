//! The page-server answers the destination's page requests: each requested
//! page whose `sent` bit it wins is read from the frozen source memory and
//! sent at once on the urgent connection, never queued behind bulk pages. A
//! page whose bit is already set is on its way on the main stream.

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsFd;

use common::bitmap::{BitmapError, SharedBitmap};
use common::clock::monotonic_ns;
use common::counters::{Counter, CountersError, SharedCounters};
use common::mem::{is_zero, reopen_read_only, Access, Mapping, MemError};
use common::msg::{FromPageServer, ServerSetup, ServerStats, ToPageServer};
use common::role::{LinkError, RoleLink};
use common::tls::{RecvHalf, SendHalf};
use common::types::{MemLayout, PageRange, PAGE_SIZE};
use common::wire::{
    page_times_frame, pages_prefix, zero_frame, ConnKind, Frame, FrameReader, WireError,
    FRAME_HEADER_LEN, MAX_PAGES_PER_FRAME, PAGES_PREFIX_LEN, PAGE_TIMES_LEN,
};

/// A PAGE_TIMES frame, whole.
const TIMES_LEN: usize = FRAME_HEADER_LEN + PAGE_TIMES_LEN;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error("sent bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    #[error("counters: {0}")]
    Counters(#[from] CountersError),
    #[error("return path: {0}")]
    ReturnPath(WireError),
    #[error("urgent connection: {0}")]
    Urgent(std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] common::sandbox::SandboxError),
    #[error(transparent)]
    Tls(#[from] common::tls::TlsError),
}

pub fn run(link: RoleLink<ToPageServer, FromPageServer>) -> Result<(), ServeError> {
    let ServerSetup {
        layout,
        return_tls,
        urgent_tls,
    } = match link.recv()? {
        ToPageServer::Start(s) => s,
        ToPageServer::Quit => return Ok(()),
    };
    let mut fds = link.fds.recv()?;
    // Read-only for good: not even mprotect can make this mapping writable.
    let memfd = reopen_read_only(fds.take("memory")?.as_fd())?;
    let mem = Mapping::new(memfd.as_fd(), layout.mem_bytes() as usize, Access::ReadOnly)?;
    let sent = SharedBitmap::open(fds.take("sent")?.as_fd(), layout.pages())?;
    let ret = RecvHalf::new(TcpStream::from(fds.take("return")?), return_tls.as_deref())?;
    let urgent = SendHalf::new(TcpStream::from(fds.take("urgent")?), urgent_tls.as_deref())?;
    let counters = SharedCounters::open(fds.take("counters")?.as_fd())?;
    drop(fds);
    // Every fd is held and mapped: the sandbox goes on before the first
    // request is read and before the command thread starts.
    common::sandbox::enter(&crate::seccomp::POLICY)?;

    // Commands arrive while this thread blocks on the return path; Quit ends
    // the process from the side thread.
    let rx = link.rx;
    std::thread::Builder::new()
        .name("commands".into())
        .spawn(move || loop {
            match rx.recv() {
                Ok(ToPageServer::Start(_)) => log::warn!("ignoring a second Start"),
                Ok(ToPageServer::Quit) | Err(_) => std::process::exit(0),
            }
        })
        .expect("spawn command thread");

    let mut server = Server {
        layout,
        mem,
        sent,
        urgent,
        counters,
        stats: ServerStats::default(),
        buf: vec![0u8; PAGES_PREFIX_LEN + MAX_PAGES_PER_FRAME as usize * PAGE_SIZE + TIMES_LEN],
    };
    let mut reader = FrameReader::new(ret, ConnKind::ReturnPath, layout);
    loop {
        match reader.next_frame() {
            Ok(Frame::Request { range }) => {
                let read_ns = monotonic_ns();
                server.serve(range, read_ns)?
            }
            Ok(Frame::PostcopyDone) => {
                log::info!(
                    "destination has every page; served {} requests",
                    server.stats.requests
                );
                link.tx
                    .send(FromPageServer::PostcopyDone(server.stats.clone()))
                    .map_err(|e| LinkError::Ipc(format!("{e:?}")))?;
            }
            Ok(other) => unreachable!("return path yielded {other:?}"),
            Err(e) if e.is_disconnect() => {
                link.tx
                    .send(FromPageServer::Closed(server.stats.clone()))
                    .map_err(|e| LinkError::Ipc(format!("{e:?}")))?;
                // Wait for Quit on the command thread.
                loop {
                    std::thread::park();
                }
            }
            Err(e) => return Err(ServeError::ReturnPath(e)),
        }
    }
}

struct Server {
    layout: MemLayout,
    mem: Mapping,
    sent: SharedBitmap,
    urgent: SendHalf,
    /// What went out, where the supervisor reads it even after a Quit
    /// ended this process mid-request.
    counters: SharedCounters,
    stats: ServerStats,
    buf: Vec<u8>,
}

impl Server {
    /// Answers the request for `range`, read at `read_ns`
    /// (`CLOCK_MONOTONIC`): the answer that starts with the request's
    /// first page carries a PAGE_TIMES frame in the same write.
    fn serve(&mut self, range: PageRange, read_ns: u64) -> Result<(), ServeError> {
        self.stats.requests += 1;
        self.counters.add(Counter::Requests, 1);
        // Tell the ram-sender where the guest is looking now.
        self.sent.set_hint(range.end());
        let mut run: Option<(u64, u32)> = None;
        for page in range.pages() {
            let p = page.get();
            if self.sent.test_and_set(p) {
                run = match run {
                    Some((first, n)) if first + u64::from(n) == p && n < MAX_PAGES_PER_FRAME => {
                        Some((first, n + 1))
                    }
                    Some((first, n)) => {
                        self.send(first, n, range.first().get(), read_ns)?;
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            } else {
                self.stats.pages_in_flight += 1;
            }
        }
        if let Some((first, n)) = run {
            self.send(first, n, range.first().get(), read_ns)?;
        }
        Ok(())
    }

    /// Sends pages `first..first+count`; if `first` is the first page of
    /// the request (`asked`, read at `read_ns`), a PAGE_TIMES frame follows
    /// in the same write.
    fn send(&mut self, first: u64, count: u32, asked: u64, read_ns: u64) -> Result<(), ServeError> {
        let range = self
            .layout
            .range(first, count)
            .expect("requested pages are in range");
        let n = count as usize;
        let data = &mut self.buf[PAGES_PREFIX_LEN..PAGES_PREFIX_LEN + n * PAGE_SIZE];
        self.mem.read(first as usize * PAGE_SIZE, data);
        let zero = data.chunks_exact(PAGE_SIZE).all(is_zero);
        let mut len = if zero {
            // The data read stays in the buffer, unsent.
            self.buf[..PAGES_PREFIX_LEN].copy_from_slice(&zero_frame(range));
            PAGES_PREFIX_LEN
        } else {
            self.buf[..PAGES_PREFIX_LEN].copy_from_slice(&pages_prefix(range));
            PAGES_PREFIX_LEN + n * PAGE_SIZE
        };
        if first == asked {
            let page = self
                .layout
                .page(first)
                .expect("requested pages are in range");
            let times = page_times_frame(page, read_ns, monotonic_ns());
            self.buf[len..len + TIMES_LEN].copy_from_slice(&times);
            len += TIMES_LEN;
        }
        self.urgent
            .write_all(&self.buf[..len])
            .map_err(ServeError::Urgent)?;
        self.stats.bytes += len as u64;
        self.counters.add(Counter::UrgentBytes, len as u64);
        if zero {
            self.stats.zero_pages += u64::from(count);
            self.counters
                .add(Counter::UrgentZeroPages, u64::from(count));
        } else {
            self.counters.add(Counter::UrgentPages, u64::from(count));
        }
        self.stats.pages_urgent += u64::from(count);
        Ok(())
    }
}
