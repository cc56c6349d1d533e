//! The CLI against real daemons: a `tempest-director` and a `tempest-agent`
//! on loopback running word count, driven only through `tempest` commands
//! (deploy with overrides, list, status, logs and logs --follow, rebalance,
//! stop, start, kill, agents, packages, and the errors a user meets); and
//! `tempest dev`, started and stopped with Ctrl-C as a user would.
//!
//! Every wait polls until what is expected holds, within a bound.

#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{run, tempest, Run};
use serde_json::{json, Value};
use tempest_testkit::cluster::{
    alive, all_running, cargo_bin, marked_processes, script_package, signal, tempdir, wait_for,
    wordcount_package, AgentProcess, DirectorProcess, Tokens, WAIT, WORDCOUNT_TOML,
};
use tempest_testkit::http;

/// The test cluster's credentials.
fn tokens() -> Tokens {
    Tokens::new("cli-test")
}

/// A child killed and reaped when dropped, so a failing test leaves no
/// process behind (`tempest dev`'s daemons get SIGTERM when it dies).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Lines a child prints on stdout, as they come.
fn lines_of(child: &mut std::process::Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("a piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Receives lines until one satisfies `f`, within `bound`; returns every
/// line received.
fn lines_until(
    rx: &Receiver<String>,
    bound: Duration,
    what: &str,
    f: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + bound;
    let mut seen = Vec::new();
    while !f(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("timed out waiting for {what}; got: {seen:#?}"),
        }
    }
    seen
}

/// Every line received within `d`.
fn lines_for(rx: &Receiver<String>, d: Duration) -> Vec<String> {
    let deadline = Instant::now() + d;
    let mut seen = Vec::new();
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(l);
    }
    seen
}

#[test]
fn operates_word_count_on_a_real_cluster_through_the_director() {
    let tmp = tempdir("tempest-cli-ops");
    let tokens = tokens();
    let director = DirectorProcess::start_secured(
        &tmp.path().join("director"),
        "127.0.0.1:0",
        &["--metrics-interval", "300ms"],
        &tokens,
    );
    let url = format!("http://{}", director.addr);
    let agent = AgentProcess::join(&tmp.path().join("agent"), &director.addr, &tokens.agent);
    let cli = |args: &[&str]| -> Run {
        tempest(tmp.path())
            .args(args)
            .env("TEMPEST_DIRECTOR", &url)
            .env("TEMPEST_ADMIN_TOKEN", &tokens.admin)
            .output()
            .unwrap()
            .into()
    };
    let agent_id = agent.id();
    wait_for("the agent up", WAIT, || {
        director.agents_up().contains(&agent_id).then_some(())
    });

    // Agents and (no) packages.
    let r = cli(&["agents"]).ok();
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&agent_id))
        .unwrap_or_else(|| panic!("no {agent_id}: {r:#?}"));
    assert!(row.contains(" up ") && row.contains(&agent.addr), "{row}");
    let v = cli(&["agents", "--json"]).ok().json();
    assert_eq!(v[0]["id"], json!(agent_id));
    assert!(cli(&["packages"]).ok().stdout.contains("no packages"));
    assert!(cli(&["list"]).ok().stdout.contains("no topologies"));

    let (archive, hash) = wordcount_package(tmp.path(), WORDCOUNT_TOML);
    let archive_path = tmp.path().join("wordcount.tar.gz");
    std::fs::write(&archive_path, &archive).unwrap();
    let archive_arg = archive_path.to_str().unwrap();
    let config = tmp.path().join("overrides.toml");
    std::fs::write(
        &config,
        "max_pending = 256\nbatch_size = 32\ngrace_period = \"1s\"\n",
    )
    .unwrap();
    let source_sets = [
        "--set",
        "source.kind=generator",
        "--set",
        "source.config.count=100000000",
        "--set",
        "source.config.rate=1000.0",
        "--set",
        "source.config.payloads=[\"the cow jumped over the moon\", \"an apple a day\"]",
    ];

    // Refused before anything is uploaded: a bad override, no token, not
    // a package.
    let r = cli(&["deploy", archive_arg, "--set", "max_pendin=3"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with("error: --set max_pendin=3: key `max_pendin`")),
        "{r:#?}"
    );
    let r: Run = tempest(tmp.path())
        .args(["deploy", archive_arg])
        .env("TEMPEST_DIRECTOR", &url)
        .output()
        .unwrap()
        .into();
    assert!(
        r.one_line_error().contains("needs the admin token"),
        "{r:#?}"
    );
    // The viewer token reads, but deploys nothing.
    let r: Run = tempest(tmp.path())
        .args(["deploy", archive_arg])
        .env("TEMPEST_DIRECTOR", &url)
        .env("TEMPEST_ADMIN_TOKEN", &tokens.viewer)
        .output()
        .unwrap()
        .into();
    let line = r.one_line_error();
    assert!(
        line.contains("refused this with the token given") && line.contains("admin token"),
        "{r:#?}"
    );
    let r = cli(&["deploy", archive_arg, "--env", "NOEQUALS"]);
    assert_eq!(r.code, Some(2), "a usage error: {r:#?}");
    let r = cli(&["deploy", archive_arg, "--env", "TEMPEST_X=1"]);
    assert_eq!(r.code, Some(2), "a usage error: {r:#?}");
    assert!(r.stderr.contains("set by the agent"), "{r:#?}");
    let r = cli(&["deploy", config.to_str().unwrap()]);
    assert!(r.one_line_error().contains("overrides.toml"), "{r:#?}");
    assert_eq!(director.get("/api/v1/packages").json(), json!([]));

    // Deploy: upload, overrides from a file and --set, wait for it to run.
    let mut args = vec![
        "deploy",
        archive_arg,
        "--config",
        config.to_str().unwrap(),
        "--env",
        "WORDCOUNT_NOTE=a=b",
        "--wait",
    ];
    args.extend(source_sets);
    let r = cli(&args).ok();
    assert!(r.stdout.contains("deployed wordcount"), "{r:#?}");
    assert!(r.stdout.contains(&hash[..12]), "{r:#?}");
    assert!(r.stderr.contains("all 5 processes running"), "{r:#?}");
    let detail = director.topology("wordcount");
    // Shown masked; the processes have it whole.
    assert_eq!(detail["env"], json!({"WORDCOUNT_NOTE": "***"}));
    let server_pid = detail["placement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == json!("topology"))
        .and_then(|p| p["pid"].as_u64())
        .expect("the server's pid");
    let environ = std::fs::read(format!("/proc/{server_pid}/environ")).unwrap();
    assert!(environ
        .split(|b| *b == 0)
        .any(|v| v == b"WORDCOUNT_NOTE=a=b"));
    let effective = detail["effective_config"].as_str().unwrap();
    assert!(
        effective.contains("generator") && effective.contains("max_pending = 256"),
        "{effective}"
    );
    let r = cli(&["deploy", archive_arg]);
    assert!(r.one_line_error().contains("already deployed"), "{r:#?}");

    // deploy --wait stops at a process that exits, naming it and why,
    // well before its 2 minutes.
    let (broken, _) = script_package(
        tmp.path(),
        "broken",
        "#!/bin/sh\necho 'broken on purpose' >&2\nexit 3\n",
        Some(WORDCOUNT_TOML),
    );
    let broken_path = tmp.path().join("broken.tar.gz");
    std::fs::write(&broken_path, &broken).unwrap();
    let started = Instant::now();
    let r = cli(&["deploy", broken_path.to_str().unwrap(), "--wait"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    let line = r.stderr.lines().last().unwrap_or_default();
    assert!(line.starts_with("error: broken: process `"), "{line}");
    assert!(line.contains("status 3") || line.contains("exit"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(60), "{line}");
    cli(&["kill", "broken"]).ok();

    // list, status.
    let r = cli(&["list"]).ok();
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with("wordcount"))
        .unwrap();
    assert!(row.contains("running") && row.contains("5/5"), "{row}");
    assert_eq!(
        cli(&["list", "--json"]).ok().json()[0]["name"],
        json!("wordcount")
    );
    wait_for("acked roots", WAIT, || {
        let t = director.topology("wordcount");
        (t["acked"].as_u64()? > 0 && t["tasks"]["output"]["messages_in"].as_u64()? > 0)
            .then_some(())
    });
    let r = cli(&["status", "wordcount"]).ok();
    assert!(r.stdout.starts_with("wordcount: running"), "{r:#?}");
    for task in ["split", "count", "output"] {
        assert!(
            r.stdout.lines().any(|l| l.starts_with(task)),
            "no {task}: {r:#?}"
        );
    }
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("server") && l.contains("running")),
        "{r:#?}"
    );
    let v = cli(&["status", "wordcount", "--json"]).ok().json();
    assert!(v["acked"].as_u64() > Some(0), "{v}");
    assert_eq!(v["workers"]["count"], json!(2));
    let r = cli(&["status", "nope"]);
    assert!(r.one_line_error().contains("no topology `nope`"), "{r:#?}");

    // logs.
    let r = cli(&["logs", "wordcount", "--stream", "stdout"]).ok();
    assert!(r.stdout.contains("listening on"), "{r:#?}");
    assert!(!r.stdout.contains("==>"), "one log, no header: {r:#?}");
    cli(&[
        "logs",
        "wordcount",
        "--task",
        "count",
        "--instance",
        "1",
        "--stream",
        "stderr",
    ])
    .ok();
    let r = cli(&["logs", "wordcount", "--all", "-n", "5"]).ok();
    for header in [
        "==> wordcount/server (stdout) <==",
        "==> wordcount/count/1 (stderr) <==",
        "==> wordcount/output/0 (stdout) <==",
    ] {
        assert!(r.stdout.contains(header), "no {header}: {r:#?}");
    }
    let v = cli(&["logs", "wordcount", "--json"]).ok().json();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    let r = cli(&["logs", "wordcount", "--task", "nope"]);
    assert!(r.one_line_error().contains("no task `nope`"), "{r:#?}");

    // logs --follow sees count/0 start again after a rebalance of count
    // (its instances get a new layout; the server and the other tasks run on).
    let count0 = [
        "logs",
        "wordcount",
        "--task",
        "count",
        "--instance",
        "0",
        "--stream",
        "stdout",
    ];
    let server_pid = |d: &Value| {
        d["placement"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == "wordcount/server"))
            .and_then(|p| p["pid"].as_u64())
    };
    let server_before = server_pid(&director.topology("wordcount"));
    assert!(
        server_before.is_some(),
        "the server runs before the rebalance"
    );
    let mut follow = Reaped(
        tempest(tmp.path())
            .args(count0)
            .arg("--follow")
            .env("TEMPEST_DIRECTOR", &url)
            // Logs are reads: the viewer token will do.
            .env("TEMPEST_ADMIN_TOKEN", &tokens.viewer)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let followed = lines_of(&mut follow.0);
    let started = |seen: &[String]| {
        seen.iter()
            .filter(|l| l.contains("metrics on http://"))
            .count()
    };
    let first = lines_until(&followed, WAIT, "the tail", |s| started(s) >= 1);
    let r = cli(&["rebalance", "wordcount", "--workers", "count=3"]).ok();
    assert!(r.stdout.contains("count×3"), "{r:#?}");
    wait_for("the rebalanced topology running", WAIT, || {
        all_running(&director.topology("wordcount"), 6)
    });
    // Lines received after the first tail: the old count/0's summary, then
    // the new one serving its metrics.
    let seen = lines_until(
        &followed,
        WAIT,
        "the restarted count/0 in the followed log",
        |s| started(s) >= 1,
    );
    assert!(seen.iter().all(|l| !l.starts_with("==>")), "{seen:#?}");
    assert_eq!(
        server_pid(&director.topology("wordcount")),
        server_before,
        "a rebalance of count leaves the topology server running"
    );
    // Nothing printed twice: what the follow printed is the log itself.
    let mut followed_all = first;
    followed_all.extend(seen);
    followed_all.extend(lines_for(&followed, Duration::from_millis(2500)));
    drop(follow);
    let full = cli(&count0).ok().stdout;
    let full: Vec<String> = full.lines().map(str::to_owned).collect();
    assert_eq!(followed_all, full);

    let full = cli(&["logs", "wordcount", "--stream", "stdout"])
        .ok()
        .stdout;
    let full: Vec<String> = full.lines().map(str::to_owned).collect();

    // A follow of the last line only: its first poll, which looks at more
    // lines, prints none of the older ones; nor in JSON lines, which
    // start with that first tail.
    assert!(full.len() >= 2, "{full:#?}");
    let last = full.last().unwrap().clone();
    for json in [false, true] {
        let mut args = vec![
            "logs",
            "wordcount",
            "--stream",
            "stdout",
            "--follow",
            "-n",
            "1",
        ];
        if json {
            args.push("--json");
        }
        let mut follow = Reaped(
            tempest(tmp.path())
                .args(&args)
                .env("TEMPEST_DIRECTOR", &url)
                .env("TEMPEST_ADMIN_TOKEN", &tokens.viewer)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let followed = lines_of(&mut follow.0);
        let seen = lines_for(&followed, Duration::from_millis(3500));
        drop(follow);
        if json {
            assert_eq!(seen.len(), 1, "{seen:#?}");
            let v: Value = serde_json::from_str(&seen[0]).unwrap();
            assert_eq!(
                v,
                json!({"id": "wordcount/server", "stream": "stdout", "lines": [last]})
            );
        } else {
            assert_eq!(seen, vec![last.clone()]);
        }
    }
    let r = cli(&["rebalance", "wordcount", "--workers", "nope=2"]);
    assert!(r.one_line_error().contains("unknown task `nope`"), "{r:#?}");

    // stop, start, kill.
    let r = cli(&["stop", "wordcount"]).ok();
    assert!(r.stdout.contains("stopping"), "{r:#?}");
    wait_for("the topology stopped", WAIT, || {
        (director.topology("wordcount")["phase"] == json!("stopped") && agent.running() == 0)
            .then_some(())
    });
    let r = cli(&["stop", "wordcount"]);
    assert!(r.one_line_error().contains("409"), "{r:#?}");
    cli(&["start", "wordcount"]).ok();
    wait_for("the topology running again", WAIT, || {
        all_running(&director.topology("wordcount"), 6)
    });
    let r = cli(&["kill", "wordcount"]).ok();
    assert!(r.stdout.contains("killed"), "{r:#?}");
    let r = cli(&["status", "wordcount"]);
    assert!(
        r.one_line_error().contains("no topology `wordcount`"),
        "{r:#?}"
    );
    wait_for("the killed topology's processes gone", WAIT, || {
        (agent.running() == 0).then_some(())
    });

    // The package stays stored.
    let r = cli(&["packages"]).ok();
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&hash[..12]))
        .unwrap();
    assert!(row.contains("wordcount") && row.contains("0.1.0"), "{row}");
    let v = cli(&["packages", "--json"]).ok().json();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|p| p["hash"] == json!(hash)),
        "{v}"
    );
}

/// A field of the `tempest dev` banner line starting with `label`: the
/// number after `pid `.
fn banner_pid(lines: &[String], label: &str) -> u32 {
    let line = lines
        .iter()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line: {lines:#?}"));
    line.split("pid ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

#[test]
fn dev_runs_word_count_on_a_local_cluster_and_stops_everything_on_ctrl_c() {
    for (package, bin) in [
        ("tempest-director", "tempest-director"),
        ("tempest-agent", "tempest-agent"),
        ("wordcount", "wordcount"),
    ] {
        cargo_bin(package, bin);
    }
    let tmp = tempdir("tempest-cli-dev");
    let root = tmp.path().canonicalize().unwrap();
    let err_log = root.join("dev.stderr");
    let mut dev = Reaped(
        tempest(&root)
            .args(["dev", "--no-build", "--port", "0", "--rate", "50"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = dev.0.id();
    let out = lines_of(&mut dev.0);
    let stderr = || std::fs::read_to_string(&err_log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lines = Vec::new();
    let url = loop {
        match out.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => {
                let url = l
                    .strip_prefix("dashboard: ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_owned);
                lines.push(l);
                if let Some(u) = url {
                    break u;
                }
            }
            Err(_) => {
                panic!("no dashboard URL: {lines:#?}\n{}", stderr());
            }
        }
    };
    let director_pid = banner_pid(&lines, "director");
    let agent_pid = banner_pid(&lines, "agent");
    let (addr, link) = url
        .trim_start_matches("http://")
        .split_once('/')
        .map(|(a, p)| (a.to_owned(), format!("/{p}")))
        .expect("the dashboard URL has a path");
    // The printed link logs a browser in once, as the admin, with no token
    // pasted; a second opening is refused.
    assert!(link.starts_with("/login?ticket="), "{url}");
    let opened = http::get(&addr, &link);
    assert_eq!(opened.status, 303, "{}", opened.head);
    let session = opened
        .head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
        .filter_map(|(_, v)| v.trim().split(';').next())
        .find(|c| c.starts_with("tempest_session="))
        .unwrap_or_else(|| panic!("a session cookie: {}", opened.head))
        .to_owned();
    let again = http::get(&addr, &link);
    assert_eq!(again.status, 401, "a login link works once: {}", again.head);
    let with_session = http::request(
        &addr,
        "GET",
        "/api/v1/cluster",
        &[("Cookie", &session)],
        b"",
    )
    .expect("a request with the session");
    assert_eq!(with_session.status, 200, "{}", with_session.body);
    // The dashboard needs the admin token `tempest dev` wrote, private.
    let admin_file = root.join(".tempest").join("admin.token");
    assert!(
        lines.iter().any(|l| l.contains(".tempest/admin.token")),
        "{lines:#?}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&admin_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    let admin = std::fs::read_to_string(&admin_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        http::get(&addr, "/api/v1/topologies/wordcount").status,
        401,
        "no reading without it"
    );
    let acked = |addr: &str| -> Option<u64> {
        let r = http::send(
            addr,
            "GET",
            "/api/v1/topologies/wordcount",
            Some(&admin),
            b"",
        );
        (r.status == 200)
            .then(|| r.json()["acked"].as_u64())
            .flatten()
    };
    wait_for(
        "word count acking sentences from its file source",
        Duration::from_secs(120),
        || acked(&addr).filter(|n| *n > 0),
    );
    let config: Value = http::send(
        &addr,
        "GET",
        "/api/v1/topologies/wordcount",
        Some(&admin),
        b"",
    )
    .json();
    assert!(
        config["effective_config"]
            .as_str()
            .unwrap()
            .contains("kind = \"file\""),
        "{config}"
    );

    // The tempest commands run in that directory find the dev cluster.
    let r = run(&root, &["list"]).ok();
    assert!(
        r.stdout.lines().any(|l| l.starts_with("wordcount")),
        "{r:#?}"
    );
    let r = run(&root, &["status", "wordcount", "--json"]).ok();
    assert!(r.json()["acked"].as_u64() > Some(0), "{r:#?}");
    // The feeder keeps the input growing, so the count keeps growing.
    let first = acked(&addr).unwrap_or(0);
    wait_for("acked growing", Duration::from_secs(60), || {
        acked(&addr).filter(|n| *n > first)
    });

    // Ctrl-C: everything stops, dev exits 0.
    let agent_dir = root.join(".tempest").join("agent");
    assert!(
        !marked_processes(&agent_dir).is_empty(),
        "the agent runs word count"
    );
    signal(pid, libc::SIGINT);
    let status = wait_for("tempest dev to exit", Duration::from_secs(90), || {
        dev.0.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status:?}\n{}", stderr());
    assert!(stderr().contains("tempest dev: stopped"), "{}", stderr());
    assert!(!stderr().contains("panicked"), "{}", stderr());
    assert!(!alive(director_pid), "the director is still running");
    assert!(!alive(agent_pid), "the agent is still running");
    assert_eq!(
        marked_processes(&agent_dir),
        Vec::<u32>::new(),
        "word count processes remain"
    );
    assert!(!Path::new(&root.join(".tempest").join("Cluster.toml")).exists());
    assert!(!admin_file.exists(), "its tokens go with it");
}
