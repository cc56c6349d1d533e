//! A topology's lifecycle, as a typed state machine (after Arroyo's job
//! state machine).
//!
//! The desired state of a deployed topology is [`Lifecycle`]; every command
//! an operator gives is a [`Command`], and [`Lifecycle::next`] is the only
//! place that says which command is allowed in which state and what it
//! leads to. Handlers apply the [`Transition`] it returns as a whole (state,
//! generation and placements in one database transaction), so no handler can
//! leave a deployment half done. What the processes actually do is reported
//! by the agents and summed up as a [`Phase`].

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

/// What the operator wants of a topology.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Its processes should run.
    Running,
    /// Its processes should not run; it stays deployed.
    Stopped,
}

/// What an operator asks of a topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run a stopped topology.
    Start,
    /// Stop its processes (gracefully), keeping it deployed.
    Stop,
    /// Stop its processes and forget it.
    Kill,
    /// Change worker counts.
    Rebalance(BTreeMap<String, u32>),
}

/// What a command does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Move to this state, with a new generation.
    To(Lifecycle),
    /// Keep running with these worker counts, with a new generation.
    Rebalance(BTreeMap<String, u32>),
    /// Remove the topology and its placements.
    Remove,
}

/// A command not allowed in the current state.
#[derive(Debug, thiserror::Error)]
#[error("cannot {command} a topology that is {state}")]
pub struct Conflict {
    command: &'static str,
    state: &'static str,
}

impl Lifecycle {
    /// The transition `command` causes, or why it is refused.
    pub fn next(self, command: Command) -> Result<Transition, Conflict> {
        use Lifecycle::*;
        match (self, command) {
            (Stopped, Command::Start) => Ok(Transition::To(Running)),
            (Running, Command::Stop) => Ok(Transition::To(Stopped)),
            (_, Command::Kill) => Ok(Transition::Remove),
            // Rebalancing a stopped topology changes what it starts with.
            (_, Command::Rebalance(w)) => Ok(Transition::Rebalance(w)),
            (state, command) => Err(Conflict {
                command: match command {
                    Command::Start => "start",
                    Command::Stop => "stop",
                    Command::Kill => "kill",
                    Command::Rebalance(_) => "rebalance",
                },
                state: state.as_db(),
            }),
        }
    }

    /// The name stored in the database.
    pub fn as_db(self) -> &'static str {
        match self {
            Lifecycle::Running => "running",
            Lifecycle::Stopped => "stopped",
        }
    }

    /// Reads a stored name; anything unknown is taken as stopped, the safe
    /// side.
    pub fn from_db(s: &str) -> Lifecycle {
        match s {
            "running" => Lifecycle::Running,
            _ => Lifecycle::Stopped,
        }
    }
}

/// Where a topology stands, from its desired state and the agents' reports.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Desired running; not every process is placed and running yet.
    Scheduling,
    /// Every process runs.
    Running,
    /// Desired running, but a process is failed or restarting.
    Recovering,
    /// Desired stopped; some processes still run.
    Stopping,
    /// Desired stopped and nothing runs.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_meaningful_transitions_are_allowed() {
        assert_eq!(
            Lifecycle::Stopped.next(Command::Start).unwrap(),
            Transition::To(Lifecycle::Running)
        );
        assert_eq!(
            Lifecycle::Running.next(Command::Stop).unwrap(),
            Transition::To(Lifecycle::Stopped)
        );
        assert!(Lifecycle::Running.next(Command::Start).is_err());
        assert!(Lifecycle::Stopped.next(Command::Stop).is_err());
        assert_eq!(
            Lifecycle::Stopped.next(Command::Kill).unwrap(),
            Transition::Remove
        );
        assert_eq!(
            Lifecycle::from_db(Lifecycle::Running.as_db()),
            Lifecycle::Running
        );
    }
}
