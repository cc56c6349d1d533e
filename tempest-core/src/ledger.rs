//! The ack ledger: which roots are in flight, and whether each one's tree of
//! messages is complete.
//!
//! Every source message becomes a *root*, and every message of its tree
//! carries a random 64-bit [`EdgeId`]. The ledger keeps one fixed-size
//! entry per root, whatever its fan-out: the XOR of edge ids, as Storm's
//! acker does. The root's own id goes in at admission; whoever handles a
//! message reports `its id ^ the ids of the children it emitted`. Every id
//! then enters the XOR exactly twice (created, handled), so the value is 0
//! exactly when every message of the tree was handled, in whatever order the
//! reports arrive (a false zero needs a 64-bit collision). A root that errors
//! or outlives `message_timeout` is removed at once, and anything of its tree
//! still travelling is recognised as stale by its generation and ignored.
//!
//! Each entry also keeps a [`SlotMask`]: one bit per worker slot (task
//! instance, folded onto 64 bits) that a message of the tree was sent to. When
//! a worker is lost, [`Ledger::remove_touching`] finds every root whose
//! messages it held or had been sent, so they are replayed at once rather
//! than after the timeout. Two slots may share a bit: that replays a few more
//! roots than needed, never fewer.
//!
//! The live roots also form an intrusive list in admission order. Since every
//! root gets the same timeout, the oldest root is the first to expire, so the
//! sweep looks only at the head: timeouts fire on a timer, whether or not any
//! ack arrives, in O(1) per expired root.
//!
//! The ledger owns no clock and no I/O: callers pass the time in [`Tick`]s,
//! read once per batch, and act on what it returns. It must never hold
//! payloads or source ids in an entry: those live in the per-slot `tags`,
//! which a caller may leave empty (`()`).

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// Time in ledger ticks of [`TICK`] since the ledger's epoch, wrapping.
pub type Tick = u32;

/// The length of a [`Tick`]: fine enough for root latencies, coarse enough
/// that a `u32` spans hours (it wraps after about 11.9 hours).
pub const TICK: Duration = Duration::from_micros(10);

/// The longest `message_timeout` the ledger supports. Ages are compared with
/// wrapping arithmetic, which is exact while they stay under half the wrap.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The id of one message of a tree; see the module docs.
pub type EdgeId = u64;

/// Worker slots a root's messages were sent to, one bit each (see
/// [`slot_bit`]).
pub type SlotMask = u64;

const NIL: u32 = u32::MAX;

// The ledger's promise: at most 32 bytes per in-flight root.
const _: () = assert!(std::mem::size_of::<Entry>() <= 32);

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

/// The mask bit of a worker slot: instance `instance` of the task at index
/// `task`. Stable when a task's instance count changes, so a rebalance does
/// not move the bits of the slots that stay.
pub fn slot_bit(task: usize, instance: u32) -> SlotMask {
    let n = (task as u64)
        .wrapping_mul(17)
        .wrapping_add(u64::from(instance));
    1 << (n % 64)
}

/// The ledger's record of one root (32 bytes).
#[derive(Copy, Clone, Debug)]
struct Entry {
    /// XOR of the edge ids created and handled so far; 0 = complete.
    tree: u64,
    /// The worker slots the tree's messages were sent to.
    slots: SlotMask,
    /// Odd while the slot holds a live root; bumped at admission and at
    /// release, so ids of old roots go stale.
    gen: u32,
    /// When the root was admitted.
    born: Tick,
    /// Admission-order list of live roots (or the free list, through `next`).
    prev: u32,
    next: u32,
}

impl Entry {
    fn live(&self) -> bool {
        self.gen & 1 == 1
    }
}

/// What became of a root after an ack report.
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
    /// The generation new slots start at: random per ledger, so the root ids
    /// of an earlier ledger (a topology server before its restart) do not
    /// name this one's roots.
    first_gen: u32,
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
            first_gen: (random_u64() as u32) & !1,
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

    /// Admits a root whose first message, with edge id `edge`, is about to
    /// be sent.
    pub fn admit(&mut self, tag: T, edge: EdgeId, now: Tick) -> RootId {
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
                tree: 0,
                slots: 0,
                gen: self.first_gen,
                born: 0,
                prev: NIL,
                next: NIL,
            });
            self.tags.push(T::default());
            slot
        };
        let tail = self.tail;
        let e = &mut self.entries[slot as usize];
        e.tree = edge;
        e.slots = 0;
        e.gen = e.gen.wrapping_add(1);
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

    fn entry_mut(&mut self, root: RootId) -> Option<&mut Entry> {
        self.entries
            .get_mut(root.slot() as usize)
            .filter(|e| e.gen == root.gen() && e.live())
    }

    /// True while `root` is in flight.
    pub fn is_live(&self, root: RootId) -> bool {
        self.entries
            .get(root.slot() as usize)
            .is_some_and(|e| e.gen == root.gen() && e.live())
    }

    /// The tag of a live root.
    pub fn tag(&self, root: RootId) -> Option<&T> {
        self.is_live(root).then(|| &self.tags[root.slot() as usize])
    }

    /// The worker slots a live root's messages were sent to.
    pub fn slots(&self, root: RootId) -> Option<SlotMask> {
        self.is_live(root)
            .then(|| self.entries[root.slot() as usize].slots)
    }

    /// Applies an ack report: `xor` is the handled messages' edge ids XORed
    /// with those of the children they emitted, and `slots` the worker slots
    /// those children were sent to.
    pub fn ack(&mut self, root: RootId, xor: u64, slots: SlotMask, now: Tick) -> Settled<T> {
        let Some(e) = self.entry_mut(root) else {
            return Settled::Stale;
        };
        e.tree ^= xor;
        e.slots |= slots;
        if e.tree != 0 {
            return Settled::Pending;
        }
        let age = now.wrapping_sub(e.born);
        let tag = self.release(root.slot());
        Settled::Complete(tag, duration(age))
    }

    /// Records that a message of a live root is being sent to `slots`.
    pub fn mark(&mut self, root: RootId, slots: SlotMask) -> bool {
        match self.entry_mut(root) {
            Some(e) => {
                e.slots |= slots;
                true
            }
            None => false,
        }
    }

    /// Removes a live root (its tree failed), returning its tag and age.
    pub fn remove(&mut self, root: RootId, now: Tick) -> Option<(T, Duration)> {
        let e = self.entry_mut(root)?;
        let age = now.wrapping_sub(e.born);
        Some((self.release(root.slot()), duration(age)))
    }

    /// Removes every live root whose messages were sent to one of `slots`
    /// (a lost worker's), oldest first, handing each to `lost`. Returns how
    /// many were removed. O(roots in flight).
    pub fn remove_touching(&mut self, slots: SlotMask, mut lost: impl FnMut(RootId, T)) -> usize {
        let mut n = 0;
        let mut at = self.head;
        while at != NIL {
            let e = self.entries[at as usize];
            if e.slots & slots != 0 {
                let id = RootId::new(at, e.gen);
                lost(id, self.release(at));
                n += 1;
            }
            at = e.next;
        }
        n
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
        e.tree = 0;
        e.slots = 0;
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

/// 64 random bits from the standard library's per-process hash keys (no
/// dependency, good enough for seeds and generations; not for secrets).
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// Makes [`EdgeId`]s: splitmix64 over a randomly seeded counter. It is a
/// bijection of the counter, so one generator never repeats an id (and never
/// gives 0) before 2^64 calls; two generators collide with probability
/// 2^-64 per pair of ids.
#[derive(Clone, Debug)]
pub struct EdgeIds {
    state: u64,
}

impl Default for EdgeIds {
    fn default() -> Self {
        EdgeIds::new()
    }
}

impl EdgeIds {
    /// A generator with a random seed.
    pub fn new() -> Self {
        EdgeIds {
            state: random_u64(),
        }
    }

    /// A generator with a fixed seed (for tests).
    pub fn seeded(seed: u64) -> Self {
        EdgeIds { state: seed }
    }

    /// The next id (never 0).
    #[inline]
    pub fn next_id(&mut self) -> EdgeId {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // splitmix64 maps exactly one counter value to 0; use 1 instead.
        z.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn completes_after_whole_tree_in_any_order() {
        let mut l = Ledger::new(T);
        let (root, a, b) = (11u64, 22u64, 33u64);
        let r = l.admit(7u32, root, 0);
        // The children's acks arrive before their parent's report.
        assert_eq!(l.ack(r, a, 0, 1), Settled::Pending);
        assert_eq!(l.ack(r, b, 0, 2), Settled::Pending);
        assert_eq!(
            l.ack(r, root ^ a ^ b, 0b10, 3),
            Settled::Complete(7, TICK * 3)
        );
        assert_eq!(l.ack(r, 0, 0, 4), Settled::Stale);
        assert!(l.is_empty());
    }

    #[test]
    fn reused_slot_makes_old_ids_stale() {
        let mut l = Ledger::new(T);
        let a = l.admit(1u32, 5, 0);
        assert!(matches!(l.ack(a, 5, 0, 0), Settled::Complete(1, _)));
        let b = l.admit(2u32, 6, 0);
        assert_ne!(a, b);
        assert!(!l.is_live(a));
        assert_eq!(l.ack(a, 6, 0, 0), Settled::Stale);
        assert!(l.is_live(b));
    }

    #[test]
    fn two_ledgers_do_not_share_root_ids() {
        // A restarted server's ledger must not take an old server's ids as its own.
        let (mut a, mut b) = (Ledger::<()>::new(T), Ledger::<()>::new(T));
        let ids: Vec<RootId> = (0..4).map(|i| a.admit((), i + 1, 0)).collect();
        b.admit((), 1, 0);
        // Equal by chance once in 2^31 runs.
        assert_ne!(a.first_gen, b.first_gen);
        assert!(ids.iter().all(|r| !b.is_live(*r)));
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
        let ids: Vec<_> = (0..5u32).map(|i| l.admit(i, 9, i)).collect();
        assert_eq!(l.remove(ids[2], 3), Some((2, TICK)));
        assert_eq!(l.remove(ids[2], 3), None);
        l.ack(ids[0], 9, 0, 4);
        let mut out = vec![];
        l.expire(1000, |_, t| out.push(t));
        assert_eq!(out, vec![1, 3, 4]);
        assert!(l.is_empty());
    }

    #[test]
    fn a_lost_slot_removes_exactly_the_roots_that_touched_it() {
        let mut l = Ledger::new(T);
        let (s1, s2) = (slot_bit(0, 1), slot_bit(1, 0));
        assert_ne!(s1, s2);
        let a = l.admit(1u32, 9, 0);
        let b = l.admit(2u32, 9, 0);
        let c = l.admit(3u32, 9, 0);
        assert!(l.mark(a, s1));
        assert_eq!(l.ack(b, 4, s2, 0), Settled::Pending);
        assert_eq!(l.ack(c, 4, s1 | s2, 0), Settled::Pending);
        assert_eq!(l.slots(c), Some(s1 | s2));
        let mut lost = vec![];
        assert_eq!(l.remove_touching(s1, |_, t| lost.push(t)), 2);
        assert_eq!(lost, vec![1, 3]);
        assert!(l.is_live(b) && !l.is_live(a) && !l.is_live(c));
        assert!(!l.mark(a, s2), "a removed root takes no marks");
        // The list stays whole: b expires normally.
        assert_eq!(l.expire(u32::MAX / 4, |_, _| {}), 1);
        assert!(l.is_empty());
    }

    #[test]
    fn slot_bits_stay_put_when_a_task_grows() {
        // Instance 1 of task 2 keeps its bit whatever the instance counts.
        assert_eq!(slot_bit(2, 1), 1 << 35);
        assert_eq!(slot_bit(0, 0), 1);
        assert_eq!(slot_bit(3, 13), 1);
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

    #[test]
    fn edge_ids_do_not_repeat_and_are_never_zero() {
        let mut ids = EdgeIds::seeded(0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let id = ids.next_id();
            assert_ne!(id, 0);
            assert!(seen.insert(id));
        }
    }

    proptest::proptest! {
        /// Against a model: a tree completes exactly when the last of its
        /// reports is applied, whatever order the reports arrive in, and
        /// roots of interleaved trees do not disturb each other.
        #[test]
        fn completes_at_the_last_report_in_any_order(
            trees in proptest::collection::vec(
                (proptest::collection::vec(0u32..4, 1..20), proptest::collection::vec(0usize..1000, 60)),
                1..12,
            )
        ) {
            let mut l = Ledger::new(T);
            let mut ids = EdgeIds::seeded(42);
            // Per root: its id and its reports, in the (shuffled) order they arrive.
            let mut roots = Vec::new();
            for (i, (fanouts, order)) in trees.iter().enumerate() {
                let first = ids.next_id();
                let r = l.admit(i, first, 0);
                // Handle messages breadth-first; each handled message gives one report.
                let mut open = std::collections::VecDeque::from([first]);
                let mut reports = Vec::new();
                let mut f = fanouts.iter().cycle();
                while let Some(edge) = open.pop_front() {
                    let mut xor = edge;
                    if reports.len() < fanouts.len() {
                        for _ in 0..*f.next().unwrap_or(&0) {
                            let c = ids.next_id();
                            xor ^= c;
                            open.push_back(c);
                        }
                    }
                    reports.push(xor);
                }
                // A random permutation of the reports.
                for (j, k) in order.iter().enumerate().take(reports.len()) {
                    let n = reports.len();
                    reports.swap(j % n, k % n);
                }
                roots.push((r, i, reports));
            }
            // Interleave the roots' reports: one of each in turn.
            let mut left = roots.len();
            while left > 0 {
                left = 0;
                for (r, tag, reports) in &mut roots {
                    let Some(x) = reports.pop() else { continue };
                    let res = l.ack(*r, x, 0, 0);
                    if reports.is_empty() {
                        proptest::prop_assert_eq!(res, Settled::Complete(*tag, Duration::ZERO));
                    } else {
                        proptest::prop_assert_eq!(res, Settled::Pending);
                        left += 1;
                    }
                }
            }
            proptest::prop_assert!(l.is_empty());
        }
    }
}
