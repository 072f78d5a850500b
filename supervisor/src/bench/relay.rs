//! The bench's delay relay: a TCP forwarder that holds every chunk it reads
//! for a fixed time before writing it on, in each direction, so a link gets
//! a round trip it would not have (this kernel has no netem). It listens
//! in the source's namespace and connects each accepted connection to the
//! destination; its threads run SCHED_FIFO with a 1 ns timer slack so the
//! busy guests on this machine do not stretch the delay.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Added in each direction: 1 ms round trip, the figure.
pub const ONE_WAY_DELAY: Duration = Duration::from_micros(500);
/// Largest chunk read at once.
const CHUNK: usize = 16 << 10;
/// Chunks held per direction and connection (256 KiB): more waits in the
/// kernel's buffers, where TCP's flow control sees it.
const QUEUE: usize = 16;

/// How closely the relay kept its schedule.
#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    bytes: AtomicU64,
    late_sum_ns: AtomicU64,
    late_max_ns: AtomicU64,
    late_over_100us: AtomicU64,
}

/// What the relay did, for the bench's JSON.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayStats {
    pub connections: u64,
    pub chunks: u64,
    pub bytes: u64,
    /// Write time minus due time (arrival + delay), µs.
    pub lateness_mean_us: f64,
    pub lateness_max_us: f64,
    /// Chunks written more than 100 µs late.
    pub late_over_100us: u64,
}

pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    /// Every socket of every relayed connection, to be shut down on stop.
    socks: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    counters: Arc<Counters>,
    connections: Arc<AtomicU64>,
}

/// Real-time priority and a tight timer slack for the calling thread; on
/// failure (not root) the relay still works, less precisely.
fn sharpen() {
    // SAFETY: prctl with an integer argument for the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sched_setscheduler for the calling thread (0) with a param we own.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

impl Relay {
    /// Listens on 127.0.0.1 of namespace `ns` and relays every connection to
    /// `target`, adding `delay` each way.
    pub fn start(ns: Option<&str>, target: SocketAddr, delay: Duration) -> Result<Relay, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let socks = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(Counters::default());
        let connections = Arc::new(AtomicU64::new(0));
        let (st, so, th, co, cn) = (
            stop.clone(),
            socks.clone(),
            threads.clone(),
            counters.clone(),
            connections.clone(),
        );
        let (addr, accept) = super::link::in_netns(ns, move || -> Result<_, String> {
            let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("relay: {e}"))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("relay: {e}"))?;
            let addr = listener.local_addr().map_err(|e| format!("relay: {e}"))?;
            // Started from inside the namespace: its connections to the
            // target are made there too.
            let accept = std::thread::Builder::new()
                .name("relay-accept".into())
                .spawn(move || accept_loop(listener, target, delay, st, so, th, co, cn))
                .map_err(|e| format!("relay: {e}"))?;
            Ok((addr, accept))
        })??;
        Ok(Relay {
            addr,
            stop,
            accept: Some(accept),
            socks,
            threads,
            counters,
            connections,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let chunks = c.chunks.load(Ordering::Relaxed);
        RelayStats {
            connections: self.connections.load(Ordering::Relaxed),
            chunks,
            bytes: c.bytes.load(Ordering::Relaxed),
            lateness_mean_us: if chunks == 0 {
                0.0
            } else {
                c.late_sum_ns.load(Ordering::Relaxed) as f64 / chunks as f64 / 1e3
            },
            lateness_max_us: c.late_max_ns.load(Ordering::Relaxed) as f64 / 1e3,
            late_over_100us: c.late_over_100us.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        for s in self.socks.lock().expect("relay sockets").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .expect("relay threads")
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    delay: Duration,
    stop: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    counters: Arc<Counters>,
    connections: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::SeqCst) {
        let inbound = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => {
                log::warn!("relay accept: {e}");
                continue;
            }
        };
        let outbound = match TcpStream::connect_timeout(&target, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("relay: cannot reach {target}: {e}");
                continue;
            }
        };
        connections.fetch_add(1, Ordering::Relaxed);
        let _ = inbound.set_nonblocking(false);
        for s in [&inbound, &outbound] {
            let _ = s.set_nodelay(true);
        }
        let mut list = socks.lock().expect("relay sockets");
        let mut ts = threads.lock().expect("relay threads");
        for (from, to) in [(&inbound, &outbound), (&outbound, &inbound)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            ts.extend(pipe(from, to, delay, counters.clone()));
        }
        list.push(inbound);
        list.push(outbound);
    }
}

/// One direction: a reader that stamps each chunk and a writer that holds
/// it until its time.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    counters: Arc<Counters>,
) -> Vec<JoinHandle<()>> {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE);
    let reader = std::thread::Builder::new()
        .name("relay-read".into())
        .spawn(move || {
            sharpen();
            loop {
                let mut buf = vec![0u8; CHUNK];
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send((Instant::now() + delay, buf)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    let writer = std::thread::Builder::new()
        .name("relay-write".into())
        .spawn(move || {
            sharpen();
            for (due, buf) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let late = Instant::now().saturating_duration_since(due).as_nanos() as u64;
                counters.chunks.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                counters.late_sum_ns.fetch_add(late, Ordering::Relaxed);
                counters.late_max_ns.fetch_max(late, Ordering::Relaxed);
                if late > 100_000 {
                    counters.late_over_100us.fetch_add(1, Ordering::Relaxed);
                }
                if to.write_all(&buf).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    [reader, writer]
        .into_iter()
        .filter_map(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ping through the relay takes at least the two delays; the bytes
    /// arrive unchanged both ways.
    #[test]
    fn it_delays_both_ways_and_keeps_the_bytes() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
        });
        let relay = Relay::start(None, target, Duration::from_millis(20)).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        let t = Instant::now();
        c.write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        let rtt = t.elapsed();
        assert_eq!(&b, b"hello");
        assert!(rtt >= Duration::from_millis(40), "round trip {rtt:?}");
        echo.join().unwrap();
        drop(c);
        let stats = relay.stats();
        assert_eq!((stats.connections, stats.chunks, stats.bytes), (1, 2, 10));
    }
}
