//! The real fault-handler process against fakes of everything around it. This
//! test is the destination supervisor (memfd, `received` bitmap, digest
//! table), the source (main stream and urgent pages written by hand, page
//! requests read off the return path) and the destination guest: it maps
//! guest memory, owns the userfaultfd for its own address space, and its
//! "guest threads" read pages that are not there yet and block until the
//! fault-handler places them.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::bitmap::SharedBitmap;
use common::counters::{Counter, SharedCounters};
use common::digest::page_digest;
use common::mem::{create_memfd, Access, Mapping};
use common::msg::{
    FromFaultHandler, HandlerSetup, HandlerStart, PostcopyStats, RecvProgress, ToFaultHandler,
};
use common::types::{MemLayout, PageRange, PAGE_SIZE};
use common::uffd::{Uffd, POSTCOPY_FEATURES};
use common::wire::{
    discard_frames, empty_frame, fence_frame, frame_header, message_frame, pages_prefix,
    round_frame, zero_frame, ConnKind, Frame, FrameReader, FrameType, Package, WireError,
    FRAME_HEADER_LEN, RANGE_LEN,
};
use ipc_channel::ipc::IpcReceiver;
use ipc_channel::TryRecvError;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use supervisor::spawn::{spawn_exe, Child};
use supervisor::verify::compare_digests;

/// Longest wait for anything the role is expected to do.
const PATIENCE: Duration = Duration::from_secs(5);
/// How long silence must last before "nothing was sent" is believed.
const QUIET: Duration = Duration::from_millis(300);

/// Content of `page` in its `version`: every word names page, version and
/// position, so a stale, torn or misplaced page cannot pass for this one.
fn page_bytes(page: u64, version: u8) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        let word = (1 << 63) | (u64::from(version) << 48) | (page << 20) | i as u64;
        w.copy_from_slice(&word.to_le_bytes());
    }
    b
}

fn zero_page() -> Vec<u8> {
    vec![0; PAGE_SIZE]
}

/// A whole PAGES frame carrying `version` of each page of `range`.
fn pages_frame(range: PageRange, version: u8) -> Vec<u8> {
    let mut f = pages_prefix(range).to_vec();
    for p in range.pages() {
        f.extend(page_bytes(p.get(), version));
    }
    f
}

/// A PAGES-shaped frame from raw fields, so a test can write what
/// [`pages_prefix`] refuses to build.
fn raw_pages_frame(ty: u8, first: u64, count: u32, fill: u8) -> Vec<u8> {
    let len = RANGE_LEN + count as usize * PAGE_SIZE;
    let mut f = frame_header(FrameType::Pages, len as u32).to_vec();
    f[0] = ty;
    f.extend_from_slice(&first.to_le_bytes());
    f.extend_from_slice(&count.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.resize(FRAME_HEADER_LEN + len, fill);
    f
}

fn package_frame(listen: bool) -> Vec<u8> {
    message_frame(FrameType::Package, &package(listen), "package").expect("package")
}

fn package(listen: bool) -> Package {
    Package {
        listen,
        run: true,
        guest_state: b"registers".to_vec(),
    }
}

/// Both ends of a loopback TCP connection: (ours, the role's).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (theirs, _) = listener.accept().expect("accept");
    (ours, theirs)
}

/// What the fault-handler says on the return path.
#[derive(Debug, PartialEq)]
enum Ret {
    Request(PageRange),
    PostcopyDone,
}

/// The destination host around one fault-handler process.
struct Dest {
    layout: MemLayout,
    child: Child<ToFaultHandler, FromFaultHandler>,
    rx: IpcReceiver<FromFaultHandler>,
    memfd: OwnedFd,
    /// The guest's mapping; guest threads hold it while they may be blocked.
    guest: Arc<Mapping>,
    /// The guest's userfaultfd (the role got a dup).
    uffd: Uffd,
    received: SharedBitmap,
    digests: Mapping,
    /// The supervisor's counter block the role adds to.
    counters: SharedCounters,
    /// Our end of the main stream: we are the ram-sender.
    main: TcpStream,
    /// Our end of the urgent connection: we are the page-server.
    urgent: TcpStream,
    /// Our ends of the extra bulk streams (stream 1 first).
    bulk: Vec<TcpStream>,
    /// Our end of the return path: the role's requests arrive here.
    ret: FrameReader<TcpStream>,
    reaped: bool,
    _held: Vec<OwnedFd>,
}

impl Dest {
    /// Starts a fault-handler for `pages` pages of guest memory, with a
    /// digest table and, when `postcopy`, the guest's userfaultfd.
    fn start(pages: u64, postcopy: bool) -> Dest {
        Dest::start_vcpus(pages, postcopy, 1)
    }

    /// As `start`, for a guest of `vcpus` threads (blocktime).
    fn start_vcpus(pages: u64, postcopy: bool, vcpus: u32) -> Dest {
        Dest::start_streams(pages, postcopy, vcpus, 1)
    }

    /// As `start_vcpus`, with `streams` bulk streams (the main one
    /// included).
    fn start_streams(pages: u64, postcopy: bool, vcpus: u32, streams: u32) -> Dest {
        let layout = MemLayout::new(pages * PAGE_SIZE as u64).expect("layout");
        let len = layout.mem_bytes() as usize;
        let memfd = create_memfd("guest", layout.mem_bytes()).expect("memfd");
        let guest = Arc::new(Mapping::new(memfd.as_fd(), len, Access::ReadWrite).expect("map"));
        let uffd = Uffd::with_features(true, POSTCOPY_FEATURES).expect("userfaultfd");
        let (received, received_fd) =
            SharedBitmap::create("received", pages).expect("received bitmap");
        let digests_fd = create_memfd("digests", pages * 8).expect("digests memfd");
        let (counters, counters_fd) = SharedCounters::create("counters").expect("counters");
        let digests =
            Mapping::new(digests_fd.as_fd(), pages as usize * 8, Access::ReadOnly).expect("map");
        let (main, main_theirs) = tcp_pair();
        let (ret, ret_theirs) = tcp_pair();
        let (urgent, urgent_theirs) = tcp_pair();
        let (bulk, bulk_theirs): (Vec<_>, Vec<_>) = (1..streams).map(|_| tcp_pair()).unzip();

        let exe = Path::new(env!("CARGO_BIN_EXE_fault-handler"));
        let mut child: Child<ToFaultHandler, FromFaultHandler> =
            spawn_exe("fault-handler", exe).expect("spawn fault-handler");
        let rx = child.rx.take().expect("fresh child");
        child
            .send(ToFaultHandler::Start(HandlerSetup {
                layout,
                guest_base: guest.remote_addr(),
                postcopy,
                digests: true,
                resume: HandlerStart::Fresh,
                vcpus,
                main_tls: None,
                return_tls: None,
                urgent_tls: None,
                streams,
                bulk_tls: vec![],
            }))
            .expect("send Start");
        let mut fds = vec![
            ("memory", memfd.as_fd()),
            ("received", received_fd.as_fd()),
            ("main", main_theirs.as_fd()),
            ("return", ret_theirs.as_fd()),
            ("urgent", urgent_theirs.as_fd()),
            ("counters", counters_fd.as_fd()),
        ];
        for (n, b) in bulk_theirs.iter().enumerate() {
            fds.push((common::msg::BULK_FD_NAMES[n + 1], b.as_fd()));
        }
        if postcopy {
            fds.push(("uffd", uffd.as_fd()));
        }
        fds.push(("digests", digests_fd.as_fd()));
        child.send_fds(&fds).expect("send fds");
        // The role holds its own copies now; ours would hide its exit.
        drop((main_theirs, ret_theirs, urgent_theirs, bulk_theirs));
        Dest {
            layout,
            child,
            rx,
            memfd,
            guest,
            uffd,
            received,
            digests,
            main,
            urgent,
            bulk,
            ret: FrameReader::new(ret, ConnKind::ReturnPath, layout),
            reaped: false,
            counters,
            _held: vec![received_fd, digests_fd, counters_fd],
        }
    }

    fn range(&self, first: u64, count: u32) -> PageRange {
        self.layout
            .range(first, count)
            .expect("test range in bounds")
    }

    fn send_main(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.main, bytes).expect("write the main stream");
    }

    /// Writes on extra bulk stream `n` (1-based, like the wire).
    fn send_bulk(&mut self, n: usize, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.bulk[n - 1], bytes).expect("write a bulk stream");
    }

    fn send_urgent(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.urgent, bytes).expect("write the urgent connection");
    }

    /// The next message to the supervisor other than Progress.
    fn recv(&self) -> FromFaultHandler {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.try_recv_timeout(left) {
                Ok(FromFaultHandler::Progress(_)) => continue,
                Ok(m) => return m,
                Err(TryRecvError::Empty) => {
                    panic!("fault-handler said nothing within {PATIENCE:?}")
                }
                Err(TryRecvError::IpcError(e)) => panic!("fault-handler channel: {e:?}"),
            }
        }
    }

    /// Nothing but progress reaches the supervisor for a while.
    fn expect_silence(&self) {
        let deadline = Instant::now() + QUIET;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.try_recv_timeout(left) {
                Ok(FromFaultHandler::Progress(_)) => continue,
                Ok(m) => panic!("expected nothing yet, got {m:?}"),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::IpcError(e)) => panic!("fault-handler channel: {e:?}"),
            }
        }
    }

    /// Waits for the package to be announced; checks it came through whole.
    fn expect_package(&self, listen: bool) -> RecvProgress {
        match self.recv() {
            FromFaultHandler::Package(pkg, progress) => {
                assert_eq!(pkg, package(listen));
                progress
            }
            other => panic!("expected Package, got {other:?}"),
        }
    }

    /// What the destination supervisor does on Package{listen}: the guest
    /// registers its memory, then the fault-handler hears Listening.
    fn listen(&self) {
        self.uffd
            .register_missing(self.guest.remote_addr(), self.layout.mem_bytes())
            .expect("register guest memory");
        self.child
            .send(ToFaultHandler::Listening)
            .expect("send Listening");
    }

    /// The next frame on the return path, or None after `timeout` of silence.
    fn next_ret(&mut self, timeout: Duration) -> Option<Ret> {
        self.ret
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("return path timeout");
        match self.ret.next_frame() {
            Ok(Frame::Request { range }) => Some(Ret::Request(range)),
            Ok(Frame::PostcopyDone) => Some(Ret::PostcopyDone),
            Ok(other) => unreachable!("the return path only yields these, got {other:?}"),
            Err(WireError::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                None
            }
            Err(e) => panic!("return path: {e}"),
        }
    }

    fn expect_request(&mut self, page: u64) {
        let want = Ret::Request(self.range(page, 1));
        assert_eq!(
            self.next_ret(PATIENCE),
            Some(want),
            "request for page {page}"
        );
    }

    fn expect_quiet_return_path(&mut self) {
        if let Some(r) = self.next_ret(QUIET) {
            panic!("nothing more should come on the return path, got {r:?}");
        }
    }

    /// POSTCOPY_DONE on the return path, then the stats to the supervisor.
    fn expect_postcopy_done(&mut self) -> (PostcopyStats, RecvProgress) {
        assert_eq!(self.next_ret(PATIENCE), Some(Ret::PostcopyDone));
        match self.recv() {
            FromFaultHandler::PostcopyDone(stats, progress) => (stats, progress),
            other => panic!("expected PostcopyDone, got {other:?}"),
        }
    }

    /// Page `page` as it is in the memfd (pread: never faults).
    fn memfd_page(&self, page: u64) -> Vec<u8> {
        let mut b = zero_page();
        let n = nix::sys::uio::pread(&self.memfd, &mut b, (page * PAGE_SIZE as u64) as i64)
            .expect("pread guest memory");
        assert_eq!(n, PAGE_SIZE);
        b
    }

    fn digest(&self, page: u64) -> u64 {
        self.digests.atomic_words()[page as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `page` is marked received (its digest is recorded first).
    fn wait_received(&self, page: u64) {
        let deadline = Instant::now() + PATIENCE;
        while !self.received.get(page) {
            assert!(
                Instant::now() < deadline,
                "page {page} never marked received"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Memory, `received` and digests all say each page holds `want(page)`.
    fn assert_memory(&self, want: impl Fn(u64) -> Vec<u8>) {
        for p in 0..self.layout.pages() {
            let want = want(p);
            assert!(self.memfd_page(p) == want, "page {p} holds the wrong bytes");
            assert!(self.received.get(p), "page {p} not marked received");
            assert_eq!(self.digest(p), page_digest(&want), "digest of page {p}");
        }
        assert!(self.received.is_full());
        assert_eq!(self.received.count(), self.layout.pages());
    }

    /// A guest thread reading `page` through the registered mapping.
    fn guest_read(&self, page: u64, start: Option<Arc<Barrier>>) -> GuestRead {
        let guest = self.guest.clone();
        let (tid_tx, tid) = mpsc::channel();
        let (data_tx, data) = mpsc::channel();
        std::thread::spawn(move || {
            if let Some(b) = start {
                b.wait();
            }
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let mut b = zero_page();
            guest.read(page as usize * PAGE_SIZE, &mut b);
            let _ = data_tx.send(b);
        });
        GuestRead { page, tid, data }
    }

    fn wait_exit(&mut self) -> WaitStatus {
        let pid = Pid::from_raw(self.child.pid as i32);
        let deadline = Instant::now() + PATIENCE;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)).expect("waitpid") {
                WaitStatus::StillAlive if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                WaitStatus::StillAlive => panic!("fault-handler still running after {PATIENCE:?}"),
                status => {
                    self.reaped = true;
                    return status;
                }
            }
        }
    }

    /// Quit, and a clean exit.
    fn quit(&mut self) {
        self.child.send(ToFaultHandler::Quit).expect("send Quit");
        let pid = Pid::from_raw(self.child.pid as i32);
        assert_eq!(self.wait_exit(), WaitStatus::Exited(pid, 0));
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        if !self.reaped {
            self.child.kill();
            let _ = waitpid(Pid::from_raw(self.child.pid as i32), None);
        }
        // Frees any guest thread still blocked: it reads zeros and ends.
        let _ = self
            .uffd
            .unregister(self.guest.remote_addr(), self.layout.mem_bytes());
    }
}

/// A guest thread's read of one page.
struct GuestRead {
    page: u64,
    tid: Receiver<i32>,
    data: Receiver<Vec<u8>>,
}

impl GuestRead {
    fn bytes(&self) -> Vec<u8> {
        self.data
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("the guest read of page {} never finished", self.page))
    }

    /// Waits until the thread sleeps in its page fault, and checks that it
    /// has not read anything yet.
    fn wait_blocked(&self) {
        let tid = self
            .tid
            .recv_timeout(PATIENCE)
            .expect("guest thread started");
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(
                self.data.try_recv().is_err(),
                "the guest read page {} before it was placed",
                self.page
            );
            if blocked_in_fault(tid) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "guest thread {tid} never blocked on page {}",
                self.page
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn assert_not_done(&self) {
        assert!(
            self.data.try_recv().is_err(),
            "the guest read page {} before it was placed",
            self.page
        );
    }
}

/// True when thread `tid` of this process sleeps outside any system call:
/// after it announced its read, that can only be the userfaultfd wait.
fn blocked_in_fault(tid: i32) -> bool {
    let read = |what: &str| std::fs::read_to_string(format!("/proc/self/task/{tid}/{what}"));
    let (Ok(stat), Ok(syscall)) = (read("stat"), read("syscall")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    let nr: i64 = syscall
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    matches!(state, "S" | "D") && nr < 0
}

// ---------------------------------------------------------------- precopy

#[test]
fn plain_precopy_places_exactly_what_was_sent() {
    const PAGES: u64 = 64;
    let mut d = Dest::start(PAGES, false);
    let mut sent = Vec::new();
    // Round 1: everything, part of it as zeros.
    sent.extend(pages_frame(d.range(0, 32), 1));
    sent.extend(zero_frame(d.range(32, 16)));
    sent.extend(pages_frame(d.range(48, 16), 1));
    sent.extend(round_frame(1));
    // Round 2: dirtied pages again; a data page now zero, a zero page now data.
    sent.extend(pages_frame(d.range(5, 2), 2));
    sent.extend(zero_frame(d.range(10, 1)));
    sent.extend(pages_frame(d.range(40, 1), 2));
    sent.extend(round_frame(2));
    sent.extend(package_frame(false));
    sent.extend(empty_frame(FrameType::Eos));
    d.send_main(&sent);

    d.expect_package(false);
    let progress = match d.recv() {
        FromFaultHandler::PrecopyDone(p) => p,
        other => panic!("expected PrecopyDone, got {other:?}"),
    };
    assert_eq!(progress.pages_received, PAGES);
    assert_eq!(progress.rounds, 2);
    assert_eq!(progress.discarded, 0);
    // Complete at the package: the end of the stream is not counted yet.
    let eos = empty_frame(FrameType::Eos).len();
    assert_eq!(progress.bytes, (sent.len() - eos) as u64);
    d.assert_memory(|p| match p {
        5 | 6 | 40 => page_bytes(p, 2),
        10 | 32..48 => zero_page(),
        _ => page_bytes(p, 1),
    });
    d.expect_quiet_return_path();
    d.quit();
}

// ---------------------------------------------------------------- postcopy

#[test]
fn discarded_page_is_fetched_fresh_never_stale() {
    const P: u64 = 5;
    let mut d = Dest::start(16, true);
    let mut sent = pages_frame(d.range(0, 16), 1);
    sent.extend(discard_frames(&[d.range(P, 1)]));
    sent.extend(package_frame(true));
    d.send_main(&sent);

    let progress = d.expect_package(true);
    assert_eq!(progress.discarded, 1);
    assert_eq!(progress.pages_received, 15);
    assert!(!d.received.get(P), "a discarded page is not received");
    assert_eq!(d.digest(P), 0, "a discarded page has no digest");
    assert!(
        d.memfd_page(P) == zero_page(),
        "discard left the stale page"
    );
    d.listen();

    let reader = d.guest_read(P, None);
    d.expect_request(P);
    reader.wait_blocked();
    d.expect_quiet_return_path();
    reader.assert_not_done();
    let v2 = page_bytes(P, 2);
    d.send_urgent(&pages_frame(d.range(P, 1), 2));
    let seen = reader.bytes();
    assert!(seen != page_bytes(P, 1), "the guest read the stale page");
    assert!(seen != zero_page(), "the guest read zeros");
    assert!(seen == v2, "the guest read neither version");
    d.wait_received(P);
    assert_eq!(d.digest(P), page_digest(&v2));

    // That was the last page: the migration completes.
    let (stats, _) = d.expect_postcopy_done();
    assert_eq!(stats.requests, 1, "{stats:?}");
    assert_eq!(stats.pages_urgent, 1, "{stats:?}");
    d.assert_memory(|p| page_bytes(p, if p == P { 2 } else { 1 }));
    d.quit();
}

#[test]
fn two_threads_faulting_one_page_cause_one_request() {
    const P: u64 = 3;
    let mut d = Dest::start_vcpus(8, true, 2);
    let mut sent = pages_frame(d.range(0, 3), 1);
    sent.extend(pages_frame(d.range(4, 4), 1));
    sent.extend(package_frame(true));
    d.send_main(&sent);
    d.expect_package(true);
    d.listen();

    let start = Arc::new(Barrier::new(2));
    let readers = [
        d.guest_read(P, Some(start.clone())),
        d.guest_read(P, Some(start)),
    ];
    for r in &readers {
        r.wait_blocked();
    }
    d.expect_request(P);
    d.expect_quiet_return_path();
    d.send_urgent(&pages_frame(d.range(P, 1), 1));
    for r in &readers {
        assert!(
            r.bytes() == page_bytes(P, 1),
            "a guest thread saw the wrong page"
        );
    }

    let (stats, _) = d.expect_postcopy_done();
    assert_eq!(stats.requests, 1, "{stats:?}");
    assert_eq!(stats.faults, 2, "{stats:?}");
    assert_eq!(stats.latency.count, 2, "{stats:?}");
    // Both guest threads (the two vCPUs) waited for the same page: each
    // has its blocktime, and all were blocked at once for at most the
    // shorter of the two.
    assert_eq!(stats.vcpu_blocktime.len(), 2, "{stats:?}");
    for b in &stats.vcpu_blocktime {
        assert_eq!(b.faults, 1, "{stats:?}");
        assert!(b.blocked_us >= stats.blocktime_us, "{stats:?}");
    }
    // The supervisor reads the same figures from its counter block.
    assert_eq!(d.counters.get(Counter::Faults), 2);
    assert_eq!(d.counters.get(Counter::BlocktimeUs), stats.blocktime_us);
    assert_eq!(d.counters.thread_blocktimes(), stats.vcpu_blocktime);
    d.assert_memory(|p| page_bytes(p, 1));
    d.quit();
}

#[test]
fn zero_page_from_precopy_is_resolved_without_a_request() {
    const NEVER_WRITTEN: u64 = 2;
    const ZEROED: u64 = 6;
    let mut d = Dest::start(8, true);
    let mut sent = pages_frame(d.range(0, 2), 1);
    sent.extend(zero_frame(d.range(NEVER_WRITTEN, 1)));
    sent.extend(pages_frame(d.range(3, 4), 1));
    // Page 6 had data once and was zero when sent again.
    sent.extend(zero_frame(d.range(ZEROED, 1)));
    sent.extend(package_frame(true));
    d.send_main(&sent);
    d.expect_package(true);
    d.listen();

    for page in [NEVER_WRITTEN, ZEROED] {
        let reader = d.guest_read(page, None);
        assert!(reader.bytes() == zero_page(), "page {page} is not zeros");
    }
    d.expect_quiet_return_path();

    // Page 7 comes on the main stream; nothing faulted on it.
    d.send_main(&pages_frame(d.range(7, 1), 1));
    let (stats, _) = d.expect_postcopy_done();
    assert_eq!(stats.requests, 0, "{stats:?}");
    // Both reads did fault, and neither waited for the source.
    assert_eq!(stats.faults, 2, "{stats:?}");
    assert_eq!(stats.faults_local, 2, "{stats:?}");
    assert_eq!(stats.pages_background, 1, "{stats:?}");
    d.assert_memory(|p| match p {
        NEVER_WRITTEN | ZEROED => zero_page(),
        _ => page_bytes(p, 1),
    });
    d.quit();
}

#[test]
fn postcopy_completes_when_every_page_is_placed() {
    const PAGES: u64 = 32;
    let mut d = Dest::start(PAGES, true);
    // Precopy: 0..8 data, 8..12 zero, 12..16 data; 2 and 13 dirtied since.
    let mut sent = pages_frame(d.range(0, 8), 1);
    sent.extend(zero_frame(d.range(8, 4)));
    sent.extend(pages_frame(d.range(12, 4), 1));
    sent.extend(discard_frames(&[d.range(2, 1), d.range(13, 1)]));
    sent.extend(package_frame(true));
    d.send_main(&sent);
    let progress = d.expect_package(true);
    assert_eq!(progress.pages_received, 14);
    d.listen();

    // Faults: a discarded page, two never sent (one of them zero on the
    // source), and a zero page from precopy (resolved here).
    let mut requests = 0;
    for (page, version) in [(2, Some(2)), (20, Some(1)), (27, None)] {
        let reader = d.guest_read(page, None);
        d.expect_request(page);
        requests += 1;
        reader.wait_blocked();
        let range = d.range(page, 1);
        let (frame, want) = match version {
            Some(v) => (pages_frame(range, v), page_bytes(page, v)),
            None => (zero_frame(range).to_vec(), zero_page()),
        };
        d.send_urgent(&frame);
        assert!(reader.bytes() == want, "guest read of page {page}");
    }
    let local = d.guest_read(9, None);
    assert!(local.bytes() == zero_page());
    d.expect_quiet_return_path();

    // The background push: everything else, then the end of the stream.
    let mut push = pages_frame(d.range(13, 1), 2);
    push.extend(pages_frame(d.range(16, 4), 1));
    push.extend(pages_frame(d.range(21, 6), 1));
    push.extend(pages_frame(d.range(28, 4), 1));
    push.extend(empty_frame(FrameType::Eos));
    d.send_main(&push);

    let (stats, progress) = d.expect_postcopy_done();
    assert_eq!(stats.requests, requests, "{stats:?}");
    assert_eq!(stats.faults, 4, "{stats:?}");
    assert_eq!(stats.faults_local, 1, "{stats:?}");
    assert_eq!(stats.pages_urgent, 3, "{stats:?}");
    assert_eq!(stats.pages_background, 15, "{stats:?}");
    assert!(stats.latency.count >= 4, "{stats:?}");
    assert_eq!(stats.latency.count, stats.faults, "{stats:?}");
    assert_eq!(
        stats.latency.hist_log2_us.iter().sum::<u64>(),
        stats.latency.count
    );
    assert_eq!(progress.pages_received, PAGES);
    assert_eq!(progress.discarded, 2);
    d.assert_memory(|p| match p {
        2 | 13 => page_bytes(p, 2),
        8..=11 | 27 => zero_page(),
        _ => page_bytes(p, 1),
    });
    d.expect_quiet_return_path();
    d.quit();
}

#[test]
fn postcopy_done_counts_every_byte_received() {
    let mut d = Dest::start(4, true);
    let mut sent = pages_frame(d.range(0, 1), 1);
    sent.extend(package_frame(true));
    d.send_main(&sent);
    d.expect_package(true);
    d.listen();
    let reader = d.guest_read(3, None);
    d.expect_request(3);
    let urgent = pages_frame(d.range(3, 1), 1);
    d.send_urgent(&urgent);
    assert!(reader.bytes() == page_bytes(3, 1));
    // The background push places the last pages, then ends the stream.
    let mut push = pages_frame(d.range(1, 2), 1);
    push.extend(empty_frame(FrameType::Eos));
    d.send_main(&push);

    let (_, progress) = d.expect_postcopy_done();
    assert_eq!(progress.pages_received, 4);
    // EOS may be read after completion; every page frame is in by then.
    let page_bytes_in = (sent.len() + push.len() - FRAME_HEADER_LEN + urgent.len()) as u64;
    assert!(
        progress.bytes >= page_bytes_in,
        "PostcopyDone reports {} bytes received, but {page_bytes_in} bytes of frames \
         (main {} + urgent {}) were placed before it",
        progress.bytes,
        sent.len() + push.len() - FRAME_HEADER_LEN,
        urgent.len()
    );
    assert!(
        progress.bytes <= page_bytes_in + FRAME_HEADER_LEN as u64,
        "PostcopyDone reports {} bytes received, more than the {} sent",
        progress.bytes,
        page_bytes_in + FRAME_HEADER_LEN as u64
    );
    d.quit();
}

// ---------------------------------------------------------------- hostile source

/// Guest memory of the hostile-source tests.
const HOSTILE_PAGES: u64 = 16;

fn hostile_range(first: u64, count: u32) -> PageRange {
    let layout = MemLayout::new(HOSTILE_PAGES * PAGE_SIZE as u64).expect("layout");
    layout.range(first, count).expect("test range in bounds")
}

/// Feeds `bytes` to a fresh fault-handler's main stream (then closes it when
/// `close`); checks the role reported an error and exited non-zero; returns
/// the error text and the destination, for its memory to be checked.
fn hostile_main(bytes: &[u8], close: bool) -> (String, Dest) {
    let mut d = Dest::start(HOSTILE_PAGES, true);
    d.send_main(bytes);
    if close {
        d.main
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    }
    let text = match d.recv() {
        FromFaultHandler::Error(text) => text,
        other => panic!("expected an Error, got {other:?}"),
    };
    let status = d.wait_exit();
    assert!(
        matches!(status, WaitStatus::Exited(_, code) if code != 0),
        "fault-handler must exit non-zero after {text:?}, got {status:?}"
    );
    (text, d)
}

/// Only `placed` pages hold anything; every other page is untouched.
fn assert_only_placed(d: &Dest, placed: &[u64]) {
    for p in 0..d.layout.pages() {
        if placed.contains(&p) {
            assert!(d.memfd_page(p) == page_bytes(p, 1), "page {p}");
            assert!(d.received.get(p));
        } else {
            assert!(d.memfd_page(p) == zero_page(), "page {p} was written");
            assert!(!d.received.get(p), "page {p} marked received");
            assert_eq!(d.digest(p), 0, "page {p} has a digest");
        }
    }
}

#[test]
fn pages_beyond_guest_memory_are_refused() {
    // The range starts on the last real page and runs one past it.
    let mut bytes = pages_frame(hostile_range(0, 1), 1);
    bytes.extend(raw_pages_frame(
        FrameType::Pages.code(),
        HOSTILE_PAGES - 1,
        2,
        0xee,
    ));
    let (text, d) = hostile_main(&bytes, false);
    assert!(text.contains("outside") && text.contains("15"), "{text}");
    assert!(text.contains("PAGES"), "{text}");
    assert_only_placed(&d, &[0]);
}

#[test]
fn page_past_the_end_is_refused() {
    let frame = raw_pages_frame(FrameType::Pages.code(), HOSTILE_PAGES, 1, 0xee);
    let (text, d) = hostile_main(&frame, false);
    assert!(text.contains("outside") && text.contains("16"), "{text}");
    assert_only_placed(&d, &[]);
}

#[test]
fn unknown_frame_type_is_refused() {
    let mut bytes = pages_frame(hostile_range(0, 1), 1);
    // Shaped like a PAGES frame for page 1, with a type nobody defined.
    bytes.extend(raw_pages_frame(0x7f, 1, 1, 0xee));
    let (text, d) = hostile_main(&bytes, false);
    assert!(text.contains("unknown frame type 0x7f"), "{text}");
    assert!(text.contains("main-stream"), "{text}");
    assert_only_placed(&d, &[0]);
}

#[test]
fn stream_cut_inside_a_pages_frame_is_refused() {
    let mut bytes = pages_frame(hostile_range(0, 1), 1);
    let torn = pages_frame(hostile_range(1, 2), 1);
    bytes.extend_from_slice(&torn[..torn.len() - PAGE_SIZE / 2]);
    let (text, d) = hostile_main(&bytes, true);
    assert!(text.contains("closed in the middle"), "{text}");
    assert!(text.contains("main-stream"), "{text}");
    assert_only_placed(&d, &[0]);
}

#[test]
fn discard_naming_memory_outside_the_guest_discards_nothing() {
    let mut bytes = pages_frame(hostile_range(0, 2), 1);
    // One good range, one past the end: neither may be applied.
    let mut discard = discard_frames(&[hostile_range(0, 1), hostile_range(1, 1)]);
    let second = FRAME_HEADER_LEN + RANGE_LEN;
    discard[second..second + 8].copy_from_slice(&40u64.to_le_bytes());
    bytes.extend(discard);
    let (text, d) = hostile_main(&bytes, false);
    assert!(
        text.contains("DISCARD") && text.contains("outside") && text.contains("40"),
        "{text}"
    );
    assert_only_placed(&d, &[0, 1]);
}

#[test]
fn malformed_package_is_refused() {
    let mut bytes = pages_frame(hostile_range(0, 1), 1);
    bytes.extend(frame_header(FrameType::Package, 4));
    bytes.extend([0xc1; 4]);
    let (text, d) = hostile_main(&bytes, false);
    assert!(text.contains("malformed device-state package"), "{text}");
    assert_only_placed(&d, &[0]);
}

#[test]
fn urgent_page_before_listening_is_refused() {
    let mut d = Dest::start(HOSTILE_PAGES, true);
    let mut sent = pages_frame(d.range(0, 1), 1);
    sent.extend(package_frame(true));
    d.send_main(&sent);
    d.expect_package(true);
    // The guest has not registered yet: a page now could only be written
    // around the userfaultfd.
    d.send_urgent(&pages_frame(d.range(1, 1), 1));
    let text = match d.recv() {
        FromFaultHandler::Error(text) => text,
        other => panic!("expected an Error, got {other:?}"),
    };
    assert!(
        text.contains("page 1") && text.contains("before guest memory was registered"),
        "{text}"
    );
    let status = d.wait_exit();
    assert!(
        matches!(status, WaitStatus::Exited(_, code) if code != 0),
        "{status:?}"
    );
    assert_only_placed(&d, &[0]);
}

// ---------------------------------------------------------------- amplification

#[test]
fn overlapping_discards_cost_what_the_guest_holds() {
    // A 64 MiB guest and one 1 MiB DISCARD frame naming the whole guest
    // 65536 times: unmerged, that is a billion page operations (seconds of
    // CPU); merged, one pass over 16384 pages.
    const PAGES: u64 = 16384;
    let mut d = Dest::start(PAGES, false);
    let mut sent = pages_frame(d.range(0, 4), 1);
    let whole = d.range(0, PAGES as u32);
    sent.extend(discard_frames(&vec![
        whole;
        common::wire::MAX_DISCARD_RANGES
    ]));
    sent.extend(common::wire::mark_frame(1));
    let t = Instant::now();
    d.send_main(&sent);
    let progress = match d.recv() {
        FromFaultHandler::Mark(1, p) => p,
        other => panic!("expected Mark 1, got {other:?}"),
    };
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "one DISCARD frame took {took:?}"
    );
    assert_eq!(progress.discarded, PAGES, "counted once per page");
    assert_eq!(progress.pages_received, 0);
    for p in 0..4 {
        assert!(
            d.memfd_page(p) == zero_page(),
            "page {p} survived the discard"
        );
        assert_eq!(d.digest(p), 0);
    }
    d.quit();
}

#[test]
fn zero_frame_over_the_cap_is_refused() {
    let mut bytes = pages_frame(hostile_range(0, 1), 1);
    let mut zero = zero_frame(hostile_range(1, 1)).to_vec();
    let count = FRAME_HEADER_LEN + 8;
    zero[count..count + 4].copy_from_slice(&(common::wire::MAX_PAGES_PER_ZERO + 1).to_le_bytes());
    bytes.extend(zero);
    let (text, d) = hostile_main(&bytes, false);
    assert!(
        text.contains("ZERO") && text.contains("1025") && text.contains("limit of 1024"),
        "{text}"
    );
    assert_only_placed(&d, &[0]);
}

// ---------------------------------------------------------------- bulk streams

/// Guest memory of the two-stream tests: pages 0..256 are pinned to the
/// main stream (stream 0), 256..512 to bulk stream 1.
const TWO_STREAM_PAGES: u64 = 512;
/// A page of bulk stream 1, sent in precopy and dirtied since.
const STALE: u64 = 300;

/// What the source's frozen memory holds at the end: version 1 of every
/// page, version 2 of STALE.
fn frozen(p: u64) -> Vec<u8> {
    page_bytes(p, if p == STALE { 2 } else { 1 })
}

/// The digest check the destination supervisor runs, against `frozen`.
fn digest_mismatches(d: &Dest) -> Vec<u64> {
    let source: Vec<u64> = (0..d.layout.pages())
        .map(|p| page_digest(&frozen(p)))
        .collect();
    compare_digests(&source, &d.digests).mismatch_pages
}

/// The switchover as the main stream carries it with two streams: its
/// precopy pages, the barrier, the discard of STALE, the package.
fn two_stream_main(d: &Dest) -> Vec<u8> {
    let mut main = pages_frame(d.range(0, 256), 1);
    main.extend(fence_frame(1));
    main.extend(discard_frames(&[d.range(STALE, 1)]));
    main.extend(package_frame(true));
    main
}

/// After the package: the push of STALE's fresh copy on its own stream, the
/// ends of both streams, completion.
fn push_and_end(d: &mut Dest) -> PostcopyStats {
    d.listen();
    let mut push = pages_frame(d.range(STALE, 1), 2);
    push.extend(empty_frame(FrameType::Eos));
    d.send_bulk(1, &push);
    d.send_main(&empty_frame(FrameType::Eos));
    d.expect_postcopy_done().0
}

#[test]
fn fence_holds_the_discard_until_every_stream_is_in() {
    let mut d = Dest::start_streams(TWO_STREAM_PAGES, true, 1, 2);
    d.send_main(&two_stream_main(&d));
    // The main stream waits at its FENCE: bulk stream 1 has delivered
    // nothing yet, so the discard must not be applied.
    d.expect_silence();
    // Stream 1's precopy pages, STALE's old copy among them, come late,
    // before that stream's FENCE.
    let mut bulk = pages_frame(d.range(256, 256), 1);
    bulk.extend(fence_frame(1));
    d.send_bulk(1, &bulk);
    let progress = d.expect_package(true);
    assert_eq!(progress.pages_received, TWO_STREAM_PAGES - 1);
    assert!(!d.received.get(STALE), "the discard came before the copy");
    assert_eq!(d.digest(STALE), 0);
    assert!(d.memfd_page(STALE) == zero_page());
    let stats = push_and_end(&mut d);
    assert_eq!(stats.pages_background, 1, "{stats:?}");
    d.assert_memory(frozen);
    assert_eq!(digest_mismatches(&d), Vec::<u64>::new());
    d.quit();
}

#[test]
fn a_copy_that_slips_past_its_fence_is_caught_by_the_digest_check() {
    // The sender's half of the rule: every copy queued on a stream before a
    // barrier is written before that stream's FENCE. A sender that breaks
    // it (here STALE's precopy copy goes out after the FENCE) looks like an
    // honest push on the wire: the stale copy lands after the discard, the
    // fresh one then finds the page present, and only the end-to-end digest
    // check sees it. This is the ordering the barrier exists for.
    let mut d = Dest::start_streams(TWO_STREAM_PAGES, true, 1, 2);
    d.send_main(&two_stream_main(&d));
    let mut bulk = pages_frame(d.range(256, (STALE - 256) as u32), 1);
    bulk.extend(fence_frame(1));
    bulk.extend(pages_frame(d.range(STALE, (512 - STALE) as u32), 1));
    d.send_bulk(1, &bulk);
    d.expect_package(true);
    push_and_end(&mut d);
    assert!(
        d.memfd_page(STALE) == page_bytes(STALE, 1),
        "the stale copy should have won here"
    );
    assert_eq!(digest_mismatches(&d), vec![STALE]);
    d.quit();
}

/// Feeds `bulk` to bulk stream 1 of a fresh two-stream fault-handler;
/// returns the error it reported (it must exit non-zero).
fn hostile_bulk(bulk: &[u8]) -> (String, Dest) {
    let mut d = Dest::start_streams(TWO_STREAM_PAGES, true, 1, 2);
    d.send_bulk(1, bulk);
    let text = match d.recv() {
        FromFaultHandler::Error(text) => text,
        other => panic!("expected an Error, got {other:?}"),
    };
    let status = d.wait_exit();
    assert!(
        matches!(status, WaitStatus::Exited(_, code) if code != 0),
        "fault-handler must exit non-zero after {text:?}, got {status:?}"
    );
    (text, d)
}

#[test]
fn page_on_a_stream_it_is_not_pinned_to_is_refused() {
    // Page 10 travels on the main stream: a copy of it on stream 1 could
    // overtake a newer one there.
    let (text, d) = hostile_bulk(&pages_frame(
        MemLayout::new(TWO_STREAM_PAGES * PAGE_SIZE as u64)
            .unwrap()
            .range(10, 1)
            .unwrap(),
        1,
    ));
    assert!(
        text.contains("on the bulk-stream 1 connection: those pages travel on stream 0 of 2"),
        "{text}"
    );
    assert!(!d.received.get(10));
}

#[test]
fn discard_without_a_fence_is_refused_with_several_streams() {
    let (text, d) = {
        let mut d = Dest::start_streams(TWO_STREAM_PAGES, true, 1, 2);
        let mut main = pages_frame(d.range(0, 4), 1);
        main.extend(discard_frames(&[d.range(0, 1)]));
        d.send_main(&main);
        let text = match d.recv() {
            FromFaultHandler::Error(text) => text,
            other => panic!("expected an Error, got {other:?}"),
        };
        (text, d)
    };
    assert!(
        text.contains("DISCARD on the main stream without a FENCE before it (2 bulk streams)"),
        "{text}"
    );
    assert!(d.received.get(0), "nothing was discarded");
}

#[test]
fn fence_out_of_order_is_refused() {
    let (text, _d) = hostile_bulk(&fence_frame(2));
    assert!(
        text.contains("FENCE 2 on bulk-stream 1, expected 1"),
        "{text}"
    );
}
