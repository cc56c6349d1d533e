//! The director's settings: the `[director]` section of `Cluster.toml`,
//! with command-line flags over it.
//!
//! Unknown keys and bad values are errors naming the file, line and key,
//! all reported at once. The `[agent]` section belongs to the agents and is
//! not read here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempest_control::tls::TlsFiles;
use tempest_control::Secret;

/// The default API address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7300";
/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "tempest-director-data";
/// The default agent timeout.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default metrics scrape interval.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(2);
/// The default upload limit: 512 MiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 512 * 1024 * 1024;

const KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "admin_token_file",
    "viewer_token_file",
    "agent_token_file",
    "token",
    "hosts",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
    "tls_ca_key_file",
    "agent_timeout",
    "max_upload",
    "metrics_interval",
    "log_level",
];

/// The director's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectorConfig {
    /// The API's address.
    pub listen: SocketAddr,
    /// The database and packages.
    pub data_dir: PathBuf,
    /// The admin token: everything (people and the CLI).
    pub admin_token: Option<Secret>,
    /// The viewer token: reads only.
    pub viewer_token: Option<Secret>,
    /// The agent token: heartbeats and package downloads; the director
    /// calls the agents' APIs with it.
    pub agent_token: Option<Secret>,
    /// The host names the API answers to (besides `localhost` and IP
    /// addresses): a request whose `Host` names another is refused.
    pub hosts: Vec<String>,
    /// The director's certificate, key and the cluster CA: with them the
    /// API and the web UI are HTTPS, agents must show a certificate of the
    /// cluster to heartbeat or download, and the director calls the
    /// agents' APIs over https with its certificate.
    pub tls: Option<TlsFiles>,
    /// The cluster CA's key (PEM, 0600): with it the director issues each
    /// deployment a data-plane certificate, so its links are TLS too.
    pub tls_ca_key: Option<PathBuf>,
    /// Serve beyond loopback without credentials or TLS (logged as a
    /// warning).
    pub insecure: bool,
    /// Warnings found while reading the settings, logged at start (a token
    /// file others can read, a deprecated flag).
    pub warnings: Vec<String>,
    /// An agent silent for this long is down.
    pub agent_timeout: Duration,
    /// The largest package upload, bytes.
    pub max_upload: u64,
    /// How often the agents' metrics are scraped.
    pub metrics_interval: Duration,
    /// The log level or filter.
    pub log_level: String,
}

impl Default for DirectorConfig {
    fn default() -> Self {
        DirectorConfig {
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            admin_token: None,
            viewer_token: None,
            agent_token: None,
            hosts: Vec::new(),
            tls: None,
            tls_ca_key: None,
            insecure: false,
            warnings: Vec::new(),
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            max_upload: DEFAULT_MAX_UPLOAD,
            metrics_interval: DEFAULT_METRICS_INTERVAL,
            log_level: "info".into(),
        }
    }
}

/// Every problem found in a configuration, one a line.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

/// The line (1-based) where `key` is set in the `[director]` section.
fn line_of(text: &str, key: &str) -> usize {
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            in_section = l
                .trim_start_matches('[')
                .trim_start()
                .starts_with("director");
            if l.starts_with("[director.") && key == "director" {
                return i + 1;
            }
            continue;
        }
        if in_section && l.split('=').next().map(str::trim) == Some(key) {
            return i + 1;
        }
    }
    0
}

/// Reads the `[director]` section of `text` (from `path`) over the defaults.
pub fn parse_cluster_toml(text: &str, path: &Path) -> Result<DirectorConfig, ConfigErrors> {
    let file = path.display();
    let table: toml::Table = text
        .parse()
        .map_err(|e| ConfigErrors(vec![format!("{file}: {e}")]))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut config = DirectorConfig::default();
    let mut errors = Vec::new();
    for (section, _) in table.iter() {
        if section != "agent" && section != "director" {
            errors.push(format!(
                "{file}: unknown section [{section}]; Cluster.toml has [agent] and [director]"
            ));
        }
    }
    let Some(section) = table.get("director") else {
        return if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        };
    };
    let Some(section) = section.as_table() else {
        return Err(ConfigErrors(vec![format!(
            "{file}: `director` must be a table"
        )]));
    };
    let mut found = Vec::new();
    let mut legacy_token = None;
    let mut tls_paths = std::collections::BTreeMap::new();
    for (key, value) in section {
        let line = line_of(text, key);
        let at = format!("{file}:{line}: key `director.{key}`");
        let string = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| "must be a string".to_owned())
        };
        let r: Result<(), String> = match key.as_str() {
            "listen" => string().and_then(|s| {
                s.parse()
                    .map(|a| config.listen = a)
                    .map_err(|e| format!("`{s}` is not IP:PORT: {e}"))
            }),
            "data_dir" => string().map(|s| config.data_dir = base.join(s)),
            "admin_token_file" => string()
                .and_then(|s| read_token_file(&base.join(s), &mut config.warnings))
                .map(|t| config.admin_token = Some(t)),
            "viewer_token_file" => string()
                .and_then(|s| read_token_file(&base.join(s), &mut config.warnings))
                .map(|t| config.viewer_token = Some(t)),
            "agent_token_file" => string()
                .and_then(|s| read_token_file(&base.join(s), &mut config.warnings))
                .map(|t| config.agent_token = Some(t)),
            // The single cluster token of older versions: the admin token.
            "token" => string().and_then(|s| {
                Secret::new(&s, "the token")
                    .map(|t| legacy_token = Some(t))
                    .map_err(|e| e.to_string())
            }),
            "hosts" => match value.as_array() {
                Some(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .ok_or_else(|| "must be a list of host names".to_owned())
                            .and_then(parse_host)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|h| config.hosts = h),
                None => Err("must be a list of host names, e.g. [\"director.example\"]".into()),
            },
            "agent_timeout" => string()
                .and_then(|s| parse_timeout(&s))
                .map(|d| config.agent_timeout = d),
            "max_upload" => match value.as_integer() {
                Some(n) if n >= 1024 => {
                    config.max_upload = n as u64;
                    Ok(())
                }
                _ => Err("must be a number of bytes, at least 1024".into()),
            },
            "metrics_interval" => string()
                .and_then(|s| parse_timeout(&s))
                .map(|d| config.metrics_interval = d),
            "log_level" => string().map(|s| config.log_level = s),
            "tls_cert_file" | "tls_key_file" | "tls_ca_file" => string().and_then(|s| {
                if s.trim().is_empty() {
                    return Err("must not be empty".into());
                }
                tls_paths.insert(key.as_str(), base.join(s));
                Ok(())
            }),
            "tls_ca_key_file" => string().and_then(|s| {
                if s.trim().is_empty() {
                    return Err("must not be empty".into());
                }
                config.tls_ca_key = Some(base.join(s));
                Ok(())
            }),
            _ => Err(format!(
                "unknown key; the [director] keys are {}",
                KEYS.join(", ")
            )),
        };
        if let Err(e) = r {
            found.push((line, format!("{at}: {e}")));
        }
    }
    if let Some(t) = legacy_token {
        if section.contains_key("admin_token_file") {
            let line = line_of(text, "token");
            found.push((
                line,
                format!(
                    "{file}:{line}: key `director.token`: give either token (the old single \
                     token) or admin_token_file, not both"
                ),
            ));
        } else {
            config.admin_token = Some(t);
        }
    }
    if !tls_paths.is_empty() {
        let given: Vec<&str> = tls_paths.keys().copied().collect();
        let mut take = |key: &str| tls_paths.remove(key).ok_or(key.to_owned());
        match (
            take("tls_cert_file"),
            take("tls_key_file"),
            take("tls_ca_file"),
        ) {
            (Ok(cert), Ok(key), Ok(ca)) => config.tls = Some(TlsFiles { cert, key, ca }),
            (c, k, a) => {
                let missing: Vec<String> = [c, k, a].into_iter().filter_map(Result::err).collect();
                let line = line_of(text, given[0]);
                found.push((
                    line,
                    format!(
                        "{file}:{line}: key `director.{}`: TLS needs tls_cert_file, tls_key_file \
                         and tls_ca_file: {} missing",
                        given[0],
                        missing.join(", ")
                    ),
                ));
            }
        }
    }
    // In the file's order, not the keys'.
    found.sort();
    errors.extend(found.into_iter().map(|(_, e)| e));
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Reads a token file (its first line); notes in `warnings` when other
/// users can read it.
pub fn read_token_file(path: &Path, warnings: &mut Vec<String>) -> Result<Secret, String> {
    let secret = Secret::from_file(path).map_err(|e| e.to_string())?;
    if !tempest_control::credentials::is_private(path) {
        warnings.push(format!(
            "{}: the token file can be read by other users of this machine; make it \
             readable by its owner only (chmod 600)",
            path.display()
        ));
    }
    Ok(secret)
}

/// A host name the API answers to: letters, digits, `-`, `_` and `.`,
/// without a port.
pub fn parse_host(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{s}` is not a host name (letters, digits, `-`, `_`, `.`; no port)"
        ))
    }
}

impl DirectorConfig {
    /// Whether any credential is set (then every call but the health
    /// check needs one).
    pub fn has_credentials(&self) -> bool {
        self.admin_token.is_some() || self.viewer_token.is_some() || self.agent_token.is_some()
    }

    /// The settings' own contradictions, and an open bind: a director
    /// listening beyond loopback without credentials refuses to start
    /// unless `insecure` is set.
    pub fn check(&self) -> Result<(), String> {
        if self.admin_token.is_none() && self.has_credentials() {
            return Err(
                "a viewer or agent token is set without an admin token: set admin_token_file \
                 or TEMPEST_ADMIN_TOKEN too (nobody could change anything otherwise)"
                    .into(),
            );
        }
        if self.tls_ca_key.is_some() && self.tls.is_none() {
            return Err(
                "tls_ca_key_file is set without tls_cert_file, tls_key_file and tls_ca_file: \
                 the director issues data-plane certificates only in a TLS cluster"
                    .into(),
            );
        }
        if !self.listen.ip().is_loopback() && !self.has_credentials() && !self.insecure {
            return Err(format!(
                "refusing to listen on {} without credentials: anyone who reaches it could run \
                 code on every agent; set admin_token_file (or TEMPEST_ADMIN_TOKEN), listen on \
                 a loopback address, or pass --insecure",
                self.listen
            ));
        }
        if !self.listen.ip().is_loopback() && self.tls.is_none() && !self.insecure {
            return Err(format!(
                "refusing to listen on {} without TLS: tokens and deploy secrets would cross \
                 the network in clear; set tls_cert_file, tls_key_file and tls_ca_file \
                 (`tempest cluster init` makes them), listen on a loopback address, or pass \
                 --insecure",
                self.listen
            ));
        }
        Ok(())
    }
}

/// Parses an agent timeout: a duration from 100ms to 1h.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err(format!("`{s}`: must be from 100ms to 1h"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_director_section_and_ignores_the_agents() {
        let text = "[agent]\nlisten = \"0.0.0.0:1\"\nwhatever = 1\n[director]\nlisten = \"0.0.0.0:7301\"\ndata_dir = \"d\"\nagent_timeout = \"3s\"\nmax_upload = 4096\n";
        let c = parse_cluster_toml(text, Path::new("/etc/tempest/Cluster.toml")).unwrap();
        assert_eq!(c.listen.port(), 7301);
        assert_eq!(c.data_dir, Path::new("/etc/tempest/d"));
        assert_eq!(c.agent_timeout, Duration::from_secs(3));
        assert_eq!(c.max_upload, 4096);
    }

    #[test]
    fn the_example_cluster_toml_is_valid_and_shows_the_defaults() {
        let text = include_str!("../../Cluster.toml.example");
        let c = parse_cluster_toml(text, Path::new("Cluster.toml")).unwrap();
        assert_eq!(
            c,
            DirectorConfig {
                data_dir: PathBuf::from(DEFAULT_DATA_DIR),
                ..DirectorConfig::default()
            }
        );
    }

    #[test]
    fn reports_every_bad_key_with_its_line() {
        let text = "[director]\nlistn = \"x\"\nagent_timeout = \"soon\"\n";
        let e = parse_cluster_toml(text, Path::new("Cluster.toml")).unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert!(
            e.0[0].starts_with("Cluster.toml:2: key `director.listn`"),
            "{e}"
        );
        assert!(
            e.0[1].starts_with("Cluster.toml:3: key `director.agent_timeout`"),
            "{e}"
        );
    }
}
