//! The agent's configuration: the `[agent]` section of `Cluster.toml`, then
//! command-line flags over it, then the defaults.
//!
//! Every problem in the file is reported together, each with the file, line
//! and key (as `Topology.toml`'s are, with [`ConfigError`]); unknown keys are
//! errors, so a misspelt key is never silently ignored. The `[director]`
//! section belongs to the director and is not read here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempest_control::credentials::{AGENT_TOKEN_ENV, LEGACY_TOKEN_ENV};
use tempest_control::tls::TlsFiles;
use tempest_control::Secret;
use tempest_core::config::{ConfigError, ConfigErrors};
use toml::Spanned;

use crate::supervisor::SupervisorOptions;

/// The API's default port.
pub const DEFAULT_PORT: u16 = 7400;
/// The default port range of topology servers and metrics endpoints.
pub const DEFAULT_PORT_RANGE: PortRange = PortRange {
    first: 7500,
    last: 7599,
};
/// The default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// The default data directory (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "tempest-agent-data";
/// The shortest heartbeat interval.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// The longest heartbeat interval.
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// An inclusive range of TCP ports.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// How many ports it holds.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every port, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a port range such as \"7500-7599\"");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 {
            return Err(format!("`{s}`: port 0 is not a port that can be allocated"));
        }
        if first > last {
            return Err(format!("`{s}`: the first port is above the last"));
        }
        Ok(PortRange { first, last })
    }
}

/// The agent's settings, resolved.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The HTTP API's address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The host (and optionally port) others reach this node by: it is the
    /// host of topology server addresses and of the API address sent to the
    /// director. Default: the listen IP, or the host name when listening on
    /// every interface.
    pub advertise: Option<String>,
    /// The director's base URL (`http://HOST:PORT`), without a trailing
    /// slash; `None` runs without one (assignments come from the API).
    pub director: Option<String>,
    /// Where packages, logs, process records and the agent id live.
    pub data_dir: PathBuf,
    /// Ports for topology servers and metrics endpoints.
    pub port_range: PortRange,
    /// The agent token: every API call but the health check needs it, the
    /// agent heartbeats and downloads packages with it. Its processes never
    /// get it (each gets its deployment's data-plane secret instead).
    pub token: Option<Secret>,
    /// The agent's certificate, key and the cluster CA: with them the API is
    /// HTTPS and takes only clients with a certificate of the cluster (the
    /// director), and the agent presents the certificate to an `https://`
    /// director, whose own it checks against the CA.
    pub tls: Option<TlsFiles>,
    /// Serve the API beyond loopback without a token or TLS, and heartbeat
    /// to a director beyond loopback over plain HTTP (logged as a warning).
    pub insecure: bool,
    /// Warnings found while reading the settings, logged at start.
    pub warnings: Vec<String>,
    /// How often to heartbeat.
    pub heartbeat: Duration,
    /// The log level (`RUST_LOG` overrides it).
    pub log_level: String,
    /// How processes are supervised.
    pub supervisor: SupervisorOptions,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT),
            advertise: None,
            director: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            port_range: DEFAULT_PORT_RANGE,
            token: None,
            tls: None,
            insecure: false,
            warnings: Vec::new(),
            heartbeat: DEFAULT_HEARTBEAT,
            log_level: "info".into(),
            supervisor: SupervisorOptions::default(),
        }
    }
}

/// The agent's command line. Flags override `Cluster.toml`.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "tempest-agent",
    version,
    about = "The Tempest agent: runs, supervises and measures a node's topology processes"
)]
pub struct Cli {
    /// A Cluster.toml whose [agent] section configures the agent.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The HTTP API's address, IP:PORT (port 0 picks a free one) [default: 127.0.0.1:7400].
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// The host[:port] others reach this node by [default: the listen IP].
    #[arg(long, value_name = "HOST[:PORT]")]
    pub advertise: Option<String>,
    /// The director's URL, such as http://10.0.0.1:7300 [default: none; assignments come from POST /api/v1/assignment].
    #[arg(long, value_name = "URL")]
    pub director: Option<String>,
    /// The data directory [default: tempest-agent-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Ports for topology servers and metrics endpoints, FIRST-LAST [default: 7500-7599].
    #[arg(long, value_name = "FIRST-LAST")]
    pub port_range: Option<String>,
    /// A file holding the agent token [env: TEMPEST_AGENT_TOKEN].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Deprecated: the token itself. A command line is readable by every
    /// user of the machine: use --token-file or TEMPEST_AGENT_TOKEN.
    #[arg(long, hide = true)]
    pub token: Option<String>,
    /// The agent's TLS certificate (PEM): with --tls-key and --tls-ca the
    /// API is HTTPS with mutual TLS, and an https:// director is checked
    /// against the cluster CA.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, mode 0600).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA's certificate (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Serve the API beyond loopback without a token or TLS, or heartbeat
    /// to a director beyond loopback over plain http://: anyone who
    /// reaches or overhears it can then run code on this node.
    #[arg(long)]
    pub insecure: bool,
    /// The heartbeat interval in milliseconds [default: 1000].
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// The log level (error, warn, info, debug, trace); RUST_LOG overrides it [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl Cli {
    /// Reads the file (if any) and applies the flags over it.
    pub fn resolve(&self) -> Result<AgentConfig, ConfigErrors> {
        let mut config = match &self.config {
            Some(path) => load(path)?,
            None => AgentConfig::default(),
        };
        let mut errors = Vec::new();
        let mut flag = |key: &str, r: Result<(), String>| {
            if let Err(message) = r {
                errors.push(ConfigError {
                    file: Some(PathBuf::from("command line")),
                    key: Some(format!("--{key}")),
                    ..ConfigError::new(message)
                });
            }
        };
        if let Some(v) = &self.listen {
            flag("listen", parse_listen(v).map(|a| config.listen = a));
        }
        if let Some(v) = &self.advertise {
            flag(
                "advertise",
                parse_advertise(v).map(|a| config.advertise = Some(a)),
            );
        }
        if let Some(v) = &self.director {
            flag(
                "director",
                parse_director(v).map(|d| config.director = Some(d)),
            );
        }
        if let Some(v) = &self.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &self.port_range {
            flag("port-range", v.parse().map(|r| config.port_range = r));
        }
        // The token: --token-file, the environment, the file's token_file
        // (already read), then the old --token / TEMPEST_TOKEN / token.
        let mut warnings = Vec::new();
        if let Some(path) = &self.token_file {
            flag(
                "token-file",
                read_token_file(path, &mut warnings).map(|t| config.token = Some(t)),
            );
        } else {
            match Secret::from_env(AGENT_TOKEN_ENV) {
                Ok(Some(t)) => config.token = Some(t),
                Ok(None) => {
                    if let Some(v) = &self.token {
                        flag("token", parse_token(v).map(|t| config.token = Some(t)));
                        warnings.push(
                            "--token is deprecated: a command line can be read by every user \
                             of this machine; use --token-file, token_file or TEMPEST_AGENT_TOKEN"
                                .into(),
                        );
                    } else if config.token.is_none() {
                        match Secret::from_env(LEGACY_TOKEN_ENV) {
                            Ok(t) => config.token = t,
                            Err(e) => flag("token", Err(e.to_string())),
                        }
                    }
                }
                Err(e) => flag("token", Err(e.to_string())),
            }
        }
        config.warnings.extend(warnings);
        if let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            config.tls = Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            });
        }
        config.insecure |= self.insecure;
        if let Some(ms) = self.heartbeat_ms {
            flag(
                "heartbeat-ms",
                check_heartbeat(Duration::from_millis(ms)).map(|d| config.heartbeat = d),
            );
        }
        if let Some(v) = &self.log_level {
            config.log_level = v.clone();
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// Reads `Cluster.toml`'s `[agent]` section over the defaults.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        ..ConfigError::new(format!("cannot read it: {e}"))
    })?;
    parse(&text, Some(path))
}

type Val = Spanned<toml::Value>;

/// Parses the text of a `Cluster.toml`. Relative paths in it are relative to
/// the file's directory.
pub fn parse(text: &str, path: Option<&Path>) -> Result<AgentConfig, ConfigErrors> {
    let doc = Doc { text, path };
    let top: BTreeMap<String, Val> =
        toml::from_str(text).map_err(|e| doc.error(e.span(), None, e.message().trim()))?;
    let mut errors = Vec::new();
    let mut config = AgentConfig::default();
    for (key, value) in &top {
        match key.as_str() {
            // The director reads its own section.
            "director" => {}
            "agent" => {}
            _ => errors.push(doc.error(
                Some(value.span()),
                Some(key),
                "unknown section; Cluster.toml has [agent] and [director]",
            )),
        }
    }
    if let Some(agent) = top.get("agent") {
        #[derive(serde::Deserialize)]
        struct AgentOnly {
            agent: BTreeMap<String, Val>,
        }
        match toml::from_str::<AgentOnly>(text) {
            Ok(a) => {
                let base = path.and_then(Path::parent).unwrap_or(Path::new(""));
                read_agent(&doc, &a.agent, base, &mut config, &mut errors);
            }
            Err(e) => errors.push(doc.error(
                Some(agent.span()),
                Some("agent"),
                format!("[agent] must be a table: {}", e.message().trim()),
            )),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(errors))
    }
}

const AGENT_KEYS: &[&str] = &[
    "listen",
    "advertise",
    "director",
    "data_dir",
    "port_range",
    "token_file",
    "token",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
    "heartbeat_interval",
    "stop_grace",
    "restart_backoff",
    "restart_max_backoff",
    "log_max_bytes",
    "log_keep",
    "log_level",
];

fn read_agent(
    doc: &Doc<'_>,
    table: &BTreeMap<String, Val>,
    base: &Path,
    config: &mut AgentConfig,
    errors: &mut Vec<ConfigError>,
) {
    let mut tls_paths = BTreeMap::new();
    for (key, value) in table {
        let full = format!("agent.{key}");
        let mut fail = |message: String| {
            errors.push(doc.error(Some(value.span()), Some(&full), message));
        };
        let string = || match value.get_ref() {
            toml::Value::String(s) => Ok(s.as_str()),
            other => Err(format!("expected a string, found {}", describe(other))),
        };
        let duration = || {
            let s = string()?;
            humantime::parse_duration(s.trim())
                .map_err(|e| format!("`{s}` is not a duration ({e}); such as \"1s\" or \"500ms\""))
        };
        let integer = |min: i64, max: i64| match value.get_ref() {
            toml::Value::Integer(n) if (min..=max).contains(n) => Ok(*n),
            toml::Value::Integer(n) => Err(format!("{n} is out of range {min}..={max}")),
            other => Err(format!("expected an integer, found {}", describe(other))),
        };
        let r: Result<(), String> = match key.as_str() {
            "listen" => string().and_then(parse_listen).map(|v| config.listen = v),
            "advertise" => string()
                .and_then(parse_advertise)
                .map(|v| config.advertise = Some(v)),
            "director" => string()
                .and_then(parse_director)
                .map(|v| config.director = Some(v)),
            "data_dir" => string().and_then(|s| {
                if s.trim().is_empty() {
                    return Err("must not be empty".into());
                }
                config.data_dir = base.join(s);
                Ok(())
            }),
            "port_range" => string()
                .and_then(|s| s.parse())
                .map(|v| config.port_range = v),
            "token_file" => string().and_then(|s| {
                read_token_file(&base.join(s), &mut config.warnings).map(|t| config.token = Some(t))
            }),
            // The old single cluster token, as the agent token.
            "token" => string().and_then(parse_token).and_then(|v| {
                if table.contains_key("token_file") {
                    return Err("give either token (the old single token) or token_file".into());
                }
                config.token = Some(v);
                Ok(())
            }),
            "tls_cert_file" | "tls_key_file" | "tls_ca_file" => string().and_then(|s| {
                if s.trim().is_empty() {
                    return Err("must not be empty".into());
                }
                tls_paths.insert(key.as_str(), base.join(s));
                Ok(())
            }),
            "heartbeat_interval" => duration()
                .and_then(check_heartbeat)
                .map(|v| config.heartbeat = v),
            "stop_grace" => duration().map(|v| config.supervisor.stop_grace = v),
            "restart_backoff" => duration().and_then(|v| {
                if v.is_zero() {
                    return Err("must be more than 0".into());
                }
                config.supervisor.restart_min = v;
                Ok(())
            }),
            "restart_max_backoff" => duration().map(|v| config.supervisor.restart_max = v),
            "log_max_bytes" => {
                integer(4096, i64::MAX).map(|v| config.supervisor.log_max_bytes = v as u64)
            }
            "log_keep" => integer(0, 100).map(|v| config.supervisor.log_keep = v as usize),
            "log_level" => string().and_then(|s| {
                tracing_subscriber::EnvFilter::try_new(s)
                    .map_err(|e| format!("`{s}` is not a log level or filter: {e}"))?;
                config.log_level = s.to_owned();
                Ok(())
            }),
            _ => Err(format!(
                "unknown key; the [agent] keys are {}",
                AGENT_KEYS.join(", ")
            )),
        };
        if let Err(message) = r {
            fail(message);
        }
    }
    match tls_files(&mut tls_paths) {
        Ok(files) => config.tls = files,
        Err(missing) => {
            let given = table
                .iter()
                .find(|(k, _)| k.starts_with("tls_"))
                .map(|(k, v)| (k.clone(), v.span()));
            if let Some((key, span)) = given {
                errors.push(doc.error(
                    Some(span),
                    Some(&format!("agent.{key}")),
                    format!("TLS needs tls_cert_file, tls_key_file and tls_ca_file: {missing} is missing"),
                ));
            }
        }
    }
    let sup = &config.supervisor;
    if sup.restart_max < sup.restart_min {
        let (key, value) = match table.get("restart_max_backoff") {
            Some(v) => ("agent.restart_max_backoff", Some(v.span())),
            None => (
                "agent.restart_backoff",
                table.get("restart_backoff").map(|v| v.span()),
            ),
        };
        errors.push(doc.error(
            value,
            Some(key),
            format!(
                "restart_max_backoff ({}) is shorter than restart_backoff ({})",
                humantime::format_duration(sup.restart_max),
                humantime::format_duration(sup.restart_min)
            ),
        ));
    }
}

fn describe(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// `IP:PORT`, or a bare IP (port 7400).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    Err(format!(
        "`{s}` is not an address to listen on, such as \"127.0.0.1:7400\" or \"0.0.0.0:7400\""
    ))
}

/// `HOST` or `HOST:PORT`.
pub fn parse_advertise(s: &str) -> Result<String, String> {
    let s = s.trim();
    let bad = |why: &str| format!("`{s}` is not a HOST or HOST:PORT to advertise: {why}");
    if s.is_empty() {
        return Err(bad("it is empty"));
    }
    if s.contains("://") || s.contains('/') {
        return Err(bad("give a host, not a URL"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains white space"));
    }
    let (host, port) = split_host_port(s);
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err(bad("the port is not a number from 1 to 65535")),
        }
    }
    Ok(s.to_owned())
}

/// The host and (if given) port of `HOST[:PORT]`, `[V6]:PORT` or a bare IPv6.
pub fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':'));
        }
    }
    if s.matches(':').count() > 1 {
        // A bare IPv6 address.
        return (s, None);
    }
    match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    }
}

/// The three TLS files given by `tls_*_file` keys (`None` when none is),
/// or the name of the one missing.
fn tls_files(given: &mut BTreeMap<&str, PathBuf>) -> Result<Option<TlsFiles>, &'static str> {
    if given.is_empty() {
        return Ok(None);
    }
    let mut take = |key: &'static str| given.remove(key).ok_or(key);
    Ok(Some(TlsFiles {
        cert: take("tls_cert_file")?,
        key: take("tls_key_file")?,
        ca: take("tls_ca_file")?,
    }))
}

/// An `http://` or `https://` URL; the trailing slash is dropped.
pub fn parse_director(s: &str) -> Result<String, String> {
    let s = s.trim();
    let url = reqwest::Url::parse(s)
        .map_err(|e| format!("`{s}` is not a URL ({e}); such as \"https://10.0.0.1:7300\""))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "`{s}`: the scheme must be http or https, not {other}"
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{s}` has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{s}`: a director URL takes no query or fragment"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

fn parse_token(s: &str) -> Result<Secret, String> {
    if s.is_empty() {
        return Err("the token must not be empty (leave it out to run without one)".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the token must not contain white space or control characters".into());
    }
    Secret::new(s, "the token").map_err(|e| e.to_string())
}

/// Reads a token file (its first line); notes in `warnings` when other
/// users can read it.
pub fn read_token_file(path: &Path, warnings: &mut Vec<String>) -> Result<Secret, String> {
    let secret = Secret::from_file(path).map_err(|e| e.to_string())?;
    if !tempest_control::credentials::is_private(path) {
        warnings.push(format!(
            "{}: the token file can be read by other users of this machine; make it readable \
             by its owner only (chmod 600)",
            path.display()
        ));
    }
    Ok(secret)
}

impl AgentConfig {
    /// Refuses an open bind: an API beyond loopback without a token, unless
    /// `insecure` is set.
    pub fn check(&self) -> Result<(), String> {
        if self.insecure {
            return Ok(());
        }
        if !self.listen.ip().is_loopback() && self.token.is_none() {
            return Err(format!(
                "refusing to serve the API on {} without a token: anyone who reaches it could \
                 run code on this node; set token_file (or TEMPEST_AGENT_TOKEN), listen on a \
                 loopback address, or pass --insecure",
                self.listen
            ));
        }
        if !self.listen.ip().is_loopback() && self.tls.is_none() {
            return Err(format!(
                "refusing to serve the API on {} without TLS: its token and its processes' \
                 secrets would cross the network in clear; set tls_cert_file, tls_key_file and \
                 tls_ca_file (`tempest cluster init` makes them), listen on a loopback address, \
                 or pass --insecure",
                self.listen
            ));
        }
        if let Some(url) = &self.director {
            if url.starts_with("http://") && !is_loopback_url(url) {
                return Err(format!(
                    "refusing to heartbeat to {url} over plain http: the agent token would cross \
                     the network in clear; use an https:// director URL with tls_ca_file, or pass \
                     --insecure"
                ));
            }
            if url.starts_with("https://") && self.tls.is_none() {
                return Err(format!(
                    "the director {url} is https: set tls_cert_file, tls_key_file and tls_ca_file \
                     (the agent checks the director against the cluster CA and shows its own \
                     certificate)"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `url`'s host is a loopback address or `localhost`.
pub fn is_loopback_url(url: &str) -> bool {
    let Some(url) = reqwest::Url::parse(url).ok() else {
        return false;
    };
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

fn check_heartbeat(d: Duration) -> Result<Duration, String> {
    if d < MIN_HEARTBEAT || d > MAX_HEARTBEAT {
        return Err(format!(
            "the heartbeat interval must be from 10ms to 1h, not {}",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

struct Doc<'a> {
    text: &'a str,
    path: Option<&'a Path>,
}

impl Doc<'_> {
    fn error(
        &self,
        span: Option<std::ops::Range<usize>>,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = match span {
            Some(span) => {
                let before = &self.text[..span.start.min(self.text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError {
            file: self.path.map(Path::to_path_buf),
            line,
            column,
            key: key.map(str::to_owned),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_key() {
        let text = r#"
[agent]
listen = "0.0.0.0:7401"
advertise = "node1.example:7401"
director = "http://10.0.0.1:7300/"
data_dir = "data"
port_range = "8000-8009"
token = "s3cret"
heartbeat_interval = "250ms"
stop_grace = "3s"
restart_backoff = "100ms"
restart_max_backoff = "5s"
log_max_bytes = 65536
log_keep = 2
log_level = "debug"

[director]
anything = "the director's business"
"#;
        let c = parse(text, Some(Path::new("/etc/tempest/Cluster.toml"))).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7401".parse().unwrap());
        assert_eq!(c.advertise.as_deref(), Some("node1.example:7401"));
        assert_eq!(c.director.as_deref(), Some("http://10.0.0.1:7300"));
        assert_eq!(c.data_dir, PathBuf::from("/etc/tempest/data"));
        assert_eq!(
            c.port_range,
            PortRange {
                first: 8000,
                last: 8009
            }
        );
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("s3cret"));
        assert_eq!(c.heartbeat, Duration::from_millis(250));
        assert_eq!(c.supervisor.stop_grace, Duration::from_secs(3));
        assert_eq!(c.supervisor.restart_min, Duration::from_millis(100));
        assert_eq!(c.supervisor.restart_max, Duration::from_secs(5));
        assert_eq!(c.supervisor.log_max_bytes, 65536);
        assert_eq!(c.supervisor.log_keep, 2);
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../../Cluster.toml.example");
        parse(text, None).unwrap();
    }

    #[test]
    fn reports_every_error_with_its_line_and_key() {
        let text = "[agent]\nlisten = \"nowhere\"\nport_rnage = \"1-2\"\nheartbeat_interval = 5\nport_range = \"9-3\"\n[oops]\n";
        let err = parse(text, Some(Path::new("Cluster.toml"))).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[0].starts_with("Cluster.toml:2:10: key `agent.listen`"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("Cluster.toml:3:14: key `agent.port_rnage`: unknown key"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains("key `agent.heartbeat_interval`: expected a string"),
            "{lines:#?}"
        );
        assert!(
            lines[3].contains(":5:") && lines[3].contains("first port is above"),
            "{lines:#?}"
        );
        assert!(
            lines[4].contains("key `oops`: unknown section"),
            "{lines:#?}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse("[agent]\nlisten = \n", Some(Path::new("C.toml"))).unwrap_err();
        assert!(err.to_string().starts_with("C.toml:2:"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Cluster.toml");
        std::fs::write(
            &path,
            "[agent]\nport_range = \"8000-8001\"\ntoken = \"a\"\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(path),
            port_range: Some("9000-9009".into()),
            heartbeat_ms: Some(100),
            ..Cli::default()
        };
        let c = cli.resolve().unwrap();
        assert_eq!(
            c.port_range,
            PortRange {
                first: 9000,
                last: 9009
            }
        );
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("a"));
        assert_eq!(c.heartbeat, Duration::from_millis(100));
        let bad = Cli {
            director: Some("ftp://x".into()),
            heartbeat_ms: Some(0),
            ..Cli::default()
        };
        let err = bad.resolve().unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(
            err.to_string().contains("command line: key `--director`"),
            "{err}"
        );
    }

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("a:1"), ("a", Some("1")));
        assert_eq!(split_host_port("a"), ("a", None));
        assert_eq!(split_host_port("[::1]:80"), ("::1", Some("80")));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert!(parse_advertise("http://x").is_err());
        assert!(parse_advertise("x:0").is_err());
    }
}
