//! `tempest package`: checks a topology crate's `Topology.toml`, builds the
//! crate, checks its pipeline by running the built binary, and writes the
//! archive the director accepts (`tempest_control::package`).
//!
//! The pipeline lives in the user's code, so it can only be checked by
//! running the binary: `BIN check --json --config Topology.toml` builds the
//! topology (the builder validates the pipeline), applies `Topology.toml`
//! (source kinds and config, task names, policy), validates the DAG and
//! prints its tasks, which must all have their `[tasks.NAME] workers` in
//! `Topology.toml`: the director starts the tasks listed there.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use tempest_control::package::{pack, sha256_hex};
use tempest_control::Manifest;
use tempest_core::config::TopologyFile;

use crate::progress::Step;
use crate::Problems;

/// How long the built binary has to answer the pipeline check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Which cargo profile to build with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `--release` (the default).
    Release,
    /// The `dev` profile (`--debug`).
    Dev,
    /// A named profile (`--profile NAME`).
    Named(String),
}

impl Profile {
    fn cargo_args(&self) -> Vec<String> {
        match self {
            Profile::Release => vec!["--release".into()],
            Profile::Dev => vec![],
            Profile::Named(p) => vec!["--profile".into(), p.clone()],
        }
    }

    fn name(&self) -> &str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "dev",
            Profile::Named(p) => p,
        }
    }
}

/// What to package.
#[derive(Clone, Debug)]
pub struct Options {
    /// The crate's directory.
    pub path: PathBuf,
    /// The cargo profile.
    pub profile: Profile,
    /// The binary, when the crate has several.
    pub bin: Option<String>,
    /// Where to write the archive (default
    /// `<target dir>/tempest/<name>-<version>.tar.gz`).
    pub out: Option<PathBuf>,
}

/// A package written.
#[derive(Clone, Debug)]
pub struct Packaged {
    /// The archive's path.
    pub archive: PathBuf,
    /// Its content hash.
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its manifest.
    pub manifest: Manifest,
    /// Whether it carries a `Topology.toml`.
    pub has_topology_toml: bool,
}

impl Packaged {
    /// The JSON `tempest package --json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "archive": self.archive,
            "hash": self.hash,
            "size": self.size,
            "manifest": self.manifest,
            "topology_toml": self.has_topology_toml,
        })
    }
}

/// The cargo to run: the one running us (`CARGO`, under `cargo run`), else
/// `cargo` from the `PATH`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<MetaPackage>,
    target_directory: PathBuf,
    workspace_root: PathBuf,
}

#[derive(Deserialize)]
struct MetaPackage {
    name: String,
    version: String,
    manifest_path: PathBuf,
    targets: Vec<MetaTarget>,
}

#[derive(Deserialize)]
struct MetaTarget {
    name: String,
    kind: Vec<String>,
}

/// The crate at `dir`: its package, and its workspace's target directory
/// and root.
struct Crate {
    name: String,
    version: String,
    bins: Vec<String>,
    target_dir: PathBuf,
    workspace_root: PathBuf,
}

fn read_crate(dir: &Path) -> Result<Crate> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} has no Cargo.toml: run this in a topology crate (tempest new creates one) or pass --path",
            display_dir(dir)
        );
    }
    let out = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stdin(Stdio::null())
        .output()
        .context("running cargo metadata (is cargo installed?)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or_else(|| err.lines().next().unwrap_or("failed"));
        bail!("cargo metadata: {}", line.trim_start_matches("error: "));
    }
    let meta: Metadata =
        serde_json::from_slice(&out.stdout).context("reading cargo metadata's answer")?;
    let wanted = manifest
        .canonicalize()
        .with_context(|| format!("{}", manifest.display()))?;
    let package = meta
        .packages
        .into_iter()
        .find(|p| p.manifest_path.canonicalize().ok().as_deref() == Some(wanted.as_path()))
        .ok_or_else(|| {
            anyhow!(
                "{} is a workspace without a package of its own: pass --path to the topology crate",
                manifest.display()
            )
        })?;
    let bins = package
        .targets
        .iter()
        .filter(|t| t.kind.iter().any(|k| k == "bin"))
        .map(|t| t.name.clone())
        .collect();
    Ok(Crate {
        name: package.name,
        version: package.version,
        bins,
        target_dir: meta.target_directory,
        workspace_root: meta.workspace_root,
    })
}

/// The name of the crate at `dir`: the name its package gets, and the
/// topology's by default.
pub fn crate_name(dir: &Path) -> Result<String> {
    Ok(read_crate(dir)?.name)
}

fn display_dir(dir: &Path) -> String {
    if dir == Path::new(".") || dir.as_os_str().is_empty() {
        "the current directory".into()
    } else {
        dir.display().to_string()
    }
}

/// Checks a `Topology.toml` on its own (every key, value and section),
/// reporting every problem with its file, line and key.
pub fn check_topology_toml(path: &Path, shown: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the file", shown.display()))?;
    if let Err(errors) = TopologyFile::parse(&text, Some(shown)) {
        return Err(Problems::new(
            format!(
                "{} is invalid ({} problem{}); nothing was built",
                shown.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            ),
            errors.0.iter().map(ToString::to_string).collect(),
        )
        .into());
    }
    Ok(text)
}

/// Whether a `Topology.toml` gives worker counts (`[tasks.NAME] workers`).
fn declares_workers(text: &str) -> bool {
    !declared_tasks(text).is_empty()
}

/// Packages the crate at `opts.path`.
pub fn package(opts: &Options) -> Result<Packaged> {
    let krate = read_crate(&opts.path)?;
    let toml_path = opts.path.join("Topology.toml");
    let shown = if opts.path == Path::new(".") {
        PathBuf::from("Topology.toml")
    } else {
        toml_path.clone()
    };
    let topology_toml = if toml_path.is_file() {
        Some(check_topology_toml(&toml_path, &shown)?)
    } else {
        None
    };
    if !topology_toml.as_deref().is_some_and(declares_workers) {
        eprintln!(
            "note: {} gives no [tasks.NAME] workers, so `tempest deploy` will need \
             --workers TASK=N for every task",
            if topology_toml.is_some() {
                shown.display().to_string()
            } else {
                format!("there is no {}: the package", shown.display())
            }
        );
    }
    let bin = choose_bin(&krate, opts.bin.as_deref())?;

    let binary = build(&opts.path, &bin, &opts.profile)?;

    let step = Step::start(format!("checking the pipeline of {bin}"));
    match probe(
        &binary,
        topology_toml
            .as_deref()
            .map(|text| (toml_path.as_path(), text)),
    ) {
        Ok(()) => step.done(format!("checked the pipeline of {bin}")),
        Err(e) => {
            step.abandon();
            return Err(e);
        }
    }

    let manifest = Manifest {
        name: krate.name.clone(),
        version: krate.version.clone(),
        binary: String::new(),
        sha256: String::new(),
        target: host_triple(&opts.path)?,
        tempest_version: tempest_version(&krate.workspace_root),
    };
    let archive = match &opts.out {
        Some(p) => p.clone(),
        None => krate
            .target_dir
            .join("tempest")
            .join(format!("{}-{}.tar.gz", krate.name, krate.version)),
    };
    let step = Step::start(format!("writing {}", archive.display()));
    let written = write_archive(&binary, topology_toml.as_deref(), manifest, &archive);
    let (manifest, bytes) = match written {
        Ok(w) => w,
        Err(e) => {
            step.abandon();
            return Err(e);
        }
    };
    let packaged = Packaged {
        archive,
        hash: sha256_hex(&bytes),
        size: bytes.len() as u64,
        manifest,
        has_topology_toml: topology_toml.is_some(),
    };
    step.done(format!(
        "packaged {} {} ({}, {}): {}",
        packaged.manifest.name,
        packaged.manifest.version,
        packaged.manifest.target,
        crate::table::bytes(packaged.size),
        packaged.archive.display()
    ));
    Ok(packaged)
}

fn choose_bin(krate: &Crate, wanted: Option<&str>) -> Result<String> {
    if let Some(b) = wanted {
        if krate.bins.iter().any(|x| x == b) {
            return Ok(b.to_owned());
        }
        bail!(
            "{} has no binary `{b}`; its binaries: {}",
            krate.name,
            list_or_none(&krate.bins)
        );
    }
    match krate.bins.as_slice() {
        [] => bail!(
            "{} has no binary: a topology package is a binary whose main calls tempest::main",
            krate.name
        ),
        [one] => Ok(one.clone()),
        many => many
            .iter()
            .find(|b| **b == krate.name)
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "{} has several binaries ({}): choose one with --bin",
                    krate.name,
                    many.join(", ")
                )
            }),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[derive(Deserialize)]
struct CargoMessage {
    reason: String,
    #[serde(default)]
    target: Option<MessageTarget>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct MessageTarget {
    name: String,
    kind: Vec<String>,
}

/// `cargo build`s the binaries `bins` of the crate or workspace at `dir`
/// (with `-p` for each of `packages`), showing progress; returns each
/// binary's path, in the order of `bins`.
pub fn cargo_build(
    dir: &Path,
    packages: &[&str],
    bins: &[&str],
    profile: &Profile,
    what: &str,
) -> Result<Vec<PathBuf>> {
    let mut cmd = cargo();
    cmd.arg("build").current_dir(dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    for b in bins {
        cmd.args(["--bin", b]);
    }
    cmd.args(profile.cargo_args())
        .args(["--message-format", "json-render-diagnostics"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let step = Step::start(format!("building {what} ({} profile)", profile.name()));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .context("running cargo build (is cargo installed?)")?;
    let stderr = child.stderr.take().context("cargo's stderr")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    // Cargo's own lines: the current one on the spinner; every line kept
    // for when it fails. Off a terminal they go straight to stderr.
    let tty = crate::progress::tty();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !tty {
                eprintln!("{line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut found: Vec<Option<PathBuf>> = vec![None; bins.len()];
    let mut captured = Vec::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        while let Ok(l) = rx.try_recv() {
            step.detail(format!("building {what}: {}", l.trim()));
            captured.push(l);
        }
        let Ok(msg) = serde_json::from_str::<CargoMessage>(&line) else {
            continue;
        };
        if msg.reason != "compiler-artifact" {
            continue;
        }
        let (Some(target), Some(exe)) = (msg.target, msg.executable) else {
            continue;
        };
        if target.kind.iter().any(|k| k == "bin") {
            if let Some(i) = bins.iter().position(|b| *b == target.name) {
                found[i] = Some(exe);
            }
        }
    }
    let status = child.wait().context("waiting for cargo build")?;
    let _ = reader.join();
    captured.extend(rx.try_iter());
    if !status.success() {
        step.abandon();
        if tty {
            for l in &captured {
                eprintln!("{l}");
            }
        }
        bail!("cargo build of {what} failed ({status})");
    }
    let paths: Vec<PathBuf> = found
        .into_iter()
        .zip(bins)
        .map(|(p, b)| p.ok_or_else(|| anyhow!("cargo build did not report the binary `{b}`")))
        .collect::<Result<_>>()?;
    step.done(format!(
        "built {what} in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(paths)
}

fn build(dir: &Path, bin: &str, profile: &Profile) -> Result<PathBuf> {
    let manifest_dir = dir
        .canonicalize()
        .with_context(|| format!("{}", dir.display()))?;
    let mut paths = cargo_build(&manifest_dir, &[], &[bin], profile, bin)?;
    paths.pop().context("cargo build reported no binary")
}

/// Runs `BIN check --json` (with the crate's `Topology.toml`) and checks
/// that `Topology.toml`, when it lists tasks, lists every task of the
/// pipeline.
fn probe(binary: &Path, topology_toml: Option<(&Path, &str)>) -> Result<()> {
    let mut cmd = Command::new(binary);
    cmd.args(["check", "--json"]);
    if let Some((path, _)) = topology_toml {
        cmd.arg("--config").arg(path);
    }
    cmd.env("RUST_LOG", "error")
        .env("RUST_BACKTRACE", "0")
        .env_remove("TEMPEST_TOKEN");
    let (status, stdout, stderr) = run_bounded(cmd, PROBE_TIMEOUT)
        .with_context(|| format!("checking the pipeline by running {}", binary.display()))?;
    let checked: Option<Checked> = serde_json::from_str(stdout.trim()).ok();
    match (status, checked) {
        (Some(s), Some(checked)) if s.success() => {
            let declared = topology_toml
                .map(|(_, text)| declared_tasks(text))
                .unwrap_or_default();
            if declared.is_empty() {
                return Ok(());
            }
            let missing: Vec<String> = checked
                .tasks
                .iter()
                .filter(|t| !declared.contains(&t.name))
                .map(|t| {
                    format!(
                        "task `{}` of the pipeline has no [tasks.{}] workers in Topology.toml \
                         (the director starts only the tasks listed there)",
                        t.name, t.name
                    )
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(Problems::new(
                    "Topology.toml does not list every task; nothing was packaged",
                    missing,
                )
                .into())
            }
        }
        (status, _) => {
            let lines: Vec<String> = stderr
                .lines()
                .map(|l| {
                    l.trim_start_matches("error: ")
                        .trim()
                        .trim_start_matches("- ")
                        .to_owned()
                })
                .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
                .collect();
            let summary = match status {
                Some(s) if s.success() => format!(
                    "{} did not answer `check --json`: is its main `tempest::main(...)` of this tempest version?",
                    binary.display()
                ),
                Some(_) => "the topology does not validate; nothing was packaged".to_owned(),
                None => format!(
                    "{} did not finish checking its pipeline within {}s",
                    binary.display(),
                    PROBE_TIMEOUT.as_secs()
                ),
            };
            Err(Problems::new(summary, lines).into())
        }
    }
}

/// What `BIN check --json` prints.
#[derive(Deserialize)]
struct Checked {
    tasks: Vec<CheckedTask>,
}

#[derive(Deserialize)]
struct CheckedTask {
    name: String,
}

/// The task names of `[tasks.NAME]` in a `Topology.toml`.
fn declared_tasks(text: &str) -> std::collections::BTreeSet<String> {
    text.parse::<toml::Table>()
        .ok()
        .and_then(|t| {
            t.get("tasks")
                .and_then(|t| t.as_table())
                .map(|t| t.keys().cloned().collect())
        })
        .unwrap_or_default()
}

/// Runs `cmd` with its output captured, killing it past `timeout`
/// (`None` status then).
pub fn run_bounded(
    mut cmd: Command,
    timeout: Duration,
) -> Result<(Option<std::process::ExitStatus>, String, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    Ok((
        status,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

/// The host triple of the rustc that builds in `dir` (a toolchain file
/// there may choose another one).
pub fn host_triple(dir: &Path) -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running rustc -vV for the target triple")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|s| s.trim().to_owned())
        .context("rustc -vV gave no host triple")
}

/// The version of the `tempest` crate in the workspace's `Cargo.lock`,
/// else this CLI's.
fn tempest_version(workspace_root: &Path) -> String {
    let lock = std::fs::read_to_string(workspace_root.join("Cargo.lock")).unwrap_or_default();
    lock.parse::<toml::Table>()
        .ok()
        .and_then(|t| {
            t.get("package")?.as_array()?.iter().find_map(|p| {
                (p.get("name")?.as_str()? == "tempest")
                    .then(|| p.get("version")?.as_str().map(str::to_owned))
                    .flatten()
            })
        })
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// Writes the archive (through a temporary file renamed into place) and
/// returns the manifest written and the archive's bytes.
pub fn write_archive(
    binary: &Path,
    topology_toml: Option<&str>,
    manifest: Manifest,
    archive: &Path,
) -> Result<(Manifest, Vec<u8>)> {
    if let Some(dir) = archive.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bytes = Vec::new();
    let manifest = pack(binary, topology_toml, manifest, &mut bytes)
        .with_context(|| format!("packing {}", binary.display()))?;
    let tmp = archive.with_extension("tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, archive).with_context(|| format!("writing {}", archive.display()))?;
    Ok((manifest, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_counts_are_found() {
        assert!(declares_workers("[tasks.split]\nworkers = 1\n"));
        assert!(!declares_workers("max_pending = 3\n"));
        assert!(!declares_workers("[tasks]\n"));
    }

    #[test]
    fn the_tempest_version_comes_from_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Cargo.lock"),
            "version = 4\n[[package]]\nname = \"tempest\"\nversion = \"9.8.7\"\n",
        )
        .unwrap();
        assert_eq!(tempest_version(dir.path()), "9.8.7");
        assert_eq!(
            tempest_version(&dir.path().join("nope")),
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn the_binary_is_chosen_by_flag_alone_or_name() {
        let k = |bins: &[&str]| Crate {
            name: "demo".into(),
            version: "0.1.0".into(),
            bins: bins.iter().map(|s| s.to_string()).collect(),
            target_dir: PathBuf::new(),
            workspace_root: PathBuf::new(),
        };
        assert_eq!(choose_bin(&k(&["x"]), None).unwrap(), "x");
        assert_eq!(choose_bin(&k(&["x", "demo"]), None).unwrap(), "demo");
        assert!(choose_bin(&k(&["x", "y"]), None).is_err());
        assert!(choose_bin(&k(&[]), None).is_err());
        assert_eq!(choose_bin(&k(&["x", "y"]), Some("y")).unwrap(), "y");
        assert!(choose_bin(&k(&["x"]), Some("y")).is_err());
    }
}
