//! Bandwidth limit for the main stream: a token bucket refilled at the
//! configured rate, allowed to run ahead by at most 50 ms of traffic.

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

#[cfg(test)]
mod tests {
    use super::*;

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
