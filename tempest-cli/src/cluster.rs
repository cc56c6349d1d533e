//! Setting up a cluster: `tempest cluster init` writes a commented
//! `Cluster.toml` and the cluster's token files, and `tempest director` /
//! `tempest agent` start the daemons with it.
//!
//! The file is the repository's `Cluster.toml.example` (every key,
//! commented, kept valid by the daemons' own tests) pointing at three new
//! random tokens in files beside it (`admin.token`, `viewer.token`,
//! `agent.token`, each mode 0600), and the agent pointed at the director on
//! this machine, so one file starts both daemons and the CLI finds them
//! with it. The tokens are never in the file itself, nor on a command line.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use tempest_control::credentials::{write_private_file, write_secret_file, ADMIN_TOKEN_ENV};
use tempest_control::tls::ClusterCa;
use tempest_control::Secret;

use crate::client::ConnArgs;

/// Every key of Cluster.toml, commented.
const EXAMPLE: &str = include_str!("../../Cluster.toml.example");

/// What `tempest cluster init` was asked.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The file to write.
    #[arg(long, short, value_name = "FILE", default_value = "Cluster.toml")]
    pub output: PathBuf,
    /// Write no tokens (anyone who reaches the daemons can deploy; they
    /// then refuse to listen beyond loopback without --insecure).
    #[arg(long)]
    pub no_token: bool,
    /// A host name or IP address the director and the agents are reached
    /// by, besides localhost, 127.0.0.1, ::1 and this machine's name: it
    /// goes into their certificates (repeat for several).
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
    /// Make no cluster CA and no certificates (the daemons then refuse to
    /// listen beyond loopback without --insecure).
    #[arg(long)]
    pub no_tls: bool,
}

/// The TLS files `tempest cluster init` writes beside the Cluster.toml
/// (keys mode 0600).
pub const TLS_FILES: [&str; 6] = [
    "ca.crt",
    "ca.key",
    "director.crt",
    "director.key",
    "agent.crt",
    "agent.key",
];

/// The token files `tempest cluster init` writes, beside the Cluster.toml:
/// (the key that names it, its file name).
pub const TOKEN_FILES: [(&str, &str); 3] = [
    ("admin_token_file", "admin.token"),
    ("viewer_token_file", "viewer.token"),
    ("agent_token_file", "agent.token"),
];

/// The Cluster.toml text: the example with the token files named (when
/// `tokens`) and the agent's `director` set to this machine's.
pub fn cluster_toml(tokens: bool, tls: bool, hosts: &[String]) -> Result<String> {
    let header = "# Cluster.toml: the settings of a Tempest cluster's daemons.\n";
    let mut text = EXAMPLE.replacen(
        header,
        &format!(
            "{header}#\n# Written by `tempest cluster init`. Start the daemons next to it with\n\
             # `tempest director` and `tempest agent`; the `tempest` commands run here\n\
             # read the director's address and the admin token through it. The tokens\n\
             # are in the files it names (admin.token, viewer.token, agent.token),\n\
             # each readable by its owner only: copy agent.token (only) to the agents'\n\
             # nodes, and keep admin.token to yourself.\n"
        ),
        1,
    );
    let replace = |text: &mut String, from: &str, to: &str, times: usize| -> Result<()> {
        if text.matches(from).count() != times {
            bail!("Cluster.toml.example no longer has {times} line(s) `{from}`: update `tempest cluster init`");
        }
        *text = text.replace(from, to);
        Ok(())
    };
    let scheme = if tls { "https" } else { "http" };
    replace(
        &mut text,
        "# director = \"https://10.0.0.1:7300\"\n",
        &format!("director = \"{scheme}://127.0.0.1:7300\"\n"),
        1,
    )?;
    if tls {
        for (key, file) in [
            ("tls_cert_file", "agent.crt"),
            ("tls_key_file", "agent.key"),
            ("tls_ca_file", "ca.crt"),
            ("tls_cert_file", "director.crt"),
            ("tls_key_file", "director.key"),
            ("tls_ca_file", "ca.crt"),
            ("tls_ca_key_file", "ca.key"),
        ] {
            let line = format!("# {key} = \"{file}\"\n");
            let at = text.find(&line).ok_or_else(|| {
                anyhow!(
                    "Cluster.toml.example no longer has `{line}`: update `tempest cluster init`"
                )
            })?;
            text.replace_range(at..at + 2, "");
        }
    }
    let names: Vec<String> = hosts
        .iter()
        .filter(|h| h.parse::<std::net::IpAddr>().is_err())
        .map(|h| format!("{h:?}"))
        .collect();
    if !names.is_empty() {
        replace(
            &mut text,
            "# hosts = [\"director.example.internal\"]\n",
            &format!("hosts = [{}]\n", names.join(", ")),
            1,
        )?;
    }
    if tokens {
        for (key, file) in TOKEN_FILES {
            replace(
                &mut text,
                &format!("# {key} = \"{file}\"\n"),
                &format!("{key} = \"{file}\"\n"),
                1,
            )?;
        }
        replace(
            &mut text,
            "# token_file = \"agent.token\"\n",
            "token_file = \"agent.token\"\n",
            1,
        )?;
    }
    Ok(text)
}

/// `tempest cluster init`: the token files first (none is overwritten),
/// then the Cluster.toml naming them. `admin` is the admin token to use
/// (from --token-file), else a new one is made.
pub fn init(args: &InitArgs, admin: Option<Secret>) -> Result<()> {
    if args.no_token && admin.is_some() {
        bail!("--no-token and --token-file contradict each other");
    }
    let out = &args.output;
    let exists = |p: &Path| {
        anyhow!(
            "{} exists: it is not overwritten (remove it, or write another with --output)",
            p.display()
        )
    };
    if out.exists() {
        return Err(exists(out));
    }
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut written = Vec::new();
    if !args.no_tls {
        let files: Vec<PathBuf> = TLS_FILES.iter().map(|f| dir.join(f)).collect();
        if let Some(f) = files.iter().find(|f| f.exists()) {
            return Err(exists(f));
        }
        for h in &args.hosts {
            if h.parse::<std::net::IpAddr>().is_err() {
                tempest_director_host(h)?;
            }
        }
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            tempest_core::metrics::hostname(),
        ];
        for h in &args.hosts {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        let ca = ClusterCa::generate()?;
        let director = ca.issue("Tempest director", &names)?;
        let agent = ca.issue("Tempest agent", &names)?;
        let ca_key = ca.key_pem();
        let contents: [&str; 6] = [
            ca.cert_pem(),
            ca_key.expose(),
            &director.cert_pem,
            director.key_pem.expose(),
            &agent.cert_pem,
            agent.key_pem.expose(),
        ];
        for (file, text) in files.iter().zip(contents) {
            write_private_file(file, text.as_bytes())
                .with_context(|| format!("writing {}", file.display()))?;
            written.push(file.clone());
        }
    }
    if !args.no_token {
        let files: Vec<PathBuf> = TOKEN_FILES.iter().map(|(_, f)| dir.join(f)).collect();
        if let Some(f) = files.iter().find(|f| f.exists()) {
            return Err(exists(f));
        }
        let mut admin = admin;
        for file in &files {
            let secret = match admin.take() {
                Some(a) => a,
                None => Secret::generate()?,
            };
            write_secret_file(file, &secret)?;
            written.push(file.clone());
        }
    }
    let text = cluster_toml(!args.no_token, !args.no_tls, &args.hosts)?;
    let mut file = create_new_private(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            exists(out)
        } else {
            anyhow!("writing {}: {e}", out.display())
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    if written.is_empty() {
        outln!("wrote {} without tokens or certificates", out.display());
    } else {
        let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        outln!(
            "wrote {} and {} (each readable by you only)",
            out.display(),
            names.join(", ")
        );
        outln!(
            "copy agent.token, agent.crt, agent.key and ca.crt (only) to the agents' nodes, \
             beside their Cluster.toml; keep admin.token and ca.key to yourself and the director"
        );
    }
    outln!(
        "start the director with `tempest director` and an agent with `tempest agent` next to it"
    );
    Ok(())
}

/// A host name a certificate and the director's `hosts` can hold.
fn tempest_director_host(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if !ok {
        bail!("--host `{h}` is not a host name (letters, digits, `-`, `.`) or an IP address");
    }
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
    // A token given to the CLI is the admin's: the director gets it in its
    // environment (never on its command line, where any user of the machine
    // could read it); an agent never gets it (its own is the agent token).
    if let (Daemon::Director, Some(t)) = (daemon, crate::client::Target::flag_token(conn)?) {
        cmd.env(ADMIN_TOKEN_ENV, t.expose());
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
    fn the_written_file_names_the_token_files_and_the_agents_director() {
        let text = cluster_toml(true, false, &[]).unwrap();
        assert!(text.contains("\ndirector = \"http://127.0.0.1:7300\"\n"));
        assert!(text.contains("Written by `tempest cluster init`"));
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["agent"]["token_file"].as_str(), Some("agent.token"));
        for (key, file) in TOKEN_FILES {
            assert_eq!(t["director"][key].as_str(), Some(file), "{key}");
        }
        assert!(!text.contains("\ntoken ="), "no token in the file itself");
        let tls = cluster_toml(true, true, &["node1".into(), "10.0.0.1".into()]).unwrap();
        assert!(tls.contains("\ndirector = \"https://127.0.0.1:7300\"\n"));
        let t: toml::Table = tls.parse().unwrap();
        assert_eq!(t["agent"]["tls_cert_file"].as_str(), Some("agent.crt"));
        assert_eq!(t["agent"]["tls_ca_file"].as_str(), Some("ca.crt"));
        assert_eq!(
            t["director"]["tls_cert_file"].as_str(),
            Some("director.crt")
        );
        assert_eq!(t["director"]["tls_ca_key_file"].as_str(), Some("ca.key"));
        assert_eq!(t["director"]["hosts"].as_array().map(Vec::len), Some(1));
        let without = cluster_toml(false, false, &[]).unwrap();
        assert!(!without.contains("\nadmin_token_file ="));
        assert!(!without.contains("\ntoken_file ="));
    }
}
