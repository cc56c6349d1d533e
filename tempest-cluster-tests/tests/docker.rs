//! The Docker cluster fault suite: `docker-compose.yml`'s Redis, director and
//! three agents (each its own host on the compose network) run word count
//! reading a Redis stream and counting words into a Redis hash, while
//! 200,000 sentences are fed, 50,000 during each fault.
//!
//! Word count is deployed with more instances than its package's defaults
//! (split ×2, count ×3, output ×2), so its workers spread over the three
//! agents and task messages cross the compose network worker to worker
//! (protocol v2's peer links). Before each fault and after each re-placement
//! the suite checks that from the director's placement (every worker's peer
//! address names its agent's container, and each edge of the pipeline has
//! instances on different agents) and from the containers' `/proc` (an
//! established peer link between every such pair of instances).
//!
//! The faults:
//!
//! 1. `agent-kill`: the agent running the topology server is `docker kill`ed;
//!    its processes are placed on the other two and run there; then it is
//!    started again and rejoins without running anything twice.
//! 2. `network-cut`: the agent running the topology server is cut off the
//!    network (`docker network disconnect`); its processes move; it is
//!    connected again, stops what moved, and no process runs twice.
//! 3. `director-restart`: the director is stopped (`docker stop`: SIGTERM;
//!    it exits within about 2 s), its container removed and created anew
//!    from the compose file: sentences keep being counted while it is down,
//!    and it comes back with its state from its volume (package, topology,
//!    agents, placement unchanged).
//! 4. `redis-restart`: Redis (append-only file on) is restarted: the stream
//!    and the counts survive, the sources reconnect and flow resumes.
//!
//! After each fault the suite waits until every sentence of its phase is
//! acked, then reads the hash: each sentence starts with a word of its own
//! (`s<n>`), so a sentence counted zero times is lost and one counted twice
//! is duplicated. It prints one JSON line per fault (`cluster-suite: {...}`,
//! with the lost and duplicated sentences and words and how long recovery
//! took) and fails if any sentence is lost, or if a fault duplicated more
//! sentences than could be in flight at once (`max_pending`; a lost
//! worker's or server's roots are replayed, each at most once more per
//! fault) or more word occurrences than those sentences hold. The cluster is torn down at the
//! end, volumes included, and every container's logs are printed when the
//! suite fails (`TEMPEST_KEEP_CLUSTER=1` leaves it up).
//!
//! The cluster runs with TLS on every link and scoped credentials, from
//! files made as `tempest cluster init` makes them (a CA, the director's and
//! the agents' certificates, the admin, viewer and agent tokens), and the
//! suite talks to the director over https, verified against that CA. After
//! the deploy it checks the director's published port answers no plain HTTP
//! and fails a client of another CA, the tokens' scopes (none: 401, the
//! viewer's change: 403, the agent token without the cluster's client
//! certificate: 403), and that every daemon runs as the image's tempest
//! user without capabilities, holding only its own files (the agents
//! neither the CA's key nor the director's), each 0600; after the deploy
//! and again after the faults, that every word count process has its
//! deployment's data-plane certificate, key and CA in its environment and
//! no token, and that its log says its data plane is TLS.
//!
//! Docker is required: without it the suite fails, it never skips.

#![cfg(target_os = "linux")]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult};
use serde_json::{json, Map, Value};
use support::cluster::{repo_root, Cluster, AGENTS};
use support::redis_side::{self as rs, Feeder, GroupState};
use support::{report_line, try_wait_for, wait_for};
use tempest_control::package::{pack, sha256_hex};
use tempest_control::Manifest;

/// Sentences fed during each fault.
const PER_FAULT: u64 = 50_000;
/// Sentences fed per second: well under what the cluster handles with
/// debug builds on two cores, so a backlog left by a fault is worked off.
const RATE: f64 = 2_000.0;
/// The deploy's worker counts (the package's own are 1, 2, 1): enough
/// instances that every task's run on more than one agent, and the
/// messages of both edges (split -> count, count -> output, both key
/// grouped) cross the compose network between workers.
const WORKERS: [(&str, u32); 3] = [("split", 2), ("count", 3), ("output", 2)];
/// The topology server and the workers.
const PROCESSES: usize = {
    let mut n = 1;
    let mut i = 0;
    while i < WORKERS.len() {
        n += WORKERS[i].1 as usize;
        i += 1;
    }
    n
};
/// The roots the topology server admits at once: what can be in flight
/// when a fault strikes, so the bound on the sentences a fault duplicates.
const MAX_PENDING: u64 = 2000;
const TOPOLOGY: &str = "wordcount";
/// The bound on moving an agent's processes and on a rejoin.
const MOVE_BOUND: Duration = Duration::from_secs(90);
/// The bound on working off what was in flight when a fault struck.
const RECOVERY_BOUND: Duration = Duration::from_secs(180);

/// The package's own Topology.toml: the worker counts.
const PACKAGE_TOML: &str =
    "[tasks.split]\nworkers = 1\n\n[tasks.count]\nworkers = 2\n\n[tasks.output]\nworkers = 1\n";

/// The deploy's overrides (with `max_pending = MAX_PENDING` before them):
/// read the compose network's Redis; never give up on a sentence (`none`
/// leaves a failed root pending at Redis, which redelivers it after
/// `claim_idle_ms`), and keep the timeouts short so the roots a lost
/// topology server leaves pending at Redis come back within seconds (a lost
/// worker's are replayed at once by the server). The counts go to the
/// Redis hash through WORDCOUNT_REDIS, which the deploy's `env` gives the
/// topology's processes.
const OVERRIDES: &str = r#"
message_timeout = "5s"
batch_size = 256
grace_period = "2s"

[failure]
policy = "none"

[source]
kind = "redis"

[source.config]
url = "redis://redis:6379"
stream = "sentences"
group = "wordcount"
batch_size = 256
block_ms = 100
claim_idle_ms = 8000
"#;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The topology's detail; None when the director does not answer.
fn topology(cluster: &Cluster) -> Option<Value> {
    cluster.get_json(&format!("/api/v1/topologies/{TOPOLOGY}"))
}

/// Process id -> agent id, when all `n` processes run; else None.
fn all_running(detail: &Value, n: usize) -> Option<BTreeMap<String, String>> {
    let placement = detail["placement"].as_array()?;
    if placement.len() != n || placement.iter().any(|p| p["state"] != json!("running")) {
        return None;
    }
    placement
        .iter()
        .map(|p| {
            Some((
                p["id"].as_str()?.to_owned(),
                p["agent"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The agent (id and compose service) running the topology server.
fn server_agent(cluster: &Cluster) -> (String, String) {
    wait_for("the topology server's agent", MOVE_BOUND, || {
        let detail = topology(cluster)?;
        let placed = all_running(&detail, PROCESSES)?;
        let agent = placed.get(&format!("{TOPOLOGY}/server"))?.clone();
        let service = cluster.service_of_agent(&agent)?;
        Some((agent, service))
    })
}

/// Waits until every process runs exactly once over the agent containers
/// (read from their /proc), each where the director placed it.
fn wait_each_process_once(cluster: &Cluster, what: &str) {
    let mut last = BTreeMap::new();
    let found = try_wait_for(MOVE_BOUND, || {
        let placed = all_running(&topology(cluster)?, PROCESSES)?;
        let services = cluster.agents_up()?;
        last = cluster.processes();
        let expected: BTreeMap<String, Vec<String>> = placed
            .iter()
            .map(|(id, agent)| {
                let identity = id.strip_prefix(&format!("{TOPOLOGY}/")).unwrap_or(id);
                Some((identity.to_owned(), vec![services.get(agent)?.clone()]))
            })
            .collect::<Option<_>>()?;
        (last == expected).then_some(())
    });
    assert!(
        found.is_some(),
        "{what}: the processes never ran exactly once each where they are placed; \
         running (process -> containers): {last:?}"
    );
}

/// The ports an agent gives its processes (`port_range` in
/// docker/cluster/SERVICE.toml): a topology server's port, a worker's peer
/// port.
fn port_range(service: &str) -> RangeInclusive<u16> {
    let path = repo_root().join(format!("docker/cluster/{service}.toml"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("port_range"))
        .and_then(|v| v.trim().strip_prefix('='))
        .and_then(|v| v.trim().trim_matches('"').split_once('-'))
        .and_then(|(a, b)| Some(a.trim().parse().ok()?..=b.trim().parse().ok()?))
        .unwrap_or_else(|| panic!("no port_range \"A-B\" in {}", path.display()))
}

/// A placement entry's process as the containers' `/proc` names it:
/// `server`, `TASK/INSTANCE`.
fn identity(p: &Value) -> Option<String> {
    if p["role"] == json!("topology") {
        return Some("server".into());
    }
    Some(format!(
        "{}/{}",
        p["task"].as_str()?,
        p["instance"].as_u64()?
    ))
}

/// Checks that word count runs as a mesh over the agent containers and
/// that its task messages cross the compose network between workers; returns
/// the figures.
///
/// From the director's placement: every process's address (a worker's peer
/// address, the server's address) names the container of the agent it is
/// placed on, with a port of that agent's `port_range` (not 127.0.0.1, not
/// another host), no two alike; the processes use at least two agents; and
/// each edge of the pipeline has pairs of instances on different agents.
/// From the containers' `/proc`: every such pair is joined by an
/// established TCP connection between the two containers (a peer link),
/// each end held by the process placed there.
fn check_mesh(cluster: &Cluster, what: &str) -> Value {
    let started = Instant::now();
    let (detail, services) = wait_for(
        &format!("{what}: every process running with its address"),
        MOVE_BOUND,
        || {
            let d = topology(cluster)?;
            all_running(&d, PROCESSES)?;
            let services = cluster.agents_up()?;
            d["placement"]
                .as_array()?
                .iter()
                .all(|p| {
                    p["address"].is_string()
                        && p["agent"]
                            .as_str()
                            .is_some_and(|a| services.contains_key(a))
                })
                .then_some((d, services))
        },
    );
    // process -> (service, address)
    let mut placed: BTreeMap<String, (String, String)> = BTreeMap::new();
    for p in detail["placement"].as_array().into_iter().flatten() {
        let id = identity(p).unwrap_or_else(|| panic!("{what}: a placement entry {p}"));
        let service = services[p["agent"].as_str().unwrap_or_default()].clone();
        let address = p["address"].as_str().unwrap_or_default().to_owned();
        let (host, port) = address
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{what}: {id}'s address {address:?} has no port"));
        assert!(
            host == service && AGENTS.contains(&host),
            "{what}: {id} runs on {service} but its address is {address}: others must reach \
             it by its agent's container name\n{detail:#}"
        );
        let port: u16 = port
            .parse()
            .unwrap_or_else(|_| panic!("{what}: {id}'s address {address:?}"));
        let range = port_range(&service);
        assert!(
            range.contains(&port),
            "{what}: {id}'s port {port} is not in {service}'s port_range {range:?}"
        );
        placed.insert(id, (service, address));
    }
    let addresses: BTreeSet<&String> = placed.values().map(|(_, a)| a).collect();
    assert_eq!(
        addresses.len(),
        placed.len(),
        "{what}: two processes share an address: {placed:?}"
    );
    let used: BTreeSet<&String> = placed.values().map(|(s, _)| s).collect();
    assert!(
        used.len() >= 2,
        "{what}: every process runs on {used:?} ({} agents up): no message crosses the \
         network\n{placed:?}",
        services.len()
    );

    // Per edge, the pairs of instances on different agents.
    let edges: Vec<(String, String)> = detail["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["from"].as_str()?.to_owned(), e["to"].as_str()?.to_owned())))
        .collect();
    assert!(
        !edges.is_empty(),
        "{what}: the topology shows no edges\n{detail:#}"
    );
    let instances = |task: &str| -> Vec<String> {
        placed
            .keys()
            .filter(|id| id.split_once('/').is_some_and(|(t, _)| t == task))
            .cloned()
            .collect()
    };
    let mut crossing: BTreeMap<String, (usize, BTreeSet<(String, String)>)> = BTreeMap::new();
    for (from, to) in &edges {
        let (ups, downs) = (instances(from), instances(to));
        let pairs: BTreeSet<(String, String)> = ups
            .iter()
            .flat_map(|u| downs.iter().map(move |d| (u.clone(), d.clone())))
            .filter(|(u, d)| placed[u].0 != placed[d].0)
            .collect();
        assert!(
            !pairs.is_empty(),
            "{what}: no instance of {from} is on another agent than an instance of {to}: \
             their messages never cross the network\n{placed:?}"
        );
        crossing.insert(format!("{from}->{to}"), (ups.len() * downs.len(), pairs));
    }

    // The peer links between containers, seen from both ends.
    let mut linked: BTreeSet<(String, String)> = BTreeSet::new();
    let mut missing: Vec<(String, String)> = Vec::new();
    let found = try_wait_for(Duration::from_secs(60), || {
        // (local, remote) -> (service, process), of the processes placed there.
        let mut ends: HashMap<(String, String), (String, String)> = HashMap::new();
        for service in &used {
            for c in cluster.connections_in(service)? {
                // Loopback connections stay in their container (and the
                // same loopback pair may exist in two).
                let loopback = c
                    .local
                    .parse::<std::net::SocketAddr>()
                    .map_or(true, |a| a.ip().is_loopback());
                if !loopback && placed.get(&c.process).is_some_and(|(s, _)| s == *service) {
                    ends.insert((c.local, c.remote), ((*service).clone(), c.process));
                }
            }
        }
        linked = ends
            .iter()
            .filter_map(|((local, remote), (service, process))| {
                let (other_service, other) = ends.get(&(remote.clone(), local.clone()))?;
                (other_service != service).then(|| (process.clone(), other.clone()))
            })
            .collect();
        missing = crossing
            .values()
            .flat_map(|(_, pairs)| pairs.iter())
            .filter(|(u, d)| !linked.contains(&(u.clone(), d.clone())))
            .cloned()
            .collect();
        missing.is_empty().then_some(())
    });
    assert!(
        found.is_some(),
        "{what}: no peer link across the network between {missing:?}, which run on different \
         agents; links seen between containers: {linked:?}\nplacement: {placed:?}"
    );
    let mut figures = Map::new();
    figures.insert("agents".into(), json!(used));
    for (edge, (pairs, across)) in &crossing {
        figures.insert(
            edge.clone(),
            json!({"pairs": pairs, "across_agents": across.len()}),
        );
    }
    figures.insert("checked_ms".into(), json!(ms(started.elapsed())));
    Value::Object(figures)
}

/// The files each container holds, in `/run/secrets/tempest` (mounted from
/// the TLS directory) and `/run/tempest` (installed by the entrypoint).
fn expected_secrets(service: &str) -> BTreeSet<&'static str> {
    if service == "director" {
        [
            "admin.token",
            "agent.token",
            "ca.crt",
            "ca.key",
            "director.crt",
            "director.key",
            "viewer.token",
        ]
        .into()
    } else {
        ["agent.crt", "agent.key", "agent.token", "ca.crt"].into()
    }
}

/// TLS and the scoped credentials, from the host and in the containers:
///
/// - the director's published port speaks TLS only: plain HTTP gets no
///   answer, a client trusting another CA refuses its certificate, and one
///   trusting the cluster CA reads its health;
/// - its API wants a credential (401 without), the viewer token reads but
///   cannot change (403), and the agent token is refused without the
///   cluster's client certificate (403);
/// - every daemon runs as the tempest user without capabilities, and holds
///   its own files only (the agents neither the CA's key nor the director's,
///   nor the admin or viewer token), each the tempest user's, mode 0600.
fn check_tls_links(cluster: &Cluster, hash: &str) -> Value {
    let started = Instant::now();
    // Plain HTTP on the https port: no HTTP answer.
    let plain = tempest_testkit::http::request_within(
        &cluster.director,
        "GET",
        "/api/v1/health",
        &[],
        b"",
        Duration::from_secs(10),
    );
    let plain_refused = match &plain {
        Err(e) => e.to_string(),
        Ok(r) => panic!(
            "the director answered plain HTTP on its published port: {} {}",
            r.status, r.body
        ),
    };
    // Another CA's client does not take the director's certificate.
    let other = tempfile::tempdir().expect("a temporary directory");
    let other_ca = other.path().join("ca.crt");
    std::fs::write(
        &other_ca,
        tempest_control::tls::ClusterCa::generate()
            .expect("a CA")
            .cert_pem(),
    )
    .expect("writing another CA");
    let foreign = support::https::Https::new(&cluster.director, &other_ca).request(
        "GET",
        "/api/v1/health",
        &[],
        b"",
        Duration::from_secs(10),
    );
    let foreign_refused = match foreign {
        Err(e) => e.to_string(),
        Ok(r) => panic!(
            "a client trusting another CA took the director's certificate: {} {}",
            r.status, r.body
        ),
    };
    let status = |method: &str, path: &str, token: Option<&str>, body: &[u8]| {
        cluster
            .request_as(method, path, token, body)
            .unwrap_or_else(|e| panic!("{method} {path} over TLS: {e}"))
            .status
    };
    assert_eq!(
        status("GET", "/api/v1/health", None, b""),
        200,
        "the director's health over TLS"
    );
    assert_eq!(
        status("GET", "/api/v1/agents", None, b""),
        401,
        "a read without a token"
    );
    let token = |file: &str| {
        std::fs::read_to_string(cluster.tls_dir.join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"))
            .trim()
            .to_owned()
    };
    let viewer = token("viewer.token");
    assert_eq!(
        status("GET", "/api/v1/agents", Some(&viewer), b""),
        200,
        "a read with the viewer token"
    );
    let stop = format!("/api/v1/topologies/{TOPOLOGY}/stop");
    assert_eq!(
        status("POST", &stop, Some(&viewer), b""),
        403,
        "a change with the viewer token"
    );
    let agent = token("agent.token");
    assert_eq!(
        status(
            "GET",
            &format!("/api/v1/packages/{hash}/archive"),
            Some(&agent),
            b""
        ),
        403,
        "the agent token without the cluster's client certificate"
    );

    // In the containers: who runs, and what each holds.
    let mut held = Map::new();
    for service in ["director"].iter().chain(AGENTS.iter()) {
        let out = cluster.exec(
            service,
            "awk '/^(Uid|Gid|CapEff):/ {print $1, $2}' /proc/1/status; \
             for f in /run/secrets/tempest/*; do echo \"M ${f##*/}\"; done; \
             cd /run/tempest && for f in *; do echo \"I $f $(stat -c '%a %U' \"$f\")\"; done",
        );
        assert!(out.ok, "reading {service}'s files: {}", out.text());
        let lines: Vec<&str> = out.stdout.lines().collect();
        for want in ["Uid: 999", "Gid: 999", "CapEff: 0000000000000000"] {
            assert!(
                lines.contains(&want),
                "{service}'s daemon should run as tempest (999) without capabilities: {lines:?}"
            );
        }
        let expected = expected_secrets(service);
        let mounted: BTreeSet<&str> = lines.iter().filter_map(|l| l.strip_prefix("M ")).collect();
        assert_eq!(mounted, expected, "the files mounted in {service}");
        let installed: BTreeMap<&str, &str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("I ")?.split_once(' '))
            .collect();
        assert_eq!(
            installed.keys().copied().collect::<BTreeSet<_>>(),
            expected,
            "the files installed in {service}'s /run/tempest"
        );
        assert!(
            installed.values().all(|m| *m == "600 tempest"),
            "{service}'s files are the tempest user's, mode 0600: {installed:?}"
        );
        held.insert((*service).to_owned(), json!(expected));
    }
    json!({
        "step": "tls-links",
        "plain_http": plain_refused,
        "other_ca": foreign_refused,
        "files": held,
        "ms": ms(started.elapsed()),
    })
}

/// The data plane is TLS: every placed process of word count has its
/// deployment's certificate, key (the tempest user's, mode 0600) and CA in
/// its environment, with its data-plane secret and no token of the
/// cluster's, and its log says its data plane is TLS; no process's log
/// says plain text.
fn check_data_plane_tls(cluster: &Cluster, what: &str) -> Value {
    let started = Instant::now();
    let placed = wait_for(
        &format!("{what}: every process running"),
        MOVE_BOUND,
        || {
            let placed = all_running(&topology(cluster)?, PROCESSES)?;
            let services = cluster.agents_up()?;
            placed
                .into_iter()
                .map(|(id, agent)| {
                    let identity = id.strip_prefix(&format!("{TOPOLOGY}/"))?.to_owned();
                    Some((identity, services.get(&agent)?.clone()))
                })
                .collect::<Option<BTreeMap<String, String>>>()
        },
    );
    let script = r#"
for p in /proc/[0-9]*; do
  c=$(tr '\000' ' ' < "$p/cmdline" 2>/dev/null) || continue
  case "$c" in *"/packages/"*) ;; *) continue ;; esac
  echo "P $c"
  tr '\000' '\n' < "$p/environ" | sed -n 's/^\(TEMPEST_[A-Za-z0-9_]*\)=.*/E \1/p'
  key=$(tr '\000' '\n' < "$p/environ" | sed -n 's/^TEMPEST_DATA_TLS_KEY=//p')
  [ -n "$key" ] && echo "K $(stat -c '%a %U' "$key")"
done
for f in /var/lib/tempest-agent/logs/*/std*.log*; do
  [ -f "$f" ] || continue
  d=${f%/*}
  grep -q 'data plane: TLS' "$f" && echo "T ${d##*/}"
  grep -q 'data plane: plain text' "$f" && echo "X ${d##*/}"
done
true
"#;
    let mut checked = 0;
    let mut tls_logs: BTreeSet<(String, String)> = BTreeSet::new();
    for service in AGENTS {
        let out = cluster.exec(service, script);
        assert!(
            out.ok,
            "{what}: reading {service}'s processes: {}",
            out.text()
        );
        let mut current: Option<String> = None;
        let mut processes: BTreeMap<String, (BTreeSet<String>, Option<String>)> = BTreeMap::new();
        for line in out.stdout.lines() {
            if let Some(cmdline) = line.strip_prefix("P ") {
                current = support::cluster::process_identity(cmdline);
                if let Some(id) = &current {
                    processes.entry(id.clone()).or_default();
                }
            } else if let (Some(name), Some(id)) = (line.strip_prefix("E "), &current) {
                if let Some(p) = processes.get_mut(id) {
                    p.0.insert(name.to_owned());
                }
            } else if let (Some(mode), Some(id)) = (line.strip_prefix("K "), &current) {
                if let Some(p) = processes.get_mut(id) {
                    p.1 = Some(mode.to_owned());
                }
            } else if let Some(dir) = line.strip_prefix("T ") {
                tls_logs.insert((service.to_owned(), log_identity(dir)));
            } else if let Some(dir) = line.strip_prefix("X ") {
                panic!("{what}: {service}'s process {dir} says its data plane is plain text");
            }
        }
        for (id, (env, key_mode)) in &processes {
            if placed.get(id).map(String::as_str) != Some(service) {
                continue;
            }
            for var in [
                "TEMPEST_DATA_TLS_CERT",
                "TEMPEST_DATA_TLS_KEY",
                "TEMPEST_DATA_TLS_CA",
                "TEMPEST_DATA_SECRET",
            ] {
                assert!(
                    env.contains(var),
                    "{what}: {id} on {service} has no {var}: its TEMPEST_ variables are {env:?}"
                );
            }
            let tokens: Vec<&String> = env.iter().filter(|v| v.contains("TOKEN")).collect();
            assert!(
                tokens.is_empty(),
                "{what}: {id} on {service} holds a token of the cluster: {tokens:?}"
            );
            assert_eq!(
                key_mode.as_deref(),
                Some("600 tempest"),
                "{what}: {id}'s data-plane key on {service}"
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, PROCESSES,
        "{what}: the processes whose environment was read, of {placed:?}"
    );
    let untold: Vec<(&String, &String)> = placed
        .iter()
        .filter(|(id, service)| !tls_logs.contains(&((*service).clone(), (*id).clone())))
        .collect();
    assert!(
        untold.is_empty(),
        "{what}: these processes' logs do not say their data plane is TLS: {untold:?}; \
         logs that do: {tls_logs:?}"
    );
    json!({
        "step": "data-plane-tls",
        "when": what,
        "processes": checked,
        "logs_saying_tls": tls_logs.len(),
        "ms": ms(started.elapsed()),
    })
}

/// A process's log directory (`wordcount_2Fcount_2F1`, the agent's safe
/// form of `wordcount/count/1`) -> its identity (`count/1`, `server`).
fn log_identity(dir: &str) -> String {
    let id = dir.replace("_2F", "/").replace("_5F", "_");
    id.strip_prefix(&format!("{TOPOLOGY}/"))
        .map_or(id.clone(), str::to_owned)
}

/// Uploads the word count package and deploys it; returns its hash.
fn deploy(cluster: &Cluster) -> String {
    let manifest = Manifest {
        name: "wordcount".into(),
        version: "0.1.0".into(),
        binary: String::new(),
        sha256: String::new(),
        target: format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        tempest_version: "0.1.0".into(),
    };
    let started = Instant::now();
    let mut archive = Vec::new();
    pack(
        &cluster.wordcount,
        Some(PACKAGE_TOML),
        manifest,
        &mut archive,
    )
    .expect("packing word count");
    let hash = sha256_hex(&archive);
    let pack_ms = ms(started.elapsed());
    let started = Instant::now();
    let r = cluster.post("/api/v1/packages", &archive);
    assert!(
        r.status == 201 || r.status == 200,
        "uploading the package: {} {}",
        r.status,
        r.body
    );
    // Word count's output task counts into this Redis (the compose network's).
    let env = json!({"WORDCOUNT_REDIS": "redis://redis:6379"});
    let config = format!("max_pending = {MAX_PENDING}\n{OVERRIDES}");
    let workers: Map<String, Value> = WORKERS
        .iter()
        .map(|(task, n)| ((*task).to_owned(), json!(n)))
        .collect();
    let body = json!({
        "name": TOPOLOGY,
        "package": hash,
        "config": config,
        "workers": workers.clone(),
        "env": env,
    });
    let r = cluster.post(
        "/api/v1/topologies",
        &serde_json::to_vec(&body).expect("JSON"),
    );
    assert_eq!(r.status, 201, "deploying: {}", r.body);
    let upload_ms = ms(started.elapsed());
    let started = Instant::now();
    let detail = wait_for(
        "word count running on the cluster",
        Duration::from_secs(180),
        || {
            let d = topology(cluster)?;
            all_running(&d, PROCESSES)?;
            Some(d)
        },
    );
    assert_eq!(
        detail["workers"],
        Value::Object(workers),
        "the deploy's worker counts"
    );
    report_line(&json!({
        "step": "deploy",
        "package_bytes": archive.len(),
        "pack_ms": pack_ms,
        "upload_and_deploy_ms": upload_ms,
        "running_ms": ms(started.elapsed()),
    }));
    hash
}

/// The words word count counts in `text`.
fn words(text: &str) -> Vec<String> {
    wordcount::split_words(&bytes::Bytes::from(text.to_owned()))
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
        .collect()
}

/// When a fault struck.
struct Fault {
    /// Sentences in the stream at that moment.
    at: u64,
    t0: Instant,
}

/// The run: the feed, the expected counts, the reports.
struct Run<'a> {
    cluster: &'a Cluster,
    redis: Option<Connection>,
    base: Arc<Vec<String>>,
    fed: u64,
    expected: HashMap<String, u64>,
    word_excess_before: u64,
    reports: Vec<Value>,
}

impl Run<'_> {
    /// Runs `f` on the Redis connection, reconnecting after an error; None
    /// while Redis does not answer.
    fn with_redis<T>(&mut self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Option<T> {
        if self.redis.is_none() {
            self.redis = rs::connect(&self.cluster.redis_url).ok();
        }
        match f(self.redis.as_mut()?) {
            Ok(v) => Some(v),
            Err(_) => {
                self.redis = None;
                None
            }
        }
    }

    fn group(&mut self) -> Option<GroupState> {
        self.with_redis(rs::group_state).flatten()
    }

    /// Waits until every sentence fed before the fault is acked; returns the
    /// time since the fault.
    fn recovered(&mut self, fault: &str, f: &Fault) -> u64 {
        wait_for(
            &format!("{fault}: every sentence fed before the fault acked"),
            RECOVERY_BOUND,
            || self.group().filter(|g| g.done_up_to(f.at)).map(|_| ()),
        );
        ms(f.t0.elapsed())
    }

    /// Feeds the next PER_FAULT sentences, strikes with `fault` while they
    /// flow, waits until all are acked and checks the counts.
    fn phase(&mut self, fault: &str, strike: impl FnOnce(&mut Run, &Fault) -> Map<String, Value>) {
        let (start, end) = (self.fed, self.fed + PER_FAULT);
        let began = Instant::now();
        let feeder = Feeder::start(&self.cluster.redis_url, self.base.clone(), start, end, RATE);
        wait_for(
            &format!("{fault}: sentences flowing before the fault"),
            Duration::from_secs(120),
            || {
                (feeder.progress() >= start + PER_FAULT / 10
                    && self.group()?.acked() >= start + PER_FAULT / 20)
                    .then_some(())
            },
        );
        let mesh = check_mesh(self.cluster, &format!("{fault}: before the fault"));
        let f = Fault {
            at: feeder.progress(),
            t0: Instant::now(),
        };
        let mut figures = strike(self, &f);
        figures.insert("mesh_before".into(), mesh);
        let feed = feeder.finish();

        let settled = try_wait_for(RECOVERY_BOUND, || {
            self.group()
                .filter(|g| g.done_up_to(end) && g.pending == 0)
                .map(|_| ())
        })
        .is_some();
        self.fed = end;

        // Every sentence of the phase, by its own word.
        let counts = wait_for("the counts", Duration::from_secs(60), || {
            self.with_redis(rs::counts)
        });
        let (mut lost, mut duplicated, mut lost_examples) = (0u64, 0u64, Vec::new());
        for n in start..end {
            match counts.get(&rs::marker(n)).copied().unwrap_or(0) {
                0 => {
                    lost += 1;
                    if lost_examples.len() < 10 {
                        lost_examples.push(n);
                    }
                }
                c => duplicated += c - 1,
            }
        }
        // Every other word, over all the sentences so far.
        for n in start..end {
            for w in words(&rs::sentence(&self.base, n)).into_iter().skip(1) {
                *self.expected.entry(w).or_insert(0) += 1;
            }
        }
        let (mut words_lost, mut words_excess) = (0u64, 0u64);
        for (w, e) in &self.expected {
            let c = counts.get(w).copied().unwrap_or(0);
            words_lost += e.saturating_sub(c);
            words_excess += c.saturating_sub(*e);
        }
        let words_duplicated = words_excess.saturating_sub(self.word_excess_before);
        self.word_excess_before = words_excess;
        let dead = self
            .with_redis(|c| rs::xlen(c, rs::DEAD))
            .unwrap_or_default();

        let mut report = Map::new();
        report.insert("fault".into(), json!(fault));
        report.insert("sentences".into(), json!(end - start));
        report.insert("lost".into(), json!(lost));
        report.insert("duplicates".into(), json!(duplicated));
        report.insert("words_lost".into(), json!(words_lost));
        report.insert("words_duplicated".into(), json!(words_duplicated));
        report.insert("dead_lettered".into(), json!(dead));
        report.insert("broker_lost".into(), json!(feed.broker_lost));
        report.insert("settled".into(), json!(settled));
        report.append(&mut figures);
        report.insert("phase_ms".into(), json!(ms(began.elapsed())));
        if !lost_examples.is_empty() {
            report.insert("lost_examples".into(), json!(lost_examples));
        }
        let report = Value::Object(report);
        report_line(&report);
        self.reports.push(report);
    }
}

/// `docker kill` the server's agent: its processes move; it comes back.
fn agent_kill(run: &mut Run, f: &Fault) -> Map<String, Value> {
    let cluster = run.cluster;
    let (victim, service) = server_agent(cluster);
    let moved = topology(cluster)
        .and_then(|d| all_running(&d, PROCESSES))
        .map_or(0, |p| p.values().filter(|a| **a == victim).count());
    cluster.docker_on(&["kill"], &service);
    wait_for(
        "the killed agent's processes running on the others",
        MOVE_BOUND,
        || {
            let placed = all_running(&topology(cluster)?, PROCESSES)?;
            (!placed.values().any(|a| *a == victim)).then_some(())
        },
    );
    let replaced_ms = ms(f.t0.elapsed());
    wait_each_process_once(cluster, "after the agent was killed");
    let mesh_after = check_mesh(cluster, "agent-kill: after re-placement");
    let recovery_ms = run.recovered("agent-kill", f);

    cluster.docker_on(&["start"], &service);
    let back = Instant::now();
    wait_for("the killed agent up again", MOVE_BOUND, || {
        cluster.agents_up()?.contains_key(&victim).then_some(())
    });
    let rejoined_ms = ms(back.elapsed());
    wait_each_process_once(cluster, "after the killed agent came back");
    let mut m = Map::new();
    m.insert("agent".into(), json!(service));
    m.insert("processes_moved".into(), json!(moved));
    m.insert("replaced_ms".into(), json!(replaced_ms));
    m.insert("recovery_ms".into(), json!(recovery_ms));
    m.insert("rejoined_ms".into(), json!(rejoined_ms));
    m.insert("mesh_after".into(), mesh_after);
    assert!(moved > 0, "the killed agent ran nothing");
    m
}

/// Cut the server's agent off the network: its processes move; once it is
/// back it stops them, and nothing runs twice.
fn network_cut(run: &mut Run, f: &Fault) -> Map<String, Value> {
    let cluster = run.cluster;
    let (victim, service) = server_agent(cluster);
    let moved = topology(cluster)
        .and_then(|d| all_running(&d, PROCESSES))
        .map_or(0, |p| p.values().filter(|a| **a == victim).count());
    cluster.disconnect(&service);
    wait_for(
        "the cut-off agent's processes running on the others",
        MOVE_BOUND,
        || {
            let placed = all_running(&topology(cluster)?, PROCESSES)?;
            (!placed.values().any(|a| *a == victim)).then_some(())
        },
    );
    let replaced_ms = ms(f.t0.elapsed());
    // Among the agents still on the network (the cut-off one's processes
    // run on, unreachable, and are not looked at).
    let mesh_after = check_mesh(cluster, "network-cut: after re-placement");
    let recovery_ms = run.recovered("network-cut", f);
    // Cut off, it cannot hear that its processes moved: they still run.
    let stale = cluster.processes_in(&service).map_or(0, |p| p.len());

    cluster.connect(&service);
    let back = Instant::now();
    wait_for("the cut-off agent up again", MOVE_BOUND, || {
        cluster.agents_up()?.contains_key(&victim).then_some(())
    });
    let rejoined_ms = ms(back.elapsed());
    wait_each_process_once(cluster, "after the cut-off agent came back");
    let once_ms = ms(back.elapsed());
    let mut m = Map::new();
    m.insert("agent".into(), json!(service));
    m.insert("processes_moved".into(), json!(moved));
    m.insert("replaced_ms".into(), json!(replaced_ms));
    m.insert("recovery_ms".into(), json!(recovery_ms));
    m.insert("stale_while_cut".into(), json!(stale));
    m.insert("rejoined_ms".into(), json!(rejoined_ms));
    m.insert("no_duplicate_process_ms".into(), json!(once_ms));
    m.insert("mesh_after".into(), mesh_after);
    assert!(moved > 0, "the cut-off agent ran nothing");
    assert!(
        stale > 0,
        "cut off, the agent should still run the processes that moved (or the \
         no-duplicate check below proves nothing)"
    );
    m
}

/// (process id, agent, pid, generation) of every process.
fn fingerprint(detail: &Value) -> Vec<Value> {
    let mut v: Vec<Value> = detail["placement"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| json!([p["id"], p["agent"], p["pid"], p["generation"]]))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|x| x.to_string());
    v
}

/// Stop the director, see word count carry on without it, start it again:
/// it knows everything it knew and moves nothing.
fn director_restart(run: &mut Run, f: &Fault, hash: &str) -> Map<String, Value> {
    let cluster = run.cluster;
    let before = wait_for("the topology running", MOVE_BOUND, || {
        let d = topology(cluster)?;
        all_running(&d, PROCESSES)?;
        Some(d)
    });
    let agents_before: BTreeSet<String> = cluster
        .agents_up()
        .expect("the director answers")
        .into_keys()
        .collect();
    assert_eq!(agents_before.len(), 3, "three agents before the restart");

    // As `docker compose stop director` would: SIGTERM (it exits within
    // about 2 s; SIGKILL only after docker-compose.yml's stop_grace_period).
    cluster.docker_on(&["stop"], "director");
    let stopped_ms = ms(f.t0.elapsed());
    assert!(
        cluster.get("/api/v1/health").is_none(),
        "the director still answers after docker stop"
    );
    // Counted from now, when the director's container has exited.
    let acked = wait_for("the acked count", Duration::from_secs(30), || {
        run.group().map(|g| g.acked())
    });
    let acked_while_down = wait_for(
        "sentences acked while the director is down",
        Duration::from_secs(60),
        || {
            let now = run.group()?.acked();
            (now >= acked + 2_000).then_some(now - acked)
        },
    );
    // A new container from the compose file: only what is on the director's
    // volume can come back.
    cluster.recreate("director");
    let started = Instant::now();
    let downtime_ms = ms(f.t0.elapsed());
    wait_for("the director answering again", MOVE_BOUND, || {
        (cluster.get("/api/v1/health")?.status == 200).then_some(())
    });
    let back_ms = ms(started.elapsed());

    // Its state: the package, the topology, the agents; nothing moved.
    let packages = cluster
        .get_json("/api/v1/packages")
        .expect("the packages after the restart");
    assert!(
        packages
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["hash"] == json!(hash))),
        "the package after the restart: {packages}"
    );
    wait_for(
        "the same three agents up after the restart",
        MOVE_BOUND,
        || {
            let up: BTreeSet<String> = cluster.agents_up()?.into_keys().collect();
            (up == agents_before).then_some(())
        },
    );
    let after = wait_for("the topology running after the restart", MOVE_BOUND, || {
        let d = topology(cluster)?;
        all_running(&d, PROCESSES)?;
        Some(d)
    });
    assert_eq!(after["package"], before["package"], "{after}");
    assert_eq!(after["state"], json!("running"), "{after}");
    assert_eq!(
        fingerprint(&after),
        fingerprint(&before),
        "the restart moved or restarted processes"
    );
    let state_ms = ms(started.elapsed());
    let recovery_ms = run.recovered("director-restart", f);
    let mut m = Map::new();
    m.insert("stopped_ms".into(), json!(stopped_ms));
    m.insert("downtime_ms".into(), json!(downtime_ms));
    m.insert("acked_while_down".into(), json!(acked_while_down));
    m.insert("director_back_ms".into(), json!(back_ms));
    m.insert("state_checked_ms".into(), json!(state_ms));
    m.insert("recovery_ms".into(), json!(recovery_ms));
    m
}

/// Restart Redis: the stream and the counts survive (append-only file), the
/// sources and outputs reconnect, flow resumes.
fn redis_restart(run: &mut Run, f: &Fault) -> Map<String, Value> {
    let cluster = run.cluster;
    let run_id = |run: &mut Run| {
        run.with_redis(|c| redis::cmd("INFO").arg("server").query::<String>(c))
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("run_id:"))
                    .map(|id| id.trim().to_owned())
            })
    };
    let before = wait_for("Redis's run id", Duration::from_secs(30), || run_id(run));
    cluster.docker_on(&["restart"], "redis");
    let after = wait_for("Redis answering again", MOVE_BOUND, || run_id(run));
    assert_ne!(before, after, "Redis was not restarted");
    let back_ms = ms(f.t0.elapsed());
    let held = wait_for("the stream's length", Duration::from_secs(30), || {
        run.with_redis(|c| rs::xlen(c, rs::STREAM))
    });
    assert!(
        held >= f.at,
        "Redis lost stream entries in the restart: {held} < {}",
        f.at
    );
    let acked = wait_for("the acked count", Duration::from_secs(30), || {
        run.group().map(|g| g.acked())
    });
    wait_for("acked growing after the restart", RECOVERY_BOUND, || {
        (run.group()?.acked() > acked).then_some(())
    });
    let resumed_ms = ms(f.t0.elapsed());
    let recovery_ms = run.recovered("redis-restart", f);
    let mut m = Map::new();
    m.insert("redis_back_ms".into(), json!(back_ms));
    m.insert("flow_resumed_ms".into(), json!(resumed_ms));
    m.insert("recovery_ms".into(), json!(recovery_ms));
    m
}

#[test]
fn wordcount_loses_no_sentence_to_killed_or_cut_off_agents_or_restarts() {
    let began = Instant::now();
    let cluster = Cluster::up();
    {
        let mut con = rs::connect(&cluster.redis_url).expect("Redis from the host");
        rs::create_group(&mut con).expect("creating the consumer group");
    }
    let hash = deploy(&cluster);
    report_line(&check_tls_links(&cluster, &hash));
    report_line(&check_data_plane_tls(&cluster, "after the deploy"));

    let base: Vec<String> = wordcount::DEFAULT_SENTENCES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        base.iter()
            .flat_map(|s| words(s))
            .all(|w| !(w.starts_with('s')
                && w.len() > 1
                && w[1..].bytes().all(|b| b.is_ascii_digit()))),
        "a sentence has a word like the markers"
    );
    // The most word occurrences (other than its marker) one sentence holds:
    // a replayed sentence counts each of them at most once more.
    let max_words = base.iter().map(|s| words(s).len()).max().unwrap_or(0) as u64;
    let mut run = Run {
        cluster: &cluster,
        redis: None,
        base: Arc::new(base),
        fed: 0,
        expected: HashMap::new(),
        word_excess_before: 0,
        reports: Vec::new(),
    };
    run.phase("agent-kill", agent_kill);
    run.phase("network-cut", network_cut);
    run.phase("director-restart", |r, f| director_restart(r, f, &hash));
    run.phase("redis-restart", redis_restart);

    // Every agent is back and runs its share at the end.
    let up = cluster.agents_up().expect("the director answers");
    // The processes started again during the faults run with TLS too.
    report_line(&check_data_plane_tls(&cluster, "after the faults"));
    assert_eq!(
        up.values().cloned().collect::<BTreeSet<_>>(),
        AGENTS.iter().map(|s| s.to_string()).collect(),
        "all three agents up at the end"
    );
    let total = |key: &str| {
        run.reports
            .iter()
            .map(|r| r[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    report_line(&json!({
        "summary": true,
        "sentences": run.fed,
        "lost": total("lost"),
        "duplicates": total("duplicates"),
        "words_lost": total("words_lost"),
        "suite_ms": ms(began.elapsed()),
    }));
    for r in &run.reports {
        assert!(
            r["lost"] == json!(0)
                && r["words_lost"] == json!(0)
                && r["broker_lost"] == json!(0)
                && r["dead_lettered"] == json!(0)
                && r["settled"] == json!(true),
            "sentences lost in {}: {r}\nall faults: {:#?}",
            r["fault"],
            run.reports
        );
        // At least once, and no more than once more for what was in flight
        // when the fault struck: a lost worker's roots are replayed by the
        // server, a lost server's (or failed ones) are redelivered by Redis,
        // and the server never has more than max_pending roots out.
        let duplicates = r["duplicates"].as_u64().unwrap_or(u64::MAX);
        let words_duplicated = r["words_duplicated"].as_u64().unwrap_or(u64::MAX);
        assert!(
            duplicates <= MAX_PENDING && words_duplicated <= MAX_PENDING * max_words,
            "{} duplicated more than was in flight (max_pending {MAX_PENDING} sentences of at \
             most {max_words} words): {r}\nall faults: {:#?}",
            r["fault"],
            run.reports
        );
    }
}
