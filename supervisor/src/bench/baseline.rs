//! Baselines measured in the same run as the migrations, on the same
//! endpoints: what the link carries (raw TCP bulk throughput), what a
//! request and its page answer cost on it (round trip), and on the host how
//! fast UFFDIO_COPY places pages and what a bare userfaultfd fault costs
//! in one process (fault → read → UFFDIO_COPY → woken), the floor under the
//! migration's fault latency. Each migration figure is printed as a ratio
//! to the baseline it is bounded by.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::clock::monotonic_ns;
use common::mem::{create_memfd, Access, Mapping};
use common::msg::StepSummary;
use common::types::PAGE_SIZE;
use common::uffd::{Uffd, POSTCOPY_FEATURES};
use common::wire::{PAGES_PREFIX_LEN, RANGE_LEN};
use serde::Serialize;

use super::link::{in_netns, Endpoints};
use super::stats::{Latencies, Spread};

/// How long and how often: `quick` keeps the whole baseline set to seconds.
#[derive(Clone, Copy, Debug)]
pub struct Effort {
    pub bulk_secs: f64,
    pub round_trips: usize,
    pub uffd_bytes: u64,
    pub faults: usize,
    pub reps: usize,
}

impl Effort {
    pub fn new(quick: bool) -> Effort {
        if quick {
            Effort {
                bulk_secs: 1.0,
                round_trips: 1000,
                uffd_bytes: 64 << 20,
                faults: 2000,
                reps: 3,
            }
        } else {
            Effort {
                bulk_secs: 3.0,
                round_trips: 5000,
                uffd_bytes: 512 << 20,
                faults: 20000,
                reps: 3,
            }
        }
    }
}

/// A link's baselines.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkBaseline {
    /// Raw TCP bulk throughput, one connection, Gbit/s (10^9), over `reps`
    /// runs.
    pub tcp_bulk_gbps: Option<Spread>,
    /// A 24-byte request answered by 4120 bytes (a REQUEST frame and a
    /// one-page PAGES frame) on one connection with TCP_NODELAY, µs.
    pub request_response_us: StepSummary,
    pub error: Option<String>,
}

/// The host's baselines.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostBaseline {
    /// UFFDIO_COPY into a fresh memfd mapping (shmem, as the destination's
    /// guest memory), one page per ioctl, pages/s.
    pub uffdio_copy_pages_per_s: Option<Spread>,
    /// The same, 64 pages per ioctl (the push's largest run).
    pub uffdio_copy_64_pages_per_s: Option<Spread>,
    /// A bare userfaultfd fault in one process, two threads, not pinned.
    pub bare_fault_us: Option<BareFault>,
    pub error: Option<String>,
}

/// Steps of a bare fault, µs: the faulting thread stamps before its write
/// and once it runs again; the handler thread stamps when it read the
/// fault and when UFFDIO_COPY (which wakes the thread) returned.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BareFault {
    pub fault_to_read: StepSummary,
    pub read_to_placed: StepSummary,
    /// 0 when the woken thread ran before the ioctl returned to the handler.
    pub placed_to_running: StepSummary,
    pub total: StepSummary,
}

pub fn link(ep: &Endpoints, effort: Effort) -> LinkBaseline {
    let mut out = LinkBaseline::default();
    let mut gbps = vec![];
    for _ in 0..effort.reps {
        match bulk(ep, effort.bulk_secs) {
            Ok(v) => gbps.push(v),
            Err(e) => out.error = Some(e),
        }
    }
    out.tcp_bulk_gbps = Spread::of(&gbps);
    let trips = match ep.kind {
        // Each takes a millisecond on the relay.
        super::link::LinkKind::Relay => effort.round_trips.min(1000),
        _ => effort.round_trips,
    };
    match round_trips(ep, trips) {
        Ok(s) => out.request_response_us = s,
        Err(e) => out.error = Some(e),
    }
    out
}

/// A connected pair across the link (through a relay where the link has
/// one): (source end, destination end, relay guard).
fn pair(ep: &Endpoints) -> Result<(TcpStream, TcpStream, Option<super::relay::Relay>), String> {
    let listener = ep.listen()?;
    let target = listener.local_addr().map_err(|e| e.to_string())?;
    let (addr, relay) = ep.reach(target)?;
    let client = in_netns(ep.src_ns.as_deref(), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
    })?
    .map_err(|e| format!("connect to {addr}: {e}"))?;
    let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    for s in [&client, &server] {
        s.set_nodelay(true).map_err(|e| e.to_string())?;
    }
    Ok((client, server, relay))
}

/// Gbit/s the receiver saw from first to last byte while the sender wrote
/// for `secs`.
fn bulk(ep: &Endpoints, secs: f64) -> Result<f64, String> {
    let (mut client, mut server, _relay) = pair(ep)?;
    let reader = std::thread::spawn(move || -> (u64, Duration) {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut first: Option<Instant> = None;
        loop {
            match server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
            }
        }
        (total, first.map(|f| f.elapsed()).unwrap_or_default())
    });
    let buf = vec![0x5au8; 1 << 20];
    let until = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < until {
        client
            .write_all(&buf)
            .map_err(|e| format!("bulk write: {e}"))?;
    }
    client
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let (bytes, took) = reader.join().map_err(|_| "bulk reader panicked")?;
    if took.is_zero() {
        return Err("bulk: nothing arrived".into());
    }
    Ok(bytes as f64 * 8.0 / took.as_secs_f64() / 1e9)
}

fn round_trips(ep: &Endpoints, n: usize) -> Result<StepSummary, String> {
    let (mut client, mut server, _relay) = pair(ep)?;
    let answer_len = PAGES_PREFIX_LEN + PAGE_SIZE;
    let echo = std::thread::spawn(move || {
        let mut req = [0u8; FRAME_REQUEST_LEN];
        let answer = vec![0x11u8; answer_len];
        while server.read_exact(&mut req).is_ok() {
            if server.write_all(&answer).is_err() {
                break;
            }
        }
    });
    let req = [0u8; FRAME_REQUEST_LEN];
    let mut answer = vec![0u8; answer_len];
    let mut lat = Latencies::default();
    // A few to warm the path up, not counted.
    for i in 0..n + 20 {
        let t = monotonic_ns();
        client
            .write_all(&req)
            .and_then(|_| client.read_exact(&mut answer))
            .map_err(|e| format!("round trip: {e}"))?;
        if i >= 20 {
            lat.record_ns(monotonic_ns() - t);
        }
    }
    drop(client);
    let _ = echo.join();
    Ok(lat.summary())
}

/// A REQUEST frame's size: header and range.
const FRAME_REQUEST_LEN: usize = PAGES_PREFIX_LEN;
const _: () = assert!(FRAME_REQUEST_LEN == 8 + RANGE_LEN);

pub fn host(effort: Effort) -> HostBaseline {
    let mut out = HostBaseline::default();
    let (mut one, mut many) = (vec![], vec![]);
    for _ in 0..effort.reps {
        match copy_rate(effort.uffd_bytes, 1) {
            Ok(v) => one.push(v),
            Err(e) => out.error = Some(e),
        }
        match copy_rate(effort.uffd_bytes, 64) {
            Ok(v) => many.push(v),
            Err(e) => out.error = Some(e),
        }
    }
    out.uffdio_copy_pages_per_s = Spread::of(&one);
    out.uffdio_copy_64_pages_per_s = Spread::of(&many);
    match bare_fault(effort.faults) {
        Ok(b) => out.bare_fault_us = Some(b),
        Err(e) => out.error = Some(e),
    }
    out
}

/// A fresh memfd of `bytes`, mapped and registered for missing faults.
fn registered(bytes: u64) -> Result<(Mapping, Uffd), String> {
    let fd = create_memfd("bench-uffd", bytes).map_err(|e| e.to_string())?;
    let map =
        Mapping::new(fd.as_fd(), bytes as usize, Access::ReadWrite).map_err(|e| e.to_string())?;
    let uffd = Uffd::with_features(true, POSTCOPY_FEATURES).map_err(|e| e.to_string())?;
    uffd.register_missing(map.remote_addr(), bytes)
        .map_err(|e| e.to_string())?;
    Ok((map, uffd))
}

/// Pages per second UFFDIO_COPY places, `per` pages per ioctl.
fn copy_rate(bytes: u64, per: usize) -> Result<f64, String> {
    let (map, uffd) = registered(bytes)?;
    let src = vec![0x42u8; per * PAGE_SIZE];
    let pages = bytes as usize / PAGE_SIZE;
    let base = map.remote_addr().0;
    let t = Instant::now();
    let mut p = 0;
    while p + per <= pages {
        let dst = common::types::RemoteAddr(base + (p * PAGE_SIZE) as u64);
        uffd.copy(dst, &src, true).map_err(|e| e.to_string())?;
        p += per;
    }
    Ok(p as f64 / t.elapsed().as_secs_f64())
}

fn bare_fault(n: usize) -> Result<BareFault, String> {
    let bytes = (n * PAGE_SIZE) as u64;
    let (map, uffd) = registered(bytes)?;
    let map = Arc::new(map);
    let done = Arc::new(AtomicBool::new(false));
    // Handler stamps by page: read, placed.
    let handled = Arc::new(Mutex::new(vec![(0u64, 0u64); n]));
    let handler = {
        let (map, done, handled) = (map.clone(), done.clone(), handled.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let page = vec![0x33u8; PAGE_SIZE];
            let mut faults = Vec::with_capacity(64);
            let mut pfd = [libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&uffd.as_fd()),
                events: libc::POLLIN,
                revents: 0,
            }];
            while !done.load(Ordering::Acquire) {
                // SAFETY: poll on one pollfd we own, with a timeout.
                if unsafe { libc::poll(pfd.as_mut_ptr(), 1, 100) } <= 0 {
                    continue;
                }
                faults.clear();
                uffd.read_faults(&mut faults).map_err(|e| e.to_string())?;
                let read = monotonic_ns();
                for f in &faults {
                    let p = ((f.addr.0 - map.remote_addr().0) / PAGE_SIZE as u64) as usize;
                    uffd.copy(f.addr, &page, true).map_err(|e| e.to_string())?;
                    handled.lock().expect("stamps")[p] = (read, monotonic_ns());
                }
            }
            Ok(())
        })
    };
    let bytes_view = map.atomic_bytes();
    let mut faulter = Vec::with_capacity(n);
    for p in 0..n {
        let t0 = monotonic_ns();
        bytes_view[p * PAGE_SIZE].store(1, Ordering::Relaxed);
        faulter.push((t0, monotonic_ns()));
    }
    done.store(true, Ordering::Release);
    handler
        .join()
        .map_err(|_| "fault handler panicked".to_string())??;
    let handled = handled.lock().expect("stamps");
    let (mut a, mut b, mut c, mut d) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    for (&(t0, t1), &(read, placed)) in faulter.iter().zip(handled.iter()) {
        if read == 0 {
            continue;
        }
        a.record_ns(read.saturating_sub(t0));
        b.record_ns(placed.saturating_sub(read));
        c.record_ns(t1.saturating_sub(placed));
        d.record_ns(t1 - t0);
    }
    Ok(BareFault {
        fault_to_read: a.summary(),
        read_to_placed: b.summary(),
        placed_to_running: c.summary(),
        total: d.summary(),
    })
}
