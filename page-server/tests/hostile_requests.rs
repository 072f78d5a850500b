//! The real page-server process against fakes of its peers: this test is the
//! source supervisor (guest memory with known content, the shared `sent`
//! bitmap) and the destination (page requests on the return path, pages read
//! back off the urgent connection). Honest requests must be answered exactly
//! once each; hostile ones must end the role with an error that names them,
//! before a single page leaves.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::bitmap::SharedBitmap;
use common::clock::monotonic_ns;
use common::counters::{Counter, SharedCounters};
use common::mem::{create_memfd, write_at};
use common::msg::{FromPageServer, ServerSetup, ServerStats, ToPageServer};
use common::types::{MemLayout, PageRange, PAGE_SIZE};
use common::wire::{
    empty_frame, frame_header, pages_prefix, request_frame, ConnKind, Frame, FrameReader,
    FrameType, WireError, FRAME_HEADER_LEN, MAX_PAGES_PER_FRAME, MAX_PAGES_PER_REQUEST,
    PAGES_PREFIX_LEN, PAGE_TIMES_LEN,
};
use ipc_channel::ipc::IpcReceiver;
use ipc_channel::TryRecvError;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use supervisor::spawn::{spawn_exe, Child};

/// Guest memory: 4 MiB, so one request of the maximum size fits anywhere.
const PAGES: u64 = 1024;
/// Longest wait for anything the role is expected to do.
const PATIENCE: Duration = Duration::from_secs(5);
/// How long silence must last before "nothing was sent" is believed.
const QUIET: Duration = Duration::from_millis(300);

fn layout() -> MemLayout {
    MemLayout::new(PAGES * PAGE_SIZE as u64).expect("layout")
}

fn range(first: u64, count: u32) -> PageRange {
    layout().range(first, count).expect("test range in bounds")
}

/// Pages the source holds as all zeros: scattered ones and one run.
fn is_zero_page(p: u64) -> bool {
    p % 7 == 3 || (40..44).contains(&p)
}

/// The frozen source content of page `p`: every word names its page and its
/// position, so a misplaced, torn or stale page cannot pass for this one.
fn page_bytes(p: u64) -> Vec<u8> {
    if is_zero_page(p) {
        return vec![0; PAGE_SIZE];
    }
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((1 << 63) | (p << 20) | i as u64).to_le_bytes());
    }
    page
}

fn range_bytes(r: PageRange) -> Vec<u8> {
    r.pages().flat_map(|p| page_bytes(p.get())).collect()
}

/// A REQUEST frame from raw fields, so a test can write what
/// [`request_frame`] refuses to build.
fn raw_request(first: u64, count: u32, reserved: u32) -> Vec<u8> {
    let mut b = frame_header(FrameType::Request, 16).to_vec();
    b.extend_from_slice(&first.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&reserved.to_le_bytes());
    b
}

/// Both ends of a loopback TCP connection: (ours, the role's).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (theirs, _) = listener.accept().expect("accept");
    (ours, theirs)
}

/// A page or zero frame read off the urgent connection, owned.
#[derive(Debug, PartialEq)]
enum Urgent {
    Pages { range: PageRange, data: Vec<u8> },
    Zero { range: PageRange },
}

impl Urgent {
    fn range(&self) -> PageRange {
        match self {
            Urgent::Pages { range, .. } | Urgent::Zero { range } => *range,
        }
    }

    /// Bytes this frame took on the wire.
    fn wire_len(&self) -> u64 {
        match self {
            Urgent::Pages { data, .. } => (PAGES_PREFIX_LEN + data.len()) as u64,
            Urgent::Zero { .. } => PAGES_PREFIX_LEN as u64,
        }
    }
}

/// The supervisor and the destination around one page-server process.
struct Source {
    child: Child<ToPageServer, FromPageServer>,
    rx: IpcReceiver<FromPageServer>,
    /// The shared `sent` bitmap, as the ram-sender would see it.
    sent: SharedBitmap,
    /// The shared counters, as the supervisor reads them.
    counters: SharedCounters,
    /// Our end of the return path: we write requests here.
    ret: TcpStream,
    /// Our end of the urgent connection: the role's pages arrive here.
    urgent: FrameReader<TcpStream>,
    /// PAGE_TIMES frames read so far: page, request read, page sent.
    times: Vec<(u64, u64, u64)>,
    reaped: bool,
    /// Held for the role's lifetime, as the supervisor does.
    _memfd: OwnedFd,
    _sent_fd: OwnedFd,
    _counters_fd: OwnedFd,
}

impl Source {
    /// Starts a page-server over memory holding [`page_bytes`], with the
    /// pages in `already_sent` marked as on their way on the main stream.
    fn start(already_sent: &[u64]) -> Source {
        Source::start_with(already_sent, 0)
    }

    /// [`Source::start`] with a read-ahead of `prefetch` pages.
    fn start_with(already_sent: &[u64], prefetch: u32) -> Source {
        let memfd = create_memfd("guest", layout().mem_bytes()).expect("memfd");
        for p in 0..PAGES {
            if !is_zero_page(p) {
                write_at(memfd.as_fd(), p * PAGE_SIZE as u64, &page_bytes(p)).expect("fill");
            }
        }
        let (sent, sent_fd) = SharedBitmap::create("sent", PAGES).expect("sent bitmap");
        for &p in already_sent {
            assert!(sent.test_and_set(p));
        }
        let (counters, counters_fd) = SharedCounters::create("counters").expect("counters");
        let (ret, ret_theirs) = tcp_pair();
        let (urgent, urgent_theirs) = tcp_pair();
        urgent
            .set_read_timeout(Some(PATIENCE))
            .expect("urgent timeout");

        let exe = Path::new(env!("CARGO_BIN_EXE_page-server"));
        let mut child: Child<ToPageServer, FromPageServer> =
            spawn_exe("page-server", exe).expect("spawn page-server");
        let rx = child.rx.take().expect("fresh child");
        child
            .send(ToPageServer::Start(ServerSetup {
                layout: layout(),
                return_tls: None,
                urgent_tls: None,
                prefetch,
            }))
            .expect("send Start");
        child
            .send_fds(&[
                ("memory", memfd.as_fd()),
                ("sent", sent_fd.as_fd()),
                ("return", ret_theirs.as_fd()),
                ("urgent", urgent_theirs.as_fd()),
                ("counters", counters_fd.as_fd()),
            ])
            .expect("send fds");
        // The role holds its own copies now; ours would hide its exit.
        drop((ret_theirs, urgent_theirs));
        Source {
            child,
            rx,
            sent,
            counters,
            ret,
            urgent: FrameReader::new(urgent, ConnKind::Urgent, layout()),
            times: Vec::new(),
            reaped: false,
            _memfd: memfd,
            _sent_fd: sent_fd,
            _counters_fd: counters_fd,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.ret.write_all(bytes).expect("write to the return path");
    }

    fn request(&mut self, first: u64, count: u32) {
        let frame = request_frame(range(first, count));
        self.write(&frame);
    }

    /// The next page or zero frame on the urgent connection, or None if
    /// nothing comes within `timeout`; PAGE_TIMES frames on the way are
    /// kept in `times`.
    fn next_urgent(&mut self, timeout: Duration) -> Option<Urgent> {
        self.urgent
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("urgent timeout");
        loop {
            return match self.urgent.next_frame() {
                Ok(Frame::Pages { range, data }) => Some(Urgent::Pages {
                    range,
                    data: data.to_vec(),
                }),
                Ok(Frame::Zero { range }) => Some(Urgent::Zero { range }),
                Ok(Frame::PageTimes {
                    page,
                    request_read_ns,
                    page_sent_ns,
                }) => {
                    self.times.push((page.get(), request_read_ns, page_sent_ns));
                    continue;
                }
                Ok(other) => unreachable!("the urgent reader only yields pages, got {other:?}"),
                Err(WireError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    None
                }
                Err(e) => panic!("urgent connection: {e}"),
            };
        }
    }

    fn expect_urgent(&mut self) -> Urgent {
        self.next_urgent(PATIENCE)
            .expect("a page on the urgent connection")
    }

    fn expect_quiet_urgent(&mut self) {
        if let Some(f) = self.next_urgent(QUIET) {
            panic!("nothing should have been sent, got {:?}", f.range());
        }
    }

    fn recv(&self) -> FromPageServer {
        match self.rx.try_recv_timeout(PATIENCE) {
            Ok(m) => m,
            Err(TryRecvError::Empty) => panic!("page-server said nothing within {PATIENCE:?}"),
            Err(TryRecvError::IpcError(e)) => panic!("page-server channel: {e:?}"),
        }
    }

    /// Waits for the process to end and returns how it ended.
    fn wait_exit(&mut self) -> WaitStatus {
        let pid = Pid::from_raw(self.child.pid as i32);
        let deadline = Instant::now() + PATIENCE;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)).expect("waitpid") {
                WaitStatus::StillAlive if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                WaitStatus::StillAlive => panic!("page-server still running after {PATIENCE:?}"),
                status => {
                    self.reaped = true;
                    return status;
                }
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if !self.reaped {
            self.child.kill();
            let _ = waitpid(Pid::from_raw(self.child.pid as i32), None);
        }
    }
}

fn assert_pages(frame: &Urgent, first: u64, count: u32) {
    let want = range(first, count);
    match frame {
        Urgent::Pages { range, data } => {
            assert_eq!(*range, want, "PAGES frame for the wrong pages");
            assert!(
                *data == range_bytes(want),
                "{want} arrived with the wrong bytes"
            );
        }
        Urgent::Zero { range } => panic!("{want} expected as data, got a ZERO frame for {range}"),
    }
}

fn assert_zero(frame: &Urgent, first: u64, count: u32) {
    let want = range(first, count);
    assert_eq!(*frame, Urgent::Zero { range: want }, "zero pages {want}");
}

#[test]
fn unsent_pages_go_out_on_urgent_once_with_their_bytes() {
    let mut s = Source::start(&[]);

    s.request(11, 3);
    let f = s.expect_urgent();
    assert_pages(&f, 11, 3);
    assert_eq!(s.sent.hint(), 14, "the hint names the end of the request");

    // Zero pages cost a header, not 4 KiB each.
    s.request(3, 1);
    let f = s.expect_urgent();
    assert_zero(&f, 3, 1);
    assert_eq!(s.sent.hint(), 4);
    s.request(40, 4);
    let f = s.expect_urgent();
    assert_zero(&f, 40, 4);
    assert_eq!(s.sent.hint(), 44);

    // The largest request spans frames of at most MAX_PAGES_PER_FRAME.
    s.request(100, MAX_PAGES_PER_REQUEST);
    let mut next = 100;
    while next < 100 + u64::from(MAX_PAGES_PER_REQUEST) {
        let f = s.expect_urgent();
        let r = f.range();
        assert_eq!(r.first().get(), next, "frames arrive in page order");
        assert!(r.count() <= MAX_PAGES_PER_FRAME);
        assert_pages(&f, next, r.count());
        next = r.end();
    }
    assert_eq!(next, 100 + u64::from(MAX_PAGES_PER_REQUEST));
    assert_eq!(s.sent.hint(), next);

    let mut want_sent: Vec<u64> = (11..14).chain([3]).chain(40..44).collect();
    want_sent.extend(100..next);
    for p in 0..PAGES {
        assert_eq!(
            s.sent.get(p),
            want_sent.contains(&p),
            "sent bit of page {p}"
        );
    }
    assert_eq!(s.sent.count(), want_sent.len() as u64);

    // Asking again sends nothing: every one of those pages is on its way.
    s.request(11, 3);
    s.request(40, 4);
    s.expect_quiet_urgent();
}

#[test]
fn each_answered_request_carries_its_source_times() {
    let mut s = Source::start(&[21]);
    let before = monotonic_ns();
    // Data, a zero page, a request whose first page the push claimed (sent
    // here all the same), and one whose first page was answered already
    // (no times: the page-server does not answer for it again).
    s.request(11, 1);
    assert_pages(&s.expect_urgent(), 11, 1);
    s.request(3, 1);
    assert_zero(&s.expect_urgent(), 3, 1);
    s.request(21, 1);
    assert_pages(&s.expect_urgent(), 21, 1);
    s.request(21, 2);
    assert_pages(&s.expect_urgent(), 22, 1);
    s.expect_quiet_urgent();
    let after = monotonic_ns();
    let timed: Vec<u64> = s.times.iter().map(|t| t.0).collect();
    assert_eq!(
        timed,
        [11, 3, 21],
        "times follow the answers to 11, 3 and the first 21 only"
    );
    for &(page, read, sent) in &s.times {
        assert!(
            before <= read && read <= sent && sent <= after,
            "page {page}: request read {read}, page sent {sent}, outside [{before}, {after}]"
        );
    }
}

#[test]
fn pages_the_push_claimed_are_answered_without_waiting_for_it() {
    let mut s = Source::start(&[21, 30, 31, 32]);

    // 21 was claimed by the push, but its copy may wait behind megabytes of
    // bulk pages: it goes out here too, in the one run.
    s.request(20, 4);
    let f = s.expect_urgent();
    assert_pages(&f, 20, 4);

    // All of 30..33 were claimed by the push: answered all the same.
    s.request(30, 3);
    let f = s.expect_urgent();
    assert_pages(&f, 30, 3);

    // Each page goes out on urgent once, however often it is asked for:
    // 31 again sends nothing, and the marker request after it must be the
    // very next frame on the connection.
    s.request(31, 1);
    s.request(22, 2);
    s.request(50, 1);
    let f = s.expect_urgent();
    assert_pages(&f, 50, 1);
    s.expect_quiet_urgent();
    assert_eq!(s.sent.hint(), 51);
    assert_eq!(s.sent.count(), 4 + 3 + 1);

    s.write(&empty_frame(FrameType::PostcopyDone));
    match s.recv() {
        FromPageServer::PostcopyDone(stats) => {
            assert_eq!(stats.requests, 5, "{stats:?}");
            assert_eq!(stats.pages_urgent, 8, "{stats:?}");
            assert_eq!(stats.pages_in_flight, 4, "{stats:?}");
            assert_eq!(stats.zero_pages, 0, "{stats:?}");
        }
        other => panic!("expected PostcopyDone, got {other:?}"),
    }
}

#[test]
fn read_ahead_follows_an_answer_up_to_the_first_claimed_page() {
    let mut s = Source::start_with(&[18, 60], 4);
    // 15's answer (with its times), then 16 and 17: 18 is the push's.
    s.request(15, 1);
    assert_pages(&s.expect_urgent(), 15, 1);
    assert_pages(&s.expect_urgent(), 16, 2);
    // Read-ahead stops at the end of guest memory.
    s.request(PAGES - 2, 1);
    assert_pages(&s.expect_urgent(), PAGES - 2, 1);
    assert_pages(&s.expect_urgent(), PAGES - 1, 1);
    // 16 went out as read-ahead: asking for it sends nothing, and nothing
    // after it either (17 and 18 are claimed); the marker comes next, with
    // its own read-ahead.
    s.request(16, 1);
    s.request(50, 1);
    assert_pages(&s.expect_urgent(), 50, 1);
    assert_pages(&s.expect_urgent(), 51, 4);
    // In order after 50: the read-ahead no longer stops at a page the push
    // claimed (60: its copy may still be queued), only at one sent here.
    s.request(56, 1);
    assert_pages(&s.expect_urgent(), 56, 1);
    assert_pages(&s.expect_urgent(), 57, 4);
    s.expect_quiet_urgent();
    let timed: Vec<u64> = s.times.iter().map(|t| t.0).collect();
    assert_eq!(
        timed,
        [15, PAGES - 2, 50, 56],
        "read-ahead carries no times"
    );
    s.write(&empty_frame(FrameType::PostcopyDone));
    match s.recv() {
        FromPageServer::PostcopyDone(stats) => {
            assert_eq!(stats.requests, 5, "{stats:?}");
            assert_eq!(stats.pages_urgent, 4 + 11, "{stats:?}");
            assert_eq!(stats.pages_prefetched, 11, "{stats:?}");
            assert_eq!(stats.pages_in_flight, 1, "{stats:?}");
        }
        other => panic!("expected PostcopyDone, got {other:?}"),
    }
}

#[test]
fn postcopy_done_reports_what_was_served() {
    let mut s = Source::start(&[60, 61]);
    let mut wire_bytes = 0;
    // Data, zero, claimed by the push, and a run around pages answered
    // already (60, 61: not sent twice here) whose zero page (59) travels as
    // data inside its run.
    s.request(11, 3);
    s.request(3, 1);
    s.request(60, 2);
    s.request(57, 6);
    for (first, count) in [(11, 3), (3, 1), (60, 2), (57, 3), (62, 1)] {
        let f = s.expect_urgent();
        if count == 1 && is_zero_page(first) {
            assert_zero(&f, first, count);
        } else {
            assert_pages(&f, first, count);
        }
        wire_bytes += f.wire_len();
    }
    s.expect_quiet_urgent();
    assert_eq!(
        wire_bytes,
        5 * PAGES_PREFIX_LEN as u64 + 9 * PAGE_SIZE as u64
    );
    // Each request whose first page went out here has its times (62 does
    // not start its request).
    let timed: Vec<u64> = s.times.iter().map(|t| t.0).collect();
    assert_eq!(timed, [11, 3, 60, 57]);
    wire_bytes += 4 * (FRAME_HEADER_LEN + PAGE_TIMES_LEN) as u64;
    s.write(&empty_frame(FrameType::PostcopyDone));
    let want = ServerStats {
        requests: 4,
        pages_urgent: 10,
        zero_pages: 1,
        pages_in_flight: 2,
        pages_prefetched: 0,
        bytes: wire_bytes,
    };
    let stats = match s.recv() {
        FromPageServer::PostcopyDone(stats) => stats,
        other => panic!("expected PostcopyDone, got {other:?}"),
    };
    assert_eq!(format!("{stats:?}"), format!("{want:?}"));
    // The shared counters say the same, without a message from the role.
    let c = |k| s.counters.get(k);
    assert_eq!(
        [
            c(Counter::Requests),
            c(Counter::UrgentPages),
            c(Counter::UrgentZeroPages),
            c(Counter::UrgentBytes)
        ],
        [4, 9, 1, wire_bytes],
        "shared counters"
    );

    // The destination hangs up; the role says so and waits for Quit.
    s.ret.shutdown(Shutdown::Write).expect("shutdown");
    match s.recv() {
        FromPageServer::Closed(closed) => {
            assert_eq!(format!("{closed:?}"), format!("{want:?}"))
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    s.child.send(ToPageServer::Quit).expect("send Quit");
    assert_eq!(
        s.wait_exit(),
        WaitStatus::Exited(Pid::from_raw(s.child.pid as i32), 0)
    );
}

/// Feeds one hostile frame to a fresh page-server; checks it died with an
/// error, non-zero, having sent nothing; returns the error text.
fn hostile(bytes: &[u8]) -> String {
    let mut s = Source::start(&[]);
    s.write(bytes);
    let text = match s.recv() {
        FromPageServer::Error(text) => text,
        other => panic!("expected an Error, got {other:?}"),
    };
    let status = s.wait_exit();
    assert!(
        matches!(status, WaitStatus::Exited(_, code) if code != 0),
        "page-server must exit non-zero after {text:?}, got {status:?}"
    );
    // The role is gone, so the urgent connection ends: it must end empty.
    let mut rest = Vec::new();
    let urgent = s.urgent.get_ref();
    urgent
        .set_read_timeout(Some(PATIENCE))
        .expect("urgent timeout");
    (&*urgent)
        .read_to_end(&mut rest)
        .expect("read urgent to its end");
    assert!(
        rest.is_empty(),
        "{} bytes went out on urgent before {text:?}",
        rest.len()
    );
    assert_eq!(s.sent.count(), 0, "sent bits set by a refused request");
    assert_eq!(s.sent.hint(), 0, "hint moved by a refused request");
    text
}

#[test]
fn request_beyond_guest_memory_is_refused() {
    let text = hostile(&raw_request(PAGES, 1, 0));
    assert!(text.contains("outside") && text.contains("1024"), "{text}");
    assert!(text.contains("REQUEST"), "{text}");
}

#[test]
fn request_running_past_the_end_is_refused() {
    // Its first page is real: a lax server would send it.
    let text = hostile(&raw_request(PAGES - 1, 2, 0));
    assert!(text.contains("outside") && text.contains("1023"), "{text}");
}

#[test]
fn request_with_a_wrapping_range_is_refused() {
    let text = hostile(&raw_request(u64::MAX, 2, 0));
    assert!(text.contains("outside"), "{text}");
}

#[test]
fn request_above_the_page_limit_is_refused() {
    let count = MAX_PAGES_PER_REQUEST + 1;
    let text = hostile(&raw_request(0, count, 0));
    assert!(
        text.contains(&count.to_string()) && text.contains("limit of 512"),
        "{text}"
    );
}

#[test]
fn empty_request_is_refused() {
    let text = hostile(&raw_request(11, 0, 0));
    assert!(text.contains("empty page range at page 11"), "{text}");
}

#[test]
fn request_with_reserved_word_set_is_refused() {
    let text = hostile(&raw_request(11, 1, 0x8000_0000));
    assert!(
        text.contains("reserved") && text.contains("0x80000000"),
        "{text}"
    );
}

#[test]
fn request_with_header_flags_set_is_refused() {
    for (byte, value) in [(1, 0x01u8), (2, 0x10), (3, 0x80)] {
        let mut frame = raw_request(11, 1, 0);
        frame[byte] = value;
        let text = hostile(&frame);
        assert!(text.contains("flags/reserved bits"), "{text}");
    }
}

#[test]
fn request_with_wrong_length_is_refused() {
    let mut frame = frame_header(FrameType::Request, 20).to_vec();
    frame.extend_from_slice(&raw_request(11, 1, 0)[FRAME_HEADER_LEN..]);
    frame.extend_from_slice(&[0; 4]);
    let text = hostile(&frame);
    assert!(text.contains("length 20"), "{text}");
}

#[test]
fn garbage_is_refused() {
    let text = hostile(b"GET / HTTP/1.1\r\nHost: source\r\n\r\n");
    assert!(text.contains("unknown frame type 0x47"), "{text}");
    assert!(text.contains("return-path"), "{text}");
}

#[test]
fn page_data_on_the_return_path_is_refused() {
    let mut frame = pages_prefix(range(11, 1)).to_vec();
    frame.extend_from_slice(&page_bytes(11));
    let text = hostile(&frame);
    assert!(
        text.contains("PAGES") && text.contains("not allowed on the return-path"),
        "{text}"
    );
}
