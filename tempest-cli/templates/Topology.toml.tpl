# Topology.toml: the run-time settings of {{name}}, laid over the ones in
# src/main.rs. `tempest package` checks it (every problem with its line and
# key) and puts it in the package; `tempest deploy --set KEY=VALUE` overrides
# single keys at deploy time. Topology.toml.example in the Tempest repository
# lists every key, commented. Unknown keys are errors.
version = 1

# A root (a message from the source) whose whole tree of work is not done
# within this time fails, and the failure policy below handles it.
message_timeout = "30s"

# The most roots in flight; the source is not polled beyond it.
max_pending = 10000

[failure]
# best_effort: ack a failed root anyway; retry: replay it up to max_attempts,
# then fail it at the source (a dead letter); none: leave it un-acked.
policy = "retry"
max_attempts = 3

{{source_toml}}
# Worker processes per task on a cluster. Every task of the pipeline needs
# its [tasks.NAME] here: the director starts this many workers of each
# (`tempest rebalance` changes them while it runs).
[tasks.split]
workers = 1

[tasks.count]
workers = 2
