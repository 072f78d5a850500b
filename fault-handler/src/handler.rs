//! The fault-handler owns the destination's page placement. In precopy it
//! writes pages from the main stream into the memfd. Once the guest registered
//! its memory with the userfaultfd ("listening"), every page goes in through
//! UFFDIO_COPY / UFFDIO_ZEROPAGE, atomically, and guest faults become page
//! requests on the return path, one per missing page.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::bitmap::{Bitmap, BitmapError, SharedBitmap};
use common::clock::monotonic_ns;
use common::counters::{Counter, CountersError, SharedCounters};
use common::digest::{page_digest, zero_page_digest};
use common::mem::{punch_hole, write_at, Access, Mapping, MemError};
use common::msg::{
    FromFaultHandler, HandlerSetup, HandlerStart, PostcopyStats, RecvProgress, ToFaultHandler,
};
use common::role::{LinkError, RoleLink};
use common::tls::{RecvHalf, SendHalf};
use common::types::{MemLayout, PageRange, RemoteAddr, PAGE_SIZE};
use common::uffd::{Placed, Uffd, UffdError};
use common::wire::{
    empty_frame, request_frame, stream_of, ConnKind, Frame, FrameReader, FrameType, WireError,
    STREAM_CHUNK_PAGES,
};
use ipc_channel::ipc::IpcSender;

use crate::fault_path::FaultPathRecorder;
use crate::latency::FaultClock;

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error("received bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    #[error("counter block: {0}")]
    Counters(#[from] CountersError),
    #[error("{conn} connection: {source}")]
    Wire {
        conn: ConnKind,
        #[source]
        source: WireError,
    },
    #[error("return path: {0}")]
    ReturnPath(std::io::Error),
    #[error("placing pages: {0}")]
    Uffd(#[from] UffdError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Sandbox(#[from] common::sandbox::SandboxError),
    #[error(transparent)]
    Tls(#[from] common::tls::TlsError),
    #[error("the source sent its package with {missing} of {pages} pages never sent")]
    Incomplete { missing: u64, pages: u64 },
}

/// Where page placement stands.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum Mode {
    /// Before the package: write through our own mapping.
    Precopy,
    /// The package arrived with `listen`: waiting for the guest to register.
    AwaitingListen,
    /// Guest memory is registered: place only through the userfaultfd.
    Postcopy,
}

#[derive(Default)]
struct Pending {
    /// Pages a request was sent for.
    requested: Option<Bitmap>,
    /// Faults waiting per page: when each was read, and by which thread.
    waiters: HashMap<u64, Vec<(Instant, u32)>>,
}

/// This process's own counts (those of the whole migration are in the
/// shared block).
#[derive(Default)]
struct Counters {
    discarded: AtomicU64,
    discard_us: AtomicU64,
    rounds: AtomicU32,
    main_bytes: Arc<AtomicU64>,
    urgent_bytes: Arc<AtomicU64>,
    /// One per extra bulk stream (stream 1 first).
    bulk_bytes: Vec<Arc<AtomicU64>>,
}

/// Where the extra bulk streams stand against the main stream's FENCE
/// barriers (docs/protocol.md, "Parallel bulk streams").
#[derive(Default)]
struct FenceState {
    /// Per extra stream (stream 1 first): the last FENCE it delivered;
    /// everything before it on that stream is placed.
    arrived: Vec<u64>,
    /// Per extra stream: its EOS arrived; it carries nothing more.
    ended: Vec<bool>,
    /// The main stream applied what depended on FENCEs up to this one: the
    /// extra streams may go past it.
    released: u64,
}

#[derive(Default)]
struct Fences {
    state: Mutex<FenceState>,
    changed: Condvar,
}

impl Fences {
    fn update(&self, f: impl FnOnce(&mut FenceState)) {
        f(&mut self.state.lock().expect("fences"));
        self.changed.notify_all();
    }

    /// Waits until `ready` holds.
    fn wait(&self, ready: impl Fn(&FenceState) -> bool) {
        let mut g = self.state.lock().expect("fences");
        while !ready(&g) {
            g = self.changed.wait(g).expect("fences");
        }
    }
}

struct Handler {
    layout: MemLayout,
    base: RemoteAddr,
    memfd: OwnedFd,
    received: SharedBitmap,
    digests: Option<Mapping>,
    uffd: Option<Uffd>,
    mode: RwLock<Mode>,
    mode_changed: Condvar,
    mode_lock: Mutex<()>,
    /// Pages we may have written data to (precopy): a zero page for one of
    /// these must punch a hole; others already read as zero.
    written: Mutex<Bitmap>,
    pending: Mutex<Pending>,
    /// Blocked guest threads (latency and blocktime).
    clock: Mutex<FaultClock>,
    /// The supervisor's counter block: faults, latency, blocktime.
    shared: SharedCounters,
    /// Stamps along each fault answered on the urgent connection.
    fault_path: Mutex<FaultPathRecorder>,
    ret: Mutex<SendHalf>,
    counters: Counters,
    /// Bulk streams, the main stream included.
    streams: u32,
    fences: Fences,
    /// The device-state package arrived (on the main stream).
    package_seen: AtomicBool,
    done: AtomicBool,
    /// Started again after the package: serving faults begins with a wake
    /// of the whole range.
    resumed: bool,
    tx: IpcSender<FromFaultHandler>,
}

/// Which connection a page came on.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Via {
    Main,
    Urgent,
}

/// Set (to anything) in a fault-handler's environment, it exits right
/// after it placed the last page and told the source, before it tells its
/// supervisor: the test of a completion that only the shared bitmap
/// remembers (`tests/tests/faults.rs`).
pub const DIE_AT_COMPLETION_TEST_ENV: &str = "POSTCOPY_TEST_FAULT_HANDLER_DIES_AT_COMPLETION";

pub fn run(link: RoleLink<ToFaultHandler, FromFaultHandler>) -> Result<(), HandlerError> {
    let setup = match link.recv()? {
        ToFaultHandler::Start(s) => s,
        ToFaultHandler::Quit => return Ok(()),
        other => {
            return Err(HandlerError::Protocol(format!(
                "expected Start, got {other:?}"
            )))
        }
    };
    let mut fds = link.fds.recv()?;
    let HandlerSetup {
        layout,
        guest_base,
        postcopy,
        digests,
        resume,
        vcpus,
        main_tls,
        return_tls,
        urgent_tls,
        streams,
        bulk_tls,
    } = setup;
    let streams = streams.clamp(1, common::wire::MAX_STREAMS);
    // Never mapped here: pages go in with pwrite (precopy) or through the
    // userfaultfd (postcopy), so nothing can fault a page in by accident.
    let memfd = fds.take("memory")?;
    let received = SharedBitmap::open(fds.take("received")?.as_fd(), layout.pages())?;
    let shared = SharedCounters::open(fds.take("counters")?.as_fd())?;
    let digests = if digests {
        let fd = fds.take("digests")?;
        Some(Mapping::new(
            fd.as_fd(),
            layout.pages() as usize * 8,
            Access::ReadWrite,
        )?)
    } else {
        None
    };
    let uffd = if postcopy {
        Some(Uffd::from_fd(fds.take("uffd")?))
    } else {
        None
    };
    let main = RecvHalf::new(TcpStream::from(fds.take("main")?), main_tls.as_deref())?;
    let ret = SendHalf::new(TcpStream::from(fds.take("return")?), return_tls.as_deref())?;
    let urgent = RecvHalf::new(TcpStream::from(fds.take("urgent")?), urgent_tls.as_deref())?;
    let mut bulk = Vec::new();
    for (stream, tls) in
        (1..streams as usize).zip(bulk_tls.into_iter().chain(std::iter::repeat_with(|| None)))
    {
        let fd = fds.take(common::msg::BULK_FD_NAMES[stream])?;
        bulk.push(RecvHalf::new(TcpStream::from(fd), tls.as_deref())?);
    }
    drop(fds);
    // The threads on a fault's path (commands, which starts the fault
    // thread, and the urgent reader) inherit nice -10, set while still
    // privileged; this thread goes back to 0 below (common::priority).
    common::priority::make_urgent();
    // Every fd is held and mapped: the sandbox goes on before the first
    // frame is read and before any thread starts.
    common::sandbox::enter(&crate::seccomp::POLICY)?;

    let h = Arc::new(Handler {
        layout,
        base: guest_base,
        memfd,
        received,
        digests,
        uffd,
        // A postcopy restart waits for the supervisor's Listening (the
        // guest may not have registered its memory yet) like a fresh
        // handler after the package.
        mode: RwLock::new(if resume == HandlerStart::Postcopy {
            Mode::AwaitingListen
        } else {
            Mode::Precopy
        }),
        resumed: resume == HandlerStart::Postcopy,
        mode_changed: Condvar::new(),
        mode_lock: Mutex::new(()),
        written: Mutex::new({
            // An earlier handler may have written any page: a zero page
            // must then always drop what is there.
            let mut w = Bitmap::new(layout.pages());
            if resume != HandlerStart::Fresh {
                w.set_all();
            }
            w
        }),
        pending: Mutex::new(Pending::default()),
        clock: Mutex::new(FaultClock::new(vcpus)),
        shared,
        fault_path: Mutex::new(FaultPathRecorder::default()),
        ret: Mutex::new(ret),
        counters: Counters {
            bulk_bytes: (1..streams).map(|_| Arc::default()).collect(),
            ..Counters::default()
        },
        streams,
        fences: Fences {
            state: Mutex::new(FenceState {
                arrived: vec![0; streams as usize - 1],
                ended: vec![false; streams as usize - 1],
                released: 0,
            }),
            changed: Condvar::new(),
        },
        package_seen: AtomicBool::new(resume == HandlerStart::Postcopy),
        done: AtomicBool::new(false),
        tx: link.tx.clone(),
    });

    // Commands: Listening flips the mode; Quit ends the process.
    {
        let h = h.clone();
        let rx = link.rx;
        std::thread::Builder::new()
            .name("commands".into())
            .spawn(move || loop {
                match rx.recv() {
                    Ok(ToFaultHandler::Listening) => h.set_listening(),
                    Ok(ToFaultHandler::Start(_)) => log::warn!("ignoring a second Start"),
                    Ok(ToFaultHandler::Quit) | Err(_) => std::process::exit(0),
                }
            })
            .expect("spawn command thread");
    }
    {
        let h = h.clone();
        std::thread::Builder::new()
            .name("urgent".into())
            .spawn(move || {
                if let Err(e) = h.read_urgent(urgent) {
                    h.fatal(e);
                }
            })
            .expect("spawn urgent reader");
    }
    // Bulk pages: at the guest's priority, below the fault path's.
    common::priority::make_bulk();
    for (i, stream) in bulk.into_iter().enumerate() {
        let h = h.clone();
        let n = i as u8 + 1;
        std::thread::Builder::new()
            .name(format!("bulk{n}"))
            .spawn(move || {
                if let Err(e) = h.read_bulk(n, stream) {
                    h.fatal(e);
                }
            })
            .expect("spawn bulk-stream reader");
    }
    match h.read_main(main, resume == HandlerStart::Postcopy) {
        Ok(()) => {
            // Stay alive until Quit arrives on the command thread.
            loop {
                std::thread::park();
            }
        }
        Err(e) => Err(e),
    }
}

impl Handler {
    fn fatal(&self, e: HandlerError) -> ! {
        log::error!("{e}");
        let _ = self.tx.send(FromFaultHandler::Error(e.to_string()));
        std::process::exit(1)
    }

    fn progress(&self) -> RecvProgress {
        RecvProgress {
            pages_received: self.received.count(),
            bytes: self.counters.main_bytes.load(Ordering::Relaxed)
                + self.counters.urgent_bytes.load(Ordering::Relaxed)
                + self
                    .counters
                    .bulk_bytes
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .sum::<u64>(),
            rounds: self.counters.rounds.load(Ordering::Relaxed),
            discarded: self.counters.discarded.load(Ordering::Relaxed),
            discard_us: self.counters.discard_us.load(Ordering::Relaxed),
        }
    }

    /// Adds what `reader_total` (a reader's byte count) gained since
    /// `counted` to the shared total; returns the new count.
    fn count_bytes(&self, reader_total: &AtomicU64, counted: u64) -> u64 {
        let now = reader_total.load(Ordering::Relaxed);
        self.shared
            .add(Counter::RecvBytes, now.saturating_sub(counted));
        now
    }

    fn send(&self, msg: FromFaultHandler) -> Result<(), HandlerError> {
        self.tx
            .send(msg)
            .map_err(|e| HandlerError::Link(LinkError::Ipc(format!("{e:?}"))))
    }

    fn set_listening(self: &Arc<Self>) {
        let _g = self.mode_lock.lock().expect("mode lock");
        let mut mode = self.mode.write().expect("mode");
        if *mode == Mode::AwaitingListen {
            *mode = Mode::Postcopy;
            let h = self.clone();
            std::thread::Builder::new()
                .name("faults".into())
                .spawn(move || {
                    if let Err(e) = h.serve_faults() {
                        h.fatal(e);
                    }
                })
                .expect("spawn fault thread");
            if self.resumed {
                let h = self.clone();
                std::thread::Builder::new()
                    .name("resume".into())
                    .spawn(move || {
                        if let Err(e) = h.resume_postcopy() {
                            h.fatal(e);
                        }
                    })
                    .expect("spawn resume thread");
            }
        } else {
            log::warn!("Listening while in {mode:?}: ignored");
        }
        self.mode_changed.notify_all();
    }

    /// A handler started again after the package, once the guest's memory
    /// is registered: wake every thread still blocked on a fault an earlier
    /// handler read (it faults again and we see it), and finish if every
    /// page is here already.
    fn resume_postcopy(&self) -> Result<(), HandlerError> {
        let uffd = self.uffd.as_ref().ok_or_else(|| {
            HandlerError::Protocol("a postcopy restart without a userfaultfd".into())
        })?;
        log::info!(
            "resuming postcopy: {} of {} pages here",
            self.received.count(),
            self.layout.pages()
        );
        uffd.wake(self.base, self.layout.mem_bytes())?;
        self.check_complete()
    }

    /// Reads the main stream. `package_seen`: a restarted postcopy
    /// handler, whose stream holds only pages (and the end).
    fn read_main(self: &Arc<Self>, main: RecvHalf, package_seen: bool) -> Result<(), HandlerError> {
        let mut reader = FrameReader::new(main, ConnKind::Main, self.layout)
            .counting_into(self.counters.main_bytes.clone());
        let wire = |source| HandlerError::Wire {
            conn: ConnKind::Main,
            source,
        };
        let mut last_progress = Instant::now();
        if package_seen {
            // A postcopy restart: pages go through the userfaultfd, which
            // needs the guest's registration (the supervisor's Listening).
            let mut g = self.mode_lock.lock().expect("mode lock");
            while *self.mode.read().expect("mode") != Mode::Postcopy {
                g = self.mode_changed.wait(g).expect("mode lock");
            }
        }
        let mut package_seen = package_seen;
        let mut counted = 0;
        // The FENCE whose dependent frames (DISCARD, PACKAGE) are being
        // applied: the extra streams wait at it.
        let mut held: Option<u64> = None;
        let mut last_fence = 0u64;
        loop {
            let frame = reader.next_frame();
            counted = self.count_bytes(&self.counters.main_bytes, counted);
            let frame = match frame {
                Ok(f) => f,
                Err(e) if e.is_disconnect() && self.done.load(Ordering::Acquire) => return Ok(()),
                // Every page is in: a bad tail cannot hurt guest memory.
                Err(e) if self.done.load(Ordering::Acquire) => {
                    log::warn!("main stream after completion: {e}");
                    return Ok(());
                }
                Err(e) => return Err(wire(e)),
            };
            // After the package: pages (postcopy push) and EOS only; after a
            // precopy package, EOS only — the guest already runs on what came
            // before it.
            let allowed = match (&frame, package_seen) {
                (_, false) | (Frame::Eos, true) => true,
                (Frame::Pages { .. } | Frame::Zero { .. }, true) => {
                    *self.mode.read().expect("mode") == Mode::Postcopy
                }
                _ => false,
            };
            if !allowed {
                return Err(HandlerError::Protocol(format!(
                    "{} after the device-state package",
                    frame.frame_type()
                )));
            }
            match &frame {
                Frame::Discard { .. } | Frame::Package(_) => {
                    if self.streams > 1 && held.is_none() {
                        return Err(HandlerError::Protocol(format!(
                            "{} on the main stream without a FENCE before it ({} bulk streams)",
                            frame.frame_type(),
                            self.streams
                        )));
                    }
                }
                Frame::Pages { range, .. } | Frame::Zero { range } => {
                    self.check_pinned(&frame, *range, 0)?;
                    self.release(&mut held);
                }
                _ => self.release(&mut held),
            }
            match frame {
                Frame::Fence { seq } => {
                    if seq != last_fence + 1 || self.streams == 1 {
                        return Err(HandlerError::Protocol(format!(
                            "FENCE {seq} on the main stream, expected {} ({} bulk streams)",
                            if self.streams == 1 {
                                "none".to_string()
                            } else {
                                (last_fence + 1).to_string()
                            },
                            self.streams
                        )));
                    }
                    last_fence = seq;
                    // Every copy sent before this barrier, on any stream,
                    // is placed before what follows it here.
                    self.fences
                        .wait(|f| f.arrived.iter().zip(&f.ended).all(|(&a, &e)| a >= seq || e));
                    held = Some(seq);
                }
                Frame::Pages { range, data } => self.place(range, Some(data), Via::Main)?,
                Frame::Zero { range } => self.place(range, None, Via::Main)?,
                Frame::Round { sync } => self.counters.rounds.store(sync, Ordering::Relaxed),
                Frame::Mark { id } => {
                    self.send(FromFaultHandler::Mark(id, self.progress()))?;
                }
                Frame::Discard { ranges } => self.discard(&ranges)?,
                Frame::Package(pkg) => {
                    package_seen = true;
                    self.package_seen.store(true, Ordering::Release);
                    let listen = pkg.listen;
                    if listen {
                        if self.uffd.is_none() {
                            return Err(HandlerError::Protocol(
                                "the package asks for postcopy, which was not agreed at setup"
                                    .into(),
                            ));
                        }
                        *self.mode.write().expect("mode") = Mode::AwaitingListen;
                    }
                    log::info!(
                        "package arrived ({} bytes of guest state, listen={listen})",
                        pkg.guest_state.len()
                    );
                    if !listen {
                        // A plain precopy's package follows every page:
                        // they are all here now, whatever becomes of the
                        // rest of the stream (or of this process).
                        self.precopy_complete()?;
                    }
                    self.send(FromFaultHandler::Package(pkg, self.progress()))?;
                    if !listen {
                        self.send(FromFaultHandler::PrecopyDone(self.progress()))?;
                    }
                    if listen {
                        // The rest of the stream goes through the userfaultfd,
                        // which needs the guest's registration first.
                        let mut g = self.mode_lock.lock().expect("mode lock");
                        while *self.mode.read().expect("mode") != Mode::Postcopy {
                            g = self.mode_changed.wait(g).expect("mode lock");
                        }
                    }
                    // The extra streams carry the push (or their EOS) now.
                    self.release(&mut held);
                }
                Frame::Eos => {
                    // Every stream ends before the main stream does.
                    self.fences.wait(|f| f.ended.iter().all(|&e| e));
                    let mode = *self.mode.read().expect("mode");
                    if mode == Mode::Postcopy {
                        // Completion comes when the last page is placed,
                        // possibly by the urgent reader.
                        self.check_complete()?;
                        return Ok(());
                    }
                    if !package_seen {
                        return Err(HandlerError::Protocol(
                            "the main stream ended without a device-state package".into(),
                        ));
                    }
                    // Complete since the package (see above).
                    return Ok(());
                }
                other => unreachable!("main stream yielded {other:?}"),
            }
            if last_progress.elapsed() >= Duration::from_millis(200) {
                last_progress = Instant::now();
                self.send(FromFaultHandler::Progress(self.progress()))?;
            }
        }
    }

    /// Pinning (docs/protocol.md, "Parallel bulk streams"): a page only
    /// ever travels on its own stream, so no older copy of it can overtake
    /// a newer one; a frame stays inside one chunk.
    fn check_pinned(
        &self,
        frame: &Frame,
        range: PageRange,
        stream: u32,
    ) -> Result<(), HandlerError> {
        if self.streams == 1 {
            return Ok(());
        }
        let first = range.first().get();
        let last = range.end() - 1;
        if stream_of(first, self.streams) != stream
            || first / STREAM_CHUNK_PAGES != last / STREAM_CHUNK_PAGES
        {
            let conn = if stream == 0 {
                ConnKind::Main
            } else {
                ConnKind::Bulk(stream as u8)
            };
            return Err(HandlerError::Protocol(format!(
                "{} {range} on the {conn} connection: those pages travel on stream {} of {}",
                frame.frame_type(),
                stream_of(first, self.streams),
                self.streams
            )));
        }
        Ok(())
    }

    /// The main stream is past the frames that depended on FENCE `held`:
    /// the extra streams may go on.
    fn release(&self, held: &mut Option<u64>) {
        if let Some(seq) = held.take() {
            self.fences.update(|f| f.released = seq);
        }
    }

    /// Reads extra bulk stream `n`: pages pinned to it, FENCEs, its EOS.
    fn read_bulk(self: &Arc<Self>, n: u8, stream: RecvHalf) -> Result<(), HandlerError> {
        let conn = ConnKind::Bulk(n);
        let i = usize::from(n) - 1;
        let bytes = self.counters.bulk_bytes[i].clone();
        let mut reader = FrameReader::new(stream, conn, self.layout).counting_into(bytes.clone());
        let wire = |source| HandlerError::Wire { conn, source };
        if self.package_seen.load(Ordering::Acquire) {
            // A postcopy restart: as on the main stream, pages wait for the
            // guest's registration.
            let mut g = self.mode_lock.lock().expect("mode lock");
            while *self.mode.read().expect("mode") != Mode::Postcopy {
                g = self.mode_changed.wait(g).expect("mode lock");
            }
        }
        let mut last_fence = 0u64;
        let mut counted = 0;
        let mut last_progress = Instant::now();
        loop {
            let frame = reader.next_frame();
            counted = self.count_bytes(&bytes, counted);
            let frame = match frame {
                Ok(f) => f,
                Err(e) if self.done.load(Ordering::Acquire) => {
                    if !e.is_disconnect() {
                        log::warn!("{conn} after completion: {e}");
                    }
                    return Ok(());
                }
                Err(e) => return Err(wire(e)),
            };
            match frame {
                Frame::Pages { range, .. } | Frame::Zero { range } => {
                    self.check_pinned(&frame, range, u32::from(n))?;
                    if self.package_seen.load(Ordering::Acquire)
                        && *self.mode.read().expect("mode") != Mode::Postcopy
                    {
                        return Err(HandlerError::Protocol(format!(
                            "{} on {conn} after the device-state package",
                            frame.frame_type()
                        )));
                    }
                    if self.done.load(Ordering::Acquire) {
                        // Every page is in and guest memory unregistered:
                        // nothing left to place.
                        continue;
                    }
                    let data = match &frame {
                        Frame::Pages { data, .. } => Some(*data),
                        _ => None,
                    };
                    self.place(range, data, Via::Main)?;
                }
                Frame::Fence { seq } => {
                    if seq != last_fence + 1 {
                        return Err(HandlerError::Protocol(format!(
                            "FENCE {seq} on {conn}, expected {}",
                            last_fence + 1
                        )));
                    }
                    last_fence = seq;
                    self.fences.update(|f| f.arrived[i] = seq);
                    // Nothing after the barrier until the main stream has
                    // applied what depends on it.
                    self.fences.wait(|f| f.released >= seq);
                }
                Frame::Eos => {
                    self.fences.update(|f| f.ended[i] = true);
                    return Ok(());
                }
                other => unreachable!("{conn} yielded {other:?}"),
            }
            if last_progress.elapsed() >= Duration::from_millis(200) {
                last_progress = Instant::now();
                self.send(FromFaultHandler::Progress(self.progress()))?;
            }
        }
    }

    /// A plain precopy's package arrived: every page must be here.
    fn precopy_complete(&self) -> Result<(), HandlerError> {
        let missing = self.layout.pages() - self.received.count();
        if missing != 0 {
            return Err(HandlerError::Incomplete {
                missing,
                pages: self.layout.pages(),
            });
        }
        self.done.store(true, Ordering::Release);
        log::info!("precopy complete: every page is in");
        Ok(())
    }

    fn read_urgent(self: &Arc<Self>, urgent: RecvHalf) -> Result<(), HandlerError> {
        let mut reader = FrameReader::new(urgent, ConnKind::Urgent, self.layout)
            .counting_into(self.counters.urgent_bytes.clone());
        let mut counted = 0;
        loop {
            let frame = reader.next_frame();
            counted = self.count_bytes(&self.counters.urgent_bytes, counted);
            let frame = match frame {
                Ok(f) => f,
                Err(e) if e.is_disconnect() => return Ok(()),
                Err(source) => {
                    return Err(HandlerError::Wire {
                        conn: ConnKind::Urgent,
                        source,
                    })
                }
            };
            let read_ns = monotonic_ns();
            let first = match frame {
                Frame::Pages { range, data } => {
                    self.place(range, Some(data), Via::Urgent)?;
                    range.first()
                }
                Frame::Zero { range } => {
                    self.place(range, None, Via::Urgent)?;
                    range.first()
                }
                Frame::PageTimes {
                    page,
                    request_read_ns,
                    page_sent_ns,
                } => {
                    self.fault_path.lock().expect("fault path").source_times(
                        page.get(),
                        request_read_ns,
                        page_sent_ns,
                    );
                    continue;
                }
                other => unreachable!("urgent connection yielded {other:?}"),
            };
            self.fault_path.lock().expect("fault path").placed(
                first.get(),
                read_ns,
                monotonic_ns(),
            );
        }
    }

    fn discard(&self, ranges: &[PageRange]) -> Result<(), HandlerError> {
        let t = Instant::now();
        let mut written = self.written.lock().expect("written");
        // The reader merged the ranges, and only pages that were received
        // have anything to forget: the work is one word per 64 pages of the
        // ranges plus the pages actually dropped, however the peer
        // repeats itself.
        for r in ranges {
            punch_hole(self.memfd.as_fd(), r.first().offset().0, r.byte_len())?;
            let (mut p, end) = (r.first().get(), r.end());
            while p < end {
                let word = p / 64;
                let (lo, hi) = (p % 64, (end - word * 64).min(64));
                let mask = if hi - lo == 64 {
                    !0
                } else {
                    ((1u64 << (hi - lo)) - 1) << lo
                };
                let mut was = self.received.clear_word_bits(word as usize, mask);
                while was != 0 {
                    let page = word * 64 + u64::from(was.trailing_zeros());
                    written.clear(page);
                    self.forget_digest(page);
                    was &= was - 1;
                }
                p = word * 64 + hi;
            }
            self.counters
                .discarded
                .fetch_add(u64::from(r.count()), Ordering::Relaxed);
        }
        self.counters
            .discard_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Records the digest of a page just placed (`None`: a zero page), if
    /// digests are kept: with `--verify` other than digest this costs
    /// nothing on the page path.
    fn record_digest(&self, page: u64, data: Option<&[u8]>) {
        if let Some(t) = &self.digests {
            let d = data.map_or_else(zero_page_digest, page_digest);
            t.atomic_words()[page as usize].store(d, Ordering::Relaxed);
        }
    }

    /// The page is no longer placed (discarded).
    fn forget_digest(&self, page: u64) {
        if let Some(t) = &self.digests {
            t.atomic_words()[page as usize].store(0, Ordering::Relaxed);
        }
    }

    /// Places `range` (data, or zeros when `data` is None).
    fn place(&self, range: PageRange, data: Option<&[u8]>, via: Via) -> Result<(), HandlerError> {
        let mode = self.mode.read().expect("mode");
        match *mode {
            // Nothing asks for urgent pages before postcopy: one that comes
            // anyway could overtake a newer copy on the main stream.
            Mode::Precopy if via == Via::Urgent => Err(HandlerError::Protocol(format!(
                "urgent {range} arrived before postcopy"
            ))),
            Mode::Precopy => self.place_precopy(range, data),
            Mode::AwaitingListen => Err(HandlerError::Protocol(format!(
                "{range} arrived before guest memory was registered"
            ))),
            Mode::Postcopy => {
                drop(mode);
                self.place_postcopy(range, data, via)
            }
        }
    }

    fn place_precopy(&self, range: PageRange, data: Option<&[u8]>) -> Result<(), HandlerError> {
        let mut written = self.written.lock().expect("written");
        match data {
            Some(data) => {
                write_at(self.memfd.as_fd(), range.first().offset().0, data)?;
                for (p, page) in range.pages().zip(data.chunks_exact(PAGE_SIZE)) {
                    written.set(p.get());
                    self.record_digest(p.get(), Some(page));
                    self.received.test_and_set(p.get());
                }
            }
            None => {
                for p in range.pages() {
                    let p = p.get();
                    if written.clear(p) {
                        punch_hole(self.memfd.as_fd(), p * PAGE_SIZE as u64, PAGE_SIZE as u64)?;
                    }
                    self.record_digest(p, None);
                    self.received.test_and_set(p);
                }
            }
        }
        Ok(())
    }

    fn dst(&self, page: u64) -> RemoteAddr {
        RemoteAddr(self.base.0 + page * PAGE_SIZE as u64)
    }

    fn place_postcopy(
        &self,
        range: PageRange,
        data: Option<&[u8]>,
        via: Via,
    ) -> Result<(), HandlerError> {
        let uffd = self.uffd.as_ref().expect("postcopy has a uffd");
        // Every page is in and memory is (being) unregistered: what comes
        // now is a second copy (the push's and the urgent answer's, of a
        // frozen source), and the kernel would answer ENOENT.
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let first = range.first().get();
        let len = range.byte_len();
        let mut off = 0u64;
        while off < len {
            let dst = RemoteAddr(self.dst(first).0 + off);
            let placed = match data {
                Some(d) => uffd.copy(dst, &d[off as usize..], true),
                None => uffd.zeropage(dst, len - off),
            };
            let placed = match placed {
                Ok(p) => p,
                // Completion unregistered memory between the check above
                // and this copy: the page was in.
                Err(_) if self.done.load(Ordering::Acquire) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match placed {
                Placed::Done => break,
                Placed::Exists { placed } => {
                    // Already here: nothing to place, but wake anyone waiting.
                    off += placed;
                    let page = first + off / PAGE_SIZE as u64;
                    log::debug!("page {page} was already placed");
                    if let Err(e) = uffd.wake(self.dst(page), PAGE_SIZE as u64) {
                        if self.done.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        return Err(e.into());
                    }
                    off += PAGE_SIZE as u64;
                }
            }
        }
        let mut newly = 0u64;
        for (i, p) in range.pages().enumerate() {
            let p = p.get();
            self.record_digest(p, data.map(|d| &d[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]));
            if self.received.test_and_set(p) {
                newly += 1;
            }
        }
        self.shared.add(
            match via {
                Via::Main => Counter::PlacedBackground,
                Via::Urgent => Counter::PlacedUrgent,
            },
            newly,
        );
        if via == Via::Main {
            self.fault_path.lock().expect("fault path").placed_by_push(
                first,
                range.end(),
                monotonic_ns(),
            );
        }
        // Faults waiting on these pages are answered now.
        let now = Instant::now();
        {
            let mut pending = self.pending.lock().expect("pending");
            if !pending.waiters.is_empty() {
                let mut clock = self.clock.lock().expect("fault clock");
                for p in range.pages() {
                    if let Some(ws) = pending.waiters.remove(&p.get()) {
                        for (t, tid) in ws {
                            clock.resolved(tid, t, now, &self.shared);
                        }
                    }
                }
            }
        }
        self.check_complete()
    }

    /// When every page is placed: unregister, tell the source, tell the
    /// supervisor. Runs once.
    fn check_complete(&self) -> Result<(), HandlerError> {
        if !self.received.is_full() || self.done.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let uffd = self.uffd.as_ref().expect("postcopy has a uffd");
        uffd.unregister(self.base, self.layout.mem_bytes())?;
        {
            let mut ret = self.ret.lock().expect("return path");
            ret.write_all(&empty_frame(FrameType::PostcopyDone))
                .map_err(HandlerError::ReturnPath)?;
            ret.flush().map_err(HandlerError::ReturnPath)?;
        }
        if std::env::var_os(DIE_AT_COMPLETION_TEST_ENV).is_some() {
            // The crash this guards against, on purpose (tests only): every
            // page is in, the source told, the supervisor not.
            log::warn!("{DIE_AT_COMPLETION_TEST_ENV}: dying before reporting completion");
            std::process::exit(1);
        }
        // The whole migration's figures: every fault-handler's, if this one
        // is a successor.
        let stats = PostcopyStats::from_counters(
            &self.shared,
            self.fault_path.lock().expect("fault path").finish(),
        );
        log::info!(
            "postcopy complete: {} faults, {} requests, p99 {} µs",
            stats.faults,
            stats.requests,
            stats.latency.p99
        );
        self.send(FromFaultHandler::PostcopyDone(stats, self.progress()))
    }

    /// A fault on a page already received: either a zero page that was
    /// never materialised (place it) or one placed since the fault was
    /// queued (wake the thread).
    fn resolve_locally(&self, uffd: &Uffd, p: u64) -> Result<(), UffdError> {
        if let Placed::Exists { .. } = uffd.zeropage(self.dst(p), PAGE_SIZE as u64)? {
            uffd.wake(self.dst(p), PAGE_SIZE as u64)?;
        }
        Ok(())
    }

    /// Reads faults and turns each missing page into one request.
    fn serve_faults(&self) -> Result<(), HandlerError> {
        let uffd = self.uffd.as_ref().expect("postcopy has a uffd");
        {
            let mut pending = self.pending.lock().expect("pending");
            pending.requested = Some(Bitmap::new(self.layout.pages()));
        }
        let mut faults = Vec::with_capacity(64);
        let mut pfd = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&uffd.as_fd()),
            events: libc::POLLIN,
            revents: 0,
        }];
        while !self.done.load(Ordering::Acquire) {
            // SAFETY: poll on one pollfd we own, with a timeout.
            let r = unsafe { libc::poll(pfd.as_mut_ptr(), 1, 100) };
            if r <= 0 {
                continue;
            }
            faults.clear();
            uffd.read_faults(&mut faults)?;
            for f in &faults {
                let read_at = Instant::now();
                let read_ns = monotonic_ns();
                self.shared.add(Counter::Faults, 1);
                let Some(page) = f
                    .addr
                    .0
                    .checked_sub(self.base.0)
                    .map(|off| off / PAGE_SIZE as u64)
                    .and_then(|raw| self.layout.page(raw).ok())
                else {
                    log::error!("fault at {} outside guest memory", f.addr);
                    continue;
                };
                let p = page.get();
                let request = {
                    let mut pending = self.pending.lock().expect("pending");
                    self.clock
                        .lock()
                        .expect("fault clock")
                        .fault(f.tid, read_at);
                    if self.received.get(p) {
                        None
                    } else {
                        pending.waiters.entry(p).or_default().push((read_at, f.tid));
                        Some(pending.requested.as_mut().expect("set above").set(p))
                    }
                };
                match request {
                    None => {
                        // Here already: a zero page never materialised, or
                        // one placed since the fault was queued.
                        self.shared.add(Counter::FaultsLocal, 1);
                        if let Err(e) = self.resolve_locally(uffd, p) {
                            // Completion unregisters memory under us: every
                            // page is in then, and the faulting thread was
                            // woken by the unregister.
                            if !self.done.load(Ordering::Acquire) {
                                return Err(e.into());
                            }
                        }
                        self.clock.lock().expect("fault clock").resolved(
                            f.tid,
                            read_at,
                            Instant::now(),
                            &self.shared,
                        );
                    }
                    // Every page is in: nothing left to ask for.
                    Some(true) if self.done.load(Ordering::Acquire) => {}
                    Some(true) => {
                        let frame = request_frame(self.layout.range(p, 1).expect("in range"));
                        let mut ret = self.ret.lock().expect("return path");
                        self.fault_path.lock().expect("fault path").asking(
                            p,
                            read_ns,
                            monotonic_ns(),
                        );
                        ret.write_all(&frame).map_err(HandlerError::ReturnPath)?;
                        self.shared.add(Counter::FaultRequests, 1);
                    }
                    // A request for this page is in flight already.
                    Some(false) => {}
                }
            }
        }
        Ok(())
    }
}
