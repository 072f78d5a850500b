//! The page-server answers the destination's page requests: every requested
//! page is read from the frozen source memory and sent at once on the urgent
//! connection, never queued behind bulk pages. That includes a page whose
//! `sent` bit the push won already: its copy on the main stream may sit
//! behind megabytes of other pages (in our socket buffer, the link, the
//! destination's), and since the source guest is stopped for the whole of
//! postcopy both copies are the same bytes; whichever arrives second finds
//! the page placed (`EEXIST`) and only wakes waiters.

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsFd;

use common::bitmap::{Bitmap, BitmapError, SharedBitmap};
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

/// A request at most this many pages after the previous one is "in
/// order" for the read-ahead: 256 pages (1 MiB), room for a guest that
/// touched the previous read-ahead and some pages the push delivered.
const SEQUENTIAL_GAP: u64 = 256;

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
        prefetch,
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
    // Every thread of this role is on a fault's path: nice -10 for the
    // process, set while still privileged (common::priority).
    common::priority::make_urgent();
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
        answered: Bitmap::new(layout.pages()),
        prefetch: u64::from(prefetch),
        last_asked: None,
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
    /// Pages this process has sent on urgent: each goes out here once.
    answered: Bitmap,
    /// Read-ahead after each request, in pages ([`ServerSetup::prefetch`]).
    prefetch: u64,
    /// The last page of the previous request (the read-ahead's "in order").
    last_asked: Option<u64>,
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
            if !self.answered.set(p) {
                // Answered once already: a destination asks once per page,
                // and whatever it asks, at most guest memory goes out here.
                continue;
            }
            if !self.sent.test_and_set(p) {
                // Claimed by the push already: sent again (see the module
                // docs), at the cost of one duplicate page on the wire.
                self.stats.pages_in_flight += 1;
            }
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
        }
        if let Some((first, n)) = run {
            self.send(first, n, range.first().get(), read_ns)?;
        }
        self.read_ahead(range.end())
    }

    /// Read-ahead after a request that ended at `from`: the pages from
    /// `from` on, up to [`ServerSetup::prefetch`] of them and never past
    /// guest memory, as one run behind the answer. A guest that touches
    /// memory in order asks for them next, and the push's copies would
    /// wait behind its queue.
    ///
    /// Which pages: after a request that follows the previous one in order
    /// (at most [`SEQUENTIAL_GAP`] pages further on), every page this
    /// process has not sent yet, those the push claimed included: the push
    /// follows the guest (the hint), so its copies of the pages just ahead
    /// are the ones still queued behind older bulk, and a duplicate is the
    /// same bytes. After any other request only pages nobody claimed yet,
    /// stopping at the first claimed one: no duplicate for a guest that
    /// jumps around.
    fn read_ahead(&mut self, from: u64) -> Result<(), ServeError> {
        let asked = from - 1;
        let sequential = self
            .last_asked
            .is_some_and(|l| asked > l && asked - l <= SEQUENTIAL_GAP);
        self.last_asked = Some(asked);
        let end = (from + self.prefetch).min(self.layout.pages());
        let mut n = 0u64;
        while from + n < end {
            let p = from + n;
            if self.answered.get(p) {
                break;
            }
            let won = self.sent.test_and_set(p);
            if !won && !sequential {
                break;
            }
            if !won {
                self.stats.pages_in_flight += 1;
            }
            self.answered.set(p);
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        self.stats.pages_prefetched += n;
        // No request starts here: no PAGE_TIMES.
        self.send(from, n as u32, u64::MAX, 0)
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
