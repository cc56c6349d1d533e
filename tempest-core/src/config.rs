//! `Topology.toml`: the run-time overrides of a topology's settings.
//! (Stub: replaced by the full schema.)

use std::fmt;
use std::path::PathBuf;

use crate::topology::Topology;

/// One problem in a configuration file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when read from one.
    pub file: Option<PathBuf>,
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// The dotted key at fault, such as `failure.max_attempts`.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
        } else {
            f.write_str("<config>")?;
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A parsed `Topology.toml`.
#[derive(Clone, Debug, Default)]
pub struct TopologyFile {}

impl TopologyFile {
    /// Applies the file over a topology's settings.
    pub fn apply(&self, _topology: &mut Topology) -> Result<(), ConfigErrors> {
        Ok(())
    }
}

/// Deserializes a source's `[source.config]` table.
pub fn from_table<T: serde::de::DeserializeOwned>(table: &toml::Table) -> Result<T, ConfigError> {
    T::deserialize(toml::Value::Table(table.clone())).map_err(|e| ConfigError {
        file: None,
        line: None,
        column: None,
        key: None,
        message: e.to_string(),
    })
}
