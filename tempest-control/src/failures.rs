//! Failed authentications per client address, rate-limited: the
//! director's API and web UI login and the agent's API count them here,
//! and refuse an address that used up its failures (HTTP 429) until the
//! bucket refills.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed authentications an address may make within [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 10;
/// The window of [`MAX_FAILURES`].
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// The most addresses whose failures are remembered.
pub const MAX_TRACKED: usize = 4096;

/// Failed authentications per client address: a token bucket of
/// [`MAX_FAILURES`] per address, refilled over [`FAILURE_WINDOW`].
#[derive(Debug, Default)]
pub struct FailureLimiter {
    table: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Failures the address may still make.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let rate = f64::from(MAX_FAILURES) / FAILURE_WINDOW.as_secs_f64();
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + gained).min(f64::from(MAX_FAILURES));
        self.at = now;
    }

    fn full(&self) -> bool {
        self.tokens >= f64::from(MAX_FAILURES)
    }
}

impl FailureLimiter {
    /// `Err(wait)` while `ip` has used up its failures: how long until it
    /// may try again.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(b) = table.get_mut(&ip) else {
            return Ok(());
        };
        b.refill(now);
        if b.tokens >= 1.0 {
            return Ok(());
        }
        let rate = f64::from(MAX_FAILURES) / FAILURE_WINDOW.as_secs_f64();
        Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
    }

    /// Counts a failure of `ip`.
    pub fn fail(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !table.contains_key(&ip) && table.len() >= MAX_TRACKED {
            // Forget those that have nothing against them any more; if
            // none, the one with the fewest failures.
            table.retain(|_, b| {
                b.refill(now);
                !b.full()
            });
            if table.len() >= MAX_TRACKED {
                if let Some(least) = table
                    .iter()
                    .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                    .map(|(ip, _)| *ip)
                {
                    table.remove(&least);
                }
            }
        }
        let b = table.entry(ip).or_insert(Bucket {
            tokens: f64::from(MAX_FAILURES),
            at: now,
        });
        b.refill(now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_limited_per_address() {
        let l = FailureLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(l.check(a).is_ok());
            l.fail(a);
        }
        let wait = l.check(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= FAILURE_WINDOW, "{wait:?}");
        assert!(l.check(b).is_ok(), "another address is not affected");
        // The table stays bounded.
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.fail(IpAddr::from(i.to_be_bytes()));
        }
        assert!(l.table.lock().unwrap().len() <= MAX_TRACKED);
    }
}
