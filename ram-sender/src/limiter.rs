//! Bandwidth limits for the main stream: a token bucket refilled at the
//! configured rate, allowed to run ahead by at most 50 ms of traffic, and
//! the two caps it runs at (QEMU's max-bandwidth before the switch to
//! postcopy, max-postcopy-bandwidth after it).

use std::time::{Duration, Instant};

pub struct Limiter {
    rate: u64,
    credit: f64,
    last: Instant,
}

impl Limiter {
    /// `rate` bytes per second; 0 = unlimited.
    pub fn new(rate: u64) -> Self {
        Limiter {
            rate,
            credit: 0.0,
            last: Instant::now(),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn set_rate(&mut self, rate: u64) {
        self.rate = rate;
        self.credit = 0.0;
        self.last = Instant::now();
    }

    /// Accounts `bytes` about to be sent, sleeping first if they would
    /// exceed the rate.
    pub fn take(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let rate = self.rate as f64;
        let burst = rate * 0.05;
        let now = Instant::now();
        self.credit = (self.credit + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        self.credit -= bytes as f64;
        if self.credit < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.credit / rate));
            self.last = Instant::now();
            self.credit = 0.0;
        }
    }
}

/// The main stream's two caps, bytes/s (0 = unlimited), and the limiter
/// running at the current one.
pub struct Caps {
    precopy: u64,
    postcopy: u64,
    switched: bool,
    limiter: Limiter,
}

impl Caps {
    /// Starts at the precopy cap.
    pub fn new(precopy: u64, postcopy: u64) -> Self {
        Caps {
            precopy,
            postcopy,
            switched: false,
            limiter: Limiter::new(precopy),
        }
    }

    /// The guest stopped for postcopy: from now on the postcopy cap.
    pub fn switch_to_postcopy(&mut self) {
        if !self.switched {
            self.switched = true;
            self.limiter.set_rate(self.postcopy);
        }
    }

    pub fn set_precopy(&mut self, rate: u64) {
        self.precopy = rate;
        if !self.switched {
            self.limiter.set_rate(rate);
        }
    }

    pub fn set_postcopy(&mut self, rate: u64) {
        self.postcopy = rate;
        if self.switched {
            self.limiter.set_rate(rate);
        }
    }

    /// The cap in force now.
    pub fn rate(&self) -> u64 {
        self.limiter.rate()
    }

    pub fn precopy(&self) -> u64 {
        self.precopy
    }

    pub fn postcopy(&self) -> u64 {
        self.postcopy
    }

    /// See [`Limiter::take`].
    pub fn take(&mut self, bytes: u64) {
        self.limiter.take(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_changes_the_cap() {
        let mut c = Caps::new(16 << 20, 0);
        assert_eq!(c.rate(), 16 << 20);
        // A postcopy cap set before the switch waits for it.
        c.set_postcopy(8 << 20);
        assert_eq!(c.rate(), 16 << 20);
        c.switch_to_postcopy();
        assert_eq!(c.rate(), 8 << 20);
        // After it, the precopy cap is kept but not applied.
        c.set_precopy(1 << 20);
        assert_eq!(c.rate(), 8 << 20);
        assert_eq!(c.precopy(), 1 << 20);
        c.set_postcopy(0);
        assert_eq!(c.rate(), 0);
    }

    #[test]
    fn unlimited_after_the_switch_never_sleeps() {
        // 16 MiB/s before, unlimited after: 1 GiB goes at once.
        let mut c = Caps::new(16 << 20, 0);
        c.switch_to_postcopy();
        let t = Instant::now();
        for _ in 0..1024 {
            c.take(1 << 20);
        }
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn unlimited_never_sleeps() {
        let mut l = Limiter::new(0);
        let t = Instant::now();
        for _ in 0..1000 {
            l.take(1 << 20);
        }
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn limited_paces_to_the_rate() {
        // 10 MB at 100 MB/s cannot take less than ~100 ms (minus the burst).
        let mut l = Limiter::new(100_000_000);
        let t = Instant::now();
        for _ in 0..100 {
            l.take(100_000);
        }
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
    }
}
