//! The Docker cluster fault suite: `docker-compose.yml`'s Redis, director and
//! three agents (each its own host on the compose network) run word count
//! reading a Redis stream and counting words into a Redis hash, while
//! 200,000 sentences are fed, 50,000 during each fault:
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
//! took) and fails if any sentence is lost. The cluster is torn down at the
//! end, volumes included, and every container's logs are printed when the
//! suite fails (`TEMPEST_KEEP_CLUSTER=1` leaves it up).
//!
//! Docker is required: without it the suite fails, it never skips.

#![cfg(target_os = "linux")]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult};
use serde_json::{json, Map, Value};
use support::cluster::{Cluster, AGENTS};
use support::redis_side::{self as rs, Feeder, GroupState};
use support::{report_line, try_wait_for, wait_for};
use tempest_control::package::{pack, sha256_hex};
use tempest_control::Manifest;

/// Sentences fed during each fault.
const PER_FAULT: u64 = 50_000;
/// Sentences fed per second: well under what the cluster handles (about
/// 5,000/s with debug builds on two cores), so a backlog left by a fault is
/// worked off.
const RATE: f64 = 2_000.0;
/// server, split ×1, count ×2, output ×1.
const PROCESSES: usize = 5;
const TOPOLOGY: &str = "wordcount";
/// The bound on moving an agent's processes and on a rejoin.
const MOVE_BOUND: Duration = Duration::from_secs(90);
/// The bound on working off what was in flight when a fault struck.
const RECOVERY_BOUND: Duration = Duration::from_secs(180);

/// The package's own Topology.toml: the worker counts.
const PACKAGE_TOML: &str =
    "[tasks.split]\nworkers = 1\n\n[tasks.count]\nworkers = 2\n\n[tasks.output]\nworkers = 1\n";

/// The deploy's overrides: read the compose network's Redis; never give up
/// on a sentence (`none` leaves a failed root pending at Redis, which
/// redelivers it after `claim_idle_ms`), and keep the timeouts short so a
/// fault's stranded roots come back within seconds. The counts go to the
/// Redis hash through WORDCOUNT_REDIS, which the deploy's `env` gives the
/// topology's processes.
const OVERRIDES: &str = r#"
message_timeout = "5s"
max_pending = 2000
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
    let body = json!({"name": TOPOLOGY, "package": hash, "config": OVERRIDES, "env": env});
    let r = cluster.post(
        "/api/v1/topologies",
        &serde_json::to_vec(&body).expect("JSON"),
    );
    assert_eq!(r.status, 201, "deploying: {}", r.body);
    let upload_ms = ms(started.elapsed());
    let started = Instant::now();
    wait_for(
        "word count running on the cluster",
        Duration::from_secs(180),
        || all_running(&topology(cluster)?, PROCESSES),
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
        let f = Fault {
            at: feeder.progress(),
            t0: Instant::now(),
        };
        let mut figures = strike(self, &f);
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
    }
}
