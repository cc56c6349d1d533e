# {{name}}

A Tempest topology. It reads {{source_long}}, splits each line into words
and counts them per word (key grouping sends every occurrence of a word to
the same `count` instance).

## Run it

```sh
# The pipeline's tests, on Tempest's test runtime (no broker needed).
cargo test
# The whole topology in one process (Ctrl-C drains it and stops).
cargo run -- standalone
# The same, with the settings a cluster runs it with.
cargo run -- standalone --config Topology.toml
```
{{run_notes}}
## Deploy it

```sh
# Check Topology.toml and the pipeline, build in release mode, and write
# target/tempest/{{name}}-0.1.0.tar.gz.
tempest package
# Package, upload and start it on the director.
tempest deploy
# Override Topology.toml keys at deploy time.
tempest deploy --set max_pending=1000{{deploy_example}}
# Figures per task, processes, logs, worker counts, the end.
tempest status {{name}}
tempest logs {{name}} --follow
tempest rebalance {{name}} --workers count=4
tempest kill {{name}}
```

The director comes from `--director`, `TEMPEST_DIRECTOR`, a `Cluster.toml`
in the current directory, or a `tempest dev` running here; the token from
`--token`, `TEMPEST_TOKEN` or `Cluster.toml`.

## Grow it

```sh
# src/enrich.rs: a task added to the pipeline after the last one, and to Topology.toml.
tempest generate task enrich
# src/ticks.rs: a source kind that Topology.toml can select.
tempest generate source ticks
```

## Files

- `src/main.rs`: the tasks, the pipeline, the topology, and their tests.
- `Topology.toml`: the settings it runs with (timeouts, failure policy,
  source, worker counts). Every task of the pipeline needs its
  `[tasks.NAME] workers`: that is how many workers a cluster starts.
- `Cargo.toml`: {{dependency_note}}
