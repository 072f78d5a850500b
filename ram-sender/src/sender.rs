//! The ram-sender's migration loop: precopy rounds (send dirty pages, sync the
//! dirty log, report, await the supervisor's decision), then either precopy
//! completion (send the rest, the package, EOS) or switchover (discard set,
//! package, then the background push of every page not yet sent).

use std::net::TcpStream;

use common::tls::SendHalf;

use crate::zerocopy;
use std::os::fd::AsFd;
use std::time::Instant;

use common::bitmap::{Bitmap, BitmapError, SharedBitmap};
use common::counters::{Counter, CountersError, SharedCounters};
use common::mem::{reopen_read_only, Access, Mapping, MemError};
use common::msg::{
    FinalSync, FromRamSender, PushStats, RoundStats, SendProgress, SenderSetup, SenderStart,
    ToRamSender,
};
use common::role::{LinkError, RoleLink};
use common::types::{MemLayout, PageRange, RemoteAddr, PAGE_SIZE};
use common::uffd::{Uffd, UffdError};
use common::wire::{
    discard_frames, empty_frame, mark_frame, message_frame, pages_prefix, round_frame, stream_of,
    zero_frame, FrameType, Package, WireError, MAX_PAGES_PER_FRAME, PAGES_PREFIX_LEN,
    STREAM_CHUNK_PAGES,
};

use crate::limiter::Caps;
use crate::pagemap::{Pagemap, ScanError};
use crate::streams::Streams;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error("sent bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    #[error("counters: {0}")]
    Counters(#[from] CountersError),
    #[error("dirty tracking: {0}")]
    Scan(#[from] ScanError),
    #[error("initial write-protect failed: {0}")]
    Uffd(#[from] UffdError),
    #[error("main stream: {0}")]
    Net(#[from] std::io::Error),
    #[error("main stream: {0}")]
    Wire(#[from] WireError),
    #[error(transparent)]
    Sandbox(#[from] common::sandbox::SandboxError),
    #[error("main stream: {0}")]
    Tls(#[from] common::tls::TlsError),
    #[error("unexpected command {cmd} while {phase}")]
    Unexpected { cmd: String, phase: &'static str },
}

/// Shortest time between two dirty syncs in precopy.
const MIN_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Pages per push run: small, so a run claims little ahead of the guest.
const PUSH_RUN: u64 = 64;

/// How a precopy round ended.
enum RoundEnd {
    Finished,
    Interrupted(ToRamSender),
}

/// Where the ram-sender is, for the shared counters and the bandwidth cap.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Phase {
    /// The guest runs: precopy rounds, the early discard.
    Precopy,
    /// The guest is stopped, precopy converged: the rest, the package.
    Completion,
    /// The guest is stopped for postcopy: discard set, package.
    Switchover,
    /// The background push.
    Push,
}

impl Phase {
    /// The counters this phase's bytes, pages and zero pages go to.
    fn counters(self) -> [Counter; 3] {
        match self {
            Phase::Precopy => [
                Counter::PrecopyBytes,
                Counter::PrecopyPages,
                Counter::PrecopyZeroPages,
            ],
            Phase::Completion | Phase::Switchover => [
                Counter::DowntimeBytes,
                Counter::DowntimePages,
                Counter::DowntimeZeroPages,
            ],
            Phase::Push => [
                Counter::PushBytes,
                Counter::PushPages,
                Counter::PushZeroPages,
            ],
        }
    }

    /// After the switch the postcopy cap applies (QEMU's
    /// max-postcopy-bandwidth); before it, and when precopy completes,
    /// the precopy cap.
    fn postcopy(self) -> bool {
        matches!(self, Phase::Switchover | Phase::Push)
    }
}

/// Which bandwidth cap a command changes.
#[derive(Copy, Clone)]
enum Cap {
    Precopy,
    Postcopy,
}

#[derive(Default)]
struct Totals {
    bytes: u64,
    pages: u64,
    zero_pages: u64,
    /// Time spent handing bytes to the socket, pacing included: what the
    /// link (or the limit) takes, without reading and checking pages.
    wire_us: u64,
}

struct Sender {
    link: RoleLink<ToRamSender, FromRamSender>,
    layout: MemLayout,
    base: RemoteAddr,
    mem: Mapping,
    pagemap: Pagemap,
    uffd: Uffd,
    sent: SharedBitmap,
    out: Streams,
    limiter: Caps,
    phase: Phase,
    counters: SharedCounters,
    dirty: Bitmap,
    buf: Vec<u8>,
    totals: Totals,
    sync_count: u32,
    marks: u64,
    last_sync: Instant,
    last_progress: Instant,
    round_left: u64,
}

/// Runs the ram-sender role.
pub fn run(link: RoleLink<ToRamSender, FromRamSender>) -> Result<(), SendError> {
    let setup = match link.recv()? {
        ToRamSender::Start(s) => s,
        ToRamSender::Quit => return Ok(()),
        other => {
            return Err(SendError::Unexpected {
                cmd: format!("{other:?}"),
                phase: "waiting for Start",
            })
        }
    };
    let mut fds = link.fds.recv()?;
    let SenderSetup {
        layout,
        guest_base,
        max_bandwidth,
        max_postcopy_bandwidth,
        resume,
        main_tls,
        streams,
        bulk_tls,
    } = setup;
    // Read-only for good: not even mprotect can make this mapping writable.
    let memfd = reopen_read_only(fds.take("memory")?.as_fd())?;
    let mem = Mapping::new(memfd.as_fd(), layout.mem_bytes() as usize, Access::ReadOnly)?;
    let sent_fd = fds.take("sent")?;
    let sent = SharedBitmap::open(sent_fd.as_fd(), layout.pages())?;
    let main = SendHalf::new(TcpStream::from(fds.take("main")?), main_tls.as_deref())?;
    let mut extra = Vec::new();
    for (stream, tls) in (1..streams.clamp(1, common::wire::MAX_STREAMS) as usize)
        .zip(bulk_tls.into_iter().chain(std::iter::repeat_with(|| None)))
    {
        let fd = fds.take(common::msg::BULK_FD_NAMES[stream])?;
        extra.push(SendHalf::new(TcpStream::from(fd), tls.as_deref())?);
    }
    let out = Streams::new(main);
    let counters = SharedCounters::open(fds.take("counters")?.as_fd())?;
    let mut s = Sender {
        layout,
        base: guest_base,
        mem,
        pagemap: Pagemap::new(fds.take("pagemap")?),
        uffd: Uffd::from_fd(fds.take("uffd")?),
        sent,
        out,
        limiter: Caps::new(max_bandwidth, max_postcopy_bandwidth),
        phase: Phase::Precopy,
        counters,
        dirty: Bitmap::new(layout.pages()),
        buf: vec![0u8; PAGES_PREFIX_LEN + MAX_PAGES_PER_FRAME as usize * PAGE_SIZE],
        totals: Totals::default(),
        sync_count: 0,
        marks: 0,
        last_sync: Instant::now(),
        last_progress: Instant::now(),
        round_left: 0,
        link,
    };
    drop(fds);
    // Every fd is held and mapped: nothing from here on needs more.
    common::sandbox::enter(&crate::seccomp::POLICY)?;
    s.out.start(extra);
    let result = match resume {
        SenderStart::Precopy => s.precopy(),
        SenderStart::Push => {
            log::info!(
                "resuming the postcopy push: {} of {} pages to go",
                s.layout.pages() - s.sent.count(),
                s.layout.pages()
            );
            s.push()
        }
    };
    match result {
        // The supervisor told us to stop and then the peer went away: that
        // is the end we were asked for, not a failure.
        Err(SendError::Net(e)) if s.quit_pending() => {
            log::debug!("main stream closed after Quit: {e}");
            Ok(())
        }
        r => r,
    }
}

impl Sender {
    fn precopy(&mut self) -> Result<(), SendError> {
        // Arm dirty tracking, then treat everything as dirty: the first
        // round reads every page after the protection is on, so any write
        // it misses is reported by the next scan.
        self.uffd
            .write_protect(self.base, self.layout.mem_bytes(), true)?;
        self.dirty.set_all();
        self.synced();
        self.last_sync = Instant::now();
        let cap = |r: u64| match r {
            0 => "none".to_string(),
            r => format!("{r} B/s"),
        };
        log::info!(
            "precopy of {} pages starts (bandwidth limit {}, after the switch {})",
            self.layout.pages(),
            cap(self.limiter.precopy()),
            cap(self.limiter.postcopy())
        );
        loop {
            let round_start = Instant::now();
            let before = (self.totals.bytes, self.totals.pages, self.totals.zero_pages);
            let wire_before = self.totals.wire_us;
            let end = self.precopy_round()?;
            if let RoundEnd::Interrupted(cmd) = end {
                return self.obey_after_round(cmd);
            }
            // A nearly clean guest makes rounds of a few pages: space the
            // syncs out instead of spinning on the dirty log.
            let since_sync = self.last_sync.elapsed();
            if since_sync < MIN_SYNC_INTERVAL {
                std::thread::sleep(MIN_SYNC_INTERVAL - since_sync);
            }
            let round_us = round_start.elapsed().as_micros() as u64;
            let since_sync = self.last_sync.elapsed();
            let found = self.pagemap.collect_written(
                self.base,
                self.layout.mem_bytes(),
                &mut self.dirty,
                true,
            )?;
            self.last_sync = Instant::now();
            self.synced();
            self.write(&round_frame(self.sync_count))?;
            let round_bytes = self.totals.bytes - before.0;
            let secs = (round_us as f64 / 1e6).max(1e-6);
            let stats = RoundStats {
                sync_count: self.sync_count,
                round_pages: self.totals.pages - before.1,
                round_zero_pages: self.totals.zero_pages - before.2,
                round_bytes,
                round_us,
                wire_us: self.totals.wire_us - wire_before,
                pending_pages: self.dirty.count(),
                bandwidth: round_bytes as f64 / secs,
                dirty_rate: found as f64 / since_sync.as_secs_f64().max(1e-6),
                total_bytes: self.totals.bytes,
                total_pages: self.totals.pages,
                total_zero_pages: self.totals.zero_pages,
            };
            log::debug!("sync {}: {found} pages dirtied", self.sync_count);
            self.link.send(FromRamSender::Synced(stats))?;
            loop {
                match self.link.recv()? {
                    ToRamSender::Continue => break,
                    ToRamSender::SetMaxBandwidth(r) => self.set_cap(Cap::Precopy, r),
                    ToRamSender::SetMaxPostcopyBandwidth(r) => self.set_cap(Cap::Postcopy, r),
                    cmd => return self.obey_after_round(cmd),
                }
            }
        }
    }

    fn obey_after_round(&mut self, cmd: ToRamSender) -> Result<(), SendError> {
        match cmd {
            ToRamSender::Complete => self.complete(),
            ToRamSender::Switchover => self.switchover(),
            ToRamSender::PreDiscard => self.prediscard(),
            ToRamSender::Quit => Ok(()),
            other => Err(SendError::Unexpected {
                cmd: format!("{other:?}"),
                phase: "in precopy",
            }),
        }
    }

    /// One pass over the dirty set. Between frames it looks for commands: a
    /// switchover or quit ends the round early.
    fn precopy_round(&mut self) -> Result<RoundEnd, SendError> {
        let runs = chunked(self.dirty.runs(u64::from(MAX_PAGES_PER_FRAME)));
        self.round_left = self.dirty.count();
        for (first, count) in runs {
            match self.link.try_recv() {
                Ok(Some(ToRamSender::SetMaxBandwidth(r))) => self.set_cap(Cap::Precopy, r),
                Ok(Some(ToRamSender::SetMaxPostcopyBandwidth(r))) => self.set_cap(Cap::Postcopy, r),
                Ok(Some(cmd)) => return Ok(RoundEnd::Interrupted(cmd)),
                Ok(None) => {}
                Err(_) => return Ok(RoundEnd::Interrupted(ToRamSender::Quit)),
            }
            self.send_run(first, count as u32)?;
            for p in first..first + count {
                self.dirty.clear(p);
                self.sent.test_and_set(p);
            }
            self.round_left = self.round_left.saturating_sub(count);
            self.maybe_progress()?;
        }
        Ok(RoundEnd::Finished)
    }

    /// Precopy converged and the guest is stopped: the last sync, the rest
    /// of the pages, the package, end of stream.
    fn complete(&mut self) -> Result<(), SendError> {
        self.enter(Phase::Completion);
        let t = Instant::now();
        let found = self.pagemap.collect_written(
            self.base,
            self.layout.mem_bytes(),
            &mut self.dirty,
            false,
        )?;
        self.synced();
        let sync_us = t.elapsed().as_micros() as u64;
        let before = (self.totals.bytes, self.totals.pages, self.totals.zero_pages);
        let t = Instant::now();
        let dirty_pages = self.dirty.count();
        let runs = chunked(self.dirty.runs(u64::from(MAX_PAGES_PER_FRAME)));
        for (first, count) in runs {
            self.send_run(first, count as u32)?;
            for p in first..first + count {
                self.dirty.clear(p);
                self.sent.test_and_set(p);
            }
        }
        self.out.flush_main()?;
        log::info!("final sync found {found} new dirty pages; sent {dirty_pages}");
        self.link.send(FromRamSender::FinalSyncDone(FinalSync {
            sync_count: self.sync_count,
            precopy_bytes: before.0,
            precopy_pages: before.1,
            precopy_zero_pages: before.2,
            dirty_pages,
            discard_pages: 0,
            bytes: self.totals.bytes - before.0,
            pages: self.totals.pages - before.1,
            zero_pages: self.totals.zero_pages - before.2,
            sync_us,
            send_us: t.elapsed().as_micros() as u64,
        }))?;
        let pkg = self.await_package()?;
        // Every page before the package must be in before it is loaded.
        self.fence()?;
        let bytes = self.send_package(&pkg)?;
        self.end_extras()?;
        self.write(&empty_frame(FrameType::Eos))?;
        self.out.flush_main()?;
        self.link.send(FromRamSender::PackageSent { bytes })?;
        self.await_quit()
    }

    /// The guest is stopped and postcopy begins: last sync, discard set,
    /// package, then push everything not sent yet.
    fn switchover(&mut self) -> Result<(), SendError> {
        self.enter(Phase::Switchover);
        let t = Instant::now();
        self.pagemap
            .collect_written(self.base, self.layout.mem_bytes(), &mut self.dirty, false)?;
        self.synced();
        let sync_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let before = self.totals.bytes;
        let dirty_pages = self.dirty.count();
        // One barrier for the discard set and the package: every precopy
        // copy is in before a page is dropped or the guest runs.
        self.fence()?;
        let discard_pages = self.discard_stale()?;
        log::info!("switchover: {dirty_pages} dirty pages, {discard_pages} to discard");
        self.link.send(FromRamSender::FinalSyncDone(FinalSync {
            sync_count: self.sync_count,
            precopy_bytes: before,
            precopy_pages: self.totals.pages,
            precopy_zero_pages: self.totals.zero_pages,
            dirty_pages,
            discard_pages,
            bytes: self.totals.bytes - before,
            pages: 0,
            zero_pages: 0,
            sync_us,
            send_us: t.elapsed().as_micros() as u64,
        }))?;
        let pkg = self.await_package()?;
        let bytes = self.send_package(&pkg)?;
        self.link.send(FromRamSender::PackageSent { bytes })?;
        self.push()
    }

    /// Pages sent before and dirtied since: the destination's copy is stale.
    /// They become unsent (so the push or a fault fetches them again) and
    /// go out in DISCARD frames. Returns how many.
    fn discard_stale(&mut self) -> Result<u64, SendError> {
        // 64 pages at a time: a whole dirty guest is 4096 atomics per GiB.
        let mut stale = Bitmap::new(self.layout.pages());
        for (w, &dirty) in self.dirty.words().iter().enumerate() {
            if dirty != 0 {
                stale.set_word_bits(w, self.sent.clear_word_bits(w, dirty));
            }
        }
        let discard: Vec<PageRange> = stale
            .runs(u64::from(u32::MAX))
            .map(|(first, count)| {
                self.layout
                    .range(first, count as u32)
                    .expect("dirty pages lie inside guest memory")
            })
            .collect();
        if !discard.is_empty() {
            self.write(&discard_frames(&discard))?;
        }
        Ok(stale.count())
    }

    /// Postcopy is decided but the guest still runs: drop what is stale
    /// now, while it costs no downtime, then wait for the switchover.
    fn prediscard(&mut self) -> Result<(), SendError> {
        self.fence()?;
        let pages = self.discard_stale()?;
        self.marks += 1;
        let mark = self.marks;
        self.write(&mark_frame(mark))?;
        self.out.flush_main()?;
        log::info!("early discard of {pages} stale pages");
        self.link
            .send(FromRamSender::PreDiscarded { pages, mark })?;
        loop {
            match self.link.recv()? {
                ToRamSender::Switchover => return self.switchover(),
                ToRamSender::SetMaxBandwidth(r) => self.set_cap(Cap::Precopy, r),
                ToRamSender::SetMaxPostcopyBandwidth(r) => self.set_cap(Cap::Postcopy, r),
                ToRamSender::Quit => return Ok(()),
                other => {
                    return Err(SendError::Unexpected {
                        cmd: format!("{other:?}"),
                        phase: "after the early discard",
                    })
                }
            }
        }
    }

    /// Postcopy background push: every page whose `sent` bit this role wins,
    /// starting after the page the destination asked for last.
    fn push(&mut self) -> Result<(), SendError> {
        self.enter(Phase::Push);
        let t = Instant::now();
        let before = (self.totals.bytes, self.totals.pages, self.totals.zero_pages);
        let pages = self.layout.pages();
        let mut cursor = 0u64;
        let mut last_hint = 0u64;
        loop {
            match self.link.try_recv() {
                Ok(Some(ToRamSender::SetMaxBandwidth(r))) => self.set_cap(Cap::Precopy, r),
                Ok(Some(ToRamSender::SetMaxPostcopyBandwidth(r))) => self.set_cap(Cap::Postcopy, r),
                Ok(Some(ToRamSender::Quit)) | Err(_) => return Ok(()),
                Ok(Some(other)) => {
                    return Err(SendError::Unexpected {
                        cmd: format!("{other:?}"),
                        phase: "pushing postcopy pages",
                    })
                }
                Ok(None) => {}
            }
            let hint = self.sent.hint();
            if hint != last_hint && hint != 0 && hint <= pages {
                cursor = hint % pages;
                last_hint = hint;
            }
            let Some(first) = self
                .sent
                .next_clear(cursor)
                .or_else(|| self.sent.next_clear(0))
            else {
                break;
            };
            // A run stays inside one pinning chunk: one stream.
            let mut count = 1u64;
            while first + count < pages
                && count < PUSH_RUN
                && !(first + count).is_multiple_of(STREAM_CHUNK_PAGES)
                && !self.sent.get(first + count)
            {
                count += 1;
            }
            self.push_run(first, count as u32)?;
            cursor = first + count;
            self.round_left = pages - self.sent.count();
            self.maybe_progress()?;
        }
        self.end_extras()?;
        self.write(&empty_frame(FrameType::Eos))?;
        self.out.flush_main()?;
        let stats = PushStats {
            pages: self.totals.pages - before.1,
            zero_pages: self.totals.zero_pages - before.2,
            bytes: self.totals.bytes - before.0,
            us: t.elapsed().as_micros() as u64,
        };
        log::info!(
            "background push done: {} pages, {} zero, {} bytes",
            stats.pages,
            stats.zero_pages,
            stats.bytes
        );
        self.link.send(FromRamSender::PushDone(stats))?;
        self.await_quit()
    }

    fn await_package(&mut self) -> Result<Package, SendError> {
        loop {
            match self.link.recv()? {
                ToRamSender::Package(p) => return Ok(p),
                ToRamSender::SetMaxBandwidth(r) => self.set_cap(Cap::Precopy, r),
                ToRamSender::SetMaxPostcopyBandwidth(r) => self.set_cap(Cap::Postcopy, r),
                other => {
                    return Err(SendError::Unexpected {
                        cmd: format!("{other:?}"),
                        phase: "waiting for the package",
                    })
                }
            }
        }
    }

    fn await_quit(&mut self) -> Result<(), SendError> {
        loop {
            match self.link.rx.recv() {
                Ok(ToRamSender::Quit) | Err(_) => return Ok(()),
                Ok(ToRamSender::SetMaxBandwidth(_) | ToRamSender::SetMaxPostcopyBandwidth(_)) => {}
                Ok(other) => {
                    return Err(SendError::Unexpected {
                        cmd: format!("{other:?}"),
                        phase: "finished",
                    })
                }
            }
        }
    }

    fn send_package(&mut self, pkg: &Package) -> Result<u64, SendError> {
        let frame = message_frame(FrameType::Package, pkg, "device-state package")?;
        self.out.write(0, &frame)?;
        self.out.flush_main()?;
        self.count(frame.len() as u64, 0, 0);
        Ok(frame.len() as u64)
    }

    /// Sends pages `first..first+count` (count ≤ 256): data pages as PAGES
    /// frames, zero pages as ZERO frames, each frame paced by the limiter.
    fn send_run(&mut self, first: u64, count: u32) -> Result<(), SendError> {
        let zero = self.load(first, count);
        self.emit(first, &zero, None, true)
    }

    /// Says which of the pages are zero, reading them in place (the data
    /// goes out from the mapping, see [`crate::zerocopy`]).
    fn load(&mut self, first: u64, count: u32) -> Vec<bool> {
        debug_assert!((1..=MAX_PAGES_PER_FRAME).contains(&count));
        (0..count as usize)
            .map(|i| zerocopy::page_is_zero(&self.mem, (first as usize + i) * PAGE_SIZE))
            .collect()
    }

    /// Writes the pages as frames: maximal runs of pages that are
    /// alike (zero or not) and, with `won`, that this role owns.
    fn emit(
        &mut self,
        first: u64,
        zero: &[bool],
        won: Option<&[bool]>,
        paced: bool,
    ) -> Result<(), SendError> {
        let n = zero.len();
        let stream = stream_of(first, self.out.count());
        debug_assert_eq!(stream, stream_of(first + n as u64 - 1, self.out.count()));
        let mine = |i: usize| won.is_none_or(|w| w[i]);
        let mut i = 0usize;
        while i < n {
            if !mine(i) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && mine(j) && zero[j] == zero[i] {
                j += 1;
            }
            let range = self
                .layout
                .range(first + i as u64, (j - i) as u32)
                .expect("pages lie inside guest memory");
            let t = Instant::now();
            if zero[i] {
                let frame = zero_frame(range);
                if paced {
                    self.limiter.take(frame.len() as u64);
                }
                self.out.write(stream, &frame)?;
                self.count(frame.len() as u64, 0, (j - i) as u64);
            } else {
                let len = (PAGES_PREFIX_LEN + (j - i) * PAGE_SIZE) as u64;
                if paced {
                    self.limiter.take(len);
                }
                self.out.write_run(
                    stream,
                    &pages_prefix(range),
                    &self.mem,
                    (first as usize + i) * PAGE_SIZE,
                    (j - i) * PAGE_SIZE,
                    &mut self.buf,
                )?;
                self.count(len, (j - i) as u64, 0);
            }
            self.totals.wire_us += t.elapsed().as_micros() as u64;
            i = j;
        }
        Ok(())
    }

    /// Postcopy push of a run of unsent pages. The source memory is frozen,
    /// so pages are read and paced *before* they are claimed: a claimed
    /// page goes on the wire at once, never waiting in the limiter while
    /// the destination asks for it.
    fn push_run(&mut self, first: u64, count: u32) -> Result<(), SendError> {
        let zero = self.load(first, count);
        let bytes: u64 = zero
            .iter()
            .map(|&z| if z { 0 } else { PAGE_SIZE as u64 })
            .sum::<u64>()
            + PAGES_PREFIX_LEN as u64;
        self.limiter.take(bytes);
        let won: Vec<bool> = (0..u64::from(count))
            .map(|i| self.sent.test_and_set(first + i))
            .collect();
        self.emit(first, &zero, Some(&won), false)
    }

    /// Writes frames that only the main stream carries.
    fn write(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        let t = Instant::now();
        self.limiter.take(bytes.len() as u64);
        self.out.write(0, bytes)?;
        self.count(bytes.len() as u64, 0, 0);
        self.totals.wire_us += t.elapsed().as_micros() as u64;
        Ok(())
    }

    /// A barrier across the bulk streams (nothing with one stream).
    fn fence(&mut self) -> Result<(), SendError> {
        let bytes = self.out.fence()?;
        self.count(bytes, 0, 0);
        Ok(())
    }

    /// The extra bulk streams end (EOS on each), and everything queued on
    /// them is handed to their sockets.
    fn end_extras(&mut self) -> Result<(), SendError> {
        let bytes = self.out.end_extras()?;
        self.count(bytes, 0, 0);
        Ok(())
    }

    /// Accounts what was just written to the bulk streams: here and in the
    /// shared counters the supervisor reads.
    fn count(&mut self, bytes: u64, pages: u64, zero_pages: u64) {
        self.totals.bytes += bytes;
        self.totals.pages += pages;
        self.totals.zero_pages += zero_pages;
        let [b, p, z] = self.phase.counters();
        self.counters.add(b, bytes);
        self.counters.add(p, pages);
        self.counters.add(z, zero_pages);
    }

    /// One more dirty sync done.
    fn synced(&mut self) {
        self.sync_count += 1;
        self.counters.add(Counter::DirtySyncs, 1);
    }

    /// Moves to `phase`; at the switch the limiter takes the postcopy cap.
    fn enter(&mut self, phase: Phase) {
        if phase.postcopy() && !self.phase.postcopy() {
            self.limiter.switch_to_postcopy();
            log::info!(
                "switched to postcopy: bandwidth limit {}",
                match self.limiter.rate() {
                    0 => "none".to_string(),
                    r => format!("{r} B/s"),
                }
            );
        }
        self.phase = phase;
    }

    fn set_cap(&mut self, cap: Cap, rate: u64) {
        match cap {
            Cap::Precopy => self.limiter.set_precopy(rate),
            Cap::Postcopy => self.limiter.set_postcopy(rate),
        }
    }

    /// True if a Quit is waiting (or the supervisor is gone).
    fn quit_pending(&self) -> bool {
        loop {
            match self.link.try_recv() {
                Ok(Some(ToRamSender::Quit)) | Err(_) => return true,
                Ok(Some(_)) => {}
                Ok(None) => return false,
            }
        }
    }

    fn maybe_progress(&mut self) -> Result<(), SendError> {
        if self.last_progress.elapsed().as_millis() >= 200 {
            self.last_progress = Instant::now();
            self.link.send(FromRamSender::Progress(SendProgress {
                total_bytes: self.totals.bytes,
                total_pages: self.totals.pages,
                round_left: self.round_left,
                bandwidth: 0.0,
            }))?;
        }
        Ok(())
    }
}

/// Splits runs at pinning-chunk boundaries, so each run goes on one stream
/// (`stream_of` its first page).
fn chunked(runs: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (mut first, mut count) in runs {
        while count > 0 {
            let room = STREAM_CHUNK_PAGES - first % STREAM_CHUNK_PAGES;
            let n = count.min(room);
            out.push((first, n));
            first += n;
            count -= n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_never_cross_a_pinning_chunk() {
        let runs = chunked([(250u64, 10u64), (512, 256), (1000, 600)].into_iter());
        assert_eq!(
            runs,
            vec![
                (250, 6),
                (256, 4),
                (512, 256),
                (1000, 24),
                (1024, 256),
                (1280, 256),
                (1536, 64)
            ]
        );
        for (first, count) in runs {
            assert_eq!(stream_of(first, 3), stream_of(first + count - 1, 3));
        }
    }
}
