//! End-to-end tests of the director: a real `tempest-director` process and
//! real `tempest-agent` processes on loopback, running the word count
//! example (its binary wrapped in a one-line script, so the package stays
//! small) on a real Redis stream, counting into a Redis hash.
//!
//! Nothing waits by sleeping for a fixed time: every wait polls an API until
//! what is expected holds, within a bound.

#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempest_testkit::cluster::{
    all_running, free_addr, marked_processes, script_package, tempdir, try_wait_for, wait_for,
    wordcount_package, AgentProcess, DirectorProcess, Tokens, WAIT, WORDCOUNT_TOML,
};
use tempest_testkit::{redis_pipeline, RedisServer};

/// The tests' credentials.
fn tokens() -> Tokens {
    Tokens::new("director-test")
}

type Director = DirectorProcess;

/// The sentences fed, in turn.
const SENTENCES: [&str; 3] = [
    "the cow jumped over the moon",
    "an apple a day keeps the doctor away",
    "four score and seven years ago",
];

/// Word count reading the `sentences` stream of `redis`, retrying failed
/// roots, recovering the entries of dead consumers after 3 s.
fn redis_overrides(redis: &RedisServer) -> String {
    format!(
        r#"
max_pending = 512
batch_size = 64
message_timeout = "10s"
grace_period = "1s"

[failure]
policy = "retry"
max_attempts = 20

[source]
kind = "redis"

[source.config]
url = "{}"
stream = "sentences"
group = "wordcount"
batch_size = 256
block_ms = 50
claim_idle_ms = 3000
dead_letter = "sentences:dead"
"#,
        redis.url()
    )
}

/// Feeds [`SENTENCES`] in turn into the `sentences` stream, about `rate` a
/// second, until stopped; [`Feeder::stop`] says how many it fed.
struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Feeder {
    fn start(redis: &RedisServer, rate: u64) -> Feeder {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let port = redis.port();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut fed = 0u64;
            while !flag.load(Ordering::SeqCst) {
                // Keep to the rate: feed in slices of 50 ms.
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                if due <= fed {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                let batch: Vec<Vec<String>> = (fed..due)
                    .map(|i| {
                        [
                            "XADD",
                            "sentences",
                            "*",
                            "payload",
                            SENTENCES[(i % 3) as usize],
                        ]
                        .map(str::to_owned)
                        .to_vec()
                    })
                    .collect();
                let replies = redis_pipeline(port, &batch).expect("feeding the stream");
                assert!(replies.iter().all(|r| !r.starts_with('-')), "{replies:?}");
                fed = due;
            }
            fed
        });
        Feeder {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("a feeder's thread")
            .join()
            .expect("the feeder")
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every word's expected count after `fed` sentences.
fn expected_counts(fed: u64) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for i in 0..fed {
        for w in SENTENCES[(i % 3) as usize].split_whitespace() {
            *out.entry(w.to_owned()).or_insert(0) += 1;
        }
    }
    out
}

/// The counts in the Redis hash `wordcount`.
fn counted(redis: &RedisServer) -> BTreeMap<String, u64> {
    let reply = redis.command(&["HGETALL", "wordcount"]).expect("HGETALL");
    let words: Vec<&str> = reply.lines().collect();
    words
        .chunks(2)
        .filter_map(|kv| Some((kv.first()?.to_string(), kv.get(1)?.parse().ok()?)))
        .collect()
}

/// Word occurrences missing from the hash (lost) and counted twice
/// (duplicated), against `expected`.
fn shortfall_and_excess(
    expected: &BTreeMap<String, u64>,
    got: &BTreeMap<String, u64>,
) -> (u64, u64) {
    let mut lost = 0;
    let mut extra = 0;
    for (w, n) in expected {
        let g = got.get(w).copied().unwrap_or(0);
        lost += n.saturating_sub(g);
        extra += g.saturating_sub(*n);
    }
    (lost, extra)
}

// ---------------------------------------------------------------------------
// The tests.

/// The running word count's figures through the director: acked growing,
/// a rate, per-task figures, samples accumulating, the logs proxy.
fn check_figures(director: &Director) {
    let first = wait_for("acked in the director's figures", WAIT, || {
        let t = director.topology("wordcount");
        let acked = t["acked"].as_u64()?;
        (acked > 0 && t["msgs_per_sec"].as_f64()? > 0.0).then_some(acked)
    });
    let t = wait_for("acked growing in the director's figures", WAIT, || {
        let t = director.topology("wordcount");
        (t["acked"].as_u64()? > first).then_some(t)
    });
    assert!(t["p99_ms"].as_f64().is_some(), "{t}");
    assert!(t["p50_ms"].as_f64() <= t["p99_ms"].as_f64(), "{t}");
    assert!(t["source"]["polled"].as_u64() >= t["acked"].as_u64(), "{t}");
    assert_eq!(t["tasks"]["count"]["workers"], json!(2), "{t}");
    assert!(t["recent_errors"].as_array().is_some(), "{t}");
    wait_for("messages into every task", WAIT, || {
        let t = director.topology("wordcount");
        ["split", "count", "output"]
            .iter()
            .all(|task| t["tasks"][task]["messages_in"].as_u64() > Some(0))
            .then_some(())
    });
    let r = director.get("/api/v1/topologies");
    let summary = &r.json()[0];
    assert!(summary["acked"].as_u64() > Some(0), "{summary}");
    assert!(summary["in_flight"].is_u64(), "{summary}");
    let r = director.get("/api/v1/cluster");
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(
        (c["agents_up"].clone(), c["topologies_running"].clone()),
        (json!(2), json!(1)),
        "{c}"
    );
    assert!(c["msgs_per_sec"].is_number(), "{c}");

    // The series accumulates.
    let n = director
        .get("/api/v1/topologies/wordcount/samples")
        .json()
        .as_array()
        .unwrap()
        .len();
    let points = wait_for("samples accumulating", WAIT, || {
        let r = director.get("/api/v1/topologies/wordcount/samples");
        let v = r.json();
        (v.as_array()?.len() >= n + 2).then_some(v)
    });
    let points = points.as_array().unwrap();
    assert!(points
        .windows(2)
        .all(|w| w[0]["ts"].as_u64() <= w[1]["ts"].as_u64()));
    assert!(points.iter().any(|p| p["acked"].as_u64() > Some(0)));
    assert_eq!(director.get("/api/v1/topologies/nope/samples").status, 404);

    // The logs proxy.
    let logs = wait_for("the server's stdout through the director", WAIT, || {
        let r = director
            .get("/api/v1/topologies/wordcount/processes/server/logs?stream=stdout&lines=50");
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        v["text"].as_str()?.contains("listening on").then_some(v)
    });
    assert_eq!(logs["id"], json!("wordcount/server"));
    let r = director.get("/api/v1/topologies/wordcount/processes/wordcount/server/logs");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = director.get("/api/v1/topologies/wordcount/processes/count/0/logs?stream=stderr");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = director.get("/api/v1/topologies/wordcount/processes/nope/logs");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["error"].as_str().is_some());
    let r = director.get("/api/v1/topologies/nope/processes/server/logs");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = director.get("/api/v1/topologies/wordcount/processes/server/logs?stream=both");
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn deploys_wordcount_on_redis_moves_the_processes_of_a_dead_agent_and_survives_a_restart() {
    let redis = RedisServer::start().expect("redis-server");
    let tmp = tempdir("tempest-director-test");
    let listen = free_addr();
    let ddir = tmp.path().join("director");
    let tokens = tokens();
    let token = tokens.admin.as_str();
    let director_args = [
        // Long enough that a loaded CI machine does not miss a heartbeat
        // for that long (which would rightly move processes), short enough
        // for the 15 s bound on re-placement.
        "--agent-timeout",
        "4s",
        "--max-upload",
        "65536",
        "--metrics-interval",
        "300ms",
    ];
    let mut director = Director::start_secured(&ddir, &listen, &director_args, &tokens);
    let a = AgentProcess::join(&tmp.path().join("a"), &director.addr, &tokens.agent);
    let b = AgentProcess::join(&tmp.path().join("b"), &director.addr, &tokens.agent);
    let (a_id, b_id) = (a.id(), b.id());
    wait_for("both agents up", WAIT, || {
        (director.agents_up() == [a_id.clone(), b_id.clone()].into()).then_some(())
    });

    // The package store.
    let (archive, hash) = wordcount_package(tmp.path(), WORDCOUNT_TOML);
    assert_eq!(
        director.post("/api/v1/packages", None, &archive).status,
        401
    );
    let r = director.post("/api/v1/packages", Some(token), &archive);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["hash"], json!(hash));
    let r = director.post("/api/v1/packages", Some(token), &archive);
    assert_eq!(r.status, 200, "uploading again changes nothing: {}", r.body);
    let r = director.post("/api/v1/packages", Some(token), b"not a package at all");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("refused"));
    let r = director.post("/api/v1/packages", Some(token), &vec![7u8; 100_000]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("65536"),
        "{}",
        r.body
    );
    let r = director.get("/api/v1/packages");
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{}", r.body);
    let r = director.get(&format!("/api/v1/packages/{hash}/archive"));
    assert_eq!(r.status, 200);
    let r = director.get(&format!("/api/v1/packages/{}/archive", "0".repeat(64)));
    assert_eq!(r.status, 404, "{}", r.body);

    // Deploy errors leave nothing behind.
    let overrides = redis_overrides(&redis);
    let env = json!({"WORDCOUNT_REDIS": redis.url(), "WORDCOUNT_REDIS_HASH": "wordcount"});
    let deploy = |name: &str, package: &str, config: &str| {
        serde_json::to_vec(&json!({"name": name, "package": package, "config": config, "env": env}))
            .unwrap()
    };
    let good = deploy("wordcount", &hash, &overrides);
    assert_eq!(director.post("/api/v1/topologies", None, &good).status, 401);
    let r = director.post(
        "/api/v1/topologies",
        Some(token),
        &deploy("wordcount", &"0".repeat(64), &overrides),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = director.post(
        "/api/v1/topologies",
        Some(token),
        &deploy("wordcount", &hash, "max_pendin = 3\n"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("max_pendin"),
        "{}",
        r.body
    );
    let bad_env = serde_json::to_vec(
        &json!({"name": "wordcount", "package": hash, "env": {"TEMPEST_TOKEN": "x"}}),
    )
    .unwrap();
    let r = director.post("/api/v1/topologies", Some(token), &bad_env);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("TEMPEST_TOKEN"),
        "{}",
        r.body
    );
    let r = director.post("/api/v1/topologies", Some(token), b"{\"name\": 1}");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(director.get("/api/v1/topologies").json(), json!([]));

    // Deploy, and feed sentences while everything below happens.
    let r = director.post("/api/v1/topologies", Some(token), &good);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["env"]["WORDCOUNT_REDIS_HASH"], json!("***"));
    let r = director.post("/api/v1/topologies", Some(token), &good);
    assert_eq!(r.status, 409, "{}", r.body);
    let r = director.get("/api/v1/topologies/nope");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["error"].as_str().is_some());
    assert_eq!(
        director
            .post("/api/v1/topologies/nope/stop", Some(token), b"")
            .status,
        404
    );
    let feeder = Feeder::start(&redis, 2_000);

    // Server, split, two counts, output: spread over both agents.
    let agents = wait_for("the topology running", WAIT, || {
        all_running(&director.topology("wordcount"), 5)
    });
    assert_eq!(agents, [a_id.clone(), b_id.clone()].into());
    let acked = || a.acked() + b.acked();
    let first = wait_for("acked roots", WAIT, || Some(acked()).filter(|n| *n > 0));
    wait_for("acked growing", WAIT, || (acked() > first).then_some(()));
    check_figures(&director);

    // B's agent dies (its processes live on, orphaned): everything moves to
    // A within 15 s.
    let before: Vec<Value> = director.topology("wordcount")["placement"]
        .as_array()
        .unwrap()
        .clone();
    let b_dir = b.data_dir.clone();
    let orphans = b.kill9();
    assert!(
        !marked_processes(&b_dir).is_empty(),
        "B's processes outlive its agent"
    );
    let killed = Instant::now();
    let agents = wait_for(
        "the processes re-placed on A",
        Duration::from_secs(15),
        || {
            all_running(&director.topology("wordcount"), 5)
                .filter(|agents| agents == &[a_id.clone()].into())
        },
    );
    assert_eq!(agents, [a_id.clone()].into());
    eprintln!("re-placed and running in {:?}", killed.elapsed());
    let after = director.topology("wordcount");
    for p in &before {
        let now = after["placement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["id"] == p["id"])
            .unwrap();
        if p["agent"] == json!(b_id) {
            assert!(
                now["generation"].as_u64() > p["generation"].as_u64(),
                "a moved process gets a new generation: {p} -> {now}"
            );
        }
    }
    let first = a.acked();
    wait_for("acked growing on A", WAIT, || {
        (a.acked() > first).then_some(())
    });

    // B comes back: its assignment is empty, so it stops the processes that
    // moved, which it adopted from its state file.
    let b = AgentProcess::join(&b_dir, &director.addr, &tokens.agent);
    assert_eq!(b.id(), b_id);
    wait_for("B up again", WAIT, || {
        director.agents_up().contains(&b_id).then_some(())
    });
    wait_for("B's old processes stopped", WAIT, || {
        (b.running() == 0 && marked_processes(&b.data_dir).is_empty()).then_some(())
    });
    drop(orphans);

    // The director restarts and still knows everything; nothing moves.
    // Take the picture once everything runs, so no process is mid-restart.
    let before = wait_for("the topology running before the restart", WAIT, || {
        let d = director.topology("wordcount");
        all_running(&d, 5).map(|_| d)
    });
    let pids: Vec<Value> = before["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["id"], p["pid"], p["generation"]]))
        .collect();
    drop(director);
    director = Director::start_secured(&ddir, &listen, &director_args, &tokens);
    let r = director.get("/api/v1/packages");
    assert_eq!(r.json()[0]["hash"], json!(hash), "{}", r.body);
    let r = director.get("/api/v1/agents");
    assert_eq!(r.json().as_array().unwrap().len(), 2, "{}", r.body);
    let r = director.get("/api/v1/topologies");
    assert_eq!(r.json()[0]["name"], json!("wordcount"), "{}", r.body);
    assert_eq!(
        director.topology("wordcount")["env"]["WORDCOUNT_REDIS"],
        json!("***")
    );
    wait_for("both agents heartbeating to the new director", WAIT, || {
        (director.agents_up() == [a_id.clone(), b_id.clone()].into()).then_some(())
    });
    let detail = wait_for("the topology running after the restart", WAIT, || {
        let d = director.topology("wordcount");
        all_running(&d, 5).map(|_| d)
    });
    let now: Vec<Value> = detail["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["id"], p["pid"], p["generation"]]))
        .collect();
    assert_eq!(now, pids, "the restart changed nothing");
    let first = a.acked();
    wait_for("acked growing after the restart", WAIT, || {
        (a.acked() > first).then_some(())
    });

    // Every sentence fed is counted: zero lost through all of the above.
    let fed = feeder.stop();
    let expected = expected_counts(fed);
    let deadline = Instant::now() + Duration::from_secs(90);
    let got = loop {
        let got = counted(&redis);
        let (lost, _) = shortfall_and_excess(&expected, &got);
        if lost == 0 {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "{lost} word occurrences of {fed} sentences were never counted: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, extra) = shortfall_and_excess(&expected, &got);
    eprintln!("{fed} sentences fed, 0 lost, {extra} word occurrences counted twice");
    assert_eq!(
        redis.command(&["XLEN", "sentences:dead"]).unwrap(),
        ":0",
        "nothing dead-lettered"
    );

    // Rebalance, stop, start, kill.
    let r = director.post(
        "/api/v1/topologies/wordcount/rebalance",
        Some(token),
        b"{\"workers\": {\"nope\": 2}}",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // count 2 -> 3, with sentences flowing: only count's workers move (a
    // new layout); the server and the other tasks' workers keep running
    // as they are, and the third count instance gets its share.
    let before = director.topology("wordcount");
    let placed = |d: &Value| -> BTreeMap<String, (Value, Value, Value)> {
        d["placement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let id = p["id"].as_str().unwrap().to_owned();
                (
                    id,
                    (
                        p["pid"].clone(),
                        p["generation"].clone(),
                        p["agent"].clone(),
                    ),
                )
            })
            .collect()
    };
    let before = placed(&before);
    let feeder = Feeder::start(&redis, 1_000);
    let r = director.post(
        "/api/v1/topologies/wordcount/rebalance",
        Some(token),
        b"{\"workers\": {\"count\": 3}}",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (agents, after) = wait_for("the rebalanced topology running", WAIT, || {
        let d = director.topology("wordcount");
        all_running(&d, 6).map(|agents| (agents, placed(&d)))
    });
    assert!(
        agents.contains(&b_id),
        "the new worker goes to the idle agent"
    );
    for id in [
        "wordcount/server",
        "wordcount/split/0",
        "wordcount/output/0",
    ] {
        assert_eq!(after[id], before[id], "{id} is left running as it was");
        assert!(after[id].0.is_u64(), "{id}: {:?}", after[id]);
    }
    for id in ["wordcount/count/0", "wordcount/count/1"] {
        let (pid, generation, agent) = &after[id];
        assert_ne!(pid, &before[id].0, "{id} restarts with the new layout");
        assert!(generation.as_u64() > before[id].1.as_u64(), "{id}");
        assert_eq!(agent, &before[id].2, "{id} stays on its agent");
    }
    assert!(after["wordcount/count/2"].0.is_u64(), "{after:?}");
    let detail = director.topology("wordcount");
    assert_eq!(detail["tasks"]["count"]["workers"], json!(3), "{detail}");
    // The third instance handles messages: the server and the upstream
    // worker (neither restarted) took up the new count.
    wait_for("messages into count/2", WAIT, || {
        [&a, &b]
            .iter()
            .flat_map(|agent| {
                let body = agent.get("/metrics").body;
                tempest_control::exposition::samples(&body)
                    .expect("an agent's /metrics parses")
                    .into_iter()
                    .filter(|s| {
                        s.name == "tempest_task_messages_in_total"
                            && s.label("task") == Some("count")
                            && s.label("instance") == Some("2")
                    })
                    .map(|s| s.value.as_f64())
                    .collect::<Vec<_>>()
            })
            .any(|n| n > 0.0)
            .then_some(())
    });
    // And every sentence fed across the rebalance is counted.
    let fed_across = feeder.stop();
    let mut expected = expected_counts(fed);
    for (w, n) in expected_counts(fed_across) {
        *expected.entry(w).or_insert(0) += n;
    }
    let all_counted = try_wait_for(Duration::from_secs(90), || {
        let (lost, _) = shortfall_and_excess(&expected, &counted(&redis));
        (lost == 0).then_some(())
    });
    if all_counted.is_none() {
        let got = counted(&redis);
        let (lost, _) = shortfall_and_excess(&expected, &got);
        panic!(
            "{lost} word occurrences of {fed_across} sentences fed across the rebalance were \
             never counted: {got:?}"
        );
    }
    let r = director.post("/api/v1/topologies/wordcount/stop", Some(token), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = director.post("/api/v1/topologies/wordcount/stop", Some(token), b"");
    assert_eq!(r.status, 409, "{}", r.body);
    wait_for("the topology stopped", WAIT, || {
        (director.topology("wordcount")["phase"] == json!("stopped")
            && a.running() == 0
            && b.running() == 0)
            .then_some(())
    });
    let r = director.post("/api/v1/topologies/wordcount/start", Some(token), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the topology running again", WAIT, || {
        all_running(&director.topology("wordcount"), 6)
    });
    let r = director.post("/api/v1/topologies/wordcount/kill", Some(token), b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(director.get("/api/v1/topologies/wordcount").status, 404);
    wait_for("the killed topology's processes gone", WAIT, || {
        (a.running() == 0 && b.running() == 0).then_some(())
    });
}

#[test]
fn serves_its_openapi_document_and_json_errors() {
    let tmp = tempdir("tempest-director-test");
    let tokens = tokens();
    let token = tokens.admin.as_str();
    let director = Director::start_secured(&tmp.path().join("d"), "127.0.0.1:0", &[], &tokens);
    let r = director.get("/api/v1/openapi.json");
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    for path in [
        "/api/v1/packages",
        "/api/v1/packages/{hash}/archive",
        "/api/v1/agents",
        "/api/v1/agents/heartbeat",
        "/api/v1/topologies",
        "/api/v1/topologies/{name}",
        "/api/v1/topologies/{name}/stop",
        "/api/v1/topologies/{name}/start",
        "/api/v1/topologies/{name}/kill",
        "/api/v1/topologies/{name}/rebalance",
        "/api/v1/cluster",
        "/api/v1/topologies/{name}/samples",
        "/api/v1/topologies/{name}/processes/{id}/logs",
    ] {
        assert!(doc["paths"][path].is_object(), "no {path} in {doc}");
    }
    for schema in [
        "DeployRequest",
        "ClusterSummary",
        "SamplePoint",
        "TaskFigures",
        "LogTail",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "no {schema}"
        );
    }
    let r = director.get("/api/v1/cluster");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["agents_up"], json!(0));

    let r = director.get("/api/v1/nothing-here");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().is_some());
    let r = director.post("/api/v1/agents/heartbeat", None, b"{}");
    assert_eq!(r.status, 401, "{}", r.body);
    let r = director.post("/api/v1/agents/heartbeat", Some("wrong"), b"{}");
    assert_eq!(r.status, 401, "{}", r.body);
    let r = director.post("/api/v1/agents/heartbeat", Some(&tokens.agent), b"{}");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"].as_str().is_some());

    // A package without worker counts needs them in the request.
    let (archive, hash) = script_package(tmp.path(), "bare", "#!/bin/sh\nexec sleep 600\n", None);
    let r = director.post("/api/v1/packages", Some(token), &archive);
    assert_eq!(r.status, 201, "{}", r.body);
    let body = serde_json::to_vec(&json!({"name": "bare", "package": hash})).unwrap();
    let r = director.post("/api/v1/topologies", Some(token), &body);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("workers"),
        "{}",
        r.body
    );
    let body =
        serde_json::to_vec(&json!({"name": "bare", "package": hash, "workers": {"t": 0}})).unwrap();
    assert_eq!(
        director
            .post("/api/v1/topologies", Some(token), &body)
            .status,
        400
    );
    let body =
        serde_json::to_vec(&json!({"name": "bare", "package": hash, "workers": {"t": 2}})).unwrap();
    let r = director.post("/api/v1/topologies", Some(token), &body);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["workers"], json!({"t": 2}));
    let bad =
        serde_json::to_vec(&json!({"name": "a/b", "package": hash, "workers": {"t": 1}})).unwrap();
    assert_eq!(
        director
            .post("/api/v1/topologies", Some(token), &bad)
            .status,
        400
    );
}
