//! Placement: which agent runs a process. The policy sits behind
//! [`Scheduler`] so that another one (by resources, by rack, an embedded
//! runner for tests) can replace it without touching the director.
//!
//! A scheduler only chooses; the director decides when something must be
//! (re)placed and hands out the generation that fences the old incarnation.

/// A live agent and how loaded it is.
#[derive(Clone, Debug)]
pub struct AgentLoad {
    /// The agent's id.
    pub id: String,
    /// Processes placed on it.
    pub processes: usize,
}

/// Chooses agents for processes.
pub trait Scheduler: Send + Sync {
    /// The agent among `agents` (never empty) that should run `process`.
    fn choose(&self, process: &str, agents: &[AgentLoad]) -> usize;
}

/// Spreads by load: the agent with the fewest processes, ties broken by id
/// so placement is deterministic.
#[derive(Debug, Default)]
pub struct LeastLoaded;

impl Scheduler for LeastLoaded {
    fn choose(&self, _process: &str, agents: &[AgentLoad]) -> usize {
        agents
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| a.processes.cmp(&b.processes).then(a.id.cmp(&b.id)))
            .map(|(i, _)| i)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_least_loaded_agent() {
        let agents = vec![
            AgentLoad {
                id: "b".into(),
                processes: 2,
            },
            AgentLoad {
                id: "a".into(),
                processes: 3,
            },
            AgentLoad {
                id: "c".into(),
                processes: 2,
            },
        ];
        assert_eq!(LeastLoaded.choose("x", &agents), 0);
    }
}
