//! The process guest: worker threads that read and write a memfd mapping, as
//! vCPUs would. Each worker owns a contiguous slice of memory
//! ([`common::guest::worker_slice`]) and checks a stop flag after every write,
//! so it can stop at a safe point and its position is its whole state.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::guest::{worker_slice, GuestConfig, RandomParams, Workload};
use common::mem::Mapping;
use common::types::{PAGE_SHIFT, PAGE_SIZE};

/// Where one worker is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// `ab`: zeroing (`zeroed` false) or incrementing; `next` is the next
    /// page of the slice to write.
    Ab { zeroed: bool, next: u64 },
    /// `random`: generator state and the number of writes so far (the stamp).
    Random { rng: u64, writes: u64 },
    /// `idle`: pages of the slice filled with the pattern so far.
    Idle { filled: u64 },
}

/// Errors of the process guest.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process guest state does not decode: {0}")]
    BadState(String),
    #[error("process guest state has {got} workers, this guest has {want}")]
    WorkerCount { got: usize, want: usize },
    #[error("process guest state is for the {got} workload, this guest runs {want}")]
    WrongWorkload { got: String, want: String },
    #[error("worker {worker}'s saved position {state} does not fit its {pages}-page slice")]
    BadPosition {
        worker: usize,
        state: String,
        pages: u64,
    },
    #[error(
        "the process guest runs neither boot sectors nor Linux (those need --guest kvm / linux)"
    )]
    BootSector,
    #[error("a worker thread panicked")]
    WorkerPanicked,
}

/// The state a process guest carries to the other host.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SavedState {
    workers: Vec<WorkerState>,
    ops: u64,
}

pub struct ProcessGuest {
    mem: Arc<Mapping>,
    config: GuestConfig,
    states: Vec<WorkerState>,
    workers: Vec<JoinHandle<WorkerState>>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    /// Workers past their start-up.
    booted: Arc<AtomicU64>,
}

impl ProcessGuest {
    pub fn new(mem: Arc<Mapping>, config: GuestConfig) -> Result<Self, ProcessError> {
        let n = config.vcpus.max(1);
        let states = (0..n)
            .map(|i| initial_state(&config.workload, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProcessGuest {
            mem,
            config,
            states,
            workers: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            ops: Arc::new(AtomicU64::new(0)),
            booted: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn is_running(&self) -> bool {
        !self.workers.is_empty()
    }

    /// Starts the workers from their current states.
    pub fn run(&mut self) {
        if self.is_running() {
            return;
        }
        self.stop.store(false, Ordering::SeqCst);
        self.booted.store(0, Ordering::SeqCst);
        let pages = self.config.mem_bytes >> PAGE_SHIFT;
        let n = self.states.len() as u32;
        for (i, state) in self.states.iter().enumerate() {
            let (first, count) = worker_slice(pages, n, i as u32);
            let w = Worker {
                mem: self.mem.clone(),
                first,
                count,
                id: i as u64,
                stop: self.stop.clone(),
                ops: self.ops.clone(),
                booted: self.booted.clone(),
                workload: self.config.workload.clone(),
            };
            let state = state.clone();
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || w.run(state))
                .expect("spawn worker thread");
            self.workers.push(handle);
        }
    }

    /// Stops every worker after its current write; returns when all stopped.
    pub fn stop(&mut self) -> Result<(), ProcessError> {
        self.stop.store(true, Ordering::SeqCst);
        let mut states = Vec::with_capacity(self.workers.len());
        let mut panicked = false;
        for h in self.workers.drain(..) {
            match h.join() {
                Ok(s) => states.push(s),
                Err(_) => panicked = true,
            }
        }
        if panicked {
            return Err(ProcessError::WorkerPanicked);
        }
        if !states.is_empty() {
            self.states = states;
        }
        Ok(())
    }

    pub fn save(&self) -> Vec<u8> {
        let saved = SavedState {
            workers: self.states.clone(),
            ops: self.ops.load(Ordering::Relaxed),
        };
        rmp_serde::to_vec(&saved).expect("worker states serialize")
    }

    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), ProcessError> {
        let saved: SavedState = rmp_serde::from_slice(bytes).map_err(|e| {
            // The decoder may quote the peer's bytes.
            ProcessError::BadState(common::peer_text::escape(&e.to_string()).into_owned())
        })?;
        if saved.workers.len() != self.states.len() {
            return Err(ProcessError::WorkerCount {
                got: saved.workers.len(),
                want: self.states.len(),
            });
        }
        let pages = self.config.mem_bytes >> PAGE_SHIFT;
        let n = self.states.len() as u32;
        for (i, (got, mine)) in saved.workers.iter().zip(&self.states).enumerate() {
            if std::mem::discriminant(got) != std::mem::discriminant(mine) {
                return Err(ProcessError::WrongWorkload {
                    got: format!("{got:?}"),
                    want: self.config.workload.name().to_string(),
                });
            }
            // Positions come from the other host: they must fit this slice.
            let (_, count) = worker_slice(pages, n, i as u32);
            let fits = match got {
                WorkerState::Ab { next, .. } => *next < count.max(1),
                WorkerState::Idle { filled } => *filled <= count,
                WorkerState::Random { .. } => true,
            };
            if !fits {
                return Err(ProcessError::BadPosition {
                    worker: i,
                    state: format!("{got:?}"),
                    pages: count,
                });
            }
        }
        self.states = saved.workers;
        self.ops.store(saved.ops, Ordering::Relaxed);
        Ok(())
    }

    /// True once every worker is past its start-up: `ab` has zeroed its
    /// slice, `idle` has filled it (`random` has none).
    pub fn booted(&self) -> bool {
        self.booted.load(Ordering::Relaxed) >= self.states.len() as u64
    }

    /// Writes (or, for `ab`, page increments) done so far, across hosts.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }
}

fn initial_state(w: &Workload, i: u32) -> Result<WorkerState, ProcessError> {
    Ok(match w {
        Workload::Ab => WorkerState::Ab {
            zeroed: false,
            next: 0,
        },
        Workload::Random(p) => WorkerState::Random {
            rng: splitmix(p.seed ^ (u64::from(i) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
            writes: 0,
        },
        Workload::Idle => WorkerState::Idle { filled: 0 },
        Workload::BootSector | Workload::Linux(_) => return Err(ProcessError::BootSector),
    })
}

/// The pattern the idle workload writes: word `w` of page `p`.
pub fn idle_pattern(page: u64, word: u64) -> u64 {
    splitmix(page.wrapping_mul(512).wrapping_add(word) ^ 0x1D1E_1D1E)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct Worker {
    mem: Arc<Mapping>,
    first: u64,
    count: u64,
    id: u64,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    booted: Arc<AtomicU64>,
    workload: Workload,
}

impl Worker {
    fn mark_booted(&self) {
        self.booted.fetch_add(1, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn run(self, state: WorkerState) -> WorkerState {
        if self.count == 0 {
            self.mark_booted();
            return state;
        }
        match (state, &self.workload) {
            (WorkerState::Ab { zeroed, next }, _) => self.run_ab(zeroed, next),
            (WorkerState::Random { rng, writes }, Workload::Random(p)) => {
                self.run_random(*p, rng, writes)
            }
            (WorkerState::Idle { filled }, _) => self.run_idle(filled),
            (s, _) => s,
        }
    }

    fn run_ab(&self, mut zeroed: bool, mut next: u64) -> WorkerState {
        let bytes = self.mem.atomic_bytes();
        let mut done = 0u64;
        if zeroed {
            self.mark_booted();
        }
        loop {
            let b = &bytes[((self.first + next) << PAGE_SHIFT) as usize];
            if zeroed {
                // One writer per page: a load and a store, not a locked add.
                b.store(b.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
            } else {
                b.store(0, Ordering::Relaxed);
            }
            done += 1;
            next += 1;
            if next == self.count {
                next = 0;
                if !zeroed {
                    zeroed = true;
                    self.mark_booted();
                }
            }
            if done.is_multiple_of(64) {
                self.ops.fetch_add(64, Ordering::Relaxed);
            }
            if self.stopped() {
                self.ops.fetch_add(done % 64, Ordering::Relaxed);
                return WorkerState::Ab { zeroed, next };
            }
        }
    }

    fn run_random(&self, p: RandomParams, mut rng: u64, mut writes: u64) -> WorkerState {
        let words = self.mem.atomic_words();
        self.mark_booted();
        let hot = p.hot_pages.clamp(1, self.count);
        let started = Instant::now();
        let base_writes = writes;
        loop {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let r = rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let in_hot = (r % 100) < u64::from(p.hot_percent);
            let span = if in_hot { hot } else { self.count };
            let page = self.first + (r >> 8) % span;
            let word = (r >> 40) % (PAGE_SIZE as u64 / 8);
            writes += 1;
            let stamp = (self.id << 48) | (writes & 0xFFFF_FFFF_FFFF);
            words[(page * (PAGE_SIZE as u64 / 8) + word) as usize].store(stamp, Ordering::Relaxed);
            self.ops.fetch_add(1, Ordering::Relaxed);
            if self.stopped() {
                return WorkerState::Random { rng, writes };
            }
            if p.write_rate > 0 && writes.is_multiple_of(16) {
                let due =
                    Duration::from_secs_f64((writes - base_writes) as f64 / p.write_rate as f64);
                let now = started.elapsed();
                if due > now {
                    std::thread::sleep((due - now).min(Duration::from_millis(20)));
                }
            }
        }
    }

    fn run_idle(&self, mut filled: u64) -> WorkerState {
        let words = self.mem.atomic_words();
        let per_page = PAGE_SIZE as u64 / 8;
        while filled < self.count {
            let page = self.first + filled;
            for w in 0..per_page {
                words[(page * per_page + w) as usize]
                    .store(idle_pattern(page, w), Ordering::Relaxed);
            }
            filled += 1;
            self.ops.fetch_add(1, Ordering::Relaxed);
            if self.stopped() {
                return WorkerState::Idle { filled };
            }
        }
        self.mark_booted();
        while !self.stopped() {
            std::thread::sleep(Duration::from_millis(5));
        }
        WorkerState::Idle { filled }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::guest::{ab_violations, GuestKind};
    use common::mem::{create_memfd, Access};
    use std::os::fd::AsFd;

    fn guest(workload: Workload, pages: u64, vcpus: u32) -> (ProcessGuest, Arc<Mapping>) {
        let len = pages * PAGE_SIZE as u64;
        let fd = create_memfd("t", len).unwrap();
        let mem = Arc::new(Mapping::new(fd.as_fd(), len as usize, Access::ReadWrite).unwrap());
        let config = GuestConfig {
            kind: GuestKind::Process,
            mem_bytes: len,
            vcpus,
            workload,
            boot_sector: None,
        };
        (ProcessGuest::new(mem.clone(), config).unwrap(), mem)
    }

    fn ab_ok(g: &ProcessGuest, mem: &Mapping) {
        for (start, end) in g.config.ab_ranges() {
            let bytes = mem.atomic_bytes();
            let check = ab_violations(
                (start >> PAGE_SHIFT..end >> PAGE_SHIFT)
                    .map(|p| (p, bytes[(p << PAGE_SHIFT) as usize].load(Ordering::Relaxed))),
            );
            assert!(check.bad_pages.is_empty(), "{check:?}");
        }
    }

    #[test]
    fn ab_stops_and_resumes_exactly() {
        let (mut g, mem) = guest(Workload::Ab, 300, 2);
        g.run();
        std::thread::sleep(Duration::from_millis(30));
        g.stop().unwrap();
        ab_ok(&g, &mem);
        let saved = g.save();
        // A second guest over the same memory continues the pattern.
        let (mut g2, _) = guest(Workload::Ab, 300, 2);
        g2.mem = mem.clone();
        g2.restore(&saved).unwrap();
        assert_eq!(g2.states, g.states);
        g2.run();
        std::thread::sleep(Duration::from_millis(30));
        g2.stop().unwrap();
        ab_ok(&g2, &mem);
        assert!(g2.ops() > g.ops());
    }

    #[test]
    fn random_and_idle_write() {
        let params = RandomParams {
            hot_pages: 4,
            hot_percent: 90,
            write_rate: 0,
            seed: 1,
        };
        let (mut g, mem) = guest(Workload::Random(params), 64, 1);
        g.run();
        std::thread::sleep(Duration::from_millis(20));
        g.stop().unwrap();
        assert!(g.ops() > 0);
        let mut page = vec![0u8; PAGE_SIZE];
        mem.read(0, &mut page);
        assert!(!common::mem::is_zero(&page));

        let (mut g, mem) = guest(Workload::Idle, 16, 2);
        g.run();
        std::thread::sleep(Duration::from_millis(20));
        g.stop().unwrap();
        let words = mem.atomic_words();
        assert_eq!(
            words[512 * 5 + 3].load(Ordering::Relaxed),
            idle_pattern(5, 3)
        );
    }

    #[test]
    fn state_for_another_workload_is_refused() {
        let (g, _) = guest(Workload::Idle, 16, 1);
        let (mut g2, _) = guest(Workload::Ab, 16, 1);
        assert!(matches!(
            g2.restore(&g.save()),
            Err(ProcessError::WrongWorkload { .. })
        ));
        let (mut g3, _) = guest(Workload::Idle, 16, 2);
        assert!(matches!(
            g3.restore(&g.save()),
            Err(ProcessError::WorkerCount { .. })
        ));
        assert!(g3.restore(b"\xc1junk").is_err());
        // A position from the wire that does not fit the slice.
        let bad = SavedState {
            workers: vec![WorkerState::Ab {
                zeroed: true,
                next: 1_000_000_000,
            }],
            ops: 0,
        };
        let (mut g4, _) = guest(Workload::Ab, 16, 1);
        assert!(matches!(
            g4.restore(&rmp_serde::to_vec(&bad).unwrap()),
            Err(ProcessError::BadPosition { .. })
        ));
    }
}
