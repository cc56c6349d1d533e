//! The director as an attacker on the network meets it: a real
//! `tempest-director` process with the admin, viewer and agent tokens.
//!
//! - every route but the health check refuses an anonymous request (401);
//! - a DNS-rebinding-shaped request (another site's name in `Host` and
//!   `Origin`) is refused, and changes nothing;
//! - the viewer token reads but changes nothing; the agent token neither
//!   uploads nor deploys;
//! - repeated wrong tokens from one address are answered 429;
//! - its data directory and everything in it are its owner's alone;
//! - it refuses to listen beyond loopback without credentials.

#![cfg(target_os = "linux")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;
use tempest_testkit::cluster::{cargo_bin, script_package, tempdir, DirectorProcess, Tokens};
use tempest_testkit::http::request;

/// One task of one worker.
const TOML_SLEEPER: &str = "[tasks.t]\nworkers = 1\n";

/// Every route of the API (a sample of each path template) and of the web
/// UI, with its method.
fn routes(hash: &str) -> Vec<(&'static str, String)> {
    let mut r: Vec<(&'static str, String)> = [
        ("GET", "/api/v1/packages"),
        ("POST", "/api/v1/packages"),
        ("POST", "/api/v1/agents/heartbeat"),
        ("GET", "/api/v1/agents"),
        ("GET", "/api/v1/topologies"),
        ("POST", "/api/v1/topologies"),
        ("GET", "/api/v1/topologies/wc"),
        ("POST", "/api/v1/topologies/wc/stop"),
        ("POST", "/api/v1/topologies/wc/start"),
        ("POST", "/api/v1/topologies/wc/kill"),
        ("POST", "/api/v1/topologies/wc/rebalance"),
        ("GET", "/api/v1/topologies/wc/samples"),
        ("GET", "/api/v1/topologies/wc/processes/server/logs"),
        ("GET", "/api/v1/cluster"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/nothing-here"),
        ("GET", "/"),
        ("GET", "/agents"),
        ("GET", "/topologies"),
        ("GET", "/topologies/wc"),
        ("GET", "/topologies/wc/processes/server/log"),
        ("POST", "/topologies/wc/stop"),
        ("POST", "/topologies/wc/start"),
        ("POST", "/topologies/wc/kill"),
        ("POST", "/topologies/wc/rebalance"),
        ("GET", "/packages"),
        ("POST", "/packages/upload"),
        ("POST", "/packages/deploy"),
    ]
    .into_iter()
    .map(|(m, p)| (m, p.to_owned()))
    .collect();
    r.push(("GET", format!("/api/v1/packages/{hash}/archive")));
    r
}

fn call(
    d: &DirectorProcess,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> tempest_testkit::http::Response {
    request(&d.addr, method, path, headers, b"").unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A director with word count's stand-in deployed as `wc`.
fn deployed(dir: &Path, tokens: &Tokens) -> (DirectorProcess, String) {
    let d = DirectorProcess::start_secured(&dir.join("director"), "127.0.0.1:0", &[], tokens);
    let (archive, hash) = script_package(
        dir,
        "wordcount",
        "#!/bin/sh\nexec sleep 600\n",
        Some(TOML_SLEEPER),
    );
    d.upload(Some(&tokens.admin), &archive);
    let body = json!({"name": "wc", "package": hash, "env": {"DB_PASSWORD": "hunter2-secret"}});
    let r = d.post(
        "/api/v1/topologies",
        Some(&tokens.admin),
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    (d, hash)
}

#[test]
fn every_route_but_health_needs_a_credential() {
    let tmp = tempdir("tempest-director-security");
    let tokens = Tokens::new("security");
    let (d, hash) = deployed(tmp.path(), &tokens);
    let r = call(&d, "GET", "/api/v1/health", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    for (method, path) in routes(&hash) {
        let r = call(&d, method, &path, &[]);
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        assert!(!r.body.contains("hunter2"), "{method} {path}: {}", r.body);
        assert!(!r.body.contains(&hash), "{method} {path} shows nothing");
    }
    // With the admin token every read answers, env values masked.
    let admin = format!("Bearer {}", tokens.admin);
    let r = call(
        &d,
        "GET",
        "/api/v1/topologies/wc",
        &[("Authorization", &admin)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["env"]["DB_PASSWORD"], json!("***"));
    assert!(!r.body.contains("hunter2"));
}

#[test]
fn each_token_does_what_its_role_allows() {
    let tmp = tempdir("tempest-director-security");
    let tokens = Tokens::new("roles");
    let (d, hash) = deployed(tmp.path(), &tokens);
    let (archive, _) = script_package(
        tmp.path(),
        "other",
        "#!/bin/sh\nexec sleep 601\n",
        Some(TOML_SLEEPER),
    );
    let deploy = json!({"name": "wc2", "package": hash}).to_string();

    // The viewer reads everything (env masked) and changes nothing.
    let viewer = Some(tokens.viewer.as_str());
    for path in [
        "/api/v1/topologies/wc",
        "/api/v1/agents",
        "/",
        "/topologies/wc",
    ] {
        let r = d.get_as(path, viewer);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert!(!r.body.contains("hunter2"), "{path}");
    }
    assert_eq!(
        d.get_as(&format!("/api/v1/packages/{hash}/archive"), viewer)
            .status,
        403,
        "archives go to agents and admins only"
    );
    for (path, body) in [
        ("/api/v1/packages", archive.as_slice()),
        ("/api/v1/topologies", deploy.as_bytes()),
        ("/api/v1/topologies/wc/stop", b"".as_slice()),
        ("/api/v1/topologies/wc/kill", b""),
        ("/api/v1/agents/heartbeat", b"{}"),
    ] {
        let r = d.post(path, viewer, body);
        assert_eq!(r.status, 403, "viewer {path}: {}", r.body);
    }

    // The agent token heartbeats and downloads, and does nothing else.
    let agent = Some(tokens.agent.as_str());
    let r = d.get_as(&format!("/api/v1/packages/{hash}/archive"), agent);
    assert_eq!(r.status, 200);
    let beat = json!({"agent_id": "a", "address": "127.0.0.1:1", "node": {
        "hostname": "h", "agent_version": "0", "cores": 1, "memory_total": 1,
        "memory_available": 1, "load": [0.0, 0.0, 0.0], "disk_free": 1}, "processes": []});
    let r = d.post(
        "/api/v1/agents/heartbeat",
        agent,
        beat.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Its assignment carries the deployment's data-plane secret.
    assert_eq!(
        r.json()["processes"][0]["data_secret"]
            .as_str()
            .map(str::len),
        Some(64)
    );
    for (path, body) in [
        ("/api/v1/packages", archive.as_slice()),
        ("/api/v1/topologies", deploy.as_bytes()),
        ("/api/v1/topologies/wc/stop", b"".as_slice()),
    ] {
        let r = d.post(path, agent, body);
        assert_eq!(r.status, 403, "agent {path}: {}", r.body);
    }
    for path in ["/api/v1/topologies/wc", "/api/v1/topologies", "/"] {
        assert_eq!(d.get_as(path, agent).status, 403, "agent reads {path}");
    }

    // Nothing changed.
    let r = d.get("/api/v1/topologies");
    assert_eq!(r.json().as_array().unwrap().len(), 1, "{}", r.body);
    assert_eq!(r.json()[0]["state"], json!("running"));
    assert_eq!(
        d.get("/api/v1/packages").json().as_array().unwrap().len(),
        1
    );
}

#[test]
fn a_rebound_name_is_refused_and_wrong_tokens_are_limited() {
    let tmp = tempdir("tempest-director-security");
    let tokens = Tokens::new("rebinding");
    let (d, hash) = deployed(tmp.path(), &tokens);
    let admin = format!("Bearer {}", tokens.admin);
    // A page of attacker.example, its name re-bound to the director's
    // address: the browser sends attacker.example as Host and Origin, so
    // the request looks same-origin. With or without the admin's token.
    let deploy = json!({"name": "evil", "package": hash}).to_string();
    for auth in [None, Some(admin.as_str())] {
        let mut headers = vec![
            ("Host", "attacker.example"),
            ("Origin", "http://attacker.example"),
            ("Content-Type", "application/json"),
        ];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let r = request(
            &d.addr,
            "POST",
            "/api/v1/topologies",
            &headers,
            deploy.as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 421, "{}", r.body);
        let r = request(&d.addr, "GET", "/api/v1/topologies/wc", &headers, b"").unwrap();
        assert_eq!(r.status, 421, "{}", r.body);
    }
    assert_eq!(
        d.get("/api/v1/topologies").json().as_array().unwrap().len(),
        1
    );

    // Ten wrong tokens from this address, then 429 with Retry-After, even
    // for the right one.
    for i in 0..10 {
        let r = d.get_as("/api/v1/cluster", Some(&format!("wrong-{i}")));
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = d.get_as("/api/v1/cluster", Some(&format!("wrong-{}", 10)));
    assert_eq!(r.status, 429, "{}", r.body);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(d.get("/api/v1/cluster").status, 429);
    // The health check is not a credential's business.
    assert_eq!(d.get_as("/api/v1/health", None).status, 200);
}

#[test]
fn its_data_directory_is_its_own() {
    let tmp = tempdir("tempest-director-security");
    let tokens = Tokens::new("modes");
    // A data directory made by someone else, open to all.
    let data = tmp.path().join("director");
    std::fs::create_dir_all(data.join("packages")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("packages"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let (mut d, _) = deployed(tmp.path(), &tokens);
    d.daemon.stop();
    let mut seen = 0;
    let mut stack = vec![data.clone()];
    while let Some(dir) = stack.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                let mode = meta.permissions().mode() & 0o777;
                assert_eq!(mode & !0o600, 0, "{} is {mode:o}", e.path().display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 2, "the database and the package at least");
}

#[test]
fn it_refuses_an_open_bind_beyond_loopback() {
    let tmp = tempdir("tempest-director-security");
    let bin = cargo_bin("tempest-director", "tempest-director");
    let out = Command::new(&bin)
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(tmp.path().join("d"))
        .env_remove("TEMPEST_TOKEN")
        .env_remove("TEMPEST_ADMIN_TOKEN")
        .env_remove("TEMPEST_VIEWER_TOKEN")
        .env_remove("TEMPEST_AGENT_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without credentials") && err.contains("--insecure"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!tmp.path().join("d").exists(), "nothing was made");
    // Credentials are not enough: beyond loopback they would cross the
    // network in clear without TLS.
    let out = Command::new(&bin)
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(tmp.path().join("d"))
        .env("TEMPEST_ADMIN_TOKEN", "an-admin-token-of-the-test")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("tls_cert_file") && err.contains("--insecure"),
        "{err}"
    );
    assert!(!tmp.path().join("d").exists(), "nothing was made");

    // --insecure starts it, with a warning.
    let d = DirectorProcess::start(&tmp.path().join("d"), "0.0.0.0:0", &["--insecure"]);
    let log = std::fs::read_to_string(&d.daemon.log).unwrap_or_default();
    assert!(log.contains("--insecure"), "{log}");
    assert!(log.contains("without TLS"), "{log}");
    assert!(log.contains("WARN"), "{log}");
}

#[test]
fn a_malformed_scrape_answer_fails_that_scrape_and_the_next_one_happens() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::{Arc, Mutex};
    let tmp = tempdir("tempest-director-security");
    let tokens = Tokens::new("scrape");
    let d = DirectorProcess::start_secured(
        &tmp.path().join("director"),
        "127.0.0.1:0",
        &["--metrics-interval", "200ms"],
        &tokens,
    );
    // A fake agent: every scrape is answered with a chunk size of 2^64-1
    // (which panicked the director's old hand-written HTTP client, and no
    // agent was scraped again), then the connection is closed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line.to_ascii_lowercase());
            }
            record.lock().unwrap().push(head);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n",
            );
        }
    });
    let beat = json!({"agent_id": "fake", "address": addr, "node": {
        "hostname": "h", "agent_version": "0", "cores": 1, "memory_total": 1,
        "memory_available": 1, "load": [0.0, 0.0, 0.0], "disk_free": 1}, "processes": []});
    let scrapes = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|h| h.starts_with("get /api/v1/metrics"))
            .count()
    };
    tempest_testkit::cluster::wait_for(
        "three scrapes of the fake agent",
        tempest_testkit::cluster::WAIT,
        || {
            // Heartbeats keep it up.
            let r = d.post(
                "/api/v1/agents/heartbeat",
                Some(&tokens.agent),
                beat.to_string().as_bytes(),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            (scrapes() >= 3).then_some(())
        },
    );
    // Each with the agent token, never the admin's.
    for head in seen.lock().unwrap().iter() {
        assert!(
            head.contains(&format!("authorization: bearer {}", tokens.agent)),
            "{head}"
        );
        assert!(!head.contains(&tokens.admin), "{head}");
    }
    assert_eq!(d.get("/api/v1/health").status, 200);
}
