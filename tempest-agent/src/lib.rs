//! # tempest-agent
//!
//! The per-node daemon. It registers with the director and heartbeats; each
//! answer is the full set of processes this node should run, and the agent
//! converges to it. It fetches packages by content hash, runs topology
//! servers and task workers in their own process groups, restarts them with
//! back-off, keeps their logs, aggregates their metrics, and serves all of it
//! on an HTTP API. Killed and restarted, it adopts the processes its previous
//! run left (recorded in its data directory) instead of orphaning or
//! duplicating them.

#![warn(missing_docs)]

pub mod supervisor;
