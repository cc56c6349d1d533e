//! The director's settings: the `[director]` section of `Cluster.toml`,
//! with command-line flags over it.
//!
//! Unknown keys and bad values are errors naming the file, line and key,
//! all reported at once. The `[agent]` section belongs to the agents and is
//! not read here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    "token",
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
    /// The cluster token.
    pub token: Option<String>,
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
            token: None,
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
            "token" => string().and_then(|s| {
                if s.is_empty() {
                    Err("must not be empty".into())
                } else {
                    config.token = Some(s);
                    Ok(())
                }
            }),
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
            _ => Err(format!(
                "unknown key; the [director] keys are {}",
                KEYS.join(", ")
            )),
        };
        if let Err(e) = r {
            found.push((line, format!("{at}: {e}")));
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
