//! Setting up a cluster: `tempest cluster init` writes a commented
//! `Cluster.toml`, and `tempest director` / `tempest agent` start the
//! daemons with it.
//!
//! The file is the repository's `Cluster.toml.example` (every key,
//! commented, kept valid by the daemons' own tests) with a fresh cluster
//! token and the agent pointed at the director on this machine, so one file
//! starts both daemons and the CLI finds them with it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{anyhow, bail, Context, Result};

use crate::client::ConnArgs;

/// Every key of Cluster.toml, commented.
const EXAMPLE: &str = include_str!("../../Cluster.toml.example");

/// What `tempest cluster init` was asked.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The file to write.
    #[arg(long, short, value_name = "FILE", default_value = "Cluster.toml")]
    pub output: PathBuf,
    /// Write no cluster token (anyone who reaches the daemons can deploy).
    #[arg(long)]
    pub no_token: bool,
}

/// A random token: 32 hex digits from the kernel's random source.
pub fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a cluster token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The Cluster.toml text: the example with `token` set in both sections
/// (when given) and the agent's `director` set to this machine's.
pub fn cluster_toml(token: Option<&str>) -> Result<String> {
    let header = "# Cluster.toml: the settings of a Tempest cluster's daemons.\n";
    let mut text = EXAMPLE.replacen(
        header,
        &format!(
            "{header}#\n# Written by `tempest cluster init`. Start the daemons next to it with\n\
             # `tempest director` and `tempest agent`; the `tempest` commands run here\n\
             # read the director's address and the token from it. It holds the\n\
             # cluster token: keep it private (it is written readable by its owner only).\n"
        ),
        1,
    );
    let mut replace = |from: &str, to: &str, times: usize| -> Result<()> {
        if text.matches(from).count() != times {
            bail!("Cluster.toml.example no longer has {times} line(s) `{from}`: update `tempest cluster init`");
        }
        text = text.replace(from, to);
        Ok(())
    };
    replace(
        "# director = \"http://10.0.0.1:7300\"\n",
        "director = \"http://127.0.0.1:7300\"\n",
        1,
    )?;
    if let Some(t) = token {
        replace(
            "# token = \"change-me\"\n",
            &format!("token = \"{t}\"\n"),
            2,
        )?;
    }
    Ok(text)
}

/// `tempest cluster init`.
pub fn init(args: &InitArgs, token: Option<&str>) -> Result<()> {
    let token = match (args.no_token, token) {
        (true, Some(_)) => bail!("--no-token and --token contradict each other"),
        (true, None) => None,
        (false, Some(t)) => Some(t.to_owned()),
        (false, None) => Some(random_token()?),
    };
    if let Some(t) = &token {
        if t.is_empty() || t.contains(['"', '\\', '\n']) {
            bail!("the token must be non-empty and have no quotes, backslashes or newlines");
        }
    }
    let text = cluster_toml(token.as_deref())?;
    let out = &args.output;
    let mut file = create_new_private(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow!(
                "{} exists: it is not overwritten (remove it, or write another with --output)",
                out.display()
            )
        } else {
            anyhow!("writing {}: {e}", out.display())
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    outln!(
        "wrote {}{}",
        out.display(),
        if token.is_some() {
            " with a new cluster token (keep the file private)"
        } else {
            " without a cluster token"
        }
    );
    outln!(
        "start the director with `tempest director` and an agent with `tempest agent` next to it"
    );
    Ok(())
}

fn create_new_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// The daemons `tempest director` and `tempest agent` start.
#[derive(Clone, Copy, Debug)]
pub enum Daemon {
    /// `tempest-director`.
    Director,
    /// `tempest-agent`.
    Agent,
}

impl Daemon {
    /// The binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            Daemon::Director => "tempest-director",
            Daemon::Agent => "tempest-agent",
        }
    }
}

/// A binary next to this executable, else on the `PATH`.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this executable's path")?;
    if let Some(p) = exe.parent().map(|d| d.join(name)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "cannot find {name} next to {} or on the PATH: build it with `cargo build --release -p {name}` \
         and put it beside tempest",
        exe.display()
    )
}

/// `tempest director|agent [ARGS]`: replaces this process with the daemon,
/// given `--config Cluster.toml` (when there is one and ARGS name none),
/// the token in its environment and, for an agent, the director.
pub fn exec_daemon(daemon: Daemon, conn: &ConnArgs, args: Vec<OsString>) -> Result<ExitCode> {
    let bin = find_binary(daemon.binary())?;
    let mut cmd = Command::new(&bin);
    let names_config = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == "--config" || a.starts_with("--config=")
    });
    if !names_config {
        let file = match &conn.cluster {
            Some(f) if !f.is_file() => {
                bail!("{}: no such file (given with --cluster)", f.display())
            }
            Some(f) => Some(f.clone()),
            None => Some(PathBuf::from("Cluster.toml")).filter(|p| p.is_file()),
        };
        if let Some(f) = file {
            cmd.arg("--config").arg(f);
        }
    }
    if let Some(url) = &conn.director {
        match daemon {
            Daemon::Agent => {
                cmd.arg("--director").arg(url);
            }
            Daemon::Director => bail!(
                "--director names the director for the CLI and agents; the director's own address is --listen"
            ),
        }
    }
    // In the environment rather than on the command line, where any user
    // of the machine could read it.
    if let Some(t) = &conn.token {
        cmd.env("TEMPEST_TOKEN", t);
    }
    cmd.args(&args);
    exec(cmd, &bin)
}

#[cfg(unix)]
fn exec(mut cmd: Command, bin: &Path) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let e = cmd.exec();
    Err(anyhow!("starting {}: {e}", bin.display()))
}

#[cfg(not(unix))]
fn exec(mut cmd: Command, bin: &Path) -> Result<ExitCode> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_file_sets_the_token_and_the_agents_director() {
        let text = cluster_toml(Some("abc123")).unwrap();
        assert_eq!(text.matches("\ntoken = \"abc123\"\n").count(), 2);
        assert!(text.contains("\ndirector = \"http://127.0.0.1:7300\"\n"));
        assert!(text.contains("Written by `tempest cluster init`"));
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["agent"]["token"].as_str(), Some("abc123"));
        assert_eq!(t["director"]["token"].as_str(), Some("abc123"));
        let without = cluster_toml(None).unwrap();
        assert!(!without.contains("\ntoken ="));
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
