//! The `tempest` binary's quick behaviours, run as a user runs it: usage
//! errors, completions, `cluster init` (read back by the daemons' own
//! parsers) and the daemons started with its file, where the director and
//! token come from, one-line errors, and `package` refusing a bad
//! `Topology.toml` before it builds anything.

#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{run, tempest};
use tempest_testkit::cluster::{cargo_bin, free_addr, port_range, signal, tempdir, wait_for, WAIT};
use tempest_testkit::http;

#[test]
fn wrong_arguments_get_clap_usage_errors() {
    let dir = tempdir("tempest-cli-usage");
    for args in [
        &[][..],
        &["frobnicate"],
        &["new"],
        &["rebalance", "wc"],
        &["rebalance", "wc", "--workers", "count"],
        &["rebalance", "wc", "--workers", "count=0"],
        &["rebalance", "wc", "--workers", ".count=1"],
        &["new", "x", "--source", "pulsar"],
        &["logs", "wc", "--instance", "1"],
        &["completions", "tcsh"],
    ] {
        let r = run(dir.path(), args);
        assert_eq!(r.code, Some(2), "{args:?}: {r:#?}");
        assert!(
            r.stderr.contains("Usage:")
                || (r.stderr.starts_with("error: ") && r.stderr.contains("try '--help'")),
            "{args:?}: {r:#?}"
        );
        assert!(!r.stderr.contains("panicked"), "{r:#?}");
    }
    let r = run(dir.path(), &["--help"]).ok();
    for cmd in [
        "new",
        "generate",
        "package",
        "deploy",
        "list",
        "status",
        "stop",
        "start",
        "kill",
        "rebalance",
        "logs",
        "agents",
        "packages",
        "cluster",
        "director",
        "agent",
        "dev",
        "completions",
    ] {
        assert!(
            r.stdout.lines().any(|l| l.trim_start().starts_with(cmd)),
            "no {cmd} in the help: {}",
            r.stdout
        );
    }
}

#[test]
fn completions_are_printed_for_every_shell() {
    let dir = tempdir("tempest-cli-completions");
    for shell in ["bash", "zsh", "fish"] {
        let r = run(dir.path(), &["completions", shell]).ok();
        assert!(r.stdout.len() > 500, "{shell}: {}", r.stdout);
        for word in ["tempest", "deploy", "rebalance", "director", "follow"] {
            assert!(r.stdout.contains(word), "{shell}: no {word}");
        }
    }
}

#[test]
fn an_unreachable_director_is_one_line_naming_it_and_where_it_came_from() {
    let dir = tempdir("tempest-cli-unreachable");
    let dead = free_addr();
    let r = run(dir.path(), &["list", "--director", &dead]);
    let line = r.one_line_error();
    assert!(
        line.contains(&format!(
            "cannot reach the director at http://{dead} (from the command line)"
        )),
        "{line}"
    );
    assert!(line.to_lowercase().contains("refused"), "{line}");

    // The environment, then Cluster.toml, then the default.
    let dead2 = free_addr();
    let r: common::Run = tempest(dir.path())
        .args(["status", "wordcount"])
        .env("TEMPEST_DIRECTOR", format!("http://{dead2}/"))
        .output()
        .unwrap()
        .into();
    assert!(
        r.one_line_error()
            .contains(&format!("http://{dead2} (from TEMPEST_DIRECTOR)")),
        "{r:#?}"
    );
    let dead3 = free_addr();
    std::fs::write(
        dir.path().join("Cluster.toml"),
        format!("[director]\nlisten = \"{dead3}\"\n"),
    )
    .unwrap();
    let r = run(dir.path(), &["agents"]);
    assert!(
        r.one_line_error()
            .contains(&format!("http://{dead3} (from Cluster.toml)")),
        "{r:#?}"
    );
    let r = run(
        dir.path(),
        &["kill", "x", "--director", "ftp://example.invalid"],
    );
    assert!(r.one_line_error().contains("http:// or https://"), "{r:#?}");
    // An https director needs the cluster CA to be checked against.
    let r = run(
        dir.path(),
        &["kill", "x", "--director", "https://example.invalid"],
    );
    let line = r.one_line_error();
    assert!(
        line.contains("--ca") && line.contains("TEMPEST_CA"),
        "{line}"
    );
    std::fs::write(dir.path().join("Cluster.toml"), "[director\n").unwrap();
    let r = run(dir.path(), &["list"]);
    assert!(r.one_line_error().contains("Cluster.toml"), "{r:#?}");
}

#[test]
fn cluster_init_writes_a_file_both_daemons_accept_and_never_overwrites_it() {
    let dir = tempdir("tempest-cli-init");
    let r = run(dir.path(), &["cluster", "init"]).ok();
    assert!(r.stdout.contains("wrote Cluster.toml"), "{r:#?}");
    let path = dir.path().join("Cluster.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let director = tempest_director::config::parse_cluster_toml(&text, &path)
        .unwrap_or_else(|e| panic!("the director refuses it: {e}\n{text}"));
    let agent = tempest_agent::config::load(&path)
        .unwrap_or_else(|e| panic!("the agent refuses it: {e}\n{text}"));
    // Three new tokens, each in its own private file beside it.
    let mut tokens = Vec::new();
    for name in ["admin.token", "viewer.token", "agent.token"] {
        let file = dir.path().join(name);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}: {mode:o}");
        let t = std::fs::read_to_string(&file).unwrap().trim().to_owned();
        assert_eq!(t.len(), 64, "{name}: {t}");
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()), "{t}");
        assert!(!text.contains(&t), "{name}'s token is not in Cluster.toml");
        tokens.push(t);
    }
    assert!(tokens[0] != tokens[1] && tokens[1] != tokens[2] && tokens[0] != tokens[2]);
    let exposed = |s: &Option<tempest_control::Secret>| s.as_ref().map(|t| t.expose().to_owned());
    assert_eq!(exposed(&director.admin_token), Some(tokens[0].clone()));
    assert_eq!(exposed(&director.viewer_token), Some(tokens[1].clone()));
    assert_eq!(exposed(&director.agent_token), Some(tokens[2].clone()));
    assert_eq!(
        exposed(&agent.token),
        Some(tokens[2].clone()),
        "the agent token"
    );
    assert!(director.warnings.is_empty(), "{:?}", director.warnings);
    assert_eq!(agent.director.as_deref(), Some("https://127.0.0.1:7300"));
    // A cluster CA and certificates for both daemons, keys private, each
    // daemon pointed at its own.
    for name in [
        "ca.crt",
        "ca.key",
        "director.crt",
        "director.key",
        "agent.crt",
        "agent.key",
    ] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
    }
    let tls = director.tls.as_ref().expect("the director's TLS files");
    assert_eq!(tls.cert, dir.path().join("director.crt"));
    assert_eq!(tls.ca, dir.path().join("ca.crt"));
    assert_eq!(director.tls_ca_key, Some(dir.path().join("ca.key")));
    let tls = agent.tls.as_ref().expect("the agent's TLS files");
    assert_eq!(tls.cert, dir.path().join("agent.crt"));
    assert_eq!(tls.key, dir.path().join("agent.key"));
    tls.load().expect("the agent's files load");
    assert!(
        text.lines().filter(|l| l.starts_with('#')).count() > 50,
        "commented"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "private: {mode:o}");

    let r = run(dir.path(), &["cluster", "init"]);
    assert!(r.one_line_error().contains("not overwritten"), "{r:#?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim(),
        tokens[0]
    );

    std::fs::create_dir(dir.path().join("second")).unwrap();
    let r = run(
        dir.path(),
        &[
            "cluster",
            "init",
            "--output",
            "second/other.toml",
            "--no-token",
            "--no-tls",
        ],
    )
    .ok();
    assert!(r.stdout.contains("without tokens"), "{r:#?}");
    let other = dir.path().join("second/other.toml");
    let a = tempest_agent::config::load(&other).unwrap();
    assert!(a.tls.is_none());
    assert_eq!(a.director.as_deref(), Some("http://127.0.0.1:7300"));
    let d = tempest_director::config::parse_cluster_toml(
        &std::fs::read_to_string(&other).unwrap(),
        &other,
    )
    .unwrap();
    assert!(!d.has_credentials());
    // An admin token of one's own, from a file.
    std::fs::create_dir(dir.path().join("third")).unwrap();
    let given = dir.path().join("given.token");
    std::fs::write(&given, "given-admin-token\n").unwrap();
    let r = run(
        dir.path(),
        &[
            "cluster",
            "init",
            "-o",
            "third/Cluster.toml",
            "--token-file",
            given.to_str().unwrap(),
        ],
    )
    .ok();
    assert!(r.stdout.contains("third/Cluster.toml"), "{r:#?}");
    let third = dir.path().join("third/Cluster.toml");
    let d = tempest_director::config::parse_cluster_toml(
        &std::fs::read_to_string(&third).unwrap(),
        &third,
    )
    .unwrap();
    assert_eq!(
        exposed(&d.admin_token).as_deref(),
        Some("given-admin-token")
    );
    let a = tempest_agent::config::load(&third).unwrap();
    assert_ne!(exposed(&a.token).as_deref(), Some("given-admin-token"));
}

/// `GET url+path` over TLS checked against `ca`, showing `identity`
/// (certificate and key files) when given: the status and body, or the
/// error (a refused handshake) as text.
fn tls_get(
    url: &str,
    path: &str,
    ca: &Path,
    identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    use tempest_control::tls::{client_verifying, TlsFiles};
    let config = match identity {
        Some((cert, key)) => TlsFiles {
            cert,
            key,
            ca: ca.to_path_buf(),
        }
        .load()
        .and_then(|id| id.client_config()),
        None => client_verifying(ca),
    }
    .map_err(|e| e.to_string())?;
    let client = reqwest::blocking::Client::builder()
        .use_preconfigured_tls(config)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = client.get(format!("{url}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().map_err(|e| {
        let mut s = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            source = inner.source();
        }
        s
    })?;
    let status = res.status().as_u16();
    Ok((status, res.text().unwrap_or_default()))
}

/// A daemon started through `tempest director|agent`; killed when dropped.
struct Started {
    child: Child,
    addr: String,
}

impl Drop for Started {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let _ = wait_for("the daemon to stop", WAIT, || {
            self.child.try_wait().ok().flatten()
        });
    }
}

/// (`RUST_LOG`, which the agent's processes inherit, is `log`.)
fn start_through_cli(dir: &Path, which: &str, log: &str) -> Started {
    let mut child = tempest(dir)
        .arg(which)
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on https://").nth(1) {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("tempest {which} did not print its address"));
    Started { child, addr }
}

#[test]
fn director_and_agent_start_with_the_cluster_toml_of_cluster_init() {
    cargo_bin("tempest-director", "tempest-director");
    cargo_bin("tempest-agent", "tempest-agent");
    let dir = tempdir("tempest-cli-daemons");
    run(dir.path(), &["cluster", "init"]).ok();
    let path = dir.path().join("Cluster.toml");
    let listen = free_addr();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "listen = \"127.0.0.1:7300\"",
            &format!("listen = \"{listen}\""),
        )
        .replace(
            "director = \"https://127.0.0.1:7300\"",
            &format!("director = \"https://{listen}\""),
        )
        .replace("listen = \"127.0.0.1:7400\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "port_range = \"7500-7599\"",
            &format!("port_range = \"{}\"", port_range(10)),
        )
        .replace(
            "heartbeat_interval = \"1s\"",
            "heartbeat_interval = \"100ms\"",
        );
    std::fs::write(&path, &text).unwrap();

    // The daemon's own --help passes through.
    let r = run(dir.path(), &["director", "--help"]).ok();
    assert!(r.stdout.contains("--data-dir"), "{r:#?}");

    let director = start_through_cli(dir.path(), "director", "warn");
    assert_eq!(director.addr, listen);
    assert!(dir.path().join("tempest-director-data").is_dir());
    // Its processes say whether their data plane is TLS.
    let agent = start_through_cli(
        dir.path(),
        "agent",
        "warn,tempest_topology::server=info,tempest_task::worker=info",
    );
    let file = |name: &str| dir.path().join(name);
    let admin = std::fs::read_to_string(file("admin.token")).unwrap();
    let admin = admin.trim();
    let agent_token = std::fs::read_to_string(file("agent.token")).unwrap();
    let agent_token = agent_token.trim();
    let director_url = format!("https://{}", director.addr);
    let agent_url = format!("https://{}", agent.addr);
    let ca = file("ca.crt");
    let as_director = Some((file("director.crt"), file("director.key")));
    let as_agent = Some((file("agent.crt"), file("agent.key")));
    // The director serves HTTPS only: plain HTTP gets no answer.
    assert!(
        http::try_send(&director.addr, "GET", "/api/v1/health", None, b"").is_err()
            || http::try_send(&director.addr, "GET", "/api/v1/health", None, b"")
                .is_ok_and(|r| r.status == 400),
        "plain HTTP is not served"
    );
    assert_eq!(
        tls_get(&director_url, "/api/v1/agents", &ca, None, None)
            .unwrap()
            .0,
        401,
        "reads need a token"
    );
    // The agent's heartbeats carry the agent token of its file and its
    // certificate: the director, which needs both, lists the agent as up.
    wait_for("the agent up at the director", WAIT, || {
        let (_, body) = tls_get(&director_url, "/api/v1/agents", &ca, None, Some(admin)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v.as_array()?
            .iter()
            .any(|a| a["up"] == true && a["address"] == agent.addr.as_str()))
        .then_some(())
    });
    // The agent token alone, without the agents' certificate, is refused.
    let (status, body) = tls_get(
        &director_url,
        "/api/v1/packages",
        &ca,
        None,
        Some(agent_token),
    )
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("mutual TLS"), "{body}");
    let (status, body) = tls_get(
        &director_url,
        "/api/v1/packages",
        &ca,
        as_agent.clone(),
        Some(agent_token),
    )
    .unwrap();
    assert_eq!(status, 403, "an agent cannot list packages: {body}");
    assert!(
        !body.contains("mutual TLS"),
        "the certificate was taken: {body}"
    );
    // The agent's API takes only clients with a certificate of the
    // cluster (the director's), and then still needs the token.
    let e = tls_get(
        &agent_url,
        "/api/v1/processes",
        &ca,
        None,
        Some(agent_token),
    )
    .unwrap_err();
    assert!(!e.is_empty());
    let (status, _) = tls_get(
        &agent_url,
        "/api/v1/processes",
        &ca,
        as_director.clone(),
        None,
    )
    .unwrap();
    assert_eq!(status, 401);
    let (status, _) = tls_get(
        &agent_url,
        "/api/v1/processes",
        &ca,
        as_director.clone(),
        Some(agent_token),
    )
    .unwrap();
    assert_eq!(status, 200);
    // The web UI's session cookie is Secure under TLS.
    let browser = reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tempest_control::tls::client_verifying(&ca).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = browser
        .post(format!("{director_url}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={admin}&next=%2F"))
        .send()
        .unwrap();
    assert_eq!(res.status().as_u16(), 303);
    let cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("tempest_session="))
        .unwrap_or_default()
        .to_owned();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Another cluster's CA and certificates are refused both ways.
    let stranger = tempdir("tempest-cli-stranger");
    run(stranger.path(), &["cluster", "init"]).ok();
    let theirs = |n: &str| stranger.path().join(n);
    let e = tls_get(
        &agent_url,
        "/api/v1/processes",
        &ca,
        Some((theirs("director.crt"), theirs("director.key"))),
        Some(agent_token),
    )
    .unwrap_err();
    assert!(!e.is_empty());
    let e = tls_get(
        &director_url,
        "/api/v1/health",
        &theirs("ca.crt"),
        None,
        None,
    )
    .unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    // And the CLI finds the director and the token in the same file.
    let r = run(dir.path(), &["agents", "--json"]).ok();
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{r:#?}");
    let r = run(dir.path(), &["kill", "nope"]);
    let line = r.one_line_error();
    assert!(
        line.contains("no topology `nope`"),
        "the token was accepted: {line}"
    );
    std::fs::write(dir.path().join("wrong.token"), "wrong").unwrap();
    let r = run(dir.path(), &["kill", "nope", "--token-file", "wrong.token"]);
    let line = r.one_line_error();
    assert!(
        line.contains("refused the token (from the command line)"),
        "{line}"
    );

    // A deployment gets its own data-plane certificate from the cluster
    // CA: its processes hold it (files only they and the agent can read)
    // and no token, and its links are TLS end to end.
    let (archive, _) = tempest_testkit::cluster::wordcount_package(
        dir.path(),
        tempest_testkit::cluster::WORDCOUNT_TOML,
    );
    std::fs::write(file("wordcount.tar.gz"), &archive).unwrap();
    let r = run(
        dir.path(),
        &[
            "deploy",
            "wordcount.tar.gz",
            "--set",
            "source.kind=generator",
            "--set",
            "source.config.count=100000000",
            "--set",
            "source.config.rate=2000.0",
            "--wait",
        ],
    )
    .ok();
    assert!(r.stderr.contains("all 5 processes running"), "{r:#?}");
    let detail = |path: &str| -> serde_json::Value {
        let (status, body) = tls_get(&director_url, path, &ca, None, Some(admin)).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    wait_for("every root acked over TLS", WAIT, || {
        let t = detail("/api/v1/topologies/wordcount");
        (t["acked"].as_u64()? >= 1000 && t["tasks"]["output"]["messages_in"].as_u64()? > 0)
            .then_some(())
    });
    let t = detail("/api/v1/topologies/wordcount");
    let pids: Vec<u64> = t["placement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 5, "{t}");
    for pid in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        for var in [
            "TEMPEST_DATA_TLS_CERT",
            "TEMPEST_DATA_TLS_KEY",
            "TEMPEST_DATA_TLS_CA",
        ] {
            let path = vars
                .iter()
                .find_map(|v| v.strip_prefix(&format!("{var}=")))
                .unwrap_or_else(|| panic!("process {pid} has no {var}"));
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{path}: {mode:o}");
        }
        assert!(
            !vars.iter().any(|v| v.contains("_TOKEN=")),
            "process {pid} holds a token"
        );
    }
    let mut tls_lines = 0;
    let logs = dir.path().join("tempest-agent-data/logs");
    for entry in std::fs::read_dir(&logs).unwrap() {
        let log =
            std::fs::read_to_string(entry.unwrap().path().join("stderr.log")).unwrap_or_default();
        assert!(!log.contains("data plane: plain text"), "{log}");
        tls_lines += log.matches("data plane: TLS").count();
    }
    assert_eq!(tls_lines, 5, "the server and its four workers say TLS");
}

#[test]
fn a_missing_daemon_binary_is_one_line() {
    let dir = tempdir("tempest-cli-nobin");
    let lonely = dir.path().join("tempest");
    std::fs::copy(common::tempest_bin(), &lonely).unwrap();
    // Another test's fork may still hold the copy open for writing for an
    // instant (ETXTBSY): retry within a bound.
    let r: common::Run =
        wait_for(
            "running the copied binary",
            WAIT,
            || match std::process::Command::new(&lonely)
                .arg("director")
                .current_dir(dir.path())
                .env("PATH", dir.path().join("nothing-here"))
                .output()
            {
                Ok(o) => Some(o),
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
                Err(e) => panic!("running {}: {e}", lonely.display()),
            },
        )
        .into();
    let line = r.one_line_error();
    assert!(line.contains("cannot find tempest-director"), "{line}");
}

#[test]
fn package_refuses_a_bad_topology_toml_before_building() {
    let dir = tempdir("tempest-cli-badtoml");
    run(dir.path(), &["new", "bad"]).ok();
    let krate = dir.path().join("bad");
    std::fs::write(
        krate.join("Topology.toml"),
        "version = 1\nmax_pendin = 3\n\n[failure]\npolicy = \"sometimes\"\n",
    )
    .unwrap();
    let r = run(&krate, &["package", "--debug"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("error: Topology.toml:2:1: key `max_pendin`")),
        "{r:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("error: Topology.toml:5:") && l.contains("key `failure.policy`")),
        "{r:#?}"
    );
    assert!(
        lines.last().unwrap().contains("nothing was built"),
        "{r:#?}"
    );
    assert!(
        !r.stderr.contains("building") && !r.stderr.contains("Compiling"),
        "{r:#?}"
    );
    assert!(!krate.join("target").exists(), "nothing was built");

    // Outside a crate, and a crate that is not there.
    let r = run(dir.path(), &["package"]);
    assert!(r.one_line_error().contains("has no Cargo.toml"), "{r:#?}");
    let r = run(dir.path(), &["generate", "task", "enrich"]);
    assert!(
        r.one_line_error().contains("not a topology crate"),
        "{r:#?}"
    );
}

#[test]
fn new_refuses_to_overwrite_and_bad_names() {
    let dir = tempdir("tempest-cli-new");
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    std::fs::write(dir.path().join("taken").join("keep.txt"), "mine").unwrap();
    let r = run(dir.path(), &["new", "taken"]);
    assert!(
        r.one_line_error().contains("exists and is not empty"),
        "{r:#?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("taken")).unwrap().count(),
        1,
        "nothing written"
    );
    for bad in ["2fast", "tempest", "a/b", "fn"] {
        let r = run(dir.path(), &["new", bad]);
        r.one_line_error();
    }
    // An empty directory is fine, and generate refuses what exists.
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    run(
        dir.path(),
        &["new", "fine", "--path", "empty", "--source", "redis"],
    )
    .ok();
    let krate = dir.path().join("empty");
    let cargo: toml::Table = std::fs::read_to_string(krate.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cargo["package"]["name"].as_str(), Some("fine"));
    assert!(cargo["dependencies"]["tempest-connectors"].is_table());
    assert!(
        krate.join("Cargo.lock").is_file(),
        "the checkout's lock file"
    );
    run(&krate, &["generate", "task", "enrich"]).ok();
    let r = run(&krate, &["generate", "task", "enrich"]);
    assert!(r.one_line_error().contains("not overwritten"), "{r:#?}");
    run(&krate, &["generate", "source", "ticks"]).ok();
    let r = run(&krate, &["generate", "source", "ticks"]);
    assert!(r.one_line_error().contains("not overwritten"), "{r:#?}");
    let r = run(&krate, &["generate", "task", "split2", "--after", "nope"]);
    assert!(r.one_line_error().contains("no task `nope`"), "{r:#?}");
    let r = run(&krate, &["generate", "task", "Bad-Name"]);
    r.one_line_error();
}

#[test]
fn a_server_that_is_not_a_director_is_named_as_such() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let body = "<html>nothing here</html>";
        let _ = write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let dir = tempdir("tempest-cli-notdirector");
    let r = run(dir.path(), &["status", "wordcount", "--director", &addr]);
    let line = r.one_line_error();
    assert!(line.contains("is it a Tempest director?"), "{line}");
    assert!(!line.contains("no topology"), "{line}");
    server.join().unwrap();
}

/// A fake director on loopback: answers every request with `answer(request
/// line)` (a status and a JSON body) and records each request's line and
/// headers, lower-cased.
fn fake_director(
    answer: impl Fn(&str) -> (u16, String) + Send + 'static,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then as much body as it announces.
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).to_lowercase();
            let head_len = text.find("\r\n\r\n").map_or(text.len(), |i| i + 4);
            let body_len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut have = req.len() - head_len.min(req.len());
            while have < body_len {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => have += n,
                }
            }
            let head = text[..head_len.min(text.len())].to_owned();
            let line = head.lines().next().unwrap_or("").to_owned();
            record.lock().unwrap().push(head);
            let (status, body) = answer(&line);
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, seen)
}

#[test]
fn a_cluster_toml_token_never_goes_to_a_director_named_elsewhere() {
    let dir = tempdir("tempest-cli-tokenleak");
    let secret = "token-of-the-file-cluster";
    std::fs::write(
        dir.path().join("Cluster.toml"),
        format!("[director]\nlisten = \"127.0.0.1:1\"\ntoken = \"{secret}\"\n"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join(".tempest")).unwrap();
    std::fs::write(
        dir.path().join(".tempest").join("Cluster.toml"),
        format!("[director]\nlisten = \"127.0.0.1:1\"\ntoken = \"{secret}-dev\"\n"),
    )
    .unwrap();
    let (addr, seen) = fake_director(|_| (404, r#"{"error":"no such topology"}"#.into()));

    // --director, then TEMPEST_DIRECTOR: the file's token stays home.
    let r = run(
        dir.path(),
        &["stop", "x", "--director", &format!("http://{addr}")],
    );
    assert!(r.one_line_error().contains("no topology `x`"), "{r:#?}");
    let r: common::Run = tempest(dir.path())
        .args(["stop", "x"])
        .env("TEMPEST_DIRECTOR", &addr)
        .output()
        .unwrap()
        .into();
    assert!(r.one_line_error().contains("no topology `x`"), "{r:#?}");
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for head in &requests {
        assert!(head.starts_with("post /api/v1/topologies/x/stop"), "{head}");
        assert!(!head.contains(secret), "the file's token leaked: {head}");
        assert!(!head.contains("authorization"), "{head}");
    }

    // A token given with the director goes to it.
    std::fs::write(dir.path().join("given.token"), "given\n").unwrap();
    let r = run(
        dir.path(),
        &[
            "stop",
            "x",
            "--director",
            &addr,
            "--token-file",
            "given.token",
        ],
    );
    r.one_line_error();
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.contains("authorization: bearer given"), "{last}");
}

#[test]
fn deploy_checks_the_name_before_building_anything() {
    let dir = tempdir("tempest-cli-deployname");
    run(dir.path(), &["new", "demo"]).ok();
    let krate = dir.path().join("demo");
    // A director where `demo` is already deployed.
    let (addr, seen) = fake_director(|line| {
        if line.starts_with("get /api/v1/health") {
            (200, "{}".into())
        } else if line.starts_with("post /api/v1/topologies ") {
            (400, r#"{"error":"no name"}"#.into())
        } else if line.starts_with("get /api/v1/topologies/demo ") {
            (200, r#"{"name":"demo"}"#.into())
        } else {
            (500, r#"{"error":"unexpected"}"#.into())
        }
    });
    let r = run(&krate, &["deploy", "--director", &addr]);
    assert!(
        r.one_line_error().contains("`demo` is already deployed"),
        "{r:#?}"
    );
    assert!(!krate.join("target").exists(), "nothing was built");
    assert!(
        !seen
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.starts_with("post /api/v1/packages")),
        "nothing was uploaded"
    );

    // The director's name rule, before anything is asked of it.
    let before = seen.lock().unwrap().len();
    for bad in [".hidden", &"x".repeat(65), "a/b"] {
        let r = run(&krate, &["deploy", "--director", &addr, "--name", bad]);
        assert!(
            r.one_line_error().contains("bad topology name"),
            "{bad}: {r:#?}"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), before, "the director was asked");
    assert!(!krate.join("target").exists(), "nothing was built");
}
