//! [`Pipeline`]: the DAG of tasks, and [`Dag`], its validated form.
//!
//! A pipeline is built by name (tasks, then edges between them) and checked
//! once by [`Pipeline::validate`], which reports every problem at once and
//! never panics. The runtimes only ever see a [`Dag`]: tasks by index, each
//! with its outgoing edges and groupings resolved.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::source::DEFAULT_SOURCE;
use crate::task::{Task, TaskFactory};

/// How an edge spreads messages over the instances of its target task.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// Any instance may take the message (load balancing).
    #[default]
    Shuffle,
    /// Messages with equal keys reach the same instance. A message without a
    /// key is treated as having the empty key.
    Key,
    /// Every instance gets a copy (broadcast).
    All,
}

impl fmt::Display for Grouping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Grouping::Shuffle => "shuffle",
            Grouping::Key => "key",
            Grouping::All => "all",
        })
    }
}

/// The most instances a task may run: key grouping and leases index
/// instances with `u32`, and nothing sensible needs more.
pub const MAX_WORKERS: u32 = 1024;

struct TaskSpec {
    name: String,
    workers: u32,
    factory: TaskFactory,
}

struct EdgeSpec {
    from: String,
    to: String,
    grouping: Grouping,
}

/// A DAG of tasks under construction.
///
/// The first task added is the root, the one that receives messages from the
/// source, unless [`Pipeline::root`] names another. A topology with several
/// sources says which tasks each feeds with [`Pipeline::edge_from_source`]
/// instead; every task a source feeds is then an entry of the DAG.
///
/// ```
/// use tempest_core::{Grouping, Msg, Pipeline, TaskResult};
///
/// fn split(msg: Msg) -> TaskResult {
///     let words = msg.payload_str().unwrap_or_default().split(' ')
///         .map(|w| Msg::keyed_by_payload(w.to_owned())).collect();
///     Ok(Some(words))
/// }
///
/// let dag = Pipeline::new()
///     .task("split", || split)
///     .task_with_workers("count", 2, || |_m: Msg| -> TaskResult { Ok(None) })
///     .edge_grouped("split", "count", Grouping::Key)
///     .validate()
///     .unwrap();
/// assert_eq!(dag.task_count(), 2);
/// assert_eq!(dag.task(dag.root()).name, "split");
/// ```
#[derive(Default)]
pub struct Pipeline {
    tasks: Vec<TaskSpec>,
    edges: Vec<EdgeSpec>,
    source_edges: Vec<(String, String)>,
    root: Option<String>,
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a task with one instance. `factory` makes each instance.
    pub fn task<T, F>(self, name: impl Into<String>, factory: F) -> Self
    where
        T: Task,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.task_with_workers(name, 1, factory)
    }

    /// Adds a task with `workers` instances.
    pub fn task_with_workers<T, F>(
        mut self,
        name: impl Into<String>,
        workers: u32,
        factory: F,
    ) -> Self
    where
        T: Task,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.tasks.push(TaskSpec {
            name: name.into(),
            workers,
            factory: Arc::new(move || Box::new(factory()) as Box<dyn Task>),
        });
        self
    }

    /// Adds a shuffle-grouped edge.
    pub fn edge(self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.edge_grouped(from, to, Grouping::Shuffle)
    }

    /// Adds an edge with a grouping.
    pub fn edge_grouped(
        mut self,
        from: impl Into<String>,
        to: impl Into<String>,
        grouping: Grouping,
    ) -> Self {
        self.edges.push(EdgeSpec {
            from: from.into(),
            to: to.into(),
            grouping,
        });
        self
    }

    /// Names the root task (by default the first task added): the task the
    /// topology's one source feeds. (With several sources, use
    /// [`Pipeline::edge_from_source`].)
    pub fn root(mut self, name: impl Into<String>) -> Self {
        self.root = Some(name.into());
        self
    }

    /// Feeds the roots polled from the source called `source` to `task`
    /// (Storm's spout → bolt edge). A source may feed several tasks (each
    /// gets every root, as one tree), and several sources may feed one task.
    /// Once a pipeline has such edges, every source of the topology needs
    /// one, and the tasks they feed take no other input.
    ///
    /// ```
    /// use tempest_core::{Msg, Pipeline, TaskResult};
    ///
    /// let noop = || |_m: Msg| -> TaskResult { Ok(None) };
    /// let dag = Pipeline::new()
    ///     .task("orders", noop)
    ///     .task("payments", noop)
    ///     .edge_from_source("orders", "orders")
    ///     .edge_from_source("payments", "payments")
    ///     .validate()
    ///     .unwrap();
    /// assert_eq!(dag.sources().len(), 2);
    /// assert_eq!(dag.sources()[1].name, "payments");
    /// ```
    pub fn edge_from_source(mut self, source: impl Into<String>, task: impl Into<String>) -> Self {
        self.source_edges.push((source.into(), task.into()));
        self
    }

    /// Sets the instance count of a task already added; used for overrides
    /// from `Topology.toml`. Returns false when there is no such task.
    pub fn set_workers(&mut self, name: &str, workers: u32) -> bool {
        match self.tasks.iter_mut().find(|t| t.name == name) {
            Some(t) => {
                t.workers = workers;
                true
            }
            None => false,
        }
    }

    /// The task names, in the order they were added.
    pub fn task_names(&self) -> impl Iterator<Item = &str> {
        self.tasks.iter().map(|t| t.name.as_str())
    }

    /// Checks the pipeline and compiles it, reporting every problem found.
    pub fn validate(&self) -> Result<Dag, PipelineErrors> {
        let mut errors = Vec::new();
        if self.tasks.is_empty() {
            return Err(PipelineErrors(vec![PipelineError::Empty]));
        }

        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if t.name.is_empty() {
                errors.push(PipelineError::EmptyName);
            }
            if index.insert(t.name.as_str(), i).is_some() {
                errors.push(PipelineError::DuplicateTask(t.name.clone()));
            }
            if t.workers == 0 || t.workers > MAX_WORKERS {
                errors.push(PipelineError::BadWorkers {
                    task: t.name.clone(),
                    workers: t.workers,
                });
            }
        }

        // The sources and the tasks they feed (the entries).
        let mut sources: Vec<DagSource> = Vec::new();
        if self.source_edges.is_empty() {
            let root = match &self.root {
                Some(r) => match index.get(r.as_str()) {
                    Some(&i) => Some(i),
                    None => {
                        errors.push(PipelineError::UnknownRoot(r.clone()));
                        None
                    }
                },
                None => Some(0),
            };
            if let Some(root) = root {
                sources.push(DagSource {
                    name: DEFAULT_SOURCE.to_owned(),
                    feeds: vec![TaskIdx(root as u16)],
                });
            }
        } else {
            if let Some(r) = &self.root {
                errors.push(PipelineError::RootWithSourceEdges(r.clone()));
            }
            for (source, task) in &self.source_edges {
                if !valid_source_name(source) {
                    errors.push(PipelineError::BadSourceName(source.clone()));
                }
                let Some(&t) = index.get(task.as_str()) else {
                    errors.push(PipelineError::UnknownTask {
                        edge: format!("source {source} -> {task}"),
                        task: task.clone(),
                    });
                    continue;
                };
                let t = TaskIdx(t as u16);
                match sources.iter_mut().find(|s| &s.name == source) {
                    Some(s) if s.feeds.contains(&t) => {
                        errors.push(PipelineError::DuplicateEdge {
                            from: format!("source {source}"),
                            to: task.clone(),
                        });
                    }
                    Some(s) => s.feeds.push(t),
                    None => sources.push(DagSource {
                        name: source.clone(),
                        feeds: vec![t],
                    }),
                }
            }
        }
        let mut entries: Vec<usize> = Vec::new();
        for s in &sources {
            for t in &s.feeds {
                if !entries.contains(&t.get()) {
                    entries.push(t.get());
                }
            }
        }

        let mut out: Vec<Vec<Edge>> = vec![Vec::new(); self.tasks.len()];
        let mut seen_edges = HashSet::new();
        for e in &self.edges {
            let from = index.get(e.from.as_str()).copied();
            let to = index.get(e.to.as_str()).copied();
            for (end, name) in [(from, &e.from), (to, &e.to)] {
                if end.is_none() {
                    errors.push(PipelineError::UnknownTask {
                        edge: format!("{} -> {}", e.from, e.to),
                        task: name.clone(),
                    });
                }
            }
            if let (Some(f), Some(t)) = (from, to) {
                if !seen_edges.insert((f, t)) {
                    errors.push(PipelineError::DuplicateEdge {
                        from: e.from.clone(),
                        to: e.to.clone(),
                    });
                    continue;
                }
                if entries.contains(&t) {
                    errors.push(PipelineError::EdgeIntoRoot {
                        from: e.from.clone(),
                        to: e.to.clone(),
                    });
                }
                out[f].push(Edge {
                    to: TaskIdx(t as u16),
                    grouping: e.grouping,
                });
            }
        }

        if let Some(cycle) = find_cycle(&out) {
            errors.push(PipelineError::Cycle(
                cycle
                    .into_iter()
                    .map(|i| self.tasks[i].name.clone())
                    .collect(),
            ));
        }

        if !entries.is_empty() {
            let mut reached = vec![false; self.tasks.len()];
            let mut queue = VecDeque::from(entries.clone());
            for &e in &entries {
                reached[e] = true;
            }
            while let Some(i) = queue.pop_front() {
                for e in &out[i] {
                    let t = e.to.0 as usize;
                    if !reached[t] {
                        reached[t] = true;
                        queue.push_back(t);
                    }
                }
            }
            for (i, r) in reached.iter().enumerate() {
                if !r {
                    errors.push(PipelineError::Unreachable(self.tasks[i].name.clone()));
                }
            }
        }

        if self.tasks.len() > usize::from(u16::MAX) {
            errors.push(PipelineError::TooManyTasks(self.tasks.len()));
        }

        match (errors.is_empty(), entries.first()) {
            (true, Some(&root)) => {
                let mut keyed_input = vec![false; self.tasks.len()];
                for edges in &out {
                    for e in edges {
                        if e.grouping != Grouping::Shuffle {
                            keyed_input[e.to.0 as usize] = true;
                        }
                    }
                }
                let tasks = self
                    .tasks
                    .iter()
                    .zip(out)
                    .zip(keyed_input)
                    .map(|((t, edges), routed)| DagTask {
                        name: t.name.clone(),
                        workers: t.workers,
                        factory: t.factory.clone(),
                        edges,
                        routed_input: routed,
                    })
                    .collect();
                Ok(Dag {
                    tasks,
                    root: TaskIdx(root as u16),
                    entries: entries.into_iter().map(|e| TaskIdx(e as u16)).collect(),
                    sources,
                })
            }
            _ => Err(PipelineErrors(errors)),
        }
    }
}

/// Returns the tasks on one cycle, if the graph has any.
fn find_cycle(out: &[Vec<Edge>]) -> Option<Vec<usize>> {
    #[derive(Copy, Clone, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; out.len()];
    for start in 0..out.len() {
        if mark[start] != Mark::New {
            continue;
        }
        // Iterative DFS: (node, next edge to look at); `path` mirrors the stack.
        let mut stack = vec![(start, 0usize)];
        mark[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(e) = out[node].get(*next) {
                *next += 1;
                let t = e.to.0 as usize;
                match mark[t] {
                    Mark::New => {
                        mark[t] = Mark::Open;
                        stack.push((t, 0));
                    }
                    Mark::Open => {
                        let from = stack.iter().position(|&(n, _)| n == t).unwrap_or(0);
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|&(n, _)| n).collect();
                        cycle.push(t);
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

/// A task's position in a [`Dag`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskIdx(pub u16);

impl TaskIdx {
    /// The index as a `usize`.
    pub fn get(self) -> usize {
        usize::from(self.0)
    }
}

/// An outgoing edge of a task.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    /// The downstream task.
    pub to: TaskIdx,
    /// How messages spread over its instances.
    pub grouping: Grouping,
}

/// One task of a validated DAG.
pub struct DagTask {
    /// The task's name.
    pub name: String,
    /// How many instances run.
    pub workers: u32,
    /// Makes an instance.
    pub factory: TaskFactory,
    /// Outgoing edges.
    pub edges: Vec<Edge>,
    /// True when some incoming edge is key- or all-grouped, so messages may
    /// be addressed to one instance.
    pub routed_input: bool,
}

impl DagTask {
    /// How many copies of one output message this task's edges make: one per
    /// shuffle or key edge, one per instance for an all-grouped edge.
    pub fn fan_out(&self, dag: &Dag) -> u32 {
        self.edges
            .iter()
            .map(|e| match e.grouping {
                Grouping::All => dag.task(e.to).workers,
                _ => 1,
            })
            .sum()
    }
}

impl fmt::Debug for DagTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DagTask")
            .field("name", &self.name)
            .field("workers", &self.workers)
            .field("edges", &self.edges)
            .finish()
    }
}

/// True for a name a source may have: letters, digits, `_` and `-` (it is a
/// metric label value and a `Topology.toml` key).
pub fn valid_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One source of a validated pipeline and the tasks it feeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DagSource {
    /// The source's name ([`DEFAULT_SOURCE`] for a pipeline without
    /// [`Pipeline::edge_from_source`]).
    pub name: String,
    /// The tasks every root of this source is delivered to.
    pub feeds: Vec<TaskIdx>,
}

/// A validated pipeline.
#[derive(Debug)]
pub struct Dag {
    tasks: Vec<DagTask>,
    root: TaskIdx,
    entries: Vec<TaskIdx>,
    sources: Vec<DagSource>,
}

impl Dag {
    /// The root task: the first task a source feeds (with one source and no
    /// [`Pipeline::edge_from_source`], the only one).
    pub fn root(&self) -> TaskIdx {
        self.root
    }

    /// Every task a source feeds, each once.
    pub fn entries(&self) -> &[TaskIdx] {
        &self.entries
    }

    /// The sources, in the order their first edge was added, by index (the
    /// index a runtime keeps for each root).
    pub fn sources(&self) -> &[DagSource] {
        &self.sources
    }

    /// A task by index.
    pub fn task(&self, idx: TaskIdx) -> &DagTask {
        &self.tasks[idx.get()]
    }

    /// A task's index by name.
    pub fn find(&self, name: &str) -> Option<TaskIdx> {
        self.tasks
            .iter()
            .position(|t| t.name == name)
            .map(|i| TaskIdx(i as u16))
    }

    /// All tasks with their indices.
    pub fn tasks(&self) -> impl Iterator<Item = (TaskIdx, &DagTask)> {
        self.tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (TaskIdx(i as u16), t))
    }

    /// The number of tasks.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }
}

/// One problem with a pipeline.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// No tasks at all.
    #[error("the pipeline has no tasks")]
    Empty,
    /// A task with an empty name.
    #[error("a task has an empty name")]
    EmptyName,
    /// Two tasks with one name.
    #[error("task `{0}` is defined more than once")]
    DuplicateTask(String),
    /// An edge names a task that does not exist.
    #[error("edge `{edge}` names unknown task `{task}`")]
    UnknownTask {
        /// The edge, as `from -> to`.
        edge: String,
        /// The missing task.
        task: String,
    },
    /// The root names a task that does not exist.
    #[error("the root names unknown task `{0}`")]
    UnknownRoot(String),
    /// The same edge twice.
    #[error("edge `{from} -> {to}` is defined more than once")]
    DuplicateEdge {
        /// Upstream task.
        from: String,
        /// Downstream task.
        to: String,
    },
    /// An edge into a task a source feeds (it only takes source messages).
    #[error("edge from `{from}` leads into `{to}`, which a source feeds; a task fed by a source only receives source messages")]
    EdgeIntoRoot {
        /// Upstream task.
        from: String,
        /// The task a source feeds.
        to: String,
    },
    /// [`Pipeline::root`] and [`Pipeline::edge_from_source`] together.
    #[error("the root is named (`{0}`) and sources have edges: with edge_from_source, the sources say which tasks they feed; drop root()")]
    RootWithSourceEdges(String),
    /// A source name that cannot be a label or a `Topology.toml` key.
    #[error("source name `{0}` is not valid: use 1 to 64 letters, digits, `_` or `-`")]
    BadSourceName(String),
    /// The tasks on a cycle, first repeated at the end.
    #[error("the pipeline has a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A task that no path from the root reaches.
    #[error("task `{0}` is not reachable from the root")]
    Unreachable(String),
    /// A worker count out of range.
    #[error("task `{task}` has {workers} workers; it needs 1 to {max}", max = MAX_WORKERS)]
    BadWorkers {
        /// The task.
        task: String,
        /// The count given.
        workers: u32,
    },
    /// More tasks than an index can hold.
    #[error("the pipeline has {0} tasks; at most 65535 are supported")]
    TooManyTasks(usize),
}

/// Every problem found in a pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineErrors(pub Vec<PipelineError>);

impl fmt::Display for PipelineErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid pipeline ({} problem(s))", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineErrors {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Msg, TaskResult};

    fn noop(_: Msg) -> TaskResult {
        Ok(None)
    }

    fn errors(p: Pipeline) -> Vec<PipelineError> {
        match p.validate() {
            Ok(_) => Vec::new(),
            Err(PipelineErrors(e)) => e,
        }
    }

    #[test]
    fn empty_pipeline() {
        assert_eq!(errors(Pipeline::new()), vec![PipelineError::Empty]);
    }

    #[test]
    fn duplicate_and_unknown_names_are_all_reported() {
        let e = errors(
            Pipeline::new()
                .task("a", || noop)
                .task("a", || noop)
                .task("b", || noop)
                .edge("a", "b")
                .edge("a", "nope")
                .edge("ghost", "b"),
        );
        assert!(
            e.contains(&PipelineError::DuplicateTask("a".into())),
            "{e:?}"
        );
        assert!(e.contains(&PipelineError::UnknownTask {
            edge: "a -> nope".into(),
            task: "nope".into()
        }));
        assert!(e.contains(&PipelineError::UnknownTask {
            edge: "ghost -> b".into(),
            task: "ghost".into()
        }));
    }

    #[test]
    fn cycles_are_named() {
        let e = errors(
            Pipeline::new()
                .task("a", || noop)
                .task("b", || noop)
                .task("c", || noop)
                .edge("a", "b")
                .edge("b", "c")
                .edge("c", "b"),
        );
        assert_eq!(
            e,
            vec![PipelineError::Cycle(vec![
                "b".into(),
                "c".into(),
                "b".into()
            ])]
        );
        let e = errors(
            Pipeline::new()
                .task("a", || noop)
                .task("b", || noop)
                .edge("a", "b")
                .edge("b", "b"),
        );
        assert_eq!(e, vec![PipelineError::Cycle(vec!["b".into(), "b".into()])]);
    }

    #[test]
    fn unreachable_tasks_and_edges_into_the_root() {
        let e = errors(
            Pipeline::new()
                .task("a", || noop)
                .task("b", || noop)
                .task("island", || noop)
                .edge("a", "b")
                .edge("b", "a"),
        );
        assert!(
            e.contains(&PipelineError::Unreachable("island".into())),
            "{e:?}"
        );
        assert!(
            e.contains(&PipelineError::EdgeIntoRoot {
                from: "b".into(),
                to: "a".into()
            }),
            "{e:?}"
        );
    }

    #[test]
    fn sources_feed_their_entries() {
        let dag = Pipeline::new()
            .task("parse", || noop)
            .task("audit", || noop)
            .task("join", || noop)
            .edge("parse", "join")
            .edge("audit", "join")
            .edge_from_source("orders", "parse")
            .edge_from_source("orders", "audit")
            .edge_from_source("refunds", "parse")
            .validate()
            .unwrap();
        let (parse, audit) = (dag.find("parse").unwrap(), dag.find("audit").unwrap());
        assert_eq!(
            dag.sources(),
            [
                DagSource {
                    name: "orders".into(),
                    feeds: vec![parse, audit]
                },
                DagSource {
                    name: "refunds".into(),
                    feeds: vec![parse]
                }
            ]
        );
        assert_eq!(dag.entries(), [parse, audit]);
        assert_eq!(dag.root(), parse);

        // Without source edges: one source, `default`, feeding the root.
        let dag = Pipeline::new().task("a", || noop).validate().unwrap();
        assert_eq!(dag.sources().len(), 1);
        assert_eq!(dag.sources()[0].name, DEFAULT_SOURCE);
        assert_eq!(dag.sources()[0].feeds, [dag.root()]);
    }

    #[test]
    fn bad_source_edges_are_named() {
        let e = errors(
            Pipeline::new()
                .task("a", || noop)
                .task("b", || noop)
                .edge("a", "b")
                .root("a")
                .edge_from_source("orders", "a")
                .edge_from_source("orders", "a")
                .edge_from_source("orders", "zzz")
                .edge_from_source("bad name", "a")
                .edge_from_source("late", "b"),
        );
        for want in [
            PipelineError::RootWithSourceEdges("a".into()),
            PipelineError::DuplicateEdge {
                from: "source orders".into(),
                to: "a".into(),
            },
            PipelineError::UnknownTask {
                edge: "source orders -> zzz".into(),
                task: "zzz".into(),
            },
            PipelineError::BadSourceName("bad name".into()),
            PipelineError::EdgeIntoRoot {
                from: "a".into(),
                to: "b".into(),
            },
        ] {
            assert!(e.contains(&want), "{want:?} not in {e:?}");
        }
        // A task no source reaches.
        let e = errors(
            Pipeline::new()
                .task("a", || noop)
                .task("b", || noop)
                .edge_from_source("orders", "a"),
        );
        assert_eq!(e, [PipelineError::Unreachable("b".into())]);
    }

    #[test]
    fn bad_worker_counts_and_root() {
        let e = errors(
            Pipeline::new()
                .task_with_workers("a", 0, || noop)
                .root("zzz"),
        );
        assert!(
            e.contains(&PipelineError::BadWorkers {
                task: "a".into(),
                workers: 0
            }),
            "{e:?}"
        );
        assert!(
            e.contains(&PipelineError::UnknownRoot("zzz".into())),
            "{e:?}"
        );
        let e = errors(Pipeline::new().task_with_workers("a", MAX_WORKERS + 1, || noop));
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn diamond_compiles_with_fan_out() {
        let dag = Pipeline::new()
            .task("a", || noop)
            .task("b", || noop)
            .task_with_workers("c", 3, || noop)
            .task("d", || noop)
            .edge("a", "b")
            .edge_grouped("a", "c", Grouping::All)
            .edge("b", "d")
            .edge_grouped("c", "d", Grouping::Key)
            .validate()
            .unwrap();
        let a = dag.find("a").unwrap();
        // One copy to b, one per instance of c.
        assert_eq!(dag.task(a).fan_out(&dag), 4);
        assert!(dag.task(dag.find("c").unwrap()).routed_input);
        assert!(!dag.task(dag.find("b").unwrap()).routed_input);
        assert_eq!(dag.task(dag.find("d").unwrap()).fan_out(&dag), 0);
    }

    #[test]
    fn errors_display_every_problem() {
        let err = Pipeline::new()
            .task("a", || noop)
            .task("a", || noop)
            .edge("a", "x")
            .validate()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("3 problem(s)")
                && text.contains("`a` is defined more than once")
                && text.contains("`x`"),
            "{text}"
        );
    }

    proptest::proptest! {
        /// Any set of names and edges validates or errors; it never panics.
        #[test]
        fn validate_never_panics(tasks in proptest::collection::vec(0u8..6, 0..6),
                                 edges in proptest::collection::vec((0u8..7, 0u8..7, 0u8..3), 0..12)) {
            let mut p = Pipeline::new();
            for t in tasks {
                p = p.task(format!("t{t}"), || noop);
            }
            for (a, b, g) in edges {
                let g = [Grouping::Shuffle, Grouping::Key, Grouping::All][g as usize];
                p = p.edge_grouped(format!("t{a}"), format!("t{b}"), g);
            }
            let _ = p.validate();
        }
    }
}
