//! The ack ledger: which roots are in flight, and how much work each still has.
//!
//! Every source message becomes a *root*. The ledger keeps one fixed-size
//! [`Entry`] per root, whatever its fan-out: a count of the messages of its
//! tree that are queued or being handled. Handling one message with `n`
//! outputs adds `n - 1`; when the count reaches zero the tree is complete.
//! A root that errors or outlives `message_timeout` is removed at once, and
//! anything of its tree still queued is recognised as stale by its
//! generation and dropped.
//!
//! The live roots also form an intrusive list in admission order. Since every
//! root gets the same timeout, the oldest root is the first to expire, so the
//! sweep looks only at the head: timeouts fire on a timer, whether or not any
//! ack arrives, in O(1) per expired root.
//!
//! The ledger owns no clock and no I/O: callers pass the time in [`Tick`]s,
//! read once per batch, and act on what it returns. It must never hold
//! payloads or source ids in an [`Entry`]: those live in the per-slot `tags`,
//! which a caller may leave empty (`()`).

use std::time::{Duration, Instant};

/// Time in ledger ticks of [`TICK`] since the ledger's epoch, wrapping.
pub type Tick = u32;

/// The length of a [`Tick`]: fine enough for root latencies, coarse enough
/// that a `u32` spans hours (it wraps after about 11.9 hours).
pub const TICK: Duration = Duration::from_micros(10);

/// The longest `message_timeout` the ledger supports. Ages are compared with
/// wrapping arithmetic, which is exact while they stay under half the wrap.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

const NIL: u32 = u32::MAX;

// The ledger's promise: at most 32 bytes per in-flight root (it is 20).
const _: () = assert!(std::mem::size_of::<Entry>() <= 20);

/// Identifies one root: a ledger slot and the generation of its use.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootId(pub u64);

impl RootId {
    fn new(slot: u32, gen: u32) -> Self {
        RootId((u64::from(gen) << 32) | u64::from(slot))
    }
    fn slot(self) -> u32 {
        self.0 as u32
    }
    fn gen(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// The ledger's record of one root (20 bytes).
#[derive(Copy, Clone, Debug)]
struct Entry {
    /// Messages of the tree queued or being handled; 0 = slot is free.
    pending: u32,
    /// Bumped each time the slot is freed, so ids of old roots go stale.
    gen: u32,
    /// When the root was admitted.
    born: Tick,
    /// Admission-order list of live roots (or the free list, through `next`).
    prev: u32,
    next: u32,
}

/// What became of a root after one of its messages was settled.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled<T> {
    /// Work of the tree is still outstanding.
    Pending,
    /// The tree is complete: the root's tag and how long it took.
    Complete(T, Duration),
    /// The root is no longer in the ledger (failed or timed out before).
    Stale,
}

/// The ack ledger. `T` is a per-root tag kept beside (not inside) the entries,
/// such as the source's id of the root.
pub struct Ledger<T> {
    entries: Vec<Entry>,
    tags: Vec<T>,
    free: u32,
    head: u32,
    tail: u32,
    live: usize,
    timeout: Tick,
    epoch: Instant,
}

impl<T: Default> Ledger<T> {
    /// An empty ledger whose roots time out after `timeout` (capped at
    /// [`MAX_TIMEOUT`]).
    pub fn new(timeout: Duration) -> Self {
        Self::with_capacity(timeout, 0)
    }

    /// An empty ledger with room for `capacity` roots before it grows.
    pub fn with_capacity(timeout: Duration, capacity: usize) -> Self {
        let timeout = timeout.min(MAX_TIMEOUT);
        Ledger {
            entries: Vec::with_capacity(capacity),
            tags: Vec::with_capacity(capacity),
            free: NIL,
            head: NIL,
            tail: NIL,
            live: 0,
            timeout: ticks(timeout).max(1),
            epoch: Instant::now(),
        }
    }

    /// The current time in ticks.
    pub fn now(&self) -> Tick {
        ticks(self.epoch.elapsed())
    }

    /// The number of roots in flight.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when no root is in flight.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes the ledger itself holds per slot (not counting tags).
    pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

    /// Admits a root whose first `pending` messages are about to be queued.
    pub fn admit(&mut self, tag: T, pending: u32, now: Tick) -> RootId {
        debug_assert!(pending > 0, "a root starts with at least one message");
        let slot = if self.free != NIL {
            let slot = self.free;
            self.free = self.entries[slot as usize].next;
            slot
        } else {
            let slot = u32::try_from(self.entries.len()).unwrap_or(NIL);
            assert!(
                slot != NIL,
                "ledger is full: more than 2^32-1 roots in flight"
            );
            self.entries.push(Entry {
                pending: 0,
                gen: 0,
                born: 0,
                prev: NIL,
                next: NIL,
            });
            self.tags.push(T::default());
            slot
        };
        let tail = self.tail;
        let e = &mut self.entries[slot as usize];
        e.pending = pending.max(1);
        e.born = now;
        e.prev = tail;
        e.next = NIL;
        let gen = e.gen;
        if tail == NIL {
            self.head = slot;
        } else {
            self.entries[tail as usize].next = slot;
        }
        self.tail = slot;
        self.tags[slot as usize] = tag;
        self.live += 1;
        RootId::new(slot, gen)
    }

    /// True while `root` is in flight.
    pub fn is_live(&self, root: RootId) -> bool {
        self.entries
            .get(root.slot() as usize)
            .is_some_and(|e| e.gen == root.gen() && e.pending > 0)
    }

    /// The tag of a live root.
    pub fn tag(&self, root: RootId) -> Option<&T> {
        self.is_live(root).then(|| &self.tags[root.slot() as usize])
    }

    /// Records that one message of `root` was handled and produced `children`
    /// messages that are about to be queued.
    pub fn settle(&mut self, root: RootId, children: u32, now: Tick) -> Settled<T> {
        let Some(e) = self.entries.get_mut(root.slot() as usize) else {
            return Settled::Stale;
        };
        if e.gen != root.gen() || e.pending == 0 {
            return Settled::Stale;
        }
        // pending >= 1 here, so this cannot underflow.
        e.pending = e.pending - 1 + children;
        if e.pending > 0 {
            return Settled::Pending;
        }
        let age = now.wrapping_sub(e.born);
        let tag = self.release(root.slot());
        Settled::Complete(tag, duration(age))
    }

    /// Adds `n` messages to a live root's tree without settling one (used
    /// when a message is copied, e.g. re-queued after a lost lease).
    pub fn add(&mut self, root: RootId, n: u32) -> bool {
        match self.entries.get_mut(root.slot() as usize) {
            Some(e) if e.gen == root.gen() && e.pending > 0 => {
                e.pending += n;
                true
            }
            _ => false,
        }
    }

    /// Removes a live root (its tree failed), returning its tag and age.
    pub fn remove(&mut self, root: RootId, now: Tick) -> Option<(T, Duration)> {
        if !self.is_live(root) {
            return None;
        }
        let age = now.wrapping_sub(self.entries[root.slot() as usize].born);
        Some((self.release(root.slot()), duration(age)))
    }

    /// Removes every root older than the timeout, oldest first, handing each
    /// to `expired` with its id and tag. Returns how many expired.
    pub fn expire(&mut self, now: Tick, mut expired: impl FnMut(RootId, T)) -> usize {
        let mut n = 0;
        while self.head != NIL {
            let slot = self.head;
            let e = self.entries[slot as usize];
            if now.wrapping_sub(e.born) < self.timeout {
                break;
            }
            let id = RootId::new(slot, e.gen);
            let tag = self.release(slot);
            expired(id, tag);
            n += 1;
        }
        n
    }

    /// When the oldest root will expire, if any root is in flight.
    pub fn next_deadline(&self, now: Tick) -> Option<Duration> {
        (self.head != NIL).then(|| {
            let age = now.wrapping_sub(self.entries[self.head as usize].born);
            duration(self.timeout.saturating_sub(age))
        })
    }

    /// The bytes the ledger's entries occupy (capacity included), tags excluded.
    pub fn entry_bytes(&self) -> usize {
        self.entries.capacity() * Self::ENTRY_BYTES
    }

    fn release(&mut self, slot: u32) -> T {
        let Entry { prev, next, .. } = self.entries[slot as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        let e = &mut self.entries[slot as usize];
        e.pending = 0;
        e.gen = e.gen.wrapping_add(1);
        e.prev = NIL;
        e.next = self.free;
        self.free = slot;
        self.live -= 1;
        std::mem::take(&mut self.tags[slot as usize])
    }
}

/// Converts a duration to whole ticks (saturating).
pub fn ticks(d: Duration) -> Tick {
    u32::try_from(d.as_micros() / TICK.as_micros()).unwrap_or(u32::MAX)
}

fn duration(t: Tick) -> Duration {
    TICK * t
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn completes_after_whole_tree() {
        let mut l = Ledger::new(T);
        let r = l.admit(7u32, 1, 0);
        assert_eq!(l.settle(r, 2, 1), Settled::Pending); // root -> 2 children
        assert_eq!(l.settle(r, 0, 2), Settled::Pending);
        assert_eq!(l.settle(r, 0, 3), Settled::Complete(7, TICK * 3));
        assert_eq!(l.settle(r, 0, 4), Settled::Stale);
        assert!(l.is_empty());
    }

    #[test]
    fn reused_slot_makes_old_ids_stale() {
        let mut l = Ledger::new(T);
        let a = l.admit(1u32, 1, 0);
        assert!(matches!(l.settle(a, 0, 0), Settled::Complete(1, _)));
        let b = l.admit(2u32, 1, 0);
        assert_ne!(a, b);
        assert!(!l.is_live(a));
        assert_eq!(l.settle(a, 0, 0), Settled::Stale);
        assert!(l.is_live(b));
    }

    #[test]
    fn expire_takes_only_old_roots_oldest_first() {
        let mut l = Ledger::new(Duration::from_millis(1)); // 100 ticks
        let a = l.admit(1u32, 1, 0);
        let b = l.admit(2u32, 1, 50);
        let c = l.admit(3u32, 1, 120);
        let mut out = vec![];
        assert_eq!(l.expire(99, |id, t| out.push((id, t))), 0);
        assert_eq!(l.expire(150, |id, t| out.push((id, t))), 2);
        assert_eq!(out, vec![(a, 1), (b, 2)]);
        assert!(l.is_live(c));
        assert_eq!(l.next_deadline(150), Some(TICK * 70));
    }

    #[test]
    fn remove_in_middle_keeps_order() {
        let mut l = Ledger::new(Duration::from_millis(1));
        let ids: Vec<_> = (0..5u32).map(|i| l.admit(i, 1, i)).collect();
        assert_eq!(l.remove(ids[2], 3), Some((2, TICK)));
        assert_eq!(l.remove(ids[2], 3), None);
        l.settle(ids[0], 0, 4);
        let mut out = vec![];
        l.expire(1000, |_, t| out.push(t));
        assert_eq!(out, vec![1, 3, 4]);
        assert!(l.is_empty());
    }

    #[test]
    fn wrapping_clock() {
        let mut l = Ledger::new(Duration::from_millis(1));
        let start = u32::MAX - 10;
        let r = l.admit((), 1, start);
        assert_eq!(l.expire(start.wrapping_add(50), |_, _| {}), 0);
        assert!(l.is_live(r));
        assert_eq!(l.expire(start.wrapping_add(100), |_, _| {}), 1);
    }

    proptest::proptest! {
        /// Against a model: each root completes exactly once, at the moment
        /// its outstanding count reaches zero.
        #[test]
        fn matches_model(ops in proptest::collection::vec((0usize..8, 0u32..3), 1..400)) {
            let mut l = Ledger::new(T);
            let mut model: Vec<(RootId, u32)> = Vec::new();
            let mut completed = 0usize;
            let mut admitted = 0usize;
            for (pick, children) in ops {
                if model.is_empty() || pick == 0 {
                    let r = l.admit(admitted, 1, 0);
                    admitted += 1;
                    model.push((r, 1));
                    continue;
                }
                let i = pick % model.len();
                let (r, p) = model[i];
                let res = l.settle(r, children, 0);
                let left = p - 1 + children;
                if left == 0 {
                    proptest::prop_assert!(matches!(res, Settled::Complete(..)));
                    model.swap_remove(i);
                    completed += 1;
                } else {
                    proptest::prop_assert_eq!(res, Settled::Pending);
                    model[i].1 = left;
                }
            }
            proptest::prop_assert_eq!(l.len(), model.len());
            proptest::prop_assert_eq!(admitted, completed + model.len());
        }
    }
}
