//! The web UI in a real browser: headless Chromium driven by chromedriver
//! (fantoccini), against a real `tempest-director` and a real
//! `tempest-agent` running the word count example.
//!
//! The browser does what a person would: a page without logging in shows
//! the login form; a wrong token is refused on it; it logs in, uploads the
//! package through the form's file input, deploys it with `Topology.toml`
//! overrides typed into the form, watches the acked figure grow on the
//! topology page (refreshed by the page's own script, never reloaded),
//! rebalances a task, reads a process's log, stops the topology and logs
//! out, after which the session's old cookie is refused.
//!
//! Chromium and chromedriver are Debian's (`chromium`, `chromium-driver`);
//! `scripts/test` installs them. Without them this test fails, saying so.
//! Nothing waits by sleeping for a fixed time: every wait polls the page or
//! the API until what is expected holds, within a bound.

#![cfg(target_os = "linux")]

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::json;
use tempest_testkit::cluster::{
    free_addr, signal, stop_child, tempdir, wait_for, wordcount_package, AgentProcess,
    DirectorProcess, Tokens, WAIT, WORDCOUNT_TOML,
};

/// The word count's source: generated sentences at a modest, fixed rate,
/// so the test does not take every core.
const OVERRIDES: &str = r#"max_pending = 256
batch_size = 32
grace_period = "1s"

[source]
kind = "generator"

[source.config]
count = 100000000
rate = 500.0
payloads = ["the cow jumped over the moon", "an apple a day keeps the doctor away"]
"#;

/// A Debian binary, or a failure that says how to install it. There is no
/// silent skip: a missing browser fails the test, in CI and elsewhere.
fn debian_binary(candidates: &[&str], package: &str) -> PathBuf {
    if let Some(p) = candidates.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return p;
    }
    let why = format!(
        "{} is not installed: run scripts/test (it installs the Debian packages chromium and \
         chromium-driver), or `apt-get install chromium chromium-driver`",
        package
    );
    if std::env::var_os("CI").is_some() {
        panic!("CI must have the browser: {why}");
    }
    panic!("{why}");
}

/// A chromedriver on a free loopback port, stopped by PID when dropped.
struct Chromedriver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Chromedriver {
    fn start(dir: &Path) -> Chromedriver {
        let bin = debian_binary(
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
            "chromedriver",
        );
        let addr = free_addr();
        let port = addr.rsplit(':').next().unwrap_or_default().to_owned();
        let log = dir.join("chromedriver.log");
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let driver = Chromedriver {
            child,
            url: format!("http://{addr}"),
            log,
        };
        // It keeps connections open, so a connection accepted is the sign.
        wait_for("chromedriver listening", WAIT, || {
            std::net::TcpStream::connect(&addr).ok().map(drop)
        });
        driver
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!(
                "--- chromedriver log (tail) ---\n{}",
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 60)
            );
        }
    }
}

/// Kills, when dropped, whatever Chromium processes of the test's profile
/// are left (a failed session may leave the browser running).
struct BrowserProcesses(PathBuf);

impl Drop for BrowserProcesses {
    fn drop(&mut self) {
        let mark = format!("--user-data-dir={}", self.0.display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if cmdline.split(|b| *b == 0).any(|a| a == mark.as_bytes()) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A headless Chromium session with a fresh profile in `profile`.
async fn browser(driver: &Chromedriver, profile: &Path) -> Client {
    let chromium = debian_binary(
        &["/usr/lib/chromium/chromium", "/usr/bin/chromium"],
        "chromium",
    );
    let args = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--no-first-run".to_owned(),
        "--window-size=1280,1024".to_owned(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": chromium.display().to_string(), "args": args}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("starting a Chromium session: {e}"))
}

/// The text of the element `css`, if it is on the page now.
async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Polls `f` every 100 ms until it gives a value; fails naming `what`
/// (and the page) after `bound`.
async fn until<T, F, Fut>(c: &Client, what: &str, bound: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            let url = c
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            let body = text(c, "main").await.unwrap_or_default();
            panic!("timed out waiting for {what}; at {url}:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the page at `path` (after a form's redirect) showing `flash`.
async fn landed(c: &Client, path: &str, flash: &str) {
    until(c, &format!("{path} saying `{flash}`"), WAIT, || async {
        let url = c.current_url().await.ok()?;
        let shown = text(c, "#flash").await?;
        (url.path() == path && shown.contains(flash)).then_some(())
    })
    .await;
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

async fn type_into(c: &Client, css: &str, keys: &str) {
    let e = c
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"));
    e.clear()
        .await
        .unwrap_or_else(|e| panic!("clearing {css}: {e}"));
    e.send_keys(keys)
        .await
        .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
}

async fn number(c: &Client, css: &str) -> Option<u64> {
    text(c, css).await?.trim().parse().ok()
}

#[test]
fn uploads_deploys_watches_rebalances_and_stops_wordcount_in_a_browser() {
    let tmp = tempdir("tempest-browser-test");
    let tokens = Tokens::new("browser-test");
    let director = DirectorProcess::start_secured(
        &tmp.path().join("director"),
        "127.0.0.1:0",
        &["--metrics-interval", "500ms"],
        &tokens,
    );
    let agent = AgentProcess::join(&tmp.path().join("agent"), &director.addr, &tokens.agent);
    let agent_id = agent.id();
    wait_for("the agent up", WAIT, || {
        director.agents_up().contains(&agent_id).then_some(())
    });
    let (archive, hash) = wordcount_package(tmp.path(), WORDCOUNT_TOML);
    let archive_path = tmp.path().join("wordcount.tar.gz");
    std::fs::write(&archive_path, &archive).unwrap();
    let profile = tmp.path().join("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let driver = Chromedriver::start(tmp.path());
    let base = format!("http://{}", director.addr);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _leftovers = BrowserProcesses(profile.clone());
    let old_cookie = rt.block_on(async {
        let c = browser(&driver, &profile).await;
        let result = AssertUnwindSafe(session(&c, &base, &archive_path, &hash, &tokens.admin))
            .catch_unwind()
            .await;
        let _ = c.close().await;
        match result {
            Ok(cookie) => cookie,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });

    // The session the browser logged out of is over: its cookie opens
    // nothing, in the API or the pages.
    let cookie = format!("tempest_session={old_cookie}");
    for path in ["/api/v1/topologies", "/topologies/wordcount", "/"] {
        let r = tempest_testkit::http::request(
            &director.addr,
            "GET",
            path,
            &[("Cookie", cookie.as_str())],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 401, "{path} with the old cookie: {}", r.body);
    }
    let r = tempest_testkit::http::request(
        &director.addr,
        "POST",
        "/api/v1/topologies/wordcount/start",
        &[("Cookie", cookie.as_str())],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);

    // What the browser did is what the API shows.
    let d = director.topology("wordcount");
    assert_eq!(d["workers"]["count"], json!(3), "{d}");
    assert_eq!(d["state"], json!("stopped"), "{d}");
    drop(agent);
}

/// The browser's session; answers the session cookie it logged out of.
async fn session(c: &Client, base: &str, archive: &Path, hash: &str, token: &str) -> String {
    // Without logging in, a page is the login form, and shows nothing else.
    c.goto(&format!("{base}/packages")).await.unwrap();
    until(c, "the login page", WAIT, || async {
        c.find(Locator::Css("#token")).await.ok()
    })
    .await;
    assert_eq!(text(c, "h1").await.as_deref(), Some("Log in"));
    let error = text(c, "#error").await.unwrap_or_default();
    assert!(error.contains("log in"), "{error}");
    assert!(c.find(Locator::Css("#package-file")).await.is_err());

    // Log in: a wrong token first.
    type_into(c, "#token", "not-the-token").await;
    click(c, "#login").await;
    let error = until(c, "the wrong token refused", WAIT, || async {
        text(c, "#error")
            .await
            .filter(|e| e.contains("neither the admin token"))
    })
    .await;
    assert!(error.contains("viewer token"), "{error}");
    type_into(c, "#token", token).await;
    click(c, "#login").await;
    landed(c, "/packages", "logged in (admin)").await;
    assert!(text(c, "#packages")
        .await
        .unwrap_or_default()
        .contains("No package"));

    // Upload through the form's file input.
    c.find(Locator::Css("#package-file"))
        .await
        .unwrap()
        .send_keys(&archive.display().to_string())
        .await
        .unwrap();
    click(c, "#upload").await;
    landed(c, "/packages", "package wordcount 0.1.0 stored").await;
    let row = text(c, &format!("#package-{hash}"))
        .await
        .unwrap_or_default();
    assert!(row.contains("wordcount"), "{row}");

    // Deploy, the uploaded package chosen, the overrides typed in.
    let chosen = c
        .find(Locator::Css("#deploy-package"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap();
    assert_eq!(chosen.as_deref(), Some(hash));
    type_into(c, "#deploy-name", "wordcount").await;
    type_into(c, "#deploy-config", OVERRIDES).await;
    click(c, "#deploy-button").await;
    landed(c, "/topologies/wordcount", "deployed wordcount").await;

    // The acked figure grows, refreshed by the page's script.
    let first = until(c, "roots acked", WAIT, || async {
        number(c, "#acked").await.filter(|n| *n > 0)
    })
    .await;
    until(c, "the acked figure growing", WAIT, || async {
        number(c, "#acked").await.filter(|n| *n > first)
    })
    .await;
    let live = text(c, "#live-status").await.unwrap_or_default();
    assert!(live.starts_with("live"), "{live}");
    assert!(c.find(Locator::Css("#dag #dag-task-count")).await.is_ok());
    // Its one unnamed source, named `default`, feeds the pipeline.
    assert!(c
        .find(Locator::Css("#dag #dag-source-default"))
        .await
        .is_ok());
    until(c, "the throughput chart drawn", WAIT, || async {
        let svg = c
            .find(Locator::Css("#throughput-chart"))
            .await
            .ok()?
            .html(false)
            .await
            .ok()?;
        svg.contains("<polyline").then_some(())
    })
    .await;

    // A process's log, through the director.
    c.goto(&format!("{base}/topologies/wordcount/processes/server/log"))
        .await
        .unwrap();
    let log = text(c, "#log").await.unwrap_or_default();
    assert!(log.contains("listening"), "{log}");
    c.goto(&format!("{base}/topologies/wordcount"))
        .await
        .unwrap();

    // Rebalance count from 2 to 3 workers.
    assert_eq!(number(c, "#workers-count").await, Some(2));
    type_into(c, "#rebalance-count", "3").await;
    click(c, "#rebalance").await;
    landed(c, "/topologies/wordcount", "wordcount: rebalanced").await;
    assert_eq!(number(c, "#workers-count").await, Some(3));
    until(c, "six processes running", WAIT, || async {
        (text(c, "#processes").await? == "6/6").then_some(())
    })
    .await;

    // Stop.
    click(c, "#stop").await;
    landed(c, "/topologies/wordcount", "wordcount: stopped").await;
    until(c, "the status stopped", WAIT, || async {
        (text(c, "#status").await? == "stopped").then_some(())
    })
    .await;
    assert!(c.find(Locator::Css("#start")).await.is_ok());

    // Log out: back on the login page, and the page is not shown again.
    let cookie = c
        .get_named_cookie("tempest_session")
        .await
        .expect("the session cookie")
        .value()
        .to_owned();
    click(c, "#logout").await;
    landed(c, "/topologies/wordcount", "logged out").await;
    assert_eq!(text(c, "h1").await.as_deref(), Some("Log in"));
    assert!(c.find(Locator::Css("#stop")).await.is_err());
    assert!(
        c.get_named_cookie("tempest_session").await.is_err(),
        "the browser dropped its cookie"
    );
    cookie
}
