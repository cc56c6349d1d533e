//! [`Watermark`]: the low watermark of completed positions in an ordered log.
//!
//! A source that reads an ordered log (a Kafka partition, a file) hands out
//! records in order but hears back about them in any order: with many
//! workers, a later record often completes before an earlier one. What it
//! may tell the broker ("everything before here is done", a Kafka commit, a
//! checkpoint) is the **low watermark**: the first position not yet done.
//! Committing anything past it would lose the record still in flight if the
//! process died now.
//!
//! [`Watermark`] keeps the positions admitted and not yet completed, in
//! order, and the position after the last admitted one. The low watermark is
//! the oldest admitted position still in flight, or, when nothing is in
//! flight, the position after the last admitted one: exactly the "next
//! offset to read" that Kafka expects in a commit.
//!
//! Positions need not be contiguous (a compacted Kafka topic or transaction
//! markers leave gaps): the watermark moves from one admitted position to
//! the next, never through one still in flight.
//!
//! The durable file source keeps the same idea over byte ranges with its own
//! checkpoint format (done ranges past the watermark), see
//! [`crate::sources::FileSource`]; it does not use this type.
//!
//! ```
//! use tempest_core::watermark::Watermark;
//!
//! let mut w = Watermark::new(10u64);
//! for offset in [10, 11, 13] {
//!     w.admit(offset).unwrap();
//! }
//! assert_eq!(w.low(), 10);
//! w.complete(13); // out of order: 10 and 11 are still in flight
//! assert_eq!(w.low(), 10);
//! w.complete(10);
//! assert_eq!(w.low(), 11);
//! w.complete(11);
//! assert_eq!(w.low(), 14, "everything admitted is done: the next position");
//! ```

use std::collections::VecDeque;
use std::fmt;

/// A position in an ordered log: what a [`Watermark`] counts in.
pub trait Position: Copy + Ord + fmt::Debug {
    /// The position right after this one.
    fn successor(self) -> Self;
}

macro_rules! position {
    ($($t:ty),*) => {$(
        impl Position for $t {
            fn successor(self) -> Self {
                self.saturating_add(1)
            }
        }
    )*};
}
position!(u32, u64, i32, i64, u128, usize);

/// Why [`Watermark::admit`] refused a position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatermarkError<T: fmt::Debug> {
    /// The position is not after the last one admitted (or before the start):
    /// positions must be admitted in increasing order.
    #[error("position {at:?} is not after {after:?}: positions are admitted in increasing order")]
    OutOfOrder {
        /// The position refused.
        at: T,
        /// The first position that would have been accepted.
        after: T,
    },
}

/// The low watermark of one ordered log: admit positions in increasing
/// order as records are handed out, complete them in any order, and commit
/// [`Watermark::low`].
///
/// Memory is one entry per position admitted past the low watermark (done or
/// not): a record that never completes holds every later one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watermark<T> {
    /// Admitted positions from the oldest in flight on, each with whether it
    /// is done. The front, when present, is never done.
    pending: VecDeque<(T, bool)>,
    /// The position after the last admitted one (or the start).
    next: T,
    /// How many entries of `pending` are not done.
    in_flight: usize,
}

impl<T: Position> Watermark<T> {
    /// A watermark at `start`: nothing before it needs to be done (it is the
    /// committed position, or where reading starts).
    pub fn new(start: T) -> Self {
        Watermark {
            pending: VecDeque::new(),
            next: start,
            in_flight: 0,
        }
    }

    /// Records that the record at `at` was handed out. Positions must
    /// increase; a gap is fine. An error (and no change) otherwise.
    pub fn admit(&mut self, at: T) -> Result<(), WatermarkError<T>> {
        if at < self.next {
            return Err(WatermarkError::OutOfOrder {
                at,
                after: self.next,
            });
        }
        self.pending.push_back((at, false));
        self.in_flight += 1;
        self.next = at.successor();
        Ok(())
    }

    /// Records that the record at `at` is done. Returns true when it was in
    /// flight; false for a position never admitted, already completed, or
    /// already behind the watermark (a duplicate ack), which changes nothing.
    pub fn complete(&mut self, at: T) -> bool {
        let Ok(i) = self.pending.binary_search_by(|(p, _)| p.cmp(&at)) else {
            return false;
        };
        if self.pending[i].1 {
            return false;
        }
        self.pending[i].1 = true;
        self.in_flight -= 1;
        while matches!(self.pending.front(), Some((_, true))) {
            self.pending.pop_front();
        }
        true
    }

    /// The low watermark: the first position that is not done. Every
    /// admitted position before it is done; nothing at or after it is
    /// (knowingly) done unless it is in [`Watermark::done_past_low`]. This
    /// is what a Kafka consumer commits.
    pub fn low(&self) -> T {
        self.pending.front().map_or(self.next, |&(p, _)| p)
    }

    /// The position after the last admitted one: where reading goes on.
    pub fn next(&self) -> T {
        self.next
    }

    /// Positions admitted and not done.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// True when `at` was admitted and is not done.
    pub fn is_in_flight(&self, at: T) -> bool {
        self.pending
            .binary_search_by(|(p, _)| p.cmp(&at))
            .is_ok_and(|i| !self.pending[i].1)
    }

    /// Positions past the low watermark that are done, waiting for an older
    /// one: what would be handled again if the process died now.
    pub fn done_past_low(&self) -> usize {
        self.pending.len() - self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn starts_at_its_start_and_follows_in_order_completion() {
        let mut w = Watermark::new(5i64);
        assert_eq!((w.low(), w.next(), w.in_flight()), (5, 5, 0));
        w.admit(5).unwrap();
        w.admit(6).unwrap();
        assert_eq!((w.low(), w.next(), w.in_flight()), (5, 7, 2));
        assert!(w.complete(5));
        assert_eq!(w.low(), 6);
        assert!(w.complete(6));
        assert_eq!((w.low(), w.in_flight(), w.done_past_low()), (7, 0, 0));
    }

    #[test]
    fn out_of_order_completion_holds_the_watermark_at_the_oldest_in_flight() {
        let mut w = Watermark::new(0u64);
        for i in 0..5 {
            w.admit(i).unwrap();
        }
        assert!(w.complete(3));
        assert!(w.complete(1));
        assert_eq!(w.low(), 0);
        assert_eq!(w.done_past_low(), 2);
        assert!(w.is_in_flight(0) && !w.is_in_flight(1) && w.is_in_flight(2));
        assert!(w.complete(0));
        assert_eq!(w.low(), 2, "1 was done: the watermark passes it");
        assert!(w.complete(2));
        assert_eq!(w.low(), 4);
        assert!(w.complete(4));
        assert_eq!(w.low(), 5);
    }

    #[test]
    fn gaps_are_skipped() {
        let mut w = Watermark::new(0u64);
        w.admit(2).unwrap();
        w.admit(7).unwrap();
        assert_eq!(w.low(), 2);
        w.complete(2);
        assert_eq!(w.low(), 7, "never past 7, which is in flight");
        w.complete(7);
        assert_eq!(w.low(), 8);
    }

    #[test]
    fn duplicates_and_strangers_change_nothing() {
        let mut w = Watermark::new(0u64);
        w.admit(0).unwrap();
        w.admit(1).unwrap();
        assert!(!w.complete(9), "never admitted");
        assert!(w.complete(1));
        assert!(!w.complete(1), "already done");
        assert!(w.complete(0));
        assert!(!w.complete(0), "behind the watermark");
        assert_eq!((w.low(), w.in_flight()), (2, 0));
    }

    #[test]
    fn admitting_backwards_is_refused() {
        let mut w = Watermark::new(10u64);
        assert_eq!(
            w.admit(9),
            Err(WatermarkError::OutOfOrder { at: 9, after: 10 })
        );
        w.admit(12).unwrap();
        assert_eq!(
            w.admit(12),
            Err(WatermarkError::OutOfOrder { at: 12, after: 13 })
        );
        assert_eq!((w.low(), w.in_flight()), (12, 1));
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Admit the next position after a gap of this size.
        Admit(u8),
        /// Complete the in-flight position with this index (modulo).
        Complete(usize),
        /// Complete an arbitrary position (a stray or duplicate ack).
        Stray(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..4).prop_map(Op::Admit),
            3 => any::<usize>().prop_map(Op::Complete),
            1 => (0u16..600).prop_map(Op::Stray),
        ]
    }

    proptest! {
        /// Whatever the order of acks, the committed position never passes
        /// an admitted position that is not done, it never goes back, and
        /// every admitted position before it is done.
        #[test]
        fn the_watermark_never_passes_a_record_in_flight(
            start in 0u64..100,
            ops in proptest::collection::vec(op(), 0..400),
        ) {
            let mut w = Watermark::new(start);
            let mut admitted = BTreeSet::new();
            let mut in_flight = BTreeSet::new();
            let mut next = start;
            let mut last_low = w.low();
            for op in ops {
                match op {
                    Op::Admit(gap) => {
                        let at = next + u64::from(gap);
                        w.admit(at).unwrap();
                        admitted.insert(at);
                        in_flight.insert(at);
                        next = at + 1;
                    }
                    Op::Complete(i) => {
                        if !in_flight.is_empty() {
                            let at = *in_flight.iter().nth(i % in_flight.len()).unwrap();
                            prop_assert!(w.complete(at));
                            in_flight.remove(&at);
                        }
                    }
                    Op::Stray(at) => {
                        let at = u64::from(at);
                        let was = in_flight.remove(&at);
                        prop_assert_eq!(w.complete(at), was);
                    }
                }
                let low = w.low();
                // Never past a record in flight.
                if let Some(&oldest) = in_flight.iter().next() {
                    prop_assert!(low <= oldest, "low {} passed {} in flight", low, oldest);
                    // And as far as it may go: up to the oldest in flight.
                    prop_assert_eq!(low, oldest);
                } else {
                    prop_assert_eq!(low, next);
                }
                // Everything admitted before it is done.
                prop_assert!(admitted.range(..low).all(|p| !in_flight.contains(p)));
                prop_assert!(low >= last_low, "the watermark went back");
                last_low = low;
                prop_assert_eq!(w.in_flight(), in_flight.len());
            }
        }
    }
}
