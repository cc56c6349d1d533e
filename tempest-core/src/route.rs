//! Routing: which instance of which task each emitted message goes to.
//!
//! One rule for every runtime. The standalone hub places messages in
//! in-process queues and a worker's outbox places them on peer links, but
//! both call [`route`], so a grouping means the same everywhere:
//!
//! - **shuffle**: any instance ([`Target::Any`]); the caller picks by load;
//! - **key**: the instance [`key_instance`] names for the message's key, so
//!   equal keys meet whichever upstream instance emitted them;
//! - **all**: a copy for every instance, each with its own edge id.
//!
//! Every message placed gets a fresh [`EdgeId`]; `route` returns their XOR,
//! which the caller folds into the ack report of the message handled.

use crate::ledger::{EdgeId, EdgeIds, RootId};
use crate::msg::key_instance;
use crate::pipeline::{Dag, Grouping, TaskIdx};
use crate::work::Delivery;
use crate::Msg;

/// Which instance of a task a message must reach.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Any instance: the caller picks (by load).
    Any,
    /// This instance.
    Instance(u32),
}

/// Routes `out`, what task `from` emitted while handling a message of
/// `root`, along `from`'s edges in `dag`. `instances` gives each task's
/// current instance count (the DAG's, or a topology server's layout);
/// `place` receives each delivery with its task and target. Returns the XOR
/// of the edge ids made. A task with no edges routes nothing and returns 0.
pub fn route(
    dag: &Dag,
    from: TaskIdx,
    root: RootId,
    out: Vec<Msg>,
    ids: &mut EdgeIds,
    instances: impl Fn(TaskIdx) -> u32,
    mut place: impl FnMut(TaskIdx, Target, Delivery),
) -> EdgeId {
    let edges = &dag.task(from).edges;
    let mut xor = 0;
    let Some(last) = edges.len().checked_sub(1) else {
        return 0;
    };
    let mut out = Some(out);
    for (n, e) in edges.iter().enumerate() {
        // The last edge takes the messages; earlier ones clone (cheap: Bytes).
        let msgs = if n == last {
            out.take().unwrap_or_default()
        } else {
            out.clone().unwrap_or_default()
        };
        let workers = instances(e.to).max(1);
        for msg in msgs {
            match e.grouping {
                Grouping::Shuffle => {
                    let edge = ids.next_id();
                    xor ^= edge;
                    place(e.to, Target::Any, Delivery { root, edge, msg });
                }
                Grouping::Key => {
                    let key = msg.key().map_or(&[][..], |k| &k[..]);
                    let i = key_instance(key, workers);
                    let edge = ids.next_id();
                    xor ^= edge;
                    place(e.to, Target::Instance(i), Delivery { root, edge, msg });
                }
                Grouping::All => {
                    for i in 0..workers {
                        let edge = ids.next_id();
                        xor ^= edge;
                        let msg = msg.clone();
                        place(e.to, Target::Instance(i), Delivery { root, edge, msg });
                    }
                }
            }
        }
    }
    xor
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Pipeline, TaskResult};

    fn noop() -> impl Fn() -> fn(Msg) -> TaskResult {
        || |_m: Msg| -> TaskResult { Ok(None) }
    }

    #[test]
    fn groupings_and_the_xor_of_what_was_placed() {
        let dag = Pipeline::new()
            .task("a", noop())
            .task_with_workers("s", 2, noop())
            .task_with_workers("k", 3, noop())
            .task_with_workers("all", 2, noop())
            .edge("a", "s")
            .edge_grouped("a", "k", Grouping::Key)
            .edge_grouped("a", "all", Grouping::All)
            .validate()
            .unwrap();
        let (s, k, all) = (
            dag.find("s").unwrap(),
            dag.find("k").unwrap(),
            dag.find("all").unwrap(),
        );
        let mut placed = Vec::new();
        let out = vec![
            Msg::new("x").with_key("cow"),
            Msg::new("y").with_key("moon"),
        ];
        let xor = route(
            &dag,
            dag.root(),
            RootId(7),
            out,
            &mut EdgeIds::seeded(1),
            |t| dag.task(t).workers,
            |t, target, d| placed.push((t, target, d)),
        );
        // 2 shuffled + 2 keyed + 2 x 2 copies.
        assert_eq!(placed.len(), 8);
        assert_eq!(xor, placed.iter().fold(0, |x, (_, _, d)| x ^ d.edge));
        let mut edges: Vec<_> = placed.iter().map(|p| p.2.edge).collect();
        edges.sort_unstable();
        edges.dedup();
        assert_eq!(edges.len(), 8, "every copy has its own id");
        assert!(placed.iter().all(|p| p.2.root == RootId(7)));
        let to = |t: TaskIdx| -> Vec<Target> {
            placed.iter().filter(|p| p.0 == t).map(|p| p.1).collect()
        };
        assert_eq!(to(s), [Target::Any, Target::Any]);
        assert_eq!(
            to(k),
            [
                Target::Instance(key_instance(b"cow", 3)),
                Target::Instance(key_instance(b"moon", 3))
            ]
        );
        assert_eq!(
            to(all),
            [
                Target::Instance(0),
                Target::Instance(1),
                Target::Instance(0),
                Target::Instance(1)
            ]
        );
    }

    #[test]
    fn key_routing_follows_the_instance_count_given() {
        let dag = Pipeline::new()
            .task("a", noop())
            .task_with_workers("k", 2, noop())
            .edge_grouped("a", "k", Grouping::Key)
            .validate()
            .unwrap();
        let mut got = Vec::new();
        route(
            &dag,
            dag.root(),
            RootId(1),
            vec![Msg::keyed_by_payload("word-17")],
            &mut EdgeIds::seeded(3),
            |_| 5,
            |_, target, _| got.push(target),
        );
        assert_eq!(got, [Target::Instance(key_instance(b"word-17", 5))]);
        let sink = dag.find("k").unwrap();
        let x = route(
            &dag,
            sink,
            RootId(1),
            vec![Msg::new("z")],
            &mut EdgeIds::seeded(3),
            |_| 2,
            |_, _, _| panic!("a sink routes nothing"),
        );
        assert_eq!(x, 0);
    }
}
