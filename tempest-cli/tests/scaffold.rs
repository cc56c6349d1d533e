//! `tempest new` for real: the new crate builds and its tests pass with no
//! edits; `generate task` and `generate source` keep it building and
//! passing (and rustfmt-clean); `package` turns it into an archive the
//! director's reader accepts, with the right manifest, and refuses a
//! pipeline that `Topology.toml` does not match.
//!
//! One crate is built once (the slow part, a few minutes on a cold target
//! directory) in `target/cli-scaffold`, outside the workspace's own
//! profile directories so the cargo running this test never waits on it,
//! and every later step reuses that build.

#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run, tempest};
use tempest_testkit::cluster::{
    profile_dir, tempdir, wait_for, AgentProcess, DirectorProcess, Tokens, WAIT,
};

/// The test cluster's credentials.
fn tokens() -> Tokens {
    Tokens::new("scaffold-test")
}

/// The scaffold's own target directory, beside the workspace's profiles.
fn target_dir() -> PathBuf {
    let profile = profile_dir();
    profile.parent().unwrap_or(&profile).join("cli-scaffold")
}

/// The environment every cargo of this test runs with: its own target
/// directory, and no debug info, which keeps the binary (and the archive
/// to compress) small without changing what is tested.
fn scaffold_env(cmd: &mut Command) -> &mut Command {
    cmd.env("CARGO_TARGET_DIR", target_dir())
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_PROFILE_TEST_DEBUG", "0")
        .env_remove("RUSTFLAGS")
}

fn cargo(krate: &Path, args: &[&str]) -> common::Run {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(krate);
    scaffold_env(&mut cmd)
        .output()
        .unwrap_or_else(|e| panic!("running cargo {args:?}: {e}"))
        .into()
}

fn passed(r: &common::Run) -> usize {
    assert_eq!(r.code, Some(0), "cargo test failed: {r:#?}");
    r.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum()
}

#[test]
fn a_new_crate_builds_and_tests_then_grows_and_packages() {
    let dir = tempdir("tempest-cli-scaffold");
    let r = run(dir.path(), &["new", "demo", "--source", "file"]).ok();
    assert!(r.stdout.contains("created demo"), "{r:#?}");
    let krate = dir.path().join("demo");
    for f in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "Topology.toml",
        "README.md",
        "data/input.txt",
    ] {
        assert!(krate.join(f).is_file(), "no {f}");
    }

    // Builds and passes its tests as written.
    let r = cargo(&krate, &["test"]);
    assert_eq!(passed(&r), 3, "{r:#?}");
    let r = cargo(&krate, &["fmt", "--check"]);
    assert_eq!(r.code, Some(0), "the new crate is rustfmt-clean: {r:#?}");

    // It runs standalone on its file, to the end of it.
    let r = cargo(&krate, &["build"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    let out: common::Run = Command::new(target_dir().join("debug").join("demo"))
        .args(["standalone", "--config", "Topology.toml"])
        .current_dir(&krate)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
        .into();
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        krate.join("data/input.txt.checkpoint").is_file(),
        "{out:#?}"
    );

    // Grows: a task and a source, wired in, still building and passing.
    let r = run(&krate, &["generate", "task", "enrich"]).ok();
    assert!(r.stdout.contains("after `count`"), "{r:#?}");
    let r = run(&krate, &["generate", "source", "ticks"]).ok();
    assert!(r.stdout.contains("ticks"), "{r:#?}");
    let main = std::fs::read_to_string(krate.join("src/main.rs")).unwrap();
    assert!(
        main.contains(".task(\"enrich\", enrich::Enrich::default)"),
        "{main}"
    );
    assert!(main.contains(".edge(\"count\", \"enrich\")"), "{main}");
    assert!(
        main.contains(".source_kind::<ticks::Ticks>(\"ticks\")"),
        "{main}"
    );
    let r = run(&krate, &["generate", "task", "enrich"]);
    assert!(r.one_line_error().contains("not overwritten"), "{r:#?}");
    let r = cargo(&krate, &["test"]);
    assert_eq!(passed(&r), 6, "{r:#?}");
    let r = cargo(&krate, &["fmt", "--check"]);
    assert_eq!(r.code, Some(0), "still rustfmt-clean: {r:#?}");

    // Packages (dev profile: a release build here would take minutes).
    let r: common::Run = scaffold_env(&mut tempest(&krate))
        .args(["package", "--debug", "--json"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stderr.contains("checked the pipeline of demo"), "{r:#?}");
    let v = r.json();
    let archive = PathBuf::from(v["archive"].as_str().unwrap());
    assert_eq!(
        archive,
        target_dir().join("tempest").join("demo-0.1.0.tar.gz")
    );
    let bytes = std::fs::read(&archive).unwrap();
    assert_eq!(
        v["hash"].as_str(),
        Some(tempest_control::package::sha256_hex(&bytes).as_str())
    );
    let pkg = tempest_control::package::read(&bytes, u64::MAX).expect("a valid package");
    let m = &pkg.manifest;
    assert_eq!((m.name.as_str(), m.version.as_str()), ("demo", "0.1.0"));
    assert_eq!(m.binary, "demo");
    assert_eq!(m.tempest_version, "0.1.0");
    let host = Command::new("rustc").arg("-vV").output().unwrap();
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .unwrap();
    assert_eq!(m.target, host);
    let toml = pkg.topology_toml.expect("Topology.toml in the package");
    assert!(toml.contains("[tasks.enrich]"), "{toml}");
    assert!(pkg.binary.starts_with(b"\x7fELF"));

    // Deploys from the crate (packaged again on the way) to a real
    // director and agent, reading a file of the test's, and counts it.
    let tokens = tokens();
    let director = DirectorProcess::start_secured(
        &dir.path().join("director"),
        "127.0.0.1:0",
        &["--metrics-interval", "300ms"],
        &tokens,
    );
    let url = format!("http://{}", director.addr);
    let _agent = AgentProcess::join(&dir.path().join("agent"), &director.addr, &tokens.agent);
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "one two\nthree four five\nsix\n").unwrap();
    let r: common::Run = scaffold_env(&mut tempest(&krate))
        .args(["deploy", "--debug", "--wait", "--set"])
        .arg(format!("source.config.path={}", input.display()))
        .args(["--set", "source.config.follow=true", "--workers", "count=1"])
        .env("TEMPEST_DIRECTOR", &url)
        .env("TEMPEST_ADMIN_TOKEN", &tokens.admin)
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.contains("deployed demo"), "{r:#?}");
    let detail = wait_for("the three lines acked on the cluster", WAIT, || {
        let t = director.topology("demo");
        (t["acked"].as_u64()? >= 3 && t["tasks"]["enrich"]["messages_in"].as_u64()? >= 6)
            .then_some(t)
    });
    assert_eq!(
        detail["workers"],
        serde_json::json!({"count": 1, "enrich": 1, "split": 1})
    );
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, &tokens.admin).unwrap();
    run(
        dir.path(),
        &[
            "kill",
            "demo",
            "--director",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .ok();

    // A Topology.toml that does not match the pipeline is refused after
    // the (no-op) build, with the task named; nothing new is written.
    std::fs::remove_file(&archive).unwrap();
    let text = std::fs::read_to_string(krate.join("Topology.toml")).unwrap();
    std::fs::write(
        krate.join("Topology.toml"),
        format!("{text}\n[tasks.nope]\nworkers = 1\n"),
    )
    .unwrap();
    let r: common::Run = scaffold_env(&mut tempest(&krate))
        .args(["package", "--debug"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("nope")),
        "{r:#?}"
    );
    assert!(
        r.stderr
            .lines()
            .last()
            .is_some_and(|l| l.contains("the topology does not validate")),
        "{r:#?}"
    );
    assert!(!r.stderr.contains("panicked"), "{r:#?}");
    assert!(!archive.exists());

    // One that lists tasks but not every task of the pipeline is refused
    // too: the director would never start the missing one.
    let mut table: toml::Table = text.parse().unwrap();
    table["tasks"].as_table_mut().unwrap().remove("enrich");
    std::fs::write(
        krate.join("Topology.toml"),
        toml::to_string(&table).unwrap(),
    )
    .unwrap();
    let r: common::Run = scaffold_env(&mut tempest(&krate))
        .args(["package", "--debug"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("[tasks.enrich]")),
        "{r:#?}"
    );
    assert!(!archive.exists());
}

/// The other source kinds (Kafka included) build and pass their tests too, with a task and
/// a source generated (each kind builds its connector, in the scaffold's
/// shared target directory).
#[test]
fn every_source_kind_builds_and_tests() {
    for kind in ["memory", "redis", "nats", "kafka"] {
        let dir = tempdir("tempest-cli-kinds");
        let name = format!("demo_{kind}");
        run(dir.path(), &["new", &name, "--source", kind]).ok();
        let krate = dir.path().join(&name);
        run(&krate, &["generate", "task", "enrich"]).ok();
        run(&krate, &["generate", "source", "ticks"]).ok();
        let r = cargo(&krate, &["test"]);
        assert_eq!(passed(&r), 6, "{kind}: {r:#?}");
        let r = cargo(&krate, &["fmt", "--check"]);
        assert_eq!(r.code, Some(0), "{kind}: {r:#?}");
    }
}
