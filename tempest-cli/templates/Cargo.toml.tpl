[package]
name = "{{name}}"
version = "0.1.0"
edition = "2021"
publish = false

# A Tempest topology package: one binary that runs standalone, as a topology
# server or as a task worker. `tempest package` builds it (release) and writes
# the archive a Tempest cluster deploys.

[dependencies]
{{dependencies}}
# Its own workspace, so it builds wherever it is (even inside another
# workspace's directory). Remove this table to make it a member of yours.
[workspace]

[profile.release]
# Line tables, so a crash on a cluster logs a readable backtrace.
debug = 1
