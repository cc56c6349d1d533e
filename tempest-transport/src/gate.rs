//! The gate of an accepting port (a topology server's, a worker's peer
//! port): how many connections it holds, how many may still be in their
//! handshake, and which addresses failed authentication too often.
//!
//! - At most `max_handshakes` connections are in their handshake at once;
//!   one more evicts the oldest, so a flood of silent connections cannot
//!   keep a real worker (which retries) out for longer than it takes the
//!   flood to cycle, and costs the port a bounded number of sockets.
//! - At most `max_connections` handshakes complete; beyond that a
//!   connection is refused with `Busy`.
//! - An address that failed authentication `max_failures` times within a
//!   minute is closed at once, without a handshake, until the minute
//!   passes. The table of addresses is bounded.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// The window of [`Gate::failed_auth`].
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// The most addresses remembered for failed authentication.
const MAX_TRACKED: usize = 4096;

/// How a port limits its connections.
#[derive(Copy, Clone, Debug)]
pub struct GateConfig {
    /// Connections past their handshake, at most.
    pub max_connections: usize,
    /// Connections in their handshake, at most (the oldest goes).
    pub max_handshakes: usize,
    /// Failed authentications per address per minute before it is shut out.
    pub max_failures: u32,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            max_connections: 4096,
            max_handshakes: 64,
            max_failures: 16,
        }
    }
}

/// The gate. See the module docs.
pub struct Gate {
    config: GateConfig,
    open: AtomicUsize,
    next: AtomicU64,
    handshakes: Mutex<VecDeque<(u64, CancellationToken)>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// A connection in its handshake: cancelled when evicted; dropping it
/// leaves the handshake queue.
pub struct Handshake {
    gate: Arc<Gate>,
    id: u64,
    /// Fires when this handshake was evicted by a newer one.
    pub evicted: CancellationToken,
}

/// A connection past its handshake: counts until dropped.
pub struct Admitted {
    gate: Arc<Gate>,
}

impl Gate {
    /// A gate with these limits.
    pub fn new(config: GateConfig) -> Arc<Gate> {
        Arc::new(Gate {
            config,
            open: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            handshakes: Mutex::new(VecDeque::new()),
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// A new connection from `ip`: `None` when the address is shut out for
    /// failed authentications (close it at once), else its handshake slot
    /// (evicting the oldest handshake when all are taken).
    pub fn arrive(self: &Arc<Self>, ip: IpAddr) -> Option<Handshake> {
        if self.shut_out(ip) {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        let mut q = self.handshakes.lock();
        while q.len() >= self.config.max_handshakes.max(1) {
            if let Some((_, oldest)) = q.pop_front() {
                oldest.cancel();
            }
        }
        q.push_back((id, evicted.clone()));
        Some(Handshake {
            gate: self.clone(),
            id,
            evicted,
        })
    }

    fn shut_out(&self, ip: IpAddr) -> bool {
        let f = self.failures.lock();
        f.get(&ip).is_some_and(|(n, since)| {
            *n >= self.config.max_failures && since.elapsed() < FAILURE_WINDOW
        })
    }

    /// `ip` failed authentication once more.
    pub fn failed_auth(&self, ip: IpAddr) {
        let mut f = self.failures.lock();
        if f.len() >= MAX_TRACKED && !f.contains_key(&ip) {
            f.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if f.len() >= MAX_TRACKED {
                // Full of recent offenders: forget the oldest.
                if let Some(oldest) = f.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| *k) {
                    f.remove(&oldest);
                }
            }
        }
        let e = f.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    /// Connections past their handshake now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Handshake {
    /// The handshake succeeded: `None` when the port is full (refuse with
    /// `Busy`), else the connection's place.
    pub fn admit(self) -> Option<Admitted> {
        let gate = self.gate.clone();
        drop(self);
        let prev = gate.open.fetch_add(1, Ordering::Relaxed);
        if prev >= gate.config.max_connections {
            gate.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Admitted { gate })
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut q = self.gate.handshakes.lock();
        if let Some(at) = q.iter().position(|(id, _)| *id == self.id) {
            q.remove(at);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn the_oldest_handshake_makes_room_and_the_port_fills() {
        let g = Gate::new(GateConfig {
            max_connections: 2,
            max_handshakes: 2,
            max_failures: 3,
        });
        let a = g.arrive(ip(1)).unwrap();
        let b = g.arrive(ip(1)).unwrap();
        let c = g.arrive(ip(2)).unwrap();
        assert!(a.evicted.is_cancelled(), "the oldest gave way");
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        let (b, c) = (b.admit().unwrap(), c.admit().unwrap());
        assert_eq!(g.open(), 2);
        assert!(g.arrive(ip(3)).unwrap().admit().is_none(), "full: Busy");
        drop(b);
        assert!(g.arrive(ip(3)).unwrap().admit().is_some());
        drop(c);
    }

    #[test]
    fn an_address_that_keeps_failing_is_shut_out_and_only_it() {
        let g = Gate::new(GateConfig {
            max_failures: 3,
            ..GateConfig::default()
        });
        for _ in 0..3 {
            assert!(g.arrive(ip(9)).is_some());
            g.failed_auth(ip(9));
        }
        assert!(g.arrive(ip(9)).is_none());
        assert!(g.arrive(ip(8)).is_some());
    }
}
